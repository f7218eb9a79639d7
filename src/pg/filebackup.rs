//! File-level base backups, full and incremental, read straight from the data directory.
//!
//! When dbagent shares the data directory with the server (the sidecar, or a CronJob that
//! mounts it), it calls `pg_backup_start` on one connection, reads the files itself with
//! `backup.parallel` worker threads that hash, compress (and encrypt) blobs, and appends the
//! blobs to a bundle uploaded by one async writer; then `pg_backup_stop` gives the
//! backup_label. The layout is in `fileset`. Memory: each worker holds one blob of plain bytes,
//! its compressed copy and a zstd context (about 3.3 MiB at level 3); the writer the parts of its
//! upload (`upload.concurrency` + 1 parts of `upload.part_size`); the channel a few blobs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::crypto::Recipients;
use crate::input_err;
use crate::pg::fileset::{
    self, BLOCK, Blob, BlobWriter, BundleLoc, CHUNK, Extent, FileEntry, FileIndex, Found,
};
use crate::pg::walrefs::{self, Changes, Collected};
use crate::pipeline::PipeOptions;
use crate::repo::manifest::{BaseBackup, ObjectRef};
use crate::repo::wal::Lsn;
use crate::storage::{Store, Upload};

/// A bundle is closed once it holds this many stored bytes.
const BUNDLE_TARGET: u64 = 256 << 20;
/// Files are read in jobs of at most this many bytes of file, so one big file keeps every
/// worker busy...
const JOB_BYTES: u64 = 64 << 20;
/// ...and at most this many bytes to read (every byte, or the blocks the WAL names as
/// changed), so that the workers end together: the last job to end is at most this long.
const JOB_READ: u64 = 4 << 20;
/// Workers of one backup, at most, whatever `backup.parallel`: each holds about 3.7 MiB (a
/// 1 MiB blob in the making, zstd's 1.3 MiB of tables at level 3, the compressed blob on its
/// way to the writer), and the writer holds (`upload.concurrency` + 1) upload parts of 8 MiB
/// on S3 (two on `file://`), so a backup stays under 64 MiB. Measured peaks at pgbench scale
/// 70: six workers 58 MiB on `file://` and 60–66 MiB on S3, eight 60 MiB on `file://`, two
/// 45–50 MiB. Four compress pgbench data at about 5 GB/s (1.3 GB per CPU second at level 3),
/// real data at a third of that: on most machines a backup then waits for the disk, and more
/// workers would only add memory.
pub const MAX_WORKERS: usize = 4;
/// Marks an extent's blob as one of the base backup's while the index is being built.
const BASE_BLOB: u32 = 1 << 31;

/// The previous backup an incremental is taken against.
pub struct Base {
    pub manifest: BaseBackup,
    pub index: FileIndex,
}

/// What the file-level backup read and stored.
pub struct Taken {
    /// The index object, being stored while the caller makes sure of the WAL up to the stop
    /// point (it deletes the backup's bundles when it fails).
    pub index: tokio::task::JoinHandle<anyhow::Result<ObjectRef>>,
    pub index_summary: Summary,
    pub start_lsn: Lsn,
    pub timeline: u32,
    pub stop_lsn: Lsn,
}

pub struct Summary {
    pub files: u64,
    /// Bytes of the data directory the backup restores.
    pub plain_bytes: u64,
    /// Plain bytes this backup stored itself (the rest is its base's).
    pub new_plain_bytes: u64,
    /// Files read (the others were unchanged since the base, by size and mtime).
    pub files_read: u64,
    /// Bytes read from those files (an incremental that knows the changed blocks from the WAL
    /// reads only those).
    pub read_bytes: u64,
    /// How an incremental found its changes: "wal" (the block references of the WAL since its
    /// base started) or "compare" (every block of each changed file read and compared).
    pub changes_from: Option<&'static str>,
    pub bundles: Vec<BundleLoc>,
    pub depends_on: Vec<String>,
}

/// Reads the base backup's index.
pub async fn load_index(store: &dyn Store, b: &BaseBackup) -> anyhow::Result<FileIndex> {
    let (bytes, fetched) = crate::pipeline::download(store, &b.data.key, Vec::new())
        .await
        .with_context(|| format!("reading the file index of backup {}", b.id))?;
    b.data
        .verify(&fetched, &format!("the file index of backup {}", b.id))?;
    let index: FileIndex = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading the file index of backup {}", b.id))?;
    if index.format > fileset::INDEX_FORMAT {
        return Err(input_err!(
            "backup {} has file index format {} but this dbagent reads up to {}: upgrade dbagent",
            b.id,
            index.format,
            fileset::INDEX_FORMAT
        ));
    }
    index.check()?;
    Ok(index)
}

/// Checks that `dir` is the data directory of the server with `sysid`.
pub fn check_data_dir(dir: &Path, sysid: u64) -> anyhow::Result<()> {
    let found = crate::pg::control::system_identifier(dir).map_err(|e| {
        input_err!(
            "pg.data_dir = {}: {e:#}; set it to the server's data directory, or set backup.method = stream to back up over the network",
            dir.display()
        )
    })?;
    if found != sysid {
        return Err(input_err!(
            "pg.data_dir = {} belongs to cluster {found}, but the server is cluster {sysid}: set pg.data_dir to this server's data directory",
            dir.display()
        ));
    }
    Ok(())
}

/// One piece of work: bytes `from..to` of file `file`.
#[derive(Debug, Clone, Copy)]
struct Job {
    file: usize,
    from: u64,
    to: u64,
}

