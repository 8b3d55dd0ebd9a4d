//! The Armis integration (sources.md "Armis").
//!
//! - [`mapping`]: the Armis device object and its mapping to a device update
//!   (the Faker source produces the same object).
//! - [`encode`]: the hot path: a device borrowed from the page written
//!   straight into its staged line (byte for byte what `mapping` gives).
//! - [`page`]: reads a search page, streaming its devices to a callback.
//! - [`client`]: the HTTP client: access token, paged search, retries.

pub mod client;
pub mod encode;
pub mod mapping;
pub mod page;

pub use mapping::{
    first_valid_mac, format_mac, map_device, map_device_owned, parse_mac, ArmisDevice,
    ArmisDeviceOf, Mapped,
};
