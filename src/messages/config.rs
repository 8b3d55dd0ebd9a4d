//! Messages to the config actor.

use actix::Message;

/// Fetch the config now (Hello said `config_outdated`, or we just enrolled).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct FetchConfigNow;
