//! Role and lag state, and the pure decisions the health endpoints make from it.
//!
//! A background refresher (`pg::Probe`, `mysql` probe) takes a `Snapshot` once a second;
//! every endpoint answers from the latest snapshot and never queries the database, so a
//! probe costs microseconds and a slow database cannot make probes time out.

pub mod mysql;
pub mod pg;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::engine::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
    #[default]
    Unknown,
}

/// A source of snapshots (one per engine).
#[async_trait::async_trait]
pub trait Prober: Send {
    const ENGINE: Engine;
    /// Reads the server's state (on a connection kept between reads).
    async fn read(&mut self) -> anyhow::Result<Snapshot>;
    /// Drops the connection (after an error, or a timeout with a query still pending on it).
    fn reset(&mut self);

    /// One refresh. Never fails: a database that does not answer is `up = false`.
    async fn snapshot(&mut self) -> Snapshot {
        let now = Utc::now();
        let read = self.read().await;
        if read.is_err() {
            self.reset();
        }
        Snapshot::taken(Self::ENGINE, now, read)
    }
}

/// One standby as the primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standby {
    pub usename: Option<String>,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub sync_state: Option<String>,
    pub sync_priority: Option<i32>,
    pub lag_bytes: Option<u64>,
}

/// The replica side of replication: is the stream connected, how far behind.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ReplicaState {
    /// The WAL receiver (PostgreSQL) or both replication threads (MySQL) are running.
    pub streaming: bool,
    /// Why it is not streaming, when it is not.
    pub broken_reason: Option<String>,
    pub paused: bool,
    pub received_location: Option<u64>,
    pub replayed_location: Option<u64>,
    pub replayed_timestamp: Option<DateTime<Utc>>,
    pub sender: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Archiver {
    pub archived_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
    pub failed_count: i64,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<DateTime<Utc>>,
    /// Segments waiting in `pg_wal/archive_status/*.ready` (when the data directory is shared).
    pub ready: Option<u64>,
}

/// What the refresher saw at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Snapshot {
    pub engine: Engine,
    pub taken_at: DateTime<Utc>,
    /// The database answered.
    pub up: bool,
    pub error: Option<String>,
    pub role: Role,
    /// Accepts writes (PostgreSQL: not in recovery and not read-only; MySQL: read_only=OFF).
    pub writable: bool,
    pub server_version: Option<i64>,
    pub server_version_text: Option<String>,
    pub timeline: Option<u32>,
    pub system_identifier: Option<String>,
    pub postmaster_start_time: Option<DateTime<Utc>>,
    /// Current write position on a primary.
    pub location: Option<u64>,
    pub replica: Option<ReplicaState>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    /// Age of the newest heartbeat row this server can see.
    pub heartbeat_age_seconds: Option<f64>,
    pub replication: Vec<Standby>,
    pub archiver: Option<Archiver>,
}

impl Snapshot {
    /// A refresh's result, stamped: a failed read means the database is down, and says why.
    pub fn taken(engine: Engine, at: DateTime<Utc>, read: anyhow::Result<Snapshot>) -> Snapshot {
        match read {
            Ok(s) => Snapshot { taken_at: at, ..s },
            Err(e) => Snapshot {
                engine,
                taken_at: at,
                up: false,
                error: Some(format!("{e:#}").replace('\n', " ")),
                ..Default::default()
            },
        }
    }
}

/// The endpoints' questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Primary,
    Replica,
    ReadOnly,
    Health,
    Liveness,
    Readiness,
}

/// Per-request limits (`?lag=`, `?max_lag_seconds=`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LagLimits {
    pub bytes: Option<u64>,
    pub seconds: Option<f64>,
}

/// Fixed parameters of the evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A snapshot older than this means "unknown", not "healthy".
    pub stale_after: Duration,
    /// The agent loop counts as dead when it has not ticked for this long.
    pub loop_dead_after: Duration,
    /// What `/readiness` demands of a replica.
    pub readiness: LagLimits,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: Option<String>,
}

