//! verify_key: the hot path. Checks run in the SPEC's order (NOT_FOUND, EXPIRED, DISABLED,
//! REVOKED, FORBIDDEN, USAGE_EXCEEDED, RATE_LIMITED, INSUFFICIENT_PERMISSIONS) and only a VALID result
//! consumes anything. Keys with a quota or rate limit are re-read `FOR UPDATE`, so concurrent
//! callers queue on the row and exactly `remaining` of them succeed.

use crate::addresses::Client;
use crate::errors::{self, invalid_argument};
use crate::jsonb::{self, Jsonb};
use crate::lookup;
use crate::metering::{self, Charge, Verdict};
use crate::plans;
use crate::{key_format, permissions};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::{SpiHeapTupleData, SpiResult};

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
    Forbidden,
}

impl Code {
    /// Every code, in the check order (VALID first): a code's index here is its number in
    /// shared memory (analytics).
    pub const ALL: [Code; 9] = [
        Code::Valid,
        Code::NotFound,
        Code::Expired,
        Code::Disabled,
        Code::Revoked,
        Code::Forbidden,
        Code::UsageExceeded,
        Code::RateLimited,
        Code::InsufficientPermissions,
    ];

    pub fn number(self) -> u8 {
        Code::ALL.iter().position(|c| *c == self).unwrap_or(0) as u8
    }

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
            Code::Forbidden => "FORBIDDEN",
        }
    }

    /// What a key's administrator can do about a refused key, for error HINTs.
    pub fn hint(self) -> Option<&'static str> {
        match self {
            Code::Valid | Code::NotFound => None,
            Code::Expired => Some("Extend the key with apikeys.update_api_key(id, expires_in => …), or rotate it."),
            Code::Disabled => Some("Enable the key with apikeys.update_api_key(id, enabled => true)."),
            Code::Revoked => Some("A revoked key stays revoked: create a new one."),
            Code::UsageExceeded => Some("Raise the quota with apikeys.update_api_key(id, remaining => …), or wait for its refill."),
            Code::RateLimited => Some("Retry when the window ends (rate_limit_reset in verify_key's result)."),
            Code::InsufficientPermissions => Some("Grant the missing permissions with apikeys.update_api_key(id, permissions => …)."),
            Code::Forbidden => Some("Call from an address in the key's (and its identity's) allowed_cidrs, or change them with apikeys.update_api_key(id, allowed_cidrs => …)."),
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
    pub permissions: Option<Jsonb>,
    pub metadata: Option<Jsonb>,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub remaining: Option<i64>,
    pub rate_limit_remaining: Option<i64>,
    pub rate_limit_reset: Option<TimestampWithTimeZone>,
    pub claims: Option<Jsonb>,
    /// One object per rate limit the call applied (SPEC §7), and which level refused it.
    pub ratelimits: Vec<crate::limits::Report>,
    pub limited_by: Option<&'static str>,
    pub identity_remaining: Option<i64>,
    /// When the key's quota refills next (None without refill).
    pub next_refill_at: Option<TimestampWithTimeZone>,
    /// Not in the SQL result: when a refused call can succeed (the refusing window's end, the
    /// refusing quota's refill), for HTTP's Retry-After.
    pub retry_at_us: Option<i64>,
    /// Not in the SQL result: what minting needs to know about the key it judged.
    pub master: bool,
    pub now: Option<TimestampWithTimeZone>,
    pub created_us: i64,
    /// Not in the SQL result: counted for analytics already, in the key's entry of the metering
    /// engine (`engine::record_use`), so `analytics::count` leaves it.
    pub tallied: bool,
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
            ratelimits: Vec::new(),
            limited_by: None,
            identity_remaining: None,
            next_refill_at: None,
            retry_at_us: None,
            master: false,
            now: None,
            created_us: 0,
            tallied: false,
        }
    }

    pub fn into_row(self) -> VerificationRow {
        // One heap_form_tuple from a cached type oid: building it by name (regtypein parses the
        // name with the SQL grammar) and field by field was a fifth of a cheap verification.
        let datums = [
            (self.code == Code::Valid).into_datum(),
            self.code.as_str().into_datum(),
            self.key_id.into_datum(),
            self.owner.into_datum(),
            self.name.into_datum(),
            self.role.into_datum(),
            self.permissions.map(|p| p.datum()),
            self.metadata.map(|m| m.datum()),
            self.expires_at.into_datum(),
            self.remaining.into_datum(),
            self.rate_limit_remaining.into_datum(),
            self.rate_limit_reset.into_datum(),
            self.claims.map(|c| c.datum()),
            Some(ratelimits_jsonb(self.ratelimits).datum()),
            self.limited_by.into_datum(),
            self.identity_remaining.into_datum(),
            self.next_refill_at.into_datum(),
        ];
        let tupdesc = pgrx::PgTupleDesc::for_composite_type_by_oid(verification_type())
            .unwrap_or_else(|| {
                errors::internal(Err("apikeys.verification is not a composite type"))
            });
        // Before ALTER EXTENSION … UPDATE the type has only the attributes of its version.
        let natts = tupdesc.len();
        // SAFETY: the datums are, in order, of the types of apikeys.verification's attributes.
        errors::internal(unsafe {
            PgHeapTuple::from_datums(tupdesc, datums.into_iter().take(natts))
        })
    }
}

thread_local! {
    /// `[]` as jsonb, encoded once: most verifications apply no named limit.
    static NO_LIMITS: Jsonb = Jsonb::encode(&serde_json::json!([]));
}

