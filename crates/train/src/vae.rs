//! Stage 2: the tiny VAE, `AutoencoderTiny` layout (the model crate's `TinyEncoder` /
//! `TinyDecoder`), trained on rendered world images.
//!
//! Loss: `L1 + MSE` of the reconstruction (object pixels and the 1-px ring around them weigh
//! `1 + foreground_weight`), plus `latent_l2 · mean(z²)` (a small KL-like pull
//! that keeps the raw latents, which the DiT samples directly, near unit scale). The decoder
//! sees `z + σ·ε` so small sampling errors of the DiT decode to clean images. Each step's
//! batch is rendered afresh from `(seed, step)`: unlimited data, no epochs.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use unifusion_model::generator::config::AutoencoderTinyConfig;
use unifusion_model::generator::sampler::SeededNormal;
use unifusion_model::generator::tiny_vae::AutoencoderTiny;
use unifusion_world::score::{micro_average, score_scene};

use crate::data::{foreground_squares, image_values, mix, planar_to_rgb, rgb_to_planar, scene};
use crate::named::{Init, NamedParams, NamedTensors, Recorder};
use crate::trainer::{
    OptimConfig, Stage, Trainable, batch_share, is_one_shard, one_shard, shard_range, shard_seed,
};
use crate::{Backend, TrainError};
use unifusion_world::{RenderConfig, render};

/// The VAE stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeStageConfig {
    /// Image side in pixels (the world renders squares).
    pub image_size: u32,
    /// The autoencoder (`AutoencoderTiny` config; downscale = 2^(levels − 1)).
    pub vae: AutoencoderTinyConfig,
    /// Images per step.
    pub batch: usize,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    /// Standard deviation of the noise added to latents before decoding (with
    /// `tune_decoder_from`: the scale of the level each image draws).
    pub latent_noise: f32,
    /// Weight of `mean(z²)`.
    pub latent_l2: f32,
    /// Extra reconstruction weight on object pixels and the pixel ring around them (a pixel
    /// weighs `1 + foreground_weight`; 0 = the plain mean). Objects cover about a tenth of an
    /// image, and small ones are what the plain mean lets blur.
    #[serde(default)]
    pub foreground_weight: f32,
    /// Threads a step's batch is split over ([`Trainable::sharded_step`]); shards draw the
    /// latent noise from streams of their own, so it is part of the settings.
    #[serde(default = "one_shard", skip_serializing_if = "is_one_shard")]
    pub shards: usize,
    /// Start from a trained autoencoder (another run's `vae/autoencoder.safetensors`, the same
    /// config) and train its decoder only: the encoder, so the latents a DiT learned on, stay
    /// bit for bit. Each image's latent noise level is then drawn as `|N(0, latent_noise²)|`
    /// (the decoder noise augmentation of Zheng et al. 2025, "Diffusion Transformers with
    /// Representation Autoencoders"), so the decoder learns to turn a DiT's imprecise latents
    /// into clean shapes, not only the encoder's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune_decoder_from: Option<std::path::PathBuf>,
}

impl VaeStageConfig {
    /// The recipe's VAE: 64-px images, 4× down to `[8, 16, 16]` latents, width 32. No
    /// residual block at full resolution (a 3×3 conv in and out only): that level would cost
    /// three quarters of the compute.
    pub fn recipe() -> Self {
        Self {
            image_size: 64,
            vae: AutoencoderTinyConfig {
                encoder_block_out_channels: vec![32, 32, 32],
                decoder_block_out_channels: vec![32, 32, 32],
                num_encoder_blocks: vec![0, 1, 1],
                num_decoder_blocks: vec![1, 1, 0],
                latent_channels: 8,
                ..AutoencoderTinyConfig::taef1()
            },
            batch: 8,
            optim: OptimConfig {
                steps: 1600,
                lr: 2e-3,
                warmup: 50,
                final_lr_fraction: 0.05,
                weight_decay: 0.0,
                clip_norm: 1.0,
            },
            latent_noise: 0.1,
            latent_l2: 1e-3,
            foreground_weight: 4.0,
            shards: 1,
            tune_decoder_from: None,
        }
    }

