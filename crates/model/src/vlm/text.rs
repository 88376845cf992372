//! Qwen2 / Qwen2.5 decoder: the VLM's language model.
//!
//! Pre-norm RMSNorm blocks, rotate-half RoPE (θ from config), grouped-query attention with
//! q/k/v bias and no o_proj bias, SwiGLU MLP, final RMSNorm, tied or untied `lm_head`.
//! Mirrors transformers v5.24 `models/qwen2/modeling_qwen2.py`.
//!
//! Hidden-state taps use transformers' numbering: 0 = embeddings, i = output of decoder layer
//! i−1, `num_layers` = after the final norm. Only the requested taps are kept.

use crate::attention::blocked_attention;
use crate::linear::LinearW;
use crate::precision::{f32_param, norm_in_f32};
use burn::module::{Module, Param};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData, activation};

use super::VlmError;
use super::config::TextConfig;
use super::weights::Weights;

/// RMSNorm `x / sqrt(mean(x²) + eps) · weight` (fused WGSL kernel on wgpu).
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[hidden]`
    pub weight: Param<Tensor<1>>,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    fn load(
        w: &mut Weights,
        name: &str,
        dim: usize,
        eps: f64,
        device: &Device,
    ) -> Result<Self, VlmError> {
        Ok(Self {
            weight: Param::from_tensor(f32_param(w.take(
                &format!("{name}.weight"),
                [dim],
                device,
            )?)),
            eps,
        })
    }
    /// `[..., hidden]` → same shape (statistics in f32 whatever the precision).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        norm_in_f32(x, |x| {
            unifusion_kernels::rms_norm(x, self.weight.val(), self.eps as f32)
        })
    }
}

/// Self-attention with GQA and rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Qwen2Attention {
    pub q_proj: LinearW,
    pub k_proj: LinearW,
    pub v_proj: LinearW,
    pub o_proj: LinearW,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// SwiGLU: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Qwen2Mlp {
    pub gate_proj: LinearW,
    pub up_proj: LinearW,
    pub down_proj: LinearW,
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Qwen2DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Qwen2Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Qwen2Mlp,
}

/// The largest tensor kept in one piece, in bytes of f32: WebGPU's default
/// `maxStorageBufferBindingSize` (128 MiB). A real VLM's embedding and `lm_head` exceed it
/// (Qwen2.5-0.5B: 151 674 × 896 × 4 B = 543 MB), so they are kept in vocabulary blocks.
pub const MAX_BINDING_BYTES: usize = 128 << 20;

/// A `[vocab, hidden]` matrix in vocabulary blocks of at most `block_rows` rows each, so no
/// single buffer passes the device's binding limit.
#[derive(Module, Debug)]
pub struct VocabBlocks {
    /// Row blocks, `[≤ block_rows, hidden]` each, in vocabulary order.
    pub blocks: Vec<Param<Tensor<2>>>,
    /// Rows per block (the last may have fewer).
    pub block_rows: usize,
}

impl VocabBlocks {
    /// Splits `matrix` `[vocab, hidden]` into blocks of at most `max_bytes` (as f32).
    pub fn split(matrix: Tensor<2>, max_bytes: usize) -> Self {
        let [vocab, hidden] = matrix.dims();
        let block_rows = super::weights::block_rows(vocab, hidden, max_bytes);
        let blocks = (0..vocab.div_ceil(block_rows))
            .map(|b| {
                let start = b * block_rows;
                let rows = block_rows.min(vocab - start);
                Param::from_tensor(matrix.clone().narrow(0, start, rows))
            })
            .collect();
        Self { blocks, block_rows }
    }

    /// Blocks already split (all but the last of equal rows, as [`VocabBlocks::split`] and
    /// `Weights::take_row_blocks` make them).
    pub fn from_blocks(blocks: Vec<Tensor<2>>) -> Self {
        let block_rows = blocks.first().map_or(1, |b| b.dims()[0].max(1));
        Self {
            blocks: blocks.into_iter().map(Param::from_tensor).collect(),
            block_rows,
        }
    }

    /// The whole matrix's `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        let vocab = self.blocks.iter().map(|b| b.dims()[0]).sum();
        let hidden = self.blocks.first().map_or(0, |b| b.dims()[1]);
        [vocab, hidden]
    }

    /// The device the blocks live on.
    pub fn device(&self) -> Device {
        self.blocks
            .first()
            .map_or_else(Device::default, |b| b.device())
    }

    /// Rows `ids` (each `< vocab`, checked by the caller) → `[ids.len(), hidden]`.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        let index = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        if let [only] = self.blocks.as_slice() {
            return only
                .val()
                .select(0, index(ids.iter().map(|&i| i64::from(i)).collect()));
        }
        // Gather each block's rows, then put them back in the order asked for.
        let mut parts = Vec::new();
        let mut order = Vec::with_capacity(ids.len());
        for (b, block) in self.blocks.iter().enumerate() {
            let (positions, local): (Vec<usize>, Vec<i64>) = ids
                .iter()
                .enumerate()
                .filter(|&(_, &id)| id as usize / self.block_rows == b)
                .map(|(pos, &id)| (pos, (id as usize % self.block_rows) as i64))
                .unzip();
            if !local.is_empty() {
                parts.push(block.val().select(0, index(local)));
                order.extend(positions);
            }
        }
        let mut inverse = vec![0i64; order.len()];
        for (k, &pos) in order.iter().enumerate() {
            inverse[pos] = k as i64;
        }
        Tensor::cat(parts, 0).select(0, index(inverse))
    }

    /// `x · Wᵀ`: `[batch, seq, hidden]` → `[batch, seq, vocab]`, one matmul per block.
    pub fn project(&self, x: Tensor<3>) -> Tensor<3> {
        let parts: Vec<Tensor<3>> = self
            .blocks
            .iter()
            .map(|b| burn::tensor::module::linear(x.clone(), b.val().transpose(), None))
            .collect();
        Tensor::cat(parts, 2)
    }
}

