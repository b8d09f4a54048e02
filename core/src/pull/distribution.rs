//! What a registry says about a reference without pulling it: the manifest
//! the reference resolves to and the platforms it offers (what Docker's
//! `GET /distribution/{name}/json` answers).
//!
//! It goes through the pull's own endpoint loop, credentials and checks:
//! the manifest is hashed here, never taken on the registry's word, and a
//! single image's config is fetched under its digest and size. It never
//! writes to the store.

use super::Puller;
use crate::digest::Digest;
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::manifest::{self, Parsed};
use crate::reference::Reference;
use serde_json::Value;

/// A reference as its registry resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    /// The manifest's media type, as its content says (not as served).
    pub media_type: String,
    /// The manifest's digest, computed on its bytes.
    pub digest: Digest,
    pub size: u64,
    /// For a manifest list or index, each entry's platform, in order (an
    /// entry without one is empty, as Docker shows it); for an image, the
    /// platform its config names (none when it names no OS or
    /// architecture).
    pub platforms: Vec<Offered>,
}

/// One platform, in the OCI image spec's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    pub architecture: String,
    pub os: String,
    pub os_version: Option<String>,
    pub os_features: Vec<String>,
    pub variant: Option<String>,
}

impl Offered {
    /// Reads the OCI platform keys of `v` (an index entry's `platform`, or
    /// an image config); fields of the wrong type count as absent.
    fn of(v: &Value) -> Offered {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Offered {
            architecture: s("architecture").unwrap_or_default(),
            os: s("os").unwrap_or_default(),
            os_version: s("os.version").filter(|x| !x.is_empty()),
            os_features: v
                .get("os.features")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|f| f.as_str().map(str::to_string)).collect())
                .unwrap_or_default(),
            variant: s("variant").filter(|x| !x.is_empty()),
        }
    }
}

impl Puller<'_> {
    /// Resolves `reference` at its registry (mirrors first, as a pull
    /// does) and describes what it names. Nothing is downloaded beyond the
    /// manifest and, for a single image, its config.
    pub fn inspect_distribution(&self, reference: &Reference) -> Result<Distribution> {
        self.each_endpoint(&reference.domain, |ep| {
            if ep.v1 {
                return Err(Error::Plugin(PluginError::new(
                    ErrorClass::Unsupported,
                    "a v1 registry has no manifests to describe",
                )));
            }
            let repo = ep.repository(&reference.path);
            let fetched = self.resolve(ep, &repo, &reference.registry_reference())?;
            let served = &fetched.served;
            let document: Value = serde_json::from_slice(&served.bytes)
                .map_err(|e| Error::InvalidManifest(format!("manifest is not valid JSON: {e}")))?;
            let (media_type, _) = manifest::kind(&served.media_type, &document)?;
            let platforms = match &fetched.parsed {
                Parsed::List(_) => document
                    .get("manifests")
                    .and_then(Value::as_array)
                    .map(|entries| {
                        entries
                            .iter()
                            .map(|e| e.get("platform").map(Offered::of).unwrap_or_default())
                            .collect()
                    })
                    .unwrap_or_default(),
                Parsed::Image(image) => match self.fetch_small(ep, &repo, &image.config) {
                    Ok(bytes) => {
                        let config: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let p = Offered::of(&config);
                        if p.os.is_empty() && p.architecture.is_empty() {
                            Vec::new()
                        } else {
                            vec![p]
                        }
                    }
                    // A registry without the config still has the manifest
                    // (Docker then lists no platform).
                    Err(Error::Plugin(e)) if e.class == ErrorClass::NotFound => Vec::new(),
                    Err(e) => return Err(e),
                },
            };
            Ok(Distribution {
                media_type: media_type.to_string(),
                digest: served.digest.clone(),
                size: served.bytes.len() as u64,
                platforms,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_read_the_oci_keys_only_when_they_are_strings() {
        let v = serde_json::json!({
            "architecture": "arm64", "os": "linux", "variant": "v8",
            "os.version": "10.0.17763", "os.features": ["win32k", 3], "rootfs": {}
        });
        assert_eq!(
            Offered::of(&v),
            Offered {
                architecture: "arm64".into(),
                os: "linux".into(),
                os_version: Some("10.0.17763".into()),
                os_features: vec!["win32k".into()],
                variant: Some("v8".into()),
            }
        );
        let odd = Offered::of(&serde_json::json!({"architecture": 1, "os": "linux", "variant": ""}));
        assert_eq!((odd.architecture.as_str(), odd.variant), ("", None));
    }
}
