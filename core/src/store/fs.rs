//! Small file helpers of the store: private directories, atomic writes,
//! random ids. Only for the store's own metadata, never for layer contents.

use crate::error::{IoContext, Result};
use std::fs::{self, DirBuilder, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Creates `dir` and missing parents with mode 0700.
pub fn mkdir_private(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ctx(format!("creating {}", dir.display()))
}

/// Writes `data` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("store paths have a parent");
    let tmp = dir.join(format!(".tmp-{}", random_id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::options().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.ctx(format!("writing {}", path.display()))
}

/// `write_atomic` without the syncs: the caller makes it durable (a commit's
/// one flush of the file system).
pub fn write_atomic_unsynced(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("store paths have a parent");
    let tmp = dir.join(format!(".tmp-{}", random_id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = File::options().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res.ctx(format!("writing {}", path.display()))
}

/// 64 random hex digits, like Docker's cache ids.
pub fn random_id() -> String {
    let mut b = [0u8; 32];
    // One system call, no file descriptor: ids are made several times per layer.
    let mut filled = 0;
    while filled < b.len() {
        match rustix::rand::getrandom(&mut b[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("getrandom: {e}"),
        }
    }
    hex::encode(b)
}

/// The names in `dir` (empty when it does not exist), skipping temporaries.
pub fn list_names(dir: &Path) -> Result<Vec<String>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::Error::io(format!("listing {}", dir.display()), e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.ctx(format!("listing {}", dir.display()))?;
        if let Some(n) = e.file_name().to_str() {
            out.push(n.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a small metadata file as trimmed text.
pub fn read_text(path: &Path) -> Result<String> {
    Ok(fs::read_to_string(path)
        .ctx(format!("reading {}", path.display()))?
        .trim()
        .to_string())
}
