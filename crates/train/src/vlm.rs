//! Stage 3: the tiny InternVL-layout VLM, trained by causal LM loss in the model crate's own
//! `InternVl` (vision tower → pixel shuffle → `mlp1` → Qwen2).
//!
//! Every sample is the pipeline's VERIFI chat prompt (`chat_tokens` with the VERIFI system
//! prompt, the images' `<IMG_CONTEXT>` blocks, the user's text) followed by the answer, the
//! canonical description of the target scene, and `<|im_end|>`. The loss is the mean
//! next-token cross-entropy over the answer tokens only. Tasks: captioning (one image, no
//! text: VERIFI's image variation), rewriting (a user phrasing), edit rewriting (image +
//! instruction → edited scene) and two-image transfer descriptions.
//!
//! Batches are right-padded; with causal attention the padding (after every real token)
//! cannot reach a real position, so no mask is needed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use burn::module::Module;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use unifusion_model::generator::sampler::SeededNormal;
use unifusion_model::pipeline::config::VERIFI_SYSTEM_PROMPT;
use unifusion_model::pipeline::verifi::{Tokenize, chat_tokens};
use unifusion_model::vlm::processor::{RgbImage, VlmTokenizer, preprocess_image};
use unifusion_model::vlm::weights::transformers_name;
use unifusion_model::vlm::{InternVl, InternVlConfig, KvCache, TextOutput, VlmError, Weights};

use crate::data::{Sample, TaskMix, mix, sample};
use crate::named::{Init, NamedParams, NamedTensors, safetensors_bytes};
use crate::tokenizer::{IM_END, IMG_CONTEXT};
use crate::trainer::{OptimConfig, Stage, Trainable, is_one_shard, one_shard, shard_range};
use crate::{Backend, TrainError};

/// The VLM stage's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VlmStageConfig {
    /// The VLM (transformers `InternVLConfig` layout).
    pub vlm: InternVlConfig,
    /// Rendered image side (one tile: equal to the vision tower's image size).
    pub image_size: u32,
    /// Sequences per step.
    pub batch: usize,
    /// Optimizer and schedule.
    pub optim: OptimConfig,
    /// Task weights.
    pub mix: TaskMix,
    /// Label smoothing ε of the next-token loss: the target puts ε/vocab on every id. Without
    /// it, a continuation training never shows (the shape after "orange" when (orange, square)
    /// is held out) is pushed down without end, and the VLM learns pair statistics that
    /// override what the user wrote; with it, such a token is pushed no lower than any other
    /// wrong one.
    #[serde(default)]
    pub label_smoothing: f32,
    /// Threads a step's batch is split over ([`Trainable::sharded_step`]); each shard's loss
    /// is weighted by its share of the batch's answer tokens, so the sum is the batch's loss.
    #[serde(default = "one_shard", skip_serializing_if = "is_one_shard")]
    pub shards: usize,
}

fn vlm_config(
    vocab: usize,
    image: usize,
    patch: usize,
    vision: (usize, usize, usize),
    text: (usize, usize, usize, usize),
) -> InternVlConfig {
    let mut c = InternVlConfig::tiny();
    c.vision_config.hidden_size = vision.0;
    c.vision_config.num_hidden_layers = vision.1;
    c.vision_config.num_attention_heads = 4;
    c.vision_config.intermediate_size = vision.2;
    c.vision_config.image_size = [image, image];
    c.vision_config.patch_size = [patch, patch];
    c.text_config.vocab_size = vocab;
    c.text_config.hidden_size = text.0;
    c.text_config.num_hidden_layers = text.1;
    c.text_config.num_attention_heads = text.2;
    c.text_config.num_key_value_heads = Some(text.2 / 2);
    c.text_config.intermediate_size = text.3;
    c.image_token_id = IMG_CONTEXT;
    c.image_seq_length = (image / patch / 2).pow(2);
    c
}

