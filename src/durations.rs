//! Durations as callers give them: intervals for key lifetimes, refills, rate-limit windows and
//! grace periods, milliseconds for tokens. Pure Rust: what is accepted, and why not.

/// Durations are bounded so that `now + duration` (computed at every verification for windows
/// and refills) stays a valid timestamp.
pub const MAX_YEARS: i64 = 1000;

const MICROS_PER_DAY: i128 = 86_400_000_000;

/// Why an interval (as PostgreSQL stores it: months, days, microseconds) is not a duration,
/// or Ok. Every part must be non-negative, not just their sum: PostgreSQL adds months and days
/// by the calendar, so `1 mon -29 days` is a day from January and minus a day from February,
/// and a rate-limit window that ends before it starts would never limit anything.
pub fn check_interval(months: i32, days: i32, micros: i64, allow_zero: bool) -> Result<(), String> {
    if months < 0 || days < 0 || micros < 0 {
        return Err(if allow_zero {
            "must not be negative or have a negative part".into()
        } else {
            "must be a positive interval with no negative part".into()
        });
    }
    if !allow_zero && months == 0 && days == 0 && micros == 0 {
        return Err("must be a positive interval".into());
    }
    // A month counts 30 days here, as PostgreSQL's own interval comparisons count it.
    let total = i128::from(months) * 30 * MICROS_PER_DAY
        + i128::from(days) * MICROS_PER_DAY
        + i128::from(micros);
    if total > i128::from(MAX_YEARS) * 12 * 30 * MICROS_PER_DAY {
        return Err(format!("must be at most {MAX_YEARS} years"));
    }
    Ok(())
}

/// An interval as PostgreSQL stores it. Pure code takes this rather than pgrx's `Interval`, whose
/// comparisons call into the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

impl Span {
    pub fn micros(micros: i64) -> Span {
        Span {
            micros,
            ..Span::default()
        }
    }

    pub fn check(self, allow_zero: bool) -> Result<(), String> {
        check_interval(self.months, self.days, self.micros, allow_zero)
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&show(self.months, self.days, self.micros))
    }
}

/// An interval as PostgreSQL shows it (IntervalStyle `postgres`, the default): `1 year 2 mons`,
/// `3 days 04:05:06.5`, `-00:00:01`, `00:00:00`. Pure, so messages about a refused interval can
/// be built (and unit-tested) without calling interval_out.
pub fn show(months: i32, days: i32, micros: i64) -> String {
    let plural = |n: i64, one: &str| {
        // PostgreSQL's own rule: singular for exactly 1 ("-1 days").
        if n == 1 {
            format!("{n} {one}")
        } else {
            format!("{n} {one}s")
        }
    };
    let mut parts = Vec::new();
    let (years, months) = (i64::from(months) / 12, i64::from(months) % 12);
    if years != 0 {
        parts.push(plural(years, "year"));
    }
    if months != 0 {
        parts.push(plural(months, "mon"));
    }
    if days != 0 {
        parts.push(plural(i64::from(days), "day"));
    }
    if micros != 0 || parts.is_empty() {
        let sign = if micros < 0 { "-" } else { "" };
        let total = micros.unsigned_abs();
        let (secs, frac) = (total / 1_000_000, total % 1_000_000);
        let mut time = format!(
            "{sign}{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        if frac != 0 {
            time.push_str(format!(".{frac:06}").trim_end_matches('0'));
        }
        parts.push(time);
    }
    parts.join(" ")
}

/// Reads what `show` wrote back (only that form: it is how the extension stores durations it
/// read once with PostgreSQL's own parser).
pub fn parse_shown(text: &str) -> Option<Span> {
    let mut span = Span::default();
    let mut words = text.split(' ').peekable();
    while let Some(word) = words.next() {
        if word.contains(':') {
            let (sign, clock) = match word.strip_prefix('-') {
                Some(rest) => (-1i64, rest),
                None => (1, word),
            };
            let mut parts = clock.splitn(3, ':');
            let hours: i64 = parts.next()?.parse().ok()?;
            let minutes: i64 = parts.next()?.parse().ok()?;
            let seconds = parts.next()?;
            let (whole, frac) = seconds.split_once('.').unwrap_or((seconds, ""));
            let whole: i64 = whole.parse().ok()?;
            if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let frac: i64 = format!("{frac:0<6}").parse().ok()?;
            let micros = ((hours * 60 + minutes) * 60 + whole)
                .checked_mul(1_000_000)?
                .checked_add(frac)?;
            span.micros = sign * micros;
            continue;
        }
        let n: i64 = word.parse().ok()?;
        match words.next()? {
            "year" | "years" => span.months += i32::try_from(n.checked_mul(12)?).ok()?,
            "mon" | "mons" => span.months += i32::try_from(n).ok()?,
            "day" | "days" => span.days += i32::try_from(n).ok()?,
            _ => return None,
        }
    }
    Some(span)
}

