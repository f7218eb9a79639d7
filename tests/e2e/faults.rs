//! Faults on the worst day: S3 answering 5xx and 403, dropping and stalling connections (a
//! fault-injecting proxy in front of moto), processes killed mid-stream, PostgreSQL crashing
//! during a backup, a full disk under a restore, and pushes racing for one name. Each test
//! asserts what an operator would check: the documented exit code, nothing half-visible, and
//! no data lost. Timeouts are shortened through the configuration so the suite stays quick.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dbagent_testcontainers::{
    Fault, FaultProxy, Fill, Postgres, PostgresBuilder, Rule, S3Server, command_as_pg_user,
    free_port, http_request, pg_bin, pg_owned_tempdir, wal_segment,
};

use crate::support::*;

const SYSID: u64 = 7_100_000_000_000_000_001;

/// moto behind the fault proxy.
struct FaultyS3 {
    server: S3Server,
    proxy: FaultProxy,
    prefix: String,
}

impl FaultyS3 {
    fn start(prefix: &str) -> FaultyS3 {
        let server = S3Server::start("dbagent-faults").expect("S3 server");
        let proxy = FaultProxy::start(server.port()).expect("fault proxy");
        FaultyS3 {
            server,
            proxy,
            prefix: prefix.into(),
        }
    }

