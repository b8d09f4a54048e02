//! The few S3 API calls the registry's object-store storage makes, each a
//! request presigned by `rusty-s3` (SigV4, no I/O of its own) and sent on
//! gantry's one outbound client — so the endpoint is reached with the same
//! trust store, `certs.d`, client certificates and proxies as a registry,
//! and a blob's bytes stream through without being held in memory.
//!
//! Why `rusty-s3` and not the AWS SDK or `object_store`: both bring an HTTP
//! stack of their own (a second TLS configuration to keep in step with
//! gantry's), and neither lets an upload begun by one process be continued
//! by another with a body streamed from the client's request; signing is
//! the only part gantry lacks.

use crate::storage::StorageError;
use bytes::Bytes;
use gantry_core::endpoint::Reach;
use gantry_core::text::escape_line;
use gantry_http::client::{Outbound, ReqBody};
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long a signed request stays valid: long enough for a slow part.
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// How long an answer's head may take (a blob's bytes may take longer).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest object one copy request may take (S3's limit).
const MAX_SINGLE_COPY: u64 = 5 << 30;

/// A multipart copy's part.
const COPY_PART: u64 = 1 << 30;

/// The most of an error answer's body read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;

/// A response body of an object's bytes.
pub type Incoming = hyper::body::Incoming;

/// Where the bucket is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Keys are written under this.
    pub prefix: String,
    pub path_style: bool,
    /// Keys given in the config; else the environment's (see
    /// [`credentials_from_environment`]).
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
}

/// An object as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The key, without the storage's prefix.
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

pub struct S3Client {
    bucket: Bucket,
    credentials: Option<Credentials>,
    prefix: String,
    http: Outbound,
}

fn failed(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("object store: {what}: {}", escape_line(&e.to_string())))
}

