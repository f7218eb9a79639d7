//! `wal-push` (archive_command) and `wal-fetch` (restore_command), with look-ahead prefetch.
//!
//! `wal-push` checks every page header of a segment as it reads it (`walcheck`: the right
//! segment, of this cluster) and stores it create-only: of two pushes racing under one name,
//! only one stores; the other compares checksums and succeeds only for the same content.
//!
//! `wal-fetch` answers "not archived" (exit 1) only when the repository says so. Transient
//! failures are retried with backoff for `wal.fetch_retry_timeout`; anything else exits 126,
//! which stops recovery instead of promoting early (see `error::fetch_exit_code`).
//!
//! `wal-fetch` is spawned once per segment by PostgreSQL. To keep replay from waiting on one
//! download at a time, each call starts a detached `wal-prefetch` process that downloads the
//! next segments into `pg_wal/.dbagent-prefetch/`; the next call finds its segment there
//! (already verified) and moves it into place. Claims (`<name>.claim`, holding the pid and
//! its start time) keep two processes from downloading the same segment.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Config;
use crate::error::Failure;
use crate::input_err;
use crate::pg::walcheck::WalCheck;
use crate::pg::walrefs::{self, SummaryWatch};
use crate::pg::walscan::WalScan;
use crate::pipeline::{self, PipeOptions, Tap, WriteMode};
use crate::repo::wal::{Lsn, Segment, WalFile};
use crate::repo::{self};
use crate::storage::{self, Store};

pub const PREFETCH_DIR: &str = ".dbagent-prefetch";

/// What `wal-push` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Uploaded,
    AlreadyArchived,
}

/// Files up to this size (every WAL segment size but the largest) are compressed into memory
/// while the store is asked whether the name is taken, so the round trip costs no time; bigger
/// files stream as they are read.
const OVERLAP_MAX: u64 = 64 << 20;

/// Archives one WAL file. Exit 0 (Ok) only once it is durably stored.
pub async fn push(cfg: &Config, store: &dyn Store, path: &Path) -> anyhow::Result<Pushed> {
    Pending::start(cfg, path)?.finish(store).await
}

/// `push` for `dbagent wal-push`, a fresh process per segment: the store client (TLS roots,
/// credentials) is built while the segment compresses. Store errors (a bad repository URL,
/// missing credentials) still come first.
pub async fn push_opening(cfg: &Config, path: &Path) -> anyhow::Result<Pushed> {
    if stored_by_sidecar(cfg, path).await {
        return Ok(Pushed::AlreadyArchived);
    }
    let opening = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || storage::open(&cfg))
    };
    let pending = Pending::start(cfg, path);
    let store = opening.await.context("opening the repository")??;
    pending?.finish(store.as_ref()).await
}

/// The fast path (see `walsidecar`): the streaming sidecar stored this segment and the file's
/// first page header says it is that segment of this cluster. Anything else, including any
/// error, is `false` and the segment is pushed as usual, which reports what is wrong.
async fn stored_by_sidecar(cfg: &Config, path: &Path) -> bool {
    let Some(addr) = cfg.wal.sidecar else {
        return false;
    };
    let Ok(name) = file_name(path) else {
        return false;
    };
    if !matches!(WalFile::classify(&name), Some(WalFile::Segment(_))) {
        return false;
    }
    let sysid = match cfg.pg.system_identifier {
        Some(id) => id,
        None => {
            let data_dir = crate::pg::control::data_dir_for(path, cfg.pg.data_dir.as_deref());
            match crate::pg::control::system_identifier(&data_dir) {
                Ok(id) => id,
                Err(_) => return false,
            }
        }
    };
    let repository = cfg.repository_identity();
    if !crate::pg::walsidecar::stored(addr, &repository, sysid, &name, cfg.wal.sidecar_wait).await {
        return false;
    }
    match crate::pg::walcheck::first_page(path, &name, sysid) {
        Ok(()) => {
            tracing::info!(segment = %name, "already stored by the sidecar: not pushed again");
            true
        }
        Err(e) => {
            tracing::warn!(segment = %name, error = %format!("{e:#}"), "the streaming sidecar stored this segment, but this file's first page is not that segment: pushing it the usual way");
            false
        }
    }
}

