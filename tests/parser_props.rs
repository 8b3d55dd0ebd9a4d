//! Property tests of the parsers that read untrusted input (issue 6, "Bad
//! input"): the bootstrap file, `config_json`, Armis and NetBox pages and
//! the gateway's `results` messages.
//!
//! Every parser gets arbitrary bytes, mutated and truncated valid documents
//! (seeded from the real fixtures and the fuzz seeds), and structured
//! documents with random fields. The properties: no panic, ever; an error is
//! non-empty and names the field, the source, the request or the position;
//! a bad part (a source, a device) never takes good ones down with it; a
//! valid page stages exactly the devices it should, and what the agent
//! stages the gateway accepts. The cargo-fuzz targets in `fuzz/` check the
//! same properties on raw bytes for much longer.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use serviceradar_agent::config::bootstrap::{Bootstrap, Security};
use serviceradar_agent::config::duration::{parse_go_duration, parse_go_duration_str, GoDuration};
use serviceradar_agent::config::sources::{
    parse_config_json, ConfigJsonError, SourceEntry, SourceKind,
};
use serviceradar_agent::device::{DeviceUpdate, SyncMeta, UpdateContext};
use serviceradar_agent::gateway::ingest::{
    each_reader, parse_results, ParsedResults, UpdatePolicy,
};
use serviceradar_agent::gateway::validate::Violation;
use serviceradar_agent::sources::armis::{
    first_valid_mac, format_mac, map_device_owned, parse_mac, ArmisDevice, Mapped,
};
use serviceradar_agent::sources::stager::{DeviceSink, PageStager, StageOutput};
use serviceradar_agent::sources::{armis, netbox, RunCounts};
use serviceradar_agent::upload::staging::RunWriter;

/// Cases per property: the whole file stays well under 20 s in a debug
/// build on 2 cores; the fuzz targets do the long runs.
const CASES: u32 = 256;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrinking a failure is worth a while, not forever.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------

/// Strings that matter to at least one parser, then arbitrary text.
fn interesting_string() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "", " ", "5m", "-1s", "0", "1h30m", "500ms", "soon", "true", "FALSE",
            "10.0.0.1", "10.255.3.4", "0.0.0.0", "::", "fe80::1", "10.0.0.0/8",
            "10.10.0.2/24", "a4:bb:6d:5a:11:c0", "http://x", "https://acme.armis.com",
            "ftp://x", "armis", "NetBox", " faker ", "a.b", "é😀", "\u{0}", "\"\\",
            "\u{7f}\u{2028}",
        ])
        .prop_map(str::to_owned),
        2 => "\\PC{0,12}",
        1 => any::<String>(),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        interesting_string().prop_map(Value::String),
    ]
    .boxed()
}

/// Any JSON value, a few levels deep.
fn any_json() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(interesting_string(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
        .boxed()
}

/// One edit of a document; several in a row make a mutated document.
#[derive(Debug, Clone)]
enum Edit {
    Truncate(Index),
    Replace(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Duplicate(Index, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop::sample::select(vec![
        &b"{"[..],
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"",
        b"\\",
        b"\\u",
        b"\\ud800",
        b"null",
        b"-",
        b"0",
        b"-0",
        b"1e999",
        b"18446744073709551616",
        b"\xff",
        b"\xc3",
        b"\x00",
        b" ",
        b"\"x\":",
        b"[[[[[[[[",
    ])
    .prop_map(<[u8]>::to_vec);
    prop_oneof![
        1 => any::<Index>().prop_map(Edit::Truncate),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Replace(i, b)),
        3 => (any::<Index>(), token).prop_map(|(i, t)| Edit::Insert(i, t)),
        2 => (any::<Index>(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Duplicate(a, b)),
    ]
}

fn apply(mut doc: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = doc.len();
        match edit {
            Edit::Truncate(at) => doc.truncate(at.index(len + 1)),
            Edit::Replace(at, byte) if len > 0 => doc[at.index(len)] = *byte,
            Edit::Replace(..) => {}
            Edit::Insert(at, bytes) => {
                let at = at.index(len + 1);
                doc.splice(at..at, bytes.iter().copied());
            }
            Edit::Delete(at, n) => {
                let at = at.index(len + 1);
                doc.drain(at..(at + n).min(len));
            }
            Edit::Duplicate(a, b) if len > 0 => {
                let (a, b) = (a.index(len), b.index(len));
                let (from, to) = (a.min(b), a.max(b) + 1);
                let copy = doc[from..to].to_vec();
                doc.splice(to..to, copy);
            }
            Edit::Duplicate(..) => {}
        }
    }
    doc
}

/// A seed document with a few edits.
fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(seeds.to_vec()),
        prop::collection::vec(edit(), 1..5),
    )
        .prop_map(|(seed, edits)| apply(seed.to_vec(), &edits))
}

/// A strict prefix of a document with no trailing whitespace: never a
/// complete JSON value.
fn truncated(doc: &[u8], at: Index) -> &[u8] {
    &doc[..at.index(doc.len())]
}

/// Writes JSON with every object's keys in reverse order (serde_json's map
/// is sorted): the same document, spelt differently.
fn reversed_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), reversed_json(v)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(reversed_json).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

/// Whether a serde_json error message says where it happened.
fn has_position(message: &str) -> bool {
    message.contains(" line ") && message.contains(" column ")
}

// ---------------------------------------------------------------------------
// Bootstrap file (wire.md §3)
// ---------------------------------------------------------------------------

const BOOTSTRAP_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/seeds/bootstrap/onboarding_bundle.json"),
    include_bytes!("../fuzz/seeds/bootstrap/go_agent_unknown_keys.json"),
    include_bytes!("../fuzz/seeds/bootstrap/project_additions.json"),
];

/// A valid bootstrap document and what parsing it must give.
#[derive(Debug, Clone)]
struct BootstrapDoc {
    doc: Map<String, Value>,
    agent_id: String,
    host: String,
    /// Unknown keys added, as their warnings name them.
    unknown: Vec<String>,
}

fn gateway_host() -> BoxedStrategy<(String, String)> {
    prop_oneof![
        "[a-z]{1,10}(\\.[a-z]{1,8}){0,2}".prop_map(|h| (h.clone(), h)),
        any::<[u8; 4]>().prop_map(|o| {
            let h = Ipv4Addr::from(o).to_string();
            (h.clone(), h)
        }),
        any::<[u16; 8]>().prop_map(|s| {
            let h = Ipv6Addr::from(s).to_string();
            (format!("[{h}]"), h)
        }),
    ]
    .boxed()
}

fn unknown_keys(prefix: &'static str) -> impl Strategy<Value = BTreeMap<String, Value>> {
    prop::collection::btree_map(
        "[a-z]{1,8}".prop_map(move |k| format!("{prefix}{k}")),
        any_json(),
        0..3,
    )
}

