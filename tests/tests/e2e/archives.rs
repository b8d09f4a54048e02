//! load and save: round trips through real peers, the hostile corpus, the
//! legacy format, and a load killed midway.

use crate::{assert_export_matches_umoci, assert_refused};
use gantry_tests::corpus;
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, sha256, Image, Layer, Layout};
use gantry_tests::require;
use std::path::Path;
use std::process::Command;

fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn inspect(g: &Gantry, name: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&g.ok(&["inspect", name])).unwrap()[0].clone()
}

fn loaded_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("Loaded image"))
        .unwrap_or_else(|| panic!("no Loaded line in {out}"))
        .to_string()
}

#[test]
fn archives_round_trip_through_skopeo_and_gantry() {
    if !(require("skopeo") && require("umoci")) {
        return;
    }
    let dir = gantry_tests::open_tempdir();
    let layout_dir = dir.path().join("layout");
    let mut layout = Layout::create(&layout_dir);
    let (m, _) = layout.image(&Image::new(rich_layers()));
    layout.tag("v1", &m, None);
    let oci = format!("oci:{}:v1", layout_dir.display());
    let name = "example.com/test/rich:v1";

    // skopeo writes both archive kinds; gantry loads them, from a file and from a pipe.
    let docker_tar = dir.path().join("docker.tar");
    let oci_tar = dir.path().join("oci.tar");
    skopeo(&[
        "copy",
        "--quiet",
        &oci,
        &format!("docker-archive:{}:{name}", docker_tar.display()),
    ]);
    skopeo(&[
        "copy",
        "--quiet",
        &oci,
        &format!("oci-archive:{}:{name}", oci_tar.display()),
    ]);
    let a = Gantry::new();
    assert_eq!(
        loaded_line(&a.ok(&["load", "-i", docker_tar.to_str().unwrap()])),
        format!("Loaded image: {name}")
    );
    a.fsck_clean();
    assert_export_matches_umoci(&a, name, &layout_dir, "v1");
    let b = Gantry::new();
    let r = b.run_stdin(&["load"], &oci_tar);
    assert!(r.out.status.success(), "{}", r.stderr());
    assert_eq!(loaded_line(&r.stdout()), format!("Loaded image: {name}"));
    b.assert_tmpdir_untouched();
    assert_export_matches_umoci(&b, name, &layout_dir, "v1");
    let id = inspect(&a, name)["Id"].clone();
    assert_eq!(inspect(&b, name)["Id"], id);
    let diff_ids = inspect(&a, name)["RootFS"]["Layers"].clone();

    // gantry's archive: skopeo reads it with the same layer digests.
    let saved = dir.path().join("saved.tar");
    a.ok(&["save", "-o", saved.to_str().unwrap(), name]);
    let si: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", &format!("docker-archive:{}", saved.display())])).unwrap();
    assert_eq!(si["Layers"], diff_ids);
    let out_layout = dir.path().join("from-gantry");
    skopeo(&[
        "copy",
        "--quiet",
        &format!("docker-archive:{}", saved.display()),
        &format!("oci:{}:x", out_layout.display()),
    ]);
    let back: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--config",
        &format!("oci:{}:x", out_layout.display()),
    ]))
    .unwrap();
    assert_eq!(back["rootfs"]["diff_ids"], diff_ids);

    // gantry save | gantry --root OTHER load: the same image ID.
    let piped = dir.path().join("piped.tar");
    let out = a.piped(&["save", name]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&piped, out.stdout).unwrap();
    let c = Gantry::new();
    let r = c.run_stdin(&["load"], &piped);
    assert!(r.out.status.success(), "{}", r.stderr());
    assert_eq!(inspect(&c, name)["Id"], id);
    c.fsck_clean();

    // The OCI format: skopeo reads it, gantry loads it back to the same ID.
    let oci_saved = dir.path().join("saved-oci.tar");
    a.ok(&["save", "--format", "oci", "-o", oci_saved.to_str().unwrap(), name]);
    skopeo(&[
        "copy",
        "--quiet",
        &format!("oci-archive:{}", oci_saved.display()),
        &format!("oci:{}:y", out_layout.display()),
    ]);
    let d = Gantry::new();
    d.ok(&["load", "-i", oci_saved.to_str().unwrap()]);
    assert_eq!(inspect(&d, name)["Id"], id);
    // An untagged save loads as an ID.
    let untagged = dir.path().join("untagged.tar");
    a.ok(&["save", "-o", untagged.to_str().unwrap(), &id.as_str().unwrap()[7..19]]);
    let e = Gantry::new();
    assert_eq!(
        loaded_line(&e.ok(&["load", "-i", untagged.to_str().unwrap()])),
        format!("Loaded image ID: {}", id.as_str().unwrap())
    );
}

