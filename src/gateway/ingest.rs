//! From a `results` message (a JSON array of device updates, wire.md §5) to
//! per-run chunk parts ready for staging (gateway.md §4). Pure: no I/O.
//!
//! A run's numbering lives in each update's `sync_meta`, not in the envelope:
//! a run of more than 5000 chunks arrives over several streams, each numbered
//! 0..k on its own. Updates are grouped by `(sync_run_id, chunk_index)`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use serde::{de, Deserialize, Serialize};
use serde_json::{Map, Number, Value};

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
///
/// No `serde_json::Value` is built per update: only the fields the gateway
/// looks at are picked out (strings borrowed from the message), the rest is
/// checked and skipped, and in validate-only mode the metadata object is
/// reduced to whether it holds a usable strong identifier. Three readers, each
/// with the outcome of [`parse_results_generic`], the reference form of these
/// rules: in validate-only mode a scanner for the common shape of updates
/// (plain strings, integers, objects) answers first; it hands anything else
/// to a serde reader for any JSON; when that one fails the message is
/// invalid and the reference reader words the error.
pub fn parse_results(
    message: &[u8],
    policy: &UpdatePolicy,
    keep_devices: bool,
) -> Result<ParsedResults, Violation> {
    // Invalid UTF-8 is an error wherever it is (a syntax error outside
    // strings, an invalid string inside); one check of the whole message
    // spares the readers below one per string.
    if let Ok(text) = std::str::from_utf8(message) {
        if !keep_devices {
            if let Some(parsed) = scan_validate_only(text, policy) {
                return Ok(parsed);
            }
        }
        if let Ok(parsed) = parse_with_serde(text, policy, keep_devices) {
            return Ok(parsed);
        }
    }
    // Only invalid messages get here (the readers above reject what this one
    // rejects), so this reader's wording of the error is kept. When a reader
    // gives up midway, updates it rejected are logged again (debug level).
    parse_results_generic(message, policy, keep_devices)
}

/// The reference implementation of [`parse_results`]: every element becomes
/// a `serde_json::Value` first. Slow (it allocates every key and value of
/// every update); used to word errors and, in tests, as the oracle.
fn parse_results_generic(
    message: &[u8],
    policy: &UpdatePolicy,
    keep_devices: bool,
) -> Result<ParsedResults, Violation> {
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
        let part = part_for(
            &mut out.parts,
            &meta.run_id,
            meta.chunk_index,
            meta.total_chunks,
            meta.total_devices,
        );
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
fn part_for<'a>(
    parts: &'a mut Vec<ChunkPart>,
    run_id: &str,
    chunk_index: u32,
    total_chunks: u32,
    total_devices: u64,
) -> &'a mut ChunkPart {
    let position = parts
        .iter()
        .position(|p| p.run_id == run_id && p.chunk_index == chunk_index);
    let index = match position {
        Some(index) => index,
        None => {
            parts.push(ChunkPart {
                run_id: run_id.to_owned(),
                chunk_index,
                total_chunks,
                total_devices,
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
        total_devices: meta
            .get("total_devices")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// Checks and normalises one update. `agent_id`, `gateway_id`, `device_id`
/// and `metadata.agent_id` are never used as identity.
fn stage_update(
    mut update: Map<String, Value>,
    policy: &UpdatePolicy,
) -> Result<StagedDevice, &'static str> {
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
    STRONG_ID_KEYS
        .iter()
        .find_map(|key| match metadata.get(*key)? {
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

// ---------------------------------------------------------------------------
// The serde reader: any JSON, in one pass, without a `Value` per update.
//
// Every value goes through `deserialize_any`, like a `Value` would, so the
// same inputs are rejected (lone surrogates, numbers out of range, nesting
// deeper than serde_json's limit; UTF-8 is checked beforehand): `IgnoredAny`
// would skip values without these checks and is therefore not used.
// Duplicate keys keep their last value, like a `Map` does.

/// Implements the `Visitor` methods for every JSON type but objects, all
/// producing `self.non_object()` (arrays are read through and dropped).
macro_rules! non_object_values {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(self.non_object())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            skip_seq(seq)?;
            Ok(self.non_object())
        }
    };
}

/// Reads any JSON, with serde_json (`text` is known to be UTF-8).
fn parse_with_serde(
    text: &str,
    policy: &UpdatePolicy,
    keep_devices: bool,
) -> Result<ParsedResults, serde_json::Error> {
    let mut out = ParsedResults::default();
    let mut de = serde_json::Deserializer::from_str(text);
    de::DeserializeSeed::deserialize(
        Results {
            policy,
            keep_devices,
            out: &mut out,
        },
        &mut de,
    )?;
    de.end()?;
    Ok(out)
}

/// The top-level array: every element is staged as soon as it is read.
struct Results<'a> {
    policy: &'a UpdatePolicy,
    keep_devices: bool,
    out: &'a mut ParsedResults,
}

impl<'de> de::DeserializeSeed<'de> for Results<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> de::Visitor<'de> for Results<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // As `Vec<Value>` words it.
        f.write_str("a sequence")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut element = ElementSeed {
            policy: self.policy,
            keep_devices: self.keep_devices,
            out: self.out,
        };
        while seq.next_element_seed(element.reborrow())?.is_some() {}
        Ok(())
    }
}

/// Counts and (when kept) stores one update object, with the rules of
/// `run_meta` and `stage_update`.
fn stage_raw(
    out: &mut ParsedResults,
    update: RawUpdate<'_>,
    policy: &UpdatePolicy,
    keep_devices: bool,
) {
    let Some(meta) = update.sync_meta.as_ref().and_then(RawMeta::run_meta) else {
        out.unattributed_rejected += 1;
        return;
    };
    let (run_id, chunk_index, total_chunks, total_devices) = meta;
    let part = part_for(
        &mut out.parts,
        run_id,
        chunk_index,
        total_chunks,
        total_devices,
    );
    let outcome = if keep_devices {
        update
            .into_device(policy)
            .map(|device| part.devices.push(device))
    } else {
        update.check(policy)
    };
    match outcome {
        Ok(()) => part.accepted += 1,
        Err(reason) => {
            tracing::debug!(run_id = %part.run_id, reason, "update rejected");
            part.rejected += 1;
        }
    }
}

/// The fields of one update object the gateway reads. Text fields hold the
/// last value of their key when it is a string (other types read as absent,
/// as `text` does).
#[derive(Default)]
struct RawUpdate<'de> {
    partition: Option<Cow<'de, str>>,
    ip: Option<Cow<'de, str>>,
    source: Option<Cow<'de, str>>,
    mac: Option<Cow<'de, str>>,
    hostname: Option<Cow<'de, str>>,
    /// `Some` when the last `sync_meta` value is an object.
    sync_meta: Option<RawMeta<'de>>,
    /// Kept mode: the last `metadata` value when it is an object.
    metadata: Option<Map<String, Value>>,
    /// Validate-only mode: whether the last `metadata` value holds a usable
    /// strong identifier (`strong_id` would return `Some`).
    has_strong_id: bool,
}

