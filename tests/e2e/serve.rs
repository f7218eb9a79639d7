//! `dbagent serve` against a real PostgreSQL primary and streaming standby: Patroni-compatible
//! answers, heartbeat lag, paused replay, a lost primary, promotion, a stopped database.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dbagent_testcontainers::{
    Postgres, command_as_pg_user, free_port, http_request, pg_bin, pg_owned_tempdir,
};
use tempfile::TempDir;

use crate::support::*;

/// A running `dbagent serve`; SIGTERM on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
}

impl Serve {
    pub fn start(env: &[(String, String)]) -> Serve {
        Serve::start_at(free_port(), env)
    }

    /// `start` on a port chosen beforehand (for a server whose archive_command asks it).
    pub fn start_at(port: u16, env: &[(String, String)]) -> Serve {
        Serve::start_program(std::path::Path::new(BIN), port, env)
    }

    /// `start_at` of another copy of the binary.
    pub fn start_program(bin: &std::path::Path, port: u16, env: &[(String, String)]) -> Serve {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DBAGENT_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let s = Serve { child, port };
        s.wait_for("the HTTP server to answer", Duration::from_secs(10), |s| {
            s.code("/liveness") == 200
        });
        s
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(self.port, "GET", path).unwrap_or((0, String::new()))
    }

    pub fn code(&self, path: &str) -> u16 {
        self.get(path).0
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(path).1).unwrap_or(serde_json::Value::Null)
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics").1;
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    /// A sample of `name` whose label `key` is `value`.
    pub fn metric_where(&self, name: &str, key: &str, value: &str) -> Option<f64> {
        let body = self.get("/metrics").1;
        let scrape =
            prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(key) == Some(value))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    pub fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(&Serve) -> bool) -> Duration {
        let start = Instant::now();
        while start.elapsed() < limit {
            if cond(self) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {limit:?} waiting for {what}; status: {}",
            self.get("/health").1
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as when the node is lost.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(15), "serve did not exit after SIGTERM")
    }

    /// The process is there and has not exited (not a zombie waiting to be reaped).
    pub fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_some_and(|state| state != 'Z' && state != 'X')
    }

    /// Its exit status once it exits, within `limit` (else the test fails saying `why`).
    pub fn wait_exit(&mut self, limit: Duration, why: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "{why}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pg_env(pg: &Postgres) -> Vec<(String, String)> {
    pg.env()
        .into_iter()
        .filter(|(k, _)| k != "PGDATA")
        .collect()
}

/// A streaming standby of `primary` (pg_basebackup -R), started on its own port.
pub fn standby_of(primary: &Postgres) -> (TempDir, Postgres) {
    let dir = pg_owned_tempdir().unwrap();
    let data = dir.path().join("data");
    let out = command_as_pg_user(pg_bin("pg_basebackup").unwrap())
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-X",
            "stream",
            "-R",
            "-c",
            "fast",
            "-D",
        ])
        .arg(&data)
        .arg("-p")
        .arg(primary.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The standby must not archive into anything: it has no repository of its own here.
    std::fs::write(
        data.join("standby-extra.conf"),
        "archive_mode = off\nhot_standby_feedback = on\n",
    )
    .unwrap();
    let conf = data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("include 'standby-extra.conf'\n");
    std::fs::write(&conf, text).unwrap();
    let standby = Postgres::start_existing(&data, &[]).unwrap();
    (dir, standby)
}

