//! The NetBox integration (sources.md "NetBox").
//!
//! - [`mapping`]: the NetBox device object and its mapping to a device update
//!   (which NetBox field feeds which metadata key).
//! - [`client`]: the HTTP client: token scheme, `next`-link paging, NetBox's
//!   error bodies, pages streamed into the run's staging file.

pub mod client;
pub mod mapping;

pub use client::NetboxClient;
pub use mapping::{map_device, NetboxDevice};
