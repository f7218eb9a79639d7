//! Every refusal gives one clear line, exits 1 and writes nothing.

use dbagent_testcontainers::pg_owned_tempdir;

use crate::support::*;

#[test]
fn restore_refusals_touch_nothing() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (i int)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    for i in 0..4 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({i})"))
            .unwrap();
        switch_and_wait_archived(&pg);
    }
    pg.stop().unwrap();

    let scratch = pg_owned_tempdir().unwrap();
    let target = scratch.path().join("restore");
    let target_s = target.to_str().unwrap();
    let before = repo.snapshot();

    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "restore",
                "--at",
                "yesterday at noon",
                "--target-dir",
                target_s,
            ],
            "malformed time",
        ),
        (
            &[
                "restore",
                "--at",
                "2026-02-30 10:00:00",
                "--target-dir",
                target_s,
            ],
            "malformed time",
        ),
        (
            &[
                "restore",
                "--at",
                "2001-01-01 00:00:00",
                "--target-dir",
                target_s,
            ],
            "before the first backup",
        ),
        (
            &[
                "restore",
                "--at",
                "2999-01-01T00:00:00Z",
                "--target-dir",
                target_s,
            ],
            "beyond the archived WAL",
        ),
        (
            &[
                "restore",
                "--latest",
                "--target-dir",
                target_s,
                "--engine",
                "postgres",
                "--repo",
                "file:///nonexistent/repo",
            ],
            "does not exist",
        ),
    ];
    for (args, needle) in cases {
        refused(&dbagent(&repo, None, args), needle);
        assert!(!target.exists(), "{args:?} created the target directory");
    }

    // A non-empty target directory is refused and left as it was.
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("precious"), "keep me").unwrap();
    refused(
        &dbagent(
            &repo,
            None,
            &["restore", "--latest", "--target-dir", target_s],
        ),
        "not empty",
    );
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(target.join("precious")).unwrap(),
        "keep me"
    );
    std::fs::remove_dir_all(&target).unwrap();

    // --dry-run prints the plan and writes nothing.
    let out = ok(&dbagent(
        &repo,
        None,
        &["restore", "--latest", "--dry-run", "--target-dir", target_s],
    ));
    assert!(out.contains("restore plan: base backup"), "{out}");
    let out = ok(&dbagent(
        &repo,
        None,
        &[
            "restore",
            "--latest",
            "--dry-run",
            "--json",
            "--target-dir",
            target_s,
        ],
    ));
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        plan["plan"]
            .as_str()
            .unwrap()
            .starts_with("restore plan: base backup"),
        "{out}"
    );
    assert!(plan["promoted"].is_null(), "{out}");
    assert!(!target.exists());

    // What starting the restored server needs is checked before anything is written: a
    // --port that is taken, no pg_ctl, a pg_ctl of another major version.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port().to_string();
    let latest = ["restore", "--latest", "--target-dir", target_s];
    let mut args = latest.to_vec();
    args.extend(["--port", &port]);
    refused(&dbagent(&repo, None, &args), "choose a free port");
    assert!(!target.exists());
    let bins = tempfile::tempdir().unwrap();
    let no_pg_ctl = dbagent_cmd(&repo, None, &latest)
        .env("DBAGENT_PG_BIN_DIR", bins.path())
        .output()
        .unwrap();
    refused(&no_pg_ctl, "pg_ctl not found");
    std::fs::write(
        bins.path().join("pg_ctl"),
        "#!/bin/sh\necho 'pg_ctl (PostgreSQL) 16.4'\n",
    )
    .unwrap();
    std::fs::set_permissions(
        bins.path().join("pg_ctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let other_major = dbagent_cmd(&repo, None, &latest)
        .env("DBAGENT_PG_BIN_DIR", bins.path())
        .output()
        .unwrap();
    refused(
        &other_major,
        "is PostgreSQL 16, but the backup is of PostgreSQL 15",
    );
    assert!(!target.exists());
    // Flags that would be ignored are refused: a --port the stopped restore never uses
    // (started later, the server takes the backup's port, production's on its host), an
    // empty --target-dir (an unset variable), the flags of a whole-server restore given to --dump.
    let mut args = latest.to_vec();
    args.extend(["--no-start", "--port", "5999"]);
    refused(
        &dbagent(&repo, None, &args),
        "with --no-start it is not started",
    );
    refused(
        &dbagent(&repo, None, &["restore", "--latest", "--target-dir", ""]),
        "a value is required for '--target-dir <DIR>'",
    );
    refused(
        &dbagent(
            &repo,
            None,
            &[
                "restore",
                "--latest",
                "--dump",
                "postgres",
                "--target-url",
                "postgresql://postgres@127.0.0.1:1/copy",
                "--target-dir",
                target_s,
            ],
        ),
        "--target-dir, --no-start and --port are for restoring a whole server",
    );
    assert!(!target.exists());
    // A usage mistake is one line too; `wal-fetch`'s is 126, which stops PostgreSQL's
    // recovery instead of reading as "not archived" (an older dbagent without --timeline).
    let mut args = latest.to_vec();
    args.extend(["--port", "70000"]);
    refused(&dbagent(&repo, None, &args), "70000");
    // A drill at a time the archive cannot reach is a mistake in the command: no report is
    // stored (nor alert sent), exit 1.
    refused(
        &dbagent(&repo, None, &["drill", "--at", "2001-01-01T00:00:00Z"]),
        "before the first backup",
    );
    let out = dbagent(
        &repo,
        None,
        &["wal-fetch", "--bogus", "00000001.history", "x"],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "{said}");
    assert!(said.starts_with("dbagent: error: "), "{said}");
    assert_eq!(repo.snapshot(), before, "refusals changed the repository");

    // A gap in the WAL: remove a segment in the middle of the chain.
    let wal_dir = std::fs::read_dir(repo.root().unwrap().join("pg"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 28)
        .collect();
    segs.sort();
    let victim = segs[segs.len() - 2].clone();
    let name = victim.file_name().unwrap().to_str().unwrap()[..24].to_string();
    std::fs::remove_file(&victim).unwrap();
    let before = repo.snapshot();
    refused(
        &dbagent(
            &repo,
            None,
            &["restore", "--latest", "--target-dir", target_s],
        ),
        &name,
    );
    refused(
        &dbagent(
            &repo,
            None,
            &[
                "restore",
                "--at",
                "2999-01-01T00:00:00Z",
                "--target-dir",
                target_s,
            ],
        ),
        "gap",
    );
    assert!(!target.exists());
    assert_eq!(repo.snapshot(), before);
}

#[test]
fn bad_settings_get_one_line() {
    let repo = Repo::file();
    let out = dbagent(&repo, None, &["list", "--repo", "ftp://x/y"]);
    refused(&out, "unsupported scheme");
    let out = dbagent(&repo, None, &["list", "--repo", "file://relative/path"]);
    refused(&out, "absolute path");
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["list", "--repo", "s3://bucket/prefix"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_ACCESS_KEY_ID_FILE")
        .env_remove("AWS_SECRET_ACCESS_KEY_FILE");
    refused(&cmd.output().unwrap(), "no S3 credentials");
    let out = dbagent(
        &repo,
        None,
        &["list", "--config", "/nonexistent/dbagent.toml"],
    );
    refused(&out, "cannot read config file");
    // A secret given where the path of its file belongs is refused without being shown.
    let said = refused(
        &dbagent_cmd(&repo, None, &["list"])
            .env("AWS_SECRET_ACCESS_KEY_FILE", "wJalrXUtnFEMI/K7MDENG")
            .output()
            .unwrap(),
        "a secret itself goes in AWS_SECRET_ACCESS_KEY",
    );
    assert!(!said.contains("wJalrXUtnFEMI"), "{said}");
    // A misspelled variable has no effect: dbagent says so, naming the one meant.
    let out = dbagent_cmd(&repo, None, &["list"])
        .env("DBAGENT_COMPRESION_LEVEL", "19")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("DBAGENT_COMPRESION_LEVEL is set but dbagent reads no such variable")
            && said.contains("did you mean DBAGENT_COMPRESSION_LEVEL?"),
        "{said}"
    );
}

/// A delta restore into the data directory of a running server is refused, touching nothing:
/// also from a PID namespace of its own, where the server's process cannot be seen, as from
/// a sidecar beside the database in a pod (`kubectl exec` into it), and whenever a
/// postmaster.pid is left.
#[test]
fn a_delta_restore_is_refused_while_a_postmaster_pid_is_there_even_from_a_sidecar() {
    let repo = Repo::file();
    let pg = backed_up_primary(&repo);
    let dir = pg.data_dir().to_str().unwrap().to_string();
    let args = [
        "restore",
        "--latest",
        "--delta",
        "--no-start",
        "--target-dir",
        &dir,
    ];
    let control = pg.data_dir().join("global/pg_control");
    let before = std::fs::read(&control).unwrap();

    let out = dbagent(&repo, None, &args);
    refused(
        &out,
        "is in use by a running server (postmaster.pid names process",
    );

    let cmd = dbagent_cmd(&repo, None, &args);
    let argv = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    let out = in_own_pid_namespace(&cmd, argv).output().unwrap();
    refused(
        &out,
        "is in use by a running server (the shared memory segment postmaster.pid names has",
    );

    assert!(
        std::fs::read(&control).unwrap() == before,
        "pg_control changed"
    );
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t").unwrap(), "1");

    // Stopped, but its postmaster.pid left behind (a crash, a pod killed at the end of its
    // grace period): refused too, since from another pod nothing else would show; once
    // the file is removed, the delta restore goes ahead.
    let pid_file = pg.data_dir().join("postmaster.pid");
    let left = std::fs::read_to_string(&pid_file).unwrap();
    let mut pg = pg;
    pg.stop().unwrap();
    // Naming a process that is surely gone (its segment went with the clean stop).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let (_, rest) = left.split_once('\n').unwrap();
    std::fs::write(&pid_file, format!("{}\n{rest}", gone.id())).unwrap();
    let before = std::fs::read(&control).unwrap();
    refused(
        &dbagent(&repo, None, &args),
        "has a postmaster.pid: a server may be running on it where this process cannot see it",
    );
    assert!(
        std::fs::read(&control).unwrap() == before,
        "pg_control changed"
    );
    std::fs::remove_file(&pid_file).unwrap();
    ok(&dbagent(&repo, None, &args));
}

/// A restore on production's host without --port: the restored server takes the backup's own
/// port, which production holds. Found only once everything is written; the error says how
/// to finish without writing it all again, and that works.
#[test]
fn a_restore_whose_port_is_taken_says_how_to_finish_it() {
    let repo = Repo::file();
    let pg = backed_up_primary(&repo);
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restored");
    let out = dbagent(
        &repo,
        None,
        &["restore", "--latest", "--target-dir", dir.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    eprintln!("{}", err.trim());
    assert!(err.contains("another server holds its port"), "{err}");
    assert!(err.contains("--delta --port"), "{err}");
    // As it says: the rerun checks the files, rewrites what differs, and finishes.
    let (out, restored) = restore(&repo, &dir, &["--latest", "--delta"]);
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "1");
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM t").unwrap(), "1");
}

/// A primary archiving into `repo` with one row in `t`, a base backup, and its WAL archived.
fn backed_up_primary(repo: &Repo) -> dbagent_testcontainers::Postgres {
    let pg = archiving_primary(repo);
    pg.psql("postgres", "CREATE TABLE t AS SELECT 1 AS i")
        .unwrap();
    ok(&dbagent(repo, Some(&pg), &["backup"]));
    switch_and_wait_archived(&pg);
    pg
}

/// A quiet archive: after the last commit the server wrote only checkpoints (no sidecar
/// heartbeat here), switched out into five segments without a transaction. A restore to a
/// time between the last commit and the last upload is refused up front, naming a latest
/// restorable time before the last commit, and the target directory is never made. Before,
/// only the last four segments' notes were read, the window ended at the last upload, and
/// the restore wrote the whole backup before PostgreSQL refused the target.
#[test]
fn a_target_past_the_last_commit_of_a_quiet_archive_is_refused_up_front() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (i int)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    let after_commit = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
    let mut target = String::new();
    for i in 0..6 {
        pg.psql("postgres", "CHECKPOINT").unwrap();
        switch_and_wait_archived(&pg);
        if i == 3 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
            target = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
    }

    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restore");
    let (out, _) = restore(&repo, &dir, &["--at", &target]);
    let err = refused(
        &out,
        "beyond the archived WAL: the latest restorable time is ",
    );
    let latest = err
        .trim()
        .rsplit("the latest restorable time is ")
        .next()
        .and_then(|rest| rest.split(';').next())
        .unwrap();
    let latest = dbagent::timespec::parse_instant(latest).unwrap();
    let after_commit = dbagent::timespec::parse_instant(&after_commit).unwrap();
    assert!(
        latest < after_commit,
        "{latest} names a time after the last commit: {err}"
    );
    assert!(!dir.exists(), "the refused restore made {}", dir.display());
}

/// A time target needs a transaction committed after it: PostgreSQL stops at the first one
/// stamped past the target and refuses to promote without one. With nothing committed since
/// the backup, even its own consistency point (the start of its restore window, as `list`
/// shows it) cannot be reached: refused up front, pointing at `--latest`, with the target
/// directory never made. Before, the plan took it, the whole backup was written and then
/// PostgreSQL refused the target.
#[test]
fn a_target_with_no_commit_after_the_backup_is_refused_up_front() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    // Nothing but this test may commit (an autovacuum ANALYZE would).
    pg.psql("postgres", "ALTER SYSTEM SET autovacuum = off")
        .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    pg.psql("postgres", "CREATE TABLE t (i int)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    pg.psql("postgres", "CHECKPOINT").unwrap();
    switch_and_wait_archived(&pg);
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["list", "--json"]))).unwrap();
    let stop = listing["postgres"][0]["backups"][0]["stop_time"]
        .as_str()
        .unwrap()
        .to_string();

    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restore");
    let (out, _) = restore(&repo, &dir, &["--at", &stop]);
    let err = refused(&out, "no transaction has committed since backup");
    assert!(err.contains("--latest"), "{err}");
    assert!(!dir.exists(), "the refused restore made {}", dir.display());

    // What --latest restores is there.
    let (out, restored) = restore(&repo, &dir, &["--latest"]);
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "0");
}
