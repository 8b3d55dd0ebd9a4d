//! The Armis source against a mock Armis API (sources.md "Armis"): token
//! flow and caching, paging rules, retries, error classes, mapping of what
//! real pages contain, and the staged result.

mod source_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serviceradar_agent::config::bootstrap::SourceHttpPolicy;
use serviceradar_agent::device::DeviceUpdate;
use serviceradar_agent::sources::armis::client::ArmisClient;
use serviceradar_agent::sources::runner::RunFailure;
use serviceradar_agent::sources::stager::StageOutput;
use source_support::{fast_policy, json_body, source_config, staged_updates, Staging};
use wiremock::matchers::{body_json, header, method, path, query_param};
use wiremock::{Mock, MockBuilder, MockServer, Request, Respond, ResponseTemplate};

const TOKEN: &str = "/api/v1/access_token/";
const SEARCH: &str = "/api/v1/search/";
const API_SECRET: &str = "s3cr3t-api-secret";

fn credentials(extra: Value) -> Value {
    let mut c = json!({"api_key": "ak_live_3F9x", "api_secret": API_SECRET});
    if let (Some(base), Value::Object(extra)) = (c.as_object_mut(), extra) {
        base.extend(extra);
    }
    c
}

fn client(server: &MockServer, fields: Value) -> ArmisClient {
    let mut fields = fields;
    if fields.get("credentials").is_none() {
        fields["credentials"] = credentials(json!({}));
    }
    ArmisClient::new(
        &source_config("armis", &server.uri(), fields),
        fast_policy(),
    )
    .expect("client builds")
}

/// A client with the default credentials at `endpoint` under `policy`.
fn client_with(endpoint: &str, policy: SourceHttpPolicy) -> ArmisClient {
    let config = source_config(
        "armis",
        endpoint,
        json!({"credentials": credentials(json!({}))}),
    );
    ArmisClient::new(&config, policy).expect("client builds")
}

/// An Armis device with a unique address.
fn device(id: u64) -> Value {
    json!({"id": id, "ipAddress": format!("10.1.{}.{}", id / 250, id % 250 + 1),
        "macAddress": format!("aa:bb:cc:00:{:02x}:{:02x}", id / 256, id % 256),
        "name": format!("dev-{id}"), "type": "Laptop", "category": "Endpoint",
        "riskLevel": 0, "tags": [], "customProperties": null, "site": null})
}

/// An Armis with a token issuer and a first page (device 1) whose `next`
/// is `next`; the test mounts what follows.
async fn first_page_then(next: Value) -> MockServer {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .and(query_param("from", "0"))
        .respond_with(page(json!([device(1)]), next))
        .mount(&server)
        .await;
    server
}

/// A mock of the search endpoint, to refine with matchers.
fn search() -> MockBuilder {
    Mock::given(method("GET")).and(path(SEARCH))
}

fn page(results: Value, next: Value) -> ResponseTemplate {
    let count = results.as_array().map_or(0, Vec::len);
    json_body(
        json!({"data": {"count": count, "next": next, "prev": null, "results": results,
            "total": 50000}, "success": true})
        .to_string(),
    )
}

/// Issues `tok-1`, `tok-2`, … and counts the calls.
#[derive(Clone, Default)]
struct TokenIssuer {
    issued: Arc<AtomicUsize>,
    /// Validity of each token from now; `None` sends no expiration.
    lifetime: Option<i64>,
}

impl Respond for TokenIssuer {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let expiration = self.lifetime.map(|secs| {
            let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
            at.format(&time::format_description::well_known::Rfc3339)
                .expect("format")
                .replace('Z', "+00:00")
        });
        json_body(
            json!({"data": {"access_token": format!("tok-{n}"), "expiration_utc": expiration},
                "success": true})
            .to_string(),
        )
    }
}

impl TokenIssuer {
    fn hour() -> Self {
        Self {
            lifetime: Some(3600),
            ..Self::default()
        }
    }

    async fn mount(&self, server: &MockServer) {
        Mock::given(method("POST"))
            .and(path(TOKEN))
            .respond_with(self.clone())
            .mount(server)
            .await;
    }

    fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

async fn run_ok(client: &ArmisClient, staging: &Staging) -> (StageOutput, Vec<DeviceUpdate>) {
    match client.run(staging.job("armis", &[], false)).await {
        Ok(output) => {
            let updates = staged_updates(&output);
            (output, updates)
        }
        Err(failure) => panic!("run failed: {}", failure.error),
    }
}

async fn run_err(client: &ArmisClient, staging: &Staging) -> RunFailure {
    match client.run(staging.job("armis", &[], false)).await {
        Ok(output) => panic!("run succeeded with {:?}", output.counts),
        Err(failure) => {
            assert!(
                staging.leftovers().is_empty(),
                "a failed run left {:?} in staging",
                staging.leftovers()
            );
            let text = format!("{} {:?}", failure.error, failure.error);
            assert!(
                !text.contains(API_SECRET) && !text.contains("tok-"),
                "{text}"
            );
            failure
        }
    }
}

fn ids(updates: &[DeviceUpdate]) -> Vec<u64> {
    updates
        .iter()
        .map(|u| u.metadata["armis_device_id"].parse().expect("id"))
        .collect()
}

#[tokio::test]
async fn token_request_sends_key_secret_and_secret_key_then_pages_follow_next() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN))
        .and(body_json(
            json!({"api_key": "ak_live_3F9x", "api_secret": API_SECRET,
            "secret_key": API_SECRET}),
        ))
        .respond_with(TokenIssuer::hour())
        .expect(1)
        .mount(&server)
        .await;
    // Pages of 2 (page_size from credentials), `aql` as configured, a Bearer
    // token; `next` walks 0 → 2 → 4, then null ends the query.
    for (from, results, next) in [
        ("0", json!([device(1), device(2)]), json!(2)),
        ("2", json!([device(3), device(4)]), json!(4)),
        ("4", json!([device(5)]), Value::Null),
    ] {
        search()
            .and(query_param("from", from))
            .and(query_param("length", "2"))
            .and(query_param("aql", "in:devices"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(page(results, next))
            .expect(1)
            .mount(&server)
            .await;
    }
    let client = client(
        &server,
        json!({"credentials": credentials(json!({"page_size": "2"})),
            "queries": [{"label": "All", "query": "in:devices"}]}),
    );
    let staging = Staging::new();
    let (output, updates) = run_ok(&client, &staging).await;
    assert_eq!(ids(&updates), [1, 2, 3, 4, 5]);
    assert_eq!(output.counts.pages, 3);
    assert_eq!(output.counts.retries, 0);
    let first = &updates[0];
    assert_eq!(first.source, "armis");
    assert_eq!(first.device_id, "lab:10.1.0.2");
    assert_eq!(first.mac.as_deref(), Some("AA:BB:CC:00:00:01"));
    assert_eq!(first.metadata["query_label"], "All");
    assert_eq!(first.metadata["integration_type"], "armis");
}

#[tokio::test]
async fn token_is_cached_across_runs_and_renewed_when_about_to_expire() {
    let server = MockServer::start().await;
    let issuer = TokenIssuer::hour();
    issuer.mount(&server).await;
    search()
        .respond_with(page(json!([device(1)]), json!(0)))
        .mount(&server)
        .await;
    let client = client(&server, json!({}));
    let staging = Staging::new();
    run_ok(&client, &staging).await;
    run_ok(&client, &staging).await;
    assert_eq!(issuer.issued(), 1, "one token for two runs");

    // A token past its renewal point (here: already expired) is not reused.
    let server = MockServer::start().await;
    let short = TokenIssuer {
        lifetime: Some(-1),
        ..TokenIssuer::default()
    };
    short.mount(&server).await;
    search()
        .respond_with(page(json!([device(1)]), json!(0)))
        .mount(&server)
        .await;
    let client = self::client(&server, json!({}));
    run_ok(&client, &staging).await;
    run_ok(&client, &staging).await;
    assert_eq!(short.issued(), 2);
}

#[tokio::test]
async fn token_expiring_mid_run_is_refreshed_once_and_the_page_retried() {
    let server = MockServer::start().await;
    let issuer = TokenIssuer::hour();
    issuer.mount(&server).await;
    search()
        .and(query_param("from", "0"))
        .and(header("authorization", "Bearer tok-1"))
        .respond_with(page(json!([device(1)]), json!(1)))
        .mount(&server)
        .await;
    // The server revokes tok-1 before page 2.
    search()
        .and(header("authorization", "Bearer tok-1"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"message": "Invalid access token", "success": false})),
        )
        .mount(&server)
        .await;
    search()
        .and(query_param("from", "1"))
        .and(header("authorization", "Bearer tok-2"))
        .respond_with(page(json!([device(2)]), Value::Null))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(&server, json!({}));
    let staging = Staging::new();
    let (_, updates) = run_ok(&client, &staging).await;
    assert_eq!(ids(&updates), [1, 2]);
    assert_eq!(issuer.issued(), 2);
}

