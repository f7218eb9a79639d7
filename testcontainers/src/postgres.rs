//! Real PostgreSQL servers started from the local binaries (initdb + pg_ctl).

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{
    chmod, chown_recursive, finish_tempdir, free_port, is_root, kill_tree_and_wait, log_tail,
    pid_alive, require_file, run, shell_quote, tempdir_for, user_ids,
};

/// The OS user PostgreSQL runs as when the tests run as root.
pub const PG_OS_USER: &str = "postgres";
/// Default location of the PostgreSQL server binaries.
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
const LOG_FILE: &str = "postgres.log";
const START_ATTEMPTS: usize = 3;

/// A temp dir that the postgres OS user can read and write (chowned to postgres when root; 0700).
pub fn pg_owned_tempdir() -> Result<TempDir> {
    tempdir_for("dbagent-pg-", Some(PG_OS_USER))
}

/// Wraps a program so it runs as the postgres OS user when we are root
/// (`runuser -u postgres -- <program>`), else as is.
///
/// `runuser -u` (without `-l`) keeps the caller's environment, so variables set with
/// `.env()` on the returned command reach the program; only HOME, SHELL, USER and LOGNAME
/// are reset to the postgres user's values. Remember that the program must be able to read
/// the current directory and any path it is given (see [`pg_owned_tempdir`]).
pub fn command_as_pg_user(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", PG_OS_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// Directory of the PostgreSQL binaries: `$DBAGENT_PG_BIN_DIR` or /usr/lib/postgresql/15/bin.
pub fn pg_bin_dir() -> PathBuf {
    std::env::var_os("DBAGENT_PG_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_BIN_DIR))
}

/// Path of one PostgreSQL binary, with a clear error when it is missing.
pub fn pg_bin(name: &str) -> Result<PathBuf> {
    let path = pg_bin_dir().join(name);
    require_file(
        &path,
        &format!("PostgreSQL binary `{name}`"),
        "install postgresql-15 (./scripts/setup) or set DBAGENT_PG_BIN_DIR",
    )?;
    Ok(path)
}

/// Quotes a value for postgresql.conf: `'...'` with `'` doubled and `\` escaped.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', r"\\").replace('\'', "''"))
}

fn c_utf8_locale_available() -> bool {
    Command::new("locale")
        .arg("-a")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                let l = l.trim().to_ascii_lowercase();
                l == "c.utf8" || l == "c.utf-8"
            })
        })
}

/// Configures and starts a fresh PostgreSQL cluster in a temp dir.
#[derive(Debug, Clone, Default)]
pub struct PostgresBuilder {
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
    /// The `postgres` role's password when the server is TLS-only.
    tls_only: Option<String>,
}

