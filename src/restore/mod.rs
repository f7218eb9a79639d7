//! Point-in-time restore: plan (pure, in `plan`) then execute (here).

pub mod files;
pub mod plan;
pub mod recovery;
pub(crate) mod untar;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::config::Config;
use crate::input_err;
use crate::pg::conn::ConnInfo;
use crate::pg::walscan::WalScan;
use crate::proc::Program;
use crate::repo::catalog::{self, PgCatalog};
use crate::repo::wal::{Lsn, Segment};
use crate::storage::Store;
use plan::{PgPlan, Target};

#[derive(Debug, Clone)]
pub struct PgRestoreOptions {
    pub target: Target,
    pub target_dir: PathBuf,
    pub no_start: bool,
    pub dry_run: bool,
    /// Start the restored server on this port instead of the one in its configuration.
    pub port: Option<u16>,
    /// Follow this timeline instead of the branch that continues production.
    pub timeline: Option<u32>,
    /// The restored server replaces production: it archives into the repository.
    pub as_primary: bool,
    /// Into an existing data directory of the same cluster, writing only what differs.
    pub delta: bool,
    /// A standby: `standby.signal`, no target, never promoted (`--standby`).
    pub standby: bool,
}

/// Which cluster in the repository: the configured one, or the only one there.
pub async fn choose_cluster(cfg: &Config, store: &dyn Store) -> anyhow::Result<u64> {
    if let Some(id) = cfg.pg.system_identifier {
        return Ok(id);
    }
    let found = catalog::clusters(store).await?;
    match found.as_slice() {
        [] => Err(input_err!(
            "the repository {} holds no PostgreSQL backups or WAL: check --repo",
            cfg.repo.as_deref().unwrap_or("")
        )),
        [one] => Ok(*one),
        many => Err(input_err!(
            "the repository holds several clusters ({}): choose one with DBAGENT_PG_SYSTEM_IDENTIFIER",
            many.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Refuses a target directory that exists and is not empty, before anything is written.
pub fn check_target_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(input_err!(
                    "target directory {} is not empty: restore into a new or empty directory",
                    dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(input_err!("target directory {}: {e}", dir.display())),
    }
}

/// What `dbagent restore` did (or, on a dry run, would do).
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub plan: String,
    pub dry_run: bool,
    pub backup: String,
    pub target_dir: PathBuf,
    /// Prepared but not started (`--no-start`).
    pub no_start: bool,
    /// Restored as a standby (`--standby`).
    #[serde(rename = "as_standby")]
    pub standby_mode: bool,
    /// Where the started server landed.
    pub promoted: Option<Promoted>,
    /// The started standby (`--standby`).
    pub standby: Option<StandbyRunning>,
}

#[derive(Debug, Serialize)]
pub struct StandbyRunning {
    pub port: u16,
    /// The WAL position replayed when it first accepted connections.
    pub replayed_lsn: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Promoted {
    pub port: u16,
    pub timeline: String,
    /// The last replayed transaction's commit time, as PostgreSQL prints it.
    pub last_commit: Option<String>,
}

impl std::fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.plan)?;
        if self.dry_run {
            return f.write_str("dry run: nothing was written");
        }
        let dir = self.target_dir.display();
        write!(f, "restored base backup {} into {dir}", self.backup)?;
        if self.no_start {
            write!(
                f,
                "\nnot started (--no-start): start it with `pg_ctl -D {dir} start`; it replays WAL with `dbagent wal-fetch` and {}",
                if self.standby_mode {
                    "stays a standby"
                } else {
                    "promotes at the target"
                }
            )?;
        }
        if let Some(s) = &self.standby {
            write!(
                f,
                "\nrestored: the server is running as a standby on port {} (data {dir}), consistent and replaying (at {} when it first answered); it follows the archive and the primary in its primary_conninfo",
                s.port,
                s.replayed_lsn.as_deref().unwrap_or("an unknown position")
            )?;
        }
        if let Some(p) = &self.promoted {
            write!(
                f,
                "\nrestored: the server has promoted and is running on port {} (data {dir}); last replayed transaction committed at {}; timeline {}",
                p.port,
                p.last_commit.as_deref().unwrap_or("none"),
                p.timeline
            )?;
        }
        Ok(())
    }
}

pub async fn restore_pg(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &PgRestoreOptions,
) -> anyhow::Result<RestoreReport> {
    if !opts.delta {
        check_target_dir(&opts.target_dir)?;
    }
    let sysid = choose_cluster(cfg, store.as_ref()).await?;
    if opts.delta {
        files::check_delta_dir(&opts.target_dir, sysid)?;
    }
    let cat = PgCatalog::load(store.as_ref(), sysid).await?;
    let mut plan = plan::plan_pg(&cat, opts.target, opts.timeline)?;
    if opts.delta && plan.backup.files.is_none() {
        return Err(input_err!(
            "--delta needs a file-level backup, and backup {} was streamed over the network: restore into an empty directory without --delta",
            plan.backup.id
        ));
    }
    plan.as_primary = opts.as_primary;
    plan.standby = opts.standby;
    let mut report = RestoreReport {
        plan: plan.render(),
        dry_run: opts.dry_run,
        backup: plan.backup.id.clone(),
        target_dir: opts.target_dir.clone(),
        no_start: opts.no_start,
        standby_mode: opts.standby,
        promoted: None,
        standby: None,
    };
    if opts.dry_run {
        return Ok(report);
    }
    if !opts.no_start {
        preflight_start(cfg, &plan, opts.port).await?;
    }
    check_keys(store.as_ref(), &plan).await?;
    read_archive_end(store.as_ref(), &mut plan).await?;
    eprintln!("{}", report.plan);

    // A replica re-seeded in place keeps pointing at its primary.
    let keep = if opts.standby && opts.delta {
        recovery::standby_lines(&opts.target_dir)?
    } else {
        Vec::new()
    };
    materialize(
        cfg,
        store.as_ref(),
        &plan,
        &opts.target_dir,
        &keep,
        opts.delta,
    )
    .await?;
    if opts.no_start {
        return Ok(report);
    }
    if plan.archive_end.is_some() {
        // Latest as of the start, not of the plan: a base restore can take hours while
        // production goes on archiving.
        let before = plan.archive_end;
        match extend_to_latest(store.as_ref(), &mut plan).await {
            Ok(true) => {
                write_recovery_settings(cfg, &plan, &opts.target_dir, &keep)?;
                eprintln!(
                    "the archive grew while the base backup was restored: recovery now goes on to {} (in {}), was {}",
                    plan.archive_end.map_or("?".into(), |e| e.end.to_string()),
                    plan.last_wal,
                    before.map_or("?".into(), |e| e.end.to_string())
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %crate::error::one_line(&e),
                "could not read whether the archive grew during the restore: recovery goes to the end read at the start"
            ),
        }
    }
    let landed = start_and_wait(cfg, &plan, &opts.target_dir, opts.port).await?;
    if plan.standby {
        report.standby = Some(StandbyRunning {
            port: landed.port,
            replayed_lsn: landed.replayed_lsn.map(|l| Lsn(l).to_string()),
        });
        return Ok(report);
    }
    if plan.as_primary {
        wait_history_archived(cfg, store.as_ref(), &plan, &opts.target_dir, &landed).await?;
    }
    report.promoted = Some(Promoted {
        port: landed.port,
        timeline: landed.timeline,
        last_commit: landed.last_commit,
    });
    Ok(report)
}

/// What starting the restored server needs, checked before anything is written (exit 1): a
/// `pg_ctl` of the backup's major version, and a free `--port`. Found missing after the
/// restore, it would leave a full data directory that a second try refuses as not empty.
async fn preflight_start(cfg: &Config, plan: &PgPlan, port: Option<u16>) -> anyhow::Result<()> {
    crate::pg::bins::server_program(&cfg.pg, "pg_ctl", plan.backup.major()).await?;
    if let Some(port) = port {
        if port == 0 {
            return Err(input_err!(
                "--port 0 is not a port: give the port the restored server should listen on"
            ));
        }
        if let Err(e) = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)) {
            return Err(input_err!(
                "--port {port} cannot be used on this host ({e}): choose a free port"
            ));
        }
    }
    Ok(())
}

