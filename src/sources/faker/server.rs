//! The Faker server: the Armis API (sources.md "Armis") served from the
//! deterministic [`FakerGenerator`] (sources.md "Faker"), so that an `armis`
//! source can be demonstrated and load-tested without an Armis tenant.
//!
//! Endpoints:
//! - `POST /api/v1/access_token/` with a JSON body holding `api_key` and
//!   `api_secret` and/or `secret_key`. With an expected key / secret
//!   configured they must match (the secret may come in either field);
//!   without, any non-empty `api_secret` or `secret_key` is accepted, with
//!   or without an `api_key` (the public Armis API needs only
//!   `secret_key`). Failure is HTTP 400
//!   `{"message":"Invalid secret key","success":false}`; success returns a
//!   random token valid for the configured TTL and its `expiration_utc`.
//! - `GET /api/v1/search/?aql=…&from=N&length=M` with
//!   `Authorization: Bearer <token>` or the raw token. A missing, unknown or
//!   expired token is HTTP 401 `{"message":"Invalid access token",…}`. `aql`
//!   is accepted and ignored: every query returns the whole inventory.
//! - Anything else is HTTP 404 with a JSON `{"message":…,"success":false}`.
//!
//! Paging rules (sources.md "Faker", "Server paging"):
//! - `from`: missing, unparsable or negative ⇒ 0.
//! - `length`: missing, unparsable, ≤ 0 or > `max_page` ⇒ 100 (or `max_page`
//!   when that is smaller than 100).
//! - `count` is the number of results in the page, `total` the inventory size.
//! - `next` is the end offset of the page (`from + count`) while devices
//!   remain after it, and 0 once the page reaches the end (including the last
//!   page and any `from` past the end), so a client following
//!   "continue while `next` > `from`" stops there.
//! - `prev` is `from`, or null on the first page (`from` = 0).
//! - `results` is null when `from` ≥ `total` (then `count` = 0, `next` = 0).
//!
//! Churn: the generator state lives behind a `RwLock<Arc<FakerGenerator>>`.
//! A request clones the `Arc` (a pointer copy under a read lock) and builds
//! its page from that snapshot on the blocking pool, straight into the
//! response buffer, so a page never mixes two runs and serialisation never
//! holds the lock. [`FakerServer::advance_run`] (called every
//! `churn_interval` by a background task, and directly by tests) clones the
//! generator, advances the clone and swaps it in: copy-on-write, so readers
//! are never blocked behind the churn shuffle. The initial state is run 1.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::Router;
use serde::ser::SerializeSeq as _;
use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{FakerGenerator, FakerSettings, MAX_DEVICES};

/// Page size used when `length` is missing or out of range.
const DEFAULT_PAGE: u64 = 100;

/// Most live tokens kept; issuing one more evicts the one expiring first.
const MAX_TOKENS: usize = 10_000;

/// Longest accepted token lifetime (ten years).
const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// How long [`FakerServer::shutdown`] waits for in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Estimated JSON size of one device, to size a page's buffer up front.
const DEVICE_JSON_BYTES: usize = 480;

const INVALID_SECRET: &str = "Invalid secret key";
const INVALID_TOKEN: &str = "Invalid access token";

/// How to run a [`FakerServer`].
#[derive(Clone)]
pub struct FakerServerConfig {
    /// Address to listen on (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Inventory size, seed and churn share of the generator.
    pub settings: FakerSettings,
    /// Largest `length` honoured; larger requests get the default page.
    pub max_page: u32,
    /// Advance the generator (churn IPs) this often; `None` never does.
    pub churn_interval: Option<Duration>,
    /// Lifetime of an access token (zero: tokens are never valid).
    pub token_ttl: Duration,
    /// Expected `api_key`; `None` accepts any non-empty one.
    pub api_key: Option<String>,
    /// Expected `api_secret` / `secret_key`; `None` accepts any non-empty one.
    pub api_secret: Option<String>,
}

