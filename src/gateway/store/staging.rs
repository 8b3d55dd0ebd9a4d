//! Run staging and the `devices` table (gateway.md §4): chunks of open
//! streams are tagged with the stream id and become permanent only when the
//! stream is accepted (`commit_blocking`), which also completes runs.

use serde_json::{Map, Value};

use super::canonical::SqlIndex;
use super::db::{DbError, Dialect, Row, Tx};
use super::{Store, StoreError};
use crate::clock::unix_secs;
use crate::gateway::dire::reconcile::{self, Outcome, Scope};
use crate::gateway::dire::{identifiers_of, Sighting};
use crate::gateway::ingest::{ChunkPart, StagedDevice};

/// One row of `devices`.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceRow {
    pub tenant: String,
    pub partition: String,
    pub source: String,
    pub device_key: String,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub hostname: Option<String>,
    pub metadata: Value,
    pub agent_id: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub last_run_id: String,
}

/// One completed run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRow {
    pub agent_id: String,
    pub run_id: String,
    pub tenant: String,
    pub total_chunks: u32,
    pub total_devices: u64,
    /// Updates applied to `devices`.
    pub devices: u64,
    pub rejected: u64,
    pub completed_at: i64,
}

/// Which agent a stream's chunks belong to.
#[derive(Clone, Debug)]
pub(crate) struct StreamOwner {
    pub agent_id: String,
    pub tenant: String,
    pub stream_id: i64,
}

/// What staging one part did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Staged {
    New,
    /// Same (agent, run, chunk) already staged, or its run already complete.
    Duplicate,
    /// `total_chunks` disagrees with chunks already staged for the run.
    Inconsistent,
}

/// A run finished by a commit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CompletedRun {
    pub run_id: String,
    pub devices: u64,
    pub rejected: u64,
    /// The integration source the run belongs to, when its chunks named one.
    pub sync_service_id: Option<String>,
    /// What DIRE made of the run's updates.
    pub reconciled: Outcome,
}

impl Store {
    pub async fn device_count(&self) -> Result<u64, StoreError> {
        self.call(|tx| tx.query_value::<i64>("SELECT COUNT(*) FROM devices", &[]))
            .await
            .map(|n| n as u64)
    }

