//! Real MariaDB servers started from the local binaries (mariadb-install-db + mariadbd).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{finish_tempdir, free_port, is_root, log_tail, run, tempdir_for, wait_until};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 3;

/// Path of a MariaDB binary: `$DBAGENT_MARIADB_BIN_DIR/<name>` if set, else the first match in
/// `$PATH`, /usr/sbin, /usr/bin; a clear error when it is missing.
pub fn mariadb_bin(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DBAGENT_MARIADB_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        crate::util::require_file(
            &path,
            &format!("MariaDB binary `{name}`"),
            "fix DBAGENT_MARIADB_BIN_DIR",
        )?;
        return Ok(path);
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "MariaDB binary `{name}` not found in $PATH, /usr/sbin or /usr/bin: install \
                 mariadb-server and mariadb-client (./scripts/setup) or set DBAGENT_MARIADB_BIN_DIR"
            )
        })
}

/// Configures and starts a fresh MariaDB server (binlog on, ROW format) in a temp dir.
#[derive(Debug, Clone)]
pub struct MariaDbBuilder {
    server_id: u32,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
    tls_only: bool,
}

impl Default for MariaDbBuilder {
    fn default() -> Self {
        Self {
            server_id: 1,
            settings: Vec::new(),
            env: Vec::new(),
            tls_only: false,
        }
    }
}

impl MariaDbBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// `--server-id` (default 1).
    pub fn server_id(mut self, id: u32) -> Self {
        self.server_id = id;
        self
    }

    /// An extra server option, as a `[mysqld]` line `key = value` would set it (passed to
    /// mariadbd as `--key=value`, after the defaults, so it wins).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// An environment variable of the server process (`TZ`: its `SYSTEM` time zone).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A server that takes connections only over TLS (`require_secure_transport`), with a
    /// certificate for `localhost` and `127.0.0.1` signed by a CA made for this server
    /// (`MariaDb::ca_cert_path`). The test's own client (`sql`) uses TLS too.
    pub fn tls_only(mut self) -> Self {
        self.tls_only = true;
        self
    }

    pub fn start(self) -> Result<MariaDb> {
        let install_db = mariadb_bin("mariadb-install-db")?;
        mariadb_bin("mariadbd")?;
        mariadb_bin("mariadb")?;
        mariadb_bin("mariadb-admin")?;
        let dir = tempdir_for("dbagent-mariadb-", None)?;
        let dir_path = dir.path().to_path_buf();
        let data_dir = dir_path.join("data");
        // A private tmpdir: a starting mariadbd deletes every `#sql*` file in its tmpdir, which
        // breaks a bootstrap running at the same time in a shared /tmp.
        let tmp_dir = dir_path.join("tmp");
        fs::create_dir(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
        let mut cmd = Command::new(install_db);
        cmd.current_dir(&dir_path)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data_dir.display()))
            .arg(format!("--tmpdir={}", tmp_dir.display()))
            .arg("--auth-root-authentication-method=normal")
            // Also skips the anonymous ''@localhost users, which would shadow 'user'@'%'.
            .arg("--skip-test-db");
        if is_root() {
            cmd.arg("--user=root");
        }
        run(&mut cmd, "mariadb-install-db")?;
        let mut settings = self.settings;
        let ca = match self.tls_only {
            false => None,
            true => {
                let ca = crate::tls::TestCa::generate()?;
                let server = ca.issue(&["localhost", "127.0.0.1"])?;
                let ca_path = dir_path.join("ca.pem");
                ca.write_pem(&ca_path)?;
                fs::write(dir_path.join("server-cert.pem"), &server.cert_pem)?;
                fs::write(dir_path.join("server-key.pem"), &server.key_pem)?;
                for (k, v) in [
                    ("ssl-ca", ca_path.display().to_string()),
                    (
                        "ssl-cert",
                        dir_path.join("server-cert.pem").display().to_string(),
                    ),
                    (
                        "ssl-key",
                        dir_path.join("server-key.pem").display().to_string(),
                    ),
                    ("require-secure-transport", "ON".to_string()),
                ] {
                    settings.insert(0, (k.to_string(), v));
                }
                Some(ca_path)
            }
        };
        let mut db = MariaDb {
            child: None,
            dir: Some(dir),
            dir_path,
            data_dir,
            port: free_port(),
            server_id: self.server_id,
            settings,
            env: self.env,
            ca,
        };
        db.launch()?;
        Ok(db)
    }
}

