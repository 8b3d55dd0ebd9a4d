//! One integration actor per configured source. It runs the source at once,
//! then on its interval; never two runs of one source at the same time; each
//! run has a deadline. A run streams devices straight into an on-disk staging
//! file (memory does not grow with the inventory); a complete run enters the
//! spool, where the chunk uploader finds it.
//!
//! While a run of the source is still in the spool (the gateway has been
//! away), scheduled runs are skipped and reported as such: an outage does
//! not multiply downloads. `sync.run_now` is never skipped.
//!
//! A run belongs to the source, not to one incarnation of its actor: it is
//! a task of its own, registered in [`super::context::RunsInProgress`], so a
//! crash of the actor (a panic in a handler, a stop) does not throw away a
//! download in progress; the restarted actor sees the run and does not start
//! another. A deliberate stop (the source changed or vanished, SIGTERM)
//! cancels it.
//!
//! What a run does is the source's [`SourceRunner`]: HTTP sources download
//! on the arbiter's thread (async) and parse, map and stage on a blocking
//! thread; the Faker source generates on the blocking pool. A panic there
//! comes back as [`FetchError::Panicked`]: the run is reported failed and
//! the source's actor is told to stop with a panic reason, so the supervisor
//! restarts it with backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::context::AgentContext;
use super::supervisor::ChildGuard;
use super::telemetry::AgentEvent;
use crate::config::sources::SourceConfig;
use crate::device::{now_rfc3339, UpdateContext};
use crate::messages::{KeepGenerator, RunNow, RunPanicked};
use crate::sources::http::FetchError;
use crate::sources::runner::{RunFailure, RunJob, RunOutcome, SourceRunner};
use crate::upload::envelope::RunReport;
use crate::upload::spool::Split;
use crate::upload::staging::{RunWriter, StagedRun};

pub struct Integration {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    config: SourceConfig,
    /// The source's client (pooled connections, cached token) or generator;
    /// an error when the configuration cannot be used, reported by every run.
    runner: Result<SourceRunner, String>,
}

