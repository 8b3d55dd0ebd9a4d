//! The NetBox device object (`GET /api/dcim/devices/`) and its mapping to a
//! [`DeviceUpdate`](crate::device::DeviceUpdate) (sources.md "NetBox").
//!
//! # Rules
//!
//! - `ip`: the address of `primary_ip4` without its prefix length
//!   (`"10.10.0.2/24"` → `10.10.0.2`); a device without one uses
//!   `primary_ip6` (ServiceRadar skips IPv6-only devices, we keep them), then
//!   `primary_ip` (NetBox's own "v4 else v6", useful when a `fields=` list
//!   only asks for it). An address that does not parse, or is unspecified
//!   (`0.0.0.0`, `::`), does not count. No usable primary address ⇒
//!   [`Mapped::NoIp`] (an address on an interface is not a primary address).
//!   The `network_blacklist` applies to the chosen address only.
//! - `hostname` = `name` (NetBox allows unnamed devices: then none); no `mac`
//!   (a device's MACs live on its interfaces, not in the device object).
//! - `metadata`, always: `integration_type` = `netbox`; `integration_id` and
//!   `netbox_device_id` = the decimal NetBox id (when the object has one).
//!   When present and non-blank (values are trimmed):
//!
//!   | key | NetBox field |
//!   |---|---|
//!   | `role` | `role.name` (NetBox < 3.6: `device_role.name`) |
//!   | `site` | `site.name` |
//!   | `tenant` | `tenant.name` |
//!   | `manufacturer` | `device_type.manufacturer.name` |
//!   | `model` | `device_type.model` |
//!   | `platform` | `platform.name` |
//!   | `serial` | `serial` |
//!   | `status` | `status.value` (`active`, `offline`, …; the machine value, not the label) |
//!   | `netbox_tags` | every tag's `name`, comma-joined |
//!
//!   ServiceRadar's Go integration (`pkg/sync/integrations/netbox/netbox.go`,
//!   `processDevices`) writes `integration_type`, `integration_id`,
//!   `netbox_device_id`, `role` = `role.name` and `site` = `site.name`; the
//!   other keys are ours and follow the same choice: the human-readable
//!   `name` of a related object (its `slug` only when the name is blank), and
//!   the `value` of a choice field (its `label` only when the value is blank).
//!   The agent's own id never goes into metadata (core would take it for the
//!   device's identity).
//!
//! # Tolerance
//!
//! Every field is optional and may be `null`; unknown keys are ignored. Text
//! fields also accept a number or a boolean (written as text). Tags may be
//! objects or, as before NetBox 2.10, plain strings. Anything else of the
//! wrong type makes the device unreadable: the client counts and skips it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::device::UpdateContext;
use crate::device::{insert_non_empty, non_empty, Metadata};
use crate::sources::Mapped;

/// One device as `GET /api/dcim/devices/` returns it (the fields the mapping
/// uses; everything else is skipped while parsing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetboxDevice {
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient_string")]
    pub name: Option<String>,
    pub status: Option<NetboxChoice>,
    /// NetBox ≥ 3.6.
    pub role: Option<NetboxRef>,
    /// NetBox < 3.6 (3.6 – 4.0 send both).
    pub device_role: Option<NetboxRef>,
    pub site: Option<NetboxRef>,
    pub tenant: Option<NetboxRef>,
    pub device_type: Option<NetboxDeviceType>,
    pub platform: Option<NetboxRef>,
    #[serde(deserialize_with = "lenient_string")]
    pub serial: Option<String>,
    pub primary_ip4: Option<NetboxIp>,
    pub primary_ip6: Option<NetboxIp>,
    /// `primary_ip4` if set, else `primary_ip6`.
    pub primary_ip: Option<NetboxIp>,
    pub tags: Option<Vec<NetboxTag>>,
}

/// A nested related object (`site`, `role`, `tenant`, `platform`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetboxRef {
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient_string")]
    pub name: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub slug: Option<String>,
}

/// A choice field such as `status`: `{"value": "active", "label": "Active"}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetboxChoice {
    #[serde(deserialize_with = "lenient_string")]
    pub value: Option<String>,
    #[serde(deserialize_with = "lenient_string")]
    pub label: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetboxDeviceType {
    #[serde(deserialize_with = "lenient_string")]
    pub model: Option<String>,
    pub manufacturer: Option<NetboxRef>,
}

