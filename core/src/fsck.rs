//! Store consistency: `gantry fsck`, and the clean-up of what a crash left.
//!
//! Garbage (spooled downloads, staging layers, layers no image needs) is not
//! an inconsistency: a crash may leave it at any point, and it is never
//! visible. It is cleared when a process finds itself alone on the store.
//! A problem is anything visible that is wrong: a reference to a missing
//! image, an image whose layer is missing, content that does not match its
//! digest, a layer whose driver data is gone.

use crate::digest::Digest;
use crate::error::Result;
use crate::images::{layers_in_use, release_layer};
use crate::manifest::ImageConfig;
use crate::plugin::GraphDriver;
use crate::store::{Store, SWEEP_PREFIX};
use std::collections::HashSet;

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Inconsistencies: each one a line for the operator.
    pub problems: Vec<String>,
    /// Garbage that was cleared.
    pub cleared: Vec<String>,
}

/// Clears what a crash may have left that needs no driver: spooled
/// downloads, archives and records, leases, half-written layer records.
/// Call only when this process is alone on the store.
pub fn clear_spools(store: &Store) -> Result<Vec<String>> {
    let mut cleared = Vec::new();
    for n in store.clear_tmp_blobs()? {
        cleared.push(format!("spooled download {n}"));
    }
    for n in store.clear_leases()? {
        cleared.push(format!("layer lease {n}"));
    }
    for n in store.clear_tar_split_spools()? {
        cleared.push(format!("spooled tar-split record {n}"));
    }
    for n in store.clear_load_spools()? {
        cleared.push(format!("spooled archive {n}"));
    }
    for n in store.layers.clear_tmp()? {
        cleared.push(format!("unfinished layer record {n}"));
    }
    for n in store.content.clear_ingest()? {
        cleared.push(format!("unfinished blob {n}"));
    }
    Ok(cleared)
}

/// Whether [`sweep`] has anything to do (a crash left staging markers).
pub fn needs_sweep(store: &Store) -> Result<bool> {
    Ok(!store.staging_leftovers()?.is_empty())
}

/// Clears what a crash left that needs the driver: staging layers, and
/// layers no image needs after an interrupted removal. Call only when
/// alone on the store.
pub fn sweep(store: &Store, driver: &dyn GraphDriver) -> Result<Vec<String>> {
    let mut cleared = Vec::new();
    let leftovers = store.staging_leftovers()?;
    if leftovers.is_empty() {
        // Unreferenced layers arise only inside a marked window: nothing
        // crashed, so there is nothing to sweep (and no config to read).
        return Ok(cleared);
    }
    let committed: HashSet<String> = store
        .layers
        .list()?
        .iter()
        .filter_map(|c| store.layers.get(c).ok().flatten().map(|m| m.cache_id))
        .collect();
    for id in leftovers {
        if !id.starts_with(SWEEP_PREFIX) && !committed.contains(&id) {
            let _ = driver.remove(&id);
            cleared.push(format!("staging layer {id}"));
        }
        store.unmark_staging(&id);
    }
    let needed = layers_in_use(store)?;
    // Release unreferenced layers top-down so parents go last.
    let mut unused: Vec<_> = store
        .layers
        .list()?
        .into_iter()
        .filter(|c| !needed.contains(c))
        .filter_map(|c| store.layers.get(&c).ok().flatten())
        .collect();
    while let Some(pos) = unused
        .iter()
        .position(|l| !unused.iter().any(|o| o.parent.as_ref() == Some(&l.chain_id)))
    {
        let l = unused.remove(pos);
        release_layer(store, driver, &l)?;
        cleared.push(format!("unreferenced layer {}", l.chain_id));
    }
    Ok(cleared)
}

/// Checks every visible record of the store.
pub fn check(store: &Store, driver: &dyn GraphDriver) -> Result<Report> {
    let mut r = Report::default();
    let images = store.images.list()?;
    for id in &images {
        let bytes = match store.images.get(id) {
            Ok(b) => b,
            Err(e) => {
                r.problems.push(format!("image {id}: {e}"));
                continue;
            }
        };
        if Digest::of(&bytes) != *id {
            r.problems
                .push(format!("image {id}: config content does not match its ID"));
            continue;
        }
        let config = match ImageConfig::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                r.problems.push(format!("image {id}: {e}"));
                continue;
            }
        };
        for c in Digest::chain_ids(&config.diff_ids) {
            if !store.layers.exists(&c) {
                r.problems.push(format!("image {id}: layer {c} is missing"));
            }
        }
    }
    for c in store.layers.list()? {
        match store.layers.get(&c) {
            Ok(Some(m)) => {
                let want = Digest::chain(m.parent.as_ref(), &m.diff_id);
                if want != c {
                    r.problems
                        .push(format!("layer {c}: chain ID does not match its diff and parent"));
                }
                if let Some(p) = &m.parent {
                    if !store.layers.exists(p) {
                        r.problems.push(format!("layer {c}: parent {p} is missing"));
                    }
                }
                // `save` rebuilds the layer's tar from this record.
                match store.layers.tar_split(&c).and_then(|r| r.tar_len()) {
                    Ok(len) if len > 0 => {}
                    Ok(_) => r.problems.push(format!("layer {c}: its tar-split record is empty")),
                    Err(e) => r.problems.push(format!("layer {c}: {e}")),
                }
                match driver.exists(&m.cache_id) {
                    Ok(true) => {}
                    Ok(false) => r
                        .problems
                        .push(format!("layer {c}: driver data {} is missing", m.cache_id)),
                    Err(e) => r.problems.push(format!("layer {c}: driver: {e}")),
                }
            }
            Ok(None) => {}
            Err(e) => r.problems.push(format!("layer {c}: {e}")),
        }
    }
    match store.refs.all() {
        Ok(all) => {
            for (rf, id) in all {
                if !images.contains(&id) {
                    r.problems
                        .push(format!("reference {}: image {id} is missing", rf.familiar_string()));
                }
            }
        }
        Err(e) => r.problems.push(e.to_string()),
    }
    Ok(r)
}
