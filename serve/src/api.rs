//! The registry's v2 read API (the distribution spec's pull and content
//! discovery endpoints), over any [`Storage`].
//!
//! Every request is checked before storage sees it: repository names must
//! match the distribution grammar (so `..` or `%2e` never reach a path),
//! digests are `sha256:` and 64 lowercase hex digits, tags the tag grammar.
//! Errors are the registry's JSON (`{"errors":[{"code",…}]}`) with the
//! status the spec gives each code. Every answer carries
//! `X-Content-Type-Options: nosniff`, and a manifest is served with its
//! media type only when that is a manifest type (else as plain bytes), so
//! nothing a client stored is ever rendered as a page.

use crate::htpasswd::Htpasswd;
use crate::mirror::Mirror;
use crate::registry_storage::{Registry, RegistryStorage};
use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use crate::token::{Scope, TokenAuth, TokenError};
use crate::with_registry;
use bytes::Bytes;
use gantry_core::digest::Digest;
use gantry_core::reference::{valid_repository, valid_tag};
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, LINK, LOCATION, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;

pub type Body = BlobBody;

/// Catalog pages hold at most this many names unless `n` asks for fewer
/// (distribution's default); `n` above [`MAX_PAGE`] is refused.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 10_000;

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A registry error: its code, the status it goes with, and a message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    header: Option<(hyper::header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            header: None,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The same error with one more response header (`WWW-Authenticate`).
    pub(crate) fn with_header(mut self, name: hyper::header::HeaderName, v: HeaderValue) -> ApiError {
        self.header = Some((name, v));
        self
    }

    fn name_invalid() -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "NAME_INVALID", "invalid repository name")
    }

    fn name_unknown() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "repository name not known to registry",
        )
    }

    fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "not found")
    }

    fn response(&self, head: bool) -> Response<Body> {
        let body = serde_json::json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]});
        let mut r = json(serde_json::to_vec(&body).expect("serialisable"), head);
        *r.status_mut() = self.status;
        if let Some((k, v)) = &self.header {
            r.headers_mut().insert(k.clone(), v.clone());
        }
        r
    }
}

/// The route a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Base,
    Catalog,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    /// A repository's upload sessions, or one of them.
    Upload(&'a str, Option<&'a str>),
    /// The manifests whose `subject` is a digest (OCI 1.1).
    Referrers(&'a str, &'a str),
}

/// The kind of route `path` names, as the metrics label it (never a
/// name a client chose).
pub fn route_label(path: &str) -> &'static str {
    if path.starts_with("/v1/") || path == "/_ping" {
        return "v1";
    }
    match route(path) {
        Some(Route::Base) => "base",
        Some(Route::Catalog) => "catalog",
        Some(Route::Tags(_)) => "tags",
        Some(Route::Manifest(..)) => "manifest",
        Some(Route::Blob(..)) => "blob",
        Some(Route::Upload(..)) => "upload",
        Some(Route::Referrers(..)) => "referrers",
        None => "other",
    }
}

fn route(path: &str) -> Option<Route<'_>> {
    if path == "/v2/" || path == "/v2" {
        return Some(Route::Base);
    }
    let rest = path.strip_prefix("/v2/")?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name));
    }
    if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        if digest.contains(':') && !digest.contains('/') {
            return Some(Route::Referrers(name, digest));
        }
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Some(Route::Manifest(name, reference));
    }
    if let Some((name, session)) = rest.rsplit_once("/blobs/uploads") {
        let session = session.strip_prefix('/').unwrap_or(session);
        return match session {
            "" => Some(Route::Upload(name, None)),
            s if !s.contains('/') => Some(Route::Upload(name, Some(s))),
            _ => None,
        };
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Some(Route::Blob(name, digest));
    }
    None
}

/// What the handlers read from: a storage, or a pull-through mirror
/// (a storage of its own filled from upstreams), or a registry's own
/// storage that takes pushes, guarded by `auth`.
pub enum Backend {
    Storage(Arc<dyn Storage>),
    Mirror(Arc<Mirror>),
    Registry { storage: Registry, auth: Auth },
}

