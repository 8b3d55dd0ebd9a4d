//! `serviceradar-agent demo`: the whole system on one machine. Creates a dev
//! PKI, starts a gateway and an agent on loopback mTLS, assigns a Faker source
//! and shows the devices arriving.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::config::bootstrap::Bootstrap;
use crate::gateway::{self, AgentSources, GatewayConfig, GatewayEvent};
use crate::{agent, pki};

const AGENT_ID: &str = "demo-agent";
const SOURCE_NAME: &str = "Demo Faker";

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

    let source = json!({
        "type": "faker",
        "credentials": {
            "total_devices": args.devices.to_string(),
            "seed": args.seed.to_string(),
            "churn_percent": args.churn_percent.to_string(),
        },
        "discovery_interval": humantime::format_duration(*args.interval).to_string().replace(' ', ""),
        "sync_service_id": "6d1c2a9e-0000-4000-8000-000000000001",
    });
    let mut sources = serde_json::Map::new();
    sources.insert(SOURCE_NAME.to_owned(), source);
    let config = GatewayConfig {
        listen: "127.0.0.1:0".to_owned(),
        gateway_id: "demo-gateway".to_owned(),
        tls: layout.gateway(),
        allow_tls12: false,
        database: Some(state.join("gateway.db")),
        heartbeat_interval_sec: 30,
        config_poll_interval_sec: 300,
        agents: BTreeMap::from([(AGENT_ID.to_owned(), AgentSources { sources })]),
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
    let agent = agent::start(bootstrap);
    let mut summary = Summary::default();
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
        tokio::select! {
            _ = agent::wait_for_termination() => {}
            _ = async { while show_until_reported(&mut events, &mut summary).await {} } => {}
        }
    }

    let stored = match gw.store() {
        Some(store) => store.device_count().await?,
        None => 0,
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
    println!("  elapsed          {:.2?}", started.elapsed());
    agent.shutdown();
    gw.shutdown().await;
    actix_rt::System::current().stop();
    Ok(if ok && stored == args.devices { 0 } else { 1 })
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

#[derive(Default)]
struct Summary {
    runs: u64,
    chunks: u64,
    run_chunks: u64,
    config_shown: Option<String>,
    config_served_at: Option<Instant>,
}

impl Summary {
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
                    "▸ config {} served: source {SOURCE_NAME:?} (faker)",
                    short(version)
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
                ..
            } => {
                self.runs += 1;
                match error {
                    Some(e) => println!("▸ run report from {source:?}: {result}, error: {e}"),
                    None => {
                        println!("▸ run report from {source:?}: {result}, {device_count} devices")
                    }
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
