//! The hostile-archive corpus, written by a generator rather than checked
//! in: one folder per case holding `archive.tar` and `expect` (a fragment of
//! the one-line error `gantry load` must give). Adding a case adds an entry
//! to [`cases`], nothing else.

use crate::image::{compress, sha256, Compression, Layer};
use serde_json::json;
use std::path::Path;

/// An archive entry written raw (names and links unchecked).
pub enum Entry {
    File(String, Vec<u8>),
    Symlink(String, String),
    /// Blocks written verbatim (a multiple of 512 bytes).
    Raw(Vec<u8>),
}

/// A tar extension record header (`kind` b'x' for PAX, b'L' for a GNU long
/// name) claiming `size` bytes, followed by that many bytes of `fill`.
pub fn extension_record(kind: u8, size: usize, fill: u8) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend(std::iter::repeat_n(fill, size));
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Bytes that look random and hold every terminal control (a deterministic
/// generator: the corpus is the same on every run).
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    out[..9].copy_from_slice(b"\x1b[31m\n\r\x07\x9b");
    out
}

/// Writes a tar of `entries`, bypassing the builder's name checks.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if let Entry::Raw(blocks) = e {
            b.get_mut().extend_from_slice(blocks);
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let (name, data): (&str, &[u8]) = match e {
            Entry::File(n, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                (n, d)
            }
            Entry::Symlink(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (n, &[])
            }
            Entry::Raw(_) => unreachable!("written above"),
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn config(diff_ids: &[String]) -> Vec<u8> {
    json!({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string()
    .into_bytes()
}

/// A `docker save` archive of one image whose layers are `layers` (blob
/// bytes as stored, with the diffIDs of `tars`), tagged `tag`.
pub fn docker_archive(tars: &[Vec<u8>], blobs: &[Vec<u8>], tag: &str) -> Vec<Entry> {
    let diff_ids: Vec<String> = tars.iter().map(|t| sha256(t)).collect();
    let cfg = config(&diff_ids);
    let cfg_name = format!("{}.json", &sha256(&cfg)[7..]);
    let mut entries = vec![Entry::File(cfg_name.clone(), cfg)];
    let mut names = Vec::new();
    for (i, b) in blobs.iter().enumerate() {
        let n = format!("layer{i}/layer.tar");
        entries.push(Entry::File(n.clone(), b.clone()));
        names.push(n);
    }
    let manifest = json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": names}]);
    entries.push(Entry::File("manifest.json".into(), manifest.to_string().into_bytes()));
    entries
}

/// A good one-layer image: the tars and their stored blobs.
pub fn good_layer() -> Vec<u8> {
    Layer::new().dir("etc", 0o755).file("etc/ok", 0o644, b"ok\n").tar()
}

/// An OCI layout archive of one image with the given layer media type.
pub fn oci_archive(tar: &[u8], media_type: &str, declared_size_delta: i64, tag: &str) -> Vec<Entry> {
    let (blob, _) = compress(tar, Compression::Gzip);
    let cfg = config(&[sha256(tar)]);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&cfg), "size": cfg.len()},
        "layers": [{"mediaType": media_type, "digest": sha256(&blob), "size": blob.len() as i64 + declared_size_delta}],
    })
    .to_string()
    .into_bytes();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    vec![
        Entry::File("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        Entry::File(format!("blobs/sha256/{}", &sha256(&cfg)[7..]), cfg),
        Entry::File(format!("blobs/sha256/{}", &sha256(&manifest)[7..]), manifest),
        Entry::File(format!("blobs/sha256/{}", &sha256(&blob)[7..]), blob),
        Entry::File("index.json".into(), index.to_string().into_bytes()),
    ]
}

fn hostile_layer(build: impl FnOnce(Layer) -> Layer) -> Vec<u8> {
    build(Layer::new()).tar()
}

/// A first layer with links for later layers to trip on: `lnk` (in the
/// tree), `up` (leading out) and `d/inner`. The allowed and the refused
/// stacks share it, so a pull of one finds it stored by the other.
pub fn links_below() -> Vec<u8> {
    Layer::new()
        .dir("real", 0o755)
        .file("real/x", 0o644, b"x\n")
        .symlink("lnk", "real")
        .symlink("up", "../../../..")
        .dir("d", 0o755)
        .file("d/x", 0o644, b"d/x\n")
        .symlink("d/inner", "../real")
        .tar()
}

