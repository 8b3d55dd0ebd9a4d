//! The hot path of an Armis run: a device read straight out of the page
//! (strings borrowed from the body where JSON allows) and written straight
//! into the staged line, without building a `DeviceUpdate` and its metadata
//! map. The per-run fields (`agent_id`, `gateway_id`, …) are encoded once
//! per run.
//!
//! [`mapping`](super::mapping) stays the reference: the output is byte for
//! byte what serialising [`map_device`](super::map_device)'s update gives,
//! which the tests check on the sources.md example and property-test on
//! arbitrary devices.

use std::borrow::Cow;
use std::io::Write as _;

use ipnet::IpNet;

use super::mapping::{choose_ip, parse_mac, IpChoice};
pub use super::mapping::{ArmisDeviceOf, ValidIps};
use crate::device::UpdateContext;
use crate::sources::stager::Skip;

/// Every string borrowed from the page body. Fastest; it cannot hold a
/// string written with escapes, so such a device fails to parse this way and
/// is read as an [`ArmisDeviceRef`] instead.
pub type ArmisDeviceFast<'a> = ArmisDeviceOf<&'a str>;
/// Strings as `Cow`, escapes and all.
pub type ArmisDeviceRef<'a> = ArmisDeviceOf<Cow<'a, str>>;

/// A device string as the encoder sees it.
pub trait FieldText {
    fn text(&self) -> Text<'_>;
}

impl FieldText for &str {
    fn text(&self) -> Text<'_> {
        // Borrowed straight from the body: it had no escapes.
        Text {
            value: self,
            clean: true,
        }
    }
}

impl FieldText for Cow<'_, str> {
    fn text(&self) -> Text<'_> {
        Text {
            value: self,
            clean: matches!(self, Cow::Borrowed(_)),
        }
    }
}

/// The per-run parts of every line, encoded once.
pub struct LineEncoder {
    /// `{"agent_id":…,"gateway_id":…,"partition":…,"device_id":"<partition>:`
    head: Vec<u8>,
    /// `,"source":…,"timestamp":…,"metadata":{`
    middle: Vec<u8>,
    integration_type: String,
}

impl LineEncoder {
    pub fn new(ctx: &UpdateContext, integration_type: &str) -> Self {
        let mut head = Vec::new();
        head.extend_from_slice(b"{\"agent_id\":");
        string(&mut head, &ctx.agent_id);
        head.extend_from_slice(b",\"gateway_id\":");
        string(&mut head, &ctx.gateway_id);
        head.extend_from_slice(b",\"partition\":");
        string(&mut head, &ctx.partition);
        head.extend_from_slice(b",\"device_id\":\"");
        escaped(&mut head, &ctx.partition);
        head.push(b':');
        let mut middle = Vec::new();
        middle.extend_from_slice(b",\"source\":");
        string(&mut middle, ctx.source);
        middle.extend_from_slice(b",\"timestamp\":");
        string(&mut middle, &ctx.timestamp);
        middle.extend_from_slice(b",\"metadata\":{");
        Self {
            head,
            middle,
            integration_type: integration_type.to_owned(),
        }
    }

    /// Chooses the device's address by the rules of
    /// [`map_device`](super::map_device), or says why it is skipped.
    pub fn addresses<S: FieldText>(
        dev: &ArmisDeviceOf<S>,
        blacklist: &[IpNet],
    ) -> Result<ValidIps, Skip> {
        match choose_ip(dev.ip_address.as_ref().map(|s| s.text().value), blacklist) {
            IpChoice::Chosen(ips) => Ok(ips),
            IpChoice::None => Err(Skip::NoIp),
            IpChoice::Blacklisted => Err(Skip::Blacklisted),
        }
    }

