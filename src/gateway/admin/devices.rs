//! Canonical devices of a tenant (DIRE, gateway.md §5) for administrators:
//! listing with filters, one device with its identifiers and merge audit,
//! and undoing the latest merge into a device.
//!
//! Every operation names a tenant by slug and never reveals another
//! tenant's device: a device id of another tenant is "not found", exactly
//! like an id that does not exist.

use std::net::IpAddr;

use serde::Serialize;

use super::{Admin, AdminError};
use crate::gateway::dire::CanonicalDevice;
use crate::gateway::store::{DeviceFilter, MergeRow};
use crate::gateway::tenancy::Tenant;

/// Page size of a device listing when none is given, and its upper bound.
pub const DEFAULT_DEVICE_LIMIT: usize = 100;
pub const MAX_DEVICE_LIMIT: usize = 10_000;

/// Which canonical devices of a tenant to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    /// Tenant slug.
    pub tenant: String,
    pub partition: Option<String>,
    /// Devices reported by this source (the `source` of the updates:
    /// `armis`, `netbox`, `faker`, …).
    pub source: Option<String>,
    /// Devices currently holding this IP address (any notation).
    pub ip: Option<String>,
    /// Also list devices merged into others (kept so merges can be undone).
    pub include_merged: bool,
    /// Page size, [`DEFAULT_DEVICE_LIMIT`] when `None`; 1 to
    /// [`MAX_DEVICE_LIMIT`].
    pub limit: Option<usize>,
    pub offset: usize,
}

impl DeviceQuery {
    /// Every live device of `tenant`, first page.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            ..Self::default()
        }
    }
}

/// A canonical device as administrators see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: CanonicalDevice,
    pub tenant_slug: String,
}

/// An audited merge as administrators see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MergeView {
    #[serde(flatten)]
    pub merge: MergeRow,
    pub tenant_slug: String,
}

/// One device with its merges (as survivor or as merged), newest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceDetail {
    pub device: DeviceView,
    pub merges: Vec<MergeView>,
}

/// What an unmerge did: the merge now marked undone, the device that came
/// back, and the survivor without what the other had brought.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnmergeView {
    pub undone: MergeView,
    pub restored: DeviceView,
    pub survivor: DeviceView,
}

/// A filter value: trimmed, absent when empty.
fn given(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl Admin {
    /// A tenant's canonical devices matching `query`, by (partition, id),
    /// with their identifiers.
    pub async fn devices(&self, query: &DeviceQuery) -> Result<Vec<DeviceView>, AdminError> {
        let limit = query.limit.unwrap_or(DEFAULT_DEVICE_LIMIT);
        if !(1..=MAX_DEVICE_LIMIT).contains(&limit) {
            return Err(AdminError::Invalid(format!(
                "device listing: limit must be between 1 and {MAX_DEVICE_LIMIT}, got {limit}"
            )));
        }
        // Stored IPs are in their canonical text form (as ingestion parses
        // them), so the filter is too.
        let ip = match given(query.ip.as_deref()) {
            Some(text) => Some(
                text.parse::<IpAddr>()
                    .map_err(|_| {
                        AdminError::Invalid(format!(
                            "device listing: ip filter {text:?} is not an IP address"
                        ))
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let tenant = self.tenant(&query.tenant).await?;
        let filter = DeviceFilter {
            tenant: Some(tenant.id.clone()),
            partition: given(query.partition.as_deref()),
            source: given(query.source.as_deref()),
            ip,
            include_merged: query.include_merged,
            limit,
            offset: query.offset,
        };
        Ok(self
            .store
            .canonical_devices(filter)
            .await?
            .into_iter()
            .map(|device| view(&tenant, device))
            .collect())
    }

    /// One device of `tenant` (merged ones too), with its merges.
    pub async fn device(&self, tenant: &str, id: &str) -> Result<DeviceDetail, AdminError> {
        let tenant = self.tenant(tenant).await?;
        let device = self.tenant_device(&tenant, id).await?;
        let merges = self.merges(&tenant, &device.id).await?;
        Ok(DeviceDetail {
            device: view(&tenant, device),
            merges,
        })
    }

    /// The merges a device of `tenant` took part in, newest first.
    pub async fn device_merges(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Vec<MergeView>, AdminError> {
        let tenant = self.tenant(tenant).await?;
        let device = self.tenant_device(&tenant, id).await?;
        self.merges(&tenant, &device.id).await
    }

    /// Reverses the latest merge into a device of `tenant` that is not
    /// undone yet (gateway.md §5: every merge can be undone).
    pub async fn device_unmerge(&self, tenant: &str, id: &str) -> Result<UnmergeView, AdminError> {
        let tenant = self.tenant(tenant).await?;
        let device = self.tenant_device(&tenant, id).await?;
        let Some(undone) = self.store.unmerge(&device.id).await? else {
            let why = match &device.merged_into {
                Some(survivor) => format!(
                    "it was itself merged into {survivor}: unmerge that device to bring it back"
                ),
                None => "no merge into it is left to undo".to_owned(),
            };
            return Err(AdminError::NotFound(format!(
                "nothing to unmerge for device {} of tenant {:?}: {why}",
                device.id, tenant.slug
            )));
        };
        tracing::info!(tenant = %tenant.slug, survivor = %undone.into_device,
            restored = %undone.from_device, merge = undone.id, "device merge undone");
        let restored = self
            .existing(&tenant, &undone.from_device, "restored")
            .await?;
        let survivor = self
            .existing(&tenant, &undone.into_device, "surviving")
            .await?;
        Ok(UnmergeView {
            undone: MergeView {
                merge: undone,
                tenant_slug: tenant.slug.clone(),
            },
            restored: view(&tenant, restored),
            survivor: view(&tenant, survivor),
        })
    }

    /// The device `id` if it belongs to `tenant`; any other is not found.
    async fn tenant_device(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<CanonicalDevice, AdminError> {
        let id = id.trim();
        match self.store.canonical_device(id).await? {
            Some(device) if device.tenant == tenant.id => Ok(device),
            // Another tenant's device is reported exactly like a missing one.
            _ => Err(AdminError::NotFound(format!(
                "tenant {:?} has no device {id:?} (ids look like sr:<uuid>; \
                 `gateway devices list --tenant {}` lists them)",
                tenant.slug, tenant.slug
            ))),
        }
    }

    /// A device an unmerge just wrote; its absence is a broken store.
    async fn existing(
        &self,
        tenant: &Tenant,
        id: &str,
        role: &str,
    ) -> Result<CanonicalDevice, AdminError> {
        self.store.canonical_device(id).await?.ok_or_else(|| {
            AdminError::Internal(format!(
                "after unmerge in tenant {:?}: the {role} device {id} is missing from {}",
                tenant.slug,
                self.store.location()
            ))
        })
    }

    async fn merges(&self, tenant: &Tenant, device: &str) -> Result<Vec<MergeView>, AdminError> {
        Ok(self
            .store
            .merges_of(device)
            .await?
            .into_iter()
            // Merges never cross tenants; the filter keeps it so.
            .filter(|m| m.tenant == tenant.id)
            .map(|merge| MergeView {
                merge,
                tenant_slug: tenant.slug.clone(),
            })
            .collect())
    }
}

fn view(tenant: &Tenant, device: CanonicalDevice) -> DeviceView {
    DeviceView {
        device,
        tenant_slug: tenant.slug.clone(),
    }
}
