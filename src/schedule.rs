//! Standard 5-field cron expressions (minute hour day-of-month month day-of-week), in UTC,
//! for the jobs `serve` runs itself.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Both day fields restricted: a day matches if either does (as in Vixie cron).
    either_day: bool,
    text: String,
}

impl std::fmt::Display for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let expanded = match expr.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{expr:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week, e.g. \"17 3 * * *\")"
            ));
        }
        let minutes = field(fields[0], 0, 59, &[], expr)?;
        let hours = field(fields[1], 0, 23, &[], expr)?;
        let days = field(fields[2], 1, 31, &[], expr)?;
        let months = field(fields[3], 1, 12, &MONTHS, expr)?;
        let mut weekdays = field(fields[4], 0, 7, &DAYS, expr)?;
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays | 1) & !(1 << 7);
        }
        Ok(Cron {
            minutes,
            hours,
            days,
            months,
            weekdays,
            either_day: !fields[2].starts_with('*') && !fields[4].starts_with('*'),
            text: expr.trim().to_string(),
        })
    }

    fn day_matches(&self, t: &DateTime<Utc>) -> bool {
        let dom = self.days & (1 << t.day()) != 0;
        let dow = self.weekdays & (1 << t.weekday().num_days_from_sunday()) != 0;
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The first time strictly after `after` that the expression matches.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = after.with_second(0)?.with_nanosecond(0)? + Duration::minutes(1);
        let limit = after + Duration::days(366 * 5);
        while t <= limit {
            if self.months & (1 << t.month()) == 0 {
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                t = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
                continue;
            }
            if !self.day_matches(&t) {
                t = (t + Duration::days(1)).with_hour(0)?.with_minute(0)?;
                continue;
            }
            if self.hours & (1 << t.hour()) == 0 {
                t = (t + Duration::hours(1)).with_minute(0)?;
                continue;
            }
            if self.minutes & (1 << t.minute()) == 0 {
                t += Duration::minutes(1);
                continue;
            }
            return Some(t);
        }
        None
    }
}

fn field(text: &str, min: u32, max: u32, names: &[&str], expr: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{expr:?}: field {text:?} {why}");
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            // Month names count from 1, day names from 0.
            return Ok(i as u32 + if names.len() == 12 { 1 } else { 0 });
        }
        let v: u32 = s.parse().map_err(|_| bad("is not a number"))?;
        if v < min || v > max {
            return Err(bad(&format!("is out of range {min}-{max}")));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("has a bad step"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            (v, if part.contains('/') { max } else { v })
        };
        if lo > hi {
            return Err(bad("has a range that runs backwards"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn next_times() {
        let c = Cron::parse("17 3 * * *").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T18:00:00Z")),
            Some(at("2026-11-24T03:17:00Z"))
        );
        assert_eq!(
            c.next_after(at("2026-11-24T03:17:00Z")),
            Some(at("2026-11-25T03:17:00Z"))
        );
        let c = Cron::parse("*/15 * * * *").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T18:07:30Z")),
            Some(at("2026-11-23T18:15:00Z"))
        );
        // First Sunday-or-1st of the month at 04:00 (either day field matches).
        let c = Cron::parse("0 4 1 * sun").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T18:00:00Z")),
            Some(at("2026-11-29T04:00:00Z"))
        );
        let c = Cron::parse("0 0 1 jan-mar *").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T00:00:00Z")),
            Some(at("2027-01-01T00:00:00Z"))
        );
        let c = Cron::parse("@monthly").unwrap();
        assert_eq!(
            c.next_after(at("2026-12-15T00:00:00Z")),
            Some(at("2027-01-01T00:00:00Z"))
        );
        let c = Cron::parse("30 2 * * 7").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T00:00:00Z")),
            Some(at("2026-11-29T02:30:00Z"))
        );
        // Never matches: February 30th.
        assert_eq!(
            Cron::parse("0 0 30 2 *")
                .unwrap()
                .next_after(at("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(Cron::parse("* * * *").unwrap_err().contains("5-field"));
        assert!(
            Cron::parse("61 * * * *")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(Cron::parse("*/0 * * * *").unwrap_err().contains("step"));
        assert!(
            Cron::parse("5-1 * * * *")
                .unwrap_err()
                .contains("backwards")
        );
        assert!(
            Cron::parse("x * * * *")
                .unwrap_err()
                .contains("not a number")
        );
    }
}
