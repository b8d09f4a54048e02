//! A misbehaving plugin per sandbox promise: a driver and a transport
//! component that attack the host, one mode per attack. Each call fails
//! cleanly within its deadline with one line, nothing outside the driver's
//! home changes (a canary block device on a loop file, a canary FIFO), and
//! the next pull on the same store works.

use crate::{control_image, docker_config, peers, publish};
use gantry_tests::gantry::{binary, Gantry};
use gantry_tests::image::{Image, Layer};
use gantry_tests::registry::Registry;
use gantry_tests::{is_root, require};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) fn component(name: &str) -> PathBuf {
    let wasm = binary()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join(format!("wasm32-wasip2/release/{name}.wasm"));
    assert!(
        wasm.is_file(),
        "{} is missing: build the plugins first (make plugins)",
        wasm.display()
    );
    wasm
}

const LIMITS: &str = "[limits]\nmemory_mib = 32\ncpu_seconds = 1.0\nwall_seconds = 3.0\nhandles = 16\n";

fn bad_driver_config(mode: &str) -> String {
    format!(
        "[transport]\ntype = \"v2\"\n\n[driver]\ntype = \"bad\"\npath = \"{}\"\noptions = {{ mode = \"{mode}\" }}\n\n{LIMITS}",
        component("gantry_bad_driver").display()
    )
}

/// Pulls `name` with a config, expecting one error line containing
/// `expect`, within `within`. Returns the line.
fn pull_fails(g: &Gantry, config: &str, tag: &str, name: &str, expect: &str, within: Duration) -> String {
    pull_fails_with_auth(
        g,
        config,
        tag,
        name,
        expect,
        within,
        &g.scratch().join("no-docker-config"),
    )
}

/// [`pull_fails`] with `DOCKER_CONFIG` set to `docker_config`.
fn pull_fails_with_auth(
    g: &Gantry,
    config: &str,
    tag: &str,
    name: &str,
    expect: &str,
    within: Duration,
    docker_config: &Path,
) -> String {
    let file = g.scratch().join(format!("{tag}.toml"));
    std::fs::write(&file, config).unwrap();
    let mut c = std::process::Command::new(binary());
    c.arg("--root").arg(g.root_path()).arg("--config").arg(&file);
    c.env("DOCKER_CONFIG", docker_config).env("TMPDIR", g.tmpdir.path());
    let started = Instant::now();
    let out = c.arg("pull").arg(name).output().unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{tag}: {} ({took:?})", err.trim());
    assert!(!out.status.success(), "{tag}: the pull should fail");
    assert_eq!(err.trim().lines().count(), 1, "{tag}: one error line: {err}");
    assert!(err.contains(expect), "{tag}: expected {expect:?} in {err}");
    assert!(!err.contains("BREACH"), "{tag}: {err}");
    assert!(took < within, "{tag}: took {took:?}, more than {within:?}");
    err
}

/// A loop device on a file of zeros: what a device node in a layer points at.
struct Canary {
    file: PathBuf,
    dev: String,
}

impl Canary {
    fn new(dir: &Path) -> Option<Canary> {
        if !is_root() || !require("losetup") {
            eprintln!("skipped: the device canary needs root and losetup");
            return None;
        }
        let file = dir.join("canary.img");
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("skipped: losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Some(Canary { file, dev })
    }

    fn major_minor(&self) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&self.dev).unwrap().rdev();
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        (major as u32, minor as u32)
    }

    fn untouched(&self) -> bool {
        let dev = std::fs::read(&self.dev).unwrap_or_default();
        let file = std::fs::read(&self.file).unwrap();
        file.iter().all(|b| *b == 0) && dev.iter().take(4096).all(|b| *b == 0)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn each_driver_attack_fails_cleanly_and_the_next_pull_works() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let name = format!("{}/test/control:v1", reg.addr());
    let g = Gantry::new();
    // Beside the store root, inside the test's own directory: where "../../secret" from the home lands.
    let secret = g.root_path().parent().unwrap().join("secret");
    std::fs::write(&secret, "do not read").unwrap();
    // A FIFO outside the home that nothing may open.
    let canary_fifo = g.scratch().join("canary.fifo");
    let c_path = std::ffi::CString::new(canary_fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let canary = Canary::new(&g.scratch());
    let special = |layer: Layer| {
        Image::new(vec![layer
            .dir("etc", 0o755)
            .file("etc/control", 0o644, b"control\n")
            .tar()])
    };
    if let Some(c) = &canary {
        let (major, minor) = c.major_minor();
        publish(
            &reg,
            "test/special",
            "device",
            &special(
                Layer::new()
                    .device("disk", true, major, minor)
                    .device("disk2", true, major, minor),
            ),
        );
    }
    publish(&reg, "test/special", "fifo", &special(Layer::new().fifo("pipe")));
    let within = Duration::from_secs(20);
    let mut cases = vec![
        (
            "trap",
            name.clone(),
            "plugin driver/bad trapped in apply-diff: panicked at tests/bad-driver/src/lib.rs",
        ),
        ("loop", name.clone(), "plugin driver/bad ran past its CPU deadline"),
        (
            "alloc",
            name.clone(),
            "plugin driver/bad exceeded its memory limit of 32 MiB",
        ),
        ("escape", name.clone(), "every attempt to leave the home was refused"),
        (
            "sleep",
            name.clone(),
            "plugin driver/bad ran past its CPU deadline of 1s",
        ),
        (
            "host-loop",
            name.clone(),
            "plugin driver/bad ran past its wall-clock deadline of 3s",
        ),
        (
            "handles",
            name.clone(),
            "plugin driver/bad holds more than 16 open handles",
        ),
        ("truncate", name.clone(), "write-file left the shared inode intact"),
        ("mount", name.clone(), "every hostile mount was refused"),
        (
            "mount-leak",
            name.clone(),
            "plugin driver/bad trapped in apply-diff: panicked at tests/bad-driver/src/lib.rs",
        ),
        ("wrong-size", name.clone(), "driver bad said it applied"),
        (
            "fifo",
            format!("{}/test/special:fifo", reg.addr()),
            "\"pipe\" is not a regular file",
        ),
    ];
    if canary.is_some() {
        cases.push((
            "device",
            format!("{}/test/special:device", reg.addr()),
            "\"disk2\" is not a regular file",
        ));
    }
    for (mode, image, expect) in cases {
        // The bad driver runs on the same store root as the good one.
        pull_fails(&g, &bad_driver_config(mode), mode, &image, expect, within);
        // Whatever the driver mounted is gone with the process that made it.
        assert_eq!(
            gantry_tests::mounts_under(g.root_path()),
            Vec::<String>::new(),
            "{mode}: mounts left behind"
        );
        // The host and the store carry on: the next pull with the real driver works.
        g.ok(&["pull", &name]);
        g.fsck_clean();
        g.ok(&["rmi", &name]);
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "do not read");
    if let Some(c) = &canary {
        assert!(c.untouched(), "the canary block device was written");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&canary_fifo).unwrap().file_type().is_fifo());
    g.assert_tmpdir_untouched();
}

