//! The tasks one UniFusion model serves, and the run that joins everything: conditions (the
//! request's and the empty request's, for CFG) → text tokens → Euler flow-matching with CFG →
//! VAE → RGB8.
//!
//! Zero-shot editing (paper §5, Fig. 15b) conditions the first k% of the steps on the image
//! tokens only and the rest on the rewritten text tokens only.

use std::collections::HashMap;
use std::ops::ControlFlow;

use burn::tensor::{DType, Tensor, TensorData};

use super::condition::Conditioning;
use super::verifi::{Image, Tokenize};
use super::{PipelineError, UniFusion};
use crate::generator::rope::{RopeTable, condition_position_ids};
use crate::generator::sampler::{FlowMatchEuler, Scheduler, Shift, seeded_noise};
use crate::generator::vae::image_to_unit;
use crate::generator::{TextCondition, patchify, unpatchify};

/// What to make.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Task {
    /// A prompt, no images.
    TextToImage,
    /// One image and an instruction.
    Edit,
    /// Two or more images (any aspect ratios) and an instruction.
    MultiReference,
    /// One or more images, no prompt.
    Variation,
    /// One image and an instruction; the first `image_percent`% of the steps see only the
    /// image tokens, the rest only the rewritten text tokens.
    ZeroShotEdit {
        /// k in [0, 100] (paper: 10–20; default [`ZERO_SHOT_DEFAULT_PERCENT`]).
        image_percent: f32,
    },
}

/// The default k of [`Task::ZeroShotEdit`].
pub const ZERO_SHOT_DEFAULT_PERCENT: f32 = 15.0;

/// Largest output side in pixels.
pub const MAX_OUTPUT_SIDE: usize = 4096;

/// One request: the task, the user's text and images.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// What to make.
    pub task: Task,
    /// The user's prompt or instruction (empty for a variation).
    pub prompt: &'a str,
    /// Input images.
    pub images: &'a [Image],
}

impl Request<'_> {
    /// Fails with a message for the user when the request does not fit its task.
    pub fn validate(&self) -> Result<(), PipelineError> {
        let has_prompt = !self.prompt.trim().is_empty();
        let n = self.images.len();
        let bad = |m: &str| Err(PipelineError::Input(m.into()));
        match self.task {
            Task::TextToImage if n > 0 => bad("text-to-image takes no images (use edit)"),
            Task::Edit if n != 1 => {
                bad("edit takes exactly one image (use multi-reference for more)")
            }
            Task::MultiReference if n < 2 => bad("multi-reference takes two or more images"),
            Task::Variation if n == 0 => bad("variation needs at least one image"),
            Task::Variation if has_prompt => bad("variation takes no prompt (use edit)"),
            Task::ZeroShotEdit { .. } if n != 1 => bad("zero-shot edit takes exactly one image"),
            Task::ZeroShotEdit { image_percent } if !(0.0..=100.0).contains(&image_percent) => {
                bad("zero-shot edit: the image-token share of steps must be within 0..=100 %")
            }
            Task::Variation => Ok(()),
            _ if !has_prompt => bad("the prompt is empty"),
            _ => Ok(()),
        }
    }
}

/// A [`Settings::guidance_interval`] that guides every step.
pub const EVERY_STEP: [f32; 2] = [0.0, 1.0];

/// Whether `[low, high]` is a usable [`Settings::guidance_interval`]: `0 ≤ low < high`, both
/// finite (front ends check flags with it before a model loads).
pub fn guidance_interval_is_valid([low, high]: [f32; 2]) -> bool {
    (0.0..high).contains(&low) && high.is_finite()
}

/// Sampling and conditioning settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Output width in pixels (a multiple of [`UniFusion::size_multiple`]).
    pub width: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Euler steps.
    pub steps: usize,
    /// CFG weight `w` (`v = v_null + w·(v − v_null)`; 1 = no guidance, one forward a step).
    pub guidance: f32,
    /// The noise levels `(low, high]` whose steps are guided: a step starting at `σ` in the
    /// interval takes two forwards and the CFG mix, any other step one forward, unguided
    /// (guidance in a limited interval, Kynkäänniemi et al. 2024). `[0, 1]`, the default,
    /// guides every step.
    pub guidance_interval: [f32; 2],
    /// Seed of the initial noise.
    pub seed: u64,
    /// The schedule's μ rule.
    pub shift: Shift,
    /// VERIFI on (rewrite in-model, condition on the rewrite) or off (condition on the
    /// user's own tokens).
    pub verifi: bool,
    /// LAP, LAP with layer dropout, or last layer only.
    pub conditioning: Conditioning,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            width: 1024,
            height: 1024,
            steps: 28,
            guidance: 4.5,
            guidance_interval: EVERY_STEP,
            seed: 0,
            shift: Shift::KREA2,
            verifi: true,
            conditioning: Conditioning::Lap,
        }
    }
}

