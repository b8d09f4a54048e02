//! The registry's own storage on an object store (the S3 API), so that
//! replicas keep nothing on their own disks and any of them answers any
//! request — a session another started included. Keys, under the
//! configured prefix:
//!
//! ```text
//! blobs/{sha256,sha512}/<hex>                  verified blobs and manifests
//! repositories/<name>/_blobs/<hex>             the blob is linked to the repository
//! repositories/<name>/_manifests/<hex>         the manifest's media type
//! repositories/<name>/_tags/<tag>              {"digest", "fetched"}
//! repositories/<name>/_referrers/<subject hex>/<hex>
//!                                              a referrer's descriptor (OCI 1.1)
//! _repositories/<name>/_                       the catalog: one empty object a name
//!                                              (never a prefix of another's key: object
//!                                              stores on a file tree refuse those)
//! _linked/<alg>/<hex>                          when a manifest last claimed the blob
//! _gc/<alg>/<hex>                              the collector means to remove the blob
//! _uploads/<uuid>/{state,tail,data-<rand>}     an upload session
//! ```
//!
//! An upload session is an S3 multipart upload of `_uploads/<uuid>/data`
//! plus a state object: the repository, the parts' ETags, and the SHA-256
//! state of every byte so far ([`Sha256State`]), so the replica a chunk
//! reaches hashes only that chunk. Bytes that do not yet fill a part (parts
//! are at least 5 MiB but the last) wait in the `tail` object. A blob
//! becomes visible (`blobs/…`) only once its bytes hashed to its digest:
//! small ones by one `PUT`, larger ones by a server-side copy of the
//! completed upload. The same blob pushed through two replicas at once is
//! written twice to the same key: one object, the same bytes.

use crate::fs_storage::{valid_uuid, TagEntry, UploadLimits, MAX_REFERRERS_PAGE, MAX_REFERRER_RECORD};
use crate::registry_storage::{RegistryStorage, SessionLock, UploadSession};
use crate::s3_client::S3Client;
use crate::sha256_state::Sha256State;
use crate::storage::{BlobBody, Manifest, ManifestRef, StorageError};
use bytes::{Bytes, BytesMut};
use gantry_core::digest::{Algorithm, Digest};
use gantry_core::manifest::MAX_MANIFEST_BYTES;
use gantry_core::reference::{valid_repository, valid_tag};
use http_body_util::BodyExt;
use sha2::Digest as _;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The default size of an upload's parts (S3 wants at least 5 MiB).
pub const DEFAULT_PART_SIZE: usize = 8 << 20;

/// Parts of one upload on their way at once.
const PARTS_IN_FLIGHT: usize = 4;

/// The smallest part S3 takes (but the last).
pub const MIN_PART_SIZE: usize = 5 << 20;

/// The most a small record (a tag, a media type, a link) may hold.
const SMALL: usize = 1 << 20;

/// How long a redirect to the object store stays valid.
const REDIRECT_VALID: Duration = Duration::from_secs(20 * 60);

pub struct S3Storage {
    s3: Arc<S3Client>,
    limits: UploadLimits,
    part_size: usize,
    redirect: bool,
    /// The sessions this process started or was asked about: a lock each
    /// (a replica serves one request of a session at a time), and what the
    /// caps count.
    sessions: Mutex<HashMap<String, LocalSession>>,
    /// Manifest answers kept this long (zero: none), by repository and
    /// reference: a tag moved through another replica shows here after at
    /// most this long; through this one, at once.
    cache_ttl: Duration,
    answers: Mutex<HashMap<(String, String), (Instant, Manifest)>>,
}

/// The most manifest answers kept.
const MAX_CACHED_ANSWERS: usize = 4096;

struct LocalSession {
    repo: String,
    owner: Option<String>,
    touched: Instant,
    state: Arc<tokio::sync::Mutex<Option<S3Upload>>>,
}