impl RawUpdate<'_> {
    /// `stage_update` without building the device (validate-only mode).
    fn check(&self, policy: &UpdatePolicy) -> Result<(), &'static str> {
        let partition = trimmed(&self.partition).unwrap_or(&policy.partition);
        if !policy.allowed_partitions.contains(partition) {
            return Err("partition not allowed for this agent");
        }
        // The IP only matters without a strong identifier.
        let has_ip = || trimmed(&self.ip).is_some_and(|ip| ip.parse::<IpAddr>().is_ok());
        if !self.has_strong_id && !has_ip() {
            return Err("no IP and no strong identifier");
        }
        Ok(())
    }

    /// `stage_update`, building the device (kept mode).
    fn into_device(self, policy: &UpdatePolicy) -> Result<StagedDevice, &'static str> {
        let partition = trimmed(&self.partition).unwrap_or(&policy.partition);
        if !policy.allowed_partitions.contains(partition) {
            return Err("partition not allowed for this agent");
        }
        let partition = partition.to_owned();
        let metadata = self.metadata.unwrap_or_default();
        let ip = trimmed(&self.ip)
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_string());
        let device_key = match strong_id(&metadata) {
            Some(id) => id,
            None => ip.clone().ok_or("no IP and no strong identifier")?,
        };
        Ok(StagedDevice {
            partition,
            source: trimmed(&self.source).unwrap_or("unknown").to_owned(),
            device_key,
            ip,
            mac: trimmed(&self.mac).map(str::to_owned),
            hostname: trimmed(&self.hostname).map(str::to_owned),
            metadata,
        })
    }
}

/// `text` for a picked field: trimmed, `None` when empty.
fn trimmed<'s>(value: &'s Option<Cow<'_, str>>) -> Option<&'s str> {
    value.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The fields of `sync_meta` that `run_meta` reads.
#[derive(Default)]
struct RawMeta<'de> {
    sync_run_id: Scalar<'de>,
    chunk_index: Scalar<'de>,
    total_chunks: Scalar<'de>,
    total_devices: Scalar<'de>,
}

impl RawMeta<'_> {
    /// `run_meta`: (run id, chunk index, total chunks, total devices).
    fn run_meta(&self) -> Option<(&str, u32, u32, u64)> {
        let run_id = self.sync_run_id.as_str()?.trim();
        let chunk_index = u32::try_from(self.chunk_index.as_u64()?).ok()?;
        let total_chunks = u32::try_from(self.total_chunks.as_u64()?).ok()?;
        if run_id.is_empty() || total_chunks == 0 || chunk_index >= total_chunks {
            return None;
        }
        Some((
            run_id,
            chunk_index,
            total_chunks,
            self.total_devices.as_u64().unwrap_or(0),
        ))
    }
}

/// A JSON value reduced to what the checks look at: a string (borrowed when
/// it has no escapes), a number (as `Value` would hold it), or anything else.
#[derive(Default)]
enum Scalar<'de> {
    Str(Cow<'de, str>),
    Num(Number),
    #[default]
    Other,
}

impl Scalar<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::Num(n) => n.as_u64(),
            _ => None,
        }
    }
}

