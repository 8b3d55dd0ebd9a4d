//! `serviceradar-agent demo`: the whole system on one machine. Creates a dev
//! PKI, starts a gateway and an agent on loopback mTLS, assigns a Faker source
//! and shows the devices arriving.
//!
//! With `--faker-server` the devices come over HTTP instead: the demo starts
//! the Faker server (the Armis API served from the same generator) in process
//! and assigns an `armis` source pointed at it. With churn on, the demo
//! advances the server to its next run each time a run report arrives, so run
//! N of the agent sees Faker run N, as the in-process `faker` source does.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::config::bootstrap::Bootstrap;
use crate::gateway::{self, AgentSources, GatewayConfig, GatewayEvent};
use crate::sources::faker::server::{FakerServer, FakerServerConfig};
use crate::sources::faker::FakerSettings;
use crate::{agent, pki};

const AGENT_ID: &str = "demo-agent";
const FAKER_SOURCE: &str = "Demo Faker";
const ARMIS_SOURCE: &str = "Demo Armis";
const SYNC_SERVICE_ID: &str = "6d1c2a9e-0000-4000-8000-000000000001";
/// Credentials the demo's Faker server expects: demo values, not secrets.
const FAKER_API_KEY: &str = "demo-api-key";
const FAKER_API_SECRET: &str = "demo-api-secret";
/// Page size the armis source asks for and the Faker server allows.
const FAKER_PAGE: u32 = 5000;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Devices the Faker source generates.
    #[arg(long, default_value_t = 10_000)]
    pub devices: u64,
    /// Keep running: the source runs again every --interval.
    #[arg(long)]
    pub follow: bool,
    /// Interval between runs with --follow.
    #[arg(long, default_value = "1m")]
    pub interval: humantime::Duration,
    /// Percentage of devices whose IPs move between runs.
    #[arg(long, default_value_t = 0.0)]
    pub churn_percent: f64,
    /// Faker seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the demo keeps its PKI, databases and config files (reset at start).
    #[arg(long, default_value = "demo-state")]
    pub state_dir: PathBuf,
    /// Give up if the first run has not arrived after this long.
    #[arg(long, default_value = "5m")]
    pub timeout: humantime::Duration,
    /// Serve the devices from an in-process Faker server (the Armis API on
    /// loopback HTTP) and sync them with an `armis` source instead of the
    /// in-process `faker` source.
    #[arg(long)]
    pub faker_server: bool,
}

/// Runs the demo; returns the process exit code.
pub fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let system = actix_rt::System::new();
    let code = system.block_on(run_in_system(args))?;
    Ok(code)
}

