//! Signing keys for tokens: generated here, kept in `apikeys.signing_keys` (never readable by
//! PUBLIC), rotated and retired by management functions, published as a JWK set for outside
//! verifiers. The newest unretired key signs; every unretired key verifies.

use crate::{audit, errors, key_format, plans};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use rand::rngs::OsRng;
use rand::RngCore;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The algorithms we sign with, by their JWT names.
pub const ALGORITHMS: &[Algorithm] = &[Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA];

pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    let name = name.trim();
    ALGORITHMS
        .iter()
        .copied()
        .find(|a| name.eq_ignore_ascii_case(name_of(*a)))
        .or_else(|| {
            name.eq_ignore_ascii_case("Ed25519")
                .then_some(Algorithm::EdDSA)
        })
}

pub fn name_of(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "HS256",
    }
}

/// A new key: the secret (HMAC bytes, or a PKCS#8 DER private key) and, for asymmetric
/// algorithms, the public JWK that `jwks()` publishes.
pub struct Material {
    pub secret: Vec<u8>,
    pub public_jwk: Option<Value>,
}

pub fn generate(alg: Algorithm, kid: &str) -> Result<Material, String> {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let secret = match alg {
        Algorithm::ES256 => p256::ecdsa::SigningKey::random(&mut OsRng)
            .to_pkcs8_der()
            .map_err(|e| e.to_string())?
            .as_bytes()
            .to_vec(),
        // PKCS#8 v1 (no public key inside), the 48-byte form jsonwebtoken reads.
        Algorithm::EdDSA => ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: ed25519_dalek::SigningKey::generate(&mut OsRng).to_bytes(),
            public_key: None,
        }
        .to_pkcs8_der()
        .map_err(|e| e.to_string())?
        .as_bytes()
        .to_vec(),
        _ => {
            // 256 bits, as RFC 7518 asks of an HS256 key.
            let mut bytes = vec![0u8; 32];
            OsRng.fill_bytes(&mut bytes);
            bytes
        }
    };
    let public_jwk = match alg {
        Algorithm::HS256 => None,
        _ => Some(public_jwk(alg, kid, &secret)?),
    };
    Ok(Material { secret, public_jwk })
}

fn public_jwk(alg: Algorithm, kid: &str, secret: &[u8]) -> Result<Value, String> {
    let mut jwk =
        Jwk::from_encoding_key(&encoding_key(alg, secret), alg).map_err(|e| e.to_string())?;
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    serde_json::to_value(jwk).map_err(|e| e.to_string())
}

pub fn encoding_key(alg: Algorithm, secret: &[u8]) -> EncodingKey {
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_der(secret),
        Algorithm::EdDSA => EncodingKey::from_ed_der(secret),
        _ => EncodingKey::from_secret(secret),
    }
}

pub fn decoding_key(
    alg: Algorithm,
    secret: &[u8],
    public_jwk: Option<&Value>,
) -> Option<DecodingKey> {
    match alg {
        Algorithm::HS256 => Some(DecodingKey::from_secret(secret)),
        _ => {
            let jwk: Jwk = serde_json::from_value(public_jwk?.clone()).ok()?;
            DecodingKey::from_jwk(&jwk).ok()
        }
    }
}

/// The key that signs new tokens.
pub struct Signer {
    pub kid: String,
    pub alg: Algorithm,
    pub key: Rc<EncodingKey>,
}

const CURRENT_SQL: &str = "SELECT kid, algorithm, secret FROM apikeys.signing_keys
    WHERE retired_at IS NULL ORDER BY created_at DESC, kid DESC LIMIT 1";

thread_local! {
    // Parsed key material by kid. A kid names one key for good (its row never changes but for
    // retired_at, which every use still reads), and parsing a PKCS#8 key per token is not free.
    static ENCODING: RefCell<HashMap<String, Rc<EncodingKey>>> = RefCell::new(HashMap::new());
    static DECODING: RefCell<HashMap<String, Rc<DecodingKey>>> = RefCell::new(HashMap::new());
}

/// The cached value for `kid`, or `make()`'s (cached when it is Some).
fn cached<K: Clone>(
    cache: &'static std::thread::LocalKey<RefCell<HashMap<String, K>>>,
    kid: &str,
    make: impl FnOnce() -> Option<K>,
) -> Option<K> {
    if let Some(hit) = cache.with(|c| c.borrow().get(kid).cloned()) {
        return Some(hit);
    }
    let made = make()?;
    cache.with(|c| c.borrow_mut().insert(kid.to_owned(), made.clone()));
    Some(made)
}

