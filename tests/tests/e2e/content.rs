//! The content store: pulled blobs and manifests kept as the registry
//! served them, so `save` reproduces the registry's digests; they go with
//! the last image that uses them; `keep_content = false` keeps none.

use crate::{peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{sha256, Image, Layer};
use gantry_tests::registry::Registry;
use std::collections::BTreeMap;
use std::path::Path;

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/os-release", 0o644, b"ID=test\n")
        .tar()
}

fn top_layer(name: &str) -> Vec<u8> {
    Layer::new()
        .dir("app", 0o755)
        .file(&format!("app/{name}"), 0o755, name.as_bytes())
        .tar()
}

/// The blobs the content store holds, by digest.
fn content_blobs(g: &Gantry) -> Vec<String> {
    let dir = g.root_path().join("content/blobs/sha256");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| format!("sha256:{}", e.unwrap().file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn archive_entries(path: &Path) -> BTreeMap<String, Vec<u8>> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    let f = std::fs::File::open(path).unwrap();
    for e in tar::Archive::new(f).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(name, data);
    }
    out
}

#[test]
fn save_of_a_pulled_image_has_the_registry_digests() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, m, layers) = publish(
        &reg,
        "test/app",
        "v1",
        &Image::new(vec![base_layer(), top_layer("one")]),
    );
    let g = Gantry::new();
    let name = format!("{}/test/app:v1", reg.addr());
    g.ok(&["pull", &name]);

    // The manifest and every layer blob, under the registry's digests, verified.
    let held = content_blobs(&g);
    for d in layers.iter().map(|l| &l.digest).chain([&m.digest]) {
        assert!(held.contains(d), "{d} not in {held:?}");
        let bytes = std::fs::read(g.root_path().join("content/blobs/sha256").join(&d[7..])).unwrap();
        assert_eq!(&sha256(&bytes), d);
    }
    assert_eq!(held.len(), layers.len() + 2, "manifest, config, layers: {held:?}");

    let archive = g.scratch().join("app.tar");
    g.ok(&["save", "-o", archive.to_str().unwrap(), &name]);
    let entries = archive_entries(&archive);
    let index: serde_json::Value = serde_json::from_slice(&entries["index.json"]).unwrap();
    assert_eq!(index["manifests"][0]["digest"], m.digest.as_str(), "{index}");
    assert_eq!(index["manifests"][0]["mediaType"], m.media_type.as_str(), "{index}");
    let docker: serde_json::Value = serde_json::from_slice(&entries["manifest.json"]).unwrap();
    let want: Vec<String> = layers
        .iter()
        .map(|l| format!("blobs/sha256/{}", &l.digest[7..]))
        .collect();
    assert_eq!(docker[0]["Layers"], serde_json::json!(want), "{docker}");
    for (path, data) in &entries {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            assert_eq!(
                sha256(data),
                format!("sha256:{hex}"),
                "{path} is not what its name says"
            );
        }
    }
    // A peer reads the same manifest digest from the archive.
    let out = std::process::Command::new("skopeo")
        .args(["inspect", &format!("oci-archive:{}", archive.display())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["Digest"], m.digest.as_str(), "{inspected}");

    // The archive loads back into a fresh store as the same image.
    let g2 = Gantry::new();
    g2.ok(&["load", "-i", archive.to_str().unwrap()]);
    let id = |g: &Gantry| g.ok(&["images", "-q"]);
    assert_eq!(id(&g2), id(&g));
    g2.fsck_clean();
}

#[test]
fn blobs_go_with_the_last_image_that_uses_them() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_a, ma, la) = publish(&reg, "test/a", "v1", &Image::new(vec![base_layer(), top_layer("a")]));
    let (_b, mb, lb) = publish(&reg, "test/b", "v1", &Image::new(vec![base_layer(), top_layer("b")]));
    assert_eq!(la[0].digest, lb[0].digest, "the images share their base blob");
    let g = Gantry::new();
    let a = format!("{}/test/a:v1", reg.addr());
    let b = format!("{}/test/b:v1", reg.addr());
    g.ok(&["pull", &a]);
    g.ok(&["pull", &b]);
    let held = content_blobs(&g);
    for d in [&ma.digest, &mb.digest, &la[0].digest, &la[1].digest, &lb[1].digest] {
        assert!(held.contains(d), "{d} not in {held:?}");
    }

    g.ok(&["rmi", &a]);
    let held = content_blobs(&g);
    assert!(!held.contains(&ma.digest) && !held.contains(&la[1].digest), "{held:?}");
    assert!(held.contains(&la[0].digest) && held.contains(&mb.digest), "{held:?}");
    // b still saves with the registry's digests.
    let archive = g.scratch().join("b.tar");
    g.ok(&["save", "-o", archive.to_str().unwrap(), &b]);
    let index: serde_json::Value = serde_json::from_slice(&archive_entries(&archive)["index.json"]).unwrap();
    assert_eq!(index["manifests"][0]["digest"], mb.digest.as_str());

    g.ok(&["rmi", &b]);
    assert_eq!(content_blobs(&g), Vec::<String>::new());
    g.fsck_clean();
}

#[test]
fn keep_content_off_keeps_only_the_layers() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, m, layers) = publish(
        &reg,
        "test/app",
        "v1",
        &Image::new(vec![base_layer(), top_layer("one")]),
    );
    let g = Gantry::new().with_config(&format!(
        "keep_content = false\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        Gantry::test_driver()
    ));
    let name = format!("{}/test/app:v1", reg.addr());
    g.ok(&["pull", &name]);
    assert_eq!(content_blobs(&g), Vec::<String>::new());
    // save rebuilds the layers: named by diffID, not by the registry's blob digests.
    let archive = g.scratch().join("app.tar");
    g.ok(&["save", "-o", archive.to_str().unwrap(), &name]);
    let entries = archive_entries(&archive);
    let index: serde_json::Value = serde_json::from_slice(&entries["index.json"]).unwrap();
    assert_ne!(index["manifests"][0]["digest"], m.digest.as_str());
    for l in &layers {
        assert!(!entries.contains_key(&format!("blobs/sha256/{}", &l.digest[7..])));
    }
}
