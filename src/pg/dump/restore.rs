//! `dbagent restore --dump <db> --target-url <url>`: the newest dump of the database at or
//! before the target goes into a new database, created with the source's encoding and locale.
//! Only the roles the target lacks are created (existing ones are never changed), the archive
//! streams into `pg_restore --exit-on-error`, the database's own settings are applied again,
//! and on any failure the new database is dropped.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::Client;

use super::globals::missing_role_statements;
use crate::config::Config;
use crate::input_err;
use crate::pg::conn::ConnInfo;
use crate::pg::sql::{conninfo_quote, create_database_sql, quote_ident, setting_sql};
use crate::pipeline;
use crate::proc::Program;
use crate::repo::dump::{self as keys, DumpedDatabase, PgDumpSet};
use crate::restore::plan::Target;
use crate::storage::Store;
use crate::timespec::show;

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

/// `url` with what lies between `://` and its last `@` left out, and without its query: a
/// URL that does not parse may carry a password (one with a `/` in it cuts the host short,
/// or `?password=`), never to be shown.
fn without_userinfo(url: &str) -> String {
    let url = url.split_once('?').map_or(url, |(u, _)| u);
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rfind('@') {
            Some(at) => format!("{scheme}://…@{}", &rest[at + 1..]),
            None => url.to_string(),
        },
        None => match url.rfind('@') {
            Some(at) => format!("…@{}", &url[at + 1..]),
            None => url.to_string(),
        },
    }
}

pub fn parse_target_url(url: &str) -> anyhow::Result<TargetUrl> {
    let parsed = url::Url::parse(url).map_err(|e| {
        input_err!(
            "--target-url {:?}: {e}: expected postgresql://user@host:port/newdb",
            without_userinfo(url)
        )
    })?;
    if parsed.scheme() != "postgresql" && parsed.scheme() != "postgres" {
        return Err(input_err!(
            "--target-url must be postgresql://user@host:port/newdb, got scheme {:?}",
            parsed.scheme()
        ));
    }
    if parsed.password().is_some() || parsed.query_pairs().any(|(k, _)| k == "password") {
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

/// What `restore --dump` did (or, on a dry run, would do).
#[derive(Debug, Serialize)]
pub struct DumpRestoreReport {
    pub plan: String,
    pub dry_run: bool,
    pub dump: String,
    pub database: String,
    pub new_database: String,
    pub server: String,
    pub tables: usize,
    /// The database settings applied again, as `name=value`.
    pub settings: Vec<String>,
    /// Roles the target lacked and the restore created.
    pub created_roles: Vec<String>,
    pub seconds: Option<f64>,
}

impl std::fmt::Display for DumpRestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.plan)?;
        let Some(seconds) = self.seconds else {
            return f.write_str("dry run: nothing was written");
        };
        write!(
            f,
            "restored dump {} of {:?} into the new database {:?} on {} in {seconds:.1}s: {} tables, {} database settings re-applied",
            self.dump,
            self.database,
            self.new_database,
            self.server,
            self.tables,
            self.settings.len(),
        )?;
        if !self.settings.is_empty() {
            write!(f, " ({})", self.settings.join(", "))?;
        }
        if !self.created_roles.is_empty() {
            write!(
                f,
                "; created missing roles {}",
                self.created_roles.join(", ")
            )?;
        }
        Ok(())
    }
}

