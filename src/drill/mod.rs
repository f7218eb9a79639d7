//! `dbagent drill`: restore into a scratch server, check it, report.
//!
//! Plan first (which backup, which target: the newest restorable point, a random point in
//! the window, or a given time), then restore into a server that dbagent initialises in a
//! temporary directory on a private socket and always tears down, then check, then report:
//! the JSON report goes into the repository, a summary to stdout, metrics to a Pushgateway
//! (and `serve`), and a webhook on failure.
//!
//! This module is what both engines share: targets, the run with its deadline and signals,
//! the scratch directory, publishing and the heartbeat judgement. `pg` and `mysql` hold each
//! engine's restore and checks.

pub mod mysql;
pub mod pg;
pub mod report;
pub mod suite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::engine::Engine;
use crate::repo::catalog::Window;
use crate::restore::plan::Target;
use crate::storage::Store;
use report::{CheckResult, Report, Status};

pub const REPORT_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrillTarget {
    /// The newest restorable point.
    Latest,
    /// A random instant inside the restorable window.
    Random,
    At(DateTime<Utc>),
}

/// A uniformly random instant inside the windows (weighted by their length).
pub fn random_point(windows: &[Window], seed: u64) -> Option<DateTime<Utc>> {
    let total: i64 = windows
        .iter()
        .map(|w| (w.to - w.from).num_milliseconds().max(0))
        .sum();
    if windows.is_empty() {
        return None;
    }
    if total == 0 {
        return Some(windows[0].to);
    }
    // xorshift64*: plenty for picking a moment.
    let mut x = seed | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    let r = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % total as u64) as i64;
    let mut left = r;
    for w in windows {
        let len = (w.to - w.from).num_milliseconds().max(0);
        if left < len {
            return Some(w.from + chrono::Duration::milliseconds(left + 1).min(w.to - w.from));
        }
        left -= len;
    }
    windows.last().map(|w| w.to)
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32)
}

/// The drill's scratch directory, removed with everything in it when dropped, whatever
/// happened (a failed check, an error, SIGTERM). The server inside it is a value of its own,
/// created after this one, so it is stopped first.
struct ScratchDir(Option<tempfile::TempDir>);

impl ScratchDir {
    fn new(cfg: &Config) -> anyhow::Result<ScratchDir> {
        let mut b = tempfile::Builder::new();
        b.prefix("dbagent-drill-");
        let dir = match &cfg.drill.scratch_dir {
            Some(root) => {
                std::fs::create_dir_all(root)
                    .with_context(|| format!("creating {}", root.display()))?;
                b.tempdir_in(root)
            }
            None => b.tempdir(),
        }
        .context("creating the scratch directory")?;
        Ok(ScratchDir(Some(dir)))
    }

    fn path(&self) -> &Path {
        self.0.as_ref().expect("present until drop").path()
    }

    /// Where the scratch server's data goes.
    fn data(&self) -> PathBuf {
        self.path().join("data")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove the drill's scratch directory");
            }
        }
    }
}

/// A finished drill: its report, stored under `key`.
#[derive(Debug)]
pub struct Drilled {
    pub key: String,
    pub report: Report,
}

impl std::fmt::Display for Drilled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.report.render().trim_end())
    }
}

impl serde::Serialize for Drilled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.report.serialize(s)
    }
}

impl Drilled {
    /// A failed check fails the command (exit 2), once the report is out.
    pub fn verdict(&self) -> anyhow::Result<()> {
        if self.report.passed() {
            return Ok(());
        }
        anyhow::bail!(
            "restore drill failed: {} of {} checks failed (report: {})",
            self.report.failures().len(),
            self.report.checks.len(),
            self.key
        )
    }
}

