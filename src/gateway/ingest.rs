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
/// The message is read in one pass without building a `serde_json::Value`
/// per update: only the fields the gateway looks at are picked out (strings
/// borrowed from the message where they have no escapes), everything else
/// is skipped, and in validate-only mode the metadata object is reduced to
/// whether it holds a usable strong identifier. The outcome is that of
/// [`parse_results_generic`], the reference form of these rules.
pub fn parse_results(
    message: &[u8],
    policy: &UpdatePolicy,
    keep_devices: bool,
) -> Result<ParsedResults, Violation> {
    match parse_fast(message, policy, keep_devices) {
        Ok(parsed) => Ok(parsed),
        // The fast reader rejects what the generic one rejects (skipped
        // values go through the same checks as a `Value` would); the generic
        // reader words the error, so its message stays the reference one.
        Err(_) => parse_results_generic(message, policy, keep_devices),
    }
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
// The one-pass reader behind `parse_results`.
//
// Every value goes through `deserialize_any`, like a `Value` would, so the
// same inputs are rejected (invalid UTF-8, lone surrogates, numbers out of
// range, nesting deeper than serde_json's limit): `IgnoredAny` would skip
// strings without these checks and is therefore not used. Duplicate keys keep
// their last value, like a `Map` does.

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

fn parse_fast(message: &[u8], policy: &UpdatePolicy, keep_devices: bool) -> Result<ParsedResults, serde_json::Error> {
    // One UTF-8 check of the whole message spares serde_json one per string.
    // Invalid UTF-8 is an error wherever it is (a syntax error outside
    // strings, an invalid string inside), so it is reported as one.
    let text = std::str::from_utf8(message).map_err(|_| de::Error::custom("message is not UTF-8"))?;
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
fn stage_raw(out: &mut ParsedResults, update: RawUpdate<'_>, policy: &UpdatePolicy, keep_devices: bool) {
    let Some(meta) = update.sync_meta.as_ref().and_then(RawMeta::run_meta) else {
        out.unattributed_rejected += 1;
        return;
    };
    let (run_id, chunk_index, total_chunks, total_devices) = meta;
    let part = part_for(&mut out.parts, run_id, chunk_index, total_chunks, total_devices);
    let outcome = if keep_devices {
        update.into_device(policy).map(|device| part.devices.push(device))
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
        if !self.has_strong_id && !trimmed(&self.ip).is_some_and(|ip| ip.parse::<IpAddr>().is_ok()) {
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
        Some((run_id, chunk_index, total_chunks, self.total_devices.as_u64().unwrap_or(0)))
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
}

#[cfg(test)]
mod perf {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    #[ignore]
    fn perf_parse() {
        let mut m = String::from("[");
        for i in 0..1000u32 {
            if i > 0 { m.push(','); }
            write!(m, r#"{{"agent_id":"bench-agent","gateway_id":"bench-gateway","partition":"default","device_id":"default:10.{}.{}.{}","ip":"10.{}.{}.{}","mac":"00:1A:2B:{:02X}:{:02X}:{:02X}","hostname":"cisco-sw-{i}","source":"faker","timestamp":"2025-01-01T00:00:00.123456789Z","metadata":{{"armis_category":"Network Equipment","armis_device_id":"{i}","armis_risk_level":"3","armis_tags":"core,lab","armis_type":"Switch","first_seen":"2024-06-01T10:00:00Z","integration_type":"faker","last_seen":"2025-01-01T00:00:00Z","manufacturer":"Cisco Systems","model":"Catalyst 9300","operating_system":"IOS-XE"}},"sync_meta":{{"sync_service_id":"Bench Faker","sync_run_id":"0c2f0d84-5f33-4b0e-9a4e-8e0d3d7c1a22","chunk_index":3,"total_chunks":1000,"total_devices":1000000,"is_final":false}}}}"#,
                i>>16, (i>>8)&255, i&255, i>>16, (i>>8)&255, i&255, i>>16, (i>>8)&255, i&255).unwrap();
        }
        m.push(']');
        let bytes = m.into_bytes();
        eprintln!("message {} bytes", bytes.len());
        let policy = UpdatePolicy::new("default", []);
        for (name, keep) in [("validate", false)] {
            let t = std::time::Instant::now();
            for _ in 0..200 { std::hint::black_box(parse_results(&bytes, &policy, keep).unwrap()); }
            let fast = t.elapsed() / 200;
            if std::env::var_os("FAST_ONLY").is_some() {
                for _ in 0..2000 { std::hint::black_box(parse_results(&bytes, &policy, keep).unwrap()); }
                eprintln!("{name}: fast {fast:?}/msg");
                continue;
            }
            let t = std::time::Instant::now();
            for _ in 0..50 { std::hint::black_box(parse_results_generic(&bytes, &policy, keep).unwrap()); }
            let slow = t.elapsed() / 50;
            let t = std::time::Instant::now();
            for _ in 0..200 { std::hint::black_box(serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&bytes).unwrap()); }
            let ign = t.elapsed() / 200;
            eprintln!("{name}: fast {fast:?}/msg generic {slow:?}/msg ignoredany {ign:?}/msg");
        }
    }
}
