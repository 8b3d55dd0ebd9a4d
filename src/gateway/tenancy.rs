//! Tenants and which one a certificate means (gateway.md §1).
//!
//! | certificate | tenant |
//! |---|---|
//! | SPIFFE URI SAN | the platform tenant |
//! | CN `<id>.<partition>.<slug>.serviceradar` | the tenant with that slug; reserved slugs and unknown slugs are refused |
//! | CN `<id>.<partition>.serviceradar[.suffix]` | the gateway's default tenant |
//!
//! A tenant may be bound to its own intermediate CA (onboarding creates one):
//! then a certificate naming that tenant must chain through that CA, and a
//! certificate issued by a tenant's CA may name no other tenant (nor be a
//! platform or single-tenant identity).
//!
//! The platform tenant gets a random, non-nil UUID on first start, kept in
//! the database. Tenants are cached in memory: a miss reloads them, and the
//! gateway's admin watcher reloads them when the database's administrative
//! generation moves (CLI changes from another process).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use tonic::Status;
use uuid::Uuid;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::{IdentityKind, PeerIdentity};
use super::store::{Store, StoreError, TenantRow};
use crate::clock::unix_secs;

/// Default slug of the platform tenant.
pub const DEFAULT_PLATFORM_SLUG: &str = "platform";
/// Reserved for the operator; no tenant may use it.
pub const OPERATOR_SLUG: &str = "serviceradar-operator";
/// Default slug of the tenant single-tenant certificates belong to.
pub const DEFAULT_TENANT_SLUG: &str = "default";
const MAX_SLUG_BYTES: usize = 63;

/// Tenancy settings from the gateway config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenancySettings {
    pub platform_slug: String,
    /// Pins the platform tenant's id (otherwise random on first start).
    pub platform_tenant_id: Option<Uuid>,
    /// Slug of the tenant single-tenant certificates belong to.
    pub default_tenant: String,
}

impl Default for TenancySettings {
    fn default() -> Self {
        Self {
            platform_slug: DEFAULT_PLATFORM_SLUG.to_owned(),
            platform_tenant_id: None,
            default_tenant: DEFAULT_TENANT_SLUG.to_owned(),
        }
    }
}

impl TenancySettings {
    /// Slugs no (other) tenant may take.
    pub fn is_reserved(&self, slug: &str) -> bool {
        slug == self.platform_slug || slug == OPERATOR_SLUG
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("tenant slug {slug:?}: {reason}")]
    BadSlug { slug: String, reason: String },
    #[error("tenant id {0:?}: the nil UUID is not a tenant id")]
    NilId(String),
    #[error("tenant id {id:?}: {reason}")]
    BadId { id: String, reason: String },
    #[error("{0}")]
    Inconsistent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Slugs: 1–63 bytes of `a-z`, `0-9` and `-`, not starting or ending with
/// `-` (they appear as a DNS-style label in certificate CNs).
pub fn validate_slug(slug: &str) -> Result<(), TenancyError> {
    let bad = |reason: &str| TenancyError::BadSlug {
        slug: slug.to_owned(),
        reason: reason.to_owned(),
    };
    if slug.is_empty() || slug.len() > MAX_SLUG_BYTES {
        return Err(bad("must be 1 to 63 characters"));
    }
    if !slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only lower-case letters, digits and '-' are allowed"));
    }
    if slug.starts_with('-') || slug.ends_with('-') {
        return Err(bad("must not start or end with '-'"));
    }
    Ok(())
}

/// A tenant id: a UUID that is not the nil UUID.
pub fn parse_tenant_id(text: &str) -> Result<Uuid, TenancyError> {
    let id = Uuid::parse_str(text.trim()).map_err(|e| TenancyError::BadId {
        id: text.to_owned(),
        reason: e.to_string(),
    })?;
    if id.is_nil() {
        return Err(TenancyError::NilId(text.to_owned()));
    }
    Ok(id)
}

/// A tenant as the rest of the gateway sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub slug: String,
    pub name: String,
    pub platform: bool,
    /// Bound to its own intermediate CA.
    pub ca_bound: bool,
    pub created_at: i64,
}

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Self {
        Tenant {
            ca_bound: row.ca_cert_pem.is_some(),
            id: row.id,
            slug: row.slug,
            name: row.name,
            platform: row.platform,
            created_at: row.created_at,
        }
    }
}

/// A tenant with its parsed CA, if bound.
struct Entry {
    tenant: Tenant,
    ca: Option<BoundCa>,
}