#[test]
fn primary_and_standby_answer_like_patroni() {
    let primary = dbagent_testcontainers::PostgresBuilder::new()
        .start()
        .unwrap();
    let (_dir, standby) = standby_of(&primary);
    // The heartbeat in the site's application database, not the one the probe connects to:
    // it is read where it is written (before, it was looked for in pg.database and never
    // found, so the standby's lag in seconds came from replay timestamps).
    primary
        .psql("postgres", "CREATE DATABASE discourse")
        .unwrap();
    let with_heartbeat_db = |pg: &Postgres| {
        let mut env = pg_env(pg);
        env.push((
            "DBAGENT_SERVE_HEARTBEAT_DATABASE".into(),
            "discourse".into(),
        ));
        env
    };
    let p = Serve::start(&with_heartbeat_db(&primary));
    let s = Serve::start(&with_heartbeat_db(&standby));
    p.wait_for("primary state", Duration::from_secs(10), |p| {
        p.code("/primary") == 200
    });
    s.wait_for("standby state", Duration::from_secs(10), |s| {
        s.code("/replica") == 200
    });

    for path in ["/", "/primary", "/read-write", "/leader", "/master"] {
        assert_eq!(p.code(path), 200, "primary {path}");
        assert_eq!(s.code(path), 503, "standby {path}");
    }
    assert_eq!(p.code("/replica"), 503);
    assert_eq!(s.code("/replica"), 200);
    assert_eq!(p.code("/read-only"), 200);
    assert_eq!(s.code("/read-only"), 200);
    assert_eq!(
        http_request(p.port, "OPTIONS", "/").unwrap(),
        (200, String::new())
    );
    assert_eq!(
        http_request(s.port, "OPTIONS", "/").unwrap(),
        (503, String::new())
    );
    assert_eq!(http_request(s.port, "HEAD", "/replica").unwrap().0, 200);
    let body = s.json("/replica");
    assert_eq!(body["role"], "replica");
    assert_eq!(body["state"], "running");
    assert!(body["xlog"]["replayed_location"].is_u64(), "{body}");
    assert_eq!(
        body["database_system_identifier"],
        p.json("/")["database_system_identifier"]
    );
    let primary_body = p.json("/");
    assert_eq!(
        primary_body["replication"].as_array().unwrap().len(),
        1,
        "{primary_body}"
    );

    // Idle primary: the heartbeat keeps the standby's lag in seconds small, where
    // now() - pg_last_xact_replay_timestamp() would grow without bound.
    std::thread::sleep(Duration::from_secs(6));
    for _ in 0..10 {
        let body = s.json("/replica");
        let lag = body["lag_seconds"].as_f64().expect("lag_seconds");
        assert!(lag < 2.0, "idle-primary lag {lag}s");
        let beat = body["heartbeat_age_seconds"].as_f64();
        assert!(beat.is_some_and(|b| b < 2.0), "heartbeat age: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let naive: f64 = standby
        .psql(
            "postgres",
            "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        naive < 2.0,
        "the heartbeat also keeps replay timestamps fresh ({naive}s)"
    );

    // Paused replay while writes continue: byte lag passes 1MB, lag seconds grow.
    standby
        .psql("postgres", "SELECT pg_wal_replay_pause()")
        .unwrap();
    primary
        .psql(
            "postgres",
            "CREATE TABLE churn AS SELECT g, md5(g::text) FROM generate_series(1, 100000) g",
        )
        .unwrap();
    s.wait_for(
        "/replica?lag=1MB to turn 503",
        Duration::from_secs(10),
        |s| s.code("/replica?lag=1MB") == 503,
    );
    let reason = s.json("/replica?lag=1MB")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("lag"), "{reason}");
    let lag1 = s.json("/replica")["lag_seconds"].as_f64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let lag2 = s.json("/replica")["lag_seconds"].as_f64().unwrap();
    assert!(
        lag2 > lag1 + 1.5,
        "lag seconds did not grow while paused: {lag1} -> {lag2}"
    );
    assert_eq!(s.json("/replica")["xlog"]["paused"], true);
    standby
        .psql("postgres", "SELECT pg_wal_replay_resume()")
        .unwrap();
    s.wait_for(
        "/replica?lag=1MB to turn 200 again",
        Duration::from_secs(15),
        |s| s.code("/replica?lag=1MB") == 200,
    );

    // Metrics parse and say what the endpoints say.
    assert_eq!(s.metric("dbagent_wal_receiver_up"), Some(1.0));
    assert_eq!(p.metric("dbagent_standbys"), Some(1.0));
    assert!(p.metric("dbagent_heartbeat_writes_total").unwrap() > 3.0);

    // A monitoring role without pg_monitor sees the WAL receiver's pid and nothing else: the
    // standby is not called healthy, and the reason names the grant. Before, serve panicked
    // on the NULL state and exited, again at every restart.
    primary
        .psql("postgres", "CREATE ROLE watcher LOGIN")
        .unwrap();
    let mut env = pg_env(&standby);
    env.retain(|(k, _)| k != "PGUSER");
    env.push(("PGUSER".into(), "watcher".into()));
    env.push(("DBAGENT_SERVE_HEARTBEAT".into(), "false".into()));
    let w = Serve::start(&env);
    w.wait_for(
        "the unprivileged sidecar to name the missing grant",
        Duration::from_secs(15),
        |w| {
            w.json("/replica")["reason"]
                .as_str()
                .is_some_and(|r| r.contains("GRANT pg_monitor TO watcher"))
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.code("/liveness"), 200, "serve is still running");
    assert_eq!(w.code("/replica"), 503);
    drop(w);

    // The primary is lost: the standby is not a healthy replica any more, and says why.
    drop(p);
    let mut primary = primary;
    primary.stop().unwrap();
    s.wait_for("/replica to turn 503", Duration::from_secs(15), |s| {
        s.code("/replica") == 503
    });
    let reason = s.json("/replica")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("WAL receiver"), "{reason}");
    assert_eq!(s.metric("dbagent_wal_receiver_up"), Some(0.0));
    assert_eq!(s.code("/health"), 200, "the standby itself is still up");

    // Promote it: /primary turns 200 within 3 seconds, on the new timeline. The checkpoint
    // after a promotion is spread over checkpoint_timeout: a long one, as on many sites,
    // keeps pg_control's timeline at the old one meanwhile.
    let extra = standby.data_dir().join("standby-extra.conf");
    let mut conf = std::fs::read_to_string(&extra).unwrap();
    conf.push_str("checkpoint_timeout = '1h'\n");
    std::fs::write(&extra, conf).unwrap();
    standby.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let old_timeline = s.metric("dbagent_timeline").unwrap();
    standby.psql("postgres", "SELECT pg_promote()").unwrap();
    let took = s.wait_for(
        "/primary to turn 200 after promotion",
        Duration::from_secs(3),
        |s| s.code("/primary") == 200,
    );
    eprintln!("promotion noticed in {took:?}");
    s.wait_for(
        "the new timeline in /patroni and the metrics",
        Duration::from_secs(3),
        |s| {
            s.metric("dbagent_timeline") == Some(old_timeline + 1.0)
                && s.json("/patroni")["timeline"].as_f64() == Some(old_timeline + 1.0)
        },
    );
    assert_eq!(s.code("/replica"), 503);
    // The new primary writes its own heartbeat.
    s.wait_for(
        "heartbeat on the new primary",
        Duration::from_secs(5),
        |s| s.metric("dbagent_heartbeat_writes_total").unwrap_or(0.0) >= 1.0,
    );
}

#[test]
fn a_stopped_database_turns_health_503_but_not_liveness() {
    let mut pg = dbagent_testcontainers::PostgresBuilder::new()
        .start()
        .unwrap();
    let mut serve = Serve::start(&pg_env(&pg));
    serve.wait_for("healthy", Duration::from_secs(10), |s| {
        s.code("/health") == 200
    });
    assert_eq!(serve.code("/readiness"), 200);
    pg.stop().unwrap();
    serve.wait_for("/health to turn 503", Duration::from_secs(10), |s| {
        s.code("/health") == 503
    });
    assert_eq!(serve.code("/readiness"), 503);
    assert_eq!(serve.code("/primary"), 503);
    let reason = serve.json("/health")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("down") || reason.contains("old"),
        "{reason}"
    );
    // Nothing hangs: every answer comes fast while the database is gone.
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(serve.code("/liveness"), 200);
        assert_eq!(serve.code("/health"), 503);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "a probe took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(serve.metric("dbagent_up"), Some(0.0));
    // Back up: healthy again.
    pg.restart().unwrap();
    serve.wait_for("/health to recover", Duration::from_secs(15), |s| {
        s.code("/health") == 200
    });
    // SIGTERM drains and exits 0.
    let status = serve.terminate();
    assert!(status.success(), "serve exited with {status}");
}

