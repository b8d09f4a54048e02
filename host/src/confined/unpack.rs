//! Native unpacking of a tar layer into a directory, with whiteouts.
//!
//! `tar` is used to parse only; every effect is a `*at` call on a directory
//! fd opened beneath the layer root without following any link, so an entry
//! with `..`, an absolute name, or a path through a symbolic link (written
//! by this layer or an earlier one) is refused, and a hard link can only
//! point at a file inside the root. The core refuses all of these before a
//! driver sees them (`gantry_core::layer_rules`); this is the backstop.
//!
//! One reading of each entry: the stream passes through the core's own
//! header reader ([`HeaderTap`]), the one whose reading the layer rules
//! judged, and an entry the `tar` crate reads otherwise (name, type, size,
//! link target, owner, device, attributes) is refused before anything of it
//! is written. A run of zeros in a file is written as a hole, so a file of
//! gigabytes of zeros costs neither the disk nor the time to write it.

use super::tree::{chown_nofollow, create_new, ignore_eperm, list, proc_path, remove_tree};
use super::{components_os, invalid, open_dir_beneath};
use gantry_core::ownership::Ownership;
use gantry_core::tarsplit::{EntryHeader, HeaderQueue, HeaderTap};
use gantry_core::text::quote_bytes;
use rustix::fs::{AtFlags, FileType, Mode, Timespec, Timestamps};
use std::ffi::OsStr;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// How whiteout entries are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// Delete what they name (each layer is a full copy, as in vfs).
    Delete,
    /// Write overlayfs whiteouts: a 0/0 character device, or the
    /// `trusted.overlay.opaque` attribute for an opaque directory
    /// (`user.overlay.opaque` without root, for a `userxattr` mount).
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
    let (tap, headers) = HeaderTap::new(r);
    let mut ar = tar::Archive::new(BufReader::with_capacity(64 << 10, tap));
    let mut u = Unpacker {
        root,
        mode,
        written: Written::default(),
        dir_times: DirTimes::default(),
        size: 0,
        buf: Vec::new(),
        own: Ownership::of_process(),
        last_parent: None,
    };
    for entry in ar.entries()? {
        crate::plugin::check_deadline()?;
        u.entry(&mut entry.map_err(as_invalid)?, &headers)?;
    }
    u.set_dir_times()?;
    // Read what follows the end-of-archive marker so the whole stream is hashed.
    io::copy(&mut ar.into_inner(), &mut io::sink()).map_err(as_invalid)?;
    if !headers.is_empty() {
        return Err(invalid(
            "corrupt layer: the core reads entries after the tar crate's end of the archive",
        ));
    }
    Ok(u.size)
}

/// One unpack's state from entry to entry.
struct Unpacker<'a> {
    root: BorrowedFd<'a>,
    mode: Whiteouts,
    /// What this layer wrote: opaque whiteouts keep it, hard links ask.
    written: Written,
    /// Directories and their times, set last ([`Unpacker::set_dir_times`]).
    dir_times: DirTimes,
    /// Regular file bytes written so far.
    size: u64,
    /// Grown to the largest file seen (at most 1 MiB): a layer of small
    /// files does not pay for zeroing a big buffer.
    buf: Vec<u8>,
    /// Whether owners, modes and devices are set for real or recorded.
    own: Ownership,
    /// The last entry's parent directory: tar entries come a directory at a
    /// time, so most need no lookup. Forgotten after a whiteout and whenever
    /// anything is removed (that could be this directory or one above it).
    last_parent: Option<(Vec<u8>, OwnedFd)>,
}

