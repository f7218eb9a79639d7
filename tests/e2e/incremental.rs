//! File-level backups read from the data directory: a full one, a chain of incrementals that
//! store only what changed, restores from the chain and `--delta`, and a damaged block that
//! `verify --full` and the restore both name.

use std::path::{Path, PathBuf};

use dbagent_testcontainers::{command_as_pg_user, free_port, pg_bin, pg_owned_tempdir};

use crate::support::*;

const ROWS: i64 = 200_000;

fn checksum(psql: impl Fn(&str) -> String) -> String {
    psql(
        "SELECT md5(string_agg(aid::text || ':' || abalance::text, ',' ORDER BY aid)) || ' ' || count(*) FROM accounts",
    )
}

fn backup_json(
    repo: &Repo,
    pg: &dbagent_testcontainers::Postgres,
    args: &[&str],
) -> serde_json::Value {
    let mut all = vec!["backup", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(&dbagent(repo, Some(pg), &all))).unwrap()
}

/// Every bundle object of backup `id` in a file repository.
fn bundles_of(root: &Path, id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in walk(root) {
        let s = entry.to_string_lossy();
        if s.contains(&format!("/backups/{id}/data/")) && s.ends_with(".bundle") {
            out.push(entry);
        }
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn restore(repo: &Repo, dir: &Path, extra: &[&str]) -> (std::process::Output, Restored) {
    let port = free_port();
    let mut args = vec!["restore", "--latest", "--target-dir", dir.to_str().unwrap()];
    let port_s = port.to_string();
    if !extra.contains(&"--no-start") {
        args.extend(["--port", &port_s]);
    }
    args.extend_from_slice(extra);
    let out = dbagent(repo, None, &args);
    (
        out,
        Restored {
            dir: dir.to_path_buf(),
            port,
        },
    )
}

/// An archiving primary with `accounts` loaded ({ROWS} rows) and vacuumed. No autovacuum on
/// the table: only a test's own changes touch its pages (a vacuum's hint bits and visibility
/// map changes are WAL-logged too, and an incremental would rightly read them).
fn primary_with_accounts(repo: &Repo) -> dbagent_testcontainers::Postgres {
    let pg = archiving_primary(repo);
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int, filler char(84)) WITH (autovacuum_enabled = off);
             INSERT INTO accounts SELECT g, 0, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        ),
    )
    .unwrap();
    pg.psql("postgres", "VACUUM ANALYZE accounts").unwrap();
    pg
}