/// What a session's state object holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SessionState {
    repo: String,
    owner: Option<String>,
    /// The multipart upload's id, once a part was written.
    multipart: Option<String>,
    /// The ETags of the parts written, part 1 first.
    parts: Vec<String>,
    sha256: Sha256State,
    /// How many bytes the tail object holds, and their SHA-256 (hex):
    /// a tail another request wrote since is refused, not used.
    tail: u64,
    #[serde(default)]
    tail_sha256: String,
    /// The multipart upload's object, of this session's own generation
    /// (`data-<random>`): two requests racing to begin one never share it.
    #[serde(default)]
    data: Option<String>,
}

/// An upload session as one request sees it.
pub struct S3Upload {
    uuid: String,
    s3: Arc<S3Client>,
    state: SessionState,
    /// The bytes not yet in a part: the tail, then what this request sent.
    buf: BytesMut,
    /// The parts on their way, in order (at most [`PARTS_IN_FLIGHT`]).
    pending: std::collections::VecDeque<tokio::task::JoinHandle<Result<String, StorageError>>>,
    max: u64,
    part_size: usize,
    /// A part failed: what this request sent is lost, and only the state
    /// last written (before the request) counts.
    lost: bool,
}

impl S3Upload {
    fn data_key(&self) -> String {
        data_key(&self.uuid, &self.state)
    }

    async fn send_part(&mut self, part: Bytes) -> Result<(), StorageError> {
        while self.pending.len() >= PARTS_IN_FLIGHT {
            self.settle_one().await?;
        }
        let id = match &self.state.multipart {
            Some(id) => id.clone(),
            None => {
                self.state.data = Some(format!("data-{}", &gantry_core::store::random_id()[..16]));
                let id = self.s3.create_multipart(&self.data_key()).await?;
                self.state.multipart = Some(id.clone());
                id
            }
        };
        let number = u16::try_from(self.state.parts.len() + self.pending.len() + 1)
            .map_err(|_| StorageError::Backend("an upload may have at most 10000 parts".into()))?;
        let (s3, key) = (self.s3.clone(), self.data_key());
        self.pending.push_back(tokio::spawn(
            async move { s3.upload_part(&key, &id, number, part).await },
        ));
        Ok(())
    }

    /// Waits for every part on its way.
    async fn settle(&mut self) -> Result<(), StorageError> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Waits for the oldest part on its way.
    async fn settle_one(&mut self) -> Result<(), StorageError> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        let etag = p
            .await
            .map_err(|e| StorageError::Backend(format!("uploading a part: {e}")))??;
        self.state.parts.push(etag);
        // A long request keeps its session from the sweepers' expiry
        // (every 64 MiB or so).
        if self.state.parts.len().is_multiple_of(8) {
            self.s3
                .put(&format!("_uploads/{}/alive", self.uuid), Bytes::new())
                .await?;
        }
        Ok(())
    }
}

impl UploadSession for S3Upload {
    fn len(&self) -> u64 {
        self.state.sha256.len()
    }

    /// Never: a lost part costs only the request it came in (the state
    /// written before it still stands), not the session.
    fn is_dead(&self) -> bool {
        false
    }

