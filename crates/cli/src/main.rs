//! `unifusion`: the native command line of UniFusion-Web.
//!
//! Each subcommand lives in its own module; `main` only parses and dispatches. Errors print
//! one line and exit with status 2 (bad input) or 1 (anything else); nothing panics on input.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod device;
mod inspect;
mod pack;
mod reference_run;

#[derive(Parser)]
#[command(name = "unifusion", version, about = "UniFusion-Web native tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks: each component beside its baseline, as a markdown table.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// One forward of a model on given inputs, every hidden state written out, for parity
    /// against any reference implementation.
    #[command(subcommand)]
    ReferenceRun(reference_run::ReferenceRun),
    /// Convert checkpoints into content-addressed shards and a manifest (docs/WEIGHTS.md).
    Pack(pack::Args),
    /// Summarise a packed model; `--verify` also checks every shard's size and sha256.
    Inspect(inspect::Args),
}

/// Errors a command reports before exiting.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The user asked for something impossible (bad flag value, missing file, ...).
    #[error("{0}")]
    Usage(String),
    /// The device failed while running.
    #[error("device error: {0}")]
    Device(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(b) => bench::run(b),
        Command::ReferenceRun(r) => reference_run::run(r),
        Command::Pack(a) => pack::run(a),
        Command::Inspect(a) => inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("unifusion: {e}");
            match e {
                CliError::Usage(_) => ExitCode::from(2),
                CliError::Device(_) => ExitCode::FAILURE,
            }
        }
    }
}
