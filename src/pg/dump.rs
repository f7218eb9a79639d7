//! PostgreSQL logical dumps: `pg_dump -Fc` per database, globals, and database-level settings.
//!
//! Each database is dumped from a snapshot exported by a REPEATABLE READ transaction that also
//! counts every table's rows (`pg_dump --snapshot`), so the manifest's exact row counts are
//! those of the dump itself. `pg_dump -Fc` restored with `pg_restore -d newdb` loses the
//! database's own settings (`ALTER DATABASE … SET default_text_search_config`, which CJK
//! search depends on): they are read from `pg_db_role_setting`, kept in the manifest and
//! re-applied by the restore. Roles come from `pg_dumpall --globals-only`; a restore creates
//! the roles the target server lacks and never changes existing ones.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use tokio_postgres::Client;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::ConnInfo;
use crate::pg::sql::{self, conninfo_quote, create_database_sql, quote_ident, setting_sql};
use crate::pipeline::{self, PipeOptions};
use crate::proc::{Program, Stdout};
use crate::repo::FORMAT_VERSION;
use crate::repo::dump::{self as keys, DbSetting, DumpedDatabase, PgDumpSet, TableCount};
use crate::repo::manifest::ObjectRef;
use crate::restore::human;
use crate::restore::plan::Target;
use crate::storage::Store;
use crate::timespec::show;

