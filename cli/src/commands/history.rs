//! `gantry history`: the image config's history with layer sizes.

use crate::context::Context;
use crate::output::{human_age, human_size, now_secs, parse_rfc3339};
use anyhow::Result;
use gantry_core::images::{layers_of, lookup};
use std::process::ExitCode;

/// One entry of an image's history: created, created by, size, comment
/// (oldest first; an empty layer's size is 0).
pub struct Entry {
    pub created: String,
    pub created_by: String,
    pub size: u64,
    pub comment: String,
}

/// The history of image `id` with each entry's layer size.
pub fn entries(ctx: &Context, id: &gantry_core::Digest) -> Result<Vec<Entry>, gantry_core::Error> {
    let (config, layers) = layers_of(&ctx.store, id)?;
    let history = config
        .raw
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    let mut sizes = layers.iter().map(|l| l.size);
    let mut rows = Vec::new();
    for h in &history {
        let empty = h.get("empty_layer").and_then(|e| e.as_bool()).unwrap_or(false);
        let size = if empty { 0 } else { sizes.next().unwrap_or(0) };
        let s = |k: &str| h.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        rows.push(Entry {
            created: s("created"),
            created_by: s("created_by"),
            size,
            comment: s("comment"),
        });
    }
    Ok(rows)
}

pub fn run(ctx: &Context, image: &str, no_trunc: bool) -> Result<ExitCode> {
    let id = lookup(&ctx.store, image)?;
    let rows: Vec<(String, String, u64, String)> = entries(ctx, &id)?
        .into_iter()
        .map(|e| (e.created, e.created_by, e.size, e.comment))
        .collect();
    let now = now_secs();
    println!(
        "{:<12}   {:<15}   {:<45}   {:<9} COMMENT",
        "IMAGE", "CREATED", "CREATED BY", "SIZE"
    );
    for (i, (created, by, size, comment)) in rows.iter().rev().enumerate() {
        let img = if i == 0 {
            id.short().to_string()
        } else {
            "<missing>".to_string()
        };
        let age = parse_rfc3339(created).map(|t| human_age(now - t)).unwrap_or_default();
        let by = by.replace('\t', " ");
        let by = if !no_trunc && by.chars().count() > 45 {
            format!("{}…", by.chars().take(44).collect::<String>())
        } else {
            by
        };
        println!("{img:<12}   {age:<15}   {by:<45}   {:<9} {comment}", human_size(*size));
    }
    Ok(ExitCode::SUCCESS)
}
