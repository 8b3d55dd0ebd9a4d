//! The PostgreSQL schema. The same tables as SQLite (see `store/mod.rs`),
//! in PostgreSQL's types: every integer is `BIGINT` (the store reads and
//! writes `i64`), flags are `BOOLEAN`, blobs are `BYTEA`, JSON is kept as
//! `TEXT` exactly as on SQLite.
//!
//! PostgreSQL support starts at schema version 4: there are no older
//! PostgreSQL databases to migrate. Later versions add steps to
//! [`PG_MIGRATIONS`], as SQLite's do.

/// Version 4 (SQLite v1–v4 in one step).
const PG_SCHEMA_V4: &str = "
CREATE TABLE staged_chunks (
    tenant          TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    run_id          TEXT    NOT NULL,
    chunk_index     BIGINT  NOT NULL,
    total_chunks    BIGINT  NOT NULL,
    total_devices   BIGINT  NOT NULL,
    sync_service_id TEXT,
    stream_id       BIGINT,             -- set while the sending stream is open
    devices         BIGINT  NOT NULL,
    rejected        BIGINT  NOT NULL,
    data            BYTEA   NOT NULL,   -- JSON array of StagedDevice
    received_at     BIGINT  NOT NULL,
    PRIMARY KEY (tenant, agent_id, run_id, chunk_index)
);
CREATE INDEX staged_chunks_by_stream ON staged_chunks (stream_id) WHERE stream_id IS NOT NULL;
CREATE TABLE runs (
    tenant          TEXT    NOT NULL,
    agent_id        TEXT    NOT NULL,
    run_id          TEXT    NOT NULL,
    sync_service_id TEXT,
    total_chunks    BIGINT  NOT NULL,
    total_devices   BIGINT  NOT NULL,
    devices         BIGINT  NOT NULL,
    rejected        BIGINT  NOT NULL,
    completed_at    BIGINT  NOT NULL,
    seq             BIGINT  GENERATED ALWAYS AS IDENTITY,  -- insertion order
    PRIMARY KEY (tenant, agent_id, run_id)
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
    first_seen  BIGINT  NOT NULL,
    last_seen   BIGINT  NOT NULL,
    last_run_id TEXT    NOT NULL,
    PRIMARY KEY (tenant, partition, source, device_key)
);
CREATE TABLE agents (
    tenant       TEXT    NOT NULL,
    agent_id     TEXT    NOT NULL,
    partition    TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    hostname     TEXT    NOT NULL,
    os           TEXT    NOT NULL,
    arch         TEXT    NOT NULL,
    capabilities TEXT    NOT NULL,   -- JSON array of strings
    first_seen   BIGINT  NOT NULL,
    last_seen    BIGINT  NOT NULL,
    PRIMARY KEY (tenant, agent_id)
);
CREATE TABLE tenants (
    id            TEXT    PRIMARY KEY,
    slug          TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    platform      BOOLEAN NOT NULL DEFAULT FALSE,
    ca_cert_pem   TEXT,
    ca_key_sealed BYTEA,
    created_at    BIGINT  NOT NULL
);
CREATE TABLE integration_sources (
    id                   TEXT    PRIMARY KEY,
    tenant               TEXT    NOT NULL REFERENCES tenants (id),
    name                 TEXT    NOT NULL,
    type                 TEXT    NOT NULL,
    endpoint             TEXT,
    enabled              BOOLEAN NOT NULL,
    agent_id             TEXT,
    partition            TEXT    NOT NULL,
    poll_interval        TEXT,
    discovery_interval   TEXT,
    page_size            BIGINT,
    queries              TEXT    NOT NULL,
    network_blacklist    TEXT    NOT NULL,
    settings             TEXT    NOT NULL,
    credentials_sealed   BYTEA   NOT NULL,
    credential_keys      TEXT    NOT NULL,
    status               TEXT    NOT NULL DEFAULT 'idle',
    last_run_id          TEXT,
    last_sync_at         BIGINT,
    last_device_count    BIGINT,
    last_error           TEXT,
    consecutive_failures BIGINT  NOT NULL DEFAULT 0,
    created_at           BIGINT  NOT NULL,
    updated_at           BIGINT  NOT NULL,
    UNIQUE (tenant, name)
);
CREATE INDEX integration_sources_by_agent ON integration_sources (tenant, agent_id);
CREATE TABLE gateway_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO gateway_meta (key, value) VALUES ('admin_generation', '0');
CREATE TABLE canonical_devices (
    id          TEXT    PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    partition   TEXT    NOT NULL,
    ip          TEXT,
    mac         TEXT,
    hostname    TEXT,
    sources     TEXT    NOT NULL,
    metadata    TEXT    NOT NULL,
    first_seen  BIGINT  NOT NULL,
    last_seen   BIGINT  NOT NULL,
    last_run_id TEXT    NOT NULL,
    merged_into TEXT,
    identifiers TEXT    NOT NULL
);
CREATE UNIQUE INDEX canonical_devices_by_ip ON canonical_devices (tenant, partition, ip)
    WHERE ip IS NOT NULL;
CREATE INDEX canonical_devices_by_scope ON canonical_devices (tenant, partition, id);
CREATE TABLE device_identifiers (
    tenant    TEXT NOT NULL,
    partition TEXT NOT NULL,
    kind      TEXT NOT NULL,
    value     TEXT NOT NULL,
    device_id TEXT NOT NULL,
    PRIMARY KEY (tenant, partition, kind, value)
);
CREATE INDEX device_identifiers_by_device ON device_identifiers (device_id);
CREATE TABLE device_merges (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant      TEXT    NOT NULL,
    partition   TEXT    NOT NULL,
    from_device TEXT    NOT NULL,
    into_device TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    identifiers TEXT    NOT NULL,
    from_before TEXT    NOT NULL,
    into_before TEXT    NOT NULL,
    merged_at   BIGINT  NOT NULL,
    undone_at   BIGINT
);
CREATE INDEX device_merges_by_into ON device_merges (into_device, id);
";

/// Version 5, as on SQLite: the unused index of identifiers by device goes.
/// And device rows leave a fifth of each page free: a re-sync rewrites
/// every device's `last_seen`, and with room on the page PostgreSQL updates
/// the row in place without touching its indexes (a HOT update); 1M-device
/// re-syncs went from 24k to 26k devices/s on the 2-core VM.
const PG_SCHEMA_V5: &str = "DROP INDEX IF EXISTS device_identifiers_by_device;
ALTER TABLE canonical_devices SET (fillfactor = 80);";

/// `(version, DDL)` steps, applied in order inside one transaction each.
pub(super) const PG_MIGRATIONS: &[(i64, &str)] = &[(4, PG_SCHEMA_V4), (5, PG_SCHEMA_V5)];