    /// All devices, ordered by (tenant, partition, source, device_key).
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.call(|tx| {
            tx.query(
                &format!("{DEVICE_COLUMNS} ORDER BY tenant, partition, source, device_key"),
                &[],
                device_row,
            )
        })
        .await
    }

    /// One page of a tenant's devices, ordered by (partition, source, key).
    pub async fn devices_of_tenant(
        &self,
        tenant: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<DeviceRow>, StoreError> {
        let tenant = tenant.to_owned();
        self.call(move |tx| {
            tx.query(
                &format!(
                    "{DEVICE_COLUMNS} WHERE tenant = $1 ORDER BY partition, source, device_key
                     LIMIT $2 OFFSET $3"
                ),
                &[&tenant, &(limit as i64), &(offset as i64)],
                device_row,
            )
        })
        .await
    }

    /// Completed runs, oldest first.
    pub async fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.call(|tx| {
            // Runs completed in the same second come in the order they were
            // written: SQLite's rowid, PostgreSQL's identity column.
            let insertion = match tx.dialect() {
                Dialect::Sqlite => "rowid",
                Dialect::Postgres => "seq",
            };
            tx.query(
                &format!(
                    "SELECT agent_id, run_id, tenant, total_chunks, total_devices, devices, rejected,
                            completed_at
                     FROM runs ORDER BY completed_at, {insertion}"
                ),
                &[],
                |r| {
                    Ok(RunRow {
                        agent_id: r.get(0)?,
                        run_id: r.get(1)?,
                        tenant: r.get(2)?,
                        total_chunks: r.get::<i64>(3)? as u32,
                        total_devices: r.get::<i64>(4)? as u64,
                        devices: r.get::<i64>(5)? as u64,
                        rejected: r.get::<i64>(6)? as u64,
                        completed_at: r.get(7)?,
                    })
                },
            )
        })
        .await
    }

    /// Chunks of incomplete runs currently staged (committed streams only).
    pub async fn staged_chunk_count(&self) -> Result<u64, StoreError> {
        self.call(|tx| {
            tx.query_value::<i64>(
                "SELECT COUNT(*) FROM staged_chunks WHERE stream_id IS NULL",
                &[],
            )
        })
        .await
        .map(|n| n as u64)
    }

    /// Stages the parts of one message for an open stream (blocking).
    pub(crate) fn stage_blocking(
        &self,
        owner: &StreamOwner,
        parts: &[ChunkPart],
    ) -> Result<Vec<Staged>, StoreError> {
        self.with_tx(|tx| {
            parts
                .iter()
                .map(|part| stage_part(tx, owner, part))
                .collect()
        })
    }

    /// Accepts a stream: its chunks become permanent and every run in
    /// `touched_runs` that now has all its chunks is applied to `devices`, all
    /// in one transaction (blocking).
    pub(crate) fn commit_blocking(
        &self,
        owner: &StreamOwner,
        touched_runs: &[String],
    ) -> Result<Vec<CompletedRun>, StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE staged_chunks SET stream_id = NULL WHERE stream_id = $1",
                &[&owner.stream_id],
            )?;
            let mut completed = Vec::new();
            for run_id in touched_runs {
                if let Some(run) = complete_run(tx, owner, run_id)? {
                    completed.push(run);
                }
            }
            Ok(completed)
        })
    }

    /// Drops the chunks of a rejected or abandoned stream (blocking).
    pub(crate) fn discard_blocking(&self, stream_id: i64) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "DELETE FROM staged_chunks WHERE stream_id = $1",
                &[&stream_id],
            )?;
            Ok(())
        })
    }
}

