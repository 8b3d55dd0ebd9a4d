//! "Add Edge Agent": an onboarding bundle for one agent of a tenant
//! (gateway.md §1, wire.md §3).
//!
//! A bundle is what an operator copies next to the agent binary:
//!
//! ```text
//! agent.json              the minimal bootstrap file (wire.md §3), cert_dir "certs"
//! certs/component.pem     leaf (CN <agent>.<partition>.<tenant>.serviceradar) + tenant CA
//! certs/component-key.pem the leaf's private key (0600 when written)
//! certs/ca-chain.pem      the gateway's trust root (`tls.ca_file`)
//! ```
//!
//! Each tenant gets its own intermediate CA the first time one of its agents
//! is onboarded, signed by the onboarding CA (`onboarding.ca_cert_file`,
//! default `tls.ca_file`, key `onboarding.ca_key_file`). Its key is sealed
//! with the credentials key and kept in the database, so later onboardings
//! (from the CLI or the HTTP API) issue from the same CA. Once a tenant is
//! bound to a CA the gateway accepts certificates naming that tenant only if
//! they chain through it; that is why the agent presents the tenant CA after
//! its leaf.
//!
//! [`Admin::onboard_agent`] only computes: it returns the files as strings
//! (the HTTP API can hand them out as they are); [`write_bundle`] puts them
//! on disk for the CLI.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

use super::{Admin, AdminError};
use crate::config::bootstrap::Bootstrap;
use crate::gateway::config::GatewayConfig;
use crate::gateway::identity::{valid_component_id, valid_partition};
use crate::gateway::store::TenantRow;
use crate::pki::DevCa;

/// File names inside a bundle (wire.md §3 example names).
pub const AGENT_JSON: &str = "agent.json";
pub const CERT_DIR: &str = "certs";
pub const CERT_FILE: &str = "component.pem";
pub const KEY_FILE: &str = "component-key.pem";
pub const CA_FILE: &str = "ca-chain.pem";

/// Who to onboard, and optionally how the agent reaches the gateway.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardRequest {
    /// Tenant slug.
    pub tenant: String,
    pub agent_id: String,
    #[serde(default = "default_partition")]
    pub partition: String,
    /// `host:port` the agent dials; default `onboarding.gateway_addr`, else
    /// the gateway's `listen` address.
    #[serde(default)]
    pub gateway_addr: Option<String>,
    /// TLS server name the agent checks; default `onboarding.server_name`,
    /// else the host of the gateway address.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_partition() -> String {
    "default".to_owned()
}

/// The gateway config's parts onboarding needs.
#[derive(Clone, Debug)]
pub struct OnboardingSettings {
    /// The CA that signs tenant CAs (`onboarding.ca_cert_file`, default
    /// `tls.ca_file`).
    pub ca_cert_file: PathBuf,
    /// Its private key (`onboarding.ca_key_file`); needed only to create a
    /// tenant's CA.
    pub ca_key_file: Option<PathBuf>,
    /// The gateway's trust root (`tls.ca_file`): what agents verify the
    /// gateway against, and what the gateway verifies agents against.
    pub trust_file: PathBuf,
    /// The gateway's server certificate (`tls.cert_file`), to warn when it
    /// does not match the server name written into the bundle.
    pub server_cert_file: Option<PathBuf>,
    /// `onboarding.gateway_addr`.
    pub gateway_addr: Option<String>,
    /// `listen`, the last resort for the address agents dial.
    pub listen: String,
    /// `onboarding.server_name`.
    pub server_name: Option<String>,
}

impl OnboardingSettings {
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            ca_cert_file: config
                .onboarding
                .ca_cert_file
                .clone()
                .unwrap_or_else(|| config.tls.ca_file.clone()),
            ca_key_file: config.onboarding.ca_key_file.clone(),
            trust_file: config.tls.ca_file.clone(),
            server_cert_file: Some(config.tls.cert_file.clone()),
            gateway_addr: config.onboarding.gateway_addr.clone(),
            listen: config.listen.clone(),
            server_name: config.onboarding.server_name.clone(),
        }
    }
}

/// One file of a bundle, by its path relative to the bundle's folder.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct BundleFile {
    pub path: String,
    pub contents: String,
    /// A private key: written with mode 0600, never printed.
    pub secret: bool,
}

impl fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("BundleFile");
        s.field("path", &self.path).field("secret", &self.secret);
        if self.secret {
            s.field("contents", &"<redacted>");
        } else {
            s.field("contents", &self.contents);
        }
        s.finish()
    }
}

