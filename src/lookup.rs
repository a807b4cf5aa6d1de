//! A key's row read straight from one of its unique indexes (hash, previous_hash, id), without
//! SPI and without the executor. After kept plans, executor start-up and shut-down for a
//! one-row probe were the largest piece of a verification (perf: a fifth of the backend's
//! time); an index probe through `systable_beginscan` is what the executor would do underneath.
//!
//! The snapshot is the one a read-only SPI statement would use (the active snapshot), or, once
//! the transaction has written, a fresh one after a command-counter increment (what a
//! read-write SPI statement does), so a key created earlier in the same transaction is seen.
//! Only reads go this way: locking and writing stay in SQL (verify's FOR UPDATE path).
//!
//! Each backend also remembers the heap TID the index gave for a key (the root of its HOT
//! chain). The next lookup of that key follows that chain with the same snapshot, as an index
//! scan would: if a version is visible and still carries the presented hash (or id) it is the row
//! the index would have led to (the columns are unique, and a snapshot sees one version of a
//! row), so the B-tree descent — most of an index lookup — is skipped. HOT updates (usage
//! counting's) keep the chain; any other update or a delete ends it, and the lookup falls back
//! to the index. Nothing is ever served that the snapshot does not see.

use crate::catalog::relation;
use crate::errors;
use crate::jsonb::Jsonb;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;

