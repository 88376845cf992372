//! The model the worker holds, and the two calls that use it: load a packed model through
//! the one streaming loader ([`unifusion_model::load::load_packed`]) and run a task
//! ([`UniFusion::run`]). Structured progress goes to JS callbacks as plain objects.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::rc::Rc;

use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use serde::{Deserialize, Serialize};
use unifusion_model::load::{LoadedModel, load_packed};
use unifusion_model::pipeline::{Event, Image, Phase, Request, Settings, Task, UniFusion, Watch};
use unifusion_weights::{Manifest, Progress};
use wasm_bindgen::prelude::*;

use crate::device;
use crate::shard_source::{JsShardSource, js_message};

thread_local! {
    static MODEL: RefCell<Option<Rc<LoadedModel>>> = const { RefCell::new(None) };
}

/// A loader progress event, as the JS side sees it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoadProgress {
    /// `fetch`, `verify`, `place` or `done`.
    phase: &'static str,
    shard: usize,
    shards: usize,
    /// Bytes of shards placed on the device.
    bytes_placed: u64,
    bytes_total: u64,
    tensors_done: usize,
    tensors_total: usize,
}

impl From<&Progress> for LoadProgress {
    fn from(p: &Progress) -> Self {
        use unifusion_weights::Phase as P;
        Self {
            phase: match p.phase {
                P::Fetch => "fetch",
                P::Verify => "verify",
                P::Place => "place",
                P::Done => "done",
            },
            shard: p.shard,
            shards: p.shards,
            bytes_placed: p.bytes_done,
            bytes_total: p.bytes_total,
            tensors_done: p.tensors_done,
            tensors_total: p.tensors_total,
        }
    }
}

/// What the page needs to know about a loaded model.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelSummary {
    id: String,
    version: String,
    /// Output sides must be multiples of this.
    size_multiple: usize,
    taps: Vec<usize>,
    max_rewrite_tokens: usize,
    /// The model's own sampler defaults (size, steps, guidance), if it has them.
    defaults: Option<unifusion_model::pipeline::config::SampleDefaults>,
    shards: usize,
    bytes: u64,
}

fn to_js<T: Serialize>(value: &T) -> Result<JsValue, JsValue> {
    value
        .serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .map_err(|e| error(&e.to_string()))
}

/// Loads the packed model `manifest_json` describes onto the page's WebGPU device (call
/// `initDevice` first). Shards come from `fetch_shard(index) => Promise<Uint8Array>`, one at
/// a time; `on_progress(event)` sees each loader phase. Replaces any model loaded before.
#[wasm_bindgen(js_name = loadModel)]
pub async fn load_model(
    manifest_json: &[u8],
    tokenizer_json: &[u8],
    fetch_shard: Function,
    on_progress: Function,
) -> Result<JsValue, JsValue> {
    let device = device()?;
    let manifest = Manifest::from_json(manifest_json)
        .map_err(|e| error(&format!("the model manifest is invalid: {e}")))?;
    // Free the old model's buffers before the new one arrives.
    MODEL.with(|m| m.borrow_mut().take());
    let mut source = JsShardSource::new(fetch_shard);
    let loaded = load_packed(&manifest, &mut source, tokenizer_json, &device, |p| {
        if let Ok(event) = to_js(&LoadProgress::from(p)) {
            // A throwing progress callback must not stop the load.
            let _ = on_progress.call1(&JsValue::NULL, &event);
        }
    })
    .await
    .map_err(|e| error(&e.to_string()))?;
    let summary = ModelSummary {
        id: manifest.model.id.clone(),
        version: manifest.model.version.clone(),
        size_multiple: loaded.model.size_multiple(),
        taps: loaded.model.taps().to_vec(),
        max_rewrite_tokens: loaded.model.config.max_rewrite_tokens,
        defaults: loaded.model.config.defaults.clone(),
        shards: manifest.shards.len(),
        bytes: manifest.total_shard_bytes(),
    };
    MODEL.with(|m| *m.borrow_mut() = Some(Rc::new(loaded)));
    to_js(&summary)
}

