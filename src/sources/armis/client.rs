//! The Armis API client (sources.md "Armis"): access token, paged search,
//! streaming into the run's staging.
//!
//! - Token: `POST /api/v1/access_token/` with `api_key`, `api_secret` and
//!   `secret_key` (the public API's name; `api_secret` when not given). It
//!   is cached across pages and runs until shortly before `expiration_utc`;
//!   a 401 on a page fetches a new one once and retries that page.
//! - Search: `GET /api/v1/search/?aql=…&from=…&length=…` per query, from 0,
//!   following `next` while it is a number greater than the current `from`.
//! - A page's envelope (`next`, `success`, the shape of `results`) is read
//!   before the next page is requested; its devices are parsed and mapped
//!   on the staging thread meanwhile. A device object with wrong types is
//!   skipped and counted, a page with a broken envelope fails the run.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ipnet::IpNet;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::encode::{ArmisDeviceFast, ArmisDeviceOf, ArmisDeviceRef, FieldText, LineEncoder};
use super::page::read_page;
use crate::config::bootstrap::SourceHttpPolicy;
use crate::config::sources::{Query, SourceConfig};
use crate::device::UpdateContext;
use crate::sources::http::{excerpt, parse_endpoint, FetchError, Reply, SourceHttp};
use crate::sources::runner::{RunFailure, RunJob};
use crate::sources::stager::{raw_id, DeviceSink, PageStager, StageOutput};
use crate::sources::RunCounts;

pub const TOKEN_PATH: &str = "/api/v1/access_token/";
pub const SEARCH_PATH: &str = "/api/v1/search/";
/// `credentials.page_size` default and cap (sources.md).
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 5000;
/// A token is renewed this long before it expires (or at 90% of its life
/// when that is shorter), so a page never goes out with a dying token.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed when `expiration_utc` is missing or unreadable.
const TOKEN_FALLBACK_LIFETIME: Duration = Duration::from_secs(300);

/// How the token is presented: `Authorization: Bearer <t>` or the raw token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScheme {
    Bearer,
    Raw,
}

/// Armis credentials. `Debug` shows which are set, never their values.
#[derive(Clone)]
struct ArmisCredentials {
    api_key: String,
    api_secret: String,
    secret_key: String,
    scheme: AuthScheme,
}

impl fmt::Debug for ArmisCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArmisCredentials")
            .field("api_key", &"<redacted>")
            .field("api_secret", &"<redacted>")
            .field("scheme", &self.scheme)
            .finish()
    }
}

#[derive(Clone)]
struct CachedToken {
    value: Arc<str>,
    renew_at: SystemTime,
}

/// One Armis source's client. Clones share the connection pool and the
/// token cache.
#[derive(Clone, Debug)]
pub struct ArmisClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: SourceHttp,
    token_url: Url,
    search_url: Url,
    credentials: ArmisCredentials,
    page_size: u32,
    queries: Vec<Query>,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArmisClient")
            .field("search_url", &self.search_url.path())
            .field("credentials", &self.credentials)
            .field("page_size", &self.page_size)
            .field("queries", &self.queries.len())
            .finish_non_exhaustive()
    }
}

/// `credentials.page_size`: default 100, invalid or ≤ 0 ⇒ 100, cap 5000.
pub fn page_size(raw: Option<&str>) -> u32 {
    match raw.map(str::trim).and_then(|s| s.parse::<i64>().ok()) {
        Some(n) if n > 0 => n.min(MAX_PAGE_SIZE as i64) as u32,
        _ => DEFAULT_PAGE_SIZE,
    }
}