#[test]
fn an_incremental_chain_restores_exactly_and_a_delta_restore_rewrites_only_what_differs() {
    let repo = Repo::file();
    let pg = primary_with_accounts(&repo);
    pg.psql("postgres", "CHECKPOINT").unwrap();
    // Every relation file modified within the second before the full backup, as after a fresh
    // initdb or a checkpoint that wrote every catalog: no file is trusted by its mtime, so the
    // first incremental must skip the unchanged ones by what the WAL names, short files
    // (most catalogs are under one 128 KiB block) as well as whole blocks.
    for dir in ["base", "global"] {
        for file in walk(&pg.data_dir().join(dir)) {
            let f = std::fs::File::options().write(true).open(&file).unwrap();
            f.set_modified(std::time::SystemTime::now()).unwrap();
        }
    }
    let full = backup_json(&repo, &pg, &["--full"]);
    assert_eq!(full["kind"], "full", "{full}");
    let full_stored = full["stored_bytes"].as_u64().unwrap();
    let table_bytes: u64 = pg
        .psql("postgres", "SELECT pg_relation_size('accounts')")
        .unwrap()
        .parse()
        .unwrap();

    // Refused with one line, nothing written: an incremental over the network, and a data
    // directory that is not the server's.
    // The server's archiver may still be pushing the full backup's history file, or the
    // summary of a segment it pushed (`walrefs/`, stored after the segment): neither is what
    // a refusal could write, so both are left out of the comparison.
    let backups = || {
        let mut snap = repo.snapshot();
        snap.retain(|path, _| {
            let path = path.to_string_lossy();
            !path.contains("/wal/") && !path.contains("/walrefs/")
        });
        snap
    };
    let before = backups();
    let mut cmd = dbagent_cmd(&repo, Some(&pg), &["backup", "--incremental"]);
    cmd.env("DBAGENT_BACKUP_METHOD", "stream");
    refused(
        &cmd.output().unwrap(),
        "incremental backups read the data directory",
    );
    let mut cmd = dbagent_cmd(&repo, Some(&pg), &["backup"]);
    cmd.env("DBAGENT_PG_DATA_DIR", "/tmp");
    refused(&cmd.output().unwrap(), "pg.data_dir = /tmp");
    assert_eq!(backups(), before);

    // Three incrementals, each after updating a contiguous 1% of the rows.
    let mut chain = vec![full["id"].as_str().unwrap().to_string()];
    for i in 0..3 {
        let (lo, hi) = (i * ROWS / 100 + 1, (i + 1) * ROWS / 100);
        pg.psql(
            "postgres",
            &format!(
                "UPDATE accounts SET abalance = abalance + {} WHERE aid BETWEEN {lo} AND {hi}",
                i + 1
            ),
        )
        .unwrap();
        pg.psql("postgres", "CHECKPOINT").unwrap();
        // The middle one compares every block instead (backup.changed_blocks = compare): a
        // chain mixes both, and restores exactly.
        let method = if i == 1 { "compare" } else { "wal" };
        let mut cmd = dbagent_cmd(&repo, Some(&pg), &["backup", "--json", "--incremental"]);
        cmd.env("DBAGENT_BACKUP_CHANGED_BLOCKS", method);
        let out = cmd.output().unwrap();
        let inc: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        // What the backup logged, in every message below: a failure says why.
        let said = format!("{inc}\n{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(inc["kind"], "incremental", "{said}");
        assert_eq!(inc["based_on"], chain.last().unwrap().as_str(), "{said}");
        assert_eq!(inc["changes_from"], method, "{said}");
        // Comparing every block reads the whole table (its mtime changed) and its index; the
        // WAL names a few of its blocks.
        let read = inc["read_bytes"].as_u64().unwrap();
        let expected = match method {
            "compare" => read >= table_bytes,
            _ => read * 2 < table_bytes,
        };
        assert!(
            expected,
            "incremental {i} ({method}) read {read} bytes of a {table_bytes}-byte table\n{said}"
        );
        let stored = inc["stored_bytes"].as_u64().unwrap();
        assert!(
            stored * 5 < full_stored,
            "incremental {i} stored {stored} bytes, the full one {full_stored}\n{said}"
        );
        chain.push(inc["id"].as_str().unwrap().to_string());
    }
    let want = checksum(|sql| pg.psql("postgres", sql).unwrap());
    switch_and_wait_archived(&pg);

    // `list` shows the chain; `verify --full` reads every block of it.
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["list", "--json"]))).unwrap();
    let backups = listing["postgres"][0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 4, "{listing}");
    let newest = backups
        .iter()
        .find(|b| b["id"] == chain[3].as_str())
        .unwrap();
    assert_eq!(newest["kind"], "incremental");
    assert_eq!(
        newest["chain"],
        serde_json::json!(chain[..3].to_vec()),
        "{listing}"
    );
    let text = ok(&dbagent(&repo, None, &["list"]));
    assert!(text.contains(&format!("on {}", chain[2])), "{text}");
    ok(&dbagent(&repo, None, &["verify", "--full"]));

    // Prune keeping one backup keeps the whole chain under it.
    let mut prune = dbagent_cmd(&repo, None, &["prune", "--json"]);
    prune
        .env("DBAGENT_RETENTION_KEEP_BACKUPS", "1")
        .env("DBAGENT_RETENTION_KEEP_DAYS", "0");
    let pruned = ok(&prune.output().unwrap());
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["list", "--json"]))).unwrap();
    assert_eq!(
        listing["postgres"][0]["backups"].as_array().unwrap().len(),
        4,
        "prune broke the chain: {pruned}"
    );
    // Once nothing may still be running, the WAL below the newest backup goes too: the
    // chain under it is kept for its files only. That is no problem for `verify`, and no
    // restore point for `--at` (before: `verify` failed on every base, daily in deploy/).
    let mut prune = dbagent_cmd(&repo, None, &["prune", "--json"]);
    prune
        .env("DBAGENT_RETENTION_KEEP_BACKUPS", "1")
        .env("DBAGENT_RETENTION_KEEP_DAYS", "0")
        .env("DBAGENT_RETENTION_INCOMPLETE_AFTER", "0s");
    let pruned: serde_json::Value = serde_json::from_str(&ok(&prune.output().unwrap())).unwrap();
    assert!(
        !pruned["clusters"][0]["plan"]["delete_wal"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{pruned}"
    );
    let verified = ok(&dbagent(&repo, None, &["verify"]));
    assert!(
        verified.contains(&format!(
            "kept for its files as the base of incremental {}",
            chain[1]
        )),
        "{verified}"
    );
    let listing: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["list", "--json"]))).unwrap();
    let backups = listing["postgres"][0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 4, "{listing}");
    let between = backups[2]["stop_time"].as_str().unwrap().to_string();
    let newest_stop = backups[3]["stop_time"].as_str().unwrap().to_string();
    let scratch = pg_owned_tempdir().unwrap();
    refused(
        &dbagent(
            &repo,
            None,
            &[
                "restore",
                "--at",
                &between,
                "--target-dir",
                scratch.path().join("early").to_str().unwrap(),
            ],
        ),
        &format!("the earliest restorable time is {}", &newest_stop[..19]),
    );

    // A restore from the three-deep chain is exact.
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restored");
    let (out, restored) = restore(&repo, &dir, &[]);
    ok(&out);
    assert_eq!(checksum(|sql| restored.psql(sql)), want);
    drop(restored);

    // --delta into that directory: a damaged relation page and a stray file are put right,
    // and the rest is left in place.
    let rel = pg
        .psql("postgres", "SELECT pg_relation_filepath('accounts')")
        .unwrap();
    let relfile = dir.join(&rel);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&relfile)
            .unwrap();
        f.write_all_at(&[0xAB; 8192], 8192 * 10).unwrap();
    }
    std::fs::write(dir.join("base").join("stray-file"), b"not in the backup").unwrap();
    let (out, restored) = restore(&repo, &dir, &["--delta"]);
    ok(&out);
    assert_eq!(checksum(|sql| restored.psql(sql)), want);
    assert!(!dir.join("base").join("stray-file").exists());
    drop(restored);

    // --delta refuses a directory of another cluster, touching nothing.
    let mut other = dbagent_testcontainers::PostgresBuilder::new()
        .start()
        .unwrap();
    other.stop().unwrap();
    let other_dir = other.data_dir().to_path_buf();
    let before = std::fs::read(other_dir.join("global/pg_control")).ok();
    let (out, _r) = restore(&repo, &other_dir, &["--delta"]);
    refused(
        &out,
        "--delta restores only into a data directory of the same cluster",
    );
    assert_eq!(
        std::fs::read(other_dir.join("global/pg_control")).ok(),
        before
    );

    // A damaged byte in the newest incremental's bundle: verify names the backup, and a
    // restore fails naming it instead of handing PostgreSQL bad data.
    let root = repo.root().unwrap();
    let bundle = bundles_of(root, &chain[3])
        .pop()
        .expect("a bundle of the newest incremental");
    let mut bytes = std::fs::read(&bundle).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&bundle, &bytes).unwrap();
    let out = dbagent(&repo, None, &["verify", "--full"]);
    assert!(!out.status.success());
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&chain[3]), "{said}");
    let dir2 = scratch.path().join("from-damaged");
    let (out, _r) = restore(&repo, &dir2, &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&chain[3]) && stderr.contains("corrupt"),
        "{stderr}"
    );
    assert!(!dir2.join("global/pg_control").exists());
}

