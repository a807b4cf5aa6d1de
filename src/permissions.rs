//! Permission documents: `{"resource": ["action", ...]}`, with `"*"` as a wildcard action (every
//! action of that resource) or resource (every resource). Parsing and matching are pure Rust so
//! they can be unit-tested and later called per row from policies without SPI.

use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const WILDCARD: &str = "*";
/// Upper bound on a permissions document, so a 1 MB argument gets a clear error, not a huge row.
pub const MAX_ENTRIES: usize = 1000;
const MAX_NAME_CHARS: usize = 200;

pub type Permissions = BTreeMap<String, Vec<String>>;

/// Why a document is not a permissions document; shown after the argument's name.
pub fn parse(value: &Value) -> Result<Permissions, String> {
    let Value::Object(map) = value else {
        return Err(format!(
            "must be a JSON object of string arrays, not {}",
            kind(value)
        ));
    };
    parse_object(map)
}

fn parse_object(map: &Map<String, Value>) -> Result<Permissions, String> {
    let mut out = Permissions::new();
    let mut entries = 0usize;
    for (resource, actions) in map {
        check_name("resource", resource)?;
        let Value::Array(actions) = actions else {
            return Err(format!(
                "must map each resource to an array of action strings; \"{resource}\" maps to {}",
                kind(actions)
            ));
        };
        let mut list = Vec::with_capacity(actions.len());
        for action in actions {
            let Value::String(action) = action else {
                return Err(format!(
                    "must list actions as strings; \"{resource}\" lists {}",
                    kind(action)
                ));
            };
            check_name("action", action)?;
            if !list.contains(action) {
                list.push(action.clone());
            }
        }
        entries += 1 + list.len();
        if entries > MAX_ENTRIES {
            return Err(format!(
                "must have at most {MAX_ENTRIES} resources and actions"
            ));
        }
        out.insert(resource.clone(), list);
    }
    Ok(out)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "must use {what} names of 1 to {MAX_NAME_CHARS} characters"
        ));
    }
    Ok(())
}

/// How a JSON value is named in messages: "an array", "a string"...
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The document as stored and returned.
pub fn to_json(perms: &Permissions) -> Value {
    serde_json::to_value(perms).unwrap_or(Value::Object(Map::new()))
}

/// Does `granted` allow `action` on `resource`?
pub fn allows(granted: &Permissions, resource: &str, action: &str) -> bool {
    let has = |res: &str| {
        granted
            .get(res)
            .is_some_and(|acts| acts.iter().any(|a| a == action || a == WILDCARD))
    };
    has(resource) || has(WILDCARD)
}

/// Does `granted` allow every listed action of every listed resource in `required`?
pub fn covers(granted: &Permissions, required: &Permissions) -> bool {
    required
        .iter()
        .all(|(res, acts)| acts.iter().all(|act| allows(granted, res, act)))
}

/// What either document grants: a key's own permissions with those of its roles.
pub fn union(a: &Permissions, b: &Permissions) -> Permissions {
    let mut out = a.clone();
    for (resource, actions) in b {
        let list = out.entry(resource.clone()).or_default();
        for action in actions {
            if !list.contains(action) {
                list.push(action.clone());
            }
        }
    }
    out
}

/// What both documents grant: a token may carry no more than its key grants *now*, so the
/// context of a token is the intersection of the two. Exact: `covers(&intersect(a, b), r)`
/// equals `covers(a, r) && covers(b, r)` for every `r` (a grant is a union of
/// resource-set × action-set rectangles, and rectangles intersect component-wise).
pub fn intersect(a: &Permissions, b: &Permissions) -> Permissions {
    let mut out = Permissions::new();
    for (res_a, acts_a) in a {
        for (res_b, acts_b) in b {
            let Some(resource) = meet(res_a, res_b) else {
                continue;
            };
            let both: Vec<&String> = if acts_a.iter().any(|x| x == WILDCARD) {
                acts_b.iter().collect()
            } else if acts_b.iter().any(|x| x == WILDCARD) {
                acts_a.iter().collect()
            } else {
                acts_a.iter().filter(|x| acts_b.contains(x)).collect()
            };
            if both.is_empty() {
                continue;
            }
            let list = out.entry(resource.to_owned()).or_default();
            for action in both {
                if !list.contains(action) {
                    list.push(action.clone());
                }
            }
        }
    }
    out
}