fn ratelimits_jsonb(limits: Vec<crate::limits::Report>) -> Jsonb {
    use crate::jsonb::Scalar;
    if limits.is_empty() {
        return NO_LIMITS.with(Jsonb::clone);
    }
    let resets: Vec<Option<String>> = limits
        .iter()
        .map(|r| r.reset_us.map(crate::durations::iso8601))
        .collect();
    let objects: Vec<Vec<(&str, Scalar<'_>)>> = limits
        .iter()
        .zip(&resets)
        .map(|(r, reset_at)| {
            vec![
                ("name", Scalar::Str(&r.name)),
                ("level", Scalar::Str(r.level.as_str())),
                ("limit", Scalar::Int(r.limit)),
                ("remaining", Scalar::Int(r.remaining)),
                (
                    "reset_at",
                    reset_at.as_deref().map_or(Scalar::Null, Scalar::Str),
                ),
                ("exceeded", Scalar::Bool(r.exceeded)),
            ]
        })
        .collect();
    Jsonb::array_of_objects(&objects)
}

/// What a verification asks for: the permissions it requires, its cost, and the named rate
/// limits it applies (with their costs).
pub struct Request {
    pub required: permissions::Query,
    pub cost: i64,
    pub ratelimits: Vec<(String, i64)>,
    /// Whose address allow-lists are checked against (SPEC §8).
    pub client: Client,
    /// Whether the verification is counted for analytics (`counted`): every SQL verification,
    /// not the one minting does.
    pub counted: bool,
}

impl Request {
    /// Nothing required, cost `cost`, no named limit.
    pub fn plain(cost: i64) -> Request {
        Request {
            required: permissions::Query::nothing(),
            cost,
            ratelimits: Vec::new(),
            client: Client::Unchecked,
            counted: false,
        }
    }

    /// From the SQL arguments; 22023 naming a bad one.
    pub fn from_args(
        required: Option<Jsonb>,
        cost: Option<i32>,
        ratelimits: Option<Jsonb>,
        client: Client,
    ) -> Request {
        let ratelimits = match jsonb::argument("ratelimits", ratelimits) {
            None => Vec::new(),
            Some(value) => crate::limits::parse_selection(&value)
                .unwrap_or_else(|problem| invalid_argument("ratelimits", problem)),
        };
        Request {
            required: required_permissions(required),
            cost: checked_cost(cost),
            ratelimits,
            client,
            counted: true,
        }
    }
}

thread_local! {
    static VERIFICATION_TYPE: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// The oid of `apikeys.verification`, looked up once per backend (again if the extension was
/// dropped and created since).
fn verification_type() -> pg_sys::Oid {
    VERIFICATION_TYPE.with(|cached| {
        let oid = cached.get();
        // SAFETY: a syscache lookup by OID; an OID that no longer names a type gives InvalidOid.
        let still_a_row_type = unsafe { pg_sys::get_typ_typrelid(oid) } != pg_sys::InvalidOid;
        if oid != pg_sys::InvalidOid && still_a_row_type {
            return oid;
        }
        let schema = crate::catalog::schema();
        // SAFETY: a syscache lookup by name (a C string) and namespace OID, in a transaction.
        let oid = unsafe {
            pg_sys::GetSysCacheOid(
                pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
                pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
                pg_sys::Datum::from(c"verification".as_ptr()),
                pg_sys::Datum::from(schema),
                pg_sys::Datum::from(0),
                pg_sys::Datum::from(0),
            )
        };
        cached.set(oid);
        oid
    })
}

/// A key's row as verification needs it, judged at one wall-clock reading.
struct KeyState {
    id: String,
    owner: Option<String>,
    name: Option<String>,
    role: Option<String>,
    permissions: Jsonb,
    metadata: Option<Jsonb>,
    master: bool,
    enabled: bool,
    revoked: bool,
    expired: bool,
    expires_at: Option<TimestampWithTimeZone>,
    remaining: Option<i64>,
    config: Config,
    meter_version: i64,
    updater: Option<pg_sys::TransactionId>,
    now: TimestampWithTimeZone,
    /// Tells this key from a later one created with the same id after it was deleted.
    created_us: i64,
    /// Its named rate limits (SPEC §7).
    named: Vec<crate::limits::NamedLimit>,
    /// The identity its owner names, and that identity as read for this call (`with_identity`).
    identity_id: Option<i64>,
    identity: Option<crate::identities::IdentityState>,
    /// The networks it may be verified from (None: anywhere).
    allowed: Option<Vec<crate::network::Cidr>>,
}

/// A key's limits as its row says now (a management change applies from the next call).
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    pub quota: bool,
    pub refill_amount: Option<i64>,
    pub refill_interval: Option<pgrx::datum::Interval>,
    /// A calendar refill (daily or monthly at 00:00 UTC), instead of every refill_interval.
    pub calendar: Option<crate::refills::Schedule>,
    pub rate: Option<metering::Rate>,
}

impl Config {
    fn of(row: &lookup::KeyRow) -> Config {
        let rate = row
            .rate_limit_max
            .zip(row.rate_limit_window)
            .map(|(max, window)| metering::Rate {
                max: i64::from(max),
                window_us: i64::try_from(window.as_micros()).unwrap_or(i64::MAX).max(1),
                algorithm: row
                    .rate_limit_algorithm
                    .as_deref()
                    .and_then(metering::Algorithm::parse)
                    .unwrap_or_default(),
            });
        Config {
            quota: row.remaining.is_some() || row.refill_amount.is_some(),
            refill_amount: row.refill_amount,
            refill_interval: row.refill_interval,
            calendar: calendar_of(
                row.refill_interval,
                row.refill_day,
                row.refill_schedule.as_deref(),
            ),
            rate,
        }
    }

    /// When a refill that is due now is followed by the next one.
    pub fn next_refill_after(&self, now_us: i64) -> i64 {
        if let Some(at) = self.calendar.and_then(|c| c.next_calendar(now_us)) {
            return at;
        }
        self.refill_interval.map_or(i64::MAX, |interval| {
            crate::engine::add_interval(now_us, interval)
        })
    }

    pub fn limits(&self, refill_due: bool) -> metering::Limits {
        metering::Limits {
            refill_amount: self.refill_amount,
            refill_due: refill_due && self.refill_amount.is_some(),
            rate: self.rate,
            rate_cost: None,
        }
    }
}

/// The calendar schedule of stored refill columns; None for a rolling interval (or none).
pub fn calendar_of(
    interval: Option<pgrx::datum::Interval>,
    day: Option<i32>,
    schedule: Option<&str>,
) -> Option<crate::refills::Schedule> {
    crate::refills::Schedule::from_columns(
        interval.map(crate::keys::span),
        day,
        schedule.unwrap_or("interval"),
    )
    .filter(|s| !matches!(s, crate::refills::Schedule::Every(_)))
}

impl KeyState {
    /// The state of a row read by `lookup` (no lock).
    fn from_lookup(
        row: lookup::KeyRow,
        presented: Option<&[u8]>,
        now: TimestampWithTimeZone,
    ) -> KeyState {
        let at_or_before_now = |t: Option<TimestampWithTimeZone>| t.is_some_and(|t| t <= now);
        // Presented by its rotated-out hash: valid only until previous_valid_until.
        let via_previous = presented.is_some_and(|h| h != row.hash.as_slice());
        let expires_at = match (via_previous, row.expires_at, row.previous_valid_until) {
            (true, Some(key_end), Some(old_end)) => Some(key_end.min(old_end)),
            (true, None, old_end) => old_end,
            (_, key_end, _) => key_end,
        };
        KeyState {
            expired: at_or_before_now(row.expires_at)
                || (via_previous && at_or_before_now(row.previous_valid_until)),
            config: Config::of(&row),
            id: row.id,
            owner: row.owner,
            name: row.name,
            role: row.role,
            permissions: row.permissions,
            metadata: row.metadata,
            master: row.master,
            enabled: row.enabled,
            revoked: row.revoked,
            expires_at,
            remaining: row.remaining,
            meter_version: row.meter_version,
            updater: row.updater,
            now,
            created_us: row.created_at.map_or(0, epoch_us),
            named: row
                .ratelimits
                .map(|r| crate::limits::from_stored(&r.value()))
                .unwrap_or_default(),
            identity_id: row.identity_id,
            identity: None,
            allowed: crate::addresses::parse_list(row.allowed_cidrs),
        }
    }

    /// Reads the key's identity, if it has one (only keys whose owner names one pay for it).
    fn with_identity(mut self) -> KeyState {
        self.identity = self.identity_id.and_then(crate::identities::read_identity);
        self
    }

    fn limited(&self, windows: &[crate::engine::Window]) -> bool {
        self.config.quota
            || self.config.rate.is_some()
            || !windows.is_empty()
            || self.identity_quota().is_some()
    }

    /// The identity, when it has a quota its keys share.
    fn identity_quota(&self) -> Option<&crate::identities::IdentityState> {
        self.identity.as_ref().filter(|i| i.config.quota)
    }

    /// The limits `request` applies to this key: its `default` limit (in its own counters) at
    /// the cost it takes, and the windows of its named limits. 22023 for a name it lacks.
    fn applied(&self, request: &Request) -> (Option<i64>, Vec<crate::limits::Applied>) {
        let algorithm = self
            .config
            .rate
            .map_or(metering::Algorithm::Sliding, |r| r.algorithm);
        let (identity_named, identity_algorithm) = self
            .identity
            .as_ref()
            .map_or((&[][..], algorithm), |i| (&i.named[..], i.algorithm));
        let applied = crate::limits::select(
            &self.named,
            identity_named,
            self.config.rate,
            (algorithm, identity_algorithm),
            &request.ratelimits,
            request.cost,
        )
        .unwrap_or_else(|problem| invalid_argument("ratelimits", problem));
        let default_cost = applied
            .iter()
            .find(|a| a.name == crate::limits::DEFAULT && a.level == crate::limits::Level::Key)
            .map(|a| a.cost)
            .filter(|c| *c != request.cost);
        let named = applied
            .into_iter()
            .filter(|a| !(a.name == crate::limits::DEFAULT && a.level == crate::limits::Level::Key))
            .collect();
        (default_cost, named)
    }

    /// The shared-memory windows of `applied` limits of this key.
    fn windows(&self, applied: &[crate::limits::Applied]) -> Vec<crate::engine::Window> {
        applied
            .iter()
            .map(|a| {
                let (id, created_us) = match (a.level, &self.identity) {
                    (crate::limits::Level::Identity, Some(i)) => (
                        crate::engine::window_id(b'i', &[&i.id.to_string(), &a.name]),
                        i.created_us,
                    ),
                    _ => (
                        crate::engine::window_id(b'k', &[&self.id, &a.name]),
                        self.created_us,
                    ),
                };
                crate::engine::Window {
                    id,
                    created_us,
                    rate: a.rate,
                    cost: a.cost,
                }
            })
            .collect()
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

    /// The checks that need no counters, FORBIDDEN included (SPEC §8: after REVOKED): the key's
    /// allow-list and, once read (`with_identity`), its identity's must both let the client in.
    fn refusal(&self, client: Client) -> Option<Code> {
        self.status_code().or_else(|| {
            let identity = self.identity.as_ref().and_then(|i| i.allowed.as_deref());
            let allowed = client.allowed_by(self.allowed.as_deref()) && client.allowed_by(identity);
            (!allowed).then_some(Code::Forbidden)
        })
    }

    fn is_the_key_of(&self, token: Option<&Token>) -> bool {
        token.is_none_or(|t| t.key_created_us == self.created_us)
    }

    /// A token lives no longer than its key: its expiry joins the key's.
    fn bound_by(&mut self, token: Option<&Token>) {
        let Some(token) = token else { return };
        let now_ms = epoch_ms(self.now);
        self.expired |= now_ms >= token.exp_ms;
        let token_end = from_epoch_ms(token.exp_ms);
        self.expires_at = Some(match self.expires_at {
            Some(key_end) if key_end < token_end => key_end,
            _ => token_end,
        });
    }

    /// What the credential may do: the key's permissions, and for a token only what both the
    /// token and its key grant now (a key widened after minting does not widen its tokens).
    fn effective_permissions(&self, token: Option<&Token>) -> Jsonb {
        match token {
            None => self.permissions.clone(),
            Some(t) if t.granted.same_bytes(&self.permissions) => self.permissions.clone(),
            Some(t) => {
                let key = permissions::parse(&self.permissions.value()).unwrap_or_default();
                Jsonb::encode(&permissions::to_json(&permissions::intersect(
                    &key,
                    &t.permissions,
                )))
            }
        }
    }

    fn verification(&self, code: Code, token: Option<&Token>) -> Verification {
        Verification {
            code,
            key_id: Some(self.id.clone()),
            owner: self.owner.clone(),
            name: self.name.clone(),
            role: self.role.clone(),
            permissions: Some(self.effective_permissions(token)),
            metadata: self.metadata.clone(),
            expires_at: self.expires_at,
            remaining: self.remaining,
            rate_limit_remaining: None,
            rate_limit_reset: None,
            claims: token.map(|t| t.claims.clone()),
            ratelimits: Vec::new(),
            limited_by: None,
            identity_remaining: None,
            next_refill_at: None,
            retry_at_us: None,
            master: self.master,
            now: Some(self.now),
            created_us: self.created_us,
            tallied: false,
        }
    }
}

/// Microseconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub fn epoch_us(t: TimestampWithTimeZone) -> i64 {
    t.into_inner().saturating_add(PG_EPOCH_OFFSET_US)
}

pub fn epoch_ms(t: TimestampWithTimeZone) -> i64 {
    epoch_us(t).div_euclid(1000)
}

pub fn from_epoch_ms(ms: i64) -> TimestampWithTimeZone {
    from_epoch_us(ms.saturating_mul(1000))
}

pub fn from_epoch_us(epoch_us: i64) -> TimestampWithTimeZone {
    let us = epoch_us.saturating_sub(PG_EPOCH_OFFSET_US);
    TimestampWithTimeZone::try_from(us).unwrap_or_else(|_| {
        if us < 0 {
            TimestampWithTimeZone::negative_infinity()
        } else {
            TimestampWithTimeZone::positive_infinity()
        }
    })
}

/// What a signed, unexpired-by-signature token contributes to the judgement of its key.
pub struct Token {
    pub key_id: String,
    /// The `key_created_us` claim: a token outlives neither its key's deletion nor a new key
    /// that reuses the id.
    pub key_created_us: i64,
    pub exp_ms: i64,
    pub permissions: permissions::Permissions,
    /// `permissions` as jsonb, encoded once per token: while the key still has exactly these
    /// permissions (the usual case), they are the token's effective ones as they are.
    pub granted: Jsonb,
    pub claims: Jsonb,
}

/// How the caller names the key: by the secret (verify_key) or by id (a token's `key_id`).
pub enum Lookup<'a> {
    Secret(&'a str),
    Id(&'a str),
}

fn read_only() -> bool {
    // SAFETY: reads of the transaction's and the server's state.
    unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() }
}

/// Verifies a key string: see the module comment for the order of checks.
pub fn verify(key: Option<&str>, request: &Request) -> Verification {
    // Typos and impossible strings never reach the table.
    match key.filter(|k| key_format::classify(k) != key_format::Shape::Invalid) {
        Some(key) => judge(Lookup::Secret(key), request, None),
        None => Verification::not_found(),
    }
}

/// A key's state from its index, judged at the wall clock.
fn read(by: lookup::By<'_>, presented: Option<&[u8]>) -> Option<KeyState> {
    lookup::find(by).map(|row| KeyState::from_lookup(row, presented, wall_clock()))
}

/// The wall clock (clock_timestamp()): expiry is judged at the moment of the call.
pub fn wall_clock() -> TimestampWithTimeZone {
    // SAFETY: reads the system clock; no state involved.
    TimestampWithTimeZone::try_from(unsafe { pg_sys::GetCurrentTimestamp() })
        .unwrap_or_else(|_| TimestampWithTimeZone::negative_infinity())
}

/// A key's status by id, without permissions, quota or rate limit and without charging it.
pub fn peek(id: &str) -> Verification {
    match read(lookup::By::Id(id), None) {
        Some(state) => state.verification(state.status_code().unwrap_or(Code::Valid), None),
        None => Verification::not_found(),
    }
}

/// Looks the key up and runs every check on it; with `token`, the token's expiry and
/// permissions bind too. Only a VALID result consumes `cost`.
pub fn judge(lookup: Lookup<'_>, request: &Request, token: Option<&Token>) -> Verification {
    let (required, cost) = (&request.required, request.cost);
    let (hash, id) = match lookup {
        Lookup::Secret(key) => (Some(key_format::hash(key)), None),
        Lookup::Id(id) => (None, Some(id)),
    };
    let hash = hash.as_deref();
    // The current hash first; a rotated-out key (previous_hash) is the rare case.
    let found = match (id, hash) {
        (Some(id), _) => read(lookup::By::Id(id), None),
        (None, Some(h)) => {
            read(lookup::By::Hash(h), hash).or_else(|| read(lookup::By::PreviousHash(h), hash))
        }
        (None, None) => None,
    };
    let Some(mut state) = found.filter(|s| s.is_the_key_of(token)) else {
        return Verification::not_found();
    };
    state.bound_by(token);
    if let Some(code) = state.status_code() {
        return state.verification(code, token);
    }
    let mut state = state.with_identity();
    if let Some(code) = state.refusal(request.client) {
        return state.verification(code, token);
    }
    let (mut default_cost, mut applied) = state.applied(request);
    let mut windows = state.windows(&applied);
    if !state.limited(&windows) {
        return judge_unlimited(&state, request, token);
    }
    // A management change of this key not committed yet (a revoke, a new quota) is waited for,
    // as a row lock would be, and the key read again as it then is.
    if let Some(xid) = state.updater {
        crate::lookup::wait_for(xid);
        let again = lookup::find_latest(lookup::By::Id(&state.id))
            .map(|row| KeyState::from_lookup(row, hash, wall_clock()))
            .filter(|s| s.is_the_key_of(token))
            .filter(|s| hash.is_none_or(|h| lookup_matches(s, h)));
        let Some(again) = again else {
            return Verification::not_found();
        };
        state = again.with_identity();
        state.bound_by(token);
        if let Some(code) = state.refusal(request.client) {
            return state.verification(code, token);
        }
        (default_cost, applied) = state.applied(request);
        windows = state.windows(&applied);
        if !state.limited(&windows) {
            return judge_unlimited(&state, request, token);
        }
    }
    if recovering() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("API key \"{}\" has a quota or rate limit and cannot be verified on a standby", state.id),
            Some("Verify keys with a quota or rate limit on the primary: a standby cannot enforce them exactly."),
        );
    }
    if !crate::catalog::metering_up_to_date() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("API key \"{}\" has a quota or rate limit, which this database's pg_apikeys SQL is too old to meter", state.id),
            Some("The installed pg_apikeys library is newer than the extension in this database: run ALTER EXTENSION pg_apikeys UPDATE."),
        );
    }
    let permitted = permitted(&state, required, token);
    if crate::engine::available() {
        loop {
            let call = Metering {
                cost,
                default_cost,
                permitted,
                windows: &windows,
                applied: &applied,
            };
            match meter_in_shared_memory(&state, &call) {
                Ok(Some(charged)) => return charged.result(&state, &call, token),
                Ok(None) => return Verification::not_found(),
                // The identity was deleted since it was read: the key no longer shares it.
                Err(crate::engine::Unavailable::Gone) => {
                    state.identity = None;
                    (default_cost, applied) = state.applied(request);
                    windows = state.windows(&applied);
                }
                Err(crate::engine::Unavailable::NoEngine) => break,
            }
        }
    } else {
        crate::engine::warn_not_preloaded();
    }
    if !windows.is_empty() || state.identity_quota().is_some() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("API key \"{}\" applies named rate limits or its identity's quota, which need the metering engine", state.id),
            Some("Add pg_apikeys to shared_preload_libraries (and restart)."),
        );
    }
    meter_with_row_lock(&state, hash, cost, default_cost, request, token)
}

