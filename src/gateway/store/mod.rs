//! The gateway's database, SQLite (embedded, the default) or PostgreSQL
//! (`database_url`, several gateways may share it), one module per concern:
//!
//! - [`staging`]: staged chunks of incomplete runs, completed runs and the
//!   `devices` table (gateway.md §4);
//! - [`agents`]: the agent registry (§2);
//! - [`tenants`]: tenants and their optional intermediate CAs (§1);
//! - [`sources`]: integration sources with sealed credentials and their
//!   status (§3).
//!
//! Store code is written once, against [`db::Tx`] (either backend's
//! transaction). Both clients are blocking: the public async methods run on
//! `spawn_blocking` behind one connection in a mutex; the `*_blocking`
//! methods are for the ingestion sink, which is already on a blocking thread. The database never
//! sees a credential or a CA key in clear: callers seal them first
//! ([`crate::gateway::secrets`]).

mod agents;
mod canonical;
pub mod db;
mod pg_dire;
mod pg_schema;
mod sources;
mod staging;
mod tenants;
#[doc(hidden)]
pub mod throwaway;

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;

pub use db::{DatabaseLocation, DbError, Dialect, PostgresUrl};
use db::{PgClient, Tx};

pub use canonical::{DeviceFilter, MergeRow};
pub use sources::{SourceRef, SourceRow, SourceStatus, SourceStatusUpdate};
pub(crate) use staging::{CompletedRun, Staged, StreamOwner};
pub use staging::{DeviceRow, RunRow};
pub use tenants::TenantRow;

const SCHEMA_VERSION: i64 = 5;

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
    #[error("database {location}: {source}")]
    Db { location: String, source: DbError },
    #[error(
        "database {location} has schema version {found}, newer than this gateway ({SCHEMA_VERSION})"
    )]
    NewerSchema { location: String, found: i64 },
    #[error("database {location}: corrupt data: {reason}")]
    Corrupt { location: String, reason: String },
    #[error("database task failed: {0}")]
    Task(String),
    /// A uniqueness rule of the schema (tenant slug, source name per tenant).
    #[error("{0}")]
    Conflict(String),
}

/// Handle to the gateway database (cheap to clone).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    location: DatabaseLocation,
}

