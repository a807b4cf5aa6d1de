//! Use of keys without quota or rate limit (`request_count`, `last_used_at`). Verifying such a
//! key must not write its row: a row write is a transaction id, a WAL record and a commit for
//! every call, and it was most of what verification cost after planning (perf). So with
//! `shared_preload_libraries = 'pg_apikeys'`, uses of keys in the database
//! `apikeys.usage_database` are counted in shared memory and a background worker adds them to
//! the rows every second. Without preloading, in other databases, or when the shared table is
//! full, the verification writes the row itself (skipping it when another session holds it).
//! Counts in shared memory that the worker has not written yet are lost in a crash (at most a
//! second's worth); a clean shutdown writes them.

use crate::{errors, guc, plans};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Distinct keys the shared table holds between two flushes (1.4 MB). Generated ids take 26
/// bytes; a key with a longer id than ID_BYTES, or arriving when the table is full, is counted
/// by writing its row.
pub const SLOTS: usize = 16384;
const ID_BYTES: usize = 64;

#[derive(Clone, Copy)]
pub struct Slot {
    len: u8,
    id: [u8; ID_BYTES],
    count: u64,
    last_used_us: i64,
}

const EMPTY: Slot = Slot {
    len: 0,
    id: [0; ID_BYTES],
    count: 0,
    last_used_us: 0,
};

/// Pending uses by key id: open addressing with linear probing, emptied as a whole by `drain`
/// (so no slot is ever removed alone and probe chains stay intact).
#[derive(Clone, Copy)]
pub struct Table {
    slots: [Slot; SLOTS],
}

impl Table {
    /// Adds one use of `id` at `at_us`; false when the id does not fit or the table is full.
    pub fn record(&mut self, id: &str, at_us: i64) -> bool {
        let bytes = id.as_bytes();
        if bytes.is_empty() || bytes.len() > ID_BYTES {
            return false;
        }
        // FNV-1a
        let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
        });
        for probe in 0..SLOTS {
            let slot = &mut self.slots[(hash as usize).wrapping_add(probe) % SLOTS];
            if slot.len == 0 {
                slot.len = bytes.len() as u8;
                slot.id[..bytes.len()].copy_from_slice(bytes);
                slot.count = 1;
                slot.last_used_us = at_us;
                return true;
            }
            if &slot.id[..usize::from(slot.len)] == bytes {
                slot.count += 1;
                slot.last_used_us = slot.last_used_us.max(at_us);
                return true;
            }
        }
        false
    }

    /// Every pending use as (id, count, last use in epoch microseconds), emptying the table.
    pub fn drain(&mut self) -> Vec<(String, i64, i64)> {
        let mut pending = Vec::new();
        for slot in self.slots.iter_mut().filter(|s| s.len > 0) {
            let id = String::from_utf8_lossy(&slot.id[..usize::from(slot.len)]).into_owned();
            pending.push((id, slot.count as i64, slot.last_used_us));
            *slot = EMPTY;
        }
        pending
    }
}

// The table lives in shared memory, zeroed in place (all zeroes is an empty table): built as a
// value it would be 1.4 MB on the stack.
static mut TABLE: *mut Table = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
const NAME: &std::ffi::CStr = c"pg_apikeys usage";

/// Set in _PG_init when the library is preloaded; inherited by every backend.
static SHARED: AtomicBool = AtomicBool::new(false);

