//! Behaviours of single actors, observed through the real tree over mTLS:
//! heartbeats, one failed RPC not tearing down a healthy connection, never two
//! runs of a source at once, and the run deadline.

mod common;

use common::*;
use serde_json::json;
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::GatewayEvent;
use serviceradar_agent::messages::{RpcFailed, RunNow};

#[actix_rt::test]
async fn heartbeats_flow_and_a_failed_rpc_only_triggers_a_probe() {
    let fx = Fixture::new(&["agent-hb"]);
    let mut config = fx.gateway_config(&[("agent-hb", json!({}))]);
    config.heartbeat_interval_sec = 1; // the agent follows the gateway's interval
    let gw = serviceradar_agent::gateway::start(config).await.unwrap();
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-hb", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut events, "enrolled", |e| {
        matches!(e, AgentEvent::GatewayConnected { .. }).then_some(())
    })
    .await;
    wait_for(&mut gw_events, "periodic heartbeat", |e| match e {
        GatewayEvent::Heartbeat { agent_id } if agent_id == "agent-hb" => Some(()),
        _ => None,
    })
    .await;

    // Another actor reports a transport-class failure: the connection actor
    // probes with a heartbeat, which succeeds, and keeps the connection.
    let mut gw_events = gw.subscribe();
    let connection = agent.context.peers.gateway().unwrap();
    connection
        .send(RpcFailed {
            rpc: "StreamStatus",
            code: tonic::Code::Unavailable,
        })
        .await
        .unwrap();
    wait_for(&mut gw_events, "probe heartbeat", |e| {
        matches!(e, GatewayEvent::Heartbeat { .. }).then_some(())
    })
    .await;
    // A non-transport failure (the gateway refused something) is not even probed.
    connection
        .send(RpcFailed {
            rpc: "StreamStatus",
            code: tonic::Code::InvalidArgument,
        })
        .await
        .unwrap();
    wait_for(&mut gw_events, "next heartbeat", |e| {
        matches!(e, GatewayEvent::Heartbeat { .. }).then_some(())
    })
    .await;

    // No re-enrolment and no disconnect happened in between.
    let mut seen = Vec::new();
    while let Ok(e) = gw_events.try_recv() {
        seen.push(e);
    }
    assert!(
        !seen.iter().any(|e| matches!(e, GatewayEvent::Hello { .. })),
        "{seen:?}"
    );
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(
                e,
                AgentEvent::GatewayDisconnected { .. } | AgentEvent::GatewayConnected { .. }
            ),
            "{e:?}"
        );
    }
    assert!(agent.context.current_session().is_some());
    agent.shutdown();
    gw.shutdown().await;
}

#[actix_rt::test]
async fn a_source_never_runs_twice_at_once() {
    let fx = Fixture::new(&["agent-once"]);
    let gw = fx
        .gateway(&[("agent-once", json!({"Big": faker_source(30_000, 1)}))])
        .await;
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-once", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut events, "source started", |e| {
        matches!(e, AgentEvent::SourceStarted { .. }).then_some(())
    })
    .await;
    // The first run started with the actor and is still staging 30k devices.
    let integration = agent.context.peers.integration("Big").unwrap();
    let refused = integration.send(RunNow).await.unwrap();
    assert!(refused.unwrap_err().contains("still in progress"));
    let skipped = wait_for(&mut events, "RunSkipped", |e| match e {
        AgentEvent::RunSkipped { source, .. } => Some(source.clone()),
        _ => None,
    })
    .await;
    assert_eq!(skipped, "Big");
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;
    // Once the run is over, run_now is accepted again.
    wait_for(&mut events, "run reported", |e| {
        matches!(e, AgentEvent::RunReported { .. }).then_some(())
    })
    .await;
    assert_eq!(integration.send(RunNow).await.unwrap(), Ok(()));
    agent.shutdown();
    gw.shutdown().await;
}

#[actix_rt::test]
async fn a_run_past_its_deadline_is_reported_failed() {
    let fx = Fixture::new(&["agent-late"]);
    let gw = fx
        .gateway(&[("agent-late", json!({"Slow": faker_source(200_000, 1)}))])
        .await;
    let mut gw_events = gw.subscribe();
    let extra = json!({"gateway_policy": {"reconnect_base": "50ms", "reconnect_cap": "1s", "run_deadline": "1ms"}});
    let agent = agent::start(fx.bootstrap("agent-late", &gw.local_addr().to_string(), extra))
        .expect("agent starts");
    let error = wait_for(&mut gw_events, "failed run report", |e| match e {
        GatewayEvent::RunReport {
            source,
            result,
            error,
            ..
        } if source == "Slow" => {
            assert_eq!(result, "failed");
            error.clone()
        }
        _ => None,
    })
    .await;
    assert!(error.contains("deadline"), "{error}");
    // Nothing of the abandoned run was delivered.
    assert_eq!(gw.store().unwrap().device_count().await.unwrap(), 0);
    agent.shutdown();
    gw.shutdown().await;
}

