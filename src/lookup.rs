//! A key's row read straight from one of its unique indexes (hash, previous_hash, id), without
//! SPI and without the executor. After kept plans, executor start-up and shut-down for a
//! one-row probe were the largest piece of a verification (perf: a fifth of the backend's
//! time); an index probe through `systable_beginscan` is what the executor would do underneath.
//!
//! The snapshot is the one a read-only SPI statement would use (the active snapshot), or, once
//! the transaction has written, a fresh one after a command-counter increment (what a
//! read-write SPI statement does), so a key created earlier in the same transaction is seen.
//! Only reads go this way: locking and writing stay in SQL (verify's FOR UPDATE path).

use crate::errors;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::cell::Cell;
use std::ffi::CStr;

/// Which unique index to probe, and with what.
pub enum By<'a> {
    Hash(&'a [u8]),
    PreviousHash(&'a [u8]),
    Id(&'a str),
}

/// A jsonb column as verification carries it: the stored value, detoasted and copied into the
/// call's memory, goes back into the result as it is; it is parsed only where its content is
/// needed (required permissions, a token's claims, a session's context). The jsonb→serde→jsonb
/// round trip was a tenth of a plain verification's own time (perf).
#[derive(Clone, Debug)]
pub enum Json {
    Parsed(Value),
    Stored(pg_sys::Datum),
}

impl Json {
    /// A copy of a jsonb datum that outlives the buffer it points into.
    unsafe fn stored(datum: pg_sys::Datum, isnull: bool) -> Option<Json> {
        (!isnull).then(|| {
            let copy = pg_sys::pg_detoast_datum_copy(datum.cast_mut_ptr());
            Json::Stored(pg_sys::Datum::from(copy))
        })
    }

    pub fn value(&self) -> Value {
        match self {
            Json::Parsed(v) => v.clone(),
            Json::Stored(d) => unsafe { JsonB::from_datum(*d, false) }.map_or(Value::Null, |j| j.0),
        }
    }

    pub fn into_datum(self) -> Option<pg_sys::Datum> {
        match self {
            Json::Parsed(v) => JsonB(v).into_datum(),
            Json::Stored(d) => Some(d),
        }
    }
}

/// The columns verification reads, copied out of the buffer.
pub struct KeyRow {
    pub id: String,
    pub hash: Vec<u8>,
    pub previous_valid_until: Option<TimestampWithTimeZone>,
    pub name: Option<String>,
    pub owner: Option<String>,
    pub permissions: Json,
    pub metadata: Option<Json>,
    pub role: Option<String>,
    pub master: bool,
    pub enabled: bool,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub revoked: bool,
    pub remaining: Option<i64>,
    pub rate_limit_max: Option<i32>,
    pub created_at: Option<TimestampWithTimeZone>,
}

const COLUMNS: [&CStr; 16] = [
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
];
const ID: usize = 0;
const HASH: usize = 1;
const PREVIOUS_HASH: usize = 2;

thread_local! {
    /// apikeys.keys' oid and the attribute numbers of COLUMNS, found once per backend (again
    /// if the table was dropped and created since).
    static LAYOUT: Cell<Option<(pg_sys::Oid, [pg_sys::AttrNumber; 16])>> = const { Cell::new(None) };
}

fn schema() -> pg_sys::Oid {
    unsafe { pg_sys::get_namespace_oid(c"apikeys".as_ptr(), false) }
}

fn relation(schema: pg_sys::Oid, name: &CStr) -> pg_sys::Oid {
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), schema) };
    if oid == pg_sys::InvalidOid {
        errors::internal_error(format!("relation apikeys.{name:?} does not exist"));
    }
    oid
}

