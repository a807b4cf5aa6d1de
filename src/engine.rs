//! The metering engine: usage counts, quotas and rate-limit windows of every database's keys in
//! shared memory (with `shared_preload_libraries = 'pg_apikeys'`), persisted by one writer per
//! database (`writer`). A verification never writes a row, never takes a row lock and never
//! needs a transaction id, so it works the same in READ ONLY transactions, and a caller's
//! rollback cannot give back what a VALID answer spent.
//!
//! - Uses of any key are counts in its entry; the writer adds them to `apikeys.meters` every
//!   five seconds (sooner when the table fills up). A crash loses at most those seconds.
//! - Rate-limit windows are counters in the entry, exact per server under any concurrency
//!   (one lock); the writer persists a changed window within a second. A crash may restart a
//!   window.
//! - A quota spend (and a refill) makes the entry dirty at a per-database sequence number; the
//!   verification returns only once the writer has committed a batch up to that number. Many
//!   callers' spends share one commit (group commit), so a hot quota key is not bound to one WAL
//!   flush per call, and a spend answered VALID survives a crash.
//!
//! Entries are loaded from `apikeys.keys` and `apikeys.meters` on first use (and again when a
//! management change bumps `keys.meter_version`). Entries whose counters are written may be
//! evicted when the table is three-quarters full; a load that raced with an eviction reads
//! again (`evictions`), so nothing is loaded from a row older than the entry it replaces.

use crate::metering::{self, Charge, Counters};
use crate::slots::{self, Entry, KeyRef};
use crate::verify::Config;
use crate::{errors, guc};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Databases that can use the engine at once (each has a writer while it has work).
pub const DATABASES: usize = 64;

/// One database's persistence state.
#[repr(C)]
pub struct Database {
    pub oid: u32,
    /// The role its writer connects as (the extension's owner, when it may log in).
    pub owner: u32,
    pub writer_pid: i32,
    pub writer_procno: i32,
    /// Work is waiting for a writer; when the launcher last started one.
    pub wanted: bool,
    pub started_us: i64,
    /// Starts that ended before the writer ran: after three the database is given up on.
    pub failed_starts: u32,
    /// The writer's latch is set and it has not collected since: no need to set it again.
    pub flush_requested: bool,
    /// Sequence numbers of counter changes: the next one, and all up to `durable` are committed.
    pub next_seq: u64,
    pub durable: u64,
    /// Signalled when `durable` moves.
    pub flushed: pg_sys::ConditionVariable,
}

#[repr(C)]
pub struct Header {
    pub launcher_pid: i32,
    pub launcher_procno: i32,
    pub used: usize,
    pub capacity: usize,
    /// Bumped by every eviction of a counted entry (see the module comment).
    pub evictions: u64,
    /// Entries in the two dirty lists (`slots::Dirty`: counters, uses).
    pub dirty_len: [usize; 2],
    pub databases: [Database; DATABASES],
}

// Set once per process by shmem_startup (in the postmaster, inherited by every child).
static mut HEADER: *mut Header = std::ptr::null_mut();
static mut SLOTS: *mut Entry = std::ptr::null_mut();
static mut DIRTY: *mut u32 = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
#[cfg(not(feature = "pg14"))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
const NAME: &std::ffi::CStr = c"pg_apikeys metering";
/// Set in _PG_init when the library is preloaded; inherited by every backend.
static PRELOADED: AtomicBool = AtomicBool::new(false);
/// How long a verification waits for its spend to be written before it gives up (and gives
/// the spend back).
const DURABLE_WAIT: Duration = Duration::from_secs(30);

fn shared_size(capacity: usize) -> usize {
    std::mem::size_of::<Header>()
        + capacity * (std::mem::size_of::<Entry>() + 2 * std::mem::size_of::<u32>())
}

/// From _PG_init, only while shared_preload_libraries are loaded.
pub fn init() {
    // SAFETY: _PG_init runs in the postmaster before any other process exists, so nothing
    // reads the hook variables while they are chained.
    unsafe {
        #[cfg(not(feature = "pg14"))]
        {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
        }
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
    // PostgreSQL 14 has no shmem_request_hook: shared memory is requested from _PG_init itself.
    #[cfg(feature = "pg14")]
    request_shared_memory();
    crate::writer::register_launcher();
    PRELOADED.store(true, Ordering::Relaxed);
}

#[cfg(not(feature = "pg14"))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while shared memory may still be requested; the
    // previous hook was saved by init before ours was installed.
    unsafe {
        if let Some(previous) = PREV_SHMEM_REQUEST {
            previous();
        }
    }
    request_shared_memory();
}

/// Asks for the table and its lock; only while shared memory may still be requested (the
/// request hook, or _PG_init of a preloaded library on PostgreSQL 14).
fn request_shared_memory() {
    // SAFETY: called only in the postmaster at the point above, before shared memory is sized.
    unsafe {
        pg_sys::RequestAddinShmemSpace(shared_size(guc::shared_keys()));
        pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
        pg_sys::RequestAddinShmemSpace(crate::analytics::shared_size());
    }
    crate::analytics::request_lock();
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: AddinShmemInitLock (MainLWLockArray[21]) serialises ShmemInitStruct against other
    // processes attaching; the memory is initialised only by whoever created it (found = false).
    unsafe {
        if let Some(previous) = PREV_SHMEM_STARTUP {
            previous();
        }
        let capacity = guc::shared_keys();
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let base = pg_sys::ShmemInitStruct(NAME.as_ptr(), shared_size(capacity), &mut found);
        let header = base.cast::<Header>();
        let slots = base
            .cast::<u8>()
            .add(std::mem::size_of::<Header>())
            .cast::<Entry>();
        if !found {
            std::ptr::write_bytes(base.cast::<u8>(), 0, std::mem::size_of::<Header>());
            (*header).capacity = capacity;
            for i in 0..DATABASES {
                pg_sys::ConditionVariableInit(&raw mut (*header).databases[i].flushed);
            }
            for i in 0..capacity {
                slots.add(i).write(slots::FREE);
            }
        }
        HEADER = header;
        SLOTS = slots;
        DIRTY = slots.add(capacity).cast::<u32>();
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
        crate::analytics::attach();
        pg_sys::LWLockRelease(init_lock);
    }
}

