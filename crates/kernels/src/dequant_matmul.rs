//! Linear layers with block-wise int8 / int4 weights: `y = x · dequant(W)ᵀ (+ bias)`.
//!
//! Format (shared with the packer, `unifusion_weights::quant`, and `docs/WEIGHTS.md`): per
//! output row, groups of `G` inputs share one f16 scale, `w = q · s`, `q` symmetric int8 or int4.
//! On the device the integers are `u32` words (row-major `[out, in / (32 / bits)]`) and the
//! scales f16 pairs in `u32` words, both held as flat `Int` tensors.
//!
//! Kernels: `shaders/dequant_matvec.wgsl` for up to [`MATVEC_MAX_ROWS`] rows of `x` (decode
//! steps: every weight word read once for all rows); above that `shaders/dequant.wgsl` expands
//! the weight to f32 for burn's matmul ([`Variant::Dequant`], faster on lavapipe than the
//! one-pass `shaders/dequant_matmul.wgsl`, 32×32 tiles staged in workgroup memory, which stays
//! tested and selectable with [`fused_variant`]). Reference: [`dequant_matmul_reference`], which
//! unpacks the words with burn integer ops and calls burn's matmul; it runs on every other
//! device (Flex, autodiff) and is what the kernels are tested against.
//!
//! Precision: the layer computes in f32 whatever the device's default float dtype. Under f16
//! (`unifusion_model::precision`) [`QuantLinear::forward`] casts its input to f32 and its
//! output back: the weights are already 1 or ½ byte per value, so an f16 variant of the
//! kernels would save no weight memory, and the scales' f16 → f32 decode is exact either way.

use burn::backend::Wgpu;
use burn::backend::wgpu::{
    CubeDim, CubeTensor, KernelSource, SourceKernel, SourceTemplate, into_contiguous,
};
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, FloatDType, Int, Shape, Tensor, TensorData};
use cubecl::CubeCount;
use cubecl::prelude::KernelId;
use cubecl::server::KernelArguments;
use unifusion_weights::quant::{QuantBits, QuantizedWeight};

/// Up to this many rows of `x` take the mat-vec kernel; more take the tiled one.
pub const MATVEC_MAX_ROWS: usize = 8;
/// Output tile edge of the tiled kernel.
const TILE: usize = 32;
/// Output columns per workgroup of the mat-vec kernel.
const MATVEC_COLS: usize = 8;
/// WebGPU's guaranteed `maxComputeWorkgroupsPerDimension`.
const MAX_GRID_X: usize = 65_535;

/// Why a quantized matmul could not run, or its parts do not fit.
#[derive(Debug, thiserror::Error)]
pub enum QuantKernelError {
    /// A tensor does not live on a wgpu device (Flex, autodiff, ...).
    #[error("tensor is not on a wgpu device")]
    NotWgpu,
    /// The kernels take f32 activations and 32-bit integer words.
    #[error("the dequant-matmul kernel takes f32 input and 32-bit words, got {0:?}")]
    UnsupportedDType(DType),
    /// `x`'s last axis is not the layer's input size.
    #[error("input has {got} features, the layer takes {expected}")]
    InputSize {
        /// The layer's `d_in`.
        expected: usize,
        /// `x`'s last axis.
        got: usize,
    },
    /// Stored tensors of the wrong size for the layer.
    #[error("{0}")]
    Layout(String),
}

/// A Linear layer whose weight is stored block-wise quantized (int8 or int4, f16 scales).
///
/// `forward` takes `[..., d_in]` and returns `[..., d_out]`, like `burn::nn::Linear`.
#[derive(Module, Debug)]
pub struct QuantLinear {
    /// The integers as `u32` words (bit patterns in `i32`), `rows × d_in / (32 / bits)`.
    pub words: Tensor<1, Int>,
    /// The f16 scales, two per `u32` word (low half first), `⌈d_out · d_in / group / 2⌉`.
    pub scales: Tensor<1, Int>,
    /// Optional bias `[d_out]`, f32 (the kernels' output dtype).
    pub bias: Option<Param<Tensor<1>>>,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Inputs per scale (a multiple of 8).
    pub group: usize,
    /// 8 or 4.
    pub bits: u32,
}

