//! The deterministic Faker generator (sources.md "Faker").
//!
//! Device `i` is a pure function of `(seed, i)` plus, for its IP address, the
//! current IP permutation. That keeps the no-churn generator at O(1) memory,
//! makes every run reproducible, and lets the Faker server serve any page
//! without generating the devices before it.

use std::collections::BTreeMap;

use crate::sources::armis::{format_mac, ArmisDevice};

/// Hosts in 172.16.0.0/12 when every /24 uses `.1`–`.254`: 16 × 256 × 254.
pub const MAX_DEVICES: u64 = 16 * 256 * HOSTS_PER_SUBNET;

/// Usable hosts per /24: the last octet is never 0 or 255.
const HOSTS_PER_SUBNET: u64 = 254;

/// Settings of a `faker` source, from its `credentials` map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakerSettings {
    pub total_devices: u64,
    pub seed: u64,
    /// Share of devices whose IP changes on each run after the first, 0–100.
    pub churn_percent: f64,
}

impl Default for FakerSettings {
    fn default() -> Self {
        FakerSettings {
            total_devices: 50_000,
            seed: 0,
            churn_percent: 0.0,
        }
    }
}

impl FakerSettings {
    /// Reads `total_devices`, `seed` and `churn_percent`; other keys are
    /// ignored. A missing or blank value takes the default (a UI form sends
    /// "" for an untouched field); any other unparseable or out-of-range
    /// value is an error naming the key and the value.
    pub fn from_credentials(credentials: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut settings = FakerSettings::default();
        if let Some(raw) = setting(credentials, "total_devices") {
            let total: u64 = raw
                .parse()
                .map_err(|_| invalid("total_devices", raw, "a whole number"))?;
            if total > MAX_DEVICES {
                return Err(format!(
                    "faker credential total_devices = {raw:?} is too large: 172.16.0.0/12 holds at most {MAX_DEVICES} devices"
                ));
            }
            settings.total_devices = total;
        }
        if let Some(raw) = setting(credentials, "seed") {
            settings.seed = raw
                .parse()
                .map_err(|_| invalid("seed", raw, "an unsigned 64-bit integer"))?;
        }
        if let Some(raw) = setting(credentials, "churn_percent") {
            let churn: f64 = raw
                .parse()
                .map_err(|_| invalid("churn_percent", raw, "a number from 0 to 100"))?;
            if !(0.0..=100.0).contains(&churn) {
                return Err(invalid("churn_percent", raw, "a number from 0 to 100"));
            }
            settings.churn_percent = churn;
        }
        Ok(settings)
    }

    /// Checks values built in code rather than parsed.
    pub fn validate(&self) -> Result<(), String> {
        if self.total_devices > MAX_DEVICES {
            return Err(format!(
                "faker total_devices {} is too large: 172.16.0.0/12 holds at most {MAX_DEVICES} devices",
                self.total_devices
            ));
        }
        if !(0.0..=100.0).contains(&self.churn_percent) {
            return Err(format!(
                "faker churn_percent {} is not a number from 0 to 100",
                self.churn_percent
            ));
        }
        Ok(())
    }
}

fn setting<'a>(credentials: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    credentials
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

fn invalid(key: &str, value: &str, expected: &str) -> String {
    format!("faker credential {key} = {value:?} is invalid: expected {expected}")
}

/// Generates the devices of successive runs.
#[derive(Debug, Clone)]
pub struct FakerGenerator {
    settings: FakerSettings,
    /// 0 before the first [`next_run`](Self::next_run).
    run: u64,
    /// `ip_slots[i]` is the address slot of device `i`. Only allocated when
    /// churn is on; without it device `i` sits in slot `i`.
    ip_slots: Option<Vec<u32>>,
}

impl FakerGenerator {
    /// A generator positioned before run 1. Out-of-range settings are clamped
    /// (`total_devices` to [`MAX_DEVICES`], `churn_percent` to 0–100, NaN to
    /// 0) so that a generator can never produce an invalid address;
    /// [`FakerSettings::from_credentials`] is where bad input is reported.
    pub fn new(settings: FakerSettings) -> Self {
        let churn = if settings.churn_percent.is_nan() {
            0.0
        } else {
            settings.churn_percent.clamp(0.0, 100.0)
        };
        let settings = FakerSettings {
            total_devices: settings.total_devices.min(MAX_DEVICES),
            churn_percent: churn,
            ..settings
        };
        // MAX_DEVICES < 2^32, so every slot fits a u32.
        let ip_slots =
            (settings.churn_percent > 0.0).then(|| (0..settings.total_devices as u32).collect());
        FakerGenerator {
            settings,
            run: 0,
            ip_slots,
        }
    }

