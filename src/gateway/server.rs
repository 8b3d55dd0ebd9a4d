//! The `monitoring.AgentGatewayService` implementation. Every RPC first derives
//! the caller's identity from its client certificate; request fields never
//! decide who the caller is.

use crate::clock::unix_secs;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::assignments::report_status;
use super::config_payload::RenderedConfig;
use super::control::{AgentKey, Registration};
use super::identity::{identity_from_der, IdentityKind, PeerIdentity, AGENT_COMPONENT};
use super::ingest::{parse_results, UpdatePolicy};
use super::registry::AgentRecord;
use super::sink::StreamSession;
use super::store::{SourceRef, SourceStatusUpdate};
use super::tenancy::Tenant;
use super::validate::{self, StreamValidator, Violation, RESULTS_SOURCE};
use super::{GatewayEvent, Shared, StatsCounters};
use crate::proto::agent_gateway_service_server::AgentGatewayService;
use crate::proto::control_stream_request::Payload as ControlRequest;
use crate::proto::control_stream_response::Payload as ControlPush;
use crate::proto::{
    AgentConfigRequest, AgentConfigResponse, AgentHelloRequest, AgentHelloResponse,
    ControlStreamRequest, ControlStreamResponse, GatewayServiceStatus, GatewayStatusChunk,
    GatewayStatusRequest, GatewayStatusResponse,
};

/// `service_name` prefix of run reports (wire.md §6).
const RUN_REPORT_PREFIX: &str = "sync:";
const STATUS_SOURCE: &str = "status";
/// Config version answered when the gateway cannot build a config right now:
/// agents keep their current sources (wire.md §2).
const UNAVAILABLE_VERSION: &str = "v0-unavailable";

/// Who is calling: the certificate's identity and the tenant it means.
struct Caller {
    identity: PeerIdentity,
    tenant: Tenant,
}

impl Caller {
    fn key(&self) -> AgentKey {
        AgentKey::new(&self.tenant.id, &self.identity.component_id)
    }
    fn agent_id(&self) -> &str {
        &self.identity.component_id
    }
}

pub(crate) struct GatewayService {
    shared: Arc<Shared>,
}

impl GatewayService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The caller's identity and tenant: UNAUTHENTICATED without a usable
    /// certificate, PERMISSION_DENIED for a component that is not an agent or
    /// a tenant the certificate may not claim.
    async fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let identity =
            identity_from_der(leaf.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if identity.component_type != AGENT_COMPONENT {
            tracing::warn!(component_type = %identity.component_type, component_id = %identity.component_id,
                "non-agent identity called an agent RPC");
            return Err(Status::permission_denied(format!(
                "component type {:?} may not call agent RPCs",
                identity.component_type
            )));
        }
        let tenant = self.shared.tenants.resolve(&identity, &certs).await?;
        Ok(Caller { identity, tenant })
    }

    /// The caller's config, or the `v0-unavailable` placeholder when the
    /// database fails.
    async fn render(&self, key: &AgentKey) -> RenderedConfig {
        match self.shared.assignments.render(key).await {
            Ok(rendered) => rendered,
            Err(e) => {
                tracing::error!(agent_id = %key.agent_id, "cannot build agent config: {e}");
                RenderedConfig {
                    config_json: Vec::new(),
                    version: UNAVAILABLE_VERSION.to_owned(),
                    timestamp: unix_secs(),
                }
            }
        }
    }

    fn config_response(&self, rendered: RenderedConfig, not_modified: bool) -> AgentConfigResponse {
        AgentConfigResponse {
            not_modified,
            config_version: rendered.version,
            config_timestamp: rendered.timestamp,
            heartbeat_interval_sec: self.shared.heartbeat_interval_sec,
            config_poll_interval_sec: self.shared.config_poll_interval_sec,
            config_json: if not_modified {
                Vec::new()
            } else {
                rendered.config_json
            },
            ..Default::default()
        }
    }
}

/// Sync configuration belongs to tenants: a platform (SPIFFE) identity never
/// gets it, and the refusal is logged with who asked and for what
/// (gateway.md §1: sync never runs as a platform service).
fn refuse_platform_sync(identity: &PeerIdentity, operation: &str) -> Result<(), Status> {
    if let IdentityKind::Platform { trust_domain } = &identity.kind {
        tracing::warn!(component_id = %identity.component_id, partition = %identity.partition,
            %trust_domain, operation, "platform identity asked for tenant sync configuration: refused");
        return Err(Status::permission_denied(format!(
            "{operation}: a platform (SPIFFE) identity gets no tenant sync configuration; \
             agents that run integrations need a tenant certificate (CN <agent>.<partition>[.<tenant>].serviceradar)"
        )));
    }
    Ok(())
}

