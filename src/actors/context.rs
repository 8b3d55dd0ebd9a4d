//! State shared by every actor of one agent, which outlives any child restart.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actix::Addr;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::config::ConfigActor;
use super::gateway_connection::GatewayConnection;
use super::integration::Integration;
use super::supervisor::Supervisor;
use super::telemetry::Telemetry;
use crate::config::bootstrap::Bootstrap;
use crate::proto::agent_gateway_service_client::AgentGatewayServiceClient;
use crate::upload::Spool;

/// An enrolled gateway connection: a tonic client (cheap to clone; it shares
/// one HTTP/2 connection) and the gateway id from Hello.
#[derive(Clone, Debug)]
pub struct GatewaySession {
    pub client: AgentGatewayServiceClient<Channel>,
    pub gateway_id: String,
}

/// Who and where this agent is, as reported in Hello and every chunk.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub source_ip: String,
}

impl HostInfo {
    pub fn detect(host_ip: Option<IpAddr>) -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Self {
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            os: std::env::consts::OS.to_owned(),
            arch: arch.to_owned(),
            source_ip: host_ip
                .map(|ip| ip.to_string())
                .unwrap_or_else(detect_source_ip),
        }
    }
}

/// The address the kernel would use to leave this host (no packet is sent:
/// connecting a UDP socket only selects a route). Empty when there is none.
fn detect_source_ip() -> String {
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

/// The gateway id a previous process kept, if any.
fn read_last_gateway_id(path: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty() && id.len() <= 255 && !id.contains(char::is_control))
}

/// The source runs going on, by source name. A run outlives a crash of its
/// integration actor (see `integration`): the next incarnation looks here
/// before it starts one.
#[derive(Default)]
pub struct RunsInProgress {
    runs: Mutex<BTreeMap<String, (String, Arc<AtomicBool>)>>,
}

impl RunsInProgress {
    /// Registers run `run_id` of `source`; false if one is already going on.
    pub fn begin(&self, source: &str, run_id: &str, cancel: Arc<AtomicBool>) -> bool {
        let Ok(mut runs) = self.runs.lock() else {
            return false;
        };
        if runs.contains_key(source) {
            return false;
        }
        runs.insert(source.to_owned(), (run_id.to_owned(), cancel));
        true
    }

