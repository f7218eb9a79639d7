//! The two S3 requests `object_store` does not make for us: CompleteMultipartUpload with
//! `If-None-Match: *` (its multipart uploads always complete by overwriting) and
//! ListMultipartUploads (it has no way to find uploads a killed process left behind).
//!
//! Signed here with AWS Signature Version 4, addressed exactly as `object_store` addresses the
//! bucket, verified against the same CA roots (`crate::tls`), and like everything else sent
//! without `x-amz-checksum-*` headers (B2 rejects them).

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::config::Secret;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub(crate) struct S3Api {
    /// Built on first use: loading the system's root certificates takes milliseconds that a
    /// `wal-push` whose single PUT goes through `object_store` should not pay.
    http: std::sync::OnceLock<reqwest::Client>,
    allow_http: bool,
    /// `https://host/bucket` (path style) or the endpoint itself (virtual-hosted), as
    /// `object_store` builds it.
    bucket_endpoint: url::Url,
    region: String,
    key_id: Secret,
    secret: Secret,
    token: Option<Secret>,
    /// How long one request may be retried (5xx, 429, dropped connections): s3.retry_timeout.
    retry_for: Duration,
}

/// A multipart upload the bucket still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingUpload {
    /// The full object path (with the repository prefix).
    pub path: String,
    pub upload_id: String,
    pub initiated: DateTime<Utc>,
}

/// What a create-only completion found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completed {
    Created,
    /// The name is taken (HTTP 412), or the upload is gone after a retry (our own earlier
    /// attempt may have completed it): the caller compares what is stored.
    NameTaken,
    /// The service rejects `If-None-Match` on this request (HTTP 501).
    NotSupported(String),
}

struct Answer {
    status: reqwest::StatusCode,
    body: String,
}

impl S3Api {
    pub(crate) fn new(
        bucket_endpoint: &str,
        region: &str,
        key_id: Secret,
        secret: Secret,
        token: Option<Secret>,
        allow_http: bool,
        retry_for: Duration,
    ) -> anyhow::Result<S3Api> {
        let bucket_endpoint = url::Url::parse(bucket_endpoint.trim_end_matches('/'))
            .with_context(|| format!("S3 endpoint {bucket_endpoint:?}"))?;
        Ok(S3Api {
            http: std::sync::OnceLock::new(),
            allow_http,
            bucket_endpoint,
            region: region.to_string(),
            key_id,
            secret,
            token,
            retry_for,
        })
    }

    fn http(&self) -> anyhow::Result<&reqwest::Client> {
        if let Some(client) = self.http.get() {
            return Ok(client);
        }
        // The same CA roots as object_store's client (the system's, or the built-in ones).
        let builder = match self.bucket_endpoint.scheme() {
            "https" => crate::tls::reqwest_builder()?,
            _ => reqwest::Client::builder(),
        };
        let client = builder
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .https_only(!self.allow_http)
            .build()
            .context("building the HTTP client")?;
        Ok(self.http.get_or_init(|| client))
    }

    /// Completes a multipart upload only if nothing is stored under `path` yet.
    pub(crate) async fn complete_create(
        &self,
        path: &str,
        upload_id: &str,
        etags: &[String],
    ) -> anyhow::Result<Completed> {
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        let query = [("uploadId", upload_id)];
        let headers = [("if-none-match", "*")];
        let mut attempts = 0;
        let answer = self
            .send(
                "POST",
                path,
                &query,
                &headers,
                Bytes::from(body),
                &mut attempts,
            )
            .await
            .with_context(|| format!("completing the upload of {path}"))?;
        match answer.status.as_u16() {
            200 => Ok(Completed::Created),
            412 => Ok(Completed::NameTaken),
            404 if attempts > 1 && answer.body.contains("NoSuchUpload") => Ok(Completed::NameTaken),
            501 => Ok(Completed::NotSupported(error_text(&answer.body))),
            status => anyhow::bail!(
                "completing the upload of {path}: HTTP {status}: {}",
                error_text(&answer.body)
            ),
        }
    }