impl ArmisClient {
    pub fn new(config: &SourceConfig, policy: SourceHttpPolicy) -> Result<Self, FetchError> {
        let endpoint = parse_endpoint(config.endpoint.as_deref())?;
        let creds = &config.credentials;
        let non_empty = |k: &str| {
            creds
                .get(k)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        // ServiceRadar sends api_key and api_secret; the public Armis API
        // only needs secret_key. Keys go out only when non-empty.
        let api_key = non_empty("api_key").unwrap_or_default();
        let api_secret = non_empty("api_secret").unwrap_or_default();
        let secret_key = non_empty("secret_key").unwrap_or_else(|| api_secret.clone());
        if secret_key.is_empty() {
            return Err(FetchError::Config(
                "credentials.api_secret (or secret_key) is required".into(),
            ));
        }
        let scheme = match non_empty("auth_scheme")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("bearer") => AuthScheme::Bearer,
            Some("raw") => AuthScheme::Raw,
            Some(other) => {
                return Err(FetchError::Config(format!(
                    "credentials.auth_scheme {other:?} is not \"bearer\" or \"raw\""
                )))
            }
        };
        let join = |path: &str| {
            endpoint
                .join(path)
                .map_err(|e| FetchError::Config(format!("endpoint + {path}: {e}")))
        };
        let queries = if config.queries.is_empty() {
            vec![Query {
                label: String::new(),
                query: String::new(),
                sweep_modes: Vec::new(),
            }]
        } else {
            config.queries.clone()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http: SourceHttp::new(policy, config.insecure_skip_verify)?,
                token_url: join(TOKEN_PATH)?,
                search_url: join(SEARCH_PATH)?,
                credentials: ArmisCredentials {
                    api_key,
                    api_secret,
                    secret_key,
                    scheme,
                },
                page_size: page_size(creds.get("page_size")),
                queries,
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub fn page_size(&self) -> u32 {
        self.inner.page_size
    }

    /// One complete run: every query, every page, staged as it arrives.
    pub async fn run(&self, job: RunJob) -> Result<StageOutput, RunFailure> {
        let ctx = Arc::new(job.update_ctx);
        let blacklist: Arc<[IpNet]> = job.blacklist.into();
        let mut stager = PageStager::start(job.writer, move |page: SearchPage, sink| {
            stage_page(page, &ctx, &blacklist, sink)
        });
        let mut counts = RunCounts::default();
        let walked = self.walk(&mut stager, &job.cancel, &mut counts).await;
        stager.conclude(walked, counts).await
    }

    async fn walk(
        &self,
        stager: &mut PageStager<SearchPage>,
        cancel: &std::sync::atomic::AtomicBool,
        counts: &mut RunCounts,
    ) -> Result<(), FetchError> {
        for query in &self.inner.queries {
            let label: Option<Arc<str>> =
                (!query.label.trim().is_empty()).then(|| query.label.trim().into());
            let mut from: u64 = 0;
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(FetchError::Cancelled);
                }
                let request = format!("GET {SEARCH_PATH} (from={from})");
                let body = self.search(&query.query, from, &request, counts).await?;
                counts.pages += 1;
                // `next` decides the following request, so it is needed now;
                // the page itself is parsed by a worker meanwhile, which
                // also checks the `next` found here.
                let next = match scan_next(&body) {
                    Some(next) => next,
                    None => {
                        let (body, request) = (body.clone(), request.clone());
                        tokio::task::spawn_blocking(move || read_envelope(&body, &request))
                            .await
                            .map_err(|e| FetchError::Panicked(e.to_string()))??
                            .next
                    }
                };
                stager
                    .push(SearchPage {
                        body,
                        label: label.clone(),
                        request,
                        next,
                    })
                    .await?;
                match next {
                    Some(next) if next > from => from = next,
                    _ => break,
                }
            }
        }
        Ok(())
    }

    /// One search page's body, with a token refresh on 401.
    async fn search(
        &self,
        aql: &str,
        from: u64,
        request: &str,
        counts: &mut RunCounts,
    ) -> Result<Bytes, FetchError> {
        let mut url = self.inner.search_url.clone();
        {
            let mut query = url.query_pairs_mut();
            if !aql.trim().is_empty() {
                query.append_pair("aql", aql);
            }
            query
                .append_pair("from", &from.to_string())
                .append_pair("length", &self.inner.page_size.to_string());
        }
        let mut refreshed = false;
        loop {
            let token = self.token(counts).await?;
            let authorization = match self.inner.credentials.scheme {
                AuthScheme::Bearer => format!("Bearer {token}"),
                AuthScheme::Raw => token.to_string(),
            };
            let reply = self
                .inner
                .http
                .send(
                    request,
                    |client| {
                        client
                            .get(url.clone())
                            .header(ACCEPT, "application/json")
                            .header(AUTHORIZATION, &authorization)
                    },
                    &mut counts.retries,
                )
                .await?;
            match reply.status {
                s if s.is_success() => return Ok(reply.body),
                StatusCode::UNAUTHORIZED if !refreshed => {
                    // Expired or revoked early: one new token, same page.
                    tracing::info!(
                        request,
                        "access token refused (HTTP 401): fetching a new one"
                    );
                    self.forget_token(&token).await;
                    refreshed = true;
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    return Err(auth_error(request, &reply))
                }
                _ => return Err(unexpected_status(request, &reply)),
            }
        }
    }

