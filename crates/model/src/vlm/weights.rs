//! Checkpoint tensors by name, from safetensors bytes (any source: file, fetch, IndexedDB).
//!
//! Every accepted spelling is mapped once, by [`canonical_name`], onto one canonical layout
//! (transformers' InternVL names without their outer prefixes):
//!
//! | checkpoint key (transformers `save_pretrained` / in-memory / original OpenGVLab) | canonical |
//! |---|---|
//! | `vision_tower.*`, `model.vision_tower.*` | `vision.*` |
//! | `multi_modal_projector.*`, `model.multi_modal_projector.*` | `projector.*` |
//! | `language_model.model.*`, `model.language_model.*`, `language_model.*` | `text.*` |
//! | `language_model.lm_head.weight`, `lm_head.weight` | `lm_head.weight` |
//! | `vision_model.embeddings.class_embedding` | `vision.embeddings.cls_token` |
//! | `vision_model.embeddings.patch_embedding.*` | `vision.embeddings.patch_embeddings.projection.*` |
//! | `vision_model.embeddings.position_embedding` | `vision.embeddings.position_embeddings` |
//! | `vision_model.encoder.layers.N.attn.qkv.*` (fused, split in thirds) | `vision.encoder.layer.N.attention.{q,k,v}_proj.*` |
//! | `...layers.N.attn.proj.*` / `attn.q_norm` / `attn.k_norm` | `...layer.N.attention.projection_layer.*` / `q_norm` / `k_norm` |
//! | `...layers.N.norm1.*` / `norm2.*` / `ls1` / `ls2` / `mlp.fc1` / `mlp.fc2` | `layernorm_before` / `layernorm_after` / `lambda_1` / `lambda_2` / same |
//! | `mlp1.0.*` / `mlp1.1.*` / `mlp1.3.*` | `projector.layer_norm` / `linear_1` / `linear_2` |

use std::collections::HashMap;

use burn::tensor::{Device, Tensor, TensorData};

use super::VlmError;
use super::text::MAX_BINDING_BYTES;
use crate::linear::{LinearW, QuantStore};

/// Checkpoint tensors keyed by canonical name, taken one by one while the model is built.
///
/// [`Weights::new`] keeps them on the host (f32) until taken; [`Weights::on_device`] uploads
/// each as it arrives, so a streaming load holds one shard on the host, not the whole model.
pub struct Weights {
    tensors: HashMap<String, (Stored, Vec<usize>)>,
    device: Option<Device>,
    /// Block-quantized Linear weights by canonical weight name ([`Weights::add_quantized`]).
    quant: QuantStore,
    /// Recording mode: a missing tensor is recorded here and given as zeros.
    asked: Option<Vec<(String, Vec<usize>)>>,
    /// On the device, a 2-D tensor larger than this (bytes of f32) is uploaded in row blocks,
    /// so no single buffer passes the adapter's binding limit.
    max_tensor_bytes: usize,
}

/// Where one tensor waits to be taken.
enum Stored {
    Host(Vec<f32>),
    /// Flattened on the device; reshaped when taken (boxed: a tensor handle is much larger
    /// than a `Vec`).
    Device(Box<Tensor<1>>),
    /// A 2-D tensor over the size limit, as row blocks on the device.
    DeviceRows(Vec<Tensor<2>>),
}

/// Rows per block so that a block of `cols` f32 columns stays within `max_bytes`.
pub fn block_rows(rows: usize, cols: usize, max_bytes: usize) -> usize {
    (max_bytes / (4 * cols.max(1))).clamp(1, rows.max(1))
}

impl Stored {
    /// A handle to the same data (device tensors share their buffers; host data is copied).
    fn clone_handle(&self) -> Stored {
        match self {
            Stored::Host(v) => Stored::Host(v.clone()),
            Stored::Device(t) => Stored::Device(t.clone()),
            Stored::DeviceRows(b) => Stored::DeviceRows(b.clone()),
        }
    }

    /// The tensor in one piece.
    fn whole<const D: usize>(self, shape: [usize; D], device: &Device) -> Tensor<D> {
        match self {
            Stored::Host(values) => Tensor::from_data(TensorData::new(values, shape), device),
            Stored::Device(flat) => flat.to_device(device).reshape(shape),
            Stored::DeviceRows(blocks) => Tensor::cat(blocks, 0).to_device(device).reshape(shape),
        }
    }

