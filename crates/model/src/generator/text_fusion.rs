//! Text fusion: Layerwise Attention Pooling (LAP) + refiner, then the projection to the DiT
//! width (diffusers `Krea2TextFusion` and `Krea2TextProjection`).
//!
//! `[B, L, n, Dt]` tapped VLM states → layer-wise blocks attend across the `n` axis for each
//! token (no mask, no positions) → `projector` `Linear(n → 1, no bias)` pools the layers →
//! refiner blocks attend across tokens (key-padding mask, no positions) → `txt_in`
//! (RMSNorm → Linear → GELU(tanh) → Linear) → `[B, L, D]`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Device, Tensor, TensorData};

use super::config::Krea2Config;
use super::layers::{Attention, KeyMask, Krea2RmsNorm, SwiGlu};
use super::params::{LoadError, ParamSource, linear};

/// Pre-norm transformer block without RoPE or modulation (`Krea2TextFusionBlock`).
#[derive(Module, Debug)]
pub struct TextFusionBlock {
    /// Norm before attention.
    pub norm1: Krea2RmsNorm,
    /// Norm before the MLP.
    pub norm2: Krea2RmsNorm,
    /// Self-attention.
    pub attn: Attention,
    /// SwiGLU MLP.
    pub ff: SwiGlu,
}

impl TextFusionBlock {
    fn load(
        src: &mut impl ParamSource,
        name: &str,
        config: &Krea2Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let dim = config.text_hidden_dim;
        let eps = config.norm_eps;
        Ok(Self {
            norm1: Krea2RmsNorm::load(src, &format!("{name}.norm1"), dim, eps, device)?,
            norm2: Krea2RmsNorm::load(src, &format!("{name}.norm2"), dim, eps, device)?,
            attn: Attention::load(
                src,
                &format!("{name}.attn"),
                dim,
                config.text_num_attention_heads,
                config.text_num_key_value_heads,
                eps,
                device,
            )?,
            ff: SwiGlu::load(
                src,
                &format!("{name}.ff"),
                dim,
                config.text_intermediate_size,
                device,
            )?,
        })
    }

    /// `[batch, seq, dim]` → `[batch, seq, dim]`.
    pub fn forward(&self, x: Tensor<3>, mask: Option<&KeyMask>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), None, mask);
        x.clone() + self.ff.forward(self.norm2.forward(x))
    }
}

/// LAP + refiner (`Krea2TextFusion`).
#[derive(Module, Debug)]
pub struct TextFusion {
    /// Blocks over the tapped-layer axis, per token.
    pub layerwise_blocks: Vec<TextFusionBlock>,
    /// `Linear(n_layers → 1)`, no bias: the pooling weights per layer.
    pub projector: Linear,
    /// Bidirectional blocks over tokens.
    pub refiner_blocks: Vec<TextFusionBlock>,
}

impl TextFusion {
    /// Loads `{name}.layerwise_blocks.N`, `{name}.projector`, `{name}.refiner_blocks.N`.
    pub fn load(
        src: &mut impl ParamSource,
        name: &str,
        config: &Krea2Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let layerwise_blocks = (0..config.num_layerwise_text_blocks)
            .map(|i| {
                TextFusionBlock::load(src, &format!("{name}.layerwise_blocks.{i}"), config, device)
            })
            .collect::<Result<_, _>>()?;
        let projector = linear(
            src,
            &format!("{name}.projector"),
            config.num_text_layers,
            1,
            false,
            device,
        )?;
        let refiner_blocks = (0..config.num_refiner_text_blocks)
            .map(|i| {
                TextFusionBlock::load(src, &format!("{name}.refiner_blocks.{i}"), config, device)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            layerwise_blocks,
            projector,
            refiner_blocks,
        })
    }

    /// `[B, L, n, Dt]` (+ key mask over the `L` tokens) → `[B, L, Dt]`.
    pub fn forward(&self, x: Tensor<4>, mask: Option<&KeyMask>) -> Tensor<3> {
        let [batch, seq, layers, dim] = x.dims();
        let mut h = x.reshape([batch * seq, layers, dim]);
        for block in &self.layerwise_blocks {
            h = block.forward(h, None);
        }
        // Pool the layer axis: [B, L, Dt, n] · [n, 1] → [B, L, Dt].
        let h = h.reshape([batch, seq, layers, dim]).swap_dims(2, 3);
        let mut h = self.projector.forward(h).reshape([batch, seq, dim]);
        for block in &self.refiner_blocks {
            h = block.forward(h, mask);
        }
        h
    }

    /// The LAP pooling weight of each tapped layer, `[n]` (for inspection and layer dropout).
    pub fn pooling_weights(&self) -> Tensor<1> {
        let [n, _] = self.projector.weight.dims();
        self.projector.weight.val().reshape([n])
    }

    /// The paper's layer-dropout probe: zero the pooling weights of the tapped layers in
    /// `layers` (indices into the `n` taps; out-of-range indices are ignored).
    pub fn drop_layers(mut self, layers: &[usize]) -> Self {
        let weight = self.projector.weight.val();
        let [n, _] = weight.dims();
        let keep: Vec<f32> = (0..n)
            .map(|i| if layers.contains(&i) { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::<2>::from_data(TensorData::new(keep, [n, 1]), &weight.device());
        self.projector.weight = Param::from_tensor(weight * keep);
        self
    }
}

/// `txt_in`: RMSNorm → Linear → GELU(tanh) → Linear (`Krea2TextProjection`).
#[derive(Module, Debug)]
pub struct TextProjection {
    /// Norm over the text width.
    pub norm: Krea2RmsNorm,
    /// `text_dim → D`.
    pub linear_1: Linear,
    /// `D → D`.
    pub linear_2: Linear,
}

impl TextProjection {
    /// Loads `{name}.norm`, `{name}.linear_1`, `{name}.linear_2`.
    pub fn load(
        src: &mut impl ParamSource,
        name: &str,
        config: &Krea2Config,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let (dt, d) = (config.text_hidden_dim, config.hidden_size());
        Ok(Self {
            norm: Krea2RmsNorm::load(src, &format!("{name}.norm"), dt, config.norm_eps, device)?,
            linear_1: linear(src, &format!("{name}.linear_1"), dt, d, true, device)?,
            linear_2: linear(src, &format!("{name}.linear_2"), d, d, true, device)?,
        })
    }

    /// `[B, L, Dt]` → `[B, L, D]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.linear_1.forward(self.norm.forward(x));
        self.linear_2.forward(gelu_approximate(h))
    }
}
