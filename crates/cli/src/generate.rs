//! `unifusion generate` (text-to-image) and the pieces `edit` and `variation` share: the model
//! directory loader, the sampling flags, the progress bar and the PNG with its settings.
//!
//! A model is either packed (`manifest.json` + shards, docs/WEIGHTS.md; loaded through the
//! streaming loader, every shard verified) or an unpacked directory:
//! `config.json` ([`UniFusionConfig`]: `vlm`, `transformer`, `vae`, `pipeline`),
//! `vlm.safetensors` (transformers or original InternVL names), `transformer.safetensors`
//! (diffusers `Krea2Transformer2DModel` names), `vae.safetensors` (diffusers names),
//! `tokenizer.json`. `unifusion make-tiny-model` writes one.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use unifusion_model::load::{UnpackedModel, load_packed, load_unpacked};
use unifusion_model::pipeline::tasks::guidance_interval_is_valid;
use unifusion_model::pipeline::{
    Conditioning, Image, PipelineError, Request, Settings, Task, UniFusion,
};
use unifusion_weights::Progress as LoadProgress;
use unifusion_weights::native::{DirSource, MANIFEST_FILE, read_bounded, read_manifest};

use crate::CliError;
use crate::device::{Backend, PrecisionArg};
use crate::image_io::{io_words, write_png};
use unifusion_model::vlm::processor::VlmTokenizer;

/// How the tapped layers are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pooling {
    /// Layerwise Attention Pooling (the model's own).
    Lap,
    /// The last tapped layer only (LAP skipped).
    LastLayer,
}

/// `--guidance-interval LOW,HIGH`: two noise levels with 0 ≤ LOW < HIGH.
pub fn guidance_interval(text: &str) -> Result<[f32; 2], String> {
    let parts: Vec<_> = text.split(',').map(|p| p.trim().parse::<f32>()).collect();
    match parts[..] {
        [Ok(low), Ok(high)] if guidance_interval_is_valid([low, high]) => Ok([low, high]),
        _ => Err(format!(
            "`{text}`: want LOW,HIGH, two noise levels with 0 ≤ LOW < HIGH (e.g. 0.2,0.85)"
        )),
    }
}

/// Flags every generating command takes.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Model: a packed manifest.json (or its directory), or an unpacked model directory
    /// (default: the trained demo-world model).
    #[arg(long, default_value = "models/demo")]
    pub model: PathBuf,
    /// Euler steps (default: the model's own, else 28).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance weight, 1 = off (default: the model's own, else 4.5).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Guide only the steps starting at a noise level σ in (LOW, HIGH] (default: the
    /// model's own, else 0,1: every step); the others take one forward, unguided.
    #[arg(long, value_name = "LOW,HIGH", value_parser = guidance_interval)]
    pub guidance_interval: Option<[f32; 2]>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output width in pixels (default: the model's own, else 1024).
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height in pixels (default: the model's own, else 1024).
    #[arg(long)]
    pub height: Option<usize>,
    /// Output PNG.
    #[arg(long, default_value = "unifusion.png")]
    pub out: PathBuf,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Backend::Wgpu)]
    pub backend: Backend,
    /// Compute precision (docs/WEIGHTS.md, "Compute precision"). f32 by default, so native
    /// images stay the reference the browser's f32 path is compared with.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
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
            "{}: {} (a model is a packed manifest.json with its shards, or a directory holding config.json, vlm.safetensors, transformer.safetensors, vae.safetensors, tokenizer.json)",
            path.display(),
            io_words(&e)
        ))
    })
}

/// Loads a model onto `device`: a packed model (`manifest.json` or a directory holding one;
/// shards verified as they stream in) or an unpacked model directory.
pub fn load_model(
    path: &Path,
    device: &Device,
    quiet: bool,
) -> Result<(UniFusion, VlmTokenizer), CliError> {
    let packed = path.is_file() || path.join(MANIFEST_FILE).is_file();
    if packed {
        return load_packed_model(path, device, quiet);
    }
    if !path.is_dir() {
        return Err(CliError::Usage(format!(
            "{}: no such model (give a manifest.json, a directory holding one, or an unpacked model directory)",
            path.display()
        )));
    }
    load_model_dir(path, device)
}