/// Which unique index to probe, and with what.
pub enum By<'a> {
    Hash(&'a [u8]),
    PreviousHash(&'a [u8]),
    Id(&'a str),
}

/// The columns verification reads, copied out of the buffer.
pub struct KeyRow {
    pub id: String,
    pub hash: Vec<u8>,
    pub previous_valid_until: Option<TimestampWithTimeZone>,
    pub name: Option<String>,
    pub owner: Option<String>,
    pub permissions: Jsonb,
    pub metadata: Option<Jsonb>,
    pub role: Option<String>,
    pub master: bool,
    pub enabled: bool,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub revoked: bool,
    pub remaining: Option<i64>,
    pub rate_limit_max: Option<i32>,
    pub created_at: Option<TimestampWithTimeZone>,
    pub meter_version: i64,
    pub refill_amount: Option<i64>,
    pub refill_interval: Option<pgrx::datum::Interval>,
    pub rate_limit_window: Option<pgrx::datum::Interval>,
    pub rate_limit_algorithm: Option<String>,
    /// Named rate limits (SPEC §7), as stored; None for a key without.
    pub ratelimits: Option<Jsonb>,
    pub refill_day: Option<i32>,
    pub refill_schedule: Option<String>,
    /// The identity its owner names (SPEC §7), kept by management.
    pub identity_id: Option<i64>,
    /// The networks it may be verified from (SPEC §8), as cidr text; None: anywhere.
    pub allowed_cidrs: Option<Vec<Option<String>>>,
    /// A transaction still in progress that updated or deleted this version (a management
    /// change not committed yet), other than the caller's own.
    pub updater: Option<pg_sys::TransactionId>,
}

const N: usize = 27;
/// COLUMNS from here on came with 0.6.0 (and later).
const FIRST_ADDED_IN_0_6: usize = 16;
const COLUMNS: [&CStr; N] = [
    c"id",
    c"hash",
    c"previous_hash",
    c"previous_valid_until",
    c"name",
    c"owner",
    c"permissions",
    c"metadata",
    c"role",
    c"master",
    c"enabled",
    c"expires_at",
    c"revoked_at",
    c"remaining",
    c"rate_limit_max",
    c"created_at",
    c"meter_version",
    c"refill_amount",
    c"refill_interval",
    c"rate_limit_window",
    c"rate_limit_algorithm",
    c"effective_permissions",
    c"ratelimits",
    c"refill_day",
    c"refill_schedule",
    c"identity_id",
    c"allowed_cidrs",
];
const ID: usize = 0;
const HASH: usize = 1;
const PREVIOUS_HASH: usize = 2;

thread_local! {
    /// apikeys.keys' oid and the attribute numbers of COLUMNS, found once per backend (again
    /// if the table was dropped and created since).
    static LAYOUT: Cell<Option<(pg_sys::Oid, i32, [pg_sys::AttrNumber; N])>> = const { Cell::new(None) };
    /// Where each key was last found, by (lookup kind, hash or id), for apikeys.keys' oid.
    static PLACES: RefCell<(pg_sys::Oid, HashMap<Vec<u8>, pg_sys::ItemPointerData>)> =
        RefCell::new((pg_sys::InvalidOid, HashMap::new()));
}

/// Bounds a backend's memory for remembered places (about 100 bytes each).
const MAX_PLACES: usize = 100_000;

impl By<'_> {
    /// The remembered-place key; rotated-out hashes are rare and not remembered.
    fn place_key(&self) -> Option<Vec<u8>> {
        let (tag, bytes) = match self {
            By::Hash(h) => (b'h', *h),
            By::Id(id) => (b'i', id.as_bytes()),
            By::PreviousHash(_) => return None,
        };
        let mut key = Vec::with_capacity(bytes.len() + 1);
        key.push(tag);
        key.extend_from_slice(bytes);
        Some(key)
    }

    /// Whether `row` is the key this lookup names.
    fn names(&self, row: &KeyRow) -> bool {
        match self {
            By::Hash(h) => row.hash.as_slice() == *h,
            By::Id(id) => row.id == *id,
            By::PreviousHash(_) => false,
        }
    }
}

fn remembered(relid: pg_sys::Oid, key: &[u8]) -> Option<pg_sys::ItemPointerData> {
    PLACES.with(|p| {
        let places = p.borrow();
        (places.0 == relid)
            .then(|| places.1.get(key).copied())
            .flatten()
    })
}

fn remember(relid: pg_sys::Oid, key: Vec<u8>, tid: pg_sys::ItemPointerData) {
    PLACES.with(|p| {
        let mut places = p.borrow_mut();
        if places.0 != relid || places.1.len() >= MAX_PLACES {
            places.0 = relid;
            places.1.clear();
        }
        places.1.insert(key, tid);
    })
}

/// The version of the row whose HOT chain starts at `root` that `snapshot` sees, found the way
/// an index entry pointing at `root` is followed (prune the page if due, walk the chain under a
/// share lock). A remembered TID may lie past the table's end (after a VACUUM truncation): with
/// `remembered` the table's size is checked first.
///
/// # Safety
/// `rel` is open and locked (AccessShareLock at least) and `snapshot` stays valid for the call.
unsafe fn fetch_at(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    root: pg_sys::ItemPointerData,
    attnums: &[pg_sys::AttrNumber; N],
    remembered: bool,
) -> Option<KeyRow> {
    let block = (u32::from(root.ip_blkid.bi_hi) << 16) | u32::from(root.ip_blkid.bi_lo);
    // The block is below the relation's size: checked for a remembered TID, and an index
    // entry's TID always is; heap_hot_search_buffer rejects an offset the page does not have.
    // SAFETY: `rel` is open and locked (the caller's contract); the buffer is pinned from
    // ReadBuffer to ReleaseBuffer and share-locked while the HOT chain is searched.
    unsafe {
        if remembered
            && block
                >= pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM)
        {
            return None;
        }
        let buffer = pg_sys::ReadBuffer(rel, block);
        pg_sys::heap_page_prune_opt(rel, buffer);
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_SHARE as i32);
        let mut tid = root;
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        let found = pg_sys::heap_hot_search_buffer(
            &mut tid,
            rel,
            buffer,
            snapshot,
            &mut tuple,
            std::ptr::null_mut(),
            true,
        );
        // xmax is read under the share lock (hint bits and multixact members may change).
        let updater = if found {
            updating_xid(tuple.t_data)
        } else {
            pg_sys::InvalidTransactionId
        };
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_UNLOCK as i32);
        // The pin keeps the tuple in place (pruning needs a cleanup lock) while it is copied out.
        let row = found.then(|| deform(&mut tuple, (*rel).rd_att, attnums));
        pg_sys::ReleaseBuffer(buffer);
        row.map(|mut row| {
            row.updater = still_updating(updater);
            row
        })
    }
}