fn bootstrap_doc() -> impl Strategy<Value = BootstrapDoc> {
    (
        (
            "[a-z][a-z0-9-]{0,15}",
            prop::sample::select(vec!["", " ", "\t"]),
        ),
        gateway_host(),
        1u16..,
        prop::option::of("[a-z0-9-]{1,20}"),
        prop::option::of(prop::sample::select(vec!["/etc/sr/certs", "certs", ""])),
        prop::collection::vec("[a-z]{1,8}\\.pem", 3),
        prop::option::of(prop::sample::select(vec!["agent", "client", ""])),
        (
            unknown_keys("x_"),
            unknown_keys("sec_"),
            unknown_keys("tls_"),
        ),
        (
            prop::option::of(any::<bool>()),
            prop::option::of(any::<[u8; 4]>()),
            prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,6}", 0..3),
        ),
    )
        .prop_map(
            |(
                (agent_id, pad),
                (addr_host, host),
                port,
                partition,
                cert_dir,
                files,
                role,
                (top, sec_extra, tls_extra),
                (sync, host_ip, labels),
            )| {
                let mut tls = json!({
                    "cert_file": files[0], "key_file": files[1], "ca_file": files[2],
                });
                let mut sec = json!({"mode": "mtls", "tls": Value::Null});
                if let Some(dir) = cert_dir {
                    sec["cert_dir"] = json!(dir);
                }
                if let Some(role) = role {
                    sec["role"] = json!(role);
                }
                let mut unknown = Vec::new();
                for (k, v) in tls_extra {
                    unknown.push(format!("gateway_security.tls.{k}"));
                    tls[k] = v;
                }
                sec["tls"] = tls;
                for (k, v) in sec_extra {
                    unknown.push(format!("gateway_security.{k}"));
                    sec[k] = v;
                }
                let mut doc = Map::new();
                doc.insert("agent_id".into(), json!(format!("{pad}{agent_id}{pad}")));
                doc.insert("gateway_addr".into(), json!(format!("{addr_host}:{port}")));
                doc.insert("gateway_security".into(), sec);
                if let Some(p) = partition {
                    doc.insert("partition".into(), json!(p));
                }
                if let Some(sync) = sync {
                    doc.insert("sync_runtime_enabled".into(), json!(sync));
                }
                if let Some(ip) = host_ip {
                    doc.insert("host_ip".into(), json!(Ipv4Addr::from(ip).to_string()));
                }
                doc.insert("labels".into(), json!(labels));
                for (k, v) in top {
                    unknown.push(k.clone());
                    doc.insert(k, v);
                }
                BootstrapDoc {
                    doc,
                    agent_id,
                    host,
                    unknown,
                }
            },
        )
}

/// A way to break a valid bootstrap document, and what the error must name.
#[derive(Debug, Clone)]
enum BootstrapBreak {
    Remove(&'static str, &'static str),
    Set(&'static [&'static str], Value, &'static str),
    /// A value of the wrong JSON type: the error gives the position.
    WrongType(&'static str, Value),
}

fn bootstrap_break() -> BoxedStrategy<BootstrapBreak> {
    use BootstrapBreak::*;
    let bad_duration = "[a-z]{3,8}".prop_map(|s| format!("x{s}"));
    prop_oneof![
        Just(Remove("agent_id", "agent_id")),
        Just(Remove("gateway_addr", "gateway_addr")),
        Just(Set(&["agent_id"], json!("  "), "agent_id")),
        "[a-z]{1,5}\\.[a-z]{1,5}".prop_map(|id| Set(&["agent_id"], json!(id), "agent_id")),
        prop::sample::select(vec![
            "gw",
            "gw:",
            "gw:0",
            "gw:65536",
            "gw:x",
            ":50052",
            "[::1]50052",
            "[::1"
        ])
        .prop_map(|a| Set(&["gateway_addr"], json!(a), "gateway_addr")),
        prop::sample::select(vec!["a.b".to_owned(), "p".repeat(129), "a\u{1}".to_owned()])
            .prop_map(|p| Set(&["partition"], json!(p), "partition")),
        prop::sample::select(vec!["tls", "none", "MTLS1", ""]).prop_map(|m| Set(
            &["gateway_security", "mode"],
            json!(m),
            "gateway_security.mode"
        )),
        prop::sample::select(vec!["cert_file", "key_file", "ca_file"]).prop_map(|f| {
            let (path, needle): (&'static [&'static str], &'static str) = match f {
                "cert_file" => (
                    &["gateway_security", "tls", "cert_file"],
                    "gateway_security.tls.cert_file",
                ),
                "key_file" => (
                    &["gateway_security", "tls", "key_file"],
                    "gateway_security.tls.key_file",
                ),
                _ => (
                    &["gateway_security", "tls", "ca_file"],
                    "gateway_security.tls.ca_file",
                ),
            };
            Set(path, json!(""), needle)
        }),
        "[a-z]{1,8}".prop_map(|ip| Set(&["host_ip"], json!(ip), "host_ip")),
        prop_oneof![Just(0u64), 1001u64..100_000].prop_map(|n| Set(
            &["gateway_policy", "chunk_max_updates"],
            json!(n),
            "gateway_policy.chunk_max_updates"
        )),
        Just(Set(
            &["restart_policy", "max_restarts"],
            json!(0),
            "restart_policy.max_restarts"
        )),
        Just(Set(
            &["source_http", "request_timeout"],
            json!("0s"),
            "source_http.request_timeout"
        )),
        (0u64..65_536).prop_map(|n| Set(
            &["source_http", "max_body_bytes"],
            json!(n),
            "source_http.max_body_bytes"
        )),
        Just(Set(
            &["source_http", "retry_cap"],
            json!("1ns"),
            "source_http.retry_cap"
        )),
        Just(Set(
            &["restart_policy", "backoff_cap"],
            json!("1ns"),
            "restart_policy.backoff_cap"
        )),
        bad_duration.prop_map(|d| Set(&["restart_policy", "window"], json!(d), "invalid duration")),
        Just(Set(&["restart_policy", "window"], json!("-5s"), "negative")),
        Just(Set(
            &["gateway_policy", "surprise"],
            json!(1),
            "unknown field `surprise`"
        )),
        (
            prop::sample::select(vec![
                "agent_id",
                "gateway_addr",
                "labels",
                "sync_runtime_enabled",
                "gateway_security",
                "restart_policy"
            ]),
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                Just(json!([1, "x"])),
                Just(json!(1.5)),
            ],
        )
            .prop_map(|(k, v)| WrongType(k, v)),
    ]
    .boxed()
}

