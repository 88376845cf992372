//! `manifest.json`: the model's identity, its full config, and the list of content-addressed
//! shards with the tensors each holds. The format is documented in `docs/WEIGHTS.md`.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::dtype::{Dtype, byte_size};

/// The value of the manifest's `format` field.
pub const FORMAT: &str = "unifusion-manifest";
/// The only `format_version` this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Largest manifest JSON accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Largest shard accepted, in bytes: the most a wasm32 `ArrayBuffer` can hold.
pub const MAX_SHARD_BYTES: u64 = 4 << 30;
/// Most shards in one manifest.
pub const MAX_SHARDS: usize = 100_000;
/// Most tensors in one manifest.
pub const MAX_TENSORS: usize = 1_000_000;
/// Longest tensor name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Highest tensor rank.
pub const MAX_RANK: usize = 8;
/// Bytes every safetensors file has besides tensor data: the 8-byte length and at least `{}`.
pub const MIN_SAFETENSORS_OVERHEAD: u64 = 10;

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes; the limit is {MAX_MANIFEST_BYTES}")]
    TooLarge(u64),
    #[error("manifest is not valid: {0}")]
    Json(String),
    #[error("`format` is `{0}`, expected `{FORMAT}`: this is not a UniFusion manifest")]
    WrongFormat(String),
    #[error(
        "manifest format_version {0} is not supported (this build reads {FORMAT_VERSION}); \
         update the app or re-pack the model"
    )]
    UnsupportedVersion(u64),
    #[error("`model.{0}` must be a non-empty string")]
    EmptyModelField(&'static str),
    #[error("`config` must be a JSON object")]
    ConfigNotObject,
    #[error("{what} `{value}` is not 64 lowercase hex digits")]
    BadSha256 { what: String, value: String },
    #[error("shard {index}: file name `{file}` is not its sha256 + `.safetensors` (`{expected}`)")]
    ShardNameMismatch {
        index: usize,
        file: String,
        expected: String,
    },
    #[error("tokenizer file name `{0}` must be a plain file name beside the manifest")]
    BadFileName(String),
    #[error("shard {index} ({file}): {bytes} bytes is outside 10..={MAX_SHARD_BYTES}")]
    ShardSize {
        index: usize,
        file: String,
        bytes: u64,
    },
    #[error("{count} shards; the limit is {MAX_SHARDS}")]
    TooManyShards { count: usize },
    #[error("{count} tensors; the limit is {MAX_TENSORS}")]
    TooManyTensors { count: usize },
    #[error("shard {index}: tensor name `{name}` is empty or longer than {MAX_NAME_BYTES} bytes")]
    BadTensorName { index: usize, name: String },
    #[error("tensor `{0}` is listed twice")]
    DuplicateTensor(String),
    #[error("tensor `{name}`: rank {rank} exceeds {MAX_RANK}")]
    RankTooLarge { name: String, rank: usize },
    #[error("tensor `{name}`: shape {shape:?} × {dtype} overflows")]
    ShapeOverflow {
        name: String,
        dtype: Dtype,
        shape: Vec<u64>,
    },
    #[error("shard {index} ({file}): its tensors need {needed} bytes but the shard is {bytes}")]
    TensorsExceedShard {
        index: usize,
        file: String,
        needed: u64,
        bytes: u64,
    },
    #[error("{0}")]
    TensorSet(#[from] TensorSetError),
}

/// The tensors of a manifest differ from the ones a model expects.
#[derive(Debug, Default, thiserror::Error)]
#[error("{}", self.describe())]
pub struct TensorSetError {
    /// Expected, not in the manifest.
    pub missing: Vec<String>,
    /// In the manifest, not expected.
    pub unexpected: Vec<String>,
    /// `(name, expected shape, manifest shape)`.
    pub wrong_shape: Vec<(String, Vec<u64>, Vec<u64>)>,
}

impl TensorSetError {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        let list = |names: &[String]| {
            let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
            let more = names.len().saturating_sub(10);
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{}{tail}", shown.join(", "))
        };
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing tensors: {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "{} unexpected tensors: {}",
                self.unexpected.len(),
                list(&self.unexpected)
            ));
        }
        for (name, want, got) in self.wrong_shape.iter().take(10) {
            parts.push(format!(
                "tensor `{name}` has shape {got:?}, expected {want:?}"
            ));
        }
        parts.join("; ")
    }

    fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong_shape.is_empty()
    }
}

