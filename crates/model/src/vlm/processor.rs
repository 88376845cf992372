//! Image and text preprocessing for the VLM: InternVL `dynamic_preprocess` tiling, bicubic
//! resize, ImageNet normalisation, the `internvl2_5` chat template and the tokenizer.
//!
//! Tiling mirrors transformers v5.24 `got_ocr2` `get_all_supported_aspect_ratios` /
//! `get_optimal_tiled_canvas` (InternVL's image processor), which agrees with OpenGVLab's
//! `dynamic_preprocess` on every case in `tests/fixtures/vlm/tiling.json`.

use burn::tensor::{Device, Tensor, TensorData};

use super::VlmError;

/// ImageNet mean (RGB).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// The InternVL2.5/3 default system prompt.
pub const DEFAULT_SYSTEM_PROMPT: &str = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";

/// Candidate grids `(cols, rows)` with `min ≤ cols·rows ≤ max`, cols-major, stable-sorted by
/// tile count.
pub fn candidate_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for cols in 1..=max_tiles {
        for rows in 1..=max_tiles {
            let n = cols * rows;
            if n <= max_tiles && n >= min_tiles {
                v.push((cols, rows));
            }
        }
    }
    v.sort_by_key(|&(c, r)| c * r); // stable, as Python's sorted
    v
}

/// The tile grid `(cols, rows)` for a `width × height` image: the closest aspect ratio; on a
/// tie the later candidate wins if the image area exceeds half the candidate's tile area.
pub fn tile_grid(
    width: usize,
    height: usize,
    tile: usize,
    min_tiles: usize,
    max_tiles: usize,
) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let area = (width * height) as f64;
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    for (c, r) in candidate_grids(min_tiles, max_tiles) {
        let diff = (aspect - c as f64 / r as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff && area > 0.5 * (tile * tile * c * r) as f64 {
            best = (c, r);
        }
    }
    best
}

/// An RGB image, 8 bits per channel, row-major `[height][width][3]`.
pub struct RgbImage<'a> {
    pub width: usize,
    pub height: usize,
    pub pixels: &'a [u8],
}

/// Resize (bicubic, PIL's filter: a = −0.5, antialiased when shrinking) into `[3][h][w]` f32 in 0..255.
fn resize_bicubic(img: &RgbImage<'_>, out_w: usize, out_h: usize) -> Vec<f32> {
    let wx = resample_weights(img.width, out_w);
    let wy = resample_weights(img.height, out_h);
    // Horizontal pass: [h][out_w][3]
    let mut tmp = vec![0f32; img.height * out_w * 3];
    for y in 0..img.height {
        for (x, (start, ws)) in wx.iter().enumerate() {
            for ch in 0..3 {
                let mut s = 0f32;
                for (k, w) in ws.iter().enumerate() {
                    s += w * img.pixels[(y * img.width + start + k) * 3 + ch] as f32;
                }
                tmp[(y * out_w + x) * 3 + ch] = s.clamp(0.0, 255.0).round();
            }
        }
    }
    let mut out = vec![0f32; 3 * out_h * out_w];
    for (y, (start, ws)) in wy.iter().enumerate() {
        for x in 0..out_w {
            for ch in 0..3 {
                let mut s = 0f32;
                for (k, w) in ws.iter().enumerate() {
                    s += w * tmp[((start + k) * out_w + x) * 3 + ch];
                }
                out[(ch * out_h + y) * out_w + x] = s.clamp(0.0, 255.0).round();
            }
        }
    }
    out
}

/// Per output index: first input index and normalised weights (PIL `precompute_coeffs`).
fn resample_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    const A: f64 = -0.5;
    let filter = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let fscale = scale.max(1.0);
    let support = 2.0 * fscale;
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(input);
            let mut ws: Vec<f64> = (lo..hi)
                .map(|i| filter((i as f64 - center + 0.5) / fscale))
                .collect();
            let total: f64 = ws.iter().sum();
            if total != 0.0 {
                ws.iter_mut().for_each(|w| *w /= total);
            }
            (lo, ws.into_iter().map(|w| w as f32).collect())
        })
        .collect()
}

/// Tiles of one image, ready for the vision tower: `[tiles, 3, tile, tile]` normalised,
/// row-major crops of the resized image, then the thumbnail when there is more than one tile.
pub fn preprocess_image(
    img: &RgbImage<'_>,
    tile: usize,
    min_tiles: usize,
    max_tiles: usize,
    device: &Device,
) -> Result<Tensor<4>, VlmError> {
    if img.width == 0 || img.height == 0 || img.pixels.len() != img.width * img.height * 3 {
        return Err(VlmError::Input(format!(
            "image: {} bytes for {}×{} RGB",
            img.pixels.len(),
            img.width,
            img.height
        )));
    }
    let (cols, rows) = tile_grid(img.width, img.height, tile, min_tiles, max_tiles);
    let (w, h) = (cols * tile, rows * tile);
    let big = resize_bicubic(img, w, h);
    let mut data = Vec::new();
    for i in 0..cols * rows {
        let (c, r) = (i % cols, i / cols);
        for ch in 0..3 {
            for y in 0..tile {
                let row = (ch * h + r * tile + y) * w + c * tile;
                data.extend(big[row..row + tile].iter().map(|&v| normalise(v, ch)));
            }
        }
    }
    let mut n = cols * rows;
    if n > 1 {
        let thumb = resize_bicubic(img, tile, tile);
        data.extend(
            thumb
                .iter()
                .enumerate()
                .map(|(i, &v)| normalise(v, i / (tile * tile))),
        );
        n += 1;
    }
    Ok(Tensor::from_data(
        TensorData::new(data, [n, 3, tile, tile]),
        device,
    ))
}

fn normalise(v: f32, ch: usize) -> f32 {
    (v / 255.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
}

/// The `internvl2_5` chat template for one user turn; `tiles[i]` image tokens blocks of
/// `tokens_per_tile · tiles[i]` `<IMG_CONTEXT>` each, placed before the user text.
pub fn chat_prompt(
    system: Option<&str>,
    user: &str,
    tiles: &[usize],
    tokens_per_tile: usize,
) -> String {
    let system = system.unwrap_or(DEFAULT_SYSTEM_PROMPT);
    let mut s = format!("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n");
    for &t in tiles {
        s.push_str("<img>");
        s.push_str(&"<IMG_CONTEXT>".repeat(t * tokens_per_tile));
        s.push_str("</img>\n");
    }
    s.push_str(user);
    s.push_str("<|im_end|>\n<|im_start|>assistant\n");
    s
}

/// A tokenizer from `tokenizer.json` bytes (no files, no network).
pub struct VlmTokenizer {
    inner: tokenizers::Tokenizer,
}

impl VlmTokenizer {
    /// Parse `tokenizer.json`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, VlmError> {
        tokenizers::Tokenizer::from_bytes(bytes)
            .map(|inner| Self { inner })
            .map_err(|e| VlmError::Tokenizer(e.to_string()))
    }
    /// Ids of `text` (special tokens in the text are recognised; no BOS is added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| VlmError::Tokenizer(e.to_string()))
    }
    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, VlmError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| VlmError::Tokenizer(e.to_string()))
    }
    /// Id of a token such as `<|im_end|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
