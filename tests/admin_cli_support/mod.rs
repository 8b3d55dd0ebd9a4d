//! The admin CLI as an operator runs it: the real binary, `gateway --config
//! gateway.json <command>`, against a gateway config with a database and a
//! credentials key file (the gateway itself never runs).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_serviceradar-agent");

pub struct AdminCli {
    dir: tempfile::TempDir,
}

impl AdminCli {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // 64 hex characters: a 256-bit credentials key, owner-only.
        let key = dir.path().join("gateway.key");
        std::fs::write(&key, format!("{}\n", "0123456789abcdef".repeat(4))).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        std::fs::write(
            dir.path().join("gateway.json"),
            json!({"listen": "127.0.0.1:0",
                   "tls": {"cert_file": "gw.pem", "key_file": "gw-key.pem", "ca_file": "ca.pem"},
                   "database": "gateway.db", "credentials_key_file": "gateway.key"})
            .to_string(),
        )
        .unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs one admin command with `stdin` as its input.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(BIN)
            .args(["gateway", "--config", "gateway.json"])
            .args(args)
            .current_dir(self.path())
            .env_remove("RUST_LOG")
            .env_remove(serviceradar_agent::gateway::secrets::KEY_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }
}