impl Verdict {
    fn yes() -> Verdict {
        Verdict {
            ok: true,
            reason: None,
        }
    }
    fn no(reason: impl Into<String>) -> Verdict {
        Verdict {
            ok: false,
            reason: Some(reason.into()),
        }
    }
}

/// Answers `check` from a snapshot of age `age`, with the agent loop last seen `loop_age` ago.
pub fn evaluate(
    check: Check,
    snap: Option<&Snapshot>,
    age: Duration,
    loop_age: Duration,
    limits: LagLimits,
    policy: &Policy,
) -> Verdict {
    if check == Check::Liveness {
        return if loop_age <= policy.loop_dead_after {
            Verdict::yes()
        } else {
            Verdict::no(format!(
                "the agent loop has not run for {:.0}s",
                loop_age.as_secs_f64()
            ))
        };
    }
    let Some(snap) = snap else {
        return Verdict::no("no state yet: the first check of the database has not finished");
    };
    if age > policy.stale_after {
        return Verdict::no(format!(
            "state is {:.1}s old (limit {:.0}s): the database did not answer in time",
            age.as_secs_f64(),
            policy.stale_after.as_secs_f64()
        ));
    }
    if !snap.up {
        return Verdict::no(format!(
            "database is down: {}",
            snap.error.as_deref().unwrap_or("no answer")
        ));
    }
    match check {
        Check::Liveness => unreachable!("answered above"),
        Check::Health => Verdict::yes(),
        Check::Primary => primary(snap),
        Check::Replica => replica(snap, limits),
        Check::ReadOnly => {
            let p = primary(snap);
            if p.ok { p } else { replica(snap, limits) }
        }
        Check::Readiness => match snap.role {
            Role::Primary => primary(snap),
            Role::Replica => replica(snap, merge(limits, policy.readiness)),
            Role::Unknown => Verdict::no("role unknown"),
        },
    }
}

fn merge(a: LagLimits, b: LagLimits) -> LagLimits {
    LagLimits {
        bytes: a.bytes.or(b.bytes),
        seconds: a.seconds.or(b.seconds),
    }
}

fn primary(snap: &Snapshot) -> Verdict {
    match (snap.role, snap.writable) {
        (Role::Primary, true) => Verdict::yes(),
        (Role::Primary, false) => Verdict::no("primary is read-only"),
        (Role::Replica, _) => Verdict::no("not the primary: running as a replica"),
        (Role::Unknown, _) => Verdict::no("role unknown"),
    }
}

fn replica(snap: &Snapshot, limits: LagLimits) -> Verdict {
    if snap.role != Role::Replica {
        return Verdict::no("not a replica: running as the primary");
    }
    let Some(r) = &snap.replica else {
        return Verdict::no("replica state unknown");
    };
    if !r.streaming {
        return Verdict::no(format!(
            "replica is not streaming: {}",
            r.broken_reason
                .as_deref()
                .unwrap_or("replication is not connected")
        ));
    }
    if let Some(max) = limits.bytes {
        match snap.lag_bytes {
            Some(lag) if lag > max => {
                return Verdict::no(format!(
                    "replication lag {lag} bytes is over the limit of {max} bytes"
                ));
            }
            None => return Verdict::no("replication lag in bytes is unknown"),
            _ => {}
        }
    }
    if let Some(max) = limits.seconds {
        match snap.lag_seconds {
            Some(lag) if lag > max => {
                return Verdict::no(format!(
                    "replication lag {lag:.1}s is over the limit of {max}s"
                ));
            }
            None => {
                return Verdict::no(
                    "replication lag in seconds is unknown (no heartbeat replayed yet)",
                );
            }
            _ => {}
        }
    }
    Verdict::yes()
}

