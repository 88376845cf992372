//! Configs: serde mirrors of the diffusers `config.json` files (field for field, defaults as in
//! diffusers 0.42.1), with named sizes. Unknown fields (`_class_name`, `_diffusers_version`, ...)
//! are ignored; [`Krea2Config::validate`] and friends reject what this crate cannot run.

use serde::{Deserialize, Serialize};

use super::GeneratorError;

/// `Krea2Transformer2DModel`'s config: text fusion + single-stream DiT.
/// Defaults are Krea 2's 12.8B DiT (diffusers' defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Krea2Config {
    /// Latent channels after patchify (`vae_channels · patch_size²`); also the output width.
    pub in_channels: usize,
    /// Latent cells per token along each axis: the DiT packs `patch_size × patch_size` cells
    /// of the VAE's latents into a token (diffusers' `_pack_latents`: 2). Not a Krea 2 field:
    /// our extension, written only when it is not 2.
    #[serde(skip_serializing_if = "is_two")]
    pub patch_size: usize,
    /// Number of DiT blocks.
    pub num_layers: usize,
    /// Head width; the DiT width is `attention_head_dim · num_attention_heads`.
    pub attention_head_dim: usize,
    /// Query heads in the DiT.
    pub num_attention_heads: usize,
    /// Key/value heads in the DiT (GQA).
    pub num_key_value_heads: usize,
    /// SwiGLU hidden width in the DiT.
    pub intermediate_size: usize,
    /// Width of the sinusoidal timestep embedding (cos half, sin half).
    pub timestep_embed_dim: usize,
    /// Width of the tapped VLM hidden states.
    pub text_hidden_dim: usize,
    /// Number of tapped VLM layers stacked per token.
    pub num_text_layers: usize,
    /// Query heads in the text-fusion blocks.
    pub text_num_attention_heads: usize,
    /// Key/value heads in the text-fusion blocks.
    pub text_num_key_value_heads: usize,
    /// SwiGLU hidden width in the text-fusion blocks.
    pub text_intermediate_size: usize,
    /// Layer-wise blocks (LAP): attention across the tapped-layer axis, per token.
    pub num_layerwise_text_blocks: usize,
    /// Refiner blocks: bidirectional attention across tokens with a key-padding mask.
    pub num_refiner_text_blocks: usize,
    /// Head-dim split over the (t, h, w) RoPE axes; sums to `attention_head_dim`.
    pub axes_dims_rope: [usize; 3],
    /// RoPE base.
    pub rope_theta: f64,
    /// Epsilon of every RMSNorm.
    pub norm_eps: f64,
    /// Also add a fixed 2-D sine-cosine embedding of each image token's absolute grid position
    /// to the image tokens after `img_in` (DiT's and SD3's layout, beside RoPE). Not a diffusers
    /// field: our extension, `false` for every Krea 2 checkpoint and written only when on.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub abs_pos_embed: bool,
}

/// The largest VAE downscale (pixels per latent cell) a config may declare.
pub const MAX_VAE_DOWNSCALE: usize = 64;

fn is_two(n: &usize) -> bool {
    *n == 2
}

impl Default for Krea2Config {
    fn default() -> Self {
        Self::krea2()
    }
}

impl Krea2Config {
    /// Krea 2 (12.8B DiT: 28 blocks, width 6144, 48/12 heads; Qwen3-VL-4B taps, 12 layers).
    pub fn krea2() -> Self {
        Self {
            in_channels: 64,
            patch_size: 2,
            num_layers: 28,
            attention_head_dim: 128,
            num_attention_heads: 48,
            num_key_value_heads: 12,
            intermediate_size: 16384,
            timestep_embed_dim: 256,
            text_hidden_dim: 2560,
            num_text_layers: 12,
            text_num_attention_heads: 20,
            text_num_key_value_heads: 20,
            text_intermediate_size: 6912,
            num_layerwise_text_blocks: 2,
            num_refiner_text_blocks: 2,
            axes_dims_rope: [32, 48, 48],
            rope_theta: 1000.0,
            norm_eps: 1e-5,
            abs_pos_embed: false,
        }
    }

    /// The paper's 8B DiT on InternVL3-8B taps. The paper gives only "8B"; this sizing is ours:
    /// 30 blocks of width 4096 (32/8 heads of 128, SwiGLU 16384) ≈ 7.9B, conditioned on every
    /// third hidden state of Qwen2.5-7B (width 3584, 10 taps), FLUX VAE latents (16·4 channels).
    pub fn unifusion_8b() -> Self {
        Self {
            in_channels: 64,
            patch_size: 2,
            num_layers: 30,
            attention_head_dim: 128,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            intermediate_size: 16384,
            timestep_embed_dim: 256,
            text_hidden_dim: 3584,
            num_text_layers: 10,
            text_num_attention_heads: 28,
            text_num_key_value_heads: 4,
            text_intermediate_size: 9728,
            num_layerwise_text_blocks: 2,
            num_refiner_text_blocks: 2,
            axes_dims_rope: [32, 48, 48],
            rope_theta: 1000.0,
            norm_eps: 1e-5,
            abs_pos_embed: false,
        }
    }

