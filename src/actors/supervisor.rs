//! The supervisor: owns every child actor and restarts the ones that fail.
//!
//! actix's own `Supervisor` only restarts an actor that stops itself, has no
//! backoff and no limit, and never notices a handler panic (the actor's task
//! just dies). So the policy is ours, in the spirit of OTP / kameo:
//! - each child carries a [`ChildGuard`]; when the child's task ends — a stop,
//!   a caught panic, or an uncaught handler panic that kills the task — the
//!   guard's `Drop` tells us why. Every deliberate stop records its reason
//!   first, so an actor that ends with no reason recorded died of a panic
//!   (actix still runs `stopped()` when tokio drops a panicked task, so the
//!   hook itself cannot tell the two apart);
//! - a failed child is restarted after an exponential backoff with jitter
//!   (base and cap from the bootstrap `restart_policy`);
//! - more than `max_restarts` restarts of one child within `window` means the
//!   fault is not transient: we log it and stop the process with exit code
//!   [`EXIT_RESTART_INTENSITY`] so the orchestrator restarts us cleanly.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use backon::BackoffBuilder;

use super::config::ConfigActor;
use super::context::AgentContext;
use super::gateway_connection::GatewayConnection;
use super::integration::Integration;
use super::telemetry::AgentEvent;
use super::uploader::ChunkUploader;
use crate::config::sources::{SourceConfig, SourceEntry};
use crate::messages::{
    ChildExited, ChildId, ChildState, Drain, ExitReason, FaultKind, GetChildren, InjectChildFault,
    InjectFault, ReconcileSources, Shutdown, StopChild,
};
use crate::upload::envelope::RunReport;

/// Process exit code when a child exceeds its restart intensity.
pub const EXIT_RESTART_INTENSITY: i32 = 70;

/// Carried by every child; reports the child's end to the supervisor.
pub struct ChildGuard {
    supervisor: Addr<Supervisor>,
    child: ChildId,
    generation: u64,
    reason: Option<ExitReason>,
}

impl ChildGuard {
    /// Records a deliberate stop; call it before `ctx.stop()`. A reason
    /// recorded earlier (a caught panic) is kept.
    pub fn stopped(&mut self, why: impl Into<String>) {
        if self.reason.is_none() {
            self.reason = Some(ExitReason::Stopped(why.into()));
        }
    }

    /// Records a caught panic; the child should stop right after.
    pub fn panicked(&mut self, why: impl Into<String>) {
        self.reason = Some(ExitReason::Panicked(why.into()));
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // No recorded reason: nobody asked the actor to stop, so its task
        // was dropped after a handler panicked.
        let reason = self.reason.take().unwrap_or_else(|| {
            ExitReason::Panicked(
                "actor task died without a stop request (uncaught panic in a handler)".into(),
            )
        });
        self.supervisor.do_send(ChildExited {
            child: self.child.clone(),
            generation: self.generation,
            reason,
        });
    }
}

/// Turns a caught panic payload into text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

enum ChildSpec {
    Gateway,
    Config,
    Uploader,
    Source(Box<SourceConfig>),
}

enum Running {
    Gateway(Addr<GatewayConnection>),
    Config(Addr<ConfigActor>),
    Uploader(Addr<ChunkUploader>),
    Source(Addr<Integration>),
}

impl Running {
    fn stop(&self) {
        match self {
            Running::Gateway(a) => a.do_send(StopChild),
            Running::Config(a) => a.do_send(StopChild),
            Running::Uploader(a) => a.do_send(StopChild),
            Running::Source(a) => a.do_send(StopChild),
        }
    }

    fn inject(&self, fault: FaultKind) {
        let msg = InjectFault(fault);
        match self {
            Running::Gateway(a) => a.do_send(msg),
            Running::Config(a) => a.do_send(msg),
            Running::Uploader(a) => a.do_send(msg),
            Running::Source(a) => a.do_send(msg),
        }
    }
}

struct Slot {
    spec: ChildSpec,
    generation: u64,
    running: Option<Running>,
    /// Restart times within the intensity window.
    recent_restarts: VecDeque<Instant>,
    pending_restart: Option<SpawnHandle>,
}