    /// The recipe's VAE at another compression: `downscale` px per latent cell (2, 4 or 8)
    /// and `latent_channels` channels. One level per factor of 2 below full resolution, with
    /// two residual blocks below full resolution in all (the recipe's 4× has one at each of
    /// its two levels; 2× puts both at its one); full resolution keeps none. 2× with 4
    /// channels gives the DiT 256 tokens of 2 × 2 × 4 for a 64-px image instead of 64 of
    /// 2 × 2 × 8 (docs/TRAINING.md, "A 2× VAE: four times the image tokens").
    pub fn with_compression(
        mut self,
        downscale: usize,
        latent_channels: usize,
    ) -> Result<Self, String> {
        let levels = match downscale {
            2 => 2,
            4 => 3,
            8 => 4,
            _ => {
                return Err(format!("VAE downscale {downscale}: must be 2, 4 or 8"));
            }
        };
        if !(1..=64).contains(&latent_channels) {
            return Err(format!(
                "VAE latent channels {latent_channels}: must be 1 to 64"
            ));
        }
        let width = self.vae.encoder_block_out_channels[0];
        let below = if levels == 2 {
            vec![2]
        } else {
            vec![1; levels - 1]
        };
        let mut encoder = vec![0];
        encoder.extend(&below);
        let mut decoder = below.clone();
        decoder.push(0);
        self.vae.encoder_block_out_channels = vec![width; levels];
        self.vae.decoder_block_out_channels = vec![width; levels];
        self.vae.num_encoder_blocks = encoder;
        self.vae.num_decoder_blocks = decoder;
        self.vae.latent_channels = latent_channels;
        Ok(self)
    }

    /// A few-second config for tests: 32-px images, 8 channels.
    pub fn tiny() -> Self {
        Self {
            image_size: 32,
            vae: AutoencoderTinyConfig {
                encoder_block_out_channels: vec![8, 8],
                decoder_block_out_channels: vec![8, 8],
                num_encoder_blocks: vec![1, 1],
                num_decoder_blocks: vec![1, 1],
                latent_channels: 4,
                ..AutoencoderTinyConfig::taef1()
            },
            batch: 4,
            optim: OptimConfig {
                steps: 40,
                lr: 3e-3,
                warmup: 5,
                final_lr_fraction: 0.1,
                weight_decay: 0.0,
                clip_norm: 1.0,
            },
            latent_noise: 0.1,
            latent_l2: 1e-3,
            foreground_weight: 2.0,
            shards: 1,
            tune_decoder_from: None,
        }
    }

    /// Pixels per latent cell.
    pub fn downscale(&self) -> usize {
        self.vae.downscale()
    }
}

/// Builds an `AutoencoderTiny` on `device` with its checkpoint names, initialised for
/// training (He-normal convs, zero biases) from `seed`.
pub fn init_autoencoder(
    cfg: &AutoencoderTinyConfig,
    seed: u64,
    device: &Device,
) -> Result<(AutoencoderTiny, NamedParams), TrainError> {
    let mut rec = Recorder::new(mix(seed, 0xAE));
    let model = AutoencoderTiny::load(cfg, &mut rec, device)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let names = NamedParams::discover(&model, &rec.tensors)?;
    let mut rng = SeededNormal::new(mix(seed, 0xAE1));
    // He-normal convs; the last conv of every residual block and the decoder's output conv
    // start small, so the untrained autoencoder is near identity blocks and small outputs
    // (plain He init makes ReLU stacks without norms blow up to losses of ~60).
    let model = names.init(model, |p| {
        let he = match Init::fan_in(&p.shape) {
            Init::Normal(s) => s * std::f32::consts::SQRT_2,
            _ => 0.0,
        };
        let init = if p.name.ends_with(".bias") {
            Init::Zeros
        } else if p.name.ends_with(".conv.4.weight") || p.shape.first() == Some(&cfg.out_channels) {
            Init::Normal(0.1 * he)
        } else {
            Init::Normal(he)
        };
        init.values(&p.shape, &mut rng)
    })?;
    Ok((model, names))
}