#[test]
fn each_transport_attack_is_refused_by_the_host() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    publish(&reg, "test/control", "v1", &control_image());
    let name = format!("{}/test/control:v1", reg.addr());
    let g = Gantry::new();
    g.ok(&["pull", &name]);
    // An internal service on another loopback address: nothing may reach it.
    let service = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let port = service.local_addr().unwrap().port();
    service.set_nonblocking(true).unwrap();
    let config = format!(
        "[transport]\ntype = \"bad\"\npath = \"{}\"\n\n[driver]\ntype = \"auto\"\n\n{LIMITS}",
        component("gantry_bad_transport").display()
    );
    let within = Duration::from_secs(20);
    for (mode, expect) in [
        ("host-header", "may not set the Host header"),
        ("transfer-encoding", "may not set the Transfer-Encoding header"),
        ("delete", "HTTP method DELETE is not allowed"),
        ("put-body", "HTTP method PUT is not allowed"),
        ("post-body", "POST is allowed only to the registry's token realm"),
        (&*format!("internal-{port}"), "may not connect to http://127.0.0.2"),
        ("handles", "plugin transport/bad holds more than 16 open handles"),
        ("sleep", "plugin transport/bad ran past its CPU deadline of 1s"),
    ] {
        let before = g.store_listing();
        pull_fails(
            &g,
            &config,
            "transport",
            &format!("{}/attack/{mode}:v1", reg.addr()),
            expect,
            within,
        );
        assert_eq!(before, g.store_listing(), "{mode}: the store changed");
        g.ok(&["pull", &name]);
        g.fsck_clean();
    }
    assert!(service.accept().is_err(), "the internal service was reached");
    g.assert_tmpdir_untouched();
}

/// Credentials go to each endpoint by its own host: a mirror never gets the
/// registry's, and the registry never gets a mirror's.
#[test]
fn credentials_go_by_each_endpoint_s_own_host() {
    if !peers() {
        return;
    }
    let reg = Registry::start();
    // Nothing listens there: the transport only reports what it was handed.
    let mirror_port = gantry_tests::registry::free_port();
    let mirror = format!("127.0.0.1:{mirror_port}");
    let g = Gantry::new();
    let config = format!(
        "[transport]\ntype = \"bad\"\npath = \"{}\"\n\n[driver]\ntype = \"auto\"\n\n{LIMITS}\n[registries.\"{}\"]\nmirrors = [\"http://{mirror}\"]\n",
        component("gantry_bad_transport").display(),
        reg.addr()
    );
    for (host, user, expect_endpoint) in [
        (reg.addr(), "registry-user", format!("https://{}", reg.addr())),
        (mirror.clone(), "mirror-user", format!("http://{mirror}")),
    ] {
        let dir = docker_config(&g, &host, user, "secret");
        pull_fails_with_auth(
            &g,
            &config,
            user,
            &format!("{}/attack/credentials:v1", reg.addr()),
            &format!("endpoint {expect_endpoint} got credentials of {user}"),
            Duration::from_secs(20),
            &dir,
        );
    }
}
