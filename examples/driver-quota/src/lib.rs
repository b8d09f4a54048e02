//! gantry-driver-quota: a graph driver that enforces disk quotas, written
//! only against `gantry-kit`.
//!
//! Layers are full trees like vfs (`layers/<id>`: a read-only layer shares
//! its parent's files by hard link, a writable one copies them), and each
//! layer's own bytes are recorded in `usage/<id>`. Two options from the
//! driver's config table bound them:
//!
//! ```toml
//! [driver]
//! type = "quota"
//! path = "…/gantry_driver_quota.wasm"
//! options = { max_layer_mib = "512", max_total_mib = "20480" }
//! ```
//!
//! A layer over `max_layer_mib`, or one that would take the store over
//! `max_total_mib`, is removed again and refused with `denied`, so a pull
//! that would fill the disk stops at the layer that crosses the line.

use gantry_kit::driver::ByteStream;
use gantry_kit::driver::{fs, Change, Driver, Error, WhiteoutMode};
use std::cell::Cell;

const MIB: u64 = 1 << 20;

thread_local! {
    static MAX_LAYER: Cell<u64> = const { Cell::new(u64::MAX) };
    static MAX_TOTAL: Cell<u64> = const { Cell::new(u64::MAX) };
}

fn check_id(id: &str) -> Result<(), Error> {
    let ok =
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid layer id {id:?}")))
    }
}

fn layer(id: &str) -> Result<String, Error> {
    check_id(id)?;
    Ok(format!("layers/{id}"))
}

fn usage_of(id: &str) -> Result<u64, Error> {
    match fs::read_file(&format!("usage/{id}")) {
        Ok(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse()
            .map_err(|_| Error::Invalid(format!("usage/{id} is not a number"))),
        Err(Error::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

fn total_usage() -> Result<u64, Error> {
    let mut total = 0u64;
    for id in fs::list_dir("usage")? {
        total = total.saturating_add(usage_of(&id)?);
    }
    Ok(total)
}

fn parse_mib(key: &str, value: &str) -> Result<u64, Error> {
    value
        .parse::<u64>()
        .map(|m| m.saturating_mul(MIB))
        .map_err(|_| Error::Invalid(format!("option {key} must be a whole number of MiB, not {value:?}")))
}

fn make(id: &str, parent: Option<String>, copy: fn(&str, &str) -> Result<(), Error>) -> Result<(), Error> {
    let target = layer(id)?;
    if fs::exists(&target)? {
        return Err(Error::Invalid(format!("layer {id} already exists")));
    }
    match parent {
        Some(p) => copy(&layer(&p)?, &target),
        None => fs::mkdir_all(&target, 0o755),
    }
}

struct Quota;

impl Driver for Quota {
    fn init(options: Vec<(String, String)>) -> Result<(), Error> {
        for (k, v) in &options {
            match k.as_str() {
                "max_layer_mib" => MAX_LAYER.set(parse_mib(k, v)?),
                "max_total_mib" => MAX_TOTAL.set(parse_mib(k, v)?),
                other => return Err(Error::Invalid(format!("unknown option {other:?}"))),
            }
        }
        fs::mkdir_all("layers", 0o700)?;
        fs::mkdir_all("usage", 0o700)
    }

    fn create(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, fs::share_tree)
    }

    fn create_read_write(id: String, parent: Option<String>) -> Result<(), Error> {
        make(&id, parent, fs::copy_tree)
    }

    fn remove(id: String) -> Result<(), Error> {
        fs::remove_all(&layer(&id)?)?;
        fs::remove_all(&format!("usage/{id}"))
    }

    fn get(id: String, _mount_label: String) -> Result<String, Error> {
        let d = layer(&id)?;
        if !fs::exists(&d)? {
            return Err(Error::NotFound(format!("layer {id} does not exist")));
        }
        Ok(d)
    }

    fn exists(id: String) -> bool {
        layer(&id).and_then(|d| fs::exists(&d)).unwrap_or(false)
    }

    fn status() -> Vec<(String, String)> {
        let show = |v: u64| {
            if v == u64::MAX {
                "none".to_string()
            } else {
                format!("{} MiB", v / MIB)
            }
        };
        vec![
            ("Driver".into(), "quota".into()),
            ("Max layer".into(), show(MAX_LAYER.get())),
            ("Max total".into(), show(MAX_TOTAL.get())),
            (
                "Used".into(),
                total_usage()
                    .map(|u| format!("{u} bytes"))
                    .unwrap_or_else(|e| format!("{e:?}")),
            ),
        ]
    }

    /// Unpacks, then holds the layer to the quotas: over either, the
    /// layer's files go again and the call is `denied`.
    fn apply_diff(id: String, _parent: Option<String>, diff: &ByteStream) -> Result<u64, Error> {
        let before = total_usage()?;
        let size = fs::unpack(&layer(&id)?, diff, WhiteoutMode::Delete)?;
        let (max_layer, max_total) = (MAX_LAYER.get(), MAX_TOTAL.get());
        let refusal = if size > max_layer {
            Some(format!(
                "layer {id} holds {size} bytes, over the quota of {} MiB per layer",
                max_layer / MIB
            ))
        } else if before.saturating_add(size) > max_total {
            Some(format!(
                "layer {id} ({size} bytes) would take the store to {} bytes, over the quota of {} MiB",
                before.saturating_add(size),
                max_total / MIB
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            fs::remove_all(&layer(&id)?)?;
            return Err(Error::Denied(why));
        }
        fs::write_file(&format!("usage/{id}"), size.to_string().as_bytes(), 0o600)?;
        Ok(size)
    }

    fn diff(id: String, parent: Option<String>) -> Result<ByteStream, Error> {
        match parent {
            None => fs::pack(&layer(&id)?),
            Some(p) => fs::pack_changes(&layer(&p)?, &layer(&id)?),
        }
    }

    fn changes(id: String, parent: Option<String>) -> Result<Vec<Change>, Error> {
        match parent {
            Some(p) => fs::changes(&layer(&p)?, &layer(&id)?),
            None => {
                fs::mkdir_all("empty", 0o700)?;
                fs::changes("empty", &layer(&id)?)
            }
        }
    }

    fn diff_size(id: String, parent: Option<String>) -> Result<u64, Error> {
        match parent {
            None => fs::disk_usage(&layer(&id)?),
            // What the layer itself wrote, as recorded when it was applied.
            Some(_) => usage_of(&id),
        }
    }
}

gantry_kit::export_driver!(Quota);
