//! The config actor: fetches `config_json` from the gateway (GetConfig at
//! start and every `config_poll_interval_sec`, plus configs pushed on the
//! ControlStream), decides which sources should run, and hands that desired
//! set to the supervisor, which starts, restarts and stops integration actors
//! by per-source hash (see `Supervisor::reconcile`).
//!
//! Rules from wire.md §2/§4: `not_modified` changes nothing; a `v0-…`
//! placeholder with an empty payload is a transient gateway error and keeps
//! the current sources; an unparseable payload keeps the current sources and
//! is retried (its version is not recorded as applied). The last good config
//! is cached on disk and used at start when the gateway is unreachable.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::context::{AgentContext, GatewaySession};
use super::gateway_connection::{clamp_heartbeat, hello_request};
use super::supervisor::ChildGuard;
use super::telemetry::AgentEvent;
use crate::clock::unix_secs;
use crate::config::sources::{parse_config_json, SyncConfig};
use crate::messages::{FetchConfigNow, ReconcileSources, RunNow, SetHeartbeatInterval};
use crate::proto::control_stream_request::Payload as Up;
use crate::proto::control_stream_response::Payload as Down;
use crate::proto::{
    AgentConfigRequest, AgentConfigResponse, CommandAck, CommandRequest, CommandResult, ConfigAck,
    ControlStreamHello, ControlStreamRequest,
};

const DEFAULT_POLL: Duration = Duration::from_secs(300);
/// Retry delay after a failed GetConfig or a rejected payload.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// Config poll interval clamped to [30 s, 24 h] (wire.md §2).
pub fn clamp_poll(secs: i32) -> Duration {
    Duration::from_secs(secs.clamp(30, 86_400) as u64)
}

/// What happened to one config answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The config is in force (newly applied, or it already was).
    Applied {
        version: String,
    },
    NotModified,
    /// A `v0-` placeholder: the gateway had an error; current config kept.
    Placeholder,
    /// Unparseable payload: current config kept, will be retried.
    Rejected {
        reason: String,
    },
}

/// What to do with one config answer, decided without side effects.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigDecision {
    NotModified,
    /// The same version is already applied (e.g. pushed again on the
    /// ControlStream after GetConfig delivered it): acknowledge, change nothing.
    AlreadyApplied,
    Placeholder,
    Rejected(String),
    Apply(SyncConfig),
}

/// Decides what a config answer means, given the version applied now.
pub fn decide(resp: &AgentConfigResponse, applied_version: &str) -> ConfigDecision {
    if resp.not_modified {
        return ConfigDecision::NotModified;
    }
    if resp.config_version.starts_with("v0-") && resp.config_json.is_empty() {
        return ConfigDecision::Placeholder;
    }
    if !resp.config_version.is_empty() && resp.config_version == applied_version {
        return ConfigDecision::AlreadyApplied;
    }
    match parse_config_json(&resp.config_json) {
        Ok(parsed) => ConfigDecision::Apply(parsed),
        Err(e) => ConfigDecision::Rejected(e.to_string()),
    }
}

/// The on-disk cache of the last applied config. It holds credentials, so it
/// is written with mode 0600.
#[derive(Serialize, Deserialize)]
struct CachedConfig {
    config_version: String,
    config_json: serde_json::Value,
}

pub struct ConfigActor {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    poll_every: Duration,
    next_poll: Option<SpawnHandle>,
    fetching: bool,
}

