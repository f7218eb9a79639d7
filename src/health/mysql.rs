//! Reads a MySQL/MariaDB server's role, replication threads, positions and heartbeat.
//!
//! Both statement spellings are used: `SHOW REPLICA STATUS` (MySQL 8.0.22+, MariaDB 10.5+;
//! the only one MySQL 8.4 has) and `SHOW SLAVE STATUS` (older servers), with either family
//! of column names. `Seconds_Behind_Master` is NULL when a thread is stopped and 0 while the
//! SQL thread catches up with a lagging IO thread: the heartbeat is the lag, and the server's
//! figure only stands in until a heartbeat has replicated.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Row};

use super::{ReplicaState, Role, Snapshot};
use crate::engine::Engine;
use crate::mysql::conn::MysqlConn;

/// How long a probe waits for a connection: the snapshot must stay fresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Probe {
    server: MysqlConn,
    conn: Option<Conn>,
}

/// A value from a status row under any of its names (REPLICA vs SLAVE spellings).
fn col(row: &Row, names: &[&str]) -> Option<String> {
    let columns = row.columns_ref();
    for name in names {
        if let Some(i) = columns
            .iter()
            .position(|c| c.name_str().eq_ignore_ascii_case(name))
        {
            return row
                .get_opt::<Option<String>, _>(i)
                .and_then(|r| r.ok())
                .flatten();
        }
    }
    None
}

fn col_u64(row: &Row, names: &[&str]) -> Option<u64> {
    col(row, names).and_then(|v| v.parse().ok())
}

impl Probe {
    pub fn new(server: MysqlConn) -> Probe {
        Probe { server, conn: None }
    }

