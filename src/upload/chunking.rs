//! The chunker of wire.md §6: turns a staged run into JSON-array chunks of at
//! most 1 MiB (exact, `sync_meta` included) and 1000 updates.
//!
//! Planning reads only the `.len` sidecar. An update of `L` staged bytes
//! costs `L + 14 + M` bytes in a chunk — its `}` becomes
//! `,"sync_meta":<meta>}` (13 + M + 1 bytes) and a `,` or the closing `]`
//! follows it — so a chunk of `k` updates is `1 + Σ(L + 14 + M)` bytes, the
//! leading `[` being the `1`. `M` is the same for every update of a chunk but
//! depends on the chunk: on the digits of `chunk_index` and `total_chunks`,
//! and on `is_final` (`true` is one byte shorter than `false`). Since the
//! chunk count depends on `M` and `M` on the count, planning iterates on
//! `total_chunks` until the count it assumes is the count it gets
//! (see [`plan`]). Reading then splices each chunk's `sync_meta` into the
//! staged lines: no update is encoded twice.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;

use crate::device::SyncMeta;

use super::staging::StagedRun;

/// What replaces each staged update's final `}` before the meta object.
const META_KEY: &[u8] = b",\"sync_meta\":";

/// Bytes an update adds to a chunk besides its staged JSON and its meta: the
/// key (13; its `}` is removed and added back after the meta, net 0) and one
/// separator (`,` before the next update, or the closing `]`).
const PER_UPDATE_OVERHEAD: u64 = META_KEY.len() as u64 + 1;

/// Limits of one chunk and of one StreamStatus call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Serialized bytes per chunk, `sync_meta` included.
    pub max_bytes: usize,
    /// Updates per chunk.
    pub max_updates: usize,
    /// Chunks (services) per stream: the gateway allows at most 5000.
    pub max_chunks_per_stream: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_bytes: 1024 * 1024,
            max_updates: 1000,
            max_chunks_per_stream: 5000,
        }
    }
}

/// The identifiers every update's `sync_meta` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIds {
    pub sync_service_id: String,
    pub sync_run_id: String,
}

/// One planned chunk: `count` consecutive staged updates from `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Index of its first update in the run.
    pub first: u64,
    pub count: u32,
    /// Exact serialized size of the chunk's JSON array.
    pub bytes: usize,
}

/// The chunks of one run, numbered 0.. in run order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlan {
    pub chunks: Vec<ChunkSpan>,
    pub total_devices: u64,
}

impl ChunkPlan {
    /// `total_chunks` of every `sync_meta` of the run.
    pub fn total_chunks(&self) -> u32 {
        // `plan` refuses runs with more than u32::MAX chunks.
        self.chunks.len() as u32
    }

    /// Splits the chunk indices into consecutive groups of at most
    /// `max_chunks_per_stream`, one StreamStatus call each. A run without
    /// chunks needs no stream.
    pub fn streams(&self, limits: &ChunkLimits) -> Vec<Range<u32>> {
        let per_stream = u32::try_from(limits.max_chunks_per_stream.max(1)).unwrap_or(u32::MAX);
        let total = self.total_chunks();
        let mut streams = Vec::new();
        let mut start = 0u32;
        while start < total {
            let end = start.saturating_add(per_stream).min(total);
            streams.push(start..end);
            start = end;
        }
        streams
    }
}

/// Plans the chunks of a staged run. Memory is O(number of chunks): the
/// sidecar is streamed once per iteration.
///
/// The chunk count is a non-decreasing function of the assumed
/// `total_chunks` (longer metas never make chunks hold more), and it only
/// depends on its number of digits. Starting from 1, the iteration therefore
/// climbs to the smallest consistent count in at most one step per digit.
pub fn plan(staged: &StagedRun, ids: &RunIds, limits: &ChunkLimits) -> io::Result<ChunkPlan> {
    if limits.max_updates == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "chunk limit max_updates must be at least 1",
        ));
    }
    check_sidecar(staged)?;
    let meta = MetaSize::new(ids, staged.device_count)?;
    let mut assumed_total: u64 = 1;
    // 20 digits of u64: one iteration per digit count is always enough.
    for _ in 0..=20 {
        let chunks = pack(staged, &meta, limits, assumed_total)?;
        let count = chunks.len() as u64;
        if count > u64::from(u32::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "run {} needs {count} chunks, more than sync_meta can number",
                    staged.run_id
                ),
            ));
        }
        if count == assumed_total || count == 0 {
            return Ok(ChunkPlan {
                chunks,
                total_devices: staged.device_count,
            });
        }
        assumed_total = count;
    }
    Err(io::Error::other(format!(
        "chunk planning of run {} did not converge",
        staged.run_id
    )))
}

