//! The agent registry (gateway.md §2) with a real agent: Hello registers it
//! from the certificate and what the agent says about itself; the database
//! remembers it across a gateway restart; `gateway agent list` shows it. On
//! both store backends.

mod backend_support;
mod common;

use std::process::Command;

use backend_support::{config_entry, Backend};
use common::*;
use serde_json::json;
use serviceradar_agent::agent;
use serviceradar_agent::gateway::{self, GatewayEvent};

async fn hello_registers_the_agent_and_the_database_remembers_it(backend: Backend) {
    let fx = Fixture::new(&["agent-reg"]);
    let database = backend.fresh_database(fx.path(), "gateway").await;
    let fx = fx.with_database(database);
    let config = fx.gateway_config(&[("agent-reg", json!({"Faker": faker_source(100, 1)}))]);
    let gw = gateway::start(config.clone())
        .await
        .expect("gateway starts");
    let mut events = gw.subscribe();
    let agent = agent::start(fx.bootstrap("agent-reg", &gw.local_addr().to_string(), json!({})))
        .expect("agent starts");
    // A run report is a PushStatus: by then Hello has registered the agent
    // and the report has refreshed it.
    wait_for(&mut events, "RunReport", |e| match e {
        GatewayEvent::RunReport { agent_id, .. } if agent_id == "agent-reg" => Some(()),
        _ => None,
    })
    .await;
    let registered = gw.agents();
    let [record] = registered.as_slice() else {
        panic!("one agent expected: {registered:?}")
    };
    // A single-tenant certificate (CN agent-reg.default.serviceradar) puts
    // the agent in the default tenant, recorded by id.
    let default_tenant = gw
        .tenants()
        .into_iter()
        .find(|t| t.slug == "default")
        .expect("the default tenant exists");
    assert_eq!(
        (
            record.tenant.as_str(),
            record.agent_id.as_str(),
            record.partition.as_str()
        ),
        (default_tenant.id.as_str(), "agent-reg", "default")
    );
    assert_eq!(record.version, serviceradar_agent::VERSION);
    assert!(record.sync_capable(), "{:?}", record.capabilities);
    assert!(!record.hostname.is_empty() && !record.os.is_empty() && !record.arch.is_empty());
    assert!(record.first_seen <= record.last_seen);
    assert!(record.online(record.last_seen));
    agent.shutdown();
    gw.shutdown().await;

    // A restarted gateway knows the agent before it says Hello again.
    let gw = gateway::start(config.clone())
        .await
        .expect("gateway restarts");
    assert_eq!(gw.agents(), registered);
    gw.shutdown().await;

    // The admin CLI reads the same database.
    let config_file = fx.path().join("gateway.json");
    let mut doc = json!({"listen": "127.0.0.1:0", "gateway_id": "gw-test",
        "tls": {"cert_file": config.tls.cert_file, "key_file": config.tls.key_file,
                "ca_file": config.tls.ca_file},
        "agents": {}, "credentials_key_file": config.credentials_key.dev_key_file});
    let (key, value) = config_entry(config.database.as_ref().expect("a database"));
    doc[key] = value;
    std::fs::write(&config_file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_serviceradar-agent"))
        .args(["gateway", "--config"])
        .arg(&config_file)
        .args(["agent", "list"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.contains("agent-reg"))
        .unwrap_or_else(|| panic!("no row for the agent:\n{stdout}"));
    for field in ["default", "sync", serviceradar_agent::VERSION, "online"] {
        assert!(row.contains(field), "{field} missing from {row:?}");
    }
}

on_both_backends!(actix_rt::test; hello_registers_the_agent_and_the_database_remembers_it);
