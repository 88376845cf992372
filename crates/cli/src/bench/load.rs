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
use unifusion_weights::burn_sink::tensor_data;
use unifusion_weights::native::{DirOutput, DirSource, read_manifest};
use unifusion_weights::{CountingSink, Dtype, ModelInfo, Packer, TensorSink, load};

use crate::CliError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// Count tensors and bytes, keep nothing: the loader's own memory.
    Count,
    /// Keep every tensor on burn's Flex device (host memory, so the model itself counts).
    Flex,
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

fn measure(dir: &Path, sink: SinkKind) -> Result<serde_json::Value, CliError> {
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(e.to_string()))?;
    let sink_name = match sink {
        SinkKind::Count => "count",
        SinkKind::Flex => "flex",
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

pub fn run(args: Args) -> Result<(), CliError> {
    if let Some(dir) = &args.manifest {
        return child(dir, args.sink);
    }
    let root = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("unifusion-bench-load-{}", std::process::id()));
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "Streaming load, native files, f16 random tensors; MiB; peak = VmHWM − RSS before the load\n"
    );
    println!(
        "| model | shards | largest shard | sink | kept on device | peak − kept | bound (largest + 32) | within | load s | MB/s |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---|---:|---:|");
    let result = (|| {
        for (label, embedding) in [("layers only", false), ("with 272 MB embedding", true)] {
            let dir = root.join(if embedding { "embed" } else { "layers" });
            generate(&dir, args.size_mb, args.shard_size_mib, embedding)?;
            for sink in [SinkKind::Count, SinkKind::Flex] {
                let r = measure(&dir, sink)?;
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
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}