/// An onboarding bundle and what it says.
#[derive(Clone, Debug, Serialize)]
pub struct OnboardingBundle {
    pub tenant_slug: String,
    pub tenant_id: String,
    pub agent_id: String,
    pub partition: String,
    /// CN of the agent's certificate.
    pub common_name: String,
    /// CN of the tenant CA that issued it.
    pub tenant_ca: String,
    /// The tenant CA was created by this onboarding.
    pub tenant_ca_created: bool,
    pub gateway_addr: String,
    pub server_name: String,
    /// An agent with this id was already registered in the tenant: this
    /// bundle is a new certificate for it (its old one stays valid).
    pub replaces_registered_agent: bool,
    /// Things that will probably stop the agent from connecting.
    pub warnings: Vec<String>,
    pub files: Vec<BundleFile>,
}

impl OnboardingBundle {
    pub fn file(&self, path: &str) -> Option<&BundleFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// `agent.json` in exactly the wire.md §3 shape; fields in that order.
#[derive(Serialize)]
struct AgentJson<'a> {
    agent_id: &'a str,
    partition: &'a str,
    gateway_addr: &'a str,
    gateway_security: SecurityJson<'a>,
}

#[derive(Serialize)]
struct SecurityJson<'a> {
    mode: &'a str,
    cert_dir: &'a str,
    server_name: &'a str,
    role: &'a str,
    tls: TlsJson<'a>,
}

#[derive(Serialize)]
struct TlsJson<'a> {
    cert_file: &'a str,
    key_file: &'a str,
    ca_file: &'a str,
}