#[test]
fn hostile_archives_are_refused() {
    let dir = gantry_tests::open_tempdir();
    corpus::write(dir.path());
    // A layer may hold at most 64 MiB here, so the bomb case stops early.
    let g = Gantry::new().with_config(&format!(
        "max_layer_size_mib = 64\n[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n",
        Gantry::test_driver()
    ));
    // A good control first, so there is something to keep intact.
    let control = dir.path().join("control.tar");
    // Its layer differs from the corpus's, which would otherwise be skipped as present.
    let good = Layer::new().file("control", 0o644, b"control\n").tar();
    std::fs::write(
        &control,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&good),
            std::slice::from_ref(&good),
            "control/x:1",
        )),
    )
    .unwrap();
    assert_eq!(
        g.ok(&["load", "-i", control.to_str().unwrap()]).trim(),
        "Loaded image: control/x:1"
    );
    let mut cases: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20);
    for case in &cases {
        let expect = std::fs::read_to_string(case.join("expect")).unwrap();
        let archive = case.join("archive.tar");
        let err = assert_refused(&g, &["load", "-i", archive.to_str().unwrap()], &expect);
        eprintln!("{}: {err}", case.file_name().unwrap().to_string_lossy());
    }
    g.fsck_clean();
    g.assert_tmpdir_untouched();
    // The same refusals from standard input, where the archive is spooled.
    for name in [
        "wrong-diffid",
        "layer-entry-dotdot",
        "duplicate-names",
        "corrupt-gzip",
        "streamed-layer-dotdot",
        "streamed-wrong-diffid",
    ] {
        let case = dir.path().join(name);
        let expect = std::fs::read_to_string(case.join("expect")).unwrap();
        let before = g.store_listing();
        let r = g.run_stdin(&["load"], &case.join("archive.tar"));
        assert!(!r.out.status.success());
        assert!(r.stderr().contains(&expect), "{name}: {}", r.stderr());
        assert_eq!(g.store_listing(), before, "{name}: the store changed");
    }
    for n in ["escaped-load", "escaped-load2"] {
        assert!(!g.root_path().parent().unwrap().join(n).exists());
        assert!(!Path::new("/").join(n).exists());
    }
    g.fsck_clean();
    assert!(g.ok(&["images"]).contains("control/x"));
}