/// What a restore must reproduce: the tables whose blocks the WAL does not name one by one.
fn contents(psql: impl Fn(&str, &str) -> String) -> Vec<String> {
    vec![
        psql(
            "postgres",
            "SELECT md5(string_agg(aid::text || ':' || abalance::text || filler, ',' ORDER BY aid)) || ' ' || count(*) FROM accounts",
        ),
        psql(
            "postgres",
            "SELECT md5(string_agg(id::text || v, ',' ORDER BY id)) || ' ' || count(*) FROM other",
        ),
        psql(
            "reused",
            "SELECT md5(string_agg(id::text, ',' ORDER BY id)) || ' ' || count(*) FROM t",
        ),
        psql(
            "reused",
            "SELECT md5(string_agg(relname, ',' ORDER BY relname)) || ' ' || count(*) FROM pg_class",
        ),
    ]
}

#[test]
fn wal_named_blocks_under_a_writer_and_an_archive_gap_restore_exactly() {
    let repo = Repo::file();
    let pg = primary_with_accounts(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE other AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g",
    )
    .unwrap();
    // Two databases with different catalogs, large enough to span several backup blocks.
    for (db, prefix, rows) in [("tmpl", "b", 20000), ("reused", "a", 5000)] {
        pg.psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
        pg.psql(
            db,
            &format!(
                "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, {rows}) g;
                 DO $$ BEGIN FOR i IN 1..300 LOOP EXECUTE format('CREATE TABLE {prefix}%s (x int)', i); END LOOP; END $$;"
            ),
        )
        .unwrap();
    }
    let reused_oid = pg
        .psql(
            "postgres",
            "SELECT oid FROM pg_database WHERE datname = 'reused'",
        )
        .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let full = backup_json(&repo, &pg, &["--full"]);
    let table_bytes: u64 = pg
        .psql("postgres", "SELECT pg_relation_size('accounts')")
        .unwrap()
        .parse()
        .unwrap();

    // Changes whose blocks have no reference of their own in the WAL: the table's tail
    // deleted and vacuumed away (the file truncated) and refilled; a table truncated (a new
    // file) and refilled; a database dropped and created again, under the same OID, by copying
    // another's files (its catalogs' paths are the old ones'). And a 1% update. (VACUUM truncates
    // only when at least a 16th of the table is free at its end.)
    pg.psql(
        "postgres",
        &format!("DELETE FROM accounts WHERE aid > {}", ROWS - ROWS / 10),
    )
    .unwrap();
    pg.psql(
        "postgres",
        "VACUUM (INDEX_CLEANUP on, TRUNCATE on) accounts",
    )
    .unwrap();
    let shrunk: u64 = pg
        .psql("postgres", "SELECT pg_relation_size('accounts')")
        .unwrap()
        .parse()
        .unwrap();
    assert!(shrunk < table_bytes, "VACUUM did not truncate the table");
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO accounts SELECT g, 7, md5(g::text) FROM generate_series({}, {}) g;
             TRUNCATE other;
             INSERT INTO other SELECT g, 'x' || g FROM generate_series(1, 1000) g;
             UPDATE accounts SET abalance = 1 WHERE aid BETWEEN 1000 AND {};",
            ROWS - ROWS / 10 + 1,
            ROWS - ROWS / 20,
            1000 + ROWS / 100
        ),
    )
    .unwrap();
    pg.psql("postgres", "DROP DATABASE reused").unwrap();
    pg.psql(
        "postgres",
        &format!("CREATE DATABASE reused OID = {reused_oid} TEMPLATE tmpl STRATEGY FILE_COPY"),
    )
    .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    // A writer keeps updating rows all over the table while the incremental runs: blocks it
    // changes after the backup's start are not in the WAL the backup reads, so they come from
    // the base, and the restore's replay must put them right.
    let writing = std::sync::atomic::AtomicBool::new(true);
    let (out, updates) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u32;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                pg.psql(
                    "postgres",
                    &format!(
                        "UPDATE accounts SET abalance = abalance + 1 WHERE aid % 499 = {}",
                        n % 499
                    ),
                )
                .unwrap();
                n += 1;
            }
            n
        });
        let out = dbagent(&repo, Some(&pg), &["backup", "--json", "--incremental"]);
        writing.store(false, std::sync::atomic::Ordering::Relaxed);
        (out, writer.join().unwrap())
    });
    assert!(updates > 0, "the writer never ran during the backup");
    let inc: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(inc["based_on"], full["id"], "{inc}");
    assert_eq!(
        inc["changes_from"],
        "wal",
        "{inc}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = contents(|db, sql| pg.psql(db, sql).unwrap());
    switch_and_wait_archived(&pg);

    let scratch = pg_owned_tempdir().unwrap();
    let (out, restored) = restore(&repo, &scratch.path().join("wal-method"), &[]);
    ok(&out);
    assert_eq!(contents(|db, sql| restored.psql_db(db, sql)), want);
    drop(restored);

    // The segment where the last backup started, out of pg_wal and its archived copy gone,
    // but its block references (stored by wal-push beside it) still there: the next
    // incremental reads those, and restores exactly.
    let sysid = inc["system_identifier"].as_str().unwrap().to_string();
    let root = repo.root().unwrap().to_path_buf();
    let start_segment_archived_only = |backup: &serde_json::Value| -> String {
        pg.psql("postgres", "CHECKPOINT").unwrap();
        switch_and_wait_archived(&pg);
        pg.psql("postgres", "CHECKPOINT").unwrap();
        let seg = backup["start_wal"].as_str().unwrap().to_string();
        assert!(
            !pg.data_dir().join("pg_wal").join(&seg).exists(),
            "{seg} is still in pg_wal after two checkpoints"
        );
        seg
    };
    let seg = start_segment_archived_only(&inc);
    std::fs::remove_file(root.join(format!("pg/{sysid}/wal/{seg}.zst"))).unwrap();
    assert!(root.join(format!("pg/{sysid}/walrefs/{seg}.zst")).exists());
    pg.psql(
        "postgres",
        "UPDATE accounts SET abalance = 2 WHERE aid BETWEEN 5000 AND 5999",
    )
    .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let out = dbagent(&repo, Some(&pg), &["backup", "--incremental", "--json"]);
    let summarized: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(summarized["changes_from"], "wal", "{summarized}\n{stderr}");
    let summaries: u32 = stderr
        .split("summarized_segments=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summarized_segments in the log: {stderr}"));
    assert!(summaries >= 1, "the summary was not read: {stderr}");
    let want = contents(|db, sql| pg.psql(db, sql).unwrap());
    switch_and_wait_archived(&pg);
    let (out, restored) = restore(&repo, &scratch.path().join("summarized"), &[]);
    ok(&out);
    assert_eq!(contents(|db, sql| restored.psql_db(db, sql)), want);
    drop(restored);

    // A gap where the WAL since the base was (gone from pg_wal, from the archive, and its
    // block references too): the next incremental reads and compares every block of the
    // changed files, and says so.
    let gap = start_segment_archived_only(&summarized);
    std::fs::remove_file(root.join(format!("pg/{sysid}/wal/{gap}.zst"))).unwrap();
    std::fs::remove_file(root.join(format!("pg/{sysid}/walrefs/{gap}.zst"))).unwrap();
    pg.psql(
        "postgres",
        "UPDATE accounts SET abalance = 3 WHERE aid BETWEEN 7000 AND 7999",
    )
    .unwrap();
    pg.psql("postgres", "CHECKPOINT").unwrap();
    let out = dbagent(&repo, Some(&pg), &["backup", "--incremental", "--json"]);
    let next: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(next["changes_from"], "compare", "{next}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the changed blocks from the WAL") && stderr.contains(&gap),
        "{stderr}"
    );
    let want = contents(|db, sql| pg.psql(db, sql).unwrap());
    switch_and_wait_archived(&pg);
    let (out, restored) = restore(&repo, &scratch.path().join("compared"), &[]);
    ok(&out);
    assert_eq!(contents(|db, sql| restored.psql_db(db, sql)), want);
}

