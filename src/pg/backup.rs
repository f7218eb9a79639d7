//! `dbagent backup`: a PostgreSQL base backup over the network, streamed into the store.
//!
//! The server's `BASE_BACKUP` stream is read as one tar (`pg::basebackup`: the tar that
//! `pg_basebackup -D - -Ft -X none` wrote), compressed and uploaded while it is read. The WAL
//! needed for consistency comes from the archive, so the backup is recorded (manifest last)
//! only once every segment from its start to its stop LSN is in the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::{ConnInfo, ServerFacts};
use crate::pg::sql;
use crate::pipeline::PipeOptions;
use crate::repo::manifest::{BaseBackup, DatabaseInfo, FilesInfo, ObjectRef, TableRows};
use crate::repo::wal::Lsn;
use crate::repo::wal::Segment;
use crate::repo::{self, FORMAT_VERSION};
use crate::restore::human;
use crate::storage::{ObjectInfo, Store};

/// Tables per database whose row estimates the manifest records (bounds its size).
const MAX_TABLES_PER_DB: i64 = 5000;

/// Whether the archive keeps up with a running backup, judged from `pg_stat_archiver` and WAL
/// positions (pure). The server's own words ("waiting for required WAL segments to be
/// archived") depend on `lc_messages`, so they are never read.
///
/// Every segment before the one being written is complete and due for archiving; the backup
/// needs those from the one it started in. While one of them is not archived, the archiver
/// must make progress (`last_archived_wal` changes) at least once per `limit`.
#[derive(Debug)]
struct ArchiveWatch {
    /// The segment the backup started in: earlier ones are not its business.
    first_needed: u64,
    seg_size: u64,
    limit: Duration,
    last_archived: String,
    /// Since when a needed segment has waited without the archiver moving.
    behind_since: Option<Instant>,
}

/// One reading of `sql::ARCHIVE_PROGRESS`.
#[derive(Debug, Clone, PartialEq)]
struct ArchiveProgress {
    last_archived: String,
    last_failed: String,
    failed_count: i64,
    /// Where WAL is written (replayed, on a standby) now.
    lsn: u64,
}

impl ArchiveWatch {
    fn new(start_lsn: u64, seg_size: u64, limit: Duration) -> ArchiveWatch {
        ArchiveWatch {
            first_needed: start_lsn / seg_size,
            seg_size,
            limit,
            last_archived: String::new(),
            behind_since: None,
        }
    }

    /// Takes a reading at `now`; the complaint once the archive has been stuck too long.
    fn observe(&mut self, now: Instant, p: &ArchiveProgress) -> Option<String> {
        let segno = |name: &str| {
            name.get(..24)
                .and_then(|n| Segment::parse(n, self.seg_size))
                .map(|s| s.segno)
        };
        let moved = p.last_archived != self.last_archived;
        self.last_archived = p.last_archived.clone();
        let due = (p.lsn / self.seg_size).checked_sub(1);
        let behind = due.is_some_and(|due| {
            due >= self.first_needed && segno(&p.last_archived).is_none_or(|a| a < due)
        });
        if !behind || moved {
            self.behind_since = behind.then_some(now);
            return None;
        }
        let since = *self.behind_since.get_or_insert(now);
        if now.duration_since(since) <= self.limit {
            return None;
        }
        let waiting = match segno(&p.last_archived) {
            Some(a) if a + 1 >= self.first_needed => a + 1,
            _ => self.first_needed,
        };
        let name = |n: u64| {
            p.last_failed
                .get(..8)
                .or(p.last_archived.get(..8))
                .and_then(|tli| u32::from_str_radix(tli, 16).ok())
                .map_or(format!("segment number {n}"), |tli| {
                    Segment { tli, segno: n }.name(self.seg_size)
                })
        };
        let failures = match p.last_failed.as_str() {
            "" => format!("{} failed attempts", p.failed_count),
            last => format!("{} failed attempts, the last on {last}", p.failed_count),
        };
        Some(format!(
            "WAL archiving is stuck: {} that the backup needs has not been archived and the archiver made no progress for {} (last archived: {}; {failures}); check archive_command and `dbagent wal-push` errors in the PostgreSQL log",
            name(waiting),
            humantime::format_duration(self.limit),
            if p.last_archived.is_empty() {
                "none"
            } else {
                &p.last_archived
            },
        ))
    }
}

/// Reads the archiver's progress on `client`.
async fn archive_progress(client: &tokio_postgres::Client) -> anyhow::Result<ArchiveProgress> {
    let row = client
        .query_typed_one(sql::ARCHIVE_PROGRESS, &[])
        .await
        .context("reading pg_stat_archiver")?;
    Ok(ArchiveProgress {
        last_archived: row.get(0),
        last_failed: row.get(1),
        failed_count: row.get(2),
        lsn: row.get::<_, i64>(3) as u64,
    })
}

/// Resolves with the reason once the archive stops keeping up with the backup (see
/// `ArchiveWatch`). A reading that fails is skipped: a server gone away fails the backup
/// through its replication connection.
async fn archive_stuck(
    client: Arc<tokio_postgres::Client>,
    mut watch: ArchiveWatch,
) -> anyhow::Error {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match archive_progress(&client).await {
            Ok(p) => {
                if let Some(why) = watch.observe(Instant::now(), &p) {
                    return anyhow::anyhow!(why);
                }
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "no archiver reading"),
        }
    }
}

/// The server a backup reads, on the connection that takes the backup.
struct Source {
    server: ServerFacts,
    /// Shared with the archive watcher and the database list, whose queries queue behind
    /// the backup's own (`pg_backup_start` and `pg_backup_stop` must run on one session).
    client: Arc<tokio_postgres::Client>,
}

/// Databases whose facts are read at the same time, each over a connection of its own.
const DATABASES_AT_ONCE: usize = 4;

