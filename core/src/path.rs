//! The one rule for names that come from untrusted places (archive entries,
//! layer tars, driver requests): relative, and never climbing with `..`.
//!
//! Callers say what the name was in their own words; this module only
//! decides. Resolution beneath a real directory (links included) is the
//! host's job, with `openat2(RESOLVE_BENEATH)`.

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsafe {
    Absolute,
    /// A `..` component.
    Climbs,
}

/// The components of `raw`, dropping empty ones and `.`; refuses absolute
/// names and `..`.
pub fn components(raw: &str) -> Result<Vec<&str>, Unsafe> {
    if raw.starts_with('/') {
        return Err(Unsafe::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(Unsafe::Climbs),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// [`components`] of a name that is bytes (Linux names need not be UTF-8).
pub fn components_bytes(raw: &[u8]) -> Result<Vec<&[u8]>, Unsafe> {
    if raw.first() == Some(&b'/') {
        return Err(Unsafe::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(Unsafe::Climbs),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Opens regular file `rel` beneath the directory `root` for reading,
/// without following any link and without opening anything else: the name
/// is first opened `O_PATH` (which has no effect on a device, FIFO or
/// socket), checked with `fstat`, and only a regular file is reopened for
/// reading, through its `/proc/self/fd` entry, so the inode checked is the
/// inode read.
pub fn open_regular_beneath(root: std::os::fd::BorrowedFd<'_>, rel: &[u8]) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use std::os::fd::AsRawFd;
    let comps = components_bytes(rel).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {}", crate::text::quote_bytes(rel), e.describe()),
        )
    })?;
    let clean: Vec<u8> = if comps.is_empty() {
        b".".to_vec()
    } else {
        comps.join(&b'/')
    };
    let handle = rustix::fs::openat2(
        root,
        clean.as_slice(),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let st = rustix::fs::fstat(&handle)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not a regular file", crate::text::quote_bytes(rel)),
        ));
    }
    let fd = rustix::fs::open(
        format!("/proc/self/fd/{}", handle.as_raw_fd()).as_str(),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let again = rustix::fs::fstat(&fd)?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(std::io::Error::other("a file changed while it was being opened"));
    }
    Ok(std::fs::File::from(fd))
}

impl Unsafe {
    pub fn describe(self) -> &'static str {
        match self {
            Unsafe::Absolute => "an absolute name is not allowed",
            Unsafe::Climbs => "the name leaves its directory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_absolute_and_climbing_names() {
        assert_eq!(components("./a//b/."), Ok(vec!["a", "b"]));
        assert_eq!(components("/etc"), Err(Unsafe::Absolute));
        assert_eq!(components("a/../b"), Err(Unsafe::Climbs));
        assert_eq!(components(""), Ok(vec![]));
        assert_eq!(
            components_bytes(b"a/\xff/./b"),
            Ok(vec![&b"a"[..], &b"\xff"[..], &b"b"[..]])
        );
        assert_eq!(components_bytes(b"x/../y"), Err(Unsafe::Climbs));
    }
}