    /// The 2-D tensor as row blocks of at most `max_bytes` (f32) each.
    fn row_blocks(self, shape: [usize; 2], max_bytes: usize, device: &Device) -> Vec<Tensor<2>> {
        let [rows, cols] = shape;
        let per = block_rows(rows, cols, max_bytes);
        match self {
            Stored::Host(values) => values
                .chunks(per * cols.max(1))
                .map(|c| {
                    let r = c.len() / cols.max(1);
                    Tensor::from_data(TensorData::new(c.to_vec(), [r, cols]), device)
                })
                .collect(),
            Stored::DeviceRows(blocks)
                if blocks.iter().rev().skip(1).all(|b| b.dims()[0] == per)
                    && blocks.last().is_some_and(|b| b.dims()[0] <= per) =>
            {
                blocks.into_iter().map(|b| b.to_device(device)).collect()
            }
            other => {
                let whole: Tensor<2> = other.whole(shape, device);
                (0..rows.div_ceil(per))
                    .map(|i| whole.clone().narrow(0, i * per, per.min(rows - i * per)))
                    .collect()
            }
        }
    }
}

impl Weights {
    /// An empty host-side set; add shards with [`Weights::add_safetensors`].
    pub fn new() -> Self {
        Self {
            tensors: HashMap::new(),
            device: None,
            quant: QuantStore::default(),
            asked: None,
            max_tensor_bytes: MAX_BINDING_BYTES,
        }
    }

    /// An empty set that answers every request with zeros of the asked shape and records
    /// `(canonical name, shape)`: one load then lists every tensor a config needs.
    pub fn recording() -> Self {
        Self {
            asked: Some(Vec::new()),
            ..Self::new()
        }
    }

    /// What a [`Weights::recording`] set was asked for, in order (tied tensors once).
    pub fn recorded(&self) -> &[(String, Vec<usize>)] {
        self.asked.as_deref().unwrap_or(&[])
    }

    /// An empty set that uploads every tensor to `device` as it is added.
    pub fn on_device(device: &Device) -> Self {
        Self {
            tensors: HashMap::new(),
            device: Some(device.clone()),
            quant: QuantStore::default(),
            asked: None,
            max_tensor_bytes: MAX_BINDING_BYTES,
        }
    }

    /// [`Weights::on_device`] with another limit for uploading 2-D tensors in row blocks.
    pub fn on_device_with_limit(device: &Device, max_tensor_bytes: usize) -> Self {
        Self {
            max_tensor_bytes: max_tensor_bytes.max(4),
            ..Self::on_device(device)
        }
    }

    /// Parse one safetensors file (f32, f16 or bf16 tensors) and add its tensors.
    pub fn add_safetensors(&mut self, bytes: &[u8]) -> Result<(), VlmError> {
        for raw in parse_safetensors(bytes)? {
            let values = raw.to_f32()?;
            self.add(&raw.name, values, raw.shape)?;
        }
        Ok(())
    }

    /// Add one checkpoint tensor under any accepted spelling of its name (see the table above).
    pub fn add(&mut self, name: &str, values: Vec<f32>, shape: Vec<usize>) -> Result<(), VlmError> {
        let count: usize = shape.iter().product();
        if values.len() != count {
            return Err(VlmError::Weights(format!(
                "tensor `{name}` has {} values for shape {shape:?}",
                values.len()
            )));
        }
        for (canonical, values, shape) in canonical_names(name, values, shape)? {
            let stored = match &self.device {
                Some(device) if shape.len() == 2 && values.len() * 4 > self.max_tensor_bytes => {
                    let (rows, cols) = (shape[0], shape[1]);
                    let per = block_rows(rows, cols, self.max_tensor_bytes);
                    let blocks = values
                        .chunks(per * cols.max(1))
                        .map(|chunk| {
                            let r = chunk.len() / cols.max(1);
                            Tensor::from_data(TensorData::new(chunk.to_vec(), [r, cols]), device)
                        })
                        .collect();
                    Stored::DeviceRows(blocks)
                }
                Some(device) => {
                    let n = values.len();
                    Stored::Device(Box::new(Tensor::from_data(
                        TensorData::new(values, [n]),
                        device,
                    )))
                }
                None => Stored::Host(values),
            };
            self.tensors.insert(canonical, (stored, shape));
        }
        Ok(())
    }

