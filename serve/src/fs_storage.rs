//! The registry's own storage on a filesystem (the pull-through cache of
//! `--mirror-of` writes here, and so do pushes):
//!
//! ```text
//! <dir>/blobs/{sha256,sha512}/<hex>             verified blobs and manifests
//! <dir>/ingest/<random>                         being written; never served
//! <dir>/uploads/<uuid>/{repository,data}        a push's upload session
//! <dir>/linked/{sha256,sha512}/<hex>            when a push last claimed the blob
//! <dir>/gc/{sha256,sha512}/<hex>                the collector means to remove it
//! <dir>/repositories/<name>/_blobs/<hex>        the blob is linked to the repository
//! <dir>/repositories/<name>/_manifests/<hex>    the manifest's media type
//! <dir>/repositories/<name>/_tags/<tag>         {"digest", "fetched"} (seconds)
//! <dir>/repositories/<name>/_referrers/<subject hex>/<hex>
//!                                               the descriptor of a manifest whose
//!                                               `subject` is that digest (OCI 1.1)
//! ```
//!
//! A blob becomes visible only by a rename after its bytes hashed to its
//! digest ([`Ingest`] hashes as it is written), so nothing half-written or
//! wrong is ever served. Repository names reach paths only after the
//! distribution grammar accepted them (no `..`, no empty component).
//!
//! The hash kept beside a file is only worth what the file holds: a write
//! that fails half-way (a full disk) is cut back off the file, so the file,
//! its length and its hash stay in step; when that cannot be done the
//! session (or ingest) is dead and can never be committed. A commit checks
//! the file's length on disk against what was hashed, and hashes the file
//! again when they differ.
//!
//! Upload sessions are bounded ([`UploadLimits`]): bytes per session,
//! sessions in all and per repository, and an expiry after which an
//! untouched session is removed with its file ([`FsStorage::sweep_uploads`]).

use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use bytes::Bytes;
use gantry_core::digest::{Algorithm, Digest, Hasher};
use gantry_core::manifest::MAX_MANIFEST_BYTES;
use gantry_core::reference::{valid_repository, valid_tag};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The most bytes of referrer records one page of the referrers API
/// holds; the rest follow by `Link`.
pub const MAX_REFERRERS_PAGE: usize = 1 << 20;

/// A referrer record at most this long keeps the manifest's annotations;
/// a longer one is kept without them.
pub const MAX_REFERRER_RECORD: usize = 16 << 10;

pub struct FsStorage {
    dir: PathBuf,
    limits: UploadLimits,
    /// Upload sessions: the ones this process started, found on disk when
    /// it opened the storage, or was asked about since. The hash state of a
    /// session, so a chunk costs only its own bytes, is filled in on first
    /// use (a session from before a restart is hashed again from its file).
    uploads: Mutex<HashMap<String, Session>>,
}

/// What upload sessions may take (see `gantry serve --help` for the
/// defaults' reasons).
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// The most bytes one session (one blob) may hold.
    pub max_size: u64,
    /// Sessions open at once, in all.
    pub max_sessions: usize,
    /// Sessions open at once for one repository.
    pub max_per_repository: usize,
    /// How long a session may sit untouched before it is removed.
    pub expiry: Duration,
    /// The quota of the store the storage lives in: uploads are charged
    /// their declared length, else their bytes as they arrive.
    pub quota: Option<std::sync::Arc<gantry_core::store::quota::Quota>>,
}

impl Default for UploadLimits {
    fn default() -> Self {
        UploadLimits {
            max_size: 16 << 30,
            max_sessions: 1024,
            max_per_repository: 64,
            expiry: Duration::from_secs(3600),
            quota: None,
        }
    }
}

/// A session as the storage tracks it.
struct Session {
    repo: String,
    /// Who started it, where the registry knows (a token's subject).
    owner: Option<String>,
    /// When a request last asked for it.
    touched: Instant,
    state: Arc<tokio::sync::Mutex<Option<Upload>>>,
}

/// An upload session's data file, hashed and counted as it grows.
pub struct Upload {
    file: std::fs::File,
    hasher: sha2::Sha256,
    len: u64,
    max: u64,
    /// A failed write could not be cut back off the file: the file no
    /// longer matches `len` and `hasher`, and the session must go.
    dead: bool,
}

