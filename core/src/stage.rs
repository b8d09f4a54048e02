//! Staging: layers applied to the driver but not yet visible, then
//! committed together with their images, or discarded.
//!
//! Pull and load both go through here, so both verify the same way: the
//! blob is decompressed (by its magic bytes), bounded in size, hashed to a
//! diffID and split into a tar-split record on a feeder thread, while the
//! driver unpacks it. A layer counts only if its diffID is the one the image
//! config promised. Nothing becomes visible until [`Staging::commit`];
//! dropping a `Staging` removes every layer it staged.

use crate::digest::Digest;
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::plugin::GraphDriver;
use crate::reference::Reference;
use crate::store::{random_id, LayerMeta, Store};
use crate::tarsplit::{RecordWriter, Splitter};
use crate::verify::{decompress, HashingReader, LimitedReader};
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default bound on one layer's uncompressed size: a decompression bomb
/// stops here.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;

/// The default bound on how many layers one image may stack (Docker's
/// overlay2 stops at 128 too): a 1,000-layer image costs time and store
/// entries out of all proportion to its content.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// The error for an image deeper than `max` layers.
pub fn too_deep(layers: usize, max: usize) -> Error {
    Error::InvalidManifest(format!(
        "the image has {layers} layers, more than the limit of {max} (max_layer_depth)"
    ))
}

/// Time spent per stage, for benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    /// The driver creating layers on their parents (vfs: copies).
    pub create: Duration,
    /// Decompressing, hashing and unpacking.
    pub apply: Duration,
}

struct Staged {
    meta: LayerMeta,
    /// The tar-split record, spooled beside the layer store until commit.
    tar_split: std::path::PathBuf,
    /// The blob digest it came from and the repository, for distribution metadata.
    source: Option<(Digest, String)>,
}

/// An image to make visible with its references.
pub struct ImageCommit<'a> {
    pub config: &'a [u8],
    pub refs: Vec<Reference>,
}

pub struct Staging<'a> {
    store: &'a Store,
    driver: &'a dyn GraphDriver,
    staged: Vec<Staged>,
    /// Committed layers this staging builds on, kept from release until it ends.
    leases: Vec<crate::store::Lease>,
    max_layer_bytes: u64,
    pub times: Mutex<StageTimes>,
    /// A flush of the driver's file system started after a layer applied,
    /// so a durable commit finds most of the data already on disk.
    early_flush: Option<std::thread::JoinHandle<()>>,
}

