//! `fsck --verify-content` and `fsck --repair`: what no peer does
//! (moby#36135, containers/storage#2095).
//!
//! Verifying rebuilds each layer's tar from its tar-split record and its
//! files, exactly as `save` does, and hashes it against the diffID: a
//! flipped byte in any file the layer brought is found. Repairing drops
//! what nothing references, and fetches a damaged layer again from the
//! registry it came from, by the blob digest recorded in the distribution
//! metadata, applying it (and every layer above it, whose files may share
//! its inodes) into new driver data that replaces the old only once it
//! verified. A layer with no recorded source is named with the images that
//! must be pulled or loaded again.

use crate::digest::Digest;
use crate::error::Result;
use crate::images::{layers_in_use, release_layer};
use crate::ownership::{stat_at, Ownership};
use crate::plugin::GraphDriver;
use crate::pull::Puller;
use crate::stage::Staging;
use crate::store::{LayerMeta, Store};
use crate::tarsplit::{each_header, EntryHeader};
use rustix::fs::FileType;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

/// What a repair did and could not do, a line each.
#[derive(Debug, Default)]
pub struct RepairReport {
    pub repaired: Vec<String>,
    pub dropped: Vec<String>,
    pub unrepairable: Vec<String>,
}

/// Every committed layer, parents before children.
fn layers_bottom_up(store: &Store) -> Result<Vec<LayerMeta>> {
    let mut left: Vec<LayerMeta> = Vec::new();
    for c in store.layers.list()? {
        left.extend(store.layers.get(&c)?);
    }
    left.sort_by(|a, b| a.chain_id.as_str().cmp(b.chain_id.as_str()));
    // Repeatedly take the layers whose parent is placed (or absent from
    // the store, which fsck reports on its own).
    let present: HashSet<Digest> = left.iter().map(|l| l.chain_id.clone()).collect();
    let mut placed: HashSet<Digest> = HashSet::new();
    let mut out = Vec::new();
    while !left.is_empty() {
        let (ready, rest): (Vec<_>, Vec<_>) = left.into_iter().partition(|l| {
            l.parent
                .as_ref()
                .is_none_or(|p| placed.contains(p) || !present.contains(p))
        });
        if ready.is_empty() {
            // A parent cycle cannot come from chainIDs; keep the rest as is.
            out.extend(rest);
            break;
        }
        placed.extend(ready.iter().map(|l| l.chain_id.clone()));
        out.extend(ready);
        left = rest;
    }
    Ok(out)
}

/// Layers whose rebuilt tar does not hash to their diffID, or whose files'
/// owners, modes, types or devices are not what their entries say, with why.
pub fn verify_content(store: &Store, driver: &dyn GraphDriver) -> Result<Vec<(Digest, String)>> {
    let mut bad = Vec::new();
    let own = Ownership::of_process();
    for l in layers_bottom_up(store)? {
        let mut sink = |r: &mut dyn std::io::Read| std::io::copy(r, &mut std::io::sink()).map(|_| ());
        if let Err(e) = crate::save::rebuild_layer(store, driver, &l, &mut sink) {
            bad.push((l.chain_id.clone(), e.to_string()));
        } else if let Err(e) = check_metadata(store, driver, &l, own) {
            bad.push((l.chain_id.clone(), e.to_string()));
        }
    }
    Ok(bad)
}

/// At most this many entries of one layer are looked at again (a later
/// entry of the same name, or a hard link to it, set them last); more
/// that differ is a layer whose metadata changed.
const MAX_SUSPECTS: usize = 64;

/// Checks each entry of layer `l` against its file, read as the store
/// keeps owners (`own`): the tar's bytes are checked by the rebuild, this
/// is the rest of what the entry says.
fn check_metadata(store: &Store, driver: &dyn GraphDriver, l: &LayerMeta, own: Ownership) -> Result<()> {
    let root = driver.get(&l.cache_id)?;
    let result = (|| {
        let mut suspects: Vec<Vec<u8>> = Vec::new();
        let mut too_many = false;
        each_header(store.layers.tar_split(&l.chain_id)?, |h| {
            if let Some(name) = checked_name(h) {
                if entry_differs(root.as_fd(), &name, h, own).is_some() {
                    if suspects.len() < MAX_SUSPECTS {
                        suspects.push(name);
                    } else {
                        too_many = true;
                    }
                }
            }
            Ok(())
        })?;
        if suspects.is_empty() {
            return Ok(());
        }
        // What set each suspect last: its last entry, with the owner and
        // mode of a hard link to it that came after.
        let mut last: HashMap<Vec<u8>, EntryHeader> = HashMap::new();
        each_header(store.layers.tar_split(&l.chain_id)?, |h| {
            if let Some(name) = checked_name(h) {
                if suspects.contains(&name) {
                    last.insert(name, h.clone());
                }
            } else if h.kind == b'1' {
                let target = h.link.as_deref().and_then(clean_name);
                if let Some(e) = target.and_then(|t| last.get_mut(&t)) {
                    (e.uid, e.gid, e.mode) = (h.uid, h.gid, h.mode);
                }
            }
            Ok(())
        })?;
        for name in &suspects {
            if let Some(why) = last.get(name).and_then(|h| entry_differs(root.as_fd(), name, h, own)) {
                let more = if too_many { " (and more)" } else { "" };
                return Err(crate::Error::Integrity(format!(
                    "layer {}: {}: {why}{more}",
                    l.diff_id,
                    crate::text::quote_bytes(name)
                )));
            }
        }
        Ok(())
    })();
    let _ = driver.put(&l.cache_id);
    result
}

