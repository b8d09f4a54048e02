//! The pull pipeline: resolve → endpoint loop → download and verify →
//! apply → register.
//!
//! Blobs download concurrently (a limit, default 3) into spooled files under
//! `<root>/tmp/blobs`, each checked against its manifest digest and size as
//! it streams, resuming with a range request when a connection drops. Layers
//! are applied in order as soon as their blob is complete: decompressed,
//! hashed to a diffID, and handed to the driver as a host-side stream. Only
//! when every layer verified are the layers, then the image, then its
//! references committed; on any failure the staged driver layers are removed
//! and the store is as it was.

use crate::digest::Digest;
use crate::endpoint::{pull_endpoints, Registries};
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::manifest::{self, Blob, ImageConfig, ImageManifest, Parsed};
use crate::platform::Platform;
use crate::plugin::{Credentials, Endpoint, GraphDriver, Resolved, Transport};
use crate::reference::Reference;
use crate::stage::{ImageCommit, Staging};
use crate::store::{random_id, ImageContent, Store};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// What a pull reports as it goes, per layer (by short blob digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    AlreadyExists,
    Waiting,
    Downloading,
    Retrying,
    VerifyingChecksum,
    DownloadComplete,
    Extracting,
    PullComplete,
    /// `load`: a layer being read from an archive and applied.
    LoadingLayer,
}

impl Status {
    /// Docker's wording.
    pub fn docker_text(self) -> &'static str {
        match self {
            Status::AlreadyExists => "Already exists",
            Status::Waiting => "Waiting",
            Status::Downloading => "Downloading",
            Status::Retrying => "Retrying",
            Status::VerifyingChecksum => "Verifying Checksum",
            Status::DownloadComplete => "Download complete",
            Status::Extracting => "Extracting",
            Status::PullComplete => "Pull complete",
            Status::LoadingLayer => "Loading layer",
        }
    }
}

/// Receives progress; the host draws bars or prints lines.
pub trait Progress: Send + Sync {
    /// `id` is the 12-digit short digest of the layer blob.
    fn layer(&self, id: &str, status: Status, current: u64, total: u64);
    /// A line about the whole pull (`latest: Pulling from library/x`).
    fn line(&self, text: &str);
}

/// A progress sink that says nothing.
pub struct Quiet;
impl Progress for Quiet {
    fn layer(&self, _: &str, _: Status, _: u64, _: u64) {}
    fn line(&self, _: &str) {}
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to pick from a manifest list; `None` means the host's.
    pub platform: Option<Platform>,
    pub max_concurrent_downloads: usize,
    /// How many times a transient failure of one blob download is retried
    /// (resuming where it broke off).
    pub retries: u32,
    /// How many times a transient failure of a manifest or config request is retried.
    pub request_retries: u32,
    /// The first retry's wait; doubled each time.
    pub backoff: Duration,
    /// The bound on one layer's uncompressed size.
    pub max_layer_bytes: u64,
    /// The most layers one image may have.
    pub max_depth: usize,
    /// How long a mirror that could not be reached (or kept failing) is
    /// skipped, across processes, instead of being waited on at every pull.
    pub mirror_backoff: Duration,
    /// Set when whoever asked for the pull went away (a daemon client that
    /// disconnected): no further layer is applied and nothing is
    /// committed. Downloads in flight finish, since another pull may share
    /// them.
    pub cancel: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: None,
            max_concurrent_downloads: 3,
            retries: 5,
            request_retries: 2,
            backoff: Duration::from_millis(100),
            max_layer_bytes: crate::stage::DEFAULT_MAX_LAYER_BYTES,
            max_depth: crate::stage::DEFAULT_MAX_DEPTH,
            mirror_backoff: Duration::from_secs(30),
            cancel: None,
        }
    }
}

/// What a finished pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub image_id: Digest,
    /// The manifest's digest (a v1 pull has none).
    pub manifest_digest: Option<Digest>,
    /// False when the image and all its layers were already present.
    pub downloaded: bool,
    pub timings: Timings,
}

