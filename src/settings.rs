//! The arguments of `create_api_key` and `update_api_key`, checked as pure Rust. Every check
//! returns why an argument is refused (`ArgError`), so unit tests reach each rule; the SQL
//! wrappers in `keys` raise the error as 22023 (`errors::checked`) and do only what needs the
//! database (the role exists, the id is free, the stored key to merge an update with).

use crate::durations::Span;
use crate::jsonb::Jsonb;
use crate::limits::NamedLimit;
use crate::refills::Schedule;
use crate::{key_format, metering, permissions};
use serde_json::Value;

/// A timestamptz as PostgreSQL stores it: microseconds since 2000-01-01 (i64::MAX: infinity).
pub type Timestamp = i64;

pub const MAX_ID_CHARS: usize = 128;
pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
pub const MAX_JSON_BYTES: usize = 64 * 1024;
/// A database role name (NAMEDATALEN - 1).
pub const MAX_ROLE_CHARS: usize = 63;

/// Why an argument was refused: raised as 22023 `argument "<arg>" <problem>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgError {
    pub arg: &'static str,
    pub problem: String,
    pub hint: Option<&'static str>,
}

impl ArgError {
    pub fn new(arg: &'static str, problem: impl Into<String>) -> ArgError {
        ArgError {
            arg,
            problem: problem.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: &'static str) -> ArgError {
        self.hint = Some(hint);
        self
    }
}

pub type Checked<T> = Result<T, ArgError>;

pub fn text(arg: &'static str, value: Option<String>, max: usize) -> Checked<Option<String>> {
    if let Some(v) = &value {
        let n = v.chars().count();
        if n > max {
            return Err(ArgError::new(
                arg,
                format!("must be at most {max} characters, got {n}"),
            ));
        }
    }
    Ok(value)
}

/// A caller-chosen key id.
pub fn id(id: &str) -> Checked<&str> {
    name_like("id", id)
}

/// Ids, role names and other names that appear in URLs and logs: 1 to 128 characters of
/// `[A-Za-z0-9_.:-]`.
pub fn name_like<'a>(arg: &'static str, id: &'a str) -> Checked<&'a str> {
    let ok = (1..=MAX_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b));
    if !ok {
        return Err(ArgError::new(
            arg,
            format!(
                "must be 1 to {MAX_ID_CHARS} characters of [A-Za-z0-9_.:-], got \"{}\"",
                crate::errors::shown(id)
            ),
        ));
    }
    Ok(id)
}

fn json_size(arg: &'static str, bytes: usize) -> Checked<()> {
    if bytes > MAX_JSON_BYTES {
        return Err(ArgError::new(
            arg,
            format!("must be at most {MAX_JSON_BYTES} bytes of JSON, got {bytes}"),
        ));
    }
    Ok(())
}