impl QuantLinear {
    /// Uploads a quantized weight (PyTorch `[out, in]` orientation) and an optional bias.
    pub fn new(
        weight: &QuantizedWeight,
        bias: Option<Tensor<1>>,
        device: &Device,
    ) -> Result<Self, QuantKernelError> {
        if weight.cols == 0 {
            return Err(QuantKernelError::Layout(
                "a layer with no inputs has nothing to quantize".into(),
            ));
        }
        if let Some(b) = &bias
            && b.dims()[0] != weight.rows
        {
            return Err(QuantKernelError::Layout(format!(
                "bias has {} elements, the weight {} rows",
                b.dims()[0],
                weight.rows
            )));
        }
        let ints = |words: Vec<u32>| {
            let n = words.len();
            let values: Vec<i32> = words.into_iter().map(|w| w as i32).collect();
            Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device)
        };
        Ok(Self {
            words: ints(weight.data_words()),
            scales: ints(weight.scale_words()),
            bias: bias.map(|b| Param::from_tensor(b.cast(FloatDType::F32))),
            d_in: weight.cols,
            d_out: weight.rows,
            group: weight.group,
            bits: weight.bits.bits(),
        })
    }

    /// The integer width.
    pub fn quant_bits(&self) -> QuantBits {
        if self.bits == 4 {
            QuantBits::Q4
        } else {
            QuantBits::Q8
        }
    }

    /// `x · dequant(W)ᵀ + bias`, `[..., d_in]` → `[..., d_out]`: the WGSL kernel on wgpu,
    /// the plain-tensor reference elsewhere, in f32 (an f16 `x` is cast to f32 and the result
    /// back to f16).
    ///
    /// # Panics
    /// When `x`'s last axis is not `d_in` (as `burn::nn::Linear` does).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        assert_eq!(
            d_in, self.d_in,
            "QuantLinear: input has {d_in} features, the layer takes {}",
            self.d_in
        );
        let rows = dims[..D - 1].iter().product::<usize>();
        let dtype = x.dtype();
        let x2 = x.reshape([rows, d_in]).cast(FloatDType::F32);
        let y = dequant_matmul(x2, self);
        let mut out = dims;
        out[D - 1] = self.d_out;
        y.reshape(out).cast(dtype)
    }

    /// The dequantized weight `[d_out, d_in]` in f32, by burn tensor ops on the layer's device.
    pub fn dequantize(&self) -> Tensor<2> {
        let device = self.words.device();
        let (bits, per_word) = (self.bits as i64, 32 / self.bits as usize);
        let n_words = self.words.dims()[0];
        let mask = (1i64 << bits) - 1;
        let words = self.words.clone().reshape([n_words, 1]);
        let parts: Vec<Tensor<2, Int>> = (0..per_word)
            .map(|j| {
                let v = words
                    .clone()
                    .bitwise_right_shift_scalar(j as i64 * bits)
                    .bitwise_and_scalar(mask);
                // Two's complement: values with the top bit set are negative.
                let negative = v.clone().greater_equal_elem(1i64 << (bits - 1)).int();
                v - negative * (1i64 << bits)
            })
            .collect();
        let q = Tensor::cat(parts, 1)
            .reshape([self.d_out, self.d_in])
            .cast(FloatDType::F32);
        let groups = self.d_in / self.group;
        let scales = f16_words_to_f32(self.scales.clone(), self.d_out * groups, &device)
            .reshape([self.d_out, groups, 1]);
        (q.reshape([self.d_out, groups, self.group]) * scales).reshape([self.d_out, self.d_in])
    }

    /// Bytes the layer keeps on the device for its weight (integers + scales).
    pub fn weight_bytes(&self) -> usize {
        4 * (self.words.dims()[0] + self.scales.dims()[0])
    }
}

