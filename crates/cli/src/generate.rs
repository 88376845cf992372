//! `unifusion generate` (text-to-image) and the pieces `edit` and `variation` share: the model
//! directory loader, the sampling flags, the progress bar and the PNG with its settings.
//!
//! Model directory (until the manifest loader is wired, see docs/WEIGHTS.md):
//! `config.json` ([`UniFusionConfig`]: `vlm`, `transformer`, `vae`, `pipeline`),
//! `vlm.safetensors` (transformers or original InternVL names), `transformer.safetensors`
//! (diffusers `Krea2Transformer2DModel` names), `vae.safetensors` (diffusers names),
//! `tokenizer.json`. `unifusion make-tiny-model` writes one.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use clap::ValueEnum;
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{Krea2Transformer, WeightMap};
use unifusion_model::pipeline::{
    Conditioning, Image, PipelineError, Request, Settings, Task, UniFusion, UniFusionConfig, Vae,
    VaeConfig,
};
use unifusion_model::vlm::{InternVl, Weights};

use crate::CliError;
use crate::device::Backend;
use crate::png_meta::{io_words, write_png};
use unifusion_model::vlm::processor::VlmTokenizer;

/// How the tapped layers are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pooling {
    /// Layerwise Attention Pooling (the model's own).
    Lap,
    /// The last tapped layer only (LAP skipped).
    LastLayer,
}

/// Flags every generating command takes.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Model directory (config.json, vlm/transformer/vae .safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Euler steps.
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Classifier-free guidance weight (1 = off).
    #[arg(long, default_value_t = 4.5)]
    pub guidance: f32,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output width in pixels.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Output height in pixels.
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Output PNG.
    #[arg(long, default_value = "unifusion.png")]
    pub out: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Backend::Wgpu)]
    pub backend: Backend,
    /// Condition on the prompt's own tokens instead of the VLM's rewrite (VERIFI off).
    #[arg(long)]
    pub no_verifi: bool,
    /// LAP or last layer only.
    #[arg(long, value_enum, default_value_t = Pooling::Lap)]
    pub pooling: Pooling,
    /// LAP layer dropout: zero the pooling weight of these taps (indices into the tap list).
    #[arg(long, value_delimiter = ',')]
    pub drop_layers: Vec<usize>,
    /// Most tokens VERIFI may write (default: the model's config).
    #[arg(long)]
    pub max_rewrite_tokens: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sample: SampleArgs,
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, CliError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| {
        CliError::Usage(format!(
            "{}: {} (a model directory holds config.json, vlm.safetensors, transformer.safetensors, vae.safetensors, tokenizer.json)",
            path.display(),
            io_words(&e)
        ))
    })
}