/// What a job read: the block hashes of `from..from+read`, and where its bytes live.
#[derive(Debug, Default)]
struct JobResult {
    from: u64,
    read: u64,
    /// Bytes actually read from the file (the rest was taken from the base unread).
    read_io: u64,
    short: bool,
    vanished: bool,
    hashes: Vec<u64>,
    extents: Vec<Extent>,
}

/// A compressed blob on its way to a bundle.
struct Sealed {
    id: u32,
    bytes: Vec<u8>,
    plain: u32,
}

/// What the base holds of a file to read.
struct Prior<'a> {
    entry: &'a FileEntry,
    hashes: Vec<u64>,
    /// From the WAL: which blocks may have changed since the base started. The others are
    /// taken from the base without being read.
    changed: Option<Vec<bool>>,
    /// The file's size now (what this backup copies).
    size: u64,
}

impl Prior<'_> {
    /// The base's hash and length of the block at `off`, when the WAL says the block is
    /// unchanged and the base holds the same bytes: a whole block, or the last, shorter block
    /// of a file whose size has not changed (most catalog files are smaller than a block).
    fn unchanged(&self, off: u64, end: u64) -> Option<(u64, u64)> {
        let changed = self.changed.as_ref()?;
        let bi = (off / BLOCK) as usize;
        let len = if off + BLOCK <= end && off + BLOCK <= self.entry.size {
            BLOCK
        } else if end == self.size && self.size == self.entry.size && off < end {
            end - off
        } else {
            return None;
        };
        if !off.is_multiple_of(BLOCK) || changed.get(bi).copied().unwrap_or(true) {
            return None;
        }
        self.hashes.get(bi).map(|h| (*h, len))
    }

    /// Points bytes `from..to` at the base's blobs.
    fn reuse(&self, from: u64, to: u64, extents: &mut Vec<Extent>) {
        let mut ext = Vec::new();
        fileset::slice_extents(&self.entry.extents, from, to, &mut ext);
        for mut e in ext {
            e.blob |= BASE_BLOB;
            fileset::push_extent(extents, e);
        }
    }
}

struct Shared<'a> {
    root: &'a Path,
    found: &'a [Found],
    /// What the base holds of each found file, when it has it.
    base_entries: Vec<Option<Prior<'a>>>,
    jobs: Mutex<std::vec::IntoIter<(usize, Job)>>,
    results: Mutex<Vec<Option<JobResult>>>,
    next_blob: AtomicU32,
    stop: AtomicBool,
    level: i32,
    recipients: Option<Arc<Recipients>>,
}

/// A worker's blob in the making: file bytes are read straight into its buffer (`CHUNK`
/// long, of which the first `len` bytes are the blob), never copied into it.
struct Pending {
    writer: BlobWriter,
    buf: Vec<u8>,
    len: usize,
    id: Option<u32>,
}

impl Pending {
    fn flush(&mut self, shared: &Shared, tx: &mpsc::Sender<Sealed>) -> anyhow::Result<()> {
        let Some(id) = self.id.take() else {
            return Ok(());
        };
        let bytes = self
            .writer
            .seal(&self.buf[..self.len], shared.recipients.as_deref())?;
        let plain = self.len as u32;
        self.len = 0;
        tx.blocking_send(Sealed { id, bytes, plain })
            .map_err(|_| anyhow::anyhow!("the bundle writers stopped"))
    }

    /// Room for `want` bytes after the blob's, flushing it first when they would not fit.
    fn room(
        &mut self,
        shared: &Shared,
        tx: &mpsc::Sender<Sealed>,
        want: usize,
    ) -> anyhow::Result<&mut [u8]> {
        if self.len + want > CHUNK {
            self.flush(shared, tx)?;
        }
        Ok(&mut self.buf[self.len..self.len + want])
    }

    /// The first `n` bytes read into `room`.
    fn room_read(&self, n: usize) -> &[u8] {
        &self.buf[self.len..self.len + n]
    }

    /// Keeps the first `n` bytes read into `room` (file bytes at `at`) in the blob.
    fn keep(&mut self, shared: &Shared, n: usize, at: u64, extents: &mut Vec<Extent>) {
        let id = *self
            .id
            .get_or_insert_with(|| shared.next_blob.fetch_add(1, Ordering::Relaxed));
        fileset::push_extent(
            extents,
            Extent {
                at,
                len: n as u64,
                blob: id,
                skip: self.len as u32,
            },
        );
        self.len += n;
    }
}

fn run_job(
    shared: &Shared,
    job: Job,
    pending: &mut Pending,
    tx: &mpsc::Sender<Sealed>,
) -> anyhow::Result<JobResult> {
    let f = &shared.found[job.file];
    let mut res = JobResult {
        from: job.from,
        ..JobResult::default()
    };
    let path = shared.root.join(&f.path);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            res.vanished = true;
            return Ok(res);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let base = shared.base_entries[job.file].as_ref();
    let mut off = job.from;
    while off < job.to {
        if let Some(prior) = base
            && let Some((h, len)) = prior.unchanged(off, job.to)
        {
            prior.reuse(off, off + len, &mut res.extents);
            res.hashes.push(h);
            res.read += len;
            off += len;
            continue;
        }
        let want = (job.to - off).min(BLOCK) as usize;
        let n = fileset::read_at(&file, pending.room(shared, tx, want)?, off)
            .with_context(|| format!("reading {}", path.display()))?;
        res.read_io += n as u64;
        if n > 0 {
            let h = fileset::block_hash(pending.room_read(n));
            let bi = (off / BLOCK) as usize;
            let same = base.is_some_and(|p| {
                p.hashes.get(bi) == Some(&h) && p.entry.size.min(off + BLOCK) - off == n as u64
            });
            match base {
                Some(p) if same => p.reuse(off, off + n as u64, &mut res.extents),
                _ => pending.keep(shared, n, off, &mut res.extents),
            }
            res.hashes.push(h);
            res.read += n as u64;
            off += n as u64;
        }
        if n < want {
            res.short = true;
            break;
        }
    }
    Ok(res)
}