/// `dbagent drill`: runs the engine's drill within `drill.timeout`, stores the report,
/// pushes metrics and notifies. An interrupted drill (timeout, SIGTERM, ^C) drops its future:
/// the scratch server is stopped and its directory removed.
///
/// The deadline and the signals are watched by a task of their own: a file-level restore
/// holds this task's thread while its own threads write, and must still hear them (it stops
/// at its next range through `restore::files::stop`). A drill past `drill.timeout` is a failed drill: its report says
/// so and is published like any other, or `DbagentDrillFailed` would never fire for the
/// slowest restores, which are the ones to hear about.
pub async fn run(
    cfg: &Config,
    store: Arc<dyn Store>,
    engine: Engine,
    target: DrillTarget,
) -> anyhow::Result<Drilled> {
    // In an encrypted repository a drill reads (the secret keys of the current key set) and
    // writes its report (the recipients): a job missing either is refused before it starts.
    crate::pipeline::recipients(store.as_ref()).await?;
    let current: Vec<_> = crate::pipeline::current_key_set(store.as_ref())
        .await?
        .into_iter()
        .collect();
    crate::pipeline::check_readable(store.as_ref(), &current).await?;
    let started = Utc::now();
    let drill = async {
        match engine {
            Engine::Postgres => pg::run(cfg, store.clone(), target)
                .await
                .map(|(sysid, r)| (crate::repo::pg_drill_key(sysid, &r.id), r)),
            Engine::Mysql => mysql::run(cfg, store.clone(), target)
                .await
                .map(|(uuid, r)| (crate::repo::mysql_drill_key(&uuid, &r.id), r)),
        }
    };
    // The deadline and the signals are watched by a task of their own: see above.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (told, mut stop) = tokio::sync::oneshot::channel::<Stop>();
    let limit = cfg.drill.timeout;
    let watcher = tokio::spawn(async move {
        let why = tokio::select! {
            _ = tokio::time::sleep(limit) => Stop::Timeout,
            _ = sigterm.recv() => Stop::Interrupted("drill interrupted by SIGTERM"),
            _ = tokio::signal::ctrl_c() => Stop::Interrupted("drill interrupted"),
        };
        // Told first: the restore this stops ends the drill with an error of its own.
        let _ = told.send(why);
        crate::restore::files::stop();
    });
    let outcome = tokio::select! {
        biased;
        Ok(why) = &mut stop => Err(why),
        done = drill => Ok(done),
    };
    watcher.abort();
    // A restore stopped by the watcher may have ended the drill in the same poll, failed by
    // the stop: the stop is what happened. A drill that passed meanwhile stays passed.
    let outcome = match (outcome, stop.try_recv()) {
        (Ok(Ok((key, mut report))), Ok(Stop::Timeout)) if !report.passed() => {
            report.checks.push(timeout_check(cfg));
            Ok(Ok((key, report)))
        }
        // Interrupted: a failure the interruption caused is no drill result; any other is.
        (Ok(Ok(r)), Ok(why)) if stopped_by_us(&r.1) => Err(why),
        (Ok(Err(_)), Ok(why)) => Err(why),
        (outcome, _) => outcome,
    };
    // Dropped by now when stopped: the scratch server has stopped and its directory is gone.
    let (key, mut report) = match outcome {
        Ok(done) => done?,
        Err(Stop::Interrupted(why)) => anyhow::bail!("{why}; the scratch server was removed"),
        Err(Stop::Timeout) => timed_out(cfg, store.as_ref(), engine, started).await?,
    };
    publish(cfg, store.as_ref(), &key, &mut report).await;
    Ok(Drilled { key, report })
}

/// Whether a finished report failed because the watcher stopped its restore.
fn stopped_by_us(report: &Report) -> bool {
    report
        .failures()
        .iter()
        .any(|c| c.detail.contains(crate::restore::files::STOPPED))
}

