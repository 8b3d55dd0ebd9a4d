//! DIRE invariants (gateway.md §5) on both store backends: churn never
//! multiplies devices, scopes never meet, replays change nothing, MAC-only
//! conflicts never merge, merges are audited and reversible, IP-only updates
//! land on the IP's holder, and the order of a run's updates does not matter.

mod backend_support;

use backend_support::Backend;
use serde_json::{json, Map, Value};
use serviceradar_agent::bench::dire::faker_sightings;
use serviceradar_agent::gateway::dire::{CanonicalDevice, IdKind, Identifier, Sighting};
use serviceradar_agent::gateway::store::{DeviceFilter, Store};
use serviceradar_agent::sources::faker::{FakerGenerator, FakerSettings};

async fn store(backend: Backend) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = backend.fresh_store(dir.path(), "dire").await;
    (dir, store)
}

fn sighting(metadata: Value, ip: Option<&str>, mac: Option<&str>, source: &str) -> Sighting {
    let metadata: Map<String, Value> = metadata.as_object().cloned().unwrap_or_default();
    Sighting {
        identifiers: serviceradar_agent::gateway::dire::identifiers_of(&metadata, mac),
        ip: ip.map(str::to_owned),
        mac: mac.map(str::to_owned),
        hostname: None,
        source: source.to_owned(),
        metadata,
    }
}

fn armis(id: &str, ip: &str, mac: Option<&str>) -> Sighting {
    sighting(json!({"armis_device_id": id}), Some(ip), mac, "armis")
}

async fn devices(store: &Store, tenant: Option<&str>) -> Vec<CanonicalDevice> {
    store
        .canonical_devices(DeviceFilter {
            tenant: tenant.map(str::to_owned),
            limit: 1_000_000,
            ..DeviceFilter::default()
        })
        .await
        .unwrap()
}

async fn run(store: &Store, tenant: &str, run_id: &str, sightings: Vec<Sighting>, now: i64) {
    let sightings = sightings
        .into_iter()
        .map(|s| ("default".to_owned(), s))
        .collect();
    store
        .reconcile_run(tenant, run_id, sightings, now)
        .await
        .unwrap();
}

/// One Faker run as the agent would send it, as sightings.
fn faker_run(generator: &FakerGenerator) -> Vec<Sighting> {
    faker_sightings(generator)
        .into_iter()
        .map(|(_, sighting)| sighting)
        .collect()
}

async fn faker_churn_keeps_exactly_one_device_per_device(backend: Backend) {
    let (_dir, store) = store(backend).await;
    let mut generator = FakerGenerator::new(FakerSettings {
        total_devices: 50_000,
        seed: 11,
        churn_percent: 5.0,
    });
    generator.next_run(); // run 1: the pristine layout; churn from run 2 on
    let mut previous: Option<std::collections::BTreeMap<String, Option<String>>> = None;
    for round in 0..10 {
        let sightings = faker_run(&generator);
        assert_eq!(sightings.len(), 50_000);
        // Armis id → IP this round; about 5% of devices moved.
        let ips: std::collections::BTreeMap<String, Option<String>> = sightings
            .iter()
            .map(|s| (s.identifiers[0].value.clone(), s.ip.clone()))
            .collect();
        if let Some(previous) = &previous {
            let moved = ips
                .iter()
                .filter(|(id, ip)| previous.get(*id) != Some(ip))
                .count();
            assert!(
                moved > 1_000,
                "round {round}: only {moved} devices changed IP"
            );
        }
        previous = Some(ips);
        run(
            &store,
            "t1",
            &format!("run-{round}"),
            sightings,
            1_000 + round,
        )
        .await;
        assert_eq!(
            store.canonical_device_count().await.unwrap(),
            50_000,
            "round {round}"
        );
        generator.next_run();
    }
    // Every live device has exactly its Armis id and an IP nobody else has.
    let all = devices(&store, Some("t1")).await;
    assert_eq!(all.len(), 50_000);
    assert!(all.iter().all(|d| d
        .identifiers
        .iter()
        .filter(|i| i.kind == IdKind::Armis)
        .count()
        == 1));
    let with_ip = all.iter().filter(|d| d.ip.is_some()).count();
    let distinct: std::collections::BTreeSet<_> =
        all.iter().filter_map(|d| d.ip.as_ref()).collect();
    assert_eq!(with_ip, distinct.len());
}

