//! f16 compute against f32 on the same wgpu adapter (lavapipe here), on the fixtures whose
//! reference outputs come from diffusers / transformers in f32: the Krea 2 DiT, the KL VAE
//! decoder, three CFG Euler steps, and an InternVL forward with one image tile.
//!
//! Two burn devices share one wgpu device (`WgpuOptions::setup` registers a second runtime
//! identity on the same handles), so each can have its own default float dtype: the precision
//! is a device setting in burn 0.22 and cannot change once a tensor exists on the device.
//! Without `shader-f16` on the adapter the comparisons are skipped, saying so.
//!
//! Tolerance. f16 has an 11-bit significand: unit roundoff `u = 2⁻¹¹ ≈ 4.9e-4`. Every weight
//! and activation is rounded to f16 once per op (relative error ≤ u), and these fixtures chain
//! 10–40 rounded ops (projections, attention, MLP, residuals; the VAE ~40 convolutions) per
//! output, so errors of a few to a few tens of `u · scale` are f16 working as it should
//! (measured on lavapipe: 2.7–15 `u · scale`, with norm statistics in f32; 3.5–17 with them in
//! f16). The bound is `F16_ULPS = 32` units of roundoff of the reference's largest magnitude:
//! about twice the largest measured, and 60× below an error of the values' own size, which is
//! what a wrong kernel or a dtype mix-up gives. f32 must stay within the parity tests' 1e-4.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::wgpu::WgpuSetup;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData};
use unifusion_model::generator::config::{AutoencoderKlConfig, Krea2Config};
use unifusion_model::generator::params::read_safetensors;
use unifusion_model::generator::rope::RopeTable;
use unifusion_model::generator::sampler::{FlowMatchEuler, Guided, sample};
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{Krea2Transformer, WeightMap};
use unifusion_model::precision::{
    Precision, PrecisionError, precision_of, set_precision, supports_f16,
};
use unifusion_model::vlm::{InternVl, InternVlConfig, VlmInput, Weights};

/// f16's unit roundoff, 2⁻¹¹.
const U: f32 = 1.0 / 2048.0;
/// The f16 tolerance in units of roundoff of the reference's largest magnitude (module docs).
const F16_ULPS: f32 = 32.0;
/// The f32 parity tests' tolerance.
const F32_TOL: f32 = 1e-4;

/// The wgpu handles every device of this test binary shares (burn initialises the default
/// adapter once per process).
fn setup() -> WgpuSetup {
    static SETUP: OnceLock<WgpuSetup> = OnceLock::new();
    SETUP
        .get_or_init(|| {
            let (_, setup) = Device::wgpu_options()
                .init_with_setup()
                .expect("wgpu initialises");
            setup
        })
        .clone()
}

/// A fresh burn device (its own runtime identity and dtype settings) on the shared handles.
fn fresh_device() -> Device {
    Device::wgpu_options()
        .setup(setup())
        .init()
        .expect("a runtime on the shared wgpu device")
}

/// An f32 and an f16 device on the same wgpu adapter, or `None` (with the reason printed)
/// when the adapter has no `shader-f16`.
fn devices() -> Option<(Device, Device)> {
    static DEVICES: OnceLock<Option<(Device, Device)>> = OnceLock::new();
    DEVICES
        .get_or_init(|| {
            let mut f32_device = fresh_device();
            let mut f16_device = fresh_device();
            set_precision(&mut f32_device, Precision::F32).expect("f32 everywhere");
            if !supports_f16(&f16_device) {
                eprintln!(
                    "SKIPPED: this wgpu adapter has no shader-f16, so there is no f16 path to test"
                );
                return None;
            }
            set_precision(&mut f16_device, Precision::F16).expect("f16 on a shader-f16 adapter");
            assert_eq!(precision_of(&f16_device), Precision::F16);
            assert_eq!(precision_of(&f32_device), Precision::F32);
            Some((f32_device, f16_device))
        })
        .clone()
}

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}

