//! Manifests: Docker schema2, OCI image manifests, Docker manifest lists and
//! OCI indexes, parsed with `oci-spec` and checked before anything is fetched.

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::platform::Platform;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What the core asks registries for, best first.
pub const ACCEPT: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// A manifest larger than this is refused (Docker's limit).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// An image config larger than this is refused.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A blob a manifest points to, with the digest and size the core will check.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Blob,
    pub compression: Compression,
}

/// A single-platform image manifest.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    pub config: Blob,
    pub layers: Vec<Layer>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub enum Parsed {
    Image(ImageManifest),
    /// A manifest list / index: its entries as (descriptor, os, arch, variant).
    List(Vec<(Blob, String, String, Option<String>)>),
}

fn blob(d: &oci_spec::image::Descriptor) -> Result<Blob> {
    let digest: Digest = d
        .digest()
        .to_string()
        .parse()
        .map_err(|e: Error| Error::InvalidManifest(format!("manifest descriptor: {e}")))?;
    let size = d.size();
    Ok(Blob {
        digest,
        size,
        media_type: d.media_type().to_string(),
    })
}

fn layer_compression(media_type: &str) -> Result<Compression> {
    Ok(match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" | "application/vnd.oci.image.layer.v1.tar+gzip" => {
            Compression::Gzip
        }
        "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
        "application/vnd.oci.image.layer.v1.tar" | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        other => {
            return Err(Error::InvalidManifest(format!(
                "unsupported layer media type {other:?}"
            )));
        }
    })
}

/// What a manifest document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A single-platform image manifest (`config` and `layers`).
    Image,
    /// A manifest list or index (`manifests`).
    Index,
}

/// The media type and kind of a manifest document `value`, the one rule
/// for what pull reads and what `gantry serve` takes from a push:
/// - the type is the one declared (a `Content-Type`) unless that is absent
///   or generic (`application/json`, `text/plain`), then the document's own
///   `mediaType`, and when both are absent its shape (OCI allows that);
/// - a document's `mediaType` must agree with the declared type;
/// - only the four manifest types are manifests (schema 1 is refused);
/// - an ambiguous document is refused whatever it claims: one carrying both
///   `manifests` and `layers`/`config` (CVE-2021-41190), an image with
///   `manifests`, an index with `layers` or `config`.
pub fn kind(declared: &str, value: &serde_json::Value) -> Result<(&'static str, Kind)> {
    let inner = match value.get("mediaType") {
        None => "",
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(_) => return Err(Error::InvalidManifest("manifest mediaType is not a string".into())),
    };
    let media_type = if declared.is_empty() || declared == "application/json" || declared == "text/plain" {
        inner
    } else {
        declared
    };
    let has = |k: &str| value.get(k).is_some();
    let media_type = if media_type.is_empty() {
        // OCI allows an absent mediaType: tell by shape.
        if has("manifests") {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        }
    } else {
        media_type
    };
    // CVE-2021-41190: a document that is both a manifest and an index means
    // different things to different readers; refuse it whatever it claims.
    if has("manifests") && (has("layers") || has("config")) {
        return Err(Error::InvalidManifest(
            "manifest carries both \"manifests\" and \"layers\"/\"config\" (ambiguous, CVE-2021-41190)".into(),
        ));
    }
    if !inner.is_empty() && inner != media_type {
        return Err(Error::InvalidManifest(format!(
            "manifest declares media type {inner:?} but was served as {media_type:?}"
        )));
    }
    let (media_type, kind) = match media_type {
        DOCKER_MANIFEST => (DOCKER_MANIFEST, Kind::Image),
        OCI_MANIFEST => (OCI_MANIFEST, Kind::Image),
        DOCKER_LIST => (DOCKER_LIST, Kind::Index),
        OCI_INDEX => (OCI_INDEX, Kind::Index),
        "application/vnd.docker.distribution.manifest.v1+json"
        | "application/vnd.docker.distribution.manifest.v1+prettyjws" => {
            return Err(Error::InvalidManifest(
                "Docker image manifest schema 1 is not supported".into(),
            ))
        }
        other => {
            return Err(Error::InvalidManifest(format!(
                "unsupported manifest media type {other:?}"
            )))
        }
    };
    match kind {
        Kind::Image if has("manifests") => Err(Error::InvalidManifest(format!(
            "manifest is typed {media_type:?} but carries \"manifests\" (ambiguous)"
        ))),
        Kind::Index if has("layers") || has("config") => Err(Error::InvalidManifest(format!(
            "manifest is typed {media_type:?} but carries \"layers\"/\"config\" (ambiguous)"
        ))),
        _ => Ok((media_type, kind)),
    }
}