/// Layer stacks the core's layer rules refuse, whatever the driver:
/// (name, layer tars oldest first, expected error fragment). Each is also
/// a `layer-rule-<name>` case of the archive corpus ([`cases`]), and
/// `hostile.rs` pulls each with every driver and compares the refusals.
pub fn layer_rule_refused() -> Vec<(&'static str, Vec<Vec<u8>>, &'static str)> {
    let through = "passes through a link";
    let below = links_below;
    vec![
        // Writing through a link an earlier layer planted: in the tree
        // (vfs used to follow it, overlay2 to hide it) or leading out.
        (
            "write-through-link-below",
            vec![below(), Layer::new().file("lnk/evil", 0o644, b"e").tar()],
            through,
        ),
        (
            "write-through-escaping-link-below",
            vec![below(), Layer::new().file("up/evil", 0o644, b"e").tar()],
            through,
        ),
        (
            "dir-through-link-below",
            vec![
                below(),
                Layer::new().dir("lnk/sub", 0o755).file("lnk/sub/f", 0o644, b"f").tar(),
            ],
            through,
        ),
        // A whiteout or an opaque marker beneath such a link.
        (
            "whiteout-under-link-below",
            vec![below(), Layer::new().whiteout("lnk/x").tar()],
            through,
        ),
        (
            "whiteout-under-escaping-link-below",
            vec![below(), Layer::new().whiteout("up/x").tar()],
            through,
        ),
        (
            "opaque-under-link-below",
            vec![below(), Layer::new().opaque("lnk").tar()],
            through,
        ),
        (
            "opaque-under-escaping-link-below",
            vec![below(), Layer::new().opaque("up").tar()],
            through,
        ),
        // A link deeper in the path, two layers down.
        (
            "write-through-nested-link",
            vec![
                Layer::new()
                    .dir("a", 0o755)
                    .dir("real", 0o755)
                    .symlink("a/lnk", "../real")
                    .tar(),
                Layer::new().file("other", 0o644, b"o").tar(),
                Layer::new().file("a/lnk/deep/f", 0o644, b"f").tar(),
            ],
            through,
        ),
        // A link this same layer made.
        (
            "write-through-link-same-layer",
            vec![Layer::new()
                .dir("real", 0o755)
                .symlink("lnk", "real")
                .file("lnk/f", 0o644, b"f")
                .tar()],
            through,
        ),
        // A hard link whose target is reached through a link.
        (
            "hardlink-through-link-below",
            vec![below(), Layer::new().hardlink("h", "lnk/x", 0o644).tar()],
            through,
        ),
        // A path this layer whited out, made a directory again: overlay2
        // would show the lower contents again, vfs would not.
        (
            "dir-after-whiteout-same-layer",
            vec![
                Layer::new().dir("d", 0o755).file("d/old", 0o644, b"old").tar(),
                Layer::new()
                    .whiteout("d")
                    .dir("d", 0o755)
                    .file("d/new", 0o644, b"new")
                    .tar(),
            ],
            "whited out earlier in the same layer",
        ),
        // overlayfs's own whiteout spelling as a layer entry.
        (
            "whiteout-device",
            vec![Layer::new()
                .file("keep", 0o644, b"k")
                .device("ghost", false, 0, 0)
                .tar()],
            "0/0 character device",
        ),
    ]
}

/// Layer stacks with links, whiteouts and opaque directories across
/// layers that the rules allow: every driver must show the same tree.
pub fn layer_rule_allowed() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let below = links_below;
    vec![
        (
            "link-replaced-by-dir",
            vec![
                below(),
                Layer::new().dir("lnk", 0o755).file("lnk/own", 0o644, b"own").tar(),
            ],
        ),
        (
            "link-whited-out-then-dir",
            vec![
                below(),
                Layer::new().whiteout("lnk").tar(),
                Layer::new().dir("lnk", 0o755).file("lnk/f", 0o644, b"f").tar(),
            ],
        ),
        ("link-whited-out", vec![below(), Layer::new().whiteout("lnk").tar()]),
        (
            "opaque-dir-held-a-link",
            vec![
                below(),
                Layer::new()
                    .dir("d", 0o755)
                    .opaque("d")
                    .dir("d/inner", 0o755)
                    .file("d/inner/f", 0o644, b"f")
                    .tar(),
            ],
        ),
        (
            "dir-whited-out-then-link",
            vec![
                below(),
                Layer::new().whiteout("d").tar(),
                Layer::new().symlink("d", "real").tar(),
            ],
        ),
        ("link-over-dir", vec![below(), Layer::new().symlink("d", "real").tar()]),
        (
            "first-layer-whiteouts",
            vec![Layer::new()
                .file("keep", 0o644, b"k")
                .whiteout("ghost")
                .dir("o", 0o755)
                .opaque("o")
                .file("o/f", 0o644, b"f")
                .tar()],
        ),
    ]
}

