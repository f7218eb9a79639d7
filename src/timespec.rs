//! Parsing the `--at <time>` argument and formatting instants for PostgreSQL.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::input_err;

/// Parses RFC 3339 (`2026-11-23T03:00:00+09:00`) or `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM]]`.
/// Without an offset the time is UTC.
pub fn parse_instant(s: &str) -> anyhow::Result<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let normalized = s.replacen('T', " ", 1);
    let normalized = normalized
        .strip_suffix('Z')
        .map(|x| format!("{x}+00"))
        .unwrap_or(normalized);
    // Offsets: find a sign after the time-of-day part.
    let has_offset = normalized
        .get(19..)
        .is_some_and(|rest| rest.contains('+') || rest.contains('-'));
    let parsed = if has_offset {
        DateTime::parse_from_str(&normalized, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map(|t| t.with_timezone(&Utc))
    } else {
        NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%d %H:%M:%S%.f").map(|t| t.and_utc())
    };
    parsed.map_err(|_| {
        input_err!(
            "malformed time {s:?}: use RFC 3339 (2026-11-23T03:00:00Z) or \"YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM]\" (UTC when no offset is given)"
        )
    })
}

/// The instant as PostgreSQL's `recovery_target_time` wants it, in UTC with microseconds.
pub fn pg_timestamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// The instant as shown to people: RFC 3339 in UTC.
pub fn show(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(
            parse_instant("2026-11-23T03:00:00Z").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-23T12:00:00+09:00").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-23 03:00:00").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-23 03:00:00.123456").unwrap(),
            utc("2026-11-23T03:00:00.123456Z")
        );
        assert_eq!(
            parse_instant("2026-11-23 12:00:00+09").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-23 12:30:00+09:30").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
        assert_eq!(
            parse_instant("2026-11-22 22:00:00-05").unwrap(),
            utc("2026-11-23T03:00:00Z")
        );
    }

    #[test]
    fn rejected_forms_say_what_is_accepted() {
        for bad in [
            "yesterday",
            "2026-13-01 00:00:00",
            "2026-11-23",
            "2026-11-23 25:00:00",
            "",
        ] {
            let err = parse_instant(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("malformed time"),
                "{bad}: {err}"
            );
            assert_eq!(crate::error::exit_code(&err), 1);
        }
    }

    #[test]
    fn pg_format() {
        assert_eq!(
            pg_timestamp(utc("2026-11-23T03:00:00.5Z")),
            "2026-11-23 03:00:00.500000+00"
        );
    }
}
