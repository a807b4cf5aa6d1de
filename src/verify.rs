//! verify_key: the hot path. Checks run in the SPEC's order (NOT_FOUND, EXPIRED, DISABLED,
//! REVOKED, USAGE_EXCEEDED, RATE_LIMITED, INSUFFICIENT_PERMISSIONS) and only a VALID result
//! consumes anything. Keys with a quota or rate limit are re-read `FOR UPDATE`, so concurrent
//! callers queue on the row and exactly `remaining` of them succeed.

use crate::errors::{self, invalid_argument};
use crate::{key_format, permissions};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiHeapTupleData, SpiResult};
use pgrx::JsonB;
use serde_json::Value;

pub type VerificationRow = pgrx::composite_type!('static, "apikeys.verification");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Valid,
    NotFound,
    Expired,
    Disabled,
    Revoked,
    UsageExceeded,
    RateLimited,
    InsufficientPermissions,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Valid => "VALID",
            Code::NotFound => "NOT_FOUND",
            Code::Expired => "EXPIRED",
            Code::Disabled => "DISABLED",
            Code::Revoked => "REVOKED",
            Code::UsageExceeded => "USAGE_EXCEEDED",
            Code::RateLimited => "RATE_LIMITED",
            Code::InsufficientPermissions => "INSUFFICIENT_PERMISSIONS",
        }
    }
}

/// What a verification found; becomes an `apikeys.verification` row.
#[derive(Debug)]
pub struct Verification {
    pub code: Code,
    pub key_id: Option<String>,
    pub owner: Option<String>,
    pub name: Option<String>,
    pub role: Option<String>,
    pub permissions: Option<Value>,
    pub metadata: Option<Value>,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub remaining: Option<i64>,
    pub rate_limit_remaining: Option<i64>,
    pub rate_limit_reset: Option<TimestampWithTimeZone>,
    pub claims: Option<Value>,
}

impl Verification {
    pub fn not_found() -> Self {
        Verification {
            code: Code::NotFound,
            key_id: None,
            owner: None,
            name: None,
            role: None,
            permissions: None,
            metadata: None,
            expires_at: None,
            remaining: None,
            rate_limit_remaining: None,
            rate_limit_reset: None,
            claims: None,
        }
    }

    pub fn into_row(self) -> VerificationRow {
        let mut row = errors::internal(PgHeapTuple::new_composite_type("apikeys.verification"));
        errors::internal((|| -> Result<(), pgrx::datum::TryFromDatumError> {
            row.set_by_name("valid", self.code == Code::Valid)?;
            row.set_by_name("code", self.code.as_str())?;
            row.set_by_name("key_id", self.key_id)?;
            row.set_by_name("owner", self.owner)?;
            row.set_by_name("name", self.name)?;
            row.set_by_name("role", self.role)?;
            row.set_by_name("permissions", self.permissions.map(JsonB))?;
            row.set_by_name("metadata", self.metadata.map(JsonB))?;
            row.set_by_name("expires_at", self.expires_at)?;
            row.set_by_name("remaining", self.remaining)?;
            row.set_by_name("rate_limit_remaining", self.rate_limit_remaining)?;
            row.set_by_name("rate_limit_reset", self.rate_limit_reset)?;
            row.set_by_name("claims", self.claims.map(JsonB))?;
            Ok(())
        })());
        row
    }
}

/// A key's row as verification needs it, with time comparisons done by PostgreSQL against one
/// `clock_timestamp()` so interval arithmetic (months, DST) is PostgreSQL's own.
struct KeyState {
    id: String,
    owner: Option<String>,
    name: Option<String>,
    role: Option<String>,
    permissions: Value,
    metadata: Option<Value>,
    enabled: bool,
    revoked: bool,
    expired: bool,
    expires_at: Option<TimestampWithTimeZone>,
    remaining: Option<i64>,
    refill_amount: Option<i64>,
    refill_due: bool,
    rate_limit_max: Option<i32>,
    window_over: bool,
    window_count: i64,
    window_end: Option<TimestampWithTimeZone>,
}

