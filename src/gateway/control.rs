//! Open ControlStreams, one per agent: the gateway's way to push config and
//! commands to agents that only ever dial out.

use crate::clock::unix_secs;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::GatewayError;
use crate::proto::control_stream_response::Payload;
use crate::proto::{CommandRequest, ControlStreamResponse};

/// Messages waiting for a slow agent; beyond this, sends fail instead of
/// buffering without bound.
const CONTROL_BUFFER: usize = 64;
/// How long an agent should consider a command valid.
const COMMAND_TTL_SECONDS: i64 = 300;

pub(crate) type ControlSender = mpsc::Sender<Result<ControlStreamResponse, Status>>;
pub(crate) type ControlReceiver = mpsc::Receiver<Result<ControlStreamResponse, Status>>;

/// An agent is known by its tenant and its id: two tenants may both have an
/// `agent-1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AgentKey {
    /// Tenant id.
    pub tenant: String,
    pub agent_id: String,
}

impl AgentKey {
    pub fn new(tenant: &str, agent_id: &str) -> Self {
        Self {
            tenant: tenant.to_owned(),
            agent_id: agent_id.to_owned(),
        }
    }
}

struct Entry {
    /// Config version last pushed on this stream (or announced in its hello).
    version: String,
    /// Distinguishes a reconnected stream from the one it replaced, so the old
    /// stream's cleanup does not unregister the new one.
    connection: u64,
    sender: ControlSender,
    /// Dropped with the entry: tells the stream's reader to stop, so both
    /// halves of the RPC end (otherwise an agent's open request stream keeps
    /// the connection, and graceful shutdown, waiting).
    _closed: oneshot::Sender<()>,
}

/// One registered stream: its id, outbound messages, and a signal that
/// resolves once the registry has dropped it (replaced, or shutdown).
pub(crate) struct Registration {
    pub connection: u64,
    pub outbound: ControlReceiver,
    pub closed: oneshot::Receiver<()>,
}

#[derive(Default)]
pub(crate) struct ControlRegistry {
    streams: Mutex<HashMap<AgentKey, Entry>>,
    next_connection: AtomicU64,
}

impl ControlRegistry {
    /// Registers a new stream for the agent, replacing (and thereby ending)
    /// any previous one.
    pub fn register(&self, key: &AgentKey, version: &str) -> Registration {
        let (sender, outbound) = mpsc::channel(CONTROL_BUFFER);
        let (closed_tx, closed) = oneshot::channel();
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            version: version.to_owned(),
            connection,
            sender,
            _closed: closed_tx,
        };
        self.lock().insert(key.clone(), entry);
        Registration {
            connection,
            outbound,
            closed,
        }
    }

    pub fn unregister(&self, key: &AgentKey, connection: u64) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|e| e.connection == connection) {
            streams.remove(key);
        }
    }

    pub fn is_connected(&self, key: &AgentKey) -> bool {
        self.lock().contains_key(key)
    }

    /// Every agent with an open stream, with the config version it has.
    pub fn connected(&self) -> Vec<(AgentKey, String)> {
        self.lock()
            .iter()
            .map(|(key, entry)| (key.clone(), entry.version.clone()))
            .collect()
    }

    /// Sends a config unless the stream already has that version, and
    /// records it as the stream's. Checked and recorded under one lock: the
    /// stream's opening push and the admin watcher may race to send the same
    /// version, and the agent must see it once. Returns whether it was sent.
    pub fn send_config(
        &self,
        key: &AgentKey,
        version: &str,
        payload: Payload,
    ) -> Result<bool, GatewayError> {
        let mut streams = self.lock();
        let entry = streams
            .get_mut(key)
            .ok_or_else(|| GatewayError::AgentNotConnected(key.agent_id.clone()))?;
        if entry.version == version {
            return Ok(false);
        }
        try_send(entry, &key.agent_id, payload)?;
        entry.version = version.to_owned();
        Ok(true)
    }

    pub fn send(&self, key: &AgentKey, payload: Payload) -> Result<(), GatewayError> {
        let streams = self.lock();
        let entry = streams
            .get(key)
            .ok_or_else(|| GatewayError::AgentNotConnected(key.agent_id.clone()))?;
        try_send(entry, &key.agent_id, payload)
    }

    /// Ends every stream (their response streams complete).
    pub fn close_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AgentKey, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Queues a message on a stream without waiting: a full buffer is an error
/// for the caller, never a stalled gateway.
fn try_send(entry: &Entry, agent_id: &str, payload: Payload) -> Result<(), GatewayError> {
    entry
        .sender
        .try_send(Ok(ControlStreamResponse {
            payload: Some(payload),
        }))
        .map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                GatewayError::ControlStreamFull(agent_id.to_owned())
            }
            mpsc::error::TrySendError::Closed(_) => {
                GatewayError::AgentNotConnected(agent_id.to_owned())
            }
        })
}

/// Builds and sends a command; returns its id.
pub(crate) fn send_command(
    registry: &ControlRegistry,
    key: &AgentKey,
    command_type: &str,
    payload: &serde_json::Value,
) -> Result<String, GatewayError> {
    if command_type.trim().is_empty() {
        return Err(GatewayError::InvalidCommand("command_type is empty".into()));
    }
    let payload_json = serde_json::to_vec(payload)
        .map_err(|e| GatewayError::InvalidCommand(format!("payload: {e}")))?;
    let command_id = uuid::Uuid::new_v4().to_string();
    registry.send(
        key,
        Payload::Command(CommandRequest {
            command_id: command_id.clone(),
            command_type: command_type.to_owned(),
            payload_json,
            ttl_seconds: COMMAND_TTL_SECONDS,
            created_at: unix_secs(),
        }),
    )?;
    tracing::info!(agent_id = %key.agent_id, tenant = %key.tenant, command_id = %command_id, command_type, "command sent");
    Ok(command_id)
}
