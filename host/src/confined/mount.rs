//! Overlay mounts a driver asks for, made by the host from directory handles.
//!
//! A driver never hands the kernel a path or an option string. The host
//! opens every directory itself beneath the driver's home (the target and
//! upper without following any link, lowers following links only while they
//! stay in the home, as `l/<short id>` links do), then builds the mount with
//! the new mount API from those handles (`fsconfig` with `lowerdir+`,
//! `upperdir`, `workdir` given as file descriptors). So there is no option
//! string to overflow a page (Docker's reason for relative paths and a
//! chdir'd helper process) and no path a driver could swap between the check
//! and the mount. Every mount is `nosuid,nodev`, read-only without an upper.
//!
//! Kernels before 6.13 take no layer by descriptor. There the host makes the
//! classic `mount(2)` whose options name each handle it opened as
//! `/proc/self/fd/N` (the kernel resolves such a name to the very directory
//! the handle holds, so nothing can be swapped in either) and the target
//! likewise; the one cost is a page of options, about 200 layers (Docker
//! stops at 125). Not `fsconfig` with string options (Linux 5.2): it caps a
//! value at 256 bytes, a dozen layers. The first mount of a process tries
//! descriptors and keeps to whichever way the kernel took.
//!
//! Mounts are counted per target: the first user mounts, the last one's
//! `unmount` unmounts. What a process leaves mounted when it ends (a crash,
//! a kill) is unmounted by the next process alone on the store
//! ([`clear_stale_mounts`]), and by this table's `Drop` otherwise.

use super::{components, invalid, open_dir_beneath};
use gantry_core::ownership::Ownership;
use rustix::fs::{AtFlags, StatxFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

/// Overlayfs refuses more lower layers than this.
pub const MAX_LOWERS: usize = 500;

/// `statfs`'s `f_type` of an overlay mount.
const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;

/// How a mount hands the kernel its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LayerPassing {
    /// `fsconfig` with `lowerdir+` given file descriptors (Linux 6.13).
    Fds = 0,
    /// `mount(2)` whose options name `/proc/self/fd/N` (any kernel with
    /// overlay; its option string is one page).
    ProcPaths = 1,
}

/// The process's way of passing layers: descriptors until the kernel
/// refuses them, or what `GANTRY_OVERLAY_LAYERS` (`fds`, `proc-paths`)
/// forces (the tests run the overlay2 suite both ways).
static PASSING: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// See [`PASSING`].
pub fn layer_passing() -> LayerPassing {
    use std::sync::atomic::Ordering::Relaxed;
    match PASSING.load(Relaxed) {
        0 => LayerPassing::Fds,
        1 => LayerPassing::ProcPaths,
        _ => {
            let forced = std::env::var("GANTRY_OVERLAY_LAYERS").ok();
            let p = match forced.as_deref() {
                Some("proc-paths") => LayerPassing::ProcPaths,
                _ => LayerPassing::Fds,
            };
            PASSING.store(p as u8, Relaxed);
            p
        }
    }
}

/// What a driver asked to mount; paths relative to its home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlaySpec {
    pub target: String,
    pub lowers: Vec<String>,
    pub upper: Option<String>,
    pub work: Option<String>,
}

struct Entry {
    spec: OverlaySpec,
    users: usize,
    mnt_id: u64,
}

/// The mounts one home made, by target.
#[derive(Default)]
pub struct Mounts {
    table: Mutex<HashMap<String, Entry>>,
}

fn denied(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg.into())
}

fn mnt_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?.stx_mnt_id)
}

/// A driver path in one spelling (`a/./b/` is `a/b`), so one target is one key.
fn canonical(rel: &str) -> io::Result<String> {
    Ok(components(rel)?.join("/"))
}