impl Default for FakerServerConfig {
    fn default() -> Self {
        FakerServerConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            settings: FakerSettings::default(),
            max_page: 1000,
            churn_interval: None,
            token_ttl: Duration::from_secs(3600),
            api_key: None,
            api_secret: None,
        }
    }
}

/// Credentials are redacted: they must never reach a log.
impl fmt::Debug for FakerServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakerServerConfig")
            .field("listen", &self.listen)
            .field("settings", &self.settings)
            .field("max_page", &self.max_page)
            .field("churn_interval", &self.churn_interval)
            .field("token_ttl", &self.token_ttl)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field(
                "api_secret",
                &self.api_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Why a [`FakerServer`] did not start.
#[derive(Debug, thiserror::Error)]
pub enum FakerServerError {
    #[error("faker server: cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("faker server: invalid configuration: {0}")]
    Config(String),
}

/// A running Faker server. Dropping it stops it too (without waiting for
/// in-flight requests); [`shutdown`](Self::shutdown) stops it gracefully.
pub struct FakerServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    serve_task: Option<JoinHandle<()>>,
    churn_task: Option<JoinHandle<()>>,
}

impl fmt::Debug for FakerServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakerServer")
            .field("addr", &self.addr)
            .field("run", &self.run())
            .finish_non_exhaustive()
    }
}

impl FakerServer {
    /// Binds and starts serving on the current tokio runtime; returns once
    /// listening. The generator is positioned at run 1.
    pub async fn start(config: FakerServerConfig) -> Result<FakerServer, FakerServerError> {
        config
            .settings
            .validate()
            .map_err(FakerServerError::Config)?;
        if config.max_page == 0 {
            return Err(FakerServerError::Config(
                "max_page must be at least 1".into(),
            ));
        }
        if config.churn_interval == Some(Duration::ZERO) {
            return Err(FakerServerError::Config(
                "churn_interval must be longer than zero".into(),
            ));
        }
        if config.token_ttl > MAX_TOKEN_TTL {
            return Err(FakerServerError::Config(format!(
                "token_ttl {} is longer than the maximum of {}",
                humantime::format_duration(config.token_ttl),
                humantime::format_duration(MAX_TOKEN_TTL)
            )));
        }

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| FakerServerError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| FakerServerError::Bind {
                addr: config.listen,
                source,
            })?;

        let mut generator = FakerGenerator::new(config.settings);
        generator.next_run();
        let shared = Arc::new(Shared {
            generator: RwLock::new(Arc::new(generator)),
            advancing: Mutex::new(()),
            tokens: Mutex::new(TokenStore::new(config.token_ttl)),
            max_page: u64::from(config.max_page),
            api_key: config.api_key,
            api_secret: config.api_secret,
        });

        let router = Router::new()
            .route("/api/v1/access_token/", post(access_token))
            .route("/api/v1/access_token", post(access_token))
            .route("/api/v1/search/", get(search))
            .route("/api/v1/search", get(search))
            .fallback(not_found)
            .method_not_allowed_fallback(not_found)
            .with_state(Arc::clone(&shared));

