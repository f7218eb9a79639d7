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

/// The URL of the bucket itself: `endpoint/bucket` (path style), or the bucket as the first
/// label of the endpoint's host (virtual-hosted, `https://bucket.s3.region.amazonaws.com`).
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> anyhow::Result<String> {
    let endpoint = endpoint.trim_end_matches('/');
    if path_style {
        return Ok(format!("{endpoint}/{bucket}"));
    }
    let mut url = url::Url::parse(endpoint)
        .map_err(|e| input_err!("s3.endpoint {endpoint:?} is not a URL ({e})"))?;
    let host = url
        .host_str()
        .ok_or_else(|| input_err!("s3.endpoint {endpoint:?} names no host"))?
        .to_string();
    if host.starts_with(&format!("{bucket}.")) {
        return Ok(endpoint.to_string()); // already the bucket's own host
    }
    if url
        .host()
        .is_some_and(|h| !matches!(h, url::Host::Domain(_)))
    {
        return Err(input_err!(
            "s3.endpoint {endpoint:?} is an IP address, which cannot carry the bucket as a host name: set s3.force_path_style = true"
        ));
    }
    url.set_host(Some(&format!("{bucket}.{host}")))
        .map_err(|e| input_err!("bucket {bucket:?} in the host of {endpoint:?}: {e}"))?;
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Resumes in a row, with no byte received between them, before a download fails.
const GET_RESUMES: u32 = 5;

/// One object's body, resumed from the byte where it broke (a ranged GET of the rest, only
/// while the object's ETag is unchanged).
///
/// `object_store` resumes a broken body only within `s3.retry_timeout` of the request's start,
/// and the client ends every request after 10 minutes. A dump streams into `pg_restore` or
/// `mysql` for as long as the load takes, so without this a large restore failed at minute 10,
/// or at the first dropped connection after minute 2, with the target half loaded.
struct Resuming {
    store: S3Store,
    path: Path,
    key: String,
    etag: Option<String>,
    size: u64,
    offset: u64,
    /// Resumes since the last byte received.
    failures: u32,
    /// `None` once the body has ended or failed for good.
    body: Option<futures::stream::BoxStream<'static, object_store::Result<Bytes>>>,
}

impl Resuming {
    async fn next(mut self) -> Option<(anyhow::Result<Bytes>, Resuming)> {
        loop {
            let broke = match self.body.as_mut()?.next().await {
                Some(Ok(bytes)) => {
                    self.offset += bytes.len() as u64;
                    self.failures = 0;
                    return Some((Ok(bytes), self));
                }
                None if self.offset >= self.size => return None,
                None => anyhow::anyhow!(
                    "the store ended the body at byte {} of {}",
                    self.offset,
                    self.size
                ),
                Some(Err(e)) => anyhow::Error::new(e),
            };
            if self.offset >= self.size {
                return None; // every byte arrived; the connection broke after them
            }
            if let Err(e) = self.resume(broke).await {
                self.body = None;
                return Some((Err(e.context(format!("downloading {}", self.key))), self));
            }
        }
    }

    /// Opens the rest of the object, or says why the download cannot go on.
    async fn resume(&mut self, mut broke: anyhow::Error) -> anyhow::Result<()> {
        let Some(etag) = self.etag.clone() else {
            return Err(broke.context("the store gave no ETag to resume against"));
        };
        loop {
            self.failures += 1;
            if self.failures > GET_RESUMES {
                return Err(broke.context(format!(
                    "{GET_RESUMES} resumes at byte {} of {} received nothing",
                    self.offset, self.size
                )));
            }
            tracing::warn!(
                key = %self.key,
                offset = self.offset,
                size = self.size,
                error = %crate::error::one_line(&broke),
                "a download broke: resuming where it broke"
            );
            tokio::time::sleep(Duration::from_millis(500 << (self.failures - 1).min(4))).await;
            let options = object_store::GetOptions {
                if_match: Some(etag.clone()),
                range: Some(object_store::GetRange::Offset(self.offset)),
                ..Default::default()
            };
            match self.store.inner.get_opts(&self.path, options).await {
                Ok(rest) => {
                    self.body = Some(rest.into_stream());
                    return Ok(());
                }
                Err(e @ object_store::Error::Precondition { .. }) => {
                    return Err(
                        anyhow::Error::new(e).context("the object changed while it was downloaded")
                    );
                }
                Err(e) => {
                    broke = self.store.explain(e, &self.key);
                    // Refused credentials, a skewed clock, an object gone: no retry mends those.
                    if super::is_not_found(&broke) {
                        return Err(anyhow::Error::new(Failure::NotFound(format!(
                            "{} is gone from the repository (deleted while it was downloaded)",
                            self.key
                        ))));
                    }
                    if crate::error::exit_code(&broke) == crate::error::EXIT_INPUT {
                        return Err(broke);
                    }
                }
            }
        }
    }
}

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
        // Addressed as object_store addresses the bucket (see AmazonS3Builder::build): a
        // virtual-hosted endpoint is used as it is, so it must name the bucket itself.
        let bucket_endpoint = bucket_endpoint(&endpoint, bucket, cfg.force_path_style)?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&cfg.region)
            .with_endpoint(if cfg.force_path_style {
                &endpoint
            } else {
                &bucket_endpoint
            })
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
        if text.contains("RequestTimeTooSkewed") {
            return anyhow::Error::new(Failure::Input(format!(
                "{} refused the request because this host's clock differs from its own by more than 15 minutes (RequestTimeTooSkewed): fix the host's time (NTP)",
                self.endpoint
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
                // An answer to HEAD has no body, so no reason: a skewed clock looks the same.
                let clock = if marker == "403 Forbidden" {
                    " (or, if they are right, this host's clock)"
                } else {
                    ""
                };
                return anyhow::Error::new(Failure::Input(format!(
                    "{} refused the credentials for bucket {:?} ({marker}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY{clock}",
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
        let path = self.path(key);
        let res = self
            .inner
            .get(&path)
            .await
            .map_err(|e| self.explain(e, key))?;
        let download = Resuming {
            store: self.clone(),
            path,
            key: key.to_string(),
            etag: res.meta.e_tag.clone(),
            size: res.meta.size,
            offset: 0,
            failures: 0,
            body: Some(res.into_stream()),
        };
        Ok(Box::pin(futures::stream::unfold(download, Resuming::next)))
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

    /// CompleteMultipartUpload. When it fails, the store may still have completed it (the
    /// answer lost on the way back, and a retry told the upload is gone): what is stored is
    /// read back, and an object of this upload's size and last bytes is success.
    async fn complete_overwriting(&mut self, etags: Vec<String>) -> anyhow::Result<()> {
        let parts = etags
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        let Err(e) = self
            .store
            .complete_multipart(&self.path, &self.upload_id, parts)
            .await
        else {
            return Ok(());
        };
        match written_is_ours(&self.store, &self.path, self.size, &self.tail).await {
            Ok(true) => {
                tracing::info!(key = %self.key, error = %e, "completing the upload failed, yet the store holds it whole: the answer was lost");
                Ok(())
            }
            _ => Err(e).with_context(|| format!("completing upload of {}", self.key)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn store() -> S3Store {
        let cfg = S3Config {
            endpoint: Some("https://s3.us-west-004.backblazeb2.com".into()),
            region: "us-west-004".into(),
            force_path_style: true,
            allow_http: false,
            retry_timeout: Duration::from_secs(1),
            conditional_writes: true,
            access_key_id: Some(Secret::new("id")),
            secret_access_key: Some(Secret::new("secret")),
            session_token: None,
        };
        S3Store::new(&cfg, "site-backups", "").unwrap()
    }

    fn refusal(body: &str) -> String {
        let err = object_store::Error::Generic {
            store: "S3",
            source: body.into(),
        };
        store().explain(err, "k").to_string()
    }

    #[test]
    fn a_skewed_clock_is_not_called_bad_credentials() {
        let skew = refusal("403 Forbidden: <Error><Code>RequestTimeTooSkewed</Code></Error>");
        assert!(
            skew.contains("clock") && !skew.contains("AWS_ACCESS_KEY_ID"),
            "{skew}"
        );
        let keys = refusal("403 Forbidden: <Error><Code>InvalidAccessKeyId</Code></Error>");
        assert!(
            keys.contains("AWS_ACCESS_KEY_ID") && !keys.contains("clock"),
            "{keys}"
        );
        // A HEAD's 403 carries no reason: either may be the cause.
        let head = refusal("Server returned non-2xx status code: 403 Forbidden");
        assert!(
            head.contains("AWS_ACCESS_KEY_ID") && head.contains("clock"),
            "{head}"
        );
    }

    #[test]
    fn a_virtual_hosted_bucket_is_the_first_label_of_the_host() {
        let v = |e: &str| bucket_endpoint(e, "site-backups", false);
        assert_eq!(
            v("https://s3.eu-central-1.amazonaws.com").unwrap(),
            "https://site-backups.s3.eu-central-1.amazonaws.com"
        );
        assert_eq!(
            v("https://s3.us-west-004.backblazeb2.com/").unwrap(),
            "https://site-backups.s3.us-west-004.backblazeb2.com"
        );
        assert_eq!(
            v("http://minio.local:9000").unwrap(),
            "http://site-backups.minio.local:9000"
        );
        // Given with the bucket already in it: kept.
        assert_eq!(
            v("https://site-backups.s3.wasabisys.com").unwrap(),
            "https://site-backups.s3.wasabisys.com"
        );
        let ip = v("http://127.0.0.1:9000").unwrap_err().to_string();
        assert!(ip.contains("s3.force_path_style = true"), "{ip}");
        assert_eq!(
            bucket_endpoint("http://127.0.0.1:9000/", "b", true).unwrap(),
            "http://127.0.0.1:9000/b"
        );
    }
}