    /// Every multipart upload in progress under `prefix` (a full path prefix).
    pub(crate) async fn list_uploads(&self, prefix: &str) -> anyhow::Result<Vec<PendingUpload>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (String::new(), String::new());
        loop {
            let mut query = vec![("uploads", ""), ("prefix", prefix)];
            if !key_marker.is_empty() {
                query.push(("key-marker", &key_marker));
                query.push(("upload-id-marker", &id_marker));
            }
            let mut attempts = 0;
            let answer = self
                .send("GET", "", &query, &[], Bytes::new(), &mut attempts)
                .await
                .context("listing incomplete multipart uploads")?;
            if answer.status.as_u16() != 200 {
                anyhow::bail!(
                    "listing incomplete multipart uploads: HTTP {}: {}",
                    answer.status.as_u16(),
                    error_text(&answer.body)
                );
            }
            let page = parse_uploads(&answer.body)?;
            out.extend(page.uploads);
            match page.next {
                Some((k, u)) if !k.is_empty() => (key_marker, id_marker) = (k, u),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Sends one signed request, retrying 5xx, 429, 409 (a conflicting conditional request in
    /// flight) and dropped connections with backoff for up to `retry_for`.
    async fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Bytes,
        attempts: &mut u32,
    ) -> anyhow::Result<Answer> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(200);
        loop {
            *attempts += 1;
            let res = self
                .send_once(method, path, query, headers, body.clone())
                .await;
            let retry = match &res {
                Ok(a) => {
                    let s = a.status.as_u16();
                    (s >= 500 && s != 501)
                        || s == 429
                        || s == 409
                        || (s == 200 && a.body.contains("<Error>"))
                }
                Err(_) => true,
            };
            if !retry || started.elapsed() + pause > self.retry_for {
                return match res {
                    Ok(a) if a.status.as_u16() == 200 && a.body.contains("<Error>") => {
                        anyhow::bail!("{}", error_text(&a.body))
                    }
                    other => other,
                };
            }
            tracing::debug!(%method, %path, attempt = *attempts, "retrying an S3 request");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(8));
        }
    }

    async fn send_once(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let mut url = self.bucket_endpoint.clone();
        let base = url.path().trim_end_matches('/').to_string();
        let canonical_uri = match (path.is_empty(), base.is_empty()) {
            (true, true) => "/".to_string(),
            (true, false) => base,
            (false, _) => format!("{base}/{}", uri_encode(path, false)),
        };
        url.set_path(&canonical_uri);
        let canonical_query = canonical_query(query);
        url.set_query((!canonical_query.is_empty()).then_some(canonical_query.as_str()));
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_string(),
        };
        let now = Utc::now();
        let request = Request {
            method,
            canonical_uri: &canonical_uri,
            query,
            host: &host,
            headers,
            payload_sha256: hex::encode(Sha256::digest(&body)),
        };
        let signed = request.sign(
            &self.key_id,
            &self.secret,
            self.token.as_ref(),
            &self.region,
            now,
        );
        let method = reqwest::Method::from_bytes(method.as_bytes()).context("HTTP method")?;
        let mut builder = self.http()?.request(method, url).body(body);
        for (name, value) in signed {
            if name != "host" {
                builder = builder.header(name, value);
            }
        }
        let response = builder.send().await.context("sending the request")?;
        let status = response.status();
        let body = response.text().await.context("reading the answer")?;
        Ok(Answer { status, body })
    }
}

/// A request as SigV4 sees it.
struct Request<'a> {
    method: &'a str,
    /// The path as sent (already encoded).
    canonical_uri: &'a str,
    query: &'a [(&'a str, &'a str)],
    host: &'a str,
    /// Extra headers to sign and send (lower-case names).
    headers: &'a [(&'a str, &'a str)],
    payload_sha256: String,
}

impl Request<'_> {
    /// The headers to send, `authorization` included.
    fn sign(
        &self,
        key_id: &Secret,
        secret: &Secret,
        token: Option<&Secret>,
        region: &str,
        now: DateTime<Utc>,
    ) -> Vec<(String, String)> {
        let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
        let date = now.format("%Y%m%d").to_string();
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), self.host.to_string()),
            ("x-amz-content-sha256".into(), self.payload_sha256.clone()),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        if let Some(token) = token {
            headers.push(("x-amz-security-token".into(), token.expose().to_string()));
        }
        for (k, v) in self.headers {
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        headers.sort();
        let signed_headers = headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
        let canonical_request = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.method,
            self.canonical_uri,
            canonical_query(self.query),
            canonical_headers,
            signed_headers,
            self.payload_sha256
        );
        let scope = format!("{date}/{region}/s3/aws4_request");
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let mut key = hmac(
            format!("AWS4{}", secret.expose()).as_bytes(),
            date.as_bytes(),
        );
        for part in [region, "s3", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        headers.push((
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed_headers},Signature={signature}",
                key_id.expose()
            ),
        ));
        headers
    }
}

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// URI-encodes as SigV4 wants: unreserved characters stay, everything else is `%XX`; `/`
/// stays in paths.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The text of the first `<tag>…</tag>` in `xml`.
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(&xml[start..end])
}