/// `dbagent restore --engine postgres --dump <db> --target-url <url>`.
pub async fn restore_dump(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &DumpRestoreOptions,
) -> anyhow::Result<DumpRestoreReport> {
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
    let plan = format!(
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
    let mut report = DumpRestoreReport {
        plan,
        dry_run: opts.dry_run,
        dump: set.id.clone(),
        database: db.name.clone(),
        new_database: target.database.clone(),
        server: admin.describe(),
        tables: db.tables.len(),
        settings: db
            .settings
            .iter()
            .map(|s| format!("{}={}", s.name, s.value))
            .collect(),
        created_roles: Vec::new(),
        seconds: None,
    };
    if opts.dry_run {
        return Ok(report);
    }
    // What the restore needs is checked before a role or a database is created: pg_restore,
    // a user that may create databases, the keys.
    let pg_restore = crate::pg::bins::program(&cfg.pg, "pg_restore")?;
    let may_create: bool = client
        .query_one(
            "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .context("checking the target user's privileges")?
        .get(0);
    if !may_create {
        return Err(input_err!(
            "the user dbagent connects to {} as may not create databases: give it CREATEDB (ALTER ROLE … CREATEDB) or use another user in --target-url",
            admin.describe()
        ));
    }
    let needed: Vec<_> = [db.data.needs(), set.globals.needs()]
        .into_iter()
        .flatten()
        .collect();
    crate::pipeline::check_readable(store.as_ref(), &needed).await?;
    eprintln!("{}", report.plan);

    let started = Instant::now();
    let roles = create_missing_roles(store.as_ref(), set, &client).await?;
    let created = async {
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
            .with_context(|| format!("creating database {:?}", target.database))
    }
    .await;
    // Only what this restore created goes again: the database once CREATE DATABASE
    // succeeded (one of that name created meanwhile by someone else stays), then the roles.
    let restored = match created {
        Err(e) => Err((e, None)),
        Ok(()) => async {
            restore_into(&pg_restore, store.as_ref(), db, &new_db).await?;
            apply_settings(&new_db, &target.database, db).await
        }
        .await
        .map_err(|e| (e, Some(target.database.as_str()))),
    };
    if let Err((e, database)) = restored {
        let mut undone = Vec::new();
        let mut left = Vec::new();
        if let Some(name) = database {
            let dropped = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_ident(name)))
                .await;
            match dropped {
                Ok(()) => undone.push(format!("the new database {name:?} was dropped")),
                Err(_) => left.push(format!("database {name:?}")),
            }
        }
        let mut dropped_roles = Vec::new();
        for role in roles.iter().rev() {
            let dropped = client
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
                .await;
            match dropped {
                Ok(()) => dropped_roles.push(role.as_str()),
                Err(_) => left.push(format!("role {role:?}")),
            }
        }
        if !dropped_roles.is_empty() {
            undone.push(format!(
                "the roles it created were dropped ({})",
                dropped_roles.join(", ")
            ));
        }
        if undone.is_empty() {
            undone.push("nothing was created".into());
        }
        let left = match left.is_empty() {
            true => String::new(),
            false => format!(
                "; drop by hand what it created and could not drop: {}",
                left.join(", ")
            ),
        };
        return Err(e.context(format!(
            "restoring dump {} of {:?} failed ({}{left})",
            set.id,
            db.name,
            undone.join("; ")
        )));
    }
    report.created_roles = roles;
    report.seconds = Some(started.elapsed().as_secs_f64());
    Ok(report)
}

/// Streams the archive into `pg_restore`, stopping at the first error.
async fn restore_into(
    pg_restore: &std::path::Path,
    store: &dyn Store,
    db: &DumpedDatabase,
    target: &ConnInfo,
) -> anyhow::Result<()> {
    Program::new(pg_restore)
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
    if statements.is_empty() {
        return Ok(Vec::new());
    }
    // All of them or none: a role refused halfway leaves no other behind.
    client.batch_execute("BEGIN").await?;
    let mut created = Vec::new();
    for (role, sql) in statements {
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(anyhow::Error::new(e).context(format!(
                "creating role {role:?} from the dump's globals (no role was created)"
            )));
        }
        if !created.contains(&role) {
            created.push(role);
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::ObjectRef;

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
        // A password with a `/` (base64) cuts the host short: refused without showing it.
        let e = parse_target_url("postgresql://dbagent:k3/Zx+Q@db:5432/restored").unwrap_err();
        let shown = crate::error::one_line(&e);
        assert!(!shown.contains("k3") && !shown.contains("Zx+Q"), "{shown}");
        assert!(
            shown.contains("\"postgresql://…@db:5432/restored\""),
            "{shown}"
        );
        // Nor one given as a parameter, whether the URL parses or not.
        for url in [
            "postgresql://u@db:54x2/new?password=hunter2",
            "postgresql://u@db:5432/new?password=hunter2",
        ] {
            let shown = crate::error::one_line(&parse_target_url(url).unwrap_err());
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    fn set(id: &str, dbs: &[(&str, &str)]) -> PgDumpSet {
        let t = |s: &str| format!("2026-11-23T{s}Z").parse().unwrap();
        let obj = ObjectRef {
            key: "k".into(),
            stored_bytes: 1,
            plain_bytes: 1,
            sha256: String::new(),
            key_set: None,
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
