//! The Faker generator's contract (sources.md "Faker") and the in-process
//! Faker run feeding the upload pipeline.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use ipnet::IpNet;
use serviceradar_agent::device::{DeviceUpdate, UpdateContext};
use serviceradar_agent::sources::armis::ArmisDevice;
use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings, MAX_DEVICES};
use serviceradar_agent::sources::{faker_run, RunCounts};
use serviceradar_agent::upload::chunking::{plan, ChunkLimits, ChunkReader, RunIds};
use serviceradar_agent::upload::staging::RunWriter;

fn generator(total_devices: u64, seed: u64, churn_percent: f64) -> FakerGenerator {
    let mut gen = FakerGenerator::new(FakerSettings {
        total_devices,
        seed,
        churn_percent,
    });
    gen.next_run();
    gen
}

fn primary_mac(d: &ArmisDevice) -> String {
    d.mac_address
        .as_deref()
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned()
}

fn ctx() -> UpdateContext {
    UpdateContext {
        agent_id: "agent-edge-01".into(),
        gateway_id: "gw-1".into(),
        partition: "default".into(),
        source: "faker",
        timestamp: "2026-04-12T09:30:12.123456789Z".into(),
    }
}

#[test]
fn ids_ips_and_macs_are_unique_for_100k() {
    let gen = generator(100_000, 1, 0.0);
    assert_eq!(gen.len(), 100_000);
    let (mut ids, mut ips, mut macs) = (HashSet::new(), HashSet::new(), HashSet::new());
    let block: IpNet = "172.16.0.0/12".parse().unwrap();
    for (i, d) in gen.devices().enumerate() {
        assert_eq!(d.id, Some(i as i64 + 1));
        let ip: Ipv4Addr = d.ip_address.as_deref().unwrap().parse().unwrap();
        assert!(block.contains(&std::net::IpAddr::V4(ip)));
        assert!(!matches!(ip.octets()[3], 0 | 255));
        let mac = primary_mac(&d);
        assert_eq!(mac, mac.to_uppercase());
        let first_octet = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(
            first_octet & 0x03,
            0,
            "globally administered unicast: {mac}"
        );
        assert!(ids.insert(d.id.unwrap()));
        assert!(ips.insert(ip));
        assert!(macs.insert(mac));
    }
    assert_eq!(
        (ids.len(), ips.len(), macs.len()),
        (100_000, 100_000, 100_000)
    );
}

#[test]
fn address_rule_matches_sources_md() {
    let gen = generator(MAX_DEVICES, 0, 0.0);
    for i in [
        0u64,
        1,
        253,
        254,
        255,
        254 * 256 - 1,
        254 * 256,
        MAX_DEVICES - 1,
    ] {
        let subnet = i / 254;
        let want = format!("172.{}.{}.{}", 16 + subnet / 256, subnet % 256, i % 254 + 1);
        assert_eq!(
            gen.device(i).ip_address.as_deref(),
            Some(want.as_str()),
            "device {i}"
        );
    }
    assert_eq!(
        gen.device(MAX_DEVICES - 1).ip_address.as_deref(),
        Some("172.31.255.254")
    );
    let too_many = BTreeMap::from([("total_devices".to_owned(), (MAX_DEVICES + 1).to_string())]);
    let err = FakerSettings::from_credentials(&too_many).unwrap_err();
    assert!(
        err.contains("total_devices") && err.contains("1040385"),
        "{err}"
    );
}

#[test]
fn names_follow_the_format() {
    let gen = generator(2_000, 3, 0.0);
    for (i, d) in gen.devices().enumerate() {
        let name = d.name.clone().unwrap();
        let parts: Vec<&str> = name.split('-').collect();
        assert_eq!(parts.len(), 4, "{name}");
        assert_eq!(parts[0], "FAKER");
        let abbrev = |s: &str| {
            s.chars()
                .filter(char::is_ascii_alphanumeric)
                .take(3)
                .collect::<String>()
                .to_uppercase()
        };
        assert_eq!(parts[1], abbrev(d.manufacturer.as_deref().unwrap()));
        assert_eq!(parts[2], abbrev(d.device_type.as_deref().unwrap()));
        assert_eq!(parts[3], format!("{:05}", i + 1));
        assert!(parts[1].len() <= 3 && parts[2].len() == 3);
    }
    assert_eq!(gen.device(1).name.as_deref(), Some("FAKER-HP-LAP-00002"));
    let big = generator(200_000, 0, 0.0);
    assert!(big.device(123_455).name.unwrap().ends_with("-123456"));
}

