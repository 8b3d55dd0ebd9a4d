//! The NetBox API client (sources.md "NetBox"): token scheme, `next`-link
//! paging, NetBox's error bodies, and the page pipeline into the run's
//! staging file.
//!
//! # One run
//!
//! 1. `GET {endpoint}/api/dcim/devices/?limit=<page_size>&offset=0&omit=config_context`
//!    (the endpoint may carry a path prefix such as `https://host/netbox`;
//!    a trailing `/api` is dropped, as in ServiceRadar's documented example
//!    `https://netbox.example.com/api`). Never `brief` (no IPs in brief
//!    mode); `omit=` rather than `exclude=`, which NetBox 4.7 ignores.
//! 2. The fetch loop downloads a page, reads only its envelope (`next` and
//!    the length of `results`, skipping the devices without building them),
//!    and hands the raw body to the [`PageStager`], whose thread parses the
//!    devices one by one and stages them while the next page downloads. At
//!    most a couple of pages are in memory, whatever the inventory size.
//! 3. It follows `next` until it is null or a page has no results. A relative
//!    `next` is resolved against the request URL; an absolute one keeps its
//!    path and query but goes to the configured endpoint's scheme, host and
//!    port: NetBox builds `next` from the request's Host / X-Forwarded-Host,
//!    so behind a proxy it may name an internal host (logged once per
//!    client). A `next` naming a page already fetched fails the run.
//!
//! A run is delivered only if complete: on any error (or cancellation) the
//! staged part is removed and the error says which request failed, as
//! `GET /api/dcim/devices/ (offset=2000)` — a path and a paging position,
//! never a host, a query string or the token.
//!
//! # Errors
//!
//! NetBox answers a missing or bad token with **403** (a 401 from a proxy is
//! treated alike): [`FetchError::Auth`] with NetBox's message. Other 4xx are
//! [`FetchError::BadResponse`]. Error bodies come as `{"detail": "…"}`,
//! `{"<field>": ["…"]}` or `["…"]`; each gives a readable message (other
//! bodies an excerpt). 5xx, 429 and transport errors are retried by
//! [`SourceHttp::send`]. A device object with wrong types is skipped and
//! counted (`skipped_invalid`); a page whose envelope is wrong fails the run.
//!
//! # Credentials
//!
//! `api_token` (or `token`): tokens starting `nbt_` (NetBox ≥ 4.5 v2) are
//! sent as `Authorization: Bearer <token>`, others (v1) as
//! `Authorization: Token <token>`. `verify_ssl: "false"` (any case) skips
//! certificate verification, like `insecure_skip_verify`. `page_size`
//! (default 1000, NetBox's usual `MAX_PAGE_SIZE`; invalid or ≤ 0 ⇒ 1000).

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ipnet::IpNet;
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::mapping::{map_device, NetboxDevice};
use crate::config::bootstrap::SourceHttpPolicy;
use crate::config::sources::SourceConfig;
use crate::device::UpdateContext;
use crate::sources::http::{excerpt, parse_endpoint, FetchError, SourceHttp};
use crate::sources::runner::{RunFailure, RunJob};
use crate::sources::stager::{raw_id, DeviceSink, PageStager, StageOutput};
use crate::sources::RunCounts;

/// Devices per page unless `credentials.page_size` says otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 1000;

/// The device list, relative to the endpoint.
const DEVICES_PATH: &str = "api/dcim/devices/";

/// Bodies up to this size have their envelope read on the fetching task;
/// larger ones on tokio's blocking pool (reading a 1000-device page takes
/// milliseconds, too long for an actor's thread).
const INLINE_SCAN_BYTES: usize = 64 * 1024;

/// The NetBox side of one source. Cloning is cheap and shares the HTTP
/// connection pool. `Debug` never shows the token.
#[derive(Clone)]
pub struct NetboxClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: SourceHttp,
    /// The source's name, for logs.
    name: String,
    /// The configured endpoint: every request goes to its scheme, host and port.
    endpoint: Url,
    /// `{endpoint}/api/dcim/devices/`, no query.
    devices: Url,
    /// `Bearer <token>` or `Token <token>`, marked sensitive.
    authorization: HeaderValue,
    bearer: bool,
    /// The raw token, only to scrub it from error messages.
    token: Secret,
    page_size: u32,
    insecure: bool,
    /// Whether the `next`-host rewrite was already logged at warn level.
    origin_warned: AtomicBool,
}

struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for NetboxClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let this = &*self.inner;
        f.debug_struct("NetboxClient")
            .field("source", &this.name)
            .field("endpoint", &display_endpoint(&this.endpoint))
            .field("auth_scheme", &if this.bearer { "Bearer" } else { "Token" })
            .field("token", &this.token)
            .field("page_size", &this.page_size)
            .field("insecure_skip_verify", &this.insecure)
            .finish_non_exhaustive()
    }
}

impl NetboxClient {
    /// Builds the client from the source's configuration. Errors
    /// ([`FetchError::Config`]) name the missing or bad field.
    pub fn new(config: &SourceConfig, policy: SourceHttpPolicy) -> Result<Self, FetchError> {
        let endpoint = parse_endpoint(config.endpoint.as_deref())?;
        let devices = devices_url(&endpoint)?;
        let credentials = &config.credentials;
        let token = ["api_token", "token"]
            .into_iter()
            .find_map(|key| {
                credentials
                    .get(key)
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
            })
            .ok_or_else(|| {
                FetchError::Config(
                    "a NetBox source needs an API token in credentials.api_token \
                     (or credentials.token)"
                        .into(),
                )
            })?;
        let bearer = token.starts_with("nbt_");
        let scheme = if bearer { "Bearer" } else { "Token" };
        let mut authorization =
            HeaderValue::from_str(&format!("{scheme} {token}")).map_err(|_| {
                FetchError::Config(
                    "the NetBox API token (credentials.api_token / credentials.token) contains \
                 characters that cannot go into an HTTP header"
                        .into(),
                )
            })?;
        authorization.set_sensitive(true);
        let verify_off = credentials
            .get("verify_ssl")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
        let insecure = config.insecure_skip_verify || verify_off;
        let http = SourceHttp::new(policy, insecure)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                name: config.name.clone(),
                endpoint,
                devices,
                authorization,
                bearer,
                token: Secret(token.to_owned()),
                page_size: page_size(credentials.get("page_size")),
                insecure,
                origin_warned: AtomicBool::new(false),
            }),
        })
    }

    /// Devices requested per page.
    pub fn page_size(&self) -> u32 {
        self.inner.page_size
    }

    /// Whether certificate verification is off (`insecure_skip_verify` or
    /// `verify_ssl: "false"`).
    pub fn insecure_skip_verify(&self) -> bool {
        self.inner.insecure
    }

    /// The first page's URL.
    pub fn first_page_url(&self) -> Url {
        let mut url = self.inner.devices.clone();
        url.query_pairs_mut()
            .append_pair("limit", &self.inner.page_size.to_string())
            .append_pair("offset", "0")
            .append_pair("omit", "config_context");
        url
    }

    /// Fetches every page and stages every device into `job.writer`. On
    /// success the output's counts include the pages fetched and the
    /// retries made; on failure nothing is delivered (the staged part is
    /// removed) and the failure carries those two counts.
    pub async fn run(&self, job: RunJob) -> Result<StageOutput, RunFailure> {
        let RunJob {
            update_ctx,
            blacklist,
            writer,
            cancel,
        } = job;
        let mut stager = PageStager::start(writer, move |page: Page, sink: &mut DeviceSink| {
            stage_page(page, sink, &update_ctx, &blacklist)
        });
        let mut counts = RunCounts::default();
        let walked = self.walk(&mut stager, &cancel, &mut counts).await;
        stager.conclude(walked, counts).await
    }

    /// The fetch loop: download, read the envelope, queue, follow `next`.
    async fn walk(
        &self,
        stager: &mut PageStager<Page>,
        cancel: &AtomicBool,
        counts: &mut RunCounts,
    ) -> Result<(), FetchError> {
        let mut url = self.first_page_url();
        let mut fetched: HashSet<String> = HashSet::new();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(FetchError::Cancelled);
            }
            let request = request_name(&url, counts.pages + 1);
            fetched.insert(url.as_str().to_owned());
            let reply = self
                .inner
                .http
                .send(
                    &request,
                    |client| {
                        client
                            .get(url.clone())
                            .header(ACCEPT, "application/json")
                            .header(AUTHORIZATION, self.inner.authorization.clone())
                    },
                    &mut counts.retries,
                )
                .await?;
            if !reply.status.is_success() {
                return Err(self.status_error(&request, reply.status, &reply.body));
            }
            counts.pages += 1;
            let body = reply.body;
            let envelope = scan_envelope(body.clone())
                .await?
                .map_err(|detail| FetchError::bad_response(&request, self.scrub(detail)))?;
            tracing::debug!(
                source = %self.inner.name,
                request,
                devices = envelope.results,
                bytes = body.len(),
                "NetBox page fetched"
            );
            if envelope.results == 0 {
                // An offset past the end (or a cursor page after the last
                // full one): nothing more to fetch, whatever `next` says.
                return Ok(());
            }
            stager
                .push(Page {
                    body,
                    request: request.clone(),
                })
                .await?;
            let Some(next) = envelope.next.filter(|n| !n.trim().is_empty()) else {
                return Ok(());
            };
            let next = self
                .next_url(&url, next.trim())
                .map_err(|detail| FetchError::bad_response(&request, detail))?;
            if fetched.contains(next.as_str()) {
                return Err(FetchError::bad_response(
                    &request,
                    format!(
                        "paging loop: `next` points back to a page already fetched ({})",
                        request_name(&next, counts.pages + 1)
                    ),
                ));
            }
            url = next;
        }
    }

    /// Resolves `next` against the request URL and pins it to the configured
    /// endpoint's scheme, host and port (and user info).
    fn next_url(&self, current: &Url, next: &str) -> Result<Url, String> {
        let resolved = current
            .join(next)
            .map_err(|e| format!("`next` is not a usable URL: {e}"))?;
        if !matches!(resolved.scheme(), "http" | "https") {
            return Err(format!(
                "`next` is not an http(s) URL (scheme {:?})",
                resolved.scheme()
            ));
        }
        let mut pinned = self.inner.endpoint.clone();
        pinned.set_path(resolved.path());
        pinned.set_query(resolved.query());
        pinned.set_fragment(None);
        if pinned.origin() != resolved.origin() {
            let named = resolved.origin().ascii_serialization();
            let configured = self.inner.endpoint.origin().ascii_serialization();
            if self.inner.origin_warned.swap(true, Ordering::Relaxed) {
                tracing::debug!(source = %self.inner.name, named, configured, "NetBox `next` link rewritten to the configured endpoint");
            } else {
                tracing::warn!(
                    source = %self.inner.name,
                    named,
                    configured,
                    "NetBox paging links name another host than the configured endpoint \
                     (NetBox builds them from the Host / X-Forwarded-Host header, e.g. behind \
                     a proxy); following them on the configured endpoint"
                );
            }
        }
        Ok(pinned)
    }

    /// The error for a final non-2xx answer.
    fn status_error(&self, request: &str, status: StatusCode, body: &[u8]) -> FetchError {
        let message = self.scrub(error_message(body));
        match status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => FetchError::Auth {
                request: request.to_owned(),
                status: status.as_u16(),
                detail: message,
            },
            _ => FetchError::bad_response(request, format!("HTTP {status}: {message}")),
        }
    }

    /// Removes the token from text that came from the server (a proxy could
    /// echo request headers back).
    fn scrub(&self, text: String) -> String {
        if !self.inner.token.0.is_empty() && text.contains(self.inner.token.0.as_str()) {
            text.replace(self.inner.token.0.as_str(), "<redacted>")
        } else {
            text
        }
    }
}