impl VlmStageConfig {
    /// The recipe's VLM: 64-px tiles of 8-px patches (16 image tokens), a width-64 ViT of 2
    /// layers, a width-96 Qwen2 of 6 layers (taps 0, 3, 6).
    pub fn recipe(vocab: usize) -> Self {
        Self {
            vlm: vlm_config(vocab, 64, 8, (64, 2, 128), (96, 6, 4, 256)),
            image_size: 64,
            batch: 16,
            optim: OptimConfig {
                // 3200 steps over 4 shards rewrite held-out prompts at 0.789 against 1600's
                // 0.573 (docs/TRAINING.md, run v15).
                steps: 3200,
                lr: 2e-3,
                warmup: 100,
                final_lr_fraction: 0.05,
                weight_decay: 0.01,
                clip_norm: 1.0,
            },
            mix: TaskMix {
                caption: 1.0,
                rewrite: 3.0,
                edit: 1.0,
                transfer: 0.25,
            },
            label_smoothing: 0.1,
            shards: 4,
        }
    }

    /// A few-second config for tests.
    pub fn tiny(vocab: usize) -> Self {
        Self {
            vlm: vlm_config(vocab, 32, 8, (16, 1, 32), (32, 3, 4, 64)),
            image_size: 32,
            batch: 2,
            optim: OptimConfig {
                steps: 30,
                lr: 3e-3,
                warmup: 3,
                final_lr_fraction: 0.5,
                weight_decay: 0.0,
                clip_norm: 1.0,
            },
            mix: TaskMix {
                caption: 1.0,
                rewrite: 1.0,
                edit: 1.0,
                transfer: 1.0,
            },
            label_smoothing: 0.1,
            shards: 1,
        }
    }
}

/// Random VLM tensors under transformers names, found by asking the loader what it needs
/// (the loader names each missing tensor and each wrong shape).
pub fn discover_vlm_tensors(
    config: &InternVlConfig,
    seed: u64,
    device: &Device,
) -> Result<(InternVl, NamedTensors), TrainError> {
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for _ in 0..10_000 {
        let mut rng = SeededNormal::new(seed);
        let tensors: NamedTensors = shapes
            .iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let values = (0..n).map(|_| rng.next_f32()).collect();
                (transformers_name(name), shape.clone(), values)
            })
            .collect();
        let mut weights = Weights::new();
        if !tensors.is_empty() {
            weights
                .add_safetensors(&safetensors_bytes(&tensors)?)
                .map_err(|e| TrainError::Model(e.to_string()))?;
        }
        match InternVl::load(config, &mut weights, device) {
            Ok(model) => return Ok((model, tensors)),
            Err(VlmError::MissingTensor(name)) => {
                shapes.insert(name, vec![1]);
            }
            Err(VlmError::TensorShape { name, expected, .. }) => {
                shapes.insert(name, expected);
            }
            Err(e) => return Err(TrainError::Model(format!("VLM: {e}"))),
        }
    }
    Err(TrainError::Model(
        "VLM: the tensor list does not converge".into(),
    ))
}

/// How a VLM parameter starts, by its transformers name.
fn vlm_init(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if leaf == "bias" {
        Init::Zeros
    } else if name.contains("norm") && shape.len() == 1 {
        Init::Ones
    } else if leaf == "lambda_1" || leaf == "lambda_2" {
        // LayerScale starts at 0.1 (InternViT's `layer_scale_init_value`).
        Init::Const(0.1)
    } else if name.contains("embed") || name.contains("lm_head") || name.contains("cls_token") {
        Init::Normal(0.02)
    } else {
        Init::fan_in(shape)
    }
}

/// Builds the VLM on `device` with its names, initialised for training from `seed`.
pub fn init_vlm(
    config: &InternVlConfig,
    seed: u64,
    device: &Device,
) -> Result<(InternVl, NamedParams), TrainError> {
    let (model, tensors) = discover_vlm_tensors(config, mix(seed, 0x71), device)?;
    let names = NamedParams::discover(&model, &tensors)?;
    let mut rng = SeededNormal::new(mix(seed, 0x72));
    let model = names.init(model, |p| {
        vlm_init(&p.name, &p.shape).values(&p.shape, &mut rng)
    })?;
    Ok((model, names))
}

/// One tokenised batch: ids (right-padded), tiles, and where each row's answer sits.
pub struct VlmBatch {
    /// `[batch][seq]`.
    pub ids: Vec<Vec<u32>>,
    /// Tiles of every row's images, in order.
    pub pixels: Option<Tensor<4>>,
    /// Per row: the prompt length (the answer starts here) and the full length.
    pub spans: Vec<(usize, usize)>,
    /// Per row: positions of its `<IMG_CONTEXT>` tokens.
    pub image_positions: Vec<Vec<usize>>,
    /// Per row: positions of the user's own text (the DiT's rows with VERIFI off).
    pub user_positions: Vec<Vec<usize>>,
}