        // Without TCP_NODELAY a page's last segment can wait for the client's
        // delayed ACK (~40 ms a page).
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "faker server: cannot set TCP_NODELAY");
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            // A dropped sender stops the server as well.
            let _ = stopped.await;
        });
        let serve_task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "faker server stopped with an error");
            }
        });

        let churn_task = config.churn_interval.map(|every| {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let shared = Arc::clone(&shared);
                    match tokio::task::spawn_blocking(move || shared.advance_run()).await {
                        Ok(run) => tracing::info!(run, "faker server: churned to the next run"),
                        Err(e) => tracing::error!(error = %e, "faker server: churn failed"),
                    }
                }
            })
        });

        tracing::info!(
            %addr,
            devices = config.settings.total_devices,
            seed = config.settings.seed,
            churn_percent = config.settings.churn_percent,
            "faker server listening"
        );
        Ok(FakerServer {
            addr,
            shared,
            stop: Some(stop),
            serve_task: Some(serve_task),
            churn_task,
        })
    }

    /// The address actually bound (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL to give an `armis` source, e.g. `http://127.0.0.1:8080`. A
    /// wildcard listen address is reported as loopback.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The generator's current run (1 at start).
    pub fn run(&self) -> u64 {
        self.shared.snapshot().run()
    }

    /// Advances the generator to its next run (swapping the IPs of
    /// `churn_percent` of the devices) and returns the new run number. Pages
    /// already being served finish from the run they started with. Costs
    /// O(devices) CPU when churn is on: call it off the async threads for big
    /// inventories. The churn interval task uses this; tests call it to churn
    /// deterministically.
    pub fn advance_run(&self) -> u64 {
        self.shared.advance_run()
    }

    /// Stops the churn task and stops accepting connections, then waits (up
    /// to 10 s) for in-flight requests to finish and connections to close.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.churn_task.take() {
            task.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.serve_task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "faker server: connections still open after {SHUTDOWN_GRACE:?}; not waiting any longer"
                );
                task.abort();
            }
        }
        tracing::info!(addr = %self.addr, "faker server stopped");
    }
}

