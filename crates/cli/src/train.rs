//! `unifusion train`: the demo-world training recipe (crates/train, docs/TRAINING.md) in one
//! command. Every stage writes under `--out`; rerunning the same command resumes where it
//! stopped (finished stages are skipped, an interrupted one continues from its checkpoint).

use std::path::PathBuf;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use unifusion_model::generator::{AutoencoderTinyConfig, ImagePositions, TextPositions};
use unifusion_train::recipe::{self, RecipeConfig, StageName};
use unifusion_train::trainer::Progress;

use crate::CliError;

/// Which backend trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrainBackend {
    /// burn's pure-Rust CPU backend (the fastest here: see docs/TRAINING.md).
    Flex,
    /// burn's wgpu backend (lavapipe on a machine without a GPU).
    Wgpu,
}

/// A stage on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StageArg {
    Tokenizer,
    Vae,
    Vlm,
    Dit,
}

#[derive(clap::Args)]
pub struct Args {
    /// Output directory (created; reused to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of everything: data, initialisation, noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stages to run, in recipe order (default: all).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub stages: Vec<StageArg>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = TrainBackend::Flex)]
    pub backend: TrainBackend,
    /// Seconds-long settings (smoke test of the whole recipe).
    #[arg(long)]
    pub tiny: bool,
    /// Override every training stage's step count (quick experiments and timing).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Override the DiT stage's step count only (ablation runs on a finished VLM and VAE).
    #[arg(long)]
    pub dit_steps: Option<usize>,
    /// Train the DiT as an ablation of the recipe (repeatable; its directory records it):
    /// `verifi-off` (condition on the user's tokens, not the rewrite), `last-layer` (last tap
    /// only, LAP skipped), `no-edit-data` (text-to-image and reconstruction only),
    /// `plain-loss` (unweighted flow-matching MSE: no extra weight on object tokens).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub ablation: Vec<Ablation>,
    /// Override the DiT's size as `HEADS,BLOCKS,MLP`: attention heads of 16 channels (the
    /// width is 16·HEADS, key/value heads HEADS/2), transformer blocks, and the MLP's hidden
    /// width (the recipe: 6,6,256). LAP and the refiner keep the VLM's width.
    #[arg(long, value_delimiter = ',', value_name = "HEADS,BLOCKS,MLP")]
    pub dit_size: Option<Vec<usize>>,
    /// Override the DiT's RoPE base (tuning runs; the recipe's value otherwise).
    #[arg(long)]
    pub dit_rope_theta: Option<f64>,
    /// Give the DiT's image tokens a fixed 2-D sine-cosine embedding of their absolute grid
    /// position beside RoPE (DiT's and SD3's layout; the recipe's since r32; the packed
    /// model's transformer config records it as `abs_pos_embed`): `--dit-abs-pos` or
    /// `--dit-abs-pos true` turns it on, `--dit-abs-pos false` off (RoPE alone)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub dit_abs_pos: Option<bool>,
    /// Override the DiT loss's extra weight on object tokens (tuning runs; 0 = plain MSE).
    #[arg(long)]
    pub dit_foreground_weight: Option<f32>,
    /// Export the DiT's exponential moving average of the weights with this decay per step
    /// (tuning runs; 0 = the last weights). The last weights go to
    /// `dit/transformer-last.safetensors` beside it.
    #[arg(long)]
    pub dit_ema: Option<f64>,
    /// Override the DiT's samples per step (tuning runs).
    #[arg(long)]
    pub dit_batch: Option<usize>,
    /// Split each DiT step's batch over this many threads (1 to the batch size), each on its
    /// own copy of the weights, the gradients summed before the step. Part of the stage's
    /// settings: the shards draw their own noise.
    #[arg(long)]
    pub dit_shards: Option<usize>,
    /// Train each DiT batch this many steps (1 to 16; the recipe's 4), with fresh noise,
    /// timesteps and dropout each time: the frozen VLM's conditions and the VAE's latents are
    /// computed once a batch, so a step costs less (interleaved: a batch's uses are this many
    /// steps apart).
    #[arg(long, value_name = "STEPS")]
    pub dit_reuse: Option<usize>,
    /// The VAE's pixels per latent cell: 2, 4 (the recipe's) or 8. The DiT packs 2 × 2
    /// latent cells a token (see `--dit-patch-size`), so 2 gives it 256 tokens for a 64-px
    /// image, 4 gives 64. The run's `vae/stage.json` records it: later calls on that run read
    /// it from there.
    #[arg(long, value_name = "PX")]
    pub vae_downscale: Option<usize>,
    /// The VAE's latent channels (the recipe's 8); the DiT's tokens are patch² (4) × as wide.
    /// Later calls on the run read it from `vae/stage.json`.
    #[arg(long, value_name = "CHANNELS")]
    pub vae_latent_channels: Option<usize>,
    /// Latent cells per DiT token along each axis: 1, 2 (the recipe's), 4 or 8. With
    /// `--vae-downscale 2`, 4 gives the recipe's 64 tokens for a 64-px image, each of 16
    /// cells. The packed model's transformer config records it as `patch_size`.
    #[arg(long, value_name = "CELLS")]
    pub dit_patch_size: Option<usize>,
    /// As `--dit-shards`, for the VAE stage.
    #[arg(long)]
    pub vae_shards: Option<usize>,
    /// Start the VAE stage from a trained autoencoder (another run's
    /// `vae/autoencoder.safetensors`, same compression) and train its decoder only, on latents
    /// noised at a level drawn per image (`--vae-latent-noise`): the encoder, so a DiT trained
    /// on it, stays valid. Copy the other run's tokenizer, VLM and DiT beside it and run
    /// `--stages vae` to get a model with the new decoder
    #[arg(long, value_name = "SAFETENSORS")]
    pub vae_tune_decoder: Option<PathBuf>,
    /// The VAE's latent noise: the fixed standard deviation added before decoding (the
    /// recipe's 0.1), or with `--vae-tune-decoder` the scale of the per-image level
    #[arg(long)]
    pub vae_latent_noise: Option<f32>,
    /// Override the VAE's peak learning rate (tuning runs)
    #[arg(long)]
    pub vae_lr: Option<f64>,
    /// As `--dit-shards`, for the VLM stage (its loss is the same; only the float sums differ).
    #[arg(long)]
    pub vlm_shards: Option<usize>,
    /// Override the DiT's peak learning rate (tuning runs).
    #[arg(long)]
    pub dit_lr: Option<f64>,
    /// Override the location of the DiT's logit-normal timestep density, `t = σ(N(m, 1))`
    /// (tuning runs; above 0 trains more at high noise).
    #[arg(long, allow_hyphen_values = true)]
    pub dit_t_mean: Option<f32>,
    /// The DiT's task weights as `caption,rewrite,edit,transfer` (caption = reconstruction,
    /// rewrite = text to image; tuning runs; e.g. `0.5,2,2,0.25`).
    #[arg(long, value_delimiter = ',')]
    pub dit_mix: Option<Vec<f32>>,
    /// Where the DiT's RoPE places the VLM's image-token rows: `origin` (with the text) or
    /// `grid` (on the latent grid, as FLUX Kontext places its context image). The packed
    /// model records it (`pipeline.image_positions`).
    #[arg(long, value_enum)]
    pub dit_image_positions: Option<ImagePositionsArg>,
    /// Where the DiT's RoPE places the condition's text rows: `origin` (Krea 2's corner of
    /// the latent grid) or `center` (the grid's centre, so offsets run symmetric around 0).
    /// The packed model records it (`pipeline.text_positions`).
    #[arg(long, value_enum)]
    pub dit_text_positions: Option<TextPositionsArg>,
    /// Edits and transfers also weigh the DiT's loss on the latent tokens where the target
    /// differs from the input image (a removed object's place), not only on the target's
    /// objects (tuning runs; needs a foreground weight above 0).
    #[arg(long)]
    pub dit_weight_changes: bool,
    /// Train the DiT on latents normalized per channel to mean 0, standard deviation 1
    /// (measured on the frozen encoder at the stage's start); the packed VAE config carries
    /// the statistics (`latents_mean`, `latents_std`) and the pipeline undoes them.
    #[arg(long)]
    pub dit_normalize_latents: bool,
    /// Train the DiT on binding pairs (the recipe's since r38): each text-to-image sample of
    /// two or more colours is followed in its batch by the same objects with their colours
    /// handed on, under the same noise and timestep, so the two differ only in which object
    /// has which colour: `--dit-binding-pairs` or `--dit-binding-pairs true` turns them on,
    /// `--dit-binding-pairs false` off (every sample drawn on its own)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub dit_binding_pairs: Option<bool>,
    /// Train the DiT on count pairs: each text-to-image sample of two or more objects is
    /// followed by the same scene less one object, under the same noise and timestep, so the
    /// DiT learns to leave cells its description does not name empty. With binding pairs
    /// also on, each pair is one kind or the other. `--dit-count-pairs` or `true` on, `false`
    /// off (the recipe's)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub dit_count_pairs: Option<bool>,
    /// Placement pairs: the partner of a text-to-image sample is its objects moved between
    /// their cells. With other pair kinds on, each pair is one kind by a toss.
    /// `--dit-placement-pairs` or `true` on, `false` off (the recipe's)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub dit_placement_pairs: Option<bool>,
    /// Start the DiT from a finished DiT's weights (another run's
    /// `dit/transformer.safetensors`, same transformer config) and fine-tune them under this
    /// run's schedule, batch and seed (e.g. a continuation at a bigger batch on a GPU)
    #[arg(long, value_name = "SAFETENSORS")]
    pub dit_init: Option<PathBuf>,
    /// Override the VLM's `downsample_ratio` (tuning runs): 1 keeps every 8-px patch as an
    /// image token (64 tokens for a 64-px image) where the recipe's 0.5 merges 2 × 2 patches
    /// (16 tokens). Later calls on the run read it from `vlm/stage.json`.
    #[arg(long)]
    pub vlm_downsample_ratio: Option<f64>,
    /// Stop (checkpointed, resumable) after the first step past this many minutes.
    #[arg(long)]
    pub time_limit_min: Option<f64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `--dit-image-positions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImagePositionsArg {
    /// At the origin, with the text tokens.
    Origin,
    /// On the latent grid.
    Grid,
}

/// `--dit-text-positions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TextPositionsArg {
    /// At the origin, a corner of the latent grid.
    Origin,
    /// At the latent grid's centre.
    Center,
}

/// A DiT ablation (issue 8's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ablation {
    /// Condition on the states of the user's own tokens instead of the VLM's rewrite.
    VerifiOff,
    /// The last VLM tap only, straight into the refiner (LAP skipped).
    LastLayer,
    /// No edit or transfer samples: text-to-image and reconstruction only.
    NoEditData,
    /// Plain flow-matching MSE: object tokens weigh as much as background ones.
    PlainLoss,
}

