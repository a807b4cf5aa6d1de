//! Quota, refill and rate limit: what one verification of a metered key decides, as a pure
//! function of the key's counters, its limits and the wall clock (epoch microseconds). The same
//! function runs on counters in shared memory (the engine, `shmem`) and on counters read from
//! `apikeys.meters` under a row lock (without shared_preload_libraries), so both paths agree.
//!
//! Rate-limit windows:
//! - `Fixed`: a window opens at the first VALID call after the previous one ended and lets at
//!   most `max` through until it ends (SPEC §3). A client can spend `max` at the end of one
//!   window and `max` again at the start of the next: a double burst within a few moments.
//! - `Sliding` (Cloudflare/Unkey): time is cut into buckets of `window` aligned on the epoch; the
//!   count over the last `window` is estimated as the current bucket plus the previous bucket
//!   weighted by the part of it still inside the window. The burst across a bucket edge is
//!   bounded by `max` over any window-long span (up to the estimate's assumption that the
//!   previous bucket's calls were spread evenly).

/// Which rate-limit window a key uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Sliding,
    Fixed,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "sliding" => Some(Algorithm::Sliding),
            "fixed" => Some(Algorithm::Fixed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sliding => "sliding",
            Algorithm::Fixed => "fixed",
        }
    }
}

/// A rate limit: at most `max` per `window_us` microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub max: i64,
    pub window_us: i64,
    pub algorithm: Algorithm,
}

/// What changes with use: the quota left and the rate-limit window. For a fixed window
/// `window_start_us` is when it opened; for a sliding one the start of the current bucket,
/// `window_previous` being the previous bucket's count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub remaining: Option<i64>,
    pub window_start_us: Option<i64>,
    pub window_count: i64,
    pub window_previous: i64,
}

/// A key's limits at the moment of a call. `refill_due` is decided by the caller (calendar
/// arithmetic on intervals is PostgreSQL's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub refill_amount: Option<i64>,
    pub refill_due: bool,
    pub rate: Option<Rate>,
    /// What the call takes from the window when not the call's cost (a named limit's cost).
    pub rate_cost: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    UsageExceeded,
    RateLimited,
}

/// What a call of `cost` decided and leaves behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub verdict: Verdict,
    /// Counters after the call (the refill applied, the window moved on, the cost taken when
    /// allowed and permitted).
    pub after: Counters,
    /// What was taken from the quota (0 unless allowed, permitted and the key has a quota).
    pub spent: i64,
    /// Whether a due refill was applied.
    pub refilled: bool,
    /// The rate limit's remaining allowance after the call, and when its window (bucket) ends;
    /// None without a rate limit, and the end None when no fixed window is open.
    pub rate_remaining: Option<i64>,
    pub reset_us: Option<i64>,
}

/// The window as it stands at `now_us` before this call: (start, count, previous count).
fn current_window(c: &Counters, rate: &Rate, now_us: i64) -> (Option<i64>, i64, i64) {
    let window = rate.window_us.max(1);
    match rate.algorithm {
        Algorithm::Fixed => match c.window_start_us {
            Some(start) if now_us < start.saturating_add(window) => {
                (Some(start), c.window_count, 0)
            }
            _ => (None, 0, 0),
        },
        Algorithm::Sliding => {
            let bucket = now_us.div_euclid(window).saturating_mul(window);
            match c.window_start_us {
                Some(start) if start == bucket => (Some(bucket), c.window_count, c.window_previous),
                Some(start) if start.saturating_add(window) == bucket => {
                    (Some(bucket), 0, c.window_count)
                }
                _ => (Some(bucket), 0, 0),
            }
        }
    }
}

/// The sliding estimate `count + previous × (window − elapsed) / window`, rounded up.
fn sliding_estimate(count: i64, previous: i64, window: i64, elapsed: i64) -> i64 {
    let weighted = i128::from(previous) * i128::from(window - elapsed);
    let window = i128::from(window);
    let rounded_up = (weighted + window - 1).div_euclid(window);
    i64::try_from(i128::from(count) + rounded_up).unwrap_or(i64::MAX)
}

