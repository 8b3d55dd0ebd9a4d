//! The `config_json` payload of `AgentConfigResponse` (wire.md §4): which
//! integration sources this agent runs.
//!
//! Parsing is forgiving where the contract says so: a bad field is an error for
//! that field only (with a warning), a bad source is reported and not run, and
//! only a payload that is not a JSON object at all is rejected as a whole (the
//! caller then keeps the current sources and retries).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::duration::{json_type, parse_go_duration, GoDuration};

/// The whole payload could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigJsonError {
    #[error("config_json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config_json must be a JSON object, got {0}")]
    NotObject(&'static str),
    #[error("config_json.sources must be an object keyed by source name, got {0}")]
    SourcesNotObject(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKind {
    Armis,
    Netbox,
    Faker,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Armis => "armis",
            SourceKind::Netbox => "netbox",
            SourceKind::Faker => "faker",
        }
    }
}

/// Source credentials. `Debug` never shows values: they are secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(pub BTreeMap<String, String>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl Credentials {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub label: String,
    pub query: String,
    pub sweep_modes: Vec<String>,
}

/// One valid integration source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub name: String,
    pub kind: SourceKind,
    pub endpoint: Option<String>,
    pub credentials: Credentials,
    pub queries: Vec<Query>,
    pub network_blacklist: Vec<IpNet>,
    pub insecure_skip_verify: bool,
    pub poll_interval: GoDuration,
    pub discovery_interval: GoDuration,
    pub partition: Option<String>,
    pub agent_id: Option<String>,
    pub gateway_id: Option<String>,
    pub sync_service_id: Option<String>,
    /// Stable hash of the source's JSON: equal hash ⇔ nothing to restart.
    pub hash: String,
    /// Field-level problems that did not invalidate the source.
    pub warnings: Vec<String>,
}

impl SourceConfig {
    /// How often the source runs after its first (immediate) run: the
    /// discovery interval when positive, else the poll interval; `None` when
    /// both are ≤ 0 (the source runs once and is reported as unscheduled).
    pub fn run_interval(&self) -> Option<Duration> {
        self.discovery_interval
            .positive()
            .or_else(|| self.poll_interval.positive())
    }
}

/// A source as found in the payload: runnable, or reported and not run.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEntry {
    Valid(Box<SourceConfig>),
    Invalid { hash: String, reason: String },
}

impl SourceEntry {
    pub fn hash(&self) -> &str {
        match self {
            SourceEntry::Valid(c) => &c.hash,
            SourceEntry::Invalid { hash, .. } => hash,
        }
    }
}

/// The sync part of `config_json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncConfig {
    pub sources: BTreeMap<String, SourceEntry>,
}

/// Serialises JSON with object keys sorted at every level, whatever
/// serde_json's map ordering feature is, so hashes are stable.
pub fn canonical_json(value: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn stable_hash(value: &Value) -> String {
    hex::encode(Sha256::digest(canonical_json(value).as_bytes()))
}

/// Parses `config_json`. Empty bytes mean "no sources".
pub fn parse_config_json(bytes: &[u8]) -> Result<SyncConfig, ConfigJsonError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(SyncConfig::default());
    }
    let root: Value = serde_json::from_slice(bytes)?;
    let Value::Object(root) = root else {
        return Err(ConfigJsonError::NotObject(json_type(&root)));
    };
    let sources = match root.get("sources") {
        None | Some(Value::Null) => return Ok(SyncConfig::default()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(ConfigJsonError::SourcesNotObject(json_type(other))),
    };
    let sources = sources
        .iter()
        .map(|(name, value)| (name.clone(), parse_source(name, value)))
        .collect();
    Ok(SyncConfig { sources })
}

fn parse_source(name: &str, value: &Value) -> SourceEntry {
    let hash = stable_hash(value);
    match parse_valid_source(name, value, hash.clone()) {
        Ok(config) => SourceEntry::Valid(Box::new(config)),
        Err(reason) => SourceEntry::Invalid {
            hash,
            reason: format!("source {name:?}: {reason}"),
        },
    }
}

