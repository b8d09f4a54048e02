//! The layer store: one directory per chainID under `layerdb/sha256/`,
//! committed by renaming a complete directory into place.

use super::fs::{list_names, mkdir_private, random_id, read_text};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// The metadata of one committed layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMeta {
    pub chain_id: Digest,
    pub diff_id: Digest,
    pub parent: Option<Digest>,
    /// The driver's id for the layer's directory.
    pub cache_id: String,
    /// Size of the layer's content.
    pub size: u64,
}

pub struct LayerStore {
    dir: PathBuf,
    tmp: PathBuf,
    dist: PathBuf,
}

impl LayerStore {
    pub(super) fn open(image_dir: &Path) -> Result<LayerStore> {
        let s = LayerStore {
            dir: image_dir.join("layerdb/sha256"),
            tmp: image_dir.join("layerdb/tmp"),
            dist: image_dir.join("distribution"),
        };
        for d in [
            &s.dir,
            &s.tmp,
            &s.dist.join("diffid-by-digest/sha256"),
            &s.dist.join("v2metadata-by-diffid/sha256"),
        ] {
            mkdir_private(d)?;
        }
        Ok(s)
    }

    fn path(&self, chain: &Digest) -> PathBuf {
        self.dir.join(chain.hex())
    }

    pub fn exists(&self, chain: &Digest) -> bool {
        self.path(chain).join("cache-id").is_file()
    }

    pub fn get(&self, chain: &Digest) -> Result<Option<LayerMeta>> {
        let p = self.path(chain);
        if !p.is_dir() {
            return Ok(None);
        }
        let parent = match fs::read_to_string(p.join("parent")) {
            Ok(s) => Some(s.trim().parse()?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("reading layer parent", e)),
        };
        Ok(Some(LayerMeta {
            chain_id: chain.clone(),
            diff_id: read_text(&p.join("diff"))?.parse()?,
            parent,
            cache_id: read_text(&p.join("cache-id"))?,
            size: read_text(&p.join("size"))?
                .parse()
                .map_err(|_| Error::Integrity(format!("layer {chain}: bad size file")))?,
        }))
    }

    /// All chainIDs present.
    pub fn list(&self) -> Result<Vec<Digest>> {
        Ok(list_names(&self.dir)?
            .into_iter()
            .filter_map(|n| format!("sha256:{n}").parse().ok())
            .collect())
    }

    /// Writes `meta` and its tar-split record (spooled at `tar_split`,
    /// moved in) into a write-set beside the layer store, not yet visible
    /// and not yet synced: a commit prepares every layer, makes them all
    /// durable with one flush, then publishes each by rename. `None` when
    /// the layer already exists.
    pub fn prepare(&self, meta: &LayerMeta, tar_split: &Path) -> Result<Option<Prepared>> {
        let final_path = self.path(&meta.chain_id);
        if final_path.exists() {
            return Ok(None);
        }
        let ws = self.tmp.join(format!("write-set-{}", random_id()));
        let res = (|| -> std::io::Result<()> {
            fs::create_dir(&ws)?;
            let mut files = vec![
                ("diff", meta.diff_id.as_str().to_string()),
                ("size", meta.size.to_string()),
                ("cache-id", meta.cache_id.clone()),
            ];
            if let Some(p) = &meta.parent {
                files.push(("parent", p.as_str().to_string()));
            }
            for (name, text) in &files {
                let mut f = fs::File::create_new(ws.join(name))?;
                std::io::Write::write_all(&mut f, text.as_bytes())?;
            }
            fs::rename(tar_split, ws.join("tar-split.json.gz"))
        })();
        if res.is_err() {
            let _ = fs::remove_dir_all(&ws);
        }
        res.ctx(format!("committing layer {}", meta.chain_id))?;
        Ok(Some(Prepared {
            ws,
            final_path,
            chain_id: meta.chain_id.clone(),
        }))
    }

    /// Makes a prepared layer visible (an atomic rename). Returns false if
    /// another process published the same layer first.
    pub fn publish(&self, p: Prepared) -> Result<bool> {
        if p.final_path.exists() {
            return Ok(false);
        }
        fs::rename(&p.ws, &p.final_path).ctx(format!("committing layer {}", p.chain_id))?;
        Ok(true)
    }