async fn scopes_never_meet(backend: Backend) {
    let (_dir, store) = store(backend).await;
    // The same Armis id in two partitions of one tenant: two devices.
    let two_partitions = vec![
        ("site-a".to_owned(), armis("42", "10.0.0.1", None)),
        ("site-b".to_owned(), armis("42", "10.0.0.1", None)),
    ];
    store
        .reconcile_run("t1", "r1", two_partitions, 1)
        .await
        .unwrap();
    let t1 = devices(&store, Some("t1")).await;
    assert_eq!(t1.len(), 2);
    assert_ne!(t1[0].id, t1[1].id);
    // Two tenants with identical inventories share nothing.
    let inventory = || {
        vec![
            armis("1", "10.1.0.1", Some("00:1A:2B:00:00:01")),
            armis("2", "10.1.0.2", Some("00:1A:2B:00:00:02")),
            sighting(json!({}), Some("10.1.0.3"), None, "netbox"),
        ]
    };
    run(&store, "acme", "r1", inventory(), 1).await;
    run(&store, "beta", "r1", inventory(), 1).await;
    let acme = devices(&store, Some("acme")).await;
    let beta = devices(&store, Some("beta")).await;
    assert_eq!((acme.len(), beta.len()), (3, 3));
    for device in &acme {
        assert!(beta.iter().all(|b| b.id != device.id));
    }
}

async fn replaying_a_run_changes_nothing(backend: Backend) {
    let (_dir, store) = store(backend).await;
    let inventory = || {
        vec![
            armis("1", "10.0.0.1", Some("00:1A:2B:00:00:01")),
            armis("2", "10.0.0.2", None),
            sighting(
                json!({"netbox_device_id": "7"}),
                Some("10.0.0.3"),
                None,
                "netbox",
            ),
            sighting(json!({}), Some("10.0.0.4"), None, "netbox"),
        ]
    };
    run(&store, "t", "r1", inventory(), 100).await;
    let before = devices(&store, None).await;
    run(&store, "t", "r1", inventory(), 100).await;
    assert_eq!(devices(&store, None).await, before);
}

async fn a_mac_only_conflict_never_merges(backend: Backend) {
    let (_dir, store) = store(backend).await;
    let mac = "00:1A:2B:3C:4D:5E";
    run(
        &store,
        "t",
        "r1",
        vec![armis("1", "10.0.0.1", Some(mac))],
        1,
    )
    .await;
    run(&store, "t", "r2", vec![armis("2", "10.0.0.2", None)], 2).await;
    // Device 2 reports device 1's MAC (a shared NIC, a VM host): its Armis
    // id says device 2, the MAC says device 1. Only a MAC ties them: no merge.
    run(
        &store,
        "t",
        "r3",
        vec![armis("2", "10.0.0.2", Some(mac))],
        3,
    )
    .await;
    // A third Armis device with the same MAC is a third device, not device 1
    // with a second Armis id.
    run(
        &store,
        "t",
        "r4",
        vec![armis("3", "10.0.0.3", Some(mac))],
        4,
    )
    .await;
    let all = devices(&store, None).await;
    assert_eq!(all.len(), 3, "{all:#?}");
    let first = all
        .iter()
        .find(|d| d.ip.as_deref() == Some("10.0.0.1"))
        .unwrap();
    assert!(
        first.identifiers.contains(&Identifier::mac(mac).unwrap()),
        "the MAC stays where it was"
    );
    for device in &all {
        assert!(store.merges_of(&device.id).await.unwrap().is_empty());
        let armis_ids = device
            .identifiers
            .iter()
            .filter(|i| i.kind == IdKind::Armis)
            .count();
        assert_eq!(armis_ids, 1, "{device:?}");
    }
}

async fn a_shared_identifier_between_contradicting_devices_never_merges(backend: Backend) {
    let (_dir, store) = store(backend).await;
    let nb = |armis_id: &str, ip: &str| {
        sighting(
            json!({"armis_device_id": armis_id, "netbox_device_id": "7"}),
            Some(ip),
            None,
            "armis",
        )
    };
    run(&store, "t", "r1", vec![nb("1", "10.0.0.1")], 1).await;
    // Another Armis device claims the same NetBox id: two Armis ids cannot
    // be one device, so this is a conflict, not a merge.
    run(&store, "t", "r2", vec![nb("2", "10.0.0.2")], 2).await;
    let all = devices(&store, None).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    for device in &all {
        assert!(store.merges_of(&device.id).await.unwrap().is_empty());
        let armis_ids = device
            .identifiers
            .iter()
            .filter(|i| i.kind == IdKind::Armis)
            .count();
        assert_eq!(armis_ids, 1, "{device:?}");
    }
    let first = all
        .iter()
        .find(|d| d.ip.as_deref() == Some("10.0.0.1"))
        .unwrap();
    assert!(
        first
            .identifiers
            .contains(&Identifier::new(IdKind::Netbox, "7")),
        "the NetBox id stays with the device that had it"
    );
}

