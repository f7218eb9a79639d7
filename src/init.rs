//! dbagent as a container's first process. PID 1 of a PID namespace inherits every orphan in
//! it and must reap them: `pg_ctl` leaves the server it starts behind, each `wal-fetch` its
//! `wal-prefetch`. Unreaped, they stay zombies, thousands in a monthly drill, and a zombie
//! still answers `kill(pid, 0)`. PID 1 also gets no signal it has no handler for, so SIGTERM
//! would not stop a command that does not listen for it. As PID 1, dbagent therefore forks:
//! the child does the work; the parent forwards the usual signals to it, reaps every child
//! the namespace hands it, and exits with the child's status, as tini does.

use std::sync::atomic::{AtomicI32, Ordering};

/// The child doing the work, for the signal handler.
static WORKER: AtomicI32 = AtomicI32::new(0);

/// Signals passed on to the worker.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// As PID 1 (unless `DBAGENT_NO_INIT` is set), forks and returns only in the child; the
/// parent reaps until the child exits, then exits with its status. Call before any thread
/// exists.
pub fn become_init_if_pid_1() {
    if std::process::id() != 1 || std::env::var_os("DBAGENT_NO_INIT").is_some() {
        return;
    }
    // The forwarded signals wait, blocked, until the parent's handlers are in place: PID 1
    // drops a signal it has no handler for.
    // SAFETY: sigset_t values filled by sigemptyset/sigaddset; one thread, so sigprocmask
    // is the process's mask.
    let old = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    // SAFETY: no other thread exists yet (the caller's contract), so the child may go on.
    match unsafe { libc::fork() } {
        -1 => eprintln!(
            "dbagent: warning: running as PID 1 without reaping orphans: fork failed: {}",
            std::io::Error::last_os_error()
        ),
        0 => {}
        worker => reap(worker, &old),
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
}

extern "C" fn forward(sig: libc::c_int) {
    let worker = WORKER.load(Ordering::Relaxed);
    if worker > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(worker, sig) };
    }
}

fn reap(worker: libc::pid_t, mask: &libc::sigset_t) -> ! {
    WORKER.store(worker, Ordering::Relaxed);
    for sig in FORWARDED {
        // SAFETY: a handler that only calls kill; SA_RESTART keeps waitpid going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    // SAFETY: restores the mask saved before the fork; blocked signals are delivered now.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) };
    loop {
        let mut status = 0;
        // SAFETY: waits for any child; `status` outlives the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == worker {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            std::process::exit(code);
        }
        if pid == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            // Cannot happen while the worker lives; nothing is left to wait for.
            std::process::exit(1);
        }
    }
}
