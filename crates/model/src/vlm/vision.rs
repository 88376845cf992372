//! InternViT vision tower, pixel shuffle v2 and the `mlp1` projector.
//!
//! InternViT: 14×14 patch conv (as a matmul over unfolded patches), CLS token, learned
//! position embedding (bicubic-interpolated, `align_corners=False`, when the patch grid
//! differs from the trained one), LayerScale pre-norm blocks
//! (`x + λ₁·attn(norm₁ x)`, `x + λ₂·mlp(norm₂ x)`), LayerNorm or RMSNorm, optional QK-norm
//! over the full q/k width, exact-erf GELU, optional qkv bias, no final norm (InternVL3);
//! CLS dropped. Mirrors transformers v5.24 `models/internvl/modeling_internvl.py`
//! (`InternVLVisionModel`, `InternVLModel.pixel_shuffle`, `InternVLMultiModalProjector`).

use crate::attention::blocked_attention;
use crate::linear::LinearW;
use crate::precision::{f32_param, norm_in_f32};
use burn::module::{Module, Param};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData, activation};

use super::VlmError;
use super::config::InternVlConfig;
use super::weights::Weights;

/// LayerNorm (with bias) or RMSNorm (without), over the last axis.
#[derive(Module, Debug)]
pub struct Norm {
    /// `[dim]`
    pub weight: Param<Tensor<1>>,
    /// `[dim]`; present = LayerNorm, absent = RMSNorm.
    pub bias: Option<Param<Tensor<1>>>,
    /// Epsilon.
    pub eps: f64,
}

impl Norm {
    /// Load `{name}.weight` (+ `{name}.bias` for LayerNorm).
    pub fn load(
        w: &mut Weights,
        name: &str,
        dim: usize,
        layer_norm: bool,
        eps: f64,
        device: &Device,
    ) -> Result<Self, VlmError> {
        let weight = Param::from_tensor(f32_param(w.take(
            &format!("{name}.weight"),
            [dim],
            device,
        )?));
        let bias = if layer_norm {
            Some(Param::from_tensor(f32_param(w.take(
                &format!("{name}.bias"),
                [dim],
                device,
            )?)))
        } else {
            None
        };
        Ok(Self { weight, bias, eps })
    }

    /// `[..., dim]` → same shape (statistics in f32 whatever the precision).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        norm_in_f32(x, |x| self.forward_f32(x))
    }

    fn forward_f32<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.bias {
            None => unifusion_kernels::rms_norm(x, self.weight.val(), self.eps as f32),
            Some(bias) => {
                let mean = x.clone().mean_dim(D - 1);
                let centered = x - mean;
                let var = centered.clone().square().mean_dim(D - 1);
                let y = centered / (var + self.eps).sqrt();
                y * self.weight.val().unsqueeze::<D>() + bias.val().unsqueeze::<D>()
            }
        }
    }
}

/// Multi-head self-attention of one InternViT block.
#[derive(Module, Debug)]
pub struct VisionAttention {
    pub q_proj: LinearW,
    pub k_proj: LinearW,
    pub v_proj: LinearW,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub projection_layer: LinearW,
    pub num_heads: usize,
}

/// `fc2(gelu(fc1 x))`.
#[derive(Module, Debug)]
pub struct VisionMlp {
    pub fc1: LinearW,
    pub fc2: LinearW,
}

/// One LayerScale block.
#[derive(Module, Debug)]
pub struct VisionLayer {
    pub layernorm_before: Norm,
    pub attention: VisionAttention,
    /// LayerScale of the attention branch `[hidden]` (`ls1` in the original).
    pub lambda_1: Param<Tensor<1>>,
    pub layernorm_after: Norm,
    pub mlp: VisionMlp,
    /// LayerScale of the MLP branch `[hidden]` (`ls2`).
    pub lambda_2: Param<Tensor<1>>,
}

