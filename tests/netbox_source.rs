//! The NetBox source against a mock NetBox (sources.md "NetBox"): recorded
//! responses of a real NetBox 4.7.3 (tests/fixtures/netbox/), paging,
//! authentication, error bodies, retries and the staged result.

mod source_support;

use std::path::Path;

use serde_json::{json, Value};
use serviceradar_agent::config::sources::SourceConfig;
use serviceradar_agent::device::DeviceUpdate;
use serviceradar_agent::sources::http::FetchError;
use serviceradar_agent::sources::netbox::client::NetboxClient;
use serviceradar_agent::sources::runner::RunFailure;
use serviceradar_agent::sources::stager::StageOutput;
use source_support::{fast_policy, json_body, source_config, staged_updates, Staging};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const V2_TOKEN: &str = "nbt_AAAAAAAAAAAA.BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const V1_TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";
const DEVICES: &str = "/api/dcim/devices/";

fn fixture(name: &str) -> Vec<u8> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/netbox")
        .join(name);
    std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// A NetBox source as `config_json` carries it.
fn source(endpoint: &str, credentials: Value) -> SourceConfig {
    source_config(
        "netbox",
        endpoint,
        json!({"credentials": credentials, "partition": "lab"}),
    )
}

fn client(endpoint: &str, credentials: Value) -> NetboxClient {
    NetboxClient::new(&source(endpoint, credentials), fast_policy()).unwrap()
}

async fn run_ok(client: &NetboxClient, staging: &Staging) -> (StageOutput, Vec<DeviceUpdate>) {
    match client.run(staging.job("netbox", &[], false)).await {
        Ok(output) => {
            let updates = staged_updates(&output);
            (output, updates)
        }
        Err(failure) => panic!("run failed: {}", failure.error),
    }
}

async fn run_err(client: &NetboxClient, staging: &Staging) -> RunFailure {
    match client.run(staging.job("netbox", &[], false)).await {
        Ok(output) => panic!("run succeeded with {:?}", output.counts),
        Err(failure) => {
            assert!(
                staging.leftovers().is_empty(),
                "a failed run left {:?}",
                staging.leftovers()
            );
            failure
        }
    }
}

fn by_netbox_id<'a>(updates: &'a [DeviceUpdate], id: &str) -> &'a DeviceUpdate {
    updates
        .iter()
        .find(|u| u.metadata.get("netbox_device_id").map(String::as_str) == Some(id))
        .unwrap_or_else(|| panic!("no update for NetBox device {id}"))
}

fn ids(updates: &[DeviceUpdate]) -> Vec<String> {
    updates
        .iter()
        .map(|u| u.metadata["netbox_device_id"].clone())
        .collect()
}

/// A synthetic device with a unique IPv4 address; `pad` bytes of
/// description make pages big enough to exercise the off-thread envelope scan.
fn device(id: u64, pad: usize) -> Value {
    json!({
        "id": id, "name": format!("dev-{id:05}"), "description": "x".repeat(pad),
        "status": {"value": "active", "label": "Active"},
        "site": {"id": 1, "name": "Lab", "slug": "lab"},
        "primary_ip4": {"id": id, "address": format!("10.20.{}.{}/24", id / 250, id % 250 + 1)},
        "primary_ip6": null, "tags": [{"name": "t1", "slug": "t1"}], "config_context": {}
    })
}

fn page(devices: Vec<Value>, next: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&json!({"count": 999, "next": next, "previous": null, "results": devices}))
        .unwrap()
}

fn devices(ids: std::ops::Range<u64>, pad: usize) -> Vec<Value> {
    ids.map(|id| device(id, pad)).collect()
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap()
}

