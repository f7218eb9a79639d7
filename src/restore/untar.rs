//! Unpacks a base backup's tar stream into an empty data directory, fast and without ever
//! writing outside it.
//!
//! The `tar` crate copies file bodies through an 8 KiB buffer and checks every path component
//! for symlinks, which made restores slower than pgBackRest: this unpacker writes with large
//! buffers and, because the target directory starts empty and holds only what it unpacks,
//! checks paths against what it has made itself:
//!
//! - absolute paths and `..` are refused;
//! - only `pg_tblspc/<oid>` may be a symlink (a tablespace), and no entry is written at or
//!   below a symlink, so nothing lands where a link points; files are opened with
//!   `O_NOFOLLOW` as a second line;
//! - set-user-id, set-group-id and sticky bits are dropped;
//! - `global/pg_control` is written as `global/pg_control.dbagent-unverified` and a marker
//!   file says the directory is not a usable cluster; `release` puts pg_control in place
//!   and removes the marker only once the caller has verified the whole stream's checksum.
//!   Until then PostgreSQL refuses to start there, also after a killed restore.
//!
//! Regular files, directories, symlinks, hard links, GNU long names and PAX `path` records
//! are handled.

use std::collections::HashSet;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

const BLOCK: usize = 512;
/// Where PostgreSQL's control file goes, and where it waits until the backup is verified.
pub(crate) const CONTROL_FILE: &str = "global/pg_control";
pub(crate) const CONTROL_UNVERIFIED: &str = "global/pg_control.dbagent-unverified";
/// Present while a data directory is being restored or after a restore failed.
pub const MARKER: &str = "DBAGENT_RESTORE_INCOMPLETE";
pub(crate) const MARKER_TEXT: &str = "dbagent is restoring into this directory, or the restore failed: it is not a usable PostgreSQL cluster (global/pg_control is held back until the backup's checksum is verified)\n";
const COPY_BUF: usize = 1 << 20;

fn octal(field: &[u8]) -> anyhow::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256 (sizes over 8 GiB).
        return Ok(field[1..]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64));
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).context("bad number in a tar header")?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).with_context(|| format!("bad number {text:?} in a tar header"))
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// `dir` joined with a member name, refusing anything that would land outside `dir`.
fn safe_join(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let mut out = dir.to_path_buf();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("the backup holds an unsafe path {name:?}"),
        }
    }
    Ok(out)
}

struct Unpacker {
    dir: PathBuf,
    made: HashSet<PathBuf>,
    /// Symlinks this unpacker created: nothing may be written at or below them.
    links: Vec<PathBuf>,
    bytes: u64,
}

impl Unpacker {
    /// Refuses a path at or below a symlink made earlier.
    fn not_through_link(&self, path: &Path, name: &str) -> anyhow::Result<()> {
        if let Some(link) = self.links.iter().find(|l| path.starts_with(l)) {
            bail!(
                "the backup writes {name:?} through the symlink {}: refused",
                link.strip_prefix(&self.dir).unwrap_or(link).display()
            );
        }
        Ok(())
    }

    /// Where an entry goes: inside the directory, never through a symlink, and pg_control
    /// under its waiting name.
    fn target(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = safe_join(&self.dir, name)?;
        self.not_through_link(&path, name)?;
        if path == self.dir.join(CONTROL_FILE) {
            return Ok(self.dir.join(CONTROL_UNVERIFIED));
        }
        Ok(path)
    }

