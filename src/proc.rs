//! Child processes: the one place that starts programs (`pg_dump`, `pg_restore`, `pg_ctl`,
//! `mariadb-dump`, `mariadb`, `mariadb-binlog`, scheduled jobs, `wal-fetch`'s detached
//! prefetch). Base backups start none: `pg::basebackup` reads the server's stream itself.
//!
//! A `Program` says what to run: a path, arguments and environment, never a shell, never a
//! secret in the arguments (passwords travel in the environment or in a private option file).
//! A `Run` adds what the caller wants to see or decide while it runs (each stderr line as it
//! comes, what a failure means, a watchdog that stops it), and runs it one of a few ways:
//!
//! - `to_store`: the program's stdout (after an optional prefix, shown to an optional watcher)
//!   is compressed and uploaded to one key. A failed upload kills the program and is the error
//!   reported (the kill is not the news); a program that fails is reported with the telling
//!   line of its stderr; either way nothing is left under the key.
//! - `from_store`: an object is downloaded and decompressed into the program's stdin; the
//!   program's failure comes first, then the download's, then the checksum against the manifest.
//! - `pipe_into`: one program's stdout into another's stdin (`mariadb-binlog | mariadb`).
//! - `output`: a short run whose stdout is wanted.
//!
//! Every run keeps the last lines of the program's stderr (each also logged at debug level), for
//! the error message. Programs are killed when the future running them is dropped (a drill
//! interrupted by SIGTERM, a `serve` that drains), except servers, which start in their own
//! process group and outlive the command that started them.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::pipeline::{self, PipeOptions, Tap, Watch};
use crate::repo::manifest::ObjectRef;
use crate::storage::Store;

/// stderr lines kept for the error message.
const TAIL_LINES: usize = 40;
/// How long stderr is still read after the program exited.
const TAIL_GRACE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct Program {
    path: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
}

impl Program {
    pub fn new(path: impl Into<PathBuf>) -> Program {
        Program {
            path: path.into(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Program {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Program
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Program {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(mut self, vars: I) -> Program
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Program {
        self.dir = Some(dir.into());
        self
    }

    /// The program's file name, for messages and logs.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .unwrap_or(self.path.as_os_str())
            .to_string_lossy()
            .into_owned()
    }

    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.path);
        cmd.args(&self.args).envs(self.env.iter().cloned());
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    fn spawn(
        &self,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::from(self.command());
        cmd.stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        tracing::debug!(program = %self.path.display(), "starting");
        cmd.spawn()
            .with_context(|| format!("starting {}", self.path.display()))
    }

    /// Runs it with no hooks (see `Run`).
    pub fn run(&self) -> Run<'_> {
        Run {
            program: self,
            on_line: None,
            on_failure: None,
            stop: None,
        }
    }

    /// Runs it with the caller's stdio until it exits or `stop` resolves. Then it gets SIGTERM
    /// and `grace` to finish (a drill tears its scratch server down), SIGKILL after that, and
    /// `None` is returned. For jobs that report for themselves (`serve`'s schedules).
    pub async fn status_until(
        &self,
        stop: impl Future<Output = ()>,
        grace: Duration,
    ) -> anyhow::Result<Option<ExitStatus>> {
        let mut child = self.spawn(Stdio::inherit(), Stdio::inherit(), Stdio::inherit())?;
        tokio::select! {
            status = child.wait() => return Ok(Some(status?)),
            _ = stop => {}
        }
        if let Some(pid) = child.id() {
            // SAFETY: a signal to the child this runner started and has not reaped yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                tracing::info!(program = %self.name(), status = %status?, "stopped on request");
            }
            Err(_) => {
                tracing::warn!(program = %self.name(), grace = %humantime::format_duration(grace), "did not stop within its grace period after SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
        Ok(None)
    }

    /// Starts a server that outlives this process: its own process group (a ^C to dbagent does
    /// not reach it), stdin closed, stdout and stderr appended to `log`.
    pub fn spawn_server(&self, log: &Path) -> anyhow::Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        self.command()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.path.display()))
    }

    /// Starts a helper that runs on by itself (`wal-fetch`'s prefetch): stdio closed, its own
    /// process group, so a signal to the caller's group does not interrupt it mid-write. Nobody
    /// waits for it; whatever goes wrong in it is retried by whoever needs its work.
    pub fn spawn_detached(&self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.path.display()))?;
        Ok(())
    }

    /// Runs it to the end, blocking the thread, output discarded. Only for cleanup in `Drop`,
    /// where nothing can be awaited.
    pub fn status_blocking(&self) -> std::io::Result<ExitStatus> {
        self.command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    }
}

