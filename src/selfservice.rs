//! Self-service keys (SPEC §8): end users manage their own keys. In a transaction
//! authenticated (`apikeys.authenticate`, `authenticate_request`) with a key or token whose
//! effective permissions grant `{"apikeys": ["manage"]}`, the PUBLIC `my_*` functions act on
//! the keys of `current_owner()` and on nothing else: a new key gets no more permissions than
//! the caller has, no role, no master flag and no limits of its own (it shares its owner's
//! identity's). Any other key id is 42501, revealing nothing; outside an authenticated
//! transaction, 28000. Audit rows name the acting key (`audit_log.acting_key_id`).

use crate::keys::{self, Row};
use crate::settings::{Args, Settings, Update};
use crate::jsonb::{self, Jsonb};
use crate::{audit, context, errors, permissions, plans};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

/// The authenticated caller of a self-service function.
struct Caller {
    key_id: String,
    owner: String,
    permissions: permissions::Permissions,
}

/// The caller, or 28000 (nothing authenticated) / 42501 (no `apikeys: manage`, no owner).
fn caller() -> Caller {
    let Some((key_id, owner, granted)) = context::authenticated_as() else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            "self-service key management needs an authenticated transaction".into(),
            Some("Call apikeys.authenticate(credential) (or authenticate_request()) first."),
        )
    };
    if !permissions::allows(&granted, "apikeys", "manage") {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "API key \"{}\" does not grant {{\"apikeys\": [\"manage\"]}}",
                errors::shown(&key_id)
            ),
            Some("Self-service needs a key (or a token minted from one) granting apikeys: manage."),
        );
    }
    let Some(owner) = owner else {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "API key \"{}\" has no owner whose keys it could manage",
                errors::shown(&key_id)
            ),
            None,
        )
    };
    Caller {
        key_id,
        owner,
        permissions: granted,
    }
}

/// Locks key `id` if it is one of `owner`'s (it cannot change owner meanwhile); 42501 for any
/// other id, existing or not.
fn own_key(id: Option<String>, owner: &str) -> String {
    let id = id.unwrap_or_else(|| errors::invalid_argument("id", "must not be NULL"));
    let mine = Spi::connect_mut(|client| {
        !plans::update(
            client,
            "SELECT 1 FROM apikeys.keys WHERE id = $1 AND owner = $2 FOR UPDATE",
            None,
            &[id.as_str().into(), owner.into()],
        )
        .is_empty()
    });
    if !mine {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "API key \"{}\" is not one of the authenticated owner's keys",
                errors::shown(&id)
            ),
            None,
        );
    }
    id
}

/// Creates a key for the authenticated owner: `permissions` (default none) must be covered by
/// the caller's own. Returns what create_api_key returns; the key is shown only here.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn my_create_api_key(
    name: default!(Option<String>, "NULL"),
    permissions: default!(Option<Jsonb>, "NULL"),
    expires_in: default!(Option<Interval>, "NULL"),
    metadata: default!(Option<Jsonb>, "NULL"),
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
    let me = caller();
    let s = errors::checked(Settings::for_create(Args {
        name,
        owner: Some(me.owner.clone()),
        permissions: jsonb::argument("permissions", permissions),
        metadata,
        expires_in: expires_in.map(keys::span),
        ..Args::default()
    }));
    let wanted = permissions::parse(s.permissions.as_ref().unwrap_or(&serde_json::json!({})))
        .unwrap_or_default();
    if !permissions::covers(&me.permissions, &wanted) {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "argument \"permissions\" grants more than the authenticated key has".into(),
            Some("A self-service key may have only permissions its creator has."),
        );
    }
    let created = audit::acting_as(&me.key_id, || keys::create(s, None, None, None, false));
    TableIterator::once(created)
}

/// The authenticated owner's keys, oldest first.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn my_list_api_keys() -> SetOfIterator<'static, pgrx::composite_type!('static, "apikeys.api_key")> {
    let me = caller();
    let rows: Vec<Row> = Spi::connect(|client| {
        plans::select(
            client,
            &keys::api_key_sql("WHERE k.owner = $1 ORDER BY k.created_at, k.id"),
            None,
            &[me.owner.as_str().into()],
        )
        .filter_map(keys::read_row)
        .collect()
    });
    SetOfIterator::new(rows.into_iter().map(keys::with_live))
}

/// Renames, re-describes (`metadata`), disables or enables one of the owner's keys.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn my_update_api_key(
    id: Option<String>,
    name: default!(Option<String>, "NULL"),
    metadata: default!(Option<Jsonb>, "NULL"),
    enabled: default!(Option<bool>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.api_key")> {
    let me = caller();
    let id = own_key(id, &me.owner);
    let update = errors::checked(Update::check(
        Args {
            name,
            metadata,
            enabled,
            ..Args::default()
        },
        Vec::new(),
    ));
    audit::acting_as(&me.key_id, || keys::update_key(&id, update)).map(keys::with_live)
}

/// Gives one of the owner's keys a new secret (the old one works for `grace`).
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn my_rotate_api_key(
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
    let me = caller();
    let id = own_key(id, &me.owner);
    let (key, start, expires_at) = audit::acting_as(&me.key_id, || keys::rotate(&id, grace));
    TableIterator::once((id, key, start, expires_at))
}

/// Revokes one of the owner's keys for good (the caller's own included); false if it already
/// was.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn my_revoke_api_key(id: Option<String>) -> bool {
    let me = caller();
    let id = own_key(id, &me.owner);
    audit::acting_as(&me.key_id, || keys::revoke(&id))
}
