//! Block-quantized Linears in the real models: the parity fixtures' weights quantized (int8 and
//! int4, group 8: the tiny fixtures' widths are 24–80) into the loaders' quant stores, the
//! quantized layers actually used (QuantLinear, the WGSL kernel on wgpu), and the outputs
//! still close to the transformers / diffusers references. Bounds are ~3× the errors measured
//! when the test was written (`unifusion bench quant` prints them).

use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use unifusion_model::generator::Krea2Transformer;
use unifusion_model::generator::config::Krea2Config;
use unifusion_model::generator::params::read_safetensors;
use unifusion_model::generator::rope::RopeTable;
use unifusion_model::load::{DeviceParams, LeftoverSource};
use unifusion_model::vlm::weights::parse_safetensors;
use unifusion_model::vlm::{InternVl, InternVlConfig, VlmInput, Weights};
use unifusion_weights::Dtype;
use unifusion_weights::quant::{QuantBits, QuantizedWeight, is_quantizable_linear, quantize};

const GROUP: usize = 8;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn devices() -> Vec<(&'static str, Device)> {
    vec![
        ("flex", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ]
}

/// The quantized weight when `full_name` is one the packer quantizes.
fn maybe_quantize(
    full_name: &str,
    shape: &[usize],
    values: &[f32],
    bits: QuantBits,
) -> Option<QuantizedWeight> {
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    if !is_quantizable_linear(full_name, &shape64) || !shape[1].is_multiple_of(GROUP) {
        return None;
    }
    Some(quantize(values, shape[0], shape[1], bits, GROUP).expect("quantize"))
}

/// The two stored tensors of a quantized `weight`, as a sink sees them.
fn parts(weight: &str, q: &QuantizedWeight) -> [(String, Dtype, Vec<usize>, Vec<u8>); 2] {
    [
        (
            format!("{weight}{}", q.bits.suffix()),
            q.bits.dtype(),
            q.data_shape().to_vec(),
            q.data.clone(),
        ),
        (
            format!("{weight}.scales"),
            Dtype::F16,
            q.scales_shape().to_vec(),
            q.scales.clone(),
        ),
    ]
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32")
}

#[test]
fn quantized_dit_stays_close_to_diffusers() {
    let dir = fixtures().join("generator/krea2");
    let cfg: Krea2Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("config parses");
    let weights =
        read_safetensors(&std::fs::read(dir.join("weights.safetensors")).expect("weights"))
            .expect("weights parse");
    let io = read_safetensors(&std::fs::read(dir.join("inputs.safetensors")).expect("inputs"))
        .expect("inputs parse");
    let out = read_safetensors(&std::fs::read(dir.join("outputs.safetensors")).expect("outputs"))
        .expect("outputs parse");
    let get = |name: &str| {
        io.iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("fixture has no {name}"))
    };
    let want = out
        .iter()
        .find(|(n, _)| n == "sample")
        .map(|(_, d)| d.clone().try_into_vec::<f32>().expect("f32"))
        .expect("sample");
    for (bits, bound) in [(QuantBits::Q8, 0.03), (QuantBits::Q4, 0.5)] {
        for (dev_name, device) in devices() {
            let mut params = DeviceParams::default();
            // The same model with the dequantized weights as plain floats: the quantized path
            // must compute exactly that (up to f32 rounding), so all the error is quantization.
            let mut dequantized = DeviceParams::default();
            let mut quantized = 0;
            for (name, data) in &weights {
                let shape = data.shape().as_slice().to_vec();
                let v = data
                    .clone()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .expect("f32");
                match maybe_quantize(&format!("transformer.{name}"), &shape, &v, bits) {
                    Some(q) => {
                        for (n, dtype, s, bytes) in parts(name, &q) {
                            assert!(
                                params
                                    .quant
                                    .add(&n, dtype, &s, &bytes, &device)
                                    .expect("add")
                            );
                        }
                        dequantized.insert(name, q.dequantize(), &shape, &device);
                        quantized += 1;
                    }
                    None => {
                        dequantized.insert(name, v.clone(), &shape, &device);
                        params.insert(name, v, &shape, &device);
                    }
                }
            }
            // 2 DiT blocks + 2 layer-wise + 2 refiner blocks, 8 Linears each.
            assert_eq!(quantized, 48, "{bits:?}");
            let model = Krea2Transformer::load(&cfg, &mut params, &device).expect("loads");
            params.check_all_taken().expect("every tensor used");
            let float =
                Krea2Transformer::load(&cfg, &mut dequantized, &device).expect("float loads");
            assert!(!float.transformer_blocks[0].attn.to_q.is_quantized());
            assert!(model.transformer_blocks[1].ff.down.is_quantized());
            assert!(model.transformer_blocks[0].attn.to_q.is_quantized());
            let ids = get("position_ids").try_into_vec::<f32>().expect("f32");
            let rows: Vec<[f32; 3]> = ids.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect();
            let rope = RopeTable::new(&rows, cfg.axes_dims_rope, cfg.rope_theta, &device);
            let run = |m: &Krea2Transformer| {
                let mask = Tensor::<2>::from_data(get("encoder_attention_mask"), &device)
                    .greater_elem(0.5);
                m.forward(
                    Tensor::from_data(get("hidden_states"), &device),
                    Tensor::from_data(get("encoder_hidden_states"), &device),
                    Tensor::from_data(get("timestep"), &device),
                    &rope,
                    Some(mask),
                )
                .expect("forward")
            };
            let y = run(&model);
            let same = rel_l2(&values(y.clone()), &values(run(&float)));
            assert!(
                same < 1e-5,
                "DiT {bits:?} {dev_name}: kernel vs dequantized floats {same}"
            );
            let err = rel_l2(&values(y), &want);
            eprintln!("DiT {bits:?} g{GROUP} {dev_name}: relative L2 vs diffusers {err:.2e}");
            assert!(err < bound, "DiT {bits:?} {dev_name}: {err} ≥ {bound}");
            assert!(
                err > 1e-6,
                "DiT {bits:?} {dev_name}: no quantization error at all?"
            );
        }
    }
}

