//! Integration sources (gateway.md §3): what an administrator sets, how it is
//! checked, and how an agent's assigned sources become the `sources` object
//! of its `config_json` (wire.md §4).
//!
//! Credentials are sealed with the gateway's [`CredentialKey`] bound to the
//! source's id, and opened only here, to build an agent's config.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::identity::valid_partition;
use super::secrets::CredentialKey;
use super::store::SourceRow;
use crate::config::duration::parse_go_duration_str;

/// Source types the agent runs.
pub const SOURCE_TYPES: &[&str] = &["armis", "netbox", "faker"];
/// Partition of a source that names none.
pub const DEFAULT_SOURCE_PARTITION: &str = "default";
const MAX_NAME_BYTES: usize = 200;
const MAX_PAGE_SIZE: u32 = 100_000;
/// `config_json` keys the gateway writes itself; `settings` may not set them.
const RESERVED_KEYS: &[&str] = &[
    "type",
    "endpoint",
    "credentials",
    "queries",
    "network_blacklist",
    "poll_interval",
    "discovery_interval",
    "partition",
    "sync_service_id",
    "agent_id",
    "gateway_id",
];

/// Credential values by name. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
pub struct Credentials(pub BTreeMap<String, String>);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl<'de> Deserialize<'de> for Credentials {
    /// An object; non-string values (numbers, booleans) become their JSON
    /// text, as the agent accepts them (wire.md §4).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (key, value) in map {
            let text = match value {
                Value::String(s) => s,
                Value::Null => continue,
                Value::Object(_) | Value::Array(_) => {
                    return Err(serde::de::Error::custom(format!(
                        "credential {key:?} must be a string"
                    )))
                }
                other => other.to_string(),
            };
            out.insert(key, text);
        }
        Ok(Self(out))
    }
}

/// A new source, as an administrator describes it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub source_type: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The agent that runs it; none means it runs nowhere yet.
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub poll_interval: Option<String>,
    #[serde(default)]
    pub discovery_interval: Option<String>,
    #[serde(default)]
    pub page_size: Option<u32>,
    #[serde(default)]
    pub queries: Vec<Value>,
    #[serde(default)]
    pub network_blacklist: Vec<String>,
    #[serde(default)]
    pub settings: Map<String, Value>,
    #[serde(default)]
    pub credentials: Credentials,
}

/// Changes to a source: absent fields stay as they are. `credentials`
/// replaces the whole set; `credentials_set` / `credentials_unset` edit it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePatch {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub source_type: Option<String>,
    pub endpoint: Option<String>,
    pub enabled: Option<bool>,
    pub partition: Option<String>,
    pub poll_interval: Option<String>,
    pub discovery_interval: Option<String>,
    pub page_size: Option<u32>,
    pub queries: Option<Vec<Value>>,
    pub network_blacklist: Option<Vec<String>>,
    pub settings: Option<Map<String, Value>>,
    pub credentials: Option<Credentials>,
    #[serde(default)]
    pub credentials_set: Credentials,
    #[serde(default)]
    pub credentials_unset: Vec<String>,
}

/// What is wrong with a source description; names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("source field `{field}`: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn spec_err(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// The checked, normalised configuration of a source (credentials apart).
#[derive(Clone, Debug, PartialEq)]
pub struct SourceConfig {
    pub name: String,
    pub source_type: String,
    pub endpoint: Option<String>,
    pub enabled: bool,
    pub partition: String,
    pub poll_interval: Option<String>,
    pub discovery_interval: Option<String>,
    pub page_size: Option<u32>,
    pub queries: Vec<Value>,
    pub network_blacklist: Vec<String>,
    pub settings: Map<String, Value>,
}