/// Where a pull's time went, for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Wall time of the whole pull.
    pub total: Duration,
    /// Time the driver spent creating layers on their parents (vfs: copies).
    pub create: Duration,
    /// Time spent decompressing, hashing and unpacking layers.
    pub apply: Duration,
    /// Summed wall time of the blob downloads (they overlap).
    pub download: Duration,
}

/// A manifest as the registry served it, verified and parsed.
struct Fetched {
    parsed: Parsed,
    digest: Digest,
    media_type: String,
    bytes: Vec<u8>,
}

/// Blob downloads shared by every pull of this process: two pulls that need
/// the same blob at once fetch it once and both use the spooled file.
#[derive(Default)]
pub struct SharedDownloads {
    blobs: Mutex<HashMap<Digest, Shared>>,
}

/// A blob some pull of this process is downloading, or has downloaded and
/// still holds (verified, spooled): either way, nobody fetches it again.
enum Shared {
    InFlight(Weak<Slot>),
    Done(Weak<Spooled>),
}

#[derive(Default)]
struct Slot {
    done: Mutex<Option<std::result::Result<Arc<Spooled>, PluginError>>>,
    cv: Condvar,
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

    /// Opens the spooled blob for reading.
    pub fn open(&self) -> std::io::Result<File> {
        File::open(&self.path)
    }
}

/// The size of a blob fetched by digest alone (repairs): only the digest
/// and the layer bound are checked.
const UNKNOWN_SIZE: u64 = u64::MAX;

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A download as it happens, so the layer can be applied while its bytes
/// arrive instead of after: the downloader reports each write, a restart
/// from zero (a registry that cannot resume) and the end, and a [`Follow`]
/// reads the spool file up to what was written.
#[derive(Default)]
struct Live {
    state: Mutex<LiveState>,
    cv: Condvar,
}

#[derive(Default)]
struct LiveState {
    path: Option<PathBuf>,
    written: u64,
    /// Bumped when the download starts over; a follower must too.
    generation: u32,
    /// `Some(true)` once the blob is complete and its digest verified.
    done: Option<bool>,
}

impl Live {
    fn update(&self, f: impl FnOnce(&mut LiveState)) {
        f(&mut self.state.lock().unwrap());
        self.cv.notify_all();
    }

    /// The download ended: verified (with its file) or failed.
    fn finish(&self, r: &Result<Arc<Spooled>>) {
        self.update(|st| match r {
            Ok(spooled) => {
                if st.path.as_ref() != Some(&spooled.path) {
                    // Another pull's download, shared: the whole file is there.
                    st.path = Some(spooled.path.clone());
                    st.written = std::fs::metadata(&spooled.path).map(|m| m.len()).unwrap_or(0);
                    st.generation += 1;
                }
                st.done = Some(true);
            }
            Err(_) => st.done = Some(false),
        });
    }
}

/// Reads a download as it is written. It ends only once the download is
/// complete and its digest verified; if the download fails or starts over,
/// it fails and raises `interrupted`: the layer is applied again from the
/// finished file, or the download's own error is reported. `waited` says it
/// had to wait for bytes: a driver call that then ran past its wall-clock
/// deadline (the wait counts) is tried again from the finished file too.
struct Follow<'a> {
    live: &'a Live,
    file: Option<File>,
    pos: u64,
    generation: u32,
    interrupted: Arc<std::sync::atomic::AtomicBool>,
    waited: Arc<std::sync::atomic::AtomicBool>,
}

impl Follow<'_> {
    fn interrupted(&self, why: &str) -> std::io::Error {
        self.interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
        std::io::Error::other(why.to_string())
    }
}

