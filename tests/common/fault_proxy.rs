//! A TCP fault proxy for chaos tests: listens on 127.0.0.1:0, forwards every
//! connection to a target address, and misbehaves on demand. The test drives
//! it at run time through [`FaultProxy`]:
//!
//! | mode | existing connections | new connections |
//! |---|---|---|
//! | `Pass` | forwarded | forwarded |
//! | `Latency(d)` | every read delivered `d` later (pipelined: latency, not a bandwidth cap) | same |
//! | `Blackhole` | kept open, nothing forwarded either way (data read is held, not dropped) | accepted, held, not dialled upstream |
//! | `Reset` | closed with RST (zero linger), both sides | accepted and reset at once |
//! | `CloseAfter(n)` | closed (FIN, both sides) once `n` bytes went upstream since the connection opened or the mode was set | same |
//!
//! Leaving `Blackhole` resumes held connections where they stopped: a
//! partition that heals. Counters ([`Counters`]) change on a watch channel, so
//! tests wait for "n connections", "n bytes upstream", "n resets" instead of
//! sleeping. Dropping the proxy stops it and every connection it carries.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::DEADLINE;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Latency(Duration),
    Blackhole,
    Reset,
    CloseAfter(u64),
}

impl Mode {
    /// Whether bytes may move in this mode (`Reset` moves none: its
    /// connections are being torn down).
    fn forwards(self) -> bool {
        !matches!(self, Mode::Blackhole | Mode::Reset)
    }
}

/// What the proxy did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Client connections accepted (including the ones reset at once).
    pub accepted: u64,
    /// Connections currently open on the client side.
    pub open: u64,
    /// Bytes forwarded client → target, and target → client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Connections reset (RST) by `Reset`.
    pub resets: u64,
    /// Connections closed by `CloseAfter`.
    pub closes: u64,
    /// Dials to the target that failed (the target is down).
    pub upstream_failures: u64,
}

/// The mode with a generation, so that `CloseAfter` counts from when it was set.
#[derive(Clone, Copy, Debug)]
struct Setting {
    mode: Mode,
    generation: u64,
}

struct Shared {
    target: Mutex<SocketAddr>,
    setting: watch::Sender<Setting>,
    counters: watch::Sender<Counters>,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        self.counters.send_modify(f);
    }
}

pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Owns the connection tasks (a `JoinSet`): aborting it ends them all.
    accept_task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy in `Pass` mode towards `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target: Mutex::new(target),
            setting: watch::channel(Setting {
                mode: Mode::Pass,
                generation: 0,
            })
            .0,
            counters: watch::channel(Counters::default()).0,
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy {
            addr,
            shared,
            accept_task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go (open ones keep their target).
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
    }

    pub fn mode(&self) -> Mode {
        self.shared.setting.borrow().mode
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.setting.send_modify(|s| {
            s.mode = mode;
            s.generation += 1;
        });
    }

    pub fn pass(&self) {
        self.set_mode(Mode::Pass)
    }
    pub fn latency(&self, d: Duration) {
        self.set_mode(Mode::Latency(d))
    }
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole)
    }
    pub fn reset(&self) {
        self.set_mode(Mode::Reset)
    }
    pub fn close_after(&self, bytes: u64) {
        self.set_mode(Mode::CloseAfter(bytes))
    }

    pub fn counters(&self) -> Counters {
        *self.shared.counters.borrow()
    }

    /// Waits until the counters satisfy `pred`; panics after [`DEADLINE`].
    pub async fn wait_until(&self, what: &str, pred: impl FnMut(&Counters) -> bool) -> Counters {
        let mut rx = self.shared.counters.subscribe();
        let waited = tokio::time::timeout(DEADLINE, rx.wait_for(pred))
            .await
            .map(|r| r.map(|c| *c));
        match waited {
            Ok(Ok(c)) => c,
            Ok(Err(_)) => panic!("proxy stopped while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {DEADLINE:?} waiting for {what}; proxy counters {:?}",
                self.counters()
            ),
        }
    }

    /// Readiness: at least `n` connections accepted so far.
    pub async fn wait_connections(&self, n: u64) -> Counters {
        self.wait_until(&format!("{n} proxy connections"), |c| c.accepted >= n)
            .await
    }

    pub async fn wait_bytes_up(&self, n: u64) -> Counters {
        self.wait_until(&format!("{n} bytes upstream"), |c| c.bytes_up >= n)
            .await
    }

    pub async fn wait_resets(&self, n: u64) -> Counters {
        self.wait_until(&format!("{n} resets"), |c| c.resets >= n)
            .await
    }

    /// Sets `Reset` until every open connection is torn down, then `Pass`:
    /// one RST per live connection, new ones unaffected afterwards. Returns
    /// how many connections were reset.
    pub async fn reset_open_connections(&self) -> u64 {
        let before = self.counters().resets;
        self.reset();
        let after = self
            .wait_until("open connections reset", |c| c.open == 0)
            .await;
        self.pass();
        after.resets - before
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        shared.count(|c| {
            c.accepted += 1;
            c.open += 1;
        });
        let shared = shared.clone();
        connections.spawn(async move {
            let ending = serve(client, &shared).await;
            shared.count(|c| {
                c.open -= 1;
                match ending {
                    Ending::Reset => c.resets += 1,
                    Ending::LimitReached => c.closes += 1,
                    Ending::Closed => {}
                }
            });
        });
    }
}

enum Ending {
    /// Either side closed or failed.
    Closed,
    /// Reset by `Reset` mode.
    Reset,
    /// `CloseAfter` limit reached.
    LimitReached,
}

/// Waits until the mode lets bytes move; returns that setting.
async fn gate(rx: &mut watch::Receiver<Setting>) -> Option<Setting> {
    rx.wait_for(|s| s.mode.forwards()).await.ok().map(|s| *s)
}

/// Carries one client connection until it ends, one way or another.
async fn serve(mut client: TcpStream, shared: &Shared) -> Ending {
    let mut setting = shared.setting.subscribe();
    // Blackhole: hold the connection, undialled, until the mode changes.
    let mode = match setting.wait_for(|s| s.mode != Mode::Blackhole).await {
        Ok(s) => s.mode,
        Err(_) => return Ending::Closed,
    };
    if mode == Mode::Reset {
        let _ = client.set_zero_linger();
        return Ending::Reset;
    }
    let target = *shared.target.lock().unwrap();
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        shared.count(|c| c.upstream_failures += 1);
        return Ending::Closed; // like a refused connection, but after accept
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let ending = {
        let (client_r, client_w) = client.split();
        let (up_r, up_w) = upstream.split();
        let up = pump(client_r, up_w, true, shared);
        let down = pump(up_r, client_w, false, shared);
        let reset = setting.wait_for(|s| s.mode == Mode::Reset);
        tokio::pin!(up, down, reset);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ending::Closed => up_done = true,
                    other => break other,
                },
                r = &mut down, if !down_done => match r {
                    Ending::Closed => down_done = true,
                    other => break other,
                },
                _ = &mut reset => break Ending::Reset,
            }
            if up_done && down_done {
                break Ending::Closed;
            }
        }
    };
    if let Ending::Reset = ending {
        // Zero linger: close() sends RST instead of FIN.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    ending
}

/// Forwards one direction. A reader feeds a queue stamped with arrival
/// times; the writer delivers each read when the mode allows (`Latency`:
/// arrival + d). Returns `Closed` on EOF or error (after passing the EOF on)
/// and `LimitReached` when `CloseAfter` cut the connection.
async fn pump(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>, up: bool, shared: &Shared) -> Ending {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(16);
    let mut read_gate = shared.setting.subscribe();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Nothing is read while blackholed: TCP back-pressure builds up
            // on the sender, as in a real partition.
            if gate(&mut read_gate).await.is_none() {
                return;
            }
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping `tx` ends the writer
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let mut write_gate = shared.setting.subscribe();
    let writer = async move {
        let mut sent_in_generation = (0u64, 0u64); // (generation, bytes)
        while let Some((arrived, mut data)) = rx.recv().await {
            // A read that raced a switch to Blackhole is held, not dropped.
            let Some(setting) = gate(&mut write_gate).await else {
                return Ending::Closed;
            };
            if let Mode::Latency(d) = setting.mode {
                tokio::time::sleep_until(arrived + d).await;
            }
            let mut limit_reached = false;
            if let (true, Mode::CloseAfter(limit)) = (up, setting.mode) {
                if sent_in_generation.0 != setting.generation {
                    sent_in_generation = (setting.generation, 0);
                }
                let left = limit.saturating_sub(sent_in_generation.1);
                if data.len() as u64 >= left {
                    data.truncate(left as usize);
                    limit_reached = true;
                }
                sent_in_generation.1 += data.len() as u64;
            }
            if to.write_all(&data).await.is_err() {
                return Ending::Closed;
            }
            let n = data.len() as u64;
            shared.count(|c| {
                if up {
                    c.bytes_up += n
                } else {
                    c.bytes_down += n
                }
            });
            if limit_reached {
                return Ending::LimitReached;
            }
        }
        let _ = to.shutdown().await; // pass the EOF on (half-close)
        Ending::Closed
    };
    // The writer decides how the direction ends; a finished reader (EOF)
    // only closes the queue, which the writer drains first.
    tokio::pin!(reader, writer);
    let mut reader_done = false;
    loop {
        tokio::select! {
            () = &mut reader, if !reader_done => reader_done = true,
            ending = &mut writer => return ending,
        }
    }
}
