//! Staging: layers applied to the driver but not yet visible, then
//! committed together with their images, or discarded.
//!
//! Pull and load both go through here, so both verify the same way: the
//! blob is decompressed (by its magic bytes), bounded in size, hashed to a
//! diffID and split into a tar-split record on a feeder thread, while the
//! driver unpacks it. On the way every header is judged by the layer rules
//! of the stack it goes on (`layer_rules`): a refused entry ends the layer
//! before the driver has read it. A layer counts only if its diffID is the
//! one the image config promised. Nothing becomes visible until [`Staging::commit`];
//! dropping a `Staging` removes every layer it staged.

use crate::digest::Digest;
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::layer_rules::{LayerRules, Refusal};
use crate::plugin::GraphDriver;
use crate::reference::Reference;
use crate::store::{random_id, LayerMeta, Store};
use crate::tarsplit::{RecordWriter, Splitter};
use crate::verify::{decompress, HashingReader, LimitedReader};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
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
    /// Its record, written to a write-set as soon as it applied (while
    /// later layers download), published by the commit.
    record: Record,
}

enum Record {
    /// Only the spooled tar-split so far.
    Spooled,
    /// In a write-set, not visible.
    Prepared(crate::store::Prepared),
    /// Another process committed the same layer first: keep theirs.
    Taken,
}

/// An image to make visible with its references.
pub struct ImageCommit<'a> {
    pub config: &'a [u8],
    pub refs: Vec<Reference>,
    /// What it uses from the content store (pulls that keep content).
    pub content: Option<crate::store::ImageContent>,
}

/// A verified blob to put in the content store at commit.
enum Keep {
    /// Manifests and configs.
    Bytes(Digest, Vec<u8>),
    /// A verified download; the guard keeps the file until then.
    File(Digest, std::path::PathBuf, #[allow(dead_code)] Box<dyn Send + Sync>),
}

pub struct Staging<'a> {
    store: &'a Store,
    driver: &'a dyn GraphDriver,
    staged: Vec<Staged>,
    /// Committed layers this staging builds on, kept from release until it ends.
    leases: Vec<crate::store::Lease>,
    max_layer_bytes: u64,
    pub times: Mutex<StageTimes>,
    /// Flushes of the driver's file system started while layers apply, so
    /// a durable commit finds most of the data already on disk.
    early_flush: EarlyFlush,
    /// Whether each layer's record is prepared as soon as it applied
    /// (commits), or kept spooled (repairs, which replace records).
    prepare_early: bool,
    /// Blobs and manifests for the content store.
    keep: Vec<Keep>,
    /// The marker each layer's staging marker links to, made with the
    /// first layer and removed when this staging ends.
    anchor: Option<String>,
    /// The layer rules of the stack the last layer applied completed (its
    /// chainID): the next layer on it goes on from there, any other layer
    /// reads its stack's back from the tar-split records.
    rules: Option<(Digest, Arc<Mutex<LayerRules>>)>,
    /// This staging's charges against the store's quota, if it has one.
    charges: Option<Arc<crate::store::quota::Charges>>,
}

/// How much a layer's stream may grow between two early flushes: big
/// layers start reaching the disk while they are still being unpacked.
const EARLY_FLUSH_EVERY: u64 = 32 << 20;

/// Background `syncfs` of the driver's file system, one at a time. Without
/// it the kernel would write nothing back for the first 30 s, and a
/// durable commit would wait for every byte at the end.
struct EarlyFlush {
    home: Option<std::path::PathBuf>,
    running: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Layer bytes streamed since the last flush started.
    pending: std::sync::atomic::AtomicU64,
}

/// Less than this since the last flush is left to the commit: a flush per
/// tiny layer would only add journal commits.
const EARLY_FLUSH_AT_LEAST: u64 = 4 << 20;

