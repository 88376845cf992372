//! A strict safetensors header parser and the matching header writer.
//!
//! Format (<https://github.com/huggingface/safetensors>): an 8-byte little-endian header length
//! `n`, `n` bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
//! {..}}`, then the data region. Every size read from the file is checked against the bytes
//! actually present before anything is allocated or indexed with it; offsets must tile the data
//! region exactly (no gap, no overlap).

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::dtype::{Dtype, byte_size};
use crate::manifest::{MAX_NAME_BYTES, MAX_RANK};

/// Largest JSON header accepted (the safetensors crate's limit).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a safetensors file was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeaderError {
    #[error("{len} bytes is too short for a safetensors file (needs at least 8)")]
    TooShort { len: u64 },
    #[error("header length {0} exceeds the {MAX_HEADER_BYTES}-byte limit")]
    HeaderTooLarge(u64),
    #[error(
        "header length {header_len} runs past the end of the file ({available} bytes follow the length)"
    )]
    HeaderPastEnd { header_len: u64, available: u64 },
    #[error("header is not valid UTF-8 JSON: {0}")]
    Json(String),
    #[error("tensor name `{0}` is empty or longer than {MAX_NAME_BYTES} bytes")]
    BadName(String),
    #[error("tensor `{0}` appears twice in the header")]
    DuplicateTensor(String),
    #[error("tensor `{tensor}`: dtype `{dtype}` is not supported")]
    UnknownDtype { tensor: String, dtype: String },
    #[error("tensor `{tensor}`: rank {rank} exceeds {MAX_RANK}")]
    RankTooLarge { tensor: String, rank: usize },
    #[error("tensor `{tensor}`: shape {shape:?} × {dtype} overflows")]
    ShapeOverflow {
        tensor: String,
        dtype: Dtype,
        shape: Vec<u64>,
    },
    #[error("tensor `{tensor}`: data_offsets [{begin}, {end}] are reversed")]
    ReversedOffsets {
        tensor: String,
        begin: u64,
        end: u64,
    },
    #[error(
        "tensor `{tensor}`: data ends at {end}, past the {data_len}-byte data region (file truncated?)"
    )]
    PastEnd {
        tensor: String,
        end: u64,
        data_len: u64,
    },
    #[error(
        "tensor `{tensor}`: {actual} data bytes, but shape {shape:?} × {dtype} needs {expected}"
    )]
    SizeMismatch {
        tensor: String,
        dtype: Dtype,
        shape: Vec<u64>,
        expected: u64,
        actual: u64,
    },
    #[error(
        "tensor `{tensor}` starts at byte {begin}, but the previous tensor ends at {expected} (gap or overlap)"
    )]
    NotContiguous {
        tensor: String,
        begin: u64,
        expected: u64,
    },
    #[error("{unused} bytes of the data region after the last tensor belong to no tensor")]
    TrailingBytes { unused: u64 },
}

/// One tensor of a parsed header. Offsets are relative to the start of the data region.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

/// A parsed, checked safetensors header.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHeader {
    /// Tensors sorted by offset.
    pub tensors: Vec<HeaderTensor>,
    /// Where the data region starts in the file: `8 + header length`.
    pub data_start: u64,
}

impl ShardHeader {
    /// Parses the header of a whole safetensors file held in memory.
    pub fn parse(file: &[u8]) -> Result<ShardHeader, HeaderError> {
        let total = file.len() as u64;
        let prefix: [u8; 8] = file
            .get(..8)
            .and_then(|p| p.try_into().ok())
            .ok_or(HeaderError::TooShort { len: total })?;
        let header_len = header_len(prefix, total)?;
        // `header_len` <= total - 8 was checked, so this range is inside `file`.
        let end = 8 + header_len;
        let json = file.get(8..end).ok_or(HeaderError::HeaderPastEnd {
            header_len: header_len as u64,
            available: total - 8,
        })?;
        ShardHeader::parse_json(json, total - 8 - header_len as u64)
    }

