//! Chaos on the agent ↔ gateway link (issue 6): the real agent binary talks
//! to an in-process gateway through a TCP fault proxy
//! (`common::fault_proxy`) that blackholes, resets, cuts or delays the link
//! in the middle of a Faker run. Whatever happens, the gateway ends up with
//! every generated device exactly once, the agent is still running, and its
//! peak RSS (VmHWM) stays bounded.
//!
//! The first tests check the proxy itself against an echo server.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fault_proxy::{FaultProxy, Mode};
use common::*;
use serde_json::json;
use serviceradar_agent::gateway::GatewayHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

// ---------------------------------------------------------------------------
// The proxy itself, against an echo server.
// ---------------------------------------------------------------------------

/// What a test server received: bytes (all connections) and connections
/// that ended (EOF or error).
#[derive(Clone, Copy, Debug, Default)]
struct Received {
    bytes: u64,
    ended: u64,
}

/// A server that echoes (or, with `echo` false, only reads) and reports
/// what it received.
async fn test_server(echo: bool) -> (SocketAddr, watch::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(Received::default());
    let tx = Arc::new(tx);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tx.send_modify(|r| r.bytes += n as u64);
                            if echo && socket.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                tx.send_modify(|r| r.ended += 1);
            });
        }
    });
    (addr, rx)
}

async fn echo_server() -> (SocketAddr, watch::Receiver<Received>) {
    test_server(true).await
}

/// Sends `data` and reads the same number of bytes back.
async fn round_trip(socket: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    socket.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    within("echo", socket.read_exact(&mut back)).await.unwrap();
    back
}

#[tokio::test]
async fn proxy_passes_bytes_and_counts_them() {
    let (echo, received) = echo_server().await;
    let proxy = FaultProxy::start(echo).await;
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.wait_connections(1).await;
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    assert_eq!(round_trip(&mut socket, &data).await, data);
    let c = proxy
        .wait_until("counters", |c| c.bytes_down >= 200_000)
        .await;
    assert_eq!(
        (c.accepted, c.open, c.bytes_up, c.bytes_down),
        (1, 1, 200_000, 200_000)
    );
    assert_eq!(received.borrow().bytes, 200_000);
    drop(socket);
    proxy.wait_until("connection closed", |c| c.open == 0).await;
}

#[tokio::test]
async fn proxy_latency_delays_each_direction() {
    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo).await;
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"warm").await, b"warm");
    proxy.latency(Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(round_trip(&mut socket, b"slow").await, b"slow");
    // Up and down are each delayed by 150 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // Latency is not a bandwidth cap: 4 MB still crosses in a few round trips.
    let big = vec![7u8; 4 << 20];
    let started = Instant::now();
    let (mut r, mut w) = socket.split();
    let (_, back) = tokio::join!(async { w.write_all(&big).await.unwrap() }, async {
        let mut back = vec![0u8; big.len()];
        r.read_exact(&mut back).await.unwrap();
        back
    });
    assert_eq!(back, big);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn proxy_blackhole_holds_traffic_and_new_connections_until_it_heals() {
    let (echo, received) = echo_server().await;
    let proxy = FaultProxy::start(echo).await;
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"before").await, b"before");
    proxy.blackhole();
    socket.write_all(b"during").await.unwrap();
    let mut newcomer = TcpStream::connect(proxy.addr()).await.unwrap();
    newcomer.write_all(b"newcomer").await.unwrap();
    proxy.wait_connections(2).await;
    // Proving an absence takes a bounded wait: nothing comes back in 300 ms.
    let mut buf = [0u8; 16];
    let nothing = tokio::time::timeout(Duration::from_millis(300), socket.read(&mut buf)).await;
    assert!(
        nothing.is_err(),
        "blackhole forwarded something: {nothing:?}"
    );
    assert_eq!(
        received.borrow().bytes,
        6,
        "only `before` reached the server"
    );
    assert_eq!(proxy.counters().bytes_up, 6);
    // Healed: the held bytes go through, on both connections.
    proxy.pass();
    let mut back = [0u8; 6];
    within("held bytes", socket.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"during");
    let mut back = [0u8; 8];
    within("newcomer", newcomer.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"newcomer");
}

/// A read on a connection the proxy reset fails with ECONNRESET.
async fn assert_reset(socket: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let read = within("reset", socket.read(&mut buf)).await;
    let kind = read.as_ref().map_err(|e| e.kind());
    assert_eq!(kind, Err(std::io::ErrorKind::ConnectionReset), "{read:?}");
}

