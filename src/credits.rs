//! Credits (SPEC §7): `update_credits` sets, adds to or takes from a key's quota atomically,
//! while verifications keep spending it in shared memory. A `set` is a new quota (like
//! `update_api_key(remaining => …)`); an increment or decrement is added to `keys.credits` and
//! bumps the key's meter_version without setting `remaining`: the engine then adds what the
//! credits changed to the quota it counted (`engine::install`), so no spend made meanwhile is
//! lost and no credit is applied twice, and the rows hold it the same way (`remaining_sql!`).

use crate::errors::{self, key_not_found};
use crate::settings::{ArgError, Checked};
use crate::{audit, plans, verify};
use pgrx::prelude::*;
use serde_json::json;

/// What `update_credits` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A new quota; None: unlimited.
    Set(Option<i64>),
    Increment(i64),
    Decrement(i64),
}

impl Operation {
    pub fn parse(operation: Option<&str>, amount: Option<i64>) -> Checked<Operation> {
        let operation = operation.ok_or_else(|| {
            ArgError::new(
                "operation",
                "must be 'set', 'increment' or 'decrement', got NULL",
            )
        })?;
        let amount_needed = |op: fn(i64) -> Operation| match amount {
            Some(n) if n >= 0 => Ok(op(n)),
            Some(n) => Err(ArgError::new(
                "amount",
                format!("must not be negative, got {n}"),
            )),
            None => Err(ArgError::new(
                "amount",
                format!("must not be NULL for '{operation}'"),
            )),
        };
        match operation {
            "set" => match amount {
                Some(n) if n < 0 => Err(ArgError::new(
                    "amount",
                    format!("must not be negative, got {n}"),
                )),
                _ => Ok(Operation::Set(amount)),
            },
            "increment" => amount_needed(Operation::Increment),
            "decrement" => amount_needed(Operation::Decrement),
            other => Err(ArgError::new(
                "operation",
                format!(
                    "must be 'set', 'increment' or 'decrement', got \"{}\"",
                    errors::shown(other)
                ),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Set(_) => "set",
            Operation::Increment(_) => "increment",
            Operation::Decrement(_) => "decrement",
        }
    }

    /// The quota after the operation, given the quota left now (None: unlimited).
    pub fn apply(self, current: Option<i64>) -> Checked<Option<i64>> {
        let no_quota = || {
            ArgError::new(
                "operation",
                format!(
                    "'{}' needs a key with a quota; this one is unlimited",
                    self.name()
                ),
            )
            .hint("Set a quota first: update_credits(id, 'set', amount).")
        };
        match self {
            Operation::Set(amount) => Ok(amount),
            Operation::Increment(n) => {
                let left = current.ok_or_else(no_quota)?;
                Ok(Some(left.checked_add(n).ok_or_else(|| {
                    ArgError::new("amount", "would make the quota overflow a bigint")
                })?))
            }
            Operation::Decrement(n) => {
                let left = current.ok_or_else(no_quota)?;
                if n > left {
                    return Err(ArgError::new(
                        "amount",
                        format!("would take the quota below 0: {left} left, {n} to take"),
                    ));
                }
                Ok(Some(left - n))
            }
        }
    }
}

/// Applies `op` to the row of `holder` named `value`, already locked by the caller: a set is a
/// new quota at a new meter_version (unlimited: its refill goes too), an increment or decrement
/// is added to `credits` at a new meter_version.
fn apply(client: &mut pgrx::spi::SpiClient<'_>, holder: Holder, value: &str, op: Operation) {
    let (table, column) = holder.table();
    let actor = audit::actor();
    match op {
        Operation::Set(amount) => plans::update(
            client,
            &format!(
                "UPDATE apikeys.{table} SET remaining = $2, credits = 0,
                        meter_version = meter_version + 1, remaining_version = meter_version + 1,
                        refill_amount = CASE WHEN $2 IS NULL THEN NULL ELSE refill_amount END,
                        refill_interval = CASE WHEN $2 IS NULL THEN NULL ELSE refill_interval END,
                        refill_day = CASE WHEN $2 IS NULL THEN NULL ELSE refill_day END,
                        last_refill_at = CASE WHEN $2 IS NULL THEN NULL ELSE last_refill_at END,
                        refill_version = CASE WHEN $2 IS NULL THEN meter_version + 1
                                              ELSE refill_version END,
                        updated_at = clock_timestamp(), updated_by = $3
                  WHERE {column} = $1"
            ),
            None,
            &[value.into(), amount.into(), actor.into()],
        ),
        Operation::Increment(n) | Operation::Decrement(n) => {
            let delta = if matches!(op, Operation::Increment(_)) {
                n
            } else {
                -n
            };
            plans::update(
                client,
                &format!(
                    "UPDATE apikeys.{table} SET credits = credits + $2,
                            meter_version = meter_version + 1,
                            updated_at = clock_timestamp(), updated_by = $3
                      WHERE {column} = $1"
                ),
                None,
                &[value.into(), delta.into(), actor.into()],
            )
        }
    };
}

/// Sets, increments or decrements a key's quota (`remaining`) atomically and returns the new
/// quota (NULL: unlimited). `set` with a NULL amount makes the key unlimited (its refill goes
/// too); `increment`/`decrement` need a key with a quota, and a decrement below 0 is refused.
/// Spends made by concurrent verifications are never lost.
#[pg_extern(security_definer, volatile)]
#[search_path(pg_catalog, pg_temp)]
fn update_credits(
    id: Option<String>,
    operation: Option<String>,
    amount: Option<i64>,
) -> Option<i64> {
    let id = id.unwrap_or_else(|| errors::invalid_argument("id", "must not be NULL"));
    let op = errors::checked(Operation::parse(operation.as_deref(), amount));
    update(Holder::Key, &id, op)
}

/// What holds a quota: a key, or an identity.
#[derive(Clone, Copy)]
pub enum Holder {
    Key,
    Identity,
}

impl Holder {
    /// Its table, and the column that names a row of it.
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Holder::Key => ("keys", "id"),
            Holder::Identity => ("identities", "owner"),
        }
    }

