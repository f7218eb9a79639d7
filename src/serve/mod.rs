//! `dbagent serve`: the sidecar. Named background tasks share one cancellation token; SIGTERM
//! drains them and exits 0; a task that dies takes the process down with a non-zero exit.

pub mod reload;
pub mod state;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::health::{LagLimits, Policy, Prober, Role};
use crate::input_err;
use crate::mysql::conn::MysqlConn;
use crate::pg::conn::ConnInfo;
use crate::schedule::Cron;
use crate::storage::Store;
use state::{Counters, Shared};

type Tasks = JoinSet<(&'static str, anyhow::Result<()>)>;

fn spawn(
    tasks: &mut Tasks,
    name: &'static str,
    fut: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) {
    tracing::debug!(task = name, "starting");
    tasks.spawn(async move { (name, fut.await) });
}

/// Runs until SIGTERM, a task's failure, or a change of configuration that `reload` reads
/// (then `Failure::Restart`: serve starts again in place, see `reload`).
pub async fn run(
    cfg: Config,
    listen: Option<String>,
    reload: reload::Reload,
) -> anyhow::Result<()> {
    let listen = listen.unwrap_or_else(|| cfg.serve.listen.clone());
    let addr: SocketAddr = listen.parse().map_err(|_| {
        input_err!("listen address {listen:?}: expected host:port, like 0.0.0.0:8008")
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| input_err!("cannot listen on {addr}: {e}"))?;
    let refresh_every = cfg.serve.refresh;
    let policy = Policy {
        stale_after: (refresh_every * 3).max(Duration::from_secs(3)),
        loop_dead_after: (refresh_every * 10).max(Duration::from_secs(10)),
        readiness: LagLimits {
            bytes: cfg.serve.max_lag_bytes,
            seconds: cfg.serve.max_lag_seconds,
        },
    };
    let engine = cfg.serve.engine;
    let shared = Shared::new(policy, engine);
    let token = CancellationToken::new();
    let store: Option<Arc<dyn Store>> = match &cfg.repo {
        Some(_) => Some(crate::storage::open_long_running(&cfg)?),
        None => None,
    };
    // Refused before anything starts, so the refusal is the only line printed.
    if cfg.serve.wal_stream && store.is_none() {
        return Err(input_err!(
            "serve.wal_stream needs a repository: set DBAGENT_REPO"
        ));
    }
    if store.is_some() {
        let _ = shared.repository.set(cfg.repository_identity());
    }
    let mut tasks = Tasks::new();
    spawn(
        &mut tasks,
        "configuration",
        reload::watch(cfg.clone(), reload, shared.clone(), token.clone()),
    );

    let router = crate::http::router(shared.clone());
    let t = token.clone();
    spawn(&mut tasks, "http", async move {
        crate::http::serve(listener, router, crate::http::Limits::default(), t).await
    });

    match cfg.serve.engine {
        Engine::Postgres => {
            let conn = ConnInfo::from_config(&cfg.pg);
            watch(
                &mut tasks,
                &cfg,
                &shared,
                &token,
                crate::health::pg::Probe::new(
                    conn.clone(),
                    cfg.pg.data_dir.clone(),
                    &cfg.serve.heartbeat_database,
                ),
                crate::heartbeat::PgWriter::new(
                    conn.with_db(&cfg.serve.heartbeat_database),
                    cfg.serve.node_name.clone(),
                ),
            );
            if let (true, Some(data_dir), Some(store)) =
                (cfg.serve.wal_lookahead, cfg.pg.data_dir.clone(), &store)
            {
                spawn(
                    &mut tasks,
                    "wal-lookahead",
                    lookahead(
                        cfg.clone(),
                        store.clone(),
                        data_dir,
                        shared.clone(),
                        token.clone(),
                    ),
                );
            }
            if let (true, Some(store)) = (cfg.serve.wal_stream, &store) {
                let settings = crate::pg::walstream::Settings {
                    conn: conn.clone(),
                    slot: cfg.serve.wal_stream_slot.clone(),
                    interval: cfg.serve.wal_stream_interval,
                    timeout: cfg.serve.wal_stream_timeout,
                    pipe: crate::pipeline::PipeOptions::for_wal(&cfg),
                };
                spawn(
                    &mut tasks,
                    "wal-stream",
                    crate::pg::walstream::run(
                        settings.clone(),
                        store.clone(),
                        shared.clone(),
                        token.clone(),
                    ),
                );
                spawn(
                    &mut tasks,
                    "wal-stream-slot",
                    crate::pg::walstream::watch_slot(settings, shared.clone(), token.clone()),
                );
            }
            if let Some(store) = &store {
                spawn(
                    &mut tasks,
                    "repository",
                    repo_facts(cfg.clone(), store.clone(), shared.clone(), token.clone()),
                );
            }
        }
        Engine::Mysql => {
            let server = MysqlConn::from_config(&cfg.mysql)?;
            watch(
                &mut tasks,
                &cfg,
                &shared,
                &token,
                crate::health::mysql::Probe::new(server.clone()),
                crate::heartbeat::MysqlWriter::new(server),
            );
            if let Some(store) = &store {
                spawn(
                    &mut tasks,
                    "binlog-shipper",
                    ship_binlogs(cfg.clone(), store.clone(), shared.clone(), token.clone()),
                );
                if cfg.serve.wal_stream {
                    let status = shared.binlog_stream.get_or_init(Default::default).clone();
                    spawn(
                        &mut tasks,
                        "binlog-stream",
                        crate::mysql::stream::run(
                            cfg.clone(),
                            store.clone(),
                            status,
                            token.clone(),
                        ),
                    );
                }
                spawn(
                    &mut tasks,
                    "repository",
                    repo_facts(cfg.clone(), store.clone(), shared.clone(), token.clone()),
                );
            }
        }
    }

    let jobs: Vec<(String, Cron)> = cfg
        .schedule
        .iter()
        .map(|(name, expr)| {
            Ok((
                name.clone(),
                Cron::parse(expr).map_err(|e| input_err!("schedule.{name}: {e}"))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    for (name, cron) in jobs {
        let (cfg, shared, t) = (cfg.clone(), shared.clone(), token.clone());
        let name: &'static str = Box::leak(name.into_boxed_str());
        spawn(&mut tasks, name, run_job(cfg, name, cron, shared, t));
    }

    tracing::info!(%addr, %engine, node = %cfg.serve.node_name, "serving");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: draining");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: draining");
            Ok(())
        }
        Some(res) = tasks.join_next() => match res {
            Ok((name, Ok(()))) => Err(anyhow::anyhow!("task {name} stopped unexpectedly")),
            Ok((_, Err(e))) if matches!(e.downcast_ref(), Some(crate::error::Failure::Restart { .. })) => Err(e),
            Ok((name, Err(e))) => Err(e.context(format!("task {name} failed"))),
            Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
        },
    };
    token.cancel();
    // A restart drains as SIGTERM does, and a SIGTERM meanwhile (the pod being deleted) turns
    // it into the stop it asks for: serve must not start again in place for a pod on its way
    // out.
    let restarting = matches!(
        outcome.as_ref().map_err(|e| e.downcast_ref()),
        Err(Some(crate::error::Failure::Restart { .. }))
    );
    let told_to_stop = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let drain = async {
        while let Some(ended) = tasks.join_next().await {
            if let Ok((name, _)) = ended {
                tracing::debug!(task = name, "stopped");
            }
        }
    };
    // A scheduled job has serve.job_grace after its SIGTERM (a drill tears down its scratch
    // server): wait for that, and a little more for the job's own exit.
    let limit =
        Duration::from_secs(10).max(cfg.serve.job_grace.saturating_add(Duration::from_secs(5)));
    let (drained, stopped) = drain_watching(limit, drain, told_to_stop, restarting).await;
    if !drained {
        tracing::warn!(
            "tasks did not stop within {}; stopping anyway",
            humantime::format_duration(limit)
        );
    }
    match outcome {
        Err(e) if restarting && stopped => {
            tracing::info!(reason = %e, "told to stop while draining for a restart: stopping");
            Ok(())
        }
        // A task that did not stop (a job's process, say) would outlive an in-place start as
        // a child the new image knows nothing of: leave it to the supervisor (exit 3).
        Err(e) if restarting && !drained => {
            Err(anyhow::Error::new(crate::error::Failure::Restart {
                why: format!(
                    "{e}; a task did not stop in time, so serve exits for its supervisor to start it"
                ),
                in_place: false,
            }))
        }
        other => other,
    }
}

/// Waits up to `limit` for `drain`; while `watch`, also for a stop signal. Returns whether
/// the drain ended and whether a stop signal came.
async fn drain_watching(
    limit: Duration,
    drain: impl std::future::Future<Output = ()>,
    stop: impl std::future::Future<Output = ()>,
    watch: bool,
) -> (bool, bool) {
    let mut stopped = false;
    let drained = tokio::time::timeout(limit, async {
        tokio::pin!(drain, stop);
        loop {
            tokio::select! {
                _ = &mut drain => return,
                _ = &mut stop, if watch && !stopped => stopped = true,
            }
        }
    })
    .await
    .is_ok();
    (drained, stopped)
}

/// The snapshot refresher and, when `serve.heartbeat` is on, the heartbeat writer: the same
/// two tasks for either engine.
fn watch(
    tasks: &mut Tasks,
    cfg: &Config,
    shared: &Arc<Shared>,
    token: &CancellationToken,
    probe: impl Prober + 'static,
    writer: impl crate::heartbeat::Writer + 'static,
) {
    spawn(
        tasks,
        "refresher",
        refresh(shared.clone(), probe, cfg.serve.refresh, token.clone()),
    );
    if cfg.serve.heartbeat {
        spawn(
            tasks,
            "heartbeat",
            crate::heartbeat::run(
                shared.clone(),
                writer,
                cfg.serve.heartbeat_interval,
                token.clone(),
            ),
        );
    }
}

/// Refreshes the snapshot once per period. The loop ticks whatever the database does, so
/// `/liveness` only says whether the agent itself is alive.
async fn refresh(
    shared: Arc<Shared>,
    mut probe: impl Prober,
    every: Duration,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A stop is seen first, also in the middle of a refresh the database holds: a tick
        // due at the same moment would start another one, which the database holds again.
        tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        shared.tick();
        let refreshed = tokio::select! {
            biased;
            _ = token.cancelled() => return Ok(()),
            r = tokio::time::timeout(every.max(Duration::from_secs(2)), probe.snapshot()) => r,
        };
        match refreshed {
            Ok(s) => shared.set_snapshot(s),
            // Keep the old snapshot: it goes stale, and stale means "unknown".
            Err(_) => probe.reset(),
        }
        shared.tick();
    }
}

/// Pushes `.ready` WAL ahead of PostgreSQL's archiver, in parallel, so that its own
/// `wal-push` finds the segment archived and returns at once.
async fn lookahead(
    cfg: Config,
    store: Arc<dyn Store>,
    data_dir: PathBuf,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let parallel = cfg.serve.wal_lookahead_parallel;
    // What it pushed (or found stored with the same bytes) is what PostgreSQL will ask
    // wal-push to archive next: recorded so that wal-push returns at once.
    let sysid = match cfg.pg.system_identifier {
        Some(id) => Some(id),
        None => crate::pg::control::system_identifier(&data_dir).ok(),
    };
    let mut done: HashSet<String> = HashSet::new();
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let ready = crate::pg::wal::ready_files(&data_dir);
        done.retain(|n| ready.contains(n));
        let todo: Vec<String> = ready
            .into_iter()
            .filter(|n| !done.contains(n))
            .take(64)
            .collect();
        if todo.is_empty() {
            continue;
        }
        let results: Vec<(String, anyhow::Result<crate::pg::wal::Pushed>)> =
            futures::stream::iter(todo)
                .map(|name| {
                    let (cfg, store, path) =
                        (&cfg, store.clone(), data_dir.join("pg_wal").join(&name));
                    async move { (name, crate::pg::wal::push(cfg, store.as_ref(), &path).await) }
                })
                .buffer_unordered(parallel)
                .collect()
                .await;
        for (name, res) in results {
            match res {
                Ok(_) => {
                    Counters::add(&shared.counters.lookahead_pushed, 1);
                    let segment = matches!(
                        crate::repo::wal::WalFile::classify(&name),
                        Some(crate::repo::wal::WalFile::Segment(_))
                    );
                    if let (Some(sysid), true) = (sysid, segment) {
                        shared.segments.add(sysid, &name);
                    }
                    done.insert(name);
                }
                Err(e) => {
                    Counters::add(&shared.counters.lookahead_failures, 1);
                    let msg = format!("{e:#}");
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(wal = %name, error = %msg, "look-ahead push failed; PostgreSQL's archive_command will retry");
                    }
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// Ships closed binlogs every `serve.binlog_interval` (the same work as `dbagent binlog-push`),
/// remembering what it already verified so a pass re-reads nothing.
async fn ship_binlogs(
    cfg: Config,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut state = crate::mysql::binlog::ShipState::default();
    let mut last_error: Option<String> = None;
    let mut last_rotation = std::time::Instant::now();
    let server = MysqlConn::from_config(&cfg.mysql)?;
    loop {
        // The active binlog is never shipped: rotate it when it is old, so the restorable
        // window never lags more than binlog_max_age behind on a quiet server.
        if last_rotation.elapsed() >= cfg.serve.binlog_max_age {
            let (snap, _) = shared.snapshot();
            if snap.is_some_and(|s| s.up && s.role == crate::health::Role::Primary) {
                match rotate_binlog(&server).await {
                    Ok(()) => last_rotation = std::time::Instant::now(),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "FLUSH BINARY LOGS failed (the account needs RELOAD)")
                    }
                }
            }
        }
        match crate::mysql::binlog::ship_closed(&cfg, &store, &mut state).await {
            Ok(report) => {
                Counters::add(&shared.counters.binlog_pushed, report.shipped.len() as u64);
                if !report.shipped.is_empty() {
                    tracing::info!(summary = %report, "binlogs shipped");
                }
                if last_error.take().is_some() {
                    tracing::info!("binlog shipping resumed");
                }
            }
            Err(e) => {
                Counters::add(&shared.counters.binlog_failures, 1);
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "binlog shipping failed; retrying");
                }
                last_error = Some(msg);
            }
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(cfg.serve.binlog_interval) => {}
        }
    }
}

async fn rotate_binlog(server: &MysqlConn) -> anyhow::Result<()> {
    use mysql_async::prelude::Queryable;
    let mut conn = server.connect().await?;
    let flushed = conn.query_drop("FLUSH BINARY LOGS").await;
    let _ = conn.disconnect().await;
    flushed.map_err(|e| server.query_error(e))
}

/// Reads the repository every `serve.catalog_refresh` for backup, window and drill metrics.
async fn repo_facts(
    cfg: Config,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let wait = match read_repo_facts(&cfg, store.as_ref(), &shared).await {
            // Which cluster this is is not known yet (no snapshot, or nothing archived).
            None => Duration::from_secs(2).min(cfg.serve.catalog_refresh),
            Some(Ok(facts)) => {
                *shared.repo.write().unwrap() = facts;
                cfg.serve.catalog_refresh
            }
            Some(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the repository");
                shared.repo.write().unwrap().error = Some(format!("{e:#}"));
                cfg.serve.catalog_refresh
            }
        };
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the repository says about this server's cluster: the PostgreSQL system identifier
/// (configured, or from the snapshot), or the MySQL server (configured, or the only one).
async fn read_repo_facts(
    cfg: &Config,
    store: &dyn Store,
    shared: &Shared,
) -> Option<anyhow::Result<state::RepoFacts>> {
    let facts = |last: Option<(chrono::DateTime<chrono::Utc>, u64)>,
                 count: usize,
                 windows: Vec<crate::repo::catalog::Window>,
                 drill| state::RepoFacts {
        last_backup_time: last.map(|l| l.0),
        last_backup_bytes: last.map(|l| l.1),
        backups: count,
        window_start: windows.first().map(|w| w.from),
        window_end: windows.last().map(|w| w.to),
        refreshed: Some(chrono::Utc::now()),
        error: None,
        drill,
        timeline_forks: None,
        binlog_gap: None,
        newest_dump_binlog: None,
    };
    match cfg.serve.engine {
        Engine::Postgres => {
            let sysid = cfg.pg.system_identifier.or_else(|| {
                shared
                    .snapshot()
                    .0
                    .and_then(|s| s.system_identifier.as_deref()?.parse().ok())
            })?;
            Some(
                async {
                    let cat = crate::repo::catalog::PgCatalog::load(store, sysid).await?;
                    let last = cat.backups.last().map(|b| (b.stop_time, b.plain_bytes()));
                    let drill = latest_drill(store, &crate::repo::pg_drills_prefix(sysid)).await;
                    Ok(state::RepoFacts {
                        timeline_forks: Some(cat.branches().forks()),
                        ..facts(last, cat.backups.len(), cat.windows(), drill)
                    })
                }
                .await,
            )
        }
        Engine::Mysql => {
            let server = match &cfg.mysql.server_uuid {
                Some(id) => id.clone(),
                None => match crate::repo::mysql::servers(store).await {
                    Ok(found) if found.len() == 1 => found.into_iter().next()?,
                    _ => return None,
                },
            };
            Some(
                async {
                    let cat = crate::repo::mysql::MysqlCatalog::load(store, &server).await?;
                    let last = cat
                        .dumps
                        .last()
                        .map(|d| (d.consistent_time, d.data.plain_bytes));
                    let drill = latest_drill(store, &format!("mysql/{server}/drills/")).await;
                    let newest = cat.dumps.last();
                    let chain = newest.map(|d| cat.chain(&d.binlog.file));
                    let binlog_gap = match chain.and_then(|c| c.gap.zip(c.gap_file)) {
                        // Still on the server: the shipper stores it, nothing is lost yet.
                        Some((_, file)) if server_keeps(cfg, &file).await => None,
                        gap => gap.map(|(gap, _)| gap),
                    };
                    Ok(state::RepoFacts {
                        binlog_gap,
                        newest_dump_binlog: newest.map(|d| d.binlog.file.clone()),
                        ..facts(last, cat.dumps.len(), cat.windows(), drill)
                    })
                }
                .await,
            )
        }
    }
}

/// Whether the MySQL server still keeps binlog `file` (a server it cannot ask keeps none).
async fn server_keeps(cfg: &Config, file: &str) -> bool {
    let listed = async {
        let logs = crate::mysql::server::binary_logs(&MysqlConn::from_config(&cfg.mysql)?).await?;
        anyhow::Ok(logs.iter().any(|(name, _)| name == file))
    };
    listed.await.unwrap_or_else(|e| {
        tracing::debug!(error = %format!("{e:#}"), "cannot list the server's binlogs");
        false
    })
}

/// The newest drill report under `prefix`, and the newest one that passed.
async fn latest_drill(store: &dyn Store, prefix: &str) -> Option<state::DrillFacts> {
    let mut keys: Vec<String> = store
        .list(prefix)
        .await
        .ok()?
        .into_iter()
        .map(|o| o.key)
        .collect();
    // Report ids are UTC timestamps: the name order is the time order.
    keys.sort();
    keys.reverse();
    let mut facts: Option<state::DrillFacts> = None;
    for key in keys.iter().take(50) {
        let report = match crate::repo::read_manifest::<crate::drill::report::Report>(
            store,
            key,
            "drill report",
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%key, error = %format!("{e:#}"), "cannot read drill report");
                continue;
            }
        };
        match &mut facts {
            None => {
                facts = Some(state::DrillFacts {
                    last_run: report.finished,
                    passed: report.passed(),
                    duration_seconds: report.duration_seconds,
                    rto_seconds: report.rto_seconds,
                    last_success: report.passed().then_some(report.finished),
                });
            }
            Some(f) if report.passed() => {
                f.last_success = Some(report.finished);
            }
            Some(_) => continue,
        }
        if facts.as_ref().is_some_and(|f| f.last_success.is_some()) {
            break;
        }
    }
    facts
}