impl Drop for FakerServer {
    fn drop(&mut self) {
        if let Some(task) = self.churn_task.take() {
            task.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// State shared by the handlers and the churn task.
struct Shared {
    generator: RwLock<Arc<FakerGenerator>>,
    /// Serialises [`Shared::advance_run`] so that no advance is lost.
    advancing: Mutex<()>,
    tokens: Mutex<TokenStore>,
    max_page: u64,
    api_key: Option<String>,
    api_secret: Option<String>,
}

impl Shared {
    fn snapshot(&self) -> Arc<FakerGenerator> {
        Arc::clone(
            &self
                .generator
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn advance_run(&self) -> u64 {
        let _one_at_a_time = self
            .advancing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = FakerGenerator::clone(&self.snapshot());
        let run = next.next_run();
        *self
            .generator
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        run
    }

    fn credentials_ok(&self, request: &TokenRequest) -> bool {
        let key = non_empty(&request.api_key);
        let secrets = [
            non_empty(&request.api_secret),
            non_empty(&request.secret_key),
        ];
        let key_ok = match (&self.api_key, key) {
            (Some(expected), Some(given)) => constant_time_eq(expected, given),
            (Some(_), None) => false,
            // No expected key: the public API form sends none.
            (None, _) => true,
        };
        let secret_ok = match &self.api_secret {
            Some(expected) => secrets
                .iter()
                .flatten()
                .fold(false, |ok, given| constant_time_eq(expected, given) | ok),
            None => secrets.iter().any(Option::is_some),
        };
        key_ok && secret_ok
    }

    fn lock_tokens(&self) -> std::sync::MutexGuard<'_, TokenStore> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The access-token request body. No `Debug`: it holds secrets.
#[derive(Default, Deserialize)]
#[serde(default)]
struct TokenRequest {
    api_key: Option<String>,
    api_secret: Option<String>,
    secret_key: Option<String>,
}

/// Live access tokens and their expiry. Time is passed in, so expiry is
/// testable without sleeping.
struct TokenStore {
    ttl: Duration,
    /// Token → expiry instant; `None` when `now + ttl` is not representable.
    tokens: HashMap<String, Option<Instant>>,
}

impl TokenStore {
    fn new(ttl: Duration) -> Self {
        TokenStore {
            ttl,
            tokens: HashMap::new(),
        }
    }

    /// Stores `token`, issued at `now`, dropping expired tokens first and, at
    /// [`MAX_TOKENS`], the one that expires first.
    fn insert(&mut self, token: String, now: Instant) {
        self.tokens.retain(|_, expiry| live(*expiry, now));
        if self.tokens.len() >= MAX_TOKENS {
            let first = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| expiry.map_or((1, now), |at| (0, at)))
                .map(|(token, _)| token.clone());
            if let Some(first) = first {
                self.tokens.remove(&first);
            }
        }
        self.tokens.insert(token, now.checked_add(self.ttl));
    }

    /// Whether `token` is live at `now`; an expired one is forgotten.
    fn check(&mut self, token: &str, now: Instant) -> bool {
        match self.tokens.get(token) {
            Some(expiry) if live(*expiry, now) => true,
            Some(_) => {
                self.tokens.remove(token);
                false
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn live(expiry: Option<Instant>, now: Instant) -> bool {
    expiry.is_none_or(|at| now < at)
}

/// 256 bits from the OS RNG (two v4 UUIDs), as 64 hex digits.
fn new_token() -> String {
    let mut token = String::with_capacity(64);
    for _ in 0..2 {
        token.push_str(uuid::Uuid::new_v4().simple().to_string().as_str());
    }
    token
}

/// `2023-10-11T09:49:00.818613+00:00`, the Armis `expiration_utc` format.
fn expiration_utc(at: SystemTime) -> String {
    let formatted = humantime::format_rfc3339_micros(at).to_string();
    match formatted.strip_suffix('Z') {
        Some(base) => format!("{base}+00:00"),
        None => formatted,
    }
}

async fn access_token(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: TokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            // The parser's message could quote the body: never echo it.
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "Invalid request body: expected a JSON object with api_key and api_secret or secret_key",
                )
            }
        }
    };
    if !shared.credentials_ok(&request) {
        tracing::debug!("faker server: access token refused (bad credentials)");
        return error_response(StatusCode::BAD_REQUEST, INVALID_SECRET);
    }
    let token = new_token();
    let expires = {
        let mut tokens = shared.lock_tokens();
        tokens.insert(token.clone(), Instant::now());
        tokens.ttl
    };
    let expiration = expiration_utc(
        SystemTime::now()
            .checked_add(expires)
            .unwrap_or_else(SystemTime::now),
    );
    tracing::debug!(expiration_utc = %expiration, "faker server: access token issued");
    #[derive(Serialize)]
    struct TokenData<'a> {
        access_token: &'a str,
        expiration_utc: &'a str,
    }
    json_response(
        StatusCode::OK,
        &Envelope {
            data: TokenData {
                access_token: &token,
                expiration_utc: &expiration,
            },
            success: true,
        },
    )
}

/// Query parameters of a search, kept as strings so that bad numbers fall
/// back to the defaults instead of failing the request. `aql` (and anything
/// else) is accepted and ignored: every query returns the whole inventory.
#[derive(Deserialize)]
struct SearchParams {
    from: Option<String>,
    length: Option<String>,
}

async fn search(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Response {
    let token = headers.get(AUTHORIZATION).and_then(bearer_or_raw);
    let authorised = token.is_some_and(|t| shared.lock_tokens().check(t, Instant::now()));
    if !authorised {
        return error_response(StatusCode::UNAUTHORIZED, INVALID_TOKEN);
    }
    let Ok(Query(params)) = params else {
        return error_response(StatusCode::BAD_REQUEST, "Invalid query string");
    };
    let from = params
        .from
        .as_deref()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let length = page_length(params.length.as_deref(), shared.max_page);
    let generator = shared.snapshot();
    match tokio::task::spawn_blocking(move || render_page(&generator, from, length)).await {
        Ok(Ok(body)) => json_bytes(StatusCode::OK, body),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "faker server: cannot serialise a page");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
        }
        Err(e) => {
            tracing::error!(error = %e, "faker server: page task failed");
            error_response(StatusCode::INTERNAL_SERVER_ERROR, "Internal error")
        }
    }
}

/// `Bearer <token>` (any case) or the raw token.
fn bearer_or_raw(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?.trim();
    let token = match value.split_once(char::is_whitespace) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        None if value.eq_ignore_ascii_case("bearer") => "",
        _ => value,
    };
    (!token.is_empty()).then_some(token)
}

/// The page size for a `length` parameter (see the module docs).
fn page_length(raw: Option<&str>, max_page: u64) -> u64 {
    let default = DEFAULT_PAGE.min(max_page);
    match raw.and_then(|v| v.trim().parse::<i64>().ok()) {
        Some(n) if n > 0 && (n as u64) <= max_page => n as u64,
        _ => default,
    }
}

/// Offsets of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageBounds {
    /// Devices `from..end` are in the page (empty past the end).
    end: u64,
    next: u64,
    prev: Option<u64>,
    past_end: bool,
}

fn page_bounds(from: u64, length: u64, total: u64) -> PageBounds {
    let past_end = from >= total;
    let end = if past_end {
        from
    } else {
        from.saturating_add(length).min(total)
    };
    PageBounds {
        end,
        next: if end < total { end } else { 0 },
        prev: (from > 0).then_some(from),
        past_end,
    }
}

/// One search page as JSON, generated from `generator` straight into the
/// response buffer (no intermediate device list or `serde_json::Value`).
pub fn render_page(
    generator: &FakerGenerator,
    from: u64,
    length: u64,
) -> serde_json::Result<Vec<u8>> {
    let total = generator.len();
    let bounds = page_bounds(from, length, total);
    let range = from..bounds.end;
    let count = range.end - range.start;
    let mut body = Vec::with_capacity(256 + count as usize * DEVICE_JSON_BYTES);
    serde_json::to_writer(
        &mut body,
        &Envelope {
            data: SearchData {
                count,
                next: bounds.next,
                prev: bounds.prev,
                results: (!bounds.past_end).then_some(PageResults { generator, range }),
                total,
            },
            success: true,
        },
    )?;
    Ok(body)
}

#[derive(Serialize)]
struct Envelope<T> {
    data: T,
    success: bool,
}

#[derive(Serialize)]
struct SearchData<'a> {
    count: u64,
    next: u64,
    prev: Option<u64>,
    results: Option<PageResults<'a>>,
    total: u64,
}