/// The transaction that updated or deleted this version (not one that only locked it), if any.
///
/// # Safety
/// `header` is a visible tuple's header in a pinned, share-locked buffer.
unsafe fn updating_xid(header: pg_sys::HeapTupleHeader) -> pg_sys::TransactionId {
    // SAFETY: the caller's contract; these are the checks of HEAP_XMAX_IS_LOCKED_ONLY and
    // HeapTupleHeaderGetUpdateXid.
    unsafe {
        let infomask = u32::from((*header).t_infomask);
        if infomask & pg_sys::HEAP_XMAX_INVALID != 0 {
            return pg_sys::InvalidTransactionId;
        }
        let multi = infomask & pg_sys::HEAP_XMAX_IS_MULTI != 0;
        let lock_only = infomask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
            || infomask & (pg_sys::HEAP_XMAX_IS_MULTI | pg_sys::HEAP_LOCK_MASK)
                == pg_sys::HEAP_XMAX_EXCL_LOCK;
        if lock_only {
            pg_sys::InvalidTransactionId
        } else if multi {
            pg_sys::HeapTupleGetUpdateXid(header)
        } else {
            (*header).t_choice.t_heap.t_xmax
        }
    }
}

fn still_updating(xid: pg_sys::TransactionId) -> Option<pg_sys::TransactionId> {
    if xid == pg_sys::InvalidTransactionId {
        return None;
    }
    // SAFETY: reads of the proc array and this transaction's state.
    let waiting = unsafe {
        !pg_sys::TransactionIdIsCurrentTransactionId(xid) && pg_sys::TransactionIdIsInProgress(xid)
    };
    waiting.then_some(xid)
}

/// Waits until transaction `xid` (an uncommitted change of a key's row) ends, as a row lock
/// would; deadlocks are detected by the lock manager.
pub fn wait_for(xid: pg_sys::TransactionId) {
    // SAFETY: waits on the transaction's lock; interrupts and deadlocks raise as usual.
    unsafe {
        pg_sys::XactLockTableWait(
            xid,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::XLTW_Oper::XLTW_None,
        )
    }
}

/// The key row in `tuple`, copied out.
///
/// # Safety
/// `tuple` is a tuple of apikeys.keys described by `desc`, kept in place (its buffer pinned)
/// for the call; `attnums` are that table's attribute numbers of COLUMNS.
unsafe fn deform(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    attnums: &[pg_sys::AttrNumber; N],
) -> KeyRow {
    // SAFETY: the caller's contract; values and nulls have room for every attribute.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        read(|i: usize| match attnums[i] {
            n if n > 0 => (values[n as usize - 1], nulls[n as usize - 1]),
            _ => (pg_sys::Datum::from(0), true),
        })
    }
}

/// The attribute numbers of COLUMNS in the table `relid` with `natts` attributes (a table
/// altered by ALTER EXTENSION … UPDATE keeps its OID but gains attributes).
fn attnums(relid: pg_sys::Oid, natts: i32) -> [pg_sys::AttrNumber; N] {
    if let Some((cached, cached_natts, attnums)) = LAYOUT.with(Cell::get) {
        if cached == relid && cached_natts == natts {
            return attnums;
        }
    }
    let mut attnums = [0; N];
    for (i, (slot, column)) in attnums.iter_mut().zip(COLUMNS).enumerate() {
        // SAFETY: a syscache lookup of an existing relation's attribute, in a transaction.
        *slot = unsafe { pg_sys::get_attnum(relid, column.as_ptr()) };
        // Columns added in 0.6.0 are missing until ALTER EXTENSION … UPDATE: read as NULL.
        if *slot <= 0 && i < FIRST_ADDED_IN_0_6 {
            errors::internal_error(format!("apikeys.keys has no column {column:?}"));
        }
    }
    LAYOUT.with(|l| l.set(Some((relid, natts, attnums))));
    attnums
}

