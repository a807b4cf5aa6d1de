//! Persistence of the metering engine (`engine`): a launcher and one writer per database.
//!
//! The launcher is a static background worker connected to no database (so it runs as no
//! role): it only reads shared memory and starts, for each database with work waiting, a
//! writer connected to that database as the extension's owner (never the bootstrap superuser
//! when the owner may log in). A writer commits a batch whenever a verification wakes it (a
//! quota spend waiting to be durable, a filling table) and about every second otherwise (uses
//! every five seconds), and
//! exits after a while without work, so that `DROP DATABASE` is not held up for long. Its
//! statements run as the owner with `search_path = pg_catalog, pg_temp` and name every
//! operator with its schema: no object a database owner or another role can create is used.

use crate::engine::{self, with_shared};
use crate::metering::{self, Counters};
use crate::plans;
use crate::slots::{self, KeyRef};
use crate::verify::from_epoch_us;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::time::{Duration, Instant};

/// A writer with nothing to write for this long exits (the launcher starts another on demand).
const IDLE_EXIT: Duration = Duration::from_secs(2);
/// Uses of keys are written this often (sooner when the table fills up): each write is a row per
/// key used since the last, so with many distinct keys less often is much less work.
const USES_EVERY: Duration = Duration::from_secs(5);
/// Quota written ahead of a key goes back after it has had no call for this long (µs).
const GIVE_BACK_AFTER_US: i64 = 1_000_000;

pub fn register_launcher() {
    BackgroundWorkerBuilder::new("pg_apikeys launcher")
        .set_type("pg_apikeys launcher")
        .set_library("pg_apikeys")
        .set_function("pg_apikeys_launcher")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn now_us() -> i64 {
    crate::verify::epoch_us(crate::verify::wall_clock())
}

/// The launcher: starts a writer for every database that has work and none running. It
/// exits with code 1 whatever stops it (pg_terminate_backend cannot reach it: SIGTERM), so the
/// postmaster starts it again.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_apikeys_launcher(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: a plain read of this process's id.
    let me = unsafe { pg_sys::MyProcPid };
    let procno = engine::my_procno();
    with_shared(true, |s| {
        s.header.launcher_pid = me;
        s.header.launcher_procno = procno;
    });
    let mut started: Vec<(u32, DynamicBackgroundWorker)> = Vec::new();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        // Writers that stopped before they ever registered count as failed starts.
        started.retain(|(db, w)| {
            let stopped = matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped));
            if stopped {
                with_shared(true, |s| {
                    if let Some(d) = s.header.databases.iter_mut().find(|d| d.oid == *db) {
                        if d.writer_pid == 0 && d.started_us != 0 {
                            d.failed_starts += 1;
                            d.started_us = 0;
                            // Its work is still there: try again (as the bootstrap superuser).
                            d.wanted = true;
                        }
                    }
                });
            }
            !stopped
        });
        let now = now_us();
        let to_start: Vec<(u32, u32)> = with_shared(true, |s| {
            let mut to_start = Vec::new();
            for d in s.header.databases.iter_mut().filter(|d| d.oid != 0) {
                if d.failed_starts >= 3 {
                    // Its writer cannot connect (the database was dropped): forget it.
                    let oid = d.oid;
                    d.forget();
                    forget_database(s, oid);
                    break;
                }
                let pending = d.wanted || d.durable < d.next_seq;
                let starting = d.started_us != 0 && now - d.started_us < 5_000_000;
                if pending && d.writer_pid == 0 && !starting {
                    d.started_us = now;
                    d.wanted = false;
                    // After a failed start (the recorded owner was dropped, say), connect as the
                    // bootstrap superuser once, only to learn the owner (see pg_apikeys_writer).
                    to_start.push((d.oid, if d.failed_starts > 0 { 0 } else { d.owner }));
                }
            }
            to_start
        })
        .unwrap_or_default();
        for (db, owner) in to_start {
            let argument = (u64::from(db) << 32) | u64::from(owner);
            match BackgroundWorkerBuilder::new("pg_apikeys writer")
                .set_type("pg_apikeys writer")
                .set_library("pg_apikeys")
                .set_function("pg_apikeys_writer")
                .enable_spi_access()
                .set_restart_time(None)
                .set_argument(Some(pg_sys::Datum::from(argument)))
                .set_notify_pid(me)
                .load_dynamic()
            {
                Ok(worker) => started.push((db, worker)),
                Err(_) => warning!(
                    "pg_apikeys launcher: could not start a writer (max_worker_processes?)"
                ),
            }
        }
    }
    // Exit code 1, so that the postmaster starts the launcher again 5 seconds later whatever
    // stopped it (a clean exit would end it for good), except at server shutdown.
    // SAFETY: the launcher's last act; proc_exit runs the exit callbacks and does not return.
    unsafe { pg_sys::proc_exit(1) }
}

