//! Configuration the agent reads: the bootstrap file it starts from
//! ([`bootstrap`]), the `config_json` payload the gateway sends ([`sources`]),
//! and Go-compatible durations used by both ([`duration`]).

pub mod bootstrap;
pub mod duration;
pub mod sources;
