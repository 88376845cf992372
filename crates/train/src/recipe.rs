//! The whole recipe in one call: tokenizer → VAE → VLM → DiT, each stage in its own
//! directory under `out`, each skipped when its `report.json` exists and resumed from its
//! checkpoint when it was interrupted. Deterministic by seed (and backend).
//!
//! ```text
//! out/recipe.json                 the settings of the latest run
//! out/tokenizer/tokenizer.json    stage 1
//! out/vae/                        checkpoint/, loss.csv, loss.png, report.json, autoencoder.safetensors
//! out/vlm/                        checkpoint/, loss.csv, loss.png, report.json, vlm.safetensors
//! out/dit/                        checkpoint/, loss.csv, loss.png, report.json, transformer.safetensors
//! out/model/                      config.json, tokenizer.json, vlm/transformer/vae.safetensors:
//!                                 a model directory `unifusion generate --model` reads
//! ```

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use unifusion_model::pipeline::config::SampleDefaults;
use unifusion_model::pipeline::{
    Conditioning, PipelineConfig, Settings, UniFusionConfig, VaeConfig, every_third_layer,
};
use unifusion_model::vlm::{InternVl, Weights};

use crate::dit::{DitStage, DitStageConfig, Frozen, LatentNorm};
use crate::trainer::{Limit, Progress, run_stage_until, write_atomic};
use crate::vae::{VaeStage, VaeStageConfig};
use crate::vlm::{VlmStage, VlmStageConfig};
use crate::{Backend, TrainError, named};

/// The stages, in recipe order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageName {
    Tokenizer,
    Vae,
    Vlm,
    Dit,
}

impl StageName {
    /// Every stage in order.
    pub const ALL: [StageName; 4] = [
        StageName::Tokenizer,
        StageName::Vae,
        StageName::Vlm,
        StageName::Dit,
    ];

    /// Directory and command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageName::Tokenizer => "tokenizer",
            StageName::Vae => "vae",
            StageName::Vlm => "vlm",
            StageName::Dit => "dit",
        }
    }
}

/// Stage 1's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerStageConfig {
    /// Ids in all: 256 bytes + 5 specials + merges.
    pub vocab_size: usize,
    /// Samples of each task whose text feeds the trainer.
    pub corpus_samples: u64,
}

/// Every stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecipeConfig {
    pub seed: u64,
    pub backend: Backend,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    pub tokenizer: TokenizerStageConfig,
    pub vae: VaeStageConfig,
    pub vlm: VlmStageConfig,
    pub dit: DitStageConfig,
}

impl RecipeConfig {
    /// The demo model's recipe.
    pub fn recipe(seed: u64, backend: Backend) -> Self {
        Self {
            seed,
            backend,
            checkpoint_every: 100,
            tokenizer: TokenizerStageConfig {
                vocab_size: 640,
                corpus_samples: 4000,
            },
            vae: VaeStageConfig::recipe(),
            vlm: VlmStageConfig::recipe(640),
            dit: DitStageConfig::recipe(
                &VlmStageConfig::recipe(640).vlm,
                3,
                VaeStageConfig::recipe().vae.latent_channels,
            ),
        }
    }

    /// Seconds-long settings for tests and smoke runs.
    pub fn tiny(seed: u64, backend: Backend) -> Self {
        Self {
            seed,
            backend,
            checkpoint_every: 10,
            tokenizer: TokenizerStageConfig {
                vocab_size: 384,
                corpus_samples: 200,
            },
            vae: VaeStageConfig::tiny(),
            vlm: VlmStageConfig::tiny(384),
            dit: DitStageConfig::tiny(
                &VlmStageConfig::tiny(384).vlm,
                2,
                VaeStageConfig::tiny().vae.latent_channels,
            ),
        }
    }

    /// The settings a stage's directory belongs to: seed, backend and the stage's own config
    /// (its inputs are the earlier stages' outputs, whatever settings made them).
    pub fn stage_settings(&self, stage: StageName) -> serde_json::Value {
        let own = match stage {
            StageName::Tokenizer => serde_json::json!(self.tokenizer),
            StageName::Vae => serde_json::json!(self.vae),
            StageName::Vlm => serde_json::json!(self.vlm),
            StageName::Dit => serde_json::json!(self.dit),
        };
        serde_json::json!({"seed": self.seed, "backend": self.backend, stage.as_str(): own})
    }

    /// The VLM taps LAP reads (every third hidden state).
    pub fn taps(&self) -> Vec<usize> {
        every_third_layer(self.vlm.vlm.text_config.num_hidden_layers)
    }

