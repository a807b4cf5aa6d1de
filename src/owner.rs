//! The owner switch: what `SECURITY DEFINER … SET search_path = pg_catalog, pg_temp` gives a whole
//! call, for only the part of a call that writes (metered keys, usage counting, a first signing
//! key) and for the usage writer's statements. Reads need neither: they go through `lookup` and
//! `scan`, which check no privileges and resolve no names. Saving and restoring the search_path
//! on every call was 5% of a plain verification (perf).

use crate::catalog;
use pgrx::prelude::*;

/// Runs `f` as the owner of apikeys.keys (the extension's owner) with
/// `search_path = pg_catalog, pg_temp`. On an error, the (sub)transaction's abort restores the
/// user and the setting, as it does for SECURITY DEFINER.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let relid = catalog::relation(c"keys");
    // SAFETY: the relation exists (catalog::relation raises otherwise) and is only read while
    // the relcache entry is open; the user switch and the GUC nest level are undone in the
    // reverse order below, and by transaction abort if `f` raises.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::RelationClose(rel);
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest);
        pg_sys::SetUserIdAndSecContext(user, context);
        result
    }
}
