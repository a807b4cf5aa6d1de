//! SPEC §7 under concurrency, against a real server (`make test-integration`): credits racing
//! with spends, identities' shared limits, named and standalone rate limits.

use postgres::Client;
use std::thread;
use std::time::Duration;

mod common;
use common::*;

fn valid(counts: &std::collections::BTreeMap<String, usize>) -> i64 {
    counts.get("VALID").copied().unwrap_or(0) as i64
}

/// update_credits('increment') from two sessions while eight others spend: every credit and
/// every spend counts, exactly once.
#[test]
fn credits_racing_with_spends_are_never_lost() {
    let mut client = connect();
    let (id, key) = create(&mut client, "remaining => 100");
    let adders: Vec<_> = (0..2)
        .map(|_| {
            let id = id.clone();
            thread::spawn(move || {
                let mut c = connect();
                for _ in 0..5 {
                    c.execute("SELECT apikeys.update_credits($1, 'increment', 10)", &[&id])
                        .unwrap();
                    thread::sleep(Duration::from_millis(3));
                }
            })
        })
        .collect();
    let counts = hammer(&key, 8, 40);
    for a in adders {
        a.join().unwrap();
    }
    let left = remaining(&mut client, &id);
    assert_eq!(
        valid(&counts) + left,
        100 + 2 * 5 * 10,
        "{counts:?}, {left} left"
    );
    // What is left is spent exactly, then nothing more.
    let counts = hammer(&key, 4, left as usize);
    assert_eq!(valid(&counts), left, "{counts:?}");
    assert_eq!(remaining(&mut client, &id), 0);
}

/// A credit rolled back with its transaction was never given.
#[test]
fn a_rolled_back_credit_is_no_credit() {
    let mut client = connect();
    let (id, key) = create(&mut client, "remaining => 2");
    let mut tx = client.transaction().unwrap();
    tx.execute(
        "SELECT apikeys.update_credits($1, 'increment', 100)",
        &[&id],
    )
    .unwrap();
    tx.rollback().unwrap();
    let counts = hammer(&key, 2, 5);
    assert_eq!(valid(&counts), 2, "{counts:?}");
    assert_eq!(remaining(&mut client, &id), 0);
}

/// A named limit chosen per call lets exactly its limit through, whatever the concurrency, and
/// an auto-applied one limits calls that do not name it.
#[test]
fn named_limits_are_exact_under_concurrency() {
    let mut client = connect();
    let (_, key) = create(
        &mut client,
        r#"ratelimits => '[{"name": "tokens", "limit": 60, "duration": "1 hour"},
                           {"name": "calls", "limit": 1000, "duration": "1 hour", "auto_apply": true}]'"#,
    );
    let counts = hammer_with(
        r#"SELECT code FROM apikeys.verify_key($1, ratelimits => '[{"name": "tokens", "cost": 3}]')"#,
        &key,
        8,
        25,
    );
    assert_eq!(valid(&counts), 20, "{counts:?}");
    assert_eq!(counts.get("RATE_LIMITED").copied(), Some(180), "{counts:?}");
    let (_, auto) = create(
        &mut client,
        r#"ratelimits => '[{"name": "calls", "limit": 37, "duration": "1 hour", "auto_apply": true}]'"#,
    );
    let counts = hammer(&auto, 8, 10);
    assert_eq!(valid(&counts), 37, "{counts:?}");
}

/// apikeys.ratelimit on one identifier from eight sessions lets exactly the limit through, in
/// READ ONLY transactions too; an override replaces the callers' limit.
#[test]
fn a_standalone_limit_is_exact_under_concurrency() {
    let mut client = connect();
    let ip = format!("203.0.113.{}", std::process::id() % 250);
    let counts = hammer_in_sessions(
        "SET default_transaction_read_only = on",
        "SELECT CASE WHEN success THEN 'VALID' ELSE 'RATE_LIMITED' END
           FROM apikeys.ratelimit('it-login', $1, 45, '1 hour')",
        &ip,
        8,
        10,
    );
    assert_eq!(valid(&counts), 45, "{counts:?}");
    client
        .execute(
            "SELECT apikeys.set_ratelimit_override('it-login', $1, 50, '1 hour')",
            &[&ip],
        )
        .unwrap();
    let counts = hammer_with(
        "SELECT CASE WHEN success THEN 'VALID' ELSE 'RATE_LIMITED' END
           FROM apikeys.ratelimit('it-login', $1, 1000, '1 hour')",
        &ip,
        4,
        5,
    );
    assert_eq!(valid(&counts), 5, "{counts:?}");
}

