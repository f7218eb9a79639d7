//! Binlog streaming (`serve.wal_stream` with `--engine mysql`): a lost node loses at most the
//! last second, without any binlog rotation.
//!
//! DBAGENT_TEST_RPO_RUNS repeats the node loss (default 1) and prints the recovery point of
//! each run, their median and worst; DBAGENT_TEST_RPO_MODE=rotation measures the same loss
//! with streaming off (rotation every DBAGENT_TEST_RPO_MAX_AGE, default 30s).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dbagent_testcontainers::{FaultProxy, MariaDbBuilder, S3Server};

use crate::mysql::{Scratch, agent, agent_with, restore_latest_into};
use crate::serve::Serve;
use crate::support::*;

struct Marker {
    id: u32,
    /// After its commit returned.
    committed: DateTime<Utc>,
}

/// What one node loss cost.
struct Loss {
    /// The loss time minus the commit time of the newest marker restored (the dump's time
    /// when none was).
    recovery_point: f64,
    lost: usize,
    /// Markers committed more than a second before the loss that did not come back.
    lost_older_than_1s: Vec<u32>,
}

/// S3 unreachable for `.1` from `.0` after the writes start.
type Outage = Option<(Duration, Duration)>;

fn node_loss(stream: bool, run_for: Duration, max_age: &str, outage: Outage) -> Loss {
    node_loss_on(MariaDbBuilder::new(), stream, run_for, max_age, outage)
}