/// An unretired signing key as minting and verification read it; key material only where
/// asked for (it is parsed once per kid and cached).
struct Live {
    kid: String,
    alg: Option<Algorithm>,
    created_us: i64,
    secret: Option<Vec<u8>>,
    public_jwk: Option<Value>,
}

/// The signing keys that are not retired, read without SPI through the partial index over
/// unretired keys (`scan`): retired keys, however many, are never read, and retirement is seen
/// by the next mint or verification in any session.
fn live_keys(material_for: impl Fn(&str) -> bool, snapshot: crate::scan::Snapshot) -> Vec<Live> {
    fn get<T: FromDatum>(v: (pg_sys::Datum, bool)) -> Option<T> {
        // SAFETY: `scan` hands out datums of a deformed tuple of signing_keys while it is held;
        // T is the column's type (the column list below names each).
        unsafe { T::from_datum(v.0, v.1) }
    }
    let columns = [
        c"kid",
        c"algorithm",
        c"created_at",
        c"retired_at",
        c"secret",
        c"public_jwk",
    ];
    crate::scan::scan(
        c"signing_keys",
        Some(c"signing_keys_live_idx"),
        &columns,
        snapshot,
        |column| {
            if !column(3).1 {
                return None;
            }
            let kid: String = get(column(0))?;
            let material = material_for(&kid);
            Some(Live {
                alg: get::<String>(column(1)).and_then(|a| parse_algorithm(&a)),
                created_us: get::<TimestampWithTimeZone>(column(2))
                    .map_or(i64::MIN, |t| t.into_inner()),
                secret: if material { get(column(4)) } else { None },
                public_jwk: if material {
                    get::<JsonB>(column(5)).map(|j| j.0)
                } else {
                    None
                },
                kid,
            })
        },
    )
}

/// The newest unretired key (ties broken by kid, as `ORDER BY created_at DESC, kid DESC`).
fn current(snapshot: crate::scan::Snapshot) -> Option<Signer> {
    let newest = live_keys(
        |kid| !ENCODING.with(|c| c.borrow().contains_key(kid)),
        snapshot,
    )
    .into_iter()
    .max_by(|a, b| (a.created_us, &a.kid).cmp(&(b.created_us, &b.kid)))?;
    let alg = newest.alg?;
    let key = cached(&ENCODING, &newest.kid, || {
        Some(Rc::new(encoding_key(alg, newest.secret.as_deref()?)))
    })?;
    Some(Signer {
        kid: newest.kid,
        alg,
        key,
    })
}

/// The current signing key. A database without one gets an HS256 key at its first mint, so
/// tokens work right after CREATE EXTENSION.
pub fn signer() -> Signer {
    use crate::scan::Snapshot;
    if let Some(signer) = current(Snapshot::Statement) {
        return signer;
    }
    // SAFETY: reads of the server's and the transaction's state.
    if unsafe { pg_sys::RecoveryInProgress() || pg_sys::XactReadOnly } {
        errors::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "there is no signing key to mint tokens with".into(),
            Some("Call apikeys.rotate_signing_key() once on the primary, in a read-write transaction."),
        );
    }
    if let Some(signer) = lock_for_first_key() {
        return signer;
    }
    // What a first mint that held the lock before us committed: the statement's snapshot
    // (and, in REPEATABLE READ, the transaction's) was taken before it and would not show it.
    if let Some(signer) = current(Snapshot::Latest) {
        return signer;
    }
    let kid =
        crate::owner::as_owner(|| Spi::connect_mut(|client| create(client, Algorithm::HS256)));
    current(Snapshot::Statement)
        .unwrap_or_else(|| errors::internal(Err(format!("signing key {kid} vanished"))))
}

