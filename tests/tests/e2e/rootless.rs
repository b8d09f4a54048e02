//! gantry without root: an unprivileged user's store gives the same images
//! as root's (owners, modes, devices, image IDs, saved and pushed digests),
//! while no file in it is setuid, setgid or a device, and a store is one or
//! the other.

use crate::{control_image, peers, publish};
use gantry_tests::gantry::{Gantry, NOBODY};
use gantry_tests::image::{rich_layers, sha256, Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::{is_root, tree};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// `security.capability` of a file with `cap_net_raw` (bit 13) effective
/// and permitted: `vfs_cap_data` revision 2, little-endian words.
const CAP_NET_RAW: [u8; 20] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The rich image and a layer of what only root can make: devices, owners
/// of links and directories, set-id files, unreadable modes, attributes
/// only root may set.
fn privileged_image() -> Image {
    let mut layers = rich_layers();
    layers.push(
        Layer::new()
            .dir("dev", 0o755)
            .device("dev/null", false, 1, 3)
            .device("dev/sda1", true, 8, 1)
            .file("usr/bin/wall", 0o2755, b"setgid binary\n")
            .file_owned("etc/shadow", 0o000, 0, 42, b"root:*:19000:0:99999:7:::\n")
            .dir_owned("home/alice", 0o700, 1000, 1000)
            .file_owned("home/alice/.profile", 0o644, 1000, 1000, b"PATH=/bin\n")
            .symlink_owned("home/alice/bin", "../../bin", 1000, 1000)
            .dir("sealed", 0o555)
            .file("sealed/inside", 0o444, b"read-only\n")
            .file_with_xattr("usr/bin/ping", "security.capability", &CAP_NET_RAW, b"ping\n")
            .file_with_xattr("etc/tagged", "user.origin", b"layer four", b"x\n")
            .tar(),
    );
    Image::new(layers)
}

/// A registry holding `img` as `repo:v1`, and that name; `None` (a skip
/// that says why) without the peers or without root, which the tests need
/// to become another user.
fn registry_with(repo: &str, img: &Image) -> Option<(Registry, String)> {
    if !peers() || !is_root() {
        eprintln!("skipped: needs the registry peers and root (to become another user)");
        return None;
    }
    let reg = Registry::start();
    publish(&reg, repo, "v1", img);
    let name = format!("{}/{repo}:v1", reg.addr());
    Some((reg, name))
}

fn image_id(g: &Gantry, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", name])).unwrap();
    v[0]["Id"].as_str().unwrap().to_string()
}

fn export(g: &Gantry, name: &str, file: &str) -> tree::Listing {
    let out = g.scratch().join(file);
    g.ok(&["export", name, "-o", out.to_str().unwrap()]);
    tree::of_tar(std::fs::File::open(&out).unwrap())
}

fn save(g: &Gantry, name: &str, file: &str) -> (std::path::PathBuf, String) {
    let out = g.scratch().join(file);
    g.ok(&["save", "-o", out.to_str().unwrap(), name]);
    let digest = sha256(&std::fs::read(&out).unwrap());
    (out, digest)
}

/// The digest `gantry push` reports (`TAG: digest: sha256:… size: N`).
fn pushed_digest(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.split_once(": digest: ")
                .map(|(_, d)| d.split(' ').next().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("no digest in: {out}"))
}

/// Every file of the store: none setuid, setgid or a device node, and
/// every one the caller's.
fn assert_store_is_harmless(root: &Path) {
    let mut seen = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let p = e.path();
            seen += 1;
            assert_eq!(md.mode() & 0o6000, 0, "{} is set-id in a rootless store", p.display());
            let ft = md.file_type();
            // overlayfs's whiteout, a 0/0 character device no one can
            // open, is the only node an overlay2 layer holds.
            let whiteout = ft.is_char_device() && md.rdev() == 0;
            assert!(
                !(ft.is_char_device() || ft.is_block_device()) || whiteout,
                "{} is a device node in a rootless store",
                p.display()
            );
            assert_eq!(md.uid(), NOBODY, "{} is not the caller's", p.display());
            if ft.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(seen > 50, "the store holds only {seen} files");
}

#[test]
fn without_root_a_store_keeps_the_image_s_owners_modes_and_devices() {
    let Some((reg, name)) = registry_with("priv/image", &privileged_image()) else {
        return;
    };
    let root = Gantry::bare().with_driver("vfs");
    let user = Gantry::unprivileged();
    root.ok(&["pull", &name]);
    let pulled = user.run(&["pull", &name]);
    assert!(pulled.out.status.success(), "{}", pulled.stderr());
    // Where auto falls back to vfs, its line says what the store keeps, and how.
    if Gantry::test_driver() == "auto" && user.driver() == "vfs" {
        assert!(
            pulled.stderr().contains("user.containers.override_stat"),
            "{}",
            pulled.stderr()
        );
    }
    assert!(user.root_path().join("rootless").is_file());
    // In gantry's own user namespace the kernel lets it mount overlay.
    if Gantry::test_driver() == "auto" {
        assert_eq!(user.driver(), "overlay2", "{}", pulled.stderr());
    }

    // Same image, same tree, entry by entry.
    assert_eq!(image_id(&root, &name), image_id(&user, &name));
    let ours = export(&user, &name, "user.tar");
    let theirs = export(&root, &name, "root.tar");
    tree::assert_same(&ours, &theirs, "the rootless export against root's");
    let e = |p: &str| {
        ours.get(p)
            .unwrap_or_else(|| panic!("{p} is missing from the export"))
            .clone()
    };
    assert_eq!((e("bin/su").mode, e("bin/su").uid), (0o4755, 0));
    assert_eq!(
        (e("usr/bin/wall").mode, e("etc/shadow").mode, e("etc/shadow").gid),
        (0o2755, 0, 42)
    );
    assert_eq!((e("dev/null").kind, e("dev/sda1").kind), ('c', 'b'));
    assert_eq!((e("home/user-file").uid, e("home/user-file").gid), (1234, 5678));
    assert_eq!(
        (e("home/alice").uid, e("home/alice/bin").uid, e("home/alice/bin").kind),
        (1000, 1000, 'l')
    );
    assert_eq!((e("var/tmp").mode, e("sealed").mode), (0o1777, 0o555));
    // The attributes only root may set come back in the export.
    let xattrs = tar_xattrs(&user.scratch().join("user.tar"));
    assert!(
        xattrs.contains(&("usr/bin/ping".into(), "security.capability".into())),
        "{xattrs:?}"
    );
    assert!(
        xattrs.contains(&("etc/tagged".into(), "user.origin".into())),
        "{xattrs:?}"
    );
    assert_eq!(xattrs, tar_xattrs(&root.scratch().join("root.tar")));

    // save gives the same archive; load of it in a rootless store the same image.
    let (_, user_saved) = save(&user, &name, "user-save.tar");
    let (root_archive, root_saved) = save(&root, &name, "root-save.tar");
    assert_eq!(user_saved, root_saved, "the saved archives differ");
    let loaded = Gantry::unprivileged();
    let archive = loaded.scratch().join("from-root.tar");
    std::fs::copy(&root_archive, &archive).unwrap();
    std::os::unix::fs::chown(&archive, Some(NOBODY), Some(NOBODY)).unwrap();
    loaded.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(image_id(&loaded, &name), image_id(&root, &name));
    tree::assert_same(
        &export(&loaded, &name, "loaded.tar"),
        &theirs,
        "a rootless load's export",
    );

    // push of a loaded image rebuilds its layers from the store: the same
    // digests as root's push of the same archive; a pulled one, the same too.
    let root_loaded = Gantry::bare().with_driver("vfs");
    root_loaded.ok(&["load", "-i", root_archive.to_str().unwrap()]);
    for (ours, theirs, what) in [(&loaded, &root_loaded, "loaded"), (&user, &root, "pulled")] {
        let to_user = format!("{}/priv/{what}-by-user:v1", reg.addr());
        let to_root = format!("{}/priv/{what}-by-root:v1", reg.addr());
        ours.ok(&["tag", &name, &to_user]);
        theirs.ok(&["tag", &name, &to_root]);
        let (a, b) = (ours.ok(&["push", &to_user]), theirs.ok(&["push", &to_root]));
        assert_eq!(pushed_digest(&a), pushed_digest(&b), "{what}: {a}\n{b}");
    }

    // serve --from-store without root: what a root store pulls from it is
    // root's image, tree for tree.
    let srv = user.serve(&["--from-store"]);
    let via = Gantry::bare().with_driver("vfs");
    let served = format!("{}/priv/image:v1", srv.addr);
    via.ok(&["pull", &served]);
    assert_eq!(image_id(&via, &served), image_id(&root, &name));
    tree::assert_same(
        &export(&via, &served, "served.tar"),
        &theirs,
        "a pull from a rootless serve",
    );
    drop(srv);

    for g in [&user, &loaded] {
        let out = g.ok(&["fsck", "--verify-content"]);
        assert!(out.contains("store is consistent"), "{out}");
        assert_store_is_harmless(g.root_path());
    }
}

/// `(path, attribute name)` of every `SCHILY.xattr.` record of a tar.
fn tar_xattrs(tar: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(std::fs::File::open(tar).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    out.push((path.clone(), k.to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_store_is_made_with_root_or_without_and_never_opened_the_other_way() {
    let Some((_reg, name)) = registry_with("test/control", &control_image()) else {
        return;
    };
    // A root store, opened without root (every file handed to that user,
    // so permissions are not what refuses it).
    let mut g = Gantry::unprivileged();
    g.user = None;
    g.ok(&["pull", &name]);
    for p in walk_all(g.root_path()) {
        std::os::unix::fs::lchown(&p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    g.user = Some((NOBODY, NOBODY));
    let before = g.store_listing();
    let err = g.fails(&["images"]);
    assert!(err.contains("was made by root") && err.contains("--root"), "{err}");
    assert_eq!(before, g.store_listing(), "a refused open changed the store");

    // A rootless store, opened by root.
    let mut g = Gantry::unprivileged();
    g.ok(&["pull", &name]);
    g.user = None;
    let before = g.store_listing();
    let err = g.fails(&["pull", &name]);
    assert!(err.contains("was made without root"), "{err}");
    assert_eq!(before, g.store_listing(), "root changed a rootless store");
}

fn walk_all(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        i += 1;
    }
    out
}

#[test]
fn verify_content_finds_owners_and_modes_that_are_not_the_layer_s() {
    let Some((_reg, name)) = registry_with("priv/image", &privileged_image()) else {
        return;
    };

    // A root store whose files were chowned to the caller, as a rootless
    // store of old was: its bytes hash to the diffIDs, its owners do not.
    let root = Gantry::bare().with_driver("vfs");
    root.ok(&["pull", &name]);
    let owned: Vec<_> = root
        .layer_dirs()
        .iter()
        .map(|d| d.join("etc/owned"))
        .filter(|p| p.exists())
        .collect();
    assert!(!owned.is_empty());
    for p in &owned {
        std::os::unix::fs::lchown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let r = root.run(&["fsck", "--verify-content"]);
    assert!(!r.out.status.success(), "{}", r.stdout());
    let said = format!("{}{}", r.stdout(), r.stderr());
    assert!(
        said.contains("owner 65534:65534 on disk, 1000:1000 in the layer"),
        "{said}"
    );

    // A rootless store whose record of a setuid file was edited.
    let user = Gantry::unprivileged();
    user.ok(&["pull", &name]);
    for d in user.layer_dirs() {
        let su = d.join("bin/su");
        if su.exists() {
            let path = std::ffi::CString::new(su.as_os_str().as_encoded_bytes()).unwrap();
            let v = b"0:0:0755:file";
            // SAFETY: both strings are NUL-terminated and `v` outlives the call.
            let rc = unsafe {
                libc::lsetxattr(
                    path.as_ptr(),
                    c"user.containers.override_stat".as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    0,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        }
    }
    let r = user.run(&["fsck", "--verify-content"]);
    assert!(!r.out.status.success(), "{}", r.stdout());
    let said = format!("{}{}", r.stdout(), r.stderr());
    assert!(said.contains("mode 755 on disk, 4755 in the layer"), "{said}");
}

#[test]
fn the_driver_conformance_suite_passes_without_root() {
    if !is_root() {
        eprintln!("skipped: needs root (to become another user)");
        return;
    }
    for driver in ["gantry_driver_overlay2", "gantry_driver_vfs"] {
        let g = Gantry::unprivileged();
        let out = g.ok(&["plugin", "test", g.component(driver).to_str().unwrap()]);
        assert!(
            out.contains(" checks passed") && !out.contains("FAIL"),
            "{driver}: {out}"
        );
    }
}
