//! Roles (SPEC §7): named permission sets that keys take on. A key's effective permissions are
//! its own ∪ its roles', stored in the key's row (`keys.effective_permissions`) and rewritten by
//! every change of a role or of a key's roles, in the same transaction. So verification reads
//! them in its one row probe, a role change reaches keys and their live tokens at once (tokens
//! are judged against the key's permissions at each call), and a token still never exceeds what
//! it was minted with (its claim is intersected with the key's).

use crate::errors::{self, invalid_argument};
use crate::jsonb::{self, Jsonb};
use crate::permissions::{self, Permissions};
use crate::{audit, plans, settings};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

type Role = pgrx::composite_type!('static, "apikeys.roles");

fn role_not_found(name: &str) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_NO_DATA_FOUND,
        format!("role \"{}\" does not exist", errors::shown(name)),
        Some("apikeys.list_roles() shows the roles."),
    )
}

fn required_name(name: Option<String>) -> String {
    let name = name.unwrap_or_else(|| invalid_argument("name", "must not be NULL"));
    errors::checked(settings::name_like("name", &name));
    name
}

fn role_permissions(value: Option<Jsonb>) -> Option<Value> {
    errors::checked(settings::permissions(jsonb::argument("permissions", value)))
}

/// The permissions of roles `names`, share-locked so that no role changes before the caller
/// commits what it computed from them; P0002 for a name that is no role.
fn read_roles(
    client: &mut SpiClient<'_>,
    names: &[String],
    lock: bool,
) -> BTreeMap<String, Permissions> {
    let sql = if lock {
        "SELECT name, permissions FROM apikeys.roles WHERE name = ANY($1) FOR SHARE"
    } else {
        "SELECT name, permissions FROM apikeys.roles WHERE name = ANY($1)"
    };
    let found: BTreeMap<String, Permissions> =
        plans::update(client, sql, None, &[names.to_vec().into()])
            .filter_map(|row| {
                let name = errors::internal(row.get::<String>(1))?;
                let perms = errors::internal(row.get::<JsonB>(2))?;
                Some((name, permissions::parse(&perms.0).unwrap_or_default()))
            })
            .collect();
    if let Some(missing) = names.iter().find(|n| !found.contains_key(*n)) {
        role_not_found(missing);
    }
    found
}

/// `own` ∪ the permissions of `roles` (as read in `known`); None for a key without roles.
fn union_of(own: &Value, roles: &[String], known: &BTreeMap<String, Permissions>) -> Option<Value> {
    if roles.is_empty() {
        return None;
    }
    let mut all = permissions::parse(own).unwrap_or_default();
    for role in roles {
        if let Some(perms) = known.get(role) {
            all = permissions::union(&all, perms);
        }
    }
    Some(permissions::to_json(&all))
}

/// The effective permissions of a key with permissions `own` and `roles`, for its row (None: no
/// roles). Locks the roles until the caller commits; P0002 for an unknown role.
pub fn effective(client: &mut SpiClient<'_>, own: &Value, roles: &[String]) -> Option<Value> {
    if roles.is_empty() {
        return None;
    }
    union_of(own, roles, &read_roles(client, roles, true))
}

/// Rewrites the effective permissions of every key that has role `name` (its permissions
/// changed, or it was taken from them).
fn refresh_keys(client: &mut SpiClient<'_>, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let keys: Vec<(String, Value, Vec<String>)> = plans::update(
        client,
        "SELECT id, permissions, roles FROM apikeys.keys WHERE id = ANY($1) FOR UPDATE",
        None,
        &[ids.to_vec().into()],
    )
    .filter_map(|row| {
        let id = errors::internal(row.get::<String>(1))?;
        let own = errors::internal(row.get::<JsonB>(2))?.0;
        let roles: Vec<String> = errors::internal(row.get::<Vec<Option<String>>>(3))
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        Some((id, own, roles))
    })
    .collect();
    let mut names: Vec<String> = keys.iter().flat_map(|k| k.2.clone()).collect();
    names.sort();
    names.dedup();
    let known = read_roles(client, &names, false);
    let effective: Map<String, Value> = keys
        .iter()
        .map(|(id, own, roles)| {
            (
                id.clone(),
                union_of(own, roles, &known).unwrap_or(Value::Null),
            )
        })
        .collect();
    plans::update(
        client,
        "UPDATE apikeys.keys k SET effective_permissions = NULLIF(v.value, 'null'::jsonb)
           FROM jsonb_each($1) v WHERE k.id = v.key",
        None,
        &[JsonB(Value::Object(effective)).into()],
    );
}

fn keys_with_role(client: &mut SpiClient<'_>, name: &str) -> Vec<String> {
    plans::update(
        client,
        "SELECT id FROM apikeys.keys WHERE roles @> ARRAY[$1]",
        None,
        &[name.into()],
    )
    .filter_map(|row| errors::internal(row.get::<String>(1)))
    .collect()
}