impl<'de> Scalar<'de> {
    /// The string, if it is one (what `Value::as_str` sees).
    fn into_text(self) -> Option<Cow<'de, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What `strong_id` accepts: a string with more than whitespace, or a number.
    fn is_strong_id(&self) -> bool {
        match self {
            Scalar::Str(s) => !s.trim().is_empty(),
            Scalar::Num(_) => true,
            Scalar::Other => false,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> de::Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s)))
    }
    // Numbers as `Value`'s visitor stores them.
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Num(n.into()))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Num(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Scalar<'de>, E> {
        Ok(Number::from_f64(n).map_or(Scalar::Other, Scalar::Num))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_none<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        skip_seq(seq)?;
        Ok(Scalar::Other)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        skip_map(map)?;
        Ok(Scalar::Other)
    }
}

/// An object key, borrowed from the message unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> de::Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(s)))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(s)))
    }
}

/// One element of the array, counted (and staged) as soon as it is read:
/// objects are updates, anything else an unattributed rejection.
struct ElementSeed<'a> {
    policy: &'a UpdatePolicy,
    keep_devices: bool,
    out: &'a mut ParsedResults,
}

impl ElementSeed<'_> {
    fn reborrow(&mut self) -> ElementSeed<'_> {
        ElementSeed {
            policy: self.policy,
            keep_devices: self.keep_devices,
            out: self.out,
        }
    }

    fn non_object(self) {
        self.out.unattributed_rejected += 1;
    }
}

impl<'de> de::DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> de::Visitor<'de> for ElementSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    non_object_values!();

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut update = RawUpdate::default();
        while let Some(Key(key)) = map.next_key()? {
            match &*key {
                "partition" => update.partition = map.next_value::<Scalar>()?.into_text(),
                "ip" => update.ip = map.next_value::<Scalar>()?.into_text(),
                "source" => update.source = map.next_value::<Scalar>()?.into_text(),
                "mac" => update.mac = map.next_value::<Scalar>()?.into_text(),
                "hostname" => update.hostname = map.next_value::<Scalar>()?.into_text(),
                "sync_meta" => update.sync_meta = map.next_value::<SyncMetaField>()?.0,
                "metadata" if self.keep_devices => {
                    update.metadata = match map.next_value::<Value>()? {
                        Value::Object(m) => Some(m),
                        _ => None,
                    }
                }
                "metadata" => update.has_strong_id = map.next_value::<StrongIdProbe>()?.0,
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        stage_raw(self.out, update, self.policy, self.keep_devices);
        Ok(())
    }
}

/// A `sync_meta` value: its fields when it is an object.
struct SyncMetaField<'de>(Option<RawMeta<'de>>);

impl<'de> Deserialize<'de> for SyncMetaField<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SyncMetaVisitor)
    }
}

struct SyncMetaVisitor;

impl SyncMetaVisitor {
    fn non_object(self) -> SyncMetaField<'static> {
        SyncMetaField(None)
    }
}

impl<'de> de::Visitor<'de> for SyncMetaVisitor {
    type Value = SyncMetaField<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    non_object_values!();

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut meta = RawMeta::default();
        while let Some(Key(key)) = map.next_key()? {
            let field = match &*key {
                "sync_run_id" => &mut meta.sync_run_id,
                "chunk_index" => &mut meta.chunk_index,
                "total_chunks" => &mut meta.total_chunks,
                "total_devices" => &mut meta.total_devices,
                _ => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            *field = map.next_value()?;
        }
        Ok(SyncMetaField(Some(meta)))
    }
}

/// A `metadata` value in validate-only mode: whether `strong_id` would find
/// an identifier in it. Only the `STRONG_ID_KEYS` values are looked at.
struct StrongIdProbe(bool);

impl<'de> Deserialize<'de> for StrongIdProbe {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrongIdVisitor)
    }
}

struct StrongIdVisitor;

impl StrongIdVisitor {
    fn non_object(self) -> StrongIdProbe {
        StrongIdProbe(false)
    }
}

impl<'de> de::Visitor<'de> for StrongIdVisitor {
    type Value = StrongIdProbe;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    non_object_values!();

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // Per key, since a later duplicate replaces an earlier value.
        let mut usable = [false; STRONG_ID_KEYS.len()];
        while let Some(Key(key)) = map.next_key()? {
            match STRONG_ID_KEYS.iter().position(|k| *k == key) {
                Some(i) => usable[i] = map.next_value::<Scalar>()?.is_strong_id(),
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(StrongIdProbe(usable.contains(&true)))
    }
}

fn skip_seq<'de, A: de::SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Skip>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: de::MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_key::<Skip>()?.is_some() {
        map.next_value::<Skip>()?;
    }
    Ok(())
}

/// Any JSON value, checked as a `Value` would be and dropped.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl SkipVisitor {
    fn non_object(self) -> Skip {
        Skip
    }
}

impl<'de> de::Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    non_object_values!();

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Skip, D::Error> {
        Skip::deserialize(deserializer)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
        skip_map(map)?;
        Ok(Skip)
    }
}

// ---------------------------------------------------------------------------
// The validate-only scanner: the common shape of a `results` message (an
// array of objects whose values are strings without escapes, integers,
// `true`/`false`/`null` and objects) read byte by byte, without serde. It
// gives up (`None`) on anything else: other elements, escapes, fractions,
// exponents, integers serde_json would read as floats, arrays, deep nesting
// and every syntax error, all of which the serde reader then handles. What it
// accepts is valid JSON, read as serde_json reads it.

