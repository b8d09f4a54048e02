//! `serve --from-store`: a gantry store's content store, served.
//!
//! Repositories are the paths of the store's references (`127.0.0.1:5000/
//! team/app:v1` is served as `team/app:v1`; when two registries held the
//! same path, the one whose name sorts last wins a tag). A tag answers with
//! the manifest (or manifest list) it was pulled by. An image the store
//! holds without its registry content (loaded from an archive, imported,
//! or pulled with `keep_content = false`: the air-gapped way in) answers
//! with the manifest `save` writes for it — its config, and its layers
//! uncompressed, each rebuilt byte for byte from its tar-split record and
//! its directory (digest = diffID) as it is sent — so the digests are the
//! same on every request, after every restart, and in `save`'s archives.
//!
//! The index of what is served is rebuilt when the store's references
//! change (their file's identity and time are checked on each request), so
//! a pull into the store shows up without a restart. Manifests are held in
//! memory; blobs are mapped from their files when asked for.

use crate::storage::{BlobBody, Manifest, ManifestRef, Storage, StorageError};
use bytes::Bytes;
use gantry_core::digest::Digest;
use gantry_core::manifest::MAX_MANIFEST_BYTES;
use gantry_core::store::{ImageContent, Store};
use http_body_util::BodyExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, RwLock};

#[derive(Default)]
struct Repo {
    tags: BTreeMap<String, Digest>,
    manifests: HashMap<Digest, Manifest>,
    blobs: HashSet<Digest>,
    /// v1: tag → top image id, and every image id.
    v1_tags: BTreeMap<String, String>,
    v1_ids: std::collections::BTreeSet<String>,
}

#[derive(Default)]
struct Index {
    repos: BTreeMap<String, Repo>,
    /// v1 images by id, of every repository.
    v1: HashMap<String, crate::v1::V1Image>,
    /// The blobs of images served as `save` writes them: made, not stored.
    rebuilt: HashMap<Digest, RebuiltBlob>,
}

/// A blob of an image without its registry content.
#[derive(Clone)]
enum RebuiltBlob {
    Config(Bytes),
    /// A layer and its tar's length.
    Layer(gantry_core::store::LayerMeta, u64),
}

/// The v1 images of the image `c` names, if its manifest and config are held.
fn v1_images(store: &Store, repo: &Repo, c: &ImageContent) -> Result<Vec<crate::v1::V1Image>, StorageError> {
    let Some(m) = repo.manifests.get(&c.manifest) else {
        return Ok(Vec::new());
    };
    let Ok(gantry_core::manifest::Parsed::Image(image)) = gantry_core::manifest::parse(&m.media_type, &m.bytes) else {
        return Ok(Vec::new());
    };
    let Some(config) = store
        .content
        .read_small(&image.config.digest, gantry_core::manifest::MAX_CONFIG_BYTES)?
    else {
        return Ok(Vec::new());
    };
    let layers: Vec<(Digest, u64)> = image
        .layers
        .iter()
        .map(|l| (l.blob.digest.clone(), l.blob.size))
        .collect();
    Ok(crate::v1::images_of(&layers, &image.config.digest, &config))
}

/// What a rebuild depends on: the references file and the content records.
type Stamp = Vec<(u64, u64, i64, i64)>;

pub struct StoreStorage {
    store: Arc<Store>,
    /// The graph driver layers are rebuilt through, for images without
    /// their registry content; without one those are not served.
    driver: Option<&'static dyn gantry_core::plugin::GraphDriver>,
    index: RwLock<(Stamp, Arc<Index>)>,
    /// Rebuilds one at a time.
    rebuild: std::sync::Mutex<()>,
}

impl StoreStorage {
    pub fn new(
        store: Arc<Store>,
        driver: Option<&'static dyn gantry_core::plugin::GraphDriver>,
    ) -> Result<StoreStorage, StorageError> {
        let s = StoreStorage {
            store,
            driver,
            index: RwLock::new((Vec::new(), Arc::new(Index::default()))),
            rebuild: std::sync::Mutex::new(()),
        };
        s.current()?;
        Ok(s)
    }

