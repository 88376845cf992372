//! A small device self-test: one matmul, one RMSNorm (fused kernel and tensor-op reference)
//! and the int8 / int4 dequantize-matmul kernels on deterministic inputs, read back
//! asynchronously so the same code runs in the browser.
//!
//! The report carries the inputs too, so a checker with its own CPU arithmetic (the browser
//! test in JavaScript, the native test in f64 Rust) can recompute every number independently.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// The self-test checks the f32 kernels, so its tensors are f32 whatever the device's default
/// float dtype (an f16 page still runs them: norms and quantized Linears compute in f32).
const F32: DType = DType::F32;
use serde::Serialize;

use unifusion_weights::quant::{QuantBits, quantize};

use crate::dequant_matmul::{QuantLinear, dequant_matmul_fused};
use crate::{rms_norm_fused, rms_norm_reference};

/// Sizes of the self-test problem.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SelfTestShape {
    /// RMSNorm rows.
    pub rows: usize,
    /// RMSNorm row width; also the matmul inner dimension.
    pub cols: usize,
    /// Matmul output columns.
    pub out: usize,
}

impl Default for SelfTestShape {
    fn default() -> Self {
        // cols > the kernel's workgroup size, so the strided loop runs more than once per thread.
        Self {
            rows: 37,
            cols: 300,
            out: 19,
        }
    }
}

/// Inputs and device outputs of one self-test run, row-major.
#[derive(Debug, Clone, Serialize)]
pub struct SelfTestReport {
    pub shape: SelfTestShape,
    pub eps: f32,
    /// `[rows, cols]`
    pub x: Vec<f32>,
    /// `[cols]`
    pub weight: Vec<f32>,
    /// `[cols, out]`
    pub w: Vec<f32>,
    /// `x @ w`, `[rows, out]`
    pub matmul: Vec<f32>,
    /// Fused WGSL RMSNorm, or `None` when the device is not a wgpu device.
    pub rms_norm_fused: Option<Vec<f32>>,
    /// Tensor-op RMSNorm.
    pub rms_norm_reference: Vec<f32>,
    /// Quantized Linears through the WGSL dequantize-matmul kernels.
    pub quant: Vec<QuantCheck>,
}

/// One quantized Linear: `y = x · Wᵀ` with the weight quantized on the host; `w` is the
/// host's dequantization (`QuantizedWeight::dequantize`, no GPU involved), so a checker can
/// recompute `y` from `x` and `w` alone.
#[derive(Debug, Clone, Serialize)]
pub struct QuantCheck {
    /// e.g. `"q4 mat-vec, 1 row"`.
    pub name: String,
    /// Rows of `x`.
    pub m: usize,
    /// Inputs.
    pub k: usize,
    /// Outputs.
    pub n: usize,
    /// `[m, k]`
    pub x: Vec<f32>,
    /// Dequantized weight `[n, k]` (PyTorch orientation).
    pub w: Vec<f32>,
    /// The kernel's `y` `[m, n]`, or `None` when the device is not a wgpu device.
    pub kernel: Option<Vec<f32>>,
}

/// Deterministic values in [-2, 2) from a SplitMix64 stream (no RNG crate needed for a fixture).
pub fn fixture_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Runs the self-test on `device`. Errors are device errors, as text (the caller only shows them).
pub async fn run(device: &Device, shape: SelfTestShape) -> Result<SelfTestReport, String> {
    let SelfTestShape { rows, cols, out } = shape;
    let eps = 1e-6;
    let x = fixture_values(1, rows * cols);
    let weight = fixture_values(2, cols);
    let w = fixture_values(3, cols * out);

    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [rows, cols]), (device, F32));
    let weight_t = Tensor::<1>::from_data(TensorData::new(weight.clone(), [cols]), (device, F32));
    let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), [cols, out]), (device, F32));

    let matmul = read(xt.clone().matmul(wt)).await?;
    let rms_norm_fused = match rms_norm_fused(xt.clone(), weight_t.clone(), eps) {
        Ok(y) => Some(read(y).await?),
        Err(_) => None,
    };
    let rms_norm_reference = read(rms_norm_reference(xt, weight_t, eps)).await?;
    let mut quant = Vec::new();
    for (bits, m, variant) in [
        (QuantBits::Q8, 1, "mat-vec"),
        (QuantBits::Q4, 3, "mat-vec"),
        (QuantBits::Q8, 37, "dequant + matmul"),
        (QuantBits::Q4, 37, "dequant + matmul"),
    ] {
        quant.push(quant_check(device, bits, m, variant).await?);
    }

    Ok(SelfTestReport {
        shape,
        eps,
        x,
        weight,
        w,
        matmul,
        rms_norm_fused,
        rms_norm_reference,
        quant,
    })
}

/// `K = 64`, `N = 19`, group 32: two groups per row, an odd number of outputs.
async fn quant_check(
    device: &Device,
    bits: QuantBits,
    m: usize,
    variant: &str,
) -> Result<QuantCheck, String> {
    let (k, n) = (64, 19);
    let x = fixture_values(4, m * k);
    let q = quantize(&fixture_values(5, n * k), n, k, bits, 32).map_err(|e| e.to_string())?;
    let layer = QuantLinear::new(&q, None, device).map_err(|e| e.to_string())?;
    let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), (device, F32));
    let kernel = match dequant_matmul_fused(xt, &layer) {
        Ok(y) => Some(read(y).await?),
        Err(_) => None,
    };
    Ok(QuantCheck {
        name: format!(
            "{} {variant}, {m} rows",
            bits.suffix().trim_start_matches('.')
        ),
        m,
        k,
        n,
        x,
        w: q.dequantize(),
        kernel,
    })
}

async fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t.into_data_async().await.map_err(|e| format!("{e:?}"))?;
    data.try_into_vec::<f32>().map_err(|e| format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use burn::tensor::DeviceKind;

    use super::*;

    #[test]
    fn selftest_on_wgpu_matches_f64_arithmetic() {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let report = pollster::block_on(run(&device, SelfTestShape::default())).expect("device");
        let SelfTestShape { rows, cols, out } = report.shape;
        for i in 0..rows {
            for j in 0..out {
                let want: f64 = (0..cols)
                    .map(|p| report.x[i * cols + p] as f64 * report.w[p * out + j] as f64)
                    .sum();
                let got = report.matmul[i * out + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                    "matmul[{i},{j}] {got} vs {want}"
                );
            }
        }
        let fused = report
            .rms_norm_fused
            .expect("the fused kernel runs on wgpu");
        for (a, b) in fused.iter().zip(&report.rms_norm_reference) {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-5 * b.abs(),
                "fused {a} vs reference {b}"
            );
        }
        assert_eq!(report.quant.len(), 4);
        for q in &report.quant {
            let y = q
                .kernel
                .as_ref()
                .expect("the quantized kernels run on wgpu");
            for i in 0..q.m {
                for j in 0..q.n {
                    let want: f64 = (0..q.k)
                        .map(|p| q.x[i * q.k + p] as f64 * q.w[j * q.k + p] as f64)
                        .sum();
                    let got = y[i * q.n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                        "{}: y[{i},{j}] {got} vs {want}",
                        q.name
                    );
                }
            }
        }
    }

    #[test]
    fn fixture_values_are_deterministic_and_spread() {
        let a = fixture_values(1, 1000);
        assert_eq!(a, fixture_values(1, 1000));
        assert_ne!(a, fixture_values(2, 1000));
        assert!(a.iter().all(|v| (-2.0..2.0).contains(v)));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.2, "mean {mean}");
    }
}
