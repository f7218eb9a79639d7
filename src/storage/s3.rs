//! S3-compatible object storage (Backblaze B2, AWS S3, MinIO, Wasabi) through `object_store`.
//!
//! Static credentials only: a short-lived `wal-push` must never stall probing an instance
//! metadata endpoint. No checksum algorithm is configured, so no `x-amz-checksum-*` or
//! `x-amz-sdk-checksum-*` header is ever sent (B2 rejects them).
//!
//! Create-only writes send `If-None-Match: *` on the PUT, and on the CompleteMultipartUpload
//! of a multipart upload (signed in `s3api`, since `object_store` always completes by
//! overwriting). With `s3.conditional_writes = false` (services that reject or ignore the
//! header) they look first, write, then read the object's size and last bytes back: not
//! atomic against a concurrent writer, but a lost race is noticed when it has already
//! happened. A multipart upload that cannot be completed is aborted at once; one a killed
//! process left behind is found by `leftovers` (ListMultipartUploads) for `prune`.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

use super::s3api::{Completed, S3Api};
use super::{AlreadyExists, ByteStream, Leftover, NotFound, ObjectInfo, Store, Upload};
use crate::config::S3Config;
use crate::error::Failure;
use crate::input_err;

/// Extra attempts of a create-only PUT after a dropped connection: `object_store` does not
/// retry a conditional PUT whose request may have reached the server. A retry that finds the
/// name taken reports `AlreadyExists`, and the caller compares contents.
const CREATE_RETRIES: u32 = 3;

#[derive(Debug, Clone)]
pub struct S3Store {
    inner: Arc<AmazonS3>,
    api: Arc<S3Api>,
    bucket: String,
    prefix: String,
    endpoint: String,
    /// The CA roots HTTPS is verified against (`None` for `http://`), named in certificate errors.
    roots: Option<crate::tls::RootSource>,
    /// Parts in flight per upload.
    concurrency: usize,
    /// `s3.conditional_writes`.
    conditional: bool,
}

/// Bytes compared by the verify-after-write fallback: every object dbagent writes ends with
/// its trailer (a SHA-256 of its plain bytes) or is a small manifest.
const VERIFY_TAIL: usize = 64;

