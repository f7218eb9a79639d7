//! `dbagent restore --engine mysql`: the plan first (pure, in `plan`), then load the dump and
//! replay the binlogs up to the target (`load`).
//!
//! The target is either an existing, empty server (`DBAGENT_MYSQL_URL`) or a scratch server
//! that dbagent initialises in `--target-dir` and leaves running (`scratch`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use super::MysqlRestoreOptions;
use super::client::Programs;
use super::conn::MysqlConn;
use super::load::{WorkDir, fetch_binlogs, load_dump, replay_files};
use super::plan::{MysqlPlan, plan_mysql};
use super::scratch::{Listen, RunningServer, ScratchServer, ServerPrograms};
use super::server::Server;
use crate::config::Config;
use crate::input_err;
use crate::repo::mysql::{self as keys, MysqlCatalog};
use crate::restore::plan::Target;
use crate::storage::Store;

/// What `restore --engine mysql` did (or, on a dry run, would do).
#[derive(Debug, Serialize)]
pub struct MysqlRestoreReport {
    pub plan: String,
    pub dry_run: bool,
    pub dump: String,
    pub binlogs: usize,
    pub seconds: Option<f64>,
    /// The existing server restored into.
    pub into: Option<String>,
    /// The scratch server dbagent started in `--target-dir` and left running.
    pub server: Option<RunningServer>,
}

impl std::fmt::Display for MysqlRestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.plan)?;
        let Some(seconds) = self.seconds else {
            return f.write_str("dry run: nothing was written");
        };
        let what = format!("dump {} plus {} binlog files", self.dump, self.binlogs);
        match (&self.into, &self.server) {
            (Some(into), _) => write!(f, "restored into {into} in {seconds:.1}s: {what}"),
            (None, Some(server)) => write!(f, "restored in {seconds:.1}s: {what}\n{server}"),
            (None, None) => write!(f, "restored in {seconds:.1}s: {what}"),
        }
    }
}

/// Where the restore goes.
enum Destination {
    Existing(Box<Server>),
    Scratch(PathBuf),
}

/// Plans `target` for the repository's server (the configured one, or the only one there).
pub async fn plan(
    cfg: &Config,
    store: &dyn Store,
    target: Target,
) -> anyhow::Result<(MysqlCatalog, MysqlPlan)> {
    let cat = catalog(cfg, store).await?;
    let plan = plan_mysql(&cat, target)?;
    Ok((cat, plan))
}

/// The catalog of the repository's server (the configured one, or the only one there).
pub async fn catalog(cfg: &Config, store: &dyn Store) -> anyhow::Result<MysqlCatalog> {
    let uuid = match &cfg.mysql.server_uuid {
        Some(id) => id.clone(),
        None => choose_server(store).await?,
    };
    MysqlCatalog::load(store, &uuid).await
}

