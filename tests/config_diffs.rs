//! Config reconciliation: adding, changing, removing and breaking sources
//! restarts exactly the affected integration actors and nothing else.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{json, Value};
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent::{self, AgentHandle};
use serviceradar_agent::gateway::{GatewayEvent, GatewayHandle};
use serviceradar_agent::messages::{ChildId, GetChildren};

/// Generation of every integration actor, by source name.
async fn sources(agent: &AgentHandle) -> BTreeMap<String, u64> {
    agent
        .supervisor
        .send(GetChildren)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|(id, state)| match id {
            ChildId::Source(name) if state.running => Some((name, state.generation)),
            _ => None,
        })
        .collect()
}

/// Pushes new sources and waits until the agent has applied them.
async fn push(gw: &GatewayHandle, agent: &AgentHandle, sources: Value) {
    let mut gw_events = gw.subscribe();
    gw.set_agent_sources("agent-cfg", sources.as_object().unwrap().clone());
    let version = wait_for(&mut gw_events, "config ack", |e| match e {
        GatewayEvent::ConfigAcked { version, .. } => Some(version.clone()),
        _ => None,
    })
    .await;
    assert_eq!(agent.context.applied_config_version(), version);
}

#[actix_rt::test]
async fn only_affected_sources_restart() {
    let fx = Fixture::new(&["agent-cfg"]);
    let a = faker_source(20, 1);
    let b = faker_source(20, 2);
    let c = faker_source(20, 3);
    let gw = fx
        .gateway(&[("agent-cfg", json!({"A": a, "B": b, "C": c}))])
        .await;
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-cfg", &gw.local_addr().to_string(), json!({})));
    let mut events = agent.context.telemetry.subscribe();
    // The ControlStream is up once the agent acknowledges the pushed config.
    wait_for(&mut gw_events, "first config ack", |e| {
        matches!(e, GatewayEvent::ConfigAcked { .. }).then_some(())
    })
    .await;
    let initial = sources(&agent).await;
    assert_eq!(
        initial,
        BTreeMap::from([("A".into(), 1), ("B".into(), 1), ("C".into(), 1)])
    );

    // Change B only (seed), and reorder keys of A (same content ⇒ same hash).
    let a_reordered = json!({"sync_service_id": a["sync_service_id"], "discovery_interval": "1h",
        "credentials": {"seed": "1", "total_devices": "20"}, "type": "faker"});
    push(
        &gw,
        &agent,
        json!({"A": a_reordered, "B": faker_source(20, 22), "C": c}),
    )
    .await;
    assert_eq!(
        sources(&agent).await,
        BTreeMap::from([("A".into(), 1), ("B".into(), 2), ("C".into(), 1)])
    );

    // Remove C, add D.
    push(
        &gw,
        &agent,
        json!({"A": a, "B": faker_source(20, 22), "D": faker_source(20, 4)}),
    )
    .await;
    assert_eq!(
        sources(&agent).await,
        BTreeMap::from([("A".into(), 1), ("B".into(), 2), ("D".into(), 1)])
    );

    // Break A (unsupported type): it stops and is reported; the others run on.
    push(
        &gw,
        &agent,
        json!({"A": {"type": "snmp"}, "B": faker_source(20, 22), "D": faker_source(20, 4)}),
    )
    .await;
    assert_eq!(
        sources(&agent).await,
        BTreeMap::from([("B".into(), 2), ("D".into(), 1)])
    );
    let reason = wait_for(&mut events, "SourceInvalid", |e| match e {
        AgentEvent::SourceInvalid { name, reason } if name == "A" => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("unsupported"), "{reason}");
    let report_error = wait_for(&mut gw_events, "failed report for A", |e| match e {
        GatewayEvent::RunReport { source, error, .. } if source == "A" => error.clone(),
        _ => None,
    })
    .await;
    assert!(report_error.contains("unsupported"), "{report_error}");

    // Fix A again: it starts; B and D untouched.
    push(
        &gw,
        &agent,
        json!({"A": a, "B": faker_source(20, 22), "D": faker_source(20, 4)}),
    )
    .await;
    assert_eq!(
        sources(&agent).await,
        BTreeMap::from([("A".into(), 1), ("B".into(), 2), ("D".into(), 1)])
    );

    // No sources at all: everything stops, the core children stay.
    push(&gw, &agent, json!({})).await;
    assert!(sources(&agent).await.is_empty());
    let children = agent.supervisor.send(GetChildren).await.unwrap();
    for core in [ChildId::Gateway, ChildId::Config, ChildId::Uploader] {
        assert_eq!(
            children[&core].generation, 1,
            "{core} must not restart on config changes"
        );
    }

    agent.shutdown();
    gw.shutdown().await;
}
