//! A whole UniFusion model from a packed manifest (`docs/WEIGHTS.md`), through the weights
//! crate's one streaming loader: natively from files, in the browser from fetch/IndexedDB.
//!
//! Tensor names carry their component as the first dotted segment:
//!
//! | prefix | rest of the name | goes to |
//! |---|---|---|
//! | `vlm.` | any spelling [`crate::vlm::weights`] accepts (transformers or OpenGVLab) | [`InternVl`] |
//! | `transformer.` | diffusers `Krea2Transformer2DModel` names | [`Krea2Transformer`] |
//! | `vae.` | diffusers `AutoencoderKL` / `AutoencoderTiny` names (decoder side) | [`Vae`] |
//!
//! `manifest.config` is a [`UniFusionConfig`] (extra keys are ignored). VAE encoder tensors
//! (`vae.encoder.*`, `vae.quant_conv.*`) are skipped: generation only decodes.
//!
//! Every tensor goes to the device as soon as its shard is verified, so the host holds one
//! shard (plus one tensor's f32 copy) at a time, whatever the model's size.

use std::collections::BTreeMap;

use burn::tensor::{DType, Device, Tensor, TensorData};
use unifusion_weights::loader::{ShardSource, TensorSink};
use unifusion_weights::manifest::sha256_hex;
use unifusion_weights::{Dtype, Manifest, Progress};

use unifusion_kernels::QuantLinear;

use crate::generator::params::{LoadError as ParamError, ParamSource};
use crate::generator::tiny_vae::TinyDecoder;
use crate::generator::vae::AutoencoderKl;
use crate::generator::{GeneratorError, Krea2Transformer, WeightMap};
use crate::linear::QuantStore;
use crate::pipeline::{PipelineError, UniFusion, UniFusionConfig, Vae, VaeConfig};
use crate::vlm::processor::VlmTokenizer;
use crate::vlm::{InternVl, VlmError, Weights};