impl Admin {
    /// Issues an onboarding bundle for agent `request.agent_id` of tenant
    /// `request.tenant`, creating the tenant's CA on first use. Writes
    /// nothing to disk.
    pub async fn onboard_agent(
        &self,
        request: OnboardRequest,
        settings: &OnboardingSettings,
    ) -> Result<OnboardingBundle, AdminError> {
        let agent_id = request.agent_id.trim();
        let partition = request.partition.trim();
        check_name("agent id", agent_id, valid_component_id(agent_id))?;
        check_name("partition", partition, valid_partition(partition))?;
        let tenant = self.tenant(&request.tenant).await?;
        if tenant.platform {
            return Err(AdminError::Forbidden(format!(
                "tenant {:?} is the platform tenant: edge agents belong to a customer tenant \
                 (platform services use SPIFFE identities, and sync never runs in the platform tenant)",
                tenant.slug
            )));
        }
        let (gateway_addr, host) = gateway_addr(&request, settings)?;
        let server_name = request
            .server_name
            .as_deref()
            .or(settings.server_name.as_deref())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(&host)
            .to_owned();
        ServerName::try_from(server_name.clone()).map_err(|e| {
            AdminError::Invalid(format!(
                "server name {server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let row = self
            .store
            .tenant_by_slug(&tenant.slug)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("tenant {:?} vanished", tenant.slug)))?;
        let trust_pem = read_text(&settings.trust_file, "tls.ca_file")?;
        let (ca, tenant_ca_created) = self.tenant_ca(&row, settings).await?;

        let (leaf_pem, key_pem) = ca
            .issue_tenant_agent(agent_id, partition, &row.slug)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        let common_name = format!("{agent_id}.{partition}.{}.serviceradar", row.slug);
        // The gateway validates the client chain against its trust root; if
        // the onboarding CA is itself an intermediate below that root, the
        // agent must present it too.
        let extra = chain_extras(&leaf_pem, ca.cert_pem(), &trust_pem, settings)?;
        let mut chain_pem = format!("{leaf_pem}{}", ca.cert_pem());
        for pem in &extra {
            chain_pem.push_str(pem);
        }

        let agent_json = serde_json::to_string_pretty(&AgentJson {
            agent_id,
            partition,
            gateway_addr: &gateway_addr,
            gateway_security: SecurityJson {
                mode: "mtls",
                cert_dir: CERT_DIR,
                server_name: &server_name,
                role: "agent",
                tls: TlsJson {
                    cert_file: CERT_FILE,
                    key_file: KEY_FILE,
                    ca_file: CA_FILE,
                },
            },
        })
        .map_err(|e| AdminError::Internal(format!("rendering agent.json: {e}")))?
            + "\n";
        // The bundle must load as the agent will load it (relative cert_dir
        // against agent.json's folder); a refusal here is a bug, not the
        // operator's problem, but better caught before it is handed out.
        Bootstrap::parse(&agent_json, Path::new("/bundle")).map_err(|e| {
            AdminError::Internal(format!("the generated agent.json does not load: {e}"))
        })?;

        let mut warnings = Vec::new();
        if let Some(file) = &settings.server_cert_file {
            if let Some(warning) = server_name_warning(file, &trust_pem, &server_name) {
                warnings.push(warning);
            }
        }
        let replaces_registered_agent = self
            .store
            .agents()
            .await?
            .iter()
            .any(|a| a.tenant == row.id && a.agent_id == agent_id);
        tracing::info!(tenant = %row.slug, agent = %agent_id, partition = %partition,
            cn = %common_name, tenant_ca_created, "onboarding bundle issued");

        Ok(OnboardingBundle {
            tenant_slug: row.slug.clone(),
            tenant_id: row.id.clone(),
            agent_id: agent_id.to_owned(),
            partition: partition.to_owned(),
            common_name,
            tenant_ca: tenant_ca_name(&row),
            tenant_ca_created,
            gateway_addr,
            server_name,
            replaces_registered_agent,
            warnings,
            files: vec![
                BundleFile {
                    path: AGENT_JSON.to_owned(),
                    contents: agent_json,
                    secret: false,
                },
                BundleFile {
                    path: format!("{CERT_DIR}/{CERT_FILE}"),
                    contents: chain_pem,
                    secret: false,
                },
                BundleFile {
                    path: format!("{CERT_DIR}/{KEY_FILE}"),
                    contents: key_pem,
                    secret: true,
                },
                BundleFile {
                    path: format!("{CERT_DIR}/{CA_FILE}"),
                    contents: trust_pem,
                    secret: false,
                },
            ],
        })
    }

    /// The tenant's CA: the bound one, or a new intermediate from the
    /// onboarding CA, bound now. Returns whether it was created.
    async fn tenant_ca(
        &self,
        row: &TenantRow,
        settings: &OnboardingSettings,
    ) -> Result<(DevCa, bool), AdminError> {
        if let Some(ca) = self.open_tenant_ca(row)? {
            return Ok((ca, false));
        }
        let key_file = settings.ca_key_file.as_ref().ok_or_else(|| {
            AdminError::Internal(format!(
                "tenant {:?} has no CA yet and creating one needs the onboarding CA's private key: \
                 set `onboarding.ca_key_file` in the gateway config (and `onboarding.ca_cert_file` \
                 when that CA is not the one in `tls.ca_file`)",
                row.slug
            ))
        })?;
        let onboarding_ca = DevCa::load(&settings.ca_cert_file, key_file).map_err(|e| {
            AdminError::Internal(format!(
                "onboarding CA (`onboarding.ca_cert_file` / `onboarding.ca_key_file`): {e}"
            ))
        })?;
        let ca = onboarding_ca
            .issue_intermediate(&tenant_ca_name(row))
            .map_err(|e| {
                AdminError::Internal(format!("creating tenant {:?}'s CA: {e}", row.slug))
            })?;
        // Bound to the tenant's id: a sealed key copied onto another tenant
        // does not open.
        let sealed = self.key.seal(ca.key_pem().as_bytes(), row.id.as_bytes())?;
        let stored = self
            .store
            .bind_tenant_ca(&row.id, ca.cert_pem().to_owned(), sealed)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("tenant {:?} vanished", row.slug)))?;
        if stored.ca_cert_pem.as_deref() == Some(ca.cert_pem()) {
            self.changed();
            tracing::info!(tenant = %row.slug, ca = %tenant_ca_name(row), "tenant CA created");
            return Ok((ca, true));
        }
        // Another onboarding bound one first: use it, drop ours.
        let ca = self.open_tenant_ca(&stored)?.ok_or_else(|| {
            AdminError::Internal(format!("tenant {:?}: its CA binding disappeared", row.slug))
        })?;
        Ok((ca, false))
    }

    fn open_tenant_ca(&self, row: &TenantRow) -> Result<Option<DevCa>, AdminError> {
        let (cert_pem, sealed) = match (&row.ca_cert_pem, &row.ca_key_sealed) {
            (None, _) => return Ok(None),
            (Some(cert), Some(sealed)) => (cert, sealed),
            (Some(_), None) => {
                return Err(AdminError::Conflict(format!(
                    "tenant {:?} is bound to a CA whose private key this gateway does not hold; \
                     its agents are onboarded wherever that key is",
                    row.slug
                )))
            }
        };
        let key = self.key.open(sealed, row.id.as_bytes()).map_err(|e| {
            AdminError::Internal(format!(
                "tenant {:?}: its CA key does not open: {e}",
                row.slug
            ))
        })?;
        let key_pem = String::from_utf8(key).map_err(|_| {
            AdminError::Internal(format!("tenant {:?}: its CA key is not PEM text", row.slug))
        })?;
        DevCa::from_pem(cert_pem, &key_pem).map(Some).map_err(|e| {
            AdminError::Internal(format!("tenant {:?}: its CA is unusable: {e}", row.slug))
        })
    }
}