/// Drops every entry of a database that is gone (its verification tallies too).
fn forget_database(s: &mut engine::Shared<'_>, db: u32) {
    crate::analytics::forget(db);
    let mut i = 0;
    while i < s.slots.len() {
        if s.slots[i].db == db {
            // Backward shift may move a later entry into i: look at i again.
            s.remove(i);
        } else {
            i += 1;
        }
    }
}

/// Uses of a key to add: id, created_at (µs), how many, the last (µs).
type Use = (String, i64, i64, i64);
/// Counters of a key to set, as they are to be written (the quota written ahead taken off).
#[derive(Clone)]
struct MeterRow {
    id: String,
    created_us: i64,
    version: i64,
    counters: Counters,
    last_refill: Option<i64>,
    /// The sequence number they are current as of.
    seq: u64,
    /// How much quota is written as spent ahead of the calls (`metering::write_ahead`).
    ahead: u8,
    /// `apikeys.keys.credits` that `counters.remaining` includes.
    credits: i64,
}

/// A batch of what is to be written: uses to add and counters to set.
#[derive(Default)]
struct Batch {
    up_to: u64,
    uses: Vec<Use>,
    meters: Vec<MeterRow>,
}

/// Takes what this database has to write out of shared memory: every changed counter (with that
/// key's uses, so that request_count keeps step with a quota), and, when `all_uses` (every few
/// seconds, when the table fills up, at exit), the uses of every key. Only the dirty lists are
/// visited, not the whole table. Beside the batch: the VALID verifications the entries counted for
/// analytics (`Entry::valid_count`), for the tallies table whatever becomes of the batch.
fn collect(
    index: usize,
    db: u32,
    all_uses: bool,
    at_rest: bool,
) -> (Batch, Vec<crate::tallies::Tally>) {
    let now = now_us();
    with_shared(true, |s| {
        let all_uses = all_uses || s.header.used * 4 > s.header.capacity * 3;
        let d = &mut s.header.databases[index];
        d.wanted = false;
        d.flush_requested = false;
        let mut batch = Batch {
            up_to: d.next_seq,
            ..Batch::default()
        };
        let mut valid = Vec::new();
        let mut plain = Vec::new();
        let lists: &[usize] = if all_uses {
            &[slots::COUNTERS, slots::USES]
        } else {
            &[slots::COUNTERS]
        };
        for &list in lists {
            let mut k = 0;
            while let Some(i) = s.queued(list, k) {
                if s.slots[i].db != db {
                    k += 1;
                    continue;
                }
                let e = &mut s.slots[i];
                if e.valid_count > 0 {
                    let key = crate::analytics::valid_key(db, e.id(), e.created_us, e.valid_minute);
                    valid.extend(crate::tallies::Tally::new(
                        &key,
                        e.valid_count,
                        e.valid_cost,
                    ));
                    e.valid_count = 0;
                    e.valid_cost = 0;
                }
                // A key in use with quota written ahead waits, queued, until half its cover is
                // used (its callers then ask for the write; every spend so far is covered, so
                // none waits for this one) — otherwise a writer woken for anything would commit
                // it at every round, a flush per spend or two. What no call used goes back once
                // the key has rested a while (a pause between bursts does not make callers wait).
                let active = now.saturating_sub(e.last_access_us) < GIVE_BACK_AFTER_US;
                let ample = e.ahead > 0 && !e.cover_running_low();
                let resting = e.dirty_seq <= e.flushed_seq && e.spends == 0;
                let hold =
                    e.metered && !at_rest && active && e.unused_ahead() > 0 && (ample || resting);
                if hold {
                    k += 1;
                    continue;
                }
                if e.uses > 0 {
                    batch.uses.push((
                        e.id().to_owned(),
                        e.created_us,
                        e.uses as i64,
                        e.last_used_us,
                    ));
                    e.uses = 0;
                    if !e.metered {
                        plain.push(i);
                    }
                }
                if e.metered && (e.dirty_seq > e.flushed_seq || e.unused_ahead() > 0) {
                    let mut counters = e.counters();
                    let ahead = metering::write_ahead(counters.remaining, e.spends, at_rest);
                    counters.remaining = counters.remaining.map(|left| left - i64::from(ahead));
                    e.spends = 0;
                    e.set_pending(counters.remaining);
                    batch.meters.push(MeterRow {
                        id: e.id().to_owned(),
                        created_us: e.created_us,
                        version: e.version,
                        counters,
                        last_refill: e.last_refill(),
                        seq: e.dirty_seq,
                        ahead,
                        credits: e.credits,
                    });
                }
                // Off both lists (its uses are taken too). The last queued slot of this list
                // takes position k: look at k again.
                s.unmark(i, slots::USES);
                s.unmark(i, slots::COUNTERS);
            }
        }
        // Entries of keys without limits hold nothing once their uses are taken. (Removing one
        // moves others: remove by key, not by the slot numbers collected.)
        let plain: Vec<(String, i64)> = plain
            .into_iter()
            .map(|i| (s.slots[i].id().to_owned(), s.slots[i].created_us))
            .collect();
        for (id, created_us) in &plain {
            let key = KeyRef {
                db,
                id,
                created_us: *created_us,
            };
            if let Some(i) = slots::find(s.slots, &key) {
                if s.slots[i].clean() && !s.slots[i].metered {
                    s.remove(i);
                }
            }
        }
        (batch, valid)
    })
    .unwrap_or_default()
}

