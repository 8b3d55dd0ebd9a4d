//! `serviceradar-agent bench-dire`: DIRE (gateway.md §5) on SQLite or, with
//! `--postgres`, on PostgreSQL, without the gateway's network: Faker devices as the agent maps them become
//! sightings, and one run of each size is reconciled into a fresh database —
//! first sync, then a re-sync after `churn_percent` of the devices changed IP.
//!
//! Generating the sightings is not timed; reconciliation is, from the start
//! of the run's transaction to its commit (what a completed run costs the
//! gateway after staging).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;

use crate::device::UpdateContext;
use crate::gateway::dire::Sighting;
use crate::gateway::{DatabaseLocation, PostgresUrl};
use crate::sources::armis::mapping::{map_device_owned, Mapped};
use crate::sources::faker::{FakerGenerator, FakerSettings};

#[derive(Args, Debug, Clone)]
pub struct DireBenchArgs {
    /// Run sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "50000,1000000")]
    pub devices: Vec<u64>,
    /// Share of devices whose IP changes before the re-sync.
    #[arg(long, default_value_t = 5.0)]
    pub churn_percent: f64,
    /// Working directory (one database per size).
    #[arg(long, default_value = "bench-state")]
    pub state_dir: PathBuf,
    /// On PostgreSQL: a fresh database per size on the server named by
    /// `SERVICERADAR_TEST_PG_URL`, else on a throwaway local cluster started
    /// from Debian's `postgresql` binaries (installed, not running).
    #[arg(long)]
    pub postgres: bool,
}

/// Timings of one size.
#[derive(Debug)]
pub struct DireMeasurement {
    pub devices: u64,
    pub first_sync_seconds: f64,
    pub resync_seconds: f64,
    pub canonical_devices: u64,
}

/// The current run of `generator` as the gateway's DIRE sees it: Faker
/// devices mapped as the agent maps them, in partition `default` (also what
/// the DIRE tests reconcile).
pub fn faker_sightings(generator: &FakerGenerator) -> Vec<(String, Sighting)> {
    let ctx = UpdateContext {
        agent_id: "bench-agent".into(),
        gateway_id: "bench-gateway".into(),
        partition: "default".into(),
        source: "faker",
        timestamp: "2026-01-01T00:00:00.000Z".into(),
    };
    generator
        .devices()
        .filter_map(
            |device| match map_device_owned(device, &ctx, "faker", None, &[]) {
                Mapped::Update(update) => {
                    Some(("default".to_owned(), Sighting::from_update(&update)))
                }
                _ => None,
            },
        )
        .collect()
}

async fn measure(args: &DireBenchArgs, devices: u64) -> anyhow::Result<DireMeasurement> {
    let location = if args.postgres {
        let url = tokio::task::spawn_blocking(move || {
            crate::gateway::store::throwaway::fresh_database(&format!("bench_dire_{devices}"))
        })
        .await??;
        DatabaseLocation::Postgres(PostgresUrl::parse(&url).map_err(anyhow::Error::msg)?)
    } else {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        let path = args.state_dir.join(format!("dire-{devices}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(name));
        }
        DatabaseLocation::Sqlite(path)
    };
    let store = crate::gateway::open_store(&location).await?;
    let mut generator = FakerGenerator::new(FakerSettings {
        total_devices: devices,
        seed: 1,
        churn_percent: args.churn_percent,
    });
    generator.next_run();
    let first = faker_sightings(&generator);
    let started = Instant::now();
    store.reconcile_run("bench", "run-1", first, 1).await?;
    let first_sync_seconds = started.elapsed().as_secs_f64();

    generator.next_run();
    let second = faker_sightings(&generator);
    let started = Instant::now();
    store.reconcile_run("bench", "run-2", second, 2).await?;
    let resync_seconds = started.elapsed().as_secs_f64();
    let canonical_devices = store.canonical_device_count().await?;
    if canonical_devices != devices {
        anyhow::bail!("{devices} devices became {canonical_devices} canonical devices");
    }
    Ok(DireMeasurement {
        devices,
        first_sync_seconds,
        resync_seconds,
        canonical_devices,
    })
}

/// Runs the benchmark and prints one line per size.
pub fn run(args: DireBenchArgs) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "DIRE on {}, {}% churn before the re-sync ({} cores)",
        if args.postgres {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        args.churn_percent,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>10}  {:>14} {:>12}  {:>14} {:>12}",
        "devices", "first sync s", "devices/s", "re-sync s", "devices/s"
    );
    for &devices in &args.devices {
        let m = runtime.block_on(measure(&args, devices))?;
        println!(
            "{:>10}  {:>14.3} {:>12.0}  {:>14.3} {:>12.0}",
            m.devices,
            m.first_sync_seconds,
            m.devices as f64 / m.first_sync_seconds,
            m.resync_seconds,
            m.devices as f64 / m.resync_seconds,
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_small_run_reconciles_to_one_device_each() {
        let dir = tempfile::tempdir().unwrap();
        let args = DireBenchArgs {
            devices: vec![500],
            churn_percent: 5.0,
            state_dir: dir.path().to_owned(),
            postgres: false,
        };
        let m = measure(&args, 500).await.unwrap();
        assert_eq!(m.canonical_devices, 500);
        assert!(m.first_sync_seconds > 0.0 && m.resync_seconds > 0.0);
    }
}
