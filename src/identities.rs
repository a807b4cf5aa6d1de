//! Identities (SPEC §7): a tenant, user or team, named by the `owner` its keys carry, whose
//! keys share its quota, its named rate limits and its metadata. Management keeps each key's
//! `identity_id` (the identity its owner names) current, so a verification reads the identity
//! only for keys that have one. The identity's quota is metered by the engine like a key's
//! (entry `engine::identity_entry`, rows in `apikeys.identity_meters`); its named limits are
//! shared-memory windows.

use crate::addresses::SqlCidr;
use crate::errors::{self, invalid_argument};
use crate::jsonb::Jsonb;
use crate::keys::{interval, span};
use crate::plans;
use crate::settings::{self, Args, Settings, StoredLimits, Update};
use crate::{audit, credits, engine, verify};
use pgrx::datum::{DatumWithOid, Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::json;

type Identity = pgrx::composite_type!('static, "apikeys.identity");

/// Serializes the link between keys and the identity their owner names: create_identity and
/// delete_identity, and creating or re-owning a key, take this lock on the owner first, so a key
/// created while its owner's identity is being created is linked either way.
pub fn lock_owner(client: &mut SpiClient<'_>, owner: &str) {
    plans::update(
        client,
        "SELECT pg_catalog.pg_advisory_xact_lock(1634757481, pg_catalog.hashtext($1))",
        None,
        &[owner.into()],
    );
}

/// The id of the identity `owner` names, if any (after `lock_owner`).
pub fn identity_of(client: &mut SpiClient<'_>, owner: &str) -> Option<i64> {
    let table = plans::update(
        client,
        "SELECT id FROM apikeys.identities WHERE owner = $1",
        None,
        &[owner.into()],
    );
    if table.is_empty() {
        return None;
    }
    errors::internal(table.first().get::<i64>(1))
}

pub fn identity_not_found(owner: &str) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("identity \"{}\" does not exist", errors::shown(owner)),
        Some("apikeys.list_identities() shows the identities."),
    )
}

fn required_owner(owner: Option<String>) -> String {
    let owner = owner.unwrap_or_else(|| invalid_argument("owner", "must not be NULL"));
    let owner = errors::checked(settings::text(
        "owner",
        Some(owner),
        settings::MAX_NAME_CHARS,
    ))
    .unwrap_or_default();
    if owner.is_empty() {
        invalid_argument("owner", "must not be empty");
    }
    owner
}

/// The arguments an identity takes (a subset of a key's).
#[allow(clippy::too_many_arguments)]
fn args(
    metadata: Option<Jsonb>,
    remaining: Option<i64>,
    refill_amount: Option<i64>,
    refill_interval: Option<Interval>,
    refill_day: Option<i32>,
    ratelimits: Option<Jsonb>,
    refill_schedule: Option<String>,
    rate_limit_algorithm: Option<String>,
    allowed_cidrs: Option<Vec<Option<SqlCidr>>>,
) -> Args {
    Args {
        metadata,
        remaining,
        refill_amount,
        refill_interval: refill_interval.map(span),
        refill_day,
        refill_schedule,
        ratelimits: crate::jsonb::argument("ratelimits", ratelimits)
            .map(|v| crate::limits::parse_config(&v, crate::keys::pg_duration)),
        rate_limit_algorithm,
        allowed_cidrs: crate::addresses::argument(allowed_cidrs),
        ..Args::default()
    }
}

/// What `clear` may name for an identity.
const CLEARABLE: [&str; 5] = [
    "metadata",
    "remaining",
    "refill",
    "ratelimits",
    "allowed_cidrs",
];

/// An identity row (`apikeys.identity`) with what the engine needs to add live counts.
struct Row {
    identity: Identity,
    id: i64,
    created_us: i64,
    set_at: (i64, i64),
    credits: i64,
}

