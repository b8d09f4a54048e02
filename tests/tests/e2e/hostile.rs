//! Hostile images: layers that try to escape, lie about their diffID, or
//! carry broken compression. Each is refused with nothing registered.

use crate::{assert_refused, control_store, peers, publish};
use gantry_tests::corpus;
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{compress, Compression, Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::tree;

#[test]
fn hostile_layers_are_refused() {
    let Some((reg, g)) = control_store() else {
        return;
    };
    let outside = g.root_path().parent().unwrap().to_path_buf(); // the test's own directory
    let good = || Layer::new().file("ok", 0o644, b"ok").tar();
    let cases: Vec<(&str, Image, &str)> = vec![
        (
            "dotdot",
            Image::new(vec![Layer::new()
                .raw(tar::EntryType::Regular, "../escaped-dotdot", "", b"x")
                .tar()]),
            "leaves its directory",
        ),
        (
            "absolute",
            Image::new(vec![Layer::new()
                .raw(tar::EntryType::Regular, "/escaped-abs", "", b"x")
                .tar()]),
            "absolute path",
        ),
        (
            "symlink-same-layer",
            Image::new(vec![Layer::new()
                .symlink("up", "/")
                .raw(tar::EntryType::Regular, "up/escaped-link", "", b"x")
                .tar()]),
            "passes through a link",
        ),
        (
            "symlink-earlier-layer",
            Image::new(vec![
                Layer::new().symlink("up", "../../../../../..").tar(),
                Layer::new()
                    .raw(tar::EntryType::Regular, "up/escaped-link2", "", b"x")
                    .tar(),
            ]),
            "passes through a link",
        ),
        (
            "hardlink-out",
            Image::new(vec![Layer::new()
                .raw(tar::EntryType::Link, "hl", "../../etc/passwd", b"")
                .tar()]),
            "leaves its directory",
        ),
        (
            "wrong-diffid",
            Image {
                wrong_diff_id: Some(1),
                ..Image::new(vec![good(), Layer::new().file("b", 0o644, b"b").tar()])
            },
            "diffID mismatch",
        ),
        (
            "corrupt-gzip",
            Image {
                blob_override: Some((0, {
                    let (mut gz, _) = compress(
                        &Layer::new().file("f", 0o644, &vec![9u8; 100_000]).tar(),
                        Compression::Gzip,
                    );
                    let n = gz.len();
                    for b in &mut gz[20..n - 20] {
                        *b = b.wrapping_mul(7).wrapping_add(1);
                    }
                    gz
                })),
                ..Image::new(vec![Layer::new().file("f", 0o644, &vec![9u8; 100_000]).tar()])
            },
            "layer sha256:",
        ),
        (
            "truncated-gzip",
            Image {
                blob_override: Some((0, {
                    let (gz, _) = compress(
                        &Layer::new().file("f", 0o644, &vec![5u8; 100_000]).tar(),
                        Compression::Gzip,
                    );
                    gz[..gz.len() / 2].to_vec()
                })),
                ..Image::new(vec![Layer::new().file("f", 0o644, &vec![5u8; 100_000]).tar()])
            },
            "layer sha256:",
        ),
    ];
    for (tag, img, expect) in cases {
        publish(&reg, "test/hostile", tag, &img);
        let name = format!("{}/test/hostile:{tag}", reg.addr());
        // The same on every driver: the layer rules are the core's.
        let err = assert_refused(&g, &["pull", &name], expect);
        eprintln!("{tag}: {err}");
    }
    for name in ["escaped-dotdot", "escaped-abs", "escaped-link", "escaped-link2"] {
        assert!(!outside.join(name).exists(), "{name} was written outside the root");
        assert!(
            !std::path::Path::new("/").join(name).exists(),
            "{name} was written at /"
        );
    }
    // The good image is still there and whole.
    let out = g.ok(&["images"]);
    assert!(out.contains("test/control"), "{out}");
}

/// What a layer stack may do is the core's rule, not the driver's: every
/// refused case of the corpus's layer rules is refused by `pull` and by
/// `load` with the same one line on vfs and on overlay2 (where this machine
/// has it), leaving each store as it was; every allowed stack exports to
/// the same tree on both, with no whiteout device and no overlay attribute.
#[test]
fn layer_rules_are_the_same_for_every_driver() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    let mut drivers = vec!["vfs"];
    if crate::overlay2::overlay_here() {
        drivers.push("overlay2");
    }
    // Each store holds a good image first, so there is something to keep intact.
    publish(&reg, "test/control", "v1", &crate::control_image());
    let stores: Vec<Gantry> = drivers.iter().map(|d| Gantry::bare().with_driver(d)).collect();
    for g in &stores {
        g.ok(&["pull", &format!("{}/test/control:v1", reg.addr())]);
    }
    // The allowed stacks first: the refused ones then find their first
    // layer stored, and the rules read it back from its tar-split record.
    for (name, tars) in corpus::layer_rule_allowed() {
        publish(&reg, "test/rules", name, &Image::new(tars.clone()));
        let image = format!("{}/test/rules:{name}", reg.addr());
        let mut trees = Vec::new();
        for g in &stores {
            g.ok(&["pull", &image]);
            let out = g.scratch().join(format!("{name}.tar"));
            g.ok(&["export", &image, "-o", out.to_str().unwrap()]);
            let bytes = std::fs::read(&out).unwrap();
            assert!(
                !bytes.windows(15).any(|w| w == b"trusted.overlay"),
                "{name} on {}: the export carries an overlay attribute",
                g.driver()
            );
            if let Some(w) = whiteouts_in(&bytes) {
                panic!("{name} on {}: the export shows whiteout {w}", g.driver());
            }
            trees.push(tree::of_tar(&bytes[..]));
        }
        for (d, t) in drivers.iter().zip(&trees).skip(1) {
            tree::assert_same(t, &trees[0], &format!("{name}: {d} against {}", drivers[0]));
        }
    }
    let archives = tempfile::tempdir().unwrap();
    for (name, tars, expect) in corpus::layer_rule_refused() {
        publish(&reg, "test/rules", name, &Image::new(tars.clone()));
        let image = format!("{}/test/rules:{name}", reg.addr());
        let archive = archives.path().join(format!("{name}.tar"));
        std::fs::write(
            &archive,
            corpus::tar_of(&corpus::docker_archive(&tars, &tars, "rules/x:1")),
        )
        .unwrap();
        let mut seen: Vec<(String, String)> = Vec::new();
        for g in &stores {
            let pulled = assert_refused(g, &["pull", &image], expect);
            let loaded = assert_refused(g, &["load", "-i", archive.to_str().unwrap()], expect);
            seen.push((pulled, loaded));
        }
        for (d, s) in drivers.iter().zip(&seen).skip(1) {
            assert_eq!(s, &seen[0], "{name}: {d} refused differently from {}", drivers[0]);
        }
    }
    for g in &stores {
        g.fsck_clean();
    }
}

/// The first whiteout a flattened tar shows, if any: a `.wh.` name or a
/// 0/0 character device (overlay's spelling).
pub(crate) fn whiteouts_in(tar_bytes: &[u8]) -> Option<String> {
    let mut ar = tar::Archive::new(tar_bytes);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let h = e.header();
        let device = h.entry_type() == tar::EntryType::Char
            && h.device_major().unwrap() == Some(0)
            && h.device_minor().unwrap() == Some(0);
        if device
            || path
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap()
                .starts_with(".wh.")
        {
            return Some(path);
        }
    }
    None
}
