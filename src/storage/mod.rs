//! The object store: one small trait, implemented for S3-compatible services and for a
//! local directory. Keys are `/`-separated and relative to the repository root.

mod local;
mod s3;

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

pub type ByteStream = BoxStream<'static, anyhow::Result<Bytes>>;

/// A multipart upload in progress. Parts are sent in order; all but the last must be at
/// least `config::MIN_PART_SIZE` bytes. Nothing is visible under the key until `complete`.
#[async_trait]
pub trait Upload: Send {
    async fn put_part(&mut self, data: Bytes) -> anyhow::Result<()>;
    async fn complete(self: Box<Self>) -> anyhow::Result<()>;
    async fn abort(self: Box<Self>);
}

#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Writes a whole object atomically: readers see all of it or nothing.
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()>;
    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>>;
    async fn get(&self, key: &str) -> anyhow::Result<ByteStream>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes>;
    async fn head(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>>;
    /// Every object whose key starts with `prefix` (a folder: end it with `/`).
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>>;
    async fn delete(&self, key: &str) -> anyhow::Result<()>;
}

/// Opens the repository named by the configuration (`file:///path` or `s3://bucket/prefix`).
pub fn open(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = cfg.repo_url()?;
    open_url(url, cfg)
}

pub fn open_url(url: &str, cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(input_err!(
                "repository {url:?}: a file repository needs an absolute path, like file:///var/backups/dbagent"
            ));
        }
        return Ok(Arc::new(LocalStore::new(path.into())));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(input_err!(
                "repository {url:?}: no bucket name; use s3://bucket/prefix"
            ));
        }
        return Ok(Arc::new(S3Store::new(&cfg.s3, bucket, prefix)?));
    }
    Err(input_err!(
        "repository {url:?}: unsupported scheme; use file:///path or s3://bucket/prefix"
    ))
}

/// Reads a whole (small) object into memory.
pub async fn get_all(store: &dyn Store, key: &str) -> anyhow::Result<Bytes> {
    use futures::TryStreamExt;
    let chunks: Vec<Bytes> = store.get(key).await?.try_collect().await?;
    Ok(chunks.concat().into())
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
}
