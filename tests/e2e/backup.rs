//! Base backups: a killed backup leaves nothing that looks like a backup; a server that does
//! not archive is refused before anything is read; one with other tablespaces is refused
//! before anything is stored.

use std::time::{Duration, Instant};

use dbagent_testcontainers::{PostgresBuilder, command_as_pg_user, http_request, pg_owned_tempdir};

use crate::support::*;

/// `method`: `files` (read from the data directory) or `stream` (over the network).
fn kill_mid_upload(repo: Repo, method: &str, in_progress: impl Fn(&Repo) -> bool) {
    let pg = archiving_primary(&repo);
    // About 300 MB of poorly compressible rows, so the backup takes a while.
    pg.psql(
        "postgres",
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS v FROM generate_series(1, 2500000) g",
    )
    .unwrap();
    let mut cmd = command_as_pg_user(BIN);
    cmd.arg("backup")
        .env("DBAGENT_UPLOAD_PART_SIZE", "5MiB")
        .env("DBAGENT_COMPRESSION_THREADS", "1")
        .env("DBAGENT_BACKUP_PARALLEL", "1")
        .env("DBAGENT_BACKUP_METHOD", method);
    for (k, v) in repo.env().into_iter().chain(pg.env()) {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !in_progress(&repo) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "backup finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "backup never got under way");
        std::thread::sleep(Duration::from_millis(50));
    }
    // runuser forwards SIGKILL? No: kill the whole process group of the child.
    kill_tree(child.id());
    let _ = child.wait();
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let backups = json["postgres"][0]["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(backups.is_empty(), "a killed backup is listed: {listing}");
    assert!(
        json["postgres"][0]["restorable"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{listing}"
    );
}

/// SIGKILL a process and all its descendants (runuser → dbagent).
fn kill_tree(pid: u32) {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        if let Ok(children) =
            std::fs::read_to_string(format!("/proc/{}/task/{}/children", pids[i], pids[i]))
        {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for p in pids.iter().rev() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
}

#[test]
fn killed_backup_is_not_listed_file_repository() {
    kill_mid_upload(Repo::file(), "files", |repo| {
        // A hidden temp file under backups/ bigger than one part: the upload is under way.
        repo.snapshot().iter().any(|(p, size)| {
            p.to_string_lossy().contains("/backups/")
                && p.to_string_lossy().contains(".dbagent-tmp-")
                && *size > 5 << 20
        })
    });
}

#[test]
fn killed_backup_is_not_listed_s3() {
    // Kill once the server reports a multipart upload of the backup data in progress.
    kill_mid_upload(Repo::s3("kill"), "stream", |repo| {
        let Repo::S3(server, _) = repo else {
            unreachable!()
        };
        let (_, body) = http_request(
            server.port(),
            "GET",
            &format!("/{}?uploads", server.bucket()),
        )
        .unwrap();
        body.contains("base.tar.zst</Key>")
    });
}

#[test]
fn backup_refuses_a_server_without_archiving() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new().start().unwrap();
    let out = dbagent(&repo, Some(&pg), &["backup"]);
    refused(&out, "archive_mode");
    let out = dbagent(
        &repo,
        Some(&pg),
        &["backup", "--kind", "dump", "--incremental"],
    );
    refused(
        &out,
        "--full and --incremental are for PostgreSQL base backups",
    );
    assert!(repo.snapshot().is_empty());
}

/// A base backup's manifest describes every database for the drill (its size, its tables' row
/// estimates, its extensions and settings), read while the backup runs, its own session's
/// database on that session and each other on a connection of its own: by either method, and
/// one database the backup's role cannot connect to still gets its size and settings.
#[test]
fn a_base_backup_describes_every_database() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE DATABASE shop").unwrap();
    pg.psql("postgres", "CREATE DATABASE locked").unwrap();
    pg.psql(
        "shop",
        "CREATE EXTENSION pg_trgm; CREATE TABLE items AS SELECT g FROM generate_series(1, 5000) g; ANALYZE items",
    )
    .unwrap();
    pg.psql("postgres", "ALTER DATABASE shop SET work_mem = '8MB'")
        .unwrap();
    // The backup's own session is on `postgres`: that one is described on the session.
    pg.psql("postgres", "ALTER DATABASE postgres SET work_mem = '6MB'")
        .unwrap();
    // The backup's role may connect to the cluster but not to `locked`.
    let hba = pg.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("local locked all reject\nhost locked all all reject\n{rules}"),
    )
    .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let sizes = pg
        .psql(
            "postgres",
            "SELECT string_agg(datname || '=' || pg_database_size(oid), ',' ORDER BY datname) FROM pg_database WHERE datallowconn AND NOT datistemplate",
        )
        .unwrap();
    for method in ["files", "stream"] {
        let out = dbagent_cmd(&repo, Some(&pg), &["backup", "--full", "--json"])
            .env("DBAGENT_BACKUP_METHOD", method)
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        let path = repo.root().unwrap().join(format!(
            "pg/{}/backups/{}/backup.json",
            report["system_identifier"].as_str().unwrap(),
            report["id"].as_str().unwrap()
        ));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let dbs = manifest["databases"].as_array().unwrap();
        let got: Vec<String> = dbs
            .iter()
            .map(|d| format!("{}={}", d["name"].as_str().unwrap(), d["size_bytes"]))
            .collect();
        // Sizes move by a page or so between the two reads; the names and magnitudes do not.
        let names = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|s| s.split('=').next().unwrap().to_string())
                .collect()
        };
        let expected: Vec<String> = sizes.trim().split(',').map(str::to_string).collect();
        assert_eq!(
            names(&got),
            names(&expected),
            "{method}: {got:?} vs {expected:?}"
        );
        for (g, e) in got.iter().zip(&expected) {
            let size = |s: &str| s.split('=').nth(1).unwrap().parse::<i64>().unwrap();
            assert!(
                (size(g) - size(e)).abs() < 1 << 20,
                "{method}: size {g} vs the server's {e}"
            );
        }
        let shop = dbs.iter().find(|d| d["name"] == "shop").unwrap();
        assert!(
            shop["tables"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["table"] == "public.items" && t["rows_estimate"] == 5000),
            "{method}: {shop}"
        );
        // "name version" in the manifest.
        let has_extension = |db: &serde_json::Value, name: &str| {
            db["extensions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e.as_str().unwrap().starts_with(&format!("{name} ")))
        };
        assert!(has_extension(shop, "pg_trgm"), "{method}: {shop}");
        assert_eq!(
            shop["settings"],
            serde_json::json!(["work_mem=8MB"]),
            "{method}"
        );
        let own = dbs.iter().find(|d| d["name"] == "postgres").unwrap();
        assert_eq!(
            own["settings"],
            serde_json::json!(["work_mem=6MB"]),
            "{method}"
        );
        assert!(has_extension(own, "plpgsql"), "{method}: {own}");
        let locked = dbs.iter().find(|d| d["name"] == "locked").unwrap();
        assert!(
            locked["tables"].as_array().unwrap().is_empty(),
            "{method}: {locked}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no row estimates"), "{method}: {err}");
    }
}

