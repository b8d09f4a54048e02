//! `gantry plugin ls` and `gantry plugin inspect PATH`: the plugin registry
//! as operators see it (containerd's `ctr plugins ls` is the model). A
//! plugin that fails to load is listed with its error; `ls` itself fails
//! then, so scripts notice.

use crate::cli::PluginCommand;
use crate::context::Context;
use anyhow::{Context as _, Result};
use gantry_host::registry::Kind;
use std::process::ExitCode;

pub fn run(ctx: &Context, command: PluginCommand) -> Result<ExitCode> {
    match command {
        PluginCommand::Ls => ls(ctx),
        PluginCommand::Test { path, options } => test(ctx, &path, &options),
        PluginCommand::Inspect { path } if gantry_host::plugin::is_native(&path) => {
            let (abi, contract, kind) = gantry_host::plugin::describe_native(&path, ctx.config.allow_native_plugins)
                .with_context(|| format!("inspecting {}", path.display()))?;
            let v = serde_json::json!({
                "path": path,
                "runtime": "native",
                "abi": abi,
                "kind": format!("gantry.{kind}"),
                "contract": contract,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
            Ok(ExitCode::SUCCESS)
        }
        PluginCommand::Inspect { path } => {
            let info = ctx
                .host
                .describe(&path)
                .with_context(|| format!("inspecting {}", path.display()))?;
            let v = serde_json::json!({
                "path": path,
                "runtime": "wasm",
                "kind": info.kind,
                "contract": info.contract,
                "imports": info.imports,
                "exports": info.exports,
            });
            println!("{}", serde_json::to_string_pretty(&v).expect("serialisable"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn test(ctx: &Context, path: &std::path::Path, options: &[String]) -> Result<ExitCode> {
    let options = options
        .iter()
        .map(|o| {
            o.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--option {o:?}: expected KEY=VALUE"))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = ctx
        .store
        .root()
        .join("plugin-test")
        .join(&gantry_core::store::random_id()[..16]);
    let result = (|| -> Result<ExitCode> {
        let limits = ctx.config.driver.limits.unwrap_or(ctx.config.limits).to_limits();
        let home = dir.join("home");
        let driver = if gantry_host::plugin::is_native(path) {
            gantry_host::plugin::AnyDriver::Native(
                gantry_host::plugin::NativeDriver::load(
                    "under-test",
                    path,
                    &home,
                    options,
                    ctx.config.allow_native_plugins,
                )
                .with_context(|| format!("loading {}", path.display()))?,
            )
        } else {
            gantry_host::plugin::AnyDriver::Wasm(
                gantry_host::plugin::WasmDriver::load(&ctx.host, "under-test", path, &home, limits, options)
                    .with_context(|| format!("loading {}", path.display()))?,
            )
        };
        let checks = gantry_host::conformance::run(&driver, &dir.join("reference"));
        let mut failed = 0;
        for c in &checks {
            match &c.result {
                Ok(()) => println!("ok    {}", c.name),
                Err(why) => {
                    failed += 1;
                    println!("FAIL  {}: {}", c.name, gantry_core::text::escape_line(why));
                }
            }
        }
        if failed > 0 {
            eprintln!("error: {failed} of {} conformance checks failed", checks.len());
            return Ok(ExitCode::FAILURE);
        }
        println!("{} checks passed", checks.len());
        Ok(ExitCode::SUCCESS)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    result
}

fn ls(ctx: &Context) -> Result<ExitCode> {
    let mut rows = vec![[
        "TYPE".to_string(),
        "ID".into(),
        "RUNTIME".into(),
        "CONTRACT".into(),
        "LIMITS".into(),
        "STATUS".into(),
    ]];
    let mut failed = false;
    for (entry, path) in ctx.plugins() {
        let contract = path
            .as_ref()
            .ok()
            .and_then(|p| ctx.host.describe(p).ok())
            .and_then(|i| i.contract)
            .unwrap_or_else(|| "-".into());
        let loaded = match entry.kind {
            Kind::Transport => ctx.transport().map(|_| ()),
            Kind::Driver => ctx.driver().map(|_| ()),
        };
        let status = match loaded {
            Ok(()) => "ok".to_string(),
            Err(e) => {
                failed = true;
                format!("error: {}", gantry_core::text::escape_line(&format!("{e:#}")))
            }
        };
        let l = entry.limits;
        rows.push([
            entry.kind.type_name().to_string(),
            entry.id.clone(),
            entry.runtime.as_str().to_string(),
            contract,
            format!(
                "{} MiB, {:?} cpu, {:?} wall, {} handles",
                l.memory_bytes >> 20,
                l.cpu,
                l.wall,
                l.handles
            ),
            status,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 5 {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[c])
                }
            })
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