/// Serialises devices `range` of `generator` one at a time.
struct PageResults<'a> {
    generator: &'a FakerGenerator,
    range: Range<u64>,
}

impl Serialize for PageResults<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let len = (self.range.end - self.range.start) as usize;
        let mut seq = serializer.serialize_seq(Some(len))?;
        for i in self.range.clone() {
            seq.serialize_element(&self.generator.device(i))?;
        }
        seq.end()
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "Not found")
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    success: bool,
}

fn error_response(status: StatusCode, message: &str) -> Response {
    json_response(
        status,
        &ErrorBody {
            message,
            success: false,
        },
    )
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes(status, body),
        Err(e) => {
            tracing::error!(error = %e, "faker server: cannot serialise a response");
            json_bytes(
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"message":"Internal error","success":false}"#.to_vec(),
            )
        }
    }
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        Body::from(body),
    )
        .into_response()
}

/// `serviceradar-agent faker`: serve the Armis API from the Faker generator.
#[derive(Clone, clap::Args)]
pub struct FakerArgs {
    /// Address to listen on (port 0 picks a free port; the line printed on start names it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of devices in the inventory.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(0..=MAX_DEVICES))]
    pub devices: u64,
    /// Generator seed: the same seed always serves the same inventory.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of devices (0–100) whose IPs are swapped every --churn-interval.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    pub churn_percent: f64,
    /// How often to churn IPs (e.g. 30s, 10m); only used when --churn-percent > 0.
    #[arg(long, default_value = "10m")]
    pub churn_interval: humantime::Duration,
    /// Largest page size honoured; larger or invalid `length` values get 100.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_page: u32,
    /// Access token lifetime (e.g. 1h, 15m).
    #[arg(long, default_value = "1h")]
    pub token_ttl: humantime::Duration,
    /// Expected api_key (default: any non-empty key).
    #[arg(long, env = "FAKER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Expected api_secret / secret_key (default: any non-empty secret).
    #[arg(long, env = "FAKER_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
}

