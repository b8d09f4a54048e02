//! Saving images as archives: Docker's `docker save` format or an OCI
//! image layout, streamed, never staged whole on disk.
//!
//! Each layer is rebuilt byte for byte from its tar-split record and the
//! layer's directory, so its digest is its diffID and the image ID survives
//! a save/load round trip. The rebuilt stream is hashed as it is written; a
//! layer whose files changed since it was unpacked fails the save.
//! An image pulled with its content kept (see `store::ContentStore`) is
//! written as the registry served it: its manifest and compressed blobs,
//! byte for byte, so every digest matches the registry's. Otherwise layers
//! are rebuilt uncompressed (media type `…layer.v1.tar`).

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::images::{layers_of, lookup};
use crate::plugin::GraphDriver;
use crate::reference::Reference;
use crate::store::Store;
use crate::tarsplit::assemble;
use crate::verify::HashingReader;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `manifest.json` with `Config`, `RepoTags`, `Layers` (plus OCI's
    /// `index.json` and `oci-layout`, as Docker 25 writes them).
    Docker,
    /// An OCI image layout only.
    Oci,
}

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

struct Image {
    id: Digest,
    config: Vec<u8>,
    layers: Vec<crate::store::LayerMeta>,
    tags: Vec<Reference>,
    /// As pulled, when the content store holds all of it.
    original: Option<Original>,
}

/// An image's manifest as a registry served it, and its layer blobs.
pub(crate) struct Original {
    pub manifest: Vec<u8>,
    pub digest: Digest,
    pub media_type: String,
    /// (blob digest, size), in stacking order.
    pub layers: Vec<(Digest, u64)>,
}

/// The manifest an image was pulled by, if the content store holds it and
/// every blob it names (and it names this image's config and layers).
pub(crate) fn original(store: &Store, id: &Digest, layers: usize) -> Result<Option<Original>> {
    for c in store.content.image(id)? {
        if !c.blobs.iter().all(|b| store.content.contains(b)) {
            continue;
        }
        let Some(bytes) = store
            .content
            .read_small(&c.manifest, crate::manifest::MAX_MANIFEST_BYTES as u64)?
        else {
            continue;
        };
        let Ok(crate::manifest::Parsed::Image(m)) = crate::manifest::parse(&c.manifest_type, &bytes) else {
            continue;
        };
        if Digest::of(&bytes) != c.manifest || m.config.digest != *id || m.layers.len() != layers {
            continue;
        }
        return Ok(Some(Original {
            layers: m.layers.iter().map(|l| (l.blob.digest.clone(), l.blob.size)).collect(),
            manifest: bytes,
            digest: c.manifest,
            media_type: c.manifest_type,
        }));
    }
    Ok(None)
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn io_err(e: io::Error) -> Error {
    Error::io("writing the archive", e)
}

/// Writes `names` (references or IDs) as an archive to `out`.
pub fn save(
    store: &Store,
    driver: &dyn GraphDriver,
    names: &[String],
    format: Format,
    out: &mut dyn Write,
) -> Result<()> {
    let images = gather(store, names)?;
    let mut w = Writer {
        b: tar::Builder::new(out),
        written: HashSet::new(),
        tar_lens: HashMap::new(),
    };
    let mut docker_manifest = Vec::new();
    let mut index = Vec::new();
    for img in &images {
        docker_manifest.push(w.image(store, img, &mut index)?);
    }
    w.put("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    w.put(
        "index.json",
        &serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": index}),
        )
        .expect("serialisable"),
    )?;
    if format == Format::Docker {
        w.put(
            "manifest.json",
            &serde_json::to_vec(&docker_manifest).expect("serialisable"),
        )?;
    }
    w.layers(store, driver, &images)?;
    w.b.into_inner().map_err(io_err)?.flush().map_err(io_err)?;
    Ok(())
}

/// The images `names` name, each once, with the tags that were asked for.
fn gather(store: &Store, names: &[String]) -> Result<Vec<Image>> {
    let mut images: Vec<Image> = Vec::new();
    for n in names {
        let id = lookup(store, n)?;
        let tag = Reference::parse(n)
            .ok()
            .filter(|r| r.digest.is_none() && store.refs.get(r).ok().flatten().as_ref() == Some(&id));
        if let Some(img) = images.iter_mut().find(|i| i.id == id) {
            img.tags.extend(tag);
            continue;
        }
        let (_, layers) = layers_of(store, &id)?;
        images.push(Image {
            config: store.images.get(&id)?,
            original: original(store, &id, layers.len())?,
            id,
            layers,
            tags: tag.into_iter().collect(),
        });
    }
    Ok(images)
}