/// Why a drill was stopped before it finished.
enum Stop {
    Timeout,
    Interrupted(&'static str),
}

/// The failed check of a drill stopped at `drill.timeout`.
fn timeout_check(cfg: &Config) -> CheckResult {
    CheckResult::new(
        "drill",
        None,
        Status::Fail,
        format!(
            "the drill did not finish within {} (drill.timeout): the restore and its checks take longer than the time a restore may take; the scratch server was removed",
            humantime::format_duration(cfg.drill.timeout)
        ),
    )
}

/// The report of a drill stopped at `drill.timeout`: a failure.
async fn timed_out(
    cfg: &Config,
    store: &dyn Store,
    engine: Engine,
    started: DateTime<Utc>,
) -> anyhow::Result<(String, Report)> {
    let id = crate::repo::new_id(started);
    let (key, cluster) = match engine {
        Engine::Postgres => {
            let sysid = crate::restore::choose_cluster(cfg, store).await?;
            (crate::repo::pg_drill_key(sysid, &id), sysid.to_string())
        }
        Engine::Mysql => {
            let uuid = crate::mysql::restore::catalog(cfg, store)
                .await?
                .server_uuid;
            (crate::repo::mysql_drill_key(&uuid, &id), uuid)
        }
    };
    let finished = Utc::now();
    Ok((
        key,
        Report {
            format_version: REPORT_FORMAT,
            id,
            engine,
            cluster,
            backup: None,
            target: "-".into(),
            landed_at: None,
            started,
            finished,
            duration_seconds: (finished - started).num_milliseconds() as f64 / 1000.0,
            rto_seconds: None,
            result: Status::Fail,
            checks: vec![timeout_check(cfg)],
            dbagent_version: env!("CARGO_PKG_VERSION").into(),
        },
    ))
}

/// Stores the report in the repository, pushes metrics, notifies. Problems with pushing or
/// notifying are logged and never change the drill's result; a report that cannot be stored is
/// a failure (the proof would be lost).
pub async fn publish(cfg: &Config, store: &dyn Store, key: &str, report: &mut Report) {
    if let Err(e) = crate::repo::write_manifest(store, key, report, "the drill report").await {
        report.checks.push(CheckResult::new(
            "report stored",
            None,
            Status::Fail,
            one_line(&e),
        ));
        report.result = Status::Fail;
    }
    if let Some(url) = &cfg.drill.pushgateway_url {
        let target = format!(
            "{}/metrics/job/dbagent_drill/engine/{}/cluster/{}",
            url.trim_end_matches('/'),
            report.engine,
            report.cluster
        );
        // The same CA roots as the S3 client and the webhooks (built-in ones without a store).
        let res = match crate::tls::reqwest_builder().and_then(|b| Ok(b.build()?)) {
            Ok(client) => client
                .put(&target)
                .header("Content-Type", "text/plain; version=0.0.4")
                .body(report.metrics())
                .timeout(std::time::Duration::from_secs(15))
                .send()
                .await
                .map_err(|e| e.without_url().to_string()),
            Err(e) => Err(format!("HTTP client: {e:#}")),
        };
        match res {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(status = %r.status(), "the Pushgateway refused the drill metrics")
            }
            Err(e) => tracing::warn!(error = %e, "could not push the drill metrics"),
        }
    }
    let failures = report.failures();
    let event = crate::notify::Event {
        ok: report.passed(),
        summary: if report.passed() {
            format!(
                "dbagent restore drill passed: {} cluster {} restored to {} in {}",
                report.engine,
                report.cluster,
                report.landed_at.as_deref().unwrap_or(&report.target),
                report
                    .rto_seconds
                    .map(|s| format!("{s:.0}s"))
                    .unwrap_or_else(|| "-".into())
            )
        } else {
            format!(
                "dbagent restore drill FAILED: {} cluster {}: {} of {} checks failed",
                report.engine,
                report.cluster,
                failures.len(),
                report.checks.len()
            )
        },
        details: failures
            .iter()
            .map(|c| {
                format!(
                    "{}{}: {}",
                    c.name,
                    c.database
                        .as_deref()
                        .map(|d| format!(" [{d}]"))
                        .unwrap_or_default(),
                    c.detail
                )
            })
            .collect(),
        source: format!("{} cluster {}", report.engine, report.cluster),
        key: format!("dbagent-drill-{}-{}", report.engine, report.cluster),
    };
    for e in crate::notify::send(&cfg.notify, &event).await {
        tracing::warn!(error = %e, "notification not sent");
    }
}

#[derive(Default)]
struct Outcome {
    backup: Option<String>,
    target: String,
    landed_at: Option<String>,
    rto_seconds: Option<f64>,
}

