//! Native packing: a directory (or the changes between two) as a tar stream,
//! produced on a thread into a pipe so it never sits whole in memory.

use super::join_rel;
use super::open_dir_beneath;
use super::tree::{list, read_xattrs};
use gantry_core::ownership::{image_xattrs, stat_at, Ownership};
use rustix::fs::{AtFlags, FileType, Stat};
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Modify,
    Add,
    Delete,
}

impl ChangeKind {
    /// The kind as the driver contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Modify => "modify",
            ChangeKind::Add => "add",
            ChangeKind::Delete => "delete",
        }
    }
}

/// One difference between two trees; `path` is relative, without a leading
/// `/`, and bytes (names need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: OsString,
    pub kind: ChangeKind,
}

/// How a packed tree spells deletions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// A plain tree: every entry as it is.
    Plain,
    /// An overlay upper directory: 0/0 character devices are whiteouts and
    /// `trusted.overlay.opaque=y` marks an opaque directory; both become the
    /// layer format's `.wh.` files, as Docker's overlay2 `Diff` writes them.
    Upper,
}

/// Packs directory `root` as a tar stream.
pub fn pack(root: OwnedFd) -> io::Result<PackReader> {
    spawn_writer(move |b| {
        let mut links = HashMap::new();
        walk_pack(b, root.as_fd(), OsStr::new(""), &mut links, Flavor::Plain)
    })
}

/// Packs an overlay upper directory as a layer tar (see [`Flavor::Upper`]).
pub fn pack_upper(root: OwnedFd) -> io::Result<PackReader> {
    spawn_writer(move |b| {
        let mut links = HashMap::new();
        walk_pack(b, root.as_fd(), OsStr::new(""), &mut links, Flavor::Upper)
    })
}

/// An overlay upper's opaque directory: `trusted.` with root, `user.` in a
/// user namespace's mount (`userxattr`).
fn is_opaque_xattr(k: &str) -> bool {
    k == "trusted.overlay.opaque" || k == "user.overlay.opaque"
}

fn is_overlay_xattr(k: &str) -> bool {
    k.starts_with("trusted.overlay.") || k.starts_with("user.overlay.")
}

/// Packs what changed from `lower` to `upper`, with `.wh.` files for deletions.
pub fn pack_changes(lower: OwnedFd, upper: OwnedFd) -> io::Result<PackReader> {
    let list = changes(lower.as_fd(), upper.as_fd())?;
    spawn_writer(move |b| {
        let mut links = HashMap::new();
        for c in &list {
            let (parent, name) = split_parent(&c.path);
            let comps: Vec<&OsStr> = parent
                .as_bytes()
                .split(|b| *b == b'/')
                .filter(|s| !s.is_empty())
                .map(OsStr::from_bytes)
                .collect();
            let pd = open_dir_beneath(upper.as_fd(), &comps, false)?;
            match c.kind {
                ChangeKind::Delete => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(0);
                    h.set_mode(0o644);
                    b.append_data(&mut h, Path::new(&whiteout_path(&c.path)), io::empty())?;
                }
                _ => {
                    append_entry(b, pd.as_fd(), name, &c.path, &mut links, Flavor::Plain)?;
                }
            }
        }
        Ok(())
    })
}

/// `rel`'s parent (empty at the top) and its last component.
fn split_parent(rel: &OsStr) -> (&OsStr, &OsStr) {
    let path = rel.as_bytes();
    let (parent, name) = match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    (OsStr::from_bytes(parent), OsStr::from_bytes(name))
}

/// The layer format's whiteout of `rel`: `.wh.NAME` beside it.
fn whiteout_path(rel: &OsStr) -> OsString {
    let (parent, name) = split_parent(rel);
    let mut whiteout = OsString::from(".wh.");
    whiteout.push(name);
    join_rel(parent, &whiteout)
}

/// The read end of a tar being written on a thread. The writer's error,
/// if it had one, is this reader's error at the end: a failed pack is never
/// a short tar that looks complete.
pub struct PackReader {
    pipe: io::PipeReader,
    writer: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl io::Read for PackReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.pipe.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Some(w) = self.writer.take() {
                w.join()
                    .unwrap_or_else(|_| Err(io::Error::other("the pack writer panicked")))?;
            }
        }
        Ok(n)
    }
}

fn spawn_writer(
    f: impl FnOnce(&mut tar::Builder<io::PipeWriter>) -> io::Result<()> + Send + 'static,
) -> io::Result<PackReader> {
    let (r, w) = io::pipe()?;
    let writer = std::thread::spawn(move || {
        let mut b = tar::Builder::new(w);
        b.mode(tar::HeaderMode::Complete);
        f(&mut b)?;
        b.finish()
    });
    Ok(PackReader {
        pipe: r,
        writer: Some(writer),
    })
}