/// The cleaned name of an entry whose file the check compares (not a
/// whiteout, a hard link or the root).
fn checked_name(h: &EntryHeader) -> Option<Vec<u8>> {
    if !matches!(h.kind, b'0' | 0 | b'7' | b'5' | b'2' | b'3' | b'4' | b'6') {
        return None;
    }
    let name = clean_name(&h.name)?;
    let base = name.rsplit(|b| *b == b'/').next().unwrap_or(&name);
    (!base.starts_with(b".wh.")).then_some(name)
}

fn clean_name(raw: &[u8]) -> Option<Vec<u8>> {
    let comps = crate::path::components_bytes(raw).ok()?;
    (!comps.is_empty()).then(|| comps.join(&b'/'))
}

/// How the file at `name` beneath `root` differs from entry `h`; `None`
/// when it agrees, or is not there to compare (a later entry of the layer
/// removed it; the rebuild checks every file's bytes).
fn entry_differs(root: BorrowedFd<'_>, name: &[u8], h: &EntryHeader, own: Ownership) -> Option<String> {
    let st = match stat_beneath(root, name, own) {
        Ok(st) => st,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => return None,
        Err(e) => return Some(format!("cannot read it: {e}")),
    };
    let ft = FileType::from_raw_mode(st.st_mode);
    let want = match h.kind {
        b'5' => FileType::Directory,
        b'2' => FileType::Symlink,
        b'3' => FileType::CharacterDevice,
        b'4' => FileType::BlockDevice,
        b'6' => FileType::Fifo,
        _ => FileType::RegularFile,
    };
    if ft != want {
        return Some(format!("it is a {ft:?} on disk, a {want:?} in the layer"));
    }
    if (u64::from(st.st_uid), u64::from(st.st_gid)) != (h.uid, h.gid) {
        return Some(format!(
            "owner {}:{} on disk, {}:{} in the layer",
            st.st_uid, st.st_gid, h.uid, h.gid
        ));
    }
    let perm = st.st_mode & 0o7777;
    if want != FileType::Symlink && perm != h.mode {
        return Some(format!("mode {perm:o} on disk, {:o} in the layer", h.mode));
    }
    let dev = (
        u64::from(rustix::fs::major(st.st_rdev)),
        u64::from(rustix::fs::minor(st.st_rdev)),
    );
    if matches!(want, FileType::CharacterDevice | FileType::BlockDevice) && dev != h.dev {
        return Some(format!("device {dev:?} on disk, {:?} in the layer", h.dev));
    }
    None
}

/// [`stat_at`] of `name` (clean components) beneath `root`, through no link.
fn stat_beneath(root: BorrowedFd<'_>, name: &[u8], own: Ownership) -> std::io::Result<rustix::fs::Stat> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let (parent, base) = match name.iter().rposition(|b| *b == b'/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (&b"."[..], name),
    };
    let dir = rustix::fs::openat2(
        root,
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    stat_at(dir.as_fd(), std::ffi::OsStr::from_bytes(base), own)
}

/// The names of the images that use layer `chain` (tags, or IDs).
fn images_using(store: &Store, chain: &Digest) -> Vec<String> {
    let mut out = Vec::new();
    for id in store.images.list().unwrap_or_default() {
        let Ok(config) = store
            .images
            .get(&id)
            .and_then(|b| crate::manifest::ImageConfig::parse(&b))
        else {
            continue;
        };
        if Digest::chain_ids(&config.diff_ids).contains(chain) {
            let names: Vec<String> = store
                .refs
                .refs_of(&id)
                .unwrap_or_default()
                .iter()
                .filter(|r| r.tag.is_some())
                .map(|r| r.familiar_string())
                .collect();
            if names.is_empty() {
                out.push(id.to_string());
            } else {
                out.extend(names);
            }
        }
    }
    out
}

