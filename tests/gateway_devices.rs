//! Canonical devices for administrators (gateway.md §5): the admin API
//! (`GET /api/v1/tenants/{tenant}/devices[/{device}]`, `POST
//! …/devices/{device}/unmerge`) against a real gateway fed by a real agent
//! stream and by `Store::reconcile_run`, and the admin CLI (`gateway devices
//! list|show|unmerge`) as an operator runs it, against the same kind of
//! data. Filters, tenant isolation (another tenant's device is not found),
//! identifiers and merges, and unmerge restoring both devices. Both tests
//! run on both store backends.

mod admin_cli_support;
mod backend_support;
mod gateway_support;

use std::collections::BTreeSet;
use std::process::Output;

use admin_cli_support::{expect_failure, expect_success, AdminCli};
use backend_support::Backend;
use gateway_support::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use serviceradar_agent::gateway::admin::http::OPENAPI_JSON;
use serviceradar_agent::gateway::dire::{identifiers_of, Sighting};
use serviceradar_agent::gateway::store::Store;
use serviceradar_agent::gateway::{open_store, GatewayHandle};
use serviceradar_agent::proto::AgentHelloRequest;

// ---- data ------------------------------------------------------------------

fn sighting(metadata: Value, ip: &str, source: &str, hostname: Option<&str>) -> Sighting {
    let metadata: Map<String, Value> = metadata.as_object().cloned().unwrap_or_default();
    Sighting {
        identifiers: identifiers_of(&metadata, None),
        ip: Some(ip.to_owned()),
        mac: None,
        hostname: hostname.map(str::to_owned),
        source: source.to_owned(),
        metadata,
    }
}

fn armis(id: &str, ip: &str) -> Sighting {
    sighting(
        json!({"armis_device_id": id}),
        ip,
        "armis",
        Some(&format!("armis-{id}")),
    )
}

fn netbox(id: &str, ip: &str) -> Sighting {
    sighting(
        json!({"netbox_device_id": id, "site": "lab"}),
        ip,
        "netbox",
        None,
    )
}

async fn run(store: &Store, tenant_id: &str, run_id: &str, sightings: Vec<(&str, Sighting)>) {
    let sightings = sightings
        .into_iter()
        .map(|(partition, s)| (partition.to_owned(), s))
        .collect();
    store
        .reconcile_run(tenant_id, run_id, sightings, 1_700_000_000)
        .await
        .unwrap();
}

/// The canonical ids the seeded data ends up with.
struct Seeded {
    /// Armis 9 + NetBox 77 merged, in partition `default`.
    survivor: String,
    /// NetBox 77's own device, merged into `survivor`.
    merged: String,
    /// Armis 9 in beta: the same identifier in another tenant.
    beta: String,
}