/// Tokenises `samples` as VERIFI chats with their answers.
pub fn make_batch(
    samples: &[Sample],
    tokenizer: &VlmTokenizer,
    config: &InternVlConfig,
    image_size: u32,
    device: &Device,
) -> Result<VlmBatch, TrainError> {
    let tile = config.vision_config.image_size[0];
    let per_tile = config.tokens_per_tile();
    let mut rows = Vec::new();
    let mut tiles = Vec::new();
    let mut spans = Vec::new();
    let mut image_positions = Vec::new();
    let mut user_positions = Vec::new();
    for s in samples {
        let mut counts = Vec::new();
        for scene in &s.inputs {
            let img = unifusion_world::render(
                scene,
                &unifusion_world::RenderConfig::with_size(image_size),
            )?;
            let rgb = RgbImage {
                width: image_size as usize,
                height: image_size as usize,
                pixels: img.as_raw(),
            };
            let t = preprocess_image(&rgb, tile, 1, 1, device)
                .map_err(|e| TrainError::Model(e.to_string()))?;
            counts.push(t.dims()[0]);
            tiles.push(t);
        }
        let chat = chat_tokens(
            tokenizer,
            VERIFI_SYSTEM_PROMPT,
            &s.prompt,
            &counts,
            per_tile,
            config.image_token_id,
        )
        .map_err(|e| TrainError::Model(e.to_string()))?;
        let mut ids = chat.ids;
        let prompt_len = ids.len();
        ids.extend(
            Tokenize::encode(tokenizer, &s.answer())
                .map_err(|e| TrainError::Tokenizer(e.to_string()))?,
        );
        ids.push(IM_END);
        spans.push((prompt_len, ids.len()));
        image_positions.push(chat.image_positions);
        user_positions.push(chat.user_positions);
        rows.push(ids);
    }
    let len = rows.iter().map(Vec::len).max().unwrap_or(0);
    for r in &mut rows {
        r.resize(len, IM_END);
    }
    Ok(VlmBatch {
        ids: rows,
        pixels: (!tiles.is_empty()).then(|| Tensor::cat(tiles, 0)),
        spans,
        image_positions,
        user_positions,
    })
}

/// One forward over `batch` that runs the rows' shared prefix once: the longest common
/// prefix of the ids before any `<IMG_CONTEXT>` (the chat head with the VERIFI system
/// prompt, about two thirds of a sequence) goes through the decoder at batch 1, its keys
/// and values are repeated over the rows, and the rest of every row continues from them.
/// Causal attention makes this equal to one forward over the whole rows
/// (test `shared_prefix_forward_equals_the_plain_forward`). Returns the outputs of the rest
/// (`[batch, seq − prefix, …]`) and the prefix length.
pub fn forward_shared_prefix(
    model: &InternVl,
    batch: VlmBatch,
    taps: &[usize],
) -> Result<(TextOutput, usize), TrainError> {
    let device = model.text.embed_tokens.device();
    let first = batch.ids.first().cloned().unwrap_or_default();
    let mut prefix = first
        .iter()
        .position(|&id| id == model.image_token_id)
        .unwrap_or(first.len());
    for row in &batch.ids {
        let common = row.iter().zip(&first).take_while(|(a, b)| a == b).count();
        let image = row
            .iter()
            .position(|&id| id == model.image_token_id)
            .unwrap_or(row.len());
        prefix = prefix.min(common).min(image);
    }
    // Every state a caller reads must be computed per row: the user's text, the position
    // that predicts the answer's first token and the answer (a batch of one row, or of rows
    // with one prompt, shares them all otherwise).
    for (row, &(start, _)) in batch.spans.iter().enumerate() {
        let user = batch.user_positions.get(row).and_then(|u| u.first());
        prefix = prefix.min(start.saturating_sub(1));
        prefix = prefix.min(user.copied().unwrap_or(prefix));
    }
    // At least one token must be left per row.
    prefix = prefix.min(first.len().saturating_sub(1));
    let model_err = |e: unifusion_model::vlm::VlmError| TrainError::Model(e.to_string());
    let mut cache = KvCache::new(model.num_layers());
    if prefix > 0 {
        let embeds = model.text.embed(&first[..prefix], &device).unsqueeze::<3>();
        model
            .text
            .forward(embeds, &mut cache, None, &[])
            .map_err(model_err)?;
        cache = cache.expand_batch(batch.ids.len());
    }
    let rest: Vec<Vec<u32>> = batch.ids.iter().map(|r| r[prefix..].to_vec()).collect();
    let embeds = model
        .embed(&rest, batch.pixels, &device)
        .map_err(model_err)?;
    let out = model
        .text
        .forward(embeds, &mut cache, None, taps)
        .map_err(model_err)?;
    Ok((out, prefix))
}

