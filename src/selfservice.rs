//! Self-service keys (SPEC §8): end users manage their own keys. In a transaction
//! authenticated (`apikeys.authenticate`, `authenticate_request`) with a key or token whose
//! effective permissions grant `{"apikeys": ["manage"]}`, the PUBLIC `my_*` functions act on
//! the keys of `current_owner()` and on nothing else: a new key gets no more permissions than
//! the caller has, no role, no master flag and no limits of its own (it shares its owner's
//! identity's). Any other key id is 42501, revealing nothing; outside an authenticated
//! transaction, 28000. Audit rows name the acting key (`audit_log.acting_key_id`).

use crate::jsonb::{self, Jsonb};
use crate::keys::{self, Row};
use crate::settings::{Args, Settings, Update};
use crate::{audit, context, errors, permissions, plans};
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;

/// The authenticated caller of a self-service function.
struct Caller {
    key_id: String,
    owner: String,
    permissions: permissions::Permissions,
    expires_at: Option<TimestampWithTimeZone>,
}

/// The caller, or 28000 (nothing authenticated) / 42501 (no `apikeys: manage`, no owner).
fn caller() -> Caller {
    let Some(context::Authenticated {
        key_id,
        owner,
        permissions: granted,
        expires_at,
    }) = context::authenticated_as()
    else {
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
        expires_at,
    }
}

/// Locks key `id` if it is one of the caller's owner's keys and no more powerful than the caller
/// (it cannot change meanwhile): no master flag, no database role, permissions the caller has
/// too, an allow-list at least as narrow as the caller's. 42501 for any other id, existing or
/// not: a self-service key must not rotate its way into a key that can do more.
fn own_key(id: Option<String>, me: &Caller) -> String {
    let id = id.unwrap_or_else(|| errors::invalid_argument("id", "must not be NULL"));
    let target = Spi::connect_mut(|client| {
        let row = plans::update(
            client,
            "SELECT k.master OR k.role IS NOT NULL,
                    COALESCE(k.effective_permissions, k.permissions),
                    k.allowed_cidrs IS NOT DISTINCT FROM c.allowed_cidrs
                        OR (c.allowed_cidrs IS NULL)
                        OR (k.allowed_cidrs IS NOT NULL AND NOT EXISTS (
                                SELECT FROM pg_catalog.unnest(k.allowed_cidrs) n
                                 WHERE NOT EXISTS (
                                       SELECT FROM pg_catalog.unnest(c.allowed_cidrs) m
                                        WHERE n OPERATOR(pg_catalog.<<=) m)))
               FROM apikeys.keys k LEFT JOIN apikeys.keys c ON c.id = $3
              WHERE k.id = $1 AND k.owner = $2 FOR UPDATE OF k",
            None,
            &[
                id.as_str().into(),
                me.owner.as_str().into(),
                me.key_id.as_str().into(),
            ],
        );
        if row.is_empty() {
            return None;
        }
        let row = row.first();
        Some((
            errors::internal(row.get::<bool>(1)).unwrap_or(true),
            errors::internal(row.get::<pgrx::JsonB>(2)).and_then(|p| permissions::parse(&p.0).ok()),
            errors::internal(row.get::<bool>(3)).unwrap_or(false),
        ))
    });
    let within_reach = target.is_some_and(|(privileged, granted, narrow_enough)| {
        !privileged
            && narrow_enough
            && granted.is_some_and(|g| permissions::covers(&me.permissions, &g))
    });
    if !within_reach {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "API key \"{}\" is not one of the authenticated owner's keys that it may manage",
                errors::shown(&id)
            ),
            Some("Self-service manages the owner's keys that can do no more than the calling key."),
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
    let mut created = audit::acting_as(&me.key_id, || keys::create(s, None, None, None, false));
    // No wider than its creator: its allow-list, and an expiry no later than the credential's.
    created.6 = Spi::connect_mut(|client| {
        let row = plans::update(
            client,
            "UPDATE apikeys.keys k
                SET allowed_cidrs = c.allowed_cidrs,
                    expires_at = CASE WHEN $3::timestamptz IS NULL THEN k.expires_at
                                      ELSE LEAST(COALESCE(k.expires_at, $3), $3) END
               FROM apikeys.keys c
              WHERE k.id = $1 AND c.id = $2
          RETURNING k.expires_at",
            None,
            &[
                created.0.as_str().into(),
                me.key_id.as_str().into(),
                me.expires_at.into(),
            ],
        );
        if row.is_empty() {
            return created.6;
        }
        errors::internal(row.first().get::<TimestampWithTimeZone>(1))
    });
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
    let id = own_key(id, &me);
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
    let id = own_key(id, &me);
    let (key, start, expires_at) = audit::acting_as(&me.key_id, || keys::rotate(&id, grace));
    TableIterator::once((id, key, start, expires_at))
}