/// The longest a first mint waits for another transaction that is creating the first key
/// (less when the caller's lock_timeout says so).
const FIRST_KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Two first mints at once must not both create a key, so the first key is created holding a
/// lock that only this code takes: an object lock on the extension itself (sub-object 1, so it
/// never meets DROP/ALTER EXTENSION's lock on the whole object). No SQL can take it (0.4.0's
/// advisory lock could be held forever by any role), and it blocks nothing else: not readers,
/// not `rotate_signing_key`. It lasts until the creating transaction ends, so a caller that keeps
/// its first mint's transaction open holds the other first mints back; they wait as a lock
/// would, but at most their lock_timeout (when set) and never longer than FIRST_KEY_WAIT, and
/// stop waiting as soon as any signing key is committed (a `rotate_signing_key()` by an admin
/// ends the wait for everyone). Returns that key when one appeared, None once the lock is held.
fn lock_for_first_key() -> Option<Signer> {
    // SAFETY: a catalog lookup by name inside a transaction; raises if the extension is gone.
    let extension = unsafe { pg_sys::get_extension_oid(c"pg_apikeys".as_ptr(), false) };
    // SAFETY: a plain read of the lock_timeout setting (milliseconds, 0 = none).
    let lock_timeout = unsafe { pg_sys::LockTimeout };
    let wait = match u64::try_from(lock_timeout) {
        Ok(ms) if ms > 0 => FIRST_KEY_WAIT.min(std::time::Duration::from_millis(ms)),
        _ => FIRST_KEY_WAIT,
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: an object lock taken inside a transaction and released when it ends.
        let locked = unsafe {
            pg_sys::ConditionalLockDatabaseObject(
                pg_sys::ExtensionRelationId,
                extension,
                1,
                pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
            )
        };
        if locked {
            return None;
        }
        if let Some(signer) = current(crate::scan::Snapshot::Latest) {
            return Some(signer);
        }
        if std::time::Instant::now() >= deadline {
            errors::raise(
                PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                "another transaction is creating the first signing key of this database".into(),
                Some("Retry when it has ended, or create the signing key once with apikeys.rotate_signing_key()."),
            );
        }
        // SAFETY: a 10 ms sleep; a cancel or terminate request is served right after it.
        unsafe { pg_sys::pg_usleep(10_000) };
        pgrx::check_for_interrupts!();
    }
}

/// The key a token's `kid` names, if it exists and is not retired.
pub fn verifier(kid: &str) -> Option<(Algorithm, Rc<DecodingKey>)> {
    let cached_already = DECODING.with(|c| c.borrow().contains_key(kid));
    let live = live_keys(
        |k| k == kid && !cached_already,
        crate::scan::Snapshot::Statement,
    )
    .into_iter()
    .find(|l| l.kid == kid)?;
    let alg = live.alg?;
    let key = cached(&DECODING, kid, || {
        decoding_key(alg, live.secret.as_deref()?, live.public_jwk.as_ref()).map(Rc::new)
    })?;
    Some((alg, key))
}

fn create(client: &mut SpiClient<'_>, alg: Algorithm) -> String {
    let kid = format!(
        "{}_{}",
        name_of(alg).to_ascii_lowercase(),
        key_format::random_id(12)
    );
    let material = errors::internal(generate(alg, &kid));
    plans::update(
        client,
        "INSERT INTO apikeys.signing_keys (kid, algorithm, secret, public_jwk, created_by)
         VALUES ($1, $2, $3, $4, $5)",
        None,
        &[
            kid.as_str().into(),
            name_of(alg).into(),
            material.secret.as_slice().into(),
            material.public_jwk.map(JsonB).into(),
            audit::actor().into(),
        ],
    );
    audit::record(
        client,
        "rotate_signing_key",
        None,
        json!({"kid": kid, "algorithm": name_of(alg)}),
    );
    kid
}

/// Creates a signing key and makes it the one new tokens are signed with; returns its kid.
/// Tokens signed by older keys keep verifying until those keys are retired.
/// `algorithm`: 'HS256' (default), 'ES256' or 'EdDSA' (Ed25519).
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_signing_key(algorithm: default!(Option<&str>, "'HS256'")) -> String {
    let name = algorithm.unwrap_or("HS256");
    let Some(alg) = parse_algorithm(name) else {
        errors::invalid_argument_hint(
            "algorithm",
            format!(
                "must be a supported JWT algorithm, got \"{}\"",
                errors::shown(name)
            ),
            "Use 'HS256', 'ES256' or 'EdDSA'.",
        )
    };
    Spi::connect_mut(|client| create(client, alg))
}

