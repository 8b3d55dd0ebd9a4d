//! The durable spool: every completely staged run waits here, on disk, until
//! the gateway has acknowledged it, in the order the runs were staged.
//!
//! A spooled run is three files in the spool directory:
//! - `<run_id>.jsonl` and `<run_id>.len`: the staged updates (see
//!   [`super::staging`]), fsynced by [`super::RunWriter::finish`];
//! - `<run_id>.run`: its [`RunManifest`] (JSON), written to a temporary file,
//!   fsynced, renamed into place and the directory fsynced. The manifest is
//!   what makes a run *spooled*: data files without one are a run whose
//!   staging was interrupted (or whose removal was), and are deleted at open.
//!
//! The spool also queues run reports (of failed, skipped and dropped runs,
//! and of delivered runs until they are pushed) so that the uploader can be
//! restarted at any moment: its whole state lives here, and a new
//! incarnation resumes with the oldest job. Reports are kept in memory only;
//! runs survive a crash of the process (SIGKILL included).
//!
//! The spool has a size limit: once spooled runs take more than
//! `max_bytes`, the oldest whole run is dropped (its files deleted, its
//! upload cancelled if it was being uploaded) and replaced in the queue by a
//! failed run report. A run is never half-dropped.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::envelope::RunReport;
use super::staging::StagedRun;

/// Default `spool.max_bytes`: 512 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 512 * 1024 * 1024;

/// Most reports kept waiting (a long outage with many skipped runs); beyond
/// it the oldest *report* is forgotten, never a run.
const MAX_QUEUED_REPORTS: usize = 10_000;

const MANIFEST_EXT: &str = "run";
const MANIFEST_VERSION: u32 = 1;

/// What a spooled run needs, besides its data, to be delivered the same way
/// after a restart: the chunk plan must come out identical (the gateway
/// checks `total_chunks`), so the chunk size used is kept with the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunManifest {
    pub version: u32,
    /// Position in the delivery order (increasing across restarts).
    pub seq: u64,
    pub run_id: String,
    pub sync_service_id: String,
    pub chunk_max_updates: usize,
    /// Chunks per StreamStatus call: with the chunk size, this fixes how
    /// the run is split, so that acknowledged streams can be skipped.
    pub stream_max_chunks: usize,
    /// Streams the gateway has acknowledged: a resumed upload starts after
    /// them.
    #[serde(default)]
    pub acked_streams: u32,
    pub device_count: u64,
    /// Size of `<run_id>.jsonl`.
    pub bytes: u64,
    /// The report pushed once the run is delivered.
    pub report: RunReport,
}

/// How a run is cut for delivery, fixed when it is spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub chunk_max_updates: usize,
    pub stream_max_chunks: usize,
}

/// A run waiting for delivery, as handed to the uploader.
#[derive(Debug, Clone)]
pub struct SpooledRun {
    pub seq: u64,
    pub staged: StagedRun,
    pub sync_service_id: String,
    pub chunk_max_updates: usize,
    pub stream_max_chunks: usize,
    pub acked_streams: u32,
    pub report: RunReport,
    /// Becomes `true` when the run is dropped (spool over its limit) while
    /// it is being uploaded: the upload stops.
    pub dropped: watch::Receiver<bool>,
}

/// The next thing the uploader must do, oldest first.
#[derive(Debug, Clone)]
pub enum Job {
    Deliver(SpooledRun),
    Report { seq: u64, report: RunReport },
}

impl Job {
    pub fn seq(&self) -> u64 {
        match self {
            Job::Deliver(run) => run.seq,
            Job::Report { seq, .. } => *seq,
        }
    }
}

/// A run dropped to bring the spool back under its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedRun {
    pub source: String,
    pub run_id: String,
    pub devices: u64,
    pub bytes: u64,
    pub reason: String,
}

/// What the spool found at open.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Runs waiting for delivery, oldest first: (source, run id, devices).
    pub pending: Vec<(String, String, u64)>,
    /// Files of interrupted stagings (or interrupted removals) deleted.
    pub removed_incomplete: Vec<PathBuf>,
    /// Runs whose files are damaged: dropped, and reported failed.
    pub dropped: Vec<DroppedRun>,
}

#[derive(Debug, thiserror::Error)]
#[error("spool directory {}: {what}: {source}", dir.display())]
pub struct SpoolError {
    pub dir: PathBuf,
    pub what: String,
    #[source]
    pub source: io::Error,
}

