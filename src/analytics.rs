//! Verification analytics (SPEC §8): every verification (verify_key, verify_token,
//! authenticate; not mint_token) counts into a per-minute tally of (key, code) in shared memory,
//! under its own lock — never a write per call. A VALID verification of a key without limits
//! counts in the key's entry of the metering engine instead (`engine::record_use`: the call
//! finds that entry anyway, and a second random read of shared memory was most of what counting
//! cost it); the writer moves those counts here when it takes the uses. Each database's writer
//! (`writer`) moves its tallies into `apikeys.verification_batches` every few seconds (sooner
//! when the table fills up, and when it stops at a clean shutdown): one row of arrays per
//! minute, however many keys.
//! Once a minute is over, its batches are added to `apikeys.verification_counts` as minute rows,
//! so a key used many times a minute costs one row there per minute, not one per write (with
//! many distinct keys, per-write upserts were most of what analytics cost); the writer adds the
//! sums it kept of its own batches (`tallies::Digests`) rather than unnesting and summing them
//! again, which was most of what compaction still cost; every ten minutes
//! the minutes since `verification_rollup.through` are added to their hours and days (upserting
//! hour and day rows every minute was most of what was left). `verification_stats` reads counts,
//! the minutes not rolled up yet and the batches. Counts older than
//! `apikeys.analytics_retention` are pruned. A crash loses the tallies not written yet: at most
//! the last few seconds. Without shared_preload_libraries, and on standbys, nothing is counted.

use crate::tallies::{self, Added, Tally, TallyKey};
use crate::verify::{self, Code, Verification};
use crate::{errors, guc, plans};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::cell::RefCell;
use std::collections::HashMap;

#[repr(C)]
struct Header {
    capacity: usize,
    used: usize,
    /// When each database's counts were last pruned (database OID, epoch µs): writers come and
    /// go, the schedule stays.
    pruned: [(u32, i64); crate::engine::DATABASES],
    /// When each database's batches were last compacted, likewise.
    compacted: [(u32, i64); crate::engine::DATABASES],
    /// Verifications counted per database slot (`engine::writer_slot`): a writer that sees its
    /// database's move stays, and leaves soon after they stop.
    counted: [u64; crate::engine::DATABASES],
}

// Set once per process by `attach` (in the postmaster, inherited by every child).
static mut HEADER: *mut Header = std::ptr::null_mut();
static mut SLOTS: *mut Tally = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
const NAME: &std::ffi::CStr = c"pg_apikeys analytics";

/// Shared memory the tallies take (requested with the engine's).
pub fn shared_size() -> usize {
    std::mem::size_of::<Header>() + guc::analytics_slots() * std::mem::size_of::<Tally>()
}

/// Asks for the tallies' lock (with the engine's shared memory request).
pub fn request_lock() {
    // SAFETY: called only where the engine requests its own (see engine::request_shared_memory).
    unsafe { pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1) };
}

/// Finds or creates the table; called by the engine's shmem_startup under AddinShmemInitLock.
///
/// # Safety
/// Only from shmem_startup, holding AddinShmemInitLock.
pub unsafe fn attach() {
    let capacity = guc::analytics_slots();
    // SAFETY: the caller holds AddinShmemInitLock; the memory is initialised only by whoever
    // created it (found = false).
    unsafe {
        let mut found = false;
        let size = std::mem::size_of::<Header>() + capacity * std::mem::size_of::<Tally>();
        let base = pg_sys::ShmemInitStruct(NAME.as_ptr(), size, &mut found);
        let header = base.cast::<Header>();
        let slots = base
            .cast::<u8>()
            .add(std::mem::size_of::<Header>())
            .cast::<Tally>();
        if !found {
            header.write(Header {
                capacity,
                used: 0,
                pruned: [(0, 0); crate::engine::DATABASES],
                compacted: [(0, 0); crate::engine::DATABASES],
                counted: [0; crate::engine::DATABASES],
            });
            for i in 0..capacity {
                slots.add(i).write(tallies::FREE);
            }
        }
        HEADER = header;
        SLOTS = slots;
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
    }
}

/// Runs `f` on the table (slots, used) under its exclusive lock; None without shared memory.
fn with_tallies<R>(f: impl FnOnce(&mut [Tally], &mut usize) -> R) -> Option<R> {
    with_header(|header, slots| f(slots, &mut header.used))
}

/// Verifications counted so far in the database of engine slot `slot`.
pub fn counted(slot: usize) -> u64 {
    with_header(|header, _| header.counted.get(slot).copied().unwrap_or(0)).unwrap_or(0)
}

/// The writer's periodic work on the tables.
#[derive(Clone, Copy)]
enum Due {
    Compact,
    Prune,
}

/// Whether database `db`'s `what` is due (compaction every 10 s, pruning every 10 minutes),
/// noting that it runs now. Kept in shared memory: writers come and go, the schedule stays.
fn due(db: u32, now_us: i64, what: Due) -> bool {
    let every_us = match what {
        Due::Compact => 10_000_000,
        Due::Prune => 600_000_000,
    };
    with_header(|header, _| {
        let slots = match what {
            Due::Compact => &mut header.compacted,
            Due::Prune => &mut header.pruned,
        };
        let i = slots
            .iter()
            .position(|(oid, _)| *oid == db)
            .or_else(|| slots.iter().position(|(oid, _)| *oid == 0))
            // Every slot taken by other databases: the least recently served gives way.
            .or_else(|| (0..slots.len()).min_by_key(|&i| slots[i].1))
            .unwrap_or(0);
        let due = slots[i].0 != db || now_us.saturating_sub(slots[i].1) >= every_us;
        if due {
            slots[i] = (db, now_us);
        }
        due
    })
    .unwrap_or(false)
}

fn with_header<R>(f: impl FnOnce(&mut Header, &mut [Tally]) -> R) -> Option<R> {
    // SAFETY: the pointers are written once at shared-memory start-up, before this can run.
    let (header, lock) = unsafe { (HEADER, LOCK) };
    if !crate::engine::available() || header.is_null() || lock.is_null() {
        return None;
    }
    // SAFETY: pointers set at start-up, valid for the server's life, used under LOCK only; `f`
    // is plain memory work that does not raise (an error would release the lock anyway).
    unsafe {
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let header = &mut *header;
        let slots = std::slice::from_raw_parts_mut(SLOTS, header.capacity);
        let result = f(header, slots);
        pg_sys::LWLockRelease(lock);
        Some(result)
    }
}

/// A tally kept by a backend: (key id, created µs, code, minute) → (count, cost).
type Overflow = HashMap<(String, i64, u8, i64), (i64, i64)>;

