//! Guest code runs at a lower CPU priority than host work.
//!
//! A plugin that loops (until its CPU deadline stops it) must not slow
//! anyone else — in the daemon, another tenant's pull. While a thread runs
//! guest code it is niced by [`GUEST_NICE`]; whenever the guest calls into
//! the host (unpacking a layer, reading a stream, HTTP), the thread returns
//! to its own priority, so host work — every tenant's real work — always
//! outranks any guest's computing. Linux nices threads one by one.
//!
//! Raising a thread's nice is always allowed; lowering it back needs
//! `CAP_SYS_NICE`. Where that is missing (an unprivileged host), nothing is
//! changed at all: a thread stuck at a lower priority would slow its host
//! work too.

use std::cell::Cell;
use std::sync::OnceLock;

/// How much lower guest code runs (CFS weights: about a tenth).
const GUEST_NICE: i32 = 10;

thread_local! {
    /// This thread's own nice, while it runs guest code.
    static NICED_FROM: Cell<Option<i32>> = const { Cell::new(None) };
}

fn tid() -> rustix::process::Pid {
    // SAFETY: gettid has no preconditions.
    let t = unsafe { libc::gettid() };
    rustix::process::Pid::from_raw(t).expect("a thread id is positive")
}

/// Whether this process may lower a nice it raised (probed once, on a
/// thread of its own).
fn can_restore() -> bool {
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

/// This thread is about to run guest code.
pub(super) fn enter_guest() {
    if NICED_FROM.get().is_some() || !can_restore() {
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
/// into the host); whether it was running guest code at a lower priority.
pub(super) fn leave_guest() -> bool {
    match NICED_FROM.take() {
        Some(base) => {
            let _ = rustix::process::setpriority_process(Some(tid()), base);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_returns_to_its_own_priority() {
        std::thread::spawn(|| {
            let before = rustix::process::getpriority_process(Some(tid())).unwrap();
            enter_guest();
            let inside = rustix::process::getpriority_process(Some(tid())).unwrap();
            if can_restore() {
                assert_eq!(inside, before + GUEST_NICE);
            } else {
                assert_eq!(inside, before);
            }
            leave_guest();
            assert_eq!(rustix::process::getpriority_process(Some(tid())).unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
