//! Canonical devices: the row-at-a-time DIRE index ([`DeviceIndex`]) over
//! one transaction of either backend, listing, and undoing merges
//! (gateway.md §5). PostgreSQL reconciles runs in prefetched batches
//! instead ([`super::pg_dire`]); the rules are the same code.

use serde_json::Value;

use super::db::{DbError, Dialect, Row, Tx};
use super::{Store, StoreError};
use crate::clock::unix_secs;
use crate::gateway::dire::reconcile::{self, metadata_map, DeviceIndex, MergeRecord, Scope};
use crate::gateway::dire::{CanonicalDevice, Identifier};

/// The DIRE index over an open transaction.
pub(crate) struct SqlIndex<'t, 'c> {
    pub tx: &'t mut Tx<'c>,
}

/// The columns of a canonical device, as [`device_at`] reads them.
pub(super) const DEVICE_FIELDS: &str =
    "id, tenant, partition, ip, mac, hostname, sources, metadata,
    first_seen, last_seen, last_run_id, merged_into, identifiers";

fn device_row(r: &Row<'_, '_>) -> Result<CanonicalDevice, DbError> {
    device_at(r, 0)
}

/// The [`DEVICE_FIELDS`] of a row from column `at` on (PostgreSQL's
/// batches read them after other columns).
pub(super) fn device_at(r: &Row<'_, '_>, at: usize) -> Result<CanonicalDevice, DbError> {
    let sources: String = r.get(at + 6)?;
    let metadata: String = r.get(at + 7)?;
    let identifiers: String = r.get(at + 12)?;
    Ok(CanonicalDevice {
        id: r.get(at)?,
        tenant: r.get(at + 1)?,
        partition: r.get(at + 2)?,
        ip: r.get(at + 3)?,
        mac: r.get(at + 4)?,
        hostname: r.get(at + 5)?,
        // Written by this module; unreadable JSON reads as empty.
        sources: serde_json::from_str(&sources).unwrap_or_default(),
        metadata: metadata_map(serde_json::from_str(&metadata).unwrap_or(Value::Null)),
        first_seen: r.get(at + 8)?,
        last_seen: r.get(at + 9)?,
        last_run_id: r.get(at + 10)?,
        merged_into: r.get(at + 11)?,
        identifiers: serde_json::from_str(&identifiers).unwrap_or_default(),
    })
}

pub(super) fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

impl DeviceIndex for SqlIndex<'_, '_> {
    type Error = DbError;

    fn holder(&mut self, scope: Scope<'_>, id: &Identifier) -> Result<Option<String>, DbError> {
        self.tx.query_opt(
            "SELECT device_id FROM device_identifiers
             WHERE tenant = $1 AND partition = $2 AND kind = $3 AND value = $4",
            &[
                &scope.tenant,
                &scope.partition,
                &id.kind.as_str(),
                &id.value,
            ],
            |r| r.get(0),
        )
    }

    fn holder_of_ip(&mut self, scope: Scope<'_>, ip: &str) -> Result<Option<String>, DbError> {
        self.tx.query_opt(
            "SELECT id FROM canonical_devices WHERE tenant = $1 AND partition = $2 AND ip = $3",
            &[&scope.tenant, &scope.partition, &ip],
            |r| r.get(0),
        )
    }

    fn load(
        &mut self,
        _scope: Scope<'_>,
        device: &str,
    ) -> Result<Option<CanonicalDevice>, DbError> {
        self.tx.query_opt(
            &format!("SELECT {DEVICE_FIELDS} FROM canonical_devices WHERE id = $1"),
            &[&device],
            device_row,
        )
    }

    fn release_ip(&mut self, scope: Scope<'_>, ip: &str, keeper: &str) -> Result<(), DbError> {
        self.tx.execute(
            "UPDATE canonical_devices SET ip = NULL
             WHERE tenant = $1 AND partition = $2 AND ip = $3 AND id <> $4",
            &[&scope.tenant, &scope.partition, &ip, &keeper],
        )?;
        Ok(())
    }

    fn store(&mut self, device: &CanonicalDevice) -> Result<(), DbError> {
        self.tx.execute(
            "INSERT INTO canonical_devices (id, tenant, partition, ip, mac, hostname, sources,
                 metadata, first_seen, last_seen, last_run_id, merged_into, identifiers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (id) DO UPDATE SET ip = excluded.ip, mac = excluded.mac,
                 hostname = excluded.hostname, sources = excluded.sources,
                 metadata = excluded.metadata, first_seen = excluded.first_seen,
                 last_seen = excluded.last_seen, last_run_id = excluded.last_run_id,
                 merged_into = excluded.merged_into, identifiers = excluded.identifiers",
            &[
                &device.id,
                &device.tenant,
                &device.partition,
                &device.ip,
                &device.mac,
                &device.hostname,
                &to_json(&device.sources),
                &to_json(&device.metadata),
                &device.first_seen,
                &device.last_seen,
                &device.last_run_id,
                &device.merged_into,
                &to_json(&device.identifiers),
            ],
        )?;
        Ok(())
    }

