//! What an HTTP layer answers a refused request (SPEC §8), in PostgREST's custom-error form:
//! `RAISE SQLSTATE 'PGRST' USING MESSAGE = <body>, DETAIL = <status and headers>`. PostgREST
//! alone can set a status and headers from an error (a `response.headers` setting would be
//! rolled back with the failed transaction); other layers read the same from the error fields.

use crate::verify::Code;
use serde_json::{json, Map, Value};

/// Why a request is refused: no credential at all, or a verification's code (with the key it
/// found, and when retrying can succeed).
pub enum Refused<'a> {
    NoCredentials,
    Verification {
        code: Code,
        key_id: Option<&'a str>,
        /// When the window that refused ends or the quota refills (epoch µs).
        retry_at_us: Option<i64>,
    },
}

/// The MESSAGE (PostgREST's response body) and DETAIL (`{"status", "headers"}`) of a refusal
/// at `now_us`, as JSON text. Never a secret: the key's id at most.
pub fn refusal(refused: &Refused<'_>, now_us: i64) -> (String, String) {
    let (code, key_id, retry_at_us) = match refused {
        Refused::NoCredentials => ("NO_CREDENTIALS", None, None),
        Refused::Verification {
            code,
            key_id,
            retry_at_us,
        } => (code.as_str(), *key_id, *retry_at_us),
    };
    let mut headers = Map::new();
    let (status, message, hint) = match refused {
        Refused::NoCredentials => {
            headers.insert("WWW-Authenticate".into(), "Bearer".into());
            (401, "no credentials", SEND_CREDENTIALS)
        }
        Refused::Verification { code, .. } => match code {
            Code::RateLimited | Code::UsageExceeded => {
                if let Some(at) = retry_at_us {
                    headers.insert("Retry-After".into(), retry_after(at, now_us).into());
                }
                if *code == Code::RateLimited {
                    (
                        429,
                        "rate limit exceeded",
                        "Retry after the time Retry-After gives.",
                    )
                } else {
                    (
                        429,
                        "usage quota exhausted",
                        "Retry after its refill (Retry-After), or ask for more credits.",
                    )
                }
            }
            Code::InsufficientPermissions => (
                403,
                "the credential lacks a required permission",
                "Use a key that grants what this request needs.",
            ),
            Code::Forbidden => (
                403,
                "the credential may not be used from this address",
                "Call from an address the key allows.",
            ),
            Code::Valid | Code::NotFound | Code::Expired | Code::Disabled | Code::Revoked => {
                headers.insert(
                    "WWW-Authenticate".into(),
                    r#"Bearer error="invalid_token""#.into(),
                );
                (401, "invalid credential", SEND_CREDENTIALS)
            }
        },
    };
    let body = json!({
        "code": code,
        "message": format!("authentication failed: {message}"),
        "details": key_id,
        "hint": hint,
    });
    let detail = json!({"status": status, "headers": Value::Object(headers)});
    (body.to_string(), detail.to_string())
}

const SEND_CREDENTIALS: &str = r#"Send an API key as "x-api-key: <key>" or a key or token as "Authorization: Bearer <credential>"."#;

/// Whole seconds from `now_us` until `at_us`, rounded up (never negative).
pub fn retry_after(at_us: i64, now_us: i64) -> String {
    let wait = at_us.saturating_sub(now_us).max(0);
    (wait.div_euclid(1_000_000) + i64::from(wait.rem_euclid(1_000_000) != 0)).to_string()
}

#[cfg(test)]
mod unit {
    use super::*;

    fn parsed(refused: Refused<'_>) -> (Value, Value) {
        let (m, d) = refusal(&refused, 1_000_000);
        (
            serde_json::from_str(&m).unwrap(),
            serde_json::from_str(&d).unwrap(),
        )
    }

    fn refused(code: Code, retry_at_us: Option<i64>) -> (Value, Value) {
        parsed(Refused::Verification {
            code,
            key_id: Some("key_1"),
            retry_at_us,
        })
    }

    #[test]
    fn statuses_follow_the_codes() {
        for (code, status) in [
            (Code::NotFound, 401),
            (Code::Expired, 401),
            (Code::Disabled, 401),
            (Code::Revoked, 401),
            (Code::RateLimited, 429),
            (Code::UsageExceeded, 429),
            (Code::InsufficientPermissions, 403),
            (Code::Forbidden, 403),
        ] {
            let (body, detail) = refused(code, None);
            assert_eq!(detail["status"], status, "{code:?}");
            assert_eq!(body["code"], code.as_str());
            assert_eq!(body["details"], "key_1");
            assert!(body["message"].is_string() && body["hint"].is_string());
            assert!(detail["headers"].is_object());
        }
        let (body, detail) = parsed(Refused::NoCredentials);
        assert_eq!(body["code"], "NO_CREDENTIALS");
        assert_eq!(body["details"], Value::Null);
        assert_eq!(
            detail,
            json!({"status": 401, "headers": {"WWW-Authenticate": "Bearer"}})
        );
    }

    #[test]
    fn a_given_credential_is_an_invalid_token_and_403s_carry_no_challenge() {
        let (_, detail) = refused(Code::Expired, None);
        assert_eq!(
            detail["headers"],
            json!({"WWW-Authenticate": "Bearer error=\"invalid_token\""})
        );
        assert_eq!(refused(Code::Forbidden, None).1["headers"], json!({}));
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_omitted_without_a_time() {
        assert_eq!(
            refused(Code::RateLimited, Some(3_500_000)).1["headers"],
            json!({"Retry-After": "3"})
        );
        assert_eq!(
            refused(Code::UsageExceeded, Some(61_000_000)).1["headers"],
            json!({"Retry-After": "60"})
        );
        assert_eq!(refused(Code::UsageExceeded, None).1["headers"], json!({}));
        assert_eq!(retry_after(1_000_001, 1_000_000), "1");
        assert_eq!(retry_after(5, 10), "0");
        assert_eq!(retry_after(2_000_000, 0), "2");
    }
}
