//! Pulling from a legacy v1 registry, the way Docker migrated v1 images.
//!
//! The v1 transport resolves a tag to its ancestry chain: image ids (64
//! hex digits), each with its JSON, the image first and the base last. The
//! chain is checked before anything is fetched: ids valid and unique (an
//! ancestry that loops is refused), each JSON's `id` its own and its
//! `parent` the next id, at most the layer limit deep. Then, oldest first,
//! each layer is downloaded (resumed with `Range` after a cut) and applied;
//! v1 has no content digests, so each layer's diffID is computed as it is
//! applied. The image config is made from the top image's JSON with the
//! v1-only keys removed, `rootfs.diff_ids` from the applied layers and a
//! history entry per image (Docker's `MakeConfigFromV1Config`). The image
//! is committed under its tag; a v1 pull has no manifest digest.

use crate::digest::Digest;
use crate::error::{Error, ErrorClass, PluginError, Result};
use crate::plugin::{Endpoint, Resolved, Transport};
use crate::pull::{read_until_done, Done, PullOutcome, Puller, Spooled, Status};
use crate::reference::Reference;
use crate::retry::{retry, Policy, Thread};
use crate::stage::{ImageCommit, Staging};
use crate::store::random_id;
use serde_json::{json, Value};
use std::io::Write;

/// One checked image of a v1 chain.
#[derive(Debug)]
struct V1Image {
    id: String,
    json: Value,
}

/// Keys of a v1 image JSON that are not part of an image config.
const V1_ONLY: &[&str] = &["id", "parent", "Size", "parent_id", "layer_id", "throwaway", "checksum"];

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidManifest(msg.into())
}