#[tokio::test]
async fn proxy_reset_sends_rst_to_open_and_new_connections() {
    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo).await;
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"hi").await, b"hi");
    proxy.reset();
    proxy.wait_resets(1).await;
    assert_reset(&mut socket).await;
    let mut newcomer = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.wait_resets(2).await;
    assert_reset(&mut newcomer).await;
    // Back to pass: new connections work again.
    proxy.pass();
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut socket, b"again").await, b"again");
    assert_eq!(proxy.counters().resets, 2);
    // The helper resets what is open, once, and passes again.
    assert_eq!(proxy.reset_open_connections().await, 1);
    assert_reset(&mut socket).await;
    assert_eq!(proxy.mode(), Mode::Pass);
}

#[tokio::test]
async fn proxy_close_after_cuts_each_connection_after_n_bytes_upstream() {
    // A server that only reads: the proxy's cut is then a clean FIN (a
    // socket closed with unread data would send RST and lose bytes).
    let (sink, mut received) = test_server(false).await;
    let proxy = FaultProxy::start(sink).await;
    proxy.close_after(1000);
    for k in 1..=2u64 {
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        // The write may fail once the proxy closed; what matters is what passed.
        let _ = socket.write_all(&[1u8; 5000]).await;
        proxy
            .wait_until("close", |c| c.closes >= k && c.open == 0)
            .await;
        // The client sees the connection end.
        let mut rest = Vec::new();
        let _ = within("EOF", socket.read_to_end(&mut rest)).await;
        assert!(rest.is_empty(), "{}", rest.len());
        let r = *within("server saw the end", received.wait_for(|r| r.ended >= k))
            .await
            .unwrap();
        assert_eq!(r.bytes, 1000 * k, "exactly 1000 bytes a connection");
    }
    let c = proxy.counters();
    assert_eq!((c.closes, c.bytes_up), (2, 2000));
}

// ---------------------------------------------------------------------------
// The agent through the proxy.
// ---------------------------------------------------------------------------

const AGENT: &str = "agent-chaos";
const SOURCE: &str = "Chaos Faker";

/// Devices of the network scenarios: 100,000 at 16 a chunk is 6,250 chunks
/// (≈ 85 MB of StreamStatus traffic), two StreamStatus calls (5,000 +
/// 1,250 chunks), so a fault can hit the second stream after the first was
/// accepted, and the retry resends chunks the gateway already holds.
const DEVICES: u64 = 100_000;
const CHUNK_UPDATES: usize = 16;
const CHUNKS: u64 = DEVICES.div_ceil(CHUNK_UPDATES as u64);
/// Chunks of the second StreamStatus call (the first carries 5,000).
const SECOND_STREAM_CHUNKS: u64 = CHUNKS - 5000;
const MB: u64 = 1_000_000;

/// Upper bound of the agent's peak RSS (VmHWM) in every scenario. Measured
/// (debug build, 2-core VM): 16–17.5 MiB without faults
/// (`baseline_without_faults`), 16.5–18 MiB through outage, resets and
/// gateway restart, 21–22 MiB for the latency run (1000-update chunks).
/// The bound is ≈ 3.5× the baseline: room for allocator noise, while the
/// run (≈ 85 MB on the wire) or chunks piling up across retries would
/// cross it.
const MAX_AGENT_HWM_KIB: u64 = 64 * 1024;

struct Setup {
    devices: u64,
    seed: u64,
    chunk_updates: usize,
    /// The proxy's mode from the agent's first connection on.
    mode: Mode,
    /// The gateway's Hello answer (the agent heartbeats this often).
    heartbeat_interval_sec: i32,
    /// `gateway_policy.rpc_timeout` (deadline of unary RPCs, heartbeats).
    rpc_timeout: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            devices: DEVICES,
            seed: 1,
            chunk_updates: CHUNK_UPDATES,
            mode: Mode::Pass,
            heartbeat_interval_sec: 30,
            rpc_timeout: "30s",
        }
    }
}

/// One agent process, its gateway and the proxy between them.
/// Fields drop in order: the agent is killed first, the directory goes last.
struct Rig {
    agent: AgentProcess,
    proxy: FaultProxy,
    /// `None` while the gateway is stopped.
    gw: Option<GatewayHandle>,
    log: watch::Receiver<GatewayLog>,
    setup: Setup,
    started: Instant,
    fx: Fixture,
}

