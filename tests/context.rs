//! The request context against a real server, as applications use it: non-superuser roles
//! behind a row-level-security policy, one connection reused across transactions (a pool), and
//! PostgREST's per-request transaction replayed statement by statement.

use postgres::{Client, IsolationLevel, NoTls};

mod common;
use common::*;

/// Roles are cluster-wide and survive between runs, so they are created only when missing.
const ROLES: &str = "
DO $$
DECLARE r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['it_app', 'it_authenticator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT', r);
        END IF;
    END LOOP;
    FOREACH r IN ARRAY ARRAY['it_anon', 'it_web', 'it_noaccess', 'it_stranger'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOBYPASSRLS', r);
        END IF;
    END LOOP;
END $$;
GRANT it_anon, it_web, it_noaccess TO it_authenticator;
";

/// A multi-tenant table: each key sees and writes only its owner's rows, and only with the
/// permission for it. The policies are the README's.
const TABLE: &str = "
DROP TABLE IF EXISTS orders;
CREATE TABLE orders (id serial PRIMARY KEY, tenant text NOT NULL, item text NOT NULL);
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_reads ON orders FOR SELECT
    USING (tenant = apikeys.current_owner() AND apikeys.has_permission('orders', 'read'));
CREATE POLICY tenant_writes ON orders FOR INSERT
    WITH CHECK (tenant = apikeys.current_owner() AND apikeys.has_permission('orders', 'write'));
GRANT SELECT, INSERT ON orders TO it_app, it_anon, it_web;
GRANT USAGE ON SEQUENCE orders_id_seq TO it_app, it_anon, it_web;
INSERT INTO orders (tenant, item) VALUES
    ('acme', 'anvil'), ('acme', 'rocket'), ('globex', 'lamp'), ('initech', 'stapler');
";

/// The server, the roles and the table; returns an admin (superuser) connection.
fn setup() -> Client {
    let mut admin = connect();
    admin.batch_execute(ROLES).unwrap();
    admin.batch_execute(TABLE).unwrap();
    admin
}

fn connect_as(role: &str) -> Client {
    let mut client =
        Client::connect(&format!("{} dbname={DB} user={role}", base_url()), NoTls).unwrap();
    let (superuser, bypass): (bool, bool) = {
        let row = client
            .query_one(
                "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(!superuser && !bypass, "{role} must be subject to RLS");
    client
}

/// The items a query on `orders` returns, sorted.
fn items(client: &mut impl postgres::GenericClient) -> Vec<String> {
    client
        .query("SELECT item FROM orders ORDER BY item", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn rls_shows_each_tenant_its_rows_and_nothing_after_the_transaction() {
    let mut admin = setup();
    let perms = "permissions => '{\"orders\": [\"read\", \"write\"]}'";
    let (a_id, acme) = create(&mut admin, &format!("owner => 'acme', {perms}"));
    let (_, globex) = create(&mut admin, &format!("owner => 'globex', {perms}"));
    let (_, acme_reports) = create(
        &mut admin,
        "owner => 'acme', permissions => '{\"reports\": [\"read\"]}'",
    );
    let acme_token = mint(&mut admin, &acme, 60_000);

    // One connection reused for every "request", as a pool would.
    let mut app = connect_as("it_app");
    let authenticate = "SELECT apikeys.authenticate($1)";
    assert!(items(&mut app).is_empty(), "nothing without authentication");

    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&acme]).unwrap();
    assert_eq!(items(&mut tx), ["anvil", "rocket"]);
    let who: Option<String> = tx
        .query_one("SELECT apikeys.current_key_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, Some(a_id.clone()));
    tx.commit().unwrap();
    assert!(items(&mut app).is_empty(), "nothing after commit");
    let who: Option<String> = app
        .query_one("SELECT apikeys.current_key_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, None);

    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&globex]).unwrap();
    assert_eq!(items(&mut tx), ["lamp"]);
    tx.rollback().unwrap();
    assert!(items(&mut app).is_empty(), "nothing after rollback");

    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&acme_token]).unwrap();
    assert_eq!(
        items(&mut tx),
        ["anvil", "rocket"],
        "a token acts as its key"
    );
    tx.commit().unwrap();

    // A transaction that fails after authenticating leaves nothing behind either.
    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&acme]).unwrap();
    assert_eq!(
        sqlstate(&tx.execute("SELECT 1 / 0", &[]).unwrap_err()),
        "22012"
    );
    drop(tx);
    assert!(
        items(&mut app).is_empty(),
        "nothing after an aborted transaction"
    );

    // Outside a transaction block each statement is its own transaction.
    app.execute(authenticate, &[&acme]).unwrap();
    assert!(
        items(&mut app).is_empty(),
        "autocommit: gone with its statement"
    );

    // Without the permission the policy names, the tenant's own rows stay hidden.
    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&acme_reports]).unwrap();
    assert!(items(&mut tx).is_empty());
    tx.commit().unwrap();

    // Writes: only into one's own tenant.
    let mut tx = app.transaction().unwrap();
    tx.execute(authenticate, &[&acme]).unwrap();
    tx.execute(
        "INSERT INTO orders (tenant, item) VALUES ('acme', 'magnet')",
        &[],
    )
    .unwrap();
    let err = tx
        .execute(
            "INSERT INTO orders (tenant, item) VALUES ('globex', 'forged')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    drop(tx);

    // A failed authentication raises 28000 and leaves the transaction unauthenticated.
    let mut tx = app.transaction().unwrap();
    let err = tx.execute(authenticate, &[&"sk_not_a_key"]).unwrap_err();
    assert_eq!(sqlstate(&err), "28000");
    assert!(err.to_string().contains("NOT_FOUND") || format!("{err:?}").contains("NOT_FOUND"));
    drop(tx);

    // Two connections at once, each with its own identity.
    let mut other = connect_as("it_app");
    let mut tx_a = app.transaction().unwrap();
    let mut tx_b = other.transaction().unwrap();
    tx_a.execute(authenticate, &[&acme]).unwrap();
    tx_b.execute(authenticate, &[&globex]).unwrap();
    assert_eq!(items(&mut tx_a), ["anvil", "rocket"]);
    assert_eq!(items(&mut tx_b), ["lamp"]);
    tx_a.commit().unwrap();
    tx_b.commit().unwrap();
}