impl<'a> Staging<'a> {
    pub fn new(store: &'a Store, driver: &'a dyn GraphDriver, max_layer_bytes: u64) -> Staging<'a> {
        Staging {
            store,
            driver,
            staged: Vec::new(),
            leases: Vec::new(),
            max_layer_bytes,
            times: Mutex::new(StageTimes::default()),
            early_flush: None,
        }
    }

    /// With durable commits: starts writing what the layers applied so far
    /// to disk, in the background, while the next layers download and
    /// apply (one flush at a time). The commit's own flush still decides.
    fn flush_early(&mut self) {
        if !self.store.durable() || self.early_flush.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let home = self.store.driver_home();
        self.early_flush = std::thread::Builder::new()
            .name("early-flush".into())
            .spawn(move || {
                let _ = crate::store::sync_fs_of(&home);
            })
            .ok();
    }

    /// Whether `chain` is present, staged here or committed; a committed
    /// layer is leased until this staging ends, so a concurrent `rmi` in
    /// any process cannot release it while it is being built on.
    pub fn reuse(&mut self, chain: &Digest) -> Result<bool> {
        if self.staged.iter().any(|s| &s.meta.chain_id == chain) {
            return Ok(true);
        }
        let _lock = self.store.write_lock()?;
        let lease = self.store.lease(chain)?;
        if self.store.layers.exists(chain) {
            self.leases.push(lease);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    fn cache_id_of(&self, chain: &Digest) -> Result<String> {
        if let Some(s) = self.staged.iter().find(|s| &s.meta.chain_id == chain) {
            return Ok(s.meta.cache_id.clone());
        }
        Ok(self
            .store
            .layers
            .get(chain)?
            .ok_or_else(|| Error::Integrity(format!("parent layer {chain} vanished")))?
            .cache_id)
    }

    /// Applies `blob` (a layer tar, compressed or not) on top of `parent`.
    /// Its diffID must be `expect` when given (legacy archives carry none).
    /// `label` names the layer in errors. Returns the diffID and the size.
    pub fn apply(
        &mut self,
        parent: Option<&Digest>,
        expect: Option<&Digest>,
        blob: Box<dyn Read + Send + '_>,
        label: &str,
        source: Option<(Digest, String)>,
    ) -> Result<(Digest, u64)> {
        // Until the content is hashed, a legacy layer's diffID is unknown.
        let diff_id = expect.cloned().unwrap_or_else(|| Digest::of(b""));
        let chain_id = Digest::chain(parent, &diff_id);
        let parent_cache = parent.map(|p| self.cache_id_of(p)).transpose()?;
        let cache_id = random_id();
        self.store.mark_staging(&cache_id)?;
        // Staged before anything is written, so a failure removes it too.
        self.staged.push(Staged {
            meta: LayerMeta {
                chain_id,
                diff_id,
                parent: parent.cloned(),
                cache_id: cache_id.clone(),
                size: 0,
            },
            tar_split: self.store.tar_split_spool(),
            source,
        });
        let record_file = std::fs::File::create_new(&self.staged.last().expect("just pushed").tar_split)
            .map_err(|e| Error::io("spooling a tar-split record", e))?;
        let t = Instant::now();
        self.driver.create(&cache_id, parent_cache.as_deref())?;
        self.times.lock().unwrap().create += t.elapsed();
        let t = Instant::now();
        let inflated = decompress(blob).map_err(|e| Error::Integrity(format!("layer {label}: {e}")))?;
        let bounded = LimitedReader::new(
            inflated,
            self.max_layer_bytes,
            format!("layer {label}: its uncompressed size"),
        );
        let (hashed, hash) = HashingReader::new(bounded);
        let (split, record) = Splitter::new(
            hashed,
            RecordWriter::new(Box::new(std::io::BufWriter::with_capacity(256 << 10, record_file))),
        );
        let (pipe, tx) = std::io::pipe().map_err(|e| Error::io("starting a layer pipe", e))?;
        // A larger pipe means fewer wake-ups between the two threads.
        let _ = rustix::pipe::fcntl_setpipe_size(&tx, 1 << 20);
        let driver = self.driver;
        // Decompress, hash and split on a second thread while the driver unpacks.
        let (applied, fed) = std::thread::scope(|s| {
            let feeder = s.spawn(move || feed(split, tx));
            let applied = driver.apply_diff(&cache_id, parent_cache.as_deref(), Box::new(pipe));
            (applied, feeder.join().expect("layer feeder panicked"))
        });
        // A decompression failure is the cause of whatever the driver saw.
        match fed {
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Err(Error::Integrity(e.to_string())),
            Err(e) => return Err(Error::Integrity(format!("layer {label}: corrupt layer: {e}"))),
            Ok(()) => {}
        }
        let size = applied.map_err(|e| match e.class {
            ErrorClass::Invalid => Error::Integrity(format!("layer {label}: {}", e.message)),
            _ => Error::Plugin(PluginError::new(
                e.class,
                format!("applying layer {label}: {}", e.message),
            )),
        })?;
        self.times.lock().unwrap().apply += t.elapsed();
        let (got, _) = hash.finish();
        if let Some(want) = expect.filter(|want| *want != &got) {
            return Err(Error::Integrity(format!(
                "layer {label}: diffID mismatch: the image config says {want}, the content is {got}"
            )));
        }
        let mut record = record.lock().unwrap();
        record
            .finish()
            .map_err(|e| Error::io("writing the tar-split record", e))?;
        // The size is the core's own count of the stream, not the driver's word.
        let counted = record.file_bytes();
        if counted != size {
            return Err(Error::Plugin(PluginError::new(
                ErrorClass::Invalid,
                format!(
                    "driver {} said it applied {size} bytes of layer {label}, whose files hold {counted}",
                    self.driver.name()
                ),
            )));
        }
        let st = self.staged.last_mut().expect("just pushed");
        st.meta.diff_id = got.clone();
        st.meta.chain_id = Digest::chain(parent, &got);
        st.meta.size = size;
        self.flush_early();
        Ok((got, size))
    }

    /// Removes the layer the last `apply` staged (it failed, and the caller
    /// applies it again).
    pub fn discard_last(&mut self) {
        if let Some(st) = self.staged.pop() {
            let _ = std::fs::remove_file(&st.tar_split);
            let _ = self.driver.remove(&st.meta.cache_id);
            self.store.unmark_staging(&st.meta.cache_id);
        }
    }

    /// Makes everything visible: layers, then images, then references.
    /// Returns the image IDs.
    ///
    /// Durable commits cost two flushes however many layers there are:
    /// every layer's record is written to a write-set first, one `syncfs`
    /// puts those and the layers' contents on disk, then each is published
    /// by rename and one directory sync makes the renames durable.
    pub fn commit(mut self, images: &[ImageCommit<'_>]) -> Result<Vec<Digest>> {
        let _lock = self.store.write_lock()?;
        let durable = self.store.durable();
        let staged = std::mem::take(&mut self.staged);
        let res = (|| -> Result<Vec<Digest>> {
            let mut prepared = Vec::new();
            let mut taken = Vec::new();
            for st in &staged {
                match self.store.layers.prepare(&st.meta, &st.tar_split)? {
                    Some(p) => prepared.push((p, &st.meta.cache_id)),
                    // Another process committed the same layer first: keep theirs.
                    None => taken.push(st),
                }
                if let Some((blob, repo)) = &st.source {
                    self.store.layers.record_blob(blob, &st.meta.diff_id, repo)?;
                }
            }
            if durable && !staged.is_empty() {
                self.store.sync_all_data()?;
            }
            for (p, cache_id) in prepared {
                if !self.store.layers.publish(p)? {
                    let _ = self.driver.remove(cache_id);
                }
            }
            if durable && !staged.is_empty() {
                self.store.layers.sync_published()?;
            }
            for st in taken {
                let _ = self.driver.remove(&st.meta.cache_id);
                let _ = std::fs::remove_file(&st.tar_split);
            }
            let now = crate::pull::now_rfc3339();
            let mut ids = Vec::new();
            for img in images {
                let id = self.store.images.put(img.config)?;
                self.store.images.touch(&id, &now)?;
                for r in &img.refs {
                    self.store.refs.set(r, &id)?;
                }
                ids.push(id);
            }
            // Markers stay until the images are visible: a crash before this
            // leaves committed but unreferenced layers for the next sweep.
            for st in &staged {
                self.store.unmark_staging(&st.meta.cache_id);
            }
            Ok(ids)
        })();
        if res.is_err() {
            // Layers not yet committed go; committed ones keep their markers,
            // so the next process alone on the store sweeps them.
            for st in &staged {
                let _ = std::fs::remove_file(&st.tar_split);
                if !self.store.layers.exists(&st.meta.chain_id) {
                    let _ = self.driver.remove(&st.meta.cache_id);
                    self.store.unmark_staging(&st.meta.cache_id);
                }
            }
        }
        res
    }

    /// With durable commits, layer contents reach the disk before any
    /// record names them.
    fn sync_layer_data(&self) -> Result<()> {
        if self.store.durable() && !self.staged.is_empty() {
            self.store.sync_driver_data()?;
        }
        Ok(())
    }

    /// For repairs: every staged layer re-applies the diff of a committed
    /// layer of the same chainID; each is switched to its new data in turn
    /// (parents first, as they were staged), and its old data removed.
    /// Returns the chainIDs switched.
    pub fn replace(mut self) -> Result<Vec<Digest>> {
        let _lock = self.store.write_lock()?;
        self.sync_layer_data()?;
        let mut done = Vec::new();
        while !self.staged.is_empty() {
            let st = self.staged.remove(0);
            match self.store.layers.replace_data(&st.meta, &st.tar_split) {
                Ok(old) => {
                    let _ = self.driver.remove(&old);
                    self.store.unmark_staging(&st.meta.cache_id);
                    done.push(st.meta.chain_id);
                }
                Err(e) => {
                    self.staged.insert(0, st);
                    return Err(e);
                }
            }
        }
        Ok(done)
    }
}

impl Drop for Staging<'_> {
    /// Removes whatever was staged and not committed.
    fn drop(&mut self) {
        for st in self.staged.iter().rev() {
            let _ = std::fs::remove_file(&st.tar_split);
            let _ = self.driver.remove(&st.meta.cache_id);
            self.store.unmark_staging(&st.meta.cache_id);
        }
    }
}

/// Copies `r` into the pipe until the end, or until the reader hangs up.
fn feed(mut r: impl Read, mut tx: std::io::PipeWriter) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Err(e) = tx.write_all(&buf[..n]) {
            // The consumer stopped reading: its own error is the one to report.
            return if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(e)
            };
        }
    }
}
