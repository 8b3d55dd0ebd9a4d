//! The identity matrix of gateway.md §1 over real mTLS: every certificate
//! class against the RPCs it may and may not call, wrong CAs, tenant CA
//! binding, reserved slugs, the nil UUID, agent_id mismatches, and client
//! claims that must not matter.

mod gateway_support;

use std::collections::HashMap;

use gateway_support::*;
use serviceradar_agent::gateway::{self, GatewayConfig, GatewayHandle};
use serviceradar_agent::pki::{write_pair, DevCa};
use serviceradar_agent::proto::control_stream_request::Payload as Up;
use serviceradar_agent::proto::{
    AgentConfigRequest, AgentHelloRequest, ControlStreamHello, ControlStreamRequest,
    GatewayStatusRequest,
};
use serviceradar_agent::tls::{self, TlsFiles};
use tonic::Code;

/// The RPCs of the matrix.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    Hello,
    GetConfig,
    PushStatus,
    StreamStatus,
    ControlStream,
}

/// What a call should do: succeed, or fail with this code.
type Expect = Result<(), Code>;

async fn call(client: &mut Client, rpc: Rpc, agent_id: &str) -> Expect {
    let outcome = match rpc {
        Rpc::Hello => client.hello(hello(agent_id)).await.map(|_| ()),
        Rpc::GetConfig => client
            .get_config(AgentConfigRequest {
                agent_id: agent_id.into(),
                config_version: String::new(),
            })
            .await
            .map(|_| ()),
        Rpc::PushStatus => client
            .push_status(GatewayStatusRequest {
                agent_id: agent_id.into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Rpc::StreamStatus => {
            let chunks = run_chunks(agent_id, "default", "matrix-run", 2, 1, 77);
            send_stream(client, stream_of(agent_id, chunks)).await
        }
        Rpc::ControlStream => {
            let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(1);
            tx.send(ControlStreamRequest {
                payload: Some(Up::Hello(ControlStreamHello {
                    agent_id: agent_id.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            client
                .control_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|_| ())
        }
    };
    outcome.map_err(|status| status.code())
}

fn hello(agent_id: &str) -> AgentHelloRequest {
    AgentHelloRequest {
        agent_id: agent_id.into(),
        version: "test".into(),
        capabilities: vec!["sync".into()],
        ..Default::default()
    }
}

/// The PKI of the matrix: the gateway's root CA, tenant `acme` bound to its
/// own intermediate CA, tenant `beta` without one, and a rogue CA.
struct Matrix {
    pki: TestPki,
    acme_ca: DevCa,
    rogue_ca: DevCa,
}

enum Issuer {
    Root,
    AcmeCa,
    Rogue,
}

impl Matrix {
    fn cert(&self, stem: &str, issuer: Issuer, cn: &str, uri: Option<&str>) -> TlsFiles {
        let files = self.pki.layout.agent(stem);
        let (ca, chain) = match issuer {
            Issuer::Root => (&self.pki.ca, None),
            // A tenant CA's leaf is presented with the CA behind it, as the
            // onboarding bundle does.
            Issuer::AcmeCa => (&self.acme_ca, Some(self.acme_ca.cert_pem())),
            Issuer::Rogue => (&self.rogue_ca, None),
        };
        let (cert, key) = ca.issue_client(cn, uri).unwrap();
        let cert = match chain {
            Some(ca_pem) => format!("{cert}{ca_pem}"),
            None => cert,
        };
        write_pair(&files, &(cert, key)).unwrap();
        files
    }
}

/// Tenants `acme` (CA-bound) and `beta` exist before the gateway starts.
async fn setup() -> (Matrix, GatewayConfig, HashMap<String, String>) {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let config = pki.gateway_config(true);
    let admin = gateway::open_admin(&config).await.unwrap().unwrap();
    admin.tenant_add("acme", Some("Acme"), None).await.unwrap();
    admin.tenant_add("beta", None, None).await.unwrap();
    let acme = admin.tenant("acme").await.unwrap();
    let acme_ca = pki
        .ca
        .issue_intermediate("ServiceRadar tenant acme CA")
        .unwrap();
    let sealed = admin
        .key()
        .seal(acme_ca.key_pem().as_bytes(), acme.id.as_bytes())
        .unwrap();
    admin
        .store()
        .bind_tenant_ca(&acme.id, acme_ca.cert_pem().to_owned(), sealed)
        .await
        .unwrap();
    let ids = admin
        .tenant_list()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.slug, t.id))
        .collect();
    let rogue_ca = DevCa::generate("rogue CA").unwrap();
    (
        Matrix {
            pki,
            acme_ca,
            rogue_ca,
        },
        config,
        ids,
    )
}

async fn outcome(gw: &GatewayHandle, files: &TlsFiles, rpc: Rpc, agent_id: &str) -> Expect {
    match connect(gw.local_addr(), files).await {
        // A certificate the TLS layer refuses ends the handshake with an
        // alert: the client sees a transport error (connect or first call),
        // the matrix counts it as unauthenticated.
        Ok(mut client) => match call(&mut client, rpc, agent_id).await {
            Err(Code::Unknown | Code::Unavailable) => Err(Code::Unauthenticated),
            other => other,
        },
        Err(_) => Err(Code::Unauthenticated),
    }
}

#[tokio::test]
async fn identity_matrix() {
    let (m, config, tenants) = setup().await;
    let gw = start(config).await;
    use Issuer::*;
    use Rpc::*;
    let spiffe_agent = m.cert(
        "spiffe-agent",
        Root,
        "plat-1.default.serviceradar",
        Some("spiffe://serviceradar.local/agent/default/plat-1"),
    );
    let spiffe_gateway = m.cert(
        "spiffe-gw",
        Root,
        "gw-1.default.serviceradar",
        Some("spiffe://serviceradar.local/gateway/gw-1"),
    );
    let acme_by_acme_ca = m.cert("acme-ok", AcmeCa, "edge-1.site-a.acme.serviceradar", None);
    let acme_by_root = m.cert("acme-root", Root, "edge-2.site-a.acme.serviceradar", None);
    let beta_by_root = m.cert("beta-ok", Root, "edge-3.site-b.beta.serviceradar", None);
    let beta_by_acme_ca = m.cert("beta-acme", AcmeCa, "edge-4.site-b.beta.serviceradar", None);
    let single_by_root = m.cert("single", Root, "edge-5.dc1.serviceradar", None);
    let single_by_acme_ca = m.cert("single-acme", AcmeCa, "edge-6.dc1.serviceradar", None);
    let spiffe_by_acme_ca = m.cert(
        "spiffe-acme",
        AcmeCa,
        "plat-2.default.serviceradar",
        Some("spiffe://serviceradar.local/agent/default/plat-2"),
    );
    let unknown_slug = m.cert("unknown", Root, "edge-7.p.nobody.serviceradar", None);
    let platform_slug = m.cert("reserved-1", Root, "edge-8.p.platform.serviceradar", None);
    let operator_slug = m.cert(
        "reserved-2",
        Root,
        "edge-9.p.serviceradar-operator.serviceradar",
        None,
    );
    let rogue = m.cert("rogue", Rogue, "edge-10.p.acme.serviceradar", None);
    let not_a_name = m.cert("nameless", Root, "just-a-name", None);

    let denied = Err(Code::PermissionDenied);
    let unauthenticated = Err(Code::Unauthenticated);
    let cases: Vec<(&str, &TlsFiles, Rpc, &str, Expect)> = vec![
        // Platform (SPIFFE) agent: may enrol and heartbeat; no sync config,
        // no ControlStream, no sync results.
        (
            "platform agent Hello",
            &spiffe_agent,
            Hello,
            "plat-1",
            Ok(()),
        ),
        (
            "platform agent PushStatus",
            &spiffe_agent,
            PushStatus,
            "plat-1",
            Ok(()),
        ),
        (
            "platform agent GetConfig",
            &spiffe_agent,
            GetConfig,
            "plat-1",
            denied,
        ),
        (
            "platform agent ControlStream",
            &spiffe_agent,
            ControlStream,
            "plat-1",
            denied,
        ),
        (
            "platform agent StreamStatus",
            &spiffe_agent,
            StreamStatus,
            "plat-1",
            denied,
        ),
        // Platform identity of another component type.
        (
            "platform gateway Hello",
            &spiffe_gateway,
            Hello,
            "gw-1",
            denied,
        ),
        // Tenant edge, through the tenant's own CA: everything.
        (
            "acme via acme CA Hello",
            &acme_by_acme_ca,
            Hello,
            "edge-1",
            Ok(()),
        ),
        (
            "acme via acme CA GetConfig",
            &acme_by_acme_ca,
            GetConfig,
            "edge-1",
            Ok(()),
        ),
        (
            "acme via acme CA StreamStatus",
            &acme_by_acme_ca,
            StreamStatus,
            "edge-1",
            Ok(()),
        ),
        (
            "acme via acme CA ControlStream",
            &acme_by_acme_ca,
            ControlStream,
            "edge-1",
            Ok(()),
        ),
        // agent_id must equal the certificate's component id.
        (
            "acme agent_id mismatch Hello",
            &acme_by_acme_ca,
            Hello,
            "edge-2",
            denied,
        ),
        (
            "acme agent_id mismatch GetConfig",
            &acme_by_acme_ca,
            GetConfig,
            "other",
            denied,
        ),
        (
            "acme agent_id mismatch PushStatus",
            &acme_by_acme_ca,
            PushStatus,
            "other",
            denied,
        ),
        // Tenant CA mismatch, both ways.
        (
            "acme cert not from acme's CA",
            &acme_by_root,
            Hello,
            "edge-2",
            denied,
        ),
        (
            "acme cert not from acme's CA GetConfig",
            &acme_by_root,
            GetConfig,
            "edge-2",
            denied,
        ),
        (
            "beta cert from acme's CA",
            &beta_by_acme_ca,
            Hello,
            "edge-4",
            denied,
        ),
        (
            "single-tenant cert from acme's CA",
            &single_by_acme_ca,
            Hello,
            "edge-6",
            denied,
        ),
        (
            "platform cert from acme's CA",
            &spiffe_by_acme_ca,
            Hello,
            "plat-2",
            denied,
        ),
        // A tenant without a bound CA accepts the gateway's root.
        (
            "beta via root Hello",
            &beta_by_root,
            Hello,
            "edge-3",
            Ok(()),
        ),
        (
            "beta via root GetConfig",
            &beta_by_root,
            GetConfig,
            "edge-3",
            Ok(()),
        ),
        // Single-tenant CN: the default tenant.
        (
            "single-tenant Hello",
            &single_by_root,
            Hello,
            "edge-5",
            Ok(()),
        ),
        (
            "single-tenant GetConfig",
            &single_by_root,
            GetConfig,
            "edge-5",
            Ok(()),
        ),
        // Unknown and reserved slugs.
        (
            "unknown tenant slug",
            &unknown_slug,
            Hello,
            "edge-7",
            denied,
        ),
        (
            "reserved slug platform",
            &platform_slug,
            Hello,
            "edge-8",
            denied,
        ),
        (
            "reserved slug platform GetConfig",
            &platform_slug,
            GetConfig,
            "edge-8",
            denied,
        ),
        (
            "reserved slug serviceradar-operator",
            &operator_slug,
            Hello,
            "edge-9",
            denied,
        ),
        // Not chained to the gateway's trust root at all.
        ("rogue CA", &rogue, Hello, "edge-10", unauthenticated),
        // Chained, but no identity in the name.
        (
            "no identity in the certificate",
            &not_a_name,
            Hello,
            "just-a-name",
            unauthenticated,
        ),
    ];
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for (name, files, rpc, agent_id, expected) in cases {
        let got = outcome(&gw, files, rpc, agent_id).await;
        if got != expected {
            failures.push(format!(
                "{name}: {rpc:?} expected {expected:?}, got {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Each accepted identity landed in the tenant its certificate means.
    let tenant_of: HashMap<String, String> = gw
        .agents()
        .into_iter()
        .map(|a| (a.agent_id, a.tenant))
        .collect();
    assert_eq!(tenant_of["plat-1"], tenants["platform"]);
    assert_eq!(tenant_of["edge-1"], tenants["acme"]);
    assert_eq!(tenant_of["edge-3"], tenants["beta"]);
    assert_eq!(tenant_of["edge-5"], tenants["default"]);
    for refused in [
        "gw-1", "edge-2", "edge-4", "edge-6", "edge-7", "edge-8", "edge-10",
    ] {
        assert!(!tenant_of.contains_key(refused), "{refused} was registered");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn client_claims_about_tenant_and_partition_are_ignored() {
    let (m, config, tenants) = setup().await;
    let gw = start(config).await;
    let files = m.cert(
        "claims",
        Issuer::Root,
        "edge-3.site-b.beta.serviceradar",
        None,
    );
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    let mut claims = hello("edge-3");
    claims.partition = "site-z".into();
    claims.labels = HashMap::from([
        ("tenant".to_owned(), "acme".to_owned()),
        ("tenant_id".to_owned(), tenants["acme"].clone()),
    ]);
    client.hello(claims).await.unwrap();
    let agent = gw
        .agents()
        .into_iter()
        .find(|a| a.agent_id == "edge-3")
        .unwrap();
    assert_eq!(
        (agent.tenant.as_str(), agent.partition.as_str()),
        (tenants["beta"].as_str(), "site-b")
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_nil_uuid_is_no_tenant_id_anywhere() {
    let (_m, mut config, _) = setup().await;
    let nil = "00000000-0000-0000-0000-000000000000";
    // As the platform tenant's id in the config file…
    let text = format!(
        r#"{{"tls":{{"cert_file":"a","key_file":"b","ca_file":"c"}},"platform_tenant_id":"{nil}"}}"#
    );
    let err = GatewayConfig::parse(&text, std::path::Path::new("/etc/gw.json")).unwrap_err();
    assert!(err.to_string().contains("platform_tenant_id"), "{err}");
    // …as a new tenant's id…
    let admin = gateway::open_admin(&config).await.unwrap().unwrap();
    let err = admin
        .tenant_add("gamma", None, Some(nil))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nil UUID"), "{err}");
    // …and pinned in code: the gateway does not start.
    config.tenancy.platform_tenant_id = Some(uuid::Uuid::nil());
    let err = gateway::start(config).await.unwrap_err();
    assert!(err.to_string().contains("nil UUID"), "{err}");
    // The platform tenant that exists has a random, non-nil id.
    let platform = admin
        .tenant_list()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.platform)
        .unwrap();
    assert_ne!(platform.id, nil);
    assert_eq!(platform.slug, "platform");
    // Reserved slugs are refused for new tenants.
    for slug in ["platform", "serviceradar-operator"] {
        assert!(admin.tenant_add(slug, None, None).await.is_err(), "{slug}");
    }
}