impl SourceConfig {
    /// Checks every field; the error names the first bad one.
    pub fn check(mut self) -> Result<Self, SpecError> {
        self.name = self.name.trim().to_owned();
        check_name(&self.name)?;
        self.source_type = self.source_type.trim().to_ascii_lowercase();
        if !SOURCE_TYPES.contains(&self.source_type.as_str()) {
            return Err(spec_err(
                "type",
                format!(
                    "{:?} is not one of {}",
                    self.source_type,
                    SOURCE_TYPES.join(", ")
                ),
            ));
        }
        self.endpoint = self
            .endpoint
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty());
        match &self.endpoint {
            Some(endpoint) => check_endpoint(endpoint)?,
            None if self.source_type != "faker" => {
                return Err(spec_err(
                    "endpoint",
                    format!("required for {} sources", self.source_type),
                ))
            }
            None => {}
        }
        self.partition = self.partition.trim().to_owned();
        if !valid_partition(&self.partition) {
            return Err(spec_err(
                "partition",
                "1–128 bytes, no dots or control characters",
            ));
        }
        for (field, value) in [
            ("poll_interval", &mut self.poll_interval),
            ("discovery_interval", &mut self.discovery_interval),
        ] {
            *value = value
                .take()
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty());
            if let Some(text) = value {
                parse_go_duration_str(text).map_err(|e| spec_err(field, e))?;
            }
        }
        if let Some(size) = self.page_size {
            if size == 0 || size > MAX_PAGE_SIZE {
                return Err(spec_err(
                    "page_size",
                    format!("must be between 1 and {MAX_PAGE_SIZE}"),
                ));
            }
        }
        for (i, query) in self.queries.iter().enumerate() {
            let field = format!("queries[{i}]");
            let Value::Object(q) = query else {
                return Err(spec_err(&field, "expected {label, query, sweep_modes}"));
            };
            if !matches!(q.get("query"), None | Some(Value::String(_))) {
                return Err(spec_err(&format!("{field}.query"), "expected a string"));
            }
            if !matches!(q.get("label"), None | Some(Value::String(_))) {
                return Err(spec_err(&format!("{field}.label"), "expected a string"));
            }
        }
        for (i, cidr) in self.network_blacklist.iter_mut().enumerate() {
            *cidr = cidr.trim().to_owned();
            cidr.parse::<ipnet::IpNet>().map_err(|e| {
                spec_err(&format!("network_blacklist[{i}]"), format!("{cidr:?}: {e}"))
            })?;
        }
        if let Some(key) = self
            .settings
            .keys()
            .find(|k| RESERVED_KEYS.contains(&k.as_str()))
        {
            return Err(spec_err(
                &format!("settings.{key}"),
                "set by its own field, not through settings",
            ));
        }
        Ok(self)
    }
}

impl SourceSpec {
    /// Splits a spec into its checked configuration and its credentials.
    pub fn into_config(self) -> Result<(SourceConfig, Credentials), SpecError> {
        let config = SourceConfig {
            name: self.name,
            source_type: self.source_type,
            endpoint: self.endpoint,
            enabled: self.enabled.unwrap_or(true),
            partition: self
                .partition
                .unwrap_or_else(|| DEFAULT_SOURCE_PARTITION.to_owned()),
            poll_interval: self.poll_interval,
            discovery_interval: self.discovery_interval,
            page_size: self.page_size,
            queries: self.queries,
            network_blacklist: self.network_blacklist,
            settings: self.settings,
        }
        .check()?;
        check_credentials(&self.credentials)?;
        Ok((config, self.credentials))
    }
}

impl SourcePatch {
    /// Applies the patch to a stored configuration and credentials.
    pub fn apply(
        self,
        mut config: SourceConfig,
        mut credentials: Credentials,
    ) -> Result<(SourceConfig, Credentials), SpecError> {
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field { config.$field = v; }
            )*};
        }
        set!(
            name,
            source_type,
            enabled,
            partition,
            queries,
            network_blacklist,
            settings
        );
        // Optional fields: an empty string clears them.
        if let Some(e) = self.endpoint {
            config.endpoint = Some(e);
        }
        if let Some(v) = self.poll_interval {
            config.poll_interval = Some(v);
        }
        if let Some(v) = self.discovery_interval {
            config.discovery_interval = Some(v);
        }
        if let Some(size) = self.page_size {
            config.page_size = Some(size);
        }
        if let Some(replacement) = self.credentials {
            credentials = replacement;
        }
        credentials.0.extend(self.credentials_set.0);
        for key in &self.credentials_unset {
            credentials.0.remove(key);
        }
        let config = config.check()?;
        check_credentials(&credentials)?;
        Ok((config, credentials))
    }
}

