//! End to end over real HTTP and real loopback mTLS: an `armis` source
//! pointed at the Faker server, and a `netbox` source pointed at a mock
//! NetBox serving fixture-shaped pages, each through the agent to the
//! gateway's store.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use serviceradar_agent::agent;
use serviceradar_agent::gateway::GatewayEvent;
use serviceradar_agent::sources::faker::server::{FakerServer, FakerServerConfig};
use serviceradar_agent::sources::faker::FakerSettings;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Waits for the run report of `source` and returns the whole report.
async fn run_report(
    events: &mut tokio::sync::broadcast::Receiver<GatewayEvent>,
    source: &str,
) -> Value {
    wait_for(events, "RunReport", |e| match e {
        GatewayEvent::RunReport {
            source: s, report, ..
        } if s == source => Some(report.clone()),
        _ => None,
    })
    .await
}

#[actix_rt::test]
async fn armis_source_pulls_the_faker_server_through_the_agent_to_the_gateway() {
    const DEVICES: u64 = 12_345;
    let faker = FakerServer::start(FakerServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        settings: FakerSettings {
            total_devices: DEVICES,
            seed: 11,
            churn_percent: 0.0,
        },
        max_page: 5000,
        churn_interval: None,
        token_ttl: Duration::from_secs(3600),
        api_key: Some("ak_demo".into()),
        api_secret: Some("demo-secret".into()),
    })
    .await
    .expect("faker server starts");

    let fx = Fixture::new(&["agent-armis"]);
    let source = json!({"type": "armis", "endpoint": faker.url(), "discovery_interval": "1h",
        "credentials": {"api_key": "ak_demo", "api_secret": "demo-secret", "page_size": "5000"},
        "queries": [{"label": "All devices", "query": "in:devices"}],
        "network_blacklist": ["172.16.3.0/24"]});
    let gw = fx
        .gateway(&[("agent-armis", json!({"Armis Lab": source}))])
        .await;
    let mut events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-armis", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");

    let report = run_report(&mut events, "Armis Lab").await;
    let blacklisted = 254; // 172.16.3.1–254
    assert_eq!(report["result"], "success", "{report}");
    assert_eq!(report["device_count"], DEVICES - blacklisted);
    assert_eq!(report["blacklisted"], blacklisted);
    assert_eq!(report["pages"], 3, "12,345 devices at 5000 a page");
    assert_eq!(report["type"], "armis");

    let rows = gw.store().expect("store").devices().await.unwrap();
    let stored: BTreeSet<_> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.source, "armis");
            assert_eq!(r.metadata["integration_type"], "armis");
            assert_eq!(r.metadata["query_label"], "All devices");
            (
                r.device_key.clone(),
                r.ip.clone().unwrap(),
                r.mac.clone(),
                r.hostname.clone(),
            )
        })
        .collect();
    let expected: BTreeSet<_> = expected_devices(DEVICES, 11)
        .into_iter()
        .filter(|(_, ip, _, _)| !ip.starts_with("172.16.3."))
        .collect();
    assert_eq!(stored, expected);

    agent.shutdown();
    gw.shutdown().await;
    faker.shutdown().await;
}

/// A device shaped like the recorded NetBox 4.7 ones (tests/fixtures), with
/// its own id, name and primary address.
fn netbox_device(template: &Value, id: u64) -> Value {
    let mut device = template.clone();
    device["id"] = json!(id);
    device["name"] = json!(format!("lab-sw-{id:04}"));
    device["primary_ip4"]["address"] = json!(format!("10.40.{}.{}/24", id / 200, id % 200 + 1));
    device["primary_ip"] = device["primary_ip4"].clone();
    device
}

