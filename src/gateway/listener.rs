//! TCP accept loop with per-connection TLS handshakes. Each handshake runs in
//! its own task under a timeout, so a slow or plaintext client never blocks
//! `accept`; only established TLS streams reach tonic.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Time allowed for a client to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Established connections waiting for tonic to pick them up.
const PENDING_CONNECTIONS: usize = 128;
/// Pause after an accept error (e.g. out of file descriptors) to avoid spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) type Connection = TlsStream<TcpStream>;

/// Spawns the accept loop; it ends when `shutdown` turns true, dropping the
/// listener and (once handshakes in flight finish) the connection sender.
pub(crate) fn spawn_acceptor(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> (mpsc::Receiver<Connection>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(PENDING_CONNECTIONS);
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(handshake(acceptor.clone(), tcp, peer, tx.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
        tracing::debug!("gateway stopped accepting connections");
    });
    (rx, task)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    tx: mpsc::Sender<Connection>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            // The receiver is gone only when the server is shutting down.
            let _ = tx.send(tls).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}
