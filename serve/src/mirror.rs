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
//! - The upstream is untrusted. Every hop (redirects, the token realm)
//!   passes the core's [`HopPolicy`], the rules the pull path follows, with
//!   one difference: what an upstream's redirect fetches is handed to this
//!   server's clients, so an upstream on an internal address may not send
//!   the mirror to another internal one unless its `redirect_hosts` names
//!   it. The token goes only to the upstream's own origin.
//! - A blob cached for one repository is served to another only once the
//!   upstream confirmed that repository holds it (distribution's proxy
//!   asks under the name asked for); one fetch serves both.
//! - Every fetch is capped in size (`max_blob`), a fetch no client waits
//!   for any more is dropped, and every map a client's choice of names
//!   fills (tokens per scope, fetches in flight) is bounded.

use crate::fs_storage::FsStorage;
use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use bytes::Bytes;
use gantry_core::digest::Digest;
use gantry_core::endpoint::{registry_config, HopPolicy, Reach, Registries, MAX_REDIRECTS};
use gantry_core::text::{escape_line, redact_url};
use gantry_http::body::ChannelBody;
use gantry_http::client::{self, chain, domain_of, origin, HopError, Outbound};
use gantry_http::Network;
use http_body_util::BodyExt;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, StatusCode, Uri};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What manifests are asked for upstream.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The types a manifest is stored and served as.
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The type a manifest from an upstream is kept as: the upstream's
/// `Content-Type` when it is a manifest type, else the document's own
/// `mediaType`; `None` when neither is (it is not served at all).
fn manifest_type(content_type: Option<&str>, bytes: &[u8]) -> Option<&'static str> {
    let known = |t: &str| {
        MANIFEST_TYPES
            .iter()
            .copied()
            .find(|k| k.eq_ignore_ascii_case(t.trim()))
    };
    if let Some(t) = content_type.and_then(|c| known(c.split(';').next().unwrap_or(""))) {
        return Some(t);
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let doc: Doc = serde_json::from_slice(bytes).ok()?;
    known(doc.media_type.as_deref()?)
}

/// The largest manifest taken from an upstream.
const MAX_MANIFEST: usize = 4 << 20;

/// Bounds of the token cache: entries, and bytes of keys and tokens.
const MAX_TOKENS: usize = 1024;
const MAX_TOKEN_BYTES: usize = 4 << 20;

/// Bounds of the tag answers kept: entries, and bytes of the manifests
/// they name. Past them the oldest answer is forgotten (its tag file
/// removed; the manifest stays as content, by digest).
const MAX_TAG_ANSWERS: usize = 10_000;
const MAX_TAG_ANSWER_BYTES: usize = 1 << 30;

/// How long a token is kept when its answer says nothing (distribution's
/// default lifetime), and at most.
const TOKEN_TTL: Duration = Duration::from_secs(60);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// How long an upstream may take to answer, and to send the next piece.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

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

/// How a mirror fetches, and its bounds.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// How long a tag answer is used before the upstream is asked again.
    pub tag_ttl: Duration,
    /// The largest blob fetched from an upstream (bytes).
    pub max_blob: u64,
    /// Blob fetches under way at once (each distinct digest is one).
    pub max_fetches: usize,
    /// The config's registry tables: an upstream's `redirect_hosts`, and
    /// which hosts may be reached over plain HTTP.
    pub registries: Registries,
    /// Trust, client certificates and proxies for the upstreams.
    pub network: Arc<Network>,
}

/// The documented default cap on one fetched blob: 64 GiB, as for a layer.
pub const DEFAULT_MAX_BLOB: u64 = 64 << 30;
/// The documented default number of blob fetches at once.
pub const DEFAULT_MAX_FETCHES: usize = 64;

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            tag_ttl: Duration::from_secs(60),
            max_blob: DEFAULT_MAX_BLOB,
            max_fetches: DEFAULT_MAX_FETCHES,
            registries: Registries::new(),
            network: Arc::new(Network::from_env()),
        }
    }
}