fn valid_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a chain (image first) and returns it base first.
fn check_chain(chain: Vec<(String, Vec<u8>)>, max_depth: usize) -> Result<Vec<V1Image>> {
    if chain.is_empty() {
        return Err(invalid("the v1 registry sent an empty ancestry"));
    }
    if chain.len() > max_depth {
        return Err(crate::stage::too_deep(chain.len(), max_depth));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(chain.len());
    for (i, (id, bytes)) in chain.iter().enumerate() {
        if !valid_id(id) {
            return Err(invalid(format!(
                "v1 image id {} is not 64 hex digits",
                crate::text::quote_bytes(id.as_bytes())
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(invalid(format!("the v1 ancestry of {} loops at {id}", chain[0].0)));
        }
        let json: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("v1 image {id}: its JSON: {e}")))?;
        if json.get("id").and_then(Value::as_str) != Some(id.as_str()) {
            return Err(invalid(format!("v1 image {id}: its JSON names another id")));
        }
        let parent = json.get("parent").and_then(Value::as_str).filter(|p| !p.is_empty());
        let expected = chain.get(i + 1).map(|(p, _)| p.as_str());
        if parent != expected {
            return Err(invalid(format!(
                "v1 image {id}: its parent is not the next image of the ancestry"
            )));
        }
        out.push(V1Image { id: id.clone(), json });
    }
    out.reverse();
    Ok(out)
}

/// The image config of a v1 chain (base first) whose layers have `diff_ids`.
fn config_of(chain: &[V1Image], diff_ids: &[Digest]) -> Vec<u8> {
    let top = chain.last().expect("non-empty");
    let mut config = top.json.clone();
    if let Some(m) = config.as_object_mut() {
        for k in V1_ONLY {
            m.remove(*k);
        }
    }
    let history: Vec<Value> = chain
        .iter()
        .map(|img| {
            let j = &img.json;
            let mut h = json!({
                "created": j.get("created").cloned().unwrap_or(Value::Null),
                "created_by": j["container_config"]["Cmd"]
                    .as_array()
                    .map(|c| c.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default(),
            });
            if let Some(a) = j.get("author") {
                h["author"] = a.clone();
            }
            h
        })
        .collect();
    config["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    config["history"] = json!(history);
    serde_json::to_vec(&config).expect("serialisable")
}

impl Puller<'_> {
    /// Pulls `reference` from the v1 endpoint `ep` with `v1`, the v1 transport.
    pub(crate) fn pull_from_v1(&self, v1: &dyn Transport, ep: &Endpoint, reference: &Reference) -> Result<PullOutcome> {
        let repo = &ep.repository(&reference.path);
        let Some(tag) = &reference.tag else {
            return Err(Error::Plugin(PluginError::new(
                ErrorClass::Unsupported,
                "a v1 registry cannot pull by digest",
            )));
        };
        let resolved = v1.resolve(ep, repo, tag, &[])?;
        let Resolved::V1Chain(chain) = resolved else {
            return Err(invalid("the v1 transport answered with a manifest"));
        };
        let chain = check_chain(chain, self.options.max_depth)?;
        self.progress.line(&format!("Pulling repository {}", reference.path));
        let mut staging = Staging::new(self.store, self.driver, self.options.max_layer_bytes);
        let mut diff_ids: Vec<Digest> = Vec::new();
        let mut parent: Option<Digest> = None;
        for img in &chain {
            let short = &img.id[..12];
            self.progress.layer(short, Status::Downloading, 0, 0);
            let spooled = self.download_v1(v1, ep, repo, &img.id)?;
            let file = spooled.open().map_err(|e| Error::io("opening a downloaded layer", e))?;
            self.progress.layer(short, Status::Extracting, 0, 0);
            let (diff_id, _) = staging.apply(parent.as_ref(), None, Box::new(file), None, &img.id, None)?;
            parent = Some(Digest::chain(parent.as_ref(), &diff_id));
            diff_ids.push(diff_id);
            self.progress.layer(short, Status::PullComplete, 0, 0);
        }
        let config = config_of(&chain, &diff_ids);
        let image_id = Digest::of(&config);
        let downloaded = !self.store.images.exists(&image_id);
        staging.commit(&[ImageCommit {
            config: &config,
            refs: vec![reference.clone()],
            content: None,
        }])?;
        Ok(PullOutcome {
            manifest_digest: None,
            image_id,
            downloaded,
            timings: Default::default(),
        })
    }

    /// Downloads a v1 layer to a spool file, resuming after a cut; bounded
    /// by the layer limit (v1 gives no digest to check).
    fn download_v1(&self, v1: &dyn Transport, ep: &Endpoint, repo: &str, id: &str) -> Result<Spooled> {
        let path = self.store.blob_tmp().join(format!("v1-{id}-{}", &random_id()[..8]));
        let spooled = Spooled::at(path.clone());
        let mut file = std::fs::File::create_new(&path).map_err(|e| Error::io("creating a download file", e))?;
        let mut got: u64 = 0;
        let mut buf = vec![0u8; 256 << 10];
        let policy = Policy::new(self.options.retries, self.options.backoff);
        retry(
            policy,
            &Thread,
            |_| {},
            |_| {
                let mut stream = v1.open_v1_layer(ep, repo, id, got)?;
                let done = read_until_done(&mut stream, &mut buf, |bytes| {
                    got += bytes.len() as u64;
                    if got > self.options.max_layer_bytes {
                        return Err(Error::Integrity(format!(
                            "v1 layer {id}: larger than the layer limit of {} bytes",
                            self.options.max_layer_bytes
                        )));
                    }
                    file.write_all(bytes).map_err(|e| Error::io("writing a download", e))
                })?;
                match done {
                    Done::Ended => Ok(()),
                    Done::Cut(e) => {
                        Err(PluginError::new(ErrorClass::Transient, format!("reading layer {id}: {e}")).into())
                    }
                }
            },
        )?;
        Ok(spooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, parent: Option<&str>) -> (String, Vec<u8>) {
        let mut j = json!({"id": id, "container_config": {"Cmd": ["/bin/sh", "-c", "echo"]}, "created": "2014-01-01T00:00:00Z"});
        if let Some(p) = parent {
            j["parent"] = json!(p);
        }
        (id.to_string(), serde_json::to_vec(&j).unwrap())
    }

    #[test]
    fn chains_are_checked_and_turned_base_first() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let chain = check_chain(vec![img(&b, Some(&a)), img(&a, None)], 128).unwrap();
        assert_eq!(chain[0].id, a);
        let config: Value = serde_json::from_slice(&config_of(&chain, &[Digest::of(b"1"), Digest::of(b"2")])).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        assert_eq!(config["history"][1]["created_by"], "/bin/sh -c echo");
        assert!(config.get("id").is_none() && config.get("parent").is_none());

        let looping = check_chain(vec![img(&b, Some(&a)), img(&a, Some(&b)), img(&b, Some(&a))], 128);
        assert!(looping.unwrap_err().to_string().contains("loops"));
        let bad = check_chain(vec![img("xyz", None)], 128);
        assert!(bad.unwrap_err().to_string().contains("64 hex"));
        let wrong_parent = check_chain(vec![img(&b, None), img(&a, None)], 128);
        assert!(wrong_parent.unwrap_err().to_string().contains("parent"));
        assert!(check_chain(vec![img(&b, Some(&a)), img(&a, None)], 1).is_err());
    }
}
