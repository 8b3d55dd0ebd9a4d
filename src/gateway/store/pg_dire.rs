//! DIRE (gateway.md §5) on PostgreSQL, set-based: the fast path of a run's
//! reconciliation.
//!
//! The rules live only in [`reconcile::reconcile`]; this module provides the
//! [`DeviceIndex`] it runs against. A row-at-a-time index would cost a few
//! round trips per sighting; instead a run is cut into batches and, per
//! batch:
//!
//! 1. PREFETCH: at most four set-based queries fetch who holds the
//!    identifiers and IPs the batch's sightings carry, with the devices they
//!    point at (first the strongest identifier of each sighting, then
//!    whatever those devices do not already explain);
//! 2. the batch is reconciled sighting by sighting against an in-memory
//!    overlay of the database ([`State`]): reads see the batch's own writes,
//!    writes stay in memory. A lookup the prefetch did not cover falls back
//!    to a query, which is exact because every row the batch changed is in
//!    the overlay (the database is only believed about rows the overlay
//!    does not hold) — so correctness never depends on the prefetch, only
//!    speed does;
//! 3. FLUSH: the overlay's changes go out in at most six set-based
//!    statements, whatever the batch's size.
//!
//! The connection and the CPU take turns in a pipeline: while a worker
//! thread reconciles batch k, the connection flushes batch k-1 and then
//! prefetches batch k+1. That prefetch reads the database as batch k-1 left
//! it, so its answers are corrected by batch k's final overlay before batch
//! k+1 starts ([`State::after`]); a fallback query of batch k waits for
//! batch k-1's flush (the connection's lock is held from before the worker
//! starts until that flush is done). Each batch therefore sees exactly what
//! row-at-a-time reconciliation would have left: the outcome does not depend
//! on the batch size.
//!
//! Several gateways may share the database: a run first takes a
//! transaction-scoped advisory lock per (tenant, partition) it touches, so
//! runs of one scope serialise and each sees what the previous committed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use postgres::{Row, Statement, Transaction};

// The JSON encodings of the columns and of audited devices are the store's,
// whatever the backend.
use super::canonical::{device_at, to_json, with_identifiers, DEVICE_FIELDS};
use super::db::{DbError, Row as DbRow};
use crate::gateway::dire::reconcile::{self, DeviceIndex, MergeRecord, Outcome, Scope};
use crate::gateway::dire::{CanonicalDevice, IdKind, Identifier, Sighting};

/// Sightings per batch. Larger batches mean fewer round trips but more
/// memory, and a longer pipeline fill (the first prefetch and reconcile)
/// and drain (the last flush), which nothing overlaps. Measured on a 2-core
/// box (50,000 Faker devices): 2,000 gave ~26k devices/s, 5,000 ~30k,
/// 10,000 ~28k; a 5,000-sighting overlay is a few megabytes.
pub(super) const BATCH_SIZE: usize = 5_000;

/// The advisory lock of one (tenant, partition), held until the transaction
/// ends. Anything else that writes canonical devices of a scope on
/// PostgreSQL should take the same lock. (A hash collision between two
/// scopes only makes them wait for each other.)
pub(super) const SCOPE_LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2::text, 0))";

/// Reconciles one run of `tenant` on PostgreSQL inside `tx` (the caller
/// commits): sorted with [`reconcile::order`], then reconciled in batches of
/// `batch_size` sightings (0 counts as 1); the outcome is the same for every
/// batch size.
pub(super) fn reconcile_run(
    tx: &mut Transaction<'_>,
    tenant: &str,
    run_id: &str,
    sightings: Vec<(String, Sighting)>,
    now: i64,
    batch_size: usize,
) -> Result<Outcome, DbError> {
    reconcile_run_with(tx, tenant, run_id, sightings, now, batch_size, true)
}

/// [`reconcile_run`]; `prefetch` is switched off only by tests, to send
/// every lookup through the fallback queries.
fn reconcile_run_with(
    tx: &mut Transaction<'_>,
    tenant: &str,
    run_id: &str,
    mut sightings: Vec<(String, Sighting)>,
    now: i64,
    batch_size: usize,
    prefetch: bool,
) -> Result<Outcome, DbError> {
    // Locks first, before anything is read, in a fixed order so that two
    // runs spanning the same scopes cannot deadlock.
    let partitions: BTreeSet<String> = sightings.iter().map(|(p, _)| p.clone()).collect();
    if partitions.is_empty() {
        return Ok(Outcome::default());
    }
    let lock = tx.prepare(SCOPE_LOCK_SQL)?;
    for partition in &partitions {
        tx.execute(&lock, &[&tenant, partition])?;
    }

    reconcile::order(&mut sightings);
    let batch_size = batch_size.max(1);
    let mut batches = Vec::with_capacity(sightings.len().div_ceil(batch_size));
    let mut rest = sightings.into_iter();
    loop {
        let batch: Vec<(String, Sighting)> = rest.by_ref().take(batch_size).collect();
        if batch.is_empty() {
            break;
        }
        batches.push(batch);
    }
    let statements = Statements::prepare(tx)?;
    let run = RunContext {
        tenant,
        run_id,
        now,
        statements: &statements,
        prefetch,
    };
    pipeline(&Mutex::new(tx), &run, batches)
}

/// What every stage of a run needs.
struct RunContext<'r> {
    tenant: &'r str,
    run_id: &'r str,
    now: i64,
    statements: &'r Statements,
    prefetch: bool,
}

/// The run's transaction, shared by the connection's stages (main thread)
/// and the reconciling worker's fallback queries.
type Connection<'c, 't> = Mutex<&'c mut Transaction<'t>>;

fn lock<'g, 'c, 't>(conn: &'g Connection<'c, 't>) -> MutexGuard<'g, &'c mut Transaction<'t>> {
    // A panicking holder leaves nothing half-done in the guarded value (a
    // failed statement is the transaction's own business, reported by its
    // next use): carry on.
    conn.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the batches: iteration k reconciles batch k on a worker thread while
