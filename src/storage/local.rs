//! A repository in a local directory (or a mounted volume). Writes go to a hidden temp file,
//! are fsynced, renamed into place and the directory fsynced, so a crash never leaves a
//! partial object under its real name. Create-only writes publish with
//! `renameat2(RENAME_NOREPLACE)`, or `link(2)` where the file system lacks it; a killed
//! writer leaves only a temp file, which `prune` removes once it is old.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{AlreadyExists, ByteStream, Leftover, NotFound, ObjectInfo, Store, Upload};

const TMP_MARK: &str = ".dbagent-tmp-";
/// What one read of an object hands on. A download holds up to about ten of them in its
/// channels (here, and in `pipeline::download`): 1 MiB chunks held 9 MiB of a restore's
/// peak, 256 KiB ones about 2 MiB, and the restore took as long (1.05 GB, peak RSS 40 -> 32
/// MiB).
const READ_CHUNK: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> Self {
        LocalStore { root }
    }

    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        if key.split('/').any(|c| c == ".." || c == ".") || key.starts_with('/') {
            anyhow::bail!("invalid object key {key:?}");
        }
        Ok(self.root.join(key))
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unique = format!("{}{}-{}-{}", TMP_MARK, name, std::process::id(), nanos());
    path.with_file_name(unique)
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes `tmp` visible as `path`, durably.
fn publish(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    fsync_dir(path.parent().expect("object path has a parent"))
}

/// How an object is made visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Overwrite,
    Create,
}

/// Makes `tmp` visible as `path` only if `path` does not exist, durably. The temp file is gone
/// afterwards whatever happens. `Ok(false)`: the name was taken and nothing changed.
fn publish_new(tmp: &Path, path: &Path) -> std::io::Result<bool> {
    let unsupported = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
        )
    };
    let res = match rename_noreplace(tmp, path) {
        // The file system has no RENAME_NOREPLACE: link(2) fails on an existing name too.
        Err(e) if unsupported(&e) => match std::fs::hard_link(tmp, path) {
            // Nor hard links: look, then rename (not atomic against a concurrent writer).
            Err(e) if unsupported(&e) => match path.try_exists() {
                Ok(true) => Err(std::io::ErrorKind::AlreadyExists.into()),
                Ok(false) => std::fs::rename(tmp, path),
                Err(e) => Err(e),
            },
            other => other,
        },
        other => other,
    };
    let _ = std::fs::remove_file(tmp);
    match res {
        Ok(()) => {
            fsync_dir(path.parent().expect("object path has a parent"))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call. The raw syscall
    // avoids depending on the C library's wrapper (glibc 2.28+, recent musl).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Finishes a write into `tmp`: fsync, then publish as `path` in `mode`.
fn finish(
    file: std::fs::File,
    tmp: &Path,
    path: &Path,
    key: &str,
    mode: Mode,
) -> anyhow::Result<()> {
    let res = file.sync_all().and_then(|_| match mode {
        Mode::Overwrite => publish(tmp, path).map(|_| true),
        Mode::Create => publish_new(tmp, path),
    });
    if res.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    match res.with_context(|| format!("writing {}", path.display()))? {
        true => Ok(()),
        false => Err(anyhow::Error::new(AlreadyExists(key.to_string()))),
    }
}

fn create_tmp(path: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let parent = path.parent().expect("object path has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tmp_path(path);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok((tmp, file))
}

fn not_found_or(err: std::io::Error, key: &str) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::NotFound {
        anyhow::Error::new(NotFound(key.to_string()))
    } else {
        anyhow::Error::new(err).context(format!("reading {key}"))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("storage task panicked")?
}

impl LocalStore {
    async fn put_mode(&self, key: &str, data: Bytes, mode: Mode) -> anyhow::Result<()> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            let (tmp, mut file) = create_tmp(&path)?;
            if let Err(e) = file.write_all(&data) {
                let _ = std::fs::remove_file(&tmp);
                return Err(anyhow::Error::new(e).context(format!("writing {}", path.display())));
            }
            finish(file, &tmp, &path, &key, mode)
        })
        .await
    }

    async fn upload_mode(&self, key: &str, mode: Mode) -> anyhow::Result<Box<dyn Upload>> {
        let path = self.path(key)?;
        let (tmp, file, path) = blocking(move || {
            let (tmp, file) = create_tmp(&path)?;
            Ok((tmp, file, path))
        })
        .await?;
        Ok(Box::new(LocalUpload {
            tmp,
            path,
            key: key.to_string(),
            mode,
            file: Some(file),
        }))
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.put_mode(key, data, Mode::Overwrite).await
    }

    async fn put_new(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.put_mode(key, data, Mode::Create).await
    }

    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.upload_mode(key, Mode::Overwrite).await
    }

    async fn start_upload_new(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.upload_mode(key, Mode::Create).await
    }

    async fn get(&self, key: &str) -> anyhow::Result<ByteStream> {
        let path = self.path(key)?;
        let key = key.to_string();
        let file = std::fs::File::open(&path).map_err(|e| not_found_or(e, &key))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<anyhow::Result<Bytes>>(2);
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            // Buffers no bigger than what is left to read (and one byte, to see the end):
            // most objects read whole (manifests, indexes, summaries) are a few KiB, and a
            // zeroed 256 KiB chunk for each cost more than reading them.
            let mut left = file.metadata().map_or(READ_CHUNK as u64, |m| m.len());
            loop {
                let want = usize::try_from(left)
                    .map_or(READ_CHUNK, |l| l.saturating_add(1).min(READ_CHUNK));
                let mut buf = vec![0u8; want];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // A file longer than it was (objects are renamed into place
                        // whole, so never): whole chunks again.
                        left = left.checked_sub(n as u64).unwrap_or(READ_CHUNK as u64);
                        buf.truncate(n);
                        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(
                            anyhow::Error::new(e).context(format!("reading {key}"))
                        ));
                        break;
                    }
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        let path = self.path(key)?;
        let key = key.to_string();
        blocking(move || {
            let mut file = std::fs::File::open(&path).map_err(|e| not_found_or(e, &key))?;
            file.seek(SeekFrom::Start(range.start))?;
            let mut buf = Vec::with_capacity((range.end - range.start) as usize);
            file.take(range.end - range.start).read_to_end(&mut buf)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>> {
        let path = self.path(key)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(info(key.to_string(), &meta))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("stat {}", path.display()))),
        }
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            if !root.is_dir() {
                anyhow::bail!(crate::error::Failure::Input(format!(
                    "repository directory {} does not exist: create it, or fix --repo",
                    root.display()
                )));
            }
            // Walk only the folder part of the prefix.
            let folder = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            let mut out = Vec::new();
            walk(&root, &root.join(folder), &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("deleting {}", path.display()))),
        }
    }

    async fn leftovers(&self) -> anyhow::Result<Vec<Leftover>> {
        let root = self.root.clone();
        blocking(move || {
            let mut out = Vec::new();
            walk_tmp(&root, &root, &mut out)?;
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
        .await
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> anyhow::Result<()> {
        let path = self.path(&leftover.id)?;
        let is_tmp = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(TMP_MARK));
        if !is_tmp {
            anyhow::bail!("{} is not a temp file of this repository", leftover.id);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("deleting {}", path.display()))),
        }
    }
}