/// Deepest object nesting the scanner follows (the array is level 0, updates
/// level 1); far below serde_json's recursion limit.
const SCAN_MAX_DEPTH: usize = 8;

fn scan_validate_only(text: &str, policy: &UpdatePolicy) -> Option<ParsedResults> {
    let mut scanner = Scanner { text, pos: 0 };
    let mut out = ParsedResults::default();
    scanner.ws();
    scanner.eat(b'[')?;
    scanner.ws();
    if scanner.peek() == Some(b']') {
        scanner.pos += 1;
    } else {
        loop {
            let update = scanner.update()?;
            stage_raw(&mut out, update, policy, false);
            scanner.ws();
            match scanner.next()? {
                b',' => scanner.ws(),
                b']' => break,
                _ => return None,
            }
        }
    }
    scanner.ws();
    (scanner.pos == text.len()).then_some(out)
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.pos;
        let end = string_end(self.text.as_bytes(), start);
        if self.text.as_bytes().get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        // Both ends are next to an ASCII quote, so on character boundaries.
        self.text.get(start..end)
    }

    /// An integer serde_json reads as an integer (not `-0`, not out of the
    /// `u64`/`i64` range, no fraction or exponent), as `Value` stores it.
    fn integer(&mut self) -> Option<Number> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        let digits = self.text.get(start..self.pos)?;
        if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let magnitude: u64 = digits.parse().ok()?;
        if !negative {
            return Some(magnitude.into());
        }
        if magnitude == 0 {
            return None;
        }
        0i64.checked_sub_unsigned(magnitude).map(Number::from)
    }

    /// `true`, `false` or `null`.
    fn literal(&mut self) -> Option<()> {
        let rest = self.text.as_bytes().get(self.pos..)?;
        let len = [&b"true"[..], b"false", b"null"]
            .into_iter()
            .find(|word| rest.starts_with(word))?
            .len();
        self.pos += len;
        Some(())
    }

    /// The members of an object, each value read by `member` (which must
    /// consume it); `depth` is the object's own.
    fn object(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        if depth > SCAN_MAX_DEPTH {
            return None;
        }
        self.eat(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.next()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Any value the scanner accepts, dropped.
    fn skip(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(depth, |s, _| s.skip(depth + 1)),
            b'-' | b'0'..=b'9' => self.integer().map(drop),
            _ => self.literal(),
        }
    }

    /// A value as `Scalar` classifies it.
    fn scalar(&mut self, depth: usize) -> Option<Scalar<'a>> {
        match self.peek()? {
            b'"' => self.string().map(|s| Scalar::Str(Cow::Borrowed(s))),
            b'-' | b'0'..=b'9' => self.integer().map(Scalar::Num),
            _ => self.skip(depth).map(|()| Scalar::Other),
        }
    }

    /// One element of the array; `None` also for elements that are not
    /// objects (the serde reader counts those).
    fn update(&mut self) -> Option<RawUpdate<'a>> {
        let mut update = RawUpdate::default();
        self.object(1, |s, key| {
            match key {
                "partition" => update.partition = s.scalar(2)?.into_text(),
                "ip" => update.ip = s.scalar(2)?.into_text(),
                "source" => update.source = s.scalar(2)?.into_text(),
                "mac" => update.mac = s.scalar(2)?.into_text(),
                "hostname" => update.hostname = s.scalar(2)?.into_text(),
                "sync_meta" => update.sync_meta = s.sync_meta()?,
                "metadata" => update.has_strong_id = s.strong_id_probe()?,
                _ => s.skip(2)?,
            }
            Some(())
        })?;
        Some(update)
    }

    /// `SyncMetaField`.
    fn sync_meta(&mut self) -> Option<Option<RawMeta<'a>>> {
        if self.peek()? != b'{' {
            return self.skip(2).map(|()| None);
        }
        let mut meta = RawMeta::default();
        self.object(2, |s, key| {
            let field = match key {
                "sync_run_id" => &mut meta.sync_run_id,
                "chunk_index" => &mut meta.chunk_index,
                "total_chunks" => &mut meta.total_chunks,
                "total_devices" => &mut meta.total_devices,
                _ => return s.skip(3),
            };
            *field = s.scalar(3)?;
            Some(())
        })?;
        Some(Some(meta))
    }

    /// `StrongIdProbe`.
    fn strong_id_probe(&mut self) -> Option<bool> {
        if self.peek()? != b'{' {
            return self.skip(2).map(|()| false);
        }
        let mut usable = [false; STRONG_ID_KEYS.len()];
        self.object(2, |s, key| {
            match STRONG_ID_KEYS.iter().position(|k| *k == key) {
                Some(i) => usable[i] = s.scalar(3)?.is_strong_id(),
                None => s.skip(3)?,
            }
            Some(())
        })?;
        Some(usable.contains(&true))
    }
}

