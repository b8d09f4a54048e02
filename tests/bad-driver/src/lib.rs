//! A driver component that misbehaves on purpose, for the sandbox tests.
//!
//! Its `mode` option picks what `apply-diff` does: `trap` panics, `loop`
//! spins forever, `alloc` allocates without end, `escape` tries to read and
//! write files outside its home (through the host's `fs` and through WASI),
//! `device` writes and reads through a device node the layer carries
//! (`disk`), `fifo` reads a FIFO the layer carries (`pipe`), `sleep` sleeps
//! an hour, `host-loop` calls the host's tree operations without end,
//! `handles` opens packs and never reads them, `truncate` writes a file
//! that shares its inode with another layer's, `foreign-path` applies
//! layers but answers `get` with a path outside its home, `wrong-size`
//! applies them but lies about how much it wrote, `mount` tries overlay
//! mounts of `/`, of paths outside its home and through links out of it,
//! and removing a directory that holds a mount, `mount-leak` makes a good
//! mount and then traps without unmounting it. Every mode reports success
//! only if the attack got through; the tests expect each call to fail.
//! Everything else behaves enough like a driver for a pull to reach
//! `apply-diff`.

gantry_kit::wit_bindgen::generate!({
    path: "../../wit",
    world: "driver-plugin",
    runtime_path: "gantry_kit::wit_bindgen::rt",
});

use exports::gantry::plugin::driver::Guest;
use gantry::plugin::fs::{self, Change};
use gantry::plugin::types::{ByteStream, Error};
use std::cell::RefCell;

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Bad;

fn unsupported<T>() -> Result<T, Error> {
    Err(Error::Unsupported("not implemented by the bad driver".into()))
}

impl Guest for Bad {
    fn init(options: Vec<(String, String)>) -> Result<(), Error> {
        let mode = options
            .into_iter()
            .find(|(k, _)| k == "mode")
            .map(|(_, v)| v)
            .unwrap_or_default();
        MODE.with(|m| *m.borrow_mut() = mode);
        fs::mkdir_all("dir", 0o700)
    }

