//! Packing named tensors into content-addressed shards and a manifest.
//!
//! The packer holds at most one shard in memory. Finished shards go to a [`PackOutput`] as
//! soon as they fill; the manifest goes last, so an interrupted pack leaves orphan shards at
//! worst, never a manifest that names a missing shard (the native output also writes each file
//! atomically: temp file, fsync, rename).

use std::collections::HashSet;

use crate::dtype::{Dtype, byte_size};
use crate::manifest::{
    FileEntry, MAX_NAME_BYTES, MAX_RANK, MAX_SHARD_BYTES, Manifest, ManifestError, ModelInfo,
    ShardEntry, TensorEntry, sha256_hex,
};
use crate::safetensors_header::{entry_json, finish_header, header_size};

/// Default shard size limit: 64 MiB.
pub const DEFAULT_SHARD_BYTES: u64 = 64 << 20;

/// Where packed files go.
pub trait PackOutput {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Writes a content-addressed file (a shard or the tokenizer) completely or not at all.
    fn write_blob(&mut self, file: &str, bytes: &[u8]) -> Result<(), Self::Error>;
    /// Writes `manifest.json` completely or not at all. Called once, after every blob.
    fn write_manifest(&mut self, json: &[u8]) -> Result<(), Self::Error>;
}

/// Why packing failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("tensor `{0}` was added twice")]
    DuplicateTensor(String),
    #[error("tensor name `{0}` is empty or longer than {MAX_NAME_BYTES} bytes")]
    BadName(String),
    #[error("tensor `{name}`: rank {rank} exceeds {MAX_RANK}")]
    RankTooLarge { name: String, rank: usize },
    #[error("tensor `{name}`: {actual} bytes given, shape {shape:?} × {dtype} needs {expected:?}")]
    SizeMismatch {
        name: String,
        dtype: Dtype,
        shape: Vec<u64>,
        expected: Option<u64>,
        actual: u64,
    },
    #[error(
        "tensor `{name}` alone makes a {bytes}-byte shard, over the {MAX_SHARD_BYTES}-byte limit"
    )]
    TensorTooLarge { name: String, bytes: u64 },
    #[error("shard size limit {0} is too small (at least 1 KiB)")]
    ShardLimit(u64),
    #[error("writing `{file}`: {source}")]
    Output {
        file: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the packed manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
}

/// Packs tensors into shards of at most `shard_bytes` (a larger tensor gets its own shard).
pub struct Packer<O: PackOutput> {
    out: O,
    shard_bytes: u64,
    names: HashSet<String>,
    shards: Vec<ShardEntry>,
    /// The shard being filled: its entries' JSON, their manifest entries, and the data.
    entries_json: Vec<String>,
    entries_len: usize,
    tensors: Vec<TensorEntry>,
    data: Vec<u8>,
}

impl<O: PackOutput> Packer<O> {
    /// A packer writing to `out`, closing shards at `shard_bytes` (file size, header included).
    pub fn new(out: O, shard_bytes: u64) -> Result<Packer<O>, PackError> {
        if shard_bytes < 1024 {
            return Err(PackError::ShardLimit(shard_bytes));
        }
        Ok(Packer {
            out,
            shard_bytes: shard_bytes.min(MAX_SHARD_BYTES),
            names: HashSet::new(),
            shards: Vec::new(),
            entries_json: Vec::new(),
            entries_len: 0,
            tensors: Vec::new(),
            data: Vec::new(),
        })
    }

    /// Adds one tensor (little-endian `bytes`). Tensors keep the order they are added in.
    pub fn add(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[u64],
        bytes: &[u8],
    ) -> Result<(), PackError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(PackError::BadName(name.chars().take(80).collect()));
        }
        if shape.len() > MAX_RANK {
            return Err(PackError::RankTooLarge {
                name: name.to_owned(),
                rank: shape.len(),
            });
        }
        let size = bytes.len() as u64;
        let expected = byte_size(dtype, shape);
        if expected != Some(size) {
            return Err(PackError::SizeMismatch {
                name: name.to_owned(),
                dtype,
                shape: shape.to_vec(),
                expected,
                actual: size,
            });
        }
        if self.names.contains(name) {
            return Err(PackError::DuplicateTensor(name.to_owned()));
        }
        let offset = self.data.len() as u64;
        let entry = entry_json(name, dtype, shape, offset, offset + size);
        let grown =
            header_size(self.entries_len + entry.len(), self.tensors.len() + 1) + offset + size;
        if !self.tensors.is_empty() && grown > self.shard_bytes {
            self.flush()?;
            return self.add(name, dtype, shape, bytes);
        }
        if grown > MAX_SHARD_BYTES {
            return Err(PackError::TensorTooLarge {
                name: name.to_owned(),
                bytes: grown,
            });
        }
        self.names.insert(name.to_owned());
        self.entries_len += entry.len();
        self.entries_json.push(entry);
        self.tensors.push(TensorEntry {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        });
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    /// Writes a content-addressed side file (the tokenizer) now; returns its manifest entry.
    pub fn add_file(&mut self, extension: &str, bytes: &[u8]) -> Result<FileEntry, PackError> {
        let sha256 = sha256_hex(bytes);
        let file = format!("{sha256}.{extension}");
        self.write_blob(&file, bytes)?;
        Ok(FileEntry {
            file,
            bytes: bytes.len() as u64,
            sha256,
        })
    }

    /// Closes the last shard, writes the manifest, and returns it with the output.
    pub fn finish(
        mut self,
        model: ModelInfo,
        config: serde_json::Value,
        tokenizer: Option<FileEntry>,
    ) -> Result<(Manifest, O), PackError> {
        self.flush()?;
        let mut manifest = Manifest::new(model, config);
        manifest.tokenizer = tokenizer;
        manifest.shards = std::mem::take(&mut self.shards);
        manifest.validate()?;
        let json = manifest.to_json();
        self.out
            .write_manifest(&json)
            .map_err(|e| PackError::Output {
                file: "manifest.json".to_owned(),
                source: Box::new(e),
            })?;
        Ok((manifest, self.out))
    }

    /// Shards written so far.
    pub fn shards(&self) -> &[ShardEntry] {
        &self.shards
    }

    fn flush(&mut self) -> Result<(), PackError> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let json = format!("{{{}}}", self.entries_json.join(","));
        let mut file = finish_header(json);
        file.extend_from_slice(&self.data);
        let sha256 = sha256_hex(&file);
        let name = format!("{sha256}.safetensors");
        self.write_blob(&name, &file)?;
        self.shards.push(ShardEntry {
            file: name,
            bytes: file.len() as u64,
            sha256,
            tensors: std::mem::take(&mut self.tensors),
        });
        self.entries_json.clear();
        self.entries_len = 0;
        self.data = Vec::new();
        Ok(())
    }

    fn write_blob(&mut self, file: &str, bytes: &[u8]) -> Result<(), PackError> {
        self.out
            .write_blob(file, bytes)
            .map_err(|e| PackError::Output {
                file: file.to_owned(),
                source: Box::new(e),
            })
    }
}

