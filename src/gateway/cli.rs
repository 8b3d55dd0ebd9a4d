//! `serviceradar-agent gateway --config <file>`: run until SIGINT/SIGTERM and
//! report on stdout in a line format scripts can wait for.
//!
//! `serviceradar-agent gateway --config <file> <admin command>`: tenants,
//! agents, integration sources, onboarding bundles and canonical devices,
//! against the database
//! named in the gateway config, opened directly (SQLite in WAL mode allows
//! it while the gateway runs). Every change bumps the database's
//! administrative generation; a running gateway notices within about two
//! seconds and pushes the new config to connected agents.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};
use tokio::sync::broadcast::error::RecvError;

use super::admin::onboarding::{self, OnboardRequest, OnboardingBundle, OnboardingSettings};
use super::admin::{
    AgentView, DeviceQuery, DeviceView, SourceView, UnmergeView, DEFAULT_DEVICE_LIMIT,
};
use super::integrations::{Credentials, SourcePatch, SourceSpec};
use super::tenancy::Tenant;
use super::{open_admin, start, GatewayConfig, GatewayEvent};

/// Administration commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Admin {
    /// Tenants (customers): their agents and sources are kept apart.
    #[command(subcommand)]
    Tenant(TenantAdmin),
    /// Registered agents.
    #[command(subcommand)]
    Agent(AgentAdmin),
    /// Integration sources (Armis, NetBox, Faker) of a tenant, run by one of
    /// its agents.
    #[command(subcommand)]
    Source(Box<SourceAdmin>),
    /// Canonical devices of a tenant (DIRE): one per real device, with the
    /// identifiers that name it; merges can be undone.
    #[command(subcommand)]
    Devices(DeviceAdmin),
    /// "Add Edge Agent": write an onboarding bundle (agent.json + certs/)
    /// for an agent of a tenant. Unpack it next to the agent binary and run
    /// `serviceradar-agent --config agent.json`.
    #[command(
        after_help = "The tenant's own CA is created on first use, signed by the onboarding CA \
                      (`onboarding.ca_cert_file`, default `tls.ca_file`; key `onboarding.ca_key_file`), \
                      and kept in the database with its key sealed. The bundle holds:\n  \
                      agent.json               the bootstrap file (wire.md §3)\n  \
                      certs/component.pem      the agent's certificate (CN <agent>.<partition>.<tenant>.serviceradar) and the tenant CA\n  \
                      certs/component-key.pem  its private key (mode 0600)\n  \
                      certs/ca-chain.pem       the gateway's trust root (`tls.ca_file`)"
    )]
    OnboardAgent(OnboardArgs),
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum TenantAdmin {
    /// Adds a tenant. Reserved slugs (the platform tenant's and
    /// `serviceradar-operator`) and the nil UUID are refused.
    Add {
        /// Lower-case letters, digits and '-' (it appears in certificate CNs).
        slug: String,
        /// Display name (default: the slug).
        #[arg(long)]
        name: Option<String>,
        /// Tenant UUID (default: random).
        #[arg(long, value_name = "UUID")]
        id: Option<String>,
    },
    /// Every tenant, platform first.
    List,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum AgentAdmin {
    /// Every agent that has said Hello: tenant, partition, version, host,
    /// capabilities, first/last seen, online or offline, sync-capable.
    List {
        /// Only this tenant's agents (slug).
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum SourceAdmin {
    /// Creates a source. The tenant needs a sync-capable agent first
    /// (onboard one and let it connect); `--agent` assigns the source to it,
    /// otherwise it runs nowhere until assigned.
    Add {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Unique within the tenant.
        #[arg(long)]
        name: String,
        #[arg(long = "type", value_name = "armis|netbox|faker")]
        source_type: String,
        #[command(flatten)]
        options: SourceOptions,
        /// Run by this agent of the tenant (must advertise `sync`).
        #[arg(long)]
        agent: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Sources with their assignment and last sync.
    List {
        /// Only this tenant's sources (slug).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One source as JSON; credentials by name only.
    Show {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
    },
    /// Changes a source: only the options given change. `--credential`
    /// sets one credential, `--unset-credential` removes one,
    /// `--credentials-file` replaces them all; `--setting` sets one setting.
    Update {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "type", value_name = "armis|netbox|faker")]
        source_type: Option<String>,
        #[command(flatten)]
        options: SourceOptions,
        /// Remove a credential (repeatable).
        #[arg(long = "unset-credential", value_name = "KEY")]
        unset_credentials: Vec<String>,
        /// Remove a setting (repeatable).
        #[arg(long = "unset-setting", value_name = "KEY")]
        unset_settings: Vec<String>,
        /// Reassign to this agent of the tenant.
        #[arg(long)]
        agent: Option<String>,
        /// Disable it (`source enable` turns it back on).
        #[arg(long)]
        disabled: bool,
    },
    /// Enables a source.
    Enable {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
    },
    /// Disables a source: it is no longer sent to its agent.
    Disable {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
    },
    /// Assigns a source to a sync-capable agent of its tenant, or unassigns it.
    Assign {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
        /// A sync-capable agent of the tenant.
        #[arg(
            long,
            required_unless_present = "unassign",
            conflicts_with = "unassign"
        )]
        agent: Option<String>,
        /// Runs nowhere until assigned again.
        #[arg(long)]
        unassign: bool,
    },
    /// Deletes a source.
    Delete {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Source name or id.
        source: String,
    },
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum DeviceAdmin {
    /// A tenant's canonical devices, by partition and id.
    List {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<String>,
        /// Only devices this source reported (`armis`, `netbox`, `faker`, …).
        #[arg(long)]
        source: Option<String>,
        /// Only the device holding this IP address.
        #[arg(long)]
        ip: Option<String>,
        /// Devices per page (at most 10000).
        #[arg(long, default_value_t = DEFAULT_DEVICE_LIMIT)]
        limit: usize,
        /// Devices to skip.
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Also list devices merged into others.
        #[arg(long)]
        include_merged: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One device as JSON: identifiers, sources, metadata and its merges.
    Show {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Canonical device id (`sr:<uuid>`).
        device: String,
    },
    /// Reverses the latest merge into a device: the merged device comes back
    /// with its identifiers.
    Unmerge {
        /// Tenant slug.
        #[arg(long)]
        tenant: String,
        /// Canonical id of the surviving device (`sr:<uuid>`).
        device: String,
    },
}

/// Source fields shared by `source add` and `source update`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SourceOptions {
    /// API base URL (armis, netbox).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// Partition of the discovered devices (default `default`).
    #[arg(long)]
    partition: Option<String>,
    /// How often the source polls (Go syntax: 5m, 1h).
    #[arg(long, value_name = "DURATION")]
    poll_interval: Option<String>,
    /// How often the source runs (Go syntax: 30m, 1h).
    #[arg(long, value_name = "DURATION")]
    discovery_interval: Option<String>,
    /// Devices per API page (sent as the `page_size` credential).
    #[arg(long)]
    page_size: Option<u32>,
    /// An Armis search (repeatable); on update, replaces all queries.
    #[arg(long = "query", value_name = "LABEL=AQL", value_parser = parse_query)]
    queries: Vec<Query>,
    /// Devices in this network are skipped (repeatable); on update, replaces
    /// the list.
    #[arg(long = "blacklist", value_name = "CIDR")]
    blacklist: Vec<String>,
    /// Another key of the source's config (repeatable); the value is JSON if
    /// it parses as JSON, else a string.
    #[arg(long = "setting", value_name = "KEY=VALUE", value_parser = parse_setting)]
    settings: Vec<Setting>,
    /// A credential (repeatable). Visible in the process list and shell
    /// history: prefer --credentials-file for secrets.
    #[arg(long = "credential", value_name = "KEY=VALUE", value_parser = parse_credential)]
    credentials: Vec<CredentialArg>,
    /// A JSON object of credentials (`-` reads stdin); on update, replaces
    /// all credentials.
    #[arg(long, value_name = "FILE")]
    credentials_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
struct Query(Value);

#[derive(Clone, Debug)]
struct Setting(String, Value);

/// `KEY=VALUE` of a credential; `Debug` shows the key only.
#[derive(Clone)]
struct CredentialArg(String, String);

impl std::fmt::Debug for CredentialArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}=<redacted>", self.0)
    }
}

