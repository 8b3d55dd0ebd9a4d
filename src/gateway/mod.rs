//! The gateway side of the wire contract (wire.md, gateway.md §1–4): tenant
//! identity from certificates, the agent registry, integration sources and
//! their assignment, ingestion.
//!
//! - [`config`]: the gateway's JSON config file.
//! - [`identity`]: the names in a client certificate; [`tenancy`]: which
//!   tenant they mean (reserved slugs, per-tenant CAs, the platform tenant).
//! - [`registry`]: agents that said Hello, online/offline, sync-capable.
//! - [`integrations`]: integration sources (checks, rendering);
//!   [`secrets`]: their credentials, sealed at rest; `assignments`: what
//!   each agent runs and where run status comes back.
//! - [`admin`]: tenant/agent/source administration for the CLI and the HTTP
//!   admin API, and onboarding bundles.
//! - [`validate`]: the StreamStatus rules of wire.md §7 as pure functions;
//!   [`ingest`]: `results` payloads into per-run chunk parts.
//! - The SQLite database: [`store`].
//! - `server`, `control`, `config_payload`, `listener`, `sink`: the tonic
//!   service, the ControlStream registry, `config_json` rendering, the TLS
//!   acceptor and where accepted chunks go.

pub mod admin;
mod assignments;
pub mod cli;
pub mod config;
mod config_payload;
mod control;
pub mod dire;
pub mod identity;
pub mod ingest;
pub mod integrations;
mod listener;
pub mod registry;
pub mod secrets;
mod server;
mod sink;
pub mod store;
pub mod tenancy;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

pub use cli::run_from_file;
pub use config::{AgentSources, GatewayConfig};
pub use identity::{IdentityError, IdentityKind, PeerIdentity};
pub use store::{DatabaseLocation, DeviceRow, PostgresUrl, RunRow, Store, StoreError};

use crate::proto::agent_gateway_service_server::AgentGatewayServiceServer;

/// How often the gateway looks for administrative changes made by another
/// process (the CLI writes the database directly). Changes made through this
/// process's own API are picked up at once.
const ADMIN_WATCH_INTERVAL: Duration = Duration::from_secs(2);
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
    #[error(transparent)]
    Secrets(#[from] secrets::SecretsError),
    #[error(transparent)]
    Tenancy(#[from] tenancy::TenancyError),
    #[error(
        "the credentials key ({origin}) is not the key this database's credentials were sealed with ({path})"
    )]
    WrongCredentialsKey { origin: String, path: String },
    #[error("no tenant {0:?}")]
    UnknownTenant(String),
    /// The admin API is configured but cannot start (no token, no database).
    #[error(transparent)]
    AdminApi(#[from] admin::http::AdminApiError),
}