/// Every hostile case: (name, archive entries, expected error fragment).
pub fn cases() -> Vec<(&'static str, Vec<Entry>, &'static str)> {
    let good = good_layer();
    let one = |tar: Vec<u8>| docker_archive(std::slice::from_ref(&tar), std::slice::from_ref(&tar), "hostile/x:1");
    let mut out: Vec<(&'static str, Vec<Entry>, &'static str)> = Vec::new();

    // Names in manifest.json.
    out.push((
        "config-dotdot",
        with_manifest(
            one(good.clone()),
            json!([{"Config": "../evil.json", "RepoTags": [], "Layers": []}])
                .to_string()
                .into_bytes(),
        ),
        "leaves the archive",
    ));
    out.push((
        "config-absolute",
        with_manifest(
            one(good.clone()),
            json!([{"Config": "/etc/passwd", "RepoTags": [], "Layers": []}])
                .to_string()
                .into_bytes(),
        ),
        "is absolute",
    ));
    out.push((
        "layer-dotdot",
        with_manifest(one(good.clone()), json!([{"Config": format!("{}.json", &sha256(&config(&[sha256(&good)]))[7..]), "RepoTags": [], "Layers": ["../../layer.tar"]}]).to_string().into_bytes()),
        "leaves the archive",
    ));
    // Entries of the archive itself.
    let mut e = one(good.clone());
    e.push(Entry::File("../outside".into(), b"x".to_vec()));
    out.push(("entry-dotdot", e, "leaves the archive"));
    let mut e = one(good.clone());
    e.push(Entry::File("layer0/layer.tar".into(), good.clone()));
    out.push(("duplicate-names", e, "two entries named"));
    let mut e = docker_archive(std::slice::from_ref(&good), &[], "hostile/x:1");
    e.insert(
        0,
        Entry::Symlink("layer0/layer.tar".into(), "../../../etc/passwd".into()),
    );
    out.push((
        "link-out-of-archive",
        relayer(e, &["layer0/layer.tar"]),
        "outside the archive",
    ));
    // Layers that escape.
    out.push((
        "layer-entry-dotdot",
        one(hostile_layer(|l| {
            l.raw(tar::EntryType::Regular, "../escaped-load", "", b"x")
        })),
        "leaves its directory",
    ));
    out.push((
        "layer-entry-absolute",
        one(hostile_layer(|l| {
            l.raw(tar::EntryType::Regular, "/escaped-load", "", b"x")
        })),
        "absolute path",
    ));
    out.push((
        "layer-symlink-same-layer",
        one(hostile_layer(|l| {
            l.symlink("up", "/")
                .raw(tar::EntryType::Regular, "up/escaped-load", "", b"x")
        })),
        "passes through a link",
    ));
    let l1 = hostile_layer(|l| l.symlink("up", "../../../.."));
    let l2 = hostile_layer(|l| l.raw(tar::EntryType::Regular, "up/escaped-load2", "", b"x"));
    out.push((
        "layer-symlink-earlier-layer",
        docker_archive(&[l1.clone(), l2.clone()], &[l1, l2], "hostile/x:1"),
        "passes through a link",
    ));
    out.push((
        "layer-hardlink-out",
        one(hostile_layer(|l| {
            l.raw(tar::EntryType::Link, "hl", "../../etc/passwd", b"")
        })),
        "leaves its directory",
    ));
    // The layer rules (links, whiteouts, opaque directories across layers).
    for (name, tars, expect) in layer_rule_refused() {
        let name: &'static str = format!("layer-rule-{name}").leak();
        out.push((name, docker_archive(&tars, &tars, "hostile/x:1"), expect));
    }
    // Lies about content.
    out.push((
        "layer-count-mismatch",
        docker_archive(
            &[good.clone(), good.clone()],
            std::slice::from_ref(&good),
            "hostile/x:1",
        ),
        "lists 2 layers but the archive has 1",
    ));
    let other = Layer::new().file("other", 0o644, b"other").tar();
    out.push((
        "wrong-diffid",
        docker_archive(std::slice::from_ref(&other), std::slice::from_ref(&good), "hostile/x:1"),
        "diffID mismatch",
    ));
    let (gz, _) = compress(&good, Compression::Gzip);
    out.push((
        "truncated-gzip",
        docker_archive(
            std::slice::from_ref(&good),
            &[gz[..gz.len() / 2].to_vec()],
            "hostile/x:1",
        ),
        "corrupt layer",
    ));
    let mut bad = gz.clone();
    let n = bad.len();
    for b in &mut bad[12..n - 10] {
        *b ^= 0x5a;
    }
    out.push((
        "corrupt-gzip",
        docker_archive(std::slice::from_ref(&good), &[bad], "hostile/x:1"),
        "corrupt layer",
    ));
    // 256 MiB of zeros in a ~250 KiB gzip: stopped by the configured cap.
    let bomb = Layer::new().file("zeros", 0o644, &vec![0u8; 256 << 20]).tar();
    let (bomb_gz, _) = compress(&bomb, Compression::Gzip);
    out.push((
        "decompression-bomb",
        docker_archive(std::slice::from_ref(&bomb), &[bomb_gz], "hostile/x:1"),
        "its uncompressed size exceeds the limit of 64 MiB",
    ));
    // Malformed documents.
    out.push((
        "invalid-json",
        with_manifest(one(good.clone()), b"[{\"Config\": ".to_vec()),
        "manifest.json is not valid",
    ));
    out.push((
        "unknown-media-type",
        oci_archive(&good, "application/x-evil", 0, "hostile/x:1"),
        "unsupported layer media type",
    ));
    out.push((
        "oci-size-mismatch",
        oci_archive(&good, "application/vnd.oci.image.layer.v1.tar+gzip", 7, "hostile/x:1"),
        "the descriptor says",
    ));
    // With its documents first, a stream applies layers as they come: the
    // same checks must hold there.
    out.push((
        "streamed-layer-dotdot",
        documents_first(one(hostile_layer(|l| {
            l.raw(tar::EntryType::Regular, "../escaped-load", "", b"x")
        }))),
        "leaves its directory",
    ));
    out.push((
        "streamed-wrong-diffid",
        documents_first(docker_archive(
            std::slice::from_ref(&other),
            std::slice::from_ref(&good),
            "hostile/x:1",
        )),
        "diffID mismatch",
    ));
    // Extension records beyond 1 MiB, in a layer and in the archive itself:
    // refused before anything reads them whole.
    let mut pax = extension_record(b'x', 8 << 20, b'a');
    pax.extend_from_slice(&good);
    let (pax_blob, _) = compress(&pax, Compression::Zstd);
    out.push((
        "layer-pax-oversized",
        docker_archive(std::slice::from_ref(&pax), &[pax_blob], "hostile/x:1"),
        "larger than the limit of 1048576",
    ));
    let mut e = one(good.clone());
    e.insert(0, Entry::Raw(extension_record(b'L', 8 << 20, b'n')));
    out.push(("archive-longname-oversized", e, "larger than the limit of 1048576"));
    // overlayfs's own attributes may come from no layer.
    out.push((
        "layer-overlay-xattr",
        one(hostile_layer(|l| {
            l.file_with_xattr("redirected", "trusted.overlay.redirect", b"/etc", b"x")
        })),
        "overlay attribute",
    ));
    // A layer of noise: the error quotes none of it raw.
    out.push(("layer-noise", one(noise(64 << 10)), "corrupt layer"));
    // Deeper than the layer limit.
    let tiny: Vec<Vec<u8>> = (0..129)
        .map(|i| Layer::new().file(&format!("f{i}"), 0o644, b"x").tar())
        .collect();
    out.push((
        "too-many-layers",
        docker_archive(&tiny, &tiny, "hostile/x:1"),
        "129 layers, more than the limit of 128",
    ));
    // More images than an archive may describe.
    let cfg_name = format!("{}.json", &sha256(&config(&[sha256(&good)]))[7..]);
    let many: Vec<serde_json::Value> = (0..1025)
        .map(|_| json!({"Config": cfg_name, "RepoTags": [], "Layers": ["layer0/layer.tar"]}))
        .collect();
    out.push((
        "too-many-images",
        with_manifest(one(good.clone()), serde_json::to_vec(&many).unwrap()),
        "more than the limit of 1024",
    ));
    // CVE-2021-41190: a manifest that is also an index.
    out.push((
        "manifest-and-index",
        ambiguous_manifest(oci_archive(
            &good,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            0,
            "hostile/x:1",
        )),
        "CVE-2021-41190",
    ));
    out.push((
        "index-nested-too-deep",
        nested_index(
            oci_archive(&good, "application/vnd.oci.image.layer.v1.tar+gzip", 0, "hostile/x:1"),
            5,
        ),
        "nest deeper than 4",
    ));
    out.push((
        "not-an-image",
        vec![Entry::File("hello.txt".into(), b"hi".to_vec())],
        "not an image archive",
    ));
    out.push((
        "bad-tag",
        docker_archive(
            std::slice::from_ref(&good),
            std::slice::from_ref(&good),
            "UPPER/Case:tag",
        ),
        "invalid tag",
    ));
    out
}

