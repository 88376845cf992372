//! Checkpoint layouts `unifusion pack` converts, and the check of every converted tensor
//! against the model config.
//!
//! Manifest names are `<component>.<name>`, the spelling `unifusion_model::load` reads:
//!
//! | `--from LAYOUT=` | checkpoint | manifest name |
//! |---|---|---|
//! | `internvl` | OpenGVLab InternVL (`vision_model.*`, fused `attn.qkv`, `mlp1.N`, `language_model.*`) | `vlm.` + transformers name (`model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight`); `qkv` split in thirds |
//! | `internvl-hf` | transformers `save_pretrained` or `state_dict()` names | same |
//! | `krea2` | Krea 2 original / ComfyUI (`blocks.N.attn.wq`, `txtfusion.*`, `model.diffusion_model.` prefix) | `transformer.` + diffusers name; flat `mod.lin` vectors become `[6, D]` / `[2, D]` tables; keys that are not transformer weights are dropped |
//! | `krea2-diffusers` | diffusers `Krea2Transformer2DModel` | `transformer.` + the same name |
//! | `vae-diffusers` | diffusers `AutoencoderKL` / `AutoencoderTiny` | `vae.` + the same name |
//! | `project` | already manifest names | unchanged |
//!
//! Renames come from the model crate's own tables ([`canonical_name`], [`krea2_original_key`]),
//! not from copies here. The expected tensor list is not a table either: it is what the
//! model's loaders ask for when they build the model of `--config` from a recording source
//! ([`Recorder`], [`Weights::recording`]) that answers with zeros.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};
use unifusion_model::generator::Krea2Transformer;
use unifusion_model::generator::params::{LoadError, ParamSource, krea2_original_key};
use unifusion_model::generator::tiny_vae::{AutoencoderTiny, TinyDecoder};
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::pipeline::{UniFusionConfig, VaeConfig};
use unifusion_model::vlm::weights::{CanonicalName, canonical_name, transformers_name};
use unifusion_model::vlm::{InternVl, InternVlConfig, Weights};
use unifusion_weights::Dtype;

use super::Layout;

/// The model part a tensor belongs to: the first segment of its manifest name.
pub const COMPONENTS: [&str; 3] = ["vlm", "transformer", "vae"];

/// Which bytes of the source tensor a converted tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// All of it.
    Whole,
    /// The `i`-th third along the first axis (q, k, v of a fused `qkv`).
    Third(usize),
}

/// One converted tensor: manifest name and shape, and where its bytes are.
#[derive(Clone, Debug)]
pub struct Converted {
    /// Manifest name.
    pub name: String,
    /// Shape in the manifest.
    pub shape: Vec<u64>,
    /// Which bytes of the source tensor.
    pub part: Part,
}

/// What a layout does with one checkpoint key.
pub enum Renamed {
    /// Written under these names.
    Keep(Vec<Converted>),
    /// Not a weight of this component (e.g. a text encoder bundled with a Krea 2 file).
    Drop,
}

/// Key prefixes each VLM layout is spelled with (`language_model.` is shared: Qwen2 keys are
/// the same in both).
const INTERNVL_ORIGINAL: [&str; 3] = ["vision_model.", "mlp1.", "language_model."];
const INTERNVL_HF: [&str; 7] = [
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "language_model.",
    "model.language_model.",
    "lm_head.",
];