    /// The size over which 2-D tensors are kept in row blocks (bytes of f32).
    pub fn max_tensor_bytes(&self) -> usize {
        self.max_tensor_bytes
    }

    /// Whether a canonical name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// In recording mode, records `name` (once) and gives the shape to fill with zeros.
    fn record<const D: usize>(&mut self, name: &str, shape: &[usize; D]) -> Option<[usize; D]> {
        let asked = self.asked.as_mut()?;
        if !asked.iter().any(|(n, _)| n == name) {
            asked.push((name.to_string(), shape.to_vec()));
        }
        Some(*shape)
    }

    /// Take a tensor of exactly `shape` onto `device`.
    pub fn take<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, VlmError> {
        if let Some(asked) = self.record(name, &shape) {
            return Ok(untouched_zeros(asked, device));
        }
        let (stored, got) = self
            .tensors
            .remove(name)
            .ok_or_else(|| VlmError::MissingTensor(name.to_string()))?;
        check_shape(name, &got, &shape)?;
        Ok(stored.whole(shape, device))
    }

    /// Take a 2-D tensor of exactly `shape` as row blocks of at most `max_bytes` (f32) each,
    /// never as one buffer: for matrices over the adapter's binding limit (the embedding).
    pub fn take_row_blocks(
        &mut self,
        name: &str,
        shape: [usize; 2],
        max_bytes: usize,
        device: &Device,
    ) -> Result<Vec<Tensor<2>>, VlmError> {
        if let Some(asked) = self.record(name, &shape) {
            return Ok(vec![untouched_zeros(asked, device)]);
        }
        let (stored, got) = self
            .tensors
            .remove(name)
            .ok_or_else(|| VlmError::MissingTensor(name.to_string()))?;
        check_shape(name, &got, &shape)?;
        Ok(stored.row_blocks(shape, max_bytes, device))
    }

    /// [`Weights::take_row_blocks`] without removing the tensor (for tied weights).
    pub fn peek_row_blocks(
        &self,
        name: &str,
        shape: [usize; 2],
        max_bytes: usize,
        device: &Device,
    ) -> Result<Vec<Tensor<2>>, VlmError> {
        if self.asked.is_some() {
            return Ok(vec![untouched_zeros(shape, device)]);
        }
        let (stored, got) = self
            .tensors
            .get(name)
            .ok_or_else(|| VlmError::MissingTensor(name.to_string()))?;
        check_shape(name, got, &shape)?;
        Ok(stored.clone_handle().row_blocks(shape, max_bytes, device))
    }

    /// A copy of a tensor (for tied weights), without removing it.
    pub fn peek<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, VlmError> {
        if self.asked.is_some() {
            // Recording: the tensor is recorded when it is taken.
            return Ok(untouched_zeros(shape, device));
        }
        let (stored, got) = self
            .tensors
            .get(name)
            .ok_or_else(|| VlmError::MissingTensor(name.to_string()))?;
        check_shape(name, got, &shape)?;
        Ok(stored.clone_handle().whole(shape, device))
    }

    /// Names not taken by the model, sorted (checkpoint keys the model does not know).
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.extend(self.quant.leftovers());
        names.sort();
        names
    }
}

/// Zeros from a zeroed allocation (`calloc`): on the CPU, pages nothing reads are never
/// mapped, so recording an InternVL3-1B config takes tens of MB instead of its 3.7 GB
/// (`Tensor::zeros` writes every element).
fn untouched_zeros<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(vec![0f32; n], shape), device)
}

fn check_shape(name: &str, got: &[usize], expected: &[usize]) -> Result<(), VlmError> {
    if got == expected {
        Ok(())
    } else {
        Err(VlmError::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        })
    }
}

impl Default for Weights {
    fn default() -> Self {
        Self::new()
    }
}

/// One tensor of a safetensors file, borrowed from its bytes.
pub struct RawTensor<'a> {
    /// Name as stored.
    pub name: String,
    /// safetensors dtype string (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    /// Elements as f32 (from F32, F16 or BF16).
    pub fn to_f32(&self) -> Result<Vec<f32>, VlmError> {
        let d = self.data;
        Ok(match self.dtype.as_str() {
            "F32" => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            "F16" => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            "BF16" => d
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            other => {
                return Err(VlmError::Weights(format!(
                    "tensor `{}`: dtype {other} is not a float type",
                    self.name
                )));
            }
        })
    }

    /// Elements as i64 (from I64 or I32).
    pub fn to_i64(&self) -> Result<Vec<i64>, VlmError> {
        let d = self.data;
        Ok(match self.dtype.as_str() {
            "I64" => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
            "I32" => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            other => {
                return Err(VlmError::Weights(format!(
                    "tensor `{}`: dtype {other} is not an integer type",
                    self.name
                )));
            }
        })
    }
}