    fn create(id: String, _parent: Option<String>) -> Result<(), Error> {
        fs::mkdir_all(&format!("dir/{id}"), 0o755)
    }

    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        Self::create(id, parent)
    }

    fn remove(id: String) -> Result<(), Error> {
        fs::remove_all(&format!("dir/{id}"))
    }

    fn get(id: String, _mount_label: String) -> Result<String, Error> {
        if MODE.with(|m| m.borrow().as_str() == "foreign-path") {
            // A path outside the home: the host must refuse it.
            return Ok("../../../etc".into());
        }
        Ok(format!("dir/{id}"))
    }

    fn put(_id: String) -> Result<(), Error> {
        Ok(())
    }

    fn exists(id: String) -> bool {
        fs::exists(&format!("dir/{id}")).unwrap_or(false)
    }

    fn status() -> Vec<(String, String)> {
        Vec::new()
    }

    fn apply_diff(id: String, _parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        let layer = format!("dir/{id}");
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "device" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                // Writing replaces the name; it must never write the device.
                fs::write_file(&format!("{layer}/disk"), b"PWNED-BY-THE-DRIVER", 0o600)?;
                // Reading a device must be refused, not read.
                let got = fs::read_file(&format!("{layer}/disk2"))?;
                Ok(got.len() as u64)
            }
            "fifo" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                let got = fs::read_file(&format!("{layer}/pipe"))?;
                Ok(got.len() as u64)
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(0)
            }
            "foreign-path" => fs::unpack(&layer, diff, fs::WhiteoutMode::Delete),
            "wrong-size" => Ok(fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)? * 1000 + 1),
            "host-loop" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                let mut n = 0u64;
                loop {
                    n += fs::disk_usage(&layer)?;
                    let copy = format!("dir/copy-{}", n % 2);
                    fs::remove_all(&copy)?;
                    fs::copy_tree(&layer, &copy)?;
                }
            }
            "handles" => {
                let mut kept = Vec::new();
                loop {
                    kept.push(fs::pack("dir")?);
                }
            }
            "truncate" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                let twin = format!("dir/{id}-twin");
                fs::share_tree(&layer, &twin)?;
                fs::write_file(&format!("{twin}/etc/control"), b"EDITED", 0o644)?;
                let original = fs::read_file(&format!("{layer}/etc/control"))?;
                if original == b"EDITED" {
                    Ok(1)
                } else {
                    Err(Error::Denied("write-file left the shared inode intact".into()))
                }
            }
            "mount" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                let _ = fs::symlink("/", "dir/to-root");
                let _ = fs::symlink("/etc", "dir/to-etc");
                fs::mkdir_all("dir/m", 0o700)?;
                let m = |target: &str, lowers: &[&str], upper: Option<&str>| fs::OverlayMount {
                    target: target.into(),
                    lowers: lowers.iter().map(|l| l.to_string()).collect(),
                    upper: upper.map(str::to_string),
                    work: upper.map(|_| "dir/work".to_string()),
                };
                let _ = fs::mkdir_all("dir/work", 0o700);
                fs::mkdir_all("dir/low", 0o700)?;
                let attempts = [
                    ("mount of /", m("/", &[&layer, "dir/low"], None)),
                    ("mount over the home", m("", &[&layer, "dir/low"], None)),
                    ("mount over the home (.)", m(".", &[&layer, "dir/low"], None)),
                    ("mount outside the home", m("../..", &[&layer, "dir/low"], None)),
                    ("mount through a link", m("dir/to-root/tmp", &[&layer, "dir/low"], None)),
                    ("lower /", m("dir/m", &["/"], None)),
                    ("lower /etc", m("dir/m", &["/etc", &layer], None)),
                    ("lower outside", m("dir/m", &["../../..", &layer], None)),
                    ("lower through a link", m("dir/m", &["dir/to-etc", "dir/low"], None)),
                    (
                        "lower through a link below",
                        m("dir/m", &["dir/to-root/etc", "dir/low"], None),
                    ),
                    ("upper through a link", m("dir/m", &[&layer], Some("dir/to-root/tmp"))),
                ];
                let mut got = Vec::new();
                for (what, spec) in &attempts {
                    if fs::mount_overlay(spec).is_ok() {
                        got.push(what.to_string());
                    }
                }
                // A good mount, then the directory holding it may not be removed
                // (that would delete through the mount) nor renamed.
                fs::mount_overlay(&m("dir/m", &[&layer, "dir/low"], None))?;
                if fs::remove_all("dir/m").is_ok() || fs::remove_all("dir").is_ok() {
                    got.push("removed a directory holding a mount".into());
                }
                if fs::rename("dir/m", "dir/moved").is_ok() {
                    got.push("renamed a mount point".into());
                }
                // Stacking another mount on or in it is refused too.
                if fs::mount_overlay(&m("dir/m", &["dir/low", &layer], None)).is_ok() {
                    got.push("mounted other directories on a mounted target".into());
                }
                if fs::unmount("dir/never-mounted").is_ok() {
                    got.push("unmounted what it never mounted".into());
                }
                fs::unmount("dir/m")?;
                if got.is_empty() {
                    Err(Error::Denied("every hostile mount was refused".into()))
                } else {
                    Ok(got.len() as u64)
                }
            }
            "mount-leak" => {
                fs::unpack(&layer, diff, fs::WhiteoutMode::Delete)?;
                fs::mkdir_all("dir/leak", 0o700)?;
                fs::mkdir_all("dir/low", 0o700)?;
                fs::mount_overlay(&fs::OverlayMount {
                    target: "dir/leak".into(),
                    lowers: vec![layer.clone(), "dir/low".into()],
                    upper: None,
                    work: None,
                })?;
                panic!("deliberate trap with a mount held")
            }
            "trap" => panic!("deliberate trap in apply-diff"),
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "escape" => {
                let mut got = Vec::new();
                for p in ["../secret", "../../secret", "dir/../../secret", "/secret"] {
                    if let Ok(b) = fs::read_file(p) {
                        got.push(format!("host fs read {p}: {}", String::from_utf8_lossy(&b)));
                    }
                    if fs::write_file(p, b"escaped", 0o644).is_ok() {
                        got.push(format!("host fs wrote {p}"));
                    }
                }
                let _ = fs::mkdir_all("dir", 0o700);
                let _ = fs::symlink("/", "dir/to-root");
                if fs::read_file("dir/to-root/etc/passwd").is_ok() {
                    got.push("host fs followed a link out".into());
                }
                if std::fs::read("/etc/passwd").is_ok() {
                    got.push("wasi read /etc/passwd".into());
                }
                if got.is_empty() {
                    Err(Error::Denied("every attempt to leave the home was refused".into()))
                } else {
                    // The test fails if the pull ever gets this far.
                    Ok(got.len() as u64)
                }
            }
            other => Err(Error::Invalid(format!("unknown mode {other:?}"))),
        }
    }

    fn diff(_id: String, _parent: Option<String>) -> Result<ByteStream, Error> {
        unsupported()
    }

    fn changes(_id: String, _parent: Option<String>) -> Result<Vec<Change>, Error> {
        unsupported()
    }

    fn diff_size(_id: String, _parent: Option<String>) -> Result<u64, Error> {
        unsupported()
    }

    fn cleanup() -> Result<(), Error> {
        Ok(())
    }
}

export!(Bad);