fn query(request: &Request, key: &str) -> Option<String> {
    request
        .url
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Mounts a page answering GET {DEVICES} with the given `offset`.
async fn mount_page(server: &MockServer, offset: &str, body: Vec<u8>) {
    Mock::given(method("GET"))
        .and(path(DEVICES))
        .and(query_param("offset", offset))
        .respond_with(json_body(body))
        .mount(server)
        .await;
}

// ---------------------------------------------------------------------------
// Recorded fixtures

#[tokio::test]
async fn recorded_pages_map_to_the_expected_updates() {
    let server = MockServer::start().await;
    // devices_page1.json's `next` names http://127.0.0.1:8001 (the recording
    // server): the client must come back to this server for offset=3.
    mount_page(&server, "0", fixture("devices_page1.json")).await;
    mount_page(&server, "3", fixture("devices_edge_cases.json")).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;

    assert_eq!(ids(&updates), ["1", "11", "21", "61", "28", "123", "355"]);
    let c = output.counts;
    assert_eq!(
        (
            c.devices,
            c.skipped_no_ip,
            c.skipped_invalid,
            c.skipped_duplicate
        ),
        (7, 2, 0, 0)
    );
    assert_eq!((c.pages, c.retries), (2, 0));
    assert_eq!(output.first_invalid, None);

    let first = by_netbox_id(&updates, "1");
    assert_eq!(first.ip, "10.10.0.1");
    assert_eq!(first.device_id, "lab:10.10.0.1");
    assert_eq!(first.hostname.as_deref(), Some("ams1-rtr-0000"));
    assert_eq!(
        (first.mac.as_deref(), first.source.as_str()),
        (None, "netbox")
    );
    assert_eq!(
        (first.agent_id.as_str(), first.partition.as_str()),
        ("agent-edge-01", "lab")
    );
    let metadata: Vec<(&str, &str)> = first
        .metadata
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_str()))
        .collect();
    assert_eq!(
        metadata,
        [
            ("integration_id", "1"),
            ("integration_type", "netbox"),
            ("manufacturer", "Cisco"),
            ("model", "ISR 4331"),
            ("netbox_device_id", "1"),
            ("netbox_tags", "core,monitored"),
            ("platform", "Cisco IOS-XE"),
            ("role", "Router"),
            ("serial", "FOC0100000"),
            ("site", "AMS1 Amsterdam"),
            ("status", "active"),
            ("tenant", "Acme Retail"),
        ]
    );
    assert_eq!(
        by_netbox_id(&updates, "11").metadata["tenant"],
        "Globex Logistics"
    );
    assert!(!by_netbox_id(&updates, "21").metadata.contains_key("tenant"));

    // Edge cases: IPv6-only kept with its v6 address, dual-stack uses v4,
    // statuses are the choice values, 43 and 803 (no primary IP) skipped.
    let v6 = by_netbox_id(&updates, "28");
    assert_eq!(v6.ip, "2001:db8:1::1c");
    assert_eq!(v6.device_id, "lab:2001:db8:1::1c");
    assert_eq!(v6.metadata["role"], "Access Switch");
    assert!(!v6.metadata.contains_key("netbox_tags"));
    assert_eq!(by_netbox_id(&updates, "355").ip, "10.10.1.105");
    assert_eq!(by_netbox_id(&updates, "61").metadata["status"], "offline");
    assert_eq!(by_netbox_id(&updates, "61").ip, "10.10.0.61");
    let decom = by_netbox_id(&updates, "123");
    assert_eq!(decom.metadata["status"], "decommissioning");
    assert_eq!(decom.ip, "10.10.0.123");
    assert!(!decom.metadata.contains_key("tenant"));
    assert!(updates.iter().all(|u| !u.metadata.contains_key("agent_id")));

    // Both requests went to this server, the second one as `next` said.
    let received = requests(&server).await;
    assert_eq!(received.len(), 2);
    assert_eq!(query(&received[1], "limit").as_deref(), Some("3"));
    assert_eq!(query(&received[1], "offset").as_deref(), Some("3"));
}

#[tokio::test]
async fn recorded_fields_min_page_maps() {
    let server = MockServer::start().await;
    mount_page(&server, "0", fixture("devices_fields_min.json")).await;
    // Its `next` (offset=3, fields=…) gets NetBox's empty last page.
    mount_page(&server, "3", fixture("devices_cursor_last_page.json")).await;
    let staging = Staging::new();
    let (output, updates) =
        run_ok(&client(&server.uri(), json!({"token": V1_TOKEN})), &staging).await;
    assert_eq!(ids(&updates), ["1", "11", "21"]);
    assert_eq!(output.counts.pages, 2);
    let u = by_netbox_id(&updates, "11");
    assert_eq!(u.ip, "10.10.0.11");
    let keys: Vec<&str> = u.metadata.keys().map(|k| k.as_ref()).collect();
    assert_eq!(
        keys,
        [
            "integration_id",
            "integration_type",
            "netbox_device_id",
            "netbox_tags",
            "site",
            "status"
        ]
    );
    let received = requests(&server).await;
    assert_eq!(
        query(&received[1], "fields").as_deref(),
        Some("id,name,status,site,primary_ip4,primary_ip6,tags")
    );
}

