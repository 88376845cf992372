//! `unifusion make-tiny-model`: a seeded tiny random UniFusion model, packed (manifest +
//! shards, docs/WEIGHTS.md) or as an unpacked directory, in the real formats (transformers InternVL names, diffusers Krea 2 / AutoencoderTiny names,
//! safetensors, a byte-level `tokenizer.json`), so `generate`/`edit`/`variation` can be tried
//! and tested end to end without a checkpoint. Its images are noise.
//!
//! The tensor list is not written out by hand: generator and VAE names come from recording
//! what their loaders ask a seeded random source for; the VLM's from loading it repeatedly
//! and adding whatever tensor (and shape) the loader says is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use unifusion_model::generator::Krea2Transformer;
use unifusion_model::generator::config::{AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::params::{LoadError, ParamSource, RandomInit};
use unifusion_model::generator::sampler::SeededNormal;
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::pipeline::{PipelineConfig, UniFusionConfig, VaeConfig};
use unifusion_model::vlm::{InternVl, InternVlConfig, VlmError, Weights};

use unifusion_weights::native::DirOutput;
use unifusion_weights::{Dtype, ModelInfo, PackError, Packer};

use crate::CliError;
use crate::image_io::io_words;

/// The byte-level BPE tokenizer of the tiny VLM (256 byte tokens + the chat specials
/// `<|im_start|>` 256, `<|im_end|>` 257, `<img>` 258, `</img>` 259, `<IMG_CONTEXT>` 260).
pub const TINY_TOKENIZER: &str = include_str!("../../../tests/fixtures/vlm/tokenizer.json");

#[derive(clap::Args)]
pub struct Args {
    /// Directory to create (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shard size limit in KiB of the packed model (small, so even the tiny model streams in
    /// several shards).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub shard_kib: u64,
    /// Write the unpacked layout (config.json, vlm/transformer/vae .safetensors,
    /// tokenizer.json) instead of a packed manifest with shards.
    #[arg(long)]
    pub unpacked: bool,
}

/// `(name, shape, values)` of checkpoint tensors.
type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Records every tensor a loader asks for, drawing it from a seeded random source.
struct Recorder {
    inner: RandomInit,
    tensors: NamedTensors,
}

impl ParamSource for Recorder {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>, LoadError> {
        let t = self.inner.tensor(name, shape, device)?;
        let values = t
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| LoadError::Format(format!("{e:?}")))?;
        self.tensors
            .push((name.to_string(), shape.to_vec(), values));
        Ok(t)
    }
}

/// The tiny model's configs: the tiny VLM (width 48, 3 layers, 56-px tiles), taps every third
/// hidden state (0 and 3), a width-32 DiT, a two-level tiny VAE (2× up, 4 latent channels).
pub fn tiny_config() -> UniFusionConfig {
    let vlm = InternVlConfig::tiny();
    let taps = unifusion_model::pipeline::every_third_layer(vlm.text_config.num_hidden_layers);
    UniFusionConfig {
        transformer: Krea2Config {
            text_hidden_dim: vlm.text_config.hidden_size,
            num_text_layers: taps.len(),
            ..Krea2Config::tiny()
        },
        vae: VaeConfig::Tiny(AutoencoderTinyConfig {
            encoder_block_out_channels: vec![8, 8],
            decoder_block_out_channels: vec![8, 8],
            num_encoder_blocks: vec![1, 1],
            num_decoder_blocks: vec![1, 1],
            latent_channels: 4,
            ..AutoencoderTinyConfig::taef1()
        }),
        pipeline: PipelineConfig {
            taps,
            max_rewrite_tokens: 16,
            stop_tokens: vec![257],
            max_tiles: 4,
            ..PipelineConfig::default()
        },
        vlm,
    }
}

fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>, CliError> {
    let buffers: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&buffers)
        .map(|((name, shape, _), bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| CliError::Device(format!("safetensors view `{name}`: {e}")))
        })
        .collect::<Result<_, _>>()?;
    safetensors::serialize(views, None).map_err(|e| CliError::Device(format!("safetensors: {e}")))
}

/// transformers `save_pretrained` names for the VLM's canonical names.
fn transformers_name(canonical: &str) -> String {
    for (from, to) in [
        ("vision.", "model.vision_tower."),
        ("projector.", "model.multi_modal_projector."),
        ("text.", "model.language_model."),
    ] {
        if let Some(rest) = canonical.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    canonical.to_string()
}

/// Random VLM tensors under transformers names, found by asking the loader.
fn vlm_tensors(
    config: &InternVlConfig,
    seed: u64,
    device: &Device,
) -> Result<NamedTensors, CliError> {
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for _ in 0..10_000 {
        let mut rng = SeededNormal::new(seed);
        let tensors: NamedTensors = shapes
            .iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let values = (0..n).map(|_| rng.next_f32() * 0.2).collect();
                (transformers_name(name), shape.clone(), values)
            })
            .collect();
        let mut weights = Weights::new();
        if !tensors.is_empty() {
            weights
                .add_safetensors(&safetensors_bytes(&tensors)?)
                .map_err(|e| CliError::Device(e.to_string()))?;
        }
        match InternVl::load(config, &mut weights, device) {
            Ok(_) => return Ok(tensors),
            Err(VlmError::MissingTensor(name)) => {
                shapes.insert(name, vec![1]);
            }
            Err(VlmError::TensorShape { name, expected, .. }) => {
                shapes.insert(name, expected);
            }
            Err(e) => return Err(CliError::Device(format!("tiny VLM: {e}"))),
        }
    }
    Err(CliError::Device(
        "tiny VLM: the tensor list does not converge".into(),
    ))
}

