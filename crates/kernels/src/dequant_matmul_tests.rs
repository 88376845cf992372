//! Both WGSL variants and the tensor-op reference against an f64 product of the host-side
//! dequantized weight (`QuantizedWeight::dequantize`, independent of every device path).

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use unifusion_weights::quant::{QuantBits, QuantizedWeight, quantize};

use super::*;
use crate::selftest::fixture_values;

fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

struct Case {
    x: Vec<f32>,
    q: QuantizedWeight,
    bias: Option<Vec<f32>>,
    m: usize,
}

fn case(m: usize, n: usize, k: usize, group: usize, bits: QuantBits, bias: bool) -> Case {
    let mut w = fixture_values(11, n * k);
    // Vary magnitudes per row (and one near-zero row, whose f16 scales are subnormal).
    for (r, row) in w.chunks_mut(k).enumerate() {
        let f = match r % 5 {
            0 => 1e-6,
            1 => 3.0,
            _ => 0.05 * (r % 7 + 1) as f32,
        };
        row.iter_mut().for_each(|v| *v *= f);
    }
    let q = quantize(&w, n, k, bits, group).expect("quantize");
    Case {
        x: fixture_values(12, m * k),
        q,
        bias: bias.then(|| fixture_values(13, n)),
        m,
    }
}

/// y = x · dequant(W)ᵀ + b in f64, and per element Σ|x·w| (the rounding scale).
fn expected(c: &Case) -> (Vec<f64>, Vec<f64>) {
    let w = c.q.dequantize();
    let (n, k) = (c.q.rows, c.q.cols);
    let mut y = Vec::with_capacity(c.m * n);
    let mut mag = Vec::with_capacity(c.m * n);
    for i in 0..c.m {
        for j in 0..n {
            let (mut s, mut a) = (0f64, 0f64);
            for t in 0..k {
                let p = c.x[i * k + t] as f64 * w[j * k + t] as f64;
                s += p;
                a += p.abs();
            }
            let b = c.bias.as_ref().map_or(0.0, |b| b[j] as f64);
            y.push(s + b);
            mag.push(a + b.abs());
        }
    }
    (y, mag)
}

fn layer(c: &Case, device: &Device) -> QuantLinear {
    let bias = c
        .bias
        .as_ref()
        .map(|b| Tensor::from_data(TensorData::new(b.clone(), [b.len()]), device));
    QuantLinear::new(&c.q, bias, device).expect("layer")
}

fn input(c: &Case, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(c.x.clone(), [c.m, c.q.cols]), device)
}

fn assert_close(actual: Tensor<2>, (want, mag): &(Vec<f64>, Vec<f64>), what: &str) {
    let got = actual.into_data().try_into_vec::<f32>().expect("f32");
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((g, w), a)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 1e-6 + 2e-6 * a;
        assert!(
            (*g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (±{tol})"
        );
    }
}

const SHAPES: [(usize, usize, usize, usize); 8] = [
    // (m, n, k, group)
    (1, 37, 64, 32),   // one row, odd N
    (3, 129, 96, 32),  // several rows, N just past a tile
    (8, 8, 8, 8),      // smallest group, one word per row (q8: two)
    (9, 65, 40, 8),    // K not a multiple of the 32-wide K tile
    (5, 33, 256, 64),  // group 64
    (33, 70, 160, 32), // partial tiles on both axes
    (64, 96, 128, 32), // whole tiles
    (17, 1, 32, 32),   // one output
];

#[test]
fn both_kernels_match_f64_on_wgpu() {
    let device = wgpu();
    for bits in [QuantBits::Q8, QuantBits::Q4] {
        for (i, &(m, n, k, g)) in SHAPES.iter().enumerate() {
            let c = case(m, n, k, g, bits, i % 2 == 0);
            let want = expected(&c);
            let l = layer(&c, &device);
            for variant in [Variant::Matvec, Variant::Tiled, Variant::Dequant] {
                let y = fused_variant(input(&c, &device), &l, variant).expect("kernel runs");
                assert_close(y, &want, &format!("{bits:?} {variant:?} {m}x{n}x{k} g{g}"));
            }
            let reference = dequant_matmul_reference(input(&c, &device), &l);
            assert_close(reference, &want, &format!("{bits:?} reference {m}x{n}x{k}"));
        }
    }
}