/// Drops the loaded model (its device buffers return to burn's pool).
#[wasm_bindgen(js_name = unloadModel)]
pub fn unload_model() {
    MODEL.with(|m| m.borrow_mut().take());
}

/// A task as the page sends it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TaskRequest {
    /// `text-to-image`, `edit`, `multi-reference`, `variation` or `zero-shot-edit`.
    task: String,
    #[serde(default)]
    prompt: String,
    steps: usize,
    guidance: f32,
    seed: u64,
    width: usize,
    height: usize,
    /// VERIFI on (default) or off.
    #[serde(default)]
    verifi: Option<bool>,
    /// Zero-shot edit: share of steps conditioned on image tokens only (percent).
    #[serde(default)]
    zero_shot_percent: Option<f32>,
    /// A preview of the predicted image every this many steps (0 or absent: none).
    #[serde(default)]
    preview_every: Option<usize>,
}

impl TaskRequest {
    fn task(&self) -> Result<Task, JsValue> {
        Ok(match self.task.as_str() {
            "text-to-image" => Task::TextToImage,
            "edit" => Task::Edit,
            "multi-reference" => Task::MultiReference,
            "variation" => Task::Variation,
            "zero-shot-edit" => Task::ZeroShotEdit {
                image_percent: self
                    .zero_shot_percent
                    .unwrap_or(unifusion_model::pipeline::tasks::ZERO_SHOT_DEFAULT_PERCENT),
            },
            other => {
                return Err(error(&format!(
                    "unknown task `{other}` (text-to-image, edit, multi-reference, variation, zero-shot-edit)"
                )));
            }
        })
    }

    /// The request's settings over `base` (the model's own defaults: what the page does not
    /// send, such as the guidance interval, comes from the model).
    fn settings(&self, base: Settings) -> Settings {
        Settings {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            verifi: self.verifi.unwrap_or(true),
            ..base
        }
    }
}

/// `{width, height, channels: 3 | 4, data: Uint8Array}` → RGB8 (alpha dropped: the VLM sees
/// colour only).
fn image_from_js(value: &JsValue, index: usize) -> Result<Image, JsValue> {
    let field = |name: &str| Reflect::get(value, &JsValue::from_str(name)).unwrap_or_default();
    let number = |name: &str| {
        field(name)
            .as_f64()
            .filter(|v| v.fract() == 0.0 && *v >= 0.0)
    };
    let bad = |what: &str| error(&format!("image {}: {what}", index + 1));
    let width = number("width").ok_or_else(|| bad("no integer width"))? as usize;
    let height = number("height").ok_or_else(|| bad("no integer height"))? as usize;
    let channels = number("channels").unwrap_or(4.0) as usize;
    if channels != 3 && channels != 4 {
        return Err(bad("channels must be 3 (RGB) or 4 (RGBA)"));
    }
    let data = field("data")
        .dyn_into::<Uint8Array>()
        .map_err(|_| bad("data is not a Uint8Array"))?;
    let expected = width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(channels))
        .ok_or_else(|| bad("size overflows"))?;
    if data.length() as usize != expected {
        return Err(bad(&format!(
            "{width}×{height}×{channels} needs {expected} bytes, got {}",
            data.length()
        )));
    }
    let bytes = data.to_vec();
    let pixels = if channels == 3 {
        bytes
    } else {
        bytes
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect()
    };
    let image = Image {
        width,
        height,
        pixels,
    };
    image.validate().map_err(|e| bad(&e.to_string()))?;
    Ok(image)
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Full => "full",
        Phase::ImageTokens => "image-tokens",
        Phase::TextTokens => "text-tokens",
    }
}

fn set(target: &Object, key: &str, value: impl Into<JsValue>) {
    // Setting a plain data property on a fresh object cannot fail.
    let _ = Reflect::set(target, &JsValue::from_str(key), &value.into());
}