fn worker(shared: &Shared, tx: mpsc::Sender<Sealed>) -> anyhow::Result<()> {
    // Zeroed pages from the system, touched only as blobs fill them.
    let mut pending = Pending {
        writer: BlobWriter::new(shared.level)?,
        buf: vec![0u8; CHUNK],
        len: 0,
        id: None,
    };
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let next = shared.jobs.lock().expect("job queue").next();
        let Some((slot, job)) = next else { break };
        let res = run_job(shared, job, &mut pending, &tx);
        match res {
            Ok(r) => shared.results.lock().expect("results")[slot] = Some(r),
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    pending.flush(shared, &tx)
}

/// Where the writers put things.
#[derive(Default)]
struct Placed {
    blobs: HashMap<u32, Blob>,
    bundles: Vec<(u32, String, u64)>,
    /// Every bundle key an upload was started for (to clean up after a failure).
    started: Vec<String>,
}

struct OpenBundle {
    no: u32,
    key: String,
    upload: Box<dyn Upload>,
    part: Vec<u8>,
    size: u64,
}

async fn writer(
    store: Arc<dyn Store>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Sealed>>>,
    placed: Arc<Mutex<Placed>>,
    next_bundle: Arc<AtomicU32>,
    key_of: Arc<dyn Fn(u32) -> String + Send + Sync>,
    part_size: usize,
) -> anyhow::Result<()> {
    let mut open: Option<OpenBundle> = None;
    let result: anyhow::Result<()> = async {
        loop {
            let next = rx.lock().await.recv().await;
            let Some(blob) = next else { break };
            if open.is_none() {
                let no = next_bundle.fetch_add(1, Ordering::Relaxed);
                let key = key_of(no);
                placed.lock().expect("placed").started.push(key.clone());
                let upload = store
                    .start_upload(&key)
                    .await
                    .with_context(|| format!("uploading {key}"))?;
                open = Some(OpenBundle {
                    no,
                    key,
                    upload,
                    part: Vec::with_capacity(part_size),
                    size: 0,
                });
            }
            let b = open.as_mut().expect("open bundle");
            placed.lock().expect("placed").blobs.insert(
                blob.id,
                Blob {
                    bundle: b.no,
                    offset: b.size,
                    stored: blob.bytes.len() as u32,
                    plain: blob.plain,
                },
            );
            b.size += blob.bytes.len() as u64;
            b.part.extend_from_slice(&blob.bytes);
            if b.part.len() >= part_size {
                let part = std::mem::replace(&mut b.part, Vec::with_capacity(part_size));
                b.upload
                    .put_part(Bytes::from(part))
                    .await
                    .with_context(|| format!("uploading {}", b.key))?;
            }
            if b.size >= BUNDLE_TARGET {
                let b = open.take().expect("open bundle");
                close(b, &placed).await?;
            }
        }
        if let Some(b) = open.take() {
            close(b, &placed).await?;
        }
        Ok(())
    }
    .await;
    if result.is_err()
        && let Some(b) = open
    {
        b.upload.abort().await;
    }
    result
}

async fn close(mut b: OpenBundle, placed: &Mutex<Placed>) -> anyhow::Result<()> {
    if !b.part.is_empty() {
        let part = std::mem::take(&mut b.part);
        b.upload
            .put_part(Bytes::from(part))
            .await
            .with_context(|| format!("uploading {}", b.key))?;
    }
    b.upload
        .complete()
        .await
        .with_context(|| format!("uploading {}", b.key))?;
    placed
        .lock()
        .expect("placed")
        .bundles
        .push((b.no, b.key, b.size));
    Ok(())
}

/// Per found file: what the base holds of it (for a file to read), or the base's entry taken
/// as it is (for an unchanged file); and the jobs.
type Planned<'a> = (Vec<Option<Prior<'a>>>, Vec<Option<FileEntry>>, Vec<Job>);

/// Plans the jobs: files unchanged since the base (same size and mtime, and that mtime well
/// before the base started reading) are taken from the base's index without being read; of
/// the others, `changes` (from the WAL) says which blocks to read.
fn plan<'a>(
    found: &'a [Found],
    base: Option<&'a Base>,
    changes: Option<&Changes>,
) -> anyhow::Result<Planned<'a>> {
    let by_path: HashMap<&str, &FileEntry> = base
        .map(|b| b.index.files.iter().map(|f| (f.path.as_str(), f)).collect())
        .unwrap_or_default();
    // A file modified within a second of the base's start could share its mtime with a later
    // change on a file system with coarse timestamps: such files are read again.
    let trusted_before =
        base.map(|b| b.manifest.start_time.timestamp_nanos_opt().unwrap_or(0) - 1_000_000_000);
    let mut entries = Vec::with_capacity(found.len());
    let mut reused = Vec::with_capacity(found.len());
    let mut jobs = Vec::new();
    for (i, f) in found.iter().enumerate() {
        let prev = by_path.get(f.path.as_str()).copied();
        // Timestamps are only trusted for what the WAL does not contradict: a copy made with
        // `rsync -a`, a clock stepped back or a coarse file system can leave a changed file
        // with its old mtime, never its blocks out of the WAL.
        if let (Some(p), Some(before)) = (prev, trusted_before)
            && p.size == f.size
            && p.mtime_ns == f.mtime_ns
            && f.mtime_ns < before
            && !changes.is_some_and(|c| c.names(&f.path))
        {
            entries.push(None);
            reused.push(Some(p.clone()));
            continue;
        }
        entries.push(match prev {
            Some(p) => Some(Prior {
                entry: p,
                hashes: p.block_hashes()?,
                changed: changes.and_then(|c| c.file_blocks(&f.path, fileset::block_count(f.size))),
                size: f.size,
            }),
            None => None,
        });
        reused.push(None);
        let changed = entries
            .last()
            .and_then(|p: &Option<Prior>| p.as_ref()?.changed.as_deref());
        let mut from = 0;
        loop {
            let to = job_end(from, f.size, changed);
            jobs.push(Job { file: i, from, to });
            from = to;
            if from >= f.size {
                break;
            }
        }
    }
    Ok((entries, reused, jobs))
}

