//! SQLite storage: staged chunks of incomplete runs, the `devices` table and
//! completed runs (gateway.md §4).
//!
//! Staging is two-phase so that a rejected stream leaves nothing behind:
//! chunks are inserted tagged with their stream's id while the stream is open,
//! and only an accepted stream clears the tag (`commit_stream`), completing the
//! runs it finished in the same transaction. A crash leaves tagged rows, which
//! `open` deletes.
//!
//! rusqlite is blocking: the public async methods run on `spawn_blocking`
//! behind one `Arc<Mutex<Connection>>`; the `*_blocking` methods are for the
//! ingestion sink, which is already on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{Map, Value};

use super::ingest::{ChunkPart, StagedDevice};
use super::registry::AgentRecord;
use crate::clock::unix_secs;

const SCHEMA_VERSION: i64 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE staged_chunks (
    agent_id      TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    chunk_index   INTEGER NOT NULL,
    total_chunks  INTEGER NOT NULL,
    total_devices INTEGER NOT NULL,
    tenant        TEXT    NOT NULL,
    stream_id     INTEGER,            -- set while the sending stream is open
    devices       INTEGER NOT NULL,
    rejected      INTEGER NOT NULL,
    data          BLOB    NOT NULL,   -- JSON array of StagedDevice
    received_at   INTEGER NOT NULL,
    PRIMARY KEY (agent_id, run_id, chunk_index)
);
CREATE INDEX staged_chunks_by_stream ON staged_chunks (stream_id) WHERE stream_id IS NOT NULL;
CREATE TABLE runs (
    agent_id      TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    tenant        TEXT    NOT NULL,
    total_chunks  INTEGER NOT NULL,
    total_devices INTEGER NOT NULL,
    devices       INTEGER NOT NULL,
    rejected      INTEGER NOT NULL,
    completed_at  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, run_id)
);
CREATE TABLE devices (
    tenant      TEXT    NOT NULL,
    partition   TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    device_key  TEXT    NOT NULL,
    ip          TEXT,
    mac         TEXT,
    hostname    TEXT,
    metadata    TEXT    NOT NULL,
    agent_id    TEXT    NOT NULL,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    last_run_id TEXT    NOT NULL,
    PRIMARY KEY (tenant, partition, source, device_key)
);
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this gateway ({SCHEMA_VERSION})"
    )]
    NewerSchema { path: PathBuf, found: i64 },
    #[error("database {path}: corrupt staged chunk: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("database task failed: {0}")]
    Task(String),
}

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
}

/// Handle to the gateway database (cheap to clone).
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the database: WAL mode, schema migration,
    /// and removal of chunks left by streams that never finished.
    /// Blocking; one gateway process per database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(sql)?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .map_err(sql)?;
        // WAL + NORMAL is durable across application crashes; an OS crash may
        // lose the last transactions, which agents resend (idempotent).
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(sql)?;
        migrate(&mut conn, path)?;
        let orphans = conn
            .execute("DELETE FROM staged_chunks WHERE stream_id IS NOT NULL", [])
            .map_err(sql)?;
        if orphans > 0 {
            tracing::info!(
                chunks = orphans,
                "dropped chunks of streams interrupted by a restart"
            );
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_owned()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn device_count(&self) -> Result<u64, StoreError> {
        self.read(|c| c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }

    /// All devices, ordered by (tenant, partition, source, device_key).
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT tenant, partition, source, device_key, ip, mac, hostname, metadata, agent_id,
                        first_seen, last_seen, last_run_id
                 FROM devices ORDER BY tenant, partition, source, device_key",
            )?;
            let rows = stmt.query_map([], |r| {
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
            })?;
            rows.collect()
        })
        .await
    }

    /// Completed runs, oldest first.
    pub async fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        self.read(|c| {
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
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM staged_chunks WHERE stream_id IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n as u64)
    }

    /// Registers or refreshes an agent; `first_seen` of a known agent is
    /// kept.
    pub async fn upsert_agent(&self, agent: AgentRecord) -> Result<(), StoreError> {
        let capabilities =
            serde_json::to_string(&agent.capabilities).unwrap_or_else(|_| "[]".to_owned());
        self.read(move |c| {
            c.execute(
                "INSERT INTO agents (tenant, agent_id, partition, version, hostname, os, arch,
                                     capabilities, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (tenant, agent_id) DO UPDATE SET
                    partition = excluded.partition, version = excluded.version,
                    hostname = excluded.hostname, os = excluded.os, arch = excluded.arch,
                    capabilities = excluded.capabilities, last_seen = excluded.last_seen",
                params![
                    agent.tenant,
                    agent.agent_id,
                    agent.partition,
                    agent.version,
                    agent.hostname,
                    agent.os,
                    agent.arch,
                    capabilities,
                    agent.first_seen,
                    agent.last_seen
                ],
            )
            .map(|_| ())
        })
        .await
    }

    /// Moves an agent's `last_seen` forward (never back).
    pub async fn touch_agent(
        &self,
        tenant: &str,
        agent_id: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        let (tenant, agent_id) = (tenant.to_owned(), agent_id.to_owned());
        self.read(move |c| {
            c.execute(
                "UPDATE agents SET last_seen = MAX(last_seen, ?3) WHERE tenant = ?1 AND agent_id = ?2",
                params![tenant, agent_id, at],
            )
            .map(|_| ())
        })
        .await
    }

    /// Every registered agent, ordered by (tenant, agent_id).
    pub async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(&format!("{AGENT_COLUMNS} ORDER BY tenant, agent_id"))?;
            let rows = stmt.query_map([], agent_row)?;
            rows.collect()
        })
        .await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store.lock();
            f(&conn).map_err(|e| store.sql(e))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction
        // (rusqlite rolls back on drop), so a poisoned connection is usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        }
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
                "SELECT 1 FROM runs WHERE agent_id = ?1 AND run_id = ?2",
                params![owner.agent_id, part.run_id],
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
                "SELECT total_chunks FROM staged_chunks WHERE agent_id = ?1 AND run_id = ?2 LIMIT 1",
                params![owner.agent_id, part.run_id],
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
                    devices, rejected, data, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
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
        let (have, total, total_devices): (i64, Option<i64>, Option<i64>) = tx
            .query_row(
                "SELECT COUNT(*), MAX(total_chunks), MAX(total_devices) FROM staged_chunks
                 WHERE agent_id = ?1 AND run_id = ?2 AND stream_id IS NULL",
                params![owner.agent_id, run_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(sql)?;
        let Some(total) = total else { return Ok(None) };
        if have < total {
            return Ok(None);
        }
        let now = unix_secs();
        let (mut devices, mut rejected) = (0u64, 0u64);
        {
            let mut chunks = tx
                .prepare(
                    "SELECT data, rejected FROM staged_chunks
                     WHERE agent_id = ?1 AND run_id = ?2 ORDER BY chunk_index",
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
            let mut rows = chunks.query(params![owner.agent_id, run_id]).map_err(sql)?;
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
                }
            }
        }
        tx.execute(
            "DELETE FROM staged_chunks WHERE agent_id = ?1 AND run_id = ?2",
            params![owner.agent_id, run_id],
        )
        .map_err(sql)?;
        tx.execute(
            "INSERT INTO runs (agent_id, run_id, tenant, total_chunks, total_devices, devices, rejected, completed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                owner.agent_id,
                run_id,
                owner.tenant,
                total,
                total_devices.unwrap_or(0),
                devices as i64,
                rejected as i64,
                now
            ],
        )
        .map_err(sql)?;
        Ok(Some(CompletedRun {
            run_id: run_id.to_owned(),
            devices,
            rejected,
        }))
    }
}

