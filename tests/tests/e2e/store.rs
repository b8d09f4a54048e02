//! The store under stress: a process killed mid-pull, private directories,
//! and plugins built against another contract version.

use crate::{control_image, control_store, peers, publish};
use gantry_tests::gantry::{binary, Gantry};
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::proxy::{Faults, Proxy};
use gantry_tests::registry::Registry;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[test]
fn a_pull_killed_midway_leaves_nothing_visible_and_the_next_run_clears_it() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (_p, _, layers) = publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    publish(&reg, "test/control", "v1", &control_image());
    // Layer 0 applies while the last layer's download hangs half way.
    let last = layers.last().unwrap().digest.clone();
    let proxy = Proxy::start(
        reg.port,
        Faults {
            stall_blob: Some(last.clone()),
            ..Default::default()
        },
    );
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    let before = g.store_listing();
    let mut child = std::process::Command::new(binary())
        .arg("--root")
        .arg(g.root_path())
        .args(["pull", &format!("{}/test/rich:v1", proxy.addr())])
        .env("TMPDIR", g.tmpdir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.seen.lock().unwrap().blob_gets.contains_key(&last) {
        assert!(Instant::now() < deadline, "the pull never reached the stalled blob");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let leftovers: Vec<_> = g.store_listing().into_iter().filter(|l| !before.contains(l)).collect();
    assert!(
        !leftovers.is_empty(),
        "the kill should have left a spooled download behind"
    );
    // Only scratch areas: spools, staged layers, unpublished layer records.
    let scratch = [
        "tmp/".to_string(),
        format!("{}/", g.driver()),
        format!("image/{}/layerdb/tmp/", g.driver()),
    ];
    assert!(
        leftovers.iter().all(|l| scratch.iter().any(|s| l.starts_with(s))),
        "{leftovers:?}"
    );
    // The staging markers it left are links to one marker of the pull
    // (a pull makes one inode for them, not one per layer).
    let markers: Vec<(String, u64)> = std::fs::read_dir(g.root_path().join("tmp/staging"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let ino = std::os::unix::fs::MetadataExt::ino(&e.metadata().unwrap());
            (e.file_name().to_string_lossy().into_owned(), ino)
        })
        .collect();
    assert!(markers.len() >= 2, "{markers:?}");
    assert!(markers.iter().any(|(n, _)| n.starts_with("sweep-")), "{markers:?}");
    assert!(markers.iter().all(|(_, ino)| *ino == markers[0].1), "{markers:?}");
    // Nothing is visible, and the next run clears what the kill left.
    let out = g.ok(&["fsck"]);
    assert!(out.contains("cleared: spooled download"), "{out}");
    assert!(out.contains("store is consistent"), "{out}");
    assert_eq!(g.store_listing(), before);
    g.ok(&["pull", &format!("{}/test/rich:v1", reg.addr())]);
    g.fsck_clean();
}

#[test]
fn store_directories_are_private() {
    let Some((_reg, g)) = control_store() else {
        return;
    };
    let driver = g.driver();
    let mut dirs = vec![
        String::new(),
        "image".into(),
        format!("image/{driver}"),
        format!("image/{driver}/layerdb"),
        format!("image/{driver}/imagedb"),
        "tmp".into(),
        "tmp/blobs".into(),
        driver.into(),
        "plugins-cache".into(),
    ];
    dirs.push(if driver == "vfs" {
        "vfs/dir".into()
    } else {
        "overlay2/l".into()
    });
    for d in dirs {
        let mode = std::fs::metadata(g.root_path().join(&d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d:?} has mode {mode:o}");
    }
}

/// A driver built against another contract, or a component of the wrong
/// kind, is refused by name when something needs it — and takes nothing
/// else down: `images` works, `plugin ls` lists the error.
#[test]
fn a_plugin_built_against_another_contract_is_refused_by_name() {
    let wasm = binary()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm32-wasip2/release/gantry_driver_vfs.wasm");
    let bytes = std::fs::read(&wasm).unwrap();
    // Restamp every `gantry:plugin/...@0.1.0` name as 0.9.0 (same length).
    let (from, to) = (b"@0.1.0", b"@0.9.0");
    let mut patched = bytes.clone();
    let mut n = 0;
    for i in 0..patched.len() - from.len() {
        if &patched[i..i + from.len()] == from {
            patched[i..i + from.len()].copy_from_slice(to);
            n += 1;
        }
    }
    assert!(n > 0);
    let g = Gantry::new();
    let file = g.scratch().join("future.wasm");
    std::fs::write(&file, patched).unwrap();
    let g = g.with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"vfs\"\npath = \"{}\"\n",
        file.display()
    ));
    let refused = format!(
        "plugin vfs was built against gantry:plugin@0.9.0, this gantry loads gantry:plugin@{} to {}",
        gantry_host::plugin::CONTRACT_OLDEST,
        gantry_host::plugin::CONTRACT_VERSION
    );
    let refused = refused.as_str();
    assert!(g.ok(&["images"]).starts_with("REPOSITORY"));
    let err = g.fails(&["rmi", "nothing:here"]);
    assert!(err.contains("No such image") || err.contains("no such image"), "{err}");
    let err = g.fails(&["fsck"]);
    assert!(err.contains(refused), "{err}");
    let r = g.run(&["plugin", "ls"]);
    assert!(!r.out.status.success());
    let ls = r.stdout();
    assert!(
        ls.lines()
            .any(|l| l.starts_with("gantry.transport") && l.ends_with("ok")),
        "{ls}"
    );
    assert!(
        ls.lines()
            .any(|l| l.starts_with("gantry.driver") && l.contains("0.9.0") && l.contains(refused)),
        "{ls}"
    );
    let info: serde_json::Value = serde_json::from_str(&g.ok(&["plugin", "inspect", file.to_str().unwrap()])).unwrap();
    assert_eq!(info["kind"], "gantry.driver");
    assert_eq!(info["contract"], "0.9.0");
    assert!(info["exports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "gantry:plugin/driver@0.9.0"));
    std::fs::remove_file(&file).unwrap();
    // The transport component where a driver is expected: refused by kind.
    let transport = wasm.with_file_name("gantry_transport_v2.wasm");
    let g = Gantry::new().with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"vfs\"\npath = \"{}\"\n",
        transport.display()
    ));
    g.ok(&["images"]);
    let err = g.fails(&["fsck"]);
    assert!(err.contains("is not a driver component"), "{err}");
    let info: serde_json::Value =
        serde_json::from_str(&g.ok(&["plugin", "inspect", transport.to_str().unwrap()])).unwrap();
    assert_eq!(info["kind"], "gantry.transport");
    let err = g.fails(&[
        "plugin",
        "inspect",
        g.root_path().join("missing.wasm").to_str().unwrap(),
    ]);
    assert!(err.contains("missing.wasm"), "{err}");
}