/// Where the job that starts at `from` (a multiple of `BLOCK`) of a file of `size` bytes
/// ends: after `JOB_READ` bytes to read (only the `changed` blocks, when the WAL named them)
/// or `JOB_BYTES` of file.
fn job_end(from: u64, size: u64, changed: Option<&[bool]>) -> u64 {
    let last = (from + JOB_BYTES).min(size);
    let Some(changed) = changed else {
        return (from + JOB_READ).min(last);
    };
    let mut read = 0;
    let mut off = from;
    while off < last {
        if changed.get((off / BLOCK) as usize).copied().unwrap_or(true) {
            read += BLOCK;
            if read >= JOB_READ {
                return (off + BLOCK).min(last);
            }
        }
        off += BLOCK;
    }
    last
}

/// Options of one file-level backup.
pub struct Request<'a> {
    pub store: Arc<dyn Store>,
    /// The session that takes the backup (`pg_backup_start` to `pg_backup_stop`).
    pub client: &'a tokio_postgres::Client,
    pub dir: &'a Path,
    pub sysid: u64,
    pub id: &'a str,
    /// Where `start` began the backup.
    pub started: Lsn,
    pub base: Option<Base>,
    /// The server's WAL segment size, to read the WAL since the base.
    pub wal_segment_size: u64,
    /// The server's relation block size and blocks per relation segment file.
    pub relation_sizes: (u64, u64),
    /// Whether an incremental reads the WAL since its base to find the changed blocks.
    pub changes_from_wal: bool,
    pub parallel: usize,
    pub opts: PipeOptions,
    /// Told when every byte is read and `pg_backup_stop` is asked for.
    pub stopping: Arc<tokio::sync::Notify>,
}

impl Request<'_> {
    /// The backup's workers: `parallel`, at most `MAX_WORKERS`.
    fn workers(&self) -> usize {
        self.parallel.clamp(1, MAX_WORKERS)
    }
}