/// A primary whose `archive_command` (`wal-push`, with `env`) waits 3 s and then asks the
/// sidecar on `port` first, so the sidecar's look-ahead gets to each segment first; and that
/// sidecar, started with `env` too. Returns once the look-ahead has pushed a first segment.
fn primary_behind_a_sidecar(env: &[(String, String)]) -> (Postgres, Serve) {
    let port = free_port();
    let mut b = dbagent_testcontainers::PostgresBuilder::new()
        .archive_command(&format!("sleep 3 && {BIN} wal-push %p"))
        .env(
            "DBAGENT_WAL_SIDECAR_URL",
            &format!("http://127.0.0.1:{port}"),
        )
        .env("DBAGENT_LOG", "info")
        .env("DBAGENT_LOG_FORMAT", "text");
    for (k, v) in env {
        b = b.env(k, v);
    }
    let pg = b.start().unwrap();
    // PGDATA too: the sidecar shares the data directory and watches archive_status.
    let mut sidecar_env = pg.env();
    sidecar_env.extend(env.iter().cloned());
    let serve = Serve::start_at(port, &sidecar_env);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT 1 AS g; SELECT pg_switch_wal()",
    )
    .unwrap();
    serve.wait_for("a look-ahead push", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_lookahead_pushed_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    (pg, serve)
}

