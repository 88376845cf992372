//! `unifusion`: the native command line of UniFusion-Web.
//!
//! Each subcommand lives in its own module; `main` only parses and dispatches. Errors print
//! one line and exit with status 2 (bad input) or 1 (anything else); nothing panics on input.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod device;
mod edit;
mod eval;
mod generate;
mod image_io;
mod inspect;
mod pack;
mod reference_run;
mod tiny_model;
mod train;

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
    /// Text-to-image: the VLM rewrites the prompt (VERIFI), the DiT draws it; writes a PNG.
    Generate(generate::Args),
    /// Edit one image (or compose several: multi-reference) by an instruction.
    Edit(edit::EditArgs),
    /// A variation of one or more images (no prompt).
    Variation(edit::VariationArgs),
    /// The demo world's benchmark: held-out prompts, edits, multi-reference and variation,
    /// judged exactly (or your own `--cases`).
    Eval(eval::Args),
    /// Write a seeded tiny random model directory (noise images; for trying the tools).
    MakeTinyModel(tiny_model::Args),
    /// Train the demo-world model (tokenizer, VAE, ...), resumable (docs/TRAINING.md).
    Train(Box<train::Args>),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line (clap's first, with the item it announces), exit 2.
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines.next().unwrap_or("bad arguments").to_string();
            if line.ends_with(':')
                && let Some(next) = lines.next()
            {
                line = format!("{line} {next}");
            }
            eprintln!("unifusion: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Bench(b) => bench::run(b),
        Command::ReferenceRun(r) => reference_run::run(r),
        Command::Pack(a) => pack::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Edit(a) => edit::run_edit(a),
        Command::Variation(a) => edit::run_variation(a),
        Command::MakeTinyModel(a) => tiny_model::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::run(*a),
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
