//! The `gantry` binary: parses arguments, runs one command, and prints any
//! error once, as one line, with a non-zero exit.

mod auth;
mod cli;
mod commands;
mod config;
mod config_show;
mod context;
mod credential_helper;
mod output;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread: without root, a user namespace of gantry's own
    // (overlay mounts where the kernel allows them); where it is refused,
    // gantry runs as it is and `auto` says why overlay2 is not there.
    let _ = gantry_host::confined::userns::enter_without_root();
    let args = <cli::Cli as clap::Parser>::parse();
    match commands::run(args) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            // One line: join the chain, skipping a cause already in its context.
            let mut line = String::new();
            for c in chain {
                if !line.contains(&c) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&c);
                }
            }
            eprintln!("error: {}", gantry_core::text::escape_line(&line));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