/// Images `[B, 3, s, s]` of `scenes`.
pub fn image_batch_of(
    scenes: &[unifusion_world::Scene],
    size: u32,
    device: &Device,
) -> Result<Tensor<4>, TrainError> {
    let mut values = Vec::with_capacity(scenes.len() * 3 * (size * size) as usize);
    for s in scenes {
        values.extend(image_values(s, size)?);
    }
    Ok(planar_batch(values, scenes.len(), size, device))
}

/// Already rendered square images, `[B, 3, s, s]` in [−1, 1].
pub fn rendered_batch(images: &[image::RgbImage], device: &Device) -> Tensor<4> {
    let size = images.first().map_or(0, |i| i.width());
    let values = images
        .iter()
        .flat_map(|img| rgb_to_planar(img.as_raw(), size as usize))
        .collect();
    planar_batch(values, images.len(), size, device)
}

fn planar_batch(values: Vec<f32>, n: usize, size: u32, device: &Device) -> Tensor<4> {
    let s = size as usize;
    Tensor::from_data(TensorData::new(values, [n, 3, s, s]), device)
}

/// `mask` (`size × size`, row-major) grown by one pixel in every direction (8-neighbourhood):
/// object pixels and the background ring around them, where blur shows first.
pub fn near_objects(mask: &[bool], size: u32) -> Vec<bool> {
    let n = size as usize;
    let mut out = vec![false; n * n];
    for y in 0..n {
        for x in 0..n {
            if mask[y * n + x] {
                for yy in y.saturating_sub(1)..(y + 2).min(n) {
                    for xx in x.saturating_sub(1)..(x + 2).min(n) {
                        out[yy * n + xx] = true;
                    }
                }
            }
        }
    }
    out
}

/// Images `[B, 3, s, s]` of scenes `(seed, first..first + n)`.
pub fn image_batch(
    seed: u64,
    first: u64,
    n: usize,
    size: u32,
    device: &Device,
) -> Result<Tensor<4>, TrainError> {
    let scenes: Vec<_> = (0..n as u64).map(|i| scene(seed, first + i)).collect();
    image_batch_of(&scenes, size, device)
}

/// Training scenes `first..first + count` of the stage's stream, rendered, and with a
/// foreground weight their per-pixel loss weights.
fn training_batch(
    config: &VaeStageConfig,
    device: &Device,
    seed: u64,
    first: usize,
    count: usize,
) -> Result<(Tensor<4>, Option<Tensor<4>>), TrainError> {
    let size = config.image_size;
    let scenes: Vec<_> = (first..first + count)
        .map(|i| scene(mix(seed, 0x1A), i as u64))
        .collect();
    let render_config = RenderConfig::with_size(size);
    let images = scenes
        .iter()
        .map(|s| render(s, &render_config))
        .collect::<Result<Vec<_>, _>>()?;
    let extra = config.foreground_weight;
    let weights = if extra == 0.0 {
        None
    } else {
        let mut weights = Vec::with_capacity(count * (size * size) as usize);
        for (s, img) in scenes.iter().zip(&images) {
            let near = near_objects(&foreground_squares(img, s.background(), 1)?, size);
            weights.extend(near.into_iter().map(|f| if f { 1.0 + extra } else { 1.0 }));
        }
        let s = size as usize;
        Some(Tensor::<4>::from_data(
            TensorData::new(weights, [count, 1, s, s]),
            device,
        ))
    };
    Ok((rendered_batch(&images, device), weights))
}