    /// A tiny config for tests: width 32 (4/2 heads of 8), 2 blocks, 3 taps of width 24.
    pub fn tiny() -> Self {
        Self {
            in_channels: 16,
            patch_size: 2,
            num_layers: 2,
            attention_head_dim: 8,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 48,
            timestep_embed_dim: 16,
            text_hidden_dim: 24,
            num_text_layers: 3,
            text_num_attention_heads: 4,
            text_num_key_value_heads: 2,
            text_intermediate_size: 40,
            num_layerwise_text_blocks: 2,
            num_refiner_text_blocks: 2,
            axes_dims_rope: [2, 2, 4],
            rope_theta: 1000.0,
            norm_eps: 1e-5,
            abs_pos_embed: false,
        }
    }

    /// The VAE latent channels this DiT samples: `in_channels / patch_size²`.
    pub fn latent_channels(&self) -> usize {
        self.in_channels / (self.patch_size * self.patch_size).max(1)
    }

    /// DiT width.
    pub fn hidden_size(&self) -> usize {
        self.attention_head_dim * self.num_attention_heads
    }

    /// Rejects configs the model cannot be built from, saying which field is wrong.
    pub fn validate(&self) -> Result<(), GeneratorError> {
        let err = |m: String| Err(GeneratorError::Config(m));
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim {
            return err(format!(
                "sum(axes_dims_rope) = {} must equal attention_head_dim = {}",
                self.axes_dims_rope.iter().sum::<usize>(),
                self.attention_head_dim
            ));
        }
        if self.axes_dims_rope.iter().any(|d| d % 2 != 0) {
            return err("every axes_dims_rope entry must be even".into());
        }
        if !(1..=16).contains(&self.patch_size) {
            return err(format!(
                "patch_size must be 1 to 16, not {}",
                self.patch_size
            ));
        }
        let cells = self.patch_size * self.patch_size;
        if self.in_channels == 0 || !self.in_channels.is_multiple_of(cells) {
            return err(format!(
                "in_channels = {} must be a positive multiple of patch_size² = {cells}",
                self.in_channels
            ));
        }
        if self.abs_pos_embed && !self.hidden_size().is_multiple_of(4) {
            return err(format!(
                "abs_pos_embed needs a DiT width divisible by 4, not {}",
                self.hidden_size()
            ));
        }
        if !self.timestep_embed_dim.is_multiple_of(2) || self.timestep_embed_dim == 0 {
            return err("timestep_embed_dim must be even and positive".into());
        }
        for (what, dim, heads, kv) in [
            (
                "DiT",
                self.hidden_size(),
                self.num_attention_heads,
                self.num_key_value_heads,
            ),
            (
                "text fusion",
                self.text_hidden_dim,
                self.text_num_attention_heads,
                self.text_num_key_value_heads,
            ),
        ] {
            if heads == 0 || kv == 0 || dim % heads != 0 || heads % kv != 0 {
                return err(format!(
                    "{what}: width {dim} must split into {heads} heads, and {heads} heads into {kv} key/value heads"
                ));
            }
        }
        if self.num_text_layers == 0 || self.in_channels == 0 {
            return err("num_text_layers and in_channels must be positive".into());
        }
        Ok(())
    }
}

/// `AutoencoderKL`'s config (the FLUX layout by default): `DownEncoderBlock2D` /
/// `UpDecoderBlock2D` blocks, GroupNorm + SiLU, one attention block in the middle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKlConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Must all be `DownEncoderBlock2D`; its length is the number of levels.
    pub down_block_types: Vec<String>,
    /// Must all be `UpDecoderBlock2D`.
    pub up_block_types: Vec<String>,
    /// Channels per level, finest first.
    pub block_out_channels: Vec<usize>,
    /// Res blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Must be `silu`.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// `z = scaling_factor · (mean − shift_factor)`.
    pub scaling_factor: f64,
    /// See `scaling_factor`; `None` = 0.
    pub shift_factor: Option<f64>,
    /// 1×1 conv on the moments after the encoder (SD VAEs; FLUX has none).
    pub use_quant_conv: bool,
    /// 1×1 conv on the latents before the decoder.
    pub use_post_quant_conv: bool,
    /// Attention block between the two middle res blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKlConfig {
    fn default() -> Self {
        Self::flux()
    }
}

impl AutoencoderKlConfig {
    /// FLUX.1's VAE: 16 latent channels, 8× down, channels 128/256/512/512.
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// Spatial down-sampling factor: `2^(levels − 1)`.
    pub fn downscale(&self) -> usize {
        2usize.saturating_pow(self.block_out_channels.len().saturating_sub(1) as u32)
    }

