//! The device update: one element of a sync chunk's JSON array (wire.md §5).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One discovered device as it travels to the gateway.
///
/// Field order is the wire order. `sync_meta` is last and optional: the agent
/// stages updates on disk *without* it (its numbers are only known once the
/// whole run is staged) and the chunker splices the real `sync_meta` in while
/// building each chunk, so every update is JSON-encoded exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceUpdate {
    pub agent_id: String,
    pub gateway_id: String,
    pub partition: String,
    /// `"<partition>:<ip>"`.
    pub device_id: String,
    pub ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// `armis`, `netbox` or `faker`.
    pub source: String,
    /// RFC 3339 UTC with fractional seconds.
    pub timestamp: String,
    /// String values only (wire.md §5). Never carries the agent's own id.
    /// Keys are mostly fixed names, so they are borrowed `'static` strings
    /// when the agent builds an update (no allocation per key per device).
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_meta: Option<SyncMeta>,
}

/// Device metadata: string keys (usually static names) to string values.
pub type Metadata = BTreeMap<Cow<'static, str>, String>;

/// Per-run numbering carried by every update of a chunk (wire.md §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMeta {
    pub sync_service_id: String,
    pub sync_run_id: String,
    pub chunk_index: u32,
    pub total_chunks: u32,
    pub total_devices: u64,
    pub is_final: bool,
}

/// What the integration writes into every update of one run: the identity
/// fields resolved from the source overrides and the agent (wire.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateContext {
    pub agent_id: String,
    pub gateway_id: String,
    pub partition: String,
    /// `armis`, `netbox` or `faker`.
    pub source: &'static str,
    /// RFC 3339 time stamped on every update of the run.
    pub timestamp: String,
}

impl UpdateContext {
    /// Builds an update with the context's identity fields and
    /// `device_id = "<partition>:<ip>"`.
    pub fn update(
        &self,
        ip: String,
        mac: Option<String>,
        hostname: Option<String>,
        metadata: Metadata,
    ) -> DeviceUpdate {
        DeviceUpdate {
            agent_id: self.agent_id.clone(),
            gateway_id: self.gateway_id.clone(),
            partition: self.partition.clone(),
            device_id: format!("{}:{}", self.partition, ip),
            ip,
            mac,
            hostname,
            source: self.source.to_owned(),
            timestamp: self.timestamp.clone(),
            metadata,
            sync_meta: None,
        }
    }
}

/// Inserts a trimmed value unless it is blank: sources.md lists most
/// metadata keys "when non-empty"/"when present", and core would otherwise
/// overwrite real values with "".
pub fn insert_non_empty(metadata: &mut Metadata, key: &'static str, value: Option<String>) {
    if let Some(value) = value.and_then(non_empty) {
        metadata.insert(Cow::Borrowed(key), value);
    }
}

/// The value trimmed, or `None` when blank.
pub fn non_empty(value: String) -> Option<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        None
    } else if trimmed.len() == value.len() {
        // The common case: keep the allocation we already have.
        Some(value)
    } else {
        Some(trimmed.to_owned())
    }
}

/// Now as RFC 3339 UTC with fractional seconds (wire.md §5).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}
