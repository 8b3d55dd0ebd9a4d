//! The `integration_sources` table (gateway.md §3). Credentials arrive here
//! already sealed; status columns are written by ingestion and run reports.

use serde::Serialize;
use serde_json::{Map, Value};

use super::db::{DbError, Row};
use super::tenants::{bump_generation, conflict_or};
use super::{Store, StoreError};
use crate::clock::unix_secs;

/// One integration source as stored.
#[derive(Clone, PartialEq, Serialize)]
pub struct SourceRow {
    pub id: String,
    pub tenant: String,
    pub name: String,
    #[serde(rename = "type")]
    pub source_type: String,
    pub endpoint: Option<String>,
    pub enabled: bool,
    /// The assigned agent; `None` runs nowhere.
    pub agent_id: Option<String>,
    pub partition: String,
    pub poll_interval: Option<String>,
    pub discovery_interval: Option<String>,
    pub page_size: Option<u32>,
    pub queries: Vec<Value>,
    pub network_blacklist: Vec<String>,
    pub settings: Map<String, Value>,
    #[serde(skip)]
    pub credentials_sealed: Vec<u8>,
    /// Names of the credentials that are set (never their values).
    pub credential_keys: Vec<String>,
    #[serde(flatten)]
    pub status: SourceStatus,
    pub created_at: i64,
    pub updated_at: i64,
}

impl std::fmt::Debug for SourceRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRow")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("type", &self.source_type)
            .field("enabled", &self.enabled)
            .field("agent_id", &self.agent_id)
            .field("credential_keys", &self.credential_keys)
            .finish_non_exhaustive()
    }
}

/// Status bookkeeping of a source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// `idle`, `running`, `success` or `failed`.
    pub status: String,
    pub last_run_id: Option<String>,
    pub last_sync_at: Option<i64>,
    pub last_device_count: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

/// Which source a status update is about: runs name it by id (`sync_meta`),
/// run reports by name. Either way only the source's assigned agent may
/// move its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRef {
    Id(String),
    Name(String),
}

/// A status change fed by ingestion (chunks, completed runs) or run reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStatusUpdate {
    /// Chunk 0 of a run arrived.
    Running { run_id: String },
    /// A run completed (all chunks) or was reported successful.
    Succeeded { run_id: String, devices: u64 },
    /// The agent reported the run failed.
    Failed { run_id: String, error: String },
}

const SOURCE_COLUMNS: &str =
    "SELECT id, tenant, name, type, endpoint, enabled, agent_id, partition,
    poll_interval, discovery_interval, page_size, queries, network_blacklist, settings,
    credentials_sealed, credential_keys, status, last_run_id, last_sync_at, last_device_count,
    last_error, consecutive_failures, created_at, updated_at FROM integration_sources";

/// JSON columns are written by this module; anything unreadable reads as
/// empty rather than hiding the whole source.
fn json_column<T: serde::de::DeserializeOwned + Default>(text: String) -> T {
    serde_json::from_str(&text).unwrap_or_default()
}

fn source_row(r: &Row<'_, '_>) -> Result<SourceRow, DbError> {
    Ok(SourceRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        name: r.get(2)?,
        source_type: r.get(3)?,
        endpoint: r.get(4)?,
        enabled: r.get(5)?,
        agent_id: r.get(6)?,
        partition: r.get(7)?,
        poll_interval: r.get(8)?,
        discovery_interval: r.get(9)?,
        page_size: r.get::<Option<i64>>(10)?.map(|n| n as u32),
        queries: json_column(r.get(11)?),
        network_blacklist: json_column(r.get(12)?),
        settings: json_column(r.get(13)?),
        credentials_sealed: r.get(14)?,
        credential_keys: json_column(r.get(15)?),
        status: SourceStatus {
            status: r.get(16)?,
            last_run_id: r.get(17)?,
            last_sync_at: r.get(18)?,
            last_device_count: r.get::<Option<i64>>(19)?.map(|n| n as u64),
            last_error: r.get(20)?,
            consecutive_failures: r.get::<i64>(21)? as u32,
        },
        created_at: r.get(22)?,
        updated_at: r.get(23)?,
    })
}