fn parse_percent(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{raw:?} is not a number from 0 to 100")),
    }
}

impl FakerArgs {
    /// The server configuration these arguments describe.
    pub fn config(&self) -> FakerServerConfig {
        FakerServerConfig {
            listen: self.listen,
            settings: FakerSettings {
                total_devices: self.devices,
                seed: self.seed,
                churn_percent: self.churn_percent,
            },
            max_page: self.max_page,
            churn_interval: (self.churn_percent > 0.0).then_some(*self.churn_interval),
            token_ttl: *self.token_ttl,
            api_key: self.api_key.clone(),
            api_secret: self.api_secret.clone(),
        }
    }
}

/// Runs the Faker server until SIGINT or SIGTERM. Prints one
/// `faker listening on http://ADDR` line on stdout once it accepts requests.
pub fn run_from_cli(args: FakerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the faker server runtime")?;
    runtime.block_on(async move {
        let server = FakerServer::start(args.config()).await?;
        {
            use std::io::Write as _;
            let mut out = io::stdout().lock();
            writeln!(out, "faker listening on {}", server.url())?;
            out.flush()?;
        }
        crate::agent::wait_for_termination().await;
        server.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_exactly_at_the_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut store = TokenStore::new(ttl);
        store.insert("a".into(), t0);
        assert!(store.check("a", t0));
        assert!(store.check("a", t0 + ttl - Duration::from_nanos(1)));
        assert!(!store.check("b", t0));
        assert!(!store.check("a", t0 + ttl));
        // Forgotten once found expired.
        assert_eq!(store.len(), 0);
        assert!(!store.check("a", t0));
    }

    #[test]
    fn issuing_purges_expired_tokens_and_caps_the_map() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut store = TokenStore::new(ttl);
        store.insert("old".into(), t0);
        store.insert("new".into(), t0 + Duration::from_secs(5));
        store.insert("newer".into(), t0 + ttl);
        assert_eq!(store.len(), 2, "the expired token was purged");
        assert!(store.check("new", t0 + ttl));

        let mut store = TokenStore::new(ttl);
        for k in 0..MAX_TOKENS {
            store.insert(format!("t{k}"), t0 + Duration::from_millis(k as u64));
        }
        assert_eq!(store.len(), MAX_TOKENS);
        let late = t0 + Duration::from_millis(MAX_TOKENS as u64);
        store.insert("last".into(), late);
        assert_eq!(store.len(), MAX_TOKENS);
        assert!(!store.check("t0", late), "the first to expire was evicted");
        assert!(store.check("t1", late));
        assert!(store.check("last", late));
    }

    #[test]
    fn zero_ttl_tokens_are_never_valid() {
        let t0 = Instant::now();
        let mut store = TokenStore::new(Duration::ZERO);
        store.insert("a".into(), t0);
        assert!(!store.check("a", t0));
    }

    #[test]
    fn paging_bounds() {
        let b = |from, length, total| page_bounds(from, length, total);
        assert_eq!(
            b(0, 100, 250),
            PageBounds {
                end: 100,
                next: 100,
                prev: None,
                past_end: false
            }
        );
        assert_eq!(
            b(200, 100, 250),
            PageBounds {
                end: 250,
                next: 0,
                prev: Some(200),
                past_end: false
            }
        );
        assert_eq!(
            b(150, 100, 250),
            PageBounds {
                end: 250,
                next: 0,
                prev: Some(150),
                past_end: false
            }
        );
        assert_eq!(
            b(250, 100, 250),
            PageBounds {
                end: 250,
                next: 0,
                prev: Some(250),
                past_end: true
            }
        );
        assert_eq!(
            b(u64::MAX, 100, 250),
            PageBounds {
                end: u64::MAX,
                next: 0,
                prev: Some(u64::MAX),
                past_end: true
            }
        );
        assert_eq!(
            b(0, 100, 0),
            PageBounds {
                end: 0,
                next: 0,
                prev: None,
                past_end: true
            }
        );
    }

    #[test]
    fn page_length_falls_back_to_the_default() {
        for raw in [
            None,
            Some(""),
            Some("x"),
            Some("0"),
            Some("-1"),
            Some("1001"),
            Some("1.5"),
        ] {
            assert_eq!(page_length(raw, 1000), 100, "{raw:?}");
        }
        assert_eq!(page_length(Some("1"), 1000), 1);
        assert_eq!(page_length(Some(" 1000 "), 1000), 1000);
        assert_eq!(page_length(None, 50), 50);
        assert_eq!(page_length(Some("60"), 50), 50);
    }

    #[test]
    fn authorization_header_forms() {
        let h = |v: &'static str| HeaderValue::from_static(v);
        assert_eq!(bearer_or_raw(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer_or_raw(&h("bearer  abc")), Some("abc"));
        assert_eq!(bearer_or_raw(&h("abc")), Some("abc"));
        assert_eq!(bearer_or_raw(&h("Bearer ")), None);
        assert_eq!(bearer_or_raw(&h("BEARER")), None);
        assert_eq!(bearer_or_raw(&h("Bearer\tabc ")), Some("abc"));
        assert_eq!(bearer_or_raw(&h("")), None);
    }

    #[test]
    fn expiration_uses_an_explicit_utc_offset() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_697_017_740, 818_613_000);
        assert_eq!(expiration_utc(at), "2023-10-11T09:49:00.818613+00:00");
    }

    #[test]
    fn config_debug_redacts_credentials() {
        let config = FakerServerConfig {
            api_key: Some("key-123".into()),
            api_secret: Some("secret-456".into()),
            ..Default::default()
        };
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("key-123") && !debug.contains("secret-456"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn credential_rules() {
        let shared = |key: Option<&str>, secret: Option<&str>| Shared {
            generator: RwLock::new(Arc::new(FakerGenerator::new(FakerSettings::default()))),
            advancing: Mutex::new(()),
            tokens: Mutex::new(TokenStore::new(Duration::from_secs(1))),
            max_page: 1000,
            api_key: key.map(str::to_owned),
            api_secret: secret.map(str::to_owned),
        };
        let req = |k: Option<&str>, s: Option<&str>, sk: Option<&str>| TokenRequest {
            api_key: k.map(str::to_owned),
            api_secret: s.map(str::to_owned),
            secret_key: sk.map(str::to_owned),
        };
        let open = shared(None, None);
        assert!(open.credentials_ok(&req(Some("k"), Some("s"), None)));
        assert!(open.credentials_ok(&req(Some("k"), None, Some("s"))));
        assert!(!open.credentials_ok(&req(Some("k"), Some(""), None)));
        assert!(open.credentials_ok(&req(None, None, Some("s"))));
        assert!(!open.credentials_ok(&req(None, None, None)));

        let closed = shared(Some("k"), Some("s"));
        assert!(closed.credentials_ok(&req(Some("k"), Some("s"), None)));
        assert!(closed.credentials_ok(&req(Some("k"), None, Some("s"))));
        assert!(closed.credentials_ok(&req(Some("k"), Some("wrong"), Some("s"))));
        assert!(!closed.credentials_ok(&req(Some("k"), Some("wrong"), None)));
        assert!(!closed.credentials_ok(&req(Some("x"), Some("s"), None)));
        assert!(!closed.credentials_ok(&req(None, Some("s"), None)));
    }
}
