//! Who owns what in a store made without root.
//!
//! Without root (no `CAP_CHOWN`, no `CAP_MKNOD`) a layer's files cannot be
//! given the owners its image says, nor may a device be made, and a setuid
//! file would be one owned by the caller. A rootless store therefore keeps
//! each entry's owner, mode and device number *as the image says* in
//! metadata gantry owns, while the file on disk is the caller's, without
//! set-id or sticky bits and never a device node:
//!
//! - `user.containers.override_stat` on files, directories and the empty
//!   regular files that stand for devices and FIFOs (`user.` attributes go
//!   on nothing else): `uid:gid:0MODE:TYPE`, the
//!   format containers/storage writes and reads for exactly this (TYPE is
//!   `file`, `dir`, `pipe`, `socket`, `char-MAJOR-MINOR`, `block-…`), so
//!   podman and fuse-overlayfs read the same tree;
//! - a symbolic link cannot carry `user.*` attributes, so its owner is kept
//!   on its directory, in `user.gantry.link.<hash of its name>` (`uid:gid`);
//! - the image's own extended attributes (`security.capability` among them,
//!   which only root may set) are kept as `user.gantry.xattr.<name>`, so a
//!   layer can never spell one of the records above itself.
//!
//! Chosen over unpacking in a user namespace mapped from `/etc/subuid`
//! (rootless podman's way): it needs no `newuidmap` helper and no subuid
//! ranges (a CI job running as `nobody` has none), and it runs in the
//! process, which a user namespace cannot (`unshare(CLONE_NEWUSER)` is
//! refused to a process with threads). The core's rules on paths, links and
//! whiteouts are the same either way.
//!
//! Everything that reads a layer back (export, `diff`/`changes`, the
//! conformance suite, `fsck --verify-content`) reads it through
//! [`stat_at`], which answers with the recorded values in a rootless store.

use rustix::fs::{AtFlags, FileType, Stat};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

/// The attribute containers/storage keeps an entry's real metadata in.
pub const OVERRIDE_XATTR: &str = "user.containers.override_stat";
/// A directory's record of one symbolic link's owner: this, then the hex
/// of the first 16 bytes of the SHA-256 of the link's name.
pub const LINK_OWNER_PREFIX: &str = "user.gantry.link.";
/// An image's own extended attribute `NAME`, kept as this prefix + `NAME`.
pub const XATTR_PREFIX: &str = "user.gantry.xattr.";

/// How a store keeps owners: for real (made by root), or recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Files carry the image's owners, modes and devices themselves.
    Real,
    /// The caller owns every file; the image's metadata is recorded.
    Recorded,
}

impl Ownership {
    /// What this process can keep: root keeps owners for real; any other
    /// user records them, and so does "root" of a user namespace that maps
    /// less than every user (gantry's own, without root: it can give a
    /// file no owner but the caller). Read once per process.
    pub fn of_process() -> Ownership {
        static OWN: std::sync::OnceLock<Ownership> = std::sync::OnceLock::new();
        *OWN.get_or_init(|| {
            let all_users = std::fs::read_to_string("/proc/self/uid_map")
                .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
                .unwrap_or(true);
            if rustix::process::geteuid().is_root() && all_users {
                Ownership::Real
            } else {
                Ownership::Recorded
            }
        })
    }
}

/// An entry's metadata as the image gave it, in a rootless store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits with set-id and sticky (`0o7777`).
    pub perm: u32,
    /// What the entry is; `None` in the older three-field form (the file
    /// on disk tells).
    pub kind: Option<RecordedKind>,
}

/// The TYPE field of [`OVERRIDE_XATTR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordedKind {
    File,
    Dir,
    Symlink,
    Pipe,
    Socket,
    Char(u32, u32),
    Block(u32, u32),
}

impl Recorded {
    /// The attribute's value.
    pub fn format(&self) -> String {
        let kind = match self.kind {
            None => String::new(),
            Some(RecordedKind::File) => ":file".into(),
            Some(RecordedKind::Dir) => ":dir".into(),
            Some(RecordedKind::Symlink) => ":symlink".into(),
            Some(RecordedKind::Pipe) => ":pipe".into(),
            Some(RecordedKind::Socket) => ":socket".into(),
            Some(RecordedKind::Char(a, b)) => format!(":char-{a}-{b}"),
            Some(RecordedKind::Block(a, b)) => format!(":block-{a}-{b}"),
        };
        format!("{}:{}:0{:o}{kind}", self.uid, self.gid, self.perm & 0o7777)
    }

