//! One module per command; `run` dispatches.

mod daemon;
mod export;
mod fsck;
pub(crate) mod history;
mod images;
mod import;
pub(crate) mod inspect;
mod load;
mod plugin;
mod pull;
mod push;
mod save;
pub(crate) mod serve;
mod system;

use crate::cli::{Cli, Command};
use crate::context::Context;
use anyhow::Result;
use std::process::ExitCode;

/// Writes `line` to standard error in one write: a server's "listening
/// on" line is read by scripts while the server runs, and `eprintln!`
/// writes a formatted line piece by piece (standard error is unbuffered).
pub(crate) fn stderr_line(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    // Tenants each open a store of their own; the default one is not used.
    if let Command::Daemon {
        tenants: Some(file), ..
    } = &cli.command
    {
        return daemon::run_tenants(file);
    }
    // The config alone: no store is opened.
    if let Command::Config {
        action: crate::cli::ConfigAction::Show,
    } = &cli.command
    {
        let config = crate::config::Config::load(cli.config.as_deref())?;
        print!(
            "{}",
            crate::config_show::render(&config).map_err(|e| anyhow::anyhow!("config show: {e}"))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = Context::open(cli.config.as_deref(), &cli.root)?;
    match cli.command {
        Command::Pull {
            references,
            platform,
            quiet,
        } => pull::run(&ctx, &references, platform.as_deref(), quiet),
        Command::Push {
            reference,
            all_tags,
            quiet,
        } => push::run(&ctx, &reference, all_tags, quiet),
        Command::Images { format, quiet } => images::run(&ctx, format, quiet),
        Command::Inspect { images } => inspect::run(&ctx, &images),
        Command::History { image, no_trunc } => history::run(&ctx, &image, no_trunc),
        Command::Tag { source, target } => {
            gantry_core::images::tag(&ctx.store, &source, &target)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rmi { images, force } => rmi(&ctx, &images, force),
        Command::Export { image, output } => export::run(&ctx, &image, output.as_deref()),
        Command::Load { input, quiet } => load::run(&ctx, input.as_deref(), quiet),
        Command::Import {
            file,
            reference,
            changes,
            message,
            platform,
        } => import::run(&ctx, &file, reference.as_deref(), changes, message, platform.as_deref()),
        Command::Save { images, output, format } => save::run(&ctx, &images, output.as_deref(), format),
        Command::Fsck { verify_content, repair } => fsck::run(&ctx, verify_content, repair),
        Command::Plugin { command } => plugin::run(&ctx, command),
        Command::System {
            command: crate::cli::SystemCommand::Df { format },
        } => system::df(&ctx, format),
        Command::Config { .. } => unreachable!("answered before the store opens"),
        Command::Daemon {
            host,
            allow_remote_tcp,
            group,
            ..
        } => daemon::run(ctx, &host, allow_remote_tcp, group.as_deref()),
        Command::Serve {
            action:
                Some(crate::cli::ServeAction::Gc {
                    dry_run,
                    delete_untagged,
                }),
            ..
        } => serve::gc(&ctx, dry_run, delete_untagged),
        Command::Serve {
            action: None,
            listen,
            from_store,
            mirror_of,
            tag_ttl,
            header_timeout,
            htpasswd,
            uploads,
            token,
            operate,
        } => serve::run(
            &ctx,
            serve::Mode {
                listen,
                from_store,
                mirror_of,
                tag_ttl,
                header_timeout,
                htpasswd,
                uploads,
                token,
                operate,
            },
        ),
    }
}

/// `gantry rmi`: with several images, one that fails is reported and the
/// rest still removed (Docker's behaviour); the exit says whether all went.
fn rmi(ctx: &Context, images: &[String], force: bool) -> Result<ExitCode> {
    let mut failed = false;
    for i in images {
        match gantry_core::images::remove(&ctx.store, &crate::context::LazyDriver(ctx), i, force) {
            Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
            Err(e) if images.len() > 1 => {
                eprintln!("error: {e}");
                failed = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
