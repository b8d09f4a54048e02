//! Image archives (`docker save` tars, OCI layout tars) read safely and
//! without unpacking them.
//!
//! A seekable file is indexed in one pass: each entry's name, and where its
//! data lies, so layers are read in place later. Standard input cannot be
//! read twice, so what is read out of order is spooled under the store's
//! `tmp/` (small entries stay in memory). Every name is checked as it is
//! indexed: absolute names, `..` and duplicates are refused, and links
//! between entries are followed only inside the archive. Nothing here
//! trusts what the archive says about its contents; the loader verifies.

use crate::error::{Error, IoContext, Result};
use crate::path::Unsafe;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Entries at most this big are kept in memory when reading a stream.
const SMALL: u64 = 1 << 20;
/// Total bytes of small entries kept in memory before spooling the rest.
const MEMORY_BUDGET: u64 = 32 << 20;
const MAX_LINKS: usize = 16;
/// The most entries an image archive may have (what 1,024 images of 128
/// layers need, with room to spare).
const MAX_ENTRIES: usize = 1 << 18;

#[derive(Clone)]
enum Data {
    InFile {
        offset: u64,
        size: u64,
    },
    Memory(Arc<Vec<u8>>),
    Spooled {
        path: PathBuf,
        size: u64,
    },
    /// A symbolic or hard link to another entry (a clean archive path).
    Link(String),
    Dir,
    /// Consumed as it streamed by the reader's hook (a layer applied in order).
    Taken,
}

/// Offered each large entry of a stream before it is spooled: given the
/// entry's name, the index so far, and its data, it may consume the data
/// and return true, or leave it untouched and return false.
pub type TakeHook<'h> = dyn FnMut(&str, &ArchiveIndex, &mut dyn Read) -> Result<bool> + 'h;

pub struct ArchiveIndex {
    file: Option<Arc<File>>,
    entries: HashMap<String, Data>,
    spool: Option<PathBuf>,
    spooled: u64,
}

