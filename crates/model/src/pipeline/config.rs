//! What the pipeline is configured with: which VLM hidden states feed LAP, the VERIFI system
//! prompt and rewrite budget, tiling; and the serde `config.json` of a whole UniFusion model
//! directory (VLM + transformer + VAE + pipeline), so every front end reads one format.

use serde::{Deserialize, Serialize};

use super::Settings;
use crate::generator::{
    AutoencoderKlConfig, AutoencoderTinyConfig, ImagePositions, Krea2Config, TextPositions,
};
use crate::vlm::InternVlConfig;

/// The VERIFI system prompt: asks the VLM for a description of the *target* image, whatever
/// the request's form (a description, an instruction, images only).
pub const VERIFI_SYSTEM_PROMPT: &str = "You are an image generation assistant. Rewrite the user's request as one detailed description of the target image: its subjects, their attributes and positions, the setting, lighting, style and any text in it. If images are given, describe the image that results from applying the request to them. Answer with the description only.";

/// Hidden-state indices (transformers numbering, 0 = embeddings, `num_layers` = post-norm)
/// of every third layer: `0, 3, 6, …` up to `num_layers` (10 taps for a 28-layer LLM).
pub fn every_third_layer(num_layers: usize) -> Vec<usize> {
    (0..=num_layers).step_by(3).collect()
}

/// How the pipeline drives the VLM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineConfig {
    /// Tapped hidden-state indices, in the order LAP expects them (empty = every third).
    pub taps: Vec<usize>,
    /// VERIFI's system prompt.
    pub system_prompt: String,
    /// Most tokens the VLM may write when rewriting the request.
    pub max_rewrite_tokens: usize,
    /// Tokens that end the rewrite (emitted, then decoding stops), e.g. `<|im_end|>`.
    pub stop_tokens: Vec<u32>,
    /// Most 448-px (tile-size) tiles per input image, thumbnail not counted (paper: 10).
    pub max_tiles: usize,
    /// The sampler settings the model is meant to run with, where they differ from the
    /// pipeline's [`Settings::default`] (a small trained model's native size, the steps and
    /// guidance it was evaluated at). Front ends start from [`PipelineConfig::default_settings`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defaults: Option<SampleDefaults>,
    /// Where the DiT places the image-token condition rows: with the text at the origin
    /// (the default, and every model trained before this field) or on the latent grid. A
    /// model only works with the layout it was trained with.
    #[serde(skip_serializing_if = "ImagePositions::is_origin")]
    pub image_positions: ImagePositions,
    /// Where the DiT places the text rows of the condition: at the origin (the default, and
    /// every model trained before this field) or at the latent grid's centre. A model only
    /// works with the layout it was trained with.
    #[serde(skip_serializing_if = "TextPositions::is_origin")]
    pub text_positions: TextPositions,
}

/// A model's own sampler defaults (`config.json`: `pipeline.defaults`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleDefaults {
    /// Output width in pixels.
    pub width: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Euler steps.
    pub steps: usize,
    /// CFG weight.
    pub guidance: f32,
    /// The noise levels whose steps are guided ([`Settings::guidance_interval`]); absent:
    /// every step, as every model before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<[f32; 2]>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            taps: Vec::new(),
            system_prompt: VERIFI_SYSTEM_PROMPT.into(),
            max_rewrite_tokens: 256,
            stop_tokens: Vec::new(),
            max_tiles: 10,
            defaults: None,
            image_positions: ImagePositions::Origin,
            text_positions: TextPositions::Origin,
        }
    }
}

impl PipelineConfig {
    /// [`Settings::default`] with the model's own [`SampleDefaults`] over it.
    pub fn default_settings(&self) -> Settings {
        let base = Settings::default();
        match &self.defaults {
            Some(d) => Settings {
                width: d.width,
                height: d.height,
                steps: d.steps,
                guidance: d.guidance,
                guidance_interval: d.guidance_interval.unwrap_or(base.guidance_interval),
                ..base
            },
            None => base,
        }
    }

    /// The taps to use for an LLM of `num_layers` layers (the configured list, or every third).
    pub fn taps_for(&self, num_layers: usize) -> Vec<usize> {
        if self.taps.is_empty() {
            every_third_layer(num_layers)
        } else {
            self.taps.clone()
        }
    }
}

/// Which VAE decodes the latents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "config", rename_all = "snake_case")]
pub enum VaeConfig {
    /// `AutoencoderKL` (FLUX layout).
    Kl(AutoencoderKlConfig),
    /// `AutoencoderTiny` (TAEF1 layout).
    Tiny(AutoencoderTinyConfig),
}

/// `config.json` of a UniFusion model directory (see README "Generate from the command line").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UniFusionConfig {
    /// The VLM (transformers `InternVLConfig` layout).
    pub vlm: InternVlConfig,
    /// The LAP + refiner + DiT (diffusers `Krea2Transformer2DModel` config).
    pub transformer: Krea2Config,
    /// The VAE.
    pub vae: VaeConfig,
    /// Taps, system prompt, rewrite budget.
    #[serde(default)]
    pub pipeline: PipelineConfig,
}