/// Mean next-token cross-entropy over the answers of `batch` (and the number of tokens), with
/// label smoothing `smoothing` (0 = plain): `(1 − ε)·NLL + ε·mean over ids of −log p`.
pub fn lm_loss(
    model: &InternVl,
    batch: VlmBatch,
    smoothing: f32,
) -> Result<(Tensor<1>, usize), TrainError> {
    let device = model.text.embed_tokens.device();
    let seq = batch.ids.first().map(Vec::len).unwrap_or(0);
    let ids = batch.ids.clone();
    let spans = batch.spans.clone();
    let (out, prefix) = forward_shared_prefix(model, batch, &[])?;
    let rest = seq - prefix;
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, &(start, end)) in spans.iter().enumerate() {
        // The answer starts after the prompt, so every predicting position is past the prefix.
        for p in (start - 1).max(prefix)..end - 1 {
            rows.push((b * rest + p - prefix) as i64);
            targets.push(ids[b][p + 1] as i64);
        }
    }
    let n = rows.len();
    let hidden = out.last.dims()[2];
    let states = out.last.reshape([ids.len() * rest, hidden]).select(
        0,
        Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device),
    );
    let logits = model.text.logits(states.unsqueeze::<3>()).squeeze::<2>();
    let logp = log_softmax(logits, 1);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let nll = logp.clone().gather(1, targets).mean().neg();
    if smoothing == 0.0 {
        return Ok((nll, n));
    }
    let uniform = logp.mean().neg();
    Ok((nll * (1.0 - smoothing) + uniform * smoothing, n))
}

/// The VLM stage.
pub struct VlmStage {
    /// Settings.
    pub config: VlmStageConfig,
    seed: u64,
    device: Device,
    tokenizer: VlmTokenizer,
    vlm: Trainable<InternVl>,
}

impl VlmStage {
    /// A fresh stage with the stage-1 tokenizer.
    pub fn new(
        config: VlmStageConfig,
        tokenizer_json: &str,
        seed: u64,
        backend: Backend,
    ) -> Result<Self, TrainError> {
        let tokenizer = VlmTokenizer::from_bytes(tokenizer_json.as_bytes())
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        let device = backend.autodiff();
        let (model, names) = init_vlm(&config.vlm, seed, &device)?;
        let vlm = Trainable::new(model, names, config.optim.clone());
        Ok(Self {
            config,
            seed,
            device,
            tokenizer,
            vlm,
        })
    }

    /// The VLM's tensors under transformers names (`vlm.safetensors`).
    pub fn tensors(&self) -> NamedTensors {
        self.vlm.names.export(self.vlm.model())
    }

    /// The trained VLM on the plain device (frozen, for stage 4 and evaluation).
    pub fn frozen(&self) -> InternVl {
        self.vlm.model().valid()
    }

