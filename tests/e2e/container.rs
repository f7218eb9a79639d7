//! dbagent as a container's first process: PID 1 of a PID namespace of its own, as in a Job's
//! pod, where every orphan of the namespace becomes its child.

use std::time::Duration;

use dbagent_testcontainers::{free_port, is_root, pg_owned_tempdir};

use crate::support::*;

/// Zombie dbagent processes (the `wal-prefetch` a `wal-fetch` leaves) whose parent is
/// `parent` (host PIDs). Not the server's: when PID 1 exits, the kernel kills the server the
/// restore left running, whose processes pass through that state as the namespace ends.
fn zombies_of(parent: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let mut fields = stat[close + 1..].split_whitespace();
            &stat[open + 1..close] == "dbagent"
                && fields.next() == Some("Z")
                && fields.next() == Some(&parent.to_string())
        })
        .count()
}

/// A restore as PID 1 (its server's replay runs `wal-fetch`, which leaves a `wal-prefetch`
/// behind for each segment, and `pg_ctl` leaves the server itself): the orphans it inherits
/// are reaped, and the restore's own exit status is the container's.
#[test]
fn as_pid_1_a_restore_reaps_what_it_inherits() {
    assert!(
        is_root(),
        "this test runs dbagent as PID 1 with unshare: run it as root"
    );
    let repo = Repo::file();
    let pg = archiving_primary(&repo);
    pg.psql("postgres", "CREATE TABLE t (i int)").unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup"]));
    for i in 0..6 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({i})"))
            .unwrap();
        switch_and_wait_archived(&pg);
    }
    let scratch = pg_owned_tempdir().unwrap();
    let dir = scratch.path().join("r");
    let port = free_port();
    let port_s = port.to_string();
    let args = [
        "restore",
        "--latest",
        "--target-dir",
        dir.to_str().unwrap(),
        "--port",
        &port_s,
    ];
    // setpriv changes user without a fork: dbagent itself is PID 1.
    let setpriv = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        BIN,
    ];
    let mut child = in_own_pid_namespace(
        &dbagent_cmd(&repo, None, &args),
        setpriv.iter().chain(args.iter()),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // unshare forks; its child is the namespace's PID 1.
    let mut first = None;
    let mut most = 0;
    while child.try_wait().unwrap().is_none() {
        if first.is_none() {
            first = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .ok()
                .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok());
        }
        if let Some(pid1) = first {
            most = most.max(zombies_of(pid1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let said = ok(&out);
    assert!(said.contains("restored:"), "{said}");
    assert!(first.is_some(), "PID 1 was never seen");
    // A zombie lives between its exit and its parent's wait: one may be caught in passing,
    // and two that exit together on a loaded machine before PID 1 is scheduled. Unreaped,
    // they pile up: one per segment replayed (each `wal-fetch` leaves a `wal-prefetch`), and
    // the server.
    assert!(most <= 2, "{most} zombies at once under PID 1");
}