impl Integration {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard, config: SourceConfig) -> Self {
        let runner = SourceRunner::new(&config, &agent.bootstrap.source_http)
            .map_err(|e| format!("source {:?}: {e}", config.name));
        if let Err(reason) = &runner {
            tracing::error!("{reason}");
        }
        Self {
            agent,
            guard,
            config,
            runner,
        }
    }

    /// A scheduled run (at start, then on the interval): skipped while the
    /// previous run of the source still waits in the spool.
    fn scheduled_run(&mut self, ctx: &mut Context<Self>) {
        if !self.agent.runs.in_progress(&self.config.name)
            && self.agent.spool.has_undelivered(&self.config.name)
        {
            let reason = format!(
                "the previous run of {:?} is still waiting for delivery to the gateway",
                self.config.name
            );
            tracing::warn!(source = %self.config.name, "scheduled run skipped: {reason}");
            self.agent.telemetry.count_skipped_run();
            self.agent.telemetry.emit(AgentEvent::RunSkipped {
                source: self.config.name.clone(),
                reason: reason.clone(),
            });
            self.agent.spool.push_report(RunReport {
                source: self.config.name.clone(),
                source_type: self.config.kind.as_str().to_owned(),
                ok: true,
                skipped: true,
                warning: Some(format!("scheduled run skipped: {reason}")),
                ..RunReport::default()
            });
            return;
        }
        if let Err(reason) = self.start_run(ctx) {
            tracing::warn!(source = %self.config.name, "scheduled run skipped: {reason}");
        }
    }

    fn start_run(&mut self, _ctx: &mut Context<Self>) -> Result<(), String> {
        let run_id = uuid::Uuid::new_v4().to_string();
        let cancel = Arc::new(AtomicBool::new(false));
        if !self
            .agent
            .runs
            .begin(&self.config.name, &run_id, cancel.clone())
        {
            let reason = format!("a run of {:?} is still in progress", self.config.name);
            self.agent.telemetry.emit(AgentEvent::RunSkipped {
                source: self.config.name.clone(),
                reason: reason.clone(),
            });
            return Err(reason);
        }
        let started = Instant::now();
        let agent = self.agent.clone();
        let config = self.config.clone();
        let runner = self.runner.clone();
        let deadline = agent.bootstrap.gateway.run_deadline;
        let work = {
            let run_id = run_id.clone();
            let cancel = cancel.clone();
            let (agent, config) = (agent.clone(), config.clone());
            async move {
                let runner = runner.map_err(|reason| {
                    RunFailure::new(FetchError::Config(reason), Default::default())
                })?;
                let gateway_id = match &config.gateway_id {
                    Some(id) => id.clone(),
                    None => agent.gateway_id().await,
                };
                let update_ctx = UpdateContext {
                    agent_id: config
                        .agent_id
                        .clone()
                        .unwrap_or_else(|| agent.bootstrap.agent_id.clone()),
                    gateway_id,
                    partition: config
                        .partition
                        .clone()
                        .unwrap_or_else(|| agent.bootstrap.partition.clone()),
                    source: config.kind.as_str(),
                    timestamp: now_rfc3339(),
                };
                let dir = agent.staging_dir();
                let writer = RunWriter::create(&dir, &run_id).map_err(|e| {
                    RunFailure::from(FetchError::Staging(std::io::Error::new(
                        e.kind(),
                        format!("creating run {run_id} in {}: {e}", dir.display()),
                    )))
                })?;
                let job = RunJob {
                    update_ctx,
                    blacklist: config.network_blacklist.clone(),
                    writer,
                    cancel,
                };
                runner.run(job, dir).await
            }
        };
        // Detached from this incarnation of the actor (see the module doc).
        actix_rt::spawn(async move {
            let result = tokio::time::timeout(deadline, work)
                .await
                .unwrap_or_else(|_| {
                    cancel.store(true, Ordering::Relaxed);
                    Err(RunFailure::from(FetchError::Deadline(
                        humantime::format_duration(deadline),
                    )))
                });
            conclude_run(&agent, &config, &run_id, started, result).await;
            agent.runs.end(&config.name, &run_id);
        });
        Ok(())
    }

    /// A deliberate stop: the run in progress is abandoned.
    fn cancel_run(&mut self) {
        self.agent.runs.cancel(&self.config.name);
    }
}

/// Reports a finished run, and puts a complete one into the spool (a durable
/// manifest write, on the blocking pool) before the source stops counting
/// as running, so that the next scheduled run sees it spooled.
async fn conclude_run(
    agent: &Arc<AgentContext>,
    config: &SourceConfig,
    run_id: &str,
    started: Instant,
    result: Result<RunOutcome, RunFailure>,
) {
    let mut report = RunReport {
        source: config.name.clone(),
        source_type: config.kind.as_str().to_owned(),
        run_id: run_id.to_owned(),
        duration_ms: started.elapsed().as_millis() as u64,
        ..RunReport::default()
    };
    let current_actor = agent.peers.integration(&config.name);
    match result {
        Ok(outcome) => {
            if let (Some(generator), Some(actor)) = (outcome.faker, &current_actor) {
                actor.do_send(KeepGenerator {
                    config_hash: config.hash.clone(),
                    generator,
                });
            }
            let output = outcome.output;
            let counts = output.counts;
            report.ok = true;
            report.set_counts(&counts);
            report.warning = output.first_invalid.map(|first| {
                format!(
                    "{} device objects skipped as unreadable; first: {first}",
                    counts.skipped_invalid
                )
            });
            tracing::info!(source = %config.name, run_id, devices = counts.devices,
                skipped_no_ip = counts.skipped_no_ip, blacklisted = counts.blacklisted,
                duplicates = counts.skipped_duplicate, invalid = counts.skipped_invalid,
                pages = counts.pages, retries = counts.retries, "run staged");
            agent.telemetry.emit(AgentEvent::RunStaged {
                source: config.name.clone(),
                run_id: run_id.to_owned(),
                devices: counts.devices,
            });
            if output.staged.device_count == 0 {
                // Nothing to stream (wire.md §6), but the run is reported.
                if let Err(e) = output.staged.remove() {
                    tracing::warn!("cannot remove empty staged run: {e}");
                }
                agent.spool.push_report(report);
            } else {
                let sync_service_id = config.sync_service_id.clone().unwrap_or_default();
                let agent = agent.clone();
                let admission = tokio::task::spawn_blocking(move || {
                    spool_run(&agent, output.staged, sync_service_id, report)
                });
                if let Err(e) = admission.await {
                    tracing::error!(source = %config.name, run_id, "spooling the run failed: {e}");
                }
            }
        }
        Err(RunFailure { error, counts }) => {
            report.set_counts(&counts);
            report.error_kind = Some(error.kind().to_owned());
            let panicked = matches!(error, FetchError::Panicked(_));
            let reason = format!("source {:?}: {error}", config.name);
            if panicked {
                tracing::error!(source = %config.name, run_id, "run panicked: {error}");
            } else {
                tracing::error!(source = %config.name, run_id, kind = error.kind(), "run failed: {error}");
            }
            report.error = Some(reason.clone());
            agent.spool.push_report(report);
            if let (true, Some(actor)) = (panicked, current_actor) {
                actor.do_send(RunPanicked(reason));
            }
        }
    }
}