#[tokio::test]
async fn a_token_refused_twice_fails_the_run_as_auth() {
    let server = MockServer::start().await;
    let issuer = TokenIssuer::hour();
    issuer.mount(&server).await;
    search()
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"message": "Invalid access token", "success": false})),
        )
        .mount(&server)
        .await;
    let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(failure.error.kind(), "auth");
    assert!(failure.error.to_string().contains("Invalid access token"));
    assert_eq!(issuer.issued(), 2, "one refresh, not a loop");
}

#[tokio::test]
async fn a_bad_secret_is_an_auth_error_with_armis_message() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"message": "Invalid secret key", "success": false})),
        )
        .mount(&server)
        .await;
    let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(failure.error.kind(), "auth");
    let text = failure.error.to_string();
    assert!(
        text.contains("Invalid secret key") && text.contains(TOKEN),
        "{text}"
    );
}

#[tokio::test]
async fn raw_auth_scheme_and_secret_key_credential() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN))
        .and(body_json(
            json!({"api_key": "ak_live_3F9x", "api_secret": API_SECRET,
            "secret_key": "the-public-api-secret"}),
        ))
        .respond_with(TokenIssuer::hour())
        .expect(1)
        .mount(&server)
        .await;
    search()
        .and(header("authorization", "tok-1"))
        .respond_with(page(json!([device(7)]), Value::Null))
        .expect(1)
        .mount(&server)
        .await;
    let client = client(
        &server,
        json!({"credentials": credentials(json!({"auth_scheme": "raw",
            "secret_key": "the-public-api-secret"}))}),
    );
    let (_, updates) = run_ok(&client, &Staging::new()).await;
    assert_eq!(ids(&updates), [7]);
}

#[tokio::test]
async fn rate_limit_honours_retry_after() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    search()
        .respond_with(page(json!([device(1)]), Value::Null))
        .mount(&server)
        .await;
    let mut policy = fast_policy();
    policy.retry_after_cap = Duration::from_secs(5);
    let client = client_with(&server.uri(), policy);
    let started = Instant::now();
    let output = client
        .run(Staging::new().job("armis", &[], false))
        .await
        .expect("run succeeds after the 429");
    // The backoff alone would have waited 1 ms: the wait is Retry-After's.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(output.counts.retries, 1);
}

#[tokio::test]
async fn rate_limit_that_never_ends_fails_as_rate_limit() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
        .mount(&server)
        .await;
    let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(failure.error.kind(), "rate_limit");
    assert_eq!(failure.counts.retries, 3, "bounded by max_retries");
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream busy"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    search()
        .respond_with(page(json!([device(1), device(2)]), Value::Null))
        .mount(&server)
        .await;
    let (output, updates) = run_ok(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(ids(&updates), [1, 2]);
    assert_eq!(output.counts.retries, 2);
}

#[tokio::test]
async fn persistent_server_errors_fail_the_run_and_name_the_request() {
    let server = first_page_then(json!(1)).await;
    search()
        .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
        .mount(&server)
        .await;
    let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(failure.error.kind(), "server_error");
    let text = failure.error.to_string();
    assert!(
        text.contains("GET /api/v1/search/ (from=1)") && text.contains("502"),
        "{text}"
    );
    assert!(!text.contains("127.0.0.1"), "no host in errors: {text}");
    assert_eq!(failure.counts.pages, 1);
}

#[tokio::test]
async fn an_unreachable_api_is_a_network_error() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let client = client_with(&uri, fast_policy());
    let staging = Staging::new();
    let failure = run_err(&client, &staging).await;
    assert_eq!(failure.error.kind(), "network");
    assert_eq!(failure.counts.retries, 3);
}

#[tokio::test]
async fn truncated_json_fails_the_run_and_stages_nothing() {
    let server = first_page_then(json!(1)).await;
    let full = json!({"data": {"next": null, "results": [device(2), device(3)]}}).to_string();
    search()
        .and(query_param("from", "1"))
        .respond_with(json_body(&full.as_bytes()[..full.len() / 2]))
        .mount(&server)
        .await;
    let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(failure.error.kind(), "bad_response");
    assert!(failure.error.to_string().contains("from=1"));
}