async fn a_shared_locally_administered_mac_stays_with_its_first_device(backend: Backend) {
    let (_dir, store) = store(backend).await;
    // A software-assigned MAC (0x02 bit) reported by two Armis devices.
    let local = "02:00:5E:10:00:01";
    run(
        &store,
        "t",
        "r1",
        vec![armis("1", "10.0.0.1", Some(local))],
        1,
    )
    .await;
    run(
        &store,
        "t",
        "r2",
        vec![armis("2", "10.0.0.2", Some(local))],
        2,
    )
    .await;
    let all = devices(&store, None).await;
    assert_eq!(all.len(), 2);
    let holders: Vec<&CanonicalDevice> = all
        .iter()
        .filter(|d| d.identifiers.contains(&Identifier::mac(local).unwrap()))
        .collect();
    assert_eq!(holders.len(), 1, "one device holds the MAC: {all:#?}");
    assert_eq!(holders[0].ip.as_deref(), Some("10.0.0.1"));
}

async fn merges_are_audited_and_unmerge_restores_both_devices(backend: Backend) {
    let (_dir, store) = store(backend).await;
    // Armis knows device 9; NetBox knows device 77; neither knows the other.
    run(&store, "t", "r1", vec![armis("9", "10.0.0.9", None)], 1).await;
    let netbox = sighting(
        json!({"netbox_device_id": "77", "site": "lab"}),
        Some("10.0.0.77"),
        None,
        "netbox",
    );
    run(&store, "t", "r2", vec![netbox], 2).await;
    let before = devices(&store, None).await;
    assert_eq!(before.len(), 2);
    // An update naming both: one device.
    let both = sighting(
        json!({"armis_device_id": "9", "netbox_device_id": "77"}),
        Some("10.0.0.9"),
        None,
        "armis",
    );
    run(&store, "t", "r3", vec![both], 3).await;
    let after = devices(&store, None).await;
    assert_eq!(after.len(), 1);
    let survivor = &after[0];
    assert_eq!(survivor.sources, vec!["armis", "netbox"]);
    assert!(survivor
        .identifiers
        .contains(&Identifier::new(IdKind::Netbox, "77")));
    let merges = store.merges_of(&survivor.id).await.unwrap();
    assert_eq!(merges.len(), 1);
    assert_eq!(
        merges[0].identifiers,
        vec![Identifier::new(IdKind::Netbox, "77")]
    );
    assert!(
        merges[0].reason.contains("netbox:77"),
        "{}",
        merges[0].reason
    );

    let undone = store
        .unmerge(&survivor.id)
        .await
        .unwrap()
        .expect("a merge to undo");
    assert_eq!(undone.from_device, merges[0].from_device);
    let restored = devices(&store, None).await;
    assert_eq!(restored.len(), 2);
    for original in &before {
        let now = restored.iter().find(|d| d.id == original.id).unwrap();
        assert_eq!(now.identifiers, original.identifiers, "{}", original.id);
        assert_eq!(now.sources, original.sources, "{}", original.id);
        assert_eq!(
            now.metadata.keys().collect::<Vec<_>>(),
            original.metadata.keys().collect::<Vec<_>>()
        );
        assert_eq!(now.merged_into, None);
    }
    assert!(
        store.unmerge(&survivor.id).await.unwrap().is_none(),
        "nothing left to undo"
    );
}

async fn ip_only_updates_land_on_the_ip_holder_and_ips_move(backend: Backend) {
    let (_dir, store) = store(backend).await;
    run(&store, "t", "r1", vec![armis("1", "10.0.0.5", None)], 1).await;
    let holder = devices(&store, None).await.remove(0);
    // An update with no strong identifier at that IP: the same device.
    let ip_only = sighting(json!({"os": "linux"}), Some("10.0.0.5"), None, "netbox");
    run(&store, "t", "r2", vec![ip_only], 2).await;
    let all = devices(&store, None).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].id, holder.id);
    assert_eq!(all[0].sources, vec!["armis", "netbox"]);
    // DHCP churn: a new Armis device gets that IP. It is a new device (never
    // attached to the IP holder), and the old holder loses the IP.
    run(&store, "t", "r3", vec![armis("2", "10.0.0.5", None)], 3).await;
    let all = devices(&store, None).await;
    assert_eq!(all.len(), 2);
    let old = all.iter().find(|d| d.id == holder.id).unwrap();
    let new = all.iter().find(|d| d.id != holder.id).unwrap();
    assert_eq!(
        (old.ip.as_deref(), new.ip.as_deref()),
        (None, Some("10.0.0.5"))
    );
}

