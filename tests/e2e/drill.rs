//! Restore drills against a real PostgreSQL source: a healthy repository passes; a missing or
//! corrupt WAL segment, a failing smoke query and a missing extension fail loudly with a
//! webhook; the scratch server is always gone afterwards, even after SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dbagent_testcontainers::{
    CjkParser, Postgres, PostgresBuilder, install_cjk_parser, pg_bin, pg_owned_tempdir,
};
use tempfile::TempDir;

use crate::serve::{Serve, pg_env};
use crate::support::*;

/// A local HTTP receiver standing in for Slack, PagerDuty and a Pushgateway.
struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<(String, String, String)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                seen.lock().unwrap().push((
                    method,
                    path,
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Receiver { port, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn take(&self) -> Vec<(String, String, String)> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

/// A SQL-only extension installed into PostgreSQL's extension directory for the test, so a
/// drill can be run on a server that "lacks" it once the files are removed.
struct TestExtension {
    name: String,
    files: Vec<PathBuf>,
}

impl TestExtension {
    fn install() -> TestExtension {
        let name = format!("dbagent_drill_ext_{}", std::process::id());
        let out = std::process::Command::new(pg_bin("pg_config").unwrap())
            .arg("--sharedir")
            .output();
        let share = match out {
            Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
            _ => PathBuf::from("/usr/share/postgresql/15"),
        };
        let dir = share.join("extension");
        let control = dir.join(format!("{name}.control"));
        let sql = dir.join(format!("{name}--1.0.sql"));
        std::fs::write(
            &control,
            "comment = 'dbagent drill test'\ndefault_version = '1.0'\nrelocatable = true\n",
        )
        .unwrap();
        std::fs::write(
            &sql,
            format!("CREATE FUNCTION {name}_fn() RETURNS int LANGUAGE sql AS 'SELECT 1';\n"),
        )
        .unwrap();
        TestExtension {
            name,
            files: vec![control, sql],
        }
    }

    fn remove_files(&self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Drop for TestExtension {
    fn drop(&mut self) {
        self.remove_files();
    }
}

struct Source {
    repo: Repo,
    pg: Postgres,
    serve: Serve,
    sysid: String,
}

/// A primary archiving into a file repository, with `serve` writing the heartbeat, a
/// `discourse` database with CJK rows, pg_trgm and a database-level text search setting, and
/// a full base backup, an incremental one on it (drills follow the chain), and more WAL.
fn source(extension: Option<&TestExtension>) -> Source {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    let mut env = pg_env(&pg);
    env.extend(repo.env());
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "1s".into()));
    let serve = Serve::start(&env);
    // The site's layout: discourse searches with pg_cjk_parser, logto never had it. The
    // parser is the site's own where this machine has one, else the stand-in (see
    // testcontainers/ext); the drill's parser checks run against whichever it is.
    let parser = install_cjk_parser().unwrap();
    let comment = pg
        .psql(
            "postgres",
            "SELECT comment FROM pg_available_extensions WHERE name = 'pg_cjk_parser'",
        )
        .unwrap();
    assert_eq!(
        comment.starts_with("dbagent test stand-in"),
        parser == CjkParser::StandIn,
        "install_cjk_parser said {parser:?}, the server offers {comment:?}"
    );
    eprintln!("pg_cjk_parser under test: {parser:?} ({comment})");
    pg.psql("postgres", "CREATE DATABASE discourse").unwrap();
    pg.psql("postgres", "CREATE DATABASE logto").unwrap();
    pg.psql(
        "logto",
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         INSERT INTO users SELECT g, '野比大雄 ' || g FROM generate_series(1, 50) g;
         CREATE UNLOGGED TABLE sessions (id int PRIMARY KEY, token text);
         INSERT INTO sessions SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
         ANALYZE sessions;",
    )
    .unwrap();
    pg.psql("discourse", "CREATE EXTENSION pg_cjk_parser")
        .unwrap();
    pg.psql(
        "postgres",
        "ALTER DATABASE discourse SET default_text_search_config = 'public.config_2_gram_cjk'",
    )
    .unwrap();
    pg.psql(
        "discourse",
        "CREATE EXTENSION pg_trgm;
         CREATE TABLE posts (id int PRIMARY KEY, body text);
         INSERT INTO posts SELECT g, 'ドラえもん のび太 野比大雄 대한민국 🐘 #' || g FROM generate_series(1, 5000) g;
         ANALYZE posts;",
    )
    .unwrap();
    if let Some(ext) = extension {
        pg.psql("discourse", &format!("CREATE EXTENSION {}", ext.name))
            .unwrap();
    }
    serve.wait_for("heartbeats", Duration::from_secs(10), |s| {
        s.metric("dbagent_heartbeat_writes_total").unwrap_or(0.0) >= 2.0
    });
    ok(&dbagent(&repo, Some(&pg), &["backup", "--full"]));
    pg.psql(
        "discourse",
        "UPDATE posts SET body = body || ' 改' WHERE id <= 50",
    )
    .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let inc = ok(&dbagent(&repo, Some(&pg), &["backup", "--incremental"]));
    assert!(inc.starts_with("incremental backup"), "{inc}");
    pg.psql(
        "discourse",
        "INSERT INTO posts SELECT g, 'after the backup 後' FROM generate_series(5001, 5100) g",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    switch_and_wait_archived(&pg);
    let sysid = pg
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    Source {
        repo,
        pg,
        serve,
        sysid,
    }
}

fn drill(
    src: &Source,
    scratch: &Path,
    receiver: &Receiver,
    extra: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let mut cmd = dbagent_cmd(&src.repo, None, args);
    cmd.env("DBAGENT_DRILL_SCRATCH_DIR", scratch)
        .env("DBAGENT_NOTIFY_SLACK_URL", receiver.url("/slack"))
        .env("DBAGENT_NOTIFY_PAGERDUTY_ROUTING_KEY", "test-routing-key")
        .env("DBAGENT_NOTIFY_PAGERDUTY_URL", receiver.url("/pagerduty"))
        .env(
            "DBAGENT_DRILL_PUSHGATEWAY_URL",
            receiver.url("/pushgateway"),
        );
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn assert_scratch_gone(scratch: &Path) {
    let left: Vec<_> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "the drill left files behind: {left:?}");
    let procs = std::process::Command::new("pgrep")
        .args(["-f", &scratch.display().to_string()])
        .output()
        .unwrap();
    assert!(
        procs.stdout.is_empty(),
        "a scratch server is still running: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}

fn report_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}"))
}

fn find<'a>(report: &'a serde_json::Value, name: &str, db: Option<&str>) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"].as_str().is_some_and(|n| n.contains(name))
                && db.is_none_or(|d| c["database"] == d)
        })
        .unwrap_or_else(|| panic!("no check {name:?} [{db:?}] in {report:#}"))
}