/// Refuses (exit 1) a reader without the keys of the plan's backup, or of the WAL archived
/// now, before anything is printed or touched.
pub async fn check_keys(store: &dyn Store, plan: &PgPlan) -> anyhow::Result<()> {
    let mut needed: Vec<_> = plan.backup.data.needs().into_iter().collect();
    needed.extend(crate::pipeline::current_key_set(store).await?);
    crate::pipeline::check_readable(store, &needed).await
}

/// Unpacks the plan's base backup into `dir` (absent or empty) and writes the recovery
/// settings, plus `extra` lines for postgresql.auto.conf. On failure `dir` is left as it was.
pub async fn materialize(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    dir: &Path,
    extra: &[String],
    delta: bool,
) -> anyhow::Result<()> {
    check_keys(store, plan).await?;
    anyhow::ensure!(
        plan.archive_end.is_some() || plan.standby || plan.target != Target::Latest,
        "internal error: a --latest restore must read where the archive ends before it writes"
    );
    let created = !dir.exists();
    let unpacked = match &plan.backup.files {
        Some(_) => {
            let parallel = cfg.backup.workers();
            files::unpack(
                store,
                &plan.backup,
                dir,
                delta,
                parallel,
                cfg.s3.retry_timeout,
            )
            .await
            .map(|u| {
                tracing::info!(
                    files = u.files,
                    written = u.bytes_written,
                    kept = u.bytes_kept,
                    "base backup restored"
                );
            })
        }
        None => unpack_backup(store, plan, dir).await,
    };
    if let Err(e) = unpacked {
        // A delta target stays as it is: a second --delta carries on from there.
        if !delta {
            remove_contents(dir, created);
        }
        return Err(e);
    }
    write_recovery_settings(cfg, plan, dir, extra)
}

/// Where a restored server landed.
#[derive(Debug, Clone)]
pub struct Landed {
    pub port: u16,
    /// Its unix socket directory, or its TCP address when it has no socket.
    pub host: String,
    /// The last replayed transaction's commit time, as PostgreSQL prints it.
    pub last_commit: Option<String>,
    pub timeline: String,
    /// The last WAL position recovery replayed.
    pub replayed_lsn: Option<u64>,
}

impl Landed {
    /// Connection settings for a database of the restored server (over its socket).
    pub fn conn(&self, cfg: &Config, db: &str) -> ConnInfo {
        let mut pg = cfg.pg.clone();
        pg.host = Some(self.host.clone());
        pg.port = Some(self.port);
        pg.database = Some(db.to_string());
        pg.user = pg.user.or_else(|| Some("postgres".into()));
        // A socket has no TLS to bind to: `channel_binding = require`, meant for the
        // production server, cannot apply to the one dbagent started here.
        pg.channel_binding = None;
        ConnInfo::from_config(&pg)
    }
}