/// How a blob fetch ended, for those waiting on it.
#[derive(Debug, Clone)]
enum Outcome {
    Cached,
    Missing,
    Failed(String),
}

type Done = tokio::sync::watch::Receiver<Option<Outcome>>;
type Head = tokio::sync::oneshot::Receiver<Result<Option<u64>, StorageError>>;
type Chunks = tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>;

/// A fetch under way: for which repository, and what it ends with.
struct Inflight {
    repo: String,
    done: Done,
}

/// What [`Mirror::join_or_lead`] hands back.
enum Joined {
    /// This request started the fetch: the upstream's answer (the size,
    /// `None` for unknown), the bytes as they come, and its end.
    Lead { head: Head, body: Chunks, done: Done },
    /// Another request's fetch (for `repo`) is under way.
    Follow { repo: String, done: Done },
}

/// What the cache holds for a repository's blob.
enum Lookup {
    /// Linked to the repository (now): its size.
    Hit(u64),
    /// The upstream says the repository does not hold it.
    Missing,
    /// Not stored at all.
    Miss,
}

pub struct Mirror {
    local: Arc<FsStorage>,
    upstreams: Vec<Upstream>,
    /// The outbound clients (one per reach: the resolver keeps only what
    /// a hop may reach), shared code with the plugin host's.
    clients: Outbound,
    options: MirrorOptions,
    /// Blobs being fetched, by digest.
    inflight: Mutex<HashMap<Digest, Inflight>>,
    /// Bearer tokens by upstream and scope, until they expire.
    tokens: Mutex<Bounded<(String, String), (String, Instant)>>,
    /// The tag answers on disk (repository, tag), oldest first.
    tags: Mutex<Bounded<(String, String), ()>>,
    stats: crate::metrics::MirrorStats,
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
    pub fn new(local: Arc<FsStorage>, upstreams: Vec<Upstream>, options: MirrorOptions) -> Mirror {
        let tags = Mutex::new(Bounded::new(MAX_TAG_ANSWERS, MAX_TAG_ANSWER_BYTES));
        let mirror = Mirror {
            local,
            upstreams,
            clients: Outbound::new(options.network.clone()),
            options,
            inflight: Mutex::new(HashMap::new()),
            tokens: Mutex::new(Bounded::new(MAX_TOKENS, MAX_TOKEN_BYTES)),
            tags,
            stats: Default::default(),
        };
        mirror.index_tags();
        mirror
    }

    /// The cache's hits and misses and the upstream requests, so far.
    pub fn stats(&self) -> &crate::metrics::MirrorStats {
        &self.stats
    }

    /// Counts the tag answers a previous run left, oldest first, so the
    /// bound holds across restarts.
    fn index_tags(&self) {
        let mut found = Vec::new();
        for repo in self.local.catalog().unwrap_or_default() {
            for tag in self.local.tags(&repo).ok().flatten().unwrap_or_default() {
                if let Ok(Some(e)) = self.local.tag(&repo, &tag) {
                    let size = self.local.blob_size(&repo, &e.digest).ok().flatten().unwrap_or(0);
                    found.push((e.fetched, repo.clone(), tag, size));
                }
            }
        }
        found.sort();
        for (_, repo, tag, size) in found {
            self.remember_tag(&repo, &tag, size);
        }
    }