    /// Parses the JSON header given the size of the data region that follows it.
    pub fn parse_json(json: &[u8], data_len: u64) -> Result<ShardHeader, HeaderError> {
        let text = std::str::from_utf8(json).map_err(|e| HeaderError::Json(e.to_string()))?;
        let Entries(entries) =
            serde_json::from_str(text).map_err(|e| HeaderError::Json(e.to_string()))?;
        let mut seen = HashSet::with_capacity(entries.len());
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, raw) in entries {
            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(HeaderError::BadName(name.chars().take(80).collect()));
            }
            if !seen.insert(name.clone()) {
                return Err(HeaderError::DuplicateTensor(name));
            }
            let dtype = Dtype::parse(&raw.dtype).ok_or_else(|| HeaderError::UnknownDtype {
                tensor: name.clone(),
                dtype: raw.dtype.chars().take(40).collect(),
            })?;
            if raw.shape.len() > MAX_RANK {
                return Err(HeaderError::RankTooLarge {
                    tensor: name,
                    rank: raw.shape.len(),
                });
            }
            let [begin, end] = raw.data_offsets;
            if end < begin {
                return Err(HeaderError::ReversedOffsets {
                    tensor: name,
                    begin,
                    end,
                });
            }
            if end > data_len {
                return Err(HeaderError::PastEnd {
                    tensor: name,
                    end,
                    data_len,
                });
            }
            let Some(expected) = byte_size(dtype, &raw.shape) else {
                return Err(HeaderError::ShapeOverflow {
                    tensor: name,
                    dtype,
                    shape: raw.shape,
                });
            };
            if expected != end - begin {
                return Err(HeaderError::SizeMismatch {
                    tensor: name,
                    dtype,
                    shape: raw.shape,
                    expected,
                    actual: end - begin,
                });
            }
            tensors.push(HeaderTensor {
                name,
                dtype,
                shape: raw.shape,
                begin,
                end,
            });
        }
        tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
        let mut cursor = 0u64;
        for t in &tensors {
            if t.begin != cursor {
                return Err(HeaderError::NotContiguous {
                    tensor: t.name.clone(),
                    begin: t.begin,
                    expected: cursor,
                });
            }
            cursor = t.end;
        }
        if cursor != data_len {
            return Err(HeaderError::TrailingBytes {
                unused: data_len - cursor,
            });
        }
        Ok(ShardHeader {
            tensors,
            data_start: 8 + json.len() as u64,
        })
    }
}

/// Reads the header length from the 8-byte prefix of a file of `total` bytes, checked against
/// the limit and against the bytes that follow.
pub fn header_len(prefix: [u8; 8], total: u64) -> Result<usize, HeaderError> {
    if total < 8 {
        return Err(HeaderError::TooShort { len: total });
    }
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_BYTES {
        return Err(HeaderError::HeaderTooLarge(n));
    }
    if n > total - 8 {
        return Err(HeaderError::HeaderPastEnd {
            header_len: n,
            available: total - 8,
        });
    }
    usize::try_from(n).map_err(|_| HeaderError::HeaderTooLarge(n))
}

/// Writes the 8-byte length and the JSON header for `tensors` laid out back to back in the
/// given order, padded with spaces so the data region starts 8-byte aligned.
pub fn write_header(tensors: &[(&str, Dtype, &[u64])]) -> Vec<u8> {
    let mut json = String::from("{");
    let mut offset = 0u64;
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let size = byte_size(*dtype, shape).unwrap_or(0);
        if i > 0 {
            json.push(',');
        }
        json.push_str(&entry_json(name, *dtype, shape, offset, offset + size));
        offset += size;
    }
    json.push('}');
    finish_header(json)
}

