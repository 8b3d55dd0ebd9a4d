//! The agent's actix supervision tree.
//!
//! ```text
//!                         Supervisor  (restart policy: backoff + jitter, intensity limit)
//!        ┌──────────────┬──────┴───────────┬───────────────────────┐
//!  GatewayConnection  ConfigActor     ChunkUploader      Integration × N (one per source)
//!  (mTLS channel,     (GetConfig,     (staged run →      (runs a source on its interval,
//!   Hello, heartbeat)  ControlStream)   chunks → gateway)  stages devices on disk)
//! ```
//!
//! Children never hold each other's addresses across restarts: they look each
//! other up in [`context::Peers`] and wait for the gateway session on a watch
//! channel in [`context::AgentContext`], both of which outlive any child.

pub mod config;
pub mod context;
pub mod gateway_connection;
pub mod integration;
pub mod supervisor;
pub mod telemetry;
pub mod uploader;

pub use context::AgentContext;
pub use supervisor::Supervisor;