thread_local! {
    /// Tallies that found the table full, added at a later call or when the backend exits
    /// (bounded: beyond MAX_OVERFLOW they are dropped, with a WARNING).
    static OVERFLOW: RefCell<Overflow> = RefCell::new(HashMap::new());
    /// Whether `drain_at_exit` is registered in this backend.
    static EXIT_DRAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
const MAX_OVERFLOW: usize = 100_000;

/// Counts one verification (its code, key, and the cost it spent) in its minute.
pub fn count(v: &Verification, spent: i64) {
    // Counted already, in its key's entry of the metering engine (`engine::record_use`).
    if v.tallied {
        return;
    }
    // SAFETY: reads the server's state.
    if !guc::analytics() || !crate::engine::available() || unsafe { pg_sys::RecoveryInProgress() } {
        return;
    }
    // A database the engine has no slot for (more than engine::DATABASES) has no writer to take
    // its tallies: they would only fill the table.
    let Some(slot) = crate::engine::writer_slot() else {
        return;
    };
    let now_us = v
        .now
        .map_or_else(|| verify::epoch_us(verify::wall_clock()), verify::epoch_us);
    let (id, created_us) = match &v.key_id {
        Some(id) if v.code != Code::NotFound => (id.as_str(), v.created_us),
        _ => ("", 0),
    };
    let key = TallyKey {
        db: crate::engine::my_database(),
        id,
        created_us,
        code: v.code.number(),
        minute: now_us.div_euclid(60_000_000),
    };
    let overflowing = OVERFLOW.with(|o| !o.borrow().is_empty());
    let Some((added, filling)) = with_header(|header, slots| {
        header.counted[slot] = header.counted[slot].wrapping_add(1);
        let used = &mut header.used;
        let added = tallies::add(slots, used, &key, 1, spent);
        // Only while there is ample room, a few at a time: the lock is every caller's.
        if overflowing && *used * 2 < slots.len() {
            drain_overflow(slots, used, key.db, OVERFLOW_BATCH);
        }
        (added, *used * 4 > slots.len() * 3)
    }) else {
        return;
    };
    if added == Added::Full {
        keep_for_later(&key, 1, spent);
    }
    // A new tally may be the first of a while: a writer must come for it (a running one takes
    // every tally anyway: checked without the engine's lock). A filling table asks for an early
    // write (at most every 10 ms per backend: that takes the engine's lock).
    let unseen = added == Added::New && !crate::engine::writer_running(slot);
    if unseen || (filling && early_wake_due()) {
        crate::engine::wake_writer_for_tallies(filling);
    }
}

/// Adds `count` VALID verifications of key `id` (created at `created_us`) in `minute`, spending
/// `cost`, to the table: a tally of an earlier minute that the key's engine entry still held
/// when the next minute's first verification came (`engine::record_use`).
pub fn add_valid(id: &str, created_us: i64, minute: i64, count: i64, cost: i64) {
    let key = valid_key(crate::engine::my_database(), id, created_us, minute);
    let added = with_tallies(|slots, used| tallies::add(slots, used, &key, count, cost));
    if added == Some(Added::Full) {
        keep_for_later(&key, count, cost);
    }
}

/// The tally key of key `id`'s VALID verifications in `minute` (database `db`): what the engine's
/// entries count for keys without limits.
pub fn valid_key(db: u32, id: &str, created_us: i64, minute: i64) -> TallyKey<'_> {
    TallyKey {
        db,
        id,
        created_us,
        code: Code::Valid.number(),
        minute,
    }
}

/// The writer's side: the VALID tallies it took out of the engine's entries with their uses
/// (`writer::collect`) join the table's, to be written with them.
pub fn add_taken(taken: &[Tally]) {
    if !taken.is_empty() {
        add_all(
            taken,
            "when the writer took them from the metering engine's entries",
        );
    }
}

/// Overflow tallies moved back into the table per call.
const OVERFLOW_BATCH: usize = 64;

fn early_wake_due() -> bool {
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        let due = last
            .get()
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(10));
        if due {
            last.set(Some(std::time::Instant::now()));
        }
        due
    })
}