/// What an entry's header sets on what it makes, read (and refused where
/// it cannot be set) before anything of the entry is written.
struct Meta {
    perm: u32,
    uid: u32,
    gid: u32,
    /// The core's: it honours a PAX `mtime`, which the tar crate does not.
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Unpacker<'_> {
    /// Applies one entry: the two readers' agreement, its place beneath the
    /// root, then a whiteout, or what it makes and the metadata it sets.
    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>, headers: &HeaderQueue) -> io::Result<()> {
        let raw = e.path_bytes().into_owned();
        let path = quote_bytes(&raw);
        let in_entry = |err: io::Error| invalid(format!("tar entry {path}: {err}"));
        let core = agreed(e, headers).map_err(in_entry)?;
        let comps = components_os(&raw).map_err(in_entry)?;
        let Some((name, parents)) = comps.split_last() else {
            return Ok(()); // the root itself
        };
        let name: &OsStr = name;
        let clean: Vec<u8> = comps.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
        let etype = e.header().entry_type();
        if matches!(etype, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        let parent_key = &clean[..clean.len() - name.len()];
        let parent = self.open_parent(parents, parent_key).map_err(in_entry)?;
        let pd = parent.as_fd();
        if let Some(target) = name.as_bytes().strip_prefix(WH_PREFIX.as_bytes()) {
            // The parent is not kept: a whiteout removes things.
            return apply_whiteout(pd, parents, OsStr::from_bytes(target), self.mode, &mut self.written)
                .map_err(|err| io::Error::new(err.kind(), format!("whiteout {path}: {err}")));
        }
        let meta = entry_meta(e, &core, &path)?;
        let removed = clear_the_way(pd, name, etype.is_dir())?;
        let sets_meta = match etype {
            tar::EntryType::Directory => {
                match rustix::fs::mkdirat(pd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(err) => return Err(err.into()),
                }
                self.dir_times.push((clean.clone(), meta.mtime));
                true
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.write_file(e, pd, name)?;
                true
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| invalid(format!("symlink {path} has no target")))?
                    .into_owned();
                rustix::fs::symlinkat(target.as_slice(), pd, name)?;
                true
            }
            tar::EntryType::Link => self.hard_link(e, pd, name, &path)?,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                make_node(e.header(), etype, pd, name, meta.perm, self.own)?;
                true
            }
            other => return Err(invalid(format!("tar entry {path} has unsupported type {other:?}"))),
        };
        if sets_meta {
            match self.own {
                Ownership::Real => apply_meta(pd, name, etype, &meta)?,
                Ownership::Recorded => record_meta(pd, name, etype, &meta, &core)?,
            }
        }
        self.written.insert(&clean);
        if sets_meta && !removed {
            self.last_parent = Some((parent_key.to_vec(), parent));
        }
        Ok(())
    }

    /// The directory an entry goes in: the last entry's when it is the same
    /// (`key` is its path), otherwise opened, and made where missing.
    fn open_parent(&mut self, parents: &[&OsStr], key: &[u8]) -> io::Result<OwnedFd> {
        match self.last_parent.take() {
            Some((k, fd)) if k == key => Ok(fd),
            _ => parent_dir(self.root, parents),
        }
    }

    /// Writes a regular file's contents; a run of zeros is a hole.
    fn write_file<R: Read>(&mut self, e: &mut tar::Entry<'_, R>, pd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let mut f = std::fs::File::from(create_new(pd, name, 0o600)?);
        let want = e.size().clamp(1, 1 << 20) as usize;
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let mut hole = false;
        loop {
            crate::plugin::check_deadline()?;
            let n = e.read(&mut self.buf).map_err(as_invalid)?;
            if n == 0 {
                break;
            }
            hole = self.buf[..n].iter().all(|b| *b == 0);
            if hole {
                f.seek(io::SeekFrom::Current(n as i64))?;
            } else {
                f.write_all(&self.buf[..n])?;
            }
            self.size += n as u64;
        }
        if hole {
            // A file that ends in a hole has its length set.
            let end = f.stream_position()?;
            f.set_len(end)?;
        }
        Ok(())
    }

    /// Links `name` to a file beneath the root; whether the link's header
    /// then sets the inode's metadata. As Docker and containers/storage
    /// apply it, it does (owner, mode, attributes and time of the inode it
    /// shares with its target), unless the target is a file of an earlier
    /// layer (a vfs layer shares its parent's inodes): that is not this
    /// layer's to change.
    fn hard_link<R: Read>(
        &mut self,
        e: &tar::Entry<'_, R>,
        pd: BorrowedFd<'_>,
        name: &OsStr,
        path: &str,
    ) -> io::Result<bool> {
        let target = e
            .link_name_bytes()
            .ok_or_else(|| invalid(format!("hard link {path} has no target")))?
            .into_owned();
        let shown = quote_bytes(&target);
        let tc = components_os(&target).map_err(|err| invalid(format!("hard link {path} -> {shown}: {err}")))?;
        let (tname, tparents) = tc
            .split_last()
            .ok_or_else(|| invalid(format!("hard link {path} has an empty target")))?;
        let tdir = open_dir_beneath(self.root, tparents, false)
            .map_err(|err| invalid(format!("hard link {path} -> {shown}: {err}")))?;
        rustix::fs::linkat(&tdir, *tname, pd, name, AtFlags::empty()).map_err(|err| {
            io::Error::new(
                io::Error::from(err).kind(),
                format!("hard link {path} -> {shown}: {err}"),
            )
        })?;
        let target_clean: Vec<u8> = tc.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/');
        Ok(self.written.contains(&target_clean))
    }

    /// Directory times last: their contents changed them while unpacking.
    fn set_dir_times(&self) -> io::Result<()> {
        for (dir, mtime) in self.dir_times.iter_rev() {
            crate::plugin::check_deadline()?;
            let comps: Vec<&OsStr> = dir.split(|b| *b == b'/').map(OsStr::from_bytes).collect();
            let (name, parents) = comps.split_last().expect("non-empty");
            if let Ok(p) = open_dir_beneath(self.root, parents, false) {
                let _ = set_mtime(p.as_fd(), name, mtime);
            }
        }
        Ok(())
    }
}

