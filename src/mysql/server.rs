//! What a MySQL/MariaDB server says about itself: family, version, identity, binary logs.
//!
//! Identity keys the repository (`mysql/<server-uuid>/`). MySQL has `@@server_uuid`, generated
//! when the data directory is initialised. MariaDB (10.11 included) has no server UUID, so
//! dbagent derives a stable one from `@@hostname` and `@@server_id`: in a Kubernetes
//! StatefulSet the pod name is the hostname and stays with the volume, and `server_id` must be
//! unique in a replication topology anyway. It does not change when the server is rebuilt
//! from a dump: a rebuilt MariaDB server that starts its binlogs again from `.000001` must get
//! a new `server_id` (or a new repository prefix), or `binlog-push` refuses its files as
//! different content under names already archived.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use anyhow::Context;
use mysql_async::prelude::Queryable;

use super::client::Programs;
use super::conn::MysqlConn;
use super::sql;
use crate::config::MysqlConfig;
use crate::input_err;
use crate::repo::mysql::Flavor;

/// Databases every server has; never dumped, and allowed in an "empty" restore target.
pub const SYSTEM_DATABASES: [&str; 4] =
    ["information_schema", "performance_schema", "mysql", "sys"];

#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub flavor: Flavor,
    pub version: String,
    pub server_uuid: String,
    pub server_id: u64,
    pub hostname: String,
    pub log_bin: bool,
    /// `@@log_bin_basename`: the binlog directory and file prefix.
    pub log_bin_basename: Option<PathBuf>,
}

/// A connected server: its settings, its programs and what it said about itself.
#[derive(Debug, Clone)]
pub struct Server {
    pub conn: MysqlConn,
    pub programs: Programs,
    pub facts: ServerFacts,
}

impl Server {
    /// Connects and reads the server's facts; finds the family's client programs.
    pub async fn connect(cfg: &MysqlConfig, conn: MysqlConn) -> anyhow::Result<Server> {
        let mut session = conn.connect().await?;
        let facts = read_facts(cfg, &mut session).await;
        let _ = session.disconnect().await;
        let facts = facts.map_err(|e| conn.query_error(e))?;
        let programs = Programs::find(cfg, facts.flavor)?;
        Ok(Server {
            conn,
            programs,
            facts,
        })
    }

    /// Runs one query on a connection of its own (a command runs a handful).
    async fn query<T: mysql_async::prelude::FromRow + Send + 'static>(
        &self,
        sql: &str,
    ) -> anyhow::Result<Vec<T>> {
        let mut session = self.conn.connect().await?;
        let rows = session.query(sql).await;
        let _ = session.disconnect().await;
        rows.map_err(|e| self.conn.query_error(e))
    }

    /// What the server's clock means: its zones, and the binlog format that decides whether
    /// replay depends on them.
    pub async fn time_zone(&self) -> anyhow::Result<crate::repo::mysql::ServerTimeZone> {
        let rows: Vec<(String, String, i64, String)> = self
            .query(
                "SELECT @@global.time_zone, @@system_time_zone, \
                 TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), CONVERT_TZ(UTC_TIMESTAMP(), '+00:00', 'SYSTEM')), \
                 @@global.binlog_format",
            )
            .await?;
        let (global, system, system_offset_seconds, binlog_format) = rows
            .into_iter()
            .next()
            .context("the server did not say its time zone")?;
        Ok(crate::repo::mysql::ServerTimeZone {
            global,
            system,
            system_offset_seconds,
            binlog_format,
        })
    }

    /// `SHOW BINARY LOGS`: every binlog file the server keeps, oldest first, with its size.
    /// The last one is the file being written.
    pub async fn binary_logs(&self) -> anyhow::Result<Vec<(String, u64)>> {
        binary_logs(&self.conn).await
    }

    /// Databases other than the system ones.
    pub async fn user_databases(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .query::<String>("SHOW DATABASES")
            .await?
            .into_iter()
            .filter(|d| !SYSTEM_DATABASES.contains(&d.as_str()))
            .collect())
    }

    /// Tables whose engine has no transactions, as `schema.table engine` (see
    /// `sql::NON_TRANSACTIONAL`).
    pub async fn non_transactional_tables(&self) -> anyhow::Result<Vec<String>> {
        self.query::<String>(crate::mysql::sql::NON_TRANSACTIONAL)
            .await
    }

    /// This account's other sessions waiting for a lock: (id, seconds, state, statement), read
    /// on `session` (a watchdog keeps one open rather than connecting every time it looks).
    pub async fn waiting_sessions(
        &self,
        session: &mut mysql_async::Conn,
    ) -> anyhow::Result<Vec<(u64, u64, String, String)>> {
        session
            .query(sql::WAITING_SESSIONS)
            .await
            .map_err(|e| self.conn.query_error(e))
    }

    /// Ends the statement a session of this account runs (its own sessions need no privilege).
    pub async fn kill_query(&self, session: &mut mysql_async::Conn, id: u64) -> anyhow::Result<()> {
        session
            .query_drop(format!("KILL QUERY {id}"))
            .await
            .map_err(|e| self.conn.query_error(e))
    }

    /// Databases other than the system ones that hold anything: a restore target may have
    /// empty ones (`mariadb-install-db`'s `test`).
    pub async fn databases_in_use(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .query::<String>(crate::mysql::sql::DATABASES_IN_USE)
            .await?
            .into_iter()
            .filter(|d| !SYSTEM_DATABASES.contains(&d.as_str()))
            .collect())
    }

    /// Where the server writes its binlogs: `mysql.binlog_dir`, else `@@log_bin_basename`'s
    /// directory.
    pub fn binlog_dir(&self, cfg: &MysqlConfig) -> anyhow::Result<PathBuf> {
        if let Some(dir) = &cfg.binlog_dir {
            return Ok(dir.clone());
        }
        self.facts
            .log_bin_basename
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                input_err!(
                    "the server does not say where its binlogs are (@@log_bin_basename is empty): set DBAGENT_MYSQL_BINLOG_DIR"
                )
            })
    }

    pub fn require_binlog(&self) -> anyhow::Result<()> {
        if self.facts.log_bin {
            return Ok(());
        }
        Err(input_err!(
            "binary logging is off on {}: start the server with log_bin (e.g. log_bin = mysql-bin) so dumps can be rolled forward to a point in time",
            self.conn.describe()
        ))
    }
}