/// `model`: which model and release this is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInfo {
    pub id: String,
    pub version: String,
}

/// A content-addressed file beside the manifest (the tokenizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// One tensor as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

impl TensorEntry {
    /// Byte size (valid after [`Manifest::validate`], which rejects overflow).
    pub fn byte_size(&self) -> u64 {
        byte_size(self.dtype, &self.shape).unwrap_or(u64::MAX)
    }

    /// Number of elements (valid after [`Manifest::validate`]).
    pub fn element_count(&self) -> u64 {
        crate::dtype::element_count(&self.shape).unwrap_or(u64::MAX)
    }
}

/// One shard: a safetensors file named `<sha256>.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub tensors: Vec<TensorEntry>,
}

/// A tensor a model expects: its name and shape (the dtype is the loader's to convert).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<u64>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u64,
    pub model: ModelInfo,
    /// The full model config (`vlm`, `generator`, `vae`, `tokenizer`, `sampling`), kept as
    /// JSON: the model crate deserialises its parts.
    pub config: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<FileEntry>,
    pub shards: Vec<ShardEntry>,
}

/// Per-component totals for `unifusion inspect`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComponentSummary {
    pub tensors: usize,
    /// Weights: a quantized `.q4` byte counts as two, `.scales` as none (`quant::logical_parameters`).
    pub parameters: u64,
    pub bytes: u64,
}

impl Manifest {
    /// A new, empty manifest of the current format version.
    pub fn new(model: ModelInfo, config: serde_json::Value) -> Manifest {
        Manifest {
            format: FORMAT.to_owned(),
            format_version: u64::from(FORMAT_VERSION),
            model,
            config,
            tokenizer: None,
            shards: Vec::new(),
        }
    }