fn stage_part(
    tx: &mut Tx<'_>,
    owner: &StreamOwner,
    part: &ChunkPart,
) -> Result<Staged, StoreError> {
    let done = tx.query_value::<bool>(
        "SELECT EXISTS (SELECT 1 FROM runs WHERE tenant = $1 AND agent_id = $2 AND run_id = $3)",
        &[&owner.tenant, &owner.agent_id, &part.run_id],
    )?;
    if done {
        return Ok(Staged::Duplicate);
    }
    let known_total: Option<i64> = tx.query_opt(
        "SELECT total_chunks FROM staged_chunks
         WHERE tenant = $1 AND agent_id = $2 AND run_id = $3 LIMIT 1",
        &[&owner.tenant, &owner.agent_id, &part.run_id],
        |r| r.get(0),
    )?;
    if known_total.is_some_and(|t| t != i64::from(part.total_chunks)) {
        return Ok(Staged::Inconsistent);
    }
    let data = serde_json::to_vec(&part.devices).map_err(|e| StoreError::Corrupt {
        location: String::new(),
        reason: format!("staging run {}: {e}", part.run_id),
    })?;
    let inserted = tx.execute(
        "INSERT INTO staged_chunks
           (agent_id, run_id, chunk_index, total_chunks, total_devices, tenant, stream_id,
            devices, rejected, data, received_at, sync_service_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (tenant, agent_id, run_id, chunk_index) DO NOTHING",
        &[
            &owner.agent_id,
            &part.run_id,
            &i64::from(part.chunk_index),
            &i64::from(part.total_chunks),
            &(part.total_devices as i64),
            &owner.tenant,
            &owner.stream_id,
            &(part.accepted as i64),
            &(part.rejected as i64),
            &data,
            &unix_secs(),
            &part.sync_service_id,
        ],
    )?;
    Ok(if inserted == 1 {
        Staged::New
    } else {
        Staged::Duplicate
    })
}

/// Completes `run_id` if all its chunks are staged: applies them to
/// `devices`, reconciles them (DIRE), and records the run.
fn complete_run(
    tx: &mut Tx<'_>,
    owner: &StreamOwner,
    run_id: &str,
) -> Result<Option<CompletedRun>, StoreError> {
    if tx.dialect() == Dialect::Postgres {
        // Two gateways sharing the database may complete the same run (an
        // agent that reconnected elsewhere resends it): one does, the other
        // then finds it in `runs`.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!(
                "run\n{}\n{}\n{run_id}",
                owner.tenant, owner.agent_id
            )],
        )?;
        let done = tx.query_value::<bool>(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE tenant = $1 AND agent_id = $2 AND run_id = $3)",
            &[&owner.tenant, &owner.agent_id, &run_id],
        )?;
        if done {
            return Ok(None);
        }
    }
    type Summary = (i64, Option<i64>, Option<i64>, Option<String>);
    let (have, total, total_devices, sync_service_id): Summary = tx
        .query_opt(
            "SELECT COUNT(*), MAX(total_chunks), MAX(total_devices), MAX(sync_service_id)
             FROM staged_chunks
             WHERE tenant = $1 AND agent_id = $2 AND run_id = $3 AND stream_id IS NULL",
            &[&owner.tenant, &owner.agent_id, &run_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?
        .unwrap_or((0, None, None, None));
    let Some(total) = total else { return Ok(None) };
    if have < total {
        return Ok(None);
    }
    let now = unix_secs();
    let chunks = tx.query(
        "SELECT data, rejected FROM staged_chunks
         WHERE tenant = $1 AND agent_id = $2 AND run_id = $3 ORDER BY chunk_index",
        &[&owner.tenant, &owner.agent_id, &run_id],
        |r| Ok((r.get::<Vec<u8>>(0)?, r.get::<i64>(1)?)),
    )?;
    let mut rejected = 0u64;
    let mut staged = Vec::new();
    for (data, chunk_rejected) in chunks {
        rejected += chunk_rejected as u64;
        let devices: Vec<StagedDevice> =
            serde_json::from_slice(&data).map_err(|e| StoreError::Corrupt {
                location: String::new(),
                reason: format!("staged chunk of run {run_id}: {e}"),
            })?;
        staged.extend(devices);
    }
    let devices = staged.len() as u64;
    write_devices(tx, owner, run_id, &staged, now)?;
    let sightings = staged
        .into_iter()
        .map(|d| (d.partition.clone(), sighting(d)))
        .collect();
    // DIRE (gateway.md §5), in this transaction: nothing partial is applied.
    let reconciled = reconcile_run(tx, &owner.tenant, run_id, sightings, now)?;
    tx.execute(
        "DELETE FROM staged_chunks WHERE tenant = $1 AND agent_id = $2 AND run_id = $3",
        &[&owner.tenant, &owner.agent_id, &run_id],
    )?;
    tx.execute(
        "INSERT INTO runs (agent_id, run_id, tenant, total_chunks, total_devices, devices, rejected,
                           completed_at, sync_service_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &owner.agent_id,
            &run_id,
            &owner.tenant,
            &total,
            &total_devices.unwrap_or(0),
            &(devices as i64),
            &(rejected as i64),
            &now,
            &sync_service_id,
        ],
    )?;
    Ok(Some(CompletedRun {
        run_id: run_id.to_owned(),
        devices,
        rejected,
        sync_service_id,
        reconciled,
    }))
}

/// The per-source `devices` rows of a run (the latest update of each
/// (partition, source, key) wins).
fn write_devices(
    tx: &mut Tx<'_>,
    owner: &StreamOwner,
    run_id: &str,
    staged: &[StagedDevice],
    now: i64,
) -> Result<(), DbError> {
    const UPSERT: &str = "
        ON CONFLICT (tenant, partition, source, device_key) DO UPDATE SET
            ip = excluded.ip, mac = excluded.mac, hostname = excluded.hostname,
            metadata = excluded.metadata, agent_id = excluded.agent_id,
            last_seen = excluded.last_seen, last_run_id = excluded.last_run_id";
    if let Some(pg) = tx.postgres() {
        return pg_write_devices(pg, owner, run_id, staged, now, UPSERT);
    }
    for d in staged {
        tx.execute(
            &format!(
                "INSERT INTO devices (tenant, partition, source, device_key, ip, mac, hostname,
                                      metadata, agent_id, first_seen, last_seen, last_run_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11) {UPSERT}"
            ),
            &[
                &owner.tenant,
                &d.partition,
                &d.source,
                &d.device_key,
                &d.ip,
                &d.mac,
                &d.hostname,
                &metadata_json(&d.metadata),
                &owner.agent_id,
                &now,
                &run_id,
            ],
        )?;
    }
    Ok(())
}