fn set_path(doc: &mut Map<String, Value>, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("a path");
    let mut node = doc;
    for key in parents {
        node = node
            .entry(key.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object on the path");
    }
    node.insert(last.to_string(), value);
}

const KNOWN_BOOTSTRAP_KEYS: &[&str] = &[
    "agent_id",
    "partition",
    "gateway_addr",
    "gateway_security",
    "host_ip",
    "sync_runtime_enabled",
    "logging",
    "labels",
    "state_dir",
    "allow_plaintext_dev",
    "restart_policy",
    "gateway_policy",
    "source_http",
    "spool",
];

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn bootstrap_never_panics_and_always_says_why(text in prop_oneof![
        any::<String>(),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        mutated(BOOTSTRAP_SEEDS).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]) {
        if let Err(reason) = Bootstrap::parse(&text, Path::new("/etc/sr")) {
            prop_assert!(!reason.trim().is_empty());
            // Either a position in the file or the name of what is wrong.
            prop_assert!(
                has_position(&reason)
                    || KNOWN_BOOTSTRAP_KEYS.iter().any(|k| reason.contains(k)),
                "{reason}"
            );
        }
    }

    #[test]
    fn bootstrap_valid_documents_parse_and_warn_per_unknown_key(d in bootstrap_doc()) {
        let text = Value::Object(d.doc.clone()).to_string();
        let b = Bootstrap::parse(&text, Path::new("/etc/sr")).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&b.agent_id, &d.agent_id);
        prop_assert_eq!(b.warnings.len(), d.unknown.len(), "{:?}", b.warnings);
        for key in &d.unknown {
            prop_assert!(b.warnings.iter().any(|w| w.contains(key.as_str())), "{} not in {:?}", key, b.warnings);
        }
        let Security::Mtls { files, server_name } = &b.security else {
            return Err(TestCaseError::fail("expected mtls"));
        };
        prop_assert!(files.cert_file.is_absolute() && files.key_file.is_absolute() && files.ca_file.is_absolute());
        if d.doc["gateway_security"].get("server_name").is_none() {
            prop_assert_eq!(server_name, &d.host);
        }
        // Key order is not meaningful.
        let again = Bootstrap::parse(&reversed_json(&Value::Object(d.doc)), Path::new("/etc/sr"))
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(again.agent_id, b.agent_id);
    }

    #[test]
    fn bootstrap_errors_name_the_field(d in bootstrap_doc(), broken in bootstrap_break()) {
        let mut doc = d.doc;
        let needle = match &broken {
            BootstrapBreak::Remove(key, needle) => {
                doc.remove(*key);
                *needle
            }
            BootstrapBreak::Set(path, value, needle) => {
                set_path(&mut doc, path, value.clone());
                *needle
            }
            BootstrapBreak::WrongType(key, value) => {
                doc.insert(key.to_string(), value.clone());
                " line "
            }
        };
        let text = serde_json::to_string_pretty(&Value::Object(doc)).expect("serialisable");
        let err = Bootstrap::parse(&text, Path::new("/etc/sr")).err();
        prop_assert!(err.as_deref().is_some_and(|e| e.contains(needle)), "{:?}: {:?}", broken, err);
    }

    #[test]
    fn go_durations_parse_exactly(h in 0u64..1000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000, negative: bool) {
        let mut text = String::new();
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if n > 0 {
                text.push_str(&format!("{n}{unit}"));
            }
        }
        if text.is_empty() {
            text.push('0');
        }
        let nanos = (((h * 60 + m) * 60 + s) * 1000 + ms) * 1_000_000;
        let expected = if negative { -(nanos as i64) } else { nanos as i64 };
        let text = if negative { format!("-{text}") } else { text };
        prop_assert_eq!(parse_go_duration_str(&text), Ok(GoDuration(expected)));
        prop_assert_eq!(parse_go_duration(&json!(expected)), Ok(GoDuration(expected)));
    }

    #[test]
    fn go_duration_errors_quote_the_value(text in "\\PC{0,24}", value in any_json()) {
        if let Err(e) = parse_go_duration_str(&text) {
            prop_assert!(e.contains(&format!("{text:?}")), "{e}");
        }
        if let Err(e) = parse_go_duration(&value) {
            prop_assert!(!e.is_empty() && e.contains("duration"), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------
// config_json (wire.md §4)
// ---------------------------------------------------------------------------

const CONFIG_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/seeds/config_json/real_example.json"),
    include_bytes!("../fuzz/seeds/config_json/mixed_sources.json"),
    include_bytes!("../fuzz/seeds/config_json/bad_fields.json"),
    include_bytes!("../fuzz/seeds/config_json/float_roundtrip.json"),
];

/// Optional source fields: a bad value is a warning, never a bad source.
const OPTIONAL_SOURCE_FIELDS: &[&str] = &[
    "credentials",
    "queries",
    "network_blacklist",
    "insecure_skip_verify",
    "poll_interval",
    "discovery_interval",
    "partition",
    "agent_id",
    "gateway_id",
    "sync_service_id",
];

/// One source of a generated payload.
#[derive(Debug, Clone)]
enum SourceCase {
    Good {
        kind: SourceKind,
        value: Value,
    },
    /// Not runnable; the reason must contain `needle`.
    Bad {
        value: Value,
        needle: &'static str,
    },
}

impl SourceCase {
    fn value(&self) -> &Value {
        match self {
            SourceCase::Good { value, .. } | SourceCase::Bad { value, .. } => value,
        }
    }
}

fn endpoint() -> impl Strategy<Value = String> {
    "https?://[a-z]{1,10}(\\.[a-z]{2,5})?(:[0-9]{2,4})?(/[a-z]{0,5})?"
}

/// Random values for optional fields and unknown keys.
fn source_extras() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::collection::vec(
            (
                prop::sample::select(OPTIONAL_SOURCE_FIELDS.to_vec()),
                any_json(),
            ),
            0..4,
        ),
        prop::collection::btree_map(
            prop::sample::select(vec![
                "prefix",
                "sweep_interval",
                "custom_field",
                "batch_size",
                "seed",
                "x",
            ]),
            any_json(),
            0..3,
        ),
    )
        .prop_map(|(fields, unknown)| {
            let mut map = Map::new();
            for (k, v) in unknown {
                map.insert(k.to_owned(), v);
            }
            for (k, v) in fields {
                map.insert(k.to_owned(), v);
            }
            map
        })
}

fn good_source() -> impl Strategy<Value = SourceCase> {
    (
        prop::sample::select(vec![
            ("armis", SourceKind::Armis),
            (" Armis ", SourceKind::Armis),
            ("NETBOX", SourceKind::Netbox),
            ("netbox", SourceKind::Netbox),
            ("faker", SourceKind::Faker),
            ("\tFaker", SourceKind::Faker),
        ]),
        endpoint(),
        any::<bool>(),
        source_extras(),
    )
        .prop_map(|((type_text, kind), endpoint, with_endpoint, mut map)| {
            map.insert("type".into(), json!(type_text));
            if kind != SourceKind::Faker || with_endpoint {
                map.insert("endpoint".into(), json!(endpoint));
            }
            SourceCase::Good {
                kind,
                value: Value::Object(map),
            }
        })
}

fn bad_source() -> impl Strategy<Value = SourceCase> {
    let with = |extras: Map<String, Value>, pairs: Vec<(&str, Value)>| {
        let mut map = extras;
        for (k, v) in pairs {
            map.insert(k.to_owned(), v);
        }
        Value::Object(map)
    };
    prop_oneof![
        (
            source_extras(),
            "[a-z]{1,8}".prop_filter("supported", |t| !matches!(
                t.as_str(),
                "armis" | "netbox" | "faker"
            ))
        )
            .prop_map(move |(x, t)| SourceCase::Bad {
                value: with(
                    x,
                    vec![("type", json!(t)), ("endpoint", json!("https://x"))]
                ),
                needle: "unsupported type"
            }),
        source_extras().prop_map(move |x| SourceCase::Bad {
            value: with(x, vec![("endpoint", json!("https://x"))]),
            needle: "type is missing"
        }),
        (
            source_extras(),
            json_leaf().prop_filter("string", |v| !v.is_string())
        )
            .prop_map(move |(x, t)| SourceCase::Bad {
                value: with(x, vec![("type", t)]),
                needle: "type must be a string"
            }),
        (
            source_extras(),
            prop::sample::select(vec!["armis", "netbox"]),
            prop::sample::select(vec![
                Value::Null,
                json!(""),
                json!("  "),
                json!(5),
                json!({"url": "https://x"})
            ])
        )
            .prop_map(move |(mut x, t, ep)| {
                x.remove("endpoint");
                SourceCase::Bad {
                    value: with(x, vec![("type", json!(t)), ("endpoint", ep)]),
                    needle: "endpoint is required",
                }
            }),
        (
            source_extras(),
            prop::sample::select(vec!["ftp://x", "acme.armis.com", "//x", "mailto:x"])
        )
            .prop_map(move |(x, ep)| SourceCase::Bad {
                value: with(x, vec![("type", json!("armis")), ("endpoint", json!(ep))]),
                needle: "is not an http(s) URL"
            }),
        prop_oneof![
            json_leaf(),
            prop::collection::vec(json_leaf(), 0..3).prop_map(Value::Array)
        ]
        .prop_map(|value| SourceCase::Bad {
            value,
            needle: "must be an object"
        }),
    ]
}

fn payload() -> impl Strategy<Value = (BTreeMap<String, SourceCase>, Map<String, Value>)> {
    (
        prop::collection::btree_map(
            "[A-Za-z0-9 _\\-\"é]{1,16}",
            prop_oneof![good_source(), bad_source()],
            1..6,
        ),
        // Top-level keys the sync runtime ignores.
        prop::collection::btree_map(
            prop::sample::select(vec!["agent_id", "mapper", "sweep", "version", "x"]),
            any_json(),
            0..3,
        ),
    )
        .prop_map(|(sources, others)| {
            (
                sources,
                others.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            )
        })
}

