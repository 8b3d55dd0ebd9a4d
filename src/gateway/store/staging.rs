//! Run staging and the `devices` table (gateway.md §4): chunks of open
//! streams are tagged with the stream id and become permanent only when the
//! stream is accepted (`commit_blocking`), which also completes runs.

use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::{Map, Value};

use super::canonical::SqliteIndex;
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
        self.call(|c| c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }

    /// All devices, ordered by (tenant, partition, source, device_key).
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!(
                "{DEVICE_COLUMNS} ORDER BY tenant, partition, source, device_key"
            ))?;
            let rows = stmt.query_map([], device_row)?;
            rows.collect()
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
        self.call(move |c| {
            let mut stmt = c.prepare(&format!(
                "{DEVICE_COLUMNS} WHERE tenant = ?1 ORDER BY partition, source, device_key
                 LIMIT ?2 OFFSET ?3"
            ))?;
            let rows = stmt.query_map(params![tenant, limit as i64, offset as i64], device_row)?;
            rows.collect()
        })
        .await
    }

    /// Completed runs, oldest first.
    pub async fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(
                "SELECT agent_id, run_id, tenant, total_chunks, total_devices, devices, rejected, completed_at
                 FROM runs ORDER BY completed_at, rowid",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(RunRow {
                    agent_id: r.get(0)?,
                    run_id: r.get(1)?,
                    tenant: r.get(2)?,
                    total_chunks: r.get::<_, i64>(3)? as u32,
                    total_devices: r.get::<_, i64>(4)? as u64,
                    devices: r.get::<_, i64>(5)? as u64,
                    rejected: r.get::<_, i64>(6)? as u64,
                    completed_at: r.get(7)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Chunks of incomplete runs currently staged (committed streams only).
    pub async fn staged_chunk_count(&self) -> Result<u64, StoreError> {
        self.call(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM staged_chunks WHERE stream_id IS NULL",
                [],
                |r| r.get::<_, i64>(0),
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
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let mut outcome = Vec::with_capacity(parts.len());
        for part in parts {
            outcome.push(self.stage_part(&tx, owner, part)?);
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(outcome)
    }

    fn stage_part(
        &self,
        tx: &Transaction<'_>,
        owner: &StreamOwner,
        part: &ChunkPart,
    ) -> Result<Staged, StoreError> {
        let sql = |e| self.sql(e);
        let done: bool = tx
            .query_row(
                "SELECT 1 FROM runs WHERE tenant = ?1 AND agent_id = ?2 AND run_id = ?3",
                params![owner.tenant, owner.agent_id, part.run_id],
                |_| Ok(true),
            )
            .optional()
            .map_err(sql)?
            .unwrap_or(false);
        if done {
            return Ok(Staged::Duplicate);
        }
        let known_total: Option<i64> = tx
            .query_row(
                "SELECT total_chunks FROM staged_chunks
                 WHERE tenant = ?1 AND agent_id = ?2 AND run_id = ?3 LIMIT 1",
                params![owner.tenant, owner.agent_id, part.run_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        if known_total.is_some_and(|t| t != i64::from(part.total_chunks)) {
            return Ok(Staged::Inconsistent);
        }
        let data = serde_json::to_vec(&part.devices).map_err(|e| StoreError::Corrupt {
            path: self.path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let inserted = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO staged_chunks
                   (agent_id, run_id, chunk_index, total_chunks, total_devices, tenant, stream_id,
                    devices, rejected, data, received_at, sync_service_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    owner.agent_id,
                    part.run_id,
                    part.chunk_index,
                    part.total_chunks,
                    part.total_devices as i64,
                    owner.tenant,
                    owner.stream_id,
                    part.accepted as i64,
                    part.rejected as i64,
                    data,
                    unix_secs(),
                    part.sync_service_id,
                ])
            })
            .map_err(sql)?;
        Ok(if inserted == 1 {
            Staged::New
        } else {
            Staged::Duplicate
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
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        tx.execute(
            "UPDATE staged_chunks SET stream_id = NULL WHERE stream_id = ?1",
            params![owner.stream_id],
        )
        .map_err(|e| self.sql(e))?;
        let mut completed = Vec::new();
        for run_id in touched_runs {
            if let Some(run) = self.complete_run(&tx, owner, run_id)? {
                completed.push(run);
            }
        }
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(completed)
    }

    /// Drops the chunks of a rejected or abandoned stream (blocking).
    pub(crate) fn discard_blocking(&self, stream_id: i64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM staged_chunks WHERE stream_id = ?1",
                params![stream_id],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    fn complete_run(
        &self,
        tx: &Transaction<'_>,
        owner: &StreamOwner,
        run_id: &str,
    ) -> Result<Option<CompletedRun>, StoreError> {
        let sql = |e| self.sql(e);
        type Summary = (i64, Option<i64>, Option<i64>, Option<String>);
        let (have, total, total_devices, sync_service_id): Summary = tx
            .query_row(
                "SELECT COUNT(*), MAX(total_chunks), MAX(total_devices), MAX(sync_service_id)
                 FROM staged_chunks
                 WHERE tenant = ?1 AND agent_id = ?2 AND run_id = ?3 AND stream_id IS NULL",
                params![owner.tenant, owner.agent_id, run_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(sql)?;
        let Some(total) = total else { return Ok(None) };
        if have < total {
            return Ok(None);
        }
        let now = unix_secs();
        let (mut devices, mut rejected) = (0u64, 0u64);
        let mut sightings = Vec::new();
        {
            let mut chunks = tx
                .prepare(
                    "SELECT data, rejected FROM staged_chunks
                     WHERE tenant = ?1 AND agent_id = ?2 AND run_id = ?3 ORDER BY chunk_index",
                )
                .map_err(sql)?;
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO devices (tenant, partition, source, device_key, ip, mac, hostname, metadata,
                                          agent_id, first_seen, last_seen, last_run_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10, ?11)
                     ON CONFLICT (tenant, partition, source, device_key) DO UPDATE SET
                        ip = excluded.ip, mac = excluded.mac, hostname = excluded.hostname,
                        metadata = excluded.metadata, agent_id = excluded.agent_id,
                        last_seen = excluded.last_seen, last_run_id = excluded.last_run_id",
                )
                .map_err(sql)?;
            let mut rows = chunks
                .query(params![owner.tenant, owner.agent_id, run_id])
                .map_err(sql)?;
            while let Some(row) = rows.next().map_err(sql)? {
                let data: Vec<u8> = row.get(0).map_err(sql)?;
                rejected += row.get::<_, i64>(1).map_err(sql)? as u64;
                let staged: Vec<StagedDevice> =
                    serde_json::from_slice(&data).map_err(|e| StoreError::Corrupt {
                        path: self.path.to_path_buf(),
                        reason: format!("run {run_id}: {e}"),
                    })?;
                for d in staged {
                    upsert
                        .execute(params![
                            owner.tenant,
                            d.partition,
                            d.source,
                            d.device_key,
                            d.ip,
                            d.mac,
                            d.hostname,
                            metadata_json(&d.metadata),
                            owner.agent_id,
                            now,
                            run_id,
                        ])
                        .map_err(sql)?;
                    devices += 1;
                    sightings.push((d.partition.clone(), sighting(d)));
                }
            }
        }
        // DIRE (gateway.md §5), in this transaction: nothing partial is
        // applied.
        let reconciled = reconcile_run(tx, &owner.tenant, run_id, sightings, now).map_err(sql)?;
        tx.execute(
            "DELETE FROM staged_chunks WHERE tenant = ?1 AND agent_id = ?2 AND run_id = ?3",
            params![owner.tenant, owner.agent_id, run_id],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT INTO runs (agent_id, run_id, tenant, total_chunks, total_devices, devices, rejected,
                               completed_at, sync_service_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                owner.agent_id,
                run_id,
                owner.tenant,
                total,
                total_devices.unwrap_or(0),
                devices as i64,
                rejected as i64,
                now,
                sync_service_id,
            ],
        )
        .map_err(sql)?;
        Ok(Some(CompletedRun {
            run_id: run_id.to_owned(),
            devices,
            rejected,
            sync_service_id,
            reconciled,
        }))
    }
}

const DEVICE_COLUMNS: &str = "SELECT tenant, partition, source, device_key, ip, mac, hostname,
    metadata, agent_id, first_seen, last_seen, last_run_id FROM devices";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
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
/// not depend on the order its chunks came in) inside `tx`.
pub(super) fn reconcile_run(
    tx: &Transaction<'_>,
    tenant: &str,
    run_id: &str,
    mut sightings: Vec<(String, Sighting)>,
    now: i64,
) -> rusqlite::Result<Outcome> {
    let mut outcome = Outcome::default();
    reconcile::order(&mut sightings);
    let mut index = SqliteIndex { tx };
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
        let store = self.clone();
        let (tenant, run_id) = (tenant.to_owned(), run_id.to_owned());
        self.call_mut(move |c| {
            let sql = |e| store.sql(e);
            let tx = c.transaction().map_err(sql)?;
            let outcome = reconcile_run(&tx, &tenant, &run_id, sightings, now).map_err(sql)?;
            tx.commit().map_err(sql)?;
            Ok(outcome)
        })
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

    #[tokio::test]
    async fn run_completes_only_with_all_chunks_and_rejected_streams_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("gw.db")).unwrap();

        assert_eq!(
            store
                .stage_blocking(&owner(1), &[part("r", 0, 3, &["10.0.0.1"])])
                .unwrap(),
            vec![Staged::New]
        );
        assert!(store
            .commit_blocking(&owner(1), &["r".into()])
            .unwrap()
            .is_empty());

        // A stream that is then rejected.
        store
            .stage_blocking(&owner(2), &[part("r", 1, 3, &["10.0.0.2"])])
            .unwrap();
        store.discard_blocking(2).unwrap();
        assert_eq!(store.staged_chunk_count().await.unwrap(), 1);

        // Retry of chunk 0 is a duplicate; a different total is inconsistent.
        assert_eq!(
            store
                .stage_blocking(
                    &owner(3),
                    &[part("r", 0, 3, &["10.9.9.9"]), part("r", 1, 4, &[])]
                )
                .unwrap(),
            vec![Staged::Duplicate, Staged::Inconsistent]
        );
        store
            .stage_blocking(
                &owner(3),
                &[
                    part("r", 1, 3, &["10.0.0.2"]),
                    part("r", 2, 3, &["10.0.0.1"]),
                ],
            )
            .unwrap();
        let done = store.commit_blocking(&owner(3), &["r".into()]).unwrap();
        assert_eq!(
            done,
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
            }]
        );
        assert_eq!(store.device_count().await.unwrap(), 2);
        assert_eq!(store.staged_chunk_count().await.unwrap(), 0);
        let runs = store.runs().await.unwrap();
        assert_eq!((runs.len(), runs[0].total_chunks), (1, 3));

        // Replaying a completed run changes nothing.
        assert_eq!(
            store
                .stage_blocking(&owner(4), &[part("r", 0, 3, &["10.7.7.7"])])
                .unwrap(),
            vec![Staged::Duplicate]
        );
        assert!(store
            .commit_blocking(&owner(4), &["r".into()])
            .unwrap()
            .is_empty());
        let devices = store.devices().await.unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].metadata, json!({"k":"v"}));
        assert_eq!(devices[0].last_run_id, "r");
    }

    #[tokio::test]
    async fn reopen_drops_uncommitted_chunks_and_keeps_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.db");
        {
            let store = Store::open(&path).unwrap();
            store
                .stage_blocking(&owner(1), &[part("r", 0, 2, &["10.0.0.1"])])
                .unwrap();
            store
                .stage_blocking(&owner(2), &[part("r", 1, 2, &["10.0.0.2"])])
                .unwrap();
            store.commit_blocking(&owner(1), &["r".into()]).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.staged_chunk_count().await.unwrap(), 1);
    }
}