impl Drop for ArchiveIndex {
    fn drop(&mut self) {
        if let Some(dir) = &self.spool {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn bad(msg: String) -> Error {
    Error::InvalidManifest(msg)
}

/// Cleans an archive path: no absolute names, no `..`, no empty result.
pub fn clean(raw: &str) -> Result<String> {
    match crate::path::components(raw) {
        Err(Unsafe::Absolute) => Err(bad(format!("archive name {raw:?} is absolute"))),
        Err(Unsafe::Climbs) => Err(bad(format!("archive name {raw:?} leaves the archive"))),
        Ok(parts) if parts.is_empty() => Err(bad(format!("archive name {raw:?} names nothing"))),
        Ok(parts) => Ok(parts.join("/")),
    }
}

/// Resolves a link target relative to the directory of `from`, inside the archive.
fn join_link(from: &str, target: &str, hard: bool) -> Result<String> {
    if hard {
        return clean(target);
    }
    if target.starts_with('/') {
        return Err(bad(format!("archive link {from:?} points outside the archive")));
    }
    let dir = from.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(bad(format!("archive link {from:?} points outside the archive")));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

impl ArchiveIndex {
    fn insert(entries: &mut HashMap<String, Data>, name: String, data: Data) -> Result<()> {
        if entries.len() >= MAX_ENTRIES {
            return Err(bad(format!("the archive has more than {MAX_ENTRIES} entries")));
        }
        if let Some(old) = entries.get(&name) {
            if matches!((old, &data), (Data::Dir, Data::Dir)) {
                return Ok(());
            }
            return Err(bad(format!("archive has two entries named {name:?}")));
        }
        entries.insert(name, data);
        Ok(())
    }

    fn link_of(e: &tar::Entry<'_, impl Read>, name: &str) -> Result<Option<Data>> {
        let kind = e.header().entry_type();
        if !(kind.is_symlink() || kind.is_hard_link()) {
            return Ok(None);
        }
        let target = e
            .link_name_bytes()
            .ok_or_else(|| bad(format!("archive link {name:?} has no target")))?;
        let target =
            String::from_utf8(target.into_owned()).map_err(|_| bad("archive link target is not UTF-8".into()))?;
        Ok(Some(Data::Link(join_link(name, &target, kind.is_hard_link())?)))
    }

    fn entry_name(e: &tar::Entry<'_, impl Read>) -> Result<String> {
        let raw =
            String::from_utf8(e.path_bytes().into_owned()).map_err(|_| bad("archive name is not UTF-8".into()))?;
        clean(&raw)
    }

    /// Indexes a seekable archive file in one pass.
    pub fn from_file(file: File) -> Result<ArchiveIndex> {
        let file = Arc::new(file);
        let mut entries = HashMap::new();
        {
            // The guard refuses oversized extension records before the tar
            // parser would read them whole.
            let mut ar = tar::Archive::new(crate::tarsplit::Splitter::guard(&*file));
            for e in ar.entries().map_err(|e| bad(format!("not a tar archive: {e}")))? {
                let e = e.map_err(|e| bad(format!("corrupt archive: {e}")))?;
                let name = match Self::entry_name(&e) {
                    Ok(n) => n,
                    Err(_)
                        if e.header().entry_type().is_dir()
                            && e.path_bytes().iter().all(|b| *b == b'.' || *b == b'/') =>
                    {
                        continue
                    }
                    Err(err) => return Err(err),
                };
                let data = match Self::link_of(&e, &name)? {
                    Some(l) => l,
                    None if e.header().entry_type().is_dir() => Data::Dir,
                    None if e.header().entry_type().is_file() => Data::InFile {
                        offset: e.raw_file_position(),
                        size: e.size(),
                    },
                    None => continue,
                };
                Self::insert(&mut entries, name, data)?;
            }
        }
        Ok(ArchiveIndex {
            file: Some(file),
            entries,
            spool: None,
            spooled: 0,
        })
    }

    /// Reads an archive from a stream, spooling what is large into `spool`
    /// (a fresh directory, removed when the index is dropped).
    pub fn from_stream(r: impl Read, spool: &Path) -> Result<ArchiveIndex> {
        Self::from_stream_with(r, spool, &mut |_, _, _| Ok(false), &|_| Ok(()))
    }

    /// Like [`from_stream`](Self::from_stream), offering each large entry to
    /// `take` first: what it consumes is never spooled. What is spooled is
    /// first given to `charge` by its declared size (a quota's refusal).
    pub fn from_stream_with(
        r: impl Read,
        spool: &Path,
        take: &mut TakeHook<'_>,
        charge: &dyn Fn(u64) -> Result<()>,
    ) -> Result<ArchiveIndex> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(spool)
            .ctx(format!("creating {}", spool.display()))?;
        let mut index = ArchiveIndex {
            file: None,
            entries: HashMap::new(),
            spool: Some(spool.to_path_buf()),
            spooled: 0,
        };
        let mut in_memory = 0u64;
        let mut spool_buf = vec![0u8; 1 << 20];
        let mut ar = tar::Archive::new(crate::tarsplit::Splitter::guard(io::BufReader::with_capacity(
            1 << 20,
            r,
        )));
        for (n, e) in ar
            .entries()
            .map_err(|e| bad(format!("not a tar archive: {e}")))?
            .enumerate()
        {
            let mut e = e.map_err(|e| bad(format!("corrupt archive: {e}")))?;
            let name = match Self::entry_name(&e) {
                Ok(n) => n,
                Err(_)
                    if e.header().entry_type().is_dir() && e.path_bytes().iter().all(|b| *b == b'.' || *b == b'/') =>
                {
                    continue
                }
                Err(err) => return Err(err),
            };
            let data = match Self::link_of(&e, &name)? {
                Some(l) => l,
                None if e.header().entry_type().is_dir() => Data::Dir,
                None if e.header().entry_type().is_file() => {
                    let size = e.size();
                    if size <= SMALL && in_memory + size <= MEMORY_BUDGET {
                        let mut buf = Vec::with_capacity(size as usize);
                        e.read_to_end(&mut buf)
                            .map_err(|err| bad(format!("corrupt archive at {name:?}: {err}")))?;
                        in_memory += size;
                        Data::Memory(Arc::new(buf))
                    } else if take(&name, &index, &mut e)? {
                        Data::Taken
                    } else {
                        charge(size)?;
                        let path = spool.join(n.to_string());
                        let mut f = File::create(&path).ctx("spooling standard input")?;
                        let mut copied = 0u64;
                        loop {
                            let n = e
                                .read(&mut spool_buf)
                                .map_err(|err| bad(format!("corrupt archive at {name:?}: {err}")))?;
                            if n == 0 {
                                break;
                            }
                            f.write_all(&spool_buf[..n]).ctx("spooling standard input")?;
                            copied += n as u64;
                        }
                        index.spooled += copied;
                        Data::Spooled { path, size: copied }
                    }
                }
                None => continue,
            };
            Self::insert(&mut index.entries, name, data)?;
        }
        Ok(index)
    }

    /// Follows links to the entry holding data.
    fn resolve(&self, name: &str) -> Result<(String, &Data)> {
        let mut cur = clean(name)?;
        for _ in 0..MAX_LINKS {
            match self.entries.get(&cur) {
                None => return Err(bad(format!("the archive has no {name:?}"))),
                Some(Data::Link(t)) => cur = t.clone(),
                Some(d) => return Ok((cur, d)),
            }
        }
        Err(bad(format!("archive link {name:?} loops")))
    }

    /// How many bytes of a stream had to be spooled to disk.
    pub fn spooled(&self) -> u64 {
        self.spooled
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }

    /// The size of an entry's data.
    pub fn size(&self, name: &str) -> Result<u64> {
        match self.resolve(name)?.1 {
            Data::InFile { size, .. } | Data::Spooled { size, .. } => Ok(*size),
            Data::Memory(b) => Ok(b.len() as u64),
            _ => Err(bad(format!("archive entry {name:?} is not a file"))),
        }
    }

    /// Opens an entry's data for reading.
    pub fn open(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        match self.resolve(name)?.1 {
            Data::InFile { offset, size } => Ok(Box::new(Slice {
                file: self.file.clone().expect("file-backed"),
                pos: *offset,
                end: offset + size,
            })),
            Data::Memory(b) => Ok(Box::new(io::Cursor::new(SharedBytes(b.clone())))),
            Data::Spooled { path, .. } => Ok(Box::new(File::open(path).ctx("reading a spooled entry")?)),
            Data::Taken => Err(bad(format!("archive entry {name:?} was consumed as it streamed"))),
            _ => Err(bad(format!("archive entry {name:?} is not a file"))),
        }
    }

    /// Reads a small entry whole, refusing one larger than `limit`.
    pub fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let size = self.size(name)?;
        if size > limit {
            return Err(bad(format!("archive entry {name:?} is larger than {limit} bytes")));
        }
        let mut out = Vec::with_capacity(size as usize);
        self.open(name)?
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("reading {name:?}: {e}")))?;
        Ok(out)
    }
}

struct SharedBytes(Arc<Vec<u8>>);
impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A window of the archive file, read with `pread` so readers can share it.
struct Slice {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the archive is truncated"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_links_stay_inside() {
        assert_eq!(clean("./a//b/").unwrap(), "a/b");
        assert!(clean("/etc/passwd").is_err());
        assert!(clean("a/../../b").is_err());
        assert_eq!(
            join_link("blobs/x/layer.tar", "../../blobs/sha256/ab", false).unwrap(),
            "blobs/sha256/ab"
        );
        assert!(join_link("a/layer.tar", "../../etc", false).is_err());
        assert!(join_link("a/layer.tar", "/etc/passwd", false).is_err());
    }
}