    /// dbagent's environment through the proxy, with short retry windows.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.proxy.s3_env(&self.server, &self.prefix);
        env.extend(short_timeouts());
        env
    }

    /// Straight to moto: for checks that must not meet the faults.
    fn direct(&self) -> Vec<(String, String)> {
        self.server.env(&self.prefix)
    }

    /// Multipart uploads moto still holds (none is visible to listings).
    fn pending_uploads(&self) -> usize {
        let (_, body) = http_request(
            self.server.port(),
            "GET",
            &format!("/{}?uploads", self.server.bucket()),
        )
        .unwrap();
        body.matches("<Upload>").count()
    }

    /// Waits until the proxy has injected a fault on a request whose target contains `text`.
    fn wait_injected(&self, text: &str, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self
                .proxy
                .seen()
                .iter()
                .any(|s| s.target.contains(text) && s.outcome.starts_with("injected"))
            {
                return;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "the process ended before the fault on {text}"
            );
            assert!(Instant::now() < deadline, "no request for {text} came");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn short_timeouts() -> Vec<(String, String)> {
    [
        ("DBAGENT_WAL_FETCH_RETRY_TIMEOUT", "4s"),
        ("DBAGENT_S3_RETRY_TIMEOUT", "3s"),
        ("DBAGENT_UPLOAD_PART_SIZE", "5MiB"),
        ("DBAGENT_LOG_FORMAT", "text"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// dbagent as the postgres OS user (as PostgreSQL and the restore run it).
fn pg_cmd(env: &[(String, String)], pg: Option<&Postgres>, args: &[&str]) -> Command {
    let mut cmd = command_as_pg_user(BIN);
    cmd.args(args)
        .env_remove("DBAGENT_CONFIG")
        .current_dir("/tmp");
    cmd.env(
        "DBAGENT_PG_BIN_DIR",
        dbagent_testcontainers::pg_bin_dir().as_os_str(),
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(pg) = pg {
        for (k, v) in pg.env() {
            cmd.env(k, v);
        }
    }
    cmd
}

fn pg_run(env: &[(String, String)], pg: Option<&Postgres>, args: &[&str]) -> Output {
    pg_cmd(env, pg, args).output().unwrap()
}

fn pg_spawn(env: &[(String, String)], pg: Option<&Postgres>, args: &[&str]) -> Child {
    pg_cmd(env, pg, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `wal-push`/`wal-fetch` on files in `data` (its `pg_wal/`), without a server.
fn wal_cmd(env: &[(String, String)], data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(data)
        .env_remove("DBAGENT_CONFIG")
        .env("PGDATA", data)
        .env("DBAGENT_PG_SYSTEM_IDENTIFIER", SYSID.to_string())
        .env("DBAGENT_WAL_PREFETCH", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn wal_run(env: &[(String, String)], data: &Path, args: &[&str]) -> Output {
    wal_cmd(env, data, args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A directory holding one segment file per name, for pushes without a server.
fn wal_dir() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("pg_wal")).unwrap();
    data
}

fn seg_name(n: u32) -> String {
    format!("0000000100000000{n:08X}")
}

#[test]
fn wal_push_and_fetch_ride_out_5xx_resets_and_stalls() {
    let s3 = FaultyS3::start("transient");
    let env = s3.env();
    let data = wal_dir();
    // A small segment (one PUT) and an incompressible one (a multipart upload of 4 parts).
    let small = (
        seg_name(1),
        wal_segment(&seg_name(1), SYSID, Fill::Pattern(3)),
    );
    let large = (
        seg_name(2),
        wal_segment(&seg_name(2), SYSID, Fill::Random(99)),
    );
    let p = &s3.proxy;
    let push_rules = [
        p.inject(Rule::new(Fault::Status(503)).method("HEAD").times(1)),
        p.inject(
            Rule::new(Fault::Status(503))
                .method("PUT")
                .target(&format!("{}.zst", small.0))
                .times(2),
        ),
        p.inject(
            Rule::new(Fault::Status(500))
                .method("POST")
                .target("?uploads")
                .times(1),
        ),
        p.inject(Rule::new(Fault::Reset).target("partNumber=2").times(1)),
        p.inject(
            Rule::new(Fault::Stall(Duration::from_secs(2)))
                .target("partNumber=3")
                .times(1),
        ),
        p.inject(
            Rule::new(Fault::Status(503))
                .method("POST")
                .target("uploadId=")
                .times(1),
        ),
    ];
    for (name, bytes) in [&small, &large] {
        std::fs::write(data.path().join("pg_wal").join(name), bytes).unwrap();
        let out = wal_run(&env, data.path(), &["wal-push", &format!("pg_wal/{name}")]);
        assert!(out.status.success(), "wal-push {name}: {}", stderr(&out));
    }
    for rule in push_rules {
        assert!(p.fired(rule) >= 1, "a push fault never fired");
    }
    let pushed_faults = p.injected();
    assert_eq!(s3.pending_uploads(), 0, "an upload was left behind");

    let fetch_rules = [
        p.inject(
            Rule::new(Fault::Status(503))
                .method("GET")
                .target("/wal/")
                .times(2),
        ),
        p.inject(
            Rule::new(Fault::ResetMidBody { after: 300_000 })
                .method("GET")
                .target("/wal/")
                .times(2),
        ),
        // Longer than a third of the 4 s retry window: the stalled download is given up.
        p.inject(
            Rule::new(Fault::StallMidBody {
                after: 100_000,
                pause: Duration::from_secs(3),
            })
            .method("GET")
            .target("/wal/")
            .times(1),
        ),
    ];
    for (name, bytes) in [&small, &large] {
        let dest = format!("pg_wal/RESTORED-{name}");
        let out = wal_run(&env, data.path(), &["wal-fetch", name, &dest]);
        assert!(out.status.success(), "wal-fetch {name}: {}", stderr(&out));
        assert!(
            std::fs::read(data.path().join(&dest)).unwrap() == *bytes,
            "{name} came back different"
        );
    }
    for rule in fetch_rules {
        assert!(p.fired(rule) >= 1, "a fetch fault never fired");
    }
    eprintln!(
        "faults injected: {pushed_faults} during wal-push, {} during wal-fetch",
        p.injected() - pushed_faults
    );
}

#[test]
fn a_killed_wal_push_leaves_nothing_visible_and_prune_sweeps_its_upload() {
    let s3 = FaultyS3::start("killed-push");
    let env = s3.env();
    let data = wal_dir();
    let name = seg_name(7);
    let bytes = wal_segment(&name, SYSID, Fill::Random(7));
    std::fs::write(data.path().join("pg_wal").join(&name), &bytes).unwrap();
    let hang = s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_secs(60)))
            .target("partNumber=2")
            .times(1),
    );
    let mut child = wal_cmd(&env, data.path(), &["wal-push", &format!("pg_wal/{name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    s3.wait_injected("partNumber=2", &mut child);
    kill_tree(child.id());
    let _ = child.wait();
    assert_eq!(s3.proxy.fired(hang), 1);
    // Nothing is visible: the segment is not archived, and PostgreSQL would push it again.
    let check = wal_dir();
    let out = wal_run(
        &s3.direct(),
        check.path(),
        &["wal-fetch", &name, "pg_wal/X"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(s3.pending_uploads(), 1);
    ok(&wal_run(
        &env,
        data.path(),
        &["wal-push", &format!("pg_wal/{name}")],
    ));
    ok(&wal_run(
        &s3.direct(),
        check.path(),
        &["wal-fetch", &name, "pg_wal/X"],
    ));
    assert!(std::fs::read(check.path().join("pg_wal/X")).unwrap() == bytes);
    // prune aborts the killed upload (moto dates every upload in 2010: old enough).
    let mut prune_env = env.clone();
    prune_env.push(("DBAGENT_PG_SYSTEM_IDENTIFIER".into(), SYSID.to_string()));
    let dry = ok(&pg_run(&prune_env, None, &["prune", "--dry-run"]));
    assert!(dry.contains("would delete 1"), "{dry}");
    assert_eq!(s3.pending_uploads(), 1);
    let report = ok(&pg_run(&prune_env, None, &["prune"]));
    assert!(report.contains("deleted 1"), "{report}");
    assert_eq!(s3.pending_uploads(), 0);
}

#[test]
fn wal_fetch_says_not_archived_only_when_s3_says_so() {
    let s3 = FaultyS3::start("exit-codes");
    let env = s3.env();
    let data = wal_dir();
    let name = seg_name(5);
    let bytes = wal_segment(&name, SYSID, Fill::Pattern(5));
    std::fs::write(data.path().join("pg_wal").join(&name), &bytes).unwrap();
    ok(&wal_run(
        &env,
        data.path(),
        &["wal-push", &format!("pg_wal/{name}")],
    ));
    let fetch = |name: &str| {
        let started = Instant::now();
        let out = wal_run(
            &env,
            data.path(),
            &["wal-fetch", name, "pg_wal/RECOVERYXLOG"],
        );
        (out, started.elapsed())
    };

    // A standby polling for the next segment: exit 1, quietly, at once.
    let (out, took) = fetch(&seg_name(6));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
    eprintln!("not archived: exit 1 after {took:?}");

    // Access refused: not "not archived". Exit 126 at once, no retries.
    let denied = s3.proxy.inject(Rule::new(Fault::Status(403)).method("GET"));
    let (out, took) = fetch(&name);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(stderr(&out).contains("credentials"), "{}", stderr(&out));
    assert_eq!(s3.proxy.fired(denied), 1, "a 403 was retried");
    eprintln!("403: exit 126 after {took:?}");
    s3.proxy.clear();

    // 503 on every request: retried for wal.fetch_retry_timeout (4 s here), then 126.
    let busy = s3.proxy.inject(Rule::new(Fault::Status(503)).method("GET"));
    let (out, took) = fetch(&name);
    assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stopping recovery"),
        "{}",
        stderr(&out)
    );
    eprintln!(
        "503 on every request: exit 126 after {took:?}, {} requests refused",
        s3.proxy.fired(busy)
    );
    s3.proxy.clear();

    // S3 unreachable: 126 for the archived segment, and for one that may not exist either
    // (nobody can tell), never 1.
    s3.proxy.set_unreachable(true);
    for n in [&name, &seg_name(6)] {
        let (out, took) = fetch(n);
        assert_eq!(out.status.code(), Some(126), "{}", stderr(&out));
        eprintln!("unreachable: exit 126 after {took:?}");
    }
    s3.proxy.set_unreachable(false);
    assert!(!data.path().join("pg_wal/RECOVERYXLOG").exists());

    let (out, _) = fetch(&name);
    ok(&out);
    assert!(std::fs::read(data.path().join("pg_wal/RECOVERYXLOG")).unwrap() == bytes);
    eprintln!("faults injected: {}", s3.proxy.injected());
}

/// `wal-fetch` that waited its whole retry window on a prefetch still running (a slow link,
/// eight segments sharing it) still retries its own download when the connection drops
/// mid-body: the wait must not use up the window its own attempts get.
#[test]
fn wal_fetch_after_waiting_on_a_live_prefetch_still_rides_out_a_reset() {
    let s3 = FaultyS3::start("slow-prefetch");
    let env = s3.env();
    let data = wal_dir();
    let name = seg_name(5);
    let bytes = wal_segment(&name, SYSID, Fill::Pattern(5));
    std::fs::write(data.path().join("pg_wal").join(&name), &bytes).unwrap();
    ok(&wal_run(
        &env,
        data.path(),
        &["wal-push", &format!("pg_wal/{name}")],
    ));
    // A prefetch's claim on the segment, held by a live process (this test, with its start
    // time, as wal-prefetch writes it) whose download never finishes.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let start = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .to_string();
    let prefetch = data.path().join("pg_wal/.dbagent-prefetch");
    std::fs::create_dir_all(&prefetch).unwrap();
    std::fs::write(
        prefetch.join(format!("{name}.claim")),
        format!("{} {start}", std::process::id()),
    )
    .unwrap();
    let busy = s3.proxy.inject(
        Rule::new(Fault::ResetMidBody { after: 100_000 })
            .method("GET")
            .target(&name)
            .whole_objects_only()
            .times(1),
    );
    let started = Instant::now();
    let out = wal_run(
        &env,
        data.path(),
        &["wal-fetch", &name, "pg_wal/RECOVERYXLOG"],
    );
    ok(&out);
    assert_eq!(s3.proxy.fired(busy), 1);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "it did not wait for the prefetch"
    );
    assert!(std::fs::read(data.path().join("pg_wal/RECOVERYXLOG")).unwrap() == bytes);
}

/// A primary archiving through the proxy.
fn primary(env: &[(String, String)]) -> Postgres {
    let mut b = PostgresBuilder::new()
        .archive_command(&format!("{BIN} wal-push %p"))
        .setting("archive_timeout", "0");
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.start().expect("start PostgreSQL")
}

/// `primary` with about 25 MB of poorly compressible rows in `big`: a base backup's bundle is
/// a multipart upload, and a restore reads it in several ranges.
fn primary_with_big_rows(env: &[(String, String)]) -> Postgres {
    let pg = primary(env);
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v FROM generate_series(1, 300000) g",
    )
    .unwrap();
    pg
}

fn archiver_failures(pg: &Postgres) -> i64 {
    pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether a restore's output says it restored anything (the plan it prints first does not).
fn reports_restored(out: &Output) -> bool {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.contains("restored base backup") || stdout.contains("restored:")
}

/// `restore --latest` into a new directory; the restored server, and the restore's output.
fn restore_latest(env: &[(String, String)], dir: &Path) -> (Restored, Output) {
    let port = free_port();
    let out = pg_run(
        env,
        None,
        &[
            "restore",
            "--latest",
            "--target-dir",
            dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    );
    (
        Restored {
            dir: dir.to_path_buf(),
            port,
        },
        out,
    )
}

#[test]
fn archiving_rides_out_an_s3_outage() {
    let s3 = FaultyS3::start("outage");
    let env = s3.env();
    let pg = primary(&env);
    pg.psql("postgres", "CREATE TABLE t (id int, note text)")
        .unwrap();
    ok(&pg_run(&env, Some(&pg), &["backup"]));
    // serve's look-ahead pushes the same segments as archive_command, through the same proxy.
    let mut serve_env = env.clone();
    serve_env.extend(pg.env());
    let serve = crate::serve::Serve::start(&serve_env);
    // The outage begins once what was written before it is archived: a push still in flight
    // when the proxy starts refusing is not what this test is about. (Once, under the whole
    // suite's load, the push of the backup's own segment started just before the outage sat
    // for the rest of the test without reaching moto or exiting: see the closing note of
    // 2026-12-07.)
    switch_and_wait_archived(&pg);

    s3.proxy.set_unreachable(true);
    let outage = Instant::now();
    let mut rows = 0;
    for i in 0..4 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t SELECT g, 'during the outage' FROM generate_series({}, {}) g; SELECT pg_switch_wal()", i * 100 + 1, i * 100 + 100),
        )
        .unwrap();
        rows += 100;
    }
    // wal-push fails and PostgreSQL keeps the segments, retrying.
    while archiver_failures(&pg) < 2 || outage.elapsed() < Duration::from_secs(10) {
        assert!(
            outage.elapsed() < Duration::from_secs(90),
            "wal-push never failed while S3 was unreachable"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s3.proxy.set_unreachable(false);
    let failures = archiver_failures(&pg);
    eprintln!(
        "S3 unreachable for {:?}: {failures} failed wal-push runs, {} connections reset",
        outage.elapsed(),
        s3.proxy.injected()
    );

    pg.psql("postgres", "INSERT INTO t VALUES (0, 'after the outage')")
        .unwrap();
    rows += 1;
    switch_and_wait_archived(&pg);
    drop(serve);

    let scratch = pg_owned_tempdir().unwrap();
    let (restored, out) = restore_latest(&s3.direct(), &scratch.path().join("r"));
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), rows.to_string());
    ok(&pg_run(&s3.direct(), None, &["verify"]));
}

/// `restore --latest` while production goes on archiving: what production archived while
/// the base backup was downloading (held here 8 s) is replayed too, since the end is read
/// again just before the server starts (before: the restore stopped at the end it planned).
#[test]
fn a_latest_restore_replays_what_was_archived_while_it_downloaded() {
    let s3 = FaultyS3::start("grows");
    let env = s3.env();
    let pg = primary(&env);
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    ok(&pg_run(&env, Some(&pg), &["backup"]));
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    switch_and_wait_archived(&pg);
    let holds: Vec<_> = ["files.json.zst", "base.tar.zst"]
        .into_iter()
        .map(|what| {
            s3.proxy.inject(
                Rule::new(Fault::Stall(Duration::from_secs(8)))
                    .method("GET")
                    .target(what)
                    .times(1),
            )
        })
        .collect();
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("r");
    let restore = {
        let (env, dir) = (env.clone(), dir.clone());
        std::thread::spawn(move || restore_latest(&env, &dir))
    };
    let waiting = Instant::now();
    while holds.iter().all(|h| s3.proxy.fired(*h) == 0) {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "the restore never read its base backup"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pg.psql("postgres", "INSERT INTO t VALUES (2)").unwrap();
    switch_and_wait_archived(&pg);
    let (restored, out) = restore.join().unwrap();
    ok(&out);
    assert!(
        stderr(&out).contains("the archive grew while the base backup was restored"),
        "{}",
        stderr(&out)
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "2");
}

#[test]
fn backup_and_restore_ride_out_faults_and_never_stop_short() {
    let s3 = FaultyS3::start("backup-restore");
    let env = s3.env();
    let pg = primary_with_big_rows(&env);
    pg.psql("postgres", "CREATE TABLE marks (id int PRIMARY KEY)")
        .unwrap();
    let p = &s3.proxy;
    p.inject(
        Rule::new(Fault::Status(503))
            .target(".bundle?partNumber=")
            .times(2),
    );
    p.inject(
        Rule::new(Fault::Reset)
            .target(".bundle?partNumber=")
            .skip(2)
            .times(1),
    );
    p.inject(
        Rule::new(Fault::Status(500))
            .method("POST")
            .target(".bundle?uploadId=")
            .times(1),
    );
    p.inject(Rule::new(Fault::Status(503)).target("backup.json").times(1));
    p.inject(
        Rule::new(Fault::Status(503))
            .method("PUT")
            .target("/wal/")
            .times(2),
    );
    let out = pg_run(&env, Some(&pg), &["backup"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let backup_faults = p.injected();
    assert!(backup_faults >= 6, "only {backup_faults} faults fired");
    assert_eq!(s3.pending_uploads(), 0);

    for i in 1..=30 {
        pg.psql("postgres", &format!("INSERT INTO marks VALUES ({i})"))
            .unwrap();
        if i % 10 == 0 {
            switch_and_wait_archived(&pg);
        }
    }
    // The last archived segment holds the last transactions.
    let last = pg
        .psql("postgres", "SELECT last_archived_wal FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(last.len(), 24, "{last}");
    let scratch = pg_owned_tempdir().unwrap();

    // That segment fails for good: the restore stops, says where, and reports nothing as
    // restored. (Were wal-fetch to answer "not archived", PostgreSQL would promote there.)
    let broken = p.inject(Rule::new(Fault::Status(503)).method("GET").target(&last));
    let (_restored, out) = restore_latest(&env, &scratch.path().join("short"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // The base backup was unpacked (and says so); the restore never says it promoted.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("restored:"), "{stdout}");
    assert!(stderr(&out).contains(&last), "{}", stderr(&out));
    assert!(p.fired(broken) > 1, "the last segment was not retried");
    eprintln!("{}", stderr(&out).trim());
    p.clear();

    // Transient faults on every kind of read: retried, and every transaction comes back.
    let before = p.injected();
    p.inject(
        Rule::new(Fault::ResetMidBody { after: 1 << 20 })
            .method("GET")
            .target(".bundle")
            .times(1),
    );
    p.inject(
        Rule::new(Fault::Status(503))
            .method("GET")
            .target("/wal/0")
            .times(3),
    );
    p.inject(
        Rule::new(Fault::ResetMidBody { after: 200_000 })
            .method("GET")
            .target("/wal/0")
            .skip(3)
            .times(2),
    );
    p.inject(
        Rule::new(Fault::Status(500))
            .method("GET")
            .target("list-type=2")
            .times(1),
    );
    let (restored, out) = restore_latest(&env, &scratch.path().join("latest"));
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM marks"), "30");
    assert_eq!(restored.psql("SELECT count(*) FROM big"), "300000");
    eprintln!(
        "faults injected: {backup_faults} during backup and WAL archiving, {} during the failed restore and {} during the successful one (last segment {last})",
        before - backup_faults,
        p.injected() - before
    );
}

/// A dump restore streams its object into `pg_restore` for as long as the load takes, far
/// past the S3 client's retry window (`s3.retry_timeout`, 3 s here) and its 10-minute request
/// limit. A body that breaks after that resumes where it broke instead of failing the restore.
#[test]
fn a_download_that_breaks_late_resumes_where_it_broke() {
    let s3 = FaultyS3::start("late-break");
    let env = s3.env();
    let pg = primary(&env);
    // A few MB of poorly compressible rows.
    pg.psql("postgres", "CREATE DATABASE site; ").unwrap();
    pg.psql(
        "site",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v FROM generate_series(1, 100000) g",
    )
    .unwrap();
    let out = pg_run(&env, Some(&pg), &["backup", "--kind", "dump"]);
    assert!(out.status.success(), "dump: {}", stderr(&out));

    // Past the retry window: 4 s into the body, then the connection drops.
    let p = &s3.proxy;
    let late = p.inject(
        Rule::new(Fault::StallThenReset {
            after: 1 << 20,
            pause: Duration::from_secs(4),
        })
        .method("GET")
        .target("site.pgdump")
        .whole_objects_only()
        .times(1),
    );
    let url = format!("postgresql://postgres@{}:{}/copy", pg.host(), pg.port());
    let out = pg_run(
        &env,
        None,
        &[
            "restore",
            "--dump",
            "site",
            "--latest",
            "--target-url",
            &url,
        ],
    );
    assert_eq!(p.fired(late), 1);
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(
        pg.psql(
            "copy",
            "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM big"
        )
        .unwrap(),
        pg.psql(
            "site",
            "SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM big"
        )
        .unwrap()
    );

    // A body that breaks, and whose resume is refused (403: no retry mends it), fails the
    // restore at once, naming the download and the credentials (not only the program that
    // found its input cut), and leaves no database behind.
    p.inject(
        Rule::new(Fault::ResetMidBody { after: 1 << 20 })
            .method("GET")
            .target("site.pgdump")
            .whole_objects_only()
            .times(1),
    );
    let refused = p.inject(
        Rule::new(Fault::Status(403))
            .method("GET")
            .target("site.pgdump"),
    );
    let url = format!("postgresql://postgres@{}:{}/lost", pg.host(), pg.port());
    let out = pg_run(
        &env,
        None,
        &[
            "restore",
            "--dump",
            "site",
            "--latest",
            "--target-url",
            &url,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // object_store's own resume meets the 403 first, then the one dbagent tries: no more.
    assert!(
        p.fired(refused) <= 2,
        "a refusal was retried {} times",
        p.fired(refused)
    );
    let line = stderr(&out);
    eprintln!("{}", line.trim());
    assert!(
        line.contains("site.pgdump.zst") && line.contains("refused the credentials"),
        "{line}"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'lost'"
        )
        .unwrap(),
        "0"
    );
}

/// A drill past `drill.timeout` while its restore downloads (every ranged read of the base
/// backup pauses 2.5 s, within the S3 retry window): it stops at once rather than when the
/// download ends, leaves no scratch directory, and publishes a failed report, so the drill
/// that never finishes is the one the alerts hear about.
#[test]
fn a_drill_past_its_timeout_stops_and_reports_the_failure() {
    let s3 = FaultyS3::start("drill-timeout");
    let env = s3.env();
    let pg = primary_with_big_rows(&env);
    let out = pg_run(&env, Some(&pg), &["backup"]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let p = &s3.proxy;
    let stalled = p.inject(
        Rule::new(Fault::StallMidBody {
            after: 64 << 10,
            pause: Duration::from_millis(2500),
        })
        .method("GET")
        .target(".bundle"),
    );
    let scratch = pg_owned_tempdir().unwrap();
    let started = Instant::now();
    let out = pg_cmd(&env, None, &["drill", "--json"])
        .env("DBAGENT_DRILL_TIMEOUT", "5s")
        .env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    eprintln!("the drill ended {took:?} after it started");
    assert!(p.fired(stalled) >= 1);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(took < Duration::from_secs(40), "the drill took {took:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(report["result"], "fail", "{report}");
    let said = |text: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["detail"].as_str().unwrap_or_default().contains(text))
    };
    assert!(said("did not finish within 5s"), "{report}");
    let left: Vec<_> = std::fs::read_dir(scratch.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "the drill left {left:?}");
    // The report is in the repository, where serve and the alerts read it.
    p.clear();
    let (_, listing) = http_request(
        s3.server.port(),
        "GET",
        &format!(
            "/{}?list-type=2&prefix=drill-timeout/pg/",
            s3.server.bucket()
        ),
    )
    .unwrap();
    assert!(
        listing.contains(&format!("{}.json", report["id"].as_str().unwrap())),
        "{listing}"
    );
}

/// S3 completes the base backup's multipart upload, and the answer is lost on the way back:
/// the backup reads back what is stored instead of failing a backup whose every byte is there.
#[test]
fn a_lost_answer_to_completing_an_upload_is_no_failure() {
    let s3 = FaultyS3::start("lost-answer");
    let env = s3.env();
    let pg = primary_with_big_rows(&env);
    let p = &s3.proxy;
    let lost = p.inject(
        Rule::new(Fault::LoseAnswer)
            .method("POST")
            .target(".bundle?uploadId=")
            .times(1),
    );
    // A retry then finds the upload gone, as S3 answers once it completed it (moto completes
    // it again instead).
    let gone = p.inject(
        Rule::new(Fault::Status(404))
            .method("POST")
            .target(".bundle?uploadId="),
    );
    let out = pg_run(&env, Some(&pg), &["backup"]);
    assert_eq!(p.fired(lost), 1);
    eprintln!("retries told the upload is gone: {}", p.fired(gone));
    assert!(out.status.success(), "backup: {}", stderr(&out));
    assert_eq!(s3.pending_uploads(), 0);
    switch_and_wait_archived(&pg);
    let scratch = pg_owned_tempdir().unwrap();
    let (restored, out) = restore_latest(&env, &scratch.path().join("restored"));
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM big"), "300000");
}

#[test]
fn sigkill_and_crashes_mid_stream_leave_nothing_half_visible() {
    let s3 = FaultyS3::start("killed");
    let mut env = s3.env();
    // The network path: pg_basebackup's stream (the file-level path is killed in
    // backup::killed_backup_is_not_listed_file_repository).
    env.push(("DBAGENT_BACKUP_METHOD".into(), "stream".into()));
    let pg = primary(&env);
    // About 40 MB of poorly compressible rows: uploads of several parts.
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v FROM generate_series(1, 500000) g",
    )
    .unwrap();
    let listed = |what: &str| -> usize {
        let listing = ok(&pg_run(&s3.direct(), None, &["list", "--json"]));
        let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
        json["postgres"][0][what].as_array().map_or(0, |a| a.len())
    };
    let p = &s3.proxy;

    // A backup and a dump killed while a part upload hangs: nothing is listed.
    for (args, object) in [
        (&["backup"][..], "base.tar.zst"),
        (&["backup", "--kind", "dump"][..], "postgres.pgdump.zst"),
    ] {
        let part = format!("{object}?partNumber=2");
        p.inject(
            Rule::new(Fault::Stall(Duration::from_secs(60)))
                .target(&part)
                .times(1),
        );
        let mut child = pg_spawn(&env, Some(&pg), args);
        s3.wait_injected(&part, &mut child);
        kill_tree(child.id());
        let _ = child.wait();
    }
    assert_eq!(listed("backups"), 0);
    assert_eq!(listed("dumps"), 0);
    let killed_uploads = s3.pending_uploads();
    assert!(killed_uploads >= 2, "{killed_uploads} uploads pending");

    // PostgreSQL crashes (a backend is killed) while the backup streams: not listed either.
    // The upload's creation hangs, so the backup stops reading the server's stream mid-way.
    p.inject(
        Rule::new(Fault::Stall(Duration::from_secs(8)))
            .target("base.tar.zst?uploads")
            .times(1),
    );
    let mut child = pg_spawn(&env, Some(&pg), &["backup"]);
    s3.wait_injected("base.tar.zst?uploads", &mut child);
    let walsender = pg
        .psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'",
        )
        .unwrap();
    // SAFETY: killing a server process of this test's cluster.
    unsafe { libc::kill(walsender.trim().parse().unwrap(), libc::SIGKILL) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let line = err.lines().find(|l| l.starts_with("dbagent: error: "));
    assert!(
        line.is_some_and(|l| l.contains("base backup from")),
        "{err}"
    );
    assert_eq!(listed("backups"), 0);
    // The server recovers by itself; then a backup and a dump succeed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("postgres", "SELECT 1").is_err() {
        assert!(Instant::now() < deadline, "the server did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&pg_run(&env, Some(&pg), &["backup"]));
    ok(&pg_run(&env, Some(&pg), &["backup", "--kind", "dump"]));
    assert_eq!((listed("backups"), listed("dumps")), (1, 1));

    // A restore killed while the base backup streams in: no recovery settings, nothing
    // started, nothing reported; the directory is refused until cleared; a rerun succeeds.
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("killed");
    p.inject(
        Rule::new(Fault::StallMidBody {
            after: 2 << 20,
            pause: Duration::from_secs(60),
        })
        .method("GET")
        .target("base.tar.zst")
        .times(1),
    );
    let port = free_port();
    let mut child = pg_spawn(
        &env,
        None,
        &[
            "restore",
            "--latest",
            "--target-dir",
            dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    );
    s3.wait_injected("base.tar.zst", &mut child);
    std::thread::sleep(Duration::from_millis(500));
    kill_tree(child.id());
    let out = child.wait_with_output().unwrap();
    assert!(
        !reports_restored(&out),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!dir.join("recovery.signal").exists());
    assert!(!dir.join("postmaster.pid").exists());
    let (_, again) = restore_latest(&env, &dir);
    refused(&again, "not empty");
    let (restored, out) = restore_latest(&env, &scratch.path().join("rerun"));
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM big"), "500000");
    drop(restored);

    // prune removes what the killed uploads left (moto dates every upload in 2010: old).
    let mut prune_env = env.clone();
    prune_env.push(("DBAGENT_RETENTION_INCOMPLETE_AFTER".into(), "1h".into()));
    let report = ok(&pg_run(&prune_env, None, &["prune"]));
    assert!(report.contains("unfinished uploads"), "{report}");
    assert_eq!(s3.pending_uploads(), 0, "{report}");
    assert_eq!((listed("backups"), listed("dumps")), (1, 1));
    eprintln!(
        "faults injected: {}; multipart uploads left by killed processes: {killed_uploads}",
        p.injected()
    );
}

/// A prune while an incremental backup runs (one of its uploads held up by S3), after a newer
/// full backup has finished, with retention set to keep one backup: the running backup's base
/// and the WAL since its start are kept, so the incremental, once stored, restores.
#[test]
fn a_prune_during_a_running_incremental_keeps_its_base_and_its_wal() {
    let s3 = FaultyS3::start("running");
    let direct = s3.direct();
    let pg = primary(&direct);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10000) g",
    )
    .unwrap();
    ok(&pg_run(&direct, Some(&pg), &["backup", "--full"]));
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(10001, 20000)",
    )
    .unwrap();

    // The incremental, through the proxy: its manifest waits 15 s at S3. (Not a bundle: moto
    // dates every multipart upload 2010, so prune would take a running one for a killed one.)
    s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_secs(15)))
            .method("PUT")
            .target("/backup.json")
            .times(1),
    );
    let through_proxy = s3.proxy.s3_env(&s3.server, &s3.prefix);
    let mut child = pg_spawn(
        &through_proxy,
        Some(&pg),
        &["backup", "--incremental", "--json"],
    );
    s3.wait_injected("/backup.json", &mut child);
    // The incremental has stopped (its manifest is the last thing it stores): a point after it.
    let at = pg.psql("postgres", "SELECT now()::text").unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // Meanwhile, straight to S3: more rows, a full backup, and a prune keeping one backup.
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(20001, 30000)",
    )
    .unwrap();
    ok(&pg_run(&direct, Some(&pg), &["backup", "--full"]));
    let mut keep_one = direct.clone();
    keep_one.push(("DBAGENT_RETENTION_KEEP_BACKUPS".into(), "1".into()));
    keep_one.push(("DBAGENT_RETENTION_KEEP_DAYS".into(), "0".into()));
    let pruned = ok(&pg_run(&keep_one, None, &["prune"]));

    let out = child.wait_with_output().unwrap();
    let said = ok(&out);
    let incremental: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(incremental["kind"], "incremental", "{said}");
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(30001, 30005)",
    )
    .unwrap();
    switch_and_wait_archived(&pg);

    // Everything listed is whole, and the point after the incremental restores from it.
    let verified = pg_run(&direct, None, &["verify"]);
    assert!(
        verified.status.success(),
        "prune said:\n{pruned}\nverify said:\n{}{}",
        String::from_utf8_lossy(&verified.stdout),
        stderr(&verified)
    );
    let scratch = pg_owned_tempdir().unwrap();
    let restored = Restored {
        dir: scratch.path().join("r"),
        port: free_port(),
    };
    let out = pg_run(
        &direct,
        None,
        &[
            "restore",
            "--at",
            &at,
            "--target-dir",
            restored.dir.to_str().unwrap(),
            "--port",
            &restored.port.to_string(),
        ],
    );
    let said = ok(&out);
    assert!(
        said.contains(&format!(
            "base backup {}",
            incremental["id"].as_str().unwrap()
        )),
        "not restored from the incremental: {said}"
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "20000");
    drop(restored);

    // With retention.incomplete_after shorter than a backup takes, a prune can delete what an
    // incremental builds on while it runs (here while it stores its file index): the
    // incremental then fails, and nothing of it is listed.
    s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_secs(10)))
            .method("PUT")
            .target("/files.json.zst")
            .times(1),
    );
    let mut child = pg_spawn(&through_proxy, Some(&pg), &["backup", "--incremental"]);
    s3.wait_injected("/files.json.zst", &mut child);
    let newest = ok(&pg_run(&direct, Some(&pg), &["backup", "--full", "--json"]));
    let newest: serde_json::Value = serde_json::from_str(&newest).unwrap();
    keep_one.push(("DBAGENT_RETENTION_INCOMPLETE_AFTER".into(), "0s".into()));
    ok(&pg_run(&keep_one, None, &["prune"]));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("which this incremental builds on, was deleted while it ran"),
        "{err}"
    );
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&pg_run(&direct, None, &["list", "--json"]))).unwrap();
    let ids: Vec<&str> = listing["postgres"][0]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [newest["id"].as_str().unwrap()], "{listing}");
    ok(&pg_run(&direct, None, &["verify"]));
}

/// A prune whose `retention.incomplete_after` is shorter than a backup takes deletes the
/// running backup's stored files (no manifest yet): the backup must then fail and leave
/// nothing listed, not write a manifest naming files that are gone.
#[test]
fn a_backup_whose_files_a_prune_took_fails_and_is_not_listed() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g",
    )
    .unwrap();
    switch_and_wait_archived(&pg);
    // Archiving slowed, not failing: the backup stores its files, then waits for its WAL.
    let command = pg.psql("postgres", "SHOW archive_command").unwrap();
    pg.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = 'sleep 15; {}'",
            command.replace('\'', "''")
        ),
    )
    .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let mut env = repo.env();
    env.extend(short_timeouts());
    env.push(("DBAGENT_BACKUP_METHOD".into(), "files".into()));
    let mut child = pg_spawn(&env, Some(&pg), &["backup", "--full"]);
    let stored = || -> Vec<PathBuf> {
        walk_files(repo.root().unwrap())
            .into_iter()
            .filter(|p| {
                let p = p.to_string_lossy();
                p.contains("/backups/") && p.ends_with("/files.json.zst")
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended");
        assert!(Instant::now() < deadline, "no file index appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut prune = env.clone();
    prune.push(("DBAGENT_RETENTION_INCOMPLETE_AFTER".into(), "0s".into()));
    let pruned = ok(&pg_run(&prune, None, &["prune"]));
    assert!(
        stored().is_empty(),
        "the prune left the running backup alone: {pruned}"
    );
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("is gone from the repository although this backup stored it"),
        "{err}"
    );
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&pg_run(&env, None, &["list", "--json"]))).unwrap();
    assert!(
        listing["postgres"].as_array().is_none_or(|c| c
            .iter()
            .all(|c| c["backups"].as_array().unwrap().is_empty())),
        "{listing}"
    );
    drop(pg);
}