/// The reconstruction loss of a batch under `model`: L1 + MSE (weighted per pixel where
/// `weights` are given) of the decoding of the noised latents, plus the latents' L2 term.
fn reconstruction_loss(
    config: &VaeStageConfig,
    device: &Device,
    model: &AutoencoderTiny,
    x: Tensor<4>,
    weights: Option<Tensor<4>>,
    noise_seed: u64,
) -> Result<Tensor<1>, TrainError> {
    let z = model
        .encoder
        .encode(x.clone())
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let tuning = config.tune_decoder_from.is_some();
    // Tuning the decoder: no gradient reaches the encoder, so AdamW leaves it as it is.
    let z = if tuning { z.detach() } else { z };
    let dims = z.dims();
    let n: usize = dims.iter().product();
    let per_image = n / dims[0].max(1);
    let mut rng = SeededNormal::new(noise_seed);
    let levels: Vec<f32> = (0..dims[0])
        .map(|_| {
            if tuning {
                (rng.next_f32() * config.latent_noise).abs()
            } else {
                config.latent_noise
            }
        })
        .collect();
    let eps: Vec<f32> = (0..n)
        .map(|i| rng.next_f32() * levels[i / per_image])
        .collect();
    let eps = Tensor::<4>::from_data(TensorData::new(eps, dims), device);
    let y = model
        .decoder
        .decode(z.clone() + eps)
        .map_err(|e| TrainError::Model(e.to_string()))?;
    let diff = y - x;
    let rec = match weights {
        None => diff.clone().abs().mean() + diff.square().mean(),
        Some(w) => {
            let channels = diff.dims()[1] as f32;
            let total = w.clone().sum() * channels;
            ((diff.clone().abs() + diff.square()) * w).sum() / total
        }
    };
    Ok(rec + z.square().mean() * config.latent_l2)
}

/// The VAE stage.
pub struct VaeStage {
    /// Settings.
    pub config: VaeStageConfig,
    seed: u64,
    device: Device,
    ae: Trainable<AutoencoderTiny>,
}

/// Reconstruction quality on fresh scenes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaeReport {
    /// Images evaluated.
    pub images: usize,
    /// PSNR of decoded vs rendered, in dB, over 8-bit pixels.
    pub psnr_db: f64,
    /// The world's judge (micro average) on the rendered images.
    pub judge_rendered: f64,
    /// The judge on the decoded images.
    pub judge_decoded: f64,
    /// Mean and standard deviation of the latents.
    pub latent_mean: f64,
    pub latent_std: f64,
    /// Rendered / decoded pairs of the first 16 images.
    #[serde(skip)]
    pub reconstructions: image::RgbImage,
}

impl VaeStage {
    /// A fresh stage on `backend`.
    pub fn new(config: VaeStageConfig, seed: u64, backend: Backend) -> Result<Self, TrainError> {
        let device = backend.autodiff();
        let (model, names) = init_autoencoder(&config.vae, seed, &device)?;
        let mut ae = Trainable::new(model, names, config.optim.clone());
        if let Some(path) = &config.tune_decoder_from {
            ae.import_file(path, "--vae-tune-decoder")?;
        }
        Ok(Self {
            config,
            seed,
            device,
            ae,
        })
    }

    /// The reconstruction loss of a batch.
    #[cfg(test)]
    fn loss(
        &self,
        x: Tensor<4>,
        weights: Option<Tensor<4>>,
        noise_seed: u64,
    ) -> Result<Tensor<1>, TrainError> {
        reconstruction_loss(
            &self.config,
            &self.device,
            self.ae.model(),
            x,
            weights,
            noise_seed,
        )
    }

    /// The decoder's tensors (`decoder.layers.*`), what the pipeline's `vae.safetensors` holds.
    pub fn decoder_tensors(&self) -> NamedTensors {
        self.ae
            .names
            .export(self.ae.model())
            .into_iter()
            .filter(|(n, _, _)| n.starts_with("decoder."))
            .collect()
    }

    /// Both halves under diffusers names.
    pub fn autoencoder_tensors(&self) -> NamedTensors {
        self.ae.names.export(self.ae.model())
    }