/// Patroni's status body plus dbagent's additions.
pub fn status_json(
    snap: Option<&Snapshot>,
    age: Duration,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{Value, json};
    let mut m = serde_json::Map::new();
    let Some(s) = snap else {
        m.insert("state".into(), json!("unknown"));
        m.insert("role".into(), json!("unknown"));
        m.extend(extra.clone());
        return m;
    };
    m.insert(
        "state".into(),
        json!(if s.up { "running" } else { "stopped" }),
    );
    m.insert("role".into(), json!(s.role));
    if let Some(t) = s.postmaster_start_time {
        m.insert("postmaster_start_time".into(), json!(t.to_rfc3339()));
    }
    if let Some(v) = s.server_version {
        m.insert("server_version".into(), json!(v));
    }
    if let Some(t) = s.timeline {
        m.insert("timeline".into(), json!(t));
    }
    if let Some(id) = &s.system_identifier {
        m.insert("database_system_identifier".into(), json!(id));
    }
    let xlog = match (&s.replica, s.role) {
        (Some(r), Role::Replica) => json!({
            "received_location": r.received_location,
            "replayed_location": r.replayed_location,
            "replayed_timestamp": r.replayed_timestamp.map(|t| t.to_rfc3339()),
            "paused": r.paused,
        }),
        _ => json!({ "location": s.location }),
    };
    m.insert("xlog".into(), xlog);
    if s.role == Role::Primary {
        m.insert(
            "replication".into(),
            serde_json::to_value(&s.replication).unwrap_or(Value::Null),
        );
    }
    m.insert("engine".into(), json!(s.engine));
    m.insert("lag_bytes".into(), json!(s.lag_bytes));
    m.insert("lag_seconds".into(), json!(s.lag_seconds));
    m.insert(
        "heartbeat_age_seconds".into(),
        json!(s.heartbeat_age_seconds),
    );
    m.insert("state_age_seconds".into(), json!(age.as_secs_f64()));
    if let Some(r) = &s.replica {
        m.insert("streaming".into(), json!(r.streaming));
    }
    if let Some(a) = &s.archiver {
        m.insert("last_archived_wal".into(), json!(a.last_archived_wal));
        m.insert(
            "last_archived_time".into(),
            json!(a.last_archived_time.map(|t| t.to_rfc3339())),
        );
        m.insert("archive_failed_count".into(), json!(a.failed_count));
    }
    if let Some(e) = &s.error {
        m.insert("error".into(), json!(e));
    }
    m.extend(extra.clone());
    m
}