/// Which condition a step used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The whole condition (image tokens and text tokens).
    Full,
    /// Zero-shot edit, first part: image tokens only.
    ImageTokens,
    /// Zero-shot edit, second part: text tokens only.
    TextTokens,
}

/// Handed to the callback after each step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Steps done (1 after the first).
    pub done: usize,
    /// Steps in all.
    pub total: usize,
    /// The noise level reached.
    pub sigma: f32,
    /// The condition the step used.
    pub phase: Phase,
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct Output {
    /// The image, `settings.width × settings.height`.
    pub image: Image,
    /// The VLM's rewrite (VERIFI), stop token included when hit; empty without VERIFI.
    pub rewrite_ids: Vec<u32>,
    /// The rewrite as text (special tokens skipped).
    pub rewrite: String,
}

/// How closely a caller watches a run ([`UniFusion::run_watched`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watch {
    /// Wait for the device to finish each step before reporting it: honest progress, and a
    /// cancel that lands within one step on an asynchronous device such as WebGPU (where
    /// steps are otherwise only queued).
    pub sync_steps: bool,
    /// Decode a preview of the predicted clean image every this many steps (0 = never).
    pub preview_every: usize,
}

/// What a watched run reports.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step is done (finished on the device when [`Watch::sync_steps`]).
    Step(&'a Progress),
    /// The clean image the model predicts after step `done` (`x − σ·v`, decoded).
    Preview {
        /// Steps done.
        done: usize,
        /// The preview, at the output size.
        image: &'a Image,
    },
}

/// First step that is conditioned on text in a zero-shot edit of `steps` steps.
pub fn zero_shot_switch_step(steps: usize, image_percent: f32) -> usize {
    ((image_percent as f64 / 100.0 * steps as f64).round() as usize).min(steps)
}

impl UniFusion {
    /// Checks the output size and step count.
    pub fn validate_settings(&self, s: &Settings) -> Result<(), PipelineError> {
        let m = self.size_multiple();
        if s.width == 0 || s.height == 0 {
            return Err(PipelineError::Input(format!(
                "output size {}×{} is empty",
                s.width, s.height
            )));
        }
        if s.width > MAX_OUTPUT_SIDE || s.height > MAX_OUTPUT_SIDE {
            return Err(PipelineError::Input(format!(
                "output size {}×{}: sides above {MAX_OUTPUT_SIDE} px are not supported",
                s.width, s.height
            )));
        }
        if !s.width.is_multiple_of(m) || !s.height.is_multiple_of(m) {
            return Err(PipelineError::Input(format!(
                "output size {}×{}: width and height must be multiples of {m}",
                s.width, s.height
            )));
        }
        if s.steps == 0 || s.steps > 1000 {
            return Err(PipelineError::Input("steps must be within 1..=1000".into()));
        }
        if !s.guidance.is_finite() {
            return Err(PipelineError::Input(
                "guidance must be a finite number".into(),
            ));
        }
        if !guidance_interval_is_valid(s.guidance_interval) {
            let [low, high] = s.guidance_interval;
            return Err(PipelineError::Input(format!(
                "guidance interval ({low}, {high}]: need 0 ≤ low < high, both finite"
            )));
        }
        Ok(())
    }