    pub fn settings(&self) -> &FakerSettings {
        &self.settings
    }

    /// The current run number (0 before the first `next_run`).
    pub fn run(&self) -> u64 {
        self.run
    }

    /// Advances to the next run and returns its number. Run 1 is the
    /// pristine layout; each later run swaps the addresses of disjoint random
    /// pairs of devices so that `churn_percent` of them move. Swapping keeps
    /// the set of addresses and every device's id, and the pairs depend only
    /// on the seed and the run number.
    pub fn next_run(&mut self) -> u64 {
        self.run += 1;
        if self.run > 1 {
            if let Some(slots) = self.ip_slots.as_mut() {
                churn(
                    slots,
                    self.settings.seed,
                    self.run,
                    self.settings.churn_percent,
                );
            }
        }
        self.run
    }

    pub fn len(&self) -> u64 {
        self.settings.total_devices
    }

    pub fn is_empty(&self) -> bool {
        self.settings.total_devices == 0
    }

    /// All devices of the current run, in index order.
    pub fn devices(&self) -> impl Iterator<Item = ArmisDevice> + '_ {
        (0..self.len()).map(move |i| self.device(i))
    }

    /// Device `i` (0-based; meaningful for `i < len()`) of the current run.
    pub fn device(&self, i: u64) -> ArmisDevice {
        let seed = self.settings.seed;
        let kind = &KINDS[(i % KINDS.len() as u64) as usize];
        let maker = &MAKERS[(i % MAKERS.len() as u64) as usize];
        let model = maker.models[((i / MAKERS.len() as u64) % maker.models.len() as u64) as usize];
        let os = kind.os[((i / KINDS.len() as u64) % kind.os.len() as u64) as usize];

        let mut mac = format_mac(&primary_mac(maker.oui, i));
        // Some devices report a second, locally administered MAC in lower
        // case, as real inventories do; mapping must still pick the first.
        let extra_mac = mix(seed, i, Field::ExtraMac);
        if extra_mac % 10 == 0 {
            let mut second = extra_mac.to_be_bytes();
            second[2] = (second[2] | 0x02) & !0x01;
            let mut bytes = [0u8; 6];
            bytes.copy_from_slice(&second[2..8]);
            mac.push(',');
            mac.push_str(&format_mac(&bytes).to_ascii_lowercase());
        }

        let first_seen = FIRST_SEEN_EPOCH + mix(seed, i, Field::FirstSeen) % FIRST_SEEN_SPAN;
        let last_seen = first_seen + mix(seed, i, Field::LastSeen) % LAST_SEEN_SPAN;
        let nanos = (mix(seed, i, Field::Nanos) % 1_000_000_000) as u32;

        let first_tag = (i % TAGS.len() as u64) as usize;
        let mut tags = vec![TAGS[first_tag].to_owned()];
        if i % 3 == 0 {
            // Every third device has a second tag; where its pick lands on
            // the first one, the next entry of the list is taken instead.
            let mut second_tag = ((i / 3 + 2) % TAGS.len() as u64) as usize;
            if second_tag == first_tag {
                second_tag = (second_tag + 1) % TAGS.len();
            }
            tags.push(TAGS[second_tag].to_owned());
        }

        ArmisDevice {
            id: Some((i as i64).wrapping_add(1)),
            ip_address: Some(slot_ip(self.ip_slot(i))),
            mac_address: Some(mac),
            name: Some(device_name(maker.name, kind.device_type, i)),
            device_type: Some(kind.device_type.to_owned()),
            category: Some(kind.category.to_owned()),
            manufacturer: Some(maker.name.to_owned()),
            model: Some(model.to_owned()),
            operating_system: Some(os.to_owned()),
            first_seen: Some(rfc3339(first_seen, nanos)),
            last_seen: Some(rfc3339(last_seen, nanos)),
            risk_level: Some((mix(seed, i, Field::Risk) % 11) as i64),
            boundaries: Some(
                BOUNDARIES[(mix(seed, i, Field::Boundaries) % BOUNDARIES.len() as u64) as usize]
                    .to_owned(),
            ),
            tags: Some(tags),
        }
    }

    fn ip_slot(&self, i: u64) -> u64 {
        match &self.ip_slots {
            Some(slots) => slots.get(i as usize).map_or(i, |&slot| u64::from(slot)),
            None => i,
        }
    }
}