fn parse_valid_source(name: &str, value: &Value, hash: String) -> Result<SourceConfig, String> {
    let Value::Object(obj) = value else {
        return Err(format!("must be an object, got {}", json_type(value)));
    };
    let mut warnings = Vec::new();
    let kind = match obj.get("type") {
        Some(Value::String(t)) => match t.trim().to_ascii_lowercase().as_str() {
            "armis" => SourceKind::Armis,
            "netbox" => SourceKind::Netbox,
            "faker" => SourceKind::Faker,
            other => {
                return Err(format!(
                    "unsupported type {other:?} (supported: armis, netbox, faker)"
                ))
            }
        },
        Some(other) => return Err(format!("type must be a string, got {}", json_type(other))),
        None => return Err("type is missing".into()),
    };
    let endpoint = opt_string(obj, "endpoint", &mut warnings).filter(|s| !s.trim().is_empty());
    if kind != SourceKind::Faker {
        let Some(ep) = endpoint.as_deref() else {
            return Err(format!("endpoint is required for type {}", kind.as_str()));
        };
        if !(ep.starts_with("http://") || ep.starts_with("https://")) {
            return Err(format!("endpoint {ep:?} is not an http(s) URL"));
        }
    }
    Ok(SourceConfig {
        name: name.to_owned(),
        kind,
        endpoint,
        credentials: credentials(obj, &mut warnings),
        queries: queries(obj, &mut warnings),
        network_blacklist: blacklist(obj, &mut warnings),
        insecure_skip_verify: flag(obj, "insecure_skip_verify", &mut warnings),
        poll_interval: duration(obj, "poll_interval", &mut warnings),
        discovery_interval: duration(obj, "discovery_interval", &mut warnings),
        partition: opt_string(obj, "partition", &mut warnings).filter(|s| !s.is_empty()),
        agent_id: opt_string(obj, "agent_id", &mut warnings).filter(|s| !s.is_empty()),
        gateway_id: opt_string(obj, "gateway_id", &mut warnings).filter(|s| !s.is_empty()),
        sync_service_id: opt_string(obj, "sync_service_id", &mut warnings)
            .filter(|s| !s.is_empty()),
        hash,
        warnings,
    })
}

fn opt_string(obj: &Map<String, Value>, key: &str, warnings: &mut Vec<String>) -> Option<String> {
    match obj.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            warnings.push(format!(
                "{key} must be a string, got {}; ignored",
                json_type(other)
            ));
            None
        }
    }
}

/// Credentials are strings on the wire, but values may arrive as numbers or
/// booleans (e.g. `"page_size": 500`): accept them as their JSON text.
fn credentials(obj: &Map<String, Value>, warnings: &mut Vec<String>) -> Credentials {
    let mut out = BTreeMap::new();
    match obj.get("credentials") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                match v {
                    Value::Null => {}
                    Value::String(s) => {
                        out.insert(k.clone(), s.clone());
                    }
                    Value::Number(_) | Value::Bool(_) => {
                        out.insert(k.clone(), v.to_string());
                    }
                    other => warnings.push(format!(
                        "credentials.{k} must be a string, got {}; ignored",
                        json_type(other)
                    )),
                }
            }
        }
        Some(other) => warnings.push(format!(
            "credentials must be an object, got {}; ignored",
            json_type(other)
        )),
    }
    Credentials(out)
}

fn queries(obj: &Map<String, Value>, warnings: &mut Vec<String>) -> Vec<Query> {
    let mut out = Vec::new();
    match obj.get("queries") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Value::Object(q) = item else {
                    warnings.push(format!("queries[{i}] must be an object; skipped"));
                    continue;
                };
                let text = |k: &str| {
                    q.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let sweep_modes = q
                    .get("sweep_modes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Query {
                    label: text("label"),
                    query: text("query"),
                    sweep_modes,
                });
            }
        }
        Some(other) => warnings.push(format!(
            "queries must be an array, got {}; ignored",
            json_type(other)
        )),
    }
    out
}

fn blacklist(obj: &Map<String, Value>, warnings: &mut Vec<String>) -> Vec<IpNet> {
    let mut out = Vec::new();
    match obj.get("network_blacklist") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let parsed = item.as_str().and_then(|s| {
                    let s = s.trim();
                    s.parse::<IpNet>()
                        .ok()
                        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
                });
                match parsed {
                    Some(net) => out.push(net),
                    None => warnings.push(format!(
                        "network_blacklist entry {item} is not a CIDR; skipped"
                    )),
                }
            }
        }
        Some(other) => warnings.push(format!(
            "network_blacklist must be an array, got {}; ignored",
            json_type(other)
        )),
    }
    out
}

fn flag(obj: &Map<String, Value>, key: &str, warnings: &mut Vec<String>) -> bool {
    match obj.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") || s.is_empty() => false,
        Some(other) => {
            warnings.push(format!("{key} must be a boolean, got {other}; using false"));
            false
        }
    }
}

