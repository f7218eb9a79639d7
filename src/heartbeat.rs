//! The heartbeat writer: on a writable primary, one row per node, updated every second.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::health::Role;
use crate::mysql::conn::MysqlConn;
use crate::mysql::sql as mysql_sql;
use crate::pg::conn::ConnInfo;
use crate::pg::sql as pg_sql;
use crate::serve::state::{Counters, Shared};

/// Written into every heartbeat row; a restore proves CJK text survived by reading it back.
pub const CANARY: &str = "dbagent 心跳 ハートビート 하트비트 🐘 χΨψΩω";

/// A heartbeat connection that does not come within this is retried at the next beat.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

async fn pg_connect(conn: &ConnInfo) -> anyhow::Result<Client> {
    let client = tokio::time::timeout(CONNECT_TIMEOUT, conn.connect())
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
    // A heartbeat must never wait for a synchronous standby that is gone, nor queue on locks.
    client
        .batch_execute(
            "SET synchronous_commit = local; SET statement_timeout = '2s'; SET lock_timeout = '1s'; SET application_name = 'dbagent heartbeat'",
        )
        .await?;
    client.batch_execute(pg_sql::HEARTBEAT_SCHEMA).await?;
    Ok(client)
}

/// One heartbeat write, on a connection kept between writes.
#[async_trait::async_trait]
pub trait Writer: Send {
    async fn write(&mut self) -> anyhow::Result<()>;
    /// Drops the connection (after an error, or when this server is no longer the primary).
    fn reset(&mut self);
}

pub struct PgWriter {
    conn: ConnInfo,
    node: String,
    client: Option<Client>,
}

impl PgWriter {
    pub fn new(conn: ConnInfo, node: String) -> PgWriter {
        PgWriter {
            conn,
            node,
            client: None,
        }
    }
}

#[async_trait::async_trait]
impl Writer for PgWriter {
    async fn write(&mut self) -> anyhow::Result<()> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(pg_connect(&self.conn).await?);
        }
        let c = self.client.as_ref().expect("connected above");
        c.execute(pg_sql::HEARTBEAT_WRITE, &[&self.node, &CANARY])
            .await?;
        Ok(())
    }

    fn reset(&mut self) {
        self.client = None;
    }
}

pub struct MysqlWriter {
    server: MysqlConn,
    conn: Option<mysql_async::Conn>,
}

impl MysqlWriter {
    pub fn new(server: MysqlConn) -> MysqlWriter {
        MysqlWriter { server, conn: None }
    }
}

#[async_trait::async_trait]
impl Writer for MysqlWriter {
    async fn write(&mut self) -> anyhow::Result<()> {
        use mysql_async::prelude::Queryable;
        if self.conn.is_none() {
            let mut c = self.server.connect_within(CONNECT_TIMEOUT).await?;
            for stmt in sql_statements(mysql_sql::HEARTBEAT_SCHEMA) {
                c.query_drop(stmt).await?;
            }
            self.conn = Some(c);
        }
        let c = self.conn.as_mut().expect("connected above");
        // pt-heartbeat --utc format: ISO 8601 with microseconds, no zone.
        let ts = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string();
        c.exec_drop(mysql_sql::HEARTBEAT_WRITE, (ts, CANARY))
            .await?;
        Ok(())
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

/// Writes the heartbeat every `interval` while the snapshot says this server is a writable
/// primary; counts writes and failures, and logs a failure once, not every second.
pub async fn run(
    shared: Arc<Shared>,
    mut writer: impl Writer,
    interval: Duration,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let (snap, _) = shared.snapshot();
        if !snap.is_some_and(|s| s.up && s.role == Role::Primary && s.writable) {
            writer.reset();
            continue;
        }
        // A write the server holds (a table or global read lock, a hung disk) is a failure
        // after the period, counted and logged, and never keeps a stopping serve waiting.
        let limit = interval.max(Duration::from_secs(2));
        let written = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = tokio::time::timeout(limit, writer.write()) => r.unwrap_or_else(|_| {
                Err(anyhow::anyhow!("no answer within {} ms", limit.as_millis()))
            }),
        };
        match written {
            Ok(()) => {
                Counters::add(&shared.counters.heartbeat_writes, 1);
                if last_error.take().is_some() {
                    tracing::info!("heartbeat writes resumed");
                }
            }
            Err(e) => {
                writer.reset();
                Counters::add(&shared.counters.heartbeat_failures, 1);
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "heartbeat write failed");
                }
                last_error = Some(msg);
            }
        }
    }
}

/// The statements of a plain SQL script: `--` comment lines dropped, split on `;`.
/// (Only for dbagent's own scripts, which keep `;` out of strings.)
pub fn sql_statements(script: &str) -> Vec<String> {
    let text: String = script
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_scripts_split_into_statements() {
        let stmts = sql_statements(mysql_sql::HEARTBEAT_SCHEMA);
        assert_eq!(stmts.len(), 2, "{stmts:?}");
        assert!(stmts[0].starts_with("CREATE DATABASE"));
        assert!(stmts[1].starts_with("CREATE TABLE IF NOT EXISTS dbagent.heartbeat"));
        assert_eq!(sql_statements(pg_sql::HEARTBEAT_SCHEMA).len(), 2);
    }
}
