//! Test fixtures: a dev PKI in a temp dir, an in-process gateway, an agent
//! bootstrap pointing at it, and event waits with a safety deadline (the
//! deadline only turns a hang into a failure; tests synchronise on events).
#![allow(dead_code)]

pub mod fault_proxy;
pub mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use serviceradar_agent::config::bootstrap::Bootstrap;
use serviceradar_agent::gateway::{self, AgentSources, GatewayConfig, GatewayHandle};
use serviceradar_agent::pki::{self, PkiLayout};
use tokio::sync::broadcast;

/// Upper bound for any single wait in a test: generous for a loaded 2-core CI box.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pki: PkiLayout,
    /// The gateway's database: `gateway.db` in the fixture's directory
    /// unless [`Fixture::with_database`] names another.
    pub database: gateway::DatabaseLocation,
}

impl Fixture {
    pub fn new(agents: &[&str]) -> Self {
        serviceradar_agent::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let agents: Vec<(String, String)> = agents
            .iter()
            .map(|a| (a.to_string(), "default".to_string()))
            .collect();
        let pki = pki::create_dev_pki(
            &dir.path().join("certs"),
            &["localhost".to_string(), "127.0.0.1".to_string()],
            &agents,
        )
        .expect("dev pki");
        let database = gateway::DatabaseLocation::Sqlite(dir.path().join("gateway.db"));
        Self { dir, pki, database }
    }

    /// The same fixture with its gateways on `database`, either backend: a
    /// storage test passes `backend.fresh_database(fx.path(), "gateway")
    /// .await`. Every gateway of the fixture uses it, so a second
    /// [`Fixture::gateway`] is a restart on the same database.
    pub fn with_database(mut self, database: gateway::DatabaseLocation) -> Self {
        self.database = database;
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn gateway_config(&self, agent_sources: &[(&str, Value)]) -> GatewayConfig {
        let agents = agent_sources
            .iter()
            .map(|(agent, sources)| {
                let sources = sources.as_object().cloned().unwrap_or_default();
                (agent.to_string(), AgentSources { sources })
            })
            .collect::<BTreeMap<_, _>>();
        GatewayConfig {
            listen: "127.0.0.1:0".into(),
            gateway_id: "gw-test".into(),
            tls: self.pki.gateway(),
            allow_tls12: false,
            database: Some(self.database.clone()),
            heartbeat_interval_sec: 30,
            config_poll_interval_sec: 300,
            agents,
            credentials_key: gateway::secrets::KeySettings {
                key_file: None,
                dev_key_file: Some(self.path().join("gateway.key")),
            },
            ..GatewayConfig::default()
        }
    }

    pub async fn gateway(&self, agent_sources: &[(&str, Value)]) -> GatewayHandle {
        gateway::start(self.gateway_config(agent_sources))
            .await
            .expect("gateway starts")
    }

    /// Writes `agent.json` for `agent_id` and returns its path.
    pub fn bootstrap_file(&self, agent_id: &str, gateway_addr: &str, extra: Value) -> PathBuf {
        let files = self.pki.agent(agent_id);
        let mut doc = json!({
            "agent_id": agent_id,
            "partition": "default",
            "gateway_addr": gateway_addr,
            "gateway_security": {
                "mode": "mtls", "server_name": "localhost", "role": "agent",
                "cert_dir": self.pki.dir,
                "tls": {"cert_file": files.cert_file.file_name().unwrap().to_str(),
                        "key_file": files.key_file.file_name().unwrap().to_str(),
                        "ca_file": "ca.pem"}
            },
            "state_dir": self.path().join(format!("state-{agent_id}")),
            "restart_policy": {"backoff_base": "20ms", "backoff_cap": "500ms", "max_restarts": 20, "window": "1m"},
            "gateway_policy": {"reconnect_base": "50ms", "reconnect_cap": "1s"}
        });
        if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                doc.insert(k.clone(), v.clone());
            }
        }
        let path = self.path().join(format!("{agent_id}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        path
    }

    pub fn bootstrap(&self, agent_id: &str, gateway_addr: &str, extra: Value) -> Bootstrap {
        Bootstrap::load(&self.bootstrap_file(agent_id, gateway_addr, extra))
            .expect("bootstrap parses")
    }
}

/// A faker source definition.
pub fn faker_source(devices: u64, seed: u64) -> Value {
    json!({"type": "faker", "credentials": {"total_devices": devices.to_string(), "seed": seed.to_string()},
           "discovery_interval": "1h", "sync_service_id": "3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90"})
}

/// Waits for the first event matching `pick`, failing the test after DEADLINE.
pub async fn wait_for<E: Clone, T>(
    rx: &mut broadcast::Receiver<E>,
    what: &str,
    mut pick: impl FnMut(&E) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            match rx.recv().await {
                Ok(event) => {
                    if let Some(t) = pick(&event) {
                        return t;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("event receiver lagged by {n} while waiting for {what}")
                }
                Err(broadcast::error::RecvError::Closed) => {
                    panic!("event stream closed while waiting for {what}")
                }
            }
        }
    })
    .await;
    match found {
        Ok(t) => t,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// Runs a future with the test deadline.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {DEADLINE:?}: {what}"))
}

/// A stored per-source row in the shape [`expected_devices`] gives.
pub fn device_tuple(
    r: &serviceradar_agent::gateway::DeviceRow,
) -> (String, String, Option<String>, Option<String>) {
    (
        r.device_key.clone(),
        r.ip.clone().unwrap_or_default(),
        r.mac.clone(),
        r.hostname.clone(),
    )
}