    /// Appends the device's update as JSON (no newline) to `out`.
    pub fn write<S: FieldText>(
        &self,
        dev: &ArmisDeviceOf<S>,
        ips: &ValidIps,
        label: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(&self.head);
        let ip_start = out.len();
        // An address never needs escaping; an IPv4 entry is already in its
        // canonical form (see `ValidIps::chosen_at`).
        let list = dev.ip_address.as_ref().map_or("", |l| l.text().value);
        match list.get(ips.chosen_at..ips.chosen_at + ips.chosen_len) {
            Some(entry) if ips.chosen.is_ipv4() => out.extend_from_slice(entry.as_bytes()),
            _ => {
                let _ = write!(out, "{}", ips.chosen);
            }
        }
        let ip_end = out.len();
        out.extend_from_slice(b"\",\"ip\":\"");
        out.extend_from_within(ip_start..ip_end);
        out.push(b'"');
        if let Some(mac) = dev
            .mac_address
            .as_ref()
            .and_then(|list| list.text().value.split(',').find_map(parse_mac))
        {
            out.extend_from_slice(b",\"mac\":\"");
            push_mac(out, &mac);
            out.push(b'"');
        }
        if let Some(name) = field(&dev.name) {
            out.extend_from_slice(b",\"hostname\":");
            name.write(out);
        }
        out.extend_from_slice(&self.middle);

        // Metadata keys in the order a BTreeMap of them serialises.
        let mut entries = Entries { out, first: true };
        if let Some(all_ips) = &ips.all_ips {
            entries.text("all_ips", all_ips);
        }
        entries.text_opt("armis_boundaries", field(&dev.boundaries));
        entries.text_opt("armis_category", field(&dev.category));
        if let Some(id) = dev.id {
            entries.number("armis_device_id", id);
        }
        if let Some(risk) = dev.risk_level.filter(|r| *r > 0) {
            entries.number("armis_risk_level", risk);
        }
        if let Some(tags) = &dev.tags {
            entries.tags("armis_tags", tags);
        }
        entries.text_opt("armis_type", field(&dev.device_type));
        entries.text_opt("first_seen", field(&dev.first_seen));
        entries.text("integration_type", &self.integration_type);
        if ips.all_ips.is_some() {
            entries.number("ip_count", ips.count as i64);
        }
        entries.text_opt("last_seen", field(&dev.last_seen));
        entries.text_opt("manufacturer", field(&dev.manufacturer));
        entries.text_opt("model", field(&dev.model));
        entries.text_opt("operating_system", field(&dev.operating_system));
        entries.text_opt(
            "query_label",
            label
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|value| Text {
                    value,
                    clean: false,
                }),
        );
        out.extend_from_slice(b"}}");
    }
}

/// A string value on its way to the output.
#[derive(Clone, Copy)]
pub struct Text<'s> {
    value: &'s str,
    /// Borrowed from the page as it was: a JSON string without escapes
    /// holds no `"`, `\` or control character, so it needs no escaping.
    clean: bool,
}

impl Text<'_> {
    fn write(self, out: &mut Vec<u8>) {
        out.push(b'"');
        self.write_content(out);
        out.push(b'"');
    }

    fn write_content(self, out: &mut Vec<u8>) {
        if self.clean {
            out.extend_from_slice(self.value.as_bytes());
        } else {
            escaped(out, self.value);
        }
    }
}

/// A device field trimmed, unless blank (the reference's `insert_non_empty`).
fn field<S: FieldText>(value: &Option<S>) -> Option<Text<'_>> {
    field_of(value.as_ref()?)
}

fn field_of<S: FieldText>(value: &S) -> Option<Text<'_>> {
    let text = value.text();
    let trimmed = text.value.trim();
    (!trimmed.is_empty()).then_some(Text {
        value: trimmed,
        clean: text.clean,
    })
}

/// Upper-case colon form, as [`format_mac`](super::format_mac) writes it.
fn push_mac(out: &mut Vec<u8>, mac: &[u8; 6]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for (i, byte) in mac.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0x0f)]);
    }
}

/// Writes `"key":"value"` metadata entries, comma-separated. Every value is
/// a JSON string (wire.md §5), numbers included.
struct Entries<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl Entries<'_> {
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        string(self.out, value);
    }

    fn text_opt(&mut self, key: &str, value: Option<Text<'_>>) {
        if let Some(value) = value {
            self.key(key);
            value.write(self.out);
        }
    }

    fn number(&mut self, key: &str, value: i64) {
        self.key(key);
        self.out.push(b'"');
        push_decimal(self.out, value);
        self.out.push(b'"');
    }

    /// Non-blank tags, trimmed and comma-joined; nothing when none is left.
    fn tags<S: FieldText>(&mut self, key: &str, tags: &[S]) {
        let mut tags = tags.iter().filter_map(|t| field_of(t));
        let Some(first) = tags.next() else { return };
        self.key(key);
        self.out.push(b'"');
        first.write_content(self.out);
        for tag in tags {
            self.out.push(b',');
            tag.write_content(self.out);
        }
        self.out.push(b'"');
    }
}

/// `value` in decimal, as `i64`'s `Display` writes it.
fn push_decimal(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// A JSON string, quoted.
fn string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    escaped(out, value);
    out.push(b'"');
}

