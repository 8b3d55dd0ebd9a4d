//! Shared helpers for the gateway integration tests: a throw-away PKI, a
//! gateway on an ephemeral port, a real mTLS client, and chunk builders.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use serviceradar_agent::gateway::{
    self, AgentSources, DatabaseLocation, GatewayConfig, GatewayEvent, GatewayHandle,
};
use serviceradar_agent::pki::{write_pair, DevCa, PkiLayout};
use serviceradar_agent::proto::agent_gateway_service_client::AgentGatewayServiceClient;
use serviceradar_agent::proto::{GatewayServiceStatus, GatewayStatusChunk};
use serviceradar_agent::tls::{self, MtlsConnector, TlsFiles};
use tokio::sync::broadcast;
use tonic::transport::{Channel, Endpoint};

pub type Client = AgentGatewayServiceClient<Channel>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Upper bound for waiting on an event; a failure bound, not synchronisation.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub layout: PkiLayout,
}

impl TestPki {
    pub fn new() -> Self {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let layout = PkiLayout::new(dir.path());
        let ca = DevCa::generate("gateway test CA").unwrap();
        ca.write(&layout).unwrap();
        write_pair(
            &layout.gateway(),
            &ca.issue_server(&["localhost".into(), "127.0.0.1".into()])
                .unwrap(),
        )
        .unwrap();
        Self { dir, ca, layout }
    }

    /// A dev agent certificate (CN + SPIFFE SAN) written to disk.
    pub fn agent(&self, agent_id: &str, partition: &str) -> TlsFiles {
        let files = self.layout.agent(agent_id);
        write_pair(&files, &self.ca.issue_agent(agent_id, partition).unwrap()).unwrap();
        files
    }

    /// A client certificate with an arbitrary CN / URI SAN, stored as `<stem>`.
    pub fn client(&self, stem: &str, cn: &str, uri: Option<&str>) -> TlsFiles {
        let files = self.layout.agent(stem);
        write_pair(&files, &self.ca.issue_client(cn, uri).unwrap()).unwrap();
        files
    }

    /// A gateway config with the SQLite file `gateway.db` in the PKI's
    /// directory (`database`), or validate-only (no database).
    pub fn gateway_config(&self, database: bool) -> GatewayConfig {
        let mut config = self.gateway_config_on(self.sqlite_database());
        if !database {
            config.database = None;
        }
        config
    }

    /// The SQLite database of [`TestPki::gateway_config`]`(true)`.
    pub fn sqlite_database(&self) -> DatabaseLocation {
        DatabaseLocation::Sqlite(self.dir.path().join("gateway.db"))
    }

    /// A gateway config on `database`, either backend (a storage test passes
    /// `backend.fresh_database(pki.dir.path(), "gateway").await`; starting
    /// again on the same location is a restart).
    pub fn gateway_config_on(&self, database: DatabaseLocation) -> GatewayConfig {
        GatewayConfig {
            listen: "127.0.0.1:0".into(),
            gateway_id: "gw-test".into(),
            tls: self.layout.gateway(),
            database: Some(database),
            credentials_key: gateway::secrets::KeySettings {
                key_file: None,
                dev_key_file: Some(self.dir.path().join("gateway.key")),
            },
            ..GatewayConfig::default()
        }
    }
}

/// Bearer token of the admin API in tests that enable it.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// `config` with the HTTP admin API on an ephemeral loopback port, accepting
/// [`ADMIN_TOKEN`] (the API needs the database: `gateway_config(true)`).
pub fn with_admin_api(mut config: GatewayConfig) -> GatewayConfig {
    config.admin = Some(gateway::config::AdminApiConfig {
        listen: "127.0.0.1:0".into(),
        token_file: None,
        token: Some(ADMIN_TOKEN.into()),
    });
    config
}

pub fn sources(value: Value) -> AgentSources {
    AgentSources {
        sources: value.as_object().cloned().unwrap(),
    }
}

pub async fn start(config: GatewayConfig) -> GatewayHandle {
    gateway::start(config).await.unwrap()
}

pub async fn start_with_agents(
    pki: &TestPki,
    database: bool,
    agents: BTreeMap<String, AgentSources>,
) -> GatewayHandle {
    let mut config = pki.gateway_config(database);
    config.agents = agents;
    start(config).await
}

