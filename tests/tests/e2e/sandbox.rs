//! A misbehaving driver component per sandbox limit: each failure is clean,
//! and the next pull on the same store works.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::{binary, Gantry};
use gantry_tests::registry::Registry;

fn bad_driver_config(mode: &str) -> String {
    let wasm = binary()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("wasm32-wasip2/release/gantry_bad_driver.wasm");
    assert!(
        wasm.is_file(),
        "{} is missing: build the plugins first (make plugins)",
        wasm.display()
    );
    format!(
        "[transport]\ntype = \"v2\"\n\n[driver]\ntype = \"bad\"\npath = \"{}\"\noptions = {{ mode = \"{mode}\" }}\n\n[limits]\nmemory_mib = 32\ncpu_seconds = 1.0\n",
        wasm.display()
    )
}

#[test]
fn each_sandbox_limit_fails_cleanly_and_the_next_pull_works() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let name = format!("{}/test/control:v1", reg.addr());
    let g = Gantry::new();
    let secret = g.root_path().parent().unwrap().join("secret");
    std::fs::write(&secret, "do not read").unwrap();
    for (mode, expect) in [
        (
            "trap",
            "plugin driver/bad trapped in apply-diff: panicked at tests/bad-driver/src/lib.rs",
        ),
        ("loop", "plugin driver/bad ran past its CPU deadline"),
        ("alloc", "plugin driver/bad exceeded its memory limit of 32 MiB"),
        ("escape", "every attempt to leave the home was refused"),
    ] {
        // The bad driver runs on the same store root as the good one.
        let config = g
            .tmpdir
            .path()
            .parent()
            .unwrap()
            .join(format!("bad-{mode}-{}.toml", std::process::id()));
        std::fs::write(&config, bad_driver_config(mode)).unwrap();
        let mut c = std::process::Command::new(binary());
        c.arg("--root").arg(g.root_path()).arg("--config").arg(&config);
        c.env("DOCKER_CONFIG", g.root_path().join("none"))
            .env("TMPDIR", g.tmpdir.path());
        let out = c.arg("pull").arg(&name).output().unwrap();
        std::fs::remove_file(&config).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        eprintln!("{mode}: {}", err.trim());
        assert!(!out.status.success(), "{mode}: the pull should fail");
        assert_eq!(err.trim().lines().count(), 1, "{mode}: one error line: {err}");
        assert!(err.contains(expect), "{mode}: expected {expect:?} in {err}");
        // The host and the store carry on: the next pull with the real driver works.
        g.ok(&["pull", &name]);
        g.fsck_clean();
        g.ok(&["rmi", &name]);
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "do not read");
    g.assert_tmpdir_untouched();
}
