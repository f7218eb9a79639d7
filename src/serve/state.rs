//! The agent's shared state: fixed parameters apart from changing state, and every change
//! going through one setter that logs what matters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::engine::Engine;
use crate::health::{Policy, Role, Snapshot};

/// Outcomes of one scheduled job.
#[derive(Debug, Clone, Default)]
pub struct JobStats {
    pub schedule: String,
    pub running: bool,
    pub last_start: Option<DateTime<Utc>>,
    pub last_duration: Option<Duration>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_exit_code: Option<i32>,
    pub succeeded: u64,
    pub failed: u64,
    pub next_run: Option<DateTime<Utc>>,
}

/// What the repository says, refreshed every few minutes (never per request).
#[derive(Debug, Clone, Default)]
pub struct RepoFacts {
    pub last_backup_time: Option<DateTime<Utc>>,
    pub last_backup_bytes: Option<u64>,
    pub backups: usize,
    pub window_start: Option<DateTime<Utc>>,
    pub window_end: Option<DateTime<Utc>>,
    pub refreshed: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub drill: Option<DrillFacts>,
    /// PostgreSQL: how many times the archived timeline history forked (branches beyond
    /// the first).
    pub timeline_forks: Option<usize>,
    /// MySQL: the first binlog missing from the archive past the newest dump's position (no
    /// restore reaches beyond it), and that dump's binlog file.
    pub binlog_gap: Option<String>,
    pub newest_dump_binlog: Option<String>,
}

/// The newest restore drill's outcome (from its report in the repository).
#[derive(Debug, Clone, Default)]
pub struct DrillFacts {
    pub last_run: DateTime<Utc>,
    pub passed: bool,
    pub duration_seconds: f64,
    pub rto_seconds: Option<f64>,
    pub last_success: Option<DateTime<Utc>>,
}

/// The WAL stream (`serve.wal_stream`), as `/status` and `/metrics` show it.
#[derive(Debug, Clone, Default)]
pub struct StreamFacts {
    pub slot: String,
    pub connected: bool,
    pub timeline: Option<u32>,
    /// The end of what the server sent.
    pub received_lsn: Option<crate::repo::wal::Lsn>,
    /// The end of what the repository holds (what the server was told is flushed).
    pub stored_lsn: Option<crate::repo::wal::Lsn>,
    pub stored_at: Option<DateTime<Utc>>,
    pub pieces_stored: u64,
    pub segments_stored: u64,
    /// WAL the server removed before it was streamed.
    pub gaps: u64,
    pub last_gap: Option<String>,
    /// WAL the slot holds back on the server, and the slot's `wal_status`.
    pub slot_retained_bytes: Option<u64>,
    pub slot_wal_status: Option<String>,
    /// Storing into the repository fails (retried meanwhile): WAL is received, acknowledged
    /// nowhere, and not streaming to the repository.
    pub store_failing: bool,
    pub error: Option<String>,
    /// Sessions that ended in an error (reconnected after), and the last one's reason, kept
    /// after a reconnect clears `error`: a flapping connection shows here.
    pub interruptions: u64,
    pub last_interruption: Option<String>,
}