    /// PSNR and judge scores on `n` scenes of a stream training never draws.
    pub fn evaluate(&self, n: usize) -> Result<VaeReport, TrainError> {
        let model = self.ae.model().valid();
        let s = self.config.image_size;
        let device = self.device.clone().inner();
        let eval_seed = mix(self.seed, 0xE7A1);
        let (mut se, mut count) = (0f64, 0usize);
        let (mut rendered, mut decoded) = (Vec::new(), Vec::new());
        let (mut zsum, mut zsq, mut zn) = (0f64, 0f64, 0usize);
        let mut sheet = Vec::new();
        for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
            let first = chunk[0] as u64;
            let x = image_batch(eval_seed, first, chunk.len(), s, &device)?;
            let z = model
                .encoder
                .encode(x.clone())
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let y = model
                .decoder
                .decode(z.clone())
                .map_err(|e| TrainError::Model(e.to_string()))?;
            let zv = to_vec(z)?;
            zsum += zv.iter().map(|&v| v as f64).sum::<f64>();
            zsq += zv.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
            zn += zv.len();
            let xv = to_vec(x)?;
            let yv = to_vec(y)?;
            let per = 3 * (s * s) as usize;
            for (j, &i) in chunk.iter().enumerate() {
                let a = planar_to_rgb(&xv[j * per..(j + 1) * per], s as usize);
                let b = planar_to_rgb(&yv[j * per..(j + 1) * per], s as usize);
                se += a
                    .iter()
                    .zip(&b)
                    .map(|(&p, &q)| (p as f64 - q as f64).powi(2))
                    .sum::<f64>();
                count += a.len();
                let intended = scene(eval_seed, i as u64);
                for (rgb, scores) in [(a, &mut rendered), (b, &mut decoded)] {
                    let img = image::RgbImage::from_raw(s, s, rgb)
                        .ok_or_else(|| TrainError::Model("image buffer size".into()))?;
                    let parsed = unifusion_world::parse_image(&img)?;
                    scores.push(score_scene(&intended, &parsed));
                    if i < 16 {
                        sheet.push(img);
                    }
                }
            }
        }
        // Rendered and decoded side by side, 8 pairs a row.
        let reconstructions = unifusion_world::render::contact_sheet(&sheet, 16);
        let mse = se / count.max(1) as f64;
        let mean = zsum / zn.max(1) as f64;
        Ok(VaeReport {
            images: n,
            psnr_db: 10.0 * (255f64.powi(2) / mse.max(1e-12)).log10(),
            judge_rendered: micro_average(&rendered),
            judge_decoded: micro_average(&decoded),
            latent_mean: mean,
            latent_std: (zsq / zn.max(1) as f64 - mean * mean).max(0.0).sqrt(),
            reconstructions,
        })
    }
}

/// A tensor's values.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, TrainError> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| TrainError::Model(format!("readback: {e:?}")))
}