    fn parent(&mut self, path: &Path) -> anyhow::Result<()> {
        if let Some(parent) = path.parent() {
            if !self.made.contains(parent) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                self.made.insert(parent.to_path_buf());
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        r: &mut impl BufRead,
        path: &Path,
        size: u64,
        mode: u32,
    ) -> anyhow::Result<()> {
        self.parent(path)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut left = size;
        // Straight from the reader's buffer to the file: no copy in between.
        while left > 0 {
            let avail = r.fill_buf()?;
            if avail.is_empty() {
                bail!("the backup stream ended inside a file");
            }
            let take = (avail.len() as u64).min(left) as usize;
            f.write_all(&avail[..take])
                .with_context(|| format!("writing {}", path.display()))?;
            r.consume(take);
            left -= take as u64;
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        self.bytes += size;
        Ok(())
    }
}

/// The writing end of a chunk channel: what the decompressor writes arrives at the unpacker in
/// 1 MiB chunks, handed over without going through the kernel.
pub struct ChunkWriter {
    buf: Vec<u8>,
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
}

/// The reading end: a `BufRead` over the chunks, so file bodies are written straight from them.
pub struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

pub fn chunk_channel() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    (
        ChunkWriter {
            buf: Vec::with_capacity(COPY_BUF),
            tx,
        },
        ChunkReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        },
    )
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_BUF));
        self.tx.send(full).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the unpacker stopped")
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = (COPY_BUF - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == COPY_BUF {
            self.send()?;
        }
        Ok(n)
    }

    /// Hands over what is buffered (the end of the stream).
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            self.send()
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

fn skip(r: &mut impl BufRead, mut n: u64) -> anyhow::Result<()> {
    while n > 0 {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            bail!("the backup stream ended early");
        }
        let take = (avail.len() as u64).min(n) as usize;
        r.consume(take);
        n -= take as u64;
    }
    Ok(())
}

fn read_body(r: &mut impl Read, size: u64) -> anyhow::Result<Vec<u8>> {
    let mut v = vec![0u8; size as usize];
    r.read_exact(&mut v)
        .context("the backup stream ended early")?;
    Ok(v)
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Makes everything under `dir` durable: every regular file, then each directory (after what
/// it holds). The tar path writes files as the stream brings them, without a sync each; this
/// runs before `release`, so a restore that exits 0 (`--no-start` included, where no server
/// start syncs the directory) has its data on disk before the marker goes. Symbolic links
/// (a tablespace's) are not followed.
pub fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    sync_dir(dir)
}

/// Syncs a directory. Some filesystems refuse to (EINVAL, EBADF): as PostgreSQL's own
/// `fsync_fname`, that is no error.
pub(super) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EBADF)) => Ok(()),
        r => r.with_context(|| format!("syncing {}", dir.display())),
    }
}

/// Puts pg_control in place and removes the marker: call only once the backup's checksum
/// has been verified.
pub fn release(dir: &Path) -> anyhow::Result<()> {
    let waiting = dir.join(CONTROL_UNVERIFIED);
    if !waiting.exists() {
        bail!("the base backup holds no {CONTROL_FILE}: it is not a PostgreSQL data directory");
    }
    std::fs::rename(&waiting, dir.join(CONTROL_FILE))
        .with_context(|| format!("putting {CONTROL_FILE} in place in {}", dir.display()))?;
    std::fs::remove_file(dir.join(MARKER))
        .with_context(|| format!("removing {MARKER} from {}", dir.display()))?;
    // The rename and the marker's removal: the files are durable already (see `sync_tree`
    // and the file-level restore's own syncs).
    sync_dir(&dir.join("global"))?;
    sync_dir(dir)
}

/// Only `pg_tblspc/<oid>` may be a symlink: a tablespace's location.
fn symlink_allowed(name: &str) -> bool {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    matches!(parts.as_slice(), ["pg_tblspc", oid] if oid.bytes().all(|b| b.is_ascii_digit()))
}

