//! gen-image: writes an OCI image layout for the demo and the benchmark.
//!
//! ```text
//! gen-image demo  OUT_LAYOUT ROOTFS_DIR   # one layer from a directory, tagged "latest"
//! gen-image bench OUT_LAYOUT              # ~500 MiB in six layers, tagged "bench"
//! ```

use gantry_tests::image::{Image, Layer, Layout};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("demo") if args.len() == 4 => demo(Path::new(&args[2]), Path::new(&args[3])),
        Some("bench") if args.len() == 3 => bench(Path::new(&args[2])),
        Some("corpus") if args.len() == 3 => gantry_tests::corpus::write(Path::new(&args[2])),
        _ => {
            eprintln!("usage: gen-image demo OUT ROOTFS | gen-image bench OUT | gen-image corpus OUT");
            std::process::exit(2);
        }
    }
}

fn add_dir(mut layer: Layer, root: &Path, dir: &Path) -> Layer {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(root).unwrap().display().to_string();
        if p.is_dir() {
            layer = add_dir(layer.dir(&rel, 0o755), root, &p);
        } else {
            layer = layer.file(&rel, 0o644, &std::fs::read(&p).unwrap());
        }
    }
    layer
}

fn demo(out: &Path, rootfs: &Path) {
    let base = add_dir(Layer::new(), rootfs, rootfs).tar();
    let top = Layer::new()
        .dir("etc", 0o755)
        .file(
            "etc/motd",
            0o644,
            b"Pulled by gantry through a sandboxed v2 transport into a sandboxed vfs driver.\n",
        )
        .tar();
    let mut layout = Layout::create(out);
    let (m, _) = layout.image(&Image::new(vec![base, top]));
    layout.tag("latest", &m, None);
}

/// Deterministic, moderately compressible bytes (like binaries and text).
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    let words: [&[u8]; 8] = [
        b"container ",
        b"layer ",
        b"\x00\x01\x02\x03",
        b"gantry ",
        b"sha256 ",
        b"\n",
        b"image ",
        b"registry ",
    ];
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(3) {
            out.extend_from_slice(words[(x >> 8) as usize % words.len()]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn bench(out: &Path) {
    let mut layers = Vec::new();
    for l in 0..6u64 {
        let mut layer = Layer::new().dir(&format!("l{l}"), 0o755);
        // Thousands of small files...
        for d in 0..20 {
            layer = layer.dir(&format!("l{l}/d{d}"), 0o755);
            for f in 0..100 {
                let n = 512 + ((l * 7919 + d * 104729 + f * 31) % 16384) as usize;
                layer = layer.file(
                    &format!("l{l}/d{d}/f{f}"),
                    0o644,
                    &content(l * 100_000 + d * 1000 + f, n),
                );
            }
        }
        // ...and a few large ones.
        for b in 0..2 {
            layer = layer.file(&format!("l{l}/big{b}.bin"), 0o644, &content(l * 10 + b, 33 << 20));
        }
        layers.push(layer.tar());
    }
    let total: usize = layers.iter().map(Vec::len).sum();
    eprintln!("bench image: {} layers, {} MiB uncompressed", layers.len(), total >> 20);
    let mut layout = Layout::create(out);
    let (m, _) = layout.image(&Image::new(layers));
    layout.tag("bench", &m, None);
}
