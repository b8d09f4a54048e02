//! A driver component that misbehaves on purpose, for the sandbox tests.
//!
//! Its `mode` option picks what `apply-diff` does: `trap` panics, `loop`
//! spins forever, `alloc` allocates without end, `escape` tries to read and
//! write files outside its home (through the host's `fs` and through WASI)
//! and reports success only if it managed to. Everything else behaves
//! enough like a driver for a pull to reach `apply-diff`.

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

    fn apply_diff(_id: String, _parent: Option<String>, _diff: &ByteStream) -> Result<u64, Error> {
        match MODE.with(|m| m.borrow().clone()).as_str() {
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
