//! Messages to integration actors.

use actix::Message;

/// Run the source now (`sync.run_now`). Fails when a run is in progress.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), String>")]
pub struct RunNow;