/// Connects and checks that the server archives its WAL: a backup without its WAL could
/// never be restored.
async fn source(conn: &ConnInfo) -> anyhow::Result<Source> {
    let client = conn.connect().await?;
    // Both questions in one round trip (tokio-postgres pipelines queries sent together).
    let (server, archiver) = tokio::join!(
        ServerFacts::read(&client),
        client.query_typed_one(sql::ARCHIVER, &[])
    );
    let server = server?;
    let archive_mode = &server.archive_mode;
    if archive_mode == "off" || (server.in_recovery && archive_mode != "always") {
        return Err(input_err!(
            "WAL archiving is off on {} (archive_mode = {archive_mode}): set archive_mode = on and archive_command = 'dbagent wal-push %p', or the backup could never be restored",
            conn.describe()
        ));
    }
    let archiver = archiver.context("reading pg_stat_archiver")?;
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
    Ok(Source {
        server,
        client: Arc::new(client),
    })
}

/// How long the description of the other databases waits for the server to end a backup.
const OTHERS_AFTER: Duration = Duration::from_millis(250);

/// The databases the manifest describes (sizes, settings, row estimates and extensions for the
/// drill), read while the backup runs: none of it decides what is copied, and a connection
/// per database is a round of connecting and authenticating that a nightly incremental need
/// not wait for. `own_when` is told once the backup's queries up to `pg_backup_start` are
/// sent, `others_when` when the server is asked to end the backup.
fn database_facts(
    conn: &ConnInfo,
    client: &Arc<tokio_postgres::Client>,
    own_when: Arc<tokio::sync::Notify>,
    others_when: Arc<tokio::sync::Notify>,
) -> AbortOnDrop<anyhow::Result<Vec<DatabaseInfo>>> {
    let (conn, client) = (conn.clone(), client.clone());
    AbortOnDrop(tokio::spawn(async move {
        // The session's own database is described on the session: a backend started for it
        // would take a few milliseconds of CPU from the backup on a small machine. Its queries
        // are sent when `own_when` is told: a file-level backup tells it once its own
        // queries up to `pg_backup_start` are sent, so that the session runs these after the
        // start instead of before it (an incremental after a 1% update at pgbench scale 70,
        // alternated: 2.4 ± 1.1 ms less of 93 in 40 rounds, 1.8 ± 1.6 in 30).
        own_when.notified().await;
        let (rows, mut own) = tokio::join!(
            client.query_typed(sql::DATABASES, &[]),
            read_facts(&client, &conn.dbname)
        );
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot list the databases: the manifest describes none of them, and a drill of this backup fails (it has nothing to compare)");
                return Ok(Vec::new());
            }
        };
        // The others on connections of their own (each size is a walk over the database's
        // files), a few at a time, not all at once, which on a cluster of many databases
        // would take more than max_connections leaves. A short file-level backup starts them
        // when the server ends it: `pg_backup_stop` waits for its WAL switch to reach the
        // disk with the CPU idle, where backends started beside `pg_backup_start` and the
        // reading took CPU from both (an incremental after a 1% update at pgbench scale 70:
        // 1.4 ms less of 70, 30 each alternated, and fewer slow ones). A long one starts
        // them after OTHERS_AFTER, so that many databases are described while it reads.
        if rows.iter().any(|db| db.get::<_, String>(0) != conn.dbname) {
            tokio::select! {
                _ = others_when.notified() => {}
                _ = tokio::time::sleep(OTHERS_AFTER) => {}
            }
        }
        let databases = futures::stream::iter(rows.into_iter().map(|db| {
            let name: String = db.get(0);
            let own = match &mut own {
                Ok(info) if name == conn.dbname => Some(std::mem::take(info)),
                _ => None,
            };
            let (conn, client) = (&conn, &client);
            async move {
                match own {
                    Some(info) => info,
                    None => describe(conn, client, name).await,
                }
            }
        }))
        .buffered(DATABASES_AT_ONCE)
        .collect()
        .await;
        Ok(databases)
    }))
}

/// One database for the manifest, on a connection of its own. Best effort, as the backup
/// does not depend on it: what cannot be read is left empty, with a warning.
async fn describe(conn: &ConnInfo, client: &tokio_postgres::Client, name: String) -> DatabaseInfo {
    let read = async {
        match conn.with_db(&name).connect().await {
            Ok(c) => read_facts(&c, &name).await,
            Err(e) => {
                tracing::warn!(database = %name, error = %format!("{e:#}"), "no row estimates");
                let mut info = DatabaseInfo {
                    name: name.clone(),
                    unread: true,
                    ..Default::default()
                };
                info.size_bytes = client
                    .query_typed_one(
                        "SELECT pg_database_size($1)",
                        &[(&name, tokio_postgres::types::Type::TEXT)],
                    )
                    .await
                    .context("its size")?
                    .get(0);
                info.settings = database_settings(client, &name).await?;
                Ok(info)
            }
        }
    };
    read.await.unwrap_or_else(|e| {
        tracing::warn!(database = %name, error = %format!("{e:#}"), "the manifest describes this database only in part: the drill checks less of it");
        DatabaseInfo {
            name,
            unread: true,
            ..Default::default()
        }
    })
}

/// What the manifest says of database `name`, read on a session connected to it: the four
/// queries sent together (one round trip, as tokio-postgres pipelines them), as unnamed
/// statements (no round trip to prepare each).
async fn read_facts(c: &tokio_postgres::Client, name: &str) -> anyhow::Result<DatabaseInfo> {
    use tokio_postgres::types::Type;
    let most = [(&MAX_TABLES_PER_DB as _, Type::INT8)];
    let (size, tables, extensions, settings) = tokio::join!(
        c.query_typed_one("SELECT pg_database_size(current_database())", &[]),
        c.query_typed(sql::ROW_ESTIMATES, &most),
        c.query_typed(
            "SELECT extname || ' ' || extversion FROM pg_extension ORDER BY 1",
            &[]
        ),
        database_settings(c, name),
    );
    Ok(DatabaseInfo {
        name: name.to_string(),
        size_bytes: size.context("its size")?.get(0),
        tables: tables
            .context("its row estimates")?
            .into_iter()
            .map(|r| TableRows {
                table: r.get(0),
                rows_estimate: r.get(1),
            })
            .collect(),
        extensions: extensions
            .context("its extensions")?
            .into_iter()
            .map(|r| r.get(0))
            .collect(),
        settings: settings?,
        unread: false,
    })
}

