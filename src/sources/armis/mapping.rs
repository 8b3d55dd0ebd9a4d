//! The Armis device object and its mapping to a [`DeviceUpdate`]
//! (sources.md "Armis").
//!
//! The Faker source produces the same object, so both the Armis integration
//! and the in-process Faker run go through [`map_device`] /
//! [`map_device_owned`]; only `integration_type` differs.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::device::{insert_non_empty, non_empty, DeviceUpdate, UpdateContext};

/// One device as the Armis search API returns it, generic over how its
/// strings are held: [`ArmisDevice`] owns them (the reference mapping, the
/// Faker generator); the page reader of an Armis run borrows them from the
/// page body ([`ArmisDeviceFast`](super::encode::ArmisDeviceFast),
/// [`ArmisDeviceRef`](super::encode::ArmisDeviceRef)).
///
/// Every field is optional because Armis sends `null` for many of them, and
/// unknown keys (`customProperties`, `site`, …) are ignored. Serializing
/// writes the Armis key names, which is what the Faker server serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "S: Deserialize<'de>"))]
pub struct ArmisDeviceOf<S> {
    pub id: Option<i64>,
    /// One address or a comma-separated list; may be empty.
    pub ip_address: Option<S>,
    /// One MAC or a comma-separated list, in any case.
    pub mac_address: Option<S>,
    pub name: Option<S>,
    #[serde(rename = "type")]
    pub device_type: Option<S>,
    pub category: Option<S>,
    pub manufacturer: Option<S>,
    pub model: Option<S>,
    pub operating_system: Option<S>,
    /// RFC 3339.
    pub first_seen: Option<S>,
    /// RFC 3339.
    pub last_seen: Option<S>,
    pub risk_level: Option<i64>,
    pub boundaries: Option<S>,
    pub tags: Option<Vec<S>>,
}

/// An Armis device that owns its strings.
pub type ArmisDevice = ArmisDeviceOf<String>;

/// What became of one source device.
// Not boxed: a Mapped is returned and matched at once, never stored, and a
// box would cost an allocation per device.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    Update(DeviceUpdate),
    /// No valid IP address: skipped and counted by the caller.
    NoIp,
    /// Its chosen IP is inside the source's `network_blacklist`.
    Blacklisted,
}

/// Maps a borrowed device (the Armis page path, where the page owns the
/// devices). See [`map_device_owned`] for the rules.
pub fn map_device(
    dev: &ArmisDevice,
    ctx: &UpdateContext,
    integration_type: &str,
    query_label: Option<&str>,
    blacklist: &[IpNet],
) -> Mapped {
    // Decide skip/drop before cloning anything: skipped devices cost nothing.
    match choose_ip(dev.ip_address.as_deref(), blacklist) {
        IpChoice::Chosen(ips) => build(dev.clone(), ips, ctx, integration_type, query_label),
        IpChoice::None => Mapped::NoIp,
        IpChoice::Blacklisted => Mapped::Blacklisted,
    }
}

/// Maps a device the caller no longer needs (the Faker path): its strings
/// are moved into the update instead of copied.
///
/// Rules (sources.md): `ip` = first valid address of `ipAddress`, with
/// `all_ips`/`ip_count` in metadata when several are valid; `mac` = first
/// valid MAC, upper-case colon form; `hostname` = `name`; metadata keys
/// `armis_device_id` and `integration_type` always (the former only if the
/// device has an id at all), the others only when non-empty, and
/// `armis_risk_level` only when > 0. The agent's id never goes into metadata:
/// core would take it for the device's identity.
pub fn map_device_owned(
    dev: ArmisDevice,
    ctx: &UpdateContext,
    integration_type: &str,
    query_label: Option<&str>,
    blacklist: &[IpNet],
) -> Mapped {
    match choose_ip(dev.ip_address.as_deref(), blacklist) {
        IpChoice::Chosen(ips) => build(dev, ips, ctx, integration_type, query_label),
        IpChoice::None => Mapped::NoIp,
        IpChoice::Blacklisted => Mapped::Blacklisted,
    }
}