const AGENT_COLUMNS: &str = "SELECT tenant, agent_id, partition, version, hostname, os, arch,
    capabilities, first_seen, last_seen FROM agents";

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRecord> {
    let capabilities: String = r.get(7)?;
    Ok(AgentRecord {
        tenant: r.get(0)?,
        agent_id: r.get(1)?,
        partition: r.get(2)?,
        version: r.get(3)?,
        hostname: r.get(4)?,
        os: r.get(5)?,
        arch: r.get(6)?,
        // Written by this module as a JSON array; anything else reads as none.
        capabilities: serde_json::from_str(&capabilities).unwrap_or_default(),
        first_seen: r.get(8)?,
        last_seen: r.get(9)?,
    })
}

fn metadata_json(metadata: &Map<String, Value>) -> String {
    // Serialising a Map of Values cannot fail (string keys only).
    serde_json::to_string(metadata).unwrap_or_else(|_| "{}".to_owned())
}

/// Version 2: the agent registry (gateway.md §2).
const SCHEMA_V2: &str = "
CREATE TABLE agents (
    tenant       TEXT    NOT NULL,
    agent_id     TEXT    NOT NULL,
    partition    TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    hostname     TEXT    NOT NULL,
    os           TEXT    NOT NULL,
    arch         TEXT    NOT NULL,
    capabilities TEXT    NOT NULL,   -- JSON array of strings
    first_seen   INTEGER NOT NULL,
    last_seen    INTEGER NOT NULL,
    PRIMARY KEY (tenant, agent_id)
);
";

/// `user_version`-based migration: 0 → 1 creates the schema, 1 → 2 adds the
/// agent registry. Each step is one transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
        });
    }
    for (step, schema) in [(1, SCHEMA_V1), (2, SCHEMA_V2)] {
        if version < step {
            let tx = conn.transaction().map_err(sql)?;
            tx.execute_batch(schema).map_err(sql)?;
            tx.pragma_update(None, "user_version", step).map_err(sql)?;
            tx.commit().map_err(sql)?;
        }
    }
    Ok(())
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
                rejected: 3
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
    async fn a_version_1_database_gains_the_agent_registry_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO devices (tenant, partition, source, device_key, metadata, agent_id,
                                      first_seen, last_seen, last_run_id)
                 VALUES ('default', 'p', 'armis', '7', '{}', 'a', 1, 1, 'r')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.device_count().await.unwrap(), 1);
        assert!(store.agents().await.unwrap().is_empty());
        let version: i64 = store
            .read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
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