fn check_agent(identity: &PeerIdentity, claimed: &str) -> Result<(), Status> {
    validate::check_agent_id(claimed, &identity.component_id).map_err(|v| {
        tracing::warn!(certified = %identity.component_id, claimed, "agent_id rejected: {}", v.reason);
        v.to_status()
    })
}

/// Pushes every connected agent's config whose version differs from the one
/// its ControlStream has.
pub(crate) async fn push_changed_configs(shared: &Shared) {
    for (key, version) in shared.controls.connected() {
        let rendered = match shared.assignments.render(&key).await {
            Ok(rendered) => rendered,
            Err(e) => {
                tracing::warn!(agent_id = %key.agent_id, "config not pushed: {e}");
                continue;
            }
        };
        if rendered.version != version {
            push_config(shared, &key, &rendered);
        }
    }
}

/// Pushes a rendered config over the agent's ControlStream, if one is open.
pub(crate) fn push_config(shared: &Shared, key: &AgentKey, rendered: &RenderedConfig) {
    let agent_id = key.agent_id.as_str();
    if !shared.controls.is_connected(key) {
        return;
    }
    let config = AgentConfigResponse {
        config_version: rendered.version.clone(),
        config_timestamp: rendered.timestamp,
        heartbeat_interval_sec: shared.heartbeat_interval_sec,
        config_poll_interval_sec: shared.config_poll_interval_sec,
        config_json: rendered.config_json.clone(),
        ..Default::default()
    };
    match shared
        .controls
        .send_config(key, &rendered.version, ControlPush::Config(config))
    {
        Ok(true) => shared.emit(GatewayEvent::ConfigServed {
            agent_id: agent_id.to_owned(),
            version: rendered.version.clone(),
        }),
        Ok(false) => {}
        // The agent still gets the new version on its next GetConfig poll.
        Err(e) => tracing::warn!(agent_id, error = %e, "config push failed"),
    }
}

/// A stream's failure, with the agent when known.
struct Rejection {
    agent_id: Option<String>,
    code: Code,
    reason: String,
}

impl Rejection {
    fn new(agent_id: Option<&str>, code: Code, reason: impl Into<String>) -> Self {
        Self {
            agent_id: agent_id.map(str::to_owned),
            code,
            reason: reason.into(),
        }
    }
    fn violation(agent_id: &str, v: Violation) -> Self {
        Self::new(Some(agent_id), v.code, v.reason)
    }
}

/// Counts of one accepted stream.
struct StreamSummary {
    key: AgentKey,
    chunks: u32,
    accepted: u64,
    rejected: u64,
}

fn internal(agent_id: &str, e: super::StoreError) -> Rejection {
    tracing::error!(error = %e, "staging failed");
    Rejection::new(Some(agent_id), Code::Internal, "gateway storage error")
}

/// Reads, validates and stages every chunk of one stream. Returns the counts
/// of accepted and rejected updates.
async fn pump(
    mut stream: Streaming<GatewayStatusChunk>,
    agent_id: &str,
    policy: &UpdatePolicy,
    validator: &mut StreamValidator,
    session: &mut StreamSession,
) -> Result<(u64, u64), Rejection> {
    let (mut accepted, mut rejected) = (0u64, 0u64);
    loop {
        let mut chunk = match stream.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return Ok((accepted, rejected)),
            Err(status) => {
                return Err(Rejection::new(
                    Some(agent_id),
                    status.code(),
                    format!("stream aborted: {}", status.message()),
                ))
            }
        };
        validator
            .accept(&mut chunk)
            .map_err(|v| Rejection::violation(agent_id, v))?;
        for service in chunk.services.iter().filter(|s| s.source == RESULTS_SOURCE) {
            let parsed = parse_results(&service.message, policy, session.keeps_devices())
                .map_err(|v| Rejection::violation(agent_id, v))?;
            accepted += parsed.accepted();
            rejected += parsed.rejected();
            let dropped = session
                .stage(parsed.parts)
                .await
                .map_err(|e| internal(agent_id, e))?;
            accepted = accepted.saturating_sub(dropped);
            rejected += dropped;
        }
    }
}

