//! The audit trail: one row per management action, naming the role that performed it.

use crate::plans;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use std::ffi::CStr;

/// The role that called us. Management functions are SECURITY DEFINER, so `current_user` is
/// their owner; the outer user id is the caller's role (after any SET ROLE).
pub fn actor() -> String {
    // SAFETY: the outer user id always names an existing role in a session; the name is a
    // palloc'd C string, copied before the call returns.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

thread_local! {
    /// The authenticated key a self-service call (`my_*`) acts for, while it runs.
    static ACTING_KEY: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` as key `key_id` acting (self-service): audit rows written meanwhile name it.
pub fn acting_as<R>(key_id: &str, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTING_KEY.with(|a| a.borrow_mut().take());
        }
    }
    ACTING_KEY.with(|a| *a.borrow_mut() = Some(key_id.to_owned()));
    let _reset = Reset;
    f()
}

/// The key acting for a self-service call, if one runs.
pub fn acting_key() -> Option<String> {
    ACTING_KEY.with(|a| a.borrow().clone())
}

pub fn record(
    client: &mut SpiClient<'_>,
    action: &str,
    key_id: Option<&str>,
    details: serde_json::Value,
) {
    let mut args = vec![
        actor().into(),
        action.into(),
        key_id.into(),
        JsonB(details).into(),
    ];
    // Only self-service names an acting key: other actions keep working on a database whose SQL
    // predates the column (until ALTER EXTENSION … UPDATE).
    let sql = match acting_key() {
        Some(acting) => {
            args.push(acting.into());
            "INSERT INTO apikeys.audit_log (actor, action, key_id, details, acting_key_id)
             VALUES ($1, $2, $3, $4, $5)"
        }
        None => {
            "INSERT INTO apikeys.audit_log (actor, action, key_id, details) VALUES ($1, $2, $3, $4)"
        }
    };
    plans::update(client, sql, None, &args);
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn every_management_action_is_audited_with_the_calling_role() {
        Spi::run("CREATE ROLE audit_admin; GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA apikeys TO audit_admin")
            .unwrap();
        Spi::run("SET ROLE audit_admin").unwrap();
        let id = Spi::get_one::<String>("SELECT id FROM apikeys.create_api_key(id => 'aud1')")
            .unwrap()
            .unwrap();
        Spi::run("SELECT apikeys.update_api_key('aud1', name => 'renamed')").unwrap();
        Spi::run("SELECT apikeys.rotate_api_key('aud1')").unwrap();
        Spi::run("SELECT apikeys.revoke_api_key('aud1')").unwrap();
        Spi::run("SELECT apikeys.delete_api_key('aud1')").unwrap();
        Spi::run("RESET ROLE").unwrap();
        let actions = Spi::get_one::<String>(&format!(
            "SELECT string_agg(action || ':' || actor, ',' ORDER BY id) FROM apikeys.audit_log WHERE key_id = '{id}'"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            actions,
            "create:audit_admin,update:audit_admin,rotate:audit_admin,revoke:audit_admin,delete:audit_admin"
        );
        // The audit never holds secrets.
        let leaked = Spi::get_one::<bool>(
            "SELECT bool_or(details::text ~ 'sk_' OR details ? 'hash') FROM apikeys.audit_log",
        )
        .unwrap();
        assert_eq!(leaked, Some(false));
    }
}