/// Whether the key grants everything `required` names; a token must grant it too, so a key
/// whose permissions shrank after minting does not lend its tokens the old ones.
fn permitted(state: &KeyState, required: &permissions::Query, token: Option<&Token>) -> bool {
    if required.requires_nothing() {
        return true;
    }
    let granted = permissions::parse(&state.permissions.value()).unwrap_or_default();
    required.satisfied_by(&granted) && token.is_none_or(|t| required.satisfied_by(&t.permissions))
}

/// Whether the key row still accepts the presented hash (it may have been rotated meanwhile).
fn lookup_matches(state: &KeyState, hash: &[u8]) -> bool {
    lookup::find_latest(lookup::By::Hash(hash)).is_some_and(|r| r.id == state.id)
        || lookup::find_latest(lookup::By::PreviousHash(hash)).is_some_and(|r| r.id == state.id)
}

/// A key without quota or rate limit (from the start, or since a change the call waited for):
/// VALID when it grants what is required, and then a use counted in shared memory.
fn judge_unlimited(state: &KeyState, request: &Request, token: Option<&Token>) -> Verification {
    let code = if permitted(state, &request.required, token) {
        Code::Valid
    } else {
        Code::InsufficientPermissions
    };
    let mut tallied = false;
    if code == Code::Valid && !recovering() {
        if crate::engine::available() {
            let analytics_cost =
                (request.counted && crate::guc::analytics()).then_some(request.cost);
            tallied = crate::engine::record_use(
                &state.id,
                state.created_us,
                epoch_us(state.now),
                analytics_cost,
            );
        } else {
            crate::engine::warn_not_preloaded();
        }
    }
    Verification {
        tallied,
        ..state.verification(code, token)
    }
}