/// Tries at writing the counters of a key whose row the writer cannot see (created by a
/// transaction not committed yet) before giving up on them (rolled back: the key never was).
const UNWRITTEN_TRIES: u8 = 60;

/// After a commit: the counters are written (but for `unwritten`, which go back on the dirty
/// list), waiting verifications go on, and when the table is three-quarters full the least
/// recently used entries with nothing left to write go, whichever their database.
fn completed(index: usize, db: u32, batch: &Batch, unwritten: &[(String, i64)]) {
    with_shared(true, |s| {
        for row in &batch.meters {
            let key = KeyRef {
                db,
                id: &row.id,
                created_us: row.created_us,
            };
            if let Some(i) = slots::find(s.slots, &key) {
                let failed = unwritten
                    .iter()
                    .any(|(u, c)| *u == row.id && *c == row.created_us);
                let e = &mut s.slots[i];
                e.set_pending(None);
                let current = e.version == row.version && e.last_refill() == row.last_refill;
                if failed && e.unwritten < UNWRITTEN_TRIES {
                    e.unwritten += 1;
                    s.mark(i, slots::COUNTERS);
                } else if failed {
                    // Never written (the key was deleted, or its creation rolled back): nothing
                    // of it is stored, nothing is left to give back.
                    e.flushed_seq = e.flushed_seq.max(row.seq);
                    e.unwritten = 0;
                    let (version, refill) = (e.version, e.last_refill());
                    e.set_written(None, version, refill, 0);
                } else if current {
                    e.flushed_seq = e.flushed_seq.max(row.seq);
                    e.unwritten = 0;
                    e.set_written(
                        row.counters.remaining,
                        row.version,
                        row.last_refill,
                        row.ahead,
                    );
                    // Quota written ahead goes back when the key rests: keep it queued.
                    if e.unused_ahead() > 0 {
                        s.mark(i, slots::COUNTERS);
                    }
                } else {
                    // The entry moved on (reloaded at a new meter_version, or refilled) while
                    // this row was written: the row no longer holds what the entry recorded as
                    // written, so write the entry's counters again.
                    e.unwritten = 0;
                    s.counters_changed(index, i);
                }
            }
        }
        let d = &mut s.header.databases[index];
        d.durable = d.durable.max(batch.up_to);
        evict_if_full(s);
    });
    // SAFETY: the condition variable lives in shared memory for the server's life.
    unsafe { pg_sys::ConditionVariableBroadcast(engine::flushed_cv(index)) };
}

thread_local! {
    /// When this writer last looked for entries to evict with nothing to write.
    static EVICTED_AT: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}
const EVICT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// When the table is three-quarters full, the least recently used entries with nothing left to
/// write (and no open window) go, whichever their database, down to half full.
fn evict_if_full(s: &mut engine::Shared<'_>) {
    if s.header.used * 4 > s.header.capacity * 3 {
        let now = now_us();
        // A window still open stays: evicting it would reopen it.
        let mut clean: Vec<(i64, u32, String, i64)> = s
            .slots
            .iter()
            .filter(|e| e.db != 0 && e.clean())
            .filter(|e| !(e.is_window() && e.window_needed_until() > now))
            .map(|e| (e.last_access_us, e.db, e.id().to_owned(), e.created_us))
            .collect();
        clean.sort();
        let mut evicted = false;
        for (_, db, id, created_us) in clean {
            if s.header.used * 2 <= s.header.capacity {
                break;
            }
            let key = KeyRef {
                db,
                id: &id,
                created_us,
            };
            if let Some(i) = slots::find(s.slots, &key) {
                s.remove(i);
                evicted = true;
            }
        }
        if evicted {
            s.header.evictions += 1;
        }
    }
}

/// Puts what a batch that could not be written holds back, for the next writer: its uses, and
/// its counters back on the dirty list.
fn put_back(db: u32, batch: &Batch) {
    with_shared(true, |s| {
        for (id, created_us, count, at_us) in &batch.uses {
            let key = KeyRef {
                db,
                id,
                created_us: *created_us,
            };
            if let Some(i) = s.insert(&key) {
                s.add_uses(i, (*count).max(0) as u64, *at_us);
            }
        }
        for row in &batch.meters {
            let key = KeyRef {
                db,
                id: &row.id,
                created_us: row.created_us,
            };
            if let Some(i) = slots::find(s.slots, &key) {
                // Not committed: the rows keep what they held (the floor written before still
                // stands; a rolled-back write is none).
                s.slots[i].set_pending(None);
                s.mark(i, slots::COUNTERS);
            }
        }
    });
}

