//! From a `results` message (a JSON array of device updates, wire.md §5) to
//! per-run chunk parts ready for staging (gateway.md §4). Pure: no I/O.
//!
//! A run's numbering lives in each update's `sync_meta`, not in the envelope:
//! a run of more than 5000 chunks arrives over several streams, each numbered
//! 0..k on its own. Updates are grouped by `(sync_run_id, chunk_index)`.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::validate::Violation;

/// Metadata keys that identify a device better than its IP, strongest first.
pub const STRONG_ID_KEYS: &[&str] = &["armis_device_id", "netbox_device_id", "integration_id"];

/// What an agent may write: its certificate partition, plus partitions that
/// one of its configured sources explicitly sets (gateway.md §1).
#[derive(Clone, Debug)]
pub struct UpdatePolicy {
    pub partition: String,
    pub allowed_partitions: BTreeSet<String>,
}

impl UpdatePolicy {
    pub fn new(partition: &str, source_partitions: impl IntoIterator<Item = String>) -> Self {
        let mut allowed: BTreeSet<String> = source_partitions.into_iter().collect();
        allowed.insert(partition.to_owned());
        Self {
            partition: partition.to_owned(),
            allowed_partitions: allowed,
        }
    }
}

/// One accepted update, normalised for the `devices` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagedDevice {
    pub partition: String,
    pub source: String,
    pub device_key: String,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub hostname: Option<String>,
    pub metadata: Map<String, Value>,
}

/// The updates of one run chunk found in one message.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkPart {
    pub run_id: String,
    pub chunk_index: u32,
    pub total_chunks: u32,
    pub total_devices: u64,
    /// Updates that passed the checks (also counted when `devices` is not kept).
    pub accepted: u64,
    /// Updates of this chunk rejected (no IP and no strong id, foreign partition).
    pub rejected: u64,
    /// Empty when parsing for validate-only mode.
    pub devices: Vec<StagedDevice>,
}

/// Everything found in one `results` message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedResults {
    pub parts: Vec<ChunkPart>,
    /// Elements that cannot be attributed to a run: non-objects and updates
    /// without a usable `sync_meta`.
    pub unattributed_rejected: u64,
}

impl ParsedResults {
    pub fn accepted(&self) -> u64 {
        self.parts.iter().map(|p| p.accepted).sum()
    }
    pub fn rejected(&self) -> u64 {
        self.unattributed_rejected + self.parts.iter().map(|p| p.rejected).sum::<u64>()
    }
}

/// Run numbering of one update.
#[derive(Debug, PartialEq, Eq)]
struct RunMeta {
    run_id: String,
    chunk_index: u32,
    total_chunks: u32,
    total_devices: u64,
}

/// Parses a `results` message. A message that is not a JSON array rejects the
/// stream (INVALID_ARGUMENT); bad elements are only counted.
pub fn parse_results(message: &[u8], policy: &UpdatePolicy, keep_devices: bool) -> Result<ParsedResults, Violation> {
    let elements: Vec<Value> = serde_json::from_slice(message)
        .map_err(|e| Violation::invalid(format!("results message is not a JSON array: {e}")))?;
    let mut out = ParsedResults::default();
    for element in elements {
        let Value::Object(update) = element else {
            out.unattributed_rejected += 1;
            continue;
        };
        let Some(meta) = run_meta(&update) else {
            out.unattributed_rejected += 1;
            continue;
        };
        let part = part_for(&mut out.parts, meta);
        match stage_update(update, policy) {
            Ok(device) => {
                part.accepted += 1;
                if keep_devices {
                    part.devices.push(device);
                }
            }
            Err(reason) => {
                tracing::debug!(run_id = %part.run_id, reason, "update rejected");
                part.rejected += 1;
            }
        }
    }
    Ok(out)
}

/// The part for `meta`'s (run, chunk), created on first sight. Messages hold
/// one part in practice, so a linear search is the cheapest lookup.
fn part_for(parts: &mut Vec<ChunkPart>, meta: RunMeta) -> &mut ChunkPart {
    let position = parts
        .iter()
        .position(|p| p.run_id == meta.run_id && p.chunk_index == meta.chunk_index);
    let index = match position {
        Some(index) => index,
        None => {
            parts.push(ChunkPart {
                run_id: meta.run_id,
                chunk_index: meta.chunk_index,
                total_chunks: meta.total_chunks,
                total_devices: meta.total_devices,
                accepted: 0,
                rejected: 0,
                devices: Vec::new(),
            });
            parts.len() - 1
        }
    };
    &mut parts[index]
}

