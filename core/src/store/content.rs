//! The content store: compressed blobs and manifests exactly as a registry
//! served them, by digest, as containerd keeps them:
//!
//! ```text
//! <root>/content/blobs/sha256/<hex>     a verified blob or manifest
//! <root>/content/ingest/                being written, never read
//! <root>/image/<driver>/contentdb/sha256/<image id>
//!                                       what each image needs from here
//! ```
//!
//! With it, `save` reproduces a registry's digests and `serve --from-store`
//! has something to serve. A blob enters only verified: written to an
//! ingest file (or a download spooled and checked elsewhere), its digest
//! checked, then renamed or linked into place. Blobs are shared by images;
//! each image's record lists what it uses, and a blob no record lists is
//! removed by [`ContentStore::collect`] (run after `rmi`).

use super::fs::{mkdir_private, random_id};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What one image uses from the content store: the manifest it was pulled
/// by (and the index that named it, if any) and its config and layer blobs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageContent {
    /// The image manifest's digest and media type.
    pub manifest: Digest,
    pub manifest_type: String,
    /// The manifest list or OCI index the manifest was chosen from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_type: Option<String>,
    /// Config and layers, as the manifest names them.
    pub blobs: Vec<Digest>,
}

impl ImageContent {
    fn digests(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.manifest).chain(&self.index).chain(&self.blobs)
    }
}

pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    /// This driver's image records.
    images: PathBuf,
    /// Every driver's image stores (`<root>/image`): blobs are shared by all.
    image_root: PathBuf,
}

/// Where a driver's image store keeps its content records.
const RECORDS: &str = "contentdb/sha256";

impl ContentStore {
    pub(super) fn open(root: &Path, image_dir: &Path) -> Result<ContentStore> {
        let dir = root.join("content");
        let s = ContentStore {
            blobs: dir.join("blobs/sha256"),
            ingest: dir.join("ingest"),
            images: image_dir.join(RECORDS),
            image_root: root.join("image"),
        };
        for d in [
            &dir,
            &dir.join("blobs"),
            &s.blobs,
            &s.ingest,
            &image_dir.join("contentdb"),
            &s.images,
        ] {
            mkdir_private(d)?;
        }
        Ok(s)
    }

    /// Where the blob `d` lives (whether or not it is there).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Opens blob `d`, or `None` when the store does not hold it.
    pub fn open_blob(&self, d: &Digest) -> Result<Option<File>> {
        match File::open(self.path(d)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading blob {d}"), e)),
        }
    }

    /// Reads blob `d` whole if it is at most `max` bytes (manifests,
    /// configs); `None` when absent.
    pub fn read_small(&self, d: &Digest, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(f) = self.open_blob(d)? else {
            return Ok(None);
        };
        let len = f.metadata().ctx(format!("reading blob {d}"))?.len();
        if len > max {
            return Err(Error::Integrity(format!("blob {d} is {len} bytes, more than {max}")));
        }
        let mut buf = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(f, max + 1), &mut buf).ctx(format!("reading blob {d}"))?;
        Ok(Some(buf))
    }

    /// Stores `bytes` as blob `d` after checking they are its content.
    /// Not synced: the caller's commit flushes the file system once.
    pub fn put(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        if Digest::of(bytes) != *d {
            return Err(Error::Integrity(format!("content does not match its digest {d}")));
        }
        if self.contains(d) {
            return Ok(());
        }
        let tmp = self.ingest.join(random_id());
        let res = (|| -> std::io::Result<()> {
            let mut f = File::create_new(&tmp)?;
            f.write_all(bytes)?;
            fs::rename(&tmp, self.path(d))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.ctx(format!("storing blob {d}"))
    }

    /// Links an already verified file (a download spooled beneath the same
    /// root, checked against `d`) into place, leaving the file where it is.
    pub fn adopt(&self, file: &Path, d: &Digest) -> Result<()> {
        match fs::hard_link(file, self.path(d)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io(format!("storing blob {d}"), e)),
        }
    }

    fn record_path(&self, image: &Digest) -> PathBuf {
        self.images.join(image.hex())
    }

    /// What `image` uses from here: every way it was pulled.
    pub fn image(&self, image: &Digest) -> Result<Vec<ImageContent>> {
        read_record(&self.record_path(image), image)
    }

    /// Adds `content` to `image`'s record (kept once). The caller holds
    /// the store's write lock and has stored every blob it names.
    pub fn record_image(&self, image: &Digest, content: ImageContent) -> Result<()> {
        let mut all = self.image(image)?;
        if all.contains(&content) {
            return Ok(());
        }
        all.push(content);
        super::fs::write_atomic_unsynced(
            &self.record_path(image),
            serde_json::to_string(&all).expect("serialisable").as_bytes(),
        )
    }

    /// Forgets `image` (its blobs go with the next [`collect`](Self::collect)).
    pub fn forget_image(&self, image: &Digest) -> Result<()> {
        match fs::remove_file(self.record_path(image)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing the content record of image {image}"), e)),
        }
    }

    /// Every blob digest held.
    pub fn list(&self) -> Result<Vec<Digest>> {
        Ok(super::fs::list_names(&self.blobs)?
            .into_iter()
            .filter_map(|n| format!("sha256:{n}").parse().ok())
            .collect())
    }

    /// Removes every blob no image record names, and leftover ingest
    /// files. Returns how many blobs went. The caller holds the store's
    /// write lock; an unreadable record stops it with nothing removed.
    pub fn collect(&self) -> Result<usize> {
        let mut used = HashSet::new();
        for driver in super::fs::list_names(&self.image_root)? {
            let records = self.image_root.join(driver).join(RECORDS);
            for name in super::fs::list_names(&records)? {
                let Ok(id) = format!("sha256:{name}").parse::<Digest>() else {
                    continue;
                };
                for c in read_record(&records.join(name), &id)? {
                    used.extend(c.digests().cloned());
                }
            }
        }
        let mut removed = 0;
        for d in self.list()? {
            if !used.contains(&d) {
                match fs::remove_file(self.path(&d)) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(format!("removing blob {d}"), e)),
                }
            }
        }
        Ok(removed)
    }

    /// Clears ingest files a crash left behind (the process is alone).
    pub fn clear_ingest(&self) -> Result<Vec<String>> {
        let names = super::fs::list_names(&self.ingest)?;
        for n in &names {
            let _ = fs::remove_file(self.ingest.join(n));
        }
        Ok(names)
    }
}

fn read_record(path: &Path, image: &Digest) -> Result<Vec<ImageContent>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Integrity(format!("content record of image {image} is corrupt: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io(format!("reading the content record of image {image}"), e)),
    }
}