/// The archive being written, and what is in it already.
struct Writer<'w> {
    b: tar::Builder<&'w mut dyn Write>,
    /// Blobs written (or, for layers, planned), so each goes in once.
    written: HashSet<Digest>,
    /// Each layer's tar length, read once from its record for the manifest
    /// and used again when the layer is written.
    tar_lens: HashMap<Digest, u64>,
}

impl Writer<'_> {
    fn put(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.b
            .append_data(&mut header(data.len() as u64), name, data)
            .map_err(io_err)
    }

    /// Writes `img`'s config and manifest, adds its descriptors (one per
    /// tag) to `index`; its `manifest.json` entry.
    fn image(&mut self, store: &Store, img: &Image, index: &mut Vec<Value>) -> Result<Value> {
        let config_name = format!("blobs/sha256/{}", img.id.hex());
        if self.written.insert(img.id.clone()) {
            self.put(&config_name, &img.config)?;
        }
        let mut layer_names = Vec::new();
        let mut descriptors = Vec::new();
        if let Some(o) = &img.original {
            layer_names.extend(o.layers.iter().map(|(d, _)| format!("blobs/sha256/{}", d.hex())));
        }
        for l in img.layers.iter().filter(|_| img.original.is_none()) {
            let name = format!("blobs/sha256/{}", l.diff_id.hex());
            let tar_len = match self.tar_lens.get(&l.diff_id) {
                Some(n) => *n,
                None => store.layers.tar_split(&l.chain_id)?.tar_len()?,
            };
            self.tar_lens.insert(l.diff_id.clone(), tar_len);
            descriptors.push((l.diff_id.clone(), tar_len));
            layer_names.push(name);
        }
        let (manifest, manifest_type) = match &img.original {
            Some(o) => (o.manifest.clone(), o.media_type.as_str()),
            None => (
                rebuilt_manifest_bytes(&img.id, img.config.len(), &descriptors),
                MANIFEST_TYPE,
            ),
        };
        let manifest_digest = Digest::of(&manifest);
        debug_assert!(img.original.as_ref().is_none_or(|o| o.digest == manifest_digest));
        if self.written.insert(manifest_digest.clone()) {
            self.put(&format!("blobs/sha256/{}", manifest_digest.hex()), &manifest)?;
        }
        let descriptor = |tag: Option<&Reference>| {
            let mut d = json!({"mediaType": manifest_type, "digest": manifest_digest, "size": manifest.len()});
            if let Some(t) = tag {
                d["annotations"] = json!({
                    "io.containerd.image.name": t.to_string(),
                    "org.opencontainers.image.ref.name": t.tag.clone().unwrap_or_default(),
                });
            }
            d
        };
        if img.tags.is_empty() {
            index.push(descriptor(None));
        }
        for t in &img.tags {
            index.push(descriptor(Some(t)));
        }
        Ok(json!({
            "Config": config_name,
            "RepoTags": img.tags.iter().map(|t| t.familiar_string()).collect::<Vec<_>>(),
            "Layers": layer_names,
        }))
    }

    /// Layers last, in the order they stack: a reader that streams the
    /// archive knows every image before the first layer arrives, and can
    /// apply each layer as it comes instead of spooling it.
    fn layers(&mut self, store: &Store, driver: &dyn GraphDriver, images: &[Image]) -> Result<()> {
        for img in images {
            if let Some(o) = &img.original {
                for (d, size) in &o.layers {
                    if self.written.insert(d.clone()) {
                        write_blob(&mut self.b, store, d, *size)?;
                    }
                }
                continue;
            }
            for l in &img.layers {
                if self.written.insert(l.diff_id.clone()) {
                    let name = format!("blobs/sha256/{}", l.diff_id.hex());
                    write_layer(&mut self.b, store, driver, &name, l, self.tar_lens[&l.diff_id])?;
                }
            }
        }
        Ok(())
    }
}

