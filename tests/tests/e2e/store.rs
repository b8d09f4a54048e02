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
    assert!(
        leftovers.iter().all(|l| l.starts_with("tmp/") || l.starts_with("vfs/")),
        "{leftovers:?}"
    );
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
    for d in [
        "",
        "image",
        "image/vfs",
        "image/vfs/layerdb",
        "image/vfs/imagedb",
        "tmp",
        "tmp/blobs",
        "vfs",
        "vfs/dir",
        "plugins-cache",
    ] {
        let mode = std::fs::metadata(g.root_path().join(d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{d:?} has mode {mode:o}");
    }
}

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
    let err = g.fails(&["images"]);
    std::fs::remove_file(&file).unwrap();
    assert!(
        err.contains("plugin vfs was built against gantry:plugin@0.9.0, this gantry speaks gantry:plugin@0.1.0"),
        "{err}"
    );
    // The transport component where a driver is expected: refused by kind.
    let transport = wasm.with_file_name("gantry_transport_v2.wasm");
    let g = Gantry::new().with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"vfs\"\npath = \"{}\"\n",
        transport.display()
    ));
    let err = g.fails(&["images"]);
    assert!(err.contains("is not a driver component"), "{err}");
}