/// A running (or stopped) MariaDB server; killed on drop.
///
/// When dropped while the thread panics (a failed test), the tail of the error log is
/// printed to stderr and the temp dir is kept.
#[derive(Debug)]
pub struct MariaDb {
    child: Option<Child>,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    data_dir: PathBuf,
    port: u16,
    server_id: u32,
    settings: Vec<(String, String)>,
    env: Vec<(String, String)>,
    /// The CA of a TLS-only server.
    ca: Option<PathBuf>,
}

impl MariaDb {
    /// The CA certificate (PEM) of a `tls_only` server.
    pub fn ca_cert_path(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn socket(&self) -> PathBuf {
        self.dir_path.join("mysql.sock")
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server error log (`--log-error`).
    pub fn log_path(&self) -> PathBuf {
        self.dir_path.join("error.log")
    }

    pub fn server_id(&self) -> u32 {
        self.server_id
    }

    /// "mysql://root@127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("mysql://root@{}:{}", self.host(), self.port)
    }

    /// Runs `mariadb -N -B -e <sql>` as root over TCP; returns trimmed stdout.
    pub fn sql(&self, db: Option<&str>, sql: &str) -> Result<String> {
        let mut cmd = self.client("mariadb")?;
        cmd.args(["-N", "-B"]);
        if let Some(db) = db {
            cmd.arg(format!("--database={db}"));
        }
        cmd.arg("-e").arg(sql);
        let out = run(&mut cmd, &format!("mariadb on port {}", self.port))?;
        Ok(out.trim().to_string())
    }

    /// Loads the system's zoneinfo into the server's time zone tables, so that named zones
    /// (`SET GLOBAL time_zone = 'Asia/Tokyo'`) work.
    pub fn load_time_zones(&self) -> Result<()> {
        let mut tzinfo = Command::new(mariadb_bin("mariadb-tzinfo-to-sql")?)
            .arg("/usr/share/zoneinfo")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning mariadb-tzinfo-to-sql")?;
        let mut cmd = self.client("mariadb")?;
        cmd.arg("mysql").stdin(
            tzinfo
                .stdout
                .take()
                .context("mariadb-tzinfo-to-sql's output")?,
        );
        let loaded = cmd.output().context("running mariadb")?;
        let status = tzinfo.wait()?;
        if !loaded.status.success() {
            bail!(
                "loading the time zone tables failed: {}",
                String::from_utf8_lossy(&loaded.stderr)
            );
        }
        if !status.success() {
            bail!("mariadb-tzinfo-to-sql failed: {status}");
        }
        Ok(())
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Clean shutdown (`mariadb-admin shutdown`, SIGKILL after 60 s); idempotent.
    pub fn stop(&mut self) -> Result<()> {
        if !self.is_running() {
            self.child = None;
            return Ok(());
        }
        let mut cmd = self.client("mariadb-admin")?;
        cmd.arg("shutdown");
        let res = run(&mut cmd, "mariadb-admin shutdown");
        let child = self.child.as_mut().expect("running");
        let exited = wait_until(Duration::from_secs(60), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            self.kill();
            res?;
            bail!("mariadbd on port {} did not stop within 60 s", self.port);
        }
        self.child = None;
        Ok(())
    }

    /// SIGKILLs the server (for crash tests) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data dir and port (after stop/kill).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    fn client(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new(mariadb_bin(program)?);
        cmd.arg("--no-defaults")
            .args([
                "-h",
                self.host(),
                "-P",
                &self.port.to_string(),
                "-u",
                "root",
            ])
            .arg("--connect-timeout=10");
        if let Some(ca) = &self.ca {
            cmd.arg("--ssl")
                .arg(format!("--ssl-ca={}", ca.display()))
                .arg("--ssl-verify-server-cert");
        }
        Ok(cmd)
    }

    fn launch(&mut self) -> Result<()> {
        let mut last_err = None;
        for attempt in 0..START_ATTEMPTS {
            if attempt > 0 {
                self.port = free_port();
            }
            let log_len_before = fs::metadata(self.log_path()).map_or(0, |m| m.len());
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.kill();
                    let log = fs::read(self.log_path()).unwrap_or_default();
                    let new_log = String::from_utf8_lossy(
                        log.get(log_len_before as usize..).unwrap_or_default(),
                    );
                    let port_taken = new_log.contains("Address already in use");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let out_path = self.dir_path.join("mariadbd.out");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&out_path)
            .with_context(|| format!("opening {}", out_path.display()))?;
        let mut cmd = Command::new(mariadb_bin("mariadbd")?);
        cmd.current_dir(&self.dir_path)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data_dir.display()))
            .arg(format!("--tmpdir={}", self.dir_path.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.socket().display()))
            .arg(format!(
                "--log-bin={}",
                self.data_dir.join("binlog").display()
            ))
            .arg(format!("--server-id={}", self.server_id))
            .arg("--binlog-format=ROW")
            .arg(format!("--log-error={}", self.log_path().display()))
            .arg(format!(
                "--pid-file={}",
                self.dir_path.join("mariadbd.pid").display()
            ));
        if is_root() {
            cmd.arg("--user=root");
        }
        for (k, v) in &self.settings {
            cmd.arg(format!("--{k}={v}"));
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                bail!(
                    "mariadbd exited ({status}) during startup on port {}; last lines of {}:\n{}\n{}",
                    self.port,
                    self.log_path().display(),
                    log_tail(&self.log_path(), 30),
                    log_tail(&out_path, 10)
                );
            }
            let mut ping = self.client("mariadb-admin")?;
            ping.arg("--connect-timeout=2").arg("ping");
            if ping
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "mariadbd on port {} did not answer ping within {START_TIMEOUT:?}; last lines of {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    log_tail(&self.log_path(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.kill();
        let logs = [self.log_path(), self.dir_path.join("mariadbd.out")];
        finish_tempdir(
            &format!("mariadb on port {}", self.port),
            self.dir.take(),
            &logs,
        );
    }
}