impl Upload {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a failed write left the file out of step (the session can
    /// only be cancelled).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Appends `chunk`. Past the size cap nothing of it is written. A write
    /// that fails part-way is cut back off the file, so the session stays
    /// what it was before the chunk; if even that fails the session is dead.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        if self.dead {
            return Err(StorageError::Backend("the upload's file is damaged".into()));
        }
        if self.len.saturating_add(chunk.len() as u64) > self.max {
            return Err(StorageError::TooLarge { limit: self.max });
        }
        if let Err(e) = self.file.write_all(chunk) {
            self.dead = self.file.set_len(self.len).is_err();
            return Err(backend("writing an upload", e));
        }
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }
}

/// The digest by `algorithm` and length of what `file` holds, read from
/// its start.
fn hash_file(file: &std::fs::File, algorithm: Algorithm) -> std::io::Result<(Digest, u64)> {
    use std::os::unix::fs::FileExt as _;
    let mut hasher = Hasher::new(algorithm);
    let mut len = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = file.read_at(&mut buf, len)?;
        if n == 0 {
            return Ok((hasher.digest(), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// The digest of what `file` holds on disk, for a commit: the hash kept
/// while writing when the file's length agrees with it, else the file's
/// bytes hashed again.
/// The hash kept is sha256; a blob named by another algorithm is hashed
/// again from its file by that one.
fn digest_on_disk(
    file: &std::fs::File,
    len: u64,
    hasher: &sha2::Sha256,
    algorithm: Algorithm,
) -> Result<Digest, StorageError> {
    let on_disk = file.metadata().map_err(|e| backend("checking a blob", e))?.len();
    if on_disk == len && algorithm == Algorithm::Sha256 {
        return Ok(Digest::from_hasher(hasher.clone()));
    }
    hash_file(file, algorithm)
        .map(|(d, _)| d)
        .map_err(|e| backend("checking a blob", e))
}

/// A session id: 32 lowercase hex digits (anything else never reaches a path).
pub(crate) fn valid_uuid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn backend(what: impl std::fmt::Display, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("{what}: {e}"))
}

/// A blob being written: hashed and counted as it goes.
pub struct Ingest {
    file: std::fs::File,
    path: PathBuf,
    hasher: sha2::Sha256,
    len: u64,
    /// A write failed: what the file holds is not what was hashed.
    failed: bool,
}

impl Ingest {
    /// Appends `chunk`; after a failed write the ingest can only be
    /// dropped ([`FsStorage::commit_blob`] refuses it).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        if self.failed {
            return Err(StorageError::Backend("a write to this blob failed before".into()));
        }
        if let Err(e) = self.file.write_all(chunk) {
            self.failed = true;
            return Err(backend("writing a blob", e));
        }
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_hasher(self.hasher.clone())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Ingest {
    /// An ingest never committed goes.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A registry's tag may name a sha512 manifest (pushed with `?tag=`).
fn any_digest<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    Digest::parse_any(&s).map_err(serde::de::Error::custom)
}

/// A tag as cached: what it named and when that was learnt.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagEntry {
    #[serde(deserialize_with = "any_digest")]
    pub digest: Digest,
    /// Seconds since the epoch.
    pub fetched: u64,
}

impl FsStorage {
    /// Opens (creating) the storage at `dir`. `alone`: no other process
    /// uses it, so ingest files a crash left (never visible) are removed.
    pub fn open(dir: &Path, alone: bool) -> Result<FsStorage, StorageError> {
        for d in [
            "blobs/sha256",
            "blobs/sha512",
            "ingest",
            "repositories",
            "uploads",
            "linked/sha256",
            "linked/sha512",
            "gc/sha256",
            "gc/sha512",
        ] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| backend(format!("creating {}", dir.display()), e))?;
        }
        if alone {
            if let Ok(rd) = std::fs::read_dir(dir.join("ingest")) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        // Sessions on disk count against the caps and expire like new ones,
        // aged by their file's last change.
        let mut uploads = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(dir.join("uploads")) {
            for e in rd.flatten() {
                let Some(uuid) = e.file_name().to_str().filter(|u| valid_uuid(u)).map(str::to_string) else {
                    continue;
                };
                let Ok(repo) = std::fs::read_to_string(e.path().join("repository")) else {
                    continue;
                };
                let age = std::fs::metadata(e.path().join("data"))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                let now = Instant::now();
                let owner = std::fs::read_to_string(e.path().join("owner")).ok();
                uploads.insert(
                    uuid,
                    Session {
                        repo,
                        owner,
                        touched: now.checked_sub(age).unwrap_or(now),
                        state: Arc::default(),
                    },
                );
            }
        }
        Ok(FsStorage {
            dir: dir.to_path_buf(),
            limits: UploadLimits::default(),
            uploads: Mutex::new(uploads),
        })
    }

    /// The same storage with these upload limits.
    pub fn with_upload_limits(mut self, limits: UploadLimits) -> FsStorage {
        self.limits = limits;
        self
    }

    pub fn upload_limits(&self) -> &UploadLimits {
        &self.limits
    }

    /// Upload sessions open now.
    pub fn uploads_open(&self) -> usize {
        self.sessions().len()
    }

    /// Whether the storage answers: its directories can be listed, and a
    /// file can be made and removed where blobs are written.
    pub fn check(&self) -> Result<(), StorageError> {
        std::fs::read_dir(self.dir.join("repositories")).map_err(|e| backend("listing repositories", e))?;
        let probe = self.ingest()?;
        drop(probe);
        Ok(())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.uploads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts an upload session for `repo`; its id. Refused past the
    /// session caps (expired sessions are cleared first).
    pub fn start_upload(&self, repo: &str, owner: Option<&str>) -> Result<String, StorageError> {
        self.repo_dir(repo)?;
        let per_owner = (self.limits.max_sessions / 4).max(1);
        let full = |map: &HashMap<String, Session>| {
            if map.len() >= self.limits.max_sessions {
                return Some(format!("{} upload sessions are open", map.len()));
            }
            let here = map.values().filter(|s| s.repo == repo).count();
            if here >= self.limits.max_per_repository {
                return Some(format!("{here} upload sessions are open for this repository"));
            }
            // One client (a token's subject) takes at most a quarter of
            // all, however many repositories it may push to.
            let theirs = owner.map_or(0, |o| map.values().filter(|s| s.owner.as_deref() == Some(o)).count());
            (owner.is_some() && theirs >= per_owner).then(|| format!("{theirs} upload sessions are open for you"))
        };
        if full(&self.sessions()).is_some() {
            self.sweep_uploads();
        }
        let mut map = self.sessions();
        if let Some(why) = full(&map) {
            return Err(StorageError::TooManyUploads(why));
        }
        let uuid = gantry_core::store::random_id()[..32].to_string();
        let dir = self.dir.join("uploads").join(&uuid);
        let made = std::fs::create_dir(&dir)
            .and_then(|()| std::fs::write(dir.join("repository"), repo))
            .and_then(|()| owner.map_or(Ok(()), |o| std::fs::write(dir.join("owner"), o)))
            .and_then(|()| std::fs::File::create_new(dir.join("data")).map(drop));
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(backend("starting an upload", e));
        }
        map.insert(
            uuid.clone(),
            Session {
                repo: repo.to_string(),
                owner: owner.map(str::to_string),
                touched: Instant::now(),
                state: Arc::default(),
            },
        );
        Ok(uuid)
    }

    /// Upload session `uuid` of `repo` (a session of another repository
    /// is unknown here), marked as just used. Lock it for as long as a
    /// request writes to it.
    pub fn upload(&self, repo: &str, uuid: &str) -> Result<Arc<tokio::sync::Mutex<Option<Upload>>>, StorageError> {
        if !valid_uuid(uuid) {
            return Err(StorageError::UploadUnknown);
        }
        let dir = self.dir.join("uploads").join(uuid);
        match std::fs::read_to_string(dir.join("repository")) {
            Ok(r) if r == repo => {}
            Ok(_) => return Err(StorageError::UploadUnknown),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StorageError::UploadUnknown),
            Err(e) => return Err(backend("reading an upload", e)),
        }
        let mut map = self.sessions();
        // A session another process started on this storage is adopted.
        let s = map.entry(uuid.to_string()).or_insert_with(|| Session {
            repo: repo.to_string(),
            owner: std::fs::read_to_string(dir.join("owner")).ok(),
            touched: Instant::now(),
            state: Arc::default(),
        });
        s.touched = Instant::now();
        Ok(s.state.clone())
    }

    /// Marks session `uuid` as just used (after a long request on it).
    pub fn touch_upload(&self, uuid: &str) {
        if let Some(s) = self.sessions().get_mut(uuid) {
            s.touched = Instant::now();
        }
    }

    /// Removes the sessions untouched for longer than the expiry, with
    /// their files; a session a request holds is never removed. How many went.
    pub fn sweep_uploads(&self) -> usize {
        let expiry = self.limits.expiry;
        let mut gone = Vec::new();
        {
            let mut map = self.sessions();
            map.retain(|uuid, s| {
                if s.touched.elapsed() < expiry {
                    return true;
                }
                // Another process may be writing it: its file's age counts too.
                let data = self.dir.join("uploads").join(uuid).join("data");
                let fresh = std::fs::metadata(&data)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < expiry);
                if fresh {
                    return true;
                }
                match s.state.try_lock() {
                    Ok(mut slot) => {
                        *slot = None;
                        gone.push(uuid.clone());
                        false
                    }
                    Err(_) => true,
                }
            });
        }
        for uuid in &gone {
            let _ = std::fs::remove_dir_all(self.dir.join("uploads").join(uuid));
        }
        gone.len()
    }

    /// Fills a session's state from its data file when this process has
    /// none yet (a session started before a restart).
    pub fn load_upload(&self, uuid: &str, slot: &mut Option<Upload>) -> Result<(), StorageError> {
        if slot.is_some() {
            return Ok(());
        }
        let path = self.dir.join("uploads").join(uuid).join("data");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StorageError::UploadUnknown,
                _ => backend("opening an upload", e),
            })?;
        let mut hasher = sha2::Sha256::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut buf).map_err(|e| backend("reading an upload", e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        *slot = Some(Upload {
            file,
            hasher,
            len,
            max: self.limits.max_size,
            dead: false,
        });
        Ok(())
    }

    /// Ends a session as blob `digest` of `repo` — only if its bytes hash
    /// to it (a mismatch leaves the session as it was, for the client to
    /// cancel). The blob is on disk before it becomes visible.
    pub fn finish_upload(
        &self,
        repo: &str,
        uuid: &str,
        slot: &mut Option<Upload>,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        self.load_upload(uuid, slot)?;
        let up = slot.as_mut().expect("loaded");
        if up.dead {
            return Err(StorageError::Backend("the upload's file is damaged".into()));
        }
        // What is on disk is what becomes visible: check that, not only
        // the hash kept while writing.
        let got = digest_on_disk(&up.file, up.len, &up.hasher, digest.algorithm())?;
        if got != *digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        let dir = self.dir.join("uploads").join(uuid);
        if !self.contains_blob(digest) {
            up.file.sync_data().map_err(|e| backend("storing a blob", e))?;
            std::fs::rename(dir.join("data"), self.blob_path(digest)).map_err(|e| backend("storing a blob", e))?;
        }
        self.link_blob(repo, digest)?;
        *slot = None;
        self.drop_upload(uuid);
        Ok(())
    }

    /// Cancels session `uuid` of `repo`.
    pub fn cancel_upload(&self, repo: &str, uuid: &str) -> Result<(), StorageError> {
        self.upload(repo, uuid)?;
        self.drop_upload(uuid);
        Ok(())
    }

    fn drop_upload(&self, uuid: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join("uploads").join(uuid));
        self.sessions().remove(uuid);
    }

    /// Links blob `digest` of repository `from` into `repo` (a
    /// cross-repository mount); false when `from` does not hold it.
    pub fn mount_blob(&self, repo: &str, from: &str, digest: &Digest) -> Result<bool, StorageError> {
        if !valid_repository(from) || !self.linked(from, digest)? || !self.contains_blob(digest) {
            return Ok(false);
        }
        self.link_blob(repo, digest)?;
        Ok(true)
    }

    /// Removes manifest `digest` from `repo`, and every tag naming it;
    /// false when the repository has no such manifest.
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool, StorageError> {
        let dir = self.repo_dir(repo)?;
        let record = dir.join("_manifests").join(digest.hex());
        if !record.is_file() {
            // Not this repository's: nothing is read or changed.
            return Ok(false);
        }
        // Its referrer record goes with it (the listing also skips records
        // whose manifest is gone, so a crash here hides nothing stale).
        // Only a manifest's worth of the blob is read.
        let mut bytes = Vec::new();
        if let Ok(f) = std::fs::File::open(self.blob_path(digest)) {
            let _ = f.take(MAX_MANIFEST_BYTES as u64 + 1).read_to_end(&mut bytes);
        }
        if let Some(subject) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|doc| Digest::parse_any(doc.get("subject")?.get("digest")?.as_str()?).ok())
        {
            let _ = std::fs::remove_file(dir.join("_referrers").join(subject.hex()).join(digest.hex()));
        }
        match std::fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(backend("deleting a manifest", e)),
        }
        for tag in self.tags(repo)?.unwrap_or_default() {
            if self.tag(repo, &tag)?.is_some_and(|t| t.digest == *digest) {
                let _ = std::fs::remove_file(dir.join("_tags").join(&tag));
            }
        }
        Ok(true)
    }

    /// Removes `tag` from `repo`; false when there is no such tag.
    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StorageError> {
        if !valid_tag(tag) {
            return Ok(false);
        }
        match std::fs::remove_file(self.repo_dir(repo)?.join("_tags").join(tag)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend("deleting a tag", e)),
        }
    }

    /// Unlinks blob `digest` from `repo` (the bytes stay for other
    /// repositories); false when it was not linked.
    pub fn delete_blob(&self, repo: &str, digest: &Digest) -> Result<bool, StorageError> {
        match std::fs::remove_file(self.repo_dir(repo)?.join("_blobs").join(digest.hex())) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend("deleting a blob", e)),
        }
    }

    /// The storage's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.algorithm().name()).join(d.hex())
    }

    /// `<dir>/repositories/<name>`, for a name the grammar accepted.
    fn repo_dir(&self, repo: &str) -> Result<PathBuf, StorageError> {
        if !valid_repository(repo) {
            return Err(StorageError::Backend(format!(
                "invalid repository name {}",
                gantry_core::text::escape_line(repo)
            )));
        }
        Ok(self.dir.join("repositories").join(repo))
    }

    pub fn contains_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Starts writing a blob.
    pub fn ingest(&self) -> Result<Ingest, StorageError> {
        let path = self.dir.join("ingest").join(gantry_core::store::random_id());
        let file = std::fs::File::create_new(&path).map_err(|e| backend("starting a blob", e))?;
        Ok(Ingest {
            file,
            path,
            hasher: sha2::Sha256::new(),
            len: 0,
            failed: false,
        })
    }

    /// Makes an ingest visible as blob `digest` of `repo` — only if what
    /// its file holds hashes to it, and once that is on disk.
    pub fn commit_blob(&self, repo: &str, ingest: Ingest, digest: &Digest) -> Result<(), StorageError> {
        if ingest.failed {
            return Err(StorageError::Backend("a write to this blob failed".into()));
        }
        let got = digest_on_disk(&ingest.file, ingest.len, &ingest.hasher, digest.algorithm())?;
        if got != *digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        if !self.contains_blob(digest) {
            ingest.file.sync_data().map_err(|e| backend("storing a blob", e))?;
            std::fs::rename(&ingest.path, self.blob_path(digest)).map_err(|e| backend("storing a blob", e))?;
        }
        self.link_blob(repo, digest)
    }

    /// Records that `repo` holds blob `digest` (already stored).
    pub fn link_blob(&self, repo: &str, digest: &Digest) -> Result<(), StorageError> {
        let dir = self.repo_dir(repo)?.join("_blobs");
        std::fs::create_dir_all(&dir).map_err(|e| backend("linking a blob", e))?;
        std::fs::write(dir.join(digest.hex()), b"").map_err(|e| backend("linking a blob", e))?;
        self.mark_linked(digest)
    }

    /// Notes that blob `digest` was just claimed (its marker's time), for
    /// the collector's grace period.
    fn mark_linked(&self, digest: &Digest) -> Result<(), StorageError> {
        std::fs::write(self.marker_path("linked", digest), b"").map_err(|e| backend("claiming a blob", e))
    }

    /// `<dir>/<kind>/<alg>/<hex>`: a blob's claim (`linked`) or the
    /// collector's intent to remove it (`gc`).
    pub(crate) fn marker_path(&self, kind: &str, d: &Digest) -> PathBuf {
        self.dir.join(kind).join(d.algorithm().name()).join(d.hex())
    }

    /// A manifest of `repo` is about to name these blobs (or manifests):
    /// each is claimed, then checked not to be on its way out and to be
    /// held, so a collection running beside the push either sees the claim
    /// or is seen by it. The digests not held.
    pub fn claim_blobs(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        let mut missing = Vec::new();
        for d in digests {
            if !self.linked(repo, d)? {
                missing.push(d.clone());
                continue;
            }
            self.mark_linked(d)?;
            if self.marker_path("gc", d).exists() || !self.contains_blob(d) {
                missing.push(d.clone());
            }
        }
        Ok(missing)
    }

    /// Stores a manifest (checked against its digest) for `repo`, and
    /// points each of `tags` at it.
    pub fn put_manifest(&self, repo: &str, m: &Manifest, tags: &[&str]) -> Result<(), StorageError> {
        m.check(tags)?;
        // Claimed before it is written, as the blobs it names were.
        self.mark_linked(&m.digest)?;
        if self.marker_path("gc", &m.digest).exists() {
            return Err(crate::s3_storage::being_collected());
        }
        if !self.contains_blob(&m.digest) {
            let mut ingest = self.ingest()?;
            ingest.write(&m.bytes)?;
            self.commit_blob(repo, ingest, &m.digest)?;
        }
        let dir = self.repo_dir(repo)?;
        let manifests = dir.join("_manifests");
        std::fs::create_dir_all(&manifests).map_err(|e| backend("storing a manifest", e))?;
        write_atomic(&manifests.join(m.digest.hex()), m.media_type.as_bytes())?;
        for tag in tags {
            let tags = dir.join("_tags");
            std::fs::create_dir_all(&tags).map_err(|e| backend("storing a tag", e))?;
            let entry = TagEntry {
                digest: m.digest.clone(),
                fetched: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            write_atomic(&tags.join(tag), &serde_json::to_vec(&entry).expect("serialisable"))?;
        }
        Ok(())
    }

    /// Records that manifest `descriptor` (its `digest` is `of`) of `repo`
    /// refers to `subject`, for the referrers API.
    pub fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        of: &Digest,
        descriptor: &serde_json::Value,
    ) -> Result<(), StorageError> {
        let dir = self.repo_dir(repo)?.join("_referrers").join(subject.hex());
        std::fs::create_dir_all(&dir).map_err(|e| backend("recording a referrer", e))?;
        let record = referrer_record(descriptor);
        write_atomic(&dir.join(of.hex()), &record)
    }

    /// The descriptors of `repo`'s manifests whose subject is `subject`,
    /// sorted by digest, after `after` (a hex digest) when given, up to
    /// [`MAX_REFERRERS_PAGE`] bytes of records; and whether more follow.
    /// A record whose manifest is gone is skipped.
    pub fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, bool), StorageError> {
        let repo_dir = self.repo_dir(repo)?;
        let dir = repo_dir.join("_referrers").join(subject.hex());
        let entries = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
            Err(e) => return Err(backend("listing referrers", e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.contains(".tmp-") && after.is_none_or(|a| n.as_str() > a))
            .collect();
        names.sort();
        let (mut out, mut bytes) = (Vec::new(), 0usize);
        for n in names {
            if !repo_dir.join("_manifests").join(&n).is_file() {
                continue;
            }
            let record = match std::fs::read(dir.join(&n)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(backend("reading a referrer", e)),
            };
            if bytes + record.len() > MAX_REFERRERS_PAGE && !out.is_empty() {
                return Ok((out, true));
            }
            bytes += record.len();
            out.extend(serde_json::from_slice::<serde_json::Value>(&record).ok());
        }
        Ok((out, false))
    }

    /// What `tag` of `repo` named when last learnt.
    pub fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagEntry>, StorageError> {
        if !valid_tag(tag) {
            return Ok(None);
        }
        match std::fs::read(self.repo_dir(repo)?.join("_tags").join(tag)) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("reading a tag", e)),
        }
    }

    fn manifest_by_digest(&self, repo: &str, d: &Digest) -> Result<Option<Manifest>, StorageError> {
        let media_type = match std::fs::read_to_string(self.repo_dir(repo)?.join("_manifests").join(d.hex())) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend("reading a manifest", e)),
        };
        let bytes = match std::fs::read(self.blob_path(d)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend("reading a manifest", e)),
        };
        Ok(Some(Manifest {
            media_type,
            digest: d.clone(),
            bytes: Bytes::from(bytes),
        }))
    }

    fn linked(&self, repo: &str, d: &Digest) -> Result<bool, StorageError> {
        let dir = self.repo_dir(repo)?;
        Ok(dir.join("_blobs").join(d.hex()).is_file() || dir.join("_manifests").join(d.hex()).is_file())
    }
}

