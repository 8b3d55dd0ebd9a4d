//! From a `results` message (a JSON array of device updates, wire.md §5) to
//! per-run chunk parts ready for staging (gateway.md §4). Pure: no I/O.
//!
//! A run's numbering lives in each update's `sync_meta`, not in the envelope:
//! a run of more than 5000 chunks arrives over several streams, each numbered
//! 0..k on its own. Updates are grouped by `(sync_run_id, chunk_index)`.
//!
//! Three readers turn a message into [`ParsedResults`], all with the same
//! outcome (the tests hold them to it):
//!
//! - the reference reader, in this file (`parse_results_generic`): every
//!   element becomes a `serde_json::Value`, then `run_meta` and
//!   `stage_update` apply the rules. Slow; it words the errors and is the
//!   tests' oracle.
//! - `serde_reader`: any JSON, in one pass, through serde visitors that pick
//!   out only the fields the gateway reads (strings borrowed from the
//!   message) and check and skip the rest.
//! - `scanner`: validate-only mode's fast path, a byte-by-byte reader for the
//!   common shape of updates that gives up on anything else.
//!
//! [`parse_results`] tries them fastest first; see its documentation.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::validate::Violation;

mod scanner;
mod serde_reader;

use scanner::scan_validate_only;
use serde_reader::parse_with_serde;

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
    /// `sync_meta.sync_service_id` of the chunk's first update: the
    /// integration source the run belongs to (gateway.md §3).
    pub sync_service_id: Option<String>,
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

/// Run numbering of one update (its `sync_meta`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RunMeta<'a> {
    pub run_id: &'a str,
    pub chunk_index: u32,
    pub total_chunks: u32,
    pub total_devices: u64,
    pub sync_service_id: Option<&'a str>,
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

/// Every reader's own answer for one message: the reference reader's, the
/// serde reader's (UTF-8 only) and the scanner's (validate-only mode, UTF-8,
/// when it does not give up).
#[doc(hidden)]
#[derive(Debug)]
pub struct ReaderAnswers {
    pub reference: Result<ParsedResults, Violation>,
    pub serde: Option<Result<ParsedResults, String>>,
    pub scanner: Option<ParsedResults>,
}

/// Runs each reader of [`parse_results`] on its own. `#[doc(hidden)]`: the
/// fuzz targets and integration property tests hold the fast readers to the
/// reference with it, as the unit tests' `assert_same` does; the gateway
/// itself only calls [`parse_results`].
#[doc(hidden)]
pub fn each_reader(message: &[u8], policy: &UpdatePolicy, keep_devices: bool) -> ReaderAnswers {
    let text = std::str::from_utf8(message).ok();
    ReaderAnswers {
        reference: parse_results_generic(message, policy, keep_devices),
        serde: text
            .map(|text| parse_with_serde(text, policy, keep_devices).map_err(|e| e.to_string())),
        scanner: text
            .filter(|_| !keep_devices)
            .and_then(|text| scan_validate_only(text, policy)),
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
        let part = part_for(&mut out.parts, &meta);
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
fn part_for<'a>(parts: &'a mut Vec<ChunkPart>, meta: &RunMeta<'_>) -> &'a mut ChunkPart {
    let position = parts
        .iter()
        .position(|p| p.run_id == meta.run_id && p.chunk_index == meta.chunk_index);
    let index = match position {
        Some(index) => index,
        None => {
            parts.push(ChunkPart {
                run_id: meta.run_id.to_owned(),
                chunk_index: meta.chunk_index,
                total_chunks: meta.total_chunks,
                total_devices: meta.total_devices,
                sync_service_id: meta.sync_service_id.map(str::to_owned),
                accepted: 0,
                rejected: 0,
                devices: Vec::new(),
            });
            parts.len() - 1
        }
    };
    &mut parts[index]
}

fn run_meta(update: &Map<String, Value>) -> Option<RunMeta<'_>> {
    let meta = update.get("sync_meta")?.as_object()?;
    let run_id = meta.get("sync_run_id")?.as_str()?.trim();
    let chunk_index = u32::try_from(meta.get("chunk_index")?.as_u64()?).ok()?;
    let total_chunks = u32::try_from(meta.get("total_chunks")?.as_u64()?).ok()?;
    if run_id.is_empty() || total_chunks == 0 || chunk_index >= total_chunks {
        return None;
    }
    Some(RunMeta {
        run_id,
        chunk_index,
        total_chunks,
        total_devices: meta
            .get("total_devices")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        sync_service_id: meta
            .get("sync_service_id")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty()),
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
    let metadata = untrusted_keys_dropped(match update.remove("metadata") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    });
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

/// `metadata.agent_id` as an agent sends it would name the *agent* where
/// ServiceRadar's core expects a device identity (wire.md §5, gateway.md
/// §1): it is dropped on ingestion, never stored or used.
pub(super) fn untrusted_keys_dropped(mut metadata: Map<String, Value>) -> Map<String, Value> {
    metadata.remove("agent_id");
    metadata
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(super) fn policy() -> UpdatePolicy {
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
    pub(super) fn assert_same(message: &[u8], policy: &UpdatePolicy) -> bool {
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

    pub(super) const META: &str =
        r#"{"sync_run_id":"r1","chunk_index":0,"total_chunks":1,"total_devices":3}"#;

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
                json_string(plain).prop_map(|v| (r#""sync_service_id""#.to_owned(), v)),
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