impl S3Store {
    pub fn new(cfg: &S3Config, bucket: &str, prefix: &str) -> anyhow::Result<S3Store> {
        let (Some(key_id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) else {
            return Err(input_err!(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID_FILE and AWS_SECRET_ACCESS_KEY_FILE)"
            ));
        };
        let endpoint = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
        let mut client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(600))
            .with_allow_http(cfg.allow_http);
        let mut roots = None;
        if endpoint.starts_with("https://") {
            let (source, extra) = crate::tls::extra_roots()?;
            for cert in extra {
                let cert = object_store::Certificate::from_der(cert.as_ref())
                    .map_err(|e| anyhow::anyhow!("loading a built-in CA certificate: {e}"))?;
                client = client.with_root_certificate(cert);
            }
            roots = Some(source);
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&cfg.region)
            .with_endpoint(&endpoint)
            .with_access_key_id(key_id.expose())
            .with_secret_access_key(secret.expose())
            .with_virtual_hosted_style_request(!cfg.force_path_style)
            .with_allow_http(cfg.allow_http)
            .with_client_options(client)
            // B2 answers 500/503 under load; object_store retries those and connection errors,
            // up to 10 times (backoff from 0.1 s doubling to 15 s) within s3.retry_timeout.
            .with_retry(RetryConfig {
                max_retries: 10,
                retry_timeout: cfg.retry_timeout,
                ..RetryConfig::default()
            });
        if let Some(token) = &cfg.session_token {
            builder = builder.with_token(token.expose());
        }
        let inner = builder
            .build()
            .map_err(|e| input_err!("S3 settings for bucket {bucket}: {e}"))?;
        // Addressed as object_store addresses the bucket (see AmazonS3Builder::build).
        let bucket_endpoint = if cfg.force_path_style {
            format!("{}/{bucket}", endpoint.trim_end_matches('/'))
        } else {
            endpoint.clone()
        };
        let api = S3Api::new(
            &bucket_endpoint,
            &cfg.region,
            key_id.clone(),
            secret.clone(),
            cfg.session_token.clone(),
            cfg.allow_http,
            cfg.retry_timeout,
        )
        .map_err(|e| input_err!("S3 settings for bucket {bucket}: {e:#}"))?;
        Ok(S3Store {
            inner: Arc::new(inner),
            api: Arc::new(api),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            roots,
            concurrency: 2,
            conditional: cfg.conditional_writes,
        })
    }

    /// Parts in flight per upload (`upload.concurrency`).
    pub fn with_concurrency(mut self, concurrency: usize) -> S3Store {
        self.concurrency = concurrency.max(1);
        self
    }

    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn key_of(&self, path: &Path) -> String {
        let s = path.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .unwrap_or(s)
                .trim_start_matches('/')
                .to_string()
        }
    }

    /// Turns the errors a user can fix into one clear input error; keeps the rest.
    fn explain(&self, err: object_store::Error, what: &str) -> anyhow::Error {
        // A missing bucket also answers 404: tell it apart from a missing object first.
        let text = format!("{err}");
        if let object_store::Error::NotFound { .. } = err {
            if !text.contains("NoSuchBucket") {
                return anyhow::Error::new(NotFound(what.to_string()));
            }
        }
        if text.contains("NoSuchBucket") {
            return anyhow::Error::new(Failure::Input(format!(
                "bucket {:?} does not exist at {}: create it, or fix the bucket in the repository URL",
                self.bucket, self.endpoint
            )));
        }
        for marker in [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Unauthenticated",
            "InvalidToken",
            "403 Forbidden",
            "401 Unauthorized",
        ] {
            if text.contains(marker) {
                return anyhow::Error::new(Failure::Input(format!(
                    "{} refused the credentials for bucket {:?} ({marker}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    self.endpoint, self.bucket
                )));
            }
        }
        if let Some(roots) = &self.roots {
            let chain = error_chain(&err);
            if crate::tls::is_certificate_error(&chain) {
                return anyhow::Error::new(Failure::Input(format!(
                    "{what}: {} presented a certificate dbagent does not trust ({}): {chain}",
                    self.endpoint,
                    roots.describe()
                )));
            }
        }
        anyhow::Error::new(err).context(format!("{what} at {}", self.endpoint))
    }
}

/// The error and its sources on one line: object_store's top line leaves out the TLS reason.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