/// "ServiceRadar tenant acme CA 1b4e28ba": the tenant id in the name keeps
/// the CAs of a deleted and re-created slug apart.
fn tenant_ca_name(row: &TenantRow) -> String {
    let short: String = row.id.chars().filter(|c| *c != '-').take(8).collect();
    format!("ServiceRadar tenant {} CA {short}", row.slug)
}

fn check_name(what: &str, value: &str, valid: bool) -> Result<(), AdminError> {
    // Both end up as labels of the certificate CN.
    if valid && !value.contains('/') && !value.chars().any(char::is_whitespace) {
        return Ok(());
    }
    Err(AdminError::Invalid(format!(
        "{what} {value:?}: must be non-empty, without dots, slashes, spaces or control characters \
         (it becomes a label of the certificate CN)"
    )))
}

/// The address agents dial and its host: the request's, else
/// `onboarding.gateway_addr`, else `listen` (unless that is a wildcard or
/// port 0, which no agent can dial).
fn gateway_addr(
    request: &OnboardRequest,
    settings: &OnboardingSettings,
) -> Result<(String, String), AdminError> {
    let given = request
        .gateway_addr
        .as_deref()
        .map(|a| (a, "the gateway address"))
        .or(settings
            .gateway_addr
            .as_deref()
            .map(|a| (a, "`onboarding.gateway_addr`")));
    let (addr, origin) = given.unwrap_or((settings.listen.as_str(), "`listen`"));
    let addr = addr.trim();
    let (host, port) = split_host_port(addr).ok_or_else(|| {
        AdminError::Invalid(format!(
            "{origin} {addr:?} is not host:port (IPv6 as [addr]:port)"
        ))
    })?;
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    if unspecified || port == 0 {
        return Err(AdminError::Invalid(format!(
            "{origin} {addr:?} is not an address agents can dial: give the address agents should use \
             (`--gateway-addr host:port`, or `onboarding.gateway_addr` in the gateway config)"
        )));
    }
    Ok((addr.to_owned(), host.to_owned()))
}

fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = match addr.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => {
            let (host, port) = addr.rsplit_once(':')?;
            if host.contains(':') {
                return None;
            }
            (host, port)
        }
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    Some((host, port.parse().ok()?))
}

fn read_text(path: &Path, field: &str) -> Result<String, AdminError> {
    std::fs::read_to_string(path)
        .map_err(|e| AdminError::Internal(format!("cannot read `{field}` {}: {e}", path.display())))
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// What the agent must present after leaf and tenant CA for the gateway's
/// trust root to accept it: nothing when the onboarding CA is in
/// `tls.ca_file`, the onboarding CA's certificates when it chains to it.
fn chain_extras(
    leaf_pem: &str,
    tenant_ca_pem: &str,
    trust_pem: &str,
    settings: &OnboardingSettings,
) -> Result<Vec<String>, AdminError> {
    let leaf = certs(leaf_pem);
    let leaf = leaf
        .first()
        .ok_or_else(|| AdminError::Internal("issued certificate does not parse".into()))?;
    let roots = certs(trust_pem);
    let mut intermediates = certs(tenant_ca_pem);
    if verify_client(leaf, &intermediates, &roots).is_ok() {
        return Ok(Vec::new());
    }
    let onboarding_pem = if settings.ca_cert_file == settings.trust_file {
        None
    } else {
        std::fs::read_to_string(&settings.ca_cert_file).ok()
    };
    if let Some(pem) = &onboarding_pem {
        intermediates.extend(certs(pem));
        if verify_client(leaf, &intermediates, &roots).is_ok() {
            return Ok(vec![pem.clone()]);
        }
    }
    let reason = verify_client(leaf, &intermediates, &roots)
        .err()
        .unwrap_or_default();
    Err(AdminError::Internal(format!(
        "the onboarding CA ({}) does not chain to the gateway's trust root `tls.ca_file` ({}): \
         the gateway would refuse agents onboarded with it ({reason})",
        settings.ca_cert_file.display(),
        settings.trust_file.display()
    )))
}

fn verify_client(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    crate::gateway::tenancy::verify_client_chain(leaf, intermediates, roots)
}

/// A warning when the gateway's own certificate would not pass the agent's
/// checks for `server_name` against the bundle's trust root.
fn server_name_warning(cert_file: &Path, trust_pem: &str, server_name: &str) -> Option<String> {
    let text = std::fs::read_to_string(cert_file).ok()?;
    let chain = certs(&text);
    let (leaf, intermediates) = chain.split_first()?;
    let roots = certs(trust_pem);
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    let name = ServerName::try_from(server_name).ok()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let verdict = cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map(|_| ())
        .and_then(|()| cert.verify_is_valid_for_subject_name(&name));
    verdict.err().map(|e| {
        format!(
            "the gateway's certificate ({}) does not verify for server name {server_name:?} against \
             `tls.ca_file` ({e}): the agent will refuse to connect; pass the name in the gateway's \
             certificate (`--server-name`) or reissue it",
            cert_file.display()
        )
    })
}

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteBundleError {
    #[error(
        "{0} exists and is not empty: choose another folder, or pass --force to overwrite the bundle files in it"
    )]
    NotEmpty(PathBuf),
    #[error("{path} exists and is not a folder")]
    NotADirectory { path: PathBuf },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Writes a bundle into `dir` (created if missing). An existing non-empty