impl StreamFacts {
    /// WAL streams from the slot into the repository.
    pub fn up(&self) -> bool {
        self.connected && !self.store_failing
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub heartbeat_writes: AtomicU64,
    pub heartbeat_failures: AtomicU64,
    pub lookahead_pushed: AtomicU64,
    pub lookahead_failures: AtomicU64,
    pub binlog_pushed: AtomicU64,
    pub binlog_failures: AtomicU64,
    pub http_requests: AtomicU64,
    /// `GET /wal/segments/<name>` answers: stored (wal-push may skip the segment), or not.
    pub segment_answers_stored: AtomicU64,
    pub segment_answers_not_stored: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub struct Shared {
    pub policy: Policy,
    pub engine: Engine,
    started: Instant,
    snapshot: RwLock<Option<(Instant, Arc<Snapshot>)>>,
    loop_tick: RwLock<Instant>,
    pub repo: RwLock<RepoFacts>,
    pub jobs: Mutex<BTreeMap<String, JobStats>>,
    pub counters: Counters,
    /// `None` unless `serve.wal_stream` is on.
    pub stream: RwLock<Option<StreamFacts>>,
    /// Set when `serve.wal_stream` streams binlogs (MySQL/MariaDB).
    pub binlog_stream: std::sync::OnceLock<Arc<crate::mysql::stream::StreamStatus>>,
    /// Complete segments the WAL stream or the look-ahead stored, for `wal-push`'s fast path.
    pub segments: StoredSegments,
    /// `Config::repository_identity` of the repository those segments are stored in.
    pub repository: std::sync::OnceLock<String>,
}

impl Shared {
    pub fn new(policy: Policy, engine: Engine) -> Arc<Shared> {
        let now = Instant::now();
        Arc::new(Shared {
            policy,
            engine,
            started: now,
            snapshot: RwLock::new(None),
            loop_tick: RwLock::new(now),
            repo: RwLock::new(RepoFacts::default()),
            jobs: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            stream: RwLock::new(None),
            binlog_stream: std::sync::OnceLock::new(),
            segments: StoredSegments::default(),
            repository: std::sync::OnceLock::new(),
        })
    }

    /// The binlog stream's facts (`None` unless it runs), with the gap the stream and the
    /// repository say together: what the stream found purged, until a dump starts past it,
    /// or what the repository shows missing past the newest dump (which outlives a restart).
    pub fn binlog_stream_facts(&self) -> Option<crate::mysql::stream::StreamFacts> {
        let mut f = self.binlog_stream.get()?.facts();
        f.gap = binlog_gap(&f, &self.repo.read().unwrap());
        Some(f)
    }

    /// The latest snapshot and its age.
    pub fn snapshot(&self) -> (Option<Arc<Snapshot>>, Duration) {
        match &*self.snapshot.read().unwrap() {
            Some((at, s)) => (Some(s.clone()), at.elapsed()),
            None => (None, self.started.elapsed()),
        }
    }

    /// Stores a new snapshot; logs role changes and the database going up or down.
    pub fn set_snapshot(&self, s: Snapshot) {
        let mut guard = self.snapshot.write().unwrap();
        let previous = guard.as_ref().map(|(_, p)| (p.role, p.up));
        let now = (s.role, s.up);
        if previous != Some(now) {
            match (previous, s.up) {
                (_, false) => {
                    tracing::warn!(error = s.error.as_deref().unwrap_or(""), "database is down")
                }
                (Some((old, _)), true) if old != s.role && old != Role::Unknown => {
                    tracing::warn!(from = ?old, to = ?s.role, "role changed")
                }
                _ => tracing::info!(role = ?s.role, "database is up"),
            }
        }
        *guard = Some((Instant::now(), Arc::new(s)));
    }

    /// The agent loop is alive (the refresher calls this every round, whatever the database does).
    pub fn tick(&self) {
        *self.loop_tick.write().unwrap() = Instant::now();
    }

    pub fn loop_age(&self) -> Duration {
        self.loop_tick.read().unwrap().elapsed()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stream_update(&self, f: impl FnOnce(&mut StreamFacts)) {
        let mut guard = self.stream.write().unwrap();
        f(guard.get_or_insert_with(StreamFacts::default));
    }

    pub fn job_update(&self, name: &str, f: impl FnOnce(&mut JobStats)) {
        let mut jobs = self.jobs.lock().unwrap();
        f(jobs.entry(name.to_string()).or_default());
    }
}

/// The complete WAL segments this process stored from the stream or pushed from `pg_wal` by
/// the look-ahead (or found stored with the very same bytes), newest last and bounded.
/// `wal-push` asks about a segment through `GET /wal/segments/<name>` and, told it is stored,
/// skips reading and uploading it. Only what this process stored counts, never what a listing
/// shows: the bytes came from the server whose `pg_wal` holds the file PostgreSQL asks to
/// archive.
#[derive(Debug)]
pub struct StoredSegments {
    /// (system identifier, segment name).
    stored: Mutex<std::collections::VecDeque<(u64, String)>>,
    /// Bumped on every addition, for answers that wait for a segment still being stored.
    added: tokio::sync::watch::Sender<u64>,
}

impl Default for StoredSegments {
    fn default() -> StoredSegments {
        StoredSegments {
            stored: Mutex::new(std::collections::VecDeque::new()),
            added: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl StoredSegments {
    /// How many segments are remembered: far more than PostgreSQL's archiver ever lags.
    pub const KEEP: usize = 4096;

    pub fn add(&self, sysid: u64, name: &str) {
        let mut stored = self.stored.lock().unwrap();
        if stored.iter().any(|(s, n)| *s == sysid && n == name) {
            return;
        }
        if stored.len() >= Self::KEEP {
            stored.pop_front();
        }
        stored.push_back((sysid, name.to_string()));
        drop(stored);
        self.added.send_modify(|n| *n += 1);
    }

    pub fn contains(&self, sysid: u64, name: &str) -> bool {
        self.stored
            .lock()
            .unwrap()
            .iter()
            .any(|(s, n)| *s == sysid && n == name)
    }

    /// Whether the segment is stored, waiting up to `wait` for it to be.
    pub async fn wait_for(&self, sysid: u64, name: &str, wait: Duration) -> bool {
        let mut added = self.added.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.contains(sysid, name) {
                return true;
            }
            match tokio::time::timeout_at(deadline, added.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.contains(sysid, name),
            }
        }
    }
}

/// The binlog gap no restore from the newest dump crosses: the stream's own report unless
/// a dump taken past it supersedes it, else the repository's.
fn binlog_gap(stream: &crate::mysql::stream::StreamFacts, repo: &RepoFacts) -> Option<String> {
    use crate::repo::mysql::BinlogName;
    let superseded = |file: &str| {
        let dump = repo
            .newest_dump_binlog
            .as_deref()
            .and_then(BinlogName::parse);
        match (dump, BinlogName::parse(file)) {
            (Some(d), Some(g)) => d.base == g.base && d.seq > g.seq,
            _ => false,
        }
    };
    match (&stream.gap, &stream.gap_file) {
        (Some(gap), Some(file)) if !superseded(file) => Some(gap.clone()),
        _ => repo
            .binlog_gap
            .as_ref()
            .map(|file| format!("{file} is missing from the archive")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_segments_are_bounded_and_awaitable() {
        let s = StoredSegments::default();
        s.add(7, "000000010000000000000001");
        assert!(s.contains(7, "000000010000000000000001"));
        assert!(
            !s.contains(8, "000000010000000000000001"),
            "another cluster's"
        );
        assert!(
            !s.wait_for(7, "000000010000000000000002", Duration::ZERO)
                .await
        );
        let s = Arc::new(s);
        let adder = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            adder.add(7, "000000010000000000000002");
        });
        assert!(
            s.wait_for(7, "000000010000000000000002", Duration::from_secs(10))
                .await
        );
        for i in 0..StoredSegments::KEEP {
            s.add(7, &format!("{i:024X}"));
        }
        assert!(
            !s.contains(7, "000000010000000000000001"),
            "the oldest is forgotten"
        );
    }

    #[test]
    fn a_binlog_gap_lasts_until_a_dump_starts_past_it() {
        let stream = crate::mysql::stream::StreamFacts {
            gap: Some("b.000003 from position 300".into()),
            gap_file: Some("b.000003".into()),
            ..Default::default()
        };
        let mut repo = RepoFacts {
            newest_dump_binlog: Some("b.000002".into()),
            ..Default::default()
        };
        // The stream's report, before the repository shows the gap and after.
        assert_eq!(
            binlog_gap(&stream, &repo).unwrap(),
            "b.000003 from position 300"
        );
        repo.binlog_gap = Some("b.000003".into());
        assert_eq!(
            binlog_gap(&stream, &repo).unwrap(),
            "b.000003 from position 300"
        );
        // A restarted sidecar no longer knows; the repository still does.
        let restarted = crate::mysql::stream::StreamFacts::default();
        assert_eq!(
            binlog_gap(&restarted, &repo).unwrap(),
            "b.000003 is missing from the archive"
        );
        // A dump whose position is in the gap's file does not supersede it.
        repo.newest_dump_binlog = Some("b.000003".into());
        assert!(binlog_gap(&stream, &repo).is_some());
        // A dump past it does (and the repository reads no gap from it).
        repo.newest_dump_binlog = Some("b.000004".into());
        repo.binlog_gap = None;
        assert_eq!(binlog_gap(&stream, &repo), None);
        assert_eq!(binlog_gap(&restarted, &repo), None);
        // Another base name is another sequence: no order to compare, the report stays.
        repo.newest_dump_binlog = Some("other.000009".into());
        assert!(binlog_gap(&stream, &repo).is_some());
    }
}