/// Polls `check` every 250 ms for up to `limit`.
fn wait_for(limit: std::time::Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn a_standby_restore_follows_the_archive_and_a_delta_reseed_keeps_pointing_at_its_primary() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE t (i int); INSERT INTO t VALUES (1)",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("standby");

    // A standby takes no target: refused with one line, nothing written.
    let out = dbagent(
        &repo,
        None,
        &[
            "restore",
            "--at",
            "2026-01-01 00:00:00",
            "--standby",
            "--target-dir",
            dir.to_str().unwrap(),
        ],
    );
    refused(&out, "--standby follows the archive to its end");
    assert!(!dir.exists());

    // Restored as a standby: standby.signal, running in recovery, fed from the archive.
    let (out, standby) = restore(&repo, &dir, &["--standby"]);
    let text = ok(&out);
    assert!(text.contains("running as a standby"), "{text}");
    assert!(dir.join("standby.signal").exists());
    assert!(!dir.join("recovery.signal").exists());
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    pg.psql("postgres", "INSERT INTO t VALUES (2)").unwrap();
    switch_and_wait_archived(&pg);
    wait_for(
        std::time::Duration::from_secs(60),
        "the standby replays the archived row",
        || standby.psql("SELECT count(*) FROM t") == "2",
    );
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    let port = standby.port;
    drop(standby); // stopped

    // The replica points at its primary in its own postgresql.auto.conf (as pg_basebackup -R
    // writes it), has drifted (a stray file), and is re-seeded in place from a newer backup.
    let auto = dir.join("postgresql.auto.conf");
    let conninfo = format!(
        "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=reseeded'",
        pg.port()
    );
    let mut text = std::fs::read_to_string(&auto).unwrap();
    text.push_str(&format!("{conninfo}\n"));
    std::fs::write(&auto, text).unwrap();
    std::fs::write(dir.join("base").join("stray"), "not in any backup").unwrap();
    pg.psql("postgres", "INSERT INTO t VALUES (3)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let (out, _not_started) = restore(&repo, &dir, &["--delta", "--standby", "--no-start"]);
    let text = ok(&out);
    assert!(text.contains("stays a standby"), "{text}");
    assert!(!dir.join("base").join("stray").exists());
    assert!(dir.join("standby.signal").exists());
    assert!(!dir.join("recovery.signal").exists());
    let auto_text = std::fs::read_to_string(&auto).unwrap();
    assert!(auto_text.contains(&conninfo), "{auto_text}");
    assert!(auto_text.contains("restore_command"), "{auto_text}");
    assert!(!auto_text.contains("archive_mode = off"), "{auto_text}");

    // Started, it streams from the primary: a row that is in no archived segment arrives.
    let started = command_as_pg_user(pg_bin("pg_ctl").unwrap())
        .arg("-D")
        .arg(&dir)
        .arg("-l")
        .arg(dir.join("dbagent-restore.log"))
        .args(["-o", &format!("-p {port}"), "-w", "start"])
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let standby = Restored {
        dir: dir.clone(),
        port,
    };
    wait_for(
        std::time::Duration::from_secs(60),
        "the re-seeded standby reaches the new backup's row",
        || standby.psql("SELECT count(*) FROM t") == "3",
    );
    pg.psql("postgres", "INSERT INTO t VALUES (4)").unwrap();
    wait_for(
        std::time::Duration::from_secs(30),
        "the re-seeded standby streams a row that was never archived",
        || standby.psql("SELECT count(*) FROM t") == "4",
    );
    assert_eq!(
        standby.psql("SELECT status FROM pg_stat_wal_receiver"),
        "streaming"
    );
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
}

/// Just after a promotion the server's last checkpoint is still on the old timeline (the
/// promoted server's first checkpoint is spread out), while its WAL is on the new one. An
/// incremental taken then must not build on a backup of the old timeline, whose WAL (here the
/// old primary's, still archiving into the same repository) is not this server's history: it
/// is taken whole, on the new timeline, and restores exactly.
#[test]
fn an_incremental_just_after_a_promotion_builds_on_nothing_of_the_old_timeline() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (i int, pad text)")
        .unwrap();
    let base = backup_json(&repo, &pg, &["--full"]);
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("standby");
    let (out, standby) = restore(&repo, &dir, &["--standby"]);
    ok(&out);
    // No restartpoint on the standby, and a promoted server's first checkpoint spread over
    // most of an hour: the buffers the standby dirties while replaying keep it busy.
    standby.psql("ALTER SYSTEM SET checkpoint_timeout = '1h'");
    standby.psql("SELECT pg_reload_conf()");
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 100000) g",
    )
    .unwrap();
    switch_and_wait_archived(&pg);
    wait_for(
        std::time::Duration::from_secs(120),
        "the standby replays the rows",
        || standby.psql("SELECT count(*) FROM t") == "100000",
    );
    assert_eq!(standby.psql("SELECT pg_promote()"), "t");
    assert_eq!(
        standby.psql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "1",
        "the promoted server's first checkpoint ended already: this test needs it running"
    );
    standby.psql("INSERT INTO t VALUES (-1, 'after the promotion')");
    // The old primary goes on writing and archiving on timeline 1.
    pg.psql("postgres", "INSERT INTO t VALUES (-2, 'old primary')")
        .unwrap();
    switch_and_wait_archived(&pg);

    let out = dbagent_cmd(&repo, None, &["backup", "--incremental", "--json"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", standby.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .env("PGDATA", &dir)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["kind"], "full", "{report}");
    assert_eq!(report["timeline"], 2, "{report}");
    assert_ne!(report["id"], base["id"]);
    let expected = standby.psql("SELECT count(*), sum(i) FROM t");
    drop(standby);

    let restored_dir = scratch.path().join("restored");
    // Both branches go on being archived: the restore is told which one.
    let (out, restored) = restore(&repo, &restored_dir, &["--timeline", "2"]);
    ok(&out);
    assert_eq!(restored.psql("SELECT count(*), sum(i) FROM t"), expected);
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE i = -2"),
        "0",
        "the old primary's row is not this history's"
    );
}

