//! The heartbeat writer: on a writable primary, one row per node, updated every second.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::health::Role;
use crate::pg::conn::ConnInfo;
use crate::serve::state::{Counters, Shared};

/// Written into every heartbeat row; a restore proves CJK text survived by reading it back.
pub const CANARY: &str = "dbagent 心跳 ハートビート 하트비트 🐘 χΨψΩω";

pub const PG_SCHEMA: &str = include_str!("../sql/postgres/heartbeat.sql");
pub const MYSQL_SCHEMA: &str = include_str!("../sql/mysql/heartbeat.sql");

const PG_UPSERT: &str = "
INSERT INTO dbagent.heartbeat (node, ts, lsn, timeline, canary)
VALUES ($1, clock_timestamp(), pg_current_wal_lsn(),
        (SELECT timeline_id FROM pg_control_checkpoint()), $2)
ON CONFLICT (node) DO UPDATE
   SET ts = EXCLUDED.ts, lsn = EXCLUDED.lsn, timeline = EXCLUDED.timeline, canary = EXCLUDED.canary";

async fn pg_connect(conn: &ConnInfo) -> anyhow::Result<Client> {
    let client = tokio::time::timeout(Duration::from_secs(2), conn.connect())
        .await
        .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
    // A heartbeat must never wait for a synchronous standby that is gone, nor queue on locks.
    client
        .batch_execute(
            "SET synchronous_commit = local; SET statement_timeout = '2s'; SET lock_timeout = '1s'; SET application_name = 'dbagent heartbeat'",
        )
        .await?;
    client.batch_execute(PG_SCHEMA).await?;
    Ok(client)
}

/// Writes the heartbeat while the snapshot says this server is a writable primary.
pub async fn run_pg(
    shared: Arc<Shared>,
    conn: ConnInfo,
    node: String,
    interval: Duration,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut client: Option<Client> = None;
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
            client = None;
            continue;
        }
        let result = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(pg_connect(&conn).await?);
            }
            let c = client.as_ref().expect("connected above");
            c.execute(PG_UPSERT, &[&node, &CANARY]).await?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                Counters::add(&shared.counters.heartbeat_writes, 1);
                if last_error.take().is_some() {
                    tracing::info!("heartbeat writes resumed");
                }
            }
            Err(e) => {
                client = None;
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

/// Writes the pt-heartbeat row while the snapshot says this server is a writable primary.
pub async fn run_mysql(
    shared: Arc<Shared>,
    opts: mysql_async::Opts,
    interval: Duration,
    token: CancellationToken,
) -> anyhow::Result<()> {
    use mysql_async::prelude::Queryable;
    let mut conn: Option<mysql_async::Conn> = None;
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
            conn = None;
            continue;
        }
        let result = async {
            if conn.is_none() {
                let mut c = crate::health::mysql::connect(&opts).await?;
                for stmt in sql_statements(MYSQL_SCHEMA) {
                    c.query_drop(stmt).await?;
                }
                conn = Some(c);
            }
            let c = conn.as_mut().expect("connected above");
            // pt-heartbeat --utc format: ISO 8601 with microseconds, no zone.
            let ts = chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.6f")
                .to_string();
            c.exec_drop(
                "REPLACE INTO dbagent.heartbeat (ts, server_id, canary) VALUES (?, @@server_id, ?)",
                (ts, CANARY),
            )
            .await?;
            anyhow::Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                Counters::add(&shared.counters.heartbeat_writes, 1);
                if last_error.take().is_some() {
                    tracing::info!("heartbeat writes resumed");
                }
            }
            Err(e) => {
                conn = None;
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
        let stmts = sql_statements(MYSQL_SCHEMA);
        assert_eq!(stmts.len(), 2, "{stmts:?}");
        assert!(stmts[0].starts_with("CREATE DATABASE"));
        assert!(stmts[1].starts_with("CREATE TABLE IF NOT EXISTS dbagent.heartbeat"));
        assert_eq!(sql_statements(PG_SCHEMA).len(), 2);
    }
}