/// The metadata entry `e` (at `path`, as shown) sets; an owner that does not
/// fit 32 bits cannot be set, so it is refused, not truncated.
fn entry_meta<R: Read>(e: &mut tar::Entry<'_, R>, core: &EntryHeader, path: &str) -> io::Result<Meta> {
    let perm = core.mode;
    let (uid, gid) = (core.uid, core.gid);
    let (Ok(uid32), Ok(gid32)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Err(invalid(format!(
            "tar entry {path}: its owner {uid}:{gid} is over 32 bits"
        )));
    };
    let xattrs = layer_xattrs(e).map_err(|err| invalid(format!("tar entry {path}: {err}")))?;
    Ok(Meta {
        perm,
        uid: uid32,
        gid: gid32,
        mtime: core.mtime,
        xattrs,
    })
}

/// Removes whatever stands at `name`, unless the entry is a directory and
/// so is what stands there; whether anything was removed.
fn clear_the_way(pd: BorrowedFd<'_>, name: &OsStr, is_dir: bool) -> io::Result<bool> {
    match rustix::fs::statat(pd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if is_dir && FileType::from_raw_mode(st.st_mode) == FileType::Directory => Ok(false),
        Ok(_) => {
            remove_tree(pd, name)?;
            Ok(true)
        }
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

/// Makes a character or block device or a FIFO, as header `h` says; in a
/// rootless store an empty file its record says it stands for.
fn make_node(
    h: &tar::Header,
    etype: tar::EntryType,
    pd: BorrowedFd<'_>,
    name: &OsStr,
    perm: u32,
    own: Ownership,
) -> io::Result<()> {
    // Attributes of the `user.` namespace go on files and directories
    // only, so a FIFO is a stand-in too.
    if own == Ownership::Recorded {
        drop(create_new(pd, name, 0o600)?);
        return Ok(());
    }
    let ft = match etype {
        tar::EntryType::Char => FileType::CharacterDevice,
        tar::EntryType::Block => FileType::BlockDevice,
        _ => FileType::Fifo,
    };
    let dev = if ft == FileType::Fifo {
        rustix::fs::makedev(0, 0)
    } else {
        let major = h.device_major().map_err(as_invalid)?.unwrap_or(0);
        let minor = h.device_minor().map_err(as_invalid)?.unwrap_or(0);
        rustix::fs::makedev(major, minor)
    };
    rustix::fs::mknodat(pd, name, ft, Mode::from_raw_mode(perm), dev)?;
    Ok(())
}

/// Sets the header's owner, mode, attributes and (but for a directory's,
/// set last) time on what entry `name` made.
fn apply_meta(pd: BorrowedFd<'_>, name: &OsStr, etype: tar::EntryType, meta: &Meta) -> io::Result<()> {
    let is_dir = etype.is_dir();
    chown_nofollow(pd, name, meta.uid, meta.gid)?;
    // A link has no mode of its own, and chmod would follow it: never
    // for a symlink, nor for a hard link to one.
    let is_link = etype == tar::EntryType::Symlink
        || (etype == tar::EntryType::Link
            && FileType::from_raw_mode(rustix::fs::statat(pd, name, AtFlags::SYMLINK_NOFOLLOW)?.st_mode)
                == FileType::Symlink);
    if !is_link {
        // After chown, which clears set-id bits.
        rustix::fs::chmodat(pd, name, Mode::from_raw_mode(meta.perm), AtFlags::empty())?;
    }
    for (k, v) in &meta.xattrs {
        rustix::fs::lsetxattr(proc_path(pd, name), k.as_str(), v, rustix::fs::XattrFlags::empty())
            .or_else(ignore_eperm)?;
    }
    if !is_dir {
        set_mtime(pd, name, meta.mtime)?;
    }
    Ok(())
}

/// In a rootless store: the caller's file with a mode it may read and no
/// set-id or sticky bit, and the header's owner, mode and type recorded
/// ([`gantry_core::ownership`]); a symbolic link's owner on its directory.
fn record_meta(
    pd: BorrowedFd<'_>,
    name: &OsStr,
    etype: tar::EntryType,
    meta: &Meta,
    core: &EntryHeader,
) -> io::Result<()> {
    use gantry_core::ownership::{
        disk_perm, link_owner_xattr, stored_xattr_name, Recorded, RecordedKind, OVERRIDE_XATTR,
    };
    let st = rustix::fs::statat(pd, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ft = FileType::from_raw_mode(st.st_mode);
    let set = |k: &str, v: &[u8]| -> io::Result<()> {
        rustix::fs::lsetxattr(proc_path(pd, name), k, v, rustix::fs::XattrFlags::empty()).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("recording the attribute {k} of {}: {e}", quote_bytes(name.as_bytes())),
            )
        })
    };
    if ft == FileType::Symlink {
        // Only an owner other than root is recorded (a link without a
        // record reads as root's): a directory's attributes share one
        // block on most file systems, and images have directories of
        // hundreds of links, nearly all root's. A record left by an
        // earlier link of the same name is removed.
        let key = link_owner_xattr(name.as_bytes());
        if (meta.uid, meta.gid) == (0, 0) {
            match rustix::fs::fremovexattr(pd, key.as_str()) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(e.into()),
            }
        } else {
            let owner = format!("{}:{}", meta.uid, meta.gid);
            rustix::fs::fsetxattr(pd, key.as_str(), owner.as_bytes(), rustix::fs::XattrFlags::empty()).map_err(
                |e| {
                    invalid(format!(
                        "cannot record the owner {owner} of symbolic link {} on its directory: {e}",
                        quote_bytes(name.as_bytes())
                    ))
                },
            )?;
        }
        return set_mtime(pd, name, meta.mtime);
    }
    let kind = match (etype, ft) {
        (tar::EntryType::Char, _) => RecordedKind::Char(core.dev.0 as u32, core.dev.1 as u32),
        (tar::EntryType::Block, _) => RecordedKind::Block(core.dev.0 as u32, core.dev.1 as u32),
        (tar::EntryType::Fifo, _) => RecordedKind::Pipe,
        (_, FileType::Directory) => RecordedKind::Dir,
        (_, FileType::Socket) => RecordedKind::Socket,
        _ => RecordedKind::File,
    };
    let is_dir = ft == FileType::Directory;
    rustix::fs::chmodat(
        pd,
        name,
        Mode::from_raw_mode(disk_perm(meta.perm, is_dir)),
        AtFlags::empty(),
    )?;
    let record = Recorded {
        uid: meta.uid,
        gid: meta.gid,
        perm: meta.perm,
        kind: Some(kind),
    };
    set(OVERRIDE_XATTR, record.format().as_bytes())?;
    for (k, v) in &meta.xattrs {
        set(&stored_xattr_name(k, Ownership::Recorded), v)?;
    }
    if !is_dir {
        set_mtime(pd, name, meta.mtime)?;
    }
    Ok(())
}

