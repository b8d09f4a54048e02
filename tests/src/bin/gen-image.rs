//! gen-image: writes an OCI image layout for the demo and the benchmark.
//!
//! ```text
//! gen-image demo  OUT_LAYOUT ROOTFS_DIR   # one layer from a directory, tagged "latest"
//! gen-image bench OUT_LAYOUT              # ~500 MiB in six layers, tagged "bench"
//! gen-image rootfs OUT_LAYOUT             # one layer: a Debian system's own /usr and /etc
//!                                         # (about 110 MiB, like a distribution base image)
//! gen-image tiny OUT_LAYOUT               # 60 layers of a few small files each
//! gen-image big OUT_ARCHIVE               # `docker save` archive: one zstd layer holding
//!                                         # one 8 GiB + 1 MiB file of zeros (PAX size)
//! ```

use gantry_tests::image::{Image, Layer, Layout};
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("demo") if args.len() == 4 => demo(Path::new(&args[2]), Path::new(&args[3])),
        Some("bench") if args.len() == 3 => bench(Path::new(&args[2])),
        Some("rootfs") if args.len() == 3 => rootfs(Path::new(&args[2])),
        Some("tiny") if args.len() == 3 => tiny(Path::new(&args[2])),
        Some("big") if args.len() == 3 => {
            let (blob, diff_id) = gantry_tests::big::big_layer(gantry_tests::big::Form::Pax, gantry_tests::big::BIG);
            std::fs::write(
                &args[2],
                gantry_tests::big::docker_archive(&blob, &diff_id, "big:latest"),
            )
            .unwrap();
        }
        Some("corpus") if args.len() == 3 => gantry_tests::corpus::write(Path::new(&args[2])),
        _ => {
            eprintln!("usage: gen-image demo OUT ROOTFS | gen-image bench|rootfs|tiny|big|corpus OUT");
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

/// One layer of this machine's own system files (binaries, libraries,
/// configuration), links and modes kept: the shape of a distribution base
/// image: files up to 2 MiB (a base image has no 100 MiB binaries). Stops at about 105 MiB (near 50 MB gzipped, like Debian's base image).
fn rootfs(out: &Path) {
    const BUDGET: u64 = 105 << 20;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let mut used = 0u64;
    fn walk(b: &mut tar::Builder<Vec<u8>>, dir: &Path, used: &mut u64, budget: u64) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if *used >= budget {
                return; // a tree cut at the budget, not empty directories beyond it
            }
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix("/").unwrap();
            if md.is_dir() {
                let _ = b.append_path_with_name(&p, rel);
                walk(b, &p, used, budget);
            } else if (md.is_symlink() || (md.is_file() && md.len() <= 2 << 20))
                && b.append_path_with_name(&p, rel).is_ok()
                && md.is_file()
            {
                *used += md.len();
            }
        }
    }
    for d in [
        "/etc",
        "/usr/bin",
        "/usr/sbin",
        "/usr/share/perl5",
        "/usr/share/zoneinfo",
        "/usr/lib",
    ] {
        let p = Path::new(d);
        if p.is_dir() {
            b.append_path_with_name(p, p.strip_prefix("/").unwrap()).unwrap();
            walk(&mut b, p, &mut used, BUDGET);
        }
    }
    let layer = b.into_inner().unwrap();
    eprintln!("rootfs image: 1 layer, {} MiB uncompressed", layer.len() >> 20);
    let mut layout = Layout::create(out);
    let (m, _) = layout.image(&Image::new(vec![layer]));
    layout.tag("rootfs", &m, None);
}

/// 60 layers of a few small files each: per-layer overhead, not bytes.
fn tiny(out: &Path) {
    let layers: Vec<Vec<u8>> = (0..60u64)
        .map(|l| {
            Layer::new()
                .dir(&format!("layer{l}"), 0o755)
                .file(&format!("layer{l}/a"), 0o644, &content(l, 200))
                .file(&format!("layer{l}/b"), 0o644, &content(l + 1000, 3000))
                .file(&format!("layer{l}/c"), 0o755, &content(l + 2000, 100))
                .tar()
        })
        .collect();
    let mut layout = Layout::create(out);
    let (m, _) = layout.image(&Image::new(layers));
    layout.tag("tiny", &m, None);
}
