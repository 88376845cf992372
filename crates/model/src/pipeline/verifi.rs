//! VERIFI (VLM-Enabled Rewriting Injection with Flexible Inference): the VLM rewrites the
//! request in-model, and only the image tokens and the rewritten tokens condition the DiT.
//!
//! The chat prompt is the `internvl2_5` template ([`crate::vlm::processor::chat_prompt`]) with
//! the VERIFI system prompt, tokenised in three parts (template + images, the user's text, the
//! assistant header) so the user's tokens can be located without a second tokenisation. One
//! prefill + greedy decode ([`InternVl::generate`]) yields the rewrite and, at the same time,
//! the tapped hidden states of every prompt and generated token; the condition is
//! `[image-token states ; generated-token states]` stacked over the taps, `[1, L, n_taps, h]`.

use burn::tensor::{Int, Tensor, TensorData};

use super::{PipelineError, UniFusion};
use crate::vlm::processor::{RgbImage, preprocess_image};
use crate::vlm::{GenerateOptions, VlmError, VlmInput};

/// Text ↔ ids for the VLM (the `tokenizer.json` tokenizer, or anything with the same ids).
pub trait Tokenize {
    /// Ids of `text`; special tokens written in the text (`<|im_start|>`, `<img>`, …) map to
    /// their ids; no BOS is added.
    fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String, VlmError>;
}

impl Tokenize for crate::vlm::processor::VlmTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError> {
        crate::vlm::processor::VlmTokenizer::encode(self, text)
    }
    fn decode(&self, ids: &[u32]) -> Result<String, VlmError> {
        crate::vlm::processor::VlmTokenizer::decode(self, ids)
    }
}

/// An RGB8 image owned by the caller of the pipeline, row-major `[height][width][3]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width · height · 3` bytes.
    pub pixels: Vec<u8>,
}

/// Largest accepted input image side (the VLM resizes it to tiles anyway).
pub const MAX_INPUT_SIDE: usize = 8192;

impl Image {
    /// Fails unless the image is non-empty, at most [`MAX_INPUT_SIDE`] a side, and holds
    /// exactly `width · height · 3` bytes.
    pub fn validate(&self) -> Result<(), PipelineError> {
        if self.width == 0 || self.height == 0 {
            return Err(PipelineError::Input(format!(
                "image is {}×{}: it has no pixels",
                self.width, self.height
            )));
        }
        if self.width > MAX_INPUT_SIDE || self.height > MAX_INPUT_SIDE {
            return Err(PipelineError::Input(format!(
                "image is {}×{}: sides above {MAX_INPUT_SIDE} px are not accepted, downscale it first",
                self.width, self.height
            )));
        }
        if self.pixels.len() != self.width * self.height * 3 {
            return Err(PipelineError::Input(format!(
                "image holds {} bytes, {}×{} RGB8 needs {}",
                self.pixels.len(),
                self.width,
                self.height,
                self.width * self.height * 3
            )));
        }
        Ok(())
    }
}

/// The tokenised chat prompt and where its parts sit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTokens {
    /// All ids: template and image placeholders, the user's text, the assistant header.
    pub ids: Vec<u32>,
    /// Positions of the `<IMG_CONTEXT>` placeholders (all tiles of all images, in order).
    pub image_positions: Vec<usize>,
    /// Positions of the user's own text.
    pub user_positions: Vec<usize>,
}

/// Builds the `internvl2_5` chat prompt for `user` with `tiles[i]` tiles for image `i`. The
/// three parts concatenate to exactly `chat_prompt(Some(system), user, tiles, per_tile)`.
pub fn chat_tokens(
    tokenizer: &impl Tokenize,
    system: &str,
    user: &str,
    tiles: &[usize],
    tokens_per_tile: usize,
    image_token_id: u32,
) -> Result<ChatTokens, PipelineError> {
    let mut head = format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n");
    for &t in tiles {
        head.push_str("<img>");
        head.push_str(&"<IMG_CONTEXT>".repeat(t * tokens_per_tile));
        head.push_str("</img>\n");
    }
    let tail = "<|im_end|>\n<|im_start|>assistant\n";
    let head = tokenizer.encode(&head)?;
    let user_ids = if user.is_empty() {
        Vec::new()
    } else {
        tokenizer.encode(user)?
    };
    if user_ids.contains(&image_token_id) {
        return Err(PipelineError::Input(
            "the prompt must not contain the image placeholder token <IMG_CONTEXT>".into(),
        ));
    }
    let tail = tokenizer.encode(tail)?;
    let image_positions: Vec<usize> = head
        .iter()
        .enumerate()
        .filter(|(_, id)| **id == image_token_id)
        .map(|(p, _)| p)
        .collect();
    let expected: usize = tiles.iter().sum::<usize>() * tokens_per_tile;
    if image_positions.len() != expected {
        return Err(PipelineError::Input(format!(
            "the tokenizer turned {expected} <IMG_CONTEXT> placeholders into {} image-token ids; is it the VLM's tokenizer?",
            image_positions.len()
        )));
    }
    let user_positions = (head.len()..head.len() + user_ids.len()).collect();
    let mut ids = head;
    ids.extend(user_ids);
    ids.extend(tail);
    Ok(ChatTokens {
        ids,
        image_positions,
        user_positions,
    })
}