fn times(v: impl Iterator<Item = Option<i64>>) -> Vec<Option<TimestampWithTimeZone>> {
    v.map(|t| t.map(from_epoch_us)).collect()
}

/// Writes a batch in one transaction: uses are added to `apikeys.meters`, counters replace
/// theirs (never with an older meter_version). Only rows of keys that still exist are written.
fn write(batch: &Batch) -> Written {
    BackgroundWorker::transaction(|| {
        if !crate::catalog::installed() {
            return Written::NoExtension;
        }
        // The library is newer than this database's SQL (ALTER EXTENSION … UPDATE not run yet):
        // keep the uses until it is.
        if !crate::catalog::metering_up_to_date() {
            return Written::NotYet;
        }
        // Identities' quotas have rows of their own (apikeys.identity_meters).
        let (identities, keys): (Vec<MeterRow>, Vec<MeterRow>) = batch
            .meters
            .iter()
            .cloned()
            .partition(|m| engine::identity_of_entry(&m.id).is_some());
        let keys = Batch {
            up_to: batch.up_to,
            uses: batch.uses.clone(),
            meters: keys,
        };
        crate::owner::as_owner(|| {
            Spi::connect_mut(|client| {
                let (uses, meters) = update_rows_in_place(client, &keys);
                let uses = add_to_existing_rows(client, uses);
                insert_uses(client, &uses);
                let mut unwritten = set_counters(client, &meters);
                if !identities.is_empty()
                    && crate::catalog::relation_if_exists(c"identity_meters").is_some()
                {
                    unwritten.extend(set_identity_counters(client, &identities));
                }
                Written::Done(unwritten)
            })
        })
    })
}

/// The arrays a statement about uses takes: ids, creation times, counts, last uses.
#[allow(clippy::type_complexity)]
fn use_columns(
    uses: &[Use],
) -> (
    Vec<&str>,
    Vec<Option<TimestampWithTimeZone>>,
    Vec<i64>,
    Vec<Option<TimestampWithTimeZone>>,
) {
    (
        uses.iter().map(|u| u.0.as_str()).collect(),
        times(uses.iter().map(|u| Some(u.1))),
        uses.iter().map(|u| u.2).collect(),
        times(uses.iter().map(|u| Some(u.3))),
    )
}

/// Adds uses to the keys' rows that exist, with one UPDATE (no ON CONFLICT arbiter checks: perf,
/// most of the writer's time per row with many distinct keys); returns the uses of keys without
/// a row yet.
fn add_to_existing_rows(client: &mut pgrx::spi::SpiClient<'_>, mut uses: Vec<Use>) -> Vec<Use> {
    if uses.is_empty() {
        return uses;
    }
    let (ids, created, counts, last) = use_columns(&uses);
    let updated = plans::update(
        client,
        "UPDATE apikeys.meters m
            SET request_count = m.request_count OPERATOR(pg_catalog.+) u.n,
                last_used_at = GREATEST(m.last_used_at, u.t)
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),
                           pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($3::pg_catalog.int8[]),
                           pg_catalog.unnest($4::pg_catalog.timestamptz[])) u(id, c, n, t)
          WHERE m.key_id OPERATOR(pg_catalog.=) u.id
            AND m.key_created_at OPERATOR(pg_catalog.=) u.c
         RETURNING m.key_id, m.key_created_at",
        None,
        &[ids.into(), created.into(), counts.into(), last.into()],
    );
    let done: std::collections::HashSet<(String, i64)> = updated
        .filter_map(|row| {
            let id = row.get::<String>(1).ok().flatten()?;
            let at = row.get::<TimestampWithTimeZone>(2).ok().flatten()?;
            Some((id, crate::verify::epoch_us(at)))
        })
        .collect();
    uses.retain(|u| !done.contains(&(u.0.clone(), u.1)));
    uses
}

/// Gives keys that still exist (created at that time) their first row with these uses, or
/// replaces the row a deleted key of the same id left.
fn insert_uses(client: &mut pgrx::spi::SpiClient<'_>, uses: &[Use]) {
    if uses.is_empty() {
        return;
    }
    let (ids, created, counts, last) = use_columns(uses);
    plans::update(
        client,
        "INSERT INTO apikeys.meters AS m (key_id, key_created_at, meter_version, request_count, last_used_at)
         SELECT u.id, u.c, 0, u.n, u.t
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),
                           pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($3::pg_catalog.int8[]),
                           pg_catalog.unnest($4::pg_catalog.timestamptz[])) u(id, c, n, t)
           JOIN apikeys.keys k ON k.id OPERATOR(pg_catalog.=) u.id
                              AND k.created_at OPERATOR(pg_catalog.=) u.c
         ON CONFLICT (key_id) DO UPDATE SET
            request_count = CASE WHEN m.key_created_at OPERATOR(pg_catalog.=) excluded.key_created_at
                                 THEN m.request_count OPERATOR(pg_catalog.+) excluded.request_count
                                 ELSE excluded.request_count END,
            last_used_at = CASE WHEN m.key_created_at OPERATOR(pg_catalog.=) excluded.key_created_at
                                THEN GREATEST(m.last_used_at, excluded.last_used_at)
                                ELSE excluded.last_used_at END,
            meter_version = CASE WHEN m.key_created_at OPERATOR(pg_catalog.=) excluded.key_created_at
                                 THEN m.meter_version ELSE 0 END,
            key_created_at = excluded.key_created_at",
        None,
        &[ids.into(), created.into(), counts.into(), last.into()],
    );
}