impl Slot {
    /// Ends the current incarnation on purpose: no pending restart, and the
    /// running child is told to stop (its exit report is then ignored, as
    /// the caller removes or replaces the slot, or the tree is ending).
    fn halt(&mut self, ctx: &mut Context<Supervisor>) {
        if let Some(handle) = self.pending_restart.take() {
            ctx.cancel_future(handle);
        }
        if let Some(running) = self.running.take() {
            running.stop();
        }
    }
}

/// The root of the agent's actor tree.
pub struct Supervisor {
    ctx: Arc<AgentContext>,
    slots: BTreeMap<ChildId, Slot>,
    /// Hashes of sources reported invalid, so one bad config is reported once.
    invalid_reported: BTreeMap<String, String>,
    shutting_down: bool,
    /// Set by [`Drain`]: sources are stopped and never started again.
    draining: bool,
}

impl Supervisor {
    pub fn new(ctx: Arc<AgentContext>) -> Self {
        Self {
            ctx,
            slots: BTreeMap::new(),
            invalid_reported: BTreeMap::new(),
            shutting_down: false,
            draining: false,
        }
    }

    fn add_child(&mut self, id: ChildId, spec: ChildSpec, ctx: &mut Context<Self>) {
        self.slots.insert(
            id.clone(),
            Slot {
                spec,
                generation: 0,
                running: None,
                recent_restarts: VecDeque::new(),
                pending_restart: None,
            },
        );
        self.start_child(&id, ctx);
    }

    fn start_child(&mut self, id: &ChildId, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.generation += 1;
        slot.pending_restart = None;
        let guard = ChildGuard {
            supervisor: ctx.address(),
            child: id.clone(),
            generation: slot.generation,
            reason: None,
        };
        let agent = self.ctx.clone();
        let peers = &self.ctx.peers;
        let running = match &slot.spec {
            ChildSpec::Gateway => {
                let addr = GatewayConnection::new(agent, guard).start();
                peers.set_gateway(Some(addr.clone()));
                Running::Gateway(addr)
            }
            ChildSpec::Config => {
                let addr = ConfigActor::new(agent, guard).start();
                peers.set_config(Some(addr.clone()));
                Running::Config(addr)
            }
            ChildSpec::Uploader => {
                let addr = ChunkUploader::new(agent, guard).start();
                Running::Uploader(addr)
            }
            ChildSpec::Source(config) => {
                let addr = Integration::new(agent, guard, (**config).clone()).start();
                peers.set_integration(&config.name, Some(addr.clone()));
                self.ctx.telemetry.emit(AgentEvent::SourceStarted {
                    name: config.name.clone(),
                    generation: slot.generation,
                });
                Running::Source(addr)
            }
        };
        slot.running = Some(running);
        self.ctx.telemetry.with_child(id, |s| s.starts += 1);
        self.ctx.telemetry.emit(AgentEvent::ChildStarted {
            child: id.clone(),
            generation: slot.generation,
        });
    }

    /// Removes a child for good (its source vanished or became invalid).
    fn remove_child(&mut self, id: &ChildId, ctx: &mut Context<Self>) {
        if let Some(mut slot) = self.slots.remove(id) {
            slot.halt(ctx);
            if let ChildId::Source(name) = id {
                self.ctx.peers.set_integration(name, None);
                self.ctx
                    .telemetry
                    .emit(AgentEvent::SourceStopped { name: name.clone() });
            }
        }
    }