impl OverlaySpec {
    /// The spec with every path in one spelling ([`canonical`]), refused if
    /// it mounts over the home itself.
    fn canonical(&self) -> io::Result<OverlaySpec> {
        let target = canonical(&self.target)?;
        if target.is_empty() {
            return Err(denied("a mount over the driver's home is not allowed"));
        }
        Ok(OverlaySpec {
            target,
            lowers: self.lowers.iter().map(|l| canonical(l)).collect::<io::Result<_>>()?,
            upper: self.upper.as_deref().map(canonical).transpose()?,
            work: self.work.as_deref().map(canonical).transpose()?,
        })
    }

    /// Refuses a spec overlayfs would: too few or too many lowers, or an
    /// upper without a work directory (or the other way round).
    fn check_shape(&self) -> io::Result<()> {
        let least = if self.upper.is_some() { 1 } else { 2 };
        if self.lowers.len() < least || self.lowers.len() > MAX_LOWERS {
            return Err(invalid(format!(
                "an overlay mount takes {least} to {MAX_LOWERS} lower directories (2 without an upper), not {}",
                self.lowers.len()
            )));
        }
        if self.upper.is_some() != self.work.is_some() {
            return Err(invalid("an upper directory needs a work directory, and only then"));
        }
        Ok(())
    }
}

/// The directories of one mount, opened by the host.
struct OverlayDirs {
    target: OwnedFd,
    lowers: Vec<OwnedFd>,
    upper: Option<OwnedFd>,
    work: Option<OwnedFd>,
}

impl OverlayDirs {
    /// Opens `spec`'s directories beneath `home`: the target, upper and
    /// work without following any link, lowers following links that stay
    /// in the home. Every one lives on the home's own mount: never inside
    /// a mount made earlier (no stacking, no overlay of an overlay).
    fn open(home: BorrowedFd<'_>, spec: &OverlaySpec) -> io::Result<OverlayDirs> {
        let home_mnt = mnt_id(home)?;
        let open = |rel: &str, follow: bool| -> io::Result<OwnedFd> {
            let fd = open_dir_beneath(home, &components(rel)?, follow)?;
            if rel.is_empty() || mnt_id(fd.as_fd())? != home_mnt {
                return Err(denied(format!("{rel:?} is not a directory of the driver's home")));
            }
            Ok(fd)
        };
        Ok(OverlayDirs {
            target: open(&spec.target, false)?,
            lowers: spec
                .lowers
                .iter()
                .map(|l| open(l, true))
                .collect::<io::Result<Vec<_>>>()?,
            upper: spec.upper.as_deref().map(|u| open(u, false)).transpose()?,
            work: spec.work.as_deref().map(|w| open(w, false)).transpose()?,
        })
    }