fn payload_value(sources: &BTreeMap<String, SourceCase>, others: &Map<String, Value>) -> Value {
    let mut root = others.clone();
    root.insert(
        "sources".into(),
        Value::Object(
            sources
                .iter()
                .map(|(name, case)| (name.clone(), case.value().clone()))
                .collect(),
        ),
    );
    Value::Object(root)
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn config_json_never_panics_and_errors_say_where(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        any::<String>().prop_map(String::into_bytes),
        mutated(CONFIG_SEEDS),
    ]) {
        match parse_config_json(&bytes) {
            Err(ConfigJsonError::Json(e)) => prop_assert!(has_position(&e.to_string()), "{e}"),
            Err(e @ ConfigJsonError::SourcesNotObject(_)) => prop_assert!(e.to_string().contains("config_json.sources")),
            Err(e) => prop_assert!(!e.to_string().trim().is_empty()),
            Ok(parsed) => {
                for (name, entry) in &parsed.sources {
                    if let SourceEntry::Invalid { reason, .. } = entry {
                        prop_assert!(reason.starts_with(&format!("source {name:?}: ")), "{reason}");
                    }
                }
            }
        }
    }

    #[test]
    fn config_json_truncated_is_an_error(parts in payload(), at in any::<Index>()) {
        let text = payload_value(&parts.0, &parts.1).to_string();
        let cut = truncated(text.as_bytes(), at);
        // Only an empty (or blank) payload means "no sources".
        prop_assert_eq!(parse_config_json(cut).is_err(), !cut.is_empty());
    }

    #[test]
    fn valid_sources_survive_bad_siblings((sources, others) in payload()) {
        let root = payload_value(&sources, &others);
        let parsed = parse_config_json(root.to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(parsed.sources.len(), sources.len());
        for (name, case) in &sources {
            let entry = &parsed.sources[name];
            match (case, entry) {
                (SourceCase::Good { kind, .. }, SourceEntry::Valid(config)) => {
                    prop_assert_eq!(config.kind, *kind);
                    prop_assert_eq!(&config.name, name);
                    // A field-level problem is a warning naming the field.
                    for warning in &config.warnings {
                        prop_assert!(
                            OPTIONAL_SOURCE_FIELDS.iter().any(|f| warning.starts_with(f)),
                            "{warning}"
                        );
                    }
                }
                (SourceCase::Bad { needle, .. }, SourceEntry::Invalid { reason, .. }) => {
                    prop_assert!(reason.starts_with(&format!("source {name:?}: ")), "{reason}");
                    prop_assert!(reason.contains(needle), "{needle:?} not in {reason}");
                }
                (case, entry) => return Err(TestCaseError::fail(format!("{name:?}: {case:?} gave {entry:?}"))),
            }
            // A source alone gets the same entry: siblings do not matter.
            let alone = json!({"sources": {name.clone(): case.value().clone()}});
            let alone = parse_config_json(alone.to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(alone.sources.get(name), Some(entry));
        }
        // Key order changes nothing, hashes included.
        let reordered = parse_config_json(reversed_json(&root).as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&reordered, &parsed);
    }

    #[test]
    fn a_changed_source_changes_its_hash_only((sources, others) in payload(), which in any::<Index>(), marker in "[a-z]{1,8}") {
        let before = parse_config_json(payload_value(&sources, &others).to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut changed = payload_value(&sources, &others);
        let names: Vec<String> = sources.keys().cloned().collect();
        let target = &names[which.index(names.len())];
        let value = &mut changed["sources"][target.as_str()];
        match value {
            Value::Object(map) => { map.insert("x_changed".into(), json!(marker)); }
            other => *other = json!({"x_changed": marker}),
        }
        let after = parse_config_json(changed.to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for name in &names {
            let (b, a) = (before.sources[name].hash(), after.sources[name].hash());
            if name == target {
                prop_assert_ne!(b, a);
            } else {
                prop_assert_eq!(b, a);
            }
        }
    }
}

/// Found by the `config_json` fuzz target (fuzz/seeds/config_json/
/// float_roundtrip.json): serde_json's default float parsing is not
/// correctly rounded, so `233333333333333.333` parsed, printed and parsed
/// again is another number, and a source hashed after such a round trip
/// gets another hash. A source moved as its own text keeps its entry and
/// hash, which is what "siblings do not matter" means.
#[test]
fn a_source_moved_as_text_keeps_its_entry_and_hash() {
    let payload: &[u8] = include_bytes!("../fuzz/seeds/config_json/float_roundtrip.json");
    let parsed = parse_config_json(payload).expect("a JSON object");
    let root: BTreeMap<String, &RawValue> = serde_json::from_slice(payload).expect("an object");
    let sources: BTreeMap<String, &RawValue> =
        serde_json::from_str(root["sources"].get()).expect("an object");
    assert_eq!(sources.len(), 2);
    for (name, text) in sources {
        let alone = format!(r#"{{"sources":{{{}:{}}}}}"#, json!(name), text.get());
        let alone = parse_config_json(alone.as_bytes()).expect("a JSON object");
        assert_eq!(
            alone.sources.get(&name),
            parsed.sources.get(&name),
            "{name}"
        );
    }
    assert!(matches!(parsed.sources["ok"], SourceEntry::Valid(_)));
    match &parsed.sources["spagflag"] {
        SourceEntry::Invalid { reason, .. } => {
            assert_eq!(
                reason,
                "source \"spagflag\": must be an object, got a number"
            )
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Armis and NetBox pages (sources.md)
// ---------------------------------------------------------------------------

fn ctx(source: &'static str) -> UpdateContext {
    UpdateContext {
        agent_id: "agent-props".into(),
        gateway_id: "gw-props".into(),
        partition: "default".into(),
        source,
        timestamp: "2026-04-12T09:30:12.000000000Z".into(),
    }
}

fn blacklist() -> Vec<IpNet> {
    vec!["10.255.0.0/16".parse().expect("a CIDR")]
}

/// What a page must give, device by device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Staged,
    NoIp,
    Blacklisted,
    Invalid,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        5 => Just(Fate::Staged),
        1 => Just(Fate::NoIp),
        1 => Just(Fate::Blacklisted),
        1 => Just(Fate::Invalid),
    ]
}

fn expected_counts(fates: &[Fate]) -> RunCounts {
    let count = |f: Fate| fates.iter().filter(|x| **x == f).count() as u64;
    RunCounts {
        devices: count(Fate::Staged),
        skipped_no_ip: count(Fate::NoIp),
        blacklisted: count(Fate::Blacklisted),
        skipped_invalid: count(Fate::Invalid),
        ..RunCounts::default()
    }
}

/// Stages `pages` the way a run does (page workers, writer thread, staging
/// file) and returns the run's output.
fn stage<P: Send + 'static>(
    pages: Vec<P>,
    process: impl Fn(P, &mut DeviceSink) -> Result<(), serviceradar_agent::sources::http::FetchError>
        + Send
        + Sync
        + 'static,
) -> Result<(StageOutput, Vec<Value>), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?;
    let output = runtime.block_on(async {
        let writer = RunWriter::create(dir.path(), "run").map_err(|e| e.to_string())?;
        let mut stager = PageStager::start(writer, process);
        for page in pages {
            if let Err(e) = stager.push(page).await {
                stager.abandon().await;
                return Err(e.to_string());
            }
        }
        stager.finish().await.map_err(|e| e.to_string())
    })?;
    let text = std::fs::read_to_string(&output.staged.data_path).map_err(|e| e.to_string())?;
    let lines = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()
        .map_err(|e| e.to_string())?;
    Ok((output, lines))
}

/// The staged lines as one chunk the gateway reads: every update must be
/// accepted, keyed by `id_key` from its metadata.
fn gateway_accepts_all(lines: &[Value], id_key: &str) -> Result<(), TestCaseError> {
    let total = lines.len() as u64;
    let chunk: Vec<Value> = lines
        .iter()
        .cloned()
        .map(|mut line| {
            line["sync_meta"] = json!(SyncMeta {
                sync_service_id: "svc".into(),
                sync_run_id: "run-1".into(),
                chunk_index: 0,
                total_chunks: 1,
                total_devices: total,
                is_final: true,
            });
            line
        })
        .collect();
    let message = serde_json::to_vec(&chunk).expect("serialisable");
    let parsed = parse_results(&message, &UpdatePolicy::new("default", []), true)
        .map_err(|v| TestCaseError::fail(v.reason))?;
    prop_assert_eq!(parsed.accepted(), total);
    prop_assert_eq!(parsed.rejected(), 0);
    let devices = parsed.parts.iter().flat_map(|p| &p.devices);
    for (device, line) in devices.zip(lines) {
        prop_assert_eq!(
            Some(device.device_key.as_str()),
            line["metadata"][id_key].as_str()
        );
        prop_assert_eq!(device.ip.as_deref(), line["ip"].as_str());
    }
    Ok(())
}

fn ipv4_outside_blacklist() -> impl Strategy<Value = Ipv4Addr> {
    (any::<[u8; 4]>()).prop_map(|mut o| {
        if o == [0; 4] || (o[0] == 10 && o[1] == 255) {
            o[1] = 7;
        }
        Ipv4Addr::from(o)
    })
}

/// Text for optional string fields: absent, null, plain, or needing
/// escapes (so that a page takes the slow path).
fn text_field() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Value::Null)),
        3 => "[A-Za-z0-9 .-]{0,12}".prop_map(|s| Some(json!(s))),
        1 => interesting_string().prop_map(|s| Some(json!(s))),
    ]
    .boxed()
}

