//! The single-stream DiT (diffusers `Krea2Transformer2DModel`, Krea 2's block design).
//!
//! Sequence `[text; image]` with full self-attention. The timestep enters once: a sinusoidal
//! embedding (`t·1000`, cos half then sin half) → MLP → `temb` `[B, 1, D]`, and a shared
//! projection `time_mod_proj(gelu_tanh(temb))` `[B, 1, 6D]` to which each block adds its own
//! learned `[6, D]` table (pre/post scale, shift, gate). Blocks: RMSNorm(1+scale) → modulate
//! → gated GQA attention with QK-norm and 3-axis RoPE → gated residual; the same around a
//! SwiGLU. The final layer modulates with `temb` + a learned `[2, D]` table.
//! Latents enter `p × p`-patchified (Krea 2's `_pack_latents`: `p = 2`; [`Krea2Config::patch_size`]):
//! [`patchify`] / [`unpatchify`].

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Bool, DType, Device, Tensor, TensorData};

use crate::precision::{to_compute, to_f32};

use super::config::Krea2Config;
use super::layers::{Attention, KeyMask, Krea2RmsNorm, SwiGlu};
use super::params::{LoadError, ParamSource, linear};
use super::rope::RopeTable;
use super::text_fusion::{TextFusion, TextProjection};
use super::{GeneratorError, check_shape};

/// Sinusoidal flow-time embedding + two-layer MLP (`Krea2TimestepEmbedding`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// `embed_dim → D`, with bias.
    pub linear_1: Linear,
    /// `D → D`, with bias.
    pub linear_2: Linear,
    /// Frequencies `exp(−ln(10⁴)·j/half)`, `[half]`.
    pub freqs: Tensor<1>,
}

impl TimestepEmbedding {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        embed_dim: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let half = embed_dim / 2;
        // Same f32 arithmetic order as diffusers.
        let freqs: Vec<f32> = (0..half)
            .map(|j| ((-(1e4f64.ln()) as f32) * j as f32 / half as f32).exp())
            .collect();
        Ok(Self {
            linear_1: linear(
                src,
                &format!("{name}.linear_1"),
                embed_dim,
                hidden,
                true,
                device,
            )?,
            linear_2: linear(
                src,
                &format!("{name}.linear_2"),
                hidden,
                hidden,
                true,
                device,
            )?,
            // f32 whatever the precision: `1000·t·f` needs more than f16's 11 bits.
            freqs: Tensor::from_data(TensorData::new(freqs, [half]), (device, DType::F32)),
        })
    }

    /// `t` `[B]` in `[0, 1]` → `[B, 1, D]` (sinusoids in f32, the MLP in the compute dtype).
    pub fn forward(&self, t: Tensor<1>) -> Tensor<3> {
        let [batch] = t.dims();
        let [half] = self.freqs.dims();
        let args = (to_f32(t) * 1000.0).reshape([batch, 1, 1])
            * to_f32(self.freqs.clone()).reshape([1, 1, half]);
        let emb = to_compute(Tensor::cat(vec![args.clone().cos(), args.sin()], 2));
        self.linear_2
            .forward(gelu_approximate(self.linear_1.forward(emb)))
    }
}

/// One DiT block (`Krea2TransformerBlock`).
#[derive(Module, Debug)]
pub struct TransformerBlock {
    /// Learned additive modulation table `[6, D]`.
    pub scale_shift_table: Param<Tensor<2>>,
    /// Norm before attention.
    pub norm1: Krea2RmsNorm,
    /// Norm before the MLP.
    pub norm2: Krea2RmsNorm,
    /// Gated GQA attention with RoPE.
    pub attn: Attention,
    /// SwiGLU MLP.
    pub ff: SwiGlu,
}