    /// Makes the overlay mount (`nosuid,nodev`, read-only without an
    /// upper) and attaches it at the target, the way this kernel takes
    /// layers ([`LayerPassing`]); the mount's root, to learn its id.
    fn mount(&self, home: BorrowedFd<'_>, target: &str, passing: LayerPassing) -> io::Result<OwnedFd> {
        match passing {
            LayerPassing::ProcPaths => self.mount_by_proc_paths(home, target),
            LayerPassing::Fds => match self.mount_by_fds(target) {
                // `lowerdir+` by descriptor is new in Linux 6.13: older
                // kernels refuse it (6.1 with EOPNOTSUPP, as no parameter
                // may be a descriptor there; others with EINVAL), and every
                // later mount of this process takes the other way.
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported)
                        && e.to_string().contains(": lowerdir:") =>
                {
                    PASSING.store(LayerPassing::ProcPaths as u8, std::sync::atomic::Ordering::Relaxed);
                    self.mount_by_proc_paths(home, target)
                }
                r => r,
            },
        }
    }

    /// The classic `mount(2)` for kernels before 6.13: its option string
    /// names each directory the host opened as `/proc/self/fd/N`, which the
    /// kernel resolves to that very directory (no path a driver could swap
    /// in between), and the target likewise. The string must fit a page.
    fn mount_by_proc_paths(&self, home: BorrowedFd<'_>, target: &str) -> io::Result<OwnedFd> {
        let fd_path = |fd: &OwnedFd| format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut data = format!(
            "lowerdir={}",
            self.lowers.iter().map(fd_path).collect::<Vec<_>>().join(":")
        );
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            data.push_str(&format!(",upperdir={},workdir={}", fd_path(u), fd_path(w)));
        }
        data.push_str(",index=off");
        if Ownership::of_process() == Ownership::Recorded {
            data.push_str(",userxattr");
        }
        let page = rustix::param::page_size();
        if data.len() >= page {
            return Err(invalid(format!(
                "an overlay mount of {} layers needs {} bytes of options, over this kernel's {page} \
                 (Linux 6.13 takes any number up to {MAX_LOWERS})",
                self.lowers.len(),
                data.len()
            )));
        }
        let mut flags = rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV;
        if self.upper.is_none() {
            flags |= rustix::mount::MountFlags::RDONLY;
        }
        let data = std::ffi::CString::new(data).map_err(|_| invalid("a NUL in overlay options"))?;
        rustix::mount::mount(
            "overlay",
            fd_path(&self.target).as_str(),
            "overlay",
            flags,
            data.as_c_str(),
        )
        .map_err(|e| refused(e, format!("overlay mount at {target:?}: {e}")))?;
        // The mount's root, reached by name beneath the home: it must be
        // the overlay just made on the target the host opened.
        let root = open_dir_beneath(home, &components(target)?, false)?;
        let fs = rustix::fs::fstatfs(&root)?;
        if fs.f_type as u64 != OVERLAYFS_SUPER_MAGIC || mnt_id(root.as_fd())? == mnt_id(self.target.as_fd())? {
            return Err(denied(format!("{target:?} is not the overlay mount just made")));
        }
        Ok(root)
    }

    /// The new mount API with every layer as a file descriptor (Linux 6.13).
    fn mount_by_fds(&self, target: &str) -> io::Result<OwnedFd> {
        let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|e| refused(e, format!("overlay mount at {target:?}: fsopen: {e}")))?;
        let mount_err =
            |what: &str, e: rustix::io::Errno| refused(e, format!("overlay mount at {target:?}: {what}: {e}"));
        rustix::mount::fsconfig_set_string(&fs, "source", "overlay").map_err(|e| mount_err("source", e))?;
        for l in &self.lowers {
            rustix::mount::fsconfig_set_fd(&fs, "lowerdir+", l).map_err(|e| mount_err("lowerdir", e))?;
        }
        if let (Some(u), Some(w)) = (&self.upper, &self.work) {
            rustix::mount::fsconfig_set_fd(&fs, "upperdir", u).map_err(|e| mount_err("upperdir", e))?;
            rustix::mount::fsconfig_set_fd(&fs, "workdir", w).map_err(|e| mount_err("workdir", e))?;
        }
        // Layers are shared between images: no index binding them to one mount.
        rustix::mount::fsconfig_set_string(&fs, "index", "off").map_err(|e| mount_err("index", e))?;
        if Ownership::of_process() == Ownership::Recorded {
            // In gantry's user namespace (without root): overlay's own
            // attributes in `user.overlay.*`, the only ones it may write.
            rustix::mount::fsconfig_set_flag(&fs, "userxattr").map_err(|e| mount_err("userxattr", e))?;
        }
        rustix::mount::fsconfig_create(&fs).map_err(|e| mount_err("create", e))?;
        let mut attrs = MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV;
        if self.upper.is_none() {
            attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
        }
        let mnt =
            rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| mount_err("fsmount", e))?;
        rustix::mount::move_mount(
            &mnt,
            "",
            &self.target,
            "",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| mount_err("attaching", e))?;
        Ok(mnt)
    }
}