#[test]
fn no_device_repeats_a_tag() {
    let gen = generator(100_000, 1, 0.0);
    for (i, d) in gen.devices().enumerate() {
        let tags = d.tags.as_deref().unwrap();
        // Every device has one tag, every third a second one.
        assert_eq!(
            tags.len(),
            if i % 3 == 0 { 2 } else { 1 },
            "device {i}: {tags:?}"
        );
        let distinct: HashSet<&String> = tags.iter().collect();
        assert_eq!(
            distinct.len(),
            tags.len(),
            "device {i} repeats a tag: {tags:?}"
        );
    }
    // Device 3's two picks both land on "corporate": the second moves on.
    assert_eq!(
        gen.device(3).tags.unwrap(),
        ["corporate".to_owned(), "guest".to_owned()]
    );
    // Where the picks differ, nothing changed.
    assert_eq!(
        gen.device(0).tags.unwrap(),
        ["production".to_owned(), "staging".to_owned()]
    );
}

#[test]
fn same_seed_same_devices_other_seed_other_randomness() {
    let a: Vec<ArmisDevice> = generator(3_000, 42, 0.0).devices().collect();
    let b: Vec<ArmisDevice> = generator(3_000, 42, 0.0).devices().collect();
    assert_eq!(a, b);
    let c: Vec<ArmisDevice> = generator(3_000, 43, 0.0).devices().collect();
    // Identity does not depend on the seed; the random attributes do.
    for (x, y) in a.iter().zip(&c) {
        assert_eq!(
            (&x.id, &x.ip_address, &x.name),
            (&y.id, &y.ip_address, &y.name)
        );
    }
    let differing = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| (&x.first_seen, x.risk_level) != (&y.first_seen, y.risk_level))
        .count();
    assert!(differing > 2_900, "{differing}");
    // The random attributes are spread out and well-formed.
    let risks: HashSet<i64> = a.iter().map(|d| d.risk_level.unwrap()).collect();
    assert_eq!(risks.len(), 11);
    for d in &a {
        let first = humantime::parse_rfc3339(d.first_seen.as_deref().unwrap()).unwrap();
        let last = humantime::parse_rfc3339(d.last_seen.as_deref().unwrap()).unwrap();
        assert!(first <= last);
    }
}

fn ip_map(gen: &FakerGenerator) -> Vec<(i64, String)> {
    gen.devices()
        .map(|d| (d.id.unwrap(), d.ip_address.unwrap()))
        .collect()
}

#[test]
fn churn_moves_the_requested_share_and_keeps_the_ip_set() {
    let n = 20_000u64;
    let mut gen = generator(n, 9, 10.0);
    let run1 = ip_map(&gen);
    assert_eq!(run1, ip_map(&generator(n, 9, 0.0)), "run 1 has no churn");
    let set1: HashSet<&String> = run1.iter().map(|(_, ip)| ip).collect();

    let mut previous = run1.clone();
    for run in 2..=4 {
        assert_eq!(gen.next_run(), run);
        let now = ip_map(&gen);
        let ids_now: Vec<i64> = now.iter().map(|(id, _)| *id).collect();
        let ids_before: Vec<i64> = previous.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids_now, ids_before, "ids survive churn");
        let set_now: HashSet<&String> = now.iter().map(|(_, ip)| ip).collect();
        assert_eq!(set_now, set1, "the set of IPs never changes");
        let moved = now
            .iter()
            .zip(&previous)
            .filter(|(a, b)| a.1 != b.1)
            .count();
        assert_eq!(moved, 2_000, "run {run}: 10% of {n} devices move");
        previous = now;
    }

    // Reproducible: another generator at the same run has the same layout.
    let mut again = generator(n, 9, 10.0);
    for _ in 2..=4 {
        again.next_run();
    }
    assert_eq!(ip_map(&again), previous);
    let mut other_seed = generator(n, 10, 10.0);
    other_seed.next_run();
    let mut same_seed = generator(n, 9, 10.0);
    same_seed.next_run();
    assert_ne!(ip_map(&other_seed), ip_map(&same_seed));
}

