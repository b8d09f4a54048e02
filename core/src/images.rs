//! Operations on stored images: lookup by reference or ID, tag, remove, and
//! releasing layers no image needs any more.

use crate::date::now_rfc3339;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::ImageConfig;
use crate::plugin::GraphDriver;
use crate::reference::Reference;
use crate::store::{LayerMeta, Store};
use std::collections::HashSet;

/// One stored image as listings show it: the CLI's `images` table and the
/// daemon's `GET /images/json` (and its prune) render this one record.
#[derive(Debug, Clone)]
pub struct Summary {
    pub id: Digest,
    /// Every reference naming it, tags and digests.
    pub refs: Vec<Reference>,
    /// When it was built, in seconds since the epoch (0 when its config
    /// does not say, as Docker shows it).
    pub created: i64,
    /// What its layers hold unpacked.
    pub size: u64,
    /// The config's `Labels` (an object; empty when it has none).
    pub labels: serde_json::Map<String, serde_json::Value>,
}

impl Summary {
    /// Docker's `RepoTags` and `RepoDigests`: familiar names, sorted.
    pub fn repo_names(&self) -> (Vec<String>, Vec<String>) {
        repo_names(self.refs.iter())
    }
}

/// Splits references into Docker's `RepoTags` and `RepoDigests`, each
/// sorted, in their familiar form.
pub fn repo_names<'r>(refs: impl Iterator<Item = &'r Reference>) -> (Vec<String>, Vec<String>) {
    let (mut tags, mut digests) = (Vec::new(), Vec::new());
    for r in refs {
        if r.digest.is_some() {
            digests.push(r.familiar_string());
        } else if r.tag.is_some() {
            tags.push(r.familiar_string());
        }
    }
    tags.sort();
    digests.sort();
    (tags, digests)
}

/// Every stored image's summary, in the image store's order.
pub fn summaries(store: &Store) -> Result<Vec<Summary>> {
    Ok(summaries_with_layers(store)?.into_iter().map(|(s, _)| s).collect())
}

/// Every stored image's summary with its layers (base first).
fn summaries_with_layers(store: &Store) -> Result<Vec<(Summary, Vec<LayerMeta>)>> {
    let all = store.refs.all()?;
    let mut out = Vec::new();
    for id in store.images.list()? {
        let (config, layers) = layers_of(store, &id)?;
        let created = config
            .raw
            .get("created")
            .and_then(|c| c.as_str())
            .and_then(crate::date::parse_rfc3339)
            .unwrap_or(0);
        let labels = config
            .raw
            .get("config")
            .and_then(|c| c.get("Labels"))
            .and_then(|l| l.as_object())
            .cloned()
            .unwrap_or_default();
        let refs = all.iter().filter(|(_, i)| *i == id).map(|(r, _)| r.clone()).collect();
        let summary = Summary {
            size: layers.iter().map(|l| l.size).sum(),
            id,
            refs,
            created,
            labels,
        };
        out.push((summary, layers));
    }
    Ok(out)
}

/// What the store's images take, as dockerd's `system df` counts it.
#[derive(Debug, Clone)]
pub struct DiskUsage {
    /// Each image's summary and its shared size: the bytes of its layers
    /// that at least one other image uses too.
    pub images: Vec<(Summary, u64)>,
    /// Every layer some image uses, each counted once.
    pub layers_size: u64,
}

/// The store's disk usage by image. A layer is shared when more than one
/// image's chain includes it (an image's own layers count once however
/// many names it has).
pub fn disk_usage(store: &Store) -> Result<DiskUsage> {
    let images = summaries_with_layers(store)?;
    let mut users: std::collections::HashMap<&Digest, (usize, u64)> = std::collections::HashMap::new();
    for (_, layers) in &images {
        for l in layers {
            users.entry(&l.chain_id).or_insert((0, l.size)).0 += 1;
        }
    }
    let layers_size = users.values().map(|(_, size)| size).sum();
    let shared: Vec<u64> = images
        .iter()
        .map(|(_, layers)| layers.iter().filter(|l| users[&l.chain_id].0 > 1).map(|l| l.size).sum())
        .collect();
    Ok(DiskUsage {
        images: images.into_iter().zip(shared).map(|((s, _), n)| (s, n)).collect(),
        layers_size,
    })
}

/// Finds an image by reference (`name`, `name:tag`, `name@digest`), full ID
/// (`sha256:…`) or unambiguous ID prefix, as Docker does.
pub fn lookup(store: &Store, s: &str) -> Result<Digest> {
    if let Ok(d) = s.parse::<Digest>() {
        if store.images.exists(&d) {
            return Ok(d);
        }
    }
    if let Ok(r) = Reference::parse(s) {
        if let Some(id) = store.refs.get(&r)? {
            return Ok(id);
        }
    }
    if s.len() >= 4 || s.starts_with("sha256:") {
        if let Some(id) = store.images.find_by_prefix(s)? {
            return Ok(id);
        }
    }
    Err(Error::NoSuchImage(s.to_string()))
}

