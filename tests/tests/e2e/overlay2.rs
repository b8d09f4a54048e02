//! overlay2: the on-disk layout a pull writes (Docker's, and what
//! containers/storage's overlay driver writes), mounted by the kernel
//! straight from that layout, against `export`, `umoci unpack` and
//! `podman --storage-driver overlay`.

use crate::{assert_export_matches_umoci, peers, publish};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::{rich_layers, Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::{is_root, require, tree};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether overlay mounts work here (root, and a kernel that has overlay).
pub(crate) fn overlay_here() -> bool {
    if !is_root() {
        eprintln!("skipped: overlay2 needs root");
        return false;
    }
    let ok = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay"));
    if !ok {
        eprintln!("skipped: the kernel has no overlay filesystem");
    }
    ok
}

/// One overlay layer directory as a driver wrote it.
struct LayerDir {
    dir: PathBuf,
    link: String,
    lower: Vec<String>,
}

fn read_layer(dir: &Path) -> LayerDir {
    let link = std::fs::read_to_string(dir.join("link")).unwrap();
    let lower = std::fs::read_to_string(dir.join("lower"))
        .map(|l| l.trim().split(':').map(str::to_string).collect())
        .unwrap_or_default();
    LayerDir {
        dir: dir.to_path_buf(),
        link: link.trim().to_string(),
        lower,
    }
}

/// The layer directories of an overlay home, checked for Docker's shape:
/// a 26-character base32 short id in `link`, `l/<short>` -> `../<id>/diff`,
/// `lower` naming only `l/` entries, and `work` beside it.
fn layers_of_home(home: &Path) -> Vec<LayerDir> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(home).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name == "l" || !p.join("diff").is_dir() {
            continue;
        }
        let l = read_layer(&p);
        assert_eq!(l.link.len(), 26, "{name}: link {:?}", l.link);
        assert!(
            l.link
                .bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)),
            "{name}: link {:?} is not base32",
            l.link
        );
        let target = std::fs::read_link(home.join("l").join(&l.link)).unwrap();
        assert_eq!(target, Path::new("..").join(&name).join("diff"), "l/{}", l.link);
        for entry in &l.lower {
            assert!(
                entry.starts_with("l/") && home.join(entry).is_dir(),
                "{name}: lower {entry}"
            );
        }
        if !l.lower.is_empty() {
            assert!(p.join("work").is_dir(), "{name} has a parent but no work directory");
        }
        out.push(l);
    }
    out
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

/// A diff directory as overlay sees it: the tree, plus each whiteout
/// (a 0/0 character device) and each opaque directory.
fn diff_listing(diff: &Path) -> (tree::Listing, Vec<String>) {
    let listing = tree::of_dir(diff);
    let mut marks = Vec::new();
    for (path, m) in &listing {
        let p = diff.join(path);
        if m.kind == 'c' {
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert!(md.file_type().is_char_device());
            if md.rdev() == 0 {
                marks.push(format!("whiteout {path}"));
            }
        }
        if m.kind == 'd' && xattr(&p, "trusted.overlay.opaque").as_deref() == Some(b"y") {
            marks.push(format!("opaque {path}"));
        }
    }
    marks.sort();
    (listing, marks)
}

/// Unmounts on drop, so a failing assertion leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Mounts the top layer of `home` with the kernel, from the layout alone,
/// the way Docker's overlay2 does (relative `l/` paths, from the home).
fn mount_top(home: &Path, at: &Path) -> Mounted {
    let layers = layers_of_home(home);
    let top = layers.iter().max_by_key(|l| l.lower.len()).expect("layers");
    std::fs::create_dir_all(at).unwrap();
    let name = top.dir.file_name().unwrap().to_string_lossy().into_owned();
    let opts = format!("lowerdir={name}/diff:{}", top.lower.join(":"));
    let st = Command::new("mount")
        .current_dir(home)
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(at)
        .output()
        .unwrap();
    assert!(st.status.success(), "mount: {}", String::from_utf8_lossy(&st.stderr));
    Mounted(at.to_path_buf())
}

/// The rich image in a registry, pulled by a store forced to overlay2.
fn rich_pulled_with_overlay2() -> (Registry, crate::Published, Gantry, String) {
    let reg = Registry::start();
    let (published, _, _) = publish(&reg, "test/rich", "v1", &Image::new(rich_layers()));
    let name = format!("{}/test/rich:v1", reg.addr());
    let g = Gantry::bare().with_driver("overlay2");
    g.ok(&["pull", &name]);
    (reg, published, g, name)
}