    /// Greedy VERIFI rewrites of `n` held-out samples per task: the fraction of exact
    /// canonical descriptions, and the per-task examples.
    pub fn evaluate(&self, n: usize) -> Result<serde_json::Value, TrainError> {
        let model = self.frozen();
        let device = self.device.clone().inner();
        let mut out = serde_json::Map::new();
        let tasks = [
            (
                "caption",
                TaskMix {
                    caption: 1.0,
                    rewrite: 0.0,
                    edit: 0.0,
                    transfer: 0.0,
                },
            ),
            (
                "rewrite",
                TaskMix {
                    caption: 0.0,
                    rewrite: 1.0,
                    edit: 0.0,
                    transfer: 0.0,
                },
            ),
            (
                "edit",
                TaskMix {
                    caption: 0.0,
                    rewrite: 0.0,
                    edit: 1.0,
                    transfer: 0.0,
                },
            ),
            (
                "transfer",
                TaskMix {
                    caption: 0.0,
                    rewrite: 0.0,
                    edit: 0.0,
                    transfer: 1.0,
                },
            ),
        ];
        for (name, task) in tasks {
            let mut exact = 0;
            let mut example = serde_json::Value::Null;
            for i in 0..n {
                let s = sample(mix(self.seed, 0xE7A2), i as u64, &task);
                let batch = make_batch(
                    std::slice::from_ref(&s),
                    &self.tokenizer,
                    &self.config.vlm,
                    self.config.image_size,
                    &device,
                )?;
                let prompt = &batch.ids[0][..batch.spans[0].0];
                let generation = pollster::block_on(model.generate(
                    prompt,
                    batch.pixels,
                    &unifusion_model::vlm::GenerateOptions {
                        max_new_tokens: batch.spans[0].1 - batch.spans[0].0 + 8,
                        stop_tokens: vec![IM_END],
                        taps: Vec::new(),
                    },
                ))
                .map_err(|e| TrainError::Model(e.to_string()))?;
                let text = Tokenize::decode(&self.tokenizer, &generation.ids)
                    .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
                let want = s.answer();
                if text.trim() == want {
                    exact += 1;
                }
                if i == 0 {
                    example = serde_json::json!({"prompt": s.prompt, "want": want, "got": text});
                }
            }
            out.insert(
                name.into(),
                serde_json::json!({"exact": exact as f64 / n.max(1) as f64, "example": example}),
            );
        }
        Ok(serde_json::Value::Object(out))
    }
}

