//! The registry's write side (the distribution spec's push and content
//! management endpoints) over a [`RegistryStorage`] (a directory or a bucket):
//!
//! - upload sessions: `POST …/blobs/uploads/` opens one (or, with
//!   `?digest=`, takes a whole blob at once; with `?mount=&from=`, links a
//!   blob another repository holds), `PATCH` appends a chunk (a
//!   `Content-Range` that does not start where the session ends is a 416),
//!   `GET` says how far it got (`Range`), `PUT ?digest=` ends it, `DELETE`
//!   cancels it. A session belongs to the repository that opened it.
//! - a blob becomes visible only when its bytes hashed to the digest the
//!   client named, and after they are on disk;
//! - `PUT …/manifests/REF` takes a manifest of at most 4 MiB whose every
//!   referenced blob (or, for an index, manifest) the repository holds. Its
//!   kind comes from its media type (`Content-Type` and `mediaType` must
//!   agree), by the rule pull reads with (`gantry_core::manifest::kind`):
//!   ambiguous documents and other types are refused, so only the four
//!   manifest types are ever stored, and served back;
//! - `DELETE` of a manifest by digest (and its tags), a tag, or a blob's
//!   link.
//!
//! With an htpasswd file every write needs basic auth; reads stay open.

use crate::api::{empty, value, ApiError, Body};
use crate::htpasswd::Htpasswd;
use crate::registry_storage::{RegistryStorage, UploadSession};
use crate::storage::{Manifest, ManifestRef, StorageError};
use bytes::Bytes;
use gantry_core::digest::Digest;
use gantry_core::manifest::{self, Kind};
use gantry_core::reference::valid_tag;
use gantry_http::query;
use http_body_util::BodyExt;
use hyper::header::{
    HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use std::time::Duration;

/// The largest manifest accepted (distribution's limit).
const MAX_MANIFEST: usize = 4 << 20;

/// The most `tag` parameters one manifest push may carry.
const MAX_TAG_PARAMS: usize = 100;

/// Manifest bytes in memory at once are charged against this budget (in
/// [`BUDGET_UNIT`]s) as they arrive, so manifests in flight never hold more
/// than 64 MiB, and a client trickling a body holds only what it sent:
/// slow clients cannot keep everyone else's manifests waiting.
static MANIFEST_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new((64 << 20) / BUDGET_UNIT);
const BUDGET_UNIT: usize = 4 << 10;

/// How long a manifest's body may take to arrive, in all.
const MANIFEST_DEADLINE: Duration = Duration::from_secs(20);

/// How long a request body may stall between two reads.
const BODY_IDLE: Duration = Duration::from_secs(60);

fn upload_unknown() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
        "blob upload unknown to registry",
    )
}

fn digest_invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", message)
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UploadUnknown => upload_unknown(),
            e @ StorageError::DigestMismatch { .. } => digest_invalid(e.to_string()),
            StorageError::Backend(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", m),
            e @ StorageError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID", e.to_string())
            }
            // As Harbor answers a push past a project's quota.
            e @ StorageError::Quota(_) => ApiError::new(StatusCode::FORBIDDEN, "DENIED", e.to_string()),
            e @ StorageError::TooManyUploads(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", e.to_string())
                    .with_header(RETRY_AFTER, HeaderValue::from_static("60"))
            }
        }
    }
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    Digest::parse_any(s).map_err(|_| digest_invalid("invalid digest"))
}

/// Whether the request may write, answering 401 when it may not, and 429
/// when too many password checks are under way to take another.
pub(crate) async fn authorize(
    htpasswd: Option<&Htpasswd>,
    req: &Request<hyper::body::Incoming>,
) -> Result<(), ApiError> {
    let Some(h) = htpasswd else { return Ok(()) };
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let allowed = h.check(header).await.map_err(|e| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", e.to_string())
            .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
    })?;
    if allowed {
        Ok(())
    } else {
        Err(
            ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "authentication required")
                .with_header(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"gantry\"")),
        )
    }
}

