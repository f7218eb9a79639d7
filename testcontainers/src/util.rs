//! Small helpers shared by the server wrappers: ports, users, processes, logs, raw HTTP.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

/// Ports of servers that already run on this machine and must never be used.
const RESERVED_PORTS: [u16; 2] = [5432, 3306];

/// Number of log lines printed when a test panics.
pub(crate) const LOG_TAIL_LINES: usize = 80;

/// True when the current process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The OS picks the port; ports handed out earlier by this process (and 5432/3306) are
/// never returned twice, so servers started in parallel by one test binary cannot collide.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if RESERVED_PORTS.contains(&port) || !handed_out.insert(port) {
            continue;
        }
        return port;
    }
    panic!("could not find a free TCP port on 127.0.0.1");
}

/// uid and gid of an OS user, via `id`.
pub(crate) fn user_ids(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .arg(flag)
            .arg(user)
            .stdin(Stdio::null())
            .output()
            .context("running `id`")?;
        if !out.status.success() {
            bail!(
                "OS user `{user}` does not exist (id {flag} {user}: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("parsing output of id {flag} {user}"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// `chown -R uid:gid path` without following symlinks.
pub(crate) fn chown_recursive(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("read_dir {}", path.display()))? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

pub(crate) fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Creates a temp dir (mode 0700) with the given prefix, owned by `user` when we are root.
pub(crate) fn tempdir_for(prefix: &str, user: Option<&str>) -> Result<TempDir> {
    remember_panics();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating temp dir")?;
    chmod(dir.path(), 0o700)?;
    if let Some(user) = user {
        if is_root() {
            let (uid, gid) = user_ids(user)?;
            chown_recursive(dir.path(), uid, gid)?;
        }
    }
    Ok(dir)
}

/// Runs a command to completion (stdin = /dev/null) and returns its stdout; on a non-zero
/// exit the error contains the command, the exit status, stdout and stderr.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: failed to execute {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Errors unless `path` exists, naming what it is and how to fix it.
pub(crate) fn require_file(path: &Path, what: &str, hint: &str) -> Result<()> {
    if !path.exists() {
        bail!("{what} not found at {}: {hint}", path.display());
    }
    Ok(())
}

/// The last `n` lines of a text file (or a note that it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

thread_local! {
    /// What the current thread's test panicked with, for `finish_tempdir` to say again.
    static PANICKED_WITH: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps each thread's panic message: the server logs
/// printed while a failed test unwinds can push the message out of a CI log's tail, so
/// `finish_tempdir` prints it again after them.
fn remember_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let said = info.to_string();
            PANICKED_WITH.with(|p| *p.borrow_mut() = Some(said));
            previous(info);
        }));
    });
}

/// Drop-time reporting shared by all servers: when the current thread is panicking (a test
/// failed), print the tail of each log to stderr and keep the temp dir, printing its path.
/// Otherwise the temp dir is removed.
pub(crate) fn finish_tempdir(what: &str, dir: Option<TempDir>, logs: &[PathBuf]) {
    if !std::thread::panicking() {
        drop(dir);
        return;
    }
    for log in logs {
        if log.exists() {
            eprintln!(
                "===== {what}: last {LOG_TAIL_LINES} lines of {} =====\n{}\n===== end of {} =====",
                log.display(),
                log_tail(log, LOG_TAIL_LINES),
                log.display()
            );
        }
    }
    if let Some(dir) = dir {
        let kept = dir.keep();
        eprintln!("===== {what}: keeping temp dir {} =====", kept.display());
    }
    PANICKED_WITH.with(|p| {
        if let Some(said) = p.borrow().as_deref() {
            eprintln!("===== the test failed: {said} =====");
        }
    });
}

/// Whether a process exists and is not a zombie (PID 1 here may not reap orphans).
pub(crate) fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => proc_state(&stat).is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// State letter of a /proc/<pid>/stat line ("pid (comm) S ppid pgrp ...").
fn proc_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// Parent PID of a /proc/<pid>/stat line.
fn proc_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// All live descendants of `pid` (children, grandchildren, ...).
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) {
                if let Some(ppid) = proc_ppid(&stat) {
                    parent_of.push((child, ppid));
                }
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(c, p)| *p == parent && !found.contains(c))
                .map(|(c, _)| *c)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Sends `signal` (e.g. "KILL") to the given PIDs with the `kill` utility (no unsafe code).
pub(crate) fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .args(pids.iter().map(|p| p.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs `pid` and all its descendants at once (a crash of the whole process tree) and
/// waits until they are gone (zombies count as gone). Returns whether they all died in time.
///
/// PostgreSQL backends are not in the postmaster's process group (each calls setsid), so
/// the tree is collected from /proc before the kill.
pub(crate) fn kill_tree_and_wait(pid: u32, timeout: Duration) -> bool {
    let mut pids = vec![pid];
    pids.extend(descendants(pid));
    signal(&pids, "KILL");
    wait_until(timeout, || pids.iter().all(|p| !pid_alive(*p)))
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub(crate) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Quotes a string for /bin/sh.
pub(crate) fn shell_quote(s: impl AsRef<OsStr>) -> String {
    let s = s.as_ref().to_string_lossy();
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A minimal HTTP/1.1 request to 127.0.0.1:`port` (`Connection: close`, empty body).
/// Returns the status code and the response body (headers stripped, no chunked decoding).
pub fn http_request(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading response to {method} {path}"))?;
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("malformed HTTP response to {method} {path}: {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "1234 (post) gres) S 17 1234 1234 0 -1 4194560";
        assert_eq!(proc_state(stat), Some('S'));
        assert_eq!(proc_ppid(stat), Some(17));
    }

    #[test]
    fn quotes_for_shell() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&5432) && !ports.contains(&3306));
    }
}