impl ConfigActor {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard) -> Self {
        Self {
            agent,
            guard,
            poll_every: DEFAULT_POLL,
            next_poll: None,
            fetching: false,
        }
    }

    /// Applies one AgentConfigResponse (from GetConfig or a push).
    fn apply(&mut self, resp: &AgentConfigResponse) -> ApplyOutcome {
        if resp.heartbeat_interval_sec > 0 {
            if let Some(gw) = self.agent.peers.gateway() {
                gw.do_send(SetHeartbeatInterval(clamp_heartbeat(
                    resp.heartbeat_interval_sec,
                )));
            }
        }
        if resp.config_poll_interval_sec > 0 {
            self.poll_every = clamp_poll(resp.config_poll_interval_sec);
        }
        let parsed = match decide(resp, &self.agent.applied_config_version()) {
            ConfigDecision::NotModified => return ApplyOutcome::NotModified,
            ConfigDecision::AlreadyApplied => {
                return ApplyOutcome::Applied {
                    version: resp.config_version.clone(),
                }
            }
            ConfigDecision::Placeholder => {
                tracing::warn!(version = %resp.config_version, "gateway answered a config placeholder (transient server error); keeping the current sources");
                return ApplyOutcome::Placeholder;
            }
            ConfigDecision::Apply(parsed) => parsed,
            ConfigDecision::Rejected(reason) => {
                tracing::error!(version = %resp.config_version, "config rejected, keeping the current sources and retrying: {reason}");
                self.agent.telemetry.emit(AgentEvent::ConfigRejected {
                    version: resp.config_version.clone(),
                    reason: reason.clone(),
                });
                return ApplyOutcome::Rejected { reason };
            }
        };
        self.reconcile(parsed);
        self.agent.set_applied_config_version(&resp.config_version);
        if let Err(e) = write_cache(
            &self.agent.config_cache_path(),
            &resp.config_version,
            &resp.config_json,
        ) {
            tracing::warn!(
                "cannot cache the config at {}: {e}",
                self.agent.config_cache_path().display()
            );
        }
        ApplyOutcome::Applied {
            version: resp.config_version.clone(),
        }
    }

    fn reconcile(&self, mut config: SyncConfig) {
        if !self.agent.bootstrap.sync_runtime_enabled {
            tracing::info!("sync_runtime_enabled is false: no integration runs");
            config.sources.clear();
        }
        let sources = config.sources.len();
        if let Some(supervisor) = self.agent.peers.supervisor() {
            supervisor.do_send(ReconcileSources(config));
        }
        self.agent.telemetry.emit(AgentEvent::ConfigApplied {
            version: self.agent.applied_config_version(),
            sources,
        });
    }

    /// Uses the cached config until the gateway answers (first start only).
    fn load_cache(&mut self) {
        let path = self.agent.config_cache_path();
        if !self.agent.applied_config_version().is_empty() || !path.exists() {
            return;
        }
        let cached = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<CachedConfig>(&bytes).map_err(|e| e.to_string())
            });
        match cached {
            Ok(cached) => match parse_config_json(cached.config_json.to_string().as_bytes()) {
                Ok(parsed) => {
                    tracing::info!(version = %cached.config_version, "starting with the cached config until the gateway answers");
                    self.agent
                        .set_applied_config_version(&cached.config_version);
                    self.reconcile(parsed);
                }
                Err(e) => tracing::warn!("ignoring cached config {}: {e}", path.display()),
            },
            Err(e) => tracing::warn!("ignoring cached config {}: {e}", path.display()),
        }
    }

    fn fetch(&mut self, ctx: &mut Context<Self>) {
        if self.fetching {
            return;
        }
        self.fetching = true;
        if let Some(handle) = self.next_poll.take() {
            ctx.cancel_future(handle);
        }
        let agent = self.agent.clone();
        ctx.spawn(
            async move {
                let session = agent.wait_for_session().await;
                let mut client = session.client.clone();
                let mut req = tonic::Request::new(AgentConfigRequest {
                    agent_id: agent.bootstrap.agent_id.clone(),
                    config_version: agent.applied_config_version(),
                });
                req.set_timeout(agent.bootstrap.gateway.rpc_timeout);
                let result = client.get_config(req).await;
                if let Err(status) = &result {
                    agent.report_rpc_failure("GetConfig", status);
                }
                result.map(tonic::Response::into_inner)
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                act.fetching = false;
                let next = match result {
                    Ok(resp) => match act.apply(&resp) {
                        ApplyOutcome::Rejected { .. } => RETRY_AFTER_ERROR,
                        _ => act.poll_every,
                    },
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), "GetConfig failed: {}", status.message());
                        RETRY_AFTER_ERROR
                    }
                };
                act.next_poll = Some(ctx.run_later(next, |act, ctx| act.fetch(ctx)));
            }),
        );
    }

    /// Keeps a ControlStream open while enrolled; reopens it when it ends.
    fn run_control_stream(&mut self, ctx: &mut Context<Self>) {
        let agent = self.agent.clone();
        let me = ctx.address();
        ctx.spawn(
            async move {
                loop {
                    let session = agent.wait_for_session().await;
                    match control_stream(&agent, &session, &me).await {
                        Ok(()) => tracing::info!("control stream closed by the gateway; reopening"),
                        Err(status) => {
                            agent.report_rpc_failure("ControlStream", &status);
                            tracing::debug!(code = ?status.code(), "control stream ended: {}", status.message());
                        }
                    }
                    let pause = agent.bootstrap.gateway.reconnect_base
                        + Duration::from_millis(fastrand::u64(0..500));
                    tokio::time::sleep(pause).await;
                }
            }
            .into_actor(self),
        );
    }
}

