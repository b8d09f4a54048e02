//! Records the compiler that built the daemon, for `GET /version` (where
//! dockerd names its Go version). Only the compiler: nothing that changes
//! between two builds of the same source, so the crate is not rebuilt for
//! a commit or a clock.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=GANTRY_RUSTC_VERSION={version}");
}
