//! `serve` with `serve.wal_stream`: WAL streamed from a replication slot into the repository.
//! The golden check is byte-for-byte equality with what the server wrote; the headline is a
//! node loss (server and sidecar SIGKILLed together, data directory deleted) after which
//! `restore --latest` brings back every marker committed more than a second before.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use dbagent_testcontainers::{
    Fault, FaultProxy, Postgres, PostgresBuilder, Rule, TcpRelay, free_port, pg_bin,
    pg_owned_tempdir,
};

use crate::serve::{Serve, pg_env};
use crate::support::*;

/// `serve` streaming into `repo` from `pg`.
fn streaming_serve(repo: &Repo, pg: &Postgres, extra: &[(&str, &str)]) -> Serve {
    streaming_serve_at(free_port(), repo, pg, extra)
}

fn streaming_serve_at(port: u16, repo: &Repo, pg: &Postgres, extra: &[(&str, &str)]) -> Serve {
    let mut env = pg_env(pg);
    env.extend(repo.env());
    for (k, v) in [
        ("DBAGENT_WAL_STREAM", "true"),
        ("DBAGENT_SERVE_HEARTBEAT", "false"),
        ("DBAGENT_SERVE_WAL_LOOKAHEAD", "false"),
    ]
    .iter()
    .chain(extra)
    {
        env.push((k.to_string(), v.to_string()));
    }
    Serve::start_at(port, &env)
}

fn stored_lsn(s: &Serve) -> u64 {
    s.json("/status")["wal_stream"]["stored_lsn"]
        .as_str()
        .map(parse_lsn)
        .unwrap_or(0)
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `dbagent wal-fetch` of `name` into a temp file; the bytes.
fn fetch(repo: &Repo, pg: &Postgres, name: &str) -> Vec<u8> {
    let dir = pg_owned_tempdir().unwrap();
    let dest = dir.path().join(name);
    ok(&dbagent(
        repo,
        Some(pg),
        &["wal-fetch", name, dest.to_str().unwrap()],
    ));
    std::fs::read(&dest).unwrap()
}

/// The network path to the server dies without a reset (a node lost, a conntrack entry
/// dropped): the replication connection stays open and nothing more arrives on it. The stream
/// gives it up after `serve.wal_stream_timeout`, says why in `/status`, connects again and
/// stores what was committed meanwhile. Before, it waited on the dead connection for ever,
/// `/status` saying connected, and nothing more was archived.
#[test]
fn a_replication_connection_gone_silent_is_given_up_and_streaming_goes_on() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let relay = TcpRelay::start(pg.port()).unwrap();
    let relay_port = relay.port().to_string();
    let serve = streaming_serve(
        &repo,
        &pg,
        &[
            ("PGPORT", &relay_port),
            ("DBAGENT_SERVE_WAL_STREAM_TIMEOUT", "3s"),
        ],
    );
    serve.wait_for("the stream to store WAL", Duration::from_secs(20), |s| {
        stored_lsn(s) > 0
    });
    relay.freeze();
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    let commit = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    // The reason stays in `last_interruption` once the new connection clears `error`.
    let reason = |s: &Serve| {
        s.json("/status")["wal_stream"]["last_interruption"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    serve.wait_for(
        "the stream to give the silent connection up",
        Duration::from_secs(20),
        |s| reason(s).contains("sent nothing for"),
    );
    assert!(
        reason(&serve).contains("serve.wal_stream_timeout"),
        "{}",
        reason(&serve)
    );
    serve.wait_for(
        "the commit made meanwhile to be stored",
        Duration::from_secs(30),
        |s| stored_lsn(s) >= commit,
    );
    let status = serve.json("/status");
    assert_eq!(status["wal_stream"]["connected"], true, "{status}");
    assert_eq!(status["wal_stream"]["interruptions"], 1, "{status}");
}

#[test]
fn streamed_wal_is_what_the_server_wrote() {
    let repo = Repo::s3("stream-golden");
    // No archive_command: everything in the repository came through the stream.
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int, v text)")
        .unwrap();
    let serve = streaming_serve(&repo, &pg, &[]);
    serve.wait_for("the stream to store WAL", Duration::from_secs(20), |s| {
        stored_lsn(s) > 0
    });

    // A complete segment: streamed whole, stored under its plain name.
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g",
    )
    .unwrap();
    let seg = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    let switched = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for("the segment to be stored", Duration::from_secs(20), |s| {
        stored_lsn(s) >= switched
    });
    let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
    let streamed = fetch(&repo, &pg, &seg);
    assert_eq!(streamed.len(), on_server.len());
    assert!(
        streamed == on_server,
        "streamed {seg} differs from pg_wal/{seg}"
    );

    // The segment being written: its pieces, zero-padded, start with what the server wrote.
    pg.psql("postgres", "INSERT INTO t VALUES (-1, 'marker')")
        .unwrap();
    let commit = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    let current = pg
        .psql(
            "postgres",
            "SELECT pg_walfile_name(pg_current_wal_flush_lsn())",
        )
        .unwrap();
    let waited = serve.wait_for("the commit to be stored", Duration::from_secs(10), |s| {
        stored_lsn(s) >= commit
    });
    assert!(waited < Duration::from_secs(3), "stored after {waited:?}");
    let partial = fetch(&repo, &pg, &current);
    let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&current)).unwrap();
    assert_eq!(partial.len(), on_server.len(), "a full-size segment");
    let upto = (commit % partial.len() as u64) as usize;
    assert!(
        partial[..upto] == on_server[..upto],
        "the streamed part of {current} differs from the server's"
    );
    assert!(
        partial[upto..].iter().all(|b| *b == 0)
            || partial.iter().rposition(|b| *b != 0).unwrap() < on_server.len(),
        "zero-padded after the streamed bytes"
    );
    // Nothing is stored twice and every piece starts where the one before ended.
    let status = serve.json("/status");
    assert!(
        status["wal_stream"]["connected"].as_bool().unwrap(),
        "{status}"
    );
    serve.wait_for("the slot's retained bytes", Duration::from_secs(10), |s| {
        s.metric("dbagent_wal_stream_slot_retained_bytes").is_some()
    });
    assert_eq!(serve.metric("dbagent_wal_stream_gaps_total"), Some(0.0));
}

