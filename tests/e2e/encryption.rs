//! Encryption at rest on an S3 server (moto): what is stored is not plaintext, writers need
//! only the public keys and are refused without the right ones, readers without the secret
//! key are refused with one line naming the setting, and a rotation keeps old objects
//! readable with an identity file that holds both keys.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dbagent_testcontainers::{Postgres, PostgresBuilder, free_port, pg_owned_tempdir};
use tempfile::TempDir;

use crate::support::*;

/// A key pair made by `dbagent keygen`, readable by the postgres OS user (its server runs
/// `wal-push` and, restored, `wal-fetch`).
pub struct KeyPair {
    pub identity: PathBuf,
    pub recipients: PathBuf,
    pub public: String,
}

pub fn keygen(dir: &Path, name: &str) -> KeyPair {
    let identity = dir.join(format!("{name}.key"));
    let out = dbagent_testcontainers::command_as_pg_user(BIN)
        .args(["keygen", "--output"])
        .arg(&identity)
        .env_remove("DBAGENT_CONFIG")
        .current_dir("/tmp")
        .output()
        .unwrap();
    let public = ok(&out).trim().to_string();
    assert!(public.starts_with("age1"), "{public}");
    let recipients = dir.join(format!("{name}.pub"));
    std::fs::write(&recipients, format!("{public}\n")).unwrap();
    KeyPair {
        identity,
        recipients,
        public,
    }
}

/// `dbagent` with extra environment (keys).
fn run(repo: &Repo, pg: Option<&Postgres>, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = dbagent_cmd(repo, pg, args);
    cmd.env_remove("DBAGENT_ENCRYPTION_RECIPIENTS_FILE")
        .env_remove("DBAGENT_ENCRYPTION_IDENTITY_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

const R: &str = "DBAGENT_ENCRYPTION_RECIPIENTS_FILE";
const I: &str = "DBAGENT_ENCRYPTION_IDENTITY_FILE";

/// Every object of an S3 repository with its bytes.
pub fn s3_objects(repo: &Repo) -> Vec<(String, Vec<u8>)> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let Repo::S3(server, _) = repo else {
        panic!("an S3 repository")
    };
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(server.endpoint())
        .with_bucket_name(server.bucket())
        .with_region("us-east-1")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_allow_http(true)
        .build()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), bytes.to_vec()));
        }
        out
    })
}

