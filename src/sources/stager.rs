//! The staging half of an HTTP source run.
//!
//! The fetch loop (async, on the actor's thread) downloads a page and hands
//! its raw body to a [`PageStager`]. Pages are parsed, mapped and
//! JSON-encoded on the blocking pool, several at once (one per core, up to
//! [`MAX_PAGE_WORKERS`]), while the fetch loop is already downloading the
//! next page; a single writer thread appends their batches to the run's
//! staging file in page order. Memory is bounded by a few pages whatever
//! the inventory size, and page buffers are reused.
//!
//! Deduplication happens in the writer, in page order: a device whose id
//! was already seen in this run (several Armis queries, NetBox pages that
//! shift while they are walked) is dropped and counted as a duplicate.
//!
//! A run is delivered only if it is complete: unless the fetch loop calls
//! [`PageStager::finish`], the staging file is removed.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use roaring::RoaringTreemap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::http::FetchError;
use super::runner::RunFailure;
use super::{Mapped, RunCounts};
use crate::upload::staging::{EncodedBatch, RunWriter, StagedRun};

/// Upper bound on pages processed at once.
pub const MAX_PAGE_WORKERS: usize = 4;

/// What became of one device of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Encoded as the next line of the page's batch.
    Emitted,
    NoIp,
    Blacklisted,
    /// Unreadable (wrong types) or too large for the gateway.
    Invalid,
}

/// One page's devices, mapped and encoded on a worker thread. Sources call
/// [`emit`](Self::emit) or [`invalid`](Self::invalid) once per device, in
/// page order.
#[derive(Default)]
pub struct DeviceSink {
    batch: EncodedBatch,
    /// Each device's source id (for deduplication) and fate, in page order.
    devices: Vec<(Option<i64>, Fate)>,
    first_invalid: Option<String>,
}

impl DeviceSink {
    /// Forgets everything emitted so far (a page read again another way).
    pub fn clear(&mut self) {
        self.batch.clear();
        self.devices.clear();
        self.first_invalid = None;
    }

    /// Encodes a mapped device or records why it was dropped. `id` is the
    /// source's device id. An update too large for the gateway is counted
    /// as invalid and skipped; it does not fail the run.
    pub fn emit(&mut self, id: Option<i64>, mapped: Mapped) -> Result<(), FetchError> {
        let fate = match mapped {
            Mapped::Update(update) => match self.batch.push(&update) {
                Ok(()) => Fate::Emitted,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.note_invalid(|| format!("device id {id:?}: {e}"));
                    Fate::Invalid
                }
                Err(e) => return Err(FetchError::Staging(e)),
            },
            Mapped::NoIp => Fate::NoIp,
            Mapped::Blacklisted => Fate::Blacklisted,
        };
        self.devices.push((id, fate));
        Ok(())
    }

    /// Records a device dropped before encoding.
    pub fn skip(&mut self, id: Option<i64>, why: Skip) {
        let fate = match why {
            Skip::NoIp => Fate::NoIp,
            Skip::Blacklisted => Fate::Blacklisted,
        };
        self.devices.push((id, fate));
    }

    /// Appends an update `write` encodes itself (see
    /// [`EncodedBatch::push_json`]). Too large for the gateway ⇒ counted as
    /// invalid and skipped.
    pub fn emit_json(&mut self, id: Option<i64>, write: impl FnOnce(&mut Vec<u8>)) {
        let fate = match self.batch.push_json(write) {
            Ok(()) => Fate::Emitted,
            Err(e) => {
                self.note_invalid(|| format!("device id {id:?}: {e}"));
                Fate::Invalid
            }
        };
        self.devices.push((id, fate));
    }

    /// Counts a device object that could not be read (wrong types) and keeps
    /// the first such error for the run report.
    pub fn invalid(&mut self, id: Option<i64>, what: impl FnOnce() -> String) {
        self.note_invalid(what);
        self.devices.push((id, Fate::Invalid));
    }

    fn note_invalid(&mut self, what: impl FnOnce() -> String) {
        if self.first_invalid.is_none() {
            self.first_invalid = Some(what());
        }
    }
}