/// A database's own settings (`ALTER DATABASE … SET`, for every role), as `name=value`:
/// one round trip (an unnamed statement), so that it pipelines with others sent beside it.
pub async fn database_settings(
    client: &tokio_postgres::Client,
    db: &str,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query_typed(
            sql::DATABASE_SETTINGS,
            &[(&db, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .with_context(|| format!("reading the settings of database {db}"))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// What `dbagent backup` did.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    pub id: String,
    /// "full" or "incremental".
    pub kind: String,
    /// The backup an incremental builds on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
    /// How an incremental found its changes: "wal" or "compare" (see `FilesInfo`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes_from: Option<String>,
    /// Bytes of data files a file-level backup read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
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
            "{} backup {} complete in {:.1}s{}: {} read, {} stored, WAL {}..{}, consistent at {}",
            self.kind,
            self.id,
            self.seconds,
            self.based_on
                .as_ref()
                .map(|b| match (&self.changes_from, self.read_bytes) {
                    (Some(from), Some(read)) => format!(
                        " (on {b}; {} of changed files read, {})",
                        human(read),
                        match from.as_str() {
                            "wal" => "the blocks the WAL names",
                            _ => "every block compared",
                        }
                    ),
                    _ => format!(" (on {b})"),
                })
                .unwrap_or_default(),
            human(self.plain_bytes),
            human(self.stored_bytes),
            self.start_wal,
            self.stop_wal,
            crate::timespec::show(self.consistent_at)
        )
    }
}

/// Which kind of base backup the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    Full,
    Incremental,
    /// `backup.full_every` decides.
    Auto,
}

impl Wanted {
    pub fn from_flags(full: bool, incremental: bool) -> Wanted {
        match (full, incremental) {
            (true, _) => Wanted::Full,
            (_, true) => Wanted::Incremental,
            _ => Wanted::Auto,
        }
    }
}

/// How the cluster is read: its data directory, or a base backup over the network.
fn local_data_dir(cfg: &Config, sysid: u64) -> anyhow::Result<Option<std::path::PathBuf>> {
    let dir = cfg.pg.data_dir.clone();
    match (cfg.backup.method.as_str(), dir) {
        ("stream", _) => Ok(None),
        ("files", None) => Err(input_err!(
            "backup.method = files needs pg.data_dir (or PGDATA): the server's data directory, mounted where dbagent runs"
        )),
        (_, None) => Ok(None),
        (_, Some(dir)) => {
            crate::pg::filebackup::check_data_dir(&dir, sysid)?;
            Ok(Some(dir))
        }
    }
}

/// The timeline of the server's last checkpoint.
async fn checkpoint_timeline(client: &tokio_postgres::Client) -> anyhow::Result<u32> {
    Ok(client
        .query_typed_one("SELECT timeline_id::int4 FROM pg_control_checkpoint()", &[])
        .await
        .context("reading the server's timeline")?
        .get::<_, i32>(0) as u32)
}

/// The base an incremental on `timeline` builds on, with its block map: the newest file-level
/// backup of this cluster on `timeline` with the same major version (see `pick_base`); `None`
/// means take a full one.
async fn load_base(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    listed: &[ObjectInfo],
    timeline: u32,
    version_num: i32,
    wanted: Wanted,
) -> anyhow::Result<Option<crate::pg::filebackup::Base>> {
    if wanted == Wanted::Full || (wanted == Wanted::Auto && cfg.backup.full_every.is_none()) {
        return Ok(None);
    }
    // The newest backups only: the newest usable one, and for full_every the newest full.
    let needs_full = wanted == Wanted::Auto;
    let enough = |cat: &_| base_found(cat, timeline, version_num, needs_full);
    let cat = crate::repo::catalog::PgCatalog::load_newest(store, sysid, listed, enough).await?;
    let picked = pick_base(
        &cat,
        timeline,
        version_num,
        wanted,
        cfg.backup.full_every,
        Utc::now(),
    );
    let Some(manifest) = picked else {
        return Ok(None);
    };
    let index = crate::pg::filebackup::load_index(store, &manifest)
        .await
        .map_err(|e| {
            if crate::error::exit_code(&e) == crate::error::EXIT_INPUT {
                input_err!(
                    "an incremental backup reads the block map of backup {}: {e:#}",
                    manifest.id
                )
            } else {
                e
            }
        })?;
    Ok(Some(crate::pg::filebackup::Base { manifest, index }))
}

/// Whether the backups read so far (newest first) settle `pick_base`: a usable one, and with
/// `needs_full` (backup.full_every) a usable full too.
fn base_found(
    cat: &crate::repo::catalog::PgCatalog,
    timeline: u32,
    version_num: i32,
    needs_full: bool,
) -> bool {
    let mut usable = cat
        .backups
        .iter()
        .filter(|b| usable_base(cat, b, timeline, version_num));
    if needs_full {
        usable.any(|b| b.kind() == "full")
    } else {
        usable.next().is_some()
    }
}

/// Whether an incremental on `timeline` of a server of `version_num` can build on `b`.
fn usable_base(
    cat: &crate::repo::catalog::PgCatalog,
    b: &BaseBackup,
    timeline: u32,
    version_num: i32,
) -> bool {
    b.files.is_some()
        && b.timeline == timeline
        && b.server_version_num / 10000 == version_num / 10000
        && cat.chain_complete(b)
}