fn load_packed_model(
    path: &Path,
    device: &Device,
    quiet: bool,
) -> Result<(UniFusion, VlmTokenizer), CliError> {
    let (manifest, dir) = read_manifest(path).map_err(|e| CliError::Usage(e.to_string()))?;
    let entry = manifest.tokenizer.as_ref().ok_or_else(|| {
        CliError::Usage(format!(
            "{}: the manifest names no tokenizer file",
            path.display()
        ))
    })?;
    let tokenizer = read_bounded(&dir.join(&entry.file), entry.bytes)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let mut source = DirSource { dir: dir.clone() };
    let bar = Progress::loading(quiet);
    let loaded = pollster::block_on(load_packed(
        &manifest,
        &mut source,
        &tokenizer,
        device,
        |p| bar.load_update(p),
    ));
    bar.bar.finish_and_clear();
    let loaded = loaded.map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    Ok((loaded.model, loaded.tokenizer))
}

/// Loads an unpacked model directory (see the module docs) onto `device`.
fn load_model_dir(dir: &Path, device: &Device) -> Result<(UniFusion, VlmTokenizer), CliError> {
    let loaded = load_unpacked(
        &UnpackedModel {
            config_json: &read(dir, "config.json")?,
            tokenizer_json: &read(dir, "tokenizer.json")?,
            vlm: &read(dir, "vlm.safetensors")?,
            transformer: &read(dir, "transformer.safetensors")?,
            vae: &read(dir, "vae.safetensors")?,
        },
        device,
    )
    .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    Ok((loaded.model, loaded.tokenizer))
}

impl SampleArgs {
    /// The flags over `base` (the model's `PipelineConfig::default_settings`).
    fn settings(&self, base: Settings) -> Settings {
        Settings {
            width: self.width.unwrap_or(base.width),
            height: self.height.unwrap_or(base.height),
            steps: self.steps.unwrap_or(base.steps),
            guidance: self.guidance.unwrap_or(base.guidance),
            guidance_interval: self.guidance_interval.unwrap_or(base.guidance_interval),
            seed: self.seed,
            verifi: !self.no_verifi,
            conditioning: match (self.pooling, self.drop_layers.is_empty()) {
                (Pooling::LastLayer, _) => Conditioning::LastLayer,
                (Pooling::Lap, true) => Conditioning::Lap,
                (Pooling::Lap, false) => Conditioning::LapDropout(self.drop_layers.clone()),
            },
            ..base
        }
    }

    /// Cheap checks before the model is loaded, so bad flags fail fast.
    fn check(&self) -> Result<(), CliError> {
        if self.width == Some(0) || self.height == Some(0) {
            return Err(CliError::Usage(
                "--width/--height: a side of 0 px is empty".into(),
            ));
        }
        if self.steps == Some(0) {
            return Err(CliError::Usage("--steps must be at least 1".into()));
        }
        if self.guidance.is_some_and(|g| !g.is_finite()) {
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
    let (device, precision) = args.backend.device_with(args.precision)?;
    let (mut model, tokenizer) = load_model(&args.model, &device, args.quiet)?;
    if let Some(n) = args.max_rewrite_tokens {
        model.config.max_rewrite_tokens = n;
    }
    let settings = args.settings(model.config.default_settings());
    model.validate_settings(&settings).map_err(usage)?;

    let bar = Progress::sampling(settings.steps, args.quiet);
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
            "unifusion:guidance_interval",
            format!("{:?}", settings.guidance_interval),
        ),
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
        ("unifusion:precision", precision.to_string()),
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

/// Progress bars on stderr (indicatif): bytes while the weights stream in, steps while sampling.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn hidden_unless(visible: bool) -> ProgressBar {
        if visible {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        }
    }

    /// A bar over the weights' bytes.
    fn loading(quiet: bool) -> Self {
        let bar = Self::hidden_unless(!quiet);
        bar.set_style(
            ProgressStyle::with_template(
                "loading  [{bar:30}] {bytes}/{total_bytes} {msg} ({bytes_per_sec}, ~{eta} left)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        Self { bar }
    }

    fn load_update(&self, p: &LoadProgress) {
        self.bar.set_length(p.bytes_total);
        self.bar.set_position(p.bytes_done);
        self.bar.set_message(format!(
            "shard {}/{}",
            (p.shard + 1).min(p.shards),
            p.shards
        ));
    }

    /// A bar over the sampling steps; the message says what runs before the first step.
    fn sampling(total: usize, quiet: bool) -> Self {
        let bar = Self::hidden_unless(!quiet);
        bar.set_length(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:9} [{bar:30}] {pos}/{len} steps, {elapsed_precise}, ~{eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("VERIFI");
        Self { bar }
    }

    fn step(&self, done: usize) {
        self.bar.set_message("sampling");
        self.bar.set_position(done as u64);
    }

    fn finish(&self) {
        self.bar.finish();
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