/// A base layer with `etc/base` and a top layer with `etc/top`.
fn base_and_top(base: &[u8], top: &[u8]) -> (Vec<u8>, Vec<u8>) {
    (
        gantry_tests::image::Layer::new()
            .dir("etc", 0o755)
            .file("etc/base", 0o644, base)
            .tar(),
        gantry_tests::image::Layer::new().file("etc/top", 0o644, top).tar(),
    )
}

/// `rmi` of an image while another process pulls an image that builds on
/// its layer: the pull holds a lease on the layer it reuses, so `rmi`
/// untags and deletes the image but leaves the layer, and both end whole.
#[test]
fn rmi_while_a_pull_builds_on_its_layer_keeps_the_store_whole() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (base, top) = base_and_top(b"base\n", &vec![7u8; 200_000]);
    publish(&reg, "test/a", "v1", &Image::new(vec![base.clone()]));
    let (_p, _, layers) = publish(&reg, "test/b", "v1", &Image::new(vec![base, top]));
    let proxy = Proxy::start(
        reg.port,
        Faults {
            delay_blob: Some((layers[1].digest.clone(), Duration::from_millis(1500))),
            ..Default::default()
        },
    );
    let a = format!("{}/test/a:v1", reg.addr());
    let b = format!("{}/test/b:v1", proxy.addr());
    let g = Gantry::new();
    let mut first_export = None;
    for round in 0..3 {
        g.ok(&["pull", &a]);
        let gets_before = proxy
            .seen
            .lock()
            .unwrap()
            .blob_gets
            .get(&layers[1].digest)
            .copied()
            .unwrap_or(0);
        let child = std::process::Command::new(binary())
            .arg("--root")
            .arg(g.root_path())
            .args(["pull", &b])
            .env("TMPDIR", g.tmpdir.path())
            .env("DOCKER_CONFIG", g.scratch().join("none"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The pull has decided to reuse the base layer once it asks for the top one.
        let deadline = Instant::now() + Duration::from_secs(30);
        while proxy
            .seen
            .lock()
            .unwrap()
            .blob_gets
            .get(&layers[1].digest)
            .copied()
            .unwrap_or(0)
            == gets_before
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the pull never asked for the top layer"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = g.ok(&["rmi", &a]);
        assert!(out.contains("Untagged"), "round {round}: {out}");
        let pulled = child.wait_with_output().unwrap();
        assert!(
            pulled.status.success(),
            "round {round}: the pull failed: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        g.fsck_clean();
        let file = g.scratch().join(format!("b-{round}.tar"));
        g.ok(&["export", &b, "-o", file.to_str().unwrap()]);
        let listing = gantry_tests::tree::of_tar(std::fs::File::open(&file).unwrap());
        match &first_export {
            None => first_export = Some(listing),
            Some(first) => gantry_tests::tree::assert_same(first, &listing, "export of test/b"),
        }
        g.ok(&["rmi", &b]);
        g.fsck_clean();
    }
    let listing = g.store_listing();
    assert!(
        !listing
            .iter()
            .any(|l| l.starts_with(&format!("image/{}/layerdb/sha256/", g.driver())) && !l.ends_with("sha256/")),
        "layers were left behind: {listing:?}"
    );
}

/// An image whose config cannot be read makes `rmi` stop before it
/// changes anything, instead of treating that image's layers as unused.
#[test]
fn rmi_stops_on_an_unreadable_config_and_changes_nothing() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let base = gantry_tests::image::Layer::new().file("base", 0o644, b"base\n").tar();
    let top = gantry_tests::image::Layer::new().file("top", 0o644, b"top\n").tar();
    publish(&reg, "test/a", "v1", &Image::new(vec![base.clone()]));
    publish(&reg, "test/b", "v1", &Image::new(vec![base, top]));
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/a:v1", reg.addr())]);
    g.ok(&["pull", &format!("{}/test/b:v1", reg.addr())]);
    let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &format!("{}/test/b:v1", reg.addr())])).unwrap();
    let id_b = v[0]["Id"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let config = g.image_dir("imagedb/content/sha256").join(&id_b);
    std::fs::write(&config, b"{ not json").unwrap();
    let before = g.store_listing();
    let err = g.fails(&["rmi", &format!("{}/test/a:v1", reg.addr())]);
    assert!(err.contains("refusing to release layers"), "{err}");
    assert_eq!(before, g.store_listing(), "rmi changed the store");
}