/// The greedy pass for an assumed `total_chunks`: a chunk is closed only
/// when the next update would break a limit, evaluated with the meta the
/// chunk would then really carry.
fn pack(
    staged: &StagedRun,
    meta: &MetaSize,
    limits: &ChunkLimits,
    total: u64,
) -> io::Result<Vec<ChunkSpan>> {
    let max_bytes = limits.max_bytes as u64;
    let max_updates = limits.max_updates as u64;
    let n = staged.device_count;
    let mut lengths = LengthReader::open(staged)?;
    let mut chunks = Vec::new();
    // The open chunk: its first update, its size, and Σ(L + overhead).
    let (mut first, mut count, mut sum) = (0u64, 0u64, 0u64);
    for j in 0..n {
        let item = u64::from(lengths.next_len()?) + PER_UPDATE_OVERHEAD;
        if count > 0 {
            let index = chunks.len() as u64;
            // Taking update j makes the chunk final exactly when j is last.
            let m = meta.len(index, total, j + 1 == n);
            let size = 1 + sum + item + (count + 1) * m;
            if count + 1 > max_updates || size > max_bytes {
                let closed_m = meta.len(index, total, false);
                chunks.push(span(first, count, 1 + sum + count * closed_m)?);
                (first, count, sum) = (j, 0, 0);
            }
        }
        // An empty chunk takes the update whatever its size: one larger than
        // the limit goes alone.
        count += 1;
        sum += item;
    }
    if count > 0 {
        let m = meta.len(chunks.len() as u64, total, true);
        chunks.push(span(first, count, 1 + sum + count * m)?);
    }
    Ok(chunks)
}

fn span(first: u64, count: u64, bytes: u64) -> io::Result<ChunkSpan> {
    let too_big = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "chunk size does not fit in memory",
        )
    };
    Ok(ChunkSpan {
        first,
        count: u32::try_from(count).map_err(|_| too_big())?,
        bytes: usize::try_from(bytes).map_err(|_| too_big())?,
    })
}

/// The sidecar must hold exactly one length per staged update.
fn check_sidecar(staged: &StagedRun) -> io::Result<()> {
    let sidecar_len = std::fs::metadata(&staged.lengths_path)?.len();
    if sidecar_len != staged.device_count * 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} holds {sidecar_len} bytes, expected 4 per update for {} updates",
                staged.lengths_path.display(),
                staged.device_count
            ),
        ));
    }
    Ok(())
}

/// Length of a serialized `sync_meta` for any chunk of one run.
struct MetaSize {
    /// Length with one-digit index and total and `is_final: true`, minus
    /// those three variable parts.
    fixed: u64,
}

impl MetaSize {
    fn new(ids: &RunIds, total_devices: u64) -> io::Result<MetaSize> {
        let sample = meta_json(ids, 0, 0, total_devices, true)?;
        // "0", "0" and "true": 1 + 1 + 4 bytes of the sample vary per chunk.
        Ok(MetaSize {
            fixed: sample.len() as u64 - 6,
        })
    }

    fn len(&self, index: u64, total: u64, is_final: bool) -> u64 {
        let flag = if is_final { 4 } else { 5 };
        self.fixed + digits(index) + digits(total) + flag
    }
}

fn digits(mut n: u64) -> u64 {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

fn meta_json(
    ids: &RunIds,
    index: u32,
    total: u32,
    total_devices: u64,
    is_final: bool,
) -> io::Result<Vec<u8>> {
    let meta = SyncMeta {
        sync_service_id: ids.sync_service_id.clone(),
        sync_run_id: ids.sync_run_id.clone(),
        chunk_index: index,
        total_chunks: total,
        total_devices,
        is_final,
    };
    serde_json::to_vec(&meta).map_err(io::Error::other)
}

/// Streams the `.len` sidecar.
#[derive(Debug)]
struct LengthReader {
    inner: BufReader<File>,
}

impl LengthReader {
    fn open(staged: &StagedRun) -> io::Result<LengthReader> {
        Ok(LengthReader {
            inner: BufReader::with_capacity(64 * 1024, File::open(&staged.lengths_path)?),
        })
    }

    fn next_len(&mut self) -> io::Result<u32> {
        let mut buf = [0u8; 4];
        self.inner.read_exact(&mut buf)?;
        Ok(u32::from_le_bytes(buf))
    }
}

/// One chunk, ready to be the `message` of a StreamStatus service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `chunk_index` of its `sync_meta` (run numbering).
    pub index: u32,
    /// `total_chunks` of the run.
    pub total: u32,
    pub is_final: bool,
    /// The JSON array.
    pub json: Vec<u8>,
}