// --- Armis -----------------------------------------------------------------

const ARMIS_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/seeds/armis_page/page.json"),
    include_bytes!("../fuzz/seeds/armis_page/page_escaped_last.json"),
    include_bytes!("../fuzz/seeds/armis_page/page_wrong_types.json"),
    include_bytes!("../fuzz/seeds/armis_page/page_null.json"),
    include_bytes!("../fuzz/seeds/armis_page/error.json"),
    include_bytes!("../fuzz/seeds/armis_page/invalid_utf8_in_ignored_key.json"),
];

const ARMIS_REQUEST: &str = "GET /api/v1/search/ (from=0)";

fn armis_device(id: i64, fate: Fate) -> BoxedStrategy<Value> {
    let ip: BoxedStrategy<Value> = match fate {
        Fate::Staged | Fate::Invalid => prop_oneof![
            3 => ipv4_outside_blacklist().prop_map(|ip| json!(ip.to_string())),
            1 => (ipv4_outside_blacklist(), any::<[u16; 8]>())
                .prop_map(|(a, b)| json!(format!("junk, 0.0.0.0 ,{a}, {}", Ipv6Addr::from(b)))),
        ]
        .boxed(),
        Fate::NoIp => prop::sample::select(vec![
            json!(""),
            json!(" , "),
            json!("not-an-ip"),
            json!("0.0.0.0"),
            json!("::"),
            json!("300.1.1.1"),
            Value::Null,
        ])
        .boxed(),
        Fate::Blacklisted => (any::<u8>(), any::<u8>())
            .prop_map(|(c, d)| json!(format!("10.255.{c}.{d},10.1.1.1")))
            .boxed(),
    };
    let wrong: BoxedStrategy<(&'static str, Value)> = prop::sample::select(vec![
        ("id", json!("one")),
        ("ipAddress", json!(5)),
        ("tags", json!("x")),
        ("riskLevel", json!("high")),
        ("name", json!({"a": 1})),
        ("macAddress", json!([1])),
    ])
    .boxed();
    (
        ip,
        prop::collection::vec(text_field(), 9),
        prop::option::of(prop::collection::vec("\\PC{0,6}", 0..3)),
        prop::option::of(any::<i64>()),
        prop::option::of("([0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}(,[0-9a-f]{12})?"),
        unknown_keys("custom_"),
        wrong,
    )
        .prop_map(move |(ip, texts, tags, risk, mac, unknown, wrong)| {
            let mut d = Map::new();
            d.insert("id".into(), json!(id));
            d.insert("ipAddress".into(), ip);
            let keys = [
                "name",
                "type",
                "category",
                "manufacturer",
                "model",
                "operatingSystem",
                "firstSeen",
                "lastSeen",
                "boundaries",
            ];
            for (k, v) in keys.iter().zip(texts) {
                if let Some(v) = v {
                    d.insert((*k).into(), v);
                }
            }
            if let Some(tags) = tags {
                d.insert("tags".into(), json!(tags));
            }
            if let Some(risk) = risk {
                d.insert("riskLevel".into(), json!(risk));
            }
            if let Some(mac) = mac {
                d.insert("macAddress".into(), json!(mac));
            }
            for (k, v) in unknown {
                d.insert(k, v);
            }
            if fate == Fate::Invalid {
                d.insert(wrong.0.into(), wrong.1);
            }
            Value::Object(d)
        })
        .boxed()
}

/// An Armis page: its body, each device's fate, and its `next`.
fn armis_page() -> impl Strategy<Value = (Vec<u8>, Vec<Fate>, Option<u64>)> {
    (
        prop::collection::vec(fate(), 0..12),
        prop::option::of(1u64..1_000_000),
        any::<bool>(),
    )
        .prop_flat_map(|(fates, next, pretty)| {
            let devices: Vec<BoxedStrategy<Value>> = fates
                .iter()
                .enumerate()
                .map(|(i, f)| armis_device(i as i64 + 1, *f))
                .collect();
            (
                devices,
                Just(fates),
                Just(next),
                Just(pretty),
                unknown_keys("meta_"),
            )
        })
        .prop_map(|(devices, fates, next, pretty, extra)| {
            let mut data =
                json!({"count": devices.len(), "next": next, "prev": null, "total": 50000});
            data["results"] = Value::Array(devices);
            let mut page = json!({"data": data, "success": true});
            for (k, v) in extra {
                page[k] = v;
            }
            let body = if pretty {
                reversed_json(&page).into_bytes()
            } else {
                serde_json::to_vec(&page).expect("serialisable")
            };
            (body, fates, next)
        })
}

