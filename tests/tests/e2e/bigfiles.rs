//! A file over 8 GiB, its size in a PAX `size` record (Go, Python) or a
//! GNU base-256 field: load (docker-save and OCI archives), pull, export,
//! `save | load` with the image ID kept, and `fsck --verify-content`. The
//! layer is zeros through zstd, generated once per form and never held.

use gantry_tests::big::{big_layer, docker_archive, oci_archive, oci_layout, Form, BIG, BIG_NAME};
use gantry_tests::gantry::Gantry;
use gantry_tests::registry::Registry;
use std::io::Read;
use std::process::Stdio;
use std::sync::OnceLock;

/// The zstd blob and diffID of the big layer in `form`, made once.
fn layer(form: Form) -> &'static (Vec<u8>, String) {
    static PAX: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    static GNU: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    match form {
        Form::Pax => PAX.get_or_init(|| big_layer(Form::Pax, BIG)),
        Form::Gnu => GNU.get_or_init(|| big_layer(Form::Gnu, BIG)),
    }
}

fn id(g: &Gantry, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", name])).unwrap();
    v[0]["Id"].as_str().unwrap().to_string()
}

/// `gantry export`, streamed: every entry's (name, size), checking that the
/// big file holds zeros only and as many as its header says.
fn exported(g: &Gantry, name: &str) -> Vec<(String, u64)> {
    let mut child = g.piped(&["export", name]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(child.stdout.take().unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let size = e.size();
        let mut n = 0u64;
        loop {
            let k = e.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            assert!(buf[..k].iter().all(|b| *b == 0), "{path} holds more than zeros");
            n += k as u64;
        }
        assert_eq!(n, size, "{path}");
        out.push((path, size));
    }
    std::io::copy(&mut ar.into_inner(), &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success(), "export {name} failed");
    out
}

/// `a save name | b load`; returns what `b load` said.
fn save_into(a: &Gantry, b: &Gantry, name: &str) -> String {
    let mut save = a.piped(&["save", name]).stdout(Stdio::piped()).spawn().unwrap();
    let load = b.piped(&["load"]).stdin(save.stdout.take().unwrap()).output().unwrap();
    assert!(save.wait().unwrap().success(), "save {name} failed");
    assert!(
        load.status.success(),
        "load of the saved {name}: {}",
        String::from_utf8_lossy(&load.stderr)
    );
    String::from_utf8_lossy(&load.stdout).into_owned()
}

/// Everything the issue asks of a loaded (or pulled) big image.
fn check_big_image(g: &Gantry, name: &str) {
    let files = exported(g, name);
    assert!(files.contains(&(BIG_NAME.to_string(), BIG)), "{files:?}");
    let h = Gantry::new();
    save_into(g, &h, name);
    assert_eq!(id(g, name), id(&h, name), "the image ID changed through save | load");
    g.fsck_clean();
    g.ok(&["fsck", "--verify-content"]);
    h.ok(&["fsck", "--verify-content"]);
}

#[test]
fn a_file_over_8_gib_in_pax_form_loads_from_a_docker_archive() {
    let (blob, diff_id) = layer(Form::Pax);
    let g = Gantry::new();
    let archive = g.scratch().join("big.tar");
    std::fs::write(&archive, docker_archive(blob, diff_id, "big/pax:1")).unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    check_big_image(&g, "big/pax:1");
}

#[test]
fn a_file_over_8_gib_in_gnu_form_loads_from_an_oci_archive() {
    let (blob, diff_id) = layer(Form::Gnu);
    let g = Gantry::new();
    let archive = g.scratch().join("big.tar");
    std::fs::write(&archive, oci_archive(blob, diff_id, "big/gnu:1")).unwrap();
    g.ok(&["load", "-i", archive.to_str().unwrap()]);
    check_big_image(&g, "big/gnu:1");
}

/// The other two pairings of form and archive kind: load only (the checks
/// above cover the rest).
#[test]
fn a_file_over_8_gib_loads_in_the_other_form_of_each_archive() {
    let g = Gantry::new();
    let (blob, diff_id) = layer(Form::Gnu);
    let docker = g.scratch().join("docker.tar");
    std::fs::write(&docker, docker_archive(blob, diff_id, "big/d:1")).unwrap();
    g.ok(&["load", "-i", docker.to_str().unwrap()]);
    let (blob, diff_id) = layer(Form::Pax);
    let oci = g.scratch().join("oci.tar");
    std::fs::write(&oci, oci_archive(blob, diff_id, "big/o:1")).unwrap();
    g.ok(&["load", "-i", oci.to_str().unwrap()]);
    g.ok(&["fsck", "--verify-content"]);
}

#[test]
fn a_file_over_8_gib_pulls_from_docker_registry() {
    if !crate::peers() {
        return;
    }
    let reg = Registry::start();
    for form in [Form::Pax, Form::Gnu] {
        let (blob, diff_id) = layer(form);
        let dir = tempfile::tempdir().unwrap();
        oci_layout(dir.path(), blob, diff_id, "v1");
        let repo = format!("big/{form:?}").to_lowercase();
        reg.push(dir.path(), "v1", &format!("{repo}:v1"));
        let g = Gantry::new();
        let name = format!("{}/{repo}:v1", reg.addr());
        g.ok(&["pull", &name]);
        if form == Form::Pax {
            check_big_image(&g, &name);
        } else {
            g.ok(&["fsck", "--verify-content"]);
        }
    }
}
