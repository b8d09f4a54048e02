//! **API Boundary.** The traits through which the core reaches plugins.
//!
//! The host implements them over sandboxed WebAssembly components (or, for
//! trusted fast paths, native code). Nothing a trait method returns is taken
//! on faith: the pipeline verifies every digest, size and diffID itself.

use crate::digest::Digest;
use crate::error::{ErrorClass, PluginError};
use std::io::Read;

/// A stream of bytes owned by the host side.
pub type ByteStream = Box<dyn Read + Send>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub identity_token: Option<String>,
}

/// Where a pull or push finds a registry host's credentials: `None` when
/// it has none; an error when asking failed (a credential helper that is
/// missing, failed or did not answer), which ends the operation.
pub type CredentialLookup = dyn Fn(&str) -> Result<Option<Credentials>, crate::Error> + Sync;

/// One endpoint of the endpoint loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `https://registry-1.docker.io`, `http://127.0.0.1:5000`.
    pub url: String,
    pub mirror: bool,
    pub credentials: Option<Credentials>,
    /// For a mirror configured with a path (`http://mirror:5000/hub`): the
    /// name prefix it serves the registry's repositories under (`hub`), so
    /// `library/alpine` is asked for as `hub/library/alpine`.
    pub name_prefix: Option<String>,
    /// A legacy v1 registry endpoint (the v1 transport speaks to it).
    pub v1: bool,
}

impl Endpoint {
    /// The repository name this endpoint knows `path` by.
    pub fn repository(&self, path: &str) -> String {
        match &self.name_prefix {
            Some(p) => format!("{p}/{path}"),
            None => path.to_string(),
        }
    }

    /// The endpoint as configured (with its name prefix), for messages and
    /// for remembering a failing mirror.
    pub fn configured_url(&self) -> String {
        match &self.name_prefix {
            Some(p) => format!("{}/{p}", self.url),
            None => self.url.clone(),
        }
    }
}

/// What a transport resolved a reference to.
#[derive(Debug, Clone)]
pub enum Resolved {
    Manifest {
        media_type: String,
        claimed_digest: Option<String>,
        bytes: Vec<u8>,
    },
    /// A v1 registry's ancestry chain: (image id, image JSON), image first.
    V1Chain(Vec<(String, Vec<u8>)>),
}

/// A registry transport: speaks one protocol to an endpoint.
pub trait Transport: Send + Sync {
    /// The plugin's configured name, for messages.
    fn name(&self) -> &str;
    /// Checks the endpoint speaks this protocol; returns "v2" or "v1".
    fn probe(&self, ep: &Endpoint) -> Result<String, PluginError>;
    /// Resolves a tag or digest in `repository`. The caller verifies digests.
    fn resolve(
        &self,
        ep: &Endpoint,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<Resolved, PluginError>;
    /// Opens a blob from byte `offset`. The caller verifies digest and size.
    fn open_blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<ByteStream, PluginError>;
    /// Opens the layer of v1 image `id` (a v1 transport's `open-blob`,
    /// addressed by image id: v1 has no blob digests).
    fn open_v1_layer(&self, ep: &Endpoint, repository: &str, id: &str, offset: u64) -> Result<ByteStream, PluginError> {
        let _ = (ep, repository, id, offset);
        Err(PluginError::new(
            ErrorClass::Unsupported,
            "this transport does not speak v1",
        ))
    }
    /// Lists the tags of `repository`.
    fn list_tags(&self, ep: &Endpoint, repository: &str) -> Result<Vec<String>, PluginError>;

    /// Whether this transport can push (its plugin exports `push`).
    fn can_push(&self) -> bool {
        false
    }
    /// Pushing: the size of blob `digest` when `repository` has it.
    fn stat_blob(&self, ep: &Endpoint, repository: &str, digest: &Digest) -> Result<Option<u64>, PluginError> {
        let _ = (ep, repository, digest);
        Err(no_push())
    }
    /// Pushing: links blob `digest` of repository `source` into `repository`.
    fn mount_blob(
        &self,
        ep: &Endpoint,
        repository: &str,
        digest: &Digest,
        source: &str,
    ) -> Result<Mounted, PluginError> {
        let _ = (ep, repository, digest, source);
        Err(no_push())
    }
    /// Pushing: opens an upload session.
    fn start_upload(&self, ep: &Endpoint, repository: &str) -> Result<Upload, PluginError> {
        let _ = (ep, repository);
        Err(no_push())
    }
    /// Pushing: how much of session `url` the registry holds.
    fn upload_status(&self, ep: &Endpoint, repository: &str, url: &str) -> Result<Upload, PluginError> {
        let _ = (ep, repository, url);
        Err(no_push())
    }
    /// Pushing: sends `body` as the session's next chunk.
    fn upload_chunk(
        &self,
        ep: &Endpoint,
        repository: &str,
        session: &Upload,
        body: ByteStream,
        length: Option<u64>,
    ) -> Result<Upload, PluginError> {
        let _ = (ep, repository, session, body, length);
        Err(no_push())
    }
    /// Pushing: ends the session as blob `digest`, sending `length` bytes
    /// of `body` (if any) with it.
    fn finish_upload(
        &self,
        ep: &Endpoint,
        repository: &str,
        session: &Upload,
        digest: &Digest,
        body: Option<ByteStream>,
        length: u64,
    ) -> Result<(), PluginError> {
        let _ = (ep, repository, session, digest, body, length);
        Err(no_push())
    }
    /// Pushing: puts a manifest as `reference`; the digest the registry reported.
    fn put_manifest(
        &self,
        ep: &Endpoint,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Option<String>, PluginError> {
        let _ = (ep, repository, reference, media_type, bytes);
        Err(no_push())
    }
}

fn no_push() -> PluginError {
    PluginError::new(ErrorClass::Unsupported, "this transport cannot push")
}

/// An upload session: where its next request goes, and how many bytes
/// the registry holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Upload {
    pub url: String,
    pub offset: u64,
}

/// What asking for a cross-repository mount gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounted {
    Mounted,
    /// Not mounted: a session to upload into instead.
    Upload(Upload),
}

/// A graph driver: owns layer directories on disk, shaped after Docker's.
pub trait GraphDriver: Send + Sync {
    /// The driver's name (`vfs`, `overlay2`): names its store directories.
    fn name(&self) -> &str;
    fn create(&self, id: &str, parent: Option<&str>) -> Result<(), PluginError>;
    fn remove(&self, id: &str) -> Result<(), PluginError>;
    fn exists(&self, id: &str) -> Result<bool, PluginError>;
    /// Layer `id`'s full root filesystem, as a directory handle the host
    /// opened beneath the driver's home without following links: callers
    /// read through it (`openat`), never by reopening a path the driver
    /// could change meanwhile.
    fn get(&self, id: &str) -> Result<std::os::fd::OwnedFd, PluginError>;
    fn put(&self, id: &str) -> Result<(), PluginError>;
    /// Applies a tar stream to `id`, reading it to its end. Returns the size
    /// of the content written. The caller verifies the diffID of the stream.
    fn apply_diff(&self, id: &str, parent: Option<&str>, diff: ByteStream) -> Result<u64, PluginError>;
    /// The tar of what `id` changed relative to `parent`.
    fn diff(&self, id: &str, parent: Option<&str>) -> Result<ByteStream, PluginError>;
    fn status(&self) -> Result<Vec<(String, String)>, PluginError>;
}