#[test]
fn drill_passes_on_a_healthy_repository() {
    let src = source(None);
    let receiver = Receiver::start();
    let scratch = pg_owned_tempdir().unwrap();
    let out = drill(
        &src,
        scratch.path(),
        &receiver,
        &[("DBAGENT_NOTIFY_ON_SUCCESS", "true")],
        &["drill", "--json"],
    );
    let stdout = ok(&out);
    let report = report_json(&stdout);
    assert_eq!(report["result"], "pass", "{report:#}");
    assert_eq!(find(&report, "restore", None)["status"], "pass");
    assert_eq!(
        find(&report, "heartbeat landed at the target", Some("postgres"))["status"],
        "pass"
    );
    assert_eq!(
        find(&report, "heartbeat CJK canary", Some("postgres"))["status"],
        "pass"
    );
    assert_eq!(
        find(&report, "row counts", Some("discourse"))["status"],
        "pass"
    );
    // An unlogged table with rows at the backup is empty after any recovery: not a failure.
    let rows = find(&report, "row counts", Some("logto"));
    assert_eq!(rows["status"], "pass", "{rows}");
    assert!(
        rows["detail"]
            .as_str()
            .unwrap()
            .contains("1 unlogged table(s) not compared"),
        "{rows}"
    );
    assert_eq!(
        find(&report, "CJK trigram similarity", Some("discourse"))["status"],
        "pass"
    );
    let settings = find(&report, "database settings", Some("discourse"));
    assert_eq!(settings["status"], "pass");
    assert!(
        settings["detail"]
            .as_str()
            .unwrap()
            .contains("default_text_search_config=public.config_2_gram_cjk")
    );
    // Where the source had pg_cjk_parser, its checks run and pass ...
    for check in [
        "the pg_cjk_parser text search parser exists",
        "the config_2_gram_cjk configuration exists",
        "のび太",
        "野比大雄",
        "大韩민국개인정보",
    ] {
        assert_eq!(
            find(&report, check, Some("discourse"))["status"],
            "pass",
            "{check}"
        );
    }
    // ... where it never had it, they are skipped, and say why.
    let parser = find(&report, "のび太", Some("logto"));
    assert_eq!(parser["status"], "skip");
    assert!(
        parser["detail"]
            .as_str()
            .unwrap()
            .contains("pg_cjk_parser is not installed"),
        "{parser}"
    );
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);

    // The report is in the repository.
    let drills = src
        .repo
        .root()
        .unwrap()
        .join(format!("pg/{}/drills", src.sysid));
    let stored: Vec<_> = std::fs::read_dir(&drills).unwrap().collect();
    assert_eq!(stored.len(), 1);
    // Slack got the success (on_success), PagerDuty a resolve, the Pushgateway the metrics.
    let got = receiver.take();
    assert!(
        got.iter()
            .any(|(m, p, b)| m == "POST" && p == "/slack" && b.contains("drill passed")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|(_, p, b)| p == "/pagerduty" && b.contains("\"resolve\"")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|(m, p, b)| m == "PUT"
            && p.starts_with("/pushgateway/metrics/job/dbagent_drill")
            && b.contains("dbagent_drill_last_result 1")),
        "{got:?}"
    );
    assert_scratch_gone(scratch.path());
    // serve exports the drill's outcome.
    src.serve
        .wait_for("drill metrics", Duration::from_secs(10), |s| {
            s.metric("dbagent_drill_last_result") == Some(1.0)
        });
    assert!(
        src.serve
            .metric("dbagent_drill_last_success_timestamp_seconds")
            .is_some()
    );

    // A random point inside the window also restores and passes.
    let out = drill(&src, scratch.path(), &receiver, &[], &["drill", "--random"]);
    let stdout = ok(&out);
    assert!(stdout.contains("PASSED"), "{stdout}");
    assert_scratch_gone(scratch.path());
}