#[tokio::test]
async fn blacklist_drops_devices_by_their_chosen_ip() {
    let server = MockServer::start().await;
    mount_page(&server, "0", fixture("devices_edge_cases.json")).await;
    let staging = Staging::new();
    let client = client(&server.uri(), json!({"api_token": V2_TOKEN}));
    let output = client
        .run(staging.job("netbox", &["10.10.0.0/24", "2001:db8:1::/64"], false))
        .await
        .map_err(|f| f.error)
        .unwrap();
    // 61 and 123 are in 10.10.0.0/24, 28 in the v6 net; 355 is 10.10.1.105.
    assert_eq!(ids(&staged_updates(&output)), ["355"]);
    assert_eq!(
        (output.counts.blacklisted, output.counts.skipped_no_ip),
        (3, 2)
    );
}

// ---------------------------------------------------------------------------
// Paging

#[tokio::test]
async fn three_pages_with_relative_next() {
    let server = MockServer::start().await;
    // Pages over 64 KiB take the blocking-pool envelope scan.
    mount_page(
        &server,
        "0",
        page(
            devices(1..201, 400),
            Some("/api/dcim/devices/?limit=200&offset=200&omit=config_context"),
        ),
    )
    .await;
    // Relative to the request URL: query only.
    mount_page(
        &server,
        "200",
        page(
            devices(201..401, 400),
            Some("?limit=200&offset=400&omit=config_context"),
        ),
    )
    .await;
    mount_page(&server, "400", page(devices(401..451, 0), None)).await;
    let staging = Staging::new();
    let client = client(
        &server.uri(),
        json!({"api_token": V2_TOKEN, "page_size": "200"}),
    );
    let (output, updates) = run_ok(&client, &staging).await;
    assert_eq!(updates.len(), 450);
    let expected: Vec<String> = (1..451).map(|i| i.to_string()).collect();
    assert_eq!(ids(&updates), expected);
    assert_eq!((output.counts.devices, output.counts.pages), (450, 3));
    let offsets: Vec<Option<String>> = requests(&server)
        .await
        .iter()
        .map(|r| query(r, "offset"))
        .collect();
    assert_eq!(
        offsets,
        [Some("0".into()), Some("200".into()), Some("400".into())]
    );
}

#[tokio::test]
async fn absolute_next_naming_another_host_stays_on_the_endpoint() {
    let server = MockServer::start().await;
    mount_page(
        &server,
        "0",
        page(
            devices(1..3, 0),
            Some("https://netbox.internal:8443/api/dcim/devices/?limit=2&offset=2&omit=config_context"),
        ),
    )
    .await;
    mount_page(
        &server,
        "2",
        page(
            devices(3..5, 0),
            Some("http://10.9.9.9/api/dcim/devices/?limit=2&offset=4&omit=config_context"),
        ),
    )
    .await;
    mount_page(&server, "4", page(devices(5..6, 0), None)).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(ids(&updates), ["1", "2", "3", "4", "5"]);
    assert_eq!(output.counts.pages, 3);
    let received = requests(&server).await;
    assert_eq!(received.len(), 3);
    // They reached this server, and named it in Host (not netbox.internal).
    let address = server.address().to_string();
    for r in &received {
        assert_eq!(r.headers.get("host").unwrap().to_str().unwrap(), address);
        assert_eq!(r.url.path(), DEVICES);
    }
}

#[tokio::test]
async fn endpoint_path_prefix_is_kept() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/netbox/api/dcim/devices/"))
        .and(query_param("offset", "0"))
        .respond_with(json_body(page(
            devices(1..3, 0),
            Some("/netbox/api/dcim/devices/?limit=2&offset=2"),
        )))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/netbox/api/dcim/devices/"))
        .and(query_param("offset", "2"))
        .respond_with(json_body(page(vec![], None)))
        .mount(&server)
        .await;
    let staging = Staging::new();
    let endpoint = format!("{}/netbox", server.uri());
    let (output, updates) =
        run_ok(&client(&endpoint, json!({"api_token": V2_TOKEN})), &staging).await;
    assert_eq!(updates.len(), 2);
    assert_eq!(output.counts.pages, 2);
}

