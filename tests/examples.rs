//! The example programs in examples/ run against the test server, each in a database of its own:
//! they assert what they print, so a zero exit status means the walkthrough held.
//! `make test-integration` installs their dependencies (.venv, examples/node/node_modules).

use postgres::{Client, NoTls};
use std::process::Command;

mod common;
use common::{base_url, recreate_database};

/// A postgresql:// URL for `dbname` on the test server (both psycopg and node-postgres read it).
fn database_url(dbname: &str) -> String {
    let setting = |name: &str| -> String {
        base_url()
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("{name} in PG_APIKEYS_TEST_URL"))
    };
    format!(
        "postgresql://{}@{}:{}/{dbname}",
        setting("user"),
        setting("host"),
        setting("port")
    )
}

/// Runs `program script` with DATABASE_URL set twice in a row (the examples are re-runnable);
/// returns the last standard output.
fn run_example(program: &str, script: &str, dbname: &str) -> String {
    let mut admin = Client::connect(&base_url(), NoTls).unwrap();
    recreate_database(&mut admin, dbname);
    let mut stdout = String::new();
    for _ in 0..2 {
        let out = Command::new(program)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/").to_owned() + script)
            .env("DATABASE_URL", database_url(dbname))
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    admin
        .batch_execute(&format!("DROP DATABASE {dbname}"))
        .unwrap();
    stdout
}

#[test]
fn the_python_example_runs() {
    let python = std::env::var("PG_APIKEYS_PYTHON").expect(
        "PG_APIKEYS_PYTHON must name a Python with psycopg (make test-integration sets it)",
    );
    let out = run_example(&python, "python/quickstart.py", "pg_apikeys_example_py");
    assert!(out.contains("verify_token: VALID"), "{out}");
    assert!(out.contains("acme sees: ['anvil', 'rocket']"), "{out}");
    assert!(out.ends_with("python example: ok\n"), "{out}");
}

#[test]
fn the_node_example_runs() {
    let out = run_example("node", "node/quickstart.js", "pg_apikeys_example_js");
    assert!(out.contains("verify_token: VALID"), "{out}");
    assert!(out.contains(r#"acme sees: ["anvil","rocket"]"#), "{out}");
    assert!(out.ends_with("node example: ok\n"), "{out}");
}
