//! `import`: one image made from a root filesystem tarball, as `docker
//! import` and the Engine API's `POST /images/create?fromSrc=` make it.
//!
//! The tarball (plain, gzip or zstd) becomes the image's single layer,
//! applied by the driver as it streams, its diffID computed on the way;
//! the config is Docker's for an import — the platform, `created`, the
//! message as `comment` and as the one history entry ("Imported from -"
//! when none is given), and a container config from `--change`
//! instructions (`changes`). Nothing is registered unless the whole
//! tarball applied; the changes are checked before a byte is read.

use crate::changes;
use crate::digest::Digest;
use crate::error::Result;
use crate::platform::Platform;
use crate::plugin::GraphDriver;
use crate::reference::Reference;
use crate::stage::{ImageCommit, Staging};
use crate::store::Store;
use serde_json::{json, Map, Value};
use std::io::Read;

pub struct Importer<'a> {
    pub store: &'a Store,
    pub driver: &'a dyn GraphDriver,
    pub max_layer_bytes: u64,
}

/// What an import is told besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The reference to tag the image with (none: an untagged image).
    pub tag: Option<Reference>,
    /// The commit message; "Imported from SOURCE" when none is given.
    pub message: Option<String>,
    /// Where the bytes came from, for the default message (`-`, a file).
    pub source: String,
    /// Dockerfile instructions for the container config.
    pub changes: Vec<String>,
    /// The platform the image declares (the host's by default).
    pub platform: Option<Platform>,
}

impl ImportOptions {
    /// Options from an import's arguments as given (a reference and a
    /// platform as text), every one of them checked — the changes too — so
    /// a bad one costs nothing.
    pub fn checked(
        reference: Option<&str>,
        message: Option<String>,
        source: &str,
        changes: Vec<String>,
        platform: Option<&str>,
    ) -> Result<ImportOptions> {
        let options = ImportOptions {
            tag: reference.map(Reference::parse).transpose()?,
            message,
            source: source.to_string(),
            changes,
            platform: platform.map(Platform::parse).transpose()?,
        };
        options.container_config()?;
        Ok(options)
    }

    /// The container config the changes make: checked before any byte is
    /// read, so a bad change costs nothing.
    pub fn container_config(&self) -> Result<Map<String, Value>> {
        let mut config = Map::new();
        changes::apply(&mut config, &self.changes)?;
        Ok(config)
    }
}

impl Importer<'_> {
    /// Imports the tarball read from `r`; returns the image ID.
    pub fn import(&self, r: impl Read + Send, o: &ImportOptions) -> Result<Digest> {
        let container = o.container_config()?;
        let platform = o.platform.clone().unwrap_or_else(Platform::host);
        let mut staging = Staging::new(self.store, self.driver, self.max_layer_bytes);
        let (diff_id, _) = staging.apply(None, None, Box::new(r), None, "imported tarball", None)?;
        let created = crate::date::now_rfc3339();
        let message = o
            .message
            .clone()
            .unwrap_or_else(|| format!("Imported from {}", o.source));
        let mut config = json!({
            "architecture": platform.arch,
            "os": platform.os,
            "created": created,
            "comment": message,
            "config": container,
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
            "history": [{"created": created, "comment": message}],
        });
        if let Some(v) = &platform.variant {
            config["variant"] = json!(v);
        }
        let bytes = serde_json::to_vec(&config).expect("serialisable");
        let ids = staging.commit(&[ImageCommit {
            config: &bytes,
            refs: o.tag.iter().cloned().collect(),
            content: None,
        }])?;
        Ok(ids.into_iter().next().expect("one image committed"))
    }
}