fn keep_for_later(key: &TallyKey<'_>, count: i64, spent: i64) {
    OVERFLOW.with(|o| {
        let mut o = o.borrow_mut();
        if o.is_empty() {
            crate::engine::once_at_exit(&EXIT_DRAIN, drain_at_exit);
        }
        let k = (key.id.to_owned(), key.created_us, key.code, key.minute);
        if o.len() >= MAX_OVERFLOW && !o.contains_key(&k) {
            thread_local! { static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
            if !WARNED.with(|w| w.replace(true)) {
                warning!("pg_apikeys: the analytics table and this backend's overflow are full; some verifications are not counted (raise apikeys.analytics_slots)");
            }
            return;
        }
        let e = o.entry(k).or_default();
        e.0 += count;
        e.1 += spent;
    });
}

/// Moves up to `at_most` of this backend's overflow tallies into the table.
fn drain_overflow(slots: &mut [Tally], used: &mut usize, db: u32, at_most: usize) {
    OVERFLOW.with(|o| {
        let mut moved = 0;
        o.borrow_mut()
            .retain(|(id, created_us, code, minute), (count, cost)| {
                if moved >= at_most {
                    return true;
                }
                moved += 1;
                let key = TallyKey {
                    db,
                    id,
                    created_us: *created_us,
                    code: *code,
                    minute: *minute,
                };
                tallies::add(slots, used, &key, *count, *cost) == Added::Full
            });
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn drain_at_exit(_code: i32, _arg: pg_sys::Datum) {
    let db = crate::engine::my_database();
    with_tallies(|slots, used| drain_overflow(slots, used, db, usize::MAX));
    crate::engine::wake_writer_for_tallies(false);
}

/// The writer's side: every tally of database `db`, taken out of shared memory.
fn take(db: u32) -> Vec<Tally> {
    with_tallies(|slots, used| tallies::take(slots, used, db)).unwrap_or_default()
}

/// Puts tallies back after a failed write (what finds no room is dropped, with a WARNING).
pub fn put_back(taken: &[Tally]) {
    add_all(taken, "after a failed write");
}

/// Adds `adding` to the table; what finds no room is dropped, with a WARNING saying `when`.
fn add_all(adding: &[Tally], when: &str) {
    let lost = with_tallies(|slots, used| {
        adding
            .iter()
            .filter(|t| tallies::add(slots, used, &t.key(), t.count, t.cost) == Added::Full)
            .count()
    })
    .unwrap_or(0);
    if lost > 0 {
        warning!("pg_apikeys: {lost} verification tallies found no room {when} and are lost");
    }
}

/// Drops database `db`'s tallies (the database is gone, or its extension).
pub fn forget(db: u32) {
    take(db);
}

/// Whether database `db` has tallies waiting.
pub fn pending(db: u32) -> bool {
    with_tallies(|slots, _| tallies::any_of(slots, db)).unwrap_or(false)
}

/// Whether the table is three-quarters full (its tallies are then written at every round).
pub fn filling() -> bool {
    with_tallies(|slots, used| *used * 4 > slots.len() * 3).unwrap_or(false)
}

/// The minutes whose batches are added to verification_counts: those over for this long (their
/// last tallies reach the batches within a write round, about five seconds, after the minute).
const COMPACT_AFTER: &str = "70 seconds";

/// The writer's side, in a transaction of its own after the metering round: when `take`, this
/// database's tallies become batch rows (one per minute, see `write_batches`); minutes that are
/// over are compacted into verification_counts (at most every ten seconds), rolled up into hours
/// and days (every ten minutes) and old counts pruned (every ten minutes). A failure puts the
/// tallies back and is logged (the writer goes on): nothing analytics does holds up a quota
/// spend. True when tallies were written.
pub fn persist(db: u32, take: bool, now_us: i64) -> bool {
    let tallies = if take { self::take(db) } else { Vec::new() };
    let written = !tallies.is_empty()
        && in_transaction("verification counts not written yet", |client| {
            write_batches(client, &tallies)
        });
    if written {
        DIGESTS.with(|d| d.borrow_mut().remember(&tallies));
    } else if !tallies.is_empty() {
        put_back(&tallies);
    }
    // Compaction and pruning in a transaction of their own: should they fail, the batches
    // above are still written.
    if due(db, now_us, Due::Compact) {
        let prune = due(db, now_us, Due::Prune);
        in_transaction("verification counts not compacted yet", |client| {
            compact_digested(client);
            compact(client);
            roll_up(client);
            if prune {
                self::prune(client);
            }
        });
    }
    written
}

/// Runs `f` in a transaction as the tables' owner, with short lock and statement timeouts (a
/// lock on the tables — someone's LOCK, a VACUUM FULL — fails it quickly rather than delaying
/// the metering rounds around it). False, with a WARNING, when it failed; false too when this
/// database's SQL has no analytics tables yet (before ALTER EXTENSION … UPDATE nothing is
/// counted).
fn in_transaction(
    failed: &str,
    f: impl FnOnce(&mut pgrx::spi::SpiClient<'_>) + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> bool {
    PgTryBuilder::new(move || {
        BackgroundWorker::transaction(|| {
            if !crate::catalog::installed()
                || crate::catalog::relation_if_exists(c"verification_batches").is_none()
            {
                return false;
            }
            crate::owner::as_owner(|| {
                Spi::connect_mut(|client| {
                    errors::internal(client.update(
                        // (work_mem: the aggregates of a minute or ten hold a row per key)
                        "SET LOCAL lock_timeout = '100ms'; SET LOCAL statement_timeout = '20s';
                         SET LOCAL work_mem = '64MB'",
                        None,
                        &[],
                    ));
                    f(client);
                })
            });
            true
        })
    })
    .catch_others(|error| {
        let message = match &error {
            pg_sys::panic::CaughtError::PostgresError(e)
            | pg_sys::panic::CaughtError::ErrorReport(e) => e.message().to_owned(),
            _ => "an internal error".to_owned(),
        };
        // SAFETY: the failed transaction is aborted and its resources released, as
        // BackgroundWorker::transaction's own error path would before raising.
        unsafe { pg_sys::AbortCurrentTransaction() };
        warning!("pg_apikeys writer: {failed}: {message}");
        false
    })
    .execute()
}

/// Writes tallies as batch rows: one row per minute they count in, whatever their number.
fn write_batches(client: &mut pgrx::spi::SpiClient<'_>, taken: &[Tally]) {
    let mut by_minute: std::collections::BTreeMap<i64, Vec<&Tally>> = Default::default();
    for t in taken {
        by_minute.entry(t.minute).or_default().push(t);
    }
    for (minute, tallies) in by_minute {
        let columns = Columns::of(
            tallies
                .iter()
                .map(|t| (t.id(), t.created_us, t.code, t.count, t.cost)),
        );
        plans::update(
            client,
            "INSERT INTO apikeys.verification_batches (minute, key_ids, created, codes, counts, costs)
             VALUES ($1, $2, $3, $4, $5, $6)",
            None,
            &columns.args(minute),
        );
    }
}

/// Tallies as the arrays of a batch row (key_ids, created, codes, counts, costs).
struct Columns<'a> {
    ids: Vec<&'a str>,
    created: Vec<Option<TimestampWithTimeZone>>,
    codes: Vec<&'static str>,
    counts: Vec<i64>,
    costs: Vec<i64>,
}

impl<'a> Columns<'a> {
    /// From (key id, created µs, code, count, cost).
    fn of(tallies: impl Iterator<Item = (&'a str, i64, u8, i64, i64)>) -> Self {
        let mut c = Columns {
            ids: Vec::new(),
            created: Vec::new(),
            codes: Vec::new(),
            counts: Vec::new(),
            costs: Vec::new(),
        };
        for (id, created_us, code, count, cost) in tallies {
            c.ids.push(id);
            c.created
                .push((!id.is_empty()).then(|| verify::from_epoch_us(created_us)));
            c.codes.push(
                Code::ALL
                    .get(usize::from(code))
                    .map_or("VALID", |c| c.as_str()),
            );
            c.counts.push(count);
            c.costs.push(cost);
        }
        c
    }

    /// $1 the minute (epoch minutes, as its start), $2–$6 the arrays.
    fn args(self, minute: i64) -> [pgrx::datum::DatumWithOid<'static>; 6] {
        [
            verify::from_epoch_us(minute.saturating_mul(60_000_000)).into(),
            self.ids.into(),
            self.created.into(),
            self.codes.into(),
            self.counts.into(),
            self.costs.into(),
        ]
    }
}

/// The tallies of batch rows `b` (a FROM item), one row each: key_id, created, code, minute, n,
/// cost. Elements a malformed row lacks (arrays of unequal length) are skipped, not fatal.
fn unnested_sql(batches: &str) -> String {
    format!(
        "SELECT u.key_id, u.created, u.code, b.minute, u.n, u.cost
           FROM {batches} b,
                ROWS FROM (pg_catalog.unnest(b.key_ids), pg_catalog.unnest(b.created),
                           pg_catalog.unnest(b.codes), pg_catalog.unnest(b.counts),
                           pg_catalog.unnest(b.costs)) AS u(key_id, created, code, n, cost)
          WHERE u.key_id IS NOT NULL AND u.code IS NOT NULL AND u.n IS NOT NULL
            AND u.cost IS NOT NULL"
    )
}

/// Adds the batches of minutes that are over to verification_counts — each tally into its
/// minute, with the owner of its key as it is now; into its hour and day (UTC) too when the
/// minute is one `roll_up` has passed already (a batch put back after a failed write) — and
/// deletes them, in one statement. (The writer's own minutes went already: `compact_digested`.)
fn compact(client: &mut pgrx::spi::SpiClient<'_>) {
    let sql = format!(
        "WITH moved AS (
            DELETE FROM apikeys.verification_batches b
             WHERE b.minute OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)
                                                    '{COMPACT_AFTER}'::pg_catalog.interval)
               -- a backlog (the writer was away, a lock held compaction up) goes in steps
               AND b.minute OPERATOR(pg_catalog.<) (
                       SELECT pg_catalog.min(f.minute)
                              OPERATOR(pg_catalog.+) '10 minutes'::pg_catalog.interval
                         FROM apikeys.verification_batches f)
             RETURNING b.*
         ), v AS ({unnested}),
         -- A key's tallies of a minute come in several batches: summed before its owner is
         -- looked up (one probe per key and minute, not per batch).
         s AS (
            SELECT v.key_id, v.created, v.code, v.minute, pg_catalog.sum(v.n) AS n,
                   pg_catalog.sum(v.cost) AS cost
              FROM v GROUP BY 1, 2, 3, 4
         ), {add_sums}",
        unnested = unnested_sql("moved"),
        add_sums = add_sums_sql(),
    );
    errors::internal(client.update(&sql, None, &[]));
}

/// The end of a compaction statement whose CTE `s` (key_id, created, code, minute, n, cost)
/// holds one sum per key, code and minute: adds them to verification_counts, with each key's
/// owner as it is now.
fn add_sums_sql() -> String {
    format!(
        "o AS (
            SELECT s.key_id, s.code, s.minute, s.n, s.cost, k.owner
              FROM s LEFT JOIN apikeys.keys k ON k.id OPERATOR(pg_catalog.=) s.key_id
                                             AND k.created_at OPERATOR(pg_catalog.=) s.created
         )
         {ADD_TO_COUNTS}
         SELECT g.granularity, pg_catalog.date_trunc(g.granularity, o.minute, 'UTC'), o.key_id,
                o.owner, o.code, pg_catalog.sum(o.n)::pg_catalog.int8,
                pg_catalog.sum(o.cost)::pg_catalog.int8
           FROM o, (VALUES ('minute'), ('hour'), ('day')) AS g(granularity)
          WHERE g.granularity OPERATOR(pg_catalog.=) 'minute'
             OR o.minute OPERATOR(pg_catalog.<) {ROLLED_UP_THROUGH}
          GROUP BY 1, 2, 3, 4, 5
         {ON_CONFLICT_ADD}"
    )
}

thread_local! {
    /// In the writer: what it wrote to verification_batches, summed per minute, holding at most
    /// four times `apikeys.analytics_slots` sums (some three minutes of as many keys as the
    /// shared table holds; ~150 bytes each, 80 MB at the default): beyond, a minute is summed
    /// from its batch rows instead.
    static DIGESTS: RefCell<tallies::Digests> =
        RefCell::new(tallies::Digests::new(guc::analytics_slots().saturating_mul(4)));
}

/// Compacts the minutes that are over whose batch rows are all this writer's, from its digests:
/// the sums are inserted as they are (about a dozen batches a minute, each of up to every key
/// used, no longer unnested and summed again: that was most of what compaction cost) and exactly
/// the batch rows counted are deleted. The batch rows are counted under FOR UPDATE first: a
/// minute with a row the digest did not see (an earlier writer's, or one written by hand) is left
/// to `compact`, which runs next in the same transaction with the same cutoff (`now()` is the
/// transaction's).
fn compact_digested(client: &mut pgrx::spi::SpiClient<'_>) {
    if DIGESTS.with(|d| d.borrow().is_empty()) {
        return;
    }
    let cutoff = plans::select(
        client,
        &format!(
            "SELECT pg_catalog.now() OPERATOR(pg_catalog.-) '{COMPACT_AFTER}'::pg_catalog.interval"
        ),
        None,
        &[],
    )
    .first()
    .get_one::<TimestampWithTimeZone>();
    let Some(cutoff) = errors::internal(cutoff) else {
        return;
    };
    // Batch rows by their minute (epoch µs), with their row ids.
    let mut batches: std::collections::BTreeMap<i64, Vec<pg_sys::ItemPointerData>> =
        Default::default();
    for row in plans::update(
        client,
        "SELECT b.ctid, b.minute FROM apikeys.verification_batches b
          WHERE b.minute OPERATOR(pg_catalog.<) $1 FOR UPDATE OF b",
        None,
        &[cutoff.into()],
    ) {
        let ctid = errors::internal(row.get::<pg_sys::ItemPointerData>(1));
        let minute = errors::internal(row.get::<TimestampWithTimeZone>(2));
        if let (Some(ctid), Some(minute)) = (ctid, minute) {
            batches
                .entry(verify::epoch_us(minute))
                .or_default()
                .push(ctid);
        }
    }
    let sql = format!(
        "WITH s AS (
            SELECT u.key_id, u.created, u.code, $1::pg_catalog.timestamptz AS minute, u.n, u.cost
              FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]),
                              pg_catalog.unnest($3::pg_catalog.timestamptz[]),
                              pg_catalog.unnest($4::pg_catalog.text[]),
                              pg_catalog.unnest($5::pg_catalog.int8[]),
                              pg_catalog.unnest($6::pg_catalog.int8[])) AS u(key_id, created, code, n, cost)
         ), {add_sums}",
        add_sums = add_sums_sql(),
    );
    for (minute_us, rows) in batches {
        // The writer's rows start on the minute; any other is not one of its batches.
        if minute_us.rem_euclid(60_000_000) != 0 {
            continue;
        }
        let minute = minute_us.div_euclid(60_000_000);
        let Some(sums) = DIGESTS.with(|d| d.borrow_mut().take(minute, rows.len())) else {
            continue;
        };
        let columns = Columns::of(sums.iter().map(|((id, created_us, code), (n, cost))| {
            (id.as_str(), *created_us, *code, *n, *cost)
        }));
        plans::update(client, &sql, None, &columns.args(minute));
        plans::update(
            client,
            "DELETE FROM apikeys.verification_batches b
              WHERE b.ctid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.tid[])",
            None,
            &[rows.into()],
        );
    }
    // The minutes over whose batches went some other way (compact, or by hand).
    DIGESTS.with(|d| {
        d.borrow_mut()
            .forget_before(verify::epoch_us(cutoff).div_euclid(60_000_000))
    });
}

