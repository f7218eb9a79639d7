//! The roles in a `pg_dumpall --globals-only` script: which statements create and describe
//! the roles a restore target lacks.

use crate::pg::sql::quote_ident;

/// The statements of a `pg_dumpall --globals-only` script that concern roles missing from
/// `existing`: CREATE ROLE, ALTER ROLE (attributes, settings) and memberships. Pure.
pub fn missing_role_statements(globals: &str, existing: &[String]) -> Vec<(String, String)> {
    let mut new_roles: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in globals.lines() {
        let line = line.trim_end();
        if !line.ends_with(';') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("CREATE ROLE ") {
            if let Some((role, tail)) = pg_identifier(rest) {
                if tail == ";" && !existing.contains(&role) {
                    new_roles.push(role.clone());
                    out.push((role, line.to_string()));
                }
            }
        } else if let Some(rest) = line.strip_prefix("ALTER ROLE ") {
            if let Some((role, tail)) = pg_identifier(rest) {
                // Role-in-database settings name the source database: the restore applies
                // its own for the new database.
                if new_roles.contains(&role) && !tail.trim_start().starts_with("IN DATABASE") {
                    out.push((role, line.to_string()));
                }
            }
        } else if let Some(rest) = line.strip_prefix("GRANT ") {
            // GRANT <role> TO <member> [WITH ADMIN OPTION] [GRANTED BY <grantor>];
            let Some((granted, tail)) = pg_identifier(rest) else {
                continue;
            };
            let Some(tail) = tail.strip_prefix(" TO ") else {
                continue;
            };
            let Some((member, tail)) = pg_identifier(tail) else {
                continue;
            };
            if new_roles.contains(&member) || new_roles.contains(&granted) {
                // The grantor may not exist on the target; the grant is the same without it.
                let admin = if tail.contains("WITH ADMIN OPTION") {
                    " WITH ADMIN OPTION"
                } else {
                    ""
                };
                out.push((
                    member.clone(),
                    format!(
                        "GRANT {} TO {}{admin};",
                        quote_ident(&granted),
                        quote_ident(&member)
                    ),
                ));
            }
        }
    }
    out
}

/// A PostgreSQL identifier at the start of `s` (bare, or double-quoted with `""`), and the rest.
fn pg_identifier(s: &str) -> Option<(String, &str)> {
    if let Some(body) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if matches!(chars.peek(), Some((_, '"'))) {
                    chars.next();
                    out.push('"');
                    continue;
                }
                return Some((out, &body[i + 1..]));
            }
            out.push(c);
        }
        return None;
    }
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].to_string(), &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_roles_are_created() {
        let globals = r#"\restrict abc
SET default_transaction_read_only = off;
CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;
CREATE ROLE "we""ird";
ALTER ROLE "we""ird" WITH NOLOGIN;
ALTER ROLE app SET search_path TO '$user', 'public';
ALTER ROLE app IN DATABASE discourse SET work_mem TO '8MB';
GRANT app TO "we""ird" GRANTED BY postgres;
GRANT pg_monitor TO postgres GRANTED BY postgres;
"#;
        let existing = vec!["postgres".to_string(), "pg_monitor".to_string()];
        let got: Vec<String> = missing_role_statements(globals, &existing)
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            got,
            vec![
                "CREATE ROLE app;",
                "ALTER ROLE app WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:x';",
                "CREATE ROLE \"we\"\"ird\";",
                "ALTER ROLE \"we\"\"ird\" WITH NOLOGIN;",
                "ALTER ROLE app SET search_path TO '$user', 'public';",
                "GRANT \"app\" TO \"we\"\"ird\";",
            ]
        );
    }
}
