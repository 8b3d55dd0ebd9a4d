//! The `tenants` table and the `gateway_meta` counters.
//!
//! Every administrative write (tenants, sources, CA binding) bumps
//! `admin_generation` in the same transaction: a running gateway compares it
//! to notice changes made by the CLI in another process.

use super::db::{DbError, Row, Tx};
use super::{Store, StoreError};

/// One tenant. `ca_key_sealed` is AEAD-sealed by the caller.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub platform: bool,
    pub ca_cert_pem: Option<String>,
    pub ca_key_sealed: Option<Vec<u8>>,
    pub created_at: i64,
}

impl std::fmt::Debug for TenantRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRow")
            .field("id", &self.id)
            .field("slug", &self.slug)
            .field("name", &self.name)
            .field("platform", &self.platform)
            .field("ca_bound", &self.ca_cert_pem.is_some())
            .finish_non_exhaustive()
    }
}

const TENANT_COLUMNS: &str =
    "SELECT id, slug, name, platform, ca_cert_pem, ca_key_sealed, created_at FROM tenants";

fn tenant_row(r: &Row<'_, '_>) -> Result<TenantRow, DbError> {
    Ok(TenantRow {
        id: r.get(0)?,
        slug: r.get(1)?,
        name: r.get(2)?,
        platform: r.get(3)?,
        ca_cert_pem: r.get(4)?,
        ca_key_sealed: r.get(5)?,
        created_at: r.get(6)?,
    })
}

/// Increments the administrative change counter (inside the caller's
/// transaction).
pub(super) fn bump_generation(tx: &mut Tx<'_>) -> Result<(), DbError> {
    tx.execute(
        "UPDATE gateway_meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT)
         WHERE key = 'admin_generation'",
        &[],
    )
    .map(|_| ())
}

/// Maps a UNIQUE/PRIMARY KEY violation to [`StoreError::Conflict`].
pub(super) fn conflict_or(e: DbError, what: impl FnOnce() -> String) -> StoreError {
    if e.is_unique_violation() {
        StoreError::Conflict(what())
    } else {
        e.into()
    }
}

impl Store {
    /// Every tenant, platform tenant first, then by slug.
    pub async fn tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        self.call(|tx| {
            tx.query(
                &format!("{TENANT_COLUMNS} ORDER BY platform DESC, slug"),
                &[],
                tenant_row,
            )
        })
        .await
    }

    pub async fn tenant_by_slug(&self, slug: &str) -> Result<Option<TenantRow>, StoreError> {
        let slug = slug.to_owned();
        self.call(move |tx| {
            tx.query_opt(
                &format!("{TENANT_COLUMNS} WHERE slug = $1"),
                &[&slug],
                tenant_row,
            )
        })
        .await
    }

    pub async fn platform_tenant(&self) -> Result<Option<TenantRow>, StoreError> {
        self.call(|tx| tx.query_opt(&format!("{TENANT_COLUMNS} WHERE platform"), &[], tenant_row))
            .await
    }

    /// Adds a tenant; a taken id or slug is [`StoreError::Conflict`].
    pub async fn insert_tenant(&self, tenant: TenantRow) -> Result<(), StoreError> {
        self.call_mut(move |tx| {
            tx.execute(
                "INSERT INTO tenants (id, slug, name, platform, ca_cert_pem, ca_key_sealed, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &tenant.id,
                    &tenant.slug,
                    &tenant.name,
                    &tenant.platform,
                    &tenant.ca_cert_pem,
                    &tenant.ca_key_sealed,
                    &tenant.created_at,
                ],
            )
            .map_err(|e| {
                conflict_or(e, || {
                    format!(
                        "a tenant with slug {:?} or id {} already exists",
                        tenant.slug, tenant.id
                    )
                })
            })?;
            Ok(bump_generation(tx)?)
        })
        .await
    }

    /// Binds a tenant to its intermediate CA, unless it already has one.
    /// Returns the tenant as stored afterwards (the existing CA wins a race).
    pub async fn bind_tenant_ca(
        &self,
        tenant_id: &str,
        ca_cert_pem: String,
        ca_key_sealed: Vec<u8>,
    ) -> Result<Option<TenantRow>, StoreError> {
        let tenant_id = tenant_id.to_owned();
        self.call(move |tx| {
            let changed = tx.execute(
                "UPDATE tenants SET ca_cert_pem = $2, ca_key_sealed = $3
                 WHERE id = $1 AND ca_cert_pem IS NULL",
                &[&tenant_id, &ca_cert_pem, &ca_key_sealed],
            )?;
            if changed > 0 {
                bump_generation(tx)?;
            }
            tx.query_opt(
                &format!("{TENANT_COLUMNS} WHERE id = $1"),
                &[&tenant_id],
                tenant_row,
            )
        })
        .await
    }

    /// The administrative change counter.
    pub async fn admin_generation(&self) -> Result<i64, StoreError> {
        self.call(|tx| {
            tx.query_value(
                "SELECT CAST(value AS BIGINT) FROM gateway_meta WHERE key = 'admin_generation'",
                &[],
            )
        })
        .await
    }

    /// Sets a `gateway_meta` value if it is not set yet; returns the value
    /// now stored.
    pub async fn meta_init(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call(move |tx| {
            tx.execute(
                "INSERT INTO gateway_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )?;
            tx.query_value("SELECT value FROM gateway_meta WHERE key = $1", &[&key])
        })
        .await
    }
}
