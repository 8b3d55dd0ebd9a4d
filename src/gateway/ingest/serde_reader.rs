//! The serde reader: any JSON, in one pass, without a `Value` per update.
//!
//! Every value goes through `deserialize_any`, like a `Value` would, so the
//! same inputs are rejected (lone surrogates, numbers out of range, nesting
//! deeper than serde_json's limit; UTF-8 is checked beforehand): `IgnoredAny`
//! would skip values without these checks and is therefore not used.
//! Duplicate keys keep their last value, like a `Map` does.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::{de, Deserialize};
use serde_json::{Map, Number, Value};

use super::{
    part_for, strong_id, untrusted_keys_dropped, ParsedResults, RunMeta, StagedDevice,
    UpdatePolicy, STRONG_ID_KEYS,
};

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
pub(super) fn parse_with_serde(
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
pub(super) fn stage_raw(
    out: &mut ParsedResults,
    update: RawUpdate<'_>,
    policy: &UpdatePolicy,
    keep_devices: bool,
) {
    let Some(meta) = update.sync_meta.as_ref().and_then(RawMeta::run_meta) else {
        out.unattributed_rejected += 1;
        return;
    };
    let part = part_for(&mut out.parts, &meta);
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
pub(super) struct RawUpdate<'de> {
    pub(super) partition: Option<Cow<'de, str>>,
    pub(super) ip: Option<Cow<'de, str>>,
    pub(super) source: Option<Cow<'de, str>>,
    pub(super) mac: Option<Cow<'de, str>>,
    pub(super) hostname: Option<Cow<'de, str>>,
    /// `Some` when the last `sync_meta` value is an object.
    pub(super) sync_meta: Option<RawMeta<'de>>,
    /// Kept mode: the last `metadata` value when it is an object.
    metadata: Option<Map<String, Value>>,
    /// Validate-only mode: whether the last `metadata` value holds a usable
    /// strong identifier (`strong_id` would return `Some`).
    pub(super) has_strong_id: bool,
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
        let metadata = untrusted_keys_dropped(self.metadata.unwrap_or_default());
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
pub(super) struct RawMeta<'de> {
    pub(super) sync_run_id: Scalar<'de>,
    pub(super) chunk_index: Scalar<'de>,
    pub(super) total_chunks: Scalar<'de>,
    pub(super) total_devices: Scalar<'de>,
    pub(super) sync_service_id: Scalar<'de>,
}

impl RawMeta<'_> {
    /// `run_meta` of the reference reader.
    fn run_meta(&self) -> Option<RunMeta<'_>> {
        let run_id = self.sync_run_id.as_str()?.trim();
        let chunk_index = u32::try_from(self.chunk_index.as_u64()?).ok()?;
        let total_chunks = u32::try_from(self.total_chunks.as_u64()?).ok()?;
        if run_id.is_empty() || total_chunks == 0 || chunk_index >= total_chunks {
            return None;
        }
        Some(RunMeta {
            run_id,
            chunk_index,
            total_chunks,
            total_devices: self.total_devices.as_u64().unwrap_or(0),
            sync_service_id: self
                .sync_service_id
                .as_str()
                .map(str::trim)
                .filter(|s| !s.is_empty()),
        })
    }
}

/// A JSON value reduced to what the checks look at: a string (borrowed when
/// it has no escapes), a number (as `Value` would hold it), or anything else.
#[derive(Default)]
pub(super) enum Scalar<'de> {
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
    pub(super) fn into_text(self) -> Option<Cow<'de, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What `strong_id` accepts: a string with more than whitespace, or a number.
    pub(super) fn is_strong_id(&self) -> bool {
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
                "sync_service_id" => &mut meta.sync_service_id,
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
    use crate::gateway::ingest::parse_results;
    use crate::gateway::ingest::tests::{assert_same, policy, META};

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
}