impl Rig {
    /// A gateway assigning one Faker source, a proxy in front of it, and the
    /// agent binary dialling the proxy.
    async fn start(setup: Setup) -> Rig {
        let fx = Fixture::new(&[AGENT]);
        let gw = start_gateway(&fx, &setup).await;
        let log = record_gateway(&gw);
        let proxy = FaultProxy::start(gw.local_addr()).await;
        proxy.set_mode(setup.mode);
        let bootstrap = fx.bootstrap_file(
            AGENT,
            &proxy.addr().to_string(),
            json!({"gateway_policy": {"reconnect_base": "50ms", "reconnect_cap": "1s",
                "rpc_timeout": setup.rpc_timeout, "chunk_max_updates": setup.chunk_updates}}),
        );
        let agent = AgentProcess::start(&bootstrap, fx.path().join("agent.log"));
        Rig {
            fx,
            setup,
            gw: Some(gw),
            log,
            proxy,
            agent,
            started: Instant::now(),
        }
    }

    fn gw(&self) -> &GatewayHandle {
        self.gw.as_ref().expect("the gateway is running")
    }

    async fn wait_log(&mut self, what: &str, pred: impl FnMut(&GatewayLog) -> bool) -> GatewayLog {
        wait_log(&mut self.log, what, pred, || {
            format!(
                "proxy: {:?}\nagent log tail:\n{}",
                self.proxy.counters(),
                self.agent.log_tail(40)
            )
        })
        .await
    }

    /// Waits until the agent sent `n` more bytes than now.
    async fn wait_more_bytes_up(&self, n: u64) {
        let from = self.proxy.counters().bytes_up;
        self.proxy.wait_bytes_up(from + n).await;
    }

    fn assert_no_run_complete_yet(&self, when: &str) {
        let runs = self.log.borrow().runs.clone();
        assert!(
            runs.is_empty(),
            "the run completed before {when}: the fault would not be mid-run ({runs:?})"
        );
    }

    /// Resets (RST) every open connection of the agent, mid-run.
    ///
    /// Whether a reset hit a stream in flight is not visible at the gateway
    /// (hyper drops the handler of a stream whose connection died, so the
    /// gateway discards the stream without a `StreamRejected` event); the
    /// scenarios place resets by bytes instead: a StreamStatus stream of
    /// 5,000 chunks is ≈ 68 MB here and the second one ≈ 17 MB, so a reset
    /// 15 MB into an attempt, or 5 MB after the first stream was accepted,
    /// is mid-stream.
    async fn reset_mid_run(&mut self) {
        self.assert_no_run_complete_yet("a reset");
        let reset = self.proxy.reset_open_connections().await;
        assert!(reset >= 1, "no connection to reset");
    }