impl Stage for VaeStage {
    fn name(&self) -> &'static str {
        "vae"
    }

    fn steps(&self) -> usize {
        self.config.optim.steps
    }

    fn step(&mut self, k: usize) -> Result<(f32, f64), TrainError> {
        let b = self.config.batch;
        let shards = self.config.shards.clamp(1, b.max(1));
        let (config, device, seed) = (&self.config, &self.device, self.seed);
        self.ae.sharded_step(device, k, shards, |model, shard| {
            let (first, end) = shard_range(b, shard, shards);
            let (x, w) = training_batch(config, device, seed, k * b + first, end - first)?;
            let noise_seed = shard_seed(mix(seed, 0x2000 + k as u64), shard, shards);
            let loss = reconstruction_loss(config, device, model, x, w, noise_seed)?;
            Ok(batch_share(loss, b, shard, shards))
        })
    }

    fn save(&self, dir: &Path) -> Result<Vec<u64>, TrainError> {
        self.ae.save(dir)
    }

    fn load(&mut self, dir: &Path, ids: Vec<u64>) -> Result<(), TrainError> {
        self.ae.load(dir, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::{Limit, run_stage, run_stage_until};
    use unifusion_model::generator::params::WeightMap;
    use unifusion_model::generator::tiny_vae::TinyDecoder;

    #[test]
    fn near_objects_grows_the_mask_by_one_pixel_and_stops_at_the_border() {
        let mut mask = vec![false; 25];
        mask[0] = true; // corner (0, 0)
        mask[2 * 5 + 3] = true; // (x 3, y 2)
        let grown = near_objects(&mask, 5);
        let set: Vec<usize> = (0..25).filter(|&i| grown[i]).collect();
        // (0,0) → x,y ∈ {0,1}; (3,2) → x ∈ 2..=4, y ∈ 1..=3.
        assert_eq!(set, vec![0, 1, 5, 6, 7, 8, 9, 12, 13, 14, 17, 18, 19]);
    }

    #[test]
    fn compression_settings_give_the_asked_downscale_and_keep_the_recipe_at_4() {
        let recipe = VaeStageConfig::recipe();
        assert_eq!(recipe.clone().with_compression(4, 8), Ok(recipe.clone()));
        let two = recipe
            .clone()
            .with_compression(2, 4)
            .expect("2× is allowed");
        assert_eq!(two.downscale(), 2);
        assert_eq!(two.vae.latent_channels, 4);
        assert_eq!(two.vae.num_encoder_blocks, vec![0, 2]);
        assert_eq!(two.vae.num_decoder_blocks, vec![2, 0]);
        let eight = recipe
            .clone()
            .with_compression(8, 16)
            .expect("8× is allowed");
        assert_eq!(eight.downscale(), 8);
        assert_eq!(eight.vae.encoder_block_out_channels.len(), 4);
        assert_eq!(
            (eight.optim, eight.batch),
            (recipe.optim.clone(), recipe.batch)
        );
        for (d, c) in [(3, 8), (16, 8), (0, 8), (2, 0), (4, 65)] {
            assert!(recipe.clone().with_compression(d, c).is_err(), "{d} {c}");
        }
    }

    #[test]
    fn the_weighted_loss_with_unit_weights_is_the_plain_loss() {
        let stage = VaeStage::new(VaeStageConfig::tiny(), 5, Backend::Flex).expect("builds");
        let s = stage.config.image_size;
        let x = image_batch(1, 0, 2, s, &stage.device).expect("renders");
        let ones = Tensor::<4>::ones([2, 1, s as usize, s as usize], &stage.device);
        let plain: f32 = stage.loss(x.clone(), None, 9).expect("loss").into_scalar();
        let weighted: f32 = stage.loss(x, Some(ones), 9).expect("loss").into_scalar();
        assert!(
            (plain - weighted).abs() < 1e-5 * plain.abs().max(1.0),
            "{plain} vs {weighted}"
        );
    }

    #[test]
    fn short_run_reduces_the_loss_and_the_decoder_loads_in_the_model_crate() {
        let dir = std::env::temp_dir().join(format!("unifusion-vae-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut stage = VaeStage::new(VaeStageConfig::tiny(), 3, Backend::Flex).expect("builds");
        let run = run_stage(&mut stage, &dir, 1000, &mut |_| {}).expect("trains");
        let (first, last) = run.curve.first_last_mean(5);
        assert!(last < 0.7 * first, "loss {first} -> {last}");
        assert!(dir.join("loss.png").exists() && dir.join("loss.csv").exists());

        // The pipeline's own decoder reads the exported tensors and decodes like training.
        let bytes = crate::named::safetensors_bytes(&stage.decoder_tensors()).expect("bytes");
        let mut map = WeightMap::from_safetensors(&bytes).expect("parses");
        let device = Device::flex();
        let decoder =
            TinyDecoder::load(&stage.config.vae, &mut map, "decoder", &device).expect("loads");
        map.finish().expect("every tensor used");
        let z = Tensor::<4>::ones([1, 4, 16, 16], &device);
        let a = to_vec(decoder.decode(z.clone()).expect("decodes")).expect("reads");
        let trained = stage.ae.model().valid();
        let b = to_vec(trained.decoder.decode(z).expect("decodes")).expect("reads");
        assert_eq!(a, b);

        let report = stage.evaluate(4).expect("evaluates");
        assert!(report.psnr_db.is_finite() && report.judge_rendered > 0.99);
        // 4 rendered + 4 decoded tiles in one row of the 16-wide sheet.
        assert_eq!(report.reconstructions.dimensions(), (16 * 34 + 2, 36));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tuning_the_decoder_keeps_the_encoder_bit_for_bit_and_refuses_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("unifusion-vae-tune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut base = VaeStage::new(VaeStageConfig::tiny(), 3, Backend::Flex).expect("builds");
        run_stage(&mut base, &dir.join("base"), 1000, &mut |_| {}).expect("trains");
        let trained = base.autoencoder_tensors();
        let path = dir.join("autoencoder.safetensors");
        std::fs::write(
            &path,
            crate::named::safetensors_bytes(&trained).expect("bytes"),
        )
        .expect("writes");

        let config = VaeStageConfig {
            tune_decoder_from: Some(path),
            latent_noise: 0.5,
            ..VaeStageConfig::tiny()
        };
        // Another seed: the start is the file's weights, not a fresh initialisation.
        let mut tuned = VaeStage::new(config.clone(), 4, Backend::Flex).expect("builds");
        assert_eq!(tuned.autoencoder_tensors(), trained);
        run_stage(&mut tuned, &dir.join("tuned"), 1000, &mut |_| {}).expect("tunes");
        let after = tuned.autoencoder_tensors();
        let (mut encoder, mut decoder_changed) = (0, 0);
        for ((name, _, a), (other, _, b)) in trained.iter().zip(&after) {
            assert_eq!(name, other);
            if name.starts_with("encoder.") {
                assert_eq!(a, b, "{name} moved");
                encoder += 1;
            } else if a != b {
                decoder_changed += 1;
            }
        }
        assert!(
            encoder > 0 && decoder_changed > 0,
            "{encoder} {decoder_changed}"
        );

        let bad = dir.join("bad.safetensors");
        std::fs::write(&bad, b"not a safetensors file").expect("writes");
        for path in [bad, dir.join("missing.safetensors")] {
            let config = VaeStageConfig {
                tune_decoder_from: Some(path.clone()),
                ..config.clone()
            };
            let Err(e) = VaeStage::new(config, 4, Backend::Flex) else {
                panic!("{} was accepted", path.display());
            };
            assert!(
                e.to_string().contains("missing.safetensors")
                    || e.to_string().contains("--vae-tune-decoder"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
        resume_matches(1);
    }

    /// Threads do not make a run depend on timing: a sharded run resumes bit-identically too.
    #[test]
    fn a_resumed_sharded_run_ends_where_an_uninterrupted_one_does() {
        resume_matches(2);
    }

    fn resume_matches(shards: usize) {
        let config = VaeStageConfig {
            optim: OptimConfig {
                steps: 8,
                ..VaeStageConfig::tiny().optim
            },
            shards,
            ..VaeStageConfig::tiny()
        };
        let base = std::env::temp_dir().join(format!(
            "unifusion-resume-test-{}-{shards}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        let mut whole = VaeStage::new(config.clone(), 9, Backend::Flex).expect("builds");
        let a = run_stage(&mut whole, &base.join("a"), 3, &mut |_| {}).expect("trains");

        let mut first = VaeStage::new(config.clone(), 9, Backend::Flex).expect("builds");
        run_stage_until(
            &mut first,
            &base.join("b"),
            3,
            Limit {
                stop_step: 5,
                deadline: None,
            },
            &mut |_| {},
        )
        .expect("trains");
        drop(first); // a new process, in effect
        let mut second = VaeStage::new(config, 9, Backend::Flex).expect("builds");
        let b = run_stage(&mut second, &base.join("b"), 3, &mut |_| {}).expect("resumes");
        assert_eq!(b.resumed_from, 5);
        assert_eq!(a.curve, b.curve);
        assert_eq!(whole.autoencoder_tensors(), second.autoencoder_tensors());
        let _ = std::fs::remove_dir_all(&base);
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// `cargo test --workspace timing_breakdown -- --ignored --nocapture`: where a recipe VAE
    /// step's time goes.
    #[test]
    #[ignore]
    fn timing_breakdown() {
        let mut stage = VaeStage::new(VaeStageConfig::recipe(), 0, Backend::Flex).expect("builds");
        let t = Instant::now();
        let x = image_batch(1, 0, 16, 64, &stage.device).expect("renders");
        println!("render 16: {:.3} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let loss = stage.loss(x, None, 1).expect("loss");
        let _ = to_vec(loss.clone());
        println!("forward: {:.3} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        stage.ae.apply(loss, 0).expect("step");
        println!("backward + step: {:.3} s", t.elapsed().as_secs_f64());
        for k in 1..4 {
            let t = Instant::now();
            stage.step(k).expect("step");
            println!("step: {:.3} s", t.elapsed().as_secs_f64());
        }
    }
}