/// Who may do what with a registry of its own.
pub enum Auth {
    /// Anyone who reaches the port may read and push.
    Open,
    /// Writes need basic auth from the htpasswd file's users; reads are open.
    Basic(Arc<Htpasswd>),
    /// Every request needs a bearer token granting its scope.
    Token(Arc<TokenAuth>),
}

/// The scopes a token must grant for `route` by `req`'s method: pull to
/// read, push to write (and pull of the repository a blob is mounted
/// from), delete to delete, `registry:catalog:*` for the catalog.
fn scopes_needed(route: &Route<'_>, req: &Request<hyper::body::Incoming>) -> Vec<Scope> {
    let m = req.method();
    let read = *m == Method::GET || *m == Method::HEAD;
    let by_method = |name: &str| {
        let action = if read {
            "pull"
        } else if *m == Method::DELETE {
            "delete"
        } else {
            "push"
        };
        vec![Scope::repository(name, action)]
    };
    match route {
        Route::Base => Vec::new(),
        Route::Catalog => vec![Scope::catalog()],
        Route::Tags(n) | Route::Referrers(n, _) => vec![Scope::repository(n, "pull")],
        Route::Manifest(n, _) | Route::Blob(n, _) => by_method(n),
        Route::Upload(n, _) => {
            // Every upload request, cancelling one too, is part of pushing.
            let mut s = vec![Scope::repository(n, "push")];
            if let (Some(_), Some(from)) = (
                gantry_http::query::param(req, "mount"),
                gantry_http::query::param(req, "from"),
            ) {
                if valid_repository(&from) {
                    s.push(Scope::repository(&from, "pull"));
                }
            }
            s
        }
    }
}