pub async fn restore(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &MysqlRestoreOptions,
) -> anyhow::Result<MysqlRestoreReport> {
    if let Some(dir) = &opts.target_dir {
        crate::restore::check_target_dir(dir)?;
        if let Some(port) = opts.port {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                return Err(input_err!(
                    "port {port} on 127.0.0.1 is in use: choose a free one with --port, or leave --port out"
                ));
            }
        }
    } else if cfg.mysql.url.is_none() {
        return Err(input_err!(
            "restore --engine mysql needs --target-dir <dir> (dbagent starts a scratch server there) or DBAGENT_MYSQL_URL (an existing, empty server)"
        ));
    }
    let (cat, plan) = plan(cfg, store.as_ref(), opts.target).await?;

    let dest = match &opts.target_dir {
        Some(dir) => {
            // Find the server programs now: a missing one is an input error, before any write.
            ServerPrograms::find(&cfg.mysql, plan.dump.flavor)?;
            Programs::find(&cfg.mysql, plan.dump.flavor)?;
            Destination::Scratch(dir.clone())
        }
        None => {
            let server = Server::connect(&cfg.mysql, MysqlConn::from_config(&cfg.mysql)?).await?;
            check_empty_target(&server, &plan).await?;
            Destination::Existing(Box::new(server))
        }
    };
    let mut report = MysqlRestoreReport {
        plan: plan.describe(),
        dry_run: opts.dry_run,
        dump: plan.dump.id.clone(),
        binlogs: plan.binlogs.len(),
        seconds: None,
        into: None,
        server: None,
    };
    if opts.dry_run {
        return Ok(report);
    }
    // A reader without the keys of the dump or of a binlog is refused before anything starts.
    let mut needed: Vec<_> = plan.dump.data.needs().into_iter().collect();
    needed.extend(
        cat.binlogs
            .values()
            .filter(|m| plan.binlogs.contains(&m.name))
            .filter_map(|m| m.data.needs()),
    );
    needed.sort();
    needed.dedup();
    crate::pipeline::check_readable(store.as_ref(), &needed).await?;
    if let (Destination::Existing(server), Some(tz)) = (&dest, &plan.dump.time_zone)
        && !plan.binlogs.is_empty()
        && !tz.binlog_format.eq_ignore_ascii_case("ROW")
    {
        // An existing server keeps its own clock: say so when it differs.
        let theirs = server.time_zone().await?;
        if theirs.system_offset_seconds != tz.system_offset_seconds {
            tracing::warn!(
                dumped = %format!("{} (UTC{:+}s)", tz.system, tz.system_offset_seconds),
                target = %format!("{} (UTC{:+}s)", theirs.system, theirs.system_offset_seconds),
                binlog_format = %tz.binlog_format,
                "the target server's SYSTEM time zone is not the dumped server's: binlog events logged as statements put NOW() into DATETIME columns in the target's zone; start it with the dumped server's TZ, or restore with --target-dir"
            );
        }
    }
    eprintln!("{}", report.plan);

    let started = Instant::now();
    // SIGTERM or ^C drops the work: the load or replay programs are killed, a scratch server
    // is stopped and its directory cleared, and the restore fails saying so.
    let work = async {
        match dest {
            Destination::Existing(server) => {
                let work = WorkDir::temp()?;
                let (programs, conn) = (&server.programs, &server.conn);
                // Every binlog is fetched and verified while the server is still untouched.
                let binlogs = fetch_binlogs(store.as_ref(), &cat, &plan, work.path())
                    .await
                    .context("nothing was loaded into the target server")?;
                async {
                    load_dump(store.as_ref(), &plan, programs, conn).await?;
                    replay_files(&plan, programs, conn, &binlogs).await
                }
                .await
                .map_err(|e: anyhow::Error| {
                    e.context(format!(
                        "the restore into {} stopped part-way: drop the databases it created before trying again",
                        server.conn.describe()
                    ))
                })?;
                report.into = Some(server.conn.describe());
            }
            Destination::Scratch(dir) => {
                let cleared = ClearOnFailure::new(dir.clone());
                // With --no-start the server runs in a directory inside the target, whose
                // data directory then becomes the target itself.
                let (scratch, listen) = match opts.no_start {
                    true => (dir.join(".dbagent-restore"), Listen::SocketOnly),
                    false => (dir.clone(), Listen::Tcp(opts.port)),
                };
                let server = ScratchServer::start(
                    &cfg.mysql,
                    &scratch,
                    listen,
                    plan.dump.flavor,
                    plan.dump.time_zone.as_ref(),
                )
                .await?;
                let programs = Programs::find(&cfg.mysql, plan.dump.flavor)?;
                let work = WorkDir::inside(&scratch)?;
                let conn = server.conn();
                async {
                    let binlogs = fetch_binlogs(store.as_ref(), &cat, &plan, work.path()).await?;
                    load_dump(store.as_ref(), &plan, &programs, &conn).await?;
                    replay_files(&plan, &programs, &conn, &binlogs).await
                }
                .await
                .map_err(|e: anyhow::Error| {
                    e.context(format!(
                        "the restore into a scratch server in {} failed and the directory was cleared",
                        dir.display()
                    ))
                })?;
                drop(work);
                if opts.no_start {
                    let password = server.finish_as_datadir(&dir).await.with_context(|| {
                        format!(
                            "leaving {} as the restored server's data directory failed, and the directory was cleared",
                            dir.display()
                        )
                    })?;
                    // MariaDB's identity in the repository is its hostname and server_id, which
                    // the volume swap keeps, while its binlogs start again at .000001.
                    let identity = match plan.dump.flavor {
                        crate::repo::mysql::Flavor::Mariadb => {
                            "; give the server that starts on it a new server_id (or set mysql.server_uuid for it), or binlog shipping refuses its new binlogs under names the old history archived"
                        }
                        crate::repo::mysql::Flavor::Mysql => "",
                    };
                    report.into = Some(format!(
                        "{}, a stopped server's data directory (root's password is random, in {}, mode 0600){identity}",
                        dir.display(),
                        password.display()
                    ));
                } else {
                    report.server = Some(server.leave_running().await?);
                }
                cleared.disarm();
            }
        }
        anyhow::Ok(())
    };
    until_interrupted(work).await?;
    report.seconds = Some(started.elapsed().as_secs_f64());
    Ok(report)
}

