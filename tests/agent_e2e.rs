//! End to end, in process, over real loopback mTLS: the agent enrols, gets a
//! Faker source through GetConfig, streams the run in chunks, and the gateway
//! stores exactly the devices the generator produced.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::GatewayEvent;

#[actix_rt::test]
async fn agent_enrols_and_delivers_exactly_the_generated_devices() {
    let fx = Fixture::new(&["agent-e2e"]);
    let gw = fx
        .gateway(&[("agent-e2e", json!({"Faker Ten K": faker_source(10_000, 7)}))])
        .await;
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-e2e", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut agent_events = agent.context.telemetry.subscribe();

    let capabilities = wait_for(&mut gw_events, "Hello", |e| match e {
        GatewayEvent::Hello {
            agent_id,
            capabilities,
            ..
        } if agent_id == "agent-e2e" => Some(capabilities.clone()),
        _ => None,
    })
    .await;
    assert!(
        capabilities.contains(&"sync".to_string()),
        "{capabilities:?}"
    );

    let (run_id, devices) = wait_for(&mut gw_events, "RunComplete", |e| match e {
        GatewayEvent::RunComplete {
            agent_id,
            run_id,
            devices,
            ..
        } if agent_id == "agent-e2e" => Some((run_id.clone(), *devices)),
        _ => None,
    })
    .await;
    assert_eq!(devices, 10_000);

    let (result, count) = wait_for(&mut gw_events, "RunReport", |e| match e {
        GatewayEvent::RunReport {
            source,
            run_id: r,
            result,
            device_count,
            ..
        } if r == &run_id => {
            assert_eq!(source, "Faker Ten K");
            Some((result.clone(), *device_count))
        }
        _ => None,
    })
    .await;
    assert_eq!((result.as_str(), count), ("success", 10_000));

    let chunks = wait_for(&mut agent_events, "RunDelivered", |e| match e {
        AgentEvent::RunDelivered {
            run_id: r, chunks, ..
        } if r == &run_id => Some(*chunks),
        _ => None,
    })
    .await;
    assert!(
        chunks >= 10,
        "10,000 updates need at least 10 chunks of ≤1000, got {chunks}"
    );

    let store = gw.store().expect("gateway has a store");
    let rows = store.devices().await.unwrap();
    let stored: BTreeSet<_> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.source, "faker");
            assert_eq!(r.partition, "default");
            assert_eq!(r.agent_id, "agent-e2e");
            (
                r.device_key.clone(),
                r.ip.clone().unwrap(),
                r.mac.clone(),
                r.hostname.clone(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 10_000);
    assert_eq!(stored, expected_devices(10_000, 7));
    // The agent's own id never travels as a device identity.
    assert!(rows.iter().all(|r| r.metadata.get("agent_id").is_none()));

    agent.shutdown();
    gw.shutdown().await;
}
