//! `unifusion bench load`: peak host memory of a streaming load against the bound the loader
//! promises (largest shard + 32 MiB), on a generated model of ≥ 500 MB.
//!
//! The parent packs random tensors into a temp directory, then runs each measurement in a
//! child process (`--manifest DIR --sink ...`) so that VmHWM (peak RSS, from
//! `/proc/self/status`) holds nothing but the child's own load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use unifusion_model::generator::Krea2Transformer;
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::load::load_packed;
use unifusion_model::pipeline::{VaeConfig, every_third_layer};
use unifusion_model::vlm::{InternVl, Weights};
use unifusion_weights::burn_sink::tensor_data;
use unifusion_weights::dtype::convert_float;
use unifusion_weights::native::{DirOutput, DirSource, read_bounded, read_manifest};
use unifusion_weights::{CountingSink, Dtype, LoadStats, ModelInfo, Packer, TensorSink, load};

use crate::CliError;
use crate::pack::layout::Recorder;
use crate::tiny_model::{TINY_TOKENIZER, tiny_config};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// Count tensors and bytes, keep nothing: the loader's own memory.
    Count,
    /// Keep every tensor on burn's Flex device (host memory, so the model itself counts).
    Flex,
    /// The model's own sink (`unifusion_model::load`): every tensor to the Flex device, then
    /// the whole UniFusion pipeline built from them.
    Model,
}

#[derive(clap::Args)]
pub struct Args {
    /// Measure one load of this packed model (a child run) instead of generating models.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Sink of a child run.
    #[arg(long, value_enum, default_value = "count")]
    sink: SinkKind,
    /// Approximate size of each generated model, MB.
    #[arg(long, default_value_t = 520, value_parser = clap::value_parser!(u64).range(1..=8192))]
    size_mb: u64,
    /// Shard size limit, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    shard_size_mib: u64,
    /// Where generated models go (default: the system temp dir); removed afterwards.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only the whole-UniFusion model (skip the two bags of layers).
    #[arg(long)]
    unifusion_only: bool,
}

/// `(VmRSS, VmHWM)` in bytes.
fn rss() -> Result<(u64, u64), CliError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| CliError::Usage(format!("/proc/self/status: {e} (Linux only)")))?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(r), Some(h)) => Ok((r, h)),
        _ => Err(CliError::Usage(
            "no VmRSS/VmHWM in /proc/self/status".into(),
        )),
    }
}