/// The identities `filter` (a WHERE clause over `k`, the identities) selects.
fn rows_sql(filter: &str) -> String {
    format!(
        "SELECT ROW(k.owner, k.metadata, {}, k.refill_amount, k.refill_interval, k.refill_day,
                    k.refill_schedule,
                    CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at
                         ELSE k.last_refill_at END,
                    NULL::timestamptz, k.ratelimits, k.rate_limit_algorithm, k.created_at,
                    k.created_by, k.updated_at, k.updated_by, k.allowed_cidrs)::apikeys.identity,
                k.id, k.created_at, k.remaining_version, k.refill_version, k.credits
           FROM apikeys.identities k LEFT JOIN apikeys.identity_meters m
             ON m.identity_id = k.id AND m.identity_created_at = k.created_at
          {filter}",
        crate::remaining_sql!()
    )
}

fn read_row(row: pgrx::spi::SpiHeapTupleData<'_>) -> Option<Row> {
    Some(Row {
        identity: errors::internal(row.get::<Identity>(1))?,
        id: errors::internal(row.get::<i64>(2))?,
        created_us: errors::internal(row.get::<TimestampWithTimeZone>(3))
            .map_or(0, verify::epoch_us),
        set_at: (
            errors::internal(row.get::<i64>(4)).unwrap_or(0),
            errors::internal(row.get::<i64>(5)).unwrap_or(0),
        ),
        credits: errors::internal(row.get::<i64>(6)).unwrap_or(0),
    })
}

/// The identity with what shared memory holds beyond its rows (the quota as it is now, the last
/// refill) and when it refills next. Called outside SPI.
fn with_live(row: Row) -> Identity {
    let mut identity = row.identity;
    let live = engine::live(&engine::identity_entry(row.id), row.created_us, row.set_at);
    crate::keys::with_live_quota(&mut identity, live.as_ref(), row.credits);
    identity
}

fn first_row(client: &mut SpiClient<'_>, owner: &str) -> Option<Row> {
    let table = plans::update(
        client,
        &rows_sql("WHERE k.owner = $1"),
        None,
        &[owner.into()],
    );
    if table.is_empty() {
        return None;
    }
    read_row(errors::internal(table.first().get_heap_tuple())?)
}

/// Creates an identity: the keys whose owner is `owner` (those that exist and those created
/// later) share its quota (`remaining`, refilled by `refill_amount` every `refill_interval`,
/// daily with `refill_schedule => 'calendar'`, or monthly on `refill_day`), its named rate limits
/// (`ratelimits`, as for keys) and its metadata. 23505 if it exists.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn create_identity(
    owner: Option<String>,
    metadata: default!(Option<Jsonb>, "NULL"),
    remaining: default!(Option<i64>, "NULL"),
    refill_amount: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    refill_day: default!(Option<i32>, "NULL"),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    refill_schedule: default!(Option<String>, "NULL"),
    rate_limit_algorithm: default!(Option<String>, "NULL"),
    allowed_cidrs: default!(Option<Vec<Option<SqlCidr>>>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.identity")> {
    let owner = required_owner(owner);
    let s = errors::checked(Settings::for_create(args(
        metadata,
        remaining,
        refill_amount,
        refill_interval,
        refill_day,
        ratelimits,
        refill_schedule,
        rate_limit_algorithm,
        allowed_cidrs,
    )));
    let (refill_interval, refill_day, refill_schedule) =
        s.schedule.map_or((None, None, "interval"), |r| r.columns());
    let row = Spi::connect_mut(|client| {
        changed();
        lock_owner(client, &owner);
        let actor = audit::actor();
        let args: Vec<DatumWithOid> = vec![
            owner.as_str().into(),
            s.metadata.into(),
            s.remaining.into(),
            s.refill_amount.into(),
            refill_interval.map(interval).into(),
            refill_day.into(),
            refill_schedule.into(),
            s.ratelimits
                .filter(|l| !l.is_empty())
                .map(|l| JsonB(crate::limits::to_json(&l)))
                .into(),
            s.algorithm.unwrap_or_default().as_str().into(),
            actor.into(),
            s.allowed_cidrs
                .as_deref()
                .and_then(crate::addresses::stored)
                .into(),
        ];
        let inserted = plans::update(
            client,
            "INSERT INTO apikeys.identities (owner, metadata, remaining, refill_amount,
                    refill_interval, refill_day, refill_schedule, last_refill_at, ratelimits,
                    rate_limit_algorithm, created_by, updated_by, allowed_cidrs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $4 IS NOT NULL THEN clock_timestamp() END,
                     $8, $9, $10, $10, $11::text[]::cidr[])
             ON CONFLICT (owner) DO NOTHING RETURNING id",
            None,
            &args,
        );
        if inserted.is_empty() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                format!("identity \"{}\" already exists", errors::shown(&owner)),
                Some("apikeys.update_identity changes an existing identity."),
            );
        }
        let id = errors::internal(inserted.first().get::<i64>(1));
        let linked = plans::update(
            client,
            "UPDATE apikeys.keys SET identity_id = $2 WHERE owner = $1 RETURNING 1",
            None,
            &[owner.as_str().into(), id.into()],
        )
        .len();
        audit::record(
            client,
            "create_identity",
            None,
            json!({"owner": owner, "keys": linked}),
        );
        first_row(client, &owner)
    });
    row.map(with_live)
}