/// Decodes `count` f16 values packed two per `u32` word (low half first) with tensor ops:
/// `(-1)^s · (e > 0 ? 1 + m/1024 : m/1024) · 2^(max(e, 1) − 15)`. Infinities and NaN are never
/// stored (the quantizer and `QuantizedWeight::from_parts` refuse them).
fn f16_words_to_f32(words: Tensor<1, Int>, count: usize, device: &Device) -> Tensor<1> {
    let n = words.dims()[0];
    let w = words.reshape([n, 1]);
    let lo = w.clone().bitwise_and_scalar(0xffff);
    let hi = w.bitwise_right_shift_scalar(16).bitwise_and_scalar(0xffff);
    let h = Tensor::cat(vec![lo, hi], 1)
        .reshape([2 * n])
        .narrow(0, 0, count);
    let sign = h
        .clone()
        .bitwise_right_shift_scalar(15)
        .bitwise_and_scalar(1);
    let exponent = h
        .clone()
        .bitwise_right_shift_scalar(10)
        .bitwise_and_scalar(31);
    let mantissa = h.bitwise_and_scalar(1023).cast(FloatDType::F32) / 1024.0;
    let normal = exponent.clone().greater_elem(0).cast(FloatDType::F32);
    // Exact powers of two by table lookup (exp/powf would round).
    let table: Vec<f32> = (0..32).map(|e| 2f32.powi(e - 15)).collect();
    let pow2 = Tensor::<1>::from_data(TensorData::new(table, [32]), (device, DType::F32))
        .select(0, exponent.clamp_min(1));
    let sign = sign.cast(FloatDType::F32).mul_scalar(-2.0).add_scalar(1.0);
    sign * (normal + mantissa) * pow2
}

/// `x · dequant(W)ᵀ + bias` for `x` `[m, d_in]`: the WGSL kernel on wgpu, the reference
/// elsewhere.
pub fn dequant_matmul(x: Tensor<2>, layer: &QuantLinear) -> Tensor<2> {
    match dequant_matmul_fused(x.clone(), layer) {
        Ok(y) => y,
        Err(_) => dequant_matmul_reference(x, layer),
    }
}

/// The plain-tensor reference: unpack with integer ops, then burn's matmul.
pub fn dequant_matmul_reference(x: Tensor<2>, layer: &QuantLinear) -> Tensor<2> {
    let y = x.matmul(layer.dequantize().transpose());
    match &layer.bias {
        Some(b) => y + b.val().unsqueeze::<2>(),
        None => y,
    }
}

/// The WGSL kernel, or why it cannot run on these tensors.
pub fn dequant_matmul_fused(
    x: Tensor<2>,
    layer: &QuantLinear,
) -> Result<Tensor<2>, QuantKernelError> {
    let variant = if x.dims()[0] <= MATVEC_MAX_ROWS {
        Variant::Matvec
    } else {
        Variant::Dequant
    };
    fused_variant(x, layer, variant)
}

/// Which shader runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// `dequant_matvec.wgsl`, blocks of up to [`MATVEC_MAX_ROWS`] rows.
    Matvec,
    /// `dequant_matmul.wgsl`, 32×32 output tiles.
    Tiled,
    /// `dequant.wgsl` expands the weight to f32, then the backend's matmul: for many rows,
    /// where burn's tuned matmul beats the one-pass tiled kernel (measured on lavapipe).
    Dequant,
}