    /// Runs one request end to end. `on_step` sees every step; `Break` cancels.
    pub async fn run(
        &self,
        tokenizer: &impl Tokenize,
        request: &Request<'_>,
        settings: &Settings,
        mut on_step: impl FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Output, PipelineError> {
        self.run_watched(
            tokenizer,
            request,
            settings,
            Watch::default(),
            |e| match e {
                Event::Step(p) => on_step(p),
                Event::Preview { .. } => ControlFlow::Continue(()),
            },
        )
        .await
    }

    /// [`UniFusion::run`] with per-step device sync and previews as `watch` asks; `on_event`
    /// sees every step and preview; `Break` cancels.
    pub async fn run_watched(
        &self,
        tokenizer: &impl Tokenize,
        request: &Request<'_>,
        settings: &Settings,
        watch: Watch,
        mut on_event: impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<Output, PipelineError> {
        request.validate()?;
        self.validate_settings(settings)?;
        let cond = self
            .condition(tokenizer, request.prompt, request.images, settings.verifi)
            .await?;
        let null = if settings.guidance != 1.0 {
            let empty = self.condition(tokenizer, "", &[], settings.verifi).await?;
            Some(self.text_condition(empty.states, &settings.conditioning)?)
        } else {
            None
        };
        let schedule = match request.task {
            Task::ZeroShotEdit { image_percent } => {
                let switch = zero_shot_switch_step(settings.steps, image_percent);
                let image = cond.image_part().ok_or_else(|| {
                    PipelineError::Input("zero-shot edit: the request has no image tokens".into())
                })?;
                let text = cond.text_part().ok_or_else(|| {
                    PipelineError::Input(
                        "zero-shot edit: the VLM wrote no tokens (max_rewrite_tokens = 0?)".into(),
                    )
                })?;
                ConditionSchedule::Switch {
                    image: self.text_condition(image, &settings.conditioning)?,
                    text: self.text_condition(text, &settings.conditioning)?,
                    switch,
                }
            }
            _ => ConditionSchedule::Full {
                cond: self.text_condition(cond.states.clone(), &settings.conditioning)?,
                image_rows: cond.image_tokens,
            },
        };
        let mut run = self.sampling(&schedule, null.as_ref(), settings)?;
        let total = run.total;
        for i in 0..total {
            let (progress, preview_x0) = run.step(i)?;
            if watch.sync_steps {
                // A one-number readback waits for everything queued so far.
                run.x
                    .clone()
                    .sum()
                    .into_data_async()
                    .await
                    .map_err(|e| PipelineError::Device(format!("{e:?}")))?;
            }
            if on_event(Event::Step(&progress)).is_break() {
                return Err(PipelineError::Cancelled { done: i + 1, total });
            }
            if watch.preview_every > 0 && (i + 1) % watch.preview_every == 0 && i + 1 < total {
                let image = self.decode(run.to_latents(preview_x0)?).await?;
                let event = Event::Preview {
                    done: i + 1,
                    image: &image,
                };
                if on_event(event).is_break() {
                    return Err(PipelineError::Cancelled { done: i + 1, total });
                }
            }
        }
        let latents = run.to_latents(run.x.clone())?;
        let image = self.decode(latents).await?;
        let rewrite = if cond.rewrite.is_empty() {
            String::new()
        } else {
            tokenizer.decode(&cond.rewrite)?
        };
        Ok(Output {
            image,
            rewrite_ids: cond.rewrite,
            rewrite,
        })
    }

    /// Seeded noise → Euler flow-matching with CFG → pipeline latents `[1, C, h, w]`
    /// (`h = height / downscale`). The null condition may have any length.
    pub fn sample_latents(
        &self,
        schedule: &ConditionSchedule,
        null: Option<&TextCondition>,
        settings: &Settings,
        mut on_step: impl FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Tensor<4>, PipelineError> {
        let mut run = self.sampling(schedule, null, settings)?;
        let total = run.total;
        for i in 0..total {
            let (progress, _) = run.step(i)?;
            if on_step(&progress).is_break() {
                return Err(PipelineError::Cancelled { done: i + 1, total });
            }
        }
        run.to_latents(run.x.clone())
    }

    /// The sampling loop's state: seeded noise, scheduler, RoPE tables.
    fn sampling<'a>(
        &'a self,
        schedule: &'a ConditionSchedule,
        null: Option<&'a TextCondition>,
        settings: &'a Settings,
    ) -> Result<Sampling<'a>, PipelineError> {
        self.validate_settings(settings)?;
        let device = self.device();
        let (h, w) = (
            settings.height / self.downscale,
            settings.width / self.downscale,
        );
        let p = self.transformer.patch_size;
        let (gh, gw) = (h / p, w / p);
        let noise = seeded_noise::<4>(settings.seed, [1, self.latent_channels, h, w], &device);
        let scheduler = FlowMatchEuler::with_shift(settings.steps, settings.shift, gh * gw);
        Ok(Sampling {
            model: self,
            schedule,
            null,
            settings,
            total: scheduler.steps(),
            scheduler,
            x: patchify(noise, p)?,
            ropes: HashMap::new(),
            grid: (gh, gw),
            device,
        })
    }

    /// Pipeline latents `[1, C, h, w]` → RGB8 (async readback).
    pub async fn decode(&self, latents: Tensor<4>) -> Result<Image, PipelineError> {
        let rgb = image_to_unit(self.vae.decode(latents)?);
        let [_, _, height, width] = rgb.dims();
        let data = (rgb * 255.0)
            .round()
            .permute([0, 2, 3, 1])
            .into_data_async()
            .await
            .map_err(|e| PipelineError::Device(format!("{e:?}")))?;
        let values = data
            .try_to_vec::<f32>()
            .map_err(|e| PipelineError::Device(format!("{e:?}")))?;
        Ok(Image {
            width,
            height,
            pixels: values.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect(),
        })
    }
}

/// One sampling run in progress (see [`UniFusion::sample_latents`]).
struct Sampling<'a> {
    model: &'a UniFusion,
    schedule: &'a ConditionSchedule,
    null: Option<&'a TextCondition>,
    settings: &'a Settings,
    scheduler: FlowMatchEuler,
    total: usize,
    /// The current patchified latents.
    x: Tensor<3>,
    /// RoPE tables by (condition rows, image-token rows among them).
    ropes: HashMap<(usize, usize), RopeTable>,
    /// Latent grid in patches.
    grid: (usize, usize),
    device: burn::tensor::Device,
}