struct BoundCa {
    cert: CertificateDer<'static>,
    /// The CA's subject, DER: compared with leaf issuers.
    subject: Vec<u8>,
}

impl Entry {
    fn from_row(row: TenantRow) -> Self {
        let ca = row.ca_cert_pem.as_deref().and_then(|pem| {
            let parsed = parse_ca(pem);
            if let Err(e) = &parsed {
                tracing::error!(tenant = %row.slug, "tenant CA unreadable; certificates naming this tenant are refused: {e}");
            }
            parsed.ok()
        });
        Self {
            tenant: Tenant::from(row),
            ca,
        }
    }
}

fn parse_ca(pem: &str) -> Result<BoundCa, String> {
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let subject = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| e.to_string())?
        .1
        .subject()
        .as_raw()
        .to_vec();
    Ok(BoundCa { cert, subject })
}

#[derive(Default)]
struct Cache {
    by_slug: HashMap<String, Arc<Entry>>,
    /// Subject DER of every bound CA → its tenant's slug.
    ca_owner: HashMap<Vec<u8>, String>,
}

impl Cache {
    fn load(rows: Vec<TenantRow>) -> Self {
        let mut cache = Cache::default();
        for row in rows {
            let entry = Arc::new(Entry::from_row(row));
            if let Some(ca) = &entry.ca {
                cache
                    .ca_owner
                    .insert(ca.subject.clone(), entry.tenant.slug.clone());
            }
            cache.by_slug.insert(entry.tenant.slug.clone(), entry);
        }
        cache
    }
}

/// The gateway's tenants.
pub struct Tenants {
    settings: TenancySettings,
    store: Option<Store>,
    cache: RwLock<Cache>,
}

/// Why a certificate's tenant is refused (PERMISSION_DENIED).
fn denied(identity: &PeerIdentity, reason: String) -> Status {
    tracing::warn!(component_id = %identity.component_id, partition = %identity.partition,
        tenant_slug = ?identity.tenant_slug, "tenant refused: {reason}");
    Status::permission_denied(reason)
}

impl Tenants {
    /// Loads the tenants, creating the platform tenant (random id, or the
    /// configured one) and the default tenant on first start.
    pub async fn bootstrap(
        settings: TenancySettings,
        store: Option<Store>,
    ) -> Result<Self, TenancyError> {
        validate_slug(&settings.platform_slug)?;
        validate_slug(&settings.default_tenant)?;
        if let Some(id) = settings.platform_tenant_id.filter(Uuid::is_nil) {
            return Err(TenancyError::NilId(id.to_string()));
        }
        if settings.is_reserved(&settings.default_tenant) {
            return Err(TenancyError::BadSlug {
                slug: settings.default_tenant.clone(),
                reason: "reserved; the default tenant needs another slug".into(),
            });
        }
        let rows = match &store {
            Some(store) => {
                ensure_platform_tenant(store, &settings).await?;
                if store
                    .tenant_by_slug(&settings.default_tenant)
                    .await?
                    .is_none()
                {
                    insert_tenant(
                        store,
                        &settings.default_tenant,
                        "Default tenant",
                        None,
                        false,
                    )
                    .await?;
                }
                store.tenants().await?
            }
            None => {
                let platform_id = settings.platform_tenant_id.unwrap_or_else(Uuid::new_v4);
                tracing::warn!("no database: the platform tenant id is not persisted");
                vec![
                    new_row(&settings.platform_slug, "Platform", platform_id, true),
                    new_row(
                        &settings.default_tenant,
                        "Default tenant",
                        Uuid::new_v4(),
                        false,
                    ),
                ]
            }
        };
        Ok(Self {
            settings,
            store,
            cache: RwLock::new(Cache::load(rows)),
        })
    }

    /// Reloads every tenant from the database.
    pub async fn reload(&self) -> Result<(), StoreError> {
        if let Some(store) = &self.store {
            let cache = Cache::load(store.tenants().await?);
            *self.cache.write().unwrap_or_else(|p| p.into_inner()) = cache;
        }
        Ok(())
    }

    fn cached(&self, slug: &str) -> Option<Arc<Entry>> {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_slug
            .get(slug)
            .cloned()
    }

    async fn entry(&self, slug: &str) -> Option<Arc<Entry>> {
        if let Some(entry) = self.cached(slug) {
            return Some(entry);
        }
        // Perhaps created since (CLI in another process).
        if let Err(e) = self.reload().await {
            tracing::warn!("cannot reload tenants: {e}");
        }
        self.cached(slug)
    }

