//! The HTTP JSON admin API of a running gateway: the [`Admin`] operations on
//! their own plain-HTTP port (`admin.listen`, loopback by default), behind a
//! bearer token.
//!
//! - Every route is listed once, in [`ROUTES`]; the router is built from that
//!   list and a test compares it with the OpenAPI document ([`OPENAPI_JSON`],
//!   served at `/api/v1/openapi.json`), so neither can drift.
//! - Every route needs `Authorization: Bearer <token>` except `GET /healthz`
//!   and `GET /api/v1/openapi.json`, which reveal nothing about the data.
//! - Every answer is JSON; errors are `{"error": "<message>"}` with the status
//!   of the [`AdminError`] variant, 400 for unreadable requests and 401 (with
//!   `WWW-Authenticate: Bearer`) without a valid token.
//! - The token is kept only as its SHA-256 digest and compared in constant
//!   time; it never reaches a log, an error or `Debug` output.
//!
//! Plain HTTP on purpose: the API binds to loopback unless configured
//! otherwise; expose it through a TLS-terminating proxy.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Admin, AdminError, DeviceQuery, OnboardRequest, OnboardingSettings};
use crate::gateway::config::{AdminApiConfig, ADMIN_TOKEN_ENV};
use crate::gateway::integrations::{SourcePatch, SourceSpec};
use crate::gateway::GatewayError;

/// The OpenAPI 3.1 description of every route in [`ROUTES`].
pub const OPENAPI_JSON: &str = include_str!("openapi.json");
/// Largest request body accepted (source specs are a few KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_CHARS: usize = 16;
/// `GET …/devices` page size when `limit` is absent, and its upper bound.
pub use super::{DEFAULT_DEVICE_LIMIT, MAX_DEVICE_LIMIT};
/// How long shutdown waits for in-flight admin requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the admin API cannot start. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum AdminApiError {
    #[error(
        "the admin API (admin.listen {listen}) needs the gateway database: set `database` in \
         the gateway config, or remove `admin`"
    )]
    NoDatabase { listen: String },
    #[error(
        "the admin API (admin.listen {listen}) needs a bearer token: set the {ADMIN_TOKEN_ENV} \
         environment variable or `admin.token_file` in the gateway config (a file holding at \
         least {MIN_TOKEN_CHARS} characters, e.g. from `openssl rand -hex 32`)"
    )]
    NoToken { listen: String },
    #[error("cannot read the admin token file {path} (admin.token_file): {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the admin token from {origin} is too short: at least {MIN_TOKEN_CHARS} characters \
         are required (e.g. `openssl rand -hex 32`)"
    )]
    TokenTooShort { origin: TokenOrigin },
}

/// Where the token came from (logged at start; the token itself never is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenOrigin {
    Env,
    Config,
    File(PathBuf),
}

impl fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenOrigin::Env => write!(f, "the {ADMIN_TOKEN_ENV} environment variable"),
            TokenOrigin::Config => f.write_str("the gateway config (admin token set in code)"),
            TokenOrigin::File(path) => write!(f, "admin.token_file {}", path.display()),
        }
    }
}