#[test]
fn a_killed_backup_on_a_file_repository_leaves_a_temp_file_that_prune_removes() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    // About 24 MB compressed: the upload writes its temp file part by part, several parts
    // before the stream ends (zstd's workers hold back up to a few MB until then).
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v FROM generate_series(1, 600000) g",
    )
    .unwrap();
    // The table's WAL archived first: with segments still queued, the archiver would fail
    // before the backup starts, and the backup refuses a failing archiver at once.
    switch_and_wait_archived(&pg);
    // While archiving fails, the backup has streamed everything and waits for its WAL: it is
    // killed there, its data in a temp file.
    pg.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'")
        .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let temp_files = || -> Vec<PathBuf> {
        walk_files(repo.root().unwrap())
            .into_iter()
            .filter(|p| {
                let p = p.to_string_lossy();
                p.contains("/backups/") && p.contains(".dbagent-tmp-")
            })
            .collect()
    };
    let mut env = repo.env();
    env.extend(short_timeouts());
    // The network path keeps its one object open until the WAL is in; a file-level backup
    // has closed its bundles by then (killed, they are an incomplete backup that prune
    // removes by age: prune::tests).
    env.push(("DBAGENT_BACKUP_METHOD".into(), "stream".into()));
    let mut child = pg_spawn(&env, Some(&pg), &["backup"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while temp_files().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the backup ended");
        assert!(Instant::now() < deadline, "no temp file appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    kill_tree(child.id());
    let _ = child.wait();
    let left = temp_files();
    assert_eq!(left.len(), 1, "{left:?}");
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    assert!(listing.contains("\"backups\": []"), "{listing}");

    pg.psql("postgres", "ALTER SYSTEM RESET archive_command")
        .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    switch_and_wait_archived(&pg);
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    // Nothing else in flight: the backup returns once its last segment is archived, and the
    // archiver may still be pushing the backup history file after it (one CI run under load
    // counted that push's temp file too). A stopped server has archived everything.
    pg.stop().unwrap();
    // A young temp file may belong to a running upload: kept until incomplete_after.
    let report = ok(&dbagent(&repo, None, &["prune"]));
    assert!(report.contains("keep 1 younger than 1day"), "{report}");
    assert_eq!(temp_files(), left);
    let mut prune = dbagent_cmd(&repo, None, &["prune"]);
    let report = ok(&prune
        .env("DBAGENT_RETENTION_INCOMPLETE_AFTER", "0s")
        .output()
        .unwrap());
    assert!(report.contains("deleted 1"), "{report}");
    assert!(temp_files().is_empty());
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(json["postgres"][0]["backups"].as_array().unwrap().len(), 1);
}

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0777"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t tmpfs (the test needs root): {}",
            stderr(&out)
        );
        SmallDisk {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

#[test]
fn disk_full_during_restore_is_a_clear_failure() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let scratch = pg_owned_tempdir().unwrap();
    // 8 MiB: less than a fresh cluster's base backup.
    let disk = SmallDisk::mount(&scratch.path().join("small"), "8m");
    let target = disk.dir.join("data");
    let port = free_port().to_string();
    let out = dbagent(
        &repo,
        None,
        &[
            "restore",
            "--latest",
            "--target-dir",
            target.to_str().unwrap(),
            "--port",
            &port,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("dbagent: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("No space left on device"), "{err}");
    eprintln!("{}", lines[0]);
    assert!(
        !reports_restored(&out),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // What was unpacked is gone again.
    assert!(
        std::fs::read_dir(&target).map_or(true, |mut d| d.next().is_none()),
        "the half-restored directory was left"
    );
}

/// Pushes of one name from several processes at once: which succeed, what is stored.
fn race(env: &[(String, String)], name: &str, contents: &[Vec<u8>]) -> (Vec<usize>, Vec<u8>) {
    let dirs: Vec<tempfile::TempDir> = contents
        .iter()
        .map(|c| {
            let d = wal_dir();
            std::fs::write(d.path().join("pg_wal").join(name), c).unwrap();
            d
        })
        .collect();
    let children: Vec<Child> = dirs
        .iter()
        .map(|d| {
            wal_cmd(env, d.path(), &["wal-push", &format!("pg_wal/{name}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut succeeded = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        match out.status.code() {
            Some(0) => succeeded.push(i),
            Some(2) => assert!(
                stderr(&out).contains("refusing to overwrite"),
                "{}",
                stderr(&out)
            ),
            other => panic!("wal-push exited {other:?}: {}", stderr(&out)),
        }
    }
    let check = wal_dir();
    ok(&wal_run(
        env,
        check.path(),
        &["wal-fetch", name, "pg_wal/STORED"],
    ));
    let stored = std::fs::read(check.path().join("pg_wal/STORED")).unwrap();
    (succeeded, stored)
}

fn racing_pushes(env: Vec<(String, String)>) {
    let name = seg_name(9);
    // The same content from six processes: all succeed.
    let same = wal_segment(&name, SYSID, Fill::Pattern(9));
    let (ok_ones, stored) = race(&env, &name, &vec![same.clone(); 6]);
    assert_eq!(ok_ones.len(), 6);
    assert!(stored == same);
    // Different contents (one PUT each, and multipart uploads): whoever succeeded sent
    // exactly what is stored, and only one content can win.
    for (n, incompressible) in [(10, false), (11, true)] {
        let fill = |seed: u8| match incompressible {
            true => Fill::Random(seed as u64),
            false => Fill::Pattern(seed),
        };
        let name = seg_name(n);
        let contents: Vec<Vec<u8>> = (0..6u8)
            .map(|i| wal_segment(&name, SYSID, fill(1 + i % 2)))
            .collect();
        let (ok_ones, stored) = race(&env, &name, &contents);
        assert!(!ok_ones.is_empty(), "no push succeeded");
        let winners: BTreeSet<&Vec<u8>> = ok_ones.iter().map(|&i| &contents[i]).collect();
        assert_eq!(
            winners.len(),
            1,
            "two different contents were acknowledged for {name} (incompressible: {incompressible})"
        );
        assert!(
            **winners.first().unwrap() == stored,
            "stored content differs"
        );
    }
}

#[test]
fn racing_pushes_on_s3_store_what_every_success_sent() {
    // moto checks If-None-Match without a lock: the proxy gives it S3's atomicity (see
    // dbagent_testcontainers::FaultProxy). Every request still goes to moto.
    let s3 = FaultyS3::start("race");
    s3.proxy.serialize_conditional_writes(true);
    racing_pushes(s3.env());
    let conditional = s3
        .proxy
        .seen()
        .iter()
        .filter(|s| s.outcome == "forwarded 412")
        .count();
    assert!(conditional > 0, "no conditional write was refused");
    eprintln!("conditional writes refused by the store: {conditional}");

    // Without conditional writes (a service that rejects If-None-Match), a push that finds
    // different content stored still fails loudly and changes nothing.
    let mut env = s3.env();
    env.push(("DBAGENT_S3_CONDITIONAL_WRITES".into(), "false".into()));
    let data = wal_dir();
    let name = seg_name(12);
    for (seed, code) in [(1, 0), (2, 2)] {
        let bytes = wal_segment(&name, SYSID, Fill::Random(seed));
        std::fs::write(data.path().join("pg_wal").join(&name), &bytes).unwrap();
        let out = wal_run(&env, data.path(), &["wal-push", &format!("pg_wal/{name}")]);
        assert_eq!(out.status.code(), Some(code), "{}", stderr(&out));
    }
    let check = wal_dir();
    ok(&wal_run(
        &env,
        check.path(),
        &["wal-fetch", &name, "pg_wal/X"],
    ));
    assert!(
        std::fs::read(check.path().join("pg_wal/X")).unwrap()
            == wal_segment(&name, SYSID, Fill::Random(1))
    );
}

#[test]
fn racing_pushes_on_a_file_repository_store_what_every_success_sent() {
    let dir = tempfile::tempdir().unwrap();
    racing_pushes(vec![(
        "DBAGENT_REPO".into(),
        format!("file://{}", dir.path().display()),
    )]);
}

#[test]
fn a_misnamed_recycled_or_foreign_segment_is_refused_at_push() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![(
        "DBAGENT_REPO".to_string(),
        format!("file://{}", dir.path().display()),
    )];
    let data = wal_dir();
    let name = seg_name(20);
    for (bytes, why) in [
        (
            wal_segment(&seg_name(3), SYSID, Fill::Pattern(1)),
            "segment 000000010000000000000003",
        ),
        (
            wal_segment(&name, 42, Fill::Pattern(1)),
            "system identifier 42",
        ),
        (vec![0u8; 16 << 20], "not a PostgreSQL WAL segment"),
    ] {
        std::fs::write(data.path().join("pg_wal").join(&name), &bytes).unwrap();
        let out = wal_run(&env, data.path(), &["wal-push", &format!("pg_wal/{name}")]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(why), "{}", stderr(&out));
        let stored: Vec<_> = walk_files(dir.path());
        assert!(stored.is_empty(), "stored: {stored:?}");
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// `restore --latest` on an archive whose last segment holds a record that fails its checksum
/// (on-disk damage before archiving: the page headers are intact, so `wal-push` takes it).
/// PostgreSQL ends recovery quietly at the damaged record, inside the last segment; the
/// restore must say it stopped short, and where, instead of reporting success.
#[test]
fn a_landing_inside_the_last_segment_is_a_short_landing() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql("postgres", "ALTER SYSTEM SET autovacuum = off")
        .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    pg.psql(
        "postgres",
        "CREATE TABLE marks (id int PRIMARY KEY, note text)",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    switch_and_wait_archived(&pg);
    const PAGE: u64 = 8192;
    let mut id = 0;
    let mark = |id: &mut i32| {
        *id += 1;
        pg.psql(
            "postgres",
            &format!("INSERT INTO marks VALUES ({id}, repeat('x', 50))"),
        )
        .unwrap();
        pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()")
            .unwrap()
    };
    // Damage goes 28 bytes into the record after `mid`: well inside one page.
    let mut mid = mark(&mut id);
    while id < 5 || !(64..PAGE - 128).contains(&(lsn(&mid) % PAGE)) {
        mid = mark(&mut id);
    }
    let kept = id;
    for _ in 0..5 {
        mark(&mut id);
    }
    let name = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    let segment = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap();
    wait_archived(&pg, &name);
    let sysid = pg
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    pg.stop().unwrap();

    let seg_start = u64::from_str_radix(&name[8..16], 16).unwrap() * (1 << 32)
        + u64::from_str_radix(&name[16..24], 16).unwrap() * (16 << 20);
    let mut damaged = segment.clone();
    damaged[(lsn(&mid) - seg_start + 28) as usize] ^= 0xFF;
    let data = pg_owned_tempdir().unwrap();
    std::fs::create_dir(data.path().join("pg_wal")).unwrap();
    std::fs::write(data.path().join("pg_wal").join(&name), &damaged).unwrap();
    let stored = repo
        .root()
        .unwrap()
        .join(format!("pg/{sysid}/wal/{name}.zst"));
    std::fs::remove_file(&stored).unwrap();
    let mut push = dbagent_cmd(&repo, None, &["wal-push", &format!("pg_wal/{name}")]);
    push.current_dir(data.path())
        .env("PGDATA", data.path())
        .env("DBAGENT_PG_SYSTEM_IDENTIFIER", &sysid);
    ok(&push.output().unwrap());

    // A copy, and a server that would replace production: neither may promote short. One
    // that promoted would already have archived its new timeline (history file first), and
    // a later `restore --latest` could take that timeline for production's.
    let seg_end = seg_start + (16 << 20);
    let show = |l: u64| format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF);
    let history = repo
        .root()
        .unwrap()
        .join(format!("pg/{sysid}/wal/00000002.history.zst"));
    let mut last_replayed = None;
    for as_primary in [false, true] {
        let scratch = pg_owned_tempdir().unwrap();
        let port = free_port();
        let target = scratch.path().join("r");
        let mut args = vec![
            "restore".to_string(),
            "--latest".into(),
            "--target-dir".into(),
            target.display().to_string(),
            "--port".into(),
            port.to_string(),
        ];
        if as_primary {
            args.push("--as-primary".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = dbagent(&repo, None, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("restored:"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // It names where the archive ends (the end of the last segment, which ends with a
        // WAL switch), and the last transaction it could replay, for an --at restore.
        assert!(
            err.contains(&format!(
                "short of the end of the archived WAL at {}",
                show(seg_end)
            )),
            "{err}"
        );
        assert!(err.contains("restores everything before it"), "{err}");
        // The server is down, and nothing forked production in the repository.
        let restored = Restored { dir: target, port };
        assert!(
            !restored.dir.join("postmaster.pid").exists(),
            "the short server is still running: {err}"
        );
        assert!(
            !history.exists(),
            "a short landing archived {}",
            history.display()
        );
        eprintln!("{}", err.trim());
        last_replayed = err
            .split_once("`restore --at ")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(t, _)| t.to_string());
    }

    // What the archive holds before the damage is restorable by the time the error named:
    // every row but the last one replayed.
    let at = last_replayed.expect("the error names an --at short of the damage");
    let scratch = pg_owned_tempdir().unwrap();
    let restored = Restored {
        dir: scratch.path().join("r"),
        port: free_port(),
    };
    ok(&dbagent(
        &repo,
        None,
        &[
            "restore",
            "--at",
            &at,
            "--target-dir",
            restored.dir.to_str().unwrap(),
            "--port",
            &restored.port.to_string(),
        ],
    ));
    assert_eq!(
        restored.psql("SELECT count(*) FROM marks"),
        (kept - 1).to_string()
    );
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The backup cannot store its piece of the segment it stops in (every PUT of a `.part`
/// object is refused): it says so, waits for archive_command to store the whole segment as
/// before, and is a good backup.
#[test]
fn a_backup_that_cannot_store_its_stop_piece_waits_for_the_archiver() {
    let s3 = FaultyS3::start("stop-piece");
    let mut env = s3.env();
    env.push(("DBAGENT_BACKUP_METHOD".into(), "files".into()));
    let pg = primary(&env);
    pg.psql(
        "postgres",
        "CREATE TABLE kept AS SELECT g AS id FROM generate_series(1, 1000) g",
    )
    .unwrap();
    let refused = s3
        .proxy
        .inject(Rule::new(Fault::Status(403)).method("PUT").target(".part"));
    // archive_command's store of the stop segment (segment 2 of a new cluster: the backup's
    // switch closes segment 1) is held back a while: a backup that did not wait for it would
    // return before it is there.
    let held = s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_millis(1500)))
            .method("PUT")
            .target("/wal/000000010000000000000002.zst")
            .times(1),
    );
    let out = pg_run(&env, Some(&pg), &["backup", "--json"]);
    let err = stderr(&out);
    assert!(out.status.success(), "backup: {err}");
    assert!(
        s3.proxy.fired(refused) >= 1,
        "no piece was attempted: {err}"
    );
    assert_eq!(s3.proxy.fired(held), 1, "{err}");
    assert!(
        err.contains("cannot store the WAL up to the backup's stop point itself"),
        "{err}"
    );
    // The whole stop segment was archived before the backup returned.
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    let key = format!(
        "stop-piece/pg/{}/wal/{}",
        report["system_identifier"].as_str().unwrap(),
        report["stop_wal"].as_str().unwrap()
    );
    let (_, listed) = http_request(
        s3.server.port(),
        "GET",
        &format!("/{}?list-type=2&prefix={key}", s3.server.bucket()),
    )
    .unwrap();
    assert!(
        listed.contains(&format!("<Key>{key}.zst</Key>")),
        "{listed}"
    );
    assert!(!listed.contains(".part.zst"), "{listed}");

    let dir = pg_owned_tempdir().unwrap();
    let (restored, out) = restore_latest(&s3.direct(), &dir.path().join("restored"));
    assert!(out.status.success(), "restore: {}", stderr(&out));
    assert_eq!(restored.psql("SELECT count(*) FROM kept"), "1000");
}

/// A non-English locale the machine has (scripts/setup generates de_DE.UTF-8).
pub(crate) fn german_locale() -> String {
    let out = Command::new("locale").arg("-a").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("de_de.utf"))
        .map(str::to_string)
        .expect("no de_DE.UTF-8 locale: run scripts/setup (it generates one)")
}

/// A server speaking German (`lc_messages`, and the client programs too) backs up like any
/// other; and when its archiving breaks, `backup` notices from pg_stat_archiver and the WAL
/// positions, not from the server's words, and fails within `wal.archive_wait` instead of
/// waiting for ever.
#[test]
fn a_backup_with_german_messages_succeeds_and_a_stuck_archive_fails_it_fast() {
    let locale = german_locale();
    let repo = Repo::file();
    let mut b = PostgresBuilder::new()
        .archive_command(&format!("{BIN} wal-push %p"))
        .setting("archive_timeout", "0")
        .setting("lc_messages", &locale);
    for (k, v) in repo.env() {
        b = b.env(&k, &v);
    }
    let pg = b.start().expect("start PostgreSQL");
    assert!(
        pg.psql("postgres", "SELECT 1/0")
            .is_err_and(|e| format!("{e:#}").contains("Division durch Null")),
        "the server does not speak German"
    );
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g",
    )
    .unwrap();
    let backup = |wait: &str, method: &str| {
        let mut cmd = dbagent_cmd(&repo, Some(&pg), &["backup"]);
        cmd.env("LANG", &locale)
            .env("LC_ALL", &locale)
            .env("DBAGENT_WAL_ARCHIVE_WAIT", wait)
            .env("DBAGENT_BACKUP_METHOD", method);
        run_within(cmd, Duration::from_secs(120))
    };
    let (out, _) = backup("5m", "files");
    ok(&out);
    // The backup returns without waiting for the archiver to store its history file
    // (`….backup`, from pg_backup_stop); with `/bin/false` in place first, that file's failure
    // would refuse the next backup for an archiver already failing, not stuck.
    switch_and_wait_archived(&pg);

    let archive_command = |cmd: &str| {
        pg.psql(
            "postgres",
            &format!("ALTER SYSTEM SET archive_command = '{cmd}'"),
        )
        .unwrap();
        pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    };
    // From the data directory, and over the network (where the server itself waits for the
    // archive before it sends the manifest). In between the archive recovers, or the second
    // backup would be refused for an archiver already failing.
    for method in ["files", "stream"] {
        archive_command("/bin/false");
        let (out, took) = backup("5s", method);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{method}: {err}");
        assert!(err.contains("WAL archiving is stuck"), "{method}: {err}");
        assert!(
            took < Duration::from_secs(60),
            "{method} took {took:?}: {err}"
        );
        eprintln!(
            "{method}: stuck archive noticed in {took:?}: {}",
            err.trim()
        );
        archive_command(&format!("{BIN} wal-push %p"));
        switch_and_wait_archived(&pg);
    }
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        json["postgres"][0]["backups"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
}

/// `restore` waiting for the restored server to promote: a role the restored server does not
/// know fails at once (exit 1, naming it) instead of polling for ever, and a recovery that
/// makes no headway (the WAL downloads stall) ends at `restore.promote_timeout` with exit 2.
#[test]
fn restore_waits_for_promotion_with_a_deadline_and_fails_at_once_on_auth() {
    let s3 = FaultyS3::start("promote-wait");
    let env = s3.env();
    let pg = primary(&env);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g",
    )
    .unwrap();
    ok(&pg_run(&env, Some(&pg), &["backup"]));
    pg.psql("postgres", "INSERT INTO t VALUES (0)").unwrap();
    switch_and_wait_archived(&pg);
    let scratch = pg_owned_tempdir().unwrap();
    let restore = |dir: &str, extra: &[(&str, &str)]| {
        let target = scratch.path().join(dir);
        let port = free_port();
        let mut cmd = pg_cmd(
            &env,
            None,
            &[
                "restore",
                "--latest",
                "--target-dir",
                target.to_str().unwrap(),
                "--port",
                &port.to_string(),
            ],
        );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let restored = Restored { dir: target, port };
        let (out, took) = run_within(cmd, Duration::from_secs(300));
        (restored, out, took)
    };

    let (_r, out, took) = restore("auth", &[("PGUSER", "nosuchrole")]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nosuchrole"), "{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!("unknown role reported in {took:?}: {}", err.trim());

    // The plan reads the segments' trailers (ranged GETs), and the last segment twice, whole,
    // for where the archive ends (before writing, and again before starting the server); the
    // downloads of whole segments after those, which the restored server's restore_command
    // makes, stall.
    s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_secs(50)))
            .method("GET")
            .target("/wal/0")
            .whole_objects_only()
            .skip(2),
    );
    let (_r, out, took) = restore(
        "stalled",
        &[
            ("DBAGENT_RESTORE_PROMOTE_TIMEOUT", "8s"),
            ("DBAGENT_WAL_FETCH_RETRY_TIMEOUT", "10m"),
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("did not promote within 8s"), "{err}");
    // Without the deadline it would wait out 10 minutes of retries (run_within stops it at
    // 5). The restore's own reads of the archive's end may meet the stall too (one CI run: two
    // of them, 110 s in all, when the end's last record needed the segment before), so the
    // bound leaves room for a few 50 s stalls.
    assert!(took < Duration::from_secs(240), "took {took:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("restored:"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("stalled recovery given up in {took:?}: {}", err.trim());
}

/// A server restored `--as-primary` forks production's history, and the fork is known only
/// once its timeline's history file is in the repository: until then the next `--latest`
/// restore (or a standby re-seeded from the repository) follows the old timeline, the change
/// the restore undid. So the restore reports success only once that file is archived, and
/// fails (the server left running) when its archiving fails. Before, it returned at
/// promotion: a server stopped at once after it lost the file (a CI run of the forks test
/// under load did).
#[test]
fn an_as_primary_restore_ends_once_its_new_timeline_is_archived() {
    let held = Fault::Stall(Duration::from_secs(30));
    for fault in [
        Fault::Stall(Duration::from_secs(5)),
        Fault::Status(403),
        held.clone(),
    ] {
        let s3 = FaultyS3::start("new-timeline");
        let env = s3.env();
        let mut pg = primary(&env);
        pg.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY, who text)")
            .unwrap();
        ok(&pg_run(&env, Some(&pg), &["backup"]));
        pg.psql("postgres", "INSERT INTO t VALUES (1, 'production')")
            .unwrap();
        let before = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
        let before =
            chrono::DateTime::parse_from_str(&format!("{before}00"), "%Y-%m-%d %H:%M:%S%.f%z")
                .unwrap()
                .to_rfc3339();
        std::thread::sleep(Duration::from_millis(20));
        pg.psql("postgres", "INSERT INTO t VALUES (2, 'the bad change')")
            .unwrap();
        switch_and_wait_archived(&pg);
        pg.psql("postgres", "INSERT INTO t VALUES (3, 'after it')")
            .unwrap();
        switch_and_wait_archived(&pg);
        pg.stop().unwrap();

        let history = s3.proxy.inject(
            Rule::new(fault.clone())
                .method("PUT")
                .target("00000002.history"),
        );
        let scratch = pg_owned_tempdir().unwrap();
        let target = scratch.path().join("new-primary");
        let port = free_port();
        let mut restore = pg_spawn(
            &env,
            None,
            &[
                "restore",
                "--at",
                &before,
                "--as-primary",
                "--target-dir",
                target.to_str().unwrap(),
                "--port",
                &port.to_string(),
            ],
        );
        let new_primary = Restored { dir: target, port };
        if fault == held {
            // The server stops (a crash, an operator) while its push is held: the restore
            // says so at once instead of waiting for a file that no one will send.
            // Once the restore has seen the promotion and waits for the file (the server
            // pushes it at promotion, which can be before the restore looks: one CI run
            // stopped it there, and the restore rightly said it stopped before promoting).
            let lines = std::io::BufReader::new(restore.stderr.take().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut all = String::new();
                for line in std::io::BufRead::lines(lines).map_while(Result::ok) {
                    if line.contains("waiting for the restored server to archive") {
                        let _ = tx.send(());
                    }
                    all.push_str(&line);
                    all.push('\n');
                }
                all
            });
            let waiting = rx.recv_timeout(Duration::from_secs(120));
            if waiting.is_ok() {
                s3.wait_injected("00000002.history", &mut restore);
            }
            let _ = command_as_pg_user(pg_bin("pg_ctl").unwrap())
                .arg("-D")
                .arg(&new_primary.dir)
                .args(["-m", "immediate", "-w", "stop"])
                .output()
                .unwrap();
            let stopped = Instant::now();
            let status = restore.wait().unwrap();
            let err = reader.join().unwrap();
            assert!(waiting.is_ok(), "{err}");
            assert_eq!(status.code(), Some(2), "{err}");
            assert!(
                err.contains("stopped before it archived 00000002.history"),
                "{err}"
            );
            assert!(stopped.elapsed() < Duration::from_secs(10), "{err}");
            continue;
        }
        let out = restore.wait_with_output().unwrap();
        let err = stderr(&out);
        if fault == Fault::Status(403) {
            assert!(s3.proxy.fired(history) > 0, "{err}");
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(
                err.contains("00000002.history") && err.contains("still running"),
                "{err}"
            );
            assert!(
                !reports_restored(&out),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            // Running, as the message says, and archiving once the store takes the file.
            assert_eq!(new_primary.psql("SELECT pg_is_in_recovery()"), "f");
            continue;
        }
        ok(&out);
        // Stopped at once, as a crash or an impatient operator would.
        drop(new_primary);

        let (latest, out) = restore_latest(&s3.direct(), &scratch.path().join("latest"));
        ok(&out);
        assert_eq!(
            latest.psql("SELECT string_agg(id || ':' || who, ',' ORDER BY id) FROM t"),
            "1:production",
            "{err}"
        );
        assert!(s3.proxy.fired(history) > 0, "{err}");
        assert!(err.contains("timeline 2's history is archived"), "{err}");
    }
}

/// Two shippers of one server's binlogs (the sidecar's and a `binlog-push`) both list before
/// either uploads: in an encrypted repository each seals its own ciphertext, and the one whose
/// upload lands second must not replace the first one's object, which the description written
/// beside it names by its digest.
#[test]
fn two_binlog_shippers_racing_leave_one_object_its_description_names() {
    let s3 = FaultyS3::start("binlog-race");
    let keydir = pg_owned_tempdir().unwrap();
    let key = crate::encryption::keygen(keydir.path(), "k");
    let db = dbagent_testcontainers::MariaDbBuilder::new()
        .start()
        .unwrap();
    db.sql(
        None,
        "CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY)",
    )
    .unwrap();
    for i in 1..=2 {
        db.sql(None, &format!("INSERT INTO app.t VALUES ({i})"))
            .unwrap();
        db.sql(None, "FLUSH BINARY LOGS").unwrap();
    }
    let first = db
        .sql(None, "SHOW BINARY LOGS")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .split('\t')
        .next()
        .unwrap()
        .to_string();
    let agent = |env: &[(String, String)], args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("DBAGENT_CONFIG")
            .env("DBAGENT_LOG_FORMAT", "text")
            .env("DBAGENT_MYSQL_URL", db.url())
            .env("DBAGENT_ENCRYPTION_RECIPIENTS_FILE", &key.recipients)
            .env("DBAGENT_ENCRYPTION_IDENTITY_FILE", &key.identity)
            .current_dir("/tmp")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };
    ok(&agent(&s3.direct(), &["encryption", "set"])
        .output()
        .unwrap());

    // The first shipper's upload of the first binlog waits at the proxy; the second ships
    // everything meanwhile, description included.
    s3.proxy.inject(
        Rule::new(Fault::Stall(Duration::from_secs(3)))
            .method("PUT")
            .target(&format!("{first}.zst"))
            .times(1),
    );
    let mut slow = agent(&s3.env(), &["binlog-push"]).spawn().unwrap();
    s3.wait_injected(&format!("{first}.zst"), &mut slow);
    ok(&agent(&s3.direct(), &["binlog-push"]).output().unwrap());
    let slow = slow.wait_with_output().unwrap();
    ok(&slow);

    // Every stored binlog is the one its description names, and a restore crosses them.
    ok(&agent(&s3.direct(), &["verify"]).output().unwrap());
}