    fn stamp(&self) -> Stamp {
        let image_dir = self.store.image_dir();
        [image_dir.join("repositories.json"), image_dir.join("contentdb/sha256")]
            .iter()
            .map(|p| match std::fs::metadata(p) {
                Ok(m) => (m.dev(), m.ino(), m.mtime(), m.mtime_nsec()),
                Err(_) => (0, 0, 0, 0),
            })
            .collect()
    }

    /// The index, rebuilt first if the store changed since.
    fn current(&self) -> Result<Arc<Index>, StorageError> {
        let stamp = self.stamp();
        {
            let g = self.index.read().unwrap();
            if g.0 == stamp && !stamp.is_empty() {
                return Ok(g.1.clone());
            }
        }
        let _one = self.rebuild.lock().unwrap();
        let stamp = self.stamp();
        if let Some(i) = {
            let g = self.index.read().unwrap();
            (g.0 == stamp).then(|| g.1.clone())
        } {
            return Ok(i);
        }
        let index = Arc::new(build(&self.store, self.driver.is_some())?);
        *self.index.write().unwrap() = (stamp, index.clone());
        Ok(index)
    }
}

fn read_manifest(store: &Store, digest: &Digest, media_type: &str) -> Result<Option<Manifest>, StorageError> {
    Ok(store
        .content
        .read_small(digest, MAX_MANIFEST_BYTES as u64)?
        .filter(|b| Digest::of(b) == *digest)
        .map(|b| Manifest {
            media_type: media_type.to_string(),
            digest: digest.clone(),
            bytes: Bytes::from(b),
        }))
}

/// Adds what `c` names to `repo`; returns the digest a tag should answer
/// with (the list it came from, else the manifest), if its manifests are held.
fn add(store: &Store, repo: &mut Repo, c: &ImageContent) -> Result<Option<Digest>, StorageError> {
    if !hold(store, repo, &c.manifest, &c.manifest_type)? {
        return Ok(None);
    }
    let mut top = c.manifest.clone();
    if let (Some(d), Some(t)) = (&c.index, &c.index_type) {
        if hold(store, repo, d, t)? {
            top = d.clone();
        }
    }
    repo.blobs.extend(c.blobs.iter().cloned());
    Ok(Some(top))
}

/// Puts manifest `d` in `repo` unless it is there (read once per rebuild,
/// though a tag and a digest reference both name it); whether it is held.
fn hold(store: &Store, repo: &mut Repo, d: &Digest, media_type: &str) -> Result<bool, StorageError> {
    if repo.manifests.contains_key(d) {
        return Ok(true);
    }
    Ok(match read_manifest(store, d, media_type)? {
        Some(m) => {
            repo.manifests.insert(d.clone(), m);
            true
        }
        None => false,
    })
}

/// Serves image `id` under `tag` of `repo` as `save` writes it.
fn add_rebuilt(
    store: &Store,
    repo: &mut Repo,
    rebuilt: &mut HashMap<Digest, RebuiltBlob>,
    tag: &str,
    id: &Digest,
) -> Result<(), StorageError> {
    let r = gantry_core::save::rebuilt(store, id)?;
    let digest = Digest::of(&r.manifest);
    repo.manifests.insert(
        digest.clone(),
        Manifest {
            media_type: gantry_core::manifest::OCI_MANIFEST.to_string(),
            digest: digest.clone(),
            bytes: Bytes::from(r.manifest),
        },
    );
    repo.tags.insert(tag.to_string(), digest);
    repo.blobs.insert(id.clone());
    rebuilt.insert(id.clone(), RebuiltBlob::Config(Bytes::from(r.config)));
    for (l, len) in r.layers {
        repo.blobs.insert(l.diff_id.clone());
        rebuilt.insert(l.diff_id.clone(), RebuiltBlob::Layer(l, len));
    }
    Ok(())
}

