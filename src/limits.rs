//! Named rate limits (SPEC §7), as pure Rust: the `ratelimits` a key or identity carries, the
//! limits a verification asks for, and which limits one call applies at what cost.
//!
//! A stored limit is `{"name", "limit", "duration", "auto_apply"}` with `duration` in the form
//! `durations::show` writes (read once with PostgreSQL's interval parser when management stored
//! it, so verification reads it back without calling the server).

use crate::durations::{self, Span};
use crate::metering::{Algorithm, Rate};
use serde_json::{json, Value};

/// At most this many named limits per key or identity.
pub const MAX_LIMITS: usize = 32;
const MAX_NAME_CHARS: usize = 64;
/// The name `rate_limit_max` / `rate_limit_window` go by.
pub const DEFAULT: &str = "default";

/// Which object a limit belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Key,
    Identity,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Key => "key",
            Level::Identity => "identity",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedLimit {
    pub name: String,
    pub limit: i64,
    pub duration: Span,
    pub auto_apply: bool,
}

impl NamedLimit {
    /// The window, months counted as 30 days (as PostgreSQL compares intervals).
    pub fn window_us(&self) -> i64 {
        let d = &self.duration;
        let micros = i128::from(d.months) * 30 * 86_400_000_000
            + i128::from(d.days) * 86_400_000_000
            + i128::from(d.micros);
        i64::try_from(micros).unwrap_or(i64::MAX).max(1)
    }

    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "limit": self.limit,
            "duration": durations::show(self.duration.months, self.duration.days, self.duration.micros),
            "auto_apply": self.auto_apply,
        })
    }
}

fn kind(v: &Value) -> &'static str {
    crate::permissions::kind(v)
}

fn check_name(name: &Value) -> Result<String, String> {
    match name {
        Value::String(s) if !s.is_empty() && s.chars().count() <= MAX_NAME_CHARS => Ok(s.clone()),
        Value::String(_) => Err(format!(
            "must name each limit with 1 to {MAX_NAME_CHARS} characters"
        )),
        other => Err(format!(
            "must name each limit with a string, not {}",
            kind(other)
        )),
    }
}

/// A `ratelimits` argument of management: an array of limit objects, names unique. `duration`
/// strings are read by `parse_duration` (PostgreSQL's interval input, at the edge).
pub fn parse_config(
    value: &Value,
    parse_duration: impl Fn(&str) -> Result<Span, String>,
) -> Result<Vec<NamedLimit>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "must be a JSON array of limits, not {}",
            kind(value)
        ));
    };
    if items.len() > MAX_LIMITS {
        return Err(format!(
            "must have at most {MAX_LIMITS} limits, got {}",
            items.len()
        ));
    }
    let mut out: Vec<NamedLimit> = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(o) = item else {
            return Err(format!("must list limit objects, not {}", kind(item)));
        };
        if let Some(extra) = o
            .keys()
            .find(|k| !["name", "limit", "duration", "auto_apply"].contains(&k.as_str()))
        {
            return Err(format!("has an unknown field \"{extra}\" in a limit"));
        }
        let name = check_name(o.get("name").unwrap_or(&Value::Null))?;
        if out.iter().any(|l| l.name == name) {
            return Err(format!("names limit \"{name}\" twice"));
        }
        let limit = match o.get("limit") {
            Some(Value::Number(n)) => n.as_i64().filter(|n| (1..=i64::from(i32::MAX)).contains(n)),
            _ => None,
        }
        .ok_or_else(|| format!("must give limit \"{name}\" a \"limit\" that is an integer > 0"))?;
        let duration = match o.get("duration") {
            Some(Value::String(text)) => parse_duration(text).map_err(|problem| {
                format!("gives limit \"{name}\" a \"duration\" that {problem}")
            })?,
            _ => {
                return Err(format!(
                    "must give limit \"{name}\" a \"duration\" (interval text such as \"1 minute\")"
                ))
            }
        };
        duration
            .check(false)
            .map_err(|problem| format!("gives limit \"{name}\" a \"duration\" that {problem}"))?;
        let auto_apply = match o.get("auto_apply") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "must give limit \"{name}\" an \"auto_apply\" that is a boolean, not {}",
                    kind(other)
                ))
            }
        };
        out.push(NamedLimit {
            name,
            limit,
            duration,
            auto_apply,
        });
    }
    Ok(out)
}

/// Limits as stored.
pub fn to_json(limits: &[NamedLimit]) -> Value {
    Value::Array(limits.iter().map(NamedLimit::to_json).collect())
}

/// Limits as stored by `to_json`; what cannot be read is skipped (never written by us).
pub fn from_stored(value: &Value) -> Vec<NamedLimit> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            Some(NamedLimit {
                name: item.get("name")?.as_str()?.to_owned(),
                limit: item.get("limit")?.as_i64()?,
                duration: durations::parse_shown(item.get("duration")?.as_str()?)?,
                auto_apply: item
                    .get("auto_apply")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            })
        })
        .collect()
}

