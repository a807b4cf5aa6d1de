//! Use of keys without quota or rate limit (`request_count`, `last_used_at`). Verifying such a
//! key must not write its row: a row write is a transaction id, a WAL record and a commit for
//! every call, and it was most of what verification cost after planning (perf). So with
//! `shared_preload_libraries = 'pg_apikeys'`, uses of keys in the database
//! `apikeys.usage_database` are counted in shared memory and a background worker adds them to
//! the rows every second. Without preloading, in other databases, or when the shared table is
//! full, the verification writes the row itself (skipping it when another session holds it).
//! Counts in shared memory that the worker has not written yet are lost in a crash (at most a
//! second's worth); a clean shutdown writes them.

use crate::{guc, plans};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    SignalWakeFlags,
};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
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
    /// With the id, tells the key from a later one created under the same id after a delete.
    created_us: i64,
    count: u64,
    last_used_us: i64,
}

const EMPTY: Slot = Slot {
    len: 0,
    id: [0; ID_BYTES],
    created_us: 0,
    count: 0,
    last_used_us: 0,
};

/// A pending use: key id, the key's created_at, how many uses, the last (epoch microseconds).
pub type Pending = (String, i64, i64, i64);

/// Pending uses by key (id and creation time): open addressing with linear probing, emptied as a whole by `drain`
/// (so no slot is ever removed alone and probe chains stay intact).
#[derive(Clone, Copy)]
pub struct Table {
    slots: [Slot; SLOTS],
}

impl Table {
    /// Adds one use of the key (`id`, created at `created_us`) at `at_us`; false when the id
    /// does not fit or the table is full.
    pub fn record(&mut self, id: &str, created_us: i64, at_us: i64) -> bool {
        self.add(id, created_us, 1, at_us)
    }

    /// Adds `count` uses, the last at `at_us` (a flush that failed puts its uses back).
    pub fn add(&mut self, id: &str, created_us: i64, count: u64, at_us: i64) -> bool {
        let bytes = id.as_bytes();
        if bytes.is_empty() || bytes.len() > ID_BYTES {
            return false;
        }
        // FNV-1a
        let hash = bytes
            .iter()
            .chain(&created_us.to_le_bytes())
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
            });
        for probe in 0..SLOTS {
            let slot = &mut self.slots[(hash as usize).wrapping_add(probe) % SLOTS];
            if slot.len == 0 {
                slot.len = bytes.len() as u8;
                slot.id[..bytes.len()].copy_from_slice(bytes);
                slot.created_us = created_us;
                slot.count = count;
                slot.last_used_us = at_us;
                return true;
            }
            if &slot.id[..usize::from(slot.len)] == bytes && slot.created_us == created_us {
                slot.count += count;
                slot.last_used_us = slot.last_used_us.max(at_us);
                return true;
            }
        }
        false
    }

    /// Every pending use, emptying the table.
    pub fn drain(&mut self) -> Vec<Pending> {
        let mut pending = Vec::new();
        for slot in self.slots.iter_mut().filter(|s| s.len > 0) {
            let id = String::from_utf8_lossy(&slot.id[..usize::from(slot.len)]).into_owned();
            pending.push((id, slot.created_us, slot.count as i64, slot.last_used_us));
            *slot = EMPTY;
        }
        pending
    }
}

// The table lives in shared memory, zeroed in place (all zeroes is an empty table): built as a
// value it would be 1.4 MB on the stack. Both pointers are set once per process by
// shmem_startup (in the postmaster, inherited by every child) and never change after.
static mut TABLE: *mut Table = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
const NAME: &std::ffi::CStr = c"pg_apikeys usage";

/// Set in _PG_init when the library is preloaded; inherited by every backend.
static SHARED: AtomicBool = AtomicBool::new(false);