fn build(
    mut dev: ArmisDevice,
    ips: ValidIps,
    ctx: &UpdateContext,
    integration_type: &str,
    query_label: Option<&str>,
) -> Mapped {
    let mut metadata = BTreeMap::new();
    if let Some(id) = dev.id {
        metadata.insert(Cow::Borrowed("armis_device_id"), id.to_string());
    }
    metadata.insert(
        Cow::Borrowed("integration_type"),
        integration_type.to_owned(),
    );
    if let Some(all_ips) = ips.all_ips {
        metadata.insert(Cow::Borrowed("all_ips"), all_ips);
        metadata.insert(Cow::Borrowed("ip_count"), ips.count.to_string());
    }
    insert_non_empty(&mut metadata, "armis_type", dev.device_type);
    insert_non_empty(&mut metadata, "armis_category", dev.category);
    insert_non_empty(&mut metadata, "manufacturer", dev.manufacturer);
    insert_non_empty(&mut metadata, "model", dev.model);
    insert_non_empty(&mut metadata, "operating_system", dev.operating_system);
    insert_non_empty(&mut metadata, "armis_boundaries", dev.boundaries);
    if let Some(risk) = dev.risk_level.filter(|r| *r > 0) {
        metadata.insert(Cow::Borrowed("armis_risk_level"), risk.to_string());
    }
    insert_non_empty(&mut metadata, "query_label", query_label.map(str::to_owned));
    if let Some(tags) = dev.tags {
        insert_non_empty(&mut metadata, "armis_tags", Some(join_tags(tags)));
    }
    insert_non_empty(&mut metadata, "first_seen", dev.first_seen);
    insert_non_empty(&mut metadata, "last_seen", dev.last_seen);

    // An IPv4 address only parses in its canonical form, so a field holding
    // exactly one address can be moved instead of re-formatted.
    let ip = match dev.ip_address.take() {
        Some(raw) if ips.chosen.is_ipv4() && ips.count == 1 && raw.len() == ips.chosen_len => raw,
        _ => ips.chosen.to_string(),
    };
    let mac = dev.mac_address.as_deref().and_then(first_valid_mac);
    let hostname = dev.name.and_then(non_empty);
    Mapped::Update(ctx.update(ip, mac, hostname, metadata))
}

/// Non-blank tags, trimmed and comma-joined.
fn join_tags(tags: Vec<String>) -> String {
    let mut joined = String::new();
    for tag in tags.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(tag);
    }
    joined
}

/// The valid addresses of an `ipAddress` list.
pub struct ValidIps {
    /// The first valid one: the device's address.
    pub chosen: IpAddr,
    /// Where its (trimmed) entry starts in the list, and its length. An
    /// IPv4 address parses only in canonical form, so for IPv4 that entry
    /// is exactly how the address prints.
    pub(crate) chosen_at: usize,
    pub(crate) chosen_len: usize,
    pub count: usize,
    /// All valid addresses comma-joined, only when there are several.
    pub all_ips: Option<String>,
}

pub(crate) enum IpChoice {
    Chosen(ValidIps),
    None,
    Blacklisted,
}

pub(crate) fn choose_ip(list: Option<&str>, blacklist: &[IpNet]) -> IpChoice {
    let list = list.unwrap_or("");
    let mut entries = list.split(',');
    let Some((chosen, chosen_at, chosen_len)) = entries.by_ref().find_map(|e| {
        let trimmed = e.trim();
        let at = trimmed.as_ptr() as usize - list.as_ptr() as usize;
        parse_ip(e).map(|ip| (ip, at, trimmed.len()))
    }) else {
        return IpChoice::None;
    };
    // Only the chosen address decides (sources.md): a device whose secondary
    // address is blacklisted is still reported under its first one.
    if blacklist.iter().any(|net| net.contains(&chosen)) {
        return IpChoice::Blacklisted;
    }
    let mut count = 1;
    let mut all_ips: Option<String> = None;
    for other in entries.filter_map(parse_ip) {
        let joined = all_ips.get_or_insert_with(|| chosen.to_string());
        joined.push(',');
        joined.push_str(&other.to_string());
        count += 1;
    }
    IpChoice::Chosen(ValidIps {
        chosen,
        chosen_at,
        chosen_len,
        count,
        all_ips,
    })
}

