//! Confined file operations: everything the host does to layer contents on
//! behalf of a driver, done through directory file descriptors.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH)` beneath a root
//! fd, so neither `..`, an absolute name nor a symbolic link (written earlier
//! by the same layer or by an earlier one) can lead outside it. Driver-chosen
//! paths additionally refuse to follow any link at all. Raw path operations
//! (`std::fs` on joined paths) have no place here.

mod mount;
mod pack;
mod tree;
mod unpack;
pub mod userns;

pub use mount::{clear_stale_mounts, errno_of, probe_overlay, OverlaySpec, MAX_LOWERS};
pub use pack::{changes, pack, pack_changes, pack_upper, ChangeKind, PackReader};
pub use tree::{copy_tree, disk_usage, remove_tree, CopyMode};
pub use unpack::{unpack, Whiteouts};

use gantry_core::path::Unsafe;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// An `io::Error` for hostile or malformed input.
pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Splits a relative path into clean components, refusing absolute paths and
/// `..` (the core's rule for untrusted names).
pub fn components(rel: &str) -> io::Result<Vec<&str>> {
    gantry_core::path::components(rel).map_err(|e| match e {
        Unsafe::Absolute => invalid(format!("absolute path {rel:?} is not allowed")),
        Unsafe::Climbs => invalid(format!("path {rel:?} leaves its directory")),
    })
}

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// The components of a name that is bytes (names in a layer need not be
/// UTF-8), refusing absolute names and `..`.
pub fn components_os(rel: &[u8]) -> io::Result<Vec<&OsStr>> {
    let shown = gantry_core::text::quote_bytes(rel);
    match gantry_core::path::components_bytes(rel) {
        Ok(c) => Ok(c.into_iter().map(OsStr::from_bytes).collect()),
        Err(Unsafe::Absolute) => Err(invalid(format!("absolute path {shown} is not allowed"))),
        Err(Unsafe::Climbs) => Err(invalid(format!("path {shown} leaves its directory"))),
    }
}

/// `prefix/name`, or `name` at the top.
pub(crate) fn join_rel(prefix: &OsStr, name: &OsStr) -> OsString {
    if prefix.is_empty() {
        return name.to_os_string();
    }
    let mut out = prefix.to_os_string();
    out.push("/");
    out.push(name);
    out
}

/// Components joined with `/` (`.` for none).
fn joined<S: AsRef<OsStr>>(rel: &[S]) -> Vec<u8> {
    if rel.is_empty() {
        return b".".to_vec();
    }
    let parts: Vec<&[u8]> = rel.iter().map(|c| c.as_ref().as_bytes()).collect();
    parts.join(&b'/')
}

/// Opens directory `rel` beneath `root`. With `follow`, links inside the
/// tree are followed as long as they stay beneath it; without, any link fails.
pub fn open_dir_beneath<S: AsRef<OsStr>>(root: BorrowedFd<'_>, rel: &[S], follow: bool) -> io::Result<OwnedFd> {
    let path = joined(rel);
    let mut how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    if !follow {
        how |= ResolveFlags::NO_SYMLINKS;
    }
    rustix::fs::openat2(root, path.as_slice(), DIR_FLAGS, Mode::empty(), how).map_err(|e| {
        let e = io::Error::from(e);
        let shown = gantry_core::text::quote_bytes(&path);
        match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) if follow => {
                invalid(format!("path {shown} passes through a link that leaves its directory"))
            }
            Some(libc::EXDEV) | Some(libc::ELOOP) => invalid(format!("path {shown} passes through a link")),
            Some(libc::ENOTDIR) => invalid(format!("path {shown} is not a directory")),
            _ => e,
        }
    })
}

/// A driver's home: the only directory it may touch.
pub struct Home {
    fd: OwnedFd,
    /// The overlay mounts made for this home's driver.
    mounts: mount::Mounts,
}

impl Drop for Home {
    fn drop(&mut self) {
        self.mounts.clear(self.fd.as_fd());
    }
}

