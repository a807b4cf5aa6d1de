//! Crash safety. A cluster of its own with durable settings (fsync, synchronous_commit and
//! full_page_writes on: the test cluster's speed settings would be allowed to lose acknowledged
//! commits), several connections creating keys and spending quotas, then the postmaster and
//! every backend killed with SIGKILL mid-flight and the server restarted through crash recovery.
//! `make test-integration` runs it; it needs sudo (the cluster runs as user postgres).

mod common;
use common::create;
use postgres::{Client, NoTls};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const DIR: &str = "/tmp/pg_apikeys_crash";
const PORT: &str = "55436";
const URL: &str = "host=127.0.0.1 port=55436 user=postgres dbname=postgres";
/// metering::WRITE_AHEAD_MAX: the most quota of a key the writer writes ahead of its calls.
const WRITE_AHEAD_MAX: usize = 32;

fn cluster(args: &[&str]) -> std::process::Output {
    Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"))
        .args(args)
        .output()
        .expect("scripts/cluster.sh")
}

fn connect() -> Client {
    Client::connect(URL, NoTls).expect("connect to the crash cluster")
}

/// The postmaster's pid and its children's, from postmaster.pid and /proc.
fn server_pids() -> Vec<String> {
    let lock = std::fs::read_to_string(format!("{DIR}/postmaster.pid")).expect("postmaster.pid");
    let postmaster = lock.lines().next().unwrap().trim().to_owned();
    let mut pids = vec![postmaster.clone()];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so read after its closing ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(postmaster.as_str()) {
            pids.push(entry.file_name().into_string().unwrap());
        }
    }
    pids
}

/// WAL flushes so far by every process of the cluster, the writer's included: a backend reports
/// its statistics when it goes idle (at once when told to), the writer when it leaves (a few
/// seconds after the last call), so wait for that.
/// PostgreSQL 14 has no pg_stat_force_next_flush() (a backend reports at most every 500 ms, when
/// idle: a second statement after that reports the first), and 18 moved the WAL fsync count from
/// pg_stat_wal to pg_stat_io.
fn wal_syncs(admin: &mut Client, client: &mut Client) -> i64 {
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .unwrap()
        .get(0);
    if version >= 150000 {
        client
            .batch_execute("SELECT pg_stat_force_next_flush()")
            .unwrap();
    } else {
        thread::sleep(Duration::from_millis(600));
        client.batch_execute("SELECT 1").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        thread::sleep(Duration::from_millis(500));
        let writers: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_apikeys writer'",
                &[],
            )
            .unwrap()
            .get(0);
        if writers == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer did not leave");
    }
    if version < 150000 {
        // The statistics collector receives reports asynchronously.
        thread::sleep(Duration::from_millis(600));
    }
    admin
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .unwrap();
    let count = if version >= 180000 {
        "SELECT sum(fsyncs)::bigint FROM pg_stat_io WHERE object = 'wal'"
    } else {
        "SELECT wal_sync FROM pg_stat_wal"
    };
    admin.query_one(count, &[]).unwrap().get(0)
}

/// A durable cluster of its own (fsync and synchronous_commit on) at `dir` on `port`, with a
/// database `app` holding the extension: a client of database postgres, and app's URL.
fn durable_cluster(dir: &str, port: &str) -> (Client, String) {
    cluster(&["stop", dir, port]);
    let _ = std::fs::remove_dir_all(dir);
    let started = cluster(&["start", dir, port, "fsync = on", "synchronous_commit = on"]);
    assert!(started.status.success(), "{started:?}");
    let url = format!("host=127.0.0.1 port={port} user=postgres");
    let mut admin = Client::connect(&format!("{url} dbname=postgres"), NoTls).unwrap();
    admin.batch_execute("CREATE DATABASE app").unwrap();
    let app = format!("{url} dbname=app");
    Client::connect(&app, NoTls)
        .unwrap()
        .batch_execute("CREATE EXTENSION pg_apikeys")
        .unwrap();
    (admin, app)
}

