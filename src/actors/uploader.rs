//! The chunk uploader: delivers staged runs to the gateway, one run at a
//! time, in the order they were staged, then pushes each run's report.
//!
//! Data path of one run (wire.md §5–6):
//! ```text
//! staging file ──plan──▶ chunk spans ──ChunkReader (blocking pool)──▶ GatewayStatusChunk
//!      ──bounded channel (2)──▶ StreamStatus #1 (≤ 5000 chunks) ─▶ StreamStatus #2 … ─▶ PushStatus(run report)
//! ```
//! The bounded channel is the memory bound: a few 1 MiB chunks in flight,
//! whatever the run size.
//!
//! Retries: while the gateway is unreachable (transport errors) a run waits
//! and is retried without limit — the connection actor reconnects meanwhile.
//! A run the gateway *rejects* is retried `upload_attempts` times, then
//! reported failed and dropped. The gateway's reassembly is idempotent per
//! (agent, run, chunk), so a resent chunk is harmless.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::prelude::*;
use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::context::{AgentContext, GatewaySession};
use super::gateway_connection::is_transport_failure;
use super::supervisor::ChildGuard;
use super::telemetry::AgentEvent;
use crate::clock::{unix_nanos, unix_secs};
use crate::messages::{DeliverRun, ReportRun};
use crate::proto::GatewayStatusChunk;
use crate::upload::chunking::{plan, ChunkLimits, ChunkReader, RunIds};
use crate::upload::envelope::RunReport;

enum Job {
    Deliver(DeliverRun),
    Report(RunReport),
}

pub struct ChunkUploader {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    queue: VecDeque<Job>,
    busy: bool,
}

impl ChunkUploader {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard) -> Self {
        Self {
            agent,
            guard,
            queue: VecDeque::new(),
            busy: false,
        }
    }

    fn next_job(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        self.busy = true;
        let agent = self.agent.clone();
        ctx.spawn(
            async move {
                match job {
                    Job::Deliver(run) => deliver(&agent, run).await,
                    Job::Report(report) => push_report(&agent, &report).await,
                }
            }
            .into_actor(self)
            .map(|(), act, ctx| {
                act.busy = false;
                act.next_job(ctx);
            }),
        );
    }
}

/// Delivers one staged run, then reports it. Never returns early: every
/// path ends with the run's report and the staging files removed.
async fn deliver(agent: &AgentContext, run: DeliverRun) {
    let DeliverRun {
        staged,
        sync_service_id,
        mut report,
    } = run;
    let ids = RunIds {
        sync_service_id,
        sync_run_id: report.run_id.clone(),
    };
    let policy = &agent.bootstrap.gateway;
    let mut backoff = retry_backoff(agent);
    let mut rejections = 0;
    loop {
        let session = agent.wait_for_session().await;
        match send_run(agent, &session, &staged, &ids).await {
            Ok(chunks) => {
                tracing::info!(source = %report.source, run_id = %report.run_id, devices = staged.device_count, chunks, "run delivered");
                agent.telemetry.emit(AgentEvent::RunDelivered {
                    source: report.source.clone(),
                    run_id: report.run_id.clone(),
                    devices: staged.device_count,
                    chunks,
                });
                break;
            }
            Err(UploadError::Local(reason)) => {
                report.ok = false;
                report.error = Some(reason);
                break;
            }
            Err(UploadError::Rpc(status)) => {
                agent.report_rpc_failure("StreamStatus", &status);
                if !is_transport_failure(status.code()) {
                    rejections += 1;
                    if rejections >= policy.upload_attempts {
                        report.ok = false;
                        report.error = Some(format!(
                            "gateway rejected the run {rejections} times ({:?}): {}",
                            status.code(),
                            status.message()
                        ));
                        break;
                    }
                }
                let delay = backoff.next().unwrap_or(policy.reconnect_cap);
                tracing::warn!(source = %report.source, run_id = %report.run_id, code = ?status.code(), retry_in = ?delay,
                    "run upload failed: {}", status.message());
                tokio::time::sleep(delay).await;
            }
        }
    }
    if let Err(e) = staged.remove() {
        tracing::warn!(path = %staged.data_path.display(), "cannot remove delivered staged run: {e}");
    }
    push_report(agent, &report).await;
}

enum UploadError {
    /// Reading the staged run failed: retrying cannot help.
    Local(String),
    Rpc(tonic::Status),
}