/// The Qwen2 language model with its head.
#[derive(Module, Debug)]
pub struct Qwen2Model {
    /// `[vocab, hidden]`, in blocks under the binding limit.
    pub embed_tokens: VocabBlocks,
    pub layers: Vec<Qwen2DecoderLayer>,
    pub norm: RmsNorm,
    /// `[vocab, hidden]` (tied: a copy of the embedding), in blocks under the binding limit.
    pub lm_head: VocabBlocks,
    /// RoPE base.
    pub theta: f64,
}

/// Keys and values of every layer for the positions seen so far.
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A one-row cache repeated over `batch` rows: a prefix every row shares (the system
    /// prompt, in training) is run once and the rows continue from it.
    pub fn expand_batch(self, batch: usize) -> Self {
        let layers = self
            .layers
            .into_iter()
            .map(|kv| {
                kv.map(|(k, v)| {
                    let [_, h, l, d] = k.dims();
                    (k.expand([batch, h, l, d]), v.expand([batch, h, l, d]))
                })
            })
            .collect();
        Self {
            layers,
            len: self.len,
        }
    }
}

/// What one pass of the decoder returns.
pub struct TextOutput {
    /// `(index, [batch, seq, hidden])` for each requested tap, in request order.
    pub taps: Vec<(usize, Tensor<3>)>,
    /// The final-norm output `[batch, seq, hidden]` (the input of `lm_head`).
    pub last: Tensor<3>,
}