#[test]
fn lookahead_ships_ready_wal_before_the_archiver() {
    let repo = Repo::file();
    // The archiver waits 3 s per segment, so the sidecar gets there first; wal-push then
    // asks it and returns without pushing again.
    let (pg, serve) = primary_behind_a_sidecar(&repo.env());
    for i in 0..3 {
        pg.psql("postgres", &format!("CREATE TABLE t{i} AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal()"))
            .unwrap();
    }
    serve.wait_for("look-ahead pushes", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_lookahead_pushed_total")
            .unwrap_or(0.0)
            >= 4.0
    });
    // PostgreSQL's own archive_command then finds the same segments and succeeds.
    for _ in 0..200 {
        let archived: i64 = pg
            .psql("postgres", "SELECT archived_count FROM pg_stat_archiver")
            .unwrap()
            .parse()
            .unwrap();
        if archived >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
            .unwrap(),
        "0"
    );
    assert!(
        pg.psql("postgres", "SELECT archived_count FROM pg_stat_archiver")
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= 3
    );
    assert_eq!(
        serve.metric("dbagent_wal_lookahead_failures_total"),
        Some(0.0)
    );
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let fast = log
        .lines()
        .filter(|l| l.contains("already stored by the sidecar"))
        .count();
    assert!(
        fast >= 3,
        "archive_command took the fast path {fast} times:\n{log}"
    );
    assert!(
        serve
            .metric_where("dbagent_wal_segment_answers_total", "answer", "stored")
            .unwrap()
            >= 3.0
    );
}

