//! The driver conformance suite (`gantry plugin test`), after Docker's
//! graphtest and containerd's snapshotter testsuite: what any graph driver
//! must do, checked against the host's own reference (the confined
//! `unpack` of the same tars into a scratch directory), so a third party's
//! driver is held to exactly what gantry's drivers are.
//!
//! Each check is one line of the report; a check that fails says why and
//! the suite goes on where it can.

use crate::confined::{self, Whiteouts};
use crate::plugin::AnyDriver;
use gantry_core::ownership::{image_xattrs, stat_at, Ownership};
use gantry_core::GraphDriver;
use rustix::fs::{FileType, Mode, OFlags};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One check's outcome.
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), String>,
}

/// A tree as a sorted listing: path → what a driver must keep of it.
type Listing = BTreeMap<String, String>;

fn listing(root: &Path) -> Result<Listing, String> {
    let mut out = Listing::new();
    let mut inodes: HashMap<(u64, u64), String> = HashMap::new();
    walk(root, root, &mut out, &mut inodes).map_err(|e| format!("listing {}: {e}", root.display()))?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Listing, inodes: &mut HashMap<(u64, u64), String>) -> std::io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    let own = Ownership::of_process();
    let parent = rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    for e in names {
        let p = e.path();
        let rel = p.strip_prefix(root).expect("below root").to_string_lossy().into_owned();
        let md = std::fs::symlink_metadata(&p)?;
        // The image's metadata: in a rootless store, the recorded one.
        let st = stat_at(parent.as_fd(), &e.file_name(), own)?;
        let ft = md.file_type();
        let recorded_node = ft.is_file() && FileType::from_raw_mode(st.st_mode) != FileType::RegularFile;
        let mut xattrs: Vec<String> = Vec::new();
        if let Ok(names) = xattr_names(&p) {
            let names = image_xattrs(names.into_iter().map(|n| (n, Vec::new())).collect(), own);
            for (n, _) in names {
                // overlayfs's own attributes are listed so that none shows:
                // a mount hides them, a tree never has them.
                if n.starts_with("user.") || n.starts_with("security.capability") || n.starts_with("trusted.overlay.") {
                    xattrs.push(n);
                }
            }
        }
        let mode = st.st_mode & 0o7777;
        let owner = format!("{}:{}", st.st_uid, st.st_gid);
        let what = if ft.is_dir() {
            format!("dir {mode:o} {owner} {xattrs:?}")
        } else if let Some(first) = (!ft.is_dir() && md.nlink() > 1)
            .then(|| inodes.get(&(md.dev(), md.ino())).cloned())
            .flatten()
        {
            format!("hardlink to {first}")
        } else {
            if md.nlink() > 1 {
                inodes.insert((md.dev(), md.ino()), rel.clone());
            }
            if ft.is_file() && !recorded_node {
                let mut h = sha2::Sha256::default();
                let mut f = std::fs::File::open(&p)?;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    sha2::Digest::update(&mut h, &buf[..n]);
                }
                format!(
                    "file {mode:o} {owner} {} {} mtime {} {xattrs:?}",
                    md.len(),
                    hex::encode(sha2::Digest::finalize(h)),
                    md.mtime()
                )
            } else if ft.is_symlink() {
                format!("symlink -> {} {owner}", std::fs::read_link(&p)?.to_string_lossy())
            } else {
                format!("node {:o} {mode:o} {owner} rdev {}", st.st_mode & 0o170000, st.st_rdev)
            }
        };
        out.insert(rel, what);
        if ft.is_dir() {
            walk(root, &p, out, inodes)?;
        }
    }
    Ok(())
}

fn xattr_names(p: &Path) -> std::io::Result<Vec<String>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).map_err(std::io::Error::from)?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|k| !k.is_empty())
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect())
}

fn compare(want: &Listing, got: &Listing) -> Result<(), String> {
    for (k, v) in want {
        match got.get(k) {
            None => return Err(format!("{k:?} is missing")),
            Some(g) if g != v => return Err(format!("{k:?}: expected {v}, the driver has {g}")),
            _ => {}
        }
    }
    if let Some(extra) = got.keys().find(|k| !want.contains_key(*k)) {
        return Err(format!("{extra:?} should not be there"));
    }
    Ok(())
}