/// Starts the backup on `client`'s session (`pg_backup_start`, with an immediate checkpoint):
/// where the WAL replay of a restore begins. The backup ends with `take`, on the same session.
pub async fn start(client: &tokio_postgres::Client, id: &str) -> anyhow::Result<Lsn> {
    let label = format!("dbagent {id}");
    client
        .query_typed_one(
            "SELECT pg_backup_start($1, true)::text",
            &[(&label, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .context("starting the backup (pg_backup_start)")?
        .get::<_, String>(0)
        .parse()
        .map_err(|e| anyhow::anyhow!("pg_backup_start returned a bad LSN: {e}"))
}

/// Takes the backup `start` began: the files, `pg_backup_stop`, the index.
pub async fn take(req: Request<'_>) -> anyhow::Result<Taken> {
    let client = req.client;
    let started = req.started;
    tracing::info!(id = req.id, dir = %req.dir.display(), workers = req.workers(), incremental = req.base.is_some(), "file-level backup started");
    let changes = async {
        match &req.base {
            Some(base) if req.changes_from_wal => changes_since(&req, base, started).await,
            Some(_) => {
                tracing::info!(
                    "backup.changed_blocks = compare: reading every block of the changed files"
                );
                None
            }
            None => None,
        }
    };
    let root = req.dir.to_path_buf();
    let walk = async {
        let t = std::time::Instant::now();
        let walked = tokio::task::spawn_blocking(move || fileset::walk(&root))
            .await
            .context("walking the data directory")?;
        tracing::debug!(us = t.elapsed().as_micros() as u64, "data directory walked");
        walked
    };
    // The WAL since the base is read while the data directory is walked.
    let t = std::time::Instant::now();
    let (changes, walked, recipients) = tokio::join!(
        changes,
        walk,
        crate::pipeline::recipients(req.store.as_ref())
    );
    let ((dirs, found), recipients) = (walked?, recipients?);

    let placed = Arc::new(Mutex::new(Placed::default()));
    // The backup stops as soon as every byte is read, while the last bundle is made durable.
    let stopping = async {
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "files read");
        req.stopping.notify_one();
        let stop = client
            .query_typed_one(
                "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
                &[],
            )
            .await
            .context("ending the backup (pg_backup_stop)")?;
        let stop_lsn: Lsn = stop
            .get::<_, String>(0)
            .parse()
            .map_err(|e| anyhow::anyhow!("pg_backup_stop returned a bad LSN: {e}"))?;
        let label: String = stop.get(1);
        let map: Option<String> = stop.get(2);
        let facts = crate::pg::tarscan::TarFacts {
            backup_label: Some(label.clone()),
            manifest_tail: Vec::new(),
        };
        let Some((start_lsn, timeline)) = facts.start() else {
            anyhow::bail!("pg_backup_stop returned a backup_label without a start position");
        };
        // The base was chosen on the timeline of the checkpoint pg_backup_start waited for,
        // which is the label's: anything else and its unchanged blocks are not this history's.
        if let Some(base) = req
            .base
            .as_ref()
            .filter(|b| b.manifest.timeline != timeline)
        {
            anyhow::bail!(
                "the backup started on timeline {timeline}, but its base {} is on timeline {}: take the backup again",
                base.manifest.id,
                base.manifest.timeline
            );
        }
        tracing::debug!(ms = t.elapsed().as_millis() as u64, "backup stopped");
        Ok((stop_lsn, label, map, start_lsn, timeline))
    };
    // The index is assembled, encoded and compressed as soon as the last bundle is stored,
    // while the server ends the backup (its WAL switch reaches the disk with the CPU idle):
    // only the end of it, the label that `pg_backup_stop` returns, is compressed after, and
    // the object is written once that is in. An incremental after a 1% update at pgbench
    // scale 70, alternated with the index compressed after the stop: 3.0 ± 1.4 ms less of
    // 92 (30 each, a 2-core VM).
    let key = crate::repo::backup_index_key(req.sysid, req.id);
    let encode = |copied: Copied| -> anyhow::Result<_> {
        let (index, summary) = assemble(&req, dirs, &found, copied, &placed, String::new(), None)?;
        let json = serde_json::to_vec(&index).context("encoding the file index")?;
        tracing::debug!(
            ms = t.elapsed().as_millis() as u64,
            bytes = json.len(),
            "file index encoded"
        );
        let (tail, reader) = labelled_index(fileset::before_label(json)?);
        let (store, placed, key, mut opts) =
            (req.store.clone(), placed.clone(), key.clone(), req.opts);
        // About 0.1 MiB per GB of database (330 KiB at scale 70): zstd's workers and a hashing
        // thread would start for it just when the archiver starts two processes beside the
        // backup. At 1 TB, 100 MiB on one thread is a fraction of a second of a long backup.
        opts.small = true;
        let index = tokio::spawn(async move {
            let written = crate::pipeline::upload(store.as_ref(), &key, reader, opts).await;
            match written {
                Ok(w) => Ok(ObjectRef::written(&key, &w)),
                Err(e) => {
                    cleanup(store.as_ref(), &placed).await;
                    Err(e)
                }
            }
        });
        Ok((tail, index, summary))
    };
    let copied = copy_files(
        &req,
        &found,
        changes.as_ref(),
        recipients,
        placed.clone(),
        stopping,
        encode,
    )
    .await;
    // A failure drops the index's tail: its upload fails, and stores nothing.
    let ((tail, index, mut summary), (stop_lsn, label, map, start_lsn, timeline)) = match copied {
        Ok((encoded, Ok(stopped))) => (encoded, stopped),
        Ok((_, Err(e))) | Err(e) => {
            cleanup(req.store.as_ref(), &placed).await;
            return Err(e);
        }
    };
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "files stored");
    summary.changes_from = req.base.as_ref().map(|_| match changes {
        Some(_) => "wal",
        None => "compare",
    });
    match fileset::label_tail(&label, map.as_deref()) {
        // An upload that failed already says why when it is awaited.
        Ok(t) => {
            let _ = tail.send(t);
        }
        Err(e) => {
            drop(tail);
            cleanup(req.store.as_ref(), &placed).await;
            return Err(e.context("encoding the file index"));
        }
    }
    Ok(Taken {
        index,
        index_summary: summary,
        start_lsn,
        timeline,
        stop_lsn,
    })
}

/// The blocks changed since `base` started, from the WAL up to `started` (this backup's
/// start); `None` (and a warning saying why) when the WAL cannot tell, and every block of a
/// changed file is then read and compared.
async fn changes_since(req: &Request<'_>, base: &Base, started: Lsn) -> Option<Changes> {
    let t = std::time::Instant::now();
    let result: anyhow::Result<Collected> = async {
        // Blocks map to files only with the default relation block and segment sizes.
        let (block, segment) = req.relation_sizes;
        if block != walrefs::REL_BLOCK || segment != walrefs::REL_SEGMENT_BLOCKS {
            anyhow::bail!(
                "the server's block size ({block}) or segment size ({segment} blocks) is not the default"
            );
        }
        walrefs::collect(
            req.store.as_ref(),
            req.dir,
            req.sysid,
            base.manifest.timeline,
            req.wal_segment_size,
            base.manifest.start_lsn,
            started,
        )
        .await
    }
    .await;
    let result = result.and_then(|c| {
        if c.changes.shut_down {
            anyhow::bail!(
                "the server was shut down since the base, and a tool run while it was down (pg_checksums --enable, say) changes files without WAL"
            );
        }
        Ok(c)
    });
    match result {
        Ok(c) => {
            tracing::info!(
                base = %base.manifest.id,
                records = c.changes.records,
                local_segments = c.local_segments,
                summarized_segments = c.summarized_segments,
                archived_segments = c.fetched_segments,
                ms = t.elapsed().as_millis() as u64,
                "changed blocks read from the WAL since the base"
            );
            Some(c.changes)
        }
        Err(e) => {
            tracing::warn!(
                base = %base.manifest.id,
                error = %format!("{e:#}"),
                "cannot read the changed blocks from the WAL since the base; reading every block of the changed files instead"
            );
            None
        }
    }
}

/// The end of the file index for its upload, read after the bytes encoded while the server
/// ends the backup (`Cursor::chain`): the label, once `pg_backup_stop` has returned it. When
/// the backup fails first, the sender is dropped and the read fails, so that nothing is
/// stored.
struct LabelTail {
    rx: Option<std::sync::mpsc::Receiver<Vec<u8>>>,
    tail: std::io::Cursor<Vec<u8>>,
}

/// The file index as its upload reads it: the bytes encoded early, then the label.
type LabelledIndex = std::io::Chain<std::io::Cursor<Vec<u8>>, LabelTail>;

/// The file index's reader (`head`, then the label sent on the returned sender).
fn labelled_index(head: Vec<u8>) -> (std::sync::mpsc::SyncSender<Vec<u8>>, LabelledIndex) {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let tail = LabelTail {
        rx: Some(rx),
        tail: std::io::Cursor::new(Vec::new()),
    };
    (tx, std::io::Cursor::new(head).chain(tail))
}

impl std::io::Read for LabelTail {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(rx) = self.rx.take() {
            let tail = rx.recv().map_err(|_| {
                std::io::Error::other("the backup failed before pg_backup_stop returned its label")
            })?;
            self.tail = std::io::Cursor::new(tail);
        }
        self.tail.read(buf)
    }
}

