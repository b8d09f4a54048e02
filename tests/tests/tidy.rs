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

/// The direct dependencies of `pkg` on other packages of this workspace
/// (those in `Cargo.lock` without a `source`).
fn workspace_deps(pkg: &str) -> HashSet<String> {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&text).unwrap();
    let packages = lock["package"].as_array().unwrap();
    let local: HashSet<&str> = packages
        .iter()
        .filter(|p| p.get("source").is_none())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let p = packages.iter().find(|p| p["name"].as_str() == Some(pkg)).unwrap();
    p.get("dependencies")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .map(|x| x.as_str().unwrap().split(' ').next().unwrap().to_string())
        .filter(|d| local.contains(d.as_str()))
        .collect()
}

/// What a package may have anywhere below it.
#[derive(Clone, Copy, PartialEq)]
enum Reach {
    /// Neither wasmtime nor the WIT bindings: the core, the servers.
    Plain,
    /// The WIT bindings a guest needs, never wasmtime: the kit and plugins.
    Guest,
    /// wasmtime: the plugin host and what sits on it.
    Wasmtime,
}

/// Every package of the workspace: what it may depend on within the
/// workspace (exactly these, directly), and what may be anywhere below it.
/// The design's direction: the binary (`gantry`, in `cli/`) sits on the
/// libraries; the plugin host alone reaches wasmtime; the servers and the
/// core never do; plugins see only the kit.
const LAYERS: &[(&str, &[&str], Reach)] = &[
    ("gantry-core", &[], Reach::Plain),
    (
        "gantry-host",
        &["gantry-core", "gantry-http", "gantry-native-abi"],
        Reach::Wasmtime,
    ),
    ("gantry-http", &["gantry-core", "gantry-challenge"], Reach::Plain),
    ("gantry-challenge", &[], Reach::Plain),
    ("gantry-serve", &["gantry-core", "gantry-http"], Reach::Plain),
    ("gantry-daemon", &["gantry-core", "gantry-http"], Reach::Plain),
    (
        "gantry",
        &[
            "gantry-core",
            "gantry-host",
            "gantry-http",
            "gantry-serve",
            "gantry-daemon",
        ],
        Reach::Wasmtime,
    ),
    ("gantry-native-abi", &[], Reach::Plain),
    ("gantry-kit", &["gantry-challenge", "gantry-native-abi"], Reach::Guest),
    ("gantry-transport-v2", &["gantry-kit"], Reach::Guest),
    ("gantry-transport-v1", &["gantry-kit"], Reach::Guest),
    ("gantry-driver-vfs", &["gantry-kit"], Reach::Guest),
    ("gantry-driver-overlay2", &["gantry-kit"], Reach::Guest),
    ("gantry-bad-driver", &["gantry-kit"], Reach::Guest),
    ("gantry-bad-transport", &["gantry-kit"], Reach::Guest),
    ("gantry-tests", &["gantry-host"], Reach::Wasmtime),
];

#[test]
fn every_package_depends_only_in_the_design_s_direction() {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.lock")).unwrap();
    let lock: toml::Value = toml::from_str(&text).unwrap();
    let local: Vec<&str> = lock["package"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p.get("source").is_none())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let named: HashSet<&str> = LAYERS.iter().map(|(p, _, _)| *p).collect();
    let unnamed: Vec<_> = local.iter().filter(|p| !named.contains(*p)).collect();
    assert!(unnamed.is_empty(), "packages the tidy table does not name: {unnamed:?}");
    let mut wrong = Vec::new();
    for (pkg, allowed, reach) in LAYERS {
        let mut direct: Vec<_> = workspace_deps(pkg).into_iter().collect();
        direct.sort();
        let mut want: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        want.sort();
        if direct != want {
            wrong.push(format!("{pkg} depends on {direct:?}, the design says {want:?}"));
        }
        let forbidden = |d: &str| match reach {
            Reach::Wasmtime => false,
            Reach::Guest => d.starts_with("wasmtime") || d.starts_with("cranelift"),
            Reach::Plain => d.starts_with("wasmtime") || d.starts_with("cranelift") || d.starts_with("wit-"),
        };
        let mut below: Vec<_> = closure(pkg).into_iter().filter(|d| forbidden(d)).collect();
        below.sort();
        if !below.is_empty() {
            wrong.push(format!("{pkg} must not reach {below:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
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
    // Every top-level directory that holds a package, the plugins and the examples.
    for e in std::fs::read_dir(&root).unwrap() {
        let d = e.unwrap().path();
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        if d.join("Cargo.toml").is_file() || name == "plugins" || name == "examples" {
            rust_files(&d, &mut files);
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
