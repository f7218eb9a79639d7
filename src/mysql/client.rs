//! Talking to MySQL/MariaDB through its own command-line programs (`mariadb`/`mysql`,
//! `mariadb-dump`/`mysqldump`, …): where they are, how they get the connection settings, and
//! what their errors mean.
//!
//! The password never goes on a command line: every program gets a private option file
//! (mode 0600 in a 0700 directory, removed afterwards) as its `--defaults-file`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

use crate::config::{MysqlConfig, Secret};
use crate::error::Failure;
use crate::input_err;
use crate::repo::mysql::Flavor;

/// Option files live in `<tmp>/dbagent-mysql-<pid>-…/`.
const OPTION_DIR_PREFIX: &str = "dbagent-mysql-";
/// How long a client waits for the server to answer a connection.
const CONNECT_TIMEOUT_SECS: u32 = 10;

/// Connection settings for one server.
#[derive(Debug, Clone)]
pub struct MysqlConn {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub socket: Option<PathBuf>,
    password: Option<Secret>,
}

impl MysqlConn {
    /// The server `DBAGENT_MYSQL_URL` names.
    pub fn from_config(cfg: &MysqlConfig) -> anyhow::Result<MysqlConn> {
        let Some(url) = &cfg.url else {
            return Err(input_err!(
                "no MySQL server configured: set DBAGENT_MYSQL_URL=mysql://user@host:port (and DBAGENT_MYSQL_PASSWORD_FILE)"
            ));
        };
        Self::from_url(url, cfg.password.clone())
    }

    /// Parses `mysql://user@host:port[?socket=/path]`.
    pub fn from_url(url: &str, password: Option<Secret>) -> anyhow::Result<MysqlConn> {
        let parsed = url::Url::parse(url)
            .map_err(|e| input_err!("DBAGENT_MYSQL_URL: {e}: expected mysql://user@host:port"))?;
        let user = match parsed.username() {
            "" => "root".to_string(),
            u => percent_decode(u),
        };
        let host = parsed.host_str().unwrap_or("localhost").to_string();
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
        }
    }

    pub fn describe(&self) -> String {
        match &self.socket {
            Some(s) => format!("{}@{} (socket {})", self.user, self.host, s.display()),
            None => format!("{}@{}:{}", self.user, self.host, self.port),
        }
    }

    /// Writes the private option file every program of this connection reads.
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
        // Only the interactive client knows this option; the dump program would refuse it.
        text.push_str(&format!(
            "[mysql]\nconnect-timeout={CONNECT_TIMEOUT_SECS}\n"
        ));
        OptionsFile::create(&text)
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

/// The programs of one server family.
#[derive(Debug, Clone)]
pub struct Programs {
    pub flavor: Flavor,
    pub client: PathBuf,
    pub dump: PathBuf,
    pub binlog: PathBuf,
}

impl Programs {
    pub fn find(cfg: &MysqlConfig, flavor: Flavor) -> anyhow::Result<Programs> {
        let names = |mariadb: &'static str, mysql: &'static str| match flavor {
            Flavor::Mariadb => [mariadb, mysql],
            Flavor::Mysql => [mysql, mysql],
        };
        Ok(Programs {
            flavor,
            client: program(cfg, &names("mariadb", "mysql"))?,
            dump: program(cfg, &names("mariadb-dump", "mysqldump"))?,
            binlog: program(cfg, &names("mariadb-binlog", "mysqlbinlog"))?,
        })
    }

    /// Any client that can ask a server what it is, before the family is known. `mysql` is
    /// MySQL's own client where MySQL is installed (it speaks MySQL 8's default
    /// authentication), and MariaDB's client under its old name where MariaDB is.
    pub fn any_client(cfg: &MysqlConfig) -> anyhow::Result<PathBuf> {
        program(cfg, &["mysql", "mariadb"])
    }
}

