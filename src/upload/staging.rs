//! On-disk staging of one run, so that memory never grows with the run size.
//!
//! A run is two files in the staging directory:
//! - `<run_id>.jsonl`: one JSON-encoded [`DeviceUpdate`] per line, *without*
//!   `sync_meta` (its numbers are only known once the run is complete);
//! - `<run_id>.len`: the byte length of each line's JSON (newline excluded)
//!   as a little-endian `u32`, in line order.
//!
//! The sidecar lets the chunker plan every chunk exactly without reading the
//! JSON, and then splice `sync_meta` into the staged bytes: each update is
//! encoded exactly once.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::device::DeviceUpdate;

/// Largest JSON a single update may have: the gateway rejects a message over
/// 15 MiB (and with it the whole stream); 64 KiB are left for `sync_meta`,
/// the array brackets and the protobuf envelope.
pub const MAX_UPDATE_BYTES: usize = 15 * 1024 * 1024 - 64 * 1024;

const DATA_BUFFER: usize = 256 * 1024;
/// Start disk writeback every this many staged bytes (see `start_writeback`).
const WRITEBACK_STEP: u64 = 32 * 1024 * 1024;
const LENGTHS_BUFFER: usize = 64 * 1024;
/// Typical updates are well under 1 KiB; a buffer grown past 1 MiB by a rare
/// huge update is given back rather than kept for the rest of the run.
const SCRATCH_CAPACITY: usize = 4 * 1024;
const MAX_KEPT_SCRATCH: usize = 1024 * 1024;

/// Writes one run's updates to disk.
#[derive(Debug)]
pub struct RunWriter {
    run_id: String,
    data_path: PathBuf,
    lengths_path: PathBuf,
    data: BufWriter<File>,
    lengths: BufWriter<File>,
    device_count: u64,
    /// Size of `.jsonl` so far.
    committed: u64,
    /// Offset up to which disk writeback has been started.
    writeback_from: u64,
    /// The encoding buffer, reused for every update.
    scratch: Vec<u8>,
    /// Set when a write to the files failed half-way: they may no longer
    /// describe each other, so the run can only be discarded.
    broken: bool,
}

