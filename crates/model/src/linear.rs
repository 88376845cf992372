//! Linear layers whose weight is either float (`burn::nn::Linear`) or block-wise int8/int4
//! ([`unifusion_kernels::QuantLinear`], format in `docs/WEIGHTS.md`), and the store that pairs
//! a quantized weight's two stored tensors as they stream in.
//!
//! Which Linears a packer may quantize: the VLM's attention and MLP projections (language
//! model and vision encoder) and `mlp1`, and the attention and feed-forward projections of
//! every DiT and text-fusion block. Each of those asks its source for a quantized weight first
//! and falls back to the float one, so one model type loads either kind of checkpoint.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use unifusion_kernels::QuantLinear;
use unifusion_weights::Dtype;
use unifusion_weights::quant::{QuantBits, QuantPart, QuantizedWeight, parse_name};

/// A Linear layer with a float or a block-quantized weight. `forward`: `[..., d_in]` →
/// `[..., d_out]`.
// A model holds a few hundred of these, built once: the size difference between the variants
// costs nothing worth a Box (which burn's Module derive would have to see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum LinearW {
    /// Float weight `[d_in, d_out]` (burn's layout).
    Float(Linear),
    /// int8 / int4 weight, dequantized inside the matmul kernel.
    Quant(QuantLinear),
}

impl LinearW {
    /// `x · W (+ b)`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            LinearW::Float(l) => l.forward(x),
            LinearW::Quant(q) => q.forward(x),
        }
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, LinearW::Quant(_))
    }
}

impl From<Linear> for LinearW {
    fn from(l: Linear) -> Self {
        LinearW::Float(l)
    }
}

/// One half of a quantized weight, waiting for the other.
struct Half {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Quantized weights by the name of the float weight they replace (`….weight`): each pair of
/// stored tensors (`….weight.q8`/`.q4` + `….weight.scales`) is checked and uploaded as soon as
/// both halves have arrived, so the host holds at most the halves split across a shard boundary.
#[derive(Default)]
pub struct QuantStore {
    data: BTreeMap<String, (QuantBits, Half)>,
    scales: BTreeMap<String, Half>,
    ready: BTreeMap<String, QuantLinear>,
}

impl QuantStore {
    /// Takes `name` if it is part of a quantized weight (`Ok(true)`), uploading the weight to
    /// `device` once both parts are here; `Ok(false)` for any other tensor. Errors name the
    /// tensor: a wrong dtype, or parts whose shapes do not fit together.
    pub fn add(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
        device: &Device,
    ) -> Result<bool, String> {
        let half = || Half {
            dtype,
            shape: shape.to_vec(),
            bytes: bytes.to_vec(),
        };
        let weight = match parse_name(name) {
            None => return Ok(false),
            Some(QuantPart::Data(weight, bits)) => {
                if dtype != bits.dtype() {
                    return Err(format!(
                        "tensor `{name}`: a {} weight is stored as {}, got {dtype}",
                        bits.suffix(),
                        bits.dtype()
                    ));
                }
                self.data.insert(weight.to_owned(), (bits, half()));
                weight
            }
            Some(QuantPart::Scales(weight)) => {
                if dtype != Dtype::F16 {
                    return Err(format!("tensor `{name}`: scales are F16, got {dtype}"));
                }
                self.scales.insert(weight.to_owned(), half());
                weight
            }
        };
        if self.data.contains_key(weight) && self.scales.contains_key(weight) {
            let (bits, data) = self.data.remove(weight).ok_or("paired")?;
            let scales = self.scales.remove(weight).ok_or("paired")?;
            debug_assert_eq!(data.dtype, bits.dtype());
            debug_assert_eq!(scales.dtype, Dtype::F16);
            let q = QuantizedWeight::from_parts(
                bits,
                data.bytes,
                &data.shape,
                scales.bytes,
                &scales.shape,
            )
            .map_err(|e| format!("quantized weight `{weight}`: {e}"))?;
            let layer = QuantLinear::new(&q, None, device)
                .map_err(|e| format!("quantized weight `{weight}`: {e}"))?;
            self.ready.insert(weight.to_owned(), layer);
        }
        Ok(true)
    }

    /// The quantized `weight` (`….weight`) if there is one, checked against `[d_out, d_in]`,
    /// with `bias` attached.
    pub fn take(
        &mut self,
        weight: &str,
        d_in: usize,
        d_out: usize,
        bias: Option<Tensor<1>>,
    ) -> Result<Option<QuantLinear>, String> {
        let Some(mut layer) = self.ready.remove(weight) else {
            return Ok(None);
        };
        if layer.d_in != d_in || layer.d_out != d_out {
            return Err(format!(
                "quantized weight `{weight}` is [{}, {}], the config needs [{d_out}, {d_in}]",
                layer.d_out, layer.d_in
            ));
        }
        layer.bias = bias.map(Param::from_tensor);
        Ok(Some(layer))
    }

    /// Whether a quantized `weight` is waiting to be taken.
    pub fn contains(&self, weight: &str) -> bool {
        self.ready.contains_key(weight)
    }

    /// Stored names nobody took, or whose other half never came, sorted.
    pub fn leftovers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ready
            .keys()
            .map(|w| format!("{w}.q*"))
            .chain(
                self.data
                    .iter()
                    .map(|(w, (b, _))| format!("{w}{}", b.suffix())),
            )
            .chain(self.scales.keys().map(|w| format!("{w}.scales")))
            .collect();
        names.sort();
        names
    }
}