/// `pg_checksums --enable`, run while the server is down, rewrites every page without WAL: an
/// incremental after it cannot take its unchanged blocks from the base (their pages have no
/// checksum, the restored control file says they must). The shutdown checkpoint in the WAL
/// since the base makes it compare blocks instead, and the restore reads every row.
#[test]
fn an_incremental_after_pg_checksums_enable_compares_blocks_and_restores_readable_pages() {
    let repo = Repo::file();
    let mut pg = primary_with_accounts(&repo);
    assert_eq!(pg.psql("postgres", "SHOW data_checksums").unwrap(), "off");
    backup_json(&repo, &pg, &["--full"]);
    pg.stop().unwrap();
    let enabled = command_as_pg_user(pg_bin("pg_checksums").unwrap())
        .args(["--enable", "-D"])
        .arg(pg.data_dir())
        .output()
        .unwrap();
    assert!(enabled.status.success(), "{enabled:?}");
    pg.restart().unwrap();
    pg.psql("postgres", "UPDATE accounts SET abalance = 7 WHERE aid = 1")
        .unwrap();
    let expected = checksum(|q| pg.psql("postgres", q).unwrap());

    let out = dbagent(&repo, Some(&pg), &["backup", "--incremental", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["kind"], "incremental", "{report}");
    assert_eq!(report["changes_from"], "compare", "{report}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was shut down since the base"), "{err}");

    let scratch = pg_owned_tempdir().unwrap();
    let (out, restored) = restore(&repo, &scratch.path().join("restored"), &[]);
    ok(&out);
    assert_eq!(restored.psql("SHOW data_checksums"), "on");
    assert_eq!(checksum(|q| restored.psql(q)), expected);
}

