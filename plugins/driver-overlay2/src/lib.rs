//! gantry-driver-overlay2: Docker's overlay2 graph driver as a sandboxed
//! component, with Docker's on-disk layout (the one containers/storage's
//! overlay driver writes too):
//!
//! ```text
//! l/<26-char short id>  -> ../<id>/diff   short links, to keep mount data small
//! <id>/diff             the layer's own files; whiteouts as 0/0 character
//!                       devices, opaque directories as trusted.overlay.opaque=y
//!                       (in a layer with a parent: a first layer has
//!                       nothing to hide, its whiteouts just delete)
//! <id>/link             the short id
//! <id>/lower            `l/<short>` of every ancestor, nearest first, ':'-joined
//! <id>/work             overlay's work directory (layers with a parent)
//! <id>/merged           where `get` mounts the layer's full tree
//! <id>/committed        the layer is read-only (Docker marks a layer so when a
//!                       child is made on it; gantry also marks image layers)
//! ```
//!
//! The component never mounts anything itself: it asks the host's `fs`
//! import (`mount-overlay`, `unmount`), which opens every directory beneath
//! the driver's home and counts users per mount. Layer bytes never cross
//! into the component: `unpack` and `pack-upper` are the host's fast paths.
//! Written against `gantry-kit`'s `Driver` trait, as a third party would.

use gantry_kit::driver::{fs, ByteStream, Change, Driver, Error, OverlayMount, WhiteoutMode};

/// Docker's limit on the layers below one layer (overlay2 `maxDepth`).
const MAX_DEPTH: usize = 128;
/// Docker's short ids are 26 base32 characters.
const SHORT_ID_LEN: usize = 26;

struct Overlay2;

fn check_id(id: &str) -> Result<(), Error> {
    if !id.is_empty()
        && id.len() <= 128
        && id != "l"
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid layer id {id:?}")))
    }
}

fn path(id: &str, leaf: &str) -> Result<String, Error> {
    check_id(id)?;
    Ok(format!("{id}/{leaf}"))
}

