//! `unifusion bench quant`: block-wise int8 / int4 Linears (docs/WEIGHTS.md) against f32.
//!
//! 1. Accuracy on the parity fixtures (`tests/fixtures/vlm/*`, `tests/fixtures/generator/krea2`):
//!    the Linears `pack --quantize` would quantize are quantized, the component runs with them
//!    (QuantLinear: the WGSL kernel on wgpu), and its output is compared with the same
//!    component in f32: relative L2 `‖y_q − y_f32‖ / ‖y_f32‖`. The f32 model's own distance to
//!    the transformers / diffusers reference is printed beside it for scale.
//! 2. Weight bytes of those Linears: f16 against q8 / q4 with their f16 scales.
//! 3. Speed: the dequant-matmul kernels against burn's f32 matmul (`x · Wᵀ` with `W` already
//!    transposed, as `burn::nn::Linear` holds it) on the same wgpu device, same run, medians.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use unifusion_kernels::QuantLinear;
use unifusion_kernels::dequant_matmul::{MATVEC_MAX_ROWS, Variant, fused_variant};
use unifusion_kernels::selftest::fixture_values;
use unifusion_model::generator::Krea2Transformer;
use unifusion_model::generator::config::Krea2Config;
use unifusion_model::generator::params::read_safetensors;
use unifusion_model::generator::rope::RopeTable;
use unifusion_model::load::{DeviceParams, LeftoverSource};
use unifusion_model::vlm::weights::parse_safetensors;
use unifusion_model::vlm::{InternVl, InternVlConfig, VlmInput, Weights};
use unifusion_weights::Dtype;
use unifusion_weights::quant::{QuantBits, QuantizedWeight, is_quantizable_linear, quantize};

use crate::CliError;
use crate::device::Backend;

/// (M, K, N, what it stands for): `x` `[M, K]`, `W` `[N, K]`.
const SHAPES: [(usize, usize, usize, &str); 9] = [
    (1, 896, 896, "Qwen2.5-0.5B q/o_proj, decode"),
    (1, 896, 4864, "Qwen2.5-0.5B gate/up_proj, decode"),
    (1, 4864, 896, "Qwen2.5-0.5B down_proj, decode"),
    (16, 896, 896, "q/o_proj, 16 tokens"),
    (16, 896, 4864, "gate/up_proj, 16 tokens"),
    (16, 4864, 896, "down_proj, 16 tokens"),
    (256, 896, 896, "q/o_proj, 256 tokens"),
    (256, 896, 4864, "gate/up_proj, 256 tokens"),
    (256, 4864, 896, "down_proj, 256 tokens"),
];

#[derive(clap::Args)]
pub struct Args {
    /// Timed calls per speed row (median reported).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Scale group for the fixture models (their widths are 24–80: 8 quantizes every listed
    /// Linear, 16 most, 32 few).
    #[arg(long, default_value_t = 8)]
    group: usize,
    /// Only the accuracy tables.
    #[arg(long)]
    skip_speed: bool,
    /// Only the speed table.
    #[arg(long)]
    skip_accuracy: bool,
    /// Also time every kernel variant (mat-vec, tiled, dequant + matmul) on every shape.
    #[arg(long)]
    all_variants: bool,
}

