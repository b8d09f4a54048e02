//! The legacy v1 registry read API, for clients that speak only v1, as
//! the v1 registry answered it (seed 003): `/v1/_ping`,
//! `/v1/repositories/<name>/images`, `…/tags`, `…/tags/<tag>`,
//! `/v1/images/<id>/ancestry`, `…/json` (with `X-Docker-Size` and
//! `X-Docker-Checksum-Payload`) and `…/layer` (with `Range`).
//!
//! v1 names images by ids, one per layer, each with its parent; gantry
//! derives them from v2 content so every server derives the same ones:
//! a layer's id is `sha256("gantry-v1\n" + parent id + "\n" + blob
//! digest)`, and the top layer's also covers the config digest, so two
//! images that share layers but not configs get different top ids. A v1
//! image's JSON is built from the image config (its history, `created`,
//! `os`, `architecture`, and for the top image its `config`), as Docker's
//! own v2-to-v1 conversion did. The layer is the v2 blob, as stored.

use bytes::Bytes;
use gantry_core::digest::Digest;
use serde_json::{json, Value};

/// One v1 image (a layer with its metadata).
#[derive(Debug, Clone)]
pub struct V1Image {
    pub id: String,
    pub parent: Option<String>,
    pub json: Bytes,
    /// The v2 blob that is its layer.
    pub blob: Digest,
    pub size: u64,
}

fn sha256_hex(s: &str) -> String {
    Digest::of(s.as_bytes()).hex().to_string()
}

/// The v1 images of a v2 image (base first): its layers `(blob digest,
/// size)`, its config digest and bytes.
pub fn images_of(layers: &[(Digest, u64)], config_digest: &Digest, config: &[u8]) -> Vec<V1Image> {
    let cfg: Value = serde_json::from_slice(config).unwrap_or(Value::Null);
    // The history entries that made a layer, in order.
    let history: Vec<&Value> = cfg["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|e| !e["empty_layer"].as_bool().unwrap_or(false))
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<V1Image> = Vec::with_capacity(layers.len());
    for (i, (blob, size)) in layers.iter().enumerate() {
        let parent = out.last().map(|p: &V1Image| p.id.clone());
        let top = i + 1 == layers.len();
        let mut seed = format!("gantry-v1\n{}\n{blob}", parent.as_deref().unwrap_or(""));
        if top {
            seed.push_str(&format!("\n{config_digest}"));
        }
        let id = sha256_hex(&seed);
        let h = history.get(i).copied().unwrap_or(&Value::Null);
        let created = h["created"]
            .as_str()
            .or(cfg["created"].as_str())
            .unwrap_or("1970-01-01T00:00:00Z");
        let mut j = json!({
            "id": id,
            "created": created,
            "container_config": {"Cmd": [h["created_by"].as_str().unwrap_or("")]},
            "os": cfg["os"],
            "architecture": cfg["architecture"],
            "Size": size,
        });
        if let Some(p) = &parent {
            j["parent"] = json!(p);
        }
        if let Some(a) = h["author"].as_str().or(cfg["author"].as_str()) {
            j["author"] = json!(a);
        }
        if top {
            if !cfg["config"].is_null() {
                j["config"] = cfg["config"].clone();
            }
            if let Some(c) = cfg["created"].as_str() {
                j["created"] = json!(c);
            }
        }
        out.push(V1Image {
            id,
            parent,
            json: Bytes::from(serde_json::to_vec(&j).expect("serialisable")),
            blob: blob.clone(),
            size: *size,
        });
    }
    out
}

/// Whether `id` is a v1 image id: 64 lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_chain_and_depend_on_the_config_only_at_the_top() {
        let l = |n: &str| (Digest::of(n.as_bytes()), 10);
        let cfg = br#"{"os":"linux","architecture":"amd64","history":[{"created_by":"a"},{"created_by":"x","empty_layer":true},{"created_by":"b"}]}"#;
        let a = images_of(&[l("1"), l("2")], &Digest::of(b"c1"), cfg);
        let b = images_of(&[l("1"), l("2")], &Digest::of(b"c2"), cfg);
        assert_eq!(a[0].id, b[0].id);
        assert_ne!(a[1].id, b[1].id);
        assert_eq!(a[1].parent.as_deref(), Some(a[0].id.as_str()));
        assert!(a.iter().all(|i| valid_id(&i.id)));
        let j: Value = serde_json::from_slice(&a[1].json).unwrap();
        assert_eq!(j["container_config"]["Cmd"][0], "b");
        assert_eq!(j["parent"], a[0].id.as_str());
        assert_eq!(images_of(&[l("1"), l("2")], &Digest::of(b"c1"), cfg)[1].id, a[1].id);
    }
}