impl Home {
    /// Opens (creating, 0700) the home at `path`.
    pub fn open(path: &Path) -> io::Result<Home> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Home {
            fd,
            mounts: mount::Mounts::default(),
        })
    }

    /// Mounts an overlay the driver asked for (see [`mount`](self::mount)).
    pub fn mount_overlay(&self, spec: &OverlaySpec) -> io::Result<()> {
        self.mounts.mount_overlay(self.fd(), spec)
    }

    /// Lets go of one user of the mount at `target`.
    pub fn unmount(&self, target: &str) -> io::Result<()> {
        self.mounts.unmount(self.fd(), target)
    }

    /// Refuses to touch `rel` while one of this home's mounts is beneath it.
    fn check_unmounted(&self, rel: &str) -> io::Result<()> {
        if self.mounts.any_beneath(rel)? {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{rel:?} holds a mount; unmount it first"),
            ));
        }
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens directory `rel` without following links.
    pub fn dir(&self, rel: &str) -> io::Result<OwnedFd> {
        open_dir_beneath(self.fd(), &components(rel)?, false)
    }

    /// The parent directory of `rel` and its last component.
    pub fn parent<'a>(&self, rel: &'a str) -> io::Result<(OwnedFd, &'a str)> {
        let c = components(rel)?;
        let (name, parents) = c.split_last().ok_or_else(|| invalid("empty path"))?;
        Ok((open_dir_beneath(self.fd(), parents, false)?, name))
    }

    pub fn mkdir_all(&self, rel: &str, mode: u32) -> io::Result<()> {
        let mut cur = rustix::fs::openat(self.fd(), ".", DIR_FLAGS, Mode::empty())?;
        for c in components(rel)? {
            match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = open_dir_beneath(cur.as_fd(), &[c], false)?;
        }
        Ok(())
    }

    pub fn remove_all(&self, rel: &str) -> io::Result<()> {
        self.check_unmounted(rel)?;
        let (parent, name) = self.parent(rel)?;
        match remove_tree(parent.as_fd(), OsStr::new(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    pub fn exists(&self, rel: &str) -> io::Result<bool> {
        let c = components(rel)?;
        let Some((name, parents)) = c.split_last() else {
            return Ok(true);
        };
        let parent = match open_dir_beneath(self.fd(), parents, false) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&parent, *name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub fn rename(&self, src: &str, dst: &str) -> io::Result<()> {
        self.check_unmounted(src)?;
        self.check_unmounted(dst)?;
        let (sp, sn) = self.parent(src)?;
        let (dp, dn) = self.parent(dst)?;
        Ok(rustix::fs::renameat(&sp, sn, &dp, dn)?)
    }

    /// Reads regular file `rel` (never a device, FIFO, socket or link).
    pub fn read_file(&self, rel: &str, limit: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let (p, n) = self.parent(rel)?;
        let f = gantry_core::path::open_regular_beneath(p.as_fd(), n.as_bytes())?;
        let mut out = Vec::new();
        f.take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(invalid(format!("{rel:?} is larger than {limit} bytes")));
        }
        Ok(out)
    }

    /// Replaces `rel` with a new regular file holding `data`: written to a
    /// fresh name beside it and renamed over it, so whatever was there (a
    /// device node, a FIFO, an inode shared with a parent layer) is never
    /// opened, let alone truncated.
    pub fn write_file(&self, rel: &str, data: &[u8], mode: u32) -> io::Result<()> {
        use std::io::Write;
        let (p, n) = self.parent(rel)?;
        let tmp = format!(".gantry-write-{}", &gantry_core::store::random_id()[..16]);
        let fd = tree::create_new(p.as_fd(), OsStr::new(&tmp), mode)?;
        let res = std::fs::File::from(fd)
            .write_all(data)
            .and_then(|()| Ok(rustix::fs::renameat(&p, tmp.as_str(), &p, n)?));
        if res.is_err() {
            let _ = rustix::fs::unlinkat(&p, tmp.as_str(), AtFlags::empty());
        }
        res
    }

    pub fn list_dir(&self, rel: &str) -> io::Result<Vec<String>> {
        let d = self.dir(rel)?;
        let mut out = Vec::new();
        for e in rustix::fs::Dir::read_from(&d)? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n != "." && n != ".." {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn symlink(&self, target: &str, rel: &str) -> io::Result<()> {
        let (p, n) = self.parent(rel)?;
        Ok(rustix::fs::symlinkat(target, &p, n)?)
    }

    // The fast paths of the `fs` capability, one implementation for
    // components (`plugin::host_impls`) and native plugins (`plugin::native`).

    /// Copies tree `src` to `dst` (which must not exist), or shares its files by hard link.
    pub fn copy_tree(&self, src: &str, dst: &str, mode: CopyMode) -> io::Result<()> {
        let (sp, sn) = self.parent(src)?;
        let (dp, dn) = self.parent(dst)?;
        copy_tree(sp.as_fd(), sn, dp.as_fd(), dn, mode)
    }

    /// What changed from `lower` to `upper`, each path as the driver
    /// contract shows it: `/` and the name (lossy where it is not UTF-8).
    pub fn changes(&self, lower: &str, upper: &str) -> io::Result<Vec<(String, ChangeKind)>> {
        let (l, u) = (self.dir(lower)?, self.dir(upper)?);
        Ok(changes(l.as_fd(), u.as_fd())?
            .into_iter()
            .map(|c| (format!("/{}", c.path.to_string_lossy()), c.kind))
            .collect())
    }

    /// The bytes of regular files below `dir`, hard links counted once.
    pub fn disk_usage(&self, dir: &str) -> io::Result<u64> {
        disk_usage(self.dir(dir)?.as_fd())
    }

    /// Unpacks the tar stream `diff` into `dir`.
    pub fn unpack(&self, dir: &str, diff: impl io::Read, mode: Whiteouts) -> io::Result<u64> {
        unpack(self.dir(dir)?.as_fd(), diff, mode)
    }

    /// `dir` as a tar stream.
    pub fn pack(&self, dir: &str) -> io::Result<PackReader> {
        pack(self.dir(dir)?)
    }

    /// An overlay upper directory as a layer tar.
    pub fn pack_upper(&self, dir: &str) -> io::Result<PackReader> {
        pack_upper(self.dir(dir)?)
    }

    /// What changed from `lower` to `upper` as a layer tar.
    pub fn pack_changes(&self, lower: &str, upper: &str) -> io::Result<PackReader> {
        pack_changes(self.dir(lower)?, self.dir(upper)?)
    }
}

/// Reads up to `len` bytes (at most 1 MiB) from a host-owned stream, as a
/// plugin's `read` of it does; empty at the end.
pub fn read_chunk(stream: &mut dyn io::Read, len: u32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let n = loop {
        match stream.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    buf.truncate(n);
    Ok(buf)
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::open(&t.path().join("home")).unwrap();
        assert!(home.mkdir_all("../out", 0o700).is_err());
        assert!(home.mkdir_all("/abs", 0o700).is_err());
        std::os::unix::fs::symlink("/", t.path().join("home/link")).unwrap();
        assert!(home.mkdir_all("link/x", 0o700).is_err());
        assert!(home.read_file("link/etc/passwd", 1024).is_err());
        assert!(!t.path().join("out").exists());
        home.mkdir_all("a/b", 0o700).unwrap();
        assert!(home.exists("a/b").unwrap());
        home.remove_all("a").unwrap();
        assert!(!home.exists("a").unwrap());
    }
}