/// The command line a scheduled job runs (a child process, so a failing job never takes the
/// sidecar down).
fn job_args(cfg: &Config, job: &str) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(file) = &cfg.config_file {
        args.extend(["--config".to_string(), file.to_string_lossy().into_owned()]);
    }
    if let Some(repo) = &cfg.repo {
        args.extend(["--repo".to_string(), repo.clone()]);
    }
    let engine = cfg.serve.engine.as_str();
    match job {
        "backup" if cfg.serve.engine == Engine::Mysql => {
            args.extend(["backup", "--engine", engine].map(String::from))
        }
        "backup" => args.push("backup".into()),
        "dump" => args.extend(["backup", "--engine", engine, "--kind", "dump"].map(String::from)),
        "drill" => args.extend(["drill", "--engine", engine].map(String::from)),
        other => args.push(other.to_string()),
    }
    args
}

/// Why a job due under `serve.schedule_on = "primary"` does not run on a node in `role`
/// (`None`: it runs). Every pod of a StatefulSet shares one configuration; the primary is the
/// one pod that runs the jobs, whichever pod that is after a failover.
fn not_here(role: Role) -> Option<&'static str> {
    match role {
        Role::Primary => None,
        Role::Replica => Some("this node is a replica and serve.schedule_on = primary"),
        Role::Unknown => Some(
            "the database's role is unknown (it does not answer) and serve.schedule_on = primary",
        ),
    }
}

