//! The durable spool, in process: a run staged while the gateway is away
//! waits on disk and is delivered once it is back; scheduled runs are skipped
//! meanwhile (counted, reported) while `sync.run_now` still runs; a spool over
//! its size limit drops its oldest whole run with a failed report; a restarted
//! agent replays what a previous one spooled.
//!
//! The gateway is stopped and started again on the same address and database
//! (as in tests/gateway_restart.rs); every wait is on an event.

mod common;

use common::*;
use serde_json::{json, Value};
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::{self, GatewayEvent, GatewayHandle};
use serviceradar_agent::messages::RunNow;

const DEVICES: u64 = 2_000;

/// A Faker source scheduled every `every`.
fn faker_every(every: &str) -> Value {
    let mut source = faker_source(DEVICES, 11);
    source["discovery_interval"] = json!(every);
    source
}

/// Starts a gateway and the agent, waits for the first run to complete,
/// then stops the gateway and waits until the agent noticed.
async fn first_run_then_outage(
    fx: &Fixture,
    agent_id: &str,
    sources: &[(&str, Value)],
) -> (
    std::net::SocketAddr,
    agent::AgentHandle,
    tokio::sync::broadcast::Receiver<AgentEvent>,
) {
    let gw = fx.gateway(sources).await;
    let addr = gw.local_addr();
    let mut gw_events = gw.subscribe();
    let agent =
        agent::start(fx.bootstrap(agent_id, &addr.to_string(), json!({}))).expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;
    gw.shutdown().await;
    wait_for(&mut events, "disconnect noticed", |e| {
        matches!(e, AgentEvent::GatewayDisconnected { .. }).then_some(())
    })
    .await;
    (addr, agent, events)
}

async fn restart_gateway(
    fx: &Fixture,
    addr: std::net::SocketAddr,
    sources: &[(&str, Value)],
) -> GatewayHandle {
    let mut config = fx.gateway_config(sources);
    config.listen = addr.to_string();
    gateway::start(config)
        .await
        .expect("gateway restarts on the same port")
}

/// The next run to enter the spool.
async fn wait_run_spooled(events: &mut tokio::sync::broadcast::Receiver<AgentEvent>) -> String {
    wait_for(events, "run spooled", |e| match e {
        AgentEvent::RunSpooled { run_id, .. } => Some(run_id.clone()),
        _ => None,
    })
    .await
}

#[actix_rt::test]
async fn an_outage_spools_the_run_skips_scheduled_runs_and_delivers_when_the_gateway_is_back() {
    let fx = Fixture::new(&["agent-spool"]);
    let sources = [("agent-spool", json!({"S": faker_every("300ms")}))];
    let (addr, agent, mut events) = first_run_then_outage(&fx, "agent-spool", &sources).await;

    // The next scheduled run is staged and spooled, not lost...
    let outage_run = wait_run_spooled(&mut events).await;
    // ...and the ones after it are skipped while it waits.
    for _ in 0..2 {
        let reason = wait_for(&mut events, "scheduled run skipped", |e| match e {
            AgentEvent::RunSkipped { source, reason } if source == "S" => Some(reason.clone()),
            _ => None,
        })
        .await;
        assert!(reason.contains("waiting for delivery"), "{reason}");
    }
    assert!(agent.context.telemetry.runs_skipped() >= 2);
    assert!(agent.context.spool.has_undelivered("S"));
    let spool_dir = agent.context.staging_dir();
    assert!(
        spooled_run_ids(&spool_dir).contains(&outage_run),
        "manifest of {outage_run} on disk"
    );

    // sync.run_now is never skipped: a second run joins the spool.
    let integration = agent.context.peers.integration("S").unwrap();
    assert_eq!(integration.send(RunNow).await.unwrap(), Ok(()));
    let manual_run = loop {
        // A scheduled tick may come first; skip events are not runs.
        let run = wait_run_spooled(&mut events).await;
        if run != outage_run {
            break run;
        }
    };

    let gw = restart_gateway(&fx, addr, &sources).await;
    let mut gw_events = gw.subscribe();
    // Both spooled runs arrive, in the order they were staged.
    let mut completed = Vec::new();
    while completed.len() < 2 {
        let run = wait_for(&mut gw_events, "spooled runs delivered", |e| match e {
            GatewayEvent::RunComplete {
                run_id, devices, ..
            } => Some((run_id.clone(), *devices)),
            _ => None,
        })
        .await;
        assert_eq!(run.1, DEVICES);
        if run.0 == outage_run || run.0 == manual_run {
            completed.push(run.0);
        }
    }
    assert_eq!(completed, [outage_run.clone(), manual_run.clone()]);
    // The skipped runs were reported as skipped, which is not a failure.
    let report = wait_for(&mut gw_events, "skip report", |e| match e {
        GatewayEvent::RunReport { result, report, .. } if result == "skipped" => {
            Some(report.clone())
        }
        _ => None,
    })
    .await;
    assert!(
        report["warning"]
            .as_str()
            .unwrap_or_default()
            .contains("waiting for delivery"),
        "{report}"
    );
    // Delivered runs leave the spool.
    wait_for(&mut events, "manual run reported", |e| match e {
        AgentEvent::RunReported {
            run_id, ok: true, ..
        } if run_id == &manual_run => Some(()),
        _ => None,
    })
    .await;
    let left = spooled_run_ids(&spool_dir);
    assert!(
        !left.contains(&outage_run) && !left.contains(&manual_run),
        "{left:?}"
    );
    assert_exactly_once(&gw, DEVICES, 11).await;
    agent.shutdown();
    gw.shutdown().await;
}

