//! Restoring a file-level backup (`pg::fileset`): in parallel, every block checked.
//!
//! The index says where every byte lives. The blobs to read are grouped into ranges of a
//! bundle (one ranged GET each, at most `RANGE` bytes); `backup.parallel` downloads run at
//! once and as many worker threads open the blobs (decrypt, decompress, zstd checksum) and
//! write their pieces in place with `pwrite`, checking each block's xxh3 against the block map
//! before it is written: a restore fails on the first bad byte, naming the backup that stored
//! it. Memory: at most `IN_FLIGHT` bytes of ranges downloaded and not yet written, plus one
//! blob per worker. Files are fsynced once each at the end, then the directories; pg_control
//! is held back (as the tar restore does) until everything else is in place.
//!
//! `--delta` restores into a data directory of the same cluster: files not in the backup are
//! removed, and of the others only blocks whose hash differs are written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;

use super::untar::{CONTROL_FILE, CONTROL_UNVERIFIED, MARKER, MARKER_TEXT};
use crate::crypto::Identities;
use crate::error::Failure;
use crate::input_err;
use crate::pg::fileset::{self, BLOCK, BlobReader, Extent, FileEntry, FileIndex};
use crate::repo::manifest::BaseBackup;
use crate::storage::Store;

/// A ranged read covers at most this many bytes.
const RANGE: u64 = 4 << 20;
/// Blobs whose gap is smaller than this are read with the range between them.
const GAP: u64 = 256 << 10;
/// Downloaded bytes not yet written, at most.
const IN_FLIGHT: usize = 24 << 20;
/// Worker threads of one restore, at most, whatever `backup.parallel`: each holds about
/// 2.4 MiB (a 1 MiB decompressed blob, a 1 MiB staging buffer for direct writes, a zstd
/// context), so with `IN_FLIGHT` and the program the restore stays under 64 MiB. Measured
/// peaks at pgbench scale 70 on a `file://` repository: sixteen threads 64–65 MiB, twelve
/// 55–60 MiB, eight 50–53 MiB, four 31–38 MiB. Each decompresses pgbench data at about
/// 1.4 GB per CPU second while its partner waits on a direct write: eight keep most disks
/// busy.
pub const MAX_THREADS: usize = 8;

/// What a restore wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpacked {
    pub files: u64,
    pub bytes_written: u64,
    pub bytes_kept: u64,
}

/// A piece of a blob that goes into a file.
#[derive(Debug, Clone, Copy)]
struct Use {
    file: u32,
    at: u64,
    skip: u32,
    len: u64,
}

/// One ranged read of a bundle and the blobs in it.
struct Range {
    bundle: usize,
    start: u64,
    end: u64,
    blobs: Vec<(u32, Vec<Use>)>,
}

struct Target {
    /// Where it is written (pg_control under its held-back name).
    path: PathBuf,
    /// As the index names it, for messages.
    name: String,
    hashes: Vec<u64>,
    size: u64,
    mode: u32,
    /// Set once the file is created (or, in a delta, opened): the descriptor kept open, and
    /// whether it is for direct I/O; `None` past the open-file budget (it is then opened for
    /// each write). An error is kept as its message for whoever needs the file next.
    opened: OnceLock<Result<Option<(std::fs::File, bool)>, String>>,
}

impl Target {
    fn new(f: &FileEntry, dir: &Path) -> anyhow::Result<Target> {
        Ok(Target {
            path: target_path(dir, &f.path),
            name: f.path.clone(),
            hashes: f.block_hashes()?,
            size: f.size,
            mode: f.mode,
            opened: OnceLock::new(),
        })
    }