const STOPPED: &str = "the load and replay were stopped; a --target-dir was cleared and its server stopped, an existing server keeps what was loaded so far (drop those databases before trying again)";

/// Runs `work` to its end, or until SIGTERM or ^C, when it is dropped (everything it started
/// stops) and the restore fails.
async fn until_interrupted(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())
        .map_err(|e| anyhow::anyhow!("listening for SIGTERM: {e}"))?;
    tokio::select! {
        r = work => r,
        _ = sigterm.recv() => Err(anyhow::anyhow!("restore interrupted by SIGTERM: {STOPPED}")),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("restore interrupted: {STOPPED}")),
    }
}

/// Empties a target directory the restore filled, when the restore fails (after its server
/// was stopped: declared first, dropped last).
struct ClearOnFailure {
    dir: PathBuf,
    created: bool,
    armed: bool,
}

impl ClearOnFailure {
    fn new(dir: PathBuf) -> ClearOnFailure {
        ClearOnFailure {
            created: !dir.exists(),
            dir,
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ClearOnFailure {
    fn drop(&mut self) {
        if self.armed {
            crate::restore::remove_contents(&self.dir, self.created);
        }
    }
}

/// Which server in the repository: the only one there.
async fn choose_server(store: &dyn Store) -> anyhow::Result<String> {
    let found = keys::servers(store).await?;
    match found.as_slice() {
        [] => Err(input_err!(
            "the repository holds no MySQL dumps or binlogs: check --repo, or run `dbagent backup --engine mysql` first"
        )),
        [one] => Ok(one.clone()),
        many => Err(input_err!(
            "the repository holds several MySQL servers ({}): choose one with DBAGENT_MYSQL_SERVER_UUID",
            many.join(", ")
        )),
    }
}

/// Refuses a target that already holds databases with anything in them, or is of the other
/// family.
async fn check_empty_target(server: &Server, plan: &MysqlPlan) -> anyhow::Result<()> {
    if server.facts.flavor != plan.dump.flavor {
        return Err(input_err!(
            "the dump is from {} but {} runs {} ({}): restore into a {} server",
            plan.dump.flavor,
            server.conn.describe(),
            server.facts.flavor,
            server.facts.version,
            plan.dump.flavor
        ));
    }
    let existing = server.databases_in_use().await?;
    if !existing.is_empty() {
        return Err(input_err!(
            "the target server {} is not empty (databases: {}): restore into an empty server, or into a scratch server with --target-dir",
            server.conn.describe(),
            existing.join(", ")
        ));
    }
    Ok(())
}
