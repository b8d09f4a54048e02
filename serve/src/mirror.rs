//! `serve --mirror-of`: a pull-through cache in front of other registries,
//! as distribution's proxy mode and the v1 registry's `source_lookup` work.
//!
//! - A request is answered from the local [`FsStorage`] when it can be;
//!   on a miss the upstream is asked, and what it sends is streamed to the
//!   client while it is written to an ingest file.
//! - Nothing becomes visible before it hashed to its digest: a blob is
//!   renamed into place only then, and the client's last chunk is held back
//!   until the check passed — a lying upstream's bytes are never cached
//!   and never reach a client whole.
//! - Manifests by digest are kept for good; tag answers for `tag_ttl`, and
//!   a stale tag answer is served when the upstream cannot be reached.
//! - Two clients asking for the same missing blob cause one upstream
//!   fetch: the second waits for the first and is served from the cache.
//! - Upstreams are chosen by name prefix (`--mirror-of docker=https://…`
//!   serves `docker/library/alpine` from that registry's `library/alpine`);
//!   one upstream may take every other name. Docker Hub's one-component
//!   names get `library/`. Bearer tokens are fetched anonymously.

use crate::fs_storage::FsStorage;
use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use bytes::Bytes;
use gantry_core::digest::Digest;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What manifests are asked for upstream.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The largest manifest taken from an upstream.
const MAX_MANIFEST: usize = 4 << 20;

/// One upstream registry and the names it serves.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Names under `prefix/` go to this upstream, without the prefix;
    /// `None` takes every name no prefix matched.
    pub prefix: Option<String>,
    /// `scheme://host[:port]`
    pub base: String,
}

impl Upstream {
    /// `URL` or `NAME=URL`.
    pub fn parse(s: &str) -> Result<Upstream, String> {
        let (prefix, url) = match s.split_once('=') {
            Some((p, u)) => (Some(p.to_string()), u),
            None => (None, s),
        };
        if let Some(p) = &prefix {
            if !gantry_core::reference::valid_repository(p) {
                return Err(format!("invalid mirror prefix {}", gantry_core::text::escape_line(p)));
            }
        }
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("invalid upstream URL {}", gantry_core::text::escape_line(url)))?;
        let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
            return Err(format!(
                "upstream URL {} needs http:// or https:// and a host",
                gantry_core::text::escape_line(url)
            ));
        };
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "upstream URL {} needs http:// or https://",
                gantry_core::text::escape_line(url)
            ));
        }
        Ok(Upstream {
            prefix,
            base: format!("{scheme}://{auth}"),
        })
    }

    fn is_docker_hub(&self) -> bool {
        self.base.ends_with("://registry-1.docker.io") || self.base.ends_with("://docker.io")
    }
}

type HttpClient =
    Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Empty<Bytes>>;

pub struct Mirror {
    local: Arc<FsStorage>,
    upstreams: Vec<Upstream>,
    client: HttpClient,
    tag_ttl: Duration,
    /// Blobs being fetched: followers wait for `Some(fetched)`.
    inflight: Mutex<HashMap<Digest, tokio::sync::watch::Receiver<Option<bool>>>>,
    /// Bearer tokens by upstream and scope.
    tokens: Mutex<HashMap<(String, String), String>>,
}

