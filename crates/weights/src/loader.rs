//! The one loader: shard bytes from any source, verified, parsed, handed to the model, dropped.
//!
//! Native code passes files ([`crate::native::DirSource`]); the browser passes the bytes the JS
//! side fetched or took from IndexedDB. Host memory held by the loader is one shard at a time.

use std::future::Future;

use sha2::Digest;

use crate::dtype::Dtype;
use crate::manifest::{ExpectedTensor, Manifest, ShardEntry, TensorSetError, hex};
use crate::safetensors_header::{HeaderError, ShardHeader};

/// Gives the bytes of one shard.
pub trait ShardSource {
    type Error: std::error::Error + Send + Sync + 'static;
    /// The whole file of `manifest.shards[index]`. The loader checks length and sha256.
    fn shard(
        &mut self,
        index: usize,
        entry: &ShardEntry,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>>;
}

/// Receives each tensor; the model side implements it (a key map into its modules).
pub trait TensorSink {
    type Error: std::error::Error + Send + Sync + 'static;
    /// One tensor: little-endian `bytes` of `dtype`, row-major `shape`. The bytes are only
    /// borrowed: copy what you keep (they are dropped with the shard).
    fn tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), Self::Error>;
}

/// What the loader is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the source to give shard `shard`.
    Fetch,
    /// Hashing shard `shard`.
    Verify,
    /// Handing shard `shard`'s tensors to the sink.
    Place,
    /// Every shard placed.
    Done,
}

/// Progress of a load; `bytes_done` counts shards fully placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    /// Index of the current shard (equals `shards` when done).
    pub shard: usize,
    pub shards: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub tensors_done: usize,
    pub tensors_total: usize,
}