/// A downloaded page on its way to the staging thread.
struct Page {
    body: Bytes,
    /// Names the request in errors.
    request: String,
}

/// What the fetch loop needs from a page before fetching the next one.
#[derive(Debug)]
pub struct Envelope {
    pub next: Option<String>,
    /// Length of `results`.
    pub results: usize,
}

/// Reads a page's envelope (`next`, the length of `results`) without
/// building the devices; big pages on the blocking pool. The outer error is
/// a panic of that task, the inner one the reason the page is unusable.
async fn scan_envelope(body: Bytes) -> Result<Result<Envelope, String>, FetchError> {
    if body.len() <= INLINE_SCAN_BYTES {
        return Ok(parse_envelope(&body));
    }
    tokio::task::spawn_blocking(move || parse_envelope(&body))
        .await
        .map_err(|e| {
            if e.is_panic() {
                FetchError::Panicked(crate::actors::supervisor::panic_message(&*e.into_panic()))
            } else {
                FetchError::Cancelled
            }
        })
}

fn parse_envelope(body: &[u8]) -> Result<Envelope, String> {
    // JSON is UTF-8 (RFC 8259 §8.1), checked for the whole page: serde_json
    // only checks the strings it reads, so a stray byte in a skipped key
    // would pass while the same byte in a device fails the page.
    if let Err(e) = std::str::from_utf8(body) {
        return Err(format!(
            "invalid JSON page: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ));
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        next: Option<String>,
        #[serde(default)]
        results: Option<Counted>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| invalid_page(&e, body))?;
    // serde reads a struct from a JSON array as well (`[null, []]`), and
    // an empty list ends the run as complete: a list must be an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("not a NetBox list: the page is not a JSON object".into());
    }
    let Some(Counted(results)) = raw.results else {
        return Err("not a NetBox list: no `results` array".into());
    };
    Ok(Envelope {
        next: raw.next,
        results,
    })
}

/// One page as a run reads it, without the HTTP: the envelope first (an
/// unusable one fails the page, naming `request`), then, unless `results`
/// is empty (the run stops there), every device staged into `sink`.
/// `#[doc(hidden)]`: it exists for the property tests and fuzz targets,
/// which have no NetBox server; runs go through `walk` and the stager.
#[doc(hidden)]
pub fn process_page(
    body: &[u8],
    request: &str,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
    sink: &mut DeviceSink,
) -> Result<Envelope, FetchError> {
    let envelope =
        parse_envelope(body).map_err(|detail| FetchError::bad_response(request, detail))?;
    if envelope.results > 0 {
        let page = Page {
            body: Bytes::copy_from_slice(body),
            request: request.to_owned(),
        };
        stage_page(page, sink, ctx, blacklist)?;
    }
    Ok(envelope)
}

/// A JSON array whose elements are skipped, only counted.
struct Counted(usize);

impl<'de> Deserialize<'de> for Counted {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Counted;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of devices")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Counted, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Counted(n))
            }
        }
        deserializer.deserialize_seq(CountVisitor)
    }
}