impl GatewayService {
    async fn receive_stream(
        &self,
        request: Request<Streaming<GatewayStatusChunk>>,
    ) -> Result<StreamSummary, Rejection> {
        let caller = self
            .identify(&request)
            .await
            .map_err(|s| Rejection::new(None, s.code(), s.message()))?;
        // Sync never runs as a platform service, so its results are refused
        // like its configuration.
        refuse_platform_sync(&caller.identity, "StreamStatus")
            .map_err(|s| Rejection::new(Some(caller.agent_id()), s.code(), s.message()))?;
        let key = caller.key();
        let agent_id = key.agent_id.clone();
        let partitions = self
            .shared
            .assignments
            .source_partitions(&key)
            .await
            .map_err(|e| internal(&agent_id, e))?;
        let policy = UpdatePolicy::new(&caller.identity.partition, partitions);
        let mut validator = StreamValidator::new(&agent_id);
        let mut session = self.shared.sink.begin(&agent_id, &key.tenant);
        let (accepted, rejected) = match pump(
            request.into_inner(),
            &agent_id,
            &policy,
            &mut validator,
            &mut session,
        )
        .await
        {
            Ok(counts) => counts,
            Err(rejection) => {
                // Discard before answering, so a rejected stream has left
                // nothing behind by the time the agent sees the error.
                session.abort().await;
                return Err(rejection);
            }
        };
        let chunks = match validator.finish() {
            Ok(chunks) => chunks,
            Err(v) => {
                session.abort().await;
                return Err(Rejection::violation(&agent_id, v));
            }
        };
        // The stream is complete and valid: commit it, and record what it
        // completed, in a task of its own. If the agent goes away while
        // waiting for the answer, tonic drops this handler; the commit must
        // still finish and the run's status and events still follow (the
        // agent's retry is then a duplicate, which completes nothing).
        let shared = self.shared.clone();
        let committing = {
            let (key, agent_id) = (key.clone(), agent_id.clone());
            tokio::spawn(async move {
                let outcome = session.commit().await.map_err(|e| internal(&agent_id, e))?;

                let stats = &shared.stats;
                StatsCounters::add(&stats.runs_completed, outcome.completed.len() as u64);
                for chunk in &outcome.stored {
                    if let (0, Some(source)) = (chunk.chunk_index, &chunk.sync_service_id) {
                        let running = SourceStatusUpdate::Running {
                            run_id: chunk.run_id.clone(),
                        };
                        shared
                            .assignments
                            .record_status(&key, SourceRef::Id(source.clone()), running)
                            .await;
                    }
                }
                for run in &outcome.completed {
                    if let Some(source) = &run.sync_service_id {
                        let done = SourceStatusUpdate::Succeeded {
                            run_id: run.run_id.clone(),
                            devices: run.devices,
                        };
                        shared
                            .assignments
                            .record_status(&key, SourceRef::Id(source.clone()), done)
                            .await;
                    }
                }
                for chunk in outcome.stored {
                    shared.emit(GatewayEvent::ChunkStored {
                        agent_id: agent_id.clone(),
                        run_id: chunk.run_id,
                        chunk_index: chunk.chunk_index,
                        total_chunks: chunk.total_chunks,
                    });
                }
                for run in outcome.completed {
                    tracing::info!(agent_id = %agent_id, run_id = %run.run_id, devices = run.devices,
                    rejected = run.rejected, "run complete");
                    shared.emit(GatewayEvent::RunComplete {
                        agent_id: agent_id.clone(),
                        run_id: run.run_id,
                        devices: run.devices,
                        rejected: run.rejected,
                    });
                }
                Ok::<_, Rejection>(())
            })
        };
        committing.await.map_err(|e| {
            tracing::error!(error = %e, "stream commit task failed");
            Rejection::new(Some(&agent_id), Code::Internal, "gateway storage error")
        })??;
        Ok(StreamSummary {
            key,
            chunks,
            accepted,
            rejected,
        })
    }

    async fn record_run_report(&self, key: &AgentKey, service: &GatewayServiceStatus) {
        let agent_id = key.agent_id.as_str();
        let report: serde_json::Value = match serde_json::from_slice(&service.message) {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(agent_id, service = %service.service_name, error = %e, "unreadable run report");
                return;
            }
        };
        let text = |key: &str| {
            report
                .get(key)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let source = match text("source") {
            s if s.is_empty() => service.service_name[RUN_REPORT_PREFIX.len()..].to_owned(),
            s => s,
        };
        let error = Some(text("error")).filter(|e| !e.is_empty());
        if let Some(status) = report_status(&report, text("run_id")) {
            self.shared
                .assignments
                .record_status(key, SourceRef::Name(source.clone()), status)
                .await;
        }
        let event = GatewayEvent::RunReport {
            agent_id: agent_id.to_owned(),
            source,
            run_id: text("run_id"),
            result: text("result"),
            device_count: report
                .get("device_count")
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
            error,
            report,
        };
        tracing::info!(agent_id, ?event, "run report");
        self.shared.emit(event);
    }

