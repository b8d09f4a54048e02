//! Native plugins, the trusted fast path: overlay2 built as a shared
//! library from the same source (`--features native`) passes the
//! conformance suite and pulls the same tree as its component; it loads
//! only with the config's consent, and a library without gantry's ABI stamp
//! is refused before anything in it is called.

use crate::{peers, publish};
use gantry_tests::gantry::{binary, Gantry};
use gantry_tests::image::{rich_layers, Image};
use gantry_tests::registry::Registry;
use gantry_tests::{is_root, tree};
use std::path::PathBuf;

fn native_overlay2() -> PathBuf {
    let so = binary().parent().unwrap().join("libgantry_driver_overlay2.so");
    assert!(
        so.is_file(),
        "{} is missing: build it with `make build` (cargo build --release -p gantry-driver-overlay2 --features native)",
        so.display()
    );
    so
}

fn config(so: &std::path::Path, allow: bool) -> String {
    format!(
        "allow_native_plugins = {allow}\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"overlay2\"\nruntime = \"native\"\npath = \"{}\"\n",
        so.display()
    )
}

#[test]
fn native_overlay2_passes_conformance_only_with_consent_and_pulls_what_the_component_pulls() {
    if !is_root() {
        eprintln!("skipped: overlay2 needs root");
        return;
    }
    let so = native_overlay2();
    // Without consent nothing of it runs: not the suite, not a pull.
    let g = Gantry::bare().with_config(&config(&so, false));
    let r = g.run(&["plugin", "test", so.to_str().unwrap()]);
    assert!(!r.out.status.success());
    assert!(r.stderr().contains("native plugins are off"), "{}", r.stderr());
    assert!(
        g.ok(&["images"]).starts_with("REPOSITORY"),
        "a refused driver takes nothing else down"
    );
    let ls = g.run(&["plugin", "ls"]);
    assert!(
        ls.stdout()
            .lines()
            .any(|l| l.starts_with("gantry.driver") && l.contains("native") && l.contains("native plugins are off")),
        "{}",
        ls.stdout()
    );

    let g = Gantry::bare().with_config(&config(&so, true));
    let out = g.ok(&["plugin", "test", so.to_str().unwrap()]);
    assert!(out.contains("13 checks passed") && !out.contains("FAIL"), "{out}");
    let inspect = g.ok(&["plugin", "inspect", so.to_str().unwrap()]);
    assert!(
        inspect.contains("\"runtime\": \"native\"") && inspect.contains("gantry.driver"),
        "{inspect}"
    );
    // A shared library that is not a gantry plugin: refused by its missing stamp.
    let libz = ["/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if let Some(libz) = libz {
        let r = g.run(&["plugin", "test", libz.to_str().unwrap()]);
        assert!(!r.out.status.success());
        assert!(r.stderr().contains("has no gantry_native_abi"), "{}", r.stderr());
    }

    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let name = format!("{}/test/rich:v1", reg.addr());
    g.ok(&["pull", &name]);
    g.fsck_clean();
    let component = Gantry::bare().with_driver("overlay2");
    component.ok(&["pull", &name]);
    let export = |g: &Gantry| {
        let out = g.scratch().join("export.tar");
        g.ok(&["export", &name, "-o", out.to_str().unwrap()]);
        tree::of_tar(std::fs::File::open(&out).unwrap())
    };
    tree::assert_same(&export(&g), &export(&component), "native against component overlay2");
    g.ok(&["rmi", &name]);
    g.fsck_clean();
}

/// `gantry --config CONFIG plugin ls`, run from `cwd`.
fn plugin_ls_from(g: &Gantry, config: &std::path::Path, cwd: &std::path::Path) -> (bool, String) {
    let out = std::process::Command::new(binary())
        .arg("--root")
        .arg(g.root_path())
        .arg("--config")
        .arg(config)
        .args(["plugin", "ls"])
        .current_dir(cwd)
        .env("DOCKER_CONFIG", g.scratch().join("no-docker-config"))
        .env("TMPDIR", g.tmpdir.path())
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), shown)
}

#[test]
fn relative_plugin_paths_resolve_beside_the_config_file_never_the_current_directory() {
    let g = Gantry::bare();
    let etc = g.scratch().join("etc");
    let elsewhere = g.scratch().join("elsewhere");
    for d in [&etc, &elsewhere] {
        std::fs::create_dir_all(d.join("plugins")).unwrap();
        std::fs::create_dir_all(d.join("drivers")).unwrap();
    }
    let component = |name: &str| crate::sandbox::component(name);
    std::fs::copy(component("gantry_transport_v2"), etc.join("plugins/transport.wasm")).unwrap();
    std::fs::copy(component("gantry_driver_vfs"), etc.join("drivers/vfs.wasm")).unwrap();
    // The same names in the directory gantry runs from hold something else.
    std::fs::write(elsewhere.join("plugins/transport.wasm"), b"not this one").unwrap();
    std::fs::write(elsewhere.join("drivers/vfs.wasm"), b"not this one").unwrap();
    let config = etc.join("gantry.toml");
    std::fs::write(
        &config,
        "[transport]\ntype = \"v2\"\npath = \"plugins/transport.wasm\"\n[driver]\ntype = \"vfs\"\npath = \"drivers/vfs.wasm\"\n",
    )
    .unwrap();
    let (ok, shown) = plugin_ls_from(&g, &config, &elsewhere);
    assert!(ok, "{shown}");
    assert_eq!(shown.lines().filter(|l| l.ends_with("   ok")).count(), 2, "{shown}");

    if !is_root() {
        eprintln!("skipped: the native part needs root (overlay2)");
        return;
    }
    // A native driver named `drivers/libfast.so`: the library beside the
    // config loads; the one in the current directory is never opened.
    std::fs::copy(native_overlay2(), etc.join("drivers/libfast.so")).unwrap();
    std::fs::write(elsewhere.join("drivers/libfast.so"), b"\x7fELF not this one").unwrap();
    let g = Gantry::bare();
    std::fs::write(
        &config,
        "allow_native_plugins = true\n[transport]\ntype = \"v2\"\npath = \"plugins/transport.wasm\"\n[driver]\ntype = \"overlay2\"\nruntime = \"native\"\npath = \"drivers/libfast.so\"\n",
    )
    .unwrap();
    let (ok, shown) = plugin_ls_from(&g, &config, &elsewhere);
    assert!(ok, "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("gantry.driver") && l.contains("native") && l.ends_with("   ok")),
        "{shown}"
    );
}
