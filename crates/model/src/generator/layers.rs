//! Krea 2's building blocks (diffusers `transformer_krea2.py`): RMSNorm with a zero-centred
//! scale (`x̂ · (1 + w)`, eps 1e-5), self-attention with GQA, per-head QK RMSNorm, RoPE and a
//! sigmoid output gate (`to_out(attn · σ(to_gate(x)))`), and a SwiGLU MLP. No biases.

use crate::attention::blocked_attention;
use crate::linear::LinearW;
use crate::precision::{f32_param, norm_in_f32};
use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor};

use super::params::{LoadError, ParamSource, linear_w};
use super::rope::RopeTable;

/// RMSNorm over the last axis with multiplier `1 + weight` (Krea 2's checkpoint format).
#[derive(Module, Debug)]
pub struct Krea2RmsNorm {
    /// Offset from one, `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Epsilon inside the root.
    pub eps: f64,
}

impl Krea2RmsNorm {
    /// Loads `{name}.weight`.
    pub fn load(
        src: &mut impl ParamSource,
        name: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            weight: Param::from_tensor(f32_param(src.tensor(
                &format!("{name}.weight"),
                [dim],
                device,
            )?)),
            eps,
        })
    }

    /// `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        norm_in_f32(x, |x| {
            unifusion_kernels::rms_norm(x, self.weight.val() + 1.0, self.eps as f32)
        })
    }
}

/// Which keys each query may attend to: `[batch, 1, 1, keys]`, `true` = masked (burn's sense).
/// Built from a key-padding mask so that a row with no valid key at all attends to every key
/// instead (its output is padding nobody reads): fully masked rows never turn into NaN.
#[derive(Clone, Debug)]
pub struct KeyMask {
    masked: Tensor<4, Bool>,
}

impl KeyMask {
    /// From `valid` `[batch, keys]` (`true` = real token).
    pub fn from_valid(valid: Tensor<2, Bool>) -> Self {
        let [batch, keys] = valid.dims();
        let any_valid = valid.clone().any_dim(1).expand([batch, keys]);
        let masked = valid.bool_not().bool_and(any_valid);
        Self {
            masked: masked.reshape([batch, 1, 1, keys]),
        }
    }

    fn expand(&self, heads: usize, queries: usize) -> Tensor<4, Bool> {
        let [batch, _, _, keys] = self.masked.dims();
        self.masked.clone().expand([batch, heads, queries, keys])
    }
}

/// Gated self-attention with GQA and per-head QK-norm (`Krea2Attention`).
#[derive(Module, Debug)]
pub struct Attention {
    /// `to_q`: `dim → heads · head_dim`.
    pub to_q: LinearW,
    /// `to_k`: `dim → kv_heads · head_dim`.
    pub to_k: LinearW,
    /// `to_v`: `dim → kv_heads · head_dim`.
    pub to_v: LinearW,
    /// `to_gate`: `dim → dim`, sigmoid gate on the attention output.
    pub to_gate: LinearW,
    /// Per-head RMSNorm of the queries.
    pub norm_q: Krea2RmsNorm,
    /// Per-head RMSNorm of the keys.
    pub norm_k: Krea2RmsNorm,
    /// `to_out.0`: `dim → dim`.
    pub to_out: LinearW,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

impl Attention {
    /// Loads `{name}.to_q`, `to_k`, `to_v`, `to_gate`, `norm_q`, `norm_k`, `to_out.0`.
    pub fn load(
        src: &mut impl ParamSource,
        name: &str,
        dim: usize,
        heads: usize,
        kv_heads: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, LoadError> {
        let head_dim = dim / heads;
        Ok(Self {
            to_q: linear_w(
                src,
                &format!("{name}.to_q"),
                dim,
                heads * head_dim,
                false,
                device,
            )?,
            to_k: linear_w(
                src,
                &format!("{name}.to_k"),
                dim,
                kv_heads * head_dim,
                false,
                device,
            )?,
            to_v: linear_w(
                src,
                &format!("{name}.to_v"),
                dim,
                kv_heads * head_dim,
                false,
                device,
            )?,
            to_gate: linear_w(src, &format!("{name}.to_gate"), dim, dim, false, device)?,
            norm_q: Krea2RmsNorm::load(src, &format!("{name}.norm_q"), head_dim, eps, device)?,
            norm_k: Krea2RmsNorm::load(src, &format!("{name}.norm_k"), head_dim, eps, device)?,
            to_out: linear_w(src, &format!("{name}.to_out.0"), dim, dim, false, device)?,
            heads,
            kv_heads,
        })
    }

    /// `x` `[batch, seq, dim]` → `[batch, seq, dim]`. `rope` covers `seq` rows; `mask` masks keys.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: Option<&RopeTable>,
        mask: Option<&KeyMask>,
    ) -> Tensor<3> {
        let [batch, seq, dim] = x.dims();
        let head_dim = dim / self.heads;
        let q = self
            .to_q
            .forward(x.clone())
            .reshape([batch, seq, self.heads, head_dim]);
        let k = self
            .to_k
            .forward(x.clone())
            .reshape([batch, seq, self.kv_heads, head_dim]);
        let v = self
            .to_v
            .forward(x.clone())
            .reshape([batch, seq, self.kv_heads, head_dim]);
        let gate = self.to_gate.forward(x);

        let mut q = self.norm_q.forward(q);
        let mut k = self.norm_k.forward(k);
        if let Some(rope) = rope {
            q = rope.apply(q);
            k = rope.apply(k);
        }
        let q = q.swap_dims(1, 2);
        let k = repeat_kv(k.swap_dims(1, 2), self.heads);
        let v = repeat_kv(v.swap_dims(1, 2), self.heads);
        let mask = mask.map(|m| m.expand(self.heads, seq));
        let out = blocked_attention(q, k, v, mask, AttentionModuleOptions::default());
        let out = out.swap_dims(1, 2).reshape([batch, seq, dim]);
        self.to_out.forward(out * sigmoid(gate))
    }
}

/// `[batch, kv_heads, seq, d]` → `[batch, heads, seq, d]`; query head `i` reads kv head
/// `i / (heads / kv_heads)` (PyTorch SDPA's `enable_gqa`).
fn repeat_kv(x: Tensor<4>, heads: usize) -> Tensor<4> {
    let [batch, kv_heads, seq, d] = x.dims();
    if kv_heads == heads {
        return x;
    }
    let groups = heads / kv_heads;
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, seq, d])
        .reshape([batch, heads, seq, d])
}

/// SwiGLU: `down(silu(gate(x)) · up(x))` (`Krea2SwiGLU`).
#[derive(Module, Debug)]
pub struct SwiGlu {
    /// `gate`: `dim → hidden`.
    pub gate: LinearW,
    /// `up`: `dim → hidden`.
    pub up: LinearW,
    /// `down`: `hidden → dim`.
    pub down: LinearW,
}

impl SwiGlu {
    /// Loads `{name}.gate`, `{name}.up`, `{name}.down`.
    pub fn load(
        src: &mut impl ParamSource,
        name: &str,
        dim: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            gate: linear_w(src, &format!("{name}.gate"), dim, hidden, false, device)?,
            up: linear_w(src, &format!("{name}.up"), dim, hidden, false, device)?,
            down: linear_w(src, &format!("{name}.down"), hidden, dim, false, device)?,
        })
    }

    /// `[..., dim]` → `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.down
            .forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}