/// Address of slot `j`: 254 hosts per /24, /24s counted up from 172.16.0.0.
fn slot_ip(j: u64) -> String {
    let subnet = j / HOSTS_PER_SUBNET;
    let host = j % HOSTS_PER_SUBNET + 1;
    let mut ip = String::with_capacity(15);
    ip.push_str("172.");
    push_digits(&mut ip, 16 + subnet / 256, 1);
    ip.push('.');
    push_digits(&mut ip, subnet % 256, 1);
    ip.push('.');
    push_digits(&mut ip, host, 1);
    ip
}

/// The manufacturer's OUI followed by the index: unique for every index
/// below 2^24 (> MAX_DEVICES), and the OUIs are globally administered unicast.
fn primary_mac(oui: [u8; 3], i: u64) -> [u8; 6] {
    let low = (i as u32).to_be_bytes();
    [oui[0], oui[1], oui[2], low[1], low[2], low[3]]
}

/// `FAKER-<MAK>-<TYP>-<i+1, at least 5 digits>`, built in one allocation.
fn device_name(maker: &str, device_type: &str, i: u64) -> String {
    let mut name = String::with_capacity(24);
    name.push_str("FAKER-");
    push_abbrev(&mut name, maker);
    name.push('-');
    push_abbrev(&mut name, device_type);
    name.push('-');
    push_digits(&mut name, i.wrapping_add(1), 5);
    name
}

