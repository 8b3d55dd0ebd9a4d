//! One integration actor per configured source. It runs the source at once,
//! then on its interval; never two runs of one source at the same time; each
//! run has a deadline. A run streams devices straight into an on-disk staging
//! file (memory does not grow with the inventory) and hands the staged run to
//! the chunk uploader.
//!
//! The fetch-and-stage work is blocking (generation, JSON encoding, file
//! writes), so it runs on tokio's blocking pool, never on the actor's thread.
//! A panic there comes back as a `JoinError`: the run is reported failed and
//! the actor stops with a panic reason, so the supervisor restarts it with
//! backoff.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::context::AgentContext;
use super::supervisor::{panic_message, ChildGuard};
use super::telemetry::AgentEvent;
use crate::config::sources::{SourceConfig, SourceKind};
use crate::device::{now_rfc3339, UpdateContext};
use crate::messages::{DeliverRun, ReportRun, RunNow, StopSource};
use crate::sources::faker::{FakerGenerator, FakerSettings};
use crate::sources::{faker_stage, RunCounts};
use crate::upload::envelope::RunReport;
use crate::upload::staging::{RunWriter, StagedRun};

pub struct Integration {
    agent: Arc<AgentContext>,
    guard: ChildGuard,
    config: SourceConfig,
    running: bool,
    /// Set to abandon the current run (deadline passed, source stopped).
    cancel: Arc<AtomicBool>,
    /// The Faker generator keeps its churn state between runs.
    faker: Option<FakerGenerator>,
}

/// What a finished fetch-and-stage produced.
struct Staged {
    staged: StagedRun,
    counts: RunCounts,
    faker: Option<FakerGenerator>,
}

#[derive(Debug)]
enum RunError {
    /// The source failed (config, API, staging I/O): report and carry on.
    Failed(String),
    /// The run's work panicked: report, then stop the actor.
    Panicked(String),
}