/// Adds `"manifests": []` to the image manifest of an OCI archive (and
/// renames its blob to the new digest).
fn ambiguous_manifest(entries: Vec<Entry>) -> Vec<Entry> {
    rewrite_manifest(entries, |m| {
        m["manifests"] = json!([]);
    })
}

/// Rewrites the image manifest of an OCI archive made by [`oci_archive`].
fn rewrite_manifest(entries: Vec<Entry>, f: impl Fn(&mut serde_json::Value)) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut old_digest = String::new();
    let mut new_manifest = Vec::new();
    for e in &entries {
        if let Entry::File(n, d) = e {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(d) {
                if v.get("layers").is_some() {
                    old_digest = sha256(d);
                    f(&mut v);
                    new_manifest = v.to_string().into_bytes();
                    let _ = n;
                }
            }
        }
    }
    for e in entries {
        match e {
            Entry::File(n, _) if n.ends_with(&old_digest[7..]) => out.push(Entry::File(
                format!("blobs/sha256/{}", &sha256(&new_manifest)[7..]),
                new_manifest.clone(),
            )),
            Entry::File(n, d) if n == "index.json" => {
                let text = String::from_utf8(d)
                    .unwrap()
                    .replace(&old_digest, &sha256(&new_manifest));
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v["manifests"][0]["size"] = json!(new_manifest.len());
                out.push(Entry::File(n, v.to_string().into_bytes()));
            }
            e => out.push(e),
        }
    }
    out
}