/// The objects whose stored bytes, or whose bytes after `zstd -d`, show `marker`.
pub fn showing(objects: &[(String, Vec<u8>)], marker: &str) -> Vec<String> {
    let has = |b: &[u8]| b.windows(marker.len()).any(|w| w == marker.as_bytes());
    objects
        .iter()
        .filter(|(_, bytes)| {
            has(bytes) || zstd::decode_all(&bytes[..]).is_ok_and(|plain| has(&plain))
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// A primary whose `wal-push` reads its settings from a config file the test rewrites, so the
/// archiver's keys can change without a restart (as a Secret update would).
fn primary(repo: &Repo, config: &Path) -> Postgres {
    std::fs::write(config, "").unwrap();
    let mut b = PostgresBuilder::new()
        .archive_command(&format!("{BIN} wal-push %p"))
        .env("DBAGENT_CONFIG", config.to_str().unwrap());
    for (k, v) in repo.env() {
        b = b.env(&k, &v);
    }
    b.start().expect("start PostgreSQL")
}

fn archiver_recipients(config: &Path, recipients: &Path) {
    std::fs::write(
        config,
        format!(
            "[encryption]\nrecipients_file = {:?}\n",
            recipients.to_str().unwrap()
        ),
    )
    .unwrap();
}

fn marker_rows(pg: &Postgres, marker: &str, n: u32) {
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE IF NOT EXISTS secrets (id serial PRIMARY KEY, note text);
             INSERT INTO secrets (note) SELECT '{marker}' || g FROM generate_series(1, {n}) g;"
        ),
    )
    .unwrap();
}

fn scratch_dir() -> (TempDir, PathBuf) {
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("restored");
    (scratch, dir)
}

#[test]
fn pg_encrypted_backup_wal_and_restore_latest() {
    let repo = Repo::s3("enc");
    let keydir = pg_owned_tempdir().unwrap();
    let key = keygen(keydir.path(), "a");
    let wrong = keygen(keydir.path(), "wrong");
    ok(&run(
        &repo,
        None,
        &[(R, &key.recipients)],
        &["encryption", "set"],
    ));

    let config = keydir.path().join("archiver.toml");
    let mut pg = primary(&repo, &config);
    archiver_recipients(&config, &key.recipients);
    marker_rows(&pg, "MARKER-before-", 2000);
    // Writers without the public keys, or with others, are refused before writing anything.
    let before = s3_objects(&repo).len();
    refused(
        &run(&repo, Some(&pg), &[], &["backup"]),
        "encryption.recipients_file",
    );
    refused(
        &run(&repo, Some(&pg), &[(R, &wrong.recipients)], &["backup"]),
        "encryption.recipients_file",
    );
    refused(
        &run(&repo, Some(&pg), &[], &["backup", "--kind", "dump"]),
        "encryption.recipients_file",
    );
    assert_eq!(s3_objects(&repo).len(), before, "a refused writer wrote");

    ok(&run(&repo, Some(&pg), &[(R, &key.recipients)], &["backup"]));
    ok(&run(
        &repo,
        Some(&pg),
        &[(R, &key.recipients)],
        &["backup", "--kind", "dump"],
    ));
    marker_rows(&pg, "MARKER-after-", 500);
    pg.psql("postgres", "CHECKPOINT").unwrap();
    // An incremental reads the previous backup's block map: a writer with only the public
    // keys is refused with one line, one that also holds the secret key stores it encrypted.
    refused(
        &run(
            &repo,
            Some(&pg),
            &[(R, &key.recipients)],
            &["backup", "--incremental"],
        ),
        "encryption.identity_file",
    );
    let inc = ok(&run(
        &repo,
        Some(&pg),
        &[(R, &key.recipients), (I, &key.identity)],
        &["backup", "--incremental"],
    ));
    assert!(inc.starts_with("incremental backup"), "{inc}");
    assert!(inc.contains("the blocks the WAL names"), "{inc}");
    switch_and_wait_archived(&pg);
    // wal-push without the public keys is refused (exit 1): PostgreSQL keeps the segment and
    // retries, nothing is stored in the clear.
    let last = pg
        .psql("postgres", "SELECT last_archived_wal FROM pg_stat_archiver")
        .unwrap();
    let seg_path = pg.data_dir().join("pg_wal").join(&last);
    let pushed = run(
        &repo,
        Some(&pg),
        &[],
        &["wal-push", seg_path.to_str().unwrap()],
    );
    refused(&pushed, "encryption.recipients_file");
    let sysid = pg
        .psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
        .unwrap();
    pg.stop().unwrap();

    // Nothing stored says MARKER, compressed or not; the manifests keep no table names.
    let objects = s3_objects(&repo);
    // A file-level backup (the test's PGDATA is readable): bundles of blobs and the index.
    assert!(objects.iter().any(|(k, _)| k.ends_with(".bundle")));
    assert!(objects.iter().any(|(k, _)| k.ends_with("/files.json.zst")));
    assert_eq!(showing(&objects, "MARKER-"), Vec::<String>::new());
    assert_eq!(showing(&objects, "public.secrets"), Vec::<String>::new());

    // Listing and the quick verify need no key; --full needs one and says which.
    let listing = ok(&run(&repo, None, &[], &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(json["postgres"][0]["backups"].as_array().unwrap().len(), 2);
    ok(&run(&repo, None, &[], &["verify"]));
    let full = run(&repo, None, &[], &["verify", "--full"]);
    assert_eq!(full.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&full.stdout).contains("encryption.identity_file"),
        "{}",
        String::from_utf8_lossy(&full.stdout)
    );
    ok(&run(
        &repo,
        None,
        &[(I, &key.identity)],
        &["verify", "--full"],
    ));

    // wal-fetch without the key stops recovery (>= 126) rather than saying "not archived".
    let seg = objects
        .iter()
        .filter_map(|(k, _)| k.rsplit('/').next()?.strip_suffix(".zst"))
        .find(|name| name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()))
        .expect("an archived segment")
        .to_string();
    let mut cmd = dbagent_cmd(&repo, None, &["wal-fetch", &seg, "/tmp/dbagent-enc-fetch"]);
    cmd.env("DBAGENT_PG_SYSTEM_IDENTIFIER", &sysid)
        .env_remove(I)
        .env_remove(R);
    let fetched = cmd.output().unwrap();
    assert!(
        fetched.status.code().unwrap_or(0) >= 126,
        "wal-fetch without a key: {:?} {}",
        fetched.status,
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert!(String::from_utf8_lossy(&fetched.stderr).contains("encryption.identity_file"));

    // A drill needs the key too, and with it restores the encrypted backup and WAL.
    let scratch = pg_owned_tempdir().unwrap();
    let drill = |env: &[(&str, &Path)]| {
        let mut cmd = dbagent_cmd(&repo, None, &["drill", "--json"]);
        cmd.env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
            .env_remove(R)
            .env_remove(I);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    refused(&drill(&[(R, &key.recipients)]), "encryption.identity_file");
    // It stores its report, so it needs the public keys as well.
    refused(&drill(&[(I, &key.identity)]), "encryption.recipients_file");
    let out = drill(&[(I, &key.identity), (R, &key.recipients)]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let restore = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "restore")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(restore["status"], "pass", "{report:#}");

    // Readers without the key, or with the wrong one: one line, exit 1, nothing in the target.
    pg.destroy_data().unwrap();
    let (_scratch, dir) = scratch_dir();
    let port = free_port().to_string();
    let restore = [
        "restore",
        "--latest",
        "--target-dir",
        dir.to_str().unwrap(),
        "--port",
        &port,
    ];
    refused(&run(&repo, None, &[], &restore), "encryption.identity_file");
    refused(
        &run(&repo, None, &[(I, &wrong.identity)], &restore),
        "encryption.identity_file",
    );
    assert!(
        !dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(),
        "a refused restore wrote into the target"
    );

    let out = run(&repo, None, &[(I, &key.identity)], &restore);
    let restored = Restored {
        dir: dir.clone(),
        port: port.parse().unwrap(),
    };
    ok(&out);
    assert_eq!(
        restored.psql("SELECT count(*) FROM secrets WHERE note LIKE 'MARKER-%'"),
        "2500"
    );
}

#[test]
fn rotation_keeps_old_objects_readable_with_both_keys() {
    let repo = Repo::s3("rotate");
    let keydir = pg_owned_tempdir().unwrap();
    let a = keygen(keydir.path(), "a");
    let b = keygen(keydir.path(), "b");
    let config = keydir.path().join("archiver.toml");
    let mut pg = primary(&repo, &config);

    // A plain phase first: the check below finds plaintext when there is some.
    marker_rows(&pg, "PLAINMARK-", 300);
    ok(&run(&repo, Some(&pg), &[], &["backup"]));
    switch_and_wait_archived(&pg);
    assert!(
        !showing(&s3_objects(&repo), "PLAINMARK-").is_empty(),
        "the plaintext check finds nothing even in a plain repository"
    );

    // Key A. An identity file that cannot be read refuses `set` before it records anything:
    // the repository stays plain, and writers without keys go on.
    let before = s3_objects(&repo);
    refused(
        &run(
            &repo,
            None,
            &[(R, &a.recipients), (I, Path::new("/nonexistent/a.key"))],
            &["encryption", "set"],
        ),
        "encryption.identity_file",
    );
    assert_eq!(
        s3_objects(&repo),
        before,
        "a refused `encryption set` wrote"
    );
    ok(&run(
        &repo,
        None,
        &[(R, &a.recipients)],
        &["encryption", "set"],
    ));
    archiver_recipients(&config, &a.recipients);
    marker_rows(&pg, "AMARK-", 300);
    ok(&run(&repo, Some(&pg), &[(R, &a.recipients)], &["backup"]));
    // A segment (the latest archived file may be the backup's history file).
    let of_a = pg
        .psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    wait_archived(&pg, &of_a);

    // Rotate to B: writers holding A are refused from now on.
    ok(&run(
        &repo,
        None,
        &[(R, &b.recipients)],
        &["encryption", "set"],
    ));
    refused(
        &run(&repo, Some(&pg), &[(R, &a.recipients)], &["backup"]),
        "encryption.recipients_file",
    );
    archiver_recipients(&config, &b.recipients);
    marker_rows(&pg, "BMARK-", 300);
    switch_and_wait_archived(&pg);

    // A segment stored for A pushed again by a writer that holds B (the sidecar's look-ahead
    // stored it just before the archiver got B): it cannot tell whether it is the same WAL,
    // and archiving would wait there. Knowing A's public keys as the previous recipients, it
    // can: the same bytes are archived already, different ones are refused.
    let wal = keydir.path().join("wal");
    std::fs::create_dir(&wal).unwrap();
    let _ = Command::new("chown")
        .arg("--reference")
        .arg(keydir.path())
        .arg(&wal)
        .status();
    let segment = wal.join(&of_a);
    ok(&run(
        &repo,
        Some(&pg),
        &[(I, &a.identity), ("DBAGENT_WAL_PREFETCH", Path::new("0"))],
        &["wal-fetch", &of_a, segment.to_str().unwrap()],
    ));
    let push = |env: &[(&str, &Path)]| {
        run(
            &repo,
            Some(&pg),
            env,
            &["wal-push", segment.to_str().unwrap()],
        )
    };
    let out = push(&[(R, &b.recipients)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("encrypted for another key set"),
        "{out:?}"
    );
    const P: &str = "DBAGENT_ENCRYPTION_PREVIOUS_RECIPIENTS_FILE";
    ok(&push(&[(R, &b.recipients), (P, &a.recipients)]));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let out = push(&[(R, &b.recipients), (P, &a.recipients)]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"),
        "{out:?}"
    );
    pg.stop().unwrap();

    let objects = s3_objects(&repo);
    for marker in ["AMARK-", "BMARK-"] {
        assert_eq!(showing(&objects, marker), Vec::<String>::new(), "{marker}");
    }
    let status = ok(&run(
        &repo,
        None,
        &[(I, &b.identity)],
        &["encryption", "status"],
    ));
    assert!(
        status.contains("record 2") || status.contains("2"),
        "{status}"
    );

    // B alone cannot open A's objects: verify --full names them; both keys open everything.
    let full = run(&repo, None, &[(I, &b.identity)], &["verify", "--full"]);
    assert_eq!(
        full.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&full.stdout)
    );
    let both = keydir.path().join("both.key");
    let text = format!(
        "{}\n{}",
        std::fs::read_to_string(&a.identity).unwrap(),
        std::fs::read_to_string(&b.identity).unwrap()
    );
    std::fs::write(&both, text).unwrap();
    let _ = Command::new("chown")
        .arg("--reference")
        .arg(&a.identity)
        .arg(&both)
        .status();
    ok(&run(&repo, None, &[(I, &both)], &["verify", "--full"]));

    // A restore from A's backup replays plain, A and B WAL with the file holding both keys.
    pg.destroy_data().unwrap();
    let (_scratch, dir) = scratch_dir();
    let port = free_port().to_string();
    let restore = [
        "restore",
        "--latest",
        "--target-dir",
        dir.to_str().unwrap(),
        "--port",
        &port,
    ];
    refused(
        &run(&repo, None, &[(I, &a.identity)], &restore),
        "encryption.identity_file",
    );
    let out = run(&repo, None, &[(I, &both)], &restore);
    let restored = Restored {
        dir,
        port: port.parse().unwrap(),
    };
    ok(&out);
    assert_eq!(
        restored.psql(
            "SELECT count(*) FILTER (WHERE note LIKE 'PLAINMARK-%') || ' ' || count(*) FILTER (WHERE note LIKE 'AMARK-%') || ' ' || count(*) FILTER (WHERE note LIKE 'BMARK-%') FROM secrets"
        ),
        "300 300 300"
    );
    let _ = b.public;
}
