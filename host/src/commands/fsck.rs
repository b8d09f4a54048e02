//! `gantry fsck`: exit 0 when the store is consistent, else list problems.

use crate::context::Context;
use anyhow::Result;
use std::process::ExitCode;

pub fn run(ctx: &Context) -> Result<ExitCode> {
    for c in &ctx.cleared {
        println!("cleared: {c}");
    }
    let report = gantry_core::fsck::check(&ctx.store, &ctx.driver)?;
    if report.problems.is_empty() {
        println!("store is consistent");
        return Ok(ExitCode::SUCCESS);
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    eprintln!("error: the store has {} problem(s)", report.problems.len());
    Ok(ExitCode::FAILURE)
}