impl RunWriter {
    /// Creates (or truncates) `<dir>/<run_id>.jsonl` and `<dir>/<run_id>.len`,
    /// creating `dir` if needed. `run_id` becomes a file name, so it may not
    /// be empty or contain a path separator.
    pub fn create(dir: &Path, run_id: &str) -> io::Result<RunWriter> {
        let unsafe_name = run_id.is_empty()
            || run_id == "."
            || run_id == ".."
            || run_id.contains(['/', '\\', '\0']);
        if unsafe_name {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("run id {run_id:?} cannot be used as a staging file name"),
            ));
        }
        fs::create_dir_all(dir)?;
        let data_path = dir.join(format!("{run_id}.jsonl"));
        let lengths_path = dir.join(format!("{run_id}.len"));
        let data = BufWriter::with_capacity(DATA_BUFFER, File::create(&data_path)?);
        let lengths = BufWriter::with_capacity(LENGTHS_BUFFER, File::create(&lengths_path)?);
        Ok(RunWriter {
            run_id: run_id.to_owned(),
            data_path,
            lengths_path,
            data,
            lengths,
            device_count: 0,
            committed: 0,
            writeback_from: 0,
            scratch: Vec::with_capacity(SCRATCH_CAPACITY),
            broken: false,
        })
    }

    /// Updates written so far.
    pub fn device_count(&self) -> u64 {
        self.device_count
    }

    /// Appends one update (its `sync_meta`, if any, is left out).
    ///
    /// An update whose JSON exceeds [`MAX_UPDATE_BYTES`] is refused with an
    /// `InvalidData` error and leaves the run as it was, so the caller may
    /// skip that device and go on. A failed file write leaves the writer
    /// unusable.
    pub fn write(&mut self, update: &DeviceUpdate) -> io::Result<()> {
        self.check_usable()?;
        // Encode into a reused buffer, then copy it into the file buffer:
        // serde_json writes many tiny pieces, which a Vec takes far faster
        // than a BufWriter<File>, and a refused update never touches the file.
        self.scratch.clear();
        let encoded = encode_line(update, &mut self.scratch);
        if encoded.is_err() || self.scratch.capacity() > MAX_KEPT_SCRATCH {
            self.scratch.shrink_to(SCRATCH_CAPACITY);
        }
        let line_len = encoded?;
        let line = std::mem::take(&mut self.scratch);
        let appended = self.append(&line, &[line_len]);
        self.scratch = line;
        appended
    }

    /// Appends updates encoded elsewhere (see [`EncodedBatch`]), in order.
    pub fn write_batch(&mut self, batch: &EncodedBatch) -> io::Result<()> {
        self.check_usable()?;
        self.append(&batch.lines, &batch.lengths)
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other(format!(
                "staging of run {} failed earlier; the run must be discarded",
                self.run_id
            )));
        }
        Ok(())
    }

    /// Appends newline-terminated lines and their lengths. From here a
    /// failure leaves the two files out of step, so the writer breaks.
    fn append(&mut self, lines: &[u8], lengths: &[u32]) -> io::Result<()> {
        let mut sidecar = Vec::with_capacity(lengths.len() * 4);
        for len in lengths {
            sidecar.extend_from_slice(&len.to_le_bytes());
        }
        let appended = self
            .data
            .write_all(lines)
            .and_then(|()| self.lengths.write_all(&sidecar));
        if let Err(err) = appended {
            self.broken = true;
            return Err(err);
        }
        self.device_count += lengths.len() as u64;
        self.committed += lines.len() as u64;
        if self.committed - self.writeback_from >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(())
    }

    /// Starts (does not wait for) disk writeback of what was written since the
    /// last call, so that `finish`'s fsync of a large run has little left to
    /// do: the disk works while the CPU keeps encoding.
    fn start_writeback(&mut self) -> io::Result<()> {
        self.data.flush()?;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let start = self.writeback_from as libc::off64_t;
            let len = (self.committed - self.writeback_from) as libc::off64_t;
            // SAFETY: a plain syscall on a file descriptor we own. A failure
            // only loses the head start; finish() still fsyncs everything.
            unsafe {
                libc::sync_file_range(
                    self.data.get_ref().as_raw_fd(),
                    start,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        self.writeback_from = self.committed;
        Ok(())
    }

    /// Flushes and fsyncs both files: once this returns the run survives a
    /// crash of the agent.
    pub fn finish(mut self) -> io::Result<StagedRun> {
        if self.broken {
            return Err(io::Error::other(format!(
                "staging of run {} failed earlier; the run must be discarded",
                self.run_id
            )));
        }
        self.data.flush()?;
        self.lengths.flush()?;
        self.data.get_ref().sync_all()?;
        self.lengths.get_ref().sync_all()?;
        Ok(StagedRun {
            run_id: self.run_id,
            data_path: self.data_path,
            lengths_path: self.lengths_path,
            device_count: self.device_count,
            bytes: self.committed,
        })
    }

    /// Abandons the run and deletes its files.
    pub fn discard(self) -> io::Result<()> {
        let RunWriter {
            data,
            lengths,
            data_path,
            lengths_path,
            ..
        } = self;
        // Close before deleting (Windows refuses to delete open files). A
        // failed flush does not matter: the data is being thrown away.
        drop(data);
        drop(lengths);
        remove_if_present(&data_path)?;
        remove_if_present(&lengths_path)
    }
}

/// Encodes one update as a staged line (JSON without `sync_meta`, then a
/// newline) at the end of `out`; returns the JSON's length. An oversize update
/// is refused with `InvalidData` and leaves `out` as it was.
fn encode_line(update: &DeviceUpdate, out: &mut Vec<u8>) -> io::Result<u32> {
    // Staged lines never carry sync_meta: the chunker appends the real one.
    // Callers normally pass updates without it, so copying is rare.
    let without_meta;
    let update = if update.sync_meta.is_some() {
        without_meta = DeviceUpdate {
            sync_meta: None,
            ..update.clone()
        };
        &without_meta
    } else {
        update
    };
    let start = out.len();
    if let Err(e) = serde_json::to_writer(&mut *out, update) {
        out.truncate(start);
        return Err(io::Error::other(e));
    }
    let written = out.len() - start;
    if written > MAX_UPDATE_BYTES {
        out.truncate(start);
        return Err(oversize_update(&update.device_id, written));
    }
    out.push(b'\n');
    Ok(written as u32) // ≤ MAX_UPDATE_BYTES < u32::MAX
}

fn oversize_update(device_id: &str, written: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "device update {device_id} is {written} bytes of JSON, more than the {MAX_UPDATE_BYTES} \
             the gateway accepts (it would reject the whole stream)"
        ),
    )
}

/// Updates encoded as staged lines away from the [`RunWriter`] (on worker
/// threads), appended later in one piece with [`RunWriter::write_batch`].
#[derive(Debug, Default)]
pub struct EncodedBatch {
    lines: Vec<u8>,
    lengths: Vec<u32>,
}

impl EncodedBatch {
    /// Encodes one more update. An oversize update is refused with
    /// `InvalidData` and leaves the batch as it was.
    pub fn push(&mut self, update: &DeviceUpdate) -> io::Result<()> {
        let len = encode_line(update, &mut self.lines)?;
        self.lengths.push(len);
        Ok(())
    }

