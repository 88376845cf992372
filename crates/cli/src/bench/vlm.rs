//! `unifusion bench vlm`: VLM prefill and KV-cache decode throughput (tokens/s) beside
//! PyTorch CPU (transformers) on the same config and weights in the same run.
//!
//! The baseline is `scripts/fixtures/make_vlm_fixtures.py bench`: it builds the random model,
//! saves it for this side to load, and prints its own medians as JSON.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use burn::tensor::Device;
use unifusion_model::vlm::{GenerateOptions, InternVl, InternVlConfig, Weights};

use crate::CliError;
use crate::device::{Backend, PrecisionArg};

#[derive(clap::Args)]
pub struct Args {
    /// Model size: `tiny` (the fixture config) or `small` (Qwen2.5-0.5B width, 4 layers).
    #[arg(long, default_value = "tiny", value_parser = ["tiny", "small"])]
    variant: String,
    /// Backend to time.
    #[arg(long, value_enum, default_value_t = Backend::Wgpu)]
    backend: Backend,
    /// Compute precision (f16 needs a wgpu adapter with shader-f16).
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Prompt tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Generated tokens.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs (median reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Python with torch + transformers (scripts/fixtures/requirements.txt).
    #[arg(long, default_value = ".venv/bin/python")]
    python: PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: Args) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("unifusion-bench-vlm-{}", args.variant));
    let out = Command::new(&args.python)
        .arg("scripts/fixtures/make_vlm_fixtures.py")
        .args(["bench", &args.variant])
        .arg(&dir)
        .args([
            args.prompt_len.to_string(),
            args.new_tokens.to_string(),
            args.iters.to_string(),
        ])
        .output()
        .map_err(|e| CliError::Usage(format!("cannot run {}: {e}", args.python.display())))?;
    if !out.status.success() {
        return Err(CliError::Usage(format!(
            "PyTorch baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let torch: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| CliError::Usage(format!("baseline output {line:?}: {e}")))?;
    let num = |k: &str| torch[k].as_f64().unwrap_or(f64::NAN);

    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| CliError::Usage(format!("{}: {e}", dir.join(name).display())))
    };
    let text = String::from_utf8_lossy(&read("config.json")?).into_owned();
    let config = InternVlConfig::from_json(&text).map_err(|e| CliError::Usage(e.to_string()))?;
    let (device, precision): (Device, _) = args.backend.device_with(args.precision)?;
    let mut weights = Weights::new();
    weights
        .add_safetensors(&read("model.safetensors")?)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let model = InternVl::load(&config, &mut weights, &device)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let prompt: Vec<u32> = (0..args.prompt_len).map(|i| (i * 7 % 256) as u32).collect();
    let sync = || {
        device
            .sync()
            .map_err(|e| CliError::Device(format!("{e:?}")))
    };
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for i in 0..=args.iters {
        let t0 = Instant::now();
        let out = model
            .forward(
                unifusion_model::vlm::VlmInput {
                    ids: std::slice::from_ref(&prompt),
                    pixel_values: None,
                    attention_mask: None,
                },
                &[],
            )
            .map_err(|e| CliError::Usage(e.to_string()))?;
        drop(out.last.into_data());
        sync()?;
        let p = t0.elapsed().as_secs_f64();
        let opts = GenerateOptions {
            max_new_tokens: args.new_tokens,
            stop_tokens: vec![],
            taps: vec![],
        };
        let t0 = Instant::now();
        let g = pollster::block_on(model.generate(&prompt, None, &opts))
            .map_err(|e| CliError::Usage(e.to_string()))?;
        sync()?;
        let d = t0.elapsed().as_secs_f64() - p;
        if i > 0 {
            prefill.push(args.prompt_len as f64 / p);
            decode.push(g.ids.len() as f64 / d.max(1e-9));
        }
    }
    let (rp, rd) = (median(prefill), median(decode));
    println!(
        "VLM `{}` ({} layers, hidden {}), {precision}, prompt {} tokens, {} new tokens, median of {} runs, tokens/s\n",
        args.variant,
        config.text_config.num_hidden_layers,
        config.text_config.hidden_size,
        args.prompt_len,
        args.new_tokens,
        args.iters
    );
    println!(
        "| phase | unifusion ({:?}) | PyTorch CPU ({} threads) | ratio |",
        args.backend,
        num("threads")
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| prefill | {rp:.1} | {:.1} | {:.2}× |",
        num("prefill_tok_s"),
        rp / num("prefill_tok_s")
    );
    println!(
        "| decode | {rd:.1} | {:.1} | {:.2}× |",
        num("decode_tok_s"),
        rd / num("decode_tok_s")
    );
    Ok(())
}
