//! What the registry handlers read from: one trait, so the same handlers
//! serve a gantry store's content today and an object store (S3 API) later
//! — a registry outgrows one machine by swapping this, nothing else.
//!
//! Calls are synchronous and expected to be quick (metadata lookups, an
//! open and a map of a file); a blob's bytes arrive as a body the server
//! streams, so an implementation that fetches them over the network hands
//! back a stream instead of bytes in memory.

use bytes::Bytes;
use gantry_core::digest::Digest;
use http_body_util::combinators::BoxBody;
use std::ops::Range;

/// A response body of blob bytes.
pub type BlobBody = BoxBody<Bytes, std::io::Error>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The storage itself failed (a disk error, a corrupt record): the
    /// client gets a 500, the operator the message.
    #[error("{0}")]
    Backend(String),
    /// What was uploaded does not hash to the digest the client named.
    #[error("content does not match its digest {expected} (it is {got})")]
    DigestMismatch { expected: Digest, got: Digest },
    /// No such upload session in this repository.
    #[error("upload session unknown")]
    UploadUnknown,
    /// An upload would grow past the size cap.
    #[error("an upload may hold at most {limit} bytes")]
    TooLarge { limit: u64 },
    /// The store the storage lives in would pass its quota.
    #[error("{0}")]
    Quota(#[from] gantry_core::store::quota::Exceeded),
    /// No room for another upload session (the session caps).
    #[error("too many upload sessions: {0}")]
    TooManyUploads(String),
}

impl From<gantry_core::Error> for StorageError {
    fn from(e: gantry_core::Error) -> Self {
        StorageError::Backend(e.to_string())
    }
}

/// A manifest as stored: its bytes are what its digest names.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub digest: Digest,
    pub bytes: Bytes,
}

impl Manifest {
    /// Whether it may be stored under `tags`: every tag valid, and its
    /// bytes what its digest names.
    pub fn check(&self, tags: &[&str]) -> Result<(), StorageError> {
        if tags.iter().any(|t| !gantry_core::reference::valid_tag(t)) {
            return Err(StorageError::Backend("invalid tag".into()));
        }
        if Digest::of_with(self.digest.algorithm(), &self.bytes) != self.digest {
            return Err(StorageError::Backend(format!(
                "manifest does not match its digest {}",
                self.digest
            )));
        }
        Ok(())
    }
}

/// How a manifest is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    Tag(String),
    Digest(Digest),
}

pub trait Storage: Send + Sync + 'static {
    /// Every repository name, sorted.
    fn catalog(&self) -> Result<Vec<String>, StorageError>;

    /// The tags of `repo`, sorted; `None` when the repository is unknown.
    fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError>;

    /// Whether `repo` exists at all (for NAME_UNKNOWN against MANIFEST_UNKNOWN).
    fn has_repository(&self, repo: &str) -> Result<bool, StorageError>;

    /// A manifest of `repo`, by tag or digest.
    fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError>;

    /// The size of a blob `repo` links to.
    fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// The bytes `range` of a blob `repo` links to (the caller has checked
    /// the range against [`Storage::blob_size`]).
    fn blob(&self, repo: &str, digest: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError>;

    /// v1: the tags of `repo` and the top image id each names; `None` when
    /// this storage has no v1 view of the repository.
    fn v1_tags(&self, _repo: &str) -> Result<Option<std::collections::BTreeMap<String, String>>, StorageError> {
        Ok(None)
    }

    /// v1: every image id of `repo`, sorted.
    fn v1_images(&self, _repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        Ok(None)
    }

    /// v1: one image by id.
    fn v1_image(&self, _id: &str) -> Result<Option<crate::v1::V1Image>, StorageError> {
        Ok(None)
    }

    /// v1: the bytes `range` of an image's layer.
    fn v1_layer(&self, _id: &str, _range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        Ok(None)
    }
}