    /// Parses and validates manifest JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let len = bytes.len() as u64;
        if len > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(len));
        }
        // Read the version first, so a future manifest says "unsupported version" rather
        // than whatever field it added.
        #[derive(Deserialize)]
        struct Head {
            format: Option<serde_json::Value>,
            format_version: Option<serde_json::Value>,
        }
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        match head.format {
            Some(serde_json::Value::String(f)) if f == FORMAT => {}
            Some(other) => {
                let shown = other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned);
                return Err(ManifestError::WrongFormat(shown));
            }
            None => return Err(ManifestError::Json("missing field `format`".to_owned())),
        }
        match head
            .format_version
            .as_ref()
            .and_then(serde_json::Value::as_u64)
        {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => return Err(ManifestError::UnsupportedVersion(v)),
            None => {
                return Err(ManifestError::Json(
                    "`format_version` must be a non-negative integer".to_owned(),
                ));
            }
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Pretty JSON, ending in a newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs and a `Value` cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Checks every rule of `docs/WEIGHTS.md`.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT {
            return Err(ManifestError::WrongFormat(self.format.clone()));
        }
        if self.format_version != u64::from(FORMAT_VERSION) {
            return Err(ManifestError::UnsupportedVersion(self.format_version));
        }
        if self.model.id.is_empty() {
            return Err(ManifestError::EmptyModelField("id"));
        }
        if self.model.version.is_empty() {
            return Err(ManifestError::EmptyModelField("version"));
        }
        if !self.config.is_object() {
            return Err(ManifestError::ConfigNotObject);
        }
        if let Some(tok) = &self.tokenizer {
            check_sha256("tokenizer sha256", &tok.sha256)?;
            if !is_plain_file_name(&tok.file) {
                return Err(ManifestError::BadFileName(tok.file.clone()));
            }
        }
        if self.shards.len() > MAX_SHARDS {
            return Err(ManifestError::TooManyShards {
                count: self.shards.len(),
            });
        }
        let count: usize = self.shards.iter().map(|s| s.tensors.len()).sum();
        if count > MAX_TENSORS {
            return Err(ManifestError::TooManyTensors { count });
        }
        let mut names = HashSet::with_capacity(count);
        for (index, shard) in self.shards.iter().enumerate() {
            check_sha256(&format!("shard {index} sha256"), &shard.sha256)?;
            let expected = format!("{}.safetensors", shard.sha256);
            if shard.file != expected {
                return Err(ManifestError::ShardNameMismatch {
                    index,
                    file: shard.file.clone(),
                    expected,
                });
            }
            if !(MIN_SAFETENSORS_OVERHEAD..=MAX_SHARD_BYTES).contains(&shard.bytes) {
                return Err(ManifestError::ShardSize {
                    index,
                    file: shard.file.clone(),
                    bytes: shard.bytes,
                });
            }
            let mut needed = MIN_SAFETENSORS_OVERHEAD;
            for t in &shard.tensors {
                if t.name.is_empty() || t.name.len() > MAX_NAME_BYTES {
                    return Err(ManifestError::BadTensorName {
                        index,
                        name: t.name.chars().take(80).collect(),
                    });
                }
                if !names.insert(t.name.as_str()) {
                    return Err(ManifestError::DuplicateTensor(t.name.clone()));
                }
                if t.shape.len() > MAX_RANK {
                    return Err(ManifestError::RankTooLarge {
                        name: t.name.clone(),
                        rank: t.shape.len(),
                    });
                }
                let size =
                    byte_size(t.dtype, &t.shape).ok_or_else(|| ManifestError::ShapeOverflow {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    })?;
                needed = needed.saturating_add(size);
            }
            if needed > shard.bytes {
                return Err(ManifestError::TensorsExceedShard {
                    index,
                    file: shard.file.clone(),
                    needed,
                    bytes: shard.bytes,
                });
            }
        }
        Ok(())
    }

    /// All tensors in load order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.shards.iter().flat_map(|s| s.tensors.iter())
    }

    /// Total bytes of all shards.
    pub fn total_shard_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    /// Compares the manifest's tensors with a model's expected list: every missing,
    /// unexpected or wrongly shaped tensor is named.
    pub fn check_expected(&self, expected: &[ExpectedTensor]) -> Result<(), TensorSetError> {
        let have: HashMap<&str, &TensorEntry> =
            self.tensors().map(|t| (t.name.as_str(), t)).collect();
        let want: HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        let mut err = TensorSetError::default();
        for e in expected {
            match have.get(e.name.as_str()) {
                None => err.missing.push(e.name.clone()),
                Some(t) if t.shape != e.shape => {
                    err.wrong_shape
                        .push((e.name.clone(), e.shape.clone(), t.shape.clone()));
                }
                Some(_) => {}
            }
        }
        err.unexpected = self
            .tensors()
            .filter(|t| !want.contains(t.name.as_str()))
            .map(|t| t.name.clone())
            .collect();
        if err.is_empty() { Ok(()) } else { Err(err) }
    }

    /// Totals per component (the tensor name's first dotted segment).
    pub fn components(&self) -> BTreeMap<String, ComponentSummary> {
        let mut out: BTreeMap<String, ComponentSummary> = BTreeMap::new();
        for t in self.tensors() {
            let component = t.name.split('.').next().unwrap_or_default().to_owned();
            let c = out.entry(component).or_default();
            c.tensors += 1;
            c.parameters += crate::quant::logical_parameters(&t.name, t.element_count());
            c.bytes += t.byte_size();
        }
        out
    }

    /// Tensor bytes per dtype.
    pub fn bytes_per_dtype(&self) -> BTreeMap<Dtype, u64> {
        let mut out = BTreeMap::new();
        for t in self.tensors() {
            *out.entry(t.dtype).or_insert(0) += t.byte_size();
        }
        out
    }
}

/// True for 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_sha256(what: &str, value: &str) -> Result<(), ManifestError> {
    if is_sha256_hex(value) {
        Ok(())
    } else {
        Err(ManifestError::BadSha256 {
            what: what.to_owned(),
            value: value.chars().take(80).collect(),
        })
    }
}