fn key_value(text: &str, what: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        // Never echo the text: it may be a credential.
        _ => Err(format!("expected {what}")),
    }
}

fn parse_query(text: &str) -> Result<Query, String> {
    let (label, query) = key_value(text, "LABEL=AQL")?;
    Ok(Query(serde_json::json!({"label": label, "query": query})))
}

fn parse_setting(text: &str) -> Result<Setting, String> {
    let (key, value) = key_value(text, "KEY=VALUE")?;
    let value = serde_json::from_str(&value).unwrap_or(Value::String(value));
    Ok(Setting(key, value))
}

fn parse_credential(text: &str) -> Result<CredentialArg, String> {
    let (key, value) = key_value(text, "KEY=VALUE")?;
    Ok(CredentialArg(key, value))
}

#[derive(clap::Args, Debug, Clone)]
pub struct OnboardArgs {
    /// Tenant slug (`tenant add` creates it).
    #[arg(long)]
    tenant: String,
    /// The agent's id (first label of its certificate CN).
    #[arg(long)]
    agent: String,
    /// The agent's partition.
    #[arg(long)]
    partition: String,
    /// Folder to write the bundle into (refused if not empty, unless --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Address the agent dials (default: `onboarding.gateway_addr`, else
    /// `listen`).
    #[arg(long, value_name = "HOST:PORT")]
    gateway_addr: Option<String>,
    /// TLS name the agent expects on the gateway's certificate (default:
    /// `onboarding.server_name`, else the host of the gateway address).
    #[arg(long)]
    server_name: Option<String>,
    /// Overwrite the bundle files in a non-empty folder.
    #[arg(long)]
    force: bool,
}

