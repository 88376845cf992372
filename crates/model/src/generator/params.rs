//! Where parameters come from: a checkpoint ([`WeightMap`]) or a seeded random init
//! ([`RandomInit`]), behind one small trait so every module is built by one `load` function.
//!
//! Names are the ones diffusers' `save_pretrained` writes (`transformer_blocks.0.attn.to_q.weight`,
//! `decoder.up_blocks.0.resnets.0.conv1.weight`, ...). Shapes are PyTorch's: Linear weights are
//! `[out, in]` and are transposed here into burn's `[in, out]`. Krea 2's original checkpoint
//! names are mapped by [`krea2_original_to_diffusers`] (one table, [`KREA2_PREFIX_RENAMES`] and
//! [`KREA2_BLOCK_RENAMES`]). Nothing here reads files: callers insert [`TensorData`].

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::tensor::{DType, Device, Shape, Tensor, TensorData};

use unifusion_kernels::QuantLinear;

use crate::precision::f32_param;

use super::sampler::SeededNormal;
use crate::linear::LinearW;

/// Why parameters could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The checkpoint lacks a tensor the config needs.
    #[error("missing weight `{0}` (is the config right for this checkpoint?)")]
    Missing(String),
    /// A tensor has the wrong shape for the config.
    #[error("weight `{name}` has shape {got:?}, the config needs {expected:?}")]
    Shape {
        /// The tensor's checkpoint name.
        name: String,
        /// Its shape in the checkpoint.
        got: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor is not a float tensor.
    #[error("weight `{name}` has dtype {dtype:?}, expected a float type")]
    DType {
        /// The tensor's checkpoint name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// The bytes are not a readable safetensors file.
    #[error("not a safetensors file: {0}")]
    Format(String),
    /// A quantized weight's stored tensors do not fit the config or each other.
    #[error("{0}")]
    Quantized(String),
    /// The checkpoint holds tensors the config does not use.
    #[error("{} unused weights, e.g. `{}` (is the config right for this checkpoint?)", .0.len(), .0.first().map(String::as_str).unwrap_or(""))]
    Unused(Vec<String>),
}

/// A source of named parameters. `shape` is the PyTorch shape of the tensor.
pub trait ParamSource {
    /// The tensor called `name`, of shape `shape`, on `device`, as f32.
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError>;

    /// The block-quantized Linear weight `weight` (`{name}.weight`, PyTorch `[d_out, d_in]`)
    /// when the source holds one instead of a float tensor (`docs/WEIGHTS.md`); by default none.
    fn quant_linear(
        &mut self,
        _weight: &str,
        _d_in: usize,
        _d_out: usize,
    ) -> Result<Option<QuantLinear>, LoadError> {
        Ok(None)
    }
}

/// Named tensors from a checkpoint. Each is taken once; [`WeightMap::finish`] reports leftovers.
#[derive(Debug, Default)]
pub struct WeightMap {
    tensors: BTreeMap<String, TensorData>,
}

impl WeightMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the tensor `name`.
    pub fn insert(&mut self, name: impl Into<String>, data: TensorData) {
        self.tensors.insert(name.into(), data);
    }

    /// Every tensor of a safetensors file (see [`read_safetensors`]).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, LoadError> {
        let mut map = Self::new();
        map.extend_from_safetensors(bytes)?;
        Ok(map)
    }

    /// Adds every tensor of another safetensors shard.
    pub fn extend_from_safetensors(&mut self, bytes: &[u8]) -> Result<(), LoadError> {
        for (name, data) in read_safetensors(bytes)? {
            self.insert(name, data);
        }
        Ok(())
    }

    /// Number of tensors not taken yet.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether every tensor has been taken.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Names not taken yet, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Ok when every tensor was used, else [`LoadError::Unused`] naming them.
    pub fn finish(self) -> Result<(), LoadError> {
        if self.tensors.is_empty() {
            Ok(())
        } else {
            Err(LoadError::Unused(self.tensors.into_keys().collect()))
        }
    }
}

