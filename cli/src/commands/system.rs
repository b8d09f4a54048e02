//! `gantry system df`: what the store's images take, what the store takes
//! on disk, and its quota (`max_store_gib`), as `docker system df` shows
//! the images' share of a daemon's disk.

use crate::cli::Format;
use crate::context::Context;
use crate::output::human_size;
use anyhow::Result;
use std::process::ExitCode;

pub fn df(ctx: &Context, format: Format) -> Result<ExitCode> {
    // Each layer once, however many images share it (Docker's SIZE, what
    // the daemon's `/system/df` answers).
    let du = gantry_core::images::disk_usage(&ctx.store)?;
    let (images, layers_size) = (du.images, du.layers_size);
    let store_size = gantry_core::store::quota::usage(ctx.store.root());
    let limit = ctx.store.quota().map(|q| q.limit());
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "Images": images.len(),
                "LayersSize": layers_size,
                "StoreSize": store_size,
                "Quota": limit,
            })
        ),
        Format::Table => {
            println!("{:<10}{:<10}{:<14}QUOTA", "TYPE", "TOTAL", "SIZE");
            println!("{:<10}{:<10}{:<14}", "Images", images.len(), human_size(layers_size));
            let quota = match limit {
                Some(l) => format!(
                    "{} ({:.0}% used)",
                    human_size(l),
                    store_size as f64 * 100.0 / l.max(1) as f64
                ),
                None => "none".to_string(),
            };
            println!("{:<10}{:<10}{:<14}{quota}", "Store", "", human_size(store_size));
        }
    }
    Ok(ExitCode::SUCCESS)
}
