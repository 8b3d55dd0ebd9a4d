//! StreamStatus validation and run reassembly over a real mTLS connection,
//! storing on both backends (validate-only mode has no database).

mod backend_support;
mod gateway_support;

use std::collections::{BTreeMap, BTreeSet};

use backend_support::Backend;
use gateway_support::*;
use serde_json::json;
use serviceradar_agent::gateway::{DatabaseLocation, GatewayEvent};
use serviceradar_agent::tls;
use tonic::Code;

const AGENT: &str = "agent-1";
const PARTITION: &str = "site-a";

/// A fresh database of `backend` for the PKI's gateway.
async fn database(backend: Backend, pki: &TestPki) -> DatabaseLocation {
    backend.fresh_database(pki.dir.path(), "gateway").await
}

fn run_completions(events: &[GatewayEvent]) -> Vec<(String, u64, u64)> {
    events
        .iter()
        .filter_map(|e| match e {
            GatewayEvent::RunComplete {
                run_id,
                devices,
                rejected,
                ..
            } => Some((run_id.clone(), *devices, *rejected)),
            _ => None,
        })
        .collect()
}

fn rejection(events: &[GatewayEvent]) -> Option<Code> {
    events.iter().find_map(|e| match e {
        GatewayEvent::StreamRejected { code, .. } => Some(*code),
        _ => None,
    })
}

async fn valid_multi_chunk_stream_stores_exactly_its_devices(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config_on(database(backend, &pki).await)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();

    let messages = run_chunks(AGENT, PARTITION, "run-1", 2500, 3, 1);
    send_stream(&mut client, stream_of(AGENT, messages))
        .await
        .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert_eq!(run_completions(&seen), vec![("run-1".to_owned(), 2500, 0)]);
    assert!(seen
        .iter()
        .any(|e| matches!(e, GatewayEvent::StreamAccepted { chunks: 3, .. })));

    let store = gw.store().expect("database mode");
    assert_eq!(store.device_count().await.unwrap(), 2500);
    let devices = store.devices().await.unwrap();
    let ips: BTreeSet<String> = devices.iter().filter_map(|d| d.ip.clone()).collect();
    let expected: BTreeSet<String> = (0..2500)
        .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
        .collect();
    assert_eq!(ips, expected);
    let first = &devices[0];
    assert_eq!(
        (first.partition.as_str(), first.source.as_str()),
        (PARTITION, "faker")
    );
    assert_eq!(first.agent_id, AGENT);
    assert_eq!(
        first.device_key,
        format!("faker-{}", first.ip.as_deref().unwrap())
    );
    assert_eq!(first.last_run_id, "run-1");
    assert!(
        first.metadata.get("agent_id").is_none(),
        "metadata.agent_id from an agent is dropped: {}",
        first.metadata
    );
    assert_eq!(
        first.metadata["integration_id"],
        format!("faker-{}", first.ip.as_deref().unwrap())
    );
    let runs = store.runs().await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(
        (runs[0].total_chunks, runs[0].devices, runs[0].total_devices),
        (3, 2500, 2500)
    );
    assert_eq!(store.staged_chunk_count().await.unwrap(), 0);

    let stats = gw.stats();
    assert_eq!(
        (
            stats.streams_ok,
            stats.chunks,
            stats.devices_received,
            stats.runs_completed
        ),
        (1, 3, 2500, 1)
    );
    gw.shutdown().await;
}

