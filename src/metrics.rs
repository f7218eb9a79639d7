//! Prometheus text exposition of the agent's state. Names follow the conventions users know
//! from postgres_exporter, mysqld_exporter and CloudNativePG; labels stay bounded.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};

use crate::health::Role;
use crate::serve::state::Shared;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", fmt_value(value));
    }

    fn gauge(&mut self, name: &str, help: &str, value: Option<f64>) {
        if let Some(v) = value {
            self.family(name, "gauge", help);
            self.sample(name, &[], v);
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn ts(t: Option<DateTime<Utc>>) -> Option<f64> {
    t.map(|t| t.timestamp_millis() as f64 / 1000.0)
}

fn bool01(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

pub fn render(shared: &Shared) -> String {
    let mut o = Out(String::with_capacity(4096));
    let (snap, age) = shared.snapshot();
    o.family("dbagent_info", "gauge", "Agent version and engine.");
    o.sample(
        "dbagent_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("engine", shared.engine),
        ],
        1.0,
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
    if let Some(s) = &snap {
        o.family(
            "dbagent_role",
            "gauge",
            "The server's role: 1 for the current one.",
        );
        for role in [Role::Primary, Role::Replica, Role::Unknown] {
            let name = match role {
                Role::Primary => "primary",
                Role::Replica => "replica",
                Role::Unknown => "unknown",
            };
            o.sample("dbagent_role", &[("role", name)], bool01(s.role == role));
        }
        o.gauge(
            "dbagent_writable",
            "Whether the server accepts writes.",
            Some(bool01(s.writable)),
        );
        o.gauge(
            "dbagent_timeline",
            "Current timeline (PostgreSQL).",
            s.timeline.map(f64::from),
        );
        o.gauge(
            "dbagent_replication_lag_bytes",
            "Bytes received but not yet replayed (0 on a primary).",
            s.lag_bytes.map(|v| v as f64),
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
            o.family(
                "dbagent_standby_lag_bytes",
                "gauge",
                "Primary: replay lag of each connected standby.",
            );
            for st in &s.replication {
                if let Some(lag) = st.lag_bytes {
                    o.sample(
                        "dbagent_standby_lag_bytes",
                        &[
                            ("application_name", &st.application_name),
                            ("client_addr", st.client_addr.as_deref().unwrap_or("")),
                        ],
                        lag as f64,
                    );
                }
            }
            o.gauge(
                "dbagent_standbys",
                "Primary: connected standbys.",
                Some(s.replication.len() as f64),
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
                a.archived_count as f64,
            );
            o.counter(
                "dbagent_archive_failures_total",
                "Failed archiving attempts (pg_stat_archiver).",
                a.failed_count as f64,
            );
            o.gauge(
                "dbagent_archive_ready_segments",
                "WAL files waiting to be archived (.ready).",
                a.ready.map(|v| v as f64),
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
        repo.last_backup_bytes.map(|v| v as f64),
    );
    o.gauge(
        "dbagent_backups",
        "Complete backups in the repository.",
        repo.refreshed.map(|_| repo.backups as f64),
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
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
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
    if shared.engine == "mysql" {
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
    o.counter(
        "dbagent_http_requests_total",
        "HTTP requests answered.",
        load(&c.http_requests),
    );

    let jobs = shared.jobs.lock().unwrap().clone();
    if !jobs.is_empty() {
        o.family(
            "dbagent_job_running",
            "gauge",
            "Whether a scheduled job is running.",
        );
        for (name, j) in &jobs {
            o.sample("dbagent_job_running", &[("job", name)], bool01(j.running));
        }
        o.family(
            "dbagent_job_last_run_timestamp_seconds",
            "gauge",
            "When a scheduled job last started.",
        );
        for (name, j) in &jobs {
            if let Some(t) = ts(j.last_start) {
                o.sample(
                    "dbagent_job_last_run_timestamp_seconds",
                    &[("job", name)],
                    t,
                );
            }
        }
        o.family(
            "dbagent_job_last_success_timestamp_seconds",
            "gauge",
            "When a scheduled job last succeeded.",
        );
        for (name, j) in &jobs {
            if let Some(t) = ts(j.last_success) {
                o.sample(
                    "dbagent_job_last_success_timestamp_seconds",
                    &[("job", name)],
                    t,
                );
            }
        }
        o.family(
            "dbagent_job_last_duration_seconds",
            "gauge",
            "How long a scheduled job's last run took.",
        );
        for (name, j) in &jobs {
            if let Some(d) = j.last_duration {
                o.sample(
                    "dbagent_job_last_duration_seconds",
                    &[("job", name)],
                    d.as_secs_f64(),
                );
            }
        }
        o.family(
            "dbagent_job_runs_total",
            "counter",
            "Scheduled job runs by result.",
        );
        for (name, j) in &jobs {
            o.sample(
                "dbagent_job_runs_total",
                &[("job", name), ("result", "success")],
                j.succeeded as f64,
            );
            o.sample(
                "dbagent_job_runs_total",
                &[("job", name), ("result", "failure")],
                j.failed as f64,
            );
        }
    }
    o.0
}
