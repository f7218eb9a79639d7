//! The file-level backup layout: a data directory stored as files cut into blobs.
//!
//! A *blob* is up to `CHUNK` plain bytes (one piece of a big file, or several small files
//! back to back) compressed into one zstd frame with its content checksum, then encrypted
//! whole with age in an encrypted repository. Blobs are appended to *bundles*, objects of a
//! few hundred MiB written by multipart upload, so a restore reads any run of blobs with one
//! ranged GET and a backup of a thousand small files is not a thousand objects.
//!
//! The *index* (one data object per backup, `files.json.zst`, written through `pipeline` so it
//! has a trailer and is sealed like any data) lists every file with its size, mode, mtime,
//! checksum and *block map* (the xxh3-64 of every `BLOCK` bytes), and where each byte range
//! lives: extents pointing at blobs, in this backup's bundles or an earlier backup's. An
//! incremental backup reads only files whose size or mtime changed, stores only the blocks
//! whose hash differs from the previous backup's block map, and points at the previous
//! backup's blobs for the rest (as pgBackRest's block incremental does). A restore needs only
//! the index of the backup it restores: every byte's location is in it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::crypto::{Identities, Recipients};
use crate::error::Failure;
use crate::input_err;

/// Bytes per block-map entry. 128 KiB: a 1 GiB relation segment has 8,192 entries (64 KiB of
/// map), and an update of a contiguous range stores little more than the pages it touched.
pub const BLOCK: u64 = 128 << 10;
/// Plain bytes per blob at most (a multiple of `BLOCK`).
pub const CHUNK: usize = 1 << 20;
/// Version of the index format.
pub const INDEX_FORMAT: u32 = 1;

/// Where a byte range of a file lives: `len` bytes at file offset `at` are the plain bytes
/// `skip..skip+len` of blob `blob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u64, u64, u32, u32)", into = "(u64, u64, u32, u32)")]
pub struct Extent {
    pub at: u64,
    pub len: u64,
    pub blob: u32,
    pub skip: u32,
}

impl From<(u64, u64, u32, u32)> for Extent {
    fn from((at, len, blob, skip): (u64, u64, u32, u32)) -> Self {
        Extent {
            at,
            len,
            blob,
            skip,
        }
    }
}

impl From<Extent> for (u64, u64, u32, u32) {
    fn from(e: Extent) -> Self {
        (e.at, e.len, e.blob, e.skip)
    }
}

/// One stored blob: `stored` bytes at `offset` in bundle `bundle`, `plain` bytes once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u32, u64, u32, u32)", into = "(u32, u64, u32, u32)")]
pub struct Blob {
    pub bundle: u32,
    pub offset: u64,
    pub stored: u32,
    pub plain: u32,
}

impl From<(u32, u64, u32, u32)> for Blob {
    fn from((bundle, offset, stored, plain): (u32, u64, u32, u32)) -> Self {
        Blob {
            bundle,
            offset,
            stored,
            plain,
        }
    }
}

impl From<Blob> for (u32, u64, u32, u32) {
    fn from(b: Blob) -> Self {
        (b.bundle, b.offset, b.stored, b.plain)
    }
}

/// A bundle object, and the backup that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleLoc {
    pub backup: String,
    pub key: String,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Modification time when the backup read it, in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// xxh3-128 of the size and the block map: equal checksums, equal content.
    pub checksum: String,
    /// The block map: xxh3-64 of every `BLOCK` bytes, little endian, base64.
    pub blocks: String,
    /// Sorted, contiguous, covering `0..size`.
    pub extents: Vec<Extent>,
}

impl FileEntry {
    pub fn block_hashes(&self) -> anyhow::Result<Vec<u64>> {
        decode_blocks(&self.blocks).with_context(|| format!("the block map of {}", self.path))
    }
}

/// Everything a restore needs, in one data object per backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub format: u32,
    pub block_size: u64,
    pub bundles: Vec<BundleLoc>,
    pub blobs: Vec<Blob>,
    pub dirs: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    /// What `pg_backup_stop` returned, written into the restored directory last.
    pub backup_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_map: Option<String>,
}