/// A permissions document, in the form it is stored (actions deduplicated).
pub fn permissions(value: Option<Value>) -> Checked<Option<Value>> {
    let Some(value) = value else { return Ok(None) };
    json_size("permissions", value.to_string().len())?;
    match permissions::parse(&value) {
        Ok(perms) => Ok(Some(permissions::to_json(&perms))),
        Err(problem) => Err(ArgError::new("permissions", problem)
            .hint(r#"Example: {"orders": ["read", "write"], "reports": ["*"]}"#)),
    }
}

/// The most roles a key may have.
pub const MAX_ROLES: usize = 32;

/// A key's roles: names of apikeys.roles, each once, at most MAX_ROLES.
pub fn roles(value: Option<Vec<Option<String>>>) -> Checked<Option<Vec<String>>> {
    let Some(value) = value else { return Ok(None) };
    let mut out: Vec<String> = Vec::new();
    for name in value {
        let Some(name) = name else {
            return Err(ArgError::new("roles", "must not contain NULL"));
        };
        name_like("roles", &name)?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.len() > MAX_ROLES {
        return Err(ArgError::new(
            "roles",
            format!("must name at most {MAX_ROLES} roles, got {}", out.len()),
        ));
    }
    Ok(Some(out))
}

/// Metadata is stored as given: whatever jsonb PostgreSQL accepts, within the size bound.
pub fn metadata(value: Option<Jsonb>) -> Checked<Option<Jsonb>> {
    if let Some(v) = &value {
        json_size("metadata", v.len())?;
    }
    Ok(value)
}

/// A duration argument: no negative part, positive unless `allow_zero`, at most 1000 years.
pub fn duration(arg: &'static str, value: Span, allow_zero: bool) -> Checked<Span> {
    value
        .check(allow_zero)
        .map_err(|problem| ArgError::new(arg, format!("{problem}, got \"{value}\"")))?;
    Ok(value)
}

fn positive(arg: &'static str, value: Option<Span>) -> Checked<Option<Span>> {
    value.map(|v| duration(arg, v, false)).transpose()
}

fn non_negative(arg: &'static str, value: Option<i64>) -> Checked<Option<i64>> {
    match value {
        Some(v) if v < 0 => Err(ArgError::new(arg, format!("must not be negative, got {v}"))),
        _ => Ok(value),
    }
}

pub fn prefix(arg: &'static str, prefix: &str) -> Checked<()> {
    if !key_format::is_valid_prefix(prefix) {
        return Err(ArgError::new(
            arg,
            format!(
                "must be 1 to 16 characters of [a-z0-9], got \"{}\"",
                crate::errors::shown(prefix)
            ),
        ));
    }
    Ok(())
}

/// Both or neither of two arguments that only make sense together.
pub fn pair<A, B>(a: (&'static str, &Option<A>), b: (&'static str, &Option<B>)) -> Checked<()> {
    if a.1.is_some() != b.1.is_some() {
        let (given, missing) = if a.1.is_some() {
            (a.0, b.0)
        } else {
            (b.0, a.0)
        };
        return Err(ArgError::new(
            missing,
            format!("must be given together with \"{given}\""),
        ));
    }
    Ok(())
}

/// `rate_limit_algorithm`: 'sliding' or 'fixed' (None: not given).
pub fn algorithm(name: Option<String>) -> Checked<Option<metering::Algorithm>> {
    let Some(name) = name else { return Ok(None) };
    metering::Algorithm::parse(&name).map(Some).ok_or_else(|| {
        ArgError::new(
            "rate_limit_algorithm",
            format!(
                "must be 'sliding' or 'fixed', got \"{}\"",
                crate::errors::shown(&name)
            ),
        )
    })
}

/// A key's expiry as the caller asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Never,
    At(Timestamp),
    In(Span),
}

impl Expiry {
    /// From the two exclusive arguments; None when neither was given.
    pub fn from_args(
        expires_in: Option<Span>,
        expires_at: Option<Timestamp>,
    ) -> Checked<Option<Expiry>> {
        Ok(match (positive("expires_in", expires_in)?, expires_at) {
            (Some(_), Some(_)) => {
                return Err(ArgError::new(
                    "expires_at",
                    "cannot be combined with \"expires_in\"",
                ))
            }
            (Some(i), None) => Some(Expiry::In(i)),
            (None, Some(i64::MAX)) => Some(Expiry::Never),
            (None, Some(t)) => Some(Expiry::At(t)),
            (None, None) => None,
        })
    }

    /// From GUC apikeys.default_key_ttl, already read as an interval (None: never).
    pub fn from_default(ttl: Option<Span>) -> Checked<Expiry> {
        Ok(match positive("apikeys.default_key_ttl", ttl)? {
            Some(ttl) => Expiry::In(ttl),
            None => Expiry::Never,
        })
    }
}

/// The arguments create_api_key and update_api_key share, as SQL passes them (jsonb arguments
/// that must be read already decoded). NULL is "not given".
#[derive(Default)]
pub struct Args {
    pub name: Option<String>,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub permissions: Option<Value>,
    pub metadata: Option<Jsonb>,
    pub expires_in: Option<Span>,
    pub expires_at: Option<Timestamp>,
    pub role: Option<String>,
    pub remaining: Option<i64>,
    pub refill_amount: Option<i64>,
    pub refill_interval: Option<Span>,
    pub rate_limit_max: Option<i32>,
    pub rate_limit_window: Option<Span>,
    pub rate_limit_algorithm: Option<String>,
    pub enabled: Option<bool>,
    pub roles: Option<Vec<Option<String>>>,
    /// Named rate limits, already read (`limits::parse_config` needs PostgreSQL's interval
    /// parser): Err says why they were refused.
    pub ratelimits: Option<Result<Vec<NamedLimit>, String>>,
    pub refill_day: Option<i32>,
    pub refill_schedule: Option<String>,
    /// The networks callers may verify from, as cidr text (PostgreSQL parsed them); empty: none.
    pub allowed_cidrs: Option<Vec<String>>,
}

/// `Args`, each checked on its own. Pairs (refill, rate limit) are checked by `for_create`, or
/// by `Update::merge` against the stored key.
#[derive(Default)]
pub struct Settings {
    pub name: Option<String>,
    pub owner: Option<String>,
    pub description: Option<String>,
    pub permissions: Option<Value>,
    pub metadata: Option<Jsonb>,
    pub expiry: Option<Expiry>,
    pub role: Option<String>,
    pub remaining: Option<i64>,
    pub refill_amount: Option<i64>,
    pub refill_interval: Option<Span>,
    pub rate_limit_max: Option<i32>,
    pub rate_limit_window: Option<Span>,
    pub algorithm: Option<metering::Algorithm>,
    pub enabled: Option<bool>,
    pub roles: Option<Vec<String>>,
    pub ratelimits: Option<Vec<NamedLimit>>,
    pub refill_day: Option<i32>,
    /// `refill_schedule`: Some(true) for 'calendar'.
    pub calendar: Option<bool>,
    /// For a new key: the refill its arguments make (`for_create`).
    pub schedule: Option<Schedule>,
    /// Empty: no allow-list (verified from anywhere).
    pub allowed_cidrs: Option<Vec<String>>,
}

impl Settings {
    pub fn check(a: Args) -> Checked<Settings> {
        if let Some(m) = a.rate_limit_max.filter(|m| *m <= 0) {
            return Err(ArgError::new(
                "rate_limit_max",
                format!("must be greater than zero, got {m}"),
            ));
        }
        Ok(Settings {
            name: text("name", a.name, MAX_NAME_CHARS)?,
            owner: text("owner", a.owner, MAX_NAME_CHARS)?,
            description: text("description", a.description, MAX_DESCRIPTION_CHARS)?,
            permissions: permissions(a.permissions)?,
            metadata: metadata(a.metadata)?,
            expiry: Expiry::from_args(a.expires_in, a.expires_at)?,
            role: text("role", a.role, MAX_ROLE_CHARS)?,
            remaining: non_negative("remaining", a.remaining)?,
            refill_amount: non_negative("refill_amount", a.refill_amount)?,
            refill_interval: positive("refill_interval", a.refill_interval)?,
            rate_limit_max: a.rate_limit_max,
            rate_limit_window: positive("rate_limit_window", a.rate_limit_window)?,
            algorithm: algorithm(a.rate_limit_algorithm)?,
            enabled: a.enabled,
            roles: roles(a.roles)?,
            ratelimits: a
                .ratelimits
                .transpose()
                .map_err(|problem| {
                    ArgError::new("ratelimits", problem).hint(
                        r#"Example: [{"name": "requests", "limit": 100, "duration": "1 minute", "auto_apply": true}]"#,
                    )
                })?,
            refill_day: a.refill_day,
            calendar: crate::refills::calendar(a.refill_schedule.as_deref())?,
            schedule: None,
            allowed_cidrs: a.allowed_cidrs,
        })
    }

    /// For a new key: what comes in pairs comes in pairs, and a refilling quota starts full
    /// unless told otherwise.
    pub fn for_create(a: Args) -> Checked<Settings> {
        let mut s = Settings::check(a)?;
        s.schedule = crate::refills::schedule(
            s.refill_amount,
            s.refill_interval,
            s.refill_day,
            s.calendar.unwrap_or(false),
        )?;
        pair(
            ("rate_limit_max", &s.rate_limit_max),
            ("rate_limit_window", &s.rate_limit_window),
        )?;
        s.remaining = s.remaining.or(s.refill_amount);
        Ok(s)
    }

    pub fn refill_given(&self) -> bool {
        self.refill_amount.is_some()
            || self.refill_interval.is_some()
            || self.refill_day.is_some()
            || self.calendar.is_some()
    }

    pub fn rate_limit_given(&self) -> bool {
        self.rate_limit_max.is_some() || self.rate_limit_window.is_some()
    }

    /// Which fields (under their `clear` names) this call gives a value.
    fn given(&self) -> [(&'static str, bool); 14] {
        [
            ("name", self.name.is_some()),
            ("owner", self.owner.is_some()),
            ("description", self.description.is_some()),
            ("permissions", self.permissions.is_some()),
            ("metadata", self.metadata.is_some()),
            ("role", self.role.is_some()),
            ("expires_at", self.expiry.is_some()),
            ("remaining", self.remaining.is_some()),
            ("refill", self.refill_given()),
            ("rate_limit", self.rate_limit_given()),
            ("enabled", self.enabled.is_some()),
            ("roles", self.roles.is_some()),
            ("ratelimits", self.ratelimits.is_some()),
            ("allowed_cidrs", self.allowed_cidrs.is_some()),
        ]
    }
}

/// Fields `update_api_key(clear => ...)` resets, under the name each is cleared by.
fn clear_name(field: &str) -> Option<&'static str> {
    Some(match field {
        "name" => "name",
        "owner" => "owner",
        "description" => "description",
        "permissions" => "permissions",
        "metadata" => "metadata",
        "role" => "role",
        "expires_at" | "expires_in" => "expires_at",
        "remaining" => "remaining",
        "refill" | "refill_amount" | "refill_interval" | "refill_day" | "refill_schedule" => {
            "refill"
        }
        "rate_limit" | "rate_limit_max" | "rate_limit_window" => "rate_limit",
        "enabled" => "enabled",
        "roles" => "roles",
        "ratelimits" => "ratelimits",
        "allowed_cidrs" => "allowed_cidrs",
        _ => return None,
    })
}

/// A key's refill and rate limit as stored, to merge an update with.
#[derive(Default, Clone, Copy)]
pub struct StoredLimits {
    pub refill_amount: Option<i64>,
    pub refill: Option<Schedule>,
    pub rate_limit_max: Option<i32>,
    pub rate_limit_window: Option<Span>,
    pub remaining: Option<i64>,
}

/// An update: the settings given, and the fields `clear` resets.
pub struct Update {
    pub settings: Settings,
    pub cleared: Vec<&'static str>,
}

impl Update {
    pub fn check(a: Args, clear: Vec<String>) -> Checked<Update> {
        let mut cleared: Vec<&'static str> = Vec::new();
        for field in clear {
            let Some(canonical) = clear_name(&field) else {
                return Err(ArgError::new(
                    "clear",
                    format!(
                        "names an unknown field \"{}\"",
                        crate::errors::shown(&field)
                    ),
                )
                .hint(
                    "Fields: name, owner, description, permissions, metadata, role, expires_at, \
                     remaining, refill, rate_limit, enabled, roles, ratelimits, allowed_cidrs.",
                ));
            };
            if !cleared.contains(&canonical) {
                cleared.push(canonical);
            }
        }
        let settings = Settings::check(a)?;
        for (field, is_given) in settings.given() {
            if is_given && cleared.contains(&field) {
                return Err(ArgError::new(
                    "clear",
                    format!("names \"{field}\", which is also given a new value"),
                ));
            }
        }
        Ok(Update { settings, cleared })
    }

    pub fn clears(&self, field: &str) -> bool {
        self.cleared.contains(&field)
    }

    /// The key's refill and rate limit after this update, given what is stored: each pair
    /// still comes together, and a refilling key keeps a quota (cleared or not, it starts full).
    pub fn merge(&self, stored: &StoredLimits) -> Checked<StoredLimits> {
        let s = &self.settings;
        let keep = |field: &str| !self.clears(field);
        // A refill given replaces the stored one's schedule: a day makes it monthly, an interval
        // rolling (or daily with 'calendar'); the schedule alone applies to the stored interval.
        let (stored_interval, stored_day, stored_calendar) = match stored.refill {
            Some(Schedule::Every(span)) => (Some(span), None, false),
            Some(Schedule::Daily) => (
                Some(Span {
                    days: 1,
                    ..Span::default()
                }),
                None,
                true,
            ),
            Some(Schedule::Monthly(d)) => (None, Some(d as i32), true),
            None => (None, None, false),
        };
        let (interval, day) = if s.refill_day.is_some() || s.refill_interval.is_some() {
            (s.refill_interval, s.refill_day)
        } else {
            (stored_interval, stored_day)
        };
        let calendar = s.calendar.unwrap_or(stored_calendar && day.is_none());
        let amount = s
            .refill_amount
            .or(stored.refill_amount)
            .filter(|_| keep("refill"));
        let refill = if keep("refill") {
            crate::refills::schedule(amount, interval, day, calendar)?
        } else {
            None
        };
        let merged = StoredLimits {
            refill_amount: amount,
            refill,
            rate_limit_max: s
                .rate_limit_max
                .or(stored.rate_limit_max)
                .filter(|_| keep("rate_limit")),
            rate_limit_window: s
                .rate_limit_window
                .or(stored.rate_limit_window)
                .filter(|_| keep("rate_limit")),
            remaining: None,
        };
        pair(
            ("rate_limit_max", &merged.rate_limit_max),
            ("rate_limit_window", &merged.rate_limit_window),
        )?;
        let remaining = s
            .remaining
            .or(stored.remaining)
            .filter(|_| keep("remaining"))
            .or(merged.refill_amount);
        Ok(StoredLimits {
            remaining,
            ..merged
        })
    }
}

/// What `secret` imports: the key string, its prefix and its display start.
pub fn imported(
    secret: &str,
    prefix: String,
    prefix_given: bool,
) -> Checked<(String, String, String)> {
    match key_format::classify(secret) {
        key_format::Shape::Ours(parsed) => {
            if prefix_given && parsed.prefix != prefix {
                return Err(ArgError::new(
                    "prefix",
                    format!(
                        "does not match the prefix of \"secret\" (\"{}\")",
                        parsed.prefix
                    ),
                ));
            }
            Ok((secret.to_owned(), parsed.prefix.to_owned(), parsed.start()))
        }
        // A token would be ambiguous wherever a credential may be a key or a token.
        key_format::Shape::Foreign if crate::claims::looks_like_token(secret) => Err(
            ArgError::new("secret", "has the shape of a JWT; an API key must not")
                .hint("Import the API key itself, not a token minted from it."),
        ),
        // Imported from another system: looked up by hash, shown by its first characters.
        key_format::Shape::Foreign => {
            Ok((secret.to_owned(), prefix, key_format::foreign_start(secret)))
        }
        key_format::Shape::Invalid => Err(ArgError::new(
            "secret",
            format!(
                "must be a pg_apikeys key or {}–{} printable ASCII characters without spaces",
                key_format::MIN_FOREIGN_CHARS,
                key_format::MAX_FOREIGN_CHARS
            ),
        )
        .hint("A string shaped like a pg_apikeys key must carry a valid checksum.")),
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn hours(h: i64) -> Span {
        Span::micros(h * 3_600_000_000)
    }

    fn refused(r: Checked<impl Sized>) -> (&'static str, String) {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => (e.arg, e.problem),
        }
    }

    #[test]
    fn each_argument_is_checked_and_named_when_refused() {
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        let cases: Vec<(Args, &str, &str)> = vec![
            (
                Args {
                    name: Some(long.clone()),
                    ..Args::default()
                },
                "name",
                "at most 200 characters",
            ),
            (
                Args {
                    owner: Some(long),
                    ..Args::default()
                },
                "owner",
                "at most 200",
            ),
            (
                Args {
                    role: Some("r".repeat(64)),
                    ..Args::default()
                },
                "role",
                "at most 63",
            ),
            (
                Args {
                    permissions: Some(json!(["read"])),
                    ..Args::default()
                },
                "permissions",
                "not an array",
            ),
            (
                Args {
                    permissions: Some(json!({"orders": "read"})),
                    ..Args::default()
                },
                "permissions",
                "maps to a string",
            ),
            (
                Args {
                    expires_in: Some(hours(0)),
                    ..Args::default()
                },
                "expires_in",
                "must be a positive interval, got \"00:00:00\"",
            ),
            (
                Args {
                    expires_in: Some(hours(1)),
                    expires_at: Some(i64::MAX),
                    ..Args::default()
                },
                "expires_at",
                "cannot be combined",
            ),
            (
                Args {
                    remaining: Some(-1),
                    ..Args::default()
                },
                "remaining",
                "must not be negative, got -1",
            ),
            (
                Args {
                    refill_amount: Some(-5),
                    ..Args::default()
                },
                "refill_amount",
                "-5",
            ),
            (
                Args {
                    refill_interval: Some(Span::micros(-1)),
                    ..Args::default()
                },
                "refill_interval",
                "got \"-00:00:00.000001\"",
            ),
            (
                Args {
                    rate_limit_max: Some(0),
                    ..Args::default()
                },
                "rate_limit_max",
                "greater than zero, got 0",
            ),
            (
                Args {
                    rate_limit_window: Some(Span {
                        months: 12_001,
                        ..Span::default()
                    }),
                    ..Args::default()
                },
                "rate_limit_window",
                "at most 1000 years",
            ),
            (
                Args {
                    rate_limit_algorithm: Some("leaky".into()),
                    ..Args::default()
                },
                "rate_limit_algorithm",
                "'sliding' or 'fixed'",
            ),
        ];
        for (args, arg, problem) in cases {
            let (got_arg, got_problem) = refused(Settings::check(args));
            assert_eq!(got_arg, arg);
            assert!(got_problem.contains(problem), "{arg}: {got_problem}");
        }
    }

    #[test]
    fn a_new_key_takes_pairs_together_and_a_refilling_quota_starts_full() {
        let (arg, problem) = refused(Settings::for_create(Args {
            refill_amount: Some(10),
            ..Args::default()
        }));
        assert_eq!(
            (arg, problem.as_str()),
            (
                "refill_interval",
                "must be given together with \"refill_amount\" (or refill_day)"
            )
        );
        let (arg, _) = refused(Settings::for_create(Args {
            rate_limit_window: Some(hours(1)),
            ..Args::default()
        }));
        assert_eq!(arg, "rate_limit_max");
        let s = Settings::for_create(Args {
            refill_amount: Some(10),
            refill_interval: Some(hours(24)),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(s.remaining, Some(10));
        let s = Settings::for_create(Args {
            remaining: Some(3),
            refill_amount: Some(10),
            refill_interval: Some(hours(24)),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(s.remaining, Some(3));
    }

    #[test]
    fn permissions_are_stored_with_each_action_once() {
        let s = Settings::check(Args {
            permissions: Some(json!({"orders": ["read", "read", "write"]})),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(s.permissions, Some(json!({"orders": ["read", "write"]})));
    }

    #[test]
    fn expiry_is_at_in_never_or_the_default() {
        assert_eq!(
            Expiry::from_args(None, Some(1_000)),
            Ok(Some(Expiry::At(1_000)))
        );
        assert_eq!(
            Expiry::from_args(None, Some(i64::MAX)),
            Ok(Some(Expiry::Never))
        );
        assert_eq!(
            Expiry::from_args(Some(hours(2)), None),
            Ok(Some(Expiry::In(hours(2))))
        );
        assert_eq!(Expiry::from_args(None, None), Ok(None));
        assert_eq!(Expiry::from_default(None), Ok(Expiry::Never));
        assert_eq!(
            Expiry::from_default(Some(hours(1))),
            Ok(Expiry::In(hours(1)))
        );
        assert_eq!(
            refused(Expiry::from_default(Some(hours(0)))).0,
            "apikeys.default_key_ttl"
        );
    }

    #[test]
    fn clear_names_known_fields_not_also_given() {
        let clear = |fields: &[&str], args: Args| {
            Update::check(args, fields.iter().map(|f| f.to_string()).collect())
        };
        let u = clear(
            &["expires_in", "refill_amount", "rate_limit_window", "refill"],
            Args::default(),
        )
        .unwrap();
        assert_eq!(u.cleared, vec!["expires_at", "refill", "rate_limit"]);
        assert_eq!(refused(clear(&["hash"], Args::default())).0, "clear");
        let (arg, problem) = refused(clear(
            &["remaining"],
            Args {
                remaining: Some(1),
                ..Args::default()
            },
        ));
        assert_eq!(
            (arg, problem.as_str()),
            (
                "clear",
                "names \"remaining\", which is also given a new value"
            )
        );
        assert!(clear(
            &["rate_limit"],
            Args {
                rate_limit_window: Some(hours(1)),
                ..Args::default()
            }
        )
        .is_err());
    }

    #[test]
    fn an_update_merges_with_the_stored_limits() {
        let stored = StoredLimits {
            refill_amount: Some(10),
            refill: Some(Schedule::Every(hours(24))),
            rate_limit_max: Some(5),
            rate_limit_window: Some(hours(1)),
            remaining: Some(4),
        };
        // Half a pair completes the stored one.
        let u = Update::check(
            Args {
                rate_limit_max: Some(9),
                ..Args::default()
            },
            vec![],
        )
        .unwrap();
        let m = u.merge(&stored).unwrap();
        assert_eq!(
            (m.rate_limit_max, m.rate_limit_window),
            (Some(9), Some(hours(1)))
        );
        assert_eq!(m.remaining, Some(4));
        // Half a pair on a key without one is refused.
        let none = StoredLimits::default();
        assert_eq!(refused(u.merge(&none)).0, "rate_limit_window");
        // Clearing the quota of a refilling key starts it full; clearing both leaves none.
        let u = Update::check(Args::default(), vec!["remaining".into()]).unwrap();
        assert_eq!(u.merge(&stored).unwrap().remaining, Some(10));
        let u = Update::check(Args::default(), vec!["remaining".into(), "refill".into()]).unwrap();
        let m = u.merge(&stored).unwrap();
        assert_eq!((m.remaining, m.refill_amount, m.refill), (None, None, None));
    }

    #[test]
    fn roles_are_names_each_listed_once() {
        let some = |names: &[&str]| Some(names.iter().map(|n| Some(n.to_string())).collect());
        assert_eq!(
            roles(some(&["admin", "reader", "admin"])),
            Ok(Some(vec!["admin".into(), "reader".into()]))
        );
        assert_eq!(roles(Some(vec![])), Ok(Some(vec![])));
        assert_eq!(refused(roles(Some(vec![None]))).0, "roles");
        assert_eq!(refused(roles(some(&["no spaces"]))).0, "roles");
        let many: Vec<String> = (0..33).map(|i| format!("r{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refused(roles(some(&many))).1.contains("at most 32"));
        assert!(Update::check(Args::default(), vec!["roles".into()])
            .unwrap()
            .clears("roles"));
    }

    #[test]
    fn ids_prefixes_and_imported_secrets() {
        assert_eq!(id("key_1.a:b-c"), Ok("key_1.a:b-c"));
        assert_eq!(refused(id("")).0, "id");
        assert_eq!(refused(id("has space")).0, "id");
        assert!(id(&"a".repeat(129)).is_err());
        assert!(prefix("prefix", "live0").is_ok());
        assert_eq!(
            refused(prefix("apikeys.default_prefix", "NO!")).0,
            "apikeys.default_prefix"
        );
        let (key, _) = key_format::generate("live");
        let (k, p, start) = imported(&key, "sk".into(), false).unwrap();
        assert_eq!((k.as_str(), p.as_str()), (key.as_str(), "live"));
        assert!(key.starts_with(&start));
        assert_eq!(refused(imported(&key, "sk".into(), true)).0, "prefix");
        assert_eq!(
            refused(imported(
                "eyJhbGciOiJIUzI1NiJ9.e30.sig-sig-sig",
                "sk".into(),
                false
            ))
            .0,
            "secret"
        );
        assert_eq!(refused(imported("short", "sk".into(), false)).0, "secret");
        let (_, p, _) = imported("legacy-0123456789abcdef", "imp".into(), false).unwrap();
        assert_eq!(p, "imp");
    }
}