impl PostgresBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `archive_mode = on` and `archive_command`.
    pub fn archive_command(self, cmd: &str) -> Self {
        self.setting("archive_mode", "on")
            .setting("archive_command", cmd)
    }

    /// An extra postgresql.conf line `key = 'value'` (appended after the defaults, so it wins).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// An environment variable for the postmaster (archive_command and friends inherit it).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A server that takes TCP connections only over TLS with a password (`hostssl` lines
    /// with `scram-sha-256`, no `host` line), with a certificate for `localhost` and
    /// `127.0.0.1` signed by a CA made for this server (`Postgres::ca_cert_path`). The unix
    /// socket keeps `trust` for the test's own setup (`Postgres::psql`).
    pub fn tls_only(mut self, password: &str) -> Self {
        self.tls_only = Some(password.to_string());
        self
    }

    /// initdb + start with `pg_ctl -w` on a free port, listening on 127.0.0.1 and in the temp dir.
    pub fn start(self) -> Result<Postgres> {
        let initdb = pg_bin("initdb")?;
        pg_bin("pg_ctl")?;
        pg_bin("postgres")?;
        let dir = pg_owned_tempdir()?;
        let dir_path = dir.path().to_path_buf();
        let data_dir = dir_path.join("data");
        let locale = if c_utf8_locale_available() {
            "C.UTF-8"
        } else {
            "C"
        };
        let mut cmd = command_as_pg_user(&initdb);
        cmd.current_dir(&dir_path)
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", "postgres", "-E", "UTF8"]);
        let pwfile = dir_path.join("pwfile");
        match &self.tls_only {
            None => {
                cmd.arg("--auth=trust");
            }
            Some(password) => {
                fs::write(&pwfile, format!("{password}\n"))?;
                if is_root() {
                    let (uid, gid) = user_ids(PG_OS_USER)?;
                    chown_recursive(&pwfile, uid, gid)?;
                }
                cmd.args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                    .arg(format!("--pwfile={}", pwfile.display()));
            }
        }
        cmd.arg(format!("--locale={locale}"))
            // Skips only the fsync of the freshly initialised files; the server keeps fsync=on.
            .arg("--no-sync");
        run(&mut cmd, "initdb")?;
        let _ = fs::remove_file(&pwfile);
        let mut settings = self.settings;
        let ca_cert = match &self.tls_only {
            None => None,
            Some(_) => {
                let ca = crate::tls::TestCa::generate()?;
                let server = ca.issue(&["localhost", "127.0.0.1"])?;
                let ca_path = dir_path.join("ca.crt");
                ca.write_pem(&ca_path)?;
                fs::write(data_dir.join("server.crt"), &server.cert_pem)?;
                fs::write(data_dir.join("server.key"), &server.key_pem)?;
                fs::write(
                    data_dir.join("pg_hba.conf"),
                    "# dbagent-testcontainers: TLS only over TCP, no plain host line\n\
                     local all all trust\n\
                     local replication all trust\n\
                     hostssl all all 127.0.0.1/32 scram-sha-256\n\
                     hostssl replication all 127.0.0.1/32 scram-sha-256\n",
                )?;
                if is_root() {
                    let (uid, gid) = user_ids(PG_OS_USER)?;
                    chown_recursive(&data_dir, uid, gid)?;
                    chown_recursive(&ca_path, uid, gid)?;
                }
                chmod(&data_dir.join("server.key"), 0o600)?;
                for (k, v) in [
                    ("ssl", "on"),
                    ("ssl_cert_file", "server.crt"),
                    ("ssl_key_file", "server.key"),
                    ("password_encryption", "scram-sha-256"),
                ] {
                    settings.insert(0, (k.to_string(), v.to_string()));
                }
                Some(ca_path)
            }
        };

        let port = free_port();
        let mut conf = String::from("\n# --- dbagent-testcontainers ---\n");
        let base = [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("port", port.to_string()),
            (
                "unix_socket_directories",
                dir_path.to_string_lossy().into_owned(),
            ),
            ("wal_level", "replica".to_string()),
            ("max_wal_senders", "10".to_string()),
            ("logging_collector", "off".to_string()),
            ("log_line_prefix", "%m [%p] %q%u@%d ".to_string()),
        ];
        for (k, v) in base
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        {
            conf.push_str(&format!("{k} = {}\n", conf_quote(v)));
        }
        append_conf(&data_dir, &conf)?;

        let mut pg = Postgres {
            dir: Some(dir),
            dir_path,
            data_dir,
            port,
            server_env: self.env,
            tls: ca_cert.map(|ca| (ca, self.tls_only.clone().unwrap_or_default())),
            cmdline_settings: false,
            owns_data: true,
            data_destroyed: false,
            pid: None,
        };
        pg.launch()?;
        Ok(pg)
    }
}

