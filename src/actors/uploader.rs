//! The chunk uploader: delivers the spool's runs to the gateway, one at a
//! time, oldest first, and pushes the run reports queued with them.
//!
//! Data path of one run (wire.md §5–6):
//! ```text
//! spooled run ──plan──▶ chunk spans ──ChunkReader (blocking pool)──▶ GatewayStatusChunk
//!      ──bounded channel (2)──▶ StreamStatus #1 (≤ 5000 chunks) ─▶ StreamStatus #2 … ─▶ PushStatus(run report)
//! ```
//! The bounded channel is the memory bound: a few 1 MiB chunks in flight,
//! whatever the run size.
//!
//! The uploader keeps no state of its own: the [`Spool`] holds every job
//! until it is done, so an uploader killed mid-stream is replaced by one
//! that starts the same job again. A run leaves the spool only once the
//! gateway acknowledged every stream that carried it; resending a run is
//! harmless, since the gateway's reassembly is idempotent per (agent, run,
//! chunk).
//!
//! Retries: while the gateway is unreachable (transport errors) a run waits
//! and is retried without limit — the connection actor reconnects meanwhile.
//! A run the gateway *rejects* is retried `upload_attempts` times, then
//! reported failed and dropped.
//!
//! [`Spool`]: crate::upload::Spool

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
use crate::proto::GatewayStatusChunk;
use crate::upload::chunking::{plan, ChunkLimits, ChunkReader, RunIds};
use crate::upload::envelope::RunReport;
use crate::upload::spool::{Job, SpooledRun};

pub struct ChunkUploader {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
}

impl ChunkUploader {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard) -> Self {
        Self { agent, guard }
    }
}

/// Works through the spool for as long as the actor lives. Returns only if
/// bookkeeping itself failed (a panic in the spool's file work).
async fn work_through_spool(agent: Arc<AgentContext>) -> String {
    loop {
        match agent.spool.next_job().await {
            Job::Deliver(run) => {
                let seq = run.seq;
                let Some(report) = deliver(&agent, run).await else {
                    continue; // dropped from the spool meanwhile
                };
                // Deleting a large run's files is file system work.
                let spool = agent.spool.clone();
                if let Err(e) =
                    tokio::task::spawn_blocking(move || spool.delivered(seq, report)).await
                {
                    return format!("removing a delivered run from the spool failed: {e}");
                }
            }
            Job::Report { seq, report } => {
                push_report(&agent, &report).await;
                agent.spool.done(seq);
            }
        }
    }
}

/// Delivers one spooled run and returns the report to push for it: `ok`
/// once every chunk was acknowledged, failed if the gateway kept rejecting
/// it or its files cannot be read. `None` if the run was dropped from the
/// spool (over its size limit) meanwhile: its failed report is queued.
async fn deliver(agent: &AgentContext, run: SpooledRun) -> Option<RunReport> {
    let mut run = run;
    let mut report = run.report.clone();
    let mut dropped = run.dropped.clone();
    let ids = RunIds {
        sync_service_id: run.sync_service_id.clone(),
        sync_run_id: report.run_id.clone(),
    };
    let policy = &agent.bootstrap.gateway;
    let mut backoff = retry_backoff(agent);
    let mut rejections = 0;
    loop {
        let attempt = async {
            let session = agent.wait_for_session().await;
            send_run(agent, &session, &mut run, &ids).await
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = dropped.wait_for(|d| *d) => {
                tracing::warn!(source = %report.source, run_id = %report.run_id, "upload stopped: the run was dropped from the spool");
                return None;
            }
        };
        match result {
            Ok(chunks) => {
                tracing::info!(source = %report.source, run_id = %report.run_id, devices = run.staged.device_count, chunks, "run delivered");
                agent.telemetry.emit(AgentEvent::RunDelivered {
                    source: report.source.clone(),
                    run_id: report.run_id.clone(),
                    devices: run.staged.device_count,
                    chunks,
                });
                return Some(report);
            }
            Err(UploadError::Local(reason)) => {
                report.ok = false;
                report.error = Some(reason);
                return Some(report);
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
                        return Some(report);
                    }
                }
                let delay = backoff.next().unwrap_or(policy.reconnect_cap);
                tracing::warn!(source = %report.source, run_id = %report.run_id, code = ?status.code(), retry_in = ?delay,
                    "run upload failed: {}", status.message());
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = dropped.wait_for(|d| *d) => return None,
                }
            }
        }
    }
}