/// A referrer's record: its descriptor, without its annotations when
/// they would take it past [`MAX_REFERRER_RECORD`].
pub(crate) fn referrer_record(descriptor: &serde_json::Value) -> Vec<u8> {
    let record = serde_json::to_vec(descriptor).expect("serialisable");
    if record.len() <= MAX_REFERRER_RECORD {
        return record;
    }
    let mut bare = descriptor.clone();
    if let Some(o) = bare.as_object_mut() {
        o.remove("annotations");
    }
    serde_json::to_vec(&bare).expect("serialisable")
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StorageError> {
    let tmp = path.with_extension(format!("tmp-{}", &gantry_core::store::random_id()[..12]));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            backend(format!("writing {}", path.display()), e)
        })
}

/// Repository names under `dir`: every directory holding `_manifests`.
fn walk_repos(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('_') || !e.path().is_dir() {
            continue;
        }
        let p = e.path();
        if p.join("_manifests").is_dir() {
            if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        walk_repos(base, &p, out);
    }
}

impl Storage for FsStorage {
    fn catalog(&self) -> Result<Vec<String>, StorageError> {
        let base = self.dir.join("repositories");
        let mut out = Vec::new();
        walk_repos(&base, &base, &mut out);
        out.sort();
        Ok(out)
    }

    fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        let dir = self.repo_dir(repo)?;
        if !dir.join("_manifests").is_dir() {
            return Ok(None);
        }
        let mut tags: Vec<String> = std::fs::read_dir(dir.join("_tags"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|t| valid_tag(t))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        Ok(Some(tags))
    }

    fn has_repository(&self, repo: &str) -> Result<bool, StorageError> {
        Ok(self.repo_dir(repo)?.join("_manifests").is_dir())
    }

    fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        match reference {
            ManifestRef::Digest(d) => self.manifest_by_digest(repo, d),
            ManifestRef::Tag(t) => match self.tag(repo, t)? {
                Some(e) => self.manifest_by_digest(repo, &e.digest),
                None => Ok(None),
            },
        }
    }

    fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StorageError> {
        if !self.linked(repo, digest)? {
            return Ok(None);
        }
        match std::fs::metadata(self.blob_path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("reading a blob", e)),
        }
    }

    fn blob(&self, repo: &str, digest: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        if !self.linked(repo, digest)? {
            return Ok(None);
        }
        let file = match std::fs::File::open(self.blob_path(digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend("reading a blob", e)),
        };
        crate::from_store::mapped_range(&file, range)
            .map(Some)
            .map_err(|e| backend("reading a blob", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_hashed_to_its_digest_becomes_visible_and_ingest_is_cleared_only_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::open(dir.path(), true).unwrap();
        let mut i = s.ingest().unwrap();
        i.write(b"hello").unwrap();
        let wrong = Digest::of(b"other");
        assert!(s.commit_blob("a/b", i, &wrong).is_err());
        assert!(!s.contains_blob(&wrong));
        let mut i = s.ingest().unwrap();
        i.write(b"hello").unwrap();
        let right = Digest::of(b"hello");
        s.commit_blob("a/b", i, &right).unwrap();
        assert_eq!(s.blob_size("a/b", &right).unwrap(), Some(5));
        assert_eq!(s.blob_size("c", &right).unwrap(), None, "linked to its repository only");
        assert!(s.repo_dir("../x").is_err());

        // Another process's ingest survives an open that is not alone.
        let other = s.ingest().unwrap();
        let left = other.path.clone();
        std::mem::forget(other);
        FsStorage::open(dir.path(), false).unwrap();
        assert!(left.exists());
        FsStorage::open(dir.path(), true).unwrap();
        assert!(!left.exists());
    }

    #[test]
    fn a_commit_checks_the_file_not_only_the_hash_kept_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = FsStorage::open(dir.path(), true).unwrap();
        let uuid = s.start_upload("a/b", None).unwrap();
        let session = s.upload("a/b", &uuid).unwrap();
        let mut slot = session.try_lock().unwrap();
        s.load_upload(&uuid, &mut slot).unwrap();
        slot.as_mut().unwrap().write(b"hello").unwrap();
        // The file gains bytes the session never hashed (what a write that
        // failed half-way, and was not cut back, leaves).
        let data = dir.path().join("uploads").join(&uuid).join("data");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&data)
            .unwrap()
            .write_all(b" junk")
            .unwrap();
        let hashed = Digest::of(b"hello");
        let e = s.finish_upload("a/b", &uuid, &mut slot, &hashed).unwrap_err();
        assert!(matches!(e, StorageError::DigestMismatch { .. }), "{e}");
        assert_eq!(s.blob_size("a/b", &hashed).unwrap(), None);
        // What the file holds is what may be committed.
        let on_disk = Digest::of(b"hello junk");
        s.finish_upload("a/b", &uuid, &mut slot, &on_disk).unwrap();
        assert_eq!(s.blob_size("a/b", &on_disk).unwrap(), Some(10));
    }

    #[test]
    fn sessions_are_capped_and_expire_with_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let limits = UploadLimits {
            max_size: 4,
            max_sessions: 3,
            max_per_repository: 2,
            expiry: Duration::from_millis(50),
            quota: None,
        };
        let s = FsStorage::open(dir.path(), true)
            .unwrap()
            .with_upload_limits(limits.clone());
        let a = s.start_upload("a", None).unwrap();
        s.start_upload("a", None).unwrap();
        assert!(matches!(
            s.start_upload("a", None),
            Err(StorageError::TooManyUploads(_))
        ));
        s.start_upload("b", None).unwrap();
        assert!(matches!(
            s.start_upload("c", None),
            Err(StorageError::TooManyUploads(_))
        ));
        let session = s.upload("a", &a).unwrap();
        let mut slot = session.try_lock().unwrap();
        s.load_upload(&a, &mut slot).unwrap();
        let up = slot.as_mut().unwrap();
        assert!(matches!(up.write(b"12345"), Err(StorageError::TooLarge { limit: 4 })));
        assert_eq!(up.len(), 0, "nothing of a chunk past the cap is written");

        // Held by a request: never swept. Untouched: swept with its files.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(s.sweep_uploads(), 2);
        drop(slot);
        assert_eq!(s.sweep_uploads(), 1);
        assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
        s.start_upload("c", None).unwrap();

        // Sessions found on disk at open count against the caps.
        let s = FsStorage::open(dir.path(), true)
            .unwrap()
            .with_upload_limits(UploadLimits {
                max_sessions: 1,
                ..limits.clone()
            });
        assert!(matches!(
            s.start_upload("d", None),
            Err(StorageError::TooManyUploads(_))
        ));
    }
}