/// A pull with overlay2 writes Docker's layout; the kernel mounts it as it
/// lies, and that tree equals `export` (read through gantry's own mount)
/// and `umoci unpack` of the same image, file by file. Whiteouts are 0/0
/// character devices and opaque directories carry the attribute.
#[test]
fn an_overlay2_pull_mounts_to_the_same_tree_as_export_and_umoci() {
    if !peers() || !overlay_here() {
        return;
    }
    let (_reg, published, g, name) = rich_pulled_with_overlay2();
    assert_eq!(g.driver(), "overlay2");
    let home = g.root_path().join("overlay2");
    let layers = layers_of_home(&home);
    assert_eq!(layers.len(), 3);
    let mut depths: Vec<usize> = layers.iter().map(|l| l.lower.len()).collect();
    depths.sort();
    assert_eq!(depths, vec![0, 1, 2], "each layer's lower names all its ancestors");
    let marks: Vec<String> = layers
        .iter()
        .flat_map(|l| diff_listing(&l.dir.join("diff")).1)
        .collect();
    assert!(marks.contains(&"whiteout gone.txt".to_string()), "{marks:?}");
    assert!(marks.contains(&"opaque etc/conf.d".to_string()), "{marks:?}");

    let out = g.scratch().join("export.tar");
    g.ok(&["export", &name, "-o", out.to_str().unwrap()]);
    let exported = tree::of_tar(std::fs::File::open(&out).unwrap());
    let merged = g.scratch().join("merged");
    let mounted = mount_top(&home, &merged);
    let seen = tree::of_dir(&merged);
    drop(mounted);
    tree::assert_same(&exported, &seen, "export against the kernel's mount of the layout");
    assert_export_matches_umoci(&g, &name, published.dir.path(), "v1");
    // gantry's own mounts are gone when it exits.
    assert!(
        gantry_tests::mounts_under(g.root_path()).is_empty(),
        "a mount was left behind"
    );
    g.ok(&["rmi", &name]);
    assert!(layers_of_home(&home).is_empty());
    assert_eq!(
        std::fs::read_dir(home.join("l")).unwrap().count(),
        0,
        "short links left behind"
    );
    g.fsck_clean();
}

/// The layers of `podman --storage-driver overlay pull` of the same image,
/// by uncompressed digest: (diff directory, lower chain length).
fn podman_layers(root: &Path) -> BTreeMap<String, (PathBuf, usize)> {
    let text = std::fs::read_to_string(root.join("overlay-layers/layers.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeMap::new();
    for l in v.as_array().unwrap() {
        let id = l["id"].as_str().unwrap();
        let digest = l["diff-digest"].as_str().unwrap().to_string();
        let layer = read_layer(&root.join("overlay").join(id));
        out.insert(digest, (layer.dir.join("diff"), layer.lower.len()));
    }
    out
}

/// gantry's layers by diffID: (diff directory, lower chain length).
fn gantry_layers(g: &Gantry) -> BTreeMap<String, (PathBuf, usize)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(g.image_dir("layerdb/sha256")).unwrap() {
        let p = e.unwrap().path();
        let diff_id = std::fs::read_to_string(p.join("diff")).unwrap();
        let cache = std::fs::read_to_string(p.join("cache-id")).unwrap();
        let layer = read_layer(&g.root_path().join("overlay2").join(cache.trim()));
        out.insert(diff_id.trim().to_string(), (layer.dir.join("diff"), layer.lower.len()));
    }
    out
}

/// The same image pulled by gantry and by podman's overlay driver: every
/// layer's `diff` holds the same tree with the same whiteouts and opaque
/// directories, and every `lower` chain has the same shape.
#[test]
fn the_overlay2_layout_matches_what_podman_writes() {
    if !peers() || !overlay_here() || !require("podman") {
        return;
    }
    let (_reg, _published, g, name) = rich_pulled_with_overlay2();
    let podman_root = g.scratch().join("podman-root");
    let podman_run = g.scratch().join("podman-run");
    let st = Command::new("podman")
        .arg("--root")
        .arg(&podman_root)
        .arg("--runroot")
        .arg(&podman_run)
        .args([
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "none",
        ])
        .args(["pull", "-q", "--tls-verify=false", &format!("docker://{name}")])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "podman pull: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let theirs = podman_layers(&podman_root);
    let ours = gantry_layers(&g);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "the same layers by diffID"
    );
    for (diff_id, (our_diff, our_depth)) in &ours {
        let (their_diff, their_depth) = &theirs[diff_id];
        assert_eq!(our_depth, their_depth, "{diff_id}: lower chains differ in length");
        let (a, a_marks) = diff_listing(our_diff);
        let (b, b_marks) = diff_listing(their_diff);
        tree::assert_same(&a, &b, &format!("diff of layer {diff_id}"));
        assert_eq!(a_marks, b_marks, "{diff_id}: whiteouts and opaque directories");
    }
    let _ = Command::new("podman")
        .arg("--root")
        .arg(&podman_root)
        .arg("--runroot")
        .arg(&podman_run)
        .args(["--storage-driver", "overlay", "system", "reset", "-f"])
        .output();
}