/// The VLM's view of one request, ready for LAP.
#[derive(Clone, Debug)]
pub struct Condition {
    /// `[1, L, n_taps, h]`: the image-token rows first, then the text rows.
    pub states: Tensor<4>,
    /// How many of the `L` rows are image tokens (all tiles and thumbnails of all images).
    pub image_tokens: usize,
    /// The VLM's rewrite (with VERIFI; the stop token included when one was hit), else empty.
    pub rewrite: Vec<u32>,
    /// The chat prompt the VLM saw.
    pub prompt: ChatTokens,
}

impl Condition {
    /// Rows `L`.
    pub fn len(&self) -> usize {
        self.states.dims()[1]
    }

    /// Whether there are no rows (never true for a condition the pipeline built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image-token rows only, `[1, image_tokens, n, h]` (None when there are none).
    pub fn image_part(&self) -> Option<Tensor<4>> {
        (self.image_tokens > 0).then(|| self.states.clone().narrow(1, 0, self.image_tokens))
    }

    /// The text rows only (None when there are none).
    pub fn text_part(&self) -> Option<Tensor<4>> {
        let n = self.len() - self.image_tokens;
        (n > 0).then(|| self.states.clone().narrow(1, self.image_tokens, n))
    }
}

/// `[1, S, h]` per tap → rows `positions` of each, stacked over taps: `[1, P, n, h]`.
fn gather_rows(taps: &[(usize, Tensor<3>)], positions: &[usize]) -> Tensor<4> {
    let parts: Vec<Tensor<4>> = taps
        .iter()
        .map(|(_, t)| {
            let device = t.device();
            let index: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let index =
                Tensor::<1, Int>::from_data(TensorData::new(index, [positions.len()]), &device);
            t.clone().select(1, index).unsqueeze_dim::<4>(2)
        })
        .collect();
    Tensor::cat(parts, 2)
}

impl UniFusion {
    /// Tiles every image: `[tiles, 3, t, t]` for all images, and the tile count of each.
    pub fn tile_images(
        &self,
        images: &[Image],
    ) -> Result<(Option<Tensor<4>>, Vec<usize>), PipelineError> {
        let device = self.device();
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for image in images {
            image.validate()?;
            let rgb = RgbImage {
                width: image.width,
                height: image.height,
                pixels: &image.pixels,
            };
            let tiles = preprocess_image(&rgb, self.tile_size, 1, self.config.max_tiles, &device)?;
            counts.push(tiles.dims()[0]);
            all.push(tiles);
        }
        let pixels = (!all.is_empty()).then(|| Tensor::cat(all, 0));
        Ok((pixels, counts))
    }

    /// The VLM's conditioning for `prompt` and `images`.
    ///
    /// With `verifi`: the VLM rewrites the request greedily (at most `max_rewrite_tokens`) and
    /// the rows are `[image tokens ; rewritten tokens]`; the user's own tokens are dropped.
    /// Without: one forward over the prompt, rows `[image tokens ; the user's tokens]`.
    /// A request that yields no rows at all (no images, nothing to condition on) is
    /// conditioned on the last template token, so the DiT always sees at least one row.
    pub async fn condition(
        &self,
        tokenizer: &impl Tokenize,
        prompt: &str,
        images: &[Image],
        verifi: bool,
    ) -> Result<Condition, PipelineError> {
        let (pixels, tiles) = self.tile_images(images)?;
        let chat = chat_tokens(
            tokenizer,
            &self.config.system_prompt,
            prompt,
            &tiles,
            self.tokens_per_tile,
            self.vlm.image_token_id,
        )?;
        if verifi {
            let generation = self
                .vlm
                .generate(
                    &chat.ids,
                    pixels,
                    &GenerateOptions {
                        max_new_tokens: self.config.max_rewrite_tokens,
                        stop_tokens: self.config.stop_tokens.clone(),
                        taps: self.taps.clone(),
                    },
                )
                .await?;
            let mut parts = Vec::new();
            if !chat.image_positions.is_empty() {
                parts.push(gather_rows(&generation.prompt_taps, &chat.image_positions));
            }
            if !generation.ids.is_empty() {
                let all: Vec<usize> = (0..generation.ids.len()).collect();
                parts.push(gather_rows(&generation.generated_taps, &all));
            }
            if parts.is_empty() {
                parts.push(gather_rows(&generation.prompt_taps, &[chat.ids.len() - 1]));
            }
            Ok(Condition {
                states: Tensor::cat(parts, 1),
                image_tokens: chat.image_positions.len(),
                rewrite: generation.ids,
                prompt: chat,
            })
        } else {
            let ids = vec![chat.ids.clone()];
            let out = self.vlm.forward(
                VlmInput {
                    ids: &ids,
                    pixel_values: pixels,
                    attention_mask: None,
                },
                &self.taps,
            )?;
            let mut rows: Vec<usize> = chat.image_positions.clone();
            rows.extend(&chat.user_positions);
            if rows.is_empty() {
                rows.push(chat.ids.len() - 1);
            }
            Ok(Condition {
                states: gather_rows(&out.taps, &rows),
                image_tokens: chat.image_positions.len(),
                rewrite: Vec::new(),
                prompt: chat,
            })
        }
    }
}
