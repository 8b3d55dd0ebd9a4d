//! The gateway's HTTP admin API (gateway.md §1–3) against a real gateway
//! (`gateway::start`), with real agents saying Hello over mTLS and a real
//! HTTP client. What the API stores and reads runs on both store backends;
//! authentication, routing and start-up checks on SQLite.

mod backend_support;
mod gateway_support;

use std::collections::BTreeSet;
use std::sync::Mutex;

use backend_support::Backend;
use gateway_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use serviceradar_agent::gateway::admin::http::{OPENAPI_JSON, ROUTES};
use serviceradar_agent::gateway::config::{AdminApiConfig, ADMIN_TOKEN_ENV};
use serviceradar_agent::gateway::{self, GatewayEvent, GatewayHandle};
use serviceradar_agent::proto::control_stream_request::Payload as Up;
use serviceradar_agent::proto::control_stream_response::Payload as Down;
use serviceradar_agent::proto::{
    AgentConfigRequest, AgentHelloRequest, ControlStreamHello, ControlStreamRequest,
    ControlStreamResponse,
};

/// A credential value that must never appear in an API answer.
const SECRET: &str = "s3cr3t-armis-key-do-not-leak";

/// An HTTP client for the admin API that keeps every answer body, so that a
/// test can check none of them leaked a credential.
struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    bodies: Mutex<Vec<String>>,
}

impl Api {
    fn new(gw: &GatewayHandle, token: Option<&str>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let addr = gw.admin_addr().expect("the admin API is on");
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
            token: token.map(str::to_owned),
            bodies: Mutex::new(Vec::new()),
        }
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        self.bodies.lock().unwrap().push(text.clone());
        (status, headers, text)
    }

    /// A request with an optional JSON body; the answer parsed (`null` when
    /// empty). Every non-empty answer must be JSON.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let (status, headers, text) = self.raw(method.clone(), path, body).await;
        if text.is_empty() {
            return (status, Value::Null);
        }
        assert_eq!(
            headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{method} {path}"
        );
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// Asserts no answer so far contained `needle`.
    fn assert_never_answered(&self, needle: &str) {
        let bodies = self.bodies.lock().unwrap();
        assert!(!bodies.is_empty());
        for body in bodies.iter() {
            assert!(!body.contains(needle), "{needle:?} leaked in {body}");
        }
    }
}

fn openapi() -> Value {
    serde_json::from_str(OPENAPI_JSON).unwrap()
}

fn hello(agent_id: &str, capabilities: &[&str]) -> AgentHelloRequest {
    AgentHelloRequest {
        agent_id: agent_id.into(),
        version: "test".into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        hostname: "edge-host".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        ..Default::default()
    }
}

/// An agent of the default tenant (single-tenant CN certificate) says
/// Hello; the registry is written before the answer comes back.
async fn say_hello(pki: &TestPki, gw: &GatewayHandle, agent_id: &str, capabilities: &[&str]) {
    let mut client = connect(gw.local_addr(), &pki.agent(agent_id, "site-a"))
        .await
        .unwrap();
    let answer = client
        .hello(hello(agent_id, capabilities))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.accepted);
}

/// A gateway with the admin API on a fresh database of `backend`.
async fn start_with_api(backend: Backend, pki: &TestPki) -> GatewayHandle {
    start(with_admin_api(api_config(backend, pki).await)).await
}

/// A gateway config (no admin API yet) on a fresh database of `backend`.
async fn api_config(backend: Backend, pki: &TestPki) -> gateway::GatewayConfig {
    let database = backend.fresh_database(pki.dir.path(), "gateway").await;
    pki.gateway_config_on(database)
}

