//! PostgreSQL's SQL in one place: quoting (identifiers, literals, conninfo values), the
//! statements dbagent writes itself (database settings, `CREATE DATABASE`), and the long
//! queries, which live as plain files under `sql/postgres/`.
//!
//! Values in `postgresql.conf` syntax (the recovery settings a restore writes) and the shell
//! syntax of `restore_command` are quoted next to the one writer of each: `restore::recovery`
//! and `restore`.

use crate::repo::dump::{DbSetting, DumpedDatabase};

pub const SERVER_FACTS: &str = include_str!("../../sql/postgres/server_facts.sql");
pub const ARCHIVER: &str = include_str!("../../sql/postgres/archiver.sql");
pub const ARCHIVE_PROGRESS: &str = include_str!("../../sql/postgres/archive_progress.sql");
pub const STREAM_SLOT: &str = include_str!("../../sql/postgres/stream_slot.sql");
pub const STREAM_ABANDONED: &str = include_str!("../../sql/postgres/stream_abandoned.sql");
pub const DATABASES: &str = include_str!("../../sql/postgres/databases.sql");
pub const ROW_ESTIMATES: &str = include_str!("../../sql/postgres/row_estimates.sql");
pub const DATABASE_SETTINGS: &str = include_str!("../../sql/postgres/database_settings.sql");
pub const DUMP_SETTINGS: &str = include_str!("../../sql/postgres/dump_settings.sql");
pub const DUMP_TABLES: &str = include_str!("../../sql/postgres/dump_tables.sql");
pub const HEARTBEAT_SCHEMA: &str = include_str!("../../sql/postgres/heartbeat.sql");
pub const HEARTBEAT_WRITE: &str = include_str!("../../sql/postgres/heartbeat_write.sql");
pub const HEARTBEAT_NEWEST: &str = include_str!("../../sql/postgres/heartbeat_newest.sql");
pub const HEALTH_STATE: &str = include_str!("../../sql/postgres/health_state.sql");
pub const HEALTH_RECEIVER: &str = include_str!("../../sql/postgres/health_receiver.sql");
pub const HEALTH_REPLICATION: &str = include_str!("../../sql/postgres/health_replication.sql");
pub const HEALTH_ARCHIVER: &str = include_str!("../../sql/postgres/health_archiver.sql");

/// The databases a logical dump covers, with what recreating them needs, for a server of
/// `version_num` (the ICU columns arrived in 15 and were renamed in 17).
pub fn dump_databases(version_num: i32) -> String {
    let icu = if version_num >= 170000 {
        "datlocprovider::text, datlocale"
    } else if version_num >= 150000 {
        "datlocprovider::text, daticulocale"
    } else {
        "'c'::text, NULL::text"
    };
    include_str!("../../sql/postgres/dump_databases.sql").replace("{icu}", icu)
}

/// Settings whose values are lists that PostgreSQL quotes element by element (pg_dump's
/// `variable_is_guc_list_quote`): `SET search_path TO '$user', 'public'`.
const LIST_SETTINGS: [&str; 6] = [
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
];

/// `"name"`, with embedded double quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `'value'`, with quotes doubled (and `E'…'` escaping when it holds a backslash).
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// A value in a libpq connection string (`dbname='…'`).
pub fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `ALTER DATABASE … SET …` (or `ALTER ROLE … IN DATABASE …`) as pg_dump would write it.
pub fn setting_sql(database: &str, s: &DbSetting) -> String {
    let target = match &s.role {
        Some(role) => format!(
            "ALTER ROLE {} IN DATABASE {}",
            quote_ident(role),
            quote_ident(database)
        ),
        None => format!("ALTER DATABASE {}", quote_ident(database)),
    };
    let value = if LIST_SETTINGS.contains(&s.name.to_ascii_lowercase().as_str()) {
        split_guc_list(&s.value)
            .iter()
            .map(|v| quote_literal(v))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        quote_literal(&s.value)
    };
    format!("{target} SET {} TO {value}", setting_name(&s.name))
}

/// Splits a list setting the way PostgreSQL's SplitGUCList does: commas separate elements,
/// double quotes protect them (`""` is a quote).
fn split_guc_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        item.push('"');
                    } else {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
            while chars.peek().is_some_and(|&c| c != ',') {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                item.push(c);
                chars.next();
            }
            item = item.trim_end().to_string();
        }
        out.push(item);
        if chars.next().is_none() {
            break;
        }
    }
    out
}

fn setting_name(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

/// `CREATE DATABASE` with the dumped database's encoding and locale (and owner, when that
/// role exists on the target).
pub fn create_database_sql(
    name: &str,
    db: &DumpedDatabase,
    owner_exists: bool,
    server_version: i32,
) -> String {
    let mut sql = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
        quote_ident(name),
        quote_literal(&db.encoding),
        quote_literal(&db.collate),
        quote_literal(&db.ctype)
    );
    if db.locale_provider == "i" && server_version >= 150000 {
        sql.push_str(" LOCALE_PROVIDER icu");
        if let Some(icu) = &db.icu_locale {
            sql.push_str(&format!(" ICU_LOCALE {}", quote_literal(icu)));
        }
    }
    if owner_exists {
        sql.push_str(&format!(" OWNER {}", quote_ident(&db.owner)));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(role: Option<&str>, name: &str, value: &str) -> DbSetting {
        DbSetting {
            role: role.map(str::to_string),
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn settings_are_written_as_pg_dump_would() {
        assert_eq!(
            setting_sql(
                "new",
                &setting(
                    None,
                    "default_text_search_config",
                    "public.config_2_gram_cjk"
                )
            ),
            "ALTER DATABASE \"new\" SET default_text_search_config TO 'public.config_2_gram_cjk'"
        );
        assert_eq!(
            setting_sql(
                "new",
                &setting(None, "search_path", "\"$user\", public, \"odd,schema\"")
            ),
            "ALTER DATABASE \"new\" SET search_path TO '$user', 'public', 'odd,schema'"
        );
        assert_eq!(
            setting_sql("n\"b", &setting(Some("app"), "work_mem", "8MB")),
            "ALTER ROLE \"app\" IN DATABASE \"n\"\"b\" SET work_mem TO '8MB'"
        );
        assert_eq!(
            setting_sql("n", &setting(None, "myext.Opt", "it's")),
            "ALTER DATABASE \"n\" SET \"myext.Opt\" TO 'it''s'"
        );
        assert_eq!(split_guc_list(""), vec![""]);
        assert_eq!(split_guc_list("a, \"b\"\"c\" ,d"), vec!["a", "b\"c", "d"]);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
        assert_eq!(conninfo_quote("new 'db'\\"), "'new \\'db\\'\\\\'");
        assert!(dump_databases(170000).contains("datlocale"));
        assert!(dump_databases(150000).contains("daticulocale"));
        assert!(!dump_databases(140000).contains("{icu}"));
    }
}
