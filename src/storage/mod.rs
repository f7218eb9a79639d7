//! The object store: one small trait, implemented for S3-compatible services and for a
//! local directory. Keys are `/`-separated and relative to the repository root.
//!
//! Objects are immutable. WAL, manifests and anything else that must never replace what is
//! stored go through the create-only writes (`put_new`, `start_upload_new`): S3 conditional
//! requests (`If-None-Match: *`), locally `renameat2(RENAME_NOREPLACE)` or `link(2)`.

mod keyed;
pub use keyed::Keyed;
mod local;
mod s3;
mod s3api;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;

pub use local::LocalStore;
pub use s3::S3Store;

use crate::config::Config;
use crate::input_err;

/// What a listing or `head` says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub last_modified: DateTime<Utc>,
}

/// The object asked for does not exist. Callers branch on it (`wal-fetch` exits 1 quietly).
#[derive(Debug, thiserror::Error)]
#[error("object {0} not found")]
pub struct NotFound(pub String);

pub fn is_not_found(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<NotFound>())
}

/// A create-only write found the name taken. Callers compare what is stored with what they
/// meant to write: the same content is success, different content a loud failure.
#[derive(Debug, thiserror::Error)]
#[error("object {0} already exists")]
pub struct AlreadyExists(pub String);

pub fn is_already_exists(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<AlreadyExists>())
}

/// True for failures worth another attempt: server errors, throttling, dropped or stalled
/// connections. Not for "not found", a taken name, refused credentials, a missing bucket,
/// corruption, or any other answer the server would give again.
pub fn is_transient(err: &anyhow::Error) -> bool {
    use object_store::Error as E;
    for cause in err.chain() {
        if cause.is::<NotFound>() || cause.is::<AlreadyExists>() {
            return false;
        }
        if cause.downcast_ref::<crate::error::Failure>().is_some() {
            return false;
        }
        if let Some(e) = cause.downcast_ref::<E>() {
            match e {
                E::Generic { .. } | E::JoinError { .. } => {}
                _ => return false,
            }
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                e.kind(),
                K::PermissionDenied | K::StorageFull | K::ReadOnlyFilesystem | K::InvalidInput
            ) {
                return false;
            }
        }
    }
    // object_store keeps the HTTP status in its message: a 4xx answer other than 408 and 429
    // says the request itself is wrong.
    let text = format!("{err:#}");
    match text.find("status code: 4") {
        Some(i) => matches!(text.get(i + 13..i + 16), Some("408" | "429")),
        None => true,
    }
}

/// What a killed upload leaves behind: it costs storage and is invisible to listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The object the upload was writing (a temp file's eventual key, or the multipart key).
    pub key: String,
    /// The store's handle on it: a temp file's path inside the repository, or an upload id.
    pub id: String,
    pub started: DateTime<Utc>,
    /// Bytes it holds, where the store says.
    pub size: Option<u64>,
}

pub type ByteStream = BoxStream<'static, anyhow::Result<Bytes>>;