/// An unlogged table's rows are in no backup (PostgreSQL empties the table at the end of any
/// recovery, from its init fork): its main fork is not stored, as PostgreSQL's own base
/// backup leaves it out, and the restored table is there, empty and writable.
#[test]
fn an_unlogged_table_is_restored_empty_and_its_rows_are_not_stored() {
    let repo = Repo::file();
    let pg = primary_with_accounts(&repo);
    let before = backup_json(&repo, &pg, &["--full"]);
    pg.psql(
        "postgres",
        "CREATE UNLOGGED TABLE cache (k int PRIMARY KEY, v text);
         INSERT INTO cache SELECT g, md5(g::text) || md5((g * 3)::text) FROM generate_series(1, 200000) g;
         CHECKPOINT",
    )
    .unwrap();
    let size: u64 = pg
        .psql("postgres", "SELECT pg_relation_size('cache')")
        .unwrap()
        .parse()
        .unwrap();
    assert!(size > 10 << 20, "{size}");
    let full = backup_json(&repo, &pg, &["--full"]);
    let grew = full["plain_bytes"].as_u64().unwrap() - before["plain_bytes"].as_u64().unwrap();
    // The new table's primary key index is unlogged too: neither is stored.
    assert!(
        grew < 2 << 20,
        "the backup grew by {grew} bytes with a {size}-byte unlogged table"
    );
    let expected = checksum(|q| pg.psql("postgres", q).unwrap());

    let scratch = pg_owned_tempdir().unwrap();
    let (out, restored) = restore(&repo, &scratch.path().join("restored"), &[]);
    ok(&out);
    assert_eq!(checksum(|q| restored.psql(q)), expected);
    assert_eq!(restored.psql("SELECT count(*) FROM cache"), "0");
    restored.psql("INSERT INTO cache VALUES (1, 'written after the restore')");
    assert_eq!(
        restored.psql("SELECT v FROM cache WHERE k = 1"),
        "written after the restore"
    );
}
