//! The PostgreSQL restore drill: plan, restore the base backup and WAL into a private scratch
//! server, then check the heartbeat, extensions, database settings, row counts and the SQL
//! suites in every database.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::report::{CheckResult, Report, Status};
use super::{
    DrillTarget, Outcome, ScratchDir, judge_heartbeat, one_line, random_point, seed, suite,
};
use crate::config::Config;
use crate::proc::Program;
use crate::repo::catalog::PgCatalog;
use crate::repo::manifest::DatabaseInfo;
use crate::restore::plan::{self, PgPlan, Target};
use crate::restore::{self, Landed};
use crate::storage::Store;

/// The drill's PostgreSQL server, restored into the scratch directory and started on a private
/// socket. Stopped (immediately: it is a scratch copy) by `stop`, or on drop whatever happened.
struct ScratchPg {
    data: PathBuf,
    pg_ctl: Option<Program>,
}

impl ScratchPg {
    fn new(cfg: &Config, data: PathBuf) -> ScratchPg {
        let pg_ctl = crate::pg::bins::program(&cfg.pg, "pg_ctl").ok().map(|p| {
            Program::new(p)
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
        });
        ScratchPg { data, pg_ctl }
    }

    fn running(&self) -> bool {
        self.data.join("postmaster.pid").exists()
    }