enum UploadError {
    /// Reading the staged run failed: retrying cannot help.
    Local(String),
    Rpc(tonic::Status),
}

/// Streams one run, one StreamStatus per `stream_max_chunks` chunks,
/// starting at the first stream the gateway has not acknowledged yet
/// (`run.acked_streams`); each acknowledgement is recorded in the spool at
/// once, so a retry (or the next process) resumes after it. Returns the
/// number of chunks of the run.
async fn send_run(
    agent: &AgentContext,
    session: &GatewaySession,
    run: &mut SpooledRun,
    ids: &RunIds,
) -> Result<u32, UploadError> {
    // The chunk and stream sizes the run was spooled with: a resent run
    // must be cut the same way (the gateway checks `total_chunks`).
    let limits = ChunkLimits {
        max_updates: run.chunk_max_updates,
        max_chunks_per_stream: run.stream_max_chunks,
        ..ChunkLimits::default()
    };
    let staged = &run.staged;
    let chunk_plan = {
        let path = staged.data_path.display().to_string();
        let (staged, ids, limits) = (staged.clone(), ids.clone(), limits);
        tokio::task::spawn_blocking(move || plan(&staged, &ids, &limits))
            .await
            .map_err(|e| UploadError::Local(format!("chunk planning died: {e}")))?
            .map_err(|e| UploadError::Local(format!("reading staged run {path}: {e}")))?
    };
    let total_chunks = chunk_plan.chunks.len() as u32;
    let streams: Vec<_> = chunk_plan
        .streams(&limits)
        .into_iter()
        .skip(run.acked_streams as usize)
        .collect();
    let Some(first_chunk) = streams.first().map(|range| range.start) else {
        return Ok(total_chunks); // every stream was acknowledged already
    };
    let fields = agent.envelope(session);

    // The producer reads chunks on the blocking pool and hands each stream
    // its own bounded channel.
    let (streams_tx, mut streams_rx) = mpsc::channel::<mpsc::Receiver<GatewayStatusChunk>>(1);
    let producer = {
        let (staged, ids) = (staged.clone(), ids.clone());
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut reader = ChunkReader::open_at(&staged, &chunk_plan, &ids, first_chunk)
                .map_err(|e| e.to_string())?;
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
            Ok(resp) if resp.get_ref().received => {
                run.acked_streams += 1;
                let (spool, seq, acked) = (agent.spool.clone(), run.seq, run.acked_streams);
                // A manifest rewrite (fsync): on the blocking pool.
                let recorded =
                    match tokio::task::spawn_blocking(move || spool.stream_acked(seq, acked)).await
                    {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(join) => Err(join.to_string()),
                    };
                if let Err(e) = recorded {
                    // Not fatal: a resumed upload resends that stream, which
                    // the gateway ignores as a duplicate.
                    tracing::warn!(run_id = %ids.sync_run_id, "stream acknowledgement not recorded: {e}");
                }
            }
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
        // Restart-storm tests: an uploader that can never start.
        let refused: Option<String> = (|| {
            fail::fail_point!("uploader-start", |_| Some(
                "failpoint uploader-start".to_owned()
            ));
            None
        })();
        if let Some(reason) = refused {
            tracing::error!("chunk uploader cannot start: {reason}");
            self.guard.stopped(reason);
            ctx.stop();
            return;
        }
        ctx.spawn(work_through_spool(self.agent.clone()).into_actor(self).map(
            |failure, act, ctx| {
                tracing::error!("chunk uploader: {failure}");
                act.guard.panicked(failure);
                ctx.stop();
            },
        ));
    }
}

crate::supervised_child!(ChunkUploader);