/// One ControlStream session: hello first, then serve pushes and commands.
async fn control_stream(
    agent: &AgentContext,
    session: &GatewaySession,
    me: &Addr<ConfigActor>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel::<ControlStreamRequest>(16);
    let hello = hello_request(agent);
    let send = |payload: Up| {
        let tx = tx.clone();
        async move {
            let _ = tx
                .send(ControlStreamRequest {
                    payload: Some(payload),
                })
                .await;
        }
    };
    send(Up::Hello(ControlStreamHello {
        agent_id: hello.agent_id,
        partition: hello.partition,
        capabilities: hello.capabilities,
        config_version: hello.config_version,
        version: hello.version,
        hostname: hello.hostname,
        os: hello.os,
        arch: hello.arch,
        labels: hello.labels,
        config_source: hello.config_source,
    }))
    .await;
    let mut client = session.client.clone();
    let mut inbound = client
        .control_stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(msg) = inbound.next().await {
        match msg?.payload {
            Some(Down::Config(config)) => {
                let outcome = me.send(ApplyPushedConfig(config)).await.map_err(|e| {
                    tonic::Status::internal(format!("config actor unavailable: {e}"))
                })?;
                if let ApplyOutcome::Applied { version } = outcome {
                    send(Up::ConfigAck(ConfigAck {
                        config_version: version,
                        timestamp: unix_secs(),
                    }))
                    .await;
                }
            }
            Some(Down::Command(cmd)) => {
                send(Up::CommandAck(CommandAck {
                    command_id: cmd.command_id.clone(),
                    command_type: cmd.command_type.clone(),
                    timestamp: unix_secs(),
                    message: "received".into(),
                }))
                .await;
                let (success, message) = run_command(agent, &cmd).await;
                send(Up::CommandResult(CommandResult {
                    command_id: cmd.command_id,
                    command_type: cmd.command_type,
                    success,
                    message,
                    payload_json: Vec::new(),
                    timestamp: unix_secs(),
                }))
                .await;
            }
            None => {}
        }
    }
    Ok(())
}

/// Executes a gateway command; unknown commands fail (wire.md §2).
async fn run_command(agent: &AgentContext, cmd: &CommandRequest) -> (bool, String) {
    if cmd.ttl_seconds > 0 && cmd.created_at > 0 && cmd.created_at + cmd.ttl_seconds < unix_secs() {
        return (
            false,
            format!("command {} expired before it arrived", cmd.command_id),
        );
    }
    match cmd.command_type.as_str() {
        "sync.run_now" => {
            #[derive(Deserialize)]
            struct Payload {
                source: String,
            }
            let source = match serde_json::from_slice::<Payload>(&cmd.payload_json) {
                Ok(p) => p.source,
                Err(e) => {
                    return (
                        false,
                        format!("sync.run_now payload must be {{\"source\": \"<name>\"}}: {e}"),
                    )
                }
            };
            let Some(integration) = agent.peers.integration(&source) else {
                return (false, format!("no running source named {source:?}"));
            };
            match integration.send(RunNow).await {
                Ok(Ok(())) => (true, format!("run of {source:?} started")),
                Ok(Err(why)) => (false, why),
                Err(e) => (false, format!("source {source:?} is restarting: {e}")),
            }
        }
        other => (false, format!("unknown command type {other:?}")),
    }
}