/// Temp files (`.dbagent-tmp-<name>-<pid>-<nanos>`) under `dir`.
fn walk_tmp(root: &Path, dir: &Path, out: &mut Vec<Leftover>) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("listing {}", dir.display()))),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if meta.is_dir() {
            walk_tmp(root, &path, out)?;
            continue;
        }
        let Some(rest) = name.strip_prefix(TMP_MARK) else {
            continue;
        };
        let rel = |p: &Path| {
            p.strip_prefix(root)
                .expect("walk stays under root")
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/")
        };
        // The object's own name is what precedes "-<pid>-<nanos>".
        let object = rest.rsplitn(3, '-').nth(2).unwrap_or(rest);
        out.push(Leftover {
            key: rel(&path.with_file_name(object)),
            id: rel(&path),
            started: meta.modified().map(DateTime::from).unwrap_or_default(),
            size: Some(meta.len()),
        });
    }
    Ok(())
}

fn info(key: String, meta: &std::fs::Metadata) -> ObjectInfo {
    let modified: DateTime<Utc> = meta.modified().map(DateTime::from).unwrap_or_default();
    ObjectInfo {
        key,
        size: meta.len(),
        last_modified: modified,
    }
}

fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectInfo>) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("listing {}", dir.display()))),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TMP_MARK) {
            continue;
        }
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            walk(root, &path, prefix, out)?;
        } else if meta.is_file() {
            let key = path
                .strip_prefix(root)
                .expect("walk stays under root")
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            if key.starts_with(prefix) {
                out.push(info(key, &meta));
            }
        }
    }
    Ok(())
}

struct LocalUpload {
    tmp: PathBuf,
    path: PathBuf,
    key: String,
    mode: Mode,
    file: Option<std::fs::File>,
}

#[async_trait]
impl Upload for LocalUpload {
    async fn put_part(&mut self, data: Bytes) -> anyhow::Result<()> {
        let mut file = self.file.take().context("upload already finished")?;
        let tmp = self.tmp.clone();
        let file = blocking(move || {
            file.write_all(&data)
                .with_context(|| format!("writing {}", tmp.display()))?;
            Ok(file)
        })
        .await?;
        self.file = Some(file);
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> anyhow::Result<()> {
        let file = self.file.take().context("upload already finished")?;
        let (tmp, path, key, mode) = (
            self.tmp.clone(),
            self.path.clone(),
            self.key.clone(),
            self.mode,
        );
        blocking(move || finish(file, &tmp, &path, &key, mode)).await
    }

    async fn abort(mut self: Box<Self>) {
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        // The temp name is unique: once published it no longer exists, so this only ever
        // removes an unfinished upload's bytes.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
