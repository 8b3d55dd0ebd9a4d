//! Administration of tenants, agents, integration sources (gateway.md §1–3)
//! and canonical devices (§5, in [`devices`]): one set of operations behind
//! both the CLI (`serviceradar-agent gateway --config F
//! tenant|agent|source|devices …`, which opens the database directly) and
//! the HTTP admin API of a running gateway.
//!
//! The rules live here, so both doors enforce them:
//! - sync never runs in the platform tenant;
//! - a source can be created only when its tenant has a sync-capable agent,
//!   and assigned only to a sync-capable agent of the same tenant;
//! - an unassigned source runs nowhere;
//! - credentials are sealed before they reach the database and never leave
//!   this module again except inside an agent's config.
//!
//! Every configuration change bumps the database's administrative
//! generation; a running gateway notices it (at once for its own API, within
//! a couple of seconds for the CLI) and pushes the new config to connected
//! agents. Undoing a device merge changes no configuration.

pub mod devices;
pub mod http;
pub mod onboarding;

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Notify;

use super::integrations::{
    config_of, open_credentials, seal_credentials, Credentials, SourceConfig, SourcePatch,
    SourceSpec, SpecError,
};
use super::registry::AgentRecord;
use super::secrets::{CredentialKey, SecretsError};
use super::store::{SourceRef, SourceRow, SourceStatus, Store, StoreError};
use super::tenancy::{self, TenancyError, TenancySettings, Tenant};
use crate::clock::unix_secs;

pub use devices::{
    DeviceDetail, DeviceQuery, DeviceView, MergeView, UnmergeView, DEFAULT_DEVICE_LIMIT,
    MAX_DEVICE_LIMIT,
};
pub use onboarding::{write_bundle, OnboardRequest, OnboardingBundle, OnboardingSettings};

/// Why an administrative operation was refused. Each variant maps to one
/// HTTP status in the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 400
    #[error("{0}")]
    Invalid(String),
    /// 422: the operation needs a sync-capable agent first.
    #[error("{0}")]
    NeedsSyncAgent(String),
    /// 403
    #[error("{0}")]
    Forbidden(String),
    /// 500
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => AdminError::Conflict(message),
            other => AdminError::Internal(other.to_string()),
        }
    }
}

impl From<SpecError> for AdminError {
    fn from(e: SpecError) -> Self {
        AdminError::Invalid(e.to_string())
    }
}

impl From<SecretsError> for AdminError {
    fn from(e: SecretsError) -> Self {
        AdminError::Internal(e.to_string())
    }
}

impl From<TenancyError> for AdminError {
    fn from(e: TenancyError) -> Self {
        match e {
            TenancyError::Store(e) => e.into(),
            other => AdminError::Invalid(other.to_string()),
        }
    }
}

/// A registered agent as administrators see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentView {
    #[serde(flatten)]
    pub agent: AgentRecord,
    pub tenant_slug: String,
    pub online: bool,
    pub sync_capable: bool,
}

/// A source as administrators see it: configuration, credential names (not
/// values) and status.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceView {
    #[serde(flatten)]
    pub source: SourceRow,
    pub tenant_slug: String,
    /// `status`, or `unassigned`, `disabled`, or `offline` when the assigned
    /// agent has not been heard from for five minutes (gateway.md §2).
    pub sync_state: String,
}

