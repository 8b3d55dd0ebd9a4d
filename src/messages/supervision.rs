//! Messages to the supervisor.

use std::fmt;

use actix::Message;

use crate::config::sources::SyncConfig;

/// Names a supervised child.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildId {
    Gateway,
    Config,
    Uploader,
    /// An integration actor, by source name.
    Source(String),
}

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildId::Gateway => f.write_str("gateway-connection"),
            ChildId::Config => f.write_str("config"),
            ChildId::Uploader => f.write_str("chunk-uploader"),
            ChildId::Source(name) => write!(f, "integration[{name}]"),
        }
    }
}

/// Why a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The child stopped itself (an intentional stop or a handled failure).
    Stopped(String),
    /// A panic was caught in the child's work, or the child's task died
    /// without passing through `stopped()` (an uncaught handler panic).
    Panicked(String),
}

impl ExitReason {
    pub fn is_panic(&self) -> bool {
        matches!(self, ExitReason::Panicked(_))
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Stopped(why) => write!(f, "stopped: {why}"),
            ExitReason::Panicked(why) => write!(f, "panicked: {why}"),
        }
    }
}

/// Sent by a child's [`crate::actors::supervisor::ChildGuard`] when the child
/// ends, however it ends.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ChildExited {
    pub child: ChildId,
    pub generation: u64,
    pub reason: ExitReason,
}

/// The config actor's desired set of sources; the supervisor starts, restarts
/// and stops integration actors so that exactly these run.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReconcileSources(pub SyncConfig);

/// A fault to inject into a child (chaos and supervision tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The child stops itself.
    Stop,
    /// The child's handler panics.
    Panic,
}

/// Delivered to a child to make it fail on purpose.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct InjectFault(pub FaultKind);

/// Stops a child for good (its source vanished or changed, or the tree is
/// shutting down); the supervisor ignores its exit.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct StopChild;

/// Asks the supervisor to inject a fault into one child. Answers false when
/// no such child is running.
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct InjectChildFault {
    pub child: ChildId,
    pub fault: FaultKind,
}

/// Begins a graceful stop: every source is stopped and none is started
/// again (config pushes are ignored), while the gateway connection and the
/// uploader keep delivering the spool.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Drain;

/// Ends the supervision tree: children are stopped and not restarted.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// A child's incarnation number and whether it is running now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildState {
    pub generation: u64,
    pub running: bool,
}

/// Asks the supervisor which children it has. Handled in mailbox order, so
/// an answer reflects every message sent to the supervisor before it.
#[derive(Message, Debug)]
#[rtype(result = "std::collections::BTreeMap<ChildId, ChildState>")]
pub struct GetChildren;
