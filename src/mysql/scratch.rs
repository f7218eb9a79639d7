//! A scratch MySQL/MariaDB server: initialised by dbagent in a directory of its own, started on
//! a private socket (a drill's server: nothing else; a restore's: also 127.0.0.1 on a port), and
//! stopped when the value is dropped — whatever happened — unless the caller hands it over with
//! `leave_running` (a restore into `--target-dir` leaves its server running for the user).
//!
//! A copy of production must not be an open door: the drill's server takes no TCP at all, and
//! a server left running gets a random root password (every `root` account) before it is
//! handed over, written to `root-password` (mode 0600) and to its `my.cnf` (made 0600).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::client;
use super::conn::MysqlConn;
use crate::config::MysqlConfig;
use crate::input_err;
use crate::proc::Program;
use crate::repo::mysql::{Flavor, ServerTimeZone};

/// How long a freshly initialised scratch server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a clean shutdown of a restored server may take (InnoDB flushes its buffer pool).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// The programs that initialise and run a server.
pub struct ServerPrograms {
    server: PathBuf,
    install: Option<PathBuf>,
}

impl ServerPrograms {
    /// Finds them (a missing one is an input error, before anything is written).
    pub fn find(cfg: &MysqlConfig, flavor: Flavor) -> anyhow::Result<ServerPrograms> {
        Ok(match flavor {
            Flavor::Mariadb => ServerPrograms {
                server: client::program(cfg, &["mariadbd", "mysqld"])?,
                install: Some(client::program(
                    cfg,
                    &["mariadb-install-db", "mysql_install_db"],
                )?),
            },
            Flavor::Mysql => ServerPrograms {
                server: client::program(cfg, &["mysqld"])?,
                install: None,
            },
        })
    }
}

/// Where a scratch server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Its unix socket only (`skip-networking`): a drill's private copy.
    SocketOnly,
    /// Also 127.0.0.1, on this port or a free one: a restore the user connects to.
    Tcp(Option<u16>),
}

/// The server's option file (pure).
fn server_cnf(dir: &Path, listen: Listen, port: u16, as_root: bool) -> String {
    let network = match listen {
        Listen::SocketOnly => "skip-networking\n".to_string(),
        Listen::Tcp(_) => format!("port={port}\nbind-address=127.0.0.1\n"),
    };
    let mut cnf = format!(
        "# written by dbagent restore: the restored server's settings\n[mysqld]\ndatadir={}\ntmpdir={}\n{network}socket={}\npid-file={}\nlog-error={}\nskip-log-bin\nevent-scheduler=OFF\nmax-allowed-packet=1G\n",
        dir.join("data").display(),
        dir.join("tmp").display(),
        dir.join("mysqld.sock").display(),
        dir.join("mysqld.pid").display(),
        dir.join("error.log").display()
    );
    if as_root {
        cnf.push_str("user=root\n");
    }
    cnf.push_str(&format!(
        "\n[client]\nsocket={}\nport={port}\nuser=root\n",
        dir.join("mysqld.sock").display()
    ));
    cnf
}

