//! Key management: create, read, update, revoke, delete, rotate. Every function here is
//! SECURITY DEFINER with a fixed search_path (the tables are closed to PUBLIC), is not executable
//! by PUBLIC, and writes an audit row for each change.

use crate::addresses::SqlCidr;
use crate::durations::Span;
use crate::errors::{self, invalid_argument, invalid_argument_hint, key_not_found};
use crate::jsonb::{self, Jsonb};
use crate::plans;
use crate::schema::{API_KEY_FROM, API_KEY_ROW};
use crate::settings::{self, Args, Expiry, Settings, StoredLimits, Update};
use crate::{audit, guc, key_format, metering, verify};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::json;

type ApiKey = pgrx::composite_type!('static, "apikeys.api_key");

// ---- the edges of the argument checks (`settings` has the rules) ----

pub(crate) fn check_duration(arg: &'static str, value: Interval, allow_zero: bool) -> Interval {
    errors::checked(settings::duration(arg, span(value), allow_zero));
    value
}

pub(crate) fn span(i: Interval) -> Span {
    Span {
        months: i.months(),
        days: i.days(),
        micros: i.micros(),
    }
}

/// A checked span (no negative part) as an interval.
pub(crate) fn interval(s: Span) -> Interval {
    errors::internal(Interval::new(s.months, s.days, s.micros))
}

/// Arguments for SQL's `COALESCE($at, clock_timestamp() + $in)`; both NULL means never.
fn expiry_sql(e: Expiry) -> (Option<TimestampWithTimeZone>, Option<Interval>) {
    match e {
        Expiry::Never => (None, None),
        Expiry::At(t) => (
            Some(errors::internal(TimestampWithTimeZone::try_from(t))),
            None,
        ),
        Expiry::In(i) => (None, Some(interval(i))),
    }
}

/// A role argument names an existing database role.
fn check_role_exists(client: &SpiClient<'_>, role: &str) {
    let exists = plans::select(
        client,
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
        None,
        &[role.into()],
    )
    .first()
    .get_one::<bool>();
    if errors::internal(exists) != Some(true) {
        invalid_argument_hint(
            "role",
            format!("names no database role: \"{}\"", errors::shown(role)),
            "Create the role first.",
        );
    }
}

/// The expiry GUC apikeys.default_key_ttl gives a key created without one.
fn default_expiry() -> Expiry {
    let ttl = guc::default_key_ttl().map(|text| {
        text.parse::<Interval>().unwrap_or_else(|_| {
            invalid_argument(
                "apikeys.default_key_ttl",
                format!("must be an interval, got \"{}\"", errors::shown(&text)),
            )
        })
    });
    errors::checked(Expiry::from_default(ttl.map(span)))
}

/// The key string, prefix and start of a new key: generated, or imported from `secret`.
fn new_key(prefix: Option<String>, secret: Option<&str>) -> (String, String, String) {
    let prefix_given = prefix.is_some();
    let prefix = match prefix {
        Some(p) => {
            errors::checked(settings::prefix("prefix", &p));
            p
        }
        None => {
            let p = guc::default_prefix();
            errors::checked(settings::prefix("apikeys.default_prefix", &p));
            p
        }
    };
    match secret {
        None => {
            let (key, start) = key_format::generate(&prefix);
            (key, prefix, start)
        }
        Some(secret) => errors::checked(settings::imported(secret, prefix, prefix_given)),
    }
}

/// The shared arguments of create_api_key and update_api_key, with jsonb decoded.
#[allow(clippy::too_many_arguments)]
fn args(
    name: Option<String>,
    owner: Option<String>,
    permissions: Option<Jsonb>,
    expires_in: Option<Interval>,
    expires_at: Option<TimestampWithTimeZone>,
    role: Option<String>,
    description: Option<String>,
    metadata: Option<Jsonb>,
    remaining: Option<i64>,
    refill_amount: Option<i64>,
    refill_interval: Option<Interval>,
    rate_limit_max: Option<i32>,
    rate_limit_window: Option<Interval>,
    rate_limit_algorithm: Option<String>,
    enabled: Option<bool>,
    roles: Option<Vec<Option<String>>>,
    ratelimits: Option<Jsonb>,
    refill_day: Option<i32>,
    refill_schedule: Option<String>,
    allowed_cidrs: Option<Vec<Option<SqlCidr>>>,
) -> Args {
    Args {
        name,
        owner,
        description,
        permissions: jsonb::argument("permissions", permissions),
        metadata,
        expires_in: expires_in.map(span),
        expires_at: expires_at.map(TimestampWithTimeZone::into_inner),
        role,
        remaining,
        refill_amount,
        refill_interval: refill_interval.map(span),
        rate_limit_max,
        rate_limit_window: rate_limit_window.map(span),
        rate_limit_algorithm,
        enabled,
        roles,
        ratelimits: jsonb::argument("ratelimits", ratelimits)
            .map(|v| crate::limits::parse_config(&v, pg_duration)),
        refill_day,
        refill_schedule,
        allowed_cidrs: crate::addresses::argument(allowed_cidrs),
    }
}

/// A duration as PostgreSQL reads interval text (any IntervalStyle input).
pub(crate) fn pg_duration(text: &str) -> Result<Span, String> {
    text.parse::<Interval>()
        .map(span)
        .map_err(|_| format!("is not an interval: \"{}\"", errors::shown(text)))
}

// ---- SQL functions ----

/// A key's row and its audit entry in one statement. With a caller's id, `ON CONFLICT` turns a
/// taken id into no row; a generated id (95 random bits) cannot collide and skips the
/// speculative insertion (an extra index probe per key).
fn insert_sql(id_given: bool, acting: bool) -> String {
    let on_conflict = if id_given {
        "ON CONFLICT (id) DO NOTHING"
    } else {
        ""
    };
    // The acting key of self-service (audit::acting_key); other calls name no such column.
    let (acting_column, acting_value) = if acting {
        (", acting_key_id", ", $30")
    } else {
        ("", "")
    };
    format!(
        "WITH k AS (
            INSERT INTO apikeys.keys (id, hash, prefix, start, name, owner, description,
                permissions, metadata, role, master, enabled, expires_at, remaining,
                refill_amount, refill_interval, last_refill_at, rate_limit_max,
                rate_limit_window, created_by, updated_by, rate_limit_algorithm, roles,
                effective_permissions, ratelimits, refill_day, refill_schedule, identity_id,
                allowed_cidrs)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                COALESCE($13, clock_timestamp() + $14), $15, $16, $17,
                CASE WHEN $16 IS NOT NULL THEN clock_timestamp() END, $18, $19, $20, $20, $22,
                $23, $24, $25, $26, $27, $28, $29::text[]::cidr[])
            {on_conflict}
            RETURNING id, expires_at, created_at
        ), audit AS (
            INSERT INTO apikeys.audit_log (actor, action, key_id, details{acting_column})
            SELECT $20, 'create', id, $21{acting_value} FROM k
        )
        SELECT expires_at, created_at FROM k"
    )
}

