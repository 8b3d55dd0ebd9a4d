//! The gateway side of the wire contract (wire.md, gateway.md §1 and §4), first
//! version: one default tenant, agents and their sources from a config file.
//!
//! - [`config`]: the gateway's JSON config file.
//! - [`identity`]: who the peer is, from its client certificate only.
//! - [`validate`]: the StreamStatus rules of wire.md §7 as pure functions.
//! - [`ingest`]: turning `results` payloads into per-run chunk parts.
//! - [`store`]: SQLite: staged chunks of incomplete runs, devices, runs.
//! - `server`, `control`, `agents`, `listener`: the tonic service, the
//!   ControlStream registry, per-agent config rendering and the TLS acceptor.

mod agents;
pub mod cli;
pub mod config;
mod control;
pub mod identity;
pub mod ingest;
mod listener;
pub mod registry;
mod server;
mod sink;
pub mod store;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub use cli::run_from_file;
pub use config::{AgentSources, GatewayConfig};
pub use identity::{IdentityError, IdentityKind, PeerIdentity};
pub use store::{DeviceRow, RunRow, Store, StoreError};

use crate::proto::agent_gateway_service_server::AgentGatewayServiceServer;

/// How long `shutdown` waits for open RPCs to finish before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Room for bursts of per-chunk events; a subscriber that falls further behind
/// gets `Lagged` rather than slowing ingestion down.
const EVENT_CAPACITY: usize = 16 * 1024;

/// Why the gateway could not start or do what was asked. Config errors name the
/// file and the field.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot read gateway config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gateway config {path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("agent {0:?} has no open control stream")]
    AgentNotConnected(String),
    #[error("control stream of agent {0:?} is not draining its messages")]
    ControlStreamFull(String),
    #[error("invalid command: {0}")]
    InvalidCommand(String),
}

/// What happened inside the gateway; see [`GatewayHandle::subscribe`].
#[derive(Clone, Debug)]
pub enum GatewayEvent {
    Hello {
        agent_id: String,
        partition: String,
        capabilities: Vec<String>,
    },
    /// A config payload was delivered (GetConfig answer or ControlStream push);
    /// `not_modified` answers are not reported.
    ConfigServed {
        agent_id: String,
        version: String,
    },
    ConfigAcked {
        agent_id: String,
        version: String,
    },
    /// An agent's ControlStream is registered: pushes and commands reach it.
    ControlStreamOpened {
        agent_id: String,
    },
    Heartbeat {
        agent_id: String,
    },
    /// A run chunk is now staged (emitted when its stream was accepted).
    ChunkStored {
        agent_id: String,
        run_id: String,
        chunk_index: u32,
        total_chunks: u32,
    },
    RunComplete {
        agent_id: String,
        run_id: String,
        devices: u64,
        rejected: u64,
    },
    RunReport {
        agent_id: String,
        source: String,
        run_id: String,
        result: String,
        device_count: u64,
        error: Option<String>,
        /// The whole report as sent (skipped counts, pages, retries,
        /// error_kind, …).
        report: serde_json::Value,
    },
    StreamRejected {
        agent_id: Option<String>,
        code: tonic::Code,
        reason: String,
    },
    StreamAccepted {
        agent_id: String,
        chunks: u32,
    },
    CommandResult {
        agent_id: String,
        command_id: String,
        success: bool,
        message: String,
    },
}

/// A snapshot of the gateway's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    pub streams_ok: u64,
    pub streams_rejected: u64,
    /// Envelope chunks of accepted streams.
    pub chunks: u64,
    /// Updates that passed the per-update checks in accepted streams
    /// (counted in validate-only mode too; includes replays of stored chunks).
    pub devices_received: u64,
    /// Array elements rejected in accepted streams (non-objects, no sync_meta,
    /// no IP and no strong identifier, foreign partition).
    pub devices_rejected: u64,
    pub runs_completed: u64,
    pub heartbeats: u64,
}

/// Lock-free counters behind [`GatewayStats`].
#[derive(Default)]
pub(crate) struct StatsCounters {
    pub streams_ok: AtomicU64,
    pub streams_rejected: AtomicU64,
    pub chunks: AtomicU64,
    pub devices_received: AtomicU64,
    pub devices_rejected: AtomicU64,
    pub runs_completed: AtomicU64,
    pub heartbeats: AtomicU64,
}

impl StatsCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> GatewayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GatewayStats {
            streams_ok: get(&self.streams_ok),
            streams_rejected: get(&self.streams_rejected),
            chunks: get(&self.chunks),
            devices_received: get(&self.devices_received),
            devices_rejected: get(&self.devices_rejected),
            runs_completed: get(&self.runs_completed),
            heartbeats: get(&self.heartbeats),
        }
    }
}

