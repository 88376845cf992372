//! `AutoencoderTiny` (TAESD / TAEF1; diffusers `autoencoder_tiny.py`, `vae.py`
//! `EncoderTiny`/`DecoderTiny`, `AutoencoderTinyBlock`): plain 3×3 convs, ReLU, nearest
//! upsampling; ~1M parameters, fast enough for per-step previews.
//!
//! Weight names index diffusers' `nn.Sequential` (`decoder.layers.{k}`), where activations
//! and upsamplers take indices too; [`TinyDecoder::load`] walks the same construction.
//! `decode` clamps `tanh(z/3)·3` and returns [−1, 1]; `encode` takes [−1, 1] and returns raw
//! latents.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::{relu, silu};
use burn::tensor::{Device, Tensor, TensorData};

use super::config::AutoencoderTinyConfig;
use super::params::{LoadError, ParamSource, conv2d};
use super::vae::upsample_nearest;
use super::{GeneratorError, check_shape};

fn act(x: Tensor<4>, use_silu: bool) -> Tensor<4> {
    if use_silu { silu(x) } else { relu(x) }
}

/// `AutoencoderTinyBlock` with equal channels: `relu(conv(act(conv(act(conv(x))))) + x)`.
#[derive(Module, Debug)]
pub struct TinyBlock {
    convs: Vec<Conv2d>,
}

impl TinyBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        c: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let convs = [0, 2, 4]
            .iter()
            .map(|i| {
                conv2d(
                    src,
                    &format!("{name}.conv.{i}"),
                    [c, c],
                    3,
                    1,
                    1,
                    true,
                    device,
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { convs })
    }

    fn forward(&self, x: Tensor<4>, use_silu: bool) -> Tensor<4> {
        let h = act(self.convs[0].forward(x.clone()), use_silu);
        let h = act(self.convs[1].forward(h), use_silu);
        relu(self.convs[2].forward(h) + x)
    }
}

/// One decoder level: tiny blocks, optional upsampling, then a conv.
#[derive(Module, Debug)]
pub struct TinyUpLevel {
    blocks: Vec<TinyBlock>,
    upsample: bool,
    conv: Conv2d,
}

/// `DecoderTiny`.
#[derive(Module, Debug)]
pub struct TinyDecoder {
    conv_in: Conv2d,
    levels: Vec<TinyUpLevel>,
    use_silu: bool,
    factor: usize,
    latent_channels: usize,
    /// The config's `scaling_factor` and `shift_factor`: pipeline latents are
    /// `scaling_factor · (raw − shift_factor)`.
    scaling_factor: f64,
    shift_factor: f64,
    /// The config's `latents_mean` / `latents_std` (empty when absent).
    latents_mean: Vec<f64>,
    latents_std: Vec<f64>,
}

impl TinyDecoder {
    /// Loads `{prefix}.layers.{k}` (prefix `decoder` in an `AutoencoderTiny` checkpoint).
    pub fn load(
        cfg: &AutoencoderTinyConfig,
        src: &mut impl ParamSource,
        prefix: &str,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        cfg.validate()?;
        let ch = &cfg.decoder_block_out_channels;
        let conv_in = conv2d(
            src,
            &format!("{prefix}.layers.0"),
            [cfg.latent_channels, ch[0]],
            3,
            1,
            1,
            true,
            device,
        )?;
        // Sequential index: conv (0), activation (1), then per level blocks, upsample, conv.
        let mut k = 2;
        let n = cfg.num_decoder_blocks.len();
        let mut levels = Vec::new();
        for (i, &count) in cfg.num_decoder_blocks.iter().enumerate() {
            let c = ch[i];
            let last = i + 1 == n;
            let mut blocks = Vec::new();
            for _ in 0..count {
                blocks.push(TinyBlock::load(
                    src,
                    &format!("{prefix}.layers.{k}"),
                    c,
                    device,
                )?);
                k += 1;
            }
            if !last {
                k += 1;
            }
            let out = if last { cfg.out_channels } else { c };
            let conv = conv2d(
                src,
                &format!("{prefix}.layers.{k}"),
                [c, out],
                3,
                1,
                1,
                last,
                device,
            )?;
            k += 1;
            levels.push(TinyUpLevel {
                blocks,
                upsample: !last,
                conv,
            });
        }
        Ok(Self {
            conv_in,
            levels,
            use_silu: cfg.act_fn == "silu",
            factor: cfg.upsampling_scaling_factor,
            latent_channels: cfg.latent_channels,
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor,
            latents_mean: cfg.latents_mean.clone().unwrap_or_default(),
            latents_std: cfg.latents_std.clone().unwrap_or_default(),
        })
    }