/// What a verification requires (SPEC §7): a permissions document (every listed action of every
/// listed resource), or a combinator `{"any": [q, …]}` / `{"all": [q, …]}` of such queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    Has(Permissions),
    Any(Vec<Query>),
    All(Vec<Query>),
}

/// Combinator levels a query may nest.
pub const MAX_QUERY_DEPTH: usize = 16;

impl Query {
    /// The query NULL stands for: nothing is required.
    pub fn nothing() -> Query {
        Query::Has(Permissions::new())
    }

    pub fn requires_nothing(&self) -> bool {
        matches!(self, Query::Has(p) if p.is_empty())
    }

    /// Parses a query. An object whose single key is `any` or `all` with an array of objects is
    /// a combinator; anything else is a permissions document (so `{"any": ["read"]}` requires
    /// action `read` of a resource named `any`). An empty combinator, or one nested deeper than
    /// MAX_QUERY_DEPTH, is refused; so is a query with more than MAX_ENTRIES names in all.
    pub fn parse(value: &Value) -> Result<Query, String> {
        let mut names = 0;
        Query::parse_at(value, 0, &mut names)
    }

    fn parse_at(value: &Value, depth: usize, names: &mut usize) -> Result<Query, String> {
        if let Some((which, items)) = combinator(value) {
            if depth >= MAX_QUERY_DEPTH {
                return Err(format!(
                    "must nest \"any\"/\"all\" at most {MAX_QUERY_DEPTH} levels deep"
                ));
            }
            if items.is_empty() {
                return Err(format!("must list at least one query in \"{which}\""));
            }
            let parts = items
                .iter()
                .map(|item| Query::parse_at(item, depth + 1, names))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(if which == "any" {
                Query::Any(parts)
            } else {
                Query::All(parts)
            });
        }
        let perms = parse(value)?;
        *names += perms.values().map(|acts| 1 + acts.len()).sum::<usize>();
        if *names > MAX_ENTRIES {
            return Err(format!(
                "must have at most {MAX_ENTRIES} resources and actions"
            ));
        }
        Ok(Query::Has(perms))
    }

    /// Does `granted` satisfy the query?
    pub fn satisfied_by(&self, granted: &Permissions) -> bool {
        match self {
            Query::Has(required) => covers(granted, required),
            Query::Any(parts) => parts.iter().any(|q| q.satisfied_by(granted)),
            Query::All(parts) => parts.iter().all(|q| q.satisfied_by(granted)),
        }
    }
}

/// `("any" | "all", items)` when `value` has the combinator shape: one key, an array value whose
/// items are all objects (an empty array counts, to be refused).
fn combinator(value: &Value) -> Option<(&'static str, &Vec<Value>)> {
    let Value::Object(map) = value else {
        return None;
    };
    if map.len() != 1 {
        return None;
    }
    let (key, items) = map.iter().next()?;
    let which = match key.as_str() {
        "any" => "any",
        "all" => "all",
        _ => return None,
    };
    match items {
        Value::Array(items) if items.iter().all(Value::is_object) => Some((which, items)),
        _ => None,
    }
}

