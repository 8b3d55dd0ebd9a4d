//! What the agent tells the outside world about itself: a broadcast of events
//! (tests and the demo wait on these instead of sleeping) and per-child
//! counters (restarts, panics), readable at any time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::messages::ChildId;

/// Something that happened in the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    ChildStarted {
        child: ChildId,
        generation: u64,
    },
    ChildFailed {
        child: ChildId,
        reason: String,
        panicked: bool,
    },
    ChildRestartScheduled {
        child: ChildId,
        restarts_in_window: u32,
        delay: Duration,
    },
    RestartIntensityExceeded {
        child: ChildId,
        restarts: u32,
        window: Duration,
    },
    GatewayConnected {
        gateway_id: String,
    },
    GatewayDisconnected {
        reason: String,
    },
    ConfigApplied {
        version: String,
        sources: usize,
    },
    ConfigRejected {
        version: String,
        reason: String,
    },
    SourceStarted {
        name: String,
        generation: u64,
    },
    SourceStopped {
        name: String,
    },
    SourceInvalid {
        name: String,
        reason: String,
    },
    RunStaged {
        source: String,
        run_id: String,
        devices: u64,
    },
    /// A staged run is durably in the spool, waiting for delivery.
    RunSpooled {
        source: String,
        run_id: String,
        devices: u64,
    },
    RunSkipped {
        source: String,
        reason: String,
    },
    /// A spooled run dropped whole (spool over its limit, or damaged files).
    RunDropped {
        source: String,
        run_id: String,
        devices: u64,
        reason: String,
    },
    RunDelivered {
        source: String,
        run_id: String,
        devices: u64,
        chunks: u32,
    },
    RunReported {
        source: String,
        run_id: String,
        ok: bool,
        error: Option<String>,
    },
}

/// Counters for one supervised child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChildStats {
    pub starts: u64,
    pub restarts: u64,
    pub panics: u64,
    pub failures: u64,
}

/// Shared by all actors through [`super::AgentContext`].
pub struct Telemetry {
    events: broadcast::Sender<AgentEvent>,
    children: Mutex<BTreeMap<ChildId, ChildStats>>,
    /// Scheduled runs skipped because the previous run awaited delivery.
    runs_skipped: AtomicU64,
    /// Spooled runs dropped whole.
    runs_dropped: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        // Large enough that a test reading events while 10 runs stream past
        // does not lag; a lagging reader only loses events, never blocks us.
        let (events, _) = broadcast::channel(4096);
        Self {
            events,
            children: Mutex::default(),
            runs_skipped: AtomicU64::new(0),
            runs_dropped: AtomicU64::new(0),
        }
    }
}

impl Telemetry {
    pub fn emit(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Updates one child's counters.
    pub fn with_child(&self, child: &ChildId, f: impl FnOnce(&mut ChildStats)) {
        if let Ok(mut map) = self.children.lock() {
            f(map.entry(child.clone()).or_default());
        }
    }

    pub fn count_skipped_run(&self) {
        self.runs_skipped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_dropped_run(&self) {
        self.runs_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Scheduled runs skipped so far (previous run still undelivered).
    pub fn runs_skipped(&self) -> u64 {
        self.runs_skipped.load(Ordering::Relaxed)
    }

    /// Spooled runs dropped so far (spool limit, damaged files).
    pub fn runs_dropped(&self) -> u64 {
        self.runs_dropped.load(Ordering::Relaxed)
    }

    /// A snapshot of every child's counters.
    pub fn children(&self) -> BTreeMap<ChildId, ChildStats> {
        self.children.lock().map(|m| m.clone()).unwrap_or_default()
    }
}