    /// Restarts a source with a new config, keeping its slot so that its
    /// generation keeps counting (observers can tell a restart happened).
    fn replace_source(&mut self, id: &ChildId, config: Box<SourceConfig>, ctx: &mut Context<Self>) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.halt(ctx);
        slot.spec = ChildSpec::Source(config);
        slot.recent_restarts.clear();
        self.start_child(id, ctx);
    }

    fn schedule_restart(&mut self, id: ChildId, ctx: &mut Context<Self>) {
        let policy = self.ctx.bootstrap.restart.clone();
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        while slot
            .recent_restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            slot.recent_restarts.pop_front();
        }
        slot.recent_restarts.push_back(now);
        let restarts = slot.recent_restarts.len() as u32;
        if restarts > policy.max_restarts {
            tracing::error!(
                child = %id,
                restarts,
                window = %humantime::format_duration(policy.window),
                "restart intensity exceeded: {id} failed {restarts} times within {}; exiting so the service manager can restart the agent",
                humantime::format_duration(policy.window)
            );
            self.ctx
                .telemetry
                .emit(AgentEvent::RestartIntensityExceeded {
                    child: id,
                    restarts,
                    window: policy.window,
                });
            self.shutting_down = true;
            System::current().stop_with_code(EXIT_RESTART_INTENSITY);
            return;
        }
        let delay = restart_delay(policy.backoff_base, policy.backoff_cap, restarts);
        tracing::warn!(child = %id, restarts, delay = ?delay, "restarting child after backoff");
        self.ctx.telemetry.with_child(&id, |s| s.restarts += 1);
        self.ctx.telemetry.emit(AgentEvent::ChildRestartScheduled {
            child: id.clone(),
            restarts_in_window: restarts,
            delay,
        });
        let restart_id = id.clone();
        let handle = ctx.run_later(delay, move |act, ctx| act.start_child(&restart_id, ctx));
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.pending_restart = Some(handle);
        }
    }

    fn reconcile(&mut self, desired: crate::config::sources::SyncConfig, ctx: &mut Context<Self>) {
        // Stop sources that vanished.
        let vanished: Vec<ChildId> = self
            .slots
            .keys()
            .filter(|id| matches!(id, ChildId::Source(n) if !desired.sources.contains_key(n)))
            .cloned()
            .collect();
        for id in vanished {
            tracing::info!(child = %id, "source removed from config; stopping it");
            self.remove_child(&id, ctx);
        }
        self.invalid_reported
            .retain(|name, _| desired.sources.contains_key(name));
        for (name, entry) in desired.sources {
            let id = ChildId::Source(name.clone());
            match entry {
                SourceEntry::Valid(config) => {
                    self.invalid_reported.remove(&name);
                    for warning in &config.warnings {
                        tracing::warn!(source = %name, "{warning}");
                    }
                    let unchanged = matches!(
                        self.slots.get(&id).map(|s| &s.spec),
                        Some(ChildSpec::Source(current)) if current.hash == config.hash
                    );
                    if unchanged {
                        continue;
                    }
                    if self.slots.contains_key(&id) {
                        tracing::info!(source = %name, "source config changed; restarting it");
                        self.replace_source(&id, config, ctx);
                    } else {
                        self.add_child(id, ChildSpec::Source(config), ctx);
                    }
                }
                SourceEntry::Invalid { hash, reason } => {
                    if self.slots.contains_key(&id) {
                        tracing::warn!(source = %name, "source became invalid; stopping it");
                        self.remove_child(&id, ctx);
                    }
                    if self.invalid_reported.get(&name) != Some(&hash) {
                        tracing::error!(source = %name, "{reason}");
                        self.invalid_reported.insert(name.clone(), hash);
                        self.ctx.telemetry.emit(AgentEvent::SourceInvalid {
                            name: name.clone(),
                            reason: reason.clone(),
                        });
                        self.ctx.spool.push_report(RunReport {
                            source: name,
                            source_type: String::new(),
                            run_id: String::new(),
                            ok: false,
                            error: Some(reason),
                            ..RunReport::default()
                        });
                    }
                }
            }
        }
    }
}

/// Delay before the `restarts`-th restart within the window: exponential from
/// `base`, capped at `cap`, with random jitter so that many agents (or many
/// children) do not restart in lockstep.
pub fn restart_delay(base: Duration, cap: Duration, restarts: u32) -> Duration {
    backon::ExponentialBuilder::new()
        .with_min_delay(base)
        .with_max_delay(cap)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(restarts.saturating_sub(1) as usize)
        .unwrap_or(cap)
        .min(cap)
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Children ask each other's addresses through Peers; a child can
        // take dozens of messages at once (one per source), so give us room.
        ctx.set_mailbox_capacity(256);
        self.ctx.peers.set_supervisor(Some(ctx.address()));
        self.add_child(ChildId::Uploader, ChildSpec::Uploader, ctx);
        self.add_child(ChildId::Gateway, ChildSpec::Gateway, ctx);
        self.add_child(ChildId::Config, ChildSpec::Config, ctx);
    }
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        let Some(slot) = self.slots.get_mut(&msg.child) else {
            return;
        };
        if slot.generation != msg.generation || self.shutting_down {
            return; // an incarnation we already replaced or removed
        }
        slot.running = None;
        let panicked = msg.reason.is_panic();
        tracing::warn!(child = %msg.child, reason = %msg.reason, "child failed");
        self.ctx.telemetry.with_child(&msg.child, |s| {
            s.failures += 1;
            if panicked {
                s.panics += 1;
            }
        });
        self.ctx.telemetry.emit(AgentEvent::ChildFailed {
            child: msg.child.clone(),
            reason: msg.reason.to_string(),
            panicked,
        });
        self.schedule_restart(msg.child, ctx);
    }
}