/// PostgreSQL: a round trip per device would bound ingestion by network
/// latency, so rows go in as arrays, a few thousand per statement.
fn pg_write_devices(
    tx: &mut postgres::Transaction<'_>,
    owner: &StreamOwner,
    run_id: &str,
    staged: &[StagedDevice],
    now: i64,
    upsert: &str,
) -> Result<(), DbError> {
    const ROWS_PER_STATEMENT: usize = 5_000;
    let statement = tx.prepare(&format!(
        "INSERT INTO devices (tenant, partition, source, device_key, ip, mac, hostname,
                              metadata, agent_id, first_seen, last_seen, last_run_id)
         SELECT $1, partition, source, device_key, ip, mac, hostname, metadata, $2, $3, $3, $4
         FROM UNNEST($5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[],
                     $11::TEXT[])
              AS u (partition, source, device_key, ip, mac, hostname, metadata) {upsert}"
    ))?;
    // One statement may not update a row twice: keep each key's last update.
    let mut latest: std::collections::HashMap<(&str, &str, &str), &StagedDevice> =
        std::collections::HashMap::with_capacity(staged.len());
    let mut order = Vec::with_capacity(staged.len());
    for d in staged {
        let key = (
            d.partition.as_str(),
            d.source.as_str(),
            d.device_key.as_str(),
        );
        if latest.insert(key, d).is_none() {
            order.push(key);
        }
    }
    for keys in order.chunks(ROWS_PER_STATEMENT) {
        let rows: Vec<&StagedDevice> = keys.iter().filter_map(|k| latest.get(k).copied()).collect();
        let column = |f: fn(&StagedDevice) -> Option<String>| -> Vec<Option<String>> {
            rows.iter().map(|d| f(d)).collect()
        };
        tx.execute(
            &statement,
            &[
                &owner.tenant,
                &owner.agent_id,
                &now,
                &run_id,
                &column(|d| Some(d.partition.clone())),
                &column(|d| Some(d.source.clone())),
                &column(|d| Some(d.device_key.clone())),
                &column(|d| d.ip.clone()),
                &column(|d| d.mac.clone()),
                &column(|d| d.hostname.clone()),
                &column(|d| Some(metadata_json(&d.metadata))),
            ],
        )?;
    }
    Ok(())
}

const DEVICE_COLUMNS: &str = "SELECT tenant, partition, source, device_key, ip, mac, hostname,
    metadata, agent_id, first_seen, last_seen, last_run_id FROM devices";

fn device_row(r: &Row<'_, '_>) -> Result<DeviceRow, DbError> {
    let metadata: String = r.get(7)?;
    Ok(DeviceRow {
        tenant: r.get(0)?,
        partition: r.get(1)?,
        source: r.get(2)?,
        device_key: r.get(3)?,
        ip: r.get(4)?,
        mac: r.get(5)?,
        hostname: r.get(6)?,
        metadata: serde_json::from_str(&metadata).unwrap_or(Value::Null),
        agent_id: r.get(8)?,
        first_seen: r.get(9)?,
        last_seen: r.get(10)?,
        last_run_id: r.get(11)?,
    })
}

