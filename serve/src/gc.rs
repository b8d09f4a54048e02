//! `gantry serve gc`: removes what no manifest worth keeping names, from
//! either storage, while the registry goes on taking pushes.
//!
//! Mark: every manifest a tag names (and, without `--delete-untagged`,
//! every manifest a repository holds; with it, still those written within
//! the grace period), what those name in turn (an index's manifests, an
//! image's config and layers), and the manifests whose `subject` is kept
//! (signatures, SBOMs). Sweep: every other blob, unless it was written or
//! claimed within the grace period.
//!
//! Pushes go on meanwhile, so a blob is removed only by this handshake
//! with [`crate::registry_storage::RegistryStorage::claim_blobs`], which a
//! manifest push runs before it stores the manifest:
//!
//! ```text
//! push:       claim B (marker time = now) → is B marked for removal? → is B held?
//! collector:  mark B for removal → was B claimed within the grace? → remove B → unmark
//! ```
//!
//! A push whose claim comes before the collector's second look is seen and
//! B stays; one whose claim comes after it finds B marked (or already
//! gone) and is refused — the client uploads B again. Either way no stored
//! manifest names a removed blob. Untagged manifests (`--delete-untagged`)
//! go by the same handshake: a push of the manifest itself, or of an index
//! naming it, claims it. The mark is cleared whatever happens, and a
//! collection first clears the marks one killed half-way left (one
//! collection runs at a time). Distribution's collector, by contrast,
//! wants the registry read-only while it runs.
//!
//! The grace period must outlast a manifest push and the clocks' skew
//! between replicas (claims carry the pushing replica's time).

use crate::fs_storage::FsStorage;
use crate::registry_storage::RegistryStorage;
use crate::s3_storage::{blob_key, gc_key, linked_key, S3Storage};
use crate::storage::StorageError;
use bytes::Bytes;
use gantry_core::digest::{Algorithm, Digest};
use gantry_core::manifest::MAX_MANIFEST_BYTES;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    pub delete_untagged: bool,
    /// What was written or claimed more recently than this is never removed.
    pub grace: Duration,
}

/// What a collection found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub manifests_kept: usize,
    pub manifests_removed: usize,
    pub blobs_kept: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    /// Unreachable blobs spared: written or claimed within the grace period.
    pub blobs_spared: usize,
}

/// A blob as listed.
pub struct ListedBlob {
    pub digest: Digest,
    pub size: u64,
    pub modified: SystemTime,
}