/// Deletes the bundles a failed backup wrote (best effort: `prune` removes what is left).
async fn cleanup(store: &dyn Store, placed: &Mutex<Placed>) {
    let keys = placed.lock().expect("placed").started.clone();
    for key in keys {
        let _ = store.delete(&key).await;
    }
}

struct Copied {
    entries: Vec<Option<FileEntry>>,
    results: Vec<(usize, JobResult)>,
}

/// Reads, compresses and stores the files. `after_reads` runs once every byte is read and
/// compressed, while the writer makes the last bundle durable (not when the reading failed);
/// `after_written` once every bundle is stored, beside `after_reads`.
async fn copy_files<T, R>(
    req: &Request<'_>,
    found: &[Found],
    changes: Option<&Changes>,
    recipients: Option<Arc<Recipients>>,
    placed: Arc<Mutex<Placed>>,
    after_reads: impl std::future::Future<Output = T>,
    after_written: impl FnOnce(Copied) -> anyhow::Result<R>,
) -> anyhow::Result<(R, T)> {
    let (base_entries, reused, jobs) = plan(found, req.base.as_ref(), changes)?;
    // One writer: its upload already keeps `upload.concurrency` parts in flight; more writers
    // would multiply that memory (each part is `upload.part_size`) for no gain on 2-8 cores.
    let writers = 1;
    let (tx, rx) = mpsc::channel::<Sealed>(2 * writers);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let next_bundle = Arc::new(AtomicU32::new(0));
    let (sysid, id) = (req.sysid, req.id.to_string());
    let key_of: Arc<dyn Fn(u32) -> String + Send + Sync> =
        Arc::new(move |no| crate::repo::backup_bundle_key(sysid, &id, no));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        tasks.spawn(writer(
            req.store.clone(),
            rx.clone(),
            placed.clone(),
            next_bundle.clone(),
            key_of.clone(),
            req.opts.upload.part_size.max(5 << 20),
        ));
    }
    let job_count = jobs.len();
    let job_files: Vec<usize> = jobs.iter().map(|j| j.file).collect();
    let shared = Shared {
        root: req.dir,
        found,
        base_entries,
        jobs: Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>().into_iter()),
        results: Mutex::new((0..job_count).map(|_| None).collect()),
        next_blob: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        level: req.opts.compression.level,
        recipients,
    };
    let parallel = req.workers();
    // The workers borrow `shared`; block_in_place lets them run on this thread's scope while
    // the writers run on the runtime.
    let read = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..parallel)
                .map(|_| {
                    let tx = tx.clone();
                    let shared = &shared;
                    scope.spawn(move || worker(shared, tx))
                })
                .collect();
            drop(tx);
            crate::error::join_first(handles, "a backup worker")
        })
    });
    let writing = async {
        let mut written: anyhow::Result<()> = Ok(());
        while let Some(r) = tasks.join_next().await {
            let r = r.unwrap_or_else(|e| Err(anyhow::anyhow!("a bundle writer failed: {e}")));
            if written.is_ok() {
                written = r;
            }
        }
        written
    };
    let copied = || -> anyhow::Result<Copied> {
        let results = shared
            .results
            .lock()
            .expect("results")
            .drain(..)
            .zip(job_files)
            .map(|(r, file)| r.map(|r| (file, r)))
            .collect::<Option<Vec<_>>>()
            .context("a backup job did not finish")?;
        Ok(Copied {
            entries: reused,
            results,
        })
    };
    match read {
        Ok(()) => {
            let written = async {
                // A writer's error explains a worker's "the bundle writers stopped".
                writing.await?;
                after_written(copied()?)
            };
            let (written, after) = tokio::join!(written, after_reads);
            Ok((written?, after))
        }
        Err(e) => {
            writing.await?;
            Err(e)
        }
    }
}