    /// Reads a value [`Recorded::format`] (or containers/storage) wrote;
    /// `None` for anything else.
    pub fn parse(v: &[u8]) -> Option<Recorded> {
        let s = std::str::from_utf8(v).ok()?;
        let mut f = s.split(':');
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let perm = u32::from_str_radix(f.next()?, 8).ok()?;
        let kind = match f.next() {
            None => None,
            Some("file") => Some(RecordedKind::File),
            Some("dir") => Some(RecordedKind::Dir),
            Some("symlink") => Some(RecordedKind::Symlink),
            Some("pipe") => Some(RecordedKind::Pipe),
            Some("socket") => Some(RecordedKind::Socket),
            Some(dev) => {
                let (k, nums) = dev.split_once('-')?;
                let (a, b) = nums.split_once('-')?;
                let (a, b) = (a.parse().ok()?, b.parse().ok()?);
                match k {
                    "char" => Some(RecordedKind::Char(a, b)),
                    "block" => Some(RecordedKind::Block(a, b)),
                    _ => return None,
                }
            }
        };
        if f.next().is_some() || perm > 0o7777 {
            return None;
        }
        Some(Recorded { uid, gid, perm, kind })
    }
}

/// The attribute on a directory that records the owner of its symbolic
/// link `name` (names may be 255 bytes; attribute names too, so a hash).
pub fn link_owner_xattr(name: &[u8]) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(name);
    format!("{LINK_OWNER_PREFIX}{}", hex::encode(&h[..16]))
}

/// The mode a rootless store gives a file on disk for permission bits
/// `perm`: no set-id or sticky bit, and the caller may always read (and
/// enter) it, since every reader of the layer is the caller.
pub fn disk_perm(perm: u32, dir: bool) -> u32 {
    (perm & 0o777) | if dir { 0o700 } else { 0o600 }
}

/// The name an image's extended attribute `name` is stored under.
pub fn stored_xattr_name(name: &str, own: Ownership) -> std::borrow::Cow<'_, str> {
    match own {
        Ownership::Real => name.into(),
        Ownership::Recorded => format!("{XATTR_PREFIX}{name}").into(),
    }
}

/// The image's extended attributes among an entry's stored ones (names
/// mapped back, gantry's and containers/storage's records left out).
pub fn image_xattrs(stored: Vec<(String, Vec<u8>)>, own: Ownership) -> Vec<(String, Vec<u8>)> {
    match own {
        Ownership::Real => stored,
        Ownership::Recorded => stored
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(XATTR_PREFIX).map(|k| (k.to_string(), v)))
            .collect(),
    }
}

/// `lstat` of `name` in `dir`, answered with the image's metadata: in a
/// rootless store the recorded owner, mode and type replace the disk's (a
/// device's or FIFO's stand-in reads as what it stands for, size 0). An entry without a
/// record (a directory made for what is below it, a link whose record a
/// later layer's directory hides) reads as root's, with the disk's mode.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr, own: Ownership) -> io::Result<Stat> {
    let mut st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if own == Ownership::Real {
        return Ok(st);
    }
    let ft = FileType::from_raw_mode(st.st_mode);
    if ft == FileType::Symlink {
        let (uid, gid) = get_xattr(dir, None, &link_owner_xattr(name.as_bytes()))?
            .and_then(|v| parse_owner(&v))
            .unwrap_or((0, 0));
        st.st_uid = uid;
        st.st_gid = gid;
        return Ok(st);
    }
    let Some(r) = get_xattr(dir, Some(name), OVERRIDE_XATTR)?.and_then(|v| Recorded::parse(&v)) else {
        // A directory the unpack made for an entry below it: root's, as
        // it is in a store made by root.
        st.st_uid = 0;
        st.st_gid = 0;
        return Ok(st);
    };
    st.st_uid = r.uid;
    st.st_gid = r.gid;
    let type_bits = match r.kind {
        Some(RecordedKind::Char(a, b)) if ft == FileType::RegularFile => {
            st.st_rdev = rustix::fs::makedev(a, b);
            st.st_size = 0;
            FileType::CharacterDevice.as_raw_mode()
        }
        Some(RecordedKind::Block(a, b)) if ft == FileType::RegularFile => {
            st.st_rdev = rustix::fs::makedev(a, b);
            st.st_size = 0;
            FileType::BlockDevice.as_raw_mode()
        }
        Some(RecordedKind::Pipe) if ft == FileType::RegularFile => {
            st.st_size = 0;
            FileType::Fifo.as_raw_mode()
        }
        _ => ft.as_raw_mode(),
    };
    st.st_mode = (type_bits | r.perm & 0o7777) as _;
    Ok(st)
}

