//! JWT claims, as plain functions: what a minted token says about its key, and what a presented
//! token must say before its key is judged. Signatures and the table live elsewhere.

use crate::permissions::kind;
use serde_json::{Map, Value};

/// Claims the extension writes; `claims` passed to mint_token may not set them.
pub const RESERVED: &[&str] = &[
    "sub",
    "key_id",
    "key_created_us",
    "role",
    "permissions",
    "iat",
    "exp",
    "exp_ms",
    "jti",
    "iss",
    "aud",
];

/// Custom claims beyond this size would make tokens too large to pass in an HTTP header.
pub const MAX_CUSTOM_BYTES: usize = 4096;

/// Tokens longer than this are refused unread. The largest token a key can mint is far below
/// it: permissions ≤ 64 KiB and custom claims ≤ 4 KiB of JSON, base64 adds a third.
pub const MAX_TOKEN_BYTES: usize = 128 * 1024;

/// What a token grants, taken from the key that is judged VALID when minting.
pub struct Grant<'a> {
    pub key_id: &'a str,
    pub key_created_us: i64,
    pub owner: Option<&'a str>,
    pub role: Option<&'a str>,
    pub permissions: &'a Value,
    pub now_ms: i64,
    pub exp_ms: i64,
    pub jti: String,
    pub issuer: &'a str,
    pub audience: Option<&'a str>,
}

/// The precise expiry of a token minted at `now_ms` for `ms`: never after its key's expiry.
pub fn expiry(now_ms: i64, ms: i64, key_expires_ms: Option<i64>) -> i64 {
    let wanted = now_ms.saturating_add(ms);
    key_expires_ms.map_or(wanted, |key| wanted.min(key))
}

/// Checks the custom claims a caller wants in a token.
pub fn check_custom(custom: &Value) -> Result<&Map<String, Value>, String> {
    let Value::Object(map) = custom else {
        return Err(format!("must be a JSON object, got {}", kind(custom)));
    };
    if let Some(name) = map.keys().find(|k| RESERVED.contains(&k.as_str())) {
        return Err(format!("cannot set the reserved claim \"{name}\""));
    }
    if map.get("nbf").is_some_and(|nbf| !nbf.is_number()) {
        return Err("must give \"nbf\" as a number of seconds since the epoch".into());
    }
    if custom.to_string().len() > MAX_CUSTOM_BYTES {
        return Err(format!("must be at most {MAX_CUSTOM_BYTES} bytes of JSON"));
    }
    Ok(map)
}

/// The payload of a token; custom claims first so the reserved ones always win.
pub fn build(grant: &Grant<'_>, custom: Option<&Map<String, Value>>) -> Map<String, Value> {
    let mut claims = custom.cloned().unwrap_or_default();
    let mut set = |name: &str, value: Value| {
        claims.insert(name.to_owned(), value);
    };
    set("sub", grant.owner.unwrap_or(grant.key_id).into());
    set("key_id", grant.key_id.into());
    set("key_created_us", grant.key_created_us.into());
    if let Some(role) = grant.role {
        set("role", role.into());
    }
    set("permissions", grant.permissions.clone());
    set("iat", grant.now_ms.div_euclid(1000).into());
    set("exp", grant.exp_ms.div_euclid(1000).into());
    set("exp_ms", grant.exp_ms.into());
    set("jti", grant.jti.clone().into());
    set("iss", grant.issuer.into());
    if let Some(aud) = grant.audience {
        set("aud", aud.into());
    }
    claims
}

/// What a correctly signed token asks of its key.
#[derive(Debug, PartialEq)]
pub struct Presented {
    pub key_id: String,
    pub key_created_us: i64,
    pub exp_ms: i64,
    pub permissions: Value,
}

