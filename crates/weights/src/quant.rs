//! Block-wise symmetric int8 / int4 quantization of Linear weights (format: `docs/WEIGHTS.md`,
//! "Quantized Linear weights").
//!
//! A PyTorch Linear weight `W` `[out, in]` is cut along the input axis into groups of `group`
//! consecutive elements (default 32). Each group gets one f16 scale `s = absmax / qmax`
//! (`qmax` = 127 for int8, 7 for int4) and integers `q = round(w / s)` in `[-qmax, qmax]`;
//! `dequant(q) = q · s`. The scale is rounded to f16 *before* `q` is computed, so the values a
//! kernel reconstructs are exactly `q · f16(s)`.
//!
//! Stored tensors, for a weight named `X.weight`:
//!
//! | name | dtype | shape | bytes |
//! |---|---|---|---|
//! | `X.weight.q8` | `I8` | `[out, in]` | row-major, one two's-complement byte per weight |
//! | `X.weight.q4` | `U8` | `[out, in/2]` | byte `b` of a row: low nibble = element `2b`, high nibble = element `2b+1`, each a two's-complement 4-bit integer |
//! | `X.weight.scales` | `F16` | `[out, in/group]` | little-endian |
//!
//! Read as little-endian `u32` words, word `w` of a row holds elements `4w..4w+3` (int8) or
//! `8w..8w+7` (int4) in increasing bit order, which is what `shaders/dequant_matmul.wgsl` reads.
//! The group is implied by the shapes (`in / scales.shape[1]`); it must be a multiple of 8 so
//! every row is a whole number of `u32` words and no word straddles two groups.
//!
//! Symmetric absmax rather than asymmetric (scale + zero point): trained Linear weights are
//! close to zero-mean per group, a zero point would cost a second f16 per group and a
//! subtraction per weight in the kernel, and exact zeros stay exactly zero.
//!
//! Pure Rust, no burn: it runs in the packer and in wasm alike.

use half::f16;

/// Default number of input elements per scale.
pub const DEFAULT_GROUP: usize = 32;
/// Name suffix of the f16 scales tensor (after the weight's own name).
pub const SCALES_SUFFIX: &str = ".scales";

/// Integer width of a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// int8, stored as `I8` `[out, in]`.
    Q8,
    /// int4, two per byte, stored as `U8` `[out, in/2]`.
    Q4,
}

impl QuantBits {
    /// Bits per weight.
    pub fn bits(self) -> u32 {
        match self {
            QuantBits::Q8 => 8,
            QuantBits::Q4 => 4,
        }
    }

    /// Largest magnitude of a quantized value (symmetric range `[-qmax, qmax]`).
    pub fn qmax(self) -> i32 {
        match self {
            QuantBits::Q8 => 127,
            QuantBits::Q4 => 7,
        }
    }

    /// The name suffix of the integer tensor: `.q8` or `.q4`.
    pub fn suffix(self) -> &'static str {
        match self {
            QuantBits::Q8 => ".q8",
            QuantBits::Q4 => ".q4",
        }
    }

    /// The safetensors dtype of the integer tensor.
    pub fn dtype(self) -> crate::Dtype {
        match self {
            QuantBits::Q8 => crate::Dtype::I8,
            QuantBits::Q4 => crate::Dtype::U8,
        }
    }

    /// Stored bytes per row of `cols` weights.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            QuantBits::Q8 => cols,
            QuantBits::Q4 => cols / 2,
        }
    }
}

/// Why a weight could not be quantized, or stored quantized tensors do not fit together.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// The group is zero or not a multiple of 8.
    #[error("group size {0} is not a positive multiple of 8 (use --group 32)")]
    BadGroup(usize),
    /// The input dimension is not a whole number of groups.
    #[error("input dimension {cols} is not a multiple of the group size {group}")]
    ColsNotMultipleOfGroup {
        /// The weight's input dimension.
        cols: usize,
        /// The requested group size.
        group: usize,
    },
    /// A weight is NaN or infinite.
    #[error("weight [{row}, {col}] is {value}: cannot quantize a non-finite value")]
    NonFinite {
        /// Output index.
        row: usize,
        /// Input index.
        col: usize,
        /// The value found.
        value: f32,
    },
    /// A group's scale does not fit in f16.
    #[error("row {row}, group {group}: absmax {absmax} needs a scale beyond f16's range")]
    ScaleOverflow {
        /// Output index.
        row: usize,
        /// Group index along the input.
        group: usize,
        /// The group's largest magnitude.
        absmax: f32,
    },
    /// The number of values is not `rows × cols`, or the sizes overflow.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements given.
        got: usize,
    },
    /// Stored tensors whose shapes do not describe one quantized weight.
    #[error("quantized tensor shapes do not fit: {0}")]
    Shape(String),
    /// A stored scale is NaN, infinite or negative.
    #[error("scale [{row}, {group}] is {value}: scales must be finite and ≥ 0")]
    BadScale {
        /// Output index.
        row: usize,
        /// Group index.
        group: usize,
        /// The value found.
        value: f32,
    },
}