impl EarlyFlush {
    fn streamed(&self, n: u64) {
        self.pending.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts a flush unless one is running, too little was written since
    /// the last, or commits are not durable.
    fn kick(&self) {
        let Some(home) = &self.home else { return };
        if self.pending.load(std::sync::atomic::Ordering::Relaxed) < EARLY_FLUSH_AT_LEAST {
            return;
        }
        let mut running = self.running.lock().unwrap();
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        self.pending.store(0, std::sync::atomic::Ordering::Relaxed);
        let home = home.clone();
        *running = std::thread::Builder::new()
            .name("early-flush".into())
            .spawn(move || {
                let _ = crate::store::sync_fs_of(&home);
            })
            .ok();
    }
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
            early_flush: EarlyFlush {
                home: store.durable().then(|| store.driver_home()),
                running: Mutex::new(None),
                pending: std::sync::atomic::AtomicU64::new(0),
            },
            prepare_early: true,
            keep: Vec::new(),
            anchor: None,
            rules: None,
            charges: store.charges().map(Arc::new),
        }
    }

    /// This staging's charges, for what the same operation writes beside
    /// it (a load's spool).
    pub fn charges(&self) -> Option<Arc<crate::store::quota::Charges>> {
        self.charges.clone()
    }

    /// Charges `bytes` about to be written against the store's quota
    /// (declared sizes, before they are fetched).
    pub fn charge(&self, bytes: u64) -> Result<()> {
        match &self.charges {
            Some(c) => Ok(c.charge(bytes)?),
            None => Ok(()),
        }
    }

    /// Puts verified `bytes` (a manifest or config) in the content store
    /// when this staging commits.
    pub fn keep_bytes(&mut self, digest: &Digest, bytes: Vec<u8>) {
        self.keep.push(Keep::Bytes(digest.clone(), bytes));
    }

    /// Links the verified download at `path` into the content store when
    /// this staging commits; `guard` keeps the file until then.
    pub fn keep_file(&mut self, digest: &Digest, path: std::path::PathBuf, guard: Box<dyn Send + Sync>) {
        self.keep.push(Keep::File(digest.clone(), path, guard));
    }

    /// A staging whose layers will replace the data of committed ones
    /// ([`Staging::replace`]), not be committed.
    pub fn for_repair(store: &'a Store, driver: &'a dyn GraphDriver, max_layer_bytes: u64) -> Staging<'a> {
        let mut staging = Staging::new(store, driver, max_layer_bytes);
        staging.prepare_early = false;
        // A repair replaces what the store already holds: no quota charge.
        staging.charges = None;
        staging
    }

    /// Whether `chain` is present, staged here or committed; a committed
    /// layer is leased until this staging ends, so a concurrent `rmi` in
    /// any process cannot release it while it is being built on.
    pub fn reuse(&mut self, chain: &Digest) -> Result<bool> {
        if self.staged.iter().any(|s| &s.meta.chain_id == chain) {
            return Ok(true);
        }
        // Absent now: it is fetched, and a layer another pull commits
        // meanwhile is settled at commit (theirs is kept). Only a layer
        // that is there needs the lease, taken under the lock and checked
        // again, since an `rmi` may release it in between.
        if !self.store.layers.exists(chain) {
            return Ok(false);
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
        compressed_size: Option<u64>,
        label: &str,
        source: Option<(Digest, String)>,
    ) -> Result<(Digest, u64)> {
        // Until the content is hashed, a legacy layer's diffID is unknown.
        let diff_id = expect.cloned().unwrap_or_else(|| Digest::of(b""));
        let chain_id = Digest::chain(parent, &diff_id);
        let parent_cache = parent.map(|p| self.cache_id_of(p)).transpose()?;
        // Taken now, given back only once this layer applied whole.
        let rules = self.rules_on(parent)?;
        let cache_id = random_id();
        if self.anchor.is_none() {
            self.anchor = Some(self.store.mark_sweep()?);
        }
        self.store
            .mark_staging_linked(self.anchor.as_deref().expect("just made"), &cache_id)?;
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
            record: Record::Spooled,
        });
        let record_file = std::fs::File::create_new(&self.staged.last().expect("just pushed").tar_split)
            .map_err(|e| Error::io("spooling a tar-split record", e))?;
        let t = Instant::now();
        self.driver.create(&cache_id, parent_cache.as_deref())?;
        self.times.lock().unwrap().create += t.elapsed();
        let t = Instant::now();
        let record_out = RecordWriter::new(Box::new(std::io::BufWriter::with_capacity(256 << 10, record_file)));
        let parent_cache = parent_cache.as_deref();
        let (applied, fed, hash, record) = self.unpack(
            blob,
            compressed_size,
            label,
            &cache_id,
            parent_cache,
            record_out,
            rules.clone(),
        )?;
        let size = applied_size(label, fed, applied)?;
        self.times.lock().unwrap().apply += t.elapsed();
        let (got, _) = hash.finish();
        if let Some(want) = expect.filter(|want| *want != &got) {
            return Err(Error::Integrity(format!(
                "layer {label}: diffID mismatch: the image config says {want}, the content is {got}"
            )));
        }
        self.finish_record(&record, size, label)?;
        let st = self.staged.last_mut().expect("just pushed");
        st.meta.diff_id = got.clone();
        st.meta.chain_id = Digest::chain(parent, &got);
        st.meta.size = size;
        self.rules = Some((st.meta.chain_id.clone(), rules));
        if self.prepare_early {
            st.record = match self.store.layers.prepare(&st.meta, &st.tar_split)? {
                Some(p) => Record::Prepared(p),
                None => Record::Taken,
            };
        }
        // With durable commits, what this layer wrote starts reaching the
        // disk while the next layers download and apply; the commit's own
        // flush still decides.
        self.early_flush.kick();
        Ok((got, size))
    }

    /// A layer blob decompressed (by its magic), bounded, hashed and split
    /// into a tar-split record as it is read.
    #[allow(clippy::type_complexity)]
    fn layer_stream<'r>(
        &self,
        blob: impl Read + Send + 'r,
        label: &str,
        record_out: RecordWriter,
        rules: Arc<Mutex<LayerRules>>,
    ) -> Result<(
        Splitter<HashingReader<Charged<LimitedReader<Box<dyn Read + Send + 'r>>>>>,
        Arc<crate::verify::HashState>,
        Arc<Mutex<RecordWriter>>,
    )> {
        let inflated = decompress(blob).map_err(|e| Error::Integrity(format!("layer {label}: {e}")))?;
        let bounded = LimitedReader::new(
            inflated,
            self.max_layer_bytes,
            format!("layer {label}: its uncompressed size"),
        );
        let charged = Charged {
            inner: bounded,
            charges: self.charges.clone(),
        };
        let (hashed, hash) = HashingReader::new(charged);
        let (split, record) = Splitter::new(hashed, record_out);
        Ok((split.with_rules(rules), hash, record))
    }

    /// Finishes a layer's tar-split record and checks the driver's `size`
    /// against it: the size is the core's own count of the stream, not the
    /// driver's word.
    fn finish_record(&self, record: &Mutex<RecordWriter>, size: u64, label: &str) -> Result<()> {
        let mut record = record.lock().unwrap();
        record
            .finish()
            .map_err(|e| Error::io("writing the tar-split record", e))?;
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
        Ok(())
    }

    /// Feeds layer `blob` to the driver for `cache_id`: a small one read
    /// whole and fed from this thread, a larger one decompressed, hashed
    /// and split on a second thread while the driver unpacks. What the
    /// driver said, how feeding it went, the hash and the record.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn unpack(
        &self,
        blob: Box<dyn Read + Send + '_>,
        compressed_size: Option<u64>,
        label: &str,
        cache_id: &str,
        parent_cache: Option<&str>,
        record_out: RecordWriter,
        rules: Arc<Mutex<LayerRules>>,
    ) -> Result<(
        std::result::Result<u64, PluginError>,
        std::io::Result<()>,
        Arc<crate::verify::HashState>,
        Arc<Mutex<RecordWriter>>,
    )> {
        let driver = self.driver;
        if compressed_size.is_some_and(|n| n <= INLINE_MAX) {
            // A small layer: read whole (it is, or soon will be, downloaded)
            // and fed to the driver from this thread, no pipe, no second thread.
            let mut bytes = Vec::new();
            if let Err(e) = blob.take(INLINE_MAX + 1).read_to_end(&mut bytes) {
                return Err(Error::Integrity(format!("layer {label}: corrupt layer: {e}")));
            }
            let (split, hash, record) =
                self.layer_stream(std::io::Cursor::new(bytes), label, record_out, rules.clone())?;
            let failure = Arc::new(Mutex::new(None));
            let recorded = Recording {
                inner: split,
                failure: failure.clone(),
            };
            let applied = driver.apply_diff(cache_id, parent_cache, Box::new(recorded));
            self.early_flush.streamed(hash.bytes());
            let fed = match failure.lock().unwrap().take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            Ok((applied, fed, hash, record))
        } else {
            let (split, hash, record) = self.layer_stream(blob, label, record_out, rules.clone())?;
            let (pipe, tx) = std::io::pipe().map_err(|e| Error::io("starting a layer pipe", e))?;
            // A larger pipe means fewer wake-ups between the two threads.
            let _ = rustix::pipe::fcntl_setpipe_size(&tx, 1 << 20);
            let early_flush = &self.early_flush;
            // Decompress, hash and split on a second thread while the driver unpacks.
            let (applied, fed) = std::thread::scope(|s| {
                let feeder = s.spawn(move || feed(split, tx, early_flush));
                let applied = driver.apply_diff(cache_id, parent_cache, Box::new(pipe));
                (applied, feeder.join().expect("layer feeder panicked"))
            });
            Ok((applied, fed, hash, record))
        }
    }

    /// The layer rules of the stack `parent` completes (an empty stack for
    /// none): the last layer's when it is `parent`, else read back from
    /// the tar-split records of the chain, oldest first.
    fn rules_on(&mut self, parent: Option<&Digest>) -> Result<Arc<Mutex<LayerRules>>> {
        if let (Some((chain, rules)), Some(p)) = (self.rules.take(), parent) {
            if &chain == p {
                return Ok(rules);
            }
        }
        let mut below = Vec::new();
        let mut next = parent.cloned();
        while let Some(chain) = next {
            if below.len() > DEFAULT_MAX_DEPTH * 8 {
                return Err(Error::Integrity(format!("the parents of layer {chain} loop")));
            }
            next = match self.staged.iter().find(|s| s.meta.chain_id == chain) {
                Some(st) => st.meta.parent.clone(),
                None => {
                    self.store
                        .layers
                        .get(&chain)?
                        .ok_or_else(|| Error::Integrity(format!("parent layer {chain} vanished")))?
                        .parent
                }
            };
            below.push(chain);
        }
        let mut rules = LayerRules::new();
        for chain in below.iter().rev() {
            let staged = self.staged.iter().find(|s| &s.meta.chain_id == chain);
            let spooled = match staged.map(|s| &s.record) {
                Some(Record::Spooled) => Some(staged.expect("found").tar_split.clone()),
                Some(Record::Prepared(p)) => Some(p.tar_split_path()),
                Some(Record::Taken) | None => None,
            };
            let replayed = match spooled {
                Some(path) => {
                    let f = std::fs::File::open(&path).map_err(|e| Error::io("reading a tar-split record", e))?;
                    crate::tarsplit::replay_rules(
                        crate::tarsplit::RecordReader::new(std::io::BufReader::new(f)),
                        &mut rules,
                    )
                }
                None => crate::tarsplit::replay_rules(self.store.layers.tar_split(chain)?, &mut rules),
            };
            replayed.map_err(|e| Error::Integrity(format!("layer {chain}: {e}")))?;
        }
        Ok(Arc::new(Mutex::new(rules)))
    }

    /// Removes the layer the last `apply` staged (it failed, and the caller
    /// applies it again).
    pub fn discard_last(&mut self) {
        if let Some(st) = self.staged.pop() {
            if self.rules.as_ref().is_some_and(|(chain, _)| chain == &st.meta.chain_id) {
                self.rules = None;
            }
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
        let mut staged = std::mem::take(&mut self.staged);
        let any = !staged.is_empty();
        let res = (|| -> Result<Vec<Digest>> {
            self.record_blobs(&staged)?;
            let mut prepared = Vec::new();
            let mut taken = Vec::new();
            for st in &mut staged {
                let record = match std::mem::replace(&mut st.record, Record::Spooled) {
                    Record::Spooled => self.store.layers.prepare(&st.meta, &st.tar_split)?,
                    Record::Prepared(p) => Some(p),
                    Record::Taken => None,
                };
                match record {
                    Some(p) => prepared.push((p, &st.meta.cache_id)),
                    // Another process committed the same layer first: keep theirs.
                    None => taken.push((&st.meta.cache_id, &st.tar_split)),
                }
            }
            for k in &self.keep {
                match k {
                    Keep::Bytes(d, bytes) => self.store.content.put(d, bytes)?,
                    Keep::File(d, path, _) => self.store.content.adopt(path, d)?,
                }
            }
            if durable && (any || !self.keep.is_empty()) {
                self.store.sync_all_data()?;
            }
            for (p, cache_id) in prepared {
                if !self.store.layers.publish(p)? {
                    let _ = self.driver.remove(cache_id);
                }
            }
            if durable && any {
                self.store.layers.sync_published()?;
            }
            for (cache_id, tar_split) in taken {
                let _ = self.driver.remove(cache_id);
                let _ = std::fs::remove_file(tar_split);
            }
            let now = crate::date::now_rfc3339();
            let mut ids = Vec::new();
            for img in images {
                let id = self.store.images.put(img.config)?;
                self.store.images.touch(&id, &now)?;
                if let Some(c) = &img.content {
                    self.store.content.record_image(&id, c.clone())?;
                }
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
            // Blobs this commit put in the content store go with it.
            let _ = self.store.content.collect();
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

    /// The distribution metadata of every staged layer (which blob it came
    /// from, and where). Each layer's is two files, each a create and a
    /// rename: for an image of many small layers that is a good part of the
    /// commit, so past a few layers half are written on a second thread
    /// (the downloads are over, a core is free).
    fn record_blobs(&self, staged: &[Staged]) -> Result<()> {
        let record = |st: &Staged| match &st.source {
            Some((blob, repo)) => self.store.layers.record_blob(blob, &st.meta.diff_id, repo),
            None => Ok(()),
        };
        if staged.len() < 8 {
            return staged.iter().try_for_each(record);
        }
        // Layers of one diffID append to one file: those stay on one thread.
        let (mine, theirs): (Vec<&Staged>, Vec<&Staged>) = staged
            .iter()
            .partition(|st| st.meta.diff_id.hex().as_bytes()[0] % 2 == 0);
        std::thread::scope(|s| {
            let other = s.spawn(|| theirs.into_iter().try_for_each(record));
            let mine = mine.into_iter().try_for_each(record);
            other.join().expect("recording blobs panicked").and(mine)
        })
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
        // Last: a crash before this leaves it, and the next process alone
        // on the store sweeps.
        if let Some(anchor) = &self.anchor {
            self.store.unmark_staging(anchor);
        }
    }
}

/// Layers this small (compressed) are applied without a feeder thread.
const INLINE_MAX: u64 = 1 << 20;

/// The size the driver applied, or why the layer failed: a decompression
/// failure or a refused entry is the cause of whatever the driver saw.
fn applied_size(label: &str, fed: std::io::Result<()>, applied: std::result::Result<u64, PluginError>) -> Result<u64> {
    match fed {
        Err(e) if e.get_ref().is_some_and(|i| i.is::<Refusal>()) => {
            return Err(Error::Integrity(format!("layer {label}: {e}")))
        }
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Err(Error::Integrity(e.to_string())),
        Err(e) if e.get_ref().is_some_and(|i| i.is::<crate::store::quota::Exceeded>()) => {
            let exceeded = e.into_inner().and_then(|i| i.downcast().ok()).expect("just checked");
            return Err(Error::Quota(*exceeded));
        }
        Err(e) => return Err(Error::Integrity(format!("layer {label}: corrupt layer: {e}"))),
        Ok(()) => {}
    }
    applied.map_err(|e| match e.class {
        ErrorClass::Invalid => Error::Integrity(format!("layer {label}: {}", e.message)),
        _ => Error::Plugin(PluginError::new(
            e.class,
            format!("applying layer {label}: {}", e.message),
        )),
    })
}

/// A layer's uncompressed stream, charged against the store's quota as it
/// is read: the driver writes what it reads.
pub(crate) struct Charged<R> {
    inner: R,
    charges: Option<Arc<crate::store::quota::Charges>>,
}

impl<R: Read> Read for Charged<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = &self.charges {
            c.charge(n as u64)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::StorageFull, e))?;
        }
        Ok(n)
    }
}

/// A reader that keeps its first failure (a corrupt or oversized layer),
/// which is then reported as the cause of whatever the driver saw.
struct Recording<R> {
    inner: R,
    failure: Arc<Mutex<Option<std::io::Error>>>,
}

impl<R: Read> Read for Recording<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            let mut f = self.failure.lock().unwrap();
            if f.is_none() {
                *f = Some(match e.get_ref().and_then(|i| i.downcast_ref::<Refusal>()) {
                    Some(r) => std::io::Error::new(e.kind(), r.clone()),
                    None => std::io::Error::new(e.kind(), e.to_string()),
                });
            }
        })
    }
}

/// Copies the layer stream `r` into the driver's pipe until the end, or
/// until the driver hangs up, starting an early flush each
/// [`EARLY_FLUSH_EVERY`] bytes.
fn feed(mut r: impl Read, mut tx: std::io::PipeWriter, flush: &EarlyFlush) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut since = 0u64;
    loop {
        if since >= EARLY_FLUSH_EVERY {
            flush.streamed(since);
            flush.kick();
            since = 0;
        }
        let n = match r.read(&mut buf) {
            Ok(0) => {
                flush.streamed(since);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        since += n as u64;
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