/// `dbagent backup --engine postgres --kind dump`. Returns the summary printed on stdout.
pub async fn backup_dumps(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<String> {
    let started = Instant::now();
    let conn = ConnInfo::from_config(&cfg.pg);
    let client = conn.connect().await?;
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    current_setting('server_version'),
                    current_setting('server_version_num')::int",
            &[],
        )
        .await
        .context("reading server settings")?;
    let sysid: u64 = row
        .get::<_, String>(0)
        .parse()
        .context("system identifier")?;
    let server_version: String = row.get(1);
    let version_num: i32 = row.get(2);
    let databases = list_databases(&client, version_num).await?;
    let chosen: Vec<DbFacts> = if cfg.pg.dump_databases.is_empty() {
        databases
    } else {
        let mut out = Vec::new();
        for name in &cfg.pg.dump_databases {
            match databases.iter().find(|d| &d.name == name) {
                Some(d) => out.push(d.clone()),
                None => {
                    return Err(input_err!(
                        "pg.dump_databases names {name:?}, which is not a database on {} that accepts connections (there are: {})",
                        conn.describe(),
                        databases
                            .iter()
                            .map(|d| d.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        out
    };
    drop(client);
    // Fail on a wrong bucket or credentials before reading the database.
    store.list(&keys::dumps_prefix(sysid)).await?;

    let start_time = Utc::now();
    let id = crate::repo::new_id(start_time);
    if store.head(&keys::manifest_key(sysid, &id)).await?.is_some() {
        anyhow::bail!("a dump named {id} already exists; try again in a second");
    }
    let mut written_keys = Vec::new();
    let result = dump_all(cfg, &store, &conn, sysid, &id, &chosen, &mut written_keys).await;
    let (globals, dumped) = match result {
        Ok(r) => r,
        Err(e) => {
            for key in &written_keys {
                let _ = store.delete(key).await;
            }
            return Err(e);
        }
    };
    let manifest = PgDumpSet {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        system_identifier: sysid.to_string(),
        server_version,
        start_time,
        stop_time: Utc::now(),
        globals,
        databases: dumped,
        dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    crate::repo::write_manifest(
        store.as_ref(),
        &keys::manifest_key(sysid, &id),
        &manifest,
        "the dump manifest",
    )
    .await?;
    let tables: usize = manifest.databases.iter().map(|d| d.tables.len()).sum();
    let rows: i64 = manifest
        .databases
        .iter()
        .flat_map(|d| &d.tables)
        .map(|t| t.rows)
        .sum();
    let settings: usize = manifest.databases.iter().map(|d| d.settings.len()).sum();
    Ok(format!(
        "dump {id} of cluster {sysid} complete in {:.1}s: {} databases ({}), {tables} tables, {rows} rows, {settings} database settings, globals; {} read, {} stored",
        started.elapsed().as_secs_f64(),
        manifest.databases.len(),
        manifest
            .databases
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        human(manifest.plain_bytes()),
        human(manifest.stored_bytes())
    ))
}

#[derive(Debug, Clone)]
struct DbFacts {
    name: String,
    owner: String,
    encoding: String,
    collate: String,
    ctype: String,
    locale_provider: String,
    icu_locale: Option<String>,
}

async fn list_databases(client: &Client, version_num: i32) -> anyhow::Result<Vec<DbFacts>> {
    Ok(client
        .query(&sql::dump_databases(version_num), &[])
        .await
        .context("listing databases")?
        .into_iter()
        .map(|r| DbFacts {
            name: r.get(0),
            owner: r.get(1),
            encoding: r.get(2),
            collate: r.get(3),
            ctype: r.get(4),
            locale_provider: r.get(5),
            icu_locale: r.get(6),
        })
        .collect())
}

async fn dump_all(
    cfg: &Config,
    store: &Arc<dyn Store>,
    conn: &ConnInfo,
    sysid: u64,
    id: &str,
    databases: &[DbFacts],
    written: &mut Vec<String>,
) -> anyhow::Result<(ObjectRef, Vec<DumpedDatabase>)> {
    let globals_key = keys::globals_key(sysid, id);
    written.push(globals_key.clone());
    let globals = run_to_store(
        cfg,
        store,
        conn,
        "pg_dumpall",
        &["--globals-only", "--no-password"],
        &globals_key,
    )
    .await
    .context("dumping roles and tablespaces (pg_dumpall --globals-only)")?;
    let mut out = Vec::new();
    for db in databases {
        tracing::info!(database = %db.name, "dumping");
        let key = keys::database_key(sysid, id, &db.name);
        written.push(key.clone());
        out.push(
            dump_database(cfg, store, conn, db, &key)
                .await
                .with_context(|| format!("dumping database {}", db.name))?,
        );
    }
    Ok((globals, out))
}

/// Runs a PostgreSQL program and streams its stdout into `key`.
async fn run_to_store(
    cfg: &Config,
    store: &Arc<dyn Store>,
    conn: &ConnInfo,
    program: &str,
    args: &[&str],
    key: &str,
) -> anyhow::Result<ObjectRef> {
    let program = Program::new(crate::pg::bins::program(&cfg.pg, program)?)
        .args(args)
        .envs(conn.child_env());
    let (data, _) = program
        .run()
        .to_store(
            store.as_ref(),
            key,
            PipeOptions::from_config(cfg),
            Stdout::plain(),
        )
        .await?;
    Ok(data)
}

/// Dumps one database from a snapshot that the same transaction counts rows in.
async fn dump_database(
    cfg: &Config,
    store: &Arc<dyn Store>,
    conn: &ConnInfo,
    db: &DbFacts,
    key: &str,
) -> anyhow::Result<DumpedDatabase> {
    let dbconn = conn.with_db(&db.name);
    let client = dbconn.connect().await?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .context("starting the snapshot transaction")?;
    let snapshot: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .context("exporting a snapshot")?
        .get(0);
    let snapshot_time = Utc::now();
    let settings = client
        .query(sql::DUMP_SETTINGS, &[])
        .await
        .context("reading database settings")?
        .into_iter()
        .filter_map(|r| {
            let role: Option<String> = r.get(0);
            let item: String = r.get(1);
            let (name, value) = item.split_once('=')?;
            Some(DbSetting {
                role,
                name: name.to_string(),
                value: value.to_string(),
            })
        })
        .collect();
    let tables: Vec<String> = client
        .query(sql::DUMP_TABLES, &[])
        .await
        .context("listing tables")?
        .into_iter()
        .map(|r| r.get(0))
        .collect();

    let snapshot_arg = format!("--snapshot={snapshot}");
    // zstd compresses better and faster than pg_dump's own zlib.
    let args = ["-Fc", "-Z", "0", "--no-password", &snapshot_arg];
    let dump = run_to_store(cfg, store, &dbconn, "pg_dump", &args, key);
    let counts = async {
        let mut out = Vec::with_capacity(tables.len());
        for table in &tables {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .with_context(|| format!("counting rows of {table}"))?
                .get(0);
            out.push(TableCount {
                table: table.clone(),
                rows: n,
            });
        }
        anyhow::Ok(out)
    };
    // The transaction stays open until pg_dump is done: its snapshot must outlive the import.
    let (data, counts) = tokio::join!(dump, counts);
    let data = data?;
    let counts = counts?;
    client
        .batch_execute("COMMIT")
        .await
        .context("ending the snapshot transaction")?;
    Ok(DumpedDatabase {
        name: db.name.clone(),
        owner: db.owner.clone(),
        encoding: db.encoding.clone(),
        collate: db.collate.clone(),
        ctype: db.ctype.clone(),
        locale_provider: db.locale_provider.clone(),
        icu_locale: db.icu_locale.clone(),
        snapshot_time,
        settings,
        tables: counts,
        data,
    })
}

#[derive(Debug, Clone)]
pub struct DumpRestoreOptions {
    pub database: String,
    pub target: Target,
    /// Connection URL of the server (and new database name) to restore into.
    pub target_url: String,
    pub dry_run: bool,
}

/// Which dump set holds `database` for `target`: pure, unit-tested.
pub fn choose_dump<'a>(
    sets: &'a [PgDumpSet],
    database: &str,
    target: Target,
) -> anyhow::Result<(&'a PgDumpSet, &'a DumpedDatabase)> {
    let with_db: Vec<(&PgDumpSet, &DumpedDatabase)> = sets
        .iter()
        .filter_map(|s| s.database(database).map(|d| (s, d)))
        .collect();
    let Some(first) = with_db.first() else {
        let mut names: Vec<&str> = sets
            .iter()
            .flat_map(|s| s.databases.iter().map(|d| d.name.as_str()))
            .collect();
        names.sort();
        names.dedup();
        return Err(if names.is_empty() {
            input_err!(
                "the repository holds no logical dumps for this cluster: run `dbagent backup --kind dump` first"
            )
        } else {
            input_err!(
                "no dump of database {database:?} in the repository (dumped databases: {})",
                names.join(", ")
            )
        });
    };
    match target {
        Target::Latest => Ok(*with_db.last().expect("checked non-empty")),
        Target::Time(t) => with_db
            .iter()
            .rev()
            .find(|(_, d)| d.snapshot_time <= t)
            .copied()
            .ok_or_else(|| {
                input_err!(
                    "target {} is before the first dump of {database:?}: the earliest is {} (dump {})",
                    show(t),
                    show(first.1.snapshot_time),
                    first.0.id
                )
            }),
    }
}

/// Where a dump goes: `postgresql://user@host:port/newdb` (`?host=/socket/dir` for a socket).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetUrl {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub database: String,
}

pub fn parse_target_url(url: &str) -> anyhow::Result<TargetUrl> {
    let parsed = url::Url::parse(url).map_err(|e| {
        input_err!("--target-url {url:?}: {e}: expected postgresql://user@host:port/newdb")
    })?;
    if parsed.scheme() != "postgresql" && parsed.scheme() != "postgres" {
        return Err(input_err!(
            "--target-url must be postgresql://user@host:port/newdb, got scheme {:?}",
            parsed.scheme()
        ));
    }
    if parsed.password().is_some() {
        return Err(input_err!(
            "--target-url must not carry a password (it would show in the process list): use PGPASSWORD_FILE or PGPASSFILE"
        ));
    }
    let decode = |s: &str| {
        url::form_urlencoded::parse(s.replace('+', "%2B").as_bytes())
            .map(|(k, v)| format!("{k}{v}"))
            .collect::<String>()
    };
    let database = decode(parsed.path().trim_start_matches('/'));
    if database.is_empty() {
        return Err(input_err!(
            "--target-url must name the new database: postgresql://user@host:port/newdb"
        ));
    }
    let host = parsed
        .query_pairs()
        .find(|(k, _)| k == "host")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            parsed
                .host_str()
                .filter(|h| !h.is_empty())
                .map(str::to_string)
        });
    Ok(TargetUrl {
        host,
        port: parsed.port(),
        user: Some(parsed.username())
            .filter(|u| !u.is_empty())
            .map(decode),
        database,
    })
}

/// `dbagent restore --engine postgres --dump <db> --target-url <url>`.
pub async fn restore_dump(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &DumpRestoreOptions,
) -> anyhow::Result<()> {
    let target = parse_target_url(&opts.target_url)?;
    let sysid = crate::restore::choose_cluster(cfg, store.as_ref()).await?;
    let sets = keys::load(store.as_ref(), sysid).await?;
    let (set, db) = choose_dump(&sets, &opts.database, opts.target)?;

    let mut pg = cfg.pg.clone();
    pg.host = target.host.clone().or(pg.host);
    pg.port = target.port.or(pg.port);
    pg.user = target.user.clone().or(pg.user);
    pg.database = Some("postgres".into());
    let admin = ConnInfo::from_config(&pg);
    let new_db = admin.with_db(&target.database);
    let client = admin.connect().await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&target.database],
        )
        .await
        .context("checking the target database")?
        .is_some();
    if exists {
        return Err(input_err!(
            "database {:?} already exists on {}: restore into a new database name",
            target.database,
            admin.describe()
        ));
    }
    println!(
        "restore plan: dump {} of database {:?} (cluster {}, snapshot at {}, {} tables, {} database settings) into the new database {:?} on {}",
        set.id,
        db.name,
        set.system_identifier,
        show(db.snapshot_time),
        db.tables.len(),
        db.settings.len(),
        target.database,
        admin.describe()
    );
    if opts.dry_run {
        println!("dry run: nothing was written");
        return Ok(());
    }

    let started = Instant::now();
    let roles = create_missing_roles(store.as_ref(), set, &client).await?;
    let server_version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let owner_exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&db.owner])
        .await?
        .is_some();
    client
        .batch_execute(&create_database_sql(
            &target.database,
            db,
            owner_exists,
            server_version,
        ))
        .await
        .with_context(|| format!("creating database {:?}", target.database))?;
    let restored = restore_into(cfg, store.as_ref(), db, &new_db).await;
    let restored = match restored {
        Ok(()) => apply_settings(&new_db, &target.database, db).await,
        Err(e) => Err(e),
    };
    if let Err(e) = restored {
        let _ = client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {}",
                quote_ident(&target.database)
            ))
            .await;
        return Err(e.context(format!(
            "restoring dump {} of {:?} failed (the new database was dropped)",
            set.id, db.name
        )));
    }
    println!(
        "restored dump {} of {:?} into the new database {:?} on {} in {:.1}s: {} tables, {} database settings re-applied{}{}",
        set.id,
        db.name,
        target.database,
        admin.describe(),
        started.elapsed().as_secs_f64(),
        db.tables.len(),
        db.settings.len(),
        if db.settings.is_empty() {
            String::new()
        } else {
            format!(
                " ({})",
                db.settings
                    .iter()
                    .map(|s| format!("{}={}", s.name, s.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if roles.is_empty() {
            String::new()
        } else {
            format!("; created missing roles {}", roles.join(", "))
        }
    );
    Ok(())
}

/// Streams the archive into `pg_restore`, stopping at the first error.
async fn restore_into(
    cfg: &Config,
    store: &dyn Store,
    db: &DumpedDatabase,
    target: &ConnInfo,
) -> anyhow::Result<()> {
    Program::new(crate::pg::bins::program(&cfg.pg, "pg_restore")?)
        .args(["--exit-on-error", "--no-password"])
        .arg(format!(
            "--dbname=dbname={}",
            conninfo_quote(&target.dbname)
        ))
        .envs(target.child_env())
        .run()
        .from_store(store, &db.data, &format!("the dump of {}", db.name))
        .await
}

async fn apply_settings(target: &ConnInfo, name: &str, db: &DumpedDatabase) -> anyhow::Result<()> {
    if db.settings.is_empty() {
        return Ok(());
    }
    // Connected to the new database: settings that name its objects (a text search
    // configuration the dump created) are checked against them.
    let client = target.connect().await?;
    for s in &db.settings {
        if let Some(role) = &s.role {
            let exists = client
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[role])
                .await?
                .is_some();
            if !exists {
                tracing::warn!(%role, setting = %s.name, "role does not exist on the target: its setting is not re-applied");
                continue;
            }
        }
        let sql = setting_sql(name, s);
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("re-applying {}={}", s.name, s.value))?;
    }
    Ok(())
}

/// Creates the roles in the dump's globals that the target lacks (with their attributes,
/// settings and memberships). Existing roles are left exactly as they are.
async fn create_missing_roles(
    store: &dyn Store,
    set: &PgDumpSet,
    client: &Client,
) -> anyhow::Result<Vec<String>> {
    let (text, trailer) = pipeline::download(store, &set.globals.key, Vec::new())
        .await
        .context("downloading the dump's roles (globals)")?;
    set.globals
        .verify(&trailer, &format!("the globals of dump {}", set.id))?;
    let existing: Vec<String> = client
        .query("SELECT rolname::text FROM pg_roles", &[])
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let statements = missing_role_statements(&String::from_utf8_lossy(&text), &existing);
    let mut created = Vec::new();
    for (role, sql) in statements {
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("creating role {role:?} from the dump's globals"))?;
        if !created.contains(&role) {
            created.push(role);
        }
    }
    Ok(created)
}

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

    #[test]
    fn target_urls() {
        let t = parse_target_url("postgresql://postgres@127.0.0.1:5433/restored").unwrap();
        assert_eq!(
            t,
            TargetUrl {
                host: Some("127.0.0.1".into()),
                port: Some(5433),
                user: Some("postgres".into()),
                database: "restored".into()
            }
        );
        let t = parse_target_url("postgres:///new%20db?host=/var/run/postgresql").unwrap();
        assert_eq!(t.host.as_deref(), Some("/var/run/postgresql"));
        assert_eq!(t.database, "new db");
        for bad in [
            "postgresql://u:pw@h/db",
            "postgresql://u@h:5432/",
            "mysql://u@h/db",
            "nonsense",
        ] {
            let e = parse_target_url(bad).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 1, "{bad}");
        }
    }

    fn set(id: &str, dbs: &[(&str, &str)]) -> PgDumpSet {
        let t = |s: &str| format!("2026-11-23T{s}Z").parse().unwrap();
        let obj = ObjectRef {
            key: "k".into(),
            stored_bytes: 1,
            plain_bytes: 1,
            sha256: String::new(),
        };
        PgDumpSet {
            format_version: 1,
            id: id.into(),
            system_identifier: "1".into(),
            server_version: "15".into(),
            start_time: t(dbs[0].1),
            stop_time: t(dbs[0].1),
            globals: obj.clone(),
            databases: dbs
                .iter()
                .map(|(name, at)| DumpedDatabase {
                    name: name.to_string(),
                    owner: "postgres".into(),
                    encoding: "UTF8".into(),
                    collate: "C.UTF-8".into(),
                    ctype: "C.UTF-8".into(),
                    locale_provider: "c".into(),
                    icu_locale: None,
                    snapshot_time: t(at),
                    settings: vec![],
                    tables: vec![],
                    data: obj.clone(),
                })
                .collect(),
            dbagent_version: "test".into(),
        }
    }

    #[test]
    fn picks_the_newest_dump_at_or_before_the_target() {
        let t = |s: &str| Target::Time(format!("2026-11-23T{s}Z").parse().unwrap());
        let sets = vec![
            set("d1", &[("discourse", "01:00:00"), ("logto", "01:00:10")]),
            set("d2", &[("discourse", "02:00:00")]),
        ];
        assert_eq!(
            choose_dump(&sets, "discourse", t("01:30:00")).unwrap().0.id,
            "d1"
        );
        assert_eq!(
            choose_dump(&sets, "discourse", t("02:00:00")).unwrap().0.id,
            "d2"
        );
        assert_eq!(
            choose_dump(&sets, "discourse", Target::Latest)
                .unwrap()
                .0
                .id,
            "d2"
        );
        assert_eq!(
            choose_dump(&sets, "logto", Target::Latest).unwrap().0.id,
            "d1"
        );
        let e = choose_dump(&sets, "discourse", t("00:30:00")).unwrap_err();
        assert!(e.to_string().contains("before the first dump"), "{e}");
        let e = choose_dump(&sets, "wordpress", Target::Latest).unwrap_err();
        assert!(e.to_string().contains("discourse, logto"), "{e}");
        assert_eq!(crate::error::exit_code(&e), 1);
        let e = choose_dump(&[], "discourse", Target::Latest).unwrap_err();
        assert!(e.to_string().contains("backup --kind dump"), "{e}");
    }
}