/// One quantized Linear weight: the stored bytes plus what they mean.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    /// Integer width.
    pub bits: QuantBits,
    /// Output dimension (`out`, rows of PyTorch's `[out, in]`).
    pub rows: usize,
    /// Input dimension (`in`).
    pub cols: usize,
    /// Input elements per scale.
    pub group: usize,
    /// The integer tensor's bytes (`I8 [out, in]` or `U8 [out, in/2]`).
    pub data: Vec<u8>,
    /// The scales' bytes, little-endian f16 `[out, in/group]`.
    pub scales: Vec<u8>,
}

fn check_group(cols: usize, group: usize) -> Result<(), QuantError> {
    if group == 0 || !group.is_multiple_of(8) {
        return Err(QuantError::BadGroup(group));
    }
    if !cols.is_multiple_of(group) {
        return Err(QuantError::ColsNotMultipleOfGroup { cols, group });
    }
    Ok(())
}

/// Quantizes a row-major `[rows, cols]` f32 weight (PyTorch's Linear `[out, in]`).
///
/// Errors: a group that is not a positive multiple of 8, `cols` not a multiple of it, a NaN or
/// infinite weight, a group whose absmax needs a scale above f16's largest value.
pub fn quantize(
    values: &[f32],
    rows: usize,
    cols: usize,
    bits: QuantBits,
    group: usize,
) -> Result<QuantizedWeight, QuantError> {
    check_group(cols, group)?;
    let expected = rows.checked_mul(cols).ok_or(QuantError::Length {
        what: "weight",
        expected: usize::MAX,
        got: values.len(),
    })?;
    if values.len() != expected {
        return Err(QuantError::Length {
            what: "weight",
            expected,
            got: values.len(),
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            row: i / cols,
            col: i % cols,
            value: values[i],
        });
    }
    let groups = cols / group;
    let qmax = bits.qmax();
    let mut data = Vec::with_capacity(rows * bits.row_bytes(cols));
    let mut scales = Vec::with_capacity(rows * groups * 2);
    let mut q = vec![0i8; cols];
    for (row, w) in values.chunks_exact(cols.max(1)).take(rows).enumerate() {
        for (g, (block, qb)) in w
            .chunks_exact(group)
            .zip(q.chunks_exact_mut(group))
            .enumerate()
        {
            let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = f16::from_f32(absmax / qmax as f32);
            if scale.is_infinite() {
                return Err(QuantError::ScaleOverflow {
                    row,
                    group: g,
                    absmax,
                });
            }
            scales.extend_from_slice(&scale.to_le_bytes());
            let s = scale.to_f32();
            for (v, out) in block.iter().zip(qb.iter_mut()) {
                // A zero (or f16-underflowed) scale means the whole group dequantizes to 0.
                let r = if s > 0.0 { (v / s).round() } else { 0.0 };
                *out = r.clamp(-qmax as f32, qmax as f32) as i8;
            }
        }
        match bits {
            QuantBits::Q8 => data.extend(q.iter().map(|&v| v as u8)),
            QuantBits::Q4 => data.extend(
                q.chunks_exact(2)
                    .map(|p| (p[0] as u8 & 0x0f) | ((p[1] as u8 & 0x0f) << 4)),
            ),
        }
    }
    Ok(QuantizedWeight {
        bits,
        rows,
        cols,
        group,
        data,
        scales,
    })
}

