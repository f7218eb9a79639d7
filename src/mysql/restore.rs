//! `dbagent restore --engine mysql`: the plan first (pure, in `plan`), then load the dump and
//! replay the binlogs up to the target through one client connection.
//!
//! The target is either an existing, empty server (`DBAGENT_MYSQL_URL`) or a scratch server
//! that dbagent initialises in `--target-dir` and leaves running. Replay is one
//! `mysqlbinlog --start-position=P [--stop-datetime=T] file1 file2 … | mysql` pipeline, as the
//! MySQL manual prescribes: one invocation over all files keeps temporary tables and open
//! transactions that span a rotation intact. `mysqlbinlog` reads `--stop-datetime` in its own
//! time zone, so it runs with `TZ=UTC` and gets the target in UTC.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};

use super::MysqlRestoreOptions;
use super::client::{self, Programs};
use super::conn::MysqlConn;
use super::plan::{MysqlPlan, plan_mysql};
use super::server::Server;
use crate::config::{Config, MysqlConfig};
use crate::input_err;
use crate::proc::Program;
use crate::repo::mysql::{self as keys, Flavor, MysqlCatalog};
use crate::storage::Store;

/// Binlog files downloaded at once.
const DOWNLOADS_IN_FLIGHT: usize = 4;
/// How long a freshly initialised scratch server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the restore goes.
enum Destination {
    Existing(Box<Server>),
    Scratch(PathBuf),
}

pub async fn restore(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &MysqlRestoreOptions,
) -> anyhow::Result<()> {
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
    let uuid = match &cfg.mysql.server_uuid {
        Some(id) => id.clone(),
        None => choose_server(store.as_ref()).await?,
    };
    let cat = MysqlCatalog::load(store.as_ref(), &uuid).await?;
    let plan = plan_mysql(&cat, opts.target)?;

    let dest = match &opts.target_dir {
        Some(dir) => {
            // Find the server programs now: a missing one is an input error, before any write.
            ScratchPrograms::find(&cfg.mysql, plan.dump.flavor)?;
            Programs::find(&cfg.mysql, plan.dump.flavor)?;
            Destination::Scratch(dir.clone())
        }
        None => {
            let server = Server::connect(&cfg.mysql, MysqlConn::from_config(&cfg.mysql)?).await?;
            check_empty_target(&server, &plan).await?;
            Destination::Existing(Box::new(server))
        }
    };
    println!("{}", plan.describe());
    if opts.dry_run {
        println!("dry run: nothing was written");
        return Ok(());
    }

    match dest {
        Destination::Existing(server) => {
            let started = Instant::now();
            let work = WorkDir::temp()?;
            load_and_replay(
                store.as_ref(),
                &cat,
                &plan,
                &server.programs,
                &server.conn,
                work.path(),
            )
            .await
            .map_err(|e| {
                e.context(format!(
                    "the restore into {} stopped part-way: drop the databases it created before trying again",
                    server.conn.describe()
                ))
            })?;
            println!(
                "restored into {} in {:.1}s: dump {} plus {} binlog files",
                server.conn.describe(),
                started.elapsed().as_secs_f64(),
                plan.dump.id,
                plan.binlogs.len()
            );
        }
        Destination::Scratch(dir) => {
            let created = !dir.exists();
            let started = Instant::now();
            let result =
                restore_into_scratch(cfg, store.as_ref(), &cat, &plan, &dir, opts.port).await;
            match result {
                Ok(scratch) => {
                    println!(
                        "restored in {:.1}s: dump {} plus {} binlog files",
                        started.elapsed().as_secs_f64(),
                        plan.dump.id,
                        plan.binlogs.len()
                    );
                    println!("{}", scratch.how_to_use());
                }
                Err((e, scratch)) => {
                    if let Some(s) = scratch {
                        s.stop();
                    }
                    crate::restore::remove_contents(&dir, created);
                    return Err(e);
                }
            }
        }
    }
    Ok(())
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

/// Refuses a target that already holds databases, or is of the other family.
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
    let existing = server.user_databases().await?;
    if !existing.is_empty() {
        return Err(input_err!(
            "the target server {} is not empty (databases: {}): restore into an empty server, or into a scratch server with --target-dir",
            server.conn.describe(),
            existing.join(", ")
        ));
    }
    Ok(())
}

