//! `gantry fsck`: exit 0 when the store is consistent, else list problems;
//! `--verify-content` rehashes layer contents, `--repair` fixes what it can
//! (dropping the unreferenced, fetching damaged layers again) and names
//! what it cannot.

use crate::context::Context;
use anyhow::Result;
use gantry_core::pull::Quiet;
use std::process::ExitCode;

pub fn run(ctx: &Context, verify_content: bool, repair: bool) -> Result<ExitCode> {
    for c in &ctx.cleared {
        println!("cleared: {c}");
    }
    let mut unrepairable = 0;
    if repair {
        let report = ctx.with_puller(&Quiet, ctx.pull_options(), |puller| {
            Ok(gantry_core::repair::repair(&ctx.store, ctx.driver()?, puller)?)
        })?;
        for d in &report.dropped {
            println!("dropped: {d}");
        }
        for r in &report.repaired {
            println!("repaired: {r}");
        }
        for u in &report.unrepairable {
            println!("cannot repair: {u}");
        }
        unrepairable = report.unrepairable.len();
    }
    let mut report = gantry_core::fsck::check(&ctx.store, ctx.driver()?)?;
    if verify_content || repair {
        for (chain, why) in gantry_core::repair::verify_content(&ctx.store, ctx.driver()?)? {
            report.problems.push(format!("layer {chain}: {why}"));
        }
    }
    if report.problems.is_empty() && unrepairable == 0 {
        println!("store is consistent");
        return Ok(ExitCode::SUCCESS);
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    eprintln!(
        "error: the store has {} problem(s)",
        report.problems.len().max(unrepairable)
    );
    Ok(ExitCode::FAILURE)
}