fn node_loss_on(
    server: MariaDbBuilder,
    stream: bool,
    run_for: Duration,
    max_age: &str,
    outage: Outage,
) -> Loss {
    // The sidecar reaches S3 through a proxy that can cut it off; the dump and the restore
    // go straight to it.
    let s3 = S3Server::start("dbagent-test").expect("S3 server");
    let proxy = FaultProxy::start(s3.port()).expect("fault proxy");
    let sidecar_s3 = proxy.s3_env(&s3, "binstream");
    let repo = Repo::S3(s3, "binstream".into());
    let mut db = server.start().unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.markers (id INT PRIMARY KEY, at DATETIME(6))",
    )
    .unwrap();
    ok(&agent(
        &repo,
        Some(&db.url()),
        None,
        &["backup", "--engine", "mysql"],
    ));
    let dumped = Utc::now();
    let mut env = vec![
        ("DBAGENT_MYSQL_URL".to_string(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
        ("DBAGENT_WAL_STREAM".into(), stream.to_string()),
        ("DBAGENT_BINLOG_MAX_AGE".into(), max_age.into()),
        ("DBAGENT_BINLOG_INTERVAL".into(), "1s".into()),
    ];
    env.extend(sidecar_s3);
    env.push(("DBAGENT_S3_RETRY_TIMEOUT".into(), "1m".into()));
    let serve = Serve::start(&env);
    if stream {
        serve.wait_for(
            "the binlog stream to connect",
            Duration::from_secs(20),
            |s| s.json("/status")["binlog_stream"]["connected"] == true,
        );
    }

    let mut markers = Vec::new();
    let started = Instant::now();
    let mut id = 0;
    let mut committed_before_outage = 0;
    while started.elapsed() < run_for {
        if let Some((at, len)) = outage {
            let down = started.elapsed() >= at && started.elapsed() < at + len;
            if down && committed_before_outage == 0 {
                committed_before_outage = id;
                proxy.set_unreachable(true);
            } else if !down && committed_before_outage > 0 {
                proxy.set_unreachable(false);
            }
        }
        id += 1;
        db.sql(
            None,
            &format!("INSERT INTO shop.markers VALUES ({id}, UTC_TIMESTAMP(6))"),
        )
        .unwrap();
        markers.push(Marker {
            id,
            committed: Utc::now(),
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    if stream {
        let status = serve.json("/status");
        assert!(
            status["binlog_stream"]["parts_stored"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{status}"
        );
        assert_eq!(serve.metric("dbagent_binlog_stream_gap"), Some(0.0));
    }
    // The node is lost: the server and the sidecar die together, the data goes.
    let lost_at = Utc::now();
    db.kill();
    drop(serve);
    std::fs::remove_dir_all(db.data_dir()).unwrap();
    drop(db);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("restored");
    let (out, scratch) = restore_latest_into(&repo, &[], dir);
    let text = ok(&out);
    if stream {
        assert!(text.contains("as streamed so far"), "{text}");
    }
    let restored: BTreeSet<u32> = scratch
        .sql("SELECT id FROM shop.markers")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    // Restored markers are a prefix: nothing later without everything before it.
    let newest = restored.iter().max().copied().unwrap_or(0);
    assert_eq!(restored.len() as u32, newest, "{restored:?}");
    let newest_time = markers
        .iter()
        .find(|m| m.id == newest)
        .map_or(dumped, |m| m.committed);
    assert!(
        newest >= committed_before_outage,
        "markers committed before the outage were lost: {newest} restored, {committed_before_outage} committed"
    );
    let cutoff = lost_at - chrono::Duration::seconds(1);
    Loss {
        recovery_point: (lost_at - newest_time).as_seconds_f64(),
        lost: markers.len() - restored.len(),
        lost_older_than_1s: markers
            .iter()
            .filter(|m| m.committed < cutoff && !restored.contains(&m.id))
            .map(|m| m.id)
            .collect(),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn mariadb_node_loss_restores_every_marker_older_than_a_second() {
    let runs: usize = std::env::var("DBAGENT_TEST_RPO_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rotation = std::env::var("DBAGENT_TEST_RPO_MODE").as_deref() == Ok("rotation");
    let max_age = std::env::var("DBAGENT_TEST_RPO_MAX_AGE").unwrap_or_else(|_| "30s".into());
    let mut points = Vec::new();
    for run in 0..runs {
        // A loss at a different moment each run: of the second when streaming, of the
        // rotation period without.
        let frac = (run as f64 * 0.37 + 0.1) % 1.0;
        let run_for = if rotation {
            let age = humantime::parse_duration(&max_age).unwrap();
            age + age.mul_f64(frac)
        } else {
            Duration::from_secs_f64(6.0 + frac)
        };
        let loss = node_loss(
            !rotation,
            run_for,
            if rotation { &max_age } else { "1h" },
            None,
        );
        eprintln!(
            "run {run}: recovery point {:.2}s, {} markers lost",
            loss.recovery_point, loss.lost
        );
        if !rotation {
            assert!(
                loss.lost_older_than_1s.is_empty(),
                "markers committed more than 1 s before the loss were not restored: {:?}",
                loss.lost_older_than_1s
            );
        }
        points.push(loss.recovery_point);
    }
    let worst = points.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "recovery point ({}) over {runs} runs: median {:.2}s, worst {worst:.2}s",
        if rotation {
            "rotation only"
        } else {
            "streaming"
        },
        median(&mut points)
    );
}

/// S3 is unreachable for ten seconds while markers are written: the stream holds on,
/// catches up once S3 is back, and a node loss three seconds later loses at most the last
/// second.
#[test]
fn binlog_stream_catches_up_after_s3_is_unreachable_for_ten_seconds() {
    let loss = node_loss(
        true,
        Duration::from_secs(15),
        "1h",
        Some((Duration::from_secs(2), Duration::from_secs(10))),
    );
    eprintln!(
        "after a 10 s S3 outage: recovery point {:.2}s, {} markers lost",
        loss.recovery_point, loss.lost
    );
    assert!(
        loss.lost_older_than_1s.is_empty(),
        "markers committed more than 1 s before the loss were not restored: {:?}",
        loss.lost_older_than_1s
    );
}

/// A server that writes its binlog without checksums streams the same way.
#[test]
fn binlog_stream_without_event_checksums() {
    let loss = node_loss_on(
        MariaDbBuilder::new().setting("binlog_checksum", "NONE"),
        true,
        Duration::from_secs(4),
        "1h",
        None,
    );
    assert!(
        loss.lost_older_than_1s.is_empty(),
        "markers committed more than 1 s before the loss were not restored: {:?}",
        loss.lost_older_than_1s
    );
}

/// Streaming with nowhere to stream to is refused at start, not silently skipped.
#[test]
fn binlog_streaming_without_a_repository_is_refused() {
    let out = std::process::Command::new(BIN)
        .args(["serve", "--engine", "mysql", "--listen", "127.0.0.1:0"])
        .env("DBAGENT_LOG_FORMAT", "text")
        .env_remove("DBAGENT_CONFIG")
        .env_remove("DBAGENT_REPO")
        .env("DBAGENT_MYSQL_URL", "mysql://root@127.0.0.1:1")
        .env("DBAGENT_WAL_STREAM", "true")
        .output()
        .unwrap();
    refused(&out, "serve.wal_stream needs a repository");
}

/// The byte ranges of the parts stored for each binlog file (from their descriptions).
fn parts(repo: &Repo) -> std::collections::BTreeMap<String, Vec<(u64, u64)>> {
    let mut out = std::collections::BTreeMap::new();
    let mysql = repo.root().unwrap().join("mysql");
    for server in std::fs::read_dir(mysql).unwrap().flatten() {
        let Ok(files) = std::fs::read_dir(server.path().join("binlog-stream")) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let mut ranges: Vec<(u64, u64)> = std::fs::read_dir(file.path())
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let (from, to) = n.strip_suffix(".json")?.split_once('-')?;
                    Some((from.parse().unwrap(), to.parse().unwrap()))
                })
                .collect();
            ranges.sort();
            if !ranges.is_empty() {
                out.insert(name, ranges);
            }
        }
    }
    out
}

/// Every streamed part's description in a file repository.
fn walk_json(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_json(&p));
        } else if p.extension().is_some_and(|x| x == "json")
            && p.to_string_lossy().contains("/binlog-stream/")
        {
            out.push(serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap());
        }
    }
    out
}

/// The server's current binlog file and position.
fn master_status(db: &dbagent_testcontainers::MariaDb) -> (String, u64) {
    let line = db.sql(None, "SHOW MASTER STATUS").unwrap();
    let mut cols = line.split('\t');
    let file = cols.next().unwrap().to_string();
    (file, cols.next().unwrap().parse().unwrap())
}

/// Waits until the stream stored everything the server wrote.
fn wait_streamed(serve: &Serve, db: &dbagent_testcontainers::MariaDb) {
    let (file, pos) = master_status(db);
    serve.wait_for(
        &format!("the stream to store {file} up to {pos}"),
        Duration::from_secs(40),
        |s| {
            let st = s.json("/status")["binlog_stream"].clone();
            st["file"] == file.as_str() && st["stored_position"].as_u64() == Some(pos)
        },
    );
}

/// A MariaDB with table `shop.t` and a dump of it in a file repository, and the environment
/// of a sidecar streaming its binlogs there (the shipper every `binlog_interval`; the env's
/// first entry is the server's URL).
fn dumped_for_streaming(
    binlog_interval: &str,
) -> (Repo, dbagent_testcontainers::MariaDb, Vec<(String, String)>) {
    let repo = Repo::file();
    let db = MariaDbBuilder::new().start().unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY, note VARCHAR(50))",
    )
    .unwrap();
    ok(&agent(
        &repo,
        Some(&db.url()),
        None,
        &["backup", "--engine", "mysql"],
    ));
    let mut env = vec![
        ("DBAGENT_MYSQL_URL".to_string(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
        ("DBAGENT_WAL_STREAM".into(), "true".into()),
        ("DBAGENT_BINLOG_MAX_AGE".into(), "1h".into()),
        ("DBAGENT_BINLOG_INTERVAL".into(), binlog_interval.into()),
        ("DBAGENT_SERVE_HEARTBEAT".into(), "false".into()),
    ];
    env.extend(repo.env());
    (repo, db, env)
}

#[test]
fn binlog_stream_resumes_after_restarts_without_duplicates_and_reports_a_purged_gap() {
    let (repo, mut db, mut env) = dumped_for_streaming("1s");
    let insert = |db: &dbagent_testcontainers::MariaDb, ids: std::ops::RangeInclusive<u32>| {
        for id in ids {
            db.sql(
                None,
                &format!("INSERT INTO shop.t VALUES ({id}, 'row {id}')"),
            )
            .unwrap();
        }
    };

    let mut serve = Serve::start(&env);
    insert(&db, 1..=3);
    wait_streamed(&serve, &db);
    // GTID-aware: the stored position is also the server's GTID position.
    let gtid = db.sql(None, "SELECT @@gtid_binlog_pos").unwrap();
    assert_eq!(
        serve.json("/status")["binlog_stream"]["stored_gtid"],
        gtid.as_str()
    );
    // The sidecar restarts: it resumes where the repository ends.
    assert_eq!(serve.terminate().code(), Some(0));
    insert(&db, 4..=5);
    let serve2 = Serve::start(&env);
    wait_streamed(&serve2, &db);
    // The server restarts (a new binlog file after a Stop event): the stream reconnects.
    let url = db.url();
    db.restart().unwrap();
    if db.url() == url {
        serve = serve2;
    } else {
        // Another port was free: the sidecar follows it, as a restarted pod's would.
        env[0].1 = db.url();
        drop(serve2);
        serve = Serve::start(&env);
    }
    insert(&db, 6..=6);
    wait_streamed(&serve, &db);
    // A rotation: the shipper archives the closed files, the stream goes on in the new one.
    db.sql(None, "FLUSH BINARY LOGS").unwrap();
    insert(&db, 7..=7);
    wait_streamed(&serve, &db);
    serve.wait_for(
        "the closed binlogs to be shipped",
        Duration::from_secs(30),
        |s| s.metric("dbagent_binlog_shipped_total").unwrap_or(0.0) >= 2.0,
    );

    // Every file's parts follow each other from 0: nothing stored twice, nothing skipped; a
    // closed file's parts reach exactly its size on disk.
    let stored = parts(&repo);
    assert!(stored.len() >= 3, "{stored:?}");
    for (name, ranges) in &stored {
        let mut end = 0;
        for (from, to) in ranges {
            assert_eq!(*from, end, "{name}: {ranges:?}");
            end = *to;
        }
        if name != &master_status(&db).0 {
            let size = std::fs::metadata(db.data_dir().join(name)).unwrap().len();
            assert_eq!(end, size, "{name}");
        }
    }
    // MariaDB sent no Annotate_rows events: same-size placeholders stand in for them.
    let placeholders: u64 = walk_json(repo.root().unwrap())
        .iter()
        .filter_map(|j| j["placeholder_bytes"].as_u64())
        .sum();
    assert!(placeholders > 0, "no placeholder was ever needed");
    let (current, _) = master_status(&db);
    let listing = ok(&agent(&repo, None, None, &["list"]));
    assert!(
        listing.contains(&format!("streamed: {current}")),
        "{listing}"
    );
    let verified = ok(&agent(&repo, None, None, &["verify"]));
    assert!(verified.contains("MySQL server"), "{verified}");
    assert!(verified.contains("superseded"), "{verified}");

    // A point in time inside the streamed file.
    insert(&db, 100..=100);
    std::thread::sleep(Duration::from_millis(2200));
    let target = db.sql(None, "SELECT UTC_TIMESTAMP()").unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    insert(&db, 101..=101);
    wait_streamed(&serve, &db);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("at");
    let out = agent(
        &repo,
        None,
        None,
        &[
            "restore",
            "--engine",
            "mysql",
            "--at",
            &format!("{target}Z").replace(' ', "T"),
            "--target-dir",
            dir.to_str().unwrap(),
        ],
    );
    let scratch = Scratch { dir };
    let text = ok(&out);
    assert!(text.contains("as streamed so far"), "{text}");
    assert_eq!(
        scratch.sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM shop.t"),
        "1,2,3,4,5,6,7,100"
    );
    drop(scratch);

    // prune removes the parts the complete files supersede, and only those.
    let pruned = ok(&agent(&repo, None, None, &["prune"]));
    assert!(pruned.contains("streamed binlog part"), "{pruned}");
    let left = parts(&repo);
    assert_eq!(left.keys().collect::<Vec<_>>(), vec![&current], "{left:?}");

    // Binlogs purged while the sidecar was away: a gap, loudly.
    assert_eq!(serve.terminate().code(), Some(0));
    insert(&db, 200..=200);
    db.sql(None, "FLUSH BINARY LOGS").unwrap();
    insert(&db, 201..=201);
    db.sql(None, "FLUSH BINARY LOGS").unwrap();
    let (newest, _) = master_status(&db);
    db.sql(None, &format!("PURGE BINARY LOGS TO '{newest}'"))
        .unwrap();
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "1s".into()));
    let mut serve = Serve::start(&env);
    serve.wait_for("the gap to be reported", Duration::from_secs(20), |s| {
        s.metric("dbagent_binlog_stream_gap") == Some(1.0)
    });
    let status = serve.json("/status");
    let gap = status["binlog_stream"]["gap"].as_str().unwrap_or_default();
    assert!(gap.contains(&current), "{status}");
    // It goes on from what the server still has.
    insert(&db, 202..=202);
    wait_streamed(&serve, &db);
    // And a restore does not stop silently at the gap.
    let dir = root.path().join("latest");
    let out = agent(
        &repo,
        None,
        None,
        &[
            "restore",
            "--engine",
            "mysql",
            "--latest",
            "--target-dir",
            dir.to_str().unwrap(),
        ],
    );
    refused(&out, "is missing from the archive");

    // A restarted sidecar finds nothing purged, but the gap is still in the archive: the
    // alert must not resolve until a dump is taken past it.
    assert_eq!(serve.terminate().code(), Some(0));
    let serve = Serve::start(&env);
    serve.wait_for(
        "the stream to connect and the repository to be read",
        Duration::from_secs(20),
        |s| {
            s.json("/status")["binlog_stream"]["connected"] == true
                && s.metric("dbagent_repository_refresh_timestamp_seconds")
                    .is_some()
        },
    );
    assert_eq!(serve.metric("dbagent_binlog_stream_gap"), Some(1.0));
    let status = serve.json("/status");
    let gap = status["binlog_stream"]["gap"].as_str().unwrap_or_default();
    assert!(gap.contains("missing from the archive"), "{status}");
    // A dump past the gap: restores from it need nothing the server purged.
    ok(&agent(
        &repo,
        Some(&db.url()),
        None,
        &["backup", "--engine", "mysql"],
    ));
    serve.wait_for("the gap to clear", Duration::from_secs(20), |s| {
        s.metric("dbagent_binlog_stream_gap") == Some(0.0)
    });
    assert!(serve.json("/status")["binlog_stream"]["gap"].is_null());
}

