//! The whole PostgreSQL loop: archive, back up, keep writing, lose the primary, restore to a
//! moment between two markers, and to the latest archived WAL.

use std::time::{Duration, Instant};

use dbagent_testcontainers::{free_port, pg_owned_tempdir};

use crate::support::*;

/// How long writes go on after the backup. The issue asks for "several minutes"; CI keeps
/// the default, a developer may shorten it with DBAGENT_TEST_WRITE_SECONDS.
fn write_duration() -> Duration {
    let secs = std::env::var("DBAGENT_TEST_WRITE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    Duration::from_secs(secs)
}

struct Marker {
    /// Before the INSERT started.
    before: String,
    /// After its COMMIT returned.
    after: String,
}

/// `method`: how the base backup reads the cluster (`files` or `stream`, `backup.method`).
fn pitr_round_trip(repo: Repo, method: &str) {
    let mut pg = archiving_primary(&repo);
    // No autovacuum: the test's own INSERT is then the last archived commit.
    pg.psql("postgres", "ALTER SYSTEM SET autovacuum = off")
        .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    pg.psql(
        "postgres",
        "CREATE TABLE markers (id bigint PRIMARY KEY, note text, at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE filler AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g;",
    )
    .unwrap();
    ok(&dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("DBAGENT_BACKUP_METHOD", method)
        .output()
        .unwrap());

    // Markers once a second; a WAL switch every third marker.
    let mut markers = Vec::new();
    let started = Instant::now();
    let mut switches = 0;
    let mut id = 0;
    while started.elapsed() < write_duration() || switches < 10 {
        id += 1;
        let before = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
        pg.psql(
            "postgres",
            &format!("INSERT INTO markers (id, note) VALUES ({id}, '標記 마커 マーカー {id} 🐘')"),
        )
        .unwrap();
        let after = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
        markers.push(Marker { before, after });
        pg.psql(
            "postgres",
            "INSERT INTO filler SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
        )
        .unwrap();
        if id % 3 == 0 {
            switch_and_wait_archived(&pg);
            switches += 1;
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    // One more committed transaction after the last marker, so recovery can stop past it.
    let last_before = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
    pg.psql("postgres", "INSERT INTO filler VALUES (0, 'end')")
        .unwrap();
    let last_after = pg.psql("postgres", "SELECT clock_timestamp()").unwrap();
    switch_and_wait_archived(&pg);
    pg.stop().unwrap();
    let all = markers.len() as i64;
    assert!(switches >= 10, "only {switches} WAL switches");
    pg.destroy_data().unwrap();

    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        json["postgres"][0]["backups"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    assert_eq!(
        json["postgres"][0]["restorable"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    // The window ends at the last archived commit (a later target cannot be reached), not
    // when its segment was uploaded.
    let end = chrono::DateTime::parse_from_rfc3339(
        json["postgres"][0]["restorable"][0]["to"].as_str().unwrap(),
    )
    .unwrap();
    assert!(
        pg_time(&last_before) <= end && end <= pg_time(&last_after),
        "window ends at {end}, the last commit was between {last_before} and {last_after}"
    );

    // --latest brings back every marker. (It runs first: a restored server promotes to a new
    // timeline and archives it, and "latest" then means that timeline, as in PostgreSQL.)
    let scratch = pg_owned_tempdir().unwrap();
    let dir2 = scratch.path().join("latest");
    let port2 = free_port();
    let out = dbagent(
        &repo,
        None,
        &[
            "restore",
            "--latest",
            "--target-dir",
            dir2.to_str().unwrap(),
            "--port",
            &port2.to_string(),
        ],
    );
    let restored = Restored {
        dir: dir2,
        port: port2,
    };
    ok(&out);
    assert_eq!(
        restored.psql("SELECT count(*) FROM markers"),
        all.to_string()
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM filler WHERE v = 'end'"),
        "1"
    );
    drop(restored);

    // A moment between marker k (committed) and marker k+1 (not yet started).
    let k = (all * 2 / 3) as usize;
    let target = midpoint(&markers[k - 1].after, &markers[k].before);
    let dir = scratch.path().join("restored");
    let port = free_port();
    let out = dbagent(
        &repo,
        None,
        &[
            "restore",
            "--at",
            &target,
            "--target-dir",
            dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    );
    let restored = Restored {
        dir: dir.clone(),
        port,
    };
    let stdout = ok(&out);
    assert!(stdout.contains("promoted"), "{stdout}");
    let got = restored.psql("SELECT count(*), coalesce(max(id), 0) FROM markers");
    assert_eq!(
        got,
        format!("{k}|{k}"),
        "markers after restoring to {target}"
    );
    // CJK and emoji came back byte for byte.
    let note = restored.psql(&format!("SELECT note FROM markers WHERE id = {k}"));
    assert_eq!(note, format!("標記 마커 マーカー {k} 🐘"));
    assert_eq!(restored.psql("SELECT pg_is_in_recovery()"), "f");
}

/// A PostgreSQL `timestamptz` as psql prints it (`2026-11-23 03:00:00.123456+00`).
fn pg_time(s: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_str(&format!("{s}00"), "%Y-%m-%d %H:%M:%S%.f%z").unwrap()
}

/// The instant halfway between two PostgreSQL timestamps, in RFC 3339.
fn midpoint(a: &str, b: &str) -> String {
    let (a, b) = (pg_time(a), pg_time(b));
    assert!(b > a, "markers out of order: {a} {b}");
    let mid = a + (b - a) / 2;
    mid.to_rfc3339()
}

/// The base backup over the network (the server's BASE_BACKUP stream).
#[test]
fn pitr_on_s3() {
    pitr_round_trip(Repo::s3("cluster-a"), "stream");
}

/// The base backup from the data directory.
#[test]
fn pitr_on_file_repository() {
    pitr_round_trip(Repo::file(), "files");
}
