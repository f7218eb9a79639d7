//! MySQL/MariaDB's own command-line programs (`mariadb`/`mysql`, `mariadb-dump`/`mysqldump`,
//! `mariadb-binlog`/`mysqlbinlog`): where they are, and what their errors mean. dbagent runs
//! them only to dump, to load a dump and to replay binlogs; its own queries go through
//! `mysql_async` (see `conn`, which also writes the programs' option files).

use std::path::PathBuf;

use super::conn::MysqlConn;
use crate::config::MysqlConfig;
use crate::error::Failure;
use crate::input_err;
use crate::repo::mysql::Flavor;

/// The programs of one server family.
#[derive(Debug, Clone)]
pub struct Programs {
    pub flavor: Flavor,
    pub client: PathBuf,
    pub dump: PathBuf,
    pub binlog: PathBuf,
    /// `mysql.replay_gtid_strict`.
    pub gtid_strict: bool,
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
            gtid_strict: cfg.replay_gtid_strict,
        })
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

/// Client error codes that mean "cannot reach or log in to the server": the user's settings
/// are wrong (exit 1), not the operation.
const CONNECT_ERRORS: [&str; 10] = [
    "1044", "1045", "1698", "2002", "2003", "2005", "2006", "2013", "2059", "1049",
];

/// A client program's error line (see `proc::Exit::telling_line`), as an input error when it
/// is about connecting.
pub fn client_error(conn: &MysqlConn, line: &str) -> anyhow::Error {
    if is_connect_error(line) {
        return anyhow::Error::new(Failure::Input(format!(
            "cannot connect to MySQL at {}: {line}: check DBAGENT_MYSQL_URL and DBAGENT_MYSQL_PASSWORD_FILE",
            conn.describe()
        )));
    }
    anyhow::anyhow!("MySQL at {}: {line}", conn.describe())
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
    fn errors() {
        let conn = MysqlConn::parse("mysql://root@127.0.0.1:1", None).unwrap();
        let e = client_error(
            &conn,
            "ERROR 1045 (28000): Access denied for user 'root'@'localhost' (using password: YES)",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        assert!(e.to_string().contains("Access denied"));
        let e = client_error(
            &conn,
            "ERROR 2002 (HY000): Can't connect to server on '127.0.0.1' (115)",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        let e = client_error(
            &conn,
            "mariadb-dump: Got error: 2002: \"Can't connect to server on '127.0.0.1' (115)\" when trying to connect",
        );
        assert_eq!(crate::error::exit_code(&e), 1);
        let e = client_error(
            &conn,
            "ERROR 1146 (42S02) at line 1: Table 'a.b' doesn't exist",
        );
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
