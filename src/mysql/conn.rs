//! One MySQL/MariaDB server's connection settings, parsed once from `DBAGENT_MYSQL_URL`
//! (`mysql://user@host:port[?socket=/path]`) and the password file. They give both the
//! `mysql_async` options dbagent's own queries use and the private option file the client
//! programs (dump, load, binlog replay) read.
//!
//! The password never goes on a command line: every program gets a private option file
//! (mode 0600 in a 0700 directory, removed afterwards) as its `--defaults-file`.
//!
//! TLS (`mysql.ssl_mode`, `mysql.ssl_ca`) applies to both: `mysql_async` over rustls, and the
//! option file's `ssl*` lines, written for MariaDB's and MySQL's programs at once with the
//! `loose-` prefix (each ignores the other's options instead of refusing to start). Over a
//! unix socket there is no TLS, as the clients themselves do.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use mysql_async::{Opts, OptsBuilder};

use crate::config::{MysqlConfig, Secret};
use crate::error::Failure;
use crate::input_err;

/// Option files live in `<tmp>/dbagent-mysql-<pid>-…/`.
const OPTION_DIR_PREFIX: &str = "dbagent-mysql-";
/// How long a command waits for the server to answer a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Server error codes that mean "cannot log in here": the user's settings are wrong (exit 1).
const LOGIN_ERRORS: [u16; 4] = [1044, 1045, 1049, 1698];

/// `mysql.ssl_mode`, in MySQL's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disabled,
    /// The client programs' default (TLS when the server offers it); dbagent's own
    /// connections go without TLS (`mysql_async` cannot fall back).
    Preferred,
    /// TLS, any certificate.
    Required,
    /// TLS, a certificate from `mysql.ssl_ca` (MariaDB's programs check the host name too:
    /// they have no CA-only check).
    VerifyCa,
    /// TLS, a certificate from `mysql.ssl_ca` for the host name connected to.
    VerifyIdentity,
}

impl SslMode {
    pub const NAMES: &'static [&'static str] = &[
        "disabled",
        "preferred",
        "required",
        "verify_ca",
        "verify_identity",
    ];

    fn parse(s: &str) -> anyhow::Result<SslMode> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "disabled" => SslMode::Disabled,
            "preferred" => SslMode::Preferred,
            "required" => SslMode::Required,
            "verify_ca" => SslMode::VerifyCa,
            "verify_identity" => SslMode::VerifyIdentity,
            other => {
                return Err(input_err!(
                    "mysql.ssl_mode: expected one of {}, got {other:?}",
                    Self::NAMES.join(", ")
                ));
            }
        })
    }
}

/// TLS settings for one server.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// `None`: nothing configured (the programs' defaults).
    pub mode: Option<SslMode>,
    pub ca: Option<PathBuf>,
}

impl Tls {
    pub fn from_config(cfg: &MysqlConfig) -> anyhow::Result<Tls> {
        let mode = cfg.ssl_mode.as_deref().map(SslMode::parse).transpose()?;
        if let Some(ca) = &cfg.ssl_ca {
            std::fs::metadata(ca).map_err(|e| {
                input_err!(
                    "mysql.ssl_ca (DBAGENT_MYSQL_SSL_CA): cannot read {}: {e}",
                    ca.display()
                )
            })?;
        }
        Ok(Tls {
            mode,
            ca: cfg.ssl_ca.clone(),
        })
    }

    /// The `mysql_async` TLS options; `None` for no TLS.
    fn ssl_opts(&self) -> Option<mysql_async::SslOpts> {
        let roots = || self.ca.iter().map(|p| p.clone().into()).collect();
        let opts = mysql_async::SslOpts::default();
        match self.mode? {
            SslMode::Disabled | SslMode::Preferred => None,
            SslMode::Required => Some(
                opts.with_danger_accept_invalid_certs(true)
                    .with_danger_skip_domain_validation(true),
            ),
            SslMode::VerifyCa => Some(
                opts.with_root_certs(roots())
                    .with_disable_built_in_roots(self.ca.is_some())
                    .with_danger_skip_domain_validation(true),
            ),
            SslMode::VerifyIdentity => Some(
                opts.with_root_certs(roots())
                    .with_disable_built_in_roots(self.ca.is_some()),
            ),
        }
    }