    fn touch(&mut self, device: &str, last_seen: i64, run_id: &str) -> Result<(), DbError> {
        self.tx.execute(
            "UPDATE canonical_devices SET last_seen = $2, last_run_id = $3 WHERE id = $1",
            &[&device, &last_seen, &run_id],
        )?;
        Ok(())
    }

    fn attach(&mut self, scope: Scope<'_>, id: &Identifier, device: &str) -> Result<(), DbError> {
        self.tx.execute(
            "INSERT INTO device_identifiers (tenant, partition, kind, value, device_id)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, partition, kind, value) DO UPDATE SET device_id = excluded.device_id",
            &[&scope.tenant, &scope.partition, &id.kind.as_str(), &id.value, &device],
        )?;
        Ok(())
    }

    fn record_merge(&mut self, merge: &MergeRecord) -> Result<(), DbError> {
        self.tx.execute(
            "INSERT INTO device_merges (tenant, partition, from_device, into_device, reason,
                 identifiers, from_before, into_before, merged_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &merge.tenant,
                &merge.partition,
                &merge.from,
                &merge.into,
                &merge.reason,
                &to_json(&merge.identifiers),
                &to_json(&with_identifiers(&merge.from_before)),
                &to_json(&with_identifiers(&merge.into_before)),
                &merge.at,
            ],
        )?;
        Ok(())
    }
}

/// PostgreSQL: serialises everything that reconciles or unmerges in one
/// (tenant, partition) across gateways sharing the database, until commit.
/// Taken before the first read of the scope, so what is read afterwards
/// includes everything the previous holder committed.
pub(super) fn lock_scope(tx: &mut Tx<'_>, tenant: &str, partition: &str) -> Result<(), DbError> {
    tx.execute(super::pg_dire::SCOPE_LOCK_SQL, &[&tenant, &partition])?;
    Ok(())
}

/// Devices are serialised with their identifiers for the audit trail.
pub(super) fn with_identifiers(device: &CanonicalDevice) -> Value {
    serde_json::to_value(device).unwrap_or(Value::Null)
}

fn device_from_json(value: &str) -> Option<CanonicalDevice> {
    #[derive(serde::Deserialize)]
    struct Stored {
        id: String,
        tenant: String,
        partition: String,
        ip: Option<String>,
        mac: Option<String>,
        hostname: Option<String>,
        sources: Vec<String>,
        metadata: Value,
        first_seen: i64,
        last_seen: i64,
        last_run_id: String,
        merged_into: Option<String>,
        identifiers: Vec<Identifier>,
    }
    let s: Stored = serde_json::from_str(value).ok()?;
    Some(CanonicalDevice {
        id: s.id,
        tenant: s.tenant,
        partition: s.partition,
        ip: s.ip,
        mac: s.mac,
        hostname: s.hostname,
        sources: s.sources,
        metadata: metadata_map(s.metadata),
        first_seen: s.first_seen,
        last_seen: s.last_seen,
        last_run_id: s.last_run_id,
        merged_into: s.merged_into,
        identifiers: s.identifiers,
    })
}

/// Filters for listing canonical devices.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    pub tenant: Option<String>,
    pub partition: Option<String>,
    pub source: Option<String>,
    pub ip: Option<String>,
    /// Include devices merged into others.
    pub include_merged: bool,
    pub limit: usize,
    pub offset: usize,
}

/// An audited merge as listed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MergeRow {
    pub id: i64,
    pub tenant: String,
    pub partition: String,
    pub from_device: String,
    pub into_device: String,
    pub reason: String,
    pub identifiers: Vec<Identifier>,
    pub merged_at: i64,
    pub undone_at: Option<i64>,
}

impl Store {
    /// Canonical devices matching `filter`, by (tenant, partition, id), with
    /// their identifiers.
    pub async fn canonical_devices(
        &self,
        filter: DeviceFilter,
    ) -> Result<Vec<CanonicalDevice>, StoreError> {
        self.call(move |tx| {
            // `sources` is a JSON array of names.
            let has_source = match tx.dialect() {
                Dialect::Sqlite => "EXISTS (SELECT 1 FROM json_each(sources) WHERE value = $3)",
                Dialect::Postgres => "sources::jsonb ? $3",
            };
            tx.query(
                &format!(
                    "SELECT {DEVICE_FIELDS} FROM canonical_devices
                     WHERE (CAST($1 AS TEXT) IS NULL OR tenant = $1)
                       AND (CAST($2 AS TEXT) IS NULL OR partition = $2)
                       AND (CAST($3 AS TEXT) IS NULL OR {has_source})
                       AND (CAST($4 AS TEXT) IS NULL OR ip = $4) AND ($5 OR merged_into IS NULL)
                     ORDER BY tenant, partition, id LIMIT $6 OFFSET $7"
                ),
                &[
                    &filter.tenant,
                    &filter.partition,
                    &filter.source,
                    &filter.ip,
                    &filter.include_merged,
                    &(filter.limit as i64),
                    &(filter.offset as i64),
                ],
                device_row,
            )
        })
        .await
    }

