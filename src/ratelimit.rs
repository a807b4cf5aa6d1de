//! Standalone rate limits (SPEC §7): `apikeys.ratelimit(namespace, identifier, limit, duration)`
//! limits anything — an IP address, a user, a tenant — without a key. Each identifier's window
//! is a sliding window in the metering engine's shared memory (exact under any concurrency, no
//! row written, READ ONLY transactions welcome; a server restart reopens it). An override
//! (`set_ratelimit_override`) replaces the limit callers give for one identifier.

use crate::errors::{self, invalid_argument};
use crate::keys::{check_duration, interval, span};
use crate::metering::{Algorithm, Rate};
use crate::{audit, engine, plans, verify};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use serde_json::json;

/// Namespaces and identifiers are at most this long (an IPv6 address, a user id, a URL path).
const MAX_CHARS: usize = 256;

fn required_text(arg: &'static str, value: Option<String>) -> String {
    let value = value.unwrap_or_else(|| invalid_argument(arg, "must not be NULL"));
    let n = value.chars().count();
    if n == 0 || n > MAX_CHARS {
        invalid_argument(arg, format!("must be 1 to {MAX_CHARS} characters, got {n}"));
    }
    value
}

fn positive_limit(limit: Option<i32>) -> i32 {
    match limit {
        Some(l) if l > 0 => l,
        Some(l) => invalid_argument("limit", format!("must be greater than zero, got {l}")),
        None => invalid_argument("limit", "must not be NULL"),
    }
}

fn window(duration: Option<Interval>) -> Interval {
    let d = duration.unwrap_or_else(|| invalid_argument("duration", "must not be NULL"));
    check_duration("duration", d, false)
}

/// The override of (namespace, identifier), if one is set: (limit, duration).
fn override_of(namespace: &str, identifier: &str) -> Option<(i32, Interval)> {
    Spi::connect(|client| {
        let table = plans::select(
            client,
            "SELECT \"limit\", duration FROM apikeys.ratelimit_overrides
              WHERE namespace = $1 AND identifier = $2",
            Some(1),
            &[namespace.into(), identifier.into()],
        );
        if table.is_empty() {
            return None;
        }
        let row = table.first();
        Some((
            errors::internal(row.get::<i32>(1))?,
            errors::internal(row.get::<Interval>(2))?,
        ))
    })
}

/// Takes `cost` from the window of `identifier` in `namespace` if at most `limit` per
/// `duration` (sliding) allows it, else takes nothing: `success` says which. The override set
/// for the identifier, if any, replaces `limit` and `duration`. Needs the metering engine
/// (shared_preload_libraries); not executable by PUBLIC.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn ratelimit(
    namespace: Option<String>,
    identifier: Option<String>,
    limit: Option<i32>,
    duration: Option<Interval>,
    cost: default!(Option<i32>, 1),
) -> TableIterator<
    'static,
    (
        name!(success, bool),
        name!(limit, i32),
        name!(remaining, i64),
        name!(reset_at, Option<TimestampWithTimeZone>),
    ),
> {
    let namespace = required_text("namespace", namespace);
    let identifier = required_text("identifier", identifier);
    let (mut limit, mut duration) = (positive_limit(limit), window(duration));
    let cost = verify::checked_cost(cost);
    if let Some((l, d)) = override_of(&namespace, &identifier) {
        (limit, duration) = (l, d);
    }
    let w = engine::Window {
        id: engine::window_id(b'r', &[&namespace, &identifier]),
        created_us: 0,
        rate: Rate {
            max: i64::from(limit),
            window_us: i64::try_from(duration.as_micros())
                .unwrap_or(i64::MAX)
                .max(1),
            algorithm: Algorithm::Sliding,
        },
        cost,
    };
    let now_us = verify::epoch_us(verify::wall_clock());
    let state = engine::ratelimit(&w, now_us).unwrap_or_else(|_| {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "apikeys.ratelimit needs the metering engine".into(),
            Some("Add pg_apikeys to shared_preload_libraries (and restart)."),
        )
    });
    TableIterator::once((
        !state.exceeded,
        limit,
        state.remaining,
        state.reset_us.map(verify::from_epoch_us),
    ))
}

