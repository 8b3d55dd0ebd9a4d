//! A NetBox device list page and error body (sources.md "NetBox"): any
//! bytes, never a panic; a refused page names the request; an accepted
//! envelope counts `results` as serde does; error bodies always give a
//! message.
#![no_main]

use std::collections::BTreeMap;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serviceradar_agent::device::UpdateContext;
use serviceradar_agent::sources::netbox::client::{error_message, process_page};
use serviceradar_agent::sources::netbox::mapping::parse_address;
use serviceradar_agent::sources::stager::DeviceSink;

const REQUEST: &str = "GET /api/dcim/devices/ (offset=0)";

fuzz_target!(|data: &[u8]| {
    let ctx = UpdateContext {
        agent_id: "agent-fuzz".into(),
        gateway_id: "gw-fuzz".into(),
        partition: "default".into(),
        source: "netbox",
        timestamp: "2026-01-01T00:00:00.000000000Z".into(),
    };
    let blacklist: Vec<IpNet> = vec!["10.255.0.0/16".parse().unwrap()];
    let mut sink = DeviceSink::default();
    match process_page(data, REQUEST, &ctx, &blacklist, &mut sink) {
        Err(e) => assert!(
            e.to_string().contains(REQUEST),
            "error does not name the request: {e}"
        ),
        Ok(envelope) => {
            // An accepted page is a JSON object whose `results` is an array
            // of that length. Read as raw values: a lone surrogate escape
            // (`\ud800`) in a key nobody reads is valid JSON syntax that
            // `Value` refuses.
            let page: BTreeMap<String, &RawValue> =
                serde_json::from_slice(data).expect("an accepted page is an object");
            let results: Vec<&RawValue> =
                serde_json::from_str(page["results"].get()).expect("`results` is an array");
            assert_eq!(results.len(), envelope.results);
        }
    }
    assert!(!error_message(data).is_empty());
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(ip) = parse_address(text) {
            assert!(!ip.is_unspecified());
        }
    }
});