/// Wraps the image of an OCI archive in `depth` nested indexes.
fn nested_index(mut entries: Vec<Entry>, depth: usize) -> Vec<Entry> {
    let pos = entries
        .iter()
        .position(|e| matches!(e, Entry::File(n, _) if n == "index.json"))
        .unwrap();
    let Entry::File(_, top) = entries.remove(pos) else {
        unreachable!()
    };
    let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
    let mut desc = top["manifests"][0].clone();
    let annotations = desc.as_object_mut().unwrap().remove("annotations");
    desc["platform"] = json!({"os": "linux", "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64")});
    for _ in 0..depth {
        let idx =
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]})
                .to_string()
                .into_bytes();
        desc = json!({
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(&idx), "size": idx.len(),
            "platform": desc["platform"].clone(),
        });
        entries.push(Entry::File(format!("blobs/sha256/{}", &sha256(&idx)[7..]), idx));
    }
    desc.as_object_mut().unwrap().remove("platform");
    if let Some(a) = annotations {
        desc["annotations"] = a;
    }
    let index = json!({"schemaVersion": 2, "manifests": [desc]});
    entries.push(Entry::File("index.json".into(), index.to_string().into_bytes()));
    entries
}

/// Puts manifest.json and the configs before the layers.
fn documents_first(mut entries: Vec<Entry>) -> Vec<Entry> {
    entries.sort_by_key(|e| match e {
        Entry::File(n, _) if n.ends_with(".json") => 0,
        _ => 1,
    });
    entries
}

/// Replaces the contents of manifest.json.
fn with_manifest(entries: Vec<Entry>, manifest: Vec<u8>) -> Vec<Entry> {
    entries
        .into_iter()
        .map(|e| match e {
            Entry::File(n, _) if n == "manifest.json" => Entry::File(n, manifest.clone()),
            e => e,
        })
        .collect()
}

/// Points manifest.json's layers at `names`.
fn relayer(entries: Vec<Entry>, names: &[&str]) -> Vec<Entry> {
    let mut m: serde_json::Value = entries
        .iter()
        .find_map(|e| match e {
            Entry::File(n, d) if n == "manifest.json" => serde_json::from_slice(d).ok(),
            _ => None,
        })
        .expect("a manifest.json");
    m[0]["Layers"] = json!(names);
    with_manifest(entries, m.to_string().into_bytes())
}

/// Writes the corpus: `dir/<case>/archive.tar` and `dir/<case>/expect`.
pub fn write(dir: &Path) {
    for (name, entries, expect) in cases() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("archive.tar"), tar_of(&entries)).unwrap();
        std::fs::write(d.join("expect"), expect).unwrap();
    }
}
