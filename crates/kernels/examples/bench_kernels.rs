//! Benchmark: every WGSL kernel against its plain-tensor reference, on the same device, in
//! the same run. Prints a markdown table for `docs/BENCHMARKS.md`.
//!
//!     cargo run -p unifusion-kernels --example bench_kernels [-- --iters 50]
//!
//! Each timed call ends with `Device::sync`, so a row measures the work, not its enqueueing.

use std::time::Instant;

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use unifusion_kernels::selftest::fixture_values;
use unifusion_kernels::{rms_norm_fused, rms_norm_reference};

/// (rows, cols, what the shape stands for)
const SHAPES: [(usize, usize, &str); 4] = [
    (256, 896, "Qwen2.5-0.5B hidden, 256 tokens"),
    (1024, 1536, "Qwen2.5-1.5B hidden, 1024 tokens"),
    (4096, 128, "per-head QK-norm, 4096 head rows"),
    (4096, 3072, "DiT width 3072, 4096 tokens"),
];

fn median_ms(device: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f(); // warm-up: shader compilation, memory pools
    }
    device.sync().expect("device sync");
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let start = Instant::now();
            f();
            device.sync().expect("device sync");
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let iters = std::env::args()
        .skip_while(|a| a != "--iters")
        .nth(1)
        .map(|v| v.parse().expect("--iters takes a positive integer"))
        .unwrap_or(30usize);
    let device = Device::wgpu(DeviceKind::DefaultDevice);
    let flex = Device::flex();

    println!("RMSNorm, f32, median of {iters} calls (ms)\n");
    println!(
        "| rows × cols | stands for | wgpu fused WGSL | wgpu burn ops (baseline) | speed-up | Flex CPU burn ops |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (rows, cols, what) in SHAPES {
        let make = |device: &Device| {
            let x = Tensor::<2>::from_data(
                TensorData::new(fixture_values(1, rows * cols), [rows, cols]),
                device,
            );
            let w =
                Tensor::<1>::from_data(TensorData::new(fixture_values(2, cols), [cols]), device);
            (x, w)
        };
        let (x, w) = make(&device);
        let fused = median_ms(&device, iters, || {
            let _ = rms_norm_fused(x.clone(), w.clone(), 1e-6).expect("wgpu kernel");
        });
        let reference = median_ms(&device, iters, || {
            let _ = rms_norm_reference(x.clone(), w.clone(), 1e-6);
        });
        let (xc, wc) = make(&flex);
        let cpu = median_ms(&flex, iters.min(10), || {
            let _ = rms_norm_reference(xc.clone(), wc.clone(), 1e-6);
        });
        println!(
            "| {rows} × {cols} | {what} | {fused:.3} | {reference:.3} | {:.2}× | {cpu:.3} |",
            reference / fused
        );
    }
}
