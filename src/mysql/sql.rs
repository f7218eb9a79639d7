//! MySQL/MariaDB's SQL in one place: identifier quoting and the queries, which live as plain
//! files under `sql/mysql/`. (Values in the client programs' option files are quoted by
//! `conn`, which writes those files.)

pub const SERVER_FACTS: &str = include_str!("../../sql/mysql/server_facts.sql");
pub const HEARTBEAT_SCHEMA: &str = include_str!("../../sql/mysql/heartbeat.sql");
pub const HEARTBEAT_WRITE: &str = include_str!("../../sql/mysql/heartbeat_write.sql");
pub const HEARTBEAT_NEWEST: &str = include_str!("../../sql/mysql/heartbeat_newest.sql");
pub const HEALTH_HEARTBEAT: &str = include_str!("../../sql/mysql/health_heartbeat.sql");
pub const DATABASES_IN_USE: &str = include_str!("../../sql/mysql/databases_in_use.sql");
pub const NON_TRANSACTIONAL: &str = include_str!("../../sql/mysql/non_transactional.sql");
pub const WAITING_SESSIONS: &str = include_str!("../../sql/mysql/waiting_sessions.sql");
pub const FULLTEXT_NGRAM: &str = include_str!("../../sql/mysql/fulltext_ngram.sql");

/// `` `name` ``, with embedded backticks doubled.
pub fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// `'value'`, a string literal: quotes and backslashes escaped (valid whatever the
/// server's `NO_BACKSLASH_ESCAPES` says: a doubled quote and no lone backslash).
pub fn quote_string(s: &str) -> String {
    if s.contains('\\') {
        // Under NO_BACKSLASH_ESCAPES `\\` is two characters: spell the value in hex instead.
        return format!("X'{}'", hex::encode(s.as_bytes()));
    }
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert_eq!(quote_ident("wp"), "`wp`");
        assert_eq!(quote_ident("a`b"), "`a``b`");
    }

    #[test]
    fn strings() {
        assert_eq!(quote_string("localhost"), "'localhost'");
        assert_eq!(quote_string("o'h"), "'o''h'");
        assert_eq!(quote_string("a\\b"), "X'615c62'");
    }
}