/// this thread flushes batch k-1 and prefetches batch k+1.
fn pipeline(
    conn: &Connection<'_, '_>,
    run: &RunContext<'_>,
    batches: Vec<Vec<(String, Sighting)>>,
) -> Result<Outcome, DbError> {
    let mut outcome = Outcome::default();
    let mut batches = batches.into_iter();
    let Some(first) = batches.next() else {
        return Ok(outcome);
    };
    let fetched = prefetch(&mut lock(conn), run, &first)?;
    let mut next = Some((first, fetched, None));
    let mut pending: Option<FlushSet> = None;

    while let Some((batch, fetched, previous)) = next.take() {
        let following = batches.next();
        let (flushed, reconciled, fetched) = std::thread::scope(|threads| {
            // Taken before the worker starts and held until batch k-1 is
            // written: the worker's fallback queries must see it.
            let mut guard = lock(conn);
            let worker =
                threads.spawn(move || reconcile_batch(conn, run, fetched, previous, batch));
            let flushed = match pending.take() {
                Some(flush) => flush.write(&mut guard, run.statements),
                None => Ok(()),
            };
            drop(guard);
            let fetched = match (&flushed, &following) {
                (Ok(()), Some(batch)) => prefetch(&mut lock(conn), run, batch).map(Some),
                _ => Ok(None),
            };
            let reconciled = match worker.join() {
                Ok(reconciled) => reconciled,
                // Not ours to swallow: the worker's panic goes on here.
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (flushed, reconciled, fetched)
        });
        // The first failure is the one to report: after it, the
        // transaction refuses everything else.
        flushed?;
        let (state, flush, batch_outcome) = reconciled?;
        let fetched = fetched?;
        outcome.created += batch_outcome.created;
        outcome.updated += batch_outcome.updated;
        outcome.merged += batch_outcome.merged;
        pending = Some(flush);
        if let (Some(batch), Some(fetched)) = (following, fetched) {
            next = Some((batch, fetched, Some(state)));
        }
    }
    if let Some(flush) = pending {
        flush.write(&mut lock(conn), run.statements)?;
    }
    Ok(outcome)
}

/// Reconciles one batch (on the worker thread): builds its overlay from its
/// prefetch and the previous batch's final overlay, runs the rules, and
/// returns the overlay's final state, what to write, and the counts.
fn reconcile_batch(
    conn: &Connection<'_, '_>,
    run: &RunContext<'_>,
    fetched: Prefetched,
    previous: Option<State>,
    batch: Vec<(String, Sighting)>,
) -> Result<(State, FlushSet, Outcome), DbError> {
    let state = State::after(run.tenant, &batch, fetched, previous)?;
    let mut overlay = Overlay { conn, run, state };
    let mut outcome = Outcome::default();
    for (partition, sighting) in batch {
        let scope = Scope {
            tenant: run.tenant,
            partition: &partition,
        };
        reconcile::reconcile(
            &mut overlay,
            scope,
            sighting,
            run.run_id,
            run.now,
            &mut outcome,
        )?;
    }
    let flush = overlay.state.flush_set(run.tenant);
    Ok((overlay.state, flush, outcome))
}

/// Every statement of a run, prepared once.
struct Statements {
    prefetch_identifiers: Statement,
    prefetch_ips: Statement,
    holder: Statement,
    holder_of_ip: Statement,
    load: Statement,
    clear_ips: Statement,
    upsert_devices: Statement,
    touch_devices: Statement,
    insert_identifiers: Statement,
    upsert_identifiers: Statement,
    insert_merges: Statement,
}

impl Statements {
    fn prepare(tx: &mut Transaction<'_>) -> Result<Self, DbError> {
        // Prefetches: rows answer by position in the request (WITH
        // ORDINALITY), with the holder's row when there is one. The LATERAL
        // subqueries with LIMIT are not flattened, so every key is one
        // index probe whatever the planner thinks of the tables' size (a
        // hash join would read whole tables, batch after batch).
        let with_device = format!(
            "LEFT JOIN LATERAL (SELECT {DEVICE_FIELDS} FROM canonical_devices
                                WHERE id = h.device_id LIMIT 1) AS c ON TRUE"
        );
        Ok(Self {
            prefetch_identifiers: tx.prepare(&format!(
                "SELECT u.n, h.device_id, c.*
                 FROM UNNEST($2::text[], $3::text[], $4::text[]) WITH ORDINALITY
                      AS u(partition, kind, value, n)
                 CROSS JOIN LATERAL (SELECT device_id FROM device_identifiers
                      WHERE tenant = $1::text AND partition = u.partition AND kind = u.kind
                        AND value = u.value LIMIT 1) AS h
                 {with_device}"
            ))?,
            // `ip IS NOT NULL` lets the planner use the partial unique index.
            prefetch_ips: tx.prepare(&format!(
                "SELECT u.n, h.device_id, c.*
                 FROM UNNEST($2::text[], $3::text[]) WITH ORDINALITY AS u(partition, ip, n)
                 CROSS JOIN LATERAL (SELECT id AS device_id FROM canonical_devices
                      WHERE tenant = $1::text AND partition = u.partition AND ip = u.ip
                        AND ip IS NOT NULL LIMIT 1) AS h
                 {with_device}"
            ))?,
            holder: tx.prepare(
                "SELECT device_id FROM device_identifiers
                 WHERE tenant = $1::text AND partition = $2::text AND kind = $3::text
                   AND value = $4::text",
            )?,
            holder_of_ip: tx.prepare(
                "SELECT id FROM canonical_devices
                 WHERE tenant = $1::text AND partition = $2::text AND ip = $3::text",
            )?,
            load: tx.prepare(&format!(
                "SELECT {DEVICE_FIELDS} FROM canonical_devices WHERE id = $1::text"
            ))?,
            // A row whose IP is about to change lets go of it first: the
            // unique index on (tenant, partition, ip) is checked row by row,
            // so without this step two devices swapping IPs (or one taking
            // the IP of a device written later in the same statement) would
            // collide half-way through the upsert. `id = ANY` gives the
            // planner an index path on the table.
            clear_ips: tx.prepare(
                "UPDATE canonical_devices AS c SET ip = NULL
                 FROM UNNEST($1::text[], $2::text[]) AS u(id, ip)
                 WHERE c.id = u.id AND c.id = ANY($1::text[])
                   AND c.ip IS NOT NULL AND c.ip IS DISTINCT FROM u.ip",
            )?,
            upsert_devices: tx.prepare(
                "INSERT INTO canonical_devices (id, tenant, partition, ip, mac, hostname, sources,
                     metadata, first_seen, last_seen, last_run_id, merged_into, identifiers)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[],
                     $12::text[], $13::text[])
                 ON CONFLICT (id) DO UPDATE SET ip = excluded.ip, mac = excluded.mac,
                     hostname = excluded.hostname, sources = excluded.sources,
                     metadata = excluded.metadata, first_seen = excluded.first_seen,
                     last_seen = excluded.last_seen, last_run_id = excluded.last_run_id,
                     merged_into = excluded.merged_into, identifiers = excluded.identifiers",
            )?,
            touch_devices: tx.prepare(
                "UPDATE canonical_devices AS c
                 SET ip = u.ip, last_seen = u.last_seen, last_run_id = u.last_run_id
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[])
                      AS u(id, ip, last_seen, last_run_id)
                 WHERE c.id = u.id AND c.id = ANY($1::text[])",
            )?,
            insert_identifiers: tx.prepare(
                "INSERT INTO device_identifiers (tenant, partition, kind, value, device_id)
                 SELECT $1::text, u.partition, u.kind, u.value, u.device_id
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[])
                      AS u(partition, kind, value, device_id)",
            )?,
            upsert_identifiers: tx.prepare(
                "INSERT INTO device_identifiers (tenant, partition, kind, value, device_id)
                 SELECT $1::text, u.partition, u.kind, u.value, u.device_id
                 FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[])
                      AS u(partition, kind, value, device_id)
                 ON CONFLICT (tenant, partition, kind, value)
                     DO UPDATE SET device_id = excluded.device_id",
            )?,
            // ORDER BY the position: ids are drawn above the sorted
            // subquery, so audit rows keep the order the merges happened in.
            insert_merges: tx.prepare(
                "INSERT INTO device_merges (tenant, partition, from_device, into_device, reason,
                     identifiers, from_before, into_before, merged_at)
                 SELECT u.tenant, u.partition, u.from_device, u.into_device, u.reason,
                        u.identifiers, u.from_before, u.into_before, u.merged_at
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                      $6::text[], $7::text[], $8::text[], $9::bigint[]) WITH ORDINALITY
                      AS u(tenant, partition, from_device, into_device, reason, identifiers,
                           from_before, into_before, merged_at, n)
                 ORDER BY u.n",
            )?,
        })
    }
}