impl Qwen2Model {
    /// Build from canonical `text.*` (and `lm_head.weight` unless tied) tensors.
    pub fn load(
        c: &TextConfig,
        tie: bool,
        w: &mut Weights,
        device: &Device,
    ) -> Result<Self, VlmError> {
        let h = c.hidden_size;
        let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        // Row blocks straight from the weights: a real embedding is larger than one buffer
        // may be on a browser adapter.
        let (shape, limit) = ([c.vocab_size, h], w.max_tensor_bytes());
        let embed = if tie {
            w.peek_row_blocks("text.embed_tokens.weight", shape, limit, device)?
        } else {
            w.take_row_blocks("text.embed_tokens.weight", shape, limit, device)?
        };
        let head_name = if tie {
            "text.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let lm_head = w.take_row_blocks(head_name, shape, limit, device)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("text.layers.{i}");
            let self_attn = Qwen2Attention {
                q_proj: w.linear(&format!("{p}.self_attn.q_proj"), h, nh * hd, true, device)?,
                k_proj: w.linear(&format!("{p}.self_attn.k_proj"), h, nkv * hd, true, device)?,
                v_proj: w.linear(&format!("{p}.self_attn.v_proj"), h, nkv * hd, true, device)?,
                o_proj: w.linear(&format!("{p}.self_attn.o_proj"), nh * hd, h, false, device)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
            };
            let ffn = c.intermediate_size;
            let mlp = Qwen2Mlp {
                gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), h, ffn, false, device)?,
                up_proj: w.linear(&format!("{p}.mlp.up_proj"), h, ffn, false, device)?,
                down_proj: w.linear(&format!("{p}.mlp.down_proj"), ffn, h, false, device)?,
            };
            layers.push(Qwen2DecoderLayer {
                input_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.input_layernorm"),
                    h,
                    c.rms_norm_eps,
                    device,
                )?,
                self_attn,
                post_attention_layernorm: RmsNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    c.rms_norm_eps,
                    device,
                )?,
                mlp,
            });
        }
        Ok(Self {
            embed_tokens: VocabBlocks::from_blocks(embed),
            layers,
            norm: RmsNorm::load(w, "text.norm", h, c.rms_norm_eps, device)?,
            lm_head: VocabBlocks::from_blocks(lm_head),
            theta: c.theta(),
        })
    }

    /// Token embeddings: `ids` row-major `[batch, seq]` → `[batch·seq, hidden]`.
    pub fn embed(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        self.embed_tokens.rows(ids, device)
    }

    /// Re-splits the embedding and `lm_head` into blocks of at most `max_bytes` (f32), e.g.
    /// for an adapter with a smaller binding limit than [`MAX_BINDING_BYTES`].
    pub fn reblock(&mut self, max_bytes: usize) {
        for m in [&mut self.embed_tokens, &mut self.lm_head] {
            let whole = Tensor::cat(m.blocks.iter().map(|b| b.val()).collect(), 0);
            *m = VocabBlocks::split(whole, max_bytes);
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }

    /// `[batch, seq, hidden]` final-norm states → `[batch, seq, vocab]` logits.
    pub fn logits(&self, last: Tensor<3>) -> Tensor<3> {
        self.lm_head.project(last)
    }

    /// Run the decoder on `embeds` `[batch, seq, hidden]` at positions `cache.len()..`.
    ///
    /// `key_valid`: per batch row, which of the `cache.len() + seq` key positions are real
    /// tokens (`None`: all). `taps`: transformers hidden-state indices to return.
    pub fn forward(
        &self,
        embeds: Tensor<3>,
        cache: &mut KvCache,
        key_valid: Option<&[Vec<bool>]>,
        taps: &[usize],
    ) -> Result<TextOutput, VlmError> {
        let n_layers = self.layers.len();
        if let Some(&bad) = taps.iter().find(|&&t| t > n_layers) {
            return Err(VlmError::Input(format!(
                "hidden-state tap {bad} is out of range 0..={n_layers}"
            )));
        }
        let [batch, seq, _] = embeds.dims();
        let device = embeds.device();
        let start = cache.len;
        let total = start + seq;
        let attn = &self.layers.first().map(|l| &l.self_attn);
        let head_dim = attn.map(|a| a.head_dim).unwrap_or(2);
        let num_heads = attn.map(|a| a.num_heads).unwrap_or(1);
        let (cos, sin) = rope_tables(self.theta, head_dim, start, seq, &device);
        let mask = match key_valid {
            None => None,
            Some(rows) => Some(causal_padding_mask(
                rows, batch, num_heads, start, seq, &device,
            )?),
        };

        let mut out: Vec<Option<Tensor<3>>> = vec![None; taps.len()];
        let mut record = |index: usize, x: &Tensor<3>| {
            for (slot, &t) in out.iter_mut().zip(taps) {
                if t == index {
                    *slot = Some(x.clone());
                }
            }
        };
        let mut x = embeds;
        record(0, &x);
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.layers[i].take();
            let (y, new_kv) = layer.forward(x, &cos, &sin, kv, mask.clone());
            cache.layers[i] = Some(new_kv);
            x = y;
            if i + 1 < n_layers {
                record(i + 1, &x);
            }
        }
        let last = self.norm.forward(x);
        record(n_layers, &last);
        cache.len = total;
        let taps = taps
            .iter()
            .zip(out)
            .map(|(&t, x)| (t, x.unwrap_or_else(|| last.clone())))
            .collect();
        Ok(TextOutput { taps, last })
    }
}

impl Qwen2DecoderLayer {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        kv: Option<(Tensor<4>, Tensor<4>)>,
        mask: Option<Tensor<4, Bool>>,
    ) -> (Tensor<3>, (Tensor<4>, Tensor<4>)) {
        let (a, kv) =
            self.self_attn
                .forward(self.input_layernorm.forward(x.clone()), cos, sin, kv, mask);
        let x = x + a;
        let h = self.post_attention_layernorm.forward(x.clone());
        let m = &self.mlp;
        let h = m
            .down_proj
            .forward(activation::silu(m.gate_proj.forward(h.clone())) * m.up_proj.forward(h));
        (x + h, kv)
    }
}