#[tokio::test]
async fn first_request_asks_for_full_objects_without_config_context() {
    let server = MockServer::start().await;
    mount_page(&server, "0", page(vec![], None)).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert!(updates.is_empty());
    assert_eq!(output.counts.pages, 1);
    let received = requests(&server).await;
    assert_eq!(received.len(), 1);
    let first = &received[0];
    assert_eq!(first.url.path(), DEVICES);
    assert_eq!(query(first, "limit").as_deref(), Some("1000"));
    assert_eq!(query(first, "offset").as_deref(), Some("0"));
    assert_eq!(query(first, "omit").as_deref(), Some("config_context"));
    assert_eq!(query(first, "brief"), None);
    assert_eq!(query(first, "exclude"), None);
    assert_eq!(first.headers.get("accept").unwrap(), "application/json");

    // page_size from the credentials; nonsense falls back to 1000.
    for (size, limit) in [("250", "250"), ("-5", "1000"), ("lots", "1000")] {
        let c = client(
            &server.uri(),
            json!({"api_token": V2_TOKEN, "page_size": size}),
        );
        assert_eq!(
            c.first_page_url()
                .query_pairs()
                .find(|(k, _)| k == "limit")
                .unwrap()
                .1,
            limit
        );
    }
}

#[tokio::test]
async fn next_loop_is_a_bad_response() {
    let server = MockServer::start().await;
    mount_page(
        &server,
        "0",
        page(
            devices(1..3, 0),
            Some("?limit=2&offset=2&omit=config_context"),
        ),
    )
    .await;
    // Points back at the first page, spelled exactly as the client asked for it.
    mount_page(
        &server,
        "2",
        page(
            devices(3..5, 0),
            Some("http://other-host/api/dcim/devices/?limit=1000&offset=0&omit=config_context"),
        ),
    )
    .await;
    let staging = Staging::new();
    let failure = run_err(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(failure.error.kind(), "bad_response");
    let message = failure.error.to_string();
    assert!(message.contains("loop"), "{message}");
    assert!(
        message.contains("GET /api/dcim/devices/ (offset=2)"),
        "{message}"
    );
    assert_eq!(failure.counts.pages, 2);
    assert_eq!(requests(&server).await.len(), 2);
}

#[tokio::test]
async fn empty_page_ends_the_walk_even_with_next() {
    let server = MockServer::start().await;
    mount_page(
        &server,
        "0",
        page(devices(1..3, 0), Some("?limit=2&offset=2")),
    )
    .await;
    mount_page(&server, "2", page(vec![], Some("?limit=2&offset=4"))).await;
    Mock::given(method("GET"))
        .and(query_param("offset", "4"))
        .respond_with(json_body(page(devices(5..7, 0), None)))
        .expect(0)
        .mount(&server)
        .await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(ids(&updates), ["1", "2"]);
    assert_eq!(output.counts.pages, 2);
    assert_eq!(requests(&server).await.len(), 2);
}

#[tokio::test]
async fn devices_seen_twice_while_pages_shift_are_staged_once() {
    let server = MockServer::start().await;
    mount_page(
        &server,
        "0",
        page(devices(1..4, 0), Some("?limit=3&offset=3")),
    )
    .await;
    // A device was inserted before these: device 3 shows up again.
    mount_page(&server, "3", page(devices(3..6, 0), None)).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(ids(&updates), ["1", "2", "3", "4", "5"]);
    assert_eq!(output.counts.skipped_duplicate, 1);
}

// ---------------------------------------------------------------------------
// Authentication and errors

#[tokio::test]
async fn v2_tokens_use_bearer_and_v1_tokens_use_token() {
    for (token, expected) in [
        (V2_TOKEN, format!("Bearer {V2_TOKEN}")),
        (V1_TOKEN, format!("Token {V1_TOKEN}")),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(DEVICES))
            .and(header("authorization", expected.as_str()))
            .and(header("accept", "application/json"))
            .respond_with(json_body(page(devices(1..2, 0), None)))
            .mount(&server)
            .await;
        let staging = Staging::new();
        let (_, updates) = run_ok(
            &client(&server.uri(), json!({"api_token": token})),
            &staging,
        )
        .await;
        assert_eq!(updates.len(), 1, "{expected}");
        let received = requests(&server).await;
        assert_eq!(
            received[0].headers.get("authorization").unwrap(),
            expected.as_str()
        );
    }
}

