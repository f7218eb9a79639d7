//! Standard 5-field cron expressions (minute hour day-of-month month day-of-week), in UTC,
//! for the jobs `serve` runs itself. Parsing and matching are `croner`'s and read an
//! expression as a Kubernetes CronJob does: when both day fields are restricted (`*/2` counts
//! as restricted) a day matches if either does, `0/5` means `0-59/5`, names and `@daily` and
//! friends work, and so do croner's `L`, `W` and `#`. This wrapper pins the form to five
//! fields and the clock to UTC.

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};

#[derive(Debug, Clone)]
pub struct Cron {
    cron: croner::Cron,
    text: String,
}

impl std::fmt::Display for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let text = expr.trim();
        let fields = text.split_whitespace().count();
        if !text.starts_with('@') && fields != 5 {
            return Err(format!(
                "{expr:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week, e.g. \"17 3 * * *\")"
            ));
        }
        let cron = parser().parse(text).map_err(|e| {
            // croner does not say which field is wrong: try each alone.
            let fields: Vec<&str> = text.split_whitespace().collect();
            let culprit = FIELDS.iter().enumerate().find_map(|(i, (name, allowed))| {
                let mut alone = ["*"; 5];
                alone[i] = fields.get(i)?;
                let e = parser().parse(&alone.join(" ")).err()?;
                Some(format!(
                    "{name} field {:?}: {} (allowed: {allowed})",
                    fields[i],
                    reason(e)
                ))
            });
            format!("{expr:?}: {}", culprit.unwrap_or_else(|| reason(e)))
        })?;
        Ok(Cron {
            cron,
            text: text.to_string(),
        })
    }

    /// The first time strictly after `after` that the expression matches; `None` for an
    /// expression that never matches (February 30th).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
];

/// Five fields, no seconds or years; `0/5` means `0-59/5`, as Kubernetes CronJobs read it.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .sloppy_ranges(true)
        .build()
}

/// croner's message without its type-name prefixes, in lower case like ours.
fn reason(e: croner::errors::CronError) -> String {
    use croner::errors::CronError::*;
    let msg = match e {
        InvalidPattern(m) | IllegalCharacters(m) | ComponentError(m) => m,
        other => other.to_string(),
    };
    let msg = msg.trim_end_matches('.');
    let mut chars = msg.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => msg.to_string(),
    }
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
    fn kubernetes_and_croner_forms() {
        // A bare start with a step runs from there to the end, as in Kubernetes CronJobs.
        let c = Cron::parse("5/20 * * * *").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-23T18:26:00Z")),
            Some(at("2026-11-23T18:45:00Z"))
        );
        // The last day of the month.
        let c = Cron::parse("0 1 L * *").unwrap();
        assert_eq!(
            c.next_after(at("2026-02-10T00:00:00Z")),
            Some(at("2026-02-28T01:00:00Z"))
        );
        assert_eq!(c.to_string(), "0 1 L * *");
        // Both day fields restricted: either matches (a Monday, or an odd day).
        let c = Cron::parse("0 0 */2 * mon").unwrap();
        assert_eq!(
            c.next_after(at("2026-11-01T00:00:00Z")),
            Some(at("2026-11-02T00:00:00Z"))
        );
        assert_eq!(
            c.next_after(at("2026-11-02T00:00:00Z")),
            Some(at("2026-11-03T00:00:00Z"))
        );
        // Six fields (seconds) are not cron's five.
        assert!(Cron::parse("0 0 3 * * *").unwrap_err().contains("5-field"));
    }

    #[test]
    fn bad_expressions_say_why() {
        assert!(Cron::parse("* * * *").unwrap_err().contains("5-field"));
        assert_eq!(
            Cron::parse("61 * * * *").unwrap_err(),
            "\"61 * * * *\": minute field \"61\": number out of bounds (allowed: 0-59)"
        );
        assert!(
            Cron::parse("0 0 * 13 *")
                .unwrap_err()
                .contains("month field \"13\"")
        );
        assert!(Cron::parse("*/0 * * * *").unwrap_err().contains("step"));
        assert!(
            Cron::parse("5-1 * * * *")
                .unwrap_err()
                .contains("minute field \"5-1\"")
        );
        assert!(
            Cron::parse("x * * * *")
                .unwrap_err()
                .contains("illegal character")
        );
    }
}