    /// The row's quota (locked), when it was created, its remaining and refill versions, its
    /// credits and its id, for the row named `$1`.
    fn locked_sql(self) -> &'static str {
        match self {
            Holder::Key => concat!(
                "SELECT ",
                crate::remaining_sql!(),
                ", k.created_at, k.remaining_version, k.refill_version, k.credits, k.id
                   FROM apikeys.keys k LEFT JOIN apikeys.meters m
                     ON m.key_id = k.id AND m.key_created_at = k.created_at
                  WHERE k.id = $1 FOR UPDATE OF k"
            ),
            Holder::Identity => concat!(
                "SELECT ",
                crate::remaining_sql!(),
                ", k.created_at, k.remaining_version, k.refill_version, k.credits, k.id::text
                   FROM apikeys.identities k LEFT JOIN apikeys.identity_meters m
                     ON m.identity_id = k.id AND m.identity_created_at = k.created_at
                  WHERE k.owner = $1 FOR UPDATE OF k"
            ),
        }
    }
}

/// The quota of a locked row as it is now: what the rows hold, or what shared memory counted
/// since (with the credits it has not taken in yet).
pub struct Quota {
    pub now: Option<i64>,
}

/// Reads the quota of `holder` named `name`, locked for the transaction; None if there is none.
pub fn locked_quota(
    client: &mut pgrx::spi::SpiClient<'_>,
    holder: Holder,
    name: &str,
) -> Option<Quota> {
    let current = plans::update(client, holder.locked_sql(), None, &[name.into()]);
    if current.is_empty() {
        return None;
    }
    let row = current.first();
    let stored = errors::internal(row.get::<i64>(1));
    let created_us =
        errors::internal(row.get::<TimestampWithTimeZone>(2)).map_or(0, verify::epoch_us);
    let set_at = (
        errors::internal(row.get::<i64>(3)).unwrap_or(0),
        errors::internal(row.get::<i64>(4)).unwrap_or(0),
    );
    let credits = errors::internal(row.get::<i64>(5)).unwrap_or(0);
    let id = errors::internal(row.get::<String>(6)).unwrap_or_default();
    let entry = match holder {
        Holder::Key => id,
        Holder::Identity => crate::engine::identity_entry(id.parse().unwrap_or(0)),
    };
    let now = crate::engine::remaining_now(&entry, created_us, set_at, credits, stored);
    Some(Quota { now })
}

