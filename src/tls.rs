//! TLS material and configurations, shared by the agent (client) and the gateway (server).
//!
//! One crypto provider for the whole process: rustls with `ring`. We build the
//! rustls configurations ourselves instead of using tonic's `ClientTlsConfig` /
//! `ServerTlsConfig` so that we control the protocol versions (TLS 1.3 only unless
//! the gateway operator allows 1.2), the trust roots (the configured CA file is the
//! only one) and, later, certificate rotation per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Why TLS material could not be loaded or used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("no certificate found in {path}")]
    NoCerts { path: PathBuf },
    #[error("cannot read private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("CA file {path} holds no usable CA certificate: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("certificate {cert} and key {key} do not form a usable identity: {reason}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent: the
/// second call is a no-op, so `main`, the demo and every test may call it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file (a chain is allowed).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Certs {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certs {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCerts {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Builds a root store from a CA bundle; this file is the only trust root.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path).map_err(|e| TlsError::Ca {
        path: path.to_owned(),
        reason: e.to_string(),
    })? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Paths of one mTLS identity plus the CA bundle that authenticates the peer.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// The agent's client configuration: TLS 1.3 only, the CA file as the only
/// trust root, the client certificate presented, ALPN `h2` for gRPC.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = load_roots(&files.ca_file)?;
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| identity_error(files, e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| identity_error(files, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The gateway's server configuration: a client certificate chained to the CA
/// bundle is required; TLS 1.3 only unless `allow_tls12`.
pub fn server_config(files: &TlsFiles, allow_tls12: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let roots = load_roots(&files.ca_file)?;
    let certs = load_certs(&files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Ca {
            path: files.ca_file.clone(),
            reason: e.to_string(),
        })?;
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| identity_error(files, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| identity_error(files, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn identity_error(files: &TlsFiles, e: rustls::Error) -> TlsError {
    TlsError::Identity {
        cert: files.cert_file.clone(),
        key: files.key_file.clone(),
        reason: e.to_string(),
    }
}

/// Parses a TLS server name (DNS name or IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// A tower connector for tonic: dials TCP to the URI's authority and runs the
/// TLS handshake with our own rustls configuration and server name. The tonic
/// endpoint URI must use the `http` scheme (TLS happens here, not in tonic).
#[derive(Clone)]
pub struct MtlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    /// Bumped on every established connection, so the gateway-connection actor
    /// can notice a transport that tonic re-dialled under it and say Hello again.
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl MtlsConnector {
    pub fn new(config: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self {
            config,
            server_name,
            connections: Arc::default(),
        }
    }

    /// How many TLS connections this connector has established so far.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl tower::Service<http::Uri> for MtlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let server_name = self.server_name.clone();
        let connections = self.connections.clone();
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "gateway URI has no host:port",
                )
            })?;
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(TokioIo::new(tls))
        })
    }
}