#[tokio::test]
async fn wrong_types_in_a_device_skip_it_wrong_envelope_fails_the_run() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    let mut bad = device(2);
    bad["riskLevel"] = json!("high");
    search()
        .respond_with(page(json!([device(1), bad, device(3)]), Value::Null))
        .mount(&server)
        .await;
    let (output, updates) = run_ok(&client(&server, json!({})), &Staging::new()).await;
    assert_eq!(ids(&updates), [1, 3]);
    assert_eq!(output.counts.skipped_invalid, 1);
    let first = output
        .first_invalid
        .expect("the skipped device is described");
    assert!(
        first.contains("result 1") && first.contains("invalid type"),
        "{first}"
    );

    for envelope in [
        json!({"data": {"next": null, "results": "oops"}, "success": true}),
        json!({"data": {"next": "soon", "results": []}, "success": true}),
        json!({"success": false, "message": "query failed"}),
        json!([1, 2, 3]),
    ] {
        let server = MockServer::start().await;
        TokenIssuer::hour().mount(&server).await;
        search()
            .respond_with(json_body(envelope.to_string()))
            .mount(&server)
            .await;
        let failure = run_err(&client(&server, json!({})), &Staging::new()).await;
        assert_eq!(failure.error.kind(), "bad_response", "{envelope}");
    }
}

#[tokio::test]
async fn paging_stops_on_null_zero_or_backwards_next_and_accepts_null_results() {
    for (last_next, expected_pages) in [(Value::Null, 2), (json!(0), 2), (json!(1), 2)] {
        let server = MockServer::start().await;
        TokenIssuer::hour().mount(&server).await;
        search()
            .and(query_param("from", "0"))
            .respond_with(page(json!([device(1), device(2)]), json!(2)))
            .mount(&server)
            .await;
        search()
            .and(query_param("from", "2"))
            .respond_with(page(json!([device(3)]), last_next.clone()))
            .expect(1)
            .mount(&server)
            .await;
        let (output, updates) = run_ok(&client(&server, json!({})), &Staging::new()).await;
        assert_eq!(ids(&updates), [1, 2, 3], "next {last_next}");
        assert_eq!(output.counts.pages, expected_pages);
    }

    // `results: null` past the end, and an empty inventory.
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(json_body(
            json!({"data": {"count": 0, "next": null, "results": null, "total": 0},
                "success": true})
            .to_string(),
        ))
        .mount(&server)
        .await;
    let (output, updates) = run_ok(&client(&server, json!({})), &Staging::new()).await;
    assert!(updates.is_empty());
    assert_eq!((output.counts.devices, output.counts.pages), (0, 1));
}

#[tokio::test]
async fn comma_lists_blacklist_and_missing_ips() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    let results = json!([
        {"id": 1, "ipAddress": "not-an-ip, 192.168.1.10 ,10.0.0.1", "macAddress": "zz, a4:bb:6d:5a:11:c0,3C:97:0E:00:01:01",
         "name": "multi", "riskLevel": 3, "tags": ["a", " b "], "boundaries": "DMZ"},
        {"id": 2, "ipAddress": "", "macAddress": null, "name": "no-ip"},
        {"id": 3, "ipAddress": null, "name": "null-ip"},
        {"id": 4, "ipAddress": "10.255.3.4", "name": "blacklisted"},
        {"id": 5, "ipAddress": "2001:db8::5", "name": "v6"}
    ]);
    search()
        .respond_with(page(results, Value::Null))
        .mount(&server)
        .await;
    let client = client(&server, json!({}));
    let staging = Staging::new();
    let output = client
        .run(staging.job("armis", &["10.255.0.0/16"], false))
        .await
        .expect("run");
    let updates = staged_updates(&output);
    assert_eq!(ids(&updates), [1, 5]);
    let multi = &updates[0];
    assert_eq!(multi.ip, "192.168.1.10");
    assert_eq!(multi.mac.as_deref(), Some("A4:BB:6D:5A:11:C0"));
    assert_eq!(multi.metadata["all_ips"], "192.168.1.10,10.0.0.1");
    assert_eq!(multi.metadata["ip_count"], "2");
    assert_eq!(multi.metadata["armis_risk_level"], "3");
    assert_eq!(multi.metadata["armis_tags"], "a,b");
    assert_eq!(updates[1].device_id, "lab:2001:db8::5");
    assert_eq!(output.counts.skipped_no_ip, 2);
    assert_eq!(output.counts.blacklisted, 1);
}