/// The manifest name(s) of checkpoint key `key` of shape `shape` in `layout`.
pub fn rename(layout: Layout, key: &str, shape: &[u64]) -> Result<Renamed, String> {
    let whole = |name: String, shape: &[u64]| {
        Renamed::Keep(vec![Converted {
            name,
            shape: shape.to_vec(),
            part: Part::Whole,
        }])
    };
    match layout {
        Layout::Project => Ok(whole(key.to_owned(), shape)),
        Layout::Internvl | Layout::InternvlHf => {
            let (own, other, other_flag) = if layout == Layout::Internvl {
                (&INTERNVL_ORIGINAL[..], &INTERNVL_HF[..], "internvl-hf")
            } else {
                (&INTERNVL_HF[..], &INTERNVL_ORIGINAL[..], "internvl")
            };
            if !own.iter().any(|p| key.starts_with(p)) {
                let hint = if other.iter().any(|p| key.starts_with(p)) {
                    format!(" (it is spelled like --from {other_flag}=...)")
                } else {
                    String::new()
                };
                return Err(format!(
                    "tensor `{key}` is not an InternVL name of this layout{hint}"
                ));
            }
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            match canonical_name(key, &dims).map_err(|e| e.to_string())? {
                CanonicalName::One(n) => Ok(whole(format!("vlm.{}", transformers_name(&n)), shape)),
                CanonicalName::SplitQkv(names) => {
                    let mut part_shape = shape.to_vec();
                    part_shape[0] /= 3;
                    Ok(Renamed::Keep(
                        names
                            .iter()
                            .enumerate()
                            .map(|(i, n)| Converted {
                                name: format!("vlm.{}", transformers_name(n)),
                                shape: part_shape.clone(),
                                part: Part::Third(i),
                            })
                            .collect(),
                    ))
                }
            }
        }
        Layout::Krea2 => {
            let Some(name) = krea2_original_key(key) else {
                return Ok(Renamed::Drop);
            };
            // Flat modulation vectors (`blocks.N.mod.lin` [6·D], `last.modulation.lin` [2·D])
            // are diffusers' [6, D] / [2, D] tables: same bytes, another shape.
            let shape = if name.ends_with(".scale_shift_table") && shape.len() == 1 {
                let rows = if name.starts_with("transformer_blocks.") {
                    6
                } else {
                    2
                };
                if !shape[0].is_multiple_of(rows) {
                    return Err(format!(
                        "tensor `{key}` has shape {shape:?}: a modulation vector needs a length that divides by {rows}"
                    ));
                }
                vec![rows, shape[0] / rows]
            } else {
                shape.to_vec()
            };
            Ok(whole(format!("transformer.{name}"), &shape))
        }
        Layout::Krea2Diffusers => Ok(whole(format!("transformer.{key}"), shape)),
        Layout::VaeDiffusers => Ok(whole(format!("vae.{key}"), shape)),
    }
}

/// A [`ParamSource`] that records every `(name, shape)` a loader asks for. The tensors it
/// returns are zero-filled (`calloc`: pages the loaders never touch are never mapped).
#[derive(Default)]
pub(crate) struct Recorder {
    /// `(name, shape)` of every tensor asked for, by name.
    pub(crate) asked: BTreeMap<String, Vec<usize>>,
}

impl ParamSource for Recorder {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        self.asked.insert(name.to_owned(), shape.to_vec());
        let n = shape.iter().product();
        Ok(Tensor::from_data(
            TensorData::new(vec![0f32; n], shape),
            device,
        ))
    }
}

/// The VLM's tensors: one load from a [`Weights::recording`] set, which answers every
/// request with zeros and records it.
fn vlm_expected(
    config: &InternVlConfig,
    device: &Device,
) -> Result<BTreeMap<String, Vec<usize>>, String> {
    config.validate().map_err(|e| format!("vlm config: {e}"))?;
    let mut weights = Weights::recording();
    InternVl::load(config, &mut weights, device).map_err(|e| format!("vlm config: {e}"))?;
    Ok(weights
        .recorded()
        .iter()
        .map(|(name, shape)| (format!("vlm.{}", transformers_name(name)), shape.clone()))
        .collect())
}

