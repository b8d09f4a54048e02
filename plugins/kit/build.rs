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
    // `gantry_native`: the `native` feature on a native target builds the
    // native C ABI instead of the component bindings.
    println!("cargo::rustc-check-cfg=cfg(gantry_native)");
    let native = std::env::var_os("CARGO_FEATURE_NATIVE").is_some();
    let wasm = std::env::var("CARGO_CFG_TARGET_FAMILY").is_ok_and(|f| f.split(',').any(|x| x == "wasm"));
    if native && !wasm {
        println!("cargo:rustc-cfg=gantry_native");
    }
}
