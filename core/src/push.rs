//! Pushing an image: Docker's push, with what no peer does — resuming.
//!
//! resolve the local image → the registry's push endpoints (never its
//! mirrors; `https`, then `http` where plain HTTP is allowed) → one push of
//! a repository at a time (a second waits for the first, then finds its
//! blobs there) → every layer at once (bounded), each one:
//!
//! 1. **already there** (`HEAD` of its blob) → `Layer already exists`;
//! 2. **mountable**: the v2 metadata (which blob digests a diffID has been
//!    seen as, and in which repository) names the blob in another
//!    repository of the same registry → a cross-repository mount;
//! 3. **upload**: the original compressed blob from the content store,
//!    byte for byte (so digests survive pull → push), or else the layer's
//!    tar rebuilt from the driver and gzip-compressed while it is sent and
//!    hashed (no temporary copy). A session interrupted (a cut connection,
//!    a killed process) is resumed from what the registry holds: its URL is
//!    kept under `<root>/push/`, and a rebuilt layer compresses the same
//!    way again, so the bytes the registry holds are skipped, not resent.
//!
//! then the config, then the manifest (the original, or a Docker schema 2
//! one) put by tag. The local store is only read (and its v2 metadata
//! appended to): a failed push changes no image.

use crate::digest::Digest;
use crate::endpoint::{pull_endpoints, Registries};
use crate::error::{Error, ErrorClass, IoContext, PluginError, Result};
use crate::images::layers_of;
use crate::plugin::{ByteStream, CredentialLookup, Endpoint, GraphDriver, Mounted, Transport, Upload};
use crate::reference::Reference;
use crate::retry::{retry, Policy, Thread};
use crate::store::{LayerMeta, Store};
use crate::verify::HashingReader;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

const SCHEMA2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const SCHEMA2_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const SCHEMA2_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// How hard a rebuilt layer is compressed: the same level every time, so
/// an interrupted upload's bytes can be produced again and skipped. Level
/// 1 (zlib-rs's quick deflate) costs a few percent of size on typical
/// layers and runs several times faster than the default level; a push is
/// usually bound by compression, not by the network.
const GZIP_LEVEL: u32 = 1;

/// Blobs up to this size are sent with the request that closes their
/// session (`PUT ?digest=` with a body), not in a `PATCH` of their own.
const MONOLITHIC: u64 = 1 << 20;

/// Retries per blob when the registry or the connection fails passingly,
/// each resuming from what the registry holds: waits of 0.4, 0.8, 1.6 and
/// 3.2 s (a registry restarting has time to come back).
const RETRY: Policy = Policy::new(4, std::time::Duration::from_millis(400));

/// What a push reports as it goes (Docker's lines).
pub trait PushProgress: Sync {
    /// `layer` is the short id Docker prints (the diffID's first 12 hex).
    fn layer(&self, layer: &str, status: &str);
}

pub struct Pusher<'a> {
    pub store: &'a Store,
    pub driver: &'a dyn GraphDriver,
    pub transport: &'a dyn Transport,
    pub registries: &'a Registries,
    pub credentials: &'a CredentialLookup,
    pub progress: &'a dyn PushProgress,
    /// Blobs sent at once (Docker's max-concurrent-uploads, 5).
    pub concurrency: usize,
}

#[derive(Debug, Clone)]
pub struct PushOutcome {
    pub tag: String,
    pub digest: Digest,
    pub size: usize,
    /// Blobs sent (not found in the registry, not mounted).
    pub uploaded: usize,
    pub mounted: usize,
}

/// One blob of the image and where its bytes come from.
enum Source<'l> {
    /// The compressed blob as pulled, in the content store.
    Original { digest: Digest, size: u64 },
    /// The layer's tar, rebuilt and compressed on the fly.
    Rebuilt(&'l LayerMeta),
}

struct Target<'j> {
    ep: &'j Endpoint,
    /// As the registry knows it (`team/app`).
    repo: &'j str,
    /// `domain/path`, as the v2 metadata records sources.
    source_repo: String,
    domain: &'j str,
}

fn plugin(class: ErrorClass, m: impl Into<String>) -> Error {
    Error::Plugin(PluginError::new(class, m))
}

