//! Raising the SPEC's SQLSTATEs. pgrx turns panics into XX000, so every user-facing failure goes
//! through here with its own code, a message that names the argument, and a hint where one helps.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::fmt::Display;

pub fn raise(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message, "pg_apikeys");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// 22023: an argument has a value the function cannot use.
pub fn invalid_argument(arg: &str, problem: impl Display) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("argument \"{arg}\" {problem}"),
        None,
    )
}

pub fn invalid_argument_hint(arg: &str, problem: impl Display, hint: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("argument \"{arg}\" {problem}"),
        Some(hint),
    )
}

/// A caller's value as quoted in a message: hostile input can be a megabyte long.
pub fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

/// P0002: update/revoke/rotate of an id that does not exist.
pub fn key_not_found(id: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("API key \"{}\" does not exist", shown(id)),
        Some("apikeys.list_api_keys() shows the existing keys."),
    )
}

/// P0002: a signing key id that does not exist.
pub fn signing_key_not_found(kid: &str) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("signing key \"{}\" does not exist", shown(kid)),
        Some("apikeys.list_signing_keys() shows the signing keys."),
    )
}

/// SPI failures that no input can cause; reported rather than panicking.
pub fn internal<T, E: Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| internal_error(e))
}

/// XX000 for a state no input can cause (a damaged installation).
pub fn internal_error(problem: impl Display) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pg_apikeys internal error: {problem}"),
        None,
    )
}

/// The value of a checked argument, or 22023 naming it.
pub fn checked<T>(result: crate::settings::Checked<T>) -> T {
    result.unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("argument \"{}\" {}", e.arg, e.problem),
            e.hint,
        )
    })
}