    /// The pipeline's config for the trained model.
    pub fn model_config(&self) -> UniFusionConfig {
        UniFusionConfig {
            vlm: self.vlm.vlm.clone(),
            transformer: self.dit.transformer.clone(),
            vae: VaeConfig::Tiny(self.vae.vae.clone()),
            pipeline: PipelineConfig {
                taps: self.taps(),
                max_rewrite_tokens: self.dit.max_rewrite_tokens,
                stop_tokens: vec![crate::tokenizer::IM_END],
                max_tiles: 1,
                image_positions: self.dit.image_positions,
                text_positions: self.dit.text_positions,
                defaults: Some(SampleDefaults {
                    width: self.vae.image_size as usize,
                    height: self.vae.image_size as usize,
                    steps: 20,
                    guidance: 3.0,
                    guidance_interval: None,
                }),
                ..PipelineConfig::default()
            },
        }
    }

    /// Fails unless the stages fit together (vocab, widths, taps, channels).
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Model(format!("recipe: {m}")));
        if self.vlm.vlm.text_config.vocab_size != self.tokenizer.vocab_size {
            return bad("the VLM's vocab_size must equal the tokenizer's".into());
        }
        let t = &self.dit.transformer;
        if t.text_hidden_dim != self.vlm.vlm.text_config.hidden_size
            || t.num_text_layers != self.taps().len()
        {
            return bad(
                "the DiT's text_hidden_dim / num_text_layers must match the VLM's width and taps"
                    .into(),
            );
        }
        if t.in_channels != t.patch_size * t.patch_size * self.vae.vae.latent_channels {
            return bad(
                "the DiT's in_channels must be patch_size² × the VAE's latent channels".into(),
            );
        }
        if self.vlm.image_size != self.vae.image_size
            || self.vlm.vlm.vision_config.image_size != [self.vae.image_size as usize; 2]
        {
            return bad("the VLM's tile size must equal the VAE's image size".into());
        }
        Ok(())
    }
}

/// What a stage reports when it finishes (also `report.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: StageName,
    /// Seconds spent in this process (a resumed stage counts only its own part).
    pub seconds: f64,
    /// Optimizer steps (0 for the tokenizer).
    pub steps: usize,
    /// Mean loss of the first and last 20 steps.
    pub first_loss: f32,
    pub last_loss: f32,
    /// Stage-specific measurements.
    pub details: serde_json::Value,
    /// Set (never written) when the stage had finished earlier under settings other than
    /// this call's: its output is kept as it is, and the caller should say so.
    #[serde(default, skip_serializing)]
    pub other_settings: bool,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), TrainError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Runs `stages` of `config` under `out`; `progress(stage, p)` after every step.