fn assemble(
    req: &Request<'_>,
    dirs: Vec<fileset::DirEntry>,
    found: &[Found],
    copied: Copied,
    placed: &Mutex<Placed>,
    label: String,
    map: Option<String>,
) -> anyhow::Result<(FileIndex, Summary)> {
    // What was placed, but not the keys to delete should the backup still fail (its stop).
    let (mut bundles, placed_blobs) = {
        let mut placed = placed.lock().expect("placed");
        (
            std::mem::take(&mut placed.bundles),
            std::mem::take(&mut placed.blobs),
        )
    };
    bundles.sort();
    let mut index_bundles: Vec<BundleLoc> = Vec::new();
    let mut bundle_no: HashMap<u32, u32> = HashMap::new();
    for (no, key, size) in &bundles {
        bundle_no.insert(*no, index_bundles.len() as u32);
        index_bundles.push(BundleLoc {
            backup: req.id.to_string(),
            key: key.clone(),
            stored_bytes: *size,
        });
    }
    let own_bundles = index_bundles.clone();
    let mut new_blobs: Vec<(u32, Blob)> = placed_blobs.into_iter().collect();
    new_blobs.sort_by_key(|(id, _)| *id);
    let mut blobs = Vec::with_capacity(new_blobs.len());
    let mut blob_no: HashMap<u32, u32> = HashMap::new();
    let mut new_plain = 0u64;
    for (id, mut b) in new_blobs {
        b.bundle = bundle_no[&b.bundle];
        new_plain += b.plain as u64;
        blob_no.insert(id, blobs.len() as u32);
        blobs.push(b);
    }
    // The base's blobs (and bundles) that this backup still points at.
    let mut base_blob_no: HashMap<u32, u32> = HashMap::new();
    let mut base_bundle_no: HashMap<u32, u32> = HashMap::new();
    let mut map_base = |blob: u32| -> anyhow::Result<u32> {
        if let Some(n) = base_blob_no.get(&blob) {
            return Ok(*n);
        }
        let base = &req
            .base
            .as_ref()
            .context("an extent of a base without one")?
            .index;
        let mut b = *base
            .blobs
            .get(blob as usize)
            .context("a base blob out of range")?;
        let bundle = match base_bundle_no.get(&b.bundle) {
            Some(n) => *n,
            None => {
                let n = index_bundles.len() as u32;
                index_bundles.push(base.bundles[b.bundle as usize].clone());
                base_bundle_no.insert(b.bundle, n);
                n
            }
        };
        b.bundle = bundle;
        let n = blobs.len() as u32;
        blobs.push(b);
        base_blob_no.insert(blob, n);
        Ok(n)
    };

    let mut per_file: Vec<Vec<JobResult>> = (0..found.len()).map(|_| Vec::new()).collect();
    for (file, r) in copied.results {
        per_file[file].push(r);
    }
    let mut files = Vec::with_capacity(found.len());
    let mut plain_bytes = 0u64;
    let mut files_read = 0u64;
    let mut read_bytes = 0u64;
    for ((f, reused), mut parts) in found.iter().zip(copied.entries).zip(per_file) {
        if let Some(mut entry) = reused {
            for e in &mut entry.extents {
                e.blob = map_base(e.blob)?;
            }
            plain_bytes += entry.size;
            files.push(entry);
            continue;
        }
        files_read += 1;
        parts.sort_by_key(|p| p.from);
        if parts.iter().any(|p| p.vanished) {
            continue;
        }
        let mut hashes = Vec::new();
        let mut extents = Vec::new();
        let mut size = 0u64;
        let mut file_read = 0u64;
        for p in parts {
            if p.from != size {
                break; // an earlier part ended short: the file shrank while it was read
            }
            hashes.extend(p.hashes);
            file_read += p.read_io;
            for mut e in p.extents {
                e.blob = if e.blob & BASE_BLOB != 0 {
                    map_base(e.blob & !BASE_BLOB)?
                } else {
                    blob_no[&e.blob]
                };
                fileset::push_extent(&mut extents, e);
            }
            size += p.read;
            if p.short {
                break;
            }
        }
        plain_bytes += size;
        read_bytes += file_read;
        tracing::debug!(path = %f.path, size, read = file_read, "file read");
        files.push(FileEntry {
            path: f.path.clone(),
            size,
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            checksum: fileset::file_checksum(size, &hashes),
            blocks: fileset::encode_blocks(&hashes),
            extents,
        });
    }
    let index = FileIndex {
        format: fileset::INDEX_FORMAT,
        block_size: BLOCK,
        bundles: index_bundles,
        blobs,
        dirs,
        files,
        backup_label: label,
        tablespace_map: map.filter(|m| !m.is_empty()),
    };
    index.check()?;
    // The chain, oldest first: the base's own chain, then the base. (Ids sort by time only to
    // the second, so they cannot order it.)
    let depends_on = match &req.base {
        Some(b) => {
            let mut chain = b.manifest.depends_on().to_vec();
            chain.push(b.manifest.id.clone());
            chain
        }
        None => Vec::new(),
    };
    let summary = Summary {
        files: index.files.len() as u64,
        plain_bytes,
        new_plain_bytes: new_plain,
        files_read,
        read_bytes,
        changes_from: None,
        bundles: own_bundles,
        depends_on,
    };
    Ok((index, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index is compressed and written while the server ends the backup: it is stored,
    /// whole, only once the label is in; a backup that fails before (the label's sender
    /// dropped) stores no index, not even one without its label.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_index_is_stored_with_its_label_or_not_at_all() {
        use crate::storage::LocalStore;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        // Several inline blocks, so that most of it is compressed before the label is sent.
        let head: Vec<u8> = (0..400_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let opts = || {
            let mut o = PipeOptions::for_tests();
            o.small = true;
            o
        };

        let (tail, reader) = labelled_index(head.clone());
        let upload = crate::pipeline::upload(&store, "labelled", reader, opts());
        let send = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(
                store.head("labelled").await.unwrap().is_none(),
                "stored before its label"
            );
            tail.send(b"\"label\"}".to_vec()).unwrap();
        };
        let (written, ()) = tokio::join!(upload, send);
        written.unwrap();
        let (plain, _) = crate::pipeline::download(&store, "labelled", Vec::new())
            .await
            .unwrap();
        assert_eq!(plain.len(), head.len() + 8);
        assert!(plain.starts_with(&head) && plain.ends_with(b"\"label\"}"));

        let (tail, reader) = labelled_index(head);
        let upload = crate::pipeline::upload(&store, "failed", reader, opts());
        let fail = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            drop(tail);
        };
        let (written, ()) = tokio::join!(upload, fail);
        let e = written.unwrap_err();
        assert!(
            format!("{e:#}").contains("before pg_backup_stop returned its label"),
            "{e:#}"
        );
        assert!(store.head("failed").await.unwrap().is_none());
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() == 1,
            "a temporary file was left behind"
        );
    }

    fn prior(entry: &FileEntry, size: u64, changed: Vec<bool>) -> Prior<'_> {
        Prior {
            entry,
            hashes: (0..fileset::block_count(entry.size) as u64).collect(),
            changed: Some(changed),
            size,
        }
    }

    #[test]
    fn unnamed_blocks_come_from_the_base_and_so_does_a_short_last_one_of_an_unchanged_size() {
        let entry = |size| FileEntry {
            path: "base/5/1259".into(),
            size,
            mode: 0o600,
            mtime_ns: 0,
            checksum: String::new(),
            blocks: String::new(),
            extents: Vec::new(),
        };
        // Two whole blocks and a short third; the WAL names the second.
        let size = 2 * BLOCK + 8192;
        let e = entry(size);
        let p = prior(&e, size, vec![false, true, false]);
        assert_eq!(p.unchanged(0, size), Some((0, BLOCK)));
        assert_eq!(p.unchanged(BLOCK, size), None);
        assert_eq!(p.unchanged(2 * BLOCK, size), Some((2, 8192)));
        // Not at a block's start, or a job ending inside the block: read.
        assert_eq!(p.unchanged(8192, size), None);
        assert_eq!(p.unchanged(2 * BLOCK, 2 * BLOCK + 4096), None);
        // A file smaller than a block (most catalogs), its size unchanged: not read.
        let small = entry(3 * 8192);
        let p = prior(&small, 3 * 8192, vec![false]);
        assert_eq!(p.unchanged(0, 3 * 8192), Some((0, 3 * 8192)));
        // Grown or shrunk since the base: the short block is read, whatever the WAL says.
        let p = prior(&small, 4 * 8192, vec![false]);
        assert_eq!(p.unchanged(0, 4 * 8192), None);
        let p = prior(&e, 2 * BLOCK + 4096, vec![false, false, false]);
        assert_eq!(p.unchanged(2 * BLOCK, 2 * BLOCK + 4096), None);
        // No WAL (the compare method): everything is read.
        let p = Prior {
            changed: None,
            ..prior(&e, size, vec![])
        };
        assert_eq!(p.unchanged(0, size), None);
    }

    /// The jobs `job_end` cuts a file of `size` bytes into.
    fn jobs(size: u64, changed: Option<&[bool]>) -> Vec<(u64, u64)> {
        let mut jobs = Vec::new();
        let mut from = 0;
        loop {
            let to = job_end(from, size, changed);
            jobs.push((from, to));
            from = to;
            if from >= size {
                return jobs;
            }
        }
    }

    /// Bytes of `from..to` that a job reads: the changed blocks, or all of them.
    fn to_read(from: u64, to: u64, changed: Option<&[bool]>) -> u64 {
        (from / BLOCK..to.div_ceil(BLOCK))
            .filter(|b| changed.is_none_or(|c| c.get(*b as usize).copied().unwrap_or(true)))
            .map(|b| (b * BLOCK + BLOCK).min(to) - (b * BLOCK).max(from))
            .sum()
    }

    #[test]
    fn jobs_end_after_a_few_mib_to_read_so_the_workers_end_together() {
        // A 1 GiB relation file read whole (a full backup, or a file the WAL says nothing of).
        let size = 1 << 30;
        let whole = jobs(size, None);
        assert_eq!(whole.len() as u64, size / JOB_READ);
        // An incremental after a contiguous 1% update: 10 MiB changed in the middle and 10 MiB
        // appended at the end. Jobs over unchanged blocks only span up to JOB_BYTES of file;
        // the changed ones are split into JOB_READ, not left in one 64 MiB job.
        let blocks = (size / BLOCK) as usize;
        let mut changed = vec![false; blocks];
        let per = (10 << 20) / BLOCK as usize;
        changed[blocks / 2..blocks / 2 + per].fill(true);
        changed[blocks - per..].fill(true);
        let cut = jobs(size, Some(&changed));
        for (from, to) in &cut {
            assert!(
                from.is_multiple_of(BLOCK),
                "job starts inside a block: {from}"
            );
            assert!(to - from <= JOB_BYTES, "job {from}..{to} too long");
            assert!(
                to_read(*from, *to, Some(&changed)) <= JOB_READ,
                "job {from}..{to} reads too much"
            );
        }
        let reading: Vec<u64> = cut
            .iter()
            .map(|(f, t)| to_read(*f, *t, Some(&changed)))
            .filter(|r| *r > 0)
            .collect();
        assert_eq!(reading.iter().sum::<u64>(), 20 << 20);
        assert!(
            reading.len() >= 5,
            "20 MiB to read in {} jobs",
            reading.len()
        );
        // The jobs cover the file once, in order, up to a short last one.
        assert_eq!(cut.first().map(|j| j.0), Some(0));
        assert_eq!(cut.last().map(|j| j.1), Some(size));
        assert!(cut.windows(2).all(|w| w[0].1 == w[1].0));
        let short = 3 * BLOCK + 100;
        assert_eq!(
            jobs(short, Some(&[true, true, true, true])),
            vec![(0, short)]
        );
        assert_eq!(jobs(0, None), vec![(0, 0)]);
    }
}