/// Creates an API key and returns it. The `key` column is the only time the key is ever shown:
/// only its SHA-256 is stored. See README "create_api_key" for every argument.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn create_api_key(
    name: default!(Option<String>, "NULL"),
    owner: default!(Option<String>, "NULL"),
    permissions: default!(Option<Jsonb>, "NULL"),
    expires_in: default!(Option<Interval>, "NULL"),
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    prefix: default!(Option<String>, "NULL"),
    id: default!(Option<String>, "NULL"),
    secret: default!(Option<String>, "NULL"),
    role: default!(Option<String>, "NULL"),
    description: default!(Option<String>, "NULL"),
    metadata: default!(Option<Jsonb>, "NULL"),
    master: default!(Option<bool>, false),
    remaining: default!(Option<i64>, "NULL"),
    refill_amount: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    rate_limit_max: default!(Option<i32>, "NULL"),
    rate_limit_window: default!(Option<Interval>, "NULL"),
    enabled: default!(Option<bool>, true),
    rate_limit_algorithm: default!(Option<String>, "NULL"),
    roles: default!(Option<Vec<Option<String>>>, "NULL"),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    refill_day: default!(Option<i32>, "NULL"),
    refill_schedule: default!(Option<String>, "NULL"),
    allowed_cidrs: default!(Option<Vec<Option<SqlCidr>>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(key, String),
        name!(start, String),
        name!(prefix, String),
        name!(name, Option<String>),
        name!(owner, Option<String>),
        name!(expires_at, Option<TimestampWithTimeZone>),
        name!(created_at, Option<TimestampWithTimeZone>),
    ),
> {
    let s = errors::checked(Settings::for_create(args(
        name,
        owner,
        permissions,
        expires_in,
        expires_at,
        role,
        description,
        metadata,
        remaining,
        refill_amount,
        refill_interval,
        rate_limit_max,
        rate_limit_window,
        rate_limit_algorithm,
        enabled,
        roles,
        ratelimits,
        refill_day,
        refill_schedule,
        allowed_cidrs,
    )));
    let master = master.unwrap_or(false);
    TableIterator::once(create(s, id, prefix, secret.as_deref(), master))
}

/// A created key as create_api_key returns it.
pub(crate) type Created = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    Option<TimestampWithTimeZone>,
);

/// Creates a key with checked settings: id, key, start, prefix, name, owner, expiry, creation.
pub(crate) fn create(
    s: Settings,
    id: Option<String>,
    prefix: Option<String>,
    secret: Option<&str>,
    master: bool,
) -> Created {
    let id_given = id.is_some();
    let id = match id {
        Some(id) => errors::checked(settings::id(&id)).to_owned(),
        None => format!("key_{}", key_format::random_id(16)),
    };
    let (key, prefix, start) = new_key(prefix, secret);
    let new = NewKey {
        id: &id,
        id_given,
        imported: secret.is_some(),
        key: &key,
        prefix: &prefix,
        start: &start,
        master,
    };
    let (name, owner) = (s.name.clone(), s.owner.clone());
    let (expires_at, created_at) = insert_key(&new, s);
    (id, key, start, prefix, name, owner, expires_at, created_at)
}

/// What a new key is besides its settings.
struct NewKey<'a> {
    id: &'a str,
    id_given: bool,
    imported: bool,
    key: &'a str,
    prefix: &'a str,
    start: &'a str,
    master: bool,
}

/// Inserts a checked key (and its audit row); returns its expiry and creation time.
fn insert_key(
    new: &NewKey<'_>,
    s: Settings,
) -> (Option<TimestampWithTimeZone>, Option<TimestampWithTimeZone>) {
    let expiry = s.expiry.unwrap_or_else(default_expiry);
    let algorithm = s.algorithm.unwrap_or(metering::Algorithm::Sliding);
    let hash = key_format::hash(new.key);
    let id = new.id;
    Spi::connect_mut(|client| {
        if let Some(role) = &s.role {
            check_role_exists(client, role);
        }
        // Generated keys cannot collide; an imported one may already be registered.
        if new.imported {
            let taken = plans::select(
                client,
                "SELECT 1 FROM apikeys.keys WHERE hash = $1 OR previous_hash = $1",
                None,
                &[hash.as_slice().into()],
            );
            if !taken.is_empty() {
                errors::raise(
                    PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                    "argument \"secret\" is a key that is already registered".into(),
                    Some("The key already works: apikeys.verify_key(secret) shows its id."),
                );
            }
        }
        let (expires_at, expires_in) = expiry_sql(expiry);
        let (refill_interval, refill_day, refill_schedule) =
            s.schedule.map_or((None, None, "interval"), |r| r.columns());
        let own = s.permissions.unwrap_or_else(|| json!({}));
        let roles = s.roles.unwrap_or_default();
        let effective = crate::roles::effective(client, &own, &roles);
        // The identity its owner names, under the owner's lock (see identities::lock_owner).
        let identity_id = s.owner.as_deref().and_then(|owner| {
            crate::identities::lock_owner(client, owner);
            crate::identities::identity_of(client, owner)
        });
        let actor = audit::actor();
        let details =
            json!({"name": s.name, "owner": s.owner, "prefix": new.prefix, "master": new.master});
        let mut args: Vec<DatumWithOid> = vec![
            id.into(),
            hash.as_slice().into(),
            new.prefix.into(),
            new.start.into(),
            s.name.clone().into(),
            s.owner.clone().into(),
            s.description.into(),
            JsonB(own).into(),
            s.metadata.into(),
            s.role.into(),
            new.master.into(),
            s.enabled.unwrap_or(true).into(),
            expires_at.into(),
            expires_in.into(),
            s.remaining.into(),
            s.refill_amount.into(),
            refill_interval.map(interval).into(),
            s.rate_limit_max.into(),
            s.rate_limit_window.map(interval).into(),
            actor.into(),
            JsonB(details).into(),
            algorithm.as_str().into(),
            roles.into(),
            effective.map(JsonB).into(),
            s.ratelimits
                .filter(|l| !l.is_empty())
                .map(|l| JsonB(crate::limits::to_json(&l)))
                .into(),
            refill_day.into(),
            refill_schedule.into(),
            identity_id.into(),
            s.allowed_cidrs
                .as_deref()
                .and_then(crate::addresses::stored)
                .into(),
        ];
        let acting = audit::acting_key();
        let sql = insert_sql(new.id_given, acting.is_some());
        if let Some(acting) = acting {
            args.push(acting.into());
        }
        let table = plans::update(client, &sql, None, &args);
        if table.is_empty() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                format!("API key \"{}\" already exists", errors::shown(id)),
                Some("Choose another id, or leave id NULL to generate one."),
            );
        }
        errors::internal(
            table
                .first()
                .get_two::<TimestampWithTimeZone, TimestampWithTimeZone>(),
        )
    })
}

fn required_id(id: Option<String>) -> String {
    id.unwrap_or_else(|| invalid_argument("id", "must not be NULL"))
}

