//! Tenants and integration sources over real mTLS (gateway.md §1–3): two
//! tenants with identical agent ids, source names and inventories never see
//! each other's sources, agents or devices; the source rules; status
//! bookkeeping from chunks and run reports; credentials never in clear in the
//! database. Every test runs on both store backends.

mod backend_support;
mod gateway_support;

use backend_support::Backend;
use gateway_support::*;
use serde_json::{json, Value};
use serviceradar_agent::gateway::admin::{Admin, AdminError, DeviceQuery};
use serviceradar_agent::gateway::integrations::SourceSpec;
use serviceradar_agent::gateway::{GatewayEvent, GatewayHandle};
use serviceradar_agent::proto::control_stream_request::Payload as Up;
use serviceradar_agent::proto::control_stream_response::Payload as Down;
use serviceradar_agent::proto::{
    AgentConfigRequest, AgentHelloRequest, ControlStreamHello, ControlStreamRequest,
    GatewayServiceStatus, GatewayStatusRequest,
};
use serviceradar_agent::tls::{self, TlsFiles};

fn hello(agent_id: &str, capabilities: &[&str]) -> AgentHelloRequest {
    AgentHelloRequest {
        agent_id: agent_id.into(),
        version: "test".into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    }
}

fn spec(name: &str, agent: Option<&str>, secret: &str, devices: u32) -> SourceSpec {
    serde_json::from_value(json!({
        "name": name, "type": "faker", "agent_id": agent,
        "discovery_interval": "1h",
        "credentials": {"total_devices": devices, "api_secret": secret}
    }))
    .unwrap()
}

/// The agent's `config_json.sources` as GetConfig returns it.
async fn sources_of(client: &mut Client, agent_id: &str) -> serde_json::Map<String, Value> {
    let response = client
        .get_config(AgentConfigRequest {
            agent_id: agent_id.into(),
            config_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let payload: Value = serde_json::from_slice(&response.config_json).unwrap();
    payload["sources"].as_object().cloned().unwrap()
}

struct TwoTenants {
    pki: TestPki,
    gw: GatewayHandle,
    admin: Admin,
}

impl TwoTenants {
    async fn start(backend: Backend) -> Self {
        tls::install_crypto_provider();
        let pki = TestPki::new();
        let database = backend.fresh_database(pki.dir.path(), "gateway").await;
        let gw = start(pki.gateway_config_on(database)).await;
        let admin = gw.admin().expect("a database gateway has an admin");
        admin.tenant_add("acme", None, None).await.unwrap();
        admin.tenant_add("beta", None, None).await.unwrap();
        Self { pki, gw, admin }
    }

    /// A tenant-edge certificate `<agent>.default.<tenant>.serviceradar`.
    fn cert(&self, tenant: &str, agent: &str) -> TlsFiles {
        self.pki.client(
            &format!("{tenant}-{agent}"),
            &format!("{agent}.default.{tenant}.serviceradar"),
            None,
        )
    }

    async fn agent(&self, tenant: &str, agent: &str, capabilities: &[&str]) -> Client {
        let mut client = connect(self.gw.local_addr(), &self.cert(tenant, agent))
            .await
            .unwrap();
        client.hello(hello(agent, capabilities)).await.unwrap();
        client
    }
}

async fn sources_need_a_sync_capable_agent_of_the_same_tenant(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    // No agent at all.
    let err = t
        .admin
        .source_add("acme", spec("Inventory", None, "s", 10))
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::NeedsSyncAgent(_)), "{err:?}");
    assert!(err.to_string().contains("onboard"), "{err}");
    // An agent that does not advertise `sync`.
    let _plain = t.agent("acme", "edge-1", &["icmp"]).await;
    let err = t
        .admin
        .source_add("acme", spec("Inventory", None, "s", 10))
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::NeedsSyncAgent(_)), "{err:?}");
    // A sync-capable agent in *another* tenant does not count, nor can it be
    // assigned.
    let _beta = t.agent("beta", "edge-9", &["sync"]).await;
    assert!(matches!(
        t.admin
            .source_add("acme", spec("Inventory", None, "s", 10))
            .await,
        Err(AdminError::NeedsSyncAgent(_))
    ));
    let _acme = t.agent("acme", "edge-2", &["sync"]).await;
    let err = t
        .admin
        .source_add("acme", spec("Inventory", Some("edge-9"), "s", 10))
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::NeedsSyncAgent(_)), "{err:?}");
    // Unassigned is fine; assignment checks the same rule.
    let source = t
        .admin
        .source_add("acme", spec("Inventory", None, "s", 10))
        .await
        .unwrap();
    assert_eq!(source.sync_state, "unassigned");
    assert!(matches!(
        t.admin
            .source_assign("acme", "Inventory", Some("edge-9"))
            .await,
        Err(AdminError::NeedsSyncAgent(_))
    ));
    assert!(matches!(
        t.admin
            .source_assign("acme", "Inventory", Some("edge-1"))
            .await,
        Err(AdminError::NeedsSyncAgent(_))
    ));
    let assigned = t
        .admin
        .source_assign("acme", "Inventory", Some("edge-2"))
        .await
        .unwrap();
    assert_eq!(assigned.source.agent_id.as_deref(), Some("edge-2"));
    // Names are unique per tenant.
    assert!(matches!(
        t.admin
            .source_add("acme", spec("Inventory", None, "s", 10))
            .await,
        Err(AdminError::Conflict(_))
    ));
    // The platform tenant never holds integrations.
    assert!(matches!(
        t.admin
            .source_add("platform", spec("P", None, "s", 1))
            .await,
        Err(AdminError::Forbidden(_))
    ));
    t.gw.shutdown().await;
}