/// Revokes one of the owner's keys for good (the caller's own included); false if it already
/// was.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn my_revoke_api_key(id: Option<String>) -> bool {
    let me = caller();
    let id = own_key(id, &me);
    audit::acting_as(&me.key_id, || keys::revoke(&id))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    const MANAGER: &str =
        r#"owner => 'alice', permissions => '{"apikeys": ["manage"], "docs": ["read", "write"]}'"#;

    fn authenticate(credential: &str) {
        run(&format!(
            "SELECT apikeys.authenticate({})",
            pgrx::spi::quote_literal(credential)
        ));
    }

    #[pg_test]
    fn an_end_user_manages_exactly_their_own_keys() {
        let (manager_id, manager) = create(MANAGER);
        let (other_id, _) = create("owner => 'bob'");
        authenticate(&manager);
        let (id, key) = Spi::get_two::<String, String>(
            r#"SELECT id, key FROM apikeys.my_create_api_key('ci', '{"docs": ["read"]}', '30 days', '{"env": "ci"}')"#,
        )
        .unwrap();
        let (id, key) = (id.unwrap(), key.unwrap());
        run("SELECT apikeys.reset()");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(field::<String>(&key, "", "owner").as_deref(), Some("alice"));
        assert_eq!(
            field::<String>(&key, "", "permissions::text").as_deref(),
            Some(r#"{"docs": ["read"]}"#)
        );
        authenticate(&manager);
        let listed = one::<String>(
            "SELECT string_agg(id, ',' ORDER BY created_at) FROM apikeys.my_list_api_keys()",
        );
        assert_eq!(listed, Some(format!("{manager_id},{id}")));
        assert_eq!(
            one::<String>(&format!(
                "SELECT name || ':' || enabled FROM apikeys.my_update_api_key('{id}', name => 'ci2', enabled => false)"
            ))
            .as_deref(),
            Some("ci2:false")
        );
        let rotated = one::<String>(&format!(
            "SELECT key FROM apikeys.my_rotate_api_key('{id}', '1 minute')"
        ))
        .unwrap();
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.my_revoke_api_key('{id}')")),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.my_revoke_api_key('{id}')")),
            Some(false)
        );
        run("SELECT apikeys.reset()");
        // Disabled (checked before revoked), and revoked for good.
        assert_eq!(code(&rotated, ""), "DISABLED");
        assert_eq!(
            one::<bool>(&format!(
                "SELECT revoked_at IS NOT NULL FROM apikeys.get_api_key('{id}')"
            )),
            Some(true)
        );
        // Bob's key was never within reach.
        assert_eq!(
            one::<bool>(&format!(
                "SELECT revoked_at IS NULL AND name IS NULL FROM apikeys.get_api_key('{other_id}')"
            )),
            Some(true)
        );
        // Every action is audited with the key that acted.
        assert_eq!(
            one::<String>(&format!(
                "SELECT string_agg(action || ':' || acting_key_id, ',' ORDER BY id)
                   FROM apikeys.audit_log WHERE key_id = '{id}'"
            )),
            Some(format!(
                "create:{manager_id},update:{manager_id},rotate:{manager_id},revoke:{manager_id}"
            ))
        );
    }

    #[pg_test]
    fn every_escalation_and_every_foreign_key_is_refused() {
        let (manager_id, manager) = create(MANAGER);
        let (other_id, _) = create("owner => 'bob'");
        // Not authenticated: 28000.
        for call in [
            "SELECT apikeys.my_create_api_key('x')".to_string(),
            "SELECT count(*) FROM apikeys.my_list_api_keys()".to_string(),
            format!("SELECT apikeys.my_revoke_api_key('{other_id}')"),
        ] {
            assert_error(&call, "28000", "authenticated");
        }
        authenticate(&manager);
        // Another owner's key, and a key that does not exist: the same 42501.
        for id in [other_id.as_str(), "key_nonexistent"] {
            for call in [
                format!("SELECT apikeys.my_update_api_key('{id}', name => 'x')"),
                format!("SELECT apikeys.my_rotate_api_key('{id}')"),
                format!("SELECT apikeys.my_revoke_api_key('{id}')"),
            ] {
                assert_error(&call, "42501", "may manage");
            }
        }
        // Wider permissions than the caller's, by resource, action or wildcard.
        for wider in [
            r#"{"billing": ["read"]}"#,
            r#"{"docs": ["delete"]}"#,
            r#"{"docs": ["*"]}"#,
            r#"{"*": ["read"]}"#,
        ] {
            assert_error(
                &format!("SELECT apikeys.my_create_api_key('x', '{wider}')"),
                "42501",
                "grants more than",
            );
        }
        // No role, master, limits or owner arguments exist to escalate with.
        for call in [
            "SELECT apikeys.my_create_api_key('x', role => 'postgres')",
            "SELECT apikeys.my_create_api_key('x', master => true)",
            "SELECT apikeys.my_create_api_key('x', remaining => 1000000)",
            "SELECT apikeys.my_create_api_key('x', owner => 'bob')",
        ] {
            assert_error(call, "42883", "my_create_api_key");
        }
        // A key without apikeys: manage, and a token minted without it.
        let (_, plain) = create(r#"owner => 'alice', permissions => '{"docs": ["read"]}'"#);
        run("SELECT apikeys.reset()");
        authenticate(&plain);
        assert_error("SELECT apikeys.my_create_api_key('x')", "42501", "apikeys");
        run("SELECT apikeys.reset()");
        let narrow =
            one::<String>(&format!(r#"SELECT apikeys.mint_token('{manager}', 60000)"#)).unwrap();
        // A token carries its key's permissions: it may manage. Shrink the key, and it may not.
        authenticate(&narrow);
        run("SELECT count(*) FROM apikeys.my_list_api_keys()");
        run("SELECT apikeys.reset()");
        run(&format!(
            r#"SELECT apikeys.update_api_key('{manager_id}', permissions => '{{"docs": ["read"]}}')"#
        ));
        authenticate(&narrow);
        assert_error(
            "SELECT count(*) FROM apikeys.my_list_api_keys()",
            "42501",
            "apikeys",
        );
        run("SELECT apikeys.reset()");
        // A key made with a token lives no longer than the token.
        run(&format!(
            r#"SELECT apikeys.update_api_key('{manager_id}', permissions => '{{"apikeys": ["manage"], "docs": ["read", "write"]}}')"#
        ));
        authenticate(&narrow);
        assert_eq!(
            one::<bool>(
                "SELECT expires_at <= now() + '61 seconds'::interval FROM apikeys.my_create_api_key('brief', expires_in => '30 days')"
            ),
            Some(true)
        );
        run("SELECT apikeys.reset()");
        // Keys of the same owner that can do more than the caller stay out of reach: a master
        // key, a key with a database role, wider permissions, a wider allow-list.
        run("CREATE ROLE selfservice_web");
        let (master_id, _) = create("owner => 'alice', master => true");
        let (role_id, _) = create("owner => 'alice', role => 'selfservice_web'");
        let (wide_id, _) = create(r#"owner => 'alice', permissions => '{"billing": ["read"]}'"#);
        let (listed_id, listed) = create(
            r#"owner => 'alice', allowed_cidrs => '{10.0.0.0/8}', permissions => '{"apikeys": ["manage"], "docs": ["read", "write"]}'"#,
        );
        let (open_id, _) = create("owner => 'alice'");
        run("SELECT apikeys.reset()");
        authenticate(&manager);
        for id in [&master_id, &role_id, &wide_id] {
            assert_error(
                &format!("SELECT apikeys.my_rotate_api_key('{id}')"),
                "42501",
                "may manage",
            );
        }
        run("SELECT apikeys.reset()");
        run(&format!(
            "SELECT apikeys.authenticate('{listed}', client_ip => '10.0.0.1')"
        ));
        assert_error(
            &format!("SELECT apikeys.my_revoke_api_key('{open_id}')"),
            "42501",
            "may manage",
        );
        // What it creates is no wider than itself: its allow-list comes along.
        let made = one::<String>("SELECT id FROM apikeys.my_create_api_key('sub')").unwrap();
        assert_eq!(
            one::<String>(&format!(
                "SELECT allowed_cidrs::text FROM apikeys.get_api_key('{made}')"
            ))
            .as_deref(),
            Some("{10.0.0.0/8}")
        );
        run(&format!("SELECT apikeys.my_revoke_api_key('{listed_id}')"));
        run("SELECT apikeys.reset()");
        // A key without an owner has no keys to manage.
        let (_, ownerless) = create(r#"permissions => '{"apikeys": ["manage"]}'"#);
        authenticate(&ownerless);
        assert_error(
            "SELECT count(*) FROM apikeys.my_list_api_keys()",
            "42501",
            "no owner",
        );
    }
}
