//! Attacks on 0.4.0 (issue "Security: close two superuser escalations …"), each shown to fail
//! against a real server with pg_apikeys preloaded: hijacking the writer's SQL, squatting the
//! extension's schema, 40001 for keys without limits, a writer that stays dead, uses inherited by
//! a re-created key, and a first mint blocked by anyone's advisory lock. The metering engine
//! (0.6.0) has one writer per database, started on demand: the tests verify a key to get one.
mod common;

use common::*;
use postgres::{Client, NoTls};
use std::thread;
use std::time::{Duration, Instant};

fn connect_to(db: &str, user: &str) -> Client {
    Client::connect(&format!("{} dbname={db} user={user}", base_url()), NoTls)
        .unwrap_or_else(|e| panic!("connect to {db} as {user}: {e}"))
}

fn is_superuser(admin: &mut Client, role: &str) -> bool {
    admin
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

/// The test database's usage writer's process id, waiting up to `within` for one to run
/// (other databases' writers may still be leaving).
fn writer_pid(admin: &mut Client, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        let pid: Option<i32> = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                  WHERE backend_type = 'pg_apikeys writer' AND datname = $1",
                &[&DB],
            )
            .unwrap()
            .map(|r| r.get(0));
        if pid.is_some() || Instant::now() > deadline {
            return pid;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A verification of `key`, which (re)starts the database's writer if none runs.
fn poke(client: &mut Client, key: &str) {
    let code: String = client
        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
}

/// A new database `name` with the extension and one key without limits: (url, client, key).
fn database_with_a_key(admin: &mut Client, name: &str) -> (String, Client, String) {
    recreate_database(admin, name);
    let url = format!("{} dbname={name}", base_url());
    let mut client = Client::connect(&url, NoTls).unwrap();
    client.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let (_, key) = create(&mut client, "");
    (url, client, key)
}

/// Terminates writer `pid` and waits until it has left (its claim is given up before it leaves
/// pg_stat_activity): a verification made while it still ran would be written by its last flush
/// and ask for no new writer.
fn terminate_writer(admin: &mut Client, pid: i32) {
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while admin
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "writer {pid} still runs");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The pid of a usage writer other than `old`, waiting up to 15 s for one (after a restart).
fn next_writer(admin: &mut Client, old: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match writer_pid(admin, Duration::from_secs(1)) {
            Some(pid) if pid != old => return pid,
            _ => assert!(Instant::now() < deadline, "no usage writer after {old}"),
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the written uses of key `id` (apikeys.meters) are `count` (the writer writes
/// every second).
fn wait_for_count(client: &mut Client, id: &str, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now: i64 = client
            .query_one(
                "SELECT COALESCE((SELECT m.request_count FROM apikeys.meters m
                                    JOIN apikeys.keys k ON k.id = m.key_id AND k.created_at = m.key_created_at
                                   WHERE k.id = $1), 0)",
                &[&id],
            )
            .unwrap()
            .get(0);
        if now == count {
            return;
        }
        assert!(now < count, "counted {now} uses, expected {count}");
        assert!(
            Instant::now() < deadline,
            "request_count still {now}, expected {count}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A database owner (not a superuser) owns `public` in PostgreSQL 15 and can put operators there
/// and set the database's search_path. Operators the writer's old statement resolved by name
/// (`bigint * interval` had no exact match in pg_catalog) ran as the bootstrap superuser.
#[test]
fn the_usage_writer_runs_no_operator_a_database_owner_planted() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let mut client = connect(); // the usage database, with the extension
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS sec_dbowner; CREATE ROLE sec_dbowner LOGIN;
             ALTER DATABASE pg_apikeys_it OWNER TO sec_dbowner",
        )
        .unwrap();
    let mut owner = connect_to(DB, "sec_dbowner");
    owner
        .batch_execute(
            "CREATE FUNCTION public.escalate() RETURNS void LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'ALTER ROLE sec_dbowner SUPERUSER'; END $$;
             CREATE FUNCTION public.evil_times(bigint, interval) RETURNS interval LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.escalate(); RETURN $2 OPERATOR(pg_catalog.*) $1::float8; END $$;
             CREATE OPERATOR public.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = public.evil_times);
             CREATE FUNCTION public.evil_plus(bigint, bigint) RETURNS bigint LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.escalate(); RETURN $1 OPERATOR(pg_catalog.+) $2; END $$;
             CREATE OPERATOR public.+ (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.evil_plus);
             CREATE FUNCTION public.evil_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.escalate(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
             CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_eq);
             CREATE FUNCTION public.evil_tseq(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN PERFORM public.escalate(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
             CREATE OPERATOR public.= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.evil_tseq);
             ALTER DATABASE pg_apikeys_it SET search_path = public, pg_catalog;
             -- Settings that would stop the workers: read-only, another role, a timeout.
             ALTER DATABASE pg_apikeys_it SET default_transaction_read_only = on;
             ALTER DATABASE pg_apikeys_it SET role = 'sec_dbowner';
             ALTER DATABASE pg_apikeys_it SET session_authorization = 'sec_dbowner';
             ALTER DATABASE pg_apikeys_it SET statement_timeout = '1ms';",
        )
        .unwrap();
    // The writer reads the database's settings when it connects: make it connect again.
    let (id, key) = create(&mut client, "");
    poke(&mut client, &key);
    let before = writer_pid(&mut admin, Duration::from_secs(10)).expect("a writer runs");
    terminate_writer(&mut admin, before);
    poke(&mut client, &key);
    next_writer(&mut admin, before);
    wait_for_count(&mut client, &id, 2);
    // Uses in both the plain verification and the writer's flush.
    for _ in 0..3 {
        let code: String = client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    wait_for_count(&mut client, &id, 5);
    let escalated = is_superuser(&mut admin, "sec_dbowner");
    admin
        .batch_execute(
            "ALTER DATABASE pg_apikeys_it RESET ALL;
             ALTER DATABASE pg_apikeys_it OWNER TO postgres",
        )
        .unwrap();
    drop(owner);
    let mut client = connect();
    client
        .batch_execute(
            "DROP OPERATOR public.* (bigint, interval); DROP OPERATOR public.+ (bigint, bigint);
             DROP OPERATOR public.= (text, text); DROP OPERATOR public.= (timestamptz, timestamptz);
             DROP FUNCTION public.evil_times, public.evil_plus, public.evil_eq, public.evil_tseq, public.escalate",
        )
        .unwrap();
    admin
        .batch_execute("ALTER ROLE sec_dbowner NOSUPERUSER; DROP ROLE sec_dbowner")
        .unwrap();
    assert!(!escalated, "the database owner became a superuser");
}

/// Terminated (or its database dropped with FORCE), the writer used to exit with code 0 and
/// never come back: counting stopped for good. Now the launcher starts a new one (and the
/// postmaster restarts the launcher itself) and what it had not written yet is written by the
/// next one.
#[test]
fn the_usage_writer_comes_back_after_it_is_terminated() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let mut client = connect();
    let (id, key) = create(&mut client, "");
    poke(&mut client, &key);
    let mut last = writer_pid(&mut admin, Duration::from_secs(10)).expect("a writer runs");
    wait_for_count(&mut client, &id, 1);
    for (round, kind) in [(2, "writer"), (3, "launcher"), (4, "writer")] {
        if kind == "launcher" {
            // Connected to no database, the launcher is not in pg_stat_activity: SIGTERM it.
            let launcher = launcher_pid(&mut admin);
            let killed = std::process::Command::new("kill")
                .args(["-TERM", &launcher.to_string()])
                .output()
                .unwrap();
            assert!(killed.status.success(), "{killed:?}");
            // The postmaster starts it again 5 s later; meanwhile the writer may leave too.
            let deadline = Instant::now() + Duration::from_secs(15);
            while launcher_pid(&mut admin) == launcher {
                assert!(Instant::now() < deadline, "the launcher did not come back");
                thread::sleep(Duration::from_millis(200));
            }
        } else {
            terminate_writer(&mut admin, last);
        }
        // Counted while no writer runs: kept in shared memory for the next one.
        poke(&mut client, &key);
        if kind == "writer" {
            last = next_writer(&mut admin, last);
        }
        wait_for_count(&mut client, &id, round);
    }
}

/// The launcher's process id (0 while none runs): the postmaster's child of that title.
fn launcher_pid(admin: &mut Client) -> i32 {
    let me: i32 = admin
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    let parent = |pid: &str| -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
    };
    let postmaster = parent(&me.to_string()).expect("the backend's parent");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().into_string().unwrap();
        let title = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
        if parent(&pid).as_deref() == Some(postmaster.as_str())
            && title.starts_with("postgres: pg_apikeys launcher")
        {
            return pid.parse().unwrap();
        }
    }
    0
}

/// The writer's session is the extension's owner's, not the bootstrap superuser's: a writer
/// connects as the owner a backend recorded, checks it against pg_extension.extowner, and when the
/// owner changed leaves so that the launcher starts one connected as the new owner.
#[test]
fn the_usage_writer_connects_as_the_extensions_owner() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let mut client = connect();
    let (_, plain) = create(&mut client, "");
    // Verifies `plain` (so that a writer is wanted) until the database's writer runs as `role`.
    let writer_runs_as = |admin: &mut Client, client: &mut Client, role: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            poke(client, &plain);
            let roles: Vec<String> = admin
                .query(
                    "SELECT usename::text FROM pg_stat_activity
                      WHERE backend_type = 'pg_apikeys writer' AND datname = $1",
                    &[&DB],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            if roles.iter().any(|r| r == role) {
                return;
            }
            assert!(Instant::now() < deadline, "no writer as {role}: {roles:?}");
            thread::sleep(Duration::from_millis(200));
        }
    };
    let change_owner = |client: &mut Client, admin: &mut Client, role: &str| {
        client
            .execute(
                "UPDATE pg_catalog.pg_extension SET extowner = $1::text::regrole WHERE extname = 'pg_apikeys'",
                &[&role],
            )
            .unwrap();
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE backend_type = 'pg_apikeys writer' AND datname = $1",
                &[&DB],
            )
            .unwrap();
    };
    admin
        .batch_execute(
            "DROP ROLE IF EXISTS sec_ext_owner; CREATE ROLE sec_ext_owner SUPERUSER LOGIN",
        )
        .unwrap();
    writer_runs_as(&mut admin, &mut client, "postgres");
    change_owner(&mut client, &mut admin, "sec_ext_owner");
    writer_runs_as(&mut admin, &mut client, "sec_ext_owner");
    let (id, key) = create(&mut client, "");
    for _ in 0..2 {
        poke(&mut client, &key);
    }
    wait_for_count(&mut client, &id, 2);
    change_owner(&mut client, &mut admin, "postgres");
    writer_runs_as(&mut admin, &mut client, "postgres");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'sec_ext_owner'",
            &[],
        )
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    admin.batch_execute("DROP ROLE sec_ext_owner").unwrap();
}