/// A mount the kernel refused: its message says where, and the error
/// keeps the kernel's errno for [`errno_of`].
#[derive(Debug)]
struct Refused {
    errno: i32,
    text: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for Refused {}

fn refused(e: rustix::io::Errno, text: String) -> io::Error {
    io::Error::new(
        io::Error::from(e).kind(),
        Refused {
            errno: e.raw_os_error(),
            text,
        },
    )
}

/// The kernel's errno behind `e`: its own, or that of a refused mount.
pub fn errno_of(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
        .or_else(|| e.get_ref()?.downcast_ref::<Refused>().map(|r| r.errno))
}

impl Mounts {
    /// Mounts `spec` beneath `home` (or adds a user to the same mount).
    pub fn mount_overlay(&self, home: BorrowedFd<'_>, spec: &OverlaySpec) -> io::Result<()> {
        let spec = spec.canonical()?;
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = table.get_mut(&spec.target) {
            if e.spec != spec {
                return Err(denied(format!(
                    "{:?} is already mounted with other directories",
                    spec.target
                )));
            }
            e.users += 1;
            return Ok(());
        }
        spec.check_shape()?;
        let mnt = OverlayDirs::open(home, &spec)?.mount(home, &spec.target, layer_passing())?;
        let id = mnt_id(mnt.as_fd())?;
        table.insert(
            spec.target.clone(),
            Entry {
                spec,
                users: 1,
                mnt_id: id,
            },
        );
        Ok(())
    }

    /// Lets go of one user of the mount at `target`.
    pub fn unmount(&self, home: BorrowedFd<'_>, target: &str) -> io::Result<()> {
        let target = canonical(target)?;
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = table.get_mut(&target) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("nothing is mounted at {target:?} by this driver"),
            ));
        };
        if e.users > 1 {
            e.users -= 1;
            return Ok(());
        }
        let id = e.mnt_id;
        table.remove(&target);
        detach(home, &target, id)
    }

    /// Whether a mount of this table is at or below `rel`.
    pub fn any_beneath(&self, rel: &str) -> io::Result<bool> {
        let rel = canonical(rel)?;
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        Ok(table
            .keys()
            .any(|t| rel.is_empty() || t == &rel || t.starts_with(&format!("{rel}/"))))
    }

    /// Unmounts everything still mounted (deepest first).
    pub fn clear(&self, home: BorrowedFd<'_>) {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<(String, u64)> = table.drain().map(|(t, e)| (t, e.mnt_id)).collect();
        all.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        for (t, id) in all {
            let _ = detach(home, &t, id);
        }
    }
}

/// Unmounts the mount `id` at `rel` beneath `home`: the target is opened
/// without links and must be that mount's root, so a driver that swapped a
/// directory for a link cannot make the host unmount anything else.
fn detach(home: BorrowedFd<'_>, rel: &str, id: u64) -> io::Result<()> {
    let fd = open_dir_beneath(home, &components(rel)?, false)?;
    if mnt_id(fd.as_fd())? != id {
        return Err(denied(format!("{rel:?} is no longer the mount this driver made")));
    }
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::mount::unmount(path.as_str(), UnmountFlags::DETACH)?)
}

