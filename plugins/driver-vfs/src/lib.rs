//! gantry-driver-vfs: Docker's vfs graph driver as a sandboxed component.
//!
//! Each layer is a full directory under `dir/<id>` in the driver's home: its
//! parent's tree (files shared by hard link for read-only layers, copied for
//! writable ones) with the layer's diff applied, whiteouts deleting what
//! they name. All file work goes through the host's confined `fs` import and
//! its native fast paths (`copy-tree`, `unpack`, `pack`), so layer bytes
//! never cross into this component and it cannot touch anything outside
//! its home.
//!
//! It is built against the frozen contract `wit/since_v0.1.0/` on purpose:
//! it needs nothing newer, and it keeps an old guest loading in every build.

gantry_kit::wit_bindgen::generate!({
    path: "../../wit/since_v0.1.0",
    world: "driver-plugin",
    runtime_path: "gantry_kit::wit_bindgen::rt",
});

use exports::gantry::plugin::driver::Guest;
use gantry::plugin::fs::{self, Change, WhiteoutMode};
use gantry::plugin::types::{ByteStream, Error};

struct Vfs;

fn make(id: &str, parent: Option<String>, copy: fn(&str, &str) -> Result<(), Error>) -> Result<(), Error> {
    let target = dir(id)?;
    if fs::exists(&target)? {
        return Err(Error::Invalid(format!("layer {id} already exists")));
    }
    match parent {
        Some(p) => copy(&dir(&p)?, &target),
        None => fs::mkdir_all(&target, 0o755),
    }
}

fn check_id(id: &str) -> Result<(), Error> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid layer id {id:?}")))
    }
}

fn dir(id: &str) -> Result<String, Error> {
    check_id(id)?;
    Ok(format!("dir/{id}"))
}

impl Guest for Vfs {
    fn init(_options: Vec<(String, String)>) -> Result<(), Error> {
        fs::mkdir_all("dir", 0o700)
    }

    /// A read-only layer: the parent's files are shared (hard-linked), which
    /// `unpack` never edits in place. Docker's vfs copies them; the result
    /// is the same tree at a fraction of the time and disk.
    fn create(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, fs::share_tree)
    }

    /// A writable layer: a full copy, so writes never reach the parent.
    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, fs::copy_tree)
    }

    fn remove(id: String) -> Result<(), Error> {
        fs::remove_all(&dir(&id)?)
    }

    fn get(id: String, _mount_label: String) -> Result<String, Error> {
        let d = dir(&id)?;
        if !fs::exists(&d)? {
            return Err(Error::NotFound(format!("layer {id} does not exist")));
        }
        Ok(d)
    }

    fn put(_id: String) -> Result<(), Error> {
        Ok(())
    }

    fn exists(id: String) -> bool {
        dir(&id).and_then(|d| fs::exists(&d)).unwrap_or(false)
    }

    fn status() -> Vec<(String, String)> {
        vec![("Driver".into(), "vfs".into())]
    }

    fn apply_diff(id: String, _parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        fs::unpack(&dir(&id)?, diff, WhiteoutMode::Delete)
    }

    fn diff(id: String, parent: Option<String>) -> Result<ByteStream, Error> {
        match parent {
            None => fs::pack(&dir(&id)?),
            Some(p) => fs::pack_changes(&dir(&p)?, &dir(&id)?),
        }
    }

    fn changes(id: String, parent: Option<String>) -> Result<Vec<Change>, Error> {
        match parent {
            Some(p) => fs::changes(&dir(&p)?, &dir(&id)?),
            None => {
                // Everything is an addition relative to nothing.
                fs::mkdir_all("empty", 0o700)?;
                fs::changes("empty", &dir(&id)?)
            }
        }
    }

    fn diff_size(id: String, parent: Option<String>) -> Result<u64, Error> {
        match parent {
            None => fs::disk_usage(&dir(&id)?),
            Some(_) => {
                let s = Self::diff(id, parent)?;
                let mut n = 0u64;
                loop {
                    let c = s.read(1 << 20)?;
                    if c.is_empty() {
                        return Ok(n);
                    }
                    n += c.len() as u64;
                }
            }
        }
    }

    fn cleanup() -> Result<(), Error> {
        Ok(())
    }
}

export!(Vfs);