/// Runs one administration command against the database named in the
/// gateway config.
pub async fn admin(config_path: &Path, command: Admin) -> anyhow::Result<()> {
    let config = GatewayConfig::load(config_path)?;
    let admin = open_admin(&config).await?.with_context(|| {
        format!(
            "{} has no database: nothing to administer (validate-only mode)",
            config_path.display()
        )
    })?;
    match command {
        Admin::Tenant(TenantAdmin::Add { slug, name, id }) => {
            let tenant = admin
                .tenant_add(&slug, name.as_deref(), id.as_deref())
                .await?;
            print_line(&format!(
                "tenant {} added (id {}, name {:?})",
                tenant.slug, tenant.id, tenant.name
            ))
        }
        Admin::Tenant(TenantAdmin::List) => print_tenants(&admin.tenant_list().await?),
        Admin::Agent(AgentAdmin::List { tenant }) => {
            print_agents(&admin.agent_list(tenant.as_deref()).await?)
        }
        Admin::Source(command) => source(&admin, *command).await,
        Admin::Devices(command) => devices(&admin, command).await,
        Admin::OnboardAgent(args) => onboard(&admin, &config, args).await,
    }
}

async fn source(admin: &super::admin::Admin, command: SourceAdmin) -> anyhow::Result<()> {
    match command {
        SourceAdmin::Add {
            tenant,
            name,
            source_type,
            options,
            agent,
            disabled,
        } => {
            let mut credentials = match &options.credentials_file {
                Some(file) => read_credentials(file)?,
                None => Credentials::default(),
            };
            credentials.0.extend(
                options
                    .credentials
                    .iter()
                    .map(|CredentialArg(k, v)| (k.clone(), v.clone())),
            );
            let spec = SourceSpec {
                name,
                source_type,
                endpoint: options.endpoint,
                enabled: Some(!disabled),
                agent_id: agent,
                partition: options.partition,
                poll_interval: options.poll_interval,
                discovery_interval: options.discovery_interval,
                page_size: options.page_size,
                queries: options.queries.into_iter().map(|q| q.0).collect(),
                network_blacklist: options.blacklist,
                settings: options.settings.into_iter().map(|s| (s.0, s.1)).collect(),
                credentials,
            };
            let view = admin.source_add(&tenant, spec).await?;
            print_line(&format!(
                "source {:?} added to tenant {} (id {}, {}, {})",
                view.source.name,
                view.tenant_slug,
                view.source.id,
                view.source.source_type,
                assignment(&view)
            ))
        }
        SourceAdmin::List { tenant } => print_sources(&admin.source_list(tenant.as_deref()).await?),
        SourceAdmin::Show { tenant, source } => {
            let view = admin.source_show(&tenant, &source).await?;
            print_line(&serde_json::to_string_pretty(&view)?)
        }
        SourceAdmin::Update {
            tenant,
            source,
            name,
            source_type,
            options,
            unset_credentials,
            unset_settings,
            agent,
            disabled,
        } => {
            let settings = if options.settings.is_empty() && unset_settings.is_empty() {
                None
            } else {
                // Settings are one object in the store: merge into it.
                let mut current = admin.source_show(&tenant, &source).await?.source.settings;
                current.extend(options.settings.into_iter().map(|s| (s.0, s.1)));
                for key in &unset_settings {
                    current.remove(key);
                }
                Some(current)
            };
            let patch = SourcePatch {
                name,
                source_type,
                endpoint: options.endpoint,
                enabled: disabled.then_some(false),
                partition: options.partition,
                poll_interval: options.poll_interval,
                discovery_interval: options.discovery_interval,
                page_size: options.page_size,
                queries: non_empty(options.queries.into_iter().map(|q| q.0).collect()),
                network_blacklist: non_empty(options.blacklist),
                settings,
                credentials: options
                    .credentials_file
                    .as_deref()
                    .map(read_credentials)
                    .transpose()?,
                credentials_set: Credentials(
                    options
                        .credentials
                        .into_iter()
                        .map(|CredentialArg(k, v)| (k, v))
                        .collect(),
                ),
                credentials_unset: unset_credentials,
            };
            let changes_config = patch_changes_anything(&patch);
            if !changes_config && agent.is_none() {
                anyhow::bail!("nothing to update: give at least one option (see --help)");
            }
            let mut view = if changes_config {
                admin.source_update(&tenant, &source, patch).await?
            } else {
                admin.source_show(&tenant, &source).await?
            };
            if let Some(agent) = agent {
                view = admin
                    .source_assign(&tenant, &view.source.id, Some(&agent))
                    .await?;
            }
            print_line(&format!(
                "source {:?} of tenant {} updated ({})",
                view.source.name,
                view.tenant_slug,
                assignment(&view)
            ))
        }
        SourceAdmin::Enable { tenant, source } => {
            let view = admin.source_set_enabled(&tenant, &source, true).await?;
            print_line(&format!(
                "source {:?} of tenant {} enabled",
                view.source.name, view.tenant_slug
            ))
        }
        SourceAdmin::Disable { tenant, source } => {
            let view = admin.source_set_enabled(&tenant, &source, false).await?;
            print_line(&format!(
                "source {:?} of tenant {} disabled",
                view.source.name, view.tenant_slug
            ))
        }
        SourceAdmin::Assign {
            tenant,
            source,
            agent,
            unassign,
        } => {
            let agent = if unassign { None } else { agent };
            let view = admin
                .source_assign(&tenant, &source, agent.as_deref())
                .await?;
            print_line(&format!(
                "source {:?} of tenant {} {}",
                view.source.name,
                view.tenant_slug,
                assignment(&view)
            ))
        }
        SourceAdmin::Delete { tenant, source } => {
            let view = admin.source_show(&tenant, &source).await?;
            admin.source_delete(&tenant, &view.source.id).await?;
            print_line(&format!(
                "source {:?} deleted from tenant {}",
                view.source.name, view.tenant_slug
            ))
        }
    }
}