/// What the collector needs of a storage beyond the registry's own calls.
pub trait Collectable: RegistryStorage {
    /// The tags of `repo` and what each names.
    fn gc_tags(&self, repo: &str) -> impl Future<Output = Result<Vec<Digest>, StorageError>> + Send;
    /// The manifests `repo` holds, with when each was stored.
    fn gc_manifests(&self, repo: &str) -> impl Future<Output = Result<Vec<(Digest, SystemTime)>, StorageError>> + Send;
    /// A manifest's bytes.
    fn gc_manifest_bytes(&self, d: &Digest) -> impl Future<Output = Result<Option<Bytes>, StorageError>> + Send;
    fn gc_blobs(&self) -> impl Future<Output = Result<Vec<ListedBlob>, StorageError>> + Send;
    /// Every repository's link to a blob.
    fn gc_links(&self) -> impl Future<Output = Result<Vec<(String, Digest)>, StorageError>> + Send;
    /// When a push last claimed `d`.
    fn gc_claimed(&self, d: &Digest) -> impl Future<Output = Result<Option<SystemTime>, StorageError>> + Send;
    /// Marks `d` for removal (`true`), or clears the mark.
    fn gc_intent(&self, d: &Digest, on: bool) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn gc_remove_blob(&self, d: &Digest) -> impl Future<Output = Result<(), StorageError>> + Send;
    fn gc_remove_link(&self, repo: &str, d: &Digest) -> impl Future<Output = Result<(), StorageError>> + Send;
    /// Clears every mark a collection left (one killed half-way).
    fn gc_clear_intents(&self) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// A digest from a record's name (hex alone: its length says which algorithm).
fn digest_of_hex(hex: &str) -> Option<Digest> {
    let alg = match hex.len() {
        64 => "sha256",
        128 => "sha512",
        _ => return None,
    };
    Digest::parse_any(&format!("{alg}:{hex}")).ok()
}

/// What a manifest names: its manifests (an index's), its blobs (an
/// image's config and layers), and its subject.
type Named = (Vec<Digest>, Vec<Digest>, Option<Digest>);

fn named(bytes: &[u8]) -> Named {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return (Vec::new(), Vec::new(), None);
    };
    let digests = |key: &str| -> Vec<Digest> {
        doc.get(key)
            .and_then(|l| l.as_array())
            .map(|l| {
                l.iter()
                    .filter_map(|d| Digest::parse_any(d.get("digest")?.as_str()?).ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let manifests = digests("manifests");
    let mut blobs = digests("layers");
    if let Some(c) = doc
        .get("config")
        .and_then(|c| c.get("digest"))
        .and_then(|d| d.as_str())
        .and_then(|d| Digest::parse_any(d).ok())
    {
        blobs.push(c);
    }
    let subject = doc
        .get("subject")
        .and_then(|s| s.get("digest"))
        .and_then(|d| d.as_str())
        .and_then(|d| Digest::parse_any(d).ok());
    (manifests, blobs, subject)
}

fn within(t: SystemTime, grace: Duration, now: SystemTime) -> bool {
    now.duration_since(t).unwrap_or_default() < grace
}

/// Runs one collection over `storage`.
/// Removes `d` (a blob, or with `record` a manifest of that repository)
/// unless a push claimed it since the collector's first look: marks it,
/// looks again, removes, and always clears the mark, failure or not.
/// Whether it went.
async fn remove_unclaimed<S: Collectable>(
    storage: &S,
    d: &Digest,
    record: Option<&str>,
    grace: Duration,
) -> Result<bool, StorageError> {
    storage.gc_intent(d, true).await?;
    let result = async {
        let claimed = storage.gc_claimed(d).await?;
        if claimed.is_some_and(|t| within(t, grace, SystemTime::now())) {
            return Ok(false);
        }
        match record {
            // A tag pushed since the listing saves it.
            Some(repo) if storage.gc_tags(repo).await?.contains(d) => Ok(false),
            Some(repo) => storage.delete_manifest(repo, d).await.map(|_| true),
            None => storage.gc_remove_blob(d).await.map(|()| true),
        }
    }
    .await;
    let cleared = storage.gc_intent(d, false).await;
    let removed = result?;
    cleared?;
    Ok(removed)
}

pub async fn collect<S: Collectable>(storage: &S, options: &GcOptions) -> Result<GcReport, StorageError> {
    if !options.dry_run {
        storage.gc_clear_intents().await?;
    }
    let now = SystemTime::now();
    let mut report = GcReport::default();
    let mut keep_blobs: BTreeSet<Digest> = BTreeSet::new();
    let mut remove_records: Vec<(String, Digest)> = Vec::new();
    for repo in storage.catalog().await? {
        let tagged: BTreeSet<Digest> = storage.gc_tags(&repo).await?.into_iter().collect();
        let records = storage.gc_manifests(&repo).await?;
        let mut docs: BTreeMap<Digest, Named> = BTreeMap::new();
        for (d, _) in &records {
            if let Some(b) = storage.gc_manifest_bytes(d).await? {
                docs.insert(d.clone(), named(&b));
            }
        }
        let mut kept: BTreeSet<Digest> = BTreeSet::new();
        let mut queue: Vec<Digest> = records
            .iter()
            .filter(|(d, t)| !options.delete_untagged || tagged.contains(d) || within(*t, options.grace, now))
            .map(|(d, _)| d.clone())
            .collect();
        loop {
            while let Some(d) = queue.pop() {
                if !kept.insert(d.clone()) {
                    continue;
                }
                if let Some((manifests, blobs, _)) = docs.get(&d) {
                    queue.extend(manifests.iter().cloned());
                    keep_blobs.extend(blobs.iter().cloned());
                }
            }
            // A manifest about a kept one (a signature, an SBOM) is kept too.
            queue = docs
                .iter()
                .filter(|(d, (_, _, s))| !kept.contains(*d) && s.as_ref().is_some_and(|s| kept.contains(s)))
                .map(|(d, _)| d.clone())
                .collect();
            if queue.is_empty() {
                break;
            }
        }
        for (d, _) in &records {
            if kept.contains(d) {
                keep_blobs.insert(d.clone());
                report.manifests_kept += 1;
            } else {
                remove_records.push((repo.clone(), d.clone()));
            }
        }
    }
    for (repo, d) in &remove_records {
        if options.dry_run || remove_unclaimed(storage, d, Some(repo), options.grace).await? {
            report.manifests_removed += 1;
        } else {
            // Pushed again (or tagged) since: it and what it names stay.
            keep_blobs.insert(d.clone());
            if let Some(b) = storage.gc_manifest_bytes(d).await? {
                let (_, blobs, _) = named(&b);
                keep_blobs.extend(blobs);
            }
            report.manifests_kept += 1;
        }
    }
    let mut removed: BTreeSet<Digest> = BTreeSet::new();
    for b in storage.gc_blobs().await? {
        if keep_blobs.contains(&b.digest) {
            report.blobs_kept += 1;
            continue;
        }
        let claimed = storage.gc_claimed(&b.digest).await?;
        if within(b.modified, options.grace, now) || claimed.is_some_and(|t| within(t, options.grace, now)) {
            report.blobs_spared += 1;
            continue;
        }
        if !options.dry_run && !remove_unclaimed(storage, &b.digest, None, options.grace).await? {
            // The second look: a claim made since the first one wins.
            report.blobs_spared += 1;
            continue;
        }
        removed.insert(b.digest);
        report.blobs_removed += 1;
        report.bytes_removed += b.size;
    }
    if !options.dry_run {
        for (repo, d) in storage.gc_links().await? {
            // A blob pushed again since it went keeps its links.
            if removed.contains(&d) && !storage.contains_blob(&d).await? {
                storage.gc_remove_link(&repo, &d).await?;
            }
        }
    }
    Ok(report)
}

fn io(what: &str, e: std::io::Error) -> StorageError {
    StorageError::Backend(format!("{what}: {e}"))
}

fn read_dir_names(dir: &std::path::Path) -> Result<Vec<(String, std::fs::Metadata)>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if name.contains(".tmp-") {
            continue;
        }
        if let Ok(m) = e.metadata() {
            out.push((name, m));
        }
    }
    Ok(out)
}

impl Collectable for FsStorage {
    async fn gc_tags(&self, repo: &str) -> Result<Vec<Digest>, StorageError> {
        let mut out = Vec::new();
        for t in crate::storage::Storage::tags(self, repo)?.unwrap_or_default() {
            if let Some(e) = self.tag(repo, &t)? {
                out.push(e.digest);
            }
        }
        Ok(out)
    }

    async fn gc_manifests(&self, repo: &str) -> Result<Vec<(Digest, SystemTime)>, StorageError> {
        let dir = self.dir().join("repositories").join(repo).join("_manifests");
        Ok(read_dir_names(&dir)?
            .into_iter()
            .filter_map(|(n, m)| Some((digest_of_hex(&n)?, m.modified().unwrap_or(UNIX_EPOCH))))
            .collect())
    }

    async fn gc_manifest_bytes(&self, d: &Digest) -> Result<Option<Bytes>, StorageError> {
        use std::io::Read;
        let Ok(f) = std::fs::File::open(self.blob_path(d)) else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        f.take(MAX_MANIFEST_BYTES as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| io("reading a manifest", e))?;
        Ok(Some(Bytes::from(bytes)))
    }

    async fn gc_blobs(&self) -> Result<Vec<ListedBlob>, StorageError> {
        let mut out = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            for (name, m) in read_dir_names(&self.dir().join("blobs").join(alg.name()))? {
                if let Ok(digest) = Digest::parse_any(&format!("{}:{name}", alg.name())) {
                    out.push(ListedBlob {
                        digest,
                        size: m.len(),
                        modified: m.modified().unwrap_or(UNIX_EPOCH),
                    });
                }
            }
        }
        Ok(out)
    }

    async fn gc_links(&self) -> Result<Vec<(String, Digest)>, StorageError> {
        let mut out = Vec::new();
        for repo in crate::storage::Storage::catalog(self)? {
            for (n, _) in read_dir_names(&self.dir().join("repositories").join(&repo).join("_blobs"))? {
                if let Some(d) = digest_of_hex(&n) {
                    out.push((repo.clone(), d));
                }
            }
        }
        Ok(out)
    }

    async fn gc_claimed(&self, d: &Digest) -> Result<Option<SystemTime>, StorageError> {
        match std::fs::metadata(self.marker_path("linked", d)) {
            Ok(m) => Ok(m.modified().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading a claim", e)),
        }
    }

    async fn gc_intent(&self, d: &Digest, on: bool) -> Result<(), StorageError> {
        let p = self.marker_path("gc", d);
        if on {
            std::fs::write(&p, b"").map_err(|e| io("marking a blob for removal", e))
        } else {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("unmarking a blob", e)),
                _ => Ok(()),
            }
        }
    }

