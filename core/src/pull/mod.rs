//! The pull pipeline: resolve → endpoint loop → download and verify →
//! apply → register.
//!
//! This module holds the pipeline itself; [`progress`] the statuses it (and
//! `load`) reports, `download` the spooled, verified, shared downloads,
//! `follow` the reader that applies a layer while its blob arrives, and
//! `distribution` what a reference resolves to without pulling it.
//!
//! Blobs download concurrently (a limit, default 3) into spooled files under
//! `<root>/tmp/blobs`, each checked against its manifest digest and size as
//! it streams, resuming with a range request when a connection drops. Layers
//! are applied in order as soon as their blob is complete: decompressed,
//! hashed to a diffID, and handed to the driver as a host-side stream. Only
//! when every layer verified are the layers, then the image, then its
//! references committed; on any failure the staged driver layers are removed
//! and the store is as it was.

mod distribution;
mod download;
mod follow;
pub mod progress;

pub use distribution::{Distribution, Offered};
pub use download::{DownloadPool, Spooled};
pub use progress::{Progress, Quiet, Status};

pub(crate) use download::{read_until_done, Done};

use crate::digest::Digest;
use crate::endpoint::{pull_endpoints, Registries};
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::manifest::{self, Blob, ImageConfig, ImageManifest, Parsed};
use crate::platform::Platform;
use crate::plugin::{CredentialLookup, Endpoint, GraphDriver, Resolved, Transport};
use crate::reference::Reference;
use crate::retry::{retry, Policy, Thread};
use crate::stage::{ImageCommit, Staging};
use crate::store::{ImageContent, Store};
use download::{check_blob, UNKNOWN_SIZE};
use follow::{Follow, Live};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How a pull behaves: limits, retries and back-off, cancellation.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to pick from a manifest list; `None` means the host's.
    pub platform: Option<Platform>,
    pub max_concurrent_downloads: usize,
    /// How many times a transient failure of one blob download is retried
    /// (resuming where it broke off), under [`crate::retry`]'s policy.
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
    served: Served,
}

/// A manifest's bytes as served, kept for the content store.
struct Served {
    digest: Digest,
    media_type: String,
    bytes: Vec<u8>,
}

/// The image manifest a pull settled on, as served, and the list it was
/// chosen from.
struct Chosen {
    image: ImageManifest,
    manifest: Served,
    index: Option<Served>,
}

