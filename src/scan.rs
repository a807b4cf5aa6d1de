//! Every row of one of the extension's small tables that a snapshot sees, read without SPI:
//! apikeys.signing_keys is read on every mint and token verification, and the executor's
//! start-up for it was a visible part of both (perf). With an index, only the rows that index
//! holds are read (a partial index over unretired signing keys keeps retired ones off the path).

use crate::catalog::relation;
use crate::errors;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

/// A table and the columns a scan of it reads.
type Layout = (pg_sys::Oid, Vec<&'static CStr>);

thread_local! {
    /// Column positions `scan` reads, by table oid and column names.
    static LAYOUTS: RefCell<HashMap<Layout, Vec<usize>>> = RefCell::new(HashMap::new());
}

/// Which snapshot a scan reads with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    /// The one SPI would use for this statement (`lookup::snapshot`).
    Statement,
    /// The latest: what has committed until now, even in REPEATABLE READ (a second look after
    /// taking a lock, where the statement's snapshot would miss what the lock waited for).
    Latest,
}

fn layout(relid: pg_sys::Oid, table: &CStr, columns: &[&'static CStr]) -> Vec<usize> {
    LAYOUTS.with(|layouts| {
        let key = (relid, columns.to_vec());
        if let Some(found) = layouts.borrow().get(&key) {
            return found.clone();
        }
        let found: Vec<usize> = columns
            .iter()
            // SAFETY: a syscache lookup of an existing relation's attribute, in a transaction.
            .map(|c| match unsafe { pg_sys::get_attnum(relid, c.as_ptr()) } {
                n if n > 0 => n as usize - 1,
                _ => errors::internal_error(format!("apikeys.{table:?} has no column {c:?}")),
            })
            .collect();
        layouts.borrow_mut().insert(key, found.clone());
        found
    })
}

/// Every row of `apikeys.<table>` (of `apikeys.<index>`'s rows, with an index) the snapshot
/// sees, through `read`: given a column's index in `columns`, it returns that datum and whether
/// it is NULL; it must copy what it keeps (the tuple is gone after it returns).
pub fn scan<R>(
    table: &CStr,
    index: Option<&CStr>,
    columns: &[&'static CStr],
    snapshot: Snapshot,
    mut read: impl FnMut(&dyn Fn(usize) -> (pg_sys::Datum, bool)) -> Option<R>,
) -> Vec<R> {
    let relid = relation(table);
    // Without the index (SQL not yet updated to 0.5.0) the whole table is read; `read` filters.
    let index = index
        .and_then(crate::catalog::relation_if_exists)
        .unwrap_or(pg_sys::InvalidOid);
    let attnums = layout(relid, table, columns);
    let mut rows = Vec::new();
    // SAFETY: the table is opened and kept AccessShareLock'ed (to the transaction's end, as the
    // executor does); the snapshot is registered for the scan's length (a latest snapshot is
    // otherwise unregistered); each tuple is deformed and read while the scan holds its page.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let snap = pg_sys::RegisterSnapshot(match snapshot {
            Snapshot::Statement => crate::lookup::snapshot(),
            Snapshot::Latest => pg_sys::GetLatestSnapshot(),
        });
        let scan = pg_sys::systable_beginscan(
            rel,
            index,
            index != pg_sys::InvalidOid,
            snap,
            0,
            std::ptr::null_mut(),
        );
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            let column = |i: usize| (values[attnums[i]], nulls[attnums[i]]);
            if let Some(row) = read(&column) {
                rows.push(row);
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::UnregisterSnapshot(snap);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    rows
}