    async fn stop(self) {
        if let (true, Some(pg_ctl)) = (self.running(), &self.pg_ctl) {
            let _ = pg_ctl.run().output().await;
        }
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        if let (true, Some(pg_ctl)) = (self.running(), &self.pg_ctl) {
            let _ = pg_ctl.status_blocking();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Settings that make the restored copy a private scratch server: no TCP, a socket in the
/// scratch directory, trust auth on that socket only, and no archiving into the real repository.
fn scratch_settings(scratch: &Path, port: u16) -> anyhow::Result<Vec<String>> {
    let hba = scratch.join("dbagent_hba.conf");
    std::fs::write(&hba, "local all all trust\n").context("writing the scratch pg_hba.conf")?;
    let q = |p: &Path| restore::recovery::quote(&p.display().to_string());
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

pub async fn run(
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
    let explicit = match target {
        DrillTarget::At(t) => Some(t),
        _ => None,
    };
    let target = match target {
        DrillTarget::Latest => Ok(Target::Latest),
        DrillTarget::At(t) => Ok(Target::Time(t)),
        DrillTarget::Random => random_point(&cat.windows(), seed())
            .map(Target::Time)
            .ok_or_else(|| anyhow::anyhow!("nothing is restorable yet: no backup with its WAL")),
    };
    let mut plan = target.and_then(|t| plan::plan_pg(&cat, t, None));
    // A time given by hand outside every restorable window is a mistake in the command, not
    // a failed drill: one line and exit 1, no report, no alert. Inside one, whatever stops
    // the plan (a fork, a gap) is the archive's problem, which the drill reports.
    if let (Some(t), true) = (explicit, plan.is_err())
        && !crate::repo::catalog::Window::any_covers(&cat.windows(), t)
    {
        return Err(plan.unwrap_err());
    }
    if let Ok(p) = plan.as_mut()
        && let Err(e) = restore::read_archive_end(store.as_ref(), p).await
    {
        plan = Err(e);
    }
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
            format_version: super::REPORT_FORMAT,
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

async fn drill_pg(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    checks: &mut Vec<CheckResult>,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let scratch = ScratchDir::new(cfg)?;
    // Stopped before the directory goes (dropped first), also when the drill is interrupted.
    let server = ScratchPg::new(cfg, scratch.data());
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
    let described = &plan.backup.databases;
    if described.is_empty() {
        checks.push(CheckResult::new(
            "databases",
            None,
            Status::Fail,
            format!(
                "backup {} describes no database (it could not list them: see that backup's log), so nothing restored can be compared with the source; take a new backup",
                plan.backup.id
            ),
        ));
    }
    // Every database of the restored server is checked: those the backup describes against
    // what it recorded, any other (created after the backup) with the suites alone.
    let mut names: Vec<String> = described.iter().map(|d| d.name.clone()).collect();
    match restored_databases(&cfg, &landed, &names).await {
        Ok(restored) => {
            for name in restored {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        Err(e) => checks.push(CheckResult::new(
            "databases",
            None,
            Status::Fail,
            format!(
                "cannot list the restored server's databases: {}",
                one_line(&e)
            ),
        )),
    }
    for name in &names {
        let info = described.iter().find(|d| &d.name == name);
        check_database(&cfg, &landed, plan, name, info, &suite, checks, out).await;
    }
    // A check written for one database is a check the site relies on: a database the restore
    // lacks fails it rather than leaving it out of the report.
    for check in &suite {
        if let Some(db) = check.database.as_deref()
            && !names.iter().any(|n| n == db)
        {
            checks.push(CheckResult::new(
                &format!("{}: {}", check.suite, check.name),
                Some(db),
                Status::Fail,
                format!(
                    "the restored server has no database {db}, so this check cannot run: was it dropped, or is the suite's `-- database:` line wrong?"
                ),
            ));
        }
    }
    server.stop().await;
    drop(scratch);
    Ok(())
}

/// The restored server's databases (those a backup describes, see `sql::DATABASES`), read
/// through one of `known` or, failing those, `postgres` or `template1`.
async fn restored_databases(
    cfg: &Config,
    landed: &Landed,
    known: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut last = None;
    for db in known
        .iter()
        .map(String::as_str)
        .chain(["postgres", "template1"])
    {
        match landed.conn(cfg, db).connect().await {
            Ok(c) => {
                let rows = c.query(crate::pg::sql::DATABASES, &[]).await?;
                return Ok(rows.into_iter().map(|r| r.get(0)).collect());
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no database to connect to")))
}

/// One database of the restored server: the heartbeat (in its database), what the backup
/// recorded of it (`info`, when it describes it) and the suites.
#[allow(clippy::too_many_arguments)]
async fn check_database(
    cfg: &Config,
    landed: &Landed,
    plan: &PgPlan,
    name: &str,
    info: Option<&DatabaseInfo>,
    suite: &[suite::Check],
    checks: &mut Vec<CheckResult>,
    out: &mut Outcome,
) {
    let client = match landed.conn(cfg, name).connect().await {
        Ok(c) => c,
        Err(e) => {
            checks.push(CheckResult::new(
                "connect",
                Some(name),
                Status::Fail,
                one_line(&e),
            ));
            return;
        }
    };
    if name == cfg.serve.heartbeat_database
        && let Some(ts) = check_heartbeat(cfg, &client, plan, checks).await
    {
        out.landed_at = Some(ts);
    }
    let not_compared = match info {
        Some(db) if !db.unread => {
            check_extensions(&client, db, checks).await;
            check_settings(&client, db, checks).await;
            check_rows(&client, db, cfg.drill.row_tolerance, checks).await;
            None
        }
        Some(_) => Some(format!(
            "backup {} could not read this database (see that backup's log)",
            plan.backup.id
        )),
        None => Some(format!(
            "backup {} does not describe this database (created after it)",
            plan.backup.id
        )),
    };
    if let Some(why) = not_compared {
        checks.push(CheckResult::new(
            "row counts",
            Some(name),
            Status::Skip,
            format!("{why}: its extensions, settings and rows are not compared; the suites ran"),
        ));
    }
    run_suite(&client, name, suite, checks).await;
}

async fn restore_into(
    cfg: &Config,
    store: &dyn Store,
    plan: &PgPlan,
    dir: &Path,
    extra: &[String],
    port: u16,
) -> anyhow::Result<Landed> {
    restore::materialize(cfg, store, plan, dir, extra, false).await?;
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
    let missing = |e: &tokio_postgres::Error| {
        use tokio_postgres::error::SqlState;
        matches!(
            e.code(),
            Some(&SqlState::UNDEFINED_TABLE | &SqlState::INVALID_SCHEMA_NAME)
        )
    };
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) => {
            checks.push(CheckResult::new(
                "heartbeat",
                db,
                Status::Skip,
                "no dbagent.heartbeat row: the source ran no `dbagent serve`, so where the restore landed cannot be proven",
            ));
            return None;
        }
        Err(e) if missing(&e) => {
            checks.push(CheckResult::new(
                "heartbeat",
                db,
                Status::Skip,
                "no dbagent.heartbeat table: the source ran no `dbagent serve`, so where the restore landed cannot be proven",
            ));
            return None;
        }
        // The table is there and cannot be read: a restored database that fails a query.
        Err(e) => {
            checks.push(CheckResult::new(
                "heartbeat",
                db,
                Status::Fail,
                format!(
                    "reading dbagent.heartbeat failed: {}",
                    crate::error::one_line(&anyhow::Error::new(e))
                ),
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
    let mut unlogged = 0;
    let mut unestimated = 0;
    for t in &db.tables {
        // An unlogged table is emptied by every recovery (PostgreSQL resets it from its init
        // fork): its rows are not in any backup, by design, and not compared.
        let sql = format!(
            "SELECT (SELECT count(*) FROM {}), (SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1))",
            t.table
        );
        let count = match client.query_one(&sql, &[&t.table]).await {
            Ok(r) if r.get::<_, Option<String>>(1).as_deref() == Some("u") => {
                unlogged += 1;
                continue;
            }
            Ok(r) => r.get::<_, i64>(0),
            Err(e) => {
                checked += 1;
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
        checked += 1;
        let est = t.rows_estimate;
        if est < 0 {
            unestimated += 1;
        } else if est > 0 && count == 0 {
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
    checks.push(CheckResult::judged(
        "row counts",
        Some(&db.name),
        &problems,
        format!(
            "{checked} table(s) within {:.0}% of the backup's estimates, none empty that had rows{}{}",
            tolerance * 100.0,
            match unestimated {
                0 => String::new(),
                n => format!(
                    "; {n} table(s) had no estimate at backup time (never analyzed, statistics reset): read, not compared"
                ),
            },
            match unlogged {
                0 => String::new(),
                n => format!(
                    "; {n} unlogged table(s) not compared (recovery empties them, as it should)"
                ),
            }
        ),
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
