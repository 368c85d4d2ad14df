//! The `flsl` command-line tool: parse, call one function per command, print the error chain.
//! The clap structs are in `args.rs`, each command in its own module under `cmd/`.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod cmd;
mod progress;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cmd::run(args::Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
