//! `unifusion bench kernels`: the fused WGSL RMSNorm against burn tensor ops on the same wgpu
//! device (the baseline), with burn's Flex CPU backend for scale.

use burn::tensor::{Device, Tensor, TensorData};
use unifusion_kernels::selftest::fixture_values;
use unifusion_kernels::{rms_norm_fused, rms_norm_reference};

use super::median_ms;
use crate::CliError;
use crate::device::Backend;

/// (rows, cols, what the shape stands for)
const SHAPES: [(usize, usize, &str); 4] = [
    (256, 896, "Qwen2.5-0.5B hidden, 256 tokens"),
    (1024, 1536, "Qwen2.5-1.5B hidden, 1024 tokens"),
    (4096, 128, "per-head QK-norm, 4096 head rows"),
    (4096, 3072, "DiT width 3072, 4096 tokens"),
];

#[derive(clap::Args)]
pub struct Args {
    /// Timed calls per row (median reported).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
}

fn fixture(rows: usize, cols: usize, device: &Device) -> (Tensor<2>, Tensor<1>) {
    let x = TensorData::new(fixture_values(1, rows * cols), [rows, cols]);
    let w = TensorData::new(fixture_values(2, cols), [cols]);
    (Tensor::from_data(x, device), Tensor::from_data(w, device))
}

pub fn run(args: Args) -> Result<(), CliError> {
    let iters = args.iters as usize;
    let gpu = Backend::Wgpu.device()?;
    let cpu = Backend::Flex.device()?;

    println!("RMSNorm, f32, median of {iters} calls, ms\n");
    println!(
        "| rows × cols | stands for | wgpu: fused WGSL | wgpu: burn ops (baseline) | speed-up | Flex: burn ops |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (rows, cols, what) in SHAPES {
        let (x, w) = fixture(rows, cols, &gpu);
        let fused = median_ms(&gpu, iters, || {
            rms_norm_fused(x.clone(), w.clone(), 1e-6)
                .map(drop)
                .map_err(|e| CliError::Device(e.to_string()))
        })?;
        let baseline = median_ms(&gpu, iters, || {
            drop(rms_norm_reference(x.clone(), w.clone(), 1e-6));
            Ok(())
        })?;
        let (xc, wc) = fixture(rows, cols, &cpu);
        let flex = median_ms(&cpu, iters.min(10), || {
            drop(rms_norm_reference(xc.clone(), wc.clone(), 1e-6));
            Ok(())
        })?;
        println!(
            "| {rows} × {cols} | {what} | {fused:.3} | {baseline:.3} | {:.2}× | {flex:.3} |",
            baseline / fused
        );
    }
    Ok(())
}