/// A multipart upload in progress. Parts are sent in order; all but the last must be at
/// least `config::MIN_PART_SIZE` bytes. Nothing is visible under the key until `complete`.
#[async_trait]
pub trait Upload: Send {
    /// Sends a part, or starts sending it, and returns once the next one could be sent
    /// too: a caller never holds a part waiting for room (memory, see `pipeline`).
    async fn put_part(&mut self, data: Bytes) -> anyhow::Result<()>;
    async fn complete(self: Box<Self>) -> anyhow::Result<()>;
    async fn abort(self: Box<Self>);
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Writes a whole object atomically: readers see all of it or nothing.
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()>;
    /// `put`, but only if nothing is stored under `key`; `AlreadyExists` otherwise, and the
    /// stored object is left alone. Atomic where the store can do it (see the README).
    async fn put_new(&self, key: &str, data: Bytes) -> anyhow::Result<()>;
    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>>;
    /// A multipart upload whose completion is create-only, like `put_new`.
    async fn start_upload_new(&self, key: &str) -> anyhow::Result<Box<dyn Upload>>;
    async fn get(&self, key: &str) -> anyhow::Result<ByteStream>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes>;
    async fn head(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>>;
    /// Every object whose key starts with `prefix` (a folder: end it with `/`).
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>>;
    async fn delete(&self, key: &str) -> anyhow::Result<()>;
    /// Unfinished uploads (temp files, multipart uploads) anywhere in the repository.
    async fn leftovers(&self) -> anyhow::Result<Vec<Leftover>>;
    /// Removes one leftover (gone already is fine).
    async fn remove_leftover(&self, leftover: &Leftover) -> anyhow::Result<()>;
    /// The command's encryption keys for this repository (`storage::open` attaches them).
    /// A store without one still refuses plaintext writes into an encrypted repository (see
    /// `pipeline::recipients`).
    fn keyring(&self) -> Option<&crate::crypto::keyring::Keyring> {
        None
    }
}

/// Opens the repository named by the configuration (`file:///path` or `s3://bucket/prefix`).
pub fn open(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = cfg.repo_url()?;
    open_url(url, cfg)
}

/// Opens the repository at `url` with the configuration's encryption keys attached (see
/// `crypto::keyring`).
pub fn open_url(url: &str, cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    open_keyed(url, cfg, None)
}

/// How old `serve`'s reading of the repository's encryption records may get.
pub const KEYS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// `open`, for `serve`, which runs for months: the repository's encryption records are read
/// again every `KEYS_MAX_AGE` (see `Keyring::refreshed_every`).
pub fn open_long_running(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    open_keyed(cfg.repo_url()?, cfg, Some(KEYS_MAX_AGE))
}

fn open_keyed(
    url: &str,
    cfg: &Config,
    keys_max_age: Option<std::time::Duration>,
) -> anyhow::Result<Arc<dyn Store>> {
    let inner = open_bare(url, cfg)?;
    let mut keyring = crate::crypto::keyring::Keyring::new(url, cfg.encryption.clone());
    if let Some(age) = keys_max_age {
        keyring = keyring.refreshed_every(age);
    }
    Ok(Arc::new(keyed::Keyed::new(inner, keyring)))
}

fn open_bare(url: &str, cfg: &Config) -> anyhow::Result<Box<dyn Store>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(input_err!(
                "repository {url:?}: a file repository needs an absolute path, like file:///var/backups/dbagent"
            ));
        }
        return Ok(Box::new(LocalStore::new(path.into())));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(input_err!(
                "repository {url:?}: no bucket name; use s3://bucket/prefix"
            ));
        }
        let store = S3Store::new(&cfg.s3, bucket, prefix)?;
        return Ok(Box::new(store.with_concurrency(cfg.upload.concurrency)));
    }
    Err(input_err!(
        "repository {url:?}: unsupported scheme; use file:///path or s3://bucket/prefix"
    ))
}