impl ParamSource for WeightMap {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let data = self
            .tensors
            .remove(name)
            .ok_or_else(|| LoadError::Missing(name.to_string()))?;
        if data.shape().as_slice() != shape {
            return Err(LoadError::Shape {
                name: name.to_string(),
                got: data.shape().as_slice().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let data = match data.dtype() {
            DType::F32 => data,
            DType::F64 | DType::F16 | DType::BF16 => data.convert_dtype(DType::F32),
            dtype => {
                return Err(LoadError::DType {
                    name: name.to_string(),
                    dtype,
                });
            }
        };
        Ok(Tensor::from_data(data, device))
    }
}

/// The tensors of a safetensors file, in file order, as f32 [`TensorData`] (F64, F32, F16,
/// BF16, and integer/bool tensors, converted; integers are exact below 2²⁴).
pub fn read_safetensors(bytes: &[u8]) -> Result<Vec<(String, TensorData)>, LoadError> {
    use safetensors::{Dtype, SafeTensors};
    let file = SafeTensors::deserialize(bytes).map_err(|e| LoadError::Format(e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in file.iter() {
        let d = view.data();
        let shape = view.shape().to_vec();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| {
                    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            Dtype::I32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                .collect(),
            Dtype::U8 | Dtype::BOOL => d.iter().map(|&b| b as f32).collect(),
            Dtype::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
            other => {
                return Err(LoadError::Format(format!(
                    "tensor `{name}` has unsupported dtype {other:?}"
                )));
            }
        };
        out.push((name.to_string(), TensorData::new(values, shape)));
    }
    Ok(out)
}

/// Seeded random parameters: every tensor `~ N(0, std²)`, drawn on the host so a seed gives
/// the same model on every backend. Meant for benchmarks and shape tests, not as a training
/// init (GroupNorm scales, for one, would start near zero).
#[derive(Debug)]
pub struct RandomInit {
    rng: SeededNormal,
    std: f32,
}

impl RandomInit {
    /// Parameters drawn from `N(0, std²)` with a seeded generator.
    pub fn new(seed: u64, std: f32) -> Self {
        Self {
            rng: SeededNormal::new(seed),
            std,
        }
    }
}

impl ParamSource for RandomInit {
    fn tensor<const D: usize>(
        &mut self,
        _name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.next_f32() * self.std).collect();
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// `Linear` from `{name}.weight` `[out, in]` (and `{name}.bias` `[out]` when `bias`).
pub(crate) fn linear(
    src: &mut impl ParamSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<Linear, LoadError> {
    let weight = src.tensor(&format!("{name}.weight"), [d_out, d_in], device)?;
    let bias = if bias {
        Some(Param::from_tensor(src.tensor(
            &format!("{name}.bias"),
            [d_out],
            device,
        )?))
    } else {
        None
    };
    Ok(Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias,
    })
}

/// Like [`linear`], but takes a quantized `{name}.weight` when the source has one (the bias
/// stays float): the Linears a packer may quantize are built with this.
pub(crate) fn linear_w(
    src: &mut impl ParamSource,
    name: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<LinearW, LoadError> {
    if let Some(mut q) = src.quant_linear(&format!("{name}.weight"), d_in, d_out)? {
        if bias {
            q.bias = Some(Param::from_tensor(src.tensor(
                &format!("{name}.bias"),
                [d_out],
                device,
            )?));
        }
        return Ok(LinearW::Quant(q));
    }
    Ok(LinearW::Float(linear(
        src, name, d_in, d_out, bias, device,
    )?))
}

/// `Conv2d` (arguments as PyTorch's `nn.Conv2d`) from `{name}.weight` `[out, in, k, k]` and `{name}.bias`.
#[allow(clippy::too_many_arguments)] // mirrors nn.Conv2d(in, out, k, stride, padding, bias)
pub(crate) fn conv2d(
    src: &mut impl ParamSource,
    name: &str,
    [c_in, c_out]: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    device: &Device,
) -> Result<Conv2d, LoadError> {
    let weight = src.tensor(
        &format!("{name}.weight"),
        [c_out, c_in, kernel, kernel],
        device,
    )?;
    let bias = if bias {
        Some(Param::from_tensor(src.tensor(
            &format!("{name}.bias"),
            [c_out],
            device,
        )?))
    } else {
        None
    };
    Ok(Conv2d {
        weight: Param::from_tensor(weight),
        bias,
        stride: [stride, stride],
        kernel_size: [kernel, kernel],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Explicit(padding, padding, padding, padding),
    })
}

/// `GroupNorm` with affine `{name}.weight` / `{name}.bias` (PyTorch's names).
pub(crate) fn group_norm(
    src: &mut impl ParamSource,
    name: &str,
    groups: usize,
    channels: usize,
    eps: f64,
    device: &Device,
) -> Result<GroupNorm, LoadError> {
    Ok(GroupNorm {
        // f32 whatever the precision: the VAE runs its norms in f32 (`crate::precision`).
        gamma: Some(Param::from_tensor(f32_param(src.tensor(
            &format!("{name}.weight"),
            [channels],
            device,
        )?))),
        beta: Some(Param::from_tensor(f32_param(src.tensor(
            &format!("{name}.bias"),
            [channels],
            device,
        )?))),
        num_groups: groups,
        num_channels: channels,
        epsilon: eps,
        affine: true,
    })
}

/// Krea 2 original (and ComfyUI) prefixes → diffusers prefixes. Source: the key table used to
/// convert native Krea 2 checkpoints for `Krea2Transformer2DModel` (`first` = `img_in`, `tmlp.0/2`
/// = `time_embed.linear_1/2`, `tproj.1` = `time_mod_proj`, `txtmlp.0/1/3` = `txt_in`, ...).
pub const KREA2_PREFIX_RENAMES: [(&str, &str); 12] = [
    ("first.", "img_in."),
    ("tmlp.0.", "time_embed.linear_1."),
    ("tmlp.2.", "time_embed.linear_2."),
    ("tproj.1.", "time_mod_proj."),
    ("txtmlp.0.scale", "txt_in.norm.weight"),
    ("txtmlp.1.", "txt_in.linear_1."),
    ("txtmlp.3.", "txt_in.linear_2."),
    ("txtfusion.", "text_fusion."),
    ("blocks.", "transformer_blocks."),
    ("last.linear.", "final_layer.linear."),
    ("last.norm.scale", "final_layer.norm.weight"),
    ("last.modulation.lin", "final_layer.scale_shift_table"),
];

/// Renames inside every DiT and text-fusion block (Krea 2 original → diffusers).
pub const KREA2_BLOCK_RENAMES: [(&str, &str); 11] = [
    (".attn.wq.", ".attn.to_q."),
    (".attn.wk.", ".attn.to_k."),
    (".attn.wv.", ".attn.to_v."),
    (".attn.wo.", ".attn.to_out.0."),
    (".attn.gate.", ".attn.to_gate."),
    (".attn.qknorm.qnorm.scale", ".attn.norm_q.weight"),
    (".attn.qknorm.knorm.scale", ".attn.norm_k.weight"),
    (".mlp.", ".ff."),
    (".prenorm.scale", ".norm1.weight"),
    (".postnorm.scale", ".norm2.weight"),
    (".mod.lin", ".scale_shift_table"),
];

/// Prefixes single-file exports put in front of the native transformer keys.
const KREA2_CHECKPOINT_PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

/// The diffusers name of a Krea 2 original checkpoint key, or `None` when the key is not a
/// transformer weight (a bundled text encoder or VAE). Diffusers names pass through unchanged.
pub fn krea2_original_key(key: &str) -> Option<String> {
    let key = KREA2_CHECKPOINT_PREFIXES
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key);
    const DIFFUSERS_PREFIXES: [&str; 7] = [
        "img_in.",
        "time_embed.",
        "time_mod_proj.",
        "text_fusion.",
        "txt_in.",
        "transformer_blocks.",
        "final_layer.",
    ];
    if DIFFUSERS_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return Some(key.to_string());
    }
    let (old, new) = KREA2_PREFIX_RENAMES
        .iter()
        .find(|(old, _)| key.starts_with(old))?;
    let mut renamed = format!("{new}{}", &key[old.len()..]);
    for (old, new) in KREA2_BLOCK_RENAMES {
        renamed = renamed.replace(old, new);
    }
    Some(renamed)
}

/// Converts a Krea 2 original (or ComfyUI, or already-diffusers) transformer checkpoint to
/// diffusers names. Keys that are not transformer weights are dropped; the flattened per-block
/// modulation vectors (`blocks.N.mod.lin`, `[6·D]`) and the final layer's (`[2·D]`) become
/// the `[6, D]` / `[2, D]` tables diffusers stores.
pub fn krea2_original_to_diffusers(map: WeightMap) -> WeightMap {
    let mut out = WeightMap::new();
    for (key, data) in map.tensors {
        let Some(name) = krea2_original_key(&key) else {
            continue;
        };
        let rows = if name.starts_with("transformer_blocks.") {
            6
        } else {
            2
        };
        let data = if name.ends_with(".scale_shift_table") && data.shape().num_dims() == 1 {
            let n = data.num_elements();
            let (bytes, _, dtype) = data.into_parts();
            TensorData::from_bytes(bytes, Shape::new([rows, n / rows]), dtype)
        } else {
            data
        };
        out.insert(name, data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_to_diffusers() {
        let cases = [
            (
                "blocks.3.attn.wq.weight",
                "transformer_blocks.3.attn.to_q.weight",
            ),
            (
                "blocks.0.attn.wo.weight",
                "transformer_blocks.0.attn.to_out.0.weight",
            ),
            (
                "model.diffusion_model.blocks.1.attn.qknorm.knorm.scale",
                "transformer_blocks.1.attn.norm_k.weight",
            ),
            ("blocks.2.mod.lin", "transformer_blocks.2.scale_shift_table"),
            (
                "txtfusion.refiner_blocks.1.mlp.gate.weight",
                "text_fusion.refiner_blocks.1.ff.gate.weight",
            ),
            (
                "txtfusion.layerwise_blocks.0.prenorm.scale",
                "text_fusion.layerwise_blocks.0.norm1.weight",
            ),
            ("txtfusion.projector.weight", "text_fusion.projector.weight"),
            ("txtmlp.0.scale", "txt_in.norm.weight"),
            ("tproj.1.bias", "time_mod_proj.bias"),
            ("last.modulation.lin", "final_layer.scale_shift_table"),
            ("first.weight", "img_in.weight"),
            ("img_in.weight", "img_in.weight"),
        ];
        for (original, diffusers) in cases {
            assert_eq!(krea2_original_key(original).as_deref(), Some(diffusers));
        }
        assert_eq!(krea2_original_key("text_encoder.layers.0.weight"), None);
    }
}