pub(crate) fn one_line(e: &anyhow::Error) -> String {
    crate::error::one_line(e)
}

/// Judges the newest heartbeat row of a restored server: it must be at or before the target
/// and within `tolerance` of it (of the archive's end for `--latest`), and its CJK canary must
/// have survived byte for byte.
pub(crate) fn judge_heartbeat(
    ts: DateTime<Utc>,
    ts_text: &str,
    canary: &str,
    target: Target,
    end_of_archive: DateTime<Utc>,
    tolerance: chrono::Duration,
    db: Option<&str>,
) -> [CheckResult; 2] {
    let (ok, detail) = match target {
        Target::Time(t) => {
            let before = t - ts;
            (
                // Stored timestamps round to microseconds.
                ts <= t + chrono::Duration::milliseconds(1) && before <= tolerance,
                format!(
                    "newest heartbeat {ts_text}, {:.1}s before the target {} (allowed: {}s)",
                    before.num_milliseconds() as f64 / 1000.0,
                    crate::timespec::show(t),
                    tolerance.num_seconds()
                ),
            )
        }
        Target::Latest => {
            let gap = end_of_archive - ts;
            (
                gap <= tolerance,
                format!(
                    "newest heartbeat {ts_text}, {:.1}s before the end of the archive (allowed: {}s)",
                    gap.num_milliseconds() as f64 / 1000.0,
                    tolerance.num_seconds()
                ),
            )
        }
    };
    let canary_ok = canary == crate::heartbeat::CANARY;
    let status = |ok: bool| if ok { Status::Pass } else { Status::Fail };
    [
        CheckResult::new("heartbeat landed at the target", db, status(ok), detail),
        CheckResult::new(
            "heartbeat CJK canary is byte-identical",
            db,
            status(canary_ok),
            if canary_ok {
                format!("{canary:?}")
            } else {
                format!(
                    "expected {:?}, found {canary:?} (hex {})",
                    crate::heartbeat::CANARY,
                    hex::encode(canary.as_bytes())
                )
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_judgement() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let tol = chrono::Duration::seconds(60);
        let at = t("2026-11-23T03:00:00Z");
        let canary = crate::heartbeat::CANARY;
        let [landed, c] = judge_heartbeat(
            t("2026-11-23T02:59:59Z"),
            "x",
            canary,
            Target::Time(at),
            at,
            tol,
            None,
        );
        assert_eq!((landed.status, c.status), (Status::Pass, Status::Pass));
        // Past the target: the restore went too far.
        let [landed, _] = judge_heartbeat(
            t("2026-11-23T03:00:01Z"),
            "x",
            canary,
            Target::Time(at),
            at,
            tol,
            None,
        );
        assert_eq!(landed.status, Status::Fail);
        // Far before it: WAL or binlogs were missing.
        let [landed, _] = judge_heartbeat(
            t("2026-11-23T02:50:00Z"),
            "x",
            canary,
            Target::Time(at),
            at,
            tol,
            None,
        );
        assert_eq!(landed.status, Status::Fail);
        let [landed, _] = judge_heartbeat(
            t("2026-11-23T02:59:30Z"),
            "x",
            canary,
            Target::Latest,
            at,
            tol,
            None,
        );
        assert_eq!(landed.status, Status::Pass);
        let [_, c] = judge_heartbeat(
            at,
            "x",
            "dbagent 心跳 ?????",
            Target::Time(at),
            at,
            tol,
            None,
        );
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("hex"));
    }

    #[test]
    fn random_points_stay_inside_the_windows() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let windows = vec![
            Window {
                from: t("2026-11-01T00:00:00Z"),
                to: t("2026-11-02T00:00:00Z"),
            },
            Window {
                from: t("2026-11-10T00:00:00Z"),
                to: t("2026-11-10T01:00:00Z"),
            },
        ];
        for seed in 0..2000u64 {
            let p = random_point(&windows, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap();
            assert!(windows.iter().any(|w| p > w.from && p <= w.to), "{p}");
        }
        assert_eq!(random_point(&[], 1), None);
    }
}
