//! MySQL/MariaDB's SQL in one place: identifier quoting and the queries, which live as plain
//! files under `sql/mysql/`. (Values in the client programs' option files are quoted by
//! `conn`, which writes those files.)

pub const SERVER_FACTS: &str = include_str!("../../sql/mysql/server_facts.sql");
pub const HEARTBEAT_SCHEMA: &str = include_str!("../../sql/mysql/heartbeat.sql");
pub const HEARTBEAT_WRITE: &str = include_str!("../../sql/mysql/heartbeat_write.sql");
pub const HEARTBEAT_NEWEST: &str = include_str!("../../sql/mysql/heartbeat_newest.sql");
pub const HEALTH_HEARTBEAT: &str = include_str!("../../sql/mysql/health_heartbeat.sql");
pub const DATABASES_IN_USE: &str = include_str!("../../sql/mysql/databases_in_use.sql");
pub const WAITING_SESSIONS: &str = include_str!("../../sql/mysql/waiting_sessions.sql");
pub const FULLTEXT_NGRAM: &str = include_str!("../../sql/mysql/fulltext_ngram.sql");

/// `` `name` ``, with embedded backticks doubled.
pub fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert_eq!(quote_ident("wp"), "`wp`");
        assert_eq!(quote_ident("a`b"), "`a``b`");
    }
}