/// A server that crashes writes no Stop event. Nothing is lost while the server keeps that
/// file, so no gap may be reported, however often the repository is read; and the server
/// moving on to the next file tells the stream that the crashed one ended, so the
/// repository alone restores past the crash.
#[test]
fn a_crashed_server_is_no_binlog_gap_while_it_keeps_the_file() {
    // The shipper runs once, at the start: the crashed file stays unarchived.
    let (repo, mut db, mut env) = dumped_for_streaming("1h");
    env.push(("DBAGENT_CATALOG_REFRESH".into(), "1s".into()));
    let mut serve = Serve::start(&env);
    db.sql(None, "INSERT INTO shop.t VALUES (1, 'before')")
        .unwrap();
    wait_streamed(&serve, &db);
    let (crashed, _) = master_status(&db);
    let url = db.url();
    db.kill();
    db.restart().unwrap();
    if db.url() != url {
        // Another port was free: the sidecar follows it, as a restarted pod's would.
        env[0].1 = db.url();
        drop(serve);
        serve = Serve::start(&env);
    }
    db.sql(None, "INSERT INTO shop.t VALUES (2, 'after')")
        .unwrap();
    wait_streamed(&serve, &db);
    let (current, _) = master_status(&db);
    let stored = parts(&repo);
    assert!(
        current != crashed && stored.contains_key(&crashed) && stored.contains_key(&current),
        "{crashed} then {current}: {stored:?}"
    );
    let read_at = serve
        .metric("dbagent_repository_refresh_timestamp_seconds")
        .unwrap_or(0.0);
    serve.wait_for(
        "the repository to be read twice more",
        Duration::from_secs(20),
        |s| {
            s.metric("dbagent_repository_refresh_timestamp_seconds")
                .is_some_and(|t| t >= read_at + 2.0)
        },
    );
    assert_eq!(serve.metric("dbagent_binlog_stream_gap"), Some(0.0));
    let status = serve.json("/status");
    assert!(status["binlog_stream"]["gap"].is_null(), "{status}");

    // The server moving on to the next file ended the crashed one where the stream got to:
    // the repository alone restores past the crash, the node's disk lost with the file on it
    // (before: refused, "binlog … from position … is missing").
    assert_eq!(serve.terminate().code(), Some(0));
    drop(db);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r");
    let (out, scratch) = restore_latest_into(&repo, &[], dir);
    ok(&out);
    assert_eq!(
        scratch.sql("SELECT GROUP_CONCAT(note ORDER BY id) FROM shop.t"),
        "before,after"
    );
    let verified = ok(&agent(&repo, None, None, &["verify", "--full"]));
    assert!(
        verified.contains(&format!("binlog {crashed} streamed whole, ending at byte")),
        "{verified}"
    );
}

