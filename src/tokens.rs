//! Tokens: JWTs minted from an API key, carrying its access for `ms` milliseconds, and their
//! verification. A token is only as good as its key: verify_token judges the key behind it
//! with verify_key's checks, so revoking, disabling, deleting or expiring a key kills its tokens.

use crate::addresses::Client;
use crate::jsonb::{self, Jsonb};
use crate::verify::{self, Code, Lookup, Token, Verification};
use crate::{claims, durations, errors, guc, key_format, permissions, signing};
use jsonwebtoken::{decode, decode_header, encode, Algorithm, Header, Validation};
use pgrx::prelude::*;
use serde_json::Value;
use sha2::Digest;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

fn invalid_credential(message: String, hint: Option<&str>) -> ! {
    errors::raise(
        PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        message,
        hint,
    )
}

/// `ms` as mint_token accepts it: positive and within `apikeys.max_token_ttl`.
fn checked_ms(ms: Option<i64>) -> i64 {
    let Some(ms) = ms else {
        errors::invalid_argument("ms", "must not be NULL")
    };
    durations::check_ms(ms, guc::max_token_ttl_ms()).unwrap_or_else(|refused| {
        let hint = refused
            .is_too_long()
            .then_some("A superuser can raise apikeys.max_token_ttl.");
        errors::raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("argument \"ms\" {}", refused.0),
            hint,
        )
    })
}

/// The key that mints: an API key (never a token) that verifies as VALID, charged one use.
fn minting_key(key: Option<&str>) -> Verification {
    let Some(key) = key else {
        invalid_credential("argument \"key\" must be an API key, got NULL".into(), None)
    };
    if claims::looks_like_token(key) {
        invalid_credential(
            "argument \"key\" is a token, and a token cannot mint tokens".into(),
            Some("Mint with the API key the token came from."),
        );
    }
    let minter = verify::verify(Some(key), &verify::Request::plain(1));
    if minter.code != Code::Valid {
        let which = minter
            .key_id
            .as_deref()
            .map(|id| format!(" (API key \"{}\")", errors::shown(id)))
            .unwrap_or_default();
        invalid_credential(
            format!(
                "argument \"key\" is not a valid API key: {}{which}",
                minter.code.as_str()
            ),
            minter.code.hint(),
        );
    }
    minter
}

/// The key the token is for: the minter itself, or (for a master key only) the valid key
/// that `for_key` names.
fn token_key(minter: Verification, for_key: Option<&str>) -> Verification {
    let minter_id = minter.key_id.clone().unwrap_or_default();
    let Some(id) = for_key.filter(|id| *id != minter_id) else {
        return minter;
    };
    if !minter.master {
        errors::raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "API key \"{minter_id}\" is not a master key and may mint tokens only for itself, not for \"{}\"",
                errors::shown(id)
            ),
            Some("Mint with a key created with master => true, or leave for_key NULL."),
        );
    }
    let target = verify::peek(id);
    match target.code {
        Code::Valid => Verification {
            now: minter.now,
            ..target
        },
        Code::NotFound => errors::key_not_found(id),
        code => invalid_credential(
            format!(
                "API key \"{}\" named by argument \"for_key\" is not valid: {}",
                errors::shown(id),
                code.as_str()
            ),
            code.hint(),
        ),
    }
}

/// Mints a token for `for_key` (default: the key itself) with `key`'s authority. Arguments are
/// checked before the key, so a bad argument is an argument error even with a bad key.
pub fn mint(
    key: Option<&str>,
    ms: Option<i64>,
    for_key: Option<&str>,
    custom: Option<&Value>,
) -> String {
    let ms = checked_ms(ms);
    let custom = custom
        .map(|c| claims::check_custom(c).unwrap_or_else(|p| errors::invalid_argument("claims", p)));
    let target = token_key(minting_key(key), for_key);
    let now_ms = target.now.map_or_else(wall_clock_ms, verify::epoch_ms);
    let key_id = target.key_id.as_deref().unwrap_or_default();
    let issuer = guc::jwt_issuer();
    let audience = guc::jwt_audience();
    let permissions = target
        .permissions
        .as_ref()
        .map_or_else(|| Value::Object(Default::default()), |p| p.value());
    let grant = claims::Grant {
        key_id,
        key_created_us: target.created_us,
        owner: target.owner.as_deref(),
        role: target.role.as_deref(),
        permissions: &permissions,
        now_ms,
        exp_ms: claims::expiry(now_ms, ms, target.expires_at.map(verify::epoch_ms)),
        jti: key_format::random_id(16),
        issuer: &issuer,
        audience: audience.as_deref(),
    };
    let payload = claims::build(&grant, custom);
    let signer = signing::signer();
    let mut header = Header::new(signer.alg);
    header.kid = Some(signer.kid);
    let token = errors::internal(encode(&header, &payload, &signer.key));
    if token.len() > claims::MAX_TOKEN_BYTES {
        errors::raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "the token would be {} bytes, more than the {} verify_token accepts",
                token.len(),
                claims::MAX_TOKEN_BYTES
            ),
            Some("Give the key fewer permissions or the token fewer custom claims."),
        );
    }
    token
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A token this backend has checked: signed by `kid` with `alg`, its claims accepted under
/// these issuer and audience settings.
struct Seen {
    kid: String,
    alg: Algorithm,
    issuer: String,
    audience: Option<String>,
    token: Rc<Token>,
}

