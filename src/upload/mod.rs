//! Delivery of a run's updates (wire.md §5–6), in three steps:
//!
//! 1. [`staging`]: the run is written to disk as it is produced, each update
//!    JSON-encoded once, so memory does not grow with the run;
//! 2. [`chunking`]: once the run is complete, its chunks are planned from the
//!    lengths alone and built by splicing each chunk's `sync_meta` into the
//!    staged bytes;
//! 3. [`envelope`]: each chunk is wrapped in a `GatewayStatusChunk`, and
//!    every run, delivered or not, is reported with a `PushStatus`.
//!
//! Between 1 and 2, a completely staged run enters the [`spool`]: it stays
//! on disk, in order, until the gateway has acknowledged it.

pub mod chunking;
pub mod envelope;
pub mod spool;
pub mod staging;

pub use chunking::{plan, Chunk, ChunkLimits, ChunkPlan, ChunkReader, ChunkSpan, RunIds};
pub use envelope::{EnvelopeFields, RunReport, MAX_REPORT_BYTES};
pub use spool::Spool;
pub use staging::{RunWriter, StagedRun, MAX_UPDATE_BYTES};