/// Retires a signing key: tokens it signed stop verifying at once and it signs no more.
/// Returns false when it was already retired; an unknown kid raises P0002.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn retire_signing_key(kid: Option<&str>) -> bool {
    let Some(kid) = kid else {
        errors::invalid_argument("kid", "must not be NULL")
    };
    Spi::connect_mut(|client| {
        let was = plans::update(
            client,
            "SELECT retired_at IS NULL FROM apikeys.signing_keys WHERE kid = $1 FOR UPDATE",
            Some(1),
            &[kid.into()],
        );
        let Some(active) = was.into_iter().next() else {
            errors::signing_key_not_found(kid)
        };
        if !errors::internal(active.get::<bool>(1)).unwrap_or(false) {
            return false;
        }
        plans::update(
            client,
            "UPDATE apikeys.signing_keys SET retired_at = clock_timestamp(), retired_by = $2
             WHERE kid = $1",
            None,
            &[kid.into(), audit::actor().into()],
        );
        audit::record(client, "retire_signing_key", None, json!({ "kid": kid }));
        true
    })
}

/// Deletes signing keys retired longer than `retired_before` ago (default 30 days) and returns
/// how many; tokens they signed then verify as NOT_FOUND. Unretired keys are never deleted.
/// Audited with the deleted kids.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn purge_signing_keys(retired_before: default!(Option<Interval>, "'30 days'")) -> i32 {
    let Some(retired_before) = retired_before else {
        errors::invalid_argument("retired_before", "must not be NULL")
    };
    let retired_before = crate::keys::check_duration("retired_before", retired_before, true);
    Spi::connect_mut(|client| {
        let kids: Vec<String> = plans::update(
            client,
            "DELETE FROM apikeys.signing_keys
              WHERE retired_at IS NOT NULL AND retired_at < clock_timestamp() - $1
              RETURNING kid",
            None,
            &[retired_before.into()],
        )
        .filter_map(|row| errors::internal(row.get::<String>(1)))
        .collect();
        if !kids.is_empty() {
            audit::record(client, "purge_signing_keys", None, json!({ "kids": kids }));
        }
        i32::try_from(kids.len()).unwrap_or(i32::MAX)
    })
}

/// The signing keys, newest first, without their secrets; `signs` marks the one that signs
/// new tokens.
// pgrx reads the result columns from this signature, so they cannot move to a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(security_definer, stable)]
#[search_path(pg_catalog, pg_temp)]
fn list_signing_keys() -> TableIterator<
    'static,
    (
        name!(kid, String),
        name!(algorithm, String),
        name!(signs, bool),
        name!(created_at, TimestampWithTimeZone),
        name!(created_by, String),
        name!(retired_at, Option<TimestampWithTimeZone>),
        name!(retired_by, Option<String>),
    ),
