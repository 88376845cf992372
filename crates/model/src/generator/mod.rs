//! The generator: text fusion (LAP + refiner), the single-stream DiT, the flow-matching
//! sampler and the VAE decoders.
//!
//! The block design is Krea 2's, as PyPI `diffusers` 0.42.1 ships it in
//! `models/transformers/transformer_krea2.py` (`Krea2Transformer2DModel`); the VAEs mirror
//! `AutoencoderKL` (FLUX layout) and `AutoencoderTiny` (TAESD/TAEF1); the sampler follows
//! `FlowMatchEulerDiscreteScheduler` with exponential μ-shift. Golden fixtures made by
//! `scripts/fixtures/make_generator_fixtures.py` pin every component to those references.
//!
//! - [`config`]: serde mirrors of the diffusers `config.json` files, with named sizes.
//! - [`params`]: where parameters come from: a checkpoint ([`WeightMap`]) or a seeded
//!   random init ([`RandomInit`]); key renames for Krea 2's original checkpoint names.
//! - [`layers`]: Krea 2's RMSNorm(1+scale), gated GQA attention with QK-norm, SwiGLU.
//! - [`rope`]: the 3-axis (t, h, w) rotary table.
//! - [`text_fusion`]: layer-wise blocks (LAP), projector, refiner blocks, `txt_in`.
//! - [`dit`]: the timestep embedding, DiT blocks, final layer, `p × p` patchify.
//! - [`sampler`]: the schedule, Euler steps, CFG, seeded noise, callbacks, cancellation.
//! - [`vae`] and [`tiny_vae`]: the decoders and encoders, latent ↔ image helpers.

pub mod config;
pub mod dit;
pub mod layers;
pub mod params;
pub mod rope;
pub mod sampler;
pub mod text_fusion;
pub mod tiny_vae;
pub mod vae;

pub use config::{AutoencoderKlConfig, AutoencoderTinyConfig, Krea2Config};
pub use dit::{Krea2Transformer, TextCondition, patchify, unpatchify};
pub use params::{LoadError, ParamSource, RandomInit, WeightMap, krea2_original_to_diffusers};
pub use rope::{ImagePositions, RopeTable, TextPositions, condition_position_ids, position_ids};

/// Errors of the generator's public entry points: shapes and configs that do not fit.
#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    /// A tensor handed to a forward pass has the wrong shape.
    #[error("`{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// The tensor's name, as the reference implementation calls it.
        name: &'static str,
        /// Its actual shape.
        got: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
    /// The configuration is inconsistent (e.g. RoPE axes that do not sum to the head dim).
    #[error("invalid config: {0}")]
    Config(String),
    /// Loading parameters failed.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Fails with [`GeneratorError::Shape`] unless `dims` matches `expected` (`None` = any).
pub(crate) fn check_shape(
    name: &'static str,
    dims: &[usize],
    expected: &[Option<usize>],
) -> Result<(), GeneratorError> {
    let ok = dims.len() == expected.len()
        && dims
            .iter()
            .zip(expected)
            .all(|(d, e)| e.is_none_or(|e| e == *d));
    if ok {
        return Ok(());
    }
    let words: Vec<String> = expected
        .iter()
        .map(|e| e.map_or_else(|| "_".to_string(), |e| e.to_string()))
        .collect();
    Err(GeneratorError::Shape {
        name,
        got: dims.to_vec(),
        expected: format!("[{}]", words.join(", ")),
    })
}
