//! Loading image archives: Docker's `docker save` format (`manifest.json`,
//! or the legacy `repositories` with per-image `json` and `layer.tar`), and
//! OCI image layouts (`oci-layout`, `index.json`, `blobs/`).
//!
//! Like Docker's `tarexporter.Load`, but the archive is never unpacked to a
//! temporary directory: layers are read in place from the indexed archive.
//! Every name taken from the archive is cleaned (no `..`, nothing absolute),
//! the number of layers must equal the config's diffIDs, every diffID (and,
//! for OCI, every blob digest and size) is verified, and nothing is
//! registered unless every image of the archive verified.

use crate::archive::{clean, ArchiveIndex};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{self, ImageConfig, Parsed};
use crate::platform::Platform;
use crate::plugin::GraphDriver;
use crate::pull::{Progress, Status};
use crate::reference::Reference;
use crate::stage::{ImageCommit, Staging};
use crate::store::Store;
use crate::verify::HashingReader;
use serde::Deserialize;
use std::collections::HashMap;
use std::io::Read;

const MAX_JSON: u64 = 8 << 20;
/// The most images one archive may describe (manifest.json entries, index
/// descriptors, legacy tags).
pub const MAX_ARCHIVE_IMAGES: usize = 1024;
/// How deep indexes may nest inside an OCI layout.
const MAX_INDEX_NESTING: usize = 4;

fn too_many_images(what: &str, n: usize) -> Error {
    invalid(format!(
        "{what} describes {n} images, more than the limit of {MAX_ARCHIVE_IMAGES}"
    ))
}

/// One image found in an archive.
struct Candidate {
    /// The config, or for legacy archives the v1 JSONs to build one from.
    config: ConfigSource,
    layers: Vec<LayerSource>,
    tags: Vec<Reference>,
}

enum ConfigSource {
    Bytes(Vec<u8>),
    /// Legacy: the image's v1 JSONs, base first.
    Legacy(Vec<serde_json::Value>),
}

struct LayerSource {
    name: String,
    /// For OCI blobs: the digest and size the descriptor promised.
    blob: Option<(Digest, u64)>,
}

/// While a stream arrives: the images it holds, and for each the next layer
/// it needs and the chain below it.
struct StreamPlan {
    images: Vec<Candidate>,
    next: Vec<usize>,
    parents: Vec<Option<Digest>>,
}

/// What a load made visible.
pub struct Loaded {
    pub id: Digest,
    pub tags: Vec<Reference>,
}

/// A finished load: its images and where the time went.
pub struct LoadOutcome {
    pub images: Vec<Loaded>,
    pub times: crate::stage::StageTimes,
    /// Bytes of a streamed archive that arrived out of order and were spooled.
    pub spooled: u64,
}

pub struct Loader<'a> {
    pub store: &'a Store,
    pub driver: &'a dyn GraphDriver,
    pub progress: &'a dyn Progress,
    pub max_layer_bytes: u64,
    /// The most layers one image may have.
    pub max_depth: usize,
    /// The platform picked from an OCI index with several.
    pub platform: Platform,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
    #[serde(default)]
    layer_sources: Option<HashMap<String, serde_json::Value>>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidManifest(msg)
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("{what} is not valid: {e}")))
}