/// The expected bearer token, kept only as its SHA-256 digest.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl AdminToken {
    fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Constant time in the token's content: both sides are hashed to a
    /// fixed length and every byte is compared, so timing reveals neither a
    /// matching prefix nor the length.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        presented
            .iter()
            .zip(self.digest.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

/// The token for `settings`: `env` (the value of [`ADMIN_TOKEN_ENV`]) when
/// non-empty, else `settings.token`, else the trimmed contents of
/// `settings.token_file`.
pub fn resolve_token(
    settings: &AdminApiConfig,
    env: Option<String>,
) -> Result<(AdminToken, TokenOrigin), AdminApiError> {
    let (token, origin) = if let Some(token) = env.filter(|t| !t.trim().is_empty()) {
        (token, TokenOrigin::Env)
    } else if let Some(token) = settings.token.clone() {
        (token, TokenOrigin::Config)
    } else if let Some(path) = &settings.token_file {
        let token = std::fs::read_to_string(path).map_err(|source| AdminApiError::TokenFile {
            path: path.clone(),
            source,
        })?;
        warn_if_readable_by_others(path);
        (token, TokenOrigin::File(path.clone()))
    } else {
        return Err(AdminApiError::NoToken {
            listen: settings.listen.clone(),
        });
    };
    // A trailing newline from `echo … > file` or `$(cat file)` is not part
    // of the token.
    let token = token.trim();
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(AdminApiError::TokenTooShort { origin });
    }
    Ok((AdminToken::new(token), origin))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "admin token file is accessible to other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &std::path::Path) {}

// ---- routes ------------------------------------------------------------

/// HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Patch,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Patch => "PATCH",
            Verb::Delete => "DELETE",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Patch => MethodFilter::PATCH,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// What a route does (one handler each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Health,
    OpenApi,
    TenantList,
    TenantAdd,
    AgentList,
    TenantAgentList,
    AgentOnboard,
    SourceList,
    SourceAdd,
    SourceShow,
    SourceUpdate,
    SourceDelete,
    SourceEnable,
    SourceDisable,
    SourceAssign,
    DeviceList,
    DeviceShow,
    DeviceUnmerge,
}

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub verb: Verb,
    /// axum path syntax, which is also OpenAPI's (`{tenant}`).
    pub path: &'static str,
    /// Served without a token.
    pub public: bool,
    pub op: Op,
}

const fn route(verb: Verb, path: &'static str, op: Op) -> Route {
    Route {
        verb,
        path,
        public: false,
        op,
    }
}

const fn public(verb: Verb, path: &'static str, op: Op) -> Route {
    Route {
        verb,
        path,
        public: true,
        op,
    }
}

/// Every route; the router is built from this list and the OpenAPI document
/// must describe exactly these.
#[rustfmt::skip] // one route a line reads as the table it is
pub const ROUTES: &[Route] = &[
    public(Verb::Get, "/healthz", Op::Health),
    public(Verb::Get, "/api/v1/openapi.json", Op::OpenApi),
    route(Verb::Get, "/api/v1/tenants", Op::TenantList),
    route(Verb::Post, "/api/v1/tenants", Op::TenantAdd),
    route(Verb::Get, "/api/v1/agents", Op::AgentList),
    route(Verb::Get, "/api/v1/tenants/{tenant}/agents", Op::TenantAgentList),
    route(Verb::Post, "/api/v1/tenants/{tenant}/agents", Op::AgentOnboard),
    route(Verb::Get, "/api/v1/tenants/{tenant}/sources", Op::SourceList),
    route(Verb::Post, "/api/v1/tenants/{tenant}/sources", Op::SourceAdd),
    route(Verb::Get, "/api/v1/tenants/{tenant}/sources/{source}", Op::SourceShow),
    route(Verb::Patch, "/api/v1/tenants/{tenant}/sources/{source}", Op::SourceUpdate),
    route(Verb::Delete, "/api/v1/tenants/{tenant}/sources/{source}", Op::SourceDelete),
    route(Verb::Post, "/api/v1/tenants/{tenant}/sources/{source}/enable", Op::SourceEnable),
    route(Verb::Post, "/api/v1/tenants/{tenant}/sources/{source}/disable", Op::SourceDisable),
    route(Verb::Post, "/api/v1/tenants/{tenant}/sources/{source}/assign", Op::SourceAssign),
    route(Verb::Get, "/api/v1/tenants/{tenant}/devices", Op::DeviceList),
    route(Verb::Get, "/api/v1/tenants/{tenant}/devices/{device}", Op::DeviceShow),
    route(Verb::Post, "/api/v1/tenants/{tenant}/devices/{device}/unmerge", Op::DeviceUnmerge),
];

/// State shared by the handlers.
#[derive(Clone)]
struct Api {
    admin: Admin,
    token: Arc<AdminToken>,
    onboarding: Arc<OnboardingSettings>,
}