/// Writes a request body into an upload session. What arrived before a
/// failure is kept (the client asks how far it got); a session the failure
/// leaves unusable — past its size cap, or out of step with its file — is
/// cancelled, its bytes removed.
async fn pump<S: RegistryStorage>(
    storage: &S,
    name: &str,
    uuid: &str,
    req: Request<hyper::body::Incoming>,
    slot: &mut Option<S::Upload>,
) -> Result<(), ApiError> {
    let up = slot.as_mut().expect("loaded");
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let charges = match declared {
        Some(n) if up.len().saturating_add(n) > storage.upload_limits().max_size => None,
        _ => quota_charges(storage.upload_limits(), declared).await,
    };
    let result = match (declared, charges) {
        // Refused before a byte is read.
        (Some(n), _) if up.len().saturating_add(n) > storage.upload_limits().max_size => Err(StorageError::TooLarge {
            limit: storage.upload_limits().max_size,
        }
        .into()),
        (_, Some(Err(e))) => Err(StorageError::from(e).into()),
        // Charged its declared length already.
        (Some(_), charges) => copy_body(req.into_body(), up, None).await.map(|()| drop(charges)),
        (None, Some(Ok(c))) => copy_body(req.into_body(), up, Some(&c)).await,
        (None, None) => copy_body(req.into_body(), up, None).await,
    };
    // A session past its size cap or the store's quota goes with its bytes
    // (a client refused so is not expected to come back for it).
    let too_large = result
        .as_ref()
        .is_err_and(|e| e.status() == StatusCode::PAYLOAD_TOO_LARGE || e.status() == StatusCode::FORBIDDEN);
    if !too_large && !up.is_dead() {
        // What arrived is written down, even when the body broke off.
        if let Err(e) = up.persist().await {
            *slot = None;
            return Err(e.into());
        }
    }
    if too_large || up.is_dead() {
        *slot = None;
        let _ = storage.cancel_upload(name, uuid).await;
    }
    result
}

/// The charges of one request against the store's quota, if it has one:
/// its declared length charged at once. The store is walked (when its
/// standing measure is old) on a blocking thread, never the runtime's.
async fn quota_charges(
    limits: &crate::fs_storage::UploadLimits,
    declared: Option<u64>,
) -> Option<Result<gantry_core::store::quota::Charges, gantry_core::store::quota::Exceeded>> {
    let quota = limits.quota.clone()?;
    let charged = tokio::task::spawn_blocking(move || {
        let charges = quota.charges();
        match declared {
            Some(n) => charges.charge(n).map(|()| charges),
            None => {
                quota.measure();
                Ok(charges)
            }
        }
    })
    .await
    .ok()?;
    Some(charged)
}

/// Copies a body into the session, charging `charges` for each piece
/// before it is written (a body of no declared length).
async fn copy_body(
    body: hyper::body::Incoming,
    up: &mut impl UploadSession,
    charges: Option<&gantry_core::store::quota::Charges>,
) -> Result<(), ApiError> {
    let mut body = body;
    loop {
        let frame = tokio::time::timeout(BODY_IDLE, body.frame()).await.map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "BLOB_UPLOAD_INVALID",
                "request body stalled",
            )
        })?;
        match frame {
            None => return Ok(()),
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BLOB_UPLOAD_INVALID",
                    format!("reading the request body: {e}"),
                ))
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    crate::metrics::count_in(data.len());
                    if let Some(c) = charges {
                        c.charge_measured(data.len() as u64).map_err(StorageError::from)?;
                    }
                    up.write(&data).await?;
                }
            }
        }
    }
}