/// The snapshot SPI would give this read (see the module comment). It is not registered:
/// callers use it before anything else takes a snapshot, or register it (`scan`).
pub fn snapshot() -> pg_sys::Snapshot {
    // SAFETY: called inside a transaction (every SQL function is); these only read and advance
    // the transaction's own snapshot state.
    unsafe {
        if pg_sys::GetCurrentTransactionIdIfAny() != pg_sys::InvalidTransactionId {
            pg_sys::CommandCounterIncrement();
            pg_sys::GetTransactionSnapshot()
        } else if pg_sys::ActiveSnapshotSet() {
            pg_sys::GetActiveSnapshot()
        } else {
            pg_sys::GetTransactionSnapshot()
        }
    }
}

/// The row of the key `by` names, if one is visible.
pub fn find(by: By<'_>) -> Option<KeyRow> {
    find_with(by, false)
}

/// The row as committed now (READ COMMITTED: after waiting for a change of it, as a row lock
/// would re-read it; other isolation levels keep their transaction snapshot).
pub fn find_latest(by: By<'_>) -> Option<KeyRow> {
    find_with(by, true)
}

fn find_with(by: By<'_>, latest: bool) -> Option<KeyRow> {
    let relid = relation(c"keys");
    let place_key = by.place_key();
    // SAFETY: the table is opened AccessShareLock'ed and the lock kept to the transaction's end
    // (as the executor does), so it and its indexes stay in place while fetch_at and probe read
    // them; the snapshot is used before anything else takes one.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let attnums = attnums(relid, (*(*rel).rd_att).natts);
        let read_committed = pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32;
        let snapshot = if latest && read_committed {
            pg_sys::GetLatestSnapshot()
        } else {
            snapshot()
        };
        // SERIALIZABLE transactions take the index path: its predicate locks are what
        // serializable conflict detection expects of a lookup.
        let serializable = pg_sys::XactIsoLevel == pg_sys::XACT_SERIALIZABLE as i32;
        let remembered_row = place_key
            .as_deref()
            .filter(|_| !serializable)
            .and_then(|k| remembered(relid, k))
            .and_then(|root| fetch_at(rel, snapshot, root, &attnums, true))
            .filter(|row| by.names(row));
        let row = remembered_row.or_else(|| {
            let (index, column, argument, procedure) = match by {
                By::Hash(h) => (c"keys_hash_key", HASH, h.into_datum(), pg_sys::F_BYTEAEQ),
                By::PreviousHash(h) => (
                    c"keys_previous_hash_key",
                    PREVIOUS_HASH,
                    h.into_datum(),
                    pg_sys::F_BYTEAEQ,
                ),
                By::Id(id) => (c"keys_pkey", ID, id.into_datum(), pg_sys::F_TEXTEQ),
            };
            let argument =
                argument.unwrap_or_else(|| errors::internal_error("a NULL lookup value"));
            let index = relation(index);
            let (row, root) = probe(
                rel,
                index,
                attnums[column],
                procedure,
                argument,
                snapshot,
                &attnums,
            )?;
            if let Some(k) = place_key {
                remember(relid, k, root);
            }
            Some(row)
        });
        // Like the executor, keep the lock to the end of the transaction.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        row
    }
}