/// Parses Patroni's `?lag=` values: plain bytes or with a unit (`16kB`, `64MB`, `1GB`).
pub fn parse_lag(s: &str) -> Option<u64> {
    crate::config::parse_size(s).map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        stale_after: Duration::from_secs(3),
        loop_dead_after: Duration::from_secs(10),
        readiness: LagLimits {
            bytes: Some(16 << 20),
            seconds: Some(30.0),
        },
    };

    fn primary_snap() -> Snapshot {
        Snapshot {
            up: true,
            role: Role::Primary,
            writable: true,
            ..Default::default()
        }
    }

    fn replica_snap(streaming: bool, lag_bytes: u64, lag_seconds: f64) -> Snapshot {
        Snapshot {
            up: true,
            role: Role::Replica,
            replica: Some(ReplicaState {
                streaming,
                broken_reason: (!streaming).then(|| "WAL receiver is not running".to_string()),
                ..Default::default()
            }),
            lag_bytes: Some(lag_bytes),
            lag_seconds: Some(lag_seconds),
            ..Default::default()
        }
    }

    fn eval(check: Check, s: &Snapshot, limits: LagLimits) -> Verdict {
        evaluate(
            check,
            Some(s),
            Duration::from_millis(500),
            Duration::from_millis(500),
            limits,
            &POLICY,
        )
    }

    #[test]
    fn primary_and_replica_answer_opposite() {
        let none = LagLimits::default();
        let p = primary_snap();
        let r = replica_snap(true, 0, 0.5);
        assert!(eval(Check::Primary, &p, none).ok);
        assert!(!eval(Check::Primary, &r, none).ok);
        assert!(eval(Check::Replica, &r, none).ok);
        assert!(!eval(Check::Replica, &p, none).ok);
        assert!(eval(Check::ReadOnly, &p, none).ok);
        assert!(eval(Check::ReadOnly, &r, none).ok);
        assert!(eval(Check::Readiness, &p, none).ok);
        assert!(eval(Check::Readiness, &r, none).ok);
    }

    #[test]
    fn lag_limits() {
        let r = replica_snap(true, 2 << 20, 5.0);
        let v = eval(
            Check::Replica,
            &r,
            LagLimits {
                bytes: Some(1 << 20),
                seconds: None,
            },
        );
        assert!(!v.ok);
        assert!(v.reason.unwrap().contains("over the limit"));
        assert!(
            eval(
                Check::Replica,
                &r,
                LagLimits {
                    bytes: Some(4 << 20),
                    seconds: None
                }
            )
            .ok
        );
        assert!(
            !eval(
                Check::Replica,
                &r,
                LagLimits {
                    bytes: None,
                    seconds: Some(2.0)
                }
            )
            .ok
        );
        assert!(
            eval(
                Check::Replica,
                &r,
                LagLimits {
                    bytes: None,
                    seconds: Some(10.0)
                }
            )
            .ok
        );
    }

    #[test]
    fn a_replica_that_is_not_streaming_is_never_healthy() {
        // Lag 0 because nothing arrives: the classic false "healthy".
        let r = replica_snap(false, 0, 0.0);
        let v = eval(
            Check::Replica,
            &r,
            LagLimits {
                bytes: Some(1 << 30),
                seconds: None,
            },
        );
        assert!(!v.ok);
        assert!(v.reason.unwrap().contains("not streaming"));
        assert!(!eval(Check::Readiness, &r, LagLimits::default()).ok);
        assert!(
            eval(Check::Health, &r, LagLimits::default()).ok,
            "the database itself is up"
        );
    }

    #[test]
    fn stale_or_down_is_not_healthy_but_liveness_holds() {
        let p = primary_snap();
        let v = evaluate(
            Check::Primary,
            Some(&p),
            Duration::from_secs(5),
            Duration::ZERO,
            LagLimits::default(),
            &POLICY,
        );
        assert!(!v.ok);
        assert!(v.reason.unwrap().contains("old"));
        let down = Snapshot {
            up: false,
            error: Some("connection refused".into()),
            ..Default::default()
        };
        for check in [
            Check::Health,
            Check::Readiness,
            Check::Primary,
            Check::Replica,
        ] {
            assert!(!eval(check, &down, LagLimits::default()).ok, "{check:?}");
        }
        assert!(eval(Check::Liveness, &down, LagLimits::default()).ok);
        let dead = evaluate(
            Check::Liveness,
            None,
            Duration::ZERO,
            Duration::from_secs(60),
            LagLimits::default(),
            &POLICY,
        );
        assert!(!dead.ok);
    }

    #[test]
    fn patroni_lag_units() {
        assert_eq!(parse_lag("16kB"), Some(16 * 1024));
        assert_eq!(parse_lag("64MB"), Some(64 << 20));
        assert_eq!(parse_lag("1GB"), Some(1 << 30));
        assert_eq!(parse_lag("1000"), Some(1000));
        assert_eq!(parse_lag("lots"), None);
    }

    #[test]
    fn status_body_keeps_patroni_keys() {
        let mut r = replica_snap(true, 10, 0.2);
        r.timeline = Some(2);
        r.system_identifier = Some("7".into());
        r.server_version = Some(150019);
        let m = status_json(Some(&r), Duration::from_millis(300), &Default::default());
        for key in [
            "state",
            "role",
            "server_version",
            "timeline",
            "xlog",
            "database_system_identifier",
            "lag_bytes",
            "lag_seconds",
        ] {
            assert!(m.contains_key(key), "missing {key}");
        }
        assert_eq!(m["role"], "replica");
        assert!(m["xlog"].get("replayed_location").is_some());
    }
}