/// First three alphanumeric characters, upper-cased ("HP" stays "HP").
fn push_abbrev(out: &mut String, word: &str) {
    out.extend(
        word.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(3)
            .map(|c| c.to_ascii_uppercase()),
    );
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` (the format of sources.md's example).
/// Hand-rolled, like [`push_digits`], because it runs twice per device and
/// `core::fmt` showed up in profiles.
fn rfc3339(secs: u64, nanos: u32) -> String {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let time = secs % 86_400;
    let mut out = String::with_capacity(30);
    push_digits(&mut out, year, 4);
    out.push('-');
    push_digits(&mut out, month, 2);
    out.push('-');
    push_digits(&mut out, day, 2);
    out.push('T');
    push_digits(&mut out, time / 3600, 2);
    out.push(':');
    push_digits(&mut out, time / 60 % 60, 2);
    out.push(':');
    push_digits(&mut out, time % 60, 2);
    out.push('.');
    push_digits(&mut out, u64::from(nanos), 9);
    out.push('Z');
    out
}

/// Appends `value` in decimal, zero-padded to at least `width` digits.
fn push_digits(out: &mut String, mut value: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    while value > 0 || start == buf.len() {
        start -= 1;
        buf[start] = b'0' + (value % 10) as u8;
        value /= 10;
    }
    let start = start.min(buf.len().saturating_sub(width));
    out.extend(buf[start..].iter().map(|&d| char::from(d)));
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// 2023-01-01T00:00:00Z: first sightings fall in the two years after it.
const FIRST_SEEN_EPOCH: u64 = 1_672_531_200;
const FIRST_SEEN_SPAN: u64 = 2 * 365 * 86_400;
const LAST_SEEN_SPAN: u64 = 365 * 86_400;

/// Swaps the slots of `round(n × percent / 200)` disjoint random pairs.
fn churn(slots: &mut [u32], seed: u64, run: u64, percent: f64) {
    let n = slots.len();
    let pairs = ((n as f64 * percent / 200.0).round() as usize).min(n / 2);
    if pairs == 0 {
        return;
    }
    let mut rng = SplitMix64(mix(seed, run, Field::Churn));
    // A partial Fisher–Yates shuffle of the indices draws 2 × pairs distinct
    // devices; consecutive draws are paired. Distinct devices hold distinct
    // slots, so every drawn device really moves.
    let mut order: Vec<u32> = (0..n as u32).collect();
    for k in 0..2 * pairs {
        let pick = k + rng.below((n - k) as u64) as usize;
        order.swap(k, pick);
    }
    for pair in order[..2 * pairs].chunks_exact(2) {
        slots.swap(pair[0] as usize, pair[1] as usize);
    }
}

/// Which random attribute a hash is for, so attributes are independent.
#[derive(Clone, Copy)]
enum Field {
    Boundaries = 1,
    Risk = 2,
    FirstSeen = 3,
    LastSeen = 4,
    Nanos = 5,
    ExtraMac = 6,
    Churn = 7,
}

/// splitmix64's finaliser: a fixed, documented mixer, so the generated data
/// never changes with a dependency's RNG implementation.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(seed: u64, i: u64, field: Field) -> u64 {
    splitmix64(splitmix64(splitmix64(seed) ^ i) ^ field as u64)
}

/// The splitmix64 stream generator, for the churn draws.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// Uniform enough in `0..bound` (Lemire's multiply-shift; the bias is
    /// below 2^-40 for bound ≤ MAX_DEVICES).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

struct Kind {
    device_type: &'static str,
    category: &'static str,
    os: &'static [&'static str],
}

struct Maker {
    name: &'static str,
    oui: [u8; 3],
    models: &'static [&'static str],
}

/// Eight kinds and nine makers: coprime counts, so every pairing occurs.
/// Index 1 is an HP laptop, like the example device of sources.md.
const KINDS: [Kind; 8] = [
    Kind {
        device_type: "Workstation",
        category: "Computers",
        os: &[
            "Windows 11 Enterprise",
            "Windows 10 Pro",
            "Ubuntu 22.04 LTS",
        ],
    },
    Kind {
        device_type: "Laptop",
        category: "Endpoint",
        os: &["Windows 11 Enterprise", "macOS 14 Sonoma", "Windows 10 Pro"],
    },
    Kind {
        device_type: "Server",
        category: "Computers",
        os: &[
            "Windows Server 2022",
            "Red Hat Enterprise Linux 9",
            "Ubuntu 22.04 LTS",
        ],
    },
    Kind {
        device_type: "Switch",
        category: "Network Equipment",
        os: &["Cisco IOS XE 17.9", "Junos OS 22.4", "ArubaOS-CX 10.12"],
    },
    Kind {
        device_type: "Router",
        category: "Network Equipment",
        os: &["Cisco IOS XE 17.9", "Junos OS 23.2"],
    },
    Kind {
        device_type: "Printer",
        category: "Imaging",
        os: &["Embedded Firmware"],
    },
    Kind {
        device_type: "Camera",
        category: "IoT",
        os: &["Embedded Linux", "AXIS OS 11"],
    },
    Kind {
        device_type: "Phone",
        category: "VoIP",
        os: &["Android 14", "iOS 17", "Cisco Phone OS 14"],
    },
];

const MAKERS: [Maker; 9] = [
    Maker {
        name: "Cisco",
        oui: [0x00, 0x1B, 0x54],
        models: &["Catalyst 9300", "ISR 4331", "IP Phone 8845"],
    },
    Maker {
        name: "HP",
        oui: [0x3C, 0x97, 0x0E],
        models: &[
            "EliteDesk 801",
            "EliteBook 840",
            "LaserJet M607",
            "ProLiant DL380",
        ],
    },
    Maker {
        name: "Dell",
        oui: [0x00, 0x14, 0x22],
        models: &["OptiPlex 7090", "Latitude 5440", "PowerEdge R750"],
    },
    Maker {
        name: "Apple",
        oui: [0xA4, 0x83, 0xE7],
        models: &["MacBook Pro 14", "iMac 24", "iPhone 15"],
    },
    Maker {
        name: "Lenovo",
        oui: [0x98, 0xFA, 0x9B],
        models: &["ThinkPad T14", "ThinkCentre M90q", "ThinkSystem SR650"],
    },
    Maker {
        name: "Juniper",
        oui: [0x00, 0x05, 0x85],
        models: &["EX4300", "MX204", "SRX345"],
    },
    Maker {
        name: "Axis",
        oui: [0x00, 0x40, 0x8C],
        models: &["P3265-LVE", "M3106-L Mk II"],
    },
    Maker {
        name: "Siemens",
        oui: [0x00, 0x0E, 0x8C],
        models: &["SIMATIC S7-1500", "SCALANCE XC208"],
    },
    Maker {
        name: "Samsung",
        oui: [0x8C, 0x77, 0x12],
        models: &["Galaxy S24", "Galaxy Tab S9"],
    },
];

const TAGS: [&str; 7] = [
    "production",
    "development",
    "staging",
    "corporate",
    "guest",
    "iot",
    "critical",
];

/// Blank on purpose: a device without a boundary exercises "when non-empty".
const BOUNDARIES: [&str; 7] = [
    "Corporate",
    "Corporate",
    "DMZ",
    "Guest",
    "Lab",
    "OT Network",
    "",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_devices_follow_the_rules() {
        let gen = FakerGenerator::new(FakerSettings {
            total_devices: 600,
            ..Default::default()
        });
        let d = gen.device(1);
        assert_eq!(d.id, Some(2));
        assert_eq!(d.ip_address.as_deref(), Some("172.16.0.2"));
        assert_eq!(d.name.as_deref(), Some("FAKER-HP-LAP-00002"));
        assert_eq!(
            d.mac_address.as_deref().map(|m| &m[..17]),
            Some("3C:97:0E:00:00:01")
        );
        assert_eq!(gen.device(253).ip_address.as_deref(), Some("172.16.0.254"));
        assert_eq!(gen.device(254).ip_address.as_deref(), Some("172.16.1.1"));
        assert_eq!(slot_ip(MAX_DEVICES - 1), "172.31.255.254");
        assert_eq!(slot_ip(254 * 256), "172.17.0.1");
    }

    #[test]
    fn credentials_parse_and_errors_name_key_and_value() {
        let creds = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            FakerSettings::from_credentials(&creds(&[])).unwrap(),
            FakerSettings::default()
        );
        let s = FakerSettings::from_credentials(&creds(&[
            ("total_devices", " 1000 "),
            ("seed", "42"),
            ("churn_percent", "2.5"),
            ("api_key", "ignored"),
        ]))
        .unwrap();
        assert_eq!(
            s,
            FakerSettings {
                total_devices: 1000,
                seed: 42,
                churn_percent: 2.5
            }
        );
        assert_eq!(
            FakerSettings::from_credentials(&creds(&[("total_devices", "")]))
                .unwrap()
                .total_devices,
            50_000
        );
        for (key, value) in [
            ("total_devices", "many"),
            ("total_devices", "-1"),
            ("total_devices", "1040385"),
            ("seed", "x"),
            ("churn_percent", "101"),
            ("churn_percent", "-1"),
            ("churn_percent", "NaN"),
        ] {
            let err = FakerSettings::from_credentials(&creds(&[(key, value)])).unwrap_err();
            assert!(err.contains(key) && err.contains(value), "{err}");
        }
        assert_eq!(
            FakerSettings::from_credentials(&creds(&[("total_devices", "1040384")]))
                .unwrap()
                .total_devices,
            MAX_DEVICES
        );
    }

    #[test]
    fn timestamps_match_humantime() {
        use std::time::{Duration, UNIX_EPOCH};
        for secs in [
            0u64,
            59,
            86_399,
            951_782_400,
            1_672_531_200,
            1_709_164_800,
            4_102_444_799,
            253_402_300_799,
        ] {
            for nanos in [0u32, 1, 123_456_789, 999_999_999] {
                let want = humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::new(secs, nanos))
                    .to_string();
                assert_eq!(rfc3339(secs, nanos), want);
            }
        }
        let mut x = 1u64;
        for _ in 0..10_000 {
            x = splitmix64(x);
            let secs = x % 4_102_444_800;
            let want =
                humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::new(secs, 5)).to_string();
            assert_eq!(rfc3339(secs, 5), want);
        }
    }

    #[test]
    fn no_churn_allocates_nothing() {
        let gen = FakerGenerator::new(FakerSettings {
            total_devices: MAX_DEVICES,
            ..Default::default()
        });
        assert!(gen.ip_slots.is_none());
        let mut gen = FakerGenerator::new(FakerSettings {
            total_devices: 10,
            churn_percent: 1.0,
            ..Default::default()
        });
        assert!(gen.ip_slots.is_some());
        gen.next_run();
        gen.next_run();
    }
}