impl TransformerBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        config: &Krea2Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let d = config.hidden_size();
        let eps = config.norm_eps;
        Ok(Self {
            scale_shift_table: Param::from_tensor(src.tensor(
                &format!("{name}.scale_shift_table"),
                [6, d],
                device,
            )?),
            norm1: Krea2RmsNorm::load(src, &format!("{name}.norm1"), d, eps, device)?,
            norm2: Krea2RmsNorm::load(src, &format!("{name}.norm2"), d, eps, device)?,
            attn: Attention::load(
                src,
                &format!("{name}.attn"),
                d,
                config.num_attention_heads,
                config.num_key_value_heads,
                eps,
                device,
            )?,
            ff: SwiGlu::load(
                src,
                &format!("{name}.ff"),
                d,
                config.intermediate_size,
                device,
            )?,
        })
    }

    /// `x` `[B, S, D]`, `temb_mod` `[B, 1, 6D]` → `[B, S, D]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        temb_mod: Tensor<3>,
        rope: &RopeTable,
        mask: Option<&KeyMask>,
    ) -> Tensor<3> {
        let [batch, _, d] = x.dims();
        let m = temb_mod.reshape([batch, 6, d]) + self.scale_shift_table.val().unsqueeze::<3>();
        let row = |i: usize| m.clone().narrow(1, i, 1);
        let (prescale, preshift, pregate) = (row(0), row(1), row(2));
        let (postscale, postshift, postgate) = (row(3), row(4), row(5));

        let h = (prescale + 1.0) * self.norm1.forward(x.clone()) + preshift;
        let x = x + pregate * self.attn.forward(h, Some(rope), mask);
        let h = (postscale + 1.0) * self.norm2.forward(x.clone()) + postshift;
        x + postgate * self.ff.forward(h)
    }
}

/// Final adaptive RMSNorm + projection (`Krea2FinalLayer`).
#[derive(Module, Debug)]
pub struct FinalLayer {
    /// Learned additive table `[2, D]` (scale, shift).
    pub scale_shift_table: Param<Tensor<2>>,
    /// Norm.
    pub norm: Krea2RmsNorm,
    /// `D → out_channels`, with bias.
    pub linear: Linear,
}

impl FinalLayer {
    /// `x` `[B, N, D]`, `temb` `[B, 1, D]` → `[B, N, out]`.
    pub fn forward(&self, x: Tensor<3>, temb: Tensor<3>) -> Tensor<3> {
        let m = temb + self.scale_shift_table.val().unsqueeze::<3>();
        let scale = m.clone().narrow(1, 0, 1);
        let shift = m.narrow(1, 1, 1);
        self.linear
            .forward((scale + 1.0) * self.norm.forward(x) + shift)
    }
}

/// Text features after fusion and `txt_in`, ready for any number of denoising steps (they do
/// not depend on the timestep, so a sampler computes them once per prompt).
#[derive(Clone, Debug)]
pub struct TextCondition {
    /// `[B, L, D]`.
    pub tokens: Tensor<3>,
    /// `[B, L]`, `true` = real token; `None` = all real.
    pub mask: Option<Tensor<2, Bool>>,
}

/// `Krea2Transformer2DModel`: text fusion + single-stream DiT.
#[derive(Module, Debug)]
pub struct Krea2Transformer {
    /// `in_channels → D`, with bias.
    pub img_in: Linear,
    /// Timestep embedding.
    pub time_embed: TimestepEmbedding,
    /// Shared `D → 6D` modulation projection.
    pub time_mod_proj: Linear,
    /// LAP + refiner.
    pub text_fusion: TextFusion,
    /// Text projection to the DiT width.
    pub txt_in: TextProjection,
    /// DiT blocks.
    pub transformer_blocks: Vec<TransformerBlock>,
    /// Final layer.
    pub final_layer: FinalLayer,
    /// Stacked tapped layers expected per token.
    pub num_text_layers: usize,
    /// Width of the tapped states.
    pub text_hidden_dim: usize,
    /// Latent channels per token.
    pub in_channels: usize,
    /// Latent cells per token along each axis ([`Krea2Config::patch_size`]).
    pub patch_size: usize,
    /// RoPE head-dim split over (t, h, w).
    pub rope_axes: [usize; 3],
    /// RoPE base.
    pub rope_theta: f64,
    /// Add the fixed absolute position embedding to the image tokens
    /// ([`Krea2Config::abs_pos_embed`]).
    pub abs_pos_embed: bool,
}