/// Empties a directory the restore created or found empty (or removes it when it created it).
pub(crate) fn remove_contents(dir: &Path, remove_dir: bool) {
    if remove_dir {
        let _ = std::fs::remove_dir_all(dir);
    } else if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// A writer that counts what passes through it (for progress).
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

async fn unpack_backup(store: &dyn Store, plan: &PgPlan, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, 0o700)?;
    let (writer, reader) = untar::chunk_channel();
    let unpack_dir = dir.to_path_buf();
    let unpacker = std::thread::spawn(move || -> anyhow::Result<()> {
        untar::unpack(reader, &unpack_dir).context("unpacking the base backup")?;
        Ok(())
    });
    let count = Arc::new(AtomicU64::new(0));
    let total = plan.backup.data.plain_bytes;
    let progress = std::io::stderr().is_terminal().then(|| {
        let count = count.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = count.load(Ordering::Relaxed);
                eprint!(
                    "\rrestoring base backup: {} of {} ({}%)   ",
                    human(done),
                    human(total),
                    done * 100 / total.max(1)
                );
            }
        })
    });
    let writer = Counting {
        inner: writer,
        count,
    };
    let downloaded = crate::pipeline::download(store, &plan.backup.data.key, writer).await;
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    // Hand over the last chunk, then close the channel so the unpacker sees the end.
    let downloaded = downloaded.and_then(|(mut w, t)| {
        std::io::Write::flush(&mut w)?;
        drop(w);
        Ok(t)
    });
    let unpacked = unpacker
        .join()
        .map_err(|_| anyhow::anyhow!("unpacking thread panicked"))?;
    // When the unpacker stopped first (a full disk), its error is the one that says why.
    let unpacker_stopped = downloaded.as_ref().is_err_and(crate::error::is_broken_pipe);
    let (downloaded, unpacked) = match (downloaded, unpacked) {
        (Err(_), Err(e)) if unpacker_stopped => return Err(e),
        pair => pair,
    };
    let trailer =
        downloaded.with_context(|| format!("downloading base backup {}", plan.backup.id))?;
    unpacked?;
    plan.backup
        .data
        .verify(&trailer, &format!("base backup {}", plan.backup.id))?;
    let synced = dir.to_path_buf();
    tokio::task::spawn_blocking(move || untar::sync_tree(&synced))
        .await
        .context("syncing task panicked")??;
    // Verified and durable: only now does the directory become a cluster PostgreSQL would
    // start.
    untar::release(dir)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on {}", path.display()))
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One word of `restore_command`. PostgreSQL runs it with `/bin/sh -c` after replacing `%f`,
/// `%p`, `%r` and `%%`: the word is single-quoted unless it holds only characters no shell
/// treats specially (a `'` inside becomes `'\''`), and every `%` is doubled so PostgreSQL
/// hands it through unchanged.
fn restore_command_word(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@,+".contains(c));
    let word = if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    };
    word.replace('%', "%%")
}

/// `restore_command` for a dbagent binary, config file and repository (pure), and the
/// timeline recovery follows (see `wal::fetch`).
fn restore_command_for(
    exe: &str,
    config_file: Option<&str>,
    repo: Option<&str>,
    timeline: Option<u32>,
) -> String {
    let mut cmd = restore_command_word(exe);
    if let Some(file) = config_file {
        cmd.push_str(" --config ");
        cmd.push_str(&restore_command_word(file));
    }
    if let Some(repo) = repo {
        cmd.push_str(" --repo ");
        cmd.push_str(&restore_command_word(repo));
    }
    cmd.push_str(" wal-fetch");
    if let Some(tli) = timeline {
        cmd.push_str(&format!(" --timeline {tli}"));
    }
    cmd.push_str(" %f %p");
    cmd
}

/// The restore_command that brings WAL back through this same dbagent and repository, along
/// `timeline`.
pub fn restore_command(cfg: &Config, timeline: Option<u32>) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the dbagent binary")?;
    Ok(restore_command_for(
        &exe.to_string_lossy(),
        cfg.config_file
            .as_ref()
            .map(|f| f.to_string_lossy())
            .as_deref(),
        cfg.repo.as_deref(),
        timeline,
    ))
}

/// `recovery_end_command`: this same dbagent removes the recovery block when recovery ends.
fn recovery_end_command() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the dbagent binary")?;
    Ok(restore_command_word(&exe.to_string_lossy()) + " recovery-end")
}

fn write_recovery_settings(
    cfg: &Config,
    plan: &PgPlan,
    dir: &Path,
    extra: &[String],
) -> anyhow::Result<()> {
    let block = recovery::block(
        plan,
        // A standby follows whatever timeline its primary is on: no path to hold it to.
        &restore_command(cfg, (!plan.standby).then_some(plan.timeline))?,
        &recovery_end_command()?,
        extra,
    );
    let signal = if plan.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    recovery::write(dir, &block, signal)
}