impl Pusher<'_> {
    /// The endpoints a push may use: the registry's own, never a mirror
    /// or v1.
    fn endpoints(&self, domain: &str) -> Result<Vec<Endpoint>> {
        let credentials = (self.credentials)(domain)?;
        Ok(pull_endpoints(domain, self.registries)
            .into_iter()
            .filter(|e| !e.mirror && !e.v1)
            .map(|mut e| {
                e.credentials = credentials.clone();
                e
            })
            .collect())
    }

    /// Pushes the image `reference` names (a tag) to its registry.
    pub fn push(&self, reference: &Reference) -> Result<PushOutcome> {
        if !self.transport.can_push() {
            return Err(plugin(
                ErrorClass::Unsupported,
                format!("transport {} cannot push", self.transport.name()),
            ));
        }
        let tag = reference
            .tag
            .clone()
            .ok_or_else(|| Error::InvalidReference("push takes a tag, not a digest".into()))?;
        let id = self.store.refs.get(reference)?.ok_or_else(|| {
            Error::NoSuchImage(format!(
                "an image does not exist locally with the tag: {}",
                reference.familiar_string()
            ))
        })?;
        let (_, layers) = layers_of(self.store, &id)?;
        let config = self.store.images.get(&id)?;
        let original = crate::save::original(self.store, &id, layers.len())?;

        // One push of a repository at a time; the second finds the first's blobs.
        let _lock = self.lock(&reference.name())?;
        let mut last: Option<Error> = None;
        for ep in self.endpoints(&reference.domain)? {
            let target = Target {
                ep: &ep,
                repo: &reference.path,
                source_repo: reference.name(),
                domain: &reference.domain,
            };
            match self.push_to(&target, &tag, &id, &config, &layers, original.as_ref()) {
                Ok(o) => return Ok(o),
                Err(e) => {
                    let fallback = matches!(e.class(), ErrorClass::Unreachable | ErrorClass::Unsupported);
                    if !fallback && ep.url.starts_with("http://") {
                        return Err(Error::most_telling(last, e));
                    }
                    if !fallback {
                        return Err(e);
                    }
                    Error::keep_most_telling(&mut last, e);
                }
            }
        }
        Err(last.unwrap_or_else(|| plugin(ErrorClass::Unreachable, "no endpoint to push to")))
    }

    fn lock(&self, name: &str) -> Result<std::fs::File> {
        let dir = self.push_dir();
        std::fs::create_dir_all(&dir).ctx(format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.lock", Digest::of(name.as_bytes()).hex()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(format!("opening {}", path.display()))?;
        if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            self.progress
                .layer("", &format!("Waiting for another push of {name} to finish"));
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| Error::io("waiting for another push", e.into()))?;
        }
        Ok(f)
    }

    fn push_dir(&self) -> PathBuf {
        self.store.root().join("push")
    }

    fn push_to(
        &self,
        t: &Target<'_>,
        tag: &str,
        id: &Digest,
        config: &[u8],
        layers: &[LayerMeta],
        original: Option<&crate::save::Original>,
    ) -> Result<PushOutcome> {
        let sources: Vec<Source<'_>> = match original {
            Some(o) => o
                .layers
                .iter()
                .map(|(d, s)| Source::Original {
                    digest: d.clone(),
                    size: *s,
                })
                .collect(),
            None => layers.iter().map(Source::Rebuilt).collect(),
        };
        let (blobs, uploaded, mounted) = self.push_layers(t, layers, &sources)?;
        // The config, then the manifest.
        if self.transport.stat_blob(t.ep, t.repo, id)?.is_none() && !self.mount_config(t, id, layers) {
            let mut open = || Ok(Box::new(io::Cursor::new(config.to_vec())) as ByteStream);
            self.upload(t, id, config.len() as u64, &mut open)?;
        }
        let (manifest, media_type) = match original {
            Some(o) => (o.manifest.clone(), o.media_type.clone()),
            None => (schema2(id, config.len(), &blobs), SCHEMA2.to_string()),
        };
        let digest = Digest::of(&manifest);
        let reported = self.transport.put_manifest(t.ep, t.repo, tag, &media_type, &manifest)?;
        if let Some(r) = reported {
            if r != digest.as_str() {
                return Err(Error::Integrity(format!(
                    "the registry reports the manifest as {}, but it is {digest}",
                    crate::text::escape_line(&r)
                )));
            }
        }
        Ok(PushOutcome {
            tag: tag.to_string(),
            digest,
            size: manifest.len(),
            uploaded,
            mounted,
        })
    }

    /// Pushes every layer at once, at most `concurrency` in flight; the
    /// blobs in layer order, and how many were uploaded and mounted.
    fn push_layers(&self, t: &Target<'_>, layers: &[LayerMeta], sources: &[Source<'_>]) -> Result<PushedLayers> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let results: Mutex<Vec<Option<Result<Pushed>>>> = Mutex::new((0..sources.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.clamp(1, 16).min(sources.len().max(1)) {
                // After a failure no new layer is taken; those in flight finish.
                s.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(src) = sources.get(i) else { return };
                        let r = self.push_layer(t, &layers[i], src);
                        if r.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        results.lock().unwrap()[i] = Some(r);
                    }
                });
            }
        });
        let mut blobs = Vec::new();
        let (mut uploaded, mut mounted) = (0, 0);
        for r in results.into_inner().unwrap() {
            let Some(r) = r else { continue };
            let (d, size, sent) = r?;
            match sent {
                Sent::Uploaded => uploaded += 1,
                Sent::Mounted => mounted += 1,
                Sent::Existed => {}
            }
            blobs.push((d, size));
        }
        if blobs.len() != sources.len() {
            return Err(plugin(ErrorClass::Internal, "a layer was not pushed"));
        }
        Ok((blobs, uploaded, mounted))
    }

    /// Pushes one layer's blob; its digest and size, and how it got there.
    fn push_layer(&self, t: &Target<'_>, l: &LayerMeta, src: &Source<'_>) -> Result<(Digest, u64, Sent)> {
        let short = &l.diff_id.hex()[..12];
        self.progress.layer(short, "Preparing");
        // Blobs this layer is known by: the original, or every digest the
        // v2 metadata has seen its diffID as.
        let known: Vec<(Digest, String)> = self.store.layers.blob_sources(&l.diff_id);
        let candidates: Vec<Digest> = match src {
            Source::Original { digest, .. } => vec![digest.clone()],
            Source::Rebuilt(_) => {
                let mut c: Vec<Digest> = known.iter().map(|(d, _)| d.clone()).collect();
                c.dedup();
                c
            }
        };
        for d in &candidates {
            if let Some(size) = self.transport.stat_blob(t.ep, t.repo, d)? {
                if matches!(src, Source::Original { size: s, .. } if *s != size) {
                    continue;
                }
                self.record(l, d, &t.source_repo);
                self.progress.layer(short, "Layer already exists");
                return Ok((d.clone(), size, Sent::Existed));
            }
        }
        // A mount from another repository of this registry.
        let prefix = format!("{}/", t.domain);
        for (d, source) in &known {
            let Some(from) = source.strip_prefix(&prefix) else {
                continue;
            };
            if from == t.repo || !candidates.contains(d) {
                continue;
            }
            match self.transport.mount_blob(t.ep, t.repo, d, from) {
                Ok(Mounted::Mounted) => {
                    let size = match src {
                        Source::Original { size, .. } => *size,
                        Source::Rebuilt(_) => self.transport.stat_blob(t.ep, t.repo, d)?.unwrap_or(0),
                    };
                    self.record(l, d, &t.source_repo);
                    self.progress.layer(short, &format!("Mounted from {from}"));
                    return Ok((d.clone(), size, Sent::Mounted));
                }
                // Not mountable (the registry opened a session instead,
                // left unused: sessions expire) or refused: upload.
                Ok(Mounted::Upload(_)) | Err(_) => {}
            }
        }
        self.progress.layer(short, "Pushing");
        let (digest, size) = match src {
            Source::Original { digest, size } => {
                let content = &self.store.content;
                let mut open = || -> Result<ByteStream> {
                    let f = content
                        .open_blob(digest)?
                        .ok_or_else(|| Error::Integrity(format!("blob {digest} left the content store")))?;
                    Ok(Box::new(f) as ByteStream)
                };
                self.upload(t, digest, *size, &mut open)?;
                (digest.clone(), *size)
            }
            Source::Rebuilt(l) => self.upload_rebuilt(t, l)?,
        };
        self.record(l, &digest, &t.source_repo);
        self.progress.layer(short, "Pushed");
        Ok((digest, size, Sent::Uploaded))
    }

    /// Mounts the config from a repository of this registry its layers
    /// came from or went to (where the image most likely is whole).
    fn mount_config(&self, t: &Target<'_>, id: &Digest, layers: &[LayerMeta]) -> bool {
        let prefix = format!("{}/", t.domain);
        let mut tried = Vec::new();
        for l in layers.iter().rev() {
            for (_, source) in self.store.layers.blob_sources(&l.diff_id) {
                let Some(from) = source.strip_prefix(&prefix) else {
                    continue;
                };
                if from == t.repo || tried.iter().any(|x: &String| x == from) || tried.len() >= 3 {
                    continue;
                }
                tried.push(from.to_string());
                if let Ok(Mounted::Mounted) = self.transport.mount_blob(t.ep, t.repo, id, from) {
                    return true;
                }
            }
        }
        false
    }

    /// Appends to the v2 metadata that `l` is known as `digest` in `repo`.
    fn record(&self, l: &LayerMeta, digest: &Digest, repo: &str) {
        let _ = self.store.layers.record_blob(digest, &l.diff_id, repo);
    }

    /// Where a session for `digest` in this target is remembered.
    fn session_file(&self, t: &Target<'_>, key: &str) -> PathBuf {
        self.push_dir()
            .join("sessions")
            .join(Digest::of(format!("{}\n{}\n{key}", t.ep.url, t.repo).as_bytes()).hex())
    }

    fn remember(&self, path: &std::path::Path, u: &Upload) {
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = crate::store::write_atomic(path, &serde_json::to_vec(u).expect("serialisable"));
    }

    /// A session to continue: the one remembered, if the registry still
    /// has it, else a new one.
    fn session(&self, t: &Target<'_>, path: &std::path::Path) -> Result<Upload> {
        if let Some(u) = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Upload>(&b).ok())
        {
            if let Ok(now) = self.transport.upload_status(t.ep, t.repo, &u.url) {
                return Ok(now);
            }
        }
        let u = self.transport.start_upload(t.ep, t.repo)?;
        self.remember(path, &u);
        Ok(u)
    }

    /// Where a session stands after a failure: what the registry holds, or
    /// — a session the registry lost (expired, restarted without it) — a
    /// new one from byte 0.
    fn recover(&self, t: &Target<'_>, path: &std::path::Path, session: &Upload) -> Result<Upload> {
        let now = match self.transport.upload_status(t.ep, t.repo, &session.url) {
            Ok(u) => u,
            Err(e) if e.class == ErrorClass::NotFound => self.transport.start_upload(t.ep, t.repo)?,
            Err(e) => return Err(e.into()),
        };
        self.remember(path, &now);
        Ok(now)
    }

    /// Uploads blob `digest` of known `size` from `open()` (a fresh stream
    /// from byte 0), resuming from what the registry holds after a
    /// passing failure.
    fn upload(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        size: u64,
        open: &mut dyn FnMut() -> Result<ByteStream>,
    ) -> Result<()> {
        let path = self.session_file(t, digest.as_str());
        self.with_session(t, &path, |session| {
            self.send_blob(t, digest, size, open, &path, session)
        })
    }

    /// Runs `send` on the upload session remembered at `path` (or a new
    /// one) under the retry policy; before each retry the session is
    /// recovered from what the registry says it holds.
    fn with_session<T>(
        &self,
        t: &Target<'_>,
        path: &Path,
        mut send: impl FnMut(&mut Upload) -> Result<T>,
    ) -> Result<T> {
        let mut session = self.session(t, path)?;
        retry(
            RETRY,
            &Thread,
            |_| {},
            |attempt| {
                if attempt > 0 {
                    session = self.recover(t, path, &session)?;
                }
                send(&mut session)
            },
        )
    }

    /// One pass at blob `digest`: what the registry does not hold yet,
    /// then the request that closes the session.
    fn send_blob(
        &self,
        t: &Target<'_>,
        digest: &Digest,
        size: u64,
        open: &mut dyn FnMut() -> Result<ByteStream>,
        path: &std::path::Path,
        session: &mut Upload,
    ) -> Result<()> {
        // A small blob goes whole with the closing `PUT`.
        let mut last: Option<ByteStream> = None;
        if session.offset == 0 && size <= MONOLITHIC {
            last = Some(open()?);
        } else if session.offset < size {
            let mut body = open()?;
            if session.offset > 0 {
                io::copy(&mut (&mut body).take(session.offset), &mut io::sink())
                    .ctx(format!("reading blob {digest}"))?;
            }
            let left = size - session.offset;
            *session = self
                .transport
                .upload_chunk(t.ep, t.repo, session, Box::new(body.take(left)), Some(left))?;
            self.remember(path, session);
        }
        let length = if last.is_some() { size } else { 0 };
        self.finish(t, path, session, digest, last, length)
    }

    /// Closes `session` as blob `digest`. A refusal forgets the session; a
    /// passing failure keeps it, to be resumed.
    fn finish(
        &self,
        t: &Target<'_>,
        path: &std::path::Path,
        session: &Upload,
        digest: &Digest,
        last: Option<ByteStream>,
        length: u64,
    ) -> Result<()> {
        let r = self
            .transport
            .finish_upload(t.ep, t.repo, session, digest, last, length);
        let forget = match &r {
            Ok(()) => true,
            Err(e) => !e.is_transient(),
        };
        if forget {
            let _ = std::fs::remove_file(path);
        }
        Ok(r?)
    }

    /// Uploads layer `l` rebuilt from the driver and compressed while it
    /// goes; its digest and size. The digest is known only at the end, so
    /// the session is remembered under the diffID.
    fn upload_rebuilt(&self, t: &Target<'_>, l: &LayerMeta) -> Result<(Digest, u64)> {
        let path = self.session_file(t, &format!("rebuilt {}", l.diff_id));
        let mut restarted = false;
        self.with_session(t, &path, |session| loop {
            let skip = session.offset;
            let (digest, len);
            (*session, digest, len) = self.send_rebuilt(t, l, session)?;
            match self.finish(t, &path, session, &digest, None, 0) {
                Ok(()) => return Ok((digest, len)),
                // A resumed session whose whole is refused (what the
                // registry held was not these bytes): once more, whole.
                Err(_) if skip > 0 && !restarted => {
                    restarted = true;
                    *session = self.transport.start_upload(t.ep, t.repo)?;
                    self.remember(&path, session);
                }
                Err(e) => return Err(e),
            }
        })
    }

    /// Sends layer `l`, rebuilt and compressed, past the `session.offset`
    /// bytes the registry holds (produced again, the same bytes, and
    /// skipped); the session after it, and the blob's digest and size.
    fn send_rebuilt(&self, t: &Target<'_>, l: &LayerMeta, session: &Upload) -> Result<(Upload, Digest, u64)> {
        let skip = session.offset;
        std::thread::scope(|s| {
            let (rx, tx) = io::pipe().map_err(|e| Error::io("starting a layer pipe", e))?;
            let producer = s.spawn(move || -> Result<()> {
                // Compressed on every core, the same bytes every time.
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                std::thread::scope(|zs| {
                    let mut gz = crate::pargz::ParGz::new(zs, tx, GZIP_LEVEL, threads)
                        .map_err(|e| Error::io("compressing a layer", e))?;
                    crate::save::rebuild_layer(self.store, self.driver, l, &mut |r| io::copy(r, &mut gz).map(drop))?;
                    gz.finish().map_err(|e| Error::io("compressing a layer", e))?;
                    Ok(())
                })
            });
            let (mut hashed, hash) = HashingReader::new(rx);
            if skip > 0 {
                io::copy(&mut (&mut hashed).take(skip), &mut io::sink()).ctx("compressing a layer")?;
            }
            let reader = SharedReader(std::sync::Arc::new(Mutex::new(hashed)));
            let r = self
                .transport
                .upload_chunk(t.ep, t.repo, session, Box::new(reader.clone()), None);
            // Whatever the upload left is drained, so the producer ends.
            let _ = io::copy(&mut reader.clone(), &mut io::sink());
            producer.join().expect("layer producer panicked")?;
            let (digest, len) = hash.finish();
            Ok((r?, digest, len))
        })
    }
}

/// A layer's blob in the registry: digest, size, how it got there.
type Pushed = (Digest, u64, Sent);

/// An image's layer blobs in the registry (digest, size), and how many
/// were uploaded and mounted.
type PushedLayers = (Vec<(Digest, u64)>, usize, usize);

#[derive(Debug, Clone, Copy)]
enum Sent {
    Existed,
    Mounted,
    Uploaded,
}

/// One reader read from two places (the upload, then the drain after it).
struct SharedReader<R>(std::sync::Arc<Mutex<R>>);

impl<R> Clone for SharedReader<R> {
    fn clone(&self) -> Self {
        SharedReader(self.0.clone())
    }
}

impl<R: Read> Read for SharedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.lock().unwrap().read(buf)
    }
}

/// A Docker schema 2 manifest for config `id` and layer blobs `blobs`.
fn schema2(id: &Digest, config_len: usize, blobs: &[(Digest, u64)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = blobs
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": SCHEMA2_LAYER, "size": s, "digest": d}))
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {"mediaType": SCHEMA2_CONFIG, "size": config_len, "digest": id},
        "layers": layers,
    }))
    .expect("serialisable")
}
