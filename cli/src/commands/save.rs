//! `gantry save`: images as a `docker save` or OCI archive, to a file
//! (written beside it and renamed, so a failure leaves no half archive) or
//! to standard output.

use crate::cli::SaveFormat;
use crate::context::Context;
use anyhow::{bail, Context as _, Result};
use gantry_core::save::{save, Format};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

pub fn run(ctx: &Context, images: &[String], output: Option<&Path>, format: SaveFormat) -> Result<ExitCode> {
    let format = match format {
        SaveFormat::Docker => Format::Docker,
        SaveFormat::Oci => Format::Oci,
    };
    match output {
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!("cowardly refusing to save to a terminal (hint: use -o FILE or redirect standard output)");
            }
            let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            save(&ctx.store, ctx.driver()?, images, format, &mut out)?;
            out.flush().context("writing the archive")?;
        }
        Some(path) => {
            let parent = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let tmp =
                tempfile::NamedTempFile::new_in(parent).with_context(|| format!("creating {}", path.display()))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp);
            save(&ctx.store, ctx.driver()?, images, format, &mut out)?;
            let tmp = out
                .into_inner()
                .map_err(|e| e.into_error())
                .context("writing the archive")?;
            tmp.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
