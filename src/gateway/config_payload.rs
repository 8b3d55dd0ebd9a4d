//! An agent's `config_json` (wire.md §4, gateway.md §3):
//! `{"agent_id":…,"sources":{…}}` in canonical JSON (keys sorted at every
//! level, no whitespace), versioned as `"v" + hex(SHA-256(config_json))`.
//!
//! Also [`FileSources`]: sources pinned to agents of the default tenant in the
//! gateway's config file (demos, tests, fixed deployments); database sources
//! are managed through [`super::admin`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::config::AgentSources;
use crate::clock::unix_secs;

/// One agent's config as sent: payload, version and when it last changed.
#[derive(Clone)]
pub(crate) struct RenderedConfig {
    pub config_json: Vec<u8>,
    pub version: String,
    pub timestamp: i64,
}

struct Entry {
    sources: Map<String, Value>,
    changed_at: i64,
}

pub(crate) struct FileSources {
    agents: RwLock<BTreeMap<String, Entry>>,
    /// Timestamp reported for agents that were never (re)configured.
    started_at: i64,
}

impl FileSources {
    pub fn new(agents: BTreeMap<String, AgentSources>) -> Self {
        let now = unix_secs();
        let agents = agents
            .into_iter()
            .map(|(id, a)| {
                (
                    id,
                    Entry {
                        sources: a.sources,
                        changed_at: now,
                    },
                )
            })
            .collect();
        Self {
            agents: RwLock::new(agents),
            started_at: now,
        }
    }

    /// The agent's pinned sources and when they last changed (an unlisted
    /// agent has none, unchanged since start).
    pub fn sources(&self, agent_id: &str) -> (Map<String, Value>, i64) {
        let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
        match agents.get(agent_id) {
            Some(entry) => (entry.sources.clone(), entry.changed_at),
            None => (Map::new(), self.started_at),
        }
    }

    /// When the gateway started (the timestamp of a config never changed).
    pub fn started_at(&self) -> i64 {
        self.started_at
    }

    /// Replaces the agent's pinned sources.
    pub fn set(&self, agent_id: &str, sources: Map<String, Value>) {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        let entry = Entry {
            sources,
            changed_at: unix_secs(),
        };
        agents.insert(agent_id.to_owned(), entry);
    }

    /// Partitions the agent's sources explicitly set (`sources.*.partition`).
    pub fn source_partitions(&self, agent_id: &str) -> BTreeSet<String> {
        let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
        agents
            .get(agent_id)
            .map(|entry| {
                entry
                    .sources
                    .values()
                    .filter_map(|s| s.get("partition")?.as_str())
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The payload for `agent_id` with these sources.
pub(crate) fn render(
    agent_id: &str,
    sources: &Map<String, Value>,
    timestamp: i64,
) -> RenderedConfig {
    let mut payload = Map::new();
    payload.insert("agent_id".into(), Value::String(agent_id.to_owned()));
    payload.insert("sources".into(), Value::Object(sources.clone()));
    let mut config_json = Vec::new();
    write_canonical(&Value::Object(payload), &mut config_json);
    let version = config_version(&config_json);
    RenderedConfig {
        config_json,
        version,
        timestamp,
    }
}

/// `"v"` + lowercase hex SHA-256 of the exact payload bytes.
pub fn config_version(config_json: &[u8]) -> String {
    format!("v{}", hex::encode(Sha256::digest(config_json)))
}

/// Compact JSON with object keys sorted at every level. Written by hand so the
/// result does not depend on whether some crate in the build turned on
/// serde_json's `preserve_order`.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_payload_and_version() {
        let sources = json!({"Zed":{"type":"faker","b":[{"y":1,"x":2}]},"Alpha":{"type":"netbox","partition":"lab"}});
        let configs = FileSources::new(BTreeMap::from([(
            "a1".to_owned(),
            AgentSources {
                sources: sources.as_object().cloned().unwrap(),
            },
        )]));
        let (sources, at) = configs.sources("a1");
        let rendered = render("a1", &sources, at);
        let text = String::from_utf8(rendered.config_json.clone()).unwrap();
        assert_eq!(
            text,
            r#"{"agent_id":"a1","sources":{"Alpha":{"partition":"lab","type":"netbox"},"Zed":{"b":[{"x":2,"y":1}],"type":"faker"}}}"#
        );
        assert_eq!(rendered.version, config_version(text.as_bytes()));
        assert_eq!(rendered.version.len(), 65);
        assert_eq!(
            configs.source_partitions("a1"),
            BTreeSet::from(["lab".to_owned()])
        );

        let (none, at) = configs.sources("nobody");
        assert_eq!(
            render("nobody", &none, at).config_json,
            br#"{"agent_id":"nobody","sources":{}}"#
        );

        configs.set("a1", Map::new());
        let (sources, at) = configs.sources("a1");
        assert_ne!(render("a1", &sources, at).version, rendered.version);
    }
}
