//! File-by-file listings of a tar stream or a directory, for comparing
//! `gantry export` with `umoci unpack`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What is compared of one path: type, mode, owner, size, content, link target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub sha: String,
    pub link: String,
}

pub type Listing = BTreeMap<String, Meta>;

fn clean(p: &str) -> String {
    p.trim_start_matches("./").trim_end_matches('/').to_string()
}

/// Lists a tar stream; hard links take their target's metadata.
pub fn of_tar(r: impl Read) -> Listing {
    let mut ar = tar::Archive::new(r);
    let mut out = Listing::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = clean(&String::from_utf8_lossy(&e.path_bytes()));
        if path.is_empty() || path == "." {
            continue;
        }
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Link => {
                let target = clean(&String::from_utf8_lossy(&e.link_name_bytes().unwrap()));
                let m = out
                    .get(&target)
                    .unwrap_or_else(|| panic!("hard link {path} to unknown {target}"))
                    .clone();
                out.insert(path, m);
                continue;
            }
            t => panic!("unexpected tar entry type {t:?} for {path}"),
        };
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let link = if kind == 'l' {
            String::from_utf8_lossy(&e.link_name_bytes().unwrap()).into_owned()
        } else {
            String::new()
        };
        out.insert(
            path,
            Meta {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                size: if kind == 'f' { data.len() as u64 } else { 0 },
                sha: if kind == 'f' {
                    crate::image::sha256(&data)
                } else {
                    String::new()
                },
                link,
            },
        );
    }
    out
}

/// Lists a directory tree (not following links).
pub fn of_dir(root: &Path) -> Listing {
    let mut out = Listing::new();
    walk(root, root, &mut out);
    out
}

fn walk(base: &Path, dir: &Path, out: &mut Listing) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else if ft.is_fifo() {
            'p'
        } else {
            '?'
        };
        let data = if kind == 'f' {
            std::fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            rel,
            Meta {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid() as u64,
                gid: md.gid() as u64,
                size: if kind == 'f' { data.len() as u64 } else { 0 },
                sha: if kind == 'f' {
                    crate::image::sha256(&data)
                } else {
                    String::new()
                },
                link: if kind == 'l' {
                    std::fs::read_link(&p).unwrap().display().to_string()
                } else {
                    String::new()
                },
            },
        );
        if kind == 'd' {
            walk(base, &p, out);
        }
    }
}

/// Panics with every difference between two listings.
pub fn assert_same(ours: &Listing, theirs: &Listing, what: &str) {
    let mut diffs = Vec::new();
    for (p, m) in ours {
        match theirs.get(p) {
            None => diffs.push(format!("only in gantry: {p} {m:?}")),
            Some(t) if t != m => diffs.push(format!("differs: {p}\n  gantry: {m:?}\n  peer:   {t:?}")),
            _ => {}
        }
    }
    for (p, m) in theirs {
        if !ours.contains_key(p) {
            diffs.push(format!("only in peer: {p} {m:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