/// Runs a drill that must fail: exit 2, one line on stderr, the reason in the report, a
/// failure webhook, and no scratch server left.
fn failing_drill(
    src: &Source,
    receiver: &Receiver,
    extra: &[(&str, &str)],
    needle: &str,
) -> serde_json::Value {
    let scratch = pg_owned_tempdir().unwrap();
    let out = drill(src, scratch.path(), receiver, extra, &["drill", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("dbagent: error: restore drill failed")),
        "{stderr}"
    );
    let report = report_json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["result"], "fail");
    let failed: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| format!("{}: {}", c["name"], c["detail"]))
        .collect();
    assert!(
        failed.iter().any(|f| f.contains(needle)),
        "expected a failure mentioning {needle:?}: {failed:#?}"
    );
    let got = receiver.take();
    assert!(
        got.iter().any(|(m, p, b)| m == "POST"
            && p == "/slack"
            && b.contains("FAILED")
            && b.contains(needle)),
        "no failure webhook mentioning {needle:?}: {got:?}"
    );
    assert!(
        got.iter()
            .any(|(_, p, b)| p == "/pagerduty" && b.contains("\"trigger\"")),
        "{got:?}"
    );
    assert_scratch_gone(scratch.path());
    report
}

#[test]
fn drill_fails_loudly() {
    let ext = TestExtension::install();
    let src = source(Some(&ext));
    let receiver = Receiver::start();

    // A smoke query that fails.
    let suites = TempDir::new().unwrap();
    let suite = suites.path().join("site.sql");
    std::fs::write(
        &suite,
        "-- check: posts are never empty\nSELECT count(*) = 0 FROM pg_database;\n\
         -- database: forum\n-- check: forum answers\nSELECT true;\n",
    )
    .unwrap();
    std::fs::set_permissions(
        suites.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&suite, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = suites.path().join("dbagent.toml");
    std::fs::write(
        &config,
        format!(
            "[drill]\nextra_suites = [{:?}]\n",
            suite.display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let report = failing_drill(
        &src,
        &receiver,
        &[("DBAGENT_CONFIG", config.to_str().unwrap())],
        "posts are never empty",
    );
    // A check written for a database the restore lacks fails, rather than never running.
    let forum = find(&report, "forum answers", Some("forum"));
    assert_eq!(forum["status"], "fail", "{forum}");
    assert!(
        forum["detail"]
            .as_str()
            .unwrap()
            .contains("has no database forum"),
        "{forum}"
    );

    // The restored database lacks an extension the source had.
    ext.remove_files();
    failing_drill(&src, &receiver, &[], &ext.name);

    // A damaged byte in the incremental backup's bundle: the drill fails naming that backup.
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&src.repo, None, &["list", "--json"]))).unwrap();
    let newest = listing["postgres"][0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "incremental")
        .expect("the incremental backup")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let data = src
        .repo
        .root()
        .unwrap()
        .join(format!("pg/{}/backups/{newest}/data", src.sysid));
    let bundle = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bundle"))
        .unwrap();
    let original = std::fs::read(&bundle).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5A;
    std::fs::write(&bundle, &bad).unwrap();
    failing_drill(&src, &receiver, &[], &newest);
    std::fs::write(&bundle, &original).unwrap();

    // An archived segment's bytes are corrupted: the restore stops, with the reason.
    let wal = src
        .repo
        .root()
        .unwrap()
        .join(format!("pg/{}/wal", src.sysid));
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 28)
        .collect();
    segs.sort();
    let last = segs.last().unwrap().clone();
    let original = std::fs::read(&last).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xA5;
    std::fs::write(&last, &bad).unwrap();
    failing_drill(&src, &receiver, &[], "corrupt");
    std::fs::write(&last, &original).unwrap();

    // A segment in the needed range is deleted: the plan refuses.
    let victim = segs[segs.len() - 2].clone();
    let name = victim.file_name().unwrap().to_string_lossy()[..24].to_string();
    std::fs::remove_file(&victim).unwrap();
    failing_drill(&src, &receiver, &[], &name);

    // A table loaded and backed up before its first ANALYZE is still compared: the drill
    // compares with the backup's estimates, so rows removed after the backup stand in for
    // rows a restore lost. A database created after the backup gets the suites, and says
    // that its rows were not compared.
    src.pg
        .psql(
            "logto",
            "CREATE TABLE audit (id int, what text);
             INSERT INTO audit SELECT g, 'ログイン ' || g FROM generate_series(1, 5000) g;",
        )
        .unwrap();
    ok(&dbagent(&src.repo, Some(&src.pg), &["backup", "--full"]));
    src.pg.psql("logto", "TRUNCATE audit").unwrap();
    src.pg.psql("postgres", "CREATE DATABASE late").unwrap();
    switch_and_wait_archived(&src.pg);
    let report = failing_drill(
        &src,
        &receiver,
        &[],
        "public.audit is empty, but the source had about 5000 rows",
    );
    let late = find(&report, "row counts", Some("late"));
    assert_eq!(late["status"], "skip", "{late}");
    assert!(
        late["detail"]
            .as_str()
            .unwrap()
            .contains("does not describe this database"),
        "{late}"
    );
    assert_eq!(
        find(&report, "UTF8", Some("late"))["status"],
        "pass",
        "{report:#}"
    );
    drop(src.pg);
}