/// A process killed while it holds a mount (an export blocked on a full
/// pipe) leaves it mounted; the next process alone on the store unmounts it.
#[test]
fn a_mount_left_by_a_killed_process_is_cleared_by_the_next_one() {
    if !peers() || !overlay_here() {
        return;
    }
    let (_reg, _published, g, name) = rich_pulled_with_overlay2();
    let config = g.scratch().join("gantry.toml");
    let mut child = Command::new(gantry_tests::gantry::binary())
        .arg("--root")
        .arg(g.root_path())
        .arg("--config")
        .arg(&config)
        .args(["export", &name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Nobody reads the pipe: the export blocks with the top layer mounted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while gantry_tests::mounts_under(g.root_path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the export never mounted its layer"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no clean-up runs
    child.wait().unwrap();
    assert_eq!(
        gantry_tests::mounts_under(g.root_path()).len(),
        1,
        "the killed process's mount is still there"
    );
    g.ok(&["images"]);
    assert_eq!(
        gantry_tests::mounts_under(g.root_path()).len(),
        0,
        "the next process alone cleared it"
    );
    g.fsck_clean();
    let out = g.scratch().join("again.tar");
    g.ok(&["export", &name, "-o", out.to_str().unwrap()]);
}

/// A whiteout or an opaque marker in a first layer has nothing beneath it
/// to hide: with overlay2 neither `export` nor `save` shows a whiteout
/// device or an overlay attribute, alone or under a later layer.
#[test]
fn a_first_layer_whiteout_is_never_exported_as_a_device() {
    if !peers() || !overlay_here() {
        return;
    }
    let reg = Registry::start();
    let first = Layer::new()
        .file("keep", 0o644, b"k\n")
        .whiteout("ghost")
        .dir("o", 0o755)
        .opaque("o")
        .file("o/f", 0o644, b"f\n")
        .tar();
    let second = Layer::new().file("second", 0o644, b"2\n").tar();
    let g = Gantry::bare().with_driver("overlay2");
    for (tag, layers) in [("one", vec![first.clone()]), ("two", vec![first, second])] {
        publish(&reg, "test/first-whiteout", tag, &Image::new(layers));
        let name = format!("{}/test/first-whiteout:{tag}", reg.addr());
        g.ok(&["pull", &name]);
        let out = g.scratch().join(format!("{tag}.tar"));
        g.ok(&["export", &name, "-o", out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(crate::hostile::whiteouts_in(&bytes), None, "{tag}: export");
        assert!(
            !bytes.windows(15).any(|w| w == b"trusted.overlay"),
            "{tag}: the export carries an overlay attribute"
        );
        let t = tree::of_tar(&bytes[..]);
        assert!(t.contains_key("keep") && t.contains_key("o/f"), "{tag}: {t:?}");
        let saved = g.scratch().join(format!("{tag}-saved.tar"));
        g.ok(&["save", "-o", saved.to_str().unwrap(), &name]);
        // Every tar inside the archive (the layers) spells deletions as
        // `.wh.` files, as the layer it came from did.
        let mut ar = tar::Archive::new(std::fs::File::open(&saved).unwrap());
        for e in ar.entries().unwrap() {
            let mut inner = Vec::new();
            std::io::Read::read_to_end(&mut e.unwrap(), &mut inner).unwrap();
            let devices = tar::Archive::new(&inner[..]).entries().ok().map(|es| {
                es.filter_map(Result::ok)
                    .filter(|le| {
                        let h = le.header();
                        h.entry_type() == tar::EntryType::Char
                            && h.device_major().ok().flatten() == Some(0)
                            && h.device_minor().ok().flatten() == Some(0)
                    })
                    .count()
            });
            assert!(devices.unwrap_or(0) == 0, "{tag}: save shows a whiteout device");
        }
    }
    g.fsck_clean();
}

/// The kernel release, as the fallback line names it.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap()
        .trim()
        .to_string()
}

/// The lines of `stderr` that say `auto` fell back to vfs.
fn fallback_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("overlay2 is not available here"))
        .collect()
}

/// A store on a file system overlay cannot take as its upper layer (here
/// an overlay mount itself): `auto` picks vfs once, and its line names the
/// file system, the kernel and what to do; the store then stays vfs
/// without a word.
#[test]
fn auto_on_a_file_system_overlay_refuses_says_which_and_uses_vfs() {
    if !peers() || !overlay_here() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/fallback", "v1", &crate::control_image());
    let name = format!("{}/test/fallback:v1", reg.addr());
    let g = Gantry::bare().with_driver("auto");
    let under = g.scratch().join("under");
    for d in ["lower", "upper", "work"] {
        std::fs::create_dir_all(under.join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={0}/lower,upperdir={0}/upper,workdir={0}/work",
        under.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(g.root_path())
        .output()
        .unwrap();
    assert!(st.status.success(), "mount: {}", String::from_utf8_lossy(&st.stderr));
    let _mounted = Mounted(g.root_path().to_path_buf());

    let pulled = g.run(&["pull", &name]);
    assert!(pulled.out.status.success(), "{}", pulled.stderr());
    let stderr = pulled.stderr();
    let lines = fallback_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    for words in [
        "the store's file system cannot hold overlay layers",
        "put the store on ext4, xfs or btrfs",
        &format!("Linux {}, the store on overlay", kernel_release()),
        "using vfs",
    ] {
        assert!(lines[0].contains(words), "no {words:?} in: {}", lines[0]);
    }
    assert_eq!(g.driver(), "vfs");
    // The store holds vfs layers now: `auto` keeps them, and says nothing.
    let again = g.run(&["images"]);
    assert!(again.out.status.success(), "{}", again.stderr());
    assert!(fallback_lines(&again.stderr()).is_empty(), "{}", again.stderr());
    g.fsck_clean();
}

/// Without root, where the kernel refuses gantry a user namespace (here a
/// namespace whose `user.max_user_namespaces` is 0, as a system that turns
/// them off): `auto` picks vfs and its line says not root, what the kernel
/// refused, which setting does it, and what to do; the pull keeps the
/// image's owners as recorded.
#[test]
fn auto_without_root_and_without_user_namespaces_says_why_and_uses_vfs() {
    if !peers() || !overlay_here() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/fallback", "v1", &crate::control_image());
    let name = format!("{}/test/fallback:v1", reg.addr());
    let g = Gantry::unprivileged().with_driver("auto");
    let no_userns = Path::new(env!("CARGO_BIN_EXE_no-userns"));
    let pulled = g.run_wrapped(no_userns, &["pull", &name]);
    assert!(pulled.out.status.success(), "{}", pulled.stderr());
    let stderr = pulled.stderr();
    let lines = fallback_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    for words in [
        "not root, and the kernel refused gantry a user namespace of its own",
        "No space left on device",
        "the sysctl user.max_user_namespaces is 0 or used up",
        "run as root, or allow unprivileged user namespaces",
        &format!("Linux {}, the store on ", kernel_release()),
        "using vfs",
        "user.containers.override_stat",
    ] {
        assert!(lines[0].contains(words), "no {words:?} in: {}", lines[0]);
    }
    assert_eq!(g.driver(), "vfs");
    assert!(g.root_path().join("rootless").is_file());
    // Where user namespaces are allowed, the store keeps its vfs layers.
    let again = g.run(&["images"]);
    assert!(again.out.status.success(), "{}", again.stderr());
    assert!(fallback_lines(&again.stderr()).is_empty(), "{}", again.stderr());
    assert_eq!(g.driver(), "vfs");
}