/// One connection per store: ingestion and administration take turns, as
/// SQLite's single writer would make them anyway.
enum Backend {
    Sqlite(Mutex<Connection>),
    // Boxed: the client is three times the size of a SQLite connection.
    Postgres(Box<Mutex<PgClient>>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

/// How long a chunk of a stream that never finished may stay staged on a
/// shared PostgreSQL database before a starting gateway removes it: another
/// gateway may still be receiving that stream (on SQLite the database has a
/// single gateway, so every such chunk is an orphan).
const PG_ORPHAN_AGE_SECS: i64 = 3600;

impl Store {
    /// Opens (creating if needed) the SQLite database: WAL mode, schema
    /// migration, and removal of chunks left by streams that never finished.
    /// Blocking; one gateway process per database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_location(&DatabaseLocation::Sqlite(path.to_owned()))
    }

    /// Opens either backend (blocking: call from a blocking thread, as
    /// [`crate::gateway::open_store`] does). On PostgreSQL several gateways
    /// may share the database.
    pub fn open_location(location: &DatabaseLocation) -> Result<Self, StoreError> {
        let err = |source: DbError| StoreError::Db {
            location: location.to_string(),
            source,
        };
        let backend = match location {
            DatabaseLocation::Sqlite(path) => {
                let conn = Connection::open(path).map_err(|e| err(e.into()))?;
                conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
                    .map_err(|e| err(e.into()))?;
                // WAL + NORMAL is durable across application crashes; an OS
                // crash may lose the last transactions, which agents resend
                // (idempotent). A 64 MiB page cache: reconciling a large run
                // touches the device and identifier indexes all over (the
                // default is 2 MiB).
                conn.execute_batch(
                    "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA cache_size = -65536;",
                )
                .map_err(|e| err(e.into()))?;
                conn.set_prepared_statement_cache_capacity(64);
                Backend::Sqlite(Mutex::new(conn))
            }
            DatabaseLocation::Postgres(url) => {
                Backend::Postgres(Box::new(Mutex::new(PgClient::connect(url).map_err(err)?)))
            }
        };
        let store = Self {
            inner: Arc::new(Inner {
                backend,
                location: location.clone(),
            }),
        };
        store.migrate()?;
        let orphans = store.with_tx(|tx| {
            Ok(match tx.dialect() {
                Dialect::Sqlite => {
                    tx.execute("DELETE FROM staged_chunks WHERE stream_id IS NOT NULL", &[])?
                }
                Dialect::Postgres => tx.execute(
                    "DELETE FROM staged_chunks WHERE stream_id IS NOT NULL AND received_at < $1",
                    &[&(crate::clock::unix_secs() - PG_ORPHAN_AGE_SECS)],
                )?,
            })
        })?;
        if orphans > 0 {
            tracing::info!(
                chunks = orphans,
                "dropped chunks of streams interrupted by a restart"
            );
        }
        Ok(store)
    }

    /// Where the database is (its password never shown).
    pub fn location(&self) -> &DatabaseLocation {
        &self.inner.location
    }

    /// Runs `f` in a transaction on a blocking thread; commits if it
    /// returns `Ok`.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, DbError> + Send + 'static,
    {
        self.call_mut(move |tx| Ok(f(tx)?)).await
    }

    /// Like [`Store::call`], for work that fails with other store errors.
    pub(crate) async fn call_mut<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.with_tx(f))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` in a transaction on this (blocking) thread; commits if it
    /// returns `Ok`, rolls back otherwise.
    pub(crate) fn with_tx<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let err = |e: DbError| self.db_error(e);
        match &self.inner.backend {
            Backend::Sqlite(conn) => {
                let mut conn = lock(conn);
                let mut tx = Tx::Sqlite(conn.transaction().map_err(|e| err(e.into()))?);
                let value = f(&mut tx).map_err(|e| self.locate(e))?;
                tx.commit().map_err(err)?;
                Ok(value)
            }
            Backend::Postgres(client) => {
                let mut client = lock(client);
                let mut f = Some(f);
                // A connection the server closed since the last call (a
                // PostgreSQL restart, an idle timeout) shows when BEGIN
                // fails; `client()` then connects afresh for the retry.
                for retry in [false, true] {
                    let conn = client.client().map_err(err)?;
                    let failed = match conn.transaction() {
                        Ok(begun) => {
                            let Some(f) = f.take() else { break };
                            let mut tx = Tx::Postgres(begun);
                            let value = f(&mut tx).map_err(|e| self.locate(e))?;
                            tx.commit().map_err(err)?;
                            return Ok(value);
                        }
                        Err(e) => e,
                    };
                    if retry || !client.client_is_closed() {
                        return Err(err(failed.into()));
                    }
                }
                Err(self.db_error(DbError::Lost))
            }
        }
    }

    pub(crate) fn db_error(&self, source: DbError) -> StoreError {
        StoreError::Db {
            location: self.inner.location.to_string(),
            source,
        }
    }

    /// Errors raised inside a transaction do not know where they happened.
    fn locate(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Db { location, source } if location.is_empty() => self.db_error(source),
            StoreError::Corrupt { location, reason } if location.is_empty() => self.corrupt(reason),
            other => other,
        }
    }

    pub(crate) fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            location: self.inner.location.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<DbError> for StoreError {
    /// Inside transaction closures; [`Store::with_tx`] fills in the location.
    fn from(source: DbError) -> Self {
        StoreError::Db {
            location: String::new(),
            source,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-done transaction
    // (both clients roll back on drop), so a poisoned connection is usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// Version 3: tenants (gateway.md §1), integration sources (§3), a counter of
/// administrative changes, and the tenant joins the key of staged chunks and
/// runs (two tenants' agents may share an agent id and a run id).
///
/// Rows written before tenants existed say `'default'`; the step creates the
/// default tenant and rewrites them to its id (see [`migrate`]).
const SCHEMA_V3: &str = "
CREATE TABLE tenants (
    id            TEXT    PRIMARY KEY,       -- UUID, never the nil UUID
    slug          TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    platform      INTEGER NOT NULL DEFAULT 0,
    ca_cert_pem   TEXT,                      -- the tenant's intermediate CA, if bound
    ca_key_sealed BLOB,                      -- its private key, AEAD-sealed
    created_at    INTEGER NOT NULL
);
CREATE TABLE integration_sources (
    id                   TEXT    PRIMARY KEY,
    tenant               TEXT    NOT NULL REFERENCES tenants (id),
    name                 TEXT    NOT NULL,
    type                 TEXT    NOT NULL,
    endpoint             TEXT,
    enabled              INTEGER NOT NULL,
    agent_id             TEXT,               -- assigned agent; NULL = runs nowhere
    partition            TEXT    NOT NULL,
    poll_interval        TEXT,
    discovery_interval   TEXT,
    page_size            INTEGER,
    queries              TEXT    NOT NULL,   -- JSON array
    network_blacklist    TEXT    NOT NULL,   -- JSON array of CIDRs
    settings             TEXT    NOT NULL,   -- JSON object: further config_json keys
    credentials_sealed   BLOB    NOT NULL,   -- AEAD-sealed JSON object
    credential_keys      TEXT    NOT NULL,   -- JSON array: which credentials are set
    status               TEXT    NOT NULL DEFAULT 'idle',
    last_run_id          TEXT,
    last_sync_at         INTEGER,
    last_device_count    INTEGER,
    last_error           TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    UNIQUE (tenant, name)
);
CREATE INDEX integration_sources_by_agent ON integration_sources (tenant, agent_id);
CREATE TABLE gateway_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO gateway_meta (key, value) VALUES ('admin_generation', '0');

DROP INDEX staged_chunks_by_stream;
ALTER TABLE staged_chunks RENAME TO staged_chunks_v2;
CREATE TABLE staged_chunks (
    tenant          TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    run_id          TEXT    NOT NULL,
    chunk_index     INTEGER NOT NULL,
    total_chunks    INTEGER NOT NULL,
    total_devices   INTEGER NOT NULL,
    sync_service_id TEXT,
    stream_id       INTEGER,            -- set while the sending stream is open
    devices         INTEGER NOT NULL,
    rejected        INTEGER NOT NULL,
    data            BLOB    NOT NULL,   -- JSON array of StagedDevice
    received_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant, agent_id, run_id, chunk_index)
);
CREATE INDEX staged_chunks_by_stream ON staged_chunks (stream_id) WHERE stream_id IS NOT NULL;
INSERT INTO staged_chunks (tenant, agent_id, run_id, chunk_index, total_chunks, total_devices,
                           stream_id, devices, rejected, data, received_at)
    SELECT tenant, agent_id, run_id, chunk_index, total_chunks, total_devices,
           stream_id, devices, rejected, data, received_at FROM staged_chunks_v2;
DROP TABLE staged_chunks_v2;
ALTER TABLE runs RENAME TO runs_v2;
CREATE TABLE runs (
    tenant          TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    run_id          TEXT    NOT NULL,
    sync_service_id TEXT,
    total_chunks    INTEGER NOT NULL,
    total_devices   INTEGER NOT NULL,
    devices         INTEGER NOT NULL,
    rejected        INTEGER NOT NULL,
    completed_at    INTEGER NOT NULL,
    PRIMARY KEY (tenant, agent_id, run_id)
);
INSERT INTO runs (tenant, agent_id, run_id, total_chunks, total_devices, devices, rejected, completed_at)
    SELECT tenant, agent_id, run_id, total_chunks, total_devices, devices, rejected, completed_at FROM runs_v2;
DROP TABLE runs_v2;
";

/// Version 4: DIRE (gateway.md §5). Canonical devices, the identifiers that
/// point at them (unique per tenant and partition), and the merge audit.
/// Canonical ids embed tenant and partition, so `id` alone is unique.
const SCHEMA_V4: &str = "
CREATE TABLE canonical_devices (
    id          TEXT    PRIMARY KEY,   -- sr:<uuid v5>
    tenant      TEXT    NOT NULL,
    partition   TEXT    NOT NULL,
    ip          TEXT,
    mac         TEXT,
    hostname    TEXT,
    sources     TEXT    NOT NULL,      -- JSON array
    metadata    TEXT    NOT NULL,      -- JSON object: source -> its latest metadata
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL,
    last_run_id TEXT    NOT NULL,
    merged_into TEXT,                  -- set on a device folded into another
    identifiers TEXT    NOT NULL       -- JSON copy of its device_identifiers rows
);
CREATE UNIQUE INDEX canonical_devices_by_ip ON canonical_devices (tenant, partition, ip)
    WHERE ip IS NOT NULL;
CREATE INDEX canonical_devices_by_scope ON canonical_devices (tenant, partition, id);
CREATE TABLE device_identifiers (
    tenant    TEXT NOT NULL,
    partition TEXT NOT NULL,
    kind      TEXT NOT NULL,           -- armis, integration, netbox, mac
    value     TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (tenant, partition, kind, value)
) WITHOUT ROWID;                       -- the key is the row: one B-tree, not two
CREATE INDEX device_identifiers_by_device ON device_identifiers (device_id);
CREATE TABLE device_merges (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT    NOT NULL,
    partition   TEXT    NOT NULL,
    from_device TEXT    NOT NULL,
    into_device TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    identifiers TEXT    NOT NULL,      -- JSON: identifiers moved
    from_before TEXT    NOT NULL,      -- JSON: both devices as they were
    into_before TEXT    NOT NULL,
    merged_at   INTEGER NOT NULL,
    undone_at   INTEGER
);
CREATE INDEX device_merges_by_into ON device_merges (into_device, id);
";

/// Version 5: nothing looks identifiers up by device (each device row
/// carries a JSON copy of its identifiers), so that index only slowed every
/// write of a run.
const SCHEMA_V5: &str = "DROP INDEX device_identifiers_by_device;";

/// The tenant value of rows written before tenants existed.
const LEGACY_TENANT: &str = "default";

impl Store {
    /// Brings the schema to [`SCHEMA_VERSION`], one transaction per step.
    /// SQLite counts in `PRAGMA user_version` (0 → 1 creates the schema,
    /// 1 → 2 adds the agent registry, 2 → 3 tenants and sources, 3 → 4
    /// DIRE, 4 → 5 drops an unused index); PostgreSQL in `schema_migrations`, under an advisory lock so
    /// that gateways starting together migrate once.
    fn migrate(&self) -> Result<(), StoreError> {
        let sqlite = matches!(self.inner.backend, Backend::Sqlite(_));
        let version = self.with_tx(|tx| {
            Ok(match tx.dialect() {
                Dialect::Sqlite => tx.query_value::<i64>("PRAGMA user_version", &[])?,
                Dialect::Postgres => {
                    // Even CREATE TABLE IF NOT EXISTS races with itself.
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
                    tx.batch(
                        "CREATE TABLE IF NOT EXISTS schema_migrations (
                             version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
                    )?;
                    tx.query_value::<i64>(
                        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                        &[],
                    )?
                }
            })
        })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                location: self.inner.location.to_string(),
                found: version,
            });
        }
        let steps: &[(i64, &str)] = if sqlite {
            &[
                (1, SCHEMA_V1),
                (2, SCHEMA_V2),
                (3, SCHEMA_V3),
                (4, SCHEMA_V4),
                (5, SCHEMA_V5),
            ]
        } else {
            pg_schema::PG_MIGRATIONS
        };
        for &(step, schema) in steps.iter().filter(|(step, _)| *step > version) {
            self.with_tx(|tx| {
                match tx.dialect() {
                    Dialect::Sqlite => {
                        tx.batch(schema)?;
                        if step == 3 {
                            adopt_legacy_rows(tx)?;
                        }
                        tx.batch(&format!("PRAGMA user_version = {step}"))?;
                    }
                    Dialect::Postgres => {
                        // Another gateway may have applied it meanwhile.
                        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
                        let done: bool = tx.query_value(
                            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version >= $1)",
                            &[&step],
                        )?;
                        if !done {
                            tx.batch(schema)?;
                            tx.execute(
                                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                                &[&step, &crate::clock::unix_secs()],
                            )?;
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The advisory lock key of schema migrations ("sr-migr").
const MIGRATION_LOCK: i64 = 0x0073_722d_6d69_6772;

/// Rows from before tenants existed belong to the default tenant: create it
/// (slug `default`, a fresh id) if any such row exists, and point them at it.
fn adopt_legacy_rows(tx: &mut Tx<'_>) -> Result<(), DbError> {
    let tables = ["staged_chunks", "runs", "devices", "agents"];
    let mut legacy = false;
    for table in tables {
        legacy |= tx.query_value::<bool>(
            &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE tenant = $1)"),
            &[&LEGACY_TENANT],
        )?;
    }
    if !legacy {
        return Ok(());
    }
    let id = uuid::Uuid::new_v4().to_string();
    tx.execute(
        "INSERT INTO tenants (id, slug, name, platform, created_at) VALUES ($1, $2, 'Default tenant', FALSE, $3)",
        &[&id, &LEGACY_TENANT, &crate::clock::unix_secs()],
    )?;
    for table in tables {
        tx.execute(
            &format!("UPDATE {table} SET tenant = $1 WHERE tenant = $2"),
            &[&id, &LEGACY_TENANT],
        )?;
    }
    Ok(())
}

/// Unit tests of storage run on both backends.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A fresh database of each backend: SQLite `<dir>/<name>.db`, and a new
    /// database on the test PostgreSQL server ([`throwaway`]).
    pub(crate) async fn fresh_locations(dir: &Path, name: &str) -> [DatabaseLocation; 2] {
        let prefix = name.to_owned();
        let url = tokio::task::spawn_blocking(move || throwaway::fresh_database(&prefix))
            .await
            .expect("database task")
            .unwrap_or_else(|e| panic!("PostgreSQL for the test: {e}"));
        [
            DatabaseLocation::Sqlite(dir.join(format!("{name}.db"))),
            DatabaseLocation::Postgres(PostgresUrl::parse(&url).expect("test database URL")),
        ]
    }

    /// Opens (or reopens) a test database.
    pub(crate) async fn open(location: &DatabaseLocation) -> Store {
        crate::gateway::open_store(location)
            .await
            .unwrap_or_else(|e| panic!("opening {location}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_version_1_database_is_migrated_and_its_rows_join_the_default_tenant() {
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
            conn.execute(
                "INSERT INTO runs (agent_id, run_id, tenant, total_chunks, total_devices, devices,
                                   rejected, completed_at)
                 VALUES ('a', 'r', 'default', 1, 1, 1, 0, 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let tenants = store.tenants().await.unwrap();
        assert_eq!(tenants.len(), 1);
        assert_eq!(tenants[0].slug, "default");
        let id = tenants[0].id.clone();
        assert!(uuid::Uuid::parse_str(&id).is_ok_and(|u| !u.is_nil()));
        let devices = store.devices().await.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].tenant, id);
        assert_eq!(store.runs().await.unwrap()[0].tenant, id);
        assert!(store.agents().await.unwrap().is_empty());
        let version: i64 = store
            .call(|tx| tx.query_value("PRAGMA user_version", &[]))
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_fresh_database_has_no_tenants_until_the_gateway_creates_them() {
        let dir = tempfile::tempdir().unwrap();
        for location in testing::fresh_locations(dir.path(), "fresh").await {
            let store = testing::open(&location).await;
            assert!(store.tenants().await.unwrap().is_empty(), "{location}");
            assert_eq!(store.admin_generation().await.unwrap(), 0, "{location}");
            drop(store);
            // Reopening finds the schema current and migrates nothing.
            let store = testing::open(&location).await;
            assert_eq!(store.admin_generation().await.unwrap(), 0, "{location}");
        }
    }

    #[tokio::test]
    async fn a_postgres_connection_closed_by_the_server_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let [_, postgres] = testing::fresh_locations(dir.path(), "reconnect").await;
        let store = testing::open(&postgres).await;
        assert_eq!(store.admin_generation().await.unwrap(), 0);
        // What a server restart or an administrator does to the session.
        let killed = store
            .call(|tx| {
                tx.query("SELECT pg_terminate_backend(pg_backend_pid())", &[], |r| {
                    r.get::<bool>(0)
                })
            })
            .await;
        assert!(killed.is_err(), "the session survived: {killed:?}");
        assert_eq!(store.admin_generation().await.unwrap(), 0);
        assert!(store.tenants().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn gateways_starting_together_on_one_postgres_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let [_, postgres] = testing::fresh_locations(dir.path(), "together").await;
        let opens = (0..4).map(|_| testing::open(&postgres));
        let stores = futures::future::join_all(opens).await;
        let versions: Vec<i64> = stores[0]
            .call(|tx| {
                tx.query(
                    "SELECT version FROM schema_migrations ORDER BY version",
                    &[],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap();
        let steps: Vec<i64> = pg_schema::PG_MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, steps);
        assert_eq!(versions.last(), Some(&SCHEMA_VERSION));
    }
}