fn recovering() -> bool {
    // SAFETY: reads the server's state.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// One metered call: its cost (and the default window's, when named at another), whether the
/// key grants what it requires, and its named limits with their windows.
struct Metering<'a> {
    cost: i64,
    default_cost: Option<i64>,
    permitted: bool,
    windows: &'a [crate::engine::Window],
    applied: &'a [crate::limits::Applied],
}

/// What metering decided: the key's own counters, its identity's, and the windows of named
/// limits.
struct Charged {
    /// The key's counters after the call, with the call's verdict.
    charge: Charge,
    /// What the key's own counters alone decided (quota, default window).
    own: Verdict,
    /// The identity's counters after the call, when it has a quota.
    identity: Option<Charge>,
    /// When the key's quota refills next, and its identity's.
    next_refill_us: Option<i64>,
    identity_next_refill_us: Option<i64>,
    windows: Vec<crate::engine::WindowState>,
}

impl Charged {
    /// From the engine's answer for [key] or [key, identity].
    fn of(m: crate::engine::Metered, with_identity: bool) -> Charged {
        let mut charges = m.charges.into_iter();
        let mut charge = charges
            .next()
            .unwrap_or_else(|| errors::internal_error("no charge"));
        let identity = if with_identity { charges.next() } else { None };
        let own = charge.verdict;
        let identity_own = identity.map_or(Verdict::Allowed, |c| c.verdict);
        charge.verdict = if own == Verdict::UsageExceeded || identity_own == Verdict::UsageExceeded
        {
            Verdict::UsageExceeded
        } else if !m.allowed {
            Verdict::RateLimited
        } else {
            Verdict::Allowed
        };
        Charged {
            charge,
            own,
            identity,
            next_refill_us: m.next_refill_us.first().copied().flatten(),
            identity_next_refill_us: m.next_refill_us.get(1).copied().flatten(),
            windows: m.windows,
        }
    }
}

impl Charged {
    fn result(&self, state: &KeyState, call: &Metering<'_>, token: Option<&Token>) -> Verification {
        let code = match self.charge.verdict {
            Verdict::UsageExceeded => Code::UsageExceeded,
            Verdict::RateLimited => Code::RateLimited,
            Verdict::Allowed if !call.permitted => Code::InsufficientPermissions,
            Verdict::Allowed => Code::Valid,
        };
        let mut result = state.verification(code, token);
        result.remaining = self.charge.after.remaining;
        result.rate_limit_remaining = self.charge.rate_remaining;
        result.rate_limit_reset = self.charge.reset_us.map(from_epoch_us);
        if let Some(rate) = state.config.rate {
            let default = crate::limits::Applied {
                name: crate::limits::DEFAULT.to_owned(),
                level: crate::limits::Level::Key,
                rate,
                cost: call.default_cost.unwrap_or(call.cost),
            };
            result.ratelimits.push(crate::limits::report(
                &default,
                self.charge.rate_remaining.unwrap_or(0),
                self.charge.reset_us,
                self.own == Verdict::RateLimited,
            ));
        }
        for (applied, w) in call.applied.iter().zip(&self.windows) {
            result.ratelimits.push(crate::limits::report(
                applied,
                w.remaining,
                w.reset_us,
                w.exceeded,
            ));
        }
        result.identity_remaining = self.identity.and_then(|c| c.after.remaining);
        result.next_refill_at = self
            .next_refill_us
            .filter(|at| *at != i64::MAX && state.config.refill_amount.is_some())
            .map(from_epoch_us);
        result.limited_by = match code {
            Code::UsageExceeded if self.own == Verdict::UsageExceeded => Some("key"),
            Code::UsageExceeded => Some("identity"),
            Code::RateLimited => {
                let by_key = self.own == Verdict::RateLimited
                    || call
                        .applied
                        .iter()
                        .zip(&self.windows)
                        .any(|(a, w)| w.exceeded && a.level == crate::limits::Level::Key);
                Some(if by_key { "key" } else { "identity" })
            }
            _ => None,
        };
        result.retry_at_us = match code {
            // Every exhausted level must have refilled: the later refill, none if one never does.
            Code::UsageExceeded => {
                let key = (self.own == Verdict::UsageExceeded)
                    .then(|| result.next_refill_at.map(epoch_us));
                let identity = self
                    .identity
                    .filter(|c| c.verdict == Verdict::UsageExceeded)
                    .map(|_| self.identity_next_refill_us);
                match (key, identity) {
                    (Some(a), Some(b)) => a.zip(b).map(|(a, b)| a.max(b)),
                    (Some(at), None) | (None, Some(at)) => at,
                    (None, None) => None,
                }
            }
            // The latest end among the windows that refused.
            Code::RateLimited => result
                .ratelimits
                .iter()
                .filter(|r| r.exceeded)
                .filter_map(|r| r.reset_us)
                .max(),
            _ => None,
        };
        result
    }
}