/// Compaction and roll-up add rows to verification_counts the same way: `ADD_TO_COUNTS`, a
/// SELECT of (granularity, bucket, key_id, owner, code, count, cost), then `ON_CONFLICT_ADD`,
/// whose arbiter is verification_counts_bucket_idx.
const ADD_TO_COUNTS: &str = "INSERT INTO apikeys.verification_counts AS t
                (granularity, bucket, key_id, owner, code, count, cost)";
const ON_CONFLICT_ADD: &str =
    "ON CONFLICT (granularity, bucket, key_id, code, (COALESCE(owner, '')), (owner IS NULL))
         DO UPDATE SET count = t.count OPERATOR(pg_catalog.+) excluded.count,
                       cost = t.cost OPERATOR(pg_catalog.+) excluded.cost";

/// The first minute whose counts no hour or day row includes yet.
const ROLLED_UP_THROUGH: &str = "COALESCE((SELECT r.through FROM apikeys.verification_rollup r),
                                          '-infinity'::pg_catalog.timestamptz)";

/// Adds the minute counts since `verification_rollup.through` to their hours and days (UTC) and
/// moves `through` on, every ten minutes: up to the first minute that may still get batches (not
/// over for 70 s yet, or not compacted yet). Hour and day rows then cost a write per key every ten
/// minutes, not every minute; verification_stats adds the minutes from `through` on.
fn roll_up(client: &mut pgrx::spi::SpiClient<'_>) {
    let sql = format!(
        "WITH span AS (
            SELECT f.since, u.until
              FROM (SELECT {through} AS since) f,
                   (SELECT LEAST(pg_catalog.date_trunc('minute', pg_catalog.now()
                                     OPERATOR(pg_catalog.-) '{COMPACT_AFTER}'::pg_catalog.interval, 'UTC'),
                                 COALESCE((SELECT pg_catalog.min(b.minute)
                                             FROM apikeys.verification_batches b),
                                          'infinity'::pg_catalog.timestamptz)) AS until) u
             WHERE u.until OPERATOR(pg_catalog.>=)
                   (f.since OPERATOR(pg_catalog.+) '10 minutes'::pg_catalog.interval)
         ), moved AS (
            INSERT INTO apikeys.verification_rollup AS r (one, through)
            SELECT true, span.until FROM span
            ON CONFLICT (one) DO UPDATE SET through = excluded.through
         )
         {add_to_counts}
         SELECT g.granularity, pg_catalog.date_trunc(g.granularity, m.bucket, 'UTC'), m.key_id,
                m.owner, m.code, pg_catalog.sum(m.count)::pg_catalog.int8,
                pg_catalog.sum(m.cost)::pg_catalog.int8
           FROM apikeys.verification_counts m, span, (VALUES ('hour'), ('day')) AS g(granularity)
          WHERE m.granularity OPERATOR(pg_catalog.=) 'minute'
            AND m.bucket OPERATOR(pg_catalog.>=) span.since
            AND m.bucket OPERATOR(pg_catalog.<) span.until
          GROUP BY 1, 2, 3, 4, 5
         {on_conflict_add}",
        through = ROLLED_UP_THROUGH,
        add_to_counts = ADD_TO_COUNTS,
        on_conflict_add = ON_CONFLICT_ADD,
    );
    errors::internal(client.update(&sql, None, &[]));
}