/// Keeps packed files in memory: for tests and for packing in the browser.
#[derive(Debug, Default)]
pub struct MemoryOutput {
    /// `(file name, bytes)` in write order.
    pub blobs: Vec<(String, Vec<u8>)>,
    pub manifest: Option<Vec<u8>>,
}

impl MemoryOutput {
    /// The bytes of a written file.
    pub fn blob(&self, file: &str) -> Option<&[u8]> {
        self.blobs
            .iter()
            .find(|(f, _)| f == file)
            .map(|(_, b)| b.as_slice())
    }
}

impl PackOutput for MemoryOutput {
    type Error = std::convert::Infallible;
    fn write_blob(&mut self, file: &str, bytes: &[u8]) -> Result<(), Self::Error> {
        self.blobs.push((file.to_owned(), bytes.to_vec()));
        Ok(())
    }
    fn write_manifest(&mut self, json: &[u8]) -> Result<(), Self::Error> {
        self.manifest = Some(json.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors_header::ShardHeader;

    fn model() -> ModelInfo {
        ModelInfo {
            id: "test".into(),
            version: "0".into(),
        }
    }

    #[test]
    fn packs_within_the_limit_and_never_splits() {
        let mut p = Packer::new(MemoryOutput::default(), 4096).expect("limit");
        let small = vec![1u8; 1000];
        let big = vec![2u8; 10_000];
        p.add("vlm.a", Dtype::U8, &[1000], &small).expect("a");
        p.add("vlm.b", Dtype::U8, &[1000], &small).expect("b");
        p.add("vlm.c", Dtype::U8, &[10, 1000], &big).expect("big");
        p.add("vae.d", Dtype::F32, &[250], &small).expect("d");
        let (m, out) = p
            .finish(model(), serde_json::json!({}), None)
            .expect("finish");
        let counts: Vec<usize> = m.shards.iter().map(|s| s.tensors.len()).collect();
        assert_eq!(counts, vec![2, 1, 1], "a+b, big alone, d");
        for s in &m.shards {
            let bytes = out.blob(&s.file).expect("written");
            assert_eq!(bytes.len() as u64, s.bytes);
            assert_eq!(sha256_hex(bytes), s.sha256);
            assert!(s.bytes <= 4096 || s.tensors.len() == 1);
            let h = ShardHeader::parse(bytes).expect("parses");
            let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
            let listed: Vec<&str> = s.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, listed, "header order is the manifest order");
            safetensors::SafeTensors::deserialize(bytes).expect("reference parser accepts");
        }
        let manifest = out.manifest.expect("manifest written");
        assert_eq!(Manifest::from_json(&manifest).expect("valid"), m);
    }

    #[test]
    fn rejects_bad_tensors() {
        let mut p = Packer::new(MemoryOutput::default(), 4096).expect("limit");
        assert!(matches!(
            p.add("a", Dtype::F32, &[3], &[0; 8]),
            Err(PackError::SizeMismatch {
                expected: Some(12),
                ..
            })
        ));
        p.add("a", Dtype::F32, &[2], &[0; 8]).expect("a");
        assert!(matches!(
            p.add("a", Dtype::F32, &[2], &[0; 8]),
            Err(PackError::DuplicateTensor(_))
        ));
        assert!(matches!(
            Packer::new(MemoryOutput::default(), 10),
            Err(PackError::ShardLimit(10))
        ));
    }

    #[test]
    fn identical_input_gives_identical_shards() {
        let pack = || {
            let mut p = Packer::new(MemoryOutput::default(), 4096).expect("limit");
            p.add("x", Dtype::F16, &[4], &[1, 2, 3, 4, 5, 6, 7, 8])
                .expect("x");
            p.finish(model(), serde_json::json!({}), None)
                .expect("finish")
                .0
        };
        assert_eq!(pack().shards, pack().shards);
    }
}
