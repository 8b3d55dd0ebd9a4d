//! Faker: a fake Armis inventory (sources.md "Faker").
//!
//! - [`generator`]: the deterministic generator behind both uses.
//! - [`server`]: the Faker server, which serves the Armis API from it.

pub mod generator;
pub mod server;

pub use generator::{FakerGenerator, FakerSettings, MAX_DEVICES};