/// One PostgREST request, replayed as PostgREST runs it (its "Transactions" documentation):
/// a transaction (READ ONLY for GET), the request settings and the JWT role as `set_config(…,
/// true)`, the `db-pre-request` function, then the query. Returns the items or the error.
fn request(
    client: &mut Client,
    method: &str,
    headers: serde_json::Value,
    jwt_role: &str,
    jwt_claims: serde_json::Value,
) -> Result<(Vec<String>, String), postgres::Error> {
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .read_only(method == "GET")
        .start()?;
    tx.execute(
        "SELECT set_config('search_path', 'public', true), set_config('role', $1, true),
                set_config('request.jwt.claims', $2, true), set_config('request.method', $3, true),
                set_config('request.path', '/orders', true), set_config('request.headers', $4, true),
                set_config('request.cookies', '{}', true)",
        &[
            &jwt_role,
            &jwt_claims.to_string(),
            &method,
            &headers.to_string(),
        ],
    )?;
    tx.execute("SELECT apikeys.authenticate_request()", &[])?;
    let role: String = tx.query_one("SELECT current_user::text", &[])?.get(0);
    let body: String = tx
        .query_one(
            "WITH pgrst_source AS (SELECT public.orders.item FROM public.orders ORDER BY item)
         SELECT coalesce(json_agg(_postgrest_t.item), '[]')::text FROM pgrst_source _postgrest_t",
            &[],
        )?
        .get(0);
    tx.commit()?;
    Ok((serde_json::from_str(&body).unwrap(), role))
}

/// A GET request with an API key in x-api-key and no JWT, as the anonymous role.
fn get_with_key(client: &mut Client, key: &str) -> Result<(Vec<String>, String), postgres::Error> {
    let none = serde_json::json!({});
    request(
        client,
        "GET",
        serde_json::json!({"x-api-key": key}),
        "it_anon",
        none,
    )
}

