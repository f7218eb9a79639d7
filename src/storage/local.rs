//! A repository in a local directory (or a mounted volume). Writes go to a hidden temp file,
//! are fsynced, renamed into place and the directory fsynced, so a crash never leaves a
//! partial object under its real name.

use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{ByteStream, NotFound, ObjectInfo, Store, Upload};

const TMP_MARK: &str = ".dbagent-tmp-";
const READ_CHUNK: usize = 1 << 20;

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

#[async_trait]
impl Store for LocalStore {
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        let path = self.path(key)?;
        blocking(move || {
            let (tmp, mut file) = create_tmp(&path)?;
            let res = file
                .write_all(&data)
                .and_then(|_| file.sync_all())
                .and_then(|_| publish(&tmp, &path));
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res.with_context(|| format!("writing {}", path.display()))
        })
        .await
    }

    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        let path = self.path(key)?;
        let (tmp, file) = blocking(move || create_tmp(&path).map(|r| (r, path)))
            .await
            .map(|((tmp, file), path)| ((tmp, path), file))?;
        Ok(Box::new(LocalUpload {
            tmp: tmp.0,
            path: tmp.1,
            file: Some(file),
        }))
    }

    async fn get(&self, key: &str) -> anyhow::Result<ByteStream> {
        let path = self.path(key)?;
        let key = key.to_string();
        let file = std::fs::File::open(&path).map_err(|e| not_found_or(e, &key))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<anyhow::Result<Bytes>>(2);
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            loop {
                let mut buf = vec![0u8; READ_CHUNK];
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
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
        let (tmp, path) = (self.tmp.clone(), self.path.clone());
        blocking(move || {
            let res = file.sync_all().and_then(|_| publish(&tmp, &path));
            if res.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            res.with_context(|| format!("writing {}", path.display()))
        })
        .await
    }

    async fn abort(mut self: Box<Self>) {
        self.file.take();
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
