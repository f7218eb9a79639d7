//! Fixtures shared by the end-to-end tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dbagent_testcontainers::{
    Postgres, PostgresBuilder, S3Server, command_as_pg_user, pg_bin, pg_owned_tempdir,
};
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_dbagent");

/// Where a test's repository lives.
pub enum Repo {
    File(TempDir),
    S3(S3Server, String),
}

impl Repo {
    pub fn file() -> Repo {
        Repo::File(pg_owned_tempdir().expect("temp dir for the repository"))
    }

    pub fn s3(prefix: &str) -> Repo {
        Repo::S3(
            S3Server::start("dbagent-test").expect("S3 server"),
            prefix.to_string(),
        )
    }

    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            Repo::File(dir) => vec![(
                "DBAGENT_REPO".into(),
                format!("file://{}", dir.path().display()),
            )],
            Repo::S3(server, prefix) => server.env(prefix),
        }
    }

    pub fn root(&self) -> Option<&Path> {
        match self {
            Repo::File(dir) => Some(dir.path()),
            Repo::S3(..) => None,
        }
    }

    /// Every file in a file repository with its size: to prove a command wrote nothing.
    pub fn snapshot(&self) -> BTreeMap<PathBuf, u64> {
        let mut out = BTreeMap::new();
        if let Some(root) = self.root() {
            walk(root, &mut out);
        }
        out
    }
}

/// The repository may be live (an upload renaming its temp file, PostgreSQL archiving): an
/// entry that vanishes between the listing and its size is simply not there any more.
fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            match e.metadata() {
                Ok(m) => {
                    out.insert(p.clone(), m.len());
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => panic!("reading {}: {err}", p.display()),
            }
        }
    }
}

/// A primary that archives through `dbagent wal-push` into `repo`.
pub fn archiving_primary(repo: &Repo) -> Postgres {
    let mut b = PostgresBuilder::new()
        .archive_command(&format!("{BIN} wal-push %p"))
        .setting("archive_timeout", "0");
    for (k, v) in repo.env() {
        b = b.env(&k, &v);
    }
    b.start().expect("start PostgreSQL primary")
}

/// Runs dbagent (as the postgres OS user when root, as PostgreSQL would) with the repository's
/// and the server's environment.
pub fn dbagent(repo: &Repo, pg: Option<&Postgres>, args: &[&str]) -> Output {
    dbagent_cmd(repo, pg, args).output().expect("run dbagent")
}

/// The command `dbagent` runs, for callers that add environment or spawn it.
pub fn dbagent_cmd(repo: &Repo, pg: Option<&Postgres>, args: &[&str]) -> Command {
    let mut cmd = command_as_pg_user(BIN);
    cmd.args(args)
        .env("DBAGENT_LOG_FORMAT", "text")
        .env_remove("DBAGENT_CONFIG");
    for (k, v) in repo.env() {
        cmd.env(k, v);
    }
    if let Some(pg) = pg {
        for (k, v) in pg.env() {
            cmd.env(k, v);
        }
    }
    cmd.env(
        "DBAGENT_PG_BIN_DIR",
        pg_bin("pg_ctl").unwrap().parent().unwrap(),
    );
    cmd.current_dir("/tmp");
    cmd
}

/// `argv` run in a PID namespace of its own (`unshare --pid --fork`), as in a container, with
/// `env_from`'s environment: its first process is `argv[0]`'s, or what that execs into.
pub fn in_own_pid_namespace(
    env_from: &Command,
    argv: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> Command {
    let mut cmd = Command::new("unshare");
    if !dbagent_testcontainers::is_root() {
        cmd.args(["--user", "--map-root-user"]);
    }
    cmd.args(["--pid", "--fork"]).args(argv).current_dir("/tmp");
    for (k, v) in env_from.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "dbagent failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts exit code 1 with exactly one line on stderr containing `needle`.
pub fn refused(out: &Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(lines[0].starts_with("dbagent: error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
    stderr
}

/// Switches WAL and waits until the switched-out segment is archived.
pub fn switch_and_wait_archived(pg: &Postgres) {
    let seg = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .expect("pg_switch_wal");
    wait_archived(pg, &seg);
}

pub fn wait_archived(pg: &Postgres, seg: &str) {
    for _ in 0..600 {
        let last = pg
            .psql(
                "postgres",
                "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
            )
            .unwrap();
        // A .backup or .history file may be the latest; compare segment names only.
        if last.len() >= 24 && &last[..24] >= seg {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "segment {seg} was not archived in 60 s; log:\n{}",
        dbagent_testcontainers::log_tail(&pg.log_path(), 40)
    );
}

/// `dbagent restore ARGS --target-dir DIR --port N` on a free port (without `--port` when
/// ARGS say `--no-start`, which refuses it): the output and the restored server.
pub fn restore(repo: &Repo, dir: &Path, args: &[&str]) -> (Output, Restored) {
    let port = dbagent_testcontainers::free_port();
    let mut all = vec!["restore"];
    all.extend_from_slice(args);
    let port_s = port.to_string();
    all.extend(["--target-dir", dir.to_str().unwrap()]);
    if !args.contains(&"--no-start") {
        all.extend(["--port", &port_s]);
    }
    let out = dbagent(repo, None, &all);
    (
        out,
        Restored {
            dir: dir.to_path_buf(),
            port,
        },
    )
}

/// A server that `dbagent restore` started; stopped on drop.
pub struct Restored {
    pub dir: PathBuf,
    pub port: u16,
}

impl Restored {
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let out = Command::new(pg_bin("psql").unwrap())
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = command_as_pg_user(pg_bin("pg_ctl").unwrap())
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        if std::thread::panicking() {
            let log = self.dir.join("dbagent-restore.log");
            eprintln!(
                "--- restored server log {} ---\n{}",
                log.display(),
                dbagent_testcontainers::log_tail(&log, 60)
            );
        }
    }
}

/// SIGKILL a process and its descendants (runuser → dbagent → pg_dump …).
pub fn kill_tree(pid: u32) {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        if let Ok(children) =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", pids[i], pids[i]))
        {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for p in pids.iter().rev() {
        // SAFETY: sending a signal to processes this test started.
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
}

/// Runs `cmd` to its end, or kills it (and its children) and fails the test after `limit`.
pub fn run_within(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            kill_tree(child.id());
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}