/// A JSON string's content, escaped exactly as serde_json escapes it.
fn escaped(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0x0f)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::armis::{map_device, ArmisDevice, Mapped};
    use proptest::prelude::*;

    fn ctx() -> UpdateContext {
        UpdateContext {
            agent_id: "agent \"edge\"".into(),
            gateway_id: "gw-1".into(),
            partition: "lab\tA".into(),
            source: "armis",
            timestamp: "2026-04-12T09:30:12.000000000Z".into(),
        }
    }

    /// The reference: `map_device` then serde.
    fn reference(json: &str, label: Option<&str>, blacklist: &[IpNet]) -> Option<Vec<u8>> {
        let dev: ArmisDevice = serde_json::from_str(json).unwrap();
        match map_device(&dev, &ctx(), "armis", label, blacklist) {
            Mapped::Update(u) => Some(serde_json::to_vec(&u).unwrap()),
            _ => None,
        }
    }

    /// Both direct paths: the `Cow` one always, the borrowed one when the
    /// JSON has no escapes (it cannot parse otherwise); they must agree.
    fn direct(json: &str, label: Option<&str>, blacklist: &[IpNet]) -> Option<Vec<u8>> {
        fn encode<S: FieldText>(
            dev: &ArmisDeviceOf<S>,
            label: Option<&str>,
            blacklist: &[IpNet],
        ) -> Option<Vec<u8>> {
            let mut out = Vec::new();
            let ips = LineEncoder::addresses(dev, blacklist).ok()?;
            LineEncoder::new(&ctx(), "armis").write(dev, &ips, label, &mut out);
            Some(out)
        }
        let owned: ArmisDeviceRef<'_> = serde_json::from_str(json).unwrap();
        let line = encode(&owned, label, blacklist);
        if let Ok(borrowed) = serde_json::from_str::<ArmisDeviceFast<'_>>(json) {
            assert_eq!(encode(&borrowed, label, blacklist), line, "{json}");
        }
        line
    }

    #[test]
    fn matches_the_reference_on_the_sources_md_example_and_edge_cases() {
        for json in [
            r#"{"id":2,"ipAddress":"172.16.0.2","macAddress":"3C:97:0E:00:01:01,A4:BB:6D:5a:11:c0","name":"FAKER-HP-LAP-00002",
 "type":"Laptop","category":"Endpoint","manufacturer":"HP","model":"EliteDesk 801","operatingSystem":"Windows 11 Enterprise",
 "firstSeen":"2023-09-30T09:30:12.123456789Z","lastSeen":"2026-04-12T09:30:12.123456789Z","riskLevel":2,
 "boundaries":"DMZ","tags":["development"],"customProperties":null,"site":null}"#,
            r#"{"id":-7,"ipAddress":" x, 10.0.0.1 ,2001:db8::1, 0.0.0.0","name":"  ","tags":[" ", "a\"b"],"riskLevel":0}"#,
            r#"{"ipAddress":"10.9.9.9","name":"caf\u00e9 \u0001\\","model":"\n"}"#,
            r#"{"ipAddress":"10.255.0.1"}"#,
            r#"{"ipAddress":""}"#,
        ] {
            for label in [None, Some(" Corp "), Some("")] {
                let blacklist: Vec<IpNet> = vec!["10.255.0.0/16".parse().unwrap()];
                assert_eq!(
                    direct(json, label, &blacklist).map(String::from_utf8),
                    reference(json, label, &blacklist).map(String::from_utf8),
                    "{json}"
                );
            }
        }
    }

    fn text() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some(String::new())),
            "[ -~]{0,12}".prop_map(Some),
            any::<String>().prop_map(Some),
        ]
    }

    fn ip_list() -> impl Strategy<Value = Option<String>> {
        let entry = prop_oneof![
            (any::<[u8; 4]>()).prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
            any::<u128>().prop_map(|v| std::net::Ipv6Addr::from(v).to_string()),
            "[ -~]{0,8}",
        ];
        prop_oneof![
            Just(None),
            proptest::collection::vec(entry, 0..4).prop_map(|v| Some(v.join(","))),
        ]
    }

    proptest! {
        #[test]
        fn direct_encoding_equals_map_device_then_serde(
            id in proptest::option::of(any::<i64>()),
            ip in ip_list(),
            mac in text(),
            name in text(),
            kind in text(),
            model in text(),
            first_seen in text(),
            risk in proptest::option::of(any::<i64>()),
            tags in proptest::option::of(proptest::collection::vec(any::<String>(), 0..3)),
            label in text(),
        ) {
            let dev = ArmisDevice {
                id,
                ip_address: ip,
                mac_address: mac,
                name,
                device_type: kind,
                model,
                first_seen,
                risk_level: risk,
                tags,
                ..ArmisDevice::default()
            };
            let json = serde_json::to_string(&dev).unwrap();
            let blacklist: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
            prop_assert_eq!(
                direct(&json, label.as_deref(), &blacklist),
                reference(&json, label.as_deref(), &blacklist)
            );
        }
    }
}