    /// Appends `chunk`; past the size cap nothing of it is taken. Whole
    /// parts go to the object store as they fill, one while the next fills.
    async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        if self.lost {
            return Err(StorageError::Backend(
                "the upload lost a part; ask how far it got".into(),
            ));
        }
        if self.len().saturating_add(chunk.len() as u64) > self.max {
            return Err(StorageError::TooLarge { limit: self.max });
        }
        self.state.sha256.update(chunk);
        self.buf.extend_from_slice(chunk);
        while self.buf.len() >= self.part_size {
            let part = self.buf.split_to(self.part_size).freeze();
            if let Err(e) = self.send_part(part).await {
                self.lost = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes down where the session stands (after a request's body): the
    /// parts, the hash state, the tail.
    async fn persist(&mut self) -> Result<(), StorageError> {
        if self.lost {
            return Err(StorageError::Backend(
                "the upload lost a part; ask how far it got".into(),
            ));
        }
        if let Err(e) = self.settle().await {
            self.lost = true;
            return Err(e);
        }
        if !self.buf.is_empty() {
            self.s3
                .put(
                    &format!("_uploads/{}/tail", self.uuid),
                    Bytes::copy_from_slice(&self.buf),
                )
                .await?;
        }
        self.state.tail = self.buf.len() as u64;
        self.state.tail_sha256 = hex_of(&sha2::Sha256::digest(&self.buf));
        self.s3
            .put(
                &format!("_uploads/{}/state", self.uuid),
                Bytes::from(serde_json::to_vec(&self.state).expect("serialisable")),
            )
            .await
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Forgets the sessions no request here touched for `expiry` (one a
/// request holds stays): they are still in the bucket for whoever asks.
fn forget_stale(map: &mut HashMap<String, LocalSession>, expiry: Duration) {
    map.retain(|_, s| s.touched.elapsed() < expiry || s.state.try_lock().is_err());
}

fn repo_prefix(repo: &str) -> Result<String, StorageError> {
    if !valid_repository(repo) {
        return Err(StorageError::Backend(format!(
            "invalid repository name {}",
            gantry_core::text::escape_line(repo)
        )));
    }
    Ok(format!("repositories/{repo}/"))
}

pub fn blob_key(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().name(), d.hex())
}

impl S3Storage {
    /// The storage in `s3`'s bucket; manifest answers kept `cache_ttl`.
    pub fn new(s3: S3Client, limits: UploadLimits, part_size: usize, redirect: bool, cache_ttl: Duration) -> S3Storage {
        S3Storage {
            s3: Arc::new(s3),
            limits,
            part_size: part_size.max(MIN_PART_SIZE),
            redirect,
            sessions: Mutex::new(HashMap::new()),
            cache_ttl,
            answers: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self) -> &S3Client {
        &self.s3
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagEntry>, StorageError> {
        if !valid_tag(tag) {
            return Ok(None);
        }
        let key = format!("{}_tags/{tag}", repo_prefix(repo)?);
        Ok(self
            .s3
            .get(&key, SMALL)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Manifest)>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the kept answers of `repo` (after this replica changed it).
    fn forget(&self, repo: &str) {
        if !self.cache_ttl.is_zero() {
            self.cached().retain(|(r, _), _| r != repo);
        }
    }

    async fn manifest_uncached(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        let digest = match reference {
            ManifestRef::Digest(d) => d.clone(),
            ManifestRef::Tag(t) => match self.tag(repo, t).await? {
                Some(e) => e.digest,
                None => return Ok(None),
            },
        };
        let record = format!("{}_manifests/{}", repo_prefix(repo)?, digest.hex());
        let bytes_key = blob_key(&digest);
        let (media_type, bytes) =
            tokio::join!(self.s3.get(&record, SMALL), self.s3.get(&bytes_key, MAX_MANIFEST_BYTES));
        let (Some(media_type), Some(bytes)) = (media_type?, bytes?) else {
            return Ok(None);
        };
        Ok(Some(Manifest {
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            digest,
            bytes,
        }))
    }

    async fn linked(&self, repo: &str, d: &Digest) -> Result<bool, StorageError> {
        let p = repo_prefix(repo)?;
        let (blob_link, manifest_record) = (format!("{p}_blobs/{}", d.hex()), format!("{p}_manifests/{}", d.hex()));
        let (blob, manifest) = tokio::join!(self.s3.head(&blob_link), self.s3.head(&manifest_record));
        Ok(blob?.is_some() || manifest?.is_some())
    }

    /// Notes that the blob was just claimed, for the collector's grace.
    async fn mark_linked(&self, digest: &Digest) -> Result<(), StorageError> {
        self.s3
            .put(&linked_key(digest), Bytes::from(now_secs().to_string()))
            .await
    }

    /// Claims `d` for a manifest of `repo`: whether it is the repository's,
    /// not on its way out, and held.
    async fn claim_one(&self, repo: &str, d: &Digest) -> Result<bool, StorageError> {
        if !self.linked(repo, d).await? {
            return Ok(false);
        }
        self.mark_linked(d).await?;
        if self.s3.head(&gc_key(d)).await?.is_some() {
            return Ok(false);
        }
        Ok(self.s3.head(&blob_key(d)).await?.is_some())
    }

    async fn read_state(&self, uuid: &str) -> Result<Option<SessionState>, StorageError> {
        let Some(b) = self.s3.get(&format!("_uploads/{uuid}/state"), 1 << 20).await? else {
            return Ok(None);
        };
        let state: SessionState = serde_json::from_slice(&b)
            .map_err(|e| StorageError::Backend(format!("upload session {uuid} is damaged: {e}")))?;
        Ok(Some(state))
    }

    /// The digest of what object `key` holds.
    async fn hash_object(&self, key: &str, algorithm: Algorithm) -> Result<Digest, StorageError> {
        let (mut body, _) = self
            .s3
            .get_range(key, 0..0)
            .await?
            .ok_or_else(|| StorageError::Backend(format!("object store: {key} vanished")))?;
        let mut h = gantry_core::digest::Hasher::new(algorithm);
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
            .await
            .map_err(|_| StorageError::Backend(format!("object store: {key} stopped coming")))?
        {
            let frame = frame.map_err(|e| StorageError::Backend(format!("object store: reading {key}: {e}")))?;
            if let Ok(d) = frame.into_data() {
                h.update(&d);
            }
        }
        Ok(h.digest())
    }

    async fn drop_upload(&self, uuid: &str, state: Option<SessionState>) -> Result<(), StorageError> {
        let state = match state {
            Some(s) => Some(s),
            None => self.read_state(uuid).await.ok().flatten(),
        };
        let Some(state) = state else {
            // Unreadable: kept, so its multipart upload is not lost track of.
            return Err(StorageError::Backend(format!("upload session {uuid} cannot be read")));
        };
        let data = data_key(uuid, &state);
        if let Some(id) = &state.multipart {
            let _ = self.s3.abort_multipart(&data, id).await;
        }
        for k in [
            data,
            format!("_uploads/{uuid}/tail"),
            format!("_uploads/{uuid}/alive"),
            format!("_uploads/{uuid}/state"),
        ] {
            self.s3.delete(&k).await?;
        }
        self.sessions().remove(uuid);
        Ok(())
    }

    /// Removes the sessions whose state no replica touched for longer than
    /// the expiry (each replica sweeps; a session a request here holds is
    /// spared). How many went.
    async fn sweep_expired(&self) -> Result<usize, StorageError> {
        let expiry = self.limits.expiry;
        let now = SystemTime::now();
        let mut gone = 0;
        let listed = self.s3.list("_uploads/").await?;
        // A session's age: since its state or its last part, whichever is later.
        let mut touched: HashMap<&str, SystemTime> = HashMap::new();
        for l in &listed {
            if let Some((uuid, _)) = l.key.strip_prefix("_uploads/").and_then(|k| k.split_once('/')) {
                let t = touched.entry(uuid).or_insert(l.modified);
                *t = (*t).max(l.modified);
            }
        }
        for l in &listed {
            let Some(uuid) = l.key.strip_prefix("_uploads/").and_then(|k| k.strip_suffix("/state")) else {
                continue;
            };
            let age = touched.get(uuid).map(|t| now.duration_since(*t).unwrap_or_default());
            if !valid_uuid(uuid) || age.unwrap_or_default() < expiry {
                continue;
            }
            let held = self.sessions().get(uuid).is_some_and(|s| s.state.try_lock().is_err());
            if held {
                continue;
            }
            let state = self.read_state(uuid).await.ok().flatten();
            if self.drop_upload(uuid, state).await.is_ok() {
                gone += 1;
            }
        }
        forget_stale(&mut self.sessions(), self.limits.expiry);
        Ok(gone)
    }
}

impl RegistryStorage for S3Storage {
    type Upload = S3Upload;

    fn upload_limits(&self) -> &UploadLimits {
        &self.limits
    }

    fn uploads_open(&self) -> usize {
        self.sessions().len()
    }

    /// Whether the bucket answers: a listing, and an object written and removed.
    async fn check(&self) -> Result<(), StorageError> {
        self.s3.list_after("_repositories/", None, 1).await?;
        let probe = format!("_uploads/probe-{}", gantry_core::store::random_id());
        self.s3.put(&probe, Bytes::new()).await?;
        self.s3.delete(&probe).await
    }

    async fn catalog(&self) -> Result<Vec<String>, StorageError> {
        let mut names: Vec<String> = self
            .s3
            .list("_repositories/")
            .await?
            .into_iter()
            .filter_map(|l| {
                l.key
                    .strip_prefix("_repositories/")
                    .and_then(|k| k.strip_suffix("/_"))
                    .map(str::to_string)
            })
            .filter(|n| valid_repository(n))
            .collect();
        names.sort();
        Ok(names)
    }

    async fn has_repository(&self, repo: &str) -> Result<bool, StorageError> {
        if !valid_repository(repo) {
            return Ok(false);
        }
        Ok(self.s3.head(&catalog_key(repo)).await?.is_some())
    }

    async fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        if !self.has_repository(repo).await? {
            return Ok(None);
        }
        let prefix = format!("{}_tags/", repo_prefix(repo)?);
        let mut tags: Vec<String> = self
            .s3
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|l| l.key.strip_prefix(&prefix).map(str::to_string))
            .filter(|t| valid_tag(t))
            .collect();
        tags.sort();
        Ok(Some(tags))
    }

    async fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        let key = (
            repo.to_string(),
            match reference {
                ManifestRef::Tag(t) => t.clone(),
                ManifestRef::Digest(d) => d.to_string(),
            },
        );
        if !self.cache_ttl.is_zero() {
            if let Some((at, m)) = self.cached().get(&key) {
                if at.elapsed() < self.cache_ttl {
                    return Ok(Some(m.clone()));
                }
            }
        }
        let m = self.manifest_uncached(repo, reference).await?;
        if let (false, Some(m)) = (self.cache_ttl.is_zero(), &m) {
            let mut cache = self.cached();
            if cache.len() >= MAX_CACHED_ANSWERS {
                let ttl = self.cache_ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= MAX_CACHED_ANSWERS {
                    cache.clear();
                }
            }
            cache.insert(key, (Instant::now(), m.clone()));
        }
        Ok(m)
    }

    async fn blob_size(&self, repo: &str, d: &Digest) -> Result<Option<u64>, StorageError> {
        let key = blob_key(d);
        let (linked, size) = tokio::join!(self.linked(repo, d), self.s3.head(&key));
        if !linked? {
            return Ok(None);
        }
        size
    }

    /// The repository's hold on `d` was just checked by `blob_size` (the
    /// handler's first call): not asked of the bucket a second time.
    async fn blob(&self, _repo: &str, d: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        let Some((body, _)) = self.s3.get_range(&blob_key(d), range).await? else {
            return Ok(None);
        };
        Ok(Some(body.map_err(std::io::Error::other).boxed()))
    }

    /// Where a client may fetch blob `d` itself, when the storage sends
    /// clients to the object store (`redirect = true`).
    fn redirect(&self, d: &Digest) -> Option<String> {
        self.redirect
            .then(|| self.s3.presigned_get(&blob_key(d), REDIRECT_VALID).to_string())
    }

    async fn contains_blob(&self, d: &Digest) -> Result<bool, StorageError> {
        Ok(self.s3.head(&blob_key(d)).await?.is_some())
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, bool), StorageError> {
        let p = repo_prefix(repo)?;
        let prefix = format!("{p}_referrers/{}/", subject.hex());
        let mut after = after.map(|a| format!("{prefix}{a}"));
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        // A listing page at a time, until a page of the answer is full.
        loop {
            let listed = self.s3.list_after(&prefix, after.as_deref(), 1000).await?;
            let last_page = listed.len() < 1000;
            for l in &listed {
                let Some(hex) = l.key.strip_prefix(&prefix) else {
                    continue;
                };
                if self.s3.head(&format!("{p}_manifests/{hex}")).await?.is_none() {
                    continue;
                }
                let Some(record) = self.s3.get(&l.key, MAX_REFERRER_RECORD * 2).await? else {
                    continue;
                };
                if bytes + record.len() > MAX_REFERRERS_PAGE && !out.is_empty() {
                    return Ok((out, true));
                }
                bytes += record.len();
                out.extend(serde_json::from_slice::<serde_json::Value>(&record).ok());
            }
            match listed.last() {
                Some(l) if !last_page => after = Some(l.key.clone()),
                _ => return Ok((out, false)),
            }
        }
    }

    /// Records that `repo` holds blob `digest` (already stored).
    async fn link_blob(&self, repo: &str, digest: &Digest) -> Result<(), StorageError> {
        let p = repo_prefix(repo)?;
        let link = format!("{p}_blobs/{}", digest.hex());
        let (a, b) = tokio::join!(self.s3.put(&link, Bytes::new()), self.mark_linked(digest));
        a.and(b)
    }

    async fn mount_blob(&self, repo: &str, from: &str, digest: &Digest) -> Result<bool, StorageError> {
        if !valid_repository(from) || !self.linked(from, digest).await? || !self.contains_blob(digest).await? {
            return Ok(false);
        }
        self.link_blob(repo, digest).await?;
        Ok(true)
    }

    /// A manifest of `repo` is about to name these blobs: each must be the
    /// repository's and stored, and is claimed now (its link and claim
    /// refreshed, then checked not to be on its way out), so a collection
    /// running beside this push either sees the claim or is seen by it.
    /// The digests not held.
    async fn claim_blobs(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        repo_prefix(repo)?;
        let mut missing = Vec::new();
        // A handful at a time: a manifest may name thousands.
        for group in digests.chunks(16) {
            let held = futures_util::future::join_all(group.iter().map(|d| self.claim_one(repo, d))).await;
            for (d, h) in group.iter().zip(held) {
                if !h? {
                    missing.push(d.clone());
                }
            }
        }
        Ok(missing)
    }

    async fn put_manifest(&self, repo: &str, m: &Manifest, tags: &[&str]) -> Result<(), StorageError> {
        self.forget(repo);
        m.check(tags)?;
        let p = repo_prefix(repo)?;
        // Claimed before it is written, as the blobs it names were.
        self.mark_linked(&m.digest).await?;
        if self.s3.head(&gc_key(&m.digest)).await?.is_some() {
            return Err(being_collected());
        }
        self.s3.put(&blob_key(&m.digest), m.bytes.clone()).await?;
        self.s3
            .put(
                &format!("{p}_manifests/{}", m.digest.hex()),
                Bytes::from(m.media_type.clone()),
            )
            .await?;
        self.s3.put(&catalog_key(repo), Bytes::new()).await?;
        for tag in tags {
            let entry = TagEntry {
                digest: m.digest.clone(),
                fetched: now_secs(),
            };
            self.s3
                .put(
                    &format!("{p}_tags/{tag}"),
                    Bytes::from(serde_json::to_vec(&entry).expect("serialisable")),
                )
                .await?;
        }
        self.forget(repo);
        Ok(())
    }

    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        of: &Digest,
        descriptor: &serde_json::Value,
    ) -> Result<(), StorageError> {
        let p = repo_prefix(repo)?;
        let record = crate::fs_storage::referrer_record(descriptor);
        self.s3
            .put(
                &format!("{p}_referrers/{}/{}", subject.hex(), of.hex()),
                Bytes::from(record),
            )
            .await
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool, StorageError> {
        self.forget(repo);
        let p = repo_prefix(repo)?;
        let record = format!("{p}_manifests/{}", digest.hex());
        if self.s3.head(&record).await?.is_none() {
            return Ok(false);
        }
        let bytes = self
            .s3
            .get(&blob_key(digest), MAX_MANIFEST_BYTES)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Some(subject) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|doc| Digest::parse_any(doc.get("subject")?.get("digest")?.as_str()?).ok())
        {
            let _ = self
                .s3
                .delete(&format!("{p}_referrers/{}/{}", subject.hex(), digest.hex()))
                .await;
        }
        self.s3.delete(&record).await?;
        for tag in self.tags(repo).await?.unwrap_or_default() {
            if self.tag(repo, &tag).await?.is_some_and(|t| t.digest == *digest) {
                self.s3.delete(&format!("{p}_tags/{tag}")).await?;
            }
        }
        self.forget(repo);
        Ok(true)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StorageError> {
        self.forget(repo);
        if !valid_tag(tag) {
            return Ok(false);
        }
        let key = format!("{}_tags/{tag}", repo_prefix(repo)?);
        if self.s3.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.s3.delete(&key).await?;
        self.forget(repo);
        Ok(true)
    }

    async fn delete_blob(&self, repo: &str, digest: &Digest) -> Result<bool, StorageError> {
        let key = format!("{}_blobs/{}", repo_prefix(repo)?, digest.hex());
        if self.s3.head(&key).await?.is_none() {
            return Ok(false);
        }
        self.s3.delete(&key).await?;
        Ok(true)
    }

    /// Starts an upload session for `repo`; its id. Refused past the
    /// session caps, which count the sessions this replica knows of.
    async fn start_upload(&self, repo: &str, owner: Option<&str>) -> Result<String, StorageError> {
        repo_prefix(repo)?;
        {
            let mut map = self.sessions();
            forget_stale(&mut map, self.limits.expiry);
            if map.len() >= self.limits.max_sessions {
                return Err(StorageError::TooManyUploads(format!(
                    "{} upload sessions are open",
                    map.len()
                )));
            }
            if map.values().filter(|s| s.repo == repo).count() >= self.limits.max_per_repository {
                return Err(StorageError::TooManyUploads("too many for this repository".into()));
            }
            let per_owner = (self.limits.max_sessions / 4).max(1);
            if let Some(o) = owner {
                if map.values().filter(|s| s.owner.as_deref() == Some(o)).count() >= per_owner {
                    return Err(StorageError::TooManyUploads("too many for this user".into()));
                }
            }
        }
        let uuid = gantry_core::store::random_id()[..32].to_string();
        let state = SessionState {
            repo: repo.to_string(),
            owner: owner.map(str::to_string),
            multipart: None,
            parts: Vec::new(),
            sha256: Sha256State::default(),
            tail: 0,
            tail_sha256: String::new(),
            data: None,
        };
        self.s3
            .put(
                &format!("_uploads/{uuid}/state"),
                Bytes::from(serde_json::to_vec(&state).expect("serialisable")),
            )
            .await?;
        self.sessions().insert(
            uuid.clone(),
            LocalSession {
                repo: repo.to_string(),
                owner: owner.map(str::to_string),
                touched: Instant::now(),
                state: Arc::default(),
            },
        );
        Ok(uuid)
    }

    /// The lock of session `uuid` of `repo` (a session another replica
    /// started is looked up in the bucket).
    async fn upload(&self, repo: &str, uuid: &str) -> Result<SessionLock<S3Upload>, StorageError> {
        if !valid_uuid(uuid) {
            return Err(StorageError::UploadUnknown);
        }
        if let Some(s) = self.sessions().get_mut(uuid) {
            if s.repo != repo {
                return Err(StorageError::UploadUnknown);
            }
            s.touched = Instant::now();
            return Ok(s.state.clone());
        }
        let state = self.read_state(uuid).await?.ok_or(StorageError::UploadUnknown)?;
        if state.repo != repo {
            return Err(StorageError::UploadUnknown);
        }
        let mut map = self.sessions();
        let s = map.entry(uuid.to_string()).or_insert_with(|| LocalSession {
            repo: state.repo,
            owner: state.owner,
            touched: Instant::now(),
            state: Arc::default(),
        });
        Ok(s.state.clone())
    }

    fn touch_upload(&self, uuid: &str) {
        if let Some(s) = self.sessions().get_mut(uuid) {
            s.touched = Instant::now();
        }
    }

    /// Reads session `uuid` as the bucket has it now (another replica may
    /// have moved it on since this one last saw it).
    async fn load_upload(&self, uuid: &str, slot: &mut Option<S3Upload>) -> Result<(), StorageError> {
        let state = self.read_state(uuid).await?.ok_or(StorageError::UploadUnknown)?;
        let damaged = |what: &str| StorageError::Backend(format!("upload session {uuid} is damaged: {what}"));
        if !state.sha256.consistent() {
            return Err(damaged("its hash state does not add up"));
        }
        let mut buf = BytesMut::new();
        if state.tail > 0 {
            let tail = self
                .s3
                .get(&format!("_uploads/{uuid}/tail"), self.part_size * 2)
                .await?
                .ok_or_else(|| damaged("its tail is missing"))?;
            if tail.len() as u64 != state.tail || hex_of(&sha2::Sha256::digest(&tail)) != state.tail_sha256 {
                return Err(damaged("its tail is not the one its state names"));
            }
            buf.extend_from_slice(&tail);
        }
        *slot = Some(S3Upload {
            uuid: uuid.to_string(),
            s3: self.s3.clone(),
            state,
            buf,
            pending: Default::default(),
            max: self.limits.max_size,
            part_size: self.part_size,
            lost: false,
        });
        Ok(())
    }

    /// Ends a session as blob `digest` of `repo`, only if its bytes hash to
    /// it (a mismatch leaves the session as it was).
    async fn finish_upload(
        &self,
        repo: &str,
        uuid: &str,
        slot: &mut Option<S3Upload>,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        if slot.is_none() {
            self.load_upload(uuid, slot).await?;
        }
        let up = slot.as_mut().expect("loaded");
        if up.lost {
            return Err(StorageError::Backend(
                "the upload lost a part; ask how far it got".into(),
            ));
        }
        up.settle().await?;
        if digest.algorithm() == Algorithm::Sha256 {
            let got = sha256_digest(up.state.sha256.finish());
            if got != *digest {
                return Err(StorageError::DigestMismatch {
                    expected: digest.clone(),
                    got,
                });
            }
        }
        let target = blob_key(digest);
        match up.state.multipart.clone() {
            None => {
                let data = up.buf.split().freeze();
                let got = Digest::of_with(digest.algorithm(), &data);
                if got != *digest {
                    up.buf.extend_from_slice(&data);
                    return Err(StorageError::DigestMismatch {
                        expected: digest.clone(),
                        got,
                    });
                }
                self.s3.put(&target, data).await?;
            }
            Some(id) => {
                if !up.buf.is_empty() {
                    let last = up.buf.split().freeze();
                    up.send_part(last).await?;
                    up.settle().await?;
                }
                let data = up.data_key();
                self.s3.complete_multipart(&data, &id, &up.state.parts).await?;
                if self.s3.head(&target).await?.is_none() {
                    // What becomes visible is what the object holds: hashed
                    // again, not only the state kept while writing (parts
                    // are tied to it only by their ETags).
                    let got = self.hash_object(&data, digest.algorithm()).await?;
                    if got != *digest {
                        *slot = None;
                        let _ = self.drop_upload(uuid, None).await;
                        return Err(StorageError::DigestMismatch {
                            expected: digest.clone(),
                            got,
                        });
                    }
                    self.s3.copy_sized(&data, &target, up.len()).await?;
                }
                let _ = self.s3.delete(&data).await;
            }
        }
        self.link_blob(repo, digest).await?;
        *slot = None;
        let _ = self.drop_upload(uuid, None).await;
        Ok(())
    }

    async fn cancel_upload(&self, repo: &str, uuid: &str) -> Result<(), StorageError> {
        self.upload(repo, uuid).await?;
        let state = self.read_state(uuid).await?.ok_or(StorageError::UploadUnknown)?;
        self.drop_upload(uuid, Some(state)).await
    }

    async fn sweep_uploads(&self) -> usize {
        self.sweep_expired().await.unwrap_or(0)
    }
}

/// A manifest push met the collector removing that very manifest.
pub(crate) fn being_collected() -> StorageError {
    StorageError::Backend("the manifest is being garbage-collected this moment; push it again".into())
}

fn data_key(uuid: &str, state: &SessionState) -> String {
    format!("_uploads/{uuid}/{}", state.data.as_deref().unwrap_or("data"))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The catalog's record of `repo`.
fn catalog_key(repo: &str) -> String {
    format!("_repositories/{repo}/_")
}

pub fn linked_key(d: &Digest) -> String {
    format!("_linked/{}/{}", d.algorithm().name(), d.hex())
}

pub fn gc_key(d: &Digest) -> String {
    format!("_gc/{}/{}", d.algorithm().name(), d.hex())
}

fn sha256_digest(bytes: [u8; 32]) -> Digest {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Digest::parse_any(&format!("sha256:{hex}")).expect("a well-formed digest")
}