struct RunEntry {
    manifest: RunManifest,
    staged: StagedRun,
    dropped: watch::Sender<bool>,
}

impl RunEntry {
    fn spooled(&self) -> SpooledRun {
        SpooledRun {
            seq: self.manifest.seq,
            staged: self.staged.clone(),
            sync_service_id: self.manifest.sync_service_id.clone(),
            chunk_max_updates: self.manifest.chunk_max_updates,
            stream_max_chunks: self.manifest.stream_max_chunks,
            acked_streams: self.manifest.acked_streams,
            report: self.manifest.report.clone(),
            dropped: self.dropped.subscribe(),
        }
    }

    /// Disk space the run takes: updates plus their lengths.
    fn disk_bytes(&self) -> u64 {
        self.staged.bytes + self.staged.device_count * 4
    }
}

enum Entry {
    Run(RunEntry),
    Report(RunReport),
}

#[derive(Default)]
struct State {
    next_seq: u64,
    jobs: BTreeMap<u64, Entry>,
    /// Disk bytes of the runs in `jobs`.
    run_bytes: u64,
    reports: usize,
}

/// Shared by the integration actors (which admit runs and queue reports)
/// and the uploader (which takes jobs oldest first); it outlives both.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Bumped on every change, so that waiters wake up.
    changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`: runs spooled by a
    /// previous process are queued again in their order, leftovers of
    /// interrupted stagings are deleted, and damaged runs are dropped with a
    /// failed report. Blocking (file system).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Recovery), SpoolError> {
        let fail = |what: &str| {
            let dir = dir.to_owned();
            let what = what.to_owned();
            move |source| SpoolError { dir, what, source }
        };
        fs::create_dir_all(dir).map_err(fail("cannot create it"))?;
        let mut by_stem: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(fail("cannot list it"))? {
            let path = entry.map_err(fail("cannot list it"))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // `<run_id>.<ext>` and `<run_id>.run.tmp`; run ids contain no dot
            // but may in theory, so split at the first known extension.
            let stem = [".run.tmp", ".run", ".jsonl", ".len"]
                .iter()
                .find_map(|ext| name.strip_suffix(ext));
            match stem {
                Some(stem) if !stem.is_empty() => {
                    by_stem.entry(stem.to_owned()).or_default().push(path)
                }
                _ => {
                    tracing::warn!(path = %path.display(), "unknown file in the spool directory left alone")
                }
            }
        }
        let mut recovery = Recovery::default();
        let mut state = State::default();
        for (run_id, paths) in by_stem {
            let manifest_path = dir.join(format!("{run_id}.{MANIFEST_EXT}"));
            let manifest = if manifest_path.exists() {
                Some(read_manifest(&manifest_path, &run_id))
            } else {
                None
            };
            let staged = staged_paths(dir, &run_id);
            match manifest {
                Some(Ok(manifest)) => {
                    let staged = StagedRun {
                        device_count: manifest.device_count,
                        bytes: manifest.bytes,
                        ..staged
                    };
                    match check_data(&staged) {
                        Ok(()) => {
                            for p in &paths {
                                if p.extension().is_some_and(|e| e == "tmp") {
                                    let _ = fs::remove_file(p);
                                }
                            }
                            recovery.pending.push((
                                manifest.report.source.clone(),
                                run_id.clone(),
                                manifest.device_count,
                            ));
                            state.next_seq = state.next_seq.max(manifest.seq + 1);
                            let entry = RunEntry {
                                manifest,
                                staged,
                                dropped: watch::channel(false).0,
                            };
                            state.run_bytes += entry.disk_bytes();
                            state.jobs.insert(entry.manifest.seq, Entry::Run(entry));
                        }
                        Err(damage) => {
                            remove_all(&paths);
                            let reason =
                                format!("spooled run {run_id} is damaged ({damage}); dropped");
                            let dropped = DroppedRun {
                                source: manifest.report.source.clone(),
                                run_id: run_id.clone(),
                                devices: manifest.device_count,
                                bytes: manifest.bytes,
                                reason: reason.clone(),
                            };
                            state.next_seq = state.next_seq.max(manifest.seq + 1);
                            state.jobs.insert(
                                manifest.seq,
                                Entry::Report(failed_report(manifest.report, reason)),
                            );
                            state.reports += 1;
                            recovery.dropped.push(dropped);
                        }
                    }
                }
                Some(Err(reason)) => {
                    // Without a readable manifest nobody can say which source
                    // the run was of: log it and clean up.
                    tracing::error!(run_id, "{reason}; its files are deleted");
                    remove_all(&paths);
                    recovery.removed_incomplete.extend(paths);
                }
                None => {
                    remove_all(&paths);
                    recovery.removed_incomplete.extend(paths);
                }
            }
        }
        let spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            state: Mutex::new(state),
            changed: watch::channel(0).0,
        };
        // A lowered limit applies to what was already spooled.
        let over = spool.enforce_limit();
        recovery.dropped.extend(over);
        Ok((spool, recovery))
    }

    /// Where runs are staged and spooled.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // mutation below is a single map operation): keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Spools a completely staged run: writes its manifest durably and queues
    /// it behind everything already spooled. Then, if the spool is over its
    /// limit, drops the oldest runs (possibly this one) and returns them.
    /// Blocking (fsync). On error the run's files are left for the caller
    /// to remove.
    pub fn admit(
        &self,
        staged: StagedRun,
        sync_service_id: String,
        split: Split,
        report: RunReport,
    ) -> Result<Vec<DroppedRun>, SpoolError> {
        let seq = {
            let mut state = self.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            seq
        };
        let manifest = RunManifest {
            version: MANIFEST_VERSION,
            seq,
            run_id: staged.run_id.clone(),
            sync_service_id,
            chunk_max_updates: split.chunk_max_updates,
            stream_max_chunks: split.stream_max_chunks,
            acked_streams: 0,
            device_count: staged.device_count,
            bytes: staged.bytes,
            report,
        };
        write_manifest(&self.dir, &manifest).map_err(|source| SpoolError {
            dir: self.dir.clone(),
            what: format!("cannot write the manifest of run {}", manifest.run_id),
            source,
        })?;
        {
            let mut state = self.lock();
            let entry = RunEntry {
                manifest,
                staged,
                dropped: watch::channel(false).0,
            };
            state.run_bytes += entry.disk_bytes();
            state.jobs.insert(seq, Entry::Run(entry));
        }
        let dropped = self.enforce_limit();
        self.notify();
        Ok(dropped)
    }

    /// Queues a report (of a run with nothing to deliver) behind everything
    /// spooled so far.
    pub fn push_report(&self, report: RunReport) {
        {
            let mut state = self.lock();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.jobs.insert(seq, Entry::Report(report));
            state.reports += 1;
            if state.reports > MAX_QUEUED_REPORTS {
                let oldest = state
                    .jobs
                    .iter()
                    .find(|(_, e)| matches!(e, Entry::Report(_)))
                    .map(|(seq, _)| *seq);
                if let Some(Entry::Report(forgotten)) = oldest.and_then(|s| state.jobs.remove(&s)) {
                    state.reports -= 1;
                    tracing::warn!(source = %forgotten.source, run_id = %forgotten.run_id,
                        "too many run reports waiting for the gateway; the oldest is forgotten");
                }
            }
        }
        self.notify();
    }

    /// Drops the oldest runs while the spool is over its limit; each is
    /// replaced in the queue by its failed report.
    fn enforce_limit(&self) -> Vec<DroppedRun> {
        let mut dropped = Vec::new();
        let mut files = Vec::new();
        {
            let mut state = self.lock();
            while state.run_bytes > self.max_bytes {
                let oldest = state
                    .jobs
                    .iter()
                    .find(|(_, e)| matches!(e, Entry::Run(_)))
                    .map(|(seq, _)| *seq);
                let Some(seq) = oldest else { break };
                let Some(Entry::Run(run)) = state.jobs.remove(&seq) else {
                    break;
                };
                state.run_bytes -= run.disk_bytes();
                let reason = format!(
                    "dropped from the spool: spooled runs took {} bytes, over the spool.max_bytes limit of {}; this run ({} bytes, {} devices) was the oldest",
                    state.run_bytes + run.disk_bytes(),
                    self.max_bytes,
                    run.disk_bytes(),
                    run.manifest.device_count
                );
                // Stop its upload if one is going on.
                run.dropped.send_replace(true);
                dropped.push(DroppedRun {
                    source: run.manifest.report.source.clone(),
                    run_id: run.manifest.run_id.clone(),
                    devices: run.manifest.device_count,
                    bytes: run.disk_bytes(),
                    reason: reason.clone(),
                });
                files.push(run.staged.clone());
                state.jobs.insert(
                    seq,
                    Entry::Report(failed_report(run.manifest.report, reason)),
                );
                state.reports += 1;
            }
        }
        for staged in files {
            self.remove_files(&staged);
        }
        dropped
    }

    /// The oldest job, waiting until there is one. The job stays queued until
    /// [`Self::done`] or [`Self::delivered`]: a restarted uploader gets it
    /// again.
    pub async fn next_job(&self) -> Job {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(job) = self.peek() {
                return job;
            }
            // The sender lives in `self`; it cannot close while we borrow it.
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The oldest job, if any.
    pub fn peek(&self) -> Option<Job> {
        let state = self.lock();
        state.jobs.iter().next().map(|(seq, entry)| match entry {
            Entry::Run(run) => Job::Deliver(run.spooled()),
            Entry::Report(report) => Job::Report {
                seq: *seq,
                report: report.clone(),
            },
        })
    }

    /// The gateway acknowledged every chunk of run `seq` (or refused it for
    /// good): its files go, and `report` takes its place in the queue.
    /// Blocking (file system).
    pub fn delivered(&self, seq: u64, report: RunReport) {
        let staged = {
            let mut state = self.lock();
            match state.jobs.remove(&seq) {
                Some(Entry::Run(run)) => {
                    state.run_bytes -= run.disk_bytes();
                    state.jobs.insert(seq, Entry::Report(report));
                    state.reports += 1;
                    Some(run.staged)
                }
                Some(other) => {
                    // Dropped meanwhile: its failed report stays.
                    state.jobs.insert(seq, other);
                    None
                }
                None => None,
            }
        };
        if let Some(staged) = staged {
            self.remove_files(&staged);
        }
        self.notify();
    }

    /// The gateway acknowledged the first `acked` streams of run `seq`:
    /// recorded durably (manifest rewrite), so that even the next process
    /// resumes after them. Blocking (fsync).
    pub fn stream_acked(&self, seq: u64, acked: u32) -> io::Result<()> {
        let manifest = {
            let mut state = self.lock();
            let Some(Entry::Run(run)) = state.jobs.get_mut(&seq) else {
                return Ok(()); // dropped or delivered meanwhile
            };
            run.manifest.acked_streams = run.manifest.acked_streams.max(acked);
            run.manifest.clone()
        };
        write_manifest(&self.dir, &manifest)
    }

    /// A report was pushed (or given up on): forget it.
    pub fn done(&self, seq: u64) {
        {
            let mut state = self.lock();
            if let Some(Entry::Report(_)) = state.jobs.get(&seq) {
                state.jobs.remove(&seq);
                state.reports -= 1;
            }
        }
        self.notify();
    }

    /// Whether a run of `source` is spooled and not yet delivered.
    pub fn has_undelivered(&self, source: &str) -> bool {
        self.lock()
            .jobs
            .values()
            .any(|e| matches!(e, Entry::Run(r) if r.manifest.report.source == source))
    }

    /// Runs waiting and the disk bytes they take.
    pub fn usage(&self) -> (usize, u64) {
        let state = self.lock();
        (state.jobs.len() - state.reports, state.run_bytes)
    }

    /// Whether nothing is waiting: no run, no report.
    pub fn is_idle(&self) -> bool {
        self.lock().jobs.is_empty()
    }

    /// Resolves once nothing is waiting.
    pub async fn wait_idle(&self) {
        let mut changed = self.changed.subscribe();
        loop {
            if self.is_idle() {
                return;
            }
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Deletes a run's files: the manifest first, so that a crash half-way
    /// leaves data without a manifest (cleaned at the next open), never a
    /// manifest without its data.
    fn remove_files(&self, staged: &StagedRun) {
        let manifest = self.dir.join(format!("{}.{MANIFEST_EXT}", staged.run_id));
        for path in [&manifest, &staged.data_path, &staged.lengths_path] {
            if let Err(e) = fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "cannot remove a spooled file: {e}");
                }
            }
        }
    }
}

fn failed_report(mut report: RunReport, reason: String) -> RunReport {
    report.ok = false;
    report.skipped = false;
    report.error_kind = Some("spool".into());
    report.error = Some(reason);
    report
}

fn staged_paths(dir: &Path, run_id: &str) -> StagedRun {
    StagedRun {
        run_id: run_id.to_owned(),
        data_path: dir.join(format!("{run_id}.jsonl")),
        lengths_path: dir.join(format!("{run_id}.len")),
        device_count: 0,
        bytes: 0,
    }
}

fn read_manifest(path: &Path, run_id: &str) -> Result<RunManifest, String> {
    let text = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: RunManifest = serde_json::from_slice(&text)
        .map_err(|e| format!("unreadable spool manifest {}: {e}", path.display()))?;
    if manifest.version != MANIFEST_VERSION {
        return Err(format!(
            "spool manifest {} has version {}, this agent reads version {MANIFEST_VERSION}",
            path.display(),
            manifest.version
        ));
    }
    if manifest.run_id != run_id {
        return Err(format!(
            "spool manifest {} names run {:?}",
            path.display(),
            manifest.run_id
        ));
    }
    Ok(manifest)
}

/// Checks that the data files are there with the sizes the manifest says.
fn check_data(staged: &StagedRun) -> Result<(), String> {
    let size = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let data = size(&staged.data_path)?;
    let lengths = size(&staged.lengths_path)?;
    if data != staged.bytes || lengths != staged.device_count * 4 {
        return Err(format!(
            "{} is {data} bytes and {} is {lengths}, the manifest says {} and {}",
            staged.data_path.display(),
            staged.lengths_path.display(),
            staged.bytes,
            staged.device_count * 4
        ));
    }
    Ok(())
}

/// Writes the manifest atomically and durably: temporary file, fsync,
/// rename, fsync of the directory (so the rename itself survives a crash).
fn write_manifest(dir: &Path, manifest: &RunManifest) -> io::Result<()> {
    let json = serde_json::to_vec(manifest).map_err(io::Error::other)?;
    let path = dir.join(format!("{}.{MANIFEST_EXT}", manifest.run_id));
    let tmp = dir.join(format!("{}.{MANIFEST_EXT}.tmp", manifest.run_id));
    let mut file = File::create(&tmp)?;
    file.write_all(&json)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        if let Err(e) = fs::remove_file(p) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %p.display(), "cannot remove a spool file: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::UpdateContext;
    use crate::upload::staging::RunWriter;

    fn stage(dir: &Path, run_id: &str, devices: u32) -> StagedRun {
        let ctx = UpdateContext {
            agent_id: "a".into(),
            gateway_id: "g".into(),
            partition: "p".into(),
            source: "faker",
            timestamp: "t".into(),
        };
        let mut w = RunWriter::create(dir, run_id).unwrap();
        for i in 0..devices {
            w.write(&ctx.update(
                format!("10.0.{}.{}", i / 200, i % 200),
                None,
                None,
                Default::default(),
            ))
            .unwrap();
        }
        w.finish().unwrap()
    }

    fn report(source: &str, run_id: &str) -> RunReport {
        RunReport {
            source: source.into(),
            source_type: "faker".into(),
            run_id: run_id.into(),
            ok: true,
            ..RunReport::default()
        }
    }

    fn admit(spool: &Spool, source: &str, run_id: &str, devices: u32) -> Vec<DroppedRun> {
        let staged = stage(spool.dir(), run_id, devices);
        let split = Split {
            chunk_max_updates: 1000,
            stream_max_chunks: 5000,
        };
        spool
            .admit(staged, "svc".into(), split, report(source, run_id))
            .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    fn job_ids(spool: &Spool) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(job) = spool.peek() {
            match job {
                Job::Deliver(run) => {
                    ids.push(format!("run:{}", run.staged.run_id));
                    spool.delivered(run.seq, run.report);
                }
                Job::Report { seq, report } => {
                    ids.push(format!("report:{}:{}", report.run_id, report.ok));
                    spool.done(seq);
                }
            }
        }
        ids
    }

    #[test]
    fn spooled_runs_survive_a_reopen_in_order_and_leftovers_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, recovery) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
            assert!(recovery.pending.is_empty());
            admit(&spool, "A", "r1", 10);
            admit(&spool, "B", "r2", 5);
            spool.push_report(report("C", "r3")); // memory only
            admit(&spool, "A", "r4", 1);
            assert!(spool.has_undelivered("A") && spool.has_undelivered("B"));
            assert!(!spool.has_undelivered("C"));
            // An interrupted staging: data files without a manifest.
            let partial = stage(dir.path(), "half", 3);
            assert!(partial.data_path.exists());
            fs::write(dir.path().join("r9.run.tmp"), b"{").unwrap();
            // The process dies here (the spool is dropped without cleanup).
        }
        let (spool, recovery) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let pending: Vec<_> = recovery.pending.iter().map(|p| p.1.as_str()).collect();
        assert_eq!(pending, ["r1", "r2", "r4"]);
        // Acknowledged streams are remembered across a reopen.
        let Some(Job::Deliver(r1)) = spool.peek() else {
            panic!("r1 first")
        };
        assert_eq!(r1.acked_streams, 0);
        spool.stream_acked(r1.seq, 2).unwrap();
        drop(spool);
        let (spool, _) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let Some(Job::Deliver(r1)) = spool.peek() else {
            panic!("r1 first")
        };
        assert_eq!((r1.staged.run_id.as_str(), r1.acked_streams), ("r1", 2));
        assert_eq!(recovery.removed_incomplete.len(), 3, "{recovery:?}");
        // New runs go behind the recovered ones.
        admit(&spool, "B", "r5", 2);
        assert_eq!(spool.usage().0, 4);
        assert_eq!(
            job_ids(&spool),
            [
                "run:r1",
                "report:r1:true",
                "run:r2",
                "report:r2:true",
                "run:r4",
                "report:r4:true",
                "run:r5",
                "report:r5:true"
            ]
        );
        assert!(spool.is_idle());
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[test]
    fn over_the_limit_the_oldest_whole_run_is_dropped_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let one_run = {
            let staged = stage(&dir.path().join("probe"), "probe", 100);
            staged.bytes + staged.device_count * 4
        };
        // Room for two runs of 100 devices, not three.
        let (spool, _) = Spool::open(&dir.path().join("spool"), one_run * 2 + 10).unwrap();
        assert!(admit(&spool, "A", "r1", 100).is_empty());
        let Some(Job::Deliver(first)) = spool.peek() else {
            panic!("r1 first")
        };
        assert!(admit(&spool, "B", "r2", 100).is_empty());
        let dropped = admit(&spool, "C", "r3", 100);
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            (dropped[0].source.as_str(), dropped[0].run_id.as_str()),
            ("A", "r1")
        );
        assert!(
            dropped[0].reason.contains("spool.max_bytes"),
            "{}",
            dropped[0].reason
        );
        // Its upload (if any) is told to stop, its files are gone whole.
        assert!(*first.dropped.borrow());
        assert!(!first.staged.data_path.exists() && !first.staged.lengths_path.exists());
        assert!(!spool.has_undelivered("A"));
        assert_eq!(spool.usage(), (2, one_run * 2));
        // The failed report keeps r1's place in the queue.
        assert_eq!(
            job_ids(&spool),
            [
                "report:r1:false",
                "run:r2",
                "report:r2:true",
                "run:r3",
                "report:r3:true"
            ]
        );
        // A run larger than the whole limit is dropped on arrival.
        let dropped = admit(&spool, "D", "huge", 300);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].run_id, "huge");
        assert_eq!(job_ids(&spool), ["report:huge:false"]);
    }

    #[test]
    fn a_damaged_run_is_dropped_at_open_with_a_failed_report() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (spool, _) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
            admit(&spool, "A", "good", 4);
            admit(&spool, "B", "cut", 4);
            fs::write(dir.path().join("bad.run"), b"not json").unwrap();
        }
        // Truncate one run's data, as a full disk or a bad block would.
        let cut = dir.path().join("cut.jsonl");
        let len = fs::metadata(&cut).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&cut)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let (spool, recovery) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(recovery.pending.len(), 1);
        assert_eq!(recovery.dropped.len(), 1);
        assert!(
            recovery.dropped[0].reason.contains("damaged"),
            "{recovery:?}"
        );
        assert_eq!(
            job_ids(&spool),
            ["run:good", "report:good:true", "report:cut:false"]
        );
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    #[tokio::test]
    async fn next_job_waits_for_work_and_wait_idle_for_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let spool = std::sync::Arc::new(spool);
        let waiter = tokio::spawn({
            let spool = spool.clone();
            async move { spool.next_job().await.seq() }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        spool.push_report(report("A", "r"));
        let seq = waiter.await.unwrap();
        let idle = tokio::spawn({
            let spool = spool.clone();
            async move { spool.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!idle.is_finished());
        spool.done(seq);
        idle.await.unwrap();
    }
}