/// How long a job due under `serve.schedule_on = "primary"` waits for a database that does
/// not answer before it skips the run as failed (never past the job's next scheduled time): a
/// restart or a failover at the scheduled minute delays the night's backup instead of
/// skipping it.
const ROLE_WAIT: Duration = Duration::from_secs(600);

/// The node's role as soon as the database answers, or `Role::Unknown` once `limit` has
/// passed (or `token` is cancelled) without an answer.
async fn known_role(shared: &Shared, limit: Duration, token: &CancellationToken) -> Role {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let role = shared.snapshot().0.map(|s| s.role).unwrap_or_default();
        if role != Role::Unknown || tokio::time::Instant::now() >= deadline {
            return role;
        }
        tokio::select! {
            _ = token.cancelled() => return role,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Runs one job on its schedule. Runs are sequential, so a job never overlaps itself: a run
/// that outlasts its interval delays the next, and the missed times are skipped.
async fn run_job(
    cfg: Config,
    name: &'static str,
    cron: Cron,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the dbagent binary")?;
    shared.job_update(name, |j| j.schedule = cron.to_string());
    loop {
        let Some(next) = cron.next_after(chrono::Utc::now()) else {
            tracing::warn!(job = name, schedule = %cron, "schedule never fires");
            token.cancelled().await;
            return Ok(());
        };
        shared.job_update(name, |j| j.next_run = Some(next));
        // Sleep in short steps so a wall-clock jump is noticed.
        loop {
            let left = (next - chrono::Utc::now()).to_std().unwrap_or_default();
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                _ = tokio::time::sleep(left.min(Duration::from_secs(30))) => {}
            }
        }
        if cfg.serve.schedule_on_primary {
            let mut role = shared.snapshot().0.map(|s| s.role).unwrap_or_default();
            if role == Role::Unknown {
                let until_next = cron
                    .next_after(chrono::Utc::now())
                    .and_then(|n| (n - chrono::Utc::now()).to_std().ok())
                    .unwrap_or(ROLE_WAIT);
                // It ends a second before the next run, so that run is tried in its turn
                // instead of passing unnoticed while this one waits.
                let limit = ROLE_WAIT.min(until_next.saturating_sub(Duration::from_secs(1)));
                tracing::warn!(
                    job = name,
                    wait_seconds = limit.as_secs(),
                    "the database does not answer at the scheduled time: waiting for it before running this job on the primary"
                );
                role = known_role(&shared, limit, &token).await;
                if token.is_cancelled() {
                    return Ok(());
                }
            }
            match not_here(role) {
                Some(why) if role == Role::Unknown => {
                    // A run the database was down for is a failed run: the failure counter
                    // is what the alert watches.
                    tracing::error!(job = name, "scheduled job skipped: {why}");
                    shared.job_update(name, |j| j.failed += 1);
                    continue;
                }
                Some(why) => {
                    tracing::info!(job = name, "scheduled job skipped: {why}");
                    continue;
                }
                None => {}
            }
        }
        let started = chrono::Utc::now();
        let clock = std::time::Instant::now();
        shared.job_update(name, |j| {
            j.running = true;
            j.last_start = Some(started);
        });
        tracing::info!(job = name, "scheduled job started");
        let job = crate::proc::Program::new(&exe).args(job_args(&cfg, name));
        let status = match job
            .status_until(token.cancelled(), cfg.serve.job_grace)
            .await
        {
            Ok(Some(status)) => status,
            Ok(None) => {
                shared.job_update(name, |j| j.running = false);
                return Ok(());
            }
            // A process that cannot be started (the pod's pid limit, memory) is a failed run,
            // counted where the alert looks; serve itself, and the next run, go on.
            Err(e) => {
                shared.job_update(name, |j| {
                    j.running = false;
                    j.failed += 1;
                    j.last_exit_code = None;
                });
                tracing::error!(job = name, error = %format!("{e:#}"), "scheduled job could not be run");
                continue;
            }
        };
        let elapsed = clock.elapsed();
        shared.job_update(name, |j| {
            j.running = false;
            j.last_duration = Some(elapsed);
            j.last_exit_code = status.code();
            if status.success() {
                j.succeeded += 1;
                j.last_success = Some(chrono::Utc::now());
            } else {
                j.failed += 1;
            }
        });
        if status.success() {
            tracing::info!(
                job = name,
                seconds = elapsed.as_secs_f64(),
                "scheduled job succeeded"
            );
        } else {
            tracing::error!(job = name, %status, seconds = elapsed.as_secs_f64(), "scheduled job failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SIGTERM while serve drains for a restart makes it stop instead (the pod is being
    /// deleted); a drain that does not end in time is told apart, so no in-place start leaves
    /// a task's process behind.
    #[tokio::test]
    async fn a_stop_during_the_restart_drain_is_seen() {
        let slow = || tokio::time::sleep(Duration::from_millis(200));
        let now = std::future::ready(());
        let never = std::future::pending::<()>;
        let limit = Duration::from_secs(5);
        assert_eq!(drain_watching(limit, slow(), now, true).await, (true, true));
        let now = std::future::ready(());
        assert_eq!(
            drain_watching(limit, slow(), now, false).await,
            (true, false)
        );
        assert_eq!(
            drain_watching(limit, slow(), never(), true).await,
            (true, false)
        );
        let short = Duration::from_millis(100);
        assert_eq!(
            drain_watching(short, never(), std::future::ready(()), true).await,
            (false, true)
        );
    }

    /// A job that comes due while the database does not answer waits for it: it runs once the
    /// node answers as the primary, and is skipped when the wait ends without an answer.
    #[tokio::test]
    async fn a_job_due_while_the_database_is_down_waits_for_its_role() {
        let shared = Shared::new(
            Policy {
                stale_after: Duration::from_secs(3),
                loop_dead_after: Duration::from_secs(10),
                readiness: LagLimits::default(),
            },
            Engine::Postgres,
        );
        let token = CancellationToken::new();
        let started = std::time::Instant::now();
        let role = known_role(&shared, Duration::from_millis(1200), &token).await;
        assert_eq!(role, Role::Unknown);
        assert!(started.elapsed() >= Duration::from_millis(1200));

        let answering = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            answering.set_snapshot(crate::health::Snapshot {
                up: true,
                role: Role::Primary,
                ..Default::default()
            });
        });
        let started = std::time::Instant::now();
        let role = known_role(&shared, Duration::from_secs(60), &token).await;
        assert_eq!(role, Role::Primary);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn primary_only_jobs_run_on_the_primary() {
        assert_eq!(not_here(Role::Primary), None);
        assert!(not_here(Role::Replica).unwrap().contains("replica"));
        assert!(not_here(Role::Unknown).unwrap().contains("unknown"));
    }
}