/// Identifier key within the run's tenant: (partition, kind, value).
type IdKey = (String, IdKind, String);
/// IP key within the run's tenant: (partition, ip).
type IpKey = (String, String);

/// What a prefetch read, as the database stood when it ran. Keys are
/// positions in the batch: the connection's thread, the pipeline's
/// bottleneck, neither copies them nor decodes devices (the worker does).
#[derive(Default)]
struct Prefetched {
    /// (sighting, identifier) positions, with the holder found.
    identifiers: Vec<(usize, usize, Option<String>)>,
    /// The sighting whose IP was asked about, with the holder found.
    ips: Vec<(usize, Option<String>)>,
    /// Devices the answers name (`None`: named, but no row).
    devices: HashMap<String, Option<FetchedDevice>>,
}

/// A device's columns in a fetched row, from column `at` on.
struct FetchedDevice {
    row: Row,
    at: usize,
}

impl FetchedDevice {
    fn decode(&self) -> Result<CanonicalDevice, DbError> {
        device_at(&DbRow::Postgres(&self.row), self.at)
    }

    /// Just what the second round of a prefetch needs.
    fn ip_and_identifiers(&self) -> Result<(Option<String>, Vec<Identifier>), DbError> {
        let identifiers: &str = self.row.try_get(self.at + 12)?;
        Ok((
            self.row.try_get(self.at + 3)?,
            serde_json::from_str(identifiers).unwrap_or_default(),
        ))
    }
}

/// An identifier request: (sighting, identifier) position and the key.
type IdRequest<'b> = (usize, usize, &'b str, &'b Identifier);
/// An IP request: the sighting and the key.
type IpRequest<'b> = (usize, &'b str, &'b str);

/// Reads what `batch` will look up, in two rounds of at most two queries:
/// first the strongest identifier of every sighting (and the IP of those
/// without identifiers), with the devices holding them; then the other
/// identifiers and IPs, unless the device found in the first round already
/// accounts for them (a steady re-sync asks no second question). Anything
/// skipped is still answered, by a fallback query, if it is ever looked up.
fn prefetch(
    tx: &mut Transaction<'_>,
    run: &RunContext<'_>,
    batch: &[(String, Sighting)],
) -> Result<Prefetched, DbError> {
    let mut fetched = Prefetched::default();
    if !run.prefetch {
        return Ok(fetched);
    }
    // Requested keys, with their index in `fetched.identifiers`.
    let mut asked: HashMap<(&str, IdKind, &str), usize> = HashMap::with_capacity(batch.len() * 2);
    let mut asked_ips: HashSet<(&str, &str)> = HashSet::with_capacity(batch.len());
    let mut ids: Vec<IdRequest<'_>> = Vec::with_capacity(batch.len());
    let mut ips: Vec<IpRequest<'_>> = Vec::new();
    for (s, (partition, sighting)) in batch.iter().enumerate() {
        match (sighting.identifiers.first(), &sighting.ip) {
            (Some(id), _) => {
                let key = (partition.as_str(), id.kind, id.value.as_str());
                if !asked.contains_key(&key) {
                    asked.insert(key, asked.len());
                    ids.push((s, 0, partition, id));
                }
            }
            (None, Some(ip)) => {
                if asked_ips.insert((partition, ip)) {
                    ips.push((s, partition, ip));
                }
            }
            (None, None) => {}
        }
    }
    fetched.query_identifiers(tx, run, &ids)?;
    fetched.query_ips(tx, run, &ips)?;

    ids.clear();
    ips.clear();
    for (s, (partition, sighting)) in batch.iter().enumerate() {
        let Some(first) = sighting.identifiers.first() else {
            continue;
        };
        let (holder_ip, holder_ids) = match asked
            .get(&(partition.as_str(), first.kind, first.value.as_str()))
            .and_then(|&i| fetched.identifiers.get(i))
            .and_then(|(_, _, holder)| holder.as_ref())
            .and_then(|holder| fetched.devices.get(holder))
            .and_then(|device| device.as_ref())
        {
            Some(device) => device.ip_and_identifiers()?,
            None => (None, Vec::new()),
        };
        for (j, id) in sighting.identifiers.iter().enumerate().skip(1) {
            let key = (partition.as_str(), id.kind, id.value.as_str());
            if !holder_ids.contains(id) && !asked.contains_key(&key) {
                asked.insert(key, asked.len());
                ids.push((s, j, partition, id));
            }
        }
        if let Some(ip) = &sighting.ip {
            if holder_ip.as_ref() != Some(ip) && asked_ips.insert((partition, ip)) {
                ips.push((s, partition, ip));
            }
        }
    }
    fetched.query_identifiers(tx, run, &ids)?;
    fetched.query_ips(tx, run, &ips)?;
    Ok(fetched)
}

impl Prefetched {
    fn query_identifiers(
        &mut self,
        tx: &mut Transaction<'_>,
        run: &RunContext<'_>,
        requests: &[IdRequest<'_>],
    ) -> Result<(), DbError> {
        if requests.is_empty() {
            return Ok(());
        }
        let partitions: Vec<&str> = requests.iter().map(|r| r.2).collect();
        let kinds: Vec<&str> = requests.iter().map(|r| r.3.kind.as_str()).collect();
        let values: Vec<&str> = requests.iter().map(|r| r.3.value.as_str()).collect();
        let rows = tx.query(
            &run.statements.prefetch_identifiers,
            &[&run.tenant, &partitions, &kinds, &values],
        )?;
        let holders = self.holders(rows, requests.len())?;
        self.identifiers.extend(
            requests
                .iter()
                .zip(holders)
                .map(|(&(s, j, _, _), holder)| (s, j, holder)),
        );
        Ok(())
    }

    fn query_ips(
        &mut self,
        tx: &mut Transaction<'_>,
        run: &RunContext<'_>,
        requests: &[IpRequest<'_>],
    ) -> Result<(), DbError> {
        if requests.is_empty() {
            return Ok(());
        }
        let partitions: Vec<&str> = requests.iter().map(|r| r.1).collect();
        let ips: Vec<&str> = requests.iter().map(|r| r.2).collect();
        let rows = tx.query(
            &run.statements.prefetch_ips,
            &[&run.tenant, &partitions, &ips],
        )?;
        let holders = self.holders(rows, requests.len())?;
        self.ips.extend(
            requests
                .iter()
                .zip(holders)
                .map(|(&(s, _, _), holder)| (s, holder)),
        );
        Ok(())
    }

    /// The holder of each of `count` requested keys, from rows of
    /// (position, holder, device columns...); keeps the devices.
    fn holders(&mut self, rows: Vec<Row>, count: usize) -> Result<Vec<Option<String>>, DbError> {
        let mut holders: Vec<Option<String>> = vec![None; count];
        for row in rows {
            let n: i64 = row.try_get(0)?;
            let holder: String = row.try_get(1)?;
            if !self.devices.contains_key(&holder) {
                // No row behind the holder (a hand-edited database): known
                // to be absent all the same.
                let present = row.try_get::<_, Option<&str>>(2)?.is_some();
                let device = present.then_some(FetchedDevice { row, at: 2 });
                self.devices.insert(holder.clone(), device);
            }
            // The 1-based position of the key in the request.
            let slot = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_sub(1))
                .and_then(|i| holders.get_mut(i));
            if let Some(slot) = slot {
                *slot = Some(holder);
            }
        }
        Ok(holders)
    }
}

/// What the flush must write for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Write {
    Nothing,
    /// Only `ip`, `last_seen` and `last_run_id` changed (a confirming
    /// re-sync, or a device that lost its IP to another).
    Light,
    /// The whole row.
    Full,
}

