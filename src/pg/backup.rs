//! `dbagent backup`: a PostgreSQL base backup over the network, streamed into the store.
//!
//! `pg_basebackup -D - -Ft -X none` produces the server's BASE_BACKUP stream as one tar on
//! stdout; it is compressed and uploaded while it is read. The WAL needed for consistency
//! comes from the archive, so the backup is recorded (manifest last) only once every segment
//! from its start to its stop LSN is in the store.

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::ConnInfo;
use crate::pipeline;
use crate::repo::manifest::{BaseBackup, DatabaseInfo, ObjectRef, TableRows};
use crate::repo::wal::Segment;
use crate::repo::{self, FORMAT_VERSION};
use crate::storage::Store;

/// Tables per database whose row estimates the manifest records (bounds its size).
const MAX_TABLES_PER_DB: i64 = 5000;

/// What pg_basebackup reported on stderr.
#[derive(Debug, Default)]
struct Progress {
    waiting_for_archive_since: Option<Instant>,
    last_lines: Vec<String>,
}

impl Progress {
    fn observe(&mut self, line: &str) {
        if line.contains("waiting for required WAL segments to be archived")
            && self.waiting_for_archive_since.is_none()
        {
            self.waiting_for_archive_since = Some(Instant::now());
        }
        self.last_lines.push(line.to_string());
        if self.last_lines.len() > 20 {
            self.last_lines.remove(0);
        }
    }
}

struct ServerFacts {
    sysid: u64,
    version: String,
    version_num: i32,
    seg_size: u64,
    databases: Vec<DatabaseInfo>,
}