/// A key deleted and re-created under the same id does not inherit the old key's uses that the
/// writer had not written yet.
#[test]
fn a_key_recreated_under_its_id_does_not_inherit_uncounted_uses() {
    let mut client = connect();
    client
        .batch_execute("SELECT apikeys.delete_api_key('sec_reused')")
        .unwrap();
    let (_, old) = create(&mut client, "id => 'sec_reused'");
    for _ in 0..5 {
        let code: String = client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&old])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    // At once, before the writer's next flush (it runs every second).
    let mut tx = client.transaction().unwrap();
    tx.execute("SELECT apikeys.delete_api_key('sec_reused')", &[])
        .unwrap();
    let new: String = tx
        .query_one(
            "SELECT key FROM apikeys.create_api_key(id => 'sec_reused')",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let code: String = client
        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&new])
        .unwrap()
        .get(0);
    assert_eq!(code, "VALID");
    wait_for_count(&mut client, "sec_reused", 1);
    thread::sleep(Duration::from_secs(2));
    wait_for_count(&mut client, "sec_reused", 1);
}

/// A role that creates schema `apikeys` before the extension is installed could rename it later
/// and put its own objects under the name the extension's code uses: CREATE EXTENSION refuses
/// such a schema, and the schema it creates cannot be renamed by the database's owner.
#[test]
fn a_schema_apikeys_made_by_someone_else_is_refused() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    admin
        .batch_execute("DROP DATABASE IF EXISTS pg_apikeys_squat")
        .unwrap();
    admin
        .batch_execute("DROP ROLE IF EXISTS sec_squatter; CREATE ROLE sec_squatter LOGIN")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE pg_apikeys_squat OWNER sec_squatter")
        .unwrap();
    let mut squatter = connect_to("pg_apikeys_squat", "sec_squatter");
    squatter.batch_execute("CREATE SCHEMA apikeys").unwrap();
    let mut dba = connect_to("pg_apikeys_squat", "postgres");
    let err = dba
        .batch_execute("CREATE EXTENSION pg_apikeys")
        .expect_err("installed into a schema someone else owns");
    assert_eq!(sqlstate(&err), "42501", "{err}");
    assert!(format!("{err:?}").contains("sec_squatter"), "{err:?}");
    // A schema the DBA owns but others may create objects in: refused too.
    dba.batch_execute(
        "DROP SCHEMA apikeys; CREATE SCHEMA apikeys; GRANT CREATE ON SCHEMA apikeys TO sec_squatter",
    )
    .unwrap();
    let err = dba
        .batch_execute("CREATE EXTENSION pg_apikeys")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501", "{err}");
    // The DBA's own schema, or none: installed; the database owner cannot take it over.
    dba.batch_execute("DROP SCHEMA apikeys; CREATE EXTENSION pg_apikeys")
        .unwrap();
    for attack in [
        "ALTER SCHEMA apikeys RENAME TO mine",
        "ALTER SCHEMA apikeys OWNER TO sec_squatter",
        "CREATE TABLE apikeys.mine ()",
    ] {
        let err = squatter.batch_execute(attack).expect_err(attack);
        assert_eq!(sqlstate(&err), "42501", "{attack}: {err}");
    }
    drop(squatter);
    drop(dba);
    admin
        .batch_execute("DROP DATABASE pg_apikeys_squat")
        .unwrap();
    admin.batch_execute("DROP ROLE sec_squatter").unwrap();
}