/// The backup is one tar of the data directory, as `pg_basebackup -D -` writes it, and that
/// cannot hold another tablespace: the refusal names it, and no backup object is left.
#[test]
fn backup_refuses_a_server_with_other_tablespaces() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    let ts = pg_owned_tempdir().unwrap();
    let location = ts.path().display().to_string();
    pg.psql(
        "postgres",
        &format!("CREATE TABLESPACE elsewhere LOCATION '{location}'"),
    )
    .unwrap();
    let stream = || {
        dbagent_cmd(&repo, Some(&pg), &["backup"])
            .env("DBAGENT_BACKUP_METHOD", "stream")
            .output()
            .unwrap()
    };
    let out = stream();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("dbagent: error: "));
    assert!(
        line.is_some_and(|l| l.contains("tablespace") && l.contains(&location)),
        "{err}"
    );
    let backups: Vec<_> = repo
        .snapshot()
        .into_keys()
        .filter(|k| k.to_string_lossy().contains("/backups/"))
        .collect();
    assert!(backups.is_empty(), "{backups:?}");
    // Without it, the same server backs up.
    pg.psql("postgres", "DROP TABLESPACE elsewhere").unwrap();
    ok(&stream());
}

#[test]
fn prune_keeps_what_restores_need() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (i int)").unwrap();
    for round in 0..3 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({round})"))
            .unwrap();
        switch_and_wait_archived(&pg);
        ok(&dbagent(&repo, Some(&pg), &["backup"]));
        // Backup ids are per second.
        std::thread::sleep(Duration::from_millis(1100));
    }
    pg.psql("postgres", "INSERT INTO t VALUES (99)").unwrap();
    switch_and_wait_archived(&pg);
    pg.stop().unwrap();
    // No backup is running: none is kept for one.
    let env = [
        ("DBAGENT_RETENTION_KEEP_DAYS", "0"),
        ("DBAGENT_RETENTION_KEEP_BACKUPS", "1"),
        ("DBAGENT_RETENTION_INCOMPLETE_AFTER", "0s"),
    ];
    let run = |args: &[&str]| {
        let mut cmd = dbagent_cmd(&repo, None, args);
        cmd.envs(env);
        cmd.output().unwrap()
    };

    // The dry run prints the plan and deletes nothing.
    let before = repo.snapshot();
    let plan = ok(&run(&["prune", "--dry-run"]));
    assert_eq!(plan.matches("delete backup").count(), 2, "{plan}");
    assert_eq!(plan.matches("keep   backup").count(), 1, "{plan}");
    assert!(plan.contains("WAL object(s): segments before"), "{plan}");
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&run(&["prune", "--dry-run", "--json"]))).unwrap();
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(
        plan["clusters"][0]["plan"]["delete_backups"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        plan["clusters"][0]["plan"]["keep"][0]["why"],
        "among the newest"
    );
    assert!(plan["clusters"][0]["deleted"].is_null(), "{plan}");
    assert_eq!(repo.snapshot(), before);

    let pruned: serde_json::Value = serde_json::from_str(&ok(&run(&["prune", "--json"]))).unwrap();
    assert!(
        pruned["clusters"][0]["deleted"].as_u64().unwrap() > 0,
        "{pruned}"
    );
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        json["postgres"][0]["backups"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    assert!(repo.snapshot().len() < before.len());
    // Pruning again finds nothing more to do.
    let again = ok(&run(&["prune", "--dry-run"]));
    assert!(
        !again.contains("delete backup") && again.contains("delete no WAL"),
        "{again}"
    );

    // What is left still restores everything.
    let scratch = dbagent_testcontainers::pg_owned_tempdir().unwrap();
    let (out, restored) = restore(&repo, &scratch.path().join("restored"), &["--latest"]);
    ok(&out);
    assert_eq!(
        restored.psql("SELECT string_agg(i::text, ',' ORDER BY i) FROM t"),
        "0,1,2,99"
    );
}

#[test]
fn verify_proves_integrity_and_finds_damage() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g",
    )
    .unwrap();
    let backup: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, Some(&pg), &["backup", "--json"]))).unwrap();
    assert!(backup["plain_bytes"].as_u64().unwrap() > 0, "{backup}");
    assert!(backup["stop_wal"].as_str().unwrap().len() == 24, "{backup}");
    for _ in 0..3 {
        pg.psql(
            "postgres",
            "INSERT INTO t SELECT g FROM generate_series(1, 1000) g",
        )
        .unwrap();
        switch_and_wait_archived(&pg);
    }
    pg.stop().unwrap();
    let out = ok(&dbagent(&repo, None, &["verify", "--full"]));
    assert!(
        out.contains("every byte decompressed") && !out.contains("PROBLEM"),
        "{out}"
    );

    let wal = std::fs::read_dir(repo.root().unwrap().join("pg"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("wal");
    let mut segs: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().len() == 28)
        .collect();
    segs.sort();
    // Flip a byte inside the compressed data: only a full read can notice.
    let flipped = segs[segs.len() - 1].clone();
    let mut bytes = std::fs::read(&flipped).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0xFF;
    std::fs::write(&flipped, &bytes).unwrap();
    ok(&dbagent(&repo, None, &["verify"]));
    let out = dbagent(&repo, None, &["verify", "--full"]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("PROBLEM")
            && stdout.contains(flipped.file_name().unwrap().to_str().unwrap()),
        "{stdout}"
    );
    // A missing segment in the middle of the chain is a problem even without --full.
    std::fs::remove_file(&segs[segs.len() - 2]).unwrap();
    let out = dbagent(&repo, None, &["verify"]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("is missing"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("verify found"));
    // The same for scripts: the report first, then exit 2.
    let out = dbagent(&repo, None, &["verify", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = report["clusters"][0]["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p.as_str().unwrap().contains("is missing")),
        "{report}"
    );
}

/// A file-level backup stores the WAL from the start of the segment it stops in up to its
/// stop point itself, so it restores to that point even when the archive never gets that
/// segment. Here archive_command stored it and it is then deleted by hand, as a lost or
/// never-finished upload would leave the archive.
#[test]
fn a_backup_restores_without_the_archived_stop_segment() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE kept AS SELECT g AS id, '備份 백업 バックアップ ' || g AS note FROM generate_series(1, 1000) g",
    )
    .unwrap();
    let out = ok(&dbagent_cmd(&repo, Some(&pg), &["backup", "--json"])
        .env("DBAGENT_BACKUP_METHOD", "files")
        .output()
        .unwrap());
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (sysid, stop) = (
        report["system_identifier"].as_str().unwrap().to_string(),
        report["stop_wal"].as_str().unwrap().to_string(),
    );
    wait_archived(&pg, &stop);
    pg.stop().unwrap();

    let wal = repo.root().unwrap().join(format!("pg/{sysid}/wal"));
    let whole = wal.join(format!("{stop}.zst"));
    std::fs::remove_file(&whole)
        .unwrap_or_else(|e| panic!("archive_command stored {}: {e}", whole.display()));
    let pieces: Vec<String> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&stop) && n.ends_with(".part.zst"))
        .collect();
    assert_eq!(pieces.len(), 1, "the backup's piece of {stop}: {pieces:?}");

    ok(&dbagent(&repo, None, &["verify"]));
    let scratch = dbagent_testcontainers::pg_owned_tempdir().unwrap();
    let (out, restored) = restore(&repo, &scratch.path().join("restored"), &["--latest"]);
    ok(&out);
    assert_eq!(
        restored.psql("SELECT count(*), min(note) FROM kept"),
        "1000|備份 백업 バックアップ 1"
    );
}
