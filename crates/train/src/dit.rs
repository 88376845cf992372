//! Stage 4: with the VLM and the VAE frozen, LAP + refiner + DiT (the model crate's
//! `Krea2Transformer`) by flow matching on VERIFI conditions.
//!
//! Condition of a sample: the frozen VLM runs once over `[VERIFI chat ; canonical answer ;
//! <|im_end|>]` and the rows `[image tokens ; answer tokens]` of every tapped layer are kept,
//! `[L, n_taps, h]`. This equals what the pipeline feeds LAP when the VLM's greedy rewrite is
//! the canonical answer (the generation's taps equal one full forward; `vlm::generate`).
//! With probability `cond_dropout` a sample is conditioned on the null condition instead:
//! the pipeline's own, the VLM's VERIFI output for the empty request, computed once here.
//!
//! Flow matching: `t = σ(n)`, `n ~ N(0, 1)` (logit-normal), `x_t = (1 − t)·z + t·ε`, target
//! `ε − z`, MSE over patchified latents, each latent token's error weighted `1 +
//! foreground_weight` where the target has object pixels (with `weight_changes`, for edits and
//! transfers also where the target differs from the first input; 1 elsewhere), normalised by
//! the weights' sum. Tasks: text-to-image (a user phrasing),
//! reconstruction (one image, no text: the caption task), edits and two-image transfers.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use unifusion_model::generator::config::{AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::layers::KeyMask;
use unifusion_model::generator::sampler::SeededNormal;
use unifusion_model::generator::tiny_vae::{AutoencoderTiny, TinyEncoder, channel_column};
use unifusion_model::generator::{
    ImagePositions, Krea2Transformer, RopeTable, TextCondition, TextPositions,
    condition_position_ids, patchify,
};
use unifusion_model::pipeline::config::VERIFI_SYSTEM_PROMPT;
use unifusion_model::pipeline::verifi::chat_tokens;
use unifusion_model::vlm::processor::VlmTokenizer;
use unifusion_model::vlm::{GenerateOptions, InternVl, InternVlConfig};
use unifusion_world::{RenderConfig, render};

use crate::data::{
    Sample, TaskMix, TextTask, changed_squares, foreground_squares, mix, one_fewer, rebound,
    relocated, sample,
};
use crate::named::{Init, NamedParams, NamedTensors, Recorder, read_safetensors};
use crate::tokenizer::IM_END;
use crate::trainer::{
    OptimConfig, Stage, Trainable, batch_share, is_one_shard, one_shard, shard_range, shard_seed,
};
use crate::vae::{rendered_batch, to_vec};
use crate::vlm::{VlmBatch, forward_shared_prefix, make_batch};
use crate::{Backend, TrainError};

/// The DiT stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DitStageConfig {
    /// LAP + refiner + DiT.
    pub transformer: Krea2Config,
    /// Samples per step.
    pub batch: usize,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    /// Task weights (caption = reconstruction, rewrite = text-to-image).
    pub mix: TaskMix,
    /// Probability that a sample trains the null condition (for CFG).
    pub cond_dropout: f32,
    /// Most tokens of the null condition's rewrite (the pipeline's `max_rewrite_tokens`).
    pub max_rewrite_tokens: usize,
    /// Condition on the VLM's rewrite (VERIFI, the recipe) or, `false`, on the states of the
    /// user's own tokens (the pipeline's `--no-verifi`): an ablation.
    #[serde(default = "verifi_on")]
    pub verifi: bool,
    /// LAP over every tap (the recipe) or the last tap only, LAP skipped: an ablation.
    #[serde(default)]
    pub pooling: Pooling,
    /// Extra loss weight of the latent tokens that hold any object pixel: a token's squared
    /// error counts `1 + foreground_weight` times (0 = plain MSE). Objects cover about a tenth
    /// of an image, so plain MSE spends most of its gradient on flat background.
    #[serde(default)]
    pub foreground_weight: f32,
    /// Location of the logit-normal timestep density: `t = σ(N(t_mean, 1))` (0 = SD3's
    /// default; above 0 spends more samples at high noise, where the layout is decided).
    #[serde(default)]
    pub t_mean: f32,
    /// Decay of an exponential moving average of the weights that the stage exports instead
    /// of the last ones (0 = none; the last weights then go out, as before).
    #[serde(default)]
    pub ema_decay: f64,
    /// Threads a step's batch is split over: each computes the loss and gradients of its
    /// share on its own copy of the weights, and the gradients are summed before one AdamW
    /// step. 1 = the whole batch on the calling thread. Recorded because shards draw their
    /// noise from streams of their own, so a run's numbers depend on it.
    #[serde(default = "one_shard", skip_serializing_if = "is_one_shard")]
    pub shards: usize,
    /// Where the image-token condition rows sit in the DiT's RoPE: at the origin with the
    /// text, or on the latent grid (FLUX Kontext's layout). Exported as the pipeline's
    /// `image_positions`.
    #[serde(default, skip_serializing_if = "ImagePositions::is_origin")]
    pub image_positions: ImagePositions,
    /// Where the condition's text rows sit in the DiT's RoPE: at the origin (Krea 2) or at
    /// the latent grid's centre ([`TextPositions`]). Exported as the pipeline's
    /// `text_positions`.
    #[serde(default, skip_serializing_if = "TextPositions::is_origin")]
    pub text_positions: TextPositions,
    /// Edits and transfers also weigh `1 + foreground_weight` on the latent tokens where the
    /// target differs from the first input image, not only on the target's objects: a
    /// removed object's place is background in the target, so the target-only weighting
    /// spends the least on the one region a removal changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weight_changes: bool,
    /// Train on latents normalized per channel to mean 0 and standard deviation 1 (measured
    /// on the frozen encoder at the stage's start, [`LatentNorm::measure`]); the exported VAE
    /// config carries the statistics (`latents_mean`, `latents_std`) so the pipeline undoes
    /// them before decoding. Off: the raw latents, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub normalize_latents: bool,
    /// Start from a finished DiT's weights (another run's `dit/transformer.safetensors`, the
    /// same transformer config) instead of a fresh initialisation: the stage then fine-tunes
    /// them under its own schedule, batch and seed (a continuation with other settings,
    /// e.g. a bigger batch on a GPU). Fresh optimizer state either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
    /// Steps each batch trains: its frozen parts' outputs (conditions, target latents, loss
    /// weights) are computed once and serve `reuse` steps, each with fresh noise, timesteps
    /// and dropout ([`batch_of_step`]: interleaved, so a batch's uses are `reuse` steps
    /// apart). 1 = a fresh batch every step. The frozen VLM and VAE are about 40 % of a
    /// recipe step (docs/BENCHMARKS.md), so reuse buys steps at a cost of fewer samples.
    #[serde(default = "one_shard", skip_serializing_if = "is_one_shard")]
    pub reuse: usize,
    /// Binding pairs: every odd sample of a batch whose predecessor is a text-to-image sample
    /// with two or more colours is instead that sample's binding partner ([`rebound`]: the
    /// same objects with their colours handed on), trained with the predecessor's noise,
    /// timestep and dropout when the two share a shard. The pair's losses then differ only
    /// by which object has which colour, the binding the condition probe finds learnt
    /// slowest. Off: every sample drawn on its own, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binding_pairs: bool,
    /// Count pairs: as binding pairs, with the partner the same scene less one object
    /// ([`one_fewer`]), so the pair's losses differ only by an object the partner's
    /// description leaves out. With binding pairs on too, each pair is one kind or the other
    /// by a toss (the other kind when the tossed one has no partner).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub count_pairs: bool,
    /// Placement pairs: as binding pairs, with the partner the same objects moved between
    /// their cells ([`relocated`]), so the pair's losses differ only by which object stands
    /// where. With other pair kinds on, a toss picks where each pair starts in the order
    /// colours, count, placement (the next kind on when that one has no partner).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub placement_pairs: bool,
}

/// The batch that step `k` trains on when every batch serves `reuse` steps: in each window
/// of `reuse²` steps, `reuse` fresh batches take turns (steps 0, 1, 2, 3 of `reuse` 2 train
/// batches 0, 1, 0, 1; steps 4–7 batches 2, 3, 2, 3), so two uses of a batch are `reuse`
/// steps apart and at most `reuse` batches are held at once. `reuse` 1: batch `k`.
pub fn batch_of_step(k: usize, reuse: usize) -> usize {
    let r = reuse.max(1);
    k / (r * r) * r + k % r
}