/// The parsed config and the layers of image `id`, base first.
pub fn layers_of(store: &Store, id: &Digest) -> Result<(ImageConfig, Vec<LayerMeta>)> {
    let config = ImageConfig::parse(&store.images.get(id)?)?;
    let mut layers = Vec::new();
    for c in Digest::chain_ids(&config.diff_ids) {
        layers.push(
            store
                .layers
                .get(&c)?
                .ok_or_else(|| Error::Integrity(format!("image {id}: layer {c} is missing")))?,
        );
    }
    Ok((config, layers))
}

/// Points `target` at the image `source` names.
pub fn tag(store: &Store, source: &str, target: &str) -> Result<()> {
    let id = lookup(store, source)?;
    let r = Reference::parse(target)?;
    if r.digest.is_some() {
        return Err(Error::InvalidReference(format!(
            "{target:?}: refusing to create a tag with a digest reference"
        )));
    }
    let _lock = store.write_lock()?;
    store.refs.set(&r, &id)?;
    store.images.touch(&id, &now_rfc3339())
}

/// Removes a reference, or an image by ID. Returns Docker's report lines
/// (`Untagged: …`, `Deleted: …`).
pub fn remove(store: &Store, driver: &dyn GraphDriver, s: &str, force: bool) -> Result<Vec<String>> {
    let _lock = store.write_lock()?;
    let mut out = Vec::new();
    let by_ref = Reference::parse(s)
        .ok()
        .and_then(|r| store.refs.get(&r).ok().flatten().map(|id| (r, id)));
    let id = match by_ref {
        Some((r, id)) => {
            // Removing a tag removes the image only when nothing else names it
            // (digest references of the same repository go with it).
            let remaining = store.refs.refs_of(&id)?;
            let only_digests_of_same_repo = remaining
                .iter()
                .filter(|o| **o != r)
                .all(|o| o.tag.is_none() && o.familiar_name() == r.familiar_name());
            if !only_digests_of_same_repo {
                store.refs.remove(&r)?;
                out.push(format!("Untagged: {}", r.familiar_string()));
                return Ok(out);
            }
            id
        }
        None => {
            let id = lookup(store, s)?;
            let refs = store.refs.refs_of(&id)?;
            let names: HashSet<String> = refs.iter().map(|r| r.familiar_name()).collect();
            if names.len() > 1 && !force {
                return Err(Error::Conflict(format!(
                    "unable to delete {} (must be forced) - image is referenced in multiple repositories",
                    id.short()
                )));
            }
            id
        }
    };
    // Everything that can fail on reading is read before anything changes.
    let (_, layers) = layers_of(store, &id)?;
    let needed = layers_in_use_except(store, Some(&id))?;
    let mut refs = store.refs.refs_of(&id)?;
    // The reference asked for is reported first, as Docker does.
    if let Ok(asked) = Reference::parse(s) {
        refs.sort_by_key(|r| *r != asked);
    }
    for r in refs {
        store.refs.remove(&r)?;
        out.push(format!("Untagged: {}", r.familiar_string()));
    }
    // From here until the layers are released, a crash leaves them unreferenced.
    let sweep = store.mark_sweep()?;
    store.images.delete(&id)?;
    store.content.forget_image(&id)?;
    out.push(format!("Deleted: {id}"));
    let mut kept_for_later = false;
    for l in layers.iter().rev() {
        if !needed.contains(&l.chain_id) && store.layers.exists(&l.chain_id) {
            if store.leased(&l.chain_id)? || kept_for_later {
                // A pull or load is building on it (or on a layer above it);
                // if that fails, the sweep marker left below lets the next
                // process alone on the store release it.
                kept_for_later = true;
                continue;
            }
            release_layer(store, driver, l)?;
            out.push(format!("Deleted: {}", l.chain_id));
        }
    }
    if !kept_for_later {
        store.unmark_staging(&sweep);
    }
    // Blobs only this image used; a failure here leaves them for the next.
    let _ = store.content.collect();
    Ok(out)
}

/// Every chainID some stored image needs. An image whose config cannot be
/// read or parsed fails the call: its layers must not look unused.
pub fn layers_in_use(store: &Store) -> Result<HashSet<Digest>> {
    layers_in_use_except(store, None)
}

fn layers_in_use_except(store: &Store, except: Option<&Digest>) -> Result<HashSet<Digest>> {
    let mut needed = HashSet::new();
    for id in store.images.list()? {
        if Some(&id) == except {
            continue;
        }
        let config = store
            .images
            .get(&id)
            .and_then(|b| ImageConfig::parse(&b))
            .map_err(|e| {
                Error::Integrity(format!(
                    "image {id}: its config is unreadable ({e}); refusing to release layers (see gantry fsck)"
                ))
            })?;
        needed.extend(Digest::chain_ids(&config.diff_ids));
    }
    Ok(needed)
}

/// Removes a layer: metadata first (it stops being visible), then the
/// driver's data, with a staging marker so a crash between the two is
/// cleared on the next start.
pub fn release_layer(store: &Store, driver: &dyn GraphDriver, l: &LayerMeta) -> Result<()> {
    store.mark_staging(&l.cache_id)?;
    store.layers.delete(&l.chain_id)?;
    driver.remove(&l.cache_id)?;
    store.unmark_staging(&l.cache_id);
    Ok(())
}