fn armis_process(
    body: &[u8],
    sink: &mut DeviceSink,
) -> Result<armis::client::Envelope, serviceradar_agent::sources::http::FetchError> {
    armis::client::process_page(
        body,
        Some("q"),
        ARMIS_REQUEST,
        &ctx("armis"),
        &blacklist(),
        sink,
    )
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn armis_pages_stage_exactly_their_valid_devices((body, fates, next) in armis_page()) {
        let envelope = armis_process(&body, &mut DeviceSink::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(envelope.next, next);
        let (output, lines) = stage(vec![body], |body: Vec<u8>, sink: &mut DeviceSink| {
            armis_process(&body, sink).map(drop)
        }).map_err(TestCaseError::fail)?;
        prop_assert_eq!(output.counts, expected_counts(&fates));
        prop_assert_eq!(lines.len() as u64, output.counts.devices);
        prop_assert_eq!(output.first_invalid.is_some(), fates.contains(&Fate::Invalid));
        if let Some(first) = &output.first_invalid {
            prop_assert!(first.contains(ARMIS_REQUEST), "{first}");
        }
        gateway_accepts_all(&lines, "armis_device_id")?;
    }

    #[test]
    fn armis_bad_pages_fail_naming_the_request(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutated(ARMIS_SEEDS),
        (armis_page(), any::<Index>()).prop_map(|((body, ..), at)| truncated(&body, at).to_vec()),
    ]) {
        if let Err(e) = armis_process(&body, &mut DeviceSink::default()) {
            prop_assert!(e.to_string().contains(ARMIS_REQUEST), "{e}");
        }
    }

    #[test]
    fn armis_truncated_pages_are_errors((body, ..) in armis_page(), at in any::<Index>()) {
        let err = armis_process(truncated(&body, at), &mut DeviceSink::default()).err();
        prop_assert!(err.as_ref().is_some_and(|e| e.to_string().contains("invalid search page")), "{:?}", err);
    }

    #[test]
    fn armis_mapping_rules_hold_for_any_device(
        ip in prop_oneof![interesting_string(), "[0-9a-f:., ]{0,40}"],
        mac in prop_oneof![interesting_string(), "[0-9a-fA-F:.,\\- ]{0,40}"],
        name in prop::option::of(interesting_string()),
        id in prop::option::of(any::<i64>()),
        risk in prop::option::of(any::<i64>()),
    ) {
        let dev = ArmisDevice { id, ip_address: Some(ip), mac_address: Some(mac.clone()), name, risk_level: risk, ..Default::default() };
        match map_device_owned(dev, &ctx("armis"), "armis", None, &blacklist()) {
            Mapped::Update(u) => {
                let ip: IpAddr = u.ip.parse().map_err(|_| TestCaseError::fail(format!("bad ip {}", u.ip)))?;
                prop_assert!(!ip.is_unspecified() && !blacklist()[0].contains(&ip));
                prop_assert_eq!(&u.device_id, &format!("default:{}", u.ip));
                prop_assert_eq!(u.mac, first_valid_mac(&mac));
                prop_assert!(!u.metadata.contains_key("agent_id"));
                prop_assert_eq!(u.metadata.get("armis_device_id").cloned(), id.map(|i| i.to_string()));
                prop_assert_eq!(u.metadata.get("armis_risk_level").cloned(), risk.filter(|r| *r > 0).map(|r| r.to_string()));
            }
            Mapped::NoIp | Mapped::Blacklisted => {}
        }
    }

    #[test]
    fn every_mac_form_parses_back(mac in any::<[u8; 6]>(), form in 0usize..4, upper: bool) {
        prop_assume!(mac != [0; 6] && mac != [0xff; 6]);
        let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        let text = match form {
            0 => hex.join(":"),
            1 => hex.join("-"),
            2 => format!("{}{}.{}{}.{}{}", hex[0], hex[1], hex[2], hex[3], hex[4], hex[5]),
            _ => hex.concat(),
        };
        let text = if upper { text.to_uppercase() } else { text };
        prop_assert_eq!(parse_mac(&text), Some(mac));
        prop_assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        prop_assert_eq!(first_valid_mac(&format!("zz, {text}")), Some(format_mac(&mac)));
    }
}

// --- NetBox ----------------------------------------------------------------

const NETBOX_FIXTURES: &[&[u8]] = &[
    include_bytes!("fixtures/netbox/devices_page1.json"),
    include_bytes!("fixtures/netbox/devices_edge_cases.json"),
    include_bytes!("fixtures/netbox/devices_fields_min.json"),
    include_bytes!("fixtures/netbox/devices_cursor_last_page.json"),
    include_bytes!("fixtures/netbox/error_bad_filter.json"),
    include_bytes!("fixtures/netbox/error_bad_token.json"),
    // Inputs the `netbox_page` fuzz target failed on, for mutation.
    include_bytes!("../fuzz/seeds/netbox_page/lone_surrogate_in_ignored_field.json"),
    include_bytes!("../fuzz/seeds/netbox_page/control_char_message.json"),
    include_bytes!("../fuzz/seeds/netbox_page/array_page.json"),
];

const NETBOX_REQUEST: &str = "GET /api/dcim/devices/ (offset=0)";

fn netbox_process(
    body: &[u8],
    sink: &mut DeviceSink,
) -> Result<netbox::client::Envelope, serviceradar_agent::sources::http::FetchError> {
    netbox::client::process_page(body, NETBOX_REQUEST, &ctx("netbox"), &blacklist(), sink)
}

fn netbox_ref() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        3 => (any::<u32>(), text_field(), text_field()).prop_map(|(id, name, slug)| {
            json!({"id": id, "url": "http://nb/x", "display": "x", "name": name, "slug": slug})
        }),
    ]
    .boxed()
}

fn netbox_device(id: i64, fate: Fate) -> BoxedStrategy<Value> {
    let ip = |v4: Option<String>, v6: Option<String>, any_ip: Option<String>| {
        let obj = |a: Option<String>| {
            a.map_or(
                Value::Null,
                |a| json!({"id": 1, "family": {"value": 4}, "address": a}),
            )
        };
        (obj(v4), obj(v6), obj(any_ip))
    };
    let ips: BoxedStrategy<(Value, Value, Value)> = match fate {
        Fate::Staged | Fate::Invalid => prop_oneof![
            (ipv4_outside_blacklist(), 0u8..=32).prop_map(move |(a, len)| ip(
                Some(format!("{a}/{len}")),
                None,
                None
            )),
            any::<[u16; 8]>()
                .prop_filter("specified", |s| *s != [0; 8])
                .prop_map(move |s| ip(None, Some(format!("{}/64", Ipv6Addr::from(s))), None)),
            ipv4_outside_blacklist().prop_map(move |a| ip(
                Some("bogus/24".into()),
                None,
                Some(a.to_string())
            )),
        ]
        .boxed(),
        Fate::NoIp => prop::sample::select(vec![
            ip(None, None, None),
            ip(Some("not-an-ip/24".into()), None, None),
            ip(Some("0.0.0.0/0".into()), Some("::/0".into()), None),
        ])
        .boxed(),
        Fate::Blacklisted => (any::<u8>(), any::<u8>())
            .prop_map(move |(c, d)| ip(Some(format!("10.255.{c}.{d}/16")), None, None))
            .boxed(),
    };
    let wrong: BoxedStrategy<(&'static str, Value)> = prop::sample::select(vec![
        ("id", json!("seven")),
        ("primary_ip4", json!("10.0.0.1")),
        ("tags", json!({"a": 1})),
        ("site", json!("ams1")),
        ("status", json!(5)),
        ("device_type", json!("router")),
    ])
    .boxed();
    let tag = prop_oneof![
        "[a-z]{0,6}".prop_map(Value::from),
        (text_field(), text_field()).prop_map(|(n, s)| json!({"id": 1, "name": n, "slug": s})),
    ];
    (
        ips,
        (
            netbox_ref(),
            netbox_ref(),
            netbox_ref(),
            netbox_ref(),
            netbox_ref(),
        ),
        (text_field(), text_field(), text_field()),
        prop::option::of(prop::collection::vec(tag, 0..3)),
        unknown_keys("custom_"),
        wrong,
        any::<bool>(),
    )
        .prop_map(
            move |(
                (v4, v6, any_ip),
                (role, site, tenant, platform, manufacturer),
                (name, serial, model),
                tags,
                unknown,
                wrong,
                legacy_role,
            )| {
                let mut d = json!({
                    "id": id, "url": format!("http://nb/api/dcim/devices/{id}/"),
                    "site": site, "tenant": tenant, "platform": platform,
                    "device_type": {"id": 3, "model": model, "manufacturer": manufacturer},
                    "status": {"value": "active", "label": "Active"},
                    "primary_ip4": v4, "primary_ip6": v6, "primary_ip": any_ip,
                    "config_context": {"ntp": ["10.0.0.1"]},
                });
                d[if legacy_role { "device_role" } else { "role" }] = role;
                for (k, v) in [("name", name), ("serial", serial)] {
                    if let Some(v) = v {
                        d[k] = v;
                    }
                }
                if let Some(tags) = tags {
                    d["tags"] = Value::Array(tags);
                }
                for (k, v) in unknown {
                    d[k] = v;
                }
                if fate == Fate::Invalid {
                    d[wrong.0] = wrong.1;
                }
                d
            },
        )
        .boxed()
}