/// The PID on the first line of a PostgreSQL lock file (postmaster.pid, .s.PGSQL.N.lock).
fn lock_file_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn append_conf(data_dir: &Path, text: &str) -> Result<()> {
    let path = data_dir.join("postgresql.conf");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// A running (or stopped) PostgreSQL server; stopped (immediate) on drop.
///
/// When dropped while the thread panics (a failed test), the tail of the server log is
/// printed to stderr and the temp dir is kept.
#[derive(Debug)]
pub struct Postgres {
    /// Temp dir holding the log, the unix socket and (for fresh clusters) the data dir.
    dir: Option<TempDir>,
    dir_path: PathBuf,
    data_dir: PathBuf,
    port: u16,
    server_env: Vec<(String, String)>,
    /// TLS-only servers: the CA certificate's path and the `postgres` role's password.
    tls: Option<(PathBuf, String)>,
    /// Pass port/listen/socket/logging settings on the postgres command line (adopted data dirs,
    /// whose postgresql.conf belongs to the caller) instead of postgresql.conf.
    cmdline_settings: bool,
    owns_data: bool,
    data_destroyed: bool,
    /// PID of the postmaster we started, while we believe it runs.
    pid: Option<u32>,
}

impl Postgres {
    /// Adopts an existing data directory (e.g. one a restore produced) and starts it on a free
    /// port with the same logging and drop behaviour. Port, listen address, socket directory and
    /// logging are passed on the command line, so they override the directory's own
    /// configuration. When we are root the directory is chowned (recursively) to postgres and
    /// made 0700, as PostgreSQL requires. The directory is NOT deleted on drop, but the server is
    /// stopped.
    pub fn start_existing(data_dir: &Path, extra_env: &[(&str, &str)]) -> Result<Postgres> {
        pg_bin("pg_ctl")?;
        pg_bin("postgres")?;
        if !data_dir.join("PG_VERSION").exists() {
            bail!(
                "{} is not a PostgreSQL data directory (no PG_VERSION)",
                data_dir.display()
            );
        }
        let data_dir = fs::canonicalize(data_dir)
            .with_context(|| format!("canonicalize {}", data_dir.display()))?;
        if is_root() {
            let (uid, gid) = user_ids(PG_OS_USER)?;
            chown_recursive(&data_dir, uid, gid)?;
        }
        chmod(&data_dir, 0o700)?;
        let dir = pg_owned_tempdir()?;
        let mut pg = Postgres {
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            data_dir,
            port: free_port(),
            server_env: extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tls: None,
            cmdline_settings: true,
            owns_data: false,
            data_destroyed: false,
            pid: None,
        };
        pg.launch()?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (pg_ctl -l), in the temp dir.
    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join(LOG_FILE)
    }

    /// The directory holding the unix socket (and the log).
    pub fn socket_dir(&self) -> &Path {
        &self.dir_path
    }

    /// A TLS-only server's CA certificate (for PGSSLROOTCERT).
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|(ca, _)| ca.as_path())
    }

    /// A TLS-only server's password for the `postgres` role.
    pub fn password(&self) -> Option<&str> {
        self.tls.as_ref().map(|(_, pw)| pw.as_str())
    }

    /// PGHOST, PGPORT, PGUSER=postgres, PGDATABASE=postgres, PGDATA; for a TLS-only server
    /// also PGSSLMODE=verify-full and PGSSLROOTCERT (the password is the test's to pass).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = self.plain_env();
        if let Some((ca, _)) = &self.tls {
            env.push(("PGSSLMODE".into(), "verify-full".into()));
            env.push(("PGSSLROOTCERT".into(), ca.to_string_lossy().into_owned()));
        }
        env
    }

    fn plain_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), self.host().into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGDATABASE".into(), "postgres".into()),
            (
                "PGDATA".into(),
                self.data_dir.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// A libpq connection string for `db`.
    pub fn conn_string(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.host(),
            self.port
        )
    }

    /// Runs `psql -X -q -t -A -v ON_ERROR_STOP=1 -d <db> -c <sql>`; returns trimmed stdout.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let psql = pg_bin("psql")?;
        let mut cmd = Command::new(psql);
        // A TLS-only server is set up over its unix socket (trust there).
        let host = match &self.tls {
            Some(_) => self.dir_path.to_string_lossy().into_owned(),
            None => self.host().to_string(),
        };
        cmd.args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &host, "-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", db, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        let out = run(&mut cmd, &format!("psql on port {}", self.port))?;
        Ok(out.trim().to_string())
    }

    /// Whether the postmaster we started is still alive.
    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(pid_alive)
    }

    /// PID of the running postmaster, if any.
    pub fn pid(&self) -> Option<u32> {
        self.pid.filter(|p| pid_alive(*p))
    }

    /// `pg_ctl stop -m fast -w`; idempotent.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode("fast")
    }

    /// Starts the server again (after [`stop`](Self::stop) or [`kill`](Self::kill)) on the same
    /// port and data dir, with the same environment. Stops it first (fast) if it runs.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        if self.data_destroyed {
            bail!(
                "data dir {} was destroyed; use Postgres::start_existing",
                self.data_dir.display()
            );
        }
        self.launch()
    }

    /// SIGKILLs the postmaster and all its descendants (backends, checkpointer, walwriter,
    /// archiver, ...) at once, simulating a crash, and waits until they are gone. The
    /// postmaster.pid file stays behind, as after a real crash.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            if !kill_tree_and_wait(pid, Duration::from_secs(10)) {
                eprintln!("dbagent-testcontainers: postmaster {pid} survived SIGKILL for 10 s");
            }
        }
    }

    /// Stops the server and deletes the data directory's contents, keeping the empty directory
    /// (owned by postgres, 0700). Returns its path.
    pub fn destroy_data(&mut self) -> Result<PathBuf> {
        if self.stop().is_err() {
            self.kill();
        }
        for entry in fs::read_dir(&self.data_dir)
            .with_context(|| format!("read_dir {}", self.data_dir.display()))?
        {
            let path = entry?.path();
            let res = if fs::symlink_metadata(&path)?.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.with_context(|| format!("removing {}", path.display()))?;
        }
        self.data_destroyed = true;
        Ok(self.data_dir.clone())
    }

    fn pg_ctl(&self) -> Result<Command> {
        let mut cmd = command_as_pg_user(pg_bin("pg_ctl")?);
        cmd.current_dir(&self.dir_path)
            .arg("-D")
            .arg(&self.data_dir);
        Ok(cmd)
    }

    /// PID from postmaster.pid, if the file exists and parses.
    fn pidfile_pid(&self) -> Option<u32> {
        lock_file_pid(&self.data_dir.join("postmaster.pid"))
    }

    fn stop_mode(&mut self, mode: &str) -> Result<()> {
        let Some(pid) = self.pid else {
            return Ok(());
        };
        if !pid_alive(pid) {
            self.pid = None;
            return Ok(());
        }
        if self.pidfile_pid() == Some(pid) {
            let mut cmd = self.pg_ctl()?;
            cmd.args(["stop", "-w", "-t", "60", "-m", mode]);
            if let Err(e) = run(&mut cmd, &format!("pg_ctl stop -m {mode}")) {
                if pid_alive(pid) {
                    return Err(e);
                }
            }
        }
        if !crate::util::wait_until(Duration::from_secs(10), || !pid_alive(pid)) {
            bail!("postmaster {pid} still alive after pg_ctl stop -m {mode}");
        }
        self.pid = None;
        Ok(())
    }

    /// `pg_ctl start -w`, retrying on another port if the port was taken meanwhile.
    fn launch(&mut self) -> Result<()> {
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 {
                self.port = free_port();
                if !self.cmdline_settings {
                    append_conf(&self.data_dir, &format!("port = {}\n", self.port))?;
                }
            }
            let log_len_before = fs::metadata(self.log_path()).map_or(0, |m| m.len());
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let log = fs::read(self.log_path()).unwrap_or_default();
                    let new_log = String::from_utf8_lossy(
                        log.get(log_len_before as usize..).unwrap_or_default(),
                    );
                    let port_taken = new_log.contains("Address already in use")
                        || new_log.contains("could not create any TCP/IP sockets");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        let err = last_err.expect("at least one attempt");
        Err(err.context(format!(
            "starting PostgreSQL in {} failed; last lines of {}:\n{}",
            self.data_dir.display(),
            self.log_path().display(),
            log_tail(&self.log_path(), 30)
        )))
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        // After a SIGKILL the postmaster stays a zombie on this machine (PID 1 does not reap
        // orphans), and PostgreSQL treats a zombie PID in postmaster.pid as a running server.
        // A lock file whose PID is dead or a zombie is stale: remove it.
        // The same holds for the unix socket's lock file.
        let socket_locks = fs::read_dir(&self.dir_path)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with(".s.PGSQL.") && n.ends_with(".lock"))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for lock in socket_locks
            .into_iter()
            .chain([self.data_dir.join("postmaster.pid")])
        {
            if lock_file_pid(&lock).is_some_and(|pid| !pid_alive(pid)) {
                let _ = fs::remove_file(&lock);
            }
        }
        let mut cmd = self.pg_ctl()?;
        cmd.args(["start", "-w", "-t", "60", "-l"])
            .arg(self.log_path());
        if self.cmdline_settings {
            let opts = [
                "listen_addresses=127.0.0.1".to_string(),
                format!("port={}", self.port),
                format!("unix_socket_directories={}", self.dir_path.display()),
                "logging_collector=off".to_string(),
            ]
            .iter()
            .map(|s| format!("-c {}", shell_quote(s)))
            .collect::<Vec<_>>()
            .join(" ");
            cmd.arg("-o").arg(opts);
        }
        cmd.envs(self.server_env.iter().map(|(k, v)| (k, v)));
        run(&mut cmd, "pg_ctl start")?;
        let pid = self
            .pidfile_pid()
            .context("pg_ctl start succeeded but postmaster.pid is missing")?;
        self.pid = Some(pid);
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut pid = self.pid.filter(|p| pid_alive(*p));
        // The code under test may have restarted our server itself (new PID).
        if pid.is_none() && self.owns_data && !self.data_destroyed {
            pid = self.pidfile_pid().filter(|p| pid_alive(*p));
            self.pid = pid;
        }
        if let Some(pid) = pid {
            if self.pidfile_pid() == Some(pid) {
                let _ = self.stop_mode("immediate");
            }
            if pid_alive(pid) {
                kill_tree_and_wait(pid, Duration::from_secs(10));
            }
        }
        finish_tempdir(
            &format!("postgres on port {}", self.port),
            self.dir.take(),
            &[self.log_path()],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_conf_values() {
        assert_eq!(conf_quote("a'b"), "'a''b'");
        assert_eq!(conf_quote(r"c:\x %p"), r"'c:\\x %p'");
    }
}