/// Parse safetensors bytes without copying the data, with the `safetensors` crate's checks
/// (header bounds, offsets inside the data and not overlapping, byte count = shape × dtype).
pub fn parse_safetensors(bytes: &[u8]) -> Result<Vec<RawTensor<'_>>, VlmError> {
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| VlmError::Weights(format!("not a safetensors file: {e}")))?;
    Ok(file
        .tensors()
        .into_iter()
        .map(|(name, view)| RawTensor {
            name,
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
            data: view.data(),
        })
        .collect())
}

type Named = (String, Vec<f32>, Vec<usize>);

/// Where one checkpoint key goes (see the table in the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CanonicalName {
    /// One canonical name, same data. A key no spelling knows passes through unchanged (the
    /// loader then reports it as unused).
    One(String),
    /// The original fused `attn.qkv`: q, k, v stacked on the first axis, split in thirds.
    SplitQkv([String; 3]),
}

/// The canonical name(s) of one checkpoint key of shape `shape`. A fused `qkv` whose first
/// axis does not divide by 3 is an error naming it.
pub fn canonical_name(name: &str, shape: &[usize]) -> Result<CanonicalName, VlmError> {
    const PREFIXES: [(&str, &str); 9] = [
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "text."),
        ("language_model.model.", "text."),
        ("language_model.", "text."),
        ("model.vision_tower.", "vision."),
        ("vision_tower.", "vision."),
        ("model.multi_modal_projector.", "projector."),
        ("multi_modal_projector.", "projector."),
        ("lm_head.", "lm_head."),
    ];
    let one = |n: String| Ok(CanonicalName::One(n));
    for (from, to) in PREFIXES {
        if let Some(rest) = name.strip_prefix(from) {
            return one(format!("{to}{rest}"));
        }
    }
    if let Some(rest) = name.strip_prefix("mlp1.") {
        let (idx, leaf) = rest.split_once('.').unwrap_or((rest, ""));
        let layer = match idx {
            "0" => "layer_norm",
            "1" => "linear_1",
            "3" => "linear_2",
            _ => return one(name.to_string()),
        };
        return one(format!("projector.{layer}.{leaf}"));
    }
    match name.strip_prefix("vision_model.") {
        Some(rest) => original_vision(rest, shape),
        None => one(name.to_string()),
    }
}

/// The transformers name (`InternVLForConditionalGeneration.state_dict()`, the spelling
/// `unifusion pack` writes after `vlm.`) of a canonical name.
pub fn transformers_name(canonical: &str) -> String {
    for (from, to) in [
        ("vision.", "model.vision_tower."),
        ("projector.", "model.multi_modal_projector."),
        ("text.", "model.language_model."),
    ] {
        if let Some(rest) = canonical.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    canonical.to_string()
}

/// Map one checkpoint tensor onto canonical name(s); the original fused `qkv` becomes three.
fn canonical_names(
    name: &str,
    values: Vec<f32>,
    shape: Vec<usize>,
) -> Result<Vec<Named>, VlmError> {
    Ok(match canonical_name(name, &shape)? {
        CanonicalName::One(n) => vec![(n, values, shape)],
        CanonicalName::SplitQkv(names) => {
            let per = values.len() / 3;
            let mut part_shape = shape;
            part_shape[0] /= 3;
            names
                .into_iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        n,
                        values[i * per..(i + 1) * per].to_vec(),
                        part_shape.clone(),
                    )
                })
                .collect()
        }
    })
}