/// An agent whose certificate comes from another CA is refused at the TLS
/// handshake; it says so and keeps retrying without ever enrolling.
#[actix_rt::test]
async fn an_agent_with_a_foreign_certificate_never_enrols() {
    let fx = Fixture::new(&["agent-legit"]);
    let foreign = Fixture::new(&["agent-foreign"]);
    let gw = fx
        .gateway(&[("agent-foreign", json!({"S": faker_source(10, 1)}))])
        .await;
    let mut gw_events = gw.subscribe();
    // The foreign agent trusts the real CA (so it can verify the gateway) but
    // presents a certificate the gateway's CA never issued.
    let mut bootstrap = foreign.bootstrap("agent-foreign", &gw.local_addr().to_string(), json!({}));
    if let serviceradar_agent::config::bootstrap::Security::Mtls { files, .. } =
        &mut bootstrap.security
    {
        files.ca_file = fx.pki.ca_cert();
    }
    let agent = agent::start(bootstrap).expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    for attempt in 0..2 {
        let reason = wait_for(&mut events, "refused connection", |e| match e {
            AgentEvent::GatewayDisconnected { reason } => Some(reason.clone()),
            AgentEvent::GatewayConnected { .. } => panic!("a foreign certificate enrolled"),
            _ => None,
        })
        .await;
        assert!(!reason.is_empty(), "attempt {attempt}");
    }
    while let Ok(e) = gw_events.try_recv() {
        assert!(!matches!(e, GatewayEvent::Hello { .. }), "{e:?}");
    }
    agent.shutdown();
    gw.shutdown().await;
}

/// A source runs again on its interval without being asked.
#[actix_rt::test]
async fn a_source_runs_again_on_its_interval() {
    let fx = Fixture::new(&["agent-tick"]);
    let source = json!({"type": "faker", "credentials": {"total_devices": "30"}, "discovery_interval": "200ms"});
    let gw = fx
        .gateway(&[("agent-tick", json!({"Ticking": source}))])
        .await;
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-tick", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut runs = std::collections::BTreeSet::new();
    while runs.len() < 3 {
        let run = wait_for(&mut gw_events, "scheduled run", |e| match e {
            GatewayEvent::RunComplete {
                run_id, devices, ..
            } => {
                assert_eq!(*devices, 30);
                Some(run_id.clone())
            }
            _ => None,
        })
        .await;
        runs.insert(run);
    }
    agent.shutdown();
    gw.shutdown().await;
}

/// A run with more than 5000 chunks goes out as several StreamStatus calls,
/// each valid on its own, and the gateway reassembles the whole run.
#[actix_rt::test]
async fn a_run_of_more_than_5000_chunks_is_split_into_streams() {
    let fx = Fixture::new(&["agent-split"]);
    let gw = fx
        .gateway(&[("agent-split", json!({"Many": faker_source(5_200, 2)}))])
        .await;
    let mut gw_events = gw.subscribe();
    let extra = json!({"gateway_policy": {"reconnect_base": "50ms", "reconnect_cap": "1s", "chunk_max_updates": 1}});
    let agent = agent::start(fx.bootstrap("agent-split", &gw.local_addr().to_string(), extra))
        .expect("agent starts");
    let mut streams = Vec::new();
    let devices = wait_for(&mut gw_events, "run complete", |e| match e {
        GatewayEvent::StreamAccepted { chunks, .. } => {
            streams.push(*chunks);
            None
        }
        GatewayEvent::RunComplete { devices, .. } => Some(*devices),
        _ => None,
    })
    .await;
    assert_eq!(devices, 5_200);
    // The gateway reports the run before the stream that completed it.
    while streams.iter().sum::<u32>() < 5_200 {
        let chunks = wait_for(&mut gw_events, "last stream accepted", |e| match e {
            GatewayEvent::StreamAccepted { chunks, .. } => Some(*chunks),
            _ => None,
        })
        .await;
        streams.push(chunks);
    }
    assert_eq!(streams, vec![5_000, 200]);
    assert_eq!(gw.store().unwrap().device_count().await.unwrap(), 5_200);
    agent.shutdown();
    gw.shutdown().await;
}