    fn handle_control_message(&self, agent_id: &str, message: ControlStreamRequest) {
        match message.payload {
            Some(ControlRequest::ConfigAck(ack)) => self.shared.emit(GatewayEvent::ConfigAcked {
                agent_id: agent_id.to_owned(),
                version: ack.config_version,
            }),
            Some(ControlRequest::CommandResult(result)) => {
                self.shared.emit(GatewayEvent::CommandResult {
                    agent_id: agent_id.to_owned(),
                    command_id: result.command_id,
                    success: result.success,
                    message: result.message,
                })
            }
            Some(ControlRequest::CommandAck(ack)) => {
                tracing::debug!(agent_id, command_id = %ack.command_id, "command acknowledged")
            }
            Some(ControlRequest::CommandProgress(p)) => {
                tracing::debug!(agent_id, command_id = %p.command_id, percent = p.progress_percent, "command progress")
            }
            Some(ControlRequest::Hello(_)) => {
                tracing::debug!(agent_id, "repeated ControlStream hello ignored")
            }
            None => tracing::debug!(agent_id, "empty ControlStream message ignored"),
        }
    }
}

#[tonic::async_trait]
impl AgentGatewayService for GatewayService {
    async fn hello(
        &self,
        request: Request<AgentHelloRequest>,
    ) -> Result<Response<AgentHelloResponse>, Status> {
        let caller = self.identify(&request).await?;
        let hello = request.into_inner();
        let identity = &caller.identity;
        check_agent(identity, &hello.agent_id)?;
        let key = caller.key();
        // A platform identity gets no sync config, so it is never outdated.
        let config_outdated = match identity.kind {
            IdentityKind::Platform { .. } => false,
            _ => hello.config_version != self.render(&key).await.version,
        };
        if hello.partition.trim() != identity.partition && !hello.partition.trim().is_empty() {
            tracing::debug!(agent_id = %identity.component_id, claimed = %hello.partition,
                certified = %identity.partition, "Hello partition ignored: the certificate's applies");
        }
        tracing::info!(agent_id = %identity.component_id, tenant = %caller.tenant.slug,
            partition = %identity.partition, version = %hello.version, "agent hello");
        // Identity (tenant, id, partition) from the certificate; the rest is
        // what the agent says about itself.
        let now = unix_secs();
        self.shared
            .registry
            .hello(AgentRecord {
                tenant: caller.tenant.id.clone(),
                agent_id: identity.component_id.clone(),
                partition: identity.partition.clone(),
                version: hello.version.clone(),
                hostname: hello.hostname.clone(),
                os: hello.os.clone(),
                arch: hello.arch.clone(),
                capabilities: hello.capabilities.clone(),
                first_seen: now,
                last_seen: now,
            })
            .await;
        self.shared.emit(GatewayEvent::Hello {
            tenant: caller.tenant.slug.clone(),
            agent_id: identity.component_id.clone(),
            partition: identity.partition.clone(),
            capabilities: hello.capabilities,
        });
        Ok(Response::new(AgentHelloResponse {
            accepted: true,
            agent_id: identity.component_id.clone(),
            message: "agent enrolled".into(),
            gateway_id: self.shared.gateway_id.clone(),
            server_time: unix_secs(),
            heartbeat_interval_sec: self.shared.heartbeat_interval_sec,
            config_outdated,
        }))
    }

    async fn get_config(
        &self,
        request: Request<AgentConfigRequest>,
    ) -> Result<Response<AgentConfigResponse>, Status> {
        let caller = self.identify(&request).await?;
        let ask = request.into_inner();
        check_agent(&caller.identity, &ask.agent_id)?;
        refuse_platform_sync(&caller.identity, "GetConfig")?;
        let agent_id = caller.agent_id().to_owned();
        let rendered = self.render(&caller.key()).await;
        let not_modified = ask.config_version == rendered.version;
        if !not_modified {
            tracing::info!(agent_id = %agent_id, version = %rendered.version, "serving config");
            self.shared.emit(GatewayEvent::ConfigServed {
                agent_id: agent_id.clone(),
                version: rendered.version.clone(),
            });
        }
        Ok(Response::new(self.config_response(rendered, not_modified)))
    }