impl S3Client {
    /// A client of `config`'s bucket over `network`; must be built within a
    /// tokio runtime.
    /// `network` is the config's (`[network]`: `certs.d`, proxies), trusting
    /// `AWS_CA_BUNDLE`'s certificates too when it names a readable file, as
    /// AWS tools do.
    pub fn new(config: &S3Config, network: gantry_http::Network) -> Result<S3Client, StorageError> {
        let network = match ca_bundle_from_environment() {
            Some(certs) => Arc::new(network.with_extra_roots(certs)),
            None => Arc::new(network),
        };
        let credentials = match (&config.access_key, &config.secret_key) {
            (Some(k), Some(s)) => Some(Credentials::new(k.clone(), s.clone())),
            (None, None) => credentials_from_environment()?,
            _ => return Err(failed("the config", "access_key and secret_key go together")),
        };
        let endpoint = url::Url::parse(&config.endpoint).map_err(|e| failed("the endpoint", e))?;
        let mut prefix = config.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        let style = if config.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, config.bucket.clone(), config.region.clone())
            .map_err(|e| failed("the endpoint", e))?;
        Ok(S3Client {
            bucket,
            credentials,
            prefix,
            http: Outbound::new(network),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn creds(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Sends a signed request; the answer of any status.
    async fn send(
        &self,
        method: Method,
        url: url::Url,
        headers: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<hyper::Response<Incoming>, StorageError> {
        let what = format!("{method} {}", redact(&url));
        let mut req = hyper::Request::builder().method(method).uri(url.as_str());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let body: ReqBody = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_LENGTH, b.len());
                Full::new(b).map_err(|never| match never {}).boxed()
            }
            None => gantry_http::client::empty(),
        };
        let req = req.body(body).map_err(|e| failed(&what, e))?;
        match tokio::time::timeout(ANSWER_TIMEOUT, self.http.request(Reach::Any, req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(failed(&what, gantry_http::client::chain(&e))),
            Err(_) => Err(failed(&what, "no answer in time")),
        }
    }

    /// The error an unexpected answer stands for: its status and S3 code.
    async fn refused(what: &str, resp: hyper::Response<Incoming>) -> StorageError {
        let status = resp.status();
        let body = read_limited(resp.into_body(), MAX_ERROR_BODY).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let code = between(&text, "<Code>", "</Code>").unwrap_or("");
        let message = between(&text, "<Message>", "</Message>").unwrap_or("");
        failed(what, format!("{status} {code} {message}").trim())
    }

    /// The body of a successful answer (an error's status and code
    /// otherwise; a copy or a completion can also fail after its 200, with
    /// the error as the body).
    async fn answer(what: &str, resp: hyper::Response<Incoming>) -> Result<Bytes, StorageError> {
        if !resp.status().is_success() {
            return Err(Self::refused(what, resp).await);
        }
        let body = read_limited(resp.into_body(), MAX_ERROR_BODY)
            .await
            .map_err(|e| failed(what, e))?;
        let text = String::from_utf8_lossy(&body);
        if text.contains("<Error>") {
            return Err(failed(what, between(&text, "<Code>", "</Code>").unwrap_or("failed")));
        }
        Ok(body)
    }

    /// The bytes of `key` (at most `limit`); `None` when there is no such object.
    pub async fn get(&self, key: &str, limit: usize) -> Result<Option<Bytes>, StorageError> {
        let key = self.key(key);
        let url = self.bucket.get_object(self.creds(), &key).sign(SIGNED_FOR);
        let resp = self.send(Method::GET, url, &[], None).await?;
        match resp.status() {
            StatusCode::OK => read_limited(resp.into_body(), limit)
                .await
                .map(Some)
                .map_err(|e| failed(&format!("reading {key}"), e)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Self::refused(&format!("GET {key}"), resp).await),
        }
    }

    /// A stream of bytes `range` of `key`; `None` when there is no such object.
    pub async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<(Incoming, Option<u64>)>, StorageError> {
        let key = self.key(key);
        let url = self.bucket.get_object(self.creds(), &key).sign(SIGNED_FOR);
        let headers = if range.is_empty() {
            Vec::new()
        } else {
            vec![("range", format!("bytes={}-{}", range.start, range.end - 1))]
        };
        let resp = self.send(Method::GET, url, &headers, None).await?;
        match resp.status() {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => {
                let len = resp
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                Ok(Some((resp.into_body(), len)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Self::refused(&format!("GET {key}"), resp).await),
        }
    }

    /// A presigned URL any client may fetch `key` from, for `valid` seconds.
    pub fn presigned_get(&self, key: &str, valid: Duration) -> url::Url {
        self.bucket.get_object(self.creds(), &self.key(key)).sign(valid)
    }

    /// The size of `key`; `None` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let key = self.key(key);
        let url = self.bucket.head_object(self.creds(), &key).sign(SIGNED_FOR);
        let resp = self.send(Method::HEAD, url, &[], None).await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(
                resp.headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(failed(&format!("HEAD {key}"), s)),
        }
    }

    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let key = self.key(key);
        let url = self.bucket.put_object(self.creds(), &key).sign(SIGNED_FOR);
        let resp = self.send(Method::PUT, url, &[], Some(data)).await?;
        if resp.status().is_success() {
            drain(resp).await;
            Ok(())
        } else {
            Err(Self::refused(&format!("PUT {key}"), resp).await)
        }
    }

    /// Removes `key` (no error when it is not there).
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key = self.key(key);
        let url = self.bucket.delete_object(self.creds(), &key).sign(SIGNED_FOR);
        let resp = self.send(Method::DELETE, url, &[], None).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            drain(resp).await;
            Ok(())
        } else {
            Err(Self::refused(&format!("DELETE {key}"), resp).await)
        }
    }