/// The core's reading of the entry the tar crate yielded as `e`, when the
/// two agree on everything the unpack acts on.
fn agreed<R: Read>(e: &mut tar::Entry<'_, R>, headers: &HeaderQueue) -> io::Result<EntryHeader> {
    let core = headers
        .pop()
        .ok_or_else(|| invalid("the core's tar reader has no such entry"))?;
    let h = e.header();
    let kind = h.entry_type().as_byte();
    let mut theirs = EntryHeader {
        name: e.path_bytes().into_owned(),
        link: e.link_name_bytes().map(|l| l.into_owned()),
        kind,
        size: e.size(),
        dev: core.dev,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: core.mtime,
        xattrs: core.xattrs.clone(),
    };
    // An empty owner field (a whiteout packed without one) is 0 to the
    // core and no number to the tar crate, which then has no other view.
    theirs.uid = h.uid().unwrap_or(core.uid);
    theirs.mode = h.mode().map(|m| m & 0o7777).unwrap_or(core.mode);
    theirs.gid = h.gid().unwrap_or(core.gid);
    if matches!(kind, b'3' | b'4') {
        theirs.dev = (
            u64::from(h.device_major().map_err(as_invalid)?.unwrap_or(0)),
            u64::from(h.device_minor().map_err(as_invalid)?.unwrap_or(0)),
        );
    }
    if kind != b'g' {
        theirs.xattrs = layer_xattrs(e)?.into_iter().map(|(k, v)| (k.into_bytes(), v)).collect();
    }
    if theirs != core {
        return Err(invalid(format!(
            "two tar readers disagree on it ({}), so the layer is refused",
            differences(&core, &theirs)
        )));
    }
    Ok(core)
}

