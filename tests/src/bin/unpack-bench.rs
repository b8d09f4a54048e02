//! unpack-bench: the host alone doing a driver's apply-diff work — each
//! layer tar of a `docker save` archive unpacked by the host's confined
//! `unpack` into a directory of its own (overlay whiteouts), hashed as it
//! streams like a pull hashes a diffID — with no plugin in between. The
//! floor `bench/sandbox.sh` holds the driver components against.
//!
//! ```text
//! unpack-bench ARCHIVE.tar OUT_DIR
//! ```

use sha2::Digest;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, archive, out] = args.as_slice() else {
        eprintln!("usage: unpack-bench ARCHIVE.tar OUT_DIR");
        std::process::exit(2);
    };
    let out = Path::new(out);
    std::fs::create_dir_all(out).unwrap();
    let mut ar = tar::Archive::new(std::fs::File::open(archive).unwrap());
    let mut n = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        // Layers are the archive's `.tar` members (`<digest>.tar`, `<id>/layer.tar`).
        if !name.ends_with(".tar") {
            continue;
        }
        let dir = out.join(format!("layer{n}"));
        std::fs::create_dir(&dir).unwrap();
        let fd = std::fs::File::open(&dir).unwrap();
        let mut r = Hashing {
            inner: e,
            hash: sha2::Sha256::new(),
        };
        gantry_host::confined::unpack(fd.as_fd(), &mut r, gantry_host::confined::Whiteouts::Overlay).unwrap();
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        n += 1;
    }
    eprintln!("unpacked {n} layers");
}