/// Why a load failed. Every variant names the shard (index and file), and the tensor where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the manifest's tensors do not match the model: {0}")]
    TensorSet(#[from] TensorSetError),
    #[error("shard {index} ({file}): could not get its bytes: {source}")]
    Source {
        index: usize,
        file: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "shard {index} ({file}) is {actual} bytes, the manifest says {expected}: the download was cut short or the file is stale"
    )]
    Size {
        index: usize,
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "shard {index} ({file}) has sha256 {actual}, the manifest says {expected}: the file is corrupt or stale; fetch it again"
    )]
    HashMismatch {
        index: usize,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("shard {index} ({file}) is not a valid safetensors file: {source}")]
    Header {
        index: usize,
        file: String,
        source: HeaderError,
    },
    #[error("shard {index} ({file}), tensor `{tensor}`: {problem}")]
    TensorMismatch {
        index: usize,
        file: String,
        tensor: String,
        problem: String,
    },
    #[error("shard {index} ({file}), tensor `{tensor}`: the model rejected it: {source}")]
    Sink {
        index: usize,
        file: String,
        tensor: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a finished load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadStats {
    pub shards: usize,
    pub tensors: usize,
    pub bytes: u64,
    /// The largest shard held at once.
    pub largest_shard: u64,
}

/// Loads every tensor of `manifest`, one shard at a time.
///
/// When `expected` is given, it is compared with the manifest before the first byte is
/// fetched ([`Manifest::check_expected`]). Each shard's length and sha256 are checked before
/// its header is parsed; its header must list exactly the manifest's tensors (name, dtype,
/// shape). Tensors reach `sink` in manifest order.
pub async fn load<S, K, P>(
    manifest: &Manifest,
    source: &mut S,
    sink: &mut K,
    expected: Option<&[ExpectedTensor]>,
    mut progress: P,
) -> Result<LoadStats, LoadError>
where
    S: ShardSource,
    K: TensorSink,
    P: FnMut(&Progress),
{
    if let Some(expected) = expected {
        manifest.check_expected(expected)?;
    }
    let mut p = Progress {
        phase: Phase::Fetch,
        shard: 0,
        shards: manifest.shards.len(),
        bytes_done: 0,
        bytes_total: manifest.total_shard_bytes(),
        tensors_done: 0,
        tensors_total: manifest.tensors().count(),
    };
    let mut largest_shard = 0;
    for (index, entry) in manifest.shards.iter().enumerate() {
        p.shard = index;
        p.phase = Phase::Fetch;
        progress(&p);
        let bytes = source
            .shard(index, entry)
            .await
            .map_err(|e| LoadError::Source {
                index,
                file: entry.file.clone(),
                source: Box::new(e),
            })?;
        p.phase = Phase::Verify;
        progress(&p);
        verify(index, entry, &bytes)?;
        p.phase = Phase::Place;
        progress(&p);
        p.tensors_done += place(index, entry, &bytes, sink)?;
        largest_shard = largest_shard.max(entry.bytes);
        p.bytes_done += entry.bytes;
        drop(bytes);
    }
    p.phase = Phase::Done;
    p.shard = p.shards;
    progress(&p);
    Ok(LoadStats {
        shards: p.shards,
        tensors: p.tensors_done,
        bytes: p.bytes_done,
        largest_shard,
    })
}

/// Checks a shard's length and sha256 against its manifest entry.
pub fn verify(index: usize, entry: &ShardEntry, bytes: &[u8]) -> Result<(), LoadError> {
    let actual = bytes.len() as u64;
    if actual != entry.bytes {
        return Err(LoadError::Size {
            index,
            file: entry.file.clone(),
            expected: entry.bytes,
            actual,
        });
    }
    let sha = hex(&sha2::Sha256::digest(bytes));
    if sha != entry.sha256 {
        return Err(LoadError::HashMismatch {
            index,
            file: entry.file.clone(),
            expected: entry.sha256.clone(),
            actual: sha,
        });
    }
    Ok(())
}

/// Parses a verified shard, checks it against the manifest entry and hands each tensor to
/// `sink`; returns how many it placed.
pub fn place<K: TensorSink>(
    index: usize,
    entry: &ShardEntry,
    bytes: &[u8],
    sink: &mut K,
) -> Result<usize, LoadError> {
    let mismatch = |tensor: &str, problem: String| LoadError::TensorMismatch {
        index,
        file: entry.file.clone(),
        tensor: tensor.to_owned(),
        problem,
    };
    let header = ShardHeader::parse(bytes).map_err(|source| LoadError::Header {
        index,
        file: entry.file.clone(),
        source,
    })?;
    if header.tensors.len() != entry.tensors.len() {
        // Name the first tensor that is in one list and not the other.
        let listed = |name: &str| entry.tensors.iter().any(|t| t.name == name);
        if let Some(extra) = header.tensors.iter().find(|t| !listed(&t.name)) {
            return Err(mismatch(
                &extra.name,
                "in the shard, not in the manifest".into(),
            ));
        }
        let present = |name: &str| header.tensors.iter().any(|t| t.name == name);
        if let Some(missing) = entry.tensors.iter().find(|t| !present(&t.name)) {
            return Err(mismatch(
                &missing.name,
                "in the manifest, not in the shard".into(),
            ));
        }
    }
    let by_name: std::collections::HashMap<&str, &crate::safetensors_header::HeaderTensor> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // Check everything before handing anything over, so a bad shard places nothing.
    for t in &entry.tensors {
        let Some(h) = by_name.get(t.name.as_str()) else {
            return Err(mismatch(
                &t.name,
                "in the manifest, not in the shard".into(),
            ));
        };
        if h.dtype != t.dtype || h.shape != t.shape {
            return Err(mismatch(
                &t.name,
                format!(
                    "shard has {} {:?}, the manifest says {} {:?}",
                    h.dtype, h.shape, t.dtype, t.shape
                ),
            ));
        }
    }
    let data = bytes
        .get(usize::try_from(header.data_start).unwrap_or(usize::MAX)..)
        .unwrap_or_default();
    for t in &entry.tensors {
        let Some(h) = by_name.get(t.name.as_str()) else {
            continue;
        };
        let range = usize::try_from(h.begin)
            .ok()
            .zip(usize::try_from(h.end).ok());
        let shape: Option<Vec<usize>> = h.shape.iter().map(|&d| usize::try_from(d).ok()).collect();
        let (Some((begin, end)), Some(shape)) = (range, shape) else {
            return Err(mismatch(
                &t.name,
                "does not fit this platform's usize".into(),
            ));
        };
        let slice = data
            .get(begin..end)
            .ok_or_else(|| mismatch(&t.name, "data outside the shard".into()))?;
        sink.tensor(&t.name, t.dtype, &shape, slice)
            .map_err(|e| LoadError::Sink {
                index,
                file: entry.file.clone(),
                tensor: t.name.clone(),
                source: Box::new(e),
            })?;
    }
    Ok(entry.tensors.len())
}

/// A sink that only counts: for benchmarks and `inspect`-style dry runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CountingSink {
    pub tensors: usize,
    pub bytes: u64,
}

impl TensorSink for CountingSink {
    type Error = std::convert::Infallible;
    fn tensor(&mut self, _: &str, _: Dtype, _: &[usize], bytes: &[u8]) -> Result<(), Self::Error> {
        self.tensors += 1;
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}

/// A source over shards already in memory (tests; the browser when JS hands over all bytes).
#[derive(Debug, Default)]
pub struct MemorySource {
    /// Shard bytes by file name.
    pub files: std::collections::HashMap<String, Vec<u8>>,
}

/// A shard file a [`MemorySource`] does not have.
#[derive(Debug, thiserror::Error)]
#[error("no file `{0}`")]
pub struct MissingFile(pub String);

impl ShardSource for MemorySource {
    type Error = MissingFile;
    async fn shard(&mut self, _: usize, entry: &ShardEntry) -> Result<Vec<u8>, MissingFile> {
        self.files
            .get(&entry.file)
            .cloned()
            .ok_or_else(|| MissingFile(entry.file.clone()))
    }
}