/// Admits a complete run into the spool (blocking: fsync). A run that cannot
/// be spooled is removed and reported failed: a staged run is either spooled
/// or gone.
fn spool_run(agent: &AgentContext, staged: StagedRun, sync_service_id: String, report: RunReport) {
    let split = Split {
        chunk_max_updates: agent.bootstrap.gateway.chunk_max_updates,
        stream_max_chunks: agent.bootstrap.gateway.stream_max_chunks,
    };
    let (source, run_id) = (report.source.clone(), report.run_id.clone());
    let files = staged.clone();
    let failed_report = report.clone();
    let devices = staged.device_count;
    match agent.spool.admit(staged, sync_service_id, split, report) {
        Ok(dropped) => {
            agent.telemetry.emit(AgentEvent::RunSpooled {
                source,
                run_id,
                devices,
            });
            for run in dropped {
                agent.run_dropped(run);
            }
        }
        Err(e) => {
            tracing::error!(source, run_id, "run not spooled: {e}");
            if let Err(e) = files.remove() {
                tracing::warn!("cannot remove a run that could not be spooled: {e}");
            }
            agent.spool.push_report(RunReport {
                ok: false,
                error: Some(format!("run not spooled: {e}")),
                error_kind: Some("spool".into()),
                ..failed_report
            });
        }
    }
}

impl Actor for Integration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.scheduled_run(ctx);
        match self.config.run_interval() {
            Some(every) => {
                ctx.run_interval(every, |act, ctx| act.scheduled_run(ctx));
            }
            None => tracing::warn!(
                source = %self.config.name,
                "poll_interval and discovery_interval are both unset or ≤ 0: the source runs once and is not scheduled"
            ),
        }
    }
}

impl Handler<RunNow> for Integration {
    type Result = Result<(), String>;

    fn handle(&mut self, _: RunNow, ctx: &mut Self::Context) -> Self::Result {
        self.start_run(ctx)
    }
}

impl Handler<KeepGenerator> for Integration {
    type Result = ();

    fn handle(&mut self, msg: KeepGenerator, _ctx: &mut Self::Context) {
        // Only a generator of this very configuration carries over.
        if msg.config_hash == self.config.hash {
            if let Ok(runner) = self.runner.as_mut() {
                runner.keep(Some(msg.generator));
            }
        }
    }
}

impl Handler<RunPanicked> for Integration {
    type Result = ();

    fn handle(&mut self, msg: RunPanicked, ctx: &mut Self::Context) {
        self.guard.panicked(msg.0);
        ctx.stop();
    }
}

crate::supervised_child!(Integration, Integration::cancel_run);