/// Inserts a marker every 200 ms until the server is gone; each with the time its COMMIT
/// returned.
fn writer(port: u16) -> std::thread::JoinHandle<Vec<(i64, SystemTime)>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        for id in 1.. {
            let out = Command::new(pg_bin("psql").unwrap())
                .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(["-d", "postgres", "-c"])
                .arg(format!(
                    "INSERT INTO markers VALUES ({id}, clock_timestamp())"
                ))
                .env("PGCONNECT_TIMEOUT", "2")
                .output()
                .unwrap();
            if !out.status.success() {
                return acked;
            }
            acked.push((id, SystemTime::now()));
            std::thread::sleep(Duration::from_millis(200));
        }
        acked
    })
}

/// S3 refuses every store (503) while WAL streams: the sidecar says so, `dbagent_wal_stream_up`
/// 0 and the reason in `/status`, so `DbagentWalStreamDown` fires, instead of looking healthy
/// for as long as it retries; once the stores work again it catches up and is up again.
#[test]
fn a_failing_store_takes_the_stream_down_until_it_works_again() {
    let repo = Repo::s3("store-down");
    let Repo::S3(server, prefix) = &repo else {
        unreachable!()
    };
    let proxy = FaultProxy::start(server.port()).unwrap();
    let pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let mut env = pg_env(&pg);
    env.extend(proxy.s3_env(server, prefix));
    for (k, v) in [
        ("DBAGENT_WAL_STREAM", "true"),
        ("DBAGENT_SERVE_HEARTBEAT", "false"),
        ("DBAGENT_SERVE_WAL_LOOKAHEAD", "false"),
        ("DBAGENT_S3_RETRY_TIMEOUT", "1s"),
    ] {
        env.push((k.into(), v.into()));
    }
    let serve = Serve::start(&env);
    let up = |s: &Serve| s.metric("dbagent_wal_stream_up");
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    serve.wait_for("the stream to store", Duration::from_secs(30), |s| {
        up(s) == Some(1.0) && stored_lsn(s) > 0
    });

    let refused = proxy.inject(Rule::new(Fault::Status(503)).method("PUT"));
    pg.psql("postgres", "INSERT INTO t SELECT generate_series(2, 1000)")
        .unwrap();
    let took = serve.wait_for(
        "the stream to say it is down",
        Duration::from_secs(30),
        |s| up(s) == Some(0.0),
    );
    let status = serve.json("/status");
    let error = status["wal_stream"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("503"), "{status}");
    assert!(proxy.fired(refused) > 0);
    eprintln!("down {took:?} into the outage: {error}");

    proxy.clear();
    let before = stored_lsn(&serve);
    serve.wait_for("the stream to be up again", Duration::from_secs(60), |s| {
        up(s) == Some(1.0) && stored_lsn(s) > before
    });
    assert!(serve.json("/status")["wal_stream"]["error"].is_null());
}

/// One node loss. Returns the recovery point: how long before the loss the newest restored
/// marker was committed (seconds).
fn node_loss(stream: bool, prefix: &str, write_for: Duration) -> f64 {
    node_loss_with(stream, prefix, write_for, false)
}