/// What the database holds for a device, as of the start of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
enum InDb {
    Absent,
    /// Present, with this IP.
    Ip(Option<String>),
    /// Written without having been read (a new device whose deterministic
    /// id may already have a row).
    Unknown,
}

struct Cached {
    /// The device as the batch has left it so far (`None`: no row).
    current: Option<CanonicalDevice>,
    write: Write,
    db: InDb,
}

impl Cached {
    /// A device as the database holds it at the start of a batch.
    fn stored(current: Option<CanonicalDevice>) -> Self {
        let db = match &current {
            Some(d) => InDb::Ip(d.ip.clone()),
            None => InDb::Absent,
        };
        Self {
            current,
            write: Write::Nothing,
            db,
        }
    }
}

/// One audit row, serialised when recorded.
struct MergeRow {
    tenant: String,
    partition: String,
    from: String,
    into: String,
    reason: String,
    identifiers: String,
    from_before: String,
    into_before: String,
    at: i64,
}

/// The overlay of one batch: the batch's writes over the database as the
/// previous batch left it (nothing else writes the run's scopes meanwhile:
/// their advisory locks are held).
#[derive(Default)]
struct State {
    /// Every device the batch knows. The database's answer about any of
    /// these may be stale; about any other device it is current.
    devices: HashMap<String, Cached>,
    /// Holders of identifiers: exact for every key present (identifier rows
    /// change only by `attach`, which records here).
    identifiers: HashMap<IdKey, Option<String>>,
    /// Identifiers attached by the batch, and whether they had no row when
    /// it began (then a plain INSERT writes them).
    attached: HashMap<IdKey, bool>,
    /// Who held each IP when the batch began; an answer naming a device in
    /// `devices` is stale (`ip_owners` knows whether it still holds it).
    db_ip_holders: HashMap<IpKey, Option<String>>,
    /// Who holds each IP among `devices`, as they currently are.
    ip_owners: HashMap<IpKey, String>,
    merges: Vec<MergeRow>,
}

impl State {
    /// The starting overlay of a batch from its prefetch, which read the
    /// database before `previous` (the preceding batch's final overlay) was
    /// written: whatever `previous` knows wins.
    fn after(
        tenant: &str,
        batch: &[(String, Sighting)],
        fetched: Prefetched,
        previous: Option<State>,
    ) -> Result<State, DbError> {
        let Prefetched {
            identifiers,
            ips,
            devices,
        } = fetched;
        let mut previous = previous.unwrap_or_default();
        let mut state = State::default();
        // Identifier rows changed only where `previous` attached, and it
        // knows those keys.
        for (s, j, holder) in identifiers {
            let Some((partition, id)) = batch
                .get(s)
                .and_then(|(p, sighting)| Some((p, sighting.identifiers.get(j)?)))
            else {
                continue;
            };
            let key = (partition.clone(), id.kind, id.value.clone());
            let holder = previous.identifiers.get(&key).cloned().unwrap_or(holder);
            state.identifiers.insert(key, holder);
        }
        // An IP changed hands only among `previous`'s devices.
        for (s, holder) in ips {
            let Some((partition, Some(ip))) = batch.get(s).map(|(p, sighting)| (p, &sighting.ip))
            else {
                continue;
            };
            let key = (partition.clone(), ip.clone());
            let holder = match previous.ip_owners.get(&key) {
                Some(owner) => Some(owner.clone()),
                None => holder.filter(|h| !previous.devices.contains_key(h)),
            };
            state.db_ip_holders.insert(key, holder);
        }
        // Devices: as `previous` left them, else as read. Its flush will
        // have written them by the time this batch's flush runs.
        for (id, device) in devices {
            let current = match previous.devices.remove(&id) {
                Some(cached) => cached.current,
                None => device.as_ref().map(FetchedDevice::decode).transpose()?,
            };
            state.devices.insert(id, Cached::stored(current));
        }
        // Holders the corrections named, which `previous` knows.
        let named: Vec<String> = state
            .identifiers
            .values()
            .chain(state.db_ip_holders.values())
            .flatten()
            .filter(|id| !state.devices.contains_key(*id))
            .cloned()
            .collect();
        for id in named {
            if let Some(cached) = previous.devices.remove(&id) {
                state.devices.insert(id, Cached::stored(cached.current));
            }
        }
        let owners: Vec<(IpKey, String)> = state
            .devices
            .values()
            .filter_map(|c| c.current.as_ref())
            .filter(|d| d.tenant == tenant)
            .filter_map(|d| {
                let ip = d.ip.as_ref()?;
                Some(((d.partition.clone(), ip.clone()), d.id.clone()))
            })
            .collect();
        state.ip_owners.extend(owners);
        Ok(state)
    }

    /// Records a device read from the database during the batch.
    fn remember(&mut self, tenant: &str, id: String, device: Option<CanonicalDevice>) {
        if let Some(d) = &device {
            self.own_ip(tenant, d);
        }
        self.devices.insert(id, Cached::stored(device));
    }

    /// `device` (as it now is) holds its IP.
    fn own_ip(&mut self, tenant: &str, device: &CanonicalDevice) {
        if let (Some(ip), true) = (&device.ip, device.tenant == tenant) {
            self.ip_owners
                .insert((device.partition.clone(), ip.clone()), device.id.clone());
        }
    }

    /// `device` (as it was) no longer holds its IP.
    fn disown_ip(&mut self, device: &CanonicalDevice) {
        if let Some(ip) = &device.ip {
            let key = (device.partition.clone(), ip.clone());
            if self.ip_owners.get(&key) == Some(&device.id) {
                self.ip_owners.remove(&key);
            }
        }
    }

