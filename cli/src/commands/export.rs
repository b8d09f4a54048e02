//! `gantry export`: the image's flattened root filesystem as a tar, packed
//! natively from the driver's directory for the top layer.

use crate::context::Context;
use anyhow::{Context as _, Result};
use gantry_core::images::{layers_of, lookup};
use gantry_core::GraphDriver;
use gantry_host::confined;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

pub fn run(ctx: &Context, image: &str, output: Option<&Path>) -> Result<ExitCode> {
    let id = lookup(&ctx.store, image)?;
    let (_, layers) = layers_of(&ctx.store, &id)?;
    // An image with no layers exports as an empty tar.
    let top = layers.last();
    let mut tar: Box<dyn std::io::Read> = match top {
        None => Box::new(std::io::Cursor::new(vec![0u8; 1024])),
        Some(top) => {
            let fd = ctx.driver()?.get(&top.cache_id)?;
            Box::new(confined::pack(fd).with_context(|| format!("packing layer {}", top.chain_id))?)
        }
    };
    let result = match output {
        None => {
            let mut out = std::io::stdout().lock();
            std::io::copy(&mut tar, &mut out)
                .and_then(|_| out.flush())
                .context("writing the export")
        }
        Some(path) => {
            // Through a temporary beside the target, so a failure leaves no half file.
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut tmp =
                tempfile::NamedTempFile::new_in(parent).with_context(|| format!("creating {}", path.display()))?;
            std::io::copy(&mut tar, &mut tmp).context("writing the export")?;
            tmp.persist(path)
                .map(|_| ())
                .with_context(|| format!("writing {}", path.display()))
        }
    };
    if let Some(top) = top {
        ctx.driver()?.put(&top.cache_id)?;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}
