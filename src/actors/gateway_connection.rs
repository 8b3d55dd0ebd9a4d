//! The gateway connection: dials the agent-gateway over mTLS, says Hello on
//! every (re)connect, keeps the gateway id, heartbeats with PushStatus and
//! reconnects with jittered exponential backoff.
//!
//! The enrolled session is published on [`AgentContext::session`]; other
//! actors run their own RPCs on it. When one of them fails it tells us
//! ([`RpcFailed`]); we probe with a heartbeat before declaring the connection
//! lost, so one failed RPC never tears down a healthy connection (the Go agent
//! reconnects on any error).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use backon::BackoffBuilder;
use tonic::transport::Endpoint;

use super::context::{AgentContext, GatewaySession};
use super::supervisor::ChildGuard;
use super::telemetry::AgentEvent;
use crate::clock::unix_nanos;
use crate::config::bootstrap::Security;
use crate::messages::{FetchConfigNow, RpcFailed, SetHeartbeatInterval};
use crate::proto::agent_gateway_service_client::AgentGatewayServiceClient;
use crate::proto::AgentHelloRequest;
use crate::tls::{self, MtlsConnector};

/// Largest message we accept from or send to the gateway (its limit is 15 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting,
    Connected,
    Disconnected,
}

pub struct GatewayConnection {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    link: Link,
    heartbeat_every: Duration,
    heartbeat_timer: Option<SpawnHandle>,
    heartbeat_in_flight: bool,
    /// Our TLS connector and how many connections it had made when we last
    /// said Hello: tonic re-dials under us after a drop, and every new
    /// transport must be enrolled again.
    connector: Option<MtlsConnector>,
    hello_at_connection: u64,
    backoff: backon::ExponentialBackoff,
}

impl GatewayConnection {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard) -> Self {
        let backoff = reconnect_backoff(&agent);
        Self {
            agent,
            guard,
            link: Link::Disconnected,
            heartbeat_every: DEFAULT_HEARTBEAT,
            heartbeat_timer: None,
            heartbeat_in_flight: false,
            connector: None,
            hello_at_connection: 0,
            backoff,
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.link != Link::Disconnected {
            return;
        }
        self.link = Link::Connecting;
        let agent = self.agent.clone();
        ctx.spawn(async move { establish(&agent).await }.into_actor(self).map(
            |result, act, ctx| match result {
                Ok(est) => act.on_connected(est, ctx),
                Err(reason) => {
                    act.link = Link::Disconnected;
                    act.on_lost(reason, ctx);
                }
            },
        ));
    }

    fn on_connected(&mut self, est: Established, ctx: &mut Context<Self>) {
        self.link = Link::Connected;
        self.backoff = reconnect_backoff(&self.agent);
        self.hello_at_connection = est
            .connector
            .as_ref()
            .map_or(0, MtlsConnector::connection_count);
        self.connector = est.connector;
        if let Some(interval) = est.heartbeat {
            self.heartbeat_every = interval;
        }
        tracing::info!(gateway_id = %est.session.gateway_id, addr = %self.agent.bootstrap.gateway_addr, "enrolled with gateway");
        self.agent.telemetry.emit(AgentEvent::GatewayConnected {
            gateway_id: est.session.gateway_id.clone(),
        });
        self.agent.set_session(est.session);
        self.start_heartbeat(ctx);
        if est.config_outdated {
            if let Some(config) = self.agent.peers.config() {
                config.do_send(FetchConfigNow);
            }
        }
    }

    /// The connection is gone (or never came up): unpublish the session and
    /// try again after a jittered backoff.
    fn on_lost(&mut self, reason: String, ctx: &mut Context<Self>) {
        if self.link == Link::Connected {
            self.link = Link::Disconnected;
        }
        if let Some(timer) = self.heartbeat_timer.take() {
            ctx.cancel_future(timer);
        }
        self.agent.session.send_replace(None);
        let delay = self
            .backoff
            .next()
            .unwrap_or(self.agent.bootstrap.gateway.reconnect_cap);
        tracing::warn!(addr = %self.agent.bootstrap.gateway_addr, retry_in = ?delay, "gateway unavailable: {reason}");
        self.agent
            .telemetry
            .emit(AgentEvent::GatewayDisconnected { reason });
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    fn start_heartbeat(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.heartbeat_timer.take() {
            ctx.cancel_future(timer);
        }
        self.heartbeat_timer =
            Some(ctx.run_interval(self.heartbeat_every, |act, ctx| act.heartbeat(ctx)));
    }

    /// One PushStatus; also the health probe after a failed RPC elsewhere.
    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.link != Link::Connected || self.heartbeat_in_flight {
            return;
        }
        let Some(session) = self.agent.current_session() else {
            return;
        };
        self.heartbeat_in_flight = true;
        let agent = self.agent.clone();
        let redialled = self
            .connector
            .as_ref()
            .is_some_and(|c| c.connection_count() != self.hello_at_connection);
        ctx.spawn(
            async move {
                if redialled {
                    // A new transport under the same channel: enrol again.
                    let mut client = session.client.clone();
                    let mut req = tonic::Request::new(hello_request(&agent));
                    req.set_timeout(agent.bootstrap.gateway.rpc_timeout);
                    client.hello(req).await.map(|_| true)
                } else {
                    push_heartbeat(&agent, &session).await.map(|_| false)
                }
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                act.heartbeat_in_flight = false;
                match result {
                    Ok(true) => {
                        act.hello_at_connection =
                            act.connector.as_ref().map_or(0, MtlsConnector::connection_count);
                        tracing::info!("re-enrolled with gateway after transport reconnect");
                    }
                    Ok(false) => {}
                    Err(status) if is_transport_failure(status.code()) => {
                        act.on_lost(format!("heartbeat failed: {}", status.message()), ctx);
                    }
                    Err(status) => tracing::warn!(code = ?status.code(), "heartbeat rejected: {}", status.message()),
                }
            }),
        );
    }
}