async fn run_in_system(args: DemoArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let state = &args.state_dir;
    reset_state(state)?;

    let layout = pki::create_dev_pki(
        &state.join("certs"),
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        &[(AGENT_ID.to_owned(), "default".to_owned())],
    )?;
    println!("▸ dev PKI written to {}", state.join("certs").display());

    let interval = humantime::format_duration(*args.interval)
        .to_string()
        .replace(' ', "");
    let faker_server = if args.faker_server {
        let server = FakerServer::start(FakerServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            settings: FakerSettings {
                total_devices: args.devices,
                seed: args.seed,
                churn_percent: args.churn_percent,
            },
            max_page: FAKER_PAGE,
            // Churn follows the agent's runs (see `advance_faker`), not a clock.
            churn_interval: None,
            token_ttl: Duration::from_secs(3600),
            api_key: Some(FAKER_API_KEY.to_owned()),
            api_secret: Some(FAKER_API_SECRET.to_owned()),
        })
        .await
        .context("starting the demo Faker server")?;
        Some(Arc::new(server))
    } else {
        None
    };
    let (source_name, source_kind, source) = match &faker_server {
        Some(server) => {
            println!(
                "▸ armis source → Faker server at {} ({} devices, seed {})",
                server.url(),
                args.devices,
                args.seed
            );
            (
                ARMIS_SOURCE,
                "armis",
                json!({
                    "type": "armis",
                    "endpoint": server.url(),
                    "credentials": {
                        "api_key": FAKER_API_KEY,
                        "api_secret": FAKER_API_SECRET,
                        "page_size": FAKER_PAGE.to_string(),
                    },
                    "discovery_interval": interval,
                    "sync_service_id": SYNC_SERVICE_ID,
                }),
            )
        }
        None => {
            println!(
                "▸ faker source → in-process generator ({} devices, seed {})",
                args.devices, args.seed
            );
            (
                FAKER_SOURCE,
                "faker",
                json!({
                    "type": "faker",
                    "credentials": {
                        "total_devices": args.devices.to_string(),
                        "seed": args.seed.to_string(),
                        "churn_percent": args.churn_percent.to_string(),
                    },
                    "discovery_interval": interval,
                    "sync_service_id": SYNC_SERVICE_ID,
                }),
            )
        }
    };
    let mut sources = serde_json::Map::new();
    sources.insert(source_name.to_owned(), source);
    let config = GatewayConfig {
        listen: "127.0.0.1:0".to_owned(),
        gateway_id: "demo-gateway".to_owned(),
        tls: layout.gateway(),
        allow_tls12: false,
        database: Some(gateway::DatabaseLocation::Sqlite(state.join("gateway.db"))),
        heartbeat_interval_sec: 30,
        config_poll_interval_sec: 300,
        agents: BTreeMap::from([(AGENT_ID.to_owned(), AgentSources { sources })]),
        // A demo: the credentials key is generated next to the database.
        credentials_key: gateway::secrets::KeySettings {
            key_file: None,
            dev_key_file: Some(state.join("gateway.dev-credentials.key")),
        },
        ..GatewayConfig::default()
    };
    let gw = gateway::start(config)
        .await
        .context("starting the demo gateway")?;
    let addr = gw.local_addr();
    println!("▸ gateway listening on {addr} (mTLS, TLS 1.3, client certificates required)");

    let agent_json = state.join("agent.json");
    std::fs::write(
        &agent_json,
        serde_json::to_vec_pretty(&json!({
            "agent_id": AGENT_ID,
            "partition": "default",
            "gateway_addr": addr.to_string(),
            "gateway_security": {
                "mode": "mtls",
                "cert_dir": "certs",
                "server_name": "localhost",
                "role": "agent",
                "tls": {"cert_file": format!("{AGENT_ID}.pem"), "key_file": format!("{AGENT_ID}-key.pem"), "ca_file": "ca.pem"}
            },
            "state_dir": "agent"
        }))?,
    )?;
    let bootstrap = Bootstrap::load(&agent_json)?;
    println!("▸ agent bootstrap written to {}", agent_json.display());

    let mut events = gw.subscribe();
    let agent = agent::start(bootstrap)?;
    let mut summary = Summary::new(source_name, source_kind);
    // Until the first run is reported (bounded by --timeout)...
    let first_run = tokio::time::timeout(
        *args.timeout,
        show_until_reported(&mut events, &mut summary),
    )
    .await;
    // ...then, with --follow, every later run until Ctrl-C.
    if args.follow && matches!(first_run, Ok(true)) {
        println!(
            "▸ following: the source runs every {}; Ctrl-C to stop",
            args.interval
        );
        let churn = args.churn_percent;
        tokio::select! {
            _ = agent::wait_for_termination() => {}
            _ = async {
                loop {
                    // A run was just reported: the next one sees the next Faker run.
                    if let Some(server) = &faker_server {
                        advance_faker(server, churn).await;
                    }
                    if !show_until_reported(&mut events, &mut summary).await {
                        break;
                    }
                }
            } => {}
        }
    }

    let (stored, canonical) = match gw.store() {
        Some(store) => (
            store.device_count().await?,
            store.canonical_device_count().await?,
        ),
        None => (0, 0),
    };
    let ok = matches!(first_run, Ok(true));
    if !ok {
        eprintln!(
            "✗ no complete run within {}; see the log above (run with LOG_LEVEL=info for details)",
            args.timeout
        );
    }
    println!();
    println!("Summary");
    println!("  runs delivered   {}", summary.runs);
    println!("  chunks received  {}", summary.chunks);
    println!(
        "  devices stored   {stored} (gateway database {})",
        state.join("gateway.db").display()
    );
    println!("  canonical        {canonical} devices after identity reconciliation (DIRE)");
    println!("  elapsed          {:.2?}", started.elapsed());
    agent.shutdown();
    gw.shutdown().await;
    if let Some(server) = faker_server {
        // Only an advance still running after Ctrl-C holds another reference;
        // dropping the server then stops it without the grace period.
        if let Ok(server) = Arc::try_unwrap(server) {
            server.shutdown().await;
        }
    }
    actix_rt::System::current().stop();
    Ok(if ok && stored == args.devices { 0 } else { 1 })
}

