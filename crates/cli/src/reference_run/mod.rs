//! `unifusion reference-run ...`: one forward of a model on inputs from a safetensors file,
//! outputs written to another, so any reference implementation can be compared with ours.

use clap::Subcommand;

use crate::CliError;
use generator::Target;

mod generator;
mod internvl;

#[derive(Subcommand)]
pub enum ReferenceRun {
    /// The InternVL3-layout VLM: every LLM hidden state and the logits.
    Internvl(internvl::Args),
    /// diffusers `Krea2Transformer2DModel` (text fusion + DiT): the velocity `sample`.
    Krea2Transformer(generator::Args),
    /// diffusers `AutoencoderKL.decode`: `latents` to `sample`.
    VaeDecoder(generator::Args),
    /// diffusers `AutoencoderTiny.decode` (TAESD/TAEF1): `latents` to `sample`.
    TinyVaeDecoder(generator::Args),
}

pub fn run(command: ReferenceRun) -> Result<(), CliError> {
    match command {
        ReferenceRun::Internvl(args) => internvl::run(args),
        ReferenceRun::Krea2Transformer(args) => generator::run(Target::Krea2Transformer, args),
        ReferenceRun::VaeDecoder(args) => generator::run(Target::VaeDecoder, args),
        ReferenceRun::TinyVaeDecoder(args) => generator::run(Target::TinyVaeDecoder, args),
    }
}