fn upstream_err(msg: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("upstream: {msg}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Mirror {
    pub fn new(local: Arc<FsStorage>, upstreams: Vec<Upstream>, tag_ttl: Duration) -> Mirror {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Mirror {
            local,
            upstreams,
            client: Client::builder(TokioExecutor::new()).build(https),
            tag_ttl,
            inflight: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn local(&self) -> &FsStorage {
        &self.local
    }

    /// Whether some upstream serves `repo`.
    pub fn serves(&self, repo: &str) -> bool {
        self.route(repo).is_some()
    }

    /// The upstream for `repo` and the name it knows the repository by.
    fn route(&self, repo: &str) -> Option<(&Upstream, String)> {
        let prefixed = self.upstreams.iter().find_map(|u| {
            let p = u.prefix.as_ref()?;
            let rest = repo.strip_prefix(p.as_str())?.strip_prefix('/')?;
            Some((u, rest.to_string()))
        });
        let (u, name) = prefixed.or_else(|| {
            self.upstreams
                .iter()
                .find(|u| u.prefix.is_none())
                .map(|u| (u, repo.to_string()))
        })?;
        let name = if u.is_docker_hub() && !name.contains('/') {
            format!("library/{name}")
        } else {
            name
        };
        Some((u, name))
    }

    /// Sends a request upstream, with a bearer token when the upstream asks
    /// for one, following redirects (the token only to the upstream itself).
    async fn send(
        &self,
        up: &Upstream,
        method: Method,
        path: &str,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, StorageError> {
        let mut url = format!("{}{path}", up.base);
        let mut authorised_once = false;
        for _ in 0..6 {
            let own = url.starts_with(&format!("{}/", up.base));
            let mut req = Request::builder().method(method.clone()).uri(&url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if own {
                if let Some(t) = self.tokens.lock().unwrap().get(&(up.base.clone(), scope.to_string())) {
                    req = req.header(AUTHORIZATION, format!("Bearer {t}"));
                }
            }
            let req = req.body(Empty::new()).map_err(upstream_err)?;
            let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
                .await
                .map_err(|_| upstream_err(format!("{} did not answer in time", up.base)))?
                .map_err(|e| upstream_err(format!("{}: {e}", up.base)))?;
            match resp.status() {
                StatusCode::UNAUTHORIZED if own && !authorised_once => {
                    authorised_once = true;
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    self.fetch_token(up, &challenge, scope).await?;
                }
                s if s.is_redirection() => {
                    let Some(loc) = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) else {
                        return Ok(resp);
                    };
                    url = if loc.starts_with('/') {
                        format!("{}{loc}", up.base)
                    } else {
                        loc.to_string()
                    };
                }
                _ => return Ok(resp),
            }
        }
        Err(upstream_err("too many redirects"))
    }

    /// An anonymous bearer token for `scope` (distribution's token flow).
    async fn fetch_token(&self, up: &Upstream, challenge: &str, scope: &str) -> Result<(), StorageError> {
        let params = parse_challenge(challenge).ok_or_else(|| upstream_err("401 without a Bearer challenge"))?;
        let realm = params
            .get("realm")
            .ok_or_else(|| upstream_err("Bearer challenge without a realm"))?;
        let mut url = format!("{realm}?scope={}", encode(scope));
        if let Some(s) = params.get("service") {
            url.push_str(&format!("&service={}", encode(s)));
        }
        let req = Request::get(&url).body(Empty::new()).map_err(upstream_err)?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| upstream_err("the token service did not answer in time"))?
            .map_err(|e| upstream_err(format!("token service: {e}")))?;
        if !resp.status().is_success() {
            return Err(upstream_err(format!("token service answered {}", resp.status())));
        }
        let body = read_limited(resp.into_body(), 64 << 10).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| upstream_err("token is not JSON"))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| upstream_err("token response without a token"))?;
        self.tokens
            .lock()
            .unwrap()
            .insert((up.base.clone(), scope.to_string()), token.to_string());
        Ok(())
    }

    /// A manifest: from the cache when fresh (or the upstream is down),
    /// else from the upstream, verified and kept.
    pub async fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        let cached = self.local.manifest(repo, reference)?;
        let stale = match reference {
            ManifestRef::Digest(_) => {
                if cached.is_some() {
                    return Ok(cached);
                }
                None
            }
            ManifestRef::Tag(t) => match (self.local.tag(repo, t)?, cached) {
                (Some(e), Some(m)) if now_secs().saturating_sub(e.fetched) < self.tag_ttl.as_secs() => {
                    return Ok(Some(m));
                }
                (_, c) => c,
            },
        };
        let Some((up, name)) = self.route(repo) else {
            return Ok(stale);
        };
        let wanted = match reference {
            ManifestRef::Tag(t) => t.clone(),
            ManifestRef::Digest(d) => d.to_string(),
        };
        let fetched = async {
            let resp = self
                .send(
                    up,
                    Method::GET,
                    &format!("/v2/{name}/manifests/{wanted}"),
                    Some(ACCEPT_MANIFESTS),
                    &format!("repository:{name}:pull"),
                )
                .await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(None),
                s => return Err(upstream_err(format!("{} answered {s}", up.base))),
            }
            let media_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/vnd.oci.image.manifest.v1+json")
                .to_string();
            let claimed = resp
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_limited(resp.into_body(), MAX_MANIFEST).await?;
            let digest = Digest::of(&bytes);
            if let ManifestRef::Digest(d) = reference {
                if *d != digest {
                    return Err(upstream_err(format!("sent a manifest for {d} that is {digest}")));
                }
            }
            if claimed.is_some_and(|c| c != digest.as_str()) {
                return Err(upstream_err(format!("claimed another digest for manifest {digest}")));
            }
            Ok(Some(Manifest {
                media_type,
                digest,
                bytes: Bytes::from(bytes),
            }))
        };
        match fetched.await {
            Ok(Some(m)) => {
                let tag = match reference {
                    ManifestRef::Tag(t) => Some(t.as_str()),
                    ManifestRef::Digest(_) => None,
                };
                self.local.put_manifest(repo, &m, tag)?;
                Ok(Some(m))
            }
            Ok(None) => Ok(None),
            // The upstream is down or misbehaving: a stale answer beats none.
            Err(e) => match stale {
                Some(m) => Ok(Some(m)),
                None => Err(e),
            },
        }
    }

    /// A blob's size: cached, else asked upstream (`HEAD`).
    pub async fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StorageError> {
        if let Some(n) = self.local.blob_size(repo, digest)? {
            return Ok(Some(n));
        }
        let Some((up, name)) = self.route(repo) else {
            return Ok(None);
        };
        let resp = self
            .send(
                up,
                Method::HEAD,
                &format!("/v2/{name}/blobs/{digest}"),
                None,
                &format!("repository:{name}:pull"),
            )
            .await?;
        match resp.status() {
            StatusCode::OK => Ok(resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(upstream_err(format!("{} answered {s}", up.base))),
        }
    }

    /// A whole blob: from the cache, else streamed from the upstream while
    /// it is cached (or, when another client's fetch of it is under way,
    /// from the cache once that is done). Returns its size and body.
    pub async fn stream(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<(u64, BlobBody)>, StorageError> {
        if let Some(n) = self.local.blob_size(repo, digest)? {
            return Ok(self.local.blob(repo, digest, 0..n)?.map(|b| (n, b)));
        }
        match self.join_or_lead(repo, digest) {
            Ok((head_rx, body_rx)) => match head_rx.await {
                Ok(Ok(Some(size))) => Ok(Some((size, ChannelBody { rx: body_rx }.boxed()))),
                Ok(Ok(None)) => Ok(None),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(upstream_err(format!("the fetch of blob {digest} ended early"))),
            },
            Err(rx) => {
                if !wait(rx).await {
                    return Err(upstream_err(format!("could not fetch blob {digest}")));
                }
                let Some(n) = self.local.blob_size(repo, digest)? else {
                    return Ok(None);
                };
                Ok(self.local.blob(repo, digest, 0..n)?.map(|b| (n, b)))
            }
        }
    }

    /// The bytes `range` of a blob: from the cache, once it is there.
    pub async fn blob(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Option<BlobBody>, StorageError> {
        if let Some(b) = self.local.blob(repo, digest, range.clone())? {
            return Ok(Some(b));
        }
        let rx = match self.join_or_lead(repo, digest) {
            // Nobody reads the streamed copy: the fetch only fills the cache.
            Ok((_, _)) => self.inflight.lock().unwrap().get(digest).cloned(),
            Err(rx) => Some(rx),
        };
        if let Some(rx) = rx {
            if !wait(rx).await {
                return Err(upstream_err(format!("could not fetch blob {digest}")));
            }
        }
        self.local.blob(repo, digest, range)
    }

    /// Starts fetching `digest` unless a fetch is under way: the leader gets
    /// the upstream's answer (the size, `None` for unknown) and the bytes;
    /// a follower gets what to wait on.
    #[allow(clippy::type_complexity)]
    fn join_or_lead(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
    ) -> Result<
        (
            tokio::sync::oneshot::Receiver<Result<Option<u64>, StorageError>>,
            tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
        ),
        tokio::sync::watch::Receiver<Option<bool>>,
    > {
        let done = {
            let mut inflight = self.inflight.lock().unwrap();
            if let Some(rx) = inflight.get(digest) {
                return Err(rx.clone());
            }
            let (tx, rx) = tokio::sync::watch::channel(None);
            inflight.insert(digest.clone(), rx);
            tx
        };
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        let (body_tx, body_rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        let (repo, digest) = (repo.to_string(), digest.clone());
        tokio::spawn(async move {
            let ok = me.fetch_blob(&repo, &digest, head_tx, body_tx).await;
            me.inflight.lock().unwrap().remove(&digest);
            let _ = done.send(Some(ok));
        });
        Ok((head_rx, body_rx))
    }

    /// Fetches a blob into the cache, passing its bytes to `client` (if it
    /// is still listening); the last chunk goes only after the digest
    /// checked out. Returns whether the blob is now cached.
    async fn fetch_blob(
        &self,
        repo: &str,
        digest: &Digest,
        head: tokio::sync::oneshot::Sender<Result<Option<u64>, StorageError>>,
        client: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> bool {
        let fail = |msg: String| {
            let client = client.clone();
            async move {
                let _ = client.send(Err(std::io::Error::other(msg))).await;
                false
            }
        };
        let Some((up, name)) = self.route(repo) else {
            let _ = head.send(Ok(None));
            return false;
        };
        let answered = self
            .send(
                up,
                Method::GET,
                &format!("/v2/{name}/blobs/{digest}"),
                None,
                &format!("repository:{name}:pull"),
            )
            .await;
        let resp = match answered {
            Ok(r) if r.status() == StatusCode::OK => r,
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                let _ = head.send(Ok(None));
                return false;
            }
            Ok(r) => {
                let _ = head.send(Err(upstream_err(format!("{} answered {}", up.base, r.status()))));
                return false;
            }
            Err(e) => {
                let _ = head.send(Err(e));
                return false;
            }
        };
        let Some(size) = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            let _ = head.send(Err(upstream_err(format!(
                "{} sent blob {digest} without its length",
                up.base
            ))));
            return false;
        };
        let _ = head.send(Ok(Some(size)));
        let mut ingest = match self.local.ingest() {
            Ok(i) => i,
            Err(e) => return fail(e.to_string()).await,
        };
        let mut body = resp.into_body();
        let mut held: Option<Bytes> = None;
        let mut listening = true;
        loop {
            let frame = match tokio::time::timeout(Duration::from_secs(60), body.frame()).await {
                Err(_) => return fail("upstream stalled".into()).await,
                Ok(None) => break,
                Ok(Some(Err(e))) => return fail(format!("upstream: {e}")).await,
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else { continue };
            if ingest.len() + data.len() as u64 > size {
                return fail(format!("upstream sent more than the {size} bytes of blob {digest}")).await;
            }
            if let Err(e) = ingest.write(&data) {
                return fail(e.to_string()).await;
            }
            if let Some(prev) = held.replace(data) {
                if listening && client.send(Ok(prev)).await.is_err() {
                    // The client left; the cache still gets the blob.
                    listening = false;
                }
            }
        }
        if let Err(e) = self.local.commit_blob(repo, ingest, digest) {
            return fail(e.to_string()).await;
        }
        if let Some(last) = held {
            if listening {
                let _ = client.send(Ok(last)).await;
            }
        }
        true
    }
}

/// Waits for a fetch to end; whether it cached the blob.
async fn wait(mut rx: tokio::sync::watch::Receiver<Option<bool>>) -> bool {
    loop {
        if let Some(ok) = *rx.borrow() {
            return ok;
        }
        if rx.changed().await.is_err() {
            return rx.borrow().unwrap_or(false);
        }
    }
}

/// A body fed by a channel: what a fetch sends, as it arrives.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Reads a body of at most `max` bytes.
async fn read_limited(mut body: hyper::body::Incoming, max: usize) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .map_err(|_| upstream_err("stalled"))?
    {
        let frame = frame.map_err(|e| upstream_err(e.to_string()))?;
        if let Ok(d) = frame.into_data() {
            if out.len() + d.len() > max {
                return Err(upstream_err(format!("answer larger than {max} bytes")));
            }
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

/// `Bearer realm="…",service="…",scope="…"` as a map.
fn parse_challenge(h: &str) -> Option<HashMap<String, String>> {
    let rest = h
        .trim()
        .strip_prefix("Bearer ")
        .or_else(|| h.trim().strip_prefix("bearer "))?;
    let mut out = HashMap::new();
    let mut s = rest;
    while !s.is_empty() {
        let (k, v) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, next) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match v.find(',') {
                Some(i) => (&v[..i], &v[i..]),
                None => (v, ""),
            }
        };
        out.insert(k, val.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse() {
        let m = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(m["realm"], "https://auth.docker.io/token");
        assert_eq!(m["service"], "registry.docker.io");
        assert_eq!(m["scope"], "repository:library/alpine:pull");
        assert!(parse_challenge("Basic realm=x").is_none());
    }

    #[test]
    fn names_route_by_prefix_and_docker_hub_gets_library() {
        let ups = vec![
            Upstream::parse("docker=https://registry-1.docker.io").unwrap(),
            Upstream::parse("http://127.0.0.1:5000").unwrap(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(FsStorage::open(dir.path(), true).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let m = Mirror::new(local, ups, Duration::from_secs(60));
        let (u, n) = m.route("docker/alpine").unwrap();
        assert_eq!(
            (u.base.as_str(), n.as_str()),
            ("https://registry-1.docker.io", "library/alpine")
        );
        let (u, n) = m.route("team/app").unwrap();
        assert_eq!((u.base.as_str(), n.as_str()), ("http://127.0.0.1:5000", "team/app"));
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("../x=http://a").is_err());
    }
}