#[actix_rt::test]
async fn netbox_source_walks_fixture_shaped_pages_through_the_agent_to_the_gateway() {
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/netbox/devices_page1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let template = fixture["results"][0].clone();
    let server = MockServer::start().await;
    // 2,500 devices at NetBox's cap of 1000 a page; `next` names the host
    // NetBox saw (an internal one), which the agent must not follow.
    let pages = [(0, 1000), (1000, 1000), (2000, 500)];
    for (offset, count) in pages {
        let results: Vec<Value> = (offset..offset + count)
            .map(|i| netbox_device(&template, i + 1))
            .collect();
        let next = (offset + count < 2500).then(|| {
            format!(
                "http://netbox.internal:8001/api/dcim/devices/?limit=1000&offset={}&omit=config_context",
                offset + count
            )
        });
        Mock::given(method("GET"))
            .and(path("/api/dcim/devices/"))
            .and(query_param("offset", offset.to_string()))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"count": 2500, "next": next, "previous": null, "results": results}),
            ))
            .expect(1)
            .mount(&server)
            .await;
    }

    let fx = Fixture::new(&["agent-netbox"]);
    let source = json!({"type": "netbox", "endpoint": server.uri(), "discovery_interval": "1h",
        "credentials": {"api_token": "nbt_AAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"},
        "partition": "lab"});
    let gw = fx
        .gateway(&[("agent-netbox", json!({"NetBox Lab": source}))])
        .await;
    let mut events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-netbox", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");

    let report = run_report(&mut events, "NetBox Lab").await;
    assert_eq!(report["result"], "success", "{report}");
    assert_eq!(report["device_count"], 2500);
    assert_eq!(report["pages"], 3);

    let rows = gw.store().expect("store").devices().await.unwrap();
    assert_eq!(rows.len(), 2500);
    let ids: BTreeSet<u64> = rows
        .iter()
        .map(|r| {
            assert_eq!((r.source.as_str(), r.partition.as_str()), ("netbox", "lab"));
            assert_eq!(r.metadata["integration_type"], "netbox");
            assert_eq!(r.metadata["manufacturer"], "Cisco");
            r.metadata["netbox_device_id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, (1..=2500).collect());
    let first = rows
        .iter()
        .find(|r| r.metadata["netbox_device_id"] == "1")
        .unwrap();
    assert_eq!(first.ip.as_deref(), Some("10.40.0.2"));
    assert_eq!(first.hostname.as_deref(), Some("lab-sw-0001"));

    agent.shutdown();
    gw.shutdown().await;
}

/// A failed run still reaches the gateway as a report that says why, and the
/// secret never travels in it.
#[actix_rt::test]
async fn failed_http_runs_are_reported_with_their_kind_and_no_secret() {
    let faker = FakerServer::start(FakerServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: Some("ak_demo".into()),
        api_secret: Some("the-right-secret".into()),
        ..FakerServerConfig::default()
    })
    .await
    .expect("faker server starts");
    // A NetBox that answers slower than the run deadline.
    let slow = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&slow)
        .await;

    let fx = Fixture::new(&["agent-fail"]);
    let sources = json!({
        "Armis Wrong Secret": {"type": "armis", "endpoint": faker.url(), "discovery_interval": "1h",
            "credentials": {"api_key": "ak_demo", "api_secret": "a-wrong-s3cret"}},
        "NetBox Too Slow": {"type": "netbox", "endpoint": slow.uri(), "discovery_interval": "1h",
            "credentials": {"api_token": "0123456789abcdef0123456789abcdef01234567"}}});
    let gw = fx.gateway(&[("agent-fail", sources)]).await;
    let mut events = gw.subscribe();
    let agent = agent::start(fx.bootstrap(
        "agent-fail",
        &gw.local_addr().to_string(),
        json!({"gateway_policy": {"reconnect_base": "50ms", "reconnect_cap": "1s", "run_deadline": "300ms"}}),
    )).expect("agent starts");

    let mut reports = Vec::new();
    while reports.len() < 2 {
        reports.push(
            wait_for(&mut events, "RunReport", |e| match e {
                GatewayEvent::RunReport { report, .. } => Some(report.clone()),
                _ => None,
            })
            .await,
        );
    }
    let by_source = |name: &str| {
        reports
            .iter()
            .find(|r| r["source"] == name)
            .unwrap_or_else(|| panic!("no report for {name}: {reports:?}"))
    };
    let armis = by_source("Armis Wrong Secret");
    assert_eq!(
        (armis["result"].as_str(), armis["error_kind"].as_str()),
        (Some("failed"), Some("auth"))
    );
    assert!(
        armis["error"]
            .as_str()
            .unwrap()
            .contains("Invalid secret key"),
        "{armis}"
    );
    let netbox = by_source("NetBox Too Slow");
    assert_eq!(
        (netbox["result"].as_str(), netbox["error_kind"].as_str()),
        (Some("failed"), Some("deadline"))
    );
    for report in &reports {
        let text = report.to_string();
        assert!(
            !text.contains("a-wrong-s3cret") && !text.contains("0123456789abcdef01234567"),
            "{text}"
        );
    }
    assert_eq!(gw.store().expect("store").devices().await.unwrap().len(), 0);

    agent.shutdown();
    gw.shutdown().await;
    faker.shutdown().await;
}
