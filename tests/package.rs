//! The Debian package `make package` builds: its contents, then installed with `dpkg -i` on this
//! machine (in place of what `make install` put there), used in a scratch cluster, and removed.
//! `make test-package` builds the package and sets PG_APIKEYS_DEB.

use postgres::{Client, NoTls};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

mod common;
use common::extversion;

const DIR: &str = "/tmp/pg_apikeys_package";
const PORT: &str = "55437";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs a command that must succeed; its standard output.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The PostgreSQL major the package is for (make test-package PG_MAJOR=NN; 15 by default).
fn major() -> String {
    std::env::var("PG_MAJOR").unwrap_or_else(|_| "15".into())
}

fn pg_config(what: &str) -> String {
    let bin =
        std::env::var("PG_BIN").unwrap_or_else(|_| format!("/usr/lib/postgresql/{}/bin", major()));
    run(&format!("{bin}/pg_config"), &[what]).trim().to_owned()
}

fn cluster(args: &[&str]) {
    run(
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh"),
        args,
    );
}

/// The upgrade scripts in sql/, which the package must ship.
fn upgrade_scripts() -> Vec<String> {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("pg_apikeys--") && n.ends_with(".sql"))
        .collect()
}

#[test]
fn the_debian_package_installs_works_and_removes_cleanly() {
    let deb = std::env::var("PG_APIKEYS_DEB")
        .expect("PG_APIKEYS_DEB must name the .deb (make test-package sets it)");
    let major = major();
    let package = format!("postgresql-{major}-pg-apikeys");
    let package = package.as_str();
    let arch = run("dpkg", &["--print-architecture"]).trim().to_owned();
    assert!(
        deb.ends_with(&format!("/{package}_{VERSION}_{arch}.deb")),
        "{deb}"
    );
    // Debian's layout for every major (for 15 it is also what pg_config says; the other majors'
    // servers, unpacked by scripts/setup.sh, read the same directories).
    let (lib, share) = (
        format!("/usr/lib/postgresql/{major}/lib"),
        format!("/usr/share/postgresql/{major}"),
    );
    assert_eq!(
        std::fs::canonicalize(&lib).unwrap(),
        std::fs::canonicalize(pg_config("--pkglibdir")).unwrap()
    );
    assert_eq!(
        std::fs::canonicalize(&share).unwrap(),
        std::fs::canonicalize(pg_config("--sharedir")).unwrap()
    );

    // Contents: the library, the control file, the install script of this version, every
    // upgrade script, and the documentation. Nothing else.
    let files: BTreeSet<String> = run("dpkg-deb", &["--contents", &deb])
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .unwrap()
                .trim_start_matches('.')
                .to_owned()
        })
        .collect();
    let mut expected: BTreeSet<String> = [
        format!("{lib}/pg_apikeys.so"),
        format!("{share}/extension/pg_apikeys.control"),
        format!("{share}/extension/pg_apikeys--{VERSION}.sql"),
        format!("/usr/share/doc/{package}/README.md"),
        format!("/usr/share/doc/{package}/CHANGELOG.md"),
        format!("/usr/share/doc/{package}/copyright"),
    ]
    .into();
    for script in upgrade_scripts() {
        expected.insert(format!("{share}/extension/{script}"));
    }
    assert_eq!(files, expected);
    let fields = run(
        "dpkg-deb",
        &["-f", &deb, "Package", "Version", "Architecture", "Depends"],
    );
    assert_eq!(
        fields,
        format!("Package: {package}\nVersion: {VERSION}\nArchitecture: {arch}\nDepends: postgresql-{major}, libc6, libgcc-s1\n")
    );
    // The library needs nothing that postgresql-15's own dependencies do not bring.
    let unpacked = std::env::temp_dir().join("pg_apikeys_deb");
    let _ = std::fs::remove_dir_all(&unpacked);
    run("dpkg-deb", &["-x", &deb, unpacked.to_str().unwrap()]);
    let dynamic = run(
        "readelf",
        &[
            "-d",
            unpacked
                .join(format!(".{lib}/pg_apikeys.so"))
                .to_str()
                .unwrap(),
        ],
    );
    for needed in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        assert!(
            [
                "libc.so.6",
                "libgcc_s.so.1",
                "libm.so.6",
                "ld-linux-x86-64.so.2"
            ]
            .iter()
            .any(|ok| needed.contains(&format!("[{ok}]"))),
            "unexpected dependency: {needed}"
        );
    }
    std::fs::remove_dir_all(&unpacked).unwrap();
    // The version agrees everywhere: Cargo.toml, the package, META.json, the control file.
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/META.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["version"], VERSION);
    assert_eq!(meta["provides"]["pg_apikeys"]["version"], VERSION);

    // Install it where make install had put the extension: remove those files first, so that
    // what the cluster loads can only come from the package.
    for dir in [format!("{share}/extension"), lib.clone()] {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("pg_apikeys")
            {
                std::fs::remove_file(entry.path()).unwrap();
            }
        }
    }
    // Only 15's server is a Debian package here; the other majors' servers were unpacked by
    // scripts/setup.sh, so dpkg cannot see that postgresql-NN is present.
    if major == "15" {
        run("dpkg", &["-i", &deb]);
    } else {
        run("dpkg", &["-i", "--force-depends", &deb]);
    }
    let status = run("dpkg-query", &["-W", "-f", "${Status} ${Version}", package]);
    assert_eq!(status, format!("install ok installed {VERSION}"));
    assert!(run("dpkg", &["-L", package]).contains(&format!("{lib}/pg_apikeys.so")));

    cluster(&["stop", DIR, PORT]);
    let _ = std::fs::remove_dir_all(DIR);
    cluster(&["start", DIR, PORT]);
    let mut client = Client::connect(
        &format!("host=127.0.0.1 port={PORT} user=postgres dbname=postgres"),
        NoTls,
    )
    .unwrap();
    let comment: String = client
        .query_one(
            "SELECT comment FROM pg_available_extensions WHERE name = 'pg_apikeys'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        comment,
        "API keys and key-derived JWTs managed inside PostgreSQL"
    );
    client.batch_execute("CREATE EXTENSION pg_apikeys").unwrap();
    assert_eq!(extversion(&mut client), VERSION);
    let key: String = client
        .query_one(
            "SELECT key FROM apikeys.create_api_key(owner => 'deb')",
            &[],
        )
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT (apikeys.verify_key($1)).code,
                    (apikeys.verify_token(apikeys.mint_token($1, 60000))).owner",
            &[&key],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("VALID".into(), "deb".into())
    );
    // Every released version can reach this one through the shipped upgrade scripts.
    let paths: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_extension_update_paths('pg_apikeys')
              WHERE target = $1 AND path IS NOT NULL",
            &[&VERSION],
        )
        .unwrap()
        .get(0);
    assert_eq!(paths as usize, upgrade_scripts().len());
    drop(client);
    cluster(&["stop", DIR, PORT]);
    std::fs::remove_dir_all(DIR).unwrap();

    run("dpkg", &["-r", package]);
    let status = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.contains("installed") || status.contains("not-installed"),
        "{status}"
    );
    for file in &expected {
        assert!(!Path::new(file).exists(), "{file} left behind");
    }
}
