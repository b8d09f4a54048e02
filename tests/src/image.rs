//! Generates OCI image layouts: layers described as entries, configs with
//! matching diffIDs, manifests, multi-platform indexes.

use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A layer under construction: a tar written entry by entry.
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        self.b
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap();
        self
    }

    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, data)
    }

    pub fn file_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A symbolic link owned by `uid`:`gid`.
    pub fn symlink_owned(mut self, path: &str, target: &str, uid: u64, gid: u64) -> Self {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    /// A directory owned by `uid`:`gid`.
    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        h.set_uid(uid);
        h.set_gid(gid);
        self.b
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap();
        self
    }

    /// A hard link to `target`, its header carrying `mode` (a real tar
    /// writer records the shared inode's mode, which the runtimes apply).
    pub fn hardlink(mut self, path: &str, target: &str, mode: u32) -> Self {
        let mut h = header(tar::EntryType::Link, mode, 0);
        self.b.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn fifo(mut self, path: &str) -> Self {
        let mut h = header(tar::EntryType::Fifo, 0o644, 0);
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// A file preceded by a PAX record setting extended attribute `key`.
    pub fn file_with_xattr(mut self, path: &str, key: &str, value: &[u8], data: &[u8]) -> Self {
        self.b
            .append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), value)])
            .unwrap();
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.b.append_data(&mut h, path, data).unwrap();
        self
    }

    /// A block (`block`) or character device node.
    pub fn device(mut self, path: &str, block: bool, major: u32, minor: u32) -> Self {
        let kind = if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        };
        let mut h = header(kind, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    /// `.wh.NAME` in `dir`: deletes NAME from lower layers.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path
            .rsplit_once('/')
            .map(|(d, n)| (format!("{d}/"), n))
            .unwrap_or((String::new(), path));
        self.file(&format!("{dir}.wh.{name}"), 0o644, b"")
    }

    /// `DIR/.wh..wh..opq`: hides everything lower layers put in DIR.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o644, b"")
    }

    /// An entry written raw, bypassing the builder's checks (for hostile layers).
    pub fn raw(mut self, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) -> Self {
        let mut h = header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// An entry whose name and link target are raw bytes (not UTF-8, say).
    pub fn raw_bytes(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut h = header(kind, 0o644, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn tar(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

pub fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::Gzip => {
            let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Compression::Zstd => (
            zstd::encode_all(tar, 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
    }
}

/// One single-platform image.
pub struct Image {
    pub layers: Vec<Vec<u8>>,
    pub compression: Compression,
    pub os: &'static str,
    pub arch: &'static str,
    /// Replaces a layer's diffID in the config (for integrity tests).
    pub wrong_diff_id: Option<usize>,
    /// Replaces a layer's compressed blob with these bytes (corrupt or
    /// truncated compression under a correct blob digest).
    pub blob_override: Option<(usize, Vec<u8>)>,
}

impl Image {
    pub fn new(layers: Vec<Vec<u8>>) -> Image {
        Image {
            layers,
            compression: Compression::Gzip,
            os: "linux",
            arch: "amd64",
            wrong_diff_id: None,
            blob_override: None,
        }
    }
}

/// A descriptor written into a layout.
#[derive(Clone, Debug)]
pub struct Desc {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Desc {
    fn json(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An OCI image layout being written.
pub struct Layout {
    dir: std::path::PathBuf,
    index: Vec<serde_json::Value>,
}

impl Layout {
    pub fn create(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            index: Vec::new(),
        }
    }

    pub fn blob(&self, data: &[u8], media_type: &str) -> Desc {
        let d = sha256(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        Desc {
            media_type: media_type.to_string(),
            digest: d,
            size: data.len(),
        }
    }

    /// Writes an image's blobs and manifest; returns the manifest descriptor
    /// and the layer blob descriptors.
    pub fn image(&self, img: &Image) -> (Desc, Vec<Desc>) {
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        for (i, tar) in img.layers.iter().enumerate() {
            let (mut blob, mt) = compress(tar, img.compression);
            if let Some((j, bytes)) = &img.blob_override {
                if *j == i {
                    blob = bytes.clone();
                }
            }
            layers.push(self.blob(&blob, mt));
            diff_ids.push(if img.wrong_diff_id == Some(i) {
                sha256(b"not this layer")
            } else {
                sha256(tar)
            });
            history.push(
                json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("/bin/sh -c #(nop) ADD layer {i}")}),
            );
        }
        history.push(json!({"created": "2023-11-14T22:13:20Z", "created_by": "/bin/sh -c #(nop)  CMD [\"/bin/sh\"]", "empty_layer": true}));
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": img.arch,
            "os": img.os,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        let config = self.blob(
            config.to_string().as_bytes(),
            "application/vnd.oci.image.config.v1+json",
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config.json(),
            "layers": layers.iter().map(Desc::json).collect::<Vec<_>>(),
        });
        (
            self.blob(
                manifest.to_string().as_bytes(),
                "application/vnd.oci.image.manifest.v1+json",
            ),
            layers,
        )
    }

    /// Names `desc` as `tag` in index.json.
    pub fn tag(&mut self, tag: &str, desc: &Desc, platform: Option<(&str, &str)>) {
        let mut d = desc.json();
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        if let Some((os, arch)) = platform {
            d["platform"] = json!({"os": os, "architecture": arch});
        }
        self.index.push(d);
        self.write_index();
    }

    /// Writes a multi-platform index over `images`; returns its descriptor.
    pub fn multi(&self, images: &[(&Image, &Desc)]) -> Desc {
        let idx = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": images.iter().map(|(img, d)| {
                let mut j = d.json();
                j["platform"] = json!({"os": img.os, "architecture": img.arch});
                j
            }).collect::<Vec<_>>(),
        });
        self.blob(idx.to_string().as_bytes(), "application/vnd.oci.image.index.v1+json")
    }

    fn write_index(&self) {
        let idx = json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(self.dir.join("index.json"), idx.to_string()).unwrap();
    }
}

/// The rich test image: three layers with directories, modes, owners, a
/// setuid file, symlinks, hard links, a fifo, whiteouts and an opaque
/// directory.
pub fn rich_layers() -> Vec<Vec<u8>> {
    let base = Layer::new()
        .dir("bin", 0o755)
        .file("bin/sh", 0o755, b"#!shell\n")
        .file("bin/su", 0o4755, b"setuid binary\n")
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file_owned("etc/owned", 0o640, 1000, 1000, b"owned by 1000\n")
        .dir("etc/conf.d", 0o755)
        .file("etc/conf.d/a.conf", 0o644, b"a=1\n")
        .file("etc/conf.d/b.conf", 0o644, b"b=2\n")
        .dir("var", 0o755)
        .dir("var/tmp", 0o1777)
        .symlink("bin/ash", "sh")
        .symlink("etc/abs-link", "/etc/passwd")
        .hardlink("bin/sh-hard", "bin/sh", 0o755)
        .file("gone.txt", 0o644, b"deleted by layer 2\n")
        .fifo("var/fifo")
        .tar();
    let middle = Layer::new()
        .dir("etc", 0o755)
        .opaque("etc/conf.d")
        .dir("etc/conf.d", 0o700)
        .file("etc/conf.d/c.conf", 0o600, b"c=3\n")
        .whiteout("gone.txt")
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/lib/big.bin", 0o644, &vec![7u8; 300_000])
        .tar();
    let top = Layer::new()
        .file("bin/sh", 0o755, b"#!shell v2\n")
        .dir("home", 0o755)
        .file_owned("home/user-file", 0o600, 1234, 5678, b"hi\n")
        .symlink("lib", "usr/lib")
        .tar();
    vec![base, middle, top]
}
