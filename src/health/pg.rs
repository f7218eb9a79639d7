//! Reads a PostgreSQL server's role, positions, replication and archiver state.

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::{Archiver, ReplicaState, Role, Snapshot, Standby};
use crate::engine::Engine;
use crate::pg::conn::ConnInfo;
use crate::pg::sql;

/// How long a refresh waits for the heartbeat's age.
const HEARTBEAT_READ_TIMEOUT: Duration = Duration::from_secs(1);

const HEARTBEAT_AGE_SQL: &str =
    "SELECT extract(epoch FROM clock_timestamp() - max(ts))::float8 FROM dbagent.heartbeat";

/// Keeps one connection (two when the heartbeat lives in another database) and turns
/// queries into snapshots.
pub struct Probe {
    conn: ConnInfo,
    client: Option<Client>,
    /// `serve.heartbeat_database` when it is not `conn`'s: the table is read where the
    /// heartbeat writes it.
    heartbeat_conn: Option<ConnInfo>,
    heartbeat_client: Option<Client>,
    data_dir: Option<PathBuf>,
}

/// A probe's connection: at most 2 s to connect, and statements that never queue behind
/// locks.
async fn connect(info: &ConnInfo) -> anyhow::Result<Client> {
    let client = tokio::time::timeout(Duration::from_secs(2), info.connect())
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {} timed out", info.describe()))??;
    client
        .batch_execute("SET statement_timeout = '2s'; SET lock_timeout = '1s'")
        .await?;
    Ok(client)
}

impl Probe {
    pub fn new(conn: ConnInfo, data_dir: Option<PathBuf>, heartbeat_database: &str) -> Probe {
        let heartbeat_conn =
            (heartbeat_database != conn.dbname).then(|| conn.with_db(heartbeat_database));
        Probe {
            conn,
            client: None,
            heartbeat_conn,
            heartbeat_client: None,
            data_dir,
        }
    }