/// Seeds acme and beta (tenant ids) through DIRE directly:
/// - acme/default: Armis 9 at 10.0.0.9 and NetBox 77 at 10.0.0.77, then an
///   update naming both merges them (NetBox 77 into Armis 9);
/// - acme/lab: Armis 100 at 10.0.0.9 (same IP, other partition) and
///   Armis 101 at 2001:db8::1;
/// - beta/default: Armis 9 at 10.0.0.9.
async fn seed(store: &Store, acme: &str, beta: &str) -> Seeded {
    run(store, acme, "r1", vec![("default", armis("9", "10.0.0.9"))]).await;
    run(
        store,
        acme,
        "r2",
        vec![("default", netbox("77", "10.0.0.77"))],
    )
    .await;
    let both = sighting(
        json!({"armis_device_id": "9", "netbox_device_id": "77"}),
        "10.0.0.9",
        "armis",
        Some("armis-9"),
    );
    run(store, acme, "r3", vec![("default", both)]).await;
    run(
        store,
        acme,
        "r4",
        vec![
            ("lab", armis("100", "10.0.0.9")),
            ("lab", armis("101", "2001:db8::1")),
        ],
    )
    .await;
    run(store, beta, "r1", vec![("default", armis("9", "10.0.0.9"))]).await;

    let merges = store
        .canonical_devices(serviceradar_agent::gateway::store::DeviceFilter {
            tenant: Some(acme.to_owned()),
            partition: Some("default".into()),
            include_merged: true,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let merged = merges
        .iter()
        .find(|d| d.merged_into.is_some())
        .expect("the merge happened");
    let survivor = merged.merged_into.clone().unwrap();
    let beta = store
        .canonical_devices(serviceradar_agent::gateway::store::DeviceFilter {
            tenant: Some(beta.to_owned()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(beta.len(), 1);
    assert_ne!(beta[0].id, survivor, "scoped by tenant");
    Seeded {
        survivor,
        merged: merged.id.clone(),
        beta: beta[0].id.clone(),
    }
}

// ---- the admin API ---------------------------------------------------------

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(gw: &GatewayHandle) -> Self {
        let addr = gw.admin_addr().expect("the admin API is on");
        Self {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    async fn call(&self, method: Method, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, value)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path).await
    }

    async fn post(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path).await
    }

    /// A listing that must succeed.
    async fn list(&self, tenant: &str, query: &str) -> Vec<Value> {
        let (status, body) = self
            .get(&format!("/api/v1/tenants/{tenant}/devices?{query}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        body.as_array().unwrap().clone()
    }
}

fn ids(devices: &[Value]) -> BTreeSet<String> {
    devices
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

fn identifier_strings(device: &Value) -> Vec<String> {
    device["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["kind"].as_str().unwrap(),
                i["value"].as_str().unwrap()
            )
        })
        .collect()
}

/// `sr:<uuid>` with the `:` percent-encoded.
fn encoded(id: &str) -> String {
    id.replace(':', "%3A")
}

/// An acme edge agent says Hello and streams one complete run of 5 Faker
/// devices (10.9.0.1–5) over mTLS; the run is applied, DIRE included, before
/// the stream's answer.
async fn stream_faker_run(pki: &TestPki, gw: &GatewayHandle) {
    let cert = pki.client("acme-edge-1", "edge-1.default.acme.serviceradar", None);
    let mut client = connect(gw.local_addr(), &cert).await.unwrap();
    client
        .hello(AgentHelloRequest {
            agent_id: "edge-1".into(),
            version: "test".into(),
            capabilities: vec!["sync".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let chunks = run_chunks("edge-1", "default", "run-1", 5, 1, 9);
    send_stream(&mut client, stream_of("edge-1", chunks))
        .await
        .unwrap();
}

async fn the_api_lists_shows_and_unmerges_a_tenants_canonical_devices(backend: Backend) {
    let pki = TestPki::new();
    let database = backend.fresh_database(pki.dir.path(), "gateway").await;
    let gw = start(with_admin_api(pki.gateway_config_on(database))).await;
    let admin = gw.admin().expect("a database gateway has an admin");
    let acme = admin.tenant_add("acme", None, None).await.unwrap();
    let beta = admin.tenant_add("beta", None, None).await.unwrap();
    stream_faker_run(&pki, &gw).await;
    let seeded = seed(admin.store(), &acme.id, &beta.id).await;
    let api = Api::new(&gw);
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();

    // Every live device: 5 streamed, the merge survivor, two in lab.
    let all = api.list("acme", "").await;
    assert_eq!(all.len(), 8, "{all:#?}");
    for device in &all {
        assert_schema(&doc, "CanonicalDevice", device);
        assert_eq!(device["tenant_slug"], "acme");
        assert_eq!(device["tenant"], acme.id.as_str());
        assert!(device["id"].as_str().unwrap().starts_with("sr:"));
        assert_eq!(device["merged_into"], Value::Null);
    }
    assert!(!ids(&all).contains(&seeded.merged));
    let streamed: Vec<&Value> = all
        .iter()
        .filter(|d| d["sources"] == json!(["faker"]))
        .collect();
    assert_eq!(streamed.len(), 5, "through ingestion");
    for device in &streamed {
        let ip = device["ip"].as_str().unwrap();
        assert_eq!(
            identifier_strings(device),
            [format!("integration::faker-{ip}")],
            "{device}"
        );
        assert_eq!(device["hostname"], format!("host-{ip}"));
    }

    // Each filter.
    let lab = api.list("acme", "partition=lab").await;
    assert_eq!(lab.len(), 2);
    assert!(lab.iter().all(|d| d["partition"] == "lab"));
    assert_eq!(api.list("acme", "source=faker").await.len(), 5);
    let from_netbox = api.list("acme", "source=netbox").await;
    assert_eq!(ids(&from_netbox), BTreeSet::from([seeded.survivor.clone()]));
    assert_eq!(from_netbox[0]["sources"], json!(["armis", "netbox"]));
    assert_eq!(
        identifier_strings(&from_netbox[0]),
        ["armis:9", "netbox:77"]
    );
    let at_ip = api.list("acme", "ip=10.0.0.9").await;
    assert_eq!(at_ip.len(), 2, "one per partition");
    let at_ip_in_default = api.list("acme", "ip=10.0.0.9&partition=default").await;
    assert_eq!(
        ids(&at_ip_in_default),
        BTreeSet::from([seeded.survivor.clone()])
    );
    // Any notation of an address finds it.
    let v6 = api.list("acme", "ip=2001:DB8:0:0::1").await;
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0]["ip"], "2001:db8::1");
    assert!(api.list("acme", "ip=10.0.0.10").await.is_empty());
    assert!(api
        .list("acme", "source=armis&partition=nowhere")
        .await
        .is_empty());
    // Tombstones only on request.
    let with_merged = api.list("acme", "include_merged=true").await;
    assert_eq!(with_merged.len(), 9);
    let tombstone = with_merged
        .iter()
        .find(|d| d["id"] == seeded.merged.as_str())
        .unwrap();
    assert_eq!(tombstone["merged_into"], seeded.survivor.as_str());
    assert_eq!(tombstone["identifiers"], json!([]));
    assert_eq!(api.list("acme", "include_merged=false").await.len(), 8);
    // Paging walks the same list.
    let mut paged = Vec::new();
    for offset in (0..9).step_by(3) {
        paged.extend(api.list("acme", &format!("limit=3&offset={offset}")).await);
    }
    assert_eq!(paged, all);
    // Beta has its own Armis 9, and only that.
    assert_eq!(
        ids(&api.list("beta", "").await),
        BTreeSet::from([seeded.beta.clone()])
    );

    // One device, with identifiers and merges; the ':' as is or encoded.
    let path = format!("/api/v1/tenants/acme/devices/{}", seeded.survivor);
    let (status, detail) = api.get(&path).await;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_schema(&doc, "DeviceDetail", &detail);
    assert_eq!(
        api.get(&format!(
            "/api/v1/tenants/acme/devices/{}",
            encoded(&seeded.survivor)
        ))
        .await,
        (StatusCode::OK, detail.clone())
    );
    assert_eq!(detail["device"]["id"], seeded.survivor.as_str());
    assert_eq!(
        identifier_strings(&detail["device"]),
        ["armis:9", "netbox:77"]
    );
    let merges = detail["merges"].as_array().unwrap();
    assert_eq!(merges.len(), 1);
    assert_eq!(merges[0]["from_device"], seeded.merged.as_str());
    assert_eq!(merges[0]["into_device"], seeded.survivor.as_str());
    assert_eq!(
        merges[0]["identifiers"],
        json!([{"kind": "netbox", "value": "77"}])
    );
    assert_eq!(merges[0]["undone_at"], Value::Null);
    assert_eq!(merges[0]["tenant_slug"], "acme");
    // The merged device shows too, pointing at its survivor.
    let (status, merged) = api
        .get(&format!("/api/v1/tenants/acme/devices/{}", seeded.merged))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(merged["device"]["merged_into"], seeded.survivor.as_str());
    assert_eq!(merged["merges"], detail["merges"]);

    // Another tenant's device is not found, however it is asked for.
    for path in [
        format!("/api/v1/tenants/acme/devices/{}", seeded.beta),
        format!("/api/v1/tenants/acme/devices/{}", encoded(&seeded.beta)),
        format!("/api/v1/tenants/beta/devices/{}", seeded.survivor),
    ] {
        let message = error_of(&api.get(&path).await, StatusCode::NOT_FOUND);
        assert!(message.contains("has no device"), "{message}");
    }
    let answer = api
        .post(&format!(
            "/api/v1/tenants/acme/devices/{}/unmerge",
            seeded.beta
        ))
        .await;
    error_of(&answer, StatusCode::NOT_FOUND);
    let (status, own) = api
        .get(&format!("/api/v1/tenants/beta/devices/{}", seeded.beta))
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own["device"]["tenant_slug"], "beta");
    for missing in [
        "/api/v1/tenants/acme/devices/sr:00000000-0000-0000-0000-000000000000",
        "/api/v1/tenants/acme/devices/not-an-id",
        "/api/v1/tenants/nobody/devices/sr:x",
    ] {
        error_of(&api.get(missing).await, StatusCode::NOT_FOUND);
    }

    // A merged device has nothing to undo itself: the message says where
    // to look.
    let message = error_of(
        &api.post(&format!(
            "/api/v1/tenants/acme/devices/{}/unmerge",
            seeded.merged
        ))
        .await,
        StatusCode::NOT_FOUND,
    );
    assert!(
        message.contains("nothing to unmerge") && message.contains(&seeded.survivor),
        "{message}"
    );

    // Unmerge (the ':' encoded): both devices are back, each with its own
    // identifiers.
    let unmerge = format!(
        "/api/v1/tenants/acme/devices/{}/unmerge",
        encoded(&seeded.survivor)
    );
    let (status, undone) = api.post(&unmerge).await;
    assert_eq!(status, StatusCode::OK, "{undone}");
    assert_schema(&doc, "Unmerge", &undone);
    assert_eq!(undone["undone"]["id"], merges[0]["id"]);
    assert!(undone["undone"]["undone_at"].is_i64());
    assert_eq!(undone["restored"]["id"], seeded.merged.as_str());
    assert_eq!(identifier_strings(&undone["restored"]), ["netbox:77"]);
    assert_eq!(undone["restored"]["merged_into"], Value::Null);
    assert_eq!(undone["restored"]["sources"], json!(["netbox"]));
    assert_eq!(undone["survivor"]["id"], seeded.survivor.as_str());
    assert_eq!(identifier_strings(&undone["survivor"]), ["armis:9"]);
    assert_eq!(undone["survivor"]["sources"], json!(["armis"]));
    let default = api.list("acme", "partition=default&source=netbox").await;
    assert_eq!(ids(&default), BTreeSet::from([seeded.merged.clone()]));
    assert_eq!(api.list("acme", "").await.len(), 9);
    let (_, after) = api.get(&path).await;
    assert!(after["merges"][0]["undone_at"].is_i64(), "{after}");

    // Nothing left to undo: 404 with a message saying so.
    let message = error_of(&api.post(&unmerge).await, StatusCode::NOT_FOUND);
    assert!(
        message.contains("nothing to unmerge")
            && message.contains(&seeded.survivor)
            && message.contains("no merge into it is left to undo"),
        "{message}"
    );
    // A device that was never merged into.
    let message = error_of(
        &api.post(&format!(
            "/api/v1/tenants/beta/devices/{}/unmerge",
            seeded.beta
        ))
        .await,
        StatusCode::NOT_FOUND,
    );
    assert!(message.contains("nothing to unmerge"), "{message}");
    gw.shutdown().await;
}

// ---- the admin CLI ---------------------------------------------------------

/// The admin CLI on a gateway config with a database (the gateway never
/// runs).
struct Cli {
    cli: AdminCli,
}

impl Cli {
    async fn on(backend: Backend) -> Self {
        Self {
            cli: AdminCli::on(backend).await,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli.run(args, None)
    }

    fn ok(&self, args: &[&str]) -> String {
        expect_success(args, &self.run(args))
    }

    /// Runs a command that must fail; returns its `error: …` line.
    fn fails(&self, args: &[&str]) -> String {
        expect_failure(args, &self.run(args))
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
    }

    /// Table rows (header excluded) of `devices list`.
    fn rows(&self, args: &[&str]) -> Vec<String> {
        let out = self.ok(args);
        let mut lines = out.lines();
        let header = lines.next().expect("a header line");
        assert!(
            header.split_whitespace().eq([
                "ID",
                "PARTITION",
                "IP",
                "MAC",
                "HOSTNAME",
                "SOURCES",
                "IDENTIFIERS",
                "LAST-SEEN"
            ]),
            "{header}"
        );
        lines.map(str::to_owned).collect()
    }

    /// Seeds the database the CLI opens, through DIRE.
    async fn seed(&self) -> Seeded {
        let store = open_store(self.cli.database()).await.unwrap();
        let id = |slug: &'static str| {
            let store = store.clone();
            async move { store.tenant_by_slug(slug).await.unwrap().unwrap().id }
        };
        let (acme, beta) = (id("acme").await, id("beta").await);
        seed(&store, &acme, &beta).await
    }
}

async fn the_cli_lists_shows_and_unmerges_canonical_devices(backend: Backend) {
    let cli = Cli::on(backend).await;
    cli.ok(&["tenant", "add", "acme"]);
    cli.ok(&["tenant", "add", "beta"]);
    let seeded = cli.seed().await;
    let list = ["devices", "list", "--tenant", "acme"];

    // The table: one row per live device, identifiers and sources joined.
    let rows = cli.rows(&list);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    let survivor = rows
        .iter()
        .find(|r| r.starts_with(&seeded.survivor))
        .expect("the survivor is listed");
    let cells: Vec<&str> = survivor.split_whitespace().collect();
    assert_eq!(
        cells[..7],
        [
            seeded.survivor.as_str(),
            "default",
            "10.0.0.9",
            "-",
            "armis-9",
            "armis,netbox",
            "armis:9,netbox:77"
        ],
        "{survivor}"
    );
    assert!(cells[7].starts_with("2023-11-14T"), "last seen: {survivor}");

    // Each filter.
    let with = |extra: &[&str]| -> Vec<String> {
        let args: Vec<&str> = list.iter().chain(extra).copied().collect();
        cli.rows(&args)
    };
    let lab = with(&["--partition", "lab"]);
    assert_eq!(lab.len(), 2);
    assert!(lab
        .iter()
        .all(|r| r.split_whitespace().nth(1) == Some("lab")));
    let netbox = with(&["--source", "netbox"]);
    assert_eq!(netbox.len(), 1);
    assert!(netbox[0].starts_with(&seeded.survivor));
    assert_eq!(with(&["--ip", "10.0.0.9"]).len(), 2);
    assert_eq!(with(&["--ip", "10.0.0.9", "--partition", "lab"]).len(), 1);
    assert_eq!(with(&["--ip", "2001:DB8::0:1"]).len(), 1);
    assert_eq!(with(&["--limit", "2"]).len(), 2);
    assert_eq!(with(&["--limit", "2", "--offset", "2"]).len(), 1);
    let merged = with(&["--include-merged"]);
    assert_eq!(merged.len(), 4);
    let tombstone = merged
        .iter()
        .find(|r| r.starts_with(&seeded.merged))
        .unwrap();
    assert!(
        tombstone.contains(&format!("merged into {}", seeded.survivor)),
        "{tombstone}"
    );

    // JSON: the same devices, with identifiers and the tenant slug.
    let json_list = cli.json(&["devices", "list", "--tenant", "acme", "--json"]);
    let json_list = json_list.as_array().unwrap();
    assert_eq!(json_list.len(), 3);
    assert!(json_list.iter().all(|d| d["tenant_slug"] == "acme"));
    assert_eq!(
        ids(json_list),
        rows.iter()
            .map(|r| r.split_whitespace().next().unwrap().to_owned())
            .collect::<BTreeSet<_>>()
    );

    // Refusals name what is wrong.
    let err = cli.fails(&["devices", "list", "--tenant", "acme", "--limit", "0"]);
    assert!(err.contains("limit"), "{err}");
    let err = cli.fails(&["devices", "list", "--tenant", "acme", "--ip", "ten"]);
    assert!(
        err.contains("\"ten\"") && err.contains("not an IP"),
        "{err}"
    );
    let err = cli.fails(&["devices", "list", "--tenant", "nobody"]);
    assert!(err.contains("no tenant \"nobody\""), "{err}");

    // Show: identifiers and merges.
    let detail = cli.json(&["devices", "show", "--tenant", "acme", &seeded.survivor]);
    assert_eq!(
        identifier_strings(&detail["device"]),
        ["armis:9", "netbox:77"]
    );
    assert_eq!(detail["merges"].as_array().unwrap().len(), 1);
    assert_eq!(detail["merges"][0]["from_device"], seeded.merged.as_str());
    // Another tenant's device is not found.
    let err = cli.fails(&["devices", "show", "--tenant", "acme", &seeded.beta]);
    assert!(
        err.contains("tenant \"acme\" has no device") && err.contains(&seeded.beta),
        "{err}"
    );
    let err = cli.fails(&["devices", "unmerge", "--tenant", "acme", &seeded.beta]);
    assert!(err.contains("has no device"), "{err}");

    // Unmerge prints what was undone; both devices are back.
    let out = cli.ok(&["devices", "unmerge", "--tenant", "acme", &seeded.survivor]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("merge ")
            && lines[0].contains("of tenant acme undone")
            && lines[0].contains(&format!("{} split from {}", seeded.merged, seeded.survivor)),
        "{out}"
    );
    assert!(lines[1].contains("gave back netbox:77"), "{out}");
    assert!(
        lines[2].contains("restored")
            && lines[2].contains(&seeded.merged)
            && lines[2].contains("identifiers netbox:77"),
        "{out}"
    );
    assert!(
        lines[3].contains("survivor")
            && lines[3].contains(&seeded.survivor)
            && lines[3].contains("identifiers armis:9"),
        "{out}"
    );
    let rows = cli.rows(&list);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let restored = rows.iter().find(|r| r.starts_with(&seeded.merged)).unwrap();
    assert!(
        restored.contains("10.0.0.77") && restored.contains("netbox:77"),
        "{restored}"
    );
    let detail = cli.json(&["devices", "show", "--tenant", "acme", &seeded.survivor]);
    assert_eq!(identifier_strings(&detail["device"]), ["armis:9"]);
    assert!(detail["merges"][0]["undone_at"].is_i64(), "{detail}");

    // Nothing left to undo.
    let err = cli.fails(&["devices", "unmerge", "--tenant", "acme", &seeded.survivor]);
    assert!(
        err.contains("nothing to unmerge") && err.contains(&seeded.survivor),
        "{err}"
    );
}

on_both_backends!(
    the_api_lists_shows_and_unmerges_a_tenants_canonical_devices,
    the_cli_lists_shows_and_unmerges_canonical_devices,
);
