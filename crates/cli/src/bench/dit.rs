//! `unifusion bench dit`: ms per `Krea2Transformer2DModel` forward (text fusion + DiT) at
//! several image token counts, and ms per VAE decode (AutoencoderKL, tiny), beside diffusers on
//! PyTorch CPU at the same configs and weights in the same run.
//!
//! The baseline is `scripts/fixtures/make_generator_fixtures.py bench`: it builds the random
//! models, saves them for this side to load, and prints its medians as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Tensor, TensorData};
use unifusion_model::generator::config::{AutoencoderKlConfig, AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::sampler::seeded_noise;
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{Krea2Transformer, RopeTable, WeightMap, position_ids};
use unifusion_model::precision::to_compute;

use super::median_ms;
use crate::CliError;
use crate::device::{Backend, PrecisionArg};

/// Text tokens in every DiT row (the baseline uses the same).
const TEXT_LEN: usize = 64;
/// Latent side of the VAE rows (16 channels; 128×128 images). Must match the baseline script.
const VAE_LATENT: usize = 16;

#[derive(clap::Args)]
pub struct Args {
    /// DiT size: `tiny` (the fixture's widths) or `small` (width 256, 2 blocks, 10 taps of 256).
    #[arg(long, default_value = "small", value_parser = ["tiny", "small"])]
    variant: String,
    /// Backend to time.
    #[arg(long, value_enum, default_value_t = Backend::Wgpu)]
    backend: Backend,
    /// Compute precision (f16 needs a wgpu adapter with shader-f16).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Image token counts (comma-separated; each becomes the nearest grid `⌊√n⌋ × n/⌊√n⌋`).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    tokens: Vec<usize>,
    /// Timed calls per row (median reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Python with torch + diffusers (scripts/fixtures/requirements.txt).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

fn load_dir<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<(T, WeightMap), CliError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| usage(format!("{}: {e}", dir.join(name).display())))
    };
    let config = serde_json::from_slice(&read("config.json")?).map_err(usage)?;
    let weights = WeightMap::from_safetensors(&read("weights.safetensors")?).map_err(usage)?;
    Ok((config, weights))
}

pub fn run(args: Args) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("unifusion-bench-dit-{}", args.variant));
    let tokens: Vec<String> = args.tokens.iter().map(usize::to_string).collect();
    let out = Command::new(&args.python)
        .arg("scripts/fixtures/make_generator_fixtures.py")
        .args(["bench", &args.variant])
        .arg(&dir)
        .args([tokens.join(","), args.iters.to_string()])
        .output()
        .map_err(|e| usage(format!("cannot run {}: {e}", args.python.display())))?;
    if !out.status.success() {
        return Err(usage(format!(
            "PyTorch baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let torch: serde_json::Value =
        serde_json::from_str(line).map_err(|e| usage(format!("baseline output {line:?}: {e}")))?;
    let iters = args.iters as usize;
    let (device, precision): (Device, _) = args.backend.device_with(args.precision)?;

    let (cfg, mut w): (Krea2Config, _) = load_dir(&dir.join("krea2"))?;
    let model = Krea2Transformer::load(&cfg, &mut w, &device).map_err(usage)?;
    println!(
        "Krea2Transformer2DModel `{}` ({} blocks, width {}, {}/{} heads, {} taps of {}), batch 1, {TEXT_LEN} text tokens, {precision}, median of {iters}, ms\n",
        args.variant,
        cfg.num_layers,
        cfg.hidden_size(),
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.num_text_layers,
        cfg.text_hidden_dim
    );
    let threads = torch["threads"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| image tokens | unifusion ({:?}) | diffusers, PyTorch CPU ({threads} threads) | ratio |",
        args.backend
    );
    println!("|---:|---:|---:|---:|");
    for &n in &args.tokens {
        let side = n.isqrt().max(1);
        let (gh, gw) = (side, n / side);
        let x = seeded_noise::<3>(1, [1, gh * gw, cfg.in_channels], &device);
        // The VLM's taps arrive in the compute dtype; latents stay f32 (`precision`).
        let e = to_compute(seeded_noise::<4>(
            2,
            [1, TEXT_LEN, cfg.num_text_layers, cfg.text_hidden_dim],
            &device,
        ));
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.5f32], [1]), &device);
        let rope = RopeTable::new(
            &position_ids(TEXT_LEN, gh, gw),
            cfg.axes_dims_rope,
            cfg.rope_theta,
            &device,
        );
        let ours = median_ms(&device, iters, || {
            let v = model
                .forward(x.clone(), e.clone(), t.clone(), &rope, None)
                .map_err(usage)?;
            drop(v);
            Ok(())
        })?;
        let base = torch["dit"][(gh * gw).to_string()]
            .as_f64()
            .unwrap_or(f64::NAN);
        println!(
            "| {} | {ours:.1} | {base:.1} | {:.2}× |",
            gh * gw,
            base / ours
        );
    }

    let (vcfg, mut w): (AutoencoderKlConfig, _) = load_dir(&dir.join("vae"))?;
    let vae = AutoencoderKl::load_decoder(&vcfg, &mut w, &device).map_err(usage)?;
    let (tcfg, mut w): (AutoencoderTinyConfig, _) = load_dir(&dir.join("tiny_vae"))?;
    let tiny = TinyDecoder::load(&tcfg, &mut w, "decoder", &device).map_err(usage)?;
    let z = to_compute(seeded_noise::<4>(
        3,
        [1, 16, VAE_LATENT, VAE_LATENT],
        &device,
    ));
    let side = |t: Tensor<4>| t.dims()[2];
    let vae_px = side(vae.decode(z.clone()).map_err(usage)?);
    let tiny_px = side(tiny.decode(z.clone()).map_err(usage)?);
    println!("\nVAE decode, 16×{VAE_LATENT}×{VAE_LATENT} latents, median of {iters}, ms\n");
    println!(
        "| decoder | unifusion ({:?}) | diffusers, PyTorch CPU | ratio |",
        args.backend
    );
    println!("|---|---:|---:|---:|");
    let ours = median_ms(&device, iters, || {
        vae.decode(z.clone()).map(drop).map_err(usage)
    })?;
    let base = torch["vae"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| AutoencoderKL (channels {:?}, {} res/level) → {vae_px}² | {ours:.1} | {base:.1} | {:.2}× |",
        vcfg.block_out_channels,
        vcfg.layers_per_block + 1,
        base / ours
    );
    let ours = median_ms(&device, iters, || {
        tiny.decode(z.clone()).map(drop).map_err(usage)
    })?;
    let base = torch["tiny_vae"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| AutoencoderTiny (TAEF1 layout) → {tiny_px}² | {ours:.1} | {base:.1} | {:.2}× |",
        base / ours
    );
    Ok(())
}