/// Sets the counters of keys that still exist (never with an older meter_version); returns the
/// keys (id, created_at µs) whose counters were not written (a key whose creating transaction
/// has not committed yet): they stay dirty.
fn set_counters(client: &mut pgrx::spi::SpiClient<'_>, m: &[MeterRow]) -> Vec<(String, i64)> {
    if m.is_empty() {
        return Vec::new();
    }
    let ids: Vec<&str> = m.iter().map(|r| r.id.as_str()).collect();
    let created = times(m.iter().map(|r| Some(r.created_us)));
    let versions: Vec<i64> = m.iter().map(|r| r.version).collect();
    let remaining: Vec<Option<i64>> = m.iter().map(|r| r.counters.remaining).collect();
    let refilled = times(m.iter().map(|r| r.last_refill));
    let starts = times(m.iter().map(|r| r.counters.window_start_us));
    let counts: Vec<i64> = m.iter().map(|r| r.counters.window_count).collect();
    let previous: Vec<i64> = m.iter().map(|r| r.counters.window_previous).collect();
    let credits: Vec<i64> = m.iter().map(|r| r.credits).collect();
    let table = plans::update(
        client,
        "INSERT INTO apikeys.meters AS m (key_id, key_created_at, meter_version, remaining,
                last_refill_at, window_start, window_count, window_previous, request_count, credits)
         SELECT u.id, u.c, u.v, u.r, u.lr, u.ws, u.wc, u.wp, 0, u.cr
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),
                           pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($3::pg_catalog.int8[]),
                           pg_catalog.unnest($4::pg_catalog.int8[]),
                           pg_catalog.unnest($5::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($6::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($7::pg_catalog.int8[]),
                           pg_catalog.unnest($8::pg_catalog.int8[]),
                           pg_catalog.unnest($9::pg_catalog.int8[])) u(id, c, v, r, lr, ws, wc, wp, cr)
           JOIN apikeys.keys k ON k.id OPERATOR(pg_catalog.=) u.id
                              AND k.created_at OPERATOR(pg_catalog.=) u.c
         ON CONFLICT (key_id) DO UPDATE SET
            meter_version = excluded.meter_version, remaining = excluded.remaining,
            last_refill_at = excluded.last_refill_at, window_start = excluded.window_start,
            window_count = excluded.window_count, window_previous = excluded.window_previous,
            credits = excluded.credits,
            request_count = CASE WHEN m.key_created_at OPERATOR(pg_catalog.=) excluded.key_created_at
                                 THEN m.request_count ELSE 0 END,
            key_created_at = excluded.key_created_at
          WHERE m.meter_version OPERATOR(pg_catalog.<=) excluded.meter_version
             OR m.key_created_at OPERATOR(pg_catalog.<>) excluded.key_created_at
         RETURNING m.key_id",
        None,
        &[
            ids.into(),
            created.into(),
            versions.into(),
            remaining.into(),
            refilled.into(),
            starts.into(),
            counts.into(),
            previous.into(),
            credits.into(),
        ],
    );
    let written: std::collections::HashSet<String> = table
        .filter_map(|row| row.get::<String>(1).ok().flatten())
        .collect();
    m.iter()
        .filter(|r| !written.contains(&r.id))
        .map(|r| (r.id.clone(), r.created_us))
        .collect()
}

