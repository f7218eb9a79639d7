//! Loading a dump into a server and replaying binlogs after it, to a point in time.
//!
//! Replay is one `mysqlbinlog --start-position=P [--stop-datetime=T] file1 file2 … | mysql`
//! pipeline, as the MySQL manual prescribes: one invocation over all files keeps temporary
//! tables and open transactions that span a rotation intact. `mysqlbinlog` reads
//! `--stop-datetime` in its own time zone, so it runs with `TZ=UTC` and gets the target in UTC.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};

use super::client::Programs;
use super::conn::MysqlConn;
use super::plan::MysqlPlan;
use crate::proc::Program;
use crate::repo::manifest::ObjectRef;
use crate::repo::mysql::{Flavor, MysqlCatalog};
use crate::storage::Store;

/// Binlog files downloaded at once.
const DOWNLOADS_IN_FLIGHT: usize = 4;

/// A directory for downloaded binlogs, removed on drop.
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn temp() -> anyhow::Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!(
            "dbagent-binlogs-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    pub fn inside(dir: &Path) -> anyhow::Result<WorkDir> {
        let dir = dir.join("dbagent-binlogs");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Downloads the plan's binlogs into `work` and replays them through one client connection.
pub async fn replay_binlogs(
    store: &dyn Store,
    cat: &MysqlCatalog,
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
    work: &Path,
) -> anyhow::Result<()> {
    let files = fetch_binlogs(store, cat, plan, work).await?;
    replay_files(plan, programs, conn, &files).await
}

/// Downloads the plan's binlogs into `work`, each verified: before a dump is loaded, a
/// binlog that cannot be read (damaged, a key missing, `work` too small) fails the restore
/// while the target is still untouched, not hours into it.
pub async fn fetch_binlogs(
    store: &dyn Store,
    cat: &MysqlCatalog,
    plan: &MysqlPlan,
    work: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    if plan.binlogs.is_empty() {
        return Ok(Vec::new());
    }
    tracing::info!(files = plan.binlogs.len(), "downloading binlogs");
    let files = download_binlogs(store, cat, plan, work).await?;
    trim_unfinished(plan.dump.flavor, &files).await?;
    Ok(files)
}

/// Replays binlogs fetched with `fetch_binlogs` through one client connection.
pub async fn replay_files(
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    tracing::info!(
        from = %plan.dump.binlog,
        stop = ?plan.stop_datetime,
        "replaying binlogs"
    );
    replay(plan, programs, conn, files).await
}

/// Cuts off the transaction a crash left unfinished at the end of a binlog (its events, or a
/// torn event, after the last whole transaction, no Rotate or Stop event). It never committed:
/// the server rolled it back at its restart and gave its GTID to the next transaction, which
/// the reader's GTID strict mode refuses as out of order while the cut-off events precede it.
/// Cut off, the history reads in order, and strict mode still catches two histories mixed
/// (a server rebuilt from a copy of itself whose binlogs carry the same names).
async fn trim_unfinished(flavor: Flavor, files: &[PathBuf]) -> anyhow::Result<()> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || {
        for path in &files {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
            let tail = match super::stream::unfinished_tail(&name, flavor, &mut reader) {
                Ok(tail) => tail,
                Err(e) => {
                    // Replayed as it is: the reader says what it makes of it.
                    tracing::warn!(binlog = %name, error = %crate::error::one_line(&e), "could not read the binlog's transactions to look for one a crash cut off");
                    continue;
                }
            };
            drop(reader);
            if let Some((keep, len)) = tail {
                tracing::warn!(
                    binlog = %name,
                    "binlog {name} ends in a transaction that never committed (bytes {keep}..{len}: the server stopped while writing it, and rolled it back at its restart): left out of the replay"
                );
                file.set_len(keep)
                    .with_context(|| format!("cutting {} at {keep}", path.display()))?;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("the binlog scan panicked")?
}

/// Streams the dump from the repository into the client, verifying its checksum.
pub async fn load_dump(
    store: &dyn Store,
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
) -> anyhow::Result<()> {
    tracing::info!(dump = %plan.dump.id, size = plan.dump.data.plain_bytes, "loading the dump");
    let options = conn.options_file()?;
    Program::new(&programs.client)
        .arg(options.arg())
        .args([
            "--binary-mode",
            "--default-character-set=utf8mb4",
            "--max-allowed-packet=1G",
        ])
        .run()
        .on_failure(|exit| {
            anyhow::anyhow!(
                "loading dump {} failed: {}",
                plan.dump.id,
                exit.telling_line()
            )
        })
        .from_store(store, &plan.dump.data, &format!("dump {}", plan.dump.id))
        .await
}

/// Downloads the plan's binlogs into `work`, verified against the trailer and the catalog.
async fn download_binlogs(
    store: &dyn Store,
    cat: &MysqlCatalog,
    plan: &MysqlPlan,
    work: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    // A file is one archived object, or the streamed parts of one not archived complete yet,
    // written one after the other into the same file.
    let jobs: Vec<(&String, Vec<&ObjectRef>, PathBuf)> = plan
        .binlogs
        .iter()
        .map(|name| {
            let objects = match cat.binlogs.values().find(|m| &m.name == name) {
                Some(meta) => vec![&meta.data],
                None => cat
                    .streamed_file(name)
                    .expect("planned binlogs are in the catalog")
                    .parts
                    .iter()
                    .map(|p| &p.data)
                    .collect(),
            };
            (name, objects, work.join(name))
        })
        .collect();
    let paths: Vec<PathBuf> = jobs.iter().map(|j| j.2.clone()).collect();
    futures::stream::iter(jobs)
        .map(|(name, objects, path)| async move {
            let mut file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            for data in objects {
                let (writer, trailer) = crate::pipeline::download(
                    store,
                    &data.key,
                    std::io::BufWriter::with_capacity(1 << 20, file),
                )
                .await
                .with_context(|| format!("downloading binlog {name}"))?;
                data.verify(&trailer, &format!("binlog {name}"))?;
                file = writer
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok::<(), anyhow::Error>(())
        })
        .buffered(DOWNLOADS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(paths)
}

/// One binlog reader over all files, piped into one client connection.
async fn replay(
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
    files: &[PathBuf],
) -> anyhow::Result<()> {
    let mut reader = Program::new(&programs.binlog).env("TZ", "UTC");
    if programs.flavor == Flavor::Mysql {
        // The restored server is a new server: its GTID history starts from the dump's
        // GTID_PURGED, and replayed transactions get its own GTIDs.
        reader = reader.arg("--skip-gtids");
    } else if !programs.gtid_strict {
        // `loose-`: readers before 10.8, without strict mode, take it as said.
        reader = reader.arg("--loose-skip-gtid-strict-mode");
    }
    reader = reader.arg(format!("--start-position={}", plan.start_position));
    if let Some(stop) = plan.stop_datetime {
        reader = reader.arg(format!(
            "--stop-datetime={}",
            stop.format("%Y-%m-%d %H:%M:%S")
        ));
    }
    let reader = reader.args(files);
    let options = conn.options_file()?;
    let applier = Program::new(&programs.client)
        .arg(options.arg())
        .args(["--binary-mode", "--max-allowed-packet=1G"]);
    reader
        .run()
        .pipe_into(applier.run().on_failure(|exit| {
            anyhow::anyhow!("replaying binlogs failed: {}", exit.telling_line())
        }))
        .await
        .map_err(|e| {
            let line = crate::error::one_line(&e);
            if line.contains("out of order GTID") {
                e.context("the archived binlogs hold transactions out of GTID order: two histories under one server's name (binlogs reset, or a server rebuilt from a copy of itself under the same name), or a server that wrote them so with gtid_strict_mode off. Restore --at a time before it, or, when the order is the server's own, set mysql.replay_gtid_strict = false (DBAGENT_MYSQL_REPLAY_GTID_STRICT) and restore again")
            } else {
                e
            }
        })
}