/// A row of `api_key_sql`: the key, when it was created, and the meter_versions at which
/// management last set its quota and its refill.
pub(crate) struct Row {
    key: ApiKey,
    created_us: i64,
    set_at: (i64, i64),
    /// `keys.credits`: update_credits since the quota was last set.
    credits: i64,
}

pub(crate) fn read_row(row: pgrx::spi::SpiHeapTupleData<'_>) -> Option<Row> {
    let key = errors::internal(row.get::<ApiKey>(1))?;
    let created_us =
        errors::internal(row.get::<TimestampWithTimeZone>(2)).map_or(0, verify::epoch_us);
    let remaining_version = errors::internal(row.get::<i64>(3)).unwrap_or(0);
    let refill_version = errors::internal(row.get::<i64>(4)).unwrap_or(0);
    let credits = errors::internal(row.get::<i64>(5)).unwrap_or(0);
    Some(Row {
        key,
        created_us,
        set_at: (remaining_version, refill_version),
        credits,
    })
}

/// The key with what shared memory holds beyond its rows: uses not written yet, and the quota
/// as it is now. Called outside SPI: the tuple is rebuilt in the caller's memory context.
pub(crate) fn with_live(row: Row) -> ApiKey {
    let mut key = row.key;
    let id = errors::internal(key.get_by_name::<String>("id")).unwrap_or_default();
    let live = crate::engine::live(&id, row.created_us, row.set_at);
    if let Some(live) = &live {
        let requests = errors::internal(key.get_by_name::<i64>("request_count")).unwrap_or(0);
        errors::internal(key.set_by_name("request_count", requests + live.uses as i64));
        if let Some(at) = live.last_used_us {
            let written =
                errors::internal(key.get_by_name::<TimestampWithTimeZone>("last_used_at"));
            let at = verify::from_epoch_us(at);
            errors::internal(key.set_by_name("last_used_at", written.map_or(at, |w| w.max(at))));
        }
    }
    with_live_quota(&mut key, live.as_ref(), row.credits);
    key
}

/// The quota columns of a key's or identity's row (`remaining`, `last_refill_at`,
/// `next_refill_at`) with what shared memory holds beyond the rows (`live`).
pub(crate) fn with_live_quota(
    row: &mut PgHeapTuple<'static, pgrx::AllocatedByRust>,
    live: Option<&crate::engine::Live>,
    credits: i64,
) {
    if let Some(live) = live {
        if let Some(remaining) = live.remaining_with(credits) {
            errors::internal(row.set_by_name("remaining", remaining));
        }
        if let Some(last_refill) = live.last_refill_us {
            errors::internal(
                row.set_by_name("last_refill_at", last_refill.map(verify::from_epoch_us)),
            );
        }
    }
    let next = next_refill(
        errors::internal(row.get_by_name::<i64>("refill_amount")),
        errors::internal(row.get_by_name::<TimestampWithTimeZone>("last_refill_at")),
        errors::internal(row.get_by_name::<Interval>("refill_interval")),
        errors::internal(row.get_by_name::<i32>("refill_day")),
        errors::internal(row.get_by_name::<String>("refill_schedule")).as_deref(),
    );
    errors::internal(row.set_by_name("next_refill_at", next));
}

/// When a quota that last refilled at `last` refills next (None without refill).
pub(crate) fn next_refill(
    amount: Option<i64>,
    last: Option<TimestampWithTimeZone>,
    interval: Option<Interval>,
    day: Option<i32>,
    schedule: Option<&str>,
) -> Option<TimestampWithTimeZone> {
    amount?;
    let last = verify::epoch_us(last?);
    let next = match verify::calendar_of(interval, day, schedule) {
        Some(calendar) => calendar.next_calendar(last)?,
        None => crate::engine::add_interval(last, interval?),
    };
    Some(verify::from_epoch_us(next))
}

/// The columns `read_row` reads, for keys `filter` selects (a WHERE clause over `k`).
pub(crate) fn api_key_sql(filter: &str) -> String {
    format!(
        "SELECT {API_KEY_ROW}, k.created_at, k.remaining_version, k.refill_version, k.credits \
         FROM {API_KEY_FROM} {filter}"
    )
}

fn first_row(table: pgrx::spi::SpiTupleTable<'_>) -> Option<Row> {
    if table.is_empty() {
        return None;
    }
    read_row(errors::internal(table.first().get_heap_tuple())?)
}

/// One key by id (never its secret or hash); NULL when there is no such key.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn get_api_key(id: Option<String>) -> Option<pgrx::composite_type!('static, "apikeys.api_key")> {
    let id = id?;
    let row = Spi::connect(|client| {
        first_row(plans::select(
            client,
            &api_key_sql("WHERE k.id = $1"),
            None,
            &[id.as_str().into()],
        ))
    });
    row.map(with_live)
}

/// Every key, or every key of one owner, oldest first.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn list_api_keys(
    owner: default!(Option<String>, "NULL"),
) -> SetOfIterator<'static, pgrx::composite_type!('static, "apikeys.api_key")> {
    let rows: Vec<Row> = Spi::connect(|client| {
        plans::select(
            client,
            &api_key_sql("WHERE $1::text IS NULL OR k.owner = $1 ORDER BY k.created_at, k.id"),
            None,
            &[owner.into()],
        )
        .filter_map(read_row)
        .collect()
    });
    SetOfIterator::new(rows.into_iter().map(with_live))
}

/// A dynamic `SET` list: only the columns a call changes are written.
struct Assignments<'a> {
    sql: Vec<String>,
    args: Vec<DatumWithOid<'a>>,
    changed: Vec<&'static str>,
}

impl<'a> Assignments<'a> {
    /// Adds `column_sql`, binding `values` to its `$?` placeholders in order.
    fn set(&mut self, field: &'static str, column_sql: &str, values: Vec<DatumWithOid<'a>>) {
        let mut sql = column_sql.to_owned();
        for value in values {
            self.args.push(value);
            sql = sql.replacen("$?", &format!("${}", self.args.len()), 1);
        }
        self.sql.push(sql);
        if !self.changed.contains(&field) {
            self.changed.push(field);
        }
    }

    /// `column = value` when a value is given, `column = default_sql` when the field is cleared.
    fn assign(
        &mut self,
        field: &'static str,
        value: Option<DatumWithOid<'a>>,
        cleared: bool,
        default_sql: &str,
    ) {
        match value {
            Some(v) => self.set(field, &format!("{field} = $?"), vec![v]),
            None if cleared => self.set(field, &format!("{field} = {default_sql}"), vec![]),
            None => {}
        }
    }
}