/// The rows' counters: the quota left is `apikeys.meters`' when written at or after the version
/// management last set `remaining` at, else the key's own; the same for the last refill; the
/// window belongs to the key either way. The meter row's writes never go back in meter_version.
const STORED_SQL: &str = concat!(
    "SELECT k.meter_version, k.remaining_version, k.refill_version, ",
    crate::remaining_sql!(),
    ",
        CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at ELSE k.last_refill_at END,
        CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at ELSE k.last_refill_at END
            + k.refill_interval,
        m.window_start, COALESCE(m.window_count, 0), COALESCE(m.window_previous, 0), k.credits
   FROM apikeys.keys k LEFT JOIN apikeys.meters m
     ON m.key_id = k.id AND m.key_created_at = k.created_at
  WHERE k.id = $1 AND k.created_at = $2"
);

pub fn stored_from(row: &SpiHeapTupleData<'_>) -> SpiResult<crate::engine::Stored> {
    let ts = |t: Option<TimestampWithTimeZone>| t.map(epoch_us);
    Ok(crate::engine::Stored {
        version: row.get(1)?.unwrap_or(0),
        remaining_version: row.get(2)?.unwrap_or(0),
        refill_version: row.get(3)?.unwrap_or(0),
        counters: metering::Counters {
            remaining: row.get::<i64>(4)?,
            window_start_us: ts(row.get(7)?),
            window_count: row.get(8)?.unwrap_or(0),
            window_previous: row.get(9)?.unwrap_or(0),
        },
        last_refill_us: ts(row.get(5)?),
        next_refill_us: ts(row.get(6)?),
        credits: row.get(10)?.unwrap_or(0),
    })
}

/// Loads a key's stored counters, as the owner (the caller may not read the tables), as they are
/// committed now: a REPEATABLE READ caller's older snapshot would miss spends the writer has
/// committed since (and the entry holding them may have been evicted).
fn load(state: &KeyState) -> Option<crate::engine::Stored> {
    let stored = with_latest_snapshot(|| load_with_active_snapshot(state));
    stored.map(|s| next_refill_by(&state.config, s))
}

/// The next refill as the schedule has it: after the last refill, by the calendar or by
/// PostgreSQL's interval arithmetic (what the rows' SQL added).
pub fn next_refill_by(config: &Config, mut stored: crate::engine::Stored) -> crate::engine::Stored {
    if config.calendar.is_some() {
        stored.next_refill_us = stored.last_refill_us.map(|l| config.next_refill_after(l));
    }
    stored
}

/// Runs `f` (a read-only statement) with the latest snapshot: a REPEATABLE READ caller's older
/// one would miss spends the writer has committed since.
pub fn with_latest_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the latest snapshot is pushed for the read-only statement of `f` and popped after
    // it (an error pops it with the transaction's abort).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

fn load_with_active_snapshot(state: &KeyState) -> Option<crate::engine::Stored> {
    crate::owner::as_owner(|| {
        Spi::connect(|client| {
            let table = plans::select(
                client,
                STORED_SQL,
                Some(1),
                &[
                    state.id.as_str().into(),
                    from_epoch_us(state.created_us).into(),
                ],
            );
            if table.is_empty() {
                return None;
            }
            Some(errors::internal(stored_from(
                &table.first().get_heap_tuple().ok()??,
            )))
        })
    })
}

fn meter_in_shared_memory(
    state: &KeyState,
    m: &Metering<'_>,
) -> Result<Option<Charged>, crate::engine::Unavailable> {
    let load_key = || load(state);
    let mut counted = vec![crate::engine::Counted {
        id: &state.id,
        created_us: state.created_us,
        version: state.meter_version,
        config: &state.config,
        cost: m.cost,
        rate_cost: m.default_cost,
        load: &load_key,
    }];
    // The identity's quota is spent with the key's, by the same cost.
    let identity = state.identity_quota();
    let entry = identity.map(|i| i.entry()).unwrap_or_default();
    let load_identity = || identity.and_then(crate::identities::load_counters);
    if let Some(i) = identity {
        counted.push(crate::engine::Counted {
            id: &entry,
            created_us: i.created_us,
            version: i.meter_version,
            config: &i.config,
            cost: m.cost,
            rate_cost: None,
            load: &load_identity,
        });
    }
    let call = crate::engine::Call {
        counted: &counted,
        now_us: epoch_us(state.now),
        permitted: m.permitted,
        windows: m.windows,
    };
    let metered = crate::engine::meter(&call)?;
    Ok(metered.map(|m| Charged::of(m, identity.is_some())))
}

/// Without the engine (not preloaded, or its table refused the key): the key's row is locked for
/// the caller's transaction and the counters written in it, so concurrent callers queue and
/// exactly `remaining` succeed. Needs a read-write transaction; a rollback undoes the spend.
fn meter_with_row_lock(
    state: &KeyState,
    hash: Option<&[u8]>,
    cost: i64,
    default_cost: Option<i64>,
    request: &Request,
    token: Option<&Token>,
) -> Verification {
    let required = &request.required;
    if read_only() {
        errors::raise(
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            format!("API key \"{}\" has a quota or rate limit and cannot be verified in a read-only transaction without the metering engine", state.id),
            Some("Add pg_apikeys to shared_preload_libraries (and restart): keys with limits then verify in READ ONLY transactions too."),
        );
    }
    crate::owner::as_owner(|| {
        Spi::connect_mut(|client| {
            // Lock the key's row (queueing behind other callers), then read the counters in a
            // statement of their own: it sees what the previous holders of the lock committed
            // to apikeys.meters (the locking statement's snapshot would not).
            let locked = plans::update(
                client,
                "SELECT 1 FROM apikeys.keys k
                  WHERE k.id = $1 AND k.created_at = $2
                    AND ($3::bytea IS NULL OR k.hash = $3 OR k.previous_hash = $3)
                    FOR UPDATE",
                Some(1),
                &[
                    state.id.as_str().into(),
                    from_epoch_us(state.created_us).into(),
                    hash.into(),
                ],
            );
            if locked.is_empty() {
                return Verification::not_found();
            }
            let counters = plans::update(
                client,
                STORED_SQL,
                Some(1),
                &[
                    state.id.as_str().into(),
                    from_epoch_us(state.created_us).into(),
                ],
            );
            if counters.is_empty() {
                return Verification::not_found();
            }
            let Some(row) = errors::internal(counters.first().get_heap_tuple()) else {
                return Verification::not_found();
            };
            let stored = next_refill_by(&state.config, errors::internal(stored_from(&row)));
            // The row as it is now, after any change this call waited for.
            let Some(fresh) = lookup::find_latest(lookup::By::Id(&state.id))
                .map(|row| KeyState::from_lookup(row, hash, wall_clock()))
                .filter(|s| s.created_us == state.created_us)
            else {
                return Verification::not_found();
            };
            let mut fresh = fresh.with_identity();
            fresh.bound_by(token);
            if let Some(code) = fresh.refusal(request.client) {
                return fresh.verification(code, token);
            }
            let permitted = permitted(&fresh, required, token);
            let now_us = epoch_us(fresh.now);
            let due = stored.next_refill_us.is_some_and(|next| next <= now_us);
            let limits = metering::Limits {
                rate_cost: default_cost,
                ..fresh.config.limits(due)
            };
            let charge = metering::charge(&stored.counters, &limits, now_us, cost, permitted);
            let last_refill = if charge.refilled {
                Some(now_us)
            } else {
                stored.last_refill_us
            };
            let valid = charge.verdict == Verdict::Allowed && permitted;
            if valid || charge.refilled || charge.after != stored.counters {
                plans::update(
                    client,
                    "INSERT INTO apikeys.meters AS m (key_id, key_created_at, meter_version, remaining,
                            last_refill_at, window_start, window_count, window_previous, request_count, last_used_at,
                            credits)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $9 > 0 THEN $10 END, $11)
                     ON CONFLICT (key_id) DO UPDATE SET
                        meter_version = excluded.meter_version, remaining = excluded.remaining,
                        credits = excluded.credits,
                        last_refill_at = excluded.last_refill_at, window_start = excluded.window_start,
                        window_count = excluded.window_count, window_previous = excluded.window_previous,
                        request_count = CASE WHEN m.key_created_at = excluded.key_created_at
                                             THEN m.request_count + excluded.request_count
                                             ELSE excluded.request_count END,
                        last_used_at = CASE WHEN m.key_created_at = excluded.key_created_at
                                            THEN GREATEST(m.last_used_at, excluded.last_used_at)
                                            ELSE excluded.last_used_at END,
                        key_created_at = excluded.key_created_at",
                    None,
                    &[
                        fresh.id.as_str().into(),
                        from_epoch_us(fresh.created_us).into(),
                        stored.version.into(),
                        charge.after.remaining.into(),
                        last_refill.map(from_epoch_us).into(),
                        charge.after.window_start_us.map(from_epoch_us).into(),
                        charge.after.window_count.into(),
                        charge.after.window_previous.into(),
                        i64::from(valid).into(),
                        fresh.now.into(),
                        stored.credits.into(),
                    ],
                );
            }
            let own = charge.verdict;
            let call = Metering {
                cost,
                default_cost,
                permitted,
                windows: &[],
                applied: &[],
            };
            let next_refill_us = if charge.refilled {
                Some(fresh.config.next_refill_after(now_us))
            } else {
                stored.next_refill_us
            };
            Charged {
                charge,
                own,
                identity: None,
                next_refill_us,
                identity_next_refill_us: None,
                windows: Vec::new(),
            }
            .result(&fresh, &call, token)
        })
    })
}

