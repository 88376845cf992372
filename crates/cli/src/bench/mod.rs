//! `unifusion bench ...`: each component timed beside its baseline in the same run.
//!
//! Every timed call ends with `Device::sync`, so a row measures the work, not its enqueueing;
//! numbers are medians. Tables are markdown, ready for `docs/BENCHMARKS.md`.

use std::time::Instant;

use burn::tensor::Device;
use clap::Subcommand;

use crate::CliError;

mod dit;
mod kernels;
mod load;
mod quant;
mod vlm;

#[derive(Subcommand)]
pub enum Bench {
    /// Hand-written WGSL kernels against their burn tensor-op references.
    Kernels(kernels::Args),
    /// Streaming weight load: peak RSS against the largest shard + 32 MiB.
    Load(load::Args),
    /// Krea-2-style DiT forward and VAE decodes beside diffusers on PyTorch CPU.
    Dit(dit::Args),
    /// VLM prefill and decode tokens/s beside PyTorch CPU (transformers).
    Vlm(vlm::Args),
    /// int8/int4 Linears: fixture output error vs f32, weight bytes, dequant-matmul speed.
    Quant(quant::Args),
}

pub fn run(bench: Bench) -> Result<(), CliError> {
    match bench {
        Bench::Kernels(args) => kernels::run(args),
        Bench::Load(args) => load::run(args),
        Bench::Dit(args) => dit::run(args),
        Bench::Vlm(args) => vlm::run(args),
        Bench::Quant(args) => quant::run(args),
    }
}

/// Median wall time of `f` over `iters` calls, in ms, after three warm-up calls (shader
/// compilation, memory pools).
pub fn median_ms(
    device: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<(), CliError>,
) -> Result<f64, CliError> {
    let sync = || {
        device
            .sync()
            .map_err(|e| CliError::Device(format!("{e:?}")))
    };
    for _ in 0..3 {
        f()?;
    }
    sync()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        f()?;
        sync()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