    async fn stop_gateway(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await;
        }
    }

    /// Starts the gateway again on the same database: a new port, which the
    /// proxy hides from the agent.
    async fn restart_gateway(&mut self) {
        let gw = start_gateway(&self.fx, &self.setup).await;
        self.log = record_gateway(&gw);
        self.proxy.set_target(gw.local_addr());
        self.gw = Some(gw);
    }

    /// Waits for the run to complete at the gateway and for its report, then
    /// checks: one run, every device once (per-source rows, canonical
    /// devices, runs table), a success report, the agent alive. Returns the
    /// agent's VmHWM in KiB.
    async fn assert_delivered_once(&mut self) -> u64 {
        let (devices, seed) = (self.setup.devices, self.setup.seed);
        let log = self
            .wait_log("run complete and reported", |l| {
                !l.runs.is_empty() && !l.reports.is_empty()
            })
            .await;
        let (run_id, count) = log.runs[0].clone();
        assert_eq!(log.runs.len(), 1, "one run completed: {:?}", log.runs);
        assert_eq!(count, devices, "devices applied by the completed run");
        let report = &log.reports[0];
        assert_eq!(report["result"], "success", "{report}");
        assert_eq!(report["run_id"], run_id.as_str(), "{report}");
        assert_eq!(report["device_count"], devices, "{report}");

        let store = self.gw().store().expect("store");
        let rows = store.devices().await.unwrap();
        assert_eq!(rows.len() as u64, devices, "per-source device rows");
        let stored: BTreeSet<_> = rows
            .iter()
            .map(|r| {
                assert_eq!(r.agent_id, AGENT);
                assert_eq!(r.last_run_id, run_id);
                device_tuple(r)
            })
            .collect();
        assert!(
            stored == expected_devices(devices, seed),
            "stored devices differ from the generated ones"
        );
        assert_eq!(
            store.canonical_device_count().await.unwrap(),
            devices,
            "canonical devices"
        );
        let runs = store.runs().await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(
            (runs[0].devices, runs[0].rejected),
            (devices, 0),
            "{runs:?}"
        );

        assert!(
            self.agent.alive(),
            "agent exited; log tail:\n{}",
            self.agent.log_tail(40)
        );
        self.agent.vm_hwm_kib()
    }

    /// Prints the scenario's figures and checks the memory bound.
    fn finish(&self, name: &str, hwm_kib: u64) {
        let c = self.proxy.counters();
        let l = self.log.borrow().clone();
        eprintln!(
            "[{name}] {} devices delivered once in {:.1?}; agent VmHWM {:.1} MiB; proxy: {} connections, \
             {:.1} MB up, {:.1} MB down, {} resets, {} closes, {} upstream failures; gateway (since its \
             last start): {} Hellos, {} streams accepted, {} rejected, {} chunks stored",
            self.setup.devices,
            self.started.elapsed(),
            hwm_kib as f64 / 1024.0,
            c.accepted,
            c.bytes_up as f64 / 1e6,
            c.bytes_down as f64 / 1e6,
            c.resets,
            c.closes,
            c.upstream_failures,
            l.hellos,
            l.streams_accepted,
            l.streams_rejected.len(),
            l.chunks_stored,
        );
        let log = std::fs::read_to_string(&self.agent.log).unwrap_or_default();
        let interesting = [
            "enrolled",
            "run staged",
            "run delivered",
            "unavailable",
            "upload failed",
        ];
        for line in log
            .lines()
            .filter(|l| interesting.iter().any(|k| l.contains(k)))
        {
            eprintln!("[{name}]   agent: {line}");
        }
        assert!(
            hwm_kib < MAX_AGENT_HWM_KIB,
            "[{name}] agent VmHWM {hwm_kib} KiB ≥ bound {MAX_AGENT_HWM_KIB} KiB"
        );
    }
}

async fn start_gateway(fx: &Fixture, setup: &Setup) -> GatewayHandle {
    let mut config = fx.gateway_config(&[(
        AGENT,
        json!({ SOURCE: faker_source(setup.devices, setup.seed) }),
    )]);
    config.heartbeat_interval_sec = setup.heartbeat_interval_sec;
    serviceradar_agent::gateway::start(config)
        .await
        .expect("gateway starts")
}

/// The control: the same run with the proxy passing everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_faults() {
    let mut rig = Rig::start(Setup {
        seed: 21,
        ..Setup::default()
    })
    .await;
    let hwm = rig.assert_delivered_once().await;
    rig.finish("baseline", hwm);
}

/// Scenario 2: the gateway unreachable for 30 s in the middle of the
/// upload. The link is blackholed (a silent partition: the open connection
/// stalls, new ones hang), then heals. The agent notices (heartbeats every
/// 5 s with a 5 s deadline) and keeps trying to reconnect; afterwards the
/// run is delivered once. (Observed today: the stalled StreamStatus resumes
/// on its own connection once the link heals, since HTTP/2 keepalive, 30 s
/// + 10 s, does not fire within the outage, so nothing is resent; the
/// reconnect attempts made during the outage hang until their deadline.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_unreachable_for_30s_mid_upload() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let mut rig = Rig::start(Setup {
        seed: 22,
        heartbeat_interval_sec: 5,
        rpc_timeout: "5s",
        ..Setup::default()
    })
    .await;
    // Mid-upload: a quarter of the run's ≈ 85 MB went through.
    rig.proxy.wait_bytes_up(20 * MB).await;
    rig.assert_no_run_complete_yet("the outage");
    rig.proxy.blackhole();
    let before = rig.proxy.counters();
    // The outage itself (the scenario), not a synchronisation.
    tokio::time::sleep(OUTAGE).await;
    let during = rig.proxy.counters();
    rig.assert_no_run_complete_yet("the end of the outage");
    rig.proxy.pass();
    let healed = Instant::now();
    // At most the read in flight when the partition began got through.
    assert!(
        during.bytes_up - before.bytes_up <= 64 * 1024,
        "{before:?} → {during:?}"
    );
    assert!(
        during.accepted > before.accepted,
        "the agent never tried to reconnect during the outage: {during:?}"
    );
    let hwm = rig.assert_delivered_once().await;
    eprintln!(
        "[outage] {OUTAGE:?} blackhole after {:.1} MB; {} reconnect attempts during it; \
         run complete {:.1?} after the link healed",
        before.bytes_up as f64 / 1e6,
        during.accepted - before.accepted,
        healed.elapsed()
    );
    rig.finish("outage", hwm);
}

