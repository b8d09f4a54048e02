//! The image store: image configs keyed by their digest (the image ID).

use super::fs::{list_names, mkdir_private, write_atomic};
use crate::digest::Digest;
use crate::error::{IoContext, Result};
use std::fs;
use std::path::{Path, PathBuf};

pub struct ImageStore {
    content: PathBuf,
    metadata: PathBuf,
}

impl ImageStore {
    pub(super) fn open(image_dir: &Path) -> Result<ImageStore> {
        let s = ImageStore {
            content: image_dir.join("imagedb/content/sha256"),
            metadata: image_dir.join("imagedb/metadata/sha256"),
        };
        mkdir_private(&s.content)?;
        mkdir_private(&s.metadata)?;
        Ok(s)
    }

    pub fn exists(&self, id: &Digest) -> bool {
        self.content.join(id.hex()).is_file()
    }

    /// The config bytes of image `id`.
    pub fn get(&self, id: &Digest) -> Result<Vec<u8>> {
        fs::read(self.content.join(id.hex())).ctx(format!("reading image {id}"))
    }

    /// Stores `config`; its ID is its digest.
    pub fn put(&self, config: &[u8]) -> Result<Digest> {
        let id = Digest::of(config);
        if !self.exists(&id) {
            write_atomic(&self.content.join(id.hex()), config)?;
        }
        Ok(id)
    }

    /// Records when an image was last tagged (Docker's `Metadata.LastTagTime`).
    pub fn touch(&self, id: &Digest, rfc3339: &str) -> Result<()> {
        let dir = self.metadata.join(id.hex());
        mkdir_private(&dir)?;
        write_atomic(&dir.join("lastUpdated"), rfc3339.as_bytes())
    }

    pub fn last_updated(&self, id: &Digest) -> Option<String> {
        fs::read_to_string(self.metadata.join(id.hex()).join("lastUpdated")).ok()
    }

    pub fn list(&self) -> Result<Vec<Digest>> {
        Ok(list_names(&self.content)?
            .into_iter()
            .filter_map(|n| format!("sha256:{n}").parse().ok())
            .collect())
    }

    pub fn delete(&self, id: &Digest) -> Result<()> {
        let _ = fs::remove_dir_all(self.metadata.join(id.hex()));
        fs::remove_file(self.content.join(id.hex())).ctx(format!("removing image {id}"))
    }

    /// Finds the image whose ID starts with `prefix` (hex, optionally with
    /// `sha256:`). Errors on an ambiguous prefix.
    pub fn find_by_prefix(&self, prefix: &str) -> Result<Option<Digest>> {
        let p = prefix.strip_prefix("sha256:").unwrap_or(prefix);
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let hits: Vec<Digest> = self.list()?.into_iter().filter(|d| d.hex().starts_with(p)).collect();
        match hits.len() {
            0 => Ok(None),
            1 => Ok(hits.into_iter().next()),
            _ => Err(crate::Error::Conflict(format!(
                "image ID prefix {prefix:?} is ambiguous"
            ))),
        }
    }
}