impl Sampling<'_> {
    /// The table for a condition of `len` rows whose first `image_rows` are image tokens.
    fn rope(&mut self, len: usize, image_rows: usize) -> RopeTable {
        let (gh, gw) = self.grid;
        let model = self.model;
        let t = &model.transformer;
        let device = &self.device;
        self.ropes
            .entry((len, image_rows))
            .or_insert_with(|| {
                let ids = condition_position_ids(
                    model.config.image_positions,
                    model.config.text_positions,
                    image_rows,
                    model.tokens_per_tile,
                    len,
                    gh,
                    gw,
                );
                RopeTable::new(&ids, t.rope_axes, t.rope_theta, device)
            })
            .clone()
    }

    /// Whether step `i` mixes in the null condition: guidance on and the step's starting
    /// noise level within the settings' interval.
    fn guided(&self, i: usize) -> bool {
        let [low, high] = self.settings.guidance_interval;
        let sigma = self.scheduler.sigmas()[i];
        self.settings.guidance != 1.0 && sigma > low && sigma <= high
    }

    /// Step `i` (CFG, Euler): advances `x`; returns the progress and the predicted clean
    /// latents `x − σ·v` (patchified) for a preview.
    fn step(&mut self, i: usize) -> Result<(Progress, Tensor<3>), PipelineError> {
        let (cond, image_rows, phase) = self.schedule.at(i);
        let ts = self.scheduler.timestep(i);
        // f32 whatever the precision (the timestep embedding's sinusoids need it).
        let timestep =
            Tensor::<1>::from_data(TensorData::new(vec![ts], [1]), (&self.device, DType::F32));
        let rope = self.rope(cond.tokens.dims()[1], image_rows);
        let t = &self.model.transformer;
        let v = t.forward_with_text(self.x.clone(), cond, timestep.clone(), &rope)?;
        let v = match self.null {
            Some(null) if self.guided(i) => {
                let rope = self.rope(null.tokens.dims()[1], 0);
                let t = &self.model.transformer;
                let v_null = t.forward_with_text(self.x.clone(), null, timestep, &rope)?;
                v_null.clone() + (v - v_null) * self.settings.guidance
            }
            _ => v,
        };
        let sigma = self.scheduler.sigmas()[i + 1];
        self.x = self.scheduler.step(i, self.x.clone(), v.clone());
        let x0 = self.x.clone() - v * sigma;
        let progress = Progress {
            done: i + 1,
            total: self.total,
            sigma,
            phase,
        };
        Ok((progress, x0))
    }

    /// Patchified latents → pipeline latents `[1, C, h, w]`.
    fn to_latents(&self, x: Tensor<3>) -> Result<Tensor<4>, PipelineError> {
        let (gh, gw) = self.grid;
        Ok(unpatchify(x, gh, gw, self.model.transformer.patch_size)?)
    }
}

/// Which text tokens condition which step.
#[allow(clippy::large_enum_variant)] // one per run, never moved in a loop
pub enum ConditionSchedule {
    /// The same condition for every step.
    Full {
        /// The condition.
        cond: TextCondition,
        /// How many of its first rows are image tokens (placed as the model's
        /// [`crate::generator::ImagePositions`] say).
        image_rows: usize,
    },
    /// Image tokens before step `switch`, text tokens from it on.
    Switch {
        /// The image-token condition.
        image: TextCondition,
        /// The text-token condition.
        text: TextCondition,
        /// First text step.
        switch: usize,
    },
}

impl ConditionSchedule {
    /// The condition of step `i`, how many of its first rows are image tokens, and its phase.
    pub fn at(&self, i: usize) -> (&TextCondition, usize, Phase) {
        match self {
            ConditionSchedule::Full { cond, image_rows } => (cond, *image_rows, Phase::Full),
            ConditionSchedule::Switch { image, switch, .. } if i < *switch => {
                (image, image.tokens.dims()[1], Phase::ImageTokens)
            }
            ConditionSchedule::Switch { text, .. } => (text, 0, Phase::TextTokens),
        }
    }
}