    /// The `[client]` lines for the programs.
    fn option_lines(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        let Some(mode) = self.mode else {
            return Ok(text);
        };
        let (mariadb, mysql) = match mode {
            SslMode::Disabled => ("loose-skip-ssl\n", "DISABLED"),
            SslMode::Preferred => ("", "PREFERRED"),
            SslMode::Required => ("loose-ssl\nloose-skip-ssl-verify-server-cert\n", "REQUIRED"),
            SslMode::VerifyCa => ("loose-ssl\nloose-ssl-verify-server-cert\n", "VERIFY_CA"),
            SslMode::VerifyIdentity => (
                "loose-ssl\nloose-ssl-verify-server-cert\n",
                "VERIFY_IDENTITY",
            ),
        };
        text.push_str(mariadb);
        text.push_str(&format!("loose-ssl-mode={mysql}\n"));
        if let Some(ca) = &self.ca {
            if mode != SslMode::Disabled {
                text.push_str(&format!(
                    "ssl-ca={}\n",
                    option_value(&ca.to_string_lossy())?
                ));
            }
        }
        Ok(text)
    }
}

/// Connection settings for one server.
#[derive(Debug, Clone)]
pub struct MysqlConn {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub socket: Option<PathBuf>,
    password: Option<Secret>,
    tls: Tls,
}

impl MysqlConn {
    /// The server `DBAGENT_MYSQL_URL` names.
    pub fn from_config(cfg: &MysqlConfig) -> anyhow::Result<MysqlConn> {
        let Some(url) = &cfg.url else {
            return Err(input_err!(
                "no MySQL server configured: set DBAGENT_MYSQL_URL=mysql://user@host:port (and DBAGENT_MYSQL_PASSWORD_FILE)"
            ));
        };
        let mut conn = Self::parse(url, cfg.password.clone())?;
        conn.tls = Tls::from_config(cfg)?;
        Ok(conn)
    }

