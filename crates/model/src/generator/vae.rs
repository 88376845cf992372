//! `AutoencoderKL` in the FLUX layout (diffusers `autoencoder_kl.py` + `vae.py`
//! `Encoder`/`Decoder`): conv_in → (down: res blocks + stride-2 conv) → mid (res, single-head
//! attention, res) → GroupNorm → SiLU → conv_out; the decoder mirrors it with one more res
//! block per level and nearest-×2 + conv upsampling. GroupNorm eps 1e-6 everywhere.
//!
//! [`AutoencoderKl::decode`] takes exactly what diffusers' `decode()` takes (raw latents, before
//! `post_quant_conv`); the pipeline's scaling is [`AutoencoderKl::unscale_latents`]
//! (`z / scaling_factor + shift_factor`) and its inverse [`AutoencoderKl::scale_latents`].

use crate::attention::blocked_attention;
use crate::precision::norm_in_f32;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::{Device, Tensor};

use super::config::AutoencoderKlConfig;
use super::params::{LoadError, ParamSource, conv2d, group_norm, linear};
use super::{GeneratorError, check_shape};

/// GroupNorm with its statistics in f32 whatever the compute precision (its parameters are
/// f32: [`group_norm`]).
fn group_norm_f32(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    norm_in_f32(x, |x| norm.forward(x))
}

const EPS: f64 = 1e-6;

/// `ResnetBlock2D` without time embedding: norm → SiLU → conv, twice, plus a 1×1 shortcut
/// when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        c_in: usize,
        c_out: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            norm1: group_norm(src, &format!("{name}.norm1"), groups, c_in, EPS, device)?,
            conv1: conv2d(
                src,
                &format!("{name}.conv1"),
                [c_in, c_out],
                3,
                1,
                1,
                true,
                device,
            )?,
            norm2: group_norm(src, &format!("{name}.norm2"), groups, c_out, EPS, device)?,
            conv2: conv2d(
                src,
                &format!("{name}.conv2"),
                [c_out, c_out],
                3,
                1,
                1,
                true,
                device,
            )?,
            conv_shortcut: if c_in != c_out {
                Some(conv2d(
                    src,
                    &format!("{name}.conv_shortcut"),
                    [c_in, c_out],
                    1,
                    1,
                    0,
                    true,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self
            .conv1
            .forward(silu(group_norm_f32(&self.norm1, x.clone())));
        let h = self.conv2.forward(silu(group_norm_f32(&self.norm2, h)));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        skip + h
    }
}

/// The middle attention block: GroupNorm, one head over all pixels, residual.
#[derive(Module, Debug)]
pub struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        c: usize,
        groups: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            group_norm: group_norm(src, &format!("{name}.group_norm"), groups, c, EPS, device)?,
            to_q: linear(src, &format!("{name}.to_q"), c, c, true, device)?,
            to_k: linear(src, &format!("{name}.to_k"), c, c, true, device)?,
            to_v: linear(src, &format!("{name}.to_v"), c, c, true, device)?,
            to_out: linear(src, &format!("{name}.to_out.0"), c, c, true, device)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let t = group_norm_f32(&self.group_norm, x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = self.to_q.forward(t.clone()).unsqueeze_dim::<4>(1);
        let k = self.to_k.forward(t.clone()).unsqueeze_dim::<4>(1);
        let v = self.to_v.forward(t).unsqueeze_dim::<4>(1);
        let a = blocked_attention(q, k, v, None, AttentionModuleOptions::default()).reshape([
            b,
            h * w,
            c,
        ]);
        let a = self.to_out.forward(a).swap_dims(1, 2).reshape([b, c, h, w]);
        x + a
    }
}

/// `UNetMidBlock2D`: res, (attention), res.
#[derive(Module, Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        c: usize,
        groups: usize,
        attn: bool,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            resnets: vec![
                ResnetBlock::load(src, &format!("{name}.resnets.0"), c, c, groups, device)?,
                ResnetBlock::load(src, &format!("{name}.resnets.1"), c, c, groups, device)?,
            ],
            attention: if attn {
                Some(AttentionBlock::load(
                    src,
                    &format!("{name}.attentions.0"),
                    c,
                    groups,
                    device,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x);
        if let Some(a) = &self.attention {
            x = a.forward(x);
        }
        self.resnets[1].forward(x)
    }
}