/// Two keys of one owner, eight sessions: exactly the identity's quota succeeds in total, and
/// the writer persists what is left.
#[test]
fn an_identitys_quota_is_exact_across_its_keys() {
    let mut client = connect();
    let owner = format!("tenant-{}", std::process::id());
    client
        .execute(
            "SELECT apikeys.create_identity($1, remaining => 70)",
            &[&owner],
        )
        .unwrap();
    let (_, a) = create(&mut client, &format!("owner => '{owner}'"));
    let (_, b) = create(
        &mut client,
        &format!("owner => '{owner}', remaining => 1000"),
    );
    let (a2, b2) = (a.clone(), b.clone());
    let other = thread::spawn(move || hammer(&b2, 4, 30));
    let counts = hammer(&a2, 4, 30);
    let counts_b = other.join().unwrap();
    assert_eq!(
        valid(&counts) + valid(&counts_b),
        70,
        "{counts:?} {counts_b:?}"
    );
    let left: i64 = client
        .query_one("SELECT remaining FROM apikeys.get_identity($1)", &[&owner])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    // Key b's own quota was spent only by its VALID calls.
    let b_left: i64 = client
        .query_one("SELECT remaining FROM apikeys.verify_key($1)", &[&b])
        .unwrap()
        .get(0);
    assert_eq!(b_left, 1000 - valid(&counts_b));
    // The writer commits the identity's quota (within its usual seconds).
    let mut written = None;
    for _ in 0..100 {
        written = client
            .query_opt(
                "SELECT m.remaining FROM apikeys.identity_meters m
                   JOIN apikeys.identities i ON i.id = m.identity_id WHERE i.owner = $1",
                &[&owner],
            )
            .unwrap()
            .and_then(|r| r.get::<_, Option<i64>>(0));
        if written == Some(0) {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(written, Some(0));
}

/// A refill due when many sessions call at once is applied once: exactly the refill amount
/// succeeds.
#[test]
fn a_refill_due_at_once_is_won_exactly_once() {
    let mut client = connect();
    let (_, key) = create(
        &mut client,
        "remaining => 0, refill_amount => 25, refill_interval => '2 seconds'",
    );
    thread::sleep(Duration::from_millis(2100));
    let counts = hammer(&key, 8, 5);
    assert_eq!(valid(&counts), 25, "{counts:?}");
    let owner = format!("refilled-{}", std::process::id());
    client
        .execute(
            "SELECT apikeys.create_identity($1, remaining => 0, refill_amount => 30, refill_interval => '2 seconds')",
            &[&owner],
        )
        .unwrap();
    let (_, k) = create(&mut client, &format!("owner => '{owner}'"));
    thread::sleep(Duration::from_millis(2100));
    let counts = hammer(&k, 8, 5);
    assert_eq!(valid(&counts), 30, "{counts:?}");
}

/// A change of an identity committed by one session reaches another session's next call (each
/// backend caches identities until a change commits).
#[test]
fn an_identity_change_reaches_other_sessions_at_their_next_call() {
    let mut admin = connect();
    let mut caller = connect();
    let owner = format!("cached-{}", std::process::id());
    admin
        .execute(
            "SELECT apikeys.create_identity($1, remaining => 1)",
            &[&owner],
        )
        .unwrap();
    let (_, key) = create(&mut admin, &format!("owner => '{owner}'"));
    let code = |c: &mut Client| -> String {
        c.query_one("SELECT code FROM apikeys.verify_key($1)", &[&key])
            .unwrap()
            .get(0)
    };
    assert_eq!(code(&mut caller), "VALID");
    assert_eq!(code(&mut caller), "USAGE_EXCEEDED");
    admin
        .execute(
            "SELECT apikeys.update_identity_credits($1, 'increment', 1)",
            &[&owner],
        )
        .unwrap();
    assert_eq!(code(&mut caller), "VALID");
    admin
        .execute(
            r#"SELECT apikeys.update_identity($1, clear => ARRAY['remaining'],
                   ratelimits => '[{"name": "calls", "limit": 1, "duration": "1 hour", "auto_apply": true}]')"#,
            &[&owner],
        )
        .unwrap();
    assert_eq!(code(&mut caller), "VALID");
    assert_eq!(code(&mut caller), "RATE_LIMITED");
    admin
        .execute("SELECT apikeys.delete_identity($1)", &[&owner])
        .unwrap();
    assert_eq!(code(&mut caller), "VALID");
}

/// A change of an identity rolled back is never seen, not even by the session that made it; a
/// session in a REPEATABLE READ transaction sees a change committed meanwhile from its next
/// transaction on.
#[test]
fn identity_changes_rolled_back_or_seen_from_an_old_snapshot_do_not_stick() {
    let mut admin = connect();
    let owner = format!("rolled-{}", std::process::id());
    admin
        .execute(
            "SELECT apikeys.create_identity($1, remaining => 2)",
            &[&owner],
        )
        .unwrap();
    let (_, key) = create(&mut admin, &format!("owner => '{owner}'"));
    let identity_left = |c: &mut Client| -> Option<i64> {
        c.query_one(
            "SELECT identity_remaining FROM apikeys.verify_key($1)",
            &[&key],
        )
        .unwrap()
        .get(0)
    };
    {
        let mut tx = admin.transaction().unwrap();
        tx.execute(
            "SELECT apikeys.update_identity($1, clear => ARRAY['remaining'])",
            &[&owner],
        )
        .unwrap();
        let unlimited: Option<i64> = tx
            .query_one(
                "SELECT identity_remaining FROM apikeys.verify_key($1)",
                &[&key],
            )
            .unwrap()
            .get(0);
        assert_eq!(unlimited, None, "the transaction sees its own change");
        tx.rollback().unwrap();
    }
    assert_eq!(identity_left(&mut admin), Some(1));
    let mut reader = connect();
    let mut tx = reader
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let before: Option<i64> = tx
        .query_one(
            "SELECT identity_remaining FROM apikeys.verify_key($1)",
            &[&key],
        )
        .unwrap()
        .get(0);
    assert_eq!(before, Some(0));
    admin
        .execute(
            "SELECT apikeys.update_identity($1, remaining => 100)",
            &[&owner],
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(identity_left(&mut reader), Some(99));
}

/// A row of verification_stats: key_id, owner, code, count, cost.
type Stat = (Option<String>, Option<String>, String, i64, i64);

/// SPEC §8: tallies reach `apikeys.verification_batches` within seconds; once their minute is
/// over, the writer adds them to the minute, hour and day counts (with the key's owner) and
/// deletes the batch — the stats are the same before and after.
#[test]
fn batches_of_minutes_that_are_over_are_compacted_into_minutes_hours_and_days() {
    let mut client = connect();
    let (id, _) = create(&mut client, "owner => 'compact-owner'");
    let (_, waker) = create(&mut client, "");
    // A batch as the writer leaves it, of a minute three hours ago: 3 VALID calls costing 5,
    // and 2 NOT_FOUND attempts.
    let minute: String = client
        .query_one(
            "SELECT date_trunc('minute', now() - '3 hours'::interval)::text",
            &[],
        )
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO apikeys.verification_batches (minute, key_ids, created, codes, counts, costs)
             SELECT $2::text::timestamptz, ARRAY[id, ''], ARRAY[created_at, NULL], '{VALID, NOT_FOUND}', '{3, 2}', '{5, 0}'
               FROM apikeys.keys WHERE id = $1",
            &[&id, &minute],
        )
        .unwrap();
    let stats = |c: &mut Client, bucket: &str, key: Option<&str>| -> Vec<Stat> {
        c.query(
            "SELECT key_id, owner, code, count, cost FROM apikeys.verification_stats(
                 key_id => $3, since => $2::text::timestamptz - '1 day'::interval,
                 until => $2::text::timestamptz + '1 day'::interval, bucket => $1::text::interval)
              WHERE bucket <= $2::text::timestamptz AND bucket > $2::text::timestamptz - $1::text::interval
              ORDER BY code",
            &[&bucket, &minute, &key],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
    };
    let valid = vec![(
        Some(id.clone()),
        Some("compact-owner".to_owned()),
        "VALID".to_owned(),
        3,
        5,
    )];
    let both = vec![(None, None, "NOT_FOUND".to_owned(), 2, 0), valid[0].clone()];
    assert_eq!(
        stats(&mut client, "1 minute", None),
        both,
        "read from the batch"
    );
    // Any verification brings a writer, which compacts within seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        client
            .query_one("SELECT apikeys.verify_key($1)", &[&waker])
            .unwrap();
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM apikeys.verification_batches WHERE minute = $1::text::timestamptz",
                &[&minute],
            )
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch was never compacted"
        );
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        stats(&mut client, "1 minute", None),
        both,
        "compacted into its minute"
    );
    for bucket in ["1 hour", "1 day"] {
        assert_eq!(
            stats(&mut client, bucket, Some(&id)),
            valid,
            "compacted, in buckets of {bucket}"
        );
    }
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM apikeys.verification_counts WHERE key_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 3, "one row in each of minute, hour and day");
}