fn duration(obj: &Map<String, Value>, key: &str, warnings: &mut Vec<String>) -> GoDuration {
    match obj.get(key) {
        None => GoDuration(0),
        Some(v) => parse_go_duration(v).unwrap_or_else(|e| {
            warnings.push(format!("{key}: {e}; treated as unset"));
            GoDuration(0)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL_EXAMPLE: &str = r#"{"agent_id":"agent-edge-01","mapper":{},"sweep":{},
 "sources":{"Armis Production":{"type":"armis","endpoint":"https://acme.armis.com","prefix":"armis/",
   "credentials":{"api_key":"ak_live_3F9x","api_secret":"s3cr3t","page_size":"500"},
   "queries":[{"label":"Corporate devices","query":"in:devices boundaries:\"Corporate\"","sweep_modes":["icmp","tcp"]}],
   "poll_interval":"5m","discovery_interval":"1h","sweep_interval":"1h",
   "agent_id":"agent-edge-01","partition":"default","network_blacklist":["10.255.0.0/16"],
   "sync_service_id":"3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90"}}}"#;

    fn valid(c: &SyncConfig, name: &str) -> SourceConfig {
        match &c.sources[name] {
            SourceEntry::Valid(s) => (**s).clone(),
            SourceEntry::Invalid { reason, .. } => panic!("{reason}"),
        }
    }

    #[test]
    fn parses_the_real_example() {
        let c = parse_config_json(REAL_EXAMPLE.as_bytes()).unwrap();
        let s = valid(&c, "Armis Production");
        assert_eq!(s.kind, SourceKind::Armis);
        assert_eq!(s.credentials.get("page_size"), Some("500"));
        assert_eq!(s.queries[0].label, "Corporate devices");
        assert_eq!(
            s.network_blacklist,
            vec!["10.255.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert_eq!(s.run_interval(), Some(Duration::from_secs(3600)));
        assert_eq!(
            s.sync_service_id.as_deref(),
            Some("3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90")
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = parse_config_json(REAL_EXAMPLE.as_bytes()).unwrap();
        let text = format!("{:?}", c);
        assert!(
            !text.contains("s3cr3t") && !text.contains("ak_live_3F9x"),
            "{text}"
        );
    }

    #[test]
    fn hash_ignores_key_order_and_detects_changes() {
        let a = parse_config_json(
            br#"{"sources":{"f":{"type":"faker","seed":"1","credentials":{"a":"1","b":"2"}}}}"#,
        )
        .unwrap();
        let b = parse_config_json(
            br#"{"sources":{"f":{"credentials":{"b":"2","a":"1"},"seed":"1","type":"faker"}}}"#,
        )
        .unwrap();
        let c = parse_config_json(
            br#"{"sources":{"f":{"type":"faker","seed":"2","credentials":{"a":"1","b":"2"}}}}"#,
        )
        .unwrap();
        assert_eq!(a.sources["f"].hash(), b.sources["f"].hash());
        assert_ne!(a.sources["f"].hash(), c.sources["f"].hash());
    }

    #[test]
    fn bad_sources_are_invalid_not_fatal() {
        let c = parse_config_json(
            br#"{"sources":{"ok":{"type":"faker"},"weird":{"type":"snmp"},"noep":{"type":"netbox"},"num":5}}"#,
        )
        .unwrap();
        assert!(matches!(c.sources["ok"], SourceEntry::Valid(_)));
        for (name, needle) in [
            ("weird", "unsupported"),
            ("noep", "endpoint"),
            ("num", "object"),
        ] {
            match &c.sources[name] {
                SourceEntry::Invalid { reason, .. } => {
                    assert!(reason.contains(needle) && reason.contains(name), "{reason}")
                }
                SourceEntry::Valid(_) => panic!("{name} should be invalid"),
            }
        }
    }

    #[test]
    fn bad_fields_only_affect_that_field() {
        let c = parse_config_json(
            br#"{"sources":{"s":{"type":" Faker ","discovery_interval":null,"poll_interval":60000000000,
               "network_blacklist":["10.0.0.0/8","nonsense",7],"insecure_skip_verify":"true",
               "credentials":{"page_size":500,"flag":true,"nested":{"x":1}}}}}"#,
        )
        .unwrap();
        let s = valid(&c, "s");
        assert_eq!(s.kind, SourceKind::Faker);
        assert_eq!(s.run_interval(), Some(Duration::from_secs(60)));
        assert_eq!(s.network_blacklist.len(), 1);
        assert!(s.insecure_skip_verify);
        assert_eq!(s.credentials.get("page_size"), Some("500"));
        assert_eq!(s.credentials.get("flag"), Some("true"));
        assert_eq!(s.warnings.len(), 4, "{:?}", s.warnings);
    }

    #[test]
    fn whole_payload_errors() {
        assert!(matches!(
            parse_config_json(b"{nope"),
            Err(ConfigJsonError::Json(_))
        ));
        assert!(matches!(
            parse_config_json(b"[1]"),
            Err(ConfigJsonError::NotObject(_))
        ));
        assert!(matches!(
            parse_config_json(br#"{"sources":[]}"#),
            Err(ConfigJsonError::SourcesNotObject(_))
        ));
        assert_eq!(parse_config_json(b"").unwrap(), SyncConfig::default());
        assert_eq!(
            parse_config_json(br#"{"agent_id":"x"}"#).unwrap(),
            SyncConfig::default()
        );
    }

    #[test]
    fn no_interval_means_unscheduled() {
        let c = parse_config_json(
            br#"{"sources":{"s":{"type":"faker","poll_interval":"-1s","discovery_interval":"0"}}}"#,
        )
        .unwrap();
        assert_eq!(valid(&c, "s").run_interval(), None);
    }
}