/// Changes a key. A NULL argument leaves its field as it is; `clear` names fields to reset to
/// their default ('expires_at' → never, 'remaining' → unlimited, 'rate_limit' → none, ...).
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn update_api_key(
    id: Option<String>,
    name: default!(Option<String>, "NULL"),
    owner: default!(Option<String>, "NULL"),
    permissions: default!(Option<Jsonb>, "NULL"),
    expires_in: default!(Option<Interval>, "NULL"),
    expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    role: default!(Option<String>, "NULL"),
    description: default!(Option<String>, "NULL"),
    metadata: default!(Option<Jsonb>, "NULL"),
    remaining: default!(Option<i64>, "NULL"),
    refill_amount: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    rate_limit_max: default!(Option<i32>, "NULL"),
    rate_limit_window: default!(Option<Interval>, "NULL"),
    enabled: default!(Option<bool>, "NULL"),
    clear: default!(Option<Vec<Option<String>>>, "NULL"),
    rate_limit_algorithm: default!(Option<String>, "NULL"),
    roles: default!(Option<Vec<Option<String>>>, "NULL"),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    refill_day: default!(Option<i32>, "NULL"),
    refill_schedule: default!(Option<String>, "NULL"),
    allowed_cidrs: default!(Option<Vec<Option<SqlCidr>>>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.api_key")> {
    let id = required_id(id);
    let update = errors::checked(Update::check(
        args(
            name,
            owner,
            permissions,
            expires_in,
            expires_at,
            role,
            description,
            metadata,
            remaining,
            refill_amount,
            refill_interval,
            rate_limit_max,
            rate_limit_window,
            rate_limit_algorithm,
            enabled,
            roles,
            ratelimits,
            refill_day,
            refill_schedule,
            allowed_cidrs,
        ),
        clear.unwrap_or_default().into_iter().flatten().collect(),
    ));
    update_key(&id, update).map(with_live)
}

/// Applies a checked update to key `id` (merged with its stored limits and live quota).
pub(crate) fn update_key(id: &str, update: Update) -> Option<Row> {
    Spi::connect_mut(|client| {
        // The quota as it stands: counted use (apikeys.meters, shared memory) included.
        let current = plans::update(
            client,
            concat!(
                "SELECT k.refill_amount, k.refill_interval, k.rate_limit_max, k.rate_limit_window, ",
                crate::remaining_sql!(),
                ", k.remaining_version, k.created_at, k.refill_version, k.permissions, k.roles,
                    k.credits, k.refill_day, k.refill_schedule
               FROM apikeys.keys k LEFT JOIN apikeys.meters m
                 ON m.key_id = k.id AND m.key_created_at = k.created_at
              WHERE k.id = $1 FOR UPDATE OF k"
            ),
            None,
            &[id.into()],
        );
        if current.is_empty() {
            key_not_found(id);
        }
        let cur = current.first();
        let (cur_amount, cur_interval, cur_max, cur_window, stored_remaining, set_at, created) =
            errors::internal((|| -> Result<_, pgrx::spi::SpiError> {
                Ok((
                    cur.get::<i64>(1)?,
                    cur.get::<Interval>(2)?,
                    cur.get::<i32>(3)?,
                    cur.get::<Interval>(4)?,
                    cur.get::<i64>(5)?,
                    (
                        cur.get::<i64>(6)?.unwrap_or(0),
                        cur.get::<i64>(8)?.unwrap_or(0),
                    ),
                    cur.get::<TimestampWithTimeZone>(7)?,
                ))
            })());
        let key_credits = errors::internal(cur.get::<i64>(11)).unwrap_or(0);
        let cur_remaining = crate::engine::remaining_now(
            id,
            created.map_or(0, verify::epoch_us),
            set_at,
            key_credits,
            stored_remaining,
        );
        let merged = errors::checked(update.merge(&StoredLimits {
            refill_amount: cur_amount,
            refill: crate::refills::Schedule::from_columns(
                cur_interval.map(span),
                errors::internal(cur.get::<i32>(12)),
                &errors::internal(cur.get::<String>(13)).unwrap_or_default(),
            ),
            rate_limit_max: cur_max,
            rate_limit_window: cur_window.map(span),
            remaining: cur_remaining,
        }));
        let s = update.settings;
        let cleared = update.cleared;
        if let Some(role) = &s.role {
            check_role_exists(client, role);
        }
        let (refill_given, rate_limit_given) = (s.refill_given(), s.rate_limit_given());
        // Effective permissions follow a change of the key's own permissions or of its roles.
        let perms_changed = s.permissions.is_some() || cleared.contains(&"permissions");
        let roles_changed = s.roles.is_some() || cleared.contains(&"roles");
        let effective = (perms_changed || roles_changed).then(|| {
            let own = match &s.permissions {
                Some(p) => p.clone(),
                None if cleared.contains(&"permissions") => json!({}),
                None => errors::internal(cur.get::<JsonB>(9)).map_or_else(|| json!({}), |p| p.0),
            };
            let roles: Vec<String> = match &s.roles {
                Some(r) => r.clone(),
                None if cleared.contains(&"roles") => vec![],
                None => errors::internal(cur.get::<Vec<Option<String>>>(10))
                    .unwrap_or_default()
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            crate::roles::effective(client, &own, &roles)
        });

        let mut set = Assignments {
            sql: vec![],
            args: vec![id.into()],
            changed: vec![],
        };
        let plain_fields: [(&'static str, Option<DatumWithOid>, &str); 9] = [
            ("name", s.name.map(Into::into), "NULL"),
            ("owner", s.owner.clone().map(Into::into), "NULL"),
            ("description", s.description.map(Into::into), "NULL"),
            ("role", s.role.map(Into::into), "NULL"),
            (
                "permissions",
                s.permissions.map(|p| JsonB(p).into()),
                "'{}'",
            ),
            ("metadata", s.metadata.map(Into::into), "NULL"),
            ("enabled", s.enabled.map(Into::into), "true"),
            ("roles", s.roles.map(Into::into), "'{}'"),
            (
                "ratelimits",
                s.ratelimits.map(|l| {
                    (!l.is_empty())
                        .then(|| JsonB(crate::limits::to_json(&l)))
                        .into()
                }),
                "NULL",
            ),
        ];
        for (field, value, default_sql) in plain_fields {
            set.assign(field, value, cleared.contains(&field), default_sql);
        }
        if let Some(list) = &s.allowed_cidrs {
            let stored = crate::addresses::stored(list);
            set.set(
                "allowed_cidrs",
                "allowed_cidrs = $?::text[]::cidr[]",
                vec![stored.into()],
            );
        } else if cleared.contains(&"allowed_cidrs") {
            set.set("allowed_cidrs", "allowed_cidrs = NULL", vec![]);
        }
        // A new owner may name an identity (or none): the key follows it.
        if let Some(owner) = &s.owner {
            crate::identities::lock_owner(client, owner);
            let identity = crate::identities::identity_of(client, owner);
            set.set("owner", "identity_id = $?", vec![identity.into()]);
        } else if cleared.contains(&"owner") {
            set.set("owner", "identity_id = NULL", vec![]);
        }
        if let Some(effective) = effective {
            set.set(
                if perms_changed {
                    "permissions"
                } else {
                    "roles"
                },
                "effective_permissions = $?",
                vec![effective.map(JsonB).into()],
            );
        }
        if let Some(expiry) = s.expiry {
            let (at, within) = expiry_sql(expiry);
            set.set(
                "expires_at",
                "expires_at = COALESCE($?, clock_timestamp() + $?)",
                vec![at.into(), within.into()],
            );
        } else if cleared.contains(&"expires_at") {
            set.set("expires_at", "expires_at = NULL", vec![]);
        }
        let final_remaining = merged.remaining;
        // A quota set (or a refill configured) is a new meter_version, which the next
        // verification loads. What management sets starts from its value; what it does not set
        // (the quota left when only the refill changes) goes on from what use left it at, spends
        // made meanwhile included.
        let remaining_set = s.remaining.is_some() || final_remaining != cur_remaining;
        let refill_set = refill_given || cleared.contains(&"refill");
        if remaining_set || refill_set {
            set.set("remaining", "meter_version = meter_version + 1", vec![]);
        }
        if remaining_set {
            set.set("remaining", "remaining = $?", vec![final_remaining.into()]);
            set.set("remaining", "remaining_version = meter_version + 1", vec![]);
            // A set quota is what is left from now on: earlier credits are in it.
            set.set("remaining", "credits = 0", vec![]);
        }
        if refill_set {
            set.set("refill", "refill_version = meter_version + 1", vec![]);
        }
        // A newly configured refill starts its clock now.
        if refill_given {
            set.set(
                "refill",
                "refill_amount = $?",
                vec![merged.refill_amount.into()],
            );
            let (refill_interval, refill_day, refill_schedule) = merged
                .refill
                .map_or((None, None, "interval"), |r| r.columns());
            set.set(
                "refill",
                "refill_interval = $?, refill_day = $?, refill_schedule = $?",
                vec![
                    refill_interval.map(interval).into(),
                    refill_day.into(),
                    refill_schedule.into(),
                ],
            );
            set.set("refill", "last_refill_at = clock_timestamp()", vec![]);
        } else if cleared.contains(&"refill") {
            set.set(
                "refill",
                "refill_amount = NULL, refill_interval = NULL, refill_day = NULL, \
                 refill_schedule = 'interval', last_refill_at = NULL",
                vec![],
            );
        }
        if rate_limit_given {
            set.set(
                "rate_limit",
                "rate_limit_max = $?",
                vec![merged.rate_limit_max.into()],
            );
            set.set(
                "rate_limit",
                "rate_limit_window = $?",
                vec![merged.rate_limit_window.map(interval).into()],
            );
        } else if cleared.contains(&"rate_limit") {
            set.set(
                "rate_limit",
                "rate_limit_max = NULL, rate_limit_window = NULL",
                vec![],
            );
        }
        if let Some(algorithm) = s.algorithm {
            set.set(
                "rate_limit_algorithm",
                "rate_limit_algorithm = $?",
                vec![algorithm.as_str().into()],
            );
        }
        let actor = audit::actor();
        let changed: Vec<&str> = set.changed.clone();
        set.set("updated_by", "updated_by = $?", vec![actor.into()]);
        set.set("updated_by", "updated_at = clock_timestamp()", vec![]);
        errors::internal(client.update(
            &format!(
                "UPDATE apikeys.keys SET {} WHERE id = $1",
                set.sql.join(", ")
            ),
            None,
            &set.args,
        ));
        audit::record(client, "update", Some(id), json!({ "changed": changed }));
        first_row(plans::update(
            client,
            &api_key_sql("WHERE k.id = $1"),
            None,
            &[id.into()],
        ))
    })
}

/// Revokes a key for good: verify_key says REVOKED from now on. True if this call revoked it,
/// false if it already was.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_api_key(id: Option<String>) -> bool {
    revoke(&required_id(id))
}

/// Revokes key `id` (P0002 if there is none); false if it already was.
pub(crate) fn revoke(id: &str) -> bool {
    Spi::connect_mut(|client| {
        let revoked = plans::update(client,
            "UPDATE apikeys.keys SET revoked_at = clock_timestamp(), updated_at = clock_timestamp(), \
             updated_by = $2 WHERE id = $1 AND revoked_at IS NULL RETURNING id",
            None,
            &[id.into(), audit::actor().into()],
        );
        if !revoked.is_empty() {
            audit::record(client, "revoke", Some(id), json!({}));
            return true;
        }
        let exists = plans::select(
            client,
            "SELECT 1 FROM apikeys.keys WHERE id = $1",
            None,
            &[id.into()],
        );
        if exists.is_empty() {
            key_not_found(id);
        }
        false
    })
}

/// Deletes a key: verify_key says NOT_FOUND from now on. False if there was no such key.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn delete_api_key(id: Option<String>) -> bool {
    let Some(id) = id else { return false };
    Spi::connect_mut(|client| {
        let deleted = plans::update(
            client,
            "WITH gone AS (DELETE FROM apikeys.keys WHERE id = $1 RETURNING id),
                  counted AS (DELETE FROM apikeys.meters WHERE key_id IN (SELECT id FROM gone))
             SELECT id FROM gone",
            None,
            &[id.as_str().into()],
        );
        let deleted = !deleted.is_empty();
        if deleted {
            audit::record(client, "delete", Some(&id), json!({}));
        }
        deleted
    })
}

/// Gives a key a new secret, keeping its id and settings. The old key keeps working for
/// `grace` (default: not at all), then verify_key says EXPIRED for it.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_api_key(
    id: Option<String>,
    grace: default!(Option<Interval>, "'0'"),
) -> TableIterator<
    'static,
    (
        name!(id, String),
        name!(key, String),
        name!(start, String),
        name!(expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let id = required_id(id);
    let (key, start, expires_at) = rotate(&id, grace);
    TableIterator::once((id, key, start, expires_at))
}

/// Rotates key `id` (P0002 if there is none): its new key, start and expiry.
pub(crate) fn rotate(
    id: &str,
    grace: Option<Interval>,
) -> (String, String, Option<TimestampWithTimeZone>) {
    let grace = check_duration(
        "grace",
        grace.unwrap_or_else(|| Interval::from_micros(0)),
        true,
    );
    let keep_old = grace.as_micros() > 0;
    Spi::connect_mut(|client| {
        let current = plans::update(
            client,
            "SELECT prefix FROM apikeys.keys WHERE id = $1 FOR UPDATE",
            None,
            &[id.into()],
        );
        if current.is_empty() {
            key_not_found(id);
        }
        let prefix = errors::internal(current.first().get::<String>(1)).unwrap_or_default();
        let (key, start) = key_format::generate(&prefix);
        let row = plans::update(
            client,
            "UPDATE apikeys.keys SET hash = $2, start = $3,
                previous_hash = CASE WHEN $4 THEN hash END,
                previous_valid_until = CASE WHEN $4 THEN clock_timestamp() + $5 END,
                updated_at = clock_timestamp(), updated_by = $6
             WHERE id = $1 RETURNING expires_at",
            None,
            &[
                id.into(),
                key_format::hash(&key).as_slice().into(),
                start.as_str().into(),
                keep_old.into(),
                grace.into(),
                audit::actor().into(),
            ],
        );
        let expires_at = errors::internal(row.first().get::<TimestampWithTimeZone>(1));
        audit::record(
            client,
            "rotate",
            Some(id),
            json!({ "grace_seconds": grace.as_micros() / 1_000_000 }),
        );
        (key, start, expires_at)
    })
}

/// Deletes keys that expired more than `older_than` ago; returns how many.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn delete_expired_api_keys(older_than: default!(Option<Interval>, "'0'")) -> i64 {
    let older_than = check_duration(
        "older_than",
        older_than.unwrap_or_else(|| Interval::from_micros(0)),
        true,
    );
    Spi::connect_mut(|client| {
        let count = plans::update(
            client,
            "WITH gone AS (
                DELETE FROM apikeys.keys WHERE expires_at <= clock_timestamp() - $1 RETURNING id
             ), counted AS (
                DELETE FROM apikeys.meters WHERE key_id IN (SELECT id FROM gone)
             ), audit AS (
                INSERT INTO apikeys.audit_log (actor, action, key_id, details)
                SELECT $2, 'delete_expired', id, '{}' FROM gone
             )
             SELECT count(*) FROM gone",
            None,
            &[older_than.into(), audit::actor().into()],
        );
        errors::internal(count.first().get::<i64>(1)).unwrap_or(0)
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::key_format;
    use crate::test_support::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn create_returns_the_key_once_and_stores_only_its_hash() {
        let (id, key) = create("name => 'billing', owner => 'acme'");
        assert!(id.starts_with("key_"));
        let parsed = key_format::parse(&key).expect("well-formed key");
        assert_eq!(parsed.prefix, "sk");
        let row = format!("FROM apikeys.keys WHERE id = '{id}'");
        assert_eq!(
            one::<Vec<u8>>(&format!("SELECT hash {row}")),
            Some(key_format::hash(&key))
        );
        assert_eq!(
            one::<String>(&format!("SELECT start {row}")),
            Some(parsed.start())
        );
        // No column of the stored row, nor of get_api_key, contains the key.
        assert_eq!(
            one::<bool>(&format!(
                "SELECT strpos(k::text, '{key}') = 0 FROM apikeys.keys k WHERE id = '{id}'"
            )),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!(
                "SELECT strpos(apikeys.get_api_key('{id}')::text, '{key}') = 0"
            )),
            Some(true)
        );
        assert_eq!(
            one::<String>(&format!("SELECT owner FROM apikeys.get_api_key('{id}')")).as_deref(),
            Some("acme")
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT created_by FROM apikeys.get_api_key('{id}')"
            ))
            .as_deref(),
            Some("postgres")
        );
    }

    #[pg_test]
    fn prefixes_and_the_default_prefix_setting() {
        let (_, key) = create("prefix => 'live'");
        assert!(key.starts_with("live_"));
        run("SET LOCAL apikeys.default_prefix = 'test0'");
        let (_, key) = create("");
        assert!(key.starts_with("test0_"));
        assert_eq!(code(&key, ""), "VALID");
        assert_error(
            "SELECT apikeys.create_api_key(prefix => 'Bad_Prefix')",
            "22023",
            "\"prefix\"",
        );
        assert_error(
            "SELECT apikeys.create_api_key(prefix => '')",
            "22023",
            "\"prefix\"",
        );
        assert_error(
            "SELECT apikeys.create_api_key(prefix => 'abcdefghijklmnopq')",
            "22023",
            "\"prefix\"",
        );
        assert_error(
            "SET LOCAL apikeys.default_prefix = 'NO!'",
            "22023",
            "apikeys.default_prefix",
        );
        assert_error(
            "SET LOCAL apikeys.default_prefix = ''",
            "22023",
            "apikeys.default_prefix",
        );
        assert_eq!(
            one::<String>("SELECT current_setting('apikeys.default_prefix')").as_deref(),
            Some("test0")
        );
    }

    #[pg_test]
    fn expiry_arguments_and_the_default_ttl_setting() {
        let (id, _) = create("expires_in => '10 hours'");
        assert_eq!(one::<bool>(&format!("SELECT expires_at BETWEEN now() + interval '9 hours 59 minutes' AND clock_timestamp() + interval '10 hours' FROM apikeys.keys WHERE id = '{id}'")), Some(true));
        let (id, _) = create("expires_in => '3600000 ms'");
        assert_eq!(one::<bool>(&format!("SELECT expires_at > now() + interval '59 minutes' FROM apikeys.keys WHERE id = '{id}'")), Some(true));
        let (id, _) = create("");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT expires_at IS NULL FROM apikeys.keys WHERE id = '{id}'"
            )),
            Some(true)
        );
        run("SET LOCAL apikeys.default_key_ttl = '6 days'");
        let (id, _) = create("");
        assert_eq!(one::<bool>(&format!("SELECT expires_at > now() + interval '5 days 23 hours' FROM apikeys.keys WHERE id = '{id}'")), Some(true));
        let (id, _) = create("expires_at => 'infinity'");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT expires_at IS NULL FROM apikeys.keys WHERE id = '{id}'"
            )),
            Some(true)
        );
        run("SET LOCAL apikeys.default_key_ttl = 'soon'");
        assert_error(
            "SELECT apikeys.create_api_key()",
            "22023",
            "apikeys.default_key_ttl",
        );
        run("SET LOCAL apikeys.default_key_ttl = ''");
        assert_error(
            "SELECT apikeys.create_api_key(expires_in => '1 day', expires_at => now())",
            "22023",
            "\"expires_at\"",
        );
        assert_error(
            "SELECT apikeys.create_api_key(expires_in => '0')",
            "22023",
            "\"expires_in\"",
        );
        assert_error(
            "SELECT apikeys.create_api_key(expires_in => '-1 day')",
            "22023",
            "\"expires_in\"",
        );
    }

    #[pg_test]
    fn arguments_are_checked() {
        for (args, arg) in [
            ("remaining => -1", "remaining"),
            ("rate_limit_max => 5", "rate_limit_window"),
            ("rate_limit_window => '1 minute'", "rate_limit_max"),
            (
                "rate_limit_max => 0, rate_limit_window => '1 minute'",
                "rate_limit_max",
            ),
            (
                "rate_limit_max => 5, rate_limit_window => '0'",
                "rate_limit_window",
            ),
            ("refill_amount => 5", "refill_interval"),
            ("refill_interval => '1 day'", "refill_amount"),
            (
                "refill_amount => -5, refill_interval => '1 day'",
                "refill_amount",
            ),
            (
                "refill_amount => 5, refill_interval => '-1 day'",
                "refill_interval",
            ),
            (
                "refill_amount => 5, refill_interval => '1001 years'",
                "refill_interval",
            ),
            (
                "rate_limit_max => 5, rate_limit_window => '1000000 years'",
                "rate_limit_window",
            ),
            ("expires_in => '178000000 years'", "expires_in"),
            (
                "rate_limit_max => 5, rate_limit_window => '1 mon -29 days'",
                "rate_limit_window",
            ),
            ("expires_in => '1 day -1 hour'", "expires_in"),
            ("role => 'no_such_role'", "role"),
            ("permissions => '[\"orders\"]'", "permissions"),
            ("permissions => '{\"orders\": \"read\"}'", "permissions"),
            ("permissions => '{\"orders\": [1]}'", "permissions"),
            ("permissions => '\"*\"'", "permissions"),
            ("id => ''", "id"),
            ("id => 'has space'", "id"),
            ("id => 'ключ'", "id"),
            ("name => repeat('x', 1000000)", "name"),
            ("owner => repeat('x', 1000000)", "owner"),
            ("description => repeat('é', 1000000)", "description"),
            (
                "metadata => jsonb_build_object('blob', repeat('x', 1000000))",
                "metadata",
            ),
            ("secret => 'short'", "secret"),
            ("secret => ''", "secret"),
            ("secret => 'has spaces in the secret'", "secret"),
            ("secret => repeat('x', 257)", "secret"),
            ("secret => 'eyJhbGciOiJub25lIn0.e30.'", "secret"),
        ] {
            assert_error(
                &format!("SELECT apikeys.create_api_key({args})"),
                "22023",
                &format!("\"{arg}\""),
            );
        }
        // Non-ASCII where text is free-form is fine.
        let (id, key) = create("name => 'ключ 🔑', owner => '租户'");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(
            one::<String>(&format!("SELECT name FROM apikeys.get_api_key('{id}')")).as_deref(),
            Some("ключ 🔑")
        );
    }

    #[pg_test]
    fn caller_chosen_ids_and_imported_secrets() {
        let (id, key) = create("id => 'svc-1'");
        assert_eq!(id, "svc-1");
        assert_error(
            "SELECT apikeys.create_api_key(id => 'svc-1')",
            "23505",
            "svc-1",
        );
        assert_error(
            &format!("SELECT apikeys.create_api_key(secret => '{key}')"),
            "23505",
            "already registered",
        );
        run("SELECT apikeys.delete_api_key('svc-1')");
        let (id, same) = create(&format!("id => 'svc-2', secret => '{key}', remaining => 1"));
        assert_eq!(same, key);
        assert_eq!(field::<String>(&key, "", "key_id"), Some(id));
        let (_, live) = create("prefix => 'live'");
        assert_error(
            &format!("SELECT apikeys.create_api_key(secret => '{live}', prefix => 'sk')"),
            "22023",
            "\"prefix\"",
        );
    }

    #[pg_test]
    fn get_and_list() {
        create("id => 'a1', owner => 'alice'");
        create("id => 'a2', owner => 'alice'");
        create("id => 'b1', owner => 'bob'");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_api_keys('alice')"),
            Some(2)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_api_keys()"),
            Some(3)
        );
        assert_eq!(
            one::<String>("SELECT string_agg(id, ',') FROM apikeys.list_api_keys('alice')")
                .as_deref(),
            Some("a1,a2")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_api_keys('nobody')"),
            Some(0)
        );
        assert_eq!(
            one::<String>("SELECT owner FROM apikeys.get_api_key('b1')").as_deref(),
            Some("bob")
        );
        assert_eq!(
            one::<bool>("SELECT apikeys.get_api_key('zzz') IS NULL"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT apikeys.get_api_key(NULL) IS NULL"),
            Some(true)
        );
    }

    #[pg_test]
    fn update_changes_given_fields_and_clears_named_ones() {
        let (id, key) = create("name => 'n', owner => 'o', expires_in => '1 day', remaining => 5, rate_limit_max => 1, rate_limit_window => '1 hour', metadata => '{\"a\": 1}'");
        let row = |col: &str| {
            one::<String>(&format!(
                "SELECT ({col})::text FROM apikeys.get_api_key('{id}')"
            ))
        };
        run(&format!("SELECT apikeys.update_api_key('{id}', name => 'n2', permissions => '{{\"orders\": [\"read\"]}}')"));
        assert_eq!(row("name").as_deref(), Some("n2"));
        assert_eq!(
            row("owner").as_deref(),
            Some("o"),
            "NULL leaves a field unchanged"
        );
        assert_eq!(row("remaining").as_deref(), Some("5"));
        assert_eq!(code(&key, "'{\"orders\": [\"read\"]}'"), "VALID");
        assert_eq!(code(&key, ""), "RATE_LIMITED");
        run(&format!("SELECT apikeys.update_api_key('{id}', clear => ARRAY['expires_at', 'remaining', 'rate_limit', 'metadata'])"));
        assert_eq!(row("expires_at"), None);
        assert_eq!(row("remaining"), None);
        assert_eq!(row("rate_limit_max"), None);
        assert_eq!(row("metadata"), None);
        assert_eq!(code(&key, ""), "VALID");
        run(&format!("SELECT apikeys.update_api_key('{id}', remaining => 0, expires_at => now() - interval '1 s')"));
        assert_eq!(code(&key, ""), "EXPIRED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', expires_in => '1 hour')"
        ));
        assert_eq!(code(&key, ""), "USAGE_EXCEEDED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', refill_amount => 2, refill_interval => '1 day')"
        ));
        assert_eq!(row("refill_amount").as_deref(), Some("2"));
        // A refilling key always has a quota: clearing `remaining` refills it.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['remaining'])"
        ));
        assert_eq!(row("remaining").as_deref(), Some("2"));
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['refill', 'remaining'])"
        ));
        assert_eq!((row("remaining"), row("refill_interval")), (None, None));
        assert_eq!(row("updated_by").as_deref(), Some("postgres"));
        // The returned row is the updated key.
        assert_eq!(
            one::<String>(&format!(
                "SELECT (apikeys.update_api_key('{id}', description => 'd')).description"
            ))
            .as_deref(),
            Some("d")
        );
    }

    #[pg_test]
    fn update_checks_its_arguments() {
        create("id => 'u1'");
        assert_error(
            "SELECT apikeys.update_api_key('nope', name => 'x')",
            "P0002",
            "nope",
        );
        assert_error(
            "SELECT apikeys.update_api_key(NULL, name => 'x')",
            "22023",
            "\"id\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', rate_limit_max => 3)",
            "22023",
            "\"rate_limit_window\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', refill_interval => '1 day')",
            "22023",
            "\"refill_amount\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', clear => ARRAY['colour'])",
            "22023",
            "\"clear\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', name => 'x', clear => ARRAY['name'])",
            "22023",
            "\"clear\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', remaining => -1)",
            "22023",
            "\"remaining\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', role => 'no_such_role')",
            "22023",
            "\"role\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', permissions => '[]')",
            "22023",
            "\"permissions\"",
        );
        assert_error(
            "SELECT apikeys.update_api_key('u1', expires_in => '-1 s')",
            "22023",
            "\"expires_in\"",
        );
        run("CREATE ROLE key_role");
        run("SELECT apikeys.update_api_key('u1', role => 'key_role', rate_limit_max => 3, rate_limit_window => '1 s')");
        assert_eq!(
            one::<String>("SELECT role FROM apikeys.get_api_key('u1')").as_deref(),
            Some("key_role")
        );
        run("SELECT apikeys.update_api_key('u1', rate_limit_max => 4)");
        assert_eq!(
            one::<i32>("SELECT rate_limit_max FROM apikeys.get_api_key('u1')"),
            Some(4)
        );
    }

    #[pg_test]
    fn revoke_delete_rotate_and_unknown_ids() {
        let (id, key) = create("");
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.revoke_api_key('{id}')")),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.revoke_api_key('{id}')")),
            Some(false)
        );
        assert_eq!(code(&key, ""), "REVOKED");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT (apikeys.get_api_key('{id}')).revoked_at IS NOT NULL"
            )),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.delete_api_key('{id}')")),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.delete_api_key('{id}')")),
            Some(false)
        );
        assert_eq!(code(&key, ""), "NOT_FOUND");
        assert_error("SELECT apikeys.revoke_api_key('nope')", "P0002", "nope");
        assert_error("SELECT apikeys.rotate_api_key('nope')", "P0002", "nope");
        let (id, _) = create("prefix => 'rot'");
        assert_error(
            &format!("SELECT apikeys.rotate_api_key('{id}', grace => '-1 s')"),
            "22023",
            "\"grace\"",
        );
        assert_error(
            &format!("SELECT apikeys.rotate_api_key('{id}', grace => '5000 years')"),
            "22023",
            "\"grace\"",
        );
        let rotated =
            one::<String>(&format!("SELECT key FROM apikeys.rotate_api_key('{id}')")).unwrap();
        assert!(rotated.starts_with("rot_"), "rotation keeps the prefix");
    }

    #[pg_test]
    fn delete_expired_keys() {
        create("id => 'old', expires_at => now() - interval '2 days'");
        create("id => 'recent', expires_at => now() - interval '1 hour'");
        create("id => 'live', expires_in => '1 day'");
        create("id => 'forever'");
        assert_eq!(
            one::<i64>("SELECT apikeys.delete_expired_api_keys(older_than => '1 day')"),
            Some(1)
        );
        assert_eq!(
            one::<i64>("SELECT apikeys.delete_expired_api_keys()"),
            Some(1)
        );
        assert_eq!(
            one::<String>("SELECT string_agg(id, ',' ORDER BY id) FROM apikeys.keys").as_deref(),
            Some("forever,live")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.audit_log WHERE action = 'delete_expired'"),
            Some(2)
        );
        assert_error(
            "SELECT apikeys.delete_expired_api_keys('-1 day')",
            "22023",
            "\"older_than\"",
        );
        assert_error(
            "SELECT apikeys.delete_expired_api_keys('1000000 years')",
            "22023",
            "\"older_than\"",
        );
    }

    #[pg_test]
    fn privileges_public_verifies_but_cannot_manage_or_read_tables() {
        let (_, key) = create("");
        run("CREATE ROLE plain_user");
        run("SET LOCAL ROLE plain_user");
        assert_eq!(code(&key, ""), "VALID");
        assert_error(
            "SELECT apikeys.create_api_key()",
            "42501",
            "permission denied",
        );
        assert_error(
            "SELECT apikeys.list_api_keys()",
            "42501",
            "permission denied",
        );
        assert_error(
            "SELECT apikeys.revoke_api_key('x')",
            "42501",
            "permission denied",
        );
        assert_error("SELECT * FROM apikeys.keys", "42501", "permission denied");
        assert_error(
            "SELECT * FROM apikeys.audit_log",
            "42501",
            "permission denied",
        );
        assert_error(
            "UPDATE apikeys.keys SET remaining = 100",
            "42501",
            "permission denied",
        );
        run("RESET ROLE");
        // A DBA grants management to an admin role, which then works without table access.
        run("CREATE ROLE key_admin; GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA apikeys TO key_admin");
        run("SET LOCAL ROLE key_admin");
        let (id, _) = create("name => 'by admin'");
        assert_error("SELECT * FROM apikeys.keys", "42501", "permission denied");
        run("RESET ROLE");
        assert_eq!(
            one::<String>(&format!(
                "SELECT created_by FROM apikeys.keys WHERE id = '{id}'"
            ))
            .as_deref(),
            Some("key_admin")
        );
    }

    #[pg_test]
    fn null_arguments_mean_defaults_or_a_clear_error() {
        let (id, key) = create(
            "name => NULL, owner => NULL, permissions => NULL, expires_in => NULL, expires_at => NULL, \
             prefix => NULL, id => NULL, secret => NULL, role => NULL, description => NULL, \
             metadata => NULL, master => NULL, remaining => NULL, refill_amount => NULL, \
             refill_interval => NULL, rate_limit_max => NULL, rate_limit_window => NULL, enabled => NULL",
        );
        assert_eq!(code(&key, "NULL, NULL"), "VALID");
        let row = format!("FROM apikeys.get_api_key('{id}')");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT enabled AND NOT master AND permissions = '{{}}' {row}"
            )),
            Some(true)
        );
        assert_error("SELECT apikeys.update_api_key(NULL)", "22023", "\"id\"");
        assert_error("SELECT apikeys.revoke_api_key(NULL)", "22023", "\"id\"");
        assert_error("SELECT apikeys.rotate_api_key(NULL)", "22023", "\"id\"");
        assert_eq!(
            one::<bool>("SELECT apikeys.delete_api_key(NULL)"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT apikeys.get_api_key(NULL) IS NULL"),
            Some(true)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_api_keys(NULL)"),
            Some(1)
        );
        assert_eq!(
            one::<i64>("SELECT apikeys.delete_expired_api_keys(NULL)"),
            Some(0)
        );
        // NULL everywhere in update leaves the key unchanged.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', name => NULL, owner => NULL, permissions => NULL, \
             expires_in => NULL, expires_at => NULL, role => NULL, description => NULL, metadata => NULL, \
             remaining => NULL, refill_amount => NULL, refill_interval => NULL, rate_limit_max => NULL, \
             rate_limit_window => NULL, enabled => NULL, clear => NULL)"
        ));
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY[NULL]::text[])"
        ));
        assert_eq!(code(&key, ""), "VALID");
        let rotated = one::<String>(&format!(
            "SELECT key FROM apikeys.rotate_api_key('{id}', NULL)"
        ))
        .unwrap();
        assert_eq!(code(&rotated, ""), "VALID");
    }

    #[pg_test]
    fn every_table_is_dumped_with_its_data() {
        let dumped = one::<String>(
            "SELECT string_agg(c.relname, ',' ORDER BY c.relname) FROM pg_extension e, unnest(e.extconfig) cfg, pg_class c WHERE e.extname = 'pg_apikeys' AND c.oid = cfg",
        );
        assert_eq!(
            dumped.as_deref(),
            Some("audit_log,audit_log_id_seq,identities,identities_id_seq,identity_meters,keys,meters,ratelimit_overrides,roles,signing_keys,verification_batches,verification_counts,verification_rollup")
        );
    }
}
