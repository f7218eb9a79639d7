//! A store with the command's encryption keys attached (see `crypto::keyring`): every call is
//! the inner store's; only `keyring` is added.

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ByteStream, Leftover, ObjectInfo, Store, Upload};
use crate::crypto::keyring::Keyring;

#[derive(Debug)]
pub struct Keyed {
    inner: Box<dyn Store>,
    keyring: Keyring,
}

impl Keyed {
    pub fn new(inner: Box<dyn Store>, keyring: Keyring) -> Keyed {
        Keyed { inner, keyring }
    }
}

#[async_trait]
impl Store for Keyed {
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.inner.put(key, data).await
    }
    async fn put_new(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.inner.put_new(key, data).await
    }
    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.inner.start_upload(key).await
    }
    async fn start_upload_new(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.inner.start_upload_new(key).await
    }
    async fn get(&self, key: &str) -> anyhow::Result<ByteStream> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn head(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        self.inner.delete(key).await
    }
    async fn leftovers(&self) -> anyhow::Result<Vec<Leftover>> {
        self.inner.leftovers().await
    }
    async fn remove_leftover(&self, leftover: &Leftover) -> anyhow::Result<()> {
        self.inner.remove_leftover(leftover).await
    }
    fn keyring(&self) -> Option<&Keyring> {
        Some(&self.keyring)
    }
}