/// A NetBox list page: its body, each device's fate, and its `next`.
fn netbox_page() -> impl Strategy<Value = (Vec<u8>, Vec<Fate>, Option<String>)> {
    (
        prop::collection::vec(fate(), 0..10),
        prop::option::of("/api/dcim/devices/\\?limit=[0-9]{1,4}&offset=[0-9]{1,5}"),
        any::<bool>(),
    )
        .prop_flat_map(|(fates, next, reversed)| {
            let devices: Vec<BoxedStrategy<Value>> = fates
                .iter()
                .enumerate()
                .map(|(i, f)| netbox_device(i as i64 + 1, *f))
                .collect();
            (devices, Just(fates), Just(next), Just(reversed))
        })
        .prop_map(|(devices, fates, next, reversed)| {
            let page =
                json!({"count": devices.len(), "next": next, "previous": null, "results": devices});
            let body = if reversed {
                reversed_json(&page).into_bytes()
            } else {
                serde_json::to_vec_pretty(&page).expect("serialisable")
            };
            (body, fates, next)
        })
}

proptest! {
    #![proptest_config(config(CASES))]

    #[test]
    fn netbox_pages_stage_exactly_their_valid_devices((body, fates, next) in netbox_page()) {
        let envelope = netbox_process(&body, &mut DeviceSink::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(envelope.next, next);
        prop_assert_eq!(envelope.results, fates.len());
        let (output, lines) = stage(vec![body], |body: Vec<u8>, sink: &mut DeviceSink| {
            netbox_process(&body, sink).map(drop)
        }).map_err(TestCaseError::fail)?;
        prop_assert_eq!(output.counts, expected_counts(&fates));
        prop_assert_eq!(lines.len() as u64, output.counts.devices);
        if let Some(first) = &output.first_invalid {
            prop_assert!(first.contains(NETBOX_REQUEST) && first.contains("cannot be read"), "{first}");
        }
        gateway_accepts_all(&lines, "netbox_device_id")?;
    }

    #[test]
    fn netbox_fixture_devices_keep_their_fate(order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle(), keep in prop::collection::vec(any::<bool>(), 6)) {
        // devices_edge_cases.json: 28 IPv6-only, 43 no IP, 803 an interface
        // IP but no primary one, 355 dual-stack, 61 offline, 123
        // decommissioning (fixtures README). Any subset, in any order.
        let page: Value = serde_json::from_slice(NETBOX_FIXTURES[1]).expect("fixture is JSON");
        let all = page["results"].as_array().expect("results");
        let results: Vec<Value> = order.iter().filter(|i| keep[**i]).map(|i| all[*i].clone()).collect();
        let fates: Vec<Fate> = results
            .iter()
            .map(|d| if matches!(d["id"].as_i64(), Some(43 | 803)) { Fate::NoIp } else { Fate::Staged })
            .collect();
        let body = serde_json::to_vec(&json!({"count": 6, "next": null, "previous": null, "results": results})).expect("serialisable");
        let (output, lines) = stage(vec![body], |body: Vec<u8>, sink: &mut DeviceSink| netbox_process(&body, sink).map(drop))
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(output.counts, expected_counts(&fates));
        gateway_accepts_all(&lines, "netbox_device_id")?;
    }

    #[test]
    fn netbox_bad_pages_fail_naming_the_request(body in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        mutated(NETBOX_FIXTURES),
        (netbox_page(), any::<Index>()).prop_map(|((body, ..), at)| truncated(&body, at).to_vec()),
    ]) {
        match netbox_process(&body, &mut DeviceSink::default()) {
            Err(e) => prop_assert!(e.to_string().contains(NETBOX_REQUEST), "{e}"),
            Ok(envelope) => {
                // Accepted: a JSON object whose `results` array has that
                // length. (Read as raw values: a lone surrogate escape such
                // as `\ud800` in a key nobody reads is valid JSON syntax,
                // which `Value` refuses and NetBox paging need not.)
                let fail = |e: serde_json::Error| TestCaseError::fail(e.to_string());
                let page: BTreeMap<String, &RawValue> = serde_json::from_slice(&body).map_err(fail)?;
                let results = page.get("results").ok_or_else(|| TestCaseError::fail("no results"))?;
                let results: Vec<&RawValue> = serde_json::from_str(results.get()).map_err(fail)?;
                prop_assert_eq!(results.len(), envelope.results);
            }
        }
        prop_assert!(!netbox::client::error_message(&body).is_empty());
    }
}

proptest! {
    #![proptest_config(config(CASES))]

    /// Only an object is a NetBox list: serde would read the envelope
    /// struct from an array such as `[null, []]`, an empty last page.
    #[test]
    fn netbox_pages_that_are_not_objects_are_refused(
        value in prop_oneof![
            json_leaf(),
            prop::collection::vec(prop_oneof![json_leaf(), Just(json!([])), Just(json!([{"id": 1}]))], 0..3)
                .prop_map(Value::Array),
        ],
    ) {
        let err = netbox_process(value.to_string().as_bytes(), &mut DeviceSink::default()).err();
        prop_assert!(err.as_ref().is_some_and(|e| e.to_string().contains(NETBOX_REQUEST)), "{:?}", err);
    }

    /// What a 4xx reports: never an empty message, whatever the body
    /// (the `netbox_page` fuzz target found `"\u007f"`).
    #[test]
    fn netbox_error_messages_are_never_empty(
        value in prop_oneof![
            any_json(),
            "[\\x00-\\x20\\x7f]{0,4}".prop_map(|s| json!({"detail": s})),
            "[\\x00-\\x20\\x7f]{0,4}".prop_map(|s| json!([s])),
        ],
        noise in prop::collection::vec(prop::sample::select(vec![0u8, 1, 9, 10, 13, 32, 0x7f]), 0..4),
    ) {
        let mut body = value.to_string().into_bytes();
        body.extend(noise);
        prop_assert!(!netbox::client::error_message(&body).is_empty());
    }
}

#[test]
fn netbox_fixture_pages_stage_as_documented() {
    // devices_page1.json: three routers with primary IPv4 addresses;
    // devices_fields_min.json: the same three, `fields=` selection.
    for (fixture, devices) in [(0, 3), (1, 4), (2, 3), (3, 0)] {
        let body = NETBOX_FIXTURES[fixture].to_vec();
        let (output, lines) = stage(vec![body], |body: Vec<u8>, sink: &mut DeviceSink| {
            netbox_process(&body, sink).map(drop)
        })
        .expect("the fixture stages");
        assert_eq!(output.counts.devices, devices, "fixture {fixture}");
        gateway_accepts_all(&lines, "netbox_device_id").expect("the gateway accepts it");
    }
    // Error bodies are not pages; their message is what a 4xx reports.
    for fixture in [4, 5] {
        let err = netbox_process(NETBOX_FIXTURES[fixture], &mut DeviceSink::default())
            .expect_err("an error body is not a page");
        assert!(err.to_string().contains("`results`"), "{err}");
        assert!(!netbox::client::error_message(NETBOX_FIXTURES[fixture]).contains('{'));
    }
}

/// Found by the `netbox_page` fuzz target (fuzz/seeds/netbox_page/
/// lone_surrogate_in_ignored_field.json): a lone surrogate escape is valid
/// JSON syntax. In a field the mapping ignores it changes nothing; in one
/// it reads, only that device is skipped (and counted), not the page.
#[test]
fn lone_surrogates_cost_at_most_their_device() {
    let body = br#"{"count":2,"next":null,"previous":null,"results":[
        {"id":1,"display":"x\ud800y","name":"a","primary_ip4":{"address":"10.0.0.1/24"}},
        {"id":2,"name":"b\ud800","primary_ip4":{"address":"10.0.0.2/24"}}]}"#;
    let envelope = netbox_process(body, &mut DeviceSink::default()).expect("a usable page");
    assert_eq!(envelope.results, 2);
    let (output, lines) = stage(
        vec![body.to_vec()],
        |body: Vec<u8>, sink: &mut DeviceSink| netbox_process(&body, sink).map(drop),
    )
    .expect("the page stages");
    assert_eq!(
        (output.counts.devices, output.counts.skipped_invalid),
        (1, 1)
    );
    assert_eq!(lines[0]["hostname"], "a");
    let first_invalid = output
        .first_invalid
        .expect("the skipped device is reported");
    assert!(
        first_invalid.contains("device id 2 (#1 on the page) cannot be read"),
        "{first_invalid}"
    );
}

