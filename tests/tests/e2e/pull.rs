//! Pulls of good images: layouts, compressions, platforms; export equals umoci.

use crate::{assert_export_matches_umoci, assert_refused, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, Compression, Image, Layer, Layout};
use gantry_tests::registry::Registry;

#[test]
fn pulls_a_rich_image_and_exports_what_umoci_unpacks() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (p, _, _) = publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let g = Gantry::new();
    let name = format!("{}/test/rich:v1", reg.addr());
    let out = g.ok(&["pull", &name]);
    assert!(out.contains("v1: Pulling from test/rich"), "{out}");
    assert_eq!(out.matches("Pull complete").count(), 3, "{out}");
    assert!(
        out.contains(&format!("Status: Downloaded newer image for {name}")),
        "{out}"
    );
    assert!(out.contains("Digest: sha256:"), "{out}");
    g.fsck_clean();
    g.assert_tmpdir_untouched();
    assert_export_matches_umoci(&g, &name, p.dir.path(), "v1");

    // A second pull finds everything present and downloads nothing.
    let out = g.ok(&["pull", &name]);
    assert!(
        out.contains(&format!("Status: Image is up to date for {name}")),
        "{out}"
    );
    assert_eq!(out.matches("Already exists").count(), 3, "{out}");
    assert!(!out.contains("Pull complete"), "{out}");
}

#[test]
fn pulls_zstd_and_uncompressed_layers() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    // umoci reads only gzip layers: the same tars, gzip-compressed, are the reference.
    let (reference, _, _) = publish(&reg, "test/comp", "gzip", &Image::new(rich_layers()));
    for (tag, c) in [("zstd", Compression::Zstd), ("plain", Compression::None)] {
        let mut img = Image::new(rich_layers());
        img.compression = c;
        publish(&reg, "test/comp", tag, &img);
        let g = Gantry::new();
        let name = format!("{}/test/comp:{tag}", reg.addr());
        g.ok(&["pull", &name]);
        g.fsck_clean();
        assert_export_matches_umoci(&g, &name, reference.dir.path(), "gzip");
    }
}

#[test]
fn picks_the_platform_from_a_manifest_list() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let amd = Image::new(vec![Layer::new().file("arch", 0o644, b"amd64\n").tar()]);
    let mut arm = Image::new(vec![Layer::new()
        .file("arch", 0o644, b"arm64\n")
        .dir("arm", 0o700)
        .tar()]);
    arm.arch = "arm64";
    let (am, _) = layout.image(&amd);
    let (rm, _) = layout.image(&arm);
    layout.tag("amd64", &am, Some(("linux", "amd64")));
    layout.tag("arm64", &rm, Some(("linux", "arm64")));
    let idx = layout.multi(&[(&amd, &am), (&arm, &rm)]);
    layout.tag("multi", &idx, None);
    reg.push(dir.path(), "multi", "test/multi:latest");
    let name = format!("{}/test/multi", reg.addr());

    let g = Gantry::new();
    let out = g.ok(&["pull", "--platform", "linux/arm64", &name]);
    assert!(
        out.contains(&format!("Digest: {}", idx.digest)),
        "records the list's digest: {out}"
    );
    let inspect: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    assert_eq!(inspect[0]["Architecture"], "arm64");
    assert_export_matches_umoci(&g, &name, dir.path(), "arm64");

    let g = Gantry::new();
    g.ok(&["pull", &name]);
    let inspect: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    assert_eq!(
        inspect[0]["Architecture"],
        std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64")
    );
    assert_refused(
        &g,
        &["pull", "--platform", "linux/s390x", &name],
        "no matching manifest for linux/s390x",
    );
    assert_refused(&g, &["pull", "--platform", "linux/z80", &name], "invalid platform");
}

#[test]
fn pulls_several_images_at_once_sharing_a_download() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let base = Layer::new().file("shared", 0o644, &vec![3u8; 200_000]).tar();
    let a = Image::new(vec![base.clone(), Layer::new().file("a", 0o644, b"a").tar()]);
    let b = Image::new(vec![base.clone(), Layer::new().file("b", 0o644, b"b").tar()]);
    let (_pa, _, la) = publish(&reg, "test/a", "v1", &a);
    let (_pb, _, lb) = publish(&reg, "test/b", "v1", &b);
    assert_eq!(la[0].digest, lb[0].digest, "the base layer blob is shared");
    // The shared blob is slow, so both pulls surely want it at once.
    let proxy = gantry_tests::proxy::Proxy::start(
        reg.port,
        gantry_tests::proxy::Faults {
            delay_blob: Some((la[0].digest.clone(), std::time::Duration::from_millis(700))),
            ..Default::default()
        },
    );
    let g = Gantry::new();
    g.ok(&[
        "pull",
        &format!("{}/test/a:v1", proxy.addr()),
        &format!("{}/test/b:v1", proxy.addr()),
    ]);
    let seen = proxy.seen.lock().unwrap();
    assert_eq!(
        seen.blob_gets.get(&la[0].digest),
        Some(&1),
        "the shared blob was fetched once"
    );
    drop(seen);
    g.fsck_clean();
}