/// Charges `cost` if the quota and the window allow it and `permitted` (the key grants what was
/// required). A refused or unpermitted call takes nothing; a due refill applies either way.
pub fn charge(c: &Counters, limits: &Limits, now_us: i64, cost: i64, permitted: bool) -> Charge {
    let refilled = limits.refill_due && limits.refill_amount.is_some();
    let remaining = if refilled {
        limits.refill_amount
    } else {
        c.remaining
    };
    let window = limits
        .rate
        .map(|rate| (rate, current_window(c, &rate, now_us)));
    let rate_cost = limits.rate_cost.unwrap_or(cost);
    let over_quota = remaining.is_some_and(|r| r < cost);
    let over_rate = window.is_some_and(|(rate, (start, count, previous))| match rate.algorithm {
        Algorithm::Fixed => count.saturating_add(rate_cost) > rate.max,
        Algorithm::Sliding => {
            let elapsed = now_us - start.unwrap_or(now_us);
            sliding_estimate(
                count.saturating_add(rate_cost),
                previous,
                rate.window_us.max(1),
                elapsed,
            ) > rate.max
        }
    });
    let verdict = if over_quota {
        Verdict::UsageExceeded
    } else if over_rate {
        Verdict::RateLimited
    } else {
        Verdict::Allowed
    };
    let taken = if verdict == Verdict::Allowed && permitted {
        cost
    } else {
        0
    };
    let mut after = Counters {
        remaining: remaining.map(|r| r - taken),
        ..*c
    };
    let window_taken = if verdict == Verdict::Allowed && permitted {
        rate_cost
    } else {
        0
    };
    let (mut rate_remaining, mut reset_us) = (None, None);
    if let Some((rate, (start, count, previous))) = window {
        let window = rate.window_us.max(1);
        let count = count + window_taken;
        match rate.algorithm {
            Algorithm::Fixed => {
                // A window opens with the first call that takes something from it.
                let start = start.or((window_taken > 0).then_some(now_us));
                rate_remaining = Some((rate.max - count).max(0));
                reset_us = start.map(|s| s.saturating_add(window));
                if start.is_some() {
                    after.window_start_us = start;
                    after.window_count = count;
                    after.window_previous = 0;
                }
            }
            Algorithm::Sliding => {
                let bucket = start.unwrap_or(now_us);
                let estimate = sliding_estimate(count, previous, window, now_us - bucket);
                rate_remaining = Some((rate.max - estimate).max(0));
                reset_us = Some(bucket.saturating_add(window));
                after.window_start_us = Some(bucket);
                after.window_count = count;
                after.window_previous = previous;
            }
        }
    }
    Charge {
        verdict,
        after,
        spent: if remaining.is_some() { taken } else { 0 },
        refilled,
        rate_remaining,
        reset_us,
    }
}

/// The most quota the writer records as spent ahead of the calls that will spend it. PostgreSQL's
/// sequences do the same (they log 32 values ahead): a crash then loses up to this much of a
/// hot key's quota that no call used, and in return most spends need no commit of their own.
pub const WRITE_AHEAD_MAX: u8 = 32;