/// Unpacks the whole stream into `dir`; returns the bytes of file data written. The result
/// is not a startable cluster until `release` (see the module's notes).
pub fn unpack(mut r: impl BufRead, dir: &Path) -> anyhow::Result<u64> {
    std::fs::write(dir.join(MARKER), MARKER_TEXT)
        .with_context(|| format!("writing {MARKER} into {}", dir.display()))?;
    let mut u = Unpacker {
        dir: dir.to_path_buf(),
        made: HashSet::from([dir.to_path_buf()]),
        links: Vec::new(),
        bytes: 0,
    };
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    let mut header = [0u8; BLOCK];
    loop {
        match r.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                bail!("the backup stream ended without the tar end marker")
            }
            Err(e) => return Err(e.into()),
        }
        if header.iter().all(|&b| b == 0) {
            // End of archive: drain the rest (the second zero block, padding) for the writer.
            std::io::copy(&mut r, &mut std::io::sink())?;
            return Ok(u.bytes);
        }
        let size = octal(&header[124..136])?;
        let typeflag = header[156];
        // No set-user-id, set-group-id or sticky bit from a backup.
        let mode = (octal(&header[100..108])? & 0o777) as u32;
        let name = match long_name.take() {
            Some(n) => n,
            None => {
                let base = String::from_utf8_lossy(cstr(&header[0..100])).into_owned();
                let prefix = if &header[257..262] == b"ustar" {
                    String::from_utf8_lossy(cstr(&header[345..500])).into_owned()
                } else {
                    String::new()
                };
                if prefix.is_empty() {
                    base
                } else {
                    format!("{prefix}/{base}")
                }
            }
        };
        let link = long_link
            .take()
            .unwrap_or_else(|| String::from_utf8_lossy(cstr(&header[157..257])).into_owned());
        match typeflag {
            b'L' | b'K' => {
                let body = read_body(&mut r, size)?;
                let text = String::from_utf8_lossy(cstr(&body)).into_owned();
                if typeflag == b'L' {
                    long_name = Some(text);
                } else {
                    long_link = Some(text);
                }
                skip(&mut r, padding(size))?;
            }
            b'x' => {
                let body = read_body(&mut r, size)?;
                for record in String::from_utf8_lossy(&body).lines() {
                    // "<len> key=value"
                    if let Some((_, kv)) = record.split_once(' ') {
                        if let Some(v) = kv.strip_prefix("path=") {
                            long_name = Some(v.to_string());
                        } else if let Some(v) = kv.strip_prefix("linkpath=") {
                            long_link = Some(v.to_string());
                        }
                    }
                }
                skip(&mut r, padding(size))?;
            }
            b'0' | 0 | b'7' => {
                let path = u.target(&name)?;
                u.file(&mut r, &path, size, mode)?;
                skip(&mut r, padding(size))?;
            }
            b'5' => {
                let path = u.target(&name)?;
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                u.made.insert(path);
                skip(&mut r, size + padding(size))?;
            }
            b'2' => {
                if !symlink_allowed(&name) {
                    bail!(
                        "the backup holds a symlink {name:?} -> {link:?}: only pg_tblspc/<oid> may be a symlink; refused"
                    );
                }
                let path = u.target(&name)?;
                u.parent(&path)?;
                if std::fs::symlink_metadata(&path).is_ok() {
                    bail!("the backup holds {name:?} twice, the second time as a symlink: refused");
                }
                std::os::unix::fs::symlink(&link, &path)
                    .with_context(|| format!("creating symlink {}", path.display()))?;
                u.links.push(path);
                skip(&mut r, size + padding(size))?;
            }
            b'1' => {
                let path = u.target(&name)?;
                let target = u.target(&link)?;
                u.parent(&path)?;
                std::fs::hard_link(&target, &path)
                    .with_context(|| format!("linking {}", path.display()))?;
                skip(&mut r, size + padding(size))?;
            }
            // Global PAX headers, devices, FIFOs: nothing a data directory needs.
            _ => skip(&mut r, size + padding(size))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o700);
        dir.set_size(0);
        b.append_data(&mut dir, "base/", std::io::empty()).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        for (name, data, mode) in [
            ("base/1/16384", big.clone(), 0o600),
            ("global/pg_control", vec![9u8; 8192], 0o600),
            ("PG_VERSION", b"15\n".to_vec(), 0o644),
            ("empty", vec![], 0o600),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        // A name longer than 100 bytes (GNU long name).
        let long = format!("pg_wal/{}", "x".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o600);
        b.append_data(&mut h, &long, &b"hello"[..]).unwrap();
        let mut s = tar::Header::new_gnu();
        s.set_entry_type(tar::EntryType::Symlink);
        s.set_size(0);
        b.append_link(&mut s, "pg_tblspc/16400", "/srv/tablespace")
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn unpacks_what_tar_packs() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = unpack(std::io::Cursor::new(archive()), dir.path()).unwrap();
        assert_eq!(bytes, 3_000_000 + 8192 + 3 + 5);
        // Not a cluster until the caller has verified the stream.
        assert!(!dir.path().join("global/pg_control").exists());
        assert!(dir.path().join(MARKER).exists());
        release(dir.path()).unwrap();
        assert!(!dir.path().join(MARKER).exists());
        let big = std::fs::read(dir.path().join("base/1/16384")).unwrap();
        assert_eq!(big.len(), 3_000_000);
        assert!(
            big.iter()
                .enumerate()
                .all(|(i, b)| *b == (i as u32 % 251) as u8)
        );
        assert_eq!(
            std::fs::read(dir.path().join("PG_VERSION")).unwrap(),
            b"15\n"
        );
        let mode = std::fs::metadata(dir.path().join("global/pg_control"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read(dir.path().join(format!("pg_wal/{}", "x".repeat(150)))).unwrap(),
            b"hello"
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("pg_tblspc/16400")).unwrap(),
            PathBuf::from("/srv/tablespace")
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("empty")).unwrap().len(),
            0
        );
    }

    #[test]
    fn unpacks_through_the_chunk_channel() {
        let raw = archive();
        let (mut w, r) = chunk_channel();
        let feeder = std::thread::spawn(move || {
            // Odd-sized writes cross chunk boundaries.
            for piece in raw.chunks(7919) {
                w.write_all(piece).unwrap();
            }
            w.flush().unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let bytes = unpack(r, dir.path()).unwrap();
        feeder.join().unwrap();
        assert_eq!(bytes, 3_000_000 + 8192 + 3 + 5);
        assert_eq!(
            std::fs::read(dir.path().join("base/1/16384"))
                .unwrap()
                .len(),
            3_000_000
        );
    }

    #[test]
    fn refuses_unsafe_paths_and_truncated_streams() {
        let mut raw = archive();
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(std::io::Cursor::new(&raw[..raw.len() / 2]), dir.path()).is_err());
        // Rewrite the first member's name to climb out of the directory.
        raw[..100].fill(0);
        raw[..9].copy_from_slice(b"../evil/x");
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(std::io::Cursor::new(raw), dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsafe path"), "{err}");
    }

    /// A tar built by hand: (name, type, link target, body).
    fn crafted(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, body) in entries {
            let mut h = [0u8; BLOCK];
            h[..name.len()].copy_from_slice(name.as_bytes());
            h[100..107].copy_from_slice(b"0006755");
            h[124..135].copy_from_slice(format!("{:011o}", body.len()).as_bytes());
            h[156] = *kind;
            h[157..157 + link.len()].copy_from_slice(link.as_bytes());
            h[257..263].copy_from_slice(b"ustar\0");
            h[148..156].fill(b' ');
            let sum: u32 = h.iter().map(|&b| b as u32).sum();
            h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(body);
            out.resize(out.len() + padding(body.len() as u64) as usize, 0);
        }
        out.resize(out.len() + 2 * BLOCK, 0);
        out
    }

    fn unpack_crafted(entries: &[(&str, u8, &str, &[u8])]) -> (tempfile::TempDir, String) {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<(String, u8, String, Vec<u8>)> = entries
            .iter()
            .map(|(n, k, l, b)| {
                let l = l.replace("OUTSIDE", &outside.path().to_string_lossy());
                (n.to_string(), *k, l, b.to_vec())
            })
            .collect();
        let refs: Vec<(&str, u8, &str, &[u8])> = entries
            .iter()
            .map(|(n, k, l, b)| (n.as_str(), *k, l.as_str(), b.as_slice()))
            .collect();
        let err = unpack(std::io::Cursor::new(crafted(&refs)), dir.path())
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string());
        // Whatever happened, nothing landed outside.
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "{err}"
        );
        (dir, err)
    }

    #[test]
    fn never_writes_outside_the_directory() {
        // A symlink anywhere but pg_tblspc/<oid>.
        let (_, err) = unpack_crafted(&[("pg_wal", b'2', "OUTSIDE", b"")]);
        assert!(
            err.contains("only pg_tblspc/<oid> may be a symlink"),
            "{err}"
        );
        // A file written through a tablespace link.
        let (_, err) = unpack_crafted(&[
            ("pg_tblspc/16400", b'2', "OUTSIDE", b""),
            ("pg_tblspc/16400/PG_15/x", b'0', "", b"evil"),
        ]);
        assert!(err.contains("through the symlink"), "{err}");
        // A directory at a link, then a file in it.
        let (_, err) = unpack_crafted(&[
            ("pg_tblspc/1", b'2', "OUTSIDE", b""),
            ("pg_tblspc/1/", b'5', "", b""),
        ]);
        assert!(err.contains("through the symlink"), "{err}");
        // A file over the link itself.
        let (_, err) = unpack_crafted(&[
            ("pg_tblspc/1", b'2', "OUTSIDE/f", b""),
            ("pg_tblspc/1", b'0', "", b"evil"),
        ]);
        assert!(err.contains("through the symlink"), "{err}");
        // A hard link to something behind a link.
        let (_, err) = unpack_crafted(&[
            ("pg_tblspc/1", b'2', "OUTSIDE", b""),
            ("x", b'1', "pg_tblspc/1/secret", b""),
        ]);
        assert!(err.contains("through the symlink"), "{err}");
        // Absolute and climbing paths, as names and as hard link targets.
        for (name, kind, link) in [
            ("/etc/evil", b'0', ""),
            ("base/../../evil", b'0', ""),
            ("x", b'1', "../evil"),
            ("x", b'1', "/etc/passwd"),
        ] {
            let (_, err) = unpack_crafted(&[(name, kind, link, b"evil")]);
            assert!(err.contains("unsafe path"), "{name} {link}: {err}");
        }
        // The allowed case: a tablespace link, left pointing where the backup says.
        let (dir, err) = unpack_crafted(&[
            ("global/pg_control", b'0', "", b"ctl"),
            ("pg_tblspc/16400", b'2', "/srv/tablespace", b""),
        ]);
        assert_eq!(err, "");
        assert_eq!(
            std::fs::read_link(dir.path().join("pg_tblspc/16400")).unwrap(),
            PathBuf::from("/srv/tablespace")
        );
    }

    #[test]
    fn special_mode_bits_are_dropped() {
        let (dir, err) = unpack_crafted(&[("bin", b'0', "", b"#!/bin/sh\n")]);
        assert_eq!(err, "");
        let mode = std::fs::metadata(dir.path().join("bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn an_unverified_backup_is_not_a_cluster() {
        let (dir, err) = unpack_crafted(&[
            ("PG_VERSION", b'0', "", b"15\n"),
            ("global/pg_control", b'0', "", b"ctl"),
        ]);
        assert_eq!(err, "");
        // What a restore killed before its checksum check, or one whose check failed, leaves.
        assert!(!dir.path().join("global/pg_control").exists());
        let marker = std::fs::read_to_string(dir.path().join(MARKER)).unwrap();
        assert!(marker.contains("not a usable PostgreSQL cluster"));
        release(dir.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("global/pg_control")).unwrap(),
            b"ctl"
        );
        // A "backup" without pg_control is never released.
        let (dir, _) = unpack_crafted(&[("PG_VERSION", b'0', "", b"15\n")]);
        assert!(release(dir.path()).is_err());
    }
}
