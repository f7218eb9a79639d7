//! Binlog streaming (`serve.wal_stream` with `--engine mysql`): a lost node loses at most the
//! last second, without any binlog rotation.
//!
//! DBAGENT_TEST_RPO_RUNS repeats the node loss (default 1) and prints the recovery point of
//! each run, their median and worst; DBAGENT_TEST_RPO_MODE=rotation measures the same loss
//! with streaming off (rotation every DBAGENT_TEST_RPO_MAX_AGE, default 30s).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dbagent_testcontainers::MariaDbBuilder;

use crate::mysql::{Scratch, agent};
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

fn node_loss(stream: bool, run_for: Duration, max_age: &str) -> Loss {
    let repo = Repo::s3("binstream");
    let mut db = MariaDbBuilder::new().start().unwrap();
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
    env.extend(repo.env());
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
    while started.elapsed() < run_for {
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
    let scratch = Scratch { dir };
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
        // A loss at a different moment of the second each run.
        let run_for = Duration::from_millis(6000 + 137 * run as u64 % 1000);
        let loss = node_loss(!rotation, run_for, if rotation { &max_age } else { "1h" });
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
