//! The gateway goes away and comes back on the same address: the agent
//! reconnects with backoff, enrols again, and the next run is delivered.
//! The restarted gateway reopens the same database, on both store backends.

mod backend_support;
mod common;

use backend_support::Backend;
use common::*;
use serde_json::json;
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::{self, GatewayEvent};

/// A fixture whose gateways use a fresh database of `backend`.
async fn fixture(backend: Backend, agents: &[&str]) -> Fixture {
    let fx = Fixture::new(agents);
    let database = backend.fresh_database(fx.path(), "gateway").await;
    fx.with_database(database)
}

async fn agent_reconnects_after_gateway_restart_and_delivers_the_next_run(backend: Backend) {
    let fx = fixture(backend, &["agent-rs"]).await;
    let sources = json!({"S": faker_source(500, 3)});
    let gw = fx.gateway(&[("agent-rs", sources.clone())]).await;
    let addr = gw.local_addr();
    let mut gw_events = gw.subscribe();
    let agent =
        agent::start(fx.bootstrap("agent-rs", &addr.to_string(), json!({}))).expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;
    wait_for(&mut events, "first report accepted", |e| {
        matches!(e, AgentEvent::RunReported { ok: true, .. }).then_some(())
    })
    .await;

    gw.shutdown().await;
    let reason = wait_for(&mut events, "disconnect noticed", |e| match e {
        AgentEvent::GatewayDisconnected { reason } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(!reason.is_empty());

    // Same address, same database: a restarted gateway.
    let mut config = fx.gateway_config(&[("agent-rs", sources)]);
    config.listen = addr.to_string();
    let gw = gateway::start(config)
        .await
        .expect("gateway restarts on the same port");
    let mut gw_events = gw.subscribe();
    wait_for(&mut gw_events, "re-enrolment", |e| match e {
        GatewayEvent::Hello { agent_id, .. } if agent_id == "agent-rs" => Some(()),
        _ => None,
    })
    .await;
    wait_for(&mut gw_events, "ControlStream reopened", |e| {
        matches!(e, GatewayEvent::ControlStreamOpened { .. }).then_some(())
    })
    .await;
    let gateway_id = wait_for(&mut events, "GatewayConnected", |e| match e {
        AgentEvent::GatewayConnected { gateway_id } => Some(gateway_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(gateway_id, "gw-test");

    let command_id = gw
        .send_command("agent-rs", "sync.run_now", json!({"source": "S"}))
        .unwrap();
    // The command result ("run started") arrives before the run itself.
    let (success, message) = wait_for(&mut gw_events, "command result", |e| match e {
        GatewayEvent::CommandResult {
            command_id: id,
            success,
            message,
            ..
        } if id == &command_id => Some((*success, message.clone())),
        _ => None,
    })
    .await;
    assert!(success, "{message}");
    let devices = wait_for(&mut gw_events, "run after restart", |e| match e {
        GatewayEvent::RunComplete { devices, .. } => Some(*devices),
        _ => None,
    })
    .await;
    assert_eq!(devices, 500);

    // Still one device per generated device: the second run updated them.
    assert_eq!(gw.store().unwrap().device_count().await.unwrap(), 500);

    // Unknown commands fail; run_now of an unknown source fails.
    let bogus = gw
        .send_command("agent-rs", "agent.selfdestruct", json!({}))
        .unwrap();
    let (ok, message) = wait_for(&mut gw_events, "unknown command result", |e| match e {
        GatewayEvent::CommandResult {
            command_id: id,
            success,
            message,
            ..
        } if id == &bogus => Some((*success, message.clone())),
        _ => None,
    })
    .await;
    assert!(!ok && message.contains("unknown command"), "{message}");
    let missing = gw
        .send_command("agent-rs", "sync.run_now", json!({"source": "nope"}))
        .unwrap();
    let (ok, message) = wait_for(&mut gw_events, "run_now unknown source", |e| match e {
        GatewayEvent::CommandResult {
            command_id: id,
            success,
            message,
            ..
        } if id == &missing => Some((*success, message.clone())),
        _ => None,
    })
    .await;
    assert!(!ok && message.contains("nope"), "{message}");

    agent.shutdown();
    gw.shutdown().await;
}

/// With the gateway unreachable at start, the agent runs the sources of its
/// cached config and delivers once the gateway is back.
async fn cached_config_is_used_when_the_gateway_is_down_at_start(backend: Backend) {
    let fx = fixture(backend, &["agent-cache"]).await;
    let gw = fx
        .gateway(&[("agent-cache", json!({"Cached": faker_source(100, 5)}))])
        .await;
    let addr = gw.local_addr();
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-cache", &addr.to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;
    // Delivered and reported, so it left the spool: the next agent starts a
    // run of its own (an unacknowledged run would be replayed instead, and
    // the gateway would ignore it as already complete).
    wait_for(&mut events, "first run reported", |e| {
        matches!(e, AgentEvent::RunReported { ok: true, .. }).then_some(())
    })
    .await;
    let version = agent.context.applied_config_version();
    agent.shutdown();
    gw.shutdown().await;

    // Agent restarts while the gateway is down: its cached config starts the source.
    let agent = agent::start(fx.bootstrap("agent-cache", &addr.to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    let name = wait_for(&mut events, "source from cache", |e| match e {
        AgentEvent::SourceStarted { name, .. } => Some(name.clone()),
        _ => None,
    })
    .await;
    assert_eq!(name, "Cached");
    assert_eq!(agent.context.applied_config_version(), version);

    let mut config = fx.gateway_config(&[("agent-cache", json!({"Cached": faker_source(100, 5)}))]);
    config.listen = addr.to_string();
    let gw = gateway::start(config).await.unwrap();
    let mut gw_events = gw.subscribe();
    let devices = wait_for(
        &mut gw_events,
        "run delivered after the gateway came back",
        |e| match e {
            GatewayEvent::RunComplete { devices, .. } => Some(*devices),
            _ => None,
        },
    )
    .await;
    assert_eq!(devices, 100);
    agent.shutdown();
    gw.shutdown().await;
}

on_both_backends!(
    actix_rt::test;
    agent_reconnects_after_gateway_restart_and_delivers_the_next_run,
    cached_config_is_used_when_the_gateway_is_down_at_start,
);