/// Why a model could not be loaded. Every message names the component (and tensor) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    /// `manifest.config` is not a UniFusion config, or its parts do not fit together.
    #[error("model config: {0}")]
    Config(String),
    /// Fetching, verifying or parsing a shard failed.
    #[error(transparent)]
    Weights(#[from] unifusion_weights::LoadError),
    /// The tokenizer bytes are not the manifest's, or not a tokenizer.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The VLM's tensors do not fit its config.
    #[error("vlm: {0}")]
    Vlm(#[from] VlmError),
    /// The transformer's tensors do not fit its config.
    #[error("transformer: {0}")]
    Transformer(GeneratorError),
    /// The VAE's tensors do not fit its config.
    #[error("vae: {0}")]
    Vae(GeneratorError),
    /// The pieces do not fit each other.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

/// A loaded model and its tokenizer.
pub struct LoadedModel {
    /// The pipeline, on the device it was loaded to.
    pub model: UniFusion,
    /// The VLM's tokenizer.
    pub tokenizer: VlmTokenizer,
}

/// Loads a packed model: `manifest` (already parsed and validated), its shards from `source`,
/// the tokenizer bytes (checked against the manifest's sha256 when it names one), onto
/// `device`. `progress` sees every phase of every shard.
pub async fn load_packed<S: ShardSource>(
    manifest: &Manifest,
    source: &mut S,
    tokenizer_json: &[u8],
    device: &Device,
    progress: impl FnMut(&Progress),
) -> Result<LoadedModel, ModelLoadError> {
    if let Some(entry) = &manifest.tokenizer {
        let actual = sha256_hex(tokenizer_json);
        if actual != entry.sha256 || tokenizer_json.len() as u64 != entry.bytes {
            return Err(ModelLoadError::Tokenizer(format!(
                "{} is {} bytes with sha256 {actual}, the manifest says {} bytes with sha256 {}: the file is corrupt or stale",
                entry.file,
                tokenizer_json.len(),
                entry.bytes,
                entry.sha256
            )));
        }
    }
    let tokenizer = VlmTokenizer::from_bytes(tokenizer_json)
        .map_err(|e| ModelLoadError::Tokenizer(e.to_string()))?;
    let mut sink = ModelSink::from_manifest(manifest, device)?;
    unifusion_weights::load(manifest, source, &mut sink, None, progress).await?;
    let model = sink.finish(&tokenizer)?;
    Ok(LoadedModel { model, tokenizer })
}

/// The files of an unpacked model directory, as bytes (the caller reads them).
pub struct UnpackedModel<'a> {
    /// `config.json`: a [`UniFusionConfig`].
    pub config_json: &'a [u8],
    /// `tokenizer.json`.
    pub tokenizer_json: &'a [u8],
    /// `vlm.safetensors` (transformers or OpenGVLab names).
    pub vlm: &'a [u8],
    /// `transformer.safetensors` (diffusers `Krea2Transformer2DModel` names).
    pub transformer: &'a [u8],
    /// `vae.safetensors` (diffusers names).
    pub vae: &'a [u8],
}

/// Builds a model from an unpacked directory's files (host-side weights, then [`assemble`]).
pub fn load_unpacked(
    files: &UnpackedModel<'_>,
    device: &Device,
) -> Result<LoadedModel, ModelLoadError> {
    let config: UniFusionConfig = serde_json::from_slice(files.config_json)
        .map_err(|e| ModelLoadError::Config(e.to_string()))?;
    let tokenizer = VlmTokenizer::from_bytes(files.tokenizer_json)
        .map_err(|e| ModelLoadError::Tokenizer(e.to_string()))?;
    let mut vlm = Weights::new();
    vlm.add_safetensors(files.vlm)?;
    let mut transformer = WeightMap::from_safetensors(files.transformer)
        .map_err(|e| ModelLoadError::Transformer(e.into()))?;
    let mut vae =
        WeightMap::from_safetensors(files.vae).map_err(|e| ModelLoadError::Vae(e.into()))?;
    let model = assemble(
        &config,
        &tokenizer,
        &mut vlm,
        &mut transformer,
        &mut vae,
        device,
    )?;
    Ok(LoadedModel { model, tokenizer })
}

/// Parses `manifest.config` as a [`UniFusionConfig`] and checks the VLM part.
pub fn manifest_config(manifest: &Manifest) -> Result<UniFusionConfig, ModelLoadError> {
    let config: UniFusionConfig = serde_json::from_value(manifest.config.clone())
        .map_err(|e| ModelLoadError::Config(e.to_string()))?;
    config.vlm.validate()?;
    Ok(config)
}

/// The loader's [`TensorSink`]: routes each tensor by component and uploads it at once.
pub struct ModelSink {
    config: UniFusionConfig,
    device: Device,
    vlm: Weights,
    transformer: DeviceParams,
    vae: DeviceParams,
}

impl ModelSink {
    /// A sink for the model `manifest.config` describes.
    pub fn from_manifest(manifest: &Manifest, device: &Device) -> Result<Self, ModelLoadError> {
        Ok(Self::new(manifest_config(manifest)?, device))
    }

    /// A sink for `config`.
    pub fn new(config: UniFusionConfig, device: &Device) -> Self {
        Self {
            config,
            device: device.clone(),
            vlm: Weights::on_device(device),
            transformer: DeviceParams::default(),
            vae: DeviceParams::default(),
        }
    }

    /// Builds the model from everything received; missing, mis-shaped or unused tensors are
    /// errors naming them.
    pub fn finish(self, tokenizer: &VlmTokenizer) -> Result<UniFusion, ModelLoadError> {
        let Self {
            config,
            device,
            mut vlm,
            mut transformer,
            mut vae,
        } = self;
        assemble(
            &config,
            tokenizer,
            &mut vlm,
            &mut transformer,
            &mut vae,
            &device,
        )
    }
}

impl TensorSink for ModelSink {
    type Error = ModelLoadError;

    fn tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), ModelLoadError> {
        let (component, rest) = name.split_once('.').unwrap_or((name, ""));
        if component == "vae" && (rest.starts_with("encoder.") || rest.starts_with("quant_conv.")) {
            return Ok(());
        }
        // Quantized Linear weights (`….weight.q8`/`.q4` + `.scales`) go to the quant stores.
        let quant = match component {
            "vlm" => self
                .vlm
                .add_quantized(rest, dtype, shape, bytes, &self.device),
            "transformer" => self
                .transformer
                .quant
                .add(rest, dtype, shape, bytes, &self.device),
            _ => Ok(false),
        };
        if quant.map_err(|e| ModelLoadError::Config(format!("{component}: {e}")))? {
            return Ok(());
        }
        let values = to_f32(name, dtype, bytes)?;
        match component {
            "vlm" => self.vlm.add(rest, values, shape.to_vec())?,
            "transformer" => self.transformer.insert(rest, values, shape, &self.device),
            "vae" => self.vae.insert(rest, values, shape, &self.device),
            _ => {
                return Err(ModelLoadError::Config(format!(
                    "tensor `{name}` belongs to no component (names start with `vlm.`, `transformer.` or `vae.`)"
                )));
            }
        }
        Ok(())
    }
}