/// The shared state while this process holds the lock.
pub struct Shared<'a> {
    pub header: &'a mut Header,
    pub slots: &'a mut [Entry],
    /// The two dirty lists, `capacity` slot numbers each, one after the other.
    pub dirty_lists: &'a mut [u32],
}

impl Shared<'_> {
    pub fn database(&mut self, index: usize) -> &mut Database {
        &mut self.header.databases[index]
    }

    /// Wakes the writer of database `index` (once until it collects), or asks the launcher for
    /// one.
    pub fn wake_writer(&mut self, index: usize) {
        let db = &mut self.header.databases[index];
        if db.writer_pid != 0 {
            if !db.flush_requested {
                db.flush_requested = true;
                set_latch(db.writer_procno);
            }
        } else if !db.wanted {
            db.wanted = true;
            set_latch(self.header.launcher_procno);
        }
    }

    /// The slot of `key`, made when new; None when the table is full.
    pub fn insert(&mut self, key: &KeyRef<'_>) -> Option<usize> {
        slots::find_or_insert(self.slots, &mut self.header.used, key)
    }

    fn lists(&mut self) -> [slots::Dirty<'_>; 2] {
        let (counters, uses) = self.dirty_lists.split_at_mut(self.header.capacity);
        let [counters_len, uses_len] = &mut self.header.dirty_len;
        [
            slots::Dirty {
                list: counters,
                len: counters_len,
                which: slots::COUNTERS,
            },
            slots::Dirty {
                list: uses,
                len: uses_len,
                which: slots::USES,
            },
        ]
    }

    /// Queues slot `i` for the writer on list `which` (`slots::COUNTERS`, `slots::USES`).
    pub fn mark(&mut self, i: usize, which: usize) {
        let slots = std::mem::take(&mut self.slots);
        self.lists()[which].mark(slots, i);
        self.slots = slots;
    }

    /// Takes slot `i` off list `which`.
    pub fn unmark(&mut self, i: usize, which: usize) {
        let slots = std::mem::take(&mut self.slots);
        self.lists()[which].unmark(slots, i);
        self.slots = slots;
    }

    /// The `k`th slot queued on list `which`.
    pub fn queued(&self, which: usize, k: usize) -> Option<usize> {
        (k < self.header.dirty_len[which])
            .then(|| self.dirty_lists[which * self.header.capacity + k] as usize)
    }

    /// Adds `count` uses of slot `i`'s key, the last at `at_us`, for the writer's next write.
    pub fn add_uses(&mut self, i: usize, count: u64, at_us: i64) {
        let e = &mut self.slots[i];
        e.uses += count;
        e.last_used_us = e.last_used_us.max(at_us);
        self.mark(i, slots::USES);
    }

    /// Records that slot `i`'s counters changed (database `index`): they are dirty from the
    /// returned sequence number on, and queued for the writer.
    pub fn counters_changed(&mut self, index: usize, i: usize) -> u64 {
        let database = &mut self.header.databases[index];
        database.next_seq += 1;
        let seq = database.next_seq;
        self.slots[i].dirty_seq = seq;
        self.mark(i, slots::COUNTERS);
        seq
    }

    /// Frees slot `i`.
    pub fn remove(&mut self, i: usize) {
        let slots = std::mem::take(&mut self.slots);
        let mut used = self.header.used;
        slots::remove(slots, &mut used, &mut self.lists(), i);
        self.header.used = used;
        self.slots = slots;
    }
}

impl Database {
    /// Frees the slot of a database that is gone (its condition variable stays as it is:
    /// backends may be waiting on it under its own spinlock).
    pub fn forget(&mut self) {
        self.oid = 0;
        self.owner = 0;
        self.writer_pid = 0;
        self.writer_procno = -1;
        self.wanted = false;
        self.started_us = 0;
        self.failed_starts = 0;
        self.flush_requested = false;
        self.next_seq = 0;
        self.durable = 0;
    }
}

/// Whether the engine's shared memory exists in this server.
pub fn available() -> bool {
    // SAFETY: the pointers are written once at shared-memory start-up, before this can run.
    let (header, lock) = unsafe { (HEADER, LOCK) };
    PRELOADED.load(Ordering::Relaxed) && !header.is_null() && !lock.is_null()
}