/// Copies a blob from the content store into the archive as it is,
/// checking it still hashes to its digest.
fn write_blob(b: &mut tar::Builder<&mut dyn Write>, store: &Store, d: &Digest, size: u64) -> Result<()> {
    let f = store
        .content
        .open_blob(d)?
        .ok_or_else(|| Error::Integrity(format!("blob {d} left the content store while saving")))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("reading blob {d}"), e))?
        .len();
    if len != size {
        return Err(Error::Integrity(format!(
            "blob {d} in the content store is {len} bytes, its manifest says {size}"
        )));
    }
    let (mut hashed, hash) = HashingReader::new(f);
    b.append_data(&mut header(size), format!("blobs/sha256/{}", d.hex()), &mut hashed)
        .map_err(io_err)?;
    let (got, _) = hash.finish();
    if got != *d {
        return Err(Error::Integrity(format!(
            "blob {d} in the content store is damaged (it hashes to {got})"
        )));
    }
    Ok(())
}

/// The OCI manifest of an image whose registry content is not held: its
/// config, and its layers as rebuilt (uncompressed: digest = diffID, size
/// = the tar's length). The same bytes every time, so the digest too.
fn rebuilt_manifest_bytes(id: &Digest, config_len: usize, layers: &[(Digest, u64)]) -> Vec<u8> {
    let descriptors: Vec<Value> = layers
        .iter()
        .map(|(d, len)| json!({"mediaType": LAYER_TYPE, "digest": d, "size": len}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": id, "size": config_len},
        "layers": descriptors,
    }))
    .expect("serialisable")
}

/// An image as `save` writes it when its registry content is not held
/// (loaded from an archive, imported, pulled without `keep_content`).
pub struct Rebuilt {
    /// The OCI manifest (`application/vnd.oci.image.manifest.v1+json`).
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    /// Each layer, bottom first, with its tar's length.
    pub layers: Vec<(crate::store::LayerMeta, u64)>,
}

/// Image `id` as `save` writes it without its registry content.
pub fn rebuilt(store: &Store, id: &Digest) -> Result<Rebuilt> {
    let config = store.images.get(id)?;
    let (_, layers) = layers_of(store, id)?;
    let mut out = Vec::new();
    for l in layers {
        let len = store.layers.tar_split(&l.chain_id)?.tar_len()?;
        out.push((l, len));
    }
    let lens: Vec<(Digest, u64)> = out.iter().map(|(l, n)| (l.diff_id.clone(), *n)).collect();
    Ok(Rebuilt {
        manifest: rebuilt_manifest_bytes(id, config.len(), &lens),
        config,
        layers: out,
    })
}

/// Rebuilds one layer's tar into the archive, checking it hashes to its diffID.
fn write_layer(
    b: &mut tar::Builder<&mut dyn Write>,
    store: &Store,
    driver: &dyn GraphDriver,
    name: &str,
    l: &crate::store::LayerMeta,
    tar_len: u64,
) -> Result<()> {
    rebuild_layer(store, driver, l, &mut |r| b.append_data(&mut header(tar_len), name, r))
}

/// Rebuilds layer `l`'s tar from its tar-split record and its directory,
/// handing the stream to `consume`, and checks it hashes to the layer's
/// diffID: the basis of `save` and of `fsck --verify-content`.
pub fn rebuild_layer(
    store: &Store,
    driver: &dyn GraphDriver,
    l: &crate::store::LayerMeta,
    consume: &mut dyn FnMut(&mut dyn Read) -> io::Result<()>,
) -> Result<()> {
    let record = store.layers.tar_split(&l.chain_id)?;
    let root = driver.get(&l.cache_id)?;
    let (rx, tx) = io::pipe().map_err(|e| Error::io("starting a layer pipe", e))?;
    let (mut hashed, hash) = HashingReader::new(rx);
    let result = std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut tx = tx;
            let open = |n: &[u8]| -> io::Result<Box<dyn Read>> {
                // A regular file inside the layer's directory only: never
                // through a link, never a device, FIFO or socket.
                Ok(Box::new(crate::path::open_regular_beneath(root.as_fd(), n)?))
            };
            assemble(record, open, &mut tx)
        });
        let consumed = consume(&mut hashed);
        // Whatever the consumer left is read, so the producer never blocks.
        let _ = io::copy(&mut hashed, &mut io::sink());
        let produced = producer.join().expect("layer producer panicked");
        (consumed, produced)
    });
    let _ = driver.put(&l.cache_id);
    if let Err(e) = result.1 {
        return Err(Error::Integrity(format!(
            "layer {}: cannot rebuild its tar: {e}",
            l.diff_id
        )));
    }
    result.0.map_err(io_err)?;
    let (got, _) = hash.finish();
    if got != l.diff_id {
        return Err(Error::Integrity(format!(
            "layer {}: its files changed since it was unpacked (the rebuilt tar is {got})",
            l.diff_id
        )));
    }
    Ok(())
}