/// [`start_with_agents`] on `database`, either backend.
pub async fn start_with_agents_on(
    pki: &TestPki,
    database: DatabaseLocation,
    agents: BTreeMap<String, AgentSources>,
) -> GatewayHandle {
    let mut config = pki.gateway_config_on(database);
    config.agents = agents;
    start(config).await
}

// ---- what the database holds ---------------------------------------------

/// Everything the database holds, as `(where, bytes)`: on SQLite the
/// database file and its `-wal` and `-shm` files as they are on disk; on
/// PostgreSQL the text of every row of every table (`row::text`: a `BYTEA`
/// shows as hex, see [`assert_nowhere_in_clear`]). Read with the gateway
/// stopped or idle.
pub async fn database_contents(location: &DatabaseLocation) -> Vec<(String, Vec<u8>)> {
    match location {
        DatabaseLocation::Sqlite(path) => ["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut name = path.as_os_str().to_owned();
                name.push(suffix);
                std::fs::read(&name)
                    .ok()
                    .map(|bytes| (std::path::PathBuf::from(name).display().to_string(), bytes))
            })
            .collect(),
        DatabaseLocation::Postgres(url) => {
            let url = url.expose_secret().to_owned();
            // The blocking client must not live on a tokio runtime's thread.
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(postgres_rows(&url));
            });
            rx.await.expect("the database dump thread")
        }
    }
}

fn postgres_rows(url: &str) -> Vec<(String, Vec<u8>)> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect to dump");
    let tables: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
            &[],
        )
        .expect("list the tables")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut contents = Vec::new();
    for (schema, table) in tables {
        let rows = client
            .query(
                &format!("SELECT t::text FROM \"{schema}\".\"{table}\" t"),
                &[],
            )
            .unwrap_or_else(|e| panic!("dump {schema}.{table}: {e}"));
        let mut bytes = Vec::new();
        for row in rows {
            let text: String = row.get(0);
            bytes.extend(text.into_bytes());
            bytes.push(b'\n');
        }
        contents.push((format!("{schema}.{table}"), bytes));
    }
    contents
}

/// `needle` is nowhere in `contents` ([`database_contents`]), neither as
/// such nor hex-encoded (how PostgreSQL shows a `BYTEA`).
pub fn assert_nowhere_in_clear(contents: &[(String, Vec<u8>)], needle: &str) {
    let hex = hex::encode(needle);
    for (place, bytes) in contents {
        for form in [needle, hex.as_str()] {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_bytes()),
                "{needle:?} found in clear in {place}"
            );
        }
    }
}

/// A gRPC client over our mTLS connector (TLS 1.3, CA file as only root).
pub async fn connect(addr: std::net::SocketAddr, files: &TlsFiles) -> Result<Client, BoxError> {
    let connector = MtlsConnector::new(tls::client_config(files)?, tls::server_name("localhost")?);
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(connector)
        .await?;
    Ok(AgentGatewayServiceClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

/// Waits for the first event matching `pick`, skipping others.
pub async fn wait_for<T>(
    events: &mut broadcast::Receiver<GatewayEvent>,
    mut pick: impl FnMut(&GatewayEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("gateway event channel closed"),
            }
        }
    })
    .await
    .expect("timed out waiting for a gateway event")
}

/// Collects events up to and including the next `StreamAccepted` or
/// `StreamRejected` (emitted last for every stream).
pub async fn events_of_next_stream(
    events: &mut broadcast::Receiver<GatewayEvent>,
) -> Vec<GatewayEvent> {
    let mut seen = Vec::new();
    wait_for(events, |e| {
        seen.push(e.clone());
        matches!(
            e,
            GatewayEvent::StreamAccepted { .. } | GatewayEvent::StreamRejected { .. }
        )
        .then_some(())
    })
    .await;
    seen
}

/// One device update as the agent sends it (wire.md §5).
pub fn update(
    agent_id: &str,
    partition: &str,
    ip: &str,
    run_id: &str,
    chunk: u32,
    total_chunks: u32,
    total_devices: u64,
) -> Value {
    json!({
        "agent_id": agent_id, "gateway_id": "gw-test", "partition": partition,
        "device_id": format!("{partition}:{ip}"), "ip": ip, "hostname": format!("host-{ip}"),
        "source": "faker", "timestamp": "2025-01-01T00:00:00.000Z",
        "metadata": {"integration_id": format!("faker-{ip}"), "agent_id": "not-an-identity"},
        "sync_meta": {"sync_service_id": "svc", "sync_run_id": run_id, "chunk_index": chunk,
                      "total_chunks": total_chunks, "total_devices": total_devices,
                      "is_final": chunk + 1 == total_chunks}
    })
}