    /// What the flush writes (the audit rows move there), built on the
    /// worker while the connection is busy.
    fn flush_set(&mut self, tenant: &str) -> FlushSet {
        let mut flush = FlushSet::default();
        // Sorted by id: deterministic, and kinder to the primary key's
        // B-tree than hash order.
        let mut dirty: Vec<(&CanonicalDevice, &Cached)> = self
            .devices
            .values()
            .filter(|c| c.write != Write::Nothing)
            .filter_map(|c| c.current.as_ref().map(|d| (d, c)))
            .collect();
        dirty.sort_unstable_by(|a, b| a.0.id.cmp(&b.0.id));
        // A device written without being read may have a row holding an IP
        // another row of this flush takes. Taking an IP means having asked
        // who holds it (`release_ip`), and the database named its holder:
        // only devices so named can be in the way. (The overlay believed
        // the answer stale because the device was in it, and the device did
        // not release the IP since its row was not known to hold it.)
        let named: HashSet<&str> = self
            .db_ip_holders
            .values()
            .flatten()
            .map(String::as_str)
            .collect();
        for (device, cached) in dirty {
            let ip_changes = match &cached.db {
                InDb::Absent | InDb::Ip(None) => false,
                InDb::Ip(Some(ip)) => device.ip.as_ref() != Some(ip),
                InDb::Unknown => named.contains(device.id.as_str()),
            };
            if ip_changes {
                flush.clear.ids.push(device.id.clone());
                flush.clear.ips.push(device.ip.clone());
            }
            match cached.write {
                Write::Full => flush.full.push(device),
                Write::Light => flush.light.push(device),
                Write::Nothing => {}
            }
        }
        // Each key once (the map deduplicates): ON CONFLICT DO UPDATE
        // cannot touch one row twice in a statement.
        let mut attached: Vec<(&IdKey, bool, &String)> = self
            .attached
            .iter()
            .filter_map(|(key, &new)| Some((key, new, self.identifiers.get(key)?.as_ref()?)))
            .collect();
        attached.sort_unstable();
        for (key, new, holder) in attached {
            let rows = if new {
                &mut flush.new_identifiers
            } else {
                &mut flush.identifiers
            };
            rows.partitions.push(key.0.clone());
            rows.kinds.push(key.1.as_str());
            rows.values.push(key.2.clone());
            rows.holders.push(holder.clone());
        }
        flush.tenant = tenant.to_owned();
        flush.merges = std::mem::take(&mut self.merges);
        flush
    }
}

/// A batch's writes, as statement parameters.
#[derive(Default)]
struct FlushSet {
    tenant: String,
    clear: ClearRows,
    full: FullRows,
    light: LightRows,
    /// Identifiers that had no row: inserted without ON CONFLICT, which
    /// saves PostgreSQL a speculative insertion per row.
    new_identifiers: IdentifierRows,
    /// Identifiers that had (or may have had) a row: upserted.
    identifiers: IdentifierRows,
    merges: Vec<MergeRow>,
}

#[derive(Default)]
struct ClearRows {
    ids: Vec<String>,
    ips: Vec<Option<String>>,
}

#[derive(Default)]
struct FullRows {
    ids: Vec<String>,
    tenants: Vec<String>,
    partitions: Vec<String>,
    ips: Vec<Option<String>>,
    macs: Vec<Option<String>>,
    hostnames: Vec<Option<String>>,
    sources: Vec<String>,
    metadata: Vec<String>,
    first_seen: Vec<i64>,
    last_seen: Vec<i64>,
    runs: Vec<String>,
    merged_into: Vec<Option<String>>,
    identifiers: Vec<String>,
}

impl FullRows {
    fn push(&mut self, d: &CanonicalDevice) {
        self.ids.push(d.id.clone());
        self.tenants.push(d.tenant.clone());
        self.partitions.push(d.partition.clone());
        self.ips.push(d.ip.clone());
        self.macs.push(d.mac.clone());
        self.hostnames.push(d.hostname.clone());
        self.sources.push(to_json(&d.sources));
        self.metadata.push(to_json(&d.metadata));
        self.first_seen.push(d.first_seen);
        self.last_seen.push(d.last_seen);
        self.runs.push(d.last_run_id.clone());
        self.merged_into.push(d.merged_into.clone());
        self.identifiers.push(to_json(&d.identifiers));
    }
}

#[derive(Default)]
struct LightRows {
    ids: Vec<String>,
    ips: Vec<Option<String>>,
    last_seen: Vec<i64>,
    runs: Vec<String>,
}

impl LightRows {
    fn push(&mut self, d: &CanonicalDevice) {
        self.ids.push(d.id.clone());
        self.ips.push(d.ip.clone());
        self.last_seen.push(d.last_seen);
        self.runs.push(d.last_run_id.clone());
    }
}

#[derive(Default)]
struct IdentifierRows {
    partitions: Vec<String>,
    kinds: Vec<&'static str>,
    values: Vec<String>,
    holders: Vec<String>,
}

impl FlushSet {
    /// At most six statements, in the order the unique IP index needs:
    /// IPs let go, whole rows, light rows; then identifiers (new ones, then
    /// moved ones) and the audit.
    fn write(&self, tx: &mut Transaction<'_>, statements: &Statements) -> Result<(), DbError> {
        if !self.clear.ids.is_empty() {
            tx.execute(&statements.clear_ips, &[&self.clear.ids, &self.clear.ips])?;
        }
        let full = &self.full;
        if !full.ids.is_empty() {
            tx.execute(
                &statements.upsert_devices,
                &[
                    &full.ids,
                    &full.tenants,
                    &full.partitions,
                    &full.ips,
                    &full.macs,
                    &full.hostnames,
                    &full.sources,
                    &full.metadata,
                    &full.first_seen,
                    &full.last_seen,
                    &full.runs,
                    &full.merged_into,
                    &full.identifiers,
                ],
            )?;
        }
        let light = &self.light;
        if !light.ids.is_empty() {
            tx.execute(
                &statements.touch_devices,
                &[&light.ids, &light.ips, &light.last_seen, &light.runs],
            )?;
        }
        // Identifiers new to the scope (plain INSERT), then moved ones.
        for (ids, statement) in [
            (&self.new_identifiers, &statements.insert_identifiers),
            (&self.identifiers, &statements.upsert_identifiers),
        ] {
            if !ids.holders.is_empty() {
                tx.execute(
                    statement,
                    &[
                        &self.tenant,
                        &ids.partitions,
                        &ids.kinds,
                        &ids.values,
                        &ids.holders,
                    ],
                )?;
            }
        }
        if !self.merges.is_empty() {
            let text = |field: fn(&MergeRow) -> &String| -> Vec<&str> {
                self.merges.iter().map(|m| field(m).as_str()).collect()
            };
            let at: Vec<i64> = self.merges.iter().map(|m| m.at).collect();
            tx.execute(
                &statements.insert_merges,
                &[
                    &text(|m| &m.tenant),
                    &text(|m| &m.partition),
                    &text(|m| &m.from),
                    &text(|m| &m.into),
                    &text(|m| &m.reason),
                    &text(|m| &m.identifiers),
                    &text(|m| &m.from_before),
                    &text(|m| &m.into_before),
                    &at,
                ],
            )?;
        }
        Ok(())
    }
}

/// The DIRE index of one batch: its [`State`], and the connection for what
/// the prefetch did not cover.
struct Overlay<'a, 'c, 't> {
    conn: &'a Connection<'c, 't>,
    run: &'a RunContext<'a>,
    state: State,
}

impl Overlay<'_, '_, '_> {
    /// Makes sure `id` is in the overlay (reading it if need be).
    fn ensure_cached(&mut self, id: &str) -> Result<(), DbError> {
        if !self.state.devices.contains_key(id) {
            let row = lock(self.conn).query_opt(&self.run.statements.load, &[&id])?;
            let device = row
                .as_ref()
                .map(|r| device_at(&DbRow::Postgres(r), 0))
                .transpose()?;
            self.state.remember(self.run.tenant, id.to_owned(), device);
        }
        Ok(())
    }
}