/// A header owned by root with a fixed time, as the suite's tars use.
fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h
}

/// Appends regular file `p` holding `data`.
fn add_file(b: &mut tar::Builder<Vec<u8>>, p: &str, mode: u32, data: &[u8], mtime: u64) {
    b.append_data(
        &mut header(tar::EntryType::Regular, mode, data.len() as u64, mtime),
        p,
        data,
    )
    .unwrap()
}

/// The suite's base: a rich tree (its device node recorded, not made, in a
/// rootless store).
fn base_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| header(kind, mode, size, 1_700_000_000);
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0), p, std::io::empty())
            .unwrap()
    };
    dir(&mut b, "etc/");
    dir(&mut b, "opaque/");
    dir(&mut b, "usr/bin/");
    let file =
        |b: &mut tar::Builder<Vec<u8>>, p: &str, mode: u32, data: &[u8]| add_file(b, p, mode, data, 1_700_000_000);
    file(&mut b, "etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n");
    file(&mut b, "etc/gone", 0o600, b"deleted by the child\n");
    file(&mut b, "opaque/hidden", 0o644, b"hidden by the child\n");
    file(&mut b, "usr/bin/su", 0o4755, b"setuid binary\n");
    file(
        &mut b,
        &format!("usr/{}/deep", "long-directory-name".repeat(8)),
        0o644,
        b"a long name\n",
    );
    b.append_pax_extensions([("SCHILY.xattr.user.gantry", &b"conformance"[..])])
        .unwrap();
    file(&mut b, "etc/with-xattr", 0o644, b"x\n");
    b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), "etc/link", "passwd")
        .unwrap();
    b.append_link(&mut header(tar::EntryType::Link, 0o644, 0), "etc/hard", "etc/passwd")
        .unwrap();
    b.append_data(
        &mut header(tar::EntryType::Fifo, 0o644, 0),
        "etc/fifo",
        std::io::empty(),
    )
    .unwrap();
    let mut h = header(tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "etc/null", std::io::empty()).unwrap();
    b.into_inner().unwrap()
}

/// The base's child: it modifies, adds, deletes (a whiteout) and makes a
/// directory opaque.
fn child_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |p: &str, data: &[u8]| add_file(&mut b, p, 0o644, data, 1_700_000_100);
    add("etc/passwd", b"root:x:0:0::/root:/bin/bash\n");
    add("etc/.wh.gone", b"");
    add("opaque/.wh..wh..opq", b"");
    add("opaque/new", b"the only file left here\n");
    add("added", b"new in the child\n");
    b.into_inner().unwrap()
}

/// A stack with links, whiteouts and opaque directories across layers,
/// every one allowed by the core's layer rules: a base with links, a
/// child that whites out a link, replaces one with a directory and a
/// directory with a link, and empties a directory that held one, and a
/// grandchild that makes a directory where the whited-out link was.
fn link_stack() -> [Vec<u8>; 3] {
    let t = 1_700_000_000;
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        b.append_data(&mut header(tar::EntryType::Directory, 0o755, 0, t), p, std::io::empty())
            .unwrap()
    };
    let link = |b: &mut tar::Builder<Vec<u8>>, p: &str, to: &str| {
        b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0, t), p, to)
            .unwrap()
    };
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "real/");
    add_file(&mut b, "real/x", 0o644, b"the link's target\n", t);
    link(&mut b, "lnk", "real");
    link(&mut b, "out", "../../..");
    dir(&mut b, "d/");
    link(&mut b, "d/inner", "../real");
    dir(&mut b, "o/");
    add_file(&mut b, "o/keep", 0o644, b"hidden by the child\n", t);
    link(&mut b, "o/ln", "../real");
    dir(&mut b, "dx/");
    add_file(&mut b, "dx/f", 0o644, b"hidden by a link\n", t);
    let base = b.into_inner().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, ".wh.lnk", 0o644, b"", t);
    add_file(&mut b, ".wh.out", 0o644, b"", t);
    dir(&mut b, "d/");
    dir(&mut b, "d/inner/");
    add_file(&mut b, "d/inner/f", 0o644, b"a directory where a link was\n", t);
    dir(&mut b, "o/");
    add_file(&mut b, "o/.wh..wh..opq", 0o644, b"", t);
    add_file(&mut b, "o/new", 0o644, b"the only file left here\n", t);
    link(&mut b, "dx", "real");
    let child = b.into_inner().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "lnk/");
    add_file(&mut b, "lnk/f", 0o644, b"a directory where a link was whited out\n", t);
    add_file(&mut b, "d/inner/g", 0o644, b"beside f\n", t);
    let grandchild = b.into_inner().unwrap();
    [base, child, grandchild]
}

