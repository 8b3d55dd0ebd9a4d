//! serviceradar-agent: edge device discovery for ServiceRadar-style monitoring.
//!
//! The folder tree is the architecture:
//! - [`actors`]: the agent's actix supervision tree (supervisor, gateway
//!   connection, config, integrations, chunk uploader); [`messages`] is what
//!   they say to each other.
//! - [`config`]: the bootstrap file (`agent.json`) and the `config_json`
//!   payload the gateway sends.
//! - [`sources`]: discovery sources (Faker today) and their device mapping.
//! - [`upload`]: on-disk run staging and the chunker of wire.md §5–6.
//! - [`gateway`]: the server side: an agent-gateway that speaks the same contract.
//! - [`tls`] / [`pki`]: mTLS configurations and the dev PKI.

pub mod actors;
pub mod agent;
pub mod bench;
pub mod check;
pub mod clock;
pub mod config;
pub mod demo;
pub mod device;
pub mod gateway;
pub mod messages;
pub mod pki;
pub mod sources;
pub mod tls;
pub mod upload;

/// Generated protobuf types and gRPC stubs for package `monitoring` (wire.md §2).
pub mod proto {
    tonic::include_proto!("monitoring");
}

/// The agent's version as reported in Hello and in every chunk.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