    /// A server-side copy of `from` to `to` (objects of at most 5 GiB).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StorageError> {
        let (from, to) = (self.key(from), self.key(to));
        let source = format!("/{}/{}", self.bucket.name(), encode_key(&from));
        let mut action = self.bucket.put_object(self.creds(), &to);
        action.headers_mut().insert("x-amz-copy-source", source.clone());
        let url = action.sign(SIGNED_FOR);
        let resp = self
            .send(Method::PUT, url, &[("x-amz-copy-source", source)], None)
            .await?;
        let what = format!("copying {from} to {to}");
        Self::answer(&what, resp).await.map(|_| ())
    }

    /// A server-side copy of `from` (`size` bytes) to `to`: one request up
    /// to the 5 GiB a single copy may take, a multipart copy of 1 GiB parts
    /// beyond.
    pub async fn copy_sized(&self, from: &str, to: &str, size: u64) -> Result<(), StorageError> {
        if size <= MAX_SINGLE_COPY {
            return self.copy(from, to).await;
        }
        let id = self.create_multipart(to).await?;
        let result = self.copy_parts(from, to, &id, size).await;
        if result.is_err() {
            let _ = self.abort_multipart(to, &id).await;
        }
        result
    }

    async fn copy_parts(&self, from: &str, to: &str, id: &str, size: u64) -> Result<(), StorageError> {
        let source = format!("/{}/{}", self.bucket.name(), encode_key(&self.key(from)));
        let target = self.key(to);
        let mut etags = Vec::new();
        let mut start = 0u64;
        while start < size {
            let end = (start + COPY_PART).min(size);
            let number = u16::try_from(etags.len() + 1).map_err(|_| failed("copying", "too many parts"))?;
            let range = format!("bytes={}-{}", start, end - 1);
            let mut action = self.bucket.upload_part(self.creds(), &target, number, id);
            action.headers_mut().insert("x-amz-copy-source", source.clone());
            action.headers_mut().insert("x-amz-copy-source-range", range.clone());
            let url = action.sign(SIGNED_FOR);
            let headers = [
                ("x-amz-copy-source", source.clone()),
                ("x-amz-copy-source-range", range),
            ];
            let resp = self.send(Method::PUT, url, &headers, None).await?;
            let what = format!("copying part {number} of {target}");
            if !resp.status().is_success() {
                return Err(Self::refused(&what, resp).await);
            }
            let body = read_limited(resp.into_body(), MAX_ERROR_BODY)
                .await
                .map_err(|e| failed(&what, e))?;
            let text = String::from_utf8_lossy(&body);
            let etag = between(&text, "<ETag>", "</ETag>").ok_or_else(|| failed(&what, "no ETag in the answer"))?;
            etags.push(etag.replace("&quot;", "\""));
            start = end;
        }
        self.complete_multipart(to, id, &etags).await
    }

    /// Every object under `prefix` (the storage's own prefix is added and
    /// taken away), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        self.list_after(prefix, None, usize::MAX).await
    }

    /// Up to `max` objects under `prefix` after key `after`, in key order.
    pub async fn list_after(&self, prefix: &str, after: Option<&str>, max: usize) -> Result<Vec<Listed>, StorageError> {
        let full = self.key(prefix);
        let after = after.map(|a| self.key(a));
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(self.creds());
            action.with_prefix(full.clone());
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            } else if let Some(a) = &after {
                action.with_start_after(a.clone());
            }
            action.with_max_keys(1000.min(max.saturating_sub(out.len())).max(1));
            let url = action.sign(SIGNED_FOR);
            let resp = self.send(Method::GET, url, &[], None).await?;
            let what = format!("listing {full}");
            if resp.status() != StatusCode::OK {
                return Err(Self::refused(&what, resp).await);
            }
            let body = read_limited(resp.into_body(), 64 << 20)
                .await
                .map_err(|e| failed(&what, e))?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(|e| failed(&what, e))?;
            for c in page.contents {
                // Listings ask for `encoding-type=url` (rusty-s3 does):
                // stores that honour it (radosgw) send keys percent-encoded.
                let decoded = percent_encoding::percent_decode_str(&c.key).decode_utf8_lossy();
                let Some(key) = decoded.strip_prefix(&self.prefix) else {
                    continue;
                };
                let modified = c
                    .last_modified
                    .parse::<jiff::Timestamp>()
                    .map(SystemTime::from)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(Listed {
                    key: key.to_string(),
                    size: c.size,
                    modified,
                });
            }
            token = page.next_continuation_token;
            if token.is_none() || out.len() >= max {
                return Ok(out);
            }
        }
    }

    /// Starts a multipart upload to `key`; its id.
    pub async fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        let key = self.key(key);
        let url = self.bucket.create_multipart_upload(self.creds(), &key).sign(SIGNED_FOR);
        let resp = self.send(Method::POST, url, &[], None).await?;
        let what = format!("starting a multipart upload of {key}");
        let body = Self::answer(&what, resp).await?;
        let r = rusty_s3::actions::CreateMultipartUpload::parse_response(&body).map_err(|e| failed(&what, e))?;
        Ok(r.upload_id().to_string())
    }

    /// Uploads part `number` (from 1) of upload `id`; its ETag.
    pub async fn upload_part(&self, key: &str, id: &str, number: u16, data: Bytes) -> Result<String, StorageError> {
        let key = self.key(key);
        let url = self.bucket.upload_part(self.creds(), &key, number, id).sign(SIGNED_FOR);
        let resp = self.send(Method::PUT, url, &[], Some(data)).await?;
        let what = format!("uploading part {number} of {key}");
        if !resp.status().is_success() {
            return Err(Self::refused(&what, resp).await);
        }
        let etag = resp
            .headers()
            .get(hyper::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| failed(&what, "no ETag in the answer"))?;
        drain(resp).await;
        Ok(etag)
    }

    /// Ends upload `id` as object `key` made of `etags`' parts, in order.
    pub async fn complete_multipart(&self, key: &str, id: &str, etags: &[String]) -> Result<(), StorageError> {
        let key = self.key(key);
        let action = self
            .bucket
            .complete_multipart_upload(self.creds(), &key, id, etags.iter().map(String::as_str));
        let url = action.sign(SIGNED_FOR);
        let body = action.body();
        let resp = self.send(Method::POST, url, &[], Some(Bytes::from(body))).await?;
        let what = format!("completing the multipart upload of {key}");
        Self::answer(&what, resp).await.map(|_| ())
    }

    /// Abandons upload `id` and its parts.
    pub async fn abort_multipart(&self, key: &str, id: &str) -> Result<(), StorageError> {
        let key = self.key(key);
        let url = self
            .bucket
            .abort_multipart_upload(self.creds(), &key, id)
            .sign(SIGNED_FOR);
        let resp = self.send(Method::DELETE, url, &[], None).await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            drain(resp).await;
            Ok(())
        } else {
            Err(Self::refused(&format!("aborting the multipart upload of {key}"), resp).await)
        }
    }
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(mut body: Incoming, limit: usize) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(d) = frame.into_data() {
            if buf.len() + d.len() > limit {
                return Err(format!("more than {limit} bytes"));
            }
            buf.extend_from_slice(&d);
        }
    }
    Ok(buf.freeze())
}