/// Parses `bytes` as the media type the registry declared (falling back on
/// the document's own `mediaType` field; see [`kind`]).
pub fn parse(declared: &str, bytes: &[u8]) -> Result<Parsed> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(Error::InvalidManifest("manifest is larger than 4 MiB".into()));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::InvalidManifest(format!("manifest is not valid JSON: {e}")))?;
    match kind(declared, &value)?.1 {
        Kind::Image => {
            let m: oci_spec::image::ImageManifest = serde_json::from_value(value)
                .map_err(|e| Error::InvalidManifest(format!("invalid image manifest: {e}")))?;
            if m.schema_version() != 2 {
                return Err(Error::InvalidManifest(format!(
                    "unsupported schemaVersion {}",
                    m.schema_version()
                )));
            }
            let config = blob(m.config())?;
            if config.size > MAX_CONFIG_BYTES {
                return Err(Error::InvalidManifest("image config is larger than 8 MiB".into()));
            }
            let layers = m
                .layers()
                .iter()
                .map(|d| {
                    let b = blob(d)?;
                    Ok(Layer {
                        compression: layer_compression(&b.media_type)?,
                        blob: b,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if layers.is_empty() {
                return Err(Error::InvalidManifest("manifest has no layers".into()));
            }
            Ok(Parsed::Image(ImageManifest { config, layers }))
        }
        Kind::Index => {
            let idx: oci_spec::image::ImageIndex = serde_json::from_value(value)
                .map_err(|e| Error::InvalidManifest(format!("invalid manifest list: {e}")))?;
            let mut out = Vec::new();
            for d in idx.manifests() {
                let b = blob(d)?;
                if let Some(p) = d.platform() {
                    out.push((b, p.os().to_string(), p.architecture().to_string(), p.variant().clone()));
                }
            }
            Ok(Parsed::List(out))
        }
    }
}

/// Picks the entry of a manifest list that fits `want`.
pub fn select(entries: &[(Blob, String, String, Option<String>)], want: &Platform) -> Result<Blob> {
    entries
        .iter()
        .find(|(b, os, arch, variant)| is_manifest_type(&b.media_type) && want.matches(os, arch, variant.as_deref()))
        .map(|e| e.0.clone())
        .ok_or_else(|| Error::NoMatchingPlatform(want.to_string()))
}

/// Like [`select`], but an entry may itself be an index (an OCI layout may
/// nest them; the caller bounds the depth).
pub fn select_nested(entries: &[(Blob, String, String, Option<String>)], want: &Platform) -> Result<Blob> {
    select(entries, want).or_else(|_| {
        entries
            .iter()
            .find(|(b, os, arch, variant)| {
                matches!(b.media_type.as_str(), OCI_INDEX | DOCKER_LIST)
                    && (os.is_empty() || want.matches(os, arch, variant.as_deref()))
            })
            .map(|e| e.0.clone())
            .ok_or_else(|| Error::NoMatchingPlatform(want.to_string()))
    })
}

fn is_manifest_type(t: &str) -> bool {
    t == DOCKER_MANIFEST || t == OCI_MANIFEST
}

/// The parts of an image config the core checks and shows.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub diff_ids: Vec<Digest>,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub raw: serde_json::Value,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<ImageConfig> {
        let raw: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::InvalidManifest(format!("image config is not valid JSON: {e}")))?;
        let rootfs = raw
            .get("rootfs")
            .ok_or_else(|| Error::InvalidManifest("image config has no rootfs".into()))?;
        if rootfs.get("type").and_then(|t| t.as_str()) != Some("layers") {
            return Err(Error::InvalidManifest(
                "image config rootfs type is not \"layers\"".into(),
            ));
        }
        let diff_ids = rootfs
            .get("diff_ids")
            .and_then(|d| d.as_array())
            .ok_or_else(|| Error::InvalidManifest("image config has no rootfs.diff_ids".into()))?
            .iter()
            .map(|d| {
                d.as_str()
                    .ok_or_else(|| Error::InvalidManifest("diff_id is not a string".into()))?
                    .parse::<Digest>()
            })
            .collect::<Result<Vec<_>>>()?;
        let s = |k: &str| raw.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        Ok(ImageConfig {
            diff_ids,
            os: s("os"),
            architecture: s("architecture"),
            variant: raw.get("variant").and_then(|v| v.as_str()).map(str::to_string),
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layer_type: &str) -> Vec<u8> {
        let d = format!("sha256:{}", "a".repeat(64));
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": d, "size": 10},
            "layers": [{"mediaType": layer_type, "digest": d, "size": 20}],
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn parses_oci_manifest() {
        let Parsed::Image(m) = parse(OCI_MANIFEST, &manifest("application/vnd.oci.image.layer.v1.tar+zstd")).unwrap()
        else {
            panic!("expected an image manifest")
        };
        assert_eq!(m.layers[0].compression, Compression::Zstd);
        assert_eq!(m.layers[0].blob.size, 20);
    }

    #[test]
    fn refuses_unknown_layer_type_and_mismatched_type() {
        assert!(parse(OCI_MANIFEST, &manifest("application/x-evil")).is_err());
        assert!(parse(DOCKER_MANIFEST, &manifest("application/vnd.oci.image.layer.v1.tar")).is_err());
        assert!(parse(OCI_MANIFEST, &vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
    }

    #[test]
    fn refuses_a_manifest_that_is_also_an_index() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&manifest("application/vnd.oci.image.layer.v1.tar")).unwrap();
        v["manifests"] = serde_json::json!([]);
        let bytes = v.to_string().into_bytes();
        for declared in [OCI_MANIFEST, OCI_INDEX, ""] {
            let e = parse(declared, &bytes).unwrap_err().to_string();
            assert!(e.contains("CVE-2021-41190"), "{e}");
        }
    }

    #[test]
    fn the_kind_comes_from_the_media_type_and_contradictions_are_refused() {
        let image = serde_json::json!({"schemaVersion": 2, "config": {}, "layers": []});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": []});
        assert_eq!(kind(OCI_MANIFEST, &image).unwrap(), (OCI_MANIFEST, Kind::Image));
        assert_eq!(kind("", &image).unwrap(), (OCI_MANIFEST, Kind::Image), "by shape");
        assert_eq!(kind("application/json", &index).unwrap(), (OCI_INDEX, Kind::Index));
        assert_eq!(kind(DOCKER_LIST, &index).unwrap(), (DOCKER_LIST, Kind::Index));
        // An image type over an index's fields, and the other way round.
        assert!(kind(OCI_MANIFEST, &index).is_err());
        assert!(kind(DOCKER_LIST, &image).is_err());
        let mut typed = image.clone();
        typed["mediaType"] = serde_json::json!(OCI_MANIFEST);
        assert!(kind(OCI_INDEX, &typed).is_err(), "Content-Type contradicts mediaType");
        assert_eq!(kind("application/json", &typed).unwrap().1, Kind::Image);
        typed["mediaType"] = serde_json::json!(7);
        assert!(kind("", &typed).is_err());
        assert!(kind("text/html", &image).is_err(), "only manifest types");
        assert!(kind("application/vnd.docker.distribution.manifest.v1+json", &image).is_err());
    }
}