/// One identity, with its quota as it is now; P0002 if there is none (SPEC §9: an unknown
/// identity is P0002 in every function that takes one).
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn get_identity(
    owner: Option<String>,
) -> Option<pgrx::composite_type!('static, "apikeys.identity")> {
    let owner = owner?;
    let row = Spi::connect_mut(|client| first_row(client, &owner));
    Some(with_live(row.unwrap_or_else(|| identity_not_found(&owner))))
}

/// Every identity, by owner.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn list_identities() -> SetOfIterator<'static, pgrx::composite_type!('static, "apikeys.identity")> {
    let rows: Vec<Row> = Spi::connect(|client| {
        plans::select(client, &rows_sql("ORDER BY k.owner"), None, &[])
            .filter_map(read_row)
            .collect()
    });
    SetOfIterator::new(rows.into_iter().map(with_live))
}

/// Changes an identity. A NULL argument leaves its field as it is; `clear` names fields to reset
/// ('metadata', 'remaining' → unlimited, 'refill', 'ratelimits'). A quota set here is what its
/// keys share from now on; spends made meanwhile are not lost to a refill change.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::too_many_arguments)]
fn update_identity(
    owner: Option<String>,
    metadata: default!(Option<Jsonb>, "NULL"),
    remaining: default!(Option<i64>, "NULL"),
    refill_amount: default!(Option<i64>, "NULL"),
    refill_interval: default!(Option<Interval>, "NULL"),
    refill_day: default!(Option<i32>, "NULL"),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    refill_schedule: default!(Option<String>, "NULL"),
    rate_limit_algorithm: default!(Option<String>, "NULL"),
    clear: default!(Option<Vec<Option<String>>>, "NULL"),
    allowed_cidrs: default!(Option<Vec<Option<SqlCidr>>>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.identity")> {
    let owner = required_owner(owner);
    let clear: Vec<String> = clear.unwrap_or_default().into_iter().flatten().collect();
    if let Some(field) = clear.iter().find(|f| {
        !CLEARABLE.contains(&f.as_str())
            && ![
                "refill_amount",
                "refill_interval",
                "refill_day",
                "refill_schedule",
            ]
            .contains(&f.as_str())
    }) {
        invalid_argument(
            "clear",
            format!(
                "names \"{}\", which an identity cannot clear (metadata, remaining, refill, ratelimits, allowed_cidrs)",
                errors::shown(field)
            ),
        );
    }
    let update = errors::checked(Update::check(
        args(
            metadata,
            remaining,
            refill_amount,
            refill_interval,
            refill_day,
            ratelimits,
            refill_schedule,
            rate_limit_algorithm,
            allowed_cidrs,
        ),
        clear,
    ));
    let row = Spi::connect_mut(|client| {
        changed();
        let current = plans::update(
            client,
            concat!(
                "SELECT k.refill_amount, k.refill_interval, k.refill_day, k.refill_schedule, ",
                crate::remaining_sql!(),
                ", k.id, k.created_at, k.remaining_version, k.refill_version, k.credits
                   FROM apikeys.identities k LEFT JOIN apikeys.identity_meters m
                     ON m.identity_id = k.id AND m.identity_created_at = k.created_at
                  WHERE k.owner = $1 FOR UPDATE OF k"
            ),
            None,
            &[owner.as_str().into()],
        );
        if current.is_empty() {
            identity_not_found(&owner);
        }
        let cur = current.first();
        let stored_remaining = errors::internal(cur.get::<i64>(5));
        let id = errors::internal(cur.get::<i64>(6)).unwrap_or(0);
        let created_us =
            errors::internal(cur.get::<TimestampWithTimeZone>(7)).map_or(0, verify::epoch_us);
        let set_at = (
            errors::internal(cur.get::<i64>(8)).unwrap_or(0),
            errors::internal(cur.get::<i64>(9)).unwrap_or(0),
        );
        let credits = errors::internal(cur.get::<i64>(10)).unwrap_or(0);
        let cur_remaining = engine::remaining_now(
            &engine::identity_entry(id),
            created_us,
            set_at,
            credits,
            stored_remaining,
        );
        let merged = errors::checked(update.merge(&StoredLimits {
            refill_amount: errors::internal(cur.get::<i64>(1)),
            refill: crate::refills::Schedule::from_columns(
                errors::internal(cur.get::<Interval>(2)).map(span),
                errors::internal(cur.get::<i32>(3)),
                &errors::internal(cur.get::<String>(4)).unwrap_or_default(),
            ),
            remaining: cur_remaining,
            ..StoredLimits::default()
        }));
        let s = &update.settings;
        let cleared = |f: &str| update.clears(f);
        let remaining_set = s.remaining.is_some() || merged.remaining != cur_remaining;
        let refill_set = s.refill_given() || cleared("refill");
        let (refill_interval, refill_day, refill_schedule) = merged
            .refill
            .map_or((None, None, "interval"), |r| r.columns());
        let metadata_set = s.metadata.is_some() || cleared("metadata");
        let limits_set = s.ratelimits.is_some() || cleared("ratelimits");
        let ratelimits = s
            .ratelimits
            .as_ref()
            .filter(|l| !l.is_empty())
            .map(|l| JsonB(crate::limits::to_json(l)));
        plans::update(
            client,
            "UPDATE apikeys.identities SET
                metadata = CASE WHEN $2 THEN $3 ELSE metadata END,
                meter_version = meter_version + CASE WHEN $4 OR $6 THEN 1 ELSE 0 END,
                remaining = CASE WHEN $4 THEN $5 ELSE remaining END,
                credits = CASE WHEN $4 THEN 0 ELSE credits END,
                remaining_version = CASE WHEN $4 THEN meter_version + 1 ELSE remaining_version END,
                refill_version = CASE WHEN $6 THEN meter_version + 1 ELSE refill_version END,
                refill_amount = CASE WHEN $6 THEN $7 ELSE refill_amount END,
                refill_interval = CASE WHEN $6 THEN $8 ELSE refill_interval END,
                refill_day = CASE WHEN $6 THEN $9 ELSE refill_day END,
                refill_schedule = CASE WHEN $6 THEN $10 ELSE refill_schedule END,
                last_refill_at = CASE WHEN $6 AND $7 IS NOT NULL THEN clock_timestamp()
                                      WHEN $6 THEN NULL ELSE last_refill_at END,
                ratelimits = CASE WHEN $11 THEN $12 ELSE ratelimits END,
                rate_limit_algorithm = COALESCE($13, rate_limit_algorithm),
                allowed_cidrs = CASE WHEN $15 THEN $16::text[]::cidr[] ELSE allowed_cidrs END,
                updated_at = clock_timestamp(), updated_by = $14
              WHERE owner = $1",
            None,
            &[
                owner.as_str().into(),
                metadata_set.into(),
                s.metadata.clone().into(),
                remaining_set.into(),
                merged.remaining.into(),
                refill_set.into(),
                merged.refill_amount.into(),
                refill_interval.map(interval).into(),
                refill_day.into(),
                refill_schedule.into(),
                limits_set.into(),
                ratelimits.into(),
                s.algorithm.map(|a| a.as_str()).into(),
                audit::actor().into(),
                (s.allowed_cidrs.is_some() || cleared("allowed_cidrs")).into(),
                s.allowed_cidrs
                    .as_deref()
                    .and_then(crate::addresses::stored)
                    .into(),
            ],
        );
        audit::record(
            client,
            "update_identity",
            None,
            json!({"owner": owner, "remaining_set": remaining_set, "refill_set": refill_set}),
        );
        first_row(client, &owner)
    });
    row.map(with_live)
}

/// Deletes an identity. Its keys keep their owner text and no longer share a quota or limits.
/// True; P0002 if there is no such identity.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn delete_identity(owner: Option<String>) -> bool {
    let owner = required_owner(owner);
    Spi::connect_mut(|client| {
        changed();
        lock_owner(client, &owner);
        let gone = plans::update(
            client,
            "WITH gone AS (DELETE FROM apikeys.identities WHERE owner = $1 RETURNING id),
                  counted AS (DELETE FROM apikeys.identity_meters
                               WHERE identity_id IN (SELECT id FROM gone)),
                  unlinked AS (UPDATE apikeys.keys SET identity_id = NULL
                                WHERE identity_id IN (SELECT id FROM gone))
             SELECT id FROM gone",
            None,
            &[owner.as_str().into()],
        );
        if gone.is_empty() {
            identity_not_found(&owner);
        }
        audit::record(client, "delete_identity", None, json!({"owner": owner}));
        true
    })
}