impl Loader<'_> {
    /// Loads an indexed archive (a file, read in place).
    pub fn load(&self, ar: &ArchiveIndex) -> Result<LoadOutcome> {
        let mut staging = Staging::new(self.store, self.driver, self.max_layer_bytes);
        self.finish(ar, &mut staging)
            .and_then(|(candidates, configs)| Self::commit(staging, candidates, configs))
    }

    /// Loads an archive from a stream. A layer that arrives when its image
    /// and every layer below it are already known is applied as it streams;
    /// only what comes out of order (Docker and skopeo write manifest.json
    /// last) is spooled into `spool`.
    pub fn load_stream(&self, r: impl Read, spool: &std::path::Path) -> Result<LoadOutcome> {
        let mut staging = Staging::new(self.store, self.driver, self.max_layer_bytes);
        let mut plan: Option<StreamPlan> = None;
        // The spool is charged with the staging's own charges (the hook
        // below holds the staging): entries spooled now are unpacked, and
        // charged again, later.
        let spool_charges = staging.charges();
        let charge_spool = |n: u64| match &spool_charges {
            Some(c) => Ok(c.charge(n)?),
            None => Ok(()),
        };
        let ar = ArchiveIndex::from_stream_with(
            r,
            spool,
            &mut |name, partial, data| {
                if plan.is_none() {
                    // Only once the documents naming the images have arrived.
                    let known = partial.contains("manifest.json")
                        || (partial.contains("index.json") && partial.contains("oci-layout"));
                    if let Some(c) = known.then(|| self.candidates(partial, true).ok()).flatten() {
                        let n = c.len();
                        plan = Some(StreamPlan {
                            images: c,
                            next: vec![0; n],
                            parents: vec![None; n],
                        });
                    }
                }
                let Some(StreamPlan {
                    images: cands,
                    next,
                    parents,
                }) = plan.as_mut()
                else {
                    return Ok(false);
                };
                let Some(ci) = (0..cands.len()).find(|&i| cands[i].layers.get(next[i]).is_some_and(|l| l.name == name))
                else {
                    return Ok(false);
                };
                let c = &cands[ci];
                let k = next[ci];
                let ConfigSource::Bytes(config) = &c.config else {
                    return Ok(false);
                };
                let diff_ids = ImageConfig::parse(config)?.diff_ids;
                let Some(want) = diff_ids.get(k) else {
                    return Ok(false);
                };
                let parent = parents[ci].clone();
                let chain = Digest::chain(parent.as_ref(), want);
                if !staging.reuse(&chain)? {
                    self.apply_streamed(&mut staging, data, &c.layers[k], parent.as_ref(), want)?;
                }
                // Every image waiting for this same layer moves on.
                for i in 0..cands.len() {
                    if cands[i].layers.get(next[i]).is_some_and(|l| l.name == name) && parents[i] == parent {
                        next[i] += 1;
                        parents[i] = Some(chain.clone());
                    }
                }
                Ok(true)
            },
            &charge_spool,
        )?;
        let spooled = ar.spooled();
        let result = self.finish(&ar, &mut staging);
        drop(ar);
        let mut outcome = result.and_then(|(candidates, configs)| Self::commit(staging, candidates, configs))?;
        outcome.spooled = spooled;
        Ok(outcome)
    }

    /// Applies a layer from a stream that cannot leave this thread: the
    /// bytes go through a pipe to a thread that applies them.
    fn apply_streamed(
        &self,
        staging: &mut Staging<'_>,
        data: &mut dyn Read,
        l: &LayerSource,
        parent: Option<&Digest>,
        want: &Digest,
    ) -> Result<()> {
        let (rx, mut tx) = std::io::pipe().map_err(|e| Error::io("starting a layer pipe", e))?;
        std::thread::scope(|s| {
            let applier = s.spawn(move || self.apply_one(staging, Box::new(rx), None, l, parent, Some(want)));
            let mut buf = vec![0u8; 1 << 20];
            let copied = (|| -> std::io::Result<()> {
                loop {
                    let n = data.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    std::io::Write::write_all(&mut tx, &buf[..n])?;
                }
            })();
            drop(tx);
            let applied = applier.join().expect("layer applier panicked");
            // The applier's error explains a broken pipe; a read error stands alone.
            applied?;
            copied.map_err(|e| invalid(format!("corrupt archive at {:?}: {e}", l.name)))
        })
    }

    /// Finds the images of an archive (`planning`: of a stream still arriving).
    fn candidates(&self, ar: &ArchiveIndex, planning: bool) -> Result<Vec<Candidate>> {
        if ar.contains("manifest.json") {
            self.docker(ar, planning)
        } else if ar.contains("index.json") && ar.contains("oci-layout") {
            self.oci(ar)
        } else if ar.contains("repositories") {
            self.legacy(ar)
        } else {
            Err(invalid(
                "not an image archive: it has no manifest.json, no OCI index.json and no repositories file".into(),
            ))
        }
    }

    /// Stages every image of the archive; returns them with their configs.
    fn finish(&self, ar: &ArchiveIndex, staging: &mut Staging<'_>) -> Result<(Vec<Candidate>, Vec<Vec<u8>>)> {
        let candidates = self.candidates(ar, false)?;
        if candidates.is_empty() {
            return Err(invalid("the archive holds no image".into()));
        }
        let mut configs = Vec::new();
        for c in &candidates {
            configs.push(self.stage(ar, c, staging)?);
        }
        Ok((candidates, configs))
    }

    fn commit(staging: Staging<'_>, candidates: Vec<Candidate>, configs: Vec<Vec<u8>>) -> Result<LoadOutcome> {
        let commits: Vec<ImageCommit<'_>> = candidates
            .iter()
            .zip(&configs)
            .map(|(c, cfg)| ImageCommit {
                config: cfg,
                refs: c.tags.clone(),
                content: None,
            })
            .collect();
        let times = *staging.times.lock().unwrap();
        let ids = staging.commit(&commits)?;
        Ok(LoadOutcome {
            images: ids
                .into_iter()
                .zip(candidates)
                .map(|(id, c)| Loaded { id, tags: c.tags })
                .collect(),
            times,
            spooled: 0,
        })
    }

    /// Applies one layer blob, checking the declared blob size and digest
    /// (OCI) and the diffID. Returns the diffID.
    fn apply_one<'b>(
        &'b self,
        staging: &mut Staging<'_>,
        blob: Box<dyn Read + Send + 'b>,
        size: Option<u64>,
        l: &LayerSource,
        parent: Option<&Digest>,
        want: Option<&Digest>,
    ) -> Result<Digest> {
        let total = size.or(l.blob.as_ref().map(|b| b.1)).unwrap_or(0);
        let id = short(&l.name).to_string();
        let counted = Counting {
            inner: blob,
            done: 0,
            total,
            id: id.clone(),
            progress: self.progress,
        };
        let (hashed, blob_hash) = HashingReader::new(counted);
        let (diff_id, _) = staging.apply(parent, want, Box::new(hashed), None, &l.name, None)?;
        let (got, read) = blob_hash.finish();
        if let Some((digest, declared)) = &l.blob {
            if read != *declared {
                return Err(Error::Integrity(format!(
                    "blob {}: the descriptor says {declared} bytes, the archive holds {read}",
                    l.name
                )));
            }
            if &got != digest {
                return Err(Error::Integrity(format!(
                    "blob {digest}: digest mismatch: the content is {got}"
                )));
            }
        }
        self.progress.layer(&id, Status::LoadingLayer, read, read);
        Ok(diff_id)
    }

    /// Verifies and applies one image's layers; returns its config bytes.
    fn stage(&self, ar: &ArchiveIndex, c: &Candidate, staging: &mut Staging<'_>) -> Result<Vec<u8>> {
        let expected: Option<Vec<Digest>> = match &c.config {
            ConfigSource::Bytes(b) => Some(ImageConfig::parse(b)?.diff_ids),
            ConfigSource::Legacy(_) => None,
        };
        if c.layers.len() > self.max_depth {
            return Err(crate::stage::too_deep(c.layers.len(), self.max_depth));
        }
        if let Some(d) = &expected {
            if d.len() != c.layers.len() {
                return Err(invalid(format!(
                    "the image config lists {} layers but the archive has {}",
                    d.len(),
                    c.layers.len()
                )));
            }
        }
        let mut diff_ids = Vec::new();
        let mut parent: Option<Digest> = None;
        for (i, l) in c.layers.iter().enumerate() {
            let want = expected.as_ref().map(|d| d[i].clone());
            if let Some(w) = &want {
                let chain = Digest::chain(parent.as_ref(), w);
                if staging.reuse(&chain)? {
                    self.progress.layer(short(&l.name), Status::AlreadyExists, 0, 0);
                    diff_ids.push(w.clone());
                    parent = Some(chain);
                    continue;
                }
            }
            let size = ar.size(&l.name)?;
            if let Some((_, declared)) = &l.blob {
                if *declared != size {
                    return Err(Error::Integrity(format!(
                        "blob {}: the descriptor says {declared} bytes, the archive holds {size}",
                        l.name
                    )));
                }
            }
            let diff_id = self.apply_one(
                staging,
                ar.open(&l.name)?,
                Some(size),
                l,
                parent.as_ref(),
                want.as_ref(),
            )?;
            parent = Some(Digest::chain(parent.as_ref(), &diff_id));
            diff_ids.push(diff_id);
        }
        match &c.config {
            ConfigSource::Bytes(b) => Ok(b.clone()),
            ConfigSource::Legacy(chain) => Ok(legacy_config(chain, &diff_ids)),
        }
    }

    fn tags(&self, names: &[String]) -> Result<Vec<Reference>> {
        names
            .iter()
            .map(|t| {
                let r = Reference::parse(t).map_err(|_| invalid(format!("invalid tag {t:?} in the archive")))?;
                if r.digest.is_some() {
                    return Err(invalid(format!("invalid tag {t:?} in the archive")));
                }
                Ok(r)
            })
            .collect()
    }

    /// The images of a `manifest.json`. While planning a stream, layers
    /// that have not arrived yet are expected, not missing.
    fn docker(&self, ar: &ArchiveIndex, planning: bool) -> Result<Vec<Candidate>> {
        let entries: Vec<DockerEntry> = json(&ar.read_small("manifest.json", MAX_JSON)?, "manifest.json")?;
        if entries.len() > MAX_ARCHIVE_IMAGES {
            return Err(too_many_images("manifest.json", entries.len()));
        }
        let mut out = Vec::new();
        for e in entries {
            let config_name = clean(&e.config).map_err(|err| invalid(format!("manifest.json: {err}")))?;
            let config = ar.read_small(&config_name, manifest::MAX_CONFIG_BYTES)?;
            let mut layers = Vec::new();
            for l in &e.layers {
                let name = clean(l).map_err(|err| invalid(format!("manifest.json: {err}")))?;
                if !planning && !ar.contains(&name) {
                    let foreign = e.layer_sources.as_ref().is_some_and(|s| !s.is_empty());
                    return Err(if foreign {
                        Error::InvalidManifest(format!("layer {name:?} is a foreign layer, which is not supported"))
                    } else {
                        invalid(format!(
                            "manifest.json names layer {name:?}, which the archive does not hold"
                        ))
                    });
                }
                layers.push(LayerSource { name, blob: None });
            }
            out.push(Candidate {
                config: ConfigSource::Bytes(config),
                layers,
                tags: self.tags(e.repo_tags.as_deref().unwrap_or_default())?,
            });
        }
        Ok(out)
    }

    fn blob(&self, ar: &ArchiveIndex, digest: &str, size: u64, limit: u64) -> Result<Vec<u8>> {
        let d: Digest = digest.parse()?;
        if size > limit {
            return Err(invalid(format!("blob {d} is larger than {limit} bytes")));
        }
        let bytes = ar.read_small(&format!("blobs/sha256/{}", d.hex()), limit)?;
        if bytes.len() as u64 != size || Digest::of(&bytes) != d {
            return Err(Error::Integrity(format!("blob {d}: digest or size mismatch")));
        }
        Ok(bytes)
    }

    fn oci(&self, ar: &ArchiveIndex) -> Result<Vec<Candidate>> {
        let index: serde_json::Value = json(&ar.read_small("index.json", MAX_JSON)?, "index.json")?;
        let manifests = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .ok_or_else(|| invalid("index.json has no manifests".into()))?;
        if manifests.len() > MAX_ARCHIVE_IMAGES {
            return Err(too_many_images("index.json", manifests.len()));
        }
        let mut out = Vec::new();
        for d in manifests {
            let s = |k: &str| d.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let size = d
                .get("size")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| invalid("index.json: a descriptor has no size".into()))?;
            let annotations = d.get("annotations");
            let ann = |k: &str| annotations.and_then(|a| a.get(k)).and_then(|v| v.as_str());
            let name = ann("io.containerd.image.name").or_else(|| {
                // A ref.name that is a whole reference names the image; a bare tag does not.
                ann("org.opencontainers.image.ref.name").filter(|n| n.contains('/') || n.contains(':'))
            });
            let tags = match name {
                Some(n) => self.tags(&[n.to_string()])?,
                None => Vec::new(),
            };
            let mut digest = s("digest").to_string();
            let mut bytes = self.blob(ar, &digest, size, manifest::MAX_MANIFEST_BYTES as u64)?;
            let mut media_type = s("mediaType").to_string();
            // An index inside the layout: pick this machine's platform.
            let mut found = false;
            for _ in 0..MAX_INDEX_NESTING {
                match manifest::parse(&media_type, &bytes)? {
                    Parsed::Image(m) => {
                        let config =
                            self.blob(ar, m.config.digest.as_str(), m.config.size, manifest::MAX_CONFIG_BYTES)?;
                        let layers = m
                            .layers
                            .iter()
                            .map(|l| LayerSource {
                                name: format!("blobs/sha256/{}", l.blob.digest.hex()),
                                blob: Some((l.blob.digest.clone(), l.blob.size)),
                            })
                            .collect();
                        out.push(Candidate {
                            config: ConfigSource::Bytes(config),
                            layers,
                            tags,
                        });
                        found = true;
                        break;
                    }
                    Parsed::List(entries) => {
                        let chosen = manifest::select_nested(&entries, &self.platform)?;
                        digest = chosen.digest.to_string();
                        media_type = chosen.media_type.clone();
                        bytes = self.blob(ar, &digest, chosen.size, manifest::MAX_MANIFEST_BYTES as u64)?;
                    }
                }
            }
            if !found {
                return Err(invalid(format!(
                    "index.json: indexes nest deeper than {MAX_INDEX_NESTING} levels"
                )));
            }
        }
        Ok(out)
    }

    fn legacy(&self, ar: &ArchiveIndex) -> Result<Vec<Candidate>> {
        let repos: HashMap<String, HashMap<String, String>> =
            json(&ar.read_small("repositories", MAX_JSON)?, "the repositories file")?;
        let mut by_id: HashMap<String, Vec<Reference>> = HashMap::new();
        let n: usize = repos.values().map(|t| t.len()).sum();
        if n > MAX_ARCHIVE_IMAGES {
            return Err(too_many_images("the repositories file", n));
        }
        for (repo, tags) in &repos {
            for (tag, id) in tags {
                let r = self.tags(&[format!("{repo}:{tag}")])?;
                by_id.entry(id.clone()).or_default().extend(r);
            }
        }
        let mut ids: Vec<_> = by_id.into_iter().collect();
        ids.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (top, tags) in ids {
            let mut chain = Vec::new();
            let mut cur = Some(top.clone());
            while let Some(id) = cur {
                if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(format!("invalid legacy image id {id:?}")));
                }
                if chain.len() >= self.max_depth {
                    return Err(invalid(format!(
                        "the legacy image chain is longer than the limit of {} layers (max_layer_depth), or loops",
                        self.max_depth
                    )));
                }
                let v: serde_json::Value =
                    json(&ar.read_small(&format!("{id}/json"), MAX_JSON)?, "a legacy image json")?;
                cur = v
                    .get("parent")
                    .and_then(|p| p.as_str())
                    .filter(|p| !p.is_empty())
                    .map(str::to_string);
                chain.push((id, v));
            }
            chain.reverse();
            let layers = chain
                .iter()
                .map(|(id, _)| LayerSource {
                    name: format!("{id}/layer.tar"),
                    blob: None,
                })
                .collect();
            out.push(Candidate {
                config: ConfigSource::Legacy(chain.into_iter().map(|(_, v)| v).collect()),
                layers,
                tags,
            });
        }
        Ok(out)
    }
}

