//! Native unpacking of a tar layer into a directory, with whiteouts.
//!
//! `tar` is used to parse only; every effect is a `*at` call on a directory
//! fd opened beneath the layer root without following any link, so an entry
//! with `..`, an absolute name, or a path through a symbolic link (written
//! by this layer or an earlier one) is refused, and a hard link can only
//! point at a file inside the root. The core refuses all of these before a
//! driver sees them (`gantry_core::layer_rules`); this is the backstop.

use super::tree::{ignore_eperm, list, proc_path, remove_tree};
use super::{components_os, invalid, open_dir_beneath};
use gantry_core::text::quote_bytes;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use std::ffi::OsStr;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

/// How whiteout entries are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Delete what they name (each layer is a full copy, as in vfs).
    Delete,
    /// Write overlayfs whiteouts: a 0/0 character device, or the
    /// `trusted.overlay.opaque` attribute for an opaque directory.
    Overlay,
}

const WH_PREFIX: &str = ".wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";

/// Extended attributes namespaces that belong to overlayfs: set from a tar
/// they could redirect lookups into other layers or fake whiteouts, so a
/// layer carrying one is refused.
const OVERLAY_XATTRS: &[&str] = &["trusted.overlay.", "user.overlay."];

/// The `SCHILY.xattr.*` attributes of an entry, refusing overlay's own.
fn layer_xattrs<R: Read>(e: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = e.pax_extensions().map_err(as_invalid)? {
        for x in exts {
            let x = x.map_err(as_invalid)?;
            let Ok(k) = x.key() else { continue };
            if let Some(k) = k.strip_prefix("SCHILY.xattr.") {
                if OVERLAY_XATTRS.iter().any(|p| k.starts_with(p)) {
                    return Err(invalid(format!(
                        "it carries the overlay attribute {k:?}, which only a driver may set"
                    )));
                }
                out.push((k.to_string(), x.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Unpacks the tar stream `r` into the directory `root`. Returns the size of
/// the content written (regular file bytes), as Docker reports a layer size.
pub fn unpack(root: BorrowedFd<'_>, r: impl Read, mode: Whiteouts) -> io::Result<u64> {
    // 64 KiB: a reader without `read_buf` has its buffer zeroed on the first
    // fill, so a bigger one costs every small layer; file contents bypass it.
    let mut ar = tar::Archive::new(BufReader::with_capacity(64 << 10, r));
    let mut written = Written::default();
    let mut dir_times = DirTimes::default();
    let mut size = 0u64;
    // Grown to the largest file seen (at most 1 MiB): a layer of small
    // files does not pay for zeroing a big buffer.
    let mut buf: Vec<u8> = Vec::new();
    let euid_root = rustix::process::geteuid().is_root();
    // The last entry's parent directory: tar entries come a directory at a
    // time, so most need no lookup. Forgotten whenever anything is removed
    // (that could be this directory or one above it).
    let mut last_parent: Option<(Vec<u8>, std::os::fd::OwnedFd)> = None;
    for entry in ar.entries()? {
        crate::plugin::check_deadline()?;
        let mut e = entry.map_err(as_invalid)?;
        let raw = e.path_bytes().into_owned();
        let path = quote_bytes(&raw);
        let comps = components_os(&raw).map_err(|err| invalid(format!("tar entry {path}: {err}")))?;
        let Some((name, parents)) = comps.split_last() else {
            continue; // the root itself
        };
        let name: &OsStr = name;
        let clean: Vec<u8> = comps.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
        let etype = e.header().entry_type();
        if matches!(etype, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let parent_key = &clean[..clean.len() - name.len()];
        let parent = match last_parent.take() {
            Some((key, fd)) if key == parent_key => fd,
            _ => parent_dir(root, parents).map_err(|err| invalid(format!("tar entry {path}: {err}")))?,
        };
        let pd = parent.as_fd();
        if let Some(target) = name.as_bytes().strip_prefix(WH_PREFIX.as_bytes()) {
            apply_whiteout(pd, parents, OsStr::from_bytes(target), mode, &mut written)
                .map_err(|err| io::Error::new(err.kind(), format!("whiteout {path}: {err}")))?;
            continue;
        }
        let hdr = e.header().clone();
        let perm = hdr.mode().map_err(as_invalid)? & 0o7777;
        let uid = hdr.uid().map_err(as_invalid)?;
        let gid = hdr.gid().map_err(as_invalid)?;
        let mtime = hdr.mtime().map_err(as_invalid)?;
        let is_dir = etype.is_dir();
        let xattrs = layer_xattrs(&mut e).map_err(|err| invalid(format!("tar entry {path}: {err}")))?;
        let mut removed = false;
        match rustix::fs::statat(pd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if is_dir && FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(_) => {
                remove_tree(pd, name)?;
                removed = true;
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(err) => return Err(err.into()),
        }
        match etype {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(pd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(err) => return Err(err.into()),
                }
                dir_times.push((clean.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let fd = rustix::fs::openat(
                    pd,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                let mut f = std::fs::File::from(fd);
                let want = e.size().clamp(1, 1 << 20) as usize;
                if buf.len() < want {
                    buf.resize(want, 0);
                }
                loop {
                    crate::plugin::check_deadline()?;
                    let n = e.read(&mut buf).map_err(as_invalid)?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n])?;
                    size += n as u64;
                }
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| invalid(format!("symlink {path} has no target")))?
                    .into_owned();
                rustix::fs::symlinkat(target.as_slice(), pd, name)?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| invalid(format!("hard link {path} has no target")))?
                    .into_owned();
                let shown = quote_bytes(&target);
                let tc =
                    components_os(&target).map_err(|err| invalid(format!("hard link {path} -> {shown}: {err}")))?;
                let (tname, tparents) = tc
                    .split_last()
                    .ok_or_else(|| invalid(format!("hard link {path} has an empty target")))?;
                let tdir = open_dir_beneath(root, tparents, false)
                    .map_err(|err| invalid(format!("hard link {path} -> {shown}: {err}")))?;
                rustix::fs::linkat(&tdir, *tname, pd, name, AtFlags::empty()).map_err(|err| {
                    io::Error::new(
                        io::Error::from(err).kind(),
                        format!("hard link {path} -> {shown}: {err}"),
                    )
                })?;
                let target_clean: Vec<u8> = tc.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
                if !written.contains(&target_clean) {
                    // A file of an earlier layer (a vfs layer shares its
                    // parent's inodes): its metadata is not this layer's to change.
                    written.insert(&clean);
                    continue;
                }
                // As Docker and containers/storage apply it: the link's own
                // header sets the owner, mode, attributes and time of the
                // inode it shares with its target.
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let ft = match etype {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = if ft == FileType::Fifo {
                    rustix::fs::makedev(0, 0)
                } else {
                    let major = hdr.device_major().map_err(as_invalid)?.unwrap_or(0);
                    let minor = hdr.device_minor().map_err(as_invalid)?.unwrap_or(0);
                    rustix::fs::makedev(major, minor)
                };
                rustix::fs::mknodat(pd, name, ft, Mode::from_raw_mode(perm), dev)?;
            }
            other => return Err(invalid(format!("tar entry {path} has unsupported type {other:?}"))),
        }
        if euid_root || !is_dir {
            rustix::fs::chownat(
                pd,
                name,
                Some(rustix::fs::Uid::from_raw(uid as u32)),
                Some(rustix::fs::Gid::from_raw(gid as u32)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .or_else(ignore_eperm)?;
        }
        // A link has no mode of its own, and chmod would follow it: never
        // for a symlink, nor for a hard link to one.
        let is_link = etype == tar::EntryType::Symlink
            || (etype == tar::EntryType::Link
                && FileType::from_raw_mode(rustix::fs::statat(pd, name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode)
                    == FileType::Symlink);
        if !is_link {
            // After chown, which clears set-id bits.
            rustix::fs::chmodat(pd, name, Mode::from_raw_mode(perm), AtFlags::empty())?;
        }
        for (k, v) in &xattrs {
            rustix::fs::lsetxattr(proc_path(pd, name), k.as_str(), v, rustix::fs::XattrFlags::empty())
                .or_else(ignore_eperm)?;
        }
        if !is_dir {
            set_mtime(pd, name, mtime)?;
        }
        written.insert(&clean);
        if !removed {
            last_parent = Some((parent_key.to_vec(), parent));
        }
    }
    // Directory times last: their contents changed them while unpacking.
    for (dir, mtime) in dir_times.iter_rev() {
        crate::plugin::check_deadline()?;
        let comps: Vec<&OsStr> = dir.split(|b| *b == b'/').map(OsStr::from_bytes).collect();
        let (name, parents) = comps.split_last().expect("non-empty");
        if let Ok(p) = open_dir_beneath(root, parents, false) {
            let _ = set_mtime(p.as_fd(), name, mtime);
        }
    }
    // Read what follows the end-of-archive marker so the whole stream is hashed.
    io::copy(&mut ar.into_inner(), &mut io::sink())?;
    Ok(size)
}

/// The paths this layer wrote, for opaque whiteouts (which keep them), as
/// 64-bit keyed hashes in a plain vector: a million entries cost 8 MiB, not
/// the 80 MiB their names would. The key is random per process, so
/// collisions cannot be aimed at, and a chance one among a million names is
/// about 1 in 10^7. Sorted only when an opaque whiteout asks (rare).
#[derive(Default)]
struct Written {
    keys: Vec<u64>,
    sorted: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl Written {
    fn key(&self, path: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, path)
    }

    fn insert(&mut self, path: &[u8]) {
        let k = self.key(path);
        self.keys.push(k);
    }

    /// A binary search of the sorted part and a scan of what was added
    /// since, sorted again once that grows: hard links ask once each.
    fn contains(&mut self, path: &[u8]) -> bool {
        if self.keys.len() - self.sorted > 4096.max(self.sorted / 8) {
            self.keys.sort_unstable();
            self.keys.dedup();
            self.sorted = self.keys.len();
        }
        let k = self.key(path);
        self.keys[..self.sorted].binary_search(&k).is_ok() || self.keys[self.sorted..].contains(&k)
    }
}

/// Directories and their times, packed into one buffer (a directory costs
/// its name plus 16 bytes).
#[derive(Default)]
struct DirTimes {
    names: Vec<u8>,
    entries: Vec<(usize, u64)>,
}

impl DirTimes {
    fn push(&mut self, (dir, mtime): (Vec<u8>, u64)) {
        self.names.extend_from_slice(&dir);
        self.entries.push((self.names.len(), mtime));
    }

    fn iter_rev(&self) -> impl Iterator<Item = (&[u8], u64)> {
        (0..self.entries.len()).rev().map(|i| {
            let start = if i == 0 { 0 } else { self.entries[i - 1].0 };
            let (end, mtime) = self.entries[i];
            (&self.names[start..end], mtime)
        })
    }
}

/// A parse or decompression failure of the layer is bad input, not a host fault.
fn as_invalid(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::Other | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof => {
            invalid(format!("corrupt layer: {e}"))
        }
        _ => e,
    }
}

/// Opens the parent directory of an entry, creating missing directories
/// (0755, as Docker does) beneath the root.
fn parent_dir(root: BorrowedFd<'_>, parents: &[&OsStr]) -> io::Result<std::os::fd::OwnedFd> {
    match open_dir_beneath(root, parents, false) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => return r,
    }
    for i in 0..parents.len() {
        let up = open_dir_beneath(root, &parents[..i], false)?;
        match rustix::fs::mkdirat(&up, parents[i], Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    open_dir_beneath(root, parents, false)
}

fn set_mtime(dir: BorrowedFd<'_>, name: &OsStr, mtime: u64) -> io::Result<()> {
    let t = Timespec {
        tv_sec: mtime as _,
        tv_nsec: 0,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    Ok(rustix::fs::utimensat(dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)?)
}

fn apply_whiteout(
    pd: BorrowedFd<'_>,
    parents: &[&OsStr],
    target: &OsStr,
    mode: Whiteouts,
    written: &mut Written,
) -> io::Result<()> {
    let opaque = [WH_PREFIX.as_bytes(), target.as_bytes()].concat() == WH_OPAQUE.as_bytes();
    match (mode, opaque) {
        (Whiteouts::Delete, true) => {
            // Remove what lower layers put here; keep what this layer wrote.
            let prefix: Vec<u8> = parents.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
            for (n, _) in list(pd)? {
                let full = super::join_rel(OsStr::from_bytes(&prefix), &n);
                if !written.contains(full.as_bytes()) {
                    remove_tree(pd, &n)?;
                }
            }
            Ok(())
        }
        (Whiteouts::Delete, false) => {
            if target.is_empty() || target.as_bytes().contains(&b'/') {
                return Err(invalid("whiteout names nothing"));
            }
            match remove_tree(pd, target) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                r => r,
            }
        }
        (Whiteouts::Overlay, true) => Ok(rustix::fs::fsetxattr(
            pd,
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )?),
        (Whiteouts::Overlay, false) => {
            match remove_tree(pd, target) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r?,
            }
            Ok(rustix::fs::mknodat(
                pd,
                target,
                FileType::CharacterDevice,
                Mode::empty(),
                rustix::fs::makedev(0, 0),
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        // Bypass the builder's own path checks: hostile names are the point.
        let name = h.as_old_mut().name.as_mut();
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    /// Unpacks into `<tmp>/a/b/root`, so that every escape the cases try
    /// (one or two levels up) would land inside the test's own directory.
    fn run(tar: Vec<u8>) -> (tempfile::TempDir, io::Result<u64>) {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b/root")).unwrap();
        std::os::unix::fs::symlink("a/b/root", t.path().join("root")).unwrap();
        let fd = rustix::fs::open(
            t.path().join("a/b/root"),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let r = unpack(fd.as_fd(), &tar[..], Whiteouts::Delete);
        (t, r)
    }

    #[test]
    fn refuses_escaping_entries() {
        let cases: Vec<Vec<u8>> = vec![
            tar_of(|b| file(b, "../evil", b"x")),
            tar_of(|b| file(b, "/abs", b"x")),
            tar_of(|b| {
                link(b, tar::EntryType::Symlink, "up", "/");
                file(b, "up/evil", b"x");
            }),
            tar_of(|b| {
                link(b, tar::EntryType::Symlink, "up", "../..");
                file(b, "up/evil", b"x");
            }),
            tar_of(|b| link(b, tar::EntryType::Link, "hl", "../outside")),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let (t, r) = run(c);
            let err = r.expect_err(&format!("case {i} should fail"));
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "case {i}: {err}");
            for d in ["a/b", "a", ""] {
                assert!(!t.path().join(d).join("evil").exists(), "case {i} wrote {d}/evil");
            }
        }
    }

    /// A hard link's header sets the mode of the inode it shares with its
    /// target (as Docker and containers/storage apply it), but never through
    /// a symlink, and never for a file of an earlier layer.
    #[test]
    fn hard_link_headers_apply_to_their_own_inode_only() {
        use std::os::unix::fs::PermissionsExt;
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        let (t, r) = run(tar_of(|b| {
            file(b, "f", b"data");
            link(b, tar::EntryType::Link, "f-link", "f");
            link(b, tar::EntryType::Symlink, "sym", &target);
            link(b, tar::EntryType::Link, "sym-link", "sym");
        }));
        r.unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let root = t.path().join("a/b/root");
        assert_eq!(
            mode(&root.join("f")),
            0o777,
            "the link's header mode applies to the inode"
        );
        assert_eq!(mode(outside.path()), 0o600, "chmod followed a hard link to a symlink");

        // A file an earlier layer left (vfs shares it with the parent) keeps its mode.
        let t2 = tempfile::tempdir().unwrap();
        std::fs::write(t2.path().join("old"), b"parent").unwrap();
        std::fs::set_permissions(t2.path().join("old"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let fd = rustix::fs::open(t2.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        let tar = tar_of(|b| link(b, tar::EntryType::Link, "new", "old"));
        unpack(fd.as_fd(), &mut &tar[..], Whiteouts::Delete).unwrap();
        assert_eq!(mode(&t2.path().join("old")), 0o640);
    }

    #[test]
    fn whiteouts_delete() {
        let (t, r) = run(tar_of(|b| {
            file(b, "a", b"1");
            file(b, "b", b"22");
            file(b, ".wh.a", b"");
        }));
        assert_eq!(r.unwrap(), 3);
        assert!(!t.path().join("root/a").exists());
        assert!(t.path().join("root/b").exists());
    }
}