#[test]
fn full_churn_moves_everyone() {
    let mut gen = generator(1_001, 5, 100.0);
    let before = ip_map(&gen);
    gen.next_run();
    let moved = ip_map(&gen)
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 != b.1)
        .count();
    assert_eq!(moved, 1_000, "one device of an odd count has no partner");
}

#[test]
fn faker_run_maps_counts_and_feeds_the_pipeline() {
    let gen = generator(5_000, 11, 0.0);
    let blacklist: Vec<IpNet> = vec!["172.16.0.0/24".parse().unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let mut writer = RunWriter::create(dir.path(), "faker-run").unwrap();
    let mut seen = 0u64;
    let counts = faker_run(&gen, &ctx(), &blacklist, &mut |u: &DeviceUpdate| {
        seen += 1;
        assert_eq!(u.metadata["integration_type"], "faker");
        assert!(!u.metadata.contains_key("agent_id"));
        assert_eq!(u.source, "faker");
        assert_eq!(u.device_id, format!("default:{}", u.ip));
        assert!(!u.ip.starts_with("172.16.0."));
        writer.write(u)
    })
    .unwrap();
    assert_eq!(
        counts,
        RunCounts {
            devices: 5_000 - 254,
            skipped_no_ip: 0,
            blacklisted: 254,
            ..RunCounts::default()
        }
    );
    assert_eq!(seen, counts.devices);
    let staged = writer.finish().unwrap();

    let ids = RunIds {
        sync_service_id: "svc".into(),
        sync_run_id: "faker-run".into(),
    };
    let limits = ChunkLimits::default();
    let plan = plan(&staged, &ids, &limits).unwrap();
    let mut total = 0u64;
    for chunk in ChunkReader::open(&staged, &plan, &ids).unwrap() {
        let chunk = chunk.unwrap();
        let updates: Vec<DeviceUpdate> = serde_json::from_slice(&chunk.json).unwrap();
        total += updates.len() as u64;
        assert!(chunk.json.len() <= limits.max_bytes);
    }
    assert_eq!(total, counts.devices);
    staged.remove().unwrap();
}

#[test]
fn a_sink_error_ends_the_run() {
    let gen = generator(100, 0, 0.0);
    let mut calls = 0;
    let err = faker_run(&gen, &ctx(), &[], &mut |_: &DeviceUpdate| {
        calls += 1;
        if calls == 3 {
            Err(std::io::Error::other("disk full"))
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "disk full");
    assert_eq!(calls, 3);
}

#[test]
fn parallel_staging_writes_the_same_run_as_sequential_staging() {
    let dir = tempfile::tempdir().unwrap();
    let gen = generator(5_000, 11, 0.0);
    let blacklist: Vec<IpNet> = vec!["172.16.3.0/24".parse().unwrap()];

    let mut sequential = RunWriter::create(dir.path(), "seq").unwrap();
    let seq_counts = faker_run(&gen, &ctx(), &blacklist, &mut |u| sequential.write(u)).unwrap();
    let seq = sequential.finish().unwrap();

    for workers in [1, 2, 3] {
        let mut parallel = RunWriter::create(dir.path(), &format!("par{workers}")).unwrap();
        let counts = serviceradar_agent::sources::faker_stage(
            &gen,
            &ctx(),
            &blacklist,
            &mut parallel,
            workers,
            &|| false,
        )
        .unwrap();
        let par = parallel.finish().unwrap();
        assert_eq!(counts, seq_counts, "{workers} workers");
        assert_eq!(par.device_count, seq.device_count);
        assert_eq!(
            std::fs::read(&par.data_path).unwrap(),
            std::fs::read(&seq.data_path).unwrap()
        );
        assert_eq!(
            std::fs::read(&par.lengths_path).unwrap(),
            std::fs::read(&seq.lengths_path).unwrap()
        );
    }
    assert!(seq_counts.blacklisted > 0);
}

#[test]
fn parallel_staging_stops_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let gen = generator(50_000, 1, 0.0);
    let mut writer = RunWriter::create(dir.path(), "cancelled").unwrap();
    let err = serviceradar_agent::sources::faker_stage(&gen, &ctx(), &[], &mut writer, 2, &|| true)
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
}
