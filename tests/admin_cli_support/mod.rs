//! The admin CLI as an operator runs it: the real binary, `gateway --config
//! gateway.json <command>`, against a gateway config with a database and a
//! credentials key file (the gateway itself never runs).
//!
//! A test crate using this module declares `mod backend_support;` too.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::json;
use serviceradar_agent::gateway::DatabaseLocation;

use crate::backend_support::{config_entry, Backend};

const BIN: &str = env!("CARGO_BIN_EXE_serviceradar-agent");

pub struct AdminCli {
    dir: tempfile::TempDir,
    database: DatabaseLocation,
}

impl AdminCli {
    /// On the SQLite file `gateway.db` in the CLI's directory.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = DatabaseLocation::Sqlite(dir.path().join("gateway.db"));
        Self::write_config(dir, database, ("database", json!("gateway.db")))
    }

    /// On a fresh database of `backend` (`database_url` for PostgreSQL).
    pub async fn on(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = backend.fresh_database(dir.path(), "gateway").await;
        let entry = config_entry(&database);
        Self::write_config(dir, database, entry)
    }

    fn write_config(
        dir: tempfile::TempDir,
        database: DatabaseLocation,
        (key, value): (&str, serde_json::Value),
    ) -> Self {
        // 64 hex characters: a 256-bit credentials key, owner-only.
        let key_file = dir.path().join("gateway.key");
        std::fs::write(&key_file, format!("{}\n", "0123456789abcdef".repeat(4))).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut config = json!({"listen": "127.0.0.1:0",
               "tls": {"cert_file": "gw.pem", "key_file": "gw-key.pem", "ca_file": "ca.pem"},
               "credentials_key_file": "gateway.key"});
        config[key] = value;
        std::fs::write(dir.path().join("gateway.json"), config.to_string()).unwrap();
        Self { dir, database }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database the CLI's config names.
    pub fn database(&self) -> &DatabaseLocation {
        &self.database
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

/// The stdout of a command that must have succeeded.
pub fn expect_success(args: &[&str], out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `error: …` line of a command that must have failed.
pub fn expect_failure(args: &[&str], out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{args:?}: no `error:` line in\n{stderr}"))
        .to_owned()
}