/// Original InternViT keys (`vision_model.` stripped): transformers'
/// `convert_internvl_weights_to_hf.py` `ORIGINAL_TO_CONVERTED_KEY_MAPPING_VISION`.
fn original_vision(rest: &str, shape: &[usize]) -> Result<CanonicalName, VlmError> {
    let one = |n: String| Ok(CanonicalName::One(n));
    match rest {
        "embeddings.class_embedding" => return one("vision.embeddings.cls_token".into()),
        "embeddings.position_embedding" => {
            return one("vision.embeddings.position_embeddings".into());
        }
        _ => {}
    }
    if let Some(leaf) = rest.strip_prefix("embeddings.patch_embedding.") {
        return one(format!(
            "vision.embeddings.patch_embeddings.projection.{leaf}"
        ));
    }
    let Some(layer_rest) = rest.strip_prefix("encoder.layers.") else {
        return one(format!("vision_model.{rest}"));
    };
    let (n, sub) = layer_rest.split_once('.').unwrap_or((layer_rest, ""));
    let base = format!("vision.encoder.layer.{n}.");
    if let Some(leaf) = sub.strip_prefix("attn.qkv.") {
        // [3C, C] weight or [3C] bias: q, k, v stacked on the first axis.
        let rows = shape.first().copied().unwrap_or(0);
        if rows == 0 || !rows.is_multiple_of(3) {
            return Err(VlmError::Weights(format!(
                "tensor `vision_model.{rest}` has shape {shape:?}: a fused qkv needs a first axis that divides by 3"
            )));
        }
        return Ok(CanonicalName::SplitQkv(
            ["q", "k", "v"].map(|p| format!("{base}attention.{p}_proj.{leaf}")),
        ));
    }
    const LAYER_MAP: [(&str, &str); 9] = [
        ("attn.proj.", "attention.projection_layer."),
        ("attn.q_norm.", "attention.q_norm."),
        ("attn.k_norm.", "attention.k_norm."),
        ("norm1.", "layernorm_before."),
        ("norm2.", "layernorm_after."),
        ("mlp.fc1.", "mlp.fc1."),
        ("mlp.fc2.", "mlp.fc2."),
        ("ls1", "lambda_1"),
        ("ls2", "lambda_2"),
    ];
    for (from, to) in LAYER_MAP {
        if let Some(leaf) = sub.strip_prefix(from) {
            return one(format!("{base}{to}{leaf}"));
        }
    }
    one(format!("vision_model.{rest}"))
}

impl Weights {
    /// Takes `name` (any accepted spelling + `.q8`/`.q4`/`.scales`) if it is part of a
    /// block-quantized Linear weight (`docs/WEIGHTS.md`), uploading the weight to `device` once
    /// both parts are here; `Ok(false)` for any other tensor.
    pub fn add_quantized(
        &mut self,
        name: &str,
        dtype: unifusion_weights::Dtype,
        shape: &[usize],
        bytes: &[u8],
        device: &Device,
    ) -> Result<bool, String> {
        use unifusion_weights::quant::{QuantPart, parse_name};
        let (weight, suffix) = match parse_name(name) {
            None => return Ok(false),
            Some(QuantPart::Data(w, bits)) => (w, bits.suffix()),
            Some(QuantPart::Scales(w)) => (w, unifusion_weights::quant::SCALES_SUFFIX),
        };
        let canonical = match canonical_name(weight, shape).map_err(|e| e.to_string())? {
            CanonicalName::One(n) => n,
            CanonicalName::SplitQkv(_) => {
                return Err(format!(
                    "`{name}`: a fused qkv cannot be stored quantized; pack with split q/k/v names"
                ));
            }
        };
        self.quant
            .add(&format!("{canonical}{suffix}"), dtype, shape, bytes, device)
    }

    /// A Linear from PyTorch's `[out, in]` `{prefix}.weight` (+ `{prefix}.bias`): the
    /// block-quantized weight when one was added, else the float one.
    pub fn linear(
        &mut self,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<LinearW, VlmError> {
        let name = format!("{prefix}.weight");
        if self.quant.contains(&name) {
            let bias = match bias {
                true => Some(self.take(&format!("{prefix}.bias"), [d_out], device)?),
                false => None,
            };
            let q = self.quant.take(&name, d_in, d_out, bias);
            if let Some(q) = q.map_err(VlmError::Weights)? {
                return Ok(LinearW::Quant(q));
            }
        }
        let weight: Tensor<2> = self.take(&format!("{prefix}.weight"), [d_out, d_in], device)?;
        let bias = if bias {
            Some(burn::module::Param::from_tensor(self.take(
                &format!("{prefix}.bias"),
                [d_out],
                device,
            )?))
        } else {
            None
        };
        Ok(LinearW::Float(burn::nn::Linear {
            weight: burn::module::Param::from_tensor(weight.transpose()),
            bias,
        }))
    }
}