fn run_meta(update: &Map<String, Value>) -> Option<RunMeta> {
    let meta = update.get("sync_meta")?.as_object()?;
    let run_id = meta.get("sync_run_id")?.as_str()?.trim();
    let chunk_index = u32::try_from(meta.get("chunk_index")?.as_u64()?).ok()?;
    let total_chunks = u32::try_from(meta.get("total_chunks")?.as_u64()?).ok()?;
    if run_id.is_empty() || total_chunks == 0 || chunk_index >= total_chunks {
        return None;
    }
    Some(RunMeta {
        run_id: run_id.to_owned(),
        chunk_index,
        total_chunks,
        total_devices: meta.get("total_devices").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// Checks and normalises one update. `agent_id`, `gateway_id`, `device_id`
/// and `metadata.agent_id` are never used as identity.
fn stage_update(mut update: Map<String, Value>, policy: &UpdatePolicy) -> Result<StagedDevice, &'static str> {
    let partition = match text(&update, "partition") {
        Some(p) => p,
        None => policy.partition.clone(),
    };
    if !policy.allowed_partitions.contains(&partition) {
        return Err("partition not allowed for this agent");
    }
    let metadata = match update.remove("metadata") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let ip = text(&update, "ip")
        .and_then(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_string());
    let device_key = match strong_id(&metadata) {
        Some(id) => id,
        None => ip.clone().ok_or("no IP and no strong identifier")?,
    };
    Ok(StagedDevice {
        partition,
        source: text(&update, "source").unwrap_or_else(|| "unknown".to_owned()),
        device_key,
        ip,
        mac: text(&update, "mac"),
        hostname: text(&update, "hostname"),
        metadata,
    })
}

/// The strongest identifier in the metadata (strings; numbers accepted).
pub fn strong_id(metadata: &Map<String, Value>) -> Option<String> {
    STRONG_ID_KEYS.iter().find_map(|key| match metadata.get(*key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

fn text(update: &Map<String, Value>, key: &str) -> Option<String> {
    update
        .get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> UpdatePolicy {
        UpdatePolicy::new("site-a", ["lab".to_owned()])
    }

    fn update(ip: &str, partition: &str, chunk: u32, meta: Value) -> Value {
        json!({"agent_id":"a1","gateway_id":"gw","partition":partition,"device_id":format!("{partition}:{ip}"),
               "ip":ip,"source":"faker","timestamp":"2025-01-01T00:00:00Z","metadata":meta,
               "sync_meta":{"sync_service_id":"s","sync_run_id":"r1","chunk_index":chunk,"total_chunks":2,"total_devices":9,"is_final":chunk==1}})
    }

    #[test]
    fn groups_by_run_chunk_and_keys_by_strongest_id() {
        let message = json!([
            update("10.0.0.1", "site-a", 0, json!({"integration_id":"i-1","agent_id":"evil"})),
            update("10.0.0.2", "site-a", 0, json!({})),
            update("10.0.0.3", "lab", 1, json!({"armis_device_id":"7","integration_id":"i-3"})),
        ]);
        let parsed = parse_results(message.to_string().as_bytes(), &policy(), true).unwrap();
        assert_eq!(parsed.parts.len(), 2);
        let first = &parsed.parts[0];
        assert_eq!((first.run_id.as_str(), first.chunk_index, first.total_chunks), ("r1", 0, 2));
        assert_eq!(first.devices[0].device_key, "i-1");
        assert_eq!(first.devices[1].device_key, "10.0.0.2");
        assert_eq!(parsed.parts[1].devices[0].device_key, "7");
        assert_eq!(parsed.parts[1].devices[0].partition, "lab");
        assert_eq!(parsed.accepted(), 3);
        assert_eq!(parsed.rejected(), 0);
    }

    #[test]
    fn rejects_and_counts_bad_elements() {
        let message = json!([
            1, "x", null, [],
            {"ip":"10.0.0.9"},
            update("10.0.0.1", "elsewhere", 0, json!({})),
            update("", "site-a", 0, json!({})),
            update("not-an-ip", "site-a", 0, json!({})),
            update("", "site-a", 0, json!({"netbox_device_id":"nb-1"})),
        ]);
        let parsed = parse_results(message.to_string().as_bytes(), &policy(), false).unwrap();
        assert_eq!(parsed.unattributed_rejected, 5);
        assert_eq!(parsed.parts.len(), 1);
        assert_eq!(parsed.parts[0].rejected, 3);
        assert_eq!(parsed.parts[0].accepted, 1);
        assert!(parsed.parts[0].devices.is_empty(), "validate-only keeps no devices");
    }

    #[test]
    fn missing_partition_means_the_certificate_partition() {
        let mut u = update("10.0.0.1", "x", 0, json!({}));
        u.as_object_mut().unwrap().remove("partition");
        let parsed = parse_results(json!([u]).to_string().as_bytes(), &policy(), true).unwrap();
        assert_eq!(parsed.parts[0].devices[0].partition, "site-a");
    }

    #[test]
    fn invalid_sync_meta_is_unattributed() {
        let mut bad_index = update("10.0.0.1", "site-a", 0, json!({}));
        bad_index["sync_meta"]["chunk_index"] = json!(2);
        let mut no_run = update("10.0.0.1", "site-a", 0, json!({}));
        no_run["sync_meta"]["sync_run_id"] = json!("");
        let parsed = parse_results(json!([bad_index, no_run]).to_string().as_bytes(), &policy(), true).unwrap();
        assert_eq!(parsed.unattributed_rejected, 2);
    }

    #[test]
    fn non_array_message_is_invalid_argument() {
        for message in [&b"{}"[..], b"not json", b""] {
            assert_eq!(
                parse_results(message, &policy(), true).unwrap_err().code,
                tonic::Code::InvalidArgument
            );
        }
    }
}