// ---------------------------------------------------------------------------
// Gateway results messages (wire.md §5–7)
// ---------------------------------------------------------------------------

const GATEWAY_SEEDS: &[&[u8]] = &[
    include_bytes!("../fuzz/seeds/gateway_chunk/chunk.json"),
    include_bytes!("../fuzz/seeds/gateway_chunk/odd_elements.json"),
];

fn policy() -> UpdatePolicy {
    UpdatePolicy::new("site-a", ["lab".to_owned()])
}

fn without_devices(parsed: &ParsedResults) -> ParsedResults {
    let mut parsed = parsed.clone();
    for part in &mut parsed.parts {
        part.devices.clear();
    }
    parsed
}

/// The gateway's properties for any message: its readers agree with the
/// reference, keeping devices changes only the devices, and a refusal is
/// INVALID_ARGUMENT with a position. Returns the outcome.
fn check_message(message: &[u8]) -> Result<Result<ParsedResults, Violation>, TestCaseError> {
    let policy = policy();
    let mut outcomes = Vec::new();
    for keep in [false, true] {
        let answers = each_reader(message, &policy, keep);
        if let Some(serde) = &answers.serde {
            prop_assert_eq!(
                serde.as_ref().ok(),
                answers.reference.as_ref().ok(),
                "serde reader, keep={}",
                keep
            );
        }
        if let Some(scanned) = &answers.scanner {
            prop_assert_eq!(Ok(scanned), answers.reference.as_ref(), "scanner");
        }
        let parsed = parse_results(message, &policy, keep);
        prop_assert_eq!(&parsed, &answers.reference);
        match &parsed {
            Err(v) => {
                prop_assert_eq!(v.code, Violation::invalid("").code);
                prop_assert!(
                    v.reason
                        .starts_with("results message is not a JSON array: ")
                        && has_position(&v.reason),
                    "{}",
                    v.reason
                );
            }
            Ok(p) => {
                for part in &p.parts {
                    prop_assert!(part.chunk_index < part.total_chunks && !part.run_id.is_empty());
                    prop_assert_eq!(
                        part.devices.len() as u64,
                        if keep { part.accepted } else { 0 }
                    );
                }
            }
        }
        outcomes.push(parsed.as_ref().map(without_devices).map_err(Clone::clone));
    }
    prop_assert_eq!(&outcomes[0], &outcomes[1]);
    Ok(outcomes.pop().expect("two outcomes"))
}

/// A chunk as the agent sends it: `updates` with the run's `sync_meta`.
fn agent_chunk() -> impl Strategy<Value = (Vec<DeviceUpdate>, Vec<u8>)> {
    let update = (
        prop_oneof![
            ipv4_outside_blacklist().prop_map(|ip| ip.to_string()),
            any::<[u16; 8]>().prop_map(|s| Ipv6Addr::from(s).to_string()),
        ],
        prop::option::of("[A-F0-9]{2}(:[A-F0-9]{2}){5}"),
        prop::option::of(interesting_string()),
        prop::sample::select(vec!["site-a", "lab"]),
        prop::option::of((
            prop::sample::select(vec![
                "armis_device_id",
                "netbox_device_id",
                "integration_id",
            ]),
            "[0-9]{1,6}",
        )),
        prop::collection::btree_map("[a-z_]{1,10}", interesting_string(), 0..4),
    )
        .prop_map(|(ip, mac, hostname, partition, strong, extra)| {
            let ctx = UpdateContext {
                partition: partition.to_owned(),
                ..ctx("armis")
            };
            let mut metadata: BTreeMap<std::borrow::Cow<'static, str>, String> =
                extra.into_iter().map(|(k, v)| (k.into(), v)).collect();
            if let Some((k, v)) = strong {
                metadata.insert(k.into(), v);
            }
            ctx.update(ip, mac, hostname, metadata)
        });
    (
        prop::collection::vec(update, 1..12),
        "[a-z0-9-]{1,12}",
        1u32..6,
    )
        .prop_flat_map(|(updates, run, total)| (Just(updates), Just(run), 0..total, Just(total)))
        .prop_map(|(mut updates, run, chunk, total)| {
            let n = updates.len() as u64;
            for u in &mut updates {
                u.sync_meta = Some(SyncMeta {
                    sync_service_id: "svc".into(),
                    sync_run_id: run.clone(),
                    chunk_index: chunk,
                    total_chunks: total,
                    total_devices: n,
                    is_final: chunk + 1 == total,
                });
            }
            let message = serde_json::to_vec(&updates).expect("serialisable");
            (updates, message)
        })
}

proptest! {
    #![proptest_config(config(CASES * 2))]

    #[test]
    fn gateway_any_bytes(message in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        any::<String>().prop_map(String::into_bytes),
        "\\[[\\[\\]{}\",:0-9a-z \\\\]{0,40}\\]".prop_map(String::into_bytes),
    ]) {
        // Only the checks matter, not whether it parses.
        let _ = check_message(&message)?;
    }

    #[test]
    fn gateway_accepts_what_the_agent_sends((updates, message) in agent_chunk()) {
        let parsed = check_message(&message)?.map_err(|v| TestCaseError::fail(v.reason))?;
        prop_assert_eq!(parsed.accepted(), updates.len() as u64);
        prop_assert_eq!(parsed.rejected(), 0);
        prop_assert_eq!(parsed.parts.len(), 1);
        let kept = parse_results(&message, &policy(), true).map_err(|v| TestCaseError::fail(v.reason))?;
        for (device, update) in kept.parts[0].devices.iter().zip(&updates) {
            let ip: IpAddr = update.ip.parse().expect("generated");
            prop_assert_eq!(device.ip.clone(), Some(ip.to_string()));
            let strong = ["armis_device_id", "netbox_device_id", "integration_id"]
                .iter()
                .find_map(|k| update.metadata.get(*k).cloned());
            prop_assert_eq!(&device.device_key, &strong.unwrap_or_else(|| ip.to_string()));
            prop_assert_eq!(&device.partition, &update.partition);
        }
    }

    #[test]
    fn gateway_truncated_chunks_are_invalid((_, message) in agent_chunk(), at in any::<Index>()) {
        let outcome = check_message(truncated(&message, at))?;
        prop_assert!(outcome.is_err());
    }

    #[test]
    fn gateway_mutated_chunks((_, message) in agent_chunk(), edits in prop::collection::vec(edit(), 1..5)) {
        // Only the checks matter, not whether it parses.
        let _ = check_message(&apply(message, &edits))?;
    }

    #[test]
    fn gateway_mutated_seeds(message in mutated(GATEWAY_SEEDS)) {
        // Only the checks matter, not whether it parses.
        let _ = check_message(&message)?;
    }

    #[test]
    fn gateway_invalid_utf8_is_invalid((_, message) in agent_chunk(), at in any::<Index>(), byte in prop_oneof![0xc0u8..=0xc1, 0xf5u8..=0xff]) {
        // Bytes that never occur in UTF-8: wherever one lands, the message
        // is invalid.
        let mut bad = message;
        let at = at.index(bad.len() + 1);
        bad.insert(at, byte);
        prop_assert!(check_message(&bad)?.is_err());
    }
}