/// The kernel with an explicit variant (tests and benchmarks compare both on every shape).
pub fn fused_variant(
    x: Tensor<2>,
    layer: &QuantLinear,
    variant: Variant,
) -> Result<Tensor<2>, QuantKernelError> {
    if x.dtype() != DType::F32 {
        return Err(QuantKernelError::UnsupportedDType(x.dtype()));
    }
    for t in [&layer.words, &layer.scales] {
        if t.dtype().size() != 4 {
            return Err(QuantKernelError::UnsupportedDType(t.dtype()));
        }
    }
    let [m, k] = x.dims();
    if k != layer.d_in {
        return Err(QuantKernelError::InputSize {
            expected: layer.d_in,
            got: k,
        });
    }
    check_layout(layer)?;
    if variant == Variant::Dequant {
        let w = dequantize_fused(layer)?;
        let y = x.matmul(w.transpose());
        return Ok(match &layer.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        });
    }
    let x = x
        .try_into_primitive::<Wgpu>()
        .map_err(|_| QuantKernelError::NotWgpu)?;
    let words = layer
        .words
        .clone()
        .try_into_primitive::<Wgpu>()
        .map_err(|_| QuantKernelError::NotWgpu)?;
    let scales = layer
        .scales
        .clone()
        .try_into_primitive::<Wgpu>()
        .map_err(|_| QuantKernelError::NotWgpu)?;
    let bias = match &layer.bias {
        Some(b) => {
            let b = b.val();
            if b.dtype() != DType::F32 {
                return Err(QuantKernelError::UnsupportedDType(b.dtype()));
            }
            Some(
                b.try_into_primitive::<Wgpu>()
                    .map_err(|_| QuantKernelError::NotWgpu)?,
            )
        }
        None => None,
    };
    let shape = Shape2 {
        m,
        n: layer.d_out,
        k,
        group: layer.group,
        bits: layer.bits,
    };
    Ok(Tensor::from_primitive::<Wgpu>(launch(
        x, words, scales, bias, shape, variant,
    )))
}

/// The layer's weight `[d_out, d_in]` in f32, by `shaders/dequant.wgsl`.
pub fn dequantize_fused(layer: &QuantLinear) -> Result<Tensor<2>, QuantKernelError> {
    check_layout(layer)?;
    for t in [&layer.words, &layer.scales] {
        if t.dtype().size() != 4 {
            return Err(QuantKernelError::UnsupportedDType(t.dtype()));
        }
    }
    let words = layer
        .words
        .clone()
        .try_into_primitive::<Wgpu>()
        .map_err(|_| QuantKernelError::NotWgpu)?;
    let scales = layer
        .scales
        .clone()
        .try_into_primitive::<Wgpu>()
        .map_err(|_| QuantKernelError::NotWgpu)?;
    let words = into_contiguous(words);
    let scales = into_contiguous(scales);
    let (n, k) = (layer.d_out, layer.d_in);
    let client = words.client.clone();
    let buffer = client.empty(n * k * DType::F32.size());
    let output = CubeTensor::new_contiguous(
        client.clone(),
        words.device.clone(),
        Shape::new([n, k]),
        buffer,
        DType::F32,
    );
    let info = [n as u32, k as u32, layer.group as u32];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let n_words = n * k / (32 / layer.bits as usize);
    let (gx, gy) = grid(n_words.div_ceil(256));
    client.launch(
        Box::new(SourceKernel::new(
            DequantKernel {
                bits: layer.bits,
                variant: Variant::Dequant,
                rows: 1,
            },
            CubeDim::new_1d(256),
        )),
        CubeCount::Static(gx, gy, 1),
        KernelArguments::new().with_buffers(vec![
            words.handle.binding(),
            scales.handle.binding(),
            output.handle.clone().binding(),
            info.binding(),
        ]),
    );
    Ok(Tensor::from_primitive::<Wgpu>(output))
}

fn check_layout(layer: &QuantLinear) -> Result<(), QuantKernelError> {
    let bad = |why: String| Err(QuantKernelError::Layout(why));
    if layer.bits != 4 && layer.bits != 8 {
        return bad(format!("{} bits: only 8 and 4 are supported", layer.bits));
    }
    if layer.d_in == 0
        || layer.group == 0
        || !layer.group.is_multiple_of(8)
        || !layer.d_in.is_multiple_of(layer.group)
    {
        return bad(format!(
            "group {} does not divide d_in {} in multiples of 8",
            layer.group, layer.d_in
        ));
    }
    let words = layer.d_out * layer.d_in / (32 / layer.bits as usize);
    let scale_words = (layer.d_out * (layer.d_in / layer.group)).div_ceil(2);
    if layer.words.dims()[0] != words || layer.scales.dims()[0] != scale_words {
        return bad(format!(
            "{} weight words and {} scale words for a {}×{} layer (want {words} and {scale_words})",
            layer.words.dims()[0],
            layer.scales.dims()[0],
            layer.d_out,
            layer.d_in
        ));
    }
    if let Some(b) = &layer.bias
        && b.dims()[0] != layer.d_out
    {
        return bad(format!(
            "bias has {} elements, d_out is {}",
            b.dims()[0],
            layer.d_out
        ));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Shape2 {
    m: usize,
    n: usize,
    k: usize,
    group: usize,
    bits: u32,
}

struct DequantKernel {
    bits: u32,
    variant: Variant,
    /// Rows of `x` per workgroup (mat-vec only).
    rows: u32,
}

impl KernelSource for DequantKernel {
    fn source(&self) -> SourceTemplate {
        let text = match self.variant {
            Variant::Matvec => include_str!("../../../shaders/dequant_matvec.wgsl"),
            Variant::Tiled => include_str!("../../../shaders/dequant_matmul.wgsl"),
            Variant::Dequant => include_str!("../../../shaders/dequant.wgsl"),
        };
        SourceTemplate::new(text)
            .register("bits", self.bits.to_string())
            .register("rows", self.rows.to_string())
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.bits, self.variant, self.rows))
    }

    fn lang(&self) -> &'static str {
        "wgsl"
    }
}