/// Sets the quota counters of identities that still exist (never with an older meter_version);
/// returns the entries (id, created_at µs) not written.
fn set_identity_counters(
    client: &mut pgrx::spi::SpiClient<'_>,
    m: &[MeterRow],
) -> Vec<(String, i64)> {
    let ids: Vec<i64> = m
        .iter()
        .map(|r| engine::identity_of_entry(&r.id).unwrap_or(0))
        .collect();
    let created = times(m.iter().map(|r| Some(r.created_us)));
    let versions: Vec<i64> = m.iter().map(|r| r.version).collect();
    let remaining: Vec<Option<i64>> = m.iter().map(|r| r.counters.remaining).collect();
    let refilled = times(m.iter().map(|r| r.last_refill));
    let credits: Vec<i64> = m.iter().map(|r| r.credits).collect();
    let table = plans::update(
        client,
        "INSERT INTO apikeys.identity_meters AS m (identity_id, identity_created_at, meter_version,
                remaining, last_refill_at, credits)
         SELECT u.id, u.c, u.v, u.r, u.lr, u.cr
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]),
                           pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($3::pg_catalog.int8[]),
                           pg_catalog.unnest($4::pg_catalog.int8[]),
                           pg_catalog.unnest($5::pg_catalog.timestamptz[]),
                           pg_catalog.unnest($6::pg_catalog.int8[])) u(id, c, v, r, lr, cr)
           JOIN apikeys.identities i ON i.id OPERATOR(pg_catalog.=) u.id
                                    AND i.created_at OPERATOR(pg_catalog.=) u.c
         ON CONFLICT (identity_id) DO UPDATE SET
            meter_version = excluded.meter_version, remaining = excluded.remaining,
            last_refill_at = excluded.last_refill_at, credits = excluded.credits,
            identity_created_at = excluded.identity_created_at
          WHERE m.meter_version OPERATOR(pg_catalog.<=) excluded.meter_version
             OR m.identity_created_at OPERATOR(pg_catalog.<>) excluded.identity_created_at
         RETURNING m.identity_id",
        None,
        &[
            ids.into(),
            created.into(),
            versions.into(),
            remaining.into(),
            refilled.into(),
            credits.into(),
        ],
    );
    let written: std::collections::HashSet<i64> = table
        .filter_map(|row| row.get::<i64>(1).ok().flatten())
        .collect();
    m.iter()
        .filter(|r| !engine::identity_of_entry(&r.id).is_some_and(|id| written.contains(&id)))
        .map(|r| (r.id.clone(), r.created_us))
        .collect()
}

/// Batches of at most this many keys update their rows one by one.
const SMALL_BATCH: usize = 16;

