//! `dbagent backup`: a PostgreSQL base backup over the network, streamed into the store.
//!
//! `pg_basebackup -D - -Ft -X none` produces the server's BASE_BACKUP stream as one tar on
//! stdout; it is compressed and uploaded while it is read. The WAL needed for consistency
//! comes from the archive, so the backup is recorded (manifest last) only once every segment
//! from its start to its stop LSN is in the store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::{ConnInfo, ServerFacts};
use crate::pg::sql;
use crate::pg::tarscan::TarScanner;
use crate::pipeline::PipeOptions;
use crate::proc::{Program, Stdout};
use crate::repo::manifest::{BaseBackup, DatabaseInfo, TableRows};
use crate::repo::wal::Segment;
use crate::repo::{self, FORMAT_VERSION};
use crate::restore::human;
use crate::storage::Store;

/// Tables per database whose row estimates the manifest records (bounds its size).
const MAX_TABLES_PER_DB: i64 = 5000;

/// pg_basebackup's line that says the server now waits for the backup's WAL to be archived.
fn waits_for_archiving(line: &str) -> bool {
    line.contains("waiting for required WAL segments to be archived")
}

/// The server a backup reads, and its databases.
struct Source {
    server: ServerFacts,
    databases: Vec<DatabaseInfo>,
}

async fn source(conn: &ConnInfo) -> anyhow::Result<Source> {
    let client = conn.connect().await?;
    let server = ServerFacts::read(&client).await?;
    let archive_mode = &server.archive_mode;
    if archive_mode == "off" || (server.in_recovery && archive_mode != "always") {
        return Err(input_err!(
            "WAL archiving is off on {} (archive_mode = {archive_mode}): set archive_mode = on and archive_command = 'dbagent wal-push %p', or the backup could never be restored",
            conn.describe()
        ));
    }
    let archiver = client
        .query_one(sql::ARCHIVER, &[])
        .await
        .context("reading pg_stat_archiver")?;
    let failing: Option<bool> = archiver.get(2);
    if failing == Some(true) {
        let wal: Option<String> = archiver.get(1);
        return Err(input_err!(
            "WAL archiving is failing on {} (last failure on {}, {} failures): fix archive_command first, see `dbagent wal-push` errors in the PostgreSQL log",
            conn.describe(),
            wal.unwrap_or_default(),
            archiver.get::<_, i64>(0)
        ));
    }
    let mut databases = Vec::new();
    for db in client
        .query(sql::DATABASE_SIZES, &[])
        .await
        .context("listing databases")?
    {
        let name: String = db.get(0);
        let (tables, extensions) = match conn.with_db(&name).connect().await {
            Ok(c) => {
                let tables = c
                    .query(sql::ROW_ESTIMATES, &[&MAX_TABLES_PER_DB])
                    .await
                    .with_context(|| format!("row estimates in {name}"))?
                    .into_iter()
                    .map(|r| TableRows {
                        table: r.get(0),
                        rows_estimate: r.get(1),
                    })
                    .collect();
                let extensions = c
                    .query(
                        "SELECT extname || ' ' || extversion FROM pg_extension ORDER BY 1",
                        &[],
                    )
                    .await
                    .with_context(|| format!("extensions in {name}"))?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                (tables, extensions)
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %format!("{e:#}"), "no row estimates");
                (vec![], vec![])
            }
        };
        let settings = database_settings(&client, &name).await?;
        databases.push(DatabaseInfo {
            name,
            size_bytes: db.get(1),
            tables,
            settings,
            extensions,
        });
    }
    Ok(Source { server, databases })
}

/// A database's own settings (`ALTER DATABASE … SET`, for every role), as `name=value`.
pub async fn database_settings(
    client: &tokio_postgres::Client,
    db: &str,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(sql::DATABASE_SETTINGS, &[&db])
        .await
        .with_context(|| format!("reading the settings of database {db}"))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// What `dbagent backup` did.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub id: String,
    pub system_identifier: String,
    pub seconds: f64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub timeline: u32,
    pub start_wal: String,
    pub stop_wal: String,
    /// The earliest time it restores to.
    pub consistent_at: DateTime<Utc>,
}

impl std::fmt::Display for BackupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {} complete in {:.1}s: {} read, {} stored, WAL {}..{}, consistent at {}",
            self.id,
            self.seconds,
            human(self.plain_bytes),
            human(self.stored_bytes),
            self.start_wal,
            self.stop_wal,
            crate::timespec::show(self.consistent_at)
        )
    }
}