impl Integration {
    pub fn new(agent: Arc<AgentContext>, guard: ChildGuard, config: SourceConfig) -> Self {
        Self {
            agent,
            guard,
            config,
            running: false,
            cancel: Arc::default(),
            faker: None,
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
        let faker = self.faker.take();
        let cancel = self.cancel.clone();
        let deadline = agent.bootstrap.gateway.run_deadline;
        let work = {
            let run_id = run_id.clone();
            let cancel = cancel.clone();
            async move {
                let gateway_id = match &config.gateway_id {
                    Some(id) => id.clone(),
                    None => agent.wait_for_session().await.gateway_id,
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
                let handle = tokio::task::spawn_blocking(move || {
                    fetch_and_stage(&config, faker, &update_ctx, &dir, &run_id, &cancel)
                });
                match handle.await {
                    Ok(result) => result,
                    Err(e) if e.is_panic() => {
                        Err(RunError::Panicked(panic_message(&*e.into_panic())))
                    }
                    Err(e) => Err(RunError::Failed(format!("run task ended: {e}"))),
                }
            }
        };
        ctx.spawn(
            async move {
                tokio::time::timeout(deadline, work)
                    .await
                    .unwrap_or_else(|_| {
                        cancel.store(true, Ordering::Relaxed);
                        Err(RunError::Failed(format!(
                            "run deadline of {} exceeded",
                            humantime::format_duration(deadline)
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
        result: Result<Staged, RunError>,
        ctx: &mut Context<Self>,
    ) {
        self.running = false;
        let mut report = RunReport {
            source: self.config.name.clone(),
            source_type: self.config.kind.as_str().to_owned(),
            run_id: run_id.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
            ..RunReport::default()
        };
        match result {
            Ok(staged) => {
                self.faker = staged.faker;
                report.ok = true;
                report.device_count = staged.counts.devices;
                report.skipped_no_ip = staged.counts.skipped_no_ip;
                report.blacklisted = staged.counts.blacklisted;
                tracing::info!(source = %self.config.name, run_id, devices = staged.counts.devices,
                    skipped_no_ip = staged.counts.skipped_no_ip, blacklisted = staged.counts.blacklisted, "run staged");
                self.agent.telemetry.emit(AgentEvent::RunStaged {
                    source: self.config.name.clone(),
                    run_id,
                    devices: staged.counts.devices,
                });
                if staged.staged.device_count == 0 {
                    // Nothing to stream (wire.md §6), but the run is reported.
                    if let Err(e) = staged.staged.remove() {
                        tracing::warn!("cannot remove empty staged run: {e}");
                    }
                    self.hand_over(Handover::Report(report), ctx);
                } else {
                    let run = DeliverRun {
                        staged: staged.staged,
                        sync_service_id: self.config.sync_service_id.clone().unwrap_or_default(),
                        report,
                    };
                    self.hand_over(Handover::Deliver(run), ctx);
                }
            }
            Err(RunError::Failed(reason)) => {
                tracing::error!(source = %self.config.name, run_id, "run failed: {reason}");
                report.error = Some(reason);
                self.hand_over(Handover::Report(report), ctx);
            }
            Err(RunError::Panicked(reason)) => {
                tracing::error!(source = %self.config.name, run_id, "run panicked: {reason}");
                report.error = Some(format!("internal error (panic): {reason}"));
                self.hand_over(Handover::Report(report), ctx);
                self.guard.panicked(reason);
                ctx.stop();
            }
        }
    }
}

/// A finished run on its way to the chunk uploader.
enum Handover {
    Deliver(DeliverRun),
    Report(RunReport),
}

/// How long to wait before offering a run again to an uploader that is
/// restarting (or whose mailbox is full).
const HANDOVER_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

impl Integration {
    /// Gives a finished run to the current chunk uploader. While the uploader
    /// is being restarted its old address is dead: keep the run and offer it
    /// again shortly, so no run is lost to an uploader restart.
    fn hand_over(&mut self, job: Handover, ctx: &mut Context<Self>) {
        let job = match (self.agent.peers.uploader(), job) {
            (Some(uploader), Handover::Deliver(run)) => match uploader.try_send(run) {
                Ok(()) => return,
                Err(e) => Handover::Deliver(e.into_inner()),
            },
            (Some(uploader), Handover::Report(report)) => {
                match uploader.try_send(ReportRun(report)) {
                    Ok(()) => return,
                    Err(e) => Handover::Report(e.into_inner().0),
                }
            }
            (None, job) => job,
        };
        ctx.run_later(HANDOVER_RETRY, move |act, ctx| act.hand_over(job, ctx));
    }
}

/// The blocking part of a run: generate or fetch devices and stage them.
fn fetch_and_stage(
    config: &SourceConfig,
    faker: Option<FakerGenerator>,
    update_ctx: &UpdateContext,
    dir: &std::path::Path,
    run_id: &str,
    cancel: &AtomicBool,
) -> Result<Staged, RunError> {
    match config.kind {
        SourceKind::Faker => {
            let mut generator = match faker {
                Some(g) => g,
                None => FakerSettings::from_credentials(&config.credentials.0)
                    .map(FakerGenerator::new)
                    .map_err(|e| RunError::Failed(format!("source {:?}: {e}", config.name)))?,
            };
            generator.next_run();
            let io = |e: std::io::Error| {
                RunError::Failed(format!("staging run {run_id} in {}: {e}", dir.display()))
            };
            let mut writer = RunWriter::create(dir, run_id).map_err(io)?;
            let workers = std::thread::available_parallelism().map_or(1, usize::from);
            let staged = faker_stage(
                &generator,
                update_ctx,
                &config.network_blacklist,
                &mut writer,
                workers,
                &|| cancel.load(Ordering::Relaxed),
            );
            let counts = match staged {
                Ok(counts) => counts,
                Err(e) => {
                    // A half-staged run is never delivered: remove it.
                    let _ = writer.discard();
                    return Err(io(e));
                }
            };
            let staged = writer.finish().map_err(io)?;
            Ok(Staged {
                staged,
                counts,
                faker: Some(generator),
            })
        }
        SourceKind::Armis | SourceKind::Netbox => Err(RunError::Failed(format!(
            "source {:?}: the {} integration is not available in this build yet",
            config.name,
            config.kind.as_str()
        ))),
    }
}

impl Actor for Integration {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let _ = self.start_run(ctx);
        match self.config.run_interval() {
            Some(every) => {
                ctx.run_interval(every, |act, ctx| {
                    if let Err(reason) = act.start_run(ctx) {
                        tracing::warn!(source = %act.config.name, "scheduled run skipped: {reason}");
                    }
                });
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

impl Handler<StopSource> for Integration {
    type Result = ();

    fn handle(&mut self, _: StopSource, ctx: &mut Self::Context) {
        self.guard.stopped("stopped by the supervisor");
        self.cancel.store(true, Ordering::Relaxed);
        ctx.stop();
    }
}

crate::supervised_child!(Integration);