#[test]
fn quantized_vlm_stays_close_to_transformers() {
    let dir = fixtures().join("vlm/layernorm_untied");
    let config = InternVlConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).expect("config"),
    )
    .expect("config parses");
    let model_bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let io_bytes = std::fs::read(dir.join("io.safetensors")).expect("io");
    let io = parse_safetensors(&io_bytes).expect("io parses");
    let find = |name: &str| {
        io.iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("fixture has no {name}"))
    };
    let ids: Vec<Vec<u32>> = {
        let t = find("tiles1.input_ids");
        t.to_i64()
            .expect("i64")
            .chunks(t.shape[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    };
    let px = find("tiles1.pixel_values");
    let px_shape = [px.shape[0], px.shape[1], px.shape[2], px.shape[3]];
    let px_values = px.to_f32().expect("f32");
    let want = find("tiles1.logits").to_f32().expect("f32");
    for (bits, bound) in [(QuantBits::Q8, 0.06), (QuantBits::Q4, 0.6)] {
        for (dev_name, device) in devices() {
            let mut weights = Weights::on_device(&device);
            let mut quantized = 0;
            for t in parse_safetensors(&model_bytes).expect("weights parse") {
                let v = t.to_f32().expect("f32");
                match maybe_quantize(&format!("vlm.{}", t.name), &t.shape, &v, bits) {
                    Some(q) => {
                        for (n, dtype, s, bytes) in parts(&t.name, &q) {
                            let took = weights
                                .add_quantized(&n, dtype, &s, &bytes, &device)
                                .expect("add");
                            assert!(took, "{n}");
                        }
                        quantized += 1;
                    }
                    None => weights.add(&t.name, v, t.shape.clone()).expect("add"),
                }
            }
            // Vision: 2 layers × 6; text: 3 layers × 7; mlp1: 2.
            assert!(
                quantized >= 20,
                "{bits:?}: only {quantized} Linears quantized"
            );
            let model = InternVl::load(&config, &mut weights, &device).expect("loads");
            assert!(weights.remaining().is_empty(), "{:?}", weights.remaining());
            let pixels =
                Tensor::<4>::from_data(TensorData::new(px_values.clone(), px_shape), &device);
            let out = model
                .forward(
                    VlmInput {
                        ids: &ids,
                        pixel_values: Some(pixels),
                        attention_mask: None,
                    },
                    &[],
                )
                .expect("forward");
            let logits = values(model.text.logits(out.last));
            let err = rel_l2(&logits, &want);
            eprintln!(
                "VLM {bits:?} g{GROUP} {dev_name}: logits relative L2 vs transformers {err:.2e} ({quantized} Linears)"
            );
            assert!(err < bound, "VLM {bits:?} {dev_name}: {err} ≥ {bound}");
            assert!(
                err > 1e-6,
                "VLM {bits:?} {dev_name}: no quantization error at all?"
            );
        }
    }
}