/// The `scope` of a challenge for `need`: the actions of one resource
/// joined (`repository:a:pull,push`), a push asking for pull too, as
/// clients need both.
fn challenge_scope(need: &[Scope]) -> Option<String> {
    let mut parts: Vec<(String, String, Vec<&str>)> = Vec::new();
    for s in need {
        let actions: &[&str] = if s.action == "push" {
            &["pull", "push"]
        } else {
            std::slice::from_ref(&s.action)
        };
        match parts.iter_mut().find(|(k, n, _)| k == s.kind && *n == s.name) {
            Some((_, _, a)) => a.extend(actions.iter().filter(|x| !a.contains(x)).collect::<Vec<_>>()),
            None => parts.push((s.kind.to_string(), s.name.clone(), actions.to_vec())),
        }
    }
    (!parts.is_empty()).then(|| {
        parts
            .iter()
            .map(|(k, n, a)| format!("{k}:{n}:{}", a.join(",")))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// 401 with a bearer challenge unless `req`'s token grants what `route`
/// needs; the token's subject.
fn check_token(
    t: &TokenAuth,
    route: &Route<'_>,
    req: &Request<hyper::body::Incoming>,
) -> Result<Option<String>, ApiError> {
    if let Route::Tags(n) | Route::Referrers(n, _) | Route::Manifest(n, _) | Route::Blob(n, _) | Route::Upload(n, _) =
        route
    {
        if !valid_repository(n) {
            return Err(ApiError::name_invalid());
        }
    }
    let need = scopes_needed(route, req);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    t.check(header, &need, now).map_err(|e| {
        let insufficient = matches!(e, TokenError::Scope(_));
        let challenge = t.challenge(challenge_scope(&need).as_deref(), insufficient);
        let code = if insufficient { "DENIED" } else { "UNAUTHORIZED" };
        ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string()).with_header(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer")),
        )
    })
}

impl Backend {
    /// Whether the storage answers (for `/healthz`).
    pub async fn check(&self) -> Result<(), StorageError> {
        match self {
            Backend::Registry { storage, .. } => with_registry!(storage, s => RegistryStorage::check(&**s).await),
            Backend::Mirror(m) => tokio::task::block_in_place(|| m.local().check()),
            Backend::Storage(s) => tokio::task::block_in_place(|| s.catalog().map(|_| ())),
        }
    }

    /// Whether content named by `d` can be here at all: a registry's own
    /// storage keeps what its clients push, sha512 too; a gantry store and
    /// a mirror (which verifies what it fetches as the engine does) hold
    /// sha256 content only.
    fn holds(&self, d: &Digest) -> bool {
        match self {
            Backend::Registry { .. } => true,
            Backend::Storage(_) | Backend::Mirror(_) => d.algorithm() == gantry_core::digest::Algorithm::Sha256,
        }
    }

    async fn catalog(&self) -> Result<Vec<String>, StorageError> {
        match self {
            Backend::Storage(s) => s.catalog(),
            Backend::Registry { storage, .. } => with_registry!(storage, s => RegistryStorage::catalog(&**s).await),
            Backend::Mirror(m) => Storage::catalog(m.local()),
        }
    }

    async fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        match self {
            Backend::Storage(s) => s.tags(repo),
            Backend::Registry { storage, .. } => with_registry!(storage, s => RegistryStorage::tags(&**s, repo).await),
            Backend::Mirror(m) => Storage::tags(m.local(), repo),
        }
    }

    async fn has_repository(&self, repo: &str) -> Result<bool, StorageError> {
        match self {
            Backend::Storage(s) => s.has_repository(repo),
            Backend::Registry { storage, .. } => {
                with_registry!(storage, s => RegistryStorage::has_repository(&**s, repo).await)
            }
            Backend::Mirror(m) => Ok(Storage::has_repository(m.local(), repo)? || m.serves(repo)),
        }
    }

    async fn manifest(&self, repo: &str, r: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        if let ManifestRef::Digest(d) = r {
            if !self.holds(d) {
                return Ok(None);
            }
        }
        match self {
            Backend::Storage(s) => s.manifest(repo, r),
            Backend::Registry { storage, .. } => {
                with_registry!(storage, s => RegistryStorage::manifest(&**s, repo, r).await)
            }
            Backend::Mirror(m) => m.manifest(repo, r).await,
        }
    }

    /// The descriptors of the manifests of `repo` whose subject is `d`; a
    /// gantry store and a mirror keep none.
    async fn referrers(
        &self,
        repo: &str,
        d: &Digest,
        after: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, bool), StorageError> {
        match self {
            Backend::Registry { storage, .. } => {
                with_registry!(storage, s => RegistryStorage::referrers(&**s, repo, d, after).await)
            }
            Backend::Storage(_) | Backend::Mirror(_) => Ok((Vec::new(), false)),
        }
    }

    async fn blob_size(&self, repo: &str, d: &Digest) -> Result<Option<u64>, StorageError> {
        if !self.holds(d) {
            return Ok(None);
        }
        match self {
            Backend::Storage(s) => s.blob_size(repo, d),
            Backend::Registry { storage, .. } => {
                with_registry!(storage, s => RegistryStorage::blob_size(&**s, repo, d).await)
            }
            Backend::Mirror(m) => m.blob_size(repo, d).await,
        }
    }

    async fn blob(&self, repo: &str, d: &Digest, range: std::ops::Range<u64>) -> Result<Option<Body>, StorageError> {
        if !self.holds(d) {
            return Ok(None);
        }
        match self {
            Backend::Storage(s) => s.blob(repo, d, range),
            Backend::Registry { storage, .. } => {
                with_registry!(storage, s => RegistryStorage::blob(&**s, repo, d, range).await)
            }
            Backend::Mirror(m) => m.blob(repo, d, range).await,
        }
    }
}

impl Backend {
    /// The storage v1 requests read from (a mirror's cache has no v1 view).
    fn v1_storage(&self) -> Option<&dyn Storage> {
        match self {
            Backend::Storage(s) => Some(&**s),
            Backend::Registry {
                storage: Registry::Fs(s),
                ..
            } => Some(&**s),
            Backend::Registry { .. } => None,
            Backend::Mirror(_) => None,
        }
    }
}

/// Answers one request.
pub async fn handle(backend: &Backend, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    let mut resp = match answer(backend, req).await {
        Ok(r) => r,
        Err(e) => e.response(head),
    };
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    // What a client stored is served back: no browser may guess it is a page.
    resp.headers_mut()
        .insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
    resp
}

/// The `Content-Type` a stored manifest is served with: always a manifest
/// type or plain bytes. A mirror's upstream or an older store may have
/// recorded anything: then the document's own type (by pull's rule) is
/// used, and failing that `application/octet-stream`.
fn manifest_content_type(m: &Manifest) -> HeaderValue {
    use gantry_core::manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
    const SCHEMA1: [&str; 2] = [
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ];
    let bare = m.media_type.split(';').next().unwrap_or("").trim();
    for t in [
        DOCKER_MANIFEST,
        DOCKER_LIST,
        OCI_MANIFEST,
        OCI_INDEX,
        SCHEMA1[0],
        SCHEMA1[1],
    ] {
        if bare == t {
            return HeaderValue::from_static(t);
        }
    }
    serde_json::from_slice::<serde_json::Value>(&m.bytes)
        .ok()
        .and_then(|doc| gantry_core::manifest::kind("", &doc).ok())
        .map(|(t, _)| HeaderValue::from_static(t))
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"))
}

async fn answer(storage: &Backend, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    if path.starts_with("/v1/") || path == "/_ping" {
        return v1_answer(storage, &req);
    }
    let route = route(&path).ok_or_else(ApiError::not_found)?;
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if let Backend::Registry { storage, auth } = storage {
        let owner = match auth {
            Auth::Token(t) => check_token(t, &route, &req)?,
            Auth::Open | Auth::Basic(_) => None,
        };
        let basic = match auth {
            Auth::Basic(h) => Some(&**h),
            Auth::Open | Auth::Token(_) => None,
        };
        if !read || matches!(route, Route::Upload(..)) {
            // Without `from`, a mount could link a blob of a repository
            // the token does not grant: only where every read is open.
            let anonymous_mounts = !matches!(auth, Auth::Token(_));
            return write(storage, basic, anonymous_mounts, owner.as_deref(), route, req).await;
        }
        // Clients learn from `/v2/` whether to send credentials (skopeo
        // sends them only when challenged there): with an htpasswd file it
        // challenges anyone without them, though every read stays open.
        if route == Route::Base {
            crate::push::authorize(basic, &req).await?;
        }
    }
    let req = &req;
    if !read {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry is read-only: the operation is unsupported",
        ));
    }
    let head = req.method() == Method::HEAD;
    let name_ok = |n: &str| {
        if valid_repository(n) {
            Ok(())
        } else {
            Err(ApiError::name_invalid())
        }
    };
    match route {
        Route::Base => Ok(json(b"{}".to_vec(), head)),
        Route::Catalog => {
            let (n, last) = page(req.uri().query())?;
            let all = storage.catalog().await?;
            let (items, next) = paginate(&all, n.or(Some(DEFAULT_PAGE)), last.as_deref());
            let body = serde_json::to_vec(&serde_json::json!({ "repositories": items })).expect("serialisable");
            let mut r = json(body, head);
            if let Some(last) = next {
                link(
                    &mut r,
                    &format!("/v2/_catalog?last={last}&n={}", n.unwrap_or(DEFAULT_PAGE)),
                );
            }
            Ok(r)
        }
        Route::Tags(name) => {
            name_ok(name)?;
            let (n, last) = page(req.uri().query())?;
            let all = storage.tags(name).await?.ok_or_else(ApiError::name_unknown)?;
            let (items, next) = paginate(&all, n, last.as_deref());
            let body = serde_json::to_vec(&serde_json::json!({ "name": name, "tags": items })).expect("serialisable");
            let mut r = json(body, head);
            if let (Some(last), Some(n)) = (next, n) {
                link(&mut r, &format!("/v2/{name}/tags/list?last={last}&n={n}"));
            }
            Ok(r)
        }
        Route::Manifest(name, reference) => {
            name_ok(name)?;
            let reference = manifest_ref(reference)?;
            let Some(m) = storage.manifest(name, &reference).await? else {
                if !storage.has_repository(name).await? {
                    return Err(ApiError::name_unknown());
                }
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown",
                ));
            };
            let len = m.bytes.len();
            let content_type = manifest_content_type(&m);
            let mut r = Response::new(if head { empty() } else { full(m.bytes) });
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, content_type);
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
            h.insert("Docker-Content-Digest", value(m.digest.as_str()));
            h.insert(ETAG, value(&format!("\"{}\"", m.digest)));
            Ok(r)
        }
        Route::Blob(name, digest) => {
            name_ok(name)?;
            let digest = Digest::parse_any(digest)
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest"))?;
            let unknown = || ApiError::new(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown to registry");
            // A mirror streams a whole blob it lacks as it fetches it.
            if let (Backend::Mirror(m), false, None) = (storage, head, req.headers().get(RANGE)) {
                let (size, body) = m.stream(name, &digest).await?.ok_or_else(unknown)?;
                return Ok(blob_response(body, &digest, size, None));
            }
            let size = storage.blob_size(name, &digest).await?.ok_or_else(unknown)?;
            // An object store's bytes may be fetched from it directly.
            if let (Backend::Registry { storage: r, .. }, false) = (storage, head) {
                if let Some(to) = with_registry!(r, s => RegistryStorage::redirect(&**s, &digest)) {
                    let mut resp = Response::new(empty());
                    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    resp.headers_mut().insert(LOCATION, value(&to));
                    resp.headers_mut()
                        .insert("Docker-Content-Digest", value(digest.as_str()));
                    resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
                    return Ok(resp);
                }
            }
            let range = match requested_range(req, size) {
                Ok(r) => r,
                Err(()) => return Ok(unsatisfiable(size)),
            };
            let span = range.clone().unwrap_or(0..size);
            let body = if head {
                empty()
            } else {
                storage.blob(name, &digest, span.clone()).await?.ok_or_else(unknown)?
            };
            Ok(blob_response(body, &digest, size, range))
        }
        Route::Referrers(name, digest) => {
            name_ok(name)?;
            let digest = Digest::parse_any(digest)
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest"))?;
            // Pages of at most a megabyte of records, the next by `Link`.
            let after = gantry_http::query::param(req, "last")
                .filter(|l| l.len() <= 128 && l.bytes().all(|b| b.is_ascii_hexdigit()));
            let (mut manifests, more) = storage.referrers(name, &digest, after.as_deref()).await?;
            let last = manifests
                .last()
                .and_then(|m| m.get("digest")?.as_str()?.split_once(':').map(|(_, h)| h.to_string()));
            let wanted = gantry_http::query::param(req, "artifactType");
            if let Some(t) = &wanted {
                manifests.retain(|m| m.get("artifactType").and_then(|a| a.as_str()) == Some(t.as_str()));
            }
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": gantry_core::manifest::OCI_INDEX,
                "manifests": manifests,
            });
            let bytes = serde_json::to_vec(&index).expect("serialisable");
            let len = bytes.len();
            let mut r = Response::new(if head { empty() } else { full(bytes) });
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static(gantry_core::manifest::OCI_INDEX));
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
            if wanted.is_some() {
                h.insert("OCI-Filters-Applied", HeaderValue::from_static("artifactType"));
            }
            if let (true, Some(last)) = (more, last) {
                let mut next = format!("/v2/{name}/referrers/{digest}?last={last}");
                if let Some(t) = &wanted {
                    next.push_str("&artifactType=");
                    next.extend(url::form_urlencoded::byte_serialize(t.as_bytes()));
                }
                link(&mut r, &next);
            }
            Ok(r)
        }
        Route::Upload(name, _) => {
            name_ok(name)?;
            Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this registry is read-only: the operation is unsupported",
            ))
        }
    }
}