/// Parses `required` for verify_key and friends (a permissions document or an `any`/`all`
/// query): NULL means nothing is required.
pub fn required_permissions(required: Option<Jsonb>) -> permissions::Query {
    match jsonb::argument("required", required) {
        None => permissions::Query::nothing(),
        Some(value) => permissions::Query::parse(&value)
            .unwrap_or_else(|problem| invalid_argument("required", problem)),
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
/// limit when (and only when) the result is VALID. Runs with the caller's rights: it reads the
/// key's row without privileges (`lookup`) and writes as the table's owner (`owner::as_owner`).
/// `client_ip`: the caller's address, which a key (or its identity) with `allowed_cidrs` must
/// allow (none given: FORBIDDEN for such a key).
#[pg_extern(volatile, name = "verify_key")]
fn verify_key_from(
    key: Option<&str>,
    required: default!(Option<Jsonb>, "NULL"),
    cost: default!(Option<i32>, 1),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    client_ip: default!(Option<pgrx::datum::Inet>, "NULL"),
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let request = Request::from_args(
        required,
        cost,
        ratelimits,
        Client::from_arg(client_ip.as_ref()),
    );
    counted(verify(key, &request), &request).into_row()
}

/// verify_key as 0.7 declared it (four arguments), for a database whose SQL has not been
/// updated to this library yet (`ALTER EXTENSION pg_apikeys UPDATE`): no SQL of its own.
#[pg_extern(volatile, sql = false)]
fn verify_key_with_limits(
    key: Option<&str>,
    required: Option<Jsonb>,
    cost: Option<i32>,
    ratelimits: Option<Jsonb>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let request = Request::from_args(required, cost, ratelimits, Client::At(None));
    counted(verify(key, &request), &request).into_row()
}

/// verify_key as 0.6 and earlier declared it (three arguments), for the same reason.
#[pg_extern(volatile, sql = false)]
fn verify_key(
    key: Option<&str>,
    required: Option<Jsonb>,
    cost: Option<i32>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let request = Request::from_args(required, cost, None, Client::At(None));
    counted(verify(key, &request), &request).into_row()
}

/// A verification as callers get it, counted for analytics (SPEC §8) first: a VALID one spent
/// the request's cost, a refused one nothing.
pub fn counted(v: Verification, request: &Request) -> Verification {
    let spent = if v.code == Code::Valid {
        request.cost
    } else {
        0
    };
    crate::analytics::count(&v, spent);
    v
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn verify_key_writes_as_the_owner_and_ignores_the_callers_search_path() {
        let (id, key) = create("remaining => 5");
        let (plain_id, plain) = create("");
        run("CREATE ROLE apikeys_t_caller NOSUPERUSER");
        run("CREATE SCHEMA apikeys_t_evil");
        // An operator the owner's SQL would pick up from the caller's search_path.
        run(
            "CREATE FUNCTION apikeys_t_evil.eq(bytea, bytea) RETURNS boolean LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'hijacked'; END $$",
        );
        run("CREATE OPERATOR apikeys_t_evil.= (LEFTARG = bytea, RIGHTARG = bytea, FUNCTION = apikeys_t_evil.eq)");
        run("GRANT USAGE ON SCHEMA apikeys_t_evil, tests TO apikeys_t_caller");
        run("SET LOCAL ROLE apikeys_t_caller");
        run("SET LOCAL search_path = apikeys_t_evil, pg_catalog");
        assert_eq!(
            error_of("SELECT 1 FROM apikeys.keys").as_deref(),
            Some("42501: permission denied for table keys"),
            "the caller cannot read the table itself"
        );
        for _ in 0..2 {
            assert_eq!(code(&key, ""), "VALID");
            assert_eq!(code(&plain, ""), "VALID");
        }
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(2));
        // Tokens too: the first mint of the database creates its signing key as the owner.
        let token = mint(&key, "60000");
        assert_eq!(token_code(&token, ""), "VALID");
        run("RESET ROLE");
        run("RESET search_path");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(0)
        );
        assert_eq!(code(&plain, ""), "VALID", "{plain_id}");
    }

    #[pg_test]
    fn a_valid_key_verifies_and_its_use_is_counted() {
        let (id, key) = create("name => 'svc', owner => 'acme', permissions => '{\"orders\": [\"read\"]}', metadata => '{\"plan\": \"pro\"}'");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(field::<bool>(&key, "", "valid"), Some(true));
        assert_eq!(field::<String>(&key, "", "key_id"), Some(id.clone()));
        assert_eq!(field::<String>(&key, "", "owner").as_deref(), Some("acme"));
        assert_eq!(field::<String>(&key, "", "name").as_deref(), Some("svc"));
        assert_eq!(
            field::<String>(&key, "", "metadata->>'plan'").as_deref(),
            Some("pro")
        );
        assert_eq!(
            field::<String>(&key, "", "permissions::text").as_deref(),
            Some(r#"{"orders": ["read"]}"#)
        );
        assert_eq!(field::<i64>(&key, "", "remaining"), None);
        // Counting uses is the metering engine's (tests/integration.rs): its writer cannot see a
        // key created in this test's uncommitted transaction.
    }

    #[pg_test]
    fn bad_keys_are_not_found_and_never_raise() {
        let (id, key) = create("");
        let mut typo = key.clone().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        for bad in [
            "",
            "garbage",
            "sk_",
            "_",
            "ключ_ключ",
            &typo,
            &key.to_uppercase(),
            &format!("{key} "),
            &"x".repeat(1_000_000),
        ] {
            assert_eq!(code(bad, ""), "NOT_FOUND", "{bad:.30}");
            assert_eq!(field::<bool>(bad, "", "valid"), Some(false));
            assert_eq!(field::<String>(bad, "", "key_id"), None);
        }
        assert_eq!(
            one::<String>("SELECT code FROM apikeys.verify_key(NULL)").as_deref(),
            Some("NOT_FOUND")
        );
        // Well-formed but unknown: the key of a deleted row.
        run(&format!("SELECT apikeys.delete_api_key('{id}')"));
        assert_eq!(code(&key, ""), "NOT_FOUND");
    }

    #[pg_test]
    fn expiry_follows_the_wall_clock_not_the_transaction_start() {
        let (_, key) = create("expires_in => '1 s'");
        assert_eq!(code(&key, ""), "VALID");
        run("SELECT pg_sleep(1.05)");
        // Still the same transaction: now() has not moved, clock_timestamp() has.
        assert_eq!(code(&key, ""), "EXPIRED");
        assert_eq!(
            field::<bool>(&key, "", "expires_at < clock_timestamp()"),
            Some(true)
        );
        let (_, past) = create("expires_at => now() - interval '1 day'");
        assert_eq!(code(&past, ""), "EXPIRED");
        let (_, never) = create("expires_at => 'infinity'");
        assert_eq!(field::<bool>(&never, "", "expires_at IS NULL"), Some(true));
        assert_eq!(code(&never, ""), "VALID");
    }

    #[pg_test]
    fn disabled_and_revoked_keys() {
        let (id, key) = create("enabled => false");
        assert_eq!(code(&key, ""), "DISABLED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        assert_eq!(code(&key, ""), "VALID");
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(code(&key, ""), "REVOKED");
        // Revocation is permanent: enabling does not bring the key back.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        assert_eq!(code(&key, ""), "REVOKED");
    }

    #[pg_test]
    fn checks_run_in_the_spec_order() {
        let (id, key) = create("expires_at => now() - interval '1 s', enabled => false, remaining => 0, rate_limit_max => 1, rate_limit_window => '1 hour'");
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "EXPIRED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['expires_at'])"
        ));
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "DISABLED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "REVOKED");

        let (_, key) = create("remaining => 0, rate_limit_max => 1, rate_limit_window => '1 hour'");
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "USAGE_EXCEEDED");
        let (_, key) = create("remaining => 5, rate_limit_max => 1, rate_limit_window => '1 hour'");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "RATE_LIMITED");
        let (_, key) = create("remaining => 5, rate_limit_max => 5, rate_limit_window => '1 hour'");
        assert_eq!(code(&key, "'{\"x\": [\"y\"]}'"), "INSUFFICIENT_PERMISSIONS");
    }

    #[pg_test]
    fn quota_is_spent_only_by_valid_verifications() {
        let (id, key) = create("remaining => 3, permissions => '{\"orders\": [\"read\"]}'");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(2));
        assert_eq!(
            code(&key, "'{\"orders\": [\"write\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(code(&key, "cost => 5"), "USAGE_EXCEEDED");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(2)
        );
        assert_eq!(field::<i64>(&key, "cost => 0", "remaining"), Some(2));
        assert_eq!(field::<i64>(&key, "cost => 2", "remaining"), Some(0));
        assert_eq!(code(&key, ""), "USAGE_EXCEEDED");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(0));
        assert_eq!(code(&key, "cost => 0"), "VALID");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(0)
        );
    }

    #[pg_test]
    fn quota_refills_after_its_interval() {
        let (_, key) = create("remaining => 1, refill_amount => 3, refill_interval => '1 s'");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(code(&key, ""), "USAGE_EXCEEDED");
        run("SELECT pg_sleep(1.05)");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(2));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(1));
        // A refilling quota without `remaining` starts full.
        let (_, key) = create("refill_amount => 2, refill_interval => '1 day'");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(1));
    }

    #[pg_test]
    fn a_fixed_window_opens_at_the_first_call_and_lets_max_through() {
        let (_, key) = create(
            "rate_limit_max => 2, rate_limit_window => '1 s', rate_limit_algorithm => 'fixed'",
        );
        assert_eq!(field::<i64>(&key, "", "rate_limit_remaining"), Some(1));
        assert_eq!(
            field::<bool>(
                &key,
                "",
                "rate_limit_reset BETWEEN clock_timestamp() AND clock_timestamp() + interval '1 s'"
            ),
            Some(true)
        );
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        assert_eq!(field::<i64>(&key, "", "rate_limit_remaining"), Some(0));
        run("SELECT pg_sleep(1.05)");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(code(&key, "cost => 2"), "RATE_LIMITED");
        // A rate-limited call does not spend the quota.
        let (id, key) =
            create("remaining => 10, rate_limit_max => 1, rate_limit_window => '1 hour'");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(9)
        );
    }

    #[pg_test]
    fn calls_within_one_statement_each_see_the_previous_spend() {
        let (_, key) = create("remaining => 3, rate_limit_max => 2, rate_limit_window => '1 hour'");
        let codes = one::<String>(&format!(
            "SELECT string_agg((v).code || ':' || (v).remaining, ',' ORDER BY n) FROM \
             (SELECT n, apikeys.verify_key('{key}') AS v FROM generate_series(1, 4) n OFFSET 0) calls"
        ));
        assert_eq!(
            codes.as_deref(),
            Some("VALID:2,VALID:1,RATE_LIMITED:1,RATE_LIMITED:1")
        );
    }

    #[pg_test]
    fn required_permissions_with_wildcards() {
        let (_, key) =
            create("permissions => '{\"orders\": [\"read\", \"write\"], \"reports\": [\"*\"]}'");
        assert_eq!(code(&key, "'{}'"), "VALID");
        assert_eq!(code(&key, "'{\"orders\": [\"read\"]}'"), "VALID");
        assert_eq!(
            code(
                &key,
                "'{\"orders\": [\"read\", \"write\"], \"reports\": [\"export\"]}'"
            ),
            "VALID"
        );
        assert_eq!(
            code(&key, "'{\"orders\": [\"delete\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(
            code(&key, "'{\"users\": [\"read\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        let (_, admin) = create("permissions => '{\"*\": [\"*\"]}'");
        assert_eq!(code(&admin, "'{\"anything\": [\"at-all\"]}'"), "VALID");
        let (_, reader) = create("permissions => '{\"*\": [\"read\"]}'");
        assert_eq!(code(&reader, "'{\"users\": [\"read\"]}'"), "VALID");
        assert_eq!(
            code(&reader, "'{\"users\": [\"write\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        let (_, none) = create("");
        assert_eq!(
            code(&none, "'{\"orders\": [\"read\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
    }

    #[pg_test]
    fn any_and_all_queries_in_required() {
        let (_, key) = create(r#"permissions => '{"orders": ["read"], "reports": ["*"]}'"#);
        let needs_admin_or_write = r#"'{"all": [{"orders": ["read"]}, {"any": [{"admin": ["*"]}, {"orders": ["write"]}]}]}'"#;
        assert_eq!(code(&key, needs_admin_or_write), "INSUFFICIENT_PERMISSIONS");
        assert_eq!(
            code(
                &key,
                r#"'{"any": [{"admin": ["*"]}, {"reports": ["export"]}]}'"#
            ),
            "VALID"
        );
        let (_, writer) = create(r#"permissions => '{"orders": ["read", "write"]}'"#);
        assert_eq!(code(&writer, needs_admin_or_write), "VALID");
        // Not a combinator: a resource named "any".
        assert_eq!(
            code(&key, r#"'{"any": ["read"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        let mut deep = r#"{"orders": ["read"]}"#.to_owned();
        for _ in 0..16 {
            deep = format!(r#"{{"any": [{deep}]}}"#);
        }
        assert_eq!(code(&key, &format!("'{deep}'")), "VALID");
        let k = pgrx::spi::quote_literal(&key);
        assert_error(
            &format!(r#"SELECT apikeys.verify_key({k}, '{{"any": [{deep}]}}')"#),
            "22023",
            "at most 16 levels",
        );
        assert_error(
            &format!(r#"SELECT apikeys.verify_key({k}, '{{"all": []}}')"#),
            "22023",
            "\"required\"",
        );
    }

    #[pg_test]
    fn bad_verification_arguments_raise_22023() {
        let (_, key) = create("");
        let k = pgrx::spi::quote_literal(&key);
        assert_error(
            &format!("SELECT apikeys.verify_key({k}, '[\"orders\"]')"),
            "22023",
            "\"required\"",
        );
        assert_error(
            &format!("SELECT apikeys.verify_key({k}, '{{\"orders\": \"read\"}}')"),
            "22023",
            "\"required\"",
        );
        assert_error(
            &format!("SELECT apikeys.verify_key({k}, cost => -1)"),
            "22023",
            "\"cost\"",
        );
        // A bad key with a bad argument is still an argument error, not NOT_FOUND.
        assert_error(
            "SELECT apikeys.verify_key('nope', cost => -1)",
            "22023",
            "\"cost\"",
        );
    }

    #[pg_test]
    fn rotation_with_and_without_grace() {
        let (id, old) = create("");
        let new =
            one::<String>(&format!("SELECT key FROM apikeys.rotate_api_key('{id}')")).unwrap();
        assert_eq!(code(&old, ""), "NOT_FOUND");
        assert_eq!(field::<String>(&new, "", "key_id"), Some(id.clone()));

        let newer = one::<String>(&format!(
            "SELECT key FROM apikeys.rotate_api_key('{id}', grace => '1 s')"
        ))
        .unwrap();
        assert_eq!(code(&new, ""), "VALID");
        assert_eq!(code(&newer, ""), "VALID");
        assert_eq!(
            field::<bool>(&new, "", "expires_at <= clock_timestamp() + interval '1 s'"),
            Some(true)
        );
        run("SELECT pg_sleep(1.05)");
        assert_eq!(code(&new, ""), "EXPIRED");
        assert_eq!(code(&newer, ""), "VALID");
    }

    #[pg_test]
    fn read_only_transactions_verify_and_meter_every_key() {
        let (_, plain) = create("");
        let (id, limited) =
            create("remaining => 2, rate_limit_max => 5, rate_limit_window => '1 hour'");
        run("SET LOCAL transaction_read_only = on");
        assert_eq!(code(&plain, ""), "VALID");
        assert_eq!(
            code(&plain, "'{\"x\": [\"y\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(field::<i64>(&limited, "", "remaining"), Some(1));
        assert_eq!(field::<i64>(&limited, "", "rate_limit_remaining"), Some(3));
        assert_eq!(code(&limited, ""), "USAGE_EXCEEDED");
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(0)
        );
    }

    #[pg_test]
    fn management_changes_keep_what_they_do_not_set() {
        let (id, key) =
            create("remaining => 5, rate_limit_max => 2, rate_limit_window => '1 hour'");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(4));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(3));
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        // A refill configured later: the quota left carries over, the full window too.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', refill_amount => 10, refill_interval => '1 day')"
        ));
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(3)
        );
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        // A quota set: it starts from the value given; the window still carries over.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', remaining => 7, rate_limit_max => 3)"
        ));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(6));
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['rate_limit'])"
        ));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(5));
    }

    const LIMITS: &str = r#"ratelimits => '[{"name": "requests", "limit": 2, "duration": "1 hour", "auto_apply": true}, {"name": "tokens", "limit": 100, "duration": "1 hour"}]'"#;

    /// One verification, as `code|limited_by|ratelimits` (each limit `name:level:remaining:exceeded`).
    fn limited(key: &str, extra: &str) -> String {
        let k = pgrx::spi::quote_literal(key);
        one::<String>(&format!(
            "SELECT v.code || '|' || coalesce(v.limited_by, '-') || '|' || coalesce((
                      SELECT string_agg(l->>'name' || ':' || (l->>'level') || ':' || (l->>'remaining') || ':' || (l->>'exceeded'), ',')
                        FROM jsonb_array_elements(v.ratelimits) l), '')
               FROM apikeys.verify_key({k}{extra}) v"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn named_limits_apply_automatically_or_when_named_at_their_cost() {
        let (_, key) = create(LIMITS);
        assert_eq!(limited(&key, ""), "VALID|-|requests:key:1:false");
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "tokens", "cost": 60}]'"#
            ),
            "VALID|-|requests:key:0:false,tokens:key:40:false"
        );
        // Both limits are judged before either is charged: tokens alone would allow this call.
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "tokens", "cost": 10}]'"#
            ),
            "RATE_LIMITED|key|requests:key:0:true,tokens:key:40:false"
        );
        // Named at cost 0, the auto-applied limit takes nothing: tokens decides.
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "requests", "cost": 0}, {"name": "tokens", "cost": 50}]'"#
            ),
            "RATE_LIMITED|key|requests:key:0:false,tokens:key:40:true"
        );
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "requests", "cost": 0}, {"name": "tokens", "cost": 40}]'"#
            ),
            "VALID|-|requests:key:0:false,tokens:key:0:false"
        );
        let (_, plain) = create("");
        assert_eq!(limited(&plain, ""), "VALID|-|");
        assert_eq!(
            field::<String>(&plain, "", "ratelimits::text").as_deref(),
            Some("[]")
        );
        assert_eq!(
            field::<bool>(
                &key,
                r#"ratelimits => '[{"name": "requests", "cost": 0}]'"#,
                "(ratelimits->0->>'reset_at')::timestamptz > now()"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn a_limit_that_refuses_leaves_the_quota_and_the_other_limits_untouched() {
        let (id, key) = create(&format!(
            "remaining => 3, rate_limit_max => 10, rate_limit_window => '1 hour', {LIMITS}"
        ));
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "tokens", "cost": 101}]'"#
            ),
            "RATE_LIMITED|key|default:key:10:false,requests:key:2:false,tokens:key:100:true"
        );
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(3)
        );
        // The quota refuses first (USAGE_EXCEEDED): no window is charged.
        assert_eq!(
            limited(
                &key,
                r#", cost => 4, ratelimits => '[{"name": "tokens", "cost": 1}]'"#
            ),
            "USAGE_EXCEEDED|key|default:key:10:false,requests:key:2:false,tokens:key:100:false"
        );
        // The default limit takes the call's cost unless named.
        assert_eq!(
            limited(&key, ", cost => 2"),
            "VALID|-|default:key:8:false,requests:key:1:false"
        );
        assert_eq!(
            limited(
                &key,
                r#", ratelimits => '[{"name": "default", "cost": 5}]'"#
            ),
            "VALID|-|default:key:3:false,requests:key:0:false"
        );
    }

    #[pg_test]
    fn named_limits_are_checked_and_cleared() {
        let (id, key) = create(LIMITS);
        let k = pgrx::spi::quote_literal(&key);
        assert_error(
            &format!(r#"SELECT apikeys.verify_key({k}, ratelimits => '[{{"name": "nope"}}]')"#),
            "22023",
            "\"nope\"",
        );
        assert_error(
            &format!(r#"SELECT apikeys.verify_key({k}, ratelimits => '{{"name": "tokens"}}')"#),
            "22023",
            "\"ratelimits\"",
        );
        assert_error(
            r#"SELECT apikeys.create_api_key(ratelimits => '[{"name": "a", "limit": 1, "duration": "soon"}]')"#,
            "22023",
            "is not an interval",
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT ratelimits->1->>'duration' FROM apikeys.get_api_key('{id}')"
            ))
            .as_deref(),
            Some("01:00:00")
        );
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['ratelimits'])"
        ));
        assert_eq!(limited(&key, ""), "VALID|-|");
        run(&format!(
            r#"SELECT apikeys.update_api_key('{id}', ratelimits => '[{{"name": "burst", "limit": 1, "duration": "1 minute", "auto_apply": true}}]')"#
        ));
        assert_eq!(limited(&key, ""), "VALID|-|burst:key:0:false");
        assert_eq!(limited(&key, ""), "RATE_LIMITED|key|burst:key:0:true");
    }

    #[pg_test]
    fn a_sliding_window_counts_the_previous_bucket_at_its_edge() {
        // A 2-second window, so that the call lands early in a bucket: wait for a bucket start.
        run("SELECT pg_sleep(2 - extract(epoch FROM clock_timestamp())::numeric % 2 + 0.05)");
        let (_, key) = create("rate_limit_max => 4, rate_limit_window => '2 s'");
        for _ in 0..4 {
            assert_eq!(code(&key, ""), "VALID");
        }
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        assert_eq!(
            field::<bool>(&key, "", "rate_limit_reset = to_timestamp(ceil(extract(epoch FROM clock_timestamp()) / 2) * 2)"),
            Some(true),
            "the window resets at the end of its bucket"
        );
        // Into the next bucket: most of the previous one still counts, so one fits at most.
        run("SELECT pg_sleep(2 - extract(epoch FROM clock_timestamp())::numeric % 2 + 0.2)");
        assert_eq!(
            code(&key, ""),
            "RATE_LIMITED",
            "4 × (1 - 0.1) rounds up to 4"
        );
        // A fixed window would let all 4 through again right after its end.
        let (_, fixed) = create(
            "rate_limit_max => 4, rate_limit_window => '2 s', rate_limit_algorithm => 'fixed'",
        );
        for _ in 0..4 {
            assert_eq!(code(&fixed, ""), "VALID");
        }
        run("SELECT pg_sleep(2.05)");
        for _ in 0..4 {
            assert_eq!(code(&fixed, ""), "VALID");
        }
        assert_error(
            "SELECT apikeys.create_api_key(rate_limit_max => 1, rate_limit_window => '1 s', rate_limit_algorithm => 'leaky')",
            "22023",
            "\"rate_limit_algorithm\"",
        );
    }
}