/// Stages the manifests and config of `chosen` for the content store;
/// what the image's content record says.
fn keep_manifests(staging: &mut Staging<'_>, chosen: &Chosen, config_bytes: &[u8]) -> ImageContent {
    let image = &chosen.image;
    staging.keep_bytes(&chosen.manifest.digest, chosen.manifest.bytes.clone());
    if let Some(index) = &chosen.index {
        staging.keep_bytes(&index.digest, index.bytes.clone());
    }
    staging.keep_bytes(&image.config.digest, config_bytes.to_vec());
    ImageContent {
        manifest: chosen.manifest.digest.clone(),
        manifest_type: chosen.manifest.media_type.clone(),
        index: chosen.index.as_ref().map(|i| i.digest.clone()),
        index_type: chosen.index.as_ref().map(|i| i.media_type.clone()),
        blobs: std::iter::once(&image.config.digest)
            .chain(image.layers.iter().map(|l| &l.blob.digest))
            .cloned()
            .collect(),
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
    pub credentials: &'a CredentialLookup,
    pub downloads: &'a DownloadPool,
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
            ep.credentials = (self.credentials)(&credential_host(&ep, domain))?;
            let result = attempt(&ep);
            if ep.mirror {
                match &result {
                    // Failing, not answering: skipped for a while.
                    Err(Error::Plugin(e)) if e.is_transient() || e.class == ErrorClass::Unreachable => self
                        .store
                        .skip_mirror(&ep.configured_url(), now + self.options.mirror_backoff),
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
                    Error::keep_most_telling(&mut last, Error::Plugin(PluginError::new(e.class, message)));
                }
                // The plain-HTTP fallback's answer may say less than why
                // HTTPS failed; any other endpoint's answer is the answer.
                Err(e) if ep.url.starts_with("http://") => return Err(Error::most_telling(last, e)),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Config(format!("no endpoint for {domain}"))))
    }

    /// Fails when the pull was cancelled (see [`PullOptions::cancel`]).
    fn check_cancelled(&self) -> Result<()> {
        match &self.options.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::io(
                "pulling",
                std::io::Error::new(std::io::ErrorKind::Interrupted, "cancelled: the client went away"),
            )),
            _ => Ok(()),
        }
    }

    /// Pulls `reference`, trying each endpoint in turn.
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

    /// Runs a manifest or config request under the retry policy for
    /// requests (fewer retries than a blob download gets).
    fn request<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let policy = Policy::new(self.options.request_retries, self.options.backoff);
        retry(policy, &Thread, |_| {}, |_| f())
    }

    fn resolve(&self, ep: &Endpoint, repo: &str, reference: &str) -> Result<Fetched> {
        let resolved = self.request(|| Ok(self.transport.resolve(ep, repo, reference, manifest::ACCEPT)?))?;
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
            served: Served {
                digest,
                media_type,
                bytes,
            },
        })
    }

    /// Pulls `reference` from endpoint `ep`: manifest, config, the layers
    /// not yet here, then one commit.
    fn pull_from(&self, ep: &Endpoint, reference: &Reference, clock: &Mutex<Timings>) -> Result<PullOutcome> {
        // The name this endpoint knows the repository by (a mirror may serve
        // it under a prefix); progress and records use the reference's own.
        let repo = &ep.repository(&reference.path);
        let chosen = self.choose_manifest(ep, repo, reference)?;
        // For a pull by tag, Docker records the list's digest.
        let manifest_digest = match (&reference.digest, &chosen.index) {
            (Some(d), _) => d.clone(),
            (None, Some(index)) => index.digest.clone(),
            (None, None) => chosen.manifest.digest.clone(),
        };
        let image = &chosen.image;
        let config_bytes = self.fetch_small(ep, repo, &image.config)?;
        let config = ImageConfig::parse(&config_bytes)?;
        self.check_config(reference, image, &config)?;
        let layers = Layers {
            image,
            config: &config,
            chain_ids: Digest::chain_ids(&config.diff_ids),
        };
        let image_id = Digest::of(&config_bytes);
        let mut staging = Staging::new(self.store, self.driver, self.options.max_layer_bytes);
        let content = self
            .store
            .keep_content()
            .then(|| keep_manifests(&mut staging, &chosen, &config_bytes));
        let mut missing = Vec::new();
        for (i, l) in image.layers.iter().enumerate() {
            if staging.reuse(&layers.chain_ids[i])? {
                self.progress.layer(l.blob.digest.short(), Status::AlreadyExists, 0, 0);
            } else {
                missing.push(i);
            }
        }
        // The blobs about to be fetched, by the sizes the manifest declares
        // (and the fetch enforces): refused by a quota before a byte comes.
        let declared = missing
            .iter()
            .map(|&i| image.layers[i].blob.size)
            .filter(|&s| s != download::UNKNOWN_SIZE)
            .fold(config_bytes.len() as u64, u64::saturating_add)
            .saturating_add(chosen.manifest.bytes.len() as u64)
            .saturating_add(chosen.index.as_ref().map_or(0, |i| i.bytes.len() as u64));
        staging.charge(declared)?;
        let downloaded = !(missing.is_empty() && self.store.images.exists(&image_id));
        let job = Job {
            ep,
            domain: &reference.domain,
            repo,
            source_repo: &reference.path,
            clock,
        };
        let staging = self.fetch_and_apply(&job, &layers, &missing, staging)?;
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

    /// Resolves `reference` on `ep` to one image manifest, through a
    /// manifest list (by platform) if it names one.
    fn choose_manifest(&self, ep: &Endpoint, repo: &str, reference: &Reference) -> Result<Chosen> {
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
        // Said once the endpoint answered, so a fallback does not repeat it.
        self.progress
            .line(&format!("{}: Pulling from {}", tag_or_digest, reference.path));
        let entries = match first.parsed {
            Parsed::Image(image) => {
                return Ok(Chosen {
                    image,
                    manifest: first.served,
                    index: None,
                })
            }
            Parsed::List(entries) => entries,
        };
        let want_platform = self.options.platform.clone().unwrap_or_else(Platform::host);
        let entry = manifest::select(&entries, &want_platform)?;
        let second = self.resolve(ep, repo, entry.digest.as_str())?;
        match second.parsed {
            Parsed::Image(image) => Ok(Chosen {
                image,
                manifest: second.served,
                index: Some(first.served),
            }),
            Parsed::List(_) => Err(Error::InvalidManifest("a manifest list points at another list".into())),
        }
    }

    /// Refuses a config that does not fit its manifest, the depth limit or
    /// the platform asked for.
    fn check_config(&self, reference: &Reference, image: &ImageManifest, config: &ImageConfig) -> Result<()> {
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
        Ok(())
    }

    /// Fetches a small blob (an image config) into memory, verified.
    fn fetch_small(&self, ep: &Endpoint, repo: &str, blob: &Blob) -> Result<Vec<u8>> {
        if blob.size > manifest::MAX_CONFIG_BYTES {
            return Err(Error::InvalidManifest("image config is larger than 8 MiB".into()));
        }
        let bytes = self.request(|| {
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

    /// Downloads the `missing` layers, a few at a time, while applying them
    /// in order, each as its blob arrives. On any failure the downloads not
    /// yet started are dropped (those in flight finish: another pull may
    /// share them).
    fn fetch_and_apply<'s>(
        &'s self,
        job: &Job<'_>,
        layers: &Layers<'_>,
        missing: &[usize],
        mut staging: Staging<'s>,
    ) -> Result<Staging<'s>> {
        if missing.is_empty() {
            return Ok(staging);
        }
        for &i in missing {
            let b = &layers.image.layers[i].blob;
            self.progress.layer(b.digest.short(), Status::Waiting, 0, b.size);
        }
        let (senders, receivers): (Vec<_>, Vec<_>) = missing.iter().map(|_| sync_channel(1)).unzip();
        let batch = Batch {
            missing,
            lives: missing.iter().map(|_| Live::default()).collect(),
            results: senders,
            next: AtomicUsize::new(0),
            cancelled: AtomicBool::new(false),
        };
        let workers = self.options.max_concurrent_downloads.clamp(1, missing.len());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| self.download_worker(job, layers.image, &batch));
            }
            let applied = missing
                .iter()
                .enumerate()
                .try_for_each(|(k, &i)| self.apply_layer(job, layers, i, &batch.lives[k], &receivers[k], &mut staging));
            if applied.is_err() {
                batch.cancelled.store(true, Ordering::Relaxed);
            }
            applied
        })?;
        let t = *staging.times.lock().unwrap();
        let mut c = job.clock.lock().unwrap();
        c.create += t.create;
        c.apply += t.apply;
        drop(c);
        Ok(staging)
    }

    /// Takes the batch's next layer until none is left (or the pull
    /// failed), downloads it and sends its result to the applying thread.
    fn download_worker(&self, job: &Job<'_>, image: &ImageManifest, batch: &Batch<'_>) {
        while !batch.cancelled.load(Ordering::Relaxed) {
            let k = batch.next.fetch_add(1, Ordering::Relaxed);
            let Some(&i) = batch.missing.get(k) else { return };
            let t = std::time::Instant::now();
            let r = self.download(job.ep, job.repo, &image.layers[i].blob, Some(&batch.lives[k]));
            job.clock.lock().unwrap().download += t.elapsed();
            batch.lives[k].finish(&r);
            // Capacity one, one result: never blocks.
            let _ = batch.results[k].send(r);
        }
    }

    /// Applies layer `i` while it downloads (following `live`); again from
    /// the finished file when the download failed under it, started over,
    /// or kept the driver call waiting past its deadline. `finished` gives
    /// the download's result.
    fn apply_layer(
        &self,
        job: &Job<'_>,
        layers: &Layers<'_>,
        i: usize,
        live: &Live,
        finished: &Receiver<Result<Arc<Spooled>>>,
        staging: &mut Staging<'_>,
    ) -> Result<()> {
        self.check_cancelled()?;
        let blob = &layers.image.layers[i].blob;
        let short = blob.digest.short();
        // Another pull may have committed it since this one planned.
        if staging.reuse(&layers.chain_ids[i])? {
            self.progress.layer(short, Status::AlreadyExists, 0, 0);
            return Ok(());
        }
        let finished = || {
            finished.recv().unwrap_or_else(|_| {
                Err(Error::Plugin(PluginError::new(
                    ErrorClass::Internal,
                    "a download vanished",
                )))
            })
        };
        let apply = |staging: &mut Staging<'_>, diff: Box<dyn Read + Send + '_>| {
            let parent = i.checked_sub(1).map(|p| &layers.chain_ids[p]);
            let source = Some((blob.digest.clone(), format!("{}/{}", job.domain, job.source_repo)));
            let expect = Some(&layers.config.diff_ids[i]);
            staging.apply(parent, expect, diff, Some(blob.size), blob.digest.as_str(), source)
        };
        self.progress.layer(short, Status::Extracting, 0, blob.size);
        // Applied as it downloads; it ends only on a verified blob.
        let (follow, seen) = Follow::new(live);
        let spooled = match apply(staging, Box::new(follow)) {
            Ok(_) => None,
            Err(e)
                if seen.interrupted()
                    || (seen.waited() && matches!(&e, Error::Plugin(p) if p.class == ErrorClass::TimedOut)) =>
            {
                // The download failed (its own error says why), started
                // over, or kept the driver call waiting past its deadline:
                // apply again from the file.
                staging.discard_last();
                let spooled = finished()?;
                let file = spooled.open().map_err(|e| Error::io("opening a downloaded layer", e))?;
                apply(staging, Box::new(file))?;
                Some(spooled)
            }
            Err(e) => return Err(e),
        };
        if self.store.keep_content() {
            let spooled = match spooled {
                Some(s) => s,
                None => finished()?,
            };
            staging.keep_file(&blob.digest, spooled.path().to_path_buf(), Box::new(spooled));
        }
        self.progress.layer(short, Status::PullComplete, blob.size, blob.size);
        Ok(())
    }
}

/// The layers of the image being pulled: its manifest, its config, and
/// the chain IDs they add up to.
struct Layers<'l> {
    image: &'l ImageManifest,
    config: &'l ImageConfig,
    chain_ids: Vec<Digest>,
}

/// The downloads of one pull's missing layers: workers take the next one
/// in layer order and send each result on its own channel; the applying
/// thread receives them in the same order.
struct Batch<'b> {
    /// Indexes into the image's layers.
    missing: &'b [usize],
    lives: Vec<Live>,
    results: Vec<SyncSender<Result<Arc<Spooled>>>>,
    next: AtomicUsize,
    /// Set when applying failed: no further download is started.
    cancelled: AtomicBool,
}
