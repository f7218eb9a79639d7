//! The MySQL/MariaDB restore drill: plan, load the dump into a scratch server, compare every
//! table's rows with the dump's exact counts, replay the binlogs to the target, then check the
//! heartbeat and run the SQL suite. The scratch server is always stopped and removed.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, NaiveDateTime, Utc};
use mysql_async::prelude::Queryable;

use super::report::{CheckResult, Report, Status};
use super::{DrillTarget, Outcome, ScratchDir, one_line, random_point, seed, suite};
use crate::config::Config;
use crate::mysql::client::Programs;
use crate::mysql::conn::MysqlConn;
use crate::mysql::load::{WorkDir, load_dump, replay_binlogs};
use crate::mysql::plan::MysqlPlan;
use crate::mysql::scratch::{Listen, ScratchServer};
use crate::mysql::sql;
use crate::repo::mysql::MysqlCatalog;
use crate::restore::plan::Target;
use crate::storage::Store;

pub async fn run(
    cfg: &Config,
    store: Arc<dyn Store>,
    target: DrillTarget,
) -> anyhow::Result<(String, Report)> {
    let started = Utc::now();
    let clock = Instant::now();
    let mut checks = Vec::new();
    let mut out = Outcome::default();
    let planned = match target {
        DrillTarget::Latest => {
            crate::mysql::restore::plan(cfg, store.as_ref(), Target::Latest).await
        }
        DrillTarget::At(t) => {
            crate::mysql::restore::plan(cfg, store.as_ref(), Target::Time(t)).await
        }
        // Learn the window from the catalog, then pick a point inside it.
        DrillTarget::Random => {
            match crate::mysql::restore::plan(cfg, store.as_ref(), Target::Latest).await {
                Ok((cat, _)) => match random_point(&cat.windows(), seed()) {
                    Some(t) => {
                        crate::mysql::restore::plan(cfg, store.as_ref(), Target::Time(t)).await
                    }
                    None => Err(anyhow::anyhow!(
                        "nothing is restorable yet: no dump with its binlogs"
                    )),
                },
                Err(e) => Err(e),
            }
        }
    };
    let (cat, plan) = match planned {
        // A time given by hand outside every restorable window is a mistake in the command,
        // not a failed drill: one line and exit 1, no report, no alert. Inside one, whatever
        // stops the plan is the archive's problem, which the drill reports.
        Err(e) if outside_windows(cfg, store.as_ref(), target).await => return Err(e),
        Ok((c, p)) => (Some(c), Some(p)),
        Err(e) => {
            checks.push(CheckResult::new("plan", None, Status::Fail, one_line(&e)));
            (None, None)
        }
    };
    let mut server_uuid = cfg.mysql.server_uuid.clone().unwrap_or_default();
    if let (Some(cat), Some(plan)) = (cat, plan) {
        server_uuid = cat.server_uuid.clone();
        out.target = match plan.target {
            Target::Time(t) => crate::timespec::show(t),
            Target::Latest => "latest".into(),
        };
        out.backup = Some(plan.dump.id.clone());
        checks.push(CheckResult::new(
            "plan",
            None,
            Status::Pass,
            plan.describe(),
        ));
        if let Err(e) = drill(cfg, store.as_ref(), cat, plan, &mut checks, &mut out).await {
            checks.push(CheckResult::new("drill", None, Status::Fail, one_line(&e)));
        }
    } else if out.target.is_empty() {
        out.target = match target {
            DrillTarget::At(t) => crate::timespec::show(t),
            _ => "latest".into(),
        };
    }
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    Ok((
        server_uuid.clone(),
        Report {
            format_version: super::REPORT_FORMAT,
            id: crate::repo::new_id(started),
            engine: crate::engine::Engine::Mysql,
            cluster: server_uuid,
            backup: out.backup,
            target: out.target,
            landed_at: out.landed_at,
            started,
            finished: Utc::now(),
            duration_seconds: clock.elapsed().as_secs_f64(),
            rto_seconds: out.rto_seconds,
            result: if failed { Status::Fail } else { Status::Pass },
            checks,
            dbagent_version: env!("CARGO_PKG_VERSION").into(),
        },
    ))
}

/// The drill's scratch server: the dump is loaded by `start` (so exact row counts can be checked
/// against the dump's manifest), binlogs are replayed by `replay`, and the server is stopped
/// when this is dropped, whatever happened.
struct DrillServer {
    plan: MysqlPlan,
    cat: MysqlCatalog,
    programs: Programs,
    server: ScratchServer,
    dir: std::path::PathBuf,
}