/// Reads what is left of an answer so its connection can be reused.
async fn drain(resp: hyper::Response<Incoming>) {
    let _ = read_limited(resp.into_body(), MAX_ERROR_BODY).await;
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

/// A key as the `x-amz-copy-source` header wants it (each segment
/// percent-encoded, `/` kept).
fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|s| {
            url::form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A signed URL without its signature, for messages.
fn redact(u: &url::Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

/// The certificates of `AWS_CA_BUNDLE`, when it names a readable PEM
/// file; else none (an unreadable or empty one is passed over: the system
/// store and `certs.d` still apply).
fn ca_bundle_from_environment() -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
    let path = std::env::var_os("AWS_CA_BUNDLE").filter(|p| !p.is_empty())?;
    gantry_http::trust::pem_certificates(std::path::Path::new(&path)).ok()
}

/// The credentials as AWS tools find them: `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), else the profile
/// `AWS_PROFILE` (or `default`) of the shared credentials file
/// (`AWS_SHARED_CREDENTIALS_FILE`, or `~/.aws/credentials`); `None` signs
/// nothing (a public bucket).
pub fn credentials_from_environment() -> Result<Option<Credentials>, StorageError> {
    if let Some(c) = Credentials::from_env() {
        return Ok(Some(c));
    }
    let path = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => std::path::Path::new(&h).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(&format!("reading {}", path.display()), e)),
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    Ok(profile_credentials(&text, &profile))
}

/// The keys of `[profile]` in a shared credentials file's text.
fn profile_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let (mut here, mut key, mut secret, mut token) = (false, None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            here = name.trim() == profile;
            continue;
        }
        if !here {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (key, secret, token) {
        (Some(k), Some(s), Some(t)) => Some(Credentials::new_with_token(k, s, t)),
        (Some(k), Some(s), None) => Some(Credentials::new(k, s)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_is_read_from_its_own_section_only() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[other]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n";
        let d = profile_credentials(text, "default").unwrap();
        assert_eq!((d.key(), d.secret(), d.token()), ("A", "B", None));
        let o = profile_credentials(text, "other").unwrap();
        assert_eq!((o.key(), o.secret(), o.token()), ("C", "D", Some("E")));
        assert!(profile_credentials(text, "missing").is_none());
    }

    #[test]
    fn copy_sources_keep_slashes_and_encode_the_rest() {
        assert_eq!(encode_key("p/blobs/sha256/ab"), "p/blobs/sha256/ab");
        assert_eq!(encode_key("a b/c+d"), "a%20b/c%2Bd");
    }
}
