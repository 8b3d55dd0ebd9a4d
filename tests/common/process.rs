//! The real binary as a child process: killed when the test ends, its stdout
//! read line by line, and waits for a line with a deadline (the deadline only
//! turns a hang into a failure; tests synchronise on the lines).

use std::io::{BufRead, BufReader};
use std::process::Child;
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