type LineHook = Box<dyn FnMut(&str) + Send>;
type FailureHook<'a> = Box<dyn FnOnce(&Exit) -> anyhow::Error + Send + 'a>;
type StopFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Error> + Send + 'a>>;

/// One run of a program, with what the caller wants to see and decide along the way.
pub struct Run<'a> {
    program: &'a Program,
    on_line: Option<LineHook>,
    on_failure: Option<FailureHook<'a>>,
    stop: Option<StopFuture<'a>>,
}

impl<'a> Run<'a> {
    /// Shows every stderr line, as it arrives, to `f` (progress, a wait to notice).
    pub fn on_stderr_line(mut self, f: impl FnMut(&str) + Send + 'static) -> Run<'a> {
        self.on_line = Some(Box::new(f));
        self
    }

    /// Turns the program's failure into the caller's error (default: `Exit::error`), e.g. a
    /// client's "access denied" into an input error.
    pub fn on_failure(mut self, f: impl FnOnce(&Exit) -> anyhow::Error + Send + 'a) -> Run<'a> {
        self.on_failure = Some(Box::new(f));
        self
    }

    /// A watchdog: when `stop` resolves, the program is killed and its error is the result.
    pub fn stop_when(mut self, stop: impl Future<Output = anyhow::Error> + Send + 'a) -> Run<'a> {
        self.stop = Some(Box::pin(stop));
        self
    }

    /// Streams the program's stdout into `key` (see the module docs). Returns the object and
    /// the watcher, which has seen every byte.
    pub async fn to_store<W: Watch + Default + 'static>(
        self,
        store: &dyn Store,
        key: &str,
        pipe: PipeOptions,
        stdout: Stdout<W>,
    ) -> anyhow::Result<(ObjectRef, W)> {
        let Run {
            program,
            on_line,
            on_failure,
            stop,
        } = self;
        // A writer the repository refuses (encryption keys) is refused before the program runs.
        pipeline::recipients(store).await?;
        let mut child = program.spawn(Stdio::null(), Stdio::piped(), Stdio::piped())?;
        let out = blocking(child.stdout.take().expect("piped").into_owned_fd())?;
        pipeline::widen_pipe(&out);
        let tail = Tail::start(program, child.stderr.take().expect("piped"), on_line);
        let (reader, watcher) = Tap::new(
            Read::chain(std::io::Cursor::new(stdout.prefix), out),
            stdout.watch,
        );
        let upload = pipeline::upload(store, key, reader, pipe);
        tokio::pin!(upload);
        let mut stopped = None;
        let uploaded = match stop {
            None => upload.await,
            Some(stop) => tokio::select! {
                res = &mut upload => res,
                e = stop => {
                    // The program's stdout closes: the upload ends, and is deleted below.
                    let _ = child.start_kill();
                    stopped = Some(e);
                    upload.await
                }
            },
        };
        if uploaded.is_err() {
            let _ = child.start_kill();
        }
        let status = child.wait().await;
        let exit = Exit::new(program, status?, tail.finish().await, Vec::new());
        let result = match (stopped, uploaded) {
            (Some(e), _) => Err(e),
            // A failed upload stopped the program: report the storage error, not the kill.
            (None, Err(e)) => Err(e),
            (None, Ok(_)) if !exit.status.success() => Err(failure(on_failure, &exit)),
            (None, Ok(w)) => Ok(w),
        };
        match result {
            Ok(written) => {
                let watch = std::mem::take(&mut *watcher.lock().unwrap_or_else(|e| e.into_inner()));
                Ok((ObjectRef::written(key, &written), watch))
            }
            Err(e) => {
                let _ = store.delete(key).await;
                Err(e)
            }
        }
    }

    /// Streams `object` from the store into the program's stdin and checks it against the
    /// checksum its manifest recorded. `what` names it in messages ("dump 2026…").
    pub async fn from_store(
        self,
        store: &dyn Store,
        object: &ObjectRef,
        what: &str,
    ) -> anyhow::Result<()> {
        let Run {
            program,
            on_line,
            on_failure,
            stop: _,
        } = self;
        // A reader without the key is refused before the program starts.
        pipeline::check_readable(store, object.needs().as_slice()).await?;
        let mut child = program.spawn(Stdio::piped(), Stdio::null(), Stdio::piped())?;
        let stdin = blocking(child.stdin.take().expect("piped").into_owned_fd())?;
        let tail = Tail::start(program, child.stderr.take().expect("piped"), on_line);
        // The program sees the end of its input once the download is done with the pipe.
        let downloaded =
            pipeline::download(store, &object.key, stdin)
                .await
                .map(|(stdin, fetched)| {
                    drop(stdin);
                    fetched
                });
        let status = child.wait().await?;
        let exit = Exit::new(program, status, tail.finish().await, Vec::new());
        // A refused key is what to fix, whatever the program made of its empty input.
        if let Err(e) = &downloaded
            && crate::error::exit_code(e) == crate::error::EXIT_INPUT
        {
            return downloaded.map(drop);
        }
        if !exit.status.success() {
            let failed = failure(on_failure, &exit);
            // A download that broke first cut the program's input: that is the cause to name.
            return match downloaded {
                Err(e) if !crate::error::is_broken_pipe(&e) => Err(e.context(format!(
                    "downloading {what} (which cut {}'s input: {})",
                    program.name(),
                    crate::error::one_line(&failed)
                ))),
                _ => Err(failed),
            };
        }
        let trailer = downloaded.with_context(|| format!("downloading {what}"))?;
        object.verify(&trailer, what)
    }

    /// Runs this program with its stdout feeding `next`'s stdin. `next`'s failure is the one
    /// reported (it stops reading, so this one fails too); this one's, when `next` succeeded.
    pub async fn pipe_into(self, next: Run<'_>) -> anyhow::Result<()> {
        let mut first = self
            .program
            .spawn(Stdio::null(), Stdio::piped(), Stdio::piped())?;
        let through = blocking(first.stdout.take().expect("piped").into_owned_fd())?;
        let first_tail = Tail::start(
            self.program,
            first.stderr.take().expect("piped"),
            self.on_line,
        );
        let mut second = next
            .program
            .spawn(Stdio::from(through), Stdio::null(), Stdio::piped())?;
        let second_tail = Tail::start(
            next.program,
            second.stderr.take().expect("piped"),
            next.on_line,
        );
        let second_status = second.wait().await?;
        if !second_status.success() {
            let _ = first.start_kill();
        }
        let first_status = first.wait().await?;
        let first_exit = Exit::new(
            self.program,
            first_status,
            first_tail.finish().await,
            vec![],
        );
        let second_exit = Exit::new(
            next.program,
            second_status,
            second_tail.finish().await,
            vec![],
        );
        if !second_exit.status.success() {
            return Err(failure(next.on_failure, &second_exit));
        }
        if !first_exit.status.success() {
            return Err(failure(self.on_failure, &first_exit));
        }
        Ok(())
    }

    /// Runs it to the end with stdin closed and returns how it ended, stdout included. A
    /// failure is not an error here: the caller decides (see `check`).
    pub async fn output(self) -> anyhow::Result<Exit> {
        let mut child = self
            .program
            .spawn(Stdio::null(), Stdio::piped(), Stdio::piped())?;
        let tail = Tail::start(
            self.program,
            child.stderr.take().expect("piped"),
            self.on_line,
        );
        let mut stdout = child.stdout.take().expect("piped");
        let mut out = Vec::new();
        let (read, status) = tokio::join!(stdout.read_to_end(&mut out), child.wait());
        read.with_context(|| format!("reading the output of {}", self.program.name()))?;
        Ok(Exit::new(self.program, status?, tail.finish().await, out))
    }

    /// `output`, with a failure turned into an error (`on_failure`, or `Exit::error`).
    pub async fn check(mut self) -> anyhow::Result<Exit> {
        let on_failure = self.on_failure.take();
        let exit = self.output().await?;
        if exit.status.success() {
            Ok(exit)
        } else {
            Err(failure(on_failure, &exit))
        }
    }
}

fn failure(on_failure: Option<FailureHook<'_>>, exit: &Exit) -> anyhow::Error {
    match on_failure {
        Some(f) => f(exit),
        None => exit.error(),
    }
}

/// The pipe back in blocking mode, for the compression and decompression threads.
fn blocking(fd: std::io::Result<std::os::fd::OwnedFd>) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::from(
        fd.context("taking over a child's pipe")?,
    ))
}

