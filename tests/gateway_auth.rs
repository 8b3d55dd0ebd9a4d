//! Gateway identity, TLS and config delivery over a real mTLS connection.

mod gateway_support;

use std::collections::BTreeMap;

use gateway_support::*;
use serde_json::json;
use serviceradar_agent::gateway::GatewayEvent;
use serviceradar_agent::pki::{write_pair, DevCa};
use serviceradar_agent::proto::control_stream_request::Payload as Up;
use serviceradar_agent::proto::control_stream_response::Payload as Down;
use serviceradar_agent::proto::{
    AgentConfigRequest, AgentHelloRequest, CommandResult, ConfigAck, ControlStreamHello,
    ControlStreamRequest, GatewayServiceStatus, GatewayStatusRequest,
};
use serviceradar_agent::tls::{self, TlsFiles};
use sha2::{Digest, Sha256};
use tonic::Code;

fn hello(agent_id: &str) -> AgentHelloRequest {
    AgentHelloRequest {
        agent_id: agent_id.into(),
        version: "test".into(),
        capabilities: vec!["sync".into()],
        partition: "client-says-this".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn hello_identity_comes_from_the_certificate() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();

    let response = client.hello(hello("agent-1")).await.unwrap().into_inner();
    assert!(response.accepted);
    assert_eq!(response.gateway_id, "gw-test");
    assert_eq!(response.heartbeat_interval_sec, 30);
    assert!(response.config_outdated, "empty config_version is outdated");
    assert!(response.server_time > 1_600_000_000);
    let (partition, capabilities) = wait_for(&mut events, |e| match e {
        GatewayEvent::Hello {
            agent_id,
            partition,
            capabilities,
            ..
        } if agent_id == "agent-1" => Some((partition.clone(), capabilities.clone())),
        _ => None,
    })
    .await;
    assert_eq!(
        partition, "site-a",
        "the certificate's partition wins over the client's"
    );
    assert_eq!(capabilities, vec!["sync".to_owned()]);
    gw.shutdown().await;
}

#[tokio::test]
async fn agent_id_not_matching_the_certificate_is_permission_denied() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;

    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();
    let err = client.hello(hello("agent-2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .get_config(AgentConfigRequest {
            agent_id: "agent-2".into(),
            config_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .push_status(GatewayStatusRequest {
            agent_id: "agent-2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client.hello(hello("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // CN-only certificate (today's single-tenant ServiceRadar form).
    let files = pki.client("cn-only", "agent-9.dc1.serviceradar", None);
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    assert!(client.hello(hello("agent-9")).await.is_ok());
    assert_eq!(
        client.hello(hello("agent-1")).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A platform identity that is not an agent.
    let files = pki.client(
        "gw-cert",
        "gw-7.default.serviceradar",
        Some("spiffe://serviceradar.local/gateway/gw-7"),
    );
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    assert_eq!(
        client.hello(hello("gw-7")).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // A certificate from the right CA whose name is no identity at all.
    let files = pki.client("anonymous", "just-a-name", None);
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    assert_eq!(
        client.hello(hello("just-a-name")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    let mut events = gw.subscribe();

    let rogue_ca = DevCa::generate("rogue CA").unwrap();
    let files = TlsFiles {
        ca_file: pki.layout.ca_cert(), // trusts the real gateway…
        ..pki.layout.agent("rogue")
    };
    write_pair(&files, &rogue_ca.issue_agent("agent-1", "site-a").unwrap()).unwrap(); // …but is not trusted by it
    let outcome: Result<(), BoxError> = async {
        let mut client = connect(gw.local_addr(), &files).await?;
        client.hello(hello("agent-1")).await?;
        Ok(())
    }
    .await;
    assert!(
        outcome.is_err(),
        "a foreign client certificate must not get through"
    );

    // The gateway still serves legitimate agents, and saw no Hello.
    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();
    client.hello(hello("agent-1")).await.unwrap();
    let first_hello = wait_for(&mut events, |e| match e {
        GatewayEvent::Hello { agent_id, .. } => Some(agent_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(first_hello, "agent-1");
    assert_eq!(events.try_recv().ok().map(|e| format!("{e:?}")), None);
    gw.shutdown().await;
}

#[tokio::test]
async fn plaintext_client_fails() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;

    let outcome: Result<(), BoxError> = async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", gw.local_addr()))?
                .connect()
                .await?;
        let mut client =
            serviceradar_agent::proto::agent_gateway_service_client::AgentGatewayServiceClient::new(
                channel,
            );
        client.hello(hello("agent-1")).await?;
        Ok(())
    }
    .await;
    assert!(
        outcome.is_err(),
        "plaintext gRPC must not reach the service"
    );

    // A client without a certificate fails the handshake too.
    let no_cert = rustls::ClientConfig::builder()
        .with_root_certificates(tls::load_roots(&pki.layout.ca_cert()).unwrap())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(no_cert))
            .connect(tls::server_name("localhost").unwrap(), tcp)
            .await?;
        // TLS 1.3 reports the server's rejection of the (absent) client
        // certificate on the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    }
    .await;
    assert!(outcome.is_err());
    gw.shutdown().await;
}

#[tokio::test]
async fn get_config_is_versioned_by_the_payload_hash() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let agents = BTreeMap::from([(
        "agent-1".to_owned(),
        sources(
            json!({"Demo Faker": {"type": "faker", "credentials": {"total_devices": "100", "seed": "1"},
                                      "discovery_interval": "1h"}}),
        ),
    )]);
    let gw = start_with_agents(&pki, false, agents).await;
    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();

    let ask = |version: &str| AgentConfigRequest {
        agent_id: "agent-1".into(),
        config_version: version.into(),
    };
    let config = client.get_config(ask("")).await.unwrap().into_inner();
    assert!(!config.not_modified);
    assert_eq!(
        config.config_version,
        format!("v{}", hex::encode(Sha256::digest(&config.config_json)))
    );
    assert_eq!(
        String::from_utf8(config.config_json.clone()).unwrap(),
        r#"{"agent_id":"agent-1","sources":{"Demo Faker":{"credentials":{"seed":"1","total_devices":"100"},"discovery_interval":"1h","type":"faker"}}}"#
    );
    assert_eq!(
        (
            config.heartbeat_interval_sec,
            config.config_poll_interval_sec
        ),
        (30, 300)
    );

    let again = client
        .get_config(ask(&config.config_version))
        .await
        .unwrap()
        .into_inner();
    assert!(again.not_modified);
    assert!(again.config_json.is_empty());
    assert_eq!(again.config_version, config.config_version);

    let mut current = hello("agent-1");
    current.config_version = config.config_version.clone();
    assert!(
        !client
            .hello(current)
            .await
            .unwrap()
            .into_inner()
            .config_outdated
    );

    // A new config is a new version.
    gw.set_agent_sources("agent-1", serde_json::Map::new());
    let changed = client
        .get_config(ask(&config.config_version))
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.not_modified);
    assert_eq!(
        changed.config_json,
        br#"{"agent_id":"agent-1","sources":{}}"#
    );

    // An agent that is not configured gets no sources.
    let mut other = connect(gw.local_addr(), &pki.agent("agent-2", "p"))
        .await
        .unwrap();
    let config = other
        .get_config(AgentConfigRequest {
            agent_id: "agent-2".into(),
            config_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        config.config_json,
        br#"{"agent_id":"agent-2","sources":{}}"#
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn control_stream_pushes_config_and_commands() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();

    // The first message must be hello.
    let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(8);
    tx.send(ControlStreamRequest {
        payload: Some(Up::ConfigAck(ConfigAck::default())),
    })
    .await
    .unwrap();
    let err = client
        .control_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let current = client
        .get_config(AgentConfigRequest {
            agent_id: "agent-1".into(),
            config_version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config_version;
    let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(8);
    tx.send(ControlStreamRequest {
        payload: Some(Up::Hello(ControlStreamHello {
            agent_id: "agent-1".into(),
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

    gw.set_agent_sources(
        "agent-1",
        sources(json!({"Lab": {"type": "faker"}})).sources,
    );
    let pushed = match down.message().await.unwrap().and_then(|m| m.payload) {
        Some(Down::Config(config)) => config,
        other => panic!("expected a config push, got {other:?}"),
    };
    assert_ne!(pushed.config_version, current);
    assert_eq!(
        pushed.config_json,
        br#"{"agent_id":"agent-1","sources":{"Lab":{"type":"faker"}}}"#
    );
    tx.send(ControlStreamRequest {
        payload: Some(Up::ConfigAck(ConfigAck {
            config_version: pushed.config_version.clone(),
            timestamp: 1,
        })),
    })
    .await
    .unwrap();
    let acked = wait_for(&mut events, |e| match e {
        GatewayEvent::ConfigAcked { agent_id, version } if agent_id == "agent-1" => {
            Some(version.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(acked, pushed.config_version);

    let command_id = gw
        .send_command("agent-1", "sync.run_now", json!({"source": "Lab"}))
        .unwrap();
    let command = match down.message().await.unwrap().and_then(|m| m.payload) {
        Some(Down::Command(command)) => command,
        other => panic!("expected a command, got {other:?}"),
    };
    assert_eq!(command.command_id, command_id);
    assert_eq!(command.command_type, "sync.run_now");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&command.payload_json).unwrap(),
        json!({"source": "Lab"})
    );
    tx.send(ControlStreamRequest {
        payload: Some(Up::CommandResult(CommandResult {
            command_id: command_id.clone(),
            command_type: "sync.run_now".into(),
            success: true,
            message: "started".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let (id, success) = wait_for(&mut events, |e| match e {
        GatewayEvent::CommandResult {
            command_id,
            success,
            ..
        } => Some((command_id.clone(), *success)),
        _ => None,
    })
    .await;
    assert_eq!((id.as_str(), success), (command_id.as_str(), true));

    assert!(gw
        .send_command("agent-unknown", "sync.run_now", json!({}))
        .is_err());
    gw.shutdown().await;
}

#[tokio::test]
async fn push_status_heartbeats_and_run_reports() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    let mut events = gw.subscribe();
    let mut client = connect(gw.local_addr(), &pki.agent("agent-1", "site-a"))
        .await
        .unwrap();

    client
        .push_status(GatewayStatusRequest {
            agent_id: "agent-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for(&mut events, |e| {
        matches!(e, GatewayEvent::Heartbeat { agent_id } if agent_id == "agent-1").then_some(())
    })
    .await;

    let report = json!({"source": "Demo Faker", "type": "faker", "run_id": "run-1", "result": "failed",
                        "device_count": 0, "duration_ms": 12, "error": "endpoint unreachable"});
    client
        .push_status(GatewayStatusRequest {
            agent_id: "agent-1".into(),
            services: vec![GatewayServiceStatus {
                service_name: "sync:Demo Faker".into(),
                service_type: "sync".into(),
                source: "status".into(),
                available: false,
                message: serde_json::to_vec(&report).unwrap(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let (source, run_id, result, error) = wait_for(&mut events, |e| match e {
        GatewayEvent::RunReport {
            source,
            run_id,
            result,
            error,
            ..
        } => Some((
            source.clone(),
            run_id.clone(),
            result.clone(),
            error.clone(),
        )),
        _ => None,
    })
    .await;
    assert_eq!(
        (
            source.as_str(),
            run_id.as_str(),
            result.as_str(),
            error.as_deref()
        ),
        (
            "Demo Faker",
            "run-1",
            "failed",
            Some("endpoint unreachable")
        )
    );
    assert_eq!(gw.stats().heartbeats, 2);
    gw.shutdown().await;
}

/// gateway.md §1: a SPIFFE (platform) identity of type `agent` may say Hello,
/// but never gets tenant sync configuration, by GetConfig or ControlStream.
#[tokio::test]
async fn platform_identity_gets_no_sync_configuration() {
    tls::install_crypto_provider();
    let pki = TestPki::new();
    let gw = start(pki.gateway_config(false)).await;
    let files = pki.client(
        "platform-agent",
        "agent-p.default.serviceradar",
        Some("spiffe://serviceradar.local/agent/default/agent-p"),
    );
    let mut client = connect(gw.local_addr(), &files).await.unwrap();
    assert!(client.hello(hello("agent-p")).await.is_ok());
    let err = client
        .get_config(AgentConfigRequest {
            agent_id: "agent-p".into(),
            config_version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("platform"), "{}", err.message());

    let (tx, rx) = tokio::sync::mpsc::channel::<ControlStreamRequest>(8);
    tx.send(ControlStreamRequest {
        payload: Some(Up::Hello(ControlStreamHello {
            agent_id: "agent-p".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let err = client
        .control_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The same agent with a tenant (CN-only) certificate gets its config.
    let mut client = connect(gw.local_addr(), &pki.agent("agent-p", "default"))
        .await
        .unwrap();
    assert!(client
        .get_config(AgentConfigRequest {
            agent_id: "agent-p".into(),
            config_version: String::new(),
        })
        .await
        .is_ok());
    gw.shutdown().await;
}