/// The write side of a registry's own storage (see `push`), and upload
/// session status (`GET` of a session), which needs the same rights.
async fn write(
    storage: &Registry,
    htpasswd: Option<&Htpasswd>,
    anonymous_mounts: bool,
    owner: Option<&str>,
    route: Route<'_>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    crate::push::authorize(htpasswd, &req).await?;
    let name_ok = |n: &str| {
        if valid_repository(n) {
            Ok(())
        } else {
            Err(ApiError::name_invalid())
        }
    };
    let not_allowed = || {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the operation is unsupported",
        )
    };
    match route {
        Route::Upload(name, session) => {
            name_ok(name)?;
            with_registry!(storage, s => crate::push::upload(&**s, name, session, anonymous_mounts, owner, req).await)
        }
        Route::Manifest(name, reference) => {
            name_ok(name)?;
            let reference = manifest_ref(reference)?;
            match *req.method() {
                Method::PUT => {
                    with_registry!(storage, s => crate::push::put_manifest(&**s, name, reference, req).await)
                }
                Method::DELETE => {
                    with_registry!(storage, s => crate::push::delete_manifest(&**s, name, &reference).await)
                }
                _ => Err(not_allowed()),
            }
        }
        Route::Blob(name, digest) if req.method() == Method::DELETE => {
            name_ok(name)?;
            let digest = Digest::parse_any(digest)
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest"))?;
            with_registry!(storage, s => crate::push::delete_blob(&**s, name, &digest).await)
        }
        _ => Err(not_allowed()),
    }
}