impl Qwen2Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        cos: &Tensor<4>,
        sin: &Tensor<4>,
        kv: Option<(Tensor<4>, Tensor<4>)>,
        mask: Option<Tensor<4, Bool>>,
    ) -> (Tensor<3>, (Tensor<4>, Tensor<4>)) {
        let [b, l, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, l, n, hd]).swap_dims(1, 2);
        let q = heads(self.q_proj.forward(x.clone()), nh);
        let k = heads(self.k_proj.forward(x.clone()), nkv);
        let v = heads(self.v_proj.forward(x), nkv);
        let q = rotate(q, cos, sin);
        let k = rotate(k, cos, sin);
        let (k, v) = match kv {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        let rep = nh / nkv;
        let expand = |t: Tensor<4>| {
            if rep == 1 {
                return t;
            }
            let [b, n, s, d] = t.dims();
            t.unsqueeze_dim::<5>(2)
                .expand([b, n, rep, s, d])
                .reshape([b, n * rep, s, d])
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: mask.is_none(),
        };
        let y = blocked_attention(q, expand(k.clone()), expand(v.clone()), mask, options);
        let y = y.swap_dims(1, 2).reshape([b, l, nh * hd]);
        (self.o_proj.forward(y), (k, v))
    }
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = cat(−x₂, x₁)` over the head axis.
fn rotate(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rot = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rot * sin.clone()
}

/// cos/sin `[1, 1, seq, head_dim]` for positions `start..start+seq` (transformers' default
/// RoPE: `inv_freq = θ^(−2i/d)`, `emb = cat(freqs, freqs)`).
fn rope_tables(
    theta: f64,
    head_dim: usize,
    start: usize,
    seq: usize,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for p in start..start + seq {
        for j in 0..head_dim {
            let a = p as f32 * inv[j % half];
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let t = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [1, 1, seq, head_dim]), device);
    (t(cos), t(sin))
}

/// `true` = masked: future keys and padding keys. `[batch, heads, seq, start + seq]`.
fn causal_padding_mask(
    rows: &[Vec<bool>],
    batch: usize,
    heads: usize,
    start: usize,
    seq: usize,
    device: &Device,
) -> Result<Tensor<4, Bool>, VlmError> {
    let total = start + seq;
    if rows.len() != batch || rows.iter().any(|r| r.len() != total) {
        return Err(VlmError::Input(format!(
            "attention_mask must be [{batch}, {total}] (batch, cached + new positions)"
        )));
    }
    let mut m = Vec::with_capacity(batch * heads * seq * total);
    for row in rows {
        for _ in 0..heads {
            for q in 0..seq {
                for (k, &valid) in row.iter().enumerate() {
                    m.push(!valid || k > start + q);
                }
            }
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(m, [batch, heads, seq, total]),
        device,
    ))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

    use super::VocabBlocks;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")
    }

    /// Blocks that split the vocabulary unevenly give exactly the rows and logits of the
    /// whole matrix, ids in any order and repeated, on Flex and wgpu.
    #[test]
    fn vocab_blocks_match_the_whole_matrix() {
        for device in [Device::flex(), Device::wgpu(DeviceKind::DefaultDevice)] {
            let (vocab, hidden) = (23, 5);
            let w: Vec<f32> = (0..vocab * hidden)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let matrix = Tensor::<2>::from_data(TensorData::new(w, [vocab, hidden]), &device);
            let whole = VocabBlocks::split(matrix.clone(), usize::MAX);
            assert_eq!(whole.blocks.len(), 1);
            // 7 rows of 5 f32 = 140 bytes a block: blocks of 7, 7, 7, 2 rows.
            let blocked = VocabBlocks::split(matrix, 7 * hidden * 4);
            assert_eq!(blocked.blocks.len(), 4);
            assert_eq!(blocked.dims(), [vocab, hidden]);
            let ids = [22, 0, 7, 6, 13, 7, 21, 14, 1];
            assert_eq!(
                values(blocked.rows(&ids, &device)),
                values(whole.rows(&ids, &device))
            );
            let x: Vec<f32> = (0..2 * 3 * hidden)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let x = Tensor::<3>::from_data(TensorData::new(x, [2, 3, hidden]), &device);
            let (a, b) = (values(blocked.project(x.clone())), values(whole.project(x)));
            assert_eq!(a.len(), 2 * 3 * vocab);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-5, "blocked logits differ by {worst}");
        }
    }
}