fn build(store: &Store, rebuild: bool) -> Result<Index, StorageError> {
    let mut index = Index::default();
    let mut refs = store.refs.all()?;
    // Digest references first, so a tag can prefer the manifest its own
    // repository was pulled by; then by registry name, last wins a tag.
    refs.sort_by(|(a, _), (b, _)| (a.tag.is_some(), &a.domain).cmp(&(b.tag.is_some(), &b.domain)));
    for (r, id) in refs {
        let records = store.content.image(&id)?;
        let Index { repos, v1, rebuilt } = &mut index;
        if records.is_empty() {
            if let (true, Some(tag), None) = (rebuild, &r.tag, &r.digest) {
                let repo = repos.entry(r.path.clone()).or_default();
                add_rebuilt(store, repo, rebuilt, tag, &id)?;
            }
            continue;
        }
        let repo = repos.entry(r.path.clone()).or_default();
        match (&r.tag, &r.digest) {
            (_, Some(d)) => {
                for c in records
                    .iter()
                    .filter(|c| &c.manifest == d || c.index.as_ref() == Some(d))
                {
                    add(store, repo, c)?;
                }
            }
            (Some(tag), None) => {
                let mine = records
                    .iter()
                    .position(|c| {
                        repo.manifests.contains_key(&c.manifest)
                            || c.index.as_ref().is_some_and(|i| repo.manifests.contains_key(i))
                    })
                    .unwrap_or(0);
                if let Some(top) = add(store, repo, &records[mine])? {
                    repo.tags.insert(tag.clone(), top);
                    let chain = v1_images(store, repo, &records[mine])?;
                    if let Some(t) = chain.last() {
                        repo.v1_tags.insert(tag.clone(), t.id.clone());
                    }
                    for img in chain {
                        repo.v1_ids.insert(img.id.clone());
                        v1.insert(img.id.clone(), img);
                    }
                } else if rebuild {
                    // Its registry manifest is not held (an archive's
                    // record without it): as `save` writes it.
                    add_rebuilt(store, repo, rebuilt, tag, &id)?;
                }
            }
            (None, None) => {}
        }
    }
    index.repos.retain(|_, r| !r.manifests.is_empty());
    Ok(index)
}

impl Storage for StoreStorage {
    fn catalog(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.current()?.repos.keys().cloned().collect())
    }

    fn tags(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        Ok(self
            .current()?
            .repos
            .get(repo)
            .map(|r| r.tags.keys().cloned().collect()))
    }

    fn has_repository(&self, repo: &str) -> Result<bool, StorageError> {
        Ok(self.current()?.repos.contains_key(repo))
    }

    fn manifest(&self, repo: &str, reference: &ManifestRef) -> Result<Option<Manifest>, StorageError> {
        let index = self.current()?;
        let Some(r) = index.repos.get(repo) else {
            return Ok(None);
        };
        let digest = match reference {
            ManifestRef::Tag(t) => match r.tags.get(t) {
                Some(d) => d,
                None => return Ok(None),
            },
            ManifestRef::Digest(d) => d,
        };
        Ok(r.manifests.get(digest).cloned())
    }

    fn blob_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let index = self.current()?;
        let linked = index
            .repos
            .get(repo)
            .is_some_and(|r| r.blobs.contains(digest) || r.manifests.contains_key(digest));
        if !linked {
            return Ok(None);
        }
        match std::fs::metadata(self.store.content.path(digest)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(match index.rebuilt.get(digest) {
                Some(RebuiltBlob::Config(b)) => Some(b.len() as u64),
                Some(RebuiltBlob::Layer(_, len)) => Some(*len),
                None => None,
            }),
            Err(e) => Err(StorageError::Backend(format!("reading blob {digest}: {e}"))),
        }
    }

    fn v1_tags(&self, repo: &str) -> Result<Option<BTreeMap<String, String>>, StorageError> {
        Ok(self.current()?.repos.get(repo).map(|r| r.v1_tags.clone()))
    }

    fn v1_images(&self, repo: &str) -> Result<Option<Vec<String>>, StorageError> {
        Ok(self
            .current()?
            .repos
            .get(repo)
            .map(|r| r.v1_ids.iter().cloned().collect()))
    }

    fn v1_image(&self, id: &str) -> Result<Option<crate::v1::V1Image>, StorageError> {
        Ok(self.current()?.v1.get(id).cloned())
    }

    fn v1_layer(&self, id: &str, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        let Some(img) = self.current()?.v1.get(id).cloned() else {
            return Ok(None);
        };
        self.mapped(&img.blob, range)
    }

    fn blob(&self, repo: &str, digest: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        if self.blob_size(repo, digest)?.is_none() {
            return Ok(None);
        }
        if let Some(b) = self.mapped(digest, range.clone())? {
            return Ok(Some(b));
        }
        let rebuilt = self.current()?.rebuilt.get(digest).cloned();
        match (rebuilt, self.driver) {
            (Some(RebuiltBlob::Config(b)), _) => {
                let end = (range.end as usize).min(b.len());
                let start = (range.start as usize).min(end);
                Ok(Some(
                    http_body_util::Full::new(b.slice(start..end))
                        .map_err(|never| match never {})
                        .boxed(),
                ))
            }
            (Some(RebuiltBlob::Layer(l, _)), Some(driver)) => {
                Ok(Some(rebuild_stream(self.store.clone(), driver, l, range)))
            }
            _ => Ok(None),
        }
    }
}