#[test]
fn legacy_archives_with_a_repositories_file_load() {
    let base = Layer::new().dir("etc", 0o755).file("etc/base", 0o644, b"base\n").tar();
    let top = Layer::new().file("etc/top", 0o600, b"top\n").whiteout("etc/base").tar();
    let (id1, id2) = ("1".repeat(64), "2".repeat(64));
    let j1 = serde_json::json!({"id": id1, "created": "2015-01-01T00:00:00Z", "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ADD base"]}, "os": "linux", "architecture": "amd64"});
    let j2 = serde_json::json!({"id": id2, "parent": id1, "created": "2015-01-02T00:00:00Z", "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) ADD top"]}, "config": {"Cmd": ["/bin/sh"]}, "os": "linux", "architecture": "amd64"});
    let entries = vec![
        corpus::Entry::File(format!("{id1}/VERSION"), b"1.0".to_vec()),
        corpus::Entry::File(format!("{id1}/json"), j1.to_string().into_bytes()),
        corpus::Entry::File(format!("{id1}/layer.tar"), base.clone()),
        corpus::Entry::File(format!("{id2}/VERSION"), b"1.0".to_vec()),
        corpus::Entry::File(format!("{id2}/json"), j2.to_string().into_bytes()),
        corpus::Entry::File(format!("{id2}/layer.tar"), top.clone()),
        corpus::Entry::File(
            "repositories".into(),
            serde_json::json!({"legacy/app": {"v1": id2}}).to_string().into_bytes(),
        ),
    ];
    let dir = gantry_tests::open_tempdir();
    let f = dir.path().join("legacy.tar");
    std::fs::write(&f, corpus::tar_of(&entries)).unwrap();
    let g = Gantry::new();
    assert_eq!(
        g.ok(&["load", "-i", f.to_str().unwrap()]).trim(),
        "Loaded image: legacy/app:v1"
    );
    let i = inspect(&g, "legacy/app:v1");
    assert_eq!(i["RootFS"]["Layers"], serde_json::json!([sha256(&base), sha256(&top)]));
    assert_eq!(i["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    let history = g.ok(&["history", "legacy/app:v1"]);
    assert!(history.contains("#(nop) ADD top"), "{history}");
    let export = g.piped(&["export", "legacy/app:v1"]).output().unwrap();
    let listing = gantry_tests::tree::of_tar(&export.stdout[..]);
    assert!(
        listing.contains_key("etc/top") && !listing.contains_key("etc/base"),
        "{listing:?}"
    );
    g.fsck_clean();
}

#[test]
fn a_load_killed_midway_is_cleared_by_the_next_run() {
    let g = Gantry::new();
    g.ok(&["images"]);
    let before = g.store_listing();
    let mut child = g
        .piped(&["load"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Half an archive whose first entry is large enough to be spooled.
    let big = Layer::new().file("big", 0o644, &vec![1u8; 4 << 20]).tar();
    let tar = corpus::tar_of(&corpus::docker_archive(
        std::slice::from_ref(&big),
        std::slice::from_ref(&big),
        "killed/x:1",
    ));
    let stdin = child.stdin.as_mut().unwrap();
    std::io::Write::write_all(stdin, &tar[..tar.len() / 2]).unwrap();
    let spool_seen = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::read_dir(g.root_path().join("tmp"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("load-"))
    });
    assert!(spool_seen, "the load never spooled");
    child.kill().unwrap();
    child.wait().unwrap();
    let out = g.ok(&["fsck"]);
    assert!(out.contains("cleared: spooled archive"), "{out}");
    assert_eq!(g.store_listing(), before);
}

#[test]
fn a_stream_is_spooled_only_where_it_comes_out_of_order() {
    // Layers above the in-memory threshold, in an archive with manifest.json last.
    let l1 = Layer::new().file("a", 0o644, &vec![1u8; 3 << 20]).tar();
    let l2 = Layer::new().file("b", 0o644, &vec![2u8; 3 << 20]).tar();
    let dir = gantry_tests::open_tempdir();
    let last = dir.path().join("manifest-last.tar");
    std::fs::write(
        &last,
        corpus::tar_of(&corpus::docker_archive(
            &[l1.clone(), l2.clone()],
            &[l1, l2],
            "stream/x:1",
        )),
    )
    .unwrap();
    let spooled = |r: &gantry_tests::gantry::Run| -> u64 {
        let line = r
            .stderr()
            .lines()
            .find(|l| l.starts_with("timings:"))
            .unwrap_or_default()
            .to_string();
        line.split("spooled ")
            .nth(1)
            .and_then(|x| x.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no spool figure in {line:?}"))
    };
    let mut a = Gantry::new();
    a.env.push(("GANTRY_TIMINGS".into(), "1".into()));
    let r = a.run_stdin(&["load"], &last);
    assert!(r.out.status.success(), "{}", r.stderr());
    assert!(
        spooled(&r) >= 6 << 20,
        "manifest.json came last: both layers wait on disk ({})",
        spooled(&r)
    );
    // gantry's own archive names its images first: its layers apply as they stream.
    let saved = dir.path().join("saved.tar");
    a.ok(&["save", "-o", saved.to_str().unwrap(), "stream/x:1"]);
    let mut b = Gantry::new();
    b.env.push(("GANTRY_TIMINGS".into(), "1".into()));
    let r = b.run_stdin(&["load"], &saved);
    assert!(r.out.status.success(), "{}", r.stderr());
    assert_eq!(spooled(&r), 0);
    assert_eq!(inspect(&a, "stream/x:1")["Id"], inspect(&b, "stream/x:1")["Id"]);
    b.fsck_clean();
    b.assert_tmpdir_untouched();
}

/// Every entry of a tar: (name, link target, contents), all bytes.
fn tar_entries(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    use std::io::Read;
    let mut out = Vec::new();
    for e in tar::Archive::new(bytes).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path_bytes().into_owned();
        let link = e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((name, link, data));
    }
    out
}

/// Linux names are bytes: a file name and a link target that are not UTF-8
/// load, export and survive a save/load round trip exactly.
#[test]
fn names_that_are_not_utf8_round_trip_exactly() {
    let layer = Layer::new()
        .raw_bytes(tar::EntryType::Regular, b"caf\xe9.txt", b"", b"latin-1 name\n")
        .raw_bytes(tar::EntryType::Symlink, b"link\xff", b"caf\xe9.txt\xfe", b"")
        .tar();
    let g = Gantry::new();
    let archive = g.scratch().join("bytes.tar");
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&layer),
            std::slice::from_ref(&layer),
            "bytes/names:1",
        )),
    )
    .unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let exported = g.scratch().join("export.tar");
    g.ok(&["export", "bytes/names:1", "-o", exported.to_str().unwrap()]);
    let entries = tar_entries(&std::fs::read(&exported).unwrap());
    assert!(
        entries.contains(&(b"caf\xe9.txt".to_vec(), vec![], b"latin-1 name\n".to_vec())),
        "{entries:?}"
    );
    assert!(
        entries.contains(&(b"link\xff".to_vec(), b"caf\xe9.txt\xfe".to_vec(), vec![])),
        "{entries:?}"
    );
    let id = |g: &Gantry| {
        let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", "bytes/names:1"])).unwrap();
        v[0]["Id"].as_str().unwrap().to_string()
    };
    let saved = g.scratch().join("saved.tar");
    g.ok(&["save", "-o", saved.to_str().unwrap(), "bytes/names:1"]);
    let h = Gantry::new();
    h.ok(&["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(id(&g), id(&h), "the image ID changed in a save/load round trip");
    let again = h.scratch().join("export.tar");
    h.ok(&["export", "bytes/names:1", "-o", again.to_str().unwrap()]);
    assert_eq!(entries, tar_entries(&std::fs::read(&again).unwrap()));
    h.fsck_clean();
    h.ok(&["fsck", "--verify-content"]);
}

/// A save that fails (a layer's files changed since they were unpacked)
/// exits non-zero and leaves no output file, half or whole.
#[test]
fn a_failed_save_leaves_no_file() {
    let layer = Layer::new().file("data", 0o644, b"original bytes\n").tar();
    let g = Gantry::new();
    let archive = g.scratch().join("in.tar");
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&layer),
            std::slice::from_ref(&layer),
            "save/fails:1",
        )),
    )
    .unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    for d in g.layer_dirs() {
        let f = d.join("data");
        if f.is_file() {
            std::fs::write(&f, b"changed bytes!!\n").unwrap();
        }
    }
    let out_dir = g.scratch().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = out_dir.join("saved.tar");
    let err = g.fails(&["save", "-o", out.to_str().unwrap(), "save/fails:1"]);
    assert!(err.contains("files changed since it was unpacked"), "{err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "save left a file behind"
    );
    let err = g.fails(&["export", "no/such:image", "-o", out.to_str().unwrap()]);
    assert!(err.contains("no/such:image"), "{err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "export left a file behind"
    );
}