/// Every tensor `config` needs, by manifest name. `vae_encoder`: the VAE input carries an
/// encoder, so the whole autoencoder is expected (else the decoder side only).
fn expected(
    config: &UniFusionConfig,
    component: &str,
    vae_encoder: bool,
) -> Result<BTreeMap<String, Vec<usize>>, String> {
    let device = Device::flex();
    if component == "vlm" {
        return vlm_expected(&config.vlm, &device);
    }
    let mut rec = Recorder::default();
    let built = match (component, &config.vae) {
        ("transformer", _) => {
            Krea2Transformer::load(&config.transformer, &mut rec, &device).map(drop)
        }
        ("vae", VaeConfig::Kl(c)) if vae_encoder => {
            AutoencoderKl::load(c, &mut rec, &device).map(drop)
        }
        ("vae", VaeConfig::Kl(c)) => AutoencoderKl::load_decoder(c, &mut rec, &device).map(drop),
        ("vae", VaeConfig::Tiny(c)) if vae_encoder => {
            AutoencoderTiny::load(c, &mut rec, &device).map(drop)
        }
        ("vae", VaeConfig::Tiny(c)) => TinyDecoder::load(c, &mut rec, "decoder", &device).map(drop),
        _ => return Err(format!("no component `{component}`")),
    };
    built.map_err(|e| format!("{component} config: {e}"))?;
    Ok(rec
        .asked
        .into_iter()
        .map(|(name, shape)| (format!("{component}.{name}"), shape))
        .collect())
}

/// How many tensors of each kind of problem an error lists by name (the rest are counted).
const MAX_LISTED: usize = 4;

/// A converted tensor's manifest entry, for the check.
pub struct Entry<'a> {
    /// Manifest name.
    pub name: &'a str,
    /// dtype in the input.
    pub dtype: Dtype,
    /// Shape in the manifest.
    pub shape: &'a [u64],
}

/// Checks the tensors of every component that has any against what `config`'s loaders ask
/// for: each missing, unexpected, mis-shaped or non-float tensor is named (the first few of
/// each kind, with counts). Tensors outside the three components are errors too.
pub fn check(config: &UniFusionConfig, entries: &[Entry<'_>]) -> Result<(), String> {
    let mut by_component: BTreeMap<&str, Vec<&Entry<'_>>> = BTreeMap::new();
    for e in entries {
        let component = e.name.split_once('.').map_or(e.name, |(c, _)| c);
        if !COMPONENTS.contains(&component) {
            return Err(format!(
                "tensor `{}` belongs to no component (names start with `vlm.`, `transformer.` or `vae.`)",
                e.name
            ));
        }
        by_component.entry(component).or_default().push(e);
    }
    let mut problems = Vec::new();
    for (component, got) in &by_component {
        let vae_encoder = got.iter().any(|e| e.name.starts_with("vae.encoder."));
        let mut want = expected(config, component, vae_encoder)?;
        let mut unexpected = Vec::new();
        let mut wrong = Vec::new();
        for e in got {
            if !e.dtype.is_convertible_float() {
                wrong.push(format!(
                    "`{}` is {}, the model takes float tensors",
                    e.name, e.dtype
                ));
            }
            match want.remove(e.name) {
                None => unexpected.push(e.name),
                Some(shape) => {
                    let got_shape: Vec<usize> = e.shape.iter().map(|&d| d as usize).collect();
                    if got_shape != shape {
                        wrong.push(format!(
                            "`{}` has shape {got_shape:?}, the config needs {shape:?}",
                            e.name
                        ));
                    }
                }
            }
        }
        if wrong.len() > MAX_LISTED {
            let more = wrong.len() - MAX_LISTED;
            wrong.truncate(MAX_LISTED);
            wrong.push(format!("{more} more mismatches in {component}"));
        }
        problems.extend(wrong);
        let missing: Vec<&str> = want.keys().map(String::as_str).collect();
        for (what, names) in [("missing", missing), ("unexpected", unexpected)] {
            if !names.is_empty() {
                let more = if names.len() > MAX_LISTED {
                    format!(" and {} more", names.len() - MAX_LISTED)
                } else {
                    String::new()
                };
                let listed: Vec<String> = names
                    .iter()
                    .take(MAX_LISTED)
                    .map(|n| format!("`{n}`"))
                    .collect();
                problems.push(format!(
                    "{component}: {} {what} tensor{} {}{more}",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" },
                    listed.join(", ")
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the tensors do not fit --config: {} (is the config right for this checkpoint?)",
            problems.join("; ")
        ))
    }
}