/// A server that died while writing a transaction leaves a file whose last transaction has
/// no end (its events complete, its XID never written), starts the next file, and gives the
/// next transaction the GTID of the one that never committed.
/// - The stream leaves the unfinished transaction out, ends the file before it and goes on
///   with the next file. Before, every session failed ("moved on to binlog … in the middle of
///   a transaction") until the shipper archived the crashed file.
/// - A restore replays through the crashed file, archived whole with the unfinished
///   transaction in it. Before, mariadb-binlog refused the reused GTID ("Found out of order
///   GTID") and no restore got past the crash.
#[test]
fn a_transaction_cut_off_by_a_crash_is_left_out_and_streaming_goes_on() {
    cut_off_by_a_crash(false);
}

/// The same crash in the middle of the commit's event: the file ends with a torn event, which
/// the server refuses to send a replica ("binlog truncated in the middle of event", error
/// 1236). The stream ends the file at the last whole transaction and goes on with the next
/// file; the restore cuts the torn event off the shipped file. Before, the stream recorded a
/// gap and failed every session, and the restore of the shipped file failed.
#[test]
fn a_torn_event_at_a_crash_is_left_out_and_streaming_goes_on() {
    cut_off_by_a_crash(true);
}

fn cut_off_by_a_crash(torn: bool) {
    let (repo, mut db, mut env) = dumped_for_streaming("1h");
    // The sidecar reaches the server through a relay, frozen while the transaction is
    // written: the stream must not get it whole before the crash cuts it off.
    let relay = dbagent_testcontainers::TcpRelay::start(db.port()).unwrap();
    let port = db.port();
    env[0].1 = db
        .url()
        .replace(&port.to_string(), &relay.port().to_string());
    let mut serve = Serve::start(&env);
    db.sql(None, "INSERT INTO shop.t VALUES (1, 'before')")
        .unwrap();
    wait_streamed(&serve, &db);
    let (crashed, _) = master_status(&db);
    relay.freeze();
    db.sql(None, "INSERT INTO shop.t VALUES (2, 'never committed')")
        .unwrap();
    let (_, end) = master_status(&db);
    db.kill();
    // Its XID event (header, xid, checksum) never reached the file.
    const XID_EVENT: u64 = 19 + 8 + 4;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(db.data_dir().join(&crashed))
        .unwrap();
    // Torn: its header and 6 bytes of its body made it.
    file.set_len(end - XID_EVENT + if torn { 25 } else { 0 })
        .unwrap();
    drop(file);
    db.restart().unwrap();
    if db.port() != port {
        // Another port was free: a sidecar started again follows it, and its shipper
        // archives the crashed file first (only the restore is tested then).
        env[0].1 = db.url();
        drop(serve);
        serve = Serve::start(&env);
    }
    db.sql(None, "INSERT INTO shop.t VALUES (3, 'after')")
        .unwrap();
    wait_streamed(&serve, &db);
    let (current, _) = master_status(&db);
    assert_ne!(current, crashed);
    let status = serve.json("/status");
    assert!(status["binlog_stream"]["gap"].is_null(), "{status}");
    assert_eq!(serve.terminate().code(), Some(0));

    // The repository alone restores past the crash, without the transaction that has no
    // end: first from the stream's copy of the crashed file (the shipper, every hour, ran
    // only at the start), then from the whole file, unfinished transaction and all, once
    // shipped.
    let root = tempfile::tempdir().unwrap();
    for (round, ship) in [("streamed", false), ("shipped", true)] {
        if ship {
            ok(&agent(&repo, Some(&db.url()), None, &["binlog-push"]));
        }
        let (out, scratch) = restore_latest_into(&repo, &[], root.path().join(round));
        ok(&out);
        assert_eq!(
            scratch.sql("SELECT GROUP_CONCAT(note ORDER BY id) FROM shop.t"),
            "before,after",
            "{round}"
        );
        // The shipped file still holds the cut-off events: the replay leaves them out (with
        // them, the next transaction's reused GTID is out of order to the binlog reader).
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains(&format!(
                "binlog {crashed} ends in a transaction that never committed"
            )),
            ship,
            "{round}: {stderr}"
        );
    }
}