/// Runs `f` on the shared state under its lock (exclusive or shared); None without one.
pub fn with_shared<R>(exclusive: bool, f: impl FnOnce(&mut Shared<'_>) -> R) -> Option<R> {
    if !available() {
        return None;
    }
    let mode = if exclusive {
        pg_sys::LWLockMode::LW_EXCLUSIVE
    } else {
        pg_sys::LWLockMode::LW_SHARED
    };
    // The lock makes this process the table's only writer (or one of several readers, who only
    // read) until it is released; `f` is plain memory work that does not raise, so the lock
    // cannot be left held by a longjmp (and an error would release it: LWLockReleaseAll).
    // SAFETY: pointers set at start-up, valid for the server's life, used under LOCK only.
    unsafe {
        pg_sys::LWLockAcquire(LOCK, mode);
        let header = &mut *HEADER;
        let slots = std::slice::from_raw_parts_mut(SLOTS, header.capacity);
        let dirty_lists = std::slice::from_raw_parts_mut(DIRTY, 2 * header.capacity);
        let result = f(&mut Shared {
            header,
            slots,
            dirty_lists,
        });
        pg_sys::LWLockRelease(LOCK);
        Some(result)
    }
}

/// Sets the latch of the process with this PGPROC number (a stale number wakes some other
/// process once, which is harmless).
pub fn set_latch(procno: i32) {
    // SAFETY: ProcGlobal's array has MaxBackends + auxiliary entries for the server's life;
    // the index is checked against its size.
    unsafe {
        let global = pg_sys::ProcGlobal;
        if procno < 0 || global.is_null() || procno as u32 >= (*global).allProcCount {
            return;
        }
        pg_sys::SetLatch(&raw mut (*(*global).allProcs.add(procno as usize)).procLatch);
    }
}

/// This process's PGPROC number.
pub fn my_procno() -> i32 {
    // SAFETY: MyProc points into ProcGlobal's array in every connected process.
    unsafe { pg_sys::MyProc.offset_from((*pg_sys::ProcGlobal).allProcs) as i32 }
}

pub(crate) fn my_database() -> u32 {
    // SAFETY: a plain read of a backend global.
    u32::from(unsafe { pg_sys::MyDatabaseId })
}

thread_local! {
    /// This database's index in `Header::databases`, once found (None: not looked up yet).
    static DATABASE: Cell<Option<usize>> = const { Cell::new(None) };
    /// Uses that found the shared table full, added to it at a later call or when the backend
    /// exits (bounded: beyond MAX_OVERFLOW keys they are dropped, with a WARNING).
    static OVERFLOW: RefCell<HashMap<(String, i64), (u64, i64)>> = RefCell::new(HashMap::new());
    static WARNED: Cell<bool> = const { Cell::new(false) };
}
const MAX_OVERFLOW: usize = 100_000;

/// The role this database's writer connects as: the extension's owner when it may log in,
/// else 0 (the writer connects as the bootstrap superuser and runs its statements as the owner).
pub fn writer_role() -> u32 {
    let Some((_, owner)) = crate::catalog::extension() else {
        return 0;
    };
    // SAFETY: a syscache lookup by OID in a transaction; the tuple is released before return.
    let can_login = unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            pg_sys::Datum::from(owner),
        );
        if tuple.is_null() {
            false
        } else {
            let form = pg_sys::GETSTRUCT(tuple).cast::<pg_sys::FormData_pg_authid>();
            let login = (*form).rolcanlogin;
            pg_sys::ReleaseSysCache(tuple);
            login
        }
    };
    if can_login {
        u32::from(owner)
    } else {
        0
    }
}

/// This database's slot in the shared state, claimed on first use; None when every slot is
/// taken by other databases.
fn database_index() -> Option<usize> {
    if let Some(known) = DATABASE.with(Cell::get) {
        return Some(known);
    }
    let me = my_database();
    let owner = writer_role();
    let index = with_shared(true, |s| {
        let dbs = &mut s.header.databases;
        if let Some(i) = dbs.iter().position(|d| d.oid == me) {
            return Some(i);
        }
        let free = dbs.iter().position(|d| d.oid == 0)?;
        let db = &mut dbs[free];
        db.oid = me;
        db.owner = owner;
        db.failed_starts = 0;
        Some(free)
    })
    .flatten();
    if index.is_none() {
        warn_once(&format!("pg_apikeys: more than {DATABASES} databases use the metering engine; in this one, uses of keys are not counted and keys with limits are metered by row locks"));
    }
    DATABASE.with(|d| d.set(index));
    index
}

fn warn_once(message: &str) {
    if !WARNED.with(|w| w.replace(true)) {
        warning!("{message}");
    }
}

/// This database's slot in the shared state (claimed on first use), which gives it a writer;
/// None when every slot is taken.
pub fn writer_slot() -> Option<usize> {
    database_index()
}

/// Whether database slot `index` has a writer now, read without the lock: a hint (a writer that
/// leaves right after finds the tallies left behind and asks for the next one, `unregister`).
pub fn writer_running(index: usize) -> bool {
    if !available() || index >= DATABASES {
        return false;
    }
    // SAFETY: HEADER is set at start-up and valid for the server's life; an aligned i32 read
    // (volatile: a concurrent write gives the old or the new value) of a slot that exists.
    unsafe { std::ptr::read_volatile(&raw const (*HEADER).databases[index].writer_pid) != 0 }
}

/// Asks for a writer for this database's verification tallies: one is started when none runs,
/// and a running one is woken when `early` (the tallies' table is filling up).
pub fn wake_writer_for_tallies(early: bool) {
    let Some(index) = database_index() else {
        return;
    };
    with_shared(true, |s| {
        if early || s.header.databases[index].writer_pid == 0 {
            s.wake_writer(index);
        }
    });
}

/// Says once per backend that the engine is missing, and why that matters.
pub fn warn_not_preloaded() {
    warn_once("pg_apikeys is not in shared_preload_libraries: uses of keys are not counted, and keys with a quota or rate limit are metered with row locks in the caller's transaction (not in READ ONLY transactions, undone by a rollback)");
}