/// Flips one byte in a file of `layer_file` (a path inside layer dirs).
pub(crate) fn flip_a_byte(g: &Gantry, rel: &str) -> usize {
    let mut flipped = 0;
    let mut seen = std::collections::HashSet::new();
    for d in g.layer_dirs() {
        let p = d.join(rel);
        if let Ok(md) = std::fs::symlink_metadata(&p) {
            use std::os::unix::fs::MetadataExt;
            if md.is_file() && seen.insert(md.ino()) {
                let mut b = std::fs::read(&p).unwrap();
                b[0] ^= 0x20;
                // In place, as bit rot would: the inode stays the same.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &b))
                    .unwrap();
                flipped += 1;
            }
        }
    }
    flipped
}

#[test]
fn fsck_finds_a_flipped_byte_and_repair_fetches_the_layer_again() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let (base, top) = base_and_top(b"base layer file\n", b"top layer file\n");
    publish(&reg, "test/r", "v1", &Image::new(vec![base, top]));
    let name = format!("{}/test/r:v1", reg.addr());
    let g = Gantry::new();
    g.ok(&["pull", &name]);
    let good = g.scratch().join("good.tar");
    g.ok(&["export", &name, "-o", good.to_str().unwrap()]);
    let good = gantry_tests::tree::of_tar(std::fs::File::open(&good).unwrap());

    // Bit rot in the base layer's file (shared by hard link with the top
    // layer's tree) and in the top layer's own file.
    assert!(flip_a_byte(&g, "etc/base") >= 1);
    assert!(flip_a_byte(&g, "etc/top") >= 1);
    // A plain fsck checks records, not contents; --verify-content rehashes.
    g.fsck_clean();
    let r = g.run(&["fsck", "--verify-content"]);
    assert!(!r.out.status.success(), "the damage went unnoticed: {}", r.stdout());
    assert_eq!(
        r.stdout().matches("its files changed since it was unpacked").count(),
        2,
        "{}",
        r.stdout()
    );

    let out = g.ok(&["fsck", "--repair"]);
    assert!(out.contains("repaired: layer"), "{out}");
    assert!(out.contains("store is consistent"), "{out}");
    g.ok(&["fsck", "--verify-content"]);
    let fixed = g.scratch().join("fixed.tar");
    g.ok(&["export", &name, "-o", fixed.to_str().unwrap()]);
    let fixed = gantry_tests::tree::of_tar(std::fs::File::open(&fixed).unwrap());
    gantry_tests::tree::assert_same(&good, &fixed, "export after repair");

    // A layer that came from an archive has no registry to come from: the
    // repair says which image to load again, and fails.
    let saved = g.scratch().join("saved.tar");
    g.ok(&["save", "-o", saved.to_str().unwrap(), &name]);
    let h = Gantry::new();
    h.ok(&["load", "-i", saved.to_str().unwrap()]);
    assert!(flip_a_byte(&h, "etc/top") >= 1);
    let r = h.run(&["fsck", "--repair"]);
    assert!(!r.out.status.success());
    assert!(
        r.stdout().contains("cannot repair: layer")
            && r.stdout().contains("pull or load again: ")
            && r.stdout().contains("test/r:v1"),
        "{}",
        r.stdout()
    );
}