/// Whether `name` in `dir` is an overlay whiteout: a 0/0 character device.
fn is_whiteout_device(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0)
}

/// The entries of `dir` a tree shows. An overlay whiteout is no file of
/// any tree: a layer spells deletions as `.wh.` files, the core refuses a
/// 0/0 device in a layer, and overlayfs hides them in a mount; one left
/// in a layer's own directory (a first layer's, say) is never shown.
fn tree_entries(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, FileType)>> {
    let mut out = Vec::new();
    for (n, ft) in list(dir)? {
        if ft == FileType::CharacterDevice && is_whiteout_device(dir, &n)? {
            continue;
        }
        out.push((n, ft));
    }
    Ok(out)
}

fn walk_pack<W: Write>(
    b: &mut tar::Builder<W>,
    dir: BorrowedFd<'_>,
    prefix: &OsStr,
    links: &mut HashMap<(u64, u64), OsString>,
    flavor: Flavor,
) -> io::Result<()> {
    let names = match flavor {
        Flavor::Plain => tree_entries(dir)?,
        Flavor::Upper => list(dir)?,
    };
    for (name, _) in names {
        crate::plugin::check_deadline()?;
        let rel = join_rel(prefix, &name);
        let is_dir = append_entry(b, dir, &name, &rel, links, flavor)?;
        if is_dir {
            let child = open_dir_beneath(dir, &[&name], false)?;
            walk_pack(b, child.as_fd(), &rel, links, flavor)?;
        }
    }
    Ok(())
}

/// Appends one entry; returns whether it was a directory.
fn append_entry<W: Write>(
    b: &mut tar::Builder<W>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    rel: &OsStr,
    links: &mut HashMap<(u64, u64), OsString>,
    flavor: Flavor,
) -> io::Result<bool> {
    let rel_path = Path::new(rel);
    let disk = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let xattrs = read_xattrs(dir, name).unwrap_or_default();
    let mut opaque = false;
    if flavor == Flavor::Upper {
        let ft = FileType::from_raw_mode(disk.st_mode);
        if ft == FileType::CharacterDevice && disk.st_rdev == 0 {
            // A whiteout: the layer format's empty `.wh.NAME` file.
            append_marker(b, &disk, 0o600, &whiteout_path(rel))?;
            return Ok(false);
        }
        opaque = ft == FileType::Directory && xattrs.iter().any(|(k, v)| is_opaque_xattr(k) && v == b"y");
    }
    // What the image says the entry is: in a rootless store, the record.
    let own = Ownership::of_process();
    let st = match own {
        Ownership::Real => disk,
        Ownership::Recorded => stat_at(dir, name, own)?,
    };
    let ft = FileType::from_raw_mode(st.st_mode);
    append_xattrs(b, image_xattrs(xattrs, own))?;
    let mut h = header_of(&st, st.st_mode & 0o7777);
    if ft != FileType::Directory && st.st_nlink > 1 {
        if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, rel_path, Path::new(first))?;
            return Ok(false);
        }
        links.insert((st.st_dev, st.st_ino), rel.to_os_string());
    }
    match ft {
        FileType::Directory => {
            h.set_entry_type(tar::EntryType::Directory);
            let mut dir_name = rel.to_os_string();
            dir_name.push("/");
            b.append_data(&mut h, Path::new(&dir_name), io::empty())?;
            if opaque {
                append_marker(b, &st, st.st_mode & 0o777, &join_rel(rel, OsStr::new(".wh..wh..opq")))?;
            }
            return Ok(true);
        }
        FileType::RegularFile => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(st.st_size as u64);
            let f = gantry_core::path::open_regular_beneath(dir, name.as_bytes())?;
            if f.metadata()?.len() != st.st_size as u64 {
                return Err(super::invalid(format!(
                    "{} changed while it was being packed",
                    gantry_core::text::quote_bytes(rel.as_bytes())
                )));
            }
            b.append_data(&mut h, rel_path, f)?;
        }
        FileType::Symlink => {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
            b.append_link(&mut h, rel_path, Path::new(OsStr::from_bytes(target.as_bytes())))?;
        }
        FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
            h.set_entry_type(match ft {
                FileType::CharacterDevice => tar::EntryType::Char,
                FileType::BlockDevice => tar::EntryType::Block,
                _ => tar::EntryType::Fifo,
            });
            h.set_device_major(rustix::fs::major(st.st_rdev))?;
            h.set_device_minor(rustix::fs::minor(st.st_rdev))?;
            b.append_data(&mut h, rel_path, io::empty())?;
        }
        _ => {}
    }
    Ok(false)
}