fn device_err(e: impl std::fmt::Display) -> CliError {
    CliError::Device(e.to_string())
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read(path: PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(&path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, CliError> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| device_err(format!("{e:?}")))
}

/// What quantizing one component did to its listed Linears.
#[derive(Default, Clone, Copy)]
struct Counts {
    quantized: usize,
    listed: usize,
    f16_bytes: usize,
    stored_bytes: usize,
}

/// The quantized weight when `full_name` is a listed Linear whose width fits `group`.
fn maybe_quantize(
    full_name: &str,
    shape: &[usize],
    values: &[f32],
    bits: Option<QuantBits>,
    group: usize,
    counts: &mut Counts,
) -> Result<Option<QuantizedWeight>, CliError> {
    let shape64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    if !is_quantizable_linear(full_name, &shape64) {
        return Ok(None);
    }
    counts.listed += 1;
    let Some(bits) = bits else {
        return Ok(None);
    };
    if !shape[1].is_multiple_of(group) {
        return Ok(None);
    }
    let q = quantize(values, shape[0], shape[1], bits, group)
        .map_err(|e| CliError::Usage(format!("{full_name}: {e}")))?;
    counts.quantized += 1;
    counts.f16_bytes += 2 * values.len();
    counts.stored_bytes += q.stored_bytes();
    Ok(Some(q))
}

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

/// One VLM fixture: `(last hidden state, logits, counts)` with `bits` (None = f32).
fn run_vlm(
    case: &str,
    bits: Option<QuantBits>,
    group: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>, Counts), CliError> {
    let dir = fixtures().join("vlm").join(case);
    let config =
        InternVlConfig::from_json(&String::from_utf8_lossy(&read(dir.join("config.json"))?))
            .map_err(|e| CliError::Usage(e.to_string()))?;
    let model_bytes = read(dir.join("model.safetensors"))?;
    let mut weights = Weights::on_device(device);
    let mut counts = Counts::default();
    for t in parse_safetensors(&model_bytes).map_err(device_err)? {
        let v = t.to_f32().map_err(device_err)?;
        let full = format!("vlm.{}", t.name);
        match maybe_quantize(&full, &t.shape, &v, bits, group, &mut counts)? {
            Some(q) => {
                for (n, dtype, s, bytes) in parts(&t.name, &q) {
                    weights
                        .add_quantized(&n, dtype, &s, &bytes, device)
                        .map_err(CliError::Usage)?;
                }
            }
            None => weights
                .add(&t.name, v, t.shape.clone())
                .map_err(device_err)?,
        }
    }
    let model = InternVl::load(&config, &mut weights, device).map_err(device_err)?;
    let io_bytes = read(dir.join("io.safetensors"))?;
    let io = parse_safetensors(&io_bytes).map_err(device_err)?;
    let find = |name: &str| {
        io.iter()
            .find(|t| t.name == name)
            .ok_or_else(|| CliError::Usage(format!("{case}: fixture has no {name}")))
    };
    let ids_t = find("tiles1.input_ids")?;
    let ids: Vec<Vec<u32>> = ids_t
        .to_i64()
        .map_err(device_err)?
        .chunks(ids_t.shape[1].max(1))
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let px = find("tiles1.pixel_values")?;
    let pixels = Tensor::<4>::from_data(
        TensorData::new(
            px.to_f32().map_err(device_err)?,
            [px.shape[0], px.shape[1], px.shape[2], px.shape[3]],
        ),
        device,
    );
    let out = model
        .forward(
            VlmInput {
                ids: &ids,
                pixel_values: Some(pixels),
                attention_mask: None,
            },
            &[],
        )
        .map_err(device_err)?;
    let last = values(out.last.clone())?;
    let logits = values(model.text.logits(out.last))?;
    Ok((last, logits, counts))
}

/// The VLM fixture's reference logits (transformers).
fn vlm_reference_logits(case: &str) -> Result<Vec<f32>, CliError> {
    let bytes = read(fixtures().join("vlm").join(case).join("io.safetensors"))?;
    let io = parse_safetensors(&bytes).map_err(device_err)?;
    io.iter()
        .find(|t| t.name == "tiles1.logits")
        .ok_or_else(|| CliError::Usage(format!("{case}: no tiles1.logits")))?
        .to_f32()
        .map_err(device_err)
}

/// The DiT fixture's output with `bits` (None = f32), and the diffusers reference.
fn run_dit(
    bits: Option<QuantBits>,
    group: usize,
    device: &Device,
) -> Result<(Vec<f32>, Vec<f32>, Counts), CliError> {
    let dir = fixtures().join("generator/krea2");
    let cfg: Krea2Config =
        serde_json::from_slice(&read(dir.join("config.json"))?).map_err(device_err)?;
    let weights = read_safetensors(&read(dir.join("weights.safetensors"))?).map_err(device_err)?;
    let io = read_safetensors(&read(dir.join("inputs.safetensors"))?).map_err(device_err)?;
    let out = read_safetensors(&read(dir.join("outputs.safetensors"))?).map_err(device_err)?;
    let get = |list: &[(String, TensorData)], name: &str| {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| CliError::Usage(format!("krea2 fixture has no {name}")))
    };
    let mut params = DeviceParams::default();
    let mut counts = Counts::default();
    for (name, data) in &weights {
        let shape = data.shape().as_slice().to_vec();
        let v = data
            .clone()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| device_err(format!("{e:?}")))?;
        let full = format!("transformer.{name}");
        match maybe_quantize(&full, &shape, &v, bits, group, &mut counts)? {
            Some(q) => {
                for (n, dtype, s, bytes) in parts(name, &q) {
                    params
                        .quant
                        .add(&n, dtype, &s, &bytes, device)
                        .map_err(CliError::Usage)?;
                }
            }
            None => params.insert(name, v, &shape, device),
        }
    }
    let model = Krea2Transformer::load(&cfg, &mut params, device).map_err(device_err)?;
    params.check_all_taken().map_err(device_err)?;
    let ids = get(&io, "position_ids")?
        .try_into_vec::<f32>()
        .map_err(|e| device_err(format!("{e:?}")))?;
    let rows: Vec<[f32; 3]> = ids.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect();
    let rope = RopeTable::new(&rows, cfg.axes_dims_rope, cfg.rope_theta, device);
    let mask =
        Tensor::<2>::from_data(get(&io, "encoder_attention_mask")?, device).greater_elem(0.5);
    let y = model
        .forward(
            Tensor::from_data(get(&io, "hidden_states")?, device),
            Tensor::from_data(get(&io, "encoder_hidden_states")?, device),
            Tensor::from_data(get(&io, "timestep")?, device),
            &rope,
            Some(mask),
        )
        .map_err(device_err)?;
    let want = get(&out, "sample")?
        .try_into_vec::<f32>()
        .map_err(|e| device_err(format!("{e:?}")))?;
    Ok((values(y)?, want, counts))
}