/// Starts the restored server and waits until it has promoted (a standby: until it is
/// consistent and answers in recovery). Returns where it landed.
pub async fn start_and_wait(
    cfg: &Config,
    plan: &PgPlan,
    dir: &Path,
    port: Option<u16>,
) -> anyhow::Result<Landed> {
    let pg_ctl = crate::pg::bins::server_program(&cfg.pg, "pg_ctl", plan.backup.major()).await?;
    let log = dir.join("dbagent-restore.log");
    let mut cmd = Program::new(&pg_ctl)
        .arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .arg("-W")
        .arg("start");
    if let Some(port) = port {
        cmd = cmd.arg("-o").arg(format!("-p {port}"));
    }
    let launched = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    cmd.run()
        .on_failure(|exit| {
            anyhow::anyhow!(
                "pg_ctl could not start the restored server: {}",
                exit.stderr().trim()
            )
        })
        .check()
        .await?;
    eprintln!(
        "started PostgreSQL on the restored data; replaying WAL (log: {})",
        log.display()
    );
    let deadline = tokio::time::Instant::now() + cfg.restore.promote_timeout;
    let mut replayed: Option<u64> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some((pid, port, pm)) =
            PostmasterPid::read(dir).and_then(|pm| Some((pm.pid?, pm.port?, pm)))
        else {
            return Err(recovery_failure(plan, &log));
        };
        // SAFETY: signal 0 only checks that the postmaster exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return Err(recovery_failure(plan, &log));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "the restored server did not {} within {} (restore.promote_timeout); recovery {}; it is still running (data {}): see its log {} and stop it with `pg_ctl -D {} stop` if it is stuck",
                if plan.standby {
                    "answer as a consistent standby (is hot_standby off?)"
                } else {
                    "promote"
                },
                humantime::format_duration(cfg.restore.promote_timeout),
                replayed.map_or("had not reached a consistent state".into(), |l| format!(
                    "had replayed up to {}",
                    Lsn(l)
                )),
                dir.display(),
                log.display(),
                dir.display()
            ));
        }
        // Still making its sockets (checked against the deadline above).
        let Some(host) = pm.host() else { continue };
        let probe = Landed {
            port,
            host,
            last_commit: None,
            timeline: String::new(),
            replayed_lsn: None,
        };
        let conn = probe.conn(cfg, "postgres");
        // Refusals other than "not yet" (a role or password the restored cluster does not
        // know) will not go away by waiting.
        let client = match conn.connect_when_ready().await {
            Ok(Some(client)) => client,
            Ok(None) => continue,
            Err(e) => {
                return Err(e.context(format!(
                    "the restored server is running (data {}, port {}) but dbagent cannot connect to it to see it promote",
                    dir.display(),
                    port
                )));
            }
        };
        // A promoted server's timeline is the one its WAL is written on: the checkpoint that
        // records it in pg_control is only requested at promotion, and may not have ended.
        let Ok(row) = client
            .query_one(
                "SELECT pg_is_in_recovery(), coalesce(pg_last_xact_replay_timestamp()::text, 'none'),
                        CASE WHEN pg_is_in_recovery()
                             THEN (SELECT timeline_id FROM pg_control_checkpoint())::text
                             ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int::text
                        END,
                        pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint,
                        extract(epoch FROM pg_postmaster_start_time())::float8",
                &[],
            )
            .await
        else {
            continue;
        };
        // Whoever answered on that socket or address must be the server started above, not
        // one that was running before (any role may ask its start time; data_directory is
        // superuser-only). The postmaster notes its start time only after it set up shared
        // memory, so it is never earlier than the launch.
        let started: f64 = row.get(4);
        if started < launched - 1.0 {
            return Err(anyhow::anyhow!(
                "another server answered at {} port {port} (it started at {}, before this restore started its server): the restored server's port is taken; see its log {}",
                probe.host,
                crate::timespec::show(
                    chrono::DateTime::from_timestamp(started as i64, 0).unwrap_or_default()
                ),
                log.display()
            ));
        }
        let in_recovery: bool = row.get(0);
        replayed = row.get::<_, Option<i64>>(3).map(|v| v as u64).or(replayed);
        if plan.standby {
            if !in_recovery {
                return Err(anyhow::anyhow!(
                    "the restored server (data {}, port {}) promoted although it was restored as a standby: something removed its standby.signal; see its log {}",
                    dir.display(),
                    port,
                    log.display()
                ));
            }
            return Ok(Landed {
                timeline: row.get(2),
                replayed_lsn: replayed,
                ..probe
            });
        }
        if !in_recovery {
            // Segments fetched ahead but never replayed are of no further use.
            let _ = std::fs::remove_dir_all(dir.join("pg_wal").join(crate::pg::wal::PREFETCH_DIR));
            // A primary now: its recovery settings must not reach its own backups.
            if let Err(e) = recovery::remove_after_promotion(dir) {
                tracing::warn!(error = %format!("{e:#}"), "could not remove the recovery settings from postgresql.auto.conf: remove restore_command and recovery_target_* there by hand");
            }
            let last: String = row.get(1);
            let landed = Landed {
                last_commit: (last != "none").then_some(last),
                timeline: row.get(2),
                replayed_lsn: row.get::<_, Option<i64>>(3).map(|v| v as u64),
                ..probe
            };
            check_replayed_all(cfg, plan, dir, &landed, &log).await?;
            return Ok(landed);
        }
    }
}

