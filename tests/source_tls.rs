//! HTTP sources over real TLS: a loopback HTTPS server with a self-signed
//! certificate (rcgen), in front of a minimal NetBox device list and a
//! minimal Armis token + search API. Without skipping verification a run
//! fails at once (the certificate is not trusted, which no retry can fix);
//! with `verify_ssl: "false"` (NetBox) or `insecure_skip_verify: true`
//! (Armis) it succeeds.

mod source_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use serviceradar_agent::sources::armis::client::ArmisClient;
use serviceradar_agent::sources::netbox::client::NetboxClient;
use serviceradar_agent::sources::runner::RunFailure;
use serviceradar_agent::sources::stager::StageOutput;
use source_support::{fast_policy, source_config, staged_updates, Staging};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

const NETBOX_TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";

/// Accepts TCP connections and completes the TLS handshake before handing
/// the stream to axum. Counts every TCP connection, so a test can tell how
/// often a client tried; a failed handshake is dropped and the next
/// connection awaited.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    connections: Arc<AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, peer)) = self.tcp.accept().await else {
                continue;
            };
            self.connections.fetch_add(1, Ordering::SeqCst);
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The HTTPS server; stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    async fn start() -> Self {
        serviceradar_agent::tls::install_crypto_provider();
        let certified = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("self-signed certificate");
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("local addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            connections: Arc::clone(&connections),
        };
        let router = Router::new()
            .route("/api/dcim/devices/", get(netbox_devices))
            .route("/api/v1/access_token/", post(armis_token))
            .route("/api/v1/search/", get(armis_search));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        TlsServer {
            addr,
            connections,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// TCP connections made so far (one per attempt that could not reuse a
    /// pooled connection).
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn json_reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn netbox_devices(headers: HeaderMap) -> Response {
    let expected = format!("Token {NETBOX_TOKEN}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return json_reply(StatusCode::FORBIDDEN, json!({"detail": "Invalid token"}));
    }
    json_reply(
        StatusCode::OK,
        json!({"count": 1, "next": null, "previous": null, "results": [
            {"id": 1, "name": "sw1", "primary_ip4": {"address": "10.0.0.1/24"}}
        ]}),
    )
}

async fn armis_token() -> Response {
    json_reply(
        StatusCode::OK,
        json!({"data": {"access_token": "t", "expiration_utc": "2099-01-01T00:00:00+00:00"},
            "success": true}),
    )
}

async fn armis_search(headers: HeaderMap) -> Response {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok());
    if !matches!(token, Some("t" | "Bearer t")) {
        return json_reply(
            StatusCode::UNAUTHORIZED,
            json!({"message": "Invalid access token", "success": false}),
        );
    }
    json_reply(
        StatusCode::OK,
        json!({"data": {"count": 1, "next": null, "prev": null, "total": 1, "results": [
            {"id": 7, "ipAddress": "10.0.0.7", "macAddress": "AA:BB:CC:00:00:07",
             "name": "armis-dev-7", "type": "Laptop", "category": "Endpoint",
             "riskLevel": 0, "tags": [], "customProperties": null, "site": null}
        ]}, "success": true}),
    )
}

fn netbox(server: &TlsServer, extra_credentials: Value) -> NetboxClient {
    let mut credentials = json!({"api_token": NETBOX_TOKEN});
    if let (Some(base), Value::Object(extra)) = (credentials.as_object_mut(), extra_credentials) {
        base.extend(extra);
    }
    NetboxClient::new(
        &source_config("netbox", &server.url(), json!({"credentials": credentials})),
        fast_policy(),
    )
    .expect("netbox client builds")
}

fn armis(server: &TlsServer, insecure_skip_verify: bool) -> ArmisClient {
    ArmisClient::new(
        &source_config(
            "armis",
            &server.url(),
            json!({"credentials": {"api_key": "ak_tls", "api_secret": "tls-secret"},
                "insecure_skip_verify": insecure_skip_verify}),
        ),
        fast_policy(),
    )
    .expect("armis client builds")
}

fn expect_ok(result: Result<StageOutput, RunFailure>) -> StageOutput {
    match result {
        Ok(output) => output,
        Err(failure) => panic!("run failed: {}", failure.error),
    }
}

/// An untrusted certificate fails the run as `network`, names the
/// certificate and the setting that skips verification, is tried once and
/// leaves nothing staged.
fn assert_untrusted(
    result: Result<StageOutput, RunFailure>,
    staging: &Staging,
    skip_setting: &str,
) {
    let failure = match result {
        Ok(output) => panic!("run succeeded with {:?}", output.counts),
        Err(failure) => failure,
    };
    let message = failure.error.to_string();
    assert_eq!(failure.error.kind(), "network", "{message}");
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("not trusted"), "{message}");
    assert!(message.contains(skip_setting), "{message}");
    // A certificate no retry can fix is not retried.
    assert_eq!(failure.counts.retries, 0, "{message}");
    assert_eq!(failure.counts.pages, 0, "{message}");
    assert!(staging.leftovers().is_empty(), "{:?}", staging.leftovers());
}

#[tokio::test]
async fn netbox_refuses_an_untrusted_certificate_without_retrying() {
    let server = TlsServer::start().await;
    let staging = Staging::new();
    let result = netbox(&server, json!({}))
        .run(staging.job("netbox", &[], false))
        .await;
    assert_untrusted(result, &staging, "verify_ssl");
    assert_eq!(server.connections(), 1, "one attempt, no retries");
}

#[tokio::test]
async fn netbox_with_verify_ssl_false_accepts_the_self_signed_certificate() {
    let server = TlsServer::start().await;
    let staging = Staging::new();
    let client = netbox(&server, json!({"verify_ssl": "false"}));
    assert!(client.insecure_skip_verify());
    let output = expect_ok(client.run(staging.job("netbox", &[], false)).await);
    let updates = staged_updates(&output);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].ip, "10.0.0.1");
    assert_eq!((output.counts.devices, output.counts.pages), (1, 1));
    assert_eq!(output.counts.retries, 0);
}

#[tokio::test]
async fn armis_refuses_an_untrusted_certificate_without_retrying() {
    let server = TlsServer::start().await;
    let staging = Staging::new();
    let result = armis(&server, false)
        .run(staging.job("armis", &[], false))
        .await;
    assert_untrusted(result, &staging, "insecure_skip_verify");
    assert_eq!(server.connections(), 1, "one attempt, no retries");
}

#[tokio::test]
async fn armis_with_insecure_skip_verify_accepts_the_self_signed_certificate() {
    let server = TlsServer::start().await;
    let staging = Staging::new();
    let output = expect_ok(
        armis(&server, true)
            .run(staging.job("armis", &[], false))
            .await,
    );
    let updates = staged_updates(&output);
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].ip, "10.0.0.7");
    assert_eq!((output.counts.devices, output.counts.pages), (1, 1));
    assert_eq!(output.counts.retries, 0);
}