/// A nested IP address object; `address` is in CIDR form (`10.10.0.2/24`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct NetboxIp {
    pub id: Option<i64>,
    #[serde(deserialize_with = "lenient_string")]
    pub address: Option<String>,
}

/// A tag: an object `{name, slug, …}` or, before NetBox 2.10, a bare string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetboxTag {
    pub name: Option<String>,
    pub slug: Option<String>,
}

impl<'de> Deserialize<'de> for NetboxTag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Object {
            #[serde(deserialize_with = "lenient_string")]
            name: Option<String>,
            #[serde(deserialize_with = "lenient_string")]
            slug: Option<String>,
        }
        struct TagVisitor;
        impl<'de> Visitor<'de> for TagVisitor {
            type Value = NetboxTag;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tag object or a tag name")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<NetboxTag, E> {
                Ok(NetboxTag {
                    name: Some(v.to_owned()),
                    slug: None,
                })
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<NetboxTag, E> {
                Ok(NetboxTag {
                    name: Some(v),
                    slug: None,
                })
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<NetboxTag, A::Error> {
                let o = Object::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(NetboxTag {
                    name: o.name,
                    slug: o.slug,
                })
            }
        }

        deserializer.deserialize_any(TagVisitor)
    }
}

/// An optional text field that also accepts a number or a boolean.
fn lenient_string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct Lenient;
    impl<'de> Visitor<'de> for Lenient {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string, a number, a boolean or null")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    deserializer.deserialize_any(Lenient)
}

/// Maps one NetBox device (see the module docs for the rules). The device is
/// consumed: its strings move into the update.
pub fn map_device(dev: NetboxDevice, ctx: &UpdateContext, blacklist: &[IpNet]) -> Mapped {
    let Some(ip) = primary_address(&dev) else {
        return Mapped::NoIp;
    };
    if blacklist.iter().any(|net| net.contains(&ip)) {
        return Mapped::Blacklisted;
    }

    let mut metadata: Metadata = BTreeMap::new();
    metadata.insert(Cow::Borrowed("integration_type"), "netbox".to_owned());
    if let Some(id) = dev.id {
        let id = id.to_string();
        metadata.insert(Cow::Borrowed("integration_id"), id.clone());
        metadata.insert(Cow::Borrowed("netbox_device_id"), id);
    }
    let role = dev.role.or(dev.device_role);
    insert_non_empty(&mut metadata, "role", role.and_then(ref_name));
    insert_non_empty(&mut metadata, "site", dev.site.and_then(ref_name));
    insert_non_empty(&mut metadata, "tenant", dev.tenant.and_then(ref_name));
    if let Some(device_type) = dev.device_type {
        insert_non_empty(
            &mut metadata,
            "manufacturer",
            device_type.manufacturer.and_then(ref_name),
        );
        insert_non_empty(&mut metadata, "model", device_type.model);
    }
    insert_non_empty(&mut metadata, "platform", dev.platform.and_then(ref_name));
    insert_non_empty(&mut metadata, "serial", dev.serial);
    insert_non_empty(&mut metadata, "status", dev.status.and_then(choice_value));
    if let Some(tags) = dev.tags {
        insert_non_empty(&mut metadata, "netbox_tags", Some(join_tags(tags)));
    }

    let hostname = dev.name.and_then(non_empty);
    Mapped::Update(ctx.update(ip.to_string(), None, hostname, metadata))
}

/// The device's address: `primary_ip4`, else `primary_ip6`, else `primary_ip`.
fn primary_address(dev: &NetboxDevice) -> Option<IpAddr> {
    [&dev.primary_ip4, &dev.primary_ip6, &dev.primary_ip]
        .into_iter()
        .flatten()
        .find_map(|ip| ip.address.as_deref().and_then(parse_address))
}

/// `10.10.0.2/24` → `10.10.0.2` (a bare address is accepted too).
pub fn parse_address(raw: &str) -> Option<IpAddr> {
    let host = raw.split('/').next()?.trim();
    host.parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified())
}

/// A related object's name, or its slug when the name is blank.
fn ref_name(r: NetboxRef) -> Option<String> {
    r.name
        .and_then(non_empty)
        .or_else(|| r.slug.and_then(non_empty))
}

/// A choice's value, or its label when the value is blank.
fn choice_value(c: NetboxChoice) -> Option<String> {
    c.value
        .and_then(non_empty)
        .or_else(|| c.label.and_then(non_empty))
}