fn tensors(path: &str) -> HashMap<String, TensorData> {
    let bytes = std::fs::read(fixture(path)).expect("fixture file");
    read_safetensors(&bytes)
        .expect("fixture parses")
        .into_iter()
        .collect()
}

fn weights(path: &str) -> WeightMap {
    WeightMap::from_safetensors(&std::fs::read(fixture(path)).expect("weights"))
        .expect("weights parse")
}

/// `name` from `io` on `device` in `dtype` (latents and timesteps are f32 at every
/// precision; conditions arrive in the compute dtype).
fn input<const D: usize>(
    io: &HashMap<String, TensorData>,
    name: &str,
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    let data = io
        .get(name)
        .unwrap_or_else(|| panic!("fixture has no {name}"))
        .clone();
    Tensor::from_data(data, (device, dtype))
}

fn compute_dtype(device: &Device) -> DType {
    device.settings().float_dtype.into()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .expect("f32")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert!(x.is_finite(), "non-finite output {x}");
            (x - y).abs()
        })
        .fold(0.0, f32::max)
}

/// f32 within [`F32_TOL`] of the reference, f16 within [`F16_ULPS`] roundoffs of the
/// reference's scale, and f16 not equal to f32 (it really ran in f16).
fn check(what: &str, f32_out: &[f32], f16_out: &[f32], reference: &[f32]) {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e32 = max_abs_diff(f32_out, reference);
    let e16 = max_abs_diff(f16_out, reference);
    let between = max_abs_diff(f16_out, f32_out);
    let tol16 = F16_ULPS * U * scale;
    eprintln!(
        "{what}: scale {scale:.3}, f32 err {e32:.2e}, f16 err {e16:.2e} ({:.1} u·scale, bound {F16_ULPS}), f16−f32 {between:.2e}",
        e16 / (U * scale)
    );
    assert!(e32 <= F32_TOL, "{what}: f32 max abs diff {e32} > {F32_TOL}");
    assert!(e16 <= tol16, "{what}: f16 max abs diff {e16} > {tol16}");
    assert!(between > 0.0, "{what}: f16 output is identical to f32");
}

fn rope(io: &HashMap<String, TensorData>, cfg: &Krea2Config, device: &Device) -> RopeTable {
    let ids = io["position_ids"]
        .clone()
        .try_into_vec::<f32>()
        .expect("f32");
    let rows: Vec<[f32; 3]> = ids.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect();
    RopeTable::new(&rows, cfg.axes_dims_rope, cfg.rope_theta, device)
}

fn krea2(device: &Device) -> (Krea2Transformer, Krea2Config) {
    let cfg: Krea2Config = serde_json::from_str(
        &std::fs::read_to_string(fixture("generator/krea2/config.json")).expect("config"),
    )
    .expect("config parses");
    let mut w = weights("generator/krea2/weights.safetensors");
    let model = Krea2Transformer::load(&cfg, &mut w, device).expect("model loads");
    (model, cfg)
}