/// The backup an incremental builds on: the newest file-level backup of this timeline and
/// major version whose own chain is whole (one that builds on a deleted backup cannot be
/// restored, and neither could anything built on it); `None` for a full backup.
fn pick_base(
    cat: &crate::repo::catalog::PgCatalog,
    timeline: u32,
    version_num: i32,
    wanted: Wanted,
    full_every: Option<Duration>,
    now: chrono::DateTime<Utc>,
) -> Option<BaseBackup> {
    let usable = |b: &&BaseBackup| usable_base(cat, b, timeline, version_num);
    let Some(newest) = cat
        .backups
        .iter()
        .filter(usable)
        .max_by_key(|b| b.stop_time)
    else {
        tracing::warn!(
            "no file-level backup of this cluster on timeline {timeline} to build on: taking a full backup"
        );
        return None;
    };
    if wanted == Wanted::Auto {
        let every = full_every?;
        let last_full = cat
            .backups
            .iter()
            .filter(usable)
            .filter(|b| b.kind() == "full")
            .map(|b| b.start_time)
            .max();
        let due = last_full
            .is_none_or(|t| now.signed_duration_since(t).to_std().unwrap_or_default() >= every);
        if due {
            tracing::info!(
                "the newest full backup is older than backup.full_every: taking a full backup"
            );
            return None;
        }
    }
    Some(newest.clone())
}

pub async fn base_backup(
    cfg: &Config,
    store: Arc<dyn Store>,
    wanted: Wanted,
) -> anyhow::Result<BackupReport> {
    let started = Instant::now();
    let conn = ConnInfo::from_config(&cfg.pg);
    let facts = source(&conn).await?;
    let sysid = facts.server.system_identifier;
    tracing::debug!(
        ms = started.elapsed().as_millis() as u64,
        "server facts read"
    );
    let (started_sent, stopping) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let databases = database_facts(&conn, &facts.client, started_sent.clone(), stopping.clone());
    // Fail on a wrong bucket or credentials before reading the database. The listing and the
    // check that the new backup's name is free go to the store together: one round trip
    // instead of two to an object store far away.
    let start_time = Utc::now();
    let id = crate::repo::new_id(start_time);
    let (prefix, manifest_key) = (
        repo::backups_prefix(sysid),
        repo::backup_manifest_key(sysid, &id),
    );
    let (listed, named) = tokio::join!(store.list(&prefix), store.head(&manifest_key));
    let (listed, named) = (listed?, named?);
    let local = local_data_dir(cfg, sysid)?;
    if local.is_none() && wanted == Wanted::Incremental {
        return Err(input_err!(
            "incremental backups read the data directory: set pg.data_dir to the server's data directory (mounted where dbagent runs), or take a full backup without --incremental"
        ));
    }
    if named.is_some() {
        anyhow::bail!("a backup named {id} already exists; try again in a second");
    }

    let seg_size = facts.server.wal_segment_size;
    let mut watch = None;
    // Whether the WAL the backup needs is archived, when the path that took it already waited.
    let mut waited = None;
    let (data, start_lsn, tli, stop_lsn, files) = match local {
        Some(dir) => {
            let version = facts.server.version_num;
            let load = |timeline| {
                load_base(
                    cfg,
                    store.as_ref(),
                    sysid,
                    &listed,
                    timeline,
                    version,
                    wanted,
                )
            };
            // The timeline and the archiver's progress are asked for in the same round trip as
            // pg_backup_start, just before it, and the timeline again just after it
            // (tokio-postgres sends queries in the order they are first polled, and the session
            // runs them in that order); the base and its block map are read while the server's
            // checkpoint runs.
            let before_start = async {
                let (timeline, before) = tokio::join!(
                    checkpoint_timeline(&facts.client),
                    archive_progress(&facts.client)
                );
                let (timeline, before) = (timeline?, before?);
                anyhow::Ok((timeline, before, load(timeline).await?))
            };
            let starting = futures::future::join3(
                before_start,
                crate::pg::filebackup::start(&facts.client, &id),
                checkpoint_timeline(&facts.client),
            );
            let mut starting = std::pin::pin!(starting);
            // The first poll sends the queries; the databases' queue behind them.
            let first = futures::poll!(&mut starting);
            started_sent.notify_one();
            let (read, begun, begun_on) = match first {
                std::task::Poll::Ready(done) => done,
                std::task::Poll::Pending => starting.await,
            };
            // A failed start ends with the session; the base's failure says more.
            let ((timeline, before, mut base), begun) = (read?, begun?);
            // An archive that never catches up: fail with the reason while waiting for WAL.
            // Watching from the reading before pg_backup_start: by the time the files are
            // stored it knows how long the archiver has been stuck.
            watch = Some(AbortOnDrop(tokio::spawn(archive_stuck(
                facts.client.clone(),
                ArchiveWatch::new(before.lsn, seg_size, cfg.wal.archive_wait),
            ))));
            // Where WAL was written before pg_backup_start: a segment closed after it was
            // closed during this backup.
            let began_at = Lsn(before.lsn);
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "backup started");
            // The timeline read before was the last checkpoint's: just after a promotion, the
            // old one until the first checkpoint on the new one ends. The one read after
            // pg_backup_start is that of its own checkpoint, the timeline the backup starts on;
            // a base chosen on the old one would take its changes from the old timeline's WAL.
            let begun_on = begun_on?;
            if begun_on != timeline {
                tracing::info!(
                    was = timeline,
                    now = begun_on,
                    "the server changed timelines (a promotion): choosing the base again"
                );
                base = load(begun_on).await?;
            }
            let based_on = base.as_ref().map(|b| b.manifest.id.clone());
            let taken = crate::pg::filebackup::take(crate::pg::filebackup::Request {
                store: store.clone(),
                client: &facts.client,
                dir: &dir,
                sysid,
                id: &id,
                started: begun,
                base,
                wal_segment_size: seg_size,
                relation_sizes: (facts.server.block_size, facts.server.rel_segment_blocks),
                changes_from_wal: cfg.backup.changed_blocks != "compare",
                parallel: cfg.backup.workers(),
                opts: PipeOptions::from_config(cfg),
                stopping: stopping.clone(),
            })
            .await?;
            // The index is stored while the WAL up to the stop point is made sure of.
            let first = Segment::of_lsn(taken.timeline, taken.start_lsn, seg_size);
            let last = Segment::of_lsn(taken.timeline, taken.stop_lsn, seg_size);
            let wal = secure_wal(
                cfg,
                store.as_ref(),
                sysid,
                &dir,
                facts.server.in_recovery,
                began_at,
                first,
                last,
                taken.stop_lsn,
                seg_size,
                &mut watch,
            );
            tokio::pin!(wal);
            let mut index = taken.index;
            let stored = |r: Result<anyhow::Result<ObjectRef>, tokio::task::JoinError>| {
                r.map_err(|e| anyhow::anyhow!("storing the file index failed: {e}"))?
            };
            let (data, wal_waited) = tokio::select! {
                r = &mut index => (stored(r)?, wal.await),
                w = &mut wal => (stored(index.await)?, w),
            };
            waited = Some(wal_waited);
            let s = taken.index_summary;
            let info = FilesInfo {
                kind: if based_on.is_some() {
                    "incremental"
                } else {
                    "full"
                }
                .into(),
                based_on,
                depends_on: s.depends_on,
                files: s.files,
                plain_bytes: s.plain_bytes,
                new_plain_bytes: s.new_plain_bytes,
                read_bytes: Some(s.read_bytes),
                changes_from: s.changes_from.map(str::to_string),
                bundles: s.bundles,
            };
            tracing::info!(%id, files = s.files, files_read = s.files_read, read_bytes = s.read_bytes, changes_from = s.changes_from, "files read");
            (
                data,
                taken.start_lsn,
                taken.timeline,
                taken.stop_lsn,
                Some(info),
            )
        }
        None => {
            started_sent.notify_one();
            stopping.notify_one();
            let data_key = repo::backup_data_key(sysid, &id);
            let (data, start_lsn, tli, stop_lsn) =
                stream_backup(cfg, store.as_ref(), &conn, &facts, &id, &data_key).await?;
            (data, start_lsn, tli, stop_lsn, None)
        }
    };

    tracing::debug!(ms = started.elapsed().as_millis() as u64, "data stored");
    let first = Segment::of_lsn(tli, start_lsn, seg_size);
    let last = Segment::of_lsn(tli, stop_lsn, seg_size);
    let waited = match waited {
        Some(w) => w,
        None => {
            wait_archived(
                cfg,
                store.as_ref(),
                sysid,
                first,
                last,
                seg_size,
                &mut watch,
            )
            .await
        }
    };
    let databases = match waited {
        Ok(()) => databases.join().await,
        Err(e) => Err(e),
    };
    // As late as can be before the manifest: its chain is still there.
    let databases = match (databases, &files) {
        (Ok(d), Some(f)) => chain_still_there(store.as_ref(), sysid, &f.depends_on)
            .await
            .map(|()| d),
        (d, _) => d,
    };
    let databases = match databases {
        Ok(d) => own_objects_still_there(store.as_ref(), &data, files.as_ref())
            .await
            .map(|()| d),
        e => e,
    };
    let databases = match databases {
        Ok(d) => d,
        Err(e) => {
            delete_objects(store.as_ref(), &data, files.as_ref()).await;
            return Err(e);
        }
    };
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "WAL archived");

    let manifest = BaseBackup {
        format_version: if files.is_some() {
            repo::FILES_FORMAT_VERSION
        } else {
            FORMAT_VERSION
        },
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
        databases,
        dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
        files,
    };
    repo::write_manifest(
        store.as_ref(),
        &repo::backup_manifest_key(sysid, &id),
        &manifest,
        "the backup manifest",
    )
    .await?;
    tracing::info!(%id, kind = manifest.kind(), "base backup complete");
    Ok(BackupReport {
        id,
        kind: manifest.kind().to_string(),
        based_on: manifest.files.as_ref().and_then(|f| f.based_on.clone()),
        changes_from: manifest.files.as_ref().and_then(|f| f.changes_from.clone()),
        read_bytes: manifest.files.as_ref().and_then(|f| f.read_bytes),
        system_identifier: sysid.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        plain_bytes: manifest.plain_bytes(),
        stored_bytes: manifest.stored_bytes(),
        timeline: manifest.timeline,
        start_wal: manifest.start_wal,
        stop_wal: manifest.stop_wal,
        consistent_at: manifest.stop_time,
    })
}

