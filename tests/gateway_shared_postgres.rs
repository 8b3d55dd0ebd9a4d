//! Two gateway processes on one PostgreSQL database (issue 5): each has an
//! agent whose Faker source reports the same devices (same seed, same
//! partition), so the two gateways reconcile overlapping runs of one scope at
//! the same time. There must be one canonical device per identity, however
//! the two transactions interleave — and a second round, after the devices'
//! IPs churned, must not change that.

mod backend_support;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use backend_support::{config_entry, Backend};
use common::process::{ok, start_gateway, wait_line, Running, BIN};
use serde_json::json;
use serviceradar_agent::gateway::dire::IdKind;
use serviceradar_agent::gateway::store::DeviceFilter;
use serviceradar_agent::gateway::DatabaseLocation;

const DEVICES: u64 = 20_000;

/// A gateway config on the shared database, with `agent`'s Faker source
/// pinned in it (both gateways give their agent the same devices).
fn gateway_config(dir: &Path, name: &str, database: &DatabaseLocation, agent: &str) {
    let (key, value) = config_entry(database);
    let mut config = json!({
        "listen": "127.0.0.1:0", "gateway_id": name,
        "tls": {"cert_dir": "certs", "cert_file": "gateway.pem", "key_file": "gateway-key.pem",
                "ca_file": "ca.pem"},
        // Both gateways seal and open credentials with the same key.
        "credentials_key_file": "credentials.key",
        "agents": {agent: {"sources": {"Shared Faker": {
            "type": "faker", "partition": "site",
            "credentials": {"total_devices": DEVICES.to_string(), "seed": "17",
                            "churn_percent": "5"},
            "discovery_interval": "1s"}}}}
    });
    config[key] = value;
    std::fs::write(dir.join(format!("{name}.json")), config.to_string()).unwrap();
}

fn start_agent(dir: &Path, agent: &str, addr: &str) -> Running {
    let bootstrap = dir.join(format!("{agent}.json"));
    std::fs::write(
        &bootstrap,
        json!({"agent_id": agent, "partition": "site", "gateway_addr": addr,
               "state_dir": dir.join(format!("{agent}-state")),
               "gateway_security": {"mode": "mtls", "cert_dir": dir.join("certs"),
                 "server_name": "localhost", "role": "agent",
                 "tls": {"cert_file": format!("{agent}.pem"),
                         "key_file": format!("{agent}-key.pem"), "ca_file": "ca.pem"}}})
        .to_string(),
    )
    .unwrap();
    Running(
        Command::new(BIN)
            .arg("--config")
            .arg(&bootstrap)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_postgres_keep_one_device_per_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        dir,
        &[
            "certs",
            "--out",
            "certs",
            "--agent",
            "edge-a:site",
            "--agent",
            "edge-b:site",
        ],
    );
    std::fs::write(dir.join("credentials.key"), "ab".repeat(32)).unwrap();
    let database = Backend::Postgres.fresh_database(dir, "shared").await;
    gateway_config(dir, "gw-1", &database, "edge-a");
    gateway_config(dir, "gw-2", &database, "edge-b");

    let gw1 = start_gateway(dir, &["--config", "gw-1.json"]);
    let gw2 = start_gateway(dir, &["--config", "gw-2.json"]);
    let _edge_a = start_agent(dir, "edge-a", &gw1.addr);
    let _edge_b = start_agent(dir, "edge-b", &gw2.addr);

    // Two rounds: the pristine inventory, then one where devices moved IPs.
    for round in 1..=2 {
        for (lines, agent) in [(&gw1.lines, "edge-a"), (&gw2.lines, "edge-b")] {
            let done = wait_line(lines, &format!("{agent} run {round}"), |l| {
                l.starts_with(&format!("run complete agent={agent} "))
            });
            assert!(done.ends_with(&format!(" devices={DEVICES}")), "{done}");
        }
        let store = serviceradar_agent::gateway::open_store(&database)
            .await
            .unwrap();
        let devices = store
            .canonical_devices(DeviceFilter {
                limit: 1_000_000,
                ..DeviceFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(devices.len() as u64, DEVICES, "round {round}");
        for device in &devices {
            let armis = device
                .identifiers
                .iter()
                .filter(|i| i.kind == IdKind::Armis)
                .count();
            assert_eq!(armis, 1, "round {round}: {device:?}");
            assert_eq!(device.partition, "site");
            assert!(device.merged_into.is_none());
        }
    }
}