/// The gateway holds exactly the Faker generator's `devices` (first run of
/// `seed`), once each: per-source rows equal to them, as many canonical
/// devices, and no run completed twice.
pub async fn assert_exactly_once(gw: &GatewayHandle, devices: u64, seed: u64) {
    let store = gw.store().expect("gateway has a store");
    let rows = store.devices().await.unwrap();
    assert_eq!(rows.len() as u64, devices, "per-source device rows");
    let stored: std::collections::BTreeSet<_> = rows.iter().map(device_tuple).collect();
    assert!(
        stored == expected_devices(devices, seed),
        "stored devices differ from the generated ones"
    );
    assert_eq!(store.canonical_device_count().await.unwrap(), devices);
    let runs = store.runs().await.unwrap();
    let ids: std::collections::BTreeSet<_> = runs.iter().map(|r| r.run_id.clone()).collect();
    assert_eq!(ids.len(), runs.len(), "a run completed twice: {runs:?}");
}

/// Run ids with a manifest (`<run>.run`) in an agent's spool directory.
pub fn spooled_run_ids(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let name = e.ok()?.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".run").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(armis id, ip, first MAC upper-cased, name)` of every device of a Faker
/// generator's first run: what the gateway must end up storing.
pub fn expected_devices(
    total: u64,
    seed: u64,
) -> std::collections::BTreeSet<(String, String, Option<String>, Option<String>)> {
    use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings};
    let creds = std::collections::BTreeMap::from([
        ("total_devices".to_string(), total.to_string()),
        ("seed".to_string(), seed.to_string()),
    ]);
    let mut generator = FakerGenerator::new(FakerSettings::from_credentials(&creds).unwrap());
    generator.next_run();
    generator
        .devices()
        .map(|d| {
            (
                d.id.unwrap().to_string(),
                d.ip_address.clone().unwrap(),
                d.mac_address
                    .map(|m| m.split(',').next().unwrap().to_uppercase()),
                d.name.clone(),
            )
        })
        .collect()
}

/// The real agent binary run on `bootstrap` as a child process (killed when
/// dropped), its log (stderr, `info`) in `log`: chaos tests measure its
/// memory and check it is still alive.
pub struct AgentProcess {
    pub process: process::Running,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn start(bootstrap: &Path, log: PathBuf) -> Self {
        let stderr = std::fs::File::create(&log).expect("agent log file");
        let child = std::process::Command::new(process::BIN)
            .arg("--config")
            .arg(bootstrap)
            .env_remove("RUST_LOG")
            .env("LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("agent binary starts");
        Self {
            process: process::Running(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Still running (not exited, not a zombie we reaped).
    pub fn alive(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("agent /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }

    /// The last `n` lines of the agent's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// What a gateway reported, collected by a background task so that nothing
/// is lost or lagged while a test waits on something else (a proxy counter,
/// an outage). See [`record_gateway`].
#[derive(Clone, Debug, Default)]
pub struct GatewayLog {
    pub hellos: u64,
    pub chunks_stored: u64,
    pub streams_accepted: u64,
    /// Reasons of rejected streams ("stream aborted: …" when the link died).
    pub streams_rejected: Vec<String>,
    /// (run id, devices) per RunComplete.
    pub runs: Vec<(String, u64)>,
    /// Run reports as sent.
    pub reports: Vec<Value>,
    pub control_streams: u64,
    /// (command id, success, message) per CommandResult.
    pub commands: Vec<(String, bool, String)>,
}

pub fn record_gateway(gw: &GatewayHandle) -> tokio::sync::watch::Receiver<GatewayLog> {
    use gateway::GatewayEvent as E;
    let mut events = gw.subscribe();
    let (tx, rx) = tokio::sync::watch::channel(GatewayLog::default());
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    panic!("gateway event recorder lagged by {n}")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            tx.send_modify(|s| match event {
                E::Hello { .. } => s.hellos += 1,
                E::ChunkStored { .. } => s.chunks_stored += 1,
                E::StreamAccepted { .. } => s.streams_accepted += 1,
                E::StreamRejected { reason, .. } => s.streams_rejected.push(reason),
                E::RunComplete {
                    run_id, devices, ..
                } => s.runs.push((run_id, devices)),
                E::RunReport { report, .. } => s.reports.push(report),
                E::ControlStreamOpened { .. } => s.control_streams += 1,
                E::CommandResult {
                    command_id,
                    success,
                    message,
                    ..
                } => s.commands.push((command_id, success, message)),
                _ => {}
            });
        }
    });
    rx
}

/// Waits until the log satisfies `pred`; on timeout panics with the log and
/// `context()` (e.g. the agent's log tail).
pub async fn wait_log(
    rx: &mut tokio::sync::watch::Receiver<GatewayLog>,
    what: &str,
    pred: impl FnMut(&GatewayLog) -> bool,
    context: impl FnOnce() -> String,
) -> GatewayLog {
    let waited = tokio::time::timeout(DEADLINE, rx.wait_for(pred))
        .await
        .map(|r| r.map(|log| log.clone()));
    match waited {
        Ok(Ok(log)) => log,
        _ => panic!(
            "no {what} within {DEADLINE:?}: {:?}\n{}",
            rx.borrow().clone(),
            context()
        ),
    }
}
