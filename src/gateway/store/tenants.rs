//! The `tenants` table and the `gateway_meta` counters.
//!
//! Every administrative write (tenants, sources, CA binding) bumps
//! `admin_generation` in the same transaction: a running gateway compares it
//! to notice changes made by the CLI in another process.

use rusqlite::{params, Connection, OptionalExtension};

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

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
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
pub(super) fn bump_generation(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE gateway_meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'admin_generation'",
        [],
    )
    .map(|_| ())
}

/// Maps a UNIQUE/PRIMARY KEY violation to [`StoreError::Conflict`].
pub(super) fn conflict_or(
    store: &Store,
    e: rusqlite::Error,
    what: impl FnOnce() -> String,
) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what())
        }
        _ => store.sql(e),
    }
}

impl Store {
    /// Every tenant, platform tenant first, then by slug.
    pub async fn tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        self.call(|c| {
            let mut stmt = c.prepare(&format!("{TENANT_COLUMNS} ORDER BY platform DESC, slug"))?;
            let rows = stmt.query_map([], tenant_row)?;
            rows.collect()
        })
        .await
    }

    pub async fn tenant_by_slug(&self, slug: &str) -> Result<Option<TenantRow>, StoreError> {
        let slug = slug.to_owned();
        self.call(move |c| {
            c.query_row(
                &format!("{TENANT_COLUMNS} WHERE slug = ?1"),
                [slug],
                tenant_row,
            )
            .optional()
        })
        .await
    }

    pub async fn platform_tenant(&self) -> Result<Option<TenantRow>, StoreError> {
        self.call(|c| {
            c.query_row(
                &format!("{TENANT_COLUMNS} WHERE platform = 1"),
                [],
                tenant_row,
            )
            .optional()
        })
        .await
    }

    /// Adds a tenant; a taken id or slug is [`StoreError::Conflict`].
    pub async fn insert_tenant(&self, tenant: TenantRow) -> Result<(), StoreError> {
        let store = self.clone();
        self.call_mut(move |c| {
            let tx = c.transaction().map_err(|e| store.sql(e))?;
            tx.execute(
                "INSERT INTO tenants (id, slug, name, platform, ca_cert_pem, ca_key_sealed, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    tenant.id,
                    tenant.slug,
                    tenant.name,
                    tenant.platform,
                    tenant.ca_cert_pem,
                    tenant.ca_key_sealed,
                    tenant.created_at
                ],
            )
            .map_err(|e| {
                conflict_or(&store, e, || {
                    format!(
                        "a tenant with slug {:?} or id {} already exists",
                        tenant.slug, tenant.id
                    )
                })
            })?;
            bump_generation(&tx).map_err(|e| store.sql(e))?;
            tx.commit().map_err(|e| store.sql(e))
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
        let store = self.clone();
        let tenant_id = tenant_id.to_owned();
        self.call_mut(move |c| {
            let sql = |e| store.sql(e);
            let tx = c.transaction().map_err(sql)?;
            let changed = tx
                .execute(
                    "UPDATE tenants SET ca_cert_pem = ?2, ca_key_sealed = ?3
                     WHERE id = ?1 AND ca_cert_pem IS NULL",
                    params![tenant_id, ca_cert_pem, ca_key_sealed],
                )
                .map_err(sql)?;
            if changed > 0 {
                bump_generation(&tx).map_err(sql)?;
            }
            let row = tx
                .query_row(
                    &format!("{TENANT_COLUMNS} WHERE id = ?1"),
                    [&tenant_id],
                    tenant_row,
                )
                .optional()
                .map_err(sql)?;
            tx.commit().map_err(sql)?;
            Ok(row)
        })
        .await
    }

    /// The administrative change counter.
    pub async fn admin_generation(&self) -> Result<i64, StoreError> {
        self.call(|c| {
            c.query_row(
                "SELECT CAST(value AS INTEGER) FROM gateway_meta WHERE key = 'admin_generation'",
                [],
                |r| r.get(0),
            )
        })
        .await
    }

    /// Sets a `gateway_meta` value if it is not set yet; returns the value
    /// now stored.
    pub async fn meta_init(&self, key: &str, value: &str) -> Result<String, StoreError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO gateway_meta (key, value) VALUES (?1, ?2)",
                [&key, &value],
            )?;
            c.query_row(
                "SELECT value FROM gateway_meta WHERE key = ?1",
                [key],
                |r| r.get(0),
            )
        })
        .await
    }
}