/// A directory for downloaded binlogs, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn temp() -> anyhow::Result<WorkDir> {
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

    fn inside(dir: &Path) -> anyhow::Result<WorkDir> {
        let dir = dir.join("dbagent-binlogs");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn load_and_replay(
    store: &dyn Store,
    cat: &MysqlCatalog,
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
    work: &Path,
) -> anyhow::Result<()> {
    tracing::info!(dump = %plan.dump.id, size = plan.dump.data.plain_bytes, "loading the dump");
    load_dump(store, plan, programs, conn).await?;
    if plan.binlogs.is_empty() {
        return Ok(());
    }
    tracing::info!(files = plan.binlogs.len(), "downloading binlogs");
    let files = download_binlogs(store, cat, plan, work).await?;
    tracing::info!(
        from = %plan.dump.binlog,
        stop = ?plan.stop_datetime,
        "replaying binlogs"
    );
    replay(plan, programs, conn, &files).await?;
    Ok(())
}

/// Streams the dump from the repository into the client, verifying its checksum.
async fn load_dump(
    store: &dyn Store,
    plan: &MysqlPlan,
    programs: &Programs,
    conn: &MysqlConn,
) -> anyhow::Result<()> {
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
    let jobs: Vec<(String, String, String, PathBuf)> = plan
        .binlogs
        .iter()
        .map(|name| {
            let meta = cat
                .binlogs
                .values()
                .find(|m| &m.name == name)
                .expect("planned binlogs are in the catalog");
            (
                name.clone(),
                meta.data.key.clone(),
                meta.data.sha256.clone(),
                work.join(name),
            )
        })
        .collect();
    let paths: Vec<PathBuf> = jobs.iter().map(|j| j.3.clone()).collect();
    futures::stream::iter(jobs)
        .map(|(name, key, sha, path)| async move {
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let (_, trailer) = crate::pipeline::download(
                store,
                &key,
                std::io::BufWriter::with_capacity(1 << 20, file),
            )
            .await
            .with_context(|| format!("downloading binlog {name}"))?;
            if trailer.sha256_hex() != sha {
                anyhow::bail!(
                    "binlog {name} is corrupt: it does not match the checksum recorded when it was archived"
                );
            }
            Ok(())
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
}

/// The programs that initialise and run a server.
struct ScratchPrograms {
    server: PathBuf,
    install: Option<PathBuf>,
}

impl ScratchPrograms {
    fn find(cfg: &MysqlConfig, flavor: Flavor) -> anyhow::Result<ScratchPrograms> {
        Ok(match flavor {
            Flavor::Mariadb => ScratchPrograms {
                server: client::program(cfg, &["mariadbd", "mysqld"])?,
                install: Some(client::program(
                    cfg,
                    &["mariadb-install-db", "mysql_install_db"],
                )?),
            },
            Flavor::Mysql => ScratchPrograms {
                server: client::program(cfg, &["mysqld"])?,
                install: None,
            },
        })
    }
}

/// A server dbagent initialised and started in the target directory.
struct Scratch {
    dir: PathBuf,
    cnf: PathBuf,
    socket: PathBuf,
    port: u16,
    pid: Option<u32>,
    flavor: Flavor,
}

impl Scratch {
    fn pid_file(&self) -> PathBuf {
        self.dir.join("mysqld.pid")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    /// Stops the server (used when the restore fails).
    fn stop(&self) {
        let pid = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .or(self.pid.map(|p| p as i32));
        if let Some(pid) = pid {
            // SAFETY: signalling the server process this restore started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn how_to_use(&self) -> String {
        let (client, admin, server) = match self.flavor {
            Flavor::Mariadb => ("mariadb", "mariadb-admin", "mariadbd"),
            Flavor::Mysql => ("mysql", "mysqladmin", "mysqld"),
        };
        format!(
            "the restored {} server is running on 127.0.0.1:{} (socket {}, data {}); it does not write binlogs and its event scheduler is off\n  connect: {client} --defaults-file={} (or -h 127.0.0.1 -P {} -u root)\n  stop:    {admin} --defaults-file={} shutdown\n  start:   {server} --defaults-file={} &",
            self.flavor,
            self.port,
            self.socket.display(),
            self.dir.join("data").display(),
            self.cnf.display(),
            self.port,
            self.cnf.display(),
            self.cnf.display()
        )
    }
}

async fn restore_into_scratch(
    cfg: &Config,
    store: &dyn Store,
    cat: &MysqlCatalog,
    plan: &MysqlPlan,
    dir: &Path,
    port: Option<u16>,
) -> Result<Scratch, (anyhow::Error, Option<Scratch>)> {
    let flavor = plan.dump.flavor;
    let programs = Programs::find(&cfg.mysql, flavor).map_err(|e| (e, None))?;
    let server_programs = ScratchPrograms::find(&cfg.mysql, flavor).map_err(|e| (e, None))?;
    let scratch = init_scratch(dir, port, flavor, &server_programs)
        .await
        .map_err(|e| (e, None))?;
    let scratch = match start_scratch(scratch, &server_programs).await {
        Ok(s) => s,
        Err((e, s)) => return Err((e, Some(s))),
    };
    let conn = MysqlConn::local_root(&scratch.socket, scratch.port);
    let work = match WorkDir::inside(dir) {
        Ok(w) => w,
        Err(e) => return Err((e, Some(scratch))),
    };
    let done = load_and_replay(store, cat, plan, &programs, &conn, work.path()).await;
    drop(work);
    match done {
        Ok(()) => Ok(scratch),
        Err(e) => {
            let e = e.context(format!(
                "the restore into a scratch server in {} failed and the directory was cleared",
                dir.display()
            ));
            Err((e, Some(scratch)))
        }
    }
}

async fn init_scratch(
    dir: &Path,
    port: Option<u16>,
    flavor: Flavor,
    programs: &ScratchPrograms,
) -> anyhow::Result<Scratch> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let port = match port {
        Some(p) => p,
        None => free_port()?,
    };
    let socket = dir.join("mysqld.sock");
    let data = dir.join("data");
    // A private tmpdir: a starting server deletes every `#sql*` file in its tmpdir, which
    // would pull temporary tables from under another server sharing /tmp.
    let tmp = dir.join("tmp");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    let mut cnf = format!(
        "# written by dbagent restore: the restored server's settings\n[mysqld]\ndatadir={}\ntmpdir={}\nport={port}\nbind-address=127.0.0.1\nsocket={}\npid-file={}\nlog-error={}\nskip-log-bin\nevent-scheduler=OFF\nmax-allowed-packet=1G\n",
        data.display(),
        tmp.display(),
        socket.display(),
        dir.join("mysqld.pid").display(),
        dir.join("error.log").display()
    );
    if as_root {
        cnf.push_str("user=root\n");
    }
    cnf.push_str(&format!(
        "\n[client]\nsocket={}\nport={port}\nuser=root\n",
        socket.display()
    ));
    let cnf_path = dir.join("my.cnf");
    std::fs::write(&cnf_path, cnf).with_context(|| format!("writing {}", cnf_path.display()))?;
    let defaults = format!("--defaults-file={}", cnf_path.display());
    let init = match (flavor, &programs.install) {
        (Flavor::Mariadb, Some(install)) => Program::new(install)
            .arg(&defaults)
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]),
        _ => Program::new(&programs.server)
            .arg(&defaults)
            .arg("--initialize-insecure"),
    };
    tracing::info!(dir = %dir.display(), "initialising a scratch server");
    init.current_dir(dir)
        .run()
        .on_failure(|exit| {
            anyhow::anyhow!(
                "initialising the scratch server in {} failed: {}",
                data.display(),
                crate::proc::telling_line(
                    &String::from_utf8_lossy(&exit.stdout)
                        .lines()
                        .chain(exit.stderr().lines())
                        .collect::<Vec<_>>()
                )
            )
        })
        .check()
        .await
        .context("initialising the scratch server")?;
    Ok(Scratch {
        dir: dir.to_path_buf(),
        cnf: cnf_path,
        socket,
        port,
        pid: None,
        flavor,
    })
}

async fn start_scratch(
    mut scratch: Scratch,
    programs: &ScratchPrograms,
) -> Result<Scratch, (anyhow::Error, Scratch)> {
    // Its own process group: the server outlives this command and a ^C to it.
    let child = Program::new(&programs.server)
        .arg(format!("--defaults-file={}", scratch.cnf.display()))
        .current_dir(&scratch.dir)
        .spawn_server(&scratch.dir.join("server.out"));
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Err((e, scratch)),
    };
    scratch.pid = Some(child.id());
    let conn = MysqlConn::local_root(&scratch.socket, scratch.port);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(scratch.log()).unwrap_or_default();
            let line = log
                .lines()
                .rev()
                .find(|l| l.contains("[ERROR]"))
                .unwrap_or("no [ERROR] line in the log")
                .to_string();
            return Err((
                anyhow::anyhow!(
                    "the scratch server exited during startup ({status}): {line} (log: {})",
                    scratch.log().display()
                ),
                scratch,
            ));
        }
        if let Ok(session) = conn.connect().await {
            let _ = session.disconnect().await;
            tracing::info!(port = scratch.port, "scratch server is up");
            return Ok(scratch);
        }
        if Instant::now() > deadline {
            return Err((
                anyhow::anyhow!(
                    "the scratch server did not accept connections within {}s (log: {})",
                    START_TIMEOUT.as_secs(),
                    scratch.log().display()
                ),
                scratch,
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A restore drill's scratch server: the dump is loaded by `start` (so exact row counts can be
/// checked against the dump's manifest), binlogs are replayed by `replay`, and the server is
/// stopped when this is dropped, whatever happened.
pub struct DrillServer {
    pub plan: MysqlPlan,
    cat: MysqlCatalog,
    programs: Programs,
    scratch: Scratch,
    dir: PathBuf,
}

impl DrillServer {
    /// Plans `target` for the repository's server; the error is the plan's refusal.
    pub async fn plan(
        cfg: &Config,
        store: &dyn Store,
        target: crate::restore::plan::Target,
    ) -> anyhow::Result<(MysqlCatalog, MysqlPlan)> {
        let uuid = match &cfg.mysql.server_uuid {
            Some(id) => id.clone(),
            None => choose_server(store).await?,
        };
        let cat = MysqlCatalog::load(store, &uuid).await?;
        let plan = plan_mysql(&cat, target)?;
        Ok((cat, plan))
    }

    /// Initialises and starts a scratch server in `dir` (private socket) and loads the dump.
    pub async fn start(
        cfg: &Config,
        store: &dyn Store,
        cat: MysqlCatalog,
        plan: MysqlPlan,
        dir: &Path,
    ) -> anyhow::Result<DrillServer> {
        let flavor = plan.dump.flavor;
        let programs = Programs::find(&cfg.mysql, flavor)?;
        let server_programs = ScratchPrograms::find(&cfg.mysql, flavor)?;
        let scratch = init_scratch(dir, None, flavor, &server_programs).await?;
        let scratch = match start_scratch(scratch, &server_programs).await {
            Ok(s) => s,
            Err((e, s)) => {
                s.stop();
                return Err(e);
            }
        };
        let server = DrillServer {
            plan,
            cat,
            programs,
            scratch,
            dir: dir.to_path_buf(),
        };
        load_dump(store, &server.plan, &server.programs, &server.conn()).await?;
        Ok(server)
    }

    pub fn conn(&self) -> MysqlConn {
        MysqlConn::local_root(&self.scratch.socket, self.scratch.port)
    }

    pub fn socket(&self) -> &Path {
        &self.scratch.socket
    }

    /// Replays the planned binlogs through one client connection.
    pub async fn replay(&self, store: &dyn Store) -> anyhow::Result<()> {
        if self.plan.binlogs.is_empty() {
            return Ok(());
        }
        let work = WorkDir::inside(&self.dir)?;
        let files = download_binlogs(store, &self.cat, &self.plan, work.path()).await?;
        replay(&self.plan, &self.programs, &self.conn(), &files).await
    }
}

impl Drop for DrillServer {
    fn drop(&mut self) {
        self.scratch.stop();
    }
}