/// The S3 error code and message of an error answer, for one line of output.
fn error_text(body: &str) -> String {
    match (element(body, "Code"), element(body, "Message")) {
        (Some(code), Some(msg)) => format!("{code}: {}", xml_unescape(msg)),
        (Some(code), None) => code.to_string(),
        _ => body
            .chars()
            .take(200)
            .collect::<String>()
            .replace('\n', " "),
    }
}

struct UploadsPage {
    uploads: Vec<PendingUpload>,
    /// Key and upload-id markers of the next page, when the listing is truncated.
    next: Option<(String, String)>,
}

fn parse_uploads(xml: &str) -> anyhow::Result<UploadsPage> {
    let mut uploads = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Upload>") {
        let end = rest[start..]
            .find("</Upload>")
            .context("malformed ListMultipartUploads answer")?
            + start;
        let block = &rest[start..end];
        let field = |tag: &str| {
            element(block, tag)
                .map(xml_unescape)
                .with_context(|| format!("ListMultipartUploads: an upload without <{tag}>"))
        };
        let initiated = field("Initiated")?;
        uploads.push(PendingUpload {
            path: field("Key")?,
            upload_id: field("UploadId")?,
            initiated: DateTime::parse_from_rfc3339(&initiated)
                .with_context(|| format!("ListMultipartUploads: bad time {initiated:?}"))?
                .with_timezone(&Utc),
        });
        rest = &rest[end..];
    }
    let truncated = element(xml, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let next = truncated.then(|| {
        (
            element(xml, "NextKeyMarker")
                .map(xml_unescape)
                .unwrap_or_default(),
            element(xml, "NextUploadIdMarker")
                .map(xml_unescape)
                .unwrap_or_default(),
        )
    });
    Ok(UploadsPage { uploads, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example_keys() -> (Secret, Secret) {
        (
            Secret::new("AKIAIOSFODNN7EXAMPLE"),
            Secret::new("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        )
    }

    fn at_example_time() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2013-05-24T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn authorization(req: &Request) -> String {
        let (id, secret) = example_keys();
        req.sign(&id, &secret, None, "us-east-1", at_example_time())
            .into_iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1
    }

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    // The worked examples of AWS's "Signature Calculations for the Authorization Header".
    #[test]
    fn signs_the_aws_examples() {
        let get = Request {
            method: "GET",
            canonical_uri: "/test.txt",
            query: &[],
            host: "examplebucket.s3.amazonaws.com",
            headers: &[("range", "bytes=0-9")],
            payload_sha256: EMPTY_SHA256.into(),
        };
        assert_eq!(
            authorization(&get),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        let lifecycle = Request {
            method: "GET",
            canonical_uri: "/",
            query: &[("lifecycle", "")],
            host: "examplebucket.s3.amazonaws.com",
            headers: &[],
            payload_sha256: EMPTY_SHA256.into(),
        };
        assert!(authorization(&lifecycle).ends_with(
            "Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
        ));
        let list = Request {
            method: "GET",
            canonical_uri: "/",
            query: &[("prefix", "J"), ("max-keys", "2")],
            host: "examplebucket.s3.amazonaws.com",
            headers: &[],
            payload_sha256: EMPTY_SHA256.into(),
        };
        assert!(authorization(&list).ends_with(
            "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        ));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn parses_an_upload_listing() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>p/pg/1/backups/x/base.tar.zst</NextKeyMarker><NextUploadIdMarker>id&amp;2</NextUploadIdMarker>
  <MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>p/pg/1/wal/000000010000000000000003.zst</Key><UploadId>id1</UploadId>
    <Initiator><ID>x</ID></Initiator><StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated></Upload>
  <Upload><Key>p/pg/1/backups/x/base.tar.zst</Key><UploadId>id&amp;2</UploadId>
    <Initiated>2026-12-01T03:00:00Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads(xml).unwrap();
        assert_eq!(page.uploads.len(), 2);
        assert_eq!(
            page.uploads[0].path,
            "p/pg/1/wal/000000010000000000000003.zst"
        );
        assert_eq!(page.uploads[1].upload_id, "id&2");
        assert_eq!(
            page.uploads[1].initiated,
            DateTime::parse_from_rfc3339("2026-12-01T03:00:00Z").unwrap()
        );
        assert_eq!(
            page.next,
            Some(("p/pg/1/backups/x/base.tar.zst".into(), "id&2".into()))
        );
        let empty = parse_uploads("<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>").unwrap();
        assert!(empty.uploads.is_empty() && empty.next.is_none());
    }

    #[test]
    fn query_and_path_encoding() {
        assert_eq!(
            canonical_query(&[("uploads", ""), ("prefix", "p/pg/")]),
            "prefix=p%2Fpg%2F&uploads="
        );
        assert_eq!(uri_encode("a b/c+d", false), "a%20b/c%2Bd");
    }
}