#[async_trait]
impl Store for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        self.inner
            .put(&self.path(key), PutPayload::from_bytes(data))
            .await
            .map_err(|e| self.explain(e, &format!("uploading {key}")))?;
        Ok(())
    }

    async fn put_new(&self, key: &str, data: Bytes) -> anyhow::Result<()> {
        let path = self.path(key);
        if !self.conditional {
            if self.head(key).await?.is_some() {
                return Err(anyhow::Error::new(AlreadyExists(key.to_string())));
            }
            self.put(key, data.clone()).await?;
            let tail = &data[data.len().saturating_sub(VERIFY_TAIL)..];
            return match written_is_ours(&self.inner, &path, data.len() as u64, tail).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow::Error::new(AlreadyExists(key.to_string()))),
                Err(e) => Err(self.explain(e, &format!("reading back {key}"))),
            };
        }
        let mut attempt = 0;
        loop {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let res = self
                .inner
                .put_opts(&path, PutPayload::from_bytes(data.clone()), opts)
                .await;
            match res {
                Ok(_) => return Ok(()),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => return Err(anyhow::Error::new(AlreadyExists(key.to_string()))),
                Err(object_store::Error::NotImplemented) => {
                    return Err(anyhow::anyhow!(
                        "uploading {key}: conditional writes are switched off in the S3 client"
                    ));
                }
                Err(e) => {
                    let err = self.explain(e, &format!("uploading {key}"));
                    if format!("{err:#}").contains("501 Not Implemented") {
                        return Err(not_conditional(err));
                    }
                    if attempt >= CREATE_RETRIES || !super::is_transient(&err) {
                        return Err(err);
                    }
                    attempt += 1;
                    tracing::debug!(%key, attempt, error = %format!("{err:#}"), "retrying a create-only upload");
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
            }
        }
    }

    async fn start_upload(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.upload(key, Mode::Overwrite).await
    }

    async fn start_upload_new(&self, key: &str) -> anyhow::Result<Box<dyn Upload>> {
        self.upload(key, Mode::Create).await
    }

    async fn get(&self, key: &str) -> anyhow::Result<ByteStream> {
        let res = self
            .inner
            .get(&self.path(key))
            .await
            .map_err(|e| self.explain(e, key))?;
        let key = key.to_string();
        Ok(Box::pin(res.into_stream().map_err(move |e| {
            anyhow::Error::new(e).context(format!("downloading {key}"))
        })))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        self.inner
            .get_range(&self.path(key), range)
            .await
            .map_err(|e| self.explain(e, key))
    }

    async fn head(&self, key: &str) -> anyhow::Result<Option<ObjectInfo>> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: meta.size,
                last_modified: meta.last_modified,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.explain(e, &format!("checking {key}"))),
        }
    }

    async fn list(&self, prefix: &str) -> anyhow::Result<Vec<ObjectInfo>> {
        // object_store lists by folder; filter the file-name part ourselves.
        let folder = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let list_path = if folder.is_empty() && self.prefix.is_empty() {
            None
        } else {
            Some(self.path(folder))
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(list_path.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.explain(e, &format!("listing {prefix}")))?;
        let mut out: Vec<ObjectInfo> = metas
            .into_iter()
            .map(|m| ObjectInfo {
                key: self.key_of(&m.location),
                size: m.size,
                last_modified: m.last_modified,
            })
            .filter(|o| o.key.starts_with(prefix))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.explain(e, &format!("deleting {key}"))),
        }
    }

    async fn leftovers(&self) -> anyhow::Result<Vec<Leftover>> {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let uploads = self.api.list_uploads(&prefix).await?;
        Ok(uploads
            .into_iter()
            .map(|u| Leftover {
                key: self.key_of(&Path::from(u.path.as_str())),
                id: u.upload_id,
                started: u.initiated,
                size: None,
            })
            .collect())
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> anyhow::Result<()> {
        let path = self.path(&leftover.key);
        match self.inner.abort_multipart(&path, &leftover.id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.explain(e, &format!("aborting the upload of {}", leftover.key))),
        }
    }
}

impl S3Store {
    async fn upload(&self, key: &str, mode: Mode) -> anyhow::Result<Box<dyn Upload>> {
        let path = self.path(key);
        let upload_id = self
            .inner
            .create_multipart(&path)
            .await
            .map_err(|e| self.explain(e, &format!("starting upload of {key}")))?;
        Ok(Box::new(S3Upload {
            store: self.inner.clone(),
            api: self.api.clone(),
            path,
            key: key.to_string(),
            upload_id,
            mode,
            conditional: self.conditional,
            next_part: 0,
            in_flight: FuturesUnordered::new(),
            etags: Vec::new(),
            concurrency: self.concurrency,
            size: 0,
            tail: Vec::new(),
        }))
    }
}

/// The error for a service that refuses `If-None-Match`.
fn not_conditional(err: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Failure::Input(format!(
        "the S3 service does not support conditional writes (If-None-Match): set s3.conditional_writes = false (DBAGENT_S3_CONDITIONAL_WRITES=false) to look before writing and verify after ({err:#})"
    )))
}