#[tokio::test]
async fn error_bodies_are_reported_with_their_message() {
    let bare_list = br#"["'start' and 'offset' are mutually exclusive."]"#.to_vec();
    let cases: [(u16, Vec<u8>, &str, &str); 5] = [
        (
            403,
            fixture("error_bad_token.json"),
            "auth",
            "Invalid v2 token",
        ),
        (
            403,
            fixture("error_bad_token_v1.json"),
            "auth",
            "Invalid v1 token",
        ),
        (
            403,
            fixture("error_no_token.json"),
            "auth",
            "Authentication credentials were not provided.",
        ),
        (
            403,
            bare_list,
            "auth",
            "'start' and 'offset' are mutually exclusive.",
        ),
        (
            400,
            fixture("error_bad_filter.json"),
            "bad_response",
            "site: Select a valid choice. does-not-exist is not one of the available choices.",
        ),
    ];
    for (status, body, kind, text) in cases {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(status).set_body_raw(body, "application/json"))
            .mount(&server)
            .await;
        let staging = Staging::new();
        let failure = run_err(
            &client(&server.uri(), json!({"api_token": V2_TOKEN})),
            &staging,
        )
        .await;
        let message = failure.error.to_string();
        assert_eq!(failure.error.kind(), kind, "{message}");
        assert!(message.contains(text), "{message}");
        assert!(message.contains(&status.to_string()), "{message}");
        assert!(
            message.contains("GET /api/dcim/devices/ (offset=0)"),
            "{message}"
        );
        assert!(!message.contains("127.0.0.1"), "{message}");
        if let FetchError::Auth { status: s, .. } = &failure.error {
            assert_eq!(*s, 403);
        }
        // No retries for a 4xx.
        assert_eq!((failure.counts.retries, failure.counts.pages), (0, 0));
        assert_eq!(requests(&server).await.len(), 1);
    }
}

#[tokio::test]
async fn server_errors_are_retried_and_counted() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream down"))
        .up_to_n_times(2)
        .mount(&server)
        .await;
    mount_page(&server, "0", page(devices(1..3, 0), None)).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(updates.len(), 2);
    assert_eq!((output.counts.pages, output.counts.retries), (1, 2));
    assert_eq!(requests(&server).await.len(), 3);
}

