//! The request context: which key (or token) the current transaction authenticated with, for
//! row-level-security policies and PostgREST's `db-pre-request`.
//!
//! The context lives in this backend's memory, not in a setting, so no `SET` or `set_config` can
//! write it: only `authenticate` (which verifies a credential) and `reset` change it. It follows
//! the transaction: cleared at commit, abort and PREPARE (a pooled connection never hands the
//! next client an identity), and a rolled-back savepoint or PL/pgSQL exception block takes back
//! what was authenticated inside it, as it would for `SET LOCAL`.

use crate::addresses::{self, Client};
use crate::jsonb::{self, Jsonb};
use crate::verify::{self, Code, Verification};
use crate::{claims, errors, http, permissions, tokens};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::Value;
use std::cell::RefCell;

/// Who the transaction is authenticated as.
struct Context {
    key_id: String,
    owner: Option<String>,
    /// What the credential may do: the key's permissions, and for a token only what both the
    /// token and its key grant now.
    permissions: permissions::Permissions,
    claims: Option<Value>,
    /// When the credential stops being valid (a token: its expiry or its key's, the earlier).
    expires_at: Option<pgrx::datum::TimestampWithTimeZone>,
}

impl Context {
    fn of(v: &Verification) -> Context {
        // The verification's permissions are already the effective ones (token ∩ key).
        let permissions = v
            .permissions
            .as_ref()
            .and_then(|p| permissions::parse(&p.value()).ok())
            .unwrap_or_default();
        // Decoded once here: current_claims() may run per row.
        let claims = v.claims.as_ref().map(|c| c.value());
        Context {
            key_id: v.key_id.clone().unwrap_or_default(),
            owner: v.owner.clone(),
            permissions,
            claims,
            expires_at: v.expires_at,
        }
    }
}

thread_local! {
    /// One entry per (sub)transaction level that changed the context, innermost last:
    /// `(subtransaction id, context)`, where `None` is an explicit `reset()`.
    static STACK: RefCell<Vec<(pg_sys::SubTransactionId, Option<Context>)>> =
        const { RefCell::new(Vec::new()) };
}

/// Reads the context in place: the readers run per row in policies, so nothing is cloned that
/// the caller does not return.
fn with_current<R>(read: impl FnOnce(Option<&Context>) -> R) -> R {
    STACK.with(|s| read(s.borrow().last().and_then(|(_, c)| c.as_ref())))
}

/// Who the transaction is authenticated as, for self-service.
pub struct Authenticated {
    pub key_id: String,
    pub owner: Option<String>,
    /// What the credential may do.
    pub permissions: permissions::Permissions,
    /// When it stops being valid.
    pub expires_at: Option<pgrx::datum::TimestampWithTimeZone>,
}

/// The transaction's credential; None when nothing is authenticated.
pub fn authenticated_as() -> Option<Authenticated> {
    with_current(|c| {
        c.map(|c| Authenticated {
            key_id: c.key_id.clone(),
            owner: c.owner.clone(),
            permissions: c.permissions.clone(),
            expires_at: c.expires_at,
        })
    })
}