/// Counts one VALID use of a key (`id` created at `created_us`) at `now_us`. Never waits for
/// another session and never writes: a full table keeps the use in this backend until there is
/// room (and wakes the writer to make some). With `analytics_cost`, the verification is also
/// counted for analytics in the key's entry (`Entry::valid_count`), spending that cost; true
/// when it was (the caller then leaves the tallies table alone).
pub fn record_use(id: &str, created_us: i64, now_us: i64, analytics_cost: Option<i64>) -> bool {
    let Some(index) = database_index() else {
        return false;
    };
    let minute = now_us.div_euclid(60_000_000);
    // A tally of an earlier minute the entry still held: it goes to the tallies table, outside
    // the engine's lock.
    let mut earlier = None;
    let db = my_database();
    let overflowing = OVERFLOW.with(|o| !o.borrow().is_empty());
    let stored = with_shared(true, |s| {
        if s.header.databases[index].oid != db {
            return None;
        }
        // Early when the table fills up; otherwise uses are written every few seconds.
        let wake = s.header.used * 4 > s.header.capacity * 3 || s.database(index).writer_pid == 0;
        let key = KeyRef { db, id, created_us };
        let stored = match s.insert(&key) {
            Some(i) => {
                let e = &mut s.slots[i];
                e.last_access_us = now_us;
                if let Some(cost) = analytics_cost {
                    if e.valid_count > 0 && e.valid_minute != minute {
                        earlier = Some((e.valid_minute, e.valid_count, e.valid_cost));
                        e.valid_count = 0;
                        e.valid_cost = 0;
                    }
                    e.valid_minute = minute;
                    e.valid_count = e.valid_count.saturating_add(1);
                    e.valid_cost = e.valid_cost.saturating_add(cost);
                }
                s.add_uses(i, 1, now_us);
                true
            }
            None => false,
        };
        if overflowing {
            drain_overflow(s, db);
        }
        if wake || !stored {
            s.wake_writer(index);
        }
        Some(stored)
    });
    if let Some((minute, count, cost)) = earlier {
        crate::analytics::add_valid(id, created_us, minute, count, cost);
    }
    match stored {
        Some(Some(true)) => analytics_cost.is_some(),
        None => false,
        Some(Some(false)) => {
            keep_for_later(id, created_us, 1, now_us);
            false
        }
        // The launcher gave this database's slot up (its writer could not connect): claim one
        // again next time.
        Some(None) => {
            DATABASE.with(|d| d.set(None));
            false
        }
    }
}

fn keep_for_later(id: &str, created_us: i64, uses: u64, at_us: i64) {
    OVERFLOW.with(|o| {
        let mut o = o.borrow_mut();
        if o.is_empty() {
            once_at_exit(&EXIT_DRAIN, drain_at_exit);
        }
        let key = (id.to_owned(), created_us);
        if o.len() >= MAX_OVERFLOW && !o.contains_key(&key) {
            warn_once("pg_apikeys: the metering table and this backend's overflow are full; some uses are not counted (raise apikeys.shared_keys)");
            return;
        }
        let slot = o.entry(key).or_insert((0, at_us));
        slot.0 += uses;
        slot.1 = slot.1.max(at_us);
    });
}

/// Moves this backend's overflow into the shared table while there is room.
fn drain_overflow(s: &mut Shared<'_>, db: u32) {
    OVERFLOW.with(|o| {
        let mut o = o.borrow_mut();
        o.retain(|(id, created_us), (uses, at_us)| {
            let key = KeyRef {
                db,
                id,
                created_us: *created_us,
            };
            match s.insert(&key) {
                Some(i) => {
                    s.add_uses(i, *uses, *at_us);
                    false
                }
                None => true,
            }
        });
    });
}

thread_local! {
    /// Whether `drain_at_exit` is registered in this backend.
    static EXIT_DRAIN: Cell<bool> = const { Cell::new(false) };
}

/// Registers `callback` to run at this backend's exit, while shared memory is still attached,
/// once: `registered` remembers that it was.
pub(crate) fn once_at_exit(
    registered: &'static std::thread::LocalKey<Cell<bool>>,
    callback: unsafe extern "C-unwind" fn(i32, pg_sys::Datum),
) {
    if registered.with(|r| r.replace(true)) {
        return;
    }
    // SAFETY: registers a plain function PostgreSQL calls once at backend exit, while shared
    // memory is still attached.
    unsafe { pg_sys::before_shmem_exit(Some(callback), pg_sys::Datum::from(0)) }
}

#[pg_guard]
unsafe extern "C-unwind" fn drain_at_exit(_code: i32, _arg: pg_sys::Datum) {
    let db = my_database();
    with_shared(true, |s| drain_overflow(s, db));
}

/// A key's counters as stored (`apikeys.keys` and, when current, `apikeys.meters`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Stored {
    pub version: i64,
    /// The meter_versions at which management last set the quota left and the refill clock: an
    /// entry counted since (at a version not older) keeps its own.
    pub remaining_version: i64,
    pub refill_version: i64,
    pub counters: Counters,
    pub last_refill_us: Option<i64>,
    pub next_refill_us: Option<i64>,
    /// `apikeys.keys.credits`, which `counters.remaining` includes.
    pub credits: i64,
}

/// A rate-limit window kept in shared memory only (a named limit of a key, or a standalone
/// limit): its entry, its limit and what this call takes from it. A server restart reopens it.
#[derive(Clone, Debug)]
pub struct Window {
    /// `window_id` of what it limits.
    pub id: String,
    pub created_us: i64,
    pub rate: metering::Rate,
    pub cost: i64,
}