    /// The file, created (or opened) by whoever gets to it first: the creator thread running
    /// ahead of the writers, or a writer.
    fn open(&self, shared: &Shared) -> anyhow::Result<Option<&(std::fs::File, bool)>> {
        self.opened
            .get_or_init(|| self.create(shared).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map(Option::as_ref)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    fn create(&self, shared: &Shared) -> anyhow::Result<Option<(std::fs::File, bool)>> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = &self.path;
        let existed = shared.delta && path.exists();
        // Direct I/O where the file system offers it (not tmpfs): see `write_at`.
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(!shared.delta)
                .mode(self.mode & 0o7777)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(file) => (Ok(file), true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0), false),
            Err(e) => (Err(e), false),
        };
        let file = file.with_context(|| format!("creating {}", path.display()))?;
        if self.size > 0 || existed {
            file.set_len(self.size)
                .with_context(|| format!("sizing {}", path.display()))?;
            allocate(&file, self.size);
        }
        if existed {
            file.set_permissions(std::fs::Permissions::from_mode(self.mode & 0o7777))
                .with_context(|| format!("setting permissions on {}", path.display()))?;
        }
        let keep =
            self.size > 0 && shared.kept_open.fetch_add(1, Ordering::Relaxed) < shared.open_budget;
        Ok(keep.then_some((file, direct)))
    }
}

/// Where a file of the index is restored: pg_control under its held-back name.
fn target_path(dir: &Path, name: &str) -> PathBuf {
    if name == CONTROL_FILE {
        dir.join(CONTROL_UNVERIFIED)
    } else {
        dir.join(name)
    }
}

struct Shared<'a> {
    index: &'a FileIndex,
    targets: Vec<Target>,
    identities: Option<Arc<Identities>>,
    written: AtomicU64,
    failed: AtomicBool,
    /// false: read and check every block, write nothing (`verify --full`).
    write: bool,
    /// Into an existing data directory: files are opened, not truncated.
    delta: bool,
    /// Files to create, in the order the writers will first need them.
    create_order: Vec<u32>,
    kept_open: AtomicU64,
    open_budget: u64,
    retry_for: Duration,
}

fn corrupt(msg: String) -> anyhow::Error {
    anyhow::Error::new(Failure::Corrupt(msg))
}

/// Checks `dir` for a delta restore: a data directory of cluster `sysid`, no server running.
pub fn check_delta_dir(dir: &Path, sysid: u64) -> anyhow::Result<()> {
    if !dir.exists() || dir.read_dir().is_ok_and(|mut d| d.next().is_none()) {
        return Ok(());
    }
    match server_running(dir) {
        Some(Running::Seen(why)) => {
            return Err(input_err!(
                "{} is in use by a running server ({why}): stop it before a delta restore",
                dir.display()
            ));
        }
        Some(Running::Unseen) => {
            return Err(input_err!(
                "{} has a postmaster.pid: a server may be running on it where this process cannot see it (from another container or pod); stop it, or if it crashed, remove postmaster.pid, then try again",
                dir.display()
            ));
        }
        None => {}
    }
    let found = if dir.join(CONTROL_FILE).exists() {
        crate::pg::control::system_identifier(dir).ok()
    } else if dir.join(MARKER).exists() {
        None // an earlier restore into it stopped midway: carry on
    } else {
        return Err(input_err!(
            "{} is not a PostgreSQL data directory (no {CONTROL_FILE}): --delta restores into a data directory of the same cluster; use an empty directory without --delta",
            dir.display()
        ));
    };
    if let Some(found) = found
        && found != sysid
    {
        return Err(input_err!(
            "{} holds cluster {found}, not {sysid}: --delta restores only into a data directory of the same cluster; use an empty directory without --delta",
            dir.display()
        ));
    }
    Ok(())
}

/// What a postmaster.pid says about the server of a data directory.
enum Running {
    /// Running, and how that shows.
    Seen(String),
    /// Nothing shows it running here, but this process may not see it: the database's own
    /// container has other process IDs (its postmaster is often PID 1 there) and, in another
    /// pod, another IPC namespace. A server that stops cleanly removes the file.
    Unseen,
}