/// The JSON of an index encoded with an empty label and no tablespace map (before
/// `pg_backup_stop` returned them), up to where its label goes: with `label_tail` after it,
/// the same bytes as encoding the whole index.
pub fn before_label(mut rest: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    const EMPTY: &[u8] = br#","backup_label":""}"#;
    anyhow::ensure!(
        rest.ends_with(EMPTY),
        "the file index was not encoded with an empty label"
    );
    // Keep `,"backup_label":`, drop the empty string and the closing brace.
    rest.truncate(rest.len() - 3);
    Ok(rest)
}

/// The end of an index's JSON after `before_label`: its label and tablespace map.
pub fn label_tail(label: &str, map: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut tail = serde_json::to_vec(label)?;
    if let Some(map) = map.filter(|m| !m.is_empty()) {
        tail.extend_from_slice(br#","tablespace_map":"#);
        serde_json::to_writer(&mut tail, map)?;
    }
    tail.push(b'}');
    Ok(tail)
}

impl FileIndex {
    /// Checks that every extent points inside a blob and every blob inside a bundle, and that
    /// each file's extents cover it: a damaged or hostile index fails here, before a byte is
    /// written.
    pub fn check(&self) -> anyhow::Result<()> {
        let bad = |what: String| {
            anyhow::Error::new(Failure::Corrupt(format!(
                "the backup's file index is corrupt: {what}"
            )))
        };
        for (i, b) in self.blobs.iter().enumerate() {
            if b.bundle as usize >= self.bundles.len() || b.plain as usize > CHUNK {
                return Err(bad(format!("blob {i} points outside the bundles")));
            }
        }
        for f in &self.files {
            if !safe_path(&f.path) {
                return Err(bad(format!("unsafe path {:?}", f.path)));
            }
            let mut next = 0u64;
            for e in &f.extents {
                let blob = self
                    .blobs
                    .get(e.blob as usize)
                    .ok_or_else(|| bad(format!("{} points at a missing blob", f.path)))?;
                if e.at != next || e.skip as u64 + e.len > blob.plain as u64 {
                    return Err(bad(format!("the extents of {} do not line up", f.path)));
                }
                next += e.len;
            }
            if next != f.size {
                return Err(bad(format!("the extents of {} do not cover it", f.path)));
            }
        }
        for d in &self.dirs {
            if !safe_path(&d.path) {
                return Err(bad(format!("unsafe path {:?}", d.path)));
            }
        }
        Ok(())
    }
}

/// A relative path that stays inside the directory.
fn safe_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

pub fn encode_blocks(hashes: &[u64]) -> String {
    let mut raw = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        raw.extend_from_slice(&h.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw)
}

pub fn decode_blocks(text: &str) -> anyhow::Result<Vec<u64>> {
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .context("not base64")?;
    if raw.len() % 8 != 0 {
        anyhow::bail!("a block map of {} bytes", raw.len());
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

pub fn block_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// The file checksum: xxh3-128 over the size and the block map.
pub fn file_checksum(size: u64, hashes: &[u64]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&size.to_le_bytes());
    for b in hashes {
        h.update(&b.to_le_bytes());
    }
    format!("{:032x}", h.digest128())
}

/// The number of blocks of a file of `size` bytes.
pub fn block_count(size: u64) -> usize {
    size.div_ceil(BLOCK) as usize
}

/// Compresses (zstd frame with content checksum) and, for an encrypted repository, encrypts one
/// blob. One per worker thread: it keeps its zstd context.
pub struct BlobWriter {
    zstd: zstd::bulk::Compressor<'static>,
    sealer: crate::crypto::blob::BlobSealer,
}

impl BlobWriter {
    pub fn new(level: i32) -> anyhow::Result<BlobWriter> {
        let mut zstd = zstd::bulk::Compressor::new(level).context("starting zstd")?;
        zstd.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .context("starting zstd")?;
        Ok(BlobWriter {
            zstd,
            sealer: Default::default(),
        })
    }

    pub fn seal(
        &mut self,
        plain: &[u8],
        recipients: Option<&Recipients>,
    ) -> anyhow::Result<Vec<u8>> {
        let compressed = self.zstd.compress(plain).context("compressing")?;
        match recipients {
            None => Ok(compressed),
            Some(r) => self.sealer.seal(r, &compressed),
        }
    }
}

/// Opens one blob (`name` says where it is, for messages): decrypts, decompresses, and checks
/// the zstd content checksum and the plain length the index recorded.
pub struct BlobReader {
    zstd: zstd::bulk::Decompressor<'static>,
    opener: crate::crypto::blob::BlobOpener,
}

impl BlobReader {
    pub fn new() -> anyhow::Result<BlobReader> {
        Ok(BlobReader {
            zstd: zstd::bulk::Decompressor::new().context("starting zstd")?,
            opener: Default::default(),
        })
    }

    pub fn open(
        &mut self,
        stored: &[u8],
        plain_len: usize,
        identities: Option<&Identities>,
        name: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let mut out = vec![0u8; plain_len];
        self.open_into(stored, &mut out, identities, name)?;
        Ok(out)
    }

    /// Opens a blob into `out`, which is as long as the blob's plain bytes.
    pub fn open_into(
        &mut self,
        stored: &[u8],
        out: &mut [u8],
        identities: Option<&Identities>,
        name: &str,
    ) -> anyhow::Result<()> {
        let corrupt =
            |why: String| anyhow::Error::new(Failure::Corrupt(format!("{name} is corrupt: {why}")));
        let opened;
        let age = stored.starts_with(b"age-encryption.org/v1\n");
        let compressed = if age || stored.starts_with(crate::crypto::blob::MAGIC) {
            let Some(ids) = identities else {
                return Err(input_err!(
                    "{name} is encrypted: readers need {}, the secret keys; nothing was written",
                    crate::crypto::keys::IDENTITY_SETTING
                ));
            };
            // Blobs sealed as a whole age stream each (before one data key per writer).
            opened = match age {
                true => crate::crypto::seal::open_bytes(ids, stored, name)?,
                false => self.opener.open(ids, stored, name)?,
            };
            &opened[..]
        } else {
            stored
        };
        let n = self
            .zstd
            .decompress_to_buffer(compressed, out)
            .map_err(|e| corrupt(e.to_string()))?;
        if n != out.len() {
            return Err(corrupt(format!(
                "{n} plain bytes, the index says {}",
                out.len()
            )));
        }
        Ok(())
    }
}

/// A file or directory of the data directory, as the walk found it.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
}

/// What a base backup leaves out (PostgreSQL's own list, `basebackup.c`): the contents of
/// these directories (the directories themselves are kept, empty)…
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// …and these files, wherever the name is given as a path, and temporary files anywhere.
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "backup_label.old",
    "current_logfiles",
    "standby.signal",
    "recovery.signal",
    "pg_control.dbagent-unverified",
    crate::restore::untar::MARKER,
];

