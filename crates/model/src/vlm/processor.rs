//! Image and text preprocessing for the VLM: InternVL `dynamic_preprocess` tiling, bicubic
//! resize, ImageNet normalisation, the `internvl2_5` chat template and the tokenizer.
//!
//! Tiling mirrors transformers v5.24 `got_ocr2` `get_all_supported_aspect_ratios` /
//! `get_optimal_tiled_canvas` (InternVL's image processor), which agrees with OpenGVLab's
//! `dynamic_preprocess` on every case in `tests/fixtures/vlm/tiling.json`. The resize is
//! Pillow's 8-bit BICUBIC, reproduced bit for bit, so [`preprocess_image`] equals both
//! transformers' `GotOcr2ImageProcessorPil` and OpenGVLab's `load_image` recipe
//! (`tests/fixtures/vlm/preprocess`, Pillow 13 as pinned; older Pillow releases always ran the
//! horizontal pass first, see [`resize_bicubic`]). transformers' torchvision backend resizes
//! with torch's uint8 kernel instead: one level off on a few pixels, and up to 12 levels on
//! the fixture image Pillow resizes vertical pass first.

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

/// Resize with Pillow's BICUBIC filter into `[3][h][w]` values in 0..=255, bit for bit as
/// `Image.resize` does it for 8-bit images (Pillow 13 `libImaging/Resample.c`): the cubic
/// `a = −0.5` kernel widened by the scale when shrinking (antialiasing), weights normalised in
/// f64 then rounded to 22-bit fixed point, two separable passes that each round half up and
/// clamp to u8. The pass order is Pillow's too (it changes the result where the first pass
/// clips): vertical first when the height shrinks by more than twice what the width does.
/// Both reference recipes resize this way (OpenGVLab's `dynamic_preprocess` + torchvision
/// `Resize` on a PIL image, and transformers' `GotOcr2ImageProcessorPil`), so tiles match
/// theirs exactly.
fn resize_bicubic(img: &RgbImage<'_>, out_w: usize, out_h: usize) -> Vec<f32> {
    let (in_w, in_h) = (img.width, img.height);
    let vertical_first = in_h > out_h && (in_h - out_h) as i64 > 2 * (in_w as i64 - out_w as i64);
    let mut px = std::borrow::Cow::Borrowed(img.pixels);
    let (mut w, mut h) = (in_w, in_h);
    let passes: [bool; 2] = if vertical_first {
        [false, true]
    } else {
        [true, false]
    };
    for horizontal in passes {
        if horizontal && w != out_w {
            px = resample_pass(&px, w, h, out_w, true).into();
            w = out_w;
        } else if !horizontal && h != out_h {
            px = resample_pass(&px, w, h, out_h, false).into();
            h = out_h;
        }
    }
    // [h][w][3] → [3][h][w]
    let mut out = vec![0f32; 3 * out_h * out_w];
    for (i, &v) in px.iter().enumerate() {
        let (pixel, ch) = (i / 3, i % 3);
        out[ch * out_h * out_w + pixel] = f32::from(v);
    }
    out
}

/// One separable pass over `[h][w][3]` u8: the width becomes `out` (`horizontal`) or the height.
fn resample_pass(src: &[u8], w: usize, h: usize, out: usize, horizontal: bool) -> Vec<u8> {
    let coeffs = resample_coeffs(if horizontal { w } else { h }, out);
    let (out_w, out_h) = if horizontal { (out, h) } else { (w, out) };
    let mut dst = vec![0u8; out_w * out_h * 3];
    for y in 0..out_h {
        for x in 0..out_w {
            let (start, ks) = &coeffs[if horizontal { x } else { y }];
            for ch in 0..3 {
                let acc = ks.iter().enumerate().fold(ROUND_HALF, |acc, (k, &wt)| {
                    let (sx, sy) = if horizontal {
                        (start + k, y)
                    } else {
                        (x, start + k)
                    };
                    acc + wt * i64::from(src[(sy * w + sx) * 3 + ch])
                });
                dst[(y * out_w + x) * 3 + ch] = clip8(acc);
            }
        }
    }
    dst
}

/// Pillow's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;
/// `1 << (PRECISION_BITS - 1)`: the accumulator's start value, so the final shift rounds half up.
const ROUND_HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: the accumulator shifted down (an arithmetic shift, so a floor), clamped.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Per output index: first input index and fixed-point weights (Pillow `precompute_coeffs` +
/// `normalize_coeffs_8bpc`, with its f64 arithmetic and its truncating casts).
fn resample_coeffs(input: usize, output: usize) -> Vec<(usize, Vec<i64>)> {
    const A: f64 = -0.5;
    const SUPPORT: f64 = 2.0;
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
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    let one = f64::from(1u32 << PRECISION_BITS);
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero; negatives clamp to 0 either way.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).clamp(0, input as i64) as usize;
            let ws: Vec<f64> = (lo..hi)
                .map(|i| filter((i as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = ws.iter().sum();
            let fixed = ws
                .into_iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (lo, fixed)
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