/// One header entry: `"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]}`.
pub(crate) fn entry_json(name: &str, dtype: Dtype, shape: &[u64], begin: u64, end: u64) -> String {
    // Serialising a `&str` to JSON cannot fail.
    let name = serde_json::to_string(name).unwrap_or_default();
    let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!(
        "{name}:{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{begin},{end}]}}",
        shape.join(",")
    )
}

/// Pads `json` with spaces to a multiple of 8 and prefixes its length.
pub(crate) fn finish_header(mut json: String) -> Vec<u8> {
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out
}

/// Size of the header (prefix + padded JSON) for entries whose JSON adds up to `entries_len`
/// bytes (commas between `count` entries and the braces included here).
pub(crate) fn header_size(entries_len: usize, count: usize) -> u64 {
    let json = entries_len + count.saturating_sub(1) + 2;
    8 + json.next_multiple_of(8) as u64
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's entries in file order, keeping duplicates so they can be reported.
struct Entries(Vec<(String, RawTensor)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        let _: std::collections::BTreeMap<String, String> = map
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("`__metadata__`: {e}")))?;
                    } else {
                        let value: RawTensor = map
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("tensor `{key}`: {e}")))?;
                        out.push((key, value));
                    }
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    #[test]
    fn written_headers_parse_back_and_satisfy_the_reference_parser() {
        let shape_a: &[u64] = &[2, 3];
        let shape_b: &[u64] = &[];
        let mut f = write_header(&[("a.w", Dtype::F32, shape_a), ("b", Dtype::F16, shape_b)]);
        assert_eq!((f.len() - 8) % 8, 0);
        f.resize(f.len() + 26, 7);
        let h = ShardHeader::parse(&f).expect("valid");
        assert_eq!(h.tensors.len(), 2);
        assert_eq!((h.tensors[1].begin, h.tensors[1].end), (24, 26));
        let st = safetensors::SafeTensors::deserialize(&f).expect("safetensors accepts it");
        assert_eq!(st.tensor("a.w").expect("a.w").shape(), &[2, 3]);
    }

    #[test]
    fn rejects_malformed_headers() {
        let err = |json: &str, data: usize| ShardHeader::parse(&file(json, data)).expect_err(json);
        assert!(matches!(err("{", 0), HeaderError::Json(_)));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#,
                1
            ),
            HeaderError::UnknownDtype { .. }
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4
            ),
            HeaderError::PastEnd { .. }
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4
            ),
            HeaderError::SizeMismatch { expected: 8, .. }
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6
            ),
            HeaderError::NotContiguous { .. }
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2
            ),
            HeaderError::DuplicateTensor(_)
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,1]}}"#,
                1
            ),
            HeaderError::ShapeOverflow { .. }
        ));
        assert!(matches!(
            err(
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                3
            ),
            HeaderError::TrailingBytes { unused: 2 }
        ));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            ShardHeader::parse(&huge),
            Err(HeaderError::HeaderTooLarge(_))
        ));
        let mut past = 50u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(matches!(
            ShardHeader::parse(&past),
            Err(HeaderError::HeaderPastEnd { .. })
        ));
        assert!(matches!(
            ShardHeader::parse(&[1, 2]),
            Err(HeaderError::TooShort { len: 2 })
        ));
        // Metadata is accepted and ignored.
        let ok = ShardHeader::parse(&file(r#"{"__metadata__":{"format":"pt"}}"#, 0));
        assert_eq!(ok.map(|h| h.tensors.len()), Ok(0));
    }

    #[test]
    fn header_size_matches_written_header() {
        let entries = [
            entry_json("x", Dtype::F32, &[3], 0, 12),
            entry_json("y\"q", Dtype::BF16, &[1, 2], 12, 16),
        ];
        let len: usize = entries.iter().map(String::len).sum();
        let shape_x: &[u64] = &[3];
        let shape_y: &[u64] = &[1, 2];
        let written = write_header(&[("x", Dtype::F32, shape_x), ("y\"q", Dtype::BF16, shape_y)]);
        assert_eq!(header_size(len, 2), written.len() as u64);
    }
}