/// A file name that stays beside the manifest: no separators, not hidden, not `..`.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0', ':'])
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(digest.len() * 2);
    for b in digest {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(tensors: Vec<TensorEntry>, bytes: u64) -> ShardEntry {
        let sha = sha256_hex(b"x");
        ShardEntry {
            file: format!("{sha}.safetensors"),
            bytes,
            sha256: sha,
            tensors,
        }
    }

    fn t(name: &str, shape: &[u64]) -> TensorEntry {
        TensorEntry {
            name: name.to_owned(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
        }
    }

    fn manifest(shards: Vec<ShardEntry>) -> Manifest {
        let mut m = Manifest::new(
            ModelInfo {
                id: "m".into(),
                version: "1".into(),
            },
            serde_json::json!({"vlm": {}}),
        );
        m.shards = shards;
        m
    }

    #[test]
    fn round_trips_through_json() {
        let m = manifest(vec![shard(vec![t("vlm.a", &[2, 3]), t("vae.b", &[])], 200)]);
        let back = Manifest::from_json(&m.to_json()).expect("valid manifest");
        assert_eq!(back, m);
        assert_eq!(back.components()["vlm"].parameters, 6);
        assert_eq!(back.bytes_per_dtype()[&Dtype::F32], 28);
    }

    #[test]
    fn rejects_each_rule() {
        let json = |m: &Manifest| m.to_json();
        let mut m = manifest(vec![]);
        m.format_version = 2;
        assert!(matches!(
            Manifest::from_json(&json(&m)),
            Err(ManifestError::UnsupportedVersion(2))
        ));
        let m = manifest(vec![shard(vec![t("a", &[1]), t("a", &[2])], 100)]);
        assert!(matches!(m.validate(), Err(ManifestError::DuplicateTensor(n)) if n == "a"));
        let mut s = shard(vec![t("a", &[1])], 100);
        s.file = format!("{}.safetensors", sha256_hex(b"y"));
        assert!(matches!(
            manifest(vec![s]).validate(),
            Err(ManifestError::ShardNameMismatch { index: 0, .. })
        ));
        let m = manifest(vec![shard(vec![t("a", &[1 << 40, 1 << 40])], 100)]);
        assert!(matches!(
            m.validate(),
            Err(ManifestError::ShapeOverflow { .. })
        ));
        let m = manifest(vec![shard(vec![t("a", &[100])], 100)]);
        assert!(matches!(
            m.validate(),
            Err(ManifestError::TensorsExceedShard { needed: 410, .. })
        ));
        let m = manifest(vec![shard(vec![], MAX_SHARD_BYTES + 1)]);
        assert!(matches!(m.validate(), Err(ManifestError::ShardSize { .. })));
        let bad = br#"{"format":"unifusion-manifest","format_version":1,"model":{"id":"m","version":"1"},"config":{},"shards":[{"file":"a","bytes":1,"sha256":"x","tensors":[{"name":"a","dtype":"Q9","shape":[1]}]}]}"#;
        let err = Manifest::from_json(bad).expect_err("unknown dtype");
        assert!(err.to_string().contains("unknown dtype `Q9`"), "{err}");
        assert!(matches!(
            Manifest::from_json(br#"{"format":"gguf","format_version":1}"#),
            Err(ManifestError::WrongFormat(f)) if f == "gguf"
        ));
    }

    #[test]
    fn expected_tensors_are_named() {
        let m = manifest(vec![shard(vec![t("a", &[1]), t("b", &[2])], 100)]);
        let exp = |n: &str, s: &[u64]| ExpectedTensor {
            name: n.into(),
            shape: s.to_vec(),
        };
        assert!(m.check_expected(&[exp("a", &[1]), exp("b", &[2])]).is_ok());
        let err = m
            .check_expected(&[exp("a", &[3]), exp("c", &[1])])
            .expect_err("mismatch");
        assert_eq!(err.missing, vec!["c".to_owned()]);
        assert_eq!(err.unexpected, vec!["b".to_owned()]);
        assert_eq!(err.wrong_shape.len(), 1);
        let msg = err.to_string();
        assert!(msg.contains("missing tensors: c") && msg.contains("unexpected tensors: b"));
    }
}
