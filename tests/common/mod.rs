//! Helpers shared by the integration-test binaries: connections to the server that
//! `make test-integration` starts, keys, tokens and concurrent callers.
#![allow(dead_code)]

use postgres::{Client, NoTls};
use std::sync::{Arc, Barrier};
use std::thread;

pub const DB: &str = "pg_apikeys_it";

pub fn base_url() -> String {
    std::env::var("PG_APIKEYS_TEST_URL")
        .expect("PG_APIKEYS_TEST_URL must name a server with pg_apikeys installed (make test-integration sets it)")
}

/// A connection to the test database, created with the extension on first use.
pub fn connect() -> Client {
    let mut admin = Client::connect(&base_url(), NoTls).expect("connect to server");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DB])
        .unwrap()
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .unwrap();
    }
    let mut client = Client::connect(&format!("{} dbname={DB}", base_url()), NoTls).unwrap();
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_apikeys")
        .unwrap();
    client
}

pub fn create(client: &mut Client, args: &str) -> (String, String) {
    let row = client
        .query_one(
            &format!("SELECT id, key FROM apikeys.create_api_key({args})"),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// A token for `key`, lasting `ms`.
pub fn mint(client: &mut Client, key: &str, ms: i64) -> String {
    client
        .query_one("SELECT apikeys.mint_token($1, $2)", &[&key, &ms])
        .unwrap()
        .get(0)
}

/// verify_token(token).code
pub fn token_code(client: &mut Client, token: &str) -> String {
    client
        .query_one("SELECT code FROM apikeys.verify_token($1)", &[&token])
        .unwrap()
        .get(0)
}

/// What is left of a key's quota, as get_api_key reports it.
pub fn remaining(client: &mut Client, id: &str) -> i64 {
    client
        .query_one("SELECT remaining FROM apikeys.get_api_key($1)", &[&id])
        .unwrap()
        .get(0)
}

/// Runs `per_thread` verifications of `key` on each of `threads` connections at once and
/// returns how many came back with each code.
pub fn hammer(
    key: &str,
    threads: usize,
    per_thread: usize,
) -> std::collections::BTreeMap<String, usize> {
    hammer_with(
        "SELECT code FROM apikeys.verify_key($1)",
        key,
        threads,
        per_thread,
    )
}

/// `hammer` for any query that takes the credential as $1 and returns a code.
pub fn hammer_with(
    sql: &str,
    key: &str,
    threads: usize,
    per_thread: usize,
) -> std::collections::BTreeMap<String, usize> {
    hammer_in_sessions("", sql, key, threads, per_thread)
}

/// `hammer_with` on connections that first run `setup` (session settings).
pub fn hammer_in_sessions(
    setup: &str,
    sql: &str,
    key: &str,
    threads: usize,
    per_thread: usize,
) -> std::collections::BTreeMap<String, usize> {
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let key = key.to_owned();
            let sql = sql.to_owned();
            let setup = setup.to_owned();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut client = connect();
                client.batch_execute(&setup).unwrap();
                let stmt = client.prepare(&sql).unwrap();
                barrier.wait();
                (0..per_thread)
                    .map(|_| {
                        client
                            .query_one(&stmt, &[&key])
                            .unwrap()
                            .get::<_, String>(0)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut counts = std::collections::BTreeMap::new();
    for h in handles {
        for code in h.join().expect("verifier thread") {
            *counts.entry(code).or_insert(0) += 1;
        }
    }
    counts
}

/// Drops and creates database `name`.
pub fn recreate_database(admin: &mut Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
}

/// The SQLSTATE of a server error, or a text that matches none.
pub fn sqlstate(e: &postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// The installed version of the extension in `client`'s database.
pub fn extversion(client: &mut Client) -> String {
    client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_apikeys'",
            &[],
        )
        .unwrap()
        .get(0)
}
