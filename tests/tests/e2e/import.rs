//! `gantry import`: one image from a root filesystem tarball, with
//! Docker's config for an import (changes, message, history), from a file
//! or standard input, plain or compressed; a bad tarball or change
//! registers nothing.

use crate::{assert_refused, control_store};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{compress, rich_layers, sha256, Compression, Layer};
use gantry_tests::tree;
use serde_json::json;

fn inspect(g: &Gantry, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", name])).unwrap();
    v[0].clone()
}

#[test]
fn import_makes_a_one_layer_image_with_docker_s_config() {
    let g = Gantry::new();
    let base = rich_layers().remove(0);
    let tar = g.scratch().join("rootfs.tar");
    std::fs::write(&tar, &base).unwrap();
    let gz = g.scratch().join("rootfs.tar.gz");
    std::fs::write(&gz, compress(&base, Compression::Gzip).0).unwrap();

    let id = g.ok(&[
        "import",
        "-c",
        "CMD [\"/bin/sh\"]",
        "-c",
        "ENV A=1 B=\"two words\"",
        "-c",
        "EXPOSE 80 53/udp",
        "-c",
        "WORKDIR /etc",
        "-c",
        "LABEL tier=front",
        "-m",
        "first import",
        tar.to_str().unwrap(),
        "test/imported:v1",
    ]);
    let id = id.trim();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    let i = inspect(&g, "test/imported:v1");
    assert_eq!(i["Id"], json!(id));
    assert_eq!(i["Comment"], json!("first import"));
    assert_eq!(i["Config"]["Cmd"], json!(["/bin/sh"]));
    assert_eq!(i["Config"]["Env"], json!(["A=1", "B=two words"]));
    assert_eq!(i["Config"]["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
    assert_eq!(i["Config"]["WorkingDir"], json!("/etc"));
    assert_eq!(i["Config"]["Labels"], json!({"tier": "front"}));
    // The layer's diffID is the tarball's own digest.
    assert_eq!(i["RootFS"]["Layers"], json!([sha256(&base)]));
    let history = g.ok(&["history", "--no-trunc", "test/imported:v1"]);
    assert!(history.contains("first import"), "{history}");

    // The image is the tarball, file by file.
    let out = g.scratch().join("export.tar");
    g.ok(&["export", "test/imported:v1", "-o", out.to_str().unwrap()]);
    tree::assert_same(
        &tree::of_tar(std::fs::File::open(&out).unwrap()),
        &tree::of_tar(&base[..]),
        "the imported image",
    );

    // From standard input, gzip-compressed, with the default message: the
    // same layer (its diffID is of the uncompressed tarball).
    let run = g.run_stdin(&["import", "-", "test/imported:v2"], &gz);
    assert!(run.out.status.success(), "{}", run.stderr());
    let i2 = inspect(&g, "test/imported:v2");
    assert_eq!(i2["Comment"], json!("Imported from -"));
    assert_eq!(i2["RootFS"]["Layers"], i["RootFS"]["Layers"]);
    assert_eq!(i2["Config"], json!({}));

    // Untagged, and for another platform.
    let id3 = g.ok(&["import", "--platform", "linux/arm64", tar.to_str().unwrap()]);
    let i3 = inspect(&g, id3.trim());
    assert_eq!(i3["Architecture"], json!("arm64"));
    assert_eq!(i3["RepoTags"], json!([]));
    g.fsck_clean();
}

#[test]
fn a_bad_import_registers_nothing() {
    let Some((_reg, g)) = control_store() else {
        return;
    };
    let tarball = Layer::new().dir("etc", 0o755).file("etc/x", 0o644, b"x\n").tar();
    let tar = g.scratch().join("rootfs.tar");
    std::fs::write(&tar, &tarball).unwrap();
    let t = tar.to_str().unwrap();
    assert_refused(
        &g,
        &["import", "-c", "RUN rm -rf /", t, "x:1"],
        "RUN is not a valid change command",
    );
    assert_refused(&g, &["import", "-c", "EXPOSE 99999", t, "x:1"], "invalid port");
    assert_refused(&g, &["import", t, "Not/Valid:1"], "invalid reference");
    assert_refused(&g, &["import", "--platform", "linux", t], "invalid platform");
    let missing = g.scratch().join("missing.tar");
    assert_refused(&g, &["import", missing.to_str().unwrap()], "opening");
    // Gzip whose stream breaks off; a tarball cut in the middle of a file.
    let mut broken = compress(&rich_layers().remove(0), Compression::Gzip).0;
    broken.truncate(broken.len() / 2);
    let bad = g.scratch().join("broken.tar.gz");
    std::fs::write(&bad, &broken).unwrap();
    assert_refused(&g, &["import", bad.to_str().unwrap(), "x:1"], "corrupt");
    let bz = g.scratch().join("rootfs.tar.bz2");
    std::fs::write(&bz, b"BZh91AY&SY not really").unwrap();
    assert_refused(
        &g,
        &["import", bz.to_str().unwrap(), "x:1"],
        "bzip2-compressed layers are not supported",
    );
    let big = Layer::new().file("big", 0o644, &vec![1u8; 100_000]).tar();
    let cut = g.scratch().join("cut.tar");
    std::fs::write(&cut, &big[..50_000]).unwrap();
    assert_refused(&g, &["import", cut.to_str().unwrap(), "x:1"], "corrupt");
}
