//! Restores under real operations: a copy restored beside production must not change what
//! production's next restore returns; a copy restored as the new primary forks the history,
//! which `list`, `verify`, `serve` and `restore` must see; and a restored server's own
//! backups must restore, whatever recovery settings its first restore left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dbagent_testcontainers::{Postgres, pg_owned_tempdir};

use crate::serve::{Serve, pg_env};
use crate::support::*;

/// The rows of `t` as `id:who`, in order.
fn rows(psql: impl Fn(&str) -> String) -> String {
    psql("SELECT string_agg(id || ':' || who, ',' ORDER BY id) FROM t")
}

fn auto_conf(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap()
}

/// A restored server's settings file keeps no recovery setting once it has promoted.
fn assert_no_recovery_settings(dir: &Path) {
    let conf = auto_conf(dir);
    for name in ["restore_command", "recovery_target"] {
        assert!(
            !conf.contains(name),
            "{name} left in postgresql.auto.conf:\n{conf}"
        );
    }
}

/// Switches WAL on a restored server and waits until it archived the segment.
fn switch_and_wait_archived_on(r: &Restored) {
    let seg = r.psql("SELECT pg_walfile_name(pg_switch_wal())");
    for _ in 0..600 {
        let last = r.psql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.len() >= 24 && last[..24] >= *seg {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the restored server did not archive {seg} in 60 s");
}

fn listing(repo: &Repo) -> serde_json::Value {
    let out = ok(&dbagent(repo, None, &["list", "--json"]));
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["postgres"][0].clone()
}

/// A primary archiving into `repo` with a table `t` and one base backup.
fn production(repo: &Repo) -> Postgres {
    let pg = archiving_primary(repo);
    pg.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY, who text)")
        .unwrap();
    ok(&dbagent(repo, Some(&pg), &["backup"]));
    pg
}

/// `production` with row 1, then a moment (between the two, for `--at`), then row 2, "the
/// bad change", archived: what a restore to before the bad change undoes.
fn production_with_a_bad_change(repo: &Repo) -> (Postgres, String) {
    let pg = production(repo);
    insert(&pg, 1, "production");
    let a = now_on(&pg);
    std::thread::sleep(Duration::from_millis(20));
    let b = now_on(&pg);
    insert(&pg, 2, "the bad change");
    switch_and_wait_archived(&pg);
    (pg, between(a, b))
}

fn insert(pg: &Postgres, id: u32, who: &str) {
    pg.psql("postgres", &format!("INSERT INTO t VALUES ({id}, '{who}')"))
        .unwrap();
}

#[test]
fn a_copy_restored_beside_production_leaves_its_history_alone() {
    let repo = Repo::file();
    let mut pg = production(&repo);
    insert(&pg, 1, "production");
    switch_and_wait_archived(&pg);

    let scratch = pg_owned_tempdir().unwrap();
    let (out, copy) = restore(&repo, &scratch.path().join("copy"), &["--latest"]);
    let stdout = ok(&out);
    assert!(
        stdout.contains("the restored server is a copy: archive_mode = off"),
        "{stdout}"
    );
    assert!(stdout.contains("timeline 2"), "{stdout}");
    assert_eq!(copy.psql("SHOW archive_mode"), "off");
    assert_no_recovery_settings(&copy.dir);
    // The copy is written and switches WAL: with archiving on it would now archive its
    // timeline into production's repository.
    copy.psql("INSERT INTO t VALUES (2, 'copy')");
    copy.psql("SELECT pg_switch_wal()");

    insert(&pg, 3, "production");
    switch_and_wait_archived(&pg);
    pg.stop().unwrap();
    let names: Vec<String> = repo
        .snapshot()
        .keys()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("00000002")),
        "the copy archived into the repository: {names:?}"
    );
    let cluster = listing(&repo);
    assert_eq!(cluster["forks"], 0, "{cluster}");
    assert_eq!(cluster["production_timeline"], 1, "{cluster}");
    drop(copy);

    // Production's next restore lands on production's last write, not the copy's.
    let (out, restored) = restore(&repo, &scratch.path().join("again"), &["--latest"]);
    ok(&out);
    assert_eq!(rows(|q| restored.psql(q)), "1:production,3:production");
}

