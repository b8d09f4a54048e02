//! The on-disk store, laid out like Docker's data root so operators
//! recognise it:
//!
//! ```text
//! <root>/image/<driver>/imagedb/content/sha256/<id>      image configs (ID = digest)
//! <root>/image/<driver>/imagedb/metadata/sha256/<id>/    lastUpdated
//! <root>/image/<driver>/layerdb/sha256/<chainID>/        diff, size, cache-id, parent
//! <root>/image/<driver>/distribution/                    blob digest <-> diffID
//! <root>/image/<driver>/repositories.json                tags and digests
//! <root>/<driver>/                                       the driver's home
//! <root>/tmp/                                            downloads and staging markers
//! ```
//!
//! Every record is written to a temporary name and renamed into place, so a
//! crash leaves either the old or the new state. Images become visible only
//! after all their layers are committed, and references only after their
//! image. Directories are created 0700. The store never writes outside root.

mod content;
mod fs;
mod image;
mod layer;
pub mod quota;
mod refs;

pub use content::{ContentStore, ImageContent};
pub use fs::{random_id, write_atomic};
pub use image::ImageStore;
pub use layer::{LayerMeta, LayerStore, Prepared};
pub use refs::RefStore;

use crate::error::{IoContext, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Staging markers with this prefix name no driver layer, only a window to sweep.
pub const SWEEP_PREFIX: &str = "sweep-";

/// Handle to one store root for one graph driver.
pub struct Store {
    root: PathBuf,
    driver: String,
    pub layers: LayerStore,
    pub images: ImageStore,
    pub refs: RefStore,
    pub content: ContentStore,
    /// Whether pulls keep compressed blobs and manifests (see [`ContentStore`]).
    keep_content: std::sync::atomic::AtomicBool,
    /// Whether commits wait for layer contents and records to reach the disk.
    durable: std::sync::atomic::AtomicBool,
    /// The most the store may hold, when it has a quota.
    quota: std::sync::Mutex<Option<std::sync::Arc<quota::Quota>>>,
    _process_lock: File,
}

/// A lease on a layer (see [`Store::lease`]), given back when dropped.
pub struct Lease(PathBuf);

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The file that marks a store made without root: its owners, modes and
/// devices are recorded ([`crate::ownership`]), not set.
pub const ROOTLESS_MARKER: &str = "rootless";

/// A store is one or the other: one made by root is refused to a process
/// without root (which could not keep its owners), and one made without
/// root is refused to root (which would mix real owners into recorded
/// ones). A new store is marked for what this process can keep.
fn check_ownership(root: &Path) -> Result<()> {
    use crate::ownership::Ownership;
    let marker = root.join(ROOTLESS_MARKER);
    let fresh = !root.join("image").exists();
    let marked = marker.exists();
    let shown = crate::text::escape_line(&root.display().to_string());
    match (Ownership::of_process(), fresh, marked) {
        (Ownership::Recorded, true, false) => write_atomic(
            &marker,
            b"Made without root: each entry's owner, mode and device are in its user.containers.override_stat attribute.\n",
        ),
        (Ownership::Recorded, false, false) => Err(crate::Error::Config(format!(
            "the store at {shown} was made by root (or by a gantry that did not record owners): \
             without root its owners cannot be kept; use a store of your own (--root)"
        ))),
        (Ownership::Real, _, true) => Err(crate::Error::Config(format!(
            "the store at {shown} was made without root (owners recorded, not set): \
             open it as the user who made it, or use another store as root"
        ))),
        _ => Ok(()),
    }
}

/// Held while a store is being changed (register, tag, remove): serialises
/// writers across processes.
pub struct WriteLock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating if need be) the store at `root` for `driver`.
    /// Returns the store and whether this process is the only one using it,
    /// in which case leftovers of a crash may be cleared.
    pub fn open(root: &Path, driver: &str) -> Result<(Store, bool)> {
        fs::mkdir_private(root)?;
        let root = root.canonicalize().ctx(format!("resolving {}", root.display()))?;
        // The store holds other people's image contents: nobody else may look.
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .ctx(format!("making {} private", root.display()))?;
        check_ownership(&root)?;
        let image_dir = root.join("image").join(driver);
        for d in [
            root.join("tmp"),
            root.join("tmp/staging"),
            root.join("tmp/blobs"),
            root.join("tmp/tar-split"),
            root.join("tmp/leases"),
            // Mirrors that failed, and until when they are skipped.
            root.join("mirrors"),
            // The driver's home, whether or not the driver is ever loaded.
            root.join(driver),
            image_dir.clone(),
        ] {
            fs::mkdir_private(&d)?;
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".gantry.lock"))
            .ctx("opening the store lock")?;
        // Exclusive if nobody else is here; then downgrade to shared.
        let alone = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok();
        if !alone {
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockShared)
                .map_err(|e| crate::Error::io("locking the store", e.into()))?;
        }
        let store = Store {
            layers: LayerStore::open(&image_dir)?,
            images: ImageStore::open(&image_dir)?,
            refs: RefStore::new(image_dir.join("repositories.json")),
            content: ContentStore::open(&root, &image_dir)?,
            keep_content: std::sync::atomic::AtomicBool::new(true),
            root,
            driver: driver.to_string(),
            durable: std::sync::atomic::AtomicBool::new(true),
            quota: std::sync::Mutex::new(None),
            _process_lock: lock,
        };
        Ok((store, alone))
    }

    /// Downgrades this process's hold on the store to shared, letting other
    /// processes in after start-up cleaning.
    pub fn share(&self) -> Result<()> {
        rustix::fs::flock(&self._process_lock, rustix::fs::FlockOperation::LockShared)
            .map_err(|e| crate::Error::io("locking the store", e.into()))
    }

    /// Makes commits durable (the default) or not: without, a power loss may
    /// leave a committed layer whose files are empty (a crash of gantry alone
    /// never does).
    pub fn set_durable(&self, durable: bool) {
        self.durable.store(durable, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps pulled blobs and manifests in the content store (the default),
    /// or only the unpacked layers, as Docker does.
    pub fn set_keep_content(&self, keep: bool) {
        self.keep_content.store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Gives the store a quota of `limit` bytes (see [`quota`]), for the
    /// operations that begin from now on.
    pub fn set_quota(&self, limit: u64) {
        *self.quota.lock().unwrap() = Some(quota::Quota::new(&self.root, limit));
    }

    pub fn quota(&self) -> Option<std::sync::Arc<quota::Quota>> {
        self.quota.lock().unwrap().clone()
    }

    /// The charges of one operation against the quota, if there is one.
    pub fn charges(&self) -> Option<quota::Charges> {
        self.quota().map(|q| q.charges())
    }

    pub fn keep_content(&self) -> bool {
        self.keep_content.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn durable(&self) -> bool {
        self.durable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes the file system holding the driver's data (`syncfs`), so
    /// the contents of layers about to be committed are on disk first.
    pub fn sync_driver_data(&self) -> Result<()> {
        sync_fs_of(&self.driver_home())
    }

    /// Flushes the driver's data and the store's own records, each file
    /// system once (`syncfs`; one call when they share one): what a commit
    /// wrote so far reaches the disk before anything is published.
    pub fn sync_all_data(&self) -> Result<()> {
        self.sync_driver_data()?;
        let dev = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                .ok()
        };
        if dev(&self.driver_home()) != dev(&self.root) {
            sync_fs_of(&self.root)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn driver_name(&self) -> &str {
        &self.driver
    }

    /// This driver's image store (`<root>/image/<driver>`).
    pub fn image_dir(&self) -> PathBuf {
        self.root.join("image").join(&self.driver)
    }

    /// The driver's home directory.
    pub fn driver_home(&self) -> PathBuf {
        self.root.join(&self.driver)
    }

    /// Where downloads are spooled.
    pub fn blob_tmp(&self) -> PathBuf {
        self.root.join("tmp/blobs")
    }

    /// Takes the cross-process write lock.
    pub fn write_lock(&self) -> Result<WriteLock> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("image").join(&self.driver).join(".write.lock"))
            .ctx("opening the write lock")?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| crate::Error::io("taking the write lock", e.into()))?;
        Ok(WriteLock(f))
    }

    /// Records that driver layer `cache_id` is being staged, so a crash
    /// before it is committed leaves a trace the next start clears.
    pub fn mark_staging(&self, cache_id: &str) -> Result<()> {
        File::create(self.root.join("tmp/staging").join(cache_id)).ctx("marking a staging layer")?;
        Ok(())
    }

    /// Marks a window (removing an image, then its layers) in which a crash
    /// would leave unreferenced layers; returns the marker to unmark.
    pub fn mark_sweep(&self) -> Result<String> {
        let name = format!("{SWEEP_PREFIX}{}", &random_id()[..16]);
        self.mark_staging(&name)?;
        Ok(name)
    }

    /// As [`Store::mark_staging`], as a hard link to `anchor` (a marker
    /// from [`Store::mark_sweep`] held by the staging): a pull of many
    /// small layers makes, and frees, one inode for its markers instead of
    /// one per layer. Falls back to a file of its own.
    pub fn mark_staging_linked(&self, anchor: &str, cache_id: &str) -> Result<()> {
        let dir = self.root.join("tmp/staging");
        if std::fs::hard_link(dir.join(anchor), dir.join(cache_id)).is_ok() {
            return Ok(());
        }
        self.mark_staging(cache_id)
    }

    pub fn unmark_staging(&self, cache_id: &str) {
        let _ = std::fs::remove_file(self.root.join("tmp/staging").join(cache_id));
    }

    /// Driver layers whose staging never finished (left by a crash).
    pub fn staging_leftovers(&self) -> Result<Vec<String>> {
        fs::list_names(&self.root.join("tmp/staging"))
    }

    /// Takes a lease on layer `chain`: while it is held, no `rmi` or
    /// clean-up releases the layer. Take it under the write lock and check
    /// the layer exists after, so a release either came first (the layer
    /// is gone, and the caller fetches it) or sees the lease.
    pub fn lease(&self, chain: &crate::Digest) -> Result<Lease> {
        let path = self
            .root
            .join("tmp/leases")
            .join(format!("{}-{}", chain.hex(), &random_id()[..16]));
        File::create(&path).ctx("taking a layer lease")?;
        Ok(Lease(path))
    }

    /// Whether anyone holds a lease on layer `chain`.
    pub fn leased(&self, chain: &crate::Digest) -> Result<bool> {
        let prefix = format!("{}-", chain.hex());
        Ok(fs::list_names(&self.root.join("tmp/leases"))?
            .iter()
            .any(|n| n.starts_with(&prefix)))
    }

    /// Removes leases a crash left. Only safe when alone.
    pub fn clear_leases(&self) -> Result<Vec<String>> {
        self.clear_files("tmp/leases")
    }

    /// Removes every file in `<root>/<dir>`; returns their names.
    fn clear_files(&self, dir: &str) -> Result<Vec<String>> {
        let dir = self.root.join(dir);
        let names = fs::list_names(&dir)?;
        for n in &names {
            let _ = std::fs::remove_file(dir.join(n));
        }
        Ok(names)
    }

    /// A fresh name for spooling a layer's tar-split record until the layer
    /// is committed (the commit moves it into the layer store).
    pub fn tar_split_spool(&self) -> PathBuf {
        self.root.join("tmp/tar-split").join(random_id())
    }

    /// Removes tar-split records a crash left uncommitted. Only safe when alone.
    pub fn clear_tar_split_spools(&self) -> Result<Vec<String>> {
        self.clear_files("tmp/tar-split")
    }

    /// Removes spooled downloads left by a crash. Only safe when alone.
    pub fn clear_tmp_blobs(&self) -> Result<Vec<String>> {
        self.clear_files("tmp/blobs")
    }

    /// A fresh directory for spooling an archive read from a stream.
    pub fn load_spool(&self) -> PathBuf {
        self.root.join("tmp").join(format!("load-{}", &random_id()[..16]))
    }

    /// Removes load spools left by a crash. Only safe when alone.
    pub fn clear_load_spools(&self) -> Result<Vec<String>> {
        let tmp = self.root.join("tmp");
        let names: Vec<String> = fs::list_names(&tmp)?
            .into_iter()
            .filter(|n| n.starts_with("load-"))
            .collect();
        for n in &names {
            let _ = std::fs::remove_dir_all(tmp.join(n));
        }
        Ok(names)
    }
}

/// `syncfs` of the file system holding `dir`.
pub(crate) fn sync_fs_of(dir: &Path) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| crate::Error::io(format!("opening {}", dir.display()), e.into()))?;
    rustix::fs::syncfs(&fd).map_err(|e| crate::Error::io(format!("syncing {}", dir.display()), e.into()))
}

/// Which mirrors are skipped for a while after failing, remembered across
/// processes: one file per mirror (named by a hash of its URL) holding the
/// Unix time until which it is skipped.
impl Store {
    fn mirror_file(&self, url: &str) -> PathBuf {
        let key = crate::digest::Digest::of(url.as_bytes());
        self.root.join("mirrors").join(&key.hex()[..32])
    }

    /// Until when the mirror at `url` is skipped, if it is.
    pub fn mirror_skipped_until(&self, url: &str) -> Option<std::time::SystemTime> {
        let text = std::fs::read_to_string(self.mirror_file(url)).ok()?;
        let secs: u64 = text.trim().parse().ok()?;
        Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }

    /// Skips the mirror at `url` until `until` (it just failed).
    pub fn skip_mirror(&self, url: &str, until: std::time::SystemTime) {
        let secs = until
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + 1)
            .unwrap_or(0);
        let _ = fs::write_atomic_unsynced(&self.mirror_file(url), secs.to_string().as_bytes());
    }

    /// The mirror at `url` answered: it is not skipped any more.
    pub fn mirror_answered(&self, url: &str) {
        let _ = std::fs::remove_file(self.mirror_file(url));
    }
}