/// A manifest reference from a path: a digest or a tag.
fn manifest_ref(reference: &str) -> Result<ManifestRef, ApiError> {
    if reference.starts_with("sha256:") || reference.contains(':') {
        Ok(ManifestRef::Digest(Digest::parse_any(reference).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                "provided digest did not match uploaded content",
            )
        })?))
    } else if valid_tag(reference) {
        Ok(ManifestRef::Tag(reference.to_string()))
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            "manifest tag did not match URI",
        ))
    }
}

/// The v1 read API (see `v1`): errors as the v1 registry wrote them,
/// `{"error": "…"}`.
fn v1_answer(backend: &Backend, req: &Request<hyper::body::Incoming>) -> Result<Response<Body>, ApiError> {
    let head = req.method() == Method::HEAD;
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(v1_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "this registry is read-only",
            head,
        ));
    }
    let path = req.uri().path();
    if path == "/v1/_ping" || path == "/_ping" {
        let mut r = json(b"true".to_vec(), head);
        let standalone = match backend {
            Backend::Mirror(_) => "mirror",
            Backend::Storage(_) | Backend::Registry { .. } => "true",
        };
        r.headers_mut()
            .insert("X-Docker-Registry-Standalone", HeaderValue::from_static(standalone));
        r.headers_mut()
            .insert("X-Docker-Registry-Version", HeaderValue::from_static("0.9.1"));
        return Ok(r);
    }
    let Some(storage) = backend.v1_storage() else {
        return Ok(v1_error(
            StatusCode::NOT_FOUND,
            "v1 is served only with --from-store",
            head,
        ));
    };
    let not_found = |what: &str| Ok(v1_error(StatusCode::NOT_FOUND, what, head));
    if let Some(rest) = path.strip_prefix("/v1/repositories/") {
        let (name, what) = if let Some(n) = rest.strip_suffix("/images") {
            (n, None)
        } else if let Some(n) = rest.strip_suffix("/tags") {
            (n, Some(None))
        } else if let Some((n, tag)) = rest.rsplit_once("/tags/") {
            (n, Some(Some(tag)))
        } else {
            return not_found("not found");
        };
        if !valid_repository(name) {
            return Ok(v1_error(StatusCode::BAD_REQUEST, "invalid repository name", head));
        }
        return match what {
            None => match storage.v1_images(name)? {
                Some(ids) if !ids.is_empty() => {
                    let list: Vec<_> = ids.iter().map(|id| serde_json::json!({ "id": id })).collect();
                    Ok(json(serde_json::to_vec(&list).expect("serialisable"), head))
                }
                _ => not_found("images not found"),
            },
            Some(tag) => {
                let Some(tags) = storage.v1_tags(name)?.filter(|t| !t.is_empty()) else {
                    return not_found("Repository not found");
                };
                match tag {
                    None => Ok(json(serde_json::to_vec(&tags).expect("serialisable"), head)),
                    Some(t) => match tags.get(t) {
                        Some(id) => Ok(json(serde_json::to_vec(id).expect("serialisable"), head)),
                        None => not_found("Tag not found"),
                    },
                }
            }
        };
    }
    let Some(rest) = path.strip_prefix("/v1/images/") else {
        return not_found("not found");
    };
    let Some((id, what)) = rest.split_once('/') else {
        return not_found("not found");
    };
    if !crate::v1::valid_id(id) {
        return Ok(v1_error(StatusCode::BAD_REQUEST, "invalid image id", head));
    }
    let Some(img) = storage.v1_image(id)? else {
        return not_found("Image not found");
    };
    match what {
        "ancestry" => {
            let mut chain = vec![img.id.clone()];
            let mut next = img.parent.clone();
            // Bounded by the layer limit, and a loop cannot form: ids cover their parents.
            while let Some(p) = next.take() {
                if chain.len() > 256 || chain.contains(&p) {
                    break;
                }
                next = storage.v1_image(&p)?.and_then(|i| i.parent);
                chain.push(p);
            }
            Ok(json(serde_json::to_vec(&chain).expect("serialisable"), head))
        }
        "json" => {
            let mut r = json(img.json.to_vec(), head);
            r.headers_mut().insert("X-Docker-Size", HeaderValue::from(img.size));
            r.headers_mut()
                .insert("X-Docker-Checksum-Payload", value(img.blob.as_str()));
            Ok(r)
        }
        "layer" => {
            let size = img.size;
            let range = match requested_range(req, size) {
                Ok(r) => r,
                Err(()) => return Ok(unsatisfiable(size)),
            };
            let span = range.clone().unwrap_or(0..size);
            let body = if head {
                empty()
            } else {
                match storage.v1_layer(id, span)? {
                    Some(b) => b,
                    None => return not_found("Image not found"),
                }
            };
            Ok(blob_response(body, &img.blob, size, range))
        }
        _ => not_found("not found"),
    }
}

