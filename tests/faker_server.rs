//! The Faker server (sources.md "Faker"): the Armis token and search API
//! served from the deterministic generator, in process and as the real
//! `faker` subcommand.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::process::{lines, Running};
use serde_json::{json, Value};
use serviceradar_agent::sources::armis::ArmisDevice;
use serviceradar_agent::sources::faker::server::{FakerServer, FakerServerConfig};
use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings};

/// Turns a hang into a failure; tests never wait on time otherwise.
const DEADLINE: Duration = Duration::from_secs(30);

fn client() -> reqwest::Client {
    serviceradar_agent::tls::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("reqwest client")
}

async fn start(devices: u64, configure: impl FnOnce(&mut FakerServerConfig)) -> FakerServer {
    let mut config = FakerServerConfig {
        settings: FakerSettings {
            total_devices: devices,
            seed: 7,
            churn_percent: 0.0,
        },
        ..Default::default()
    };
    configure(&mut config);
    FakerServer::start(config)
        .await
        .expect("faker server starts")
}

/// The generator as the server holds it at start: run 1.
fn generator(settings: FakerSettings) -> FakerGenerator {
    let mut gen = FakerGenerator::new(settings);
    gen.next_run();
    gen
}

async fn post_token(client: &reqwest::Client, base: &str, body: &str) -> (u16, Value) {
    let resp = client
        .post(format!("{base}/api/v1/access_token/"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "token response content type"
    );
    let body = resp.bytes().await.expect("token body");
    (
        status,
        serde_json::from_slice(&body).expect("token body is JSON"),
    )
}

async fn token(client: &reqwest::Client, base: &str) -> String {
    let (status, body) = post_token(
        client,
        base,
        r#"{"api_key":"key","api_secret":"secret","secret_key":"secret"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

async fn search(
    client: &reqwest::Client,
    base: &str,
    authorization: Option<&str>,
    query: &str,
) -> (u16, Value) {
    let mut req = client.get(format!("{base}/api/v1/search/?{query}"));
    if let Some(auth) = authorization {
        req = req.header("authorization", auth);
    }
    let resp = req.send().await.expect("search request");
    let status = resp.status().as_u16();
    let body = resp.bytes().await.expect("search body");
    (
        status,
        serde_json::from_slice(&body).expect("search body is JSON"),
    )
}

async fn page(client: &reqwest::Client, base: &str, token: &str, query: &str) -> Value {
    let (status, body) = search(client, base, Some(&format!("Bearer {token}")), query).await;
    assert_eq!(status, 200, "{query}: {body}");
    assert_eq!(body["success"], true);
    body
}

fn devices(page: &Value) -> Vec<ArmisDevice> {
    serde_json::from_value(page["data"]["results"].clone()).expect("results are Armis devices")
}

#[tokio::test]
async fn token_flow_with_configured_credentials() {
    let server = start(10, |c| {
        c.api_key = Some("key".into());
        c.api_secret = Some("secret".into());
    })
    .await;
    let (client, base) = (client(), server.url());
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    // Good credentials, with the secret in either field.
    for body in [
        r#"{"api_key":"key","api_secret":"secret"}"#,
        r#"{"api_key":"key","secret_key":"secret"}"#,
    ] {
        let (status, reply) = post_token(&client, &base, body).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["success"], true);
        let token = reply["data"]["access_token"].as_str().unwrap();
        assert!(token.len() >= 32, "{token}");
        let expiration = reply["data"]["expiration_utc"].as_str().unwrap();
        let base_time = expiration
            .strip_suffix("+00:00")
            .unwrap_or_else(|| panic!("{expiration} has an explicit +00:00 offset"));
        assert_eq!(
            base_time.len(),
            "2023-10-11T09:49:00.818613".len(),
            "{expiration}"
        );
        let at = humantime::parse_rfc3339(&format!("{base_time}Z")).expect("RFC 3339");
        let left = at
            .duration_since(std::time::SystemTime::now())
            .expect("in the future");
        assert!(
            left > Duration::from_secs(3500) && left <= Duration::from_secs(3600),
            "{left:?}"
        );
    }

    // Wrong or missing credentials.
    for body in [
        r#"{"api_key":"key","api_secret":"wrong"}"#,
        r#"{"api_key":"other","api_secret":"secret"}"#,
        r#"{"api_secret":"secret"}"#,
        r#"{"api_key":"key"}"#,
        "",
    ] {
        let (status, reply) = post_token(&client, &base, body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(
            reply,
            json!({"message": "Invalid secret key", "success": false})
        );
    }
    let (status, reply) = post_token(&client, &base, "{not json").await;
    assert_eq!(status, 400);
    assert_eq!(reply["success"], false);

    // Search: no token, unknown token, then Bearer and raw.
    let invalid = json!({"message": "Invalid access token", "success": false});
    for auth in [None, Some("Bearer nope"), Some("nope"), Some("Bearer ")] {
        let (status, reply) = search(&client, &base, auth, "from=0&length=5").await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(reply, invalid);
    }
    let token = token(&client, &base).await;
    for auth in [
        format!("Bearer {token}"),
        format!("bearer {token}"),
        token.clone(),
    ] {
        let (status, reply) = search(
            &client,
            &base,
            Some(&auth),
            "aql=in%3Adevices&from=0&length=5",
        )
        .await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["data"]["count"], 5);
    }

    // Anything else is a JSON 404.
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/api/v1/devices/"),
        ("GET", "/api/v1/access_token/"),
        ("POST", "/api/v1/search/"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404, "{method} {path}");
        let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(body["success"], false, "{method} {path}");
        assert!(body["message"].is_string());
    }

    server.shutdown().await;
    assert!(
        client
            .get(format!("{base}/api/v1/search/"))
            .send()
            .await
            .is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn default_credentials_need_a_secret() {
    let server = start(1, |_| {}).await;
    let (client, base) = (client(), server.url());
    for body in [
        r#"{"api_key":"any","api_secret":"thing"}"#,
        r#"{"api_key":"any","secret_key":"thing"}"#,
        r#"{"secret_key":"public-api-form"}"#,
    ] {
        let (status, reply) = post_token(&client, &base, body).await;
        assert_eq!(status, 200, "{body}: {reply}");
    }
    for body in [
        r#"{"api_key":"any"}"#,
        r#"{"api_key":"any","api_secret":"","secret_key":""}"#,
        "{}",
    ] {
        let (status, reply) = post_token(&client, &base, body).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(reply["message"], "Invalid secret key");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_zero_ttl_token_is_rejected_as_expired() {
    // Expiry itself is unit-tested with injected instants (server.rs); here
    // a zero TTL makes the token expired by the time it is used, no sleeping.
    let server = start(5, |c| c.token_ttl = Duration::ZERO).await;
    let (client, base) = (client(), server.url());
    let token = token(&client, &base).await;
    let (status, reply) = search(&client, &base, Some(&format!("Bearer {token}")), "").await;
    assert_eq!(status, 401);
    assert_eq!(reply["message"], "Invalid access token");
    server.shutdown().await;
}

#[tokio::test]
async fn paging_walks_the_generator_in_order() {
    let total = 2_345u64;
    let server = start(total, |_| {}).await;
    let (client, base) = (client(), server.url());
    let token = token(&client, &base).await;
    let want: Vec<ArmisDevice> = generator(FakerSettings {
        total_devices: total,
        seed: 7,
        churn_percent: 0.0,
    })
    .devices()
    .collect();

    // Walk like a client: from = next while next > from.
    let mut got = Vec::new();
    let mut from = 0u64;
    let mut seen = Vec::new();
    loop {
        let body = page(
            &client,
            &base,
            &token,
            &format!("aql=in%3Adevices&from={from}&length=1000"),
        )
        .await;
        let data = &body["data"];
        assert_eq!(data["total"], total);
        let results = devices(&body);
        assert_eq!(data["count"], results.len() as u64);
        let next = data["next"].as_u64().expect("next is a number");
        seen.push((from, results.len(), next, data["prev"].clone()));
        got.extend(results);
        if next <= from {
            break;
        }
        from = next;
    }
    assert_eq!(
        seen,
        vec![
            (0, 1000, 1000, Value::Null),
            (1000, 1000, 2000, json!(1000)),
            (2000, 345, 0, json!(2000)),
        ]
    );
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "the pages are the generator's devices in order"
    );

    // A page that ends exactly at the end also says next = 0.
    let body = page(&client, &base, &token, "from=1345&length=1000").await;
    assert_eq!(
        (
            body["data"]["count"].as_u64(),
            body["data"]["next"].as_u64()
        ),
        (Some(1000), Some(0))
    );
    assert!(devices(&body) == want[1345..]);

    // Out-of-range lengths get 100; from defaults to 0.
    for query in [
        "length=0",
        "length=-1",
        "length=99999",
        "length=abc",
        "length=",
        "from=0",
        "",
    ] {
        let body = page(&client, &base, &token, query).await;
        assert_eq!(body["data"]["count"], 100, "{query}");
        assert_eq!(body["data"]["next"], 100, "{query}");
        assert_eq!(body["data"]["prev"], Value::Null, "{query}");
        assert!(devices(&body) == want[..100], "{query}");
    }
    let body = page(&client, &base, &token, "from=10&length=1000").await;
    assert_eq!(body["data"]["count"], 1000);

    // Past the end: results null, count 0, next 0.
    for from in [total, total + 1, 1_000_000_000] {
        let body = page(&client, &base, &token, &format!("from={from}&length=100")).await;
        assert_eq!(
            body["data"],
            json!({"count": 0, "next": 0, "prev": from, "results": null, "total": total}),
            "from={from}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn max_page_is_configurable() {
    let server = start(300, |c| c.max_page = 250).await;
    let (client, base) = (client(), server.url());
    let token = token(&client, &base).await;
    for (query, want) in [("length=250", 250), ("length=251", 100), ("length=5", 5)] {
        let body = page(&client, &base, &token, query).await;
        assert_eq!(body["data"]["count"], want, "{query}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn churn_changes_ips_only_when_the_run_advances() {
    let settings = FakerSettings {
        total_devices: 500,
        seed: 3,
        churn_percent: 20.0,
    };
    let server = start(0, |c| {
        c.settings = settings;
        // Far in the future: the interval task must not fire during the test.
        c.churn_interval = Some(Duration::from_secs(3600));
    })
    .await;
    let (client, base) = (client(), server.url());
    let token = token(&client, &base).await;

    let mut gen = generator(settings);
    let first = devices(&page(&client, &base, &token, "from=0&length=500").await);
    assert_eq!(server.run(), 1);
    assert!(first == gen.devices().collect::<Vec<_>>());
    assert!(
        devices(&page(&client, &base, &token, "from=0&length=500").await) == first,
        "nothing changes without an advance"
    );

    assert_eq!(server.advance_run(), 2);
    gen.next_run();
    let second = devices(&page(&client, &base, &token, "from=0&length=500").await);
    assert!(
        second == gen.devices().collect::<Vec<_>>(),
        "run 2 is the generator's run 2"
    );

    let ids = |d: &[ArmisDevice]| d.iter().map(|d| d.id).collect::<Vec<_>>();
    let ips = |d: &[ArmisDevice]| d.iter().map(|d| d.ip_address.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&second), "identities survive churn");
    let moved = ips(&first)
        .iter()
        .zip(ips(&second))
        .filter(|(a, b)| **a != *b)
        .count();
    assert_eq!(moved, 100, "20% of 500 devices moved");
    let (mut a, mut b) = (ips(&first), ips(&second));
    a.sort();
    b.sort();
    assert_eq!(a, b, "the set of IPs never changes");
    server.shutdown().await;
}

#[tokio::test]
async fn faker_subcommand_serves_the_api() {
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_serviceradar-agent"))
            .args([
                "faker",
                "--listen",
                "127.0.0.1:0",
                "--devices",
                "10",
                "--seed",
                "7",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the binary"),
    );
    let rx = lines(&mut child.0);
    let line = tokio::task::spawn_blocking(move || rx.recv_timeout(DEADLINE))
        .await
        .unwrap()
        .expect("the binary prints its address");
    let base = line
        .strip_prefix("faker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");

    let client = client();
    let token = token(&client, &base).await;
    let body = page(&client, &base, &token, "from=0&length=100").await;
    assert_eq!(body["data"]["total"], 10);
    assert_eq!(body["data"]["next"], 0);
    let want: Vec<_> = generator(FakerSettings {
        total_devices: 10,
        seed: 7,
        churn_percent: 0.0,
    })
    .devices()
    .collect();
    assert!(devices(&body) == want);

    // SIGTERM stops it cleanly.
    let pid = child.0.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let status = child.0.wait();
        (child, status)
    })
    .await
    .unwrap()
    .1
    .expect("wait");
    assert!(status.success(), "{status}");
}
