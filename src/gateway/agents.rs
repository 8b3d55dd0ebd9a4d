//! Per-agent integration sources and their `config_json` rendering
//! (wire.md §4, gateway.md §3): `{"agent_id":…,"sources":{…}}` in canonical
//! JSON (keys sorted at every level, no whitespace), versioned as
//! `"v" + hex(SHA-256(config_json))`.

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

pub(crate) struct AgentConfigs {
    agents: RwLock<BTreeMap<String, Entry>>,
    /// Timestamp reported for agents that were never (re)configured.
    started_at: i64,
}

impl AgentConfigs {
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

    /// The agent's current config; an unlisted agent gets no sources.
    pub fn render(&self, agent_id: &str) -> RenderedConfig {
        let agents = self.agents.read().unwrap_or_else(|p| p.into_inner());
        match agents.get(agent_id) {
            Some(entry) => render(agent_id, &entry.sources, entry.changed_at),
            None => render(agent_id, &Map::new(), self.started_at),
        }
    }

    /// Replaces the agent's sources; returns the new rendering.
    pub fn set(&self, agent_id: &str, sources: Map<String, Value>) -> RenderedConfig {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        let entry = Entry {
            sources,
            changed_at: unix_secs(),
        };
        let rendered = render(agent_id, &entry.sources, entry.changed_at);
        agents.insert(agent_id.to_owned(), entry);
        rendered
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

fn render(agent_id: &str, sources: &Map<String, Value>, timestamp: i64) -> RenderedConfig {
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
        let configs = AgentConfigs::new(BTreeMap::from([(
            "a1".to_owned(),
            AgentSources {
                sources: sources.as_object().cloned().unwrap(),
            },
        )]));
        let rendered = configs.render("a1");
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

        let unknown = configs.render("nobody");
        assert_eq!(
            unknown.config_json,
            br#"{"agent_id":"nobody","sources":{}}"#
        );

        let changed = configs.set("a1", Map::new());
        assert_ne!(changed.version, rendered.version);
        assert_eq!(configs.render("a1").version, changed.version);
    }
}