/// Whether a server runs on data directory `dir` (`None`: no postmaster.pid), checked as
/// PostgreSQL checks before it starts on one: the process postmaster.pid names is alive (and
/// not this one or its parent), or the System V shared memory segment it names still has
/// processes attached. The second holds where the first cannot see: beside the database in a
/// pod, a sidecar has process IDs of its own but shares the IPC namespace. Where neither
/// shows, the file is still taken as a server that may run (as pgBackRest does).
fn server_running(dir: &Path) -> Option<Running> {
    let pm = super::PostmasterPid::read(dir)?;
    if let Some(pid) = pm.pid
        && pid > 0
        && pid != std::process::id() as i32
        // SAFETY: getppid has no preconditions.
        && pid != unsafe { libc::getppid() }
    {
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            return Some(Running::Seen(format!(
                "postmaster.pid names process {pid}, which is running"
            )));
        }
    }
    let Some(shmid) = pm.shmid else {
        return Some(Running::Unseen);
    };
    // SAFETY: a zeroed shmid_ds is a valid value for IPC_STAT to overwrite.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes into `ds`, which outlives the call.
    let stat = unsafe { libc::shmctl(shmid, libc::IPC_STAT, &mut ds) };
    let err = std::io::Error::last_os_error().raw_os_error();
    Some(match stat {
        0 if ds.shm_nattch > 0 => Running::Seen(format!(
            "the shared memory segment postmaster.pid names has {} process(es) attached",
            ds.shm_nattch
        )),
        _ if stat != 0 && err == Some(libc::EACCES) => Running::Seen(
            "the shared memory segment postmaster.pid names exists and is not this user's to read"
                .into(),
        ),
        _ => Running::Unseen,
    })
}

/// Restores the file-level backup `b` into `dir`: empty, or (with `delta`) a data directory
/// of the same cluster.
pub async fn unpack(
    store: &dyn Store,
    b: &BaseBackup,
    dir: &Path,
    delta: bool,
    parallel: usize,
    retry_for: Duration,
) -> anyhow::Result<Unpacked> {
    let index = crate::pg::filebackup::load_index(store, b).await?;
    let identities = crate::pipeline::identities(store).await?;
    let parallel = parallel.max(1);
    let dir_owned = dir.to_path_buf();
    let index = Arc::new(index);
    let idx = index.clone();
    let prepared = Instant::now();
    let (needs, mut stats) =
        tokio::task::spawn_blocking(move || prepare(&idx, &dir_owned, delta, parallel))
            .await
            .context("preparing the data directory")??;
    let ranges = plan_ranges(&index, &needs);
    let targets = index
        .files
        .iter()
        .map(|f| Target::new(f, dir))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = Shared {
        index: &index,
        targets,
        identities,
        written: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        write: true,
        delta,
        create_order: create_order(&ranges, &needs),
        kept_open: AtomicU64::new(0),
        open_budget: open_file_budget() as u64,
        retry_for,
    };
    let fetching = Instant::now();
    fetch_and_write(store, &shared, ranges, parallel, b).await?;
    stats.bytes_written = shared.written.load(Ordering::Relaxed);
    let syncing = Instant::now();

    // Durable: each written file once, then the directories, then the label and pg_control.
    let touched: Vec<(PathBuf, Option<std::fs::File>)> = shared
        .targets
        .into_iter()
        .zip(&needs)
        .filter(|(_, n)| n.is_some())
        .map(|(t, _)| {
            let file = t.opened.into_inner().and_then(Result::ok).flatten();
            (t.path, file.map(|(f, _)| f))
        })
        .collect();
    let dirs: Vec<PathBuf> = std::iter::once(dir.to_path_buf())
        .chain(index.dirs.iter().map(|d| dir.join(&d.path)))
        .collect();
    let label = index.backup_label.clone();
    let map = index.tablespace_map.clone();
    let root = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        sync_all(&touched, parallel)?;
        for d in &dirs {
            if let Ok(f) = std::fs::File::open(d) {
                f.sync_all()
                    .with_context(|| format!("syncing {}", d.display()))?;
            }
        }
        write_synced(&root.join("backup_label"), label.as_bytes())?;
        if let Some(map) = map {
            write_synced(&root.join("tablespace_map"), map.as_bytes())?;
        }
        Ok(())
    })
    .await
    .context("syncing the restored files")??;
    super::untar::release(dir)?;
    tracing::debug!(
        prepare = ?fetching.duration_since(prepared),
        write = ?syncing.duration_since(fetching),
        sync = ?syncing.elapsed(),
        "file-level restore timings"
    );
    stats.files = index.files.len() as u64;
    Ok(stats)
}