/// The payload of a JWT, as PostgREST puts it into `request.jwt.claims` after checking it.
fn payload(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let part = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn postgrest_requests_authenticate_in_the_pre_request_function() {
    let mut admin = setup();
    let read = "permissions => '{\"orders\": [\"read\"]}'";
    let (_, acme) = create(
        &mut admin,
        &format!("owner => 'acme', role => 'it_web', {read}"),
    );
    let (_, globex) = create(
        &mut admin,
        &format!("owner => 'globex', role => 'it_web', {read}"),
    );
    let (b_id, _) = create(&mut admin, "owner => 'initech'");
    let (_, no_table) = create(
        &mut admin,
        &format!("owner => 'acme', role => 'it_noaccess', {read}"),
    );
    let (_, stranger) = create(
        &mut admin,
        &format!("owner => 'acme', role => 'it_stranger', {read}"),
    );
    let (metered_id, metered) = create(
        &mut admin,
        &format!("owner => 'acme', role => 'it_web', remaining => 10, {read}"),
    );
    let globex_token = mint(&mut admin, &globex, 60_000);

    let mut pgrst = connect_as("it_authenticator");
    let none = serde_json::json!({});
    let anon = "it_anon";

    // An API key in x-api-key: PostgREST's JWT step does nothing, the pre-request authenticates.
    let (rows, role) = get_with_key(&mut pgrst, &acme).unwrap();
    assert_eq!(
        (rows, role.as_str()),
        (vec!["anvil".to_owned(), "rocket".to_owned()], "it_web")
    );

    // A token as Bearer: PostgREST has checked it with jwt-secret, switched to its role claim and
    // set request.jwt.claims; the pre-request verifies it again, key state included.
    let claims = payload(&globex_token);
    assert_eq!(claims["role"], "it_web");
    let bearer = serde_json::json!({"authorization": format!("Bearer {globex_token}")});
    let (rows, _) = request(&mut pgrst, "GET", bearer.clone(), "it_web", claims.clone()).unwrap();
    assert_eq!(rows, ["lamp"]);

    // Claims PostgREST was handed are not ours to trust: the key decides.
    let forged =
        serde_json::json!({"sub": "globex", "owner": "globex", "key_id": b_id, "role": "it_web"});
    let (rows, _) = request(
        &mut pgrst,
        "GET",
        serde_json::json!({"x-api-key": acme}),
        "it_web",
        forged,
    )
    .unwrap();
    assert_eq!(rows, ["anvil", "rocket"]);

    // Bad or missing credentials: PostgREST's custom error, HTTP 401.
    for (headers, code) in [
        (serde_json::json!({"x-api-key": "sk_wrong"}), "NOT_FOUND"),
        (
            serde_json::json!({"authorization": "Bearer not.a.token"}),
            "NOT_FOUND",
        ),
        (
            serde_json::json!({"authorization": "Basic dXNlcjpwYXNz"}),
            "NO_CREDENTIALS",
        ),
        (none.clone(), "NO_CREDENTIALS"),
    ] {
        let err = request(&mut pgrst, "GET", headers.clone(), anon, none.clone()).unwrap_err();
        let answer = Answer::of(&err);
        assert_eq!(
            (answer.status, answer.code.as_str()),
            (401, code),
            "{headers}: {err}"
        );
    }
    // A revoked key's token is refused even though its signature is fine.
    admin
        .execute(
            "SELECT apikeys.revoke_api_key(id) FROM apikeys.keys WHERE owner = 'globex'",
            &[],
        )
        .unwrap();
    let err = request(&mut pgrst, "GET", bearer, "it_web", claims).unwrap_err();
    let answer = Answer::of(&err);
    assert_eq!((answer.status, answer.code.as_str()), (401, "REVOKED"));

    // A key whose role may not read the table: authenticated, then refused by privileges.
    let err = get_with_key(&mut pgrst, &no_table).unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    // A role the authenticator is not a member of cannot be switched to.
    let err = get_with_key(&mut pgrst, &stranger).unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");

    // A metered key spends its quota in GET's read-only transaction as in POST's.
    let (rows, _) = get_with_key(&mut pgrst, &metered).unwrap();
    assert_eq!(rows, ["anvil", "rocket"]);
    let (rows, _) = request(
        &mut pgrst,
        "POST",
        serde_json::json!({"x-api-key": metered}),
        anon,
        none.clone(),
    )
    .unwrap();
    assert_eq!(rows, ["anvil", "rocket"]);
    assert_eq!(remaining(&mut admin, &metered_id), 8);

    // The connection goes back to the pool clean: the next request sees nothing without its
    // own credential (as the anonymous role, the policy hides every row).
    let mut tx = pgrst.transaction().unwrap();
    tx.execute("SELECT set_config('role', 'it_anon', true)", &[])
        .unwrap();
    assert!(items(&mut tx).is_empty());
    let who: Option<String> = tx
        .query_one("SELECT apikeys.current_key_id()", &[])
        .unwrap()
        .get(0);
    assert_eq!(who, None);
    tx.commit().unwrap();
}

/// What PostgREST answers for an error raised with SQLSTATE PGRST: the status and headers of
/// DETAIL, and MESSAGE as the JSON body (its docs/references/errors.rst, "Raise custom HTTP
/// response"). Anything else is not such an error.
struct Answer {
    status: u64,
    headers: serde_json::Map<String, serde_json::Value>,
    code: String,
    body: serde_json::Value,
}

impl Answer {
    fn of(err: &postgres::Error) -> Answer {
        assert_eq!(sqlstate(err), "PGRST", "{err}");
        let db = err.as_db_error().unwrap();
        let body: serde_json::Value = serde_json::from_str(db.message()).expect("MESSAGE is JSON");
        let detail: serde_json::Value =
            serde_json::from_str(db.detail().expect("a DETAIL")).expect("DETAIL is JSON");
        // PostgREST requires these shapes: a body with code/message/details/hint, and a DETAIL
        // with a numeric status and an object of string headers.
        for field in ["code", "message", "details", "hint"] {
            assert!(body.get(field).is_some(), "{field} missing from {body}");
        }
        let headers = detail["headers"]
            .as_object()
            .expect("headers object")
            .clone();
        assert!(
            headers.values().all(serde_json::Value::is_string),
            "{detail}"
        );
        Answer {
            status: detail["status"].as_u64().expect("numeric status"),
            headers,
            code: body["code"].as_str().unwrap().to_owned(),
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(serde_json::Value::as_str)
    }
}

#[test]
fn postgrest_answers_each_refusal_with_its_status_headers_and_body() {
    let mut admin = setup();
    // Behind a proxy: the client's address is the first of x-forwarded-for.
    admin
        .batch_execute(
            "ALTER ROLE it_authenticator SET apikeys.client_ip_header = 'x-forwarded-for'",
        )
        .unwrap();
    let read = "role => 'it_web', owner => 'acme', permissions => '{\"orders\": [\"read\"]}'";
    let (_, expired) = create(
        &mut admin,
        &format!("{read}, expires_at => now() - '1 s'::interval"),
    );
    let (_, disabled) = create(&mut admin, &format!("{read}, enabled => false"));
    let (revoked_id, revoked) = create(&mut admin, read);
    admin
        .execute("SELECT apikeys.revoke_api_key($1)", &[&revoked_id])
        .unwrap();
    let (_, windowed) = create(
        &mut admin,
        &format!("{read}, rate_limit_max => 1, rate_limit_window => '1 minute', rate_limit_algorithm => 'fixed'"),
    );
    let (_, spent) = create(
        &mut admin,
        &format!("{read}, remaining => 1, refill_amount => 1, refill_interval => '1 hour'"),
    );
    let (_, listed) = create(
        &mut admin,
        &format!("{read}, allowed_cidrs => '{{10.0.0.0/8, 2001:db8::/32}}'"),
    );
    let mut pgrst = connect_as("it_authenticator");
    let none = serde_json::json!({});
    let get = |client: &mut Client, headers: serde_json::Value| {
        request(client, "GET", headers, "it_anon", serde_json::json!({}))
    };
    let refused = |client: &mut Client, headers: serde_json::Value| {
        Answer::of(&get(client, headers).unwrap_err())
    };
    let with_key = |key: &str| serde_json::json!({"x-api-key": key, "x-forwarded-for": "10.0.0.1"});

    for (key, code) in [
        (&expired, "EXPIRED"),
        (&disabled, "DISABLED"),
        (&revoked, "REVOKED"),
    ] {
        let a = refused(&mut pgrst, with_key(key));
        assert_eq!((a.status, a.code.as_str()), (401, code));
        assert_eq!(
            a.header("WWW-Authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
        assert!(a.body["details"].is_string(), "the key's id: {}", a.body);
        assert!(
            !a.body.to_string().contains(key.as_str()),
            "never the secret"
        );
    }
    let a = refused(&mut pgrst, none.clone());
    assert_eq!((a.status, a.code.as_str()), (401, "NO_CREDENTIALS"));
    assert_eq!(a.header("WWW-Authenticate"), Some("Bearer"));
    assert_eq!(a.body["details"], serde_json::Value::Null);

    // 429 with Retry-After: whole seconds until the window ends, and until the next refill.
    get(&mut pgrst, with_key(&windowed)).unwrap();
    let a = refused(&mut pgrst, with_key(&windowed));
    assert_eq!((a.status, a.code.as_str()), (429, "RATE_LIMITED"));
    let retry: u64 = a.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    get(&mut pgrst, with_key(&spent)).unwrap();
    let a = refused(&mut pgrst, with_key(&spent));
    assert_eq!((a.status, a.code.as_str()), (429, "USAGE_EXCEEDED"));
    let retry: u64 = a.header("Retry-After").unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&retry), "{retry}");

    // 403 for an address outside the allow-list, both families; a malformed header is an
    // address outside it, never an error.
    for ok in [
        "10.9.8.7",
        "10.9.8.7:4431, 192.168.0.1",
        "2001:db8::1",
        "[2001:db8::1]:443",
    ] {
        let (rows, _) = get(
            &mut pgrst,
            serde_json::json!({"x-api-key": listed, "x-forwarded-for": ok}),
        )
        .unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(rows, ["anvil", "rocket"], "{ok}");
    }
    for bad in ["192.168.0.1, 10.0.0.1", "2001:db9::1", "not-an-address", ""] {
        let a = refused(
            &mut pgrst,
            serde_json::json!({"x-api-key": listed, "x-forwarded-for": bad}),
        );
        assert_eq!((a.status, a.code.as_str()), (403, "FORBIDDEN"), "{bad}");
        assert!(a.headers.is_empty());
    }
    let a = refused(&mut pgrst, serde_json::json!({"x-api-key": listed}));
    assert_eq!((a.status, a.code.as_str()), (403, "FORBIDDEN"));

    // authenticate_request(required): 403 for a key without the permission.
    let mut tx = pgrst.transaction().unwrap();
    tx.execute(
        "SELECT set_config('request.headers', $1, true)",
        &[&with_key(&listed).to_string()],
    )
    .unwrap();
    let err = tx
        .execute(
            "SELECT apikeys.authenticate_request('{\"orders\": [\"write\"]}')",
            &[],
        )
        .unwrap_err();
    let a = Answer::of(&err);
    assert_eq!(
        (a.status, a.code.as_str()),
        (403, "INSUFFICIENT_PERMISSIONS")
    );
    drop(tx);
    admin
        .batch_execute("ALTER ROLE it_authenticator RESET apikeys.client_ip_header")
        .unwrap();
}

#[test]
fn policies_stay_exact_under_parallel_query() {
    let mut admin = setup();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS bulk_direct, bulk_initplan;
             CREATE TABLE bulk_direct AS
                 SELECT 't' || (i % 100) AS tenant, 'item' || i AS item FROM generate_series(1, 200000) i;
             CREATE TABLE bulk_initplan AS SELECT * FROM bulk_direct;
             ALTER TABLE bulk_direct ENABLE ROW LEVEL SECURITY;
             ALTER TABLE bulk_initplan ENABLE ROW LEVEL SECURITY;
             CREATE POLICY direct ON bulk_direct FOR SELECT
                 USING (tenant = apikeys.current_owner() AND apikeys.has_permission('orders', 'read'));
             CREATE POLICY initplan ON bulk_initplan FOR SELECT
                 USING (tenant = (SELECT apikeys.current_owner())
                        AND (SELECT apikeys.has_permission('orders', 'read')));
             GRANT SELECT ON bulk_direct, bulk_initplan TO it_app;
             ANALYZE bulk_direct; ANALYZE bulk_initplan;",
        )
        .unwrap();
    let (_, key) = create(
        &mut admin,
        "owner => 't7', permissions => '{\"orders\": [\"read\"]}'",
    );
    let mut app = connect_as("it_app");
    let mut tx = app.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;
         SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL max_parallel_workers_per_gather = 2;",
    )
    .unwrap();
    tx.execute("SELECT apikeys.authenticate($1)", &[&key])
        .unwrap();
    let plan = |tx: &mut postgres::Transaction<'_>, sql: &str| -> String {
        tx.query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let count = |tx: &mut postgres::Transaction<'_>, sql: &str| -> i64 {
        tx.query_one(sql, &[]).unwrap().get(0)
    };
    // Called per row, the readers run in the leader (PARALLEL RESTRICTED), never in a worker
    // that would not see the context.
    assert_eq!(count(&mut tx, "SELECT count(*) FROM bulk_direct"), 2000);
    // The README's (SELECT …) form: InitPlans computed by the leader and handed to the
    // workers as parameters, so the scan itself runs in parallel and stays exact.
    let shown = plan(&mut tx, "SELECT count(*) FROM bulk_initplan");
    assert!(shown.contains("Parallel Seq Scan"), "{shown}");
    assert_eq!(count(&mut tx, "SELECT count(*) FROM bulk_initplan"), 2000);
    tx.commit().unwrap();
}