/// What happened inside the gateway; see [`GatewayHandle::subscribe`].
#[derive(Clone, Debug)]
pub enum GatewayEvent {
    Hello {
        /// Tenant slug.
        tenant: String,
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
    pub assignments: assignments::Assignments,
    pub tenants: tenancy::Tenants,
    pub controls: control::ControlRegistry,
    /// Signalled by administrative changes in this process.
    pub admin_changed: Arc<Notify>,
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

/// Opens the database (on a blocking thread: both clients block).
pub async fn open_store(location: &DatabaseLocation) -> Result<Store, StoreError> {
    let location = location.clone();
    let store = tokio::task::spawn_blocking(move || Store::open_location(&location))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    tracing::info!(database = %store.location(), "database open");
    Ok(store)
}

/// Loads the credentials key and checks it against the one the database's
/// credentials were sealed with (a check value sealed on first use): a wrong
/// key fails here, at start, not at the first GetConfig.
pub async fn load_credentials_key(
    config: &GatewayConfig,
    store: &Store,
) -> Result<Arc<secrets::CredentialKey>, GatewayError> {
    const CHECK_KEY: &str = "credentials_key_check";
    const CHECK_CONTEXT: &[u8] = b"serviceradar gateway credentials key check";
    let key = secrets::CredentialKey::load(&config.credentials_key)?;
    let fresh = hex::encode(key.seal(CHECK_CONTEXT, CHECK_CONTEXT)?);
    let stored = store.meta_init(CHECK_KEY, &fresh).await?;
    let opens = hex::decode(&stored)
        .ok()
        .and_then(|sealed| key.open(&sealed, CHECK_CONTEXT).ok())
        .is_some();
    if !opens {
        return Err(GatewayError::WrongCredentialsKey {
            origin: key.origin().to_string(),
            path: store.location().to_string(),
        });
    }
    Ok(Arc::new(key))
}

/// The administrative operations over the database named in `config` (the
/// CLI's entry point; the running gateway builds its own).
pub async fn open_admin(config: &GatewayConfig) -> Result<Option<admin::Admin>, GatewayError> {
    let Some(path) = &config.database else {
        return Ok(None);
    };
    let store = open_store(path).await?;
    let key = load_credentials_key(config, &store).await?;
    // First start creates the platform and default tenants.
    tenancy::Tenants::bootstrap(config.tenancy.clone(), Some(store.clone())).await?;
    Ok(Some(admin::Admin::new(store, key, config.tenancy.clone())))
}

/// Binds the listener, spawns the server and returns once it is listening.
pub async fn start(config: GatewayConfig) -> Result<GatewayHandle, GatewayError> {
    let tls = crate::tls::server_config(&config.tls, config.allow_tls12)?;
    let (sink, database) = match &config.database {
        Some(path) => {
            let store = open_store(path).await?;
            let key = load_credentials_key(&config, &store).await?;
            tracing::info!(origin = %key.origin(), "credentials key loaded");
            (sink::Sink::Store(store.clone()), Some((store, key)))
        }
        None => (sink::Sink::memory(), None),
    };
    let tenants = tenancy::Tenants::bootstrap(config.tenancy.clone(), sink.store()).await?;
    let default_tenant = tenants
        .default_tenant()
        .ok_or_else(|| GatewayError::UnknownTenant(config.tenancy.default_tenant.clone()))?;
    let admin_changed = Arc::new(Notify::new());
    let admin = database.as_ref().map(|(store, key)| {
        admin::Admin::new(store.clone(), key.clone(), config.tenancy.clone())
            .with_change_signal(admin_changed.clone())
    });
    // Bound before anything is spawned, so that a bad admin setup fails
    // `start` without leaving tasks behind.
    let admin_api = match &config.admin {
        Some(settings) => Some(
            admin::http::AdminApi::bind(
                settings,
                admin.clone(),
                admin::OnboardingSettings::from_config(&config),
            )
            .await?,
        ),
        None => None,
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
        assignments: assignments::Assignments::new(
            config_payload::FileSources::new(config.agents),
            database,
            default_tenant.id.clone(),
        ),
        tenants,
        controls: control::ControlRegistry::default(),
        admin_changed,
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
    let mut signal = shutdown_rx.clone();
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
    let watch_task = tokio::spawn(watch_admin_changes(shared.clone(), shutdown_rx.clone()));
    let admin_addr = admin_api.as_ref().map(admin::http::AdminApi::local_addr);
    let admin_task = admin_api.map(|api| api.spawn(shutdown_rx.clone()));
    tracing::info!(addr = %local_addr, gateway_id = %shared.gateway_id, "gateway listening");
    Ok(GatewayHandle {
        local_addr,
        shared,
        admin,
        shutdown_tx,
        serve_task: Some(serve_task),
        accept_task: Some(accept_task),
        watch_task: Some(watch_task),
        admin_addr,
        admin_task,
    })
}

/// Applies administrative changes to connected agents: on a signal from this
/// process, or when the database's administrative generation moved (the CLI
/// in another process), reloads tenants and pushes every connected agent's
/// config whose version changed.
async fn watch_admin_changes(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let store = shared.sink.store();
    let generation = |store: Option<Store>| async move {
        match store {
            Some(store) => store.admin_generation().await.ok(),
            None => None,
        }
    };
    let mut seen = generation(store.clone()).await;
    loop {
        let signalled = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = shared.admin_changed.notified() => true,
            () = tokio::time::sleep(ADMIN_WATCH_INTERVAL) => false,
        };
        let now = generation(store.clone()).await;
        if !signalled && now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = shared.tenants.reload().await {
            tracing::warn!("cannot reload tenants: {e}");
        }
        server::push_changed_configs(&shared).await;
    }
}

/// A running gateway. Dropping it stops accepting connections; [`shutdown`]
/// also waits for the server task to end.
///
/// [`shutdown`]: GatewayHandle::shutdown
pub struct GatewayHandle {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    admin: Option<admin::Admin>,
    shutdown_tx: watch::Sender<bool>,
    serve_task: Option<JoinHandle<()>>,
    accept_task: Option<JoinHandle<()>>,
    watch_task: Option<JoinHandle<()>>,
    /// The HTTP admin API, when configured.
    admin_addr: Option<SocketAddr>,
    admin_task: Option<JoinHandle<()>>,
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

    /// Replaces the config-file sources pinned to an agent of the default
    /// tenant (a new config version); the new config is pushed to the
    /// agent's ControlStream, if one is open, right after.
    pub fn set_agent_sources(
        &self,
        agent_id: &str,
        sources: serde_json::Map<String, serde_json::Value>,
    ) {
        self.shared
            .assignments
            .file_sources()
            .set(agent_id, sources);
        self.shared.admin_changed.notify_one();
    }

    /// Sends a command over the ControlStream of an agent of the default
    /// tenant; returns the command id.
    pub fn send_command(
        &self,
        agent_id: &str,
        command_type: &str,
        payload_json: serde_json::Value,
    ) -> Result<String, GatewayError> {
        let key = control::AgentKey::new(self.shared.assignments.default_tenant(), agent_id);
        control::send_command(&self.shared.controls, &key, command_type, &payload_json)
    }

    /// Sends a command to an agent of the tenant with slug `tenant`.
    pub async fn send_command_in(
        &self,
        tenant: &str,
        agent_id: &str,
        command_type: &str,
        payload_json: serde_json::Value,
    ) -> Result<String, GatewayError> {
        let tenant = self
            .shared
            .tenants
            .by_slug(tenant)
            .await
            .ok_or_else(|| GatewayError::UnknownTenant(tenant.to_owned()))?;
        let key = control::AgentKey::new(&tenant.id, agent_id);
        control::send_command(&self.shared.controls, &key, command_type, &payload_json)
    }

    /// Where the HTTP admin API listens; `None` when it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Tenant, agent and source administration; `None` without a database.
    pub fn admin(&self) -> Option<admin::Admin> {
        self.admin.clone()
    }

    /// The gateway's tenants (platform first).
    pub fn tenants(&self) -> Vec<tenancy::Tenant> {
        self.shared.tenants.list()
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
        if let Some(task) = self.watch_task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.admin_task.take() {
            admin::http::join(task).await;
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
