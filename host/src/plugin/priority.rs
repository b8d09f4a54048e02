//! Guest code gives way to host work, and to other tenants.
//!
//! A plugin that loops (until its CPU deadline stops it) must not slow
//! anyone else — in the daemon, another tenant's pull. Two measures:
//!
//! - **Priority.** Once a thread has run guest code through an epoch tick
//!   it is niced by [`GUEST_NICE`]; whenever the guest calls into the host
//!   (unpacking a layer, reading a stream, HTTP) or returns, the thread is
//!   back at its own priority, so host work outranks any guest's computing
//!   where they compete for a core. Niced at the tick, not on entry: an
//!   ordinary call takes well under a tick and calls into the host many
//!   times (a layer's `create` about twenty), and renicing on every
//!   crossing cost three system calls each way — a quarter of all the
//!   system calls of a pull of many small layers. A computation is
//!   un-niced for at most one tick (10 ms). Linux nices threads one by
//!   one. Raising a thread's nice is always allowed; lowering it back needs
//!   `CAP_SYS_NICE`; where that is missing nothing is changed at all (a
//!   thread stuck at a lower priority would slow its host work too).
//! - **A share while others work.** Priority does not help when there is a
//!   free core: the guest takes it, and a busy core still slows its
//!   neighbours (shared caches, memory bandwidth, SMT siblings on the
//!   machine under a VM) — measured here, a niced busy loop on the second
//!   of two cores slowed a pull by 20–60 %. So each plugin host belongs to
//!   a [`Tenancy`]; while another tenancy of the process has work in
//!   flight ([`Tenancy::busy`]), a guest call that has computed for longer
//!   than [`SHARE_GRACE`] runs one epoch tick in [`SHARE_PERIOD`] and
//!   sleeps the rest (at the epoch callback; the sleep is not counted
//!   against the guest's CPU budget). Ordinary calls never get that far,
//!   and a process with one tenancy — every CLI command — is never held
//!   back.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How much lower guest code runs (CFS weights: about a tenth).
pub(super) const GUEST_NICE: i32 = 10;

/// While another tenancy works, a guest call that has computed longer than
/// [`SHARE_GRACE`] gets one epoch tick (10 ms) of each period: 5 %.
pub(super) const SHARE_PERIOD: Duration = Duration::from_millis(200);

/// Guest time a call may take before it is held to its share: a plugin's
/// ordinary calls (parse a manifest, ask the host to unpack) take far less.
pub(super) const SHARE_GRACE: Duration = Duration::from_millis(50);

/// Operations in flight in the whole process, over every tenancy.
static ALL_BUSY: AtomicUsize = AtomicUsize::new(0);

/// One tenant's side of the process: its operations in flight.
#[derive(Debug, Default)]
pub struct Tenancy {
    busy: AtomicUsize,
}

/// An operation of a tenancy in flight (a daemon request doing work); ends
/// when dropped.
#[derive(Debug)]
pub struct Busy(Arc<Tenancy>);

impl Tenancy {
    /// Marks an operation of this tenancy in flight until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        ALL_BUSY.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Whether some other tenancy of this process has work in flight.
    pub(super) fn others_busy(&self) -> bool {
        ALL_BUSY.load(Ordering::SeqCst) > self.busy.load(Ordering::SeqCst)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        ALL_BUSY.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    /// Whether this thread is running guest code.
    static IN_GUEST: Cell<bool> = const { Cell::new(false) };
    /// This thread's own nice, while it runs guest code niced.
    static NICED_FROM: Cell<Option<i32>> = const { Cell::new(None) };
}

pub(super) fn tid() -> rustix::process::Pid {
    // SAFETY: gettid has no preconditions.
    let t = unsafe { libc::gettid() };
    rustix::process::Pid::from_raw(t).expect("a thread id is positive")
}

/// Whether this process may lower a nice it raised (probed once, on a
/// thread of its own).
pub(super) fn can_restore() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::spawn(|| {
            let Ok(base) = rustix::process::getpriority_process(Some(tid())) else {
                return false;
            };
            rustix::process::setpriority_process(Some(tid()), base + GUEST_NICE).is_ok()
                && rustix::process::setpriority_process(Some(tid()), base).is_ok()
        })
        .join()
        .unwrap_or(false)
    })
}

/// This thread is about to run guest code (nothing is changed yet; see
/// [`guest_computes`]).
pub(super) fn enter_guest() {
    IN_GUEST.set(true);
}

/// An epoch tick found this thread in guest code: it runs niced from now
/// until it leaves.
pub(super) fn guest_computes() {
    if !IN_GUEST.get() || NICED_FROM.get().is_some() || !can_restore() {
        return;
    }
    let me = tid();
    if let Ok(base) = rustix::process::getpriority_process(Some(me)) {
        if rustix::process::setpriority_process(Some(me), base + GUEST_NICE).is_ok() {
            NICED_FROM.set(Some(base));
        }
    }
}

/// This thread leaves guest code (the call returned, or the guest called
/// into the host), back at its own priority; whether it was in guest code.
pub(super) fn leave_guest() -> bool {
    if let Some(base) = NICED_FROM.take() {
        let _ = rustix::process::setpriority_process(Some(tid()), base);
    }
    IN_GUEST.replace(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenancy_sees_only_the_others_work() {
        let (a, b) = (Arc::new(Tenancy::default()), Arc::new(Tenancy::default()));
        // Other tests of this process may hold guards of their own; only
        // these two are looked at, with none of theirs in flight first.
        let a_own = a.busy();
        let held_by_others = ALL_BUSY.load(Ordering::SeqCst) > 1;
        if !held_by_others {
            assert!(!a.others_busy(), "its own work does not hold a back");
        }
        assert!(b.others_busy(), "a's work holds b back");
        let b_own = b.busy();
        assert!(a.others_busy());
        drop(b_own);
        drop(a_own);
        assert_eq!(a.busy.load(Ordering::SeqCst), 0);
        assert_eq!(b.busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_thread_returns_to_its_own_priority() {
        std::thread::spawn(|| {
            let prio = || rustix::process::getpriority_process(Some(tid())).unwrap();
            let before = prio();
            guest_computes();
            assert_eq!(prio(), before, "a tick outside guest code changes nothing");
            enter_guest();
            assert_eq!(prio(), before, "entering changes nothing yet");
            guest_computes();
            if can_restore() {
                assert_eq!(prio(), before + GUEST_NICE, "a tick in guest code nices it");
            } else {
                assert_eq!(prio(), before);
            }
            guest_computes();
            assert!(leave_guest(), "it was in guest code");
            assert_eq!(prio(), before);
            assert!(!leave_guest(), "and is no longer");
        })
        .join()
        .unwrap();
    }
}