/// `blocks` workgroups as a 2-D grid: x up to 65535, the rest spilling into y.
fn grid(blocks: usize) -> (u32, u32) {
    (
        blocks.min(MAX_GRID_X) as u32,
        blocks.div_ceil(MAX_GRID_X) as u32,
    )
}

fn launch(
    x: CubeTensor,
    words: CubeTensor,
    scales: CubeTensor,
    bias: Option<CubeTensor>,
    s: Shape2,
    variant: Variant,
) -> CubeTensor {
    // check_layout guarantees k > 0, so no kernel indexes an empty buffer.
    let x = into_contiguous(x);
    let client = x.client.clone();
    let buffer = client.empty(s.m * s.n * DType::F32.size());
    let output = CubeTensor::new_contiguous(
        client.clone(),
        x.device.clone(),
        Shape::new([s.m, s.n]),
        buffer,
        DType::F32,
    );
    if s.m == 0 || s.n == 0 {
        return output;
    }
    let words = into_contiguous(words);
    let scales = into_contiguous(scales);
    let has_bias = u32::from(bias.is_some());
    let bias = match bias {
        Some(b) => into_contiguous(b).handle.binding(),
        None => client.create_from_slice(&[0u8; 4]).binding(),
    };
    // Variant::Dequant never gets here (fused_variant runs it as dequantize_fused + matmul);
    // it shares the Tiled arms below only to keep the matches total.
    let (blocks, rows, z) = match variant {
        Variant::Matvec => {
            let rows = s.m.min(MATVEC_MAX_ROWS).next_power_of_two();
            (s.n.div_ceil(MATVEC_COLS), rows, s.m.div_ceil(rows))
        }
        Variant::Tiled | Variant::Dequant => (s.n.div_ceil(TILE) * s.m.div_ceil(TILE), 1, 1),
    };
    let info = [
        s.m as u32,
        s.n as u32,
        s.k as u32,
        s.group as u32,
        has_bias,
        match variant {
            Variant::Matvec => blocks as u32,
            Variant::Tiled | Variant::Dequant => s.n.div_ceil(TILE) as u32,
        },
    ];
    let info = client.create_from_slice(bytemuck::cast_slice(&info));
    let (gx, gy) = grid(blocks);
    let cube_dim = match variant {
        Variant::Matvec => CubeDim::new_1d(64),
        Variant::Tiled | Variant::Dequant => CubeDim::new_2d(8, 8),
    };
    client.launch(
        Box::new(SourceKernel::new(
            DequantKernel {
                bits: s.bits,
                variant,
                rows: rows as u32,
            },
            cube_dim,
        )),
        CubeCount::Static(gx, gy, z as u32),
        KernelArguments::new().with_buffers(vec![
            x.handle.binding(),
            words.handle.binding(),
            scales.handle.binding(),
            bias,
            output.handle.clone().binding(),
            info.binding(),
        ]),
    );
    output
}

#[cfg(test)]
#[path = "dequant_matmul_tests.rs"]
mod tests;
