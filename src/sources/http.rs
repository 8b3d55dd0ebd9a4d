//! What the HTTP sources (Armis, NetBox) share: one pooled client per
//! source, bounded retries with exponential backoff and jitter, `Retry-After`,
//! a body size limit, and the error classes a run report names.
//!
//! Retries happen here and nowhere else. A request is retried on connect
//! errors, timeouts, a body cut short, 408, 429 and 5xx, at most
//! `max_retries` times; any other status is the caller's to interpret (Armis
//! refreshes its token on 401, NetBox reports the `detail` of a 403). A
//! server certificate that fails verification is a `network` error too, but
//! it is not retried (no retry can fix it) and its message says how to skip
//! verification.
//!
//! Errors never carry secrets: they name a request as `METHOD /path`
//! (plus the paging position), never the full URL (an endpoint may embed
//! credentials) and never headers.

use std::fmt;
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use crate::config::bootstrap::SourceHttpPolicy;

/// Why a source run failed. [`FetchError::kind`] is the machine-readable
/// class that goes into the run report.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The API refused the credentials (bad key, expired or invalid token).
    #[error("authentication failed: {request} answered HTTP {status}: {detail}")]
    Auth {
        request: String,
        status: u16,
        detail: String,
    },
    /// Still 429 after every retry.
    #[error("rate limited: {request} still answered HTTP 429 after {attempts} attempts")]
    RateLimited { request: String, attempts: u32 },
    /// Still a 5xx (or 408) after every retry.
    #[error("server error: {request} answered HTTP {status} after {attempts} attempts: {detail}")]
    Server {
        request: String,
        status: u16,
        attempts: u32,
        detail: String,
    },
    /// Connect error, timeout or a body cut short, after every retry.
    #[error("network error: {request}: {detail} (after {attempts} attempts)")]
    Network {
        request: String,
        attempts: u32,
        detail: String,
    },
    /// An answer that cannot be used: unexpected status, invalid JSON, wrong
    /// types, a paging loop, a body over the size limit.
    #[error("bad response: {request}: {detail}")]
    BadResponse { request: String, detail: String },
    /// The source's own configuration is unusable (endpoint, credentials).
    #[error("invalid source configuration: {0}")]
    Config(String),
    /// Writing the run to the staging directory failed.
    #[error("staging the run: {0}")]
    Staging(#[from] std::io::Error),
    /// The run was abandoned (deadline, source stopped).
    #[error("run cancelled")]
    Cancelled,
    /// The whole run took longer than `gateway_policy.run_deadline`.
    #[error("run deadline of {0} exceeded (gateway_policy.run_deadline)")]
    Deadline(humantime::FormattedDuration),
    /// The run's own code panicked (a bug): the integration restarts.
    #[error("internal error (panic): {0}")]
    Panicked(String),
}

impl FetchError {
    /// The class of failure, as the run report names it.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Auth { .. } => "auth",
            FetchError::RateLimited { .. } => "rate_limit",
            FetchError::Server { .. } => "server_error",
            FetchError::Network { .. } => "network",
            FetchError::BadResponse { .. } => "bad_response",
            FetchError::Config(_) => "config",
            FetchError::Staging(_) => "staging",
            FetchError::Cancelled => "cancelled",
            FetchError::Deadline(_) => "deadline",
            FetchError::Panicked(_) => "internal",
        }
    }

    pub fn bad_response(request: impl fmt::Display, detail: impl fmt::Display) -> Self {
        FetchError::BadResponse {
            request: request.to_string(),
            detail: detail.to_string(),
        }
    }
}

/// A complete answer with a status the caller has to interpret.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Reply {
    /// The start of the body as text, for error messages about it.
    pub fn body_excerpt(&self) -> String {
        excerpt(&self.body)
    }
}

/// At most 300 characters of a body, on one line.
pub fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX * 4)]);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out.trim().to_owned()
}

/// The HTTP side of one source: a pooled client and the retry policy.
/// Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct SourceHttp {
    client: reqwest::Client,
    policy: SourceHttpPolicy,
}

