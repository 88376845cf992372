//! A quick check of a trained model directory through the real pipeline: text-to-image on
//! fresh prompts (VERIFI on, the pipeline's default sampler with the given steps and
//! guidance), each image judged by the world's exact judge; and a contact sheet of the
//! results. Not the benchmark (that is `unifusion eval`): a smoke test of the recipe's output.

use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use unifusion_model::load::{UnpackedModel, load_unpacked};
use unifusion_model::pipeline::{Request, Settings, Task, UniFusion};
use unifusion_model::vlm::processor::VlmTokenizer;
use unifusion_world::phrase;
use unifusion_world::score::{micro_average, score_scene};

use crate::TrainError;
use crate::data::{mix, scene};

/// What [`quick_eval`] measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuickEval {
    /// Prompts generated.
    pub prompts: usize,
    /// Judge micro average over all images.
    pub micro: f64,
    /// How many VERIFI rewrites equal the canonical description exactly.
    pub exact_rewrites: usize,
    /// Seconds per image.
    pub seconds_per_image: f64,
}

/// Loads a model directory (`config.json`, `tokenizer.json`, `vlm.safetensors`,
/// `transformer.safetensors`, `vae.safetensors`).
pub fn load_model_dir(
    dir: &Path,
    device: &Device,
) -> Result<(UniFusion, VlmTokenizer), TrainError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| TrainError::io(&p, e))
    };
    let loaded = load_unpacked(
        &UnpackedModel {
            config_json: &read("config.json")?,
            tokenizer_json: &read("tokenizer.json")?,
            vlm: &read("vlm.safetensors")?,
            transformer: &read("transformer.safetensors")?,
            vae: &read("vae.safetensors")?,
        },
        device,
    )
    .map_err(|e| TrainError::Model(e.to_string()))?;
    Ok((loaded.model, loaded.tokenizer))
}

/// Generates `n` fresh prompts with `base` (size, steps, guidance, VERIFI and pooling; the
/// seed is the prompt's index), judges them, and writes `samples.png` (rendered target above
/// each generated image) into `out`.
pub fn quick_eval(
    model_dir: &Path,
    out: &Path,
    seed: u64,
    n: usize,
    base: &Settings,
) -> Result<QuickEval, TrainError> {
    let device = Device::flex();
    let (model, tokenizer) = load_model_dir(model_dir, &device)?;
    let size = base.width;
    let began = std::time::Instant::now();
    let mut scores = Vec::new();
    let mut tiles = Vec::new();
    let mut exact = 0;
    for i in 0..n {
        let target = scene(mix(seed, 0xE7A3), i as u64);
        let phrasing = phrase(&target, mix(seed, 0xE7A4 + i as u64));
        let settings = Settings {
            seed: i as u64,
            ..base.clone()
        };
        let request = Request {
            task: Task::TextToImage,
            prompt: &phrasing.text,
            images: &[],
        };
        let output = pollster::block_on(model.run(&tokenizer, &request, &settings, |_| {
            std::ops::ControlFlow::Continue(())
        }))
        .map_err(|e| TrainError::Model(e.to_string()))?;
        if output.rewrite.trim() == phrasing.rewrite_target(&target) {
            exact += 1;
        }
        let img = image::RgbImage::from_raw(size as u32, size as u32, output.image.pixels)
            .ok_or_else(|| TrainError::Model("image buffer size".into()))?;
        let parsed = unifusion_world::parse_image(&img)?;
        scores.push(score_scene(&target, &parsed));
        tiles.push(unifusion_world::render(
            &target,
            &unifusion_world::RenderConfig::with_size(size as u32),
        )?);
        tiles.push(img);
    }
    // Two rows per column: target above, generated below.
    let cols = n as u32;
    let mut sheet = image::RgbImage::new(cols * size as u32, 2 * size as u32);
    for (k, tile) in tiles.iter().enumerate() {
        let (col, row) = ((k / 2) as u32, (k % 2) as u32);
        image::imageops::replace(
            &mut sheet,
            tile,
            (col * size as u32) as i64,
            (row * size as u32) as i64,
        );
    }
    let path = out.join("samples.png");
    sheet
        .save(&path)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))?;
    Ok(QuickEval {
        prompts: n,
        micro: micro_average(&scores),
        exact_rewrites: exact,
        seconds_per_image: began.elapsed().as_secs_f64() / n.max(1) as f64,
    })
}