/// A task that stops when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<anyhow::Result<T>> {
    async fn join(mut self) -> anyhow::Result<T> {
        (&mut self.0)
            .await
            .map_err(|e| anyhow::anyhow!("a background task failed: {e}"))?
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks that every backup of an incremental's chain is still there: one deleted while the
/// incremental ran (by a `prune` whose `retention.incomplete_after` is shorter than this
/// backup took, or by hand) fails it, since its manifest would list a backup that cannot be
/// restored.
async fn chain_still_there(store: &dyn Store, sysid: u64, chain: &[String]) -> anyhow::Result<()> {
    let keys: Vec<String> = chain
        .iter()
        .map(|id| repo::backup_manifest_key(sysid, id))
        .collect();
    if let Some(key) = crate::storage::first_missing(store, keys.iter().map(String::as_str)).await?
    {
        let id = &chain[keys.iter().position(|k| k == key).expect("one of the keys")];
        anyhow::bail!(
            "backup {id}, which this incremental builds on, was deleted while it ran (by a prune whose retention.incomplete_after is shorter than this backup took?): nothing of this backup is kept; take it again"
        );
    }
    Ok(())
}

/// Every object this backup stored is still there: a prune may have taken them from a backup
/// that ran past `retention.incomplete_after` (no manifest yet), and a manifest must not name
/// missing data.
async fn own_objects_still_there(
    store: &dyn Store,
    data: &ObjectRef,
    files: Option<&FilesInfo>,
) -> anyhow::Result<()> {
    let bundles = files.map(|f| f.bundles.as_slice()).unwrap_or_default();
    let keys = std::iter::once(data.key.as_str()).chain(bundles.iter().map(|b| b.key.as_str()));
    if let Some(key) = crate::storage::first_missing(store, keys).await? {
        anyhow::bail!(
            "{key} is gone from the repository although this backup stored it: a prune ran while the backup had been running longer than retention.incomplete_after; raise it above your longest backup. Nothing of this backup is kept; take it again"
        );
    }
    Ok(())
}

/// Deletes what a backup that will not get its manifest wrote (best effort: `prune` removes
/// leftovers).
async fn delete_objects(store: &dyn Store, data: &ObjectRef, files: Option<&FilesInfo>) {
    let _ = store.delete(&data.key).await;
    for b in files.map(|f| f.bundles.as_slice()).unwrap_or_default() {
        let _ = store.delete(&b.key).await;
    }
}

/// A base backup over the network: the server's tar stream, compressed into one object.
async fn stream_backup(
    cfg: &Config,
    store: &dyn Store,
    conn: &ConnInfo,
    facts: &Source,
    id: &str,
    data_key: &str,
) -> anyhow::Result<(ObjectRef, Lsn, u32, Lsn)> {
    // An archive that never catches up: fail with the reason instead of hanging.
    let before = archive_progress(&facts.client).await?;
    let watch = ArchiveWatch::new(
        before.lsn,
        facts.server.wal_segment_size,
        cfg.wal.archive_wait,
    );
    tracing::info!(%id, server = %conn.describe(), "base backup started");
    let (data, scanner, _) = crate::pg::basebackup::to_store(
        conn,
        &format!("dbagent {id}"),
        store,
        data_key,
        PipeOptions::from_config(cfg),
        archive_stuck(facts.client.clone(), watch),
    )
    .await?;
    let tar = scanner.facts();
    let (Some((start_lsn, tli)), Some(stop_lsn)) = (tar.start(), tar.stop()) else {
        let _ = store.delete(data_key).await;
        anyhow::bail!(
            "the base backup stream had no backup_label or backup_manifest WAL range: is the server PostgreSQL 13 or newer?"
        );
    };

    Ok((data, start_lsn, tli, stop_lsn))
}

/// Makes sure of the WAL a file-level backup needs, from its start (`first`) to its stop
/// (`stop`, in segment `last`).
///
/// The segments before the stop segment are archive_command's to store, and the backup
/// waits for them (they are usually stored by now). The stop segment was closed by
/// pg_backup_stop a moment ago: instead of waiting for archive_command to store it (a fresh
/// `wal-push` of 16 MiB, then a look at the store), the backup stores the segment's start up
/// to the end of the page holding the stop point itself, read from pg_wal, as a piece of the
/// segment (the form `serve.wal_stream` stores WAL in). A restore reads it zero-padded when
/// the archive lacks the whole segment; the whole segment, once archived, supersedes it and
/// `prune` removes it.
///
/// The backup still proves that archive_command stores into this repository now: the segment
/// before its start, which pg_backup_start's switch closed, must be there too. Where no
/// segment was closed since the backup began (`began_at`: WAL was at a segment's start), that
/// segment is not known to be archived on this timeline (no archive status for it in pg_wal,
/// not in the store), on a standby (pg_backup_stop switches no segment there), or when the
/// piece cannot be stored, it waits for archive_command to store the stop segment, as before.
#[allow(clippy::too_many_arguments)]
async fn secure_wal(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    dir: &std::path::Path,
    in_recovery: bool,
    began_at: Lsn,
    first: Segment,
    last: Segment,
    stop: Lsn,
    seg_size: u64,
    watch: &mut Option<AbortOnDrop<anyhow::Error>>,
) -> anyhow::Result<()> {
    let proof = Segment {
        tli: first.tli,
        segno: first.segno.saturating_sub(1),
    };
    // The proof must be a segment closed during this backup (by pg_backup_start's switch, or
    // by WAL written meanwhile): one archived before it began says nothing of archive_command
    // now. pg_backup_start switches nothing when WAL is already at a segment's start.
    let provable = !in_recovery
        && proof.segno > 0
        && began_at < first.start_lsn(seg_size)
        && archived_or_due(store, sysid, dir, &proof.name(seg_size)).await;
    if !provable {
        return wait_archived(cfg, store, sysid, first, last, seg_size, watch).await;
    }
    let before_last = Segment {
        tli: last.tli,
        segno: last.segno - 1,
    };
    let (piece, earlier) = tokio::join!(
        store_stop_piece(cfg, store, sysid, dir, last, stop, seg_size),
        wait_archived(cfg, store, sysid, proof, before_last, seg_size, watch)
    );
    earlier?;
    match piece {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(segment = %last.name(seg_size), error = %format!("{e:#}"), "cannot store the WAL up to the backup's stop point itself: waiting for archive_command to store the segment");
            wait_archived(cfg, store, sysid, last, last, seg_size, watch).await
        }
    }
}

