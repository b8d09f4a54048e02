//! Tidy checks: the dependency direction of the design, and a `//!` line
//! at the top of every source file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every package `pkg` may depend on, directly or not, read from
/// `Cargo.lock` alone: no `cargo metadata`, which wants every platform's
/// crates downloaded and fails offline on a machine that fetched only its
/// own. The lock lists dev- and build-dependencies too, so this closure is a
/// superset of the real one: a check that passes here passes there.
fn closure(pkg: &str) -> HashSet<String> {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&text).unwrap();
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    for p in lock["package"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap().to_string();
        let list = p
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    .map(|x| x.as_str().unwrap().split(' ').next().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        deps.entry(name).or_default().extend(list);
    }
    assert!(deps.contains_key(pkg), "no package {pkg} in Cargo.lock");
    let mut seen = HashSet::new();
    let mut todo = vec![pkg.to_string()];
    while let Some(p) = todo.pop() {
        for d in deps.get(&p).into_iter().flatten() {
            // The WASI bindings crates (`wasi`, `wasip2`, …) are what a
            // crate like getrandom uses only when built for a wasm target;
            // the lock does not say so, and they bring wit-bindgen along.
            if d == "wasi" || d.starts_with("wasip") {
                continue;
            }
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn core_depends_on_neither_wasmtime_nor_the_host() {
    let deps = closure("gantry-core");
    let bad: Vec<_> = deps
        .iter()
        .filter(|d| d.starts_with("wasmtime") || *d == "gantry" || d.starts_with("wit-"))
        .collect();
    assert!(bad.is_empty(), "gantry-core must not depend on {bad:?}");
}

#[test]
fn plugins_depend_only_on_the_kit() {
    for p in [
        "gantry-transport-v2",
        "gantry-driver-vfs",
        "gantry-bad-driver",
        "gantry-bad-transport",
        "gantry-kit",
    ] {
        let deps = closure(p);
        let bad: Vec<_> = deps
            .iter()
            .filter(|d| d.starts_with("wasmtime") || *d == "gantry" || *d == "gantry-core")
            .collect();
        assert!(bad.is_empty(), "{p} must not depend on {bad:?}");
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().unwrap() != "target" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_source_file_says_what_it_is_for() {
    let root = workspace_root();
    let mut files = Vec::new();
    for d in ["core", "host", "plugins", "tests", "examples"] {
        if root.join(d).is_dir() {
            rust_files(&root.join(d), &mut files);
        }
    }
    assert!(files.len() > 20);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! line: {missing:?}");
}

/// The contract version is stated once, in the WIT package line: the host
/// and the kit read it at build time (no literal of their own), and the
/// docs name that version only.
#[test]
fn the_contract_version_is_stated_once() {
    let root = workspace_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let wit = read("wit/types.wit");
    let version = wit
        .lines()
        .find_map(|l| l.trim().strip_prefix("package gantry:plugin@"))
        .and_then(|v| v.strip_suffix(';'))
        .expect("a package line in wit/types.wit")
        .to_string();
    for file in ["host/src/plugin/mod.rs", "plugins/kit/src/lib.rs"] {
        let text = read(file);
        assert!(
            text.contains("pub const CONTRACT_VERSION: &str = env!(\"GANTRY_CONTRACT_VERSION\");"),
            "{file} must read the version from the WIT"
        );
    }
    for doc in ["README.md", "ARCHITECTURE.md"] {
        let text = read(doc);
        for (i, _) in text.match_indices("gantry:plugin@") {
            let rest = &text[i + "gantry:plugin@".len()..];
            let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            assert_eq!(v.trim_end_matches('.'), version, "{doc} names gantry:plugin@{v}");
        }
    }
}

/// A released contract is frozen: `wit/since_v<version>/` never changes,
/// so guests built against it keep loading. (A new version gets a new
/// directory and a new line here.)
#[test]
fn released_contracts_are_frozen() {
    let root = workspace_root();
    let frozen = [
        (
            "wit/since_v0.1.0/types.wit",
            "5f94c606ddf6f39b7fb0e61e50fb652fc5b2ab1a5241fa58547c268fd0b1fef9",
        ),
        (
            "wit/since_v0.1.1/types.wit",
            "9b81b63fc379b7beafcb576209347153f6d6e638f833a8ac49981e0f379ebeed",
        ),
    ];
    let dirs: Vec<String> = std::fs::read_dir(root.join("wit"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("since_v"))
        .collect();
    assert_eq!(
        dirs.len(),
        frozen.len(),
        "every wit/since_v*/ has a pinned digest: {dirs:?}"
    );
    for (file, digest) in frozen {
        let bytes = std::fs::read(root.join(file)).unwrap();
        let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        assert_eq!(got, digest, "{file} changed: a released contract is frozen");
    }
}