async fn sequence_violations_are_invalid_argument_and_leave_nothing(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config_on(database(backend, &pki).await)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();
    let messages = || run_chunks(AGENT, PARTITION, "run-x", 30, 3, 2);

    let mut gap = stream_of(AGENT, messages());
    gap.remove(1);
    let mut early_final = stream_of(AGENT, messages());
    early_final[1].is_final = true;
    let mut no_final = stream_of(AGENT, messages());
    no_final.pop();
    let mut changing_total = stream_of(AGENT, messages());
    changing_total[2].total_chunks = 4;
    let mut last_not_final = stream_of(AGENT, messages());
    last_not_final[2].is_final = false;

    for (name, chunks) in [
        ("gap", gap),
        ("early is_final", early_final),
        ("no final chunk", no_final),
        ("total_chunks changed", changing_total),
        ("last chunk without is_final", last_not_final),
        ("empty stream", Vec::new()),
    ] {
        let err = send_stream(&mut client, chunks).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        let seen = events_of_next_stream(&mut events).await;
        assert_eq!(rejection(&seen), Some(Code::InvalidArgument), "{name}");
        assert!(run_completions(&seen).is_empty(), "{name}");
        assert!(
            !seen
                .iter()
                .any(|e| matches!(e, GatewayEvent::ChunkStored { .. })),
            "{name}"
        );
    }
    let store = gw.store().unwrap();
    assert_eq!(store.device_count().await.unwrap(), 0);
    assert_eq!(store.staged_chunk_count().await.unwrap(), 0);

    // Identity mismatch inside the stream.
    let err = send_stream(&mut client, stream_of("agent-2", messages()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Limits.
    let mut too_many = envelope(AGENT, 0, 1, true, b"[]".to_vec());
    too_many.services = vec![too_many.services[0].clone(); 5001];
    let err = send_stream(&mut client, vec![too_many]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let big = envelope(AGENT, 0, 1, true, vec![b' '; 15 * 1024 * 1024 + 1]);
    let err = send_stream(&mut client, vec![big]).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // A results message that is not a JSON array.
    let err = send_stream(
        &mut client,
        vec![envelope(AGENT, 0, 1, true, b"{}".to_vec())],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(store.device_count().await.unwrap(), 0);
    assert_eq!(gw.stats().streams_ok, 0);
    gw.shutdown().await;
}

async fn retried_chunks_are_idempotent(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config_on(database(backend, &pki).await)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();
    let messages = run_chunks(AGENT, PARTITION, "run-r", 20, 2, 3);

    // Chunk 0 of the run, sent twice (e.g. the first answer was lost).
    for attempt in 0..2 {
        send_stream(&mut client, stream_of(AGENT, vec![messages[0].clone()]))
            .await
            .unwrap();
        let seen = events_of_next_stream(&mut events).await;
        let stored = seen
            .iter()
            .filter(|e| matches!(e, GatewayEvent::ChunkStored { .. }))
            .count();
        assert_eq!(
            stored,
            if attempt == 0 { 1 } else { 0 },
            "attempt {attempt}"
        );
        assert!(run_completions(&seen).is_empty());
    }
    // The whole run again: completes once, with each device once.
    send_stream(&mut client, stream_of(AGENT, messages.clone()))
        .await
        .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert_eq!(run_completions(&seen), vec![("run-r".to_owned(), 20, 0)]);
    // A replay of the completed run changes nothing.
    send_stream(&mut client, stream_of(AGENT, messages))
        .await
        .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert!(run_completions(&seen).is_empty());

    let store = gw.store().unwrap();
    assert_eq!(store.device_count().await.unwrap(), 20);
    assert_eq!(store.runs().await.unwrap().len(), 1);
    gw.shutdown().await;
}

async fn run_split_over_two_streams_completes_only_with_all_chunks(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config_on(database(backend, &pki).await)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();
    let mut messages = run_chunks(AGENT, PARTITION, "run-big", 3000, 3, 4);
    let last = messages.pop().unwrap();

    // Stream 1: run chunks 0 and 1 (envelope 0..2).
    send_stream(&mut client, stream_of(AGENT, messages))
        .await
        .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert!(run_completions(&seen).is_empty());
    let store = gw.store().unwrap();
    assert_eq!(
        store.device_count().await.unwrap(),
        0,
        "nothing partial is applied"
    );
    assert_eq!(store.staged_chunk_count().await.unwrap(), 2);

    // Stream 2: run chunk 2 (envelope 0..1, numbered on its own).
    send_stream(&mut client, stream_of(AGENT, vec![last]))
        .await
        .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert_eq!(
        run_completions(&seen),
        vec![("run-big".to_owned(), 3000, 0)]
    );
    assert_eq!(store.device_count().await.unwrap(), 3000);
    assert_eq!(store.staged_chunk_count().await.unwrap(), 0);
    gw.shutdown().await;
}

async fn bad_updates_are_rejected_and_counted(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let agents = BTreeMap::from([(
        AGENT.to_owned(),
        sources(json!({"Lab": {"type": "faker", "partition": "lab"}})),
    )]);
    let gw = start_with_agents_on(&pki, database(backend, &pki).await, agents).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();

    let mut no_ip = update(AGENT, PARTITION, "", "run-b", 0, 1, 6);
    no_ip["metadata"] = json!({});
    let message = json!([
        update(AGENT, PARTITION, "10.9.0.1", "run-b", 0, 1, 6),
        update(AGENT, "lab", "10.9.0.2", "run-b", 0, 1, 6), // partition set by a source: allowed
        update(AGENT, "elsewhere", "10.9.0.3", "run-b", 0, 1, 6), // foreign partition
        no_ip,
        42,
        "not an object",
    ]);
    send_stream(
        &mut client,
        stream_of(AGENT, vec![serde_json::to_vec(&message).unwrap()]),
    )
    .await
    .unwrap();
    let seen = events_of_next_stream(&mut events).await;
    assert_eq!(run_completions(&seen), vec![("run-b".to_owned(), 2, 2)]);

    let store = gw.store().unwrap();
    let partitions: Vec<String> = store
        .devices()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.partition)
        .collect();
    assert_eq!(partitions, vec!["lab".to_owned(), PARTITION.to_owned()]);
    let stats = gw.stats();
    assert_eq!((stats.devices_received, stats.devices_rejected), (2, 4));
    gw.shutdown().await;
}

// No database: nothing to run on two backends.
#[tokio::test]
async fn validate_only_mode_counts_and_stores_nothing() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    assert!(gw.store().is_none());
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent(AGENT, PARTITION))
        .await
        .unwrap();

    let mut messages = run_chunks(AGENT, PARTITION, "run-v", 1200, 2, 5);
    let last = messages.pop().unwrap();
    send_stream(&mut client, stream_of(AGENT, messages))
        .await
        .unwrap();
    assert!(run_completions(&events_of_next_stream(&mut events).await).is_empty());
    send_stream(&mut client, stream_of(AGENT, vec![last]))
        .await
        .unwrap();
    assert_eq!(
        run_completions(&events_of_next_stream(&mut events).await),
        vec![("run-v".to_owned(), 1200, 0)]
    );
    let stats = gw.stats();
    assert_eq!(
        (
            stats.streams_ok,
            stats.chunks,
            stats.devices_received,
            stats.runs_completed
        ),
        (2, 2, 1200, 1)
    );
    assert!(!pki.dir.path().join("gateway.db").exists());
    gw.shutdown().await;
}

on_both_backends!(
    valid_multi_chunk_stream_stores_exactly_its_devices,
    sequence_violations_are_invalid_argument_and_leave_nothing,
    retried_chunks_are_idempotent,
    run_split_over_two_streams_completes_only_with_all_chunks,
    bad_updates_are_rejected_and_counted,
);