/// Keeps every tensor as a flat burn tensor on the Flex device.
struct FlexSink {
    device: Device,
    kept: Vec<Tensor<1>>,
    bytes: u64,
    dtype: Option<burn::tensor::DType>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SinkError(String);

impl TensorSink for FlexSink {
    type Error = SinkError;
    fn tensor(
        &mut self,
        _: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), SinkError> {
        let n = shape.iter().product::<usize>();
        let data = tensor_data(dtype, &[n], bytes, dtype).map_err(|e| SinkError(e.to_string()))?;
        let tensor: Tensor<1> = Tensor::from_data(data, &self.device);
        // What the device holds, in its own dtype (Flex may widen F16).
        self.bytes += (n * tensor.dtype().size()) as u64;
        self.dtype = Some(tensor.dtype());
        self.kept.push(tensor);
        Ok(())
    }
}

/// One child run: load `dir` into `sink`, print one JSON line.
fn child(dir: &Path, sink: SinkKind) -> Result<(), CliError> {
    let (manifest, dir) = read_manifest(dir).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut source = DirSource { dir };
    let (baseline, _) = rss()?;
    let start = Instant::now();
    let (stats, kept) = match sink {
        SinkKind::Count => {
            let mut s = CountingSink::default();
            let stats = pollster::block_on(load(&manifest, &mut source, &mut s, None, |_| {}))
                .map_err(|e| CliError::Usage(e.to_string()))?;
            (stats, 0)
        }
        SinkKind::Model => {
            let entry = manifest
                .tokenizer
                .clone()
                .ok_or_else(|| CliError::Usage("the manifest names no tokenizer".into()))?;
            let tokenizer = read_bounded(&source.dir.join(&entry.file), entry.bytes)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            let device = Device::flex();
            let loaded = pollster::block_on(load_packed(
                &manifest,
                &mut source,
                &tokenizer,
                &device,
                |_| {},
            ))
            .map_err(|e| CliError::Usage(e.to_string()))?;
            let params: u64 = manifest.tensors().map(|t| t.element_count()).sum();
            drop(loaded);
            let stats = LoadStats {
                shards: manifest.shards.len(),
                tensors: manifest.tensors().count(),
                bytes: manifest.total_shard_bytes(),
                largest_shard: manifest.shards.iter().map(|s| s.bytes).max().unwrap_or(0),
            };
            // Flex holds the model in f32.
            (stats, params * 4)
        }
        SinkKind::Flex => {
            let mut s = FlexSink {
                device: Device::flex(),
                kept: Vec::new(),
                bytes: 0,
                dtype: None,
            };
            let stats = pollster::block_on(load(&manifest, &mut source, &mut s, None, |_| {}))
                .map_err(|e| CliError::Usage(e.to_string()))?;
            eprintln!("flex keeps {:?}", s.dtype);
            (stats, s.bytes)
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let (_, peak) = rss()?;
    println!(
        "{}",
        serde_json::json!({
            "baseline": baseline, "peak": peak, "kept": kept, "seconds": seconds,
            "bytes": stats.bytes, "largest_shard": stats.largest_shard,
            "shards": stats.shards, "tensors": stats.tensors,
        })
    );
    Ok(())
}

/// Fills `n` bytes from a xorshift stream.
fn random_bytes(state: &mut u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Packs a Qwen2.5-0.5B-shaped model of about `size_mb` MB (f16): optionally the 151674 × 896
/// embedding (272 MB, a shard of its own), then decoder layers until the size is reached.
fn generate(dir: &Path, size_mb: u64, shard_mib: u64, embedding: bool) -> Result<(), CliError> {
    let err = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let out = DirOutput::create(dir).map_err(|e| err(&e))?;
    let mut p = Packer::new(out, shard_mib << 20).map_err(|e| err(&e))?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut total = 0u64;
    let mut add =
        |p: &mut Packer<DirOutput>, name: String, shape: &[u64]| -> Result<u64, CliError> {
            let n: u64 = shape.iter().product::<u64>() * 2;
            let bytes = random_bytes(&mut state, n as usize);
            p.add(&name, Dtype::F16, shape, &bytes)
                .map_err(|e| err(&e))?;
            Ok(n)
        };
    if embedding {
        total += add(
            &mut p,
            "vlm.language_model.embed_tokens.weight".into(),
            &[151_674, 896],
        )?;
    }
    let layer: [(&str, [u64; 2]); 7] = [
        ("self_attn.q_proj.weight", [896, 896]),
        ("self_attn.k_proj.weight", [128, 896]),
        ("self_attn.v_proj.weight", [128, 896]),
        ("self_attn.o_proj.weight", [896, 896]),
        ("mlp.gate_proj.weight", [4864, 896]),
        ("mlp.up_proj.weight", [4864, 896]),
        ("mlp.down_proj.weight", [896, 4864]),
    ];
    let mut i = 0;
    while total < size_mb * 1_000_000 {
        for (name, shape) in layer {
            total += add(
                &mut p,
                format!("vlm.language_model.layers.{i:03}.{name}"),
                &shape,
            )?;
        }
        i += 1;
    }
    p.finish(
        ModelInfo {
            id: "bench-load".into(),
            version: "0".into(),
        },
        serde_json::json!({}),
        None,
    )
    .map_err(|e| err(&e))?;
    Ok(())
}

/// A whole UniFusion model whose VLM has Qwen2.5-0.5B's language model (896 wide, 24
/// layers, the 151 674-token tied embedding; ~494 M parameters) and the tiny model's vision
/// tower, DiT and VAE: f16 random tensors, tensor names found by recording the loaders.
fn generate_unifusion(dir: &Path, shard_mib: u64) -> Result<(), CliError> {
    let err = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let mut config = tiny_config();
    let text = &mut config.vlm.text_config;
    text.vocab_size = 151_674;
    text.hidden_size = 896;
    text.intermediate_size = 4864;
    text.num_hidden_layers = 24;
    text.num_attention_heads = 14;
    text.num_key_value_heads = Some(2);
    text.tie_word_embeddings = true;
    config.vlm.tie_word_embeddings = true;
    let taps = every_third_layer(24);
    config.transformer.text_hidden_dim = 896;
    config.transformer.num_text_layers = taps.len();
    config.pipeline.taps = taps;

    let device = Device::flex();
    let mut vlm = Weights::recording();
    InternVl::load(&config.vlm, &mut vlm, &device).map_err(|e| err(&e))?;
    let mut named: Vec<(String, Vec<usize>)> = vlm
        .recorded()
        .iter()
        .map(|(n, s)| (format!("vlm.{n}"), s.clone()))
        .collect();
    let mut rec = Recorder::default();
    Krea2Transformer::load(&config.transformer, &mut rec, &device).map_err(|e| err(&e))?;
    named.extend(
        std::mem::take(&mut rec.asked)
            .into_iter()
            .map(|(n, s)| (format!("transformer.{n}"), s)),
    );
    let VaeConfig::Tiny(vae) = &config.vae else {
        return Err(CliError::Usage("expected the tiny VAE".into()));
    };
    TinyDecoder::load(vae, &mut rec, "decoder", &device).map_err(|e| err(&e))?;
    named.extend(rec.asked.into_iter().map(|(n, s)| (format!("vae.{n}"), s)));

    let out = DirOutput::create(dir).map_err(|e| err(&e))?;
    let mut p = Packer::new(out, shard_mib << 20).map_err(|e| err(&e))?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (name, shape) in named {
        let n: usize = shape.iter().product();
        // Random f16 bit patterns may be NaN/inf; small uniform values load like real ones.
        let f32_bytes: Vec<u8> = random_bytes(&mut state, n * 2)
            .chunks_exact(2)
            .flat_map(|b| {
                let u = f32::from(u16::from_le_bytes([b[0], b[1]])) / 65535.0 - 0.5;
                (u * 0.04).to_le_bytes()
            })
            .collect();
        let values = convert_float(&f32_bytes, Dtype::F32, Dtype::F16)
            .ok_or_else(|| CliError::Usage("f32 → f16".into()))?;
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        p.add(&name, Dtype::F16, &shape, &values)
            .map_err(|e| err(&e))?;
    }
    let tokenizer = p
        .add_file("json", TINY_TOKENIZER.as_bytes())
        .map_err(|e| err(&e))?;
    let config = serde_json::to_value(&config).map_err(|e| err(&e))?;
    p.finish(
        ModelInfo {
            id: "bench-load-unifusion".into(),
            version: "0".into(),
        },
        config,
        Some(tokenizer),
    )
    .map_err(|e| err(&e))?;
    Ok(())
}

fn measure(dir: &Path, sink: SinkKind) -> Result<serde_json::Value, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(e.to_string()))?;
    let sink_name = match sink {
        SinkKind::Count => "count",
        SinkKind::Flex => "flex",
        SinkKind::Model => "model",
    };
    let out = Command::new(exe)
        .args(["bench", "load", "--sink", sink_name, "--manifest"])
        .arg(dir)
        .output()
        .map_err(|e| CliError::Usage(format!("running the child: {e}")))?;
    if !out.status.success() {
        return Err(CliError::Usage(format!(
            "child load failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).map_err(|e| CliError::Usage(format!("child output: {e}")))
}

/// One table row from a child's JSON.
fn row(label: &str, sink: SinkKind, r: &serde_json::Value) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let get = |k: &str| r.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let seconds = r
        .get("seconds")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(0.0);
    let peak = get("peak").saturating_sub(get("baseline"));
    let kept = get("kept");
    let over = peak.saturating_sub(kept);
    let bound = get("largest_shard") + (32 << 20);
    println!(
        "| {label}, {:.0} MB | {} | {:.1} | {:?} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.0} |",
        get("bytes") as f64 / 1e6,
        get("shards"),
        mib(get("largest_shard")),
        sink,
        mib(kept),
        mib(over),
        mib(bound),
        if over <= bound { "yes" } else { "NO" },
        seconds,
        get("bytes") as f64 / 1e6 / seconds.max(1e-9),
    );
}

pub fn run(args: Args) -> Result<(), CliError> {
    if let Some(dir) = &args.manifest {
        return child(dir, args.sink);
    }
    let root = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("unifusion-bench-load-{}", std::process::id()));
    println!(
        "Streaming load, native files, f16 random tensors; MiB; peak = VmHWM − RSS before the load\n"
    );
    println!(
        "| model | shards | largest shard | sink | kept on device | peak − kept | bound (largest + 32) | within | load s | MB/s |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---|---:|---:|");
    let result = (|| {
        let bags: &[(&str, bool)] = if args.unifusion_only {
            &[]
        } else {
            &[("layers only", false), ("with 272 MB embedding", true)]
        };
        for &(label, embedding) in bags {
            let dir = root.join(if embedding { "embed" } else { "layers" });
            generate(&dir, args.size_mb, args.shard_size_mib, embedding)?;
            for sink in [SinkKind::Count, SinkKind::Flex] {
                let r = measure(&dir, sink)?;
                row(label, sink, &r);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let label = "UniFusion, Qwen2.5-0.5B-sized VLM";
        let dir = root.join("unifusion");
        generate_unifusion(&dir, args.shard_size_mib)?;
        let sinks = [SinkKind::Count, SinkKind::Model];
        for sink in sinks {
            let r = measure(&dir, sink)?;
            row(label, sink, &r);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}
