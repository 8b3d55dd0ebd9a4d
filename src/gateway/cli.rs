//! `serviceradar-agent gateway --config <file>`: run until SIGINT/SIGTERM and
//! report on stdout in a line format scripts can wait for.
//!
//! `serviceradar-agent gateway --config <file> <admin command>`: read the
//! gateway's database directly (SQLite in WAL mode allows it while the
//! gateway runs) and print the answer.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tokio::sync::broadcast::error::RecvError;

use super::store::Store;
use super::{start, GatewayConfig, GatewayEvent};

/// Administration commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Admin {
    /// Registered agents.
    #[command(subcommand)]
    Agent(AgentAdmin),
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum AgentAdmin {
    /// Every agent that has said Hello: tenant, partition, version, host,
    /// capabilities, first/last seen, online or offline.
    List,
}

/// Runs one administration command against the database named in the
/// gateway config.
pub async fn admin(config_path: &Path, command: Admin) -> anyhow::Result<()> {
    let config = GatewayConfig::load(config_path)?;
    let database = config.database.with_context(|| {
        format!(
            "{} has no database: nothing to administer (validate-only mode)",
            config_path.display()
        )
    })?;
    let store = {
        let path = database.clone();
        tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .context("opening the database")??
    };
    match command {
        Admin::Agent(AgentAdmin::List) => print_agents(&store.agents().await?),
    }
}

fn print_agents(agents: &[super::registry::AgentRecord]) -> anyhow::Result<()> {
    let now = crate::clock::unix_secs();
    let time = |secs: i64| {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
        humantime::format_rfc3339_seconds(at).to_string()
    };
    let row = |cols: [&str; 9]| {
        format!(
            "{:<16} {:<24} {:<12} {:<10} {:<20} {:<14} {:<21} {:<21} {}",
            cols[0], cols[1], cols[2], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8]
        )
    };
    let mut lines = vec![row([
        "TENANT",
        "AGENT",
        "PARTITION",
        "VERSION",
        "HOST",
        "CAPABILITIES",
        "FIRST SEEN",
        "LAST SEEN",
        "STATUS",
    ])];
    for a in agents {
        let (capabilities, first, last) = (
            a.capabilities.join(","),
            time(a.first_seen),
            time(a.last_seen),
        );
        lines.push(row([
            &a.tenant,
            &a.agent_id,
            &a.partition,
            &a.version,
            &a.hostname,
            &capabilities,
            &first,
            &last,
            if a.online(now) { "online" } else { "offline" },
        ]));
    }
    for line in lines {
        print_line(&line)?;
    }
    Ok(())
}

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