/// Whether segment `name` is archived here or PostgreSQL has it to archive (its archive
/// status in pg_wal): whether waiting for it can end.
async fn archived_or_due(store: &dyn Store, sysid: u64, dir: &std::path::Path, name: &str) -> bool {
    let status = dir.join("pg_wal").join("archive_status");
    if status.join(format!("{name}.ready")).exists() || status.join(format!("{name}.done")).exists()
    {
        return true;
    }
    matches!(store.head(&repo::wal_key(sysid, name)).await, Ok(Some(_)))
}

/// Stores bytes `[0, end of the page holding stop)` of segment `last`, read from pg_wal and
/// checked to be that segment of this cluster, as a piece of the segment.
async fn store_stop_piece(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    dir: &std::path::Path,
    last: Segment,
    stop: Lsn,
    seg_size: u64,
) -> anyhow::Result<()> {
    /// PostgreSQL's WAL page size (XLOG_BLCKSZ). Any other only moves where the piece ends.
    const WAL_PAGE: u64 = 8192;
    let name = last.name(seg_size);
    let path = dir.join("pg_wal").join(&name);
    let stop_at = stop.0 - last.start_lsn(seg_size).0;
    let end = ((stop_at / WAL_PAGE + 1) * WAL_PAGE).min(seg_size);
    let checked = name.clone();
    let (data, note) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<u8>, u64)> {
        use std::os::unix::fs::FileExt;
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut data = vec![0u8; end as usize];
        file.read_exact_at(&mut data, 0)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut check = crate::pg::walcheck::WalCheck::new(&checked, sysid);
        check.feed(&data);
        check.prefix_verdict().with_context(|| {
            format!(
                "{} is not segment {checked} of this cluster",
                path.display()
            )
        })?;
        let mut scan = crate::pg::walscan::WalScan::new();
        scan.feed(&data);
        Ok((data, scan.last_xact_micros.map_or(0, |t| t as u64)))
    })
    .await
    .context("reading the stop segment panicked")??;
    let piece = crate::repo::wal::Piece {
        segment: name,
        start: 0,
        end,
    };
    let key = repo::wal_key(sysid, &piece.name());
    let mut pipe = PipeOptions::for_wal(cfg);
    // Most pieces are a few pages.
    pipe.compression = crate::pipeline::compression_for(pipe.compression, end);
    let data = bytes::Bytes::from(data);
    let compressed = crate::pg::walstream::compress_wal(pipe, data.clone(), note).await?;
    crate::pg::walstream::store_wal(store, pipe, &key, &compressed, &data).await?;
    tracing::debug!(piece = %piece.name(), "stored the WAL up to the stop point");
    Ok(())
}