#[test]
fn a_copy_restored_as_primary_forks_the_history_and_restores_see_it() {
    let repo = Repo::file();
    let mut pg = production(&repo);
    insert(&pg, 1, "production");
    switch_and_wait_archived(&pg);

    // A copy told it is the new primary archives its new timeline into the repository...
    let scratch = pg_owned_tempdir().unwrap();
    let (out, copy) = restore(
        &repo,
        &scratch.path().join("copy"),
        &["--latest", "--as-primary"],
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("is the new primary (--as-primary)"),
        "{stdout}"
    );
    assert_eq!(copy.psql("SHOW archive_mode"), "on");
    assert_no_recovery_settings(&copy.dir);
    // ... its first WAL segment too, switched at once rather than when full: until then the
    // new timeline is no branch to `list` and `prune`.
    let first_of_two = |p: &PathBuf| {
        let name = p.file_name().unwrap().to_string_lossy();
        let in_wal = p.parent().and_then(|d| d.file_name()) == Some("wal".as_ref());
        in_wal && name.starts_with("00000002") && !name.contains("history")
    };
    let mut waited = 0;
    while !repo.snapshot().keys().any(first_of_two) {
        assert!(
            waited < 300,
            "no WAL segment of timeline 2 archived in 30 s: {:?}",
            repo.snapshot().keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
        waited += 1;
    }
    copy.psql("INSERT INTO t VALUES (2, 'copy')");
    switch_and_wait_archived_on(&copy);
    // ... while production goes on (a second later, so the store's times tell them apart).
    std::thread::sleep(Duration::from_millis(1100));
    insert(&pg, 3, "production");
    switch_and_wait_archived(&pg);

    let cluster = listing(&repo);
    assert_eq!(cluster["forks"], 1, "{cluster}");
    let branches: Vec<u64> = cluster["branches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["timeline"].as_u64().unwrap())
        .collect();
    assert_eq!(branches, vec![1, 2], "{cluster}");
    assert_eq!(cluster["branches"][1]["parent"], 1, "{cluster}");
    assert!(cluster["production_timeline"].is_null(), "{cluster}");
    let text = ok(&dbagent(&repo, None, &["list"]));
    assert!(
        text.contains("FORK: the archived history has 2 branches"),
        "{text}"
    );
    assert!(text.contains("timeline 2 (left timeline 1 at "), "{text}");

    let out = dbagent(&repo, None, &["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("PROBLEM: fork: the archived history has 2 branches"),
        "{stdout}"
    );

    // serve exports it.
    let mut env = pg_env(&pg);
    env.extend(repo.env());
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "1s".into()));
    let serve = Serve::start(&env);
    serve.wait_for("the fork metric", Duration::from_secs(20), |s| {
        s.metric("dbagent_timeline_forks") == Some(1.0)
    });
    drop(serve);

    // Both branches were written after they parted: restore names them and refuses.
    let before = repo.snapshot();
    let (out, _) = restore(&repo, &scratch.path().join("refused"), &["--latest"]);
    refused(&out, "--timeline 1 or --timeline 2");
    let (out, _) = restore(
        &repo,
        &scratch.path().join("refused"),
        &["--at", "2999-01-01T00:00:00Z", "--dry-run"],
    );
    refused(&out, "forked");
    assert_eq!(repo.snapshot(), before);
    assert!(!scratch.path().join("refused").exists());

    // --timeline chooses: production's branch holds production's writes only.
    let (out, restored) = restore(
        &repo,
        &scratch.path().join("one"),
        &["--latest", "--timeline", "1"],
    );
    let stdout = ok(&out);
    assert!(
        stdout.contains("timeline 1 chosen with --timeline"),
        "{stdout}"
    );
    assert_eq!(rows(|q| restored.psql(q)), "1:production,3:production");
    drop(restored);
    let (out, restored) = restore(
        &repo,
        &scratch.path().join("two"),
        &["--latest", "--timeline", "2"],
    );
    ok(&out);
    assert_eq!(rows(|q| restored.psql(q)), "1:production,2:copy");
    drop(restored);

    // Settling it: the copy is gone, production is lost and restored from its branch as the
    // new primary, which goes on. Now one branch is written after the parting: restores
    // follow it without being told.
    drop(copy);
    pg.stop().unwrap();
    let (out, new_primary) = restore(
        &repo,
        &scratch.path().join("new-primary"),
        &["--latest", "--timeline", "1", "--as-primary"],
    );
    let stdout = ok(&out);
    assert!(stdout.contains("timeline 3"), "{stdout}");
    new_primary.psql("INSERT INTO t VALUES (4, 'new primary')");
    switch_and_wait_archived_on(&new_primary);
    drop(new_primary);
    let cluster = listing(&repo);
    assert_eq!(cluster["production_timeline"], 3, "{cluster}");
    let (out, restored) = restore(&repo, &scratch.path().join("latest"), &["--latest"]);
    let stdout = ok(&out);
    assert!(
        stdout.contains("timeline 3 continues production"),
        "{stdout}"
    );
    assert_eq!(
        rows(|q| restored.psql(q)),
        "1:production,3:production,4:new primary"
    );
    ok(&dbagent(&repo, None, &["verify"]));
}

/// `SELECT clock_timestamp()` on the server, as an RFC 3339 instant.
fn now_on(pg: &Postgres) -> chrono::DateTime<chrono::FixedOffset> {
    let s = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
    chrono::DateTime::parse_from_str(&format!("{s}00"), "%Y-%m-%d %H:%M:%S%.f%z").unwrap()
}

fn between(
    a: chrono::DateTime<chrono::FixedOffset>,
    b: chrono::DateTime<chrono::FixedOffset>,
) -> String {
    (a + (b - a) / 2).to_rfc3339()
}

/// Waits until a server started on restored data has promoted.
fn wait_promoted(pg: &Postgres) {
    for _ in 0..600 {
        if pg
            .psql("postgres", "SELECT pg_is_in_recovery()")
            .ok()
            .as_deref()
            == Some("f")
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the restored server did not promote in 60 s; log:\n{}",
        dbagent_testcontainers::log_tail(&pg.log_path(), 40)
    );
}

#[test]
fn a_restored_servers_own_backups_restore() {
    let first = Repo::file();
    let (mut pg, before_the_bad_change) = production_with_a_bad_change(&first);
    pg.stop().unwrap();

    // Restored to before the bad change, and started by the operator (--no-start): its
    // recovery block is in postgresql.auto.conf until recovery ends.
    let scratch = pg_owned_tempdir().unwrap();
    let data: PathBuf = scratch.path().join("restored");
    let (out, _) = restore(
        &first,
        &data,
        &["--at", &before_the_bad_change, "--no-start"],
    );
    ok(&out);
    assert_eq!(auto_conf(&data).matches("restore_command").count(), 1);
    assert!(data.join("recovery.signal").exists());

    // It becomes the primary of a new repository.
    let second = Repo::file();
    let env: Vec<(String, String)> = second.env();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut restored = Postgres::start_existing(&data, &env_ref).unwrap();
    wait_promoted(&restored);
    assert_eq!(
        rows(|q| restored.psql("postgres", q).unwrap()),
        "1:production"
    );
    restored
        .psql("postgres", "ALTER SYSTEM SET archive_mode = on")
        .unwrap();
    restored.restart().unwrap();
    ok(&dbagent(&second, Some(&restored), &["backup"]));
    insert(&restored, 3, "written on the restored server");
    let a = now_on(&restored);
    std::thread::sleep(Duration::from_millis(20));
    let b = now_on(&restored);
    insert(&restored, 4, "after the target");
    switch_and_wait_archived(&restored);
    restored.stop().unwrap();

    // Its backup restores to its last write, with --latest and with --at, whatever the
    // first restore left in the backup.
    let (out, latest) = restore(&second, &scratch.path().join("latest"), &["--latest"]);
    ok(&out);
    assert_eq!(
        rows(|q| latest.psql(q)),
        "1:production,3:written on the restored server,4:after the target"
    );
    assert_no_recovery_settings(&latest.dir);
    drop(latest);
    let (out, at) = restore(
        &second,
        &scratch.path().join("at"),
        &["--at", &between(a, b)],
    );
    ok(&out);
    assert_eq!(
        rows(|q| at.psql(q)),
        "1:production,3:written on the restored server"
    );
    assert_no_recovery_settings(&at.dir);
}

#[test]
fn a_no_start_restore_as_primary_leaves_nothing_its_replicas_inherit() {
    let repo = Repo::file();
    let (mut pg, before_the_bad_change) = production_with_a_bad_change(&repo);
    pg.stop().unwrap();

    // The runbook's Job: restored as the new primary, started later by the StatefulSet.
    let scratch = pg_owned_tempdir().unwrap();
    let data: PathBuf = scratch.path().join("restored");
    let (out, _) = restore(
        &repo,
        &data,
        &["--at", &before_the_bad_change, "--as-primary", "--no-start"],
    );
    ok(&out);
    let env: Vec<(String, String)> = repo.env();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let restored = Postgres::start_existing(&data, &env_ref).unwrap();
    wait_promoted(&restored);
    // Recovery is over: its settings are gone from the file a clone copies, with no dbagent
    // watching.
    assert_no_recovery_settings(&data);

    // A replica cloned from it (pg_basebackup -R, as replica-bootstrap.sh does) starts and
    // streams.
    insert(&restored, 3, "on the new primary");
    let (_dir, replica) = crate::serve::standby_of(&restored);
    insert(&restored, 4, "streamed to the replica");
    let want = "1:production,3:on the new primary,4:streamed to the replica";
    for _ in 0..300 {
        if rows(|q| replica.psql("postgres", q).unwrap_or_default()) == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rows(|q| replica.psql("postgres", q).unwrap()), want);
    assert_eq!(
        replica
            .psql("postgres", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
}

/// Right after a restore as the new primary promoted, before it archived a segment of its new
/// timeline: a `--latest` restore follows the new primary (its history file is the newest
/// thing in the repository) and never replays what it undid, whether or not the old timeline
/// archived more segments after the bad change.
#[test]
fn a_restore_right_after_an_as_primary_restore_follows_it_not_the_undone_change() {
    for later_segment in [false, true] {
        let repo = Repo::file();
        let (mut pg, before_the_bad_change) = production_with_a_bad_change(&repo);
        if later_segment {
            insert(&pg, 3, "after the bad change");
            switch_and_wait_archived(&pg);
        }
        pg.stop().unwrap();
        // A second later, so the store's times tell the history file from the old WAL.
        std::thread::sleep(Duration::from_millis(1100));

        let scratch = pg_owned_tempdir().unwrap();
        let (out, new_primary) = restore(
            &repo,
            &scratch.path().join("new-primary"),
            &["--at", &before_the_bad_change, "--as-primary"],
        );
        ok(&out);
        assert_eq!(rows(|q| new_primary.psql(q)), "1:production");
        // Stopped before it closed a segment of its new timeline.
        drop(new_primary);

        let (out, restored) = restore(&repo, &scratch.path().join("latest"), &["--latest"]);
        let stdout = ok(&out);
        assert_eq!(
            rows(|q| restored.psql(q)),
            "1:production",
            "later segment: {later_segment}\n{stdout}"
        );
        assert!(stdout.contains("timeline 2"), "{stdout}");
    }
}