/// A small batch (a hot key's spends, a few keys' uses) updates each key's existing row with one
/// index-scan UPDATE: the set-based statements below plan a hash join whose executor start-up was
/// most of a writer's time per commit (perf), which a hot quota key pays at every spend. Returns
/// what is left for the set-based statements: keys without a row yet (or written by a newer
/// meter_version), and everything when the batch is large.
#[allow(clippy::type_complexity)]
fn update_rows_in_place(
    client: &mut pgrx::spi::SpiClient<'_>,
    batch: &Batch,
) -> (Vec<Use>, Vec<MeterRow>) {
    let mut keys: Vec<(&str, i64)> = batch
        .uses
        .iter()
        .map(|u| (u.0.as_str(), u.1))
        .chain(batch.meters.iter().map(|m| (m.id.as_str(), m.created_us)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.len() > SMALL_BATCH {
        return (batch.uses.clone(), batch.meters.clone());
    }
    let (mut uses_left, mut meters_left) = (Vec::new(), Vec::new());
    for (id, created_us) in keys {
        let used = batch.uses.iter().find(|u| u.0 == id && u.1 == created_us);
        let meter = batch
            .meters
            .iter()
            .find(|m| m.id == id && m.created_us == created_us);
        let counters = meter.map(|m| m.counters).unwrap_or_default();
        let updated = plans::update(
            client,
            "UPDATE apikeys.meters m SET
                request_count = m.request_count OPERATOR(pg_catalog.+) $3,
                last_used_at = GREATEST(m.last_used_at, $4),
                meter_version = CASE WHEN $5 THEN $6 ELSE m.meter_version END,
                remaining = CASE WHEN $5 THEN $7 ELSE m.remaining END,
                last_refill_at = CASE WHEN $5 THEN $8 ELSE m.last_refill_at END,
                window_start = CASE WHEN $5 THEN $9 ELSE m.window_start END,
                window_count = CASE WHEN $5 THEN $10 ELSE m.window_count END,
                window_previous = CASE WHEN $5 THEN $11 ELSE m.window_previous END,
                credits = CASE WHEN $5 THEN $12 ELSE m.credits END
              WHERE m.key_id OPERATOR(pg_catalog.=) $1
                AND m.key_created_at OPERATOR(pg_catalog.=) $2
                AND (NOT $5 OR m.meter_version OPERATOR(pg_catalog.<=) $6)
              RETURNING 1",
            None,
            &[
                id.into(),
                from_epoch_us(created_us).into(),
                used.map_or(0, |u| u.2).into(),
                used.map(|u| from_epoch_us(u.3)).into(),
                meter.is_some().into(),
                meter.map_or(0, |m| m.version).into(),
                counters.remaining.into(),
                meter.and_then(|m| m.last_refill).map(from_epoch_us).into(),
                counters.window_start_us.map(from_epoch_us).into(),
                counters.window_count.into(),
                counters.window_previous.into(),
                meter.map_or(0, |m| m.credits).into(),
            ],
        );
        if updated.is_empty() {
            uses_left.extend(used.cloned());
            meters_left.extend(meter.cloned());
        }
    }
    (uses_left, meters_left)
}

/// What became of a batch.
#[derive(Clone, PartialEq, Eq)]
enum Written {
    /// Done, but for the counters of these keys (id, created_at µs).
    Done(Vec<(String, i64)>),
    NoExtension,
    NotYet,
}

/// One round: the counters and uses (`flush_meters`), then the verification tallies in a
/// transaction of their own, so that nothing analytics does can hold up a quota spend. Tallies
/// go with the uses (every few seconds, at rest), or at every round while their table is filling
/// up. True when anything was written.
fn flush(index: usize, db: u32, all_uses: bool, at_rest: bool) -> bool {
    let metered = flush_meters(index, db, all_uses, at_rest);
    let take = all_uses || at_rest || crate::analytics::filling();
    let counted = crate::analytics::persist(db, take, now_us());
    metered || counted
}

/// Counters and uses: collect, write, complete. A failed write puts the uses back and
/// re-raises (the writer exits, the launcher starts another).
fn flush_meters(index: usize, db: u32, all_uses: bool, at_rest: bool) -> bool {
    let (batch, valid) = collect(index, db, all_uses, at_rest);
    crate::analytics::add_taken(&valid);
    if batch.uses.is_empty() && batch.meters.is_empty() {
        with_shared(true, |s| {
            let d = &mut s.header.databases[index];
            d.durable = d.durable.max(batch.up_to);
            // A table full of windows and written entries has nothing to write: make room (at
            // most every 100 ms: waiting callers wake the writer every 10 ms, and a table full
            // of open windows would be scanned at each wake-up).
            if EVICTED_AT.with(|at| at.get().is_none_or(|t| t.elapsed() >= EVICT_EVERY)) {
                EVICTED_AT.with(|at| at.set(Some(std::time::Instant::now())));
                evict_if_full(s);
            }
        });
        // SAFETY: see completed().
        unsafe { pg_sys::ConditionVariableBroadcast(engine::flushed_cv(index)) };
        return false;
    }
    let written = PgTryBuilder::new(|| write(&batch))
        .catch_others(|error| {
            put_back(db, &batch);
            error.rethrow()
        })
        .execute();
    let unwritten = match written {
        Written::Done(unwritten) => unwritten,
        // The extension is gone from this database: nothing of it is kept.
        Written::NoExtension => {
            with_shared(true, |s| forget_database(s, db));
            Vec::new()
        }
        Written::NotYet => {
            put_back(db, &batch);
            return false;
        }
    };
    completed(index, db, &batch, &unwritten);
    true
}

/// Settings a database's or role's `ALTER … SET` gives every session, the writer's too, that
/// would stop it or make its commits lose durability: read-only transactions, another role,
/// timeouts, an isolation level that can fail a batch, a search_path, asynchronous commit.
const PINNED: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
    (c"role", c"none"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    // A row lock held by an open transaction (one that deleted a key with uses not yet written)
    // fails the batch after a second instead of holding every spend of the database: the batch
    // goes back to shared memory and the next writer tries again.
    (c"lock_timeout", c"1s"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"exit_on_error", c"off"),
    (c"transform_null_equals", c"off"),
    (c"synchronous_commit", c"on"),
    // Every statement of the writer is driven by an array of keys: probing apikeys.keys and
    // apikeys.meters by index, key by key, beats hashing a scan of either (a million keys) at
    // every write (perf: a seq scan and hash of apikeys.keys was most of the writer's time).
    (c"enable_hashjoin", c"off"),
    (c"enable_mergejoin", c"off"),
    // …and the index probes those nested loops need stay on whatever a database's or role's
    // settings say (without them, a join of a batch with apikeys.keys scans it per row).
    (c"enable_nestloop", c"on"),
    (c"enable_indexscan", c"on"),
    (c"enable_bitmapscan", c"on"),
    (c"enable_seqscan", c"on"),
];

/// Sets `name` for the rest of the session: PGC_S_SESSION outranks a database's or role's
/// defaults; inside a transaction, which commits it.
fn set_for_session(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // SAFETY: two C strings that outlive the call; errors are raised as PostgreSQL errors.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SET,
            true,
            0,
            false,
        );
    }
}