    async fn client(&mut self) -> anyhow::Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect(&self.conn).await?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Seconds since the newest heartbeat row, or None without one (no table yet, or its
    /// database does not answer): lag in seconds then falls back to replay timestamps.
    async fn heartbeat_age(&mut self) -> Option<f64> {
        let client = match &self.heartbeat_conn {
            None => self.client().await.ok()?,
            Some(info) => {
                if self.heartbeat_client.as_ref().is_none_or(|c| c.is_closed()) {
                    match connect(info).await {
                        Ok(c) => self.heartbeat_client = Some(c),
                        Err(e) => {
                            tracing::debug!(error = %format!("{e:#}"), "cannot read the heartbeat");
                            return None;
                        }
                    }
                }
                self.heartbeat_client.as_ref()?
            }
        };
        // A connection gone half-open must not hold the refresh: the age is given up after a
        // second, and its own connection with it.
        match tokio::time::timeout(
            HEARTBEAT_READ_TIMEOUT,
            client.query_opt(HEARTBEAT_AGE_SQL, &[]),
        )
        .await
        {
            Ok(Ok(Some(r))) => r.get::<_, Option<f64>>(0),
            Ok(Ok(None)) | Ok(Err(_)) => None,
            Err(_) => {
                self.heartbeat_client = None;
                None
            }
        }
    }

    async fn read_state(&mut self) -> anyhow::Result<Snapshot> {
        let data_dir = self.data_dir.clone();
        let heartbeat_age = self.heartbeat_age().await;
        let client = self.client().await?;
        let row = client.query_one(sql::HEALTH_STATE, &[]).await?;
        let in_recovery: bool = row.get(0);
        let read_only: bool = row.get(11);
        let mut s = Snapshot {
            engine: Engine::Postgres,
            up: true,
            role: if in_recovery {
                Role::Replica
            } else {
                Role::Primary
            },
            writable: !in_recovery && !read_only,
            server_version: Some(row.get(1)),
            server_version_text: Some(row.get(2)),
            system_identifier: row.get(3),
            timeline: row.get::<_, Option<i32>>(4).map(|t| t as u32),
            postmaster_start_time: row.get(5),
            location: row.get::<_, Option<i64>>(6).map(|v| v as u64),
            ..Default::default()
        };
        s.heartbeat_age_seconds = heartbeat_age;

        if in_recovery {
            let received: Option<i64> = row.get(7);
            let replayed: Option<i64> = row.get(8);
            let paused: bool = row.get(9);
            let replay_ts: Option<DateTime<Utc>> = row.get(10);
            let receiver = client.query_opt(sql::HEALTH_RECEIVER, &[]).await?;
            let (streaming, broken_reason, latest_end, sender, tli) = match &receiver {
                // Without pg_read_all_stats the view shows the receiver's pid and nothing
                // else: say what grant is missing instead of guessing how it streams.
                Some(r) if r.get::<_, Option<String>>(0).is_none() => (
                    false,
                    Some(format!(
                        "WAL receiver state unreadable: role {user} needs pg_monitor (or pg_read_all_stats) to read pg_stat_wal_receiver: GRANT pg_monitor TO {user}",
                        user = r.get::<_, String>(5)
                    )),
                    None,
                    None,
                    None,
                ),
                Some(r) => {
                    let status: String = r.get(0);
                    let sender = match (r.get::<_, Option<String>>(2), r.get::<_, Option<i32>>(3)) {
                        (Some(h), Some(p)) => Some(format!("{h}:{p}")),
                        _ => None,
                    };
                    (
                        status == "streaming",
                        (status != "streaming").then(|| format!("WAL receiver is {status}")),
                        r.get::<_, Option<i64>>(1),
                        sender,
                        r.get::<_, Option<i32>>(4),
                    )
                }
                None => (
                    false,
                    Some("WAL receiver is not running: the primary is unreachable or streaming replication is not configured".to_string()),
                    None,
                    None,
                    None,
                ),
            };
            if let Some(t) = tli {
                s.timeline = Some(t as u32);
            }
            let received_max = received.max(latest_end);
            s.lag_bytes = match (received_max, replayed) {
                (Some(a), Some(b)) => Some(a.saturating_sub(b).max(0) as u64),
                _ => None,
            };
            s.lag_seconds = heartbeat_age.or_else(|| {
                // Without a heartbeat: caught up means 0, else time since the last replayed commit.
                match (received_max, replayed, replay_ts) {
                    (Some(a), Some(b), _) if a == b => Some(0.0),
                    (_, _, Some(ts)) => Some((Utc::now() - ts).num_milliseconds() as f64 / 1000.0),
                    _ => None,
                }
            });
            s.replica = Some(ReplicaState {
                streaming,
                broken_reason,
                paused,
                received_location: received_max.map(|v| v as u64),
                replayed_location: replayed.map(|v| v as u64),
                replayed_timestamp: replay_ts,
                sender,
            });
        } else {
            s.lag_bytes = Some(0);
            s.lag_seconds = Some(0.0);
            s.replication = client
                .query(sql::HEALTH_REPLICATION, &[])
                .await?
                .into_iter()
                .map(|r| Standby {
                    usename: r.get(0),
                    application_name: r.get(1),
                    client_addr: r.get(2),
                    state: r.get(3),
                    sync_state: r.get(4),
                    sync_priority: r.get(5),
                    lag_bytes: r.get::<_, Option<i64>>(6).map(|v| v.max(0) as u64),
                })
                .collect();
        }
        let a = client.query_one(sql::HEALTH_ARCHIVER, &[]).await?;
        s.archiver = Some(Archiver {
            archived_count: a.get(0),
            last_archived_wal: a.get(1),
            last_archived_time: a.get(2),
            failed_count: a.get(3),
            last_failed_wal: a.get(4),
            last_failed_time: a.get(5),
            ready: data_dir.as_deref().and_then(count_ready),
        });
        Ok(s)
    }
}

/// Segments waiting to be archived.
pub fn count_ready(data_dir: &std::path::Path) -> Option<u64> {
    let dir = std::fs::read_dir(data_dir.join("pg_wal").join("archive_status")).ok()?;
    Some(
        dir.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
            .count() as u64,
    )
}

#[async_trait::async_trait]
impl super::Prober for Probe {
    const ENGINE: Engine = Engine::Postgres;

    async fn read(&mut self) -> anyhow::Result<Snapshot> {
        self.read_state().await
    }

    fn reset(&mut self) {
        self.client = None;
        self.heartbeat_client = None;
    }
}