/// One level of the encoder (`DownEncoderBlock2D`) or decoder (`UpDecoderBlock2D`).
#[derive(Module, Debug)]
pub struct Level {
    resnets: Vec<ResnetBlock>,
    /// `downsamplers.0.conv` (pad right/bottom by one, 3×3 stride 2) or `upsamplers.0.conv`
    /// (after nearest ×2).
    resample: Option<Conv2d>,
}

/// Nearest-neighbour ×`f` upsampling of `[B, C, H, W]` (exact: a broadcast, no arithmetic).
pub(crate) fn upsample_nearest(x: Tensor<4>, f: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, f, w, f])
        .reshape([b, c, h * f, w * f])
}

/// The `AutoencoderKL` decoder (`vae.py` `Decoder`).
#[derive(Module, Debug)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(
        src: &mut impl ParamSource,
        cfg: &AutoencoderKlConfig,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let g = cfg.norm_num_groups;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let mut up_blocks = Vec::new();
        let mut prev = top;
        for (i, &out) in rev.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { out };
                    ResnetBlock::load(
                        src,
                        &format!("decoder.up_blocks.{i}.resnets.{j}"),
                        c_in,
                        out,
                        g,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?;
            let resample = if i + 1 < rev.len() {
                Some(conv2d(
                    src,
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    [out, out],
                    3,
                    1,
                    1,
                    true,
                    device,
                )?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, resample });
            prev = out;
        }
        let c0 = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(
                src,
                "decoder.conv_in",
                [cfg.latent_channels, top],
                3,
                1,
                1,
                true,
                device,
            )?,
            mid_block: MidBlock::load(
                src,
                "decoder.mid_block",
                top,
                g,
                cfg.mid_block_add_attention,
                device,
            )?,
            up_blocks,
            conv_norm_out: group_norm(src, "decoder.conv_norm_out", g, c0, EPS, device)?,
            conv_out: conv2d(
                src,
                "decoder.conv_out",
                [c0, cfg.out_channels],
                3,
                1,
                1,
                true,
                device,
            )?,
        })
    }

    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for level in &self.up_blocks {
            for r in &level.resnets {
                x = r.forward(x);
            }
            if let Some(conv) = &level.resample {
                x = conv.forward(upsample_nearest(x, 2));
            }
        }
        self.conv_out
            .forward(silu(group_norm_f32(&self.conv_norm_out, x)))
    }
}