/// Keys without limits never make a caller retry: REPEATABLE READ and SERIALIZABLE callers in a
/// database whose uses are written to the row (not the usage writer's) used to get 40001 when
/// another session had used the key since their snapshot.
#[test]
fn keys_without_limits_never_raise_40001() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let (url, mut other, key) = database_with_a_key(&mut admin, "pg_apikeys_isolation");
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let mut caller = Client::connect(&url, NoTls).unwrap();
        caller
            .batch_execute(&format!("BEGIN ISOLATION LEVEL {level}; SELECT 1"))
            .unwrap();
        // Another session uses the key after the caller's snapshot was taken.
        let code: String = other
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
        for _ in 0..3 {
            let code: String = caller
                .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
                .unwrap_or_else(|e| panic!("{level}: {e}"))
                .get(0);
            assert_eq!(code, "VALID");
        }
        caller
            .batch_execute("COMMIT")
            .unwrap_or_else(|e| panic!("{level} commit: {e}"));
    }
    drop(other);
    admin
        .batch_execute("DROP DATABASE pg_apikeys_isolation")
        .unwrap();
}

/// The first mint of a database creates its signing key under a lock no SQL can take (any role
/// could hold the advisory lock 0.4.0 used, forever), and a second first mint that waited for it
/// uses the key the first created, even in REPEATABLE READ.
#[test]
fn first_mints_make_one_signing_key_and_no_role_can_block_them() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    admin
        .batch_execute("DROP ROLE IF EXISTS sec_blocker; CREATE ROLE sec_blocker LOGIN")
        .unwrap();
    let (url, mut setup, key) = database_with_a_key(&mut admin, "pg_apikeys_first_mint");

    // Any role's advisory lock on the old lock's key blocks nothing.
    let mut blocker = connect_to("pg_apikeys_first_mint", "sec_blocker");
    blocker
        .batch_execute("SELECT pg_advisory_lock(hashtext('apikeys.signing_keys'))")
        .unwrap();
    let mut first = Client::connect(&url, NoTls).unwrap();
    first
        .batch_execute("SET statement_timeout = '10s'; BEGIN")
        .unwrap();
    first
        .query_one("SELECT apikeys.mint_token($1, 60000)", &[&key])
        .expect("minting is not blocked by an advisory lock");

    // A first mint whose transaction stays open holds the others back only as long as their
    // lock_timeout (at most a minute): then they fail with 55P03 and a hint.
    let mut impatient = Client::connect(&url, NoTls).unwrap();
    impatient
        .batch_execute("SET lock_timeout = '500ms'; SET statement_timeout = '20s'")
        .unwrap();
    let err = impatient
        .query_one("SELECT apikeys.mint_token($1, 60000)", &[&key])
        .expect_err("waited for an open first mint");
    assert_eq!(sqlstate(&err), "55P03", "{err}");

    // A second first mint, in REPEATABLE READ with its snapshot taken before the first commits.
    let second_url = url.clone();
    let second_key = key.clone();
    let second = thread::spawn(move || {
        let mut second = Client::connect(&second_url, NoTls).unwrap();
        second
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
            .unwrap();
        let token: String = second
            .query_one("SELECT apikeys.mint_token($1, 60000)", &[&second_key])
            .unwrap()
            .get(0);
        second.batch_execute("COMMIT").unwrap();
        token
    });
    thread::sleep(Duration::from_millis(500));
    first.batch_execute("COMMIT").unwrap();
    let token = second.join().expect("second mint");
    let keys: i64 = setup
        .query_one("SELECT count(*) FROM apikeys.signing_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "two first mints made two signing keys");
    assert_eq!(token_code(&mut setup, &token), "VALID");
    drop((blocker, first, impatient, setup));
    admin
        .batch_execute("DROP DATABASE pg_apikeys_first_mint WITH (FORCE)")
        .unwrap();
    admin.batch_execute("DROP ROLE sec_blocker").unwrap();
}