/// Moves the Faker server to its next run when churn is on (the IPs of
/// `churn_percent` of the devices swap), off the async thread: it costs
/// O(devices).
async fn advance_faker(server: &Arc<FakerServer>, churn_percent: f64) {
    if churn_percent <= 0.0 {
        return;
    }
    let server = Arc::clone(server);
    match tokio::task::spawn_blocking(move || server.advance_run()).await {
        Ok(run) => println!(
            "▸ Faker server advanced to run {run}: {churn_percent}% of the devices change IP for the next run"
        ),
        Err(e) => eprintln!("✗ advancing the Faker server failed: {e}"),
    }
}

/// Prints gateway events until a run report arrives (true) or the event
/// stream ends (false).
async fn show_until_reported(
    events: &mut tokio::sync::broadcast::Receiver<GatewayEvent>,
    summary: &mut Summary,
) -> bool {
    loop {
        match events.recv().await {
            Ok(event) if summary.show(&event) => return true,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return false,
        }
    }
}

/// Clears what a previous demo left, keeping nothing but the folder.
fn reset_state(state: &Path) -> anyhow::Result<()> {
    for entry in [
        "gateway.db",
        "gateway.db-wal",
        "gateway.db-shm",
        "agent",
        "agent.json",
    ] {
        let path = state.join(entry);
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else if path.exists() {
            std::fs::remove_file(&path)
        } else {
            Ok(())
        }
        .with_context(|| format!("resetting {}", path.display()))?;
    }
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))
}

struct Summary {
    source_name: &'static str,
    source_kind: &'static str,
    runs: u64,
    chunks: u64,
    run_chunks: u64,
    config_shown: Option<String>,
    config_served_at: Option<Instant>,
}

impl Summary {
    fn new(source_name: &'static str, source_kind: &'static str) -> Self {
        Summary {
            source_name,
            source_kind,
            runs: 0,
            chunks: 0,
            run_chunks: 0,
            config_shown: None,
            config_served_at: None,
        }
    }

    /// Prints one event; true when a run has been delivered and reported.
    fn show(&mut self, event: &GatewayEvent) -> bool {
        match event {
            GatewayEvent::Hello {
                agent_id,
                capabilities,
                ..
            } => {
                println!(
                    "▸ agent {agent_id} enrolled over mTLS (capabilities: {})",
                    capabilities.join(", ")
                );
            }
            GatewayEvent::ConfigServed { version, .. }
                if self.config_shown.as_ref() != Some(version) =>
            {
                // GetConfig and the ControlStream may both deliver one version.
                self.config_shown = Some(version.clone());
                self.config_served_at = Some(Instant::now());
                println!(
                    "▸ config {} served: source {:?} ({})",
                    short(version),
                    self.source_name,
                    self.source_kind
                );
            }
            GatewayEvent::ChunkStored {
                chunk_index,
                total_chunks,
                ..
            } => {
                self.chunks += 1;
                self.run_chunks += 1;
                if std::io::stdout().is_terminal() {
                    print!("\r  chunk {}/{} received", chunk_index + 1, total_chunks);
                    let _ = std::io::stdout().flush();
                }
            }
            GatewayEvent::RunComplete {
                run_id, devices, ..
            } => {
                if std::io::stdout().is_terminal() {
                    println!();
                }
                let chunks = std::mem::take(&mut self.run_chunks);
                match self.config_served_at.take() {
                    Some(t) => println!(
                        "▸ run {} complete: {devices} devices in {chunks} chunks stored ({:.2?} after the config arrived)",
                        short(run_id),
                        t.elapsed()
                    ),
                    None => println!("▸ run {} complete: {devices} devices in {chunks} chunks stored", short(run_id)),
                }
            }
            GatewayEvent::RunReport {
                source,
                result,
                device_count,
                error,
                report,
                ..
            } => {
                self.runs += 1;
                let kind = report
                    .get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or(self.source_kind);
                // HTTP sources also say how many API pages the run took.
                let pages = match report.get("pages").and_then(|p| p.as_u64()) {
                    Some(1) => " in 1 API page".to_owned(),
                    Some(n) if n > 0 => format!(" in {n} API pages"),
                    _ => String::new(),
                };
                match error {
                    Some(e) => println!("▸ run report from {source:?} ({kind}): {result}, error: {e}"),
                    None => println!(
                        "▸ run report from {source:?} ({kind}): {result}, {device_count} devices{pages}"
                    ),
                }
                return true;
            }
            _ => {}
        }
        false
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}