/// Whether a segment (`file`, `len` bytes) was closed early by a WAL switch (`pg_switch_wal`,
/// `archive_timeout`, and the two switches of every backup): its last page is all zeros,
/// which a segment written to its end never has (every page starts with a header).
///
/// Such a segment is a few KiB of records and then zeros, which one zstd thread with the
/// hash in line handles faster than the multithreaded setup costs: `wal-push` of a switched
/// segment took 14.6 ms of CPU with two workers and a hashing thread, 8.2 ms without. It
/// matters because a backup waits for two of them in a row, while the backup itself wants
/// the same cores. A segment written to its end keeps the workers. Only the speed depends
/// on this: every byte is still read, hashed and checked.
fn switched(file: &std::fs::File, len: u64) -> bool {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 8192;
    if len < 2 * PAGE as u64 {
        return false;
    }
    let mut last = [0u8; PAGE];
    file.read_exact_at(&mut last, len - PAGE as u64).is_ok() && last.iter().all(|b| *b == 0)
}

/// A push whose compression may have started before the store was consulted.
struct Pending {
    name: String,
    key: String,
    /// The cluster the segment must belong to; `None` for files without page headers
    /// (timeline and backup history files).
    check_sysid: Option<u64>,
    path: PathBuf,
    opts: PipeOptions,
    compressed: Option<Compressing>,
    /// Set when the name is taken: compressing stops, hashing goes on for the comparison.
    abandon: Arc<AtomicBool>,
    /// Set when nothing is wanted any more (an error): reading stops.
    cancel: Arc<AtomicBool>,
    /// The block references of the segment, read as it is archived (see `walrefs::Summary`).
    refs: Option<Refs>,
}

type Refs = Arc<std::sync::Mutex<Option<SummaryWatch>>>;

type Compressing = tokio::task::JoinHandle<anyhow::Result<(Option<Vec<u8>>, pipeline::Trailer)>>;

impl Pending {
    fn start(cfg: &Config, path: &Path) -> anyhow::Result<Pending> {
        let name = file_name(path)?;
        let Some(kind) = WalFile::classify(&name) else {
            return Err(input_err!(
                "{name:?} is not a WAL segment, timeline history or backup history file: wal-push takes the %p path PostgreSQL passes to archive_command"
            ));
        };
        let data_dir = crate::pg::control::data_dir_for(path, cfg.pg.data_dir.as_deref());
        let sysid = match cfg.pg.system_identifier {
            Some(id) => id,
            None => crate::pg::control::system_identifier(&data_dir)?,
        };
        let has_pages = matches!(kind, WalFile::Segment(_) | WalFile::Partial(_));
        let mut pending = Pending {
            key: repo::wal_key(sysid, &name),
            check_sysid: has_pages.then_some(sysid),
            name,
            path: path.to_path_buf(),
            opts: PipeOptions::for_wal(cfg),
            compressed: None,
            abandon: Arc::new(AtomicBool::new(false)),
            cancel: Arc::new(AtomicBool::new(false)),
            refs: None,
        };
        let len = std::fs::metadata(path).map(|m| m.len()).ok();
        if let Some(len) = len.filter(|len| *len <= OVERLAP_MAX) {
            let (reader, note, refs, switched) = pending.open()?;
            pending.refs = Some(refs);
            let reader = Cancellable {
                inner: reader,
                cancel: pending.cancel.clone(),
            };
            let mut compression = pipeline::compression_for(pending.opts.compression, len);
            if switched {
                compression.threads = 1;
            }
            let digest = pending.opts.digest;
            let abandon = pending.abandon.clone();
            pending.compressed = Some(tokio::task::spawn_blocking(move || {
                pipeline::compress_to_memory(reader, compression, digest, note, &abandon)
            }));
        }
        Ok(pending)
    }