/// Why a device was dropped before it was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No valid IP address.
    NoIp,
    /// Its IP is inside the source's `network_blacklist`.
    Blacklisted,
}

/// A finished, complete run.
pub struct StageOutput {
    pub staged: StagedRun,
    pub counts: RunCounts,
    /// The first device that could not be read, for the run report.
    pub first_invalid: Option<String>,
}

/// The writer thread's state: the staging file, the run's counters and the
/// ids already emitted.
struct Collector {
    writer: RunWriter,
    /// A compressed bitmap: about 130 KiB for a million dense ids.
    seen: RoaringTreemap,
    counts: RunCounts,
    first_invalid: Option<String>,
}

impl Collector {
    fn add(&mut self, sink: &mut DeviceSink) -> io::Result<()> {
        let mut line = 0;
        let mut drop_lines: Vec<usize> = Vec::new();
        for &(id, fate) in &sink.devices {
            // Ids are compared as bit patterns: a negative id is still an id.
            let duplicate = id.is_some_and(|id| !self.seen.insert(id as u64));
            if duplicate {
                self.counts.skipped_duplicate += 1;
                if fate == Fate::Emitted {
                    drop_lines.push(line);
                }
            } else {
                match fate {
                    Fate::Emitted => self.counts.devices += 1,
                    Fate::NoIp => self.counts.skipped_no_ip += 1,
                    Fate::Blacklisted => self.counts.blacklisted += 1,
                    Fate::Invalid => self.counts.skipped_invalid += 1,
                }
            }
            if fate == Fate::Emitted {
                line += 1;
            }
        }
        if !drop_lines.is_empty() {
            let mut drop = drop_lines.into_iter().peekable();
            sink.batch.retain(|i| drop.next_if_eq(&i).is_none());
        }
        if self.first_invalid.is_none() {
            self.first_invalid = sink.first_invalid.take();
        }
        self.writer.write_batch(&sink.batch)
    }
}

/// Processes one page into a [`DeviceSink`]; shared by the page workers.
type Process<P> = Arc<dyn Fn(P, &mut DeviceSink) -> Result<(), FetchError> + Send + Sync>;

enum ToWriter {
    Page(DeviceSink),
    /// The run is complete: finish the staged run.
    Finish,
}

/// Feeds pages to the page workers and the writer thread. `P` is whatever
/// a source needs to process a page (its body plus, e.g., the query label).
pub struct PageStager<P: Send + 'static> {
    process: Process<P>,
    /// Pages being processed, oldest first.
    in_flight: VecDeque<JoinHandle<Result<DeviceSink, FetchError>>>,
    workers: usize,
    to_writer: mpsc::Sender<ToWriter>,
    writer: JoinHandle<Result<StageOutput, FetchError>>,
    /// Emptied sinks handed back by the writer for reuse.
    spare: Arc<Mutex<Vec<DeviceSink>>>,
    /// Set once an error was returned: the run is over.
    failed: bool,
    /// Set once the writer's `JoinHandle` has been awaited (it panics when
    /// polled again after completion).
    writer_joined: bool,
}