/// An index scan for `column = argument`, done as the executor's index scan does it, but keeping
/// the TID each index entry gives (the root of a HOT chain) rather than the version it leads to.
///
/// # Safety
/// `rel` is apikeys.keys, open and locked; `index` one of its unique single-column indexes on
/// `column`, `procedure` that column's equality function, `argument` a datum of its type.
unsafe fn probe(
    rel: pg_sys::Relation,
    index: pg_sys::Oid,
    column: pg_sys::AttrNumber,
    procedure: u32,
    argument: pg_sys::Datum,
    snapshot: pg_sys::Snapshot,
    attnums: &[pg_sys::AttrNumber; N],
) -> Option<(KeyRow, pg_sys::ItemPointerData)> {
    // SAFETY: the caller's contract; the index is opened and locked for the scan, which is
    // ended and closed before returning; each TID is read before the next index_getnext_tid.
    unsafe {
        // pgrx reads the attribute the way each major lays it out (18 moved it).
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        // The index compares with its column's collation (id is text in the default collation);
        // ScanKeyInit would say "C", which orders differently.
        let collation = desc
            .get(column as usize - 1)
            .map_or(pg_sys::InvalidOid, |a| a.attcollation);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyEntryInitialize(
            &mut key,
            0,
            1, // the index's only column
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::InvalidOid,
            collation,
            pg_sys::Oid::from(procedure),
            argument,
        );
        let irel = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        #[cfg(not(feature = "pg18"))]
        let scan = pg_sys::index_beginscan(rel, irel, snapshot, 1, 0);
        // PostgreSQL 18 takes the scan's instrumentation (none: no EXPLAIN ANALYZE runs here).
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(rel, irel, snapshot, std::ptr::null_mut(), 1, 0);
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let mut found = None;
        // Entries of dead versions stay in a unique index until vacuum: the visible one wins.
        loop {
            let tid = pg_sys::index_getnext_tid(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tid.is_null() {
                break;
            }
            let root = *tid;
            if let Some(row) = fetch_at(rel, snapshot, root, attnums, false) {
                found = Some((row, root));
                break;
            }
        }
        pg_sys::index_endscan(scan);
        pg_sys::index_close(irel, pg_sys::NoLock as pg_sys::LOCKMODE);
        found
    }
}

/// Copies the columns out of a deformed tuple (the buffer is released right after).
///
/// # Safety
/// `at(i)` is the datum of COLUMNS[i] of a tuple of apikeys.keys, valid for the call.
unsafe fn read(at: impl Fn(usize) -> (pg_sys::Datum, bool)) -> KeyRow {
    fn get<T: FromDatum>(v: (pg_sys::Datum, bool)) -> Option<T> {
        // SAFETY: `read`'s contract: T is the type of the column the datum comes from.
        unsafe { T::from_datum(v.0, v.1) }
    }
    KeyRow {
        id: get(at(0)).unwrap_or_default(),
        hash: get(at(1)).unwrap_or_default(),
        previous_valid_until: get(at(3)),
        name: get(at(4)),
        owner: get(at(5)),
        // A key with roles has its own permissions and theirs (kept current by management).
        permissions: get(at(21))
            .or_else(|| get(at(6)))
            .unwrap_or_else(|| Jsonb::encode(&Value::Null)),
        metadata: get(at(7)),
        role: get(at(8)),
        master: get(at(9)).unwrap_or(false),
        enabled: get(at(10)).unwrap_or(false),
        expires_at: get(at(11)),
        revoked: !at(12).1,
        remaining: get(at(13)),
        rate_limit_max: get(at(14)),
        created_at: get(at(15)),
        meter_version: get(at(16)).unwrap_or(1),
        refill_amount: get(at(17)),
        refill_interval: get(at(18)),
        rate_limit_window: get(at(19)),
        rate_limit_algorithm: get(at(20)),
        ratelimits: get(at(22)),
        refill_day: get(at(23)),
        refill_schedule: get(at(24)),
        identity_id: get(at(25)),
        allowed_cidrs: get::<Vec<Option<crate::addresses::SqlCidr>>>(at(26))
            .map(|list| list.into_iter().map(|c| c.map(|c| c.0)).collect()),
        updater: None,
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;
    use crate::test_support::*;

    fn tid(block: u32, offset: u16) -> pg_sys::ItemPointerData {
        // SAFETY: ItemPointerData is plain integers; all zeroes is a valid value.
        let mut t: pg_sys::ItemPointerData = unsafe { std::mem::zeroed() };
        t.ip_blkid.bi_hi = (block >> 16) as u16;
        t.ip_blkid.bi_lo = (block & 0xffff) as u16;
        t.ip_posid = offset;
        t
    }

    fn ctid_of(id: &str) -> pg_sys::ItemPointerData {
        let ctid = one::<String>(&format!(
            "SELECT ctid::text FROM apikeys.keys WHERE id = '{id}'"
        ))
        .expect("the key has a row");
        let (block, offset) = ctid
            .trim_matches(|c| c == '(' || c == ')')
            .split_once(',')
            .expect("a ctid is (block,offset)");
        tid(block.parse().unwrap(), offset.parse().unwrap())
    }

    fn keys_oid() -> pg_sys::Oid {
        relation(c"keys")
    }

    #[pg_test]
    fn a_remembered_key_is_read_fresh_after_every_kind_of_change() {
        let (id, key) = create("name => 'a'");
        assert_eq!(code(&key, ""), "VALID");
        assert!(remembered(
            keys_oid(),
            &By::Hash(&crate::key_format::hash(&key))
                .place_key()
                .unwrap()
        )
        .is_some());
        run(&format!(
            "UPDATE apikeys.keys SET updated_by = 'hot' WHERE id = '{id}'"
        ));
        assert_eq!(field::<String>(&key, "", "name").as_deref(), Some("a"));
        run(&format!("SELECT apikeys.update_api_key('{id}', name => 'b', permissions => '{{\"x\": [\"y\"]}}')"));
        assert_eq!(field::<String>(&key, "", "name").as_deref(), Some("b"));
        assert_eq!(
            field::<String>(&key, "", "permissions::text").as_deref(),
            Some(r#"{"x": ["y"]}"#)
        );
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => false)"
        ));
        assert_eq!(code(&key, ""), "DISABLED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(code(&key, ""), "REVOKED");
        run(&format!("SELECT apikeys.delete_api_key('{id}')"));
        assert_eq!(code(&key, ""), "NOT_FOUND");
    }

    #[pg_test]
    fn a_rotated_key_is_not_served_from_its_old_place() {
        let (id, old) = create("");
        assert_eq!(code(&old, ""), "VALID");
        let new =
            one::<String>(&format!("SELECT key FROM apikeys.rotate_api_key('{id}')")).unwrap();
        assert_eq!(code(&old, ""), "NOT_FOUND");
        assert_eq!(code(&new, ""), "VALID");
        assert_eq!(field::<String>(&new, "", "key_id"), Some(id));
    }

    #[pg_test]
    fn a_place_holding_another_key_or_past_the_table_is_not_trusted() {
        let (a, key_a) = create("name => 'a'");
        let (_, key_b) = create("name => 'b'");
        let hash_a = crate::key_format::hash(&key_a);
        let place = By::Hash(&hash_a).place_key().unwrap();
        // A remembered place that now holds key b's row: the index is asked instead.
        remember(keys_oid(), place.clone(), ctid_of(&lookup_id(&key_b)));
        assert_eq!(find(By::Hash(&hash_a)).map(|r| r.id), Some(a.clone()));
        // The index's answer replaced the wrong place.
        assert_eq!(
            remembered(keys_oid(), &place).map(|t| t.ip_posid),
            Some(ctid_of(&a).ip_posid)
        );
        // Beyond the table's last block, and an offset no page has.
        for bad in [tid(1_000_000, 1), tid(0, u16::MAX)] {
            remember(keys_oid(), place.clone(), bad);
            assert_eq!(find(By::Hash(&hash_a)).map(|r| r.id), Some(a.clone()));
        }
        // By id, as tokens look keys up.
        assert_eq!(find(By::Id(&a)).map(|r| r.name), Some(Some("a".into())));
        assert!(find(By::Id("no such id")).is_none());
    }

    fn lookup_id(key: &str) -> String {
        field::<String>(key, "", "key_id").unwrap()
    }
}
