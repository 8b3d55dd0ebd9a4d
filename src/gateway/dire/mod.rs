//! DIRE — device identity reconciliation (gateway.md §5): many sightings from
//! many sources become one canonical device per real device, scoped by
//! (tenant, partition), surviving DHCP churn.
//!
//! - this module: identifiers and their priority, MAC normalisation,
//!   deterministic canonical ids, and what one update contributes
//!   ([`Sighting`]);
//! - [`reconcile`]: the resolution rules, written once against the
//!   [`reconcile::DeviceIndex`] trait that each storage backend implements.
//!
//! Identifiers, strongest first: `armis_device_id`, `integration_id` +
//! `integration_type`, `netbox_device_id`, MAC. A MAC with the locally
//! administered bit (0x02 of the first octet) is only medium confidence: it
//! identifies a device only when the update carries nothing stronger. The IP
//! is an attribute, never an identity.

pub mod reconcile;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::sources::armis::mapping::parse_mac;

/// Namespace of canonical ids: `sr:` + UUIDv5(namespace, scope ‖ identifier).
const CANONICAL_NAMESPACE: Uuid = Uuid::from_u128(0x5e2f_1d0c_7a1b_4c3e_9f20_3d4c_5b6a_7e8f);

/// Kinds of strong identifier, in priority order (lowest value first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdKind {
    Armis,
    Integration,
    Netbox,
    Mac,
}

impl IdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Armis => "armis",
            IdKind::Integration => "integration",
            IdKind::Netbox => "netbox",
            IdKind::Mac => "mac",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            IdKind::Armis,
            IdKind::Integration,
            IdKind::Netbox,
            IdKind::Mac,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// One strong identifier. `Integration` values are `<type>:<id>`; MACs are
/// 12 upper-case hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdKind,
    pub value: String,
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.value)
    }
}

impl Identifier {
    pub fn new(kind: IdKind, value: impl Into<String>) -> Self {
        Self {
            kind,
            value: value.into(),
        }
    }

    /// A MAC in any common notation, normalised; `None` if it is not one
    /// (or is a placeholder such as all zeros).
    pub fn mac(raw: &str) -> Option<Self> {
        parse_mac(raw).map(|bytes| Self::new(IdKind::Mac, hex::encode_upper(bytes)))
    }

    pub fn is_mac(&self) -> bool {
        self.kind == IdKind::Mac
    }

    /// A locally administered MAC (bit 0x02 of the first octet): assigned by
    /// software (VMs, phones' private addresses), often reused.
    pub fn is_medium_confidence(&self) -> bool {
        self.is_mac()
            && u8::from_str_radix(self.value.get(..2).unwrap_or("00"), 16)
                .is_ok_and(|octet| octet & 0x02 != 0)
    }
}