fn role_row(client: &SpiClient<'_>, name: &str) -> Option<Role> {
    let table = plans::select(
        client,
        "SELECT r FROM apikeys.roles r WHERE r.name = $1",
        None,
        &[name.into()],
    );
    if table.is_empty() {
        return None;
    }
    errors::internal(table.first().get::<Role>(1))
}

/// Creates a role: a named set of permissions that keys given it (`create_api_key(roles => …)`)
/// have as well as their own. 23505 if the name is taken.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn create_role(
    name: Option<String>,
    permissions: default!(Option<Jsonb>, "'{}'"),
    description: default!(Option<String>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.roles")> {
    let name = required_name(name);
    let perms = role_permissions(permissions).unwrap_or_else(|| json!({}));
    let description = errors::checked(settings::text(
        "description",
        description,
        settings::MAX_DESCRIPTION_CHARS,
    ));
    Spi::connect_mut(|client| {
        let inserted = plans::update(
            client,
            "INSERT INTO apikeys.roles (name, permissions, description) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING RETURNING name",
            None,
            &[
                name.as_str().into(),
                JsonB(perms.clone()).into(),
                description.into(),
            ],
        );
        if inserted.is_empty() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                format!("role \"{}\" already exists", errors::shown(&name)),
                Some("apikeys.update_role changes an existing role."),
            );
        }
        audit::record(
            client,
            "create_role",
            None,
            json!({"role": name, "permissions": perms}),
        );
        role_row(client, &name)
    })
}

/// Changes a role's permissions and/or description (NULL: unchanged). Every key with the role,
/// and every live token of those keys, has the new permissions from the next call on.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn update_role(
    name: Option<String>,
    permissions: default!(Option<Jsonb>, "NULL"),
    description: default!(Option<String>, "NULL"),
) -> Option<pgrx::composite_type!('static, "apikeys.roles")> {
    let name = required_name(name);
    let perms = role_permissions(permissions);
    let description = errors::checked(settings::text(
        "description",
        description,
        settings::MAX_DESCRIPTION_CHARS,
    ));
    Spi::connect_mut(|client| {
        let updated = plans::update(
            client,
            "UPDATE apikeys.roles SET permissions = COALESCE($2, permissions),
                    description = COALESCE($3, description), updated_at = clock_timestamp()
              WHERE name = $1 RETURNING name",
            None,
            &[
                name.as_str().into(),
                perms.clone().map(JsonB).into(),
                description.into(),
            ],
        );
        if updated.is_empty() {
            role_not_found(&name);
        }
        if perms.is_some() {
            let ids = keys_with_role(client, &name);
            refresh_keys(client, &ids);
        }
        audit::record(
            client,
            "update_role",
            None,
            json!({"role": name, "permissions": perms}),
        );
        role_row(client, &name)
    })
}

/// Deletes a role and takes it from every key that had it (their own permissions stay).
/// True; P0002 if there is no such role.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn delete_role(name: Option<String>) -> bool {
    let name = required_name(name);
    Spi::connect_mut(|client| {
        let deleted = plans::update(
            client,
            "DELETE FROM apikeys.roles WHERE name = $1 RETURNING name",
            None,
            &[name.as_str().into()],
        );
        if deleted.is_empty() {
            role_not_found(&name);
        }
        let ids: Vec<String> = plans::update(
            client,
            "UPDATE apikeys.keys SET roles = array_remove(roles, $1)
              WHERE roles @> ARRAY[$1] RETURNING id",
            None,
            &[name.as_str().into()],
        )
        .filter_map(|row| errors::internal(row.get::<String>(1)))
        .collect();
        refresh_keys(client, &ids);
        audit::record(
            client,
            "delete_role",
            None,
            json!({"role": name, "keys": ids.len()}),
        );
        true
    })
}

