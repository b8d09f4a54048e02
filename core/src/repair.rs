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
use crate::plugin::GraphDriver;
use crate::pull::Puller;
use crate::stage::Staging;
use crate::store::{LayerMeta, Store};
use std::collections::{HashMap, HashSet};

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

/// Layers whose rebuilt tar does not hash to their diffID, with why.
pub fn verify_content(store: &Store, driver: &dyn GraphDriver) -> Result<Vec<(Digest, String)>> {
    let mut bad = Vec::new();
    for l in layers_bottom_up(store)? {
        let mut sink = |r: &mut dyn std::io::Read| std::io::copy(r, &mut std::io::sink()).map(|_| ());
        if let Err(e) = crate::save::rebuild_layer(store, driver, &l, &mut sink) {
            bad.push((l.chain_id.clone(), e.to_string()));
        }
    }
    Ok(bad)
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