/// Why a page is not a usable NetBox list; bodies that are not JSON at all
/// (a proxy's HTML page) are quoted.
fn invalid_page(e: &serde_json::Error, body: &[u8]) -> String {
    let looks_like_json = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'['));
    if looks_like_json || body.is_empty() {
        format!("invalid JSON page: {e}")
    } else {
        format!(
            "invalid JSON page: {e}; the body starts with: {}",
            excerpt(body)
        )
    }
}

/// The staging side: parses one page and stages its devices. One device
/// that cannot be read is counted and skipped; the page as a whole must be a
/// NetBox list.
fn stage_page(
    page: Page,
    sink: &mut DeviceSink,
    ctx: &UpdateContext,
    blacklist: &[IpNet],
) -> Result<(), FetchError> {
    #[derive(Deserialize)]
    struct RawPage<'a> {
        #[serde(borrow)]
        results: Vec<&'a RawValue>,
    }
    let parsed: RawPage<'_> = serde_json::from_slice(&page.body)
        .map_err(|e| FetchError::bad_response(&page.request, invalid_page(&e, &page.body)))?;
    for (index, raw) in parsed.results.into_iter().enumerate() {
        let device = match serde_json::from_str::<NetboxDevice>(raw.get()) {
            Ok(device) => device,
            Err(e) => {
                sink.invalid(raw_id(raw), || {
                    describe_invalid(&page.request, index, raw, &e)
                });
                continue;
            }
        };
        let id = device.id;
        sink.emit(id, map_device(device, ctx, blacklist))?;
    }
    Ok(())
}

fn describe_invalid(request: &str, index: usize, raw: &RawValue, e: &serde_json::Error) -> String {
    match raw_id(raw) {
        Some(id) => {
            format!("{request}: device id {id} (#{index} on the page) cannot be read: {e}")
        }
        _ => format!("{request}: device #{index} on the page cannot be read: {e}"),
    }
}

