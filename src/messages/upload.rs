//! Messages to the chunk uploader.

use actix::Message;

use crate::upload::envelope::RunReport;
use crate::upload::staging::StagedRun;

/// A run staged on disk, ready to be chunked and streamed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DeliverRun {
    pub staged: StagedRun,
    pub sync_service_id: String,
    /// The report pushed once the run is delivered (`ok`, counts, duration).
    pub report: RunReport,
}

/// A run that produced nothing to deliver (failed, or zero devices): only its
/// report is pushed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReportRun(pub RunReport);