/// Unmounts whatever is mounted beneath `home` (a directory this process
/// owns): mounts a process that ended without unmounting left behind. Call
/// only when no other process uses the store.
pub fn clear_stale_mounts(home: &Path) -> io::Result<usize> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let Ok(home) = home.canonicalize() else {
        return Ok(0);
    };
    let prefix = format!("{}/", home.display());
    let mut found: Vec<(String, u64)> = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let (Some(id), Some(point)) = (f.first(), f.get(4)) else {
            continue;
        };
        let point = unescape_mountinfo(point);
        if let (Some(rel), Ok(id)) = (point.strip_prefix(&prefix), id.parse::<u64>()) {
            found.push((rel.to_string(), id));
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let home_fd = rustix::fs::open(&home, super::DIR_FLAGS, rustix::fs::Mode::empty())?;
    found.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
    let mut n = 0;
    for (rel, _) in found {
        // Stacked mounts show one line each: take the top one until none is left.
        while let Ok(fd) = open_dir_beneath(home_fd.as_fd(), &components(&rel)?, false) {
            let id = mnt_id(fd.as_fd())?;
            if id == mnt_id(home_fd.as_fd())? || detach(home_fd.as_fd(), &rel, id).is_err() {
                break;
            }
            n += 1;
        }
    }
    Ok(n)
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether this process can make an overlay mount the way the overlay2
/// driver does, in a scratch directory under `dir`: root (or
/// `CAP_SYS_ADMIN`), an overlay-capable kernel with layers given as file
/// descriptors (Linux 6.13), and a backing filesystem overlay accepts as an
/// upper layer. The error says which.
pub fn probe_overlay(dir: &Path) -> io::Result<()> {
    let scratch = tempfile::Builder::new().prefix(".overlay-probe-").tempdir_in(dir)?;
    for d in ["lower1", "lower2", "upper", "work", "merged"] {
        std::fs::create_dir(scratch.path().join(d))?;
    }
    std::fs::write(scratch.path().join("lower2/f"), b"")?;
    let home = rustix::fs::open(scratch.path(), super::DIR_FLAGS, rustix::fs::Mode::empty())?;
    let mounts = Mounts::default();
    let spec = OverlaySpec {
        target: "merged".into(),
        lowers: vec!["lower1".into(), "lower2".into()],
        upper: Some("upper".into()),
        work: Some("work".into()),
    };
    mounts.mount_overlay(home.as_fd(), &spec)?;
    let seen = scratch.path().join("merged/f").exists();
    mounts.unmount(home.as_fd(), "merged")?;
    if !seen {
        return Err(io::Error::other("an overlay mount did not show its lower layer"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of passing layers make the same read-only overlay, and
    /// the classic one names only the descriptors the host opened.
    #[test]
    fn both_ways_of_passing_layers_mount_the_same_tree() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        for d in ["lower1", "lower2", "merged"] {
            std::fs::create_dir(t.path().join(d)).unwrap();
        }
        std::fs::write(t.path().join("lower1/top"), b"1").unwrap();
        std::fs::write(t.path().join("lower2/bottom"), b"2").unwrap();
        let home = rustix::fs::open(t.path(), super::super::DIR_FLAGS, rustix::fs::Mode::empty()).unwrap();
        let spec = OverlaySpec {
            target: "merged".into(),
            lowers: vec!["lower1".into(), "lower2".into()],
            upper: None,
            work: None,
        };
        for passing in [LayerPassing::Fds, LayerPassing::ProcPaths] {
            let dirs = OverlayDirs::open(home.as_fd(), &spec).unwrap();
            let mnt = match dirs.mount(home.as_fd(), "merged", passing) {
                Err(e)
                    if passing == LayerPassing::Fds
                        && matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) =>
                {
                    eprintln!("this kernel takes no layers by descriptor: {e}");
                    continue;
                }
                r => r.unwrap(),
            };
            let id = mnt_id(mnt.as_fd()).unwrap();
            let merged = t.path().join("merged");
            assert_eq!(std::fs::read(merged.join("top")).unwrap(), b"1", "{passing:?}");
            assert_eq!(std::fs::read(merged.join("bottom")).unwrap(), b"2", "{passing:?}");
            assert!(
                std::fs::write(merged.join("new"), b"x").is_err(),
                "{passing:?}: not read-only"
            );
            let line = std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .find(|l| l.split(' ').next() == Some(&id.to_string()))
                .unwrap()
                .to_string();
            assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
            assert_eq!(
                line.contains("lowerdir=/proc/self/fd/"),
                passing == LayerPassing::ProcPaths,
                "{line}"
            );
            drop(mnt);
            detach(home.as_fd(), "merged", id).unwrap();
        }
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
    }
}