/// Fixed cost of an entry besides its claims: the digest, the map's slot, `Seen` and `Token`
/// with their short strings and the allocator's headers (measured at ~250 bytes; rounded up).
const ENTRY_OVERHEAD: usize = 320;

impl Seen {
    /// What this entry holds in memory, as the cache counts it against its bound.
    fn bytes(&self) -> usize {
        let permissions: usize = self
            .token
            .permissions
            .iter()
            .map(|(resource, actions)| {
                resource.len() + actions.iter().map(|a| a.len() + 24).sum::<usize>() + 64
            })
            .sum();
        ENTRY_OVERHEAD
            + self.kid.len()
            + self.issuer.len()
            + self.audience.as_ref().map_or(0, String::len)
            + self.token.key_id.len()
            + self.token.claims.len()
            + permissions
    }
}

/// Checked tokens by the SHA-256 of their text, bounded by `apikeys.token_cache_size` entries
/// and `apikeys.token_cache_memory` bytes (emptied when either would be passed).
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Seen>,
    bytes: usize,
}

impl Cache {
    fn clear(&mut self) {
        self.entries = HashMap::new();
        self.bytes = 0;
    }

    fn insert(&mut self, digest: [u8; 32], seen: Seen, max_entries: usize, max_bytes: usize) {
        let size = seen.bytes();
        if size > max_bytes || max_entries == 0 {
            return;
        }
        if self.entries.len() >= max_entries || self.bytes + size > max_bytes {
            self.clear();
        }
        if let Some(old) = self.entries.insert(digest, seen) {
            self.bytes -= old.bytes();
        }
        self.bytes += size;
    }
}

thread_local! {
    /// A hit skips only what the same bytes cannot change: the signature, the parsing, the
    /// claims' encoding (together a third of verify_token, perf). What can change is checked on
    /// every use: that the signing key is still unretired, the issuer and audience settings, and
    /// (in `judge`) the key behind the token and the token's expiry. An accepted nbf stays past.
    static SEEN: RefCell<Cache> = RefCell::new(Cache::default());
}

/// The token's claims if it is one we signed and still accept; None for anything else. Never
/// raises and never panics on any input.
fn checked(token: &str) -> Option<Rc<Token>> {
    if token.is_empty() || token.len() > claims::MAX_TOKEN_BYTES {
        return None;
    }
    let issuer = guc::jwt_issuer();
    let audience = guc::jwt_audience();
    let (max_entries, max_bytes) = (guc::token_cache_size(), guc::token_cache_bytes());
    let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
    let seen = SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        if max_entries == 0 || max_bytes == 0 {
            seen.clear();
        }
        let entry = seen.entries.get(&digest)?;
        (entry.issuer == issuer && entry.audience == audience)
            .then(|| (entry.kid.clone(), entry.alg, Rc::clone(&entry.token)))
    });
    if let Some((kid, alg, token)) = seen {
        return signing::verifier(&kid)
            .filter(|(live, _)| *live == alg)
            .map(|_| token);
    }
    let (kid, alg, checked) = signed_claims(token, &issuer, audience.as_deref())?;
    let checked = Rc::new(checked);
    let entry = Seen {
        kid,
        alg,
        issuer,
        audience,
        token: Rc::clone(&checked),
    };
    SEEN.with(|seen| {
        seen.borrow_mut()
            .insert(digest, entry, max_entries, max_bytes)
    });
    Some(checked)
}

/// Checks a token's signature and claims from scratch: the signing key its `kid` names, the
/// algorithm that key has, and the claims under `issuer` and `audience`.
fn signed_claims(
    token: &str,
    issuer: &str,
    audience: Option<&str>,
) -> Option<(String, Algorithm, Token)> {
    let header = decode_header(token).ok()?;
    let kid = header.kid?;
    let (alg, key) = signing::verifier(&kid)?;
    // The signing key decides the algorithm, never the token: no `none`, no HS256 made
    // with a public key as its secret.
    if header.alg != alg {
        return None;
    }
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    let data = std::panic::catch_unwind(|| decode::<Value>(token, &key, &validation))
        .ok()?
        .ok()?;
    let presented = claims::check(&data.claims, wall_clock_ms(), issuer, audience).ok()?;
    let permissions = permissions::parse(&presented.permissions).ok()?;
    let token = Token {
        key_created_us: presented.key_created_us,
        exp_ms: presented.exp_ms,
        granted: Jsonb::encode(&permissions::to_json(&permissions)),
        permissions,
        claims: Jsonb::encode(&data.claims),
        key_id: presented.key_id,
    };
    Some((kid, alg, token))
}

pub fn verify_token_str(token: Option<&str>, request: &verify::Request) -> Verification {
    match token.and_then(checked) {
        Some(token) => verify::judge(Lookup::Id(&token.key_id), request, Some(&token)),
        None => Verification::not_found(),
    }
}