fn stage_name(s: StageArg) -> StageName {
    match s {
        StageArg::Tokenizer => StageName::Tokenizer,
        StageArg::Vae => StageName::Vae,
        StageArg::Vlm => StageName::Vlm,
        StageArg::Dit => StageName::Dit,
    }
}

/// The shapes a run's finished or started stages were built with: the VAE (downscale and
/// latent channels, so also the DiT's input width) from `vae/stage.json` and the VLM's
/// `downsample_ratio` from `vlm/stage.json`. A later call that leaves the flags out takes them
/// from there; one whose flags ask for another shape is refused before anything runs (the
/// stage's weights could not load into it).
fn adopt_run_shape(args: &Args, config: &mut RecipeConfig) -> Result<(), CliError> {
    let saved = |stage: &str| {
        recipe::saved_settings(&args.out.join(stage)).map_err(|e| CliError::Usage(e.to_string()))
    };
    if let Some(settings) = saved("vae")? {
        let path = args.out.join("vae/stage.json");
        let vae: AutoencoderTinyConfig = serde_json::from_value(settings["vae"]["vae"].clone())
            .map_err(|e| CliError::Usage(format!("{}: its VAE config: {e}", path.display())))?;
        let compression = |v: &AutoencoderTinyConfig| (v.downscale(), v.latent_channels);
        // A flag left out means the run's value, not the recipe's.
        let have = compression(&vae);
        let want = (
            args.vae_downscale.unwrap_or(have.0),
            args.vae_latent_channels.unwrap_or(have.1),
        );
        if want != have {
            return Err(CliError::Usage(format!(
                "{} trained a {}× VAE with {} latent channels; --vae-downscale / --vae-latent-channels ask for {}× with {}: use another --out",
                args.out.join("vae").display(),
                have.0,
                have.1,
                want.0,
                want.1
            )));
        }
        if compression(&config.vae.vae) != have {
            config.vae = config
                .vae
                .clone()
                .with_compression(have.0, have.1)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        }
    }
    if let Some(settings) = saved("vlm")? {
        let path = args.out.join("vlm/stage.json");
        let ratio = settings["vlm"]["vlm"]["downsample_ratio"]
            .as_f64()
            .filter(|r| r.is_finite() && *r > 0.0)
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "{}: no valid vlm.vlm.downsample_ratio",
                    path.display()
                ))
            })?;
        if ratio != config.vlm.vlm.downsample_ratio {
            if args.vlm_downsample_ratio.is_some() {
                return Err(CliError::Usage(format!(
                    "{} trained with --vlm-downsample-ratio {ratio}, not {}: use another --out",
                    args.out.join("vlm").display(),
                    config.vlm.vlm.downsample_ratio
                )));
            }
            config.vlm.vlm.downsample_ratio = ratio;
        }
    }
    Ok(())
}

