//! The registry's own storage on a filesystem (the pull-through cache of
//! `--mirror-of` writes here, and so do pushes):
//!
//! ```text
//! <dir>/blobs/sha256/<hex>                      verified blobs and manifests
//! <dir>/ingest/<random>                         being written; never served
//! <dir>/uploads/<uuid>/{repository,data}        a push's upload session
//! <dir>/repositories/<name>/_blobs/<hex>        the blob is linked to the repository
//! <dir>/repositories/<name>/_manifests/<hex>    the manifest's media type
//! <dir>/repositories/<name>/_tags/<tag>         {"digest", "fetched"} (seconds)
//! ```
//!
//! A blob becomes visible only by a rename after its bytes hashed to its
//! digest ([`Ingest`] hashes as it is written), so nothing half-written or
//! wrong is ever served. Repository names reach paths only after the
//! distribution grammar accepted them (no `..`, no empty component).

use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use bytes::Bytes;
use gantry_core::digest::Digest;
use gantry_core::reference::{valid_repository, valid_tag};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct FsStorage {
    dir: PathBuf,
    /// Upload sessions this process has touched: their hash state, so a
    /// chunk costs only its own bytes. A session from before a restart is
    /// hashed again from its data file when first used.
    uploads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Upload>>>>>,
}

/// An upload session's data file, hashed and counted as it grows.
pub struct Upload {
    file: std::fs::File,
    hasher: sha2::Sha256,
    len: u64,
}

impl Upload {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        self.file
            .write_all(chunk)
            .map_err(|e| backend("writing an upload", e))?;
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        Ok(())
    }
}

/// A session id: 32 lowercase hex digits (anything else never reaches a path).
fn valid_uuid(s: &str) -> bool {
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
}

impl Ingest {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        self.file.write_all(chunk).map_err(|e| backend("writing a blob", e))
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

/// A tag as cached: what it named and when that was learnt.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagEntry {
    pub digest: Digest,
    /// Seconds since the epoch.
    pub fetched: u64,
}

impl FsStorage {
    /// Opens (creating) the storage at `dir`. `alone`: no other process
    /// uses it, so ingest files a crash left (never visible) are removed.
    pub fn open(dir: &Path, alone: bool) -> Result<FsStorage, StorageError> {
        for d in ["blobs/sha256", "ingest", "repositories", "uploads"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| backend(format!("creating {}", dir.display()), e))?;
        }
        if alone {
            if let Ok(rd) = std::fs::read_dir(dir.join("ingest")) {
                for e in rd.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(FsStorage {
            dir: dir.to_path_buf(),
            uploads: Mutex::new(HashMap::new()),
        })
    }

    /// Starts an upload session for `repo`; its id.
    pub fn start_upload(&self, repo: &str) -> Result<String, StorageError> {
        self.repo_dir(repo)?;
        let uuid = gantry_core::store::random_id()[..32].to_string();
        let dir = self.dir.join("uploads").join(&uuid);
        std::fs::create_dir(&dir)
            .and_then(|()| std::fs::write(dir.join("repository"), repo))
            .and_then(|()| std::fs::File::create_new(dir.join("data")).map(drop))
            .map_err(|e| backend("starting an upload", e))?;
        Ok(uuid)
    }

    /// Upload session `uuid` of `repo` (a session of another repository
    /// is unknown here). Lock it for as long as a request writes to it.
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
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map.entry(uuid.to_string()).or_default().clone())
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
        *slot = Some(Upload { file, hasher, len });
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
        let got = Digest::from_hasher(up.hasher.clone());
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
        self.uploads.lock().unwrap_or_else(|p| p.into_inner()).remove(uuid);
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
        match std::fs::remove_file(dir.join("_manifests").join(digest.hex())) {
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

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
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
        })
    }

    /// Makes an ingest visible as blob `digest` of `repo` — only if what
    /// was written hashes to it.
    pub fn commit_blob(&self, repo: &str, mut ingest: Ingest, digest: &Digest) -> Result<(), StorageError> {
        let got = ingest.digest();
        if got != *digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
                got,
            });
        }
        ingest.file.flush().map_err(|e| backend("writing a blob", e))?;
        if !self.contains_blob(digest) {
            std::fs::rename(&ingest.path, self.blob_path(digest)).map_err(|e| backend("storing a blob", e))?;
        }
        self.link_blob(repo, digest)
    }

    /// Records that `repo` holds blob `digest` (already stored).
    pub fn link_blob(&self, repo: &str, digest: &Digest) -> Result<(), StorageError> {
        let dir = self.repo_dir(repo)?.join("_blobs");
        std::fs::create_dir_all(&dir).map_err(|e| backend("linking a blob", e))?;
        std::fs::write(dir.join(digest.hex()), b"").map_err(|e| backend("linking a blob", e))
    }

    /// Stores a manifest (checked against its digest) for `repo`, and
    /// points `tag` at it when given.
    pub fn put_manifest(&self, repo: &str, m: &Manifest, tag: Option<&str>) -> Result<(), StorageError> {
        if Digest::of(&m.bytes) != m.digest {
            return Err(StorageError::Backend(format!(
                "manifest does not match its digest {}",
                m.digest
            )));
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
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(StorageError::Backend("invalid tag".into()));
            }
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
}
