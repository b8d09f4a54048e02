//! `gantry import`: an image from a root filesystem tarball, printed as
//! its ID (as `docker import` does).

use crate::context::Context;
use anyhow::{Context as _, Result};
use gantry_core::import::{ImportOptions, Importer};
use std::io::IsTerminal;
use std::process::ExitCode;

pub fn run(
    ctx: &Context,
    file: &str,
    reference: Option<&str>,
    changes: Vec<String>,
    message: Option<String>,
    platform: Option<&str>,
) -> Result<ExitCode> {
    // Every argument is checked before the tarball is opened.
    let options = ImportOptions::checked(reference, message, file, changes, platform)?;
    let importer = Importer {
        store: &ctx.store,
        driver: ctx.driver()?,
        max_layer_bytes: ctx.config.max_layer_size_mib << 20,
    };
    let id = if file == "-" {
        let stdin = std::io::stdin();
        if stdin.is_terminal() {
            anyhow::bail!("requested import from stdin, but stdin is a terminal (hint: pipe a tarball in)");
        }
        importer.import(stdin, &options)?
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("opening {}", gantry_core::text::escape_line(file)))?;
        importer.import(f, &options)?
    };
    println!("{id}");
    Ok(ExitCode::SUCCESS)
}