fn handler(verb: Verb, op: Op) -> MethodRouter<Api> {
    let filter = verb.filter();
    match op {
        Op::Health => on(filter, health),
        Op::OpenApi => on(filter, openapi),
        Op::TenantList => on(filter, tenant_list),
        Op::TenantAdd => on(filter, tenant_add),
        Op::AgentList => on(filter, agent_list),
        Op::TenantAgentList => on(filter, tenant_agent_list),
        Op::AgentOnboard => on(filter, agent_onboard),
        Op::SourceList => on(filter, source_list),
        Op::SourceAdd => on(filter, source_add),
        Op::SourceShow => on(filter, source_show),
        Op::SourceUpdate => on(filter, source_update),
        Op::SourceDelete => on(filter, source_delete),
        Op::SourceEnable => on(filter, source_enable),
        Op::SourceDisable => on(filter, source_disable),
        Op::SourceAssign => on(filter, source_assign),
        Op::DeviceList => on(filter, device_list),
        Op::DeviceShow => on(filter, device_show),
        Op::DeviceUnmerge => on(filter, device_unmerge),
    }
}

/// The API's router over `admin`, accepting `token`.
pub fn router(admin: Admin, token: AdminToken, onboarding: OnboardingSettings) -> Router {
    let api = Api {
        admin,
        token: Arc::new(token),
        onboarding: Arc::new(onboarding),
    };
    let (mut open, mut guarded) = (Router::new(), Router::new());
    for r in ROUTES {
        if r.public {
            open = open.route(r.path, handler(r.verb, r.op));
        } else {
            guarded = guarded.route(r.path, handler(r.verb, r.op));
        }
    }
    // route_layer: only matched routes need the token, so an unknown path
    // is a plain 404.
    guarded
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token))
        .merge(open)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// A bound, not yet serving, admin API.
pub struct AdminApi {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
}