async fn two_tenants_with_the_same_names_never_see_each_other(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    let mut acme = t.agent("acme", "edge-1", &["sync"]).await;
    let mut beta = t.agent("beta", "edge-1", &["sync"]).await;
    let acme_source = t
        .admin
        .source_add(
            "acme",
            spec("Inventory", Some("edge-1"), "acme-secret-1", 10),
        )
        .await
        .unwrap();
    let beta_source = t
        .admin
        .source_add(
            "beta",
            spec("Inventory", Some("edge-1"), "beta-secret-2", 20),
        )
        .await
        .unwrap();
    // An unassigned source goes to no agent.
    t.admin
        .source_add("acme", spec("Spare", None, "spare-secret", 5))
        .await
        .unwrap();

    // Config: exactly the tenant's enabled sources assigned to the agent.
    let acme_sources = sources_of(&mut acme, "edge-1").await;
    let beta_sources = sources_of(&mut beta, "edge-1").await;
    assert_eq!(acme_sources.keys().collect::<Vec<_>>(), vec!["Inventory"]);
    assert_eq!(beta_sources.keys().collect::<Vec<_>>(), vec!["Inventory"]);
    let acme_inventory = &acme_sources["Inventory"];
    assert_eq!(acme_inventory["credentials"]["api_secret"], "acme-secret-1");
    assert_eq!(
        acme_inventory["sync_service_id"],
        acme_source.source.id.as_str()
    );
    assert_eq!(
        beta_sources["Inventory"]["credentials"]["api_secret"],
        "beta-secret-2"
    );
    assert_eq!(
        beta_sources["Inventory"]["sync_service_id"],
        beta_source.source.id.as_str()
    );
    // Disabled sources are not sent.
    t.admin
        .source_set_enabled("beta", "Inventory", false)
        .await
        .unwrap();
    assert!(sources_of(&mut beta, "edge-1").await.is_empty());
    t.admin
        .source_set_enabled("beta", "Inventory", true)
        .await
        .unwrap();

    // Agents: each tenant lists its own.
    for tenant in ["acme", "beta"] {
        let agents = t.admin.agent_list(Some(tenant)).await.unwrap();
        assert_eq!(agents.len(), 1, "{tenant}: {agents:?}");
        assert_eq!(agents[0].tenant_slug, tenant);
    }

    // Devices: identical inventories, identical run ids, one per tenant.
    for (client, source) in [(&mut acme, &acme_source), (&mut beta, &beta_source)] {
        let mut chunks = run_chunks("edge-1", "default", "run-1", 30, 1, 9);
        let text = String::from_utf8(chunks.remove(0))
            .unwrap()
            .replace("\"svc\"", &format!("{:?}", source.source.id));
        send_stream(client, stream_of("edge-1", vec![text.into_bytes()]))
            .await
            .unwrap();
    }
    let acme_devices = t.admin.devices(&DeviceQuery::tenant("acme")).await.unwrap();
    let beta_devices = t.admin.devices(&DeviceQuery::tenant("beta")).await.unwrap();
    assert_eq!((acme_devices.len(), beta_devices.len()), (30, 30));
    let acme_id = t.admin.tenant("acme").await.unwrap().id;
    assert!(acme_devices
        .iter()
        .all(|d| d.device.tenant == acme_id && d.tenant_slug == "acme"));
    assert!(beta_devices
        .iter()
        .all(|d| d.device.tenant != acme_id && d.tenant_slug == "beta"));
    assert!(
        acme_devices
            .iter()
            .all(|a| beta_devices.iter().all(|b| b.device.id != a.device.id)),
        "identical inventories, no shared device"
    );
    let runs = t.admin.store().runs().await.unwrap();
    assert_eq!(runs.len(), 2, "the same run id in two tenants is two runs");

    // Status: each run completed its own tenant's source only.
    for (tenant, devices) in [("acme", 30), ("beta", 30)] {
        let view = t.admin.source_show(tenant, "Inventory").await.unwrap();
        assert_eq!(view.source.status.status, "success", "{tenant}");
        assert_eq!(view.source.status.last_device_count, Some(devices));
    }
    t.gw.shutdown().await;
}

