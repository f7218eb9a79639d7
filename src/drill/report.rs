//! The drill report: stored in the repository as JSON, printed for people, exported as metrics.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    pub status: Status,
    pub detail: String,
}

impl CheckResult {
    pub fn new(
        name: &str,
        database: Option<&str>,
        status: Status,
        detail: impl Into<String>,
    ) -> CheckResult {
        CheckResult {
            name: name.to_string(),
            database: database.map(str::to_string),
            status,
            detail: detail.into(),
        }
    }
}

impl CheckResult {
    /// Passes saying `passed` when there are no problems; else fails naming them all.
    pub fn judged(
        name: &str,
        database: Option<&str>,
        problems: &[String],
        passed: impl Into<String>,
    ) -> CheckResult {
        match problems {
            [] => CheckResult::new(name, database, Status::Pass, passed),
            _ => CheckResult::new(name, database, Status::Fail, problems.join("; ")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format_version: u32,
    pub id: String,
    pub engine: Engine,
    pub cluster: String,
    /// What was restored (a base backup or dump id).
    pub backup: Option<String>,
    /// `latest` or the target instant.
    pub target: String,
    /// Where the restore landed (the last replayed commit / newest heartbeat).
    pub landed_at: Option<String>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub duration_seconds: f64,
    /// Restore until the server accepted queries: the measured RTO.
    pub rto_seconds: Option<f64>,
    pub result: Status,
    /// Private in an encrypted repository (see `repo::private`).
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    pub dbagent_version: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.result == Status::Pass
    }

    pub fn failures(&self) -> Vec<&CheckResult> {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .collect()
    }

    /// One line per check, for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "restore drill {} ({}, cluster {}): {}\n",
            self.id,
            self.engine,
            self.cluster,
            match self.result {
                Status::Pass => "PASSED",
                _ => "FAILED",
            }
        );
        out.push_str(&format!(
            "  backup {}, target {}, landed at {}, restore took {}, drill took {:.1}s\n",
            self.backup.as_deref().unwrap_or("-"),
            self.target,
            self.landed_at.as_deref().unwrap_or("-"),
            self.rto_seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "-".into()),
            self.duration_seconds
        ));
        for c in &self.checks {
            let mark = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            let db = c
                .database
                .as_deref()
                .map(|d| format!(" [{d}]"))
                .unwrap_or_default();
            out.push_str(&format!("  {mark}  {}{db}: {}\n", c.name, c.detail));
        }
        out
    }

    /// Prometheus text for a Pushgateway (the same names `serve` exports).
    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let result = if self.passed() { 1 } else { 0 };
        m.push_str("# TYPE dbagent_drill_last_result gauge\n");
        m.push_str(&format!("dbagent_drill_last_result {result}\n"));
        m.push_str("# TYPE dbagent_drill_last_run_timestamp_seconds gauge\n");
        m.push_str(&format!(
            "dbagent_drill_last_run_timestamp_seconds {}\n",
            self.finished.timestamp()
        ));
        if self.passed() {
            m.push_str("# TYPE dbagent_drill_last_success_timestamp_seconds gauge\n");
            m.push_str(&format!(
                "dbagent_drill_last_success_timestamp_seconds {}\n",
                self.finished.timestamp()
            ));
        }
        m.push_str("# TYPE dbagent_drill_duration_seconds gauge\n");
        m.push_str(&format!(
            "dbagent_drill_duration_seconds {}\n",
            self.duration_seconds
        ));
        if let Some(rto) = self.rto_seconds {
            m.push_str("# TYPE dbagent_drill_rto_seconds gauge\n");
            m.push_str(&format!("dbagent_drill_rto_seconds {rto}\n"));
        }
        m
    }
}
