//! What the HTTP source tests share: a source as `config_json` carries it,
//! a fast retry policy, a staging directory per run, and the staged updates.
#![allow(dead_code)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use serviceradar_agent::config::bootstrap::SourceHttpPolicy;
use serviceradar_agent::config::sources::{parse_config_json, SourceConfig, SourceEntry};
use serviceradar_agent::device::{DeviceUpdate, UpdateContext};
use serviceradar_agent::sources::runner::RunJob;
use serviceradar_agent::sources::stager::StageOutput;
use serviceradar_agent::upload::staging::RunWriter;
use wiremock::ResponseTemplate;

/// Retries without waiting (1 ms backoff), a short request timeout.
pub fn fast_policy() -> SourceHttpPolicy {
    SourceHttpPolicy {
        request_timeout: Duration::from_secs(10),
        max_retries: 3,
        retry_base: Duration::from_millis(1),
        retry_cap: Duration::from_millis(1),
        retry_after_cap: Duration::from_millis(1),
        max_body_bytes: 16 * 1024 * 1024,
    }
}

/// One source parsed from `config_json` the way the agent gets it; `fields`
/// are merged over `{type, endpoint, poll_interval}`.
pub fn source_config(kind: &str, endpoint: &str, fields: Value) -> SourceConfig {
    let mut source = json!({"type": kind, "endpoint": endpoint, "poll_interval": "5m"});
    if let (Some(base), Value::Object(extra)) = (source.as_object_mut(), fields) {
        base.extend(extra);
    }
    let payload = json!({"sources": {"Test Source": source}});
    let config = parse_config_json(payload.to_string().as_bytes()).expect("config_json parses");
    match config.sources.into_values().next() {
        Some(SourceEntry::Valid(c)) => *c,
        Some(SourceEntry::Invalid { reason, .. }) => panic!("{reason}"),
        None => panic!("no source"),
    }
}

pub fn update_ctx(source: &'static str) -> UpdateContext {
    UpdateContext {
        agent_id: "agent-edge-01".into(),
        gateway_id: "gw-1".into(),
        partition: "lab".into(),
        source,
        timestamp: "2026-11-22T12:00:00.000000000Z".into(),
    }
}

/// A staging directory for runs.
pub struct Staging {
    pub dir: tempfile::TempDir,
}

impl Staging {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn job(&self, source: &'static str, blacklist: &[&str], cancel: bool) -> RunJob {
        RunJob {
            update_ctx: update_ctx(source),
            blacklist: blacklist.iter().map(|n| n.parse().expect("CIDR")).collect(),
            writer: RunWriter::create(self.dir.path(), &uuid::Uuid::new_v4().to_string())
                .expect("staging writer"),
            cancel: Arc::new(AtomicBool::new(cancel)),
        }
    }

    /// Files left in the staging directory.
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path())
            .expect("staging dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// The staged run's updates, in order (one JSON update per line).
pub fn staged_updates(output: &StageOutput) -> Vec<DeviceUpdate> {
    let text = std::fs::read_to_string(&output.staged.data_path).expect("staged file");
    let updates: Vec<DeviceUpdate> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("staged update"))
        .collect();
    assert_eq!(updates.len() as u64, output.staged.device_count);
    updates
}

pub fn json_body(body: impl Into<Vec<u8>>) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.into(), "application/json")
}