/// Reconciles a whole run's sightings in a fixed order (so the outcome does
/// not depend on the order its chunks came in) inside `tx`: row by row on
/// SQLite (an embedded B-tree answers a lookup in microseconds), in
/// prefetched batches on PostgreSQL (where each lookup is a round trip).
pub(super) fn reconcile_run(
    tx: &mut Tx<'_>,
    tenant: &str,
    run_id: &str,
    sightings: Vec<(String, Sighting)>,
    now: i64,
) -> Result<Outcome, DbError> {
    if let Some(pg) = tx.postgres() {
        return super::pg_dire::reconcile_run(
            pg,
            tenant,
            run_id,
            sightings,
            now,
            super::pg_dire::BATCH_SIZE,
        );
    }
    reconcile_row_by_row(tx, tenant, run_id, sightings, now)
}

/// Row by row through [`SqlIndex`], on either backend: SQLite's way, and
/// the reference PostgreSQL's batches are tested against.
pub(super) fn reconcile_row_by_row(
    tx: &mut Tx<'_>,
    tenant: &str,
    run_id: &str,
    mut sightings: Vec<(String, Sighting)>,
    now: i64,
) -> Result<Outcome, DbError> {
    let mut outcome = Outcome::default();
    reconcile::order(&mut sightings);
    let mut index = SqlIndex { tx };
    for (partition, sighting) in sightings {
        let scope = Scope {
            tenant,
            partition: &partition,
        };
        reconcile::reconcile(&mut index, scope, sighting, run_id, now, &mut outcome)?;
    }
    Ok(outcome)
}

impl Store {
    /// Reconciles sightings as one run of `tenant` (what a completed run
    /// does after staging; benchmarks and tests drive DIRE through this).
    /// `sightings` pairs each with its partition.
    pub async fn reconcile_run(
        &self,
        tenant: &str,
        run_id: &str,
        sightings: Vec<(String, Sighting)>,
        now: i64,
    ) -> Result<Outcome, StoreError> {
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        self.call(move |tx| reconcile_run(tx, &tenant, &run_id, sightings, now))
            .await
    }
}

/// What a staged update tells DIRE.
fn sighting(d: StagedDevice) -> Sighting {
    Sighting {
        identifiers: identifiers_of(&d.metadata, d.mac.as_deref()),
        ip: d.ip,
        mac: d.mac,
        hostname: d.hostname,
        source: d.source,
        metadata: d.metadata,
    }
}