/// `wait_for_wal`, failing first with the archive watcher's reason when it has one.
async fn wait_archived(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    first: Segment,
    last: Segment,
    seg_size: u64,
    watch: &mut Option<AbortOnDrop<anyhow::Error>>,
) -> anyhow::Result<()> {
    match watch.as_mut() {
        Some(AbortOnDrop(stuck)) => {
            tokio::select! {
                // Two seconds more than the watcher, which polls every second: when the
                // archiver is stuck, its message (naming the failure) comes first.
                r = wait_for_wal(cfg, store, sysid, first, last, seg_size, Duration::from_secs(2)) => r,
                e = stuck => Err(e.unwrap_or_else(|e| anyhow::anyhow!("the archive watcher failed: {e}"))),
            }
        }
        None => wait_for_wal(cfg, store, sysid, first, last, seg_size, Duration::ZERO).await,
    }
}

/// Waits until every segment from `first` to `last` is in the store.
async fn wait_for_wal(
    cfg: &Config,
    store: &dyn Store,
    sysid: u64,
    first: Segment,
    last: Segment,
    seg_size: u64,
    grace: Duration,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let deadline = began + cfg.wal.archive_wait + grace;
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
            // The last segment is usually archived within a few tens of milliseconds of
            // pg_backup_stop's switch: look very often at first (a look is a HEAD, or a stat
            // in a file:// repository), then every 5 ms, 25 ms, and then every 250 ms.
            let pause = match began.elapsed() {
                d if d < Duration::from_millis(100) => 2,
                d if d < Duration::from_millis(250) => 5,
                d if d < Duration::from_secs(2) => 25,
                _ => 250,
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::repo::catalog::tests::{backup, catalog, incremental, t};

    #[test]
    fn an_incremental_builds_on_the_newest_backup_whose_chain_is_whole() {
        let mut full = backup("full", 2, 2, "00:01:00");
        full.format_version = 2;
        full.files = incremental("x", 2, "00:01:00", &[]).files;
        full.files.as_mut().unwrap().kind = "full".into();
        let i1 = incremental("i1", 4, "00:02:00", &["full"]);
        let i2 = incremental("i2", 6, "00:03:00", &["full", "i1"]);
        let picked = |backups: Vec<BaseBackup>, wanted, every| {
            pick_base(
                &catalog(backups, &[]),
                1,
                150002,
                wanted,
                every,
                t("00:10:00"),
            )
            .map(|b| b.id)
        };
        let all = vec![full.clone(), i1.clone(), i2.clone()];
        assert_eq!(
            picked(all.clone(), Wanted::Incremental, None).as_deref(),
            Some("i2")
        );
        // i1 deleted by hand: i2 is orphaned, and building on it would be orphaned too.
        assert_eq!(
            picked(vec![full.clone(), i2.clone()], Wanted::Incremental, None).as_deref(),
            Some("full")
        );
        // Without the full, nothing is whole: a full backup.
        assert_eq!(picked(vec![i1, i2], Wanted::Incremental, None), None);
        // Another timeline or major version does not count.
        assert_eq!(
            pick_base(
                &catalog(all.clone(), &[]),
                2,
                150002,
                Wanted::Incremental,
                None,
                t("00:10:00")
            ),
            None
        );
        assert_eq!(
            pick_base(
                &catalog(all.clone(), &[]),
                1,
                160000,
                Wanted::Incremental,
                None,
                t("00:10:00")
            ),
            None
        );
        // Auto: incremental until the full is older than full_every.
        let every = |m: u64| Some(Duration::from_secs(m * 60));
        assert_eq!(
            picked(all.clone(), Wanted::Auto, every(60)).as_deref(),
            Some("i2")
        );
        assert_eq!(picked(all, Wanted::Auto, every(5)), None);
    }

    use super::*;

    const SEG: u64 = 16 << 20;

    /// A full backup and eleven incrementals, each on all before it, in a local repository;
    /// `skip` is not written (deleted by hand), and below them all lies an unreadable
    /// manifest. Returns the store and its listing.
    async fn chain_repo(
        dir: &std::path::Path,
        skip: Option<&str>,
    ) -> (crate::storage::LocalStore, Vec<ObjectInfo>) {
        let store = crate::storage::LocalStore::new(dir.to_path_buf());
        let id = |n: usize| format!("20261123T00{n:02}00Z-0000");
        let mut ids = Vec::new();
        for n in 1..=12 {
            let mut b = if n == 1 {
                let mut full = incremental(&id(n), 2, "00:01:00", &[]);
                full.files.as_mut().unwrap().kind = "full".into();
                full.files.as_mut().unwrap().based_on = None;
                full
            } else {
                let deps: Vec<&str> = ids.iter().map(String::as_str).collect();
                incremental(&id(n), 2 + n as u64, &format!("00:{n:02}:30"), &deps)
            };
            b.system_identifier = 1;
            b.server_version_num = 150002;
            ids.push(b.id.clone());
            if skip == Some(b.id.as_str()) {
                continue;
            }
            let key = repo::backup_manifest_key(1, &b.id);
            repo::write_manifest(&store, &key, &b, "test")
                .await
                .unwrap();
        }
        let bad = repo::backup_manifest_key(1, "20261122T000000Z-0000");
        store
            .put(&bad, b"not a manifest".to_vec().into())
            .await
            .unwrap();
        let listing = store.list(&repo::backups_prefix(1)).await.unwrap();
        (store, listing)
    }

    #[tokio::test]
    async fn the_base_is_chosen_from_the_newest_manifests_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, listing) = chain_repo(dir.path(), None).await;
        let choose = |needs_full: bool, wanted, every| {
            let (store, listing) = (&store, &listing);
            async move {
                let enough = |cat: &_| base_found(cat, 1, 150002, needs_full);
                let cat =
                    crate::repo::catalog::PgCatalog::load_newest(store, 1, listing, enough).await?;
                let picked = pick_base(&cat, 1, 150002, wanted, every, t("01:00:00"));
                anyhow::Ok((picked.map(|b| b.id), cat.backups.len()))
            }
        };
        // The newest incremental, from one batch of manifests: the unreadable one at the
        // bottom is never read.
        let (picked, read) = choose(false, Wanted::Incremental, None).await.unwrap();
        assert_eq!(picked.as_deref(), Some("20261123T001200Z-0000"));
        assert_eq!(read, 8);
        // backup.full_every reads back to the newest full, which here means every manifest,
        // the unreadable one included: its error says which.
        let every = Some(Duration::from_secs(3600));
        let e = choose(true, Wanted::Auto, every).await.unwrap_err();
        assert!(format!("{e:#}").contains("20261122T000000Z-0000"), "{e:#}");

        // One incremental deleted by hand: those built on it are orphans, known from the
        // listing alone; the newest whole chain ends just before it.
        let dir = tempfile::tempdir().unwrap();
        let (store, listing) = chain_repo(dir.path(), Some("20261123T000500Z-0000")).await;
        let enough = |cat: &_| base_found(cat, 1, 150002, false);
        let cat = crate::repo::catalog::PgCatalog::load_newest(&store, 1, &listing, enough)
            .await
            .unwrap();
        let picked = pick_base(&cat, 1, 150002, Wanted::Incremental, None, t("01:00:00"));
        assert_eq!(
            picked.map(|b| b.id).as_deref(),
            Some("20261123T000400Z-0000")
        );
    }

    fn reading(last_archived: &str, segno_written: u64) -> ArchiveProgress {
        ArchiveProgress {
            last_archived: last_archived.into(),
            last_failed: String::new(),
            failed_count: 0,
            lsn: segno_written * SEG + 0x100,
        }
    }

    #[test]
    fn a_stuck_archive_is_noticed_from_positions_only() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = ArchiveWatch::new(5 * SEG + 0x28, SEG, s(10));
        // Writing segment 5, the backup's first: nothing is due yet, however long.
        assert_eq!(w.observe(t0, &reading("000000010000000000000004", 5)), None);
        assert_eq!(
            w.observe(t0 + s(60), &reading("000000010000000000000004", 5)),
            None
        );
        // Segment 5 is complete and not archived: stuck after 10 s without progress.
        assert_eq!(
            w.observe(t0 + s(61), &reading("000000010000000000000004", 6)),
            None
        );
        assert_eq!(
            w.observe(t0 + s(70), &reading("000000010000000000000004", 6)),
            None
        );
        let mut failing = reading("000000010000000000000004", 6);
        failing.last_failed = "000000010000000000000005".into();
        failing.failed_count = 7;
        let why = w.observe(t0 + s(72), &failing).unwrap();
        assert!(
            why.contains("000000010000000000000005 that the backup needs"),
            "{why}"
        );
        assert!(
            why.contains("7 failed attempts, the last on 000000010000000000000005"),
            "{why}"
        );
    }

    #[test]
    fn an_archive_that_moves_or_has_caught_up_is_not_stuck() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = ArchiveWatch::new(5 * SEG, SEG, s(10));
        // Behind by many segments, but moving every few seconds.
        for i in 0..20u64 {
            let last = format!("0000000100000000{:08X}", 5 + i / 2);
            assert_eq!(w.observe(t0 + s(i * 4), &reading(&last, 40)), None);
        }
        // Caught up (a .backup file archived last counts by its segment), for ever.
        let mut w = ArchiveWatch::new(5 * SEG, SEG, s(10));
        for i in 0..20u64 {
            let r = reading("000000010000000000000006.00000028.backup", 7);
            assert_eq!(w.observe(t0 + s(i * 4), &r), None);
        }
        // Nothing archived at all yet, and the backup's segment is due: stuck.
        let mut w = ArchiveWatch::new(5 * SEG, SEG, s(10));
        assert_eq!(w.observe(t0, &reading("", 6)), None);
        let why = w.observe(t0 + s(11), &reading("", 6)).unwrap();
        assert!(why.contains("last archived: none"), "{why}");
    }
}
