//! When quotas refill (SPEC §7): every `refill_interval` after the last refill (PostgreSQL's
//! interval arithmetic, at the edge), daily at 00:00 UTC (`refill_schedule => 'calendar'` with
//! `refill_interval => '1 day'`), or monthly at 00:00 UTC on `refill_day` — the month's last day
//! when it is shorter. Pure calendar arithmetic on epoch microseconds.

use crate::durations::{civil_from_days, days_from_civil, Span};
use crate::settings::{ArgError, Checked};

const DAY_US: i64 = 86_400_000_000;

/// How a quota refills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Every interval after the last refill.
    Every(Span),
    /// At every 00:00 UTC.
    Daily,
    /// At 00:00 UTC on this day of every month (1–31; the last day of shorter months).
    Monthly(u32),
}

pub fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The first 00:00 UTC strictly after `after_us`.
pub fn next_daily(after_us: i64) -> i64 {
    (after_us.div_euclid(DAY_US) + 1).saturating_mul(DAY_US)
}

/// The first 00:00 UTC on day `day` of a month (the month's last day when shorter) strictly
/// after `after_us`.
pub fn next_monthly(after_us: i64, day: u32) -> i64 {
    let (mut y, mut m, _) = civil_from_days(after_us.div_euclid(DAY_US));
    loop {
        let d = day.min(days_in_month(y, m));
        let at = days_from_civil(y, m, d).saturating_mul(DAY_US);
        if at > after_us {
            return at;
        }
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
}

impl Schedule {
    /// The next calendar refill after `after_us`; None for an interval (PostgreSQL adds it).
    pub fn next_calendar(self, after_us: i64) -> Option<i64> {
        match self {
            Schedule::Every(_) => None,
            Schedule::Daily => Some(next_daily(after_us)),
            Schedule::Monthly(day) => Some(next_monthly(after_us, day)),
        }
    }

    /// As stored: (refill_interval, refill_day, refill_schedule).
    pub fn columns(self) -> (Option<Span>, Option<i32>, &'static str) {
        match self {
            Schedule::Every(span) => (Some(span), None, "interval"),
            Schedule::Daily => (
                Some(Span {
                    days: 1,
                    ..Span::default()
                }),
                None,
                "calendar",
            ),
            Schedule::Monthly(day) => (None, Some(day as i32), "calendar"),
        }
    }

    /// From stored columns (written by `columns`).
    pub fn from_columns(
        interval: Option<Span>,
        day: Option<i32>,
        schedule: &str,
    ) -> Option<Schedule> {
        match (interval, day) {
            (_, Some(d)) => u32::try_from(d).ok().map(Schedule::Monthly),
            (Some(_), None) if schedule == "calendar" => Some(Schedule::Daily),
            (Some(span), None) => Some(Schedule::Every(span)),
            (None, None) => None,
        }
    }
}

/// The refill `refill_amount` comes with: `refill_interval` (rolling, or daily at 00:00 UTC when
/// `calendar`), or monthly on `refill_day`. Checks what goes together; the interval itself is
/// checked by the caller (`settings::duration`).
pub fn schedule(
    amount: Option<i64>,
    interval: Option<Span>,
    day: Option<i32>,
    calendar: bool,
) -> Checked<Option<Schedule>> {
    if let Some(d) = day {
        if !(1..=31).contains(&d) {
            return Err(ArgError::new(
                "refill_day",
                format!("must be a day of the month, 1 to 31, got {d}"),
            ));
        }
        if interval.is_some() {
            return Err(ArgError::new(
                "refill_interval",
                "must be NULL with \"refill_day\" (a monthly refill)",
            ));
        }
    }
    let schedule = match (interval, day) {
        (None, None) => None,
        (_, Some(d)) => Some(Schedule::Monthly(d as u32)),
        (Some(span), None) if calendar => {
            if span
                != (Span {
                    days: 1,
                    ..Span::default()
                })
                && span != Span::micros(DAY_US)
            {
                return Err(ArgError::new(
                    "refill_interval",
                    "must be '1 day' with refill_schedule 'calendar' (daily at 00:00 UTC); monthly refills take refill_day",
                ));
            }
            Some(Schedule::Daily)
        }
        (Some(span), None) => Some(Schedule::Every(span)),
    };
    match (amount, schedule) {
        (Some(_), None) => Err(ArgError::new(
            "refill_interval",
            "must be given together with \"refill_amount\" (or refill_day)",
        )),
        (None, Some(_)) => Err(ArgError::new(
            "refill_amount",
            if day.is_some() {
                "must be given together with \"refill_day\""
            } else {
                "must be given together with \"refill_interval\""
            },
        )),
        _ => Ok(schedule),
    }
}

/// `refill_schedule`: 'interval' or 'calendar' (None: not given).
pub fn calendar(name: Option<&str>) -> Checked<Option<bool>> {
    match name {
        None => Ok(None),
        Some("interval") => Ok(Some(false)),
        Some("calendar") => Ok(Some(true)),
        Some(other) => Err(ArgError::new(
            "refill_schedule",
            format!(
                "must be 'interval' or 'calendar', got \"{}\"",
                crate::errors::shown(other)
            ),
        )),
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::durations::iso8601;
    use proptest::prelude::*;

    fn at(y: i64, m: u32, d: u32, h: i64) -> i64 {
        days_from_civil(y, m, d) * DAY_US + h * 3_600_000_000
    }

    #[test]
    fn daily_refills_come_at_midnight_utc() {
        assert_eq!(
            iso8601(next_daily(at(2026, 11, 30, 13))),
            "2026-12-01T00:00:00.000000Z"
        );
        // Exactly at midnight: the next one.
        assert_eq!(
            iso8601(next_daily(at(2026, 12, 1, 0))),
            "2026-12-02T00:00:00.000000Z"
        );
        assert_eq!(
            iso8601(next_daily(at(2026, 12, 31, 23))),
            "2027-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn monthly_refills_fall_on_the_last_day_of_shorter_months() {
        let next = |after: i64, day| iso8601(next_monthly(after, day));
        assert_eq!(next(at(2026, 1, 15, 0), 31), "2026-01-31T00:00:00.000000Z");
        assert_eq!(next(at(2026, 1, 31, 0), 31), "2026-02-28T00:00:00.000000Z");
        assert_eq!(next(at(2028, 1, 31, 5), 30), "2028-02-29T00:00:00.000000Z");
        assert_eq!(next(at(2028, 2, 29, 0), 31), "2028-03-31T00:00:00.000000Z");
        assert_eq!(next(at(2100, 2, 1, 0), 29), "2100-02-28T00:00:00.000000Z");
        assert_eq!(next(at(2000, 2, 1, 0), 29), "2000-02-29T00:00:00.000000Z");
        assert_eq!(next(at(2026, 4, 30, 1), 31), "2026-05-31T00:00:00.000000Z");
        assert_eq!(next(at(2026, 12, 2, 0), 1), "2027-01-01T00:00:00.000000Z");
        assert_eq!(next(at(2026, 12, 1, 0), 1), "2027-01-01T00:00:00.000000Z");
    }

    proptest! {
        /// A monthly refill is the first matching midnight after: later than `after`, at most a
        /// month and a bit away, on the day asked (or the month's last), at 00:00 UTC.
        #[test]
        fn the_next_monthly_refill_is_the_first_one_after(after in -2_000_000_000_000_000i64..8_000_000_000_000_000, day in 1u32..=31) {
            let next = next_monthly(after, day);
            prop_assert!(next > after && next - after <= 32 * DAY_US);
            prop_assert_eq!(next.rem_euclid(DAY_US), 0);
            let (y, m, d) = civil_from_days(next.div_euclid(DAY_US));
            prop_assert_eq!(d, day.min(days_in_month(y, m)));
            // No earlier matching midnight lies between.
            let mut t = next - DAY_US;
            while t > after {
                let (y, m, d) = civil_from_days(t.div_euclid(DAY_US));
                prop_assert_ne!(d, day.min(days_in_month(y, m)));
                t -= DAY_US;
            }
        }

        #[test]
        fn the_next_daily_refill_is_the_next_midnight(after in any::<i32>().prop_map(|x| i64::from(x) * 1_000_003)) {
            let next = next_daily(after);
            prop_assert!(next > after && next - after <= DAY_US && next.rem_euclid(DAY_US) == 0);
        }
    }

    #[test]
    fn refill_arguments_go_together() {
        let day = Span {
            days: 1,
            ..Span::default()
        };
        let hour = Span::micros(3_600_000_000);
        assert_eq!(
            schedule(Some(5), Some(hour), None, false),
            Ok(Some(Schedule::Every(hour)))
        );
        assert_eq!(
            schedule(Some(5), Some(day), None, true),
            Ok(Some(Schedule::Daily))
        );
        assert_eq!(
            schedule(Some(5), None, Some(31), false),
            Ok(Some(Schedule::Monthly(31)))
        );
        assert_eq!(schedule(None, None, None, false), Ok(None));
        for (amount, interval, d, calendar, arg) in [
            (Some(5), None, None, false, "refill_interval"),
            (None, Some(hour), None, false, "refill_amount"),
            (None, None, Some(3), false, "refill_amount"),
            (Some(5), Some(hour), Some(3), false, "refill_interval"),
            (Some(5), None, Some(0), false, "refill_day"),
            (Some(5), None, Some(32), false, "refill_day"),
            (Some(5), Some(hour), None, true, "refill_interval"),
        ] {
            assert_eq!(
                schedule(amount, interval, d, calendar).unwrap_err().arg,
                arg
            );
        }
        assert_eq!(calendar(Some("calendar")), Ok(Some(true)));
        assert!(calendar(Some("weekly")).is_err());
        for s in [Schedule::Every(hour), Schedule::Daily, Schedule::Monthly(7)] {
            let (i, d, name) = s.columns();
            assert_eq!(Schedule::from_columns(i, d, name), Some(s));
        }
    }
}