impl DrillServer {
    /// Initialises and starts a scratch server in `dir` (private socket) and loads the dump.
    async fn start(
        cfg: &Config,
        store: &dyn Store,
        cat: MysqlCatalog,
        plan: MysqlPlan,
        dir: &std::path::Path,
    ) -> anyhow::Result<DrillServer> {
        let flavor = plan.dump.flavor;
        let programs = Programs::find(&cfg.mysql, flavor)?;
        let server = ScratchServer::start(
            &cfg.mysql,
            dir,
            Listen::SocketOnly,
            flavor,
            plan.dump.time_zone.as_ref(),
        )
        .await?;
        let drill = DrillServer {
            plan,
            cat,
            programs,
            server,
            dir: dir.to_path_buf(),
        };
        load_dump(store, &drill.plan, &drill.programs, &drill.conn()).await?;
        Ok(drill)
    }

    fn conn(&self) -> MysqlConn {
        self.server.conn()
    }

    /// Replays the planned binlogs through one client connection.
    async fn replay(&self, store: &dyn Store) -> anyhow::Result<()> {
        let work = WorkDir::inside(&self.dir)?;
        replay_binlogs(
            store,
            &self.cat,
            &self.plan,
            &self.programs,
            &self.conn(),
            work.path(),
        )
        .await
    }
}