impl fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminApi")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl AdminApi {
    /// Resolves the token and binds `settings.listen`; `admin` is `None`
    /// when the gateway has no database, which the API cannot do without.
    pub async fn bind(
        settings: &AdminApiConfig,
        admin: Option<Admin>,
        onboarding: OnboardingSettings,
    ) -> Result<Self, GatewayError> {
        let admin = admin.ok_or_else(|| AdminApiError::NoDatabase {
            listen: settings.listen.clone(),
        })?;
        let env = std::env::var(ADMIN_TOKEN_ENV).ok();
        let (token, origin) = resolve_token(settings, env)?;
        let bind_err = |source| GatewayError::Bind {
            addr: format!("{} (admin.listen)", settings.listen),
            source,
        };
        let listener = TcpListener::bind(&settings.listen)
            .await
            .map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        tracing::info!(addr = %local_addr, token = %origin, "admin API bound (bearer token required)");
        Ok(Self {
            listener,
            local_addr,
            router: router(admin, token, onboarding),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` turns true (or its sender is dropped).
    pub fn spawn(self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let addr = self.local_addr;
        let serve = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(%addr, error = %e, "admin API stopped with an error");
            }
        })
    }
}

/// Waits (bounded) for the admin API task to finish after shutdown was
/// signalled; in-flight requests get [`SHUTDOWN_GRACE`].
pub async fn join(mut task: JoinHandle<()>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
        .await
        .is_err()
    {
        tracing::warn!("admin API requests still open after the grace period; aborting them");
        task.abort();
    }
}

// ---- responses ---------------------------------------------------------

/// An error answer: `{"error": message}` with `status`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// `WWW-Authenticate` value of a 401.
    challenge: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            challenge: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json(
            self.status,
            &ErrorBody {
                error: &self.message,
            },
        );
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        response
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let status = match &e {
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
            AdminError::NeedsSyncAgent(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let AdminError::Internal(message) = &e {
            // Store and sealing errors: database paths and SQLite messages,
            // never credential values (those are sealed before any query).
            tracing::error!(error = %message, "admin API request failed");
            return Self::new(status, format!("internal error: {message}"));
        }
        Self::new(status, e.to_string())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::bad_request(format!("path: {}", e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::bad_request(format!("query string: {}", e.body_text()))
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        // Over MAX_BODY_BYTES is 413; the status comes with the rejection.
        Self::new(e.status(), format!("request body: {}", e.body_text()))
    }
}

type ApiResult = Result<Response, ApiError>;

/// A JSON answer. Serialising our own types cannot fail; if it ever did,
/// the client gets a 500 rather than a broken body.
fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "admin API: cannot serialise a response");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                r#"{"error":"internal error: cannot serialise the response"}"#,
            )
                .into_response()
        }
    }
}

fn ok<T: Serialize + ?Sized>(value: &T) -> ApiResult {
    Ok(json(StatusCode::OK, value))
}

/// Parses a JSON request body; serde's message (unknown field, wrong type,
/// with line and column) becomes the 400 answer.
fn body<T: DeserializeOwned>(bytes: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = bytes?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

// ---- authentication ----------------------------------------------------

/// The bearer token of an `Authorization` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    let (message, challenge) = match bearer(request.headers()) {
        Some(token) if api.token.matches(token) => return next.run(request).await,
        Some(_) => (
            "invalid admin token",
            r#"Bearer realm="serviceradar-gateway-admin", error="invalid_token""#,
        ),
        None => (
            "missing bearer token: send `Authorization: Bearer <admin token>`",
            r#"Bearer realm="serviceradar-gateway-admin""#,
        ),
    };
    tracing::info!(method = %request.method(), path = %request.uri().path(), reason = message, "admin API request refused");
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.to_owned(),
        challenge: Some(challenge),
    }
    .into_response()
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {method} {} (see /api/v1/openapi.json)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not accept {method} (see /api/v1/openapi.json)",
            uri.path()
        ),
    )
}

// ---- handlers ----------------------------------------------------------

async fn health() -> ApiResult {
    ok(&serde_json::json!({"status": "ok"}))
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI_JSON,
    )
        .into_response()
}

async fn tenant_list(State(api): State<Api>) -> ApiResult {
    ok(&api.admin.tenant_list().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    slug: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn tenant_add(State(api): State<Api>, bytes: Result<Bytes, BytesRejection>) -> ApiResult {
    let new: NewTenant = body(bytes)?;
    let tenant = api
        .admin
        .tenant_add(&new.slug, new.name.as_deref(), new.id.as_deref())
        .await?;
    Ok(json(StatusCode::CREATED, &tenant))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    #[serde(default)]
    tenant: Option<String>,
}

async fn agent_list(
    State(api): State<Api>,
    query: Result<Query<AgentQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query?;
    let tenant = query.tenant.as_deref().filter(|t| !t.is_empty());
    ok(&api.admin.agent_list(tenant).await?)
}

async fn tenant_agent_list(
    State(api): State<Api>,
    tenant: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(tenant) = tenant?;
    ok(&api.admin.agent_list(Some(&tenant)).await?)
}

async fn source_list(
    State(api): State<Api>,
    tenant: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(tenant) = tenant?;
    ok(&api.admin.source_list(Some(&tenant)).await?)
}

async fn source_add(
    State(api): State<Api>,
    tenant: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(tenant) = tenant?;
    let spec: SourceSpec = body(bytes)?;
    let view = api.admin.source_add(&tenant, spec).await?;
    Ok(json(StatusCode::CREATED, &view))
}

/// `POST /api/v1/tenants/{tenant}/agents`: the tenant comes from the path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    agent_id: String,
    #[serde(default)]
    partition: Option<String>,
    #[serde(default)]
    gateway_addr: Option<String>,
    #[serde(default)]
    server_name: Option<String>,
}

/// Onboarding over the API returns the bundle, private key included: the
/// caller holds the admin token, which already allows issuing agents.
async fn agent_onboard(
    State(api): State<Api>,
    tenant: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path(tenant) = tenant?;
    let new: NewAgent = body(bytes)?;
    let request = OnboardRequest {
        tenant,
        agent_id: new.agent_id,
        partition: new.partition.unwrap_or_else(|| "default".to_owned()),
        gateway_addr: new.gateway_addr,
        server_name: new.server_name,
    };
    let bundle = api.admin.onboard_agent(request, &api.onboarding).await?;
    tracing::info!(tenant = %bundle.tenant_slug, agent_id = %bundle.agent_id,
        "agent onboarded through the admin API");
    Ok(json(StatusCode::CREATED, &bundle))
}

type SourcePath = Result<Path<(String, String)>, PathRejection>;

async fn source_show(State(api): State<Api>, path: SourcePath) -> ApiResult {
    let Path((tenant, source)) = path?;
    ok(&api.admin.source_show(&tenant, &source).await?)
}

async fn source_update(
    State(api): State<Api>,
    path: SourcePath,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path((tenant, source)) = path?;
    let patch: SourcePatch = body(bytes)?;
    ok(&api.admin.source_update(&tenant, &source, patch).await?)
}

async fn source_delete(State(api): State<Api>, path: SourcePath) -> ApiResult {
    let Path((tenant, source)) = path?;
    api.admin.source_delete(&tenant, &source).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn source_enable(State(api): State<Api>, path: SourcePath) -> ApiResult {
    let Path((tenant, source)) = path?;
    ok(&api.admin.source_set_enabled(&tenant, &source, true).await?)
}

async fn source_disable(State(api): State<Api>, path: SourcePath) -> ApiResult {
    let Path((tenant, source)) = path?;
    ok(&api
        .admin
        .source_set_enabled(&tenant, &source, false)
        .await?)
}

/// `{"agent_id": "x"}` assigns, `{"agent_id": null}` unassigns; the field
/// is required so that an empty body never unassigns by accident.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Assign {
    #[serde(deserialize_with = "required_nullable")]
    agent_id: Option<String>,
}

/// With `deserialize_with` (and no `default`), serde reports a missing field
/// instead of reading it as `None`.
fn required_nullable<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

async fn source_assign(
    State(api): State<Api>,
    path: SourcePath,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Path((tenant, source)) = path?;
    let assign: Assign = body(bytes)?;
    ok(&api
        .admin
        .source_assign(&tenant, &source, assign.agent_id.as_deref())
        .await?)
}

/// The query string of `GET …/devices`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceListQuery {
    #[serde(default)]
    partition: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    include_merged: Option<bool>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
}

async fn device_list(
    State(api): State<Api>,
    tenant: Result<Path<String>, PathRejection>,
    query: Result<Query<DeviceListQuery>, QueryRejection>,
) -> ApiResult {
    let Path(tenant) = tenant?;
    let Query(q) = query?;
    let query = DeviceQuery {
        tenant,
        partition: q.partition,
        source: q.source,
        ip: q.ip,
        include_merged: q.include_merged.unwrap_or(false),
        limit: q.limit,
        offset: q.offset.unwrap_or(0),
    };
    ok(&api.admin.devices(&query).await?)
}

/// `{tenant}` and `{device}` (a canonical id, `sr:<uuid>`; the `:` may be
/// sent as is or as `%3A`).
type DevicePath = Result<Path<(String, String)>, PathRejection>;

async fn device_show(State(api): State<Api>, path: DevicePath) -> ApiResult {
    let Path((tenant, device)) = path?;
    ok(&api.admin.device(&tenant, &device).await?)
}

/// No request body: the latest merge into the device is undone.
async fn device_unmerge(State(api): State<Api>, path: DevicePath) -> ApiResult {
    let Path((tenant, device)) = path?;
    ok(&api.admin.device_unmerge(&tenant, &device).await?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{json, Value};

    use super::*;

    fn doc() -> Value {
        serde_json::from_str(OPENAPI_JSON).unwrap()
    }

    const METHODS: &[&str] = &[
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    /// (METHOD, path) of every operation in the document.
    fn documented(doc: &Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if METHODS.contains(&method.as_str()) {
                    out.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_describes_exactly_the_routes() {
        let doc = doc();
        let routes: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.verb.as_str().to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(routes.len(), ROUTES.len(), "a route is listed twice");
        let documented = documented(&doc);
        let missing: Vec<_> = routes.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "routes not in openapi.json: {missing:?}; documented but not routed: {extra:?}"
        );
    }

    #[test]
    fn the_document_marks_exactly_the_public_routes_as_unauthenticated() {
        let doc = doc();
        assert_eq!(
            doc["security"],
            json!([{"bearerAuth": []}]),
            "token required by default"
        );
        assert_eq!(
            doc["components"]["securitySchemes"]["bearerAuth"],
            json!({"type": "http", "scheme": "bearer"})
        );
        for r in ROUTES {
            let op = &doc["paths"][r.path][r.verb.as_str().to_ascii_lowercase()];
            let open = op.get("security") == Some(&json!([]));
            assert_eq!(open, r.public, "{} {}", r.verb.as_str(), r.path);
            if !r.public {
                assert!(
                    op["responses"].get("401").is_some(),
                    "{} {} documents no 401",
                    r.verb.as_str(),
                    r.path
                );
            }
        }
    }

    /// Every operation declares its path parameters, and every `$ref`
    /// resolves.
    #[test]
    fn the_document_is_self_consistent() {
        let doc = doc();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for (path, item) in doc["paths"].as_object().unwrap() {
            let placeholders: BTreeSet<String> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_owned)
                .collect();
            for (method, op) in item.as_object().unwrap() {
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let declared: BTreeSet<String> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| resolve(&doc, p))
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(declared, placeholders, "{method} {path}");
                assert!(
                    op["operationId"].is_string(),
                    "{method} {path}: operationId"
                );
            }
        }
        check_refs(&doc, &doc);
    }

    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {r}")),
            None => v,
        }
    }

    fn check_refs(doc: &Value, v: &Value) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    assert!(
                        doc.pointer(r.trim_start_matches('#')).is_some(),
                        "dangling $ref {r}"
                    );
                }
                map.values().for_each(|v| check_refs(doc, v));
            }
            Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v)),
            _ => {}
        }
    }

    /// A value of the schema's type, for probing the request structs.
    fn sample(doc: &Value, schema: &Value) -> Value {
        let schema = resolve(doc, schema);
        let ty = match &schema["type"] {
            Value::String(t) => t.clone(),
            Value::Array(types) => types
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap()
                .to_owned(),
            _ => "object".to_owned(),
        };
        match ty.as_str() {
            "string" => match schema.get("enum") {
                Some(Value::Array(values)) => values[0].clone(),
                _ => json!("x"),
            },
            "integer" => json!(1),
            "boolean" => json!(true),
            "array" => json!([]),
            _ => json!({}),
        }
    }

    /// Every property the document lists for a request body is a field the
    /// server accepts (the structs deny unknown fields), and the required
    /// ones are the ones serde requires.
    #[test]
    fn request_schemas_match_the_request_types() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        fn accepts<T: DeserializeOwned>(v: &Value) -> Result<(), String> {
            serde_json::from_value::<T>(v.clone())
                .map(drop)
                .map_err(|e| e.to_string())
        }
        type Check = fn(&Value) -> Result<(), String>;
        let cases: [(&str, Check); 5] = [
            ("SourceSpec", accepts::<SourceSpec>),
            ("SourcePatch", accepts::<SourcePatch>),
            ("NewTenant", accepts::<NewTenant>),
            ("Assign", accepts::<Assign>),
            ("NewAgent", accepts::<NewAgent>),
        ];
        for (name, check) in cases {
            let schema = &schemas[name];
            assert_eq!(schema["additionalProperties"], json!(false), "{name}");
            let props = schema["properties"].as_object().unwrap();
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let minimal: serde_json::Map<String, Value> = required
                .iter()
                .map(|k| (k.to_string(), sample(&doc, &props[*k])))
                .collect();
            check(&Value::Object(minimal.clone()))
                .unwrap_or_else(|e| panic!("{name}: required fields only: {e}"));
            for key in &required {
                let mut without = minimal.clone();
                without.remove(*key);
                assert!(
                    check(&Value::Object(without)).is_err(),
                    "{name}: {key} is documented as required but is not"
                );
            }
            for (key, prop) in props {
                let mut with = minimal.clone();
                with.insert(key.clone(), sample(&doc, prop));
                check(&Value::Object(with))
                    .unwrap_or_else(|e| panic!("{name}.{key} documented but refused: {e}"));
            }
        }
    }

    /// Every query parameter documented for `GET …/devices` is one the
    /// handler reads (its query type denies unknown ones), and nothing else
    /// is accepted.
    #[test]
    fn device_list_parameters_match_the_query_type() {
        let doc = doc();
        let op = &doc["paths"]["/api/v1/tenants/{tenant}/devices"]["get"];
        let documented: Vec<&Value> = op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| resolve(&doc, p))
            .filter(|p| p["in"] == "query")
            .collect();
        assert_eq!(documented.len(), 6);
        let parse = |query: &str| {
            let uri: Uri = format!("/devices?{query}").parse().unwrap();
            Query::<DeviceListQuery>::try_from_uri(&uri).map(drop)
        };
        for param in documented {
            let name = param["name"].as_str().unwrap();
            let value = match sample(&doc, &param["schema"]) {
                Value::String(s) => s,
                other => other.to_string(),
            };
            parse(&format!("{name}={value}"))
                .unwrap_or_else(|e| panic!("{name} documented but refused: {e}"));
        }
        assert!(parse("page=2").is_err());
    }

    #[test]
    fn tokens_compare_by_content_and_never_print() {
        let token = AdminToken::new("0123456789abcdef-secret");
        assert!(token.matches("0123456789abcdef-secret"));
        assert!(!token.matches("0123456789abcdef-secreT"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("secret"));
    }

    #[test]
    fn token_sources_in_order_of_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        std::fs::write(&file, "from-the-file-0123456789\n").unwrap();
        let mut settings = AdminApiConfig {
            listen: "127.0.0.1:0".into(),
            token_file: Some(file.clone()),
            token: Some("from-the-config-0123456789".into()),
        };
        let (token, origin) =
            resolve_token(&settings, Some("from-the-env-0123456789".into())).unwrap();
        assert!(token.matches("from-the-env-0123456789"));
        assert_eq!(origin, TokenOrigin::Env);
        // An empty variable is no token.
        let (token, origin) = resolve_token(&settings, Some(" ".into())).unwrap();
        assert!(token.matches("from-the-config-0123456789"));
        assert_eq!(origin, TokenOrigin::Config);
        settings.token = None;
        let (token, origin) = resolve_token(&settings, None).unwrap();
        assert!(token.matches("from-the-file-0123456789"), "trimmed");
        assert_eq!(origin, TokenOrigin::File(file.clone()));

        std::fs::write(&file, "short\n").unwrap();
        let err = resolve_token(&settings, None).unwrap_err().to_string();
        assert!(
            err.contains("too short") && err.contains("admin.token"),
            "{err}"
        );
        assert!(!err.contains("short\n"));

        settings.token_file = Some(dir.path().join("missing.token"));
        let err = resolve_token(&settings, None).unwrap_err().to_string();
        assert!(err.contains("missing.token"), "{err}");

        settings.token_file = None;
        let err = resolve_token(&settings, None).unwrap_err().to_string();
        assert!(
            err.contains(ADMIN_TOKEN_ENV) && err.contains("admin.token_file"),
            "{err}"
        );
    }

    #[test]
    fn bearer_header_parsing() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn assign_requires_the_agent_field() {
        assert!(serde_json::from_str::<Assign>(r#"{}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Assign>(r#"{"agent_id":null}"#)
                .unwrap()
                .agent_id,
            None
        );
        assert_eq!(
            serde_json::from_str::<Assign>(r#"{"agent_id":"a"}"#)
                .unwrap()
                .agent_id
                .as_deref(),
            Some("a")
        );
    }
}