/// Loads a model directory onto `device`.
pub fn load_model(dir: &Path, device: &Device) -> Result<(UniFusion, VlmTokenizer), CliError> {
    let bad = |what: &str, e: String| CliError::Usage(format!("{}: {what}: {e}", dir.display()));
    if !dir.is_dir() {
        return Err(CliError::Usage(format!(
            "{}: no such model directory",
            dir.display()
        )));
    }
    let config: UniFusionConfig = serde_json::from_slice(&read(dir, "config.json")?)
        .map_err(|e| bad("config.json", e.to_string()))?;
    config
        .vlm
        .validate()
        .map_err(|e| bad("config.json", e.to_string()))?;
    let tokenizer = VlmTokenizer::from_bytes(&read(dir, "tokenizer.json")?)
        .map_err(|e| bad("tokenizer.json", e.to_string()))?;

    let mut weights = Weights::new();
    weights
        .add_safetensors(&read(dir, "vlm.safetensors")?)
        .map_err(|e| bad("vlm.safetensors", e.to_string()))?;
    let vlm = InternVl::load(&config.vlm, &mut weights, device)
        .map_err(|e| bad("vlm.safetensors", e.to_string()))?;

    let mut map = WeightMap::from_safetensors(&read(dir, "transformer.safetensors")?)
        .map_err(|e| bad("transformer.safetensors", e.to_string()))?;
    let transformer = Krea2Transformer::load(&config.transformer, &mut map, device)
        .map_err(|e| bad("transformer.safetensors", e.to_string()))?;
    map.finish()
        .map_err(|e| bad("transformer.safetensors", e.to_string()))?;

    let mut map = WeightMap::from_safetensors(&read(dir, "vae.safetensors")?)
        .map_err(|e| bad("vae.safetensors", e.to_string()))?;
    let vae = match &config.vae {
        VaeConfig::Kl(c) => Vae::Kl(
            AutoencoderKl::load_decoder(c, &mut map, device)
                .map_err(|e| bad("vae.safetensors", e.to_string()))?,
        ),
        VaeConfig::Tiny(c) => Vae::Tiny(
            TinyDecoder::load(c, &mut map, "decoder", device)
                .map_err(|e| bad("vae.safetensors", e.to_string()))?,
        ),
    };
    let mut pipeline = config.pipeline.clone();
    if pipeline.stop_tokens.is_empty()
        && let Some(id) = tokenizer.token_id("<|im_end|>")
    {
        pipeline.stop_tokens.push(id);
    }
    let model = UniFusion::new(vlm, &config.vlm, transformer, vae, &config.vae, pipeline)
        .map_err(|e| bad("config.json", e.to_string()))?;
    Ok((model, tokenizer))
}

impl SampleArgs {
    fn settings(&self) -> Settings {
        Settings {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            verifi: !self.no_verifi,
            conditioning: match (self.pooling, self.drop_layers.is_empty()) {
                (Pooling::LastLayer, _) => Conditioning::LastLayer,
                (Pooling::Lap, true) => Conditioning::Lap,
                (Pooling::Lap, false) => Conditioning::LapDropout(self.drop_layers.clone()),
            },
            ..Settings::default()
        }
    }

    /// Cheap checks before the model is loaded, so bad flags fail fast.
    fn check(&self) -> Result<(), CliError> {
        if self.width == 0 || self.height == 0 {
            return Err(CliError::Usage(format!(
                "--width/--height: {}×{} is empty",
                self.width, self.height
            )));
        }
        if self.steps == 0 {
            return Err(CliError::Usage("--steps must be at least 1".into()));
        }
        if !self.guidance.is_finite() {
            return Err(CliError::Usage("--guidance must be a finite number".into()));
        }
        if self.pooling == Pooling::LastLayer && !self.drop_layers.is_empty() {
            return Err(CliError::Usage(
                "--drop-layers applies to LAP, not to --pooling last-layer".into(),
            ));
        }
        if let Some(parent) = self.out.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
        {
            return Err(CliError::Usage(format!(
                "--out: directory {} does not exist",
                parent.display()
            )));
        }
        Ok(())
    }
}

fn task_name(task: Task) -> String {
    match task {
        Task::TextToImage => "text-to-image".into(),
        Task::Edit => "edit".into(),
        Task::MultiReference => "multi-reference".into(),
        Task::Variation => "variation".into(),
        Task::ZeroShotEdit { image_percent } => {
            format!("zero-shot-edit ({image_percent}% image steps)")
        }
    }
}