/// Checks a signed token's claims, all but expiry (judged with the key, at the key's clock).
/// Any failure makes the token unusable; the reason is for tests and logs.
pub fn check(
    claims: &Value,
    now_ms: i64,
    issuer: &str,
    audience: Option<&str>,
) -> Result<Presented, &'static str> {
    let key_id = claims
        .get("key_id")
        .and_then(Value::as_str)
        .ok_or("no key_id")?;
    let key_created_us = claims
        .get("key_created_us")
        .and_then(Value::as_i64)
        .ok_or("no integer key_created_us")?;
    let exp_ms = claims
        .get("exp_ms")
        .and_then(Value::as_i64)
        .ok_or("no integer exp_ms")?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or("no integer exp")?;
    if exp.checked_mul(1000).is_none_or(|e| e > exp_ms) {
        return Err("exp is later than exp_ms");
    }
    if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
        return Err("wrong iss");
    }
    if let Some(wanted) = audience {
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == wanted,
            Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(wanted)),
            _ => false,
        };
        if !ok {
            return Err("wrong aud");
        }
    }
    match claims.get("nbf") {
        None => {}
        Some(nbf) => {
            let nbf = nbf.as_f64().ok_or("nbf is not a number")?;
            if (now_ms as f64) < nbf * 1000.0 {
                return Err("not valid before nbf");
            }
        }
    }
    let permissions = claims.get("permissions").cloned().unwrap_or(Value::Null);
    if !permissions.is_object() {
        return Err("permissions is not an object");
    }
    Ok(Presented {
        key_id: key_id.to_owned(),
        key_created_us,
        exp_ms,
        permissions,
    })
}

/// Whether a credential has the shape of a JWT (three dot-separated parts, the first a
/// base64url JSON object), so that a token is never taken for an API key.
pub fn looks_like_token(s: &str) -> bool {
    use base64::Engine as _;
    let mut parts = s.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|v| v.is_object())
}

