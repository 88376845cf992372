//! `unifusion pack --quantize q8|q4 [--group 32]`: the Linear weights that
//! `unifusion_weights::quant::QUANTIZABLE_LINEARS` lists (the VLM's attention / MLP / `mlp1`
//! projections, the DiT and text-fusion blocks' attention and SwiGLU) are written block-wise
//! quantized: `X.weight` becomes `X.weight.q8` (I8) or `X.weight.q4` (U8, two per byte) plus
//! `X.weight.scales` (F16). Format: `docs/WEIGHTS.md`, "Quantized Linear weights".
//!
//! Runs after the layout renames and the config check, so both see the float names and shapes
//! the model asks for. A listed Linear whose input size is not a multiple of the group stays
//! float and is reported (a real model's widths are multiples of 32; tiny test models' may not
//! be); a non-finite weight is an error naming the tensor.

use clap::ValueEnum;
use unifusion_weights::Dtype;
use unifusion_weights::dtype::convert_float;
use unifusion_weights::quant::{QuantBits, is_quantizable_linear, quantize};

use crate::CliError;

/// Integer width of `--quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Quantize {
    /// int8, one byte per weight.
    Q8,
    /// int4, two weights per byte.
    Q4,
}

/// One tensor to write: name, dtype, shape, bytes.
pub type Out = (String, Dtype, Vec<u64>, Vec<u8>);

/// Quantizes the listed Linears of a pack and counts what it did.
pub struct Quantizer {
    bits: QuantBits,
    group: usize,
    /// Linear weights written quantized.
    pub quantized: usize,
    /// Bytes those weights had in the input.
    pub bytes_in: u64,
    /// Bytes written for them (integers + scales).
    pub bytes_out: u64,
    /// Listed Linears kept float because their input size is not a multiple of the group.
    pub kept_float: Vec<String>,
}

impl Quantizer {
    /// `None` without `--quantize`; an error for a group that is not a positive multiple of 8.
    pub fn new(quantize: Option<Quantize>, group: usize) -> Result<Option<Self>, CliError> {
        let Some(q) = quantize else {
            return Ok(None);
        };
        if group == 0 || !group.is_multiple_of(8) {
            return Err(CliError::Usage(format!(
                "--group {group}: the group must be a positive multiple of 8 (default 32)"
            )));
        }
        Ok(Some(Self {
            bits: match q {
                Quantize::Q8 => QuantBits::Q8,
                Quantize::Q4 => QuantBits::Q4,
            },
            group,
            quantized: 0,
            bytes_in: 0,
            bytes_out: 0,
            kept_float: Vec::new(),
        }))
    }

    /// The two quantized tensors that replace `name`, or `None` when `name` stays as it is.
    pub fn apply(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: &[u8],
    ) -> Result<Option<[Out; 2]>, CliError> {
        if !is_quantizable_linear(name, shape) || !dtype.is_convertible_float() {
            return Ok(None);
        }
        let bad = |why: String| CliError::Usage(format!("tensor `{name}`: {why}"));
        let dims = (usize::try_from(shape[0]), usize::try_from(shape[1]));
        let (Ok(rows), Ok(cols)) = dims else {
            return Err(bad(format!("shape {shape:?} is too large")));
        };
        if !cols.is_multiple_of(self.group) {
            self.kept_float.push(name.to_owned());
            return Ok(None);
        }
        let f32_bytes = convert_float(bytes, dtype, Dtype::F32).ok_or_else(|| {
            bad(format!(
                "{} bytes are not whole {dtype} values",
                bytes.len()
            ))
        })?;
        let values: Vec<f32> = f32_bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let q = quantize(&values, rows, cols, self.bits, self.group)
            .map_err(|e| bad(format!("cannot quantize: {e}")))?;
        self.quantized += 1;
        self.bytes_in += bytes.len() as u64;
        self.bytes_out += q.stored_bytes() as u64;
        let [r, c] = q.data_shape();
        let [sr, sc] = q.scales_shape();
        Ok(Some([
            (
                format!("{name}{}", self.bits.suffix()),
                self.bits.dtype(),
                vec![r as u64, c as u64],
                q.data,
            ),
            (
                format!("{name}.scales"),
                Dtype::F16,
                vec![sr as u64, sc as u64],
                q.scales,
            ),
        ]))
    }