impl QuantizedWeight {
    /// Rebuilds a quantized weight from stored tensors, checking that they fit together:
    /// `data_shape` is `[out, in]` (Q8) or `[out, in/2]` (Q4), `scales_shape` `[out, in/group]`,
    /// byte lengths match the shapes, the implied group is a positive multiple of 8, and every
    /// scale is finite and ≥ 0.
    pub fn from_parts(
        bits: QuantBits,
        data: Vec<u8>,
        data_shape: &[usize],
        scales: Vec<u8>,
        scales_shape: &[usize],
    ) -> Result<Self, QuantError> {
        let (&[rows, stored_cols], &[scale_rows, groups]) = (data_shape, scales_shape) else {
            return Err(QuantError::Shape(format!(
                "expected 2-D data and scales, got {data_shape:?} and {scales_shape:?}"
            )));
        };
        let cols = match bits {
            QuantBits::Q8 => stored_cols,
            QuantBits::Q4 => stored_cols
                .checked_mul(2)
                .ok_or_else(|| QuantError::Shape(format!("{data_shape:?} overflows")))?,
        };
        if scale_rows != rows || groups == 0 || !cols.is_multiple_of(groups) {
            return Err(QuantError::Shape(format!(
                "data {data_shape:?} ({cols} inputs) and scales {scales_shape:?} do not describe \
                 whole groups of the same rows"
            )));
        }
        let group = cols / groups;
        check_group(cols, group)?;
        let data_len = rows.checked_mul(stored_cols);
        if data_len != Some(data.len()) {
            return Err(QuantError::Length {
                what: "quantized data bytes",
                expected: data_len.unwrap_or(usize::MAX),
                got: data.len(),
            });
        }
        let scale_len = rows.checked_mul(groups).and_then(|n| n.checked_mul(2));
        if scale_len != Some(scales.len()) {
            return Err(QuantError::Length {
                what: "scale bytes",
                expected: scale_len.unwrap_or(usize::MAX),
                got: scales.len(),
            });
        }
        for (i, b) in scales.chunks_exact(2).enumerate() {
            let value = f16::from_le_bytes([b[0], b[1]]).to_f32();
            if !value.is_finite() || value < 0.0 {
                return Err(QuantError::BadScale {
                    row: i / groups,
                    group: i % groups,
                    value,
                });
            }
        }
        Ok(Self {
            bits,
            rows,
            cols,
            group,
            data,
            scales,
        })
    }

    /// Number of scales per row.
    pub fn groups(&self) -> usize {
        self.cols / self.group
    }

    /// Shape of the stored integer tensor.
    pub fn data_shape(&self) -> [usize; 2] {
        [self.rows, self.bits.row_bytes(self.cols)]
    }

    /// Shape of the stored scales tensor.
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.rows, self.groups()]
    }

    /// The integer value of weight `[row, col]`.
    pub fn q(&self, row: usize, col: usize) -> i8 {
        match self.bits {
            QuantBits::Q8 => self.data[row * self.cols + col] as i8,
            QuantBits::Q4 => {
                let byte = self.data[row * (self.cols / 2) + col / 2];
                let nibble = if col.is_multiple_of(2) {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                ((nibble << 4) as i8) >> 4 // sign-extend the 4-bit value
            }
        }
    }

    /// The f16 scale of group `g` of `row`, as f32.
    pub fn scale(&self, row: usize, g: usize) -> f32 {
        let i = 2 * (row * self.groups() + g);
        f16::from_le_bytes([self.scales[i], self.scales[i + 1]]).to_f32()
    }

    /// The dequantized weight, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.push(self.q(r, c) as f32 * self.scale(r, c / self.group));
            }
        }
        out
    }

    /// The integer data as little-endian `u32` words (rows are whole words: see the module doc).
    pub fn data_words(&self) -> Vec<u32> {
        le_words(&self.data)
    }

    /// The scales as `u32` words, two f16 per word (element `2i` in the low half), the last
    /// word padded with a zero half when the count is odd. WGSL reads them with
    /// `unpack2x16float`, which needs no `shader-f16` feature.
    pub fn scale_words(&self) -> Vec<u32> {
        le_words(&self.scales)
    }

    /// Bytes stored (integers + scales).
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + self.scales.len()
    }
}

/// Bytes as little-endian `u32` words, zero-padded to a whole word.
fn le_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

/// How a stored tensor name relates to a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantPart<'a> {
    /// `{weight}.q8` / `{weight}.q4`: the integers of `weight`.
    Data(&'a str, QuantBits),
    /// `{weight}.scales`.
    Scales(&'a str),
}

/// Splits a stored name into the weight it belongs to and its part, or `None` for a plain
/// tensor. `"a.b.weight.q4"` → `Data("a.b.weight", Q4)`.
pub fn parse_name(name: &str) -> Option<QuantPart<'_>> {
    if let Some(w) = name.strip_suffix(".q8") {
        return Some(QuantPart::Data(w, QuantBits::Q8));
    }
    if let Some(w) = name.strip_suffix(".q4") {
        return Some(QuantPart::Data(w, QuantBits::Q4));
    }
    name.strip_suffix(SCALES_SUFFIX).map(QuantPart::Scales)
}