    /// The cached token, or a new one when it is missing or about to expire.
    async fn token(&self, counts: &mut RunCounts) -> Result<Arc<str>, FetchError> {
        let mut cached = self.inner.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|t| SystemTime::now() < t.renew_at) {
            return Ok(token.value.clone());
        }
        let token = self.fetch_token(counts).await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Drops the cached token if it is still the one that was refused.
    async fn forget_token(&self, refused: &Arc<str>) {
        let mut cached = self.inner.token.lock().await;
        if cached
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(&t.value, refused))
        {
            *cached = None;
        }
    }

    async fn fetch_token(&self, counts: &mut RunCounts) -> Result<CachedToken, FetchError> {
        let request = format!("POST {TOKEN_PATH}");
        let c = &self.inner.credentials;
        let mut body = serde_json::Map::new();
        if !c.api_key.is_empty() {
            body.insert("api_key".into(), c.api_key.clone().into());
        }
        if !c.api_secret.is_empty() {
            body.insert("api_secret".into(), c.api_secret.clone().into());
        }
        body.insert("secret_key".into(), c.secret_key.clone().into());
        let body = serde_json::Value::Object(body).to_string();
        let reply = self
            .inner
            .http
            .send(
                &request,
                |client| {
                    client
                        .post(self.inner.token_url.clone())
                        .header(ACCEPT, "application/json")
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone())
                },
                &mut counts.retries,
            )
            .await?;
        match reply.status {
            s if s.is_success() => {}
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(auth_error(&request, &reply))
            }
            _ => return Err(unexpected_status(&request, &reply)),
        }
        #[derive(Deserialize)]
        struct TokenReply {
            data: Option<TokenData>,
            success: Option<bool>,
            message: Option<String>,
        }
        #[derive(Deserialize)]
        struct TokenData {
            access_token: Option<String>,
            expiration_utc: Option<String>,
        }
        let parsed: TokenReply = serde_json::from_slice(&reply.body)
            .map_err(|e| FetchError::bad_response(&request, format!("invalid JSON: {e}")))?;
        let data = match (parsed.success, parsed.data) {
            (Some(false), _) | (_, None) => {
                return Err(FetchError::Auth {
                    request,
                    status: reply.status.as_u16(),
                    detail: parsed
                        .message
                        .unwrap_or_else(|| "the answer has no token".into()),
                })
            }
            (_, Some(data)) => data,
        };
        let value = data
            .access_token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| FetchError::bad_response(&request, "data.access_token is missing"))?;
        let now = SystemTime::now();
        let expires = match data.expiration_utc.as_deref().map(parse_expiration) {
            Some(Some(at)) => at,
            other => {
                if other.is_some() {
                    tracing::warn!(
                        "Armis token expiration_utc is not RFC 3339: assuming it lasts {}",
                        humantime::format_duration(TOKEN_FALLBACK_LIFETIME)
                    );
                }
                now + TOKEN_FALLBACK_LIFETIME
            }
        };
        let lifetime = expires.duration_since(now).unwrap_or(Duration::ZERO);
        let margin = TOKEN_MARGIN.min(lifetime / 10);
        Ok(CachedToken {
            value: value.into(),
            renew_at: expires.checked_sub(margin).unwrap_or(now),
        })
    }
}

