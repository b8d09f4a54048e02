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
//! A walk stands for a few seconds, with what operations of this process
//! finished since added to it; a charge it would refuse walks again first.
//! Charges of one process's operations add up (two pulls at once share
//! one budget); what another process is writing at the same moment is seen
//! only once it is on disk. Counting errs on the safe side: a walk may also
//! see bytes a running operation wrote and is charged for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The last walk, and what operations of this process that ended since
    /// were charged (on disk now, and not in that walk).
    measured: Mutex<Option<Measured>>,
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    base: u64,
    settled: u64,
    at: Instant,
}

/// How long a walk stands for the store's usage. A charge the standing
/// measure would refuse walks again first, so what was removed meanwhile
/// (`rmi`, another process's) never refuses an operation.
const FRESH_FOR: Duration = Duration::from_secs(10);

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
            measured: Mutex::new(None),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Walks the store unless a recent walk stands: for a caller that must
    /// not block (a server's runtime thread), on a thread that may, before
    /// it charges with [`Charges::charge_measured`].
    pub fn measure(&self) {
        self.on_disk(false);
    }

    /// What the store holds: the standing walk plus what settled since, or
    /// (`fresh`, or none standing) a new walk.
    fn on_disk(&self, fresh: bool) -> u64 {
        let mut m = self.measured.lock().unwrap();
        let stale = m.is_none_or(|m| m.at.elapsed() > FRESH_FOR);
        if fresh || stale {
            *m = Some(Measured {
                base: usage(&self.root),
                settled: 0,
                at: Instant::now(),
            });
        }
        m.map(|m| m.base.saturating_add(m.settled)).unwrap_or_default()
    }

    /// What the standing walk says, without walking (none: nothing).
    fn measured(&self) -> u64 {
        let m = self.measured.lock().unwrap();
        m.map(|m| m.base.saturating_add(m.settled)).unwrap_or_default()
    }

    /// Adds `n` to what is in flight unless the store would pass its
    /// limit with `on_disk` bytes on disk: checked and added at once.
    fn add(&self, on_disk: u64, n: u64) -> Result<(), Exceeded> {
        let mut current = self.in_flight.load(Ordering::SeqCst);
        loop {
            let used = on_disk.saturating_add(current);
            if used.saturating_add(n) > self.limit {
                return Err(Exceeded {
                    limit: self.limit,
                    used,
                    wanted: n,
                });
            }
            match self
                .in_flight
                .compare_exchange(current, current + n, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }

    /// The charges of one operation, released when it ends.
    pub fn charges(self: &Arc<Self>) -> Charges {
        Charges {
            quota: self.clone(),
            mine: AtomicU64::new(0),
        }
    }
}

/// What one operation has been charged; dropped when it ends (its bytes
/// are on disk by then, or were removed with it).
pub struct Charges {
    quota: Arc<Quota>,
    mine: AtomicU64,
}

impl Charges {
    /// Charges `n` more bytes, or refuses them when the store would pass
    /// its limit — after a fresh walk, so a stale measure never refuses.
    pub fn charge(&self, n: u64) -> Result<(), Exceeded> {
        let q = &self.quota;
        q.add(q.on_disk(false), n).or_else(|_| q.add(q.on_disk(true), n))?;
        self.mine.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }

    /// [`Charges::charge`] that never walks: against the standing measure
    /// (see [`Quota::measure`]).
    pub fn charge_measured(&self, n: u64) -> Result<(), Exceeded> {
        self.quota.add(self.quota.measured(), n)?;
        self.mine.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Charges {
    fn drop(&mut self) {
        // What it wrote is on disk now (or gone with it, and counted until
        // the next walk: the safe side).
        let mine = self.mine.load(Ordering::SeqCst);
        if let Some(m) = self.quota.measured.lock().unwrap().as_mut() {
            m.settled = m.settled.saturating_add(mine);
        }
        self.quota.in_flight.fetch_sub(mine, Ordering::SeqCst);
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
        // A size near the top of u64 is refused and leaves nothing in flight.
        assert!(b.charge(u64::MAX - 10).is_err());
        assert_eq!(q.in_flight.load(Ordering::SeqCst), 900);
        drop(b);
        assert_eq!(q.in_flight.load(Ordering::SeqCst), 0);
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