fn v1_error(status: StatusCode, message: &str, head: bool) -> Response<Body> {
    let mut r = json(
        serde_json::to_vec(&serde_json::json!({ "error": message })).expect("serialisable"),
        head,
    );
    *r.status_mut() = status;
    r
}

/// A blob's answer: the whole of it, or `range` of it (206).
fn blob_response(body: Body, digest: &Digest, size: u64, range: Option<std::ops::Range<u64>>) -> Response<Body> {
    let span = range.clone().unwrap_or(0..size);
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(span.end - span.start));
    h.insert("Docker-Content-Digest", value(digest.as_str()));
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(ETAG, value(&format!("\"{digest}\"")));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        r.headers_mut().insert(
            CONTENT_RANGE,
            value(&format!("bytes {}-{}/{size}", span.start, span.end.saturating_sub(1))),
        );
    }
    r
}

/// A header value from text the server made (digests, media types from
/// stored manifests); anything unprintable becomes a safe placeholder.
pub(crate) fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(crate) fn json(body: Vec<u8>, head: bool) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(if head { empty() } else { full(body) });
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}

fn link(r: &mut Response<Body>, target: &str) {
    r.headers_mut()
        .insert(LINK, value(&format!("<{target}>; rel=\"next\"")));
}

/// `n` and `last` from a query string.
fn page(query: Option<&str>) -> Result<(Option<usize>, Option<String>), ApiError> {
    let mut n = None;
    let mut last = None;
    for (k, v) in gantry_http::query::pairs(query) {
        match &*k {
            "n" => {
                let parsed: usize = v.parse().map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "PAGINATION_NUMBER_INVALID",
                        "invalid number of results requested",
                    )
                })?;
                if parsed > MAX_PAGE {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "PAGINATION_NUMBER_INVALID",
                        format!("at most {MAX_PAGE} results may be requested"),
                    ));
                }
                n = Some(parsed);
            }
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok((n, last))
}

