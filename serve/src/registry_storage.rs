//! What a registry of its own keeps: the read side of [`crate::storage`]
//! plus everything a push writes, as one trait with two implementations —
//! a directory ([`FsStorage`], whose synchronous calls are wrapped here)
//! and an object store's bucket ([`S3Storage`], in `s3_storage`). The handlers (`api`, `push`) are written once over it,
//! so the two answer the same requests the same way (the conformance
//! suite runs against both).
//!
//! Calls are async: on an object store each is a request or a few.

use crate::fs_storage::{FsStorage, Upload as FsUpload, UploadLimits};
use crate::s3_storage::S3Storage;
use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use gantry_core::digest::Digest;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

/// A session's lock: one request of a session at a time per process.
pub type SessionLock<U> = Arc<tokio::sync::Mutex<Option<U>>>;

/// An upload session's bytes as a request appends to them.
pub trait UploadSession: Send + 'static {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A failed write left the session out of step: it can only be cancelled
    /// (or, on an object store, picked up again from where it was written down).
    fn is_dead(&self) -> bool;
    fn write(&mut self, chunk: &[u8]) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Writes down where the session stands, after a request's body.
    fn persist(&mut self) -> impl Future<Output = Result<(), StorageError>> + Send;
}

pub trait RegistryStorage: Send + Sync + 'static {
    type Upload: UploadSession;

    fn upload_limits(&self) -> &UploadLimits;
    fn uploads_open(&self) -> usize;
    fn check(&self) -> impl Future<Output = Result<(), StorageError>> + Send;

    fn catalog(&self) -> impl Future<Output = Result<Vec<String>, StorageError>> + Send;
    fn tags(&self, repo: &str) -> impl Future<Output = Result<Option<Vec<String>>, StorageError>> + Send;
    fn has_repository(&self, repo: &str) -> impl Future<Output = Result<bool, StorageError>> + Send;
    fn manifest(
        &self,
        repo: &str,
        reference: &ManifestRef,
    ) -> impl Future<Output = Result<Option<Manifest>, StorageError>> + Send;
    fn blob_size(&self, repo: &str, d: &Digest) -> impl Future<Output = Result<Option<u64>, StorageError>> + Send;
    /// Bytes `range` of blob `d` of `repo`; called right after
    /// [`RegistryStorage::blob_size`] answered for the same blob.
    fn blob(
        &self,
        repo: &str,
        d: &Digest,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Option<BlobBody>, StorageError>> + Send;
    /// Where clients fetch blob `d` themselves, when the storage sends
    /// them elsewhere (an object store's presigned URL).
    fn redirect(&self, _d: &Digest) -> Option<String> {
        None
    }
    fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&str>,
    ) -> impl Future<Output = Result<(Vec<serde_json::Value>, bool), StorageError>> + Send;

    fn start_upload(
        &self,
        repo: &str,
        owner: Option<&str>,
    ) -> impl Future<Output = Result<String, StorageError>> + Send;
    fn upload(
        &self,
        repo: &str,
        uuid: &str,
    ) -> impl Future<Output = Result<SessionLock<Self::Upload>, StorageError>> + Send;
    fn load_upload(
        &self,
        uuid: &str,
        slot: &mut Option<Self::Upload>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn touch_upload(&self, uuid: &str);
    fn finish_upload(
        &self,
        repo: &str,
        uuid: &str,
        slot: &mut Option<Self::Upload>,
        digest: &Digest,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn cancel_upload(&self, repo: &str, uuid: &str) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Removes expired sessions; how many went.
    fn sweep_uploads(&self) -> impl Future<Output = usize> + Send;

    fn mount_blob(&self, repo: &str, from: &str, d: &Digest)
        -> impl Future<Output = Result<bool, StorageError>> + Send;
    fn contains_blob(&self, d: &Digest) -> impl Future<Output = Result<bool, StorageError>> + Send;
    fn link_blob(&self, repo: &str, d: &Digest) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// A manifest of `repo` is about to name these blobs: each is claimed
    /// (so a collection beside the push spares it) and checked to be held;
    /// the digests that are not.
    fn claim_blobs(
        &self,
        repo: &str,
        digests: &[Digest],
    ) -> impl Future<Output = Result<Vec<Digest>, StorageError>> + Send;
    fn put_manifest(
        &self,
        repo: &str,
        m: &Manifest,
        tags: &[&str],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        of: &Digest,
        descriptor: &serde_json::Value,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn delete_manifest(&self, repo: &str, d: &Digest) -> impl Future<Output = Result<bool, StorageError>> + Send;
    fn delete_tag(&self, repo: &str, tag: &str) -> impl Future<Output = Result<bool, StorageError>> + Send;
    fn delete_blob(&self, repo: &str, d: &Digest) -> impl Future<Output = Result<bool, StorageError>> + Send;
}

/// Runs filesystem work that may take long (hashing a session's file
/// again after a restart, syncing a blob) without holding up the other
/// requests of this worker thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

impl UploadSession for FsUpload {
    fn len(&self) -> u64 {
        FsUpload::len(self)
    }
    fn is_dead(&self) -> bool {
        FsUpload::is_dead(self)
    }
    async fn write(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        FsUpload::write(self, chunk)
    }
    async fn persist(&mut self) -> Result<(), StorageError> {
        Ok(())
    }
}

impl RegistryStorage for FsStorage {
    type Upload = FsUpload;

    fn upload_limits(&self) -> &UploadLimits {
        FsStorage::upload_limits(self)
    }
    fn uploads_open(&self) -> usize {
        FsStorage::uploads_open(self)
    }
    async fn check(&self) -> Result<(), StorageError> {
        blocking(|| FsStorage::check(self))
    }
    async fn catalog(&self) -> Result<Vec<String>, StorageError> {
        Storage::catalog(self)
    }
    async fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        Storage::tags(self, repo)
    }
    async fn has_repository(&self, repo: &str) -> Result<bool, StorageError> {
        Storage::has_repository(self, repo)
    }
    async fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        Storage::manifest(self, repo, reference)
    }
    async fn blob_size(&self, repo: &str, d: &Digest) -> Result<Option<u64>, StorageError> {
        Storage::blob_size(self, repo, d)
    }
    async fn blob(&self, repo: &str, d: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        Storage::blob(self, repo, d, range)
    }
    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        after: Option<&str>,
    ) -> Result<(Vec<serde_json::Value>, bool), StorageError> {
        blocking(|| FsStorage::referrers(self, repo, subject, after))
    }
    async fn start_upload(&self, repo: &str, owner: Option<&str>) -> Result<String, StorageError> {
        FsStorage::start_upload(self, repo, owner)
    }
    async fn upload(&self, repo: &str, uuid: &str) -> Result<SessionLock<FsUpload>, StorageError> {
        FsStorage::upload(self, repo, uuid)
    }
    async fn load_upload(&self, uuid: &str, slot: &mut Option<FsUpload>) -> Result<(), StorageError> {
        blocking(|| FsStorage::load_upload(self, uuid, slot))
    }
    fn touch_upload(&self, uuid: &str) {
        FsStorage::touch_upload(self, uuid)
    }
    async fn finish_upload(
        &self,
        repo: &str,
        uuid: &str,
        slot: &mut Option<FsUpload>,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        blocking(|| FsStorage::finish_upload(self, repo, uuid, slot, digest))
    }
    async fn cancel_upload(&self, repo: &str, uuid: &str) -> Result<(), StorageError> {
        FsStorage::cancel_upload(self, repo, uuid)
    }
    async fn sweep_uploads(&self) -> usize {
        blocking(|| FsStorage::sweep_uploads(self))
    }
    async fn mount_blob(&self, repo: &str, from: &str, d: &Digest) -> Result<bool, StorageError> {
        FsStorage::mount_blob(self, repo, from, d)
    }
    async fn contains_blob(&self, d: &Digest) -> Result<bool, StorageError> {
        Ok(FsStorage::contains_blob(self, d))
    }
    async fn link_blob(&self, repo: &str, d: &Digest) -> Result<(), StorageError> {
        FsStorage::link_blob(self, repo, d)
    }
    async fn claim_blobs(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
        blocking(|| FsStorage::claim_blobs(self, repo, digests))
    }
    async fn put_manifest(&self, repo: &str, m: &Manifest, tags: &[&str]) -> Result<(), StorageError> {
        blocking(|| FsStorage::put_manifest(self, repo, m, tags))
    }
    async fn add_referrer(
        &self,
        repo: &str,
        subject: &Digest,
        of: &Digest,
        descriptor: &serde_json::Value,
    ) -> Result<(), StorageError> {
        FsStorage::add_referrer(self, repo, subject, of, descriptor)
    }
    async fn delete_manifest(&self, repo: &str, d: &Digest) -> Result<bool, StorageError> {
        FsStorage::delete_manifest(self, repo, d)
    }
    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StorageError> {
        FsStorage::delete_tag(self, repo, tag)
    }
    async fn delete_blob(&self, repo: &str, d: &Digest) -> Result<bool, StorageError> {
        FsStorage::delete_blob(self, repo, d)
    }
}

/// A registry's own storage, as the server holds it.
#[derive(Clone)]
pub enum Registry {
    Fs(Arc<FsStorage>),
    S3(Arc<S3Storage>),
}

/// Runs `$body` with `$s` bound to the storage inside `$r`, whichever it is.
#[macro_export]
macro_rules! with_registry {
    ($r:expr, $s:ident => $body:expr) => {
        match $r {
            $crate::registry_storage::Registry::Fs($s) => $body,
            $crate::registry_storage::Registry::S3($s) => $body,
        }
    };
}