/// A first layer with whiteouts and an opaque marker: nothing beneath to
/// hide, so nothing of them may show.
fn first_whiteouts_tar() -> Vec<u8> {
    let t = 1_700_000_000;
    let mut b = tar::Builder::new(Vec::new());
    add_file(&mut b, "keep", 0o644, b"kept\n", t);
    add_file(&mut b, ".wh.ghost", 0o644, b"", t);
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0, t),
        "o/",
        std::io::empty(),
    )
    .unwrap();
    add_file(&mut b, "o/.wh..wh..opq", 0o644, b"", t);
    add_file(&mut b, "o/f", 0o644, b"in an opaque directory\n", t);
    b.into_inner().unwrap()
}

/// Checks that `tars`, applied in order, keep the core's layer rules (the
/// suite's own stacks are ones the core would hand a driver).
fn keeps_the_rules(tars: &[&[u8]]) -> Result<(), String> {
    let rules = std::sync::Arc::new(std::sync::Mutex::new(gantry_core::layer_rules::LayerRules::new()));
    for t in tars {
        let mut s = gantry_core::tarsplit::Splitter::guard(*t).with_rules(rules.clone());
        std::io::copy(&mut s, &mut std::io::sink()).map_err(|e| format!("the suite's own stack: {e}"))?;
    }
    Ok(())
}

fn layer_tar(i: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    add_file(
        &mut b,
        &format!("layers/{i}"),
        0o644,
        format!("layer {i}\n").as_bytes(),
        1_700_000_000,
    );
    b.into_inner().unwrap()
}

/// The bytes of the regular files in a tar: what `apply-diff` returns.
fn regular_bytes(tar: &[u8]) -> u64 {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .expect("a tar the suite built")
        .filter_map(|e| e.ok())
        .filter(|e| e.header().entry_type() == tar::EntryType::Regular)
        .map(|e| e.size())
        .sum()
}

/// The reference: the host's own unpack of `tars`, in order, into `dir`.
fn reference(dir: &Path, tars: &[&[u8]]) -> Result<Listing, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| e.to_string())?;
    for t in tars {
        confined::unpack(std::os::fd::AsFd::as_fd(&fd), *t, Whiteouts::Delete).map_err(|e| e.to_string())?;
    }
    listing(dir)
}

/// The path of an open directory, for walking it with `std::fs`.
fn fd_path(fd: &std::os::fd::OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// What `get` shows of layer `id`.
fn view(d: &AnyDriver, id: &str) -> Result<Listing, String> {
    let fd = d.get(id).map_err(|e| e.to_string())?;
    let l = listing(&fd_path(&fd));
    d.put(id).map_err(|e| format!("put: {e}"))?;
    l
}

/// What the checks share: the driver, the scratch directory for the
/// reference trees, and the suite's base and child tars.
struct Suite<'a> {
    d: &'a AnyDriver,
    scratch: &'a Path,
    base: Vec<u8>,
    child: Vec<u8>,
}

