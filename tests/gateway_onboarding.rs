//! "Add Edge Agent" end to end with the real binary: dev PKI, gateway,
//! `tenant add`, `onboard-agent`, the agent started from the bundle alone,
//! a source added through the CLI while everything runs, devices stored.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::process::{fails, ok, start_gateway, wait_line, Running, BIN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use serviceradar_agent::config::bootstrap::{Bootstrap, Security};
use x509_parser::prelude::{FromDer, X509Certificate};

/// `certs/` from `serviceradar-agent certs` and a gateway config whose
/// onboarding CA is the dev CA.
fn setup(dir: &Path, onboarding: serde_json::Value) {
    ok(dir, &["certs", "--out", "certs"]);
    std::fs::write(
        dir.join("gateway.json"),
        json!({
            "listen": "127.0.0.1:0", "gateway_id": "gw-onboarding",
            "tls": {"cert_dir": "certs", "cert_file": "gateway.pem", "key_file": "gateway-key.pem", "ca_file": "ca.pem"},
            "database": "gateway.db", "dev_insecure_credentials_key": true,
            "onboarding": onboarding
        })
        .to_string(),
    )
    .unwrap();
}

fn gw<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["gateway", "--config", "gateway.json"];
    all.extend_from_slice(args);
    all
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn subject_cn(der: &CertificateDer<'_>) -> (String, String) {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (cn(cert.subject()), cn(cert.issuer()))
}

