//! Which graph driver a store uses when the config says `auto`, by Docker's
//! rule: the driver the store already holds layers for; otherwise overlay2
//! where the kernel and privileges allow it (probed by making a real
//! overlay mount in a scratch directory of the store); otherwise vfs, with a
//! line saying why.

use gantry_core::ownership::Ownership;
use std::path::Path;

/// The drivers `auto` chooses between, in order of preference.
pub const AUTO: [&str; 2] = ["overlay2", "vfs"];

/// What `auto` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub driver: String,
    /// Why overlay2 was not chosen, when the probe failed.
    pub notice: Option<String>,
}

fn holds_layers(root: &Path, driver: &str) -> bool {
    std::fs::read_dir(root.join("image").join(driver).join("layerdb/sha256"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Resolves `auto` for the store at `root`.
pub fn choose(root: &Path) -> Result<Choice, String> {
    let used: Vec<&str> = AUTO
        .iter()
        .copied()
        .filter(|d| root.join("image").join(d).is_dir())
        .collect();
    let prior: Vec<&str> = match used.as_slice() {
        [one] => vec![one],
        _ => used.iter().copied().filter(|d| holds_layers(root, d)).collect(),
    };
    match prior.as_slice() {
        [one] => {
            return Ok(Choice {
                driver: one.to_string(),
                notice: None,
            })
        }
        [] => {}
        many => {
            return Err(format!(
                "the store holds layers of more than one driver ({}); choose one with [driver] type",
                many.join(", ")
            ))
        }
    }
    let scratch = root.join("tmp");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&scratch)
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    Ok(match crate::confined::probe_overlay(&scratch) {
        Ok(()) => Choice {
            driver: "overlay2".into(),
            notice: None,
        },
        Err(e) => Choice {
            driver: "vfs".into(),
            notice: Some(format!(
                "overlay2 is not available here ({}; {}); using vfs{}",
                gantry_core::text::escape_line(&why_no_overlay(&e)),
                where_it_ran(root),
                match Ownership::of_process() {
                    Ownership::Real => "",
                    Ownership::Recorded =>
                        " (without root: files are yours, each entry's owner, mode and device as the image says \
                         are kept in its user.containers.override_stat attribute)",
                }
            )),
        },
    })
}

/// The probe's failure in words a user can act on.
fn why_no_overlay(e: &std::io::Error) -> String {
    use crate::confined::{errno_of, userns};
    let root = rustix::process::geteuid().is_root();
    match errno_of(e) {
        Some(libc::EPERM) | Some(libc::EACCES) if !root => match userns::refusal() {
            Some(r) => format!(
                "{e}: not root, and the kernel refused gantry a user namespace of its own ({r}: {}); \
                 run as root, or allow unprivileged user namespaces",
                match r.raw_os_error() {
                    Some(libc::ENOSPC) => "the sysctl user.max_user_namespaces is 0 or used up",
                    Some(libc::EPERM) | Some(libc::EACCES) =>
                        "turned off by the sysctl kernel.unprivileged_userns_clone, by AppArmor's \
                         kernel.apparmor_restrict_unprivileged_userns, or by a seccomp policy",
                    _ => "see user_namespaces(7)",
                }
            ),
            None => format!(
                "{e}: not root, and this kernel does not let a user namespace mount overlay \
                 (Linux 5.11 and later do); run as root"
            ),
        },
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{e}: root without the right to mount (a container without CAP_SYS_ADMIN, \
             or a security policy); give gantry a mount namespace of its own"
        ),
        Some(libc::ENODEV) => format!("{e}: this kernel has no overlay file system (modprobe overlay)"),
        Some(libc::EINVAL) => {
            format!("{e}: the store's file system cannot hold overlay layers (put the store on ext4, xfs or btrfs)")
        }
        _ => e.to_string(),
    }
}

/// The kernel and the store's file system, for the fallback line.
fn where_it_ran(root: &Path) -> String {
    let release = rustix::system::uname().release().to_string_lossy().into_owned();
    let fs = match rustix::fs::statfs(root).map(|s| s.f_type as u64) {
        Ok(0xEF53) => "ext4".to_string(),
        Ok(0x5846_5342) => "xfs".into(),
        Ok(0x9123_683E) => "btrfs".into(),
        Ok(0x0102_1994) => "tmpfs".into(),
        Ok(0x794C_7630) => "overlay".into(),
        Ok(0x2FC1_2FC1) => "zfs".into(),
        Ok(0x6969) => "nfs".into(),
        Ok(other) => format!("file system type {other:#x}"),
        Err(_) => "an unknown file system".into(),
    };
    format!("Linux {release}, the store on {fs}")
}

use std::os::unix::fs::DirBuilderExt;