fn metadata_json(metadata: &Map<String, Value>) -> String {
    // Serialising a Map of Values cannot fail (string keys only).
    serde_json::to_string(metadata).unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use super::super::testing;
    use super::*;
    use serde_json::json;

    fn part(run: &str, index: u32, total: u32, ips: &[&str]) -> ChunkPart {
        ChunkPart {
            run_id: run.into(),
            chunk_index: index,
            total_chunks: total,
            total_devices: 0,
            sync_service_id: Some("src-1".into()),
            accepted: ips.len() as u64,
            rejected: 1,
            devices: ips
                .iter()
                .map(|ip| StagedDevice {
                    partition: "p".into(),
                    source: "faker".into(),
                    device_key: ip.to_string(),
                    ip: Some(ip.to_string()),
                    mac: None,
                    hostname: Some(format!("h-{ip}")),
                    metadata: json!({"k":"v"}).as_object().cloned().unwrap(),
                })
                .collect(),
        }
    }

    fn owner(stream_id: i64) -> StreamOwner {
        StreamOwner {
            agent_id: "a1".into(),
            tenant: "default".into(),
            stream_id,
        }
    }

    /// The blocking calls as the sink makes them: on a blocking thread.
    async fn stage(store: &Store, owner: StreamOwner, parts: Vec<ChunkPart>) -> Vec<Staged> {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.stage_blocking(&owner, &parts))
            .await
            .unwrap()
            .unwrap()
    }

    async fn commit(store: &Store, owner: StreamOwner, run: &str) -> Vec<CompletedRun> {
        let (store, runs) = (store.clone(), vec![run.to_owned()]);
        tokio::task::spawn_blocking(move || store.commit_blocking(&owner, &runs))
            .await
            .unwrap()
            .unwrap()
    }

    async fn discard(store: &Store, stream_id: i64) {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.discard_blocking(stream_id))
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn run_completes_only_with_all_chunks_and_rejected_streams_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for location in testing::fresh_locations(dir.path(), "staging").await {
            let store = testing::open(&location).await;
            assert_eq!(
                stage(&store, owner(1), vec![part("r", 0, 3, &["10.0.0.1"])]).await,
                vec![Staged::New]
            );
            assert!(commit(&store, owner(1), "r").await.is_empty());

            // A stream that is then rejected.
            stage(&store, owner(2), vec![part("r", 1, 3, &["10.0.0.2"])]).await;
            discard(&store, 2).await;
            assert_eq!(store.staged_chunk_count().await.unwrap(), 1, "{location}");

            // Retry of chunk 0 is a duplicate; a different total is inconsistent.
            assert_eq!(
                stage(
                    &store,
                    owner(3),
                    vec![part("r", 0, 3, &["10.9.9.9"]), part("r", 1, 4, &[])]
                )
                .await,
                vec![Staged::Duplicate, Staged::Inconsistent]
            );
            stage(
                &store,
                owner(3),
                vec![
                    part("r", 1, 3, &["10.0.0.2"]),
                    part("r", 2, 3, &["10.0.0.1"]),
                ],
            )
            .await;
            assert_eq!(
                commit(&store, owner(3), "r").await,
                vec![CompletedRun {
                    run_id: "r".into(),
                    devices: 3,
                    rejected: 3,
                    sync_service_id: Some("src-1".into()),
                    reconciled: Outcome {
                        created: 2,
                        updated: 1,
                        merged: 0
                    },
                }],
                "{location}"
            );
            assert_eq!(store.device_count().await.unwrap(), 2);
            assert_eq!(store.staged_chunk_count().await.unwrap(), 0);
            let runs = store.runs().await.unwrap();
            assert_eq!((runs.len(), runs[0].total_chunks), (1, 3));

            // Replaying a completed run changes nothing.
            assert_eq!(
                stage(&store, owner(4), vec![part("r", 0, 3, &["10.7.7.7"])]).await,
                vec![Staged::Duplicate]
            );
            assert!(commit(&store, owner(4), "r").await.is_empty());
            let devices = store.devices().await.unwrap();
            assert_eq!(devices.len(), 2, "{location}");
            assert_eq!(devices[0].metadata, json!({"k":"v"}));
            assert_eq!(devices[0].last_run_id, "r");
        }
    }

    #[tokio::test]
    async fn reopen_drops_uncommitted_chunks_and_keeps_schema() {
        let dir = tempfile::tempdir().unwrap();
        for location in testing::fresh_locations(dir.path(), "reopen").await {
            let store = testing::open(&location).await;
            stage(&store, owner(1), vec![part("r", 0, 2, &["10.0.0.1"])]).await;
            stage(&store, owner(2), vec![part("r", 1, 2, &["10.0.0.2"])]).await;
            commit(&store, owner(1), "r").await;
            let uncommitted = "SELECT COUNT(*) FROM staged_chunks WHERE stream_id IS NOT NULL";
            if location.sqlite_path().is_none() {
                // A shared PostgreSQL: a young chunk may belong to a stream
                // another gateway is still receiving; only old ones go.
                store
                    .call(|tx| {
                        tx.execute(
                            "UPDATE staged_chunks SET received_at = received_at - 7200
                             WHERE stream_id = 2",
                            &[],
                        )
                    })
                    .await
                    .unwrap();
                stage(&store, owner(5), vec![part("q", 0, 2, &["10.0.0.3"])]).await;
            }
            drop(store);
            let store = testing::open(&location).await;
            assert_eq!(store.staged_chunk_count().await.unwrap(), 1, "{location}");
            let left: i64 = store
                .call(move |tx| tx.query_value(uncommitted, &[]))
                .await
                .unwrap();
            let expected = if location.sqlite_path().is_some() {
                0
            } else {
                1
            };
            assert_eq!(left, expected, "{location}");
        }
    }
}