/// `node_loss`; with `stall`, the sidecar reaches S3 through a proxy that holds every PUT
/// for ten seconds in the middle of the writes, and the loss comes a few seconds after it
/// returns.
fn node_loss_with(stream: bool, prefix: &str, write_for: Duration, stall: bool) -> f64 {
    let repo = Repo::s3(prefix);
    let proxy = match &repo {
        Repo::S3(server, _) if stall => Some(FaultProxy::start(server.port()).unwrap()),
        _ => None,
    };
    let mut pg = archiving_primary(&repo); // archive_timeout = 0: off
    pg.psql(
        "postgres",
        "CREATE TABLE markers (id bigint PRIMARY KEY, at timestamptz)",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let extra: &[(&str, &str)] = if stream {
        &[]
    } else {
        &[("DBAGENT_WAL_STREAM", "false")]
    };
    let mut serve = match (&proxy, &repo) {
        (Some(proxy), Repo::S3(server, prefix)) => {
            let mut env = pg_env(&pg);
            env.extend(proxy.s3_env(server, prefix));
            for (k, v) in [
                ("DBAGENT_WAL_STREAM", "true"),
                ("DBAGENT_SERVE_HEARTBEAT", "false"),
                ("DBAGENT_SERVE_WAL_LOOKAHEAD", "false"),
            ] {
                env.push((k.into(), v.into()));
            }
            Serve::start(&env)
        }
        _ => streaming_serve(&repo, &pg, extra),
    };
    if stream {
        serve.wait_for("the stream to start", Duration::from_secs(20), |s| {
            s.json("/status")["wal_stream"]["connected"].as_bool() == Some(true)
        });
    }
    let w = writer(pg.port());
    if let Some(proxy) = &proxy {
        std::thread::sleep(Duration::from_secs(2));
        let held = proxy.inject(Rule::new(Fault::Stall(Duration::from_secs(10))).method("PUT"));
        std::thread::sleep(Duration::from_secs(10));
        proxy.clear();
        assert!(proxy.fired(held) > 0, "the stall caught no PUT");
        serve.wait_for("the stream to catch up", Duration::from_secs(30), |s| {
            let status = s.json("/status");
            let st = &status["wal_stream"];
            st["received_lsn"].as_str().map(parse_lsn) <= st["stored_lsn"].as_str().map(parse_lsn)
        });
    }
    // A random phase against the stream's 1 s cadence: the loss may come just before a store.
    let jitter = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 1_000_000_000;
    std::thread::sleep(write_for + Duration::from_nanos(jitter as u64));

    // The node is lost: database and sidecar killed together, the data directory deleted.
    let lost = SystemTime::now();
    pg.kill();
    serve.kill();
    let acked = w.join().unwrap();
    pg.destroy_data().unwrap();
    assert!(acked.len() >= 10, "only {} markers written", acked.len());

    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restored");
    let port = dbagent_testcontainers::free_port();
    let started = Instant::now();
    let out = dbagent(
        &repo,
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
    let restored = Restored { dir, port };
    ok(&out);
    eprintln!("restore took {:?}", started.elapsed());
    let got = restored.psql("SELECT count(*), coalesce(max(id), 0) FROM markers");
    let (count, max) = got.split_once('|').unwrap();
    let (count, max): (i64, i64) = (count.parse().unwrap(), max.parse().unwrap());
    assert_eq!(count, max, "markers restored with holes: {got}");
    let newest = acked
        .iter()
        .filter(|(id, _)| *id <= max)
        .map(|(_, at)| *at)
        .max();
    let rpo = match newest {
        Some(at) => lost.duration_since(at).unwrap_or_default().as_secs_f64(),
        None => lost
            .duration_since(acked[0].1)
            .unwrap_or_default()
            .as_secs_f64(),
    };
    if stream {
        let due: Vec<i64> = acked
            .iter()
            .filter(|(_, at)| lost.duration_since(*at).unwrap_or_default() > Duration::from_secs(1))
            .map(|(id, _)| *id)
            .collect();
        let missing: Vec<&i64> = due.iter().filter(|id| **id > max).collect();
        assert!(
            missing.is_empty(),
            "markers committed more than 1 s before the loss are missing: {missing:?} (restored up to {max} of {})",
            acked.len()
        );
    }
    eprintln!(
        "node loss ({}): {} markers acknowledged, {max} restored, recovery point {rpo:.3} s",
        if stream { "streaming" } else { "archive only" },
        acked.len()
    );
    rpo
}

#[test]
fn after_a_ten_second_s3_stall_the_stream_catches_up_and_loses_nothing() {
    node_loss_with(true, "stream-stall", Duration::from_secs(3), true);
}

#[test]
fn a_lost_node_is_restored_to_within_a_second() {
    node_loss(true, "stream-loss", Duration::from_secs(8));
}

/// The recovery point, measured: `DBAGENT_TEST_RPO_RUNS` node losses (default 1, so the suite
/// checks that both modes restore without holes; bench/README gives the 7-run command) with
/// streaming and without.
/// `DBAGENT_TEST_RPO_RUNS=7 cargo test --test e2e -- stream::recovery_point_figures --nocapture`
#[test]
fn recovery_point_figures() {
    let runs: usize = std::env::var("DBAGENT_TEST_RPO_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for stream in [false, true] {
        let mut rpos: Vec<f64> = (0..runs)
            .map(|i| node_loss(stream, &format!("rpo-{stream}-{i}"), Duration::from_secs(8)))
            .collect();
        rpos.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = rpos[rpos.len() / 2];
        let worst = rpos[rpos.len() - 1];
        println!(
            "RPO {}: median {median:.2} s, worst {worst:.2} s over {runs} runs ({rpos:?})",
            if stream { "streaming" } else { "archive-only" }
        );
    }
}

/// `list` shows the window up to the last streamed commit, and `restore --at` a moment
/// inside the segment still being written lands between two markers there.
#[test]
fn list_and_restore_at_reach_into_the_streamed_segment() {
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql(
        "postgres",
        "CREATE TABLE markers (id bigint PRIMARY KEY, at timestamptz)",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let serve = streaming_serve(&repo, &pg, &[]);
    let mut times = Vec::new();
    for id in 1..=6 {
        let at = pg
            .psql(
                "postgres",
                &format!("INSERT INTO markers VALUES ({id}, clock_timestamp()) RETURNING at"),
            )
            .unwrap();
        times.push(
            chrono::DateTime::parse_from_str(&format!("{at}00"), "%Y-%m-%d %H:%M:%S%.f%z").unwrap(),
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let flushed = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for("the markers to be stored", Duration::from_secs(10), |s| {
        stored_lsn(s) >= flushed
    });

    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let to = chrono::DateTime::parse_from_rfc3339(
        json["postgres"][0]["restorable"][0]["to"].as_str().unwrap(),
    )
    .unwrap();
    // Just before the last streamed commit record, which is stamped after its INSERT ran.
    assert!(
        to >= times[5] && to < times[5] + chrono::Duration::seconds(1),
        "the window ends at {to}, the last marker was inserted at {}: {listing}",
        times[5]
    );

    // verify reads every streamed piece; prune keeps them (the backup needs them).
    let out = ok(&dbagent(&repo, None, &["verify", "--json"]));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cluster = &report["clusters"][0];
    assert_eq!(cluster["problems"], serde_json::json!([]), "{out}");
    let pieces = pieces(&repo);
    assert!(!pieces.is_empty());
    // Every piece is read besides the segments and the backup's manifest objects.
    assert!(
        cluster["objects"].as_u64().unwrap() as usize >= pieces.len(),
        "{out}"
    );
    // Only pieces of a segment stored whole may go (the backup stored one of the segment it
    // stopped in, which archive_command then stored whole).
    let out = ok(&dbagent(&repo, None, &["prune", "--dry-run", "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let root = repo.root().unwrap();
    for key in plan["clusters"][0]["plan"]["delete_wal"]
        .as_array()
        .unwrap()
    {
        let key = key.as_str().unwrap();
        if let Some(piece) = key.strip_suffix(".part.zst") {
            let whole = root.join(format!("{}.zst", &piece[..piece.rfind('.').unwrap()]));
            assert!(
                whole.exists(),
                "prune would delete streamed WAL {key}: {out}"
            );
        }
    }

    let target = times[2] + (times[3] - times[2]) / 2;
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("at");
    let port = dbagent_testcontainers::free_port();
    let out = dbagent(
        &repo,
        None,
        &[
            "restore",
            "--at",
            &target.to_rfc3339(),
            "--target-dir",
            dir.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    );
    let restored = Restored { dir, port };
    ok(&out);
    assert_eq!(
        restored.psql("SELECT count(*), max(id) FROM markers"),
        "3|3"
    );
}

/// Every piece stored for each segment: (segment, start, end), from a file repository.
fn pieces(repo: &Repo) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (path, _) in repo.snapshot() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(rest) = name.strip_suffix(".part.zst") else {
            continue;
        };
        let (seg, range) = rest.split_once('.').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        out.push((
            seg.to_string(),
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        ));
    }
    out.sort();
    out
}

/// Pieces of one segment tile it from 0: each starts where the one before ended.
fn assert_tiled(pieces: &[(String, u64, u64)]) {
    for w in pieces.windows(2) {
        if w[0].0 == w[1].0 {
            assert_eq!(w[0].2, w[1].1, "pieces overlap or leave a hole: {pieces:?}");
        }
    }
    for (i, p) in pieces.iter().enumerate() {
        if i == 0 || pieces[i - 1].0 != p.0 {
            assert_eq!(p.1, 0, "a segment's first piece starts at 0: {pieces:?}");
        }
    }
}

#[test]
fn restarts_leave_no_gap_and_no_duplicate_and_a_dropped_slot_is_a_loud_gap() {
    let repo = Repo::file();
    let mut pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let mut serve = streaming_serve(&repo, &pg, &[]);
    let write_and_wait = |pg: &Postgres, serve: &Serve, id: i32| {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({id})"))
            .unwrap();
        let lsn = parse_lsn(
            &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
                .unwrap(),
        );
        serve.wait_for("the write to be stored", Duration::from_secs(30), |s| {
            stored_lsn(s) >= lsn
        });
    };
    write_and_wait(&pg, &serve, 1);

    // The server restarts: the stream reconnects and goes on from where it was.
    pg.restart().unwrap();
    write_and_wait(&pg, &serve, 2);
    // The sidecar restarts: it resumes from the end of the stored pieces.
    serve.kill();
    let serve2 = streaming_serve(&repo, &pg, &[]);
    write_and_wait(&pg, &serve2, 3);
    assert_eq!(serve2.metric("dbagent_wal_stream_gaps_total"), Some(0.0));
    let stored = pieces(&repo);
    assert!(stored.len() >= 3, "{stored:?}");
    assert_tiled(&stored);
    // What the pieces hold is what the server wrote.
    let current = pg
        .psql(
            "postgres",
            "SELECT pg_walfile_name(pg_current_wal_flush_lsn())",
        )
        .unwrap();
    let upto = stored
        .iter()
        .filter(|p| p.0 == current)
        .map(|p| p.2)
        .max()
        .unwrap() as usize;
    let partial = fetch(&repo, &pg, &current);
    let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&current)).unwrap();
    assert!(partial[..upto] == on_server[..upto]);
    drop(serve2);

    // The slot is dropped while the sidecar is away, and the server recycles the WAL.
    pg.psql("postgres", "SELECT pg_drop_replication_slot('dbagent')")
        .unwrap();
    for i in 0..3 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal(); CHECKPOINT; -- {i}"),
        )
        .unwrap();
    }
    let serve3 = streaming_serve(&repo, &pg, &[]);
    serve3.wait_for("the gap to be reported", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_stream_gaps_total") == Some(1.0)
    });
    let status = serve3.json("/status");
    let gap = status["wal_stream"]["last_gap"]
        .as_str()
        .unwrap_or_default();
    assert!(gap.contains("was removed from the server"), "{status}");
    assert!(gap.contains("slot was missing"), "{status}");
    // And it streams on from where the server can.
    write_and_wait(&pg, &serve3, 4);
}

/// A gap is a gap in any language, and whoever made the slot: on a server speaking German the
/// "already removed" answer is recognised (not by its English words), and a slot created by
/// hand without reserved WAL (no restart_lsn yet) is a gap the stream reports and streams on
/// from, not a silent loop.
#[test]
fn a_gap_is_reported_and_crossed_in_german_and_with_a_slot_made_by_hand() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new()
        .setting("lc_messages", &crate::faults::german_locale())
        .start()
        .unwrap();
    assert!(
        pg.psql("postgres", "SELECT 1/0")
            .is_err_and(|e| format!("{e:#}").contains("Division durch Null")),
        "the server does not speak German"
    );
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let write_and_wait = |serve: &Serve, id: i32| {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({id})"))
            .unwrap();
        let lsn = parse_lsn(
            &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
                .unwrap(),
        );
        serve.wait_for("the write to be stored", Duration::from_secs(30), |s| {
            stored_lsn(s) >= lsn
        });
    };
    let recycle = || {
        for i in 0..3 {
            pg.psql(
                "postgres",
                &format!("INSERT INTO t SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal(); CHECKPOINT; -- {i}"),
            )
            .unwrap();
        }
    };
    let serve = streaming_serve(&repo, &pg, &[]);
    write_and_wait(&serve, 1);
    drop(serve);

    // The slot is dropped while the sidecar is away; the server recycles the WAL and says so
    // in German.
    pg.psql("postgres", "SELECT pg_drop_replication_slot('dbagent')")
        .unwrap();
    recycle();
    let serve = streaming_serve(&repo, &pg, &[]);
    serve.wait_for("the gap to be reported", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_stream_gaps_total") == Some(1.0)
    });
    write_and_wait(&serve, 2);
    drop(serve);

    // Again, and an operator creates the slot by hand before the sidecar is back: it holds no
    // WAL until a stream starts on it.
    pg.psql("postgres", "SELECT pg_drop_replication_slot('dbagent')")
        .unwrap();
    recycle();
    pg.psql(
        "postgres",
        "SELECT pg_create_physical_replication_slot('dbagent')",
    )
    .unwrap();
    let serve = streaming_serve(&repo, &pg, &[]);
    serve.wait_for("the gap to be reported", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_stream_gaps_total") == Some(1.0)
    });
    let status = serve.json("/status");
    let gap = status["wal_stream"]["last_gap"]
        .as_str()
        .unwrap_or_default();
    assert!(gap.contains("was removed from the server"), "{status}");
    write_and_wait(&serve, 3);
}

