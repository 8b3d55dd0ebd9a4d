//! The resolution rules of gateway.md §5, once, for every backend.
//!
//! For one sighting in (tenant, partition):
//! 1. look up every strong identifier; the device holding the
//!    highest-priority one is the canonical device;
//! 2. other devices linked by a *non-MAC* identifier of the same update are
//!    the same device: merged into it (audited, reversible). A device linked
//!    only by a MAC is left alone — MAC-only conflicts never auto-merge;
//! 3. no hit but strong identifiers ⇒ a new device, even if another device
//!    holds the IP (DHCP churn: the new device takes the IP);
//! 4. no strong identifier ⇒ the device holding the IP, else a new device;
//! 5. the IP moves to the newest sighting: its previous holder loses it.
//!
//! A run's sightings are reconciled in [`order`]: sorted, so the outcome does
//! not depend on chunk order or batch size.

use serde_json::{Map, Value};

use super::{canonical_id, CanonicalDevice, Identifier, Sighting};

/// Where a sighting is reconciled: nothing matches across scopes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scope<'a> {
    pub tenant: &'a str,
    pub partition: &'a str,
}

/// A merge, as audited: enough to undo it.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeRecord {
    pub tenant: String,
    pub partition: String,
    pub from: String,
    pub into: String,
    pub reason: String,
    /// Identifiers moved from `from` to `into`.
    pub identifiers: Vec<Identifier>,
    /// Both devices as they were just before the merge.
    pub from_before: CanonicalDevice,
    pub into_before: CanonicalDevice,
    pub at: i64,
}