#[tokio::test]
async fn a_device_returned_by_several_queries_is_emitted_once() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .and(query_param("aql", "in:devices type:Laptop"))
        .respond_with(page(json!([device(1), device(2)]), Value::Null))
        .mount(&server)
        .await;
    search()
        .and(query_param("aql", "in:devices riskLevel:>0"))
        .respond_with(page(json!([device(2), device(3)]), Value::Null))
        .mount(&server)
        .await;
    let client = client(
        &server,
        json!({"queries": [
            {"label": "Laptops", "query": "in:devices type:Laptop"},
            {"label": "Risky", "query": "in:devices riskLevel:>0"}]}),
    );
    let (output, updates) = run_ok(&client, &Staging::new()).await;
    assert_eq!(ids(&updates), [1, 2, 3]);
    assert_eq!(output.counts.skipped_duplicate, 1);
    // The first query that returned a device labels it.
    assert_eq!(updates[1].metadata["query_label"], "Laptops");
    assert_eq!(updates[2].metadata["query_label"], "Risky");
}

#[tokio::test]
async fn no_queries_means_one_search_without_aql() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(|req: &Request| {
            let has_aql = req.url.query_pairs().any(|(k, _)| k == "aql");
            let length = req
                .url
                .query_pairs()
                .find(|(k, _)| k == "length")
                .map(|(_, v)| v.into_owned());
            assert!(!has_aql, "no aql without a query");
            assert_eq!(length.as_deref(), Some("100"), "default page size");
            page(json!([device(1)]), Value::Null)
        })
        .expect(1)
        .mount(&server)
        .await;
    run_ok(&client(&server, json!({})), &Staging::new()).await;
}

#[test]
fn page_size_defaults_and_caps() {
    use serviceradar_agent::sources::armis::client::page_size;
    assert_eq!(page_size(None), 100);
    assert_eq!(page_size(Some("500")), 500);
    assert_eq!(page_size(Some("99999")), 5000);
    for bad in ["0", "-3", "lots", ""] {
        assert_eq!(page_size(Some(bad)), 100, "{bad:?}");
    }
}

#[test]
fn bad_configuration_is_named_and_secrets_stay_out_of_debug() {
    let missing = source_config(
        "armis",
        "https://acme.armis.com",
        json!({"credentials": {"api_key": "k"}}),
    );
    let err = ArmisClient::new(&missing, fast_policy()).expect_err("no secret");
    assert!(
        err.to_string().contains("api_secret (or secret_key)"),
        "{err}"
    );

    let scheme = source_config(
        "armis",
        "https://acme.armis.com",
        json!({"credentials": credentials(json!({"auth_scheme": "basic"}))}),
    );
    let err = ArmisClient::new(&scheme, fast_policy()).expect_err("bad scheme");
    assert!(err.to_string().contains("auth_scheme"), "{err}");

    let ok = source_config(
        "armis",
        "https://acme.armis.com",
        json!({"credentials": credentials(json!({}))}),
    );
    let client = ArmisClient::new(&ok, fast_policy()).expect("client");
    let debug = format!("{client:?}");
    assert!(
        !debug.contains(API_SECRET) && !debug.contains("ak_live"),
        "{debug}"
    );
}

#[tokio::test]
async fn a_request_over_its_timeout_is_retried() {
    let server = MockServer::start().await;
    TokenIssuer::hour().mount(&server).await;
    search()
        .respond_with(page(json!([device(1)]), Value::Null).set_delay(Duration::from_secs(5)))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    search()
        .respond_with(page(json!([device(1), device(2)]), Value::Null))
        .mount(&server)
        .await;
    let mut policy = fast_policy();
    policy.request_timeout = Duration::from_millis(200);
    let client = client_with(&server.uri(), policy);
    let output = client
        .run(Staging::new().job("armis", &[], false))
        .await
        .expect("the retry succeeds");
    assert_eq!((output.counts.devices, output.counts.retries), (2, 1));
}

#[tokio::test]
async fn the_public_api_form_sends_only_secret_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TOKEN))
        .and(body_json(json!({"secret_key": "only-the-secret-key"})))
        .respond_with(TokenIssuer::hour())
        .expect(1)
        .mount(&server)
        .await;
    search()
        .respond_with(page(json!([device(3)]), Value::Null))
        .mount(&server)
        .await;
    let client = client(
        &server,
        json!({"credentials": {"secret_key": "only-the-secret-key"}}),
    );
    let (_, updates) = run_ok(&client, &Staging::new()).await;
    assert_eq!(ids(&updates), [3]);
}
