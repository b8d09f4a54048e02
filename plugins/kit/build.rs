//! The contract version the kit names is read from the WIT package line, so
//! it is stated once, in the WIT.

fn main() {
    let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit/types.wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    let text = std::fs::read_to_string(&wit).unwrap_or_else(|e| panic!("reading {}: {e}", wit.display()));
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("package gantry:plugin@"))
        .and_then(|v| v.strip_suffix(';'))
        .expect("a `package gantry:plugin@X;` line");
    println!("cargo:rustc-env=GANTRY_CONTRACT_VERSION={version}");
}