/// What one connection saw before the crash.
#[derive(Default, Debug)]
struct Seen {
    /// Keys whose create_api_key returned.
    created: Vec<String>,
    /// Per key: verifications that returned VALID (in autocommit: after their commit).
    valid: BTreeMap<String, usize>,
    /// Per key: VALIDs whose transaction's COMMIT also returned.
    committed: BTreeMap<String, usize>,
    /// Per key: a call that was sent and never answered (its outcome is unknown).
    in_doubt: BTreeMap<String, usize>,
}

fn add(total: &mut BTreeMap<String, usize>, part: &BTreeMap<String, usize>) {
    for (k, n) in part {
        *total.entry(k.clone()).or_insert(0) += n;
    }
}

/// Creates keys until the connection dies.
fn creator(progress: Arc<AtomicUsize>) -> Seen {
    let mut client = connect();
    let mut seen = Seen::default();
    while let Ok(row) = client.query_one(
        "SELECT key FROM apikeys.create_api_key(owner => 'crash', permissions => '{\"orders\": [\"read\"]}')",
        &[],
    ) {
        seen.created.push(row.get(0));
        progress.fetch_add(1, Ordering::Relaxed);
    }
    seen
}

/// Verifies `keys` in turn, one autocommit statement each, until the connection dies.
fn autocommit_verifier(keys: Vec<String>, progress: Arc<AtomicUsize>) -> Seen {
    let mut client = connect();
    let stmt = client
        .prepare("SELECT code FROM apikeys.verify_key($1)")
        .unwrap();
    let mut seen = Seen::default();
    for key in keys.iter().cycle() {
        match client.query_one(&stmt, &[key]) {
            Ok(row) => {
                if row.get::<_, String>(0) == "VALID" {
                    *seen.valid.entry(key.clone()).or_insert(0) += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                seen.in_doubt.insert(key.clone(), 1);
                break;
            }
        }
    }
    seen
}

/// Verifies `key` in explicit transactions (BEGIN; verify; COMMIT) until the connection dies.
fn transaction_verifier(key: String, progress: Arc<AtomicUsize>) -> Seen {
    let mut client = connect();
    let mut seen = Seen::default();
    loop {
        let Ok(mut tx) = client.transaction() else {
            break;
        };
        let Ok(row) = tx.query_one("SELECT code FROM apikeys.verify_key($1)", &[&key]) else {
            seen.in_doubt.insert(key.clone(), 1);
            break;
        };
        let valid = row.get::<_, String>(0) == "VALID";
        if valid {
            *seen.valid.entry(key.clone()).or_insert(0) += 1;
        }
        if tx.commit().is_err() {
            break;
        }
        if valid {
            *seen.committed.entry(key.clone()).or_insert(0) += 1;
            progress.fetch_add(1, Ordering::Relaxed);
        }
    }
    seen
}

#[test]
fn nothing_acknowledged_is_lost_and_nothing_is_spent_twice_after_sigkill() {
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
    let started = cluster(&[
        "start",
        DIR,
        PORT,
        "fsync = on",
        "synchronous_commit = on",
        "full_page_writes = on",
    ]);
    assert!(started.status.success(), "{started:?}");
    let mut admin = connect();
    admin.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let durable: String = admin
        .query_one(
            "SELECT string_agg(setting, ',' ORDER BY name) FROM pg_settings
              WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(durable, "on,on,on");
    let quota_key = |client: &mut Client, n: i64| -> String {
        client
            .query_one(
                "SELECT key FROM apikeys.create_api_key(remaining => $1)",
                &[&n],
            )
            .unwrap()
            .get(0)
    };
    // One quota small enough to run out before the crash, two that cannot.
    const SMALL: i64 = 40;
    const LARGE: i64 = 1_000_000;
    let small = quota_key(&mut admin, SMALL);
    let autocommit_key = quota_key(&mut admin, LARGE);
    let transaction_key = quota_key(&mut admin, LARGE);
    let initial = BTreeMap::from([
        (small.clone(), SMALL),
        (autocommit_key.clone(), LARGE),
        (transaction_key.clone(), LARGE),
    ]);
    // A key without a quota of its own whose identity's quota it spends (SPEC §7): the same
    // guarantee for the identity's quota.
    admin
        .execute(
            "SELECT apikeys.create_identity('crash-tenant', remaining => $1)",
            &[&LARGE],
        )
        .unwrap();
    let tenant_key: String = admin
        .query_one(
            "SELECT key FROM apikeys.create_api_key(owner => 'crash-tenant')",
            &[],
        )
        .unwrap()
        .get(0);

    let created = Arc::new(AtomicUsize::new(0));
    let verified = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let p = created.clone();
        workers.push(thread::spawn(move || creator(p)));
        let keys = vec![small.clone(), autocommit_key.clone(), tenant_key.clone()];
        let p = verified.clone();
        workers.push(thread::spawn(move || autocommit_verifier(keys, p)));
        let key = transaction_key.clone();
        let p = verified.clone();
        workers.push(thread::spawn(move || transaction_verifier(key, p)));
    }
    // Crash only once every kind of work is under way and the small quota is gone.
    let deadline = Instant::now() + Duration::from_secs(60);
    let small_left = |admin: &mut Client| -> i64 {
        admin
            .query_one(
                "SELECT g.remaining FROM apikeys.keys k, apikeys.get_api_key(k.id) g
                  WHERE k.hash = sha256(convert_to($1, 'UTF8'))",
                &[&small],
            )
            .unwrap()
            .get(0)
    };
    while created.load(Ordering::Relaxed) < 50
        || verified.load(Ordering::Relaxed) < 200
        || small_left(&mut admin) > 0
    {
        assert!(Instant::now() < deadline, "the workload made no progress");
        thread::sleep(Duration::from_millis(20));
    }
    let pids = server_pids();
    assert!(pids.len() > 6, "postmaster and backends: {pids:?}");
    // The postmaster first, so that it cannot restart its children; then the children (some,
    // like autovacuum workers, may have exited meanwhile: their failures do not matter).
    let killed = Command::new("kill")
        .args(["-9", &pids[0]])
        .output()
        .unwrap();
    assert!(killed.status.success(), "{killed:?}");
    Command::new("kill")
        .arg("-9")
        .args(&pids[1..])
        .output()
        .unwrap();

    let mut seen = Seen::default();
    for w in workers {
        let s = w.join().expect("worker");
        seen.created.extend(s.created);
        add(&mut seen.valid, &s.valid);
        add(&mut seen.committed, &s.committed);
        add(&mut seen.in_doubt, &s.in_doubt);
    }
    // Restart: crash recovery. Backends that outlived the kill for a moment may still hold the
    // shared memory, so try for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cluster(&["start", DIR, PORT]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "restart failed: {out:?}");
        thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(format!("{DIR}/server.log")).unwrap();
    assert!(
        log.contains("database system was interrupted") || log.contains("not properly shut down"),
        "the restart went through crash recovery"
    );

    eprintln!(
        "crash: {} keys created, VALID {:?}, committed {:?}, cut off {:?}",
        seen.created.len(),
        seen.valid.values().collect::<Vec<_>>(),
        seen.committed.values().collect::<Vec<_>>(),
        seen.in_doubt.values().collect::<Vec<_>>()
    );
    let mut client = connect();
    // Every key whose creation was acknowledged verifies.
    let valid: i64 = client
        .query_one(
            "SELECT count(*) FROM unnest($1::text[]) k WHERE (apikeys.verify_key(k)).code = 'VALID'",
            &[&seen.created],
        )
        .unwrap()
        .get(0);
    assert_eq!(valid as usize, seen.created.len());
    // A key and its audit row commit together.
    let unaudited: i64 = client
        .query_one(
            "SELECT count(*) FROM apikeys.keys k WHERE NOT EXISTS
               (SELECT 1 FROM apikeys.audit_log a WHERE a.action = 'create' AND a.key_id = k.id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unaudited, 0);

    // Quotas: every VALID has its spend, committed or not (a spend is durable before VALID is
    // returned, and a rollback does not undo it); beyond the VALIDs, a call the crash cut off may
    // have been spent, and so may the quota the writer wrote ahead (at most WRITE_AHEAD_MAX per
    // key, as PostgreSQL's sequences lose the values they logged ahead). request_count counts the
    // spends written with the quota, so it trails by what was written ahead.
    for (key, start) in &initial {
        let row = client
            .query_one(
                "SELECT g.remaining, g.request_count FROM apikeys.keys k, apikeys.get_api_key(k.id) g
                  WHERE k.hash = sha256(convert_to($1, 'UTF8'))",
                &[key],
            )
            .unwrap();
        let (remaining, requests): (i64, i64) = (row.get(0), row.get(1));
        let spent = (start - remaining) as usize;
        let valid = seen.valid.get(key).copied().unwrap_or(0);
        let committed = seen.committed.get(key).copied().unwrap_or(0);
        let in_doubt = seen.in_doubt.get(key).copied().unwrap_or(0);
        assert!(
            requests as usize <= spent && spent <= requests as usize + WRITE_AHEAD_MAX,
            "request_count {requests} <= {spent} spent <= request_count + {WRITE_AHEAD_MAX} written ahead"
        );
        assert!(committed <= valid, "{committed} committed <= {valid} VALID");
        assert!(
            valid <= spent && spent <= valid + in_doubt + WRITE_AHEAD_MAX,
            "{valid} VALID <= {spent} spent <= {valid} + {in_doubt} cut off + {WRITE_AHEAD_MAX} written ahead"
        );
    }
    // The identity's quota: every VALID of its key is spent, and at most the calls cut off and
    // what was written ahead beyond them.
    let identity_left: i64 = client
        .query_one(
            "SELECT remaining FROM apikeys.get_identity('crash-tenant')",
            &[],
        )
        .unwrap()
        .get(0);
    let spent = (LARGE - identity_left) as usize;
    let valid = seen.valid.get(&tenant_key).copied().unwrap_or(0);
    let in_doubt = seen.in_doubt.get(&tenant_key).copied().unwrap_or(0);
    assert!(
        valid > 0,
        "the identity's key was verified before the crash"
    );
    assert!(
        valid <= spent && spent <= valid + in_doubt + WRITE_AHEAD_MAX,
        "identity: {valid} VALID <= {spent} spent <= {valid} + {in_doubt} cut off + {WRITE_AHEAD_MAX} written ahead"
    );
    // The small quota ran out before the crash: all of it spent, and never beyond.
    let left: i64 = client
        .query_one("SELECT remaining FROM apikeys.verify_key($1)", &[&small])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    drop(client);
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
}

/// Verifications cause no WAL flush: in a durable cluster (fsync and synchronous_commit on) and
/// an application database with default settings, 5000 verifications of 500 keys without limits
/// add next to nothing to pg_stat_wal.wal_sync (the writer's commits, about one a second), while
/// 200 one-row UPDATEs — what 0.4.0 did per verification — add one each.
#[test]
fn verifications_cause_no_wal_flushes() {
    const DIR: &str = "/tmp/pg_apikeys_wal";
    const PORT: &str = "55439";
    let (mut admin, app) = durable_cluster(DIR, PORT);
    let mut client = Client::connect(&app, NoTls).unwrap();
    client
        .batch_execute("CREATE TABLE counter (n bigint); INSERT INTO counter VALUES (0)")
        .unwrap();
    let keys: Vec<String> = client
        .query(
            "SELECT (apikeys.create_api_key()).key FROM generate_series(1, 500)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let verify = client
        .prepare("SELECT code FROM apikeys.verify_key($1)")
        .unwrap();
    for key in &keys {
        let code: String = client.query_one(&verify, &[key]).unwrap().get(0);
        assert_eq!(code, "VALID");
    }
    let before = wal_syncs(&mut admin, &mut client);
    for i in 0..5000 {
        let code: String = client
            .query_one(&verify, &[&keys[(i * 7919) % keys.len()]])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    let after = wal_syncs(&mut admin, &mut client);
    let update = client.prepare("UPDATE counter SET n = n + 1").unwrap();
    for _ in 0..200 {
        client.execute(&update, &[]).unwrap();
    }
    let after_updates = wal_syncs(&mut admin, &mut client);
    eprintln!(
        "wal_sync: +{} for 5000 verifications, +{} for 200 UPDATEs",
        after - before,
        after_updates - after
    );
    assert!(
        after_updates - after >= 150,
        "the cluster counts one WAL flush per committed UPDATE"
    );
    assert!(
        after - before < 100,
        "5000 verifications caused {} WAL flushes",
        after - before
    );
    drop(client);
    drop(admin);
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
}

/// Without `shared_preload_libraries` there is no metering engine: every key still verifies, a
/// WARNING says once per session what is missing, and a quota stays exact under concurrency
/// through row locks (which need a read-write transaction: 25006 in a read-only one).
#[test]
fn without_preloading_every_key_still_verifies_and_quotas_stay_exact() {
    const DIR: &str = "/tmp/pg_apikeys_nopreload";
    const PORT: &str = "55442";
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
    let started = cluster(&["start", DIR, PORT, "shared_preload_libraries = ''"]);
    assert!(started.status.success(), "{started:?}");
    let url = format!("host=127.0.0.1 port={PORT} user=postgres dbname=postgres");
    let warnings = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = warnings.clone();
    let mut client = url
        .parse::<postgres::Config>()
        .unwrap()
        .notice_callback(move |n| seen.lock().unwrap().push(n.message().to_owned()))
        .connect(NoTls)
        .unwrap();
    client.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let plain: String = client
        .query_one("SELECT key FROM apikeys.create_api_key()", &[])
        .unwrap()
        .get(0);
    for _ in 0..3 {
        let code: String = client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&plain])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    let said: Vec<String> = warnings.lock().unwrap().clone();
    assert_eq!(said.len(), 1, "one WARNING per session: {said:?}");
    assert!(said[0].contains("shared_preload_libraries"), "{said:?}");

    let (id, quota) = create(&mut client, "remaining => 30");
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (url, quota) = (url.clone(), quota.clone());
            thread::spawn(move || {
                let mut c = Client::connect(&url, NoTls).unwrap();
                (0..15)
                    .filter(|_| {
                        c.query_one("SELECT code FROM apikeys.verify_key($1)", &[&quota])
                            .unwrap()
                            .get::<_, String>(0)
                            == "VALID"
                    })
                    .count()
            })
        })
        .collect();
    let valid: usize = callers.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(valid, 30, "exactly the quota, through row locks");
    let left: i64 = client
        .query_one("SELECT remaining FROM apikeys.get_api_key($1)", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let mut tx = client.build_transaction().read_only(true).start().unwrap();
    let err = tx
        .query_one("SELECT apikeys.verify_key($1)", &[&quota])
        .unwrap_err();
    assert_eq!(
        err.code().map(|c| c.code().to_owned()).as_deref(),
        Some("25006"),
        "{err}"
    );
    drop(tx);
    drop(client);
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
}

/// A hot quota key does not need a commit per spend: the writer writes quota ahead of the calls
/// (at most WRITE_AHEAD_MAX), and gives back what no call used once the key rests and at a clean
/// shutdown, so that only a crash can lose it. Counted, not timed: one caller's 3000 spends
/// cause far fewer WAL flushes than spends, the quota is exact, and `apikeys.meters` holds the
/// exact quota left after a rest and after a clean restart.
#[test]
fn a_hot_quota_key_shares_commits_and_loses_nothing_at_a_clean_shutdown() {
    const DIR: &str = "/tmp/pg_apikeys_ahead";
    const PORT: &str = "55443";
    const START: i64 = 1_000_000;
    let (mut admin, app) = durable_cluster(DIR, PORT);
    let mut client = Client::connect(&app, NoTls).unwrap();
    let (id, key) = create(&mut client, &format!("remaining => {START}"));
    let verify = client
        .prepare("SELECT code FROM apikeys.verify_key($1)")
        .unwrap();
    let before = wal_syncs(&mut admin, &mut client);
    const SPENDS: i64 = 3000;
    for _ in 0..SPENDS {
        let code: String = client.query_one(&verify, &[&key]).unwrap().get(0);
        assert_eq!(code, "VALID");
    }
    let flushes = wal_syncs(&mut admin, &mut client) - before;
    eprintln!("wal_sync: +{flushes} for {SPENDS} durable spends by one caller");
    assert!(
        flushes * 3 < SPENDS,
        "{SPENDS} spends caused {flushes} WAL flushes: the quota is not written ahead"
    );
    let stored = |client: &mut Client| -> (i64, i64) {
        let row = client
            .query_one(
                "SELECT remaining, request_count FROM apikeys.meters WHERE key_id = $1",
                &[&id],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // At rest (a second without calls, then the writer's next round), what was written ahead
    // and not used is given back: the table holds the exact quota left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(&mut client) != (START - SPENDS, SPENDS) {
        assert!(
            Instant::now() < deadline,
            "apikeys.meters holds {:?}, not the quota left {} and {SPENDS} uses",
            stored(&mut client),
            START - SPENDS
        );
        thread::sleep(Duration::from_millis(200));
    }
    // A clean shutdown right after a burst of spends by several callers: nothing is lost.
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (app, key) = (app.clone(), key.clone());
            thread::spawn(move || {
                let mut c = Client::connect(&app, NoTls).unwrap();
                for _ in 0..500 {
                    let code: String = c
                        .query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
                        .unwrap()
                        .get(0);
                    assert_eq!(code, "VALID");
                }
            })
        })
        .collect();
    for c in callers {
        c.join().unwrap();
    }
    drop(client);
    drop(admin);
    cluster(&["stop", DIR, PORT]);
    let restarted = cluster(&["start", DIR, PORT]);
    assert!(restarted.status.success(), "{restarted:?}");
    let mut client = Client::connect(&app, NoTls).unwrap();
    assert_eq!(
        stored(&mut client),
        (START - SPENDS - 2000, SPENDS + 2000),
        "after a clean restart"
    );
    let left: i64 = client
        .query_one("SELECT remaining FROM apikeys.verify_key($1)", &[&key])
        .unwrap()
        .get(0);
    assert_eq!(left, START - SPENDS - 2000 - 1);
    drop(client);
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
}

/// Windows (standalone or named limits) of more identifiers than the table holds never fill it
/// for good: the writer evicts the windows that are over, and keeps those still open.
#[test]
fn windows_of_many_identifiers_leave_room_and_open_ones_stay() {
    let (dir, port) = ("/tmp/pg_apikeys_windows", "55444");
    cluster(&["stop", dir, port]);
    let _ = std::fs::remove_dir_all(dir);
    let started = cluster(&["start", dir, port, "apikeys.shared_keys = 1024"]);
    assert!(started.status.success(), "{started:?}");
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut client = Client::connect(&url, NoTls).unwrap();
    client.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    let take = |c: &mut Client, id: &str, limit: i32, duration: &str| -> bool {
        c.query_one(
            "SELECT success FROM apikeys.ratelimit('flood', $1, $2, $3::text::interval)",
            &[&id, &limit, &duration],
        )
        .unwrap()
        .get(0)
    };
    assert!(take(&mut client, "kept", 1, "1 hour"));
    let started_at = Instant::now();
    for i in 0..3000 {
        assert!(
            take(&mut client, &format!("ip-{i}"), 5, "1 second"),
            "call {i}"
        );
    }
    // Its window is still open: evicting it would have let this through.
    assert!(!take(&mut client, "kept", 1, "1 hour"));
    assert!(started_at.elapsed() < Duration::from_secs(60));
    drop(client);
    cluster(&["stop", dir, port]);
}

/// Verification analytics (SPEC §8) are exact under concurrency and across a clean restart: 8
/// connections make known numbers of VALID (verify_key at two costs, verify_token,
/// authenticate), NOT_FOUND and RATE_LIMITED calls (and mint tokens, which are not counted);
/// right after, the server is stopped cleanly and started again, and verification_stats holds
/// exactly those counts and costs, in minutes, hours and days alike.
#[test]
fn verification_counts_are_exact_under_concurrency_and_across_a_clean_restart() {
    const DIR: &str = "/tmp/pg_apikeys_analytics";
    const PORT: &str = "55445";
    const THREADS: usize = 8;
    let (admin, app) = durable_cluster(DIR, PORT);
    drop(admin);
    let mut client = Client::connect(&app, NoTls).unwrap();
    let (plain_id, plain) = create(&mut client, "owner => 'tenant-a'");
    let (limited_id, limited) = create(
        &mut client,
        "owner => 'tenant-b', rate_limit_max => 5, rate_limit_window => '1 hour', rate_limit_algorithm => 'fixed'",
    );
    for _ in 0..5 {
        let code: String = client
            .query_one("SELECT code FROM apikeys.verify_key($1)", &[&limited])
            .unwrap()
            .get(0);
        assert_eq!(code, "VALID");
    }
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (app, plain, limited) = (app.clone(), plain.clone(), limited.clone());
            thread::spawn(move || {
                let mut c = Client::connect(&app, NoTls).unwrap();
                let code = |c: &mut Client, sql: &str, arg: &str| -> String {
                    c.query_one(sql, &[&arg]).unwrap().get(0)
                };
                let token: String = c
                    .query_one("SELECT apikeys.mint_token($1, 600000)", &[&plain])
                    .unwrap()
                    .get(0);
                for i in 0..50 {
                    assert_eq!(
                        code(&mut c, "SELECT code FROM apikeys.verify_key($1)", &plain),
                        "VALID"
                    );
                    if i % 5 == 0 {
                        assert_eq!(
                            code(
                                &mut c,
                                "SELECT code FROM apikeys.verify_key($1, cost => 3)",
                                &plain
                            ),
                            "VALID"
                        );
                        assert_eq!(
                            code(&mut c, "SELECT code FROM apikeys.verify_token($1)", &token),
                            "VALID"
                        );
                        assert_eq!(
                            code(&mut c, "SELECT code FROM apikeys.authenticate($1)", &plain),
                            "VALID"
                        );
                    }
                    if i % 5 < 3 {
                        let missing = format!("sk_missing{t}x{i}abcdefghijklmnopqrstuv");
                        assert_eq!(
                            code(&mut c, "SELECT code FROM apikeys.verify_key($1)", &missing),
                            "NOT_FOUND"
                        );
                    }
                    if i % 5 < 2 {
                        assert_eq!(
                            code(&mut c, "SELECT code FROM apikeys.verify_key($1)", &limited),
                            "RATE_LIMITED"
                        );
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    drop(client);
    // A clean restart at once: what shared memory held is written at shutdown.
    cluster(&["stop", DIR, PORT]);
    let restarted = cluster(&["start", DIR, PORT]);
    assert!(restarted.status.success(), "{restarted:?}");
    let mut client = Client::connect(&app, NoTls).unwrap();
    let n = THREADS as i64;
    let mut expected = vec![
        (String::new(), "NOT_FOUND".to_owned(), 30 * n, 0),
        (limited_id.clone(), "RATE_LIMITED".to_owned(), 20 * n, 0),
        (limited_id.clone(), "VALID".to_owned(), 5, 5),
        (plain_id.clone(), "VALID".to_owned(), 80 * n, 100 * n),
    ];
    expected.sort();
    for bucket in ["1 minute", "1 hour", "1 day"] {
        let mut rows: Vec<(String, String, i64, i64)> = client
            .query(
                "SELECT COALESCE(key_id, ''), code, sum(count)::bigint, sum(cost)::bigint
                   FROM apikeys.verification_stats(since => now() - '2 days'::interval,
                                                   until => now() + '1 day'::interval,
                                                   bucket => $1::text::interval)
                  GROUP BY 1, 2 ORDER BY 1, 2",
                &[&bucket],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        rows.sort();
        assert_eq!(rows, expected, "in buckets of {bucket}");
    }
    let owners: Vec<(Option<String>, i64)> = client
        .query(
            "SELECT owner, sum(count)::bigint FROM apikeys.verification_stats(until => now() + '1 day'::interval)
              GROUP BY 1 ORDER BY 1 NULLS FIRST",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        owners,
        [
            (None, 30 * n),
            (Some("tenant-a".into()), 80 * n),
            (Some("tenant-b".into()), 20 * n + 5)
        ]
    );
    drop(client);
    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
}