/// A server restored as the new primary has forked production's history, and the fork is
/// known only once its timeline's history file is in the repository: until then a `--latest`
/// restore, or a standby re-seeded from the repository, follows the old timeline (the change
/// the restore undid). So the restore waits for that file (PostgreSQL archives history files
/// first), and fails, leaving the server running, when the archiver gave up on it (3 failed
/// tries since it last archived anything), when the server stops, or when
/// `restore.promote_timeout` passes. A server that does not archive here (archiving off or
/// unset in the settings it was restored with, or archiving into another repository) is
/// warned about instead: the file waits in its `pg_wal` for the archiving it will run with.
async fn wait_history_archived(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    dir: &Path,
    landed: &Landed,
) -> anyhow::Result<()> {
    let log = dir.join("dbagent-restore.log");
    let tli: u32 = landed.timeline.parse().with_context(|| {
        format!(
            "the restored server reported timeline {:?}",
            landed.timeline
        )
    })?;
    let name = crate::repo::wal::history_name(tli);
    let key = crate::repo::wal_key(plan.backup.system_identifier, &name);
    let running = format!(
        "the restored server promoted on timeline {tli} (port {}) and is still running",
        landed.port
    );
    let consequence = "until it is in the repository, a --latest restore or a standby seeded from the repository follows the old timeline, the history this restore undid";
    let done = dir
        .join("pg_wal")
        .join("archive_status")
        .join(format!("{name}.done"));
    let stored = || async { store.head(&key).await.map(|found| found.is_some()) };
    let deadline = tokio::time::Instant::now() + cfg.restore.promote_timeout;
    let (mut waiting, mut warned) = (false, false);
    let mut client = None;
    loop {
        match stored().await {
            Ok(true) => {
                eprintln!(
                    "timeline {tli}'s history is archived ({name}): restores from this repository now follow the restored server"
                );
                switch_to_first_segment(cfg, landed, tli).await;
                return Ok(());
            }
            Ok(false) => {}
            Err(e) if !warned => {
                tracing::warn!(error = %crate::error::one_line(&e), "could not look for the new timeline's history file in the repository; trying again");
                warned = true;
            }
            Err(_) => {}
        }
        if done.exists() && matches!(stored().await, Ok(false)) {
            eprintln!(
                "warning: the restored server archived {name}, its new timeline's history file, but not into this repository: its archive_command writes elsewhere, and restores from this repository do not know the new timeline"
            );
            return Ok(());
        }
        let alive = PostmasterPid::read(dir)
            .and_then(|pm| pm.pid)
            // SAFETY: signal 0 only checks that the process exists.
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            return Err(anyhow::anyhow!(
                "the restored server promoted on timeline {tli} but stopped before it archived {name}, the file that records the new timeline (see its log {}): {consequence}. Start it again with archiving to this repository and check with `dbagent list`",
                log.display()
            ));
        }
        if client
            .as_ref()
            .is_none_or(|c: &tokio_postgres::Client| c.is_closed())
        {
            client = landed.conn(cfg, "postgres").connect().await.ok();
        }
        if let Some(c) = &client {
            if !waiting {
                let settings = c
                    .query_one(
                        "SELECT current_setting('archive_mode'), current_setting('archive_command'), current_setting('archive_library')",
                        &[],
                    )
                    .await;
                if let Ok(row) = settings {
                    let (mode, command, library): (String, String, String) =
                        (row.get(0), row.get(1), row.get(2));
                    if mode == "off" || (command.is_empty() && library.is_empty()) {
                        eprintln!(
                            "warning: the restored server does not archive as it runs now (archive_mode = {mode}{}): its new timeline's history file {name} waits in its pg_wal; {consequence}. Start it with the archive settings production had",
                            if mode == "off" {
                                ""
                            } else {
                                ", no archive_command"
                            }
                        );
                        return Ok(());
                    }
                }
                eprintln!(
                    "waiting for the restored server to archive {name}, its new timeline's history file"
                );
                waiting = true;
            }
            let failing = c
                .query_one(
                    "SELECT coalesce(last_failed_wal, ''), failed_count, coalesce(last_failed_time::text, ''),
                            coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false)
                     FROM pg_stat_archiver",
                    &[],
                )
                .await;
            if let Ok(row) = failing {
                let (failed, count, at, since): (String, i64, String, bool) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                // The archiver's last round may have stored it since the look above.
                if failed == name && count >= 3 && since && !matches!(stored().await, Ok(true)) {
                    return Err(anyhow::anyhow!(
                        "{running}, but its archive_command failed {count} times to archive {name}, the file that records the new timeline (last at {at}; see its log {}): {consequence}. Fix archiving (the server tries again about every minute) and check with `dbagent list`",
                        log.display()
                    ));
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "{running}, but it did not archive {name}, the file that records the new timeline, within {} (restore.promote_timeout; see its log {}): {consequence}. Check its archiving and `dbagent list`",
                humantime::format_duration(cfg.restore.promote_timeout),
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Closes the new timeline's first segment, so that the server archives WAL of its own at
/// once rather than when it has written 16 MiB or `archive_timeout` passes. Until a segment
/// of its own is archived, the timeline is no branch to `list` and `prune` (which keep what
/// it restores from only for `retention.incomplete_after`). Best effort: the history file,
/// which restores follow, is already stored.
async fn switch_to_first_segment(cfg: &Config, landed: &Landed, tli: u32) {
    let switched = async {
        let client = landed.conn(cfg, "postgres").connect().await?;
        let row = client
            .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
            .await?;
        anyhow::Ok(row.get::<_, String>(0))
    };
    match tokio::time::timeout(Duration::from_secs(10), switched).await {
        Ok(Ok(segment)) => {
            tracing::debug!(%segment, "switched the new timeline's first segment for archiving")
        }
        Ok(Err(e)) => eprintln!(
            "warning: could not switch timeline {tli}'s first WAL segment ({}): it is archived when full or at archive_timeout; until then `list` shows no WAL of the new timeline. Run SELECT pg_switch_wal() on the restored server",
            crate::error::one_line(&e)
        ),
        Err(_) => eprintln!(
            "warning: the restored server did not switch timeline {tli}'s first WAL segment within 10 s: it is archived when full or at archive_timeout; until then `list` shows no WAL of the new timeline. Run SELECT pg_switch_wal() on the restored server"
        ),
    }
}

/// Without a recovery target PostgreSQL promotes wherever restore_command first fails, or
/// wherever the WAL it reads stops making sense (a record whose checksum fails ends it as
/// quietly as a missing segment). So a `--latest` restore must have replayed up to the end of
/// the archive: the end of the last whole record in the last archived segment, read from the
/// repository. Short of that is a failure naming both positions.
async fn check_replayed_all(
    cfg: &Config,
    plan: &PgPlan,
    dir: &Path,
    landed: &Landed,
    log: &Path,
) -> anyhow::Result<()> {
    let Some(end) = plan.archive_end else {
        return Ok(()); // with a target time PostgreSQL itself refuses to stop short
    };
    let Some(why) = short_landing(plan, landed.replayed_lsn.map(Lsn), end.end) else {
        return Ok(());
    };
    if plan.as_primary {
        // It would archive a timeline that forks production short of its end.
        let stopped = stop_now(cfg, plan, dir).await;
        return Err(anyhow::anyhow!(
            "{why}; the restored server {} (log: {})",
            match stopped {
                Ok(()) =>
                    "was stopped before it archived more than its new timeline's history file",
                Err(_) =>
                    "could not be stopped: stop it with `pg_ctl stop -m immediate` before it archives a new timeline",
            },
            log.display()
        ));
    }
    Err(anyhow::anyhow!(
        "{why}; the restored server on port {} must not be used as a complete copy (log: {})",
        landed.port,
        log.display()
    ))
}

/// Stops a server at once (no shutdown checkpoint, nothing more archived).
async fn stop_now(cfg: &Config, plan: &PgPlan, dir: &Path) -> anyhow::Result<()> {
    let pg_ctl = crate::pg::bins::server_program(&cfg.pg, "pg_ctl", plan.backup.major()).await?;
    Program::new(&pg_ctl)
        .arg("-D")
        .arg(dir)
        .arg("-m")
        .arg("immediate")
        .arg("-w")
        .arg("stop")
        .run()
        .check()
        .await
        .map(|_| ())
}

/// Moves a `--latest` plan's end to where the archive along its backup and timeline ends now,
/// when it has grown; whether it moved. The backup and timeline stay as planned.
async fn extend_to_latest(store: &dyn Store, plan: &mut PgPlan) -> anyhow::Result<bool> {
    let cat = PgCatalog::load(store, plan.backup.system_identifier).await?;
    // Also when the last segment is the same one: streamed pieces grow it in place.
    let Some(mut newer) = plan.along(&cat) else {
        return Ok(false);
    };
    read_archive_end(store, &mut newer).await?;
    let (old, new) = (
        plan.archive_end.map(|e| e.end),
        newer.archive_end.map(|e| e.end),
    );
    // Never trade a known last record (the target) for an end without one.
    let targeted = |p: &PgPlan| p.archive_end.and_then(|e| e.last_record).is_some();
    if new <= old || (targeted(plan) && !targeted(&newer)) {
        return Ok(false);
    }
    *plan = newer;
    Ok(true)
}

/// Reads where the archived WAL along `plan` ends, for a `--latest` recovery (not a
/// standby's), before anything is written: the recovery settings target its last record,
/// and the landing is checked against its end. An end that cannot be read is refused here.
pub async fn read_archive_end(store: &dyn Store, plan: &mut PgPlan) -> anyhow::Result<()> {
    if plan.target != Target::Latest || plan.standby {
        return Ok(());
    }
    let end = archive_end(store, plan).await.with_context(|| {
        format!(
            "could not read where the archived WAL ends ({}), which a --latest restore must reach; nothing was written",
            plan.last_wal
        )
    })?;
    plan.archive_end = Some(end);
    Ok(())
}

/// Why a landing at `reached` is short of `end`, the end of the archived WAL (pure).
fn short_landing(plan: &PgPlan, reached: Option<Lsn>, end: Lsn) -> Option<String> {
    let reached = reached?;
    (reached < end).then(|| {
        format!(
            "recovery stopped at {reached}, short of the end of the archived WAL at {end} (in {}): WAL after {reached} could not be restored or read",
            plan.last_wal
        )
    })
}

/// The end of the archived WAL along the plan: the end of the last whole record in its last
/// segment (the segment's start when no record ends in it).
async fn archive_end(store: &dyn Store, plan: &PgPlan) -> anyhow::Result<plan::ArchiveEnd> {
    let seg_size = plan.backup.wal_segment_size;
    let last = Segment::parse(&plan.last_wal, seg_size)
        .with_context(|| format!("{} is not a WAL segment name", plan.last_wal))?;
    let sysid = plan.backup.system_identifier;
    let key = crate::repo::wal_key(sysid, &plan.last_wal);
    // An older timeline's copy is read only up to where the timeline left the path.
    let new_scan = || match plan.wal_end {
        Some(cut) => WalScan::new().until(cut.0),
        None => WalScan::new(),
    };
    let scan = match crate::pipeline::download(store, &key, new_scan()).await {
        Ok((scan, _)) => scan,
        // Held only as streamed pieces (serve.wal_stream): what they hold is the end.
        Err(e) if crate::storage::is_not_found(&e) => {
            let (data, end) = crate::pg::walstream::assemble(store, sysid, &plan.last_wal)
                .await?
                .with_context(|| format!("{} is not archived", plan.last_wal))?;
            let mut scan = new_scan();
            scan.feed(&data[..end as usize]);
            scan
        }
        Err(e) => return Err(e.context(format!("reading {}", plan.last_wal))),
    };
    let end = Lsn(scan.end_lsn.unwrap_or(last.start_lsn(seg_size).0));
    Ok(plan::ArchiveEnd {
        end: plan.wal_end.map_or(end, |cut| end.min(cut)),
        last_record: scan.last_start.map(Lsn),
    })
}

/// What a data directory's postmaster.pid says. PostgreSQL writes its lines as the server
/// starts, so any may be missing yet.
pub(crate) struct PostmasterPid {
    pub pid: Option<i32>,
    pub port: Option<u16>,
    /// The first unix socket directory: empty until the server made its sockets, and for
    /// good when it makes none.
    pub socket_dir: Option<String>,
    /// The first TCP listen address (`*` for all), once it listens.
    pub listen_addr: Option<String>,
    /// The System V shared memory segment's id (line 7: key and id).
    pub shmid: Option<i32>,
    /// `starting`, `ready`, `standby`, `stopping`: written once every socket is made.
    pub status: Option<String>,
}

impl PostmasterPid {
    /// Where to reach the server, once it has made its sockets: its unix socket directory,
    /// else its TCP address. `None` while it is still starting. Never a default like `/tmp`,
    /// where another server may answer on the same port.
    pub(crate) fn host(&self) -> Option<String> {
        self.status.as_ref()?;
        if let Some(dir) = &self.socket_dir {
            return Some(dir.clone());
        }
        match self.listen_addr.as_deref()? {
            "*" | "0.0.0.0" => Some("127.0.0.1".into()),
            "::" => Some("::1".into()),
            addr => Some(addr.to_string()),
        }
    }
}

impl PostmasterPid {
    /// `None` when `dir` has no postmaster.pid.
    pub(crate) fn read(dir: &Path) -> Option<PostmasterPid> {
        let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let field = |n: usize| lines.get(n).map(|l| l.trim());
        Some(PostmasterPid {
            pid: field(0).and_then(|l| l.parse().ok()),
            port: field(3).and_then(|l| l.parse().ok()),
            socket_dir: field(4).filter(|s| !s.is_empty()).map(str::to_string),
            listen_addr: field(5).filter(|s| !s.is_empty()).map(str::to_string),
            shmid: field(6)
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok()),
            status: field(7).filter(|s| !s.is_empty()).map(str::to_string),
        })
    }
}

/// Explains why the restored server stopped before promoting, from its log.
fn recovery_failure(plan: &PgPlan, log: &Path) -> anyhow::Error {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let fatal = text
        .lines()
        .rev()
        .find(|l| l.contains("FATAL") || l.contains("PANIC"))
        .unwrap_or("no FATAL line in the log")
        .to_string();
    if fatal.contains("recovery ended before configured recovery target was reached") {
        let target = match plan.target {
            Target::Time(t) => crate::timespec::show(t),
            Target::Latest => {
                let end = plan
                    .archive_end
                    .map_or("an unknown position".into(), |e| e.end.to_string());
                let why = text
                    .lines()
                    .rev()
                    .find(|l| l.contains("dbagent: error:"))
                    .map_or(String::new(), |l| format!(" ({})", l.trim()));
                // PostgreSQL logs how far it got before the refusal (in English servers).
                let after = |marker: &str| {
                    text.lines().rev().find_map(|l| {
                        l.split_once(marker)
                            .map(|(_, rest)| rest.trim().to_string())
                    })
                };
                let reached = after("redo done at ")
                    .and_then(|r| r.split_whitespace().next().map(str::to_string))
                    .map_or(String::new(), |r| format!(", after the record at {r}"));
                // A time target stops before the first commit after it, so a copy short of
                // the damage needs a time just before the last commit that could be replayed.
                let last = after("last completed transaction was at log time ")
                    .and_then(|t| crate::timespec::parse_instant(&t).ok())
                    .map_or(String::new(), |t| {
                        format!(
                            "; the last transaction it could replay committed at {}: `restore --at {}` restores everything before it",
                            crate::timespec::show(t),
                            crate::timespec::show(t - chrono::Duration::microseconds(1))
                        )
                    });
                return anyhow::anyhow!(
                    "recovery stopped short of the end of the archived WAL at {end} (in {}){reached}: WAL before the end could not be restored or read{why}; the server refused to promote, has stopped and archived nothing{last} (log: {})",
                    plan.last_wal,
                    log.display()
                );
            }
        };
        return anyhow::anyhow!(
            "PostgreSQL replayed all archived WAL without reaching {target}: no transaction committed after the target has been archived yet; restore with an earlier --at or with --latest (log: {})",
            log.display()
        );
    }
    // Another server holds the port (the backup's own, when no --port was given: a restore on
    // production's host): the data is all written, so a rerun with --delta writes nothing new.
    let taken = [
        "could not create any TCP/IP sockets",
        "could not create any Unix-domain sockets",
        ".s.PGSQL.",
    ];
    if fatal.contains("FATAL") && taken.iter().any(|t| fatal.contains(t)) {
        let line = text
            .lines()
            .find(|l| l.contains("Address already in use") || l.contains("Is another postmaster"))
            .unwrap_or(&fatal);
        // Without the log line's prefix (time, pid, level).
        let hint = ["LOG:", "FATAL:", "HINT:", "WARNING:"]
            .iter()
            .find_map(|level| line.split_once(level).map(|(_, rest)| rest))
            .unwrap_or(line)
            .trim();
        let again = if plan.backup.files.is_some() {
            "The restored data directory is complete: run this restore again with --delta --port <a free port>, which checks every file and rewrites only what differs, or free the port first"
        } else {
            "Empty the data directory and run this restore again with --port <a free port> (a streamed backup cannot be restored --delta), or free the port first"
        };
        return input_err!(
            "the restored server could not start: another server holds its port ({hint}). {again} (log: {})",
            log.display()
        );
    }
    // wal-fetch writes its own one-line errors into the server log: the most useful line.
    if let Some(line) = text.lines().rev().find(|l| l.contains("dbagent: error:")) {
        return anyhow::anyhow!(
            "the restored server stopped before promoting: {} (log: {})",
            line.trim(),
            log.display()
        );
    }
    anyhow::anyhow!(
        "the restored server stopped before promoting: {fatal} (log: {})",
        log.display()
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_starting_server_is_reached_only_where_it_listens() {
        let dir = tempfile::tempdir().unwrap();
        let host = |lines: &str| {
            std::fs::write(dir.path().join("postmaster.pid"), lines).unwrap();
            PostmasterPid::read(dir.path()).unwrap().host()
        };
        let head = "4242\n/data\n1733570000\n5433\n";
        // Just created: no socket yet, and no guess (another server may own /tmp's).
        assert_eq!(host(&format!("{head}\n\n")), None);
        assert_eq!(host(&format!("{head}/run/pg\n*\n")), None, "no status yet");
        assert_eq!(
            host(&format!("{head}/run/pg\n*\n  5433001  32768\nstarting\n")),
            Some("/run/pg".into())
        );
        // No unix socket at all: its TCP address.
        assert_eq!(
            host(&format!("{head}\n*\n  5433001  32768\nready\n")),
            Some("127.0.0.1".into())
        );
        assert_eq!(
            host(&format!("{head}\n10.0.0.5\n  5433001  32768\nready\n")),
            Some("10.0.0.5".into())
        );
    }

    /// What PostgreSQL's configuration parser makes of a quoted string (GUC_scanstr).
    fn conf_unquote(quoted: &str) -> String {
        let inner = &quoted[1..quoted.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => {}
                },
                '\'' => {
                    assert_eq!(chars.next(), Some('\''), "a lone quote in {quoted}");
                    out.push('\'');
                }
                c => out.push(c),
            }
        }
        out
    }

    /// PostgreSQL's replacement of %f, %p, %r and %% in restore_command.
    fn percent(cmd: &str, f: &str, p: &str) -> String {
        let mut out = String::new();
        let mut chars = cmd.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.peek() {
                Some('f') => out.push_str(f),
                Some('p') => out.push_str(p),
                Some('r') => out.push_str("000000010000000000000001"),
                Some('%') => out.push('%'),
                _ => {
                    out.push('%');
                    continue;
                }
            }
            chars.next();
        }
        out
    }

    #[test]
    fn a_landing_short_of_the_archive_end_names_both_positions() {
        use crate::repo::catalog::tests::{SEG, backup, catalog};
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4, 5]);
        let plan = plan::plan_pg(&c, Target::Latest, None).unwrap();
        let end = Lsn(5 * SEG + 0x1238);
        assert_eq!(short_landing(&plan, Some(end), end), None);
        assert_eq!(short_landing(&plan, Some(Lsn(6 * SEG)), end), None);
        assert_eq!(short_landing(&plan, None, end), None);
        // Inside the last segment, and before it.
        for reached in [Lsn(5 * SEG + 0x1230), Lsn(4 * SEG + 0x10)] {
            let why = short_landing(&plan, Some(reached), end).unwrap();
            assert!(why.contains(&format!("stopped at {reached}")), "{why}");
            assert!(why.contains("at 0/5001238"), "{why}");
            assert!(why.contains("000000010000000000000005"), "{why}");
        }
    }

    #[test]
    fn restore_command_survives_every_shell_metacharacter() {
        let dir = tempfile::tempdir().unwrap();
        let nasty =
            "a b'c\"d$(touch pwned)`touch pwned2`;e&f|g<h>i*j?k[l]m{n}o~p#q!r%s^t\\u\tv\nw%%f%p ";
        // The program's own path is nasty too (no '/' inside a name).
        let bin_dir = dir.path().join(nasty.replace('/', "_"));
        std::fs::create_dir(&bin_dir).unwrap();
        let exe = bin_dir.join("dbagent 'x'");
        std::fs::write(
            &exe,
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = format!("/etc/{nasty}.toml");
        let repo = format!("file:///srv/{nasty}");
        let cmd = restore_command_for(&exe.to_string_lossy(), Some(&config), Some(&repo), Some(2));

        // Through postgresql.auto.conf, then PostgreSQL's replacements, then /bin/sh -c.
        let line = recovery::quote(&cmd);
        assert!(!line.contains('\n'));
        let read_back = conf_unquote(&line);
        assert_eq!(read_back, cmd);
        let run = percent(
            &read_back,
            "000000010000000000000002",
            "pg_wal/RECOVERYXLOG",
        );
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&run)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let args: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(str::to_string)
            .collect();
        assert_eq!(
            args,
            [
                "--config",
                config.as_str(),
                "--repo",
                repo.as_str(),
                "wal-fetch",
                "--timeline",
                "2",
                "000000010000000000000002",
                "pg_wal/RECOVERYXLOG"
            ]
        );
        assert!(!dir.path().join("pwned").exists());
        assert!(!dir.path().join("pwned2").exists());
    }
}
