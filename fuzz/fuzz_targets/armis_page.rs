//! An Armis search page (sources.md "Armis") as a page worker reads it:
//! any bytes, never a panic; a refused page names the request; a page the
//! reference reader (owned devices, serde) accepts is never refused by the
//! fast path, and gives the same `next`.
#![no_main]

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use serviceradar_agent::device::UpdateContext;
use serviceradar_agent::sources::armis::client::process_page;
use serviceradar_agent::sources::armis::page::read_page;
use serviceradar_agent::sources::armis::{map_device_owned, ArmisDevice, Mapped};
use serviceradar_agent::sources::stager::DeviceSink;

const REQUEST: &str = "GET /api/v1/search/ (from=0)";

fuzz_target!(|data: &[u8]| {
    let ctx = UpdateContext {
        agent_id: "agent-fuzz".into(),
        gateway_id: "gw-fuzz".into(),
        partition: "default".into(),
        source: "armis",
        timestamp: "2026-01-01T00:00:00.000000000Z".into(),
    };
    let blacklist: Vec<IpNet> = vec!["10.255.0.0/16".parse().unwrap()];
    let mut sink = DeviceSink::default();
    let fast = process_page(
        data,
        Some("fuzz query"),
        REQUEST,
        &ctx,
        &blacklist,
        &mut sink,
    );
    if let Err(e) = &fast {
        assert!(
            e.to_string().contains(REQUEST),
            "error does not name the request: {e}"
        );
    }

    // The reference: owned devices, every one mapped the slow way.
    let mut devices = 0usize;
    let reference = read_page::<ArmisDevice>(data, &mut |device| {
        devices += 1;
        if let Mapped::Update(update) =
            map_device_owned(device, &ctx, "armis", Some("fuzz query"), &blacklist)
        {
            assert!(!update.ip.is_empty());
            assert_eq!(update.device_id, format!("default:{}", update.ip));
            assert!(!update.metadata.contains_key("agent_id"));
            assert!(blacklist
                .iter()
                .all(|net| !net.contains(&update.ip.parse::<std::net::IpAddr>().unwrap())));
        }
    });
    if let Ok(head) = reference {
        if head.success != Some(false) && head.has_data {
            let envelope = fast.unwrap_or_else(|e| {
                panic!("the reference reads {devices} devices, the page worker fails: {e}")
            });
            assert_eq!(envelope.next, head.next.and_then(|n| u64::try_from(n).ok()));
        }
    }
});
