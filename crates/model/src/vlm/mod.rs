//! The frozen vision-language encoder (InternVL3 layout): InternViT → pixel shuffle → `mlp1`
//! → Qwen2, with hidden-state taps and KV-cache greedy generation for VERIFI.
//!
//! Mirrors transformers v5.24 `InternVLForConditionalGeneration`
//! (<https://github.com/huggingface/transformers/tree/v5.24.0/src/transformers/models/internvl>).
//!
//! - [`config`]: serde configs (transformers and original OpenGVLab), named variants.
//! - [`weights`]: checkpoint bytes → tensors, the one key-rename table.
//! - [`vision`]: InternViT, pixel shuffle, projector.
//! - [`text`]: the Qwen2 decoder, KV cache, taps.
//! - [`generate`]: greedy decoding that also returns the generated tokens' taps.
//! - [`processor`]: tiling (`dynamic_preprocess`), normalisation, chat template, tokenizer.

pub mod config;
pub mod generate;
pub mod processor;
pub mod text;
pub mod vision;
pub mod weights;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

pub use config::InternVlConfig;
pub use generate::{GenerateOptions, Generation};
pub use text::{KvCache, TextOutput};
pub use weights::Weights;

/// Everything that can go wrong with configs, weights and inputs from outside.
#[derive(Debug, thiserror::Error)]
pub enum VlmError {
    /// The config is malformed or asks for something unsupported.
    #[error("VLM config: {0}")]
    Config(String),
    /// The checkpoint could not be read.
    #[error("VLM weights: {0}")]
    Weights(String),
    /// A tensor the model needs is not in the checkpoint.
    #[error(
        "VLM weights: missing tensor `{0}` (canonical name; see vlm::weights for the accepted spellings)"
    )]
    MissingTensor(String),
    /// A checkpoint tensor has the wrong shape for the config.
    #[error("VLM weights: tensor `{name}` has shape {got:?}, the config needs {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// Inputs do not fit the model (shapes, token counts, ranges).
    #[error("VLM input: {0}")]
    Input(String),
    /// Reading a tensor back from the device failed.
    #[error("VLM device readback: {0}")]
    Device(String),
    /// The tokenizer file or an encode/decode failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// The whole VLM.
#[derive(Module, Debug)]
pub struct InternVl {
    pub vision: vision::VisionTower,
    pub projector: vision::Projector,
    pub text: text::Qwen2Model,
    /// `<IMG_CONTEXT>` id.
    pub image_token_id: u32,
}

/// Token ids (row-major `[batch, seq]`) and optional images and padding mask.
pub struct VlmInput<'a> {
    /// `[batch][seq]` token ids, all rows equally long.
    pub ids: &'a [Vec<u32>],
    /// `[tiles, 3, h, w]` normalised tiles; their tokens fill the `<IMG_CONTEXT>` slots in order.
    pub pixel_values: Option<Tensor<4>>,
    /// `[batch][seq]`, `true` = real token (None: all real).
    pub attention_mask: Option<&'a [Vec<bool>]>,
}

impl InternVl {
    /// Build the model from a config and checkpoint tensors; errors name a missing or
    /// mis-shaped tensor. Tensors the model does not use are left in `weights`.
    pub fn load(
        config: &InternVlConfig,
        weights: &mut Weights,
        device: &Device,
    ) -> Result<Self, VlmError> {
        config.validate()?;
        let tie = config.tie_word_embeddings && !weights.contains("lm_head.weight");
        Ok(Self {
            vision: vision::VisionTower::load(config, weights, device)?,
            projector: vision::Projector::load(config, weights, device)?,
            text: text::Qwen2Model::load(&config.text_config, tie, weights, device)?,
            image_token_id: config.image_token_id,
        })
    }

    /// Image tokens of `pixels` `[tiles, 3, h, w]` → `[tiles, tokens_per_tile, hidden]`.
    pub fn image_features(&self, pixels: Tensor<4>) -> Result<Tensor<3>, VlmError> {
        let [_, _, h, w] = pixels.dims();
        let grid = [h / self.vision.patch_size[0], w / self.vision.patch_size[1]];
        let r = self.projector.factor;
        if !grid[0].is_multiple_of(r) || !grid[1].is_multiple_of(r) {
            return Err(VlmError::Input(format!(
                "pixel_values: patch grid {grid:?} does not divide by the pixel-shuffle factor {r}"
            )));
        }
        let features = self.vision.forward(pixels)?;
        Ok(self.projector.forward(features, grid))
    }

    /// Input embeddings `[batch, seq, hidden]`: token embeddings with the image tokens
    /// scattered, in order, into the `<IMG_CONTEXT>` positions.
    pub fn embed(
        &self,
        ids: &[Vec<u32>],
        pixel_values: Option<Tensor<4>>,
        device: &Device,
    ) -> Result<Tensor<3>, VlmError> {
        let batch = ids.len();
        let seq = ids.first().map(Vec::len).unwrap_or(0);
        if batch == 0 || seq == 0 || ids.iter().any(|r| r.len() != seq) {
            return Err(VlmError::Input(
                "input_ids must be a non-empty [batch, seq] array with equal rows".into(),
            ));
        }
        let vocab = self.text.vocab_size();
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(bad) = flat.iter().find(|&&i| i as usize >= vocab) {
            return Err(VlmError::Input(format!(
                "input_ids: token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let text = self.text.embed(&flat, device);
        let hidden = text.dims()[1];
        let slots = flat.iter().filter(|&&i| i == self.image_token_id).count();
        let embeds = match pixel_values {
            None if slots == 0 => text,
            None => {
                return Err(VlmError::Input(format!(
                    "input_ids hold {slots} <IMG_CONTEXT> tokens but no pixel_values were given"
                )));
            }
            Some(pixels) => {
                let image = self.image_features(pixels)?;
                let [t, per, _] = image.dims();
                if t * per != slots {
                    return Err(VlmError::Input(format!(
                        "image features and image tokens do not match: {t} tiles × {per} tokens vs {slots} <IMG_CONTEXT> tokens in input_ids"
                    )));
                }
                // One gather over [text rows ; image rows] (= torch `masked_scatter`).
                let mut k = 0;
                let index: Vec<i64> = flat
                    .iter()
                    .enumerate()
                    .map(|(p, &id)| {
                        if id == self.image_token_id {
                            k += 1;
                            (flat.len() + k - 1) as i64
                        } else {
                            p as i64
                        }
                    })
                    .collect();
                let table = Tensor::cat(vec![text, image.reshape([t * per, hidden])], 0);
                let index =
                    Tensor::<1, Int>::from_data(TensorData::new(index, [flat.len()]), device);
                table.select(0, index)
            }
        };
        Ok(embeds.reshape([batch, seq, hidden]))
    }

    /// One full forward: the requested hidden-state taps and the final-norm states.
    pub fn forward(&self, input: VlmInput<'_>, taps: &[usize]) -> Result<TextOutput, VlmError> {
        let device = self.text.embed_tokens.device();
        let embeds = self.embed(input.ids, input.pixel_values, &device)?;
        let mut cache = KvCache::new(self.text.layers.len());
        self.text
            .forward(embeds, &mut cache, input.attention_mask, taps)
    }

    /// Number of decoder layers (taps run over `0..=num_layers`).
    pub fn num_layers(&self) -> usize {
        self.text.layers.len()
    }
}
