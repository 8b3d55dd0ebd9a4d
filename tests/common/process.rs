//! The real binary as a child process: killed when the test ends, its stdout
//! read line by line, and waits for a line with a deadline (the deadline only
//! turns a hang into a failure; tests synchronise on the lines).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;

use super::DEADLINE;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_serviceradar-agent");

/// Kills the process when the test ends, however it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Streams a child's stdout lines to a channel.
pub fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line `pick` accepts, skipping others; panics after [`DEADLINE`].
pub fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pick: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if pick(&line) => return line,
            Ok(_) => continue,
            Err(e) => panic!("no line for {what} within {DEADLINE:?}: {e}"),
        }
    }
}

/// Runs the binary in `dir` to completion.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs a command that must fail; returns its `error: …` line.
pub fn fails(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{args:?}: no `error:` line in\n{stderr}"))
        .to_owned()
}

/// A gateway process started in `dir` with `args` (after `gateway`), once it
/// listens.
pub struct GatewayProcess {
    pub process: Running,
    /// Its stdout, from after the `gateway listening on` line.
    pub lines: mpsc::Receiver<String>,
    pub addr: String,
}

pub fn start_gateway(dir: &Path, args: &[&str]) -> GatewayProcess {
    let mut process = Running(
        Command::new(BIN)
            .arg("gateway")
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines(&mut process.0);
    let addr = wait_line(&lines, "gateway listening", |l| {
        l.starts_with("gateway listening on ")
    })
    .trim_start_matches("gateway listening on ")
    .trim()
    .to_owned();
    GatewayProcess {
        process,
        lines,
        addr,
    }
}