/// An image config made from a legacy image's v1 JSONs (base first), as
/// Docker's `MakeConfigFromV1Config` does.
fn legacy_config(chain: &[serde_json::Value], diff_ids: &[Digest]) -> Vec<u8> {
    let mut top = chain.last().cloned().unwrap_or_default();
    if let Some(o) = top.as_object_mut() {
        for k in ["id", "parent", "Size", "parent_id", "layer_id", "throwaway"] {
            o.remove(k);
        }
        let history: Vec<serde_json::Value> = chain
            .iter()
            .map(|v| {
                let cmd = v
                    .pointer("/container_config/Cmd")
                    .and_then(|c| c.as_array())
                    .map(|c| c.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default();
                serde_json::json!({
                    "created": v.get("created").cloned().unwrap_or_default(),
                    "author": v.get("author").cloned().unwrap_or_default(),
                    "created_by": cmd,
                    "comment": v.get("comment").cloned().unwrap_or_default(),
                })
            })
            .collect();
        o.insert(
            "rootfs".into(),
            serde_json::json!({"type": "layers", "diff_ids": diff_ids}),
        );
        o.insert("history".into(), serde_json::Value::Array(history));
    }
    serde_json::to_vec(&top).expect("serialisable")
}

/// The short id a layer is shown by: its digest or directory name.
fn short(name: &str) -> &str {
    let base = name.trim_end_matches("/layer.tar").rsplit('/').next().unwrap_or(name);
    &base[..base.len().min(12)]
}

/// Reports how far a layer has been read.
struct Counting<'p> {
    inner: Box<dyn Read + Send + 'p>,
    done: u64,
    total: u64,
    id: String,
    progress: &'p dyn Progress,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let before = self.done >> 20;
        self.done += n as u64;
        if self.done >> 20 != before {
            self.progress
                .layer(&self.id, Status::LoadingLayer, self.done, self.total);
        }
        Ok(n)
    }
}