/// What a call asks for: `[{"name": text, "cost": int >= 0}, …]` (cost 1 when left out).
pub fn parse_selection(value: &Value) -> Result<Vec<(String, i64)>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "must be a JSON array of {{\"name\", \"cost\"}} objects, not {}",
            kind(value)
        ));
    };
    if items.len() > 2 * MAX_LIMITS {
        return Err(format!("must name at most {} limits", 2 * MAX_LIMITS));
    }
    let mut out: Vec<(String, i64)> = Vec::new();
    for item in items {
        let Value::Object(o) = item else {
            return Err(format!("must list objects, not {}", kind(item)));
        };
        if let Some(extra) = o.keys().find(|k| !["name", "cost"].contains(&k.as_str())) {
            return Err(format!("has an unknown field \"{extra}\""));
        }
        let name = check_name(o.get("name").unwrap_or(&Value::Null))?;
        let cost = match o.get("cost") {
            None | Some(Value::Null) => 1,
            Some(Value::Number(n)) => n
                .as_i64()
                .filter(|c| (0..=i64::from(i32::MAX)).contains(c))
                .ok_or_else(|| {
                    format!("must give \"{name}\" a \"cost\" that is an integer >= 0")
                })?,
            Some(other) => {
                return Err(format!(
                    "must give \"{name}\" a \"cost\" that is an integer >= 0, not {}",
                    kind(other)
                ))
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(format!("names limit \"{name}\" twice"));
        }
        out.push((name, cost));
    }
    Ok(out)
}

/// One limit a call applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub name: String,
    pub level: Level,
    pub rate: Rate,
    pub cost: i64,
}

/// The limits one call applies: every auto-applied limit of the key and of its identity (cost
/// 1), and every limit the call names (at its cost) — a name both define applies at both
/// levels. The key's `default` limit (rate_limit_max/window) takes the call's `cost` unless
/// named. A name neither defines is an error.
pub fn select(
    key: &[NamedLimit],
    identity: &[NamedLimit],
    default: Option<Rate>,
    algorithm: (Algorithm, Algorithm),
    selection: &[(String, i64)],
    cost: i64,
) -> Result<Vec<Applied>, String> {
    for (name, _) in selection {
        let known = key.iter().chain(identity).any(|l| l.name == *name)
            || (name == DEFAULT && default.is_some());
        if !known {
            return Err(format!(
                "names limit \"{name}\", which neither the key nor its identity has"
            ));
        }
    }
    let chosen = |name: &str| selection.iter().find(|(n, _)| n == name).map(|(_, c)| *c);
    let mut out = Vec::new();
    if let Some(rate) = default {
        out.push(Applied {
            name: DEFAULT.to_owned(),
            level: Level::Key,
            rate,
            cost: chosen(DEFAULT).unwrap_or(cost),
        });
    }
    for (level, limits, algorithm) in [
        (Level::Key, key, algorithm.0),
        (Level::Identity, identity, algorithm.1),
    ] {
        for l in limits {
            let cost = match chosen(&l.name) {
                Some(c) => c,
                None if l.auto_apply => 1,
                None => continue,
            };
            out.push(Applied {
                name: l.name.clone(),
                level,
                rate: Rate {
                    max: l.limit,
                    window_us: l.window_us(),
                    algorithm,
                },
                cost,
            });
        }
    }
    Ok(out)
}

/// A limit's line in the verification result:
/// `{"name", "level", "limit", "remaining", "reset_at", "exceeded"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub name: String,
    pub level: Level,
    pub limit: i64,
    pub remaining: i64,
    /// When its window (bucket) ends, epoch µs; None when no window is open.
    pub reset_us: Option<i64>,
    pub exceeded: bool,
}