    /// Pipeline latents (what the DiT samples) → raw latents: `z / scaling_factor +
    /// shift_factor`, as diffusers' pipelines do before `vae.decode`, then, where the config
    /// has per-channel statistics, `· latents_std[c] + latents_mean[c]`. The identity (and no
    /// tensor op) for TAESD-family configs (1 and 0, no statistics).
    pub fn unscale_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        let mut x = latents;
        if self.scaling_factor != 1.0 || self.shift_factor != 0.0 {
            x = x / self.scaling_factor + self.shift_factor;
        }
        if !self.latents_std.is_empty() {
            let (std, mean) = (
                channel_column(&self.latents_std, &x),
                channel_column(&self.latents_mean, &x),
            );
            x = x * std + mean;
        }
        x
    }

    /// Raw latents `[B, C, h, w]` → image `[B, 3, H, W]` in about [−1, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Result<Tensor<4>, GeneratorError> {
        check_shape(
            "latents",
            &latents.dims(),
            &[None, Some(self.latent_channels), None, None],
        )?;
        let x = (latents / 3.0).tanh() * 3.0;
        let mut x = act(self.conv_in.forward(x), self.use_silu);
        for level in &self.levels {
            for b in &level.blocks {
                x = b.forward(x, self.use_silu);
            }
            if level.upsample {
                x = upsample_nearest(x, self.factor);
            }
            x = level.conv.forward(x);
        }
        Ok(x * 2.0 - 1.0)
    }
}

/// One encoder level: a conv (stride 2 after the first level), then tiny blocks.
#[derive(Module, Debug)]
pub struct TinyDownLevel {
    conv: Conv2d,
    blocks: Vec<TinyBlock>,
}

/// `EncoderTiny`.
#[derive(Module, Debug)]
pub struct TinyEncoder {
    levels: Vec<TinyDownLevel>,
    conv_out: Conv2d,
    use_silu: bool,
    in_channels: usize,
}

impl TinyEncoder {
    /// Loads `{prefix}.layers.{k}` (prefix `encoder`).
    pub fn load(
        cfg: &AutoencoderTinyConfig,
        src: &mut impl ParamSource,
        prefix: &str,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        cfg.validate()?;
        let ch = &cfg.encoder_block_out_channels;
        let mut k = 0;
        let mut levels = Vec::new();
        for (i, &count) in cfg.num_encoder_blocks.iter().enumerate() {
            let c = ch[i];
            let name = format!("{prefix}.layers.{k}");
            let conv = if i == 0 {
                conv2d(src, &name, [cfg.in_channels, c], 3, 1, 1, true, device)?
            } else {
                conv2d(src, &name, [c, c], 3, 2, 1, false, device)?
            };
            k += 1;
            let mut blocks = Vec::new();
            for _ in 0..count {
                blocks.push(TinyBlock::load(
                    src,
                    &format!("{prefix}.layers.{k}"),
                    c,
                    device,
                )?);
                k += 1;
            }
            levels.push(TinyDownLevel { conv, blocks });
        }
        let last = ch[ch.len() - 1];
        let conv_out = conv2d(
            src,
            &format!("{prefix}.layers.{k}"),
            [last, cfg.latent_channels],
            3,
            1,
            1,
            true,
            device,
        )?;
        Ok(Self {
            levels,
            conv_out,
            use_silu: cfg.act_fn == "silu",
            in_channels: cfg.in_channels,
        })
    }

    /// Images `[B, 3, H, W]` in [−1, 1] → raw latents.
    pub fn encode(&self, images: Tensor<4>) -> Result<Tensor<4>, GeneratorError> {
        check_shape(
            "images",
            &images.dims(),
            &[None, Some(self.in_channels), None, None],
        )?;
        let mut x = (images + 1.0) / 2.0;
        for level in &self.levels {
            x = level.conv.forward(x);
            for b in &level.blocks {
                x = b.forward(x, self.use_silu);
            }
        }
        Ok(self.conv_out.forward(x))
    }
}

/// `AutoencoderTiny`: both halves.
#[derive(Module, Debug)]
pub struct AutoencoderTiny {
    /// `encoder.*`.
    pub encoder: TinyEncoder,
    /// `decoder.*`.
    pub decoder: TinyDecoder,
}

impl AutoencoderTiny {
    /// Loads both halves from diffusers names.
    pub fn load(
        cfg: &AutoencoderTinyConfig,
        src: &mut impl ParamSource,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        Ok(Self {
            encoder: TinyEncoder::load(cfg, src, "encoder", device)?,
            decoder: TinyDecoder::load(cfg, src, "decoder", device)?,
        })
    }
}

/// Per-channel values as a `[1, C, 1, 1]` tensor on `like`'s device and in its dtype, to
/// broadcast over latents `[B, C, h, w]` (per-channel latent statistics).
pub fn channel_column(values: &[f64], like: &Tensor<4>) -> Tensor<4> {
    let c = values.len();
    let values: Vec<f32> = values.iter().map(|&a| a as f32).collect();
    Tensor::<1>::from_data(TensorData::new(values, [c]), &like.device())
        .cast(like.dtype())
        .reshape([1, c, 1, 1])
}