async fn status_follows_chunks_and_run_reports_of_the_assigned_agent_only(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    let mut acme = t.agent("acme", "edge-1", &["sync"]).await;
    let mut intruder = t.agent("beta", "edge-1", &["sync"]).await;
    let source = t
        .admin
        .source_add("acme", spec("Inventory", Some("edge-1"), "s", 10))
        .await
        .unwrap();
    let id = source.source.id.clone();
    assert_eq!(source.source.status.status, "idle");
    let with_id = |mut chunks: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        for chunk in &mut chunks {
            let text = String::from_utf8(std::mem::take(chunk)).unwrap();
            *chunk = text.replace("\"svc\"", &format!("{id:?}")).into_bytes();
        }
        chunks
    };
    let status = |admin: Admin| async move {
        admin
            .source_show("acme", "Inventory")
            .await
            .unwrap()
            .source
            .status
    };

    // Chunk 0 of 2: running.
    let mut chunks = with_id(run_chunks("edge-1", "default", "run-1", 20, 2, 1));
    let second = chunks.pop().unwrap();
    let first = chunks.pop().unwrap();
    send_stream(&mut acme, vec![envelope("edge-1", 0, 1, true, first)])
        .await
        .unwrap();
    let now = status(t.admin.clone()).await;
    assert_eq!(
        (now.status.as_str(), now.last_run_id.as_deref()),
        ("running", Some("run-1"))
    );

    // Another tenant's agent naming the same source id changes nothing.
    let foreign = with_id(run_chunks("edge-1", "default", "run-x", 5, 1, 2));
    send_stream(&mut intruder, stream_of("edge-1", foreign))
        .await
        .unwrap();
    assert_eq!(
        status(t.admin.clone()).await.last_run_id.as_deref(),
        Some("run-1")
    );

    // The last chunk completes the run: success with its device count.
    send_stream(&mut acme, vec![envelope("edge-1", 0, 1, true, second)])
        .await
        .unwrap();
    let now = status(t.admin.clone()).await;
    assert_eq!(
        (
            now.status.as_str(),
            now.last_device_count,
            now.consecutive_failures
        ),
        ("success", Some(20), 0)
    );
    assert!(now.last_sync_at.is_some());

    // Failed run reports count up; a success resets.
    let report = |result: &str, run: &str, error: &str| GatewayStatusRequest {
        agent_id: "edge-1".into(),
        services: vec![GatewayServiceStatus {
            service_name: "sync:Inventory".into(),
            service_type: "sync".into(),
            source: "status".into(),
            available: result == "success",
            message: serde_json::to_vec(&json!({"source":"Inventory","type":"faker",
                "run_id":run,"result":result,"device_count":0,"duration_ms":5,"error":error}))
            .unwrap(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut events = t.gw.subscribe();
    for run in ["run-2", "run-3"] {
        acme.push_status(report("failed", run, "armis: 401 Unauthorized"))
            .await
            .unwrap();
        wait_for(&mut events, |e| {
            matches!(e, GatewayEvent::RunReport { .. }).then_some(())
        })
        .await;
    }
    // The intruder's report for a source it is not assigned is ignored.
    intruder
        .push_status(report("failed", "run-x", "nope"))
        .await
        .unwrap();
    wait_for(&mut events, |e| {
        matches!(e, GatewayEvent::RunReport { .. }).then_some(())
    })
    .await;
    let now = status(t.admin.clone()).await;
    assert_eq!(
        (
            now.status.as_str(),
            now.consecutive_failures,
            now.last_error.as_deref(),
            now.last_run_id.as_deref()
        ),
        ("failed", 2, Some("armis: 401 Unauthorized"), Some("run-3"))
    );
    acme.push_status(report("success", "run-4", ""))
        .await
        .unwrap();
    wait_for(&mut events, |e| {
        matches!(e, GatewayEvent::RunReport { .. }).then_some(())
    })
    .await;
    let now = status(t.admin.clone()).await;
    assert_eq!(
        (
            now.status.as_str(),
            now.consecutive_failures,
            now.last_error
        ),
        ("success", 0, None)
    );
    t.gw.shutdown().await;
}

async fn admin_changes_reach_a_connected_agent_without_a_poll(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    let mut acme = t.agent("acme", "edge-1", &["sync"]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(4);
    tx.send(ControlStreamRequest {
        payload: Some(Up::Hello(ControlStreamHello {
            agent_id: "edge-1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut downstream = acme
        .control_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The first push: the (empty) current config, since the hello named none.
    let first = downstream.message().await.unwrap().unwrap();
    let Some(Down::Config(first)) = first.payload else {
        panic!("expected a config push")
    };
    t.admin
        .source_add("acme", spec("Inventory", Some("edge-1"), "s", 10))
        .await
        .unwrap();
    let next = downstream.message().await.unwrap().unwrap();
    let Some(Down::Config(next)) = next.payload else {
        panic!("expected a config push")
    };
    assert_ne!(next.config_version, first.config_version);
    let payload: Value = serde_json::from_slice(&next.config_json).unwrap();
    assert!(payload["sources"]["Inventory"].is_object(), "{payload}");
    drop(tx);
    t.gw.shutdown().await;
}

async fn the_database_never_holds_a_credential_in_clear(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    let _acme = t.agent("acme", "edge-1", &["sync"]).await;
    let secret = "Sup3r-Secret-Armis-Key-0c9d";
    let token = "nbt_0123456789abcdef.secret-token-value";
    t.admin
        .source_add("acme", spec("Inventory", Some("edge-1"), secret, 10))
        .await
        .unwrap();
    let netbox: SourceSpec = serde_json::from_value(json!({"name":"NetBox","type":"netbox",
        "endpoint":"https://netbox.example.com","agent_id":"edge-1",
        "credentials":{"api_token": token}}))
    .unwrap();
    t.admin.source_add("acme", netbox).await.unwrap();
    // An update re-seals; the old ciphertext must not leave the value behind.
    let patch =
        serde_json::from_value(json!({"credentials_set":{"api_secret": format!("{secret}-2")}}))
            .unwrap();
    t.admin
        .source_update("acme", "Inventory", patch)
        .await
        .unwrap();
    let database = t.admin.store().location().clone();
    t.gw.shutdown().await;
    let contents = database_contents(&database).await;
    let read: usize = contents.iter().map(|(_, bytes)| bytes.len()).sum();
    match backend {
        // At least a few pages of the file.
        Backend::Sqlite => assert!(read > 4096, "the database files were read: {read} bytes"),
        // Both sources' rows (their sealed credentials as hex).
        Backend::Postgres => {
            let sources = contents
                .iter()
                .find(|(table, _)| table.ends_with(".integration_sources"))
                .map(|(_, rows)| rows.iter().filter(|&&b| b == b'\n').count());
            assert_eq!(sources, Some(2), "the sources were read");
        }
    }
    for needle in [secret, token, "secret-token-value"] {
        assert_nowhere_in_clear(&contents, needle);
    }
}

async fn the_gateway_needs_the_right_credentials_key(backend: Backend) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let database = backend.fresh_database(pki.dir.path(), "gateway").await;
    let mut config = pki.gateway_config_on(database);
    // No key and no dev flag: refused, and the error says what to set.
    let dev_key = config.credentials_key.dev_key_file.take();
    let err = serviceradar_agent::gateway::start(config.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("credentials_key_file"), "{err}");
    // First start with a key seals a check value…
    config.credentials_key.dev_key_file = dev_key;
    start(config.clone()).await.shutdown().await;
    // …so another key is refused at start, not at the first GetConfig.
    let other = pki.dir.path().join("other.key");
    serviceradar_agent::gateway::secrets::write_new_key(&other).unwrap();
    config.credentials_key.key_file = Some(other.clone());
    let err = serviceradar_agent::gateway::start(config)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the key"), "{err}");
    assert!(err.contains(&other.display().to_string()), "{err}");
}

async fn updates_may_use_the_partition_an_assigned_source_sets_and_no_other(backend: Backend) {
    let t = TwoTenants::start(backend).await;
    let mut acme = t.agent("acme", "edge-1", &["sync"]).await;
    let lab: SourceSpec = serde_json::from_value(json!({"name":"Lab","type":"faker",
        "agent_id":"edge-1","partition":"lab","credentials":{"total_devices":"5"}}))
    .unwrap();
    t.admin.source_add("acme", lab).await.unwrap();
    // Another tenant's source partition grants nothing to acme's agent.
    let _beta = t.agent("beta", "edge-1", &["sync"]).await;
    let other: SourceSpec = serde_json::from_value(json!({"name":"Other","type":"faker",
        "agent_id":"edge-1","partition":"other","credentials":{"total_devices":"5"}}))
    .unwrap();
    t.admin.source_add("beta", other).await.unwrap();

    let mut events = t.gw.subscribe();
    for (run, partition) in [
        ("r-cert", "default"),
        ("r-lab", "lab"),
        ("r-other", "other"),
    ] {
        let chunks = run_chunks("edge-1", partition, run, 4, 1, 3);
        send_stream(&mut acme, stream_of("edge-1", chunks))
            .await
            .unwrap();
    }
    let mut rejected = std::collections::BTreeMap::new();
    while rejected.len() < 3 {
        let (run, count) = wait_for(&mut events, |e| match e {
            GatewayEvent::RunComplete {
                run_id, rejected, ..
            } => Some((run_id.clone(), *rejected)),
            _ => None,
        })
        .await;
        rejected.insert(run, count);
    }
    assert_eq!(rejected["r-cert"], 0, "the certificate's partition");
    assert_eq!(rejected["r-lab"], 0, "a partition its assigned source sets");
    assert_eq!(rejected["r-other"], 4, "another tenant's source partition");
    t.gw.shutdown().await;
}

on_both_backends!(
    sources_need_a_sync_capable_agent_of_the_same_tenant,
    two_tenants_with_the_same_names_never_see_each_other,
    status_follows_chunks_and_run_reports_of_the_assigned_agent_only,
    admin_changes_reach_a_connected_agent_without_a_poll,
    the_database_never_holds_a_credential_in_clear,
    the_gateway_needs_the_right_credentials_key,
    updates_may_use_the_partition_an_assigned_source_sets_and_no_other,
);
