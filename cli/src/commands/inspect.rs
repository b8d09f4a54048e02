//! `gantry inspect`: the JSON of `docker image inspect`.

use crate::context::Context;
use anyhow::Result;
use gantry_core::images::{layers_of, lookup};
use serde_json::{json, Value};
use std::process::ExitCode;

pub fn run(ctx: &Context, images: &[String]) -> Result<ExitCode> {
    let mut out = Vec::new();
    for name in images {
        out.push(image_json(ctx, name)?);
    }
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    serde::Serialize::serialize(&out, &mut ser)?;
    println!("{}", String::from_utf8(buf)?);
    Ok(ExitCode::SUCCESS)
}

/// One image as `docker image inspect` (and the Engine API) shows it.
pub fn image_json(ctx: &Context, name: &str) -> Result<Value, gantry_core::Error> {
    {
        let id = lookup(&ctx.store, name)?;
        let (config, layers) = layers_of(&ctx.store, &id)?;
        let refs = ctx.store.refs.refs_of(&id)?;
        let (tags, digests) = gantry_core::images::repo_names(refs.iter());
        let raw = &config.raw;
        let get = |k: &str| raw.get(k).cloned().unwrap_or(Value::Null);
        let str_or_empty = |k: &str| raw.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        let top = layers.last().expect("images have layers");
        let mut obj = json!({
            "Id": id,
            "RepoTags": tags,
            "RepoDigests": digests,
            "Parent": "",
            "Comment": str_or_empty("comment"),
            "Created": str_or_empty("created"),
            "DockerVersion": str_or_empty("docker_version"),
            "Author": str_or_empty("author"),
            "Config": get("config"),
            "Architecture": config.architecture,
            "Os": config.os,
            "Size": layers.iter().map(|l| l.size).sum::<u64>(),
            "GraphDriver": {
                "Name": ctx.store.driver_name(),
                "Data": { "CacheId": top.cache_id },
            },
            "RootFS": {
                "Type": "layers",
                "Layers": config.diff_ids,
            },
            "Metadata": {
                "LastTagTime": ctx.store.images.last_updated(&id).unwrap_or_else(|| "0001-01-01T00:00:00Z".into()),
            },
        });
        if let Some(v) = &config.variant {
            obj["Variant"] = json!(v);
        }
        Ok(obj)
    }
}