    /// One canonical device by id.
    pub async fn canonical_device(&self, id: &str) -> Result<Option<CanonicalDevice>, StoreError> {
        let id = id.to_owned();
        self.call(move |tx| {
            let scope = Scope {
                tenant: "",
                partition: "",
            };
            SqlIndex { tx }.load(scope, &id)
        })
        .await
    }

    /// Live canonical devices (not merged into another).
    pub async fn canonical_device_count(&self) -> Result<u64, StoreError> {
        self.call(|tx| {
            tx.query_value::<i64>(
                "SELECT COUNT(*) FROM canonical_devices WHERE merged_into IS NULL",
                &[],
            )
        })
        .await
        .map(|n| n as u64)
    }

    /// Merges recorded for a device (as survivor or as merged), newest first.
    pub async fn merges_of(&self, device: &str) -> Result<Vec<MergeRow>, StoreError> {
        let device = device.to_owned();
        self.call(move |tx| {
            tx.query(
                "SELECT id, tenant, partition, from_device, into_device, reason, identifiers,
                        merged_at, undone_at
                 FROM device_merges WHERE from_device = $1 OR into_device = $1 ORDER BY id DESC",
                &[&device],
                |r| {
                    let identifiers: String = r.get(6)?;
                    Ok(MergeRow {
                        id: r.get(0)?,
                        tenant: r.get(1)?,
                        partition: r.get(2)?,
                        from_device: r.get(3)?,
                        into_device: r.get(4)?,
                        reason: r.get(5)?,
                        identifiers: serde_json::from_str(&identifiers).unwrap_or_default(),
                        merged_at: r.get(7)?,
                        undone_at: r.get(8)?,
                    })
                },
            )
        })
        .await
    }

    /// Reverses the latest merge into `device` that is not undone yet:
    /// the merged device comes back as it was, with its identifiers, and the
    /// survivor loses what it brought. Returns the merge undone, if any.
    pub async fn unmerge(&self, device: &str) -> Result<Option<MergeRow>, StoreError> {
        let device = device.to_owned();
        self.call_mut(move |tx| {
            let corrupt = |what: &str| StoreError::Corrupt {
                location: String::new(),
                reason: format!("merge audit of {device}: {what}"),
            };
            type Latest = (
                i64,
                String,
                String,
                String,
                String,
                String,
                String,
                String,
                String,
                i64,
            );
            let latest: Option<Latest> = tx.query_opt(
                "SELECT id, tenant, partition, from_device, into_device, reason, identifiers,
                        from_before, into_before, merged_at
                 FROM device_merges WHERE into_device = $1 AND undone_at IS NULL
                 ORDER BY id DESC LIMIT 1",
                &[&device],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                },
            )?;
            let Some((
                id,
                tenant,
                partition,
                from,
                into,
                reason,
                ids,
                from_before,
                into_before,
                at,
            )) = latest
            else {
                return Ok(None);
            };
            if tx.dialect() == Dialect::Postgres {
                // Serialised with reconciliation of the same scope.
                lock_scope(tx, &tenant, &partition)?;
            }
            let identifiers: Vec<Identifier> =
                serde_json::from_str(&ids).map_err(|_| corrupt("identifiers"))?;
            let record = MergeRecord {
                tenant: tenant.clone(),
                partition: partition.clone(),
                from: from.clone(),
                into: into.clone(),
                reason: reason.clone(),
                identifiers: identifiers.clone(),
                from_before: device_from_json(&from_before)
                    .ok_or_else(|| corrupt("from_before"))?,
                into_before: device_from_json(&into_before)
                    .ok_or_else(|| corrupt("into_before"))?,
                at,
            };
            let scope = Scope {
                tenant: &tenant,
                partition: &partition,
            };
            let mut index = SqlIndex { tx };
            let into_now = index
                .load(scope, &into)?
                .ok_or_else(|| corrupt("the surviving device is gone"))?;
            let (mut restored_from, restored_into) = reconcile::unmerged(&record, &into_now);
            // The merged device gets its IP back only if nobody took it since.
            if let Some(ip) = &restored_from.ip {
                let holder = index.holder_of_ip(scope, ip)?;
                if holder.is_some_and(|h| h != into || restored_into.ip.as_deref() == Some(ip)) {
                    restored_from.ip = None;
                }
            }
            restored_from.merged_into = None;
            index.store(&restored_into)?;
            index.store(&restored_from)?;
            for identifier in &identifiers {
                index.attach(scope, identifier, &from)?;
            }
            let now = unix_secs();
            index.tx.execute(
                "UPDATE device_merges SET undone_at = $2 WHERE id = $1",
                &[&id, &now],
            )?;
            Ok(Some(MergeRow {
                id,
                tenant,
                partition,
                from_device: from,
                into_device: into,
                reason,
                identifiers,
                merged_at: at,
                undone_at: Some(now),
            }))
        })
        .await
    }
}