/// `op` on the quota of `holder` named `name`: checked against the quota as it is now, applied
/// to the row, audited; the new quota. P0002 for an unknown name.
pub fn update(holder: Holder, name: &str, op: Operation) -> Option<i64> {
    Spi::connect_mut(|client| {
        let Some(quota) = locked_quota(client, holder, name) else {
            match holder {
                Holder::Key => key_not_found(name),
                Holder::Identity => crate::identities::identity_not_found(name),
            }
        };
        let after = errors::checked(op.apply(quota.now));
        apply(client, holder, name, op);
        let action = match holder {
            Holder::Key => "update_credits",
            Holder::Identity => "update_identity_credits",
        };
        let amount = match op {
            Operation::Set(a) => a,
            Operation::Increment(n) | Operation::Decrement(n) => Some(n),
        };
        let mut details = json!({"operation": op.name(), "amount": amount, "remaining": after});
        if matches!(holder, Holder::Identity) {
            details["owner"] = json!(name);
        }
        let key_id = matches!(holder, Holder::Key).then_some(name);
        audit::record(client, action, key_id, details);
        after
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn operations_and_their_arguments() {
        assert_eq!(
            Operation::parse(Some("set"), Some(5)),
            Ok(Operation::Set(Some(5)))
        );
        assert_eq!(
            Operation::parse(Some("set"), None),
            Ok(Operation::Set(None))
        );
        assert_eq!(
            Operation::parse(Some("increment"), Some(3)),
            Ok(Operation::Increment(3))
        );
        assert_eq!(
            Operation::parse(Some("decrement"), Some(0)),
            Ok(Operation::Decrement(0))
        );
        for (op, amount, arg) in [
            (Some("add"), Some(1), "operation"),
            (None, Some(1), "operation"),
            (Some("increment"), None, "amount"),
            (Some("decrement"), Some(-1), "amount"),
            (Some("set"), Some(-1), "amount"),
        ] {
            assert_eq!(
                Operation::parse(op, amount).unwrap_err().arg,
                arg,
                "{op:?} {amount:?}"
            );
        }
    }

    #[test]
    fn credits_change_a_quota_and_never_take_it_below_zero() {
        assert_eq!(Operation::Increment(3).apply(Some(2)), Ok(Some(5)));
        assert_eq!(Operation::Decrement(2).apply(Some(2)), Ok(Some(0)));
        assert_eq!(
            Operation::Decrement(3).apply(Some(2)).unwrap_err().arg,
            "amount"
        );
        assert_eq!(
            Operation::Increment(1).apply(None).unwrap_err().arg,
            "operation"
        );
        assert_eq!(
            Operation::Decrement(1).apply(None).unwrap_err().arg,
            "operation"
        );
        assert_eq!(Operation::Set(None).apply(Some(7)), Ok(None));
        assert_eq!(Operation::Set(Some(9)).apply(None), Ok(Some(9)));
        assert!(Operation::Increment(i64::MAX).apply(Some(1)).is_err());
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::test_support::*;
    use pgrx::prelude::*;

    fn credits(id: &str, op: &str, amount: &str) -> Option<i64> {
        one::<i64>(&format!(
            "SELECT apikeys.update_credits('{id}', '{op}', {amount})"
        ))
    }

    #[pg_test]
    fn credits_add_to_what_use_left() {
        let (id, key) = create("remaining => 3");
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(2));
        assert_eq!(credits(&id, "increment", "10"), Some(12));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(11));
        assert_eq!(credits(&id, "decrement", "5"), Some(6));
        assert_eq!(
            one::<i64>(&format!(
                "SELECT remaining FROM apikeys.get_api_key('{id}')"
            )),
            Some(6)
        );
        assert_eq!(credits(&id, "set", "1"), Some(1));
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(code(&key, ""), "USAGE_EXCEEDED");
        assert_eq!(credits(&id, "increment", "2"), Some(2));
        assert_eq!(code(&key, "cost => 2"), "VALID");
        assert_eq!(credits(&id, "set", "NULL"), None);
        assert_eq!(field::<i64>(&key, "", "remaining"), None);
        assert_eq!(code(&key, "cost => 1000"), "VALID");
        assert_eq!(
            one::<String>(&format!(
                "SELECT string_agg(details->>'operation', ',' ORDER BY id) FROM apikeys.audit_log
                  WHERE key_id = '{id}' AND action = 'update_credits'"
            ))
            .as_deref(),
            Some("increment,decrement,set,increment,set")
        );
    }

    #[pg_test]
    fn credits_refuse_what_cannot_be_done() {
        let (id, _) = create("");
        assert_error(
            &format!("SELECT apikeys.update_credits('{id}', 'increment', 1)"),
            "22023",
            "needs a key with a quota",
        );
        let (id, _) = create("remaining => 2");
        assert_error(
            &format!("SELECT apikeys.update_credits('{id}', 'decrement', 3)"),
            "22023",
            "below 0",
        );
        assert_error(
            &format!("SELECT apikeys.update_credits('{id}', 'double', 3)"),
            "22023",
            "\"operation\"",
        );
        assert_error(
            "SELECT apikeys.update_credits('nope', 'set', 3)",
            "P0002",
            "nope",
        );
        assert_eq!(credits(&id, "increment", "0"), Some(2));
    }

    #[pg_test]
    fn quotas_near_the_bigint_limit_still_read_and_spend() {
        let (id, key) = create("remaining => 9000000000000000000");
        assert_eq!(code(&key, ""), "VALID");
        assert_eq!(credits(&id, "set", "9223372036854775807"), Some(i64::MAX));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(i64::MAX - 1));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM apikeys.list_api_keys()").map(|n| n > 0),
            Some(true)
        );
    }

    #[pg_test]
    fn a_refill_replaces_credits_and_update_api_key_sets_over_them() {
        let (id, key) = create("refill_amount => 5, refill_interval => '1 hour'");
        assert_eq!(credits(&id, "increment", "5"), Some(10));
        run(&format!(
            "SELECT apikeys.update_api_key('{id}', remaining => 4)"
        ));
        assert_eq!(field::<i64>(&key, "", "remaining"), Some(3));
        assert_eq!(credits(&id, "increment", "1"), Some(4));
    }
}