impl Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (avail, done, path) = {
            let mut st = self.live.state.lock().unwrap();
            loop {
                if st.generation != self.generation {
                    return Err(self.interrupted("the download started over"));
                }
                if st.done == Some(false) {
                    return Err(self.interrupted("the download failed"));
                }
                if st.path.is_some() && (st.written > self.pos || st.done == Some(true)) {
                    break;
                }
                self.waited.store(true, std::sync::atomic::Ordering::Relaxed);
                st = self.live.cv.wait(st).unwrap();
            }
            (st.written - self.pos, st.done == Some(true), st.path.clone())
        };
        if avail == 0 && done {
            return Ok(0);
        }
        if self.file.is_none() {
            match File::open(path.expect("known")) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    // A failed download removes its file before it says
                    // so: wait for its word, so its own error is reported.
                    let generation = self.generation;
                    let st = self.live.state.lock().unwrap();
                    let st = self
                        .live
                        .cv
                        .wait_while(st, |st| st.done.is_none() && st.generation == generation)
                        .unwrap();
                    let failed = st.generation != generation || st.done == Some(false);
                    drop(st);
                    return Err(if failed {
                        self.interrupted("the download failed")
                    } else {
                        e
                    });
                }
            }
        }
        let want = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
        let n = self.file.as_mut().expect("opened").read(&mut buf[..want])?;
        // Bytes read after a restart would belong to the new download.
        if self.live.state.lock().unwrap().generation != self.generation {
            return Err(self.interrupted("the download started over"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The host whose credentials an endpoint gets: the registry's domain for
/// the registry itself, the mirror's `host[:port]` for a mirror.
pub fn credential_host(ep: &Endpoint, domain: &str) -> String {
    if !ep.mirror {
        return domain.to_string();
    }
    let rest = ep.url.split_once("://").map(|(_, r)| r).unwrap_or(&ep.url);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority)
        .to_string()
}

/// A pull with its collaborators.
pub struct Puller<'a> {
    pub store: &'a Store,
    pub transport: &'a dyn Transport,
    /// The v1 transport, for registries whose config enables v1.
    pub v1_transport: Option<&'a dyn Transport>,
    pub driver: &'a dyn GraphDriver,
    pub registries: &'a Registries,
    pub credentials: &'a (dyn Fn(&str) -> Option<Credentials> + Sync),
    pub downloads: &'a SharedDownloads,
    pub progress: &'a dyn Progress,
    pub options: PullOptions,
}

/// The endpoint, repository and clock of one pull attempt.
struct Job<'j> {
    ep: &'j Endpoint,
    domain: &'j str,
    /// The repository as the endpoint knows it.
    repo: &'j str,
    /// The repository as the reference names it, for distribution metadata.
    source_repo: &'j str,
    clock: &'j Mutex<Timings>,
}