/// The id of the window entry of `parts` (e.g. key id and limit name): byte 1 (no key id has it)
/// and the SHA-256 of the parts, so that any name fits the table's 128-byte ids.
pub fn window_id(kind: u8, parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update([kind]);
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    // Hex by hand: format! per byte was a tenth of a verification with two named limits (perf).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(65);
    id.push(char::from(slots::WINDOW_TAG));
    for b in digest {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 15)]));
    }
    id
}

/// The entry id of identity `id`'s quota: byte 2 (no key id has it) and the id.
pub fn identity_entry(id: i64) -> String {
    format!("{}{id}", char::from(slots::IDENTITY_TAG))
}

/// The identity id of an identity entry's id, None for any other entry.
pub fn identity_of_entry(entry: &str) -> Option<i64> {
    entry
        .strip_prefix(char::from(slots::IDENTITY_TAG))
        .and_then(|id| id.parse().ok())
}

/// A window after a call: what is left of it, when its bucket (or fixed window) ends, and
/// whether it refused the call.
#[derive(Clone, Copy, Debug)]
pub struct WindowState {
    pub remaining: i64,
    pub reset_us: Option<i64>,
    pub exceeded: bool,
}

/// Takes `w.cost` from window `w` at `now_us` if it allows that (else nothing): a standalone
/// rate limit, no key involved.
pub fn ratelimit(w: &Window, now_us: i64) -> Result<WindowState, Unavailable> {
    let mut room_deadline = None;
    loop {
        let index = database_index().ok_or(Unavailable::NoEngine)?;
        let db = my_database();
        let step = with_shared(true, |s| {
            if s.header.databases[index].oid != db {
                return Err(false);
            }
            let at = window_slots(s, db, std::slice::from_ref(w)).ok_or(true)?;
            let (states, _) = judge_windows(s, std::slice::from_ref(w), &at, now_us, true);
            Ok(states[0])
        })
        .ok_or(Unavailable::NoEngine)?;
        match step {
            Ok(state) => return Ok(state),
            // The table is full of entries not written yet: the writer makes room.
            Err(true) => wait_for_room(index, &mut room_deadline),
            // The launcher gave this database's slot up: claim one again.
            Err(false) => DATABASE.with(|d| d.set(None)),
        }
    }
}

/// Finds (or makes) the entries of `windows`; None when the table has no room for one.
fn window_slots(s: &mut Shared<'_>, db: u32, windows: &[Window]) -> Option<Vec<usize>> {
    windows
        .iter()
        .map(|w| {
            let i = s.insert(&KeyRef {
                db,
                id: &w.id,
                created_us: w.created_us,
            })?;
            // A new entry counts nothing yet: evictable until a call takes from it.
            if s.slots[i].window_needed_until() == i64::MAX {
                s.slots[i].set_window_needed_until(0);
            }
            Some(i)
        })
        .collect()
}

/// Judges `windows` (entries `at`) at `now_us`, charging them when `take`; returns their states
/// and whether every one allows the call.
fn judge_windows(
    s: &mut Shared<'_>,
    windows: &[Window],
    at: &[usize],
    now_us: i64,
    take: bool,
) -> (Vec<WindowState>, bool) {
    let mut states = Vec::with_capacity(windows.len());
    let mut all = true;
    for (w, &i) in windows.iter().zip(at) {
        let e = &mut s.slots[i];
        let limits = metering::Limits {
            rate: Some(w.rate),
            ..metering::Limits::default()
        };
        let charge = metering::charge(&e.counters(), &limits, now_us, w.cost, take);
        let exceeded = charge.verdict != metering::Verdict::Allowed;
        all &= !exceeded;
        if take {
            e.set_counters(&charge.after);
            e.last_access_us = now_us;
        }
        // Counts matter until the window (for a sliding one, the bucket after it, which still
        // weighs it) is over, whichever duration the calls gave.
        let needed = e.counters().window_start_us.map_or(0, |start| {
            start.saturating_add(w.rate.window_us.saturating_mul(2))
        });
        e.set_window_needed_until(e.window_needed_until().max(needed));
        states.push(WindowState {
            remaining: charge.rate_remaining.unwrap_or(0),
            reset_us: charge.reset_us,
            exceeded,
        });
    }
    (states, all)
}

/// Why the engine cannot meter this call.
pub enum Unavailable {
    /// No engine: the caller falls back to row locks.
    NoEngine,
    /// A counted set other than the key's is gone: its row was deleted since the caller read it
    /// (an identity deleted meanwhile). The caller meters without it.
    Gone,
}

/// `timestamptz + interval`, PostgreSQL's own arithmetic (months and days in the session's
/// time zone), in epoch µs.
pub fn add_interval(at_us: i64, interval: pgrx::datum::Interval) -> i64 {
    let at = crate::verify::from_epoch_us(at_us);
    // SAFETY: timestamptz_pl_interval takes a timestamptz and an interval (by reference, valid
    // for the call) and returns a timestamptz, or raises on overflow.
    let sum: Option<TimestampWithTimeZone> = unsafe {
        pgrx::direct_function_call(
            pg_sys::timestamptz_pl_interval,
            &[at.into_datum(), interval.into_datum()],
        )
    };
    let sum = sum.unwrap_or_else(TimestampWithTimeZone::positive_infinity);
    crate::verify::epoch_us(sum)
}

/// One set of counters a call charges: a key's, or its identity's (SPEC §7: a tenant's keys
/// share its quota). `load` reads them from their rows (on first use, or at a new meter_version).
pub struct Counted<'a> {
    pub id: &'a str,
    pub created_us: i64,
    pub version: i64,
    pub config: &'a Config,
    pub cost: i64,
    /// What the call takes from the counters' own window, when not `cost`.
    pub rate_cost: Option<i64>,
    pub load: &'a dyn Fn() -> Option<Stored>,
}

