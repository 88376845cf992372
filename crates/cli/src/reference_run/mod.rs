//! `unifusion reference-run ...`: one forward of a model on inputs from a safetensors file,
//! outputs written to another, so any reference implementation can be compared with ours.

use clap::Subcommand;

use crate::CliError;

mod internvl;

#[derive(Subcommand)]
pub enum ReferenceRun {
    /// The InternVL3-layout VLM: every LLM hidden state and the logits.
    Internvl(internvl::Args),
}

pub fn run(command: ReferenceRun) -> Result<(), CliError> {
    match command {
        ReferenceRun::Internvl(args) => internvl::run(args),
    }
}