/// The configuration moves the repository (a ConfigMap edited in place) while `serve` runs.
/// `wal-push`, a new process per segment, reads the new file; the sidecar must not tell it a
/// segment is archived because it stored it in the old repository, and it starts again in
/// place to apply the new configuration: the same process, so no container restart (before:
/// exit 3, for the kubelet to restart it, the pod not ready meanwhile).
#[test]
fn a_repository_moved_under_serve_gets_every_segment() {
    let (old, new) = (Repo::file(), Repo::file());
    let url = |r: &Repo| format!("file://{}", r.root().unwrap().display());
    let dir = pg_owned_tempdir().unwrap();
    let config = dir.path().join("dbagent.toml");
    let write_config = |repo: &Repo| {
        // Replaced as the kubelet replaces a mounted ConfigMap: a new file renamed over.
        let next = dir.path().join("dbagent.toml.next");
        std::fs::write(&next, format!("repo = {:?}\n", url(repo))).unwrap();
        std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::rename(&next, &config).unwrap();
    };
    write_config(&old);
    let (pg, serve) =
        primary_behind_a_sidecar(&[("DBAGENT_CONFIG".into(), config.display().to_string())]);

    write_config(&new);
    let segment = pg
        .psql(
            "postgres",
            "INSERT INTO t VALUES (2); SELECT pg_walfile_name(pg_current_wal_lsn())",
        )
        .unwrap();
    pg.psql("postgres", "SELECT pg_switch_wal()").unwrap();
    wait_archived(&pg, &segment);
    let in_repo = |r: &Repo| {
        r.root()
            .unwrap()
            .join("pg")
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .any(|c| c.path().join("wal").join(format!("{segment}.zst")).exists())
    };
    assert!(
        in_repo(&new),
        "{segment} was acknowledged but is not in the repository the configuration names"
    );

    // serve applies the new configuration by starting again as the same process: its
    // uptime starts over, it never exits, and it answers at once.
    let took = serve.wait_for(
        "serve to start again with the new configuration",
        Duration::from_secs(30),
        |s| {
            assert!(s.alive(), "serve exited instead of starting again in place");
            s.metric("dbagent_uptime_seconds")
                .is_some_and(|up| up < 5.0)
        },
    );
    eprintln!("started again in place after {took:?}");
    assert_eq!(serve.code("/liveness"), 200);
    // The new image goes on with the new repository: a segment switched now is pushed there
    // by its look-ahead.
    let pushed = serve
        .metric("dbagent_wal_lookahead_pushed_total")
        .unwrap_or(0.0);
    let segment = pg
        .psql(
            "postgres",
            "INSERT INTO t VALUES (3); SELECT pg_walfile_name(pg_current_wal_lsn())",
        )
        .unwrap();
    pg.psql("postgres", "SELECT pg_switch_wal()").unwrap();
    serve.wait_for("the look-ahead to push", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_lookahead_pushed_total")
            .unwrap_or(0.0)
            > pushed
    });
    wait_archived(&pg, &segment);
    assert!(in_repo(&new), "{segment} is not in the new repository");
    assert!(serve.alive());
}