/// What goes to the store in `to_store`: the program's stdout after `prefix`, every byte shown
/// to `watch`.
pub struct Stdout<W> {
    prefix: Vec<u8>,
    watch: W,
}

impl Stdout<Unwatched> {
    pub fn plain() -> Stdout<Unwatched> {
        Stdout {
            prefix: Vec::new(),
            watch: Unwatched,
        }
    }
}

impl<W: Watch> Stdout<W> {
    pub fn watched(watch: W) -> Stdout<W> {
        Stdout {
            prefix: Vec::new(),
            watch,
        }
    }

    /// Bytes stored before the program's output (and shown to the watcher first).
    pub fn after(mut self, prefix: Vec<u8>) -> Stdout<W> {
        self.prefix = prefix;
        self
    }
}

/// A watcher that looks at nothing.
#[derive(Debug, Default)]
pub struct Unwatched;

impl Watch for Unwatched {
    fn watch(&mut self, _: &[u8]) {}
}

/// How a program ended.
#[derive(Debug)]
pub struct Exit {
    program: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    stderr: Vec<String>,
}

impl Exit {
    fn new(program: &Program, status: ExitStatus, stderr: Vec<String>, stdout: Vec<u8>) -> Exit {
        Exit {
            program: program.name(),
            status,
            stdout,
            stderr,
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The last lines of stderr.
    pub fn stderr(&self) -> String {
        self.stderr.join("\n")
    }

    /// The line of stderr that says what went wrong: the first error line, else the last.
    pub fn telling_line(&self) -> String {
        telling_line(&self.stderr)
    }

    /// "`program` failed (`status`): `telling line`".
    pub fn error(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "{} failed ({}): {}",
            self.program,
            self.status,
            self.telling_line()
        )
    }
}

/// The most telling of a program's output lines: the first that reports an error (warnings
/// left aside), else the last one.
pub fn telling_line<S: AsRef<str>>(lines: &[S]) -> String {
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.as_ref().trim())
        .filter(|l| !l.is_empty() && !l.starts_with("Warning:") && !l.contains("[Warning]"))
        .collect();
    lines
        .iter()
        .find(|l| l.contains("ERROR") || l.contains("error") || l.contains("FATAL"))
        .or(lines.last())
        .copied()
        .unwrap_or("no error message")
        .to_string()
}

