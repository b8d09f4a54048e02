//! Whole-tree operations on directory fds: remove, copy (keeping hard links,
//! owners, modes, xattrs, devices, times), and disk usage.

use super::open_dir_beneath;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// The names in a directory (bytes: Linux names need not be UTF-8), sorted.
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, FileType)>> {
    crate::plugin::check_deadline()?;
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push((OsStr::from_bytes(n).to_os_string(), e.file_type()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub(super) fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, FileType)>> {
    entries(dir)
}

/// Removes `name` in `parent` and, if it is a directory, all below it.
pub fn remove_tree(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let d = open_dir_beneath(parent, &[name], false)?;
        // Never into another filesystem: a mount point's contents are not the tree's.
        if rustix::fs::fstat(&d)?.st_dev != rustix::fs::fstat(parent)?.st_dev {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is a mount point", gantry_core::text::quote_bytes(name.as_bytes())),
            ));
        }
        for (n, _) in entries(d.as_fd())? {
            crate::plugin::check_deadline()?;
            remove_tree(d.as_fd(), &n)?;
        }
        rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?;
    } else {
        rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
    }
    Ok(())
}

/// Path of an entry for the `*xattr` calls that take one (links cannot be
/// opened for them).
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// Copies the extended attributes of `sname` in `sd` to `dname` in `dd`.
fn copy_xattrs(sd: BorrowedFd<'_>, sname: &OsStr, dd: BorrowedFd<'_>, dname: &OsStr) -> io::Result<()> {
    for (k, v) in read_xattrs(sd, sname)? {
        rustix::fs::lsetxattr(proc_path(dd, dname), k.as_str(), &v, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

pub(super) fn read_xattrs(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<(String, Vec<u8>)>> {
    let p = proc_path(dir, name);
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(&p, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for k in names[..n].split(|b| *b == 0).filter(|k| !k.is_empty()) {
        let k = String::from_utf8_lossy(k).into_owned();
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(&p, k.as_str(), &mut v[..])?;
        v.truncate(len);
        out.push((k, v));
    }
    Ok(out)
}

pub(super) fn set_times(dir: BorrowedFd<'_>, name: &OsStr, st: &rustix::fs::Stat) -> io::Result<()> {
    let ts = Timestamps {
        last_access: Timespec {
            tv_sec: st.st_atime as _,
            tv_nsec: st.st_atime_nsec as _,
        },
        last_modification: Timespec {
            tv_sec: st.st_mtime as _,
            tv_nsec: st.st_mtime_nsec as _,
        },
    };
    Ok(rustix::fs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// How [`copy_tree`] treats what is not a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Copy everything (a writable layer).
    Copy,
    /// Hard-link files, links and nodes to the source (a read-only layer:
    /// `unpack` replaces an entry, never edits one in place, so sharing the
    /// parent's inodes is safe and costs no data copy).
    Share,
}

/// Copies `src_name` in `src_parent` to `dst_name` in `dst_parent`, which
/// must not exist. Directories are always created anew, with the source's
/// owner, mode, xattrs and times; hard links within the tree stay hard links.
pub fn copy_tree(
    src_parent: BorrowedFd<'_>,
    src_name: &str,
    dst_parent: BorrowedFd<'_>,
    dst_name: &str,
    mode: CopyMode,
) -> io::Result<()> {
    let (src_name, dst_name) = (OsStr::new(src_name), OsStr::new(dst_name));
    let st = rustix::fs::statat(src_parent, src_name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Err(super::invalid(format!("{src_name:?} is not a directory")));
    }
    rustix::fs::mkdirat(dst_parent, dst_name, Mode::from_raw_mode(0o700))?;
    let s = open_dir_beneath(src_parent, &[src_name], false)?;
    let d = open_dir_beneath(dst_parent, &[dst_name], false)?;
    let mut c = Copier {
        dst_root: d.as_fd(),
        mode,
        links: HashMap::new(),
    };
    c.dir(s.as_fd(), d.as_fd(), OsStr::new(""))?;
    finish_meta(dst_parent, dst_name, src_parent, src_name, &st, true)
}

fn finish_meta(
    dd: BorrowedFd<'_>,
    name: &OsStr,
    sd: BorrowedFd<'_>,
    sname: &OsStr,
    st: &rustix::fs::Stat,
    chmod: bool,
) -> io::Result<()> {
    chown_nofollow(dd, name, st.st_uid, st.st_gid)?;
    if chmod {
        rustix::fs::chmodat(dd, name, Mode::from_raw_mode(st.st_mode & 0o7777), AtFlags::empty())?;
    }
    copy_xattrs(sd, sname, dd, name).or_else(ignore_eperm)?;
    set_times(dd, name, st)
}

/// Sets the owner of `name` in `dir` (never through a link); without root
/// an owner that cannot be set is let be ([`ignore_eperm`]).
pub(super) fn chown_nofollow(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .or_else(ignore_eperm)
}

/// Creates `name` in `dir` as a new regular file for writing: never an
/// existing file, never through a link.
pub(super) fn create_new(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?)
}

/// Owners and privileged xattrs cannot be set without root: keep going then.
pub(super) fn ignore_eperm(e: impl Into<io::Error>) -> io::Result<()> {
    let e = e.into();
    if e.raw_os_error() == Some(libc::EPERM)
        && gantry_core::ownership::Ownership::of_process() == gantry_core::ownership::Ownership::Recorded
    {
        Ok(())
    } else {
        Err(e)
    }
}

struct Copier<'r> {
    dst_root: BorrowedFd<'r>,
    mode: CopyMode,
    /// Inodes already copied, and where (relative to the destination root).
    links: HashMap<(u64, u64), OsString>,
}

impl Copier<'_> {
    fn dir(&mut self, s: BorrowedFd<'_>, d: BorrowedFd<'_>, prefix: &OsStr) -> io::Result<()> {
        for (name, _) in entries(s)? {
            crate::plugin::check_deadline()?;
            let name = name.as_os_str();
            let rel = super::join_rel(prefix, name);
            let st = rustix::fs::statat(s, name, AtFlags::SYMLINK_NOFOLLOW)?;
            let ft = FileType::from_raw_mode(st.st_mode);
            if ft == FileType::Directory {
                rustix::fs::mkdirat(d, name, Mode::from_raw_mode(0o700))?;
                let sc = open_dir_beneath(s, &[name], false)?;
                let dc = open_dir_beneath(d, &[name], false)?;
                self.dir(sc.as_fd(), dc.as_fd(), &rel)?;
                finish_meta(d, name, s, name, &st, true)?;
                continue;
            }
            if !matches!(
                ft,
                FileType::RegularFile
                    | FileType::Symlink
                    | FileType::CharacterDevice
                    | FileType::BlockDevice
                    | FileType::Fifo
            ) {
                continue; // sockets and unknown types are not layer content
            }
            if self.mode == CopyMode::Share {
                rustix::fs::linkat(s, name, d, name, AtFlags::empty())?;
                continue;
            }
            if st.st_nlink > 1 {
                if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)) {
                    let comps: Vec<&OsStr> = first.as_bytes().split(|b| *b == b'/').map(OsStr::from_bytes).collect();
                    let (fname, parents) = comps.split_last().expect("non-empty");
                    let fdir = open_dir_beneath(self.dst_root, parents, false)?;
                    rustix::fs::linkat(&fdir, *fname, d, name, AtFlags::empty())?;
                    continue;
                }
                self.links.insert((st.st_dev, st.st_ino), rel.clone());
            }
            match ft {
                FileType::RegularFile => {
                    let src = rustix::fs::openat(
                        s,
                        name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?;
                    let dst = create_new(d, name, 0o600)?;
                    copy_data(&src, &dst, st.st_size as u64)?;
                    drop(dst);
                    finish_meta(d, name, s, name, &st, true)?;
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(s, name, Vec::new())?;
                    rustix::fs::symlinkat(target.as_c_str(), d, name)?;
                    finish_meta(d, name, s, name, &st, false)?;
                }
                _ => {
                    rustix::fs::mknodat(d, name, ft, Mode::from_raw_mode(st.st_mode & 0o7777), st.st_rdev)?;
                    finish_meta(d, name, s, name, &st, true)?;
                }
            }
        }
        Ok(())
    }
}

/// Copies file contents in the kernel (reflink where the filesystem can,
/// `copy_file_range` otherwise).
fn copy_data(src: &OwnedFd, dst: &OwnedFd, size: u64) -> io::Result<()> {
    if size == 0 || rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut left = size;
    while left > 0 {
        let n = rustix::fs::copy_file_range(src, None, dst, None, left.min(1 << 30) as usize)?;
        if n == 0 {
            break;
        }
        left -= n as u64;
    }
    Ok(())
}

/// Bytes of regular files below `dir` (each hard-linked file once).
pub fn disk_usage(dir: BorrowedFd<'_>) -> io::Result<u64> {
    fn walk(d: BorrowedFd<'_>, seen: &mut std::collections::HashSet<(u64, u64)>) -> io::Result<u64> {
        let mut total = 0;
        for (name, _) in entries(d)? {
            crate::plugin::check_deadline()?;
            let st = rustix::fs::statat(d, &name, AtFlags::SYMLINK_NOFOLLOW)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    let c = open_dir_beneath(d, &[&name], false)?;
                    total += walk(c.as_fd(), seen)?;
                }
                FileType::RegularFile if seen.insert((st.st_dev, st.st_ino)) => total += st.st_size as u64,
                _ => {}
            }
        }
        Ok(total)
    }
    walk(dir, &mut Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_tree_keeps_the_top_directory_xattrs_under_its_new_name() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/src/sub")).unwrap();
        std::fs::create_dir_all(t.path().join("b")).unwrap();
        let src = t.path().join("a/src");
        if rustix::fs::setxattr(&src, "user.gantry", b"top", rustix::fs::XattrFlags::empty()).is_err() {
            eprintln!("skipped: this filesystem has no user xattrs");
            return;
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        let a = rustix::fs::open(t.path().join("a"), flags, Mode::empty()).unwrap();
        let b = rustix::fs::open(t.path().join("b"), flags, Mode::empty()).unwrap();
        for (mode, name) in [(CopyMode::Copy, "copied"), (CopyMode::Share, "shared")] {
            copy_tree(a.as_fd(), "src", b.as_fd(), name, mode).unwrap();
            let mut v = [0u8; 16];
            let n = rustix::fs::getxattr(t.path().join("b").join(name), "user.gantry", &mut v[..]).unwrap();
            assert_eq!(&v[..n], b"top", "{mode:?}");
            assert!(t.path().join("b").join(name).join("sub").is_dir());
        }
    }
}
