//! Quota, refill and fixed-window rate limit: what one verification of a metered key decides.
//! Pure Rust; PostgreSQL supplies the time comparisons (refill due, window over) so interval
//! arithmetic stays its own.

/// The counters of a key at the moment of a verification.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meter {
    pub remaining: Option<i64>,
    pub refill_amount: Option<i64>,
    pub refill_due: bool,
    pub rate_limit_max: Option<i32>,
    pub window_count: i64,
    pub window_over: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    UsageExceeded,
    RateLimited,
}

/// What a verification of `cost` leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub verdict: Verdict,
    /// Quota left after this call (NULL: unlimited).
    pub remaining: Option<i64>,
    /// Used in the current window after this call.
    pub window_used: i64,
    /// Whether the call opens a new window (and so starts it now).
    pub opens_window: bool,
}

impl Meter {
    /// Applies a due refill and the current window, then charges `cost` if the quota and the
    /// window allow it and `permitted` (the key has the required permissions). A call that is not
    /// allowed, or not permitted, charges nothing.
    pub fn charge(&self, cost: i64, permitted: bool) -> Charge {
        let remaining = if self.refill_due {
            self.refill_amount
        } else {
            self.remaining
        };
        let window_count = if self.window_over {
            0
        } else {
            self.window_count
        };
        let verdict = if remaining.is_some_and(|r| r < cost) {
            Verdict::UsageExceeded
        } else if self
            .rate_limit_max
            .is_some_and(|max| window_count + cost > i64::from(max))
        {
            Verdict::RateLimited
        } else {
            Verdict::Allowed
        };
        let consumed = if verdict == Verdict::Allowed && permitted {
            cost
        } else {
            0
        };
        Charge {
            verdict,
            remaining: remaining.map(|r| r - consumed),
            window_used: window_count + consumed,
            opens_window: self.window_over && consumed > 0,
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn quota(n: i64) -> Meter {
        Meter {
            remaining: Some(n),
            ..Meter::default()
        }
    }

    fn window(max: i32, count: i64, over: bool) -> Meter {
        Meter {
            rate_limit_max: Some(max),
            window_count: count,
            window_over: over,
            ..Meter::default()
        }
    }

    #[test]
    fn quota_is_spent_by_cost_and_never_below_zero() {
        assert_eq!(quota(3).charge(1, true).remaining, Some(2));
        assert_eq!(quota(3).charge(3, true).remaining, Some(0));
        let over = quota(2).charge(3, true);
        assert_eq!(
            (over.verdict, over.remaining),
            (Verdict::UsageExceeded, Some(2))
        );
        assert_eq!(quota(0).charge(0, true).verdict, Verdict::Allowed);
        assert_eq!(Meter::default().charge(1_000_000, true).remaining, None);
    }

    #[test]
    fn a_due_refill_replaces_the_quota() {
        let m = Meter {
            remaining: Some(0),
            refill_amount: Some(5),
            refill_due: true,
            ..Meter::default()
        };
        assert_eq!(m.charge(1, true).remaining, Some(4));
        let not_due = Meter {
            refill_due: false,
            ..m
        };
        assert_eq!(not_due.charge(1, true).verdict, Verdict::UsageExceeded);
    }

    #[test]
    fn the_window_allows_max_then_limits_until_it_is_over() {
        assert_eq!(window(2, 1, false).charge(1, true).window_used, 2);
        assert_eq!(
            window(2, 2, false).charge(1, true).verdict,
            Verdict::RateLimited
        );
        assert_eq!(
            window(2, 0, false).charge(3, true).verdict,
            Verdict::RateLimited
        );
        let fresh = window(2, 2, true).charge(1, true);
        assert_eq!(
            (fresh.verdict, fresh.window_used, fresh.opens_window),
            (Verdict::Allowed, 1, true)
        );
    }

    #[test]
    fn quota_is_checked_before_the_window_and_failures_charge_nothing() {
        let both = Meter {
            remaining: Some(0),
            ..window(1, 1, false)
        };
        assert_eq!(both.charge(1, true).verdict, Verdict::UsageExceeded);
        let limited = Meter {
            remaining: Some(10),
            ..window(1, 1, false)
        };
        assert_eq!(
            limited.charge(1, true),
            Charge {
                verdict: Verdict::RateLimited,
                remaining: Some(10),
                window_used: 1,
                opens_window: false
            }
        );
        let unpermitted = Meter {
            remaining: Some(10),
            ..window(5, 0, true)
        };
        assert_eq!(
            unpermitted.charge(1, false),
            Charge {
                verdict: Verdict::Allowed,
                remaining: Some(10),
                window_used: 0,
                opens_window: false
            }
        );
    }
}