/// One metered call: the counters it charges (the key's first), when, whether the key grants
/// what the call requires, and the windows of named limits it also applies. All of them allow
/// the call, or nothing is taken from any.
pub struct Call<'a> {
    pub counted: &'a [Counted<'a>],
    pub now_us: i64,
    pub permitted: bool,
    pub windows: &'a [Window],
}

/// What a metered call decided.
pub struct Metered {
    /// Per counted set, in the order given: what it decided alone, and what the call left.
    pub charges: Vec<Charge>,
    /// The call's windows, in the order given.
    pub windows: Vec<WindowState>,
    /// Whether every counter and window allowed the call (it took its cost from each when
    /// `permitted` too).
    pub allowed: bool,
    /// Per counted set: when its quota refills next.
    pub next_refill_us: Vec<Option<i64>>,
}

/// Charges a call in shared memory: loads counters on first use (`Counted::load`, which reads
/// the rows), applies refills, quotas and windows, and for a quota spend waits until the writer
/// has committed it.
pub fn meter(call: &Call<'_>) -> Result<Option<Metered>, Unavailable> {
    let Call {
        counted,
        now_us,
        permitted,
        windows,
    } = *call;
    let Some(mut index) = database_index() else {
        return Err(Unavailable::NoEngine);
    };
    let db = my_database();
    if counted.iter().any(|c| c.id.len() > slots::ID_BYTES) {
        return Err(Unavailable::NoEngine);
    }
    let refs: Vec<KeyRef<'_>> = counted
        .iter()
        .map(|c| KeyRef {
            db,
            id: c.id,
            created_us: c.created_us,
        })
        .collect();
    // Per counted set, once a refill is due: the next one after it (computed outside the lock).
    let mut next_refill: Vec<Option<i64>> = vec![None; counted.len()];
    let mut room_deadline = None;
    let mut loads = 0;
    loop {
        let evictions = with_shared(false, |s| s.header.evictions).unwrap_or(0);
        enum Step {
            Stale,
            Load(usize),
            Refill(usize),
            NoRoom,
            Done(Metered, Option<u64>),
        }
        let step = with_shared(true, |s| {
            if s.header.databases[index].oid != db {
                return Step::Stale;
            }
            let mut at = Vec::with_capacity(counted.len());
            let mut dues = Vec::with_capacity(counted.len());
            for (k, c) in counted.iter().enumerate() {
                let Some(i) = slots::find(s.slots, &refs[k]) else {
                    return Step::Load(k);
                };
                let e = &s.slots[i];
                if !e.metered || e.version < c.version {
                    return Step::Load(k);
                }
                let due = c.config.refill_amount.is_some() && e.next_refill_us <= now_us;
                if due && next_refill[k].is_none() {
                    return Step::Refill(k);
                }
                at.push(i);
                dues.push(due);
            }
            // Inserting entries never moves others: the slots found above stay.
            let Some(window_at) = window_slots(s, db, windows) else {
                return Step::NoRoom;
            };
            let limits: Vec<metering::Limits> = counted
                .iter()
                .zip(&dues)
                .map(|(c, due)| metering::Limits {
                    rate_cost: c.rate_cost,
                    ..c.config.limits(*due)
                })
                .collect();
            // Every limit is judged before any is charged: a call one of them refuses takes
            // nothing from the others.
            let (_, windows_allow) = judge_windows(s, windows, &window_at, now_us, false);
            let counters_allow = counted.iter().enumerate().all(|(k, c)| {
                metering::charge(
                    &s.slots[at[k]].counters(),
                    &limits[k],
                    now_us,
                    c.cost,
                    false,
                )
                .verdict
                    == metering::Verdict::Allowed
            });
            let allowed = windows_allow && counters_allow;
            let take = permitted && allowed;
            let (window_states, _) = judge_windows(s, windows, &window_at, now_us, take);
            let mut charges = Vec::with_capacity(counted.len());
            let mut next_refills = Vec::with_capacity(counted.len());
            let mut wait_for: Option<u64> = None;
            let mut wake = false;
            for (k, c) in counted.iter().enumerate() {
                let i = at[k];
                let e = &mut s.slots[i];
                let charge = metering::charge(&e.counters(), &limits[k], now_us, c.cost, take);
                e.last_access_us = now_us;
                let changed = charge.after != e.counters() || charge.refilled;
                if charge.refilled {
                    e.last_refill_us = now_us;
                    e.next_refill_us = next_refill[k].unwrap_or(i64::MAX);
                }
                e.set_counters(&charge.after);
                // A spend the quota written ahead covers is durable already; the writer is
                // asked for the next write when half that cover is used, so that callers
                // rarely wait.
                let covered = charge.spent > 0 && e.covers(charge.after.remaining);
                wake |= covered && e.cover_running_low();
                if charge.spent > 0 {
                    e.spends = e.spends.saturating_add(1);
                }
                // Uses are the key's (the first counted set).
                if k == 0 && take {
                    s.add_uses(i, 1, now_us);
                }
                if changed {
                    let seq = s.counters_changed(index, i);
                    if (charge.spent > 0 || charge.refilled) && !covered {
                        wait_for = Some(wait_for.map_or(seq, |w| w.max(seq)));
                    }
                    wake |= s.database(index).writer_pid == 0;
                }
                let next = s.slots[i].next_refill_us;
                next_refills.push((next != i64::MAX).then_some(next));
                charges.push(charge);
            }
            if wait_for.is_some() || wake {
                s.wake_writer(index);
            }
            Step::Done(
                Metered {
                    charges,
                    windows: window_states,
                    allowed,
                    next_refill_us: next_refills,
                },
                wait_for,
            )
        });
        match step {
            None => return Err(Unavailable::NoEngine),
            Some(Step::Stale) => {
                DATABASE.with(|d| d.set(None));
                index = database_index().ok_or(Unavailable::NoEngine)?;
            }
            Some(Step::NoRoom) => wait_for_room(index, &mut room_deadline),
            Some(Step::Refill(k)) => {
                next_refill[k] = Some(counted[k].config.next_refill_after(now_us));
            }
            Some(Step::Load(k)) => {
                loads += 1;
                if loads > 1000 {
                    errors::internal_error(format!(
                        "the counters of \"{}\" did not load",
                        errors::shown(counted[k].id)
                    ));
                }
                let Some(stored) = (counted[k].load)() else {
                    return if k == 0 {
                        Ok(None)
                    } else {
                        Err(Unavailable::Gone)
                    };
                };
                let key = &refs[k];
                let installed = with_shared(true, |s| {
                    if s.header.evictions != evictions {
                        return Some(false);
                    }
                    let i = s.insert(key)?;
                    let e = &mut s.slots[i];
                    if (!e.metered || e.version < stored.version) && install(e, &stored) {
                        s.counters_changed(index, i);
                        s.wake_writer(index);
                    }
                    Some(true)
                })
                .flatten();
                match installed {
                    Some(true) => {}
                    // An eviction since the load began: the rows read may be older than the
                    // entry that was evicted. Read again.
                    Some(false) => {}
                    // The table is full of entries not written yet: the writer makes room.
                    None => {
                        loads -= 1;
                        wait_for_room(index, &mut room_deadline)
                    }
                }
            }
            Some(Step::Done(metered, wait_for)) => {
                if let Some(seq) = wait_for {
                    let spent: Vec<(KeyRef<'_>, &Charge)> =
                        refs.iter().copied().zip(&metered.charges).collect();
                    wait_durable(index, seq, &spent);
                }
                return Ok(Some(metered));
            }
        }
    }
}

/// Waits 10 ms for the writer to make room in a full table; past DURABLE_WAIT, fails.
fn wait_for_room(index: usize, deadline: &mut Option<std::time::Instant>) {
    let deadline = *deadline.get_or_insert_with(|| std::time::Instant::now() + DURABLE_WAIT);
    if std::time::Instant::now() > deadline {
        errors::raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            "the pg_apikeys metering table is full of keys whose counters are not written yet"
                .into(),
            Some(
                "Raise apikeys.shared_keys, and check the server log for pg_apikeys writer errors.",
            ),
        );
    }
    with_shared(true, |s| s.wake_writer(index));
    // SAFETY: sleeps this backend; interrupts are checked right after.
    unsafe { pg_sys::pg_usleep(10_000) };
    pgrx::check_for_interrupts!();
}