impl Krea2Transformer {
    /// Builds the model from `src` with diffusers' parameter names (no prefix).
    pub fn load(
        config: &Krea2Config,
        src: &mut impl ParamSource,
        device: &Device,
    ) -> Result<Self, GeneratorError> {
        config.validate()?;
        let d = config.hidden_size();
        let c = config.in_channels;
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                TransformerBlock::load(src, &format!("transformer_blocks.{i}"), config, device)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            img_in: linear(src, "img_in", c, d, true, device)?,
            time_embed: TimestepEmbedding::load(
                src,
                "time_embed",
                config.timestep_embed_dim,
                d,
                device,
            )?,
            time_mod_proj: linear(src, "time_mod_proj", d, 6 * d, true, device)?,
            text_fusion: TextFusion::load(src, "text_fusion", config, device)?,
            txt_in: TextProjection::load(src, "txt_in", config, device)?,
            transformer_blocks,
            final_layer: FinalLayer {
                scale_shift_table: Param::from_tensor(src.tensor(
                    "final_layer.scale_shift_table",
                    [2, d],
                    device,
                )?),
                norm: Krea2RmsNorm::load(src, "final_layer.norm", d, config.norm_eps, device)?,
                linear: linear(src, "final_layer.linear", d, c, true, device)?,
            },
            num_text_layers: config.num_text_layers,
            text_hidden_dim: config.text_hidden_dim,
            in_channels: c,
            patch_size: config.patch_size,
            rope_axes: config.axes_dims_rope,
            rope_theta: config.rope_theta,
            abs_pos_embed: config.abs_pos_embed,
        })
    }

    /// Text fusion + `txt_in`: `encoder_hidden_states` `[B, L, n_layers, text_dim]`,
    /// `encoder_attention_mask` `[B, L]` (`true` = real token).
    pub fn encode_text(
        &self,
        encoder_hidden_states: Tensor<4>,
        encoder_attention_mask: Option<Tensor<2, Bool>>,
    ) -> Result<TextCondition, GeneratorError> {
        let dims = encoder_hidden_states.dims();
        check_shape(
            "encoder_hidden_states",
            &dims,
            &[
                None,
                None,
                Some(self.num_text_layers),
                Some(self.text_hidden_dim),
            ],
        )?;
        if let Some(mask) = &encoder_attention_mask {
            check_shape(
                "encoder_attention_mask",
                &mask.dims(),
                &[Some(dims[0]), Some(dims[1])],
            )?;
        }
        let key_mask = encoder_attention_mask.clone().map(KeyMask::from_valid);
        let fused = self
            .text_fusion
            .forward(encoder_hidden_states, key_mask.as_ref());
        Ok(TextCondition {
            tokens: self.txt_in.forward(fused),
            mask: encoder_attention_mask,
        })
    }

    /// The velocity for the image tokens: `hidden_states` `[B, N, in_channels]`, `timestep`
    /// `[B]` in `[0, 1]`, `rope` over the `L + N` rows of `[text; image]` → `[B, N, in_channels]`.
    ///
    /// The velocity comes back in `hidden_states`' dtype (f32 latents stay f32 under an f16
    /// device: only the inside of the DiT computes in f16; see [`crate::precision`]).
    pub fn forward_with_text(
        &self,
        hidden_states: Tensor<3>,
        text: &TextCondition,
        timestep: Tensor<1>,
        rope: &RopeTable,
    ) -> Result<Tensor<3>, GeneratorError> {
        let [batch, n_image, _] = hidden_states.dims();
        check_shape(
            "hidden_states",
            &hidden_states.dims(),
            &[None, None, Some(self.in_channels)],
        )?;
        let [tb, n_text, _] = text.tokens.dims();
        if tb != batch {
            return Err(GeneratorError::Shape {
                name: "encoder_hidden_states",
                got: text.tokens.dims().to_vec(),
                expected: format!("batch {batch}, like hidden_states"),
            });
        }
        check_shape("timestep", &timestep.dims(), &[Some(batch)])?;
        if rope.layouts() != 1 && rope.layouts() != batch {
            return Err(GeneratorError::Shape {
                name: "position_ids",
                got: vec![rope.layouts(), rope.len(), 3],
                expected: format!("one layout or {batch} (one per sample)"),
            });
        }
        if rope.len() != n_text + n_image {
            return Err(GeneratorError::Shape {
                name: "position_ids",
                got: vec![rope.len(), 3],
                expected: format!(
                    "[{}, 3] (text {n_text} + image {n_image} rows)",
                    n_text + n_image
                ),
            });
        }

        let temb = self.time_embed.forward(timestep);
        let temb_mod = self.time_mod_proj.forward(gelu_approximate(temb.clone()));
        let mask = text.mask.clone().map(|m| {
            let image = Tensor::<2, Bool>::full([batch, n_image], true, &m.device());
            KeyMask::from_valid(Tensor::cat(vec![m, image], 1))
        });

        let latent_dtype = hidden_states.dtype();
        let mut image = self.img_in.forward(to_compute(hidden_states));
        if self.abs_pos_embed {
            let d = image.dims()[2];
            let table = rope.absolute_embedding(n_image, d, &image.device());
            image = image + to_compute(table);
        }
        let mut h = Tensor::cat(vec![text.tokens.clone(), image], 1);
        for block in &self.transformer_blocks {
            h = block.forward(h, temb_mod.clone(), rope, mask.as_ref());
        }
        let d = h.dims()[2];
        let h = h.slice([0..batch, n_text..n_text + n_image, 0..d]);
        Ok(self.final_layer.forward(h, temb).cast(latent_dtype))
    }

    /// [`Self::encode_text`] then [`Self::forward_with_text`] (diffusers' `forward`).
    pub fn forward(
        &self,
        hidden_states: Tensor<3>,
        encoder_hidden_states: Tensor<4>,
        timestep: Tensor<1>,
        rope: &RopeTable,
        encoder_attention_mask: Option<Tensor<2, Bool>>,
    ) -> Result<Tensor<3>, GeneratorError> {
        let text = self.encode_text(encoder_hidden_states, encoder_attention_mask)?;
        self.forward_with_text(hidden_states, &text, timestep, rope)
    }
}