impl fmt::Debug for SourceHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceHttp")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl SourceHttp {
    /// One client per source: connections are pooled across pages and runs.
    /// `insecure_skip_verify` accepts any server certificate (the source's
    /// `insecure_skip_verify`, NetBox's `verify_ssl: "false"`).
    pub fn new(policy: SourceHttpPolicy, insecure_skip_verify: bool) -> Result<Self, FetchError> {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("serviceradar-agent/", env!("CARGO_PKG_VERSION")))
            .timeout(policy.request_timeout)
            .connect_timeout(policy.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .tls_danger_accept_invalid_certs(insecure_skip_verify)
            .build()
            .map_err(|e| {
                FetchError::Config(format!("cannot build the HTTP client: {}", chain(&e)))
            })?;
        Ok(Self { client, policy })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn policy(&self) -> &SourceHttpPolicy {
        &self.policy
    }

    /// Sends the request `build` makes (called again per attempt) and reads
    /// the whole body. Retries transient failures; returns any other
    /// status for the caller to interpret. `request` names it in errors
    /// and logs; `retries` counts the retries made.
    pub async fn send(
        &self,
        request: &str,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        retries: &mut u64,
    ) -> Result<Reply, FetchError> {
        let attempts = self.policy.max_retries.saturating_add(1);
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.policy.retry_base)
            .with_max_delay(self.policy.retry_cap)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 1;
        loop {
            let outcome = match build(&self.client).send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match self.read_body(response, request).await {
                        Ok(body) => Outcome::Reply(Reply { status, body }, headers),
                        Err(Failure::Transport(detail)) => Outcome::Transport(detail),
                        Err(Failure::Fatal(e)) => return Err(e),
                    }
                }
                Err(e) if e.is_builder() => {
                    return Err(FetchError::Config(format!("{request}: {}", chain(&e))))
                }
                Err(e) => match untrusted_certificate(&e) {
                    Some(reason) => {
                        return Err(FetchError::Network {
                            request: request.to_owned(),
                            attempts: attempt,
                            detail: format!(
                                "TLS certificate not trusted ({reason}); to skip verification set \
                                 insecure_skip_verify: true (armis) or verify_ssl: \"false\" (netbox)"
                            ),
                        })
                    }
                    None => Outcome::Transport(chain(&e)),
                },
            };
            let (retry_after, failure) = match outcome {
                Outcome::Reply(reply, headers) => match reply.status {
                    StatusCode::TOO_MANY_REQUESTS => {
                        let wait =
                            retry_after(&headers).map(|d| d.min(self.policy.retry_after_cap));
                        (
                            wait,
                            FetchError::RateLimited {
                                request: request.to_owned(),
                                attempts: attempt,
                            },
                        )
                    }
                    s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => (
                        None,
                        FetchError::Server {
                            request: request.to_owned(),
                            status: s.as_u16(),
                            attempts: attempt,
                            detail: reply.body_excerpt(),
                        },
                    ),
                    _ => return Ok(reply),
                },
                Outcome::Transport(detail) => (
                    None,
                    FetchError::Network {
                        request: request.to_owned(),
                        attempts: attempt,
                        detail,
                    },
                ),
            };
            if attempt >= attempts {
                return Err(failure);
            }
            let delay = retry_after
                .or_else(|| backoff.next())
                .unwrap_or(self.policy.retry_cap);
            tracing::warn!(
                request,
                attempt,
                delay = %humantime::format_duration(delay),
                "retrying after: {failure}"
            );
            *retries += 1;
            attempt += 1;
            tokio::time::sleep(delay).await;
        }
    }

    /// Reads the body, refusing one over `max_body_bytes` (a runaway server
    /// must not exhaust the agent's memory).
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        request: &str,
    ) -> Result<Bytes, Failure> {
        let limit = self.policy.max_body_bytes;
        let too_big = || {
            Failure::Fatal(FetchError::bad_response(
                request,
                format!("body larger than {limit} bytes (source_http.max_body_bytes)"),
            ))
        };
        let expected = response.content_length().unwrap_or(0) as usize;
        if expected > limit {
            return Err(too_big());
        }
        let mut body = BytesMut::with_capacity(expected);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    return Err(Failure::Transport(format!(
                        "reading the body: {}",
                        chain(&e)
                    )))
                }
            }
        }
    }
}

enum Outcome {
    Reply(Reply, HeaderMap),
    Transport(String),
}

enum Failure {
    Transport(String),
    Fatal(FetchError),
}

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Why the server's certificate was refused, when that is why `e` failed:
/// rustls's verdict (unknown issuer, expired, wrong name, …), found among
/// the error's causes. rustls reports it inside an `io::Error` (which the
/// connector wraps in another one), and `io::Error::source()` skips the
/// error it wraps, so every `io::Error` met is also unwrapped.
fn untrusted_certificate(e: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let mut inner: &(dyn std::error::Error + 'static) = c;
        loop {
            if let Some(tls @ rustls::Error::InvalidCertificate(_)) =
                inner.downcast_ref::<rustls::Error>()
            {
                return Some(tls.to_string());
            }
            match inner
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
            {
                Some(wrapped) => inner = wrapped,
                None => break,
            }
        }
        cause = c.source();
    }
    None
}

/// An error and its causes on one line, without the URL reqwest would
/// print (it may hold credentials).
pub fn chain(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "body error".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut cause = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(c) = cause {
        let s = c.to_string();
        // hyper and reqwest repeat their inner error in the outer message.
        if !s.is_empty() && !last.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        last = s;
        cause = c.source();
    }
    text
}

/// Parses a configured endpoint, refusing what cannot be an HTTP base URL.
pub fn parse_endpoint(endpoint: Option<&str>) -> Result<reqwest::Url, FetchError> {
    let raw = endpoint
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| FetchError::Config("endpoint is required".into()))?;
    let url = reqwest::Url::parse(raw)
        .map_err(|e| FetchError::Config(format!("endpoint is not a valid URL: {e}")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        _ => Err(FetchError::Config(format!(
            "endpoint must be an http:// or https:// URL with a host, got scheme {:?}",
            url.scheme()
        ))),
    }
}
