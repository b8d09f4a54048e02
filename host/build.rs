//! States the contract version once: it is read from the WIT package line
//! (`wit/types.wit`), and the oldest version the host still loads from the
//! frozen `wit/since_v<version>/` directories.

use std::path::Path;

fn package_version(wit: &Path) -> String {
    let text = std::fs::read_to_string(wit).unwrap_or_else(|e| panic!("reading {}: {e}", wit.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("package gantry:plugin@"))
        .and_then(|v| v.strip_suffix(';'))
        .unwrap_or_else(|| panic!("{} has no `package gantry:plugin@X;` line", wit.display()))
        .to_string()
}

fn main() {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    let current = package_version(&wit.join("types.wit"));
    let mut oldest = current.clone();
    let key = |v: &str| v.split('.').map(|n| n.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
    for e in std::fs::read_dir(&wit).expect("reading wit/").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("since_v") {
            println!("cargo:rerun-if-changed={}", e.path().display());
            let declared = package_version(&e.path().join("types.wit"));
            assert_eq!(declared, v, "wit/{name} declares gantry:plugin@{declared}");
            if key(v) < key(&oldest) {
                oldest = v.to_string();
            }
        }
    }
    println!("cargo:rustc-env=GANTRY_CONTRACT_VERSION={current}");
    println!("cargo:rustc-env=GANTRY_CONTRACT_OLDEST={oldest}");
}
