//! The UniFusion pipeline: request → VLM (VERIFI rewrite + taps) → LAP + refiner → DiT
//! sampling with CFG → VAE decode → RGB8 image. One model serves text-to-image, editing,
//! multi-reference, variation and zero-shot editing (paper §3, Fig. 1; DESIGN.md §1).
//!
//! - [`config`]: taps, system prompt, rewrite budget; the model directory's `config.json`.
//! - [`verifi`]: the chat prompt, the in-model rewrite and the `[1, L, n_taps, h]` condition.
//! - [`condition`]: condition → DiT text tokens: LAP, last-layer-only, layer dropout, and the
//!   LAP pooling weights.
//! - [`tasks`]: the tasks, the sampling loop (progress, cancel, zero-shot switch), decoding.
//!
//! No I/O: images come in and go out as RGB8 bytes; every readback is `*_async`, so the same
//! code runs in a browser.

pub mod condition;
pub mod config;
pub mod tasks;
pub mod verifi;

use burn::tensor::{Device, Tensor};

use crate::generator::tiny_vae::TinyDecoder;
use crate::generator::vae::AutoencoderKl;
use crate::generator::{GeneratorError, Krea2Transformer};
use crate::precision::to_compute;
use crate::vlm::{InternVl, InternVlConfig, VlmError};

pub use condition::Conditioning;
pub use config::{PipelineConfig, SampleDefaults, UniFusionConfig, VaeConfig, every_third_layer};
pub use tasks::{Event, Output, Phase, Progress, Request, Settings, Task, Watch};
pub use verifi::{Condition, Image, Tokenize};

/// Everything that can stop a pipeline run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request or settings do not fit the model (sizes, image counts, empty prompt, …).
    #[error("{0}")]
    Input(String),
    /// The pieces do not fit together (tap count vs LAP width, hidden sizes, latent channels).
    #[error("model: {0}")]
    Config(String),
    /// The VLM failed.
    #[error(transparent)]
    Vlm(#[from] VlmError),
    /// The generator failed.
    #[error(transparent)]
    Generator(#[from] GeneratorError),
    /// Reading a tensor back from the device failed.
    #[error("device readback: {0}")]
    Device(String),
    /// The progress callback asked to stop.
    #[error("cancelled after {done} of {total} steps")]
    Cancelled {
        /// Steps done.
        done: usize,
        /// Steps planned.
        total: usize,
    },
}

/// The VAE that turns latents into pixels.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per model
pub enum Vae {
    /// `AutoencoderKL` (FLUX layout).
    Kl(AutoencoderKl),
    /// The tiny decoder (TAEF1 layout); its pipeline latents are the raw latents normalized by
    /// the config's optional `latents_mean` / `latents_std`, then scaled by its
    /// `scaling_factor` and `shift_factor` (none, 1 and 0 for TAESD-family VAEs).
    Tiny(TinyDecoder),
}

impl Vae {
    /// Pipeline latents `[B, C, h, w]` (what the DiT samples) → image `[B, 3, H, W]` in about
    /// [−1, 1], in the latents' dtype (the decoder itself runs in the device's precision).
    pub fn decode(&self, latents: Tensor<4>) -> Result<Tensor<4>, GeneratorError> {
        let dtype = latents.dtype();
        let latents = to_compute(latents);
        let image = match self {
            Vae::Kl(vae) => vae.decode(vae.unscale_latents(latents)),
            Vae::Tiny(decoder) => decoder.decode(decoder.unscale_latents(latents)),
        }?;
        Ok(image.cast(dtype))
    }
}

/// The whole model: frozen VLM, LAP + refiner + DiT, VAE, and how they are driven.
#[derive(Debug)]
pub struct UniFusion {
    /// The frozen VLM encoder.
    pub vlm: InternVl,
    /// Text fusion (LAP + refiner) and the DiT.
    pub transformer: Krea2Transformer,
    /// The decoder.
    pub vae: Vae,
    /// Taps, system prompt, rewrite budget.
    pub config: PipelineConfig,
    taps: Vec<usize>,
    tile_size: usize,
    tokens_per_tile: usize,
    /// Pixels per latent cell.
    downscale: usize,
    latent_channels: usize,
}

impl UniFusion {
    /// Joins the pieces; fails when they do not fit: the number of taps must equal the
    /// transformer's `num_text_layers`, the VLM width its `text_hidden_dim`, and the VAE's
    /// latent channels (`vae_config`, the config `vae` was built from) `in_channels / p²` for the
    /// transformer's patch size `p`.
    pub fn new(
        vlm: InternVl,
        vlm_config: &InternVlConfig,
        transformer: Krea2Transformer,
        vae: Vae,
        vae_config: &VaeConfig,
        config: PipelineConfig,
    ) -> Result<Self, PipelineError> {
        let layers = vlm.num_layers();
        let taps = config.taps_for(layers);
        if let Some(bad) = taps.iter().find(|&&t| t > layers) {
            return Err(PipelineError::Config(format!(
                "tap {bad} is past the VLM's last hidden state ({layers})"
            )));
        }
        if taps.len() != transformer.num_text_layers {
            return Err(PipelineError::Config(format!(
                "{} taps ({taps:?}) but the transformer's LAP expects num_text_layers = {}",
                taps.len(),
                transformer.num_text_layers
            )));
        }
        let hidden = vlm_config.text_config.hidden_size;
        if hidden != transformer.text_hidden_dim {
            return Err(PipelineError::Config(format!(
                "the VLM's hidden size is {hidden} but the transformer's text_hidden_dim is {}",
                transformer.text_hidden_dim
            )));
        }
        let p = transformer.patch_size;
        let cells = p * p;
        if p == 0 || !transformer.in_channels.is_multiple_of(cells) {
            return Err(PipelineError::Config(format!(
                "the transformer's in_channels ({}) is not a multiple of patch_size² ({cells})",
                transformer.in_channels
            )));
        }
        let latent_channels = transformer.in_channels / cells;
        let (vae_channels, downscale) = match (&vae, vae_config) {
            (Vae::Kl(_), VaeConfig::Kl(c)) => (c.latent_channels, c.downscale()),
            (Vae::Tiny(_), VaeConfig::Tiny(c)) => (c.latent_channels, c.downscale()),
            _ => {
                return Err(PipelineError::Config(
                    "the VAE and its config are of different kinds".into(),
                ));
            }
        };
        if vae_channels != latent_channels {
            return Err(PipelineError::Config(format!(
                "the transformer samples {} channels (= {cells} × {latent_channels}) but the VAE decodes {vae_channels}",
                transformer.in_channels
            )));
        }
        if downscale == 0 {
            return Err(PipelineError::Config(
                "VAE downscale must be positive".into(),
            ));
        }
        Ok(Self {
            vlm,
            transformer,
            vae,
            taps,
            tile_size: vlm_config.vision_config.image_size[0],
            tokens_per_tile: vlm_config.tokens_per_tile(),
            downscale,
            latent_channels,
            config,
        })
    }

    /// The tapped hidden-state indices, in LAP order.
    pub fn taps(&self) -> &[usize] {
        &self.taps
    }

    /// Output sizes must be multiples of this (VAE downscale × the DiT's patch size).
    pub fn size_multiple(&self) -> usize {
        self.downscale * self.transformer.patch_size
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.transformer.img_in.weight.device()
    }
}
