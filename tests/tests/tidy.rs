//! Tidy checks: the dependency direction of the design, and a `//!` line
//! at the top of every source file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Every package `pkg` depends on, directly or not (normal dependencies).
fn closure(pkg: &str) -> HashSet<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--offline"])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: HashMap<String, String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let nodes: HashMap<String, Vec<String>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null()))
                .map(|d| d["pkg"].as_str().unwrap().to_string())
                .collect();
            (n["id"].as_str().unwrap().to_string(), deps)
        })
        .collect();
    let start = names
        .iter()
        .find(|(_, n)| *n == pkg)
        .unwrap_or_else(|| panic!("no package {pkg}"))
        .0
        .clone();
    let mut seen = HashSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        for d in &nodes[&id] {
            if seen.insert(names[d].clone()) {
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