/// Repairs what can be repaired; `puller` fetches blobs again.
pub fn repair(store: &Store, driver: &dyn GraphDriver, puller: &Puller<'_>) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    drop_dangling_refs(store, &mut report)?;
    drop_unused_layers(store, driver, &mut report)?;
    // Damaged layers, and every layer built on one.
    let damaged: HashMap<Digest, String> = verify_content(store, driver)?.into_iter().collect();
    if !damaged.is_empty() {
        fetch_damaged_again(store, driver, puller, &damaged, &mut report)?;
    }
    Ok(report)
}

/// Drops references to images that are gone.
fn drop_dangling_refs(store: &Store, report: &mut RepairReport) -> Result<()> {
    let images: HashSet<Digest> = store.images.list()?.into_iter().collect();
    for (r, id) in store.refs.all()? {
        if !images.contains(&id) {
            let _lock = store.write_lock()?;
            store.refs.remove(&r)?;
            report
                .dropped
                .push(format!("reference {} to missing image {id}", r.familiar_string()));
        }
    }
    Ok(())
}

/// Drops layers nothing needs, top-down, unless a pull or load holds them.
fn drop_unused_layers(store: &Store, driver: &dyn GraphDriver, report: &mut RepairReport) -> Result<()> {
    let _lock = store.write_lock()?;
    let needed = layers_in_use(store)?;
    let mut unused: Vec<LayerMeta> = layers_bottom_up(store)?
        .into_iter()
        .filter(|l| !needed.contains(&l.chain_id))
        .collect();
    while let Some(l) = unused.pop() {
        if unused.iter().any(|o| o.parent.as_ref() == Some(&l.chain_id)) || store.leased(&l.chain_id)? {
            continue;
        }
        release_layer(store, driver, &l)?;
        report.dropped.push(format!("unreferenced layer {}", l.chain_id));
    }
    Ok(())
}

/// Applies the `damaged` layers, and every layer built on one, again from
/// blobs fetched from where they came from, and replaces them whole; a
/// layer no source serves (and the layers on it) is reported unrepairable.
fn fetch_damaged_again(
    store: &Store,
    driver: &dyn GraphDriver,
    puller: &Puller<'_>,
    damaged: &HashMap<Digest, String>,
    report: &mut RepairReport,
) -> Result<()> {
    let mut redo: Vec<LayerMeta> = Vec::new();
    let mut in_redo: HashSet<Digest> = HashSet::new();
    for l in layers_bottom_up(store)? {
        let under_damage = l.parent.as_ref().is_some_and(|p| in_redo.contains(p));
        if damaged.contains_key(&l.chain_id) || under_damage {
            in_redo.insert(l.chain_id.clone());
            redo.push(l);
        }
    }
    let mut staging = Staging::for_repair(store, driver, puller.options.max_layer_bytes);
    let mut broken: HashSet<Digest> = HashSet::new();
    for l in &redo {
        if l.parent.as_ref().is_some_and(|p| broken.contains(p)) {
            broken.insert(l.chain_id.clone());
            continue;
        }
        let (spooled, blob, repo) = match fetch_layer(store, puller, l) {
            Ok(fetched) => fetched,
            Err(why) => {
                broken.insert(l.chain_id.clone());
                report.unrepairable.push(format!(
                    "layer {}: {why}; pull or load again: {}",
                    l.chain_id,
                    images_using(store, &l.chain_id).join(", ")
                ));
                continue;
            }
        };
        let file = spooled
            .open()
            .map_err(|e| crate::Error::io("opening a fetched layer", e))?;
        staging.apply(
            l.parent.as_ref(),
            Some(&l.diff_id),
            Box::new(file),
            None,
            blob.as_str(),
            None,
        )?;
        report.repaired.push(format!(
            "layer {}: {} from {repo}",
            l.chain_id,
            if damaged.contains_key(&l.chain_id) {
                "damaged, fetched again"
            } else {
                "built on a damaged layer, fetched again"
            }
        ));
    }
    staging.replace()?;
    Ok(())
}

/// Layer `l`'s blob fetched again from the first recorded source that
/// serves it: the spooled blob, its digest and repository; or why not.
fn fetch_layer(
    store: &Store,
    puller: &Puller<'_>,
    l: &LayerMeta,
) -> std::result::Result<(crate::pull::Spooled, Digest, String), String> {
    let mut why = String::from("no registry source is recorded for it");
    for (blob, repo) in store.layers.blob_sources(&l.diff_id) {
        match puller.fetch_blob(&repo, &blob) {
            Ok(s) => return Ok((s, blob, repo)),
            Err(e) => why = format!("fetching {blob} from {repo}: {e}"),
        }
    }
    Err(why)
}