/// Sets, increments or decrements an identity's quota atomically (as update_credits does a
/// key's) and returns the new quota; its keys' spends meanwhile are never lost.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn update_identity_credits(
    owner: Option<String>,
    operation: Option<String>,
    amount: Option<i64>,
) -> Option<i64> {
    let owner = required_owner(owner);
    let op = errors::checked(credits::Operation::parse(operation.as_deref(), amount));
    changed();
    credits::update(credits::Holder::Identity, &owner, op)
}

/// An identity as a verification of one of its keys needs it.
#[derive(Clone)]
pub struct IdentityState {
    pub id: i64,
    pub created_us: i64,
    pub meter_version: i64,
    pub config: verify::Config,
    pub named: Vec<crate::limits::NamedLimit>,
    pub algorithm: crate::metering::Algorithm,
    /// The networks its keys may be verified from (None: anywhere).
    pub allowed: Option<Vec<crate::network::Cidr>>,
}

impl IdentityState {
    pub fn entry(&self) -> String {
        engine::identity_entry(self.id)
    }
}

thread_local! {
    /// Identities this backend read: apikeys.identities' OID and, per identity id, the state.
    static IDENTITIES: std::cell::RefCell<(pg_sys::Oid, std::collections::HashMap<i64, Option<IdentityState>>)> =
        std::cell::RefCell::new((pg_sys::InvalidOid, std::collections::HashMap::new()));
    /// Invalidations of apikeys.identities this backend received (see `read_identity`).
    static INVALIDATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bounds a backend's cache of identities.
const MAX_CACHED: usize = 10_000;

/// From _PG_init in every process.
pub fn init() {
    // SAFETY: registers a plain function that lives as long as the library (never unloaded),
    // once per process before any transaction of ours.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0)) }
}

/// PostgreSQL's relcache invalidation of apikeys.identities (sent by the statement trigger
/// `identities_changed` when a changing transaction commits, replayed on standbys, dropped on
/// abort; applied in the changing transaction itself at its next command) or of everything.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    IDENTITIES.with(|c| {
        let mut c = c.borrow_mut();
        if relid == pg_sys::InvalidOid || relid == c.0 {
            c.1.clear();
            INVALIDATIONS.with(|n| n.set(n.get().wrapping_add(1)));
        }
    });
}

