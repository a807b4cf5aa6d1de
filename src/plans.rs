//! Statements prepared once per backend and kept (SPI_keepplan). Verification runs the same few
//! queries thousands of times a second, and parsing, analysing and planning them was most of its
//! cost (perf: 44% of CPU under raw_parser, parse_analyze and the planner). PostgreSQL's plan
//! cache revalidates kept plans after DDL or a search_path change, so none outlives the schema.

use crate::errors;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

type Key = (String, Vec<pg_sys::Oid>, bool);

thread_local! {
    static PLANS: RefCell<HashMap<Key, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// The kept plan of `sql` for arguments of these types, prepared on first use.
fn prepared(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[DatumWithOid<'_>],
    mutating: bool,
) -> Rc<OwnedPreparedStatement> {
    // Every statement names apikeys.<table>: that name must still lead to our schema.
    crate::catalog::schema();
    let key: Key = (
        sql.to_owned(),
        args.iter().map(|a| a.oid()).collect(),
        mutating,
    );
    if let Some(plan) = PLANS.with(|p| p.borrow().get(&key).cloned()) {
        return plan;
    }
    let types: Vec<PgOid> = key.1.iter().map(|oid| PgOid::from(*oid)).collect();
    let statement = if mutating {
        client.prepare_mut(sql, &types)
    } else {
        client.prepare(sql, &types)
    };
    let plan = Rc::new(errors::internal(statement).keep());
    PLANS.with(|p| p.borrow_mut().insert(key, plan.clone()));
    plan
}

/// `client.select` through a kept plan: reads only, never assigns a transaction id.
pub fn select<'c>(
    client: &SpiClient<'c>,
    sql: &str,
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiTupleTable<'c> {
    let plan = prepared(client, sql, args, false);
    errors::internal(client.select(&*plan, limit, args))
}

/// `client.update` through a kept plan.
pub fn update<'c>(
    client: &mut SpiClient<'c>,
    sql: &str,
    limit: Option<i64>,
    args: &[DatumWithOid<'_>],
) -> SpiTupleTable<'c> {
    let plan = prepared(client, sql, args, true);
    errors::internal(client.update(&*plan, limit, args))
}