/// A readable message from a NetBox error body: `{"detail": "…"}`,
/// `{"<field>": ["…"]}`, `["…"]`; anything else as an excerpt.
pub fn error_message(body: &[u8]) -> String {
    const MAX_PARSE: usize = 64 * 1024;
    if body.len() <= MAX_PARSE {
        if let Some(message) = serde_json::from_slice::<Value>(body)
            .ok()
            .as_ref()
            .and_then(json_message)
        {
            // `excerpt` blanks control characters: a message of nothing
            // else (`"\u007f"`) would read as no message at all.
            let message = excerpt(message.as_bytes());
            if !message.is_empty() {
                return message;
            }
        }
    }
    let text = excerpt(body);
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text
    }
}

fn json_message(value: &Value) -> Option<String> {
    match value {
        Value::Object(map) => {
            if let Some(detail) = map.get("detail").and_then(json_text) {
                return Some(detail);
            }
            let parts: Vec<String> = map
                .iter()
                .filter_map(|(field, v)| json_text(v).map(|t| format!("{field}: {t}")))
                .collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        other => json_text(other),
    }
}

fn json_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(json_text).collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        Value::Object(_) => json_message(value),
        other => Some(other.to_string()),
    }
}

/// `METHOD /path (position)`: how errors and logs name a request. Only the
/// path and a numeric paging position: no host, no other query parameter.
fn request_name(url: &Url, page: u64) -> String {
    let numeric = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let position = url
        .query_pairs()
        .find(|(k, v)| (k == "offset" || k == "start") && numeric(v))
        .map(|(k, v)| format!("{k}={v}"))
        .unwrap_or_else(|| format!("page {page}"));
    format!("GET {} ({position})", url.path())
}

/// `{endpoint}/api/dcim/devices/`, keeping a path prefix of the endpoint
/// (`https://host/netbox` → `/netbox/api/dcim/devices/`). A trailing `/api`
/// is dropped: ServiceRadar documents endpoints like
/// `https://netbox.example.com/api`.
fn devices_url(endpoint: &Url) -> Result<Url, FetchError> {
    let mut base = endpoint.clone();
    base.set_query(None);
    base.set_fragment(None);
    let mut path = base.path().trim_end_matches('/').to_owned();
    if path.ends_with("/api") {
        path.truncate(path.len() - "/api".len());
    }
    path.push('/');
    base.set_path(&path);
    base.join(DEVICES_PATH)
        .map_err(|e| FetchError::Config(format!("cannot build the NetBox devices URL: {e}")))
}

/// The endpoint for logs: no user info.
fn display_endpoint(endpoint: &Url) -> String {
    let mut shown = endpoint.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.to_string()
}

