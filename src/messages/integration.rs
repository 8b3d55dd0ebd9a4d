//! Messages to integration actors.

use actix::Message;

/// Run the source now (`sync.run_now`). Fails when a run is in progress.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<(), String>")]
pub struct RunNow;

/// A run of this source panicked (in page processing or generation): the
/// actor stops with that reason, so the supervisor restarts it with backoff.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RunPanicked(pub String);

/// The Faker generator's state after a run (its churn carries over to the
/// next run), for the incarnation of the source's actor that is current
/// when the run ends; kept only if its config is the same.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KeepGenerator {
    pub config_hash: String,
    pub generator: Box<crate::sources::faker::FakerGenerator>,
}
