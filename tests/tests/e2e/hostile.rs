//! Hostile images: layers that try to escape, lie about their diffID, or
//! carry broken compression. Each is refused with nothing registered.

use crate::{assert_refused, control_store, publish};
use gantry_tests::image::{compress, Compression, Image, Layer};

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
        if tag == "symlink-earlier-layer" && g.driver() == "overlay2" {
            // overlay2 unpacks a layer into its own empty directory, where
            // `up/` is just a directory that hides the lower layer's link
            // (as with Docker's overlay2): harmless, so it is kept, and
            // nothing lands outside.
            g.ok(&["pull", &name]);
            let out = g.scratch().join("symlink-earlier-layer.tar");
            g.ok(&["export", &name, "-o", out.to_str().unwrap()]);
            let tree = gantry_tests::tree::of_tar(std::fs::File::open(&out).unwrap());
            assert!(
                tree.keys().any(|k| k.trim_end_matches('/') == "up/escaped-link2"),
                "{tree:?}"
            );
            g.ok(&["rmi", &name]);
            continue;
        }
        let err = assert_refused(&g, &["pull", &format!("{}/test/hostile:{tag}", reg.addr())], expect);
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