fn accuracy(group: usize, device: &Device) -> Result<(), CliError> {
    const BITS: [QuantBits; 2] = [QuantBits::Q8, QuantBits::Q4];
    println!(
        "Accuracy on the parity fixtures, group {group}, wgpu: relative L2 against the same \
         component in f32\n"
    );
    println!(
        "| component | output | f32 vs reference | q8 vs f32 | q4 vs f32 | Linears quantized | Linear bytes f16 → q8 / q4 |"
    );
    println!("|---|---|---:|---:|---:|---:|---|");
    for case in ["layernorm_untied", "rmsnorm_qknorm_tied"] {
        let (last, logits, _) = run_vlm(case, None, group, device)?;
        let reference = vlm_reference_logits(case)?;
        let mut errs = Vec::new();
        let mut counts = Vec::new();
        for bits in BITS {
            let (q_last, q_logits, c) = run_vlm(case, Some(bits), group, device)?;
            errs.push((rel_l2(&q_last, &last), rel_l2(&q_logits, &logits)));
            counts.push(c);
        }
        let bytes = format!(
            "{} → {} / {}",
            counts[0].f16_bytes, counts[0].stored_bytes, counts[1].stored_bytes
        );
        let n = format!("{} of {}", counts[0].quantized, counts[0].listed);
        println!(
            "| VLM `{case}` (tiles1) | last hidden state | – | {:.2e} | {:.2e} | {n} | {bytes} |",
            errs[0].0, errs[1].0
        );
        println!(
            "| VLM `{case}` (tiles1) | logits | {:.2e} | {:.2e} | {:.2e} | {n} | {bytes} |",
            rel_l2(&logits, &reference),
            errs[0].1,
            errs[1].1
        );
    }
    linear_error();
    let (y, reference, _) = run_dit(None, group, device)?;
    let mut errs = Vec::new();
    let mut counts = Vec::new();
    for bits in BITS {
        let (q, _, c) = run_dit(Some(bits), group, device)?;
        errs.push(rel_l2(&q, &y));
        counts.push(c);
    }
    println!(
        "| DiT `krea2` (text fusion + DiT) | velocity | {:.2e} | {:.2e} | {:.2e} | {} of {} | {} → {} / {} |",
        rel_l2(&y, &reference),
        errs[0],
        errs[1],
        counts[0].quantized,
        counts[0].listed,
        counts[0].f16_bytes,
        counts[0].stored_bytes,
        counts[1].stored_bytes
    );
    Ok(())
}

/// For scale: one real-sized Linear (896 → 896, weights and inputs uniform in [-2, 2]) at
/// group 32, computed in f64 on the host: the error of a single quantized layer.
fn linear_error() {
    let (k, n, m) = (896, 896, 4);
    let w = fixture_values(5, n * k);
    let x = fixture_values(6, m * k);
    let matmul = |w: &[f32]| -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    };
    let exact = matmul(&w);
    let mut row = String::from("| one Linear 896 → 896, uniform weights, group 32 | y | – |");
    let mut stored = Vec::new();
    for bits in [QuantBits::Q8, QuantBits::Q4] {
        match quantize(&w, n, k, bits, 32) {
            Ok(q) => {
                row.push_str(&format!(
                    " {:.2e} |",
                    rel_l2(&matmul(&q.dequantize()), &exact)
                ));
                stored.push(q.stored_bytes().to_string());
            }
            Err(e) => row.push_str(&format!(" {e} |")),
        }
    }
    row.push_str(&format!(
        " 1 of 1 | {} → {} |",
        2 * n * k,
        stored.join(" / ")
    ));
    println!("{row}");
}

