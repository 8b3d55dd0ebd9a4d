//! Discovery sources and their device mapping (sources.md).
//!
//! - [`armis`]: the Armis device object and its mapping to a
//!   [`DeviceUpdate`]; the Faker source produces the same object.
//! - [`faker`]: the deterministic generator behind the `faker` source type
//!   and the Faker server.
//!
//! [`faker_run`] is the whole in-process Faker run: generate, map, hand each
//! update to a sink (normally a staging writer), count what was dropped.

pub mod armis;
pub mod faker;

use std::io;

use ipnet::IpNet;

use crate::device::{DeviceUpdate, UpdateContext};
use armis::{map_device_owned, Mapped};
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
    let mut counts = RunCounts::default();
    for device in gen.devices() {
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