/// 8 random hexadecimal digits (an account name no production server has).
fn random_hex() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A random password of 24 URL-safe characters (144 bits from the kernel).
fn random_password() -> anyhow::Result<String> {
    use base64::Engine as _;
    use std::io::Read;
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the root password")?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A server dbagent initialised and started; stopped on drop unless left running.
#[derive(Debug)]
pub struct ScratchServer {
    dir: PathBuf,
    cnf: PathBuf,
    socket: PathBuf,
    port: u16,
    pid: Option<u32>,
    /// The server when this process started it: reaped once killed (an unreaped child stays
    /// a zombie, which signal 0 still finds).
    child: Option<std::process::Child>,
    flavor: Flavor,
    keep: bool,
    /// Listen on 127.0.0.1 once handed over (`Listen::Tcp`): while it loads, its root has
    /// no password and it listens on its socket only.
    tcp: bool,
    server_program: PathBuf,
    /// Root's password once `lock_root` set it.
    root_password: Option<String>,
    /// dbagent's own account on it until it is handed over (user, password): what it loads
    /// and replays may change root's login (a password rotated on production replays here),
    /// never an account production does not have.
    admin: Option<(String, String)>,
    /// The server's `TZ`: the dumped server's `SYSTEM` zone (binlog events logged as
    /// statements evaluate `NOW()` in it), never this process's.
    tz: String,
    /// The dumped server's named global zone, once the time zone tables are loaded.
    zone: Option<String>,
}

impl ScratchServer {
    /// Initialises a server of `flavor` in `dir` (absent or empty) and starts it; `port` or a
    /// free one. On failure, whatever was started is stopped.
    /// `time_zone` is the dumped server's: this one runs in its `SYSTEM` offset (UTC for a
    /// dump that did not record it) and, when its global zone is a named one, gets the time
    /// zone tables and that zone.
    pub async fn start(
        cfg: &MysqlConfig,
        dir: &Path,
        listen: Listen,
        flavor: Flavor,
        time_zone: Option<&ServerTimeZone>,
    ) -> anyhow::Result<ScratchServer> {
        let programs = ServerPrograms::find(cfg, flavor)?;
        let mut server = Self::init(dir, listen, flavor, &programs).await?;
        server.tz = time_zone.map_or("UTC".into(), ServerTimeZone::posix_tz);
        server.run(&programs).await?;
        server.create_admin().await?;
        // Also with ROW events: DDL, events (`CREATE EVENT` after `SET time_zone`) and the
        // query events of sessions that used the zone name it.
        if let Some(tz) = time_zone.filter(|tz| tz.named()) {
            server.load_time_zones(cfg, &tz.global).await?;
            server.zone = Some(tz.global.clone());
        }
        Ok(server)
    }

    /// Loads the system's zoneinfo into the server's time zone tables and makes `zone` its
    /// global zone, as on the dumped server (binlog events name it).
    async fn load_time_zones(&self, cfg: &MysqlConfig, zone: &str) -> anyhow::Result<()> {
        // Each family's own: MariaDB's output does not load into MySQL 8.
        let tzinfo = match self.flavor {
            Flavor::Mariadb => &["mariadb-tzinfo-to-sql", "mysql_tzinfo_to_sql"][..],
            Flavor::Mysql => &["mysql_tzinfo_to_sql"][..],
        };
        let tzinfo = super::client::program(cfg, tzinfo)?;
        let client = super::client::Programs::find(cfg, self.flavor)?.client;
        let conn = self.conn();
        let options = conn.options_file()?;
        Program::new(&tzinfo)
            .arg("/usr/share/zoneinfo")
            .run()
            .pipe_into(
                Program::new(&client)
                    .arg(options.arg())
                    .arg("mysql")
                    .run()
                    .on_failure(|exit| {
                        anyhow::anyhow!(
                            "loading the time zone tables into the restored server failed: {}",
                            exit.telling_line()
                        )
                    }),
            )
            .await?;
        let mut session = conn.connect().await?;
        let set = mysql_async::prelude::Queryable::query_drop(
            &mut session,
            format!(
                "SET GLOBAL time_zone = '{}'",
                zone.replace('\\', "\\\\").replace('\'', "''")
            ),
        )
        .await;
        let _ = session.disconnect().await;
        set.map_err(|e| {
            input_err!(
                "the dumped server's time zone {zone:?} is not in this system's zoneinfo ({e}): install tzdata where dbagent runs"
            )
        })
    }

    /// dbagent's own account over the private socket while the server is dbagent's, root's
    /// once handed over.
    pub fn conn(&self) -> MysqlConn {
        let conn = MysqlConn::local_root(&self.socket, self.port);
        match (&self.admin, &self.root_password) {
            (Some((user, password)), _) => conn.as_user(user).with_password(password),
            (None, Some(p)) => conn.with_password(p),
            (None, None) => conn,
        }
    }

    /// Creates dbagent's own account (a random name and password, every privilege) on the
    /// freshly initialised server, whose root has no password yet, and uses it from here on.
    async fn create_admin(&mut self) -> anyhow::Result<()> {
        let user = format!("dbagent_restore_{}", random_hex()?);
        let password = random_password()?;
        let conn = self.conn();
        let mut session = conn.connect().await?;
        // As root has them: every privilege, and PROXY, which a dump's accounts grant on.
        let anyone = match self.flavor {
            Flavor::Mariadb => "''@'%'",
            Flavor::Mysql => "''@''",
        };
        let mut made = Ok(());
        for sql in [
            format!("CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}'"),
            format!("GRANT ALL PRIVILEGES ON *.* TO '{user}'@'localhost' WITH GRANT OPTION"),
            format!("GRANT PROXY ON {anyone} TO '{user}'@'localhost' WITH GRANT OPTION"),
        ] {
            made = mysql_async::prelude::Queryable::query_drop(&mut session, sql)
                .await
                .map_err(|e| conn.query_error(e))
                .context("creating dbagent's account on the scratch server");
            if made.is_err() {
                break;
            }
        }
        let _ = session.disconnect().await;
        made?;
        self.admin = Some((user, password));
        Ok(())
    }

    /// Hands the running server over: every `root` account gets a random password first
    /// (written to `root-password` and to `my.cnf`'s client section, both mode 0600), and the
    /// server is not stopped when this is dropped.
    pub async fn leave_running(mut self) -> anyhow::Result<RunningServer> {
        use std::os::unix::fs::PermissionsExt;
        let password_file = self.dir.join("root-password");
        // The option file with the listener it is handed over with (127.0.0.1 for a restore
        // the user connects to), and root's new password for the client programs.
        let tcp = self.tcp;
        let cnf_text = server_cnf(
            &self.dir,
            if tcp {
                Listen::Tcp(Some(self.port))
            } else {
                Listen::SocketOnly
            },
            self.port,
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
        );
        // The dumped server's named zone outlives a restart.
        let cnf_text = match &self.zone {
            Some(zone) => cnf_text.replacen(
                "[mysqld]\n",
                &format!("[mysqld]\ndefault-time-zone={zone}\n"),
                1,
            ),
            None => cnf_text,
        };
        let cnf = self.cnf.clone();
        let password = self
            .lock_root(
                &password_file,
                |password| {
                    std::fs::set_permissions(&cnf, std::fs::Permissions::from_mode(0o600))
                        .with_context(|| format!("protecting {}", cnf.display()))?;
                    std::fs::write(&cnf, format!("{cnf_text}password={password}\n"))
                        .with_context(|| format!("writing {}", cnf.display()))
                },
                tcp,
            )
            .await?;
        self.root_password = Some(password);
        if tcp {
            // Restarted to listen on 127.0.0.1: only now that root has a password.
            self.wait_shut_down().await?;
            let programs = ServerPrograms {
                server: self.server_program.clone(),
                install: None,
            };
            self.run(&programs).await?;
        }
        self.keep = true;
        Ok(RunningServer {
            flavor: self.flavor,
            port: self.port,
            socket: self.socket.clone(),
            data_dir: self.dir.join("data"),
            defaults_file: self.cnf.clone(),
            password_file,
        })
    }

    /// Gives every `root` account a random password, written first to `password_file` (mode
    /// 0600, created) and handed to `also` (a password the user cannot find would lock them
    /// out); then, with `shutdown`, shuts the server down on the same session (root's old
    /// login is gone).
    async fn lock_root(
        &mut self,
        password_file: &Path,
        also: impl FnOnce(&str) -> anyhow::Result<()>,
        shutdown: bool,
    ) -> anyhow::Result<String> {
        use std::os::unix::fs::OpenOptionsExt;
        let password = random_password()?;
        let conn = self.conn();
        let mut session = conn.connect().await?;
        let roots: Vec<String> = mysql_async::prelude::Queryable::query(
            &mut session,
            "SELECT Host FROM mysql.user WHERE User = 'root'",
        )
        .await
        .map_err(|e| conn.query_error(e))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(password_file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{password}\n").as_bytes()))
            .with_context(|| format!("writing {}", password_file.display()))?;
        also(&password)?;
        // A replayed DROP USER may have left no root: the hand-over makes one.
        if roots.is_empty() {
            for sql in [
                format!("CREATE USER 'root'@'localhost' IDENTIFIED BY '{password}'"),
                "GRANT ALL PRIVILEGES ON *.* TO 'root'@'localhost' WITH GRANT OPTION".into(),
            ] {
                mysql_async::prelude::Queryable::query_drop(&mut session, sql)
                    .await
                    .map_err(|e| conn.query_error(e))
                    .context("making a root account")?;
            }
        }
        for host in roots {
            let sql = format!(
                "ALTER USER 'root'@{} IDENTIFIED BY '{password}'",
                super::sql::quote_string(&host)
            );
            mysql_async::prelude::Queryable::query_drop(&mut session, sql)
                .await
                .map_err(|e| conn.query_error(e))
                .with_context(|| format!("setting the password of root@{host}"))?;
        }
        // dbagent's own account goes with the hand-over: root is the way in from here.
        if let Some((user, _)) = self.admin.take() {
            mysql_async::prelude::Queryable::query_drop(
                &mut session,
                format!("DROP USER '{user}'@'localhost'"),
            )
            .await
            .map_err(|e| conn.query_error(e))
            .with_context(|| format!("dropping dbagent's account {user}"))?;
        }
        match shutdown {
            // The server closes the connection as it goes: an error of the connection is the
            // expected answer, a refusal by the server is not.
            true => {
                if let Err(mysql_async::Error::Server(e)) =
                    mysql_async::prelude::Queryable::query_drop(&mut session, "SHUTDOWN").await
                {
                    anyhow::bail!("the restored server refused SHUTDOWN: {e}");
                }
            }
            false => {
                let _ = session.disconnect().await;
            }
        }
        Ok(password)
    }

    /// Leaves the restored server's data directory as `dest` itself (the scratch server runs
    /// in a directory inside it), for a container that mounts `dest` as its datadir: every
    /// `root` account gets a random password (in `dest/dbagent-root-password`, mode 0600),
    /// the server shuts down cleanly, its data directory's entries move up into `dest`, and
    /// the rest of the scratch layout (option file, socket, logs, tmpdir) goes. Returns the
    /// password file.
    pub async fn finish_as_datadir(mut self, dest: &Path) -> anyhow::Result<PathBuf> {
        let password_file = dest.join("dbagent-root-password");
        self.lock_root(&password_file, |_| Ok(()), true).await?;
        self.wait_shut_down().await?;
        self.keep = true;
        let data = self.dir.join("data");
        for entry in
            std::fs::read_dir(&data).with_context(|| format!("reading {}", data.display()))?
        {
            let entry = entry?;
            let to = dest.join(entry.file_name());
            std::fs::rename(entry.path(), &to).with_context(|| {
                format!("moving {} to {}", entry.path().display(), to.display())
            })?;
        }
        // The data directory is whole from here: what is left is the scratch layout's rest.
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove the scratch files; remove them by hand");
        }
        if let Err(e) = std::fs::File::open(dest).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dest.display(), error = %e, "could not sync the data directory");
        }
        Ok(password_file)
    }

    /// Waits until the server this process started has shut down cleanly (after SHUTDOWN).
    async fn wait_shut_down(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let status = loop {
            let child = self
                .child
                .as_mut()
                .context("the scratch server is not ours")?;
            if let Some(status) = child.try_wait().context("waiting for the scratch server")? {
                break status;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the restored server did not shut down within {}s: {}",
                    SHUTDOWN_TIMEOUT.as_secs(),
                    self.last_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if !status.success() {
            anyhow::bail!(
                "the restored server did not shut down cleanly ({status}): {}",
                self.last_error()
            );
        }
        self.child = None;
        self.pid = None;
        Ok(())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("error.log")
    }

    /// The last `[ERROR]` line of the server's log (a message outlives the log, which a
    /// failed restore clears with its directory).
    fn last_error(&self) -> String {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| l.contains("[ERROR]"))
            .unwrap_or("no [ERROR] line in its log")
            .to_string()
    }

    async fn init(
        dir: &Path,
        listen: Listen,
        flavor: Flavor,
        programs: &ServerPrograms,
    ) -> anyhow::Result<ScratchServer> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let port = match listen {
            Listen::Tcp(Some(p)) => p,
            // A socket-only server still names a port (clients read it), never listened on.
            Listen::Tcp(None) | Listen::SocketOnly => free_port()?,
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
        // Socket-only while it loads, whatever it is handed over with (`leave_running`).
        let cnf = server_cnf(dir, Listen::SocketOnly, port, as_root);
        let cnf_path = dir.join("my.cnf");
        std::fs::write(&cnf_path, cnf)
            .with_context(|| format!("writing {}", cnf_path.display()))?;
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
        Ok(ScratchServer {
            dir: dir.to_path_buf(),
            cnf: cnf_path,
            socket,
            port,
            pid: None,
            child: None,
            flavor,
            keep: false,
            tcp: matches!(listen, Listen::Tcp(_)),
            server_program: programs.server.clone(),
            root_password: None,
            admin: None,
            tz: "UTC".into(),
            zone: None,
        })
    }

    /// Starts the initialised server and waits until it accepts connections.
    async fn run(&mut self, programs: &ServerPrograms) -> anyhow::Result<()> {
        // Its own process group: the server outlives this command and a ^C to it.
        let child = Program::new(&programs.server)
            .env("TZ", &self.tz)
            .arg(format!("--defaults-file={}", self.cnf.display()))
            .current_dir(&self.dir)
            .spawn_server(&self.dir.join("server.out"))?;
        self.pid = Some(child.id());
        let conn = self.conn();
        let deadline = Instant::now() + START_TIMEOUT;
        let child = self.child.insert(child);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log()).unwrap_or_default();
                let line = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("[ERROR]"))
                    .unwrap_or("no [ERROR] line in the log");
                anyhow::bail!(
                    "the scratch server exited during startup ({status}): {line} (log: {})",
                    self.log().display()
                );
            }
            if let Ok(session) = conn.connect().await {
                let _ = session.disconnect().await;
                tracing::info!(port = self.port, "scratch server is up");
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the scratch server did not accept connections within {}s (log: {})",
                    START_TIMEOUT.as_secs(),
                    self.log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills the server (a scratch copy: nothing in it needs a clean shutdown) and waits a
    /// little for it to go.
    fn stop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("mysqld.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .or(self.pid.map(|p| p as i32));
        let Some(pid) = pid else {
            return;
        };
        // SAFETY: signalling the server process this command started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let gone = match self.child.as_mut().filter(|c| c.id() as i32 == pid) {
                Some(child) => !matches!(child.try_wait(), Ok(None)),
                // SAFETY: signal 0 only checks that the process exists.
                None => (unsafe { libc::kill(pid, 0) }) != 0,
            };
            if gone || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        if !self.keep {
            self.stop();
        }
    }
}

