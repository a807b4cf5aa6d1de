//! Behaviour that needs several connections to a real server: exactness of quotas and rate
//! limits under concurrency, verification that never waits on other sessions, and backends that
//! survive hostile input. `make test-integration` starts the server and sets PG_APIKEYS_TEST_URL.

use postgres::{Client, NoTls};
use std::thread;
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn quota_is_exact_under_concurrency() {
    let mut client = connect();
    let n = 50i64;
    let (id, key) = create(&mut client, &format!("remaining => {n}"));
    let counts = hammer(&key, 8, 25);
    assert_eq!(
        counts.get("VALID").copied().unwrap_or(0),
        n as usize,
        "{counts:?}"
    );
    assert_eq!(
        counts.get("USAGE_EXCEEDED").copied().unwrap_or(0),
        8 * 25 - n as usize,
        "{counts:?}"
    );
    let row = client
        .query_one(
            "SELECT remaining, request_count FROM apikeys.get_api_key($1)",
            &[&id],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    assert_eq!(row.get::<_, i64>(1), n);
}

#[test]
fn token_quota_is_exact_under_concurrency() {
    let mut client = connect();
    let (id, key) = create(&mut client, "remaining => 41");
    let token = mint(&mut client, &key, 60000);
    let counts = hammer_with("SELECT code FROM apikeys.verify_token($1)", &token, 8, 10);
    assert_eq!(counts.get("VALID").copied(), Some(40), "{counts:?}");
    assert_eq!(
        counts.get("USAGE_EXCEEDED").copied(),
        Some(40),
        "{counts:?}"
    );
    assert_eq!(remaining(&mut client, &id), 0);
}

#[test]
fn rate_limit_is_exact_under_concurrency() {
    let mut client = connect();
    let (_, key) = create(
        &mut client,
        "rate_limit_max => 30, rate_limit_window => '1 hour'",
    );
    let counts = hammer(&key, 8, 10);
    assert_eq!(counts.get("VALID").copied().unwrap_or(0), 30, "{counts:?}");
    assert_eq!(
        counts.get("RATE_LIMITED").copied().unwrap_or(0),
        50,
        "{counts:?}"
    );
}

#[test]
fn quota_and_rate_limit_together_under_concurrency() {
    let mut client = connect();
    let (id, key) = create(
        &mut client,
        "remaining => 100, rate_limit_max => 20, rate_limit_window => '1 hour'",
    );
    let counts = hammer(&key, 8, 10);
    assert_eq!(counts.get("VALID").copied().unwrap_or(0), 20, "{counts:?}");
    assert_eq!(
        remaining(&mut client, &id),
        80,
        "rate-limited calls must not spend the quota"
    );
}

#[test]
fn plain_keys_never_wait_for_other_sessions() {
    let mut holder = connect();
    let mut other = connect();
    let (_, key) = create(&mut holder, "");
    // The first session verifies inside an open transaction, holding the key's usage row.
    holder.batch_execute("BEGIN").unwrap();
    let code: String = holder
        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
    other.batch_execute("SET statement_timeout = '5s'").unwrap();
    let started = Instant::now();
    let code: String = other
        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
    assert!(started.elapsed() < Duration::from_secs(5));
    holder.batch_execute("COMMIT").unwrap();
}

#[test]
fn hostile_input_never_crashes_a_backend() {
    let mut client = connect();
    let started: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    // Every function of the schema must be called below; a new one without a case fails here.
    let mut called = std::collections::BTreeSet::new();
    let function_of = |sql: &str| -> String {
        let name = sql.split("apikeys.").nth(1).expect(sql);
        name[..name.find('(').unwrap()].to_owned()
    };
    let big = "x".repeat(1_000_000);
    let texts: Vec<String> = vec![
        String::new(),
        "sk_".into(),
        "ключ_🔑".into(),
        big.clone(),
        "\u{1}\u{7f}".into(),
        "sk_".to_string() + &"A".repeat(49),
        "'; DROP TABLE apikeys.keys; --".into(),
        "...".into(),
        "eyJhbGciOiJub25lIn0.e30.".into(),
        "!!!.###.$$$".into(),
        format!("{0}.{0}.{0}", "eyJ".repeat(100_000)),
    ];
    for t in &texts {
        for sql in [
            "SELECT valid, code FROM apikeys.verify_key($1)",
            "SELECT valid, code FROM apikeys.verify_token($1)",
            "SELECT valid, code FROM apikeys.authenticate_headers(jsonb_build_object('x-api-key', $1::text))",
            "SELECT valid, code FROM apikeys.authenticate_headers(jsonb_build_object('authorization', 'Bearer ' || $1::text))",
        ] {
            called.insert(function_of(sql));
            let row = client.query_one(sql, &[t]).unwrap();
            assert!(!row.get::<_, bool>(0));
            assert_eq!(row.get::<_, String>(1), "NOT_FOUND");
        }
        called.extend(["authenticate".to_owned(), "has_permission".to_owned()]);
        let err = client
            .query("SELECT apikeys.authenticate($1)", &[t])
            .unwrap_err();
        assert_eq!(sqlstate(&err), "28000", "{err}");
        let allowed: Option<bool> = client
            .query_one("SELECT apikeys.has_permission($1, $1)", &[t])
            .unwrap()
            .get(0);
        assert_eq!(allowed, Some(false));
        for sql in [
            "SELECT apikeys.create_api_key(name => $1)",
            "SELECT apikeys.create_api_key(id => $1)",
            "SELECT apikeys.create_api_key(prefix => $1)",
            "SELECT apikeys.create_api_key(secret => $1)",
            "SELECT apikeys.create_api_key(role => $1)",
            "SELECT apikeys.get_api_key($1)",
            "SELECT apikeys.update_api_key($1, name => 'x')",
            "SELECT apikeys.revoke_api_key($1)",
            "SELECT apikeys.delete_api_key($1)",
            "SELECT apikeys.rotate_api_key($1)",
            "SELECT apikeys.mint_token($1, 1000)",
            "SELECT apikeys.mint_token('sk_x', 1000, for_key => $1)",
            "SELECT apikeys.rotate_signing_key($1)",
            "SELECT apikeys.retire_signing_key($1)",
            "SELECT apikeys.export_signing_key($1)",
            "SELECT count(*) FROM apikeys.list_api_keys(owner => $1)",
            "SELECT apikeys.update_api_key('x', clear => ARRAY[$1])",
            "SELECT apikeys.update_api_key('x', metadata => to_jsonb($1))",
            "SELECT apikeys.create_api_key(metadata => jsonb_build_object($1, $1))",
            "SELECT apikeys.delete_expired_api_keys(older_than => $1::text::interval)",
            "SELECT apikeys.purge_signing_keys(retired_before => $1::text::interval)",
            "SELECT apikeys.authenticate_request() FROM (SELECT set_config('request.headers', $1, true)) s",
            "SELECT apikeys.authenticate_request() FROM (SELECT set_config('request.headers', jsonb_build_object('authorization', $1::text)::text, true)) s",
            "SELECT apikeys.create_role($1)",
            "SELECT apikeys.update_role($1, description => $1)",
            "SELECT apikeys.delete_role($1)",
            "SELECT apikeys.create_api_key(roles => ARRAY[$1])",
            "SELECT apikeys.update_credits($1, 'increment', 1)",
            "SELECT apikeys.update_credits('x', $1, 1)",
            "SELECT apikeys.ratelimit($1, $1, 1, '1 s')",
            "SELECT apikeys.set_ratelimit_override($1, $1, 1, '1 s')",
            "SELECT apikeys.delete_ratelimit_override($1, $1)",
            "SELECT apikeys.verify_key('sk_x', ratelimits => jsonb_build_array(jsonb_build_object('name', $1::text)))",
            "SELECT apikeys.create_api_key(ratelimits => jsonb_build_array(jsonb_build_object('name', $1::text, 'limit', 1, 'duration', $1::text)))",
            "SELECT apikeys.create_identity($1, metadata => to_jsonb($1))",
            "SELECT apikeys.get_identity($1)",
            "SELECT apikeys.update_identity($1, remaining => 1)",
            "SELECT apikeys.delete_identity($1)",
            "SELECT apikeys.update_identity_credits($1, 'set', 1)",
            "SELECT apikeys.update_identity('x', clear => ARRAY[$1])",
            "SELECT apikeys.identities_changed() FROM (SELECT $1::text) s",
            // SPEC §8.
            "SELECT apikeys.verify_key($1, client_ip => '10.0.0.1')",
            "SELECT apikeys.create_api_key(allowed_cidrs => ARRAY[$1::text]::cidr[])",
            "SELECT apikeys.authenticate_http(jsonb_build_object('x-api-key', $1::text, 'x-forwarded-for', $1::text))",
            "SELECT apikeys.authenticate_http($1::text::jsonb)",
            "SELECT apikeys.verification_stats(key_id => $1, owner => $1)",
            "SELECT apikeys.verification_stats(bucket => $1::text::interval)",
            "SELECT apikeys.my_create_api_key($1, metadata => to_jsonb($1))",
            "SELECT apikeys.my_update_api_key($1, name => $1)",
            "SELECT apikeys.my_rotate_api_key($1)",
            "SELECT apikeys.my_revoke_api_key($1)",
            "SELECT count(*) FROM apikeys.my_list_api_keys() WHERE $1::text IS NOT NULL",
        ] {
            called.insert(function_of(sql));
            // Either it works or it is a clean SQL error with a SQLSTATE; never a lost connection.
            if let Err(e) = client.query(sql, &[t]) {
                let code = e
                    .code()
                    .unwrap_or_else(|| panic!("{sql}: not a SQL error: {e}"));
                assert_ne!(code.code(), "XX000", "{sql}: internal error {e}");
            }
        }
    }
    for doc in [
        "[]",
        "{\"a\": 1}",
        "{\"a\": [[]]}",
        "\"*\"",
        "null",
        "{\"\": [\"x\"]}",
    ] {
        for sql in [
            "SELECT apikeys.create_api_key(permissions => $1::text::jsonb)",
            "SELECT apikeys.verify_key('sk_x', required => $1::text::jsonb)",
            "SELECT apikeys.verify_token('x.y.z', required => $1::text::jsonb)",
            "SELECT apikeys.authenticate('sk_x', required => $1::text::jsonb)",
        ] {
            let err = client.query(sql, &[&doc]).expect_err(doc);
            assert_eq!(sqlstate(&err), "22023", "{sql} {doc}: {err}");
        }
    }
    // jsonb PostgreSQL accepts but serde_json cannot hold (deeper than 128 levels, a number
    // outside f64): arguments that must be read refuse it with 22023 naming the argument,
    // never XX000; metadata, only stored and returned, is kept as given.
    let (_, minter) = create(&mut client, "");
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let huge_number = r#"{"x": 1e400}"#.to_string();
    for doc in [
        deep(200),
        deep(10_000),
        huge_number.clone(),
        format!(r#"{{"orders": {}}}"#, deep(200)),
    ] {
        for (argument, sql) in [
            (
                "permissions",
                "SELECT apikeys.create_api_key(permissions => $1::text::jsonb)",
            ),
            (
                "required",
                "SELECT apikeys.verify_key('sk_x', required => $1::text::jsonb)",
            ),
            (
                "required",
                "SELECT apikeys.verify_token('x.y.z', required => $1::text::jsonb)",
            ),
            (
                "required",
                "SELECT apikeys.authenticate('sk_x', required => $1::text::jsonb)",
            ),
            (
                "headers",
                "SELECT apikeys.authenticate_headers($1::text::jsonb)",
            ),
            (
                "claims",
                "SELECT apikeys.mint_token($2, 1000, claims => $1::text::jsonb)",
            ),
        ] {
            let params: Vec<&(dyn postgres::types::ToSql + Sync)> = if sql.contains("$2") {
                vec![&doc, &minter]
            } else {
                vec![&doc]
            };
            let err = client.query(sql, &params).expect_err(sql);
            assert_eq!(sqlstate(&err), "22023", "{sql}: {err}");
            let message = err
                .as_db_error()
                .map(|e| e.message().to_owned())
                .unwrap_or_default();
            assert!(message.contains(argument), "{sql}: {message}");
        }
    }
    for doc in [deep(200), huge_number] {
        let row = client
            .query_one(
                "SELECT id, key FROM apikeys.create_api_key(metadata => $1::text::jsonb)",
                &[&doc],
            )
            .unwrap();
        let (id, key): (String, String) = (row.get(0), row.get(1));
        let kept: bool = client
            .query_one(
                "SELECT (apikeys.get_api_key($1)).metadata = $3::text::jsonb
                    AND (apikeys.verify_key($2)).metadata = $3::text::jsonb",
                &[&id, &key, &doc],
            )
            .unwrap()
            .get(0);
        assert!(kept, "metadata {:.40} stored and returned as given", doc);
        client
            .query_one(
                "SELECT apikeys.update_api_key($1, metadata => $2::text::jsonb)",
                &[&id, &doc],
            )
            .expect("update_api_key keeps such metadata too");
    }
    for interval in ["0", "-1 day", "-1 ms", "1000000 years"] {
        for sql in [
            "SELECT apikeys.create_api_key(expires_in => $1::text::interval)",
            "SELECT apikeys.create_api_key(refill_amount => 1, refill_interval => $1::text::interval)",
            "SELECT apikeys.create_api_key(rate_limit_max => 1, rate_limit_window => $1::text::interval)",
        ] {
            let err = client.query(sql, &[&interval]).expect_err(interval);
            assert_eq!(sqlstate(&err), "22023", "{sql} {interval}: {err}");
        }
    }
    for n in [-1i64, i64::MIN] {
        let err = client
            .query("SELECT apikeys.create_api_key(remaining => $1)", &[&n])
            .unwrap_err();
        assert_eq!(sqlstate(&err), "22023");
    }
    let (_, key) = create(&mut client, "");
    for ms in [0i64, -1, i64::MIN, i64::MAX] {
        let err = client
            .query("SELECT apikeys.mint_token($1, $2)", &[&key, &ms])
            .unwrap_err();
        assert_eq!(sqlstate(&err), "22023", "{ms}: {err}");
    }
    for claims in ["[]", "1", "\"x\"", "{\"sub\": 1}", "{\"nbf\": \"x\"}"] {
        let err = client
            .query(
                "SELECT apikeys.mint_token($1, 1000, claims => $2::text::jsonb)",
                &[&key, &claims],
            )
            .unwrap_err();
        assert_eq!(sqlstate(&err), "22023", "{claims}: {err}");
    }
    // The functions without arguments, after all of the above (the context may be set).
    for sql in [
        "SELECT apikeys.jwks()::text",
        "SELECT count(*)::text FROM apikeys.list_signing_keys()",
        "SELECT count(*)::text FROM apikeys.list_roles()",
        "SELECT count(*)::text FROM apikeys.list_identities()",
        "SELECT apikeys.current_key_id()",
        "SELECT apikeys.current_owner()",
        "SELECT apikeys.current_permissions()::text",
        "SELECT apikeys.current_claims()::text",
        "SELECT apikeys.reset()::text",
    ] {
        called.insert(function_of(sql));
        client.query_one(sql, &[]).expect(sql);
    }
    let in_schema: Vec<String> = client
        .query(
            "SELECT proname::text FROM pg_proc WHERE pronamespace = 'apikeys'::regnamespace ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missed: Vec<_> = in_schema.iter().filter(|f| !called.contains(*f)).collect();
    assert!(
        missed.is_empty(),
        "functions no hostile input reached: {missed:?}"
    );
    // Same backend, same postmaster: nothing crashed or restarted.
    let pid_after: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let started_after: String = client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!((pid, started), (pid_after, started_after));
}

fn pg_bin(tool: &str) -> String {
    let dir = std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    format!("{dir}/{tool}")
}

fn run_tool(tool: &str, args: &[&str]) {
    let out = std::process::Command::new(pg_bin(tool))
        .args(args)
        .output()
        .expect(tool);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_and_restore_keep_keys_quotas_and_audit() {
    let mut client = connect();
    let (_, plain) = create(&mut client, "owner => 'dump'");
    let (_, metered) = create(&mut client, "remaining => 5");
    let (revoked_id, revoked) = create(&mut client, "");
    let hs_token = mint(&mut client, &plain, 600000);
    client
        .batch_execute("SELECT apikeys.rotate_signing_key('EdDSA')")
        .unwrap();
    let ed_token = mint(&mut client, &plain, 600000);
    let revoked_token = mint(&mut client, &revoked, 600000);
    let brief_token = mint(&mut client, &plain, 1);
    // A token of a signing key that is then retired, and an ES256 one that signs from now on.
    let retired_kid: String = client
        .query_one("SELECT apikeys.rotate_signing_key('HS256')", &[])
        .unwrap()
        .get(0);
    let retired_token = mint(&mut client, &plain, 600000);
    client
        .batch_execute("SELECT apikeys.rotate_signing_key('ES256')")
        .unwrap();
    client
        .query_one("SELECT apikeys.retire_signing_key($1)", &[&retired_kid])
        .unwrap();
    let es_token = mint(&mut client, &plain, 600000);
    // Mid-window and mid-refill-period counters, and a disabled key.
    let (_, windowed) = create(
        &mut client,
        "rate_limit_max => 2, rate_limit_window => '1 hour'",
    );
    let (_, refilling) = create(
        &mut client,
        "remaining => 1, refill_amount => 3, refill_interval => '1 hour'",
    );
    let (_, disabled) = create(&mut client, "enabled => false");
    for key in [&windowed, &refilling] {
        client
            .query_one("SELECT apikeys.verify_key($1)", &[key])
            .unwrap();
    }
    for _ in 0..2 {
        client
            .query_one("SELECT apikeys.verify_key($1)", &[&metered])
            .unwrap();
    }
    client
        .query_one("SELECT apikeys.revoke_api_key($1)", &[&revoked_id])
        .unwrap();
    // SPEC §7: an identity with a spent quota, a role, a standalone override, credits.
    client
        .batch_execute(
            "SELECT apikeys.create_identity('dump-tenant', remaining => 4);
             SELECT apikeys.create_role('dump-role', '{\"orders\": [\"read\"]}');
             SELECT apikeys.set_ratelimit_override('dump-ns', 'x', 7, '1 hour');",
        )
        .unwrap();
    let (_, tenant_key) = create(&mut client, "owner => 'dump-tenant'");
    let (_, role_key) = create(&mut client, "roles => ARRAY['dump-role']");
    let (credited_id, credited) = create(&mut client, "remaining => 1");
    client
        .query_one("SELECT apikeys.verify_key($1)", &[&tenant_key])
        .unwrap();
    client
        .query_one(
            "SELECT apikeys.update_credits($1, 'increment', 5)",
            &[&credited_id],
        )
        .unwrap();
    // SPEC §8: allow-lists of a key and an identity, a self-service key (its audit row names the
    // acting key), and verification counts (written by the writer within seconds).
    client
        .batch_execute(
            "SELECT apikeys.create_identity('dump-net', allowed_cidrs => '{10.0.0.0/8}')",
        )
        .unwrap();
    let (_, listed) = create(
        &mut client,
        "owner => 'dump-net', allowed_cidrs => '{10.1.0.0/16}', permissions => '{\"apikeys\": [\"manage\"]}'",
    );
    let mut tx = client.transaction().unwrap();
    tx.execute(
        "SELECT apikeys.authenticate($1, client_ip => '10.1.2.3')",
        &[&listed],
    )
    .unwrap();
    let mine: String = tx
        .query_one("SELECT id FROM apikeys.my_create_api_key('mine')", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let counted = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT COALESCE(sum(count), 0)::bigint FROM apikeys.verification_stats(until => now() + '1 hour'::interval)",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let verifications = loop {
        let before = counted(&mut client);
        std::thread::sleep(std::time::Duration::from_secs(6));
        let after = counted(&mut client);
        if after > 0 && after == before {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "verification counts still moving"
        );
    };
    let audit_rows: i64 = client
        .query_one("SELECT count(*) FROM apikeys.audit_log", &[])
        .unwrap()
        .get(0);

    let file = std::env::temp_dir().join("pg_apikeys_it.dump");
    let file = file.to_str().unwrap();
    run_tool(
        "pg_dump",
        &[
            "-Fc",
            "-f",
            file,
            "-d",
            &format!("{} dbname={DB}", base_url()),
        ],
    );
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    admin
        .batch_execute("DROP DATABASE IF EXISTS pg_apikeys_restored")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE pg_apikeys_restored")
        .unwrap();
    let restored_url = format!("{} dbname=pg_apikeys_restored", base_url());
    run_tool(
        "pg_restore",
        &["--exit-on-error", "-d", &restored_url, file],
    );

    let mut restored = Client::connect(&restored_url, NoTls).unwrap();
    let code = |c: &mut Client, key: &str| -> (String, Option<i64>) {
        let row = c
            .query_one(
                "SELECT code, remaining FROM apikeys.verify_key($1)",
                &[&key],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(code(&mut restored, &plain), ("VALID".into(), None));
    assert_eq!(code(&mut restored, &metered), ("VALID".into(), Some(2)));
    assert_eq!(code(&mut restored, &revoked), ("REVOKED".into(), None));
    // Tokens minted before the dump verify after the restore: the signing keys came along.
    assert_eq!(token_code(&mut restored, &hs_token), "VALID");
    assert_eq!(token_code(&mut restored, &ed_token), "VALID");
    assert_eq!(token_code(&mut restored, &revoked_token), "REVOKED");
    assert_eq!(token_code(&mut restored, &es_token), "VALID");
    assert_eq!(token_code(&mut restored, &brief_token), "EXPIRED");
    assert_eq!(token_code(&mut restored, &retired_token), "NOT_FOUND");
    assert_eq!(code(&mut restored, &disabled), ("DISABLED".into(), None));
    // The identity's quota goes on from what was spent; roles, overrides and credits came along.
    let identity_left: Option<i64> = restored
        .query_one(
            "SELECT identity_remaining FROM apikeys.verify_key($1)",
            &[&tenant_key],
        )
        .unwrap()
        .get(0);
    assert_eq!(identity_left, Some(2));
    let role_code: String = restored
        .query_one(
            "SELECT code FROM apikeys.verify_key($1, '{\"orders\": [\"read\"]}')",
            &[&role_key],
        )
        .unwrap()
        .get(0);
    assert_eq!(role_code, "VALID");
    assert_eq!(code(&mut restored, &credited), ("VALID".into(), Some(5)));
    let overridden: i32 = restored
        .query_one(
            "SELECT \"limit\" FROM apikeys.ratelimit('dump-ns', 'x', 1, '1 hour')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(overridden, 7);
    // Allow-lists, the acting key of self-service and the verification counts came along.
    let forbidden = |c: &mut Client, ip: &str| -> String {
        c.query_one(
            "SELECT code FROM apikeys.verify_key($1, client_ip => $2::text::inet)",
            &[&listed, &ip],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(forbidden(&mut restored, "10.1.0.9"), "VALID");
    assert_eq!(forbidden(&mut restored, "10.2.0.9"), "FORBIDDEN");
    assert_eq!(forbidden(&mut restored, "11.1.0.9"), "FORBIDDEN");
    let acted: i64 = restored
        .query_one(
            "SELECT count(*) FROM apikeys.audit_log WHERE key_id = $1 AND acting_key_id IS NOT NULL",
            &[&mine],
        )
        .unwrap()
        .get(0);
    assert_eq!(acted, 1);
    assert_eq!(counted(&mut restored), verifications);

    // The window and the refill period go on where they were: one call left, then none.
    assert_eq!(code(&mut restored, &windowed), ("VALID".into(), None));
    assert_eq!(
        code(&mut restored, &windowed),
        ("RATE_LIMITED".into(), None)
    );
    assert_eq!(
        code(&mut restored, &refilling),
        ("USAGE_EXCEEDED".into(), Some(0))
    );
    let jwks = |c: &mut Client| -> String {
        c.query_one("SELECT apikeys.jwks()::text", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(jwks(&mut restored), jwks(&mut client));
    let restored_audit: i64 = restored
        .query_one("SELECT count(*) FROM apikeys.audit_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(restored_audit, audit_rows);
    // The audit sequence was restored too: new actions get new ids.
    create(&mut restored, "");
    let distinct: bool = restored
        .query_one(
            "SELECT count(*) = count(DISTINCT id) FROM apikeys.audit_log",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(distinct);
    // The identities' sequence was restored: a new identity gets a new id.
    restored
        .batch_execute("SELECT apikeys.create_identity('after-restore')")
        .unwrap();
    let distinct_ids: bool = restored
        .query_one(
            "SELECT count(*) = count(DISTINCT id) FROM apikeys.identities",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(distinct_ids);
    // Privileges survive: PUBLIC still cannot read the tables.
    let public_can_read: bool = restored
        .query_one(
            "SELECT has_table_privilege('public', 'apikeys.keys', 'SELECT')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!public_can_read);
    drop(restored);
    admin
        .batch_execute("DROP DATABASE pg_apikeys_restored")
        .unwrap();
}

#[test]
fn plain_keys_verify_on_a_hot_standby_and_metered_keys_refuse_clearly() {
    let mut primary = connect();
    let (_, plain) = create(
        &mut primary,
        "owner => 'replica', permissions => '{\"orders\": [\"read\"]}'",
    );
    let (metered_id, metered) = create(&mut primary, "remaining => 5");
    let (_, limited) = create(
        &mut primary,
        "rate_limit_max => 5, rate_limit_window => '1 hour'",
    );
    let metered_token = mint(&mut primary, &metered, 600000);
    let token = mint(&mut primary, &plain, 600000);
    // BEGIN READ ONLY on the primary: every key and token verifies, limited keys too.
    let mut tx = primary.build_transaction().read_only(true).start().unwrap();
    let codes: (String, String) = {
        let row = tx
            .query_one(
                "SELECT (apikeys.verify_key($1)).code, (apikeys.verify_token($2)).code",
                &[&plain, &token],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(codes, ("VALID".into(), "VALID".into()));
    let code: String = tx
        .query_one("SELECT (apikeys.verify_key($1)).code", &[&limited])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
    tx.rollback().unwrap();
    // Wait until the standby has replayed everything the primary has written so far: the insert
    // position, since with synchronous_commit = off the last commits may not be written yet.
    let lsn: String = primary
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .unwrap()
        .get(0);
    let standby_url = std::env::var("PG_APIKEYS_STANDBY_URL")
        .expect("PG_APIKEYS_STANDBY_URL must name a hot standby of the test server (make test-integration sets it)");
    // Wait in database postgres: the test database itself may not have reached the standby yet.
    let mut replica = Client::connect(&format!("{standby_url} dbname=postgres"), NoTls)
        .expect("connect to standby");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up: bool = replica
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&lsn],
            )
            .unwrap()
            .get(0);
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "standby did not replay {lsn} within 30 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let mut standby =
        Client::connect(&format!("{standby_url} dbname={DB}"), NoTls).expect("connect to standby");
    let in_recovery: bool = standby
        .query_one("SELECT pg_is_in_recovery()", &[])
        .unwrap()
        .get(0);
    assert!(in_recovery);
    let row = standby
        .query_one(
            "SELECT code, owner FROM apikeys.verify_key($1, '{\"orders\": [\"read\"]}')",
            &[&plain],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("VALID".into(), "replica".into())
    );
    assert_eq!(token_code(&mut standby, &token), "VALID");
    // The request context works there too: it is backend memory, nothing is written.
    let mut tx = standby.transaction().unwrap();
    let owner: Option<String> = tx
        .query_one("SELECT (apikeys.authenticate($1)).owner", &[&token])
        .unwrap()
        .get(0);
    let current: Option<String> = tx
        .query_one("SELECT apikeys.current_owner()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        (owner.as_deref(), current.as_deref()),
        (Some("replica"), Some("replica"))
    );
    tx.commit().unwrap();
    // Plain keys mint on the standby too (the signing key was replicated).
    let minted = mint(&mut standby, &plain, 1000);
    assert_eq!(token_code(&mut standby, &minted), "VALID");
    let code: String = standby
        .query_one("SELECT code FROM apikeys.verify_key('sk_nope')", &[])
        .unwrap()
        .get(0);
    assert_eq!(code, "NOT_FOUND");
    // A quota cannot be spent on a read-only node: a clear error, never a silent over-spend.
    for sql in [
        "SELECT apikeys.verify_key($1)",
        "SELECT apikeys.authenticate($1)",
        "SELECT apikeys.mint_token($1, 1000)",
    ] {
        for key in [&metered, &limited] {
            let err = standby.query_one(sql, &[key]).unwrap_err();
            assert_eq!(sqlstate(&err), "25006", "{sql}: {err}");
        }
    }
    let err = standby
        .query_one("SELECT apikeys.verify_token($1)", &[&metered_token])
        .unwrap_err();
    assert_eq!(sqlstate(&err), "25006", "{err}");
    assert_eq!(
        remaining(&mut primary, &metered_id),
        4,
        "nothing was spent by the refused verifications (one went to minting on the primary)"
    );
}

/// Starts `verify_key(key)` on a new connection while `holder` keeps the key's row locked by an
/// uncommitted management change, waits until the verifier is blocked on that lock, commits the
/// change, and returns the verifier's code.
fn verify_across_a_commit(holder: &mut Client, key: &str) -> String {
    let key = key.to_owned();
    let verifier = thread::spawn(move || {
        let mut client = connect();
        client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
            .unwrap()
            .get::<_, String>(0)
    });
    let mut watcher = connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' \
                 AND query LIKE '%verify_key%'",
                &[&DB],
            )
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the verifier never waited for the row lock"
        );
        thread::sleep(Duration::from_millis(20));
    }
    holder.batch_execute("COMMIT").unwrap();
    verifier.join().expect("verifier thread")
}

#[test]
fn a_revocation_committed_while_a_metered_verification_waits_wins() {
    let mut admin = connect();
    let (id, key) = create(&mut admin, "remaining => 5");
    admin.batch_execute("BEGIN").unwrap();
    admin
        .query_one("SELECT apikeys.revoke_api_key($1)", &[&id])
        .unwrap();
    assert_eq!(verify_across_a_commit(&mut admin, &key), "REVOKED");
    assert_eq!(remaining(&mut admin, &id), 5);
}

#[test]
fn a_use_is_counted_when_the_quota_is_cleared_while_the_verification_waits() {
    let mut admin = connect();
    let (id, key) = create(&mut admin, "remaining => 5");
    admin.batch_execute("BEGIN").unwrap();
    admin
        .query_one(
            "SELECT apikeys.update_api_key($1, clear => ARRAY['remaining'])",
            &[&id],
        )
        .unwrap();
    assert_eq!(verify_across_a_commit(&mut admin, &key), "VALID");
    let (uses, remaining): (i64, Option<i64>) = admin
        .query_one(
            "SELECT request_count, remaining FROM apikeys.get_api_key($1)",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((uses, remaining), (1, None), "the VALID answer is a use");
}

#[test]
fn a_rotation_committed_while_a_metered_verification_waits_wins() {
    let mut admin = connect();
    let (id, old) = create(&mut admin, "remaining => 5");
    admin.batch_execute("BEGIN").unwrap();
    admin
        .query_one("SELECT apikeys.rotate_api_key($1)", &[&id])
        .unwrap();
    assert_eq!(verify_across_a_commit(&mut admin, &old), "NOT_FOUND");
}

/// Our tokens verified by an independent JWT implementation (PyJWT with `cryptography`), given
/// only what an outside service would have: `apikeys.jwks()` for ES256/EdDSA and the exported
/// secret for HS256. Tokens forged or tampered with must fail there too.
#[test]
fn tokens_verify_with_an_independent_jwt_library() {
    let python = std::env::var("PG_APIKEYS_PYTHON").expect(
        "PG_APIKEYS_PYTHON must name a Python with PyJWT[crypto] (make test-integration sets it)",
    );
    let mut client = connect();
    let (id, key) = create(
        &mut client,
        "owner => 'interop', permissions => '{\"orders\": [\"read\"]}'",
    );
    let mut tokens = Vec::new();
    for alg in ["ES256", "EdDSA", "HS256"] {
        client
            .query_one("SELECT apikeys.rotate_signing_key($1)", &[&alg])
            .unwrap();
        let token = mint(&mut client, &key, 60000);
        tokens.push(serde_json::json!({"alg": alg, "token": token}));
    }
    let jwks: String = client
        .query_one("SELECT apikeys.jwks()::text", &[])
        .unwrap()
        .get(0);
    let hs_kid: String = client
        .query_one(
            "SELECT kid FROM apikeys.signing_keys WHERE algorithm = 'HS256' ORDER BY created_at DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let hs_jwk: String = client
        .query_one("SELECT apikeys.export_signing_key($1)::text", &[&hs_kid])
        .unwrap()
        .get(0);
    let input = serde_json::json!({
        "jwks": serde_json::from_str::<serde_json::Value>(&jwks).unwrap(),
        "hs256": serde_json::from_str::<serde_json::Value>(&hs_jwk).unwrap(),
        "tokens": tokens,
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/verify_jwt.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "PyJWT verification failed:\n{report}");
    let results: serde_json::Value = serde_json::from_str(&report).expect("JSON report");
    for alg in ["ES256", "EdDSA", "HS256"] {
        let r = &results[alg];
        assert_eq!(r["verified"], true, "{alg}: {r}");
        assert_eq!(r["claims"]["key_id"], id.as_str(), "{alg}: {r}");
        assert_eq!(r["claims"]["sub"], "interop", "{alg}: {r}");
        assert_eq!(r["tampered_rejected"], true, "{alg}: {r}");
        assert_eq!(r["wrong_key_rejected"], true, "{alg}: {r}");
    }
}

/// Everything the extension defines, as comparable text: functions with their arguments, result,
/// volatility, strictness, security, parallel safety, settings and privileges; tables, columns,
/// defaults, constraints, indexes and privileges; composite types; dumped configuration tables.
const CATALOG_SQL: &str = "
SELECT 'function ' || p.proname || '(' || pg_get_function_arguments(p.oid) || ') ' ||
       pg_get_function_result(p.oid) || ' ' || p.provolatile::text || p.proisstrict::text ||
       p.prosecdef::text || p.proparallel::text || ' ' || coalesce(p.proconfig::text, '') || ' ' ||
       coalesce(p.proacl::text, '') || ' ' || p.prosrc
  FROM pg_proc p WHERE p.pronamespace = 'apikeys'::regnamespace
UNION ALL
SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c WHERE c.relnamespace = 'apikeys'::regnamespace
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ||
       ' ' || a.attnotnull::text || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'apikeys'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'apikeys'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(indexrelid)
  FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'apikeys'::regnamespace)
UNION ALL
SELECT 'member ' || pg_describe_object(classid, objid, objsubid)
  FROM pg_depend WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_apikeys')
UNION ALL
SELECT 'config ' || cfg::regclass::text FROM pg_extension, unnest(extconfig) cfg WHERE extname = 'pg_apikeys'
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'apikeys'::regnamespace AND NOT t.tgisinternal
ORDER BY 1";

fn catalog(client: &mut Client) -> Vec<String> {
    client
        .query(CATALOG_SQL, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An install script's statements: comments (pgrx writes source line numbers into them) and
/// blank lines left out.
fn statements(script: &str) -> Vec<String> {
    let mut text = String::new();
    let mut rest = script;
    while let Some(start) = rest.find("/*") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("*/")
            .map_or("", |end| &rest[start + end + 2..]);
    }
    text.push_str(rest);
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.trim_start().starts_with("--"))
        .map(str::to_owned)
        .collect()
}

/// Installs each released version's SQL (tests/upgrade), uses it, updates to the current version,
/// and checks that keys made before still verify, tokens work, and the catalog is exactly that
/// of a fresh install.
#[test]
fn upgrades_from_every_released_version_match_a_fresh_install() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let current: String = admin
        .query_one(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'pg_apikeys'",
            &[],
        )
        .unwrap()
        .get(0);
    let fresh_db = "pg_apikeys_fresh";
    recreate_database(&mut admin, fresh_db);
    let mut fresh = Client::connect(&format!("{} dbname={fresh_db}", base_url()), NoTls).unwrap();
    fresh.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let expected = catalog(&mut fresh);
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("function verify_token(")),
        "{expected:#?}"
    );

    // The current version is released as it is: its SQL is the frozen script of that release.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/upgrade");
    let sharedir = std::process::Command::new(pg_bin("pg_config"))
        .arg("--sharedir")
        .output()
        .expect("pg_config");
    let sharedir = String::from_utf8(sharedir.stdout).unwrap();
    let generated = std::fs::read_to_string(format!(
        "{}/extension/pg_apikeys--{current}.sql",
        sharedir.trim()
    ))
    .expect("the installed install script");
    let frozen = std::fs::read_to_string(format!("{dir}/pg_apikeys--{current}.sql"))
        .unwrap_or_else(|_| {
            panic!("tests/upgrade/pg_apikeys--{current}.sql: add the install script of the release")
        });
    assert!(
        statements(&generated) == statements(&frozen),
        "the SQL surface differs from released version {current}: bump the version in Cargo.toml, \
         write sql/pg_apikeys--{current}--<new>.sql and add the new install script to tests/upgrade"
    );

    let mut released: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let version = name.strip_prefix("pg_apikeys--")?.strip_suffix(".sql")?;
            (!version.contains("--") && version != current).then(|| version.to_owned())
        })
        .collect();
    released.sort();
    assert!(!released.is_empty());
    for old in released {
        let db = "pg_apikeys_upgrade";
        recreate_database(&mut admin, db);
        let mut client = Client::connect(&format!("{} dbname={db}", base_url()), NoTls).unwrap();
        client
            .batch_execute(&format!("CREATE EXTENSION pg_apikeys VERSION '{old}'"))
            .unwrap();
        // Rows as every released version's create_api_key and verify_key left them: a plain key
        // used 5 times, a quota key, a key whose fixed window is full, a revoked key. Up to 0.5
        // use was counted in apikeys.keys; from 0.6 in apikeys.meters.
        let has_meters: bool = client
            .query_one("SELECT to_regclass('apikeys.meters') IS NOT NULL", &[])
            .unwrap()
            .get(0);
        let (fixed_column, fixed_value) = if has_meters {
            (", rate_limit_algorithm", ", 'fixed'")
        } else {
            ("", "")
        };
        let legacy = |c: &mut Client, id: &str, columns: &str, values: &str| -> String {
            let key = format!("legacy-{id}-0123456789abcdefghijklmnop");
            c.execute(
                &format!(
                    "INSERT INTO apikeys.keys (id, hash, prefix, start, owner, created_by, updated_by{fixed_column}{columns})
                     VALUES ($1, sha256(convert_to($2, 'UTF8')), 'sk', 'legacy', 'before-upgrade', 'test', 'test'{fixed_value}{values})"
                ),
                &[&id, &key],
            )
            .unwrap();
            key
        };
        let counted = |c: &mut Client, id: &str, columns: &str, values: &str| {
            c.execute(
                &format!(
                    "INSERT INTO apikeys.meters (key_id, key_created_at, meter_version{columns})
                     SELECT id, created_at, meter_version{values} FROM apikeys.keys WHERE id = $1"
                ),
                &[&id],
            )
            .unwrap();
        };
        let (plain, windowed) = if has_meters {
            let plain = legacy(&mut client, "plain", "", "");
            counted(
                &mut client,
                "plain",
                ", request_count, last_used_at",
                ", 5, now()",
            );
            let windowed = legacy(
                &mut client,
                "windowed",
                ", rate_limit_max, rate_limit_window",
                ", 2, '1 hour'",
            );
            counted(
                &mut client,
                "windowed",
                ", window_start, window_count",
                ", now(), 2",
            );
            (plain, windowed)
        } else {
            let plain = legacy(
                &mut client,
                "plain",
                ", request_count, last_used_at",
                ", 5, now()",
            );
            let windowed = legacy(
                &mut client,
                "windowed",
                ", rate_limit_max, rate_limit_window, rate_window_start, rate_window_count",
                ", 2, '1 hour', now(), 2",
            );
            (plain, windowed)
        };
        let metered = legacy(&mut client, "metered", ", remaining", ", 3");
        let revoked = legacy(&mut client, "revoked", ", revoked_at", ", now()");
        let has_tokens: bool = client
            .query_one("SELECT to_regproc('apikeys.mint_token') IS NOT NULL", &[])
            .unwrap()
            .get(0);
        // With the new library and the old SQL, keys without limits and tokens keep working;
        // keys with limits wait for ALTER EXTENSION … UPDATE, and say so.
        let code: String = client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&plain])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID", "from {old}, before the update");
        // Before 0.7.0 the metering tables lack what this library needs (55000); from 0.7.0 on
        // they have it, and a metered key verifies before the update too.
        let metering_sql = old.as_str() >= "0.7.0";
        if metering_sql {
            let left: Option<i64> = client
                .query_one("SELECT remaining FROM apikeys.verify_key($1)", &[&metered])
                .unwrap()
                .get(0);
            assert_eq!(left, Some(2), "from {old}, before the update");
        } else {
            let err = client
                .query_one("SELECT apikeys.verify_key($1)", &[&metered])
                .unwrap_err();
            assert_eq!(sqlstate(&err), "55000", "from {old}: {err}");
        }
        let old_token = has_tokens.then(|| mint(&mut client, &plain, 600000));

        client
            .batch_execute("ALTER EXTENSION pg_apikeys UPDATE")
            .unwrap();
        if let Some(old_token) = old_token {
            assert_eq!(token_code(&mut client, &old_token), "VALID", "from {old}");
        }
        assert_eq!(extversion(&mut client), current, "from {old}");
        let verify = |c: &mut Client, key: &str| -> (String, Option<i64>) {
            let row = c
                .query_one(
                    "SELECT code, remaining FROM apikeys.verify_key($1)",
                    &[&key],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(
            verify(&mut client, &plain),
            ("VALID".into(), None),
            "from {old}"
        );
        assert_eq!(
            verify(&mut client, &metered),
            ("VALID".into(), Some(if metering_sql { 1 } else { 2 })),
            "from {old}"
        );
        assert_eq!(
            verify(&mut client, &windowed).0,
            "RATE_LIMITED",
            "from {old}: the full window was carried over"
        );
        assert_eq!(
            verify(&mut client, &revoked),
            ("REVOKED".into(), None),
            "from {old}"
        );
        let row = client
            .query_one(
                "SELECT request_count, rate_limit_algorithm FROM apikeys.get_api_key('plain')",
                &[],
            )
            .unwrap();
        let uses_before = if has_tokens { 9 } else { 7 };
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, String>(1)),
            (uses_before, "fixed".to_owned()),
            "from {old}: uses carried over; existing keys keep fixed windows"
        );
        let token = mint(&mut client, &plain, 60000);
        assert_eq!(token_code(&mut client, &token), "VALID", "from {old}");
        assert_eq!(
            catalog(&mut client),
            expected,
            "catalog after {old} -> {current}"
        );
        drop(client);
        admin.batch_execute(&format!("DROP DATABASE {db}")).unwrap();
    }
    drop(fresh);
    admin
        .batch_execute(&format!("DROP DATABASE {fresh_db}"))
        .unwrap();
}

/// README's function reference lists every function of the schema, and nothing that is not one.
#[test]
fn the_readme_reference_lists_every_function() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Function reference")
        .expect("a Function reference section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let documented: std::collections::BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `apikeys."))
        .map(|l| l[..l.find('(').unwrap()].to_owned())
        .collect();
    let mut client = connect();
    let in_schema: std::collections::BTreeSet<String> = client
        .query(
            "SELECT proname::text FROM pg_proc WHERE pronamespace = 'apikeys'::regnamespace",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(documented, in_schema);
}

/// The metering engine in a new database, with no setting: verifying keys with and without
/// limits in a READ ONLY transaction assigns no transaction id (so writes no WAL and waits for no
/// flush of its own); get_api_key shows the uses at once, `apikeys.meters` has them within
/// seconds, and a quota spend is in `apikeys.meters` by the time VALID is returned.
#[test]
fn every_database_meters_in_shared_memory_with_no_setting() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    recreate_database(&mut admin, "pg_apikeys_elsewhere");
    let mut client = Client::connect(
        &format!("{} dbname=pg_apikeys_elsewhere", base_url()),
        NoTls,
    )
    .unwrap();
    client.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let (id, key) = create(&mut client, "");
    let (metered_id, metered) = create(
        &mut client,
        "remaining => 5, rate_limit_max => 100, rate_limit_window => '1 hour'",
    );
    let mut tx = client.build_transaction().read_only(true).start().unwrap();
    for _ in 0..7 {
        let code: String = tx
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    for left in [4i64, 3, 2] {
        let row = tx
            .query_one(
                "SELECT code, remaining FROM apikeys.verify_key($1)",
                &[&metered],
            )
            .unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i64>(1)),
            ("VALID".into(), left)
        );
    }
    let xid: Option<i64> = tx
        .query_one("SELECT txid_current_if_assigned()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        xid, None,
        "verification wrote nothing in the caller's transaction"
    );
    // Durable before VALID was returned: the writer's commit holds the spends.
    let durable: Option<i64> = tx
        .query_one(
            "SELECT remaining FROM apikeys.meters WHERE key_id = $1",
            &[&metered_id],
        )
        .unwrap()
        .get(0);
    assert_eq!(durable, Some(2));
    tx.rollback().unwrap();
    // A rollback gives nothing back: a VALID answered is a request made.
    assert_eq!(remaining(&mut client, &metered_id), 2);
    let shown: i64 = client
        .query_one("SELECT request_count FROM apikeys.get_api_key($1)", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(shown, 7, "get_api_key counts uses not written yet");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = client
            .query_opt(
                "SELECT request_count, last_used_at IS NOT NULL FROM apikeys.meters WHERE key_id = $1",
                &[&id],
            )
            .unwrap();
        let (count, used): (i64, bool) = row.map_or((0, false), |r| (r.get(0), r.get(1)));
        if count == 7 && used {
            break;
        }
        assert!(count <= 7, "counted {count} uses of 7");
        assert!(
            Instant::now() < deadline,
            "request_count still {count} after 15 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    drop(client);
    // The writer leaves a database soon after its last work: DROP DATABASE waits up to 5 s.
    admin
        .batch_execute("DROP DATABASE pg_apikeys_elsewhere")
        .unwrap();
}

/// Rate limits and quotas stay exact when every caller runs READ ONLY transactions (PostgREST's
/// GET), and a rolled-back transaction keeps its spends.
#[test]
fn metered_keys_are_exact_in_read_only_transactions() {
    let mut client = connect();
    let (_, limited) = create(
        &mut client,
        "rate_limit_max => 30, rate_limit_window => '1 hour'",
    );
    let counts = hammer_in_sessions(
        "SET default_transaction_read_only = on",
        "SELECT code FROM apikeys.verify_key($1)",
        &limited,
        8,
        10,
    );
    assert_eq!(counts.get("VALID").copied(), Some(30), "{counts:?}");
    assert_eq!(counts.get("RATE_LIMITED").copied(), Some(50), "{counts:?}");
    let (id, quota) = create(&mut client, "remaining => 25");
    let counts = hammer_in_sessions(
        "SET default_transaction_read_only = on",
        "SELECT code FROM apikeys.verify_key($1)",
        &quota,
        8,
        10,
    );
    assert_eq!(counts.get("VALID").copied(), Some(25), "{counts:?}");
    assert_eq!(remaining(&mut client, &id), 0);
    // Spends made in transactions that roll back are spent all the same.
    let (_, again) = create(&mut client, "remaining => 3");
    let mut tx = client.transaction().unwrap();
    let code: String = tx
        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&again])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
    tx.rollback().unwrap();
    let left: i64 = client
        .query_one("SELECT remaining FROM apikeys.verify_key($1)", &[&again])
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "the rolled-back spend stays spent");
}
