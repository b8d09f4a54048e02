//! The extension point as a stranger meets it: a driver written only
//! against `gantry-kit` (`examples/driver-quota`, its own workspace) is
//! built outside this workspace with `cargo build --target wasm32-wasip2`,
//! passes the conformance suite, and runs pulls — enforcing its quota.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::registry::Registry;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Builds the example the way its README says, in a target directory of
/// its own (so the workspace's build lock is not shared).
fn build_example() -> PathBuf {
    let root = workspace_root();
    let target = root.join("target/example-build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("examples/driver-quota/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the example outside the workspace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm = target.join("wasm32-wasip2/release/gantry_driver_quota.wasm");
    assert!(wasm.is_file());
    wasm
}

#[test]
fn a_driver_built_outside_the_workspace_from_the_kit_passes_conformance_and_enforces_its_quota() {
    let wasm = build_example();
    let g = Gantry::new();
    let out = g.ok(&["plugin", "test", wasm.to_str().unwrap()]);
    assert!(out.contains("13 checks passed") && !out.contains("FAIL"), "{out}");
    let inspect = g.ok(&["plugin", "inspect", wasm.to_str().unwrap()]);
    assert!(inspect.contains("gantry.driver"), "{inspect}");
    // Its own option is read: a bad one is refused by the driver itself.
    let r = g.run(&[
        "plugin",
        "test",
        wasm.to_str().unwrap(),
        "--option",
        "max_layer_mib=lots",
    ]);
    assert!(!r.out.status.success());
    assert!(r.stdout().contains("must be a whole number of MiB"), "{}", r.stdout());

    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let name = format!("{}/test/control:v1", reg.addr());
    let config = |options: &str| {
        format!(
            "[transport]\ntype = \"v2\"\n[driver]\ntype = \"quota\"\npath = \"{}\"\noptions = {{ {options} }}\n",
            wasm.display()
        )
    };
    // A quota of nothing: the layer is refused, and the store is as it was.
    let tight = Gantry::bare().with_config(&config("max_layer_mib = \"0\""));
    tight.ok(&["images"]);
    let mut before = tight.store_listing();
    let err = tight.fails(&["pull", &name]);
    assert!(err.contains("over the quota of 0 MiB per layer"), "{err}");
    // The driver's `init` made its two directories on first use; nothing else changed.
    before.extend(["quota/layers/".to_string(), "quota/usage/".to_string()]);
    before.sort();
    assert_eq!(before, tight.store_listing(), "a refused layer changed the store");
    // A roomy one: the pull works, the image exports, fsck is clean.
    let roomy = Gantry::bare().with_config(&config("max_layer_mib = \"64\", max_total_mib = \"1024\""));
    roomy.ok(&["pull", &name]);
    let out = roomy.scratch().join("x.tar");
    roomy.ok(&["export", &name, "-o", out.to_str().unwrap()]);
    let tree = gantry_tests::tree::of_tar(std::fs::File::open(&out).unwrap());
    assert!(tree.contains_key("etc/control"), "{tree:?}");
    roomy.fsck_clean();
}
