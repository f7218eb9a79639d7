//! The agent's state as Prometheus metrics. Names follow the conventions users know from
//! postgres_exporter, mysqld_exporter and CloudNativePG; labels stay bounded.
//!
//! The state lives in `serve::state::Shared` and is read once per scrape into a
//! `prometheus-client` registry, which writes the text format (0.0.4, the format every
//! Prometheus scrapes): its `_total` suffix on counters, `_info` on the info metric, escaping
//! and number formatting.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::{
    EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

use crate::health::Role;
use crate::serve::state::Shared;

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, String)>;

/// One family's samples, read once per scrape, in a fixed order (prometheus-client's
/// `Family` holds live metrics in a hash map).
#[derive(Debug)]
struct Samples<M>(Vec<(Labels, M)>);

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Samples<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, m) in &self.0 {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Exposition(Registry);

impl Exposition {
    /// prometheus-client ends every help text with a period.
    fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.0.register(name, help.trim_end_matches('.'), metric);
    }

    fn gauge<N>(&mut self, name: &str, help: &str, value: Option<N>)
    where
        N: EncodeGaugeValue + std::fmt::Debug + Send + Sync + 'static,
    {
        if let Some(v) = value {
            self.register(name, help, ConstGauge::new(v));
        }
    }

    fn gauges<N>(&mut self, name: &str, help: &str, samples: Vec<(Labels, N)>)
    where
        N: EncodeGaugeValue + std::fmt::Debug + Send + Sync + 'static,
    {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, ConstGauge::new(v)))
            .collect();
        self.register(name, help, Samples(samples));
    }

    /// `name` as exposed, with `_total`; the registry adds the suffix itself.
    fn counter<N>(&mut self, name: &str, help: &str, value: N)
    where
        N: EncodeCounterValue + std::fmt::Debug + Send + Sync + 'static,
    {
        self.register(unsuffixed(name), help, ConstCounter::new(value));
    }

    fn counters(&mut self, name: &str, help: &str, samples: Vec<(Labels, u64)>) {
        let samples = samples
            .into_iter()
            .map(|(l, v)| (l, ConstCounter::new(v)))
            .collect();
        self.register(unsuffixed(name), help, Samples(samples));
    }
}

fn unsuffixed(name: &str) -> &str {
    name.strip_suffix("_total")
        .unwrap_or_else(|| panic!("counter {name} must end in _total"))
}

fn ts(t: Option<DateTime<Utc>>) -> Option<f64> {
    t.map(|t| t.timestamp_millis() as f64 / 1000.0)
}

fn bool01(b: bool) -> i64 {
    i64::from(b)
}