/// `fsck --repair` drops what nothing references: a reference to an image
/// that is gone, and the layers only that image needed.
#[test]
fn repair_drops_dangling_references_and_unreferenced_layers() {
    let Some((reg, g)) = control_store() else {
        return;
    };
    let other = gantry_tests::image::Layer::new().file("other", 0o644, b"other\n").tar();
    publish(&reg, "test/other", "v1", &Image::new(vec![other]));
    let name = format!("{}/test/other:v1", reg.addr());
    g.ok(&["pull", &name]);
    let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", &name])).unwrap();
    let id = v[0]["Id"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    // The image's config vanishes (a damaged disk): its tag dangles and its
    // layer is needed by nothing.
    std::fs::remove_file(g.image_dir("imagedb/content/sha256").join(&id)).unwrap();
    let r = g.run(&["fsck"]);
    assert!(!r.out.status.success());
    assert!(r.stdout().contains("is missing"), "{}", r.stdout());
    let out = g.ok(&["fsck", "--repair"]);
    assert!(
        out.contains("dropped: reference") && out.contains("test/other:v1"),
        "{out}"
    );
    assert!(out.contains("dropped: unreferenced layer"), "{out}");
    assert!(out.contains("store is consistent"), "{out}");
    // The control image is whole.
    g.ok(&["fsck", "--verify-content"]);
    assert!(g.ok(&["images"]).contains("test/control"));
}

/// The driver conformance suite passes for vfs and overlay2 and catches drivers that
/// fail or lie, leaving nothing behind in the store.
#[test]
fn the_conformance_suite_passes_vfs_and_overlay2_and_catches_a_lying_driver() {
    let dir = binary()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm32-wasip2/release");
    let g = Gantry::new();
    g.ok(&["images"]);
    let before = g.store_listing();
    // vfs is built against the frozen 0.1.0 contract, overlay2 against the current one.
    let mut drivers = vec!["gantry_driver_vfs.wasm"];
    if gantry_tests::is_root() {
        drivers.push("gantry_driver_overlay2.wasm");
    }
    for d in drivers {
        let out = g.ok(&["plugin", "test", dir.join(d).to_str().unwrap()]);
        assert!(out.contains("13 checks passed") && !out.contains("FAIL"), "{d}: {out}");
    }
    let bad = dir.join("gantry_bad_driver.wasm");
    let r = g.run(&["plugin", "test", bad.to_str().unwrap(), "--option", "mode=foreign-path"]);
    assert!(!r.out.status.success());
    assert!(
        r.stdout().contains("FAIL  create and apply-diff") && r.stdout().contains("returned a bad path"),
        "{}",
        r.stdout()
    );
    assert!(r.stderr().contains("conformance checks failed"), "{}", r.stderr());
    let r = g.run(&["plugin", "test", bad.to_str().unwrap(), "--option", "mode=trap"]);
    assert!(!r.out.status.success());
    assert!(r.stdout().contains("trapped in apply-diff"), "{}", r.stdout());
    assert_eq!(before, g.store_listing(), "plugin test left something in the store");
}

/// Compiled plugins go where `plugin_cache_dir` says, shared by stores:
/// a second store compiles nothing.
#[test]
fn compiled_plugins_are_kept_in_the_configured_cache() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let name = format!("{}/test/control:v1", reg.addr());
    let cache = tempfile::tempdir().unwrap();
    let config = format!(
        "plugin_cache_dir = \"{}\"\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        cache.path().display(),
        Gantry::test_driver()
    );
    let a = Gantry::bare().with_config(&config);
    a.ok(&["pull", &name]);
    let compiled = || {
        let mut v: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name(), e.metadata().unwrap().modified().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let first = compiled();
    assert_eq!(
        first
            .iter()
            .filter(|(n, _)| n.to_string_lossy().ends_with(".cwasm"))
            .count(),
        2,
        "{first:?}"
    );
    assert!(!a.root_path().join("plugins-cache").exists());
    let b = Gantry::bare().with_config(&config);
    b.ok(&["pull", &name]);
    assert_eq!(first, compiled(), "the second store compiled again");
}