/// Per-channel statistics of the frozen encoder's latents: the DiT trains on
/// `(raw − mean[c]) / std[c]`, and the exported VAE config carries the two as `latents_mean`
/// and `latents_std`, which the pipeline undoes before decoding.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatentNorm {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl LatentNorm {
    /// Scenes the statistics are measured on.
    pub const SCENES: usize = 256;

    /// Mean and standard deviation of each channel of `encoder`'s latents over
    /// [`Self::SCENES`] target scenes of `task_mix` at `image_size`, drawn from `seed`'s own
    /// stream (so a resume measures the same).
    pub fn measure(
        encoder: &TinyEncoder,
        image_size: u32,
        seed: u64,
        task_mix: &TaskMix,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let render_config = RenderConfig::with_size(image_size);
        let (mut sum, mut sq, mut n) = (Vec::<f64>::new(), Vec::<f64>::new(), 0usize);
        let chunk = 32;
        for first in (0..Self::SCENES).step_by(chunk) {
            let images = (first..(first + chunk).min(Self::SCENES))
                .map(|i| {
                    render(
                        &sample(mix(seed, 0xD5), i as u64, task_mix).target,
                        &render_config,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let z = encoder
                .encode(rendered_batch(&images, device))
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let [b, c, h, w] = z.dims();
            let values = to_vec(z)?;
            sum.resize(c, 0.0);
            sq.resize(c, 0.0);
            for (i, v) in values.iter().enumerate() {
                let v = f64::from(*v);
                let ch = (i / (h * w)) % c;
                sum[ch] += v;
                sq[ch] += v * v;
            }
            n += b * h * w;
        }
        let n = n.max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std: Vec<f64> = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(0.0).sqrt())
            .collect();
        if let Some((c, s)) = std
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 1e-6))
        {
            return Err(TrainError::Model(format!(
                "latent channel {c} has standard deviation {s}: nothing to normalize"
            )));
        }
        Ok(Self { mean, std })
    }

    /// `(z − mean[c]) / std[c]` of latents `[B, C, h, w]`.
    fn apply(&self, z: Tensor<4>) -> Tensor<4> {
        let (mean, std) = (
            channel_column(&self.mean, &z),
            channel_column(&self.std, &z),
        );
        (z - mean) / std
    }
}

fn verifi_on() -> bool {
    true
}

/// How the DiT pools the VLM's taps while it trains (the pipeline's `Conditioning`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Layerwise Attention Pooling over every tap, then the refiner.
    #[default]
    Lap,
    /// The last tap straight into the refiner (the pipeline's `Conditioning::LastLayer`).
    LastLayer,
}

fn dit_config(
    vlm: &InternVlConfig,
    taps: usize,
    latent_channels: usize,
    d: (usize, usize, usize),
) -> Krea2Config {
    let (heads, layers, ffn) = d;
    let head_dim = 16;
    Krea2Config {
        in_channels: latent_channels * 4,
        patch_size: 2,
        num_layers: layers,
        attention_head_dim: head_dim,
        num_attention_heads: heads,
        num_key_value_heads: heads / 2,
        intermediate_size: ffn,
        timestep_embed_dim: 64,
        text_hidden_dim: vlm.text_config.hidden_size,
        num_text_layers: taps,
        text_num_attention_heads: vlm.text_config.num_attention_heads,
        text_num_key_value_heads: vlm.text_config.num_attention_heads / 2,
        text_intermediate_size: 2 * vlm.text_config.hidden_size,
        num_layerwise_text_blocks: 2,
        num_refiner_text_blocks: 2,
        axes_dims_rope: [4, 6, 6],
        // Krea's base. θ = 10 (spatial frequencies 1, 0.46, 0.22 instead of 1, 0.1, 0.01 on the
        // 8×8 grid) learnt faster (600 steps: t2i micro 0.263 against 0.177) but ended worse
        // (2800 steps: 0.320 against 0.365, relation 0.145 against 0.245); docs/TRAINING.md.
        rope_theta: 1000.0,
        norm_eps: 1e-5,
        abs_pos_embed: false,
    }
}

impl DitStageConfig {
    /// The recipe's DiT: width 96 (6 heads of 16), 6 blocks, on the recipe VLM's taps, with
    /// the image tokens' absolute position embedding beside RoPE.
    pub fn recipe(vlm: &InternVlConfig, taps: usize, latent_channels: usize) -> Self {
        let mut transformer = dit_config(vlm, taps, latent_channels, (6, 6, 256));
        // Placement per step doubles with it (the condition probe, r26); at 10 000 steps it
        // drew single objects best of all runs (r27). docs/TRAINING.md.
        transformer.abs_pos_embed = true;
        Self {
            transformer,
            batch: 8,
            optim: OptimConfig {
                // Bought by the shards and by `reuse` below: 10 000 steps at 4 steps a batch
                // take about the time 7000 fresh ones took (r33 2657 s alone, r28 2607 s),
                // and beat them held out and on single objects (docs/TRAINING.md "Each batch
                // serving four steps").
                steps: 10_000,
                lr: 1e-3,
                warmup: 100,
                final_lr_fraction: 0.05,
                weight_decay: 0.0,
                clip_norm: 1.0,
            },
            mix: TaskMix {
                caption: 1.0,
                rewrite: 2.0,
                edit: 1.0,
                transfer: 0.25,
            },
            cond_dropout: 0.1,
            max_rewrite_tokens: 96,
            verifi: true,
            pooling: Pooling::Lap,
            foreground_weight: 4.0,
            t_mean: 0.0,
            ema_decay: 0.0,
            shards: 4,
            image_positions: ImagePositions::Origin,
            text_positions: TextPositions::Origin,
            weight_changes: false,
            normalize_latents: false,
            init_from: None,
            reuse: 4,
            // Held out above r32 on both prompt sets (0.338 and 0.357 against 0.333 and
            // 0.317), attribute most (docs/TRAINING.md "Binding pairs").
            binding_pairs: true,
            count_pairs: false,
            placement_pairs: false,
        }
    }

    /// A few-second config for tests.
    pub fn tiny(vlm: &InternVlConfig, taps: usize, latent_channels: usize) -> Self {
        Self {
            transformer: dit_config(vlm, taps, latent_channels, (2, 1, 32)),
            batch: 2,
            optim: OptimConfig {
                steps: 30,
                lr: 3e-3,
                warmup: 3,
                final_lr_fraction: 0.5,
                weight_decay: 0.0,
                clip_norm: 1.0,
            },
            mix: TaskMix {
                caption: 1.0,
                rewrite: 1.0,
                edit: 1.0,
                transfer: 0.0,
            },
            cond_dropout: 0.2,
            max_rewrite_tokens: 8,
            verifi: true,
            pooling: Pooling::Lap,
            foreground_weight: 2.0,
            t_mean: 0.0,
            ema_decay: 0.0,
            shards: 1,
            image_positions: ImagePositions::Origin,
            text_positions: TextPositions::Origin,
            weight_changes: false,
            normalize_latents: false,
            init_from: None,
            reuse: 1,
            binding_pairs: false,
            count_pairs: false,
            placement_pairs: false,
        }
    }
}

/// How a transformer parameter starts, by its diffusers name: zero biases, zero `(1 + w)`
/// norms and modulation tables, a zero output layer (the velocity starts at 0), mean pooling
/// over the taps, fan-in normal elsewhere.
fn dit_init(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let zero = leaf == "bias"
        || name.contains("norm")
        || name.contains("scale_shift_table")
        || name.starts_with("final_layer.linear");
    if zero {
        Init::Zeros
    } else if name == "text_fusion.projector.weight" {
        Init::Const(1.0 / shape.iter().product::<usize>().max(1) as f32)
    } else if name.starts_with("time_mod_proj") {
        Init::Normal(0.02)
    } else {
        Init::fan_in(shape)
    }
}

/// Builds the transformer on `device` with its names, initialised for training from `seed`.
pub fn init_transformer(
    config: &Krea2Config,
    seed: u64,
    device: &Device,
) -> Result<(Krea2Transformer, NamedParams), TrainError> {
    let mut rec = Recorder::new(mix(seed, 0xD17));
    let model = Krea2Transformer::load(config, &mut rec, device)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let names = NamedParams::discover(&model, &rec.tensors)?;
    let mut rng = SeededNormal::new(mix(seed, 0xD18));
    let model = names.init(model, |p| {
        dit_init(&p.name, &p.shape).values(&p.shape, &mut rng)
    })?;
    Ok((model, names))
}

/// The frozen parts the DiT learns from.
pub struct Frozen {
    /// The trained VLM (plain device).
    pub vlm: InternVl,
    /// Its config.
    pub vlm_config: InternVlConfig,
    /// The tokenizer.
    pub tokenizer: VlmTokenizer,
    /// The trained VAE encoder (plain device).
    pub encoder: TinyEncoder,
    /// Image side.
    pub image_size: u32,
    /// Tapped hidden states, LAP order.
    pub taps: Vec<usize>,
}