/// A primary (server_id 1) and a replica (server_id 2), both with binlog, ROW format and
/// log_slave_updates. The replica replicates from the primary with
/// `MASTER_USE_GTID=slave_pos` as user `repl`/`repl`; returns once Slave_IO_Running and
/// Slave_SQL_Running are Yes.
pub fn mariadb_replica_pair() -> Result<(MariaDb, MariaDb)> {
    let primary = MariaDbBuilder::new()
        .server_id(1)
        .setting("log_slave_updates", "ON")
        .start()
        .context("starting primary")?;
    let replica = MariaDbBuilder::new()
        .server_id(2)
        .setting("log_slave_updates", "ON")
        .start()
        .context("starting replica")?;
    primary.sql(
        None,
        "CREATE USER 'repl'@'%' IDENTIFIED BY 'repl'; \
         GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';",
    )?;
    replica.sql(
        None,
        &format!(
            "CHANGE MASTER TO MASTER_HOST='{}', MASTER_PORT={}, MASTER_USER='repl', \
             MASTER_PASSWORD='repl', MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos; \
             START SLAVE;",
            primary.host(),
            primary.port()
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = replica_status(&replica)?;
        let field = |name: &str| {
            status
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if field("Slave_IO_Running") == Some("Yes") && field("Slave_SQL_Running") == Some("Yes") {
            return Ok((primary, replica));
        }
        if Instant::now() >= deadline {
            bail!(
                "replica did not start replicating within 30 s: Slave_IO_Running={:?} \
                 Slave_SQL_Running={:?} Last_IO_Error={:?} Last_SQL_Error={:?}",
                field("Slave_IO_Running"),
                field("Slave_SQL_Running"),
                field("Last_IO_Error"),
                field("Last_SQL_Error")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `SHOW SLAVE STATUS` as (column, value) pairs (empty when replication is not configured).
pub fn replica_status(db: &MariaDb) -> Result<Vec<(String, String)>> {
    // Vertical output with column names ("   Slave_IO_Running: Yes"); `-N` would drop the names.
    let mut cmd = db.client("mariadb")?;
    cmd.arg("-e").arg("SHOW SLAVE STATUS\\G");
    let out = run(
        &mut cmd,
        &format!("SHOW SLAVE STATUS on port {}", db.port()),
    )?;
    Ok(out
        .lines()
        .filter(|l| !l.starts_with('*'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}
