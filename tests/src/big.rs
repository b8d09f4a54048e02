//! Layers too big to hold: a one-layer image whose file is larger than a
//! ustar size field can say (8 GiB and more), written as Go's archive/tar
//! and Python's tarfile write it (the size in a PAX `size` record, the
//! ustar field 0) or as GNU tar does (a base-256 size field). The tar is
//! streamed through zstd and SHA-256 and never held: zeros compress to
//! almost nothing, so the archive on disk stays tiny.

use crate::corpus::{tar_of, Entry};
use crate::image::sha256;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

/// 8 GiB + 1 MiB: the smallest size the issue names that a ustar field cannot hold.
pub const BIG: u64 = (8 << 30) + (1 << 20);

/// How the big file's size is spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// A PAX `size` record, the ustar size field 0 (Go, Python).
    Pax,
    /// A base-256 size field in a GNU header (GNU tar, the `tar` crate).
    Gnu,
}

/// The name of the big file in the layer.
pub const BIG_NAME: &str = "models/w.bin";

/// A one-layer image's layer: `models/` and `models/w.bin` of `size` zero
/// bytes. Returns the zstd blob and the diffID of the tar.
pub fn big_layer(form: Form, size: u64) -> (Vec<u8>, String) {
    struct Tee {
        z: zstd::Encoder<'static, Vec<u8>>,
        h: Sha256,
    }
    impl Write for Tee {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.h.update(b);
            self.z.write_all(b)?;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut t = Tee {
        z: zstd::Encoder::new(Vec::new(), 3).unwrap(),
        h: Sha256::new(),
    };
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_path("models/").unwrap();
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(1_700_000_000);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_cksum();
    t.write_all(dir.as_bytes()).unwrap();
    let mut h = match form {
        Form::Pax => {
            let rec = pax_record("size", &size.to_string());
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_path("models/PaxHeaders.0/w.bin").unwrap();
            x.set_mode(0o644);
            x.set_size(rec.len() as u64);
            x.set_uid(0);
            x.set_gid(0);
            x.set_mtime(0);
            x.set_cksum();
            t.write_all(x.as_bytes()).unwrap();
            t.write_all(&padded(rec)).unwrap();
            let mut h = tar::Header::new_ustar();
            h.set_size(0);
            h
        }
        Form::Gnu => {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            assert_eq!(h.as_bytes()[124] & 0x80, 0x80, "a base-256 size field");
            h
        }
    };
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path(BIG_NAME).unwrap();
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    t.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = size + (512 - size % 512) % 512 + 1024;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        t.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    let diff_id = format!("sha256:{:x}", t.h.finalize());
    (t.z.finish().unwrap(), diff_id)
}

/// One PAX record, `"<len> key=value\n"`.
pub fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

fn padded(mut v: Vec<u8>) -> Vec<u8> {
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

fn config(diff_id: &str) -> Vec<u8> {
    json!({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "ADD w.bin /models/"}],
    })
    .to_string()
    .into_bytes()
}

/// A `docker save` archive of the one-layer image (`blob`, zstd) tagged `tag`.
pub fn docker_archive(blob: &[u8], diff_id: &str, tag: &str) -> Vec<u8> {
    let cfg = config(diff_id);
    let cfg_name = format!("{}.json", &sha256(&cfg)[7..]);
    let manifest = json!([{"Config": cfg_name, "RepoTags": [tag], "Layers": ["layer0/layer.tar"]}]);
    tar_of(&[
        Entry::File(cfg_name, cfg),
        Entry::File("layer0/layer.tar".into(), blob.to_vec()),
        Entry::File("manifest.json".into(), manifest.to_string().into_bytes()),
    ])
}

/// Writes the one-layer image as an OCI layout in `dir`, tagged `tag`.
pub fn oci_layout(dir: &Path, blob: &[u8], diff_id: &str, tag: &str) {
    let put = |data: &[u8]| {
        let d = sha256(data);
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        json!({"digest": d, "size": data.len()})
    };
    let cfg = config(diff_id);
    let mut c = put(&cfg);
    c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let mut l = put(blob);
    l["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": c, "layers": [l],
    })
    .to_string()
    .into_bytes();
    let mut m = put(&manifest);
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    m["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [m]}).to_string(),
    )
    .unwrap();
}

/// The OCI layout of [`oci_layout`] as one tar (an `oci-archive`).
pub fn oci_archive(blob: &[u8], diff_id: &str, tag: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), blob, diff_id, tag);
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir.path()).unwrap();
    b.into_inner().unwrap()
}