fn pin_session_settings() {
    BackgroundWorker::transaction(|| {
        // A writer connected without naming a role (when the owner cannot log in) would take a
        // database's `session_authorization` too: back to the role it connected as, before
        // `role` is reset on top of it.
        // SAFETY: the authenticated user always exists in a connected session; its name is a
        // palloc'd C string used at once. A session_authorization locked at connection (a
        // worker that named its role) outranks this and is left as it is.
        let me = unsafe {
            std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(
                pg_sys::GetAuthenticatedUserId(),
                false,
            ))
        };
        set_for_session(c"session_authorization", me);
        for (name, value) in PINNED {
            set_for_session(name, value);
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn unregister(_code: i32, arg: pg_sys::Datum) {
    let index = arg.value();
    // SAFETY: a plain read of this process's id.
    let me = unsafe { pg_sys::MyProcPid };
    with_shared(true, |s| {
        let db = s.header.databases[index].oid;
        // Work that arrived after the last collection (uses, spends) asks for the next writer
        // now: nothing else might, until the next verification.
        let mut pending = false;
        for list in [slots::COUNTERS, slots::USES] {
            let mut k = 0;
            while let Some(i) = s.queued(list, k) {
                if s.slots[i].db == db {
                    pending = true;
                    break;
                }
                k += 1;
            }
        }
        let d = &mut s.header.databases[index];
        if d.writer_pid == me {
            d.writer_pid = 0;
            d.writer_procno = -1;
            d.flush_requested = false;
            // Tallies are checked after the pid is cleared: one counted before this check is
            // seen here, one counted after finds no writer and asks for one itself.
            pending |= crate::analytics::pending(db);
            let d = &mut s.header.databases[index];
            if pending || d.durable < d.next_seq {
                d.wanted = true;
                engine::set_latch(s.header.launcher_procno);
            }
        }
    });
}

/// The writer of one database, connected as the role the launcher passed (packed with the
/// database in its argument). It claims the database (one writer each: batches are written in
/// order) and writes until it is stopped or idle.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_apikeys_writer(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let packed = argument.value() as u64;
    let db = (packed >> 32) as u32;
    let owner = pg_sys::Oid::from(packed as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(
        Some(pg_sys::Oid::from(db)),
        (owner != pg_sys::InvalidOid).then_some(owner),
    );
    pin_session_settings();
    // The owner may have changed since a backend recorded it (ALTER EXTENSION … OWNER TO):
    // record the current one and let the launcher start a writer connected as that role.
    let current = BackgroundWorker::transaction(engine::writer_role);
    if current != u32::from(owner) {
        debug1!("pg_apikeys writer: database {db} is owned by role {current}, not {owner:?}: restarting as that role");
        with_shared(true, |s| {
            if let Some(d) = s.header.databases.iter_mut().find(|d| d.oid == db) {
                d.owner = current;
                d.started_us = 0;
                d.failed_starts = 0;
                d.wanted = true;
            }
        });
        return;
    }
    // SAFETY: a plain read of this process's id.
    let me = unsafe { pg_sys::MyProcPid };
    let procno = engine::my_procno();
    let claimed = with_shared(true, |s| {
        let index = s.header.databases.iter().position(|d| d.oid == db)?;
        let d = &mut s.header.databases[index];
        if d.writer_pid != 0 {
            return None;
        }
        d.writer_pid = me;
        d.writer_procno = procno;
        d.started_us = 0;
        d.failed_starts = 0;
        // Whatever asked for a writer is this one's work now.
        d.wanted = false;
        d.flush_requested = false;
        Some(index)
    })
    .flatten();
    let Some(index) = claimed else {
        debug1!("pg_apikeys writer: database {db} has a writer already");
        return;
    };
    debug1!("pg_apikeys writer: writing for database {db}");
    // SAFETY: registers a plain function called once at exit while shared memory is attached.
    unsafe { pg_sys::before_shmem_exit(Some(unregister), pg_sys::Datum::from(index)) };
    let mut last_work = Instant::now();
    let mut last_uses = Instant::now();
    let mut uses_queued = 0;
    let mut verifications_counted = crate::analytics::counted(index);
    loop {
        let running = BackgroundWorker::wait_latch(Some(Duration::from_secs(1)));
        // New uses (of any database) count as activity: the writer stays while they come, and
        // leaves soon after they stop, having written them (DROP DATABASE waits 5 s at most).
        let queued = with_shared(false, |s| s.header.dirty_len[slots::USES]).unwrap_or(0);
        // So do this database's verifications, until they stop coming.
        let counted = crate::analytics::counted(index);
        if queued > uses_queued || counted != verifications_counted {
            last_work = Instant::now();
        }
        verifications_counted = counted;
        let all_uses = !running || last_uses.elapsed() >= USES_EVERY;
        if all_uses {
            last_uses = Instant::now();
        }
        if flush(index, db, all_uses, !running) {
            last_work = Instant::now();
        }
        uses_queued = with_shared(false, |s| s.header.dirty_len[slots::USES]).unwrap_or(0);
        // The writer's commits and WAL show in pg_stat_database and pg_stat_wal like any
        // backend's (reported at most once a second; the rest at exit).
        // SAFETY: outside any transaction, in a backend connected to its database.
        unsafe { pg_sys::pgstat_report_stat(false) };
        if !running {
            debug1!("pg_apikeys writer: database {db}: stopping (SIGTERM)");
            break;
        }
        if last_work.elapsed() > IDLE_EXIT {
            // The claim is given up only at exit (`unregister`), so that no second writer can
            // start while this one still writes: work arriving after the last flush makes the
            // callers ask the launcher for a new writer once this one is gone.
            // What is left is written now; anything arriving later goes to the next writer.
            flush(index, db, true, true);
            debug1!("pg_apikeys writer: database {db}: idle, leaving");
            break;
        }
    }
}
