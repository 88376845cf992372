//! Tensor element types, spelled as safetensors spells them, and float conversions between them.

use std::fmt;

use half::{bf16, f16};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A tensor element type; the names are safetensors' dtype strings (`"F16"`, `"BF16"`, ...).
///
/// Sub-byte types (`F4`, `F6_*`) are not supported: a shard that uses them is rejected with a
/// clear error instead of being misread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl Dtype {
    /// Every supported dtype.
    pub const ALL: [Dtype; 15] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U64,
        Dtype::U32,
        Dtype::U16,
        Dtype::U8,
        Dtype::Bool,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
    ];

    /// The safetensors name of this dtype.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U64 => "U64",
            Dtype::U32 => "U32",
            Dtype::U16 => "U16",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this crate does not support.
    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
        }
    }

    /// True for the float types this crate converts between (F64, F32, F16, BF16).
    pub fn is_convertible_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Dtype {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Dtype::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype `{name}`")))
    }
}

/// Number of elements of `shape`, `None` on `u64` overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Byte size of a tensor of `shape` and `dtype`, `None` on `u64` overflow.
pub fn byte_size(dtype: Dtype, shape: &[u64]) -> Option<u64> {
    element_count(shape)?.checked_mul(dtype.size())
}

/// Converts little-endian float bytes between F64, F32, F16 and BF16 (round to nearest even).
///
/// Returns `None` when either dtype is not one of those four or `bytes` is not a whole number
/// of elements. Works on unaligned input (shard bytes carry no alignment guarantee).
pub fn convert_float(bytes: &[u8], from: Dtype, to: Dtype) -> Option<Vec<u8>> {
    if !from.is_convertible_float() || !to.is_convertible_float() {
        return None;
    }
    let width = usize::try_from(from.size()).ok()?;
    if !bytes.len().is_multiple_of(width) {
        return None;
    }
    if from == to {
        return Some(bytes.to_vec());
    }
    let n = bytes.len() / width;
    let out_width = usize::try_from(to.size()).ok()?;
    let mut out = Vec::with_capacity(n * out_width);
    // f64 -> f16 goes through f64 directly (half rounds from f64), the rest through f32,
    // which holds F16 and BF16 exactly.
    for chunk in bytes.chunks_exact(width) {
        match to {
            Dtype::F64 => out.extend_from_slice(&read_f64(chunk, from).to_le_bytes()),
            Dtype::F32 => out.extend_from_slice(&(read_f64(chunk, from) as f32).to_le_bytes()),
            Dtype::F16 => {
                out.extend_from_slice(&f16::from_f64(read_f64(chunk, from)).to_le_bytes())
            }
            Dtype::BF16 => {
                out.extend_from_slice(&bf16::from_f64(read_f64(chunk, from)).to_le_bytes())
            }
            _ => return None,
        }
    }
    Some(out)
}

fn read_f64(chunk: &[u8], dtype: Dtype) -> f64 {
    let mut b = [0u8; 8];
    b[..chunk.len()].copy_from_slice(chunk);
    match dtype {
        Dtype::F64 => f64::from_le_bytes(b),
        Dtype::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
        _ => f64::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::parse(d.as_str()), Some(d));
        }
        assert_eq!(Dtype::parse("F4"), None);
        assert_eq!(Dtype::parse("f32"), None);
    }

    #[test]
    fn float_conversions_round() {
        let xs = [1.0f32, -2.5, 0.1, 65504.0, 1e-8];
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let h = convert_float(&bytes, Dtype::F32, Dtype::F16).expect("f32 -> f16");
        assert_eq!(h.len(), 10);
        let back = convert_float(&h, Dtype::F16, Dtype::F32).expect("f16 -> f32");
        let back: Vec<f32> = back
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], -2.5);
        assert!((back[2] - 0.1).abs() < 1e-4);
        assert_eq!(back[3], 65504.0);
        assert_eq!(back[4], 0.0, "1e-8 underflows f16 to zero");
        let b = convert_float(&bytes, Dtype::F32, Dtype::BF16).expect("f32 -> bf16");
        assert_eq!(&b[0..2], &bf16::from_f32(1.0).to_le_bytes());
        assert!(convert_float(&bytes[..5], Dtype::F32, Dtype::F16).is_none());
        assert!(convert_float(&bytes, Dtype::I32, Dtype::F16).is_none());
    }

    #[test]
    fn overflowing_shapes_are_none() {
        assert_eq!(byte_size(Dtype::F32, &[2, 3]), Some(24));
        assert_eq!(byte_size(Dtype::F32, &[]), Some(4));
        assert_eq!(byte_size(Dtype::F32, &[u64::MAX, 2]), None);
        assert_eq!(byte_size(Dtype::F64, &[1 << 62]), None);
    }
}