fn skipped(rel: &str, name: &str) -> bool {
    SKIP_FILES.contains(&rel)
        || name.starts_with("pgsql_tmp")
        || name == "pg_internal.init"
        || name.ends_with(".dbagent-unverified")
}

/// Threads that walk a data directory. The walk sits between pg_backup_start and the first
/// file read, and grows with the number of files, not their size: a cluster of many
/// relations (64,000 files) walked in 100 ms on two threads against 146 ms on one. At pgbench
/// scale 70 (1,274 files, 4 ms) the difference is within the noise.
const WALK_THREADS: usize = 2;

/// Walks a data directory: directories (sorted) and files (sorted), as PostgreSQL's base
/// backup would include them. A file that vanishes during the walk (a dropped table) is left
/// out: the WAL replayed from the backup's start drops it anyway. Tablespaces other than the
/// default are refused.
pub fn walk(root: &Path) -> anyhow::Result<(Vec<DirEntry>, Vec<Found>)> {
    walk_with(root, WALK_THREADS)
}

/// Directories still to read, shared by the walking threads.
struct WalkQueue {
    /// (path relative to the root, absolute path)
    dirs: Vec<(PathBuf, PathBuf)>,
    /// Directories being read: the walk ends when none is left to read and none is being
    /// read (a directory being read may add more).
    reading: usize,
    failed: bool,
}