/// A first mint left open (its transaction not ended) holds back neither the administrator's
/// rotate_signing_key (the remedy its 55P03 hint names) nor, once a key is committed, any other
/// mint: the first-mint lock is one only that code takes.
#[test]
fn an_open_first_mint_blocks_neither_rotation_nor_later_mints() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    let (url, mut setup, key) = database_with_a_key(&mut admin, "pg_apikeys_open_mint");
    let mut holder = Client::connect(&url, NoTls).unwrap();
    holder.batch_execute("BEGIN").unwrap();
    holder
        .query_one("SELECT apikeys.mint_token($1, 60000)", &[&key])
        .unwrap();
    // Not blocked: lock_timeout would turn any wait on the holder into an error.
    let mut rotator = Client::connect(&url, NoTls).unwrap();
    rotator
        .batch_execute("SET lock_timeout = '2s'; SELECT apikeys.rotate_signing_key()")
        .expect("rotate_signing_key waited for an open first mint");
    let mut other = Client::connect(&url, NoTls).unwrap();
    other.batch_execute("SET lock_timeout = '2s'").unwrap();
    let token: String = other
        .query_one("SELECT apikeys.mint_token($1, 60000)", &[&key])
        .expect("a mint after the rotation waited for the open first mint")
        .get(0);
    assert_eq!(token_code(&mut other, &token), "VALID");
    holder.batch_execute("ROLLBACK").unwrap();
    let keys: i64 = setup
        .query_one("SELECT count(*) FROM apikeys.signing_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "the rotated key, not the rolled-back first one");
    drop((setup, holder, rotator, other));
    admin
        .batch_execute("DROP DATABASE pg_apikeys_open_mint WITH (FORCE)")
        .unwrap();
}

/// Keys, ids and permissions are read as UTF-8: in a database of another encoding a non-ASCII
/// key made verify_key raise XX000, so the extension refuses to be installed there.
#[test]
fn a_database_that_is_not_utf8_is_refused() {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    for (db, encoding) in [
        ("pg_apikeys_latin1", "LATIN1"),
        ("pg_apikeys_ascii", "SQL_ASCII"),
    ] {
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .unwrap();
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {db} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap();
        let mut client = connect_to(db, "postgres");
        let err = client
            .batch_execute("CREATE EXTENSION pg_apikeys")
            .expect_err(encoding);
        assert_eq!(sqlstate(&err), "0A000", "{encoding}: {err}");
        drop(client);
        admin.batch_execute(&format!("DROP DATABASE {db}")).unwrap();
    }
}