/// A primary with a table `t` and row 1, its streaming standby, and the standby's sidecar
/// streaming into `repo`, which has stored the row.
fn streaming_standby(repo: &Repo) -> (Postgres, tempfile::TempDir, Postgres, Serve) {
    let primary = PostgresBuilder::new().start().unwrap();
    primary.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let (dir, standby) = crate::serve::standby_of(&primary);
    let serve = streaming_serve(repo, &standby, &[]);
    primary
        .psql("postgres", "INSERT INTO t VALUES (1)")
        .unwrap();
    let lsn = parse_lsn(
        &primary
            .psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for(
        "the standby's WAL to be stored",
        Duration::from_secs(30),
        |s| stored_lsn(s) >= lsn,
    );
    (primary, dir, standby, serve)
}

/// The streamed server is a standby that is then promoted: the stream follows it onto the new
/// timeline, stores the history file, and the new timeline's segment starts with the old
/// one's bytes, as in the server's pg_wal.
#[test]
fn a_promotion_is_followed_onto_the_new_timeline() {
    let repo = Repo::file();
    let (_primary, _dir, standby, serve) = streaming_standby(&repo);

    standby.psql("postgres", "SELECT pg_promote()").unwrap();
    standby
        .psql("postgres", "INSERT INTO t VALUES (2)")
        .unwrap();
    let lsn = parse_lsn(
        &standby
            .psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for(
        "the new timeline to be stored",
        Duration::from_secs(30),
        |s| s.json("/status")["wal_stream"]["timeline"] == 2 && stored_lsn(s) >= lsn,
    );
    let files: Vec<String> = repo
        .snapshot()
        .keys()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f == "00000002.history.zst"),
        "{files:?}"
    );
    let current = standby
        .psql(
            "postgres",
            "SELECT pg_walfile_name(pg_current_wal_flush_lsn())",
        )
        .unwrap();
    assert!(current.starts_with("00000002"), "{current}");
    let upto = (lsn % (16 << 20)) as usize;
    let streamed = fetch(&repo, &standby, &current);
    let on_server = std::fs::read(standby.data_dir().join("pg_wal").join(&current)).unwrap();
    assert!(
        streamed[..upto] == on_server[..upto],
        "the streamed {current} differs from the promoted server's"
    );
    assert_eq!(serve.metric("dbagent_wal_stream_gaps_total"), Some(0.0));
}