impl Frozen {
    /// Loads the VAE encoder from `autoencoder.safetensors` bytes.
    pub fn encoder_from(
        cfg: &AutoencoderTinyConfig,
        bytes: &[u8],
        device: &Device,
    ) -> Result<TinyEncoder, TrainError> {
        let (model, names) = crate::vae::init_autoencoder(cfg, 0, device)?;
        let model: AutoencoderTiny = names.import(model, &read_safetensors(bytes)?, None)?;
        Ok(model.encoder)
    }

    /// `[L, n_taps, h]` per sample: `[image tokens ; answer tokens]` of every tap, or with
    /// `verifi` off `[image tokens ; the user's tokens]` (causal attention: the answer after
    /// them does not change their states).
    pub fn conditions(&self, batch: VlmBatch, verifi: bool) -> Result<Vec<Tensor<3>>, TrainError> {
        let device = self.vlm.text.embed_tokens.device();
        let seq = batch.ids.first().map(Vec::len).unwrap_or(0);
        let b = batch.ids.len();
        let spans = batch.spans.clone();
        let image_positions = batch.image_positions.clone();
        let user_positions = batch.user_positions.clone();
        let (out, prefix) = forward_shared_prefix(&self.vlm, batch, &self.taps)?;
        let rest = seq - prefix;
        let hidden = out.last.dims()[2];
        // [B·rest, n_taps, h]
        let stacked = Tensor::cat(
            out.taps
                .into_iter()
                .map(|(_, t)| t.reshape([b * rest, 1, hidden]))
                .collect(),
            1,
        );
        let mut conds = Vec::with_capacity(b);
        for (row, (&(start, end), images)) in spans.iter().zip(&image_positions).enumerate() {
            let mut picked: Vec<usize> = images.clone();
            if verifi {
                picked.extend(start..end);
            } else {
                picked.extend(&user_positions[row]);
                if picked.is_empty() {
                    // As the pipeline: nothing to condition on → the last template token.
                    picked.push(start - 1);
                }
            }
            let rows: Vec<i64> = picked
                .into_iter()
                .map(|p| (row * rest + p - prefix) as i64)
                .collect();
            let n = rows.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device);
            conds.push(stacked.clone().select(0, index));
        }
        Ok(conds)
    }

    /// The pipeline's null condition: the VERIFI rewrite of the empty request, no images;
    /// with `verifi` off, the last template token of the empty request.
    pub fn null_condition(&self, max_tokens: usize, verifi: bool) -> Result<Tensor<3>, TrainError> {
        let chat = chat_tokens(
            &self.tokenizer,
            VERIFI_SYSTEM_PROMPT,
            "",
            &[],
            self.vlm_config.tokens_per_tile(),
            self.vlm_config.image_token_id,
        )
        .map_err(|e| TrainError::Model(e.to_string()))?;
        let generation = pollster::block_on(self.vlm.generate(
            &chat.ids,
            None,
            &GenerateOptions {
                max_new_tokens: if verifi { max_tokens } else { 0 },
                stop_tokens: vec![IM_END],
                taps: self.taps.clone(),
            },
        ))
        .map_err(|e| TrainError::Model(e.to_string()))?;
        let (taps, rows) = if generation.ids.is_empty() {
            (generation.prompt_taps, vec![chat.ids.len() - 1])
        } else {
            let n = generation.ids.len();
            (generation.generated_taps, (0..n).collect())
        };
        let device = self.vlm.text.embed_tokens.device();
        let n = rows.len();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(rows.into_iter().map(|r| r as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        let parts: Vec<Tensor<3>> = taps
            .into_iter()
            .map(|(_, t)| {
                t.squeeze::<2>()
                    .select(0, index.clone())
                    .unsqueeze_dim::<3>(1)
            })
            .collect();
        Ok(Tensor::cat(parts, 1))
    }
}

/// The DiT stage.
pub struct DitStage {
    /// Settings.
    pub config: DitStageConfig,
    seed: u64,
    device: Device,
    frozen: Frozen,
    null: Tensor<3>,
    latent_norm: Option<LatentNorm>,
    dit: Trainable<Krea2Transformer>,
    batches: BatchCache,
}

impl DitStage {
    /// A fresh stage over the frozen VLM and VAE encoder.
    pub fn new(
        config: DitStageConfig,
        frozen: Frozen,
        seed: u64,
        backend: Backend,
    ) -> Result<Self, TrainError> {
        let device = backend.autodiff();
        let (model, names) = init_transformer(&config.transformer, seed, &device)?;
        let null = frozen.null_condition(config.max_rewrite_tokens, config.verifi)?;
        let latent_norm = if config.normalize_latents {
            Some(LatentNorm::measure(
                &frozen.encoder,
                frozen.image_size,
                seed,
                &config.mix,
                &device.clone().inner(),
            )?)
        } else {
            None
        };
        let mut dit =
            Trainable::new(model, names, config.optim.clone()).with_ema(config.ema_decay, 4);
        if let Some(path) = &config.init_from {
            dit.import_file(path, "--dit-init")?;
        }
        Ok(Self {
            config,
            seed,
            device,
            frozen,
            null,
            latent_norm,
            dit,
            batches: BatchCache::default(),
        })
    }

    /// How the stage maps the encoder's latents to the ones it trains on.
    pub fn latent_norm(&self) -> Option<&LatentNorm> {
        self.latent_norm.as_ref()
    }

    /// The transformer's tensors under diffusers names (`transformer.safetensors`): the
    /// weights' moving average where the stage keeps one, the last weights otherwise.
    pub fn tensors(&self) -> NamedTensors {
        self.dit.averaged()
    }

    /// The last weights under diffusers names, whatever the stage exports.
    pub fn last_tensors(&self) -> NamedTensors {
        self.dit.names.export(self.dit.model())
    }

    /// The null condition's length (rows).
    pub fn null_len(&self) -> usize {
        self.null.dims()[0]
    }

    #[cfg(test)]
    fn parts(&self) -> Parts<'_> {
        Parts {
            config: &self.config,
            seed: self.seed,
            device: &self.device,
            frozen: &self.frozen,
            null: &self.null,
            latent_norm: self.latent_norm.as_ref(),
            batches: &self.batches,
        }
    }
}

/// What a shard's loss reads besides the weights: shared by the shard threads.
#[derive(Clone, Copy)]
struct Parts<'a> {
    config: &'a DitStageConfig,
    seed: u64,
    device: &'a Device,
    frozen: &'a Frozen,
    null: &'a Tensor<3>,
    latent_norm: Option<&'a LatentNorm>,
    batches: &'a BatchCache,
}

/// What a batch's loss reads from the frozen parts, on the plain device: computed once per
/// batch and shard, and kept while the batch still has steps to serve (`reuse`).
struct Prepared {
    /// `[L, n_taps, h]` per sample, before condition dropout.
    conds: Vec<Tensor<3>>,
    /// Image-token rows at the start of each condition.
    image_rows: Vec<usize>,
    /// Patchified target latents `[B, T, C]`.
    x0: Tensor<3>,
    /// The latent grid's height and width.
    grid: (usize, usize),
    /// Each latent token's loss weight, `[B·T]` (none: plain MSE).
    weights: Option<Vec<f32>>,
    /// Whether each sample is the binding partner of the one before it (which it then
    /// shares noise, timestep and dropout with; the first never is).
    paired: Vec<bool>,
}

/// The prepared batches of the current window, by shard and batch ([`batch_of_step`]);
/// the stage's number of batch preparations, for tests and timing.
#[derive(Default)]
struct BatchCache {
    held: Mutex<Vec<(usize, usize, Arc<Prepared>)>>,
    made: AtomicUsize,
}

