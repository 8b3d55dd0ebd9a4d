//! Messages between the agent's actors, one file per recipient.

pub mod config;
pub mod gateway;
pub mod integration;
pub mod supervision;

pub use config::*;
pub use gateway::*;
pub use integration::*;
pub use supervision::*;