fn walk_with(root: &Path, threads: usize) -> anyhow::Result<(Vec<DirEntry>, Vec<Found>)> {
    use std::sync::{Condvar, Mutex};
    let queue = Mutex::new(WalkQueue {
        dirs: vec![(PathBuf::new(), root.to_path_buf())],
        reading: 0,
        failed: false,
    });
    let more = Condvar::new();
    let walker = || -> anyhow::Result<(Vec<DirEntry>, Vec<Found>)> {
        let (mut dirs, mut files, mut found) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let next = {
                let mut q = queue.lock().expect("walk queue");
                loop {
                    if q.failed {
                        break None;
                    }
                    if let Some(d) = q.dirs.pop() {
                        q.reading += 1;
                        break Some(d);
                    }
                    if q.reading == 0 {
                        break None;
                    }
                    q = more.wait(q).expect("walk queue");
                }
            };
            let Some((rel, abs)) = next else {
                more.notify_all();
                return Ok((dirs, files));
            };
            // A panic would leave `reading` counting this directory, and the other threads
            // waiting for it forever: it fails the walk like any error.
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                read_dir_entries(root, &rel, &abs, &mut dirs, &mut files, &mut found)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("reading {} panicked", abs.display())));
            {
                let mut q = queue.lock().expect("walk queue");
                q.reading -= 1;
                q.failed |= read.is_err();
                q.dirs.append(&mut found);
            }
            more.notify_all();
            read?;
        }
    };
    let walked: Vec<_> = std::thread::scope(|s| {
        let others: Vec<_> = (1..threads.max(1)).map(|_| s.spawn(walker)).collect();
        let mut walked = vec![walker()];
        walked.extend(others.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a walking thread panicked")))
        }));
        walked
    });
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    for w in walked {
        let (d, f) = w?;
        dirs.extend(d);
        files.extend(f);
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    drop_unlogged(&mut files);
    Ok((dirs, files))
}

/// Reads one directory of the walk (`rel` under `root`, at `abs`): its directories and files
/// into `dirs` and `files`, the directories to read next into `found`.
fn read_dir_entries(
    root: &Path,
    rel: &Path,
    abs: &Path,
    dirs: &mut Vec<DirEntry>,
    files: &mut Vec<Found>,
    found: &mut Vec<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let entries = match std::fs::read_dir(abs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", abs.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", abs.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel_path = rel.join(&name);
        let rel_str = rel_path.to_string_lossy().into_owned();
        // Relative to the directory just read (fstatat): no lookup of the whole path.
        // Like symlink_metadata, it does not follow a link.
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", entry.path().display()));
            }
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            if rel.as_os_str() == "pg_tblspc" {
                return Err(input_err!(
                    "{} holds a tablespace ({}): file-level backups cover the default tablespace only; unset pg.data_dir to back up over the network",
                    root.display(),
                    rel_str
                ));
            }
            if rel.as_os_str().is_empty() && name == "pg_wal" {
                // pg_wal elsewhere (initdb -X): restored as a plain, empty directory.
                dirs.push(DirEntry {
                    path: rel_str,
                    mode: 0o700,
                });
                continue;
            }
            return Err(input_err!(
                "{} is a symbolic link: file-level backups do not follow links inside the data directory; unset pg.data_dir to back up over the network",
                entry.path().display()
            ));
        }
        if ft.is_dir() {
            dirs.push(DirEntry {
                path: rel_str,
                mode: meta.permissions().mode() & 0o7777,
            });
            if !(rel.as_os_str().is_empty() && EMPTY_DIRS.contains(&name.as_str())) {
                found.push((rel_path, entry.path()));
            }
            continue;
        }
        if !ft.is_file() || skipped(&rel_str, &name) {
            continue;
        }
        files.push(Found {
            path: rel_str,
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        });
    }
    Ok(())
}