/// Verify-after-write: is the object under `path` the one just written (its size and its last
/// bytes)?
async fn written_is_ours(
    store: &AmazonS3,
    path: &Path,
    size: u64,
    tail: &[u8],
) -> Result<bool, object_store::Error> {
    let meta = match store.head(path).await {
        Ok(m) => m,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    if meta.size != size {
        return Ok(false);
    }
    let stored = store
        .get_range(path, size - tail.len() as u64..size)
        .await?;
    Ok(stored[..] == *tail)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Overwrite,
    Create,
}

type PartFuture = BoxFuture<'static, Result<(usize, PartId), object_store::Error>>;

struct S3Upload {
    store: Arc<AmazonS3>,
    api: Arc<S3Api>,
    path: Path,
    key: String,
    upload_id: String,
    mode: Mode,
    conditional: bool,
    next_part: usize,
    in_flight: FuturesUnordered<PartFuture>,
    /// ETags of the parts sent, by part index.
    etags: Vec<Option<String>>,
    concurrency: usize,
    /// Bytes sent, and the last of them, for the verify-after-write fallback.
    size: u64,
    tail: Vec<u8>,
}

impl S3Upload {
    /// Waits for one part in flight and records its ETag.
    async fn land_one(&mut self) -> anyhow::Result<()> {
        if let Some(res) = self.in_flight.next().await {
            let (idx, part) = res.with_context(|| format!("uploading a part of {}", self.key))?;
            if self.etags.len() <= idx {
                self.etags.resize(idx + 1, None);
            }
            self.etags[idx] = Some(part.content_id);
        }
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.land_one().await?;
        }
        let etags: Vec<String> = self
            .etags
            .iter()
            .cloned()
            .collect::<Option<_>>()
            .with_context(|| format!("upload of {}: a part is missing", self.key))?;
        if etags.is_empty() {
            anyhow::bail!("upload of {}: no parts were sent", self.key);
        }
        let key = self.key.clone();
        let taken = || Err(anyhow::Error::new(AlreadyExists(key.clone())));
        match (self.mode, self.conditional) {
            (Mode::Overwrite, _) => self.complete_overwriting(etags).await?,
            (Mode::Create, false) => {
                let exists = match self.store.head(&self.path).await {
                    Ok(_) => true,
                    Err(object_store::Error::NotFound { .. }) => false,
                    Err(e) => return Err(e).context(format!("checking {}", self.key)),
                };
                if exists {
                    return taken();
                }
                self.complete_overwriting(etags).await?;
                let ours = written_is_ours(&self.store, &self.path, self.size, &self.tail)
                    .await
                    .with_context(|| format!("reading back {}", self.key))?;
                if !ours {
                    return taken();
                }
            }
            (Mode::Create, true) => {
                let done = self
                    .api
                    .complete_create(self.path.as_ref(), &self.upload_id, &etags)
                    .await?;
                match done {
                    Completed::NameTaken => return taken(),
                    Completed::NotSupported(why) => {
                        return Err(not_conditional(anyhow::anyhow!("{why}")));
                    }
                    Completed::Created => {}
                }
            }
        }
        Ok(())
    }

    async fn complete_overwriting(&mut self, etags: Vec<String>) -> anyhow::Result<()> {
        let parts = etags
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        self.store
            .complete_multipart(&self.path, &self.upload_id, parts)
            .await
            .with_context(|| format!("completing upload of {}", self.key))?;
        Ok(())
    }

    async fn abort_upload(&mut self) {
        self.in_flight.clear();
        if let Err(e) = self
            .store
            .abort_multipart(&self.path, &self.upload_id)
            .await
        {
            if !matches!(e, object_store::Error::NotFound { .. }) {
                tracing::warn!(key = %self.key, error = %e, "could not abort a multipart upload; prune removes it");
            }
        }
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn put_part(&mut self, data: Bytes) -> anyhow::Result<()> {
        let idx = self.next_part;
        self.next_part += 1;
        self.size += data.len() as u64;
        self.tail
            .extend_from_slice(&data[data.len().saturating_sub(VERIFY_TAIL)..]);
        let excess = self.tail.len().saturating_sub(VERIFY_TAIL);
        self.tail.drain(..excess);
        let (store, path, id) = (
            self.store.clone(),
            self.path.clone(),
            self.upload_id.clone(),
        );
        self.in_flight.push(Box::pin(async move {
            let part = store
                .put_part(&path, &id, idx, PutPayload::from_bytes(data))
                .await?;
            Ok((idx, part))
        }));
        // Room for the next part before returning, rather than when it comes: the caller
        // would hold it meanwhile, one part more in memory.
        while self.in_flight.len() >= self.concurrency {
            self.land_one().await?;
        }
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> anyhow::Result<()> {
        let res = self.finish().await;
        if res.is_err() {
            // A failed completion leaves the parts stored and invisible: abort at once.
            self.abort_upload().await;
        }
        res
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_upload().await;
    }
}