#[cfg(test)]
mod unit {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn grant(perms: &Value) -> Grant<'_> {
        Grant {
            key_id: "k1",
            key_created_us: 1_600_000_000_000_001,
            owner: Some("acme"),
            role: Some("api_user"),
            permissions: perms,
            now_ms: 1_700_000_000_123,
            exp_ms: 1_700_000_003_999,
            jti: "j".into(),
            issuer: "pg_apikeys",
            audience: Some("orders-api"),
        }
    }

    #[test]
    fn minted_claims_carry_the_keys_access() {
        let perms = json!({"orders": ["read"]});
        let c = Value::Object(build(&grant(&perms), None));
        assert_eq!(c["sub"], "acme");
        assert_eq!(c["key_id"], "k1");
        assert_eq!(c["role"], "api_user");
        assert_eq!(c["permissions"], perms);
        assert_eq!(c["iat"], 1_700_000_000);
        assert_eq!(c["exp"], 1_700_000_003);
        assert_eq!(c["exp_ms"], 1_700_000_003_999i64);
        assert_eq!(c["aud"], "orders-api");
        let p = check(&c, 1_700_000_001_000, "pg_apikeys", Some("orders-api")).unwrap();
        assert_eq!(p.key_id, "k1");
        assert_eq!(p.exp_ms, 1_700_000_003_999);
    }

    #[test]
    fn sub_is_the_key_id_without_an_owner_and_role_is_omitted() {
        let perms = json!({});
        let mut g = grant(&perms);
        g.owner = None;
        g.role = None;
        g.audience = None;
        let c = build(&g, None);
        assert_eq!(c["sub"], "k1");
        assert!(!c.contains_key("role"));
        assert!(!c.contains_key("aud"));
    }

    #[test]
    fn custom_claims_cannot_override_reserved_ones() {
        for name in RESERVED {
            let custom = json!({ *name: "x" });
            assert!(check_custom(&custom).unwrap_err().contains(name));
        }
        assert!(check_custom(&json!([1])).is_err());
        assert!(check_custom(&json!({"nbf": "soon"})).is_err());
        assert!(check_custom(&json!({"big": "x".repeat(MAX_CUSTOM_BYTES)})).is_err());
        let perms = json!({});
        let custom = json!({"tenant": "t1", "nbf": 1});
        let c = build(&grant(&perms), check_custom(&custom).ok());
        assert_eq!(c["tenant"], "t1");
        assert_eq!(c["sub"], "acme");
    }

    #[test]
    fn expiry_never_outlives_the_key() {
        assert_eq!(expiry(1000, 500, None), 1500);
        assert_eq!(expiry(1000, 500, Some(1200)), 1200);
        assert_eq!(expiry(1000, 500, Some(9000)), 1500);
        assert_eq!(expiry(i64::MAX - 1, 500, None), i64::MAX);
    }

    #[test]
    fn presented_tokens_must_name_issuer_audience_and_times() {
        let perms = json!({});
        let good = Value::Object(build(&grant(&perms), None));
        let now = 1_700_000_001_000;
        let with = |f: &dyn Fn(&mut Map<String, Value>)| {
            let mut c = good.as_object().unwrap().clone();
            f(&mut c);
            check(&Value::Object(c), now, "pg_apikeys", Some("orders-api"))
        };
        assert!(with(&|_| {}).is_ok());
        assert_eq!(
            with(&|c| {
                c.insert("iss".into(), "evil".into());
            }),
            Err("wrong iss")
        );
        assert_eq!(
            with(&|c| {
                c.remove("iss");
            }),
            Err("wrong iss")
        );
        assert_eq!(
            with(&|c| {
                c.insert("aud".into(), "other".into());
            }),
            Err("wrong aud")
        );
        assert!(with(&|c| {
            c.insert("aud".into(), json!(["x", "orders-api"]));
        })
        .is_ok());
        assert_eq!(
            with(&|c| {
                c.remove("aud");
            }),
            Err("wrong aud")
        );
        assert_eq!(
            with(&|c| {
                c.remove("key_id");
            }),
            Err("no key_id")
        );
        assert_eq!(
            with(&|c| {
                c.remove("key_created_us");
            }),
            Err("no integer key_created_us")
        );
        assert_eq!(
            with(&|c| {
                c.insert("exp_ms".into(), "1".into());
            }),
            Err("no integer exp_ms")
        );
        assert_eq!(
            with(&|c| {
                c.insert("exp".into(), json!(1_800_000_000));
            }),
            Err("exp is later than exp_ms")
        );
        assert_eq!(
            with(&|c| {
                c.insert("nbf".into(), json!(1_700_000_002));
            }),
            Err("not valid before nbf")
        );
        assert!(with(&|c| {
            c.insert("nbf".into(), json!(1_700_000_001));
        })
        .is_ok());
        assert_eq!(
            with(&|c| {
                c.insert("permissions".into(), json!(["x"]));
            }),
            Err("permissions is not an object")
        );
        // Without a configured audience any aud (or none) is accepted.
        assert!(check(&good, now, "pg_apikeys", None).is_ok());
    }

    #[test]
    fn tokens_are_told_from_keys() {
        assert!(looks_like_token("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
        assert!(looks_like_token("eyJhbGciOiJub25lIn0.e30."));
        assert!(!looks_like_token("sk_abc"));
        assert!(!looks_like_token("a.b.c"));
        assert!(!looks_like_token("eyJhbGciOiJIUzI1NiJ9.e30"));
        assert!(!looks_like_token("eyJhbGciOiJIUzI1NiJ9.e30.a.b"));
    }

    proptest! {
        #[test]
        fn check_never_panics(claims in any::<String>(), now in any::<i64>()) {
            let _ = looks_like_token(&claims);
            let v: Value = serde_json::from_str(&claims).unwrap_or(Value::String(claims));
            let _ = check(&v, now, "pg_apikeys", Some("a"));
            let _ = check_custom(&v);

        }

        #[test]
        fn exp_is_never_later_than_exp_ms(now in -1i64 << 50..1i64 << 50, ms in 1i64..1 << 40) {
            let perms = json!({});
            let mut g = grant(&perms);
            g.now_ms = now;
            g.exp_ms = expiry(now, ms, None);
            let c = build(&g, None);
            prop_assert!(c["exp"].as_i64().unwrap() * 1000 <= c["exp_ms"].as_i64().unwrap());
            prop_assert!(c["exp_ms"].as_i64().unwrap() - c["exp"].as_i64().unwrap() * 1000 < 1000);
        }
    }
}
