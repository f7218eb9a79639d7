//! `dbagent backup --kind dump`: `pg_dump -Fc` of each database from a snapshot exported by a
//! REPEATABLE READ transaction that also counts every table's rows (`pg_dump --snapshot`), so
//! the manifest's exact row counts are those of the dump itself; the databases' own settings
//! from `pg_db_role_setting`; the roles from `pg_dumpall --globals-only`. The manifest goes last.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::Utc;
use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::{ConnInfo, ServerFacts};
use crate::pg::sql;
use crate::pipeline::PipeOptions;
use crate::proc::{Program, Stdout};
use crate::repo::FORMAT_VERSION;
use crate::repo::dump::{self as keys, DbSetting, DumpedDatabase, PgDumpSet, TableCount};
use crate::repo::manifest::ObjectRef;
use crate::restore::human;
use crate::storage::Store;

/// What `dbagent backup --kind dump` did.
#[derive(Debug, Serialize)]
pub struct DumpReport {
    pub id: String,
    pub system_identifier: String,
    pub seconds: f64,
    pub databases: Vec<String>,
    pub tables: usize,
    pub rows: i64,
    pub settings: usize,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
}

impl std::fmt::Display for DumpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dump {} of cluster {} complete in {:.1}s: {} databases ({}), {} tables, {} rows, {} database settings, globals; {} read, {} stored",
            self.id,
            self.system_identifier,
            self.seconds,
            self.databases.len(),
            self.databases.join(", "),
            self.tables,
            self.rows,
            self.settings,
            human(self.plain_bytes),
            human(self.stored_bytes)
        )
    }
}

/// `dbagent backup --engine postgres --kind dump`.
pub async fn backup_dumps(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<DumpReport> {
    let started = Instant::now();
    let conn = ConnInfo::from_config(&cfg.pg);
    let client = conn.connect().await?;
    let server = ServerFacts::read(&client).await?;
    let sysid = server.system_identifier;
    let databases = list_databases(&client, server.version_num).await?;
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
    // A prune may have taken the first objects of a set that ran past
    // retention.incomplete_after (no manifest yet): a manifest must not name missing data.
    if let Some(key) =
        crate::storage::first_missing(store.as_ref(), written_keys.iter().map(String::as_str))
            .await?
    {
        let key = key.to_string();
        for key in &written_keys {
            let _ = store.delete(key).await;
        }
        anyhow::bail!(
            "{key} is gone from the repository although this dump stored it: a prune ran while the dump had been running longer than retention.incomplete_after; raise it above your longest dump. Nothing of this dump is kept"
        );
    }
    let manifest = PgDumpSet {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        system_identifier: sysid.to_string(),
        server_version: server.version,
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
    Ok(DumpReport {
        id,
        system_identifier: sysid.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        databases: manifest.databases.iter().map(|d| d.name.clone()).collect(),
        tables: manifest.databases.iter().map(|d| d.tables.len()).sum(),
        rows: manifest
            .databases
            .iter()
            .flat_map(|d| &d.tables)
            .map(|t| t.rows)
            .sum(),
        settings: manifest.databases.iter().map(|d| d.settings.len()).sum(),
        plain_bytes: manifest.plain_bytes(),
        stored_bytes: manifest.stored_bytes(),
    })
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
