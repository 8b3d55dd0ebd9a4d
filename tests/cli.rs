//! The real binary: `certs`, `gateway --config`, the agent with `--config`
//! (an onboarding-bundle bootstrap file), `check-config` and
//! `demo --faker-server`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::process::{lines, wait_line, Running, BIN};
use serde_json::json;

fn run(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn gateway_and_agent_binaries_sync_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &["certs", "--out", "certs", "--agent", "edge-01:site-a"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca-key.pem",
        "gateway.pem",
        "gateway-key.pem",
        "edge-01.pem",
        "edge-01-key.pem",
    ] {
        assert!(
            dir.path().join("certs").join(f).exists(),
            "certs/{f} missing"
        );
    }

    std::fs::write(
        dir.path().join("gateway.json"),
        json!({
            "listen": "127.0.0.1:0", "gateway_id": "gw-cli",
            "tls": {"cert_dir": "certs", "cert_file": "gateway.pem", "key_file": "gateway-key.pem", "ca_file": "ca.pem"},
            "database": "gateway.db", "dev_insecure_credentials_key": true,
            "agents": {"edge-01": {"sources": {"Faker CLI": {"type": "faker",
                "credentials": {"total_devices": "3000", "seed": "9"}, "discovery_interval": "1h"}}}}
        })
        .to_string(),
    )
    .unwrap();
    let mut gateway = Running(
        Command::new(BIN)
            .args(["gateway", "--config", "gateway.json"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gw_lines = lines(&mut gateway.0);
    let listening = wait_line(&gw_lines, "gateway listening", |l| {
        l.starts_with("gateway listening on ")
    });
    let addr = listening
        .trim_start_matches("gateway listening on ")
        .trim()
        .to_owned();

    // The onboarding-bundle format, unchanged, plus our optional state_dir.
    std::fs::write(
        dir.path().join("agent.json"),
        json!({
            "agent_id": "edge-01", "partition": "site-a", "gateway_addr": addr,
            "gateway_security": {"mode": "mtls", "cert_dir": "certs", "server_name": "localhost", "role": "agent",
                "tls": {"cert_file": "edge-01.pem", "key_file": "edge-01-key.pem", "ca_file": "ca.pem"}},
            "state_dir": "agent-state"
        })
        .to_string(),
    )
    .unwrap();
    let check = run(&["check-config", "agent.json"], dir.path());
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{report}");
    assert!(
        report.contains("chains to") && report.contains("matches agent_id"),
        "{report}"
    );

    let _agent = Running(
        Command::new(BIN)
            .args(["--config", "agent.json"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let done = wait_line(&gw_lines, "run complete", |l| {
        l.starts_with("run complete agent=edge-01")
    });
    assert!(done.ends_with("devices=3000"), "{done}");
}

#[test]
fn check_config_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(
        &["certs", "--out", "certs", "--agent", "edge-01", "--agent", "other"],
        dir.path()
    )
    .status
    .success());
    // The certificate of another agent: CN does not match agent_id.
    std::fs::write(
        dir.path().join("agent.json"),
        json!({"agent_id": "edge-01", "gateway_addr": "gw:50052",
               "gateway_security": {"mode": "mtls", "cert_dir": "certs",
                 "tls": {"cert_file": "other.pem", "key_file": "edge-01-key.pem", "ca_file": "ca.pem"}}})
        .to_string(),
    )
    .unwrap();
    let out = run(&["check-config", "agent.json"], dir.path());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains("does not start with agent_id \"edge-01\""),
        "{report}"
    );
    assert!(
        report.contains("edge-01-key.pem does not belong to"),
        "{report}"
    );

    std::fs::write(
        dir.path().join("bad.json"),
        r#"{"agent_id": "x", "gateway_security": {"mode": "none"}}"#,
    )
    .unwrap();
    let out = run(&["check-config", "bad.json"], dir.path());
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        report.contains("bad.json") && report.contains("gateway_addr"),
        "{report}"
    );
}

#[test]
fn demo_with_faker_server_syncs_through_an_armis_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "demo",
            "--faker-server",
            "--devices",
            "2000",
            "--state-dir",
            "demo-state",
            "--timeout",
            "60s",
        ],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("▸ armis source → Faker server at http://127.0.0.1:"),
        "{text}"
    );
    assert!(
        text.contains(r#"served: source "Demo Armis" (armis)"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"▸ run report from "Demo Armis" (armis): success, 2000 devices in 1 API page"#
        ),
        "{text}"
    );
    assert!(text.contains("runs delivered   1"), "{text}");
    assert!(text.contains("devices stored   2000 "), "{text}");
    assert!(text.contains("canonical        2000 devices"), "{text}");
}

#[test]
fn help_lists_the_subcommands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--config",
        "gateway",
        "demo",
        "certs",
        "check-config",
        "bench",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}
