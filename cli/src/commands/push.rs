//! `gantry push`: the core's push pipeline with the configured transport,
//! driver and credentials, and Docker's lines.

use crate::context::Context;
use anyhow::{bail, Context as _, Result};
use gantry_core::push::{PushProgress, Pusher};
use gantry_core::Reference;
use std::io::Write;
use std::process::ExitCode;

/// Docker's push lines, one per layer state that matters.
struct Lines {
    quiet: bool,
}

impl PushProgress for Lines {
    fn layer(&self, layer: &str, status: &str) {
        if self.quiet || status == "Preparing" || status == "Pushing" {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = if layer.is_empty() {
            writeln!(out, "{status}")
        } else {
            writeln!(out, "{layer}: {status}")
        };
    }
}

pub fn run(ctx: &Context, reference: &str, all_tags: bool, quiet: bool) -> Result<ExitCode> {
    let r = Reference::parse_name_only(reference).or_else(|_| Reference::parse(reference))?;
    if r.digest.is_some() {
        bail!("push takes a tag, not a digest: {}", r.familiar_string());
    }
    let refs: Vec<Reference> = if all_tags {
        let mut all: Vec<Reference> = ctx
            .store
            .refs
            .all()?
            .into_iter()
            .map(|(r, _)| r)
            .filter(|x| x.domain == r.domain && x.path == r.path && x.tag.is_some())
            .collect();
        all.sort_by(|a, b| a.tag.cmp(&b.tag));
        if all.is_empty() {
            bail!("an image does not exist locally with the name: {}", r.familiar_name());
        }
        all
    } else {
        vec![Reference::parse(reference)?]
    };
    let transport = ctx.transport()?;
    let credentials = ctx.credentials()?;
    let progress = Lines { quiet };
    let pusher = Pusher {
        store: &ctx.store,
        driver: ctx.driver()?,
        transport: &transport,
        registries: &ctx.config.registries,
        credentials: &credentials,
        progress: &progress,
        concurrency: ctx.config.max_concurrent_uploads,
    };
    if !quiet {
        println!("The push refers to repository [{}]", r.name());
    }
    for r in &refs {
        let o = pusher
            .push(r)
            .with_context(|| format!("pushing {}", r.familiar_string()))?;
        println!("{}: digest: {} size: {}", o.tag, o.digest, o.size);
    }
    Ok(ExitCode::SUCCESS)
}