/// Builds a [`UniFusion`] from its three weight sources, then checks nothing was left over.
/// When the config names no stop token, `<|im_end|>` ends the rewrite.
pub fn assemble(
    config: &UniFusionConfig,
    tokenizer: &VlmTokenizer,
    vlm_weights: &mut Weights,
    transformer_params: &mut impl LeftoverSource,
    vae_params: &mut impl LeftoverSource,
    device: &Device,
) -> Result<UniFusion, ModelLoadError> {
    config.vlm.validate()?;
    let vlm = InternVl::load(&config.vlm, vlm_weights, device)?;
    let unused = vlm_weights.remaining();
    if let Some(first) = unused.first() {
        return Err(ModelLoadError::Vlm(VlmError::Weights(format!(
            "{} tensors the config does not use, e.g. `{first}` (is the config right for this checkpoint?)",
            unused.len()
        ))));
    }
    let transformer = Krea2Transformer::load(&config.transformer, transformer_params, device)
        .map_err(ModelLoadError::Transformer)?;
    transformer_params
        .check_all_taken()
        .map_err(|e| ModelLoadError::Transformer(e.into()))?;
    let vae = match &config.vae {
        VaeConfig::Kl(c) => Vae::Kl(
            AutoencoderKl::load_decoder(c, vae_params, device).map_err(ModelLoadError::Vae)?,
        ),
        VaeConfig::Tiny(c) => Vae::Tiny(
            TinyDecoder::load(c, vae_params, "decoder", device).map_err(ModelLoadError::Vae)?,
        ),
    };
    vae_params
        .check_all_taken()
        .map_err(|e| ModelLoadError::Vae(e.into()))?;
    let mut pipeline = config.pipeline.clone();
    if pipeline.stop_tokens.is_empty()
        && let Some(id) = tokenizer.token_id("<|im_end|>")
    {
        pipeline.stop_tokens.push(id);
    }
    Ok(UniFusion::new(
        vlm,
        &config.vlm,
        transformer,
        vae,
        &config.vae,
        pipeline,
    )?)
}

/// A [`ParamSource`] that can tell which of its tensors were never taken.
pub trait LeftoverSource: ParamSource {
    /// Ok when every tensor was taken, else [`ParamError::Unused`] naming them.
    fn check_all_taken(&self) -> Result<(), ParamError>;
}

impl LeftoverSource for WeightMap {
    fn check_all_taken(&self) -> Result<(), ParamError> {
        let names: Vec<String> = self.names().map(str::to_owned).collect();
        if names.is_empty() {
            Ok(())
        } else {
            Err(ParamError::Unused(names))
        }
    }
}

/// Named tensors already on the device (flattened), taken once each by the model's loaders.
#[derive(Default)]
pub struct DeviceParams {
    tensors: BTreeMap<String, (Tensor<1>, Vec<usize>)>,
    /// Block-quantized Linear weights, by the name of the float weight they replace.
    pub quant: QuantStore,
}

impl DeviceParams {
    /// Uploads `values` (of `shape`) as `name`.
    pub fn insert(&mut self, name: &str, values: Vec<f32>, shape: &[usize], device: &Device) {
        let n = values.len();
        let flat = Tensor::from_data(TensorData::new(values, [n]), device);
        self.tensors.insert(name.to_owned(), (flat, shape.to_vec()));
    }
}

impl ParamSource for DeviceParams {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, ParamError> {
        let (flat, got) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ParamError::Missing(name.to_string()))?;
        if got != shape {
            return Err(ParamError::Shape {
                name: name.to_string(),
                got,
                expected: shape.to_vec(),
            });
        }
        Ok(flat.to_device(device).reshape(shape))
    }

    fn quant_linear(
        &mut self,
        weight: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Option<QuantLinear>, ParamError> {
        self.quant
            .take(weight, d_in, d_out, None)
            .map_err(ParamError::Quantized)
    }
}

impl LeftoverSource for DeviceParams {
    fn check_all_taken(&self) -> Result<(), ParamError> {
        let mut unused: Vec<String> = self.tensors.keys().cloned().collect();
        unused.extend(self.quant.leftovers());
        if unused.is_empty() {
            Ok(())
        } else {
            Err(ParamError::Unused(unused))
        }
    }
}

/// A float tensor's bytes as f32 values; anything else is an error naming the tensor.
fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, ModelLoadError> {
    let bad = |why: String| ModelLoadError::Config(format!("tensor `{name}`: {why}"));
    let from = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        _ => {
            return Err(bad(format!(
                "dtype {dtype} is not a float type the model can use"
            )));
        }
    };
    let width = usize::try_from(dtype.size()).unwrap_or(1).max(1);
    if !bytes.len().is_multiple_of(width) {
        return Err(bad(format!(
            "{} bytes is not whole {dtype} elements",
            bytes.len()
        )));
    }
    // burn's own (optimised) conversion: this runs for every byte of the model.
    let n = bytes.len() / width;
    let data = TensorData::try_from_bytes_vec(bytes.to_vec(), vec![n], from)
        .map_err(|e| bad(format!("{e:?}")))?;
    data.convert_dtype(DType::F32)
        .try_into_vec::<f32>()
        .map_err(|e| bad(format!("{e:?}")))
}