/// Trigger of apikeys.identities (every statement that changes it, management's or anyone's):
/// verifications read identities again — every backend, standbys too, once the transaction
/// commits, and this one at its next command; a rollback sends nothing. Written by hand rather
/// than with #[pg_trigger], whose wrapper fails with XX000 when called outside a trigger.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn identities_changed(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: PostgreSQL calls this with a valid fcinfo; `context` is a TriggerData node exactly
    // when the trigger manager calls it (CALLED_AS_TRIGGER), whose relation is open.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            errors::raise(
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "apikeys.identities_changed() runs only as the trigger of apikeys.identities"
                    .into(),
                None,
            );
        }
        let data = context.cast::<pg_sys::TriggerData>();
        pg_sys::CacheInvalidateRelcacheByRelid((*(*data).tg_relation).rd_id);
    }
    pg_sys::Datum::from(0)
}

/// Version-1 calling convention of `identities_changed` (what PG_FUNCTION_INFO_V1 declares).
#[no_mangle]
pub extern "C" fn pg_finfo_identities_changed() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Identity `id` (None: deleted), read once per backend until apikeys.identities changes (see
/// `identities_changed`). The row is read with the latest snapshot (an older one, a REPEATABLE
/// READ transaction's, would cache a state that no later invalidation replaces), and cached
/// only when no invalidation arrived while it was read (one that did may be of a change the
/// snapshot missed).
pub fn read_identity(id: i64) -> Option<IdentityState> {
    if !engine::available() {
        return read_identity_row(id);
    }
    let cached = IDENTITIES.with(|c| c.borrow().1.get(&id).cloned());
    if let Some(state) = cached {
        return state;
    }
    let before = INVALIDATIONS.with(std::cell::Cell::get);
    let relid = crate::catalog::relation(c"identities");
    let state = verify::with_latest_snapshot(|| read_identity_row(id));
    if INVALIDATIONS.with(std::cell::Cell::get) == before {
        IDENTITIES.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != relid || c.1.len() >= MAX_CACHED {
                c.0 = relid;
                c.1.clear();
            }
            c.1.insert(id, state.clone());
        });
    }
    state
}