impl DeviceIndex for Overlay<'_, '_, '_> {
    type Error = DbError;

    fn holder(&mut self, scope: Scope<'_>, id: &Identifier) -> Result<Option<String>, DbError> {
        debug_assert_eq!(scope.tenant, self.run.tenant);
        let key = (scope.partition.to_owned(), id.kind, id.value.clone());
        if let Some(holder) = self.state.identifiers.get(&key) {
            return Ok(holder.clone());
        }
        // Not prefetched: the database is exact for keys the batch did not
        // attach, and every attached key is in the map.
        let row = lock(self.conn).query_opt(
            &self.run.statements.holder,
            &[
                &scope.tenant,
                &scope.partition,
                &id.kind.as_str(),
                &id.value,
            ],
        )?;
        let holder: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        self.state.identifiers.insert(key, holder.clone());
        Ok(holder)
    }

    fn holder_of_ip(&mut self, scope: Scope<'_>, ip: &str) -> Result<Option<String>, DbError> {
        debug_assert_eq!(scope.tenant, self.run.tenant);
        let key = (scope.partition.to_owned(), ip.to_owned());
        if let Some(owner) = self.state.ip_owners.get(&key) {
            return Ok(Some(owner.clone()));
        }
        let holder = match self.state.db_ip_holders.get(&key) {
            Some(holder) => holder.clone(),
            None => {
                let row = lock(self.conn).query_opt(
                    &self.run.statements.holder_of_ip,
                    &[&scope.tenant, &scope.partition, &ip],
                )?;
                let holder: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
                self.state.db_ip_holders.insert(key, holder.clone());
                holder
            }
        };
        // A device the overlay knows would be in `ip_owners` if it still
        // held the IP: the database's answer about it is stale.
        Ok(holder.filter(|h| !self.state.devices.contains_key(h)))
    }

    fn load(
        &mut self,
        _scope: Scope<'_>,
        device: &str,
    ) -> Result<Option<CanonicalDevice>, DbError> {
        // By id alone, like the SQLite index (ids embed their scope).
        self.ensure_cached(device)?;
        Ok(self
            .state
            .devices
            .get(device)
            .and_then(|c| c.current.clone()))
    }

    fn release_ip(&mut self, scope: Scope<'_>, ip: &str, keeper: &str) -> Result<(), DbError> {
        // The unique index means at most one device of the scope holds it.
        let Some(holder) = self.holder_of_ip(scope, ip)? else {
            return Ok(());
        };
        if holder == keeper {
            return Ok(());
        }
        self.ensure_cached(&holder)?;
        let Some(cached) = self.state.devices.get_mut(&holder) else {
            return Ok(());
        };
        let Some(device) = cached.current.as_mut() else {
            return Ok(());
        };
        device.ip = None;
        cached.write = cached.write.max(Write::Light);
        let key = (scope.partition.to_owned(), ip.to_owned());
        if self.state.ip_owners.get(&key) == Some(&holder) {
            self.state.ip_owners.remove(&key);
        }
        Ok(())
    }

    fn store(&mut self, device: &CanonicalDevice) -> Result<(), DbError> {
        let previous = match self.state.devices.get_mut(&device.id) {
            Some(cached) => {
                cached.write = Write::Full;
                cached.current.replace(device.clone())
            }
            None => {
                // Never read: whether a row exists (and with which IP) is
                // left to the flush's `clear_ips` to find out.
                self.state.devices.insert(
                    device.id.clone(),
                    Cached {
                        current: Some(device.clone()),
                        write: Write::Full,
                        db: InDb::Unknown,
                    },
                );
                None
            }
        };
        if let Some(previous) = previous {
            self.state.disown_ip(&previous);
        }
        self.state.own_ip(self.run.tenant, device);
        Ok(())
    }

    fn touch(&mut self, device: &str, last_seen: i64, run_id: &str) -> Result<(), DbError> {
        self.ensure_cached(device)?;
        if let Some(cached) = self.state.devices.get_mut(device) {
            // Like `UPDATE ... WHERE id = ?`: nothing if there is no row.
            if let Some(current) = cached.current.as_mut() {
                current.last_seen = last_seen;
                current.last_run_id = run_id.to_owned();
                cached.write = cached.write.max(Write::Light);
            }
        }
        Ok(())
    }

    fn attach(&mut self, scope: Scope<'_>, id: &Identifier, device: &str) -> Result<(), DbError> {
        debug_assert_eq!(scope.tenant, self.run.tenant);
        let key = (scope.partition.to_owned(), id.kind, id.value.clone());
        // Until the batch's first attach of a key, the map holds what the
        // database had.
        let new = match self.state.attached.get(&key) {
            Some(&new) => new,
            None => matches!(self.state.identifiers.get(&key), Some(None)),
        };
        self.state
            .identifiers
            .insert(key.clone(), Some(device.to_owned()));
        self.state.attached.insert(key, new);
        Ok(())
    }

    fn record_merge(&mut self, merge: &MergeRecord) -> Result<(), DbError> {
        self.state.merges.push(MergeRow {
            tenant: merge.tenant.clone(),
            partition: merge.partition.clone(),
            from: merge.from.clone(),
            into: merge.into.clone(),
            reason: merge.reason.clone(),
            identifiers: to_json(&merge.identifiers),
            from_before: to_json(&with_identifiers(&merge.from_before)),
            into_before: to_json(&with_identifiers(&merge.into_before)),
            at: merge.at,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The blocking client must not live inside a tokio runtime: these are
    //! plain `#[test]`s, and the concurrent one uses `std::thread`s.

    use std::time::Instant;

    use postgres::{Client, NoTls};
    use serde_json::{json, Map, Value};

    use super::super::db::Tx;
    use super::super::staging::reconcile_row_by_row;
    use super::*;
    use crate::bench::dire::faker_sightings;
    use crate::gateway::dire::identifiers_of;
    use crate::sources::faker::{FakerGenerator, FakerSettings};

    /// A fresh database with the PostgreSQL schema.
    fn database(prefix: &str) -> (String, Client) {
        let url = super::super::throwaway::fresh_database(prefix)
            .unwrap_or_else(|e| panic!("no PostgreSQL for the test: {e}"));
        let mut client = Client::connect(&url, NoTls).unwrap();
        for (_, step) in super::super::pg_schema::PG_MIGRATIONS {
            client.batch_execute(step).unwrap();
        }
        (url, client)
    }

    /// One run of the generated scenario.
    struct Run {
        tenant: &'static str,
        run_id: String,
        now: i64,
        sightings: Vec<(String, Sighting)>,
    }

    fn sighting(
        metadata: Value,
        ip: Option<String>,
        mac: Option<String>,
        hostname: Option<String>,
        source: &str,
    ) -> Sighting {
        let metadata: Map<String, Value> = metadata.as_object().cloned().unwrap_or_default();
        Sighting {
            identifiers: identifiers_of(&metadata, mac.as_deref()),
            ip,
            mac,
            hostname,
            source: source.to_owned(),
            metadata,
        }
    }

    /// Runs with everything DIRE has to get right: identifiers shared
    /// across sources (merges when one update links two devices), MAC-only
    /// conflicts, locally administered MACs, contradicting updates, IP-only
    /// updates, IPs moving between devices (a small pool: constant churn),
    /// two partitions, the same device twice in a run, and a second tenant.
    fn scenario(seed: u64) -> Vec<Run> {
        const DEVICES: usize = 120;
        const IPS: u32 = 90;
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ip_of: Vec<u32> = (0..DEVICES).map(|_| rng.u32(0..IPS)).collect();
        let mac = |i: usize| {
            // Every ninth device has a locally administered MAC; pairs of
            // devices share one every so often (i and i + 1 when i % 10 == 0).
            let i = if i % 10 == 1 { i - 1 } else { i };
            let first = if i % 9 == 0 { 0x02 } else { 0x00 };
            format!("{first:02X}:1A:2B:00:{:02X}:{:02X}", i / 256, i % 256)
        };
        let mut runs = Vec::new();
        for round in 0..5i64 {
            let mut sightings = Vec::new();
            for _ in 0..160 {
                let i = rng.usize(0..DEVICES);
                if rng.u8(0..4) == 0 {
                    ip_of[i] = rng.u32(0..IPS);
                }
                let partition = if i % 4 == 0 { "site-b" } else { "default" };
                let ip = (rng.u8(0..15) != 0).then(|| format!("10.0.0.{}", ip_of[i]));
                let hostname = rng.bool().then(|| format!("host-{i}"));
                let with_mac = rng.bool().then(|| mac(i));
                let rack = if rng.u8(0..3) == 0 {
                    json!(round)
                } else {
                    json!("r1")
                };
                let s = match rng.u8(0..10) {
                    0..=2 => sighting(
                        json!({"armis_device_id": format!("A{i}"), "rack": rack}),
                        ip,
                        with_mac,
                        hostname,
                        "armis",
                    ),
                    3 | 4 => sighting(
                        json!({"netbox_device_id": format!("N{i}")}),
                        ip,
                        with_mac,
                        hostname,
                        "netbox",
                    ),
                    5 => sighting(
                        json!({"armis_device_id": format!("A{i}"), "netbox_device_id": format!("N{i}")}),
                        ip,
                        with_mac,
                        hostname,
                        "armis",
                    ),
                    6 => sighting(
                        json!({"integration_id": format!("I{i}"), "integration_type": "faker",
                               "netbox_device_id": format!("N{i}")}),
                        ip,
                        None,
                        hostname,
                        "faker",
                    ),
                    7 => sighting(json!({"rack": rack}), ip, None, hostname, "scan"),
                    8 => sighting(json!({}), ip, Some(mac(i)), None, "sweep"),
                    _ => {
                        let j = rng.usize(0..DEVICES);
                        sighting(
                            json!({"armis_device_id": format!("A{i}"), "netbox_device_id": format!("N{j}")}),
                            ip,
                            None,
                            None,
                            "armis",
                        )
                    }
                };
                if rng.u8(0..20) == 0 {
                    sightings.push((partition.to_owned(), s.clone()));
                }
                sightings.push((partition.to_owned(), s));
            }
            runs.push(Run {
                tenant: "t1",
                run_id: format!("run-{round}"),
                now: 100 + round * 10,
                sightings,
            });
        }
        // The first run again, as another tenant: nothing is shared.
        let again = runs[0].sightings.clone();
        runs.push(Run {
            tenant: "t2",
            run_id: "run-0".to_owned(),
            now: 100,
            sightings: again,
        });
        runs
    }

    /// Every row of the three DIRE tables, as text (merge ids left out).
    #[derive(Debug, PartialEq)]
    struct Dump {
        devices: Vec<String>,
        identifiers: Vec<String>,
        merges: Vec<String>,
    }

    fn dump(client: &mut Client) -> Dump {
        let mut rows = |sql: &str| -> Vec<String> {
            client
                .query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
        };
        Dump {
            devices: rows("SELECT to_jsonb(c)::text FROM canonical_devices c ORDER BY id"),
            identifiers: rows(
                "SELECT to_jsonb(i)::text FROM device_identifiers i
                 ORDER BY tenant, partition, kind, value",
            ),
            merges: rows("SELECT (to_jsonb(m) - 'id')::text FROM device_merges m ORDER BY id"),
        }
    }

    /// How the scenario is reconciled.
    #[derive(Clone, Copy, Debug)]
    enum Mode {
        RowAtATime,
        Batched { size: usize, prefetch: bool },
    }

    /// Runs `setup` (SQL) on a fresh database, then reconciles `runs`.
    fn apply(setup: &str, runs: &[Run], mode: Mode) -> (Vec<Outcome>, Dump) {
        let (_, mut client) = database("pg_dire_modes");
        client.batch_execute(setup).unwrap();
        let mut outcomes = Vec::new();
        for run in runs {
            let mut tx = client.transaction().unwrap();
            let outcome = match mode {
                // The store's row-at-a-time path (SQLite's), on PostgreSQL.
                Mode::RowAtATime => {
                    let mut tx = Tx::Postgres(tx);
                    let outcome = reconcile_row_by_row(
                        &mut tx,
                        run.tenant,
                        &run.run_id,
                        run.sightings.clone(),
                        run.now,
                    )
                    .unwrap();
                    tx.commit().unwrap();
                    outcome
                }
                Mode::Batched { size, prefetch } => {
                    let outcome = reconcile_run_with(
                        &mut tx,
                        run.tenant,
                        &run.run_id,
                        run.sightings.clone(),
                        run.now,
                        size,
                        prefetch,
                    )
                    .unwrap();
                    tx.commit().unwrap();
                    outcome
                }
            };
            outcomes.push(outcome);
        }
        (outcomes, dump(&mut client))
    }

    fn assert_same(what: &str, expected: &[String], got: &[String]) {
        if let Some(i) = (0..expected.len().max(got.len())).find(|&i| expected.get(i) != got.get(i))
        {
            panic!(
                "{what} differ at row {i} ({} vs {} rows):\n expected {:?}\n      got {:?}",
                expected.len(),
                got.len(),
                expected.get(i),
                got.get(i)
            );
        }
    }

    #[test]
    fn batch_size_never_changes_the_outcome() {
        let runs = scenario(7);
        let (expected_outcomes, expected) = apply("", &runs, Mode::RowAtATime);
        // The scenario must exercise what it claims to.
        let merged: u64 = expected_outcomes.iter().map(|o| o.merged).sum();
        assert!(merged >= 5, "only {merged} merges: {expected_outcomes:?}");
        assert!(
            expected.devices.len() > 150,
            "{} devices",
            expected.devices.len()
        );
        let without_ip = expected
            .devices
            .iter()
            .filter(|d| d.contains("\"ip\": null") && d.contains("\"merged_into\": null"))
            .count();
        assert!(
            without_ip > 10,
            "only {without_ip} live devices lost their IP"
        );

        for mode in [
            Mode::Batched {
                size: 1,
                prefetch: true,
            },
            Mode::Batched {
                size: 7,
                prefetch: true,
            },
            Mode::Batched {
                size: 1000,
                prefetch: true,
            },
            Mode::Batched {
                size: BATCH_SIZE,
                prefetch: true,
            },
            // Every lookup through the fallback queries.
            Mode::Batched {
                size: 50,
                prefetch: false,
            },
        ] {
            let (outcomes, got) = apply("", &runs, mode);
            assert_eq!(outcomes, expected_outcomes, "{mode:?}");
            assert_same(
                &format!("devices ({mode:?})"),
                &expected.devices,
                &got.devices,
            );
            assert_same(
                &format!("identifiers ({mode:?})"),
                &expected.identifiers,
                &got.identifiers,
            );
            assert_same(&format!("merges ({mode:?})"), &expected.merges, &got.merges);
        }
    }

    /// A device's id can be reused by a new device while its row still
    /// holds an IP (here: rows left without their identifier). Such a row
    /// may be written without having been read; another new device taking
    /// its IP in the same flush must not collide with it.
    #[test]
    fn a_reused_id_lets_go_of_its_old_ip() {
        let mut setup = String::new();
        let mut sightings = Vec::new();
        for i in 0..40 {
            let reused = Identifier::new(IdKind::Armis, format!("A{i}"));
            let id = crate::gateway::dire::canonical_id("t1", "default", Some(&reused), "");
            setup.push_str(&format!(
                "INSERT INTO canonical_devices (id, tenant, partition, ip, sources, metadata,
                     first_seen, last_seen, last_run_id, identifiers)
                 VALUES ('{id}', 't1', 'default', '10.9.0.{i}', '[]', '{{}}', 1, 1, 'old', '[]');"
            ));
            let armis = |value: String, ip: String| {
                sighting(
                    json!({"armis_device_id": value}),
                    Some(ip),
                    None,
                    None,
                    "armis",
                )
            };
            sightings.push((
                "default".to_owned(),
                armis(format!("A{i}"), format!("10.8.0.{i}")),
            ));
            sightings.push((
                "default".to_owned(),
                armis(format!("B{i}"), format!("10.9.0.{i}")),
            ));
        }
        let runs = [Run {
            tenant: "t1",
            run_id: "r".to_owned(),
            now: 10,
            sightings,
        }];
        let (expected_outcomes, expected) = apply(&setup, &runs, Mode::RowAtATime);
        // Without the prefetch, the old row is first read (by the lookup
        // of its IP) after its id was written.
        for (size, prefetch) in [
            (1, true),
            (7, true),
            (BATCH_SIZE, true),
            (BATCH_SIZE, false),
        ] {
            let mode = Mode::Batched { size, prefetch };
            let (outcomes, got) = apply(&setup, &runs, mode);
            assert_eq!(outcomes, expected_outcomes, "{mode:?}");
            assert_eq!(got, expected, "{mode:?}");
        }
    }

    fn live_devices(client: &mut Client, tenant: &str) -> i64 {
        client
            .query_one(
                "SELECT COUNT(*) FROM canonical_devices WHERE tenant = $1 AND merged_into IS NULL",
                &[&tenant],
            )
            .unwrap()
            .get(0)
    }

    /// Reconciles and commits one run; returns devices per second.
    fn timed_run(
        client: &mut Client,
        tenant: &str,
        run_id: &str,
        sightings: Vec<(String, Sighting)>,
        now: i64,
    ) -> (Outcome, f64) {
        let n = sightings.len() as f64;
        let started = Instant::now();
        let mut tx = client.transaction().unwrap();
        let outcome = reconcile_run(&mut tx, tenant, run_id, sightings, now, BATCH_SIZE).unwrap();
        tx.commit().unwrap();
        (outcome, n / started.elapsed().as_secs_f64())
    }

    #[test]
    fn a_faker_resync_with_churn_keeps_exactly_one_device_per_device() {
        const DEVICES: u64 = 50_000;
        let (_, mut client) = database("pg_dire_faker");
        let mut generator = FakerGenerator::new(FakerSettings {
            total_devices: DEVICES,
            seed: 3,
            churn_percent: 5.0,
        });
        generator.next_run();
        let first = faker_sightings(&generator);
        assert_eq!(first.len() as u64, DEVICES);
        let (outcome, first_rate) = timed_run(&mut client, "t1", "run-1", first, 1);
        assert_eq!(outcome.created, DEVICES);
        assert_eq!(live_devices(&mut client, "t1"), DEVICES as i64);

        generator.next_run();
        let second = faker_sightings(&generator);
        let (outcome, resync_rate) = timed_run(&mut client, "t1", "run-2", second, 2);
        assert_eq!(
            (outcome.created, outcome.updated, outcome.merged),
            (0, DEVICES, 0)
        );
        assert_eq!(live_devices(&mut client, "t1"), DEVICES as i64);
        // Every IP has at most one holder, every device was seen by run 2.
        let row = client
            .query_one(
                "SELECT COUNT(ip), COUNT(DISTINCT ip), COUNT(*) FILTER (WHERE last_run_id = 'run-2')
                 FROM canonical_devices WHERE tenant = 't1'",
                &[],
            )
            .unwrap();
        let (with_ip, distinct, seen): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(with_ip, distinct);
        assert_eq!(seen, DEVICES as i64);
        eprintln!(
            "pg_dire, {DEVICES} Faker devices, batches of {BATCH_SIZE}: first sync {first_rate:.0} devices/s, \
             re-sync with 5% churn {resync_rate:.0} devices/s"
        );
    }

    #[test]
    fn concurrent_runs_of_one_scope_serialise() {
        let (url, mut client) = database("pg_dire_concurrent");
        let mut generator = FakerGenerator::new(FakerSettings {
            total_devices: 3_000,
            seed: 5,
            churn_percent: 20.0,
        });
        generator.next_run();
        let first = faker_sightings(&generator);
        generator.next_run();
        let second = faker_sightings(&generator);
        // Two gateways, the same new devices at the same time: without the
        // lock, both would create the same rows.
        let workers: Vec<_> = [("run-a", first), ("run-b", second)]
            .into_iter()
            .map(|(run_id, sightings)| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut client = Client::connect(&url, NoTls).unwrap();
                    let mut tx = client.transaction().unwrap();
                    let outcome = reconcile_run(&mut tx, "t1", run_id, sightings, 10, 500).unwrap();
                    tx.commit().unwrap();
                    outcome
                })
            })
            .collect();
        let outcomes: Vec<Outcome> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        // Whichever came second found every device the first created.
        let created: u64 = outcomes.iter().map(|o| o.created).sum();
        assert_eq!(created, 3_000, "{outcomes:?}");
        assert_eq!(live_devices(&mut client, "t1"), 3_000);
    }

    #[test]
    fn a_failing_statement_fails_the_run() {
        let (_, mut client) = database("pg_dire_failure");
        client
            .batch_execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql
                     AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$;
                 CREATE TRIGGER refuse BEFORE INSERT ON device_identifiers
                     FOR EACH ROW EXECUTE FUNCTION refuse();",
            )
            .unwrap();
        let mut generator = FakerGenerator::new(FakerSettings {
            total_devices: 500,
            seed: 9,
            churn_percent: 0.0,
        });
        generator.next_run();
        // The first flush fails while the second batch is being
        // reconciled: an error, neither a hang nor a panic.
        let mut tx = client.transaction().unwrap();
        let error =
            reconcile_run(&mut tx, "t1", "r", faker_sightings(&generator), 1, 100).unwrap_err();
        assert!(format!("{error:?}").contains("refused"), "{error:?}");
    }

    #[test]
    fn an_empty_run_does_nothing() {
        let (_, mut client) = database("pg_dire_empty");
        let mut tx = client.transaction().unwrap();
        assert_eq!(
            reconcile_run(&mut tx, "t1", "r", Vec::new(), 1, BATCH_SIZE).unwrap(),
            Outcome::default()
        );
        tx.commit().unwrap();
    }
}