/// The first of `names` in `mysql.bin_dir`, else the PATH, /usr/bin and /usr/sbin.
pub fn program(cfg: &MysqlConfig, names: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &cfg.bin_dir {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
        return Err(input_err!(
            "{} not found in {}: check mysql.bin_dir / DBAGENT_MYSQL_BIN_DIR",
            names[0],
            dir.display()
        ));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .collect();
    for name in names {
        for dir in &dirs {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(input_err!(
        "{} not found: install the MySQL/MariaDB client programs or set DBAGENT_MYSQL_BIN_DIR",
        names[0]
    ))
}

/// Runs one SQL text through the command-line client and returns the rows (tab-separated
/// batch output, unescaped). Connection failures are input errors (exit 1).
pub async fn query(client: &Path, conn: &MysqlConn, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let options = conn.options_file()?;
    let out = tokio::process::Command::new(client)
        .arg(options.arg())
        .args([
            "--batch",
            "--skip-column-names",
            "--default-character-set=utf8mb4",
        ])
        .arg("--execute")
        .arg(sql)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", client.display()))?;
    if !out.status.success() {
        return Err(client_error(conn, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').map(unescape).collect())
        .collect())
}

/// Runs a query that returns exactly one row.
pub async fn query_row(client: &Path, conn: &MysqlConn, sql: &str) -> anyhow::Result<Vec<String>> {
    let mut rows = query(client, conn, sql).await?;
    if rows.len() != 1 {
        anyhow::bail!(
            "expected one row from {sql:?} on {}, got {}",
            conn.describe(),
            rows.len()
        );
    }
    Ok(rows.remove(0))
}

/// Undoes the batch-mode escaping of `\t`, `\n`, `\\` and `\0`.
fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('0') => out.push('\0'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Client error codes that mean "cannot reach or log in to the server": the user's settings
/// are wrong (exit 1), not the operation.
const CONNECT_ERRORS: [&str; 10] = [
    "1044", "1045", "1698", "2002", "2003", "2005", "2006", "2013", "2059", "1049",
];

/// Turns a client's stderr into one line, as an input error when it is about connecting.
pub fn client_error(conn: &MysqlConn, stderr: &str) -> anyhow::Error {
    let line = first_error_line(stderr);
    if is_connect_error(&line) {
        return anyhow::Error::new(Failure::Input(format!(
            "cannot connect to MySQL at {}: {line}: check DBAGENT_MYSQL_URL and DBAGENT_MYSQL_PASSWORD_FILE",
            conn.describe()
        )));
    }
    anyhow::anyhow!("MySQL at {}: {line}", conn.describe())
}

/// The most telling line of a client's stderr (an `ERROR …` line if there is one).
pub fn first_error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Warning:") && !l.contains("[Warning]"))
        .collect();
    let line = lines
        .iter()
        .find(|l| l.contains("ERROR") || l.contains("error"))
        .or(lines.last())
        .copied()
        .unwrap_or("no error message");
    // Program-name prefixes ("mariadb-dump: Got error: …") add nothing for the reader.
    line.to_string()
}

pub fn is_connect_error(line: &str) -> bool {
    CONNECT_ERRORS.iter().any(|code| {
        let matches = line.contains(&format!("ERROR {code} "))
            || line.contains(&format!("ERROR {code}:"))
            || line.contains(&format!("error: {code}:"))
            || line.contains(&format!("Got error: {code}:"));
        // "Server has gone away" and "Lost connection" are settings problems only while
        // connecting; in the middle of a dump they mean the operation failed (exit 2).
        let while_connecting = !matches!(*code, "2006" | "2013")
            || line.contains("trying to connect")
            || line.contains("initial communication packet")
            || line.contains("handshake");
        matches && while_connecting
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_settings_errors_only_while_connecting() {
        assert!(is_connect_error(
            "ERROR 2003 (HY000): Can't connect to MySQL server on '127.0.0.1' (111)"
        ));
        assert!(is_connect_error(
            "ERROR 2013 (HY000): Lost connection to server at 'handshake: reading initial communication packet', system error: 104"
        ));
        assert!(!is_connect_error(
            "mariadb-dump: Error 2013: Lost connection to server during query when dumping table `t` at row: 12"
        ));
        assert!(!is_connect_error(
            "ERROR 2006 (HY000) at line 3418: Server has gone away"
        ));
        assert!(is_connect_error(
            "ERROR 1045 (28000): Access denied for user 'x'@'localhost' (using password: YES)"
        ));
    }

    #[test]
    fn urls() {
        let c = MysqlConn::from_url("mysql://backup@db-0.db:3307", None).unwrap();
        assert_eq!(
            (c.user.as_str(), c.host.as_str(), c.port),
            ("backup", "db-0.db", 3307)
        );
        let c =
            MysqlConn::from_url("mysql://localhost/?socket=/run/mysqld/mysqld.sock", None).unwrap();
        assert_eq!(c.user, "root");
        assert_eq!(c.port, 3306);
        assert_eq!(
            c.socket.as_deref(),
            Some(Path::new("/run/mysqld/mysqld.sock"))
        );
        let c = MysqlConn::from_url("mysql://us%40er@h", None).unwrap();
        assert_eq!(c.user, "us@er");
    }

    #[test]
    fn option_file_values_are_quoted_and_private() {
        assert_eq!(option_value("p#ss w'rd").unwrap(), "\"p#ss w'rd\"");
        assert_eq!(option_value("a\"b\\c").unwrap(), "'a\"b\\\\c'");
        assert!(option_value("'\"").is_err());
        let conn = MysqlConn::from_url("mysql://u@h:1", Some(Secret::new("s3cret"))).unwrap();
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
    fn errors() {
        let conn = MysqlConn::from_url("mysql://root@127.0.0.1:1", None).unwrap();
        let e = client_error(
            &conn,
            "ERROR 1045 (28000): Access denied for user 'root'@'localhost' (using password: YES)\n",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        assert!(e.to_string().contains("Access denied"));
        let e = client_error(
            &conn,
            "ERROR 2002 (HY000): Can't connect to server on '127.0.0.1' (115)\n",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        let e = client_error(
            &conn,
            "mariadb-dump: Got error: 2002: \"Can't connect to server on '127.0.0.1' (115)\" when trying to connect\n",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        let e = client_error(
            &conn,
            "ERROR 1146 (42S02) at line 1: Table 'a.b' doesn't exist\n",
        );
        assert_eq!(crate::error::exit_code(&e), 2);
        assert_eq!(unescape(r"a\tb\\c\nd"), "a\tb\\c\nd");
    }
}