    /// Run `run_id` of `source` is over (reported, and spooled if complete).
    pub fn end(&self, source: &str, run_id: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            if runs.get(source).is_some_and(|(id, _)| id == run_id) {
                runs.remove(source);
            }
        }
    }

    pub fn in_progress(&self, source: &str) -> bool {
        self.runs.lock().is_ok_and(|runs| runs.contains_key(source))
    }

    /// Asks the run of `source`, if any, to stop (it ends as cancelled).
    pub fn cancel(&self, source: &str) {
        if let Ok(runs) = self.runs.lock() {
            if let Some((_, cancel)) = runs.get(source) {
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Current addresses of the actors, replaced by the supervisor on every
/// (re)start, so that nobody keeps talking to a dead incarnation.
#[derive(Default)]
pub struct Peers {
    inner: Mutex<PeerAddrs>,
}

#[derive(Default)]
struct PeerAddrs {
    supervisor: Option<Addr<Supervisor>>,
    gateway: Option<Addr<GatewayConnection>>,
    config: Option<Addr<ConfigActor>>,
    integrations: BTreeMap<String, Addr<Integration>>,
}

macro_rules! peer_accessors {
    ($($get:ident, $set:ident, $field:ident: $ty:ty;)*) => {$(
        pub fn $get(&self) -> Option<Addr<$ty>> {
            self.inner.lock().ok().and_then(|p| p.$field.clone())
        }
        pub fn $set(&self, addr: Option<Addr<$ty>>) {
            if let Ok(mut p) = self.inner.lock() {
                p.$field = addr;
            }
        }
    )*};
}

impl Peers {
    peer_accessors! {
        supervisor, set_supervisor, supervisor: Supervisor;
        gateway, set_gateway, gateway: GatewayConnection;
        config, set_config, config: ConfigActor;
    }

    pub fn integration(&self, name: &str) -> Option<Addr<Integration>> {
        self.inner
            .lock()
            .ok()
            .and_then(|p| p.integrations.get(name).cloned())
    }

    pub fn set_integration(&self, name: &str, addr: Option<Addr<Integration>>) {
        if let Ok(mut p) = self.inner.lock() {
            match addr {
                Some(a) => {
                    p.integrations.insert(name.to_owned(), a);
                }
                None => {
                    p.integrations.remove(name);
                }
            }
        }
    }
}

/// Everything an actor needs besides its own state.
pub struct AgentContext {
    pub bootstrap: Bootstrap,
    pub host: HostInfo,
    /// `Some` while enrolled with the gateway. Actors that need the gateway
    /// wait on this instead of polling.
    pub session: watch::Sender<Option<GatewaySession>>,
    pub peers: Peers,
    pub telemetry: Telemetry,
    /// The config version last applied (sent in Hello and GetConfig).
    pub applied_config_version: Mutex<String>,
    /// The gateway id of the last session, kept through outages.
    last_gateway_id: Mutex<Option<String>>,
    /// Runs waiting for delivery and reports waiting to be pushed: the
    /// uploader's whole state, so that it survives the uploader.
    pub spool: Arc<Spool>,
    /// Source runs going on, whichever actor incarnation started them.
    pub runs: RunsInProgress,
}

impl AgentContext {
    pub fn new(bootstrap: Bootstrap, spool: Arc<Spool>) -> Arc<Self> {
        let host = HostInfo::detect(bootstrap.host_ip);
        let last_gateway_id = read_last_gateway_id(&Self::last_gateway_id_path(&bootstrap));
        Arc::new(Self {
            bootstrap,
            host,
            session: watch::channel(None).0,
            peers: Peers::default(),
            telemetry: Telemetry::default(),
            applied_config_version: Mutex::default(),
            last_gateway_id: Mutex::new(last_gateway_id),
            spool,
            runs: RunsInProgress::default(),
        })
    }

    /// Where the gateway id of the last session is kept: runs staged while
    /// the gateway is away, even right after a restart, carry it.
    fn last_gateway_id_path(bootstrap: &Bootstrap) -> PathBuf {
        bootstrap.state_dir.join("last-gateway-id")
    }

    /// Where the spool lives, and runs are staged before they enter it.
    pub fn spool_dir(bootstrap: &Bootstrap) -> PathBuf {
        bootstrap.state_dir.join("runs")
    }

    /// Where runs are staged before upload.
    pub fn staging_dir(&self) -> PathBuf {
        self.spool.dir().to_owned()
    }

    /// Where the last good config is cached.
    pub fn config_cache_path(&self) -> PathBuf {
        self.bootstrap.state_dir.join("last-config.json")
    }

    /// Waits until the agent is enrolled and returns the session.
    pub async fn wait_for_session(&self) -> GatewaySession {
        let mut rx = self.session.subscribe();
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                return s;
            }
            // The sender lives as long as `self`; a closed channel cannot
            // happen while we hold `&self`, but never spin if it does.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Publishes a new session (the connection actor, after Hello).
    pub fn set_session(&self, session: GatewaySession) {
        if let Ok(mut last) = self.last_gateway_id.lock() {
            if last.as_deref() != Some(session.gateway_id.as_str()) {
                // A few bytes, once per gateway change.
                let path = Self::last_gateway_id_path(&self.bootstrap);
                if let Err(e) = std::fs::write(&path, &session.gateway_id) {
                    tracing::warn!(path = %path.display(), "cannot keep the gateway id: {e}");
                }
                *last = Some(session.gateway_id.clone());
            }
        }
        self.session.send_replace(Some(session));
    }

    /// The gateway id to write into updates: the current session's, else
    /// the last one seen, so that a run during an outage is staged and
    /// spooled rather than waiting; only before the first Hello of the
    /// process does this wait for a session.
    pub async fn gateway_id(&self) -> String {
        if let Some(session) = self.current_session() {
            return session.gateway_id;
        }
        let last = self.last_gateway_id.lock().ok().and_then(|l| l.clone());
        match last {
            Some(id) => id,
            None => self.wait_for_session().await.gateway_id,
        }
    }

    /// The current session, if enrolled.
    pub fn current_session(&self) -> Option<GatewaySession> {
        self.session.borrow().clone()
    }

    /// The identity fields this agent stamps on every chunk and status.
    pub fn envelope(&self, session: &GatewaySession) -> crate::upload::envelope::EnvelopeFields {
        crate::upload::envelope::EnvelopeFields {
            agent_id: self.bootstrap.agent_id.clone(),
            gateway_id: session.gateway_id.clone(),
            partition: self.bootstrap.partition.clone(),
            source_ip: self.host.source_ip.clone(),
            version: crate::VERSION.to_owned(),
            hostname: self.host.hostname.clone(),
            os: self.host.os.clone(),
            arch: self.host.arch.clone(),
        }
    }

    /// A spooled run was dropped whole: say so loudly and count it (its
    /// failed report is already queued by the spool).
    pub fn run_dropped(&self, run: crate::upload::spool::DroppedRun) {
        tracing::error!(source = %run.source, run_id = %run.run_id, devices = run.devices,
            bytes = run.bytes, "spooled run dropped: {}", run.reason);
        self.telemetry.count_dropped_run();
        self.telemetry
            .emit(super::telemetry::AgentEvent::RunDropped {
                source: run.source,
                run_id: run.run_id,
                devices: run.devices,
                reason: run.reason,
            });
    }

    /// Tells the connection actor that an RPC failed (it decides what to do).
    pub fn report_rpc_failure(&self, rpc: &'static str, status: &tonic::Status) {
        if let Some(gw) = self.peers.gateway() {
            gw.do_send(crate::messages::RpcFailed {
                rpc,
                code: status.code(),
            });
        }
    }
}

impl AgentContext {
    pub fn applied_config_version(&self) -> String {
        self.applied_config_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    pub fn set_applied_config_version(&self, version: &str) {
        if let Ok(mut v) = self.applied_config_version.lock() {
            *v = version.to_owned();
        }
    }
}
