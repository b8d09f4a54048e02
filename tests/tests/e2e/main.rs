//! End-to-end tests of the `gantry` binary against a real registry
//! (Debian's `docker-registry`), filled with `skopeo copy` from OCI layouts
//! the tests generate.

mod archives;
mod bigfiles;
mod commands;
mod conformance;
mod content;
mod credentials;
mod daemon;
mod faults;
mod hostile;
mod import;
mod kit;
mod memory;
mod mirror;
mod native;
mod overlay2;
mod pull;
mod push;
mod quota;
mod rootless;
mod sandbox;
mod serve;
mod serve_ops;
mod serve_s3;
mod store;
mod tls;
mod v1;

use gantry_tests::gantry::Gantry;
use gantry_tests::image::{Desc, Image, Layer, Layout};
use gantry_tests::registry::Registry;
use gantry_tests::{is_root, require, tree};
use std::path::Path;
use std::process::Command;

/// Whether the registry peers are here (a skip says why).
pub fn peers() -> bool {
    require("docker-registry") && require("skopeo")
}

/// A layout written to a temporary directory.
pub struct Published {
    pub dir: tempfile::TempDir,
    pub layout: Layout,
}

/// Writes `img` as `tag` into a fresh layout and pushes it to `reg` as `repo:tag`.
pub fn publish(reg: &Registry, repo: &str, tag: &str, img: &Image) -> (Published, Desc, Vec<Desc>) {
    let dir = tempfile::tempdir().unwrap();
    let mut layout = Layout::create(dir.path());
    let (m, layers) = layout.image(img);
    layout.tag(tag, &m, None);
    reg.push(dir.path(), tag, &format!("{repo}:{tag}"));
    (Published { dir, layout }, m, layers)
}

/// A small good image, to have something in the store before a bad input.
pub fn control_image() -> Image {
    Image::new(vec![Layer::new()
        .dir("etc", 0o755)
        .file("etc/control", 0o644, b"control\n")
        .tar()])
}

/// A registry holding the control image as `test/control:v1`, and a store
/// that pulled it; `None` (a skip that says why) when the peers are missing.
pub fn control_store() -> Option<(Registry, Gantry)> {
    if !peers() {
        return None;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let g = Gantry::new();
    g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    Some((reg, g))
}

/// Runs a command that must fail with one line containing `expect`, and
/// checks the store is exactly as before and still consistent.
///
/// Bad input costs bounded memory too: gantry's peak resident memory (read
/// by GNU time from its own small process, see `Gantry::run_peak`) must
/// stay under 64 MiB, and no control character may reach the terminal.
pub fn assert_refused(g: &Gantry, args: &[&str], expect: &str) -> String {
    let before = g.store_listing();
    let (run, peak_kib) = g.run_peak(args);
    let stderr = run.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !run.out.status.success(),
        "gantry {}: expected failure: {stderr}",
        args.join(" ")
    );
    assert_eq!(
        lines.len(),
        1,
        "gantry {}: expected one error line: {stderr}",
        args.join(" ")
    );
    let err = lines[0].to_string();
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.to_lowercase().contains(&expect.to_lowercase()),
        "expected {expect:?} in: {err}"
    );
    assert!(
        !err.chars().any(|c| c.is_control()),
        "a control character reached the terminal: {err:?}"
    );
    eprintln!("refused ({} MiB peak): {err}", peak_kib >> 10);
    assert!(peak_kib < 64 << 10, "peak memory {peak_kib} KiB is over 64 MiB: {err}");
    assert_eq!(before, g.store_listing(), "the store changed after: {err}");
    g.fsck_clean();
    g.assert_tmpdir_untouched();
    err
}

/// Exports `image` from `g` and compares it file by file with `umoci
/// unpack` of `tag` in `layout`.
pub fn assert_export_matches_umoci(g: &Gantry, image: &str, layout: &Path, tag: &str) {
    if !require("umoci") {
        return;
    }
    let out = g.scratch().join(format!("export-{tag}.tar"));
    g.ok(&["export", image, "-o", out.to_str().unwrap()]);
    let ours = tree::of_tar(std::fs::File::open(&out).unwrap());
    std::fs::remove_file(&out).unwrap();
    assert!(ours.len() > 1, "the export is empty");
    let bundle = tempfile::tempdir().unwrap();
    let b = bundle.path().join("b");
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !is_root() {
        cmd.arg("--rootless");
    }
    let st = cmd
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let theirs = tree::of_dir(&b.join("rootfs"));
    tree::assert_same(&ours, &theirs, image);
}

/// A Docker `config.json` with `user:pass` for `host`, in a directory of
/// the test's own; returns the directory (for `DOCKER_CONFIG`).
pub fn docker_config(g: &Gantry, host: &str, user: &str, pass: &str) -> std::path::PathBuf {
    use base64::Engine as _;
    let dir = g.scratch().join(format!("dockercfg-{user}"));
    std::fs::create_dir_all(&dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    dir
}