/// Binlogs the server purged after the sidecar's stream had stored them whole, before the
/// shipper copied them (`binlog_expire_logs_seconds` shorter than `serve.binlog_interval`, or
/// a PURGE by hand): the repository holds them, so `binlog-push` ships what is left and says
/// so instead of calling them lost (before: exit 2, "purged ... before they were archived",
/// and the advice to take a dump now), and a restore replays through them.
#[test]
fn binlogs_purged_after_the_stream_stored_them_are_not_lost() {
    let (repo, db, env) = dumped_for_streaming("1h");
    // One file archived before: the files after it that the server no longer has are the
    // ones `binlog-push` checks.
    db.sql(None, "FLUSH BINARY LOGS").unwrap();
    ok(&agent(&repo, Some(&db.url()), None, &["binlog-push"]));
    let mut serve = Serve::start(&env);
    let mut rotated = Vec::new();
    for (id, note) in [(1, "one"), (2, "two")] {
        db.sql(None, &format!("INSERT INTO shop.t VALUES ({id}, '{note}')"))
            .unwrap();
        rotated.push(master_status(&db).0);
        db.sql(None, "FLUSH BINARY LOGS").unwrap();
    }
    db.sql(None, "INSERT INTO shop.t VALUES (3, 'three')")
        .unwrap();
    wait_streamed(&serve, &db);
    assert_eq!(serve.terminate().code(), Some(0));
    let (current, _) = master_status(&db);
    db.sql(None, &format!("PURGE BINARY LOGS TO '{current}'"))
        .unwrap();

    let out = agent(&repo, Some(&db.url()), None, &["binlog-push"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ok(&out);
    // The sidecar's shipper, once at its start, may have shipped the first one.
    let said = stderr
        .lines()
        .find(|l| l.contains("were purged from the server before they were shipped"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        said.contains(&format!("to {} were purged", rotated[1]))
            && said.contains("the repository holds each whole as streamed"),
        "{stderr}"
    );
    let root = tempfile::tempdir().unwrap();
    let (out, scratch) = restore_latest_into(&repo, &[], root.path().join("restored"));
    ok(&out);
    assert_eq!(
        scratch.sql("SELECT GROUP_CONCAT(note ORDER BY id) FROM shop.t"),
        "one,two,three"
    );
}

/// In an encrypted repository the sidecar holds only the public key: its parts are sealed, a
/// restarted sidecar still tells its own parts from different bytes (by the seal's keyed id),
/// and a restore with the secret key replays through the last streamed event.
#[test]
fn an_encrypted_binlog_stream_resumes_and_restores() {
    let repo = Repo::file();
    let keydir = dbagent_testcontainers::pg_owned_tempdir().unwrap();
    let key = crate::encryption::keygen(keydir.path(), "k");
    let public = [(
        "DBAGENT_ENCRYPTION_RECIPIENTS_FILE",
        key.recipients.as_path(),
    )];
    ok(&agent_with(
        &repo,
        None,
        None,
        &public,
        &["encryption", "set"],
    ));
    let mut db = MariaDbBuilder::new().start().unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.t (id INT PRIMARY KEY, note VARCHAR(50))",
    )
    .unwrap();
    ok(&agent_with(
        &repo,
        Some(&db.url()),
        None,
        &public,
        &["backup", "--engine", "mysql"],
    ));
    let mut env = vec![
        ("DBAGENT_MYSQL_URL".to_string(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
        ("DBAGENT_WAL_STREAM".into(), "true".into()),
        ("DBAGENT_BINLOG_MAX_AGE".into(), "1h".into()),
        ("DBAGENT_SERVE_HEARTBEAT".into(), "false".into()),
        (
            "DBAGENT_ENCRYPTION_RECIPIENTS_FILE".into(),
            key.recipients.to_str().unwrap().into(),
        ),
    ];
    env.extend(repo.env());
    let insert = |db: &dbagent_testcontainers::MariaDb, ids: std::ops::RangeInclusive<u32>| {
        for id in ids {
            db.sql(
                None,
                &format!("INSERT INTO shop.t VALUES ({id}, 'streamed-secret-{id}')"),
            )
            .unwrap();
        }
    };
    let mut serve = Serve::start(&env);
    insert(&db, 1..=3);
    wait_streamed(&serve, &db);
    assert_eq!(serve.terminate().code(), Some(0));
    insert(&db, 4..=5);
    let serve = Serve::start(&env);
    wait_streamed(&serve, &db);
    let status = serve.json("/status");
    assert!(status["binlog_stream"]["gap"].is_null(), "{status}");
    // Parts follow each other from 0: the restarted sidecar stored nothing twice.
    for (name, ranges) in parts(&repo) {
        let mut end = 0;
        for (from, to) in &ranges {
            assert_eq!(*from, end, "{name}: {ranges:?}");
            end = *to;
        }
    }
    // Nothing stored shows the rows.
    for path in repo.snapshot().keys() {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !bytes.windows(15).any(|w| w == b"streamed-secret"),
            "{} holds plaintext",
            path.display()
        );
    }
    db.kill();
    drop(serve);
    std::fs::remove_dir_all(db.data_dir()).unwrap();
    drop(db);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("restored");
    let args = [
        "restore",
        "--engine",
        "mysql",
        "--latest",
        "--target-dir",
        dir.to_str().unwrap(),
    ];
    // Without the secret key: refused, nothing restored.
    let out = agent_with(&repo, None, None, &public, &args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("shop").exists());
    let secret = [("DBAGENT_ENCRYPTION_IDENTITY_FILE", key.identity.as_path())];
    let out = agent_with(&repo, None, None, &secret, &args);
    let scratch = Scratch { dir };
    let text = ok(&out);
    assert!(text.contains("as streamed so far"), "{text}");
    assert_eq!(
        scratch.sql("SELECT GROUP_CONCAT(id ORDER BY id) FROM shop.t"),
        "1,2,3,4,5"
    );
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    (ticks / 100.0, hwm)
}

/// The sidecar streaming a flat-out write load: its CPU, its memory, and whether it keeps
/// up. The suite runs 5 s of load; the figures come from
/// `DBAGENT_TEST_LOAD_SECONDS=30 cargo test --test e2e -- binstream::sidecar_keeps_up --nocapture`.
#[test]
fn sidecar_keeps_up_with_a_flat_out_write_load() {
    let secs: u64 = std::env::var("DBAGENT_TEST_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let repo = Repo::s3("binstream-load");
    let db = MariaDbBuilder::new().start().unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.t (id BIGINT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(64))",
    )
    .unwrap();
    ok(&agent(
        &repo,
        Some(&db.url()),
        None,
        &["backup", "--engine", "mysql"],
    ));
    let mut env = vec![
        ("DBAGENT_MYSQL_URL".to_string(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
        ("DBAGENT_WAL_STREAM".into(), "true".into()),
        ("DBAGENT_BINLOG_MAX_AGE".into(), "1h".into()),
    ];
    env.extend(repo.env());
    let serve = Serve::start(&env);
    serve.wait_for(
        "the binlog stream to connect",
        Duration::from_secs(20),
        |s| s.json("/status")["binlog_stream"]["connected"] == true,
    );
    let (cpu0, _) = usage(serve.pid());
    let (_, pos0) = master_status(&db);
    let started = Instant::now();
    let mut lags = Vec::new();
    let mut transactions = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        // About 1 MB of row events per transaction.
        db.sql(
            None,
            "USE shop; INSERT INTO t (v) SELECT MD5(seq) FROM seq_1_to_10000",
        )
        .unwrap();
        transactions += 1;
        let (file, pos) = master_status(&db);
        let st = serve.json("/status")["binlog_stream"].clone();
        if st["file"] == file.as_str() {
            lags.push(pos.saturating_sub(st["stored_position"].as_u64().unwrap_or(0)));
        }
    }
    let load = started.elapsed().as_secs_f64();
    let (_, pos1) = master_status(&db);
    let caught_up = Instant::now();
    wait_streamed(&serve, &db);
    let catch_up = caught_up.elapsed().as_secs_f64();
    let (cpu1, hwm) = usage(serve.pid());
    let written = pos1 - pos0;
    lags.sort();
    eprintln!(
        "streamed {:.1} MiB of binlog in {load:.1}s ({:.2} MiB/s, {transactions} transactions): sidecar CPU {:.0}% of one core, peak RSS {} MiB; bytes written but not stored: median {:.1} MiB, max {:.1} MiB; caught up {catch_up:.2}s after the load stopped",
        written as f64 / 1048576.0,
        written as f64 / 1048576.0 / load,
        (cpu1 - cpu0) / load * 100.0,
        hwm / 1024,
        lags[lags.len() / 2] as f64 / 1048576.0,
        lags[lags.len() - 1] as f64 / 1048576.0,
    );
    assert!(catch_up < 10.0, "the stream did not keep up");
}

/// One transaction far bigger than what the sidecar holds in memory (64 MiB): it is stored
/// in pieces before it ends, the sidecar's memory stays bounded, and a restore replays it
/// whole.
#[test]
fn a_transaction_bigger_than_the_memory_bound_streams_in_pieces_and_restores() {
    let repo = Repo::file();
    let mut db = MariaDbBuilder::new()
        .setting("max_binlog_cache_size", "1073741824")
        .start()
        .unwrap();
    db.sql(
        None,
        "CREATE DATABASE shop; CREATE TABLE shop.big (id INT PRIMARY KEY, v VARCHAR(255))",
    )
    .unwrap();
    ok(&agent(
        &repo,
        Some(&db.url()),
        None,
        &["backup", "--engine", "mysql"],
    ));
    let mut env = vec![
        ("DBAGENT_MYSQL_URL".to_string(), db.url()),
        ("DBAGENT_ENGINE".into(), "mysql".into()),
        ("DBAGENT_WAL_STREAM".into(), "true".into()),
        ("DBAGENT_BINLOG_MAX_AGE".into(), "1h".into()),
        ("DBAGENT_SERVE_HEARTBEAT".into(), "false".into()),
    ];
    env.extend(repo.env());
    let serve = Serve::start(&env);
    serve.wait_for(
        "the binlog stream to connect",
        Duration::from_secs(20),
        |s| s.json("/status")["binlog_stream"]["connected"] == true,
    );
    // About 100 MB of row events in one transaction.
    db.sql(
        None,
        "USE shop; INSERT INTO big SELECT seq, REPEAT('x', 240) FROM seq_1_to_400000",
    )
    .unwrap();
    wait_streamed(&serve, &db);
    let (_, hwm) = usage(serve.pid());
    let stored = parts(&repo);
    let (name, ranges) = stored.iter().next().unwrap();
    let biggest = ranges.iter().map(|(f, t)| t - f).max().unwrap();
    let end = ranges.last().unwrap().1;
    eprintln!(
        "{name}: {end} bytes in {} parts, the biggest {biggest} bytes; sidecar peak RSS {} MiB",
        ranges.len(),
        hwm / 1024
    );
    assert!(end > 90 << 20, "{end}");
    assert!(biggest < 70 << 20, "a part of {biggest} bytes");
    assert!(hwm < 400 * 1024, "peak RSS {} MiB", hwm / 1024);
    db.kill();
    drop(serve);

    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("restored");
    let (out, scratch) = restore_latest_into(&repo, &[], dir);
    ok(&out);
    assert_eq!(scratch.sql("SELECT COUNT(*) FROM shop.big"), "400000");
}