/// `epoch_us` (microseconds since 1970-01-01 UTC) as ISO 8601 in UTC:
/// `2026-11-30T23:45:01.250000Z`.
pub fn iso8601(epoch_us: i64) -> String {
    let days = epoch_us.div_euclid(86_400_000_000);
    let rest = epoch_us.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let secs = rest / 1_000_000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rest % 1_000_000
    )
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (H. Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The day count from 1970-01-01 of a proleptic Gregorian date (inverse of `civil_from_days`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A token lifetime in milliseconds: positive and at most `max_ms`.
pub fn check_ms(ms: i64, max_ms: i64) -> Result<i64, Refused> {
    if ms <= 0 {
        return Err(Refused(format!(
            "must be a positive number of milliseconds, got {ms}"
        )));
    }
    if ms > max_ms {
        return Err(Refused(format!(
            "must be at most {max_ms} milliseconds (apikeys.max_token_ttl), got {ms}"
        )));
    }
    Ok(ms)
}

/// Why a token lifetime was refused; `is_too_long` tells a limit a superuser can raise.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl Refused {
    pub fn is_too_long(&self) -> bool {
        self.0.starts_with("must be at most")
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use proptest::prelude::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn intervals_must_be_positive_in_every_part_and_at_most_a_millennium() {
        assert_eq!(check_interval(0, 0, 1, false), Ok(()));
        assert_eq!(check_interval(1, 0, 0, false), Ok(()));
        assert_eq!(check_interval(0, 0, 0, true), Ok(()));
        assert_eq!(
            check_interval(0, 0, 0, false),
            Err("must be a positive interval".into())
        );
        assert!(check_interval(1, -29, 0, false).is_err());
        assert!(check_interval(0, 1, -3_600_000_000, false).is_err());
        assert!(check_interval(0, 0, -1, true).is_err());
        assert_eq!(check_interval(12_000, 0, 0, false), Ok(()));
        assert_eq!(
            check_interval(12_000, 0, 1, false),
            Err("must be at most 1000 years".into())
        );
        assert!(check_interval(i32::MAX, i32::MAX, i64::MAX, false).is_err());
        assert_eq!(check_interval(0, 360_000, 0, false), Ok(()));
        assert!(check_interval(0, 360_000, DAY, false).is_err());
    }

    #[test]
    fn intervals_are_shown_as_postgresql_shows_them() {
        assert_eq!(show(0, 0, 0), "00:00:00");
        assert_eq!(show(14, 1, 0), "1 year 2 mons 1 day");
        assert_eq!(show(1, -29, 0), "1 mon -29 days");
        assert_eq!(show(0, 0, -1_000_000), "-00:00:01");
        assert_eq!(
            show(0, 3, 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000),
            "3 days 04:05:06.5"
        );
        assert_eq!(show(0, 0, 100 * 3_600_000_000), "100:00:00");
        assert_eq!(show(-24, 0, 0), "-2 years");
        assert_eq!(show(0, -1, 0), "-1 days");
    }

    #[test]
    fn timestamps_are_written_in_iso_8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            iso8601(1_796_083_501_250_000),
            "2026-12-01T00:05:01.250000Z"
        );
        assert_eq!(iso8601(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59.999999Z");
    }

    proptest! {
        #[test]
        fn civil_dates_and_day_counts_agree(days in -1_000_000i64..1_000_000) {
            let (y, m, d) = civil_from_days(days);
            prop_assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn shown_intervals_read_back() {
        assert_eq!(parse_shown("00:00:00"), Some(Span::default()));
        assert_eq!(
            parse_shown("1 year 2 mons 1 day"),
            Some(Span {
                months: 14,
                days: 1,
                micros: 0
            })
        );
        assert_eq!(
            parse_shown("3 days 04:05:06.5").map(|s| s.micros),
            Some(14_706_500_000)
        );
        assert_eq!(parse_shown("-00:00:01").map(|s| s.micros), Some(-1_000_000));
        for bad in ["", "1 fortnight", "1:2", "x days", "00:00:01.1234567"] {
            assert_eq!(parse_shown(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn what_is_shown_reads_back(months in -24_000i32..24_000, days in -400_000i32..400_000, micros in -(1i64 << 50)..(1i64 << 50)) {
            prop_assert_eq!(parse_shown(&show(months, days, micros)), Some(Span { months, days, micros }));
        }
    }

    #[test]
    fn token_lifetimes_are_positive_and_within_the_maximum() {
        assert_eq!(check_ms(1, 10), Ok(1));
        assert_eq!(check_ms(10, 10), Ok(10));
        assert!(!check_ms(0, 10).unwrap_err().is_too_long());
        assert!(!check_ms(i64::MIN, 10).unwrap_err().is_too_long());
        assert!(check_ms(11, 10).unwrap_err().is_too_long());
        assert!(check_ms(i64::MAX, 10)
            .unwrap_err()
            .0
            .contains("got 9223372036854775807"));
    }

    proptest! {
        #[test]
        fn an_accepted_interval_moves_time_forward_by_at_most_a_millennium(
            months in prop_oneof![any::<i32>(), -2i32..13_000],
            days in prop_oneof![any::<i32>(), -2i32..400_000],
            micros in prop_oneof![any::<i64>(), -2i64..1 << 56],
            allow_zero in any::<bool>()
        ) {
            if check_interval(months, days, micros, allow_zero).is_ok() {
                prop_assert!(months >= 0 && days >= 0 && micros >= 0);
                prop_assert!(allow_zero || months > 0 || days > 0 || micros > 0);
                // By the calendar a month is at most 31 days: still within 1000 years + 1%.
                let longest = i128::from(months) * 31 * i128::from(DAY)
                    + i128::from(days) * i128::from(DAY) + i128::from(micros);
                prop_assert!(longest <= 1000 * 366 * i128::from(DAY));
            }
        }

        #[test]
        fn an_accepted_token_lifetime_is_within_its_bounds(ms in any::<i64>(), max in 1i64..i64::MAX) {
            match check_ms(ms, max) {
                Ok(got) => prop_assert!(got == ms && 0 < ms && ms <= max),
                Err(e) => prop_assert_eq!(e.is_too_long(), ms > max),
            }
        }
    }
}
