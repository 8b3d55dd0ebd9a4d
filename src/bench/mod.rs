//! `serviceradar-agent bench`: Faker devices through the agent pipeline
//! (generate or download → stage on disk → chunk → StreamStatus over mTLS)
//! to a loopback gateway that only validates and acknowledges.
//!
//! Two sources: `faker` generates in the agent; `armis-http` has an `armis`
//! source download the devices from the Faker server over HTTP (pages of
//! 5000), and first times a plain HTTP client downloading the same pages,
//! so the agent's time is reported as a ratio to a bare download.
//!
//! The gateway (and the Faker server) run in this process; the agent runs
//! in a child process (`bench-agent`) so its peak RSS is measured alone.

pub mod dire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::actors::telemetry::AgentEvent;
use crate::config::bootstrap::Bootstrap;
use crate::gateway::{self, AgentSources, GatewayConfig};
use crate::sources::faker::server::{FakerServer, FakerServerConfig};
use crate::sources::faker::FakerSettings;
use crate::{agent, pki};

const AGENT_ID: &str = "bench-agent";

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub devices: Vec<u64>,
    /// Working directory (PKI, staging).
    #[arg(long, default_value = "bench-state")]
    pub state_dir: PathBuf,
    /// Where the devices come from.
    #[arg(long, value_enum, default_value = "faker")]
    pub source: BenchSource,
    /// The gateway stores what it receives (SQLite: staging, per-source rows
    /// and DIRE) instead of only validating it; the agent's time then runs
    /// to the gateway's commit of the run.
    #[arg(long)]
    pub store: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchSource {
    /// The in-process `faker` source.
    Faker,
    /// An `armis` source downloading from the Faker server over HTTP.
    ArmisHttp,
}

/// Page size of the `armis-http` benchmark (the figure).
const HTTP_PAGE: u64 = 5000;
const FAKER_KEY: &str = "bench-key";
const FAKER_SECRET: &str = "bench-secret";

#[derive(Args, Debug, Clone)]
pub struct BenchAgentArgs {
    #[arg(long)]
    pub bootstrap: PathBuf,
}

/// What one agent process measured.
#[derive(Serialize, Deserialize, Debug)]
pub struct AgentMeasurement {
    pub devices: u64,
    pub chunks: u32,
    /// From the first device generated to the last chunk acknowledged.
    pub run_seconds: f64,
    /// Of which generating and staging on disk (the rest is chunk and upload).
    pub stage_seconds: f64,
    pub peak_rss_kib: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: BenchArgs) -> anyhow::Result<i32> {
    let layout = pki::create_dev_pki(
        &args.state_dir.join("certs"),
        &["localhost".to_owned()],
        &[(AGENT_ID.to_owned(), "default".to_owned())],
    )?;
    let exe = std::env::current_exe()?;
    let http = args.source == BenchSource::ArmisHttp;
    println!(
        "{:>10}  {:>8}  {:>10}  {:>10}  {:>12}  {:>14}{}",
        "devices",
        "chunks",
        "seconds",
        "(staging)",
        "devices/s",
        "agent peak RSS",
        if http {
            "   plain download   agent/plain (staging/plain)"
        } else {
            ""
        }
    );
    let mut results = Vec::new();
    for &n in &args.devices {
        let mut sources = serde_json::Map::new();
        let mut faker_server = None;
        let mut plain_seconds = 0.0;
        if http {
            let server = FakerServer::start(FakerServerConfig {
                listen: "127.0.0.1:0".parse()?,
                settings: FakerSettings {
                    total_devices: n,
                    seed: 1,
                    churn_percent: 0.0,
                },
                max_page: HTTP_PAGE as u32,
                churn_interval: None,
                token_ttl: std::time::Duration::from_secs(3600),
                api_key: Some(FAKER_KEY.to_owned()),
                api_secret: Some(FAKER_SECRET.to_owned()),
            })
            .await?;
            plain_seconds = plain_download(&server.url(), n).await?;
            sources.insert(
                "Bench Armis".to_owned(),
                json!({"type": "armis", "endpoint": server.url(), "discovery_interval": "24h",
                    "credentials": {"api_key": FAKER_KEY, "api_secret": FAKER_SECRET,
                        "page_size": HTTP_PAGE.to_string()}}),
            );
            faker_server = Some(server);
        } else {
            sources.insert(
                "Bench Faker".to_owned(),
                json!({"type": "faker", "credentials": {"total_devices": n.to_string(), "seed": "1"}, "discovery_interval": "24h"}),
            );
        }
        let database = args.state_dir.join(format!("gateway-{n}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let mut name = database.as_os_str().to_owned();
            name.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(name));
        }
        let gw = gateway::start(GatewayConfig {
            listen: "127.0.0.1:0".to_owned(),
            gateway_id: "bench-gateway".to_owned(),
            tls: layout.gateway(),
            allow_tls12: false,
            database: args
                .store
                .then(|| crate::gateway::DatabaseLocation::Sqlite(database.clone())),
            credentials_key: gateway::secrets::KeySettings {
                key_file: None,
                dev_key_file: Some(args.state_dir.join("gateway-dev.key")),
            },
            heartbeat_interval_sec: 30,
            config_poll_interval_sec: 3600,
            agents: BTreeMap::from([(AGENT_ID.to_owned(), AgentSources { sources })]),
            ..GatewayConfig::default()
        })
        .await?;
        let agent_dir = args.state_dir.join(format!("agent-{n}"));
        let _ = std::fs::remove_dir_all(&agent_dir);
        std::fs::create_dir_all(&agent_dir)?;
        let files = layout.agent(AGENT_ID);
        let bootstrap = agent_dir.join("agent.json");
        std::fs::write(
            &bootstrap,
            serde_json::to_vec_pretty(&json!({
                "agent_id": AGENT_ID, "gateway_addr": gw.local_addr().to_string(),
                "gateway_security": {"mode": "mtls", "server_name": "localhost", "tls": {
                    "cert_file": files.cert_file.canonicalize()?, "key_file": files.key_file.canonicalize()?,
                    "ca_file": files.ca_file.canonicalize()?}},
                "state_dir": agent_dir.canonicalize()?,
            }))?,
        )?;
        // `output()` would capture stderr too (tokio pipes both): spawn with
        // only stdout piped so the agent's warnings reach the terminal.
        let output = tokio::process::Command::new(&exe)
            .arg("bench-agent")
            .arg("--bootstrap")
            .arg(&bootstrap)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the bench agent")?
            .wait_with_output()
            .await
            .context("running the bench agent")?;
        if !output.status.success() {
            bail!("bench agent for {n} devices failed: {}", output.status);
        }
        let m: AgentMeasurement = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "bench agent output: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })?;
        let received = gw.stats().devices_received;
        if let Some(store) = gw.store() {
            let canonical = store.canonical_device_count().await?;
            if canonical != n {
                bail!("{n} devices became {canonical} canonical devices");
            }
        }
        gw.shutdown().await;
        if let Some(server) = faker_server {
            server.shutdown().await;
        }
        if m.devices != n || received != n {
            bail!(
                "expected {n} devices, agent delivered {} and gateway validated {received}",
                m.devices
            );
        }
        let ratios = if http {
            format!(
                "   {:>12.2} s   {:>6.2} ({:.2})",
                plain_seconds,
                m.run_seconds / plain_seconds,
                m.stage_seconds / plain_seconds
            )
        } else {
            String::new()
        };
        println!(
            "{:>10}  {:>8}  {:>10.2}  {:>10.2}  {:>12.0}  {:>10} MiB{}",
            n,
            m.chunks,
            m.run_seconds,
            m.stage_seconds,
            n as f64 / m.run_seconds,
            m.peak_rss_kib / 1024,
            ratios
        );
        results.push(m);
        let _ = std::fs::remove_dir_all(&agent_dir);
    }
    if let [small, .., large] = results.as_slice() {
        println!(
            "peak RSS ratio {} / {} devices: {:.2}",
            large.devices,
            small.devices,
            large.peak_rss_kib as f64 / small.peak_rss_kib as f64
        );
    }
    Ok(0)
}

