//! Test fixtures: a dev PKI in a temp dir, an in-process gateway, an agent
//! bootstrap pointing at it, and event waits with a safety deadline (the
//! deadline only turns a hang into a failure; tests synchronise on events).
#![allow(dead_code)]

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
