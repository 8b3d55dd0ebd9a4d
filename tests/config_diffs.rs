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

/// The expected running sources and their generations.
fn running(sources: &[(&str, u64)]) -> BTreeMap<String, u64> {
    sources
        .iter()
        .map(|(name, generation)| (name.to_string(), *generation))
        .collect()
}

/// Pushes new sources, waits until the agent has applied them, and returns
/// the integration actors then running.
async fn push(
    gw: &GatewayHandle,
    agent: &AgentHandle,
    new_sources: Value,
) -> BTreeMap<String, u64> {
    let mut gw_events = gw.subscribe();
    gw.set_agent_sources("agent-cfg", new_sources.as_object().unwrap().clone());
    let version = wait_for(&mut gw_events, "config ack", |e| match e {
        GatewayEvent::ConfigAcked { version, .. } => Some(version.clone()),
        _ => None,
    })
    .await;
    assert_eq!(agent.context.applied_config_version(), version);
    sources(agent).await
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
    let agent = agent::start(fx.bootstrap("agent-cfg", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    // The ControlStream is up once the agent acknowledges the pushed config.
    wait_for(&mut gw_events, "first config ack", |e| {
        matches!(e, GatewayEvent::ConfigAcked { .. }).then_some(())
    })
    .await;
    assert_eq!(
        sources(&agent).await,
        running(&[("A", 1), ("B", 1), ("C", 1)])
    );

    // Change B only (seed), and reorder keys of A (same content ⇒ same hash).
    let a_reordered = json!({"sync_service_id": a["sync_service_id"], "discovery_interval": "1h",
        "credentials": {"seed": "1", "total_devices": "20"}, "type": "faker"});
    let b2 = faker_source(20, 22);
    let d = faker_source(20, 4);
    let next = json!({"A": a_reordered, "B": b2, "C": c});
    assert_eq!(
        push(&gw, &agent, next).await,
        running(&[("A", 1), ("B", 2), ("C", 1)])
    );

    // Remove C, add D.
    let next = json!({"A": a, "B": b2, "D": d});
    assert_eq!(
        push(&gw, &agent, next).await,
        running(&[("A", 1), ("B", 2), ("D", 1)])
    );

    // Break A (unsupported type): it stops and is reported; the others run on.
    let next = json!({"A": {"type": "snmp"}, "B": b2, "D": d});
    assert_eq!(
        push(&gw, &agent, next).await,
        running(&[("B", 2), ("D", 1)])
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
    let next = json!({"A": a, "B": b2, "D": d});
    assert_eq!(
        push(&gw, &agent, next).await,
        running(&[("A", 1), ("B", 2), ("D", 1)])
    );

    // No sources at all: everything stops, the core children stay.
    assert!(push(&gw, &agent, json!({})).await.is_empty());
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
