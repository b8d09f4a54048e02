//! Bounded memory for inputs that are huge when unpacked but small on the
//! wire: a layer with half a gigabyte of zeros after its end-of-archive
//! marker, and a layer of a million files. Each loads (and the first saves
//! and loads again, byte for byte) with gantry's peak resident memory under
//! 64 MiB, read from the child's `VmHWM`.

use gantry_tests::corpus::{docker_archive, tar_of};
use gantry_tests::gantry::Gantry;
use gantry_tests::image::Layer;
use gantry_tests::require;
use sha2::Digest as _;
use std::io::Write;

const LIMIT_KIB: u64 = 64 << 10;

/// Writes a zstd blob of what `fill` writes, returning (blob, diffID).
fn zstd_stream(fill: impl FnOnce(&mut dyn Write)) -> (Vec<u8>, String) {
    struct Hashing<W: Write> {
        inner: W,
        hash: sha2::Sha256,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(b)?;
            self.hash.update(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let mut w = Hashing {
        inner: zstd::Encoder::new(Vec::new(), 3).unwrap(),
        hash: sha2::Sha256::new(),
    };
    fill(&mut w);
    let diff_id = format!("sha256:{}", hex::encode(w.hash.finalize()));
    (w.inner.finish().unwrap(), diff_id)
}

/// A docker archive of one layer given as its zstd blob and diffID.
fn archive(g: &Gantry, name: &str, blob: Vec<u8>, diff_id: &str) -> std::path::PathBuf {
    // `docker_archive` hashes the tars it is given; give it a stand-in and
    // fix the diffID in the config it wrote.
    let stand_in = b"stand-in".to_vec();
    let mut entries = docker_archive(std::slice::from_ref(&stand_in), &[blob], &format!("huge/{name}:1"));
    let stand_in_id = gantry_tests::image::sha256(&stand_in);
    let mut config_rename = None;
    for e in entries.iter_mut() {
        if let gantry_tests::corpus::Entry::File(n, d) = e {
            if n.ends_with(".json") && n != "manifest.json" {
                let text = String::from_utf8(d.clone()).unwrap().replace(&stand_in_id, diff_id);
                *d = text.into_bytes();
                let new_name = format!("{}.json", &gantry_tests::image::sha256(d)[7..]);
                config_rename = Some((n.clone(), new_name.clone()));
                *n = new_name;
            }
        }
    }
    let (old, new) = config_rename.unwrap();
    for e in entries.iter_mut() {
        if let gantry_tests::corpus::Entry::File(n, d) = e {
            if n == "manifest.json" {
                *d = String::from_utf8(d.clone()).unwrap().replace(&old, &new).into_bytes();
            }
        }
    }
    let path = g.scratch().join(format!("{name}.tar"));
    std::fs::write(&path, tar_of(&entries)).unwrap();
    path
}

fn peak_ok(g: &Gantry, args: &[&str]) -> u64 {
    let (run, peak) = g.run_peak(args);
    assert!(run.out.status.success(), "gantry {}: {}", args.join(" "), run.stderr());
    eprintln!("gantry {}: peak {} MiB", args.join(" "), peak >> 10);
    assert!(
        peak < LIMIT_KIB,
        "gantry {}: peak {peak} KiB is over 64 MiB",
        args.join(" ")
    );
    peak
}

#[test]
fn trailing_data_after_a_layer_costs_no_memory() {
    if !require("time") {
        return;
    }
    let g = Gantry::new();
    let (blob, diff_id) = zstd_stream(|w| {
        w.write_all(&Layer::new().file("hello", 0o644, b"hello\n").tar())
            .unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..512 {
            w.write_all(&zeros).unwrap();
        }
    });
    assert!(blob.len() < 1 << 20, "the blob is {} bytes", blob.len());
    let a = archive(&g, "trailing", blob, &diff_id);
    peak_ok(&g, &["load", "-i", a.to_str().unwrap()]);
    let saved = g.scratch().join("saved.tar");
    peak_ok(&g, &["save", "-o", saved.to_str().unwrap(), "huge/trailing:1"]);
    let id_of = |g: &Gantry| {
        let v: serde_json::Value = serde_json::from_str(&g.ok(&["inspect", "huge/trailing:1"])).unwrap();
        v[0]["Id"].as_str().unwrap().to_string()
    };
    let id = id_of(&g);
    let h = Gantry::new();
    peak_ok(&h, &["load", "-i", saved.to_str().unwrap()]);
    assert_eq!(id_of(&h), id);
    h.fsck_clean();
}

#[test]
fn a_layer_of_a_million_files_loads_in_bounded_memory() {
    if !require("time") {
        return;
    }
    // About memory, not time: a million inodes may take a slow disk past
    // the default 300 s a driver call may run.
    let g = Gantry::new().with_config(&format!(
        "[transport]\ntype = \"v2\"\n[driver]\ntype = \"{}\"\n[limits]\nwall_seconds = 3600\n",
        Gantry::test_driver()
    ));
    let (blob, diff_id) = zstd_stream(|w| {
        let mut b = tar::Builder::new(w);
        for d in 0..1000 {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            b.append_data(&mut h, format!("d{d:03}/"), std::io::empty()).unwrap();
            for f in 0..1000 {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                h.set_mtime(1_700_000_000);
                h.set_uid(0);
                h.set_gid(0);
                h.set_uid(0);
                h.set_gid(0);
                b.append_data(&mut h, format!("d{d:03}/f{f:03}"), std::io::empty())
                    .unwrap();
            }
        }
        b.finish().unwrap();
    });
    let a = archive(&g, "files", blob, &diff_id);
    peak_ok(&g, &["load", "-i", a.to_str().unwrap()]);
    g.fsck_clean();
}