// Authentication happens before any database access: SQLite only.
#[tokio::test]
async fn requests_without_the_admin_token_are_refused() {
    let pki = TestPki::new();
    let gw = start_with_api(Backend::Sqlite, &pki).await;

    let anonymous = Api::new(&gw, None);
    let (status, headers, text) = anonymous.raw(Method::GET, "/api/v1/tenants", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    let challenge = headers[reqwest::header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(text.contains("Bearer"), "says how to authenticate: {text}");

    let wrong = Api::new(&gw, Some("not-the-admin-token-0123456789"));
    let (status, headers, text) = wrong.raw(Method::GET, "/api/v1/tenants", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(headers[reqwest::header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    // Mutations are refused the same way, before the body is looked at.
    let answer = wrong
        .post("/api/v1/tenants", json!({"slug": "sneaky"}))
        .await;
    error_of(&answer, StatusCode::UNAUTHORIZED);
    let answer = anonymous
        .call(
            Method::DELETE,
            "/api/v1/tenants/default/sources/anything",
            None,
        )
        .await;
    error_of(&answer, StatusCode::UNAUTHORIZED);

    // Another scheme is not a bearer token.
    let response = reqwest::Client::new()
        .get(format!("{}/api/v1/tenants", anonymous.base))
        .basic_auth("admin", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // Health and the API description need no token.
    assert_eq!(
        anonymous.get("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    let (status, doc) = anonymous.get("/api/v1/openapi.json").await;
    assert_eq!((status, doc), (StatusCode::OK, openapi()));

    // The right token opens the API; no answer ever shows a token.
    let admin = Api::new(&gw, Some(ADMIN_TOKEN));
    assert_eq!(admin.get("/api/v1/tenants").await.0, StatusCode::OK);
    for api in [&anonymous, &wrong, &admin] {
        api.assert_never_answered(ADMIN_TOKEN);
        api.assert_never_answered("not-the-admin-token-0123456789");
    }
    gw.shutdown().await;
}

// Start-up configuration checks, not storage: SQLite only.
#[tokio::test]
async fn start_fails_clearly_when_the_admin_api_cannot_run() {
    let pki = TestPki::new();
    // The environment variable wins over everything set in code; the
    // token checks below only mean something without it.
    let env_token = std::env::var(ADMIN_TOKEN_ENV).is_ok_and(|v| !v.trim().is_empty());

    // No database: nothing to administer.
    let err = gateway::start(with_admin_api(pki.gateway_config(false)))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("database") && err.contains("admin"), "{err}");

    let api = |token: Option<&str>, token_file: Option<std::path::PathBuf>| {
        let mut config = pki.gateway_config(true);
        config.admin = Some(AdminApiConfig {
            listen: "127.0.0.1:0".into(),
            token_file,
            token: token.map(str::to_owned),
        });
        config
    };
    if !env_token {
        let err = gateway::start(api(None, None))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(ADMIN_TOKEN_ENV) && err.contains("admin.token_file"),
            "says how to set a token: {err}"
        );

        let config = api(Some("tooshort"), None);
        assert!(
            !format!("{config:?}").contains("tooshort"),
            "Debug redacts it"
        );
        let err = gateway::start(config).await.unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("too short"), "{text}");
        assert!(
            !text.contains("tooshort"),
            "the token is never shown: {text}"
        );

        let missing = pki.dir.path().join("no-such.token");
        let err = gateway::start(api(None, Some(missing)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such.token"), "names the file: {err}");

        // A token file works; its trailing newline is not part of the token.
        let file = pki.dir.path().join("admin.token");
        std::fs::write(&file, "token-from-a-file-0123456789\n").unwrap();
        let gw = gateway::start(api(None, Some(file))).await.unwrap();
        let client = Api::new(&gw, Some("token-from-a-file-0123456789"));
        assert_eq!(client.get("/api/v1/tenants").await.0, StatusCode::OK);
        gw.shutdown().await;
    }

    // Without `admin` the API is off.
    let gw = start(pki.gateway_config(true)).await;
    assert_eq!(gw.admin_addr(), None);
    gw.shutdown().await;
}

async fn tenants_are_added_and_listed(backend: Backend) {
    let pki = TestPki::new();
    let gw = start_with_api(backend, &pki).await;
    let api = Api::new(&gw, Some(ADMIN_TOKEN));
    let doc = openapi();

    let (status, tenants) = api.get("/api/v1/tenants").await;
    assert_eq!(status, StatusCode::OK);
    let slugs = |tenants: &Value| -> Vec<String> {
        tenants
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["slug"].as_str().unwrap().to_owned())
            .collect()
    };
    let initial = slugs(&tenants);
    assert!(
        initial.contains(&"platform".to_owned()) && initial.contains(&"default".to_owned()),
        "{initial:?}"
    );
    for tenant in tenants.as_array().unwrap() {
        assert_schema(&doc, "Tenant", tenant);
    }

    let id = "7f1a4c2e-59d3-4a61-9a5e-0c1d2e3f4a5b";
    let (status, acme) = api
        .post(
            "/api/v1/tenants",
            json!({"slug": "acme", "name": "Acme Corp", "id": id}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{acme}");
    assert_schema(&doc, "Tenant", &acme);
    assert_eq!(
        (&acme["slug"], &acme["name"], &acme["id"], &acme["platform"]),
        (
            &json!("acme"),
            &json!("Acme Corp"),
            &json!(id),
            &json!(false)
        )
    );
    let (status, named_by_slug) = api.post("/api/v1/tenants", json!({"slug": "beta"})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(named_by_slug["name"], "beta");

    let (_, tenants) = api.get("/api/v1/tenants").await;
    let now = slugs(&tenants);
    assert!(now.contains(&"acme".to_owned()) && now.contains(&"beta".to_owned()));
    assert_eq!(now.len(), initial.len() + 2);

    // The rules of gateway.md §1, with their statuses.
    let taken = api.post("/api/v1/tenants", json!({"slug": "acme"})).await;
    error_of(&taken, StatusCode::CONFLICT);
    for reserved in ["platform", "serviceradar-operator"] {
        let answer = api.post("/api/v1/tenants", json!({"slug": reserved})).await;
        let message = error_of(&answer, StatusCode::FORBIDDEN);
        assert!(message.contains("reserved"), "{message}");
    }
    let nil = api
        .post(
            "/api/v1/tenants",
            json!({"slug": "gamma", "id": "00000000-0000-0000-0000-000000000000"}),
        )
        .await;
    let message = error_of(&nil, StatusCode::BAD_REQUEST);
    assert!(message.contains("nil UUID"), "{message}");
    let bad_slug = api
        .post("/api/v1/tenants", json!({"slug": "Not_A_Slug"}))
        .await;
    assert!(error_of(&bad_slug, StatusCode::BAD_REQUEST).contains("slug"));

    // Unreadable bodies: serde's message, 400.
    let unknown = api
        .post("/api/v1/tenants", json!({"slug": "delta", "colour": "red"}))
        .await;
    assert!(error_of(&unknown, StatusCode::BAD_REQUEST).contains("unknown field `colour`"));
    let mistyped = api.post("/api/v1/tenants", json!({"slug": 7})).await;
    assert!(error_of(&mistyped, StatusCode::BAD_REQUEST).contains("invalid type"));
    let (status, _, text) = api
        .raw(Method::POST, "/api/v1/tenants", Some(b"{not json".to_vec()))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("request body"), "{text}");
    let huge = vec![b' '; serviceradar_agent::gateway::admin::http::MAX_BODY_BYTES + 1];
    let (status, _, text) = api.raw(Method::POST, "/api/v1/tenants", Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.starts_with("{\"error\":"), "{text}");

    // Unknown tenants and routes.
    let answer = api.get("/api/v1/tenants/nobody/agents").await;
    assert!(error_of(&answer, StatusCode::NOT_FOUND).contains("nobody"));
    let answer = api.get("/api/v1/agents?tenant=nobody").await;
    error_of(&answer, StatusCode::NOT_FOUND);
    let answer = api.get("/api/v1/agents?tennant=acme").await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("tennant"));
    let answer = api.get("/api/v1/nothing-here").await;
    error_of(&answer, StatusCode::NOT_FOUND);
    let answer = api.call(Method::DELETE, "/api/v1/tenants", None).await;
    error_of(&answer, StatusCode::METHOD_NOT_ALLOWED);

    // A tenant with no devices has an empty page; paging is checked.
    assert_eq!(
        api.get("/api/v1/tenants/acme/devices").await,
        (StatusCode::OK, json!([]))
    );
    assert_eq!(
        api.get("/api/v1/tenants/default/devices?limit=10&offset=5")
            .await,
        (StatusCode::OK, json!([]))
    );
    for bad in [
        "limit=0",
        "limit=10001",
        "limit=ten",
        "offset=-1",
        "page=2",
        "include_merged=maybe",
        "ip=not-an-ip",
    ] {
        let answer = api
            .get(&format!("/api/v1/tenants/acme/devices?{bad}"))
            .await;
        error_of(&answer, StatusCode::BAD_REQUEST);
    }
    let answer = api.get("/api/v1/tenants/nobody/devices").await;
    error_of(&answer, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

async fn sources_are_managed_through_the_api_without_revealing_credentials(backend: Backend) {
    let pki = TestPki::new();
    let gw = start_with_api(backend, &pki).await;
    let api = Api::new(&gw, Some(ADMIN_TOKEN));
    let doc = openapi();
    let spec = json!({
        "name": "Lab Armis", "type": "armis", "endpoint": "https://armis.example.com",
        "agent_id": "agent-sync", "poll_interval": "30m", "page_size": 500,
        "queries": [{"label": "all", "query": "in:devices", "sweep_modes": []}],
        "network_blacklist": ["10.99.0.0/16"], "settings": {"timeout": "30s"},
        "credentials": {"secret_key": SECRET, "api_user": "svc-sync"}
    });

    // gateway.md §3: no source before the tenant has a sync-capable agent.
    let early = api
        .post("/api/v1/tenants/default/sources", spec.clone())
        .await;
    let message = error_of(&early, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        message.contains("agent must be onboarded") && message.contains("onboard-agent"),
        "{message}"
    );
    // Integrations never run in the platform tenant.
    let platform = api
        .post("/api/v1/tenants/platform/sources", spec.clone())
        .await;
    error_of(&platform, StatusCode::FORBIDDEN);

    say_hello(&pki, &gw, "agent-sync", &["sync"]).await;
    say_hello(&pki, &gw, "agent-plain", &[]).await;

    let (status, agents) = api.get("/api/v1/tenants/default/agents").await;
    assert_eq!(status, StatusCode::OK);
    let agents = agents.as_array().unwrap().clone();
    assert_eq!(agents.len(), 2, "{agents:?}");
    for agent in &agents {
        assert_schema(&doc, "Agent", agent);
        assert_eq!(agent["tenant_slug"], "default");
        assert_eq!(agent["partition"], "site-a", "from the certificate");
        assert_eq!(agent["online"], true);
        let sync = agent["agent_id"] == "agent-sync";
        assert_eq!(agent["sync_capable"], sync, "{agent}");
    }
    assert_eq!(
        api.get("/api/v1/agents?tenant=default").await,
        (StatusCode::OK, Value::Array(agents.clone()))
    );
    assert_eq!(
        api.get("/api/v1/agents").await,
        (StatusCode::OK, Value::Array(agents))
    );

    // Create.
    let (status, created) = api
        .post("/api/v1/tenants/default/sources", spec.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_schema(&doc, "Source", &created);
    assert_eq!(created["name"], "Lab Armis");
    assert_eq!(created["agent_id"], "agent-sync");
    assert_eq!(created["tenant_slug"], "default");
    assert_eq!(created["enabled"], true);
    assert_eq!(created["page_size"], 500);
    assert_eq!(created["status"], "idle");
    assert_eq!(created["sync_state"], "idle");
    assert_eq!(
        created["credential_keys"],
        json!(["api_user", "secret_key"])
    );
    let id = created["id"].as_str().unwrap().to_owned();

    let duplicate = api
        .post("/api/v1/tenants/default/sources", spec.clone())
        .await;
    error_of(&duplicate, StatusCode::CONFLICT);
    let mut bad = spec.clone();
    bad["type"] = json!("bogus");
    bad["name"] = json!("Bogus");
    let answer = api.post("/api/v1/tenants/default/sources", bad).await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("`type`"));
    let answer = api
        .post(
            "/api/v1/tenants/default/sources",
            json!({"name": "X", "type": "faker", "credential": {}}),
        )
        .await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("unknown field `credential`"));
    let mut ghost = spec.clone();
    ghost["name"] = json!("Ghost");
    ghost["agent_id"] = json!("agent-ghost");
    let answer = api.post("/api/v1/tenants/default/sources", ghost).await;
    error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY);

    // List and show, by id and by (URL-encoded) name.
    let (status, listed) = api.get("/api/v1/tenants/default/sources").await;
    assert_eq!((status, listed), (StatusCode::OK, json!([created.clone()])));
    let by_id = api
        .get(&format!("/api/v1/tenants/default/sources/{id}"))
        .await;
    assert_eq!(by_id, (StatusCode::OK, created.clone()));
    let by_name = api.get("/api/v1/tenants/default/sources/Lab%20Armis").await;
    assert_eq!(by_name, (StatusCode::OK, created.clone()));
    let answer = api.get("/api/v1/tenants/default/sources/Nope").await;
    error_of(&answer, StatusCode::NOT_FOUND);
    let source = format!("/api/v1/tenants/default/sources/{id}");

    // Patch: configuration and single credentials.
    let (status, patched) = api
        .patch(
            &source,
            json!({"page_size": 1000, "credentials_set": {"client_id": "c-1"},
                   "credentials_unset": ["api_user"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_schema(&doc, "Source", &patched);
    assert_eq!(patched["page_size"], 1000);
    assert_eq!(patched["poll_interval"], "30m", "untouched");
    assert_eq!(
        patched["credential_keys"],
        json!(["client_id", "secret_key"])
    );
    assert_eq!(patched["id"], json!(id));
    let answer = api.patch(&source, json!({"agent": "agent-sync"})).await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("unknown field `agent`"));
    let answer = api.patch(&source, json!({"page_size": 0})).await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("page_size"));

    // Disable / enable.
    let (status, disabled) = api.post(&format!("{source}/disable"), json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&disabled["enabled"], &disabled["sync_state"]),
        (&json!(false), &json!("disabled"))
    );
    let (status, enabled) = api
        .call(Method::POST, &format!("{source}/enable"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&enabled["enabled"], &enabled["sync_state"]),
        (&json!(true), &json!("idle"))
    );

    // Assign: only to sync-capable agents of the tenant; null unassigns.
    let assign = format!("{source}/assign");
    let answer = api.post(&assign, json!({"agent_id": "agent-ghost"})).await;
    let message = error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("agent-ghost"), "{message}");
    let answer = api.post(&assign, json!({"agent_id": "agent-plain"})).await;
    let message = error_of(&answer, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message.contains("sync"), "{message}");
    let answer = api.post(&assign, json!({})).await;
    assert!(error_of(&answer, StatusCode::BAD_REQUEST).contains("agent_id"));
    let (status, unassigned) = api.post(&assign, json!({"agent_id": null})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&unassigned["agent_id"], &unassigned["sync_state"]),
        (&Value::Null, &json!("unassigned"))
    );
    let (status, assigned) = api.post(&assign, json!({"agent_id": "agent-sync"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(assigned["agent_id"], "agent-sync");

    // Delete.
    assert_eq!(
        api.call(Method::DELETE, &source, None).await,
        (StatusCode::NO_CONTENT, Value::Null)
    );
    error_of(&api.get(&source).await, StatusCode::NOT_FOUND);
    error_of(
        &api.call(Method::DELETE, &source, None).await,
        StatusCode::NOT_FOUND,
    );
    assert_eq!(
        api.get("/api/v1/tenants/default/sources").await,
        (StatusCode::OK, json!([]))
    );

    api.assert_never_answered(SECRET);
    gw.shutdown().await;
}

/// The next message pushed down a ControlStream (bounded wait: a failure
/// bound, not synchronisation).
async fn next_push(down: &mut tonic::Streaming<ControlStreamResponse>) -> Down {
    tokio::time::timeout(EVENT_TIMEOUT, down.message())
        .await
        .expect("no push from the gateway")
        .unwrap()
        .and_then(|m| m.payload)
        .expect("a payload")
}

async fn api_changes_reach_a_connected_agent_at_once(backend: Backend) {
    let pki = TestPki::new();
    let gw = start_with_api(backend, &pki).await;
    let mut events = gw.subscribe();
    let api = Api::new(&gw, Some(ADMIN_TOKEN));
    let mut client = connect(gw.local_addr(), &pki.agent("agent-live", "site-a"))
        .await
        .unwrap();
    client.hello(hello("agent-live", &["sync"])).await.unwrap();
    let current = client
        .get_config(AgentConfigRequest {
            agent_id: "agent-live".into(),
            config_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config_version;
    let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(8);
    tx.send(ControlStreamRequest {
        payload: Some(Up::Hello(ControlStreamHello {
            agent_id: "agent-live".into(),
            config_version: current.clone(),
            capabilities: vec!["sync".into()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut down = client
        .control_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut events, |e| match e {
        GatewayEvent::ControlStreamOpened { agent_id } if agent_id == "agent-live" => Some(()),
        _ => None,
    })
    .await;

    let (status, created) = api
        .post(
            "/api/v1/tenants/default/sources",
            json!({"name": "Live Faker", "type": "faker", "agent_id": "agent-live",
                   "credentials": {"total_devices": 25, "seed": "7"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let pushed = match next_push(&mut down).await {
        Down::Config(config) => config,
        other => panic!("expected a config push, got {other:?}"),
    };
    assert_ne!(pushed.config_version, current);
    let config: Value = serde_json::from_slice(&pushed.config_json).unwrap();
    let live = &config["sources"]["Live Faker"];
    assert_eq!(live["type"], "faker", "{config}");
    // The agent, and only the agent, gets the credentials.
    assert_eq!(live["credentials"]["total_devices"], "25", "{config}");

    let (status, _) = api
        .post(
            "/api/v1/tenants/default/sources/Live%20Faker/disable",
            json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let pushed_again = match next_push(&mut down).await {
        Down::Config(config) => config,
        other => panic!("expected a config push, got {other:?}"),
    };
    let config: Value = serde_json::from_slice(&pushed_again.config_json).unwrap();
    assert_eq!(
        config["sources"],
        json!({}),
        "a disabled source is not sent"
    );
    drop(tx);
    gw.shutdown().await;
}

// Routing only (every request is anonymous): SQLite only.
#[tokio::test]
async fn the_served_router_matches_the_openapi_document() {
    let pki = TestPki::new();
    let gw = start_with_api(Backend::Sqlite, &pki).await;
    let anonymous = Api::new(&gw, None);
    let (status, doc) = anonymous.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, openapi(), "serves the document in the source tree");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
                continue;
            };
            documented.insert((method.to_string(), path.clone()));
            // Every documented operation exists in the running router: a
            // guarded one answers 401 without a token (an unknown route
            // would be 404, a wrong method 405), a public one 200.
            let concrete = path
                .replace("{tenant}", "default")
                .replace("{source}", "no-such-source")
                .replace("{device}", "sr:no-such-device");
            let (status, _, text) = anonymous.raw(method.clone(), &concrete, None).await;
            let public = op.get("security") == Some(&json!([]));
            let expected = if public {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            };
            assert_eq!(status, expected, "{method} {path}: {text}");
        }
    }
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.verb.as_str().to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(routed, documented);
    gw.shutdown().await;
}

async fn agents_are_onboarded_through_the_api_and_their_bundle_enrols(backend: Backend) {
    let pki = TestPki::new();
    let mut config = with_admin_api(api_config(backend, &pki).await);
    config.onboarding.ca_key_file = Some(pki.layout.ca_key());
    let gw = start(config).await;
    let api = Api::new(&gw, Some(ADMIN_TOKEN));
    assert_eq!(
        api.post("/api/v1/tenants", json!({"slug": "acme"})).await.0,
        StatusCode::CREATED
    );
    let request = json!({"agent_id": "edge-1", "partition": "site-a",
        "gateway_addr": gw.local_addr().to_string(), "server_name": "localhost"});
    let (status, bundle) = api
        .post("/api/v1/tenants/acme/agents", request.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{bundle}");
    assert_schema(&openapi(), "OnboardingBundle", &bundle);
    assert_eq!(bundle["common_name"], "edge-1.site-a.acme.serviceradar");
    assert_eq!(bundle["tenant_ca_created"], true);

    // Unpack the bundle and enrol with it: the tenant CA now binds acme.
    let dir = tempfile::tempdir().unwrap();
    for file in bundle["files"].as_array().unwrap() {
        let path = dir.path().join(file["path"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, file["contents"].as_str().unwrap()).unwrap();
    }
    let agent_json: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("agent.json")).unwrap()).unwrap();
    assert_eq!(agent_json["gateway_addr"], gw.local_addr().to_string());
    let certs = dir.path().join("certs");
    let files = serviceradar_agent::tls::TlsFiles {
        cert_file: certs.join("component.pem"),
        key_file: certs.join("component-key.pem"),
        ca_file: certs.join("ca-chain.pem"),
    };
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    assert!(client.hello(hello("edge-1", &["sync"])).await.is_ok());
    let (_, agents) = api.get("/api/v1/tenants/acme/agents").await;
    assert_eq!(agents[0]["agent_id"], "edge-1");
    assert_eq!(agents[0]["tenant_slug"], "acme");

    // A second agent reuses the tenant's CA.
    let mut second = request.clone();
    second["agent_id"] = json!("edge-2");
    let (status, again) = api.post("/api/v1/tenants/acme/agents", second).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again["tenant_ca_created"], false);
    assert_eq!(again["tenant_ca"], bundle["tenant_ca"]);

    // Refusals.
    let platform = api
        .post("/api/v1/tenants/platform/agents", request.clone())
        .await;
    error_of(&platform, StatusCode::FORBIDDEN);
    let unknown = api
        .post("/api/v1/tenants/nobody/agents", request.clone())
        .await;
    error_of(&unknown, StatusCode::NOT_FOUND);
    let mut bad = request.clone();
    bad["tenant"] = json!("beta");
    error_of(
        &api.post("/api/v1/tenants/acme/agents", bad).await,
        StatusCode::BAD_REQUEST,
    );
    let anonymous = Api::new(&gw, None);
    error_of(
        &anonymous.post("/api/v1/tenants/acme/agents", request).await,
        StatusCode::UNAUTHORIZED,
    );
    gw.shutdown().await;
}

on_both_backends!(
    tenants_are_added_and_listed,
    sources_are_managed_through_the_api_without_revealing_credentials,
    api_changes_reach_a_connected_agent_at_once,
    agents_are_onboarded_through_the_api_and_their_bundle_enrols,
);