/// Every change of identities: this backend reads them again at once (its own transaction sees
/// the change; the trigger's invalidation also reaches it at its next command).
fn changed() {
    IDENTITIES.with(|c| c.borrow_mut().1.clear());
}

extension_sql!(
    r#"
-- Verifications cache identities per backend: every change of the table invalidates them.
CREATE FUNCTION apikeys.identities_changed() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'identities_changed';
CREATE TRIGGER identities_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apikeys.identities
    FOR EACH STATEMENT EXECUTE FUNCTION apikeys.identities_changed();
"#,
    name = "identities_trigger",
    requires = ["data_model"]
);

/// Identity `id` as the caller's snapshot sees it, read as the tables' owner (verification
/// runs with the caller's rights).
fn read_identity_row(id: i64) -> Option<IdentityState> {
    crate::owner::as_owner(|| {
        Spi::connect(|client| {
            let table = plans::select(
                client,
                if crate::catalog::has_column(c"identities", c"allowed_cidrs") {
                    "SELECT k.created_at, k.meter_version, k.remaining, k.refill_amount,
                            k.refill_interval, k.refill_day, k.refill_schedule, k.ratelimits,
                            k.rate_limit_algorithm, k.allowed_cidrs::pg_catalog.text[]
                       FROM apikeys.identities k WHERE k.id = $1"
                } else {
                    // Until ALTER EXTENSION … UPDATE adds the column: no allow-list.
                    "SELECT k.created_at, k.meter_version, k.remaining, k.refill_amount,
                            k.refill_interval, k.refill_day, k.refill_schedule, k.ratelimits,
                            k.rate_limit_algorithm, NULL::pg_catalog.text[]
                       FROM apikeys.identities k WHERE k.id = $1"
                },
                Some(1),
                &[id.into()],
            );
            if table.is_empty() {
                return None;
            }
            let row = table.first();
            let remaining = errors::internal(row.get::<i64>(3));
            let refill_amount = errors::internal(row.get::<i64>(4));
            let refill_interval = errors::internal(row.get::<Interval>(5));
            let algorithm = errors::internal(row.get::<String>(9))
                .as_deref()
                .and_then(crate::metering::Algorithm::parse)
                .unwrap_or_default();
            Some(IdentityState {
                id,
                created_us: errors::internal(row.get::<TimestampWithTimeZone>(1))
                    .map_or(0, verify::epoch_us),
                meter_version: errors::internal(row.get::<i64>(2)).unwrap_or(1),
                config: verify::Config {
                    quota: remaining.is_some() || refill_amount.is_some(),
                    refill_amount,
                    refill_interval,
                    calendar: verify::calendar_of(
                        refill_interval,
                        errors::internal(row.get::<i32>(6)),
                        errors::internal(row.get::<String>(7)).as_deref(),
                    ),
                    rate: None,
                },
                named: errors::internal(row.get::<JsonB>(8))
                    .map(|r| crate::limits::from_stored(&r.0))
                    .unwrap_or_default(),
                algorithm,
                allowed: crate::addresses::parse_list(errors::internal(
                    row.get::<Vec<Option<String>>>(10),
                )),
            })
        })
    })
}