    async fn gc_remove_blob(&self, d: &Digest) -> Result<(), StorageError> {
        match std::fs::remove_file(self.blob_path(d)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing a blob", e)),
            _ => Ok(()),
        }
    }

    async fn gc_remove_link(&self, repo: &str, d: &Digest) -> Result<(), StorageError> {
        FsStorage::delete_blob(self, repo, d).map(|_| ())
    }

    async fn gc_clear_intents(&self) -> Result<(), StorageError> {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.dir().join("gc").join(alg.name());
            for (name, _) in read_dir_names(&dir)? {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        Ok(())
    }
}

impl Collectable for S3Storage {
    async fn gc_tags(&self, repo: &str) -> Result<Vec<Digest>, StorageError> {
        let mut out = Vec::new();
        for t in RegistryStorage::tags(self, repo).await?.unwrap_or_default() {
            if let Some(e) = self.tag(repo, &t).await? {
                out.push(e.digest);
            }
        }
        Ok(out)
    }

    async fn gc_manifests(&self, repo: &str) -> Result<Vec<(Digest, SystemTime)>, StorageError> {
        let prefix = format!("repositories/{repo}/_manifests/");
        Ok(self
            .client()
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|l| Some((digest_of_hex(l.key.strip_prefix(&prefix)?)?, l.modified)))
            .collect())
    }