    pub fn platform(&self) -> Option<Tenant> {
        self.cached(&self.settings.platform_slug)
            .map(|e| e.tenant.clone())
    }

    pub fn default_tenant(&self) -> Option<Tenant> {
        self.cached(&self.settings.default_tenant)
            .map(|e| e.tenant.clone())
    }

    /// Every tenant (cached), platform first.
    pub fn list(&self) -> Vec<Tenant> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Tenant> = cache.by_slug.values().map(|e| e.tenant.clone()).collect();
        all.sort_by(|a, b| (!a.platform, &a.slug).cmp(&(!b.platform, &b.slug)));
        all
    }

    /// A tenant by slug (reloading on a miss).
    pub async fn by_slug(&self, slug: &str) -> Option<Tenant> {
        self.entry(slug).await.map(|e| e.tenant.clone())
    }

    /// The tenant the caller's certificate means. `chain` is the chain the
    /// client presented, leaf first (already verified against the gateway's
    /// trust roots by TLS).
    pub async fn resolve(
        &self,
        identity: &PeerIdentity,
        chain: &[CertificateDer<'_>],
    ) -> Result<Tenant, Status> {
        let slug = match (&identity.kind, &identity.tenant_slug) {
            (IdentityKind::Platform { .. }, _) => self.settings.platform_slug.clone(),
            (IdentityKind::SingleTenant, _) => self.settings.default_tenant.clone(),
            (IdentityKind::TenantEdge, Some(slug)) => {
                if self.settings.is_reserved(slug) {
                    return Err(denied(
                        identity,
                        format!(
                            "tenant slug {slug:?} is reserved; no edge certificate may name it"
                        ),
                    ));
                }
                slug.clone()
            }
            (IdentityKind::TenantEdge, None) => {
                return Err(denied(identity, "tenant certificate without a slug".into()))
            }
        };
        let entry = self
            .entry(&slug)
            .await
            .ok_or_else(|| denied(identity, format!("unknown tenant {slug:?}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        self.check_issuer(identity, &entry, leaf)?;
        if identity.kind == IdentityKind::TenantEdge && entry.tenant.ca_bound {
            let Some(ca) = &entry.ca else {
                return Err(denied(
                    identity,
                    format!("tenant {slug:?}: its CA is unreadable"),
                ));
            };
            verify_client_chain(leaf, &chain[1..], std::slice::from_ref(&ca.cert)).map_err(|e| {
                denied(
                    identity,
                    format!("certificate names tenant {slug:?} but was not issued by that tenant's CA ({e})"),
                )
            })?;
        }
        Ok(entry.tenant.clone())
    }

    /// A certificate issued directly by some tenant's CA may only name that
    /// tenant.
    fn check_issuer(
        &self,
        identity: &PeerIdentity,
        entry: &Entry,
        leaf: &CertificateDer<'_>,
    ) -> Result<(), Status> {
        let issuer = X509Certificate::from_der(leaf.as_ref())
            .map(|(_, cert)| cert.issuer().as_raw().to_vec())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let owner = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ca_owner
            .get(&issuer)
            .cloned();
        match owner {
            Some(owner) if owner != entry.tenant.slug || identity.kind != IdentityKind::TenantEdge => {
                Err(denied(
                    identity,
                    format!(
                        "certificate issued by tenant {owner:?}'s CA may only identify agents of tenant {owner:?}"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Path validation of a client certificate from `leaf`, through
/// `intermediates`, to one of `anchors` (used for tenant CAs here and for the
/// onboarding CA's chain to the gateway's trust root).
pub(crate) fn verify_client_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    anchors: &[CertificateDer<'_>],
) -> Result<(), String> {
    // A bundle may hold certificates that are no usable anchor; skip them.
    let anchors: Vec<_> = anchors
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    if anchors.is_empty() {
        return Err("no usable trust anchor".into());
    }
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|e| e.to_string())?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn new_row(slug: &str, name: &str, id: Uuid, platform: bool) -> TenantRow {
    TenantRow {
        id: id.to_string(),
        slug: slug.to_owned(),
        name: name.to_owned(),
        platform,
        ca_cert_pem: None,
        ca_key_sealed: None,
        created_at: unix_secs(),
    }
}

/// Creates a tenant row; `id` defaults to a random UUID.
pub async fn insert_tenant(
    store: &Store,
    slug: &str,
    name: &str,
    id: Option<Uuid>,
    platform: bool,
) -> Result<Tenant, TenancyError> {
    validate_slug(slug)?;
    let id = id.unwrap_or_else(Uuid::new_v4);
    if id.is_nil() {
        return Err(TenancyError::NilId(id.to_string()));
    }
    let row = new_row(slug, name, id, platform);
    store.insert_tenant(row.clone()).await?;
    Ok(Tenant::from(row))
}

async fn ensure_platform_tenant(
    store: &Store,
    settings: &TenancySettings,
) -> Result<(), TenancyError> {
    match store.platform_tenant().await? {
        Some(platform) => {
            let id = parse_tenant_id(&platform.id).map_err(|e| {
                TenancyError::Inconsistent(format!(
                    "database {}: platform tenant: {e}",
                    store.location()
                ))
            })?;
            if let Some(configured) = settings.platform_tenant_id {
                if configured != id {
                    return Err(TenancyError::Inconsistent(format!(
                        "platform_tenant_id {configured} in the config differs from the platform tenant {id} in {}",
                        store.location()
                    )));
                }
            }
            if platform.slug != settings.platform_slug {
                return Err(TenancyError::Inconsistent(format!(
                    "platform_tenant_slug {:?} in the config differs from the platform tenant's slug {:?} in {}",
                    settings.platform_slug,
                    platform.slug,
                    store.location()
                )));
            }
        }
        None => {
            if store
                .tenant_by_slug(&settings.platform_slug)
                .await?
                .is_some()
            {
                return Err(TenancyError::Inconsistent(format!(
                    "slug {:?} is taken by a tenant that is not the platform tenant",
                    settings.platform_slug
                )));
            }
            let tenant = insert_tenant(
                store,
                &settings.platform_slug,
                "Platform",
                settings.platform_tenant_id,
                true,
            )
            .await?;
            tracing::info!(id = %tenant.id, slug = %tenant.slug, "platform tenant created");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::store::testing;

    #[test]
    fn slugs_and_ids() {
        for ok in ["acme", "a", "acme-2", &"a".repeat(63)] {
            assert!(validate_slug(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Acme", "a.b", "-a", "a-", "a b", &"a".repeat(64), "ä"] {
            assert!(validate_slug(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_tenant_id("00000000-0000-0000-0000-000000000000"),
            Err(TenancyError::NilId(_))
        ));
        assert!(parse_tenant_id("not-a-uuid").is_err());
        assert!(parse_tenant_id(&Uuid::new_v4().to_string()).is_ok());
        let settings = TenancySettings::default();
        assert!(settings.is_reserved("platform") && settings.is_reserved(OPERATOR_SLUG));
        assert!(!settings.is_reserved("acme"));
    }

    #[tokio::test]
    async fn the_platform_tenant_id_is_random_and_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        for location in testing::fresh_locations(dir.path(), "platform").await {
            platform_id_is_kept(&location).await;
        }
    }

    async fn platform_id_is_kept(path: &crate::gateway::DatabaseLocation) {
        let first = Tenants::bootstrap(TenancySettings::default(), Some(testing::open(path).await))
            .await
            .unwrap();
        let platform = first.platform().unwrap();
        assert!(!parse_tenant_id(&platform.id).unwrap().is_nil());
        assert!(first.default_tenant().is_some());
        drop(first);
        let again = Tenants::bootstrap(TenancySettings::default(), Some(testing::open(path).await))
            .await
            .unwrap();
        assert_eq!(again.platform().unwrap().id, platform.id);

        // A different configured id is an error, not a silent second tenant.
        let pinned = TenancySettings {
            platform_tenant_id: Some(Uuid::new_v4()),
            ..TenancySettings::default()
        };
        let err = Tenants::bootstrap(pinned, Some(testing::open(path).await))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("platform_tenant_id"), "{err}");
    }

    #[tokio::test]
    async fn a_configured_platform_id_is_used_on_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let settings = TenancySettings {
            platform_tenant_id: Some(id),
            ..TenancySettings::default()
        };
        for location in testing::fresh_locations(dir.path(), "pinned").await {
            let tenants =
                Tenants::bootstrap(settings.clone(), Some(testing::open(&location).await))
                    .await
                    .unwrap();
            assert_eq!(tenants.platform().unwrap().id, id.to_string(), "{location}");
        }
    }
}