/// The number of weights a stored tensor stands for: a `.q4` tensor holds two per byte, a
/// `.scales` tensor none; any other tensor its element count. For parameter counts.
pub fn logical_parameters(name: &str, elements: u64) -> u64 {
    match parse_name(name) {
        Some(QuantPart::Data(_, QuantBits::Q4)) => elements.saturating_mul(2),
        Some(QuantPart::Scales(_)) => 0,
        _ => elements,
    }
}

/// Linear layers a packer quantizes, by the end of the manifest name's weight (`….weight`),
/// per component. The model builds exactly these Linears as float-or-quantized; everything
/// else (embeddings, `lm_head`, norms, biases, convolutions, the VAE, `img_in`, the timestep
/// and modulation projections, `txt_in`, the final layer, the layer-pooling projector) stays
/// float: small, or where the error would reach every token.
pub const QUANTIZABLE_LINEARS: [(&str, &[&str]); 2] = [
    (
        "vlm.",
        &[
            // Qwen2 decoder layers.
            ".self_attn.q_proj",
            ".self_attn.k_proj",
            ".self_attn.v_proj",
            ".self_attn.o_proj",
            ".mlp.gate_proj",
            ".mlp.up_proj",
            ".mlp.down_proj",
            // InternViT layers (transformers names; OpenGVLab's `attn.proj`, `mlp.fc1/2`).
            ".attention.q_proj",
            ".attention.k_proj",
            ".attention.v_proj",
            ".attention.projection_layer",
            ".attn.proj",
            ".mlp.fc1",
            ".mlp.fc2",
            // mlp1 (transformers' multi_modal_projector; OpenGVLab's mlp1.1 / mlp1.3).
            "multi_modal_projector.linear_1",
            "multi_modal_projector.linear_2",
            "mlp1.1",
            "mlp1.3",
        ],
    ),
    (
        "transformer.",
        &[
            // DiT blocks and text-fusion (layer-wise and refiner) blocks.
            ".attn.to_q",
            ".attn.to_k",
            ".attn.to_v",
            ".attn.to_gate",
            ".attn.to_out.0",
            ".ff.gate",
            ".ff.up",
            ".ff.down",
        ],
    ),
];