/// Reads a program's stderr to its end, logging each line at debug level and keeping the last
/// `TAIL_LINES`. Lines need not be UTF-8.
struct Tail {
    kept: Arc<Mutex<VecDeque<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Tail {
    fn start(
        program: &Program,
        stderr: tokio::process::ChildStderr,
        mut on_line: Option<LineHook>,
    ) -> Tail {
        let name = program.name();
        let kept = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let lines = kept.clone();
        let reader = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                tracing::debug!(program = %name, "{line}");
                if let Some(f) = on_line.as_mut() {
                    f(&line);
                }
                let mut kept = lines.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() == TAIL_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        Tail { kept, reader }
    }

    /// The lines, once the program has exited. A process it left behind may hold stderr open:
    /// its last words are not waited for beyond `TAIL_GRACE`.
    async fn finish(mut self) -> Vec<String> {
        if tokio::time::timeout(TAIL_GRACE, &mut self.reader)
            .await
            .is_err()
        {
            self.reader.abort();
        }
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalStore;

    fn pipe() -> PipeOptions {
        let mut opts = PipeOptions::for_tests();
        opts.upload.concurrency = 2;
        opts
    }

    fn sh(script: &str) -> Program {
        Program::new("/bin/sh").arg("-c").arg(script)
    }

    #[derive(Default)]
    struct Count(u64);
    impl Watch for Count {
        fn watch(&mut self, buf: &[u8]) {
            self.0 += buf.len() as u64;
        }
    }

    #[tokio::test]
    async fn stdout_goes_to_the_store_after_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let (obj, count) = sh("printf world")
            .run()
            .to_store(
                &store,
                "k",
                pipe(),
                Stdout::watched(Count::default()).after(b"hello ".to_vec()),
            )
            .await
            .unwrap();
        assert_eq!(count.0, 11);
        assert_eq!(obj.plain_bytes, 11);
        let (plain, fetched) = pipeline::download(&store, "k", Vec::new()).await.unwrap();
        assert_eq!(plain, b"hello world");
        obj.verify(&fetched, "k").unwrap();
    }

    #[tokio::test]
    async fn a_failing_program_is_reported_with_its_error_line_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let err = sh("echo some output; echo 'note: starting' >&2; echo 'prog: error: it broke' >&2; echo 'cleaning up' >&2; exit 3")
            .run()
            .to_store(&store, "k", pipe(), Stdout::plain())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sh failed (exit status: 3): prog: error: it broke"
        );
        assert!(store.list("").await.unwrap().is_empty());
        // The caller can say what a failure means.
        let err = sh("echo 'ERROR 1045 (28000): Access denied' >&2; exit 1")
            .run()
            .on_failure(|exit| crate::input_err!("cannot connect: {}", exit.telling_line()))
            .to_store(&store, "k", pipe(), Stdout::plain())
            .await
            .unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 1);
        assert!(err.to_string().contains("Access denied"), "{err}");
    }

    #[tokio::test]
    async fn a_watchdog_kills_the_program_and_its_error_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = seen.clone();
        let started = std::time::Instant::now();
        let err = sh("echo waiting >&2; echo data; exec sleep 600")
            .run()
            .on_stderr_line(move |l| lines.lock().unwrap().push(l.to_string()))
            .stop_when(async {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                anyhow::anyhow!("stuck")
            })
            .to_store(&store, "k", pipe(), Stdout::plain())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "stuck");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        assert_eq!(*seen.lock().unwrap(), vec!["waiting".to_string()]);
        assert!(store.list("").await.unwrap().is_empty());
    }

    /// A store whose uploads always fail.
    #[derive(Debug)]
    struct Broken;
    #[async_trait::async_trait]
    impl Store for Broken {
        async fn put(&self, key: &str, _: bytes::Bytes) -> anyhow::Result<()> {
            anyhow::bail!("the store refused {key}")
        }
        async fn put_new(&self, key: &str, _: bytes::Bytes) -> anyhow::Result<()> {
            anyhow::bail!("the store refused {key}")
        }
        async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn crate::storage::Upload>> {
            anyhow::bail!("the store refused {key}")
        }
        async fn start_upload_new(
            &self,
            key: &str,
        ) -> anyhow::Result<Box<dyn crate::storage::Upload>> {
            anyhow::bail!("the store refused {key}")
        }
        async fn get(&self, _: &str) -> anyhow::Result<crate::storage::ByteStream> {
            anyhow::bail!("no")
        }
        async fn get_range(
            &self,
            _: &str,
            _: std::ops::Range<u64>,
        ) -> anyhow::Result<bytes::Bytes> {
            anyhow::bail!("no")
        }
        async fn head(&self, _: &str) -> anyhow::Result<Option<crate::storage::ObjectInfo>> {
            Ok(None)
        }
        async fn list(&self, _: &str) -> anyhow::Result<Vec<crate::storage::ObjectInfo>> {
            Ok(vec![])
        }
        async fn delete(&self, _: &str) -> anyhow::Result<()> {
            Ok(())
        }
        async fn leftovers(&self) -> anyhow::Result<Vec<crate::storage::Leftover>> {
            Ok(vec![])
        }
        async fn remove_leftover(&self, _: &crate::storage::Leftover) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_storage_error_wins_over_the_kill() {
        // Incompressible and endless: the upload fails at its second part while the program
        // still writes, and only the kill stops it.
        let err = sh("exec cat /dev/urandom")
            .run()
            .to_store(&Broken, "k", pipe(), Stdout::plain())
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("the store refused k"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn the_store_feeds_a_program_and_the_checksum_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let out = dir.path().join("out");
        let (obj, _) = sh("printf 'SELECT 1;'")
            .run()
            .to_store(&store, "dump", pipe(), Stdout::plain())
            .await
            .unwrap();
        let copy = format!("cat > {}", out.display());
        sh(&copy)
            .run()
            .from_store(&store, &obj, "dump d1")
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"SELECT 1;");
        // Another object's checksum in the manifest: corrupt.
        let wrong = ObjectRef {
            sha256: "00".repeat(32),
            ..obj.clone()
        };
        let err = sh(&copy)
            .run()
            .from_store(&store, &wrong, "dump d1")
            .await
            .unwrap_err();
        assert!(crate::error::is_corrupt(&err), "{err:#}");
        assert!(err.to_string().contains("dump d1 is corrupt"), "{err}");
        // The program's failure comes first.
        let err = sh("cat > /dev/null; echo 'ERROR at line 1: bad' >&2; exit 1")
            .run()
            .from_store(&store, &obj, "dump d1")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ERROR at line 1: bad"), "{err}");
    }

    #[tokio::test]
    async fn pipelines_report_the_consumer_first() {
        let producer = sh("yes | head -n 1000");
        let ok = sh("wc -l > /dev/null");
        producer.run().pipe_into(ok.run()).await.unwrap();
        let consumer = sh("read x; echo 'ERROR 1064: syntax' >&2; exit 1");
        let endless = sh("yes");
        let err = endless.run().pipe_into(consumer.run()).await.unwrap_err();
        assert!(err.to_string().contains("ERROR 1064"), "{err}");
        let failing = sh("echo 'reader: error: file not found' >&2; exit 2");
        let err = failing.run().pipe_into(ok.run()).await.unwrap_err();
        assert!(err.to_string().contains("file not found"), "{err}");
    }

    #[tokio::test]
    async fn output_and_stderr_lines() {
        let exit = sh("printf out; printf 'a\\nb\\377\\n' >&2; exit 4")
            .run()
            .output()
            .await
            .unwrap();
        assert!(!exit.success());
        assert_eq!(exit.stdout, b"out");
        assert_eq!(exit.stderr(), "a\nb\u{fffd}");
        assert!(sh("exit 1").run().check().await.is_err());
        let err = Program::new("/no/such/program")
            .run()
            .output()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("starting /no/such/program"),
            "{err}"
        );
    }

    #[test]
    fn telling_lines() {
        assert_eq!(
            telling_line(&[
                "Warning: Using a password on the command line",
                "ERROR 1146 (42S02) at line 1: Table 'a.b' doesn't exist",
                "more"
            ]),
            "ERROR 1146 (42S02) at line 1: Table 'a.b' doesn't exist"
        );
        assert_eq!(telling_line(&["one", "two", ""]), "two");
        assert_eq!(telling_line::<&str>(&[]), "no error message");
    }
}