/// Runs one task on the loaded model. `request` is `{task, prompt, steps, guidance, seed,
/// width, height, verifi?, zeroShotPercent?}`; `images` an array of `{width, height,
/// channels, data}`; `on_step({done, total, sigma, phase})` is called after every sampling
/// step and stops the run by returning `false`. Resolves to `{width, height, data (RGBA
/// Uint8Array), rewrite, rewriteTokens}`.
#[wasm_bindgen(js_name = runTask)]
pub async fn run_task(
    request: JsValue,
    images: Array,
    on_step: Function,
) -> Result<JsValue, JsValue> {
    let request: TaskRequest =
        serde_wasm_bindgen::from_value(request).map_err(|e| error(&format!("bad request: {e}")))?;
    let task = request.task()?;
    let images = images
        .iter()
        .enumerate()
        .map(|(i, v)| image_from_js(&v, i))
        .collect::<Result<Vec<_>, _>>()?;
    let loaded = MODEL
        .with(|m| m.borrow().clone())
        .ok_or_else(|| error("no model is loaded: call loadModel first"))?;
    let LoadedModel { model, tokenizer } = &*loaded;
    let settings = request.settings(model.config.default_settings());
    let watch = Watch {
        // WebGPU only queues work: wait for each step so progress and cancel are real.
        sync_steps: true,
        preview_every: request.preview_every.unwrap_or(0),
    };
    let output = run(
        model,
        tokenizer,
        task,
        &request.prompt,
        &images,
        &settings,
        watch,
        &on_step,
    )
    .await?;
    let result = Object::new();
    set_image(&result, &output.image);
    set(&result, "rewrite", output.rewrite);
    set(&result, "rewriteTokens", output.rewrite_ids.len() as u32);
    Ok(result.into())
}

/// `width`, `height` and RGBA `data` of `image` on `object`.
fn set_image(object: &Object, image: &Image) {
    let rgba: Vec<u8> = image
        .pixels
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    set(object, "width", image.width as u32);
    set(object, "height", image.height as u32);
    set(object, "data", Uint8Array::from(rgba.as_slice()));
}

#[allow(clippy::too_many_arguments)]
async fn run(
    model: &UniFusion,
    tokenizer: &unifusion_model::vlm::processor::VlmTokenizer,
    task: Task,
    prompt: &str,
    images: &[Image],
    settings: &Settings,
    watch: Watch,
    on_step: &Function,
) -> Result<unifusion_model::pipeline::Output, JsValue> {
    let request = Request {
        task,
        prompt,
        images,
    };
    model
        .run_watched(tokenizer, &request, settings, watch, |e| {
            let event = Object::new();
            match e {
                Event::Step(p) => {
                    set(&event, "done", p.done as u32);
                    set(&event, "total", p.total as u32);
                    set(&event, "sigma", p.sigma);
                    set(&event, "phase", phase_name(p.phase));
                }
                Event::Preview { done, image } => {
                    set(&event, "done", done as u32);
                    set(&event, "total", settings.steps as u32);
                    let preview = Object::new();
                    set_image(&preview, image);
                    set(&event, "preview", preview);
                }
            }
            match on_step.call1(&JsValue::NULL, &event) {
                Ok(v) if v == JsValue::FALSE => ControlFlow::Break(()),
                Ok(_) => ControlFlow::Continue(()),
                Err(e) => {
                    web_log(&format!("onStep threw: {}", js_message(&e)));
                    ControlFlow::Continue(())
                }
            }
        })
        .await
        .map_err(|e| match e {
            unifusion_model::pipeline::PipelineError::Cancelled { done, total } => {
                cancelled(done, total)
            }
            other => error(&other.to_string()),
        })
}

/// A JS `Error` named `AbortError`, so the page treats it like any cancelled operation.
fn cancelled(done: usize, total: usize) -> JsValue {
    let e = js_sys::Error::new(&format!("cancelled after {done} of {total} steps"));
    e.set_name("AbortError");
    e.into()
}

/// A JS `Error` with `message`.
pub fn error(message: &str) -> JsValue {
    js_sys::Error::new(message).into()
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = warn)]
    fn web_log(text: &str);
}