/// Loads the model, runs `task`, writes the PNG with its settings in text chunks.
pub fn run_task(
    task: Task,
    prompt: &str,
    images: &[Image],
    image_paths: &[PathBuf],
    args: &SampleArgs,
) -> Result<(), CliError> {
    args.check()?;
    let request = Request {
        task,
        prompt,
        images,
    };
    request.validate().map_err(usage)?;
    let device = args.backend.device();
    let (mut model, tokenizer) = load_model(&args.model, &device)?;
    if let Some(n) = args.max_rewrite_tokens {
        model.config.max_rewrite_tokens = n;
    }
    let settings = args.settings();
    model.validate_settings(&settings).map_err(usage)?;

    let mut bar = Progress::new(settings.steps, args.quiet);
    bar.message("rewriting the prompt (VERIFI)…");
    let output = pollster::block_on(model.run(&tokenizer, &request, &settings, |p| {
        bar.step(p.done);
        ControlFlow::Continue(())
    }))
    .map_err(usage)?;
    bar.finish();

    let images_text = image_paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = vec![
        (
            "Software",
            format!("unifusion {}", env!("CARGO_PKG_VERSION")),
        ),
        ("unifusion:task", task_name(task)),
        ("unifusion:prompt", prompt.to_string()),
        ("unifusion:rewritten_prompt", output.rewrite.clone()),
        (
            "unifusion:rewritten_ids",
            format!("{:?}", output.rewrite_ids),
        ),
        ("unifusion:seed", settings.seed.to_string()),
        ("unifusion:steps", settings.steps.to_string()),
        ("unifusion:guidance", settings.guidance.to_string()),
        (
            "unifusion:size",
            format!("{}x{}", settings.width, settings.height),
        ),
        ("unifusion:verifi", settings.verifi.to_string()),
        (
            "unifusion:conditioning",
            format!("{:?}", settings.conditioning),
        ),
        ("unifusion:taps", format!("{:?}", model.taps())),
        ("unifusion:model", args.model.display().to_string()),
    ];
    if !images_text.is_empty() {
        text.push(("unifusion:images", images_text));
    }
    write_png(&args.out, &output.image, &text)?;
    if !args.quiet {
        if settings.verifi {
            println!("rewritten prompt: {}", output.rewrite);
        }
        println!("wrote {}", args.out.display());
    }
    Ok(())
}

/// A one-line progress bar on stderr (`[=====>    ] 12/28 steps, 3.1 s, ~4.2 s left`).
///
/// Not indicatif: its `console` → `portable-atomic` features differ from the shared burn
/// build's and would force a rebuild of burn/cubecl/wgpu.
struct Progress {
    total: usize,
    quiet: bool,
    start: std::time::Instant,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Self {
        Self {
            total,
            quiet,
            start: std::time::Instant::now(),
        }
    }

    fn message(&mut self, text: &str) {
        if !self.quiet {
            eprint!("\r{text}");
        }
        self.start = std::time::Instant::now();
    }

    fn step(&mut self, done: usize) {
        if self.quiet {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * done / self.total.max(1);
        let elapsed = self.start.elapsed().as_secs_f64();
        let left = elapsed / done.max(1) as f64 * (self.total - done.min(self.total)) as f64;
        let bar: String = (0..WIDTH)
            .map(|i| match i.cmp(&filled) {
                std::cmp::Ordering::Less => '=',
                std::cmp::Ordering::Equal => '>',
                std::cmp::Ordering::Greater => ' ',
            })
            .collect();
        eprint!(
            "\r\x1b[2Ksampling [{bar}] {done}/{} steps, {elapsed:.1} s, ~{left:.1} s left",
            self.total
        );
    }

    fn finish(&self) {
        if !self.quiet {
            eprintln!();
        }
    }
}

/// Input problems are usage errors (exit 2); device failures are not.
fn usage(e: PipelineError) -> CliError {
    match e {
        PipelineError::Device(m) => CliError::Device(one_line(&m)),
        other => CliError::Usage(other.to_string()),
    }
}

/// A device error chain (`… Caused by: … Caused by: can't allocate …`) as one line: its
/// first line and its innermost cause.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("Caused by")
                && !l.starts_with("skipped")
                && !l.starts_with('(')
                && !l.contains("backtrace")
                && !l.starts_with("Asked at")
        })
        .collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if first != last => format!("{first}: {last}"),
        (Some(first), _) => first.to_string(),
        _ => message.to_string(),
    }
}

/// `unifusion generate`.
pub fn run(args: Args) -> Result<(), CliError> {
    run_task(Task::TextToImage, &args.prompt, &[], &[], &args.sample)
}