/// `uid:gid`.
pub fn parse_owner(v: &[u8]) -> Option<(u32, u32)> {
    let (u, g) = std::str::from_utf8(v).ok()?.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// The value of attribute `key` of `name` in `dir` (of `dir` itself for
/// `None`), never through a link; `None` when it has none.
fn get_xattr(dir: BorrowedFd<'_>, name: Option<&OsStr>, key: &str) -> io::Result<Option<Vec<u8>>> {
    let mut v = vec![0u8; 256];
    let r = match name {
        None => rustix::fs::fgetxattr(dir, key, &mut v[..]),
        Some(n) => {
            let p = std::path::Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(n);
            rustix::fs::lgetxattr(&p, key, &mut v[..])
        }
    };
    match r {
        Ok(n) => {
            v.truncate(n);
            Ok(Some(v))
        }
        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => Ok(None),
        // Longer than any record gantry writes: not one.
        Err(rustix::io::Errno::RANGE) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written_and_as_containers_storage_writes_them() {
        for r in [
            Recorded {
                uid: 0,
                gid: 0,
                perm: 0o4755,
                kind: Some(RecordedKind::File),
            },
            Recorded {
                uid: 1000,
                gid: 5678,
                perm: 0o1777,
                kind: Some(RecordedKind::Dir),
            },
            Recorded {
                uid: 0,
                gid: 6,
                perm: 0o660,
                kind: Some(RecordedKind::Block(8, 1)),
            },
            Recorded {
                uid: 7,
                gid: 7,
                perm: 0o644,
                kind: None,
            },
        ] {
            assert_eq!(Recorded::parse(r.format().as_bytes()), Some(r), "{}", r.format());
        }
        assert_eq!(Recorded::parse(b"0:0:04755:file").unwrap().perm, 0o4755);
        assert_eq!(
            Recorded::parse(b"0:0:0666:char-1-3").unwrap().kind,
            Some(RecordedKind::Char(1, 3))
        );
        for bad in [
            &b"0:0"[..],
            b"x:0:0644",
            b"0:0:0644:file:extra",
            b"0:0:077777",
            b"0:0:0644:tty-1-2",
        ] {
            assert_eq!(Recorded::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn disk_modes_drop_set_id_and_sticky_bits_and_keep_the_caller_in() {
        assert_eq!(disk_perm(0o4755, false), 0o755);
        assert_eq!(disk_perm(0o2000, false), 0o600);
        assert_eq!(disk_perm(0o1777, true), 0o777);
        assert_eq!(disk_perm(0o000, true), 0o700);
    }

    #[test]
    fn image_attributes_are_kept_under_gantry_s_prefix_and_records_are_no_image_s() {
        assert_eq!(
            stored_xattr_name("security.capability", Ownership::Recorded),
            "user.gantry.xattr.security.capability"
        );
        assert_eq!(stored_xattr_name("user.x", Ownership::Real), "user.x");
        let stored = vec![
            (OVERRIDE_XATTR.to_string(), b"0:0:0644".to_vec()),
            ("user.gantry.xattr.user.x".to_string(), b"1".to_vec()),
            ("user.gantry.link.00".to_string(), b"0:0".to_vec()),
        ];
        assert_eq!(
            image_xattrs(stored, Ownership::Recorded),
            vec![("user.x".to_string(), b"1".to_vec())]
        );
    }
}