/// The first of `keys` (in any order) that the store no longer holds, HEADed a few at a
/// time: a writer checks its own objects before its manifest names them (a prune may have
/// taken the objects of a set that ran past `retention.incomplete_after`).
pub async fn first_missing<'a>(
    store: &dyn Store,
    keys: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<Option<&'a str>> {
    use futures::StreamExt;
    let mut heads = futures::stream::iter(
        keys.into_iter()
            .map(|k| async move { (k, store.head(k).await) }),
    )
    .buffer_unordered(16);
    while let Some((key, head)) = heads.next().await {
        if head
            .map_err(|e| e.context(format!("checking that {key} is still there")))?
            .is_none()
        {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// Reads a whole (small) object into memory.
pub async fn get_all(store: &dyn Store, key: &str) -> anyhow::Result<Bytes> {
    use futures::TryStreamExt;
    let chunks: Vec<Bytes> = store.get(key).await?.try_collect().await?;
    Ok(chunks.concat().into())
}

/// Writes a small object (a manifest) create-only. Finding the same bytes already stored is
/// success (a retried write whose answer was lost); different bytes fail and change nothing.
pub async fn put_once(store: &dyn Store, key: &str, data: Bytes) -> anyhow::Result<()> {
    match store.put_new(key, data.clone()).await {
        Err(e) if is_already_exists(&e) => {
            let stored = get_all(store, key).await?;
            if stored == data {
                return Ok(());
            }
            anyhow::bail!(
                "refusing to overwrite {key}: the repository already holds different content under that name ({} bytes stored, {} bytes new)",
                stored.len(),
                data.len()
            )
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        store
            .put("a/b/one", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let mut up = store.start_upload("a/two").await.unwrap();
        up.put_part(Bytes::from_static(b"hello ")).await.unwrap();
        // Not visible before completion.
        assert!(store.head("a/two").await.unwrap().is_none());
        up.put_part(Bytes::from_static(b"world")).await.unwrap();
        up.complete().await.unwrap();
        assert_eq!(&get_all(&store, "a/two").await.unwrap()[..], b"hello world");
        assert_eq!(
            &store.get_range("a/two", 6..11).await.unwrap()[..],
            b"world"
        );
        let keys: Vec<String> = store
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/b/one".to_string(), "a/two".to_string()]);
        let err = store.get("a/missing").await.err().unwrap();
        assert!(is_not_found(&err));
        store.delete("a/two").await.unwrap();
        assert!(store.head("a/two").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn aborted_upload_leaves_nothing_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let mut up = store.start_upload("x/y").await.unwrap();
        up.put_part(Bytes::from_static(b"partial")).await.unwrap();
        up.abort().await;
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn create_only_writes_never_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        store
            .put_new("w/seg", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let err = store
            .put_new("w/seg", Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(is_already_exists(&err), "{err:#}");
        let mut up = store.start_upload_new("w/seg").await.unwrap();
        up.put_part(Bytes::from_static(b"three")).await.unwrap();
        let err = up.complete().await.unwrap_err();
        assert!(is_already_exists(&err), "{err:#}");
        assert_eq!(&get_all(&store, "w/seg").await.unwrap()[..], b"one");
        // Nothing of the refused writes is left behind.
        assert!(store.leftovers().await.unwrap().is_empty());
        assert_eq!(store.list("").await.unwrap().len(), 1);

        // put_once: the same bytes again is success, different bytes a loud failure.
        put_once(&store, "m.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        put_once(&store, "m.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let err = put_once(&store, "m.json", Bytes::from_static(b"{ }"))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("refusing to overwrite m.json"),
            "{err:#}"
        );
        assert_eq!(&get_all(&store, "m.json").await.unwrap()[..], b"{}");
    }

    #[tokio::test]
    async fn racing_create_only_writes_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::new(dir.path().to_path_buf()));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..16u8 {
            let store = store.clone();
            tasks.spawn(async move {
                let res = store.put_new("race", Bytes::from(vec![i; 4096])).await;
                (i, res.is_ok())
            });
        }
        let mut winners = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (i, won) = r.unwrap();
            if won {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let stored = get_all(store.as_ref(), "race").await.unwrap();
        assert_eq!(&stored[..], &vec![winners[0]; 4096][..]);
    }

    #[tokio::test]
    async fn a_killed_writer_leaves_a_temp_file_that_is_listed_as_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        let mut up = store
            .start_upload("pg/1/backups/x/base.tar.zst")
            .await
            .unwrap();
        up.put_part(Bytes::from_static(b"partial")).await.unwrap();
        std::mem::forget(up); // as if the process had been killed
        assert!(store.list("").await.unwrap().is_empty());
        let left = store.leftovers().await.unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].key, "pg/1/backups/x/base.tar.zst");
        assert_eq!(left[0].size, Some(7));
        store.remove_leftover(&left[0]).await.unwrap();
        assert!(store.leftovers().await.unwrap().is_empty());
        // Only temp files can be removed this way.
        store.put("a", Bytes::from_static(b"x")).await.unwrap();
        let real = Leftover {
            key: "a".into(),
            id: "a".into(),
            started: Utc::now(),
            size: None,
        };
        assert!(store.remove_leftover(&real).await.is_err());
        assert!(store.head("a").await.unwrap().is_some());
    }
}