/// Reads a whole request body of at most `limit` bytes.
/// A manifest's body, at most `limit` bytes (`None` past it), with the
/// share of [`MANIFEST_BUDGET`] it holds until dropped.
async fn read_body(
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<Option<(Bytes, Option<tokio::sync::SemaphorePermit<'static>>)>, ApiError> {
    let deadline = tokio::time::Instant::now() + MANIFEST_DEADLINE;
    let stalled = |_| ApiError::new(StatusCode::REQUEST_TIMEOUT, "MANIFEST_INVALID", "request body stalled");
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Option<tokio::sync::SemaphorePermit<'static>> = None;
    while let Some(frame) = tokio::time::timeout_at(deadline, body.frame()).await.map_err(stalled)? {
        let frame = frame.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                format!("reading the request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            return Ok(None);
        }
        let units = (buf.len() + data.len()).div_ceil(BUDGET_UNIT) - held.as_ref().map_or(0, |p| p.num_permits());
        if units > 0 {
            let more = tokio::time::timeout_at(deadline, MANIFEST_BUDGET.acquire_many(units as u32))
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "TOOMANYREQUESTS",
                        "too many manifests in flight",
                    )
                    .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
                })?
                .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "shutting down"))?;
            match &mut held {
                Some(h) => h.merge(more),
                None => held = Some(more),
            }
        }
        crate::metrics::count_in(data.len());
        buf.extend_from_slice(&data);
    }
    Ok(Some((Bytes::from(buf), held)))
}

/// `202 Accepted` for session `uuid` holding `len` bytes.
fn session_response(status: StatusCode, name: &str, uuid: &str, len: u64) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(LOCATION, value(&format!("/v2/{name}/blobs/uploads/{uuid}")));
    // Distribution's convention: an empty session reports `0-0`.
    h.insert(RANGE, value(&format!("0-{}", len.max(1) - 1)));
    h.insert("Docker-Upload-UUID", value(uuid));
    h.insert(CONTENT_LENGTH, HeaderValue::from(0));
    r
}

/// `201 Created` for blob `digest` of `name`.
fn blob_created(name: &str, digest: &Digest) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    h.insert(LOCATION, value(&format!("/v2/{name}/blobs/{digest}")));
    h.insert("Docker-Content-Digest", value(digest.as_str()));
    h.insert(CONTENT_LENGTH, HeaderValue::from(0));
    r
}

fn accepted() -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::ACCEPTED;
    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(0));
    r
}

/// `POST`, `PATCH`, `PUT`, `GET` and `DELETE` of `…/blobs/uploads/[UUID]`.
pub(crate) async fn upload<S: RegistryStorage>(
    storage: &S,
    name: &str,
    uuid: Option<&str>,
    anonymous_mounts: bool,
    owner: Option<&str>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let Some(uuid) = uuid else {
        if method != Method::POST {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "use POST to start an upload",
            ));
        }
        if let Some(mount) = query::param(&req, "mount") {
            let digest = parse_digest(&mount)?;
            match query::param(&req, "from") {
                Some(from) => {
                    if storage.mount_blob(name, &from, &digest).await? {
                        return Ok(blob_created(name, &digest));
                    }
                }
                // Without `from` (OCI 1.1): any blob the registry holds,
                // where every repository may be read by whoever may push.
                None => {
                    if anonymous_mounts && storage.contains_blob(&digest).await? {
                        storage.link_blob(name, &digest).await?;
                        return Ok(blob_created(name, &digest));
                    }
                }
            }
            // Not mountable: a session to upload into, as the spec says.
        }
        let monolithic = match query::param(&req, "digest") {
            Some(d) => Some(parse_digest(&d)?),
            None => None,
        };
        let uuid = storage.start_upload(name, owner).await?;
        if let Some(digest) = monolithic {
            // One request, one blob: a failure leaves no session behind.
            let result = finish(storage, name, &uuid, &digest, req).await;
            if result.is_err() {
                let _ = storage.cancel_upload(name, &uuid).await;
            }
            return result;
        }
        return Ok(session_response(StatusCode::ACCEPTED, name, &uuid, 0));
    };
    match method {
        Method::GET | Method::HEAD => {
            let session = storage.upload(name, uuid).await?;
            let mut slot = session.lock().await;
            storage.load_upload(uuid, &mut slot).await?;
            let len = slot.as_ref().map(|u| u.len()).unwrap_or(0);
            Ok(session_response(StatusCode::NO_CONTENT, name, uuid, len))
        }
        Method::PATCH => {
            let session = storage.upload(name, uuid).await?;
            let mut slot = session.lock().await;
            storage.load_upload(uuid, &mut slot).await?;
            let up = slot.as_mut().expect("loaded");
            if let Some(r) = out_of_order(&req, name, uuid, up.len()) {
                return Ok(r);
            }
            pump(storage, name, uuid, req, &mut slot).await?;
            storage.touch_upload(uuid);
            let len = slot.as_ref().map(|u| u.len()).unwrap_or(0);
            Ok(session_response(StatusCode::ACCEPTED, name, uuid, len))
        }
        Method::PUT => {
            let digest = query::param(&req, "digest").ok_or_else(|| digest_invalid("digest missing"))?;
            let digest = parse_digest(&digest)?;
            finish(storage, name, uuid, &digest, req).await
        }
        Method::DELETE => {
            storage.cancel_upload(name, uuid).await?;
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        _ => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "method not allowed",
        )),
    }
}