/// The common part of two names where `"*"` means every name.
fn meet<'a>(a: &'a str, b: &'a str) -> Option<&'a str> {
    match (a, b) {
        (WILDCARD, other) | (other, WILDCARD) => Some(other),
        _ if a == b => Some(a),
        _ => None,
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Permissions {
        parse(&v).expect("valid permissions")
    }

    #[test]
    fn parses_and_dedups() {
        let perms = p(json!({"orders": ["read", "write", "read"], "reports": []}));
        assert_eq!(perms["orders"], vec!["read", "write"]);
        assert!(perms["reports"].is_empty());
        assert_eq!(
            to_json(&perms),
            json!({"orders": ["read", "write"], "reports": []})
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            json!([]),
            json!("orders"),
            json!(null),
            json!({"orders": "read"}),
            json!({"orders": [1]}),
            json!({"orders": [null]}),
            json!({"orders": [["read"]]}),
            json!({"": ["read"]}),
            json!({"orders": [""]}),
            json!({"orders": ["x".repeat(201)]}),
        ] {
            assert!(parse(&bad).is_err(), "accepted {bad}");
        }
        let huge: Map<String, Value> = (0..2000).map(|i| (format!("r{i}"), json!(["a"]))).collect();
        assert!(parse(&Value::Object(huge)).is_err());
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "\\PC{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map("\\PC{0,8}", inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(value in arb_json()) {
            if let Ok(perms) = parse(&value) {
                proptest::prop_assert_eq!(parse(&to_json(&perms)), Ok(perms));
            }
        }

        #[test]
        fn intersection_is_exact(
            a in proptest::collection::btree_map("[ab*]", proptest::collection::vec("[xy*]", 0..3), 0..4),
            b in proptest::collection::btree_map("[ab*]", proptest::collection::vec("[xy*]", 0..3), 0..4),
            res in "[abc*]",
            act in "[xyz*]",
        ) {
            let both = intersect(&a, &b);
            let required: Permissions = [(res, vec![act])].into_iter().collect();
            proptest::prop_assert_eq!(
                covers(&both, &required),
                covers(&a, &required) && covers(&b, &required)
            );
        }

        #[test]
        fn a_grant_covers_itself_and_everything_covers_anything(
            doc in proptest::collection::btree_map("[a-z*]{1,6}", proptest::collection::vec("[a-z*]{1,6}", 0..4), 0..6)
        ) {
            let perms: Permissions = doc;
            let everything = p(json!({"*": ["*"]}));
            proptest::prop_assert!(covers(&perms, &perms));
            proptest::prop_assert!(covers(&everything, &perms));
            proptest::prop_assert!(covers(&perms, &Permissions::new()));
        }
    }

    proptest::proptest! {
        /// A union grants exactly what one of its parts grants.
        #[test]
        fn union_is_exact(
            a in proptest::collection::btree_map("[ab*]", proptest::collection::vec("[xy*]", 0..3), 0..4),
            b in proptest::collection::btree_map("[ab*]", proptest::collection::vec("[xy*]", 0..3), 0..4),
            res in "[abc]",
            act in "[xyz]",
        ) {
            let either = union(&a, &b);
            proptest::prop_assert_eq!(
                allows(&either, &res, &act),
                allows(&a, &res, &act) || allows(&b, &res, &act)
            );
        }
    }

    #[test]
    fn intersection_keeps_what_both_grant() {
        let key = p(json!({"*": ["read"], "orders": ["write"]}));
        let token = p(json!({"orders": ["*"], "reports": ["read", "export"]}));
        assert_eq!(
            to_json(&intersect(&key, &token)),
            json!({"orders": ["read", "write"], "reports": ["read"]})
        );
        assert!(intersect(&key, &Permissions::new()).is_empty());
        let all = p(json!({"*": ["*"]}));
        assert_eq!(intersect(&all, &token), token);
        assert_eq!(intersect(&all, &all), all);
    }

    fn q(v: Value) -> Query {
        Query::parse(&v).expect("valid query")
    }

    #[test]
    fn any_and_all_combine_permission_documents() {
        let reader = p(json!({"orders": ["read"]}));
        let admin = p(json!({"admin": ["*"], "orders": ["read"]}));
        let query = q(
            json!({"all": [{"orders": ["read"]}, {"any": [{"admin": ["*"]}, {"orders": ["write"]}]}]}),
        );
        assert!(!query.satisfied_by(&reader));
        assert!(query.satisfied_by(&admin));
        assert!(query.satisfied_by(&p(json!({"orders": ["read", "write"]}))));
        assert!(q(json!({"any": [{"x": ["y"]}, {"orders": ["read"]}]})).satisfied_by(&reader));
        assert!(!q(json!({"all": [{"x": ["y"]}, {"orders": ["read"]}]})).satisfied_by(&reader));
        // Not the combinator shape: a permissions document naming a resource "any".
        assert_eq!(
            q(json!({"any": ["read"]})),
            Query::Has(p(json!({"any": ["read"]})))
        );
        // Two keys are no combinator, and a document's actions are strings.
        assert!(Query::parse(&json!({"any": [{"a": ["b"]}], "all": [{"a": ["b"]}]})).is_err());
        assert!(q(json!({})).requires_nothing());
        assert!(!q(json!({"any": [{}]})).requires_nothing());
    }

    #[test]
    fn malformed_queries_are_refused() {
        assert!(Query::parse(&json!({"any": []})).is_err());
        assert!(Query::parse(&json!({"all": [{"orders": "read"}]})).is_err());
        assert!(Query::parse(&json!({"any": [{"orders": ["read"]}, "x"]})).is_err());
        assert!(Query::parse(&json!(["orders"])).is_err());
        let nested = |levels: usize| {
            let mut v = json!({"orders": ["read"]});
            for _ in 0..levels {
                v = json!({"any": [v]});
            }
            v
        };
        assert!(Query::parse(&nested(16)).is_ok());
        let err = Query::parse(&nested(17)).unwrap_err();
        assert!(err.contains("at most 16 levels"), "{err}");
        // The size bound counts every document of the query.
        let wide: Vec<Value> = (0..600).map(|i| json!({format!("r{i}"): ["a"]})).collect();
        assert!(Query::parse(&json!({"any": wide})).is_err());
    }

    proptest::proptest! {
        /// `any` is some part, `all` is every part, and a plain document is itself.
        #[test]
        fn combinators_mean_or_and_and(
            granted in proptest::collection::btree_map("[ab*]", proptest::collection::vec("[xy*]", 0..3), 0..4),
            parts in proptest::collection::vec(
                proptest::collection::btree_map("[abc]", proptest::collection::vec("[xyz]", 1..3), 1..3), 1..4),
        ) {
            let docs: Vec<Value> = parts.iter().map(to_json).collect();
            let each: Vec<bool> = parts.iter().map(|r| covers(&granted, r)).collect();
            let any = q(json!({"any": docs.clone()}));
            let all = q(json!({"all": docs}));
            proptest::prop_assert_eq!(any.satisfied_by(&granted), each.iter().any(|b| *b));
            proptest::prop_assert_eq!(all.satisfied_by(&granted), each.iter().all(|b| *b));
        }
    }

    #[test]
    fn matching_and_wildcards() {
        let perms = p(json!({"orders": ["read"], "reports": ["*"]}));
        assert!(allows(&perms, "orders", "read"));
        assert!(!allows(&perms, "orders", "write"));
        assert!(allows(&perms, "reports", "anything"));
        assert!(!allows(&perms, "users", "read"));

        let any_read = p(json!({"*": ["read"]}));
        assert!(allows(&any_read, "users", "read"));
        assert!(!allows(&any_read, "users", "write"));

        let all = p(json!({"*": ["*"]}));
        assert!(allows(&all, "x", "y"));

        assert!(covers(&perms, &p(json!({}))));
        assert!(covers(
            &perms,
            &p(json!({"orders": ["read"], "reports": ["a", "b"]}))
        ));
        assert!(!covers(&perms, &p(json!({"orders": ["read", "write"]}))));
        assert!(!covers(
            &Permissions::new(),
            &p(json!({"orders": ["read"]}))
        ));
        // A literal "*" in `required` needs a wildcard grant.
        assert!(!covers(
            &p(json!({"orders": ["read"]})),
            &p(json!({"orders": ["*"]}))
        ));
        assert!(covers(&perms, &p(json!({"reports": ["*"]}))));
    }
}
