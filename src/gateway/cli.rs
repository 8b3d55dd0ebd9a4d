//! `serviceradar-agent gateway --config <file>`: run until SIGINT/SIGTERM and
//! report on stdout in a line format scripts can wait for.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tokio::sync::broadcast::error::RecvError;

use super::{start, GatewayConfig, GatewayEvent};

/// Starts the gateway from a config file. Prints exactly one
/// `gateway listening on <addr>` line once ready, then
/// `run complete agent=<id> run=<run_id> devices=<n>` per completed run.
pub async fn run_from_file(path: &Path) -> anyhow::Result<()> {
    let config = GatewayConfig::load(path)?;
    let handle = start(config)
        .await
        .with_context(|| format!("starting gateway from {}", path.display()))?;
    let mut events = handle.subscribe();
    print_line(&format!("gateway listening on {}", handle.local_addr()))?;

    let stop = crate::agent::wait_for_termination();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = events.recv() => match event {
                Ok(GatewayEvent::RunComplete { agent_id, run_id, devices, .. }) => {
                    print_line(&format!("run complete agent={agent_id} run={run_id} devices={devices}"))?;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event printer fell behind; some lines were skipped");
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
    tracing::info!("gateway shutting down");
    handle.shutdown().await;
    tracing::info!("gateway stopped");
    Ok(())
}

fn print_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}