/// One DiT forward and three CFG Euler steps: weights on the device as f16, latents in and
/// out as f32.
#[test]
fn krea2_dit_and_sampler_in_f16_match_f32_within_f16_precision() {
    let Some((d32, d16)) = devices() else { return };
    let io = tensors("generator/krea2/inputs.safetensors");
    let out = tensors("generator/krea2/outputs.safetensors");
    let reference = |name: &str| out[name].clone().try_into_vec::<f32>().expect("f32");
    let mut forward = Vec::new();
    let mut sampled = Vec::new();
    for device in [&d32, &d16] {
        let (model, cfg) = krea2(device);
        let dtype = compute_dtype(device);
        assert_eq!(
            model.img_in.weight.val().dtype(),
            dtype,
            "weights are placed in the compute dtype"
        );
        let rope = rope(&io, &cfg, device);
        let mask = || -> Tensor<2, Bool> {
            input::<2>(&io, "encoder_attention_mask", device, DType::F32).greater_elem(0.5)
        };
        let v = model
            .forward(
                input(&io, "hidden_states", device, DType::F32),
                input(&io, "encoder_hidden_states", device, dtype),
                input(&io, "timestep", device, DType::F32),
                &rope,
                Some(mask()),
            )
            .expect("forward");
        assert_eq!(v.dtype(), DType::F32, "the velocity comes back in f32");
        forward.push(values(v));

        let cond = model
            .encode_text(
                input(&io, "encoder_hidden_states", device, dtype),
                Some(mask()),
            )
            .expect("cond");
        let null_mask =
            input::<2>(&io, "null_encoder_attention_mask", device, DType::F32).greater_elem(0.5);
        let null = model
            .encode_text(
                input(&io, "null_encoder_hidden_states", device, dtype),
                Some(null_mask),
            )
            .expect("null");
        let denoiser = Guided {
            model: &model,
            cond: &cond,
            null: Some(&null),
            guidance: 2.5,
            rope: &rope,
        };
        let x = sample(
            &FlowMatchEuler::new(3, 0.7),
            &denoiser,
            input(&io, "hidden_states", device, DType::F32),
            |_, _| ControlFlow::Continue(()),
        )
        .expect("sampling");
        assert_eq!(x.dtype(), DType::F32, "the sampler's state stays f32");
        sampled.push(values(x));
    }
    check(
        "krea2 forward",
        &forward[0],
        &forward[1],
        &reference("sample"),
    );
    check(
        "3 CFG Euler steps",
        &sampled[0],
        &sampled[1],
        &reference("sampled_3_steps_cfg"),
    );
}

/// The KL decoder: convolutions in f16, GroupNorm statistics in f32.
#[test]
fn vae_decoder_in_f16_matches_f32_within_f16_precision() {
    let Some((d32, d16)) = devices() else { return };
    let cfg: AutoencoderKlConfig = serde_json::from_str(
        &std::fs::read_to_string(fixture("generator/vae/config.json")).expect("config"),
    )
    .expect("config parses");
    let io = tensors("generator/vae/inputs.safetensors");
    let out = tensors("generator/vae/outputs.safetensors");
    let mut decoded = Vec::new();
    for device in [&d32, &d16] {
        let mut w = weights("generator/vae/weights.safetensors");
        let vae = AutoencoderKl::load(&cfg, &mut w, device).expect("vae loads");
        let latents = input::<4>(&io, "latents", device, compute_dtype(device));
        let image = vae.decode(latents).expect("decode");
        decoded.push(values(image));
    }
    let reference = out["sample"].clone().try_into_vec::<f32>().expect("f32");
    check("vae decode", &decoded[0], &decoded[1], &reference);
}

/// InternVL with one image tile: InternViT (LayerNorm), pixel shuffle, `mlp1`, Qwen2
/// (RMSNorm, RoPE, causal attention); every hidden state and the logits.
#[test]
fn internvl_forward_in_f16_matches_f32_within_f16_precision() {
    let Some((d32, d16)) = devices() else { return };
    let dir = fixture("vlm/layernorm_untied");
    let io: HashMap<String, TensorData> = tensors("vlm/layernorm_untied/io.safetensors");
    let ids: Vec<Vec<u32>> = {
        let data = io["tiles1.input_ids"].clone();
        let cols = data.shape()[1];
        let v = data.convert::<i64>().try_into_vec::<i64>().expect("i64");
        v.chunks(cols)
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    };
    let config = InternVlConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).expect("config"),
    )
    .expect("config parses");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let mut runs = Vec::new();
    for device in [&d32, &d16] {
        let mut weights = Weights::new();
        weights.add_safetensors(&bytes).expect("weights parse");
        let model = InternVl::load(&config, &mut weights, device).expect("model loads");
        let pixels = input::<4>(&io, "tiles1.pixel_values", device, compute_dtype(device));
        let n = model.num_layers();
        let taps: Vec<usize> = (0..=n).collect();
        let out = model
            .forward(
                VlmInput {
                    ids: &ids,
                    pixel_values: Some(pixels),
                    attention_mask: None,
                },
                &taps,
            )
            .expect("forward");
        let mut states: Vec<(String, Vec<f32>)> = out
            .taps
            .into_iter()
            .map(|(i, t)| (format!("tiles1.hidden_states.{i}"), values(t)))
            .collect();
        states.push(("tiles1.logits".into(), values(model.text.logits(out.last))));
        runs.push(states);
    }
    for ((name, a), (_, b)) in runs[0].iter().zip(&runs[1]) {
        let reference = io[name].clone().try_into_vec::<f32>().expect("f32");
        check(name, a, b, &reference);
    }
}

