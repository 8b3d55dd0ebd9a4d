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
//! What a run does is the source's [`SourceRunner`]: HTTP sources download
//! on the actor's thread (async) and parse, map and stage on a blocking
//! thread; the Faker source generates on the blocking pool. A panic there
//! comes back as [`FetchError::Panicked`]: the run is reported failed and
//! the actor stops with a panic reason, so the supervisor restarts it with
//! backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::context::AgentContext;
use super::supervisor::ChildGuard;
use super::telemetry::AgentEvent;
use crate::config::sources::SourceConfig;
use crate::device::{now_rfc3339, UpdateContext};
use crate::messages::RunNow;
use crate::sources::http::FetchError;
use crate::sources::runner::{RunFailure, RunJob, RunOutcome, SourceRunner};
use crate::upload::envelope::RunReport;
use crate::upload::staging::{RunWriter, StagedRun};

pub struct Integration {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    config: SourceConfig,
    /// The source's client (pooled connections, cached token) or generator;
    /// an error when the configuration cannot be used, reported by every run.
    runner: Result<SourceRunner, String>,
    running: bool,
    /// Set to abandon the current run (deadline passed, source stopped).
    cancel: Arc<AtomicBool>,
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
            running: false,
            cancel: Arc::default(),
        }
    }

    /// A scheduled run (at start, then on the interval): skipped while the
    /// previous run of the source still waits in the spool.
    fn scheduled_run(&mut self, ctx: &mut Context<Self>) {
        if !self.running && self.agent.spool.has_undelivered(&self.config.name) {
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

    fn start_run(&mut self, ctx: &mut Context<Self>) -> Result<(), String> {
        if self.running {
            let reason = format!("a run of {:?} is still in progress", self.config.name);
            self.agent.telemetry.emit(AgentEvent::RunSkipped {
                source: self.config.name.clone(),
                reason: reason.clone(),
            });
            return Err(reason);
        }
        self.running = true;
        self.cancel = Arc::default();
        let run_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let agent = self.agent.clone();
        let config = self.config.clone();
        let runner = self.runner.clone();
        let cancel = self.cancel.clone();
        let deadline = agent.bootstrap.gateway.run_deadline;
        let work = {
            let run_id = run_id.clone();
            let cancel = cancel.clone();
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
        ctx.spawn(
            async move {
                tokio::time::timeout(deadline, work)
                    .await
                    .unwrap_or_else(|_| {
                        cancel.store(true, Ordering::Relaxed);
                        Err(RunFailure::from(FetchError::Deadline(
                            humantime::format_duration(deadline),
                        )))
                    })
            }
            .into_actor(self)
            .map(move |result, act, ctx| act.finish_run(run_id, started, result, ctx)),
        );
        Ok(())
    }

    fn finish_run(
        &mut self,
        run_id: String,
        started: Instant,
        result: Result<RunOutcome, RunFailure>,
        ctx: &mut Context<Self>,
    ) {
        let mut report = RunReport {
            source: self.config.name.clone(),
            source_type: self.config.kind.as_str().to_owned(),
            run_id: run_id.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            ..RunReport::default()
        };
        match result {
            Ok(outcome) => {
                if let Ok(runner) = self.runner.as_mut() {
                    runner.keep(outcome.faker);
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
                tracing::info!(source = %self.config.name, run_id, devices = counts.devices,
                    skipped_no_ip = counts.skipped_no_ip, blacklisted = counts.blacklisted,
                    duplicates = counts.skipped_duplicate, invalid = counts.skipped_invalid,
                    pages = counts.pages, retries = counts.retries, "run staged");
                self.agent.telemetry.emit(AgentEvent::RunStaged {
                    source: self.config.name.clone(),
                    run_id,
                    devices: counts.devices,
                });
                if output.staged.device_count == 0 {
                    // Nothing to stream (wire.md §6), but the run is reported.
                    if let Err(e) = output.staged.remove() {
                        tracing::warn!("cannot remove empty staged run: {e}");
                    }
                    self.running = false;
                    self.agent.spool.push_report(report);
                } else {
                    self.spool_run(output.staged, report, ctx);
                }
            }
            Err(RunFailure { error, counts }) => {
                report.set_counts(&counts);
                report.error_kind = Some(error.kind().to_owned());
                let panicked = matches!(error, FetchError::Panicked(_));
                let reason = format!("source {:?}: {error}", self.config.name);
                if panicked {
                    tracing::error!(source = %self.config.name, run_id, "run panicked: {error}");
                } else {
                    tracing::error!(source = %self.config.name, run_id, kind = error.kind(), "run failed: {error}");
                }
                report.error = Some(reason.clone());
                self.running = false;
                self.agent.spool.push_report(report);
                if panicked {
                    self.guard.panicked(reason);
                    ctx.stop();
                }
            }
        }
    }
}

impl Integration {
    /// Puts a complete run into the spool (a durable manifest write, on the
    /// blocking pool); the source counts as running until it is there, so
    /// that the next scheduled run sees it. The admission finishes even if
    /// this actor dies meanwhile: a staged run is either spooled or removed.
    fn spool_run(&mut self, staged: StagedRun, report: RunReport, ctx: &mut Context<Self>) {
        let agent = self.agent.clone();
        let sync_service_id = self.config.sync_service_id.clone().unwrap_or_default();
        let chunk_max_updates = agent.bootstrap.gateway.chunk_max_updates;
        let admission = tokio::task::spawn_blocking(move || {
            let spool = agent.spool.clone();
            let failed_report = report.clone();
            let files = staged.clone();
            let devices = staged.device_count;
            match spool.admit(staged, sync_service_id, chunk_max_updates, report) {
                Ok(dropped) => {
                    agent.telemetry.emit(AgentEvent::RunSpooled {
                        source: failed_report.source.clone(),
                        run_id: failed_report.run_id.clone(),
                        devices,
                    });
                    for run in dropped {
                        agent.run_dropped(run);
                    }
                }
                Err(e) => {
                    tracing::error!(source = %failed_report.source, run_id = %failed_report.run_id, "run not spooled: {e}");
                    if let Err(e) = files.remove() {
                        tracing::warn!("cannot remove a run that could not be spooled: {e}");
                    }
                    spool.push_report(RunReport {
                        ok: false,
                        error: Some(format!("run not spooled: {e}")),
                        error_kind: Some("spool".into()),
                        ..failed_report
                    });
                }
            }
        });
        ctx.spawn(
            async move {
                let _ = admission.await;
            }
            .into_actor(self)
            .map(|(), act, _| act.running = false),
        );
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

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Handler<RunNow> for Integration {
    type Result = Result<(), String>;

    fn handle(&mut self, _: RunNow, ctx: &mut Self::Context) -> Self::Result {
        self.start_run(ctx)
    }
}

crate::supervised_child!(Integration);