fn attnums(relid: pg_sys::Oid) -> [pg_sys::AttrNumber; 16] {
    if let Some((cached, attnums)) = LAYOUT.with(Cell::get) {
        if cached == relid {
            return attnums;
        }
    }
    let mut attnums = [0; 16];
    for (slot, column) in attnums.iter_mut().zip(COLUMNS) {
        *slot = unsafe { pg_sys::get_attnum(relid, column.as_ptr()) };
        if *slot <= 0 {
            errors::internal_error(format!("apikeys.keys has no column {column:?}"));
        }
    }
    LAYOUT.with(|l| l.set(Some((relid, attnums))));
    attnums
}

/// The snapshot SPI would give this read (see the module comment).
unsafe fn snapshot() -> pg_sys::Snapshot {
    if pg_sys::GetCurrentTransactionIdIfAny() != pg_sys::InvalidTransactionId {
        pg_sys::CommandCounterIncrement();
        pg_sys::GetTransactionSnapshot()
    } else if pg_sys::ActiveSnapshotSet() {
        pg_sys::GetActiveSnapshot()
    } else {
        pg_sys::GetTransactionSnapshot()
    }
}

/// The row of the key `by` names, if one is visible.
pub fn find(by: By<'_>) -> Option<KeyRow> {
    let schema = schema();
    let relid = relation(schema, c"keys");
    let attnums = attnums(relid);
    let (index, column, argument, procedure) = match by {
        By::Hash(h) => (c"keys_hash_key", HASH, h.into_datum(), pg_sys::F_BYTEAEQ),
        By::PreviousHash(h) => (c"keys_previous_hash_key", PREVIOUS_HASH, h.into_datum(), pg_sys::F_BYTEAEQ),
        By::Id(id) => (c"keys_pkey", ID, id.into_datum(), pg_sys::F_TEXTEQ),
    };
    let argument = argument.unwrap_or_else(|| errors::internal_error("a NULL lookup value"));
    let index = relation(schema, index);
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let attrs = (*desc).attrs.as_slice(natts);
        // The index compares with its column's collation (id is text in the default collation);
        // ScanKeyInit would say "C", which orders differently.
        let column_attnum = attnums[column];
        let collation = attrs[column_attnum as usize - 1].attcollation;
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyEntryInitialize(
            &mut key,
            0,
            column_attnum,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::InvalidOid,
            collation,
            pg_sys::Oid::from(procedure),
            argument,
        );
        let scan = pg_sys::systable_beginscan(rel, index, true, snapshot(), 1, &mut key);
        let tuple = pg_sys::systable_getnext(scan);
        let row = (!tuple.is_null()).then(|| {
            let mut values = vec![pg_sys::Datum::from(0); natts];
            let mut nulls = vec![true; natts];
            pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let at = |i: usize| {
                let n = attnums[i] as usize - 1;
                (values[n], nulls[n])
            };
            read(at)
        });
        pg_sys::systable_endscan(scan);
        // Like the executor, keep the lock to the end of the transaction.
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        row
    }
}

/// Copies the columns out of a deformed tuple (the buffer is released right after).
unsafe fn read(at: impl Fn(usize) -> (pg_sys::Datum, bool)) -> KeyRow {
    fn get<T: FromDatum>(v: (pg_sys::Datum, bool)) -> Option<T> {
        unsafe { T::from_datum(v.0, v.1) }
    }
    KeyRow {
        id: get(at(0)).unwrap_or_default(),
        hash: get(at(1)).unwrap_or_default(),
        previous_valid_until: get(at(3)),
        name: get(at(4)),
        owner: get(at(5)),
        permissions: Json::stored(at(6).0, at(6).1).unwrap_or(Json::Parsed(Value::Null)),
        metadata: Json::stored(at(7).0, at(7).1),
        role: get(at(8)),
        master: get(at(9)).unwrap_or(false),
        enabled: get(at(10)).unwrap_or(false),
        expires_at: get(at(11)),
        revoked: !at(12).1,
        remaining: get(at(13)),
        rate_limit_max: get(at(14)),
        created_at: get(at(15)),
    }
}