    /// Parses `mysql://user@host:port[?socket=/path]` (or `mariadb://…`). A password in the
    /// URL is refused: it would show in the process list.
    pub fn parse(url: &str, password: Option<Secret>) -> anyhow::Result<MysqlConn> {
        let parsed = url::Url::parse(url)
            .map_err(|e| input_err!("DBAGENT_MYSQL_URL: {e}: expected mysql://user@host:port"))?;
        if parsed.scheme() != "mysql" && parsed.scheme() != "mariadb" {
            return Err(input_err!(
                "DBAGENT_MYSQL_URL: expected mysql://user@host:port"
            ));
        }
        if parsed.password().is_some() {
            return Err(input_err!(
                "DBAGENT_MYSQL_URL must not carry a password: put it in DBAGENT_MYSQL_PASSWORD_FILE"
            ));
        }
        let user = match parsed.username() {
            "" => "root".to_string(),
            u => percent_decode(u),
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .to_string();
        let socket = parsed
            .query_pairs()
            .find(|(k, _)| k == "socket")
            .map(|(_, v)| PathBuf::from(v.into_owned()));
        Ok(MysqlConn {
            user,
            host,
            port: parsed.port().unwrap_or(3306),
            socket,
            password,
            tls: Tls::default(),
        })
    }

    /// A scratch server's root account over its unix socket.
    pub fn local_root(socket: &Path, port: u16) -> MysqlConn {
        MysqlConn {
            user: "root".into(),
            host: "localhost".into(),
            port,
            socket: Some(socket.to_path_buf()),
            password: None,
            tls: Tls::default(),
        }
    }

    /// Another account on the same server.
    pub fn as_user(mut self, user: &str) -> MysqlConn {
        self.user = user.to_string();
        self
    }

    /// The same account with a password.
    pub fn with_password(mut self, password: &str) -> MysqlConn {
        self.password = Some(crate::config::Secret::new(password));
        self
    }

    pub fn describe(&self) -> String {
        match &self.socket {
            Some(s) => format!("{}@{} (socket {})", self.user, self.host, s.display()),
            None => format!("{}@{}:{}", self.user, self.host, self.port),
        }
    }

    /// The options for `mysql_async`: the socket when one is named, else TCP (never swapped
    /// for a local socket behind the user's back).
    pub fn opts(&self) -> Opts {
        let ssl = match self.socket {
            Some(_) => None,
            None => self.tls.ssl_opts(),
        };
        OptsBuilder::default()
            .user(Some(&self.user))
            .pass(self.password.as_ref().map(|p| p.expose()))
            .ip_or_hostname(&self.host)
            .tcp_port(self.port)
            .socket(self.socket.as_ref().map(|s| s.display().to_string()))
            .prefer_socket(self.socket.is_some())
            .stmt_cache_size(Some(16))
            // A server that vanished mid-query is noticed, not waited on for hours.
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .ssl_opts(ssl)
            .into()
    }

    /// Connects for a command. A server that cannot be reached or refuses the login is an input
    /// error (exit 1): the settings are wrong, not the operation.
    pub async fn connect(&self) -> anyhow::Result<mysql_async::Conn> {
        self.connect_within(CONNECT_TIMEOUT).await
    }

    pub async fn connect_within(&self, timeout: Duration) -> anyhow::Result<mysql_async::Conn> {
        match tokio::time::timeout(timeout, mysql_async::Conn::new(self.opts())).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.connect_error(e)),
            Err(_) => Err(self.cannot_connect(&format!("no answer within {}s", timeout.as_secs()))),
        }
    }

    fn connect_error(&self, e: mysql_async::Error) -> anyhow::Error {
        match e {
            mysql_async::Error::Server(e)
                if !LOGIN_ERRORS.contains(&e.code) && tls_hint(&e.message).is_none() =>
            {
                self.query_error(mysql_async::Error::Server(e))
            }
            mysql_async::Error::Server(e) => self.cannot_connect(&e.to_string()),
            e => self.cannot_connect(&e.to_string()),
        }
    }

    /// An error from a query on a connection that was made: the operation failed (exit 2).
    pub fn query_error(&self, e: mysql_async::Error) -> anyhow::Error {
        anyhow::anyhow!("MySQL at {}: {e}", self.describe())
    }

    fn cannot_connect(&self, why: &str) -> anyhow::Error {
        let without_tls = self.socket.is_none()
            && matches!(
                self.tls.mode,
                None | Some(SslMode::Disabled) | Some(SslMode::Preferred)
            );
        let hint = match tls_hint(why) {
            Some(hint) => hint,
            // MariaDB answers "access denied" to a client without TLS when it requires TLS.
            None if without_tls && why.contains("Access denied") => {
                "check DBAGENT_MYSQL_URL and DBAGENT_MYSQL_PASSWORD_FILE; a server that takes only TLS connections answers the same way: then set mysql.ssl_mode (DBAGENT_MYSQL_SSL_MODE) to verify_identity, with mysql.ssl_ca"
            }
            None => "check DBAGENT_MYSQL_URL and DBAGENT_MYSQL_PASSWORD_FILE",
        };
        anyhow::Error::new(Failure::Input(format!(
            "cannot connect to MySQL at {}: {why}: {hint}",
            self.describe()
        )))
    }

    /// Writes the private option file every client program of this connection reads.
    pub fn options_file(&self) -> anyhow::Result<OptionsFile> {
        let mut text = String::from("[client]\n");
        text.push_str(&format!("user={}\n", option_value(&self.user)?));
        text.push_str(&format!("host={}\n", option_value(&self.host)?));
        text.push_str(&format!("port={}\n", self.port));
        if let Some(s) = &self.socket {
            text.push_str(&format!("socket={}\n", option_value(&s.to_string_lossy())?));
        }
        if let Some(p) = &self.password {
            text.push_str(&format!("password={}\n", option_value(p.expose())?));
        }
        if self.socket.is_none() {
            text.push_str(&self.tls.option_lines()?);
        }
        // Only the interactive client knows this option; the dump program would refuse it.
        text.push_str(&format!(
            "[mysql]\nconnect-timeout={}\n",
            CONNECT_TIMEOUT.as_secs()
        ));
        OptionsFile::create(&text)
    }
}