pub fn render(shared: &Shared) -> String {
    let mut o = Exposition(Registry::default());
    let (snap, age) = shared.snapshot();
    o.register(
        "dbagent",
        "Agent version and engine.",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("engine", shared.engine.as_str()),
        ]),
    );
    o.gauge(
        "dbagent_uptime_seconds",
        "Seconds since the agent started.",
        Some(shared.uptime().as_secs_f64()),
    );
    o.gauge(
        "dbagent_state_age_seconds",
        "Age of the latest database state snapshot.",
        Some(age.as_secs_f64()),
    );
    o.gauge(
        "dbagent_up",
        "Whether the database answered the latest check (1) or not (0).",
        Some(bool01(
            snap.as_ref()
                .is_some_and(|s| s.up && age <= shared.policy.stale_after),
        )),
    );
    // A snapshot past `stale_after` (the database hangs, the refresher is stuck) says nothing
    // about now: its role, lag and archiver figures are left out rather than repeated frozen,
    // and the role is "unknown", as the endpoints answer.
    let fresh = snap.as_ref().filter(|_| age <= shared.policy.stale_after);
    if fresh.is_none() {
        o.gauges(
            "dbagent_role",
            "The server's role: 1 for the current one.",
            [("primary", 0), ("replica", 0), ("unknown", 1)]
                .into_iter()
                .map(|(name, v)| (vec![("role", name.to_string())], v))
                .collect(),
        );
    }
    if let Some(s) = fresh {
        o.gauges(
            "dbagent_role",
            "The server's role: 1 for the current one.",
            [Role::Primary, Role::Replica, Role::Unknown]
                .into_iter()
                .map(|role| {
                    let name = match role {
                        Role::Primary => "primary",
                        Role::Replica => "replica",
                        Role::Unknown => "unknown",
                    };
                    (vec![("role", name.to_string())], bool01(s.role == role))
                })
                .collect(),
        );
        o.gauge(
            "dbagent_writable",
            "Whether the server accepts writes.",
            Some(bool01(s.writable)),
        );
        o.gauge(
            "dbagent_timeline",
            "Current timeline (PostgreSQL).",
            s.timeline,
        );
        o.gauge(
            "dbagent_replication_lag_bytes",
            "Bytes received but not yet replayed (0 on a primary).",
            s.lag_bytes,
        );
        o.gauge(
            "dbagent_replication_lag_seconds",
            "Replication lag in seconds, from the replayed heartbeat (0 on a primary).",
            s.lag_seconds,
        );
        o.gauge(
            "dbagent_heartbeat_age_seconds",
            "Age of the newest heartbeat row visible on this server.",
            s.heartbeat_age_seconds,
        );
        if let Some(r) = &s.replica {
            o.gauge(
                "dbagent_wal_receiver_up",
                "Replica: whether WAL streaming (PostgreSQL) or both replication threads (MySQL) run.",
                Some(bool01(r.streaming)),
            );
            o.gauge(
                "dbagent_replay_paused",
                "Replica: whether replay is paused.",
                Some(bool01(r.paused)),
            );
        }
        if s.role == Role::Primary {
            o.gauges(
                "dbagent_standby_lag_bytes",
                "Primary: replay lag of each connected standby.",
                s.replication
                    .iter()
                    .filter_map(|st| {
                        let labels = vec![
                            ("application_name", st.application_name.clone()),
                            ("client_addr", st.client_addr.clone().unwrap_or_default()),
                        ];
                        Some((labels, st.lag_bytes?))
                    })
                    .collect(),
            );
            o.gauge(
                "dbagent_standbys",
                "Primary: connected standbys.",
                Some(s.replication.len() as u64),
            );
        }
        if let Some(a) = &s.archiver {
            o.gauge(
                "dbagent_archive_last_success_timestamp_seconds",
                "When the last WAL file was archived.",
                ts(a.last_archived_time),
            );
            o.gauge(
                "dbagent_archive_last_failure_timestamp_seconds",
                "When archiving last failed.",
                ts(a.last_failed_time),
            );
            o.counter(
                "dbagent_archive_archived_total",
                "WAL files archived (pg_stat_archiver).",
                a.archived_count.max(0) as u64,
            );
            o.counter(
                "dbagent_archive_failures_total",
                "Failed archiving attempts (pg_stat_archiver).",
                a.failed_count.max(0) as u64,
            );
            o.gauge(
                "dbagent_archive_ready_segments",
                "WAL files waiting to be archived (.ready).",
                a.ready,
            );
        }
    }

    let repo = shared.repo.read().unwrap().clone();
    o.gauge(
        "dbagent_backup_last_success_timestamp_seconds",
        "When the newest complete backup became consistent.",
        ts(repo.last_backup_time),
    );
    o.gauge(
        "dbagent_backup_last_size_bytes",
        "Size of the newest complete backup (plain bytes).",
        repo.last_backup_bytes,
    );
    o.gauge(
        "dbagent_backups",
        "Complete backups in the repository.",
        repo.refreshed.map(|_| repo.backups as u64),
    );
    o.gauge(
        "dbagent_restorable_window_start_timestamp_seconds",
        "Earliest time a restore can reach.",
        ts(repo.window_start),
    );
    o.gauge(
        "dbagent_restorable_window_end_timestamp_seconds",
        "Latest time a restore can reach.",
        ts(repo.window_end),
    );
    o.gauge(
        "dbagent_timeline_forks",
        "Times the archived PostgreSQL timeline history forked (0: one line of history).",
        repo.timeline_forks.map(|v| v as u64),
    );
    o.gauge(
        "dbagent_repository_refresh_timestamp_seconds",
        "When the repository was last read.",
        ts(repo.refreshed),
    );

    if let Some(d) = &repo.drill {
        o.gauge(
            "dbagent_drill_last_result",
            "The newest restore drill passed (1) or failed (0).",
            Some(bool01(d.passed)),
        );
        o.gauge(
            "dbagent_drill_last_run_timestamp_seconds",
            "When the newest restore drill finished.",
            ts(Some(d.last_run)),
        );
        o.gauge(
            "dbagent_drill_last_success_timestamp_seconds",
            "When a restore drill last passed.",
            ts(d.last_success),
        );
        o.gauge(
            "dbagent_drill_duration_seconds",
            "How long the newest restore drill took.",
            Some(d.duration_seconds),
        );
        o.gauge(
            "dbagent_drill_rto_seconds",
            "The newest drill's restore time (measured RTO).",
            d.rto_seconds,
        );
    }

    let c = &shared.counters;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    o.counter(
        "dbagent_heartbeat_writes_total",
        "Heartbeat rows written.",
        load(&c.heartbeat_writes),
    );
    o.counter(
        "dbagent_heartbeat_failures_total",
        "Heartbeat writes that failed.",
        load(&c.heartbeat_failures),
    );
    o.counter(
        "dbagent_wal_lookahead_pushed_total",
        "WAL segments pushed ahead of the archiver.",
        load(&c.lookahead_pushed),
    );
    o.counter(
        "dbagent_wal_lookahead_failures_total",
        "Look-ahead WAL pushes that failed.",
        load(&c.lookahead_failures),
    );
    o.counters(
        "dbagent_wal_segment_answers_total",
        "Answers to wal-push asking whether the stream or the look-ahead stored a segment: stored (wal-push skips it) or not_stored (it pushes as usual).",
        vec![
            (
                vec![("answer", "stored".to_string())],
                load(&c.segment_answers_stored),
            ),
            (
                vec![("answer", "not_stored".to_string())],
                load(&c.segment_answers_not_stored),
            ),
        ],
    );
    if let Some(st) = shared.stream.read().unwrap().clone() {
        o.gauge(
            "dbagent_wal_stream_up",
            "1 while WAL streams from the replication slot into the repository (serve.wal_stream): 0 while disconnected, or while storing fails.",
            Some(bool01(st.up())),
        );
        o.gauge(
            "dbagent_wal_stream_stored_lsn_bytes",
            "The end of the streamed WAL the repository holds, as a byte position.",
            st.stored_lsn.map(|l| l.0),
        );
        o.gauge(
            "dbagent_wal_stream_last_stored_timestamp_seconds",
            "When streamed WAL was last stored.",
            ts(st.stored_at),
        );
        o.gauge(
            "dbagent_wal_stream_lag_bytes",
            "WAL received from the server and not yet stored.",
            match (st.received_lsn, st.stored_lsn) {
                (Some(r), Some(s)) => Some(r.0.saturating_sub(s.0)),
                _ => None,
            },
        );
        o.gauge(
            "dbagent_wal_stream_slot_retained_bytes",
            "WAL the streaming slot holds back on the server.",
            st.slot_retained_bytes,
        );
        o.counter(
            "dbagent_wal_stream_pieces_total",
            "Partial-segment objects stored by the stream.",
            st.pieces_stored,
        );
        o.counter(
            "dbagent_wal_stream_segments_total",
            "Complete segments stored by the stream.",
            st.segments_stored,
        );
        o.counter(
            "dbagent_wal_stream_gaps_total",
            "WAL the server removed before it was streamed (a dropped or invalidated slot).",
            st.gaps,
        );
    }
    if shared.engine == crate::engine::Engine::Mysql {
        o.counter(
            "dbagent_binlog_shipped_total",
            "Binlog files shipped.",
            load(&c.binlog_pushed),
        );
        o.counter(
            "dbagent_binlog_ship_failures_total",
            "Binlog shipping rounds that failed.",
            load(&c.binlog_failures),
        );
    }
    if let Some(f) = shared.binlog_stream_facts() {
        o.gauge(
            "dbagent_binlog_stream_up",
            "1 while binlogs stream from the server into the repository: 0 while disconnected, or while storing fails.",
            Some(bool01(f.connected && !f.store_failing)),
        );
        o.gauge(
            "dbagent_binlog_stream_gap",
            "1 when a binlog is missing past the newest dump (purged before the stream stored it): no restore crosses the gap until a new dump.",
            Some(bool01(f.gap.is_some())),
        );
        o.gauge(
            "dbagent_binlog_stream_last_event_timestamp_seconds",
            "The newest binlog event time the repository holds from the stream.",
            ts(f.last_event_time),
        );
        o.gauge(
            "dbagent_binlog_stream_last_stored_timestamp_seconds",
            "When the stream last stored a part in the repository.",
            ts(f.last_stored_at),
        );
        o.counter(
            "dbagent_binlog_stream_parts_total",
            "Streamed binlog parts stored.",
            f.parts_stored,
        );
        o.counter(
            "dbagent_binlog_stream_bytes_total",
            "Binlog bytes stored by the stream.",
            f.bytes_stored,
        );
    }
    o.counter(
        "dbagent_http_requests_total",
        "HTTP requests answered.",
        load(&c.http_requests),
    );

    let jobs = shared.jobs.lock().unwrap().clone();
    let per_job =
        |f: &dyn Fn(&crate::serve::state::JobStats) -> Option<f64>| -> Vec<(Labels, f64)> {
            jobs.iter()
                .filter_map(|(name, j)| Some((vec![("job", name.clone())], f(j)?)))
                .collect()
        };
    o.gauges(
        "dbagent_job_running",
        "Whether a scheduled job is running.",
        jobs.iter()
            .map(|(name, j)| (vec![("job", name.clone())], bool01(j.running)))
            .collect(),
    );
    o.gauges(
        "dbagent_job_last_run_timestamp_seconds",
        "When a scheduled job last started.",
        per_job(&|j| ts(j.last_start)),
    );
    o.gauges(
        "dbagent_job_last_success_timestamp_seconds",
        "When a scheduled job last succeeded.",
        per_job(&|j| ts(j.last_success)),
    );
    o.gauges(
        "dbagent_job_last_duration_seconds",
        "How long a scheduled job's last run took.",
        per_job(&|j| j.last_duration.map(|d| d.as_secs_f64())),
    );
    o.counters(
        "dbagent_job_runs_total",
        "Scheduled job runs by result.",
        jobs.iter()
            .flat_map(|(name, j)| {
                [("success", j.succeeded), ("failure", j.failed)].map(|(result, n)| {
                    (
                        vec![("job", name.clone()), ("result", result.to_string())],
                        n,
                    )
                })
            })
            .collect(),
    );

    let mut text = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut text, &o.0)
        .expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use super::*;
    use crate::health::{Archiver, LagLimits, Policy, ReplicaState, Snapshot, Standby};
    use crate::serve::state::{DrillFacts, JobStats, RepoFacts};

    fn shared(engine: crate::engine::Engine, s: Snapshot) -> std::sync::Arc<Shared> {
        let shared = Shared::new(
            Policy {
                stale_after: Duration::from_secs(3),
                loop_dead_after: Duration::from_secs(10),
                readiness: LagLimits::default(),
            },
            engine,
        );
        shared.set_snapshot(s);
        let t = Utc::now();
        *shared.repo.write().unwrap() = RepoFacts {
            last_backup_time: Some(t),
            last_backup_bytes: Some(123),
            backups: 2,
            window_start: Some(t),
            window_end: Some(t),
            refreshed: Some(t),
            error: None,
            drill: Some(DrillFacts {
                last_run: t,
                passed: true,
                duration_seconds: 61.5,
                rto_seconds: Some(42.0),
                last_success: Some(t),
            }),
            timeline_forks: Some(0),
            ..Default::default()
        };
        shared.job_update("backup", |j| {
            *j = JobStats {
                last_start: Some(t),
                last_duration: Some(Duration::from_secs(3)),
                last_success: Some(t),
                succeeded: 4,
                failed: 1,
                ..Default::default()
            }
        });
        shared.counters.heartbeat_writes.store(7, Ordering::Relaxed);
        shared.stream_update(|f| {
            f.slot = "dbagent".into();
            f.connected = true;
            f.received_lsn = Some(crate::repo::wal::Lsn(200));
            f.stored_lsn = Some(crate::repo::wal::Lsn(100));
            f.stored_at = Some(t);
            f.slot_retained_bytes = Some(4096);
        });
        shared
    }

    /// Every sample's name with its family's TYPE and its label names, from both roles.
    fn exposed() -> BTreeMap<String, (String, BTreeSet<String>)> {
        let primary = Snapshot {
            up: true,
            role: Role::Primary,
            writable: true,
            timeline: Some(1),
            lag_bytes: Some(0),
            lag_seconds: Some(0.0),
            heartbeat_age_seconds: Some(0.4),
            replication: vec![Standby {
                usename: None,
                application_name: "walreceiver".into(),
                client_addr: Some("10.0.0.2".into()),
                state: None,
                sync_state: None,
                sync_priority: None,
                lag_bytes: Some(16),
            }],
            archiver: Some(Archiver {
                archived_count: 10,
                last_archived_time: Some(Utc::now()),
                failed_count: 1,
                last_failed_time: Some(Utc::now()),
                ready: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        let replica = Snapshot {
            up: true,
            role: Role::Replica,
            replica: Some(ReplicaState {
                streaming: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mysql = shared(crate::engine::Engine::Mysql, replica);
        mysql
            .binlog_stream
            .get_or_init(Default::default)
            .set_for_test(crate::mysql::stream::StreamFacts {
                connected: true,
                last_event_time: Some(Utc::now()),
                last_stored_at: Some(Utc::now()),
                ..Default::default()
            });
        let mut out = BTreeMap::new();
        for body in [
            render(&shared(crate::engine::Engine::Postgres, primary)),
            render(&mysql),
        ] {
            let mut types = BTreeMap::new();
            for line in body.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let (name, kind) = rest.split_once(' ').unwrap();
                    types.insert(name.to_string(), kind.to_string());
                }
            }
            let scrape =
                prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
            for s in scrape.samples {
                let kind = types
                    .get(&s.metric)
                    .unwrap_or_else(|| panic!("no TYPE for {}:\n{body}", s.metric));
                let labels = s.labels.keys().cloned().collect();
                out.insert(s.metric.clone(), (kind.clone(), labels));
            }
        }
        out
    }

    /// The README's metrics table: every name with its label names.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let readme = include_str!("../README.md");
        let table = readme.split("\n#### Metrics\n").nth(1).unwrap();
        let table = table
            .split("\n\n")
            .find(|p| p.trim_start().starts_with('|'))
            .unwrap();
        let mut out = BTreeMap::new();
        for line in table.lines().skip(2) {
            let cell = line.trim_matches('|').split('|').next().unwrap();
            for name in cell.split('`').skip(1).step_by(2) {
                let (name, labels) = match name.split_once('{') {
                    Some((n, l)) => (
                        n,
                        l.trim_end_matches('}')
                            .split(',')
                            .map(str::to_string)
                            .collect(),
                    ),
                    None => (name, BTreeSet::new()),
                };
                out.insert(name.to_string(), labels);
            }
        }
        out
    }

    /// A snapshot gone stale (the database hangs) is not shown frozen: its role is unknown and
    /// its lag and replication figures are absent, so no dashboard or alert reads old values
    /// as current. Before, they kept their last values for as long as the hang lasted.
    #[test]
    fn a_stale_snapshot_is_not_shown_as_current() {
        let replica = Snapshot {
            up: true,
            role: Role::Replica,
            lag_bytes: Some(10),
            lag_seconds: Some(0.5),
            replica: Some(ReplicaState {
                streaming: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = shared(crate::engine::Engine::Postgres, replica);
        let fresh = render(&s);
        assert!(
            fresh.contains("dbagent_replication_lag_seconds 0.5"),
            "{fresh}"
        );
        assert!(
            fresh.contains("dbagent_role{role=\"replica\"} 1"),
            "{fresh}"
        );
        let stale = Shared::new(
            Policy {
                stale_after: Duration::ZERO,
                loop_dead_after: Duration::from_secs(10),
                readiness: LagLimits::default(),
            },
            crate::engine::Engine::Postgres,
        );
        stale.set_snapshot((*s.snapshot().0.unwrap()).clone());
        std::thread::sleep(Duration::from_millis(5));
        let text = render(&stale);
        assert!(text.contains("dbagent_up 0"), "{text}");
        assert!(text.contains("dbagent_role{role=\"unknown\"} 1"), "{text}");
        assert!(text.contains("dbagent_role{role=\"replica\"} 0"), "{text}");
        for gone in ["dbagent_replication_lag_seconds", "dbagent_wal_receiver_up"] {
            assert!(
                !text.contains(&format!("\n{gone} ")),
                "{gone} shown stale: {text}"
            );
        }
    }

    #[test]
    fn exposition_matches_the_readme() {
        let exposed = exposed();
        let documented = documented();
        let mut problems = Vec::new();
        for (name, labels) in &documented {
            match exposed.get(name) {
                None => problems.push(format!("{name} is documented but not exposed")),
                Some((_, got)) if got != labels => {
                    problems.push(format!("{name}: labels {got:?}, README says {labels:?}"))
                }
                Some(_) => {}
            }
        }
        for (name, (kind, _)) in &exposed {
            if !documented.contains_key(name) {
                problems.push(format!("{name} is exposed but not in the README"));
            }
            let want = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            if kind != want {
                problems.push(format!("{name} is a {kind}, expected a {want}"));
            }
        }
        assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    }
}