/// What a backend provides: lookups and writes inside its transaction.
pub trait DeviceIndex {
    type Error;
    /// The live device holding `id` in `scope`.
    fn holder(&mut self, scope: Scope<'_>, id: &Identifier) -> Result<Option<String>, Self::Error>;
    /// The live device holding `ip` in `scope`.
    fn holder_of_ip(&mut self, scope: Scope<'_>, ip: &str) -> Result<Option<String>, Self::Error>;
    /// A device with its identifiers.
    fn load(
        &mut self,
        scope: Scope<'_>,
        device: &str,
    ) -> Result<Option<CanonicalDevice>, Self::Error>;
    /// Any device of the scope other than `keeper` holding `ip` loses it.
    fn release_ip(&mut self, scope: Scope<'_>, ip: &str, keeper: &str) -> Result<(), Self::Error>;
    /// Creates or updates a device's row, with its list of identifiers (the
    /// index of who holds which identifier is kept by [`Self::attach`]).
    fn store(&mut self, device: &CanonicalDevice) -> Result<(), Self::Error>;
    /// Only `last_seen` and `last_run_id` of a device changed.
    fn touch(&mut self, device: &str, last_seen: i64, run_id: &str) -> Result<(), Self::Error>;
    /// Points `id` at `device` (inserting or moving it).
    fn attach(
        &mut self,
        scope: Scope<'_>,
        id: &Identifier,
        device: &str,
    ) -> Result<(), Self::Error>;
    fn record_merge(&mut self, merge: &MergeRecord) -> Result<(), Self::Error>;
}

/// Counts of one reconciliation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub created: u64,
    pub updated: u64,
    pub merged: u64,
}

/// Sorts a run's sightings into the order they are reconciled in.
pub fn order(sightings: &mut [(String, Sighting)]) {
    sightings.sort_by(|(pa, a), (pb, b)| {
        (pa, a.order_key())
            .cmp(&(pb, b.order_key()))
            // Ties (the same device twice in a run, which agents avoid)
            // are broken on everything else, so the order is total.
            .then_with(|| a.tie_cmp(b))
    });
}

/// Reconciles one sighting; returns the canonical device's id.
pub fn reconcile<I: DeviceIndex>(
    index: &mut I,
    scope: Scope<'_>,
    sighting: Sighting,
    run_id: &str,
    now: i64,
    outcome: &mut Outcome,
) -> Result<Option<String>, I::Error> {
    // A locally administered MAC identifies only when nothing stronger does
    // (it is still looked up, so that it is never given to a second device).
    let has_strong = sighting
        .identifiers
        .iter()
        .any(|id| !id.is_medium_confidence());
    let identifies = |id: &Identifier| !(has_strong && id.is_medium_confidence());
    // Who holds each identifier. A device loaded on the way answers for
    // the identifiers it holds without another query (in a steady re-sync,
    // the strongest identifier finds the device and the rest are its own).
    let mut loaded: Vec<CanonicalDevice> = Vec::new();
    let mut hits: Vec<(&Identifier, Option<String>)> =
        Vec::with_capacity(sighting.identifiers.len());
    for id in &sighting.identifiers {
        let known = loaded
            .iter()
            .find(|d| d.identifiers.contains(id))
            .map(|d| d.id.clone());
        let holder = match known {
            Some(holder) => Some(holder),
            None => {
                let holder = index.holder(scope, id)?;
                if let Some(holder) = &holder {
                    if !loaded.iter().any(|d| d.id == *holder) {
                        if let Some(device) = index.load(scope, holder)? {
                            loaded.push(device);
                        }
                    }
                }
                holder
            }
        };
        hits.push((id, holder));
    }

    // The canonical device: the holder of the highest-priority identifier,
    // unless it contradicts the update (holds another value of a non-MAC
    // kind the update carries: a different device sharing, say, a MAC).
    let mut canonical = None;
    for (hit, holder) in &hits {
        let Some(id) = holder.as_ref().filter(|_| identifies(hit)) else {
            continue;
        };
        let Some(position) = loaded.iter().position(|d| d.id == *id) else {
            continue;
        };
        if !contradicts(&loaded[position], &sighting) {
            canonical = Some(loaded.swap_remove(position));
            break;
        }
    }
    let mut device = match canonical {
        Some(device) => device,
        None if !sighting.identifiers.is_empty() => new_device(scope, &sighting, now),
        None => {
            let Some(ip) = sighting.ip.as_deref() else {
                // Ingestion drops updates with neither; nothing to do.
                return Ok(None);
            };
            match index.holder_of_ip(scope, ip)? {
                Some(id) => index
                    .load(scope, &id)?
                    .unwrap_or_else(|| new_device(scope, &sighting, now)),
                None => new_device(scope, &sighting, now),
            }
        }
    };
    let created = device.last_run_id.is_empty();

    // Merges: devices tied to this one by a non-MAC identifier, unless
    // they contradict the update (another device that shares an identifier:
    // a conflict for a person to look at, never an automatic merge).
    let mut merged: Vec<String> = Vec::new();
    for (id, holder) in &hits {
        let Some(other) = holder else { continue };
        if *other == device.id || id.is_mac() || merged.contains(other) {
            continue;
        }
        // Every holder was loaded above.
        let Some(position) = loaded.iter().position(|d| d.id == *other) else {
            continue;
        };
        if contradicts(&loaded[position], &sighting) {
            continue;
        }
        let reason = format!(
            "one update carries {} (held by {other}) and an identifier of {}",
            id, device.id
        );
        let from = loaded.swap_remove(position);
        merged.push(from.id.clone());
        merge(index, scope, &mut device, from, reason, now)?;
        outcome.merged += 1;
    }

    // Identifiers nobody holds yet. One held by another device that was not
    // merged (a MAC-only link, a contradicting device) stays where it is;
    // a merged device's identifiers came with the merge.
    let mut attached = false;
    for (id, holder) in &hits {
        if holder.is_none() && !device.identifiers.contains(id) {
            index.attach(scope, id, &device.id)?;
            device.identifiers.push((*id).clone());
            attached = true;
        }
    }

    // The IP moves to the newest sighting (rule 5).
    if let Some(ip) = sighting.ip.as_deref() {
        if device.ip.as_deref() != Some(ip) || created {
            index.release_ip(scope, ip, &device.id)?;
        }
    }
    let attributes_changed = apply(&mut device, sighting, run_id, now);
    if created || attributes_changed || !merged.is_empty() || attached {
        index.store(&device)?;
    } else {
        // A re-sync that only confirms the device: move the clock.
        index.touch(&device.id, device.last_seen, run_id)?;
    }
    if created {
        outcome.created += 1;
    } else {
        outcome.updated += 1;
    }
    Ok(Some(device.id))
}

/// The device already holds a different value of a non-MAC identifier kind
/// the sighting carries (two Armis ids, say): it is another device.
fn contradicts(device: &CanonicalDevice, sighting: &Sighting) -> bool {
    sighting
        .identifiers
        .iter()
        .filter(|id| !id.is_mac())
        .any(|id| {
            device
                .identifiers
                .iter()
                .any(|held| held.kind == id.kind && held.value != id.value)
        })
}

fn new_device(scope: Scope<'_>, sighting: &Sighting, now: i64) -> CanonicalDevice {
    let first = sighting.identifiers.first();
    CanonicalDevice {
        id: canonical_id(
            scope.tenant,
            scope.partition,
            first,
            sighting.ip.as_deref().unwrap_or_default(),
        ),
        tenant: scope.tenant.to_owned(),
        partition: scope.partition.to_owned(),
        ip: None,
        mac: None,
        hostname: None,
        sources: Vec::new(),
        metadata: Default::default(),
        first_seen: now,
        last_seen: now,
        last_run_id: String::new(),
        merged_into: None,
        identifiers: Vec::new(),
    }
}

/// The sighting's attributes become the device's current ones. Returns
/// whether anything but `last_seen` and `last_run_id` changed.
fn apply(device: &mut CanonicalDevice, sighting: Sighting, run_id: &str, now: i64) -> bool {
    let mut changed = false;
    for (field, new) in [
        (&mut device.ip, sighting.ip),
        (&mut device.mac, sighting.mac),
        (&mut device.hostname, sighting.hostname),
    ] {
        if new.is_some() && *field != new {
            *field = new;
            changed = true;
        }
    }
    if !device.sources.contains(&sighting.source) {
        device.sources.push(sighting.source.clone());
        device.sources.sort();
        changed = true;
    }
    if device.metadata.get(&sighting.source) != Some(&sighting.metadata) {
        device.metadata.insert(sighting.source, sighting.metadata);
        changed = true;
    }
    device.identifiers.sort();
    if now < device.first_seen {
        device.first_seen = now;
        changed = true;
    }
    device.last_seen = device.last_seen.max(now);
    device.last_run_id = run_id.to_owned();
    changed
}

/// Folds `from` into `into`: identifiers move, sources and metadata join,
/// `from` stays as a merged tombstone; the audit row keeps both as they were.
fn merge<I: DeviceIndex>(
    index: &mut I,
    scope: Scope<'_>,
    into: &mut CanonicalDevice,
    from_before: CanonicalDevice,
    reason: String,
    now: i64,
) -> Result<(), I::Error> {
    let into_before = into.clone();
    for id in &from_before.identifiers {
        index.attach(scope, id, &into.id)?;
        if !into.identifiers.contains(id) {
            into.identifiers.push(id.clone());
        }
    }
    for source in &from_before.sources {
        if !into.sources.contains(source) {
            into.sources.push(source.clone());
        }
    }
    into.sources.sort();
    for (source, metadata) in &from_before.metadata {
        into.metadata
            .entry(source.clone())
            .or_insert_with(|| metadata.clone());
    }
    into.first_seen = into.first_seen.min(from_before.first_seen);
    if into.ip.is_none() {
        into.ip = from_before.ip.clone();
    }
    let mut tombstone = from_before.clone();
    tombstone.merged_into = Some(into.id.clone());
    tombstone.ip = None;
    tombstone.identifiers.clear();
    index.store(&tombstone)?;
    index.record_merge(&MergeRecord {
        tenant: scope.tenant.to_owned(),
        partition: scope.partition.to_owned(),
        from: from_before.id.clone(),
        into: into.id.clone(),
        reason,
        identifiers: from_before.identifiers.clone(),
        from_before,
        into_before,
        at: now,
    })
}

/// What undoing `merge` gives back: `from` as it was, and `into` without
/// what `from` brought (identifiers, sources it alone had, their metadata).
pub fn unmerged(
    merge: &MergeRecord,
    into_now: &CanonicalDevice,
) -> (CanonicalDevice, CanonicalDevice) {
    let from = merge.from_before.clone();
    let mut into = into_now.clone();
    into.identifiers
        .retain(|id| !merge.identifiers.contains(id));
    let brought: Vec<&String> = from
        .sources
        .iter()
        .filter(|s| !merge.into_before.sources.contains(s))
        .collect();
    into.sources.retain(|s| !brought.contains(&s));
    for source in brought {
        into.metadata.remove(source);
    }
    into.first_seen = merge.into_before.first_seen;
    if into.ip.is_some() && into.ip == from.ip && merge.into_before.ip != from.ip {
        into.ip = merge.into_before.ip.clone();
    }
    (from, into)
}

/// Metadata as stored per source (helper for backends).
pub fn metadata_map(value: Value) -> std::collections::BTreeMap<String, Map<String, Value>> {
    match value {
        Value::Object(per_source) => per_source
            .into_iter()
            .filter_map(|(source, m)| match m {
                Value::Object(m) => Some((source, m)),
                _ => None,
            })
            .collect(),
        _ => Default::default(),
    }
}