/// What to fix when a connection failed over TLS (or for the lack of it).
pub fn tls_hint(why: &str) -> Option<&'static str> {
    let why = why.to_ascii_lowercase();
    if why.contains("certificate") || why.contains("unknownissuer") || why.contains("unknown ca") {
        Some(
            "the server's TLS certificate was refused: mysql.ssl_ca (DBAGENT_MYSQL_SSL_CA) must hold the CA that signed it, and under verify_identity the certificate must name the host in DBAGENT_MYSQL_URL",
        )
    } else if why.contains("insecure transport") || why.contains("secure transport") {
        Some(
            "the server takes only TLS connections: set mysql.ssl_mode (DBAGENT_MYSQL_SSL_MODE) to verify_identity (with mysql.ssl_ca) or required",
        )
    } else if why.contains("tls") || why.contains("ssl") {
        Some(
            "TLS failed: check mysql.ssl_mode (DBAGENT_MYSQL_SSL_MODE) and mysql.ssl_ca (DBAGENT_MYSQL_SSL_CA)",
        )
    } else {
        None
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(Ok(b)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Quotes a value for a MySQL option file. The option-file reader strips one pair of
/// surrounding quotes and cuts a `#` comment outside quotes; a value holding both quote
/// characters cannot be written safely, and is refused.
fn option_value(v: &str) -> anyhow::Result<String> {
    let escaped = v
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
        .replace('\t', "\\t");
    if !v.contains('"') {
        Ok(format!("\"{escaped}\""))
    } else if !v.contains('\'') {
        Ok(format!("'{escaped}'"))
    } else {
        Err(input_err!(
            "the MySQL user name or password contains both ' and \": the MySQL option-file format cannot carry it; change the password"
        ))
    }
}

/// A private option file, removed (with its directory) on drop.
#[derive(Debug)]
pub struct OptionsFile {
    dir: PathBuf,
    path: PathBuf,
}

impl OptionsFile {
    fn create(text: &str) -> anyhow::Result<OptionsFile> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        remove_stale_option_files();
        let dir = std::env::temp_dir().join(format!(
            "{OPTION_DIR_PREFIX}{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("client.cnf");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        let file = OptionsFile { dir, path };
        written.with_context(|| format!("writing {}", file.path.display()))?;
        Ok(file)
    }

    /// The first argument every program must get (`--defaults-file` has to come first).
    pub fn arg(&self) -> String {
        format!("--defaults-file={}", self.path.display())
    }
}

/// A killed dbagent cannot remove its option files: the next run removes those whose process
/// is gone, so a password does not linger in the temp directory.
fn remove_stale_option_files() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(OPTION_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for OptionsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = MysqlConn::parse("mysql://backup@db-0.db:3307", None).unwrap();
        assert_eq!(
            (c.user.as_str(), c.host.as_str(), c.port),
            ("backup", "db-0.db", 3307)
        );
        let o = c.opts();
        assert_eq!(
            (o.user(), o.ip_or_hostname(), o.tcp_port(), o.socket()),
            (Some("backup"), "db-0.db", 3307, None)
        );
        assert!(!o.prefer_socket());
        let c =
            MysqlConn::parse("mysql://localhost/?socket=/run/mysqld/mysqld.sock", None).unwrap();
        assert_eq!(c.user, "root");
        assert_eq!(c.port, 3306);
        assert_eq!(
            c.socket.as_deref(),
            Some(Path::new("/run/mysqld/mysqld.sock"))
        );
        assert_eq!(c.opts().socket(), Some("/run/mysqld/mysqld.sock"));
        let c = MysqlConn::parse("mariadb://us%40er@h", Some(Secret::new("pw"))).unwrap();
        assert_eq!(c.user, "us@er");
        assert_eq!(c.opts().pass(), Some("pw"));
        for bad in ["mysql://u:pw@h", "postgresql://u@h", "nonsense"] {
            let e = MysqlConn::parse(bad, None).unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 1, "{bad}");
            assert!(e.to_string().starts_with("DBAGENT_MYSQL_URL"), "{e}");
        }
    }

    #[test]
    fn option_file_values_are_quoted_and_private() {
        assert_eq!(option_value("p#ss w'rd").unwrap(), "\"p#ss w'rd\"");
        assert_eq!(option_value("a\"b\\c").unwrap(), "'a\"b\\\\c'");
        assert!(option_value("'\"").is_err());
        let conn = MysqlConn::parse("mysql://u@h:1", Some(Secret::new("s3cret"))).unwrap();
        let f = conn.options_file().unwrap();
        let text = std::fs::read_to_string(&f.path).unwrap();
        assert!(text.contains("password=\"s3cret\""), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir = f.dir.clone();
        drop(f);
        assert!(!dir.exists());
        // One left behind by a process that no longer exists is removed by the next run.
        let stale = std::env::temp_dir().join(format!("{OPTION_DIR_PREFIX}{}-0-0", i32::MAX));
        std::fs::create_dir_all(&stale).unwrap();
        drop(conn.options_file().unwrap());
        assert!(!stale.exists());
        assert!(!format!("{conn:?}").contains("s3cret"));
    }

    #[test]
    fn tls_settings_reach_both_clients() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "pem").unwrap();
        let cfg = |mode: &str| MysqlConfig {
            url: Some("mysql://u@db:3306".into()),
            password: None,
            bin_dir: None,
            binlog_dir: None,
            server_uuid: None,
            lock_wait_timeout: Duration::from_secs(60),
            replay_gtid_strict: true,
            stream_server_id: None,
            ssl_mode: Some(mode.into()),
            ssl_ca: Some(ca.clone()),
        };
        let conn = MysqlConn::from_config(&cfg("VERIFY_IDENTITY")).unwrap();
        let ssl = conn.opts().ssl_opts().cloned().expect("TLS");
        assert!(!ssl.skip_domain_validation() && !ssl.accept_invalid_certs());
        assert!(ssl.disable_built_in_roots());
        let f = conn.options_file().unwrap();
        let text = std::fs::read_to_string(&f.path).unwrap();
        for line in [
            "loose-ssl\n",
            "loose-ssl-verify-server-cert\n",
            "loose-ssl-mode=VERIFY_IDENTITY\n",
            &format!("ssl-ca=\"{}\"\n", ca.display()),
        ] {
            assert!(text.contains(line), "{line:?} missing from {text}");
        }
        let conn = MysqlConn::from_config(&cfg("verify_ca")).unwrap();
        assert!(conn.opts().ssl_opts().unwrap().skip_domain_validation());
        let conn = MysqlConn::from_config(&cfg("disabled")).unwrap();
        assert!(conn.opts().ssl_opts().is_none());
        let text = std::fs::read_to_string(&conn.options_file().unwrap().path).unwrap();
        assert!(
            text.contains("loose-skip-ssl\n") && !text.contains("ssl-ca"),
            "{text}"
        );
        // Unset: nothing changes for either client.
        let conn = MysqlConn::parse("mysql://u@db", None).unwrap();
        assert!(conn.opts().ssl_opts().is_none());
        let text = std::fs::read_to_string(&conn.options_file().unwrap().path).unwrap();
        assert!(!text.contains("ssl"), "{text}");
        // A CA file that is not there is refused with the setting's name.
        let mut bad = cfg("verify_identity");
        bad.ssl_ca = Some(dir.path().join("missing.pem"));
        let e = MysqlConn::from_config(&bad).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        assert!(e.to_string().starts_with("mysql.ssl_ca"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_input_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conn = MysqlConn::parse(&format!("mysql://u@127.0.0.1:{port}"), None).unwrap();
        let e = conn.connect().await.unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        assert!(
            e.to_string()
                .starts_with("cannot connect to MySQL at u@127.0.0.1:"),
            "{e}"
        );
    }
}