async fn devices(admin: &super::admin::Admin, command: DeviceAdmin) -> anyhow::Result<()> {
    match command {
        DeviceAdmin::List {
            tenant,
            partition,
            source,
            ip,
            limit,
            offset,
            include_merged,
            json,
        } => {
            let query = DeviceQuery {
                tenant,
                partition,
                source,
                ip,
                include_merged,
                limit: Some(limit),
                offset,
            };
            let devices = admin.devices(&query).await?;
            if json {
                print_line(&serde_json::to_string_pretty(&devices)?)
            } else {
                print_devices(&devices)
            }
        }
        DeviceAdmin::Show { tenant, device } => {
            let detail = admin.device(&tenant, &device).await?;
            print_line(&serde_json::to_string_pretty(&detail)?)
        }
        DeviceAdmin::Unmerge { tenant, device } => {
            let undone = admin.device_unmerge(&tenant, &device).await?;
            print_lines(unmerge_lines(&undone))
        }
    }
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

fn patch_changes_anything(p: &SourcePatch) -> bool {
    p.name.is_some()
        || p.source_type.is_some()
        || p.endpoint.is_some()
        || p.enabled.is_some()
        || p.partition.is_some()
        || p.poll_interval.is_some()
        || p.discovery_interval.is_some()
        || p.page_size.is_some()
        || p.queries.is_some()
        || p.network_blacklist.is_some()
        || p.settings.is_some()
        || p.credentials.is_some()
        || !p.credentials_set.0.is_empty()
        || !p.credentials_unset.is_empty()
}

fn assignment(view: &SourceView) -> String {
    match &view.source.agent_id {
        Some(agent) => format!("assigned to agent {agent}"),
        None => "unassigned: runs nowhere until assigned".to_owned(),
    }
}

/// A JSON object of credentials from a file, or stdin for `-`. Errors name
/// the file, never its contents.
fn read_credentials(file: &Path) -> anyhow::Result<Credentials> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading credentials from stdin")?;
        text
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read credentials file {}", file.display()))?
    };
    let value: Map<String, Value> = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "credentials file {}: expected a JSON object of strings (line {}, column {})",
            file.display(),
            e.line(),
            e.column()
        )
    })?;
    serde_json::from_value(Value::Object(value))
        .map_err(|e| anyhow::anyhow!("credentials file {}: {e}", file.display()))
}