/// The identifiers of one update, strongest first, without duplicates.
/// Metadata values may be strings or numbers (as ingestion accepts them).
pub fn identifiers_of(metadata: &Map<String, Value>, mac: Option<&str>) -> Vec<Identifier> {
    let text = |key: &str| -> Option<String> {
        match metadata.get(key)? {
            Value::String(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut ids = Vec::with_capacity(4);
    if let Some(armis) = text("armis_device_id") {
        ids.push(Identifier::new(IdKind::Armis, armis));
    }
    if let Some(id) = text("integration_id") {
        let kind = text("integration_type").unwrap_or_default();
        ids.push(Identifier::new(IdKind::Integration, format!("{kind}:{id}")));
    }
    if let Some(netbox) = text("netbox_device_id") {
        ids.push(Identifier::new(IdKind::Netbox, netbox));
    }
    if let Some(mac) = mac.and_then(Identifier::mac) {
        ids.push(mac);
    }
    ids
}

/// The canonical id of a device first seen with `identifier` (or, without
/// one, at `ip`) in (tenant, partition): the same inputs give the same id on
/// every gateway and every backend.
pub fn canonical_id(
    tenant: &str,
    partition: &str,
    identifier: Option<&Identifier>,
    ip: &str,
) -> String {
    let name = match identifier {
        Some(id) => format!("{tenant}\u{0}{partition}\u{0}{id}"),
        None => format!("{tenant}\u{0}{partition}\u{0}ip:{ip}"),
    };
    format!("sr:{}", Uuid::new_v5(&CANONICAL_NAMESPACE, name.as_bytes()))
}

/// What one accepted update says about a device.
#[derive(Clone, Debug, PartialEq)]
pub struct Sighting {
    pub identifiers: Vec<Identifier>,
    pub ip: Option<String>,
    /// Upper-case colon form, as on the wire.
    pub mac: Option<String>,
    pub hostname: Option<String>,
    pub source: String,
    pub metadata: Map<String, Value>,
}

impl Sighting {
    /// The total order a run is reconciled in (see [`reconcile::order`]).
    pub(crate) fn tie_cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.tie_key().cmp(&other.tie_key())
    }

    /// The sighting an agent's update becomes once ingested (used by
    /// benchmarks and tests that generate updates without a gateway).
    pub fn from_update(update: &crate::device::DeviceUpdate) -> Self {
        let metadata: Map<String, Value> = update
            .metadata
            .iter()
            .filter(|(k, _)| k.as_ref() != "agent_id")
            .map(|(k, v)| (k.to_string(), Value::String(v.clone())))
            .collect();
        Self {
            identifiers: identifiers_of(&metadata, update.mac.as_deref()),
            ip: update
                .ip
                .parse::<std::net::IpAddr>()
                .ok()
                .map(|ip| ip.to_string()),
            mac: update.mac.clone(),
            hostname: update.hostname.clone(),
            source: update.source.clone(),
            metadata,
        }
    }

    /// The order in which a run's sightings are reconciled: by strongest
    /// identifier, then IP. Sorting first makes the outcome independent of
    /// chunk order and batch size.
    pub fn order_key(&self) -> (Option<&Identifier>, Option<&str>) {
        (self.identifiers.first(), self.ip.as_deref())
    }

    /// Everything else, for sightings with equal [`Self::order_key`]s.
    fn tie_key(&self) -> (&[Identifier], Option<&str>, Option<&str>, &str, String) {
        (
            &self.identifiers,
            self.mac.as_deref(),
            self.hostname.as_deref(),
            &self.source,
            // Serialising a map of JSON values cannot fail.
            serde_json::to_string(&self.metadata).unwrap_or_default(),
        )
    }
}

/// A canonical device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CanonicalDevice {
    pub id: String,
    pub tenant: String,
    pub partition: String,
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub hostname: Option<String>,
    /// Sources that have reported it.
    pub sources: Vec<String>,
    /// The latest metadata from each source.
    pub metadata: BTreeMap<String, Map<String, Value>>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub last_run_id: String,
    /// Set when merged into another device (kept so a merge can be undone).
    pub merged_into: Option<String>,
    pub identifiers: Vec<Identifier>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_come_strongest_first_and_macs_are_normalised() {
        let metadata = json!({"netbox_device_id": 7, "integration_id": "i-1", "integration_type": "faker",
            "armis_device_id": " 42 ", "agent_id": "ignored"});
        let ids = identifiers_of(metadata.as_object().unwrap(), Some("aa-bb-cc-dd-ee-01"));
        assert_eq!(
            ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "armis:42",
                "integration:faker:i-1",
                "netbox:7",
                "mac:AABBCCDDEE01"
            ]
        );
        assert!(identifiers_of(&Map::new(), Some("00:00:00:00:00:00")).is_empty());
        assert!(identifiers_of(
            &json!({"armis_device_id": ""}).as_object().unwrap().clone(),
            None
        )
        .is_empty());
    }

    #[test]
    fn locally_administered_macs_are_medium_confidence() {
        assert!(Identifier::mac("02:00:00:00:00:01")
            .unwrap()
            .is_medium_confidence());
        assert!(Identifier::mac("DA:A1:19:00:00:01")
            .unwrap()
            .is_medium_confidence());
        assert!(!Identifier::mac("00:1A:2B:3C:4D:5E")
            .unwrap()
            .is_medium_confidence());
        assert!(!Identifier::new(IdKind::Armis, "02").is_medium_confidence());
    }

    #[test]
    fn canonical_ids_are_deterministic_and_scoped() {
        let id = Identifier::new(IdKind::Armis, "42");
        let a = canonical_id("t1", "p", Some(&id), "10.0.0.1");
        assert_eq!(a, canonical_id("t1", "p", Some(&id), "10.9.9.9"));
        assert!(a.starts_with("sr:"));
        assert_ne!(a, canonical_id("t2", "p", Some(&id), "10.0.0.1"));
        assert_ne!(a, canonical_id("t1", "q", Some(&id), "10.0.0.1"));
        assert_ne!(
            canonical_id("t1", "p", None, "10.0.0.1"),
            canonical_id("t1", "p", None, "10.0.0.2")
        );
    }
}