/// `dbagent encryption set` turns encryption on while `serve` pushes WAL ahead of the
/// archiver. New `wal-push` processes without recipients are refused at once (WAL waits in
/// pg_wal); the sidecar, which read the repository's records when it started, must be refused
/// too (within its 30 s reading) instead of storing segments in the clear.
#[test]
fn encryption_turned_on_under_serve_stops_its_pushes_in_the_clear() {
    let repo = Repo::file();
    let (pg, serve) = primary_behind_a_sidecar(&repo.env());

    let keys = pg_owned_tempdir().unwrap();
    let pair = crate::encryption::keygen(keys.path(), "site");
    ok(&dbagent_cmd(&repo, None, &["encryption", "set"])
        .env("DBAGENT_ENCRYPTION_RECIPIENTS_FILE", &pair.recipients)
        .output()
        .unwrap());
    std::thread::sleep(Duration::from_secs(31));
    let failures = serve
        .metric("dbagent_wal_lookahead_failures_total")
        .unwrap_or(0.0);
    let segment = pg
        .psql(
            "postgres",
            "INSERT INTO t VALUES (2); SELECT pg_walfile_name(pg_current_wal_lsn())",
        )
        .unwrap();
    pg.psql("postgres", "SELECT pg_switch_wal()").unwrap();
    serve.wait_for("the look-ahead's refusal", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_lookahead_failures_total")
            .unwrap_or(0.0)
            > failures
    });
    std::thread::sleep(Duration::from_secs(5)); // the archiver's turn, 3 s after the .ready
    let stored: Vec<_> = walk(repo.root().unwrap())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&segment))
        .collect();
    assert!(
        stored.is_empty(),
        "{segment} stored in the clear: {stored:?}"
    );
    let failed: i64 = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed >= 1, "wal-push was not refused");
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn mysql_env(db: &dbagent_testcontainers::MariaDb) -> Vec<(String, String)> {
    vec![
        ("DBAGENT_MYSQL_URL".into(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
    ]
}

#[test]
fn mariadb_primary_and_replica_answer_the_same_way() {
    let (mut primary, replica) = dbagent_testcontainers::mariadb_replica_pair().unwrap();
    // No heartbeat yet (no sidecar on the primary): the replica's lag in seconds is the
    // server's own Seconds_Behind_Master, and it is ready. Before, it was never ready.
    let r = Serve::start(&mysql_env(&replica));
    r.wait_for(
        "the replica to be ready without a heartbeat",
        Duration::from_secs(10),
        |r| r.code("/readiness") == 200,
    );
    let status = r.json("/replica");
    assert_eq!(status["lag_seconds"].as_f64(), Some(0.0), "{status}");
    assert!(status["heartbeat_age_seconds"].is_null(), "{status}");
    let p = Serve::start(&mysql_env(&primary));
    p.wait_for("primary state", Duration::from_secs(10), |p| {
        p.code("/primary") == 200
    });
    r.wait_for("replica state", Duration::from_secs(10), |r| {
        r.code("/replica") == 200
    });
    assert_eq!(r.code("/primary"), 503);
    assert_eq!(p.code("/replica"), 503);
    assert_eq!(http_request(p.port, "OPTIONS", "/").unwrap().0, 200);
    assert_eq!(http_request(r.port, "OPTIONS", "/").unwrap().0, 503);
    assert_eq!(p.json("/")["engine"], "mysql");

    // The heartbeat replicates: lag in seconds is small on an idle primary.
    r.wait_for("a replicated heartbeat", Duration::from_secs(10), |r| {
        let s = r.json("/replica");
        s["heartbeat_age_seconds"].as_f64().is_some_and(|l| l < 2.0)
            && s["lag_seconds"].as_f64().is_some_and(|l| l < 2.0)
    });
    let canary = replica
        .sql(Some("dbagent"), "SELECT HEX(canary) FROM heartbeat")
        .unwrap();
    assert_eq!(
        canary,
        hex::encode_upper("dbagent 心跳 ハートビート 하트비트 🐘 χΨψΩω"),
        "the CJK canary replicated byte for byte"
    );
    // pt-heartbeat readers compute lag from ts and server_id.
    let ts = replica
        .sql(
            Some("dbagent"),
            "SELECT TIMESTAMPDIFF(SECOND, ts, UTC_TIMESTAMP()) < 5 FROM heartbeat",
        )
        .unwrap();
    assert_eq!(ts, "1");

    // A stopped SQL thread: not a healthy replica, and the heartbeat lag keeps growing.
    replica.sql(None, "STOP SLAVE SQL_THREAD").unwrap();
    r.wait_for("/replica to turn 503", Duration::from_secs(10), |r| {
        r.code("/replica") == 503
    });
    let reason = r.json("/replica")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("SQL thread"), "{reason}");
    let lag1 = r.json("/health")["lag_seconds"].as_f64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let lag2 = r.json("/health")["lag_seconds"].as_f64().unwrap();
    assert!(lag2 > lag1 + 1.5, "lag did not grow: {lag1} -> {lag2}");
    assert_eq!(r.metric("dbagent_wal_receiver_up"), Some(0.0));
    replica.sql(None, "START SLAVE SQL_THREAD").unwrap();
    r.wait_for("/replica to recover", Duration::from_secs(10), |r| {
        r.code("/replica?max_lag_seconds=2") == 200
    });

    // The primary goes away: the IO thread cannot connect, the replica says so.
    primary.stop().unwrap();
    r.wait_for(
        "/replica to turn 503 without a primary",
        Duration::from_secs(30),
        |r| r.code("/replica") == 503,
    );
    let reason = r.json("/replica")["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("IO thread"), "{reason}");
    p.wait_for(
        "the old primary's /health to turn 503",
        Duration::from_secs(10),
        |p| p.code("/health") == 503,
    );
    assert_eq!(p.code("/liveness"), 200);
}

#[test]
fn scheduled_backup_runs_inside_serve() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    let mut env = pg_env(&pg);
    env.extend(repo.env());
    env.push(("DBAGENT_SCHEDULE_BACKUP".into(), "* * * * *".into()));
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "2s".into()));
    env.push((
        "DBAGENT_PG_BIN_DIR".into(),
        pg_bin("pg_ctl")
            .unwrap()
            .parent()
            .unwrap()
            .display()
            .to_string(),
    ));
    let serve = Serve::start(&env);
    // A second serve whose jobs cannot be started: its binary is gone from the disk, so the
    // job's process (the same binary, by path) fails to spawn, as one does under the pod's
    // pid limit. Before, that ended serve (exit 2) instead of counting a failed run.
    let copy = tempfile::tempdir().unwrap();
    let gone = copy.path().join("dbagent");
    std::fs::copy(BIN, &gone).unwrap();
    let unspawnable = Serve::start_program(&gone, free_port(), &env);
    std::fs::remove_file(&gone).unwrap();
    // Exported from the start (0, or already 1 when serve started just before a minute).
    assert!(
        serve
            .metric_where("dbagent_job_running", "job", "backup")
            .is_some()
    );
    // A minute-granular schedule fires within 60 s; the backup itself takes a few seconds.
    serve.wait_for(
        "the scheduled backup to succeed",
        Duration::from_secs(100),
        |s| {
            s.metric_where("dbagent_job_runs_total", "result", "success")
                .unwrap_or(0.0)
                >= 1.0
        },
    );
    assert_eq!(
        serve.metric_where("dbagent_job_runs_total", "result", "failure"),
        Some(0.0)
    );
    unspawnable.wait_for(
        "the unspawnable job to count as failed",
        Duration::from_secs(30),
        |s| {
            s.metric_where("dbagent_job_runs_total", "result", "failure")
                .unwrap_or(0.0)
                >= 1.0
        },
    );
    assert_eq!(unspawnable.code("/liveness"), 200);
    drop(unspawnable);
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        json["postgres"][0]["backups"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    // The repository refresh then reports it.
    serve.wait_for("backup metrics", Duration::from_secs(10), |s| {
        s.metric("dbagent_backup_last_success_timestamp_seconds")
            .is_some()
    });
    assert!(serve.json("/")["last_backup_time"].is_string());
}