fn check_name(name: &str) -> Result<(), SpecError> {
    // The name travels as the run report's service name `sync:<name>`
    // (≤ 255 bytes, no CR/LF/TAB; wire.md §7).
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(spec_err("name", format!("1 to {MAX_NAME_BYTES} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(spec_err("name", "no control characters"));
    }
    Ok(())
}

fn check_endpoint(endpoint: &str) -> Result<(), SpecError> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| spec_err("endpoint", format!("{endpoint:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(spec_err(
            "endpoint",
            format!("{endpoint:?}: expected an http(s) URL with a host"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(spec_err(
            "endpoint",
            "must not carry credentials; put them in `credentials`",
        ));
    }
    Ok(())
}

fn check_credentials(credentials: &Credentials) -> Result<(), SpecError> {
    match credentials.0.keys().find(|k| k.trim().is_empty()) {
        Some(_) => Err(spec_err(
            "credentials",
            "credential names must not be empty",
        )),
        None => Ok(()),
    }
}

/// The stored configuration of a row.
pub fn config_of(row: &SourceRow) -> SourceConfig {
    SourceConfig {
        name: row.name.clone(),
        source_type: row.source_type.clone(),
        endpoint: row.endpoint.clone(),
        enabled: row.enabled,
        partition: row.partition.clone(),
        poll_interval: row.poll_interval.clone(),
        discovery_interval: row.discovery_interval.clone(),
        page_size: row.page_size,
        queries: row.queries.clone(),
        network_blacklist: row.network_blacklist.clone(),
        settings: row.settings.clone(),
    }
}

/// Seals credentials for the source `source_id`.
pub fn seal_credentials(
    key: &CredentialKey,
    source_id: &str,
    credentials: &Credentials,
) -> Result<Vec<u8>, super::secrets::SecretsError> {
    let plain =
        serde_json::to_vec(&credentials.0).map_err(|_| super::secrets::SecretsError::Seal)?;
    key.seal(&plain, source_id.as_bytes())
}

/// Opens a source's sealed credentials.
pub fn open_credentials(
    key: &CredentialKey,
    row: &SourceRow,
) -> Result<Credentials, super::secrets::SecretsError> {
    let plain = key.open(&row.credentials_sealed, row.id.as_bytes())?;
    let map = serde_json::from_slice(&plain)
        .map_err(|_| super::secrets::SecretsError::Open("not a credentials object"))?;
    Ok(Credentials(map))
}

/// One source as the agent receives it (a value of `config_json.sources`).
pub fn render_source(row: &SourceRow, credentials: Credentials) -> Value {
    let mut out = row.settings.clone();
    let mut credentials = credentials.0;
    if let Some(size) = row.page_size {
        // wire.md §4: page_size travels in credentials, as a string.
        credentials.insert("page_size".into(), size.to_string());
    }
    out.insert("type".into(), Value::String(row.source_type.clone()));
    if let Some(endpoint) = &row.endpoint {
        out.insert("endpoint".into(), Value::String(endpoint.clone()));
    }
    out.insert(
        "credentials".into(),
        Value::Object(
            credentials
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
        ),
    );
    if !row.queries.is_empty() {
        out.insert("queries".into(), Value::Array(row.queries.clone()));
    }
    if !row.network_blacklist.is_empty() {
        out.insert(
            "network_blacklist".into(),
            Value::Array(
                row.network_blacklist
                    .iter()
                    .cloned()
                    .map(Value::String)
                    .collect(),
            ),
        );
    }
    for (key, value) in [
        ("poll_interval", &row.poll_interval),
        ("discovery_interval", &row.discovery_interval),
    ] {
        if let Some(v) = value {
            out.insert(key.into(), Value::String(v.clone()));
        }
    }
    out.insert("partition".into(), Value::String(row.partition.clone()));
    out.insert("sync_service_id".into(), Value::String(row.id.clone()));
    Value::Object(out)
}

/// The `sources` object for an agent from its assigned, enabled rows. A
/// source whose credentials do not open is left out (and logged): sending it
/// without credentials would only make the agent fail its runs.
pub fn render_sources(rows: &[SourceRow], key: &CredentialKey) -> Map<String, Value> {
    let mut sources = Map::new();
    for row in rows {
        match open_credentials(key, row) {
            Ok(credentials) => {
                sources.insert(row.name.clone(), render_source(row, credentials));
            }
            Err(e) => {
                tracing::error!(tenant = %row.tenant, source = %row.name, id = %row.id,
                    "source left out of the agent's config: its credentials do not open: {e}");
            }
        }
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> Result<(SourceConfig, Credentials), SpecError> {
        serde_json::from_value::<SourceSpec>(value)
            .map_err(|e| spec_err("(json)", e.to_string()))?
            .into_config()
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let (config, credentials) = spec(json!({"name":" Armis Prod ","type":"ARMIS",
            "endpoint":"https://acme.armis.com","credentials":{"secret_key":"s","page_size":500},
            "network_blacklist":[" 10.255.0.0/16"],"poll_interval":"5m"}))
        .unwrap();
        assert_eq!(config.name, "Armis Prod");
        assert_eq!(config.source_type, "armis");
        assert_eq!(config.partition, "default");
        assert!(config.enabled);
        assert_eq!(config.network_blacklist, vec!["10.255.0.0/16"]);
        assert_eq!(credentials.0["page_size"], "500");
        assert_eq!(format!("{credentials:?}"), r#"{"page_size", "secret_key"}"#);

        let cases = [
            (json!({"name":"","type":"faker"}), "name"),
            (json!({"name":"a\tb","type":"faker"}), "name"),
            (json!({"name":"x","type":"snmp"}), "type"),
            (json!({"name":"x","type":"armis"}), "endpoint"),
            (
                json!({"name":"x","type":"netbox","endpoint":"ftp://h"}),
                "endpoint",
            ),
            (
                json!({"name":"x","type":"netbox","endpoint":"https://u:p@h"}),
                "endpoint",
            ),
            (
                json!({"name":"x","type":"faker","partition":"a.b"}),
                "partition",
            ),
            (
                json!({"name":"x","type":"faker","poll_interval":"soon"}),
                "poll_interval",
            ),
            (
                json!({"name":"x","type":"faker","page_size":0}),
                "page_size",
            ),
            (
                json!({"name":"x","type":"faker","queries":["q"]}),
                "queries[0]",
            ),
            (
                json!({"name":"x","type":"faker","network_blacklist":["10.0.0.0/33"]}),
                "network_blacklist[0]",
            ),
            (
                json!({"name":"x","type":"faker","settings":{"sync_service_id":"x"}}),
                "settings.sync_service_id",
            ),
            (
                json!({"name":"x","type":"faker","credentials":{"":"v"}}),
                "credentials",
            ),
        ];
        for (value, field) in cases {
            let err = spec(value.clone()).unwrap_err();
            assert_eq!(err.field, field, "{value}: {err}");
        }
    }

    #[test]
    fn patches_edit_config_and_credentials() {
        let (config, credentials) = spec(json!({"name":"n","type":"faker",
            "credentials":{"a":"1","b":"2"}}))
        .unwrap();
        let patch: SourcePatch = serde_json::from_value(json!({"enabled":false,
            "credentials_set":{"c":"3"},"credentials_unset":["a"],"poll_interval":"1m"}))
        .unwrap();
        let (config, credentials) = patch.apply(config, credentials).unwrap();
        assert!(!config.enabled);
        assert_eq!(config.poll_interval.as_deref(), Some("1m"));
        assert_eq!(credentials.0.keys().collect::<Vec<_>>(), vec!["b", "c"]);
        let bad: SourcePatch = serde_json::from_value(json!({"type":"nope"})).unwrap();
        assert_eq!(bad.apply(config, credentials).unwrap_err().field, "type");
        assert!(serde_json::from_value::<SourcePatch>(json!({"colour":"red"})).is_err());
    }

    #[test]
    fn rendering_follows_wire_md_section_4() {
        let key = CredentialKey::generate().unwrap();
        let mut row = SourceRow {
            id: "3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90".into(),
            tenant: "t".into(),
            name: "Armis Production".into(),
            source_type: "armis".into(),
            endpoint: Some("https://acme.armis.com".into()),
            enabled: true,
            agent_id: Some("agent-edge-01".into()),
            partition: "default".into(),
            poll_interval: Some("5m".into()),
            discovery_interval: Some("1h".into()),
            page_size: Some(500),
            queries: vec![json!({"label":"Corp","query":"in:devices"})],
            network_blacklist: vec!["10.255.0.0/16".into()],
            settings: json!({"insecure_skip_verify":true})
                .as_object()
                .cloned()
                .unwrap(),
            credentials_sealed: Vec::new(),
            credential_keys: vec!["secret_key".into()],
            status: Default::default(),
            created_at: 0,
            updated_at: 0,
        };
        let credentials = Credentials(BTreeMap::from([("secret_key".into(), "s3cr3t".into())]));
        row.credentials_sealed = seal_credentials(&key, &row.id, &credentials).unwrap();
        let sources = render_sources(std::slice::from_ref(&row), &key);
        assert_eq!(
            sources["Armis Production"],
            json!({"type":"armis","endpoint":"https://acme.armis.com",
                "credentials":{"secret_key":"s3cr3t","page_size":"500"},
                "queries":[{"label":"Corp","query":"in:devices"}],
                "network_blacklist":["10.255.0.0/16"],"poll_interval":"5m","discovery_interval":"1h",
                "partition":"default","sync_service_id":"3f1c2a9e-7b4d-4c1e-9a8f-2d5e6b7c8d90",
                "insecure_skip_verify":true})
        );
        // Sealed for another row: left out rather than sent without secrets.
        row.id = "other".into();
        assert!(render_sources(&[row], &key).is_empty());
    }
}