/// Scenario 2, second form: the gateway itself stops in the middle of the
/// run's second stream (after the first was accepted), the agent meets
/// refused connections, and the gateway comes back on the same database.
/// The gateway must store each chunk once: the first stream's chunks,
/// staged before the stop, survive it (today's agent resends them too, as
/// duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_stopped_mid_run_and_restarted() {
    let mut rig = Rig::start(Setup {
        seed: 24,
        ..Setup::default()
    })
    .await;
    rig.wait_log("first stream accepted", |l| l.streams_accepted >= 1)
        .await;
    rig.wait_more_bytes_up(5 * MB).await;
    // The stop cuts the connection (RST) mid-stream, and the gateway goes.
    rig.assert_no_run_complete_yet("the stop");
    rig.proxy.reset();
    rig.proxy
        .wait_until("connections reset", |c| c.resets >= 1 && c.open == 0)
        .await;
    rig.stop_gateway().await;
    rig.proxy.pass();
    let stopped = Instant::now();
    // The agent keeps dialling a gateway that is not there.
    rig.proxy
        .wait_until("3 refused reconnects", |c| c.upstream_failures >= 3)
        .await;
    let down_for = stopped.elapsed();
    rig.restart_gateway().await;
    let hwm = rig.assert_delivered_once().await;
    // The first stream's chunks, staged before the stop, survived it: the
    // restarted gateway stored only the second stream's chunks as new
    // (today's agent resends the first stream too: duplicates).
    let log = rig.log.borrow().clone();
    assert_eq!(log.chunks_stored, SECOND_STREAM_CHUNKS, "{log:?}");
    eprintln!(
        "[gateway stop] gateway down {down_for:.1?} ({} refused connections)",
        rig.proxy.counters().upstream_failures
    );
    rig.finish("gateway stop", hwm);
}

/// Scenario 3: the connection is reset (RST) mid-stream five times: three
/// times 15 MB into the first stream of an attempt, once in the second
/// stream (after the first was accepted), once 15 MB into the attempt after
/// that; then cut twice more with a plain close (FIN) 15 MB into a
/// connection. Every device arrives once; every chunk is new to the
/// gateway once, however often it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_stream_repeatedly() {
    let mut rig = Rig::start(Setup {
        seed: 23,
        ..Setup::default()
    })
    .await;
    // Three resets in the first stream: 15 MB into each attempt.
    for _ in 0..3 {
        rig.wait_more_bytes_up(15 * MB).await;
        rig.reset_mid_run().await;
    }
    // One in the second stream: 5 MB after the first stream was accepted
    // (the gateway then holds the first stream's chunks).
    rig.wait_log("first stream accepted", |l| l.streams_accepted >= 1)
        .await;
    rig.wait_more_bytes_up(5 * MB).await;
    rig.reset_mid_run().await;
    // One 15 MB into the next attempt: today's agent resends a run from its
    // first chunk, so that is the first stream again, whose chunks the
    // gateway already holds (an agent resuming at the second stream would
    // be cut in the second stream: mid-stream either way).
    rig.wait_more_bytes_up(15 * MB).await;
    rig.reset_mid_run().await;
    // Two graceful cuts (FIN), each 15 MB into a connection's first stream.
    rig.proxy.close_after(15 * MB);
    rig.proxy
        .wait_until("2 connections cut", |c| c.closes >= 2)
        .await;
    rig.assert_no_run_complete_yet("the last cut");
    rig.proxy.pass();
    let hwm = rig.assert_delivered_once().await;
    let c = rig.proxy.counters();
    assert!(c.resets >= 5 && c.closes == 2, "{c:?}");
    // Every chunk was new to the gateway exactly once, however many times
    // it was sent.
    let log = rig.log.borrow().clone();
    assert_eq!(log.chunks_stored, CHUNKS, "{log:?}");
    rig.finish("resets", hwm);
}

/// Latency: 100 ms each way (200 ms round trips) on every byte, for the
/// whole run. Slower, still delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_latency_link_still_delivers() {
    let mut rig = Rig::start(Setup {
        devices: 50_000,
        seed: 25,
        chunk_updates: 1000,
        mode: Mode::Latency(Duration::from_millis(100)),
        ..Setup::default()
    })
    .await;
    let hwm = rig.assert_delivered_once().await;
    rig.finish("latency", hwm);
}