#[test]
fn a_blob_the_store_holds_is_not_fetched_again_under_another_parent() {
    if !peers() {
        return;
    }
    // The same layer blob on top of nothing and on top of another layer:
    // two different layers (chain IDs), one download. This is also what a
    // concurrent pull meets when another pull committed the blob after it
    // planned.
    let reg = Registry::start();
    let shared = Layer::new().file("shared", 0o644, &vec![5u8; 300_000]).tar();
    let first = Layer::new().file("first", 0o644, b"first").tar();
    let a = Image::new(vec![shared.clone()]);
    let b = Image::new(vec![first, shared]);
    let (_pa, _, la) = publish(&reg, "test/a", "v1", &a);
    let (_pb, _, lb) = publish(&reg, "test/b", "v1", &b);
    assert_eq!(la[0].digest, lb[1].digest, "one blob in both images");
    let proxy = gantry_tests::proxy::Proxy::start(reg.port, Default::default());
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/a:v1", proxy.addr())]);
    g.ok(&["pull", &format!("{}/test/b:v1", proxy.addr())]);
    let seen = proxy.seen.lock().unwrap();
    assert_eq!(
        seen.blob_gets.get(&la[0].digest),
        Some(&1),
        "the shared blob was fetched once"
    );
    assert_eq!(seen.blob_gets.get(&lb[0].digest), Some(&1));
    drop(seen);
    let exported = g.scratch().join("b.tar");
    g.ok(&[
        "export",
        &format!("{}/test/b:v1", proxy.addr()),
        "-o",
        exported.to_str().unwrap(),
    ]);
    let mut files = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(std::fs::File::open(&exported).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(e.path().unwrap().to_string_lossy().into_owned(), data);
    }
    assert_eq!(files.get("shared"), Some(&vec![5u8; 300_000]));
    assert_eq!(files.get("first").map(Vec::as_slice), Some(&b"first"[..]));
    g.fsck_clean();
    // The spooled link was the pull's own: removing both images leaves the
    // store consistent.
    g.ok(&["rmi", &format!("{}/test/a:v1", proxy.addr())]);
    g.ok(&["rmi", &format!("{}/test/b:v1", proxy.addr())]);
    g.fsck_clean();
}

#[test]
fn a_pull_of_many_layers_records_where_each_blob_came_from() {
    if !peers() {
        return;
    }
    // Enough layers that the commit writes this metadata on two threads;
    // two layers are the same blob (one diffID, one file to append to).
    let mut layers: Vec<Vec<u8>> = (0..14)
        .map(|i| {
            Layer::new()
                .file(&format!("f{i}"), 0o644, format!("layer {i}\n").as_bytes())
                .tar()
        })
        .collect();
    layers.push(layers[3].clone());
    let reg = Registry::start();
    let (_p, _, descs) = publish(&reg, "test/many", "v1", &Image::new(layers.clone()));
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/many:v1", reg.addr())]);
    let image_dir = std::fs::read_dir(g.root_path().join("image"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("distribution").is_dir())
        .expect("a driver's image directory");
    let dist = image_dir.join("distribution");
    let repo = format!("{}/test/many", reg.addr());
    for (tar, desc) in layers.iter().zip(&descs) {
        let diff_id = gantry_tests::image::sha256(tar);
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let recorded = std::fs::read_to_string(dist.join("diffid-by-digest/sha256").join(hex(&desc.digest))).unwrap();
        assert_eq!(recorded, diff_id, "the diffID of blob {}", desc.digest);
        let sources: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dist.join("v2metadata-by-diffid/sha256").join(hex(&diff_id))).unwrap(),
        )
        .unwrap();
        assert_eq!(
            sources,
            serde_json::json!([{ "Digest": desc.digest, "SourceRepository": repo, "HMAC": "" }]),
            "where {diff_id} came from, once"
        );
    }
    g.fsck_clean();
}

#[test]
fn a_child_layer_never_changes_the_parent_layers_it_shares_files_with() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let layers = rich_layers();
    // The parent image: the first two layers. The child's third layer
    // rewrites bin/sh, which the vfs layers share by hard link.
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (parent, _) = layout.image(&Image::new(layers[..2].to_vec()));
    let (child, _) = layout.image(&Image::new(layers.clone()));
    layout.tag("parent", &parent, None);
    layout.tag("child", &child, None);
    reg.push(dir.path(), "parent", "test/family:parent");
    reg.push(dir.path(), "child", "test/family:child");
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/family:child", reg.addr())]);
    let out = g.ok(&["pull", &format!("{}/test/family:parent", reg.addr())]);
    assert_eq!(out.matches("Already exists").count(), 2, "{out}");
    assert_export_matches_umoci(&g, &format!("{}/test/family:parent", reg.addr()), dir.path(), "parent");
    assert_export_matches_umoci(&g, &format!("{}/test/family:child", reg.addr()), dir.path(), "child");
    // Removing the child leaves the parent whole.
    g.ok(&["rmi", &format!("{}/test/family:child", reg.addr())]);
    g.fsck_clean();
    assert_export_matches_umoci(&g, &format!("{}/test/family:parent", reg.addr()), dir.path(), "parent");
}

/// Private networks are where registries live: a registry on a loopback
/// (or private) address may send its blobs to another internal host, as
/// distribution with MinIO beside it does; the token does not follow.
/// (A public registry still may not: `faults.rs` and the unit tests.)
#[test]
fn a_loopback_registry_may_redirect_blobs_to_another_loopback_address() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let proxy = gantry_tests::proxy::Proxy::start(
        reg.port,
        gantry_tests::proxy::Faults {
            token_auth: true,
            redirect_blobs: true,
            cdn_host: Some("127.0.0.3".into()),
            ..Default::default()
        },
    );
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/rich:v1", proxy.addr())]);
    let seen = proxy.seen.lock().unwrap();
    assert!(seen.cdn_gets >= 4, "config and layers came from the redirect target");
    assert!(
        seen.cdn_authorization.is_empty(),
        "token leaked: {:?}",
        seen.cdn_authorization
    );
    drop(seen);
    g.fsck_clean();
}