    /// Makes the renames of `publish` durable.
    pub fn sync_published(&self) -> Result<()> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .ctx("syncing the layer store")
    }

    /// The tar-split record of a layer (see `tarsplit`), to read as it streams.
    pub fn tar_split(&self, chain: &Digest) -> Result<crate::tarsplit::RecordReader<std::io::BufReader<fs::File>>> {
        let f = fs::File::open(self.path(chain).join("tar-split.json.gz"))
            .ctx(format!("reading the tar-split of layer {chain}"))?;
        Ok(crate::tarsplit::RecordReader::new(std::io::BufReader::new(f)))
    }

    /// Removes a layer's metadata (the driver's data is the caller's job).
    pub fn delete(&self, chain: &Digest) -> Result<()> {
        let p = self.path(chain);
        let doomed = self.tmp.join(format!("remove-{}", random_id()));
        fs::rename(&p, &doomed).ctx(format!("removing layer {chain}"))?;
        fs::remove_dir_all(&doomed).ctx(format!("removing layer {chain}"))
    }

    /// Clears half-written write sets a crash left behind.
    pub fn clear_tmp(&self) -> Result<Vec<String>> {
        let names = list_names(&self.tmp)?;
        for n in &names {
            let _ = fs::remove_dir_all(self.tmp.join(n));
        }
        Ok(names)
    }

    /// Records which blob digest gave which diffID (Docker's distribution
    /// metadata), so later pulls and pushes can skip work.
    ///
    /// Written atomically but not synced: a commit records blobs before its
    /// one flush, which makes them durable with the layers.
    pub fn record_blob(&self, blob: &Digest, diff_id: &Digest, repository: &str) -> Result<()> {
        super::fs::write_atomic_unsynced(
            &self.dist.join("diffid-by-digest/sha256").join(blob.hex()),
            diff_id.as_str().as_bytes(),
        )?;
        // Appended, never overwritten: a diffID seen as several blobs, or
        // in several repositories, keeps every one (pushes mount from them).
        let path = self.dist.join("v2metadata-by-diffid/sha256").join(diff_id.hex());
        let mut entries: Vec<serde_json::Value> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let entry = serde_json::json!({ "Digest": blob, "SourceRepository": repository, "HMAC": "" });
        if entries.contains(&entry) {
            return Ok(());
        }
        entries.push(entry);
        // Bounded like Docker's (it keeps the 50 most recent).
        if entries.len() > 50 {
            entries.remove(0);
        }
        super::fs::write_atomic_unsynced(&path, serde_json::Value::from(entries).to_string().as_bytes())
    }

    /// Where a diffID's compressed blob came from: (blob digest, source
    /// repository as `domain/path`), from Docker's v2 metadata.
    pub fn blob_sources(&self, diff_id: &Digest) -> Vec<(Digest, String)> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            digest: String,
            source_repository: String,
        }
        let Ok(bytes) = fs::read(self.dist.join("v2metadata-by-diffid/sha256").join(diff_id.hex())) else {
            return Vec::new();
        };
        let entries: Vec<Entry> = serde_json::from_slice(&bytes).unwrap_or_default();
        entries
            .into_iter()
            .filter_map(|e| Some((e.digest.parse().ok()?, e.source_repository)))
            .collect()
    }

    /// Points committed layer `meta.chain_id` at new driver data
    /// (`meta.cache_id`) with its tar-split record: for repairs, where the
    /// same diff was applied again. The record is written first (it is the
    /// same diff, so either record describes either copy), then the
    /// cache-id is replaced by a rename, the one step that switches.
    /// Returns the old cache id.
    pub fn replace_data(&self, meta: &LayerMeta, tar_split: &Path) -> Result<String> {
        let dir = self.path(&meta.chain_id);
        let old = read_text(&dir.join("cache-id"))?;
        let res = (|| -> std::io::Result<()> {
            fs::File::open(tar_split)?.sync_all()?;
            fs::rename(tar_split, dir.join("tar-split.json.gz"))?;
            super::write_atomic(&dir.join("cache-id"), meta.cache_id.as_bytes()).map_err(std::io::Error::other)?;
            fs::File::open(&dir)?.sync_all()
        })();
        res.ctx(format!("replacing the data of layer {}", meta.chain_id))?;
        Ok(old)
    }

    /// The diffID a blob digest is known to give, if recorded.
    pub fn diff_id_of_blob(&self, blob: &Digest) -> Option<Digest> {
        read_text(&self.dist.join("diffid-by-digest/sha256").join(blob.hex()))
            .ok()
            .and_then(|s| s.parse().ok())
    }
}

/// A layer written to its write-set, waiting to be published.
pub struct Prepared {
    ws: PathBuf,
    final_path: PathBuf,
    chain_id: Digest,
}

impl Prepared {
    /// Where its tar-split record lies until it is published.
    pub fn tar_split_path(&self) -> PathBuf {
        self.ws.join("tar-split.json.gz")
    }
}

impl Drop for Prepared {
    /// A write-set never published (a commit that failed half way) goes.
    fn drop(&mut self) {
        if self.ws.exists() {
            let _ = fs::remove_dir_all(&self.ws);
        }
    }
}