/// From _PG_init, only while shared_preload_libraries are loaded.
pub fn init() {
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    BackgroundWorkerBuilder::new("pg_apikeys usage writer")
        .set_type("pg_apikeys usage writer")
        .set_library("pg_apikeys")
        .set_function("pg_apikeys_usage_worker")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    SHARED.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(previous) = PREV_SHMEM_REQUEST {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Table>());
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(previous) = PREV_SHMEM_STARTUP {
            previous();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let table =
            pg_sys::ShmemInitStruct(NAME.as_ptr(), std::mem::size_of::<Table>(), &mut found);
        if !found {
            std::ptr::write_bytes(table.cast::<u8>(), 0, std::mem::size_of::<Table>());
        }
        TABLE = table.cast();
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Runs `f` on the shared table under its lock; None when there is no shared table.
fn with_table<R>(f: impl FnOnce(&mut Table) -> R) -> Option<R> {
    let (table, lock) = unsafe { (TABLE, LOCK) };
    if table.is_null() || lock.is_null() {
        return None;
    }
    unsafe {
        pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let result = f(&mut *table);
        pg_sys::LWLockRelease(lock);
        Some(result)
    }
}

thread_local! {
    /// Whether this backend's uses go to shared memory (decided once per backend).
    static COUNTED_IN_SHARED_MEMORY: Cell<Option<bool>> = const { Cell::new(None) };
}

fn counted_in_shared_memory() -> bool {
    COUNTED_IN_SHARED_MEMORY.with(|c| {
        if let Some(known) = c.get() {
            return known;
        }
        let counted = SHARED.load(Ordering::Relaxed)
            && guc::usage_database().is_some_and(|name| {
                let name = std::ffi::CString::new(name).unwrap_or_default();
                unsafe { pg_sys::get_database_oid(name.as_ptr(), true) == pg_sys::MyDatabaseId }
            });
        c.set(Some(counted));
        counted
    })
}

fn now_us() -> i64 {
    crate::verify::epoch_us(unsafe {
        TimestampWithTimeZone::try_from(pg_sys::GetCurrentTimestamp())
            .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
    })
}

/// Counts one VALID use of a key without quota or rate limit.
pub fn record(id: &str) {
    let recovering = unsafe { pg_sys::RecoveryInProgress() };
    if counted_in_shared_memory()
        && !recovering
        && with_table(|t| t.record(id, now_us())) == Some(true)
    {
        return;
    }
    if recovering || unsafe { pg_sys::XactReadOnly } {
        return;
    }
    // A row another transaction holds is skipped rather than waited for.
    crate::lookup::as_owner(|| {
        Spi::connect_mut(|client| {
            plans::update(
            client,
            "UPDATE apikeys.keys SET request_count = request_count + 1, last_used_at = clock_timestamp()
             WHERE id = (SELECT id FROM apikeys.keys WHERE id = $1 FOR UPDATE SKIP LOCKED)",
            None,
            &[id.into()],
        );
        })
    });
}

/// Adds the pending uses to their rows.
fn flush() {
    let pending = with_table(Table::drain).unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    let mut ids = Vec::with_capacity(pending.len());
    let mut counts = Vec::with_capacity(pending.len());
    let mut times = Vec::with_capacity(pending.len());
    for (id, count, at) in pending {
        ids.push(id);
        counts.push(count);
        times.push(at);
    }
    BackgroundWorker::transaction(move || {
        Spi::connect_mut(|client| {
            let installed = errors::internal(client.select(
                "SELECT to_regclass('apikeys.keys') IS NOT NULL",
                None,
                &[],
            ))
            .first()
            .get_one::<bool>();
            if errors::internal(installed) != Some(true) {
                return;
            }
            errors::internal(client.update(
                "UPDATE apikeys.keys k
                    SET request_count = k.request_count + u.n,
                        last_used_at = greatest(k.last_used_at,
                                                timestamptz 'epoch' + u.t * interval '1 microsecond')
                   FROM unnest($1::text[], $2::bigint[], $3::bigint[]) u(id, n, t)
                  WHERE k.id = u.id",
                None,
                &[ids.into(), counts.into(), times.into()],
            ));
        })
    });
}

/// The background worker: every second, and once more at shutdown, writes the pending uses.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_apikeys_usage_worker(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::usage_database().unwrap_or_else(|| "postgres".into());
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        flush();
    }
    flush();
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn uses_are_counted_per_key_and_drained_at_once() {
        let mut t: Box<Table> = unsafe { Box::new_zeroed().assume_init() };
        assert!(t.record("a", 5));
        assert!(t.record("b", 7));
        assert!(t.record("a", 3));
        assert!(!t.record("", 1));
        assert!(!t.record(&"x".repeat(ID_BYTES + 1), 1));
        let mut got = t.drain();
        got.sort();
        assert_eq!(got, vec![("a".into(), 2, 5), ("b".into(), 1, 7)]);
        assert!(t.drain().is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_counts_known_ones() {
        let mut t: Box<Table> = unsafe { Box::new_zeroed().assume_init() };
        for i in 0..SLOTS {
            assert!(t.record(&format!("k{i}"), 1));
        }
        assert!(!t.record("one-too-many", 1));
        assert!(t.record("k7", 2));
        let drained = t.drain();
        assert_eq!(drained.len(), SLOTS);
        assert_eq!(drained.iter().map(|d| d.1).sum::<i64>(), SLOTS as i64 + 1);
        assert!(t.record("one-too-many", 1));
    }
}