/// A layer whose file `x` is replaced by a FIFO `x` later in the same tar
/// loads (its final tree has the FIFO), but saving it must not open the
/// FIFO (which would block forever): it fails at once, leaving no file.
/// An image with no layers exports as an empty tar.
#[test]
fn a_fifo_where_a_file_was_fails_save_at_once_and_an_empty_image_exports() {
    let layer = Layer::new().file("x", 0o644, b"a file first\n").fifo("x").tar();
    let g = Gantry::new();
    let archive = g.scratch().join("fifo.tar");
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&layer),
            std::slice::from_ref(&layer),
            "fifo/after:1",
        )),
    )
    .unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let out = g.scratch().join("saved.tar");
    let started = std::time::Instant::now();
    let err = g.fails(&["save", "-o", out.to_str().unwrap(), "fifo/after:1"]);
    // Without root the FIFO is an empty file standing for one: the entry's
    // bytes are missing from it.
    assert!(
        err.contains("\"x\" is not a regular file") || err.contains("\"x\": the layer's file is shorter"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(!out.exists());

    let empty = g.scratch().join("empty.tar");
    std::fs::write(
        &empty,
        corpus::tar_of(&corpus::docker_archive(&[], &[], "empty/image:1")),
    )
    .unwrap();
    g.ok(&["load", "-i", empty.to_str().unwrap()]);
    let exported = g.scratch().join("empty-export.tar");
    g.ok(&["export", "empty/image:1", "-o", exported.to_str().unwrap()]);
    assert_eq!(std::fs::read(&exported).unwrap(), vec![0u8; 1024]);
    g.fsck_clean();
}

/// A raw header block: `name`, type `kind`, size field `size`, owner 0.
fn raw_header(name: &str, kind: u8, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    if kind == b'3' {
        h.set_device_major(0).unwrap();
        h.set_device_minor(0).unwrap();
    }
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A PAX header holding `records`, padded.
fn pax(records: &[(&str, &str)]) -> Vec<u8> {
    let data: Vec<u8> = records
        .iter()
        .flat_map(|(k, v)| gantry_tests::big::pax_record(k, v))
        .collect();
    let mut out = raw_header("PaxHeaders.0/x", b'x', data.len() as u64);
    out.extend_from_slice(&data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A PAX `size` that contradicts the ustar field is the size, for the
/// layer rules as for the unpacker: an entry hidden in what the ustar size
/// calls file data (here overlayfs's 0/0 whiteout device, which the rules
/// refuse) is seen and refused by the rules, not applied unjudged.
#[test]
fn a_pax_size_contradicting_the_header_hides_nothing_from_the_rules() {
    let mut tar = pax(&[("size", "0")]);
    tar.extend(raw_header("cover", b'0', 1024));
    tar.extend(raw_header("hidden-whiteout", b'3', 0));
    tar.extend([0u8; 512 * 3]);
    let g = Gantry::new();
    let archive = g.scratch().join("hidden.tar");
    // A store with something in it, which the refusal must leave as it was.
    let good = corpus::good_layer();
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&good),
            std::slice::from_ref(&good),
            "control/good:1",
        )),
    )
    .unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&tar),
            std::slice::from_ref(&tar),
            "hostile/pax-size:1",
        )),
    )
    .unwrap();
    let err = assert_refused(&g, &["load", "-i", archive.to_str().unwrap()], "hidden-whiteout");
    assert!(err.contains("0/0 character device"), "{err}");

    // A PAX path over the header's name is the name, for both readers: the
    // file lands where the PAX record says, and nowhere else.
    let mut tar = pax(&[("path", "pax/named")]);
    tar.extend(raw_header("header-name", b'0', 3));
    tar.extend(b"abc".iter().copied().chain(std::iter::repeat_n(0, 509)));
    tar.extend([0u8; 1024]);
    std::fs::write(
        &archive,
        corpus::tar_of(&corpus::docker_archive(
            std::slice::from_ref(&tar),
            std::slice::from_ref(&tar),
            "hostile/pax-path:1",
        )),
    )
    .unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    let exported = g.scratch().join("export.tar");
    g.ok(&["export", "hostile/pax-path:1", "-o", exported.to_str().unwrap()]);
    let names: Vec<Vec<u8>> = tar_entries(&std::fs::read(&exported).unwrap())
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(names.contains(&b"pax/named".to_vec()), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(b"header-name")), "{names:?}");
}