pub async fn base_backup(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<BackupReport> {
    let started = Instant::now();
    let conn = ConnInfo::from_config(&cfg.pg);
    let facts = source(&conn).await?;
    let sysid = facts.server.system_identifier;
    // Fail on a wrong bucket or credentials before reading the database.
    store.list(&repo::backups_prefix(sysid)).await?;

    let start_time = Utc::now();
    let id = crate::repo::new_id(start_time);
    let data_key = repo::backup_data_key(sysid, &id);
    if store
        .head(&repo::backup_manifest_key(sysid, &id))
        .await?
        .is_some()
    {
        anyhow::bail!("a backup named {id} already exists; try again in a second");
    }

    let program = Program::new(crate::pg::bins::program(&cfg.pg, "pg_basebackup")?)
        .args([
            "-D",
            "-",
            "-F",
            "tar",
            "-X",
            "none",
            "-c",
            "fast",
            "-v",
            "--no-password",
        ])
        .arg("-l")
        .arg(format!("dbagent {id}"))
        .envs(conn.child_env());
    let waiting_since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let seen = waiting_since.clone();
    // An archive that never catches up: fail with the reason instead of hanging.
    let archive_wait = cfg.wal.archive_wait;
    let stuck = async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let since = *waiting_since.lock().unwrap_or_else(|e| e.into_inner());
            if since.is_some_and(|s| s.elapsed() > archive_wait) {
                return anyhow::anyhow!(
                    "WAL archiving is stuck: the server waited more than {} for the backup's WAL to be archived; check archive_command and `dbagent wal-push` errors in the PostgreSQL log",
                    humantime::format_duration(archive_wait)
                );
            }
        }
    };
    tracing::info!(%id, server = %conn.describe(), "base backup started");
    let (data, scanner) = program
        .run()
        .on_stderr_line(move |line| {
            if waits_for_archiving(line) {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
        })
        .stop_when(stuck)
        .to_store(
            store.as_ref(),
            &data_key,
            PipeOptions::from_config(cfg),
            Stdout::watched(TarScanner::default()),
        )
        .await?;
    let tar = scanner.facts();
    let (Some((start_lsn, tli)), Some(stop_lsn)) = (tar.start(), tar.stop()) else {
        let _ = store.delete(&data_key).await;
        anyhow::bail!(
            "the base backup stream had no backup_label or backup_manifest WAL range: is the server PostgreSQL 13 or newer?"
        );
    };

    let seg_size = facts.server.wal_segment_size;
    let first = Segment::of_lsn(tli, start_lsn, seg_size);
    let last = Segment::of_lsn(tli, stop_lsn, seg_size);
    wait_for_wal(cfg, store.as_ref(), sysid, first, last, seg_size).await?;

    let manifest = BaseBackup {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        system_identifier: sysid,
        timeline: tli,
        start_lsn,
        stop_lsn,
        start_wal: first.name(seg_size),
        stop_wal: last.name(seg_size),
        start_time,
        stop_time: Utc::now(),
        server_version: facts.server.version,
        server_version_num: facts.server.version_num,
        wal_segment_size: seg_size,
        data,
        databases: facts.databases,
        dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    repo::write_manifest(
        store.as_ref(),
        &repo::backup_manifest_key(sysid, &id),
        &manifest,
        "the backup manifest",
    )
    .await?;
    tracing::info!(%id, "base backup complete");
    Ok(BackupReport {
        id,
        system_identifier: sysid.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        plain_bytes: manifest.data.plain_bytes,
        stored_bytes: manifest.data.stored_bytes,
        timeline: manifest.timeline,
        start_wal: manifest.start_wal,
        stop_wal: manifest.stop_wal,
        consistent_at: manifest.stop_time,
    })
}

/// Waits until every segment from `first` to `last` is in the store.
async fn wait_for_wal(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    first: Segment,
    last: Segment,
    seg_size: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + cfg.wal.archive_wait;
    for segno in first.segno..=last.segno {
        let name = Segment {
            tli: first.tli,
            segno,
        }
        .name(seg_size);
        let key = repo::wal_key(sysid, &name);
        loop {
            if store.head(&key).await?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "WAL segment {name} that the backup needs was not archived within {}: check archive_command and `dbagent wal-push` errors in the PostgreSQL log",
                    humantime::format_duration(cfg.wal.archive_wait)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_the_wait_for_archiving() {
        assert!(!waits_for_archiving(
            "pg_basebackup: initiating base backup, waiting for checkpoint to complete"
        ));
        assert!(waits_for_archiving(
            "NOTICE:  base backup done, waiting for required WAL segments to be archived"
        ));
    }
}
