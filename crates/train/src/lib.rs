//! Training the demo-world UniFusion (issue 8) natively on burn autodiff.
//!
//! The recipe, stage by stage, each resumable and deterministic by seed:
//!
//! 1. [`tokenizer`]: a byte-level BPE for the world's text plus the VLM's chat specials.
//! 2. [`vae`]: a tiny VAE (`AutoencoderTiny` layout) on rendered world images; the model
//!    crate's `TinyDecoder` loads the result unchanged.
//! 3. [`vlm`]: a tiny InternVL-layout VLM by causal LM loss on captioning, VERIFI rewriting,
//!    edit rewriting and two-image descriptions, in the model crate's own `InternVl`.
//! 4. [`dit`]: with the VLM frozen, LAP + refiner + DiT by flow matching on VERIFI conditions.
//!
//! Shared machinery: [`named`] (checkpoint names of a module's parameters, so the model
//! crate's loaders read what training writes), [`trainer`] (AdamW, schedule, checkpoints,
//! resume, progress), [`curve`] (loss CSV and plot), [`data`] (world samples).

pub mod curve;
pub mod data;
pub mod dit;
pub mod eval;
pub mod named;
pub mod recipe;
pub mod tokenizer;
pub mod trainer;
pub mod vae;
pub mod vlm;

use std::path::Path;

use burn::tensor::{Device, DeviceKind};

/// Everything that can stop training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A checkpoint is missing pieces or does not fit the config.
    #[error("checkpoint: {0}; delete the stage's directory to start it afresh")]
    Checkpoint(String),
    /// The model crate refused a config or a tensor.
    #[error("model: {0}")]
    Model(String),
    /// The tokenizer could not be trained or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The loss became NaN or infinite.
    #[error("loss is {value} at step {step}; lower the learning rate")]
    Diverged { step: usize, value: f32 },
    /// The world refused a scene or an image.
    #[error("world: {0}")]
    World(#[from] unifusion_world::WorldError),
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        TrainError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

/// The burn backend training runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend.
    Flex,
    /// burn's wgpu backend on the default adapter (lavapipe on a machine without a GPU).
    Wgpu,
}

impl Backend {
    /// The plain (inference) device.
    pub fn device(self) -> Device {
        match self {
            Backend::Flex => Device::flex(),
            Backend::Wgpu => Device::wgpu(DeviceKind::DefaultDevice),
        }
    }

    /// The autodiff device over it.
    pub fn autodiff(self) -> Device {
        self.device().autodiff()
    }
}