impl Puller<'_> {
    /// Runs `attempt` on each endpoint of `domain` in turn, falling back to
    /// the next only on errors that allow it (Docker's rules). A mirror that
    /// could not be reached or kept failing is skipped for `mirror_backoff`,
    /// remembered in the store, so later pulls do not wait on it again.
    fn each_endpoint<T>(&self, domain: &str, mut attempt: impl FnMut(&Endpoint) -> Result<T>) -> Result<T> {
        let mut last: Option<Error> = None;
        let now = std::time::SystemTime::now();
        for mut ep in pull_endpoints(domain, self.registries) {
            if ep.mirror
                && self
                    .store
                    .mirror_skipped_until(&ep.configured_url())
                    .is_some_and(|until| now < until)
            {
                continue;
            }
            // Credentials by the endpoint's own host: a mirror never sees the
            // registry's, and the registry never sees a mirror's.
            ep.credentials = (self.credentials)(&credential_host(&ep, domain));
            let result = attempt(&ep);
            if ep.mirror {
                match &result {
                    Err(Error::Plugin(e))
                        if matches!(
                            e.class,
                            ErrorClass::Unreachable | ErrorClass::Transient | ErrorClass::TimedOut
                        ) =>
                    {
                        self.store
                            .skip_mirror(&ep.configured_url(), now + self.options.mirror_backoff)
                    }
                    Err(_) => {}
                    Ok(_) => self.store.mirror_answered(&ep.configured_url()),
                }
            }
            match result {
                Ok(t) => return Ok(t),
                Err(Error::Plugin(e)) if e.allows_fallback(ep.mirror) => {
                    let url = crate::text::redact_url(&ep.configured_url());
                    let message = if e.message.starts_with(&url) {
                        e.message
                    } else {
                        format!("{url}: {}", e.message)
                    };
                    last = Some(Error::Plugin(PluginError::new(e.class, message)));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config(format!("no endpoint for {domain}"))))
    }

    /// Pulls `reference`, trying each endpoint in turn.
    /// Fails when the pull was cancelled (see [`PullOptions::cancel`]).
    fn check_cancelled(&self) -> Result<()> {
        match &self.options.cancel {
            Some(c) if c.load(std::sync::atomic::Ordering::Relaxed) => Err(Error::io(
                "pulling",
                std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled: the client went away"),
            )),
            _ => Ok(()),
        }
    }

    pub fn pull(&self, reference: &Reference) -> Result<PullOutcome> {
        let started = std::time::Instant::now();
        self.each_endpoint(&reference.domain, |ep| {
            let clock = Mutex::new(Timings::default());
            let mut o = if ep.v1 {
                let v1 = self.v1_transport.ok_or_else(|| {
                    Error::Config(format!(
                        "v1 is enabled for {} but no v1 transport is configured",
                        reference.domain
                    ))
                })?;
                self.pull_from_v1(v1, ep, reference)?
            } else {
                self.pull_from(ep, reference, &clock)?
            };
            o.timings = *clock.lock().unwrap();
            o.timings.total = started.elapsed();
            Ok(o)
        })
    }

    /// Fetches blob `digest` of `source` (`domain/repository`, as the
    /// distribution metadata records it) by digest alone, trying the
    /// registry's endpoints in turn. For repairs: the size is not known,
    /// so it is bounded by the layer limit; the digest is checked.
    pub fn fetch_blob(&self, source: &str, digest: &Digest) -> Result<Spooled> {
        let r = Reference::parse(source)?;
        let blob = Blob {
            digest: digest.clone(),
            size: UNKNOWN_SIZE,
            media_type: String::new(),
        };
        self.each_endpoint(&r.domain, |ep| {
            self.download_now(ep, &ep.repository(&r.path), &blob, None)
        })
    }

    fn retrying<T>(
        &self,
        mut f: impl FnMut() -> std::result::Result<T, PluginError>,
    ) -> std::result::Result<T, PluginError> {
        let mut wait = self.options.backoff;
        let mut attempt = 0;
        loop {
            match f() {
                Err(e) if e.is_transient() && attempt < self.options.request_retries => {
                    attempt += 1;
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                other => return other,
            }
        }
    }

    fn resolve(&self, ep: &Endpoint, repo: &str, reference: &str) -> Result<Fetched> {
        let resolved = self.retrying(|| self.transport.resolve(ep, repo, reference, manifest::ACCEPT))?;
        let Resolved::Manifest {
            media_type,
            claimed_digest,
            bytes,
        } = resolved
        else {
            return Err(Error::Plugin(PluginError::new(
                ErrorClass::Unsupported,
                "v1 image chains are not supported by this pipeline yet",
            )));
        };
        if bytes.len() > manifest::MAX_MANIFEST_BYTES {
            return Err(Error::InvalidManifest("manifest is larger than 4 MiB".into()));
        }
        let digest = Digest::of(&bytes);
        if let Ok(want) = reference.parse::<Digest>() {
            if want != digest {
                return Err(Error::Integrity(format!(
                    "manifest digest mismatch: expected {want}, got {digest}"
                )));
            }
        }
        if let Some(claimed) = claimed_digest {
            if claimed != digest.as_str() {
                return Err(Error::Integrity(format!(
                    "manifest digest mismatch: registry claimed {claimed}, content is {digest}"
                )));
            }
        }
        Ok(Fetched {
            parsed: manifest::parse(&media_type, &bytes)?,
            digest,
            media_type,
            bytes,
        })
    }

    fn pull_from(&self, ep: &Endpoint, reference: &Reference, clock: &Mutex<Timings>) -> Result<PullOutcome> {
        // The name this endpoint knows the repository by (a mirror may serve
        // it under a prefix); progress and records use the reference's own.
        let repo = &ep.repository(&reference.path);
        let tag_or_digest = reference.registry_reference();
        let first = match self.resolve(ep, repo, &tag_or_digest) {
            // Docker's rule: a registry whose `/v2/` does not answer is not a
            // v2 registry, and the endpoint loop may go on (to v1).
            Err(Error::Plugin(e)) if e.class == ErrorClass::NotFound && !ep.mirror => {
                self.transport.probe(ep)?;
                return Err(Error::Plugin(e));
            }
            r => r?,
        };
        let mut manifest_digest = first.digest.clone();
        // Said once the endpoint answered, so a fallback does not repeat it.
        self.progress
            .line(&format!("{}: Pulling from {}", tag_or_digest, reference.path));
        let want_platform = self.options.platform.clone().unwrap_or_else(Platform::host);
        // Kept as served, for the content store: the image manifest and the
        // list it was chosen from.
        let (image, kept_manifest, kept_index) = match first.parsed {
            Parsed::Image(m) => (m, (first.digest, first.media_type, first.bytes), None),
            Parsed::List(ref entries) => {
                let chosen = manifest::select(entries, &want_platform)?;
                // For a pull by tag, Docker records the list's digest.
                let second = self.resolve(ep, repo, chosen.digest.as_str())?;
                match second.parsed {
                    Parsed::Image(m) => (
                        m,
                        (second.digest, second.media_type, second.bytes),
                        Some((first.digest, first.media_type, first.bytes)),
                    ),
                    Parsed::List(_) => {
                        return Err(Error::InvalidManifest("a manifest list points at another list".into()));
                    }
                }
            }
        };
        if reference.digest.is_some() {
            manifest_digest = reference.digest.clone().expect("checked");
        }
        let config_bytes = self.fetch_small(ep, repo, &image.config)?;
        let config = ImageConfig::parse(&config_bytes)?;
        if image.layers.len() > self.options.max_depth {
            return Err(crate::stage::too_deep(image.layers.len(), self.options.max_depth));
        }
        if config.diff_ids.len() != image.layers.len() {
            return Err(Error::InvalidManifest(format!(
                "image config lists {} layers but the manifest has {}",
                config.diff_ids.len(),
                image.layers.len()
            )));
        }
        if let Some(p) = &self.options.platform {
            if !p.matches(&config.os, &config.architecture, config.variant.as_deref()) {
                return Err(Error::NoMatchingPlatform(format!(
                    "{p} (image {} is {}/{})",
                    reference, config.os, config.architecture
                )));
            }
        }
        let chain_ids = Digest::chain_ids(&config.diff_ids);
        let image_id = Digest::of(&config_bytes);
        let mut staging = Staging::new(self.store, self.driver, self.options.max_layer_bytes);
        let content = self.store.keep_content().then(|| {
            staging.keep_bytes(&kept_manifest.0, kept_manifest.2.clone());
            if let Some((d, _, bytes)) = &kept_index {
                staging.keep_bytes(d, bytes.clone());
            }
            staging.keep_bytes(&image.config.digest, config_bytes.clone());
            ImageContent {
                manifest: kept_manifest.0.clone(),
                manifest_type: kept_manifest.1.clone(),
                index: kept_index.as_ref().map(|(d, _, _)| d.clone()),
                index_type: kept_index.as_ref().map(|(_, t, _)| t.clone()),
                blobs: std::iter::once(&image.config.digest)
                    .chain(image.layers.iter().map(|l| &l.blob.digest))
                    .cloned()
                    .collect(),
            }
        });
        let mut missing = Vec::new();
        for (i, l) in image.layers.iter().enumerate() {
            if staging.reuse(&chain_ids[i])? {
                self.progress.layer(l.blob.digest.short(), Status::AlreadyExists, 0, 0);
            } else {
                missing.push(i);
            }
        }
        let downloaded = !(missing.is_empty() && self.store.images.exists(&image_id));
        let job = Job {
            ep,
            domain: &reference.domain,
            repo,
            source_repo: &reference.path,
            clock,
        };
        let staging = self.fetch_and_apply(&job, &image, &config, &missing, staging)?;
        self.check_cancelled()?;
        let mut refs = vec![reference.with_digest(manifest_digest.clone())];
        if reference.tag.is_some() && reference.digest.is_none() {
            refs.push(reference.clone());
        }
        staging.commit(&[ImageCommit {
            config: &config_bytes,
            refs,
            content,
        }])?;
        self.progress.line(&format!("Digest: {manifest_digest}"));
        Ok(PullOutcome {
            image_id,
            manifest_digest: Some(manifest_digest),
            downloaded,
            timings: Timings::default(),
        })
    }

    /// Fetches a small blob (an image config) into memory, verified.
    fn fetch_small(&self, ep: &Endpoint, repo: &str, blob: &Blob) -> Result<Vec<u8>> {
        if blob.size > manifest::MAX_CONFIG_BYTES {
            return Err(Error::InvalidManifest("image config is larger than 8 MiB".into()));
        }
        let bytes = self.retrying(|| {
            let mut s = self.transport.open_blob(ep, repo, &blob.digest, 0)?;
            let mut buf = Vec::new();
            s.by_ref()
                .take(blob.size + 1)
                .read_to_end(&mut buf)
                .map_err(|e| PluginError::new(ErrorClass::Transient, format!("reading {}: {e}", blob.digest)))?;
            Ok(buf)
        })?;
        check_blob(blob, bytes.len() as u64, &Digest::of(&bytes))?;
        Ok(bytes)
    }

    fn fetch_and_apply<'s>(
        &'s self,
        job: &Job<'_>,
        image: &ImageManifest,
        config: &ImageConfig,
        missing: &[usize],
        mut staging: Staging<'s>,
    ) -> Result<Staging<'s>> {
        let (ep, repo, clock) = (job.ep, job.repo, job.clock);
        let chain_ids = Digest::chain_ids(&config.diff_ids);
        if missing.is_empty() {
            return Ok(staging);
        }
        for &i in missing {
            let b = &image.layers[i].blob;
            self.progress.layer(b.digest.short(), Status::Waiting, 0, b.size);
        }
        let results: Vec<Mutex<Option<Result<Arc<Spooled>>>>> = missing.iter().map(|_| Mutex::new(None)).collect();
        let lives: Vec<Live> = missing.iter().map(|_| Live::default()).collect();
        let ready = Condvar::new();
        let next = Mutex::new(0usize);
        let cancelled = std::sync::atomic::AtomicBool::new(false);
        let workers = self.options.max_concurrent_downloads.clamp(1, missing.len());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let k = {
                        let mut n = next.lock().unwrap();
                        if *n >= missing.len() || cancelled.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                        *n += 1;
                        *n - 1
                    };
                    let t = std::time::Instant::now();
                    let r = self.download(ep, repo, &image.layers[missing[k]].blob, Some(&lives[k]));
                    clock.lock().unwrap().download += t.elapsed();
                    lives[k].finish(&r);
                    *results[k].lock().unwrap() = Some(r);
                    ready.notify_all();
                });
            }
            let out = (|| -> Result<()> {
                for (k, &i) in missing.iter().enumerate() {
                    let finished = || -> Result<Arc<Spooled>> {
                        let mut g = results[k].lock().unwrap();
                        loop {
                            if let Some(r) = g.take() {
                                break r;
                            }
                            g = ready.wait(g).unwrap();
                        }
                    };
                    self.check_cancelled()?;
                    let blob = &image.layers[i].blob;
                    // Another pull may have committed it since this one planned.
                    if staging.reuse(&chain_ids[i])? {
                        self.progress.layer(blob.digest.short(), Status::AlreadyExists, 0, 0);
                        continue;
                    }
                    let parent = if i == 0 { None } else { Some(&chain_ids[i - 1]) };
                    let source = || Some((blob.digest.clone(), format!("{}/{}", job.domain, job.source_repo)));
                    self.progress
                        .layer(blob.digest.short(), Status::Extracting, 0, blob.size);
                    // Applied as it downloads; it ends only on a verified blob.
                    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let follow = Follow {
                        live: &lives[k],
                        file: None,
                        pos: 0,
                        generation: 0,
                        interrupted: interrupted.clone(),
                        waited: waited.clone(),
                    };
                    let applied = staging.apply(
                        parent,
                        Some(&config.diff_ids[i]),
                        Box::new(follow),
                        Some(blob.size),
                        blob.digest.as_str(),
                        source(),
                    );
                    match applied {
                        Ok(_) => {
                            if self.store.keep_content() {
                                let spooled = finished()?;
                                staging.keep_file(&blob.digest, spooled.path.clone(), Box::new(spooled));
                            }
                        }
                        Err(e)
                            if interrupted.load(std::sync::atomic::Ordering::Relaxed)
                                || (waited.load(std::sync::atomic::Ordering::Relaxed)
                                    && matches!(&e, Error::Plugin(p) if p.class == ErrorClass::TimedOut)) =>
                        {
                            // The download failed (its own error says why),
                            // started over, or kept the driver call waiting
                            // past its deadline: apply again from the file.
                            staging.discard_last();
                            let spooled = finished()?;
                            let file =
                                File::open(&spooled.path).map_err(|e| Error::io("opening a downloaded layer", e))?;
                            staging.apply(
                                parent,
                                Some(&config.diff_ids[i]),
                                Box::new(file),
                                Some(blob.size),
                                blob.digest.as_str(),
                                source(),
                            )?;
                            if self.store.keep_content() {
                                staging.keep_file(&blob.digest, spooled.path.clone(), Box::new(spooled));
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    self.progress
                        .layer(blob.digest.short(), Status::PullComplete, blob.size, blob.size);
                }
                Ok(())
            })();
            if out.is_err() {
                cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            out
        })?;
        let t = *staging.times.lock().unwrap();
        let mut c = clock.lock().unwrap();
        c.create += t.create;
        c.apply += t.apply;
        drop(c);
        Ok(staging)
    }

    /// Downloads one blob to a spooled file, shared with any other pull of
    /// this process that needs it at the same time.
    fn download(&self, ep: &Endpoint, repo: &str, blob: &Blob, live: Option<&Live>) -> Result<Arc<Spooled>> {
        let slot = {
            let mut m = self.downloads.blobs.lock().unwrap();
            match m.get(&blob.digest) {
                Some(Shared::Done(w)) => {
                    if let Some(spooled) = w.upgrade() {
                        self.progress
                            .layer(blob.digest.short(), Status::DownloadComplete, blob.size, blob.size);
                        return Ok(spooled);
                    }
                    None
                }
                Some(Shared::InFlight(w)) => w.upgrade(),
                None => None,
            }
            .map(|s| (s, false))
            .unwrap_or_else(|| {
                let s = Arc::new(Slot::default());
                m.insert(blob.digest.clone(), Shared::InFlight(Arc::downgrade(&s)));
                (s, true)
            })
        };
        let (slot, leader) = slot;
        if leader {
            let r = match self.stored_blob(blob) {
                Some(spooled) => Ok(Arc::new(spooled)),
                None => self.download_now(ep, repo, blob, live).map(Arc::new),
            };
            let shared = r.as_ref().map(Arc::clone).map_err(to_plugin_error);
            let mut m = self.downloads.blobs.lock().unwrap();
            match &r {
                Ok(spooled) => m.insert(blob.digest.clone(), Shared::Done(Arc::downgrade(spooled))),
                Err(_) => m.remove(&blob.digest),
            };
            drop(m);
            *slot.done.lock().unwrap() = Some(shared);
            slot.cv.notify_all();
            return r;
        }
        let mut g = slot.done.lock().unwrap();
        loop {
            if let Some(r) = g.as_ref() {
                self.progress
                    .layer(blob.digest.short(), Status::DownloadComplete, blob.size, blob.size);
                return r.clone().map_err(Error::Plugin);
            }
            g = slot.cv.wait(g).unwrap();
        }
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

    fn download_now(&self, ep: &Endpoint, repo: &str, blob: &Blob, live: Option<&Live>) -> Result<Spooled> {
        let short = blob.digest.short();
        let spooled = Spooled {
            path: self.spool_path(blob),
        };
        let mut file = File::create(&spooled.path).map_err(|e| Error::io("creating a download file", e))?;
        let report = |f: &dyn Fn(&mut LiveState)| {
            if let Some(l) = live {
                l.update(f);
            }
        };
        report(&|st| st.path = Some(spooled.path.clone()));
        let mut hasher = Sha256::new();
        let mut got: u64 = 0;
        let mut attempt = 0;
        let mut wait = self.options.backoff;
        // Sized to the blob: many small blobs do not each zero 256 KiB.
        let mut buf = vec![0u8; blob.size.saturating_add(1).clamp(4096, 256 << 10) as usize];
        loop {
            let failure: PluginError = match self.transport.open_blob(ep, repo, &blob.digest, got) {
                Ok(mut stream) => loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break PluginError::new(ErrorClass::Internal, "end"),
                        Ok(n) => {
                            got += n as u64;
                            if blob.size == UNKNOWN_SIZE && got > self.options.max_layer_bytes {
                                return Err(Error::Integrity(format!(
                                    "blob {}: larger than the layer limit of {} bytes",
                                    blob.digest, self.options.max_layer_bytes
                                )));
                            }
                            if got > blob.size {
                                return Err(Error::Integrity(format!(
                                    "blob {}: registry sent more than the {} bytes the manifest declares",
                                    blob.digest, blob.size
                                )));
                            }
                            hasher.update(&buf[..n]);
                            file.write_all(&buf[..n])
                                .map_err(|e| Error::io("writing a download", e))?;
                            report(&|st| st.written = got);
                            self.progress.layer(short, Status::Downloading, got, blob.size);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            break PluginError::new(ErrorClass::Transient, format!("reading blob {}: {e}", blob.digest))
                        }
                    }
                },
                Err(e) if e.class == ErrorClass::Unsupported && got > 0 => {
                    // The registry cannot resume: start over.
                    got = 0;
                    hasher = Sha256::new();
                    report(&|st| {
                        st.generation += 1;
                        st.written = 0;
                    });
                    file.set_len(0).map_err(|e| Error::io("truncating a download", e))?;
                    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))
                        .map_err(|e| Error::io("rewinding a download", e))?;
                    e
                }
                Err(e) => e,
            };
            if failure.class == ErrorClass::Internal && failure.message == "end" {
                break;
            }
            if !(failure.is_transient() || failure.class == ErrorClass::Unsupported) || attempt >= self.options.retries
            {
                return Err(Error::Plugin(failure));
            }
            attempt += 1;
            self.progress.layer(short, Status::Retrying, got, blob.size);
            std::thread::sleep(wait);
            wait *= 2;
        }
        self.progress.layer(short, Status::VerifyingChecksum, got, blob.size);
        check_blob(blob, got, &Digest::from_hasher(hasher))?;
        self.progress.layer(short, Status::DownloadComplete, got, blob.size);
        Ok(spooled)
    }
}

