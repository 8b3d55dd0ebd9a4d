//! Messages to the gateway-connection actor.

use actix::Message;

/// Another actor's RPC failed with this status. The connection actor decides
/// whether the connection is unhealthy (it probes before tearing anything
/// down: one failed RPC does not end a healthy connection).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RpcFailed {
    pub rpc: &'static str,
    pub code: tonic::Code,
}

/// The gateway asked for a new heartbeat interval (GetConfig answer).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct SetHeartbeatInterval(pub std::time::Duration);