    /// One line for the pack summary.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "quantized {} Linear weights to {} (group {}): {} bytes as given, {} bytes stored",
            self.quantized,
            self.bits.suffix().trim_start_matches('.'),
            self.group,
            self.bytes_in,
            self.bytes_out
        );
        if let Some(first) = self.kept_float.first() {
            line.push_str(&format!(
                "; kept {} float (input size not a multiple of {}, e.g. `{first}`)",
                self.kept_float.len(),
                self.group
            ));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn quantizes_only_listed_linears() {
        let mut q = Quantizer::new(Some(Quantize::Q4), 32)
            .expect("valid")
            .expect("on");
        let w = f32_bytes(&vec![0.5; 4 * 64]);
        let name = "vlm.model.language_model.layers.0.mlp.up_proj.weight";
        let [data, scales] = q
            .apply(name, Dtype::F32, &[4, 64], &w)
            .expect("ok")
            .expect("quantized");
        assert_eq!(data.0, format!("{name}.q4"));
        assert_eq!(
            (data.1, data.2.as_slice(), data.3.len()),
            (Dtype::U8, &[4u64, 32][..], 128)
        );
        assert_eq!(scales.0, format!("{name}.scales"));
        assert_eq!(
            (scales.1, scales.2.as_slice()),
            (Dtype::F16, &[4u64, 2][..])
        );
        // Embeddings, biases, 1-D tensors and integer tensors pass through.
        for (n, shape) in [
            ("vlm.model.language_model.embed_tokens.weight", vec![4, 64]),
            (
                "vlm.model.language_model.layers.0.self_attn.q_proj.bias",
                vec![256],
            ),
        ] {
            assert!(
                q.apply(n, Dtype::F32, &shape, &w).expect("ok").is_none(),
                "{n}"
            );
        }
        assert!(
            q.apply(name, Dtype::I32, &[4, 64], &w)
                .expect("ok")
                .is_none()
        );
        // Input size 48 with group 32: kept float and reported.
        let w48 = f32_bytes(&vec![0.5; 4 * 48]);
        assert!(
            q.apply(name, Dtype::F32, &[4, 48], &w48)
                .expect("ok")
                .is_none()
        );
        assert_eq!(q.kept_float, vec![name.to_owned()]);
        assert_eq!(q.quantized, 1);
        assert!(q.summary().contains("kept 1 float"), "{}", q.summary());
    }

    #[test]
    fn bad_values_and_groups_are_errors() {
        assert!(Quantizer::new(Some(Quantize::Q8), 12).is_err());
        assert!(Quantizer::new(Some(Quantize::Q8), 0).is_err());
        assert!(Quantizer::new(None, 12).expect("off").is_none());
        let mut q = Quantizer::new(Some(Quantize::Q8), 8)
            .expect("valid")
            .expect("on");
        let mut v = vec![0.25f32; 2 * 8];
        v[9] = f32::NAN;
        let name = "transformer.transformer_blocks.0.attn.to_q.weight";
        let err = q
            .apply(name, Dtype::F32, &[2, 8], &f32_bytes(&v))
            .expect_err("NaN");
        let text = err.to_string();
        assert!(text.contains(name) && text.contains("[1, 1]"), "{text}");
        // F16 input is converted first.
        let h = convert_float(&f32_bytes(&[1.0; 16]), Dtype::F32, Dtype::F16).expect("f16");
        let [data, _] = q
            .apply(name, Dtype::F16, &[2, 8], &h)
            .expect("ok")
            .expect("quantized");
        assert!(data.3.iter().all(|&b| b as i8 == 127));
    }
}