#[actix_rt::test]
async fn a_restarted_agent_replays_the_spool_and_drops_the_oldest_run_over_the_limit() {
    let fx = Fixture::new(&["agent-limit"]);
    let sources = [("agent-limit", json!({"L": faker_every("1h")}))];
    let (addr, agent, mut events) = first_run_then_outage(&fx, "agent-limit", &sources).await;
    let integration = agent.context.peers.integration("L").unwrap();
    assert_eq!(integration.send(RunNow).await.unwrap(), Ok(()));
    let old_run = wait_run_spooled(&mut events).await;
    let spool_dir = agent.context.staging_dir();
    assert!(agent.context.spool.has_undelivered("L"));
    let (_, run_bytes) = agent.context.spool.usage();
    assert!(run_bytes > 0);
    agent.shutdown();

    // A new agent process on the same state directory, whose spool holds
    // one run and a half.
    let extra = json!({"spool": {"max_bytes": run_bytes + run_bytes / 2}});
    let agent =
        agent::start(fx.bootstrap("agent-limit", &addr.to_string(), extra)).expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    assert!(
        agent.context.spool.has_undelivered("L"),
        "the old run was replayed into the queue"
    );
    assert!(spooled_run_ids(&spool_dir).contains(&old_run));
    // Its scheduled first run (from the cached config: the gateway is still
    // down) is skipped: the previous one is undelivered.
    wait_for(&mut events, "first scheduled run skipped", |e| match e {
        AgentEvent::RunSkipped { source, .. } if source == "L" => Some(()),
        _ => None,
    })
    .await;
    let integration = agent
        .context
        .peers
        .integration("L")
        .expect("source started");
    assert_eq!(integration.send(RunNow).await.unwrap(), Ok(()));
    let new_run = wait_run_spooled(&mut events).await;
    // Two runs do not fit: the oldest goes, whole.
    let (dropped, reason) = wait_for(&mut events, "oldest run dropped", |e| match e {
        AgentEvent::RunDropped { run_id, reason, .. } => Some((run_id.clone(), reason.clone())),
        _ => None,
    })
    .await;
    assert_eq!(dropped, old_run);
    assert!(reason.contains("spool.max_bytes"), "{reason}");
    assert_eq!(agent.context.telemetry.runs_dropped(), 1);
    assert!(!spooled_run_ids(&spool_dir).contains(&old_run));
    assert!(!spool_dir.join(format!("{old_run}.jsonl")).exists());

    let gw = restart_gateway(&fx, addr, &sources).await;
    let mut gw_events = gw.subscribe();
    let error = wait_for(
        &mut gw_events,
        "failed report of the dropped run",
        |e| match e {
            GatewayEvent::RunReport {
                run_id,
                result,
                error,
                ..
            } if run_id == &old_run => {
                assert_eq!(result, "failed");
                error.clone()
            }
            _ => None,
        },
    )
    .await;
    assert!(error.contains("spool.max_bytes"), "{error}");
    let delivered = wait_for(&mut gw_events, "new run delivered", |e| match e {
        GatewayEvent::RunComplete {
            run_id, devices, ..
        } => Some((run_id.clone(), *devices)),
        _ => None,
    })
    .await;
    assert_eq!(delivered, (new_run, DEVICES));
    assert_exactly_once(&gw, DEVICES, 11).await;
    agent.shutdown();
    gw.shutdown().await;
}
