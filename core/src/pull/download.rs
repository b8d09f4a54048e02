//! Blob downloads: into a spool file under `<root>/tmp/blobs`, checked
//! against the manifest's digest and size as the bytes stream, resumed with
//! a range request when a connection drops (under the one retry policy of
//! [`crate::retry`]), and shared by every pull of this process through a
//! [`DownloadPool`]. A blob is never handed on before its digest matched.

use super::follow::Live;
use super::{Puller, Status};
use crate::digest::Digest;
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::manifest::Blob;
use crate::plugin::Endpoint;
use crate::retry::{retry, Policy, Thread};
use crate::store::random_id;
use sha2::{Digest as _, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The size of a blob fetched by digest alone (repairs): only the digest
/// and the layer bound are checked.
pub(crate) const UNKNOWN_SIZE: u64 = u64::MAX;

/// Blob downloads shared by every pull of this process: two pulls that need
/// the same blob at once fetch it once and both use the spooled file.
#[derive(Default)]
pub struct DownloadPool {
    blobs: Mutex<HashMap<Digest, Entry>>,
}

/// A blob some pull of this process is downloading, or has downloaded and
/// still holds (verified, spooled): either way, nobody fetches it again.
enum Entry {
    InFlight(Weak<Slot>),
    Done(Weak<Spooled>),
}

/// One download's outcome, set once by whoever runs it; the others block
/// in `get_or_init` until it is there.
type Slot = OnceLock<std::result::Result<Arc<Spooled>, PluginError>>;

impl DownloadPool {
    /// Blob `digest`: spooled by another pull of this process (still held
    /// or in flight: `shared` is called), or fetched now by `fetch`.
    fn get(
        &self,
        digest: &Digest,
        shared: impl FnOnce(),
        fetch: impl FnOnce() -> Result<Arc<Spooled>>,
    ) -> Result<Arc<Spooled>> {
        let slot = {
            let mut m = self.blobs.lock().unwrap();
            let found = match m.get(digest) {
                Some(Entry::Done(w)) => {
                    if let Some(spooled) = w.upgrade() {
                        drop(m);
                        shared();
                        return Ok(spooled);
                    }
                    None
                }
                Some(Entry::InFlight(w)) => w.upgrade(),
                None => None,
            };
            found.unwrap_or_else(|| {
                let s = Arc::new(Slot::new());
                m.insert(digest.clone(), Entry::InFlight(Arc::downgrade(&s)));
                s
            })
        };
        // Whoever gets here first downloads; its own error keeps its type.
        let mut own = None;
        let outcome = slot.get_or_init(|| {
            let r = fetch();
            let mut m = self.blobs.lock().unwrap();
            match &r {
                Ok(spooled) => m.insert(digest.clone(), Entry::Done(Arc::downgrade(spooled))),
                Err(_) => m.remove(digest),
            };
            let outcome = r
                .as_ref()
                .map(Arc::clone)
                .map_err(|e| PluginError::new(e.class(), e.to_string()));
            own = Some(r);
            outcome
        });
        match own {
            Some(r) => r,
            None => {
                shared();
                outcome.clone().map_err(Error::Plugin)
            }
        }
    }
}

/// A verified blob spooled to disk; removed when the last user drops it.
pub struct Spooled {
    path: PathBuf,
}

impl Spooled {
    /// A spool file at `path`, removed when dropped.
    pub(crate) fn at(path: PathBuf) -> Spooled {
        Spooled { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the spooled blob for reading.
    pub fn open(&self) -> std::io::Result<File> {
        File::open(&self.path)
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How one connection's read loop ended.
pub(crate) enum Done {
    /// The stream ended: everything the registry meant to send arrived.
    Ended,
    /// The connection broke; a retry resumes from what arrived.
    Cut(std::io::Error),
}

/// Reads `stream` to its end, handing each chunk to `take` (whose error
/// stops the download for good).
pub(crate) fn read_until_done(
    stream: &mut dyn Read,
    buf: &mut [u8],
    mut take: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Done> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Ok(Done::Ended),
            Ok(n) => take(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Ok(Done::Cut(e)),
        }
    }
}

/// A blob's bytes as they arrive: written to its spool file, hashed,
/// counted, and told to a follower.
struct Sink<'a> {
    file: File,
    hasher: Sha256,
    got: u64,
    live: Option<&'a Live>,
}

impl Sink<'_> {
    fn tell(&self, f: impl FnOnce(&mut super::follow::LiveState)) {
        if let Some(l) = self.live {
            l.update(f);
        }
    }

    /// Takes `bytes` of `blob`, refusing more than it may have.
    fn take(&mut self, blob: &Blob, max_layer_bytes: u64, bytes: &[u8]) -> Result<()> {
        self.got += bytes.len() as u64;
        if blob.size == UNKNOWN_SIZE && self.got > max_layer_bytes {
            return Err(Error::Integrity(format!(
                "blob {}: larger than the layer limit of {max_layer_bytes} bytes",
                blob.digest
            )));
        }
        if self.got > blob.size {
            return Err(Error::Integrity(format!(
                "blob {}: registry sent more than the {} bytes the manifest declares",
                blob.digest, blob.size
            )));
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io("writing a download", e))?;
        let got = self.got;
        self.tell(|st| st.written = got);
        Ok(())
    }

    /// Drops what arrived: the registry cannot resume, the blob starts over.
    fn restart(&mut self) -> Result<()> {
        self.got = 0;
        self.hasher = Sha256::new();
        self.tell(|st| {
            st.generation += 1;
            st.written = 0;
        });
        self.file
            .set_len(0)
            .map_err(|e| Error::io("truncating a download", e))?;
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .map_err(|e| Error::io("rewinding a download", e))?;
        Ok(())
    }
}

impl Puller<'_> {
    /// Downloads one blob to a spooled file, shared with any other pull of
    /// this process that needs it at the same time.
    pub(super) fn download(&self, ep: &Endpoint, repo: &str, blob: &Blob, live: Option<&Live>) -> Result<Arc<Spooled>> {
        let complete = || {
            self.progress
                .layer(blob.digest.short(), Status::DownloadComplete, blob.size, blob.size)
        };
        self.downloads
            .get(&blob.digest, complete, || match self.stored_blob(blob) {
                Some(spooled) => Ok(Arc::new(spooled)),
                None => self.download_now(ep, repo, blob, live).map(Arc::new),
            })
    }

    /// The blob from the content store, when another pull of it committed
    /// after this one planned (and let go of its download): linked to a
    /// spool file of its own, so a concurrent `rmi` cannot take it away.
    fn stored_blob(&self, blob: &Blob) -> Option<Spooled> {
        let stored = self.store.content.path(&blob.digest);
        let len = std::fs::metadata(&stored).ok()?.len();
        if blob.size != UNKNOWN_SIZE && len != blob.size {
            return None;
        }
        let path = self.spool_path(blob);
        std::fs::hard_link(&stored, &path).ok()?;
        self.progress
            .layer(blob.digest.short(), Status::DownloadComplete, len, blob.size);
        Some(Spooled { path })
    }

    /// A fresh spool file name for `blob`, beside the store's other
    /// downloads (the content store links from there).
    fn spool_path(&self, blob: &Blob) -> PathBuf {
        self.store
            .blob_tmp()
            .join(format!("{}-{}", blob.digest.hex(), &random_id()[..8]))
    }

    /// Downloads `blob` now, resuming after a cut, starting over when the
    /// registry cannot resume; verified before it is returned.
    pub(super) fn download_now(&self, ep: &Endpoint, repo: &str, blob: &Blob, live: Option<&Live>) -> Result<Spooled> {
        let short = blob.digest.short();
        let spooled = Spooled {
            path: self.spool_path(blob),
        };
        let file = File::create(&spooled.path).map_err(|e| Error::io("creating a download file", e))?;
        let sink = RefCell::new(Sink {
            file,
            hasher: Sha256::new(),
            got: 0,
            live,
        });
        sink.borrow().tell(|st| st.path = Some(spooled.path.clone()));
        // Sized to the blob: many small blobs do not each zero 256 KiB.
        let mut buf = vec![0u8; blob.size.saturating_add(1).clamp(4096, 256 << 10) as usize];
        let policy = Policy::new(self.options.retries, self.options.backoff);
        let retrying = |_: &Error| {
            self.progress
                .layer(short, Status::Retrying, sink.borrow().got, blob.size)
        };
        retry(policy, &Thread, retrying, |_| {
            let sink = &mut *sink.borrow_mut();
            match self.transport.open_blob(ep, repo, &blob.digest, sink.got) {
                Ok(mut stream) => self.read_blob(&mut stream, blob, sink, &mut buf),
                Err(e) if e.class == ErrorClass::Unsupported && sink.got > 0 => {
                    // The registry cannot resume: start over, as a passing failure.
                    sink.restart()?;
                    Err(PluginError::new(ErrorClass::Transient, e.message).into())
                }
                Err(e) => Err(e.into()),
            }
        })?;
        let sink = sink.into_inner();
        self.progress
            .layer(short, Status::VerifyingChecksum, sink.got, blob.size);
        check_blob(blob, sink.got, &Digest::from_hasher(sink.hasher))?;
        self.progress
            .layer(short, Status::DownloadComplete, sink.got, blob.size);
        Ok(spooled)
    }

    /// One connection's worth of `blob`: `Ok` once the stream ended, a
    /// passing error (to resume from) if it broke off.
    fn read_blob(&self, stream: &mut dyn Read, blob: &Blob, sink: &mut Sink<'_>, buf: &mut [u8]) -> Result<()> {
        let short = blob.digest.short();
        let max = self.options.max_layer_bytes;
        let done = read_until_done(stream, buf, |bytes| {
            sink.take(blob, max, bytes)?;
            self.progress.layer(short, Status::Downloading, sink.got, blob.size);
            Ok(())
        })?;
        match done {
            Done::Ended => Ok(()),
            Done::Cut(e) => {
                Err(PluginError::new(ErrorClass::Transient, format!("reading blob {}: {e}", blob.digest)).into())
            }
        }
    }
}

/// Checks a downloaded blob against what its manifest promised.
pub(crate) fn check_blob(blob: &Blob, size: u64, digest: &Digest) -> Result<()> {
    if size != blob.size && blob.size != UNKNOWN_SIZE {
        return Err(Error::Integrity(format!(
            "blob {}: size mismatch: the manifest says {} bytes, got {size}",
            blob.digest, blob.size
        )));
    }
    if digest != &blob.digest {
        return Err(Error::Integrity(format!(
            "blob {}: digest mismatch: the content is {digest}",
            blob.digest
        )));
    }
    Ok(())
}