const STATE_SQL: &str = "SELECT k.id, k.owner, k.name, k.role, k.permissions, k.metadata, k.enabled,
        k.revoked_at IS NOT NULL,
        k.expires_at <= c.now OR (k.hash <> $1 AND k.previous_valid_until <= c.now),
        CASE WHEN k.hash = $1 THEN k.expires_at ELSE LEAST(k.expires_at, k.previous_valid_until) END,
        k.remaining, k.refill_amount,
        COALESCE(k.last_refill_at + k.refill_interval <= c.now, false),
        k.rate_limit_max,
        k.rate_window_start IS NULL OR k.rate_window_start + k.rate_limit_window <= c.now,
        k.rate_window_count,
        CASE WHEN k.rate_window_start IS NULL OR k.rate_window_start + k.rate_limit_window <= c.now
             THEN c.now + k.rate_limit_window ELSE k.rate_window_start + k.rate_limit_window END
    FROM apikeys.keys k, LATERAL (SELECT clock_timestamp() AS now) c";

impl KeyState {
    fn from_row(row: &SpiHeapTupleData<'_>) -> SpiResult<KeyState> {
        Ok(KeyState {
            id: row.get::<String>(1)?.unwrap_or_default(),
            owner: row.get(2)?,
            name: row.get(3)?,
            role: row.get(4)?,
            permissions: row.get::<JsonB>(5)?.map(|j| j.0).unwrap_or(Value::Null),
            metadata: row.get::<JsonB>(6)?.map(|j| j.0),
            enabled: row.get(7)?.unwrap_or(false),
            revoked: row.get(8)?.unwrap_or(true),
            expired: row.get(9)?.unwrap_or(false),
            expires_at: row.get(10)?,
            remaining: row.get(11)?,
            refill_amount: row.get(12)?,
            refill_due: row.get(13)?.unwrap_or(false),
            rate_limit_max: row.get(14)?,
            window_over: row.get(15)?.unwrap_or(true),
            window_count: row.get(16)?.unwrap_or(0),
            window_end: row.get(17)?,
        })
    }

    fn limited(&self) -> bool {
        self.remaining.is_some() || self.rate_limit_max.is_some()
    }

    /// The checks that need no counters, in the SPEC's order.
    fn status_code(&self) -> Option<Code> {
        if self.expired {
            Some(Code::Expired)
        } else if !self.enabled {
            Some(Code::Disabled)
        } else if self.revoked {
            Some(Code::Revoked)
        } else {
            None
        }
    }

    fn verification(&self, code: Code) -> Verification {
        Verification {
            code,
            key_id: Some(self.id.clone()),
            owner: self.owner.clone(),
            name: self.name.clone(),
            role: self.role.clone(),
            permissions: Some(self.permissions.clone()),
            metadata: self.metadata.clone(),
            expires_at: self.expires_at,
            remaining: self.remaining,
            rate_limit_remaining: None,
            rate_limit_reset: None,
            claims: None,
        }
    }
}

fn fetch(client: &mut SpiClient<'_>, sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Option<KeyState> {
    let table = errors::internal(client.update(sql, Some(1), args));
    if table.is_empty() {
        return None;
    }
    let row = errors::internal(table.first().get_heap_tuple()).map(|t| KeyState::from_row(&t));
    row.map(errors::internal)
}

fn read_only() -> bool {
    unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() }
}

/// Verifies a key string: see the module comment for the order of checks.
pub fn verify(key: Option<&str>, required: &permissions::Permissions, cost: i64) -> Verification {
    let Some(key) = key.filter(|k| key_format::parse(k).is_some()) else {
        return Verification::not_found();
    };
    let hash = key_format::hash(key);
    Spi::connect_mut(|client| {
        let by_hash = |client: &mut SpiClient<'_>, column: &str, lock: &str| {
            fetch(
                client,
                &format!("{STATE_SQL} WHERE k.{column} = $1 {lock}"),
                &[hash.as_slice().into()],
            )
        };
        let Some(mut state) =
            by_hash(client, "hash", "").or_else(|| by_hash(client, "previous_hash", ""))
        else {
            return Verification::not_found();
        };
        if let Some(code) = state.status_code() {
            return state.verification(code);
        }
        if !state.limited() {
            let code = if permissions_cover(&state, required) { Code::Valid } else { Code::InsufficientPermissions };
            if code == Code::Valid && !read_only() {
                record_use(client, &state.id);
            }
            return state.verification(code);
        }
        if read_only() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
                format!("API key \"{}\" has a quota or rate limit and cannot be verified in a read-only transaction", state.id),
                Some("Verify keys with a quota or rate limit on the primary, in a read-write transaction."),
            );
        }
        // Lock the row and re-read it: another session may have spent, refilled, revoked or
        // rotated the key since the first read.
        let locked = fetch(
            client,
            &format!("{STATE_SQL} WHERE k.id = $2 AND (k.hash = $1 OR k.previous_hash = $1) FOR UPDATE OF k"),
            &[hash.as_slice().into(), state.id.as_str().into()],
        );
        let Some(locked) = locked else { return Verification::not_found() };
        state = locked;
        if let Some(code) = state.status_code() {
            return state.verification(code);
        }
        spend(client, &state, required, cost)
    })
}