/// Streams one run: one StreamStatus per ≤ 5000 chunks. Returns the number
/// of chunks sent.
async fn send_run(
    agent: &AgentContext,
    session: &GatewaySession,
    staged: &crate::upload::staging::StagedRun,
    ids: &RunIds,
) -> Result<u32, UploadError> {
    let limits = ChunkLimits {
        max_updates: agent.bootstrap.gateway.chunk_max_updates,
        ..ChunkLimits::default()
    };
    let chunk_plan = {
        let path = staged.data_path.display().to_string();
        let (staged, ids, limits) = (staged.clone(), ids.clone(), limits);
        tokio::task::spawn_blocking(move || plan(&staged, &ids, &limits))
            .await
            .map_err(|e| UploadError::Local(format!("chunk planning died: {e}")))?
            .map_err(|e| UploadError::Local(format!("reading staged run {path}: {e}")))?
    };
    let streams = chunk_plan.streams(&limits);
    let total_chunks = chunk_plan.chunks.len() as u32;
    let fields = agent.envelope(session);

    // The producer reads chunks on the blocking pool and hands each stream
    // its own bounded channel.
    let (streams_tx, mut streams_rx) = mpsc::channel::<mpsc::Receiver<GatewayStatusChunk>>(1);
    let producer = {
        let (staged, ids) = (staged.clone(), ids.clone());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut reader =
                ChunkReader::open(&staged, &chunk_plan, &ids).map_err(|e| e.to_string())?;
            for range in streams {
                let (tx, rx) = mpsc::channel(2);
                if streams_tx.blocking_send(rx).is_err() {
                    return Ok(()); // the upload gave up; nothing to report here
                }
                let stream_total = range.len() as i32;
                for (k, _) in range.enumerate() {
                    let chunk = match reader.next() {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(e)) => return Err(e.to_string()),
                        None => return Err("staged run ended before its last chunk".into()),
                    };
                    let envelope =
                        fields.status_chunk(k as i32, stream_total, chunk.json, unix_secs());
                    if tx.blocking_send(envelope).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    };

    let mut client = session.client.clone();
    let mut rpc_result = Ok(());
    while let Some(rx) = streams_rx.recv().await {
        match client.stream_status(ReceiverStream::new(rx)).await {
            Ok(resp) if resp.get_ref().received => {}
            Ok(_) => {
                rpc_result = Err(tonic::Status::aborted("gateway answered received=false"));
                break;
            }
            Err(status) => {
                rpc_result = Err(status);
                break;
            }
        }
    }
    drop(streams_rx);
    let produced = producer
        .await
        .map_err(|e| UploadError::Local(format!("chunk reader died: {e}")))?;
    rpc_result.map_err(UploadError::Rpc)?;
    produced.map_err(UploadError::Local)?;
    Ok(total_chunks)
}

/// Pushes a run report (wire.md §6), retrying while the gateway is away.
async fn push_report(agent: &AgentContext, report: &RunReport) {
    let mut backoff = retry_backoff(agent);
    for _ in 0..agent.bootstrap.gateway.upload_attempts.max(1) * 4 {
        let session = agent.wait_for_session().await;
        let mut req =
            tonic::Request::new(agent.envelope(&session).run_report(report, unix_nanos()));
        req.set_timeout(agent.bootstrap.gateway.rpc_timeout);
        let mut client = session.client.clone();
        match client.push_status(req).await {
            Ok(_) => {
                agent.telemetry.emit(AgentEvent::RunReported {
                    source: report.source.clone(),
                    run_id: report.run_id.clone(),
                    ok: report.ok,
                    error: report.error.clone(),
                });
                return;
            }
            Err(status) => {
                agent.report_rpc_failure("PushStatus", &status);
                let delay = backoff
                    .next()
                    .unwrap_or(agent.bootstrap.gateway.reconnect_cap);
                tracing::warn!(source = %report.source, code = ?status.code(), retry_in = ?delay, "run report not accepted: {}", status.message());
                tokio::time::sleep(delay).await;
            }
        }
    }
    tracing::error!(source = %report.source, run_id = %report.run_id, "run report dropped after repeated failures");
}

fn retry_backoff(agent: &AgentContext) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new()
        .with_min_delay(agent.bootstrap.gateway.reconnect_base)
        .with_max_delay(agent.bootstrap.gateway.reconnect_cap)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Actor for ChunkUploader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Integration actors hand runs over with do_send; give them room.
        ctx.set_mailbox_capacity(1024);
        let dir = self.agent.staging_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!("cannot create the staging directory {}: {e}", dir.display());
            self.guard
                .stopped(format!("staging directory {} unusable: {e}", dir.display()));
            ctx.stop();
        }
    }
}

impl Handler<DeliverRun> for ChunkUploader {
    type Result = ();

    fn handle(&mut self, msg: DeliverRun, ctx: &mut Self::Context) {
        self.queue.push_back(Job::Deliver(msg));
        self.next_job(ctx);
    }
}

impl Handler<ReportRun> for ChunkUploader {
    type Result = ();

    fn handle(&mut self, msg: ReportRun, ctx: &mut Self::Context) {
        self.queue.push_back(Job::Report(msg.0));
        self.next_job(ctx);
    }
}

crate::supervised_child!(ChunkUploader);