    /// The file, watched by the WAL scanner (a segment's trailer notes the time of its last
    /// transaction, where a restore from the archive can reach: see walscan) and by the page
    /// checks, whose verdict comes with the note: a segment that fails them is not stored.
    /// History files have nothing to note and no pages to check. A whole segment's block
    /// references are read on the way too. Last: whether it is a `switched` segment.
    fn open(
        &self,
    ) -> anyhow::Result<(
        impl std::io::Read + Send + 'static,
        impl FnOnce() -> anyhow::Result<u64> + Send + 'static,
        Refs,
        bool,
    )> {
        let file = std::fs::File::open(&self.path)
            .map_err(|e| input_err!("cannot open {}: {e}", self.path.display()))?;
        let segment_len = match WalFile::classify(&self.name) {
            Some(WalFile::Segment(_)) => file.metadata().ok().map(|m| m.len()),
            _ => None,
        };
        let is_switched = segment_len.is_some_and(|len| switched(&file, len));
        let summary = match (self.check_sysid, segment_len) {
            (Some(sysid), Some(len)) => SummaryWatch::new(sysid, len, &self.name),
            _ => None,
        };
        let (reader, refs) = Tap::new(file, summary);
        let (reader, scan) = Tap::new(reader, WalScan::new());
        let (reader, check) = Tap::new(
            reader,
            self.check_sysid
                .map(|sysid| WalCheck::new(&self.name, sysid)),
        );
        let note = move || {
            if let Some(check) = check.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                check.verdict()?;
            }
            let scan = scan.lock().unwrap_or_else(|e| e.into_inner());
            Ok(scan.last_xact_micros.map_or(0, |t| t as u64))
        };
        Ok((reader, note, refs, is_switched))
    }

    /// Stores the file, then (a segment, read whole) its block references.
    async fn finish(mut self, store: &dyn Store) -> anyhow::Result<Pushed> {
        let pushed = self.store(store).await?;
        let summary = self.refs.as_ref().and_then(|refs| {
            let refs = refs.lock().unwrap_or_else(|e| e.into_inner());
            refs.as_ref().and_then(|r| r.summary(&self.name))
        });
        if let (Some(summary), Some(sysid)) = (summary, self.check_sysid) {
            walrefs::store_summary(store, self.opts, sysid, &summary).await;
        }
        Ok(pushed)
    }

    async fn store(&mut self, store: &dyn Store) -> anyhow::Result<Pushed> {
        if let Some(existing) = store.head(&self.key).await? {
            // The hash of the file is all that is needed now.
            self.abandon.store(true, Ordering::Relaxed);
            let compressed = self.compressed.take();
            let local = async {
                match compressed {
                    Some(task) => Ok(Some(task.await.context("compression task panicked")??.1)),
                    None => Ok(None),
                }
            };
            let stored = pipeline::read_trailer(store, &self.key, existing.size);
            let (stored, local, recipients) =
                tokio::try_join!(stored, local, pipeline::recipients(store))?;
            return self.compare_existing(stored, local, recipients).await;
        }
        let name = self.name.clone();
        let (stored, plain) = match self.compressed.take() {
            Some(task) => {
                let (data, trailer) = task
                    .await
                    .context("compression task panicked")?
                    .with_context(|| format!("archiving {name}"))?;
                let data = data.context("compression was abandoned")?;
                let stored = data.len() as u64;
                let put = pipeline::put_compressed(
                    store,
                    &self.key,
                    data.into(),
                    self.opts.upload,
                    WriteMode::CreateOnly,
                )
                .await;
                if let Err(e) = put {
                    return self.lost_race(store, e, Some(trailer)).await;
                }
                (stored, trailer.plain_size)
            }
            None => {
                let (reader, note, refs, _) = self.open()?;
                self.refs = Some(refs);
                let opts = self.opts;
                let written = pipeline::upload_noted(
                    store,
                    &self.key,
                    reader,
                    opts,
                    note,
                    WriteMode::CreateOnly,
                )
                .await;
                match written {
                    Ok(w) => (w.stored_size, w.trailer.plain_size),
                    Err(e) => return self.lost_race(store, e, None).await,
                }
            }
        };
        tracing::debug!(%name, plain, stored, "archived");
        Ok(Pushed::Uploaded)
    }

    /// Whether `stored` holds this file, hashing it by the stored object's digest (`known`
    /// when that is the one already computed).
    async fn compare_existing(
        &self,
        stored: pipeline::Stored,
        known: Option<pipeline::Trailer>,
        recipients: Option<Arc<crate::crypto::Recipients>>,
    ) -> anyhow::Result<Pushed> {
        let path = self.path.clone();
        let (held, local) = tokio::task::spawn_blocking(move || {
            stored.holds_by(recipients.as_deref(), |d| {
                pipeline::file_identity_or(&path, d, known)
            })
        })
        .await
        .context("hashing task panicked")??;
        compare_result(held, stored, local, &self.name)
    }

    /// A create-only write failed. When another push stored the name first (`serve`'s
    /// look-ahead and PostgreSQL's archive_command, or a retry whose first answer was lost),
    /// the outcome is that push's: success for the same content, a loud failure otherwise.
    async fn lost_race(
        &self,
        store: &dyn Store,
        err: anyhow::Error,
        local: Option<pipeline::Trailer>,
    ) -> anyhow::Result<Pushed> {
        if !storage::is_already_exists(&err) {
            return Err(err.context(format!("archiving {}", self.name)));
        }
        // S3 answers 409 while a racing conditional write is still in flight: give it time
        // to land before comparing.
        for _ in 0..20 {
            if let Some(existing) = store.head(&self.key).await? {
                let stored = pipeline::read_trailer(store, &self.key, existing.size).await?;
                let recipients = pipeline::recipients(store).await?;
                return self.compare_existing(stored, local, recipients).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(err.context(format!(
            "archiving {}: the name was taken, yet nothing is stored under it",
            self.name
        )))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// Fails the read once `cancel` is set, so an unwanted compression stops within a block.
struct Cancellable<R> {
    inner: R,
    cancel: Arc<AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}

fn compare_result(
    held: Option<bool>,
    stored: pipeline::Stored,
    local: pipeline::Trailer,
    name: &str,
) -> anyhow::Result<Pushed> {
    match held {
        Some(true) => {
            tracing::debug!(%name, "already archived with the same content");
            Ok(Pushed::AlreadyArchived)
        }
        Some(false) => anyhow::bail!(
            "refusing to overwrite {name}: the archive already holds a different {name} ({} bytes; this one is {}, {} bytes). Two clusters may be archiving into one repository prefix, or a restored cluster reused a timeline: check the repository URL",
            stored.plain_size(),
            local.digest_short(),
            local.plain_size
        ),
        None => anyhow::bail!(
            "{name} is already archived, encrypted for another key set than this writer's (archived before a key rotation?): cannot tell whether it holds the same WAL; check it with a reader's key (dbagent verify --full)"
        ),
    }
}

fn file_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| input_err!("{} has no file name", path.display()))
}

/// Restores one WAL file to `dest`. A file that is not archived is `Failure::NotFound`;
/// transient storage failures are retried until `wal.fetch_retry_timeout` has passed, and
/// whatever error is left then is one PostgreSQL must not read as "not archived".
///
/// With `timeline` (a restore's `--timeline` in restore_command: the timeline recovery
/// follows), a segment of an older timeline on its path is given only up to where that
/// timeline ended on the path: PostgreSQL asks for it when the newer timeline's own copy of
/// the segment is not archived (yet), and would replay whatever the older timeline wrote after
/// the branch point, the history the newer timeline abandoned.
pub async fn fetch(
    cfg: &Config,
    store: Arc<dyn Store>,
    name: &str,
    dest: &Path,
    timeline: Option<u32>,
) -> anyhow::Result<()> {
    let Some(kind) = WalFile::classify(name) else {
        return Err(input_err!("{name:?} is not a WAL file name"));
    };
    let data_dir = crate::pg::control::data_dir_for(dest, cfg.pg.data_dir.as_deref());
    let sysid = match cfg.pg.system_identifier {
        Some(id) => id,
        None => crate::pg::control::system_identifier(&data_dir)?,
    };
    let branch_end = match (&kind, timeline) {
        (WalFile::Segment(_), Some(target)) => {
            left_path_at(store.as_ref(), &data_dir, sysid, name, target).await?
        }
        _ => None,
    };
    fetch_file(cfg, store, name, dest, &kind, &data_dir, sysid).await?;
    match branch_end {
        Some(end) => cut_at_branch(dest, name, end, timeline.unwrap_or_default()),
        None => Ok(()),
    }
}

/// Where the timeline of segment `name` ended on timeline `target`'s path (its switchpoint in
/// `target`'s history), when it is an older timeline on that path. `target`'s history file is
/// read from pg_wal (PostgreSQL keeps the ones it restored) or the repository.
async fn left_path_at(
    store: &dyn Store,
    data_dir: &Path,
    sysid: u64,
    name: &str,
    target: u32,
) -> anyhow::Result<Option<Lsn>> {
    let Some(tli) = name.get(..8).and_then(|t| u32::from_str_radix(t, 16).ok()) else {
        return Ok(None);
    };
    if tli == target || target == 1 {
        return Ok(None);
    }
    let history_name = crate::repo::wal::history_name(target);
    let text = match std::fs::read_to_string(data_dir.join("pg_wal").join(&history_name)) {
        Ok(text) => text,
        Err(_) => {
            let key = repo::wal_key(sysid, &history_name);
            // Through the pipeline: stored compressed, and encrypted in an encrypted repository.
            match pipeline::download(store, &key, Vec::new()).await {
                Ok((bytes, _)) => String::from_utf8_lossy(&bytes).into_owned(),
                // No history for it: nothing says where the older timelines ended.
                Err(e) if storage::is_not_found(&e) => return Ok(None),
                Err(e) => return Err(e.context(format!("reading {history_name}"))),
            }
        }
    };
    let history = crate::repo::wal::parse_history(&text)
        .map_err(|e| anyhow::anyhow!("{history_name} is not a timeline history file: {e}"))?;
    Ok(history.iter().find(|e| e.tli == tli).map(|e| e.switchpoint))
}

/// Keeps only the part of segment `dest` (named `name`) before `end`, the point where its
/// timeline left timeline `target`'s path: zeros after it, which PostgreSQL reads as the end
/// of the WAL. A segment wholly past it is "not archived" for this recovery.
fn cut_at_branch(dest: &Path, name: &str, end: Lsn, target: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = std::fs::metadata(dest)
        .with_context(|| format!("reading {}", dest.display()))?
        .len();
    let seg = (len.is_power_of_two())
        .then(|| Segment::parse(name, len))
        .flatten()
        .with_context(|| format!("{name}: a restored segment of {len} bytes"))?;
    let start = seg.start_lsn(len).0;
    if end.0 >= start + len {
        return Ok(());
    }
    if end.0 <= start {
        let _ = std::fs::remove_file(dest);
        return Err(anyhow::Error::new(Failure::NotFound(format!(
            "{name} lies past {end}, where its timeline left timeline {target}'s history: not part of this recovery"
        ))));
    }
    let keep = end.0 - start;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    f.write_all_at(&vec![0u8; (len - keep) as usize], keep)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", dest.display()))?;
    tracing::warn!(
        %name,
        branch_point = %end,
        "timeline {target}'s own copy of this segment is not archived: restored the older timeline's copy only up to where timeline {target} branched off"
    );
    Ok(())
}

/// `fetch` of the whole file.
async fn fetch_file(
    cfg: &Config,
    store: Arc<dyn Store>,
    name: &str,
    dest: &Path,
    kind: &WalFile,
    data_dir: &Path,
    sysid: u64,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let prefetch_dir = data_dir.join("pg_wal").join(PREFETCH_DIR);
    let is_segment = matches!(kind, WalFile::Segment(_));
    let deadline = started + cfg.wal.fetch_retry_timeout;

    if is_segment && take_prefetched(&prefetch_dir, name, dest, deadline).await? {
        spawn_prefetch(cfg, &prefetch_dir, name);
        return Ok(());
    }
    let key = repo::wal_key(sysid, name);
    let stall = stall_limit(cfg.wal.fetch_retry_timeout);
    let mut pause = Duration::from_millis(250);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match download_verified(store.as_ref(), &key, dest, stall).await {
            Ok(()) => break,
            Err(e) => e,
        };
        let err = if storage::is_not_found(&err) {
            // The end of the archive: the segment being streamed, if `serve` streamed any.
            let streamed = match is_segment {
                true => crate::pg::walstream::assemble(store.as_ref(), sysid, name).await,
                false => Ok(None),
            };
            match streamed {
                Ok(Some((data, end))) => {
                    write_file(dest, &data)?;
                    tracing::info!(%name, streamed_bytes = end, "restored the streamed part of a segment, zero-padded");
                    return Ok(());
                }
                Ok(None) => {
                    return Err(anyhow::Error::new(Failure::NotFound(format!(
                        "{name} is not archived"
                    ))));
                }
                Err(e) if storage::is_transient(&e) => e,
                Err(e) => return Err(e.context(format!("restoring the streamed part of {name}"))),
            }
        } else {
            err
        };
        if !storage::is_transient(&err) {
            return Err(err.context(format!("restoring {name}")));
        }
        if Instant::now() + pause > deadline {
            return Err(err.context(format!(
                "restoring {name}: the repository failed {attempts} time(s) in {}; stopping recovery rather than answering \"not archived\"",
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
            )));
        }
        tracing::warn!(%name, attempt = attempts, error = %format!("{err:#}"), "could not restore a WAL file; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    if is_segment {
        spawn_prefetch(cfg, &prefetch_dir, name);
    }
    Ok(())
}

/// How long one download may receive nothing before it is given up and tried again: a third
/// of the retry window (so a stalled connection leaves room for retries), 1 s to 20 s.
fn stall_limit(retry_timeout: Duration) -> Duration {
    (retry_timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(20))
}

/// Downloads into a temp file beside `dest`, verifies, fsyncs and renames: `dest` appears
/// only with verified content.
async fn download_verified(
    store: &dyn Store,
    key: &str,
    dest: &Path,
    stall: Duration,
) -> anyhow::Result<()> {
    let tmp = tmp_beside(dest);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = pipeline::download_watched(
        store,
        key,
        std::io::BufWriter::with_capacity(1 << 20, file),
        Some(stall),
    )
    .await;
    let done = result.and_then(|(writer, _)| {
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, dest).with_context(|| format!("moving into {}", dest.display()))
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Writes `data` to a temp file beside `dest`, fsyncs and renames: `dest` appears whole or
/// not at all.
fn write_file(dest: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_beside(dest);
    let done = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done.with_context(|| format!("writing {}", dest.display()))
}

fn tmp_beside(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".dbagent-{}.tmp", std::process::id()));
    dest.with_file_name(name)
}

/// Uses a prefetched copy if there is one, waiting (until `deadline`) for a download in
/// progress. A prefetched file is there only once verified (see `download_verified`).
async fn take_prefetched(
    dir: &Path,
    name: &str,
    dest: &Path,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let ready = dir.join(name);
    let claim = dir.join(format!("{name}.claim"));
    loop {
        if ready.exists() {
            std::fs::rename(&ready, dest).with_context(|| format!("moving prefetched {name}"))?;
            return Ok(true);
        }
        if !claim_alive(&claim) || Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the process a claim names still runs. A claim holds the pid and the process's
/// start time (clock ticks since boot): claims survive a container's restart in pg_wal, and
/// the restarted container hands out the same small pids again, so a pid alone would keep a
/// dead download's claim alive and make each `wal-fetch` of its segment wait out its whole
/// retry window. A claim without a start time (written before claims had one, so before a
/// restart) or naming a zombie is dead.
fn claim_alive(claim: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(claim) else {
        return false;
    };
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (Some(Some(pid)), Some(Some(start))) = (fields.next(), fields.next()) else {
        return false;
    };
    process_start(pid as i32) == Some(start)
}

/// This process's claim: its pid and start time.
fn claim_text() -> String {
    let pid = std::process::id();
    format!("{pid} {}", process_start(pid as i32).unwrap_or(0))
}

/// When process `pid`, running (not a zombie), started, in clock ticks since boot
/// (/proc/<pid>/stat, field 22).
fn process_start(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) ": the state is field 3, the start time field 22.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The segments after `name` that are worth fetching ahead.
fn next_segments(name: &str, count: usize) -> Vec<String> {
    // The file name does not say the segment size; assume the common 16 MiB. A wrong guess
    // only prefetches names that do not exist.
    let seg_size = crate::repo::wal::DEFAULT_SEGMENT_SIZE;
    let Some(seg) = Segment::parse(name, seg_size) else {
        return vec![];
    };
    (1..=count as u64)
        .map(|i| {
            Segment {
                tli: seg.tli,
                segno: seg.segno + i,
            }
            .name(seg_size)
        })
        .collect()
}

/// Starts a detached `dbagent wal-prefetch` for the next segments not already there or claimed.
fn spawn_prefetch(cfg: &Config, dir: &Path, name: &str) {
    if cfg.wal.prefetch == 0 {
        return;
    }
    let wanted: Vec<String> = next_segments(name, cfg.wal.prefetch)
        .into_iter()
        .filter(|n| !dir.join(n).exists() && !claim_alive(&dir.join(format!("{n}.claim"))))
        .collect();
    if wanted.is_empty() {
        return;
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::debug!(error = %e, "no prefetch directory");
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut program = crate::proc::Program::new(exe);
    if let Some(cfg_file) = &cfg.config_file {
        program = program.arg("--config").arg(cfg_file);
    }
    if let Some(repo) = &cfg.repo {
        program = program.arg("--repo").arg(repo);
    }
    let program = program.arg("wal-prefetch").arg(dir).args(&wanted);
    if let Err(e) = program.spawn_detached() {
        tracing::debug!(error = %format!("{e:#}"), "could not start prefetch");
    }
}

/// Downloads `names` into the prefetch directory, in parallel. Best effort: anything that
/// goes wrong here is retried by the `wal-fetch` that needs the file.
pub async fn prefetch(
    cfg: &Config,
    store: Arc<dyn Store>,
    dir: &Path,
    names: &[String],
) -> anyhow::Result<()> {
    let data_dir = dir
        .parent()
        .and_then(Path::parent)
        .context("prefetch directory must be <data>/pg_wal/.dbagent-prefetch")?;
    let sysid = match cfg.pg.system_identifier {
        Some(id) => id,
        None => crate::pg::control::system_identifier(data_dir)?,
    };
    let pid = claim_text();
    let mut tasks = tokio::task::JoinSet::new();
    for name in names {
        if WalFile::classify(name).is_none() {
            continue;
        }
        let claim = dir.join(format!("{name}.claim"));
        // O_EXCL: only one process downloads a segment; a dead owner's claim is taken over.
        let claimed = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
        {
            Ok(mut f) => f.write_all(pid.as_bytes()).is_ok(),
            Err(_) if !claim_alive(&claim) => std::fs::write(&claim, &pid).is_ok(),
            Err(_) => false,
        };
        if !claimed || dir.join(name).exists() {
            continue;
        }
        let store = store.clone();
        let key = repo::wal_key(sysid, name);
        let dest = dir.join(name);
        // One attempt, cut short when stalled: the wal-fetch waiting for this file retries
        // on its own, within its own deadline.
        let stall = stall_limit(cfg.wal.fetch_retry_timeout);
        tasks.spawn(async move {
            let res = download_verified(store.as_ref(), &key, &dest, stall).await;
            let _ = std::fs::remove_file(&claim);
            res
        });
    }
    while let Some(res) = tasks.join_next().await {
        if let Ok(Err(e)) = res {
            if !storage::is_not_found(&e) {
                tracing::debug!(error = %format!("{e:#}"), "prefetch failed");
            }
        }
    }
    Ok(())
}

/// WAL files PostgreSQL has finished and not yet archived (`archive_status/*.ready`), oldest first.
pub fn ready_files(data_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(data_dir.join("pg_wal").join("archive_status")) else {
        return vec![];
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".ready")
                .map(str::to_string)
        })
        .filter(|n| WalFile::classify(n).is_some())
        .collect();
    // History files first (a new timeline's segments need them), then segments in order.
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_lives_with_the_process_that_wrote_it_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let claim = dir.path().join("x.claim");
        std::fs::write(&claim, claim_text()).unwrap();
        assert!(claim_alive(&claim), "this process's own claim");
        let me = std::process::id();
        // The same pid, another start: a restarted container's process.
        std::fs::write(&claim, format!("{me} 1")).unwrap();
        assert!(!claim_alive(&claim));
        // A pid alone: written before claims had start times.
        std::fs::write(&claim, format!("{me}")).unwrap();
        assert!(!claim_alive(&claim));
        // A process that has exited and been reaped.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let start = process_start(gone.id() as i32);
        gone.wait().unwrap();
        std::fs::write(&claim, format!("{} {}", gone.id(), start.unwrap_or(0))).unwrap();
        assert!(!claim_alive(&claim));
        // A zombie: exited, not yet reaped, still answering kill(pid, 0).
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let start = process_start(zombie.id() as i32).unwrap_or(0);
        std::fs::write(&claim, format!("{} {start}", zombie.id())).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_start(zombie.id() as i32).is_some() {
            assert!(std::time::Instant::now() < deadline, "true did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!claim_alive(&claim));
        zombie.wait().unwrap();
    }

    #[test]
    fn a_segment_whose_last_page_is_zeros_was_switched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000003");
        let mut seg = vec![0u8; 1 << 20];
        seg[..100].fill(7);
        let is_switched = |seg: &[u8]| {
            std::fs::write(&path, seg).unwrap();
            switched(&std::fs::File::open(&path).unwrap(), seg.len() as u64)
        };
        assert!(is_switched(&seg));
        // A segment written to its end: its last page starts with a header.
        let last = seg.len() - 8192;
        seg[last] = 0xd1;
        assert!(!is_switched(&seg));
        // Too short to tell.
        assert!(!is_switched(&seg[..8192]));
    }

    #[test]
    fn next_segments_cross_log_boundary() {
        let n = next_segments("0000000100000000000000FE", 3);
        assert_eq!(
            n,
            vec![
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert!(next_segments("00000002.history", 3).is_empty());
    }
}