fn read_text(p: &str) -> Result<Option<String>, Error> {
    match fs::read_file(p) {
        Ok(b) => String::from_utf8(b)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| Error::Invalid(format!("{p} is not text"))),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `l/<short>` entries below layer `id`, nearest first.
fn lowers_of(id: &str) -> Result<Vec<String>, Error> {
    Ok(match read_text(&path(id, "lower")?)? {
        Some(l) if !l.is_empty() => l.split(':').map(str::to_string).collect(),
        _ => Vec::new(),
    })
}

fn link_of(id: &str) -> Result<String, Error> {
    read_text(&path(id, "link")?)?.ok_or_else(|| Error::NotFound(format!("layer {id} has no link file")))
}

/// A short id for `id`: 26 base32 characters of a hash of the id (and a
/// counter, on the rare collision). Docker draws them at random; any unique
/// name works, since the `link` file records it.
fn short_id(id: &str, n: u32) -> String {
    const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(SHORT_ID_LEN);
    let mut round = 0u64;
    while out.len() < SHORT_ID_LEN {
        // FNV-1a over (round, n, id): 12 characters from each 64-bit round.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in round
            .to_le_bytes()
            .iter()
            .chain(n.to_le_bytes().iter())
            .chain(id.as_bytes())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for i in 0..12 {
            if out.len() < SHORT_ID_LEN {
                out.push(B32[((h >> (i * 5)) & 31) as usize] as char);
            }
        }
        round += 1;
    }
    out
}

fn make(id: &str, parent: Option<String>, read_only: bool) -> Result<(), Error> {
    check_id(id)?;
    if fs::exists(id)? {
        return Err(Error::Invalid(format!("layer {id} already exists")));
    }
    // The chain below is checked before anything is written.
    let lower = match &parent {
        None => None,
        Some(p) => {
            if !fs::exists(p)? {
                return Err(Error::NotFound(format!("parent layer {p} does not exist")));
            }
            let mut chain = vec![format!("l/{}", link_of(p)?)];
            chain.extend(lowers_of(p)?);
            if chain.len() > MAX_DEPTH {
                return Err(Error::Invalid(format!("max depth exceeded: {} layers", chain.len())));
            }
            Some(chain.join(":"))
        }
    };
    fs::mkdir_all(&path(id, "diff")?, 0o755)?;
    let mut n = 0;
    let lid = loop {
        let lid = short_id(id, n);
        if !fs::exists(&format!("l/{lid}"))? {
            break lid;
        }
        n += 1;
    };
    fs::symlink(&format!("../{id}/diff"), &format!("l/{lid}"))?;
    fs::write_file(&path(id, "link")?, lid.as_bytes(), 0o644)?;
    if read_only {
        fs::write_file(&path(id, "committed")?, b"", 0o600)?;
    }
    if let (Some(p), Some(lower)) = (&parent, lower) {
        fs::mkdir_all(&path(id, "work")?, 0o700)?;
        // Docker marks the parent read-only here; an image layer already is.
        if !fs::exists(&path(p, "committed")?)? {
            fs::write_file(&path(p, "committed")?, b"", 0o600)?;
        }
        fs::write_file(&path(id, "lower")?, lower.as_bytes(), 0o644)?;
    }
    Ok(())
}

impl Driver for Overlay2 {
    fn init(_options: Vec<(String, String)>) -> Result<(), Error> {
        fs::mkdir_all("l", 0o700)
    }

    fn create(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, true)
    }

    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, false)
    }

    fn remove(id: String) -> Result<(), Error> {
        check_id(&id)?;
        if let Ok(lid) = link_of(&id) {
            if lid.len() == SHORT_ID_LEN && lid.bytes().all(|b| b.is_ascii_alphanumeric()) {
                fs::remove_all(&format!("l/{lid}"))?;
            }
        }
        fs::remove_all(&id)
    }

    /// A layer without a parent is its own diff; any other is mounted at
    /// `merged`: read-only from its diff and lowers when committed, else
    /// writable with the diff as upper (Docker's rule).
    fn get(id: String, _mount_label: String) -> Result<String, Error> {
        check_id(&id)?;
        if !fs::exists(&id)? {
            return Err(Error::NotFound(format!("layer {id} does not exist")));
        }
        let lowers = lowers_of(&id)?;
        let diff = path(&id, "diff")?;
        if lowers.is_empty() {
            return Ok(diff);
        }
        let merged = path(&id, "merged")?;
        fs::mkdir_all(&merged, 0o700)?;
        let read_only = fs::exists(&path(&id, "committed")?)?;
        let m = if read_only {
            OverlayMount {
                target: merged.clone(),
                lowers: std::iter::once(diff).chain(lowers).collect(),
                upper: None,
                work: None,
            }
        } else {
            OverlayMount {
                target: merged.clone(),
                lowers,
                upper: Some(diff),
                work: Some(path(&id, "work")?),
            }
        };
        fs::mount_overlay(&m)?;
        Ok(merged)
    }

    fn put(id: String) -> Result<(), Error> {
        if lowers_of(&id)?.is_empty() {
            return Ok(());
        }
        fs::unmount(&path(&id, "merged")?)
    }

    fn exists(id: String) -> bool {
        check_id(&id).and_then(|()| fs::exists(&id)).unwrap_or(false)
    }

    fn status() -> Vec<(String, String)> {
        vec![
            ("Driver".into(), "overlay2".into()),
            ("Supports d_type".into(), "true".into()),
            ("Native Overlay Diff".into(), "true".into()),
            ("userxattr".into(), "false".into()),
        ]
    }

    /// Whiteouts become overlay's own only where there is something
    /// beneath to hide: a layer with no lowers is its own tree (`get`
    /// returns its diff directory), so there they delete, as on vfs, and
    /// no whiteout device or opaque attribute is ever left to be seen.
    fn apply_diff(id: String, _parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        let mode = if lowers_of(&id)?.is_empty() {
            WhiteoutMode::Delete
        } else {
            WhiteoutMode::Overlay
        };
        fs::unpack(&path(&id, "diff")?, diff, mode)
    }

    /// The layer's own diff directory, whiteouts turned back into `.wh.`
    /// files. Only against the layer's own parent: that is what it holds.
    fn diff(id: String, parent: Option<String>) -> Result<ByteStream, Error> {
        check_parent(&id, parent.as_deref())?;
        fs::pack_upper(&path(&id, "diff")?)
    }

    fn changes(id: String, parent: Option<String>) -> Result<Vec<Change>, Error> {
        check_parent(&id, parent.as_deref())?;
        let Some(p) = parent else {
            fs::mkdir_all("empty", 0o700)?;
            return fs::changes("empty", &path(&id, "diff")?);
        };
        // Compare the two full trees, each as mounted.
        let upper = Self::get(id.clone(), String::new())?;
        let r = Self::get(p.clone(), String::new()).and_then(|lower| {
            let r = fs::changes(&lower, &upper);
            let _ = Self::put(p);
            r
        });
        let _ = Self::put(id);
        r
    }

    fn diff_size(id: String, parent: Option<String>) -> Result<u64, Error> {
        check_parent(&id, parent.as_deref())?;
        fs::disk_usage(&path(&id, "diff")?)
    }

    fn cleanup() -> Result<(), Error> {
        Ok(())
    }
}

/// `parent` must be the layer's own parent (or none for a base layer).
fn check_parent(id: &str, parent: Option<&str>) -> Result<(), Error> {
    let first = lowers_of(id)?.into_iter().next();
    let expected = match parent {
        None => None,
        Some(p) => Some(format!("l/{}", link_of(p)?)),
    };
    if first != expected {
        return Err(Error::Unsupported(format!(
            "overlay2 diffs a layer against its own parent only ({id} against {parent:?})"
        )));
    }
    Ok(())
}

gantry_kit::export_driver!(Overlay2);