/// Status codes that say "the connection is broken", as opposed to "the
/// gateway answered and refused".
pub fn is_transport_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
    )
}

fn reconnect_backoff(agent: &AgentContext) -> backon::ExponentialBackoff {
    let policy = &agent.bootstrap.gateway;
    backon::ExponentialBuilder::new()
        .with_min_delay(policy.reconnect_base)
        .with_max_delay(policy.reconnect_cap)
        .with_jitter()
        .without_max_times()
        .build()
}

struct Established {
    session: GatewaySession,
    connector: Option<MtlsConnector>,
    heartbeat: Option<Duration>,
    config_outdated: bool,
}

/// What this agent says in Hello.
pub fn hello_request(agent: &AgentContext) -> AgentHelloRequest {
    let b = &agent.bootstrap;
    AgentHelloRequest {
        agent_id: b.agent_id.clone(),
        version: crate::VERSION.to_owned(),
        capabilities: vec!["sync".to_owned()],
        hostname: agent.host.hostname.clone(),
        os: agent.host.os.clone(),
        arch: agent.host.arch.clone(),
        partition: b.partition.clone(),
        config_version: agent.applied_config_version(),
        labels: b.labels.clone().into_iter().collect(),
        config_source: String::new(),
    }
}

async fn establish(agent: &AgentContext) -> Result<Established, String> {
    let b = &agent.bootstrap;
    let endpoint = Endpoint::from_shared(format!("http://{}", b.gateway_addr))
        .map_err(|e| format!("gateway_addr {:?}: {e}", b.gateway_addr))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let (channel, connector) = match &b.security {
        Security::Mtls { files, server_name } => {
            // Certificates are re-read on every connect, so rotated files are
            // picked up by the next connection.
            let config = tls::client_config(files).map_err(|e| e.to_string())?;
            let name = tls::server_name(server_name).map_err(|e| e.to_string())?;
            let connector = MtlsConnector::new(config, name);
            let channel = endpoint
                .connect_with_connector(connector.clone())
                .await
                .map_err(|e| describe_transport_error(&e))?;
            (channel, Some(connector))
        }
        Security::Plaintext => (
            endpoint
                .connect()
                .await
                .map_err(|e| describe_transport_error(&e))?,
            None,
        ),
    };
    let mut client = AgentGatewayServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(hello_request(agent));
    req.set_timeout(b.gateway.rpc_timeout);
    let hello = client
        .hello(req)
        .await
        .map_err(|s| format!("Hello failed ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    if !hello.accepted {
        return Err(format!("gateway refused enrolment: {}", hello.message));
    }
    let heartbeat =
        (hello.heartbeat_interval_sec > 0).then(|| clamp_heartbeat(hello.heartbeat_interval_sec));
    Ok(Established {
        session: GatewaySession {
            client,
            gateway_id: hello.gateway_id,
        },
        connector,
        heartbeat,
        config_outdated: hello.config_outdated,
    })
}

/// tonic's transport errors hide the cause (a TLS alert, a refused
/// connection) in the source chain: show the whole chain.
fn describe_transport_error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Heartbeat interval clamped to [1 s, 1 h] (wire.md §2).
pub fn clamp_heartbeat(secs: i32) -> Duration {
    Duration::from_secs(secs.clamp(1, 3600) as u64)
}

async fn push_heartbeat(
    agent: &AgentContext,
    session: &GatewaySession,
) -> Result<(), tonic::Status> {
    let mut client = session.client.clone();
    let mut req = tonic::Request::new(
        agent
            .envelope(session)
            .status_request(Vec::new(), unix_nanos()),
    );
    req.set_timeout(agent.bootstrap.gateway.rpc_timeout);
    client.push_status(req).await.map(|_| ())
}

impl Actor for GatewayConnection {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.agent.session.send_replace(None);
        self.connect(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.agent.session.send_replace(None);
    }
}

impl Handler<RpcFailed> for GatewayConnection {
    type Result = ();

    fn handle(&mut self, msg: RpcFailed, ctx: &mut Self::Context) {
        if is_transport_failure(msg.code) {
            tracing::debug!(rpc = msg.rpc, code = ?msg.code, "RPC failed; probing the connection");
            self.heartbeat(ctx);
        }
    }
}

impl Handler<SetHeartbeatInterval> for GatewayConnection {
    type Result = ();

    fn handle(&mut self, msg: SetHeartbeatInterval, ctx: &mut Self::Context) {
        if msg.0 != self.heartbeat_every {
            self.heartbeat_every = msg.0;
            if self.link == Link::Connected {
                self.start_heartbeat(ctx);
            }
        }
    }
}

crate::supervised_child!(GatewayConnection);