/// The index of the first `"`, `\` or control character at or after
/// `start` (`bytes.len()` when there is none), eight bytes at a time.
fn string_end(bytes: &[u8], start: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    const SPACES: u64 = u64::from_ne_bytes([0x20; 8]);
    let mut pos = start;
    while let Some(chunk) = bytes.get(pos..pos + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // Little-endian, so that the lowest flagged byte comes first: only
        // bytes after a match can be flagged wrongly (borrows).
        let word = u64::from_le_bytes(chunk);
        let quote = word ^ QUOTES;
        let backslash = word ^ BACKSLASHES;
        let found = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (word.wrapping_sub(SPACES) & !word);
        let found = found & HIGH;
        if found != 0 {
            return pos + (found.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while let Some(&byte) = bytes.get(pos) {
        if byte == b'"' || byte == b'\\' || byte < 0x20 {
            return pos;
        }
        pos += 1;
    }
    pos
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
            update(
                "10.0.0.1",
                "site-a",
                0,
                json!({"integration_id":"i-1","agent_id":"evil"})
            ),
            update("10.0.0.2", "site-a", 0, json!({})),
            update(
                "10.0.0.3",
                "lab",
                1,
                json!({"armis_device_id":"7","integration_id":"i-3"})
            ),
        ]);
        let parsed = parse_results(message.to_string().as_bytes(), &policy(), true).unwrap();
        assert_eq!(parsed.parts.len(), 2);
        let first = &parsed.parts[0];
        assert_eq!(
            (first.run_id.as_str(), first.chunk_index, first.total_chunks),
            ("r1", 0, 2)
        );
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
        assert!(
            parsed.parts[0].devices.is_empty(),
            "validate-only keeps no devices"
        );
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
        let parsed = parse_results(
            json!([bad_index, no_run]).to_string().as_bytes(),
            &policy(),
            true,
        )
        .unwrap();
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

    /// Every reader agrees with the reference one: same outcome when it
    /// answers; the serde reader answers whenever the message is valid; the
    /// scanner never answers for an invalid message. Returns whether the
    /// scanner answered.
    fn assert_same(message: &[u8], policy: &UpdatePolicy) -> bool {
        let shown = String::from_utf8_lossy(message);
        let mut scanned = false;
        for keep in [false, true] {
            let generic = parse_results_generic(message, policy, keep);
            let text = std::str::from_utf8(message).ok();
            let serde = text.map(|text| parse_with_serde(text, policy, keep));
            match (&generic, serde) {
                (Ok(expected), Some(Ok(got))) => assert_eq!(&got, expected, "keep={keep}: {shown}"),
                (Err(_), Some(Err(_)) | None) => {}
                (Ok(_), _) => panic!("keep={keep}: the serde reader refuses valid {shown}"),
                (Err(_), Some(Ok(_))) => {
                    panic!("keep={keep}: the serde reader accepts invalid {shown}")
                }
            }
            if let (Some(text), false) = (text, keep) {
                if let Some(got) = scan_validate_only(text, policy) {
                    scanned = true;
                    assert_eq!(Ok(&got), generic.as_ref(), "scanner: {shown}");
                }
            }
            assert_eq!(parse_results(message, policy, keep), generic);
        }
        scanned
    }

    const META: &str = r#"{"sync_run_id":"r1","chunk_index":0,"total_chunks":1,"total_devices":3}"#;

    #[test]
    fn non_object_elements_among_objects_are_counted() {
        let message = format!(
            r#"[[{{"ip":"10.0.0.1","sync_meta":{META}}}], {{"ip":"10.0.0.1","sync_meta":{META}}}, "x", 7, -1.5e3, true, null, {{}}, [[]]]"#
        );
        let parsed = parse_results(message.as_bytes(), &policy(), false).unwrap();
        assert_eq!(parsed.unattributed_rejected, 8);
        assert_eq!(parsed.accepted(), 1);
        assert_same(message.as_bytes(), &policy());
    }

    #[test]
    fn metadata_numbers_are_strong_identifiers() {
        let message = format!(
            r#"[{{"metadata":{{"armis_device_id":42,"x":1}},"sync_meta":{META}}},
                {{"metadata":{{"armis_device_id":"  ","netbox_device_id":1.5}},"sync_meta":{META}}},
                {{"metadata":{{"integration_id":-3,"ip_count":2}},"ip":"bad","sync_meta":{META}}},
                {{"metadata":{{"armis_device_id":null,"integration_id":[1]}},"sync_meta":{META}}}]"#
        );
        let parsed = parse_results(message.as_bytes(), &policy(), true).unwrap();
        let keys: Vec<&str> = parsed.parts[0]
            .devices
            .iter()
            .map(|d| d.device_key.as_str())
            .collect();
        assert_eq!(keys, ["42", "1.5", "-3"]);
        assert_eq!(parsed.parts[0].devices[0].metadata["x"], json!(1));
        assert_eq!((parsed.accepted(), parsed.rejected()), (3, 1));
        let validated = parse_results(message.as_bytes(), &policy(), false).unwrap();
        assert_eq!((validated.accepted(), validated.rejected()), (3, 1));
        assert_same(message.as_bytes(), &policy());
    }

    #[test]
    fn duplicate_keys_keep_the_last_value() {
        let message = format!(
            r#"[{{"ip":"10.0.0.1","ip":7,"metadata":{{"integration_id":"i"}},"metadata":[],"sync_meta":{META}}},
                {{"ip":5,"ip":" 10.0.0.2 ","partition":"nope","partition":"lab","sync_meta":{META}}},
                {{"ip":"10.0.0.3","sync_meta":{META},"sync_meta":1}},
                {{"metadata":{{"netbox_device_id":"nb","netbox_device_id":""}},"sync_meta":{META}}},
                {{"ip":"10.0.0.4","sync_meta":{{"sync_run_id":"r2","sync_run_id":" r1 ","chunk_index":9,"chunk_index":0,"total_chunks":1}}}}]"#
        );
        let parsed = parse_results(message.as_bytes(), &policy(), true).unwrap();
        assert_eq!(parsed.unattributed_rejected, 1);
        assert_eq!(parsed.parts.len(), 1);
        let devices = &parsed.parts[0].devices;
        assert_eq!(devices.len(), 2);
        assert_eq!(
            (devices[0].ip.as_deref(), devices[0].partition.as_str()),
            (Some("10.0.0.2"), "lab")
        );
        assert_eq!(devices[1].device_key, "10.0.0.4");
        assert_eq!(parsed.parts[0].rejected, 2);
        assert_same(message.as_bytes(), &policy());
    }

    #[test]
    fn escaped_keys_and_values_are_read_like_any_other() {
        let message = format!(
            r#"[{{"\u0069p":"10.0.0.\u0031","host\u006eame":" h\u00e9 ","metadata":{{"armis_device_id":"\ud83d\ude00"}},"sync_meta":{META}}}]"#
        );
        let parsed = parse_results(message.as_bytes(), &policy(), true).unwrap();
        let device = &parsed.parts[0].devices[0];
        assert_eq!(device.ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(device.hostname.as_deref(), Some("h\u{e9}"));
        assert_eq!(device.device_key, "\u{1f600}");
        assert_same(message.as_bytes(), &policy());
    }

    #[test]
    fn ipv6_is_normalised_and_whitespace_trimmed() {
        let message = format!(
            r#"[{{"ip":" 2001:DB8:0:0::1 ","mac":"  ","source":" armis ","sync_meta":{META}}}]"#
        );
        let parsed = parse_results(message.as_bytes(), &policy(), true).unwrap();
        let device = &parsed.parts[0].devices[0];
        assert_eq!(device.ip.as_deref(), Some("2001:db8::1"));
        assert_eq!(
            (device.mac.as_deref(), device.source.as_str()),
            (None, "armis")
        );
        assert_same(message.as_bytes(), &policy());
    }

    /// Inputs a `Value` refuses must be refused even where a reader
    /// ignores the value, with the same error.
    #[test]
    fn invalid_json_in_ignored_values_is_still_invalid() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let bad: Vec<Vec<u8>> = vec![
            format!(r#"[{{"agent_id":"\ud800","sync_meta":{META}}}]"#).into_bytes(),
            format!(r#"[{{"agent_id":"\udc00x","ip":"10.0.0.1","sync_meta":{META}}}]"#)
                .into_bytes(),
            [&b"[{\"agent_id\":\""[..], &[0xff, 0xfe], &b"\"}]"[..]].concat(),
            format!(r#"[{{"n":1e400,"sync_meta":{META}}}]"#).into_bytes(),
            format!(r#"[{{"n":{deep},"sync_meta":{META}}}]"#).into_bytes(),
            format!(r#"[{deep}]"#).into_bytes(),
            b"[1,]".to_vec(),
            b"[1] x".to_vec(),
            b"[{\"a\":1,}]".to_vec(),
            b"[{\"a\" 1}]".to_vec(),
            b"[\"tab\there\"]".to_vec(),
            b"[\"\\x\"]".to_vec(),
            b"[{\"a\":01}]".to_vec(),
            b"[".to_vec(),
            b"[{\"a\":1}] x".to_vec(),
            b"[{\"a\":1}]]".to_vec(),
            b"[{\"a\":1}".to_vec(),
            b"[{\"a\":1},]".to_vec(),
            b"[{\"a\":1}{\"b\":2}]".to_vec(),
            b"[{\"a\":1 \"b\":2}]".to_vec(),
            b"[{\"a\" \"b\"}]".to_vec(),
            b"[{,}]".to_vec(),
            b"[{\"a\":}]".to_vec(),
            b"[{\"a\":-}]".to_vec(),
            b"[{\"a\":-01}]".to_vec(),
            b"[{\"a\":+1}]".to_vec(),
            b"[{\"a\":.5}]".to_vec(),
            b"[{\"a\":1.}]".to_vec(),
            b"[{\"a\":1e}]".to_vec(),
            b"[{\"a\":tru}]".to_vec(),
            b"[{\"a\":nul}]".to_vec(),
            b"[{\"a\":truex}]".to_vec(),
            b"[{\"a\":\"x}]".to_vec(),
            b"[{\"a\":\"\x01\"}]".to_vec(),
            b"[{\"a\x1f\":1}]".to_vec(),
            b"[{\"a\":1}]\x00".to_vec(),
            b"[{\"a\":{\"b\":{}}]".to_vec(),
            b"[\x0c{}]".to_vec(),
            b"[{\"a\":nan}]".to_vec(),
            b"[{\"a\":\"\\x\"}]".to_vec(),
            b"[{\"a\":\"\x01 and more than eight bytes\"}]".to_vec(),
            b"[{\"a\":\"eight by\x1f and more than eight bytes\"}]".to_vec(),
            format!("[{}1{}]", r#"{"a":"#.repeat(200), "}".repeat(200)).into_bytes(),
        ];
        for message in &bad {
            let expected = parse_results_generic(message, &policy(), false).unwrap_err();
            assert!(expected
                .reason
                .starts_with("results message is not a JSON array: "));
            assert!(!assert_same(message, &policy()));
        }
    }

    /// Valid messages near the scanner's limits: it answers as the reference
    /// does or leaves them to the serde reader.
    #[test]
    fn scanner_edge_cases() {
        let numbers = [
            "0",
            "-0",
            "1",
            "-1",
            "1.0",
            "1E3",
            "1e3",
            "1e-3",
            "0.5",
            "-0.0",
            "4294967295",
            "4294967296",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "true",
            "false",
            "null",
            "{}",
            "[]",
            "\"\"",
            "\"0\"",
        ];
        let mut scanned = 0;
        for n in numbers {
            for message in [
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":{n},"total_chunks":2}}}}]"#
                ),
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":0,"total_chunks":{n}}}}}]"#
                ),
                format!(
                    r#"[{{"ip":"10.0.0.1","sync_meta":{{"sync_run_id":"r","chunk_index":0,"total_chunks":1,"total_devices":{n}}}}}]"#
                ),
                format!(r#"[{{"metadata":{{"armis_device_id":{n}}},"sync_meta":{META}}}]"#),
                format!(r#"[{{"metadata":{n},"sync_meta":{META},"x":{n}}}]"#),
                format!(r#"[{{"sync_meta":{n}}}]"#),
            ] {
                scanned += usize::from(assert_same(message.as_bytes(), &policy()));
            }
        }
        for message in [
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"r\"","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"\u0072","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"i\u0070":"10.0.0.1","sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}]"#,
            r#"[{"ip":"10.0.0.1","sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}, 1]"#,
            r#"[{"ip":"10.0.0.1","x":{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":{}}}}}}}}}},"sync_meta":{"sync_run_id":"r","chunk_index":0,"total_chunks":1}}]"#,
            "[]",
            " [ ] ",
            "[{}]",
            "[ {} , { } ]",
        ] {
            scanned += usize::from(assert_same(message.as_bytes(), &policy()));
        }
        assert!(scanned > 60, "the scanner answered {scanned} times");
    }

    mod oracle {
        use super::*;
        use proptest::prelude::*;

        /// Generators take `plain`: when set, only what the scanner reads
        /// (no escapes, fractions, exponents, big or `-0` integers, arrays).
        fn pick(
            plain: bool,
            all: &'static [&'static str],
            extra: &'static [&'static str],
        ) -> BoxedStrategy<String> {
            let choices: Vec<&'static str> = if plain {
                all.to_vec()
            } else {
                [all, extra].concat()
            };
            prop::sample::select(choices)
                .prop_map(str::to_owned)
                .boxed()
        }

        /// Strings that matter to the checks.
        fn json_string(plain: bool) -> BoxedStrategy<String> {
            pick(
                plain,
                &[
                    r#""""#,
                    r#""  ""#,
                    r#""10.0.0.1""#,
                    r#"" 10.0.0.2 ""#,
                    r#""::FFFF:10.0.0.1""#,
                    r#""fe80::1%eth0""#,
                    r#""not-an-ip""#,
                    r#""site-a""#,
                    r#""lab""#,
                    r#"" lab ""#,
                    r#""elsewhere""#,
                    r#""r1""#,
                    r#""faker""#,
                    r#""é😀""#,
                    "\"\u{7f}\"",
                ],
                &[
                    r#""10.0.0.\u0033""#,
                    r#"" r2\t""#,
                    r#""id-\"7\"""#,
                    r#""\u00e9\ud83d\ude00""#,
                ],
            )
        }

        fn key(plain: bool) -> BoxedStrategy<String> {
            pick(
                plain,
                &[
                    r#""ip""#,
                    r#""partition""#,
                    r#""source""#,
                    r#""mac""#,
                    r#""hostname""#,
                    r#""metadata""#,
                    r#""sync_meta""#,
                    r#""armis_device_id""#,
                    r#""netbox_device_id""#,
                    r#""integration_id""#,
                    r#""sync_run_id""#,
                    r#""chunk_index""#,
                    r#""total_chunks""#,
                    r#""total_devices""#,
                    r#""agent_id""#,
                    r#""x""#,
                    r#""""#,
                ],
                &[r#""i\u0070""#, r#""integration\u005fid""#],
            )
        }

        fn number(plain: bool) -> BoxedStrategy<String> {
            let special = pick(
                plain,
                &[
                    "0",
                    "-1",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "18446744073709551615",
                ],
                &[
                    "-0",
                    "0.0",
                    "1.0",
                    "1e3",
                    "-2.5E-3",
                    "18446744073709551616",
                    "-9223372036854775809",
                    "2.50",
                ],
            );
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                special,
            ]
            .boxed()
        }

        /// A JSON text for any value.
        fn any_json(plain: bool) -> BoxedStrategy<String> {
            let leaf = prop_oneof![
                pick(plain, &["null", "true", "false"], &[]),
                number(plain),
                json_string(plain),
            ];
            leaf.prop_recursive(3, 24, 4, move |inner| {
                let object = prop::collection::vec((key(plain), inner.clone()), 0..4)
                    .prop_map(|kv| object(&kv));
                if plain {
                    object.boxed()
                } else {
                    prop_oneof![
                        prop::collection::vec(inner, 0..4)
                            .prop_map(|v| format!("[{}]", v.join(","))),
                        object,
                    ]
                    .boxed()
                }
            })
            .boxed()
        }

        fn object(kv: &[(String, String)]) -> String {
            let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k} : {v}")).collect();
            format!("{{ {} }}", fields.join(",\n\t"))
        }

        fn small_number(plain: bool) -> BoxedStrategy<String> {
            prop_oneof![
                6 => (0u64..3).prop_map(|n| n.to_string()),
                4 => pick(plain, &["-1", "4294967297", r#""1""#, "null"], &["1.0", "-0", "0e0"]),
            ]
            .boxed()
        }

        fn sync_meta(plain: bool) -> BoxedStrategy<String> {
            let field = prop_oneof![
                json_string(plain).prop_map(|v| (r#""sync_run_id""#.to_owned(), v)),
                small_number(plain).prop_map(|v| (r#""chunk_index""#.to_owned(), v)),
                small_number(plain).prop_map(|v| (r#""total_chunks""#.to_owned(), v)),
                small_number(plain).prop_map(|v| (r#""total_devices""#.to_owned(), v)),
                any_json(plain).prop_map(|v| (r#""is_final""#.to_owned(), v)),
            ];
            prop::collection::vec(field, 0..7)
                .prop_map(|kv| object(&kv))
                .boxed()
        }

        /// Mostly strong identifier keys, with strings, numbers or other values.
        fn metadata(plain: bool) -> BoxedStrategy<String> {
            let key = prop_oneof![
                3 => pick(plain, &[r#""armis_device_id""#, r#""netbox_device_id""#, r#""integration_id""#], &[]),
                1 => key(plain),
            ];
            let value = prop_oneof![
                2 => json_string(plain),
                2 => number(plain),
                1 => any_json(plain),
            ];
            prop::collection::vec((key, value), 0..5)
                .prop_map(|kv| object(&kv))
                .boxed()
        }

        /// An update-like object: fields that matter (possibly repeated or
        /// of the wrong type) among fields that do not. Most have a usable
        /// `sync_meta`, so that the update rules are exercised.
        fn update(plain: bool) -> BoxedStrategy<String> {
            let field = prop_oneof![
                4 => (key(plain), json_string(plain)),
                1 => sync_meta(plain).prop_map(|v| (r#""sync_meta""#.to_owned(), v)),
                3 => metadata(plain).prop_map(|v| (r#""metadata""#.to_owned(), v)),
                1 => (key(plain), any_json(plain)),
            ];
            let run = prop_oneof![4 => Just(r#""r1""#.to_owned()), 1 => json_string(plain)];
            let base = (run, 0u32..2, small_number(plain)).prop_map(|(run, chunk, total)| {
                vec![(
                    r#""sync_meta""#.to_owned(),
                    format!(
                        r#"{{"sync_run_id":{run},"chunk_index":{chunk},"total_chunks":{total}}}"#
                    ),
                )]
            });
            (base, prop::collection::vec(field, 0..8), any::<bool>())
                .prop_map(|(mut base, extra, front)| {
                    if front {
                        base.extend(extra);
                    } else {
                        base.splice(0..0, extra);
                    }
                    object(&base)
                })
                .boxed()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn readers_match_the_reference(elements in prop::collection::vec(prop_oneof![4 => update(false), 1 => any_json(false)], 0..8)) {
                assert_same(format!(" [ {} ] ", elements.join(" , ")).as_bytes(), &policy());
            }

            #[test]
            fn the_scanner_reads_plain_messages(elements in prop::collection::vec(update(true), 0..8)) {
                let message = format!("\n[{}]\r\n", elements.join(",\n"));
                prop_assert!(assert_same(message.as_bytes(), &policy()), "scanner gave up on {}", message);
            }

            #[test]
            fn broken_messages_fail_alike(elements in prop::collection::vec(update(false), 1..4), cut in any::<prop::sample::Index>()) {
                let message = format!("[{}]", elements.join(","));
                assert_same(&message.as_bytes()[..cut.index(message.len())], &policy());
            }

            #[test]
            fn broken_plain_messages_fail_alike(elements in prop::collection::vec(update(true), 1..4), cut in any::<prop::sample::Index>(), byte in any::<prop::sample::Index>(), with in prop::sample::select(&b"\"\\{}[],:0-. x\x01"[..])) {
                let mut message = format!("[{}]", elements.join(",")).into_bytes();
                let at = byte.index(message.len());
                message[at] = with;
                assert_same(&message[..cut.index(message.len() + 1).max(at + 1)], &policy());
            }
        }
    }
}