/// The standby is promoted while its sidecar is away, after the sidecar had stored all it
/// received: the stream resumes exactly at the switch point, where the server answers with the
/// next timeline instead of streaming, and follows it.
#[test]
fn a_promotion_while_the_sidecar_is_away_is_followed_when_it_is_back() {
    let repo = Repo::file();
    let (primary, _dir, standby, serve) = streaming_standby(&repo);
    drop(serve);
    drop(primary);
    standby.psql("postgres", "SELECT pg_promote()").unwrap();
    standby
        .psql("postgres", "INSERT INTO t VALUES (2)")
        .unwrap();
    let lsn = parse_lsn(
        &standby
            .psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    let serve = streaming_serve(&repo, &standby, &[]);
    serve.wait_for(
        "the new timeline to be stored",
        Duration::from_secs(30),
        |s| s.json("/status")["wal_stream"]["timeline"] == 2 && stored_lsn(s) >= lsn,
    );
    assert_eq!(serve.metric("dbagent_wal_stream_gaps_total"), Some(0.0));
}

/// After a restore to an earlier time as the new primary, the repository's newest streamed WAL
/// is production's old timeline, past the branch point: the restored server's sidecar streams
/// its new timeline instead of asking for a start the server refuses for ever.
#[test]
fn the_sidecar_of_a_server_restored_as_primary_streams_its_new_timeline() {
    let repo = Repo::file();
    let mut pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (id int, who text)")
        .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    let serve = streaming_serve(&repo, &pg, &[]);
    pg.psql("postgres", "INSERT INTO t VALUES (1, 'production')")
        .unwrap();
    let at: String = pg
        .psql("postgres", "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // The bad change, and production goes on for two more segments, streamed.
    for i in 0..2 {
        pg.psql(
            "postgres",
            &format!("INSERT INTO t VALUES (2, 'the bad change'); SELECT pg_switch_wal(); -- {i}"),
        )
        .unwrap();
    }
    pg.psql("postgres", "INSERT INTO t VALUES (3, 'streamed only')")
        .unwrap();
    let lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for(
        "production's WAL to be stored",
        Duration::from_secs(30),
        |s| stored_lsn(s) >= lsn,
    );
    drop(serve);
    // Stopped, not dropped: the restored server keeps its socket directory setting.
    pg.stop().unwrap();

    let scratch = pg_owned_tempdir().unwrap();
    let (out, restored) = restore(
        &repo,
        &scratch.path().join("new-primary"),
        &["--at", &at, "--as-primary"],
    );
    ok(&out);
    assert_eq!(
        restored.psql("SELECT string_agg(who, ',') FROM t"),
        "production"
    );
    let mut env: Vec<(String, String)> = vec![
        ("PGHOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), restored.port.to_string()),
        ("PGUSER".into(), "postgres".into()),
    ];
    env.extend(repo.env());
    for (k, v) in [
        ("DBAGENT_WAL_STREAM", "true"),
        ("DBAGENT_SERVE_HEARTBEAT", "false"),
        ("DBAGENT_SERVE_WAL_LOOKAHEAD", "false"),
    ] {
        env.push((k.into(), v.into()));
    }
    // A row on the new primary, streamed on timeline 2 with no gap.
    let streamed = |serve: &Serve, row: &str| {
        restored.psql(&format!("INSERT INTO t VALUES {row}"));
        let lsn = parse_lsn(&restored.psql("SELECT pg_current_wal_flush_lsn()"));
        serve.wait_for(
            &format!("{row} to be streamed on the new timeline"),
            Duration::from_secs(30),
            |s| s.json("/status")["wal_stream"]["timeline"] == 2 && stored_lsn(s) >= lsn,
        );
        assert_eq!(serve.metric("dbagent_wal_stream_gaps_total"), Some(0.0));
    };
    let serve = Serve::start(&env);
    streamed(&serve, "(4, 'on the new primary')");
    // Its sidecar restarts: it goes on after what it stored of the new timeline (the old
    // timeline's WAL is still the repository's newest).
    drop(serve);
    let serve = Serve::start(&env);
    streamed(&serve, "(5, 'after the sidecar restarted')");
    // The new primary is lost before it closed a segment: what its sidecar streamed restores.
    drop(serve);
    drop(restored);
    let (out, latest) = restore(&repo, &scratch.path().join("latest"), &["--latest"]);
    ok(&out);
    assert_eq!(
        latest.psql("SELECT string_agg(who, ',' ORDER BY id) FROM t"),
        "production,on the new primary,after the sidecar restarted"
    );
}

/// The sidecar's CPU and memory while it streams a `pgbench` load flat out, and whether it
/// keeps up (the slot's retained bytes stay bounded). The suite runs 5 s of load; the
/// figures come from `DBAGENT_TEST_PGBENCH_SECONDS=30 cargo test --test e2e --
/// stream::sidecar_under_pgbench --nocapture`
#[test]
fn sidecar_under_pgbench() {
    let secs: u64 = std::env::var("DBAGENT_TEST_PGBENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let repo = Repo::s3("stream-pgbench");
    let pg = PostgresBuilder::new().start().unwrap();
    let pgbench = |args: &[&str]| {
        let out = Command::new(pg_bin("pgbench").unwrap())
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port().to_string(),
                "-U",
                "postgres",
            ])
            .args(args)
            .arg("postgres")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    pgbench(&["-i", "-s", "10", "-q"]);
    let serve = streaming_serve(&repo, &pg, &[]);
    serve.wait_for("the stream to start", Duration::from_secs(20), |s| {
        s.json("/status")["wal_stream"]["connected"].as_bool() == Some(true)
    });
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let pid = serve.pid();
    let before = ticks(pid);
    let start_lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    let bench = {
        let port = pg.port();
        std::thread::spawn(move || {
            Command::new(pg_bin("pgbench").unwrap())
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                .args(["-c", "4", "-j", "2", "-T", &secs.to_string(), "postgres"])
                .output()
                .unwrap()
        })
    };
    let started = Instant::now();
    let (mut max_rss, mut max_retained) = (0u64, 0f64);
    while !bench.is_finished() {
        max_rss = max_rss.max(rss(pid));
        if let Some(r) = serve.metric("dbagent_wal_stream_slot_retained_bytes") {
            max_retained = max_retained.max(r);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = bench.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (ticks(pid) - before) as f64 / 100.0;
    let end_lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    let caught_up = serve.wait_for("the stream to catch up", Duration::from_secs(60), |s| {
        stored_lsn(s) >= end_lsn
    });
    let tps = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("tps"))
        .unwrap_or("")
        .to_string();
    let mib = (end_lsn - start_lsn) as f64 / (1 << 20) as f64;
    println!(
        "pgbench {secs} s ({tps}): {mib:.0} MiB of WAL ({:.1} MiB/s); sidecar CPU {cpu:.1} s ({:.0}% of one core), peak RSS {} MiB, slot retained at most {:.1} MiB, caught up {caught_up:?} after the load",
        mib / elapsed,
        100.0 * cpu / elapsed,
        max_rss / 1024,
        max_retained / (1 << 20) as f64
    );
}

#[test]
fn an_encrypted_stream_resumes_without_a_key_that_decrypts() {
    let repo = Repo::file();
    let keydir = pg_owned_tempdir().unwrap();
    let key = crate::encryption::keygen(keydir.path(), "k");
    let recipients = key.recipients.to_str().unwrap();
    let mut set = dbagent_cmd(&repo, None, &["encryption", "set"]);
    set.env("DBAGENT_ENCRYPTION_RECIPIENTS_FILE", recipients);
    ok(&set.output().unwrap());
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    // The sidecar holds only the public key, as in the database pod.
    let env = [("DBAGENT_ENCRYPTION_RECIPIENTS_FILE", recipients)];
    let write_and_wait = |serve: &Serve, id: i32| {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({id})"))
            .unwrap();
        let lsn = parse_lsn(
            &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
                .unwrap(),
        );
        serve.wait_for("the write to be stored", Duration::from_secs(30), |s| {
            stored_lsn(s) >= lsn
        });
    };
    let mut serve = streaming_serve(&repo, &pg, &env);
    write_and_wait(&serve, 1);
    // Restarted, it cannot read its encrypted pieces back: it streams the segment again.
    serve.kill();
    let serve2 = streaming_serve(&repo, &pg, &env);
    write_and_wait(&serve2, 2);
    drop(serve2);
    // A reader with the key gets what the server wrote.
    let current = pg
        .psql(
            "postgres",
            "SELECT pg_walfile_name(pg_current_wal_flush_lsn())",
        )
        .unwrap();
    let upto = pieces(&repo)
        .iter()
        .filter(|p| p.0 == current)
        .map(|p| p.2)
        .max()
        .unwrap() as usize;
    let dir = pg_owned_tempdir().unwrap();
    let dest = dir.path().join(&current);
    let mut cmd = dbagent_cmd(
        &repo,
        Some(&pg),
        &["wal-fetch", &current, dest.to_str().unwrap()],
    );
    cmd.env("DBAGENT_ENCRYPTION_IDENTITY_FILE", &key.identity);
    ok(&cmd.output().unwrap());
    let partial = std::fs::read(&dest).unwrap();
    let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&current)).unwrap();
    assert!(partial[..upto] == on_server[..upto]);
}

/// Streaming from a TLS-only server (`hostssl` with SCRAM-SHA-256, `verify-full`): the
/// replication connection negotiates TLS and authenticates like every other connection, and
/// nothing of the password reaches `/status`.
#[test]
fn streams_from_a_tls_only_server_with_scram() {
    const PASSWORD: &str = "Str3am s3cret";
    let repo = Repo::s3("stream-tls");
    let pg = PostgresBuilder::new().tls_only(PASSWORD).start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let serve = streaming_serve(&repo, &pg, &[("PGPASSWORD", PASSWORD)]);
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    let lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for("WAL streamed over TLS", Duration::from_secs(20), |s| {
        stored_lsn(s) >= lsn
    });
    let status = serve.get("/status").1;
    assert!(!status.contains(PASSWORD), "{status}");
    let env: Vec<(String, String)> = pg.env();
    assert!(
        env.iter()
            .any(|(k, v)| k == "PGSSLMODE" && v == "verify-full"),
        "{env:?}"
    );
}

/// `max_slot_wal_keep_size` invalidates the slot while the sidecar is away: the gap is
/// reported (metric, `/status`), and the stream says what to do instead of retrying a slot
/// that can never work again.
#[test]
fn an_invalidated_slot_is_a_loud_gap_with_the_fix_named() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new()
        .setting("max_slot_wal_keep_size", "32MB")
        .start()
        .unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let mut serve = streaming_serve(&repo, &pg, &[]);
    pg.psql("postgres", "INSERT INTO t VALUES (1)").unwrap();
    let lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for("the write to be stored", Duration::from_secs(20), |s| {
        stored_lsn(s) >= lsn
    });
    serve.kill();
    // More WAL than the slot may keep, then a checkpoint: the slot is invalidated.
    for _ in 0..5 {
        pg.psql(
            "postgres",
            "INSERT INTO t SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
        )
        .unwrap();
    }
    pg.psql("postgres", "CHECKPOINT").unwrap();
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'dbagent'"
        )
        .unwrap(),
        "lost"
    );
    let serve = streaming_serve(&repo, &pg, &[]);
    serve.wait_for("the gap to be reported", Duration::from_secs(20), |s| {
        s.metric("dbagent_wal_stream_gaps_total") >= Some(1.0)
    });
    let status = serve.json("/status");
    let st = &status["wal_stream"];
    assert!(
        st["last_gap"]
            .as_str()
            .unwrap_or_default()
            .contains("invalidated"),
        "{status}"
    );
    serve.wait_for("the error to name the fix", Duration::from_secs(20), |s| {
        s.json("/status")["wal_stream"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("pg_drop_replication_slot"))
    });
    // The operator drops it: the sidecar makes it again and streams on.
    pg.psql("postgres", "SELECT pg_drop_replication_slot('dbagent')")
        .unwrap();
    pg.psql("postgres", "INSERT INTO t VALUES (2)").unwrap();
    let lsn = parse_lsn(
        &pg.psql("postgres", "SELECT pg_current_wal_flush_lsn()")
            .unwrap(),
    );
    serve.wait_for("streaming again", Duration::from_secs(40), |s| {
        stored_lsn(s) >= lsn
    });
}

