//! UniFusion-Web weights: a manifest of content-addressed safetensors shards, a packer, and one
//! streaming loader for native files and browser fetches alike.
//!
//! The format is documented in `docs/WEIGHTS.md`. The core (manifest, header parser, packer,
//! loader) uses no file system and builds for `wasm32-unknown-unknown`; [`native`] adds files,
//! and the `burn` feature adds [`burn_sink::TensorDataSink`].
//!
//! ```text
//! Packer::add(name, dtype, shape, bytes)* -> shards + manifest.json   (writer)
//! load(manifest, ShardSource, TensorSink, expected, progress)         (loader)
//! ```

pub mod dtype;
pub mod loader;
pub mod manifest;
pub mod quant;
pub mod safetensors_header;
pub mod writer;

#[cfg(feature = "burn")]
pub mod burn_sink;
#[cfg(not(target_family = "wasm"))]
pub mod native;

pub use dtype::Dtype;
pub use loader::{
    CountingSink, LoadError, LoadStats, MemorySource, Phase, Progress, ShardSource, TensorSink,
    load,
};
pub use manifest::{
    ExpectedTensor, FileEntry, Manifest, ManifestError, ModelInfo, ShardEntry, TensorEntry,
    TensorSetError,
};
pub use safetensors_header::{HeaderError, ShardHeader};
pub use writer::{DEFAULT_SHARD_BYTES, MemoryOutput, PackError, PackOutput, Packer};