fn layer(bits: QuantBits, k: usize, n: usize, device: &Device) -> Result<QuantLinear, CliError> {
    let w = fixture_values(3, n * k);
    let q = quantize(&w, n, k, bits, 32).map_err(device_err)?;
    QuantLinear::new(&q, None, device).map_err(device_err)
}

/// Median ms of each closure over `iters` rounds, the closures timed in turn within every
/// round (after three warm-up rounds), so a load change on a shared machine hits all of them
/// alike and their ratios stay fair.
fn interleaved_ms(
    device: &Device,
    iters: usize,
    fs: &mut [Box<dyn FnMut() -> Result<(), CliError> + '_>],
) -> Result<Vec<f64>, CliError> {
    let sync = || device.sync().map_err(|e| device_err(format!("{e:?}")));
    let mut times = vec![Vec::with_capacity(iters); fs.len()];
    for round in 0..iters.max(1) + 3 {
        for (f, t) in fs.iter_mut().zip(times.iter_mut()) {
            sync()?;
            let start = Instant::now();
            f()?;
            sync()?;
            if round >= 3 {
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

fn speed(iters: usize, all_variants: bool) -> Result<(), CliError> {
    let device = Backend::Wgpu.device()?;
    println!(
        "\nSpeed on wgpu, f32 activations, group 32, median of {iters} interleaved rounds, ms; \
         ratio = f32 ÷ quantized (mat-vec kernel for M ≤ {MATVEC_MAX_ROWS}, dequant.wgsl + matmul \
         above)\n"
    );
    let variants: &[Variant] = if all_variants {
        &[Variant::Matvec, Variant::Tiled, Variant::Dequant]
    } else {
        &[]
    };
    let extra = if all_variants {
        " q8: mat-vec / tiled / dequant+mm | q4: mat-vec / tiled / dequant+mm |"
    } else {
        ""
    };
    println!("| M × K → N | stands for | f32 matmul (baseline) | q8 | ratio | q4 | ratio |{extra}");
    println!(
        "|---|---|---:|---:|---:|---:|---:|{}",
        if all_variants { "---:|---:|" } else { "" }
    );
    for (m, k, n, what) in SHAPES {
        let x = Tensor::<2>::from_data(TensorData::new(fixture_values(1, m * k), [m, k]), &device);
        // As the model's float Linears hold it: a transposed view of the [N, K] checkpoint weight.
        let wt = Tensor::<2>::from_data(TensorData::new(fixture_values(3, n * k), [n, k]), &device)
            .transpose();
        let default = if m <= MATVEC_MAX_ROWS {
            Variant::Matvec
        } else {
            Variant::Dequant
        };
        let q8 = layer(QuantBits::Q8, k, n, &device)?;
        let q4 = layer(QuantBits::Q4, k, n, &device)?;
        let run = |l: &QuantLinear, v: Variant| {
            fused_variant(x.clone(), l, v).map(drop).map_err(device_err)
        };
        let mut fs: Vec<Box<dyn FnMut() -> Result<(), CliError> + '_>> = vec![
            Box::new(|| {
                drop(x.clone().matmul(wt.clone()));
                Ok(())
            }),
            Box::new(|| run(&q8, default)),
            Box::new(|| run(&q4, default)),
        ];
        for l in [&q8, &q4] {
            for &v in variants {
                // The mat-vec kernel re-reads the weight per 8 rows: not worth timing at 256.
                if !(v == Variant::Matvec && m > 16) {
                    fs.push(Box::new(move || run(l, v)));
                }
            }
        }
        let t = interleaved_ms(&device, iters, &mut fs)?;
        let mut row = format!(
            "| {m} × {k} → {n} | {what} | {:.3} | {:.3} | {:.2}× | {:.3} | {:.2}× |",
            t[0],
            t[1],
            t[0] / t[1],
            t[2],
            t[0] / t[2]
        );
        if all_variants {
            let per = if m > 16 { 2 } else { 3 };
            for chunk in t[3..].chunks(per) {
                let cells: Vec<String> = chunk.iter().map(|v| format!("{v:.3}")).collect();
                let pad = if per == 2 { "– / " } else { "" };
                row.push_str(&format!(" {pad}{} |", cells.join(" / ")));
            }
        }
        println!("{row}");
    }
    Ok(())
}

pub fn run(args: Args) -> Result<(), CliError> {
    if args.group == 0 || !args.group.is_multiple_of(8) {
        return Err(CliError::Usage(format!(
            "--group {}: a positive multiple of 8",
            args.group
        )));
    }
    if !args.skip_accuracy {
        accuracy(args.group, &Backend::Wgpu.device()?)?;
    }
    if !args.skip_speed {
        speed(args.iters as usize, args.all_variants)?;
    }
    Ok(())
}