/// Writes the tiny model into `dir`.
pub fn write_tiny_model(dir: &Path, seed: u64, format: TinyFormat) -> Result<(), CliError> {
    let usage = |m: String| CliError::Usage(format!("{}: {m}", dir.display()));
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map_err(|e| usage(io_words(&e)))?
            .next()
            .is_none();
        if !empty {
            return Err(usage("exists and is not empty".into()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| usage(io_words(&e)))?;
    let device = Device::flex();
    let config = tiny_config();

    let vlm = vlm_tensors(&config.vlm, seed, &device)?;
    let mut rec = Recorder {
        inner: RandomInit::new(seed.wrapping_add(1), 0.2),
        tensors: Vec::new(),
    };
    Krea2Transformer::load(&config.transformer, &mut rec, &device)
        .map_err(|e| CliError::Device(format!("tiny transformer: {e}")))?;
    let transformer = std::mem::take(&mut rec.tensors);
    let VaeConfig::Tiny(vae_config) = &config.vae else {
        return Err(CliError::Device("tiny model: expected a tiny VAE".into()));
    };
    rec.inner = RandomInit::new(seed.wrapping_add(2), 0.2);
    TinyDecoder::load(vae_config, &mut rec, "decoder", &device)
        .map_err(|e| CliError::Device(format!("tiny VAE: {e}")))?;
    let vae = std::mem::take(&mut rec.tensors);

    match format {
        TinyFormat::Unpacked => {
            let json = serde_json::to_string_pretty(&config)
                .map_err(|e| CliError::Device(format!("config: {e}")))?;
            let files: [(&str, Vec<u8>); 5] = [
                ("config.json", json.into_bytes()),
                ("vlm.safetensors", safetensors_bytes(&vlm)?),
                ("transformer.safetensors", safetensors_bytes(&transformer)?),
                ("vae.safetensors", safetensors_bytes(&vae)?),
                ("tokenizer.json", TINY_TOKENIZER.as_bytes().to_vec()),
            ];
            for (name, bytes) in files {
                std::fs::write(dir.join(name), bytes)
                    .map_err(|e| usage(format!("{name}: {}", io_words(&e))))?;
            }
        }
        TinyFormat::Packed { shard_bytes } => {
            let pack = |e: PackError| usage(e.to_string());
            let out = DirOutput::create(dir).map_err(|e| usage(e.to_string()))?;
            let mut packer = Packer::new(out, shard_bytes).map_err(pack)?;
            let named = vlm
                .iter()
                .map(|(n, s, v)| (format!("vlm.{n}"), s, v))
                .chain(
                    transformer
                        .iter()
                        .map(|(n, s, v)| (format!("transformer.{n}"), s, v)),
                )
                .chain(vae.iter().map(|(n, s, v)| (format!("vae.{n}"), s, v)));
            for (name, shape, values) in named {
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                packer
                    .add(&name, Dtype::F32, &shape, &bytes)
                    .map_err(pack)?;
            }
            let tokenizer = packer
                .add_file("json", TINY_TOKENIZER.as_bytes())
                .map_err(pack)?;
            let config = serde_json::to_value(&config)
                .map_err(|e| CliError::Device(format!("config: {e}")))?;
            let info = ModelInfo {
                id: "unifusion-tiny-random".into(),
                version: format!("seed-{seed}"),
            };
            packer.finish(info, config, Some(tokenizer)).map_err(pack)?;
        }
    }
    Ok(())
}

/// How [`write_tiny_model`] lays the model out.
#[derive(Clone, Copy, Debug)]
pub enum TinyFormat {
    /// `manifest.json` + content-addressed shards of at most `shard_bytes` + the tokenizer.
    Packed {
        /// Shard size limit in bytes.
        shard_bytes: u64,
    },
    /// config.json, vlm/transformer/vae .safetensors, tokenizer.json.
    Unpacked,
}

/// `unifusion make-tiny-model`.
pub fn run(args: Args) -> Result<(), CliError> {
    let format = if args.unpacked {
        TinyFormat::Unpacked
    } else {
        TinyFormat::Packed {
            shard_bytes: args.shard_kib * 1024,
        }
    };
    write_tiny_model(&args.out, args.seed, format)?;
    println!(
        "wrote a tiny random UniFusion model to {}",
        args.out.display()
    );
    Ok(())
}