    /// Rejects configs this crate cannot build.
    pub fn validate(&self) -> Result<(), GeneratorError> {
        let err = |m: String| Err(GeneratorError::Config(m));
        let n = self.block_out_channels.len();
        if n == 0 {
            return err("block_out_channels is empty".into());
        }
        if self.downscale() > MAX_VAE_DOWNSCALE {
            return err(format!(
                "{n} blocks downscale {}×; at most {MAX_VAE_DOWNSCALE}× is supported",
                self.downscale()
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return err(format!(
                "down_block_types and up_block_types need {n} entries, like block_out_channels"
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return err(format!("down block type `{t}` is not supported"));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return err(format!("up block type `{t}` is not supported"));
        }
        if self.act_fn != "silu" {
            return err(format!(
                "act_fn `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            return err(format!(
                "every block_out_channels entry must be divisible by norm_num_groups = {g}"
            ));
        }
        Ok(())
    }
}

/// `AutoencoderTiny`'s config (TAESD / TAEF1): plain conv + ReLU blocks, nearest upsampling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels per encoder level.
    pub encoder_block_out_channels: Vec<usize>,
    /// Channels per decoder level.
    pub decoder_block_out_channels: Vec<usize>,
    /// `relu` (TAESD) or `silu`.
    pub act_fn: String,
    /// Must be `nearest`.
    pub upsample_fn: String,
    /// Latent channels (16 for TAEF1).
    pub latent_channels: usize,
    /// Upsampling factor between decoder levels.
    pub upsampling_scaling_factor: usize,
    /// Tiny blocks per encoder level.
    pub num_encoder_blocks: Vec<usize>,
    /// Tiny blocks per decoder level.
    pub num_decoder_blocks: Vec<usize>,
    /// Latent range for `scale_latents` (raw → [0, 1]).
    pub latent_magnitude: f64,
    /// Latent offset for `scale_latents`.
    pub latent_shift: f64,
    /// Pipeline latent scaling (1 for TAESD-family).
    pub scaling_factor: f64,
    /// Pipeline latent shift.
    pub shift_factor: f64,
    /// Per-channel latent statistics, as diffusers' Wan and QwenImage VAE configs carry them:
    /// with both given, pipeline latents are `(raw − latents_mean[c]) / latents_std[c]` before
    /// the scalar factors (`unifusion train --dit-normalize-latents` writes them). Both or
    /// neither; one entry per latent channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents_mean: Option<Vec<f64>>,
    /// See `latents_mean`; every entry above 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latents_std: Option<Vec<f64>>,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self::taef1()
    }
}

impl AutoencoderTinyConfig {
    /// Pixels per latent cell: `upsampling_scaling_factor` to the number of decoder levels
    /// less one (saturating: [`Self::validate`] refuses more than [`MAX_VAE_DOWNSCALE`]).
    pub fn downscale(&self) -> usize {
        self.upsampling_scaling_factor
            .saturating_pow(self.num_decoder_blocks.len().saturating_sub(1) as u32)
    }

    /// TAEF1: TAESD's layout with 16 latent channels.
    pub fn taef1() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            latent_channels: 16,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            scaling_factor: 1.0,
            shift_factor: 0.0,
            latents_mean: None,
            latents_std: None,
        }
    }

    /// Rejects configs this crate cannot build.
    pub fn validate(&self) -> Result<(), GeneratorError> {
        let err = |m: String| Err(GeneratorError::Config(m));
        if self.encoder_block_out_channels.len() != self.num_encoder_blocks.len()
            || self.decoder_block_out_channels.len() != self.num_decoder_blocks.len()
            || self.num_decoder_blocks.is_empty()
            || self.num_encoder_blocks.is_empty()
        {
            return err(
                "block channel lists and block counts must have equal, non-zero lengths".into(),
            );
        }
        if !matches!(self.act_fn.as_str(), "relu" | "silu") {
            return err(format!(
                "act_fn `{}` is not supported (relu or silu)",
                self.act_fn
            ));
        }
        if self.upsample_fn != "nearest" {
            return err(format!(
                "upsample_fn `{}` is not supported (nearest)",
                self.upsample_fn
            ));
        }
        if self.upsampling_scaling_factor == 0 {
            return err("upsampling_scaling_factor must be positive".into());
        }
        if self.downscale() > MAX_VAE_DOWNSCALE {
            return err(format!(
                "upsampling_scaling_factor {} over {} decoder levels downscales {}×; at most {MAX_VAE_DOWNSCALE}× is supported",
                self.upsampling_scaling_factor,
                self.num_decoder_blocks.len(),
                self.downscale()
            ));
        }
        if !self.scaling_factor.is_finite()
            || self.scaling_factor == 0.0
            || !self.shift_factor.is_finite()
        {
            return err(format!(
                "scaling_factor ({}) must be finite and non-zero, shift_factor ({}) finite",
                self.scaling_factor, self.shift_factor
            ));
        }
        match (&self.latents_mean, &self.latents_std) {
            (None, None) => {}
            (Some(mean), Some(std)) => {
                let c = self.latent_channels;
                if mean.len() != c || std.len() != c {
                    return err(format!(
                        "latents_mean and latents_std need {c} entries (one per latent channel), got {} and {}",
                        mean.len(),
                        std.len()
                    ));
                }
                if !mean.iter().all(|m| m.is_finite())
                    || !std.iter().all(|s| s.is_finite() && *s > 0.0)
                {
                    return err(
                        "latents_mean must be finite and latents_std finite and above 0".into(),
                    );
                }
            }
            _ => return err("latents_mean and latents_std come together".into()),
        }
        Ok(())
    }
}