/// What differs between two readings of an entry, for the one-line error.
fn differences(a: &EntryHeader, b: &EntryHeader) -> String {
    let q = |v: &Option<Vec<u8>>| v.as_deref().map(quote_bytes).unwrap_or_else(|| "none".into());
    let mut out = Vec::new();
    if a.name != b.name {
        out.push(format!("name {} or {}", quote_bytes(&a.name), quote_bytes(&b.name)));
    }
    if a.kind != b.kind {
        out.push(format!("type {:?} or {:?}", a.kind as char, b.kind as char));
    }
    if a.size != b.size {
        out.push(format!("size {} or {}", a.size, b.size));
    }
    if a.link != b.link {
        out.push(format!("link target {} or {}", q(&a.link), q(&b.link)));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        out.push(format!("owner {}:{} or {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    if a.dev != b.dev {
        out.push(format!("device {:?} or {:?}", a.dev, b.dev));
    }
    if a.mode != b.mode {
        out.push(format!("mode {:o} or {:o}", a.mode, b.mode));
    }
    if a.xattrs != b.xattrs {
        out.push("extended attributes".into());
    }
    out.join(", ")
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
            match Ownership::of_process() {
                Ownership::Real => "trusted.overlay.opaque",
                // Mounted with `userxattr` in gantry's user namespace.
                Ownership::Recorded => "user.overlay.opaque",
            },
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
    use rustix::fs::OFlags;

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

    /// A raw header block with its checksum: `edit` may write any field.
    fn block(name: &[u8], kind: u8, size: u64, edit: impl FnOnce(&mut tar::Header)) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000);
        edit(&mut h);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn padded(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(v.len().div_ceil(512) * 512, 0);
        v
    }

    fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut data = Vec::new();
        for (k, v) in records {
            let mut len = k.len() + v.len() + 3;
            while len.to_string().len() + k.len() + v.len() + 3 != len {
                len += 1;
            }
            data.extend([format!("{len} {k}=").as_bytes(), v, b"\n"].concat());
        }
        padded([block(b"PaxHeaders/x", b'x', data.len() as u64, |_| {}), data].concat())
    }

    /// A GNU long name (`L`) or link (`K`) record.
    fn gnu_long(kind: u8, name: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(name.len() as u64 + 1);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        padded([h.as_bytes(), name, b"\0"].concat())
    }

    /// The tar dialects gantry meets (PAX and GNU long names and links, big
    /// ids, PAX times, attributes, base-256 sizes, hard links to long
    /// names): for every entry, what the core read of its header is what
    /// the unpacked tree holds.
    #[test]
    fn the_core_reading_and_the_unpacked_tree_agree() {
        use std::os::unix::fs::MetadataExt;
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let long_link = format!("{}/target", "t".repeat(150));
        let mut tar = Vec::new();
        tar.extend(pax(&[
            ("path", long.as_bytes()),
            ("size", b"5"),
            ("mtime", b"1700000000.5"),
        ]));
        tar.extend(block(b"short-name", b'0', 0, |_| {}));
        tar.extend(padded(b"hello".to_vec()));
        tar.extend(pax(&[
            ("linkpath", long_link.as_bytes()),
            ("uid", b"3000000000"),
            ("gid", b"3000000001"),
        ]));
        tar.extend(block(b"pax-symlink", b'2', 0, |_| {}));
        tar.extend(gnu_long(b'L', format!("gnu/{}", "g".repeat(130)).as_bytes()));
        tar.extend(block(b"gnu-trunc", b'0', 0, |h| {
            // A base-256 size and owner, as GNU tar writes what octal cannot hold.
            h.as_mut_bytes()[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4]);
            h.as_mut_bytes()[108..116].copy_from_slice(&[0x80, 0, 0, 0, 0x7f, 0, 0, 1]);
        }));
        tar.extend(padded(b"gnu!".to_vec()));
        tar.extend(gnu_long(b'K', long_link.as_bytes()));
        tar.extend(block(b"gnu-symlink", b'2', 0, |_| {}));
        tar.extend(pax(&[("linkpath", long.as_bytes()), ("mtime", b"1700000000")]));
        tar.extend(block(b"hard-to-long", b'1', 0, |_| {}));
        tar.extend(pax(&[("SCHILY.xattr.user.dialect", b"pax\xff")]));
        tar.extend(block(b"with-xattr", b'0', 0, |_| {}));
        tar.extend([0u8; 1024]);

        let (mut tap, queue) = gantry_core::tarsplit::HeaderTap::new(&tar[..]);
        io::copy(&mut tap, &mut io::sink()).unwrap();
        let core: Vec<EntryHeader> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(core.len(), 6);
        let (t, r) = run(tar.clone());
        r.unwrap();
        let root = t.path().join("a/b/root");
        let root_user = rustix::process::geteuid().is_root();
        for h in &core {
            let name = OsStr::from_bytes(&h.name);
            let p = root.join(name);
            let shown = String::from_utf8_lossy(&h.name);
            let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{shown}: {e}"));
            match h.kind {
                b'0' => {
                    assert!(m.is_file(), "{shown}");
                    assert_eq!(m.len(), h.size, "{shown}");
                }
                b'2' => {
                    assert!(m.file_type().is_symlink(), "{shown}");
                    let target = std::fs::read_link(&p).unwrap();
                    assert_eq!(Some(target.as_os_str().as_bytes()), h.link.as_deref(), "{shown}");
                }
                b'1' => {
                    let target = root.join(OsStr::from_bytes(h.link.as_deref().unwrap()));
                    assert_eq!(m.ino(), std::fs::metadata(target).unwrap().ino(), "{shown}");
                }
                k => panic!("{shown}: unexpected type {k}"),
            }
            if root_user {
                assert_eq!((u64::from(m.uid()), u64::from(m.gid())), (h.uid, h.gid), "{shown}");
            }
            assert_eq!(m.mtime() as u64, h.mtime, "{shown}");
        }
        assert_eq!(core[0].name, long.as_bytes());
        assert_eq!((core[0].size, core[0].mtime), (5, 1_700_000_000));
        assert_eq!((core[1].uid, core[1].gid), (3_000_000_000, 3_000_000_001));
        assert_eq!((core[2].size, core[2].uid), (4, 0x7f00_0001));
        assert_eq!(std::fs::read(root.join(&long)).unwrap(), b"hello");
        assert_eq!(core[5].xattrs, vec![(b"user.dialect".to_vec(), b"pax\xff".to_vec())]);
    }

    /// An owner over 32 bits cannot be set: refused, not truncated.
    #[test]
    fn refuses_an_owner_over_32_bits() {
        let mut tar = pax(&[("uid", b"4294967296")]);
        tar.extend(block(b"f", b'0', 0, |_| {}));
        tar.extend([0u8; 1024]);
        let (_t, r) = run(tar);
        let e = r.unwrap_err();
        assert!(e.to_string().contains("owner"), "{e}");
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
