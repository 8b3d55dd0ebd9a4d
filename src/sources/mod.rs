//! Discovery sources: per source type its HTTP client and its device
//! mapping (sources.md).
//!
//! - [`armis`]: the Armis API client and the Armis device mapping (the Faker
//!   source produces the same device object).
//! - [`netbox`]: the NetBox API client and device mapping.
//! - [`faker`]: the deterministic generator behind the `faker` source type
//!   and the Faker server.
//! - [`http`]: what the HTTP sources share (pooled client, retries, errors);
//!   [`stager`]: pages in, staged run out, on a blocking thread.
//! - [`runner`]: one run of any source type, as the integration actor sees it.
//!
//! [`faker_run`] is the whole in-process Faker run: generate, map, hand each
//! update to a sink (normally a staging writer), count what was dropped.

pub mod armis;
pub mod faker;
pub mod http;
pub mod netbox;
pub mod runner;
pub mod stager;

pub use armis::Mapped;

use std::io;
use std::ops::Range;
use std::sync::mpsc;

use ipnet::IpNet;

use crate::device::{DeviceUpdate, UpdateContext};
use crate::upload::staging::{EncodedBatch, RunWriter};
use armis::map_device_owned;
use faker::FakerGenerator;

/// What one run produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Updates handed to the sink.
    pub devices: u64,
    /// Devices without a valid IP address.
    pub skipped_no_ip: u64,
    /// Devices whose IP is inside the source's `network_blacklist`.
    pub blacklisted: u64,
    /// Devices already emitted in this run (several queries, shifting pages).
    pub skipped_duplicate: u64,
    /// Device objects that could not be read (wrong types).
    pub skipped_invalid: u64,
    /// API pages fetched (0 for the in-process Faker source).
    pub pages: u64,
    /// HTTP requests retried (connect errors, timeouts, 5xx, 429).
    pub retries: u64,
}

/// Maps every device of the generator's current run (integration type
/// `faker`) and passes each update to `sink`, one at a time so that memory
/// does not grow with the run. The first sink error ends the run.
pub fn faker_run(
    gen: &FakerGenerator,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    sink: &mut impl FnMut(&DeviceUpdate) -> io::Result<()>,
) -> io::Result<RunCounts> {
    faker_range(gen, 0..gen.len(), ctx, blacklist, sink)
}

/// [`faker_run`] over the devices with indices in `range`.
fn faker_range(
    gen: &FakerGenerator,
    range: Range<u64>,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    sink: &mut impl FnMut(&DeviceUpdate) -> io::Result<()>,
) -> io::Result<RunCounts> {
    let mut counts = RunCounts::default();
    for device in range.map(|i| gen.device(i)) {
        match map_device_owned(device, ctx, "faker", None, blacklist) {
            Mapped::Update(update) => {
                sink(&update)?;
                counts.devices += 1;
            }
            Mapped::NoIp => counts.skipped_no_ip += 1,
            Mapped::Blacklisted => counts.blacklisted += 1,
        }
    }
    Ok(counts)
}

/// Devices per batch a worker encodes before handing it to the writer
/// (about 400 KiB of JSON).
const STAGE_BATCH: u64 = 512;

/// A whole Faker run staged into `writer`, generated, mapped and JSON-encoded
/// by `workers` threads (the expensive part) while the calling thread appends
/// their batches to the staging file in device order. Memory stays bounded
/// and flat: each worker has at most two encoded batches in flight, and the
/// writer hands emptied batches back for reuse, so their buffers are
/// allocated once per run, not once per batch. `cancelled` is polled between
/// batches.
pub fn faker_stage(
    gen: &FakerGenerator,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    writer: &mut RunWriter,
    workers: usize,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> io::Result<RunCounts> {
    let total = gen.len();
    let batches = total.div_ceil(STAGE_BATCH);
    let workers = workers.clamp(1, 16) as u64;
    std::thread::scope(|scope| {
        let channels: Vec<_> = (0..workers)
            .map(|first| {
                let (tx, rx) = mpsc::sync_channel::<io::Result<(EncodedBatch, RunCounts)>>(1);
                let (recycle_tx, recycle_rx) = mpsc::channel::<EncodedBatch>();
                scope.spawn(move || {
                    // Worker `first` takes batches first, first+workers, …
                    for k in (first..batches).step_by(workers as usize) {
                        let result = if cancelled() {
                            Err(io::Error::other("run cancelled"))
                        } else {
                            let range = k * STAGE_BATCH..((k + 1) * STAGE_BATCH).min(total);
                            let mut batch = recycle_rx.try_recv().unwrap_or_default();
                            batch.clear();
                            faker_range(gen, range, ctx, blacklist, &mut |u| batch.push(u))
                                .map(|c| (batch, c))
                        };
                        let failed = result.is_err();
                        // A closed channel means the writer gave up: stop.
                        if tx.send(result).is_err() || failed {
                            return;
                        }
                    }
                });
                (rx, recycle_tx)
            })
            .collect();
        let mut counts = RunCounts::default();
        for k in 0..batches {
            let (batches_rx, recycle_tx) = &channels[(k % workers) as usize];
            let (batch, c) = batches_rx
                .recv()
                .map_err(|_| io::Error::other("a Faker worker ended before its batch"))??;
            writer.write_batch(&batch)?;
            // A worker that has finished no longer listens; that is fine.
            let _ = recycle_tx.send(batch);
            counts.devices += c.devices;
            counts.skipped_no_ip += c.skipped_no_ip;
            counts.blacklisted += c.blacklisted;
        }
        Ok(counts)
    })
}