/// The items after `last` (sorted input), at most `n`, and the last one
/// returned when more follow.
fn paginate<'a>(all: &'a [String], n: Option<usize>, last: Option<&str>) -> (&'a [String], Option<&'a str>) {
    let start = match last {
        Some(l) => all.partition_point(|x| x.as_str() <= l),
        None => 0,
    };
    let rest = &all[start..];
    match n {
        Some(n) if n < rest.len() => (&rest[..n], rest[..n].last().map(|s| s.as_str())),
        _ => (rest, None),
    }
}

/// The range a request asks of a blob of `size` bytes (`None`: all of
/// it); `Err` when it cannot be satisfied.
fn requested_range(req: &Request<hyper::body::Incoming>, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    match req.headers().get(RANGE) {
        None => Ok(None),
        Some(v) => parse_range(v.to_str().unwrap_or(""), size),
    }
}

/// The 416 answer for a blob of `size` bytes.
fn unsatisfiable(size: u64) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    r.headers_mut().insert(CONTENT_RANGE, value(&format!("bytes */{size}")));
    r
}

/// One `bytes=` range of a blob of `size` bytes, as a half-open span;
/// `Ok(None)` for a header to ignore (several ranges, another unit).
fn parse_range(v: &str, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let span = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            let e: u64 = b.parse().map_err(|_| ())?;
            if e < start {
                return Err(());
            }
            e.saturating_add(1).min(size)
        };
        start..end
    };
    if span.start >= size {
        return Err(());
    }
    Ok(Some(span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_names_at_the_last_keyword() {
        assert_eq!(route("/v2/"), Some(Route::Base));
        assert_eq!(route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(route("/v2/a/b/tags/list"), Some(Route::Tags("a/b")));
        assert_eq!(
            route("/v2/a/manifests/b/manifests/v1"),
            Some(Route::Manifest("a/manifests/b", "v1"))
        );
        assert_eq!(route("/v2/a/blobs/sha256:00"), Some(Route::Blob("a", "sha256:00")));
        assert_eq!(route("/v2/a/blobs/uploads/"), Some(Route::Upload("a", None)));
        assert_eq!(
            route("/v2/a/b/blobs/uploads/0f"),
            Some(Route::Upload("a/b", Some("0f")))
        );
        assert_eq!(route("/v2/a/blobs/uploads/x/y"), None);
        assert_eq!(route("/v1/_ping"), None);
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some(0..10)));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some(90..100)));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some(90..100)));
        assert_eq!(parse_range("bytes=95-200", 100), Ok(Some(95..100)));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=9-3", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }

    #[test]
    fn manifests_are_served_only_as_manifest_types() {
        let m = |t: &str, doc: &str| Manifest {
            media_type: t.to_string(),
            digest: Digest::of(doc.as_bytes()),
            bytes: Bytes::from(doc.to_string()),
        };
        let oci = "application/vnd.oci.image.manifest.v1+json";
        assert_eq!(manifest_content_type(&m(oci, "{}")), oci);
        assert_eq!(manifest_content_type(&m(&format!("{oci}; charset=utf-8"), "{}")), oci);
        let typed = format!(r#"{{"mediaType":"{oci}","config":{{}},"layers":[]}}"#);
        assert_eq!(
            manifest_content_type(&m("text/html", &typed)),
            oci,
            "the document's own"
        );
        assert_eq!(
            manifest_content_type(&m("text/html", "<script>")),
            "application/octet-stream"
        );
    }

    #[test]
    fn pages_continue_after_last() {
        let all: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(paginate(&all, Some(2), None), (&all[..2], Some("b")));
        assert_eq!(paginate(&all, Some(2), Some("b")), (&all[2..], None));
        assert_eq!(paginate(&all, None, Some("a")), (&all[1..], None));
    }
}