#[test]
fn flex_takes_the_reference_and_matches_f64() {
    let device = Device::flex();
    for bits in [QuantBits::Q8, QuantBits::Q4] {
        for &(m, n, k, g) in &SHAPES[..6] {
            let c = case(m, n, k, g, bits, true);
            let l = layer(&c, &device);
            let err = dequant_matmul_fused(input(&c, &device), &l).expect_err("no kernel on Flex");
            assert!(matches!(err, QuantKernelError::NotWgpu), "{err}");
            let y = dequant_matmul(input(&c, &device), &l);
            assert_close(y, &expected(&c), &format!("flex {bits:?} {m}x{n}x{k}"));
        }
    }
}

#[test]
fn tensor_op_dequantize_is_exact() {
    // The reference's integer unpacking and f16 decoding (subnormal scales included) give
    // bit-identical weights to the host decoder, on both devices.
    for device in [wgpu(), Device::flex()] {
        for bits in [QuantBits::Q8, QuantBits::Q4] {
            let c = case(1, 13, 48, 16, bits, false);
            let got = layer(&c, &device)
                .dequantize()
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32");
            assert_eq!(got, c.q.dequantize(), "{bits:?} on {device:?}");
            if let Ok(w) = dequantize_fused(&layer(&c, &device)) {
                let got = w.into_data().try_into_vec::<f32>().expect("f32");
                assert_eq!(got, c.q.dequantize(), "{bits:?} dequant.wgsl");
            }
        }
    }
}

#[test]
fn grids_spill_past_65535_workgroups() {
    let device = wgpu();
    // Mat-vec: 8 columns per workgroup, 600000 columns = 75000 workgroups.
    let c = case(1, 600_000, 8, 8, QuantBits::Q8, true);
    let y =
        fused_variant(input(&c, &device), &layer(&c, &device), Variant::Matvec).expect("kernel");
    assert_close(y, &expected(&c), "matvec 75000 groups");
    // Tiled: 32 columns per tile, 2.1M columns = 65625 tiles.
    let c = case(1, 2_100_000, 8, 8, QuantBits::Q4, false);
    let y = fused_variant(input(&c, &device), &layer(&c, &device), Variant::Tiled).expect("kernel");
    assert_close(y, &expected(&c), "tiled 65625 groups");
}

#[test]
fn forward_keeps_leading_axes_and_reads_strided_input() {
    let device = wgpu();
    let c = case(6, 20, 32, 32, QuantBits::Q4, true);
    let l = layer(&c, &device);
    let want = expected(&c);
    let x3 = input(&c, &device).reshape([2, 3, 32]);
    let y = l.forward(x3);
    assert_eq!(y.dims(), [2, 3, 20]);
    assert_close(y.reshape([6, 20]), &want, "3-D forward");
    // A transposed (non-contiguous) view of the same input.
    let mut transposed = vec![0f32; 6 * 32];
    for i in 0..6 {
        for t in 0..32 {
            transposed[t * 6 + i] = c.x[i * 32 + t];
        }
    }
    let xt = Tensor::<2>::from_data(TensorData::new(transposed, [32, 6]), &device).transpose();
    assert_close(l.forward(xt), &want, "strided input");
}

#[test]
fn mismatched_layers_are_errors() {
    let device = wgpu();
    let c = case(2, 16, 32, 16, QuantBits::Q8, false);
    let l = layer(&c, &device);
    let x = Tensor::<2>::zeros([2, 48], &device);
    assert!(matches!(
        dequant_matmul_fused(x, &l),
        Err(QuantKernelError::InputSize {
            expected: 32,
            got: 48
        })
    ));
    let mut wrong = layer(&c, &device);
    wrong.d_out = 17;
    let err = dequant_matmul_fused(input(&c, &device), &wrong).expect_err("layout");
    assert!(matches!(err, QuantKernelError::Layout(_)), "{err}");
    let bias = Tensor::<1>::zeros([5], &device);
    assert!(QuantLinear::new(&c.q, Some(bias), &device).is_err());
}