/// deploy/'s schedule: every pod's sidecar has the same configuration (`schedule.backup`,
/// `serve.schedule_on = primary`, `backup.full_every`, PGDATA), the primary's runs the backup
/// from its data directory (a full one, then an incremental), the standby's skips it.
#[test]
fn scheduled_backup_runs_on_the_primary_only_full_then_incremental() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    let (_standby_dir, standby) = standby_of(&pg);
    let bin_dir = pg_bin("pg_ctl")
        .unwrap()
        .parent()
        .unwrap()
        .display()
        .to_string();
    let env = |db: &Postgres| {
        // PGDATA stays: it is pg.data_dir, so the backup reads the files.
        let mut env = db.env();
        env.extend(repo.env());
        for (k, v) in [
            ("DBAGENT_SCHEDULE_BACKUP", "* * * * *"),
            ("DBAGENT_SERVE_SCHEDULE_ON", "primary"),
            ("DBAGENT_BACKUP_FULL_EVERY", "6d12h"),
            ("DBAGENT_PG_BIN_DIR", bin_dir.as_str()),
        ] {
            env.push((k.into(), v.into()));
        }
        env
    };
    let p = Serve::start(&env(&pg));
    let s = Serve::start(&env(&standby));
    s.wait_for(
        "the standby to know its role",
        Duration::from_secs(10),
        |s| s.metric_where("dbagent_role", "role", "replica") == Some(1.0),
    );
    let runs = |p: &Serve, result: &str| {
        p.metric_where("dbagent_job_runs_total", "result", result)
            .unwrap_or(0.0)
    };
    // Minute-granular: a run within about a minute.
    p.wait_for(
        "a scheduled backup on the primary",
        Duration::from_secs(100),
        |p| runs(p, "success") >= 1.0,
    );
    assert_eq!(runs(&p, "failure"), 0.0);
    // The database is down across the next scheduled minute and the one after: the run waits
    // for it until a second before the next, then counts as failed (the alert watches the
    // failures), and the next run is tried in its turn.
    let started = p.metric_where("dbagent_job_last_run_timestamp_seconds", "job", "backup");
    pg.stop().unwrap();
    p.wait_for(
        "the run the database was down for to count as failed",
        Duration::from_secs(130),
        |p| runs(p, "failure") >= 1.0,
    );
    assert_eq!(runs(&p, "success"), 1.0);
    assert_eq!(
        p.metric_where("dbagent_job_last_run_timestamp_seconds", "job", "backup"),
        started,
        "no backup process was started"
    );
    pg.restart().unwrap();
    p.wait_for(
        "the next scheduled backup once the database is back",
        Duration::from_secs(100),
        |p| runs(p, "success") >= 2.0,
    );
    assert_eq!(runs(&p, "failure"), 1.0);
    // The standby's schedule came due at the same minutes and never started a job (one would
    // fail there within a second: a standby without archive_mode = always cannot be backed up).
    assert_eq!(
        s.metric_where("dbagent_job_last_run_timestamp_seconds", "job", "backup"),
        None
    );
    assert_eq!(
        s.metric_where("dbagent_job_runs_total", "result", "failure")
            .unwrap_or(0.0),
        0.0
    );
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["list", "--json"]))).unwrap();
    let backups = listing["postgres"][0]["backups"].as_array().unwrap();
    let kinds: Vec<&str> = backups
        .iter()
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["full", "incremental"], "{listing}");
    assert_eq!(backups[1]["chain"], serde_json::json!([backups[0]["id"]]));
}