fn write_cache(path: &Path, version: &str, config_json: &[u8]) -> std::io::Result<()> {
    let cached = CachedConfig {
        config_version: version.to_owned(),
        config_json: if config_json.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(config_json)?
        },
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&tmp)?;
        serde_json::to_writer(&file, &cached)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// A config pushed on the ControlStream, applied like a GetConfig answer.
#[derive(Message)]
#[rtype(result = "ApplyOutcome")]
struct ApplyPushedConfig(AgentConfigResponse);

impl Actor for ConfigActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.load_cache();
        self.fetch(ctx);
        self.run_control_stream(ctx);
    }
}

impl Handler<ApplyPushedConfig> for ConfigActor {
    type Result = MessageResult<ApplyPushedConfig>;

    fn handle(&mut self, msg: ApplyPushedConfig, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.apply(&msg.0))
    }
}

impl Handler<FetchConfigNow> for ConfigActor {
    type Result = ();

    fn handle(&mut self, _: FetchConfigNow, ctx: &mut Self::Context) {
        self.fetch(ctx);
    }
}

crate::supervised_child!(ConfigActor);

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(version: &str, json: &str) -> AgentConfigResponse {
        AgentConfigResponse {
            config_version: version.into(),
            config_json: json.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn not_modified_wins() {
        let mut r = resp("v1", "garbage");
        r.not_modified = true;
        assert_eq!(decide(&r, "v1"), ConfigDecision::NotModified);
    }

    #[test]
    fn v0_placeholder_keeps_current_config() {
        assert_eq!(
            decide(&resp("v0-error", ""), "vabc"),
            ConfigDecision::Placeholder
        );
        assert_eq!(
            decide(&resp("v0-unavailable", ""), ""),
            ConfigDecision::Placeholder
        );
        // A v0- version that does carry a payload is a real config.
        assert!(matches!(
            decide(&resp("v0-x", r#"{"sources":{}}"#), ""),
            ConfigDecision::Apply(_)
        ));
    }

    #[test]
    fn unparseable_payload_is_rejected_not_applied() {
        match decide(&resp("v2", "{not json"), "v1") {
            ConfigDecision::Rejected(reason) => {
                assert!(reason.contains("not valid JSON"), "{reason}")
            }
            other => panic!("expected rejection, got {other:?}"),
        }
        assert!(matches!(
            decide(&resp("v2", "[]"), "v1"),
            ConfigDecision::Rejected(_)
        ));
    }

    #[test]
    fn same_version_is_not_reapplied() {
        assert_eq!(
            decide(&resp("v1", r#"{"sources":{}}"#), "v1"),
            ConfigDecision::AlreadyApplied
        );
        match decide(&resp("v2", r#"{"sources":{"f":{"type":"faker"}}}"#), "v1") {
            ConfigDecision::Apply(c) => assert_eq!(c.sources.len(), 1),
            other => panic!("expected apply, got {other:?}"),
        }
    }

    #[test]
    fn intervals_are_clamped() {
        assert_eq!(clamp_poll(1), Duration::from_secs(30));
        assert_eq!(clamp_poll(999_999), Duration::from_secs(86_400));
        assert_eq!(clamp_heartbeat(0), Duration::from_secs(1));
        assert_eq!(clamp_heartbeat(7200), Duration::from_secs(3600));
    }
}