/// Builds the planned chunks by reading the staged files sequentially.
/// Yields nothing more after an error.
#[derive(Debug)]
pub struct ChunkReader {
    data: BufReader<File>,
    lengths: LengthReader,
    chunks: Vec<ChunkSpan>,
    ids: RunIds,
    total_devices: u64,
    next: usize,
    failed: bool,
}

impl ChunkReader {
    /// Reads the run from its first chunk.
    pub fn open(staged: &StagedRun, plan: &ChunkPlan, ids: &RunIds) -> io::Result<ChunkReader> {
        Self::open_at(staged, plan, ids, 0)
    }

    /// Reads the run from chunk `start` (e.g. to resend one stream). Finding
    /// the byte offset of that chunk reads the sidecar up to it.
    pub fn open_at(
        staged: &StagedRun,
        plan: &ChunkPlan,
        ids: &RunIds,
        start: u32,
    ) -> io::Result<ChunkReader> {
        let mut lengths = LengthReader::open(staged)?;
        let mut data = BufReader::with_capacity(256 * 1024, File::open(&staged.data_path)?);
        let next = start as usize;
        if let Some(first) = plan.chunks.get(next).map(|c| c.first) {
            let mut offset = 0u64;
            for _ in 0..first {
                offset += u64::from(lengths.next_len()?) + 1;
            }
            data.seek(SeekFrom::Start(offset))?;
        }
        Ok(ChunkReader {
            data,
            lengths,
            chunks: plan.chunks.clone(),
            ids: ids.clone(),
            total_devices: plan.total_devices,
            next,
            failed: false,
        })
    }

    fn build(&mut self, index: usize, span: ChunkSpan) -> io::Result<Chunk> {
        let total = self.chunks.len() as u32;
        let is_final = index + 1 == self.chunks.len();
        let meta = meta_json(&self.ids, index as u32, total, self.total_devices, is_final)?;
        let mut json = Vec::with_capacity(span.bytes);
        json.push(b'[');
        for k in 0..span.count {
            if k > 0 {
                json.push(b',');
            }
            let len = self.lengths.next_len()? as usize;
            // A corrupt sidecar must not make us allocate gigabytes.
            if len > span.bytes {
                return Err(corrupt(&self.ids, span.first + u64::from(k)));
            }
            let start = json.len();
            json.resize(start + len, 0);
            self.data.read_exact(&mut json[start..])?;
            let mut newline = [0u8; 1];
            self.data.read_exact(&mut newline)?;
            // Splice: the staged object's closing brace moves behind the meta.
            if len < 2
                || json.pop() != Some(b'}')
                || json.get(start) != Some(&b'{')
                || newline != *b"\n"
            {
                return Err(corrupt(&self.ids, span.first + u64::from(k)));
            }
            json.extend_from_slice(META_KEY);
            json.extend_from_slice(&meta);
            json.push(b'}');
        }
        json.push(b']');
        if json.len() != span.bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "chunk {index} of run {} is {} bytes, planned {}",
                    self.ids.sync_run_id,
                    json.len(),
                    span.bytes
                ),
            ));
        }
        Ok(Chunk {
            index: index as u32,
            total,
            is_final,
            json,
        })
    }
}

fn corrupt(ids: &RunIds, update: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "staged update {update} of run {} is not a JSON object line",
            ids.sync_run_id
        ),
    )
}

impl Iterator for ChunkReader {
    type Item = io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let index = self.next;
        let span = *self.chunks.get(index)?;
        self.next += 1;
        let chunk = self.build(index, span);
        self.failed = chunk.is_err();
        Some(chunk)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.failed {
            0
        } else {
            self.chunks.len().saturating_sub(self.next)
        };
        (0, Some(left))
    }
}