/// Reads every block a file-level backup restores (its own and its chain's) and checks it
/// against the block map, writing nothing; returns the bytes checked.
pub async fn check(store: &dyn Store, b: &BaseBackup, parallel: usize) -> anyhow::Result<u64> {
    let index = crate::pg::filebackup::load_index(store, b).await?;
    let needs: Vec<Option<Vec<Extent>>> = index
        .files
        .iter()
        .map(|f| Some(f.extents.clone()))
        .collect();
    let ranges = plan_ranges(&index, &needs);
    let targets = index
        .files
        .iter()
        .map(|f| Target::new(f, Path::new("")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = Shared {
        index: &index,
        targets,
        identities: crate::pipeline::identities(store).await?,
        written: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        write: false,
        delta: false,
        create_order: Vec::new(),
        kept_open: AtomicU64::new(0),
        open_budget: 0,
        retry_for: Duration::from_secs(60),
    };
    fetch_and_write(store, &shared, ranges, parallel.max(1), b).await?;
    Ok(shared.written.load(Ordering::Relaxed))
}

fn write_synced(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all_at(data, 0)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_all(paths: &[(PathBuf, Option<std::fs::File>)], parallel: usize) -> anyhow::Result<()> {
    for_each_parallel(paths, parallel, |_, (p, open)| {
        match open {
            Some(f) => f.sync_all(),
            None => std::fs::File::open(p).and_then(|f| f.sync_all()),
        }
        .with_context(|| format!("syncing {}", p.display()))
    })
}

/// Runs `work` on every item, on `parallel` threads taking the next item as they finish; the
/// first error is returned (the other threads finish the item they hold, then stop).
fn for_each_parallel<T: Sync>(
    items: &[T],
    parallel: usize,
    work: impl Fn(usize, &T) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    let next = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(item) = items.get(i) else { break };
                        if let Err(e) = work(i, item) {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        crate::error::join_first(workers, "a restore thread")
    })
}

/// What `prepare` found to do: per file of the index, the extents still to write (`None`:
/// nothing, the file is left as it is), and what a delta kept.
type Prepared = (Vec<Option<Vec<Extent>>>, Unpacked);

/// Raises the soft limit on open files to the hard one; returns how many a restore may keep
/// open (the rest are opened when written).
fn open_file_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    (lim.rlim_cur as usize).saturating_sub(256).min(1 << 16)
}

/// Makes the directory ready: the marker, the directories, and in a delta the strays removed
/// and the blocks already right found. Returns, per file of the index, the extents still to
/// write (`None`: nothing to do) and what a delta kept. The files are created by the writers
/// (`Target::open`).
fn prepare(
    index: &FileIndex,
    dir: &Path,
    delta: bool,
    parallel: usize,
) -> anyhow::Result<Prepared> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting permissions on {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), MARKER_TEXT)
        .with_context(|| format!("writing {MARKER} into {}", dir.display()))?;
    if delta {
        // Unstartable until the restore is complete.
        let _ = std::fs::remove_file(dir.join(CONTROL_FILE));
        remove_strays(index, dir)?;
    }
    for d in &index.dirs {
        let p = dir.join(&d.path);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.mode & 0o7777))
            .with_context(|| format!("setting permissions on {}", p.display()))?;
    }
    if !delta {
        let needs = index
            .files
            .iter()
            .map(|f| Some(f.extents.clone()))
            .collect();
        return Ok((needs, Unpacked::default()));
    }
    let kept = AtomicU64::new(0);
    let needs: Mutex<Vec<Option<Vec<Extent>>>> = Mutex::new(vec![None; index.files.len()]);
    for_each_parallel(&index.files, parallel, |i, f| {
        let path = target_path(dir, &f.path);
        let need = if f.path == CONTROL_FILE {
            f.extents.clone()
        } else {
            let want = f.block_hashes()?;
            match fileset::hash_file(&path) {
                Some((size, have)) => {
                    let mut need = Vec::new();
                    for (bi, h) in want.iter().enumerate() {
                        let from = bi as u64 * BLOCK;
                        let to = (from + BLOCK).min(f.size);
                        if have.get(bi) == Some(h) && (to - from == BLOCK || have.len() == bi + 1) {
                            kept.fetch_add(to - from, Ordering::Relaxed);
                            continue;
                        }
                        fileset::slice_extents(&f.extents, from, to, &mut need);
                    }
                    if need.is_empty() && size == f.size && mode_of(&path) == Some(f.mode & 0o7777)
                    {
                        return Ok(()); // already right
                    }
                    need
                }
                None => f.extents.clone(),
            }
        };
        needs.lock().expect("needs")[i] = Some(need);
        Ok(())
    })?;
    Ok((
        needs.into_inner().expect("needs"),
        Unpacked {
            bytes_kept: kept.into_inner(),
            ..Unpacked::default()
        },
    ))
}

fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::metadata(path).ok()?.permissions().mode() & 0o7777)
}

/// The files to create, in the order the ranges first write them, then those nothing is
/// written into (empty files).
fn create_order(ranges: &[Range], needs: &[Option<Vec<Extent>>]) -> Vec<u32> {
    let mut seen = vec![false; needs.len()];
    let mut order = Vec::with_capacity(needs.len());
    let uses = ranges
        .iter()
        .flat_map(|r| r.blobs.iter().flat_map(|(_, u)| u.iter().map(|u| u.file)));
    let rest = (0..needs.len() as u32).filter(|&i| needs[i as usize].is_some());
    for file in uses.chain(rest) {
        if !std::mem::replace(&mut seen[file as usize], true) {
            order.push(file);
        }
    }
    order
}

/// Allocates the file's blocks ahead of the writes (best effort: without it they are allocated
/// as written). On ext4 a direct write into a hole takes the file's lock exclusively, so the
/// workers writing one 1 GiB segment wrote one at a time; into allocated blocks they write
/// side by side.
fn allocate(file: &std::fs::File, size: u64) {
    // SAFETY: fallocate on an open descriptor; mode 0 keeps the data already there.
    unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            size as libc::off_t,
        );
    }
}

/// Removes what a delta target holds and the backup does not (files of dropped relations, WAL,
/// a stale postmaster.pid).
fn remove_strays(index: &FileIndex, dir: &Path) -> anyhow::Result<()> {
    let files: HashSet<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
    let dirs: HashSet<&str> = index.dirs.iter().map(|d| d.path.as_str()).collect();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for entry in
            std::fs::read_dir(&abs).with_context(|| format!("reading {}", abs.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", abs.display()))?;
            let rel_path = rel.join(entry.file_name());
            let rel_str = rel_path.to_string_lossy().into_owned();
            let ft = entry.file_type()?;
            if ft.is_dir() && !ft.is_symlink() {
                if dirs.contains(rel_str.as_str()) {
                    stack.push(rel_path);
                } else {
                    std::fs::remove_dir_all(entry.path())
                        .with_context(|| format!("removing {}", entry.path().display()))?;
                }
            } else if !files.contains(rel_str.as_str()) && rel_str != MARKER {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
    }
    Ok(())
}

/// Groups the blobs to read into ranged reads.
fn plan_ranges(index: &FileIndex, needs: &[Option<Vec<Extent>>]) -> Vec<Range> {
    let mut uses: BTreeMap<u32, Vec<Use>> = BTreeMap::new();
    for (file, need) in needs.iter().enumerate() {
        for e in need.iter().flatten() {
            uses.entry(e.blob).or_default().push(Use {
                file: file as u32,
                at: e.at,
                skip: e.skip,
                len: e.len,
            });
        }
    }
    let mut by_bundle: HashMap<u32, Vec<(u32, Vec<Use>)>> = HashMap::new();
    for (blob, u) in uses {
        by_bundle
            .entry(index.blobs[blob as usize].bundle)
            .or_default()
            .push((blob, u));
    }
    let mut ranges = Vec::new();
    let mut bundles: Vec<_> = by_bundle.into_iter().collect();
    bundles.sort_by_key(|(b, _)| *b);
    for (bundle, mut blobs) in bundles {
        blobs.sort_by_key(|(b, _)| index.blobs[*b as usize].offset);
        let mut current: Option<Range> = None;
        for (blob, u) in blobs {
            let b = index.blobs[blob as usize];
            let (start, end) = (b.offset, b.offset + b.stored as u64);
            if let Some(r) = current.as_mut()
                && start >= r.end
                && start - r.end <= GAP
                && end - r.start <= RANGE
            {
                r.end = end;
                r.blobs.push((blob, u));
                continue;
            }
            if let Some(r) = current.take() {
                ranges.push(r);
            }
            current = Some(Range {
                bundle: bundle as usize,
                start,
                end,
                blobs: vec![(blob, u)],
            });
        }
        ranges.extend(current);
    }
    ranges
}

/// One ranged read, tried again on transient errors and stalls for `retry_for`: one hiccup of
/// the store must not fail a restore of hours.
async fn get_range(
    store: &dyn Store,
    key: &str,
    range: std::ops::Range<u64>,
    retry_for: Duration,
) -> anyhow::Result<Bytes> {
    let deadline = Instant::now() + retry_for;
    let mut pause = Duration::from_millis(100);
    loop {
        let attempt = tokio::time::timeout(
            retry_for.max(Duration::from_secs(10)),
            store.get_range(key, range.clone()),
        )
        .await;
        let err = match attempt {
            Ok(Ok(bytes)) if bytes.len() as u64 == range.end - range.start => return Ok(bytes),
            Ok(Ok(_)) => {
                return Err(corrupt(format!(
                    "{key} is shorter than the backup's index says: it is damaged or was truncated"
                )));
            }
            Ok(Err(e)) if !crate::storage::is_transient(&e) => {
                return Err(e.context(format!("reading {key}")));
            }
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("no answer from the store"),
        };
        if Instant::now() + pause > deadline {
            return Err(err.context(format!(
                "reading {key} (retried for {})",
                humantime::format_duration(retry_for)
            )));
        }
        tracing::warn!(key, error = %format!("{err:#}"), "reading a bundle failed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// A downloaded range; its budget is given back when the last of its blobs is written.
struct Fetched {
    range: Range,
    bytes: Bytes,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

async fn fetch_and_write(
    store: &dyn Store,
    shared: &Shared<'_>,
    ranges: Vec<Range>,
    parallel: usize,
    b: &BaseBackup,
) -> anyhow::Result<()> {
    let retry_for = shared.retry_for;
    let budget = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT >> 10));
    // Blobs, not ranges, are the unit of work: a range of well-compressed data holds tens of
    // MiB of plain bytes, and a few such ranges left for one thread made the end of a restore
    // single-threaded. Twice as many threads as `parallel` when writing: a direct write waits
    // for the disk, and the other thread of the pair decompresses meanwhile.
    let threads = if shared.write { parallel * 2 } else { parallel }.min(MAX_THREADS);
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Arc<Fetched>, usize)>(threads * 2);
    // Held by the workers only: when the last one stops (on an error), the receiver goes with
    // it and a send fails instead of waiting for ever.
    let rx = Arc::new(Mutex::new(rx));
    let index = shared.index;
    let downloads = async move {
        let mut fetches = futures::stream::iter(ranges)
            .map(|r| {
                let budget = budget.clone();
                async move {
                    let kib = (((r.end - r.start) >> 10) as u32 + 1).min((IN_FLIGHT >> 10) as u32);
                    let permit = budget
                        .acquire_many_owned(kib)
                        .await
                        .expect("semaphore open");
                    let key = &index.bundles[r.bundle].key;
                    let bytes = get_range(store, key, r.start..r.end, retry_for).await?;
                    anyhow::Ok(Fetched {
                        range: r,
                        bytes,
                        _permit: permit,
                    })
                }
            })
            .buffer_unordered(parallel);
        loop {
            let next = tokio::select! {
                next = fetches.next() => next,
                _ = stopped() => {
                    // The file creator and the writers stop at their next file or blob.
                    shared.failed.store(true, Ordering::Relaxed);
                    anyhow::bail!(STOPPED);
                }
            };
            let Some(next) = next else { break };
            if shared.failed.load(Ordering::Relaxed) {
                break;
            }
            let fetched = Arc::new(next?);
            for blob in 0..fetched.range.blobs.len() {
                // Blocks while every worker is busy: that is the back-pressure.
                tx.send((fetched.clone(), blob))
                    .map_err(|_| anyhow::anyhow!("the restore workers stopped"))?;
            }
        }
        anyhow::Ok(())
    };
    let result = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let rx = rx.clone();
                    scope.spawn(move || -> anyhow::Result<()> {
                        let mut reader = BlobReader::new()?;
                        let mut bufs = (Staging::new(), Staging::new());
                        loop {
                            let next = rx.lock().expect("rx").recv();
                            let Ok((fetched, blob)) = next else {
                                return Ok(());
                            };
                            if let Err(e) =
                                write_blob(shared, &mut reader, &mut bufs, &fetched, blob, b)
                            {
                                shared.failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    })
                })
                .collect();
            drop(rx);
            // Creating a file costs a fraction of a millisecond on ext4 (more right after many
            // were deleted), and two threads creating in one directory spin on its lock: one
            // thread creates them all ahead of the writers, overlapped with the downloads.
            let creator = scope.spawn(|| -> anyhow::Result<()> {
                for &i in &shared.create_order {
                    if shared.failed.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = shared.targets[i as usize].open(shared) {
                        shared.failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            });
            let handle = tokio::runtime::Handle::current();
            let fetched = handle.block_on(downloads);
            let first = crate::error::join_first(
                std::iter::once(creator).chain(workers),
                "a restore thread",
            );
            // A worker's error (a corrupt blob) explains why the downloads stopped.
            first.and(fetched)
        })
    });
    result.with_context(|| format!("restoring base backup {}", b.id))
}

/// Set when the process is told to stop (a drill past `drill.timeout`, SIGTERM): a file-level
/// restore works on its own threads, out of reach of the caller's timers and signals, so it
/// looks at this before each range it hands to its writers and stops there.
static STOP: AtomicBool = AtomicBool::new(false);

/// The error of a restore that `stop` stopped.
pub const STOPPED: &str = "stopped: the process was told to stop";

/// Stops every file-level restore of this process at its next range (see `STOP`).
pub fn stop() {
    STOP.store(true, Ordering::Relaxed);
}

/// Returns once `stop` was called.
async fn stopped() {
    while !STOP.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Direct I/O wants buffers, offsets and lengths aligned to the device's block: 4 KiB covers
/// the devices this runs on.
const DIRECT_ALIGN: usize = 4096;

/// A worker's buffer for direct writes, aligned to `DIRECT_ALIGN`.
struct Staging(Vec<u8>);

impl Staging {
    fn new() -> Staging {
        Staging(vec![0u8; fileset::CHUNK + DIRECT_ALIGN])
    }

    /// `len` aligned bytes.
    fn get(&mut self, len: usize) -> &mut [u8] {
        let off = self.0.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.0[off..off + len]
    }

    /// `data` itself when it is aligned, else a copy in an aligned place.
    fn aligned<'a>(&'a mut self, data: &'a [u8]) -> &'a [u8] {
        if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return data;
        }
        let buf = self.get(data.len());
        buf.copy_from_slice(data);
        buf
    }
}

/// Writes `data` at `at` of `target`: through its direct descriptor when it has one (no copy
/// into the page cache, no write-back to wait for at the end: on this machine's disk a 4.5 GB
/// restore through the page cache was bound by write-back), the unaligned tail of a file
/// through the page cache.
fn write_at(
    shared: &Shared,
    target: &Target,
    staging: &mut Staging,
    data: &[u8],
    at: u64,
) -> anyhow::Result<()> {
    let what = || format!("writing {}", target.path.display());
    let handle = target.open(shared)?;
    let mut data = data;
    let mut at = at;
    if let Some((f, true)) = handle
        && at.is_multiple_of(DIRECT_ALIGN as u64)
    {
        let whole = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        if whole > 0 {
            f.write_all_at(staging.aligned(&data[..whole]), at)
                .with_context(what)?;
        }
        data = &data[whole..];
        at += whole as u64;
        if data.is_empty() {
            return Ok(());
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target.path)
            .with_context(what)?;
        return f.write_all_at(data, at).with_context(what);
    }
    let opened;
    let f = match handle {
        Some((f, false)) => f,
        _ => {
            opened = std::fs::OpenOptions::new()
                .write(true)
                .open(&target.path)
                .with_context(what)?;
            &opened
        }
    };
    f.write_all_at(data, at).with_context(what)?;
    // Start writing back now, so the fsync at the end finds little left to do and the disk
    // works while the next blobs are decompressed. Best effort: fsync decides.
    // SAFETY: sync_file_range on an open descriptor, a range within the file.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(f),
            at as libc::off64_t,
            data.len() as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
    Ok(())
}

fn write_blob(
    shared: &Shared,
    reader: &mut BlobReader,
    (plain, staging): &mut (Staging, Staging),
    fetched: &Fetched,
    blob: usize,
    restoring: &BaseBackup,
) -> anyhow::Result<()> {
    let range = &fetched.range;
    let bundle = &shared.index.bundles[range.bundle];
    let (blob_no, uses) = &range.blobs[blob];
    {
        let blob = shared.index.blobs[*blob_no as usize];
        let from = (blob.offset - range.start) as usize;
        let stored = &fetched.bytes[from..from + blob.stored as usize];
        let name = format!(
            "blob {blob_no} (bytes {}..{} of {}) of backup {}",
            blob.offset,
            blob.offset + blob.stored as u64,
            bundle.key,
            bundle.backup
        );
        if blob.plain as usize > fileset::CHUNK {
            return Err(corrupt(format!(
                "{name} is corrupt: the index gives it {} plain bytes, more than a blob holds",
                blob.plain
            )));
        }
        // Decompressed into an aligned buffer: most pieces are then written without a copy.
        let plain = plain.get(blob.plain as usize);
        reader.open_into(stored, plain, shared.identities.as_deref(), &name)?;
        let plain = &*plain;
        for u in uses {
            let target = &shared.targets[u.file as usize];
            let data = &plain[u.skip as usize..u.skip as usize + u.len as usize];
            // Blocks never straddle blobs: each piece is whole blocks (the file's last may be short).
            for (k, block) in data.chunks(BLOCK as usize).enumerate() {
                let bi = (u.at / BLOCK) as usize + k;
                if target.hashes.get(bi) != Some(&fileset::block_hash(block)) {
                    return Err(corrupt(format!(
                        "block {bi} of {} from backup {} ({}) does not match its checksum: the backup is damaged; restore an earlier backup{}",
                        target.name,
                        bundle.backup,
                        bundle.key,
                        if bundle.backup != restoring.id {
                            format!(" (backup {} builds on it)", restoring.id)
                        } else {
                            String::new()
                        }
                    )));
                }
            }
            if !shared.write {
                shared.written.fetch_add(u.len, Ordering::Relaxed);
                continue;
            }
            write_at(shared, target, staging, data, u.at)?;
            shared.written.fetch_add(u.len, Ordering::Relaxed);
        }
    }
    Ok(())
}