/// Sets the DiT's patch size (`--dit-patch-size`, else the recipe's) and the token width it
/// makes of the VAE's latents; refuses a patch the VAE's latent grid does not split into.
fn fit_dit_patches(args: &Args, config: &mut RecipeConfig) -> Result<(), CliError> {
    let p = args
        .dit_patch_size
        .unwrap_or(config.dit.transformer.patch_size);
    if ![1, 2, 4, 8].contains(&p) {
        return Err(CliError::Usage(format!(
            "--dit-patch-size must be 1, 2, 4 or 8, not {p}"
        )));
    }
    let downscale = config.vae.downscale().max(1);
    let grid = config.vae.image_size as usize / downscale;
    if !grid.is_multiple_of(p) || grid < p {
        return Err(CliError::Usage(format!(
            "--dit-patch-size {p}: a {downscale}× VAE gives a {grid}×{grid} latent grid, which {p}×{p} patches do not tile"
        )));
    }
    let t = &mut config.dit.transformer;
    t.patch_size = p;
    t.in_channels = p * p * config.vae.vae.latent_channels;
    Ok(())
}

/// `unifusion train`.
pub fn run(args: Args) -> Result<(), CliError> {
    let backend = match args.backend {
        TrainBackend::Flex => unifusion_train::Backend::Flex,
        TrainBackend::Wgpu => {
            crate::device::require_wgpu_adapter()?;
            unifusion_train::Backend::Wgpu
        }
    };
    let mut config = if args.tiny {
        RecipeConfig::tiny(args.seed, backend)
    } else {
        RecipeConfig::recipe(args.seed, backend)
    };
    if args.vae_downscale.is_some() || args.vae_latent_channels.is_some() {
        let downscale = args.vae_downscale.unwrap_or(config.vae.downscale());
        let channels = args
            .vae_latent_channels
            .unwrap_or(config.vae.vae.latent_channels);
        config.vae = config
            .vae
            .clone()
            .with_compression(downscale, channels)
            .map_err(CliError::Usage)?;
    }
    if let Some(steps) = args.steps {
        if steps == 0 {
            return Err(CliError::Usage("--steps must be at least 1".into()));
        }
        for optim in [
            &mut config.vae.optim,
            &mut config.vlm.optim,
            &mut config.dit.optim,
        ] {
            optim.steps = steps;
            optim.warmup = optim.warmup.min(steps / 10);
        }
    }
    if let Some(steps) = args.dit_steps {
        if steps == 0 {
            return Err(CliError::Usage("--dit-steps must be at least 1".into()));
        }
        config.dit.optim.steps = steps;
        config.dit.optim.warmup = config.dit.optim.warmup.min(steps / 10);
    }
    if let Some(size) = &args.dit_size {
        let &[heads, blocks, mlp] = size.as_slice() else {
            return Err(CliError::Usage("--dit-size takes HEADS,BLOCKS,MLP".into()));
        };
        if !(2..=64).contains(&heads) || heads % 2 != 0 {
            return Err(CliError::Usage(
                "--dit-size: HEADS must be even, 2 to 64".into(),
            ));
        }
        if !(1..=64).contains(&blocks) || !(16..=16384).contains(&mlp) {
            return Err(CliError::Usage(
                "--dit-size: BLOCKS must be 1 to 64 and MLP 16 to 16384".into(),
            ));
        }
        let t = &mut config.dit.transformer;
        t.num_attention_heads = heads;
        t.num_key_value_heads = heads / 2;
        t.num_layers = blocks;
        t.intermediate_size = mlp;
    }
    if let Some(theta) = args.dit_rope_theta {
        if !(theta.is_finite() && theta > 1.0) {
            return Err(CliError::Usage(
                "--dit-rope-theta must be a finite number above 1".into(),
            ));
        }
        config.dit.transformer.rope_theta = theta;
    }
    if let Some(on) = args.dit_abs_pos {
        config.dit.transformer.abs_pos_embed = on;
    }
    if let Some(reuse) = args.dit_reuse {
        if !(1..=16).contains(&reuse) {
            return Err(CliError::Usage("--dit-reuse must be 1 to 16".into()));
        }
        config.dit.reuse = reuse;
    }
    if let Some(w) = args.dit_foreground_weight {
        if !(w.is_finite() && w >= 0.0) {
            return Err(CliError::Usage(
                "--dit-foreground-weight must be a finite number ≥ 0".into(),
            ));
        }
        config.dit.foreground_weight = w;
    }
    if let Some(d) = args.dit_ema {
        if !(d.is_finite() && (0.0..1.0).contains(&d)) {
            return Err(CliError::Usage(
                "--dit-ema must be a decay in [0, 1)".into(),
            ));
        }
        config.dit.ema_decay = d;
    }
    if let Some(b) = args.dit_batch {
        if !(1..=1024).contains(&b) {
            return Err(CliError::Usage("--dit-batch must be 1 to 1024".into()));
        }
        config.dit.batch = b;
    }
    let shards = |flag: &str, n: Option<usize>, batch: usize, current: usize| match n {
        Some(n) if !(1..=batch).contains(&n) => Err(CliError::Usage(format!(
            "--{flag} must be 1 to the stage's batch ({batch})"
        ))),
        Some(n) => Ok(n),
        None => Ok(current),
    };
    config.dit.shards = shards(
        "dit-shards",
        args.dit_shards,
        config.dit.batch,
        config.dit.shards,
    )?;
    config.vae.shards = shards(
        "vae-shards",
        args.vae_shards,
        config.vae.batch,
        config.vae.shards,
    )?;
    config.vlm.shards = shards(
        "vlm-shards",
        args.vlm_shards,
        config.vlm.batch,
        config.vlm.shards,
    )?;
    if let Some(path) = &args.vae_tune_decoder {
        if !path.is_file() {
            return Err(CliError::Usage(format!(
                "--vae-tune-decoder: no file at {}",
                path.display()
            )));
        }
        config.vae.tune_decoder_from = Some(path.clone());
    }
    if let Some(sigma) = args.vae_latent_noise {
        if !(sigma.is_finite() && (0.0..=10.0).contains(&sigma)) {
            return Err(CliError::Usage(
                "--vae-latent-noise must be a finite number in [0, 10]".into(),
            ));
        }
        config.vae.latent_noise = sigma;
    }
    if let Some(lr) = args.vae_lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            return Err(CliError::Usage(
                "--vae-lr must be a finite number in (0, 1)".into(),
            ));
        }
        config.vae.optim.lr = lr;
    }
    if let Some(lr) = args.dit_lr {
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            return Err(CliError::Usage(
                "--dit-lr must be a finite number in (0, 1)".into(),
            ));
        }
        config.dit.optim.lr = lr;
    }
    if let Some(m) = args.dit_t_mean {
        if !(m.is_finite() && m.abs() <= 4.0) {
            return Err(CliError::Usage(
                "--dit-t-mean must be a finite number in [-4, 4]".into(),
            ));
        }
        config.dit.t_mean = m;
    }
    if let Some(w) = &args.dit_mix {
        let total: f32 = w.iter().sum();
        if w.len() != 4 || !w.iter().all(|x| x.is_finite() && *x >= 0.0) || total <= 0.0 {
            return Err(CliError::Usage(
                "--dit-mix takes four weights ≥ 0 (caption,rewrite,edit,transfer), not all 0"
                    .into(),
            ));
        }
        config.dit.mix = unifusion_train::data::TaskMix {
            caption: w[0],
            rewrite: w[1],
            edit: w[2],
            transfer: w[3],
        };
    }
    if let Some(r) = args.vlm_downsample_ratio {
        config.vlm.vlm.downsample_ratio = r;
        config
            .vlm
            .vlm
            .validate()
            .map_err(|e| CliError::Usage(format!("--vlm-downsample-ratio {r}: {e}")))?;
    }
    if let Some(p) = args.dit_image_positions {
        config.dit.image_positions = match p {
            ImagePositionsArg::Origin => ImagePositions::Origin,
            ImagePositionsArg::Grid => ImagePositions::Grid,
        };
    }
    if let Some(p) = args.dit_text_positions {
        config.dit.text_positions = match p {
            TextPositionsArg::Origin => TextPositions::Origin,
            TextPositionsArg::Center => TextPositions::Center,
        };
    }
    for ablation in &args.ablation {
        match ablation {
            Ablation::VerifiOff => config.dit.verifi = false,
            Ablation::LastLayer => config.dit.pooling = unifusion_train::dit::Pooling::LastLayer,
            Ablation::NoEditData => {
                config.dit.mix.edit = 0.0;
                config.dit.mix.transfer = 0.0;
            }
            Ablation::PlainLoss => config.dit.foreground_weight = 0.0,
        }
    }
    if args.dit_weight_changes {
        if config.dit.foreground_weight == 0.0 {
            return Err(CliError::Usage(
                "--dit-weight-changes needs a foreground weight above 0".into(),
            ));
        }
        config.dit.weight_changes = true;
    }
    config.dit.normalize_latents |= args.dit_normalize_latents;
    if let Some(on) = args.dit_binding_pairs {
        config.dit.binding_pairs = on;
    }
    if let Some(on) = args.dit_count_pairs {
        config.dit.count_pairs = on;
    }
    if let Some(on) = args.dit_placement_pairs {
        config.dit.placement_pairs = on;
    }
    if let Some(path) = &args.dit_init {
        if !path.is_file() {
            return Err(CliError::Usage(format!(
                "--dit-init: no file at {}",
                path.display()
            )));
        }
        config.dit.init_from = Some(path.clone());
    }
    adopt_run_shape(&args, &mut config)?;
    fit_dit_patches(&args, &mut config)?;
    let stages: Vec<StageName> = if args.stages.is_empty() {
        StageName::ALL.to_vec()
    } else {
        args.stages.iter().copied().map(stage_name).collect()
    };
    let mut bar: Option<(StageName, ProgressBar)> = None;
    let quiet = args.quiet;
    // Where the latest step stood: a time-boxed call says how far it got.
    let mut latest: Option<(StageName, Progress, usize)> = None;
    let mut progress = |stage: StageName, p: Progress| {
        let first = match latest {
            Some((s, _, first)) if s == stage => first,
            _ => p.step,
        };
        latest = Some((stage, p, first));
        if quiet {
            return;
        }
        if bar.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = ProgressBar::new(p.total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>9} [{bar:30}] {pos}/{len} {msg} ({elapsed}, ~{eta} left)",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(stage.as_str());
            b.set_position(p.step.saturating_sub(1) as u64);
            b.reset_eta();
            bar = Some((stage, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(p.step as u64);
            b.set_message(format!("loss {:.4} (avg {:.4})", p.loss, p.smooth));
        }
    };
    let deadline = args
        .time_limit_min
        .map(|m| std::time::Instant::now() + std::time::Duration::from_secs_f64(m.max(0.0) * 60.0));
    let reports = recipe::run(&args.out, &config, &stages, deadline, &mut progress)
        .map_err(|e| CliError::Device(e.to_string()))?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    for r in &reports {
        println!(
            "{:>9}: {:.1} s, {} steps, loss {:.4} -> {:.4}, {}",
            r.stage.as_str(),
            r.seconds,
            r.steps,
            r.first_loss,
            r.last_loss,
            r.details
        );
        if r.other_settings {
            println!(
                "{:>9}: finished earlier under other settings (its stage.json), kept as it is; delete {} to retrain it",
                r.stage.as_str(),
                args.out.join(r.stage.as_str()).display()
            );
        }
    }
    let done: Vec<StageName> = reports.iter().map(|r| r.stage).collect();
    if let Some(left) = stages.iter().find(|s| !done.contains(s)) {
        if let Some((stage, p, first)) = latest.filter(|(s, _, _)| s == left) {
            println!(
                "{:>9}: steps {first}-{} of {} in {:.1} s this call, loss {:.4} (avg {:.4})",
                stage.as_str(),
                p.step,
                p.total,
                p.elapsed,
                p.loss,
                p.smooth
            );
        }
        println!(
            "stopped at the time limit during `{}`; run the same command again to resume",
            left.as_str()
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