/// A config whose extra suite keeps a drill busy (`pg_sleep(60)`) once its scratch server is
/// up; readable by the postgres OS user.
fn slow_suite() -> (TempDir, PathBuf) {
    let suites = TempDir::new().unwrap();
    let suite = suites.path().join("slow.sql");
    std::fs::write(
        &suite,
        // Not `pg_sleep(60) IS NULL OR true`, which the planner folds to `true` unslept.
        "-- check: slow\nSELECT count(*) = 1 FROM (SELECT pg_sleep(60)) AS s;\n",
    )
    .unwrap();
    let config = suites.path().join("dbagent.toml");
    std::fs::write(
        &config,
        format!(
            "[drill]\nextra_suites = [{:?}]\n",
            suite.display().to_string()
        ),
    )
    .unwrap();
    for p in [suites.path(), &suite, &config] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    (suites, config)
}

/// Waits until a scratch server under `scratch` runs the slow check.
fn wait_for_slow_check(scratch: &Path, child: &mut std::process::Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let busy = std::process::Command::new("pgrep")
            .args(["-f", "pg_sleep|postgres: postgres postgres"])
            .output()
            .unwrap();
        let running = std::fs::read_dir(scratch)
            .unwrap()
            .flatten()
            .any(|d| d.path().join("data/postmaster.pid").exists());
        if running && !busy.stdout.is_empty() {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process ended before the drill could be interrupted"
        );
        assert!(
            Instant::now() < deadline,
            "the scratch server never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `serve` told to stop while its scheduled drill runs: the drill gets SIGTERM and its grace
/// period, so it tears its scratch server down; nothing is left running.
#[test]
fn serve_stopping_lets_a_scheduled_drill_tear_down() {
    let src = source(None);
    let scratch = pg_owned_tempdir().unwrap();
    let (_suites, config) = slow_suite();
    let port = dbagent_testcontainers::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = dbagent_cmd(&src.repo, Some(&src.pg), &["serve", "--listen", &listen]);
    cmd.env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
        .env("DBAGENT_CONFIG", &config)
        .env("DBAGENT_SCHEDULE_DRILL", "* * * * *")
        .env("DBAGENT_SERVE_HEARTBEAT", "false")
        .env("DBAGENT_SERVE_WAL_LOOKAHEAD", "false")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // A minute-granular schedule fires within 60 s.
    wait_for_slow_check(scratch.path(), &mut child, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .unwrap_or_default();
    let serve_pid = children
        .split_whitespace()
        .next()
        .map(str::to_string)
        .unwrap_or(child.id().to_string());
    let stopping = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &serve_pid])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!("serve stopped in {:?} ({status})", stopping.elapsed());
    assert!(
        stderr.contains("drill interrupted by SIGTERM"),
        "the drill was not told to stop: {stderr}"
    );
    assert_scratch_gone(scratch.path());
}

/// A restored heartbeat table that cannot be read is a failed check, not a source that never
/// ran `serve` (a skip): a drill whose restored database fails a query must not pass.
#[test]
fn an_unreadable_heartbeat_fails_the_drill() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    // Stands in for a damaged table: every read of it fails.
    pg.psql(
        "postgres",
        "CREATE SCHEMA dbagent;
         CREATE FUNCTION dbagent.broken() RETURNS timestamptz LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'could not read block 0'; END $$;
         CREATE VIEW dbagent.heartbeat AS SELECT dbagent.broken() AS ts, 'x'::text AS canary",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    switch_and_wait_archived(&pg);
    let scratch = pg_owned_tempdir().unwrap();
    let out = dbagent_cmd(&repo, None, &["drill", "--json"])
        .env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let heartbeat = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "heartbeat")
        .cloned()
        .unwrap_or_default();
    assert_eq!(heartbeat["status"], "fail", "{report}");
    assert!(
        heartbeat["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("could not read block 0"),
        "{report}"
    );
}

/// SIGTERM the dbagent process itself (runuser's child, when run as the postgres user).
fn terminate_dbagent(child: &std::process::Child) {
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .unwrap_or_default();
    let target = children
        .split_whitespace()
        .next()
        .map(str::to_string)
        .unwrap_or(child.id().to_string());
    std::process::Command::new("kill")
        .args(["-TERM", &target])
        .status()
        .unwrap();
}

/// The backed-up cluster subscribes to a publisher, and is gone (a lost node): its slot on the
/// publisher waits for it. A copy restored without `--as-primary`, and the drill's scratch
/// server, carry the enabled subscription; were their apply workers to start, they would take
/// the slot and confirm changes the real subscriber then never gets.
#[test]
fn copies_and_drills_leave_a_publisher_s_slot_alone() {
    let publisher = PostgresBuilder::new()
        .setting("wal_level", "logical")
        .start()
        .expect("start the publisher");
    publisher
        .psql(
            "postgres",
            "CREATE TABLE feed (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE feed; INSERT INTO feed VALUES (1)",
        )
        .unwrap();
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE feed (id int PRIMARY KEY)")
        .unwrap();
    pg.psql(
        "postgres",
        &format!(
            "CREATE SUBSCRIPTION sub CONNECTION 'host={} port={} user=postgres dbname=postgres' PUBLICATION pub",
            publisher.host(),
            publisher.port()
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("postgres", "SELECT count(*) FROM feed").unwrap() != "1" {
        assert!(Instant::now() < deadline, "the subscription never synced");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    switch_and_wait_archived(&pg);
    pg.stop().unwrap();
    publisher
        .psql("postgres", "INSERT INTO feed VALUES (2)")
        .unwrap();
    let slot = || {
        publisher
            .psql(
                "postgres",
                "SELECT active::text || ' ' || confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'sub'",
            )
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while slot().starts_with("true") {
        assert!(Instant::now() < deadline, "the slot stayed active");
        std::thread::sleep(Duration::from_millis(200));
    }
    let idle = slot();
    // Apply workers start at promotion, and again every wal_retrieve_retry_interval (5 s).
    let watch = |what: &str| {
        for _ in 0..40 {
            assert_eq!(slot(), idle, "{what} took the publisher's slot");
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let scratch = pg_owned_tempdir().unwrap();
    let (out, copy) = restore(&repo, &scratch.path().join("copy"), &["--latest"]);
    ok(&out);
    watch("the restored copy");
    assert_eq!(copy.psql("SELECT count(*) FROM feed"), "1");
    drop(copy);

    let drills = pg_owned_tempdir().unwrap();
    let (_suites, config) = slow_suite();
    let mut cmd = dbagent_cmd(&repo, None, &["drill"]);
    cmd.env("DBAGENT_DRILL_SCRATCH_DIR", drills.path())
        .env("DBAGENT_CONFIG", &config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    wait_for_slow_check(drills.path(), &mut child, Duration::from_secs(90));
    watch("the drill's scratch server");
    terminate_dbagent(&child);
    let _ = child.wait();
    assert_scratch_gone(drills.path());
    assert_eq!(slot(), idle);
}

#[test]
fn interrupted_drill_leaves_nothing_behind() {
    let src = source(None);
    let receiver = Receiver::start();
    let scratch = pg_owned_tempdir().unwrap();
    let (_suites, config) = slow_suite();
    let mut cmd = dbagent_cmd(&src.repo, None, &["drill"]);
    cmd.env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
        .env("DBAGENT_CONFIG", &config)
        .env("DBAGENT_NOTIFY_SLACK_URL", receiver.url("/slack"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    wait_for_slow_check(scratch.path(), &mut child, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    terminate_dbagent(&child);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_scratch_gone(scratch.path());
}

/// MariaDB: `serve` writes the heartbeat and ships binlogs, a dump is taken, writes go on
/// across rotations; the drill restores into a scratch server and passes; with a binlog
/// missing in the middle it fails loudly.
#[test]
fn mysql_drill_passes_and_fails_on_a_missing_binlog() {
    let repo = Repo::file();
    let source = dbagent_testcontainers::MariaDbBuilder::new()
        .start()
        .unwrap();
    let mut env = repo.env();
    env.push(("DBAGENT_MYSQL_URL".into(), source.url()));
    env.push(("DBAGENT_ENGINE".into(), "mysql".into()));
    env.push(("DBAGENT_BINLOG_INTERVAL".into(), "1s".into()));
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "1s".into()));
    let serve = Serve::start(&env);
    source
        .sql(
            None,
            "SET NAMES utf8mb4; CREATE DATABASE shop;
             CREATE TABLE shop.posts (id int PRIMARY KEY, body text) DEFAULT CHARSET = utf8mb4;
             INSERT INTO shop.posts SELECT seq, CONCAT('ドラえもん 野比大雄 대한민국 🐘 ', seq) FROM shop.seq_1_to_500;",
        )
        .unwrap();
    serve.wait_for("heartbeats", Duration::from_secs(10), |s| {
        s.metric("dbagent_heartbeat_writes_total").unwrap_or(0.0) >= 2.0
    });
    let run = |args: &[&str], extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args)
            .env("DBAGENT_LOG_FORMAT", "text")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    ok(&run(&["backup", "--engine", "mysql"], &[]));
    for i in 0..3 {
        source
            .sql(None, &format!("INSERT INTO shop.posts VALUES ({}, 'after the dump 後 {i}'); FLUSH BINARY LOGS;", 1000 + i))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    serve.wait_for("binlogs shipped", Duration::from_secs(20), |s| {
        s.metric("dbagent_binlog_shipped_total").unwrap_or(0.0) >= 3.0
    });

    let receiver = Receiver::start();
    let scratch = pg_owned_tempdir().unwrap();
    let drill_env = [
        (
            "DBAGENT_DRILL_SCRATCH_DIR",
            scratch.path().to_str().unwrap(),
        ),
        ("DBAGENT_NOTIFY_SLACK_URL", &receiver.url("/slack")),
    ];
    let out = run(&["drill", "--engine", "mysql", "--json"], &drill_env);
    let report = report_json(&ok(&out));
    assert_eq!(report["result"], "pass", "{report:#}");
    assert_eq!(
        find(&report, "row counts (dump)", Some("shop"))["status"],
        "pass"
    );
    assert_eq!(
        find(&report, "heartbeat landed at the target", None)["status"],
        "pass"
    );
    assert_eq!(
        find(&report, "heartbeat CJK canary", None)["status"],
        "pass"
    );
    assert_eq!(
        find(&report, "CJK and emoji text round-trips", None)["status"],
        "pass"
    );
    let fulltext = find(&report, "FULLTEXT", None);
    assert_eq!(fulltext["status"], "skip");
    assert!(fulltext["detail"].as_str().unwrap().contains("MariaDB"));
    assert_scratch_gone(scratch.path());
    // serve exports the dump, the restorable window and the drill's outcome for MySQL too.
    serve.wait_for("MySQL repository metrics", Duration::from_secs(15), |s| {
        s.metric("dbagent_drill_last_result") == Some(1.0)
            && s.metric("dbagent_backup_last_success_timestamp_seconds")
                .is_some()
            && s.metric("dbagent_restorable_window_end_timestamp_seconds")
                .is_some()
    });
    let server_dir = std::fs::read_dir(repo.root().unwrap().join("mysql"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_dir(server_dir.join("drills"))
            .unwrap()
            .count(),
        1
    );

    // A binlog in the middle of the chain is lost: the drill fails, says which, and alerts.
    let mut binlogs: Vec<PathBuf> = std::fs::read_dir(server_dir.join("binlog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "zst"))
        .collect();
    binlogs.sort();
    let victim = binlogs[binlogs.len() - 2].clone();
    let name = victim.file_stem().unwrap().to_string_lossy().into_owned();
    std::fs::remove_file(&victim).unwrap();
    std::fs::remove_file(victim.with_extension("json")).unwrap();
    let out = run(&["drill", "--engine", "mysql", "--json"], &drill_env);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = report_json(&String::from_utf8_lossy(&out.stdout));
    let plan = find(&report, "plan", None);
    assert_eq!(plan["status"], "fail");
    assert!(plan["detail"].as_str().unwrap().contains(&name), "{plan}");
    let got = receiver.take();
    assert!(
        got.iter()
            .any(|(_, p, b)| p == "/slack" && b.contains("FAILED") && b.contains(&name)),
        "{got:?}"
    );
    assert_scratch_gone(scratch.path());
}

/// MariaDB: a binlog replay that takes long (a statement-logged `SLEEP`) is cut off by
/// `drill.timeout` and by SIGTERM like any other part of the drill: the drill fails saying so,
/// within moments, and its scratch server and files are gone.
#[test]
fn mysql_binlog_replay_honours_the_drill_timeout_and_sigterm() {
    let repo = Repo::file();
    let source = dbagent_testcontainers::MariaDbBuilder::new()
        .start()
        .unwrap();
    let mut env = repo.env();
    env.push(("DBAGENT_MYSQL_URL".into(), source.url()));
    let cmd = |args: &[&str], extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args)
            .env("DBAGENT_LOG_FORMAT", "text")
            .env_remove("DBAGENT_CONFIG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    };
    source
        .sql(
            None,
            "CREATE DATABASE shop; CREATE TABLE shop.t (id int PRIMARY KEY); INSERT INTO shop.t VALUES (1);",
        )
        .unwrap();
    ok(&cmd(&["backup", "--engine", "mysql"], &[]).output().unwrap());
    // Logged as a statement, the SLEEP runs again on replay.
    source
        .sql(
            None,
            "SET SESSION binlog_format = 'STATEMENT';
             INSERT INTO shop.t SELECT 2 FROM DUAL WHERE SLEEP(40) = 0;
             FLUSH BINARY LOGS;",
        )
        .unwrap();
    ok(&cmd(&["binlog-push"], &[]).output().unwrap());

    let scratch = pg_owned_tempdir().unwrap();
    let scratch_env = (
        "DBAGENT_DRILL_SCRATCH_DIR",
        scratch.path().to_str().unwrap(),
    );
    let (out, took) = run_within(
        cmd(
            &["drill", "--engine", "mysql"],
            &[scratch_env, ("DBAGENT_DRILL_TIMEOUT", "12s")],
        ),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("drill timed out during the replay after {took:?}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    // A failed drill, reported as one (stdout), and published.
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("did not finish within 12s"),
        "{report}{err}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_scratch_gone(scratch.path());

    let mut child = cmd(&["drill", "--engine", "mysql"], &[scratch_env])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the binlogs are downloaded into the scratch directory; the replay (40 s of
    // SLEEP) follows at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let downloaded = || {
        walk(scratch.path())
            .iter()
            .any(|p| p.to_string_lossy().contains("dbagent-binlogs/binlog."))
    };
    while !downloaded() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the drill ended early ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "the replay never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let stopping = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let took = stopping.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("interrupted by SIGTERM"), "{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    eprintln!("drill stopped by SIGTERM during the replay in {took:?}");
    assert_scratch_gone(scratch.path());
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
