//! `config_json` from GetConfig (wire.md §4): any bytes, never a panic; an
//! unusable payload is an error that says why; every source is judged on
//! its own, so a source's entry is the same with or without its siblings.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use serviceradar_agent::config::sources::{parse_config_json, SourceEntry, SourceKind};

fuzz_target!(|data: &[u8]| {
    let parsed = match parse_config_json(data) {
        Ok(parsed) => parsed,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty());
            return;
        }
    };
    for (name, entry) in &parsed.sources {
        assert_eq!(entry.hash().len(), 64, "hash of {name:?}");
        match entry {
            SourceEntry::Invalid { reason, .. } => {
                assert!(
                    reason.starts_with(&format!("source {name:?}: ")),
                    "reason does not name the source: {reason}"
                );
            }
            SourceEntry::Valid(source) => {
                assert_eq!(&source.name, name);
                if source.kind != SourceKind::Faker {
                    let endpoint = source.endpoint.as_deref().unwrap_or_default();
                    assert!(endpoint.starts_with("http://") || endpoint.starts_with("https://"));
                }
            }
        }
    }
    // Alone in a payload, each source gets the very same entry. The source
    // is moved as its own text: re-serialising a parsed `Value` is not
    // neutral (serde_json's default float parsing is not correctly rounded,
    // so `233333333333333.333` comes back as a different number).
    let Ok(root) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(data) else {
        return;
    };
    let Some(sources) = root.get("sources") else {
        return;
    };
    let Ok(sources) = serde_json::from_str::<BTreeMap<String, &RawValue>>(sources.get()) else {
        return;
    };
    for (name, value) in sources {
        let alone = format!(
            r#"{{"sources":{{{}:{}}}}}"#,
            Value::from(name.as_str()),
            value.get()
        );
        let again = parse_config_json(alone.as_bytes())
            .unwrap_or_else(|e| panic!("a source alone is unparseable: {e}"));
        assert_eq!(
            again.sources.get(&name),
            parsed.sources.get(&name),
            "{name:?}"
        );
    }
});