/// Sets the limit of one identifier of a namespace, replacing what `ratelimit` callers give.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn set_ratelimit_override(
    namespace: Option<String>,
    identifier: Option<String>,
    limit: Option<i32>,
    duration: Option<Interval>,
) -> bool {
    let namespace = required_text("namespace", namespace);
    let identifier = required_text("identifier", identifier);
    let (limit, duration) = (positive_limit(limit), window(duration));
    let duration = interval(span(duration));
    Spi::connect_mut(|client| {
        plans::update(
            client,
            "INSERT INTO apikeys.ratelimit_overrides (namespace, identifier, \"limit\", duration)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (namespace, identifier) DO UPDATE
                SET \"limit\" = excluded.\"limit\", duration = excluded.duration,
                    updated_at = clock_timestamp()",
            None,
            &[
                namespace.as_str().into(),
                identifier.as_str().into(),
                limit.into(),
                duration.into(),
            ],
        );
        audit::record(
            client,
            "set_ratelimit_override",
            None,
            json!({"namespace": namespace, "identifier": identifier, "limit": limit}),
        );
        true
    })
}

/// Removes the override of one identifier; false if it had none.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn delete_ratelimit_override(namespace: Option<String>, identifier: Option<String>) -> bool {
    let namespace = required_text("namespace", namespace);
    let identifier = required_text("identifier", identifier);
    Spi::connect_mut(|client| {
        let gone = plans::update(
            client,
            "DELETE FROM apikeys.ratelimit_overrides WHERE namespace = $1 AND identifier = $2
             RETURNING 1",
            None,
            &[namespace.as_str().into(), identifier.as_str().into()],
        );
        let deleted = !gone.is_empty();
        if deleted {
            audit::record(
                client,
                "delete_ratelimit_override",
                None,
                json!({"namespace": namespace, "identifier": identifier}),
            );
        }
        deleted
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    fn limit(identifier: &str, args: &str) -> String {
        one::<String>(&format!(
            "SELECT success || ':' || \"limit\" || ':' || remaining
               FROM apikeys.ratelimit('login', '{identifier}', {args})"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn a_standalone_limit_counts_per_identifier() {
        assert_eq!(limit("10.0.0.1", "3, '1 hour'"), "true:3:2");
        assert_eq!(limit("10.0.0.1", "3, '1 hour', 2"), "true:3:0");
        assert_eq!(limit("10.0.0.1", "3, '1 hour'"), "false:3:0");
        // Another identifier, another window; cost 0 takes nothing.
        assert_eq!(limit("10.0.0.2", "3, '1 hour', 0"), "true:3:3");
        assert_eq!(limit("10.0.0.2", "3, '1 hour'"), "true:3:2");
        assert_eq!(
            one::<bool>(
                "SELECT reset_at > clock_timestamp() FROM apikeys.ratelimit('login', '10.0.0.3', 1, '1 minute')"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn an_override_replaces_the_callers_limit() {
        run("SELECT apikeys.set_ratelimit_override('login', 'vip', 5, '1 hour')");
        assert_eq!(limit("vip", "1, '1 hour'"), "true:5:4");
        run("SELECT apikeys.set_ratelimit_override('login', 'vip', 2, '1 hour')");
        assert_eq!(limit("vip", "1, '1 hour'"), "true:2:0");
        assert_eq!(limit("vip", "1, '1 hour'"), "false:2:0");
        assert_eq!(
            one::<bool>("SELECT apikeys.delete_ratelimit_override('login', 'vip')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT apikeys.delete_ratelimit_override('login', 'vip')"),
            Some(false)
        );
        assert_eq!(limit("vip", "10, '1 hour'"), "true:10:7");
        assert_eq!(
            one::<String>(
                "SELECT string_agg(action, ',' ORDER BY id) FROM apikeys.audit_log WHERE action LIKE '%override'"
            )
            .as_deref(),
            Some("set_ratelimit_override,set_ratelimit_override,delete_ratelimit_override")
        );
    }

    #[pg_test]
    fn standalone_limit_arguments_are_checked() {
        for (args, arg) in [
            ("NULL, 'x', 1, '1 s'", "\"namespace\""),
            ("'n', '', 1, '1 s'", "\"identifier\""),
            ("'n', 'x', 0, '1 s'", "\"limit\""),
            ("'n', 'x', 1, '0 s'", "\"duration\""),
            ("'n', 'x', 1, '1 s', -1", "\"cost\""),
        ] {
            assert_error(&format!("SELECT apikeys.ratelimit({args})"), "22023", arg);
        }
        assert_error(
            "SELECT apikeys.set_ratelimit_override('n', 'x', -1, '1 s')",
            "22023",
            "\"limit\"",
        );
    }
}