/// Installs the counters loaded from the rows; true when the entry keeps counts the rows do not
/// hold (quota written ahead and not used, a refill clock), which must be written.
fn install(e: &mut Entry, stored: &Stored) -> bool {
    // A new meter_version (a management change of the quota or its refill) keeps what the entry
    // counted that management did not set again: the window always, the quota left unless
    // `remaining` was set, the refill clock unless the refill was.
    let replacing = e.metered && e.version < stored.version;
    let before = e.counters();
    let mut counters = stored.counters;
    let mut refill = (stored.last_refill_us, stored.next_refill_us);
    if replacing {
        counters.window_start_us = before.window_start_us;
        counters.window_count = before.window_count;
        counters.window_previous = before.window_previous;
        if e.version >= stored.remaining_version {
            // The quota as counted here, plus what update_credits changed since (a decrement
            // that spends raced past leaves nothing, not less).
            let credited = stored.credits.saturating_sub(e.credits);
            counters.remaining = before
                .remaining
                .map(|left| left.saturating_add(credited).max(0));
            // A write in flight was collected before the credit: in the rows' terms (with the
            // credits it records) it holds that much more.
            e.shift_pending(credited);
        }
        if e.version >= stored.refill_version {
            refill = (e.last_refill(), Some(e.next_refill_us));
        }
    }
    e.metered = true;
    e.version = stored.version;
    e.credits = stored.credits;
    e.set_counters(&counters);
    e.last_refill_us = refill.0.unwrap_or(i64::MIN);
    e.next_refill_us = refill.1.unwrap_or(i64::MAX);
    e.set_written(
        stored.counters.remaining,
        stored.version,
        stored.last_refill_us,
        0,
    );
    e.spends = 0;
    // What was loaded is what is stored: nothing to write, unless counts were kept, or credits
    // are pending in the rows' sum (written now, the rows hold the quota as counted, a clamp at
    // 0 included, and no longer depend on keys.credits).
    e.flushed_seq = e.dirty_seq;
    counters.remaining != stored.counters.remaining
        || refill.0 != stored.last_refill_us
        || (stored.credits != 0 && counters.remaining.is_some())
}