/// `archive_command = 'dbagent wal-push %p'` beside a streaming sidecar: every segment the
/// stream stored is acknowledged without being read or uploaded again (the fast path, seen in
/// PostgreSQL's log and the sidecar's answer counter), the archive holds every segment with
/// the server's bytes, and a wrong file under a streamed name is not acknowledged: it takes
/// the usual path and is refused with exit 2.
#[test]
fn archive_command_beside_the_stream_returns_at_once_for_streamed_segments() {
    let repo = Repo::s3("stream-fastpush");
    let port = free_port();
    let sidecar = format!("http://127.0.0.1:{port}");
    let mut b = PostgresBuilder::new()
        .archive_command(&format!("{BIN} wal-push %p"))
        .setting("archive_timeout", "0")
        .env("DBAGENT_WAL_SIDECAR_URL", &sidecar)
        .env("DBAGENT_LOG", "info")
        .env("DBAGENT_LOG_FORMAT", "text");
    for (k, v) in repo.env() {
        b = b.env(&k, &v);
    }
    let pg = b.start().unwrap();
    pg.psql("postgres", "CREATE TABLE t (id int, v text)")
        .unwrap();
    // No sidecar yet: archive_command pushes as it always did.
    let first = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    wait_archived(&pg, &first);

    let serve = streaming_serve_at(port, &repo, &pg, &[]);
    serve.wait_for("the stream to store WAL", Duration::from_secs(20), |s| {
        stored_lsn(s) > 0
    });
    let mut switched = Vec::new();
    for round in 0..4 {
        pg.psql(
            "postgres",
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                round * 20000,
                round * 20000 + 19999
            ),
        )
        .unwrap();
        let seg = pg
            .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
            .unwrap();
        wait_archived(&pg, &seg);
        switched.push(seg);
    }
    let failed = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .unwrap();
    assert_eq!(failed, "0", "archive_command never failed");

    // The fast path was taken for the segments the stream stored.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let fast: Vec<&String> = switched
        .iter()
        .filter(|seg| {
            log.lines()
                .any(|l| l.contains("already stored by the sidecar") && l.contains(seg.as_str()))
        })
        .collect();
    assert!(
        fast.len() >= 3,
        "archive_command took the fast path for {fast:?} of {switched:?}; log:\n{log}"
    );
    let stored_answers = serve
        .metric_where("dbagent_wal_segment_answers_total", "answer", "stored")
        .unwrap();
    assert!(stored_answers >= fast.len() as f64, "{stored_answers}");
    // wal-push read none of those, so the stream stored their block references itself, for
    // incremental backups (see walrefs): the S3 server saw them written.
    let Repo::S3(server, _) = &repo else {
        unreachable!("an S3 repository")
    };
    for seg in &fast {
        let summary = format!("/walrefs/{seg}.zst");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let moto = std::fs::read_to_string(server.log_path()).unwrap_or_default();
            if moto
                .lines()
                .any(|l| l.contains("\"PUT ") && l.contains(&summary) && l.contains("\" 200"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no PUT of {summary} in the S3 server's log"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // The archive chain is complete, every segment with the server's bytes.
    let from = u64::from_str_radix(&first[8..], 16).unwrap();
    let to = u64::from_str_radix(&switched.last().unwrap()[8..], 16).unwrap();
    for n in from..=to {
        let seg = format!("{}{n:016X}", &first[..8]);
        let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
        assert!(
            fetch(&repo, &pg, &seg) == on_server,
            "the archived {seg} differs from pg_wal/{seg}"
        );
    }

    // A recycled file (another segment's bytes) under a streamed name: the sidecar says the
    // name is stored, the first page says the file is not that segment, so wal-push takes the
    // usual path, which refuses it.
    let name = fast[0].clone();
    let other = switched.iter().find(|s| **s != name).unwrap();
    let dir = pg_owned_tempdir().unwrap();
    let wal_dir = dir.path().join("pg_wal");
    std::fs::create_dir(&wal_dir).unwrap();
    let wrong = wal_dir.join(&name);
    std::fs::copy(pg.data_dir().join("pg_wal").join(other), &wrong).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sysid = pg
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    let out = dbagent_cmd(&repo, Some(&pg), &["wal-push", wrong.to_str().unwrap()])
        .env("DBAGENT_WAL_SIDECAR_URL", &sidecar)
        .env("DBAGENT_PG_SYSTEM_IDENTIFIER", &sysid)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("refusing to overwrite") || stderr.contains("refused"),
        "{stderr}"
    );
    assert!(
        stderr.contains("is not that segment"),
        "the sidecar was asked and said stored: {stderr}"
    );
    assert!(
        !stderr.contains("already stored by the sidecar"),
        "{stderr}"
    );
    assert_eq!(
        serve.metric_where("dbagent_wal_segment_answers_total", "answer", "stored"),
        Some(stored_answers + 1.0)
    );
    let on_server = std::fs::read(pg.data_dir().join("pg_wal").join(&name)).unwrap();
    assert!(
        fetch(&repo, &pg, &name) == on_server,
        "the stored {name} is untouched"
    );
}