/// From _PG_init, only while shared_preload_libraries are loaded.
pub fn init() {
    // SAFETY: _PG_init runs in the postmaster before any other process exists, so nothing
    // reads the hook variables while they are chained.
    unsafe {
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    BackgroundWorkerBuilder::new("pg_apikeys usage launcher")
        .set_type("pg_apikeys usage launcher")
        .set_library("pg_apikeys")
        .set_function("pg_apikeys_usage_launcher")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    SHARED.store(true, Ordering::Relaxed);
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while shared memory may still be requested; the
    // previous hook was saved by init before ours was installed.
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
    // SAFETY: AddinShmemInitLock (MainLWLockArray[21]) serialises ShmemInitStruct against other
    // processes attaching; the struct is zeroed only by whoever created it (found = false).
    unsafe {
        if let Some(previous) = PREV_SHMEM_STARTUP {
            previous();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
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
    // SAFETY: the pointers are written once at shared-memory start-up, before this can run.
    let (table, lock) = unsafe { (TABLE, LOCK) };
    if table.is_null() || lock.is_null() {
        return None;
    }
    // SAFETY: the exclusive LWLock makes this process the table's only user until released;
    // `f` does not raise (plain memory work), so the lock cannot be left held by a longjmp,
    // and an error would release it anyway (LWLockReleaseAll at abort).
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
                // SAFETY: a syscache lookup in a transaction; missing_ok returns InvalidOid.
                unsafe { pg_sys::get_database_oid(name.as_ptr(), true) == pg_sys::MyDatabaseId }
            });
        c.set(Some(counted));
        counted
    })
}

/// Counts one VALID use of a key without quota or rate limit (the key `id` created at
/// `created_us`, epoch microseconds).
pub fn record(id: &str, created_us: i64) {
    // SAFETY: plain reads of backend-global flags.
    let (recovering, read_only, snapshot_per_transaction) = unsafe {
        (
            pg_sys::RecoveryInProgress(),
            pg_sys::XactReadOnly,
            pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32,
        )
    };
    let now_us = crate::verify::epoch_us(crate::verify::wall_clock());
    if counted_in_shared_memory()
        && !recovering
        && with_table(|t| t.record(id, created_us, now_us)) == Some(true)
    {
        return;
    }
    // The row write is skipped where it could fail the caller: REPEATABLE READ and SERIALIZABLE
    // would raise 40001 after any other session's use of the key since their snapshot, and a
    // key without limits must never make its caller retry. Such uses are not counted here.
    if recovering || read_only || snapshot_per_transaction {
        return;
    }
    // A row another transaction holds is skipped rather than waited for.
    crate::owner::as_owner(|| {
        Spi::connect_mut(|client| {
            plans::update(
                client,
                "UPDATE apikeys.keys SET request_count = request_count + 1, last_used_at = clock_timestamp()
                  WHERE id = (SELECT id FROM apikeys.keys WHERE id = $1 AND created_at = $2 FOR UPDATE SKIP LOCKED)",
                None,
                &[id.into(), crate::verify::from_epoch_us(created_us).into()],
            );
        })
    });
}

/// Adds the pending uses to their rows. The statement runs as the keys table's owner with
/// `search_path = pg_catalog, pg_temp` (`owner::as_owner`) and names every operator and
/// function with its schema: no object a database owner or other role can create is ever
/// chosen, whatever the database's or a role's search_path.
fn flush() {
    let pending = with_table(Table::drain).unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    // Should the statement fail, the uses go back to shared memory for the next writer (this
    // one exits with the error and the launcher starts another).
    let put_back = pending.clone();
    PgTryBuilder::new(move || write(pending))
        .catch_others(move |error| {
            with_table(|t| {
                for (id, created_us, count, at_us) in &put_back {
                    t.add(id, *created_us, (*count).max(0) as u64, *at_us);
                }
            });
            error.rethrow()
        })
        .execute();
}