/// Leaves out every fork of an unlogged relation but its init fork, as PostgreSQL's own base
/// backup does: recovery removes those forks and makes the main fork anew from the init fork
/// (an unlogged table is empty after any restore), so their bytes would only be stored.
fn drop_unlogged(files: &mut Vec<Found>) {
    // `base/<db>/<relfilenode>[_<fork>][.<segment>]`
    fn split(path: &str) -> Option<(&str, &str, &str)> {
        let (dir, name) = path.rsplit_once('/')?;
        if !dir.starts_with("base/") {
            return None;
        }
        let rel_end = name
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(name.len());
        let (rel, rest) = name.split_at(rel_end);
        (!rel.is_empty()).then_some((dir, rel, rest))
    }
    let inits: std::collections::HashSet<(String, String)> = files
        .iter()
        .filter_map(|f| split(&f.path))
        .filter(|(_, _, rest)| *rest == "_init")
        .map(|(dir, rel, _)| (dir.to_string(), rel.to_string()))
        .collect();
    if inits.is_empty() {
        return;
    }
    files.retain(|f| match split(&f.path) {
        Some((dir, rel, rest)) => {
            rest.starts_with("_init") || !inits.contains(&(dir.to_string(), rel.to_string()))
        }
        None => true,
    });
}

/// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
pub fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The block map of a file on disk (for a delta restore): `None` when it cannot be read.
pub fn hash_file(path: &Path) -> Option<(u64, Vec<u64>)> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut hashes = Vec::new();
    let mut size = 0u64;
    loop {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        if got == 0 {
            break;
        }
        hashes.push(block_hash(&buf[..got]));
        size += got as u64;
        if got < buf.len() {
            break;
        }
    }
    Some((size, hashes))
}

/// The extents of `extents` (sorted, contiguous) that cover `from..to`, cut to that range.
pub fn slice_extents(extents: &[Extent], from: u64, to: u64, out: &mut Vec<Extent>) {
    let start = extents.partition_point(|e| e.at + e.len <= from);
    for e in &extents[start..] {
        if e.at >= to {
            break;
        }
        let a = e.at.max(from);
        let b = (e.at + e.len).min(to);
        push_extent(
            out,
            Extent {
                at: a,
                len: b - a,
                blob: e.blob,
                skip: e.skip + (a - e.at) as u32,
            },
        );
    }
}