/// Minute counts are kept at most this long (hours and days: the retention).
const MINUTES_KEPT_DAYS: i64 = 7;

/// Deletes counts older than `apikeys.analytics_retention` (minutes: at most 7 days old). A
/// retention that is not a positive interval keeps everything, with a WARNING.
fn prune(client: &mut pgrx::spi::SpiClient<'_>) {
    let text = guc::analytics_retention();
    let retention = match crate::keys::pg_duration(&text) {
        Ok(span) if span.months > 0 || span.days > 0 || span.micros > 0 => span,
        _ => {
            warning!("pg_apikeys: apikeys.analytics_retention = \"{}\" is not a positive interval; verification counts are not pruned", errors::shown(&text));
            return;
        }
    };
    let sql = format!(
        "DELETE FROM apikeys.verification_counts
          WHERE (granularity OPERATOR(pg_catalog.=) 'minute'
                 AND bucket OPERATOR(pg_catalog.+) '1 minute'::pg_catalog.interval
                     OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)
                     LEAST($1::pg_catalog.interval, $2::pg_catalog.interval))
                 -- not before its hour and day have it
                 AND bucket OPERATOR(pg_catalog.<) {through})
             -- a bucket goes once all of it is older than the retention (its end, not start)
             OR (granularity OPERATOR(pg_catalog.=) 'hour'
                 AND bucket OPERATOR(pg_catalog.+) '1 hour'::pg_catalog.interval
                     OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $1))
             OR (granularity OPERATOR(pg_catalog.=) 'day'
                 AND bucket OPERATOR(pg_catalog.+) '1 day'::pg_catalog.interval
                     OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-) $1))",
        through = ROLLED_UP_THROUGH,
    );
    plans::update(
        client,
        &sql,
        None,
        &[
            crate::keys::interval(retention).into(),
            Interval::from_micros(MINUTES_KEPT_DAYS * 86_400_000_000).into(),
        ],
    );
}

/// The table a bucket reads: the coarsest granularity it is a whole number of; 22023 for a
/// bucket that is not a whole number of minutes (or has months).
fn granularity_of(bucket: Interval) -> &'static str {
    const MINUTE: i64 = 60_000_000;
    let us = i64::from(bucket.days())
        .saturating_mul(86_400_000_000)
        .saturating_add(bucket.micros());
    if bucket.months() != 0 || us <= 0 || us % MINUTE != 0 {
        errors::invalid_argument(
            "bucket",
            "must be a positive whole number of minutes, without months or years",
        );
    }
    if us % (24 * 60 * MINUTE) == 0 {
        "day"
    } else if us % (60 * MINUTE) == 0 {
        "hour"
    } else {
        "minute"
    }
}

/// Verification counts (SPEC §8) from `since` (inclusive) to `until` (exclusive), in buckets
/// of `bucket` (whole minutes; aligned to 2001-01-01 00:00 UTC, a Monday), per key, owner and
/// code: `count` calls, `cost` spent (0 for refused ones). NOT_FOUND attempts count under
/// key_id NULL. Filtered by `key_id` and `owner` when given. Counts reach the tables within
/// seconds (see the module comment); minutes are kept 7 days at most, hours and days for
/// `apikeys.analytics_retention`.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn verification_stats(
    key_id: default!(Option<String>, "NULL"),
    owner: default!(Option<String>, "NULL"),
    since: default!(Option<TimestampWithTimeZone>, "now() - '1 day'::interval"),
    until: default!(Option<TimestampWithTimeZone>, "now()"),
    bucket: default!(Option<Interval>, "'1 hour'"),
) -> TableIterator<
    'static,
    (
        name!(bucket, Option<TimestampWithTimeZone>),
        name!(key_id, Option<String>),
        name!(owner, Option<String>),
        name!(code, Option<String>),
        name!(count, Option<i64>),
        name!(cost, Option<i64>),
    ),