/// The int8/int4 Linear under f16: the layer casts its f16 input to f32 for the (f32-only)
/// kernels and its output back, so the only error is rounding x, the bias and y to f16:
/// per output `|Δy| ≤ u·(Σ|x·w| + |b| + |y|)`, computed here from the values themselves.
#[test]
fn quantized_linear_takes_f16_input_and_computes_in_f32() {
    use unifusion_kernels::QuantLinear;
    use unifusion_kernels::selftest::fixture_values;
    use unifusion_weights::quant::{QuantBits, quantize};

    let Some((d32, d16)) = devices() else { return };
    let (k, n) = (64, 19);
    for (bits, m) in [(QuantBits::Q8, 1), (QuantBits::Q4, 37)] {
        let x = fixture_values(4, m * k);
        let bias = fixture_values(6, n);
        let q = quantize(&fixture_values(5, n * k), n, k, bits, 32).expect("quantizes");
        let mut outs = Vec::new();
        for device in [&d32, &d16] {
            let b = Tensor::<1>::from_data(TensorData::new(bias.clone(), [n]), device);
            let layer = QuantLinear::new(&q, Some(b), device).expect("layer");
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [m, k]), device);
            let y = layer.forward(xt);
            assert_eq!(
                y.dtype(),
                compute_dtype(device),
                "output in the input's dtype"
            );
            outs.push(values(y));
        }
        let w = q.dequantize();
        for r in 0..m {
            for j in 0..n {
                let i = r * n + j;
                let dot: f32 = (0..k).map(|c| (x[r * k + c] * w[j * k + c]).abs()).sum();
                let bound = U * (dot + bias[j].abs() + outs[0][i].abs());
                let d = (outs[1][i] - outs[0][i]).abs();
                assert!(
                    d <= bound,
                    "{bits:?} row {r} col {j}: |f16 − f32| {d} > {bound}"
                );
            }
        }
        assert!(
            max_abs_diff(&outs[0], &outs[1]) > 0.0,
            "f16 run identical to f32"
        );
    }
}

/// F16 is refused, never silently downgraded, where it cannot be had: on a device already
/// computing in f32 (burn fixes a device's dtype at its first tensor). `auto` falls back.
#[test]
fn f16_is_refused_with_a_clear_error_where_it_cannot_be_had() {
    assert_eq!(Precision::auto(false), Precision::F32);
    assert_eq!(Precision::auto(true), Precision::F16);
    let mut device = fresh_device();
    let _ = Tensor::<1>::zeros([1], &device); // locks the device to its default, f32
    assert_eq!(precision_of(&device), Precision::F32);
    set_precision(&mut device, Precision::F32).expect("asking for what it has is fine");
    let err = set_precision(&mut device, Precision::F16).expect_err("f16 after f32 tensors");
    match &err {
        PrecisionError::NoF16 | PrecisionError::AlreadySet { .. } => {}
        other => panic!("unexpected error {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("f32") && message.contains("f16"),
        "the message names both precisions: {message}"
    );
}