///
/// With a `deadline`, a stage stops (checkpointed) after the first step past it and the
/// recipe returns without its report; the same call later resumes it.
pub fn run(
    out: &Path,
    config: &RecipeConfig,
    stages: &[StageName],
    deadline: Option<Instant>,
    progress: &mut dyn FnMut(StageName, Progress),
) -> Result<Vec<StageReport>, TrainError> {
    config.validate()?;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    write_json(&out.join("recipe.json"), config)?;
    let mut reports = Vec::new();
    for &stage in StageName::ALL.iter().filter(|s| stages.contains(s)) {
        let dir = out.join(stage.as_str());
        let report_path = dir.join("report.json");
        if report_path.exists() {
            let text = std::fs::read_to_string(&report_path)
                .map_err(|e| TrainError::io(&report_path, e))?;
            let mut report: StageReport = serde_json::from_str(&text)
                .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", report_path.display())))?;
            report.other_settings =
                saved_settings(&dir)?.is_some_and(|saved| saved != config.stage_settings(stage));
            reports.push(report);
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        check_stage_settings(&dir, &config.stage_settings(stage))?;
        let limit = Limit {
            stop_step: usize::MAX,
            deadline,
        };
        let mut p = |x: Progress| progress(stage, x);
        let report = match stage {
            StageName::Tokenizer => Some(run_tokenizer(&dir, config)?),
            StageName::Vae => run_vae(&dir, config, limit, &mut p)?,
            StageName::Vlm => run_vlm(out, &dir, config, limit, &mut p)?,
            StageName::Dit => run_dit(out, &dir, config, limit, &mut p)?,
        };
        let Some(report) = report else {
            // Stopped by the deadline: no report, the next run resumes this stage.
            return Ok(reports);
        };
        write_json(&report_path, &report)?;
        reports.push(report);
    }
    write_model_dir(out, config)?;
    Ok(reports)
}

/// A stage's directory belongs to one set of settings: `stage.json` records them when the
/// stage starts, and a resume with other settings is refused (a later stage's settings may
/// change while an earlier stage's output is reused).
fn check_stage_settings(dir: &Path, settings: &serde_json::Value) -> Result<(), TrainError> {
    match saved_settings(dir)? {
        Some(saved) if &saved != settings => Err(TrainError::Checkpoint(format!(
            "{} was trained with other settings (seed, backend or the stage's config); use another --out or delete that directory",
            dir.display()
        ))),
        Some(_) => Ok(()),
        None => write_json(&dir.join("stage.json"), settings),
    }
}

/// The settings a stage's `stage.json` recorded, if it has one.
pub fn saved_settings(dir: &Path) -> Result<Option<serde_json::Value>, TrainError> {
    let path = dir.join("stage.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
}

fn read(path: &Path) -> Result<Vec<u8>, TrainError> {
    std::fs::read(path).map_err(|e| {
        TrainError::Checkpoint(format!(
            "{}: {e} (run the earlier stages first)",
            path.display()
        ))
    })
}

/// `out/model/` once every stage's output exists: the directory `unifusion generate` reads.
fn write_model_dir(out: &Path, config: &RecipeConfig) -> Result<(), TrainError> {
    let parts = [
        ("tokenizer.json", out.join("tokenizer/tokenizer.json")),
        ("vlm.safetensors", out.join("vlm/vlm.safetensors")),
        (
            "transformer.safetensors",
            out.join("dit/transformer.safetensors"),
        ),
        ("vae.safetensors", out.join("vae/decoder.safetensors")),
    ];
    if parts.iter().any(|(_, p)| !p.exists()) {
        return Ok(());
    }
    let mut model_config = config.model_config();
    if config.dit.normalize_latents {
        let path = out.join(LATENT_NORM);
        let norm: LatentNorm = serde_json::from_slice(&read(&path)?)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
        if let VaeConfig::Tiny(vae) = &mut model_config.vae {
            vae.latents_mean = Some(norm.mean);
            vae.latents_std = Some(norm.std);
        }
    }
    let dir = out.join("model");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    for (name, from) in &parts {
        write_atomic(&dir.join(name), &read(from)?)?;
    }
    write_json(&dir.join("config.json"), &model_config)
}

/// The DiT stage's latent normalization (`LatentNorm`), which the exported VAE config carries.
const LATENT_NORM: &str = "dit/latent_norm.json";

fn run_vlm(
    out: &Path,
    dir: &Path,
    config: &RecipeConfig,
    limit: Limit,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<StageReport>, TrainError> {
    let json = String::from_utf8(read(&out.join("tokenizer/tokenizer.json"))?)
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let mut stage = VlmStage::new(config.vlm.clone(), &json, config.seed, config.backend)?;
    let run = run_stage_until(&mut stage, dir, config.checkpoint_every, limit, progress)?;
    if !run.finished {
        return Ok(None);
    }
    write_atomic(
        &dir.join("vlm.safetensors"),
        &named::safetensors_bytes(&stage.tensors())?,
    )?;
    let eval = stage.evaluate(8)?;
    let (first, last) = run.curve.first_last_mean(20);
    Ok(Some(StageReport {
        stage: StageName::Vlm,
        other_settings: false,
        seconds: run.seconds,
        steps: config.vlm.optim.steps,
        first_loss: first,
        last_loss: last,
        details: eval,
    }))
}

/// The frozen VLM and VAE encoder that stage 4 learns from, read from the earlier stages.
pub fn frozen(out: &Path, config: &RecipeConfig) -> Result<Frozen, TrainError> {
    let device = config.backend.device();
    let tokenizer = unifusion_model::vlm::processor::VlmTokenizer::from_bytes(&read(
        &out.join("tokenizer/tokenizer.json"),
    )?)
    .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let mut weights = Weights::new();
    weights
        .add_safetensors(&read(&out.join("vlm/vlm.safetensors"))?)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let vlm = InternVl::load(&config.vlm.vlm, &mut weights, &device)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let encoder = Frozen::encoder_from(
        &config.vae.vae,
        &read(&out.join("vae/autoencoder.safetensors"))?,
        &device,
    )?;
    Ok(Frozen {
        vlm,
        vlm_config: config.vlm.vlm.clone(),
        tokenizer,
        encoder,
        image_size: config.vae.image_size,
        taps: config.taps(),
    })
}

fn run_dit(
    out: &Path,
    dir: &Path,
    config: &RecipeConfig,
    limit: Limit,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<StageReport>, TrainError> {
    let frozen = frozen(out, config)?;
    let mut stage = DitStage::new(config.dit.clone(), frozen, config.seed, config.backend)?;
    let null_len = stage.null_len();
    let run = run_stage_until(&mut stage, dir, config.checkpoint_every, limit, progress)?;
    if !run.finished {
        return Ok(None);
    }
    if let Some(norm) = stage.latent_norm() {
        write_json(&out.join(LATENT_NORM), norm)?;
    }
    write_atomic(
        &dir.join("transformer.safetensors"),
        &named::safetensors_bytes(&stage.tensors())?,
    )?;
    if config.dit.ema_decay > 0.0 {
        // The last weights beside the average, to compare the two.
        write_atomic(
            &dir.join("transformer-last.safetensors"),
            &named::safetensors_bytes(&stage.last_tensors())?,
        )?;
    }
    write_model_dir(out, config)?;
    let size = config.vae.image_size as usize;
    let settings = Settings {
        width: size,
        height: size,
        steps: 20,
        guidance: 3.0,
        verifi: config.dit.verifi,
        conditioning: match config.dit.pooling {
            crate::dit::Pooling::Lap => Conditioning::Lap,
            crate::dit::Pooling::LastLayer => Conditioning::LastLayer,
        },
        ..Settings::default()
    };
    let eval = crate::eval::quick_eval(&out.join("model"), dir, config.seed, 8, &settings)?;
    let (first, last) = run.curve.first_last_mean(20);
    Ok(Some(StageReport {
        stage: StageName::Dit,
        other_settings: false,
        seconds: run.seconds,
        steps: config.dit.optim.steps,
        first_loss: first,
        last_loss: last,
        details: serde_json::json!({
            "null_condition_rows": null_len,
            "latent_norm": stage.latent_norm(),
            "text_to_image_20_steps_cfg_3": eval,
        }),
    }))
}

fn run_tokenizer(dir: &Path, config: &RecipeConfig) -> Result<StageReport, TrainError> {
    let began = Instant::now();
    let corpus = crate::data::text_corpus(config.seed, config.tokenizer.corpus_samples);
    let json = crate::tokenizer::train_bpe(&corpus, config.tokenizer.vocab_size)?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let tok = unifusion_model::vlm::processor::VlmTokenizer::from_bytes(json.as_bytes())
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    let (mut chars, mut ids) = (0usize, 0usize);
    for text in &corpus {
        chars += text.len();
        ids += tok
            .encode(text)
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?
            .len();
    }
    Ok(StageReport {
        stage: StageName::Tokenizer,
        other_settings: false,
        seconds: began.elapsed().as_secs_f64(),
        steps: 0,
        first_loss: 0.0,
        last_loss: 0.0,
        details: serde_json::json!({
            "vocab_size": config.tokenizer.vocab_size,
            "corpus_texts": corpus.len(),
            "chars_per_token": chars as f64 / ids.max(1) as f64,
            "bytes": json.len(),
            "system_prompt_tokens": tok
                .encode(unifusion_model::pipeline::config::VERIFI_SYSTEM_PROMPT)
                .map_err(|e| TrainError::Tokenizer(e.to_string()))?
                .len(),
        }),
    })
}

fn run_vae(
    dir: &Path,
    config: &RecipeConfig,
    limit: Limit,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<StageReport>, TrainError> {
    let mut stage = VaeStage::new(config.vae.clone(), config.seed, config.backend)?;
    let run = run_stage_until(&mut stage, dir, config.checkpoint_every, limit, progress)?;
    if !run.finished {
        return Ok(None);
    }
    let report = stage.evaluate(64)?;
    let path = dir.join("reconstructions.png");
    report
        .reconstructions
        .save(&path)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    write_atomic(
        &dir.join("autoencoder.safetensors"),
        &named::safetensors_bytes(&stage.autoencoder_tensors())?,
    )?;
    write_atomic(
        &dir.join("decoder.safetensors"),
        &named::safetensors_bytes(&stage.decoder_tensors())?,
    )?;
    let (first, last) = run.curve.first_last_mean(20);
    Ok(Some(StageReport {
        stage: StageName::Vae,
        other_settings: false,
        seconds: run.seconds,
        steps: config.vae.optim.steps,
        first_loss: first,
        last_loss: last,
        details: serde_json::to_value(&report)
            .map_err(|e| TrainError::Checkpoint(e.to_string()))?,
    }))
}
