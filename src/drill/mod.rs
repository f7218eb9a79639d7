//! `dbagent drill`: restore into a scratch server, check it, report.
//!
//! Plan first (which backup, which target: the newest restorable point, a random point in
//! the window, or a given time), then restore into a server that dbagent initialises in a
//! temporary directory on a private socket and always tears down, then check, then report:
//! the JSON report goes into the repository, a summary to stdout, metrics to a Pushgateway
//! (and `serve`), and a webhook on failure.

pub mod mysql;
pub mod report;
pub mod suite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::config::Config;
use crate::repo::catalog::{PgCatalog, Window};
use crate::repo::manifest::DatabaseInfo;
use crate::restore::plan::{self, PgPlan, Target};
use crate::restore::{self, Landed};
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

/// The scratch server's directory; stops the server and removes everything when dropped,
/// whatever happened (a failed check, an error, SIGTERM).
struct Scratch {
    dir: Option<tempfile::TempDir>,
    pg_ctl: Option<PathBuf>,
}

impl Scratch {
    fn new(cfg: &Config) -> anyhow::Result<Scratch> {
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
        Ok(Scratch {
            dir: Some(dir),
            pg_ctl: crate::pg::bins::program(&cfg.pg, "pg_ctl").ok(),
        })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    fn data(&self) -> PathBuf {
        self.path().join("data")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let data = self.data();
        if data.join("postmaster.pid").exists() {
            if let Some(pg_ctl) = &self.pg_ctl {
                let _ = crate::proc::Program::new(pg_ctl)
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                    .status_blocking();
            }
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                tracing::warn!(dir = %path.display(), error = %e, "could not remove the drill's scratch directory");
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Settings that make the restored copy a private scratch server: no TCP, a socket in the
/// scratch directory, trust auth on that socket only, and no archiving into the real repository.
fn scratch_settings(scratch: &std::path::Path, port: u16) -> anyhow::Result<Vec<String>> {
    let hba = scratch.join("dbagent_hba.conf");
    std::fs::write(&hba, "local all all trust\n").context("writing the scratch pg_hba.conf")?;
    let q = |p: &std::path::Path| restore::recovery::quote(&p.display().to_string());
    Ok(vec![
        "# dbagent drill: private scratch server".into(),
        format!("port = {port}"),
        "listen_addresses = ''".into(),
        format!("unix_socket_directories = {}", q(scratch)),
        format!("hba_file = {}", q(&hba)),
        "archive_mode = off".into(),
        "synchronous_standby_names = ''".into(),
        "primary_conninfo = ''".into(),
    ])
}

pub async fn run_pg(
    cfg: &Config,
    store: Arc<dyn Store>,
    target: DrillTarget,
) -> anyhow::Result<(u64, Report)> {
    let started = Utc::now();
    let clock = Instant::now();
    let sysid = restore::choose_cluster(cfg, store.as_ref()).await?;
    let cat = PgCatalog::load(store.as_ref(), sysid).await?;
    let mut checks = Vec::new();
    let mut out = Outcome::default();
    let target = match target {
        DrillTarget::Latest => Ok(Target::Latest),
        DrillTarget::At(t) => Ok(Target::Time(t)),
        DrillTarget::Random => random_point(&cat.windows(), seed())
            .map(Target::Time)
            .ok_or_else(|| anyhow::anyhow!("nothing is restorable yet: no backup with its WAL")),
    };
    let plan = target.and_then(|t| plan::plan_pg(&cat, t, None));
    out.target = match plan.as_ref().map(|p| p.target) {
        Ok(Target::Time(t)) => crate::timespec::show(t),
        _ => "latest".into(),
    };
    match plan {
        Err(e) => checks.push(CheckResult::new("plan", None, Status::Fail, one_line(&e))),
        Ok(plan) => {
            checks.push(CheckResult::new(
                "plan",
                None,
                Status::Pass,
                plan.describe(),
            ));
            out.backup = Some(plan.backup.id.clone());
            if let Err(e) = drill_pg(cfg, store.as_ref(), &plan, &mut checks, &mut out).await {
                checks.push(CheckResult::new("drill", None, Status::Fail, one_line(&e)));
            }
        }
    }
    let finished = Utc::now();
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok((
        sysid,
        Report {
            format_version: REPORT_FORMAT,
            id: crate::repo::new_id(started),
            engine: crate::engine::Engine::Postgres,
            cluster: sysid.to_string(),
            backup: out.backup,
            target: out.target,
            landed_at: out.landed_at,
            started,
            finished,
            duration_seconds: clock.elapsed().as_secs_f64(),
            rto_seconds: out.rto_seconds,
            result: if failed { Status::Fail } else { Status::Pass },
            checks,
            dbagent_version: env!("CARGO_PKG_VERSION").into(),
        },
    ))
}

/// Stores the report in the repository, pushes metrics, notifies. Problems with pushing or
/// notifying are logged and never change the drill's result; a report that cannot be stored is
/// a failure (the proof would be lost).
pub async fn publish(cfg: &Config, store: &dyn Store, key: &str, report: &mut Report) {
    let json = serde_json::to_vec_pretty(&report).expect("a report serializes");
    if let Err(e) = store.put(key, json.into()).await {
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
        let res = reqwest::Client::new()
            .put(&target)
            .header("Content-Type", "text/plain; version=0.0.4")
            .body(report.metrics())
            .timeout(std::time::Duration::from_secs(15))
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(status = %r.status(), "the Pushgateway refused the drill metrics")
            }
            Err(e) => tracing::warn!(error = %e.without_url(), "could not push the drill metrics"),
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

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

async fn drill_pg(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    checks: &mut Vec<CheckResult>,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let scratch = Scratch::new(cfg)?;
    // The scratch server is reached over its private socket with trust auth: no password.
    let mut cfg = cfg.clone();
    cfg.pg.user = None;
    cfg.pg.password = None;
    cfg.pg.passfile = Some(scratch.path().join("no-pgpass"));
    let port = free_port()?;
    let extra = scratch_settings(scratch.path(), port)?;
    let restore_clock = Instant::now();
    let landed = match restore_into(&cfg, store, plan, &scratch.data(), &extra, port).await {
        Ok(l) => l,
        Err(e) => {
            checks.push(CheckResult::new(
                "restore",
                None,
                Status::Fail,
                one_line(&e),
            ));
            return Ok(());
        }
    };
    let rto = restore_clock.elapsed().as_secs_f64();
    out.rto_seconds = Some(rto);
    out.landed_at = landed.last_commit.clone();
    checks.push(CheckResult::new(
        "restore",
        None,
        Status::Pass,
        format!(
            "promoted on timeline {} after {rto:.1}s; last replayed transaction committed at {}",
            landed.timeline,
            landed.last_commit.as_deref().unwrap_or("(none)")
        ),
    ));

    let suite = suite::load(suite::POSTGRES_SUITE, &cfg.drill.extra_suites)?;
    let heartbeat_db = cfg.serve.heartbeat_database.clone();
    for db in &plan.backup.databases {
        let client = match landed.conn(&cfg, &db.name).connect().await {
            Ok(c) => c,
            Err(e) => {
                checks.push(CheckResult::new(
                    "connect",
                    Some(&db.name),
                    Status::Fail,
                    one_line(&e),
                ));
                continue;
            }
        };
        if db.name == heartbeat_db {
            if let Some(ts) = check_heartbeat(&cfg, &client, plan, checks).await {
                out.landed_at = Some(ts);
            }
        }
        check_extensions(&client, db, checks).await;
        check_settings(&client, db, checks).await;
        check_rows(&client, db, cfg.drill.row_tolerance, checks).await;
        run_suite(&client, &db.name, &suite, checks).await;
    }
    restore::stop_server(&cfg, &scratch.data()).await;
    drop(scratch);
    Ok(())
}

async fn restore_into(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    dir: &std::path::Path,
    extra: &[String],
    port: u16,
) -> anyhow::Result<Landed> {
    restore::materialize(cfg, store, plan, dir, extra).await?;
    restore::start_and_wait(cfg, plan, dir, Some(port)).await
}

async fn check_heartbeat(
    cfg: &Config,
    client: &Client,
    plan: &PgPlan,
    checks: &mut Vec<CheckResult>,
) -> Option<String> {
    let row = client
        .query_opt(crate::pg::sql::HEARTBEAT_NEWEST, &[])
        .await;
    let db = Some(cfg.serve.heartbeat_database.as_str());
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) | Err(_) => {
            checks.push(CheckResult::new(
                "heartbeat",
                db,
                Status::Skip,
                "no dbagent.heartbeat row: the source ran no `dbagent serve`, so where the restore landed cannot be proven",
            ));
            return None;
        }
    };
    let ts_text: String = row.get(0);
    let ts_epoch: f64 = row.get(1);
    let canary: String = row.get(2);
    let ts = DateTime::from_timestamp_micros((ts_epoch * 1e6) as i64).unwrap_or_default();
    let tolerance = chrono::Duration::from_std(cfg.drill.heartbeat_tolerance).unwrap_or_default();
    checks.extend(judge_heartbeat(
        ts,
        &ts_text,
        &canary,
        plan.target,
        plan.reachable_until,
        tolerance,
        db,
    ));
    Some(ts_text)
}

/// Judges the newest heartbeat row of a restored server: it must be at or before the target
/// and within `tolerance` of it (of the archive's end for `--latest`), and its CJK canary must
/// have survived byte for byte.
fn judge_heartbeat(
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

async fn check_extensions(client: &Client, db: &DatabaseInfo, checks: &mut Vec<CheckResult>) {
    let mut missing = Vec::new();
    for ext in &db.extensions {
        let name = ext.split_whitespace().next().unwrap_or(ext);
        let available = client
            .query_opt(
                "SELECT 1 FROM pg_available_extensions WHERE name = $1",
                &[&name],
            )
            .await
            .map(|r| r.is_some())
            .unwrap_or(false);
        if !available {
            missing.push(ext.clone());
        }
    }
    let (status, detail) = if missing.is_empty() {
        (
            Status::Pass,
            format!(
                "{} extension(s) available: {}",
                db.extensions.len(),
                db.extensions.join(", ")
            ),
        )
    } else {
        (
            Status::Fail,
            format!(
                "the source had {} but this server lacks it: run the drill in an image with the same extensions as the database",
                missing.join(", ")
            ),
        )
    };
    checks.push(CheckResult::new(
        "extensions",
        Some(&db.name),
        status,
        detail,
    ));
}

async fn check_settings(client: &Client, db: &DatabaseInfo, checks: &mut Vec<CheckResult>) {
    let restored = match crate::pg::backup::database_settings(client, &db.name).await {
        Ok(s) => s,
        Err(e) => {
            checks.push(CheckResult::new(
                "database settings",
                Some(&db.name),
                Status::Fail,
                one_line(&e),
            ));
            return;
        }
    };
    let mut expected = db.settings.clone();
    expected.sort();
    let (status, detail) = if restored == expected {
        let shown = if expected.is_empty() {
            "none set".to_string()
        } else {
            expected.join(", ")
        };
        (Status::Pass, shown)
    } else {
        (
            Status::Fail,
            format!(
                "the source had [{}], the restore has [{}]",
                expected.join(", "),
                restored.join(", ")
            ),
        )
    };
    checks.push(CheckResult::new(
        "database settings",
        Some(&db.name),
        status,
        detail,
    ));
}

async fn check_rows(
    client: &Client,
    db: &DatabaseInfo,
    tolerance: f64,
    checks: &mut Vec<CheckResult>,
) {
    let mut problems = Vec::new();
    let mut checked = 0;
    for t in &db.tables {
        checked += 1;
        let count = match client
            .query_one(&format!("SELECT count(*) FROM {}", t.table), &[])
            .await
        {
            Ok(r) => r.get::<_, i64>(0),
            Err(e) => {
                problems.push(format!(
                    "{}: {}",
                    t.table,
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or(e.to_string())
                ));
                continue;
            }
        };
        let est = t.rows_estimate;
        if est > 0 && count == 0 {
            problems.push(format!(
                "{} is empty, but the source had about {est} rows",
                t.table
            ));
        } else if est > 0 {
            let slack = est as f64 * tolerance + 1000.0;
            if (count as f64 - est as f64).abs() > slack {
                problems.push(format!(
                    "{} has {count} rows, the source had about {est}",
                    t.table
                ));
            }
        }
    }
    let (status, detail) = if problems.is_empty() {
        (
            Status::Pass,
            format!(
                "{checked} table(s) within {:.0}% of the backup's estimates, none empty that had rows",
                tolerance * 100.0
            ),
        )
    } else {
        (Status::Fail, problems.join("; "))
    };
    checks.push(CheckResult::new(
        "row counts",
        Some(&db.name),
        status,
        detail,
    ));
}

async fn run_suite(
    client: &Client,
    db: &str,
    suite: &[suite::Check],
    checks: &mut Vec<CheckResult>,
) {
    let installed: Vec<String> = client
        .query("SELECT extname::text FROM pg_extension", &[])
        .await
        .map(|rows| rows.into_iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    for check in suite {
        if check.database.as_deref().is_some_and(|d| d != db) {
            continue;
        }
        let name = format!("{}: {}", check.suite, check.name);
        if let Some(missing) = check.requires.iter().find(|r| !installed.contains(r)) {
            checks.push(CheckResult::new(
                &name,
                Some(db),
                Status::Skip,
                format!("skipped: extension {missing} is not installed in this database (the source never had it)"),
            ));
            continue;
        }
        let (status, detail) = match client.simple_query(&check.sql).await {
            Err(e) => (
                Status::Fail,
                format!(
                    "error: {}",
                    e.as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or(e.to_string())
                ),
            ),
            Ok(messages) => {
                let rows: Vec<Vec<Option<String>>> = messages
                    .iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(r) => {
                            Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                        }
                        _ => None,
                    })
                    .collect();
                match rows.as_slice() {
                    [row] if row.first().and_then(|v| v.as_deref()) == Some("t") => {
                        (Status::Pass, "true".into())
                    }
                    _ => (
                        Status::Fail,
                        format!("expected one row with true, got {rows:?}"),
                    ),
                }
            }
        };
        checks.push(CheckResult::new(&name, Some(db), status, detail));
    }
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