/// The answer to a chunk whose `Content-Range` does not start where the
/// session ends (416, with the session's length), if it does not.
fn out_of_order(req: &Request<hyper::body::Incoming>, name: &str, uuid: &str, len: u64) -> Option<Response<Body>> {
    let range = req.headers().get("content-range")?;
    let start = range
        .to_str()
        .ok()?
        .trim()
        .trim_start_matches("bytes ")
        .split(['-', '/'])
        .next()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if start == Some(len) {
        return None;
    }
    let mut r = session_response(StatusCode::RANGE_NOT_SATISFIABLE, name, uuid, len);
    let body = serde_json::json!({"errors": [{"code": "BLOB_UPLOAD_INVALID", "message": "chunk out of order: the session holds a different length", "detail": null}]});
    let bytes = serde_json::to_vec(&body).expect("serialisable");
    r.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    *r.body_mut() = crate::api::full(bytes);
    Some(r)
}

/// Writes the last chunk (the request's body, maybe empty) and ends the
/// session as `digest`. A mismatch cancels the session: nothing is kept.
async fn finish<S: RegistryStorage>(
    storage: &S,
    name: &str,
    uuid: &str,
    digest: &Digest,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let session = storage.upload(name, uuid).await?;
    let mut slot = session.lock().await;
    storage.load_upload(uuid, &mut slot).await?;
    let len = slot.as_ref().map(|u| u.len()).unwrap_or(0);
    if let Some(r) = out_of_order(&req, name, uuid, len) {
        return Ok(r);
    }
    pump(storage, name, uuid, req, &mut slot).await?;
    match storage.finish_upload(name, uuid, &mut slot, digest).await {
        Ok(()) => Ok(blob_created(name, digest)),
        Err(e @ StorageError::DigestMismatch { .. }) => {
            *slot = None;
            let _ = storage.cancel_upload(name, uuid).await;
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The digests a manifest of `kind` names that must already be in the
/// repository: blobs (config and layers; a foreign layer with `urls` is not
/// held), or for an index, manifests.
fn references(kind: Kind, doc: &serde_json::Value) -> Result<(Vec<Digest>, Vec<Digest>), ApiError> {
    let invalid = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", m.to_string());
    if doc.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
        return Err(invalid("manifest invalid: only schemaVersion 2 is accepted"));
    }
    let digest_of = |d: &serde_json::Value| -> Result<Digest, ApiError> {
        d.get("digest")
            .and_then(|v| v.as_str())
            .ok_or_else(|| invalid("manifest invalid: a descriptor has no digest"))
            .and_then(parse_digest)
    };
    let list = |key: &str| {
        doc.get(key)
            .and_then(|l| l.as_array())
            .ok_or_else(|| invalid(&format!("manifest invalid: no \"{key}\" array")))
    };
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    match kind {
        Kind::Index => {
            for m in list("manifests")? {
                manifests.push(digest_of(m)?);
            }
        }
        Kind::Image => {
            let config = doc
                .get("config")
                .ok_or_else(|| invalid("manifest invalid: no config"))?;
            blobs.push(digest_of(config)?);
            for l in list("layers")? {
                let foreign = l.get("urls").and_then(|u| u.as_array()).is_some_and(|u| !u.is_empty());
                if !foreign {
                    blobs.push(digest_of(l)?);
                }
            }
        }
    }
    Ok((blobs, manifests))
}

/// `PUT …/manifests/REF`.
pub(crate) async fn put_manifest<S: RegistryStorage>(
    storage: &S,
    name: &str,
    reference: ManifestRef,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string());
    let tag_params = query::params(&req, "tag");
    let (bytes, _budget) = read_body(req.into_body(), MAX_MANIFEST).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "MANIFEST_INVALID",
            "manifest is larger than 4 MiB",
        )
    })?;
    // By digest, the client's algorithm names it; by tag, sha256 (the
    // canonical one, as distribution's).
    let digest = match &reference {
        ManifestRef::Digest(d) => Digest::of_with(d.algorithm(), &bytes),
        ManifestRef::Tag(_) => Digest::of(&bytes),
    };
    if let ManifestRef::Digest(d) = &reference {
        if *d != digest {
            return Err(digest_invalid(format!("manifest is {digest}, not {d}")));
        }
    }
    let doc: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("manifest invalid: {e}"),
        )
    })?;
    // The kind is the media type's (pull's rule), never the fields'; what
    // is stored, and served back as `Content-Type`, is one of the four
    // manifest types.
    let (media_type, kind) = manifest::kind(content_type.as_deref().unwrap_or(""), &doc).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            format!("manifest invalid: {}", gantry_core::text::escape_line(&e.to_string())),
        )
    })?;
    let (blobs, manifests) = references(kind, &doc)?;
    // OCI 1.1: a manifest may name the manifest it is about (a signature,
    // an SBOM); that one need not be here yet.
    let subject = match doc.get("subject") {
        None => None,
        Some(s) => Some(
            s.get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| Digest::parse_any(d).ok())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_INVALID",
                        "manifest invalid: its subject has no valid digest",
                    )
                })?,
        ),
    };
    // By tag, that tag; by digest, the `tag` parameters (OCI 1.1: how a
    // manifest named by a non-canonical digest gets tags).
    let tags: Vec<&str> = match &reference {
        ManifestRef::Tag(t) => vec![t.as_str()],
        ManifestRef::Digest(_) => tag_params.iter().map(String::as_str).collect(),
    };
    if tags.len() > MAX_TAG_PARAMS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            format!("at most {MAX_TAG_PARAMS} tags in one push"),
        ));
    }
    if let Some(bad) = tags.iter().find(|t| !valid_tag(t)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            format!("invalid tag {}", gantry_core::text::escape_line(bad)),
        ));
    }
    // Last of the checks (a refused push claims nothing): each named blob
    // and manifest is claimed before the manifest is
    // stored, so a collection under way either sees the claim and spares
    // it, or has taken it and this push is refused.
    let mut named: Vec<Digest> = blobs.iter().chain(&manifests).cloned().collect();
    named.sort();
    named.dedup();
    let missing = storage.claim_blobs(name, &named).await?;
    if let Some(b) = blobs.iter().find(|b| missing.contains(b)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_BLOB_UNKNOWN",
            format!("blob unknown to registry: {b}"),
        ));
    }
    for m in &manifests {
        if missing.contains(m) || storage.manifest(name, &ManifestRef::Digest(m.clone())).await?.is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "MANIFEST_UNKNOWN",
                format!("manifest unknown: {m}"),
            ));
        }
    }
    let size = bytes.len();
    // Manifests are small, but without end in number: charged too.
    let _charges = match quota_charges(storage.upload_limits(), Some(size as u64)).await {
        Some(Err(e)) => return Err(StorageError::from(e).into()),
        charges => charges,
    };
    // The referrer record first: one whose manifest never arrives is not
    // listed, while a manifest stored without its record would be missing.
    if let Some(subject) = &subject {
        storage
            .add_referrer(name, subject, &digest, &referrer(kind, media_type, &digest, size, &doc))
            .await?;
    }
    storage
        .put_manifest(
            name,
            &Manifest {
                media_type: media_type.to_string(),
                digest: digest.clone(),
                bytes,
            },
            &tags,
        )
        .await?;
    let mut r = Response::new(empty());
    *r.status_mut() = StatusCode::CREATED;
    let h = r.headers_mut();
    if let Some(subject) = &subject {
        h.insert("OCI-Subject", value(subject.as_str()));
    }
    if matches!(reference, ManifestRef::Digest(_)) {
        for t in &tags {
            h.append("OCI-Tag", value(t));
        }
    }
    h.insert(LOCATION, value(&format!("/v2/{name}/manifests/{digest}")));
    h.insert("Docker-Content-Digest", value(digest.as_str()));
    h.insert(CONTENT_LENGTH, HeaderValue::from(0));
    Ok(r)
}