    async fn push_status(
        &self,
        request: Request<GatewayStatusRequest>,
    ) -> Result<Response<GatewayStatusResponse>, Status> {
        let caller = self.identify(&request).await?;
        let mut push = request.into_inner();
        check_agent(&caller.identity, &push.agent_id)?;
        let key = caller.key();
        let agent_id = key.agent_id.clone();
        if push.services.len() > validate::MAX_SERVICES_PER_STREAM {
            return Err(Status::resource_exhausted(format!(
                "too many services in one request (max {})",
                validate::MAX_SERVICES_PER_STREAM
            )));
        }
        // Like the reference gateway: an invalid service is dropped, not the
        // heartbeat; a request with only invalid services is an error.
        let total = push.services.len();
        let mut valid = 0;
        for service in &mut push.services {
            if let Err(v) = validate::check_service(service) {
                tracing::warn!(agent_id = %agent_id, "service status dropped: {v}");
                continue;
            }
            valid += 1;
            if service.source == STATUS_SOURCE
                && service.service_name.starts_with(RUN_REPORT_PREFIX)
            {
                self.record_run_report(&key, service).await;
            }
        }
        if total > 0 && valid == 0 {
            return Err(Status::invalid_argument("no valid service statuses"));
        }
        StatsCounters::add(&self.shared.stats.heartbeats, 1);
        self.shared
            .registry
            .seen(&key.tenant, &agent_id, unix_secs())
            .await;
        self.shared.emit(GatewayEvent::Heartbeat { agent_id });
        Ok(Response::new(GatewayStatusResponse { received: true }))
    }

    async fn stream_status(
        &self,
        request: Request<Streaming<GatewayStatusChunk>>,
    ) -> Result<Response<GatewayStatusResponse>, Status> {
        let stats = &self.shared.stats;
        match self.receive_stream(request).await {
            Ok(summary) => {
                StatsCounters::add(&stats.streams_ok, 1);
                StatsCounters::add(&stats.chunks, u64::from(summary.chunks));
                StatsCounters::add(&stats.devices_received, summary.accepted);
                StatsCounters::add(&stats.devices_rejected, summary.rejected);
                let key = summary.key;
                tracing::debug!(agent_id = %key.agent_id, chunks = summary.chunks,
                    devices = summary.accepted, rejected = summary.rejected, "stream accepted");
                self.shared
                    .registry
                    .seen(&key.tenant, &key.agent_id, unix_secs())
                    .await;
                self.shared.emit(GatewayEvent::StreamAccepted {
                    agent_id: key.agent_id,
                    chunks: summary.chunks,
                });
                Ok(Response::new(GatewayStatusResponse { received: true }))
            }
            Err(rejection) => {
                StatsCounters::add(&stats.streams_rejected, 1);
                tracing::warn!(agent_id = ?rejection.agent_id, code = ?rejection.code,
                    reason = %rejection.reason, "stream rejected");
                let status = Status::new(rejection.code, rejection.reason.clone());
                self.shared.emit(GatewayEvent::StreamRejected {
                    agent_id: rejection.agent_id,
                    code: rejection.code,
                    reason: rejection.reason,
                });
                Err(status)
            }
        }
    }

    type ControlStreamStream = ReceiverStream<Result<ControlStreamResponse, Status>>;

    async fn control_stream(
        &self,
        request: Request<Streaming<ControlStreamRequest>>,
    ) -> Result<Response<Self::ControlStreamStream>, Status> {
        let caller = self.identify(&request).await?;
        // The ControlStream exists to push sync configuration.
        refuse_platform_sync(&caller.identity, "ControlStream")?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ControlStreamRequest {
                payload: Some(ControlRequest::Hello(hello)),
            }) => hello,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first ControlStream message must be hello",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "ControlStream closed before hello",
                ))
            }
        };
        check_agent(&caller.identity, &hello.agent_id)?;
        let key = caller.key();
        let agent_id = key.agent_id.clone();
        let Registration {
            connection,
            outbound,
            mut closed,
        } = self.shared.controls.register(&key, &hello.config_version);
        tracing::info!(agent_id = %agent_id, "control stream open");
        self.shared.emit(GatewayEvent::ControlStreamOpened {
            agent_id: agent_id.clone(),
        });

        let current = self.render(&key).await;
        if hello.config_version != current.version {
            push_config(&self.shared, &key, &current);
        }

        let service = GatewayService::new(self.shared.clone());
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    // Replaced by a newer stream of the same agent, or shutdown.
                    _ = &mut closed => break,
                    message = inbound.message() => message,
                };
                match message {
                    Ok(Some(message)) => service.handle_control_message(&agent_id, message),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(agent_id = %agent_id, error = %status, "control stream ended");
                        break;
                    }
                }
            }
            service.shared.controls.unregister(&key, connection);
            tracing::info!(agent_id = %agent_id, "control stream closed");
        });
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}