async fn the_order_of_a_runs_updates_does_not_matter(backend: Backend) {
    // Updates that interact: an IP handed from one device to another, an
    // IP-only update, a merge.
    let inventory = vec![
        armis("1", "10.0.0.2", None),
        armis("2", "10.0.0.3", None),
        sighting(json!({}), Some("10.0.0.3"), None, "netbox"),
        sighting(
            json!({"armis_device_id": "1", "netbox_device_id": "5"}),
            Some("10.0.0.2"),
            None,
            "netbox",
        ),
        sighting(
            json!({"netbox_device_id": "5"}),
            Some("10.0.0.9"),
            None,
            "netbox",
        ),
    ];
    let mut outcomes = Vec::new();
    for rotation in 0..inventory.len() {
        let (_dir, store) = store(backend).await;
        run(
            &store,
            "t",
            "seed",
            vec![armis("1", "10.0.0.1", None), armis("2", "10.0.0.2", None)],
            1,
        )
        .await;
        let mut order = inventory.clone();
        order.rotate_left(rotation);
        if rotation % 2 == 1 {
            order.reverse();
        }
        run(&store, "t", "r", order, 2).await;
        outcomes.push(devices(&store, None).await);
    }
    for outcome in &outcomes[1..] {
        assert_eq!(outcome, &outcomes[0]);
    }
}

mod order_independence {
    use super::*;
    use proptest::prelude::*;

    /// Sightings over a small universe of Armis ids, NetBox ids, MACs and
    /// IPs, so that they collide: shared IPs, shared MACs, merges.
    fn arb_sighting() -> impl Strategy<Value = Sighting> {
        (
            prop::option::of(0u8..6),
            prop::option::of(0u8..4),
            prop::option::of(0u8..4),
            prop::option::of(0u8..5),
            prop::sample::select(vec!["armis", "netbox"]),
            0u8..3,
        )
            .prop_filter("an IP or a strong identifier", |(a, n, m, ip, _, _)| {
                a.is_some() || n.is_some() || m.is_some() || ip.is_some()
            })
            .prop_map(|(armis_id, netbox_id, mac, ip, source, tag)| {
                let mut metadata = json!({"tag": tag.to_string()});
                if let Some(a) = armis_id {
                    metadata["armis_device_id"] = json!(a.to_string());
                }
                if let Some(n) = netbox_id {
                    metadata["netbox_device_id"] = json!(n.to_string());
                }
                let mac = mac.map(|m| format!("00:1A:2B:00:00:{m:02X}"));
                let ip = ip.map(|i| format!("10.0.0.{i}"));
                sighting(metadata, ip.as_deref(), mac.as_deref(), source)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_order_of_a_run_gives_the_same_devices_on_both_backends(
            seed_run in prop::collection::vec(arb_sighting(), 0..8),
            run in prop::collection::vec(arb_sighting(), 1..14)
                .prop_flat_map(|v| { let n = v.len(); (Just(v), Just(()).prop_perturb(move |_, mut rng| {
                    let mut order: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() { order.swap(i, rng.random_range(0..=i)); }
                    order
                })) }),
        ) {
            let (sightings, permutation) = run;
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let outcome = |backend: Backend, order: Vec<Sighting>| {
                runtime.block_on(async {
                    let (_dir, store) = store(backend).await;
                    super::run(&store, "t", "seed", seed_run.clone(), 1).await;
                    super::run(&store, "t", "r", order, 2).await;
                    devices(&store, None).await
                })
            };
            let shuffled: Vec<Sighting> = permutation.iter().map(|&i| sightings[i].clone()).collect();
            let first = outcome(Backend::Sqlite, sightings.clone());
            // Structural invariants: an identifier and an IP belong to one
            // live device at most.
            let mut identifiers = std::collections::BTreeSet::new();
            let mut ips = std::collections::BTreeSet::new();
            for device in &first {
                for id in &device.identifiers {
                    prop_assert!(identifiers.insert(id.clone()), "{} held twice", id);
                }
                if let Some(ip) = &device.ip {
                    prop_assert!(ips.insert(ip.clone()), "{} held twice", ip);
                }
            }
            prop_assert_eq!(&first, &outcome(Backend::Sqlite, shuffled));
            // The backends agree (PostgreSQL reconciles in prefetched
            // batches, SQLite row by row).
            prop_assert_eq!(&first, &outcome(Backend::Postgres, sightings));
        }
    }
}

on_both_backends!(
    faker_churn_keeps_exactly_one_device_per_device,
    scopes_never_meet,
    replaying_a_run_changes_nothing,
    a_mac_only_conflict_never_merges,
    a_shared_identifier_between_contradicting_devices_never_merges,
    a_shared_locally_administered_mac_stays_with_its_first_device,
    merges_are_audited_and_unmerge_restores_both_devices,
    ip_only_updates_land_on_the_ip_holder_and_ips_move,
    the_order_of_a_runs_updates_does_not_matter,
);