fn to_plugin_error(e: &Error) -> PluginError {
    PluginError::new(e.class(), e.to_string())
}

fn check_blob(blob: &Blob, size: u64, digest: &Digest) -> Result<()> {
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

/// The current time as RFC 3339 in UTC with nanoseconds, like Docker writes.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// Seconds since the epoch of an RFC 3339 time, if it parses.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 => {
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (r[1..3].parse::<i64>().ok()? * 3600 + r[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se - offset)
}

/// Formats a Unix time as RFC 3339 UTC.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
    }

    /// A download that fails with a digest mismatch removes its spool file
    /// and only then says it failed; a follower that reaches for the file
    /// in between reports the download's failure, not the missing file.
    #[test]
    fn a_follower_that_finds_the_file_gone_waits_for_the_download_s_word() {
        let dir = tempfile::tempdir().unwrap();
        let live = Live::default();
        live.update(|st| {
            st.path = Some(dir.path().join("gone"));
            st.written = 10;
        });
        let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut follow = Follow {
            live: &live,
            file: None,
            pos: 0,
            generation: 0,
            interrupted: interrupted.clone(),
            waited: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                live.finish(&Err(Error::Integrity("digest mismatch".into())));
            });
            let err = follow.read(&mut [0u8; 16]).unwrap_err();
            assert!(interrupted.load(std::sync::atomic::Ordering::Relaxed), "{err}");
        });
    }
}