/// InternViT.
#[derive(Module, Debug)]
pub struct VisionTower {
    /// Patch projection as a matrix `[channels·ph·pw, hidden]`.
    pub patch_weight: Param<Tensor<2>>,
    pub patch_bias: Param<Tensor<1>>,
    /// `[1, 1, hidden]`
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + grid², hidden]`
    pub position_embeddings: Param<Tensor<3>>,
    pub layers: Vec<VisionLayer>,
    /// Final LayerNorm, only when `use_mean_pooling` is false.
    pub layernorm: Option<Norm>,
    pub patch_size: [usize; 2],
    pub grid: [usize; 2],
    pub channels: usize,
    /// Which hidden state feeds the projector (transformers index, `num_layers` = last).
    pub feature_layer: usize,
}

/// `mlp1`: LayerNorm(4C, eps 1e-5) → Linear → GELU → Linear.
#[derive(Module, Debug)]
pub struct Projector {
    pub layer_norm: Norm,
    pub linear_1: LinearW,
    pub linear_2: LinearW,
    /// 1 / downsample_ratio.
    pub factor: usize,
}

impl VisionTower {
    /// Build from canonical `vision.*` tensors.
    pub fn load(c: &InternVlConfig, w: &mut Weights, device: &Device) -> Result<Self, VlmError> {
        let v = &c.vision_config;
        let h = v.hidden_size;
        let [ph, pw] = v.patch_size;
        let grid = v.grid();
        let ln = v.norm_type == "layer_norm";
        let conv: Tensor<4> = w.take(
            "vision.embeddings.patch_embeddings.projection.weight",
            [h, v.num_channels, ph, pw],
            device,
        )?;
        let patch_weight = conv.reshape([h, v.num_channels * ph * pw]).transpose();
        let patch_bias = w.take(
            "vision.embeddings.patch_embeddings.projection.bias",
            [h],
            device,
        )?;
        let cls_token = w.take("vision.embeddings.cls_token", [1, 1, h], device)?;
        let position_embeddings = w.take(
            "vision.embeddings.position_embeddings",
            [1, 1 + grid[0] * grid[1], h],
            device,
        )?;
        let mut layers = Vec::with_capacity(v.num_hidden_layers);
        for i in 0..v.num_hidden_layers {
            let p = format!("vision.encoder.layer.{i}");
            let a = format!("{p}.attention");
            let qk_norm = |w: &mut Weights, n: &str| -> Result<Option<Norm>, VlmError> {
                // transformers builds the QK RMSNorm with its default eps (1e-6), not the config's.
                v.use_qk_norm
                    .then(|| Norm::load(w, &format!("{a}.{n}"), h, false, 1e-6, device))
                    .transpose()
            };
            let attention = VisionAttention {
                q_proj: w.linear(&format!("{a}.q_proj"), h, h, v.attention_bias, device)?,
                k_proj: w.linear(&format!("{a}.k_proj"), h, h, v.attention_bias, device)?,
                v_proj: w.linear(&format!("{a}.v_proj"), h, h, v.attention_bias, device)?,
                q_norm: qk_norm(w, "q_norm")?,
                k_norm: qk_norm(w, "k_norm")?,
                projection_layer: w.linear(&format!("{a}.projection_layer"), h, h, true, device)?,
                num_heads: v.num_attention_heads,
            };
            layers.push(VisionLayer {
                layernorm_before: Norm::load(
                    w,
                    &format!("{p}.layernorm_before"),
                    h,
                    ln,
                    v.layer_norm_eps,
                    device,
                )?,
                attention,
                lambda_1: Param::from_tensor(w.take(&format!("{p}.lambda_1"), [h], device)?),
                layernorm_after: Norm::load(
                    w,
                    &format!("{p}.layernorm_after"),
                    h,
                    ln,
                    v.layer_norm_eps,
                    device,
                )?,
                mlp: VisionMlp {
                    fc1: w.linear(
                        &format!("{p}.mlp.fc1"),
                        h,
                        v.intermediate_size,
                        true,
                        device,
                    )?,
                    fc2: w.linear(
                        &format!("{p}.mlp.fc2"),
                        v.intermediate_size,
                        h,
                        true,
                        device,
                    )?,
                },
                lambda_2: Param::from_tensor(w.take(&format!("{p}.lambda_2"), [h], device)?),
            });
        }
        let layernorm = if v.use_mean_pooling {
            None
        } else {
            Some(Norm::load(
                w,
                "vision.layernorm",
                h,
                true,
                v.layer_norm_eps,
                device,
            )?)
        };
        let n = v.num_hidden_layers as i64;
        let k = c.vision_feature_layer;
        let feature_layer = if k < 0 { n + 1 + k } else { k };
        if !(0..=n).contains(&feature_layer) {
            return Err(VlmError::Config(format!(
                "vision_feature_layer {k} is out of range for {n} vision layers"
            )));
        }
        Ok(Self {
            patch_weight: Param::from_tensor(patch_weight),
            patch_bias: Param::from_tensor(patch_bias),
            cls_token: Param::from_tensor(cls_token),
            position_embeddings: Param::from_tensor(position_embeddings),
            layers,
            layernorm,
            patch_size: [ph, pw],
            grid,
            channels: v.num_channels,
            feature_layer: feature_layer as usize,
        })
    }

    /// `pixels` `[tiles, channels, height, width]` → features with CLS `[tiles, 1 + patches, hidden]`
    /// (the state that feeds the projector: the last layer, or `vision_feature_layer`).
    pub fn forward(&self, pixels: Tensor<4>) -> Result<Tensor<3>, VlmError> {
        let [t, c, height, width] = pixels.dims();
        let [ph, pw] = self.patch_size;
        if c != self.channels || height % ph != 0 || width % pw != 0 || height == 0 || width == 0 {
            return Err(VlmError::Input(format!(
                "pixel_values must be [tiles, {}, h, w] with h, w multiples of {ph}×{pw}, got {:?}",
                self.channels,
                [t, c, height, width]
            )));
        }
        let (gh, gw) = (height / ph, width / pw);
        let hidden = self.cls_token.dims()[2];
        // Unfold non-overlapping patches in (channel, row, col) order = the conv weight's layout.
        let patches = pixels
            .reshape([t, c, gh, ph, gw, pw])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([t, gh * gw, c * ph * pw]);
        let x = burn::tensor::module::linear(
            patches,
            self.patch_weight.val(),
            Some(self.patch_bias.val()),
        );
        let cls = self.cls_token.val().expand([t, 1, hidden]);
        let x = Tensor::cat(vec![cls, x], 1);
        let mut x = x + self.position_embedding(gh, gw);
        let last = self.layers.len();
        for layer in self.layers.iter().take(self.feature_layer) {
            x = layer.forward(x);
        }
        if self.feature_layer == last
            && let Some(norm) = &self.layernorm
        {
            x = norm.forward(x);
        }
        Ok(x)
    }

    /// Position embedding for a `gh × gw` patch grid `[1, 1 + gh·gw, hidden]`.
    fn position_embedding(&self, gh: usize, gw: usize) -> Tensor<3> {
        let pos = self.position_embeddings.val();
        let [g0, g1] = self.grid;
        if [gh, gw] == self.grid {
            return pos;
        }
        let hidden = pos.dims()[2];
        let cls = pos.clone().narrow(1, 0, 1);
        let grid = pos.narrow(1, 1, g0 * g1).reshape([g0 * g1, hidden]);
        let mh = bicubic_matrix(g0, gh);
        let mw = bicubic_matrix(g1, gw);
        // kron(Mh, Mw): out[i·gw + j] = Σ_ab Mh[i,a]·Mw[j,b]·grid[a·g1 + b]
        let mut m = vec![0f32; gh * gw * g0 * g1];
        for i in 0..gh {
            for j in 0..gw {
                let row = (i * gw + j) * g0 * g1;
                for a in 0..g0 {
                    for b in 0..g1 {
                        m[row + a * g1 + b] = mh[i * g0 + a] * mw[j * g1 + b];
                    }
                }
            }
        }
        let m = Tensor::<2>::from_data(TensorData::new(m, [gh * gw, g0 * g1]), &grid.device());
        let patch = m.matmul(grid).unsqueeze::<3>();
        Tensor::cat(vec![cls, patch], 1)
    }
}

/// Row-major `[out, in]` weights of PyTorch's 1-D bicubic resampling (`align_corners=False`,
/// A = −0.75, source index not clamped, taps clamped to the border).
pub fn bicubic_matrix(input: usize, output: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = input as f64 / output as f64;
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let base = src.floor();
        let t = src - base;
        let coeffs = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, w) in coeffs.iter().enumerate() {
            let idx = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            m[o * input + idx] += *w as f32;
        }
    }
    m
}

impl VisionLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let a = self
            .attention
            .forward(self.layernorm_before.forward(x.clone()));
        let x = x + a * self.lambda_1.val().unsqueeze::<3>();
        let m = self.mlp.fc2.forward(activation::gelu(
            self.mlp
                .fc1
                .forward(self.layernorm_after.forward(x.clone())),
        ));
        x + m * self.lambda_2.val().unsqueeze::<3>()
    }
}

impl VisionAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, l, h] = x.dims();
        let nh = self.num_heads;
        let mut q = self.q_proj.forward(x.clone());
        let mut k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        if let Some(n) = &self.q_norm {
            q = n.forward(q);
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(k);
        }
        let heads = |t: Tensor<3>| t.reshape([b, l, nh, h / nh]).swap_dims(1, 2);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let y = blocked_attention(heads(q), heads(k), heads(v), None, options);
        self.projection_layer
            .forward(y.swap_dims(1, 2).reshape([b, l, h]))
    }
}

impl Projector {
    /// Build from canonical `projector.*` tensors.
    pub fn load(c: &InternVlConfig, w: &mut Weights, device: &Device) -> Result<Self, VlmError> {
        let factor = c.shuffle_factor();
        let d_in = c.vision_config.hidden_size * factor * factor;
        let h = c.text_config.hidden_size;
        Ok(Self {
            layer_norm: Norm::load(w, "projector.layer_norm", d_in, true, 1e-5, device)?,
            linear_1: w.linear("projector.linear_1", d_in, h, true, device)?,
            linear_2: w.linear("projector.linear_2", h, h, true, device)?,
            factor,
        })
    }

    /// Vision features with CLS `[tiles, 1 + gh·gw, C]` → image tokens `[tiles, gh·gw/r², hidden]`.
    pub fn forward(&self, features: Tensor<3>, grid: [usize; 2]) -> Tensor<3> {
        let [t, n, c] = features.dims();
        let x = features.narrow(1, 1, n - 1);
        let x = pixel_shuffle(x.reshape([t, grid[0], grid[1], c]), self.factor);
        let [_, a, b, cc] = x.dims();
        let x = x.reshape([t, a * b, cc]);
        let x = self.layer_norm.forward(x);
        self.linear_2
            .forward(activation::gelu(self.linear_1.forward(x)))
    }
}

/// InternVL pixel shuffle v2: `[n, H, W, C]` → `[n, H/r, W/r, C·r²]`; for r = 2 the output at
/// (i, j) is `cat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1])`. The same view/permute
/// sequence as transformers' `InternVLModel.pixel_shuffle`.
pub fn pixel_shuffle(x: Tensor<4>, r: usize) -> Tensor<4> {
    let [n, h, w, c] = x.dims();
    let x = x.reshape([n, h, w / r, c * r]).swap_dims(1, 2);
    x.reshape([n, w / r, h / r, c * r * r]).swap_dims(1, 2)
}
