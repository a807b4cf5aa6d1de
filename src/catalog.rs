//! The extension's own objects, by OID. Every statement the extension runs names its tables as
//! `apikeys.<table>` and every direct read resolves them inside a schema OID; both are sound only
//! while the schema named `apikeys` is the one `CREATE EXTENSION pg_apikeys` created. The install
//! script refuses a schema it did not create (see `schema.rs`), so a role that creates `apikeys`
//! first gains nothing; and `schema()` checks, before anything runs, that the schema found by
//! that name is the extension's own (pg_extension.extnamespace). A schema renamed away and
//! replaced by another one named `apikeys` makes every function refuse rather than run against
//! objects someone else made.

use crate::errors;
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// The schema OID confirmed to be the extension's, once per backend (again when the name
    /// `apikeys` leads elsewhere: dropped and re-created extension, renamed schema).
    static CONFIRMED: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

/// Whether the extension is installed in this database (a catalog index probe, no SPI).
pub fn installed() -> bool {
    // SAFETY: a catalog lookup by name in a transaction; missing_ok returns InvalidOid.
    unsafe { pg_sys::get_extension_oid(c"pg_apikeys".as_ptr(), true) != pg_sys::InvalidOid }
}

/// The extension's schema and owner as pg_extension records them, if it is installed here.
pub fn extension() -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    // Operators and the catalog schema-qualified: this runs under any search_path.
    Spi::connect(|client| {
        let table = errors::internal(client.select(
            "SELECT e.extnamespace, e.extowner FROM pg_catalog.pg_extension e
              WHERE e.extname OPERATOR(pg_catalog.=) 'pg_apikeys'::pg_catalog.name",
            Some(1),
            &[],
        ));
        if table.is_empty() {
            return None;
        }
        let row = table.first();
        let schema = errors::internal(row.get::<pg_sys::Oid>(1))?;
        let owner = errors::internal(row.get::<pg_sys::Oid>(2))?;
        Some((schema, owner))
    })
}

/// The OID of the schema named `apikeys`, after checking that it is the extension's own.
/// Raises 42501 when it is not (the extension's schema was renamed and another took its name)
/// and 55000 when the extension is not installed in this database.
pub fn schema() -> pg_sys::Oid {
    // SAFETY: a syscache lookup by name in a transaction; missing_ok returns InvalidOid.
    let named = unsafe { pg_sys::get_namespace_oid(c"apikeys".as_ptr(), true) };
    if named != pg_sys::InvalidOid && CONFIRMED.with(Cell::get) == named {
        return named;
    }
    let Some((ours, _)) = extension() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "extension pg_apikeys is not installed in this database".into(),
            Some("Run CREATE EXTENSION pg_apikeys as a superuser."),
        )
    };
    if named != ours {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "schema \"apikeys\" (oid {}) is not the schema of extension pg_apikeys (oid {})",
                u32::from(named),
                u32::from(ours)
            ),
            Some("The extension's schema was renamed or replaced: rename it back to apikeys, or drop the extension and create it again."),
        );
    }
    CONFIRMED.with(|c| c.set(ours));
    ours
}

/// A relation of the extension's schema by name, as an OID.
pub fn relation(name: &std::ffi::CStr) -> pg_sys::Oid {
    relation_if_exists(name).unwrap_or_else(|| {
        errors::internal_error(format!("relation apikeys.{name:?} does not exist"))
    })
}

/// A relation of the extension's schema by name, if it exists (an index added by a release
/// the installed SQL has not been updated to yet).
pub fn relation_if_exists(name: &std::ffi::CStr) -> Option<pg_sys::Oid> {
    let schema = schema();
    // SAFETY: a syscache lookup in a transaction; returns InvalidOid when there is none.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), schema) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// Whether the extension's table `table` has `column` (a column added by a release the installed
/// SQL has not been updated to yet is missing).
pub fn has_column(table: &std::ffi::CStr, column: &std::ffi::CStr) -> bool {
    let Some(relid) = relation_if_exists(table) else {
        return false;
    };
    // SAFETY: a syscache lookup of an existing relation's attribute, in a transaction.
    unsafe { pg_sys::get_attnum(relid, column.as_ptr()) > 0 }
}

/// Whether this database's SQL is the one this library meters with: the last column a release
/// added to the metering tables is there (ALTER EXTENSION … UPDATE has run).
pub fn metering_up_to_date() -> bool {
    let Some(meters) = relation_if_exists(c"meters") else {
        return false;
    };
    // SAFETY: a syscache lookup of an existing relation's attribute, in a transaction.
    unsafe { pg_sys::get_attnum(meters, c"credits".as_ptr()) > 0 }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn a_schema_that_took_the_extensions_name_is_never_used() {
        let (id, key) = create("name => 'squat'");
        // What a superuser's rename followed by someone else's schema of the same name leaves.
        run("ALTER SCHEMA apikeys RENAME TO apikeys_moved");
        run("CREATE SCHEMA apikeys");
        run("CREATE TABLE apikeys.keys (id text)");
        run("CREATE TABLE apikeys.signing_keys (kid text)");
        run("CREATE TABLE apikeys.audit_log (id bigint)");
        for call in [
            format!("SELECT apikeys_moved.verify_key('{key}')"),
            format!("SELECT apikeys_moved.get_api_key('{id}')"),
            "SELECT apikeys_moved.create_api_key()".to_string(),
            "SELECT apikeys_moved.jwks()".to_string(),
            "SELECT apikeys_moved.rotate_signing_key()".to_string(),
            format!("SELECT apikeys_moved.mint_token('{key}', 1000)"),
        ] {
            let err =
                error_of(&call).unwrap_or_else(|| panic!("{call} ran against another schema"));
            assert!(
                err.starts_with("42501: schema \"apikeys\""),
                "{call}: {err}"
            );
        }
        // The PL/pgSQL authenticate_request names apikeys.authenticate_headers: a function of that
        // name in the other schema, accepting anything, is never called.
        run("CREATE FUNCTION apikeys.authenticate_headers(jsonb) RETURNS apikeys_moved.verification
             LANGUAGE sql AS $$ SELECT ROW(true, 'VALID', 'fake', NULL, NULL, NULL, '{}', NULL, NULL,
                                           NULL, NULL, NULL, NULL, '[]', NULL, NULL, NULL)::apikeys_moved.verification $$");
        run("SELECT set_config('request.headers', '{\"x-api-key\": \"garbage\"}', true)");
        let err = error_of("SELECT apikeys_moved.authenticate_request()")
            .expect("authenticate_request used another schema's function");
        assert!(err.starts_with("42501: schema \"apikeys\""), "{err}");
        // Back in place, everything works again in the same session.
        run("DROP SCHEMA apikeys CASCADE");
        run("ALTER SCHEMA apikeys_moved RENAME TO apikeys");
        assert_eq!(code(&key, ""), "VALID");
    }
}
