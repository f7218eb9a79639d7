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

use super::client::{self, MysqlConn, Programs};
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
    /// Connects (through the command-line client) and reads the server's facts.
    pub async fn connect(cfg: &MysqlConfig, conn: MysqlConn) -> anyhow::Result<Server> {
        let probe = Programs::any_client(cfg)?;
        let row = client::query_row(
            &probe,
            &conn,
            "SELECT VERSION(), @@server_id, @@hostname, @@log_bin, IFNULL(@@log_bin_basename, '')",
        )
        .await?;
        let version = row[0].clone();
        let flavor = if version.to_ascii_lowercase().contains("mariadb") {
            Flavor::Mariadb
        } else {
            Flavor::Mysql
        };
        let programs = Programs::find(cfg, flavor)?;
        let server_id: u64 = row[1].parse().unwrap_or(0);
        let hostname = row[2].clone();
        let server_uuid = match (&cfg.server_uuid, flavor) {
            (Some(id), _) => id.clone(),
            (None, flavor) => match flavor {
                Flavor::Mysql => client::query_row(&programs.client, &conn, "SELECT @@server_uuid")
                    .await?
                    .remove(0),
                Flavor::Mariadb => derived_uuid(&hostname, server_id),
            },
        };
        Ok(Server {
            conn,
            programs,
            facts: ServerFacts {
                flavor,
                version,
                server_uuid,
                server_id,
                hostname,
                log_bin: row[3] == "1" || row[3].eq_ignore_ascii_case("on"),
                log_bin_basename: Some(PathBuf::from(&row[4]))
                    .filter(|p| !p.as_os_str().is_empty()),
            },
        })
    }

    pub async fn query(&self, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
        client::query(&self.programs.client, &self.conn, sql).await
    }

    /// `SHOW BINARY LOGS`: every binlog file the server keeps, oldest first, with its size.
    /// The last one is the file being written.
    pub async fn binary_logs(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let rows = self.query("SHOW BINARY LOGS").await.map_err(|e| {
            if crate::error::exit_code(&e) == 1 {
                e
            } else {
                input_err!(
                    "cannot list the binary logs on {} ({e}): the user needs the BINLOG MONITOR (MariaDB) or REPLICATION CLIENT (MySQL) privilege",
                    self.conn.describe()
                )
            }
        })?;
        rows.into_iter()
            .map(|r| {
                let size = r.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                Ok((r.first().cloned().unwrap_or_default(), size))
            })
            .collect()
    }

    /// Databases other than the system ones.
    pub async fn user_databases(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .query("SHOW DATABASES")
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next())
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