fn set(context: Option<Context>) {
    // SAFETY: reads the current transaction state; SQL functions run inside a transaction.
    let sub = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let entry = (sub, context);
    STACK.with(|s| {
        let mut stack = s.borrow_mut();
        match stack.last_mut() {
            Some(top) if top.0 == sub => *top = entry,
            _ => stack.push(entry),
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        STACK.with(|s| s.borrow_mut().clear());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    sub: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    STACK.with(|s| {
        let mut stack = s.borrow_mut();
        if stack.last().is_none_or(|top| top.0 != sub) {
            return;
        }
        match event {
            SUBXACT_EVENT_ABORT_SUB => {
                stack.pop();
            }
            // What a committed savepoint set now belongs to its parent.
            SUBXACT_EVENT_COMMIT_SUB => {
                let Some(mut top) = stack.pop() else { return };
                top.0 = parent;
                match stack.last_mut() {
                    Some(below) if below.0 == parent => *below = top,
                    _ => stack.push(top),
                }
            }
            _ => {}
        }
    });
}

/// Called from `_PG_init`: the context must be dropped at every transaction end, whoever ends it.
pub fn init() {
    // SAFETY: _PG_init runs once per process before any transaction of ours; the callbacks are
    // plain functions that live as long as the library (never unloaded).
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Verifies an API key or a token (told apart by shape), counted for analytics, and, only when
/// VALID, makes it the transaction's context. Charged like one verification (cost 1).
fn try_authenticate(credential: Option<&str>, request: &verify::Request) -> Verification {
    let v = match credential {
        Some(c) if claims::looks_like_token(c) => tokens::verify_token_str(Some(c), request),
        other => verify::verify(other, request),
    };
    let v = verify::counted(v, request);
    if v.code == Code::Valid {
        set(Some(Context::of(&v)));
    }
    v
}

/// The credential an HTTP request presents: `x-api-key: <key>`, else
/// `authorization: Bearer <key or token>`. Header names are matched case-insensitively
/// (PostgREST lowercases them; other layers may not). Two different credentials in the two
/// headers are refused (`Err`): PostgREST takes its role from the Bearer JWT, and the request
/// must not run with one credential's role and another's identity.
fn credential_from_headers(headers: &Value) -> Result<Option<&str>, ()> {
    let Value::Object(map) = headers else {
        return Ok(None);
    };
    let header = |name: &str| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
            .map(str::trim)
    };
    let api_key = header("x-api-key").filter(|k| !k.is_empty());
    let bearer = header("authorization").and_then(|authorization| {
        let (scheme, credential) = authorization.split_once(char::is_whitespace)?;
        let credential = credential.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
    });
    match (api_key, bearer) {
        (Some(key), Some(other)) if key != other => Err(()),
        (Some(key), _) => Ok(Some(key)),
        (None, bearer) => Ok(bearer),
    }
}

/// Authenticates the transaction with an API key or a token: on success the context
/// (`current_key_id()`, `current_owner()`, `current_permissions()`, `current_claims()`,
/// `has_permission()`) is set until the transaction ends and the verification is returned.
/// `required` permissions must be granted; `ratelimits` names limits as verify_key's does;
/// `client_ip` is checked against the key's allow-list. Charged like one verification. On
/// failure raises 28000 with the verification code in the message, and sets nothing.
#[pg_extern(security_definer, volatile, name = "authenticate")]
#[search_path(pg_catalog, pg_temp)]
fn authenticate_from(
    credential: Option<&str>,
    required: default!(Option<Jsonb>, "NULL"),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    client_ip: default!(Option<pgrx::datum::Inet>, "NULL"),
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let client = Client::from_arg(client_ip.as_ref());
    authenticated(
        credential,
        verify::Request::from_args(required, Some(1), ratelimits, client),
    )
}

/// authenticate as 0.7 declared it, for a database not updated yet (no SQL).
#[pg_extern(security_definer, volatile, sql = false)]
fn authenticate_with_limits(
    credential: Option<&str>,
    required: Option<Jsonb>,
    ratelimits: Option<Jsonb>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    authenticated(
        credential,
        verify::Request::from_args(required, Some(1), ratelimits, Client::At(None)),
    )
}

/// authenticate as 0.6 and earlier declared it, for a database not updated yet (no SQL).
#[pg_extern(security_definer, volatile, sql = false)]
fn authenticate(
    credential: Option<&str>,
    required: Option<Jsonb>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    authenticated(
        credential,
        verify::Request::from_args(required, Some(1), None, Client::At(None)),
    )
}

/// The context set by `credential`, or 28000.
fn authenticated(credential: Option<&str>, request: verify::Request) -> verify::VerificationRow {
    let v = try_authenticate(credential, &request);
    if v.code != Code::Valid {
        let key = v
            .key_id
            .as_deref()
            .map(|id| format!(" (API key \"{}\")", errors::shown(id)))
            .unwrap_or_default();
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            format!("authentication failed: {}{key}", v.code.as_str()),
            Some(v.code.hint().unwrap_or(
                "apikeys.verify_key() or apikeys.verify_token() shows why a credential is refused.",
            )),
        );
    }
    v.into_row()
}

/// The verification of the credential in `headers` (see `credential_from_headers`), with the
/// request's address (`addresses::of_request`); None when the request carries no credential.
fn authenticate_request_headers(headers: &Value, required: Option<Jsonb>) -> Option<Verification> {
    let request =
        verify::Request::from_args(required, Some(1), None, addresses::of_request(headers));
    match credential_from_headers(headers) {
        Ok(Some(credential)) => Some(try_authenticate(Some(credential), &request)),
        Ok(None) => None,
        // Two credentials: refused as a bad one (counted as a NOT_FOUND attempt).
        Err(()) => Some(verify::counted(Verification::not_found(), &request)),
    }
}

/// Authenticates the credential an HTTP request carries in `headers` (a JSON object of
/// header names to values: `x-api-key`, else `authorization: Bearer <key or token>`), like
/// `authenticate` but without raising: the verification says why a request is refused
/// (`NOT_FOUND` when no credential is present, or when `x-api-key` and a Bearer credential
/// differ). Allow-lists see the address of `apikeys.client_ip_header`, else the connection's.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn authenticate_headers(
    headers: Option<Jsonb>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let headers = jsonb::argument("headers", headers).unwrap_or(Value::Null);
    authenticate_request_headers(&headers, None)
        .unwrap_or_else(Verification::not_found)
        .into_row()
}

/// The layer under `authenticate_request(required)`: authenticates `headers` and returns the
/// role to switch to (the key's, when valid) or, for a refusal, PostgREST's custom error:
/// MESSAGE and DETAIL as JSON text (see `http`).
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn authenticate_http(
    headers: Option<Jsonb>,
    required: default!(Option<Jsonb>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(role, Option<String>),
        name!(message, Option<String>),
        name!(detail, Option<String>),
    ),
> {
    let headers = jsonb::argument("headers", headers).unwrap_or(Value::Null);
    let v = authenticate_request_headers(&headers, required);
    let refused = match &v {
        None => Some(http::Refused::NoCredentials),
        Some(v) if v.code != Code::Valid => Some(http::Refused::Verification {
            code: v.code,
            key_id: v.key_id.as_deref(),
            retry_at_us: v.retry_at_us,
        }),
        Some(_) => None,
    };
    let now_us = verify::epoch_us(verify::wall_clock());
    let row = match refused {
        Some(refused) => {
            let (message, detail) = http::refusal(&refused, now_us);
            (None, Some(message), Some(detail))
        }
        None => (v.and_then(|v| v.role), None, None),
    };
    TableIterator::once(row)
}

// PostgreSQL refuses SET ROLE inside SECURITY DEFINER functions, and only PL/pgSQL's RAISE sets
// SQLSTATE 'PGRST' with MESSAGE and DETAIL of our choosing: the role switch and the PostgREST
// error live in this small PL/pgSQL function that runs with the caller's rights.
extension_sql!(
    r#"
-- For PostgREST's db-pre-request: authenticates the request's x-api-key or
-- Authorization: Bearer credential (and `required` permissions), switches to the key's role for
-- the transaction, and refuses with PostgREST's custom error (SQLSTATE PGRST: HTTP 401, 403 or
-- 429 with WWW-Authenticate or Retry-After) when the request may not go on.
CREATE FUNCTION apikeys.authenticate_request(required jsonb DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;  -- no name is resolved before the check below
BEGIN
    -- This body names schema apikeys: it must be the extension's own (see catalog.rs).
    IF pg_catalog.to_regnamespace('apikeys')::pg_catalog.oid IS DISTINCT FROM
       (SELECT e.extnamespace FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'pg_apikeys') THEN
        RAISE EXCEPTION 'schema "apikeys" is not the schema of extension pg_apikeys'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT * INTO r FROM apikeys.authenticate_http(
        nullif(current_setting('request.headers', true), '')::jsonb, required);
    IF r.message IS NOT NULL THEN
        RAISE SQLSTATE 'PGRST' USING MESSAGE = r.message, DETAIL = r.detail;
    END IF;
    IF r.role IS NOT NULL THEN
        PERFORM set_config('role', r.role, true);
    END IF;
END
$$;
"#,
    name = "authenticate_request",
    requires = [authenticate_http]
);

/// The id of the key the transaction authenticated with; NULL when none.
#[pg_extern(stable, parallel_restricted)]
fn current_key_id() -> Option<String> {
    with_current(|c| c.map(|c| c.key_id.clone()))
}

/// The owner of the authenticated key (the tenant or user it acts for); NULL when none.
#[pg_extern(stable, parallel_restricted)]
fn current_owner() -> Option<String> {
    with_current(|c| c.and_then(|c| c.owner.clone()))
}

/// What the authenticated credential may do, as a permissions document (for a token: what both
/// the token and its key grant); NULL when nothing is authenticated.
#[pg_extern(stable, parallel_restricted)]
fn current_permissions() -> Option<JsonB> {
    with_current(|c| c.map(|c| JsonB(permissions::to_json(&c.permissions))))
}

/// The claims of the authenticated token (custom claims included); NULL for an API key or when
/// nothing is authenticated.
#[pg_extern(stable, parallel_restricted)]
fn current_claims() -> Option<JsonB> {
    with_current(|c| c.and_then(|c| c.claims.clone().map(JsonB)))
}

/// Whether the authenticated credential grants `action` on `resource` (`"*"` grants match as in
/// verify_key). False when nothing is authenticated. Reads backend memory only: cheap per row.
#[pg_extern(stable, strict, parallel_restricted)]
fn has_permission(resource: &str, action: &str) -> bool {
    with_current(|c| c.is_some_and(|c| permissions::allows(&c.permissions, resource, action)))
}

/// Clears the context for the rest of the transaction (a savepoint rollback restores it).
/// A role switched to by authenticate_request() stays until the transaction ends.
#[pg_extern(volatile, parallel_restricted)]
fn reset() {
    set(None);
}

#[cfg(test)]
mod unit {
    use super::credential_from_headers;
    use serde_json::json;

    #[test]
    fn credentials_come_from_x_api_key_then_bearer() {
        let cred = |h| {
            credential_from_headers(&h)
                .expect("one credential")
                .map(str::to_owned)
        };
        assert_eq!(cred(json!({"x-api-key": "sk_a"})).as_deref(), Some("sk_a"));
        assert_eq!(
            cred(json!({"X-Api-Key": " sk_a "})).as_deref(),
            Some("sk_a")
        );
        assert_eq!(
            cred(json!({"authorization": "Bearer e.y.J"})).as_deref(),
            Some("e.y.J")
        );
        assert_eq!(
            cred(json!({"Authorization": "bearer   sk_b"})).as_deref(),
            Some("sk_b")
        );
        assert_eq!(
            cred(json!({"x-api-key": "sk_a", "authorization": "Bearer sk_a"})).as_deref(),
            Some("sk_a")
        );
        assert_eq!(
            cred(json!({"x-api-key": "sk_a", "authorization": "Basic dXNlcjpwYXNz"})).as_deref(),
            Some("sk_a")
        );
        assert_eq!(
            cred(json!({"x-api-key": "", "authorization": "Bearer sk_b"})).as_deref(),
            Some("sk_b")
        );
        for none in [
            json!({}),
            json!(null),
            json!("sk_a"),
            json!(["x-api-key", "sk_a"]),
            json!({"x-api-key": 42}),
            json!({"authorization": "Basic dXNlcjpwYXNz"}),
            json!({"authorization": "Bearer"}),
            json!({"authorization": "Bearer   "}),
            json!({"authorization": "sk_a"}),
            json!({"api-key": "sk_a"}),
        ] {
            assert_eq!(cred(none.clone()), None, "{none}");
        }
    }

    #[test]
    fn two_different_credentials_in_one_request_are_refused() {
        // PostgREST takes the role from the Bearer JWT: a different key in x-api-key would run
        // the request with one credential's role and the other's identity.
        for both in [
            json!({"x-api-key": "sk_a", "authorization": "Bearer sk_b"}),
            json!({"x-api-key": "sk_a", "authorization": "Bearer eyJ.eyJ.sig"}),
        ] {
            assert_eq!(credential_from_headers(&both), Err(()), "{both}");
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    fn authenticate(credential: &str) {
        run(&format!(
            "SELECT apikeys.authenticate({})",
            pgrx::spi::quote_literal(credential)
        ));
    }

    fn who() -> Option<String> {
        one::<String>("SELECT apikeys.current_key_id()")
    }

    fn allowed(resource: &str, action: &str) -> Option<bool> {
        one::<bool>(&format!(
            "SELECT apikeys.has_permission('{resource}', '{action}')"
        ))
    }

    #[pg_test]
    fn nothing_is_authenticated_until_authenticate_succeeds() {
        assert_eq!(who(), None);
        assert_eq!(one::<String>("SELECT apikeys.current_owner()"), None);
        assert_eq!(
            one::<pgrx::JsonB>("SELECT apikeys.current_permissions()").map(|j| j.0),
            None
        );
        assert_eq!(allowed("orders", "read"), Some(false));
        assert_eq!(
            one::<bool>("SELECT apikeys.has_permission(NULL, 'read')"),
            None
        );
    }

    #[pg_test]
    fn a_key_sets_the_context() {
        let (id, key) = create(
            "owner => 'acme', permissions => '{\"orders\": [\"read\"], \"reports\": [\"*\"]}', remaining => 5",
        );
        let valid = one::<bool>(&format!(
            "SELECT valid FROM apikeys.authenticate({})",
            pgrx::spi::quote_literal(&key)
        ));
        assert_eq!(valid, Some(true));
        assert_eq!(who(), Some(id.clone()));
        assert_eq!(
            one::<String>("SELECT apikeys.current_owner()").as_deref(),
            Some("acme")
        );
        assert_eq!(
            one::<String>("SELECT apikeys.current_permissions()::text").as_deref(),
            Some(r#"{"orders": ["read"], "reports": ["*"]}"#)
        );
        assert_eq!(
            one::<pgrx::JsonB>("SELECT apikeys.current_claims()").map(|j| j.0),
            None
        );
        for (resource, action, expected) in [
            ("orders", "read", true),
            ("orders", "write", false),
            ("reports", "export", true),
            ("users", "read", false),
        ] {
            assert_eq!(
                allowed(resource, action),
                Some(expected),
                "{resource}:{action}"
            );
        }
        // Charged like a verification.
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(4)
        );
    }

    #[pg_test]
    fn a_token_sets_the_context_with_its_claims_and_only_what_key_and_token_both_grant() {
        let (id, key) =
            create("owner => 'acme', permissions => '{\"orders\": [\"read\", \"write\"]}'");
        let token = mint(&key, "60000, claims => '{\"plan\": \"pro\"}'");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"orders\": [\"read\"], \"users\": [\"read\"]}}')"
        ));
        authenticate(&token);
        assert_eq!(who(), Some(id));
        assert_eq!(
            one::<String>("SELECT apikeys.current_owner()").as_deref(),
            Some("acme")
        );
        assert_eq!(
            one::<String>("SELECT apikeys.current_claims()->>'plan'").as_deref(),
            Some("pro")
        );
        assert_eq!(
            one::<String>("SELECT apikeys.current_permissions()::text").as_deref(),
            Some(r#"{"orders": ["read"]}"#)
        );
        assert_eq!(allowed("orders", "write"), Some(false));
        assert_eq!(allowed("users", "read"), Some(false));
        assert_eq!(allowed("orders", "read"), Some(true));
    }

    #[pg_test]
    fn failure_raises_28000_with_the_code_and_sets_nothing() {
        let (first_id, first) = create("owner => 'first'");
        authenticate(&first);
        let (id, revoked) = create("owner => 'other'");
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        let (_, limited) = create("permissions => '{\"orders\": [\"read\"]}'");
        let q = pgrx::spi::quote_literal;
        for (sql, needle) in [
            (
                format!("SELECT apikeys.authenticate({})", q(&revoked)),
                format!("REVOKED (API key \"{id}\")"),
            ),
            (
                "SELECT apikeys.authenticate('sk_nope')".into(),
                "NOT_FOUND".into(),
            ),
            (
                "SELECT apikeys.authenticate(NULL)".into(),
                "NOT_FOUND".into(),
            ),
            (
                "SELECT apikeys.authenticate('a.b.c')".into(),
                "NOT_FOUND".into(),
            ),
            (
                format!(
                    "SELECT apikeys.authenticate({}, '{{\"orders\": [\"write\"]}}')",
                    q(&limited)
                ),
                "INSUFFICIENT_PERMISSIONS".into(),
            ),
        ] {
            assert_error(&sql, "28000", &format!("authentication failed: {needle}"));
            assert_eq!(who(), Some(first_id.clone()), "{sql}");
        }
        assert_error(
            &format!("SELECT apikeys.authenticate({}, '[1]')", q(&first)),
            "22023",
            "\"required\"",
        );
    }

    #[pg_test]
    fn savepoints_and_exception_blocks_take_back_what_they_authenticated() {
        let (a_id, a) = create("");
        let (b_id, b) = create("");
        let q = pgrx::spi::quote_literal;
        authenticate(&a);
        // Rolled back: B was authenticated inside the failed block, A comes back.
        run(&format!(
            "DO $$ BEGIN PERFORM apikeys.authenticate({}); RAISE EXCEPTION 'boom'; \
             EXCEPTION WHEN raise_exception THEN NULL; END $$",
            q(&b)
        ));
        assert_eq!(who(), Some(a_id.clone()));
        run(
            "DO $$ BEGIN PERFORM apikeys.reset(); RAISE EXCEPTION 'boom'; \
             EXCEPTION WHEN raise_exception THEN NULL; END $$",
        );
        assert_eq!(who(), Some(a_id.clone()));
        // A block that ends normally keeps what it set, also through nested blocks.
        run(&format!(
            "DO $$ BEGIN BEGIN BEGIN PERFORM apikeys.authenticate({}); \
             EXCEPTION WHEN raise_exception THEN NULL; END; \
             EXCEPTION WHEN raise_exception THEN NULL; END; END $$",
            q(&b)
        ));
        assert_eq!(who(), Some(b_id));
        run("SELECT apikeys.reset()");
        assert_eq!(who(), None);
        assert_eq!(allowed("*", "*"), Some(false));
    }

    #[pg_test]
    fn the_context_cannot_be_forged_through_settings() {
        let (a_id, a) = create("owner => 'tenant-a', permissions => '{\"orders\": [\"read\"]}'");
        let (b_id, _) = create("owner => 'tenant-b', permissions => '{\"*\": [\"*\"]}'");
        run("CREATE ROLE forger NOSUPERUSER NOBYPASSRLS");
        let names = one::<Vec<String>>(
            "SELECT array_agg(name) FROM pg_settings WHERE name LIKE 'apikeys.%' OR name LIKE 'request.%'",
        )
        .unwrap_or_default();
        let plausible = [
            "apikeys.key_id",
            "apikeys.current_key_id",
            "apikeys.owner",
            "apikeys.current_owner",
            "apikeys.permissions",
            "apikeys.claims",
            "apikeys.context",
            "apikeys.authenticated",
            "apikeys.role",
            "request.jwt.claims",
            "request.jwt.claim.sub",
            "request.jwt.claim.key_id",
            "request.headers",
            "request.apikey",
            "pg_apikeys.key_id",
            "app.key_id",
            "app.tenant",
            "jwt.claims.sub",
            "session.key_id",
        ];
        let forge = |who_: &str| {
            for name in names.iter().map(String::as_str).chain(plausible) {
                for value in [
                    b_id.as_str(),
                    "tenant-b",
                    "{\"key_id\": \"x\", \"sub\": \"tenant-b\", \"owner\": \"tenant-b\"}",
                ] {
                    // Some names are SUSET: as the forger those writes fail, which is fine too.
                    error_of(&format!(
                        "SELECT set_config({}, {}, false)",
                        pgrx::spi::quote_literal(name),
                        pgrx::spi::quote_literal(value)
                    ));
                    error_of(&format!("SET {name} = {}", pgrx::spi::quote_literal(value)));
                }
            }
            assert_eq!(who(), (!who_.is_empty()).then(|| who_.to_owned()));
            let owner = one::<String>("SELECT apikeys.current_owner()");
            assert_ne!(owner.as_deref(), Some("tenant-b"));
            assert_eq!(allowed("users", "delete"), Some(false));
        };
        run("SET LOCAL ROLE forger");
        forge("");
        run("RESET ROLE");
        forge("");
        authenticate(&a);
        run("SET LOCAL ROLE forger");
        forge(&a_id);
        assert_eq!(
            one::<String>("SELECT apikeys.current_owner()").as_deref(),
            Some("tenant-a")
        );
    }

    #[pg_test]
    fn authenticate_headers_reads_x_api_key_then_bearer() {
        let (id, key) = create("owner => 'acme'");
        let token = mint(&key, "60000");
        let headers = |h: serde_json::Value| {
            format!(
                "SELECT code FROM apikeys.authenticate_headers({}::jsonb)",
                pgrx::spi::quote_literal(h.to_string())
            )
        };
        assert_eq!(
            one::<String>(&headers(serde_json::json!({}))).as_deref(),
            Some("NOT_FOUND")
        );
        assert_eq!(who(), None);
        assert_eq!(
            one::<String>(&headers(
                serde_json::json!({"authorization": "Bearer sk_bad"})
            ))
            .as_deref(),
            Some("NOT_FOUND")
        );
        assert_eq!(
            one::<String>("SELECT code FROM apikeys.authenticate_headers(NULL)").as_deref(),
            Some("NOT_FOUND")
        );
        assert_eq!(
            one::<String>(&headers(serde_json::json!({"x-api-key": key}))).as_deref(),
            Some("VALID")
        );
        assert_eq!(who(), Some(id.clone()));
        run("SELECT apikeys.reset()");
        assert_eq!(
            one::<String>(&headers(
                serde_json::json!({"authorization": format!("Bearer {token}")})
            ))
            .as_deref(),
            Some("VALID")
        );
        assert_eq!(who(), Some(id));
        assert!(one::<pgrx::JsonB>("SELECT apikeys.current_claims()").is_some());
    }

    #[pg_test]
    fn authenticate_request_refuses_with_postgrest_errors_and_switches_role() {
        run("CREATE ROLE tenant_web NOLOGIN");
        let (id, key) = create("owner => 'acme', role => 'tenant_web'");
        let (_, roleless) = create("owner => 'acme'");
        let set_headers = |h: serde_json::Value| {
            run(&format!(
                "SELECT set_config('request.headers', {}, true)",
                pgrx::spi::quote_literal(h.to_string())
            ))
        };
        pgrst_helper();
        let (body, detail) = refusal("SELECT apikeys.authenticate_request()");
        assert_eq!(body["code"], "NO_CREDENTIALS");
        assert_eq!(
            detail,
            json!({"status": 401, "headers": {"WWW-Authenticate": "Bearer"}})
        );
        set_headers(json!({"x-api-key": "sk_wrong"}));
        let (body, detail) = refusal("SELECT apikeys.authenticate_request()");
        assert_eq!(body["code"], "NOT_FOUND");
        assert_eq!(body["details"], Value::Null);
        assert_eq!(
            detail["headers"]["WWW-Authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert_eq!(who(), None);
        // Two different credentials: PostgREST's role from one, our identity from the other.
        set_headers(json!({"x-api-key": roleless, "authorization": format!("Bearer {key}")}));
        assert_eq!(
            refusal("SELECT apikeys.authenticate_request()").1["status"],
            401
        );
        assert_eq!(who(), None);
        set_headers(json!({"x-api-key": roleless}));
        run("SELECT apikeys.authenticate_request()");
        assert_eq!(
            one::<bool>("SELECT current_user = session_user"),
            Some(true)
        );
        // `required` refuses with 403.
        let (body, detail) =
            refusal(r#"SELECT apikeys.authenticate_request('{"orders": ["write"]}')"#);
        assert_eq!(body["code"], "INSUFFICIENT_PERMISSIONS");
        assert_eq!(detail, json!({"status": 403, "headers": {}}));
        set_headers(json!({"x-api-key": key}));
        run("SELECT apikeys.authenticate_request()");
        assert_eq!(who(), Some(id));
        assert_eq!(
            one::<String>("SELECT current_user::text").as_deref(),
            Some("tenant_web")
        );
        run("RESET ROLE");
    }

    /// PostgREST's custom error of `sql`: SQLSTATE PGRST, MESSAGE (the body) and DETAIL (status
    /// and headers) as JSON.
    fn refusal(sql: &str) -> (Value, Value) {
        let raised = one::<String>(&format!(
            "SELECT tests.pgrst_of({})",
            pgrx::spi::quote_literal(sql)
        ))
        .unwrap_or_else(|| panic!("{sql} raised nothing"));
        let mut parts = raised.splitn(3, '|');
        assert_eq!(parts.next(), Some("PGRST"), "{raised}");
        let body = serde_json::from_str(parts.next().unwrap()).unwrap();
        let detail = serde_json::from_str(parts.next().unwrap()).unwrap();
        (body, detail)
    }

    fn pgrst_helper() {
        run(
            r#"CREATE OR REPLACE FUNCTION tests.pgrst_of(q text) RETURNS text LANGUAGE plpgsql AS $f$
               DECLARE d text;
               BEGIN
                   EXECUTE q;
                   RETURN NULL;
               EXCEPTION WHEN OTHERS THEN
                   GET STACKED DIAGNOSTICS d = PG_EXCEPTION_DETAIL;
                   RETURN SQLSTATE || '|' || SQLERRM || '|' || d;
               END $f$"#,
        );
    }

    #[pg_test]
    fn every_refusal_has_its_http_status_and_headers() {
        pgrst_helper();
        let request = |h: Value| {
            run(&format!(
                "SELECT set_config('request.headers', {}, true)",
                pgrx::spi::quote_literal(h.to_string())
            ));
            refusal("SELECT apikeys.authenticate_request()")
        };
        let with = |key: &str| request(json!({"x-api-key": key}));
        let (_, expired) = create("expires_at => now() - '1 s'::interval");
        let (_, disabled) = create("enabled => false");
        let (revoked_id, revoked) = create("");
        run(&format!("SELECT apikeys.revoke_api_key('{revoked_id}')"));
        for (key, code) in [
            (&expired, "EXPIRED"),
            (&disabled, "DISABLED"),
            (&revoked, "REVOKED"),
        ] {
            let (body, detail) = with(key);
            assert_eq!(body["code"], code);
            assert!(body["details"].is_string(), "names the key: {body}");
            assert!(!body.to_string().contains(key.as_str()), "never the secret");
            assert_eq!(detail["status"], 401);
        }
        // 429 with Retry-After until the window ends (whole seconds, rounded up).
        let (_, limited) = create(
            "rate_limit_max => 1, rate_limit_window => '1 hour', rate_limit_algorithm => 'fixed'",
        );
        run(&format!("SELECT apikeys.verify_key('{limited}')"));
        let (body, detail) = with(&limited);
        assert_eq!(body["code"], "RATE_LIMITED");
        assert_eq!(detail["status"], 429);
        let retry: i64 = detail["headers"]["Retry-After"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3590..=3600).contains(&retry), "{detail}");
        // A spent quota: until the refill, or no Retry-After without one.
        let (_, spent) = create("remaining => 0");
        let (body, detail) = with(&spent);
        assert_eq!(body["code"], "USAGE_EXCEEDED");
        assert_eq!(detail, json!({"status": 429, "headers": {}}));
        let (_, refilling) =
            create("remaining => 1, refill_amount => 1, refill_interval => '1 day'");
        run(&format!("SELECT apikeys.verify_key('{refilling}')"));
        let (_, detail) = with(&refilling);
        let retry: i64 = detail["headers"]["Retry-After"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((86_390..=86_400).contains(&retry), "{detail}");
        // An identity's exhausted quota: until the identity's refill.
        run("SELECT apikeys.create_identity('http_org', remaining => 0, refill_amount => 5, refill_interval => '2 hours')");
        let (_, member) = create("owner => 'http_org'");
        let (body, detail) = with(&member);
        assert_eq!(body["code"], "USAGE_EXCEEDED");
        let retry: i64 = detail["headers"]["Retry-After"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((7190..=7200).contains(&retry), "{detail}");
        // Both levels exhausted: a retry can succeed only once both have refilled.
        run("SELECT apikeys.create_identity('http_both', remaining => 0, refill_amount => 5, refill_interval => '3 hours')");
        let (_, both) = create(
            "owner => 'http_both', remaining => 0, refill_amount => 1, refill_interval => '1 hour'",
        );
        let (_, detail) = with(&both);
        let retry: i64 = detail["headers"]["Retry-After"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((10_790..=10_800).contains(&retry), "{detail}");
        run("SELECT apikeys.create_identity('http_never', remaining => 0)");
        let (_, never) = create("owner => 'http_never', remaining => 0, refill_amount => 1, refill_interval => '1 hour'");
        assert_eq!(with(&never).1, json!({"status": 429, "headers": {}}));
        // 403 for an address outside the allow-list (a unix socket has none).
        let (_, listed) = create("allowed_cidrs => '{10.0.0.0/8}'");
        let (body, detail) = with(&listed);
        assert_eq!(body["code"], "FORBIDDEN");
        assert_eq!(detail, json!({"status": 403, "headers": {}}));
    }

    #[pg_test]
    fn the_client_ip_header_names_the_address_allow_lists_see() {
        pgrst_helper();
        let (_, key) = create("allowed_cidrs => '{10.0.0.0/8, 2001:db8::/32}'");
        let request = |h: Value| {
            run(&format!(
                "SELECT set_config('request.headers', {}, true)",
                pgrx::spi::quote_literal(h.to_string())
            ));
            one::<String>("SELECT tests.pgrst_of('SELECT apikeys.authenticate_request()')")
        };
        run("SET LOCAL apikeys.client_ip_header = 'x-forwarded-for'");
        assert_eq!(
            request(json!({"x-api-key": key, "x-forwarded-for": "10.1.1.1, 192.168.0.1"})),
            None
        );
        assert_eq!(
            request(json!({"x-api-key": key, "X-Forwarded-For": "[2001:db8::7]:443"})),
            None
        );
        assert_eq!(
            request(json!({"x-api-key": key, "x-forwarded-for": "10.1.1.1:8080"})),
            None
        );
        for refused in [
            json!({"x-api-key": key, "x-forwarded-for": "192.168.0.1, 10.1.1.1"}),
            json!({"x-api-key": key, "x-forwarded-for": "garbage"}),
            json!({"x-api-key": key, "x-forwarded-for": ""}),
            json!({"x-api-key": key}),
        ] {
            let raised = request(refused.clone()).unwrap_or_default();
            assert!(
                raised.contains("FORBIDDEN") && raised.contains("403"),
                "{refused}: {raised}"
            );
        }
        // Only a superuser names the header.
        run("CREATE ROLE header_setter");
        run("SET LOCAL ROLE header_setter");
        assert_error(
            "SET apikeys.client_ip_header = 'x-real-ip'",
            "42501",
            "apikeys.client_ip_header",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn context_functions_are_public_and_restricted_to_the_leader() {
        let rows = one::<String>(
            "SELECT string_agg(p.proname || ':' || p.provolatile::text || p.proparallel::text || \
                    has_function_privilege('public', p.oid, 'EXECUTE')::text, ',' ORDER BY p.proname) \
             FROM pg_proc p WHERE p.pronamespace = 'apikeys'::regnamespace \
               AND p.proname IN ('current_key_id', 'current_owner', 'current_permissions', \
                                 'current_claims', 'has_permission', 'reset', 'authenticate', \
                                 'authenticate_headers', 'authenticate_request')",
        );
        assert_eq!(
            rows.as_deref(),
            Some(
                "authenticate:vutrue,authenticate_headers:vutrue,authenticate_request:vutrue,\
                 current_claims:srtrue,current_key_id:srtrue,current_owner:srtrue,\
                 current_permissions:srtrue,has_permission:srtrue,reset:vrtrue"
            )
        );
    }
}