#[test]
fn an_onboarded_agent_connects_from_its_bundle_and_runs_a_cli_added_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    setup(dir, json!({"ca_key_file": "certs/ca-key.pem"}));

    let gateway = start_gateway(dir, &["--config", "gateway.json"]);
    let (gw_lines, addr) = (&gateway.lines, gateway.addr.clone());

    // The CLI works against the running gateway's database.
    ok(dir, &gw(&["tenant", "add", "acme", "--name", "Acme Corp"]));
    let summary = ok(
        dir,
        &gw(&[
            "onboard-agent",
            "--tenant",
            "acme",
            "--agent",
            "edge-7",
            "--partition",
            "site-b",
            "--out",
            "bundle",
            "--gateway-addr",
            &addr,
            "--server-name",
            "localhost",
        ]),
    );
    assert!(
        summary.contains("certificate CN  edge-7.site-b.acme.serviceradar")
            && summary.contains("(created now)")
            && !summary.contains("PRIVATE KEY"),
        "{summary}"
    );

    // The bundle: agent.json in the wire.md §3 form, and its certificates.
    let bundle = dir.join("bundle");
    let agent_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("agent.json")).unwrap()).unwrap();
    assert_eq!(
        agent_json,
        json!({"agent_id": "edge-7", "partition": "site-b", "gateway_addr": addr,
               "gateway_security": {"mode": "mtls", "cert_dir": "certs", "server_name": "localhost",
                 "role": "agent", "tls": {"cert_file": "component.pem", "key_file": "component-key.pem",
                 "ca_file": "ca-chain.pem"}}})
    );
    let chain = pem_certs(&bundle.join("certs/component.pem"));
    assert_eq!(chain.len(), 2, "leaf + tenant CA");
    let (leaf_cn, leaf_issuer) = subject_cn(&chain[0]);
    let (ca_cn, ca_issuer) = subject_cn(&chain[1]);
    assert_eq!(leaf_cn, "edge-7.site-b.acme.serviceradar");
    assert_eq!(leaf_issuer, ca_cn);
    assert!(ca_cn.starts_with("ServiceRadar tenant acme CA "), "{ca_cn}");
    assert_eq!(ca_issuer, "ServiceRadar Dev CA");
    assert_eq!(
        std::fs::read(bundle.join("certs/ca-chain.pem")).unwrap(),
        std::fs::read(dir.join("certs/ca.pem")).unwrap()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bundle.join("certs/component-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The agent's loader resolves cert_dir against agent.json's folder.
    let bootstrap = Bootstrap::load(&bundle.join("agent.json")).unwrap();
    let Security::Mtls { files, server_name } = &bootstrap.security else {
        panic!("not mtls");
    };
    assert_eq!(files.cert_file, bundle.join("certs/component.pem"));
    assert_eq!(server_name, "localhost");
    let check = ok(dir, &["check-config", "bundle/agent.json"]);
    assert!(check.contains("chains to"), "{check}");
    assert!(
        ok(dir, &gw(&["tenant", "list"]))
            .lines()
            .any(|l| l.starts_with("acme ") && l.contains("bound")),
        "the tenant is bound to its CA"
    );

    // Unpacked next to the binary, started from elsewhere: the agent connects.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let _agent = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(bundle.join("agent.json"))
            .current_dir(&elsewhere)
            // agent.json has no state_dir; systemd's variable names one.
            .env("STATE_DIRECTORY", dir.join("agent-state"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_line(gw_lines, "enrolment of edge-7", |l| {
        l == "agent enrolled tenant=acme agent=edge-7 partition=site-b"
    });
    let agents = ok(dir, &gw(&["agent", "list", "--tenant", "acme"]));
    let row = agents.lines().find(|l| l.contains("edge-7")).unwrap();
    assert!(row.contains("online") && row.ends_with("yes"), "{row}");

    // A source added through the CLI reaches the connected agent.
    ok(
        dir,
        &gw(&[
            "source",
            "add",
            "--tenant",
            "acme",
            "--name",
            "Acme Faker",
            "--type",
            "faker",
            "--agent",
            "edge-7",
            "--credential",
            "total_devices=2000",
            "--credential",
            "seed=3",
            "--discovery-interval",
            "1h",
        ]),
    );
    let done = wait_line(gw_lines, "run complete", |l| {
        l.starts_with("run complete agent=edge-7 ")
    });
    assert!(done.ends_with(" devices=2000"), "{done}");

    // A second agent of the tenant: same tenant CA, not created again.
    let summary = ok(
        dir,
        &gw(&[
            "onboard-agent",
            "--tenant",
            "acme",
            "--agent",
            "edge-8",
            "--partition",
            "site-b",
            "--out",
            "bundle-8",
            "--gateway-addr",
            &addr,
            "--server-name",
            "localhost",
        ]),
    );
    assert!(summary.contains("(existing)"), "{summary}");
    let second = pem_certs(&dir.join("bundle-8/certs/component.pem"));
    assert_eq!(second[1], chain[1], "the tenant CA is reused");
    assert_eq!(subject_cn(&second[0]).1, ca_cn);
}

/// `gateway --config gateway.json onboard-agent …` arguments.
fn onboard_args(tenant: &str, agent: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut args = gw(&[
        "onboard-agent",
        "--tenant",
        tenant,
        "--agent",
        agent,
        "--partition",
        "default",
        "--out",
        out,
    ]);
    args.extend_from_slice(extra);
    args.into_iter().map(str::to_owned).collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn onboarding_refusals_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // No onboarding CA key configured, gateway listening on a wildcard.
    setup(dir, json!({}));
    let config = dir.join("gateway.json");
    let edit = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(from), "{text}");
        std::fs::write(&config, text.replace(from, to)).unwrap();
    };
    edit("127.0.0.1:0", "0.0.0.0:50052");
    let refused = |tenant: &str, agent: &str, extra: &[&str]| {
        fails(dir, &strs(&onboard_args(tenant, agent, "b", extra)))
    };

    let err = refused("acme", "edge-1", &[]);
    assert!(err.contains("tenant add acme"), "{err}");
    ok(dir, &gw(&["tenant", "add", "acme"]));
    let err = refused("platform", "edge-1", &["--gateway-addr", "gw:1"]);
    assert!(err.contains("platform tenant"), "{err}");
    let err = refused("acme", "edge-1", &[]);
    assert!(
        err.contains("0.0.0.0:50052") && err.contains("--gateway-addr"),
        "{err}"
    );
    let err = refused("acme", "edge-1", &["--gateway-addr", "gw:1"]);
    assert!(err.contains("`onboarding.ca_key_file`"), "{err}");
    let err = refused("acme", "edge.1", &["--gateway-addr", "gw:1"]);
    assert!(err.contains("agent id \"edge.1\""), "{err}");
    assert!(!dir.join("b").exists(), "nothing written on refusal");

    // With the CA key: a non-empty folder is refused unless --force.
    edit(
        "\"onboarding\":{}",
        "\"onboarding\":{\"ca_key_file\":\"certs/ca-key.pem\",\"gateway_addr\":\"gw.example.com:50052\"}",
    );
    std::fs::create_dir(dir.join("b")).unwrap();
    std::fs::write(dir.join("b/notes.txt"), "keep").unwrap();
    let err = refused("acme", "edge-1", &[]);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    let summary = ok(
        dir,
        &strs(&onboard_args("acme", "edge-1", "b", &["--force"])),
    );
    assert!(
        summary.contains("gw.example.com:50052 (server name gw.example.com)")
            && summary.contains("warning: the gateway's certificate"),
        "configured address used; the dev certificate does not name it:\n{summary}"
    );
    assert!(dir.join("b/agent.json").exists() && dir.join("b/notes.txt").exists());
}