/// Mints a JWT that carries the access of an API key for `ms` milliseconds (never beyond the
/// key's own expiry). `key` must verify as VALID and is charged like a verification; only a
/// master key may name another key in `for_key`. `claims` adds custom claims (not the
/// reserved ones). Raises 28000 for an invalid key or a token as `key`, 42501 for minting for
/// another key without a master key, 22023 for bad arguments. Runs with the caller's rights,
/// like verify_key: reads go through `lookup`, writes (charging a metered key, the first
/// signing key) run as the tables' owner.
#[pg_extern(volatile)]
fn mint_token(
    key: Option<&str>,
    ms: Option<i64>,
    for_key: default!(Option<&str>, "NULL"),
    claims: default!(Option<Jsonb>, "NULL"),
) -> String {
    let claims = jsonb::argument("claims", claims);
    mint(key, ms, for_key, claims.as_ref())
}

/// Verifies a token minted by mint_token: signature (the algorithm is the signing key's),
/// expiry to the millisecond, nbf, iss and aud, then the key behind it with every verify_key
/// check (its allow-list against `client_ip` included), charging `cost` to its quota and rate
/// limit. Never raises for a bad token. Runs with the caller's rights, like verify_key.
#[pg_extern(volatile, name = "verify_token")]
fn verify_token_from(
    token: Option<&str>,
    required: default!(Option<Jsonb>, "NULL"),
    cost: default!(Option<i32>, 1),
    ratelimits: default!(Option<Jsonb>, "NULL"),
    client_ip: default!(Option<pgrx::datum::Inet>, "NULL"),
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let client = Client::from_arg(client_ip.as_ref());
    verified(
        token,
        verify::Request::from_args(required, cost, ratelimits, client),
    )
}

/// verify_token as 0.7 declared it, for a database not updated yet (no SQL).
#[pg_extern(volatile, sql = false)]
fn verify_token_with_limits(
    token: Option<&str>,
    required: Option<Jsonb>,
    cost: Option<i32>,
    ratelimits: Option<Jsonb>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    let request = verify::Request::from_args(required, cost, ratelimits, Client::At(None));
    verified(token, request)
}

/// verify_token as 0.6 and earlier declared it, for a database not updated yet (no SQL).
#[pg_extern(volatile, sql = false)]
fn verify_token(
    token: Option<&str>,
    required: Option<Jsonb>,
    cost: Option<i32>,
) -> pgrx::composite_type!('static, "apikeys.verification") {
    verified(
        token,
        verify::Request::from_args(required, cost, None, Client::At(None)),
    )
}