/// folder is refused unless `force`, which overwrites the bundle's files
/// and leaves others alone. Private keys get mode 0600. Returns the paths
/// written.
pub fn write_bundle(
    bundle: &OnboardingBundle,
    dir: &Path,
    force: bool,
) -> Result<Vec<PathBuf>, WriteBundleError> {
    let write_err = |path: &Path, e: &dyn fmt::Display| WriteBundleError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(WriteBundleError::NotEmpty(dir.to_owned()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(_) if dir.exists() => {
            return Err(WriteBundleError::NotADirectory {
                path: dir.to_owned(),
            })
        }
        Err(e) => return Err(write_err(dir, &e)),
    }
    let mut written = Vec::new();
    for file in &bundle.files {
        let path = dir.join(&file.path);
        crate::pki::write_file(&path, &file.contents, file.secret)
            .map_err(|e| write_err(&path, &e))?;
        // The mode given at creation does not apply to an overwritten file.
        #[cfg(unix)]
        if file.secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| write_err(&path, &e))?;
        }
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(listen: &str, configured: Option<&str>) -> OnboardingSettings {
        OnboardingSettings {
            ca_cert_file: PathBuf::from("ca.pem"),
            ca_key_file: None,
            trust_file: PathBuf::from("ca.pem"),
            server_cert_file: None,
            gateway_addr: configured.map(str::to_owned),
            listen: listen.to_owned(),
            server_name: None,
        }
    }

    fn request(addr: Option<&str>) -> OnboardRequest {
        OnboardRequest {
            tenant: "acme".into(),
            agent_id: "edge-1".into(),
            partition: "default".into(),
            gateway_addr: addr.map(str::to_owned),
            server_name: None,
        }
    }

    #[test]
    fn the_gateway_address_comes_from_the_request_the_config_or_listen() {
        let s = settings("0.0.0.0:50052", None);
        let err = gateway_addr(&request(None), &s).unwrap_err().to_string();
        assert!(
            err.contains("--gateway-addr") && err.contains("`listen`"),
            "{err}"
        );
        assert_eq!(
            gateway_addr(&request(Some("gw.example.com:50052")), &s).unwrap(),
            (
                "gw.example.com:50052".to_owned(),
                "gw.example.com".to_owned()
            )
        );
        let s = settings("[::]:50052", Some("[2001:db8::1]:443"));
        assert_eq!(
            gateway_addr(&request(None), &s).unwrap().1,
            "2001:db8::1".to_owned()
        );
        let s = settings("10.0.0.5:50052", None);
        assert_eq!(
            gateway_addr(&request(None), &s).unwrap().0,
            "10.0.0.5:50052"
        );
        for bad in [
            "gw",
            "gw:port",
            "2001:db8::1:50052",
            ":50052",
            "127.0.0.1:0",
        ] {
            assert!(gateway_addr(&request(Some(bad)), &s).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_that_cannot_be_cn_labels_are_refused() {
        for bad in ["", "a.b", "a/b", "a b", "a\n"] {
            assert!(
                check_name("agent id", bad, valid_component_id(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(check_name("agent id", "edge_7-x", true).is_ok());
    }

    #[test]
    fn debug_hides_private_keys() {
        let file = BundleFile {
            path: "certs/component-key.pem".into(),
            contents: "-----BEGIN PRIVATE KEY-----secret".into(),
            secret: true,
        };
        let debug = format!("{file:?}");
        assert!(
            !debug.contains("BEGIN") && debug.contains("<redacted>"),
            "{debug}"
        );
    }
}