/// `expiration_utc`, e.g. `2023-10-11T09:49:00.818613+00:00`.
fn parse_expiration(raw: &str) -> Option<SystemTime> {
    let at =
        time::OffsetDateTime::parse(raw.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(SystemTime::from(at))
}

fn auth_error(request: &str, reply: &Reply) -> FetchError {
    FetchError::Auth {
        request: request.to_owned(),
        status: reply.status.as_u16(),
        detail: armis_message(&reply.body),
    }
}

fn unexpected_status(request: &str, reply: &Reply) -> FetchError {
    FetchError::bad_response(
        request,
        format!(
            "HTTP {}: {}",
            reply.status.as_u16(),
            armis_message(&reply.body)
        ),
    )
}

/// Armis errors look like `{"message":"…","success":false}`.
fn armis_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: Option<String>,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { message: Some(m) }) if !m.trim().is_empty() => m,
        _ => excerpt(body),
    }
}

/// What the fetch loop needs of a page before requesting the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    pub next: Option<u64>,
}

/// Reads the envelope only (`results` is checked for shape, not parsed).
fn read_envelope(body: &[u8], request: &str) -> Result<Envelope, FetchError> {
    #[derive(Deserialize)]
    struct Page {
        success: Option<bool>,
        message: Option<String>,
        data: Option<PageData>,
    }
    #[derive(Deserialize)]
    struct PageData {
        next: Option<i64>,
        #[allow(dead_code)] // read to check its shape: an array or null
        results: Option<Vec<serde::de::IgnoredAny>>,
    }
    let page: Page = serde_json::from_slice(body)
        .map_err(|e| FetchError::bad_response(request, format!("invalid search page: {e}")))?;
    if page.success == Some(false) {
        return Err(FetchError::bad_response(
            request,
            format!(
                "success is false: {}",
                page.message.unwrap_or_else(|| "no message".into())
            ),
        ));
    }
    let data = page
        .data
        .ok_or_else(|| FetchError::bad_response(request, "the page has no data object"))?;
    Ok(Envelope {
        next: data.next.and_then(|n| u64::try_from(n).ok()),
    })
}

/// `data.next` read off the start of a page without parsing it: Armis (and
/// the Faker server) put `count`, `next`, `prev` before `results`, so a
/// `"next":` key found before the first `"results"` key is the envelope's
/// (a JSON string cannot contain an unescaped `"next":`). `None` when the
/// page is laid out otherwise; the full envelope parse decides then.
/// A page worker verifies the value against the real parse.
fn scan_next(body: &[u8]) -> Option<Option<u64>> {
    const WINDOW: usize = 512;
    let head = &body[..body.len().min(WINDOW)];
    let find = |needle: &[u8]| head.windows(needle.len()).position(|w| w == needle);
    let key = find(b"\"next\"")?;
    if find(b"\"results\"").is_some_and(|results| results < key) {
        return None;
    }
    let rest = &head[key + 6..];
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    if rest.starts_with(b"null") {
        return Some(None);
    }
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    match rest.get(digits) {
        // A number must end at a delimiter; `-1`, `1.5`, `1e3` go the slow way.
        Some(b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t') if digits > 0 => {
            std::str::from_utf8(&rest[..digits])
                .ok()?
                .parse()
                .ok()
                .map(Some)
        }
        _ => None,
    }
}

/// A downloaded search page on its way to a page worker.
struct SearchPage {
    body: Bytes,
    label: Option<Arc<str>>,
    request: String,
    /// The `next` the fetch loop followed, checked by the worker.
    next: Option<u64>,
}

/// Parses a page's devices, maps and encodes them (a page worker).
///
/// The whole page is parsed into devices in one pass; only when that fails
/// is it parsed again element by element, so that a device with wrong types
/// is skipped and counted instead of failing the run.
fn stage_page(
    page: SearchPage,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    sink: &mut DeviceSink,
) -> Result<(), FetchError> {
    let envelope = process_page(
        &page.body,
        page.label.as_deref(),
        &page.request,
        ctx,
        blacklist,
        sink,
    )?;
    // The fetch loop followed a `next` read off the start of the page: the
    // full parse is authoritative.
    if envelope.next != page.next {
        return Err(FetchError::bad_response(
            &page.request,
            format!(
                "data.next is {:?} but {:?} was read from the start of the page",
                envelope.next, page.next
            ),
        ));
    }
    Ok(())
}