/// `[B, C, H, W]` → `[B, (H/p)·(W/p), C·p²]` for `p × p` patches, channel order `(c, ph, pw)`,
/// tokens row-major (diffusers' `_pack_latents` for `p = 2`).
pub fn patchify(latents: Tensor<4>, p: usize) -> Result<Tensor<3>, GeneratorError> {
    let [b, c, h, w] = latents.dims();
    if p == 0 || h % p != 0 || w % p != 0 {
        return Err(GeneratorError::Shape {
            name: "latents",
            got: vec![b, c, h, w],
            expected: format!("height and width divisible by the patch size {p}"),
        });
    }
    Ok(latents
        .reshape([b, c, h / p, p, w / p, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / p) * (w / p), c * p * p]))
}

/// Inverse of [`patchify`]: `[B, grid_h·grid_w, C·p²]` → `[B, C, p·grid_h, p·grid_w]`.
pub fn unpatchify(
    tokens: Tensor<3>,
    grid_h: usize,
    grid_w: usize,
    p: usize,
) -> Result<Tensor<4>, GeneratorError> {
    let [b, n, cp] = tokens.dims();
    if p == 0 || n != grid_h * grid_w || cp % (p * p) != 0 {
        return Err(GeneratorError::Shape {
            name: "tokens",
            got: vec![b, n, cp],
            expected: format!("[_, {}, {}·C]", grid_h * grid_w, p * p),
        });
    }
    let c = cp / (p * p);
    Ok(tokens
        .reshape([b, grid_h, grid_w, c, p, p])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, c, grid_h * p, grid_w * p]))
}