/// Seconds a plain HTTP client takes to download the same pages the agent
/// will: one token, then every search page of [`HTTP_PAGE`] devices, bodies
/// read in full and dropped (no parsing).
async fn plain_download(base: &str, devices: u64) -> anyhow::Result<f64> {
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder().build()?;
    let started = Instant::now();
    let token: serde_json::Value = serde_json::from_slice(
        &client
            .post(format!("{base}/api/v1/access_token/"))
            .header("content-type", "application/json")
            .body(json!({"api_key": FAKER_KEY, "api_secret": FAKER_SECRET}).to_string())
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?,
    )?;
    let token = token["data"]["access_token"]
        .as_str()
        .context("the Faker server sent no token")?
        .to_owned();
    let mut bytes = 0;
    for from in (0..devices).step_by(HTTP_PAGE as usize) {
        bytes += client
            .get(format!(
                "{base}/api/v1/search/?from={from}&length={HTTP_PAGE}"
            ))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?
            .len();
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(bytes, seconds, "plain download");
    Ok(seconds)
}

/// The agent side: start the agent, wait for the first delivered run, print
/// the measurement as JSON on stdout and exit.
pub fn run_agent(args: BenchAgentArgs) -> anyhow::Result<i32> {
    let bootstrap = Bootstrap::load(&args.bootstrap)?;
    let system = actix_rt::System::new();
    let measurement = system.block_on(async move {
        let handle = agent::start(bootstrap)?;
        let mut events = handle.context.telemetry.subscribe();
        let mut run_started = None;
        let mut stage_seconds = 0.0;
        loop {
            match events.recv().await {
                Ok(AgentEvent::SourceStarted { .. }) => {
                    run_started.get_or_insert_with(Instant::now);
                }
                Ok(AgentEvent::RunStaged { .. }) => {
                    stage_seconds = run_started
                        .map(|t: Instant| t.elapsed().as_secs_f64())
                        .unwrap_or_default();
                }
                Ok(AgentEvent::RunDelivered {
                    devices, chunks, ..
                }) => {
                    let seconds = run_started
                        .map(|t| t.elapsed().as_secs_f64())
                        .unwrap_or_default();
                    handle.shutdown();
                    return Ok(AgentMeasurement {
                        devices,
                        chunks,
                        run_seconds: seconds,
                        stage_seconds,
                        peak_rss_kib: peak_rss_kib(),
                    });
                }
                Ok(AgentEvent::RunReported {
                    ok: false, error, ..
                }) => {
                    bail!("run failed: {}", error.unwrap_or_default())
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("agent events ended: {e}"),
            }
        }
    })?;
    println!("{}", serde_json::to_string(&measurement)?);
    Ok(0)
}

/// Peak resident set size of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
