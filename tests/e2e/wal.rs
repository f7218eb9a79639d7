//! `wal-push` / `wal-fetch` contracts, as PostgreSQL relies on them.

use std::path::Path;
use std::process::Output;

use dbagent_testcontainers::Fill;

use crate::support::*;

const SYSID: &str = "7000000000000000001";

fn command(repo: &Repo, cwd: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd)
        .env("DBAGENT_PG_SYSTEM_IDENTIFIER", SYSID)
        .env("PGDATA", cwd)
        .env("DBAGENT_LOG_FORMAT", "text");
    for (k, v) in repo.env() {
        cmd.env(k, v);
    }
    cmd
}

fn run(repo: &Repo, cwd: &Path, args: &[&str]) -> Output {
    command(repo, cwd, args).output().unwrap()
}

/// A segment of this test's cluster (valid page headers, filler content).
fn segment_bytes(name: &str, seed: u8) -> Vec<u8> {
    dbagent_testcontainers::wal_segment(name, SYSID.parse().unwrap(), Fill::Pattern(seed))
}

fn wal_contract(repo: Repo) {
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let name = "000000010000000000000003";
    let seg = wal.join(name);
    let content = segment_bytes(name, 3);
    std::fs::write(&seg, &content).unwrap();

    // Push twice: both succeed.
    ok(&run(
        &repo,
        data.path(),
        &["wal-push", "pg_wal/000000010000000000000003"],
    ));
    ok(&run(
        &repo,
        data.path(),
        &["wal-push", "pg_wal/000000010000000000000003"],
    ));

    // A different segment under the same name fails loudly and changes nothing.
    std::fs::write(&seg, segment_bytes(name, 5)).unwrap();
    let out = run(
        &repo,
        data.path(),
        &["wal-push", "pg_wal/000000010000000000000003"],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to overwrite 000000010000000000000003"),
        "{stderr}"
    );

    // Fetch returns the original bytes.
    ok(&run(
        &repo,
        data.path(),
        &["wal-fetch", name, "pg_wal/RECOVERYXLOG"],
    ));
    assert!(
        std::fs::read(wal.join("RECOVERYXLOG")).unwrap() == content,
        "fetched bytes differ"
    );

    // A segment that is not archived: exit 1, nothing printed, nothing written.
    let out = run(
        &repo,
        data.path(),
        &[
            "wal-fetch",
            "0000000100000000000000FF",
            "pg_wal/RECOVERYXLOG2",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!wal.join("RECOVERYXLOG2").exists());

    // History files round-trip too.
    std::fs::write(
        wal.join("00000002.history"),
        "1\t0/3000158\tno recovery target specified\n",
    )
    .unwrap();
    ok(&run(
        &repo,
        data.path(),
        &["wal-push", "pg_wal/00000002.history"],
    ));
    ok(&run(
        &repo,
        data.path(),
        &["wal-fetch", "00000002.history", "pg_wal/RECOVERYHISTORY"],
    ));
    assert_eq!(
        std::fs::read_to_string(wal.join("RECOVERYHISTORY")).unwrap(),
        "1\t0/3000158\tno recovery target specified\n"
    );

    // Not a WAL file name: an input error.
    std::fs::write(wal.join("notes.txt"), "x").unwrap();
    refused(
        &run(&repo, data.path(), &["wal-push", "pg_wal/notes.txt"]),
        "is not a WAL segment",
    );
}

/// WAL archived before `wal-push` identified segments by xxh3-128 carries SHA-256: pushing
/// the same segment again still succeeds, a different one is still refused, and the old
/// object fetches as it was.
#[test]
fn a_segment_archived_with_sha256_compares_and_fetches_as_before() {
    let repo = Repo::file();
    let Repo::File(dir) = &repo else {
        unreachable!()
    };
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let name = "000000010000000000000007";
    let content = segment_bytes(name, 7);
    std::fs::write(wal.join(name), &content).unwrap();

    let store = dbagent::storage::LocalStore::new(dir.path().into());
    let key = dbagent::repo::wal_key(SYSID.parse().unwrap(), name);
    let opts = dbagent::pipeline::PipeOptions {
        compression: dbagent::config::Compression {
            level: 3,
            wal_level: 1,
            threads: 1,
        },
        upload: dbagent::config::UploadConfig {
            part_size: dbagent::config::MIN_PART_SIZE,
            concurrency: 1,
        },
        digest: dbagent::pipeline::Digest::Sha256,
        small: false,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let written = rt
        .block_on(dbagent::pipeline::upload(
            &store,
            &key,
            std::io::Cursor::new(content.clone()),
            opts,
        ))
        .unwrap();
    assert_eq!(written.trailer.digest, dbagent::pipeline::Digest::Sha256);
    let old = std::fs::read(dir.path().join(&key)).unwrap();

    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let pushed = run(&repo, data.path(), &["wal-push", &format!("pg_wal/{name}")]);
    ok(&pushed);
    assert!(
        stderr(&pushed).contains("already archived") || pushed.stderr.is_empty(),
        "{}",
        stderr(&pushed)
    );
    assert_eq!(
        std::fs::read(dir.path().join(&key)).unwrap(),
        old,
        "the old object was replaced"
    );

    std::fs::write(wal.join(name), segment_bytes(name, 8)).unwrap();
    let out = run(&repo, data.path(), &["wal-push", &format!("pg_wal/{name}")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refusing to overwrite"),
        "{}",
        stderr(&out)
    );

    ok(&run(
        &repo,
        data.path(),
        &["wal-fetch", name, "pg_wal/RECOVERYXLOG"],
    ));
    assert!(
        std::fs::read(wal.join("RECOVERYXLOG")).unwrap() == content,
        "fetched bytes differ"
    );
}

#[test]
fn wal_contract_on_file_repository() {
    wal_contract(Repo::file());
}

#[test]
fn wal_contract_on_s3() {
    wal_contract(Repo::s3("wal-contract"));
}

#[test]
fn corrupted_segment_is_refused_and_not_written() {
    let repo = Repo::file();
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let name = "000000010000000000000007";
    std::fs::write(wal.join(name), segment_bytes(name, 7)).unwrap();
    ok(&run(
        &repo,
        data.path(),
        &["wal-push", "pg_wal/000000010000000000000007"],
    ));
    let stored = repo
        .root()
        .unwrap()
        .join(format!("pg/{SYSID}/wal/000000010000000000000007.zst"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();
    let out = run(
        &repo,
        data.path(),
        &[
            "wal-fetch",
            "000000010000000000000007",
            "pg_wal/RECOVERYXLOG",
        ],
    );
    // Above 125: PostgreSQL stops recovery instead of promoting early at this segment.
    assert_eq!(
        out.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
    assert!(
        !wal.join("RECOVERYXLOG").exists(),
        "a corrupt segment reached pg_wal"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains("tmp")),
        "temp files left: {leftovers:?}"
    );
}

/// A claim left in pg_wal by a container that restarted names a pid the new container has
/// handed out again: it is not taken for a download in progress (which `wal-fetch` would
/// wait for until its retry window ran out).
#[test]
fn a_claim_naming_a_reused_pid_is_not_waited_for() {
    let repo = Repo::file();
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    let name = "000000010000000000000002";
    std::fs::create_dir_all(wal.join(".dbagent-prefetch")).unwrap();
    std::fs::write(wal.join(name), segment_bytes(name, 2)).unwrap();
    ok(&run(
        &repo,
        data.path(),
        &["wal-push", &format!("pg_wal/{name}")],
    ));
    std::fs::remove_file(wal.join(name)).unwrap();
    // A live process (this test), not the one that wrote the claim, as a restarted container
    // hands out its pids again; the claim as dbagent wrote it before claims had start times.
    std::fs::write(
        wal.join(".dbagent-prefetch").join(format!("{name}.claim")),
        std::process::id().to_string(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut cmd = command(
        &repo,
        data.path(),
        &["wal-fetch", name, "pg_wal/RECOVERYXLOG"],
    );
    cmd.env("DBAGENT_WAL_FETCH_RETRY_TIMEOUT", "60s");
    ok(&cmd.output().unwrap());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "wal-fetch waited {:?} for a dead claim",
        started.elapsed()
    );
    assert!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap() == segment_bytes(name, 2));
}

#[test]
fn fetch_prefetches_following_segments() {
    let repo = Repo::file();
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    for n in 1..=4u8 {
        let name = format!("00000001000000000000000{n}");
        std::fs::write(wal.join(&name), segment_bytes(&name, n)).unwrap();
        ok(&run(
            &repo,
            data.path(),
            &["wal-push", &format!("pg_wal/{name}")],
        ));
        std::fs::remove_file(wal.join(&name)).unwrap();
    }
    ok(&run(
        &repo,
        data.path(),
        &[
            "wal-fetch",
            "000000010000000000000001",
            "pg_wal/RECOVERYXLOG",
        ],
    ));
    let prefetched = wal
        .join(".dbagent-prefetch")
        .join("000000010000000000000004");
    for _ in 0..100 {
        if prefetched.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(prefetched.exists(), "segment 4 was not prefetched");
    // The next fetch takes the prefetched copy, verified, with the right bytes.
    ok(&run(
        &repo,
        data.path(),
        &[
            "wal-fetch",
            "000000010000000000000002",
            "pg_wal/RECOVERYXLOG",
        ],
    ));
    assert!(
        std::fs::read(wal.join("RECOVERYXLOG")).unwrap()
            == segment_bytes("000000010000000000000002", 2)
    );
    assert!(
        !wal.join(".dbagent-prefetch")
            .join("000000010000000000000002")
            .exists()
    );
}
