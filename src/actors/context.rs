//! State shared by every actor of one agent, which outlives any child restart.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use actix::Addr;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::config::ConfigActor;
use super::gateway_connection::GatewayConnection;
use super::integration::Integration;
use super::supervisor::Supervisor;
use super::telemetry::Telemetry;
use super::uploader::ChunkUploader;
use crate::config::bootstrap::Bootstrap;
use crate::proto::agent_gateway_service_client::AgentGatewayServiceClient;

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
    uploader: Option<Addr<ChunkUploader>>,
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
        uploader, set_uploader, uploader: ChunkUploader;
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
}

impl AgentContext {
    pub fn new(bootstrap: Bootstrap) -> Arc<Self> {
        let host = HostInfo::detect(bootstrap.host_ip);
        Arc::new(Self {
            bootstrap,
            host,
            session: watch::channel(None).0,
            peers: Peers::default(),
            telemetry: Telemetry::default(),
            applied_config_version: Mutex::default(),
        })
    }

    /// Where runs are staged before upload.
    pub fn staging_dir(&self) -> PathBuf {
        self.bootstrap.state_dir.join("runs")
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