/// State shared by the RPC handlers and the handle.
pub(crate) struct Shared {
    pub gateway_id: String,
    pub heartbeat_interval_sec: i32,
    pub config_poll_interval_sec: i32,
    pub agents: agents::AgentConfigs,
    pub controls: control::ControlRegistry,
    pub events: broadcast::Sender<GatewayEvent>,
    pub stats: StatsCounters,
    pub sink: sink::Sink,
    pub registry: registry::Registry,
}

impl Shared {
    /// Events are best effort: no subscriber is not an error.
    pub fn emit(&self, event: GatewayEvent) {
        let _ = self.events.send(event);
    }
}

/// Binds the listener, spawns the server and returns once it is listening.
pub async fn start(config: GatewayConfig) -> Result<GatewayHandle, GatewayError> {
    let tls = crate::tls::server_config(&config.tls, config.allow_tls12)?;
    let sink = match &config.database {
        Some(path) => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || Store::open(&path))
                .await
                .map_err(|e| StoreError::Task(e.to_string()))??;
            sink::Sink::Store(store)
        }
        None => sink::Sink::memory(),
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: config.listen.clone(),
        source,
    })?;

    let registry = registry::Registry::load(sink.store()).await?;
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let shared = Arc::new(Shared {
        gateway_id: config.gateway_id.clone(),
        heartbeat_interval_sec: config.heartbeat_interval_sec,
        config_poll_interval_sec: config.config_poll_interval_sec,
        agents: agents::AgentConfigs::new(config.agents),
        controls: control::ControlRegistry::default(),
        events,
        stats: StatsCounters::default(),
        sink,
        registry,
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (connections, accept_task) = listener::spawn_acceptor(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        shutdown_rx.clone(),
    );
    let service = AgentGatewayServiceServer::new(server::GatewayService::new(shared.clone()))
        .max_decoding_message_size(validate::MAX_DECODING_MESSAGE_BYTES);
    let incoming = ReceiverStream::new(connections).map(Ok::<_, std::io::Error>);
    let mut signal = shutdown_rx;
    let serve_task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            // Sync chunks are up to 1 MiB: larger HTTP/2 windows avoid a
            // round trip per 64 KiB on high-latency links.
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = signal.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gateway server stopped with an error");
        }
    });
    tracing::info!(addr = %local_addr, gateway_id = %shared.gateway_id, "gateway listening");
    Ok(GatewayHandle {
        local_addr,
        shared,
        shutdown_tx,
        serve_task: Some(serve_task),
        accept_task: Some(accept_task),
    })
}

/// A running gateway. Dropping it stops accepting connections; [`shutdown`]
/// also waits for the server task to end.
///
/// [`shutdown`]: GatewayHandle::shutdown
pub struct GatewayHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    serve_task: Option<JoinHandle<()>>,
    accept_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GatewayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayHandle")
            .field("local_addr", &self.local_addr)
            .field("gateway_id", &self.shared.gateway_id)
            .finish_non_exhaustive()
    }
}

impl GatewayHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn gateway_id(&self) -> &str {
        &self.shared.gateway_id
    }

    pub fn subscribe(&self) -> broadcast::Receiver<GatewayEvent> {
        self.shared.events.subscribe()
    }

    /// Replaces an agent's sources (a new config version) and pushes the new
    /// config at once to the agent's ControlStream if it has one open.
    pub fn set_agent_sources(
        &self,
        agent_id: &str,
        sources: serde_json::Map<String, serde_json::Value>,
    ) {
        let rendered = self.shared.agents.set(agent_id, sources);
        server::push_config(&self.shared, agent_id, &rendered);
    }

    /// Sends a command over the agent's ControlStream; returns the command id.
    pub fn send_command(
        &self,
        agent_id: &str,
        command_type: &str,
        payload_json: serde_json::Value,
    ) -> Result<String, GatewayError> {
        control::send_command(&self.shared.controls, agent_id, command_type, &payload_json)
    }

    /// The device store; `None` in validate-only mode.
    pub fn store(&self) -> Option<Store> {
        self.shared.sink.store()
    }

    /// The agent registry (gateway.md §2), ordered by (tenant, agent_id).
    pub fn agents(&self) -> Vec<registry::AgentRecord> {
        self.shared.registry.list()
    }

    pub fn stats(&self) -> GatewayStats {
        self.shared.stats.snapshot()
    }

    /// Stops accepting, ends open ControlStreams and waits (bounded) for the
    /// server task to finish.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        if let Some(mut task) = self.serve_task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("gateway RPCs still open after the grace period; aborting them");
                task.abort();
            }
        }
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }

    fn signal_stop(&self) {
        let _ = self.shutdown_tx.send(true);
        // Ending the ControlStreams lets their connections drain, otherwise
        // graceful shutdown would wait for agents to hang up.
        self.shared.controls.close_all();
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.signal_stop();
    }
}