/// On a quiet server the active binlog would never close, so nothing would reach the archive:
/// serve rotates it once it is older than serve.binlog_max_age.
#[test]
fn serve_rotates_an_old_binlog_so_it_is_shipped() {
    let repo = Repo::file();
    let db = dbagent_testcontainers::MariaDbBuilder::new()
        .start()
        .unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.t (i int); INSERT INTO shop.t VALUES (1)",
    )
    .unwrap();
    let mut env = mysql_env(&db);
    env.extend(repo.env());
    env.push(("DBAGENT_BINLOG_INTERVAL".into(), "1s".into()));
    env.push(("DBAGENT_BINLOG_MAX_AGE".into(), "2s".into()));
    let serve = Serve::start(&env);
    // No FLUSH BINARY LOGS here: only the rotation by serve can close a file.
    serve.wait_for(
        "a rotated binlog to be shipped",
        Duration::from_secs(20),
        |s| s.metric("dbagent_binlog_shipped_total").unwrap_or(0.0) >= 1.0,
    );
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    assert!(listing.contains("binlog.000001"), "{listing}");
}

/// A heartbeat write the server holds (here behind a table lock; in the field behind a global
/// read lock or a hung disk) is a failure after the heartbeat period, counted and logged, and
/// a SIGTERM meanwhile stops serve at once. Before, the write waited silently for as long as
/// the lock was held, no failure counted, and stopping serve waited behind it.
#[test]
fn a_held_mysql_heartbeat_write_fails_in_time_and_does_not_hold_up_a_stop() {
    let db = dbagent_testcontainers::MariaDbBuilder::new()
        .start()
        .unwrap();
    let mut serve = Serve::start(&mysql_env(&db));
    serve.wait_for("heartbeat writes", Duration::from_secs(10), |s| {
        s.metric("dbagent_heartbeat_writes_total").unwrap_or(0.0) >= 1.0
    });
    let mut lock = Command::new(dbagent_testcontainers::mariadb_bin("mariadb").unwrap())
        .args([
            "--no-defaults",
            "-h",
            db.host(),
            "-P",
            &db.port().to_string(),
        ])
        .args(["-u", "root", "-e"])
        .arg("LOCK TABLES dbagent.heartbeat WRITE; SELECT SLEEP(30)")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    serve.wait_for(
        "a held heartbeat write to count as a failure",
        Duration::from_secs(10),
        |s| s.metric("dbagent_heartbeat_failures_total").unwrap_or(0.0) >= 1.0,
    );
    let stopping = Instant::now();
    let status = serve.terminate();
    let took = stopping.elapsed();
    let _ = lock.kill();
    let _ = lock.wait();
    assert!(status.success(), "serve exited with {status}");
    assert!(took < Duration::from_secs(5), "serve took {took:?} to stop");
}