impl<P: Send + 'static> PageStager<P> {
    /// Starts the writer thread. `process` parses one page and emits its
    /// devices; its first error ends the run.
    pub fn start(
        writer: RunWriter,
        process: impl Fn(P, &mut DeviceSink) -> Result<(), FetchError> + Send + Sync + 'static,
    ) -> Self {
        let workers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_PAGE_WORKERS);
        let spare: Arc<Mutex<Vec<DeviceSink>>> = Arc::default();
        let (to_writer, pages) = mpsc::channel::<ToWriter>(1);
        let writer = {
            let spare = spare.clone();
            tokio::task::spawn_blocking(move || write_pages(writer, pages, &spare))
        };
        Self {
            process: Arc::new(process),
            in_flight: VecDeque::new(),
            workers,
            to_writer,
            writer,
            spare,
            failed: false,
            writer_joined: false,
        }
    }

    /// Starts processing a page. While every worker is busy, waits for the
    /// oldest page and passes it to the writer first. Returns the first
    /// error of a page or of the writer.
    pub async fn push(&mut self, page: P) -> Result<(), FetchError> {
        if self.failed {
            return Err(FetchError::Cancelled);
        }
        while self.in_flight.len() >= self.workers {
            self.write_oldest().await?;
        }
        let process = self.process.clone();
        let mut sink = self
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_default();
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                process(page, &mut sink).map(|()| sink)
            }));
        Ok(())
    }

    /// Waits for the oldest page in flight and hands it to the writer.
    async fn write_oldest(&mut self) -> Result<(), FetchError> {
        let result = self.try_write_oldest().await;
        self.failed |= result.is_err();
        result
    }

    async fn try_write_oldest(&mut self) -> Result<(), FetchError> {
        let Some(oldest) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let sink = oldest.await.map_err(join_failure)??;
        if self.to_writer.send(ToWriter::Page(sink)).await.is_ok() {
            return Ok(());
        }
        // The writer ended early: only an error makes it do that.
        self.writer_joined = true;
        match (&mut self.writer).await {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(FetchError::Cancelled),
            Err(join) => Err(join_failure(join)),
        }
    }

    /// The run is complete: wait for the last pages to be staged.
    pub async fn finish(mut self) -> Result<StageOutput, FetchError> {
        if self.failed {
            // `push` already returned the error; make sure nothing is left.
            self.abandon().await;
            return Err(FetchError::Cancelled);
        }
        while !self.in_flight.is_empty() {
            if let Err(e) = self.write_oldest().await {
                self.abandon().await;
                return Err(e);
            }
        }
        // A send error means the writer already ended; its result says why.
        let _ = self.to_writer.send(ToWriter::Finish).await;
        self.writer.await.map_err(join_failure)?
    }

    /// Ends a run whose fetch loop returned `walked`: finishes it when the
    /// walk succeeded, abandons it otherwise. `fetched` carries the fetch
    /// loop's counters (pages, retries), kept on success and on failure.
    pub async fn conclude(
        self,
        walked: Result<(), FetchError>,
        fetched: RunCounts,
    ) -> Result<StageOutput, RunFailure> {
        let result = match walked {
            Ok(()) => self.finish().await,
            Err(e) => {
                self.abandon().await;
                Err(e)
            }
        };
        match result {
            Ok(mut output) => {
                output.counts.pages = fetched.pages;
                output.counts.retries = fetched.retries;
                Ok(output)
            }
            Err(error) => Err(RunFailure::new(error, fetched)),
        }
    }

    /// The run failed: remove what was staged and wait until it is gone.
    /// Pages still being processed finish on their own and are dropped.
    pub async fn abandon(self) {
        drop(self.to_writer);
        if !self.writer_joined {
            let _ = self.writer.await;
        }
    }
}

/// The writer thread: appends pages in order until told to finish. Closed
/// without `Finish`, or failing to write, it removes the incomplete run: an
/// incomplete run is never delivered (sources.md).
fn write_pages(
    writer: RunWriter,
    mut pages: mpsc::Receiver<ToWriter>,
    spare: &Mutex<Vec<DeviceSink>>,
) -> Result<StageOutput, FetchError> {
    let mut collector = Collector {
        writer,
        seen: RoaringTreemap::new(),
        counts: RunCounts::default(),
        first_invalid: None,
    };
    let failure = loop {
        match pages.blocking_recv() {
            Some(ToWriter::Page(mut sink)) => {
                if let Err(e) = collector.add(&mut sink) {
                    break FetchError::Staging(e);
                }
                sink.clear();
                if let Ok(mut spare) = spare.lock() {
                    spare.push(sink);
                }
            }
            Some(ToWriter::Finish) => {
                return Ok(StageOutput {
                    staged: collector.writer.finish()?,
                    counts: collector.counts,
                    first_invalid: collector.first_invalid,
                });
            }
            // The fetch loop gave up or was dropped (deadline).
            None => break FetchError::Cancelled,
        }
    };
    if let Err(discard) = collector.writer.discard() {
        tracing::warn!("cannot remove an incomplete staged run: {discard}");
    }
    Err(failure)
}