/// Appends `e`, merged into the last extent when it continues it in the same blob.
pub fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut()
        && last.blob == e.blob
        && last.at + last.len == e.at
        && last.skip as u64 + last.len == e.skip as u64
    {
        last.len += e.len;
        return;
    }
    out.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_extents_cuts_and_merges() {
        let ext = vec![
            Extent {
                at: 0,
                len: 100,
                blob: 0,
                skip: 0,
            },
            Extent {
                at: 100,
                len: 50,
                blob: 1,
                skip: 10,
            },
            Extent {
                at: 150,
                len: 50,
                blob: 1,
                skip: 60,
            },
        ];
        let mut out = Vec::new();
        slice_extents(&ext, 90, 160, &mut out);
        assert_eq!(
            out,
            vec![
                Extent {
                    at: 90,
                    len: 10,
                    blob: 0,
                    skip: 90
                },
                Extent {
                    at: 100,
                    len: 60,
                    blob: 1,
                    skip: 10
                },
            ]
        );
        // Slicing block by block gives back the same extents.
        let mut out = Vec::new();
        for a in (0..200).step_by(7) {
            slice_extents(&ext, a, (a + 7).min(200), &mut out);
        }
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[1],
            Extent {
                at: 100,
                len: 100,
                blob: 1,
                skip: 10
            }
        );
    }

    /// A data directory of a few databases, with what a base backup leaves out.
    fn data_dir_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for db in 1..=9 {
            let d = root.join(format!("base/{db}"));
            std::fs::create_dir_all(&d).unwrap();
            for rel in 0..40 {
                std::fs::write(d.join(format!("{}", 16384 + rel)), vec![7u8; rel * 10]).unwrap();
            }
            std::fs::create_dir_all(d.join("pgsql_tmp")).unwrap();
            std::fs::write(d.join("pgsql_tmp/pgsql_tmp1.0"), b"tmp").unwrap();
        }
        for d in [
            "global",
            "pg_wal/archive_status",
            "pg_logical/snapshots",
            "pg_tblspc",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("global/pg_control"), [1u8; 8192]).unwrap();
        std::fs::write(root.join("pg_wal/000000010000000000000001"), b"wal").unwrap();
        std::fs::write(root.join("pg_logical/snapshots/0-1.snap"), b"s").unwrap();
        std::fs::write(root.join("postmaster.pid"), b"1").unwrap();
        std::fs::write(root.join("PG_VERSION"), b"15\n").unwrap();
        dir
    }

    #[test]
    fn walks_on_any_number_of_threads_find_the_same_tree() {
        let dir = data_dir_tree();
        let key = |(dirs, files): (Vec<DirEntry>, Vec<Found>)| {
            let dirs: Vec<(String, u32)> = dirs.into_iter().map(|d| (d.path, d.mode)).collect();
            let files: Vec<(String, u64, u32, i64)> = files
                .into_iter()
                .map(|f| (f.path, f.size, f.mode, f.mtime_ns))
                .collect();
            (dirs, files)
        };
        let (dirs, files) = key(walk_with(dir.path(), 1).unwrap());
        assert_eq!(files.len(), 9 * 40 + 3, "{files:?}");
        assert!(files.iter().any(|f| f.0 == "base/9/16423" && f.1 == 390));
        assert!(files.iter().any(|f| f.0 == "pg_logical/snapshots/0-1.snap"));
        assert!(!files.iter().any(|f| f.0.starts_with("pg_wal/")
            || f.0.contains("pgsql_tmp")
            || f.0 == "postmaster.pid"));
        assert!(dirs.iter().any(|d| d.0 == "pg_wal"));
        assert!(!dirs.iter().any(|d| d.0 == "pg_wal/archive_status"));
        for threads in [2, 3, 8] {
            assert_eq!(
                key(walk_with(dir.path(), threads).unwrap()),
                (dirs.clone(), files.clone()),
                "{threads} threads"
            );
        }
    }

    #[test]
    fn a_link_deep_in_the_tree_fails_every_walk() {
        let dir = data_dir_tree();
        std::os::unix::fs::symlink("/tmp", dir.path().join("base/7/99999")).unwrap();
        for threads in [1, 2, 8] {
            let err = walk_with(dir.path(), threads).unwrap_err();
            assert!(
                format!("{err:#}").contains("base/7/99999 is a symbolic link"),
                "{threads} threads: {err:#}"
            );
        }
    }

    #[test]
    fn unlogged_relations_keep_only_their_init_forks() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("base/5");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::create_dir_all(dir.path().join("global")).unwrap();
        // 16400 is unlogged (it has an init fork), in database 5 only; 16401 is logged.
        for name in [
            "16400",
            "16400.1",
            "16400_fsm",
            "16400_vm",
            "16400_init",
            "16401",
            "16401_fsm",
            "164000",
            "PG_VERSION",
        ] {
            std::fs::write(db.join(name), b"x").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("base/6")).unwrap();
        std::fs::write(dir.path().join("base/6/16400"), b"x").unwrap();
        std::fs::write(dir.path().join("global/16400"), b"x").unwrap();
        let (_, files) = walk(dir.path()).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "base/5/164000",
                "base/5/16400_init",
                "base/5/16401",
                "base/5/16401_fsm",
                "base/5/PG_VERSION",
                "base/6/16400",
                "global/16400",
            ]
        );
    }

    #[test]
    fn block_maps_round_trip_and_checksums_see_every_block() {
        let hashes = vec![1u64, u64::MAX, 42];
        assert_eq!(decode_blocks(&encode_blocks(&hashes)).unwrap(), hashes);
        assert_ne!(
            file_checksum(3, &hashes),
            file_checksum(3, &[1, u64::MAX, 43])
        );
        assert_ne!(file_checksum(3, &hashes), file_checksum(4, &hashes));
    }

    #[test]
    fn a_blob_round_trips_and_a_flipped_byte_is_corruption() {
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let stored = BlobWriter::new(3).unwrap().seal(&plain, None).unwrap();
        let mut r = BlobReader::new().unwrap();
        assert_eq!(r.open(&stored, plain.len(), None, "blob").unwrap(), plain);
        let mut bad = stored.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        let err = r
            .open(&bad, plain.len(), None, "blob 7 of backup X")
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("blob 7 of backup X is corrupt"),
            "{err:#}"
        );
    }

    #[test]
    fn sealed_blobs_open_in_both_formats() {
        let (ids, rs) = crate::crypto::keys::test_pair();
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = BlobWriter::new(3).unwrap();
        let stored = w.seal(&plain, Some(&rs)).unwrap();
        assert!(stored.starts_with(crate::crypto::blob::MAGIC));
        let mut r = BlobReader::new().unwrap();
        assert_eq!(
            r.open(&stored, plain.len(), Some(&ids), "b").unwrap(),
            plain
        );
        let err = r.open(&stored, plain.len(), None, "b").unwrap_err();
        assert!(format!("{err:#}").contains("is encrypted"), "{err:#}");
        // A blob an earlier version sealed as a whole age stream.
        let compressed = zstd::bulk::compress(&plain, 3).unwrap();
        let old = crate::crypto::seal::seal_bytes(&rs, &compressed).unwrap();
        assert_eq!(r.open(&old, plain.len(), Some(&ids), "o").unwrap(), plain);
    }

    /// The index is encoded before `pg_backup_stop` returns its label: adding the label (and
    /// a tablespace map) after gives the same bytes as encoding the whole index, which a
    /// restore reads back to the same label.
    #[test]
    fn a_label_added_to_an_encoded_index_is_the_whole_index() {
        let mut idx = FileIndex {
            format: INDEX_FORMAT,
            block_size: BLOCK,
            bundles: vec![],
            blobs: vec![],
            dirs: vec![],
            files: vec![FileEntry {
                path: "global/pg_control".into(),
                size: 0,
                mode: 0o600,
                mtime_ns: 1,
                checksum: "c".into(),
                blocks: String::new(),
                extents: vec![],
            }],
            backup_label: String::new(),
            tablespace_map: None,
        };
        let rest = serde_json::to_vec(&idx).unwrap();
        let label =
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nLABEL: \"x\" \\ é\n";
        for map in [None, Some(""), Some("16385 /srv/ts\n")] {
            let mut spliced = before_label(rest.clone()).unwrap();
            spliced.extend_from_slice(&label_tail(label, map).unwrap());
            idx.backup_label = label.into();
            idx.tablespace_map = map.filter(|m| !m.is_empty()).map(str::to_string);
            assert_eq!(
                String::from_utf8(spliced.clone()).unwrap(),
                String::from_utf8(serde_json::to_vec(&idx).unwrap()).unwrap()
            );
            let back: FileIndex = serde_json::from_slice(&spliced).unwrap();
            assert_eq!(back, idx);
        }
        // An index encoded with its label already is refused, not given a second one.
        assert!(before_label(serde_json::to_vec(&idx).unwrap()).is_err());
    }

    #[test]
    fn an_index_whose_extents_leave_a_hole_is_refused() {
        let mut idx = FileIndex {
            format: INDEX_FORMAT,
            block_size: BLOCK,
            bundles: vec![BundleLoc {
                backup: "b".into(),
                key: "k".into(),
                stored_bytes: 10,
            }],
            blobs: vec![Blob {
                bundle: 0,
                offset: 0,
                stored: 10,
                plain: 100,
            }],
            dirs: vec![],
            files: vec![FileEntry {
                path: "base/1/2".into(),
                size: 100,
                mode: 0o600,
                mtime_ns: 0,
                checksum: String::new(),
                blocks: String::new(),
                extents: vec![Extent {
                    at: 0,
                    len: 100,
                    blob: 0,
                    skip: 0,
                }],
            }],
            backup_label: String::new(),
            tablespace_map: None,
        };
        idx.check().unwrap();
        idx.files[0].extents[0].len = 90;
        assert!(idx.check().is_err());
        idx.files[0].extents[0].len = 100;
        idx.files[0].path = "../etc/passwd".into();
        assert!(idx.check().is_err());
    }
}