    async fn read_state(&mut self) -> anyhow::Result<Snapshot> {
        if self.conn.is_none() {
            self.conn = Some(self.server.connect_within(CONNECT_TIMEOUT).await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let (server_id, read_only, version): (u64, i64, String) = conn
            .query_first("SELECT @@server_id, @@read_only, VERSION()")
            .await?
            .ok_or_else(|| anyhow::anyhow!("no answer to SELECT @@server_id"))?;
        let status: Vec<Row> = match conn.query("SHOW REPLICA STATUS").await {
            Ok(rows) => rows,
            Err(mysql_async::Error::Server(e)) if e.code == 1064 => {
                conn.query("SHOW SLAVE STATUS").await?
            }
            Err(e) => return Err(e.into()),
        };
        let heartbeat: Option<(String, Option<String>)> =
            match conn.query_first(crate::mysql::sql::HEALTH_HEARTBEAT).await {
                Ok(row) => row,
                // No heartbeat table yet.
                Err(mysql_async::Error::Server(e)) if e.code == 1146 || e.code == 1049 => None,
                Err(e) => return Err(e.into()),
            };
        let heartbeat_age = heartbeat.and_then(|(now, ts)| {
            let now = parse_ts(&now)?;
            let ts = parse_ts(&ts?)?;
            Some(((now - ts).num_microseconds()? as f64 / 1e6).max(0.0))
        });
        let version_num = version_number(&version);
        let mut s = Snapshot {
            engine: Engine::Mysql,
            up: true,
            server_version: Some(version_num),
            server_version_text: Some(version),
            system_identifier: Some(server_id.to_string()),
            heartbeat_age_seconds: heartbeat_age,
            ..Default::default()
        };
        match status.first() {
            None => {
                s.role = Role::Primary;
                s.writable = read_only == 0;
                s.lag_bytes = Some(0);
                s.lag_seconds = Some(0.0);
            }
            Some(row) => {
                s.role = Role::Replica;
                s.writable = false;
                let io = col(row, &["Replica_IO_Running", "Slave_IO_Running"]).unwrap_or_default();
                let sql =
                    col(row, &["Replica_SQL_Running", "Slave_SQL_Running"]).unwrap_or_default();
                let io_error = col(row, &["Last_IO_Error"]).filter(|e| !e.is_empty());
                let sql_error = col(row, &["Last_SQL_Error"]).filter(|e| !e.is_empty());
                let streaming = io == "Yes" && sql == "Yes";
                let broken_reason = if io != "Yes" {
                    Some(format!(
                        "replication IO thread is {}{}",
                        if io.is_empty() {
                            "not running"
                        } else {
                            io.as_str()
                        },
                        io_error.map(|e| format!(": {e}")).unwrap_or_default()
                    ))
                } else if sql != "Yes" {
                    Some(format!(
                        "replication SQL thread is not running{}",
                        sql_error.map(|e| format!(": {e}")).unwrap_or_default()
                    ))
                } else {
                    None
                };
                let read_file = col(row, &["Source_Log_File", "Master_Log_File"]);
                let exec_file = col(row, &["Relay_Source_Log_File", "Relay_Master_Log_File"]);
                let read_pos = col_u64(row, &["Read_Source_Log_Pos", "Read_Master_Log_Pos"]);
                let exec_pos = col_u64(row, &["Exec_Source_Log_Pos", "Exec_Master_Log_Pos"]);
                s.lag_bytes = lag_bytes(
                    read_file.as_deref(),
                    read_pos,
                    exec_file.as_deref(),
                    exec_pos,
                );
                // Without a replicated heartbeat (no sidecar on the primary yet, or the
                // table filtered out), the server's own estimate: NULL while the SQL thread
                // is stopped, so a broken replica still has no lag in seconds.
                s.lag_seconds = heartbeat_age.or_else(|| {
                    col_u64(row, &["Seconds_Behind_Source", "Seconds_Behind_Master"])
                        .map(|v| v as f64)
                });
                s.replica = Some(ReplicaState {
                    streaming,
                    broken_reason,
                    paused: sql != "Yes" && io == "Yes",
                    received_location: read_pos,
                    replayed_location: exec_pos,
                    replayed_timestamp: None,
                    sender: match (
                        col(row, &["Source_Host", "Master_Host"]),
                        col(row, &["Source_Port", "Master_Port"]),
                    ) {
                        (Some(h), Some(p)) => Some(format!("{h}:{p}")),
                        _ => None,
                    },
                });
            }
        }
        Ok(s)
    }
}

fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// `10.11.19-MariaDB-...` → 101119; `8.4.3` → 80403.
fn version_number(v: &str) -> i64 {
    let nums: Vec<i64> = v
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    nums.first().copied().unwrap_or(0) * 10000
        + nums.get(1).copied().unwrap_or(0) * 100
        + nums.get(2).copied().unwrap_or(0)
}

/// Bytes the replica has read but not executed. Exact within one binlog file; across files
/// the bytes in between are not known, so the unexecuted rest of the older file is counted
/// as if it were full-sized (`max_binlog_size` is unknown here: 1 GiB, the default).
fn lag_bytes(
    read_file: Option<&str>,
    read_pos: Option<u64>,
    exec_file: Option<&str>,
    exec_pos: Option<u64>,
) -> Option<u64> {
    let (rf, rp, ef, ep) = (read_file?, read_pos?, exec_file?, exec_pos?);
    if rf == ef {
        return Some(rp.saturating_sub(ep));
    }
    Some(rp + (1u64 << 30).saturating_sub(ep))
}

#[async_trait::async_trait]
impl super::Prober for Probe {
    const ENGINE: Engine = Engine::Mysql;

    async fn read(&mut self) -> anyhow::Result<Snapshot> {
        self.read_state().await
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_lag() {
        assert_eq!(version_number("10.11.19-MariaDB-0+deb12u1-log"), 101119);
        assert_eq!(version_number("8.4.3"), 80403);
        assert_eq!(
            lag_bytes(Some("b.000003"), Some(500), Some("b.000003"), Some(200)),
            Some(300)
        );
        assert!(
            lag_bytes(Some("b.000004"), Some(10), Some("b.000003"), Some(200)).unwrap() > 1 << 29
        );
        assert_eq!(lag_bytes(None, Some(1), Some("x"), Some(1)), None);
        assert_eq!(
            parse_ts("2026-11-23T18:00:00.250000").unwrap(),
            "2026-11-23T18:00:00.25Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}