/// The `id` of a device object that could not be read as a whole, so that
/// it still takes part in deduplication.
pub fn raw_id(raw: &serde_json::value::RawValue) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<i64>,
    }
    serde_json::from_str::<IdOnly>(raw.get())
        .ok()
        .and_then(|d| d.id)
}

/// A panic in page processing becomes [`FetchError::Panicked`]: the run is
/// failed and the integration actor restarts.
fn join_failure(e: tokio::task::JoinError) -> FetchError {
    if e.is_panic() {
        FetchError::Panicked(crate::actors::supervisor::panic_message(&*e.into_panic()))
    } else {
        FetchError::Cancelled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::UpdateContext;

    fn update(ip: &str) -> Mapped {
        let ctx = UpdateContext {
            agent_id: "a".into(),
            gateway_id: "g".into(),
            partition: "p".into(),
            source: "armis",
            timestamp: "t".into(),
        };
        Mapped::Update(ctx.update(ip.into(), None, None, Default::default()))
    }

    /// A failed page has already ended the run: pushing again or abandoning
    /// afterwards must not poll a finished `JoinHandle` a second time.
    #[tokio::test]
    async fn a_failed_page_fails_the_run_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RunWriter::create(dir.path(), "run").unwrap();
        let mut stager = PageStager::start(writer, |page: u32, sink: &mut DeviceSink| {
            if page == 3 {
                return Err(FetchError::bad_response("GET /x (page 3)", "broken page"));
            }
            sink.emit(Some(page.into()), update(&format!("10.0.0.{page}")))
        });
        let mut error = None;
        for page in 0..100 {
            if let Err(e) = stager.push(page).await {
                error = Some(e);
                break;
            }
        }
        let error = match error {
            Some(e) => {
                assert_eq!(stager.push(7).await.unwrap_err().kind(), "cancelled");
                stager.abandon().await;
                e
            }
            None => stager.finish().await.err().expect("the run fails"),
        };
        assert_eq!(error.kind(), "bad_response");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Pages are processed in parallel but written in order; duplicates
    /// are dropped in page order, whichever worker finished first.
    #[tokio::test]
    async fn pages_are_written_in_order_and_duplicates_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let writer = RunWriter::create(dir.path(), "run").unwrap();
        let mut stager = PageStager::start(writer, |page: u32, sink: &mut DeviceSink| {
            // Later pages repeat the previous page's last id.
            for i in 0..10u32 {
                let id = page * 9 + i;
                sink.emit(
                    Some(id.into()),
                    update(&format!("10.0.{}.{}", id / 200, id % 200)),
                )?;
            }
            sink.emit(None, Mapped::NoIp)?;
            sink.invalid(Some(10_000 + i64::from(page)), || format!("page {page}"));
            Ok(())
        });
        for page in 0..20 {
            stager.push(page).await.unwrap();
        }
        let output = stager.finish().await.unwrap();
        let c = output.counts;
        assert_eq!(c.devices, 20 * 9 + 1);
        assert_eq!(c.skipped_duplicate, 19);
        assert_eq!((c.skipped_no_ip, c.skipped_invalid), (20, 20));
        assert_eq!(output.first_invalid.as_deref(), Some("page 0"));
        let text = std::fs::read_to_string(&output.staged.data_path).unwrap();
        let ips: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["ip"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        let expected: Vec<String> = (0..=20 * 9)
            .map(|id| format!("10.0.{}.{}", id / 200, id % 200))
            .collect();
        assert_eq!(ips, expected);
    }
}
