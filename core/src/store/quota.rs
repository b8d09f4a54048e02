//! A store's disk quota (`max_store_gib`): what a pull, load, import or a
//! push to the registry it serves may add before it is refused, so one
//! tenant cannot fill the disk others share.
//!
//! Usage is measured, not kept in a record that could drift: the store's
//! directory is walked (blocks allocated, each inode once, the shared
//! plugin cache aside) when an operation first asks. From then on the
//! operation is charged for what it is about to write — declared sizes
//! first (a manifest's blob sizes, a request's `Content-Length`), then the
//! bytes as they stream (uncompressed layers, spooled archive entries) —
//! and refused the moment a charge would pass the limit, so a failed
//! operation rolls back as any other, before the disk fills.
//!
//! Charges of one process's operations add up (two pulls at once share
//! one budget); what another process is writing at the same moment is seen
//! only once it is on disk. Counting is conservative: an operation's walk
//! may also see what a concurrent one already charged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Directories below the root a walk does not count: compiled plugins are
/// the machine's, not the tenant's images.
const NOT_COUNTED: &[&str] = &["plugins-cache"];

#[derive(Debug)]
pub struct Quota {
    root: PathBuf,
    limit: u64,
    /// Bytes this process's operations have been charged and may not yet
    /// have written.
    in_flight: AtomicU64,
}

/// A charge the quota refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the store's quota of {} would be exceeded: {} in use, {} more needed",
    human(*limit),
    human(*used),
    human(*wanted)
)]
pub struct Exceeded {
    pub limit: u64,
    pub used: u64,
    pub wanted: u64,
}

impl Quota {
    pub fn new(root: &Path, limit: u64) -> Arc<Quota> {
        Arc::new(Quota {
            root: root.to_path_buf(),
            limit,
            in_flight: AtomicU64::new(0),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The bytes the store's directory holds now.
    pub fn usage(&self) -> u64 {
        usage(&self.root)
    }

    /// The charges of one operation, released when it ends.
    pub fn charges(self: &Arc<Self>) -> Charges {
        Charges {
            quota: self.clone(),
            base: Mutex::new(None),
            mine: AtomicU64::new(0),
        }
    }
}

/// What one operation has been charged; dropped when it ends (its bytes
/// are on disk by then, or were removed with it).
pub struct Charges {
    quota: Arc<Quota>,
    /// The store's usage when the operation first charged.
    base: Mutex<Option<u64>>,
    mine: AtomicU64,
}

impl Charges {
    /// Charges `n` more bytes, or refuses them when the store would pass
    /// its limit.
    pub fn charge(&self, n: u64) -> Result<(), Exceeded> {
        let base = *self.base.lock().unwrap().get_or_insert_with(|| self.quota.usage());
        let before = self.quota.in_flight.fetch_add(n, Ordering::SeqCst);
        let used = base.saturating_add(before);
        if used.saturating_add(n) > self.quota.limit {
            self.quota.in_flight.fetch_sub(n, Ordering::SeqCst);
            return Err(Exceeded {
                limit: self.quota.limit,
                used,
                wanted: n,
            });
        }
        self.mine.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Charges {
    fn drop(&mut self) {
        self.quota
            .in_flight
            .fetch_sub(self.mine.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// Bytes allocated below `root` (`st_blocks`), each inode once; what
/// cannot be read (a directory a layer made unreadable) is passed over.
pub fn usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total = total.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() && !(dir == root && NOT_COUNTED.iter().any(|n| e.file_name() == *n)) {
                dirs.push(e.path());
            }
        }
    }
    total
}

/// `n` bytes for a message: `1.5 GiB`, `320.0 MiB`, `12 KiB`, `100 B`.
pub fn human(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / GIB),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / MIB),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_share_one_budget_and_are_released() {
        let dir = tempfile::tempdir().unwrap();
        let used = usage(dir.path());
        let q = Quota::new(dir.path(), used + 1000);
        let a = q.charges();
        let b = q.charges();
        a.charge(600).unwrap();
        let e = b.charge(500).unwrap_err();
        assert_eq!((e.used, e.wanted), (used + 600, 500));
        b.charge(400).unwrap();
        drop(a);
        b.charge(500).unwrap();
        assert!(b.charge(101).is_err());
    }

    #[test]
    fn usage_counts_blocks_once_per_inode() {
        let dir = tempfile::tempdir().unwrap();
        let empty = usage(dir.path());
        std::fs::write(dir.path().join("a"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("plugins-cache")).unwrap();
        std::fs::write(dir.path().join("plugins-cache/x"), vec![1u8; 1 << 20]).unwrap();
        let got = usage(dir.path()) - empty;
        assert!((1 << 20..(1 << 20) + 16384).contains(&got), "{got}");
    }
}