#[tokio::test]
async fn persistent_server_errors_fail_with_the_retries_counted() {
    let server = MockServer::start().await;
    mount_page(&server, "0", page(devices(1..3, 0), Some("?offset=2"))).await;
    Mock::given(method("GET"))
        .and(query_param("offset", "2"))
        .respond_with(ResponseTemplate::new(502))
        .mount(&server)
        .await;
    let staging = Staging::new();
    let failure = run_err(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(failure.error.kind(), "server_error");
    assert_eq!((failure.counts.pages, failure.counts.retries), (1, 3));
}

#[tokio::test]
async fn truncated_json_fails_and_nothing_is_staged() {
    let server = MockServer::start().await;
    // The first page is staged before the second one turns out truncated.
    mount_page(
        &server,
        "0",
        page(devices(1..3, 0), Some("?limit=2&offset=2")),
    )
    .await;
    let full = page(devices(3..5, 0), None);
    mount_page(&server, "2", full[..full.len() - 40].to_vec()).await;
    let staging = Staging::new();
    let failure = run_err(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(failure.error.kind(), "bad_response");
    let message = failure.error.to_string();
    assert!(
        message.contains("GET /api/dcim/devices/ (offset=2)"),
        "{message}"
    );
    assert!(message.contains("JSON"), "{message}");
    assert_eq!(failure.counts.pages, 2);
}

#[tokio::test]
async fn envelope_without_a_results_array_fails() {
    for body in [
        br#"{"count": 1, "next": null, "results": {"id": 1}}"#.to_vec(),
        br#"{"detail": "not a list"}"#.to_vec(),
        b"<html><body>Sign in</body></html>".to_vec(),
    ] {
        let server = MockServer::start().await;
        mount_page(&server, "0", body).await;
        let staging = Staging::new();
        let failure = run_err(
            &client(&server.uri(), json!({"api_token": V2_TOKEN})),
            &staging,
        )
        .await;
        assert_eq!(failure.error.kind(), "bad_response", "{}", failure.error);
    }
}

#[tokio::test]
async fn a_device_with_wrong_types_is_skipped_and_counted() {
    let server = MockServer::start().await;
    let mut list = devices(1..3, 0);
    list.push(json!({"id": "seven", "name": "bad-id", "primary_ip4": {"address": "10.1.1.7/24"}}));
    list.push(json!({"id": 8, "name": "bad-ip", "primary_ip4": 42}));
    list.extend(devices(9..10, 0));
    mount_page(&server, "0", page(list, None)).await;
    let staging = Staging::new();
    let (output, updates) = run_ok(
        &client(&server.uri(), json!({"api_token": V2_TOKEN})),
        &staging,
    )
    .await;
    assert_eq!(ids(&updates), ["1", "2", "9"]);
    assert_eq!(
        (output.counts.devices, output.counts.skipped_invalid),
        (3, 2)
    );
    let first_invalid = output.first_invalid.unwrap();
    assert!(first_invalid.contains("#2"), "{first_invalid}");
    assert!(
        first_invalid.contains("GET /api/dcim/devices/ (offset=0)"),
        "{first_invalid}"
    );
}

#[tokio::test]
async fn cancelled_run_stops_before_fetching() {
    let server = MockServer::start().await;
    mount_page(&server, "0", page(devices(1..3, 0), None)).await;
    let staging = Staging::new();
    let client = client(&server.uri(), json!({"api_token": V2_TOKEN}));
    let failure = client
        .run(staging.job("netbox", &[], true))
        .await
        .err()
        .unwrap();
    assert_eq!(failure.error.kind(), "cancelled");
    assert!(staging.leftovers().is_empty());
    assert!(requests(&server).await.is_empty());
}

// ---------------------------------------------------------------------------
// Configuration and secrets

#[test]
fn client_configuration() {
    for (credentials, insecure) in [
        (json!({"api_token": V2_TOKEN, "verify_ssl": "false"}), true),
        (json!({"api_token": V2_TOKEN, "verify_ssl": "FALSE"}), true),
        (json!({"api_token": V2_TOKEN, "verify_ssl": "true"}), false),
        (json!({"api_token": V2_TOKEN}), false),
    ] {
        let c = client("https://netbox.example.com", credentials);
        assert_eq!(c.insecure_skip_verify(), insecure);
    }
    let mut config = source("https://netbox.example.com", json!({"api_token": V2_TOKEN}));
    config.insecure_skip_verify = true;
    assert!(NetboxClient::new(&config, fast_policy())
        .unwrap()
        .insecure_skip_verify());

    for credentials in [
        json!({}),
        json!({"api_token": "  "}),
        json!({"api_key": "x"}),
    ] {
        let err = NetboxClient::new(
            &source("https://netbox.example.com", credentials),
            fast_policy(),
        )
        .unwrap_err();
        assert_eq!(err.kind(), "config");
        let message = err.to_string();
        assert!(
            message.contains("api_token") && message.contains("token"),
            "{message}"
        );
    }
    // `token` is accepted too.
    assert!(NetboxClient::new(
        &source("https://netbox.example.com", json!({"token": V1_TOKEN})),
        fast_policy()
    )
    .is_ok());
}

#[tokio::test]
async fn the_token_never_appears_in_errors_or_debug_output() {
    let server = MockServer::start().await;
    // A proxy that echoes the request's Authorization header back.
    Mock::given(method("GET"))
        .and(query_param("offset", "0"))
        .respond_with(|req: &Request| {
            let auth = req
                .headers
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            ResponseTemplate::new(403)
                .set_body_json(json!({"detail": format!("bad header {auth}")}))
        })
        .mount(&server)
        .await;
    let mut failures = Vec::new();
    for token in [V2_TOKEN, V1_TOKEN] {
        let client = client(
            &server.uri(),
            json!({"api_token": token, "verify_ssl": "false"}),
        );
        let debug = format!("{client:?}");
        assert!(!debug.contains(token), "{debug}");
        assert!(!debug.contains("AAAAAAAAAAAA"), "{debug}");
        let staging = Staging::new();
        let failure = run_err(&client, &staging).await;
        assert_eq!(failure.error.kind(), "auth");
        assert!(failure.error.to_string().contains("bad header"));
        failures.push((token, failure));
    }
    for (token, failure) in &failures {
        for text in [
            failure.error.to_string(),
            format!("{:?}", failure.error),
            format!("{failure:?}"),
        ] {
            assert!(!text.contains(token), "{text}");
        }
    }

    // Other failures name the request, not the token either.
    let server = MockServer::start().await;
    mount_page(&server, "0", b"{\"results\": [".to_vec()).await;
    let client = client(&server.uri(), json!({"api_token": V2_TOKEN}));
    let failure = run_err(&client, &Staging::new()).await;
    for text in [failure.error.to_string(), format!("{failure:?}")] {
        assert!(!text.contains(V2_TOKEN), "{text}");
    }
}