impl StoreStorage {
    /// Bytes `range` of content-store blob `digest`, mapped.
    fn mapped(&self, digest: &Digest, range: Range<u64>) -> Result<Option<BlobBody>, StorageError> {
        let Some(file) = self.store.content.open_blob(digest)? else {
            return Ok(None);
        };
        mapped_range(&file, range)
            .map(Some)
            .map_err(|e| StorageError::Backend(format!("reading blob {digest}: {e}")))
    }
}

/// Bytes `range` of a file, mapped, as a body (a range past the end is cut).
pub(crate) fn mapped_range(file: &std::fs::File, range: Range<u64>) -> std::io::Result<BlobBody> {
    let bytes = map(file)?;
    let end = (range.end as usize).min(bytes.len());
    let start = (range.start as usize).min(end);
    Ok(http_body_util::Full::new(bytes.slice(start..end))
        .map_err(|never| match never {})
        .boxed())
}

/// The file's bytes, mapped: the server writes them to the socket straight
/// from the page cache. Content-store files are written once, renamed into
/// place and never changed, so the mapping stays what was verified.
fn map(file: &std::fs::File) -> std::io::Result<Bytes> {
    if file.metadata()?.len() == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the file is a content-store blob, immutable once renamed into
    // place; removal (garbage collection) keeps the mapped inode alive.
    let map = unsafe { memmap2::Mmap::map(file)? };
    Ok(Bytes::from_owner(map))
}

/// Layer `l`'s tar, bytes `range`, rebuilt on a thread of its own as the
/// client reads (a bounded channel between them). `rebuild_layer` checks
/// the whole stream against the diffID as it goes: a layer whose files
/// changed ends the body with an error, so the client's own digest check
/// never passes on wrong bytes.
fn rebuild_stream(
    store: Arc<Store>,
    driver: &'static dyn gantry_core::plugin::GraphDriver,
    l: gantry_core::store::LayerMeta,
    range: Range<u64>,
) -> BlobBody {
    let (tx, body) = gantry_http::body::ChannelBody::channel(8);
    std::thread::spawn(move || {
        let mut at = 0u64;
        let result = gantry_core::save::rebuild_layer(&store, driver, &l, &mut |r| {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 || at >= range.end {
                    return Ok(());
                }
                let (start, end) = (at, at + n as u64);
                at = end;
                let (from, to) = (range.start.max(start), range.end.min(end));
                if from < to {
                    let chunk = Bytes::copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"));
                    }
                }
            }
        });
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    body.boxed()
}
