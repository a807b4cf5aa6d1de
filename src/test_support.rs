//! Helpers for the #[pg_test]s: run SQL, capture an error's SQLSTATE, create and verify keys.
#![cfg(any(test, feature = "pg_test"))]

use pgrx::prelude::*;

pgrx::extension_sql!(
    r#"
CREATE SCHEMA IF NOT EXISTS tests;
-- 'SQLSTATE: message' of the error `q` raises, NULL if it raises none.
CREATE FUNCTION tests.error_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE q;
    RETURN NULL;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $f$;
GRANT USAGE ON SCHEMA tests TO PUBLIC;
"#,
    name = "test_support",
    requires = ["privileges"]
);

/// One value from a query.
pub fn one<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The 'SQLSTATE: message' of the error `sql` raises, or None.
pub fn error_of(sql: &str) -> Option<String> {
    one::<String>(&format!(
        "SELECT tests.error_of({})",
        pgrx::spi::quote_literal(sql)
    ))
}

/// Asserts that `sql` fails with `sqlstate` and a message containing `needle`.
pub fn assert_error(sql: &str, sqlstate: &str, needle: &str) {
    let err = error_of(sql).unwrap_or_else(|| panic!("no error from {sql}"));
    assert!(
        err.starts_with(sqlstate),
        "{sql}: expected {sqlstate}, got {err}"
    );
    assert!(
        err.contains(needle),
        "{sql}: expected message with {needle:?}, got {err}"
    );
}

/// Creates a key with the given create_api_key arguments; returns (id, key).
pub fn create(args: &str) -> (String, String) {
    let (id, key) = Spi::get_two::<String, String>(&format!(
        "SELECT id, key FROM apikeys.create_api_key({args})"
    ))
    .unwrap_or_else(|e| panic!("create_api_key({args}): {e}"));
    (id.unwrap(), key.unwrap())
}

/// verify_key(key, <extra args>).code
pub fn code(key: &str, extra: &str) -> String {
    field::<String>(key, extra, "code").unwrap()
}

/// A column of apikeys.<function>(credential, <extra args>).
fn result_field<T: FromDatum + IntoDatum>(
    function: &str,
    credential: &str,
    extra: &str,
    column: &str,
) -> Option<T> {
    let sep = if extra.is_empty() { "" } else { ", " };
    one::<T>(&format!(
        "SELECT {column} FROM apikeys.{function}({}{sep}{extra})",
        pgrx::spi::quote_literal(credential)
    ))
}

/// A column of verify_key(key, <extra args>).
pub fn field<T: FromDatum + IntoDatum>(key: &str, extra: &str, column: &str) -> Option<T> {
    result_field("verify_key", key, extra, column)
}

/// mint_token(key, <args>)
pub fn mint(key: &str, args: &str) -> String {
    one::<String>(&format!(
        "SELECT apikeys.mint_token({}, {args})",
        pgrx::spi::quote_literal(key)
    ))
    .unwrap()
}

/// A column of verify_token(token, <extra args>).
pub fn token_field<T: FromDatum + IntoDatum>(token: &str, extra: &str, column: &str) -> Option<T> {
    result_field("verify_token", token, extra, column)
}

/// verify_token(token, <extra args>).code
pub fn token_code(token: &str, extra: &str) -> String {
    token_field::<String>(token, extra, "code").unwrap()
}

/// The wall clock in epoch milliseconds, as PostgreSQL reads it.
pub fn clock_ms() -> i64 {
    one::<i64>("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint").unwrap()
}