/// Every role, by name.
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn list_roles() -> SetOfIterator<'static, pgrx::composite_type!('static, "apikeys.roles")> {
    let rows: Vec<Role> = Spi::connect(|client| {
        plans::select(
            client,
            "SELECT r FROM apikeys.roles r ORDER BY r.name",
            None,
            &[],
        )
        .filter_map(|row| errors::internal(row.get::<Role>(1)))
        .collect()
    });
    SetOfIterator::new(rows)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    fn perms_of(key: &str) -> String {
        field::<String>(key, "", "permissions::text").unwrap_or_default()
    }

    #[pg_test]
    fn a_key_has_its_own_permissions_and_its_roles() {
        run(
            r#"SELECT apikeys.create_role('reader', '{"orders": ["read"], "reports": ["read"]}', 'reads')"#,
        );
        run(r#"SELECT apikeys.create_role('billing', '{"invoices": ["*"]}')"#);
        let (id, key) = create(
            r#"permissions => '{"orders": ["write"]}', roles => ARRAY['reader', 'billing']"#,
        );
        assert_eq!(
            perms_of(&key),
            r#"{"orders": ["write", "read"], "reports": ["read"], "invoices": ["*"]}"#
        );
        assert_eq!(
            code(
                &key,
                r#"'{"invoices": ["pay"], "orders": ["read", "write"]}'"#
            ),
            "VALID"
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT array_to_string(roles, ',') FROM apikeys.get_api_key('{id}')"
            ))
            .as_deref(),
            Some("reader,billing")
        );
        // get_api_key shows the key's own permissions; verification the effective ones.
        assert_eq!(
            one::<String>(&format!(
                "SELECT permissions::text FROM apikeys.get_api_key('{id}')"
            ))
            .as_deref(),
            Some(r#"{"orders": ["write"]}"#)
        );
    }

    #[pg_test]
    fn a_role_change_reaches_its_keys_and_their_tokens_at_once() {
        run(r#"SELECT apikeys.create_role('ops', '{"servers": ["read"]}')"#);
        let (id, key) = create("roles => ARRAY['ops']");
        let token = mint(&key, "600000");
        assert_eq!(token_code(&token, r#"'{"servers": ["read"]}'"#), "VALID");
        run(
            r#"SELECT apikeys.update_role('ops', permissions => '{"servers": ["read", "reboot"]}')"#,
        );
        assert_eq!(code(&key, r#"'{"servers": ["reboot"]}'"#), "VALID");
        // The token was minted with read only: it never exceeds that.
        assert_eq!(
            token_code(&token, r#"'{"servers": ["reboot"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        run(r#"SELECT apikeys.update_role('ops', permissions => '{}')"#);
        assert_eq!(
            token_code(&token, r#"'{"servers": ["read"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(
            code(&key, r#"'{"servers": ["read"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        // A description-only change leaves permissions alone.
        run(r#"SELECT apikeys.update_role('ops', permissions => '{"servers": ["read"]}')"#);
        run("SELECT apikeys.update_role('ops', description => 'operators')");
        assert_eq!(code(&key, r#"'{"servers": ["read"]}'"#), "VALID");
        // Deleting the role takes it from the key.
        assert_eq!(one::<bool>("SELECT apikeys.delete_role('ops')"), Some(true));
        assert_eq!(
            code(&key, r#"'{"servers": ["read"]}'"#),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(
            one::<i32>(&format!(
                "SELECT cardinality(roles) FROM apikeys.get_api_key('{id}')"
            )),
            Some(0)
        );
    }

    #[pg_test]
    fn a_keys_roles_are_set_changed_and_cleared_by_update() {
        run(r#"SELECT apikeys.create_role('a', '{"x": ["1"]}')"#);
        run(r#"SELECT apikeys.create_role('b', '{"y": ["2"]}')"#);
        let (id, key) = create(r#"permissions => '{"z": ["3"]}'"#);
        assert_eq!(perms_of(&key), r#"{"z": ["3"]}"#);
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', roles => ARRAY['a'])"
        ));
        assert_eq!(perms_of(&key), r#"{"x": ["1"], "z": ["3"]}"#);
        // New own permissions keep the roles'.
        run(&format!(
            r#"SELECT apikeys.update_api_key('{id}', permissions => '{{"w": ["4"]}}')"#
        ));
        assert_eq!(perms_of(&key), r#"{"w": ["4"], "x": ["1"]}"#);
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', roles => ARRAY['b', 'a'])"
        ));
        assert_eq!(perms_of(&key), r#"{"w": ["4"], "x": ["1"], "y": ["2"]}"#);
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', clear => ARRAY['roles'])"
        ));
        assert_eq!(perms_of(&key), r#"{"w": ["4"]}"#);
    }

    #[pg_test]
    fn unknown_roles_and_bad_arguments_are_refused() {
        assert_error(
            "SELECT apikeys.create_api_key(roles => ARRAY['nope'])",
            "P0002",
            "role \"nope\"",
        );
        let (id, _) = create("");
        assert_error(
            &format!("SELECT apikeys.update_api_key('{id}', roles => ARRAY['nope'])"),
            "P0002",
            "nope",
        );
        assert_error(
            "SELECT apikeys.update_role('nope', description => 'x')",
            "P0002",
            "nope",
        );
        assert_error("SELECT apikeys.delete_role('nope')", "P0002", "nope");
        run("SELECT apikeys.create_role('dup')");
        assert_error(
            "SELECT apikeys.create_role('dup')",
            "23505",
            "already exists",
        );
        assert_error(
            "SELECT apikeys.create_role('has space')",
            "22023",
            "\"name\"",
        );
        assert_error("SELECT apikeys.create_role(NULL)", "22023", "\"name\"");
        assert_error(
            r#"SELECT apikeys.create_role('r2', '["read"]')"#,
            "22023",
            "\"permissions\"",
        );
        assert_error(
            "SELECT apikeys.create_api_key(roles => ARRAY[NULL]::text[])",
            "22023",
            "\"roles\"",
        );
        assert_eq!(
            one::<String>("SELECT string_agg(name, ',') FROM apikeys.list_roles()").as_deref(),
            Some("dup")
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(action, ',' ORDER BY id) FROM apikeys.audit_log WHERE action LIKE '%role'"
            )
            .as_deref(),
            Some("create_role")
        );
    }
}