/// The administrative operations over one gateway database.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    key: Arc<CredentialKey>,
    tenancy: TenancySettings,
    /// Wakes the running gateway's config watcher after a change.
    changed: Option<Arc<Notify>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Admin {
    pub fn new(store: Store, key: Arc<CredentialKey>, tenancy: TenancySettings) -> Self {
        Self {
            store,
            key,
            tenancy,
            changed: None,
        }
    }

    /// Signals `notify` after every change (the running gateway's watcher).
    pub fn with_change_signal(mut self, notify: Arc<Notify>) -> Self {
        self.changed = Some(notify);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn key(&self) -> &Arc<CredentialKey> {
        &self.key
    }

    fn changed(&self) {
        if let Some(notify) = &self.changed {
            notify.notify_one();
        }
    }

    // ---- tenants -------------------------------------------------------

    /// Adds a tenant. Reserved slugs and the nil UUID are refused.
    pub async fn tenant_add(
        &self,
        slug: &str,
        name: Option<&str>,
        id: Option<&str>,
    ) -> Result<Tenant, AdminError> {
        let slug = slug.trim();
        tenancy::validate_slug(slug)?;
        if self.tenancy.is_reserved(slug) {
            return Err(AdminError::Forbidden(format!(
                "tenant slug {slug:?} is reserved ({:?} and {:?} are)",
                self.tenancy.platform_slug,
                tenancy::OPERATOR_SLUG
            )));
        }
        let id = id.map(tenancy::parse_tenant_id).transpose()?;
        let name = name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(slug);
        let tenant = tenancy::insert_tenant(&self.store, slug, name, id, false).await?;
        self.changed();
        Ok(tenant)
    }

    pub async fn tenant_list(&self) -> Result<Vec<Tenant>, AdminError> {
        Ok(self
            .store
            .tenants()
            .await?
            .into_iter()
            .map(Tenant::from)
            .collect())
    }

    /// A tenant by slug; the error says how to create it.
    pub async fn tenant(&self, slug: &str) -> Result<Tenant, AdminError> {
        self.store
            .tenant_by_slug(slug.trim())
            .await?
            .map(Tenant::from)
            .ok_or_else(|| {
                AdminError::NotFound(format!(
                    "no tenant {slug:?} (create it with `gateway tenant add {slug}`)"
                ))
            })
    }

    /// A tenant that may hold integration sources (not the platform tenant).
    async fn sync_tenant(&self, slug: &str) -> Result<Tenant, AdminError> {
        let tenant = self.tenant(slug).await?;
        if tenant.platform {
            return Err(AdminError::Forbidden(format!(
                "tenant {slug:?} is the platform tenant: integrations run in tenants, never as a platform service"
            )));
        }
        Ok(tenant)
    }

    // ---- agents --------------------------------------------------------

    /// Registered agents, of one tenant or all.
    pub async fn agent_list(&self, tenant: Option<&str>) -> Result<Vec<AgentView>, AdminError> {
        let tenants = self.store.tenants().await?;
        let filter = match tenant {
            Some(slug) => Some(self.tenant(slug).await?.id),
            None => None,
        };
        let now = unix_secs();
        Ok(self
            .store
            .agents()
            .await?
            .into_iter()
            .filter(|a| filter.as_ref().is_none_or(|id| *id == a.tenant))
            .map(|agent| AgentView {
                tenant_slug: tenants
                    .iter()
                    .find(|t| t.id == agent.tenant)
                    .map(|t| t.slug.clone())
                    .unwrap_or_else(|| agent.tenant.clone()),
                online: agent.online(now),
                sync_capable: agent.sync_capable(),
                agent,
            })
            .collect())
    }

    /// Checks that `agent_id` is a sync-capable agent of `tenant`.
    async fn check_assignable(&self, tenant: &Tenant, agent_id: &str) -> Result<(), AdminError> {
        let agents = self.store.agents().await?;
        match agents
            .iter()
            .find(|a| a.tenant == tenant.id && a.agent_id == agent_id)
        {
            Some(agent) if agent.sync_capable() => Ok(()),
            Some(_) => Err(AdminError::NeedsSyncAgent(format!(
                "agent {agent_id:?} of tenant {:?} does not advertise the `sync` capability",
                tenant.slug
            ))),
            None => Err(AdminError::NeedsSyncAgent(format!(
                "tenant {:?} has no agent {agent_id:?}: an agent must be onboarded \
                 (`gateway onboard-agent --tenant {} --agent {agent_id} …`) and connect before sources are assigned to it",
                tenant.slug, tenant.slug
            ))),
        }
    }

    async fn require_sync_agent(&self, tenant: &Tenant) -> Result<(), AdminError> {
        let agents = self.store.agents().await?;
        if agents
            .iter()
            .any(|a| a.tenant == tenant.id && a.sync_capable())
        {
            return Ok(());
        }
        Err(AdminError::NeedsSyncAgent(format!(
            "tenant {:?} has no sync-capable agent: an agent must be onboarded first \
             (`gateway onboard-agent --tenant {} --agent <id> --partition <p> --out <dir>`) and connect once",
            tenant.slug, tenant.slug
        )))
    }

    // ---- sources -------------------------------------------------------

    async fn view(&self, tenant: &Tenant, source: SourceRow) -> Result<SourceView, AdminError> {
        let agents = self.store.agents().await?;
        let now = unix_secs();
        let sync_state = match &source.agent_id {
            _ if !source.enabled => "disabled".to_owned(),
            None => "unassigned".to_owned(),
            Some(agent_id) => {
                let online = agents
                    .iter()
                    .find(|a| a.tenant == tenant.id && a.agent_id == *agent_id)
                    .is_some_and(|a| a.online(now));
                if online {
                    source.status.status.clone()
                } else {
                    "offline".to_owned()
                }
            }
        };
        Ok(SourceView {
            source,
            tenant_slug: tenant.slug.clone(),
            sync_state,
        })
    }

    /// A tenant's source by id or name.
    async fn find_source(&self, tenant: &Tenant, which: &str) -> Result<SourceRow, AdminError> {
        let which = which.trim();
        if let Some(row) = self
            .store
            .source(&tenant.id, &SourceRef::Id(which.to_owned()))
            .await?
        {
            return Ok(row);
        }
        self.store
            .source(&tenant.id, &SourceRef::Name(which.to_owned()))
            .await?
            .ok_or_else(|| {
                AdminError::NotFound(format!("tenant {:?} has no source {which:?}", tenant.slug))
            })
    }

    /// Creates a source (gateway.md §3 rules).
    pub async fn source_add(
        &self,
        tenant: &str,
        spec: SourceSpec,
    ) -> Result<SourceView, AdminError> {
        let tenant = self.sync_tenant(tenant).await?;
        let agent_id = spec
            .agent_id
            .clone()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty());
        let (config, credentials) = spec.into_config()?;
        self.require_sync_agent(&tenant).await?;
        if let Some(agent_id) = &agent_id {
            self.check_assignable(&tenant, agent_id).await?;
        }
        let now = unix_secs();
        let id = uuid::Uuid::new_v4().to_string();
        let row = self.row(&tenant, id, config, &credentials, agent_id, now, now)?;
        self.store.save_source(row.clone()).await?;
        self.changed();
        tracing::info!(tenant = %tenant.slug, source = %row.name, id = %row.id, "integration source created");
        self.view(&tenant, row).await
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        tenant: &Tenant,
        id: String,
        config: SourceConfig,
        credentials: &Credentials,
        agent_id: Option<String>,
        created_at: i64,
        updated_at: i64,
    ) -> Result<SourceRow, AdminError> {
        let credentials_sealed = seal_credentials(&self.key, &id, credentials)?;
        Ok(SourceRow {
            id,
            tenant: tenant.id.clone(),
            name: config.name,
            source_type: config.source_type,
            endpoint: config.endpoint,
            enabled: config.enabled,
            agent_id,
            partition: config.partition,
            poll_interval: config.poll_interval,
            discovery_interval: config.discovery_interval,
            page_size: config.page_size,
            queries: config.queries,
            network_blacklist: config.network_blacklist,
            settings: config.settings,
            credentials_sealed,
            credential_keys: credentials.0.keys().cloned().collect(),
            status: SourceStatus {
                status: "idle".to_owned(),
                ..SourceStatus::default()
            },
            created_at,
            updated_at,
        })
    }

    /// Sources of one tenant, or of all tenants.
    pub async fn source_list(&self, tenant: Option<&str>) -> Result<Vec<SourceView>, AdminError> {
        let tenants: Vec<Tenant> = match tenant {
            Some(slug) => vec![self.tenant(slug).await?],
            None => self.tenant_list().await?,
        };
        let mut out = Vec::new();
        for tenant in &tenants {
            for row in self.store.sources(Some(&tenant.id)).await? {
                out.push(self.view(tenant, row).await?);
            }
        }
        Ok(out)
    }

    pub async fn source_show(&self, tenant: &str, source: &str) -> Result<SourceView, AdminError> {
        let tenant = self.tenant(tenant).await?;
        let row = self.find_source(&tenant, source).await?;
        self.view(&tenant, row).await
    }

    /// Changes a source's configuration and/or credentials.
    pub async fn source_update(
        &self,
        tenant: &str,
        source: &str,
        patch: SourcePatch,
    ) -> Result<SourceView, AdminError> {
        let tenant = self.sync_tenant(tenant).await?;
        let row = self.find_source(&tenant, source).await?;
        let credentials = open_credentials(&self.key, &row)?;
        let (config, credentials) = patch.apply(config_of(&row), credentials)?;
        let mut updated = self.row(
            &tenant,
            row.id.clone(),
            config,
            &credentials,
            row.agent_id.clone(),
            row.created_at,
            unix_secs(),
        )?;
        updated.status = row.status;
        self.store.save_source(updated.clone()).await?;
        self.changed();
        self.view(&tenant, updated).await
    }

    pub async fn source_set_enabled(
        &self,
        tenant: &str,
        source: &str,
        enabled: bool,
    ) -> Result<SourceView, AdminError> {
        let patch = SourcePatch {
            enabled: Some(enabled),
            ..SourcePatch::default()
        };
        self.source_update(tenant, source, patch).await
    }

    /// Assigns a source to an agent of its tenant, or unassigns it (`None`).
    pub async fn source_assign(
        &self,
        tenant: &str,
        source: &str,
        agent_id: Option<&str>,
    ) -> Result<SourceView, AdminError> {
        let tenant = self.sync_tenant(tenant).await?;
        let mut row = self.find_source(&tenant, source).await?;
        let agent_id = agent_id.map(str::trim).filter(|a| !a.is_empty());
        if let Some(agent_id) = agent_id {
            self.check_assignable(&tenant, agent_id).await?;
        }
        row.agent_id = agent_id.map(str::to_owned);
        row.updated_at = unix_secs();
        self.store.save_source(row.clone()).await?;
        self.changed();
        self.view(&tenant, row).await
    }

    pub async fn source_delete(&self, tenant: &str, source: &str) -> Result<(), AdminError> {
        let tenant = self.tenant(tenant).await?;
        let row = self.find_source(&tenant, source).await?;
        self.store.delete_source(&tenant.id, &row.id).await?;
        self.changed();
        tracing::info!(tenant = %tenant.slug, source = %row.name, "integration source deleted");
        Ok(())
    }
}