fn write(pending: Vec<Pending>) {
    let mut ids = Vec::with_capacity(pending.len());
    let mut created = Vec::with_capacity(pending.len());
    let mut counts = Vec::with_capacity(pending.len());
    let mut times = Vec::with_capacity(pending.len());
    for (id, created_us, count, at_us) in pending {
        ids.push(id);
        created.push(crate::verify::from_epoch_us(created_us));
        counts.push(count);
        times.push(crate::verify::from_epoch_us(at_us));
    }
    BackgroundWorker::transaction(move || {
        if crate::catalog::extension().is_none() {
            return;
        }
        crate::owner::as_owner(|| {
            Spi::connect_mut(|client| {
                plans::update(
                    client,
                    "UPDATE apikeys.keys k
                        SET request_count = k.request_count OPERATOR(pg_catalog.+) u.n,
                            last_used_at = GREATEST(k.last_used_at, u.t)
                       FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),
                                       pg_catalog.unnest($2::pg_catalog.timestamptz[]),
                                       pg_catalog.unnest($3::pg_catalog.int8[]),
                                       pg_catalog.unnest($4::pg_catalog.timestamptz[])) u(id, c, n, t)
                      WHERE k.id OPERATOR(pg_catalog.=) u.id
                        AND k.created_at OPERATOR(pg_catalog.=) u.c",
                    None,
                    &[ids.into(), created.into(), counts.into(), times.into()],
                );
            })
        })
    });
}

/// Settings a database's or role's `ALTER … SET` gives every session, the workers' too, that
/// would stop them: read-only transactions, another role, timeouts, a serializable isolation
/// that can fail a flush, a search_path. Pinned for the session right after connecting.
const PINNED: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
    (c"role", c"none"),
    (c"default_transaction_read_only", c"off"),
    (c"default_transaction_isolation", c"read committed"),
    (c"statement_timeout", c"0"),
    (c"lock_timeout", c"0"),
    (c"idle_in_transaction_session_timeout", c"0"),
    (c"search_path", c"pg_catalog, pg_temp"),
    (c"exit_on_error", c"off"),
    (c"transform_null_equals", c"off"),
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
        // A worker connected without naming a role (the launcher; the writer when the owner
        // cannot log in) would take a database's `session_authorization` too: back to the role
        // it connected as, before `role` is reset on top of it.
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

/// The role the writer connects as: the extension's owner, when it may log in (PostgreSQL 15
/// lets a background worker connect only as such a role); None when the extension is not
/// installed in this database. Every name is schema-qualified: this runs as the bootstrap
/// superuser under the database's search_path.
fn writer_role() -> Option<pg_sys::Oid> {
    Spi::connect(|client| {
        let table = client
            .select(
                "SELECT CASE WHEN a.rolcanlogin THEN e.extowner ELSE 0::pg_catalog.oid END
                   FROM pg_catalog.pg_extension e
                   JOIN pg_catalog.pg_authid a ON a.oid OPERATOR(pg_catalog.=) e.extowner
                  WHERE e.extname OPERATOR(pg_catalog.=) 'pg_apikeys'::pg_catalog.name",
                Some(1),
                &[],
            )
            .ok()?;
        table.first().get_one::<pg_sys::Oid>().ok().flatten()
    })
}