/// Waits until the writer has committed everything up to `seq`. Should that not happen within
/// DURABLE_WAIT (no writer could start), or should the wait be interrupted (statement_timeout, a
/// cancel), the spends are given back and the call fails: the caller gets an error, not VALID.
fn wait_durable(index: usize, seq: u64, spent: &[(KeyRef<'_>, &Charge)]) {
    let db = spent.first().map_or(0, |(key, _)| key.db);
    // Some(true): written (these spends, or quota written ahead past them); Some(false): the
    // database lost its slot (its writer cannot connect).
    let state = |s: &mut Shared<'_>| {
        let d = &s.header.databases[index];
        if d.oid != db {
            Some(false)
        } else if d.durable >= seq {
            Some(true)
        } else {
            spent
                .iter()
                .all(|(key, charge)| {
                    charge.spent == 0
                        || slots::find(s.slots, key)
                            .is_some_and(|i| s.slots[i].covers(charge.after.remaining))
                })
                .then_some(true)
        }
    };
    if with_shared(false, state).flatten() == Some(true) {
        return;
    }
    // What each spend changed, to give it back only to the counters it was taken from.
    let at: Vec<Option<(i64, i64)>> = spent
        .iter()
        .map(|(key, _)| {
            with_shared(false, |s| {
                slots::find(s.slots, key).map(|i| (s.slots[i].version, s.slots[i].last_refill_us))
            })
            .flatten()
        })
        .collect();
    let give_all_back = || {
        for ((key, charge), at) in spent.iter().zip(&at) {
            give_back(index, key, charge.spent, *at);
        }
    };
    let cv = flushed_cv(index);
    let written = PgTryBuilder::new(|| {
        let deadline = std::time::Instant::now() + DURABLE_WAIT;
        // SAFETY: the condition variable lives in shared memory for the server's life; sleeping
        // on it checks for interrupts, and an error cancels the prepared sleep (at abort).
        unsafe { pg_sys::ConditionVariablePrepareToSleep(cv) };
        let mut written = false;
        while std::time::Instant::now() < deadline {
            if let Some(done) = with_shared(false, state).flatten() {
                written = done;
                break;
            }
            with_shared(true, |s| s.wake_writer(index));
            // SAFETY: see above; PG_WAIT_EXTENSION is the wait event class for extensions.
            unsafe {
                pg_sys::ConditionVariableTimedSleep(cv, 100, pg_sys::PG_WAIT_EXTENSION);
            }
        }
        // SAFETY: see above.
        unsafe {
            pg_sys::ConditionVariableCancelSleep();
        }
        written
    })
    .catch_others(|error| {
        give_all_back();
        error.rethrow()
    })
    .execute();
    if written {
        return;
    }
    give_all_back();
    let which = spent.first().map_or("", |(key, _)| key.id);
    errors::raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("the quota spend on API key \"{}\" could not be written within {} s: no pg_apikeys writer runs for this database", errors::shown(which), DURABLE_WAIT.as_secs()),
        Some("Check the server log for pg_apikeys writer errors and max_worker_processes."),
    )
}

/// Gives `spent` back to the key's quota, if the counters are still those it was taken from
/// (same meter_version, no refill since).
fn give_back(index: usize, key: &KeyRef<'_>, spent: i64, at: Option<(i64, i64)>) {
    if spent == 0 {
        return;
    }
    with_shared(true, |s| {
        let Some(i) = slots::find(s.slots, key) else {
            return;
        };
        if Some((s.slots[i].version, s.slots[i].last_refill_us)) != at
            || s.header.databases[index].oid != key.db
        {
            return;
        }
        let e = &mut s.slots[i];
        let mut c = e.counters();
        c.remaining = c.remaining.map(|r| r + spent);
        e.set_counters(&c);
        s.counters_changed(index, i);
    });
}

/// What shared memory knows about a key beyond its rows: uses not written yet, and the quota
/// left and the last refill when they are still current (counted at a meter_version not older
/// than the one management last set them at).
pub struct Live {
    /// `apikeys.keys.credits` that `remaining` includes.
    pub credits: i64,
    pub uses: u64,
    pub last_used_us: Option<i64>,
    pub remaining: Option<Option<i64>>,
    pub last_refill_us: Option<Option<i64>>,
}

impl Live {
    /// The quota left, with the credits of `apikeys.keys.credits` (`key_credits`) the entry has
    /// not taken in yet; None when the entry's count is not current.
    pub fn remaining_with(&self, key_credits: i64) -> Option<Option<i64>> {
        let credited = key_credits.saturating_sub(self.credits);
        self.remaining
            .map(|r| r.map(|left| left.saturating_add(credited).max(0)))
    }
}

/// The quota of the counters `entry` (created at `created_us`, set at `set_at`, with
/// `credits` in their row) as it is now: what shared memory counted, credits not taken in yet
/// included, or else `stored`, what the rows hold.
pub fn remaining_now(
    entry: &str,
    created_us: i64,
    set_at: (i64, i64),
    credits: i64,
    stored: Option<i64>,
) -> Option<i64> {
    live(entry, created_us, set_at)
        .and_then(|l| l.remaining_with(credits))
        .unwrap_or(stored)
}

/// `set_at`: the key's remaining_version and refill_version.
pub fn live(id: &str, created_us: i64, set_at: (i64, i64)) -> Option<Live> {
    let db = my_database();
    with_shared(false, |s| {
        let i = slots::find(s.slots, &KeyRef { db, id, created_us })?;
        let e = &s.slots[i];
        let (remaining_version, refill_version) = set_at;
        Some(Live {
            credits: e.credits,
            uses: e.uses,
            last_used_us: (e.uses > 0).then_some(e.last_used_us),
            remaining: (e.metered && e.version >= remaining_version)
                .then(|| e.counters().remaining),
            last_refill_us: (e.metered && e.version >= refill_version).then(|| e.last_refill()),
        })
    })
    .flatten()
}

/// The condition variable signalled when database `index`'s writes are committed.
pub fn flushed_cv(index: usize) -> *mut pg_sys::ConditionVariable {
    // SAFETY: only the address is taken; HEADER is set at start-up.
    unsafe { &raw mut (*HEADER).databases[index].flushed }
}