async fn server_facts(conn: &ConnInfo) -> anyhow::Result<ServerFacts> {
    let client = conn.connect().await?;
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                    current_setting('server_version'),
                    current_setting('server_version_num')::int,
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
                    current_setting('archive_mode'),
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .context("reading server settings")?;
    let sysid: u64 = row
        .get::<_, String>(0)
        .parse()
        .context("system identifier")?;
    let archive_mode: String = row.get(4);
    let in_recovery: bool = row.get(5);
    if archive_mode == "off" || (in_recovery && archive_mode != "always") {
        return Err(input_err!(
            "WAL archiving is off on {} (archive_mode = {archive_mode}): set archive_mode = on and archive_command = 'dbagent wal-push %p', or the backup could never be restored",
            conn.describe()
        ));
    }
    let archiver = client
        .query_one(
            "SELECT failed_count, last_failed_wal, last_failed_time > coalesce(last_archived_time, '-infinity')
               FROM pg_stat_archiver",
            &[],
        )
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
        .query(
            "SELECT datname::text, pg_database_size(oid) FROM pg_database
              WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await
        .context("listing databases")?
    {
        let name: String = db.get(0);
        let (tables, extensions) = match conn.with_db(&name).connect().await {
            Ok(c) => {
                let tables = c
                    .query(
                        "SELECT format('%I.%I', n.nspname, c.relname), c.reltuples::bigint
                           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE c.relkind IN ('r', 'p')
                            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                            AND n.nspname NOT LIKE 'pg_toast%'
                          ORDER BY 1 LIMIT $1",
                        &[&MAX_TABLES_PER_DB],
                    )
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
    Ok(ServerFacts {
        sysid,
        version: row.get(1),
        version_num: row.get(2),
        seg_size: row.get::<_, i64>(3) as u64,
        databases,
    })
}

/// A database's own settings (`ALTER DATABASE … SET`, for every role), as `name=value`.
pub async fn database_settings(
    client: &tokio_postgres::Client,
    db: &str,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
              WHERE d.datname = $1 AND s.setrole = 0 ORDER BY 1",
            &[&db],
        )
        .await
        .with_context(|| format!("reading the settings of database {db}"))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

pub async fn base_backup(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<BaseBackup> {
    let conn = ConnInfo::from_config(&cfg.pg);
    let facts = server_facts(&conn).await?;
    // Fail on a wrong bucket or credentials before reading the database.
    store.list(&repo::backups_prefix(facts.sysid)).await?;

    let start_time = Utc::now();
    let id = crate::repo::new_id(start_time);
    let data_key = repo::backup_data_key(facts.sysid, &id);
    if store
        .head(&repo::backup_manifest_key(facts.sysid, &id))
        .await?
        .is_some()
    {
        anyhow::bail!("a backup named {id} already exists; try again in a second");
    }

    let program = crate::pg::bins::program(&cfg.pg, "pg_basebackup")?;
    let mut child = std::process::Command::new(&program)
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
        .envs(conn.child_env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    crate::pipeline::widen_pipe(&stdout);
    let (stdout, tar_facts) = crate::pg::tarscan::TarScan::new(stdout);
    let stderr = child.stderr.take().expect("piped");
    let progress = Arc::new(Mutex::new(Progress::default()));
    let reader_progress = progress.clone();
    let stderr_thread = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            tracing::debug!(target: "pg_basebackup", "{line}");
            reader_progress.lock().unwrap().observe(&line);
        }
    });

    tracing::info!(%id, server = %conn.describe(), "base backup started");
    let upload = pipeline::upload(
        store.as_ref(),
        &data_key,
        stdout,
        crate::pipeline::PipeOptions::from_config(cfg),
    );
    tokio::pin!(upload);
    // Watch for an archive that never catches up: fail with the reason instead of hanging.
    let stuck = loop {
        tokio::select! {
            res = &mut upload => break Ok(res),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                let since = progress.lock().unwrap().waiting_for_archive_since;
                if since.is_some_and(|s| s.elapsed() > cfg.wal.archive_wait) {
                    // SAFETY: signalling our own child.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    break Err(());
                }
            }
        }
    };
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let _ = stderr_thread.join();
    let progress = std::mem::take(&mut *progress.lock().unwrap());

    if stuck.is_err() {
        let _ = store.delete(&data_key).await;
        anyhow::bail!(
            "WAL archiving is stuck: the server waited more than {} for the backup's WAL to be archived; check archive_command and `dbagent wal-push` errors in the PostgreSQL log",
            humantime::format_duration(cfg.wal.archive_wait)
        );
    }
    let written = match (stuck.unwrap(), status.success()) {
        (Ok(w), true) => w,
        (res, _) => {
            let _ = store.delete(&data_key).await;
            let tail = progress.last_lines.last().cloned().unwrap_or_default();
            return Err(match res {
                Err(e) if status.success() => e,
                _ => anyhow::anyhow!("pg_basebackup failed ({status}): {tail}"),
            });
        }
    };
    let facts_seen = tar_facts.lock().unwrap().clone();
    let (Some((start_lsn, tli)), Some(stop_lsn)) = (facts_seen.start(), facts_seen.stop()) else {
        let _ = store.delete(&data_key).await;
        anyhow::bail!(
            "the base backup stream had no backup_label or backup_manifest WAL range: is the server PostgreSQL 13 or newer?"
        );
    };

    let seg_size = facts.seg_size;
    let first = Segment::of_lsn(tli, start_lsn, seg_size);
    let last = Segment::of_lsn(tli, stop_lsn, seg_size);
    wait_for_wal(cfg, store.as_ref(), facts.sysid, first, last, seg_size).await?;

    let manifest = BaseBackup {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        system_identifier: facts.sysid,
        timeline: tli,
        start_lsn,
        stop_lsn,
        start_wal: first.name(seg_size),
        stop_wal: last.name(seg_size),
        start_time,
        stop_time: Utc::now(),
        server_version: facts.version,
        server_version_num: facts.version_num,
        wal_segment_size: seg_size,
        data: ObjectRef {
            key: data_key.clone(),
            stored_bytes: written.stored_size,
            plain_bytes: written.trailer.plain_size,
            sha256: written.trailer.sha256_hex(),
        },
        databases: facts.databases,
        dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let json = serde_json::to_vec_pretty(&manifest)?;
    let key = repo::backup_manifest_key(facts.sysid, &id);
    crate::storage::put_once(store.as_ref(), &key, json.into())
        .await
        .context("writing the backup manifest")?;
    tracing::info!(%id, "base backup complete");
    Ok(manifest)
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
        let mut p = Progress::default();
        p.observe("pg_basebackup: initiating base backup, waiting for checkpoint to complete");
        assert!(p.waiting_for_archive_since.is_none());
        p.observe("NOTICE:  base backup done, waiting for required WAL segments to be archived");
        assert!(p.waiting_for_archive_since.is_some());
    }
}