    /// Records a tag answer just stored, forgetting the oldest past the bounds.
    fn remember_tag(&self, repo: &str, tag: &str, manifest_size: u64) {
        let size = repo.len() + tag.len() + usize::try_from(manifest_size).unwrap_or(usize::MAX);
        let evicted = self
            .tags
            .lock()
            .unwrap()
            .insert((repo.to_string(), tag.to_string()), (), size);
        for (r, t) in evicted {
            let _ = self.local.delete_tag(&r, &t);
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

    /// The hop policy of one request chain to `base` (the mirror's rule:
    /// no internal redirects beyond the upstream's own host and its list).
    fn hops(&self, base: &url::Url) -> HopPolicy {
        HopPolicy::new(
            base.host_str().unwrap_or(""),
            registry_config(&domain_of(base), &self.options.registries),
            false,
        )
    }

    /// Checks one hop and picks the client that carries it out: the
    /// address by the hop policy, the scheme (plain HTTP to the upstream's
    /// own origin as configured, to loopback, or to hosts marked insecure).
    fn hop(&self, hops: &HopPolicy, base: &url::Url, u: &url::Url) -> Result<Reach, StorageError> {
        let plain_ok = origin(u) == origin(base) || client::plain_http_allowed(u, &self.options.registries);
        let reach = client::check_hop(hops, u, plain_ok).map_err(|e| match e {
            HopError::Address { .. } => upstream_err(e),
            HopError::PlainHttp { url, .. } => upstream_err(format!("{url} may not be reached over http")),
            HopError::Scheme { url, scheme } => {
                upstream_err(format!("{url} may not be reached over {}", escape_line(&scheme)))
            }
        })?;
        Ok(reach)
    }

    /// Sends a request upstream, with a bearer token when the upstream asks
    /// for one, following redirects hop by hop (the token only to the
    /// upstream's own origin, and never once the chain left it).
    async fn send(
        &self,
        up: &Upstream,
        method: Method,
        path: &str,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, StorageError> {
        let base = url::Url::parse(&up.base).map_err(|e| upstream_err(format!("{}: {e}", up.base)))?;
        let mut u = base
            .join(path)
            .map_err(|e| upstream_err(format!("{}: {e}", escape_line(path))))?;
        self.stats.upstream_fetches.inc();
        let mut hops = self.hops(&base);
        let mut left = false;
        let mut authorised_once = false;
        for _ in 0..=MAX_REDIRECTS + 1 {
            let reach = self.hop(&hops, &base, &u)?;
            let own = !left && origin(&u) == origin(&base);
            let mut req = Request::builder().method(method.clone()).uri(u.as_str());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if own {
                if let Some(t) = self.token(&up.base, scope) {
                    req = req.header(AUTHORIZATION, format!("Bearer {t}"));
                }
            }
            let req = req.body(client::empty()).map_err(upstream_err)?;
            let resp = tokio::time::timeout(ANSWER_TIMEOUT, self.clients.request(reach, req))
                .await
                .map_err(|_| upstream_err(format!("{} did not answer in time", redact_url(&origin(&u)))))?
                .map_err(|e| upstream_err(format!("{}: {}", redact_url(&origin(&u)), escape_line(&chain(&e)))))?;
            client::learn_registry_address(&mut hops, &u, &resp);
            match resp.status() {
                StatusCode::UNAUTHORIZED if own && !authorised_once => {
                    authorised_once = true;
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    self.fetch_token(up, &hops, &base, &challenge, scope).await?;
                }
                _ => match client::redirect(&u, method.as_str(), &resp).map_err(upstream_err)? {
                    Some(next) => {
                        left |= next.leaves_origin;
                        u = next.to;
                    }
                    None => return Ok(resp),
                },
            }
        }
        Err(upstream_err(format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// A cached token for `scope`, unless it expired.
    fn token(&self, base: &str, scope: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap();
        let key = (base.to_string(), scope.to_string());
        match tokens.get(&key) {
            Some((t, until)) if *until > Instant::now() => Some(t.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// An anonymous bearer token for `scope` (distribution's token flow);
    /// the realm is a hop of the same chain, checked the same way, and a
    /// token service's redirect is not followed.
    async fn fetch_token(
        &self,
        up: &Upstream,
        hops: &HopPolicy,
        base: &url::Url,
        challenge: &str,
        scope: &str,
    ) -> Result<(), StorageError> {
        let params =
            gantry_http::challenge::bearer(challenge).ok_or_else(|| upstream_err("401 without a Bearer challenge"))?;
        let realm = gantry_http::challenge::param(&params, "realm")
            .ok_or_else(|| upstream_err("Bearer challenge without a realm"))?;
        let mut url =
            url::Url::parse(realm).map_err(|_| upstream_err(format!("invalid token realm {}", redact_url(realm))))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("scope", scope);
            if let Some(s) = gantry_http::challenge::param(&params, "service") {
                q.append_pair("service", s);
            }
        }
        let reach = self.hop(hops, base, &url)?;
        let req = Request::get(url.as_str()).body(client::empty()).map_err(upstream_err)?;
        let resp = tokio::time::timeout(ANSWER_TIMEOUT, self.clients.request(reach, req))
            .await
            .map_err(|_| upstream_err("the token service did not answer in time"))?
            .map_err(|e| upstream_err(format!("token service: {}", escape_line(&chain(&e)))))?;
        if !resp.status().is_success() {
            return Err(upstream_err(format!("token service answered {}", resp.status())));
        }
        let body = read_limited(resp.into_body(), 64 << 10).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| upstream_err("token is not JSON"))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| upstream_err("token response without a token"))?;
        let ttl = v["expires_in"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(TOKEN_TTL)
            .min(MAX_TOKEN_TTL);
        let size = up.base.len() + scope.len() + token.len();
        let _ = self.tokens.lock().unwrap().insert(
            (up.base.clone(), scope.to_string()),
            (token.to_string(), Instant::now() + ttl),
            size,
        );
        Ok(())
    }

    /// A manifest: from the cache when fresh (or the upstream is down),
    /// else from the upstream, verified and kept.
    pub async fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        let cached = self.local.manifest(repo, reference)?;
        let stale = match reference {
            ManifestRef::Digest(_) => {
                if cached.is_some() {
                    self.stats.hits.inc();
                    return Ok(cached);
                }
                None
            }
            ManifestRef::Tag(t) => match (self.local.tag(repo, t)?, cached) {
                (Some(e), Some(m)) if now_secs().saturating_sub(e.fetched) < self.options.tag_ttl.as_secs() => {
                    self.stats.hits.inc();
                    return Ok(Some(m));
                }
                (_, c) => c,
            },
        };
        self.stats.misses.inc();
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
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let claimed = resp
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_limited(resp.into_body(), MAX_MANIFEST).await?;
            let digest = Digest::of(&bytes);
            let media_type = manifest_type(content_type.as_deref(), &bytes)
                .ok_or_else(|| {
                    upstream_err(format!(
                        "sent manifest {digest} as {}, not a manifest type",
                        escape_line(content_type.as_deref().unwrap_or("nothing"))
                    ))
                })?
                .to_string();
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
                self.local.put_manifest(repo, &m, tag.as_slice())?;
                if let Some(t) = tag {
                    self.remember_tag(repo, t, m.bytes.len() as u64);
                }
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
        self.upstream_size(repo, digest).await
    }

    /// Whether the upstream holds blob `digest` under `repo`'s name: its
    /// size, if it says.
    async fn upstream_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StorageError> {
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
            StatusCode::OK => Ok(Some(
                resp.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(upstream_err(format!("{} answered {s}", up.base))),
        }
    }

    /// What the cache holds of `digest` for `repo`. A blob stored for
    /// another repository is linked to this one only once the upstream
    /// confirmed it holds the blob under this name too.
    async fn lookup(&self, repo: &str, digest: &Digest) -> Result<Lookup, StorageError> {
        if let Some(n) = self.local.blob_size(repo, digest)? {
            self.stats.hits.inc();
            return Ok(Lookup::Hit(n));
        }
        if !self.local.contains_blob(digest) {
            self.stats.misses.inc();
            return Ok(Lookup::Miss);
        }
        if self.upstream_size(repo, digest).await?.is_none() {
            return Ok(Lookup::Missing);
        }
        self.local.link_blob(repo, digest)?;
        Ok(match self.local.blob_size(repo, digest)? {
            Some(n) => Lookup::Hit(n),
            None => Lookup::Miss,
        })
    }

    /// After waiting on another request's fetch: `None` to look again (it
    /// cached the blob, or it was for another repository and failed
    /// there), else this request's answer.
    fn followed(repo: &str, theirs: &str, outcome: Outcome) -> Option<Result<(), StorageError>> {
        match outcome {
            Outcome::Cached => None,
            _ if theirs != repo => None,
            Outcome::Missing => Some(Ok(())),
            Outcome::Failed(e) => Some(Err(upstream_err(e))),
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
        for _ in 0..3 {
            match self.lookup(repo, digest).await? {
                Lookup::Hit(n) => return Ok(self.local.blob(repo, digest, 0..n)?.map(|b| (n, b))),
                Lookup::Missing => return Ok(None),
                Lookup::Miss => {}
            }
            match self.join_or_lead(repo, digest)? {
                Joined::Lead { head, body, done } => {
                    // The fetch goes on only while someone waits: this
                    // request waits by reading its body.
                    drop(done);
                    return match head.await {
                        Ok(Ok(Some(size))) => Ok(Some((size, ChannelBody::new(body).boxed()))),
                        Ok(Ok(None)) => Ok(None),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(upstream_err(format!("the fetch of blob {digest} ended early"))),
                    };
                }
                Joined::Follow { repo: theirs, done } => match Self::followed(repo, &theirs, wait(done).await) {
                    None => continue,
                    Some(Ok(())) => return Ok(None),
                    Some(Err(e)) => return Err(e),
                },
            }
        }
        Err(upstream_err(format!("could not fetch blob {digest}")))
    }

    /// The bytes `range` of a blob: from the cache, once it is there.
    pub async fn blob(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Option<BlobBody>, StorageError> {
        for _ in 0..3 {
            match self.lookup(repo, digest).await? {
                Lookup::Hit(_) => return self.local.blob(repo, digest, range),
                Lookup::Missing => return Ok(None),
                Lookup::Miss => {}
            }
            let (theirs, done) = match self.join_or_lead(repo, digest)? {
                // Nobody reads the streamed copy: this request waits for the
                // fetch to fill the cache.
                Joined::Lead { done, .. } => (repo.to_string(), done),
                Joined::Follow { repo, done } => (repo, done),
            };
            match Self::followed(repo, &theirs, wait(done).await) {
                None => continue,
                Some(Ok(())) => return Ok(None),
                Some(Err(e)) => return Err(e),
            }
        }
        Err(upstream_err(format!("could not fetch blob {digest}")))
    }

    /// Starts fetching `digest` for `repo` unless a fetch of it is under
    /// way (then joins that one). Fetches at once are bounded.
    fn join_or_lead(self: &Arc<Self>, repo: &str, digest: &Digest) -> Result<Joined, StorageError> {
        let done = {
            let mut inflight = self.inflight.lock().unwrap();
            if let Some(f) = inflight.get(digest) {
                return Ok(Joined::Follow {
                    repo: f.repo.clone(),
                    done: f.done.clone(),
                });
            }
            if inflight.len() >= self.options.max_fetches {
                return Err(upstream_err(format!(
                    "{} blob fetches are under way, the most this mirror makes at once; try again",
                    inflight.len()
                )));
            }
            let (tx, rx) = tokio::sync::watch::channel(None);
            inflight.insert(
                digest.clone(),
                Inflight {
                    repo: repo.to_string(),
                    done: rx,
                },
            );
            tx
        };
        let rx = done.subscribe();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        let (body_tx, body_rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        let (repo, digest) = (repo.to_string(), digest.clone());
        tokio::spawn(async move {
            let outcome = me.fetch_blob(&repo, &digest, head_tx, body_tx, &done).await;
            me.inflight.lock().unwrap().remove(&digest);
            let _ = done.send(Some(outcome));
        });
        Ok(Joined::Lead {
            head: head_rx,
            body: body_rx,
            done: rx,
        })
    }

    /// Fetches a blob into the cache, passing its bytes to `client` while
    /// it listens; the last chunk goes only after the digest checked out.
    /// A blob over the size cap is refused before any byte is read; once
    /// neither `client` nor anyone waiting on `done` is left, the fetch
    /// is dropped.
    async fn fetch_blob(
        &self,
        repo: &str,
        digest: &Digest,
        head: tokio::sync::oneshot::Sender<Result<Option<u64>, StorageError>>,
        client: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
        done: &tokio::sync::watch::Sender<Option<Outcome>>,
    ) -> Outcome {
        let fail = |msg: String| {
            let client = client.clone();
            async move {
                let _ = client.send(Err(std::io::Error::other(msg.clone()))).await;
                Outcome::Failed(msg)
            }
        };
        let refuse = |head: tokio::sync::oneshot::Sender<_>, e: StorageError| {
            let msg = e.to_string();
            let _ = head.send(Err(e));
            Outcome::Failed(msg)
        };
        let Some((up, name)) = self.route(repo) else {
            let _ = head.send(Ok(None));
            return Outcome::Missing;
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
                return Outcome::Missing;
            }
            Ok(r) => return refuse(head, upstream_err(format!("{} answered {}", up.base, r.status()))),
            Err(e) => return refuse(head, e),
        };
        let Some(size) = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return refuse(
                head,
                upstream_err(format!("{} sent blob {digest} without its length", up.base)),
            );
        };
        if size > self.options.max_blob {
            // Dropping the answer closes its connection: nothing more is read.
            return refuse(
                head,
                upstream_err(format!(
                    "blob {digest} is {size} bytes, over this mirror's limit of {} bytes (max_blob_mib)",
                    self.options.max_blob
                )),
            );
        }
        let _ = head.send(Ok(Some(size)));
        let mut ingest = match self.local.ingest() {
            Ok(i) => i,
            Err(e) => return fail(e.to_string()).await,
        };
        let mut body = resp.into_body();
        let mut held: Option<Bytes> = None;
        loop {
            // The map's own receiver is one; any other is a waiter.
            if client.is_closed() && done.receiver_count() <= 1 {
                return Outcome::Failed(format!(
                    "the fetch of blob {digest} was dropped: no client waits for it"
                ));
            }
            let frame = tokio::select! {
                f = tokio::time::timeout(STALL_TIMEOUT, body.frame()) => f,
                // The only client left while the upstream sent nothing.
                () = client.closed(), if done.receiver_count() <= 1 => continue,
            };
            let frame = match frame {
                Err(_) => return fail("upstream stalled".into()).await,
                Ok(None) => break,
                Ok(Some(Err(e))) => return fail(format!("upstream: {}", escape_line(&e.to_string()))).await,
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
                // A client that left is seen at the top of the loop.
                let _ = client.send(Ok(prev)).await;
            }
        }
        if ingest.len() != size {
            return fail(format!(
                "upstream sent {} of the {size} bytes of blob {digest}",
                ingest.len()
            ))
            .await;
        }
        if let Err(e) = self.local.commit_blob(repo, ingest, digest) {
            return fail(e.to_string()).await;
        }
        if let Some(last) = held {
            let _ = client.send(Ok(last)).await;
        }
        Outcome::Cached
    }
}

/// A map bounded in entries and in bytes (as its user counts them):
/// inserting past either bound evicts the oldest entries first.
struct Bounded<K, V> {
    map: HashMap<K, (V, usize, u64)>,
    /// Insertion order: sequence number → key.
    order: BTreeMap<u64, K>,
    bytes: usize,
    next: u64,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: BTreeMap::new(),
            bytes: 0,
            next: 0,
            max_entries,
            max_bytes,
        }
    }

    fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(v, _, _)| v)
    }

    fn remove(&mut self, k: &K) -> Option<V> {
        let (v, size, seq) = self.map.remove(k)?;
        self.order.remove(&seq);
        self.bytes -= size;
        Some(v)
    }

    /// Inserts `v` costing `size` bytes; an entry larger than the whole
    /// bound is not kept (and is returned as evicted). Returns the keys
    /// evicted.
    fn insert(&mut self, k: K, v: V, size: usize) -> Vec<K> {
        self.remove(&k);
        if size > self.max_bytes || self.max_entries == 0 {
            return vec![k];
        }
        let mut evicted = Vec::new();
        while self.map.len() >= self.max_entries || self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, s, _)) = self.map.remove(&oldest) {
                self.bytes -= s;
            }
            evicted.push(oldest);
        }
        self.order.insert(self.next, k.clone());
        self.map.insert(k, (v, size, self.next));
        self.next += 1;
        self.bytes += size;
        evicted
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Waits for a fetch to end; how it ended.
async fn wait(mut rx: Done) -> Outcome {
    loop {
        if let Some(o) = rx.borrow().clone() {
            return o;
        }
        if rx.changed().await.is_err() {
            return rx
                .borrow()
                .clone()
                .unwrap_or_else(|| Outcome::Failed("the fetch ended early".into()));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let m = Mirror::new(local, ups, MirrorOptions::default());
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

    #[test]
    fn the_bounded_map_evicts_the_oldest_by_entries_and_bytes() {
        let mut m: Bounded<String, u32> = Bounded::new(3, 100);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert!(m.insert(k.to_string(), i as u32, 10).is_empty());
        }
        assert_eq!(m.insert("d".into(), 3, 10), ["a"]);
        assert_eq!(m.len(), 3);
        assert!(m.get(&"a".to_string()).is_none(), "the oldest went first");
        assert_eq!(m.get(&"d".to_string()), Some(&3));
        // Bytes: one big entry pushes out as many as it needs.
        assert_eq!(m.insert("big".into(), 9, 85), ["b", "c"]);
        assert_eq!((m.len(), m.bytes), (2, 95));
        assert!(m.get(&"c".to_string()).is_none());
        assert_eq!(m.get(&"d".to_string()), Some(&3));
        m.remove(&"d".to_string());
        // Larger than the whole bound: not kept, nothing else lost.
        assert_eq!(m.insert("huge".into(), 0, 101), ["huge"]);
        assert!(m.get(&"huge".to_string()).is_none());
        assert_eq!(m.get(&"big".to_string()), Some(&9));
        // Replacing a key frees its old size.
        assert!(m.insert("big".into(), 10, 5).is_empty());
        assert_eq!((m.len(), m.bytes), (1, 5));
        assert_eq!(m.remove(&"big".to_string()), Some(10));
        assert_eq!((m.len(), m.bytes, m.order.len()), (0, 0, 0));
    }

    #[test]
    fn tokens_expire_and_fetches_at_once_are_bounded() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // An upstream that takes connections and never answers.
            let quiet = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", quiet.local_addr().unwrap());
            let dir = tempfile::tempdir().unwrap();
            let local = Arc::new(FsStorage::open(dir.path(), true).unwrap());
            let m = Arc::new(Mirror::new(
                local,
                vec![Upstream::parse(&base).unwrap()],
                MirrorOptions {
                    max_fetches: 1,
                    ..MirrorOptions::default()
                },
            ));
            let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
            assert!(matches!(m.join_or_lead("x/y", &a), Ok(Joined::Lead { .. })));
            assert!(matches!(m.join_or_lead("x/z", &a), Ok(Joined::Follow { .. })));
            let Err(e) = m.join_or_lead("x/y", &b) else {
                panic!("a second fetch started")
            };
            assert!(e.to_string().contains("at once"), "{e}");
            let _ = m.tokens.lock().unwrap().insert(
                (base.clone(), "s".into()),
                ("t".into(), Instant::now() - Duration::from_secs(1)),
                3,
            );
            assert_eq!(m.token(&base, "s"), None, "an expired token is not sent");
            assert_eq!(m.tokens.lock().unwrap().len(), 0);
        });
    }

    #[test]
    fn manifests_keep_only_manifest_types() {
        let oci = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert_eq!(
            manifest_type(Some("text/html"), oci),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(
            manifest_type(
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                b"{}"
            ),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );
        assert_eq!(manifest_type(Some("text/html"), br#"{"mediaType":"text/html"}"#), None);
        assert_eq!(manifest_type(None, b"<html>"), None);
    }
}
