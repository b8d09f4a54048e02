//! `gantry pull`: the core's pipeline with the configured transport and
//! driver, and Docker's closing lines.

use crate::context::Context;
use crate::output::PullProgress;
use anyhow::Result;
use gantry_core::platform::Platform;
use gantry_core::pull::PullOptions;
use gantry_core::Reference;
use std::process::ExitCode;

pub fn run(ctx: &Context, references: &[String], platform: Option<&str>, quiet: bool) -> Result<ExitCode> {
    let refs = references
        .iter()
        .map(|r| Reference::parse(r))
        .collect::<Result<Vec<_>, _>>()?;
    let platform = platform.map(Platform::parse).transpose()?;
    let progress = PullProgress::new(quiet);
    let options = PullOptions {
        platform,
        ..ctx.pull_options()
    };
    let results: Vec<Result<gantry_core::pull::PullOutcome, gantry_core::Error>> =
        ctx.with_puller(&progress, options, |puller| {
            Ok(std::thread::scope(|s| {
                let handles: Vec<_> = refs.iter().map(|r| s.spawn(|| puller.pull(r))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("pull thread panicked"))
                    .collect()
            }))
        })?;
    let mut first_err = None;
    for (r, res) in refs.iter().zip(results) {
        match res {
            Ok(o) => {
                if std::env::var_os("GANTRY_TIMINGS").is_some() {
                    let t = o.timings;
                    eprintln!(
                        "timings: total {:.3}s download {:.3}s (summed) create {:.3}s apply {:.3}s",
                        t.total.as_secs_f64(),
                        t.download.as_secs_f64(),
                        t.create.as_secs_f64(),
                        t.apply.as_secs_f64()
                    );
                }
                if quiet {
                    println!("{r}");
                } else {
                    let what = if o.downloaded {
                        "Downloaded newer image for"
                    } else {
                        "Image is up to date for"
                    };
                    println!("Status: {what} {}", r.familiar_string());
                    println!("{r}");
                }
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context(format!("pulling {}", r.familiar_string()));
                if refs.len() > 1 {
                    eprintln!("error: {e:#}");
                }
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        None => Ok(ExitCode::SUCCESS),
        Some(e) if refs.len() == 1 => Err(e),
        Some(_) => Ok(ExitCode::FAILURE),
    }
}