/// The descriptor the referrers API lists for a manifest: its
/// `artifactType` (for an image manifest without one, its config's media
/// type, as OCI 1.1 says) and its annotations.
fn referrer(kind: Kind, media_type: &str, digest: &Digest, size: usize, doc: &serde_json::Value) -> serde_json::Value {
    let mut d = serde_json::json!({
        "mediaType": media_type,
        "digest": digest.as_str(),
        "size": size,
    });
    let artifact_type = doc.get("artifactType").and_then(|a| a.as_str()).or(match kind {
        Kind::Image => doc
            .get("config")
            .and_then(|c| c.get("mediaType"))
            .and_then(|m| m.as_str()),
        Kind::Index => None,
    });
    if let Some(a) = artifact_type {
        d["artifactType"] = a.into();
    }
    if let Some(a) = doc.get("annotations").filter(|a| a.is_object()) {
        d["annotations"] = a.clone();
    }
    d
}

/// `DELETE …/manifests/REF`: by digest, the manifest and its tags; by tag,
/// the tag.
pub(crate) async fn delete_manifest<S: RegistryStorage>(
    storage: &S,
    name: &str,
    reference: &ManifestRef,
) -> Result<Response<Body>, ApiError> {
    let found = match reference {
        ManifestRef::Digest(d) => storage.delete_manifest(name, d).await?,
        ManifestRef::Tag(t) => valid_tag(t) && storage.delete_tag(name, t).await?,
    };
    if found {
        Ok(accepted())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        ))
    }
}

/// `DELETE …/blobs/DIGEST`.
pub(crate) async fn delete_blob<S: RegistryStorage>(
    storage: &S,
    name: &str,
    digest: &Digest,
) -> Result<Response<Body>, ApiError> {
    if storage.delete_blob(name, digest).await? {
        Ok(accepted())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_name_their_blobs_and_foreign_layers_are_not_held() {
        let doc = serde_json::json!({
            "schemaVersion": 2,
            "config": {"digest": format!("sha256:{}", "a".repeat(64))},
            "layers": [
                {"digest": format!("sha256:{}", "b".repeat(64))},
                {"digest": format!("sha256:{}", "c".repeat(64)), "urls": ["https://example.com/x"]},
            ]
        });
        let (blobs, manifests) = references(Kind::Image, &doc).unwrap();
        assert_eq!(blobs.len(), 2);
        assert!(manifests.is_empty());
        assert!(references(Kind::Image, &serde_json::json!({"schemaVersion": 1})).is_err());
        assert!(references(Kind::Index, &doc).is_err(), "an index needs manifests");
    }
}