async fn onboard(
    admin: &super::admin::Admin,
    config: &GatewayConfig,
    args: OnboardArgs,
) -> anyhow::Result<()> {
    // Refuse a bad target before a certificate (or a tenant CA) is issued.
    if !args.force && std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(onboarding::WriteBundleError::NotEmpty(args.out.clone()).into());
    }
    let request = OnboardRequest {
        tenant: args.tenant,
        agent_id: args.agent,
        partition: args.partition,
        gateway_addr: args.gateway_addr,
        server_name: args.server_name,
    };
    let bundle = admin
        .onboard_agent(request, &OnboardingSettings::from_config(config))
        .await?;
    let written = onboarding::write_bundle(&bundle, &args.out, args.force)?;
    print_onboarding(&bundle, &args.out, &written)
}

fn print_onboarding(
    bundle: &OnboardingBundle,
    out: &Path,
    written: &[PathBuf],
) -> anyhow::Result<()> {
    let ca_note = if bundle.tenant_ca_created {
        "created now"
    } else {
        "existing"
    };
    let mut lines = vec![
        format!(
            "agent {} of tenant {} onboarded (partition {})",
            bundle.agent_id, bundle.tenant_slug, bundle.partition
        ),
        format!("  certificate CN  {}", bundle.common_name),
        format!("  issued by       {} ({ca_note})", bundle.tenant_ca),
        format!(
            "  gateway         {} (server name {})",
            bundle.gateway_addr, bundle.server_name
        ),
    ];
    for (i, path) in written.iter().enumerate() {
        let label = if i == 0 { "  files" } else { "" };
        lines.push(format!("{label:<18}{}", path.display()));
    }
    if bundle.replaces_registered_agent {
        lines.push(format!(
            "note: agent {} was already registered in tenant {}; this is a new certificate for it \
             (the previous one stays valid)",
            bundle.agent_id, bundle.tenant_slug
        ));
    }
    for warning in &bundle.warnings {
        lines.push(format!("warning: {warning}"));
    }
    lines.push(format!(
        "start it with: serviceradar-agent --config {}",
        out.join(onboarding::AGENT_JSON).display()
    ));
    for line in lines {
        print_line(&line)?;
    }
    Ok(())
}