/// A header with `st`'s owner and time, `mode`, and no size yet.
fn header_of(st: &Stat, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(st.st_uid as u64);
    h.set_gid(st.st_gid as u64);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    h
}

/// Appends an empty marker file at `path` (a whiteout or an opaque
/// directory's marker), owned and timed as `st`.
fn append_marker<W: Write>(b: &mut tar::Builder<W>, st: &Stat, mode: u32, path: &OsStr) -> io::Result<()> {
    let mut h = header_of(st, mode);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, Path::new(path), io::empty())
}

/// Appends an entry's extended attributes as a PAX header before it;
/// overlayfs's own attributes belong to no tree and no layer.
fn append_xattrs<W: Write>(b: &mut tar::Builder<W>, mut xattrs: Vec<(String, Vec<u8>)>) -> io::Result<()> {
    xattrs.retain(|(k, _)| !is_overlay_xattr(k));
    if xattrs.is_empty() {
        return Ok(());
    }
    let pax: Vec<(String, Vec<u8>)> = xattrs
        .into_iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
        .collect();
    b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fn differs(a: &Stat, b: &Stat, dir: bool) -> bool {
    a.st_mode != b.st_mode
        || a.st_uid != b.st_uid
        || a.st_gid != b.st_gid
        || a.st_rdev != b.st_rdev
        || (!dir && (a.st_size != b.st_size || a.st_mtime != b.st_mtime || a.st_mtime_nsec != b.st_mtime_nsec))
}

/// What changed from `lower` to `upper`, parents before children.
pub fn changes(lower: BorrowedFd<'_>, upper: BorrowedFd<'_>) -> io::Result<Vec<Change>> {
    let mut out = Vec::new();
    diff_dirs(Some(lower), upper, OsStr::new(""), &mut out)?;
    Ok(out)
}

fn diff_dirs(
    lower: Option<BorrowedFd<'_>>,
    upper: BorrowedFd<'_>,
    prefix: &OsStr,
    out: &mut Vec<Change>,
) -> io::Result<()> {
    let up = tree_entries(upper)?;
    let low = match lower {
        Some(l) => tree_entries(l)?,
        None => Vec::new(),
    };
    let rel = |n: &OsStr| join_rel(prefix, n);
    for (n, _) in &low {
        if !up.iter().any(|(u, _)| u == n) {
            out.push(Change {
                path: rel(n),
                kind: ChangeKind::Delete,
            });
        }
    }
    let own = Ownership::of_process();
    for (n, _) in &up {
        let ust = stat_at(upper, n.as_os_str(), own)?;
        let is_dir = FileType::from_raw_mode(ust.st_mode) == FileType::Directory;
        let lst = match lower {
            Some(l) if low.iter().any(|(x, _)| x == n) => Some(stat_at(l, n.as_os_str(), own)?),
            _ => None,
        };
        match &lst {
            None => out.push(Change {
                path: rel(n),
                kind: ChangeKind::Add,
            }),
            Some(l) => {
                let link_changed = FileType::from_raw_mode(ust.st_mode) == FileType::Symlink
                    && rustix::fs::readlinkat(upper, n.as_os_str(), Vec::new())?
                        != rustix::fs::readlinkat(lower.expect("present"), n.as_os_str(), Vec::new())?;
                if differs(l, &ust, is_dir) || link_changed {
                    out.push(Change {
                        path: rel(n),
                        kind: ChangeKind::Modify,
                    });
                }
            }
        }
        if is_dir {
            let uc = open_dir_beneath(upper, &[n], false)?;
            let lc = match (lower, &lst) {
                (Some(l), Some(s)) if FileType::from_raw_mode(s.st_mode) == FileType::Directory => {
                    Some(open_dir_beneath(l, &[n], false)?)
                }
                _ => None,
            };
            diff_dirs(lc.as_ref().map(|f| f.as_fd()), uc.as_fd(), &rel(n), out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pack that fails half way is an error at the reader's end, never a
    /// short tar that looks complete.
    #[test]
    fn a_failed_pack_is_an_error_not_a_short_tar() {
        let mut r = spawn_writer(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            b.append_data(&mut h, "first", &b"abc"[..])?;
            Err(io::Error::other("the disk went away"))
        })
        .unwrap();
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert!(e.to_string().contains("the disk went away"), "{e}");
        assert!(out.len() >= 512, "what was packed before the failure still streams");
        let mut ok = spawn_writer(|_| Ok(())).unwrap();
        let mut out = Vec::new();
        ok.read_to_end(&mut out).unwrap();
        assert_eq!(out, vec![0u8; 1024], "an empty tar is its end-of-archive marker");
    }
}