pub fn report(applied: &Applied, remaining: i64, reset_us: Option<i64>, exceeded: bool) -> Report {
    Report {
        name: applied.name.clone(),
        level: applied.level,
        limit: applied.rate.max,
        remaining,
        reset_us,
        exceeded,
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    /// "N s" / "N min" for the tests (the extension uses PostgreSQL's parser).
    fn seconds(text: &str) -> Result<Span, String> {
        let (n, unit) = text.split_once(' ').ok_or("is not an interval")?;
        let n: i64 = n.parse().map_err(|_| "is not an interval".to_string())?;
        match unit {
            "s" => Ok(Span::micros(n * 1_000_000)),
            "min" => Ok(Span::micros(n * 60_000_000)),
            _ => Err("is not an interval".into()),
        }
    }

    fn config(v: Value) -> Result<Vec<NamedLimit>, String> {
        parse_config(&v, seconds)
    }

    #[test]
    fn limits_are_stored_in_one_form_and_read_back() {
        let limits = config(json!([
            {"name": "requests", "limit": 100, "duration": "1 min", "auto_apply": true},
            {"name": "tokens", "limit": 5000, "duration": "90 s"}
        ]))
        .unwrap();
        let stored = to_json(&limits);
        assert_eq!(
            stored,
            json!([
                {"name": "requests", "limit": 100, "duration": "00:01:00", "auto_apply": true},
                {"name": "tokens", "limit": 5000, "duration": "00:01:30", "auto_apply": false}
            ])
        );
        assert_eq!(from_stored(&stored), limits);
        assert_eq!(limits[1].window_us(), 90_000_000);
    }

    #[test]
    fn malformed_limits_are_refused() {
        for (bad, says) in [
            (json!({}), "array"),
            (json!([1]), "limit objects"),
            (json!([{"limit": 1, "duration": "1 s"}]), "name"),
            (
                json!([{"name": "a", "limit": 0, "duration": "1 s"}]),
                "integer > 0",
            ),
            (
                json!([{"name": "a", "limit": 1.5, "duration": "1 s"}]),
                "integer > 0",
            ),
            (json!([{"name": "a", "limit": 1}]), "\"duration\""),
            (
                json!([{"name": "a", "limit": 1, "duration": "soon"}]),
                "is not an interval",
            ),
            (
                json!([{"name": "a", "limit": 1, "duration": "0 s"}]),
                "positive",
            ),
            (
                json!([{"name": "a", "limit": 1, "duration": "1 s", "auto_apply": "yes"}]),
                "boolean",
            ),
            (
                json!([{"name": "a", "limit": 1, "duration": "1 s", "burst": 2}]),
                "unknown field",
            ),
            (
                json!([{"name": "a", "limit": 1, "duration": "1 s"}, {"name": "a", "limit": 2, "duration": "1 s"}]),
                "twice",
            ),
        ] {
            let err = config(bad.clone()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: Vec<Value> = (0..33)
            .map(|i| json!({"name": format!("l{i}"), "limit": 1, "duration": "1 s"}))
            .collect();
        assert!(config(Value::Array(many))
            .unwrap_err()
            .contains("at most 32"));
    }

    #[test]
    fn a_call_applies_auto_limits_and_the_ones_it_names() {
        let key = config(json!([
            {"name": "requests", "limit": 10, "duration": "1 s", "auto_apply": true},
            {"name": "tokens", "limit": 1000, "duration": "1 min"}
        ]))
        .unwrap();
        let identity = config(json!([
            {"name": "tokens", "limit": 5000, "duration": "1 min"},
            {"name": "burst", "limit": 3, "duration": "1 s", "auto_apply": true}
        ]))
        .unwrap();
        let default = Some(Rate {
            max: 50,
            window_us: 60_000_000,
            algorithm: Algorithm::Fixed,
        });
        let algs = (Algorithm::Sliding, Algorithm::Fixed);
        let names = |applied: &[Applied]| -> Vec<(String, &'static str, i64)> {
            applied
                .iter()
                .map(|a| (a.name.clone(), a.level.as_str(), a.cost))
                .collect()
        };
        let plain = select(&key, &identity, default, algs, &[], 4).unwrap();
        assert_eq!(
            names(&plain),
            vec![
                ("default".into(), "key", 4),
                ("requests".into(), "key", 1),
                ("burst".into(), "identity", 1)
            ]
        );
        let chosen = parse_selection(
            &json!([{"name": "tokens", "cost": 700}, {"name": "requests", "cost": 0}]),
        )
        .unwrap();
        let applied = select(&key, &identity, default, algs, &chosen, 1).unwrap();
        assert_eq!(
            names(&applied),
            vec![
                ("default".into(), "key", 1),
                ("requests".into(), "key", 0),
                ("tokens".into(), "key", 700),
                ("tokens".into(), "identity", 700),
                ("burst".into(), "identity", 1)
            ]
        );
        assert_eq!(applied[3].rate.algorithm, Algorithm::Fixed);
        let unknown = parse_selection(&json!([{"name": "nope"}])).unwrap();
        assert!(select(&key, &identity, default, algs, &unknown, 1)
            .unwrap_err()
            .contains("\"nope\""));
        let default_named = parse_selection(&json!([{"name": "default", "cost": 9}])).unwrap();
        assert_eq!(
            select(&[], &[], default, algs, &default_named, 1).unwrap()[0].cost,
            9
        );
        assert!(select(&[], &[], None, algs, &default_named, 1).is_err());
    }

    #[test]
    fn selections_are_checked() {
        assert_eq!(
            parse_selection(&json!([{"name": "a"}])).unwrap(),
            vec![("a".to_string(), 1)]
        );
        for bad in [
            json!({"name": "a"}),
            json!([{"name": "a", "cost": -1}]),
            json!([{"name": "a", "cost": "2"}]),
            json!([{"cost": 2}]),
            json!([{"name": "a", "weight": 2}]),
            json!([{"name": "a"}, {"name": "a"}]),
        ] {
            assert!(parse_selection(&bad).is_err(), "{bad}");
        }
    }
}