    async fn gc_manifest_bytes(&self, d: &Digest) -> Result<Option<Bytes>, StorageError> {
        self.client().get(&blob_key(d), MAX_MANIFEST_BYTES).await
    }

    async fn gc_blobs(&self) -> Result<Vec<ListedBlob>, StorageError> {
        Ok(self
            .client()
            .list("blobs/")
            .await?
            .into_iter()
            .filter_map(|l| {
                let rest = l.key.strip_prefix("blobs/")?;
                let (alg, hex) = rest.split_once('/')?;
                Some(ListedBlob {
                    digest: Digest::parse_any(&format!("{alg}:{hex}")).ok()?,
                    size: l.size,
                    modified: l.modified,
                })
            })
            .collect())
    }

    async fn gc_links(&self) -> Result<Vec<(String, Digest)>, StorageError> {
        Ok(self
            .client()
            .list("repositories/")
            .await?
            .into_iter()
            .filter_map(|l| {
                let rest = l.key.strip_prefix("repositories/")?;
                let (repo, hex) = rest.rsplit_once("/_blobs/")?;
                Some((repo.to_string(), digest_of_hex(hex)?))
            })
            .collect())
    }

    async fn gc_claimed(&self, d: &Digest) -> Result<Option<SystemTime>, StorageError> {
        Ok(self
            .client()
            .get(&linked_key(d), 64)
            .await?
            .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse::<u64>().ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)))
    }

    async fn gc_intent(&self, d: &Digest, on: bool) -> Result<(), StorageError> {
        if on {
            self.client().put(&gc_key(d), Bytes::new()).await
        } else {
            self.client().delete(&gc_key(d)).await
        }
    }

    async fn gc_remove_blob(&self, d: &Digest) -> Result<(), StorageError> {
        self.client().delete(&blob_key(d)).await
    }

    async fn gc_remove_link(&self, repo: &str, d: &Digest) -> Result<(), StorageError> {
        RegistryStorage::delete_blob(self, repo, d).await.map(|_| ())
    }

    async fn gc_clear_intents(&self) -> Result<(), StorageError> {
        for l in self.client().list("_gc/").await? {
            self.client().delete(&l.key).await?;
        }
        Ok(())
    }
}

/// Runs one collection over a registry's storage, on a runtime of its own.
pub fn run(registry: &crate::registry_storage::Registry, options: &GcOptions) -> Result<GcReport, StorageError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| StorageError::Backend(format!("starting the collector: {e}")))?;
    rt.block_on(async {
        match registry {
            crate::registry_storage::Registry::Fs(s) => collect(&**s, options).await,
            crate::registry_storage::Registry::S3(s) => collect(&**s, options).await,
        }
    })
}
