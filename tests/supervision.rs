//! Supervision: every child type, stopped or panicking, is restarted after a
//! backoff that grows; the agent keeps working afterwards; a restart storm
//! ends the process with a non-zero exit code.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use serviceradar_agent::actors::supervisor::EXIT_RESTART_INTENSITY;
use serviceradar_agent::actors::telemetry::AgentEvent;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::GatewayEvent;
use serviceradar_agent::messages::{ChildId, FaultKind, GetChildren, InjectChildFault};

#[actix_rt::test]
async fn every_child_restarts_with_backoff_after_stop_and_panic() {
    let fx = Fixture::new(&["agent-sup"]);
    let gw = fx
        .gateway(&[("agent-sup", json!({"S": faker_source(50, 1)}))])
        .await;
    let mut gw_events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-sup", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;

    let children = [
        ChildId::Gateway,
        ChildId::Config,
        ChildId::Uploader,
        ChildId::Source("S".into()),
    ];
    for child in &children {
        let mut last_delay = Duration::ZERO;
        for fault in [FaultKind::Stop, FaultKind::Panic] {
            let mut gw_events = gw.subscribe();
            let before = agent.supervisor.send(GetChildren).await.unwrap()[child].generation;
            let injected = agent
                .supervisor
                .send(InjectChildFault {
                    child: child.clone(),
                    fault,
                })
                .await
                .unwrap();
            assert!(injected, "{child} should be running before {fault:?}");
            let panicked = wait_for(&mut events, "ChildFailed", |e| match e {
                AgentEvent::ChildFailed {
                    child: c, panicked, ..
                } if c == child => Some(*panicked),
                _ => None,
            })
            .await;
            assert_eq!(panicked, fault == FaultKind::Panic, "{child} {fault:?}");
            let delay = wait_for(&mut events, "ChildRestartScheduled", |e| match e {
                AgentEvent::ChildRestartScheduled {
                    child: c, delay, ..
                } if c == child => Some(*delay),
                _ => None,
            })
            .await;
            // Backoff: at least the base (20 ms), growing with each restart in the window.
            assert!(delay >= Duration::from_millis(20), "{child}: {delay:?}");
            assert!(
                delay > last_delay,
                "{child}: backoff did not grow: {last_delay:?} then {delay:?}"
            );
            last_delay = delay;
            let generation = wait_for(&mut events, "ChildStarted", |e| match e {
                AgentEvent::ChildStarted {
                    child: c,
                    generation,
                } if c == child => Some(*generation),
                _ => None,
            })
            .await;
            assert_eq!(generation, before + 1, "{child}");
            if *child == ChildId::Config {
                // The new config actor reopens the ControlStream.
                wait_for(&mut gw_events, "ControlStream reopened", |e| {
                    matches!(e, GatewayEvent::ControlStreamOpened { .. }).then_some(())
                })
                .await;
            }
        }
    }
    let stats = agent.context.telemetry.children();
    for child in &children {
        let s = &stats[child];
        assert_eq!(
            (s.restarts, s.panics, s.failures),
            (2, 1, 2),
            "{child}: {s:?}"
        );
    }

    // The tree still works: a run requested through the reopened
    // ControlStream is delivered by the restarted uploader.
    let mut gw_events = gw.subscribe();
    gw.send_command("agent-sup", "sync.run_now", json!({"source": "S"}))
        .unwrap();
    let devices = wait_for(&mut gw_events, "run after restarts", |e| match e {
        GatewayEvent::RunComplete { devices, .. } => Some(*devices),
        _ => None,
    })
    .await;
    assert_eq!(devices, 50);

    agent.shutdown();
    gw.shutdown().await;
}

/// A child that can never start (a failpoint refuses every uploader start)
/// makes the real binary exit with the restart-intensity code and say why.
#[test]
fn restart_storm_exits_non_zero() {
    let fx = Fixture::new(&["agent-storm"]);
    let bootstrap = fx.bootstrap_file(
        "agent-storm",
        "127.0.0.1:9",
        json!({
            "restart_policy": {"backoff_base": "5ms", "backoff_cap": "20ms", "max_restarts": 3, "window": "1m"}
        }),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_serviceradar-agent"))
        .arg("--config")
        .arg(&bootstrap)
        .env("LOG_LEVEL", "info")
        .env("FAILPOINTS", "uploader-start=return")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let log: Vec<String> = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = tx.send(log);
    });
    let log = rx.recv_timeout(DEADLINE).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("agent did not exit within {DEADLINE:?} during a restart storm");
    });
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(EXIT_RESTART_INTENSITY),
        "log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter()
            .any(|l| l.contains("restart intensity exceeded") && l.contains("chunk-uploader")),
        "log:\n{}",
        log.join("\n")
    );
}

/// A run that finishes while the chunk uploader is being restarted is kept
/// and delivered by the new uploader, not lost with the old one.
#[actix_rt::test]
async fn a_run_finished_during_an_uploader_restart_is_delivered() {
    let fx = Fixture::new(&["agent-handover"]);
    let gw = fx
        .gateway(&[("agent-handover", json!({"S": faker_source(40, 1)}))])
        .await;
    let mut gw_events = gw.subscribe();
    // A long restart delay keeps the uploader down while the run stages.
    let extra = json!({"restart_policy": {"backoff_base": "2s", "backoff_cap": "4s", "max_restarts": 5, "window": "1m"}});
    let agent = agent::start(fx.bootstrap("agent-handover", &gw.local_addr().to_string(), extra))
        .expect("agent starts");
    let mut events = agent.context.telemetry.subscribe();
    wait_for(&mut gw_events, "first run", |e| {
        matches!(e, GatewayEvent::RunComplete { .. }).then_some(())
    })
    .await;

    let fault = InjectChildFault {
        child: ChildId::Uploader,
        fault: FaultKind::Stop,
    };
    assert!(agent.supervisor.send(fault).await.unwrap());
    wait_for(&mut events, "uploader down", |e| match e {
        AgentEvent::ChildFailed {
            child: ChildId::Uploader,
            ..
        } => Some(()),
        _ => None,
    })
    .await;
    let integration = agent.context.peers.integration("S").unwrap();
    integration
        .send(serviceradar_agent::messages::RunNow)
        .await
        .unwrap()
        .unwrap();
    let staged_first = wait_for(&mut events, "staged or uploader back", |e| match e {
        AgentEvent::RunStaged { .. } => Some(true),
        AgentEvent::ChildStarted {
            child: ChildId::Uploader,
            ..
        } => Some(false),
        _ => None,
    })
    .await;
    assert!(
        staged_first,
        "the run should be staged while the uploader is down"
    );
    let devices = wait_for(
        &mut gw_events,
        "run delivered by the new uploader",
        |e| match e {
            GatewayEvent::RunComplete { devices, .. } => Some(*devices),
            _ => None,
        },
    )
    .await;
    assert_eq!(devices, 40);
    agent.shutdown();
    gw.shutdown().await;
}