> {
    let since = since.unwrap_or_else(|| errors::invalid_argument("since", "must not be NULL"));
    let until = until.unwrap_or_else(|| errors::invalid_argument("until", "must not be NULL"));
    let bucket = bucket.unwrap_or_else(|| errors::invalid_argument("bucket", "must not be NULL"));
    let granularity = granularity_of(bucket);
    // What is compacted (rolled up or not), and the batches of the last minutes that are not yet.
    let sql = format!(
        "WITH stored AS (
            SELECT t.bucket, t.key_id, t.owner, t.code, t.count, t.cost
              FROM apikeys.verification_counts t
             WHERE t.granularity OPERATOR(pg_catalog.=) $6
            UNION ALL
            -- minutes no hour or day row includes yet
            SELECT pg_catalog.date_trunc($6, t.bucket, 'UTC'), t.key_id, t.owner, t.code, t.count,
                   t.cost
              FROM apikeys.verification_counts t
             WHERE $6 OPERATOR(pg_catalog.<>) 'minute'
               AND t.granularity OPERATOR(pg_catalog.=) 'minute'
               AND t.bucket OPERATOR(pg_catalog.>=) {through}
            UNION ALL
            -- (in the counts' collation, C: keys' own is the database's, for their index)
            SELECT pg_catalog.date_trunc($6, v.minute, 'UTC'), v.key_id COLLATE pg_catalog.\"C\",
                   k.owner COLLATE pg_catalog.\"C\", v.code COLLATE pg_catalog.\"C\", v.n, v.cost
              FROM ({unnested}) v
              LEFT JOIN apikeys.keys k ON k.id OPERATOR(pg_catalog.=) v.key_id
                                      AND k.created_at OPERATOR(pg_catalog.=) v.created
         )
         SELECT pg_catalog.date_bin($5, t.bucket, '2001-01-01 00:00:00+00'), NULLIF(t.key_id, ''),
                t.owner, t.code, pg_catalog.sum(t.count)::pg_catalog.int8,
                pg_catalog.sum(t.cost)::pg_catalog.int8
           FROM stored t
          WHERE t.bucket OPERATOR(pg_catalog.>=) $3 AND t.bucket OPERATOR(pg_catalog.<) $4
            AND ($1::pg_catalog.text IS NULL OR t.key_id OPERATOR(pg_catalog.=) $1)
            AND ($2::pg_catalog.text IS NULL OR t.owner OPERATOR(pg_catalog.=) $2)
          GROUP BY 1, 2, 3, 4
          ORDER BY 1, 2 NULLS FIRST, 3 NULLS FIRST, 4",
        unnested = unnested_sql(
            "(SELECT * FROM apikeys.verification_batches w
               WHERE w.minute OPERATOR(pg_catalog.>=) $3
                 AND ($1::pg_catalog.text IS NULL
                      OR $1 OPERATOR(pg_catalog.=) ANY (w.key_ids)))"
        ),
        through = ROLLED_UP_THROUGH,
    );
    let rows = Spi::connect(|client| {
        plans::select(
            client,
            &sql,
            None,
            &[
                key_id.into(),
                owner.into(),
                since.into(),
                until.into(),
                bucket.into(),
                granularity.into(),
            ],
        )
        .map(|row| {
            (
                errors::internal(row.get::<TimestampWithTimeZone>(1)),
                errors::internal(row.get::<String>(2)),
                errors::internal(row.get::<String>(3)),
                errors::internal(row.get::<String>(4)),
                errors::internal(row.get::<i64>(5)),
                errors::internal(row.get::<i64>(6)),
            )
        })
        .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    /// `code:count:cost` of key `id` over the last hour, once the writer has written `calls`.
    fn counted(id: &str, calls: i64) -> String {
        for _ in 0..300 {
            let total = one::<i64>(&format!(
                "SELECT COALESCE(sum(count), 0)::bigint FROM apikeys.verification_stats(key_id => '{id}', until => clock_timestamp() + '1 hour'::interval)"
            ))
            .unwrap_or(0);
            if total >= calls {
                break;
            }
            run("SELECT pg_sleep(0.1)");
        }
        one::<String>(&format!(
            "SELECT string_agg(code || ':' || count || ':' || cost, ',' ORDER BY code)
               FROM (SELECT code, sum(count) AS count, sum(cost) AS cost
                       FROM apikeys.verification_stats(key_id => '{id}', until => clock_timestamp() + '1 hour'::interval)
                      GROUP BY code) s"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn every_verification_is_counted_with_its_code_and_cost_but_minting_is_not() {
        let (id, key) = create(
            r#"permissions => '{"docs": ["read"]}', rate_limit_max => 4, rate_limit_window => '1 hour'"#,
        );
        assert_eq!(code(&key, "cost => 2"), "VALID");
        assert_eq!(
            code(&key, r#"required => '{"docs": ["write"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(code(&key, ""), "VALID");
        // Minting takes the last unit of the window, and is not counted.
        let token = mint(&key, "60000");
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        assert_eq!(token_code(&token, ""), "RATE_LIMITED");
        assert_error(
            &format!("SELECT apikeys.authenticate('{key}')"),
            "28000",
            "RATE_LIMITED",
        );
        assert_eq!(
            counted(&id, 6),
            "INSUFFICIENT_PERMISSIONS:1:0,RATE_LIMITED:3:0,VALID:2:3"
        );
    }

    #[pg_test]
    fn valid_verifications_of_a_key_without_limits_are_counted_but_minting_is_not() {
        // Counted in the key's entry of the metering engine, taken by the writer with its uses.
        let (id, key) = create("");
        assert_eq!(code(&key, "cost => 3"), "VALID");
        assert_eq!(code(&key, ""), "VALID");
        let token = mint(&key, "60000");
        assert_eq!(token_code(&token, ""), "VALID");
        assert_eq!(
            code(&key, r#"required => '{"docs": ["read"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(counted(&id, 4), "INSUFFICIENT_PERMISSIONS:1:0,VALID:3:5");
    }

    #[pg_test]
    fn valid_verifications_across_a_minute_boundary_count_in_their_own_minutes() {
        let (id, key) = create("");
        run("CREATE TEMP TABLE calls (minute timestamptz, code text)");
        // To 1.5 s before the next minute: the writer takes the key's count with its uses every
        // five seconds, so its engine entry usually sees both minutes (the earlier minute's
        // count then moves to the tallies table).
        run("SELECT pg_sleep(mod(118.5 - extract(second FROM clock_timestamp()), 60))");
        for _ in 0..30 {
            run(&format!(
                "INSERT INTO calls SELECT date_trunc('minute', clock_timestamp()), (apikeys.verify_key('{key}')).code"
            ));
            run("SELECT pg_sleep(0.1)");
        }
        counted(&id, 30);
        let per_minute = |sql: &str| one::<String>(sql).unwrap_or_default();
        let made = per_minute(
            "SELECT string_agg(minute || ' ' || code || ' ' || n, ', ' ORDER BY minute)
               FROM (SELECT minute, code, count(*) AS n FROM calls GROUP BY 1, 2) c",
        );
        let stats = per_minute(&format!(
            "SELECT string_agg(bucket || ' ' || code || ' ' || count, ', ' ORDER BY bucket)
               FROM apikeys.verification_stats(key_id => '{id}', since => now() - '1 hour'::interval,
                      until => clock_timestamp() + '1 hour'::interval, bucket => '1 minute')"
        ));
        assert_eq!(
            made.matches("VALID").count(),
            2,
            "the calls spanned two minutes: {made}"
        );
        assert_eq!(stats, made);
    }

    /// Sets `verification_rollup.through` (the minutes before it count in hours and days).
    fn rolled_up_through(at: &str) {
        run(&format!(
            // An upsert, not DELETE + INSERT: the test database's own writer may be inserting
            // the row (uncommitted, so the DELETE misses it), and a plain INSERT would then fail
            // on the primary key once the writer commits.
            "INSERT INTO apikeys.verification_rollup VALUES (true, '{at}')
             ON CONFLICT (one) DO UPDATE SET through = excluded.through"
        ));
    }

    #[pg_test]
    fn stats_come_in_buckets_of_whole_minutes_hours_or_days() {
        rolled_up_through("2026-01-05 12:00+00");
        run("INSERT INTO apikeys.verification_counts VALUES
               ('minute', '2026-01-05 10:00+00', 'k1', 'o', 'VALID', 2, 2),
               ('minute', '2026-01-05 10:01+00', 'k1', 'o', 'VALID', 3, 6),
               ('minute', '2026-01-05 10:07+00', '', NULL, 'NOT_FOUND', 4, 0),
               ('hour', '2026-01-05 10:00+00', 'k1', 'o', 'VALID', 5, 8),
               ('hour', '2026-01-05 11:00+00', 'k1', 'o', 'VALID', 1, 1),
               ('day', '2026-01-05 00:00+00', 'k1', 'o', 'VALID', 6, 9)");
        let stats = |args: &str| {
            one::<String>(&format!(
                "SET LOCAL TimeZone = 'UTC';
                 SELECT string_agg(to_char(bucket, 'DD HH24:MI') || ' ' || COALESCE(key_id, '-') || ' '
                                   || code || ' ' || count || ' ' || cost, ', ' ORDER BY bucket, code)
                   FROM apikeys.verification_stats({args})"
            ))
            .unwrap_or_default()
        };
        let day = "since => '2026-01-05 00:00+00', until => '2026-01-06 00:00+00'";
        assert_eq!(
            stats(&format!("{day}, bucket => '5 minutes'")),
            "05 10:00 k1 VALID 5 8, 05 10:05 - NOT_FOUND 4 0"
        );
        assert_eq!(
            stats(&format!("{day}, bucket => '2 hours'")),
            "05 10:00 k1 VALID 6 9"
        );
        assert_eq!(
            stats(&format!("{day}, bucket => '1 day'")),
            "05 00:00 k1 VALID 6 9"
        );
        assert_eq!(
            stats(&format!(
                "{day}, bucket => '1 hour', key_id => 'k1', owner => 'o'"
            )),
            "05 10:00 k1 VALID 5 8, 05 11:00 k1 VALID 1 1"
        );
        assert_eq!(stats(&format!("{day}, owner => 'nobody'")), "");
        for bad in ["'90 seconds'", "'1 month'", "'0'", "'-1 hour'", "NULL"] {
            assert_error(
                &format!("SELECT * FROM apikeys.verification_stats(bucket => {bad})"),
                "22023",
                "bucket",
            );
        }
        assert_error(
            "SELECT * FROM apikeys.verification_stats(since => NULL)",
            "22023",
            "since",
        );
    }

    /// verification_stats of key `rollup-key` on 2020-01-01, in buckets of `bucket`.
    fn day_of(bucket: &str) -> String {
        one::<String>(&format!(
            "SET LOCAL TimeZone = 'UTC';
             SELECT string_agg(to_char(bucket, 'HH24:MI') || ' ' || count || ' ' || cost, ', '
                               ORDER BY bucket)
               FROM apikeys.verification_stats(key_id => 'rollup-key',
                        since => '2020-01-01 00:00+00', until => '2020-01-02 00:00+00',
                        bucket => '{bucket}')"
        ))
        .unwrap_or_default()
    }

    /// `HH24:MI count` of key `key`'s rows of `granularity`, as stored.
    fn rows_of(key: &str, granularity: &str) -> String {
        one::<String>(&format!(
            "SET LOCAL TimeZone = 'UTC';
             SELECT string_agg(to_char(bucket, 'HH24:MI') || ' ' || count, ', ' ORDER BY bucket)
               FROM apikeys.verification_counts
              WHERE key_id = '{key}' AND granularity = '{granularity}'"
        ))
        .unwrap_or_default()
    }

    fn batch(minute: &str, key: &str, count: i64, cost: i64) {
        run(&format!(
            "INSERT INTO apikeys.verification_batches VALUES ('{minute}', '{{{key}}}', '{{NULL}}',
               '{{VALID}}', '{{{count}}}', '{{{cost}}}')"
        ));
    }

    #[pg_test]
    fn minutes_are_rolled_up_into_hours_and_days_once_and_stats_count_each_call_once() {
        let rows = |granularity| rows_of("rollup-key", granularity);
        // 09:59 is rolled up already (in its hour and day); 10:00, 10:05 and 10:30 are not.
        rolled_up_through("2020-01-01 10:00+00");
        run("INSERT INTO apikeys.verification_counts VALUES
               ('minute', '2020-01-01 09:59+00', 'rollup-key', NULL, 'VALID', 1, 1),
               ('hour', '2020-01-01 09:00+00', 'rollup-key', NULL, 'VALID', 1, 1),
               ('day', '2020-01-01 00:00+00', 'rollup-key', NULL, 'VALID', 1, 1),
               ('minute', '2020-01-01 10:00+00', 'rollup-key', NULL, 'VALID', 1, 2),
               ('minute', '2020-01-01 10:05+00', 'rollup-key', NULL, 'VALID', 1, 2),
               ('minute', '2020-01-01 10:30+00', 'rollup-key', NULL, 'VALID', 1, 2)");
        assert_eq!(
            day_of("1 hour"),
            "09:00 1 1, 10:00 3 6",
            "hour rows and minutes"
        );
        assert_eq!(day_of("1 day"), "00:00 4 7", "the day's row and minutes");
        // A batch of a minute not rolled up yet becomes a minute row only.
        batch("2020-01-01 10:20+00", "rollup-key", 1, 2);
        Spi::connect_mut(super::compact);
        assert_eq!(rows("hour"), "09:00 1");
        let (hours, days) = ("09:00 1 1, 10:00 4 8", "00:00 5 9");
        assert_eq!(day_of("1 hour"), hours);
        assert_eq!(day_of("1 day"), days);
        Spi::connect_mut(super::roll_up);
        assert_eq!(rows("hour"), "09:00 1, 10:00 4");
        assert_eq!(rows("day"), "00:00 5");
        assert_eq!(
            one::<bool>("SELECT through > '2020-01-02' FROM apikeys.verification_rollup"),
            Some(true),
            "through moved on to the minutes that may still get batches"
        );
        assert_eq!(day_of("1 hour"), hours, "each call counted once");
        assert_eq!(day_of("1 day"), days);
        assert_eq!(
            day_of("1 minute"),
            "09:59 1 1, 10:00 1 2, 10:05 1 2, 10:20 1 2, 10:30 1 2"
        );
        // A batch of a minute rolled up already (put back after a failed write) goes into its
        // minute, hour and day at once.
        batch("2020-01-01 10:10+00", "rollup-key", 2, 4);
        Spi::connect_mut(super::compact);
        assert_eq!(
            rows("minute"),
            "09:59 1, 10:00 1, 10:05 1, 10:10 2, 10:20 1, 10:30 1"
        );
        assert_eq!(day_of("1 hour"), "09:00 1 1, 10:00 6 12");
        assert_eq!(day_of("1 day"), "00:00 7 13");
    }

    #[pg_test]
    fn minutes_are_rolled_up_every_ten_minutes_and_at_once_when_never_before() {
        // Rolled up five minutes ago: not again before ten.
        let five_minutes_ago = one::<String>(
            "SELECT (date_trunc('minute', now(), 'UTC') - '5 minutes'::interval)::text",
        )
        .unwrap();
        rolled_up_through(&five_minutes_ago);
        run("INSERT INTO apikeys.verification_counts
             SELECT 'minute', through, 'recent-key', NULL, 'VALID', 1, 1 FROM apikeys.verification_rollup");
        let through = "SELECT through::text FROM apikeys.verification_rollup";
        let before = one::<String>(through);
        Spi::connect_mut(super::roll_up);
        assert_eq!(rows_of("recent-key", "hour"), "");
        assert_eq!(one::<String>(through), before);
        // Nothing rolled up yet (a new database): every minute goes into its hour, once.
        run("DELETE FROM apikeys.verification_rollup;
             INSERT INTO apikeys.verification_counts VALUES
               ('minute', '2020-02-01 10:00+00', 'fresh-key', NULL, 'VALID', 1, 1),
               ('minute', '2020-02-01 10:01+00', 'fresh-key', NULL, 'VALID', 1, 1)");
        Spi::connect_mut(super::roll_up);
        assert_eq!(rows_of("fresh-key", "hour"), "10:00 2");
        assert_eq!(rows_of("fresh-key", "day"), "00:00 2");
        assert_eq!(
            one::<i64>(
                "SELECT sum(count)::bigint FROM apikeys.verification_counts
                  WHERE key_id = 'recent-key' AND granularity = 'hour'"
            ),
            Some(1)
        );
        assert_eq!(
            one::<i64>(
                "SELECT sum(count)::bigint FROM apikeys.verification_stats(key_id => 'fresh-key',
                   since => '2020-02-01', until => '2020-02-02', bucket => '1 hour')"
            ),
            Some(2)
        );
    }

    #[pg_test]
    fn minutes_are_pruned_after_seven_days_only_once_rolled_up() {
        run("INSERT INTO apikeys.verification_counts VALUES
               ('minute', date_trunc('minute', now(), 'UTC') - '8 days'::interval, 'old-key', NULL, 'VALID', 1, 1),
               ('minute', date_trunc('minute', now(), 'UTC') - '1 day'::interval, 'old-key', NULL, 'VALID', 1, 1)");
        let minutes = "SELECT count(*) FROM apikeys.verification_counts
                        WHERE key_id = 'old-key' AND granularity = 'minute'";
        rolled_up_through("-infinity");
        Spi::connect_mut(super::prune);
        assert_eq!(one::<i64>(minutes), Some(2), "not in any hour yet: kept");
        run("UPDATE apikeys.verification_rollup SET through = now()");
        Spi::connect_mut(super::prune);
        assert_eq!(
            one::<i64>(minutes),
            Some(1),
            "the one older than 7 days went"
        );
    }

    /// Tallies (key id, created µs, code, epoch minute, count, cost) as the writer takes them.
    fn tallies(
        list: &[(&str, i64, crate::verify::Code, i64, i64, i64)],
    ) -> Vec<crate::tallies::Tally> {
        let mut slots = vec![crate::tallies::FREE; 64];
        let mut used = 0;
        for &(id, created_us, code, minute, count, cost) in list {
            let key = crate::tallies::TallyKey {
                db: 1,
                id,
                created_us,
                code: code.number(),
                minute,
            };
            crate::tallies::add(&mut slots, &mut used, &key, count, cost);
        }
        crate::tallies::take(&mut slots, &mut used, 1)
    }

    /// Writes `taken` as the writer does: batch rows, and the writer's digest.
    fn written_by_the_writer(taken: &[crate::tallies::Tally]) {
        Spi::connect_mut(|client| super::write_batches(client, taken));
        super::DIGESTS.with(|d| d.borrow_mut().remember(taken));
    }

    /// A key's id and created_at in epoch µs.
    fn created_us(id: &str) -> i64 {
        one::<i64>(&format!(
            "SELECT (extract(epoch FROM created_at) * 1000000)::bigint FROM apikeys.keys WHERE id = '{id}'"
        ))
        .unwrap()
    }

    /// 2020-03-01 10:00 UTC in epoch minutes.
    const MARCH_MINUTE: i64 = 1_583_056_800 / 60;

    fn march_counts() -> String {
        one::<String>(
            "SET LOCAL TimeZone = 'UTC';
             SELECT string_agg(granularity || ' ' || to_char(bucket, 'HH24:MI') || ' ' || key_id || ' '
                               || COALESCE(owner, '-') || ' ' || code || ' ' || count || ' ' || cost,
                               ', ' ORDER BY granularity, key_id, code, bucket)
               FROM apikeys.verification_counts
              WHERE bucket >= '2020-03-01 00:00+00' AND bucket < '2020-03-02 00:00+00'",
        )
        .unwrap_or_default()
    }

    fn batches_of_march() -> i64 {
        one::<i64>(
            "SELECT count(*) FROM apikeys.verification_batches
                     WHERE minute >= '2020-03-01 00:00+00' AND minute < '2020-03-02 00:00+00'",
        )
        .unwrap_or(-1)
    }

    #[pg_test]
    fn the_writers_own_minutes_are_compacted_from_its_digest_with_the_keys_owners() {
        use crate::verify::Code;
        let (id, _) = create("owner => 'digest-owner'");
        let created = created_us(&id);
        rolled_up_through("2020-03-01 10:00+00");
        written_by_the_writer(&tallies(&[
            (&id, created, Code::Valid, MARCH_MINUTE, 2, 3),
            ("", 0, Code::NotFound, MARCH_MINUTE, 1, 0),
            (&id, created, Code::Valid, MARCH_MINUTE + 1, 1, 1),
        ]));
        written_by_the_writer(&tallies(&[
            (&id, created, Code::Valid, MARCH_MINUTE, 1, 2),
            (&id, created, Code::RateLimited, MARCH_MINUTE, 1, 0),
        ]));
        assert_eq!(batches_of_march(), 3);
        Spi::connect_mut(super::compact_digested);
        assert_eq!(batches_of_march(), 0, "every batch row went");
        assert_eq!(
            march_counts(),
            format!(
                "minute 10:00  - NOT_FOUND 1 0, minute 10:00 {id} digest-owner RATE_LIMITED 1 0, \
                 minute 10:00 {id} digest-owner VALID 3 5, minute 10:01 {id} digest-owner VALID 1 1"
            )
        );
        assert!(super::DIGESTS.with(|d| d.borrow().is_empty()));
        // A late write of a minute compacted already (a put-back): its own digest, added to the
        // minute and, being before `through`, to its hour and day too.
        rolled_up_through("2020-03-02 00:00+00");
        written_by_the_writer(&tallies(&[(&id, created, Code::Valid, MARCH_MINUTE, 5, 5)]));
        Spi::connect_mut(super::compact_digested);
        assert_eq!(
            march_counts(),
            format!(
                "day 00:00 {id} digest-owner VALID 5 5, hour 10:00 {id} digest-owner VALID 5 5, \
                 minute 10:00  - NOT_FOUND 1 0, minute 10:00 {id} digest-owner RATE_LIMITED 1 0, \
                 minute 10:00 {id} digest-owner VALID 8 10, minute 10:01 {id} digest-owner VALID 1 1"
            )
        );
    }

    #[pg_test]
    fn a_minute_with_a_batch_the_writer_did_not_write_is_compacted_from_its_batches_once() {
        use crate::verify::Code;
        rolled_up_through("2020-03-01 10:00+00");
        written_by_the_writer(&tallies(&[(
            "gone-key",
            5,
            Code::Valid,
            MARCH_MINUTE,
            2,
            2,
        )]));
        // An earlier writer's batch of the same minute.
        batch("2020-03-01 10:00+00", "gone-key", 3, 3);
        Spi::connect_mut(super::compact_digested);
        assert_eq!(batches_of_march(), 2, "left to compact");
        assert_eq!(march_counts(), "");
        assert!(
            super::DIGESTS.with(|d| d.borrow().is_empty()),
            "digest dropped"
        );
        Spi::connect_mut(super::compact);
        assert_eq!(batches_of_march(), 0);
        assert_eq!(march_counts(), "minute 10:00 gone-key - VALID 5 5");
    }

    #[pg_test]
    fn a_minute_compacted_from_its_batches_before_a_late_write_counts_every_write_once() {
        use crate::verify::Code;
        rolled_up_through("2020-03-01 10:00+00");
        written_by_the_writer(&tallies(&[(
            "late-key",
            5,
            Code::Valid,
            MARCH_MINUTE,
            2,
            2,
        )]));
        Spi::connect_mut(super::compact);
        // A write of the same minute after it (tallies put back after a failed write): the
        // digest now says two batches, the table holds one.
        written_by_the_writer(&tallies(&[(
            "late-key",
            5,
            Code::Valid,
            MARCH_MINUTE,
            3,
            3,
        )]));
        Spi::connect_mut(super::compact_digested);
        assert_eq!(batches_of_march(), 1, "left to compact");
        Spi::connect_mut(super::compact);
        assert_eq!(batches_of_march(), 0);
        assert_eq!(march_counts(), "minute 10:00 late-key - VALID 5 5");
    }

    #[pg_test]
    fn a_batch_row_off_the_minute_is_never_taken_for_the_writers() {
        use crate::verify::Code;
        rolled_up_through("2020-03-01 10:00+00");
        written_by_the_writer(&tallies(&[("odd-key", 5, Code::Valid, MARCH_MINUTE, 2, 2)]));
        batch("2020-03-01 10:00:30+00", "odd-key", 3, 3);
        Spi::connect_mut(super::compact_digested);
        assert_eq!(batches_of_march(), 1, "only the writer's row went");
        assert_eq!(march_counts(), "minute 10:00 odd-key - VALID 2 2");
    }

    #[pg_test]
    fn only_a_superuser_turns_counting_off_or_changes_retention() {
        run("CREATE ROLE analytics_user");
        run("SET LOCAL ROLE analytics_user");
        assert_error("SET apikeys.analytics = off", "42501", "apikeys.analytics");
        assert_error(
            "SET apikeys.analytics_retention = '1 day'",
            "42501",
            "apikeys.analytics_retention",
        );
        run("RESET ROLE");
    }
}