/// One entry of an address list. The unspecified address (`0.0.0.0`, `::`)
/// is a placeholder, not a device address: `device_id` would collide.
fn parse_ip(raw: &str) -> Option<IpAddr> {
    raw.trim()
        .parse::<IpAddr>()
        .ok()
        .filter(|ip| !ip.is_unspecified())
}

/// First valid MAC of a comma list in upper-case colon form.
pub fn first_valid_mac(list: &str) -> Option<String> {
    list.split(',')
        .find_map(parse_mac)
        .map(|mac| format_mac(&mac))
}

/// Parses `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff`, `aabb.ccdd.eeff` and
/// `aabbccddeeff`, any case. All-zero and broadcast addresses are
/// placeholders some inventories use for "unknown", so they are not valid.
pub fn parse_mac(raw: &str) -> Option<[u8; 6]> {
    let raw = raw.trim().as_bytes();
    // Each form is identified by its length; `every` is the stride at which
    // a separator sits (position stride-1, 2*stride-1, …), 0 for none.
    let (sep, every) = match raw.len() {
        17 => (raw.get(2).copied()?, 3),
        14 => (b'.', 5),
        12 => (0, 0),
        _ => return None,
    };
    if every == 3 && sep != b':' && sep != b'-' {
        return None;
    }
    let mut nibbles = [0u8; 12];
    let mut count = 0;
    for (pos, &byte) in raw.iter().enumerate() {
        if every != 0 && pos % every == every - 1 {
            if byte != sep {
                return None;
            }
            continue;
        }
        *nibbles.get_mut(count)? = hex_value(byte)?;
        count += 1;
    }
    let mut mac = [0u8; 6];
    for (byte, pair) in mac.iter_mut().zip(nibbles.chunks_exact(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
    let placeholder = mac == [0; 6] || mac == [0xff; 6];
    (!placeholder).then_some(mac)
}

/// A hex digit's value. (`u8::from_str_radix` would also accept a `+` sign.)
fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Upper-case colon form, the only form that goes on the wire.
pub fn format_mac(mac: &[u8; 6]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(17);
    for (i, byte) in mac.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Metadata;

    fn ctx() -> UpdateContext {
        UpdateContext {
            agent_id: "agent-edge-01".into(),
            gateway_id: "gw-1".into(),
            partition: "default".into(),
            source: "armis",
            timestamp: "2026-04-12T09:30:12.000000000Z".into(),
        }
    }

    const EXAMPLE: &str = r#"{"id":2,"ipAddress":"172.16.0.2","macAddress":"3C:97:0E:00:01:01,A4:BB:6D:5a:11:c0","name":"FAKER-HP-LAP-00002",
 "type":"Laptop","category":"Endpoint","manufacturer":"HP","model":"EliteDesk 801","operatingSystem":"Windows 11 Enterprise",
 "firstSeen":"2023-09-30T09:30:12.123456789Z","lastSeen":"2026-04-12T09:30:12.123456789Z","riskLevel":2,
 "boundaries":"DMZ","tags":["development"],"customProperties":null,"site":null}"#;

    fn update(mapped: Mapped) -> DeviceUpdate {
        match mapped {
            Mapped::Update(u) => u,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    #[test]
    fn maps_the_sources_md_example() {
        let dev: ArmisDevice = serde_json::from_str(EXAMPLE).unwrap();
        let u = update(map_device(
            &dev,
            &ctx(),
            "armis",
            Some("Corporate devices"),
            &[],
        ));
        assert_eq!(u.ip, "172.16.0.2");
        assert_eq!(u.device_id, "default:172.16.0.2");
        assert_eq!(u.mac.as_deref(), Some("3C:97:0E:00:01:01"));
        assert_eq!(u.hostname.as_deref(), Some("FAKER-HP-LAP-00002"));
        assert_eq!(u.source, "armis");
        assert_eq!(u.agent_id, "agent-edge-01");
        assert_eq!(u.sync_meta, None);
        let expected: Metadata = [
            ("armis_device_id", "2"),
            ("integration_type", "armis"),
            ("armis_type", "Laptop"),
            ("armis_category", "Endpoint"),
            ("manufacturer", "HP"),
            ("model", "EliteDesk 801"),
            ("operating_system", "Windows 11 Enterprise"),
            ("armis_boundaries", "DMZ"),
            ("armis_risk_level", "2"),
            ("query_label", "Corporate devices"),
            ("armis_tags", "development"),
            ("first_seen", "2023-09-30T09:30:12.123456789Z"),
            ("last_seen", "2026-04-12T09:30:12.123456789Z"),
        ]
        .into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), v.to_owned()))
        .collect();
        assert_eq!(u.metadata, expected);
    }

    #[test]
    fn owned_and_borrowed_mapping_agree() {
        let dev: ArmisDevice = serde_json::from_str(EXAMPLE).unwrap();
        let borrowed = map_device(&dev, &ctx(), "faker", None, &[]);
        let owned = map_device_owned(dev, &ctx(), "faker", None, &[]);
        assert_eq!(borrowed, owned);
        assert_eq!(update(owned).metadata["integration_type"], "faker");
    }

    #[test]
    fn nulls_and_missing_keys_deserialize() {
        let dev: ArmisDevice = serde_json::from_str(
            r#"{"id":null,"ipAddress":"10.0.0.1","name":null,"tags":null,"riskLevel":null,"extra":{"x":1}}"#,
        )
        .unwrap();
        let u = update(map_device(&dev, &ctx(), "armis", None, &[]));
        assert_eq!(u.mac, None);
        assert_eq!(u.hostname, None);
        let keys: Vec<&str> = u.metadata.keys().map(|k| k.as_ref()).collect();
        assert_eq!(keys, ["integration_type"]);
    }

    #[test]
    fn first_valid_ip_wins_and_all_are_listed() {
        let dev = ArmisDevice {
            id: Some(7),
            ip_address: Some(" bogus, 0.0.0.0 ,10.1.2.3, fe80::1 ,300.1.1.1,192.168.1.9".into()),
            ..Default::default()
        };
        let u = update(map_device(&dev, &ctx(), "armis", None, &[]));
        assert_eq!(u.ip, "10.1.2.3");
        assert_eq!(u.metadata["all_ips"], "10.1.2.3,fe80::1,192.168.1.9");
        assert_eq!(u.metadata["ip_count"], "3");
    }

    #[test]
    fn single_ip_has_no_all_ips() {
        let dev = ArmisDevice {
            ip_address: Some("10.1.2.3, junk".into()),
            ..Default::default()
        };
        let u = update(map_device(&dev, &ctx(), "armis", None, &[]));
        assert!(!u.metadata.contains_key("all_ips"));
        assert!(!u.metadata.contains_key("ip_count"));
        for raw in [" 10.1.2.3 ", "10.1.2.3,", "10.1.2.3"] {
            let dev = ArmisDevice {
                ip_address: Some(raw.into()),
                ..Default::default()
            };
            assert_eq!(
                update(map_device_owned(dev, &ctx(), "armis", None, &[])).ip,
                "10.1.2.3"
            );
        }
        let dev = ArmisDevice {
            ip_address: Some("FE80:0::1".into()),
            ..Default::default()
        };
        assert_eq!(
            update(map_device_owned(dev, &ctx(), "armis", None, &[])).ip,
            "fe80::1"
        );
    }

    #[test]
    fn no_valid_ip_is_skipped() {
        for ip in [
            None,
            Some(""),
            Some(" , "),
            Some("not-an-ip"),
            Some("0.0.0.0"),
        ] {
            let dev = ArmisDevice {
                id: Some(1),
                ip_address: ip.map(Into::into),
                ..Default::default()
            };
            assert_eq!(
                map_device(&dev, &ctx(), "armis", None, &[]),
                Mapped::NoIp,
                "{ip:?}"
            );
        }
    }

    #[test]
    fn blacklist_applies_to_the_chosen_ip() {
        let blacklist: Vec<IpNet> = vec!["10.255.0.0/16".parse().unwrap()];
        let dev = ArmisDevice {
            ip_address: Some("10.255.1.1,10.1.1.1".into()),
            ..Default::default()
        };
        assert_eq!(
            map_device(&dev, &ctx(), "armis", None, &blacklist),
            Mapped::Blacklisted
        );
        let dev = ArmisDevice {
            ip_address: Some("10.1.1.1,10.255.1.1".into()),
            ..Default::default()
        };
        assert_eq!(
            update(map_device(&dev, &ctx(), "armis", None, &blacklist)).ip,
            "10.1.1.1"
        );
    }

    #[test]
    fn mac_forms() {
        assert_eq!(
            first_valid_mac("a4:bb:6d:5a:11:c0").as_deref(),
            Some("A4:BB:6D:5A:11:C0")
        );
        assert_eq!(
            first_valid_mac("a4-bb-6d-5a-11-c0").as_deref(),
            Some("A4:BB:6D:5A:11:C0")
        );
        assert_eq!(
            first_valid_mac("a4bb.6d5a.11c0").as_deref(),
            Some("A4:BB:6D:5A:11:C0")
        );
        assert_eq!(
            first_valid_mac("a4bb6d5a11c0").as_deref(),
            Some("A4:BB:6D:5A:11:C0")
        );
        assert_eq!(
            first_valid_mac("zz:bb:6d:5a:11:c0, 00:00:00:00:00:00,a4:bb:6d:5a:11:c1").as_deref(),
            Some("A4:BB:6D:5A:11:C1")
        );
        assert_eq!(first_valid_mac("a4:bb-6d:5a:11:c0"), None);
        assert_eq!(first_valid_mac("ff:ff:ff:ff:ff:ff"), None);
        assert_eq!(first_valid_mac(""), None);
        assert_eq!(first_valid_mac("+4:bb:6d:5a:11:c0"), None);
    }

    #[test]
    fn empty_values_zero_risk_and_blank_tags_are_left_out() {
        let dev = ArmisDevice {
            id: Some(3),
            ip_address: Some("10.0.0.3".into()),
            name: Some("  ".into()),
            device_type: Some("".into()),
            manufacturer: Some(" Cisco ".into()),
            risk_level: Some(0),
            tags: Some(vec!["".into(), " a ".into(), "b".into()]),
            ..Default::default()
        };
        let u = update(map_device(&dev, &ctx(), "armis", Some(""), &[]));
        assert_eq!(u.hostname, None);
        assert_eq!(u.metadata.get("armis_type"), None);
        assert_eq!(u.metadata.get("armis_risk_level"), None);
        assert_eq!(u.metadata.get("query_label"), None);
        assert_eq!(u.metadata["manufacturer"], "Cisco");
        assert_eq!(u.metadata["armis_tags"], "a,b");
        let dev = ArmisDevice {
            tags: Some(vec![" ".into()]),
            ..dev
        };
        let u = update(map_device(&dev, &ctx(), "armis", None, &[]));
        assert_eq!(u.metadata.get("armis_tags"), None);
    }

    #[test]
    fn agent_id_never_lands_in_metadata() {
        let dev: ArmisDevice = serde_json::from_str(EXAMPLE).unwrap();
        let u = update(map_device(&dev, &ctx(), "armis", Some("q"), &[]));
        assert!(!u.metadata.contains_key("agent_id"));
    }
}
