//! gantry-tests: what the end-to-end tests stand on.
//!
//! - [`big`]: one-layer images with a file over 8 GiB, streamed through zstd;
//! - [`image`]: writes OCI image layouts from a description (layers of
//!   files, links, whiteouts, devices…), so no test image is a checked-in
//!   binary;
//! - [`registry`]: starts Debian's `docker-registry` (the CNCF distribution
//!   server) on 127.0.0.1 and fills it with `skopeo copy`;
//! - [`proxy`]: an HTTP proxy in front of it that adds token auth and
//!   injects faults (cut connections, wrong bytes, redirects);
//! - [`token`]: a token server, for a registry with distribution's own
//!   token auth (users who see only their own repositories);
//! - [`gantry`]: runs the built binary with a fresh `--root`;
//! - [`tree`]: listings of a tar or a directory for file-by-file comparison.

pub mod big;
pub mod corpus;
pub mod forward;
pub mod gantry;
pub mod image;
pub mod proxy;
pub mod registry;
pub mod relay;
pub mod s3;
pub mod tls;
pub mod token;
pub mod tree;

/// Says why a test did not run, when a peer it needs is missing. CI installs
/// every peer, so there a skip is never silent: `GANTRY_REQUIRE_PEERS=1`
/// turns it into a failure.
pub fn require(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("GANTRY_REQUIRE_PEERS").is_some() {
            panic!("{tool} is required (GANTRY_REQUIRE_PEERS is set) but not installed");
        }
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// The Python of the venv `make deps` gives the oras client
/// (`target/oras-venv`), or `None` (a skip that says why).
pub fn oras_python() -> Option<std::path::PathBuf> {
    venv_python("oras.client")
}

/// The Python of the test venv (`target/oras-venv`: the oras client and
/// the Docker SDK, from PyPI) when it can import `module`, or `None` (a
/// skip that says why).
pub fn venv_python(module: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/oras-venv/bin/python");
    let ok = std::process::Command::new(&p)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(p);
    }
    if std::env::var_os("GANTRY_REQUIRE_PEERS").is_some() {
        panic!("the Python module {module} is required (GANTRY_REQUIRE_PEERS is set): run make deps");
    }
    eprintln!("skipped: the Python module {module} is not installed (make deps)");
    None
}

/// Whether we run as root (owners, devices and setuid need it).
/// A temporary directory of the test's own that the user the store runs
/// as may read and write (`GANTRY_TEST_UNPRIVILEGED` runs every command as
/// another user): for archives and outputs a test shares with gantry.
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    dir
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Mount points at or below `dir`, from this process's mount table (what
/// gantry mounted in the same namespace shows here too).
pub fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| std::path::Path::new(p).starts_with(&dir))
        .collect()
}
