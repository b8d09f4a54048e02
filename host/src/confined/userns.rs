//! Without root, gantry runs in a user namespace of its own, where the
//! kernel lets it make overlay mounts (Linux 5.11 and later, with
//! `userxattr`), so a store without root can use overlay2 too.
//!
//! The namespace maps the caller alone: user 0 inside is the caller
//! outside, and nothing else is mapped, so every file gantry makes is the
//! caller's and no file of another user can be given away. The image's
//! owners stay recorded ([`gantry_core::ownership`]: a process in such a
//! namespace is not root). Its mount namespace is private: its overlay
//! mounts are seen by nobody else and vanish with the process.
//!
//! The kernel refuses `CLONE_NEWUSER` to a process with threads, so this is
//! the first thing `main` does. Where the kernel or a security policy
//! refuses unprivileged user namespaces, gantry runs as it is and `auto`
//! picks vfs, saying why.

use std::io;

use std::sync::OnceLock;

/// Why the kernel refused the namespace, when it did: for the line `auto`
/// prints when it falls back to vfs.
static REFUSED: OnceLock<io::Error> = OnceLock::new();

/// The error the kernel gave [`enter_without_root`], if it refused.
pub fn refusal() -> Option<&'static io::Error> {
    REFUSED.get()
}

/// Enters a user and mount namespace of this process's own when it runs
/// without root; whether it did. Must run before any thread starts. A
/// refusal is also kept for [`refusal`].
pub fn enter_without_root() -> io::Result<bool> {
    enter().inspect_err(|e| {
        let _ = REFUSED.set(match e.raw_os_error() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(e.kind(), e.to_string()),
        });
    })
}

fn enter() -> io::Result<bool> {
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    if rustix::process::geteuid().is_root() {
        return Ok(false);
    }
    // SAFETY: unshare(2) takes flags only; the process has no threads yet
    // (the kernel refuses CLONE_NEWUSER otherwise, with EINVAL).
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("0 {} 1", uid.as_raw()))?;
    std::fs::write("/proc/self/gid_map", format!("0 {} 1", gid.as_raw()))?;
    // Nothing mounted here propagates back to the caller's namespace.
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )?;
    Ok(true)
}