/// How much of the quota left to write as already spent: four times the spends since the last
/// write (so that callers are covered until the next write, which they ask for when half the
/// cover is used), at most WRITE_AHEAD_MAX and at most an eighth of what is left (a small quota
/// is not written ahead at all: each of its spends is committed); nothing for a key whose spends
/// stopped, and nothing when `at_rest` (the writer leaves or the server stops), so that a clean
/// shutdown loses nothing.
pub fn write_ahead(remaining: Option<i64>, spends: u32, at_rest: bool) -> u8 {
    match remaining {
        Some(left) if !at_rest => {
            let wanted = i64::from(spends.saturating_mul(4)).min(i64::from(WRITE_AHEAD_MAX));
            u8::try_from(wanted.min(left.max(0) / 8)).unwrap_or(0)
        }
        _ => 0,
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn the_writer_writes_ahead_what_recent_demand_needs_and_never_more_than_is_left() {
        assert_eq!(
            write_ahead(Some(1000), 0, false),
            0,
            "a key whose spends stopped"
        );
        assert_eq!(write_ahead(Some(1000), 1, false), 4);
        assert_eq!(write_ahead(Some(1000), 5, false), 20);
        assert_eq!(write_ahead(Some(1000), 1_000_000, false), WRITE_AHEAD_MAX);
        assert_eq!(
            write_ahead(Some(80), 100, false),
            10,
            "an eighth of what is left"
        );
        assert_eq!(
            write_ahead(Some(7), 100, false),
            0,
            "a small quota: every spend commits"
        );
        assert_eq!(write_ahead(Some(0), 100, false), 0);
        assert_eq!(write_ahead(Some(-5), 100, false), 0);
        assert_eq!(
            write_ahead(None, 100, false),
            0,
            "no quota, nothing to write ahead"
        );
        assert_eq!(
            write_ahead(Some(1000), 100, true),
            0,
            "at rest nothing is written ahead"
        );
    }

    fn quota(n: i64) -> Counters {
        Counters {
            remaining: Some(n),
            ..Counters::default()
        }
    }

    fn limited(max: i64, window_us: i64, algorithm: Algorithm) -> Limits {
        Limits {
            rate: Some(Rate {
                max,
                window_us,
                algorithm,
            }),
            ..Limits::default()
        }
    }

    #[test]
    fn quota_is_spent_by_cost_and_never_below_zero() {
        let none = Limits::default();
        assert_eq!(
            charge(&quota(3), &none, 0, 1, true).after.remaining,
            Some(2)
        );
        assert_eq!(
            charge(&quota(3), &none, 0, 3, true).after.remaining,
            Some(0)
        );
        let over = charge(&quota(2), &none, 0, 3, true);
        assert_eq!(
            (over.verdict, over.after.remaining, over.spent),
            (Verdict::UsageExceeded, Some(2), 0)
        );
        assert_eq!(
            charge(&quota(0), &none, 0, 0, true).verdict,
            Verdict::Allowed
        );
        let unlimited = charge(&Counters::default(), &none, 0, 1_000_000, true);
        assert_eq!((unlimited.after.remaining, unlimited.spent), (None, 0));
    }

    #[test]
    fn a_due_refill_replaces_the_quota_even_on_a_refused_call() {
        let limits = Limits {
            refill_amount: Some(5),
            refill_due: true,
            ..Limits::default()
        };
        let c = charge(&quota(0), &limits, 0, 1, true);
        assert_eq!((c.after.remaining, c.refilled), (Some(4), true));
        let refused = charge(&quota(0), &limits, 0, 9, true);
        assert_eq!(
            (refused.verdict, refused.after.remaining, refused.refilled),
            (Verdict::UsageExceeded, Some(5), true)
        );
        let not_due = Limits {
            refill_due: false,
            ..limits
        };
        assert_eq!(
            charge(&quota(0), &not_due, 0, 1, true).verdict,
            Verdict::UsageExceeded
        );
    }

    #[test]
    fn a_fixed_window_allows_max_then_limits_until_it_ends() {
        let limits = limited(2, HOUR, Algorithm::Fixed);
        let first = charge(&Counters::default(), &limits, 1000, 1, true);
        assert_eq!(
            (first.verdict, first.rate_remaining, first.reset_us),
            (Verdict::Allowed, Some(1), Some(1000 + HOUR))
        );
        let second = charge(&first.after, &limits, 2000, 1, true);
        assert_eq!(second.rate_remaining, Some(0));
        let third = charge(&second.after, &limits, 3000, 1, true);
        assert_eq!(
            (third.verdict, third.after),
            (Verdict::RateLimited, second.after)
        );
        // The next window opens at the first call after this one ended, not on a boundary.
        let later = charge(&third.after, &limits, 1000 + HOUR + 5, 1, true);
        assert_eq!(
            (later.verdict, later.reset_us),
            (Verdict::Allowed, Some(1000 + 2 * HOUR + 5))
        );
        // A call that takes nothing opens no window.
        let idle = charge(&Counters::default(), &limits, 0, 1, false);
        assert_eq!((idle.after.window_start_us, idle.reset_us), (None, None));
        assert_eq!(
            charge(&Counters::default(), &limits, 0, 3, true).verdict,
            Verdict::RateLimited
        );
    }

    #[test]
    fn a_sliding_window_weighs_the_previous_bucket_by_what_is_still_inside() {
        let limits = limited(10, HOUR, Algorithm::Sliding);
        // 10 used at the end of bucket 0.
        let full = Counters {
            window_start_us: Some(0),
            window_count: 10,
            ..Counters::default()
        };
        // A quarter into bucket 1: 7.5 of the previous 10 still count (rounded up: 8).
        let c = charge(&full, &limits, HOUR + HOUR / 4, 2, true);
        assert_eq!(
            (c.verdict, c.rate_remaining, c.reset_us),
            (Verdict::Allowed, Some(0), Some(2 * HOUR))
        );
        assert_eq!(
            charge(&c.after, &limits, HOUR + HOUR / 4, 1, true).verdict,
            Verdict::RateLimited
        );
        // A fixed window would have let 10 more through right at the edge: the double burst.
        let fixed = limited(10, HOUR, Algorithm::Fixed);
        let fixed_full = Counters {
            window_start_us: Some(1),
            ..full
        };
        assert_eq!(
            charge(&fixed_full, &fixed, HOUR + 1, 10, true).verdict,
            Verdict::Allowed
        );
        assert_eq!(
            charge(&full, &limits, HOUR + 1, 10, true).verdict,
            Verdict::RateLimited
        );
        // Two buckets later nothing of the old one counts.
        let c = charge(&full, &limits, 2 * HOUR, 10, true);
        assert_eq!((c.verdict, c.after.window_previous), (Verdict::Allowed, 0));
    }

    /// The sliding window against a brute-force model of its definition: random call times,
    /// limits and costs; the model keeps every bucket's count and computes the estimate with
    /// exact rationals.
    #[test]
    fn the_sliding_window_matches_a_brute_force_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let window = 1 + next(1000) as i64;
            let max = 1 + next(20) as i64;
            let limits = limited(max, window, Algorithm::Sliding);
            let mut counters = Counters::default();
            let mut buckets = std::collections::BTreeMap::<i64, i64>::new();
            let mut now = next(5000) as i64;
            for _ in 0..200 {
                now += next(window as u64 / 3 + 2) as i64;
                let cost = next(4) as i64;
                let bucket = now.div_euclid(window);
                let cur = buckets.get(&bucket).copied().unwrap_or(0);
                let prev = buckets.get(&(bucket - 1)).copied().unwrap_or(0);
                let elapsed = now - bucket * window;
                // cur + cost + prev × (window − elapsed) / window <= max, in integers.
                let allowed = (i128::from(cur + cost) * i128::from(window)
                    + i128::from(prev) * i128::from(window - elapsed))
                    <= i128::from(max) * i128::from(window);
                let c = charge(&counters, &limits, now, cost, true);
                assert_eq!(
                    c.verdict == Verdict::Allowed,
                    allowed,
                    "window {window} max {max} at {now} cost {cost}"
                );
                if allowed {
                    *buckets.entry(bucket).or_insert(0) += cost;
                }
                let after_cur = buckets.get(&bucket).copied().unwrap_or(0);
                let estimate = after_cur
                    + (i128::from(prev) * i128::from(window - elapsed) + i128::from(window) - 1)
                        .div_euclid(i128::from(window)) as i64;
                assert_eq!(c.rate_remaining, Some((max - estimate).max(0)));
                assert_eq!(c.reset_us, Some((bucket + 1) * window));
                counters = c.after;
            }
        }
    }

    #[test]
    fn quota_is_checked_before_the_window_and_failures_take_nothing() {
        let limits = limited(1, HOUR, Algorithm::Fixed);
        let used = Counters {
            remaining: Some(0),
            window_start_us: Some(0),
            window_count: 1,
            ..Counters::default()
        };
        assert_eq!(
            charge(&used, &limits, 10, 1, true).verdict,
            Verdict::UsageExceeded
        );
        let limited_only = Counters {
            remaining: Some(10),
            ..used
        };
        let c = charge(&limited_only, &limits, 10, 1, true);
        assert_eq!(
            (c.verdict, c.after, c.spent),
            (Verdict::RateLimited, limited_only, 0)
        );
        let unpermitted = charge(
            &quota(10),
            &limited(5, HOUR, Algorithm::Sliding),
            10,
            1,
            false,
        );
        assert_eq!(
            (
                unpermitted.verdict,
                unpermitted.after.remaining,
                unpermitted.after.window_count
            ),
            (Verdict::Allowed, Some(10), 0)
        );
    }
}
