//! SQL smoke suites: plain `.sql` files a user can read and extend.
//!
//! ```sql
//! -- requires: pg_cjk_parser      (optional, repeatable: only where the extension is installed)
//! -- database: discourse           (optional: only in this database)
//! -- check: Japanese search finds のび太
//! SELECT to_tsvector(...) @@ plainto_tsquery(...);
//! ```
//! A check passes when its query returns one row whose first column is true.

use std::path::Path;

use anyhow::Context;

pub const POSTGRES_SUITE: (&str, &str) =
    ("postgres.sql", include_str!("../../sql/drill/postgres.sql"));
pub const MYSQL_SUITE: (&str, &str) = ("mysql.sql", include_str!("../../sql/drill/mysql.sql"));

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub suite: String,
    pub name: String,
    pub requires: Vec<String>,
    pub database: Option<String>,
    pub sql: String,
}

/// Parses a suite. Statements end with `;` at the end of a line.
pub fn parse(suite: &str, text: &str) -> Result<Vec<Check>, String> {
    let mut checks = Vec::new();
    let (mut name, mut requires, mut database) = (None::<String>, Vec::new(), None::<String>);
    let mut sql = String::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if sql.is_empty() {
            if let Some(rest) = trimmed.strip_prefix("--") {
                let rest = rest.trim();
                if let Some(v) = rest.strip_prefix("check:") {
                    name = Some(v.trim().to_string());
                } else if let Some(v) = rest.strip_prefix("requires:") {
                    requires.push(v.trim().to_string());
                } else if let Some(v) = rest.strip_prefix("database:") {
                    database = Some(v.trim().to_string());
                }
                continue;
            }
            if trimmed.is_empty() {
                continue;
            }
        }
        sql.push_str(line);
        sql.push('\n');
        if trimmed.ends_with(';') {
            let Some(n) = name.take() else {
                return Err(format!(
                    "{suite}:{}: a query without a `-- check: <name>` line before it",
                    i + 1
                ));
            };
            checks.push(Check {
                suite: suite.to_string(),
                name: n,
                requires: std::mem::take(&mut requires),
                database: database.take(),
                sql: std::mem::take(&mut sql)
                    .trim()
                    .trim_end_matches(';')
                    .to_string(),
            });
        }
    }
    if !sql.trim().is_empty() {
        return Err(format!("{suite}: the last query has no closing `;`"));
    }
    Ok(checks)
}

/// The built-in suite for the engine plus the configured extra suites.
pub fn load(builtin: (&str, &str), extra: &[std::path::PathBuf]) -> anyhow::Result<Vec<Check>> {
    let mut checks = parse(builtin.0, builtin.1).map_err(anyhow::Error::msg)?;
    for path in extra {
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::input_err!("drill.extra_suites: cannot read {}: {e}", path.display())
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        checks
            .extend(parse(&name, &text).map_err(|e| crate::input_err!("drill.extra_suites: {e}"))?);
    }
    Ok(checks)
}

/// Reads a suite file from disk (for `drill --suite` style use and tests).
pub fn read(path: &Path) -> anyhow::Result<Vec<Check>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&path.display().to_string(), &text).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_suites_parse() {
        let pg = parse(POSTGRES_SUITE.0, POSTGRES_SUITE.1).unwrap();
        assert!(pg.len() >= 8, "{pg:#?}");
        assert!(
            pg.iter()
                .any(|c| c.requires == ["pg_cjk_parser"] && c.sql.contains("のび太"))
        );
        assert!(pg.iter().all(|c| !c.sql.ends_with(';')));
        let my = parse(MYSQL_SUITE.0, MYSQL_SUITE.1).unwrap();
        assert!(!my.is_empty());
    }

    #[test]
    fn directives_and_errors() {
        let s = "-- a comment\n-- requires: pg_trgm\n-- database: app\n-- check: one\nSELECT\n  true;\n\n-- check: two\nSELECT 1 = 1;\n";
        let c = parse("t.sql", s).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "one");
        assert_eq!(c[0].requires, vec!["pg_trgm"]);
        assert_eq!(c[0].database.as_deref(), Some("app"));
        assert_eq!(c[0].sql, "SELECT\n  true");
        assert!(c[1].requires.is_empty());
        assert!(parse("t.sql", "SELECT 1;").unwrap_err().contains("check"));
        assert!(
            parse("t.sql", "-- check: x\nSELECT 1")
                .unwrap_err()
                .contains("closing")
        );
    }
}