fn verified(token: Option<&str>, request: verify::Request) -> verify::VerificationRow {
    verify::counted(verify_token_str(token, &request), &request).into_row()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    use pgrx::prelude::*;
    use serde_json::{json, Value};
    use sha2::Digest;

    fn payload(token: &str) -> Value {
        let part = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    fn header(token: &str) -> Value {
        let part = token.split('.').next().unwrap();
        serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
    }

    /// The token with one of its three parts replaced.
    fn with_part(token: &str, index: usize, part: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    fn encode_json(v: &Value) -> String {
        B64.encode(v.to_string())
    }

    #[pg_test]
    fn a_token_carries_its_keys_access_and_verifies() {
        run("CREATE ROLE token_reader");
        let (id, key) = create("owner => 'acme', name => 'svc', role => 'token_reader', permissions => '{\"orders\": [\"read\"]}', metadata => '{\"plan\": \"pro\"}'");
        let before = clock_ms();
        let token = mint(&key, "60000, claims => '{\"tenant\": \"t1\"}'");
        let after = clock_ms();
        let c = payload(&token);
        assert_eq!(c["sub"], "acme");
        assert_eq!(c["key_id"], id.as_str());
        assert_eq!(
            c["key_created_us"].as_i64(),
            one::<i64>(&format!("SELECT (extract(epoch FROM created_at) * 1000000)::bigint FROM apikeys.keys WHERE id = '{id}'"))
        );
        assert_eq!(c["role"], "token_reader");
        assert_eq!(c["permissions"], json!({"orders": ["read"]}));
        assert_eq!(c["iss"], "pg_apikeys");
        assert_eq!(c["tenant"], "t1");
        assert!(c.get("aud").is_none());
        assert!(c["jti"].as_str().is_some_and(|j| j.len() >= 16));
        let exp_ms = c["exp_ms"].as_i64().unwrap();
        assert!(
            before + 60000 <= exp_ms && exp_ms <= after + 60000,
            "{before} {exp_ms} {after}"
        );
        assert_eq!(c["exp"].as_i64().unwrap(), exp_ms.div_euclid(1000));
        assert!(c["iat"].as_i64().unwrap() * 1000 <= after);
        let h = header(&token);
        assert_eq!(h["alg"], "HS256");
        assert_eq!(h["typ"], "JWT");
        let kid = h["kid"].as_str().unwrap().to_owned();
        assert_eq!(
            one::<String>("SELECT kid FROM apikeys.signing_keys").as_deref(),
            Some(kid.as_str())
        );

        assert_eq!(token_code(&token, ""), "VALID");
        assert_eq!(
            token_field::<String>(&token, "", "key_id"),
            Some(id.clone())
        );
        assert_eq!(
            token_field::<String>(&token, "", "owner").as_deref(),
            Some("acme")
        );
        assert_eq!(
            token_field::<String>(&token, "", "role").as_deref(),
            Some("token_reader")
        );
        assert_eq!(
            token_field::<String>(&token, "", "metadata->>'plan'").as_deref(),
            Some("pro")
        );
        assert_eq!(
            token_field::<String>(&token, "", "claims->>'tenant'").as_deref(),
            Some("t1")
        );
        assert_eq!(
            token_field::<String>(&token, "", "claims->>'jti'").as_deref(),
            c["jti"].as_str()
        );
        assert_eq!(
            token_field::<i64>(
                &token,
                "",
                "floor(extract(epoch FROM expires_at) * 1000)::bigint"
            ),
            Some(exp_ms)
        );
        assert_eq!(token_code(&token, "'{\"orders\": [\"read\"]}'"), "VALID");
        assert_eq!(
            token_code(&token, "'{\"orders\": [\"write\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        // The first mint created the signing key, audited with the caller.
        assert_eq!(
            one::<String>(
                "SELECT actor FROM apikeys.audit_log WHERE action = 'rotate_signing_key'"
            )
            .as_deref(),
            one::<String>("SELECT current_user::text").as_deref()
        );
    }

    #[pg_test]
    fn a_token_is_valid_until_its_last_millisecond_and_expired_after() {
        let (_, key) = create("");
        // Long enough that even a loaded machine verifies it once before it runs out.
        let token = mint(&key, "3000");
        let exp_ms = payload(&token)["exp_ms"].as_i64().unwrap();
        assert_eq!(token_code(&token, ""), "VALID");
        // Skip to just before the end, then watch the last milliseconds closely.
        run(&format!(
            "SELECT pg_sleep(greatest(0, {exp_ms} - {} - 100) / 1000.0)",
            clock_ms()
        ));
        let mut expired = 0;
        while expired < 3 {
            let t0 = clock_ms();
            let code = token_code(&token, "");
            let t1 = clock_ms();
            match code.as_str() {
                "VALID" => {
                    assert!(t0 < exp_ms, "VALID at {t0} but exp_ms {exp_ms}");
                }
                "EXPIRED" => {
                    assert!(t1 >= exp_ms, "EXPIRED at {t1} before exp_ms {exp_ms}");
                    expired += 1;
                }
                other => panic!("unexpected {other}"),
            }
            assert!(t1 < exp_ms + 30_000, "never expired");
        }
        // After expiry the key itself is still valid and mints again.
        assert_eq!(code(&key, ""), "VALID");
    }

    #[pg_test]
    fn a_token_never_outlives_its_key() {
        let (id, key) = create("expires_in => '2 s'");
        let token = mint(&key, "60000");
        let key_end = one::<i64>(&format!(
            "SELECT floor(extract(epoch FROM expires_at) * 1000)::bigint FROM apikeys.keys WHERE id = '{id}'"
        ))
        .unwrap();
        assert_eq!(payload(&token)["exp_ms"].as_i64(), Some(key_end));
        let t0 = clock_ms();
        let before_end = token_code(&token, "");
        // Only meaningful while the key lives; a slow machine may already be past it.
        if t0 + 50 < key_end {
            assert_eq!(before_end, "VALID");
        }
        run(&format!(
            "SELECT pg_sleep(greatest(0, {key_end} - {}) / 1000.0 + 0.02)",
            clock_ms()
        ));
        assert_eq!(token_code(&token, ""), "EXPIRED");
        // A key shortened after minting shortens its tokens too.
        let (id, key) = create("");
        let token = mint(&key, "60000");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', expires_at => now() - interval '1 s')"
        ));
        assert_eq!(token_code(&token, ""), "EXPIRED");
    }

    #[pg_test]
    fn revoking_disabling_deleting_or_expiring_the_key_kills_its_tokens() {
        let (id, key) = create("");
        let token = mint(&key, "60000");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => false)"
        ));
        assert_eq!(token_code(&token, ""), "DISABLED");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', enabled => true)"
        ));
        assert_eq!(token_code(&token, ""), "VALID");
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(token_code(&token, ""), "REVOKED");
        assert_eq!(token_field::<bool>(&token, "", "valid"), Some(false));
        run(&format!("SELECT apikeys.delete_api_key('{id}')"));
        assert_eq!(token_code(&token, ""), "NOT_FOUND");
        assert_eq!(token_field::<String>(&token, "", "key_id"), None);
        // A new key that reuses the id does not bring the old key's tokens back.
        let (_, reborn) = create(&format!("id => '{id}'"));
        assert_eq!(token_code(&token, ""), "NOT_FOUND");
        assert_eq!(token_code(&mint(&reborn, "60000"), ""), "VALID");
        // Nor does rotating the key end them: rotation replaces the secret, not the key.
        let live = mint(&reborn, "60000");
        run(&format!("SELECT apikeys.rotate_api_key('{id}')"));
        assert_eq!(token_code(&live, ""), "VALID");
    }

    #[pg_test]
    fn tokens_are_charged_like_verifications() {
        let (id, key) = create("remaining => 4");
        let token = mint(&key, "60000");
        assert_eq!(token_field::<i64>(&token, "", "remaining"), Some(2));
        assert_eq!(token_code(&token, "cost => 5"), "USAGE_EXCEEDED");
        assert_eq!(
            token_field::<i64>(&token, "cost => 2", "remaining"),
            Some(0)
        );
        assert_eq!(token_code(&token, ""), "USAGE_EXCEEDED");
        assert_error(
            &format!("SELECT apikeys.mint_token('{key}', 1000)"),
            "28000",
            "USAGE_EXCEEDED",
        );
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(0)
        );
        let (_, key) = create("rate_limit_max => 2, rate_limit_window => '1 hour'");
        let token = mint(&key, "60000");
        assert_eq!(
            token_field::<i64>(&token, "", "rate_limit_remaining"),
            Some(0)
        );
        assert_eq!(token_code(&token, ""), "RATE_LIMITED");
    }

    #[pg_test]
    fn a_key_whose_permissions_shrink_does_not_lend_its_tokens_the_old_ones() {
        let (id, key) = create("permissions => '{\"orders\": [\"read\", \"write\"]}'");
        let token = mint(&key, "60000");
        assert_eq!(token_code(&token, "'{\"orders\": [\"write\"]}'"), "VALID");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"orders\": [\"read\"]}}')"
        ));
        assert_eq!(
            token_code(&token, "'{\"orders\": [\"write\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        assert_eq!(token_code(&token, "'{\"orders\": [\"read\"]}'"), "VALID");
        // Nor does a key whose permissions grow lend its old tokens the new ones.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"*\": [\"*\"]}}')"
        ));
        assert_eq!(
            token_code(&token, "'{\"users\": [\"read\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
    }

    #[pg_test]
    fn minting_refuses_tokens_bad_keys_and_bad_arguments() {
        let (id, key) = create("");
        let token = mint(&key, "60000");
        assert_error(
            &format!("SELECT apikeys.mint_token('{token}', 1000)"),
            "28000",
            "a token cannot mint",
        );
        assert_error("SELECT apikeys.mint_token(NULL, 1000)", "28000", "\"key\"");
        assert_error(
            "SELECT apikeys.mint_token('garbage', 1000)",
            "28000",
            "NOT_FOUND",
        );
        let k = pgrx::spi::quote_literal(&key);
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, 0)"),
            "22023",
            "\"ms\"",
        );
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, -5)"),
            "22023",
            "\"ms\"",
        );
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, NULL)"),
            "22023",
            "\"ms\"",
        );
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, 86400001)"),
            "22023",
            "max_token_ttl",
        );
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, 1000, claims => '[1]')"),
            "22023",
            "\"claims\"",
        );
        for reserved in [
            "sub",
            "key_id",
            "key_created_us",
            "role",
            "permissions",
            "exp",
            "exp_ms",
            "iat",
            "jti",
            "iss",
            "aud",
        ] {
            assert_error(
                &format!(
                    "SELECT apikeys.mint_token({k}, 1000, claims => '{{\"{reserved}\": \"x\"}}')"
                ),
                "22023",
                reserved,
            );
        }
        run("SET LOCAL apikeys.max_token_ttl = '10s'");
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, 10001)"),
            "22023",
            "10000",
        );
        mint(&key, "10000");
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_error(
            &format!("SELECT apikeys.mint_token({k}, 1000)"),
            "28000",
            "REVOKED",
        );
        let (_, disabled) = create("enabled => false");
        assert_error(
            &format!("SELECT apikeys.mint_token('{disabled}', 1000)"),
            "28000",
            "DISABLED",
        );
    }

    #[pg_test]
    fn the_largest_token_a_key_can_have_still_verifies() {
        let (_, key) = create(
            "permissions => (SELECT jsonb_object_agg(repeat('r', 190) || n, jsonb_build_array(repeat('a', 200))) \
             FROM generate_series(1, 150) n)",
        );
        let token = mint(
            &key,
            "60000, claims => jsonb_build_object('blob', repeat('x', 4000))",
        );
        assert!(token.len() > 80_000, "{}", token.len());
        assert_eq!(token_code(&token, ""), "VALID");
    }

    #[pg_test]
    fn only_a_master_key_mints_for_another_key() {
        let (target_id, _) =
            create("owner => 'tenant-b', permissions => '{\"orders\": [\"read\"]}'");
        let (plain_id, plain) = create("owner => 'tenant-a'");
        let (_, master) = create("master => true, owner => 'ops'");
        assert_error(
            &format!("SELECT apikeys.mint_token('{plain}', 1000, for_key => '{target_id}')"),
            "42501",
            "master",
        );
        // Any key may name itself.
        let own = mint(&plain, &format!("1000, for_key => '{plain_id}'"));
        assert_eq!(payload(&own)["key_id"], plain_id.as_str());
        let token = mint(&master, &format!("60000, for_key => '{target_id}'"));
        let c = payload(&token);
        assert_eq!(c["key_id"], target_id.as_str());
        assert_eq!(c["sub"], "tenant-b");
        assert_eq!(c["permissions"], json!({"orders": ["read"]}));
        assert_eq!(
            token_field::<String>(&token, "", "owner").as_deref(),
            Some("tenant-b")
        );
        assert_error(
            &format!("SELECT apikeys.mint_token('{master}', 1000, for_key => 'no_such_key')"),
            "P0002",
            "no_such_key",
        );
        run(&format!("SELECT apikeys.revoke_api_key('{target_id}')"));
        assert_eq!(token_code(&token, ""), "REVOKED");
        assert_error(
            &format!("SELECT apikeys.mint_token('{master}', 1000, for_key => '{target_id}')"),
            "28000",
            "REVOKED",
        );
    }

    #[pg_test]
    fn tampered_forged_and_foreign_tokens_are_rejected() {
        let (_, key) = create("permissions => '{\"orders\": [\"read\"]}'");
        let (_, other) = create("master => true");
        let token = mint(&key, "60000");
        let second = mint(&other, "60000");
        assert_eq!(token_code(&token, ""), "VALID");
        let h = header(&token);
        let mut c = payload(&token);

        // alg none, with and without a signature.
        let none = encode_json(&json!({"alg": "none", "kid": h["kid"], "typ": "JWT"}));
        assert_eq!(token_code(&with_part(&token, 0, &none), ""), "NOT_FOUND");
        assert_eq!(
            token_code(&format!("{none}.{}.", encode_json(&c)), ""),
            "NOT_FOUND"
        );
        // Unknown and injected kids.
        for kid in [json!("nope"), json!("' OR 1=1 --"), json!(1), Value::Null] {
            let forged = encode_json(&json!({"alg": "HS256", "kid": kid, "typ": "JWT"}));
            assert_eq!(
                token_code(&with_part(&token, 0, &forged), ""),
                "NOT_FOUND",
                "{kid}"
            );
        }
        let no_kid = encode_json(&json!({"alg": "HS256", "typ": "JWT"}));
        assert_eq!(token_code(&with_part(&token, 0, &no_kid), ""), "NOT_FOUND");
        // A payload granting more, under the original signature.
        c["permissions"] = json!({"*": ["*"]});
        assert_eq!(
            token_code(&with_part(&token, 1, &encode_json(&c)), ""),
            "NOT_FOUND"
        );
        // A payload swapped between two valid tokens.
        let swapped = with_part(&token, 1, second.split('.').nth(1).unwrap());
        assert_eq!(token_code(&swapped, ""), "NOT_FOUND");
        // A flipped signature character.
        let sig = token.split('.').nth(2).unwrap();
        let flipped: String = sig.chars().rev().collect();
        assert_eq!(token_code(&with_part(&token, 2, &flipped), ""), "NOT_FOUND");
        assert_eq!(token_code(&with_part(&token, 2, ""), ""), "NOT_FOUND");
        // Issuer and audience come from the settings at verification time.
        run("SET LOCAL apikeys.jwt_issuer = 'someone-else'");
        assert_eq!(token_code(&token, ""), "NOT_FOUND");
        run("RESET apikeys.jwt_issuer");
        run("SET LOCAL apikeys.jwt_audience = 'orders-api'");
        assert_eq!(token_code(&token, ""), "NOT_FOUND");
        let for_orders = mint(&key, "60000");
        assert_eq!(payload(&for_orders)["aud"], "orders-api");
        assert_eq!(token_code(&for_orders, ""), "VALID");
        run("SET LOCAL apikeys.jwt_audience = 'billing-api'");
        assert_eq!(token_code(&for_orders, ""), "NOT_FOUND");
        run("RESET apikeys.jwt_audience");
        // nbf, from custom claims.
        let now_s = clock_ms() / 1000;
        let later = mint(
            &key,
            &format!("60000, claims => '{{\"nbf\": {}}}'", now_s + 30),
        );
        assert_eq!(token_code(&later, ""), "NOT_FOUND");
        let earlier = mint(
            &key,
            &format!("60000, claims => '{{\"nbf\": {}}}'", now_s - 1),
        );
        assert_eq!(token_code(&earlier, ""), "VALID");
    }

    #[pg_test]
    fn every_single_character_change_to_a_token_is_rejected() {
        let (_, key) = create("");
        for alg in ["HS256", "ES256", "EdDSA"] {
            run(&format!("SELECT apikeys.rotate_signing_key('{alg}')"));
            let token = mint(&key, "60000");
            let changed: Vec<String> = token
                .char_indices()
                .filter(|(_, c)| *c != '.')
                .map(|(i, c)| {
                    let other = if c == 'A' { "B" } else { "A" };
                    format!("{}{other}{}", &token[..i], &token[i + 1..])
                })
                .collect();
            let array = changed
                .iter()
                .map(pgrx::spi::quote_literal)
                .collect::<Vec<_>>()
                .join(",");
            let codes = one::<String>(&format!(
                "SELECT string_agg(DISTINCT (apikeys.verify_token(t)).code, ',') FROM unnest(ARRAY[{array}]) t"
            ));
            assert_eq!(
                codes.as_deref(),
                Some("NOT_FOUND"),
                "{alg}: {} variants",
                changed.len()
            );
            assert_eq!(token_code(&token, ""), "VALID");
        }
    }

    #[pg_test]
    fn an_hs256_token_signed_with_a_public_key_is_rejected() {
        let (_, key) = create("");
        for alg in ["ES256", "EdDSA"] {
            let kid =
                one::<String>(&format!("SELECT apikeys.rotate_signing_key('{alg}')")).unwrap();
            let token = mint(&key, "60000");
            assert_eq!(header(&token)["alg"], alg);
            assert_eq!(token_code(&token, ""), "VALID");
            // The classic confusion attack: the public JWK (or its x coordinate) as an HMAC secret.
            let jwk = one::<pgrx::JsonB>(&format!("SELECT k FROM jsonb_array_elements(apikeys.jwks()->'keys') k WHERE k->>'kid' = '{kid}'")).unwrap().0;
            for secret in [jwk.to_string(), jwk["x"].as_str().unwrap().to_owned()] {
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                header.kid = Some(kid.clone());
                let forged = jsonwebtoken::encode(
                    &header,
                    &payload(&token),
                    &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                )
                .unwrap();
                assert_eq!(token_code(&forged, ""), "NOT_FOUND");
            }
        }
    }

    #[pg_test]
    fn garbage_never_raises() {
        let long = "a".repeat(1_000_000);
        let dotted = format!("{0}.{0}.{0}", "eyJ".repeat(300_000));
        for bad in [
            "",
            ".",
            "..",
            "...",
            "a.b.c",
            "garbage",
            "!!!.###.$$$",
            "bm90anNvbg.bm90anNvbg.c2ln",
            "eyJhbGciOiJIUzI1NiJ9.bm90anNvbg.c2ln",
            "eyJhbGciOiJIUzI1NiJ9..",
            "ключ.ключ.ключ",
            long.as_str(),
            dotted.as_str(),
        ] {
            assert_eq!(token_code(bad, ""), "NOT_FOUND", "{bad:.40}");
            assert_eq!(token_field::<bool>(bad, "", "valid"), Some(false));
        }
        assert_eq!(
            one::<String>("SELECT code FROM apikeys.verify_token(NULL)").as_deref(),
            Some("NOT_FOUND")
        );
        // An API key is not a token.
        let (_, key) = create("");
        assert_eq!(token_code(&key, ""), "NOT_FOUND");
    }

    /// Property test inside the backend: tokens built from a valid one with a random header
    /// (alg, kid), a random claim changed or dropped, and a random signature never raise, and
    /// only the untouched token verifies.
    #[pg_test]
    fn generated_tokens_never_raise_and_only_the_genuine_one_verifies() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let (_, key) = create("permissions => '{\"orders\": [\"read\"]}'");
        let token = mint(&key, "600000");
        let (h, c) = (header(&token), payload(&token));
        let kid = h["kid"].clone();
        let json = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
            Just(json!({"*": ["*"]})),
            Just(json!([])),
        ];
        let alg = prop_oneof![
            Just(h["alg"].clone()),
            Just(json!("none")),
            Just(json!("HS384")),
            Just(json!("ES256")),
            Just(json!("EdDSA")),
            Just(json!("RS256")),
            json.clone(),
        ];
        let kids = prop_oneof![Just(kid.clone()), Just(json!("' OR 1=1 --")), json.clone()];
        let claim =
            proptest::sample::select(c.as_object().unwrap().keys().cloned().collect::<Vec<_>>());
        let signature = prop_oneof![
            Just(token.split('.').nth(2).unwrap().to_owned()),
            "[A-Za-z0-9_-]{0,90}",
            "\\PC{0,20}",
        ];
        let strategy = (
            alg,
            kids,
            proptest::option::of((claim, proptest::option::of(json))),
            signature,
        );
        let mut runner = TestRunner::new(Config {
            cases: 300,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&strategy, |(alg, kid, change, sig)| {
                let head = json!({"alg": alg, "kid": kid, "typ": "JWT"});
                let mut body = c.clone();
                if let Some((name, value)) = change {
                    match value {
                        Some(v) => body[&name] = v,
                        None => {
                            body.as_object_mut().unwrap().remove(&name);
                        }
                    }
                }
                // An untouched part keeps its original bytes (JSON key order is not canonical).
                let parts: Vec<&str> = token.split('.').collect();
                let part = |v: &Value, original: &Value, i: usize| {
                    if v == original {
                        parts[i].to_owned()
                    } else {
                        encode_json(v)
                    }
                };
                let forged = format!("{}.{}.{sig}", part(&head, &h, 0), part(&body, &c, 1));
                let genuine = forged == token;
                let got = token_code(&forged, "");
                prop_assert_eq!(got == "VALID", genuine, "{}", forged);
                prop_assert!(got == "VALID" || got == "NOT_FOUND", "{}", got);
                Ok(())
            })
            .unwrap();
        assert_eq!(token_code(&token, ""), "VALID");
    }

    #[pg_test]
    fn only_a_superuser_sets_the_token_settings() {
        run("CREATE ROLE token_settings_user");
        run("SET LOCAL ROLE token_settings_user");
        for setting in [
            "apikeys.jwt_audience = 'evil'",
            "apikeys.jwt_issuer = 'evil'",
            "apikeys.max_token_ttl = '100d'",
        ] {
            assert_error(&format!("SET {setting}"), "42501", "permission denied");
            assert_error(
                &format!(
                    "SELECT set_config('{}', 'x', true)",
                    setting.split(' ').next().unwrap()
                ),
                "42501",
                "permission denied",
            );
        }
        // The key defaults stay settable by anyone.
        run("SET LOCAL apikeys.default_prefix = 'pk'");
        run("RESET ROLE");
        run("SET LOCAL apikeys.max_token_ttl = '7d'");
        assert_eq!(
            one::<String>("SHOW apikeys.max_token_ttl").as_deref(),
            Some("7d")
        );
        let (_, key) = create("");
        mint(&key, "604800000");
    }

    #[pg_test]
    fn a_token_seen_again_is_remembered_but_still_judged() {
        let remembered = |token: &str| {
            let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            super::SEEN.with(|s| s.borrow().entries.contains_key(&digest))
        };
        let (id, key) = create("permissions => '{\"orders\": [\"read\"]}'");
        let token = mint(&key, "60000, claims => '{\"tenant\": \"t1\"}'");
        let claims = || {
            serde_json::from_str::<Value>(
                &token_field::<String>(&token, "", "claims::text").unwrap(),
            )
            .unwrap()
        };
        assert_eq!(claims(), payload(&token));
        assert!(remembered(&token));
        assert_eq!(claims(), payload(&token));
        assert_eq!(
            token_code(&token, "'{\"orders\": [\"write\"]}'"),
            "INSUFFICIENT_PERMISSIONS"
        );
        run(&format!("SELECT apikeys.revoke_api_key('{id}')"));
        assert_eq!(token_code(&token, ""), "REVOKED");
        // Off: every token checked from scratch, nothing kept.
        let (_, other) = create("");
        let fresh = mint(&other, "60000");
        run("SET LOCAL apikeys.token_cache_size = 0");
        assert_eq!(token_code(&fresh, ""), "VALID");
        assert_eq!(token_code(&fresh, ""), "VALID");
        assert!(!remembered(&fresh) && !remembered(&token));
        // Bounded: emptied when full.
        run("SET LOCAL apikeys.token_cache_size = 2");
        let tokens: Vec<String> = (0..3).map(|_| mint(&other, "60000")).collect();
        for t in &tokens {
            assert_eq!(token_code(t, ""), "VALID");
        }
        assert!(super::SEEN.with(|s| s.borrow().entries.len()) <= 2);
        assert!(remembered(&tokens[2]));
    }

    #[pg_test]
    fn a_token_reports_what_it_grants_after_its_key_is_widened() {
        let (id, key) = create("permissions => '{\"orders\": [\"read\"]}'");
        let token = mint(&key, "60000");
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"*\": [\"*\"]}}')"
        ));
        let granted = r#"{"orders": ["read"]}"#;
        assert_eq!(
            token_field::<String>(&token, "", "permissions::text").as_deref(),
            Some(granted)
        );
        assert_eq!(
            one::<String>(&format!(
                "SELECT (apikeys.authenticate('{token}')).permissions::text"
            ))
            .as_deref(),
            Some(granted)
        );
        assert_eq!(
            one::<String>("SELECT apikeys.current_permissions()::text").as_deref(),
            Some(granted)
        );
        // Narrowed below the token: the intersection.
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"orders\": [\"read\", \"write\"], \"x\": [\"y\"]}}')"
        ));
        assert_eq!(
            token_field::<String>(&token, "", "permissions::text").as_deref(),
            Some(granted)
        );
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', permissions => '{{\"reports\": [\"read\"]}}')"
        ));
        assert_eq!(
            token_field::<String>(&token, "", "permissions::text").as_deref(),
            Some("{}")
        );
        // The key itself still reports its own.
        assert_eq!(
            field::<String>(&key, "", "permissions::text").as_deref(),
            Some(r#"{"reports": ["read"]}"#)
        );
    }

    #[pg_test]
    fn the_token_cache_is_bounded_by_memory_and_keeps_no_token_text() {
        let (_, key) = create("");
        let cached_bytes = || super::SEEN.with(|s| s.borrow().bytes);
        let big = |n: usize| {
            mint(
                &key,
                &format!("60000, claims => jsonb_build_object('blob', repeat('x', {n}))"),
            )
        };
        run("SET LOCAL apikeys.token_cache_memory = '16kB'");
        super::SEEN.with(|s| s.borrow_mut().clear());
        // Each token with ~3.5 kB of claims counts about 4 kB: three fit in 16 kB, the fourth
        // empties the cache.
        let tokens: Vec<String> = (0..4).map(|_| big(3_500)).collect();
        for t in &tokens {
            assert_eq!(token_code(t, ""), "VALID");
            assert!(cached_bytes() <= 16 * 1024, "{} bytes", cached_bytes());
        }
        let entries = || super::SEEN.with(|s| s.borrow().entries.len());
        assert_eq!(entries(), 1, "emptied when the fourth would pass the bound");
        assert!(cached_bytes() > 3_500);
        // A token larger than the whole bound is never cached, and still verifies.
        run("SET LOCAL apikeys.token_cache_memory = '2kB'");
        super::SEEN.with(|s| s.borrow_mut().clear());
        assert_eq!(token_code(&big(3_500), ""), "VALID");
        assert_eq!((entries(), cached_bytes()), (0, 0));
        assert_eq!(
            one::<String>("SHOW apikeys.token_cache_memory").as_deref(),
            Some("2kB")
        );
    }

    #[pg_test]
    fn plain_keys_mint_and_verify_tokens_in_read_only_transactions() {
        let (_, key) = create("");
        mint(&key, "1000"); // creates the signing key
        run("SET LOCAL transaction_read_only = on");
        let token = mint(&key, "60000");
        assert_eq!(token_code(&token, ""), "VALID");
    }
}