/// The identity's counters as committed now (see verify::load).
pub fn load_counters(identity: &IdentityState) -> Option<engine::Stored> {
    let stored = verify::with_latest_snapshot(|| {
        crate::owner::as_owner(|| {
            Spi::connect(|client| {
                let table = plans::select(
                    client,
                    concat!(
                        "SELECT k.meter_version, k.remaining_version, k.refill_version, ",
                        crate::remaining_sql!(),
                        ", CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at
                                ELSE k.last_refill_at END,
                           CASE WHEN m.meter_version >= k.refill_version THEN m.last_refill_at
                                ELSE k.last_refill_at END + k.refill_interval,
                           NULL::timestamptz, 0::bigint, 0::bigint, k.credits
                      FROM apikeys.identities k LEFT JOIN apikeys.identity_meters m
                        ON m.identity_id = k.id AND m.identity_created_at = k.created_at
                     WHERE k.id = $1 AND k.created_at = $2"
                    ),
                    Some(1),
                    &[
                        identity.id.into(),
                        verify::from_epoch_us(identity.created_us).into(),
                    ],
                );
                if table.is_empty() {
                    return None;
                }
                Some(errors::internal(verify::stored_from(
                    &table.first().get_heap_tuple().ok()??,
                )))
            })
        })
    });
    stored.map(|s| verify::next_refill_by(&identity.config, s))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    /// One verification as `code|limited_by|remaining|identity_remaining`.
    fn shared(key: &str, extra: &str) -> String {
        let k = pgrx::spi::quote_literal(key);
        one::<String>(&format!(
            "SELECT v.code || '|' || coalesce(v.limited_by, '-') || '|' || coalesce(v.remaining::text, '-')
                    || '|' || coalesce(v.identity_remaining::text, '-')
               FROM apikeys.verify_key({k}{extra}) v"
        ))
        .unwrap_or_default()
    }

    #[pg_test]
    fn a_tenants_keys_share_its_quota() {
        // A key made before its identity is linked by create_identity; one made after, at creation.
        let (_, before) = create("owner => 'acme', remaining => 10");
        run("SELECT apikeys.create_identity('acme', remaining => 3, metadata => '{\"plan\": \"pro\"}')");
        let (_, after) = create("owner => 'acme'");
        assert_eq!(shared(&before, ""), "VALID|-|9|2");
        assert_eq!(shared(&after, ""), "VALID|-|-|1");
        assert_eq!(shared(&after, ", cost => 2"), "USAGE_EXCEEDED|identity|-|1");
        // Nothing was spent at the key's level either when the identity refused.
        assert_eq!(
            shared(&before, ", cost => 2"),
            "USAGE_EXCEEDED|identity|9|1"
        );
        assert_eq!(shared(&before, ""), "VALID|-|8|0");
        assert_eq!(shared(&after, ""), "USAGE_EXCEEDED|identity|-|0");
        assert_eq!(
            one::<i64>("SELECT remaining FROM apikeys.get_identity('acme')"),
            Some(0)
        );
        // The key's own quota refuses first, and says so.
        let (_, small) = create("owner => 'acme', remaining => 0");
        assert_eq!(shared(&small, ""), "USAGE_EXCEEDED|key|0|0");
        // Credits on the identity reach every key.
        assert_eq!(
            one::<i64>("SELECT apikeys.update_identity_credits('acme', 'increment', 2)"),
            Some(2)
        );
        assert_eq!(shared(&after, ""), "VALID|-|-|1");
        // Deleting the identity: its keys keep their owner and stop sharing.
        assert_eq!(
            one::<bool>("SELECT apikeys.delete_identity('acme')"),
            Some(true)
        );
        assert_eq!(shared(&after, ""), "VALID|-|-|-");
        assert_eq!(
            field::<String>(&after, "", "owner").as_deref(),
            Some("acme")
        );
    }

    #[pg_test]
    fn an_identitys_named_limits_apply_to_all_its_keys_at_its_level() {
        run(
            r#"SELECT apikeys.create_identity('team', ratelimits => '[{"name": "requests", "limit": 3, "duration": "1 hour", "auto_apply": true}, {"name": "tokens", "limit": 10, "duration": "1 hour"}]')"#,
        );
        let (_, a) = create(
            r#"owner => 'team', ratelimits => '[{"name": "tokens", "limit": 100, "duration": "1 hour"}]'"#,
        );
        let (_, b) = create("owner => 'team'");
        let k = pgrx::spi::quote_literal(&a);
        assert_eq!(
            one::<String>(&format!(
                r#"SELECT string_agg(l->>'name' || ':' || (l->>'level') || ':' || (l->>'remaining'), ',')
                     FROM apikeys.verify_key({k}, ratelimits => '[{{"name": "tokens", "cost": 4}}]') v,
                          jsonb_array_elements(v.ratelimits) l"#
            ))
            .as_deref(),
            Some("tokens:key:96,requests:identity:2,tokens:identity:6")
        );
        assert_eq!(code(&b, ""), "VALID");
        assert_eq!(code(&a, ""), "VALID");
        assert_eq!(
            one::<String>(&format!(
                "SELECT code || ':' || limited_by FROM apikeys.verify_key({})",
                pgrx::spi::quote_literal(&b)
            ))
            .as_deref(),
            Some("RATE_LIMITED:identity")
        );
    }

    #[pg_test]
    fn identities_are_managed_and_checked() {
        run("SELECT apikeys.create_identity('org1', remaining => 5, refill_amount => 5, refill_interval => '1 day')");
        assert_error(
            "SELECT apikeys.create_identity('org1')",
            "23505",
            "already exists",
        );
        assert_error("SELECT apikeys.get_identity('nope')", "P0002", "nope");
        assert_error("SELECT apikeys.delete_identity('nope')", "P0002", "nope");
        assert_error(
            "SELECT apikeys.update_identity('nope', remaining => 1)",
            "P0002",
            "nope",
        );
        assert_error(
            "SELECT apikeys.update_identity_credits('nope', 'set', 1)",
            "P0002",
            "nope",
        );
        assert_error(
            "SELECT apikeys.create_identity('x', refill_amount => 5)",
            "22023",
            "\"refill_interval\"",
        );
        assert_error(
            "SELECT apikeys.create_identity('x', refill_day => 40, refill_amount => 1)",
            "22023",
            "\"refill_day\"",
        );
        assert_error(
            "SELECT apikeys.update_identity('org1', clear => ARRAY['name'])",
            "22023",
            "\"clear\"",
        );
        run("SELECT apikeys.update_identity('org1', remaining => 2, metadata => '{\"tier\": 1}')");
        assert_eq!(
            one::<String>("SELECT remaining || ':' || (metadata->>'tier') || ':' || (next_refill_at > now()) FROM apikeys.get_identity('org1')").as_deref(),
            Some("2:1:true")
        );
        run("SELECT apikeys.update_identity('org1', clear => ARRAY['refill', 'remaining'])");
        assert_eq!(
            one::<bool>("SELECT remaining IS NULL AND refill_amount IS NULL AND next_refill_at IS NULL FROM apikeys.get_identity('org1')"),
            Some(true)
        );
        run("SELECT apikeys.update_identity('org1', refill_amount => 7, refill_day => 31)");
        assert_eq!(
            one::<String>("SELECT remaining || ':' || refill_day || ':' || to_char(next_refill_at AT TIME ZONE 'UTC', 'HH24:MI') FROM apikeys.get_identity('org1')").as_deref(),
            Some("7:31:00:00")
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_identities()"),
            Some(1)
        );
        assert_eq!(
            one::<String>("SELECT string_agg(action, ',' ORDER BY id) FROM apikeys.audit_log WHERE action LIKE '%identity%'").as_deref(),
            Some("create_identity,update_identity,update_identity,update_identity")
        );
    }

    #[pg_test]
    fn a_key_follows_its_owner_to_another_identity() {
        run("SELECT apikeys.create_identity('one', remaining => 100)");
        run("SELECT apikeys.create_identity('two', remaining => 5)");
        let (id, key) = create("owner => 'one'");
        assert_eq!(shared(&key, ""), "VALID|-|-|99");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', owner => 'two')"
        ));
        assert_eq!(shared(&key, ""), "VALID|-|-|4");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['owner'])"
        ));
        assert_eq!(shared(&key, ""), "VALID|-|-|-");
    }
}