/// `credentials.page_size`: a positive integer, else [`DEFAULT_PAGE_SIZE`].
fn page_size(raw: Option<&str>) -> u32 {
    raw.and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_url_keeps_a_prefix_and_drops_a_trailing_api() {
        for (endpoint, expected) in [
            (
                "https://nb.example.com",
                "https://nb.example.com/api/dcim/devices/",
            ),
            (
                "https://nb.example.com/",
                "https://nb.example.com/api/dcim/devices/",
            ),
            (
                "https://nb.example.com/netbox",
                "https://nb.example.com/netbox/api/dcim/devices/",
            ),
            (
                "https://nb.example.com/netbox/",
                "https://nb.example.com/netbox/api/dcim/devices/",
            ),
            (
                "https://nb.example.com/api",
                "https://nb.example.com/api/dcim/devices/",
            ),
            (
                "https://nb.example.com/netbox/api/",
                "https://nb.example.com/netbox/api/dcim/devices/",
            ),
            (
                "http://10.0.0.1:8001/?x=1",
                "http://10.0.0.1:8001/api/dcim/devices/",
            ),
        ] {
            let url = devices_url(&Url::parse(endpoint).unwrap()).unwrap();
            assert_eq!(url.as_str(), expected, "{endpoint}");
        }
    }

    #[test]
    fn page_size_parsing() {
        assert_eq!(page_size(None), 1000);
        assert_eq!(page_size(Some("500")), 500);
        assert_eq!(page_size(Some(" 250 ")), 250);
        for bad in ["0", "-5", "abc", "", "1.5", "99999999999"] {
            assert_eq!(page_size(Some(bad)), 1000, "{bad}");
        }
    }

    #[test]
    fn request_names_carry_only_path_and_position() {
        let url = Url::parse("https://h:8443/nb/api/dcim/devices/?limit=1000&offset=3000&secret=x")
            .unwrap();
        assert_eq!(
            request_name(&url, 4),
            "GET /nb/api/dcim/devices/ (offset=3000)"
        );
        let url = Url::parse("https://h/api/dcim/devices/?limit=1000&start=2001").unwrap();
        assert_eq!(request_name(&url, 3), "GET /api/dcim/devices/ (start=2001)");
        let url = Url::parse("https://h/api/dcim/devices/?cursor=abc").unwrap();
        assert_eq!(request_name(&url, 2), "GET /api/dcim/devices/ (page 2)");
        let url = Url::parse("https://h/api/dcim/devices/?offset=1;DROP").unwrap();
        assert_eq!(request_name(&url, 2), "GET /api/dcim/devices/ (page 2)");
    }

    #[test]
    fn error_messages_from_the_three_shapes() {
        assert_eq!(
            error_message(br#"{"detail": "Invalid v2 token"}"#),
            "Invalid v2 token"
        );
        assert_eq!(
            error_message(br#"{"site": ["Select a valid choice."], "role": ["A", "B"]}"#),
            "role: A; B; site: Select a valid choice."
        );
        assert_eq!(
            error_message(br#"["'start' and 'offset' are mutually exclusive."]"#),
            "'start' and 'offset' are mutually exclusive."
        );
        assert_eq!(
            error_message(b"<html><body>Bad Gateway</body></html>"),
            "<html><body>Bad Gateway</body></html>"
        );
        assert_eq!(error_message(b""), "(empty body)");
        assert_eq!(error_message(br#"{"detail": null, "x": 5}"#), "x: 5");
        assert_eq!(error_message(br#"{"cf": {"a": ["bad"]}}"#), "cf: a: bad");
    }

    #[test]
    fn envelope_scan() {
        let e = parse_envelope(br#"{"count":2,"next":"http://x/?offset=2","previous":null,"results":[{"id":1},{"id":2,"a":[1,{"b":"c"}]}]}"#).unwrap();
        assert_eq!(e.results, 2);
        assert_eq!(e.next.as_deref(), Some("http://x/?offset=2"));
        let e =
            parse_envelope(br#"{"count":null,"next":null,"previous":null,"results":[]}"#).unwrap();
        assert_eq!((e.results, e.next), (0, None));
        for bad in [
            &br#"{"count":1,"results":{"id":1}}"#[..],
            br#"{"count":1,"results":null}"#,
            br#"{"count":1}"#,
            br#"["x"]"#,
            br#"{"next":5,"results":[]}"#,
            br#"{"results":[{"id":1},"#,
            b"<html>",
            // serde reads a struct from an array: not a list all the same
            // (found checking the `netbox_page` fuzz target's property).
            br#"[null,[]]"#,
            br#" ["http://x/?offset=2",[{"id":1}]]"#,
        ] {
            assert!(
                parse_envelope(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_envelope(b"<html>oops</html>")
            .unwrap_err()
            .contains("<html>oops"));
    }

    /// Found by the `netbox_page` fuzz target: a JSON message made only of
    /// control characters gave an empty message; the body's excerpt (or
    /// "(empty body)") is used instead.
    #[test]
    fn an_unreadable_message_falls_back_to_the_body() {
        assert_eq!(error_message(b"\"\x7f\"\n\n\n\n"), "\" \"");
        assert_eq!(
            error_message(br#"{"detail": "\u0001"}"#),
            r#"{"detail": "\u0001"}"#
        );
        assert_eq!(error_message(b"\x7f\x01"), "(empty body)");
    }

    /// The rule the Armis page reader got from its fuzz target: invalid
    /// UTF-8 is refused wherever it is (here in a key nobody reads), with
    /// its offset.
    #[test]
    fn a_page_that_is_not_utf8_is_refused() {
        let err = parse_envelope(b"{\"results\":[],\"x\":\"\xff\"}").unwrap_err();
        assert!(
            err.contains("not UTF-8 (invalid byte at offset 19)"),
            "{err}"
        );
    }
}