/// Parses one search page body, maps and encodes its devices into `sink`,
/// and returns its envelope. `request` names the page in errors. Public
/// for the pipeline benchmark.
pub fn process_page(
    body: &[u8],
    label: Option<&str>,
    request: &str,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    sink: &mut DeviceSink,
) -> Result<Envelope, FetchError> {
    // The encoder is per page: its per-run prefix is a few hundred bytes,
    // cheap next to a page of devices.
    let encoder = LineEncoder::new(ctx, "armis");
    fn emit<S: FieldText>(
        device: &ArmisDeviceOf<S>,
        encoder: &LineEncoder,
        label: Option<&str>,
        blacklist: &[IpNet],
        sink: &mut DeviceSink,
    ) {
        match LineEncoder::addresses(device, blacklist) {
            Ok(ips) => sink.emit_json(device.id, |out| encoder.write(device, &ips, label, out)),
            Err(skip) => sink.skip(device.id, skip),
        }
    }
    // One pass, devices streamed as they are parsed, every string borrowed.
    // Only when that fails (a string with escapes, a device with wrong
    // types) is the page read again element by element, so that such a
    // device is still mapped, or skipped and counted, instead of failing
    // the run.
    let head = match read_page::<ArmisDeviceFast<'_>>(body, &mut |device| {
        emit(&device, &encoder, label, blacklist, sink)
    }) {
        Ok(head) => head,
        Err(_) => {
            sink.clear();
            let mut i = 0;
            read_page::<&RawValue>(body, &mut |raw| {
                match serde_json::from_str::<ArmisDeviceRef<'_>>(raw.get()) {
                    Ok(device) => emit(&device, &encoder, label, blacklist, sink),
                    Err(e) => sink.invalid(raw_id(raw), || format!("{request}: result {i}: {e}")),
                }
                i += 1;
            })
            .map_err(|e| FetchError::bad_response(request, format!("invalid search page: {e}")))?
        }
    };
    if head.success == Some(false) {
        return Err(FetchError::bad_response(
            request,
            format!(
                "success is false: {}",
                head.message.unwrap_or_else(|| "no message".into())
            ),
        ));
    }
    if !head.has_data {
        return Err(FetchError::bad_response(
            request,
            "the page has no data object",
        ));
    }
    Ok(Envelope {
        next: head.next.and_then(|n| u64::try_from(n).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_next_reads_the_envelope_before_results_only() {
        let page = |s: &str| scan_next(s.as_bytes());
        assert_eq!(
            page(r#"{"data":{"count":2,"next":2,"prev":null,"results":[]}}"#),
            Some(Some(2))
        );
        assert_eq!(
            page(r#"{"data":{"count":0,"next" : null,"results":null}}"#),
            Some(None)
        );
        assert_eq!(page(r#"{"data":{"next":5000}}"#), Some(Some(5000)));
        // After `results`, negative, fractional, exponent, string: the slow way.
        assert_eq!(page(r#"{"data":{"results":[{"next":1}],"next":2}}"#), None);
        for odd in [
            r#"{"data":{"next":-1}}"#,
            r#"{"data":{"next":1.5}}"#,
            r#"{"data":{"next":1e3}}"#,
            r#"{"data":{"next":"2"}}"#,
            r#"{"data":{}}"#,
        ] {
            assert_eq!(page(odd), None, "{odd}");
        }
    }

    fn ctx() -> UpdateContext {
        UpdateContext {
            agent_id: "a".into(),
            gateway_id: "g".into(),
            partition: "p".into(),
            source: "armis",
            timestamp: "t".into(),
        }
    }

    #[test]
    fn a_page_whose_scanned_next_is_not_its_envelope_fails() {
        // A nested `next` before `results` fools the scan; the worker's full
        // parse catches it instead of walking the wrong pages silently.
        let body = r#"{"data":{"meta":{"next":3},"count":1,"results":[{"id":1,"ipAddress":"10.0.0.1"}],"next":null},"success":true}"#;
        let scanned = scan_next(body.as_bytes()).expect("the scan finds a next");
        assert_eq!(scanned, Some(3));
        let page = SearchPage {
            body: Bytes::from_static(body.as_bytes()),
            label: None,
            request: "GET /api/v1/search/ (from=0)".into(),
            next: scanned,
        };
        let err = stage_page(page, &ctx(), &[], &mut DeviceSink::default()).unwrap_err();
        assert_eq!(err.kind(), "bad_response");
        assert!(err.to_string().contains("data.next is None"), "{err}");
    }
}