/// The `AutoencoderKL` encoder (`vae.py` `Encoder`, `double_z`).
#[derive(Module, Debug)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(
        src: &mut impl ParamSource,
        cfg: &AutoencoderKlConfig,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let g = cfg.norm_num_groups;
        let ch = &cfg.block_out_channels;
        let mut down_blocks = Vec::new();
        let mut prev = ch[0];
        for (i, &out) in ch.iter().enumerate() {
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { out };
                    ResnetBlock::load(
                        src,
                        &format!("encoder.down_blocks.{i}.resnets.{j}"),
                        c_in,
                        out,
                        g,
                        device,
                    )
                })
                .collect::<Result<_, _>>()?;
            let resample = if i + 1 < ch.len() {
                Some(conv2d(
                    src,
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    [out, out],
                    3,
                    2,
                    0,
                    true,
                    device,
                )?)
            } else {
                None
            };
            down_blocks.push(Level { resnets, resample });
            prev = out;
        }
        let top = prev;
        Ok(Self {
            conv_in: conv2d(
                src,
                "encoder.conv_in",
                [cfg.in_channels, ch[0]],
                3,
                1,
                1,
                true,
                device,
            )?,
            down_blocks,
            mid_block: MidBlock::load(
                src,
                "encoder.mid_block",
                top,
                g,
                cfg.mid_block_add_attention,
                device,
            )?,
            conv_norm_out: group_norm(src, "encoder.conv_norm_out", g, top, EPS, device)?,
            conv_out: conv2d(
                src,
                "encoder.conv_out",
                [top, 2 * cfg.latent_channels],
                3,
                1,
                1,
                true,
                device,
            )?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for level in &self.down_blocks {
            for r in &level.resnets {
                x = r.forward(x);
            }
            if let Some(conv) = &level.resample {
                // diffusers' Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) then stride-2 conv.
                x = conv.forward(x.pad((0, 1, 0, 1), PadMode::Constant(0.0)));
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out
            .forward(silu(group_norm_f32(&self.conv_norm_out, x)))
    }
}

/// `AutoencoderKL`: decoder (+ optional encoder), quant convs, latent scaling.
#[derive(Module, Debug)]
pub struct AutoencoderKl {
    /// Absent when loaded with [`AutoencoderKl::load_decoder`].
    pub encoder: Option<Encoder>,
    /// The decoder.
    pub decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    latent_channels: usize,
    scaling_factor: f64,
    shift_factor: f64,
}

impl AutoencoderKl {
    /// Encoder and decoder from diffusers names (`encoder.*`, `decoder.*`, `quant_conv`, ...).
    pub fn load(
        cfg: &AutoencoderKlConfig,
        src: &mut impl ParamSource,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        Self::build(cfg, src, device, true)
    }

    /// The decoder side only (`decoder.*`, `post_quant_conv`); encoder keys are left in `src`.
    pub fn load_decoder(
        cfg: &AutoencoderKlConfig,
        src: &mut impl ParamSource,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        Self::build(cfg, src, device, false)
    }

    fn build(
        cfg: &AutoencoderKlConfig,
        src: &mut impl ParamSource,
        device: &Device,
        with_encoder: bool,
    ) -> Result<Self, GeneratorError> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        let encoder = if with_encoder {
            Some(Encoder::load(src, cfg, device)?)
        } else {
            None
        };
        let quant_conv = if with_encoder && cfg.use_quant_conv {
            Some(conv2d(
                src,
                "quant_conv",
                [2 * l, 2 * l],
                1,
                1,
                0,
                true,
                device,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(
                src,
                "post_quant_conv",
                [l, l],
                1,
                1,
                0,
                true,
                device,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder,
            decoder: Decoder::load(src, cfg, device)?,
            quant_conv,
            post_quant_conv,
            latent_channels: l,
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor.unwrap_or(0.0),
        })
    }

    /// diffusers' `decode()`: raw latents `[B, C, h, w]` → image `[B, 3, 8h, 8w]` in about [−1, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Result<Tensor<4>, GeneratorError> {
        check_shape(
            "latents",
            &latents.dims(),
            &[None, Some(self.latent_channels), None, None],
        )?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        Ok(self.decoder.forward(z))
    }

    /// The posterior's mean and log-variance for images `[B, 3, H, W]` in [−1, 1], each
    /// `[B, C, H/8, W/8]` (diffusers' `encode().latent_dist.mean` / `.logvar`, unclamped).
    pub fn encode(&self, images: Tensor<4>) -> Result<(Tensor<4>, Tensor<4>), GeneratorError> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            GeneratorError::Config(
                "this VAE was loaded without its encoder (use AutoencoderKl::load)".into(),
            )
        })?;
        check_shape("images", &images.dims(), &[None, None, None, None])?;
        let h = encoder.forward(images);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(h),
            None => h,
        };
        let l = self.latent_channels;
        Ok((moments.clone().narrow(1, 0, l), moments.narrow(1, l, l)))
    }

    /// Pipeline latents (what the DiT sees) → raw latents for [`Self::decode`]:
    /// `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        z / self.scaling_factor + self.shift_factor
    }

    /// Raw latents (e.g. the posterior mean) → pipeline latents: `(x − shift) · scaling`.
    pub fn scale_latents(&self, x: Tensor<4>) -> Tensor<4> {
        (x - self.shift_factor) * self.scaling_factor
    }
}

/// Image `[B, 3, H, W]` in [−1, 1] → `[0, 1]`, clamped (diffusers' postprocess).
pub fn image_to_unit(x: Tensor<4>) -> Tensor<4> {
    (x / 2.0 + 0.5).clamp(0.0, 1.0)
}

/// Image in `[0, 1]` → [−1, 1] (what the encoders take).
pub fn unit_to_image(x: Tensor<4>) -> Tensor<4> {
    x * 2.0 - 1.0
}