    /// Appends one update that `write` encodes itself (the JSON object, no
    /// newline; it must not carry `sync_meta`). An oversize update is
    /// refused with `InvalidData` and leaves the batch as it was.
    pub fn push_json(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let start = self.lines.len();
        write(&mut self.lines);
        let written = self.lines.len() - start;
        if written > MAX_UPDATE_BYTES {
            // The device id is the line's fourth field; name it by position.
            self.lines.truncate(start);
            return Err(oversize_update("(encoded)", written));
        }
        self.lines.push(b'\n');
        self.lengths.push(written as u32); // ≤ MAX_UPDATE_BYTES < u32::MAX
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    /// Keeps only the lines `keep(index)` accepts, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        let (mut read, mut write) = (0, 0);
        let mut kept = 0;
        for i in 0..self.lengths.len() {
            let len = self.lengths[i];
            let span = len as usize + 1; // the line and its newline
            if keep(i) {
                self.lines.copy_within(read..read + span, write);
                self.lengths[kept] = len;
                write += span;
                kept += 1;
            }
            read += span;
        }
        self.lines.truncate(write);
        self.lengths.truncate(kept);
    }

    /// Empties the batch, keeping its buffers for reuse.
    pub fn clear(&mut self) {
        self.lines.clear();
        self.lengths.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }
}

/// A completely staged run, ready for the chunker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedRun {
    pub run_id: String,
    /// `<run_id>.jsonl`.
    pub data_path: PathBuf,
    /// `<run_id>.len`.
    pub lengths_path: PathBuf,
    pub device_count: u64,
    /// Size of the `.jsonl` file (JSON plus one newline per update).
    pub bytes: u64,
}

impl StagedRun {
    /// Deletes both files; already missing files are not an error.
    pub fn remove(&self) -> io::Result<()> {
        remove_if_present(&self.data_path)?;
        remove_if_present(&self.lengths_path)
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{SyncMeta, UpdateContext};
    use std::collections::BTreeMap;

    fn update(ip: &str, pad: usize) -> DeviceUpdate {
        let ctx = UpdateContext {
            agent_id: "a".into(),
            gateway_id: "g".into(),
            partition: "p".into(),
            source: "faker",
            timestamp: "t".into(),
        };
        let metadata = BTreeMap::from([("pad".into(), "x".repeat(pad))]);
        ctx.update(ip.into(), None, None, metadata)
    }

    fn lengths(run: &StagedRun) -> Vec<u32> {
        fs::read(&run.lengths_path)
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn writes_lines_and_lengths_without_sync_meta() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RunWriter::create(dir.path(), "run-1").unwrap();
        let mut with_meta = update("10.0.0.2", 3);
        with_meta.sync_meta = Some(SyncMeta {
            sync_service_id: "s".into(),
            sync_run_id: "r".into(),
            chunk_index: 0,
            total_chunks: 1,
            total_devices: 1,
            is_final: true,
        });
        w.write(&update("10.0.0.1", 0)).unwrap();
        w.write(&with_meta).unwrap();
        let run = w.finish().unwrap();
        let text = fs::read_to_string(&run.data_path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(!text.contains("sync_meta"));
        assert_eq!(
            lengths(&run),
            lines.iter().map(|l| l.len() as u32).collect::<Vec<_>>()
        );
        assert_eq!(run.device_count, 2);
        assert_eq!(run.bytes, text.len() as u64);
        let back: DeviceUpdate = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(
            back,
            DeviceUpdate {
                sync_meta: None,
                ..with_meta
            }
        );
        run.remove().unwrap();
        assert!(!run.data_path.exists() && !run.lengths_path.exists());
        run.remove().unwrap();
    }

    #[test]
    fn oversize_update_is_refused_and_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = RunWriter::create(dir.path(), "big").unwrap();
        w.write(&update("10.0.0.1", 10)).unwrap();
        let err = w.write(&update("10.0.0.2", MAX_UPDATE_BYTES)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("p:10.0.0.2"), "{err}");
        w.write(&update("10.0.0.3", 10)).unwrap();
        let run = w.finish().unwrap();
        let text = fs::read_to_string(&run.data_path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("10.0.0.3") && !text.contains("10.0.0.2"));
        assert_eq!(run.bytes, text.len() as u64);
        assert_eq!(lengths(&run).len(), 2);
    }

    #[test]
    fn largest_allowed_update_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let base = serde_json::to_vec(&update("10.0.0.1", 0)).unwrap().len();
        let mut w = RunWriter::create(dir.path(), "edge").unwrap();
        w.write(&update("10.0.0.1", MAX_UPDATE_BYTES - base))
            .unwrap();
        assert!(w
            .write(&update("10.0.0.1", MAX_UPDATE_BYTES - base + 1))
            .is_err());
        let run = w.finish().unwrap();
        assert_eq!(lengths(&run), [MAX_UPDATE_BYTES as u32]);
    }

    #[test]
    fn unsafe_run_ids_are_refused_and_discard_deletes() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["", "..", "a/b", "a\\b"] {
            assert!(RunWriter::create(dir.path(), id).is_err(), "{id:?}");
        }
        let mut w = RunWriter::create(&dir.path().join("nested"), "gone").unwrap();
        w.write(&update("10.0.0.1", 0)).unwrap();
        w.discard().unwrap();
        assert_eq!(fs::read_dir(dir.path().join("nested")).unwrap().count(), 0);
    }
}