impl Handler<ReconcileSources> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: ReconcileSources, ctx: &mut Self::Context) {
        if !self.shutting_down && !self.draining {
            self.reconcile(msg.0, ctx);
        }
    }
}

impl Handler<InjectChildFault> for Supervisor {
    type Result = bool;

    fn handle(&mut self, msg: InjectChildFault, _ctx: &mut Self::Context) -> bool {
        match self.slots.get(&msg.child).and_then(|s| s.running.as_ref()) {
            Some(running) => {
                running.inject(msg.fault);
                true
            }
            None => false,
        }
    }
}

impl Handler<GetChildren> for Supervisor {
    type Result = MessageResult<GetChildren>;

    fn handle(&mut self, _: GetChildren, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.slots
                .iter()
                .map(|(id, slot)| {
                    let state = ChildState {
                        generation: slot.generation,
                        running: slot.running.is_some(),
                    };
                    (id.clone(), state)
                })
                .collect(),
        )
    }
}

impl Handler<Drain> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) {
        self.draining = true;
        let sources: Vec<ChildId> = self
            .slots
            .keys()
            .filter(|id| matches!(id, ChildId::Source(_)))
            .cloned()
            .collect();
        for id in sources {
            self.remove_child(&id, ctx);
        }
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Self::Context) {
        self.shutting_down = true;
        for slot in self.slots.values_mut() {
            slot.halt(ctx);
        }
        ctx.stop();
    }
}

/// Implements [`InjectFault`] and [`StopChild`] for a child actor with a
/// `guard: ChildGuard` field. The optional second argument, a
/// `fn(&mut Actor)`, runs on a deliberate stop (not on a crash).
#[macro_export]
macro_rules! supervised_child {
    ($actor:ty) => {
        $crate::supervised_child!($actor, |_: &mut $actor| {});
    };
    ($actor:ty, $on_stop:expr) => {
        impl ::actix::Handler<$crate::messages::StopChild> for $actor {
            type Result = ();

            fn handle(&mut self, _: $crate::messages::StopChild, ctx: &mut Self::Context) {
                let on_stop: fn(&mut $actor) = $on_stop;
                on_stop(self);
                self.guard.stopped("stopped by the supervisor");
                ::actix::ActorContext::stop(ctx);
            }
        }

        impl ::actix::Handler<$crate::messages::InjectFault> for $actor {
            type Result = ();

            fn handle(&mut self, msg: $crate::messages::InjectFault, ctx: &mut Self::Context) {
                match msg.0 {
                    $crate::messages::FaultKind::Stop => {
                        self.guard.stopped("fault injected: stop");
                        ::actix::ActorContext::stop(ctx);
                    }
                    $crate::messages::FaultKind::Panic => {
                        panic!("fault injected: panic in {}", stringify!($actor));
                    }
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delay_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for _ in 0..50 {
            let first = restart_delay(base, cap, 1);
            assert!(first >= base && first < base * 2, "{first:?}");
            let fourth = restart_delay(base, cap, 4);
            assert!(fourth >= base * 8 && fourth < base * 16, "{fourth:?}");
            assert!(restart_delay(base, cap, 30) <= cap);
        }
    }

    #[test]
    fn restart_delay_is_jittered() {
        let base = Duration::from_millis(100);
        let delays: std::collections::BTreeSet<_> = (0..20)
            .map(|_| restart_delay(base, Duration::from_secs(5), 3))
            .collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }
}
