//! Starting and running the agent: the supervision tree inside an actix System.

use std::sync::Arc;

use actix::{Actor, Addr};

use crate::actors::{AgentContext, Supervisor};
use crate::config::bootstrap::Bootstrap;
use crate::messages::{Drain, Shutdown};
use crate::upload::spool::{Spool, SpoolError};

/// A running agent inside the current actix System.
pub struct AgentHandle {
    pub context: Arc<AgentContext>,
    pub supervisor: Addr<Supervisor>,
}

impl AgentHandle {
    /// Stops the supervision tree (children are not restarted).
    pub fn shutdown(&self) {
        self.supervisor.do_send(Shutdown);
    }

    /// Stops every source (runs in progress are cut, nothing new is
    /// scheduled) while the uploader goes on delivering the spool.
    pub fn drain(&self) {
        self.supervisor.do_send(Drain);
    }

    /// The SIGTERM sequence: drain, then wait until the spool is delivered,
    /// `grace` has passed or `interrupt` resolves (a second signal), and stop
    /// the tree. What is not delivered stays spooled for the next start.
    pub async fn drain_and_stop(
        &self,
        grace: std::time::Duration,
        interrupt: impl std::future::Future<Output = ()>,
    ) {
        self.drain();
        let spool = &self.context.spool;
        tokio::select! {
            () = spool.wait_idle() => tracing::info!("everything spooled was delivered"),
            () = tokio::time::sleep(grace) => {
                let (runs, bytes) = spool.usage();
                tracing::warn!(runs, bytes, "shutdown grace of {} over: what is undelivered stays spooled for the next start",
                    humantime::format_duration(grace));
            }
            () = interrupt => tracing::warn!("second termination signal: stopping now; the spool is kept"),
        }
        self.shutdown();
    }
}

/// Keeps the agent's memory flat whatever the run size; call it first thing
/// in an agent process, before any thread starts. Chunks (up to 1 MiB) are
/// built on a blocking thread and freed on the actor thread; glibc raises its
/// mmap threshold after the first such free and from then on carves these
/// buffers out of per-thread heaps, which fragment and grow with the number
/// of chunks. A fixed threshold keeps every large buffer in its own mapping,
/// returned to the OS when freed (1M devices: peak RSS about 1.05× that of
/// 100k instead of up to 1.4×; README, Benchmark).
pub fn pin_malloc_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Starts the supervision tree. Must be called inside an actix System.
/// Fails only if the spool directory cannot be opened.
pub fn start(mut bootstrap: Bootstrap) -> Result<AgentHandle, SpoolError> {
    for warning in &bootstrap.warnings {
        tracing::warn!("{warning}");
    }
    // An onboarding bundle's agent.json names no state directory. When the
    // default one is not writable (not root, no systemd StateDirectory), use
    // a private temporary one rather than failing: the operator is told.
    if !bootstrap.state_dir_configured {
        if let Err(e) = std::fs::create_dir_all(&bootstrap.state_dir) {
            let fallback =
                std::env::temp_dir().join(format!("serviceradar-agent-{}", bootstrap.agent_id));
            tracing::warn!(
                "default state directory {} is unusable ({e}); using {} (set state_dir in the bootstrap file)",
                bootstrap.state_dir.display(),
                fallback.display()
            );
            bootstrap.state_dir = fallback;
        }
    }
    let (spool, recovery) = Spool::open(
        &AgentContext::spool_dir(&bootstrap),
        bootstrap.spool.max_bytes,
    )?;
    if !recovery.pending.is_empty() {
        let devices: u64 = recovery.pending.iter().map(|p| p.2).sum();
        tracing::info!(
            runs = recovery.pending.len(),
            devices,
            "replaying runs spooled before the last stop, oldest first"
        );
    }
    if !recovery.removed_incomplete.is_empty() {
        tracing::warn!(
            files = recovery.removed_incomplete.len(),
            "removed files of runs whose staging was interrupted"
        );
    }
    let context = AgentContext::new(bootstrap, Arc::new(spool));
    for dropped in recovery.dropped {
        context.run_dropped(dropped);
    }
    let supervisor = Supervisor::new(context.clone()).start();
    Ok(AgentHandle {
        context,
        supervisor,
    })
}

/// Runs the agent until SIGINT/SIGTERM or a restart-intensity escalation;
/// returns the process exit code. A termination signal drains: no new runs,
/// uploads go on for up to `spool.shutdown_grace`, the spool is kept, exit 0.
pub fn run(bootstrap: Bootstrap) -> anyhow::Result<i32> {
    let system = actix_rt::System::new();
    system.block_on(async move {
        tracing::info!(
            agent_id = %bootstrap.agent_id,
            gateway = %bootstrap.gateway_addr,
            version = crate::VERSION,
            "starting serviceradar-agent"
        );
        let grace = bootstrap.spool.shutdown_grace;
        let handle = start(bootstrap)?;
        actix_rt::spawn(async move {
            wait_for_termination().await;
            tracing::info!(
                "termination signal received; no new runs, delivering the spool for up to {}",
                humantime::format_duration(grace)
            );
            handle.drain_and_stop(grace, wait_for_termination()).await;
            actix_rt::System::current().stop();
        });
        anyhow::Ok(())
    })?;
    Ok(system.run_with_code()?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