/// A restored server left running for the user, and how to use it.
#[derive(Debug, Serialize)]
pub struct RunningServer {
    pub flavor: Flavor,
    pub port: u16,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub defaults_file: PathBuf,
    /// The random root password, mode 0600.
    pub password_file: PathBuf,
}

impl std::fmt::Display for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (client, admin, server) = match self.flavor {
            Flavor::Mariadb => ("mariadb", "mariadb-admin", "mariadbd"),
            Flavor::Mysql => ("mysql", "mysqladmin", "mysqld"),
        };
        let cnf = self.defaults_file.display();
        write!(
            f,
            "the restored {} server is running on 127.0.0.1:{} (socket {}, data {}); it does not write binlogs and its event scheduler is off\n  root's password is random, in {} (mode 0600, also in {cnf})\n  connect: {client} --defaults-file={cnf} (or -h 127.0.0.1 -P {} -u root -p)\n  stop:    {admin} --defaults-file={cnf} shutdown\n  start:   {server} --defaults-file={cnf} &",
            self.flavor,
            self.port,
            self.socket.display(),
            self.data_dir.display(),
            self.password_file.display(),
            self.port,
        )
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drill_server_takes_no_tcp_and_a_restored_one_only_on_loopback() {
        let dir = Path::new("/scratch");
        let drill = server_cnf(dir, Listen::SocketOnly, 3307, false);
        assert!(drill.contains("\nskip-networking\n"), "{drill}");
        assert!(
            !drill.contains("bind-address") && !drill.contains("\nport=3307\n["),
            "{drill}"
        );
        let mysqld = drill.split("[client]").next().unwrap();
        assert!(!mysqld.contains("port="), "{mysqld}");
        let restore = server_cnf(dir, Listen::Tcp(Some(3307)), 3307, false);
        assert!(
            restore.contains("port=3307\nbind-address=127.0.0.1\n"),
            "{restore}"
        );
        assert!(!restore.contains("skip-networking"));
        let pw = random_password().unwrap();
        assert_eq!(pw.len(), 24);
        assert!(
            pw.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(pw, random_password().unwrap());
    }
}
