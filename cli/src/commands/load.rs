//! `gantry load`: images from a `docker save` or OCI archive, from a file
//! (indexed and read in place) or from standard input (spooled under the
//! store root where read out of order).

use crate::context::Context;
use crate::output::PullProgress;
use anyhow::{Context as _, Result};
use gantry_core::archive::ArchiveIndex;
use gantry_core::load::Loader;
use gantry_core::platform::Platform;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

pub fn run(ctx: &Context, input: Option<&Path>, quiet: bool) -> Result<ExitCode> {
    // Bars on a terminal; otherwise only the result lines, as `docker load`.
    let progress = PullProgress::new(quiet || !std::io::stdout().is_terminal());
    let loader = Loader {
        store: &ctx.store,
        driver: ctx.driver()?,
        progress: &progress,
        max_layer_bytes: ctx.config.max_layer_size_mib << 20,
        max_depth: ctx.config.max_layer_depth,
        platform: Platform::host(),
    };
    let loaded = match input {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            loader.load(&ArchiveIndex::from_file(f)?)?
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                anyhow::bail!(
                    "requested load from stdin, but stdin is empty (hint: gantry load -i FILE, or pipe an archive in)"
                );
            }
            loader.load_stream(stdin, &ctx.store.load_spool())?
        }
    };
    if std::env::var_os("GANTRY_TIMINGS").is_some() {
        let t = loaded.times;
        eprintln!(
            "timings: create {:.3}s apply {:.3}s spooled {} bytes",
            t.create.as_secs_f64(),
            t.apply.as_secs_f64(),
            loaded.spooled
        );
    }
    for l in loaded.images {
        if l.tags.is_empty() {
            println!("Loaded image ID: {}", l.id);
        }
        for t in l.tags {
            println!("Loaded image: {}", t.familiar_string());
        }
    }
    Ok(ExitCode::SUCCESS)
}