impl Suite<'_> {
    /// Creates layer `id` on `parent` and applies `tar` to it: the size
    /// `apply-diff` reports.
    fn apply(&self, id: &str, parent: Option<&str>, tar: &[u8]) -> Result<u64, String> {
        self.d.create(id, parent).map_err(msg)?;
        self.d
            .apply_diff(id, parent, Box::new(std::io::Cursor::new(tar.to_vec())))
            .map_err(msg)
    }

    /// The reference tree of `tars`, unpacked in scratch directory `name`.
    fn reference(&self, name: &str, tars: &[&[u8]]) -> Result<Listing, String> {
        reference(&self.scratch.join(name), tars)
    }

    /// Whether layer `id` shows the reference tree of `tars` (unpacked in
    /// scratch directory `name`).
    fn shows(&self, id: &str, name: &str, tars: &[&[u8]]) -> Result<(), String> {
        compare(&self.reference(name, tars)?, &view(self.d, id)?)
    }
}

fn msg(e: gantry_core::PluginError) -> String {
    e.to_string()
}

/// A check: its line of the report, and what it does.
type CheckFn = fn(&Suite<'_>) -> Result<(), String>;

/// The first check. Every later one builds on the layer it makes, so the
/// suite stops when it fails.
const FIRST: (&str, CheckFn) = (
    "create and apply-diff a rich tree (files, dirs, links, hard links, fifo, devices, xattrs, setuid, long names)",
    rich_tree,
);

/// The other checks, in order: some use the layers earlier ones made, and
/// the last removes them all.
const CHECKS: &[(&str, CheckFn)] = &[
    ("a child layer applies whiteouts and opaque directories", child_layer),
    ("the parent is unchanged by its child", parent_unchanged),
    ("diff round-trips through apply-diff to the same tree", diff_round_trip),
    ("changes lists what the child changed", changes_of_child),
    (
        "links, whiteouts and opaque directories across layers show the core's tree",
        links_across_layers,
    ),
    (
        "a first layer's whiteouts and opaque markers leave nothing to see",
        first_layer_whiteouts,
    ),
    ("diff-size is the size of what changed", diff_size),
    ("a writable layer is a copy its parent never sees", writable_copy),
    ("thirty layers deep", thirty_deep),
    ("concurrent get and put", concurrent_get_put),
    ("get of a layer that does not exist fails", get_missing),
    ("remove, and exists says so", remove_all),
];

/// Runs the suite against `d`, using `scratch` (an empty directory outside
/// the driver's home) for the reference trees.
pub fn run(d: &AnyDriver, scratch: &Path) -> Vec<Check> {
    let suite = Suite {
        d,
        scratch,
        base: base_tar(),
        child: child_tar(),
    };
    let check = |&(name, f): &(&'static str, CheckFn)| Check {
        name,
        result: f(&suite),
    };
    let first = check(&FIRST);
    let go_on = first.result.is_ok();
    let mut out = vec![first];
    if go_on {
        out.extend(CHECKS.iter().map(check));
    }
    out
}

fn rich_tree(s: &Suite<'_>) -> Result<(), String> {
    let size = s.apply("conf-base", None, &s.base)?;
    let want = regular_bytes(&s.base);
    if size != want {
        return Err(format!("apply-diff said {size} bytes, the regular files hold {want}"));
    }
    if !s.d.exists("conf-base").map_err(msg)? {
        return Err("exists says no after create".into());
    }
    s.shows("conf-base", "base", &[&s.base])
}

fn child_layer(s: &Suite<'_>) -> Result<(), String> {
    s.apply("conf-child", Some("conf-base"), &s.child)?;
    s.shows("conf-child", "child", &[&s.base, &s.child])
}

fn parent_unchanged(s: &Suite<'_>) -> Result<(), String> {
    s.shows("conf-base", "base2", &[&s.base])
}

fn diff_round_trip(s: &Suite<'_>) -> Result<(), String> {
    let mut tar = Vec::new();
    s.d.diff("conf-child", Some("conf-base"))
        .map_err(msg)?
        .read_to_end(&mut tar)
        .map_err(|e| e.to_string())?;
    s.apply("conf-round", Some("conf-base"), &tar)?;
    compare(&view(s.d, "conf-child")?, &view(s.d, "conf-round")?)
}

fn changes_of_child(s: &Suite<'_>) -> Result<(), String> {
    let mut got = s.d.changes("conf-child", Some("conf-base")).map_err(msg)?;
    got.sort();
    for want in [
        ("/added", "add"),
        ("/etc/gone", "delete"),
        ("/etc/passwd", "modify"),
        ("/opaque/hidden", "delete"),
        ("/opaque/new", "add"),
    ] {
        if !got.iter().any(|(p, k)| p == want.0 && *k == want.1) {
            return Err(format!("{} ({}) is not in {got:?}", want.0, want.1));
        }
    }
    Ok(())
}

fn links_across_layers(s: &Suite<'_>) -> Result<(), String> {
    let [l0, l1, l2] = link_stack();
    keeps_the_rules(&[&l0, &l1, &l2])?;
    s.apply("conf-links-0", None, &l0)?;
    s.apply("conf-links-1", Some("conf-links-0"), &l1)?;
    s.apply("conf-links-2", Some("conf-links-1"), &l2)?;
    s.shows("conf-links-1", "links1", &[&l0, &l1])?;
    s.shows("conf-links-2", "links2", &[&l0, &l1, &l2])
}

fn first_layer_whiteouts(s: &Suite<'_>) -> Result<(), String> {
    let tar = first_whiteouts_tar();
    s.apply("conf-first-wh", None, &tar)?;
    s.shows("conf-first-wh", "first-wh", &[&tar])?;
    let changes = s.d.changes("conf-first-wh", None).map_err(msg)?;
    match changes.iter().find(|(p, _)| p.contains("ghost")) {
        Some(c) => Err(format!("changes shows the whiteout: {c:?}")),
        None => Ok(()),
    }
}

fn diff_size(s: &Suite<'_>) -> Result<(), String> {
    let n = s.d.diff_size("conf-child", Some("conf-base")).map_err(msg)?;
    if n == 0 {
        return Err("diff-size is 0".into());
    }
    Ok(())
}

fn writable_copy(s: &Suite<'_>) -> Result<(), String> {
    s.d.create_read_write("conf-rw", Some("conf-base")).map_err(msg)?;
    let fd = s.d.get("conf-rw").map_err(msg)?;
    let r = std::fs::write(fd_path(&fd).join("etc/passwd"), b"edited in place\n").map_err(|e| e.to_string());
    s.d.put("conf-rw").map_err(msg)?;
    r?;
    s.shows("conf-base", "base3", &[&s.base])
}

fn thirty_deep(s: &Suite<'_>) -> Result<(), String> {
    let tars: Vec<Vec<u8>> = (0..30).map(layer_tar).collect();
    let mut parent: Option<String> = None;
    for (i, t) in tars.iter().enumerate() {
        let id = format!("conf-deep-{i}");
        s.apply(&id, parent.as_deref(), t)?;
        parent = Some(id);
    }
    let refs: Vec<&[u8]> = tars.iter().map(|t| t.as_slice()).collect();
    s.shows("conf-deep-29", "deep", &refs)
}

fn concurrent_get_put(s: &Suite<'_>) -> Result<(), String> {
    let d = s.d;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    for _ in 0..10 {
                        d.get("conf-base").map_err(msg)?;
                        d.put("conf-base").map_err(msg)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().expect("thread"))
    })
}

fn get_missing(s: &Suite<'_>) -> Result<(), String> {
    match s.d.get("conf-missing") {
        Ok(_) => Err("it returned a directory".into()),
        Err(_) => Ok(()),
    }
}

fn remove_all(s: &Suite<'_>) -> Result<(), String> {
    let mut ids: Vec<String> = (0..30).rev().map(|i| format!("conf-deep-{i}")).collect();
    ids.extend(
        [
            "conf-round",
            "conf-rw",
            "conf-child",
            "conf-links-2",
            "conf-links-1",
            "conf-links-0",
            "conf-first-wh",
            "conf-base",
        ]
        .map(String::from),
    );
    for id in &ids {
        s.d.remove(id).map_err(msg)?;
        if s.d.exists(id).map_err(msg)? {
            return Err(format!("{id} still exists after remove"));
        }
    }
    Ok(())
}