async fn read_facts(
    cfg: &MysqlConfig,
    session: &mut mysql_async::Conn,
) -> Result<ServerFacts, mysql_async::Error> {
    let (version, server_id, hostname, log_bin, basename): (String, u64, String, String, String) =
        session
            .query_first(sql::SERVER_FACTS)
            .await?
            .unwrap_or_default();
    let flavor = if version.to_ascii_lowercase().contains("mariadb") {
        Flavor::Mariadb
    } else {
        Flavor::Mysql
    };
    let server_uuid = match (&cfg.server_uuid, flavor) {
        (Some(id), _) => id.clone(),
        (None, Flavor::Mysql) => session
            .query_first("SELECT @@server_uuid")
            .await?
            .unwrap_or_default(),
        (None, Flavor::Mariadb) => derived_uuid(&hostname, server_id),
    };
    Ok(ServerFacts {
        flavor,
        version,
        server_uuid,
        server_id,
        hostname,
        log_bin: log_bin == "1" || log_bin.eq_ignore_ascii_case("on"),
        log_bin_basename: Some(PathBuf::from(basename)).filter(|p| !p.as_os_str().is_empty()),
    })
}

/// A name-based UUID for a server that has none: the same hostname and server id always give
/// the same UUID (version 8, "custom", from SHA-256).
pub fn derived_uuid(hostname: &str, server_id: u64) -> String {
    let digest = Sha256::digest(format!("dbagent-mariadb-server\0{hostname}\0{server_id}"));
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = 0x80 | (b[6] & 0x0f);
    b[8] = 0x80 | (b[8] & 0x3f);
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `SHOW BINARY LOGS` on a connection of its own, without the server's facts (the sidecar's
/// repository refresher asks it); see `Server::binary_logs`.
pub async fn binary_logs(conn: &MysqlConn) -> anyhow::Result<Vec<(String, u64)>> {
    let rows: anyhow::Result<Vec<mysql_async::Row>> = async {
        let mut session = conn.connect().await?;
        let rows = session.query("SHOW BINARY LOGS").await;
        let _ = session.disconnect().await;
        rows.map_err(|e| conn.query_error(e))
    }
    .await;
    let rows = rows.map_err(|e| {
        if crate::error::exit_code(&e) == 1 {
            e
        } else {
            input_err!(
                "cannot list the binary logs on {} ({e}): the user needs the BINLOG MONITOR (MariaDB) or REPLICATION CLIENT (MySQL) privilege",
                conn.describe()
            )
        }
    })?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let name: Option<String> = r.get(0);
            let size: Option<u64> = r.get(1);
            (name.unwrap_or_default(), size.unwrap_or(0))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuids_are_stable_and_distinct() {
        let a = derived_uuid("mariadb-0", 1);
        assert_eq!(a, derived_uuid("mariadb-0", 1));
        assert_ne!(a, derived_uuid("mariadb-1", 1));
        assert_ne!(a, derived_uuid("mariadb-0", 2));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
    }
}