async fn drill(
    cfg: &Config,
    store: &dyn Store,
    cat: MysqlCatalog,
    plan: MysqlPlan,
    checks: &mut Vec<CheckResult>,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let scratch = ScratchDir::new(cfg)?;
    let clock = Instant::now();
    let server = match DrillServer::start(cfg, store, cat, plan, &scratch.data()).await {
        Ok(s) => s,
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
    let mut conn = server.conn().connect().await?;
    check_rows(&mut conn, &server.plan.dump, checks).await;
    if let Err(e) = server.replay(store).await {
        checks.push(CheckResult::new(
            "restore",
            None,
            Status::Fail,
            format!("binlog replay failed: {}", one_line(&e)),
        ));
        return Ok(());
    }
    let rto = clock.elapsed().as_secs_f64();
    out.rto_seconds = Some(rto);
    checks.push(CheckResult::new(
        "restore",
        None,
        Status::Pass,
        format!(
            "dump {} loaded and {} binlog file(s) replayed in {rto:.1}s",
            server.plan.dump.id,
            server.plan.binlogs.len()
        ),
    ));
    if let Some(ts) = check_heartbeat(cfg, &mut conn, &server.plan, checks).await {
        out.landed_at = Some(ts);
    }
    let suite = suite::load(suite::MYSQL_SUITE, &cfg.drill.extra_suites)?;
    run_suite(&mut conn, &suite, checks).await;
    check_fulltext(&mut conn, &server, checks).await;
    drop(conn);
    drop(server);
    drop(scratch);
    Ok(())
}

/// Right after the dump is loaded, before any binlog: every table has exactly the rows the
/// dump wrote.
async fn check_rows(
    conn: &mut mysql_async::Conn,
    dump: &crate::repo::mysql::MysqlDump,
    checks: &mut Vec<CheckResult>,
) {
    for db in &dump.databases {
        let mut problems = Vec::new();
        for t in &db.tables {
            let count = format!(
                "SELECT COUNT(*) FROM {}.{}",
                sql::quote_ident(&db.name),
                sql::quote_ident(&t.table)
            );
            match conn.query_first::<u64, _>(count).await {
                Ok(Some(n)) if n == t.rows => {}
                Ok(n) => problems.push(format!(
                    "{} has {} rows, the dump wrote {}",
                    t.table,
                    n.unwrap_or(0),
                    t.rows
                )),
                Err(e) => problems.push(format!("{}: {e}", t.table)),
            }
        }
        checks.push(CheckResult::judged(
            "row counts (dump)",
            Some(&db.name),
            &problems,
            format!(
                "{} table(s) hold exactly the rows the dump wrote",
                db.tables.len()
            ),
        ));
    }
}

async fn check_heartbeat(
    cfg: &Config,
    conn: &mut mysql_async::Conn,
    plan: &MysqlPlan,
    checks: &mut Vec<CheckResult>,
) -> Option<String> {
    let row: Option<(String, String)> =
        conn.query_first(sql::HEARTBEAT_NEWEST).await.ok().flatten();
    let db = Some("dbagent");
    let Some((ts_text, canary)) = row else {
        checks.push(CheckResult::new(
            "heartbeat",
            db,
            Status::Skip,
            "no dbagent.heartbeat row: the source ran no `dbagent serve`, so where the restore landed cannot be proven",
        ));
        return None;
    };
    let ts: DateTime<Utc> = NaiveDateTime::parse_from_str(&ts_text, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|t| t.and_utc())
        .unwrap_or_default();
    let tolerance = chrono::Duration::from_std(cfg.drill.heartbeat_tolerance).unwrap_or_default();
    let end = plan.reachable_until.unwrap_or(plan.dump.consistent_time);
    checks.extend(super::judge_heartbeat(
        ts,
        &ts_text,
        &canary,
        plan.target,
        end,
        tolerance,
        db,
    ));
    Some(ts_text)
}

async fn run_suite(
    conn: &mut mysql_async::Conn,
    suite: &[suite::Check],
    checks: &mut Vec<CheckResult>,
) {
    for check in suite {
        let name = format!("{}: {}", check.suite, check.name);
        if !check.requires.is_empty() {
            checks.push(CheckResult::new(
                &name,
                None,
                Status::Skip,
                "skipped: `-- requires:` names PostgreSQL extensions",
            ));
            continue;
        }
        let db = check.database.as_deref();
        let result = async {
            if let Some(db) = db {
                conn.query_drop(format!("USE {}", sql::quote_ident(db)))
                    .await?;
            }
            let rows: Vec<mysql_async::Row> = conn.query(check.sql.as_str()).await?;
            anyhow::Ok(rows)
        }
        .await;
        let (status, detail) = match result {
            Err(e) => (Status::Fail, format!("error: {e}")),
            Ok(rows) => {
                let first: Option<String> = rows
                    .first()
                    .and_then(|r| r.get_opt::<Option<String>, _>(0))
                    .and_then(|v| v.ok())
                    .flatten();
                match (rows.len(), first.as_deref()) {
                    (1, Some("1")) => (Status::Pass, "true".to_string()),
                    (n, v) => (
                        Status::Fail,
                        format!("expected one row with true, got {n} row(s), first value {v:?}"),
                    ),
                }
            }
        };
        checks.push(CheckResult::new(&name, db, status, detail));
    }
}

/// FULLTEXT search on CJK text needs the n-gram parser, which MySQL has and MariaDB does not.
async fn check_fulltext(
    conn: &mut mysql_async::Conn,
    server: &DrillServer,
    checks: &mut Vec<CheckResult>,
) {
    const NAME: &str = "FULLTEXT search on CJK text (n-gram parser)";
    if server.plan.dump.flavor == crate::repo::mysql::Flavor::Mariadb {
        checks.push(CheckResult::new(
            NAME,
            None,
            Status::Skip,
            "skipped: MariaDB has no n-gram FULLTEXT parser",
        ));
        return;
    }
    let result = async {
        conn.query_drop(sql::FULLTEXT_NGRAM).await?;
        let n: Option<u64> = conn
            .query_first("SELECT COUNT(*) FROM dbagent_drill.ft WHERE MATCH(body) AGAINST ('野比大雄' IN BOOLEAN MODE)")
            .await?;
        conn.query_drop("DROP DATABASE dbagent_drill").await?;
        anyhow::Ok(n.unwrap_or(0))
    }
    .await;
    let (status, detail) = match result {
        Ok(1) => (
            Status::Pass,
            "野比大雄 found through the n-gram index".to_string(),
        ),
        Ok(n) => (Status::Fail, format!("expected 1 match, got {n}")),
        Err(e) => (Status::Fail, format!("error: {e}")),
    };
    checks.push(CheckResult::new(NAME, None, status, detail));
}

/// `target` is a time given by hand that lies outside every window the archive restores.
async fn outside_windows(cfg: &Config, store: &dyn Store, target: DrillTarget) -> bool {
    let DrillTarget::At(t) = target else {
        return false;
    };
    match crate::mysql::restore::catalog(cfg, store).await {
        Ok(cat) => !crate::repo::catalog::Window::any_covers(&cat.windows(), t),
        Err(_) => false,
    }
}