fn to_json(value: &impl Serialize) -> String {
    // Vec/Map of JSON values and strings always serialise.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

impl Store {
    /// Sources of one tenant (all tenants with `None`), by tenant and name.
    pub async fn sources(&self, tenant: Option<&str>) -> Result<Vec<SourceRow>, StoreError> {
        let tenant = tenant.map(str::to_owned);
        self.call(move |tx| {
            tx.query(
                &format!("{SOURCE_COLUMNS} WHERE CAST($1 AS TEXT) IS NULL OR tenant = $1 ORDER BY tenant, name"),
                &[&tenant],
                source_row,
            )
        })
        .await
    }

    /// A tenant's source by id or by name.
    pub async fn source(
        &self,
        tenant: &str,
        which: &SourceRef,
    ) -> Result<Option<SourceRow>, StoreError> {
        let tenant = tenant.to_owned();
        let (column, value) = match which {
            SourceRef::Id(id) => ("id", id.clone()),
            SourceRef::Name(name) => ("name", name.clone()),
        };
        self.call(move |tx| {
            tx.query_opt(
                &format!("{SOURCE_COLUMNS} WHERE tenant = $1 AND {column} = $2"),
                &[&tenant, &value],
                source_row,
            )
        })
        .await
    }

    /// What agent `agent_id` of `tenant` runs: its enabled, assigned sources.
    pub async fn sources_for_agent(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Vec<SourceRow>, StoreError> {
        let (tenant, agent_id) = (tenant.to_owned(), agent_id.to_owned());
        self.call(move |tx| {
            tx.query(
                &format!(
                    "{SOURCE_COLUMNS} WHERE tenant = $1 AND agent_id = $2 AND enabled ORDER BY name"
                ),
                &[&tenant, &agent_id],
                source_row,
            )
        })
        .await
    }

    /// Inserts a new source or replaces the configuration of an existing
    /// one (same id); status columns are left as they are. A name taken in
    /// the tenant is [`StoreError::Conflict`].
    pub async fn save_source(&self, source: SourceRow) -> Result<(), StoreError> {
        self.call_mut(move |tx| {
            tx.execute(
                "INSERT INTO integration_sources
                    (id, tenant, name, type, endpoint, enabled, agent_id, partition, poll_interval,
                     discovery_interval, page_size, queries, network_blacklist, settings,
                     credentials_sealed, credential_keys, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
                 ON CONFLICT (id) DO UPDATE SET
                    name = excluded.name, type = excluded.type, endpoint = excluded.endpoint,
                    enabled = excluded.enabled, agent_id = excluded.agent_id,
                    partition = excluded.partition, poll_interval = excluded.poll_interval,
                    discovery_interval = excluded.discovery_interval,
                    page_size = excluded.page_size, queries = excluded.queries,
                    network_blacklist = excluded.network_blacklist, settings = excluded.settings,
                    credentials_sealed = excluded.credentials_sealed,
                    credential_keys = excluded.credential_keys, updated_at = excluded.updated_at
                 WHERE integration_sources.tenant = excluded.tenant",
                &[
                    &source.id,
                    &source.tenant,
                    &source.name,
                    &source.source_type,
                    &source.endpoint,
                    &source.enabled,
                    &source.agent_id,
                    &source.partition,
                    &source.poll_interval,
                    &source.discovery_interval,
                    &source.page_size.map(i64::from),
                    &to_json(&source.queries),
                    &to_json(&source.network_blacklist),
                    &to_json(&source.settings),
                    &source.credentials_sealed,
                    &to_json(&source.credential_keys),
                    &source.created_at,
                    &source.updated_at,
                ],
            )
            .map_err(|e| {
                conflict_or(e, || {
                    format!("the tenant already has a source named {:?}", source.name)
                })
            })?;
            Ok(bump_generation(tx)?)
        })
        .await
    }

    /// Deletes a tenant's source; `false` if there was none.
    pub async fn delete_source(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.call(move |tx| {
            let deleted = tx.execute(
                "DELETE FROM integration_sources WHERE tenant = $1 AND id = $2",
                &[&tenant, &id],
            )?;
            if deleted > 0 {
                bump_generation(tx)?;
            }
            Ok(deleted > 0)
        })
        .await
    }

    /// Applies a status change to the source `which` of `tenant`, if it is
    /// assigned to `agent_id`. Returns whether a source was updated.
    pub async fn update_source_status(
        &self,
        tenant: &str,
        agent_id: &str,
        which: &SourceRef,
        update: SourceStatusUpdate,
    ) -> Result<bool, StoreError> {
        let (tenant, agent_id) = (tenant.to_owned(), agent_id.to_owned());
        let (column, value) = match which {
            SourceRef::Id(id) => ("id", id.clone()),
            SourceRef::Name(name) => ("name", name.clone()),
        };
        let now = unix_secs();
        self.call(move |tx| {
            let scope = format!("WHERE tenant = $1 AND agent_id = $2 AND {column} = $3");
            let changed = match update {
                SourceStatusUpdate::Running { run_id } => tx.execute(
                    &format!(
                        "UPDATE integration_sources SET status = 'running', last_run_id = $4 {scope}"
                    ),
                    &[&tenant, &agent_id, &value, &run_id],
                )?,
                SourceStatusUpdate::Succeeded { run_id, devices } => tx.execute(
                    &format!(
                        "UPDATE integration_sources SET status = 'success', last_run_id = $4,
                            last_sync_at = $5, last_device_count = $6, last_error = NULL,
                            consecutive_failures = 0 {scope}"
                    ),
                    &[&tenant, &agent_id, &value, &run_id, &now, &(devices as i64)],
                )?,
                SourceStatusUpdate::Failed { run_id, error } => tx.execute(
                    &format!(
                        "UPDATE integration_sources SET status = 'failed', last_run_id = $4,
                            last_sync_at = $5, last_error = $6,
                            consecutive_failures = consecutive_failures + 1 {scope}"
                    ),
                    &[&tenant, &agent_id, &value, &run_id, &now, &error],
                )?,
            };
            Ok(changed > 0)
        })
        .await
    }
}