impl BatchCache {
    /// Batch `index` of shard `shard`, made by `make` unless held; batches below `oldest`
    /// have served all their steps and are dropped.
    fn get(
        &self,
        shard: usize,
        index: usize,
        oldest: usize,
        make: impl FnOnce() -> Result<Prepared, TrainError>,
    ) -> Result<Arc<Prepared>, TrainError> {
        let found = self
            .lock()
            .iter()
            .find(|(s, i, _)| *s == shard && *i == index)
            .map(|(_, _, p)| p.clone());
        if let Some(p) = found {
            return Ok(p);
        }
        // Made outside the lock: the other shards prepare theirs at the same time.
        let made = Arc::new(make()?);
        self.made.fetch_add(1, Ordering::Relaxed);
        let mut held = self.lock();
        held.retain(|(_, i, _)| *i >= oldest);
        held.push((shard, index, made.clone()));
        Ok(made)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(usize, usize, Arc<Prepared>)>> {
        // A panicked shard leaves no half-written entry: each push is whole.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Flow-matching loss of shard `shard` (of `shards`) of step `k`'s batch under `model`: the
/// shard's samples are its contiguous share of batch [`batch_of_step`]`(k, reuse)`; its
/// noise, timesteps and condition dropout come from streams of `(seed, k)` (one shard: the
/// whole batch's own streams, as before shards existed; several: one stream per shard).
fn shard_loss(
    parts: &Parts<'_>,
    model: &Krea2Transformer,
    k: usize,
    shard: usize,
    shards: usize,
) -> Result<Tensor<1>, TrainError> {
    let batch = parts.config.batch;
    let reuse = parts.config.reuse.max(1);
    let index = batch_of_step(k, reuse);
    let make = || {
        let (first, end) = shard_range(batch, shard, shards);
        let (samples, paired): (Vec<Sample>, Vec<bool>) = (first..end)
            .map(|i| training_sample(parts, index * batch + i))
            .unzip();
        let mut prepared = prepare(parts, &samples, &samples)?;
        // A partner whose predecessor sits in another shard draws its own noise.
        prepared.paired = paired
            .iter()
            .enumerate()
            .map(|(i, &p)| p && i > 0)
            .collect();
        Ok(prepared)
    };
    let prepared = if reuse == 1 {
        Arc::new(make()?)
    } else {
        let oldest = batch_of_step(k - k % (reuse * reuse), reuse);
        parts.batches.get(shard, index, oldest, make)?
    };
    Ok(prepared_loss(parts, model, &prepared, k, shard, shards)?.0)
}

/// Training sample `j` of the stage's stream, and whether it is the partner of sample `j − 1`
/// (`binding_pairs`, `count_pairs`, `placement_pairs`, odd `j` only; otherwise sample `j` as
/// drawn).
fn training_sample(parts: &Parts<'_>, j: usize) -> (Sample, bool) {
    let draw = |j: usize| sample(mix(parts.seed, 0xD1), j as u64, &parts.config.mix);
    let config = parts.config;
    let kinds: Vec<fn(&Sample, u64) -> Option<Sample>> = [
        (
            config.binding_pairs,
            rebound as fn(&Sample, u64) -> Option<Sample>,
        ),
        (config.count_pairs, one_fewer),
        (config.placement_pairs, relocated),
    ]
    .into_iter()
    .filter_map(|(on, kind)| on.then_some(kind))
    .collect();
    if j % 2 == 1 && !kinds.is_empty() {
        let before = draw(j - 1);
        let seed = partner_seed(parts.seed, j);
        // With colours and count on, an even toss starts at colours, as before placement.
        let start = (mix(seed, 0xC0) % kinds.len() as u64) as usize;
        let partner =
            (0..kinds.len()).find_map(|i| kinds[(start + i) % kinds.len()](&before, seed));
        if let Some(partner) = partner {
            return (partner, true);
        }
    }
    (draw(j), false)
}

/// The seed a partner at stream position `j` is made and phrased with.
fn partner_seed(seed: u64, j: usize) -> u64 {
    mix(mix(seed, 0xDB), j as u64)
}

/// The flow-matching loss of `drawn`'s targets under the conditions of `told` (the same
/// samples in training; another description of them in `condition_use`), with the noise,
/// timesteps and dropout of shard `shard` of step `k`; also the timesteps drawn.
#[cfg(test)]
fn samples_loss(
    parts: &Parts<'_>,
    model: &Krea2Transformer,
    told: &[Sample],
    drawn: &[Sample],
    k: usize,
    shard: usize,
    shards: usize,
) -> Result<(Tensor<1>, Vec<f32>), TrainError> {
    let prepared = prepare(parts, told, drawn)?;
    prepared_loss(parts, model, &prepared, k, shard, shards)
}

/// The frozen parts' share of a batch's loss: the conditions of `told`, the latents and
/// loss weights of `drawn`'s targets.
fn prepare(parts: &Parts<'_>, told: &[Sample], drawn: &[Sample]) -> Result<Prepared, TrainError> {
    let Parts {
        config,
        frozen,
        latent_norm,
        ..
    } = *parts;
    let plain = parts.device.clone().inner();
    let vlm_batch = make_batch(
        told,
        &frozen.tokenizer,
        &frozen.vlm_config,
        frozen.image_size,
        &plain,
    )?;
    let image_rows: Vec<usize> = vlm_batch.image_positions.iter().map(Vec::len).collect();
    let conds = frozen.conditions(vlm_batch, config.verifi)?;

    // Targets: the frozen encoder's latents of the target scenes.
    // Each target is rendered once: for the encoder and for the foreground weights.
    let render_config = RenderConfig::with_size(frozen.image_size);
    let rendered = drawn
        .iter()
        .map(|s| render(&s.target, &render_config))
        .collect::<Result<Vec<_>, _>>()?;
    let images = rendered_batch(&rendered, &plain);
    let z = frozen
        .encoder
        .encode(images)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let z = match latent_norm {
        Some(norm) => norm.apply(z),
        None => z,
    };
    let [_, _, lh, lw] = z.dims();
    let p = config.transformer.patch_size;
    let x0 = patchify(z, p).map_err(|e| TrainError::Model(e.to_string()))?;
    let weights = if config.foreground_weight == 0.0 {
        None
    } else {
        let tokens = (lh / p) * (lw / p);
        let side = frozen.image_size / (lw / p) as u32;
        let mut weights = Vec::with_capacity(drawn.len() * tokens);
        for (s, img) in drawn.iter().zip(&rendered) {
            let mut fg = foreground_squares(img, s.target.background(), side)?;
            let edited = matches!(s.task, TextTask::Edit | TextTask::Transfer);
            if config.weight_changes && edited {
                let before = render(&s.inputs[0], &render_config)?;
                for (f, c) in fg.iter_mut().zip(changed_squares(&before, img, side)?) {
                    *f |= c;
                }
            }
            if fg.len() != tokens {
                return Err(TrainError::Model(format!(
                    "{} foreground squares for {tokens} latent tokens",
                    fg.len()
                )));
            }
            weights.extend(fg.into_iter().map(|f| {
                if f {
                    1.0 + config.foreground_weight
                } else {
                    1.0
                }
            }));
        }
        Some(weights)
    };
    Ok(Prepared {
        paired: vec![false; conds.len()],
        conds,
        image_rows,
        x0,
        grid: (lh, lw),
        weights,
    })
}

/// The loss of a prepared batch under `model`, with the noise, timesteps and dropout of
/// shard `shard` of step `k`; also the timesteps drawn.
fn prepared_loss(
    parts: &Parts<'_>,
    model: &Krea2Transformer,
    prepared: &Prepared,
    k: usize,
    shard: usize,
    shards: usize,
) -> Result<(Tensor<1>, Vec<f32>), TrainError> {
    let Parts {
        config,
        seed,
        device,
        frozen,
        null,
        ..
    } = *parts;
    let b = prepared.conds.len();
    let stream = |base: u64| shard_seed(mix(seed, base + ((k as u64) << 8)), shard, shards);
    let plain = device.clone().inner();
    let mut rng = SeededNormal::new(stream(0xD2));
    let mut image_rows = prepared.image_rows.clone();
    let mut conds = prepared.conds.clone();
    let mut coin = ChaCha8Rng::seed_from_u64(stream(0xD3));
    let mut dropped = false;
    for (i, (c, rows)) in conds.iter_mut().zip(&mut image_rows).enumerate() {
        let toss = coin.random::<f32>() < config.cond_dropout;
        // A binding partner follows its predecessor's toss (drawn all the same, so the
        // stream stays aligned with unpaired batches).
        dropped = if prepared.paired[i] { dropped } else { toss };
        if dropped {
            *c = null.clone();
            *rows = 0;
        }
    }
    // Pad to one length: [B, L, n, h] and the key mask.
    let len = conds.iter().map(|c| c.dims()[0]).max().unwrap_or(1);
    let [_, n_taps, h] = conds[0].dims();
    let mut valid = Vec::with_capacity(b * len);
    let padded: Vec<Tensor<4>> = conds
        .into_iter()
        .map(|c| {
            let l = c.dims()[0];
            valid.extend((0..len).map(|i| i < l));
            let c = if l < len {
                Tensor::cat(vec![c, Tensor::zeros([len - l, n_taps, h], &plain)], 0)
            } else {
                c
            };
            c.unsqueeze::<4>()
        })
        .collect();
    let cond = Tensor::cat(padded, 0);
    let cond = Tensor::<4>::from_data(cond.into_data(), device);
    let mask = Tensor::<2, Bool>::from_data(TensorData::new(valid, [b, len]), device);

    let (lh, lw) = prepared.grid;
    let x0 = Tensor::<3>::from_data(prepared.x0.clone().into_data(), device);
    let dims = x0.dims();
    let count: usize = dims.iter().product();
    let mut eps: Vec<f32> = (0..count).map(|_| rng.next_f32()).collect();
    let mut t: Vec<f32> = (0..b)
        .map(|_| 1.0 / (1.0 + (-(rng.next_f32() + config.t_mean)).exp()))
        .collect();
    let per_sample = count / b.max(1);
    for i in (1..b).filter(|&i| prepared.paired[i]) {
        eps.copy_within((i - 1) * per_sample..i * per_sample, i * per_sample);
        t[i] = t[i - 1];
    }
    let eps = Tensor::<3>::from_data(TensorData::new(eps, dims), device);
    let tt = Tensor::<1>::from_data(TensorData::new(t.clone(), [b]), device);
    let t3 = tt.clone().reshape([b, 1, 1]);
    let xt = x0.clone() * (t3.clone().neg() + 1.0) + eps.clone() * t3;
    let target = eps - x0;
    // One RoPE layout per sample: their image-token rows differ (none for text to image);
    // identical layouts share one table.
    let layouts: Vec<Vec<[f32; 3]>> = image_rows
        .iter()
        .map(|&rows| {
            condition_position_ids(
                config.image_positions,
                config.text_positions,
                rows,
                frozen.vlm_config.tokens_per_tile(),
                len,
                lh / config.transformer.patch_size,
                lw / config.transformer.patch_size,
            )
        })
        .collect();
    let layouts: Vec<&[[f32; 3]]> = layouts.iter().map(Vec::as_slice).collect();
    let rope = RopeTable::per_sample(&layouts, model.rope_axes, model.rope_theta, device);
    let text = match config.pooling {
        Pooling::Lap => model.encode_text(cond, Some(mask)),
        Pooling::LastLayer => Ok(last_layer_condition(model, cond, mask)),
    }
    .map_err(|e| TrainError::Model(e.to_string()))?;
    let v = model
        .forward_with_text(xt, &text, tt, &rope)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let err = (v - target).square().mean_dim(2); // [B, T, 1]
    let Some(weights) = &prepared.weights else {
        return Ok((err.mean(), t));
    };
    let p = config.transformer.patch_size;
    let tokens = (lh / p) * (lw / p);
    let total: f32 = weights.iter().sum();
    let w = Tensor::<3>::from_data(TensorData::new(weights.clone(), [b, tokens, 1]), device);
    Ok(((err * w).sum() / total, t))
}

/// The last tap of `cond` `[B, L, n, h]` through the refiner and `txt_in`, LAP skipped: the
/// same graph as the pipeline's `Conditioning::LastLayer`, with the padding mask.
fn last_layer_condition(
    model: &Krea2Transformer,
    cond: Tensor<4>,
    mask: Tensor<2, Bool>,
) -> TextCondition {
    let [b, l, n, h] = cond.dims();
    let key_mask = KeyMask::from_valid(mask.clone());
    let mut x = cond.narrow(2, n - 1, 1).reshape([b, l, h]);
    for block in &model.text_fusion.refiner_blocks {
        x = block.forward(x, Some(&key_mask));
    }
    TextCondition {
        tokens: model.txt_in.forward(x),
        mask: Some(mask),
    }
}

impl Stage for DitStage {
    fn name(&self) -> &'static str {
        "dit"
    }

    fn steps(&self) -> usize {
        self.config.optim.steps
    }

    fn step(&mut self, k: usize) -> Result<(f32, f64), TrainError> {
        let shards = self.config.shards.clamp(1, self.config.batch.max(1));
        let parts = Parts {
            config: &self.config,
            seed: self.seed,
            device: &self.device,
            frozen: &self.frozen,
            null: &self.null,
            latent_norm: self.latent_norm.as_ref(),
            batches: &self.batches,
        };
        let batch = self.config.batch;
        self.dit
            .sharded_step(&self.device, k, shards, |model, shard| {
                let loss = shard_loss(&parts, model, k, shard, shards)?;
                Ok(batch_share(loss, batch, shard, shards))
            })
    }

    fn save(&self, dir: &Path) -> Result<Vec<u64>, TrainError> {
        self.dit.save(dir)
    }

    fn load(&mut self, dir: &Path, ids: Vec<u64>) -> Result<(), TrainError> {
        self.dit.load(dir, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::{run_stage, scalar};
    use crate::vae::{VaeStageConfig, init_autoencoder};
    use crate::vlm::{VlmStageConfig, init_vlm};
    use burn::optim::{GradientsAccumulator, GradientsParams};
    use unifusion_model::pipeline::every_third_layer;

    /// The tiny DiT stage training text to image only, with `pairs` turning pair kinds on.
    fn text_to_image_stage(pairs: impl FnOnce(&mut DitStageConfig)) -> DitStage {
        tiny_stage(|c| {
            c.mix = TaskMix {
                caption: 0.0,
                rewrite: 1.0,
                edit: 0.0,
                transfer: 0.0,
            };
            pairs(c);
        })
    }

    /// The tiny DiT stage over untrained frozen parts (enough to check that the DiT learns).
    fn tiny_stage(edit: impl FnOnce(&mut DitStageConfig)) -> DitStage {
        let json =
            crate::tokenizer::train_bpe(&crate::data::text_corpus(2, 100), 320).expect("tokenizer");
        let tokenizer = VlmTokenizer::from_bytes(json.as_bytes()).expect("loads");
        let vlm_stage = VlmStageConfig::tiny(320);
        let vae_stage = VaeStageConfig::tiny();
        let device = Device::flex();
        let (vlm, _) = init_vlm(&vlm_stage.vlm, 1, &device).expect("vlm");
        let (ae, _) = init_autoencoder(&vae_stage.vae, 1, &device).expect("vae");
        let taps = every_third_layer(vlm_stage.vlm.text_config.num_hidden_layers);
        let mut config =
            DitStageConfig::tiny(&vlm_stage.vlm, taps.len(), vae_stage.vae.latent_channels);
        edit(&mut config);
        let frozen = Frozen {
            vlm,
            vlm_config: vlm_stage.vlm.clone(),
            tokenizer,
            encoder: ae.encoder,
            image_size: vae_stage.image_size,
            taps,
        };
        DitStage::new(config, frozen, 5, Backend::Flex).expect("builds")
    }

    #[test]
    fn init_from_starts_at_another_runs_weights_and_refuses_a_bad_file() {
        let mut trained = tiny_stage(|_| {});
        trained.step(0).expect("steps");
        let dir = std::env::temp_dir().join(format!("unifusion-dit-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("transformer.safetensors");
        std::fs::write(
            &path,
            crate::named::safetensors_bytes(&trained.tensors()).expect("bytes"),
        )
        .expect("writes");
        let fresh = tiny_stage(|_| {}).tensors();
        let resumed = tiny_stage(|c| c.init_from = Some(path.clone())).tensors();
        assert_eq!(resumed, trained.tensors());
        assert_ne!(resumed, fresh, "the step moved the weights");

        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, b"not safetensors").expect("writes");
        let frozen = || tiny_stage(|_| {}).frozen;
        let mut config = tiny_stage(|_| {}).config;
        config.init_from = Some(bad.clone());
        let err = DitStage::new(config.clone(), frozen(), 5, Backend::Flex)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("bad.safetensors"), "{err}");
        config.init_from = Some(dir.join("missing.safetensors"));
        assert!(DitStage::new(config, frozen(), 5, Backend::Flex).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn short_run_reduces_the_flow_matching_loss_and_the_checkpoint_loads() {
        let mut stage = tiny_stage(|_| {});
        let config = stage.config.clone();
        let device = Device::flex();
        let dir = std::env::temp_dir().join(format!("unifusion-dit-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run = run_stage(&mut stage, &dir, 1000, &mut |_| {}).expect("trains");
        let (first, last) = run.curve.first_last_mean(8);
        assert!(last < 0.8 * first, "loss {first} -> {last}");

        let bytes = crate::named::safetensors_bytes(&stage.tensors()).expect("bytes");
        let mut map =
            unifusion_model::generator::WeightMap::from_safetensors(&bytes).expect("parses");
        Krea2Transformer::load(&config.transformer, &mut map, &device).expect("loads");
        map.finish().expect("every tensor used");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Threads change where a shard's loss is computed, not what it is: a sharded step ends
    /// where the same shards computed one after another on this thread end, and the shards
    /// together see the whole batch (a shard of one sample included).
    #[test]
    fn a_sharded_step_equals_its_shards_computed_in_turn() {
        let sharded = |c: &mut DitStageConfig| {
            c.batch = 3;
            c.shards = 2;
        };
        let mut threaded = tiny_stage(sharded);
        let mut serial = tiny_stage(sharded);
        assert_eq!(threaded.tensors(), serial.tensors());
        for k in 0..2 {
            threaded.step(k).expect("sharded step");

            let parts = serial.parts();
            let model = serial.dit.model();
            let mut sum = GradientsAccumulator::<Krea2Transformer>::new();
            let mut value = 0.0;
            for shard in 0..2 {
                let loss = shard_loss(&parts, model, k, shard, 2).expect("loss");
                let loss = batch_share(loss, 3, shard, 2);
                value += scalar(&loss).expect("value");
                sum.accumulate(model, GradientsParams::from_grads(loss.backward(), model));
            }
            serial.dit.apply_grads(sum.grads(), value, k).expect("step");
        }
        assert_eq!(threaded.tensors(), serial.tensors());

        // One sample per step and shard: the VLM's shared prefix must still leave every
        // answer token to its row (it once took the whole one-row sequence).
        let mut single = tiny_stage(|c| {
            c.batch = 2;
            c.shards = 2;
            c.optim.steps = 2;
        });
        for k in 0..2 {
            let (loss, _) = single.step(k).expect("one-sample shards");
            assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
        }
    }

    #[test]
    fn each_batch_serves_reuse_steps_interleaved() {
        let order = |reuse| (0..8).map(|k| batch_of_step(k, reuse)).collect::<Vec<_>>();
        assert_eq!(order(1), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(order(0), order(1), "0 reads as 1");
        assert_eq!(order(2), [0, 1, 0, 1, 2, 3, 2, 3]);
        let mut uses = [0usize; 9];
        for k in 0..27 {
            uses[batch_of_step(k, 3)] += 1;
        }
        assert_eq!(uses, [3; 9]);
    }

    /// Reused batches change what trains only where a batch repeats: steps 0 and 1 of
    /// `reuse` 2 draw batches 0 and 1, as a fresh batch a step does; step 2 repeats batch 0.
    /// A resume (an empty cache) remakes the batches exactly.
    #[test]
    fn reused_batches_train_as_fresh_ones_until_they_repeat() {
        let sharded = |reuse: usize| {
            move |c: &mut DitStageConfig| {
                c.batch = 3;
                c.shards = 2;
                c.reuse = reuse;
            }
        };
        let mut fresh = tiny_stage(sharded(1));
        let mut reused = tiny_stage(sharded(2));
        let mut resumed = tiny_stage(sharded(2));
        for k in 0..2 {
            fresh.step(k).expect("step");
            reused.step(k).expect("step");
            resumed.step(k).expect("step");
        }
        assert_eq!(fresh.tensors(), reused.tensors());
        assert_eq!(
            reused.batches.made.load(Ordering::Relaxed),
            4,
            "2 batches × 2 shards"
        );
        fresh.step(2).expect("step");
        reused.step(2).expect("step");
        assert_eq!(
            reused.batches.made.load(Ordering::Relaxed),
            4,
            "batch 0 held"
        );
        let moved = largest_change(&fresh.tensors(), &reused.tensors());
        assert!(
            moved > 1e-6,
            "batch 0 again trains apart from batch 2: {moved}"
        );

        resumed.batches = BatchCache::default();
        resumed.step(2).expect("step");
        assert_eq!(resumed.tensors(), reused.tensors());
        for k in 3..5 {
            reused.step(k).expect("step");
        }
        assert_eq!(
            reused.batches.made.load(Ordering::Relaxed),
            6,
            "batch 2 is new at step 4"
        );
        assert!(
            reused.batches.lock().iter().all(|(_, i, _)| *i >= 2),
            "window 0 dropped"
        );
    }

    /// The largest change of any weight between two exports of the same model.
    fn largest_change(a: &NamedTensors, b: &NamedTensors) -> f32 {
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.2.iter().zip(&y.2).map(|(p, q)| (p - q).abs()))
            .fold(0.0f32, f32::max)
    }

    /// The tiny stage's weights after 2 steps without condition dropout on a mix of edits and
    /// text to image only, with `tweak` applied to its config.
    fn two_steps(edit: f32, rewrite: f32, tweak: impl FnOnce(&mut DitStageConfig)) -> NamedTensors {
        let mut stage = tiny_stage(|c| {
            c.cond_dropout = 0.0;
            c.mix = TaskMix {
                caption: 0.0,
                rewrite,
                edit,
                transfer: 0.0,
            };
            tweak(c);
        });
        for k in 0..2 {
            stage.step(k).expect("step");
        }
        stage.tensors()
    }

    /// Grid positions rotate the image-token rows only: after the same two steps on edits the
    /// weights differ, after two on text to image (no image tokens) they agree bit for bit.
    #[test]
    fn grid_image_positions_change_the_training_of_image_conditions_only() {
        let train = |grid: bool, edit: f32, rewrite: f32| {
            two_steps(edit, rewrite, |c| {
                if grid {
                    c.image_positions = ImagePositions::Grid;
                }
            })
        };
        let edits = largest_change(&train(false, 1.0, 0.0), &train(true, 1.0, 0.0));
        assert!(
            edits > 1e-4,
            "edit-trained weights moved by {edits} at most"
        );
        assert_eq!(train(false, 0.0, 1.0), train(true, 0.0, 1.0));
    }

    /// Centred text rotates the text rows: two steps of text to image train other weights.
    #[test]
    fn centred_text_positions_change_text_to_image_training() {
        let origin = two_steps(0.0, 1.0, |_| {});
        let centre = two_steps(0.0, 1.0, |c| c.text_positions = TextPositions::Center);
        let moved = largest_change(&origin, &centre);
        assert!(moved > 1e-4, "weights moved by {moved} at most");
    }

    /// Binding pairs: on text to image an odd sample is its predecessor's partner and shares
    /// its noise and timestep; edits never pair, so their training is unchanged bit for bit.
    #[test]
    fn binding_pairs_share_noise_with_their_partner_and_leave_edits_alone() {
        let stage = text_to_image_stage(|c| c.binding_pairs = true);
        let parts = stage.parts();
        let j = (1..80)
            .step_by(2)
            .find(|&j| training_sample(&parts, j).1)
            .expect("a partner in 40 pairs");
        let (before, first_paired) = training_sample(&parts, j - 1);
        let (partner, _) = training_sample(&parts, j);
        assert!(!first_paired, "even samples are drawn");
        let expected = rebound(&before, partner_seed(parts.seed, j)).expect("pairs");
        assert_eq!(partner.target, expected.target);
        assert_ne!(partner.target, before.target);
        let pair = [before, partner];
        let mut prepared = prepare(&parts, &pair, &pair).expect("prepares");
        let model = stage.dit.model();
        let timesteps = |prepared: &Prepared| -> Vec<Vec<f32>> {
            (0..6)
                .map(|k| {
                    prepared_loss(&parts, model, prepared, k, 0, 1)
                        .expect("loss")
                        .1
                })
                .collect()
        };
        prepared.paired = vec![false, true];
        assert!(timesteps(&prepared).iter().all(|t| t[0] == t[1]));
        prepared.paired = vec![false, false];
        assert!(timesteps(&prepared).iter().all(|t| t[0] != t[1]));

        let edits_on = two_steps(1.0, 0.0, |c| c.binding_pairs = true);
        assert_eq!(edits_on, two_steps(1.0, 0.0, |_| {}));
        let rewrites_on = two_steps(0.0, 1.0, |c| c.binding_pairs = true);
        let moved = largest_change(&two_steps(0.0, 1.0, |_| {}), &rewrites_on);
        assert!(moved > 1e-4, "weights moved by {moved} at most");
    }

    /// Count pairs: a partner is its predecessor less one object; with binding pairs on too,
    /// both kinds of partner occur; edits never pair.
    #[test]
    fn count_pairs_leave_one_object_out_and_mix_with_binding_pairs() {
        let count_only = text_to_image_stage(|c| c.count_pairs = true);
        let parts = count_only.parts();
        let mut partners = 0;
        for j in (1..80).step_by(2) {
            let (before, _) = training_sample(&parts, j - 1);
            let (s, paired) = training_sample(&parts, j);
            let seed = partner_seed(parts.seed, j);
            assert_eq!(paired, before.target.objects().len() >= 2, "sample {j}");
            if paired {
                partners += 1;
                assert_eq!(s.target, one_fewer(&before, seed).expect("pairs").target);
            }
        }
        assert!(partners > 5, "{partners} partners of 40");

        let both = text_to_image_stage(|c| {
            c.count_pairs = true;
            c.binding_pairs = true;
        });
        let parts = both.parts();
        let (mut fewer, mut recoloured) = (0, 0);
        for j in (1..200).step_by(2) {
            let (before, _) = training_sample(&parts, j - 1);
            let (s, paired) = training_sample(&parts, j);
            if !paired {
                continue;
            }
            let (n, m) = (before.target.objects().len(), s.target.objects().len());
            assert!(m == n || m + 1 == n, "sample {j}: {n} objects, partner {m}");
            if m < n {
                fewer += 1;
            } else {
                recoloured += 1;
            }
        }
        // `cargo test -p unifusion-train --lib count_pairs -- --nocapture`: the split
        // docs/TRAINING.md "Count pairs" quotes.
        println!("of 100 text-to-image pairs: {fewer} count, {recoloured} colour partners");
        assert!(
            fewer > 10 && recoloured > 10,
            "{fewer} count, {recoloured} colour partners"
        );

        let edits_on = two_steps(1.0, 0.0, |c| c.count_pairs = true);
        assert_eq!(edits_on, two_steps(1.0, 0.0, |_| {}));
    }

    /// Placement pairs: a partner is its predecessor's objects moved between their cells; with
    /// all three kinds on, each kind occurs; edits never pair.
    #[test]
    fn placement_pairs_move_objects_between_cells_and_mix_with_the_other_kinds() {
        let alone = text_to_image_stage(|c| c.placement_pairs = true);
        let parts = alone.parts();
        let mut partners = 0;
        for j in (1..80).step_by(2) {
            let (before, _) = training_sample(&parts, j - 1);
            let (s, paired) = training_sample(&parts, j);
            let seed = partner_seed(parts.seed, j);
            let expected = relocated(&before, seed);
            assert_eq!(paired, expected.is_some(), "sample {j}");
            if let Some(expected) = expected {
                partners += 1;
                assert_eq!(s.target, expected.target);
            }
        }
        assert!(partners > 5, "{partners} partners of 40");

        let all = text_to_image_stage(|c| {
            c.binding_pairs = true;
            c.count_pairs = true;
            c.placement_pairs = true;
        });
        let parts = all.parts();
        let (mut fewer, mut recoloured, mut moved) = (0, 0, 0);
        for j in (1..200).step_by(2) {
            let (before, _) = training_sample(&parts, j - 1);
            let (s, paired) = training_sample(&parts, j);
            if !paired {
                continue;
            }
            let (a, b) = (before.target.objects(), s.target.objects());
            if b.len() < a.len() {
                fewer += 1;
            } else if a
                .iter()
                .zip(b)
                .all(|(x, y)| (x.shape, x.size) == (y.shape, y.size))
            {
                // Objects alike but for colour look the same moved or recoloured.
                recoloured += 1;
            } else {
                moved += 1;
            }
        }
        // `cargo test -p unifusion-train --lib placement_pairs -- --nocapture`: the split
        // docs/TRAINING.md "Placement pairs" quotes.
        println!(
            "of 100 text-to-image pairs: {fewer} count, {recoloured} colour, {moved} placement partners"
        );
        assert!(
            fewer > 10 && recoloured > 10 && moved > 10,
            "{fewer} count, {recoloured} colour, {moved} placement partners"
        );

        let edits_on = two_steps(1.0, 0.0, |c| c.placement_pairs = true);
        assert_eq!(edits_on, two_steps(1.0, 0.0, |_| {}));
    }

    #[test]
    fn absolute_positions_change_text_to_image_training() {
        let rope_only = two_steps(0.0, 1.0, |_| {});
        let absolute = two_steps(0.0, 1.0, |c| c.transformer.abs_pos_embed = true);
        let moved = largest_change(&rope_only, &absolute);
        assert!(moved > 1e-4, "weights moved by {moved} at most");
    }

    /// Change weighting reaches edits (a removal's or a move's old place) and leaves text to
    /// image bit-identical: it has no input image to compare with.
    /// The measured normalization maps fresh scenes' latents (not the ones it was measured
    /// on) to mean about 0 and standard deviation about 1 in every channel; off, the stage
    /// trains on raw latents.
    #[test]
    fn normalized_latents_have_unit_scale_on_fresh_scenes() {
        assert_eq!(tiny_stage(|_| {}).latent_norm(), None);
        let stage = tiny_stage(|c| c.normalize_latents = true);
        let norm = stage.latent_norm().expect("measured").clone();
        let size = stage.frozen.image_size;
        let images: Vec<_> = (0..32u64)
            .map(|i| {
                let scene = sample(mix(99, 0xAB), i, &stage.config.mix).target;
                render(&scene, &RenderConfig::with_size(size)).expect("renders")
            })
            .collect();
        let z = stage
            .frozen
            .encoder
            .encode(rendered_batch(&images, &Device::flex()))
            .expect("encodes");
        let [_, c, h, w] = z.dims();
        assert_eq!((norm.mean.len(), norm.std.len()), (c, c));
        let values = to_vec(norm.apply(z)).expect("f32");
        for ch in 0..c {
            let v: Vec<f64> = values
                .iter()
                .enumerate()
                .filter(|(i, _)| (i / (h * w)) % c == ch)
                .map(|(_, &x)| f64::from(x))
                .collect();
            let n = v.len() as f64;
            let mean = v.iter().sum::<f64>() / n;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(mean.abs() < 0.25, "channel {ch}: mean {mean}");
            assert!((0.75..1.33).contains(&std), "channel {ch}: std {std}");
        }
    }

    #[test]
    fn weighting_changes_moves_edit_training_only() {
        let train = |changes: bool, edit: f32, rewrite: f32| {
            two_steps(edit, rewrite, |c| c.weight_changes = changes)
        };
        assert_ne!(train(false, 1.0, 0.0), train(true, 1.0, 0.0));
        assert_eq!(train(false, 0.0, 1.0), train(true, 0.0, 1.0));
    }

    #[test]
    fn the_weight_average_is_exported_and_survives_a_resume() {
        let ema = |c: &mut DitStageConfig| {
            c.optim.steps = 8;
            c.optim.warmup = 2;
            c.ema_decay = 0.9;
        };
        let base = std::env::temp_dir().join(format!("unifusion-dit-ema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mut whole = tiny_stage(ema);
        run_stage(&mut whole, &base.join("a"), 3, &mut |_| {}).expect("trains");
        // The average is not the last weights (it lags them).
        assert_ne!(whole.tensors(), whole.last_tensors());

        let mut first = tiny_stage(ema);
        let limit = crate::trainer::Limit {
            stop_step: 5,
            deadline: None,
        };
        crate::trainer::run_stage_until(&mut first, &base.join("b"), 3, limit, &mut |_| {})
            .expect("trains");
        assert!(base.join("b/checkpoint/ema.safetensors").exists());
        drop(first);
        let mut second = tiny_stage(ema);
        run_stage(&mut second, &base.join("b"), 3, &mut |_| {}).expect("resumes");
        assert_eq!(whole.last_tensors(), second.last_tensors());
        assert_eq!(whole.tensors(), second.tensors());
        let _ = std::fs::remove_dir_all(&base);
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// The recipe directory `UNIFUSION_RECIPE_OUT` names, with the stages `needs` done.
    fn recipe_out(needs: &str) -> Option<std::path::PathBuf> {
        let out = std::env::var("UNIFUSION_RECIPE_OUT").ok();
        if out.is_none() {
            println!("set UNIFUSION_RECIPE_OUT to a recipe directory with {needs} done");
        }
        out.map(Into::into)
    }

    /// `UNIFUSION_RECIPE_OUT=/work/train-out/recipe cargo test --workspace dit_step_timing --
    /// --ignored --nocapture`: recipe DiT steps at batch 8, 16 and 32 on a finished VLM and VAE.
    #[test]
    #[ignore]
    fn dit_step_timing() {
        let Some(out) = recipe_out("vae/ and vlm/") else {
            return;
        };
        let recipe = crate::recipe::RecipeConfig::recipe(0, Backend::Flex);
        for batch in [8, 16, 32] {
            let frozen = crate::recipe::frozen(&out, &recipe).expect("frozen parts");
            let mut config = recipe.dit.clone();
            config.batch = batch;
            let mut stage = DitStage::new(config, frozen, 0, Backend::Flex).expect("builds");
            for k in 0..3 {
                let t = Instant::now();
                stage.step(k).expect("step");
                println!("batch {batch}: step {:.3} s", t.elapsed().as_secs_f64());
            }
        }
    }

    /// `UNIFUSION_RECIPE_OUT=/work/train-out/recipe cargo test --workspace dit_step_profile --
    /// --ignored --nocapture`: how much of a recipe DiT step (batch 8, unsharded) the frozen
    /// parts take (the VLM's conditions and the VAE encoder's latents of the same samples), and
    /// whole steps of wider and deeper DiTs (heads of 16, blocks, MLP width) beside the recipe's.
    #[test]
    #[ignore]
    fn dit_step_profile() {
        let Some(out) = recipe_out("vae/ and vlm/") else {
            return;
        };
        let recipe = crate::recipe::RecipeConfig::recipe(0, Backend::Flex);
        let frozen = crate::recipe::frozen(&out, &recipe).expect("frozen parts");
        let plain = Device::flex();
        for k in 0..3 {
            let samples: Vec<Sample> = (0..8)
                .map(|i| sample(mix(0, 0xD1), (k * 8 + i) as u64, &recipe.dit.mix))
                .collect();
            let t = Instant::now();
            let batch = make_batch(
                &samples,
                &frozen.tokenizer,
                &frozen.vlm_config,
                frozen.image_size,
                &plain,
            )
            .expect("batch");
            let conds = frozen.conditions(batch, true).expect("conditions");
            let _ = conds[0].clone().into_data();
            let vlm_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let rendered: Vec<_> = samples
                .iter()
                .map(|s| {
                    render(&s.target, &RenderConfig::with_size(frozen.image_size)).expect("renders")
                })
                .collect();
            let z = frozen
                .encoder
                .encode(rendered_batch(&rendered, &plain))
                .expect("encodes");
            let _ = z.into_data();
            let vae_s = t.elapsed().as_secs_f64();
            println!("batch 8: frozen VLM conditions {vlm_s:.3} s, VAE encoder {vae_s:.3} s");
        }
        for (heads, layers, ffn) in [(6, 6, 256), (8, 6, 384), (12, 6, 512), (6, 12, 256)] {
            let frozen = crate::recipe::frozen(&out, &recipe).expect("frozen parts");
            let mut config = recipe.dit.clone();
            config.transformer.num_attention_heads = heads;
            config.transformer.num_key_value_heads = heads / 2;
            config.transformer.num_layers = layers;
            config.transformer.intermediate_size = ffn;
            let mut stage = DitStage::new(config, frozen, 0, Backend::Flex).expect("builds");
            let mut times = Vec::new();
            for k in 0..4 {
                let t = Instant::now();
                stage.step(k).expect("step");
                times.push(t.elapsed().as_secs_f64());
            }
            println!("heads {heads} layers {layers} ffn {ffn}: steps {times:.3?} s");
        }
    }

    /// The scene with every object in the next object's cell (one object: the next cell of the
    /// grid diagonally), and `order` remapped onto the re-sorted objects.
    fn moved(s: &Sample) -> Sample {
        use unifusion_world::{Cell, Scene};
        let objects = s.target.objects();
        let n = objects.len();
        let new: Vec<_> = (0..n)
            .map(|i| {
                let mut o = objects[i];
                o.cell = if n == 1 {
                    Cell::new((o.cell.row() + 1) % 3, (o.cell.col() + 1) % 3).expect("on grid")
                } else {
                    objects[(i + 1) % n].cell
                };
                o
            })
            .collect();
        let target = Scene::new(s.target.background(), new.clone()).expect("a scene");
        let at = |o| target.objects().iter().position(|p| *p == o).expect("kept");
        let order = s.order.iter().map(|&i| at(new[i])).collect();
        Sample {
            target,
            order,
            ..s.clone()
        }
    }

    /// The scene with every object in the next object's colour (one object, or one colour for
    /// all: the next colour of the world's list), cells unchanged.
    fn recoloured(s: &Sample) -> Sample {
        use unifusion_world::{Color, Scene};
        let objects = s.target.objects();
        let next = |c: Color| {
            let i = Color::ALL.iter().position(|&x| x == c).expect("listed");
            Color::ALL[(i + 1) % Color::ALL.len()]
        };
        // Several colours: handed on one object along, as a binding partner's are.
        let target = crate::data::colours_handed_on(&s.target, 1).unwrap_or_else(|| {
            let new = objects
                .iter()
                .map(|&o| unifusion_world::Object {
                    color: next(o.color),
                    ..o
                })
                .collect();
            Scene::new(s.target.background(), new).expect("a scene")
        });
        Sample {
            target,
            ..s.clone()
        }
    }

    /// `UNIFUSION_RECIPE_OUT=/work/train-out/r29 cargo test -p unifusion-train --lib
    /// condition_use -- --ignored --nocapture`: does a finished DiT use where its description
    /// puts each object, and in which colour? Text-to-image samples of the recipe's stream
    /// (fresh indices), each scored under the training loss with the same noise and timestep
    /// given (a) its own description, (b) the objects moved to each other's cells, (c) the
    /// objects in each other's colours, (d) the null condition, and for samples of two or
    /// more objects (e) one object left out of the description (as a count partner's), beside
    /// (a) on those samples; mean loss per band of `t`. The user's prompt is the drawn
    /// sample's in (b), (c) and (e): only the rewrite changes. The DiT's settings are the
    /// run's (`dit/stage.json`), its weights `dit/transformer.safetensors`.
    #[test]
    #[ignore]
    fn condition_use() {
        let Some(out) = recipe_out("vae/, vlm/ and dit/") else {
            return;
        };
        let recipe = crate::recipe::RecipeConfig::recipe(0, Backend::Flex);
        let frozen = crate::recipe::frozen(&out, &recipe).expect("frozen parts");
        let stage: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join("dit/stage.json")).expect("dit/stage.json"),
        )
        .expect("json");
        let mut config: DitStageConfig =
            serde_json::from_value(stage["dit"].clone()).expect("the run's DiT settings");
        config.init_from = Some(out.join("dit/transformer.safetensors"));
        config.cond_dropout = 0.0;
        config.t_mean = 0.0; // every run probed at the same timesteps
        config.mix = TaskMix {
            caption: 0.0,
            rewrite: 1.0,
            edit: 0.0,
            transfer: 0.0,
        };
        let stage = DitStage::new(config.clone(), frozen, 0, Backend::Flex).expect("builds");
        let mut null_config = config.clone();
        null_config.cond_dropout = 1.0;
        let plain = stage.parts();
        let null = Parts {
            config: &null_config,
            ..plain
        };
        let model = stage.dit.model();
        let bands = [0.0, 0.33, 0.67, 1.01];
        // [variant][band] → (sum, count)
        let mut sums = [[(0.0f64, 0usize); 3]; 6];
        let samples_n = 192;
        for i in 0..samples_n {
            let drawn = sample(mix(0, 0xD1), 1_000_000 + i as u64, &config.mix);
            let left_out = one_fewer(&drawn, mix(0x1E, i as u64)).map(|p| Sample {
                target: p.target,
                ..drawn.clone()
            });
            let mut variants = vec![
                (0, drawn.clone()),
                (1, moved(&drawn)),
                (2, recoloured(&drawn)),
                (3, drawn.clone()),
            ];
            let several = left_out.is_some();
            variants.extend(left_out.map(|told| (5, told)));
            for (v, told) in &variants {
                let v = *v;
                let parts = if v == 3 { &null } else { &plain };
                let (loss, t) = samples_loss(
                    parts,
                    model,
                    std::slice::from_ref(told),
                    std::slice::from_ref(&drawn),
                    i,
                    0,
                    1,
                )
                .expect("loss");
                let band = bands.windows(2).position(|w| t[0] >= w[0] && t[0] < w[1]);
                let band = band.expect("t in [0, 1]");
                let loss = f64::from(crate::trainer::scalar(&loss).expect("finite"));
                // Row 4: the own description's loss on the samples that have row 5.
                for row in [Some(v), (v == 0 && several).then_some(4)]
                    .into_iter()
                    .flatten()
                {
                    sums[row][band].0 += loss;
                    sums[row][band].1 += 1;
                }
            }
        }
        let names = [
            "own description",
            "objects moved",
            "colours swapped",
            "null condition",
            "own, 2+ objects",
            "one left out",
        ];
        println!("{samples_n} text-to-image samples; mean loss by t band (count)");
        for (name, row) in names.iter().zip(&sums) {
            let cells: Vec<String> = row
                .iter()
                .map(|(s, n)| format!("{:.4} ({n})", s / (*n).max(1) as f64))
                .collect();
            println!(
                "{name:>16}: t<0.33 {} | 0.33-0.67 {} | >0.67 {}",
                cells[0], cells[1], cells[2]
            );
        }
    }

    /// `UNIFUSION_RECIPE_OUT=/work/train-out/recipe cargo test --workspace latent_channel_stats
    /// -- --ignored --nocapture`: what `--dit-normalize-latents` would measure on a finished
    /// VAE (the recipe's scenes at seed 0).
    #[test]
    #[ignore]
    fn latent_channel_stats() {
        let Some(out) = recipe_out("vae/") else {
            return;
        };
        let recipe = crate::recipe::RecipeConfig::recipe(0, Backend::Flex);
        let bytes = std::fs::read(out.join("vae/autoencoder.safetensors"))
            .expect("vae/autoencoder.safetensors");
        let device = Device::flex();
        let encoder = Frozen::encoder_from(&recipe.vae.vae, &bytes, &device).expect("encoder");
        let norm =
            LatentNorm::measure(&encoder, recipe.vae.image_size, 0, &recipe.dit.mix, &device)
                .expect("measures");
        for (ch, (mean, std)) in norm.mean.iter().zip(&norm.std).enumerate() {
            println!("channel {ch}: mean {mean:+.3} std {std:.3}");
        }
    }
}