fn permissions_cover(state: &KeyState, required: &permissions::Permissions) -> bool {
    if required.is_empty() {
        return true;
    }
    let granted = permissions::parse(&state.permissions).unwrap_or_default();
    permissions::covers(&granted, required)
}

/// Quota, refill and rate limit for a locked row; writes only when the result is VALID.
fn spend(client: &mut SpiClient<'_>, state: &KeyState, required: &permissions::Permissions, cost: i64) -> Verification {
    let remaining = if state.refill_due { state.refill_amount } else { state.remaining };
    let window_count = if state.window_over { 0 } else { state.window_count };
    let code = if remaining.is_some_and(|r| r < cost) {
        Code::UsageExceeded
    } else if state.rate_limit_max.is_some_and(|max| window_count + cost > i64::from(max)) {
        Code::RateLimited
    } else if !permissions_cover(state, required) {
        Code::InsufficientPermissions
    } else {
        Code::Valid
    };
    let consumed = if code == Code::Valid { cost } else { 0 };
    let mut result = state.verification(code);
    result.remaining = remaining.map(|r| r - consumed);
    if let Some(max) = state.rate_limit_max {
        let used = window_count + consumed;
        result.rate_limit_remaining = Some((i64::from(max) - used).max(0));
        result.rate_limit_reset = if state.window_over && consumed == 0 { None } else { state.window_end };
    }
    if code == Code::Valid {
        errors::internal(client.update(
            "UPDATE apikeys.keys SET
                remaining = $2,
                last_refill_at = CASE WHEN $3 THEN clock_timestamp() ELSE last_refill_at END,
                rate_window_start = CASE WHEN rate_limit_max IS NULL THEN NULL
                                         WHEN $4 THEN clock_timestamp() ELSE rate_window_start END,
                rate_window_count = CASE WHEN rate_limit_max IS NULL THEN 0 ELSE $5 END,
                request_count = request_count + 1,
                last_used_at = clock_timestamp()
             WHERE id = $1",
            None,
            &[
                state.id.as_str().into(),
                result.remaining.into(),
                state.refill_due.into(),
                state.window_over.into(),
                (window_count + consumed).into(),
            ],
        ));
    }
    result
}

/// Usage of a key without limits. It must never make verification wait, so a row that another
/// transaction holds is skipped rather than waited for (the count is then approximate).
fn record_use(client: &mut SpiClient<'_>, id: &str) {
    errors::internal(client.update(
        "UPDATE apikeys.keys SET request_count = request_count + 1, last_used_at = clock_timestamp()
         WHERE id = (SELECT id FROM apikeys.keys WHERE id = $1 FOR UPDATE SKIP LOCKED)",
        None,
        &[id.into()],
    ));
}

/// Parses `required` for verify_key and friends: NULL means nothing is required.
pub fn required_permissions(required: Option<JsonB>) -> permissions::Permissions {
    match required {
        None => permissions::Permissions::new(),
        Some(JsonB(value)) => permissions::parse(&value).unwrap_or_else(|problem| {
            invalid_argument("required", problem)
        }),
    }
}

pub fn checked_cost(cost: Option<i32>) -> i64 {
    match cost {
        None => 1,
        Some(c) if c < 0 => invalid_argument("cost", format!("must not be negative, got {c}")),
        Some(c) => i64::from(c),
    }
}

/// Verifies an API key. Never raises for a bad key: the result says `valid = false` and why.
/// `required` lists permissions the key must grant; `cost` is taken from its quota and rate
/// limit when (and only when) the result is VALID.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn verify_key(
    key: Option<&str>,
    required: default!(Option<JsonB>, "NULL"),
    cost: default!(Option<i32>, 1),
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let required = required_permissions(required);
    verify(key, &required, checked_cost(cost)).into_row()
}