/// Tag names (slugs for nameless tags), trimmed, non-blank, comma-joined.
fn join_tags(tags: Vec<NetboxTag>) -> String {
    let mut joined = String::new();
    for tag in tags {
        let Some(text) = tag
            .name
            .and_then(non_empty)
            .or_else(|| tag.slug.and_then(non_empty))
        else {
            continue;
        };
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(&text);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceUpdate;

    fn ctx() -> UpdateContext {
        UpdateContext {
            agent_id: "agent-edge-01".into(),
            gateway_id: "gw-1".into(),
            partition: "default".into(),
            source: "netbox",
            timestamp: "2026-04-12T09:30:12.000000000Z".into(),
        }
    }

    fn update(mapped: Mapped) -> DeviceUpdate {
        match mapped {
            Mapped::Update(u) => u,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn device(json: &str) -> NetboxDevice {
        serde_json::from_str(json).unwrap()
    }

    const FULL: &str = r#"{
        "id": 355, "url": "http://x/api/dcim/devices/355/", "name": "ams1-sw-0354",
        "device_type": {"id": 1, "model": "Catalyst 9300-48P", "manufacturer": {"id": 1, "name": "Cisco", "slug": "cisco"}},
        "role": {"id": 3, "name": "Access Switch", "slug": "access-switch"},
        "tenant": {"id": 1, "name": "Acme Retail", "slug": "acme-retail"},
        "platform": {"id": 1, "name": "Cisco IOS-XE", "slug": "cisco-ios-xe", "_depth": 0},
        "serial": "FOC0100354", "asset_tag": null,
        "site": {"id": 1, "name": "AMS1 Amsterdam", "slug": "ams1"},
        "status": {"value": "active", "label": "Active"},
        "primary_ip": {"id": 9, "address": "2001:db8:1::163/64", "family": {"value": 6, "label": "IPv6"}},
        "primary_ip4": {"id": 8, "address": "10.10.1.105/24", "family": {"value": 4, "label": "IPv4"}},
        "primary_ip6": {"id": 9, "address": "2001:db8:1::163/64"},
        "config_context": {"x": [1, 2, {"y": null}]},
        "tags": [{"id": 2, "name": "core", "slug": "core"}, {"id": 1, "name": "monitored", "slug": "monitored"}],
        "custom_fields": {}
    }"#;

    #[test]
    fn maps_a_full_device() {
        let u = update(map_device(device(FULL), &ctx(), &[]));
        assert_eq!(u.ip, "10.10.1.105");
        assert_eq!(u.device_id, "default:10.10.1.105");
        assert_eq!(u.hostname.as_deref(), Some("ams1-sw-0354"));
        assert_eq!(u.mac, None);
        assert_eq!(u.source, "netbox");
        let expected: Metadata = [
            ("integration_type", "netbox"),
            ("integration_id", "355"),
            ("netbox_device_id", "355"),
            ("role", "Access Switch"),
            ("site", "AMS1 Amsterdam"),
            ("tenant", "Acme Retail"),
            ("manufacturer", "Cisco"),
            ("model", "Catalyst 9300-48P"),
            ("platform", "Cisco IOS-XE"),
            ("serial", "FOC0100354"),
            ("status", "active"),
            ("netbox_tags", "core,monitored"),
        ]
        .into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), v.to_owned()))
        .collect();
        assert_eq!(u.metadata, expected);
        assert!(!u.metadata.contains_key("agent_id"));
    }

    #[test]
    fn ipv6_only_and_primary_ip_fallbacks() {
        let u = update(map_device(
            device(r#"{"id":28,"primary_ip4":null,"primary_ip6":{"address":"2001:DB8:1::1c/64"}}"#),
            &ctx(),
            &[],
        ));
        assert_eq!(u.ip, "2001:db8:1::1c");
        assert_eq!(u.device_id, "default:2001:db8:1::1c");
        let u = update(map_device(
            device(r#"{"id":1,"primary_ip":{"address":"10.0.0.9/32"}}"#),
            &ctx(),
            &[],
        ));
        assert_eq!(u.ip, "10.0.0.9");
        // An unusable v4 address falls through to v6.
        let u = update(map_device(
            device(r#"{"primary_ip4":{"address":"garbage"},"primary_ip6":{"address":"fe80::1"}}"#),
            &ctx(),
            &[],
        ));
        assert_eq!(u.ip, "fe80::1");
    }

    #[test]
    fn no_primary_ip_is_skipped() {
        for json in [
            r#"{"id":43}"#,
            r#"{"id":43,"primary_ip4":null,"primary_ip6":null,"primary_ip":null}"#,
            r#"{"id":43,"primary_ip4":{"address":null}}"#,
            r#"{"id":43,"primary_ip4":{"address":""}}"#,
            r#"{"id":43,"primary_ip4":{"address":"0.0.0.0/0"}}"#,
            r#"{"id":43,"primary_ip4":{"address":"not-an-ip/24"}}"#,
        ] {
            assert_eq!(
                map_device(device(json), &ctx(), &[]),
                Mapped::NoIp,
                "{json}"
            );
        }
    }

    #[test]
    fn blacklist_applies_to_the_chosen_ip() {
        let blacklist: Vec<IpNet> = vec!["10.10.0.0/16".parse().unwrap()];
        assert_eq!(
            map_device(device(FULL), &ctx(), &blacklist),
            Mapped::Blacklisted
        );
        let blacklist: Vec<IpNet> = vec!["2001:db8::/32".parse().unwrap()];
        assert_eq!(
            update(map_device(device(FULL), &ctx(), &blacklist)).ip,
            "10.10.1.105"
        );
    }

    #[test]
    fn nulls_blanks_and_legacy_shapes() {
        let u = update(map_device(
            device(
                r#"{"id":7,"name":null,"status":{"value":"","label":"Planned"},"role":null,
                "device_role":{"name":" ","slug":"leaf"},"site":{"name":"  Lab  "},"tenant":null,
                "device_type":{"model":"","manufacturer":null},"platform":null,"serial":"",
                "primary_ip4":{"address":"192.0.2.7"},"tags":["legacy", " ", {"name":"","slug":"s"}]}"#,
            ),
            &ctx(),
            &[],
        ));
        assert_eq!(u.ip, "192.0.2.7");
        assert_eq!(u.hostname, None);
        let keys: Vec<&str> = u.metadata.keys().map(|k| k.as_ref()).collect();
        assert_eq!(
            keys,
            [
                "integration_id",
                "integration_type",
                "netbox_device_id",
                "netbox_tags",
                "role",
                "site",
                "status"
            ]
        );
        assert_eq!(u.metadata["role"], "leaf");
        assert_eq!(u.metadata["site"], "Lab");
        assert_eq!(u.metadata["status"], "Planned");
        assert_eq!(u.metadata["netbox_tags"], "legacy,s");
    }

    #[test]
    fn role_wins_over_device_role_and_numbers_become_text() {
        let u = update(map_device(
            device(
                r#"{"role":{"name":"New"},"device_role":{"name":"Old"},"serial":12345,
                "status":{"value":1,"label":"Active"},"primary_ip4":{"address":"192.0.2.8/24"},"tags":[]}"#,
            ),
            &ctx(),
            &[],
        ));
        assert_eq!(u.metadata["role"], "New");
        assert_eq!(u.metadata["serial"], "12345");
        assert_eq!(u.metadata["status"], "1");
        assert!(!u.metadata.contains_key("netbox_tags"));
        assert!(!u.metadata.contains_key("integration_id"));
        assert_eq!(u.metadata["integration_type"], "netbox");
    }

    #[test]
    fn wrong_types_are_errors() {
        for json in [
            r#"{"id":"seven"}"#,
            r#"{"id":1,"primary_ip4":42}"#,
            r#"{"id":1,"site":"AMS1"}"#,
            r#"{"id":1,"tags":"core"}"#,
            r#"{"id":1,"name":{"x":1}}"#,
        ] {
            assert!(
                serde_json::from_str::<NetboxDevice>(json).is_err(),
                "{json}"
            );
        }
    }

    #[test]
    fn parse_address_forms() {
        assert_eq!(
            parse_address("10.10.0.2/24"),
            Some("10.10.0.2".parse().unwrap())
        );
        assert_eq!(
            parse_address(" 10.10.0.2 "),
            Some("10.10.0.2".parse().unwrap())
        );
        assert_eq!(
            parse_address("2001:db8::1/128"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_address("::/0"), None);
        assert_eq!(parse_address("/24"), None);
        assert_eq!(parse_address(""), None);
    }
}