impl Stage for VlmStage {
    fn name(&self) -> &'static str {
        "vlm"
    }

    fn steps(&self) -> usize {
        self.config.optim.steps
    }

    fn step(&mut self, k: usize) -> Result<(f32, f64), TrainError> {
        let b = self.config.batch;
        let shards = self.config.shards.clamp(1, b.max(1));
        let (config, device, tokenizer) = (&self.config, &self.device, &self.tokenizer);
        let samples: Vec<Sample> = (0..b)
            .map(|i| sample(mix(self.seed, 0x5A), (k * b + i) as u64, &config.mix))
            .collect();
        let batch_of = |samples: &[Sample]| {
            make_batch(samples, tokenizer, &config.vlm, config.image_size, device)
        };
        if shards == 1 {
            let batch = batch_of(&samples)?;
            let (loss, _) = lm_loss(self.vlm.model(), batch, config.label_smoothing)?;
            return self.vlm.apply(loss, k);
        }
        // Every answer token counts once in the batch's mean: a shard's mean is weighted by
        // its share of the tokens (one prediction per answer token, the prompt's last
        // position predicting the first).
        let batches = (0..shards)
            .map(|shard| {
                let (first, end) = shard_range(b, shard, shards);
                batch_of(&samples[first..end])
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spans = batches.iter().flat_map(|batch| &batch.spans);
        let total = spans.map(|(start, end)| end - start).sum::<usize>().max(1) as f32;
        let batches: Vec<Mutex<Option<VlmBatch>>> =
            batches.into_iter().map(|b| Mutex::new(Some(b))).collect();
        self.vlm.sharded_step(device, k, shards, |model, shard| {
            let batch = batches[shard]
                .lock()
                .ok()
                .and_then(|mut b| b.take())
                .ok_or_else(|| TrainError::Model(format!("shard {shard}'s batch is gone")))?;
            let (loss, n) = lm_loss(model, batch, config.label_smoothing)?;
            Ok(loss * (n as f32 / total))
        })
    }

    fn save(&self, dir: &Path) -> Result<Vec<u64>, TrainError> {
        self.vlm.save(dir)
    }

    fn load(&mut self, dir: &Path, ids: Vec<u64>) -> Result<(), TrainError> {
        self.vlm.load(dir, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trainer::run_stage;

    /// A tokenizer of world text, the tiny stage config and an untrained VLM on Flex.
    fn tiny_vlm() -> (VlmTokenizer, VlmStageConfig, Device, InternVl) {
        let corpus = crate::data::text_corpus(2, 100);
        let json = crate::tokenizer::train_bpe(&corpus, 320).expect("tokenizer");
        let tok = VlmTokenizer::from_bytes(json.as_bytes()).expect("loads");
        let config = VlmStageConfig::tiny(320);
        let device = Device::flex();
        let (model, _) = init_vlm(&config.vlm, 3, &device).expect("vlm");
        (tok, config, device, model)
    }

    #[test]
    fn shared_prefix_forward_equals_the_plain_forward() {
        let (tok, config, device, model) = tiny_vlm();
        let mix = TaskMix {
            caption: 1.0,
            rewrite: 1.0,
            edit: 1.0,
            transfer: 1.0,
        };
        let samples: Vec<Sample> = (0..4).map(|i| sample(8, i, &mix)).collect();
        let batch = || make_batch(&samples, &tok, &config.vlm, 32, &device).expect("batch");
        let taps = [0, 2, 3];
        let b = batch();
        let ids = b.ids.clone();
        let plain = model
            .forward(
                unifusion_model::vlm::VlmInput {
                    ids: &b.ids,
                    pixel_values: b.pixels,
                    attention_mask: None,
                },
                &taps,
            )
            .expect("forward");
        let (shared, prefix) = forward_shared_prefix(&model, batch(), &taps).expect("forward");
        assert!(prefix > 20, "the VERIFI head is shared ({prefix} tokens)");
        let seq = ids[0].len();
        let rest = |t: Tensor<3>| t.narrow(1, prefix, seq - prefix);
        let pairs = plain
            .taps
            .into_iter()
            .zip(shared.taps)
            .map(|((_, a), (_, b))| (rest(a), b))
            .chain([(rest(plain.last), shared.last)]);
        for (a, b) in pairs {
            let (a, b) = (to_vec(a), to_vec(b));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst}");
        }
    }

    /// A batch of one row shares no prefix with another row; the prefix must still stop before
    /// the user's text and the answer, or their states are never computed per row.
    #[test]
    fn a_one_row_batch_keeps_its_prompt_and_answer_out_of_the_prefix() {
        let (tok, config, device, model) = tiny_vlm();
        let mix = TaskMix {
            caption: 0.0,
            rewrite: 1.0,
            edit: 0.0,
            transfer: 0.0,
        };
        let samples = [sample(8, 0, &mix)];
        let batch = make_batch(&samples, &tok, &config.vlm, 32, &device).expect("batch");
        let (start, end) = batch.spans[0];
        let user = batch.user_positions[0][0];
        let (_, prefix) = forward_shared_prefix(&model, batch, &[]).expect("forward");
        assert!(
            prefix > 0 && prefix <= user.min(start - 1),
            "prefix {prefix}"
        );
        let batch = make_batch(&samples, &tok, &config.vlm, 32, &device).expect("batch");
        let (_, n) = lm_loss(&model, batch, 0.0).expect("loss");
        assert_eq!(n, end - start, "every answer token is predicted");
    }

    fn to_vec(t: Tensor<3>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32")
    }

    /// Shards weight their means by their answer tokens, so a sharded step's loss is the
    /// batch's: rows with answers of different lengths split 1 + 2 included.
    #[test]
    fn a_sharded_step_has_the_whole_batch_loss() {
        let json =
            crate::tokenizer::train_bpe(&crate::data::text_corpus(2, 100), 320).expect("tokenizer");
        let loss_with = |shards: usize| {
            let config = VlmStageConfig {
                batch: 3,
                shards,
                ..VlmStageConfig::tiny(320)
            };
            let mut stage = VlmStage::new(config, &json, 4, Backend::Flex).expect("builds");
            stage.step(0).expect("step").0
        };
        // The split only tests the token weighting if rows' answers differ in length: with
        // 2·n₀ = n₁ + n₂ a per-row weighting would give the same loss.
        let config = VlmStageConfig::tiny(320);
        let tok = VlmTokenizer::from_bytes(json.as_bytes()).expect("loads");
        let samples: Vec<Sample> = (0..3)
            .map(|i| sample(mix(4, 0x5A), i, &config.mix))
            .collect();
        let batch = make_batch(
            &samples,
            &tok,
            &config.vlm,
            config.image_size,
            &Device::flex(),
        )
        .expect("batch");
        let n: Vec<usize> = batch.spans.iter().map(|(start, end)| end - start).collect();
        assert_ne!(2 * n[0], n[1] + n[2], "answer tokens {n:?}");

        let (whole, sharded) = (loss_with(1), loss_with(2));
        assert!(
            (whole - sharded).abs() < 1e-5 * whole.abs(),
            "{whole} against {sharded}"
        );
    }

    #[test]
    fn short_run_reduces_the_lm_loss_and_the_checkpoint_loads_in_the_model_crate() {
        let corpus = crate::data::text_corpus(2, 100);
        let json = crate::tokenizer::train_bpe(&corpus, 320).expect("tokenizer");
        let dir = std::env::temp_dir().join(format!("unifusion-vlm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut stage =
            VlmStage::new(VlmStageConfig::tiny(320), &json, 4, Backend::Flex).expect("builds");
        let run = run_stage(&mut stage, &dir, 1000, &mut |_| {}).expect("trains");
        let (first, last) = run.curve.first_last_mean(5);
        // From ≈ ln(vocab) (uniform guessing) down by at least a fifth.
        assert!(last < 0.8 * first, "loss {first} -> {last}");

        // The model crate's loader reads the exported tensors.
        let bytes = safetensors_bytes(&stage.tensors()).expect("bytes");
        let mut w = Weights::new();
        w.add_safetensors(&bytes).expect("parses");
        InternVl::load(&stage.config.vlm, &mut w, &Device::flex()).expect("loads");
        assert!(w.remaining().is_empty(), "unused: {:?}", w.remaining());
        let _ = std::fs::remove_dir_all(&dir);

        // Label smoothing is linear in ε between the plain NLL (ε = 0) and the mean −log p
        // over the vocabulary (ε = 1), which for a trained model is far above the NLL.
        let samples: Vec<Sample> = (0..2).map(|i| sample(7, i, &stage.config.mix)).collect();
        let loss_at = |eps: f32| -> f32 {
            let batch = make_batch(
                &samples,
                &stage.tokenizer,
                &stage.config.vlm,
                stage.config.image_size,
                &stage.device,
            )
            .expect("batch");
            let (loss, _) = lm_loss(stage.vlm.model(), batch, eps).expect("loss");
            loss.into_scalar()
        };
        let (plain, half, uniform) = (loss_at(0.0), loss_at(0.5), loss_at(1.0));
        assert!(uniform > plain + 1.0, "plain {plain}, uniform {uniform}");
        assert!(
            (half - (plain + uniform) / 2.0).abs() < 1e-4 * uniform,
            "{plain} {half} {uniform}"
        );
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// `cargo test --workspace vlm_step_timing -- --ignored --nocapture`: a recipe VLM step
    /// with the shared prefix and the same loss through one plain forward.
    #[test]
    #[ignore]
    fn vlm_step_timing() {
        let corpus = crate::data::text_corpus(0, 2000);
        let json = crate::tokenizer::train_bpe(&corpus, 512).expect("tokenizer");
        let mut stage =
            VlmStage::new(VlmStageConfig::recipe(512), &json, 0, Backend::Flex).expect("builds");
        for k in 0..3 {
            let t = Instant::now();
            stage.step(k).expect("step");
            println!("shared-prefix step: {:.3} s", t.elapsed().as_secs_f64());
        }
        let samples: Vec<Sample> = (0..8).map(|i| sample(1, i, &stage.config.mix)).collect();
        let device = stage.device.clone();
        let batch = || {
            make_batch(&samples, &stage.tokenizer, &stage.config.vlm, 64, &device).expect("batch")
        };
        println!("sequence length {}", batch().ids[0].len());
        let t = Instant::now();
        let (loss, _) = lm_loss(stage.vlm.model(), batch(), 0.0).expect("loss");
        let _ = loss.backward();
        println!(
            "shared prefix, forward + backward: {:.3} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let b = batch();
        let out = stage
            .vlm
            .model()
            .forward(
                unifusion_model::vlm::VlmInput {
                    ids: &b.ids,
                    pixel_values: b.pixels,
                    attention_mask: None,
                },
                &[],
            )
            .expect("forward");
        let _ = out.last.mean().backward();
        println!(
            "plain, forward + backward: {:.3} s",
            t.elapsed().as_secs_f64()
        );
        for batch in [16, 32] {
            let mut config = VlmStageConfig::recipe(512);
            config.batch = batch;
            let mut stage = VlmStage::new(config, &json, 0, Backend::Flex).expect("builds");
            for k in 0..2 {
                let t = Instant::now();
                stage.step(k).expect("step");
                println!("batch {batch}: step {:.3} s", t.elapsed().as_secs_f64());
            }
        }
    }
}