/// Whether the manifest tensor `name` of `shape` is a Linear weight a packer quantizes (see
/// [`QUANTIZABLE_LINEARS`]): the right component and layer, `….weight`, 2-D.
pub fn is_quantizable_linear(name: &str, shape: &[u64]) -> bool {
    let Some(layer) = name.strip_suffix(".weight") else {
        return false;
    };
    shape.len() == 2
        && QUANTIZABLE_LINEARS.iter().any(|(component, layers)| {
            name.starts_with(component) && layers.iter().any(|l| layer.ends_with(l))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1] with varied magnitudes per group.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s as f32 / u32::MAX as f32) * 2.0 - 1.0;
                u * (1.0 + (i % 7) as f32)
            })
            .collect()
    }

    fn max_group_error(w: &[f32], q: &QuantizedWeight) -> f32 {
        let d = q.dequantize();
        let mut worst = 0f32;
        for r in 0..q.rows {
            for g in 0..q.groups() {
                let s = q.scale(r, g);
                for c in g * q.group..(g + 1) * q.group {
                    let i = r * q.cols + c;
                    // Error in units of the group's scale: at most 1/2 (+ f16 rounding slack).
                    worst = worst.max((d[i] - w[i]).abs() / s.max(f32::MIN_POSITIVE));
                }
            }
        }
        worst
    }

    #[test]
    fn round_trip_error_is_half_a_step() {
        for bits in [QuantBits::Q8, QuantBits::Q4] {
            for group in [8, 32, 64] {
                let (rows, cols) = (5, 128);
                let w = values(rows * cols, 3);
                let q = quantize(&w, rows, cols, bits, group).expect("quantize");
                assert_eq!(q.data.len(), rows * bits.row_bytes(cols));
                assert_eq!(q.scales.len(), rows * (cols / group) * 2);
                let worst = max_group_error(&w, &q);
                assert!(worst <= 0.5 + 1e-3, "{bits:?} g{group}: {worst} steps");
                // The group's absmax maps to ±qmax, so the full range is used.
                let used = (0..cols).map(|c| q.q(0, c).unsigned_abs()).max();
                assert_eq!(used, Some(bits.qmax() as u8), "{bits:?} g{group}");
            }
        }
    }

    #[test]
    fn q8_relative_error_is_small_and_q4_larger() {
        let (rows, cols) = (16, 256);
        let w = values(rows * cols, 11);
        let rel = |bits| {
            let d = quantize(&w, rows, cols, bits, 32)
                .expect("quantize")
                .dequantize();
            let num: f64 = w
                .iter()
                .zip(&d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        let (e8, e4) = (rel(QuantBits::Q8), rel(QuantBits::Q4));
        assert!(e8 < 0.01, "q8 rel L2 {e8}");
        assert!(e4 < 0.15 && e4 > 5.0 * e8, "q4 rel L2 {e4} (q8 {e8})");
    }

    #[test]
    fn nibble_and_byte_layout_is_the_documented_one() {
        // Row of 8 values: q = [-7..=7 pattern] with absmax 7 so the scale is exactly 1.
        let w = [1.0f32, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, 0.0];
        let q4 = quantize(&w, 1, 8, QuantBits::Q4, 8).expect("q4");
        assert_eq!(q4.scale(0, 0), 1.0);
        // low nibble = element 0 (1), high = element 1 (-2 = 0xE) -> 0xE1, ...
        assert_eq!(q4.data, vec![0xE1, 0xC3, 0xA5, 0x07]);
        assert_eq!(q4.data_words(), vec![0x07A5_C3E1]);
        assert_eq!(q4.dequantize(), w.to_vec());
        let q8 = quantize(&w, 1, 8, QuantBits::Q8, 8).expect("q8");
        assert_eq!(q8.data[6], 127);
        assert_eq!(q8.data[1], (-36i8) as u8); // two's complement byte; -2 / f16(7/127) = -36.3
        assert_eq!(q8.q(0, 6), 127);
        assert_eq!(q8.q(0, 3), -73); // -4 / (7/127) = -72.57 -> -73
        // Scales: two f16 per word, element 0 low.
        let two = quantize(&[1.0; 16], 1, 16, QuantBits::Q8, 8).expect("q8");
        let half_bits = f16::from_f32(1.0 / 127.0).to_bits() as u32;
        assert_eq!(two.scale_words(), vec![half_bits | (half_bits << 16)]);
    }

    #[test]
    fn zero_rows_and_empty_weights() {
        let mut w = values(3 * 32, 5);
        w[32..64].fill(0.0);
        for bits in [QuantBits::Q8, QuantBits::Q4] {
            let q = quantize(&w, 3, 32, bits, 32).expect("quantize");
            assert_eq!(q.scale(1, 0), 0.0);
            assert!(q.dequantize()[32..64].iter().all(|&v| v == 0.0));
            let empty = quantize(&[], 0, 64, bits, 32).expect("no rows");
            assert!(empty.data.is_empty() && empty.scales.is_empty());
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let w = values(2 * 48, 1);
        assert_eq!(
            quantize(&w, 2, 48, QuantBits::Q4, 32),
            Err(QuantError::ColsNotMultipleOfGroup {
                cols: 48,
                group: 32
            })
        );
        assert_eq!(
            quantize(&w, 2, 48, QuantBits::Q8, 12),
            Err(QuantError::BadGroup(12))
        );
        assert_eq!(
            quantize(&w, 2, 48, QuantBits::Q8, 0),
            Err(QuantError::BadGroup(0))
        );
        let mut bad = w.clone();
        bad[50] = f32::NAN;
        let err = quantize(&bad, 2, 48, QuantBits::Q8, 16).expect_err("NaN");
        assert!(
            matches!(err, QuantError::NonFinite { row: 1, col: 2, .. }),
            "{err}"
        );
        bad[50] = f32::NEG_INFINITY;
        assert!(err.to_string().contains("[1, 2]"), "{err}");
        assert!(matches!(
            quantize(&bad, 2, 48, QuantBits::Q4, 16),
            Err(QuantError::NonFinite { row: 1, col: 2, .. })
        ));
        let mut huge = w.clone();
        huge[3] = 1e10;
        assert!(matches!(
            quantize(&huge, 2, 48, QuantBits::Q8, 16),
            Err(QuantError::ScaleOverflow {
                row: 0,
                group: 0,
                ..
            })
        ));
        assert!(matches!(
            quantize(&w, 3, 48, QuantBits::Q8, 16),
            Err(QuantError::Length { .. })
        ));
        assert!(quantize(&[], usize::MAX, 16, QuantBits::Q8, 16).is_err());
    }

    #[test]
    fn from_parts_checks_the_stored_tensors() {
        let w = values(4 * 64, 9);
        for bits in [QuantBits::Q8, QuantBits::Q4] {
            let q = quantize(&w, 4, 64, bits, 32).expect("quantize");
            let back = QuantizedWeight::from_parts(
                bits,
                q.data.clone(),
                &q.data_shape(),
                q.scales.clone(),
                &q.scales_shape(),
            )
            .expect("round trip");
            assert_eq!(back, q);
            let cols = bits.row_bytes(64);
            // Wrong scale rows; a group that is not a multiple of 8; short bytes; NaN scale.
            assert!(
                QuantizedWeight::from_parts(
                    bits,
                    q.data.clone(),
                    &[4, cols],
                    q.scales.clone(),
                    &[2, 4]
                )
                .is_err()
            );
            assert!(matches!(
                QuantizedWeight::from_parts(
                    bits,
                    q.data.clone(),
                    &[4, cols],
                    vec![0; 4 * 16 * 2],
                    &[4, 16]
                ),
                Err(QuantError::BadGroup(4))
            ));
            assert!(matches!(
                QuantizedWeight::from_parts(
                    bits,
                    q.data[1..].to_vec(),
                    &[4, cols],
                    q.scales.clone(),
                    &[4, 2]
                ),
                Err(QuantError::Length { .. })
            ));
            let mut nan = q.scales.clone();
            nan[2..4].copy_from_slice(&f16::NAN.to_le_bytes());
            assert!(matches!(
                QuantizedWeight::from_parts(bits, q.data.clone(), &[4, cols], nan, &[4, 2]),
                Err(QuantError::BadScale {
                    row: 0,
                    group: 1,
                    ..
                })
            ));
            assert!(
                QuantizedWeight::from_parts(bits, q.data.clone(), &[4, cols, 1], q.scales, &[4, 2])
                    .is_err()
            );
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            parse_name("vlm.text.layers.0.mlp.up_proj.weight.q4"),
            Some(QuantPart::Data(
                "vlm.text.layers.0.mlp.up_proj.weight",
                QuantBits::Q4
            ))
        );
        assert_eq!(
            parse_name("a.weight.scales"),
            Some(QuantPart::Scales("a.weight"))
        );
        assert_eq!(parse_name("a.weight"), None);
        assert_eq!(logical_parameters("a.weight.q4", 10), 20);
        assert_eq!(logical_parameters("a.weight.q8", 10), 10);
        assert_eq!(logical_parameters("a.weight.scales", 10), 0);
    }

    #[test]
    fn which_linears_are_quantized() {
        let yes = [
            "vlm.model.language_model.layers.3.self_attn.q_proj.weight",
            "vlm.model.language_model.layers.0.mlp.down_proj.weight",
            "vlm.model.vision_tower.encoder.layer.1.attention.projection_layer.weight",
            "vlm.model.vision_tower.encoder.layer.1.mlp.fc2.weight",
            "vlm.model.multi_modal_projector.linear_1.weight",
            "transformer.transformer_blocks.0.attn.to_out.0.weight",
            "transformer.text_fusion.refiner_blocks.1.ff.up.weight",
        ];
        for name in yes {
            assert!(is_quantizable_linear(name, &[64, 32]), "{name}");
            assert!(!is_quantizable_linear(name, &[64]), "{name} 1-D");
        }
        let no = [
            "vlm.model.language_model.layers.3.self_attn.q_proj.bias",
            "vlm.model.language_model.embed_tokens.weight",
            "vlm.lm_head.weight",
            "vlm.model.language_model.layers.0.input_layernorm.weight",
            "vlm.model.vision_tower.embeddings.patch_embeddings.projection.weight",
            "vlm.model.multi_modal_projector.layer_norm.weight",
            "transformer.img_in.weight",
            "transformer.time_mod_proj.weight",
            "transformer.txt_in.linear_1.weight",
            "transformer.final_layer.linear.weight",
            "transformer.text_fusion.projector.weight",
            "transformer.transformer_blocks.0.scale_shift_table",
            "transformer.transformer_blocks.0.attn.norm_q.weight",
            "vae.decoder.mid_block.attentions.0.to_q.weight",
            "transformer_blocks.0.attn.to_q.weight",
        ];
        for name in no {
            assert!(!is_quantizable_linear(name, &[64, 32]), "{name}");
        }
    }
}