> {
    let rows = Spi::connect(|client| {
        let table = plans::select(
            client,
            &format!(
                "SELECT kid, algorithm, kid = (SELECT kid FROM ({CURRENT_SQL}) c), created_at,
                        created_by, retired_at, retired_by
                 FROM apikeys.signing_keys ORDER BY created_at DESC, kid DESC"
            ),
            None,
            &[],
        );
        table
            .into_iter()
            .map(|r| {
                errors::internal((|| -> pgrx::spi::SpiResult<_> {
                    Ok((
                        r.get::<String>(1)?.unwrap_or_default(),
                        r.get::<String>(2)?.unwrap_or_default(),
                        r.get::<bool>(3)?.unwrap_or(false),
                        r.get::<TimestampWithTimeZone>(4)?
                            .unwrap_or_else(TimestampWithTimeZone::negative_infinity),
                        r.get::<String>(5)?.unwrap_or_default(),
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })())
            })
            .collect::<Vec<_>>()
    });
    TableIterator::new(rows)
}

/// The public keys (ES256 and EdDSA) that verify our tokens, as a JWK set
/// (`{"keys": [...]}`, RFC 7517) for outside verifiers. Never contains a secret.
#[pg_extern(security_definer, stable, parallel_safe)]
#[search_path(pg_catalog, pg_temp)]
fn jwks() -> JsonB {
    // Through plans, like every other statement: it checks the schema by OID first.
    let keys = Spi::connect(|client| {
        let table = plans::select(
            client,
            "SELECT COALESCE(jsonb_agg(public_jwk ORDER BY created_at DESC, kid DESC), '[]')
             FROM apikeys.signing_keys WHERE retired_at IS NULL AND public_jwk IS NOT NULL",
            Some(1),
            &[],
        );
        errors::internal(table.first().get_one::<JsonB>())
    });
    JsonB(json!({ "keys": keys.map_or(json!([]), |k| k.0) }))
}

/// A signing key as a JWK, for an outside service that must verify our tokens: an HS256
/// key with its secret (`"k"`), an asymmetric key with its public part only. Audited.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn export_signing_key(kid: Option<&str>) -> JsonB {
    let Some(kid) = kid else {
        errors::invalid_argument("kid", "must not be NULL")
    };
    Spi::connect_mut(|client| {
        let table = plans::select(
            client,
            "SELECT algorithm, secret, public_jwk FROM apikeys.signing_keys WHERE kid = $1",
            Some(1),
            &[kid.into()],
        );
        let Some(row) = table.into_iter().next() else {
            errors::signing_key_not_found(kid)
        };
        let alg: String = errors::internal(row.get(1)).unwrap_or_default();
        let jwk = match errors::internal(row.get::<JsonB>(3)) {
            Some(public) => public.0,
            None => {
                use base64::Engine as _;
                let secret: Vec<u8> = errors::internal(row.get(2)).unwrap_or_default();
                let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
                json!({"kty": "oct", "k": k, "alg": alg, "kid": kid, "use": "sig"})
            }
        };
        audit::record(client, "export_signing_key", None, json!({ "kid": kid }));
        JsonB(jwk)
    })
}

#[cfg(test)]
mod unit {
    use super::*;
    use jsonwebtoken::{decode, encode, Header, Validation};

    #[test]
    fn algorithms_by_name() {
        assert_eq!(parse_algorithm("hs256"), Some(Algorithm::HS256));
        assert_eq!(parse_algorithm("ES256"), Some(Algorithm::ES256));
        assert_eq!(parse_algorithm("eddsa"), Some(Algorithm::EdDSA));
        assert_eq!(parse_algorithm("Ed25519"), Some(Algorithm::EdDSA));
        assert_eq!(parse_algorithm("none"), None);
        assert_eq!(parse_algorithm("RS256"), None);
    }

    #[test]
    fn generated_keys_sign_and_verify_and_publish_no_secret() {
        for &alg in ALGORITHMS {
            let m = generate(alg, "kid1").unwrap();
            let claims = json!({"sub": "x"});
            let token = encode(&Header::new(alg), &claims, &encoding_key(alg, &m.secret)).unwrap();
            let key = decoding_key(alg, &m.secret, m.public_jwk.as_ref()).unwrap();
            let mut v = Validation::new(alg);
            v.required_spec_claims.clear();
            v.validate_exp = false;
            assert_eq!(decode::<Value>(&token, &key, &v).unwrap().claims, claims);
            if let Some(jwk) = &m.public_jwk {
                assert_eq!(jwk["kid"], "kid1");
                assert!(jwk.get("d").is_none(), "{jwk}");
                // Another key of the same algorithm does not verify it.
                let other = generate(alg, "kid2").unwrap();
                let other = decoding_key(alg, &other.secret, other.public_jwk.as_ref()).unwrap();
                assert!(decode::<Value>(&token, &other, &v).is_err());
            }
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;
    use pgrx::JsonB;

    fn kid_of(token: &str) -> String {
        use base64::Engine as _;
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&h).unwrap()["kid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[pg_test]
    fn purge_deletes_keys_retired_long_enough_and_their_tokens_stop_verifying() {
        let (_, key) = create("");
        let old = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
        let token = mint(&key, "60000");
        let recent = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
        let live = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
        run(&format!("SELECT apikeys.retire_signing_key('{old}')"));
        run(&format!("SELECT apikeys.retire_signing_key('{recent}')"));
        run(&format!(
            "UPDATE apikeys.signing_keys SET retired_at = clock_timestamp() - interval '31 days' WHERE kid = '{old}'"
        ));
        assert_eq!(one::<i32>("SELECT apikeys.purge_signing_keys()"), Some(1));
        let kids =
            one::<Vec<String>>("SELECT array_agg(kid ORDER BY kid) FROM apikeys.signing_keys")
                .unwrap();
        assert!(!kids.contains(&old) && kids.contains(&recent) && kids.contains(&live));
        assert_eq!(token_code(&token, ""), "NOT_FOUND");
        assert_eq!(
            one::<String>(
                "SELECT details->'kids'->>0 FROM apikeys.audit_log WHERE action = 'purge_signing_keys'"
            ),
            Some(old)
        );
        // Zero purges every retired key, never a live one.
        assert_eq!(
            one::<i32>("SELECT apikeys.purge_signing_keys('0')"),
            Some(1)
        );
        assert_eq!(
            one::<i32>("SELECT apikeys.purge_signing_keys('0')"),
            Some(0)
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.signing_keys WHERE retired_at IS NULL"),
            Some(1)
        );
        assert_eq!(token_code(&mint(&key, "60000"), ""), "VALID");
        for bad in ["NULL", "'-1 day'"] {
            assert_error(
                &format!("SELECT apikeys.purge_signing_keys({bad})"),
                "22023",
                "retired_before",
            );
        }
    }

    #[pg_test]
    fn minting_and_verifying_read_only_unretired_signing_keys() {
        let (_, key) = create("");
        for _ in 0..50 {
            let kid = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
            run(&format!("SELECT apikeys.retire_signing_key('{kid}')"));
        }
        let live = one::<String>("SELECT apikeys.rotate_signing_key()").unwrap();
        let mut read = 0;
        let kids = crate::scan::scan(
            c"signing_keys",
            Some(c"signing_keys_live_idx"),
            &[c"kid"],
            crate::scan::Snapshot::Statement,
            |column| {
                read += 1;
                // SAFETY: the scan hands out the kid column of a signing_keys tuple.
                unsafe { String::from_datum(column(0).0, column(0).1) }
            },
        );
        assert_eq!((read, kids), (1, vec![live]));
        assert_eq!(token_code(&mint(&key, "60000"), ""), "VALID");
    }

    #[pg_test]
    fn rotation_signs_with_the_new_key_and_old_tokens_keep_verifying() {
        let (_, key) = create("");
        let old = mint(&key, "60000");
        for alg in ["ES256", "EdDSA", "HS256"] {
            let kid =
                one::<String>(&format!("SELECT apikeys.rotate_signing_key('{alg}')")).unwrap();
            assert!(kid.starts_with(&alg.to_ascii_lowercase()), "{kid}");
            let token = mint(&key, "60000");
            assert_eq!(kid_of(&token), kid);
            assert_eq!(token_code(&token, ""), "VALID");
        }
        assert_eq!(token_code(&old, ""), "VALID");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM apikeys.audit_log WHERE action = 'rotate_signing_key'"
            ),
            Some(4)
        );
        assert_eq!(
            one::<String>("SELECT apikeys.rotate_signing_key()").map(|k| k.starts_with("hs256_")),
            Some(true)
        );
        assert_error(
            "SELECT apikeys.rotate_signing_key('none')",
            "22023",
            "\"algorithm\"",
        );
        assert_error(
            "SELECT apikeys.rotate_signing_key('RS256')",
            "22023",
            "\"algorithm\"",
        );
    }

    #[pg_test]
    fn retiring_a_signing_key_stops_its_tokens() {
        let (_, key) = create("");
        let old = mint(&key, "60000");
        let old_kid = kid_of(&old);
        let new_kid = one::<String>("SELECT apikeys.rotate_signing_key('ES256')").unwrap();
        let new = mint(&key, "60000");
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.retire_signing_key('{old_kid}')")),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT apikeys.retire_signing_key('{old_kid}')")),
            Some(false)
        );
        assert_eq!(token_code(&old, ""), "NOT_FOUND");
        assert_eq!(token_code(&new, ""), "VALID");
        // Retiring the current key: the next mint falls back to another active key, or makes one.
        run(&format!("SELECT apikeys.retire_signing_key('{new_kid}')"));
        assert_eq!(token_code(&new, ""), "NOT_FOUND");
        let fresh = mint(&key, "60000");
        assert!(kid_of(&fresh).starts_with("hs256_"));
        assert_eq!(token_code(&fresh, ""), "VALID");
        assert_error("SELECT apikeys.retire_signing_key('nope')", "P0002", "nope");
        assert_eq!(
            one::<String>("SELECT string_agg(kid || ':' || signs || ':' || (retired_at IS NOT NULL), ',' ORDER BY created_at) FROM apikeys.list_signing_keys()"),
            Some(format!("{old_kid}:false:true,{new_kid}:false:true,{}:true:false", kid_of(&fresh)))
        );
        assert_error(
            "SELECT apikeys.retire_signing_key(NULL)",
            "22023",
            "\"kid\"",
        );
        assert_eq!(
            one::<String>("SELECT string_agg(details->>'kid', ',' ORDER BY id) FROM apikeys.audit_log WHERE action = 'retire_signing_key'"),
            Some(format!("{old_kid},{new_kid}"))
        );
    }

    #[pg_test]
    fn jwks_publishes_public_keys_only() {
        let (_, key) = create("");
        mint(&key, "1000");
        let es = one::<String>("SELECT apikeys.rotate_signing_key('ES256')").unwrap();
        let ed = one::<String>("SELECT apikeys.rotate_signing_key('EdDSA')").unwrap();
        let set = one::<JsonB>("SELECT apikeys.jwks()").unwrap().0;
        let keys = set["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2, "{set}");
        assert_eq!(keys[0]["kid"], ed.as_str());
        assert_eq!(keys[0]["kty"], "OKP");
        assert_eq!(keys[0]["crv"], "Ed25519");
        assert_eq!(keys[0]["alg"], "EdDSA");
        assert_eq!(keys[1]["kid"], es.as_str());
        assert_eq!(keys[1]["kty"], "EC");
        assert_eq!(keys[1]["crv"], "P-256");
        assert_eq!(keys[1]["alg"], "ES256");
        for k in keys {
            assert_eq!(k["use"], "sig");
            assert!(k.get("d").is_none() && k.get("k").is_none(), "{k}");
        }
        run(&format!("SELECT apikeys.retire_signing_key('{es}')"));
        assert_eq!(
            one::<i64>("SELECT jsonb_array_length(apikeys.jwks()->'keys')::bigint"),
            Some(1)
        );
    }

    #[pg_test]
    fn exporting_an_hs256_key_gives_its_secret_and_is_audited() {
        let kid = one::<String>("SELECT apikeys.rotate_signing_key('HS256')").unwrap();
        let jwk = one::<JsonB>(&format!("SELECT apikeys.export_signing_key('{kid}')"))
            .unwrap()
            .0;
        assert_eq!(jwk["kty"], "oct");
        assert_eq!(jwk["alg"], "HS256");
        assert_eq!(jwk["kid"], kid.as_str());
        assert_eq!(
            one::<bool>(&format!(
                "SELECT secret = decode(translate('{}', '-_', '+/') || '=', 'base64') FROM apikeys.signing_keys WHERE kid = '{kid}'",
                jwk["k"].as_str().unwrap()
            )),
            Some(true)
        );
        let es = one::<String>("SELECT apikeys.rotate_signing_key('ES256')").unwrap();
        let public = one::<JsonB>(&format!("SELECT apikeys.export_signing_key('{es}')"))
            .unwrap()
            .0;
        assert!(public.get("d").is_none() && public["kty"] == "EC");
        assert_eq!(
            one::<i64>(
                "SELECT count(*) FROM apikeys.audit_log WHERE action = 'export_signing_key'"
            ),
            Some(2)
        );
        assert_error("SELECT apikeys.export_signing_key('nope')", "P0002", "nope");
    }

    #[pg_test]
    fn public_verifies_and_mints_but_never_sees_signing_keys() {
        let (_, key) = create("");
        let token = mint(&key, "60000");
        let kid = kid_of(&token);
        run("CREATE ROLE token_public");
        run("SET LOCAL ROLE token_public");
        assert_eq!(token_code(&token, ""), "VALID");
        assert_eq!(token_code(&mint(&key, "1000"), ""), "VALID");
        assert!(one::<JsonB>("SELECT apikeys.jwks()").is_some());
        for denied in [
            "SELECT * FROM apikeys.signing_keys".to_owned(),
            "SELECT apikeys.rotate_signing_key()".to_owned(),
            format!("SELECT apikeys.retire_signing_key('{kid}')"),
            format!("SELECT apikeys.export_signing_key('{kid}')"),
            "SELECT * FROM apikeys.list_signing_keys()".to_owned(),
        ] {
            assert_error(&denied, "42501", "permission denied");
        }
        run("RESET ROLE");
        assert_eq!(
            one::<bool>("SELECT 'apikeys.signing_keys'::regclass::oid = ANY(extconfig) FROM pg_extension WHERE extname = 'pg_apikeys'"),
            Some(true)
        );
    }
}