/// The launcher: connected to `apikeys.usage_database` only to learn the extension's owner,
/// it starts the writer connected as that role (not as the bootstrap superuser) and starts it
/// again within a second whenever it stops (pg_terminate_backend, an error). It exits with code
/// 1 whatever stops it, so the postmaster starts it again 5 seconds later (DROP DATABASE … WITH
/// (FORCE) of its database included), except when the server is shutting down.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_apikeys_usage_launcher(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = guc::usage_database().unwrap_or_else(|| "postgres".into());
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    pin_session_settings();
    log!("pg_apikeys usage launcher started in database \"{database}\"");
    'launch: loop {
        let Some(owner) = BackgroundWorker::transaction(writer_role) else {
            // Not installed here (yet): look again in a while.
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(10))) {
                break;
            }
            continue;
        };
        if owner == pg_sys::InvalidOid {
            warning!("pg_apikeys usage writer: the extension's owner cannot log in; the writer connects as the bootstrap superuser and runs its statements as the owner");
        }
        // SAFETY: plain reads of this process's globals, set once it connected.
        let (database_id, me) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
        let argument = (u64::from(u32::from(database_id)) << 32) | u64::from(u32::from(owner));
        let writer = BackgroundWorkerBuilder::new("pg_apikeys usage writer")
            .set_type("pg_apikeys usage writer")
            .set_library("pg_apikeys")
            .set_function("pg_apikeys_usage_worker")
            .enable_spi_access()
            .set_restart_time(None)
            .set_argument(Some(pg_sys::Datum::from(argument)))
            .set_notify_pid(me)
            .load_dynamic();
        match writer {
            Ok(writer) => loop {
                if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                    let _ = writer.terminate().wait_for_shutdown();
                    break 'launch;
                }
                if matches!(writer.pid(), Err(BackgroundWorkerStatus::Stopped)) {
                    break;
                }
            },
            Err(_) => warning!(
                "pg_apikeys usage launcher: could not start the usage writer (max_worker_processes?)"
            ),
        }
        if !BackgroundWorker::wait_latch(Some(Duration::from_millis(500))) {
            break;
        }
    }
    log!(
        "pg_apikeys usage launcher stopping (restarted in 5 s unless the server is shutting down)"
    );
    // SAFETY: the launcher's last act; proc_exit runs the exit callbacks and does not return.
    unsafe { pg_sys::proc_exit(1) }
}

/// The writer: every second, and once more when it is stopped, writes the pending uses. Started
/// by the launcher with the database and the role to connect as (the extension's owner) packed
/// in its argument; the launcher starts a new one when it stops.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_apikeys_usage_worker(argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let packed = argument.value() as u64;
    let database = pg_sys::Oid::from((packed >> 32) as u32);
    let owner = pg_sys::Oid::from(packed as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(
        Some(database),
        (owner != pg_sys::InvalidOid).then_some(owner),
    );
    pin_session_settings();
    log!("pg_apikeys usage writer started");
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        flush();
    }
    flush();
    log!("pg_apikeys usage writer stopping");
}

#[cfg(test)]
mod unit {
    use super::*;

    fn empty() -> Box<Table> {
        // SAFETY: Table is integers and byte arrays; all zeroes is an empty table.
        unsafe { Box::new_zeroed().assume_init() }
    }

    #[test]
    fn uses_are_counted_per_key_and_drained_at_once() {
        let mut t = empty();
        assert!(t.record("a", 100, 5));
        assert!(t.record("b", 100, 7));
        assert!(t.record("a", 100, 3));
        assert!(!t.record("", 100, 1));
        assert!(!t.record(&"x".repeat(ID_BYTES + 1), 100, 1));
        let mut got = t.drain();
        got.sort();
        assert_eq!(got, vec![("a".into(), 100, 2, 5), ("b".into(), 100, 1, 7)]);
        assert!(t.drain().is_empty());
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_counts_known_ones() {
        let mut t = empty();
        for i in 0..SLOTS {
            assert!(t.record(&format!("k{i}"), 0, 1));
        }
        assert!(!t.record("one-too-many", 0, 1));
        assert!(t.record("k7", 0, 2));
        let drained = t.drain();
        assert_eq!(drained.len(), SLOTS);
        assert_eq!(drained.iter().map(|d| d.2).sum::<i64>(), SLOTS as i64 + 1);
        assert!(t.record("one-too-many", 0, 1));
    }

    #[test]
    fn a_key_recreated_under_the_same_id_is_counted_apart() {
        let mut t = empty();
        assert!(t.record("k", 100, 5));
        assert!(t.record("k", 200, 6));
        assert!(t.record("k", 200, 7));
        let mut got = t.drain();
        got.sort();
        assert_eq!(got, vec![("k".into(), 100, 1, 5), ("k".into(), 200, 2, 7)]);
    }
}