/// A run of `devices` updates split into `chunks` run chunks of (nearly) equal
/// size; returns one JSON array per run chunk.
pub fn run_chunks(
    agent_id: &str,
    partition: &str,
    run_id: &str,
    devices: usize,
    chunks: u32,
    ip_base: u8,
) -> Vec<Vec<u8>> {
    let per = devices.div_ceil(chunks as usize);
    (0..chunks)
        .map(|c| {
            let start = c as usize * per;
            let end = (start + per).min(devices);
            let updates: Vec<Value> = (start..end)
                .map(|i| {
                    let ip = format!("10.{ip_base}.{}.{}", i / 250, i % 250 + 1);
                    update(agent_id, partition, &ip, run_id, c, chunks, devices as u64)
                })
                .collect();
            serde_json::to_vec(&updates).unwrap()
        })
        .collect()
}

/// The StreamStatus envelope of wire.md §6 around one results message.
pub fn envelope(
    agent_id: &str,
    index: i32,
    total: i32,
    is_final: bool,
    message: Vec<u8>,
) -> GatewayStatusChunk {
    GatewayStatusChunk {
        services: vec![GatewayServiceStatus {
            service_name: "sync".into(),
            service_type: "sync".into(),
            source: "results".into(),
            available: true,
            message,
            agent_id: agent_id.into(),
            gateway_id: "gw-test".into(),
            partition: "default".into(),
            ..Default::default()
        }],
        gateway_id: "gw-test".into(),
        agent_id: agent_id.into(),
        timestamp: 1_700_000_000,
        partition: "default".into(),
        chunk_index: index,
        total_chunks: total,
        is_final,
        ..Default::default()
    }
}

/// Envelopes numbered 0..n for the given messages, the last one final.
pub fn stream_of(agent_id: &str, messages: Vec<Vec<u8>>) -> Vec<GatewayStatusChunk> {
    let total = messages.len() as i32;
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| envelope(agent_id, i as i32, total, i as i32 == total - 1, m))
        .collect()
}

/// Sends one StreamStatus call.
pub async fn send_stream(
    client: &mut Client,
    chunks: Vec<GatewayStatusChunk>,
) -> Result<(), tonic::Status> {
    client
        .stream_status(tokio_stream::iter(chunks))
        .await
        .map(|response| assert!(response.into_inner().received))
}

// ---- the HTTP admin API ------------------------------------------------

/// `{"error": message}` with `status`; returns the message.
pub fn error_of(answer: &(StatusCode, Value), status: StatusCode) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    let object = answer.1.as_object().expect("an error object");
    assert_eq!(object.len(), 1, "{}", answer.1);
    object["error"].as_str().expect("a message").to_owned()
}

/// `value` has exactly the properties of the document's schema `name`,
/// each of a declared type; `$ref` properties are checked recursively.
pub fn assert_schema(doc: &Value, name: &str, value: &Value) {
    let schema = &doc["components"]["schemas"][name];
    let props = schema["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no schema {name}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{name}: not an object: {value}"));
    let documented: BTreeSet<&String> = props.keys().collect();
    let answered: BTreeSet<&String> = object.keys().collect();
    assert_eq!(answered, documented, "{name}: {value}");
    let referenced = |p: &Value| {
        p["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .map(str::to_owned)
    };
    for (key, v) in object {
        let prop = &props[key];
        if let Some(inner) = referenced(prop) {
            assert_schema(doc, &inner, v);
            continue;
        }
        if let Some(inner) = referenced(&prop["items"]) {
            for item in v.as_array().unwrap() {
                assert_schema(doc, &inner, item);
            }
        }
        let types: Vec<&str> = match &prop["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        let actual = match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        assert!(
            types.contains(&actual),
            "{name}.{key}: {actual} is not one of {types:?}"
        );
        if let Some(Value::Array(allowed)) = prop.get("enum") {
            assert!(allowed.contains(v), "{name}.{key}: {v} not in {allowed:?}");
        }
    }
}