fn time(secs: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Left-aligned columns as wide as their widest cell; the last one unpadded.
fn table<const N: usize>(header: [&str; N], rows: Vec<[String; N]>) -> Vec<String> {
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(header)];
    for row in &rows {
        lines.push(line(row.each_ref().map(String::as_str)));
    }
    lines
}

fn print_lines(lines: Vec<String>) -> anyhow::Result<()> {
    for line in lines {
        print_line(&line)?;
    }
    Ok(())
}

fn print_tenants(tenants: &[Tenant]) -> anyhow::Result<()> {
    let rows = tenants
        .iter()
        .map(|t| {
            [
                t.slug.clone(),
                t.name.clone(),
                t.id.clone(),
                if t.platform { "platform" } else { "tenant" }.to_owned(),
                if t.ca_bound { "bound" } else { "-" }.to_owned(),
                time(t.created_at),
            ]
        })
        .collect();
    print_lines(table(["SLUG", "NAME", "ID", "KIND", "CA", "CREATED"], rows))
}

fn print_agents(agents: &[AgentView]) -> anyhow::Result<()> {
    let rows = agents
        .iter()
        .map(|v| {
            let a = &v.agent;
            [
                v.tenant_slug.clone(),
                a.agent_id.clone(),
                a.partition.clone(),
                a.version.clone(),
                a.hostname.clone(),
                a.capabilities.join(","),
                time(a.first_seen),
                time(a.last_seen),
                if v.online { "online" } else { "offline" }.to_owned(),
                if v.sync_capable { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    print_lines(table(
        [
            "TENANT",
            "AGENT",
            "PARTITION",
            "VERSION",
            "HOST",
            "CAPABILITIES",
            "FIRST SEEN",
            "LAST SEEN",
            "STATUS",
            "SYNC",
        ],
        rows,
    ))
}

fn print_sources(sources: &[SourceView]) -> anyhow::Result<()> {
    let rows = sources
        .iter()
        .map(|v| {
            let s = &v.source;
            [
                v.tenant_slug.clone(),
                s.name.clone(),
                s.source_type.clone(),
                if s.enabled { "yes" } else { "no" }.to_owned(),
                s.agent_id.clone().unwrap_or_else(|| "-".to_owned()),
                s.partition.clone(),
                v.sync_state.clone(),
                s.status
                    .last_sync_at
                    .map(time)
                    .unwrap_or_else(|| "-".to_owned()),
                s.status
                    .last_device_count
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".to_owned()),
                s.status.consecutive_failures.to_string(),
            ]
        })
        .collect();
    print_lines(table(
        [
            "TENANT",
            "NAME",
            "TYPE",
            "ENABLED",
            "AGENT",
            "PARTITION",
            "STATUS",
            "LAST-SYNC",
            "DEVICES",
            "FAILURES",
        ],
        rows,
    ))
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

fn identifiers(view: &DeviceView) -> String {
    let d = &view.device;
    match &d.merged_into {
        Some(survivor) => format!("merged into {survivor}"),
        None if d.identifiers.is_empty() => "-".to_owned(),
        None => d
            .identifiers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn print_devices(devices: &[DeviceView]) -> anyhow::Result<()> {
    let rows = devices
        .iter()
        .map(|v| {
            let d = &v.device;
            [
                d.id.clone(),
                d.partition.clone(),
                or_dash(d.ip.as_deref()),
                or_dash(d.mac.as_deref()),
                or_dash(d.hostname.as_deref()),
                d.sources.join(","),
                identifiers(v),
                time(d.last_seen),
            ]
        })
        .collect();
    print_lines(table(
        [
            "ID",
            "PARTITION",
            "IP",
            "MAC",
            "HOSTNAME",
            "SOURCES",
            "IDENTIFIERS",
            "LAST-SEEN",
        ],
        rows,
    ))
}

fn unmerge_lines(u: &UnmergeView) -> Vec<String> {
    let m = &u.undone.merge;
    let device = |role: &str, v: &DeviceView| {
        format!(
            "  {role:<9} {}  ip {}  sources {}  identifiers {}",
            v.device.id,
            or_dash(v.device.ip.as_deref()),
            v.device.sources.join(","),
            identifiers(v)
        )
    };
    vec![
        format!(
            "merge {} of tenant {} undone: {} split from {} (merged {}: {})",
            m.id,
            u.undone.tenant_slug,
            m.from_device,
            m.into_device,
            time(m.merged_at),
            m.reason
        ),
        format!(
            "  gave back {}",
            m.identifiers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        device("restored", &u.restored),
        device("survivor", &u.survivor),
    ]
}

/// Starts the gateway from a config file. Prints exactly one
/// `gateway listening on <addr>` line once ready, then
/// `agent enrolled tenant=<slug> agent=<id> partition=<p>` per Hello and
/// `run complete agent=<id> run=<run_id> devices=<n>` per completed run.
pub async fn run_from_file(path: &Path) -> anyhow::Result<()> {
    let config = GatewayConfig::load(path)?;
    let handle = start(config)
        .await
        .with_context(|| format!("starting gateway from {}", path.display()))?;
    let mut events = handle.subscribe();
    print_line(&format!("gateway listening on {}", handle.local_addr()))?;

    let stop = crate::agent::wait_for_termination();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Ok(GatewayEvent::Hello { tenant, agent_id, partition, .. }) => {
                    print_line(&format!("agent enrolled tenant={tenant} agent={agent_id} partition={partition}"))?;
                }
                Ok(GatewayEvent::RunComplete { agent_id, run_id, devices, .. }) => {
                    print_line(&format!("run complete agent={agent_id} run={run_id} devices={devices}"))?;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event printer fell behind; some lines were skipped");
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
    tracing::info!("gateway shutting down");
    handle.shutdown().await;
    tracing::info!("gateway stopped");
    Ok(())
}

fn print_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_arguments_never_echo_their_text() {
        let err = parse_credential("hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        let c = parse_credential("api_secret=a=b").unwrap();
        assert_eq!((c.0.as_str(), c.1.as_str()), ("api_secret", "a=b"));
        assert_eq!(format!("{c:?}"), "api_secret=<redacted>");
        let s = parse_setting("insecure_skip_verify=true").unwrap();
        assert_eq!(s.1, Value::Bool(true));
        let s = parse_setting("prefix=armis/").unwrap();
        assert_eq!(s.1, Value::String("armis/".into()));
        let q = parse_query("Corp=in:devices name=x").unwrap();
        assert_eq!(q.0["label"], "Corp");
        assert_eq!(q.0["query"], "in:devices name=x");
    }

    #[test]
    fn tables_fit_their_widest_cell() {
        let lines = table(
            ["A", "BB", "C"],
            vec![["long".into(), "x".into(), "last".into()]],
        );
        assert_eq!(lines, vec!["A     BB  C", "long  x   last"]);
    }
}
