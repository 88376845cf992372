//! `unifusion reference-run krea2-transformer | vae-decoder | tiny-vae-decoder`: one forward
//! of a generator component on inputs from a safetensors file, with diffusers' names, so any
//! config and checkpoint can be compared with `Krea2Transformer2DModel`, `AutoencoderKL.decode`
//! or `AutoencoderTiny.decode`.
//!
//! - krea2-transformer: inputs `hidden_states` `[B, N, in_channels]`, `encoder_hidden_states`
//!   `[B, L, n_layers, text_dim]`, `timestep` `[B]`, `position_ids` `[L+N, 3]`, optional
//!   `encoder_attention_mask` `[B, L]` (non-zero = real token); output `sample`. Weights with
//!   diffusers names or Krea 2's original (native/ComfyUI) names.
//! - vae-decoder / tiny-vae-decoder: input `latents` `[B, C, h, w]` (what `decode()` takes);
//!   output `sample` `[B, 3, H, W]`. Encoder weights in the checkpoint are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Bool, Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};
use unifusion_model::generator::config::{AutoencoderKlConfig, AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::params::read_safetensors;
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{
    GeneratorError, Krea2Transformer, RopeTable, WeightMap, krea2_original_to_diffusers,
};

use crate::CliError;
use crate::device::Backend;

/// Flags shared by the generator targets.
#[derive(clap::Args)]
pub struct Args {
    /// config.json as diffusers' `save_pretrained` writes it.
    #[arg(long)]
    config: PathBuf,
    /// Weight shard(s), `.safetensors` (repeat the flag or list several).
    #[arg(long, num_args = 1.., required = true)]
    weights: Vec<PathBuf>,
    /// Inputs (`.safetensors`), named as diffusers' forward/decode arguments.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `sample` (`.safetensors`, f32).
    #[arg(long)]
    output: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
}

/// Which generator component to run.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// `Krea2Transformer2DModel.forward`.
    Krea2Transformer,
    /// `AutoencoderKL.decode`.
    VaeDecoder,
    /// `AutoencoderTiny.decode`.
    TinyVaeDecoder,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

fn config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

struct Inputs {
    tensors: HashMap<String, TensorData>,
}

impl Inputs {
    fn get<const D: usize>(&self, name: &str, device: &Device) -> Result<Tensor<D>, CliError> {
        let data = self
            .optional(name)
            .ok_or_else(|| CliError::Usage(format!("inputs: no `{name}` tensor")))?;
        Ok(Tensor::from_data(data, device))
    }

    fn optional(&self, name: &str) -> Option<TensorData> {
        self.tensors.get(name).cloned()
    }

    fn rank<const D: usize>(&self, name: &str) -> Result<(), CliError> {
        match self.tensors.get(name) {
            Some(t) if t.shape().num_dims() != D => Err(CliError::Usage(format!(
                "inputs: `{name}` must have {D} dimensions, got shape {:?}",
                t.shape().as_slice()
            ))),
            _ => Ok(()),
        }
    }
}

fn weights(paths: &[PathBuf]) -> Result<WeightMap, CliError> {
    let mut map = WeightMap::new();
    for path in paths {
        map.extend_from_safetensors(&read(path)?)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    }
    Ok(map)
}

/// Fails unless every weight left over starts with one of `ignored` (the other half of a VAE).
fn leftovers(map: WeightMap, ignored: &[&str]) -> Result<(), CliError> {
    let unused: Vec<&str> = map
        .names()
        .filter(|n| !ignored.iter().any(|p| n.starts_with(p)))
        .collect();
    if unused.is_empty() {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "{} unused weights, e.g. `{}` (is the config right for this checkpoint?)",
            unused.len(),
            unused[0]
        )))
    }
}

pub fn run(target: Target, args: Args) -> Result<(), CliError> {
    let device = args.backend.device()?;
    let inputs = Inputs {
        tensors: read_safetensors(&read(&args.inputs)?)
            .map_err(usage)?
            .into_iter()
            .collect(),
    };
    let sample = match target {
        Target::Krea2Transformer => fetch(krea2(&args, &inputs, &device)?)?,
        Target::VaeDecoder => {
            let cfg: AutoencoderKlConfig = config(&args.config)?;
            let mut map = weights(&args.weights)?;
            let vae = AutoencoderKl::load_decoder(&cfg, &mut map, &device).map_err(usage)?;
            leftovers(map, &["encoder.", "quant_conv."])?;
            inputs.rank::<4>("latents")?;
            fetch(vae.decode(inputs.get("latents", &device)?).map_err(usage)?)?
        }
        Target::TinyVaeDecoder => {
            let cfg: AutoencoderTinyConfig = config(&args.config)?;
            let mut map = weights(&args.weights)?;
            let decoder = TinyDecoder::load(&cfg, &mut map, "decoder", &device).map_err(usage)?;
            leftovers(map, &["encoder."])?;
            inputs.rank::<4>("latents")?;
            fetch(
                decoder
                    .decode(inputs.get("latents", &device)?)
                    .map_err(usage)?,
            )?
        }
    };
    write_f32(&args.output, "sample", sample)
}

fn krea2(args: &Args, inputs: &Inputs, device: &Device) -> Result<Tensor<3>, CliError> {
    let cfg: Krea2Config = config(&args.config)?;
    let mut map = krea2_original_to_diffusers(weights(&args.weights)?);
    let model = Krea2Transformer::load(&cfg, &mut map, device).map_err(usage)?;
    map.finish().map_err(usage)?;

    inputs.rank::<3>("hidden_states")?;
    inputs.rank::<4>("encoder_hidden_states")?;
    inputs.rank::<1>("timestep")?;
    inputs.rank::<2>("position_ids")?;
    inputs.rank::<2>("encoder_attention_mask")?;
    let ids = inputs
        .optional("position_ids")
        .ok_or_else(|| CliError::Usage("inputs: no `position_ids` tensor".into()))?;
    if ids.shape().as_slice().get(1) != Some(&3) {
        return Err(usage(GeneratorError::Shape {
            name: "position_ids",
            got: ids.shape().as_slice().to_vec(),
            expected: "[L + N, 3]".into(),
        }));
    }
    let ids: Vec<f32> = ids
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| CliError::Usage(format!("{e:?}")))?;
    let rows: Vec<[f32; 3]> = ids.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect();
    let rope = RopeTable::new(&rows, cfg.axes_dims_rope, cfg.rope_theta, device);
    let mask: Option<Tensor<2, Bool>> = inputs
        .optional("encoder_attention_mask")
        .map(|m| Tensor::<2>::from_data(m, device).not_equal_elem(0.0));
    model
        .forward(
            inputs.get("hidden_states", device)?,
            inputs.get("encoder_hidden_states", device)?,
            inputs.get("timestep", device)?,
            &rope,
            mask,
        )
        .map_err(usage)
}

/// Shape and f32 values of a result (read back from the device).
fn fetch<const D: usize>(tensor: Tensor<D>) -> Result<(Vec<usize>, Vec<f32>), CliError> {
    let shape = tensor.dims().to_vec();
    let data = tensor
        .try_into_data()
        .map_err(|e| CliError::Device(format!("{e:?}")))?;
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| CliError::Device(format!("{e:?}")))?;
    Ok((shape, values))
}

/// Writes one f32 tensor `name` as a safetensors file.
fn write_f32(
    path: &Path,
    name: &str,
    (shape, values): (Vec<usize>, Vec<f32>),
) -> Result<(), CliError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, shape.clone(), &bytes)
        .map_err(|e| CliError::Device(e.to_string()))?;
    let file = safetensors::serialize([(name, view)], None)
        .map_err(|e| CliError::Device(e.to_string()))?;
    std::fs::write(path, file)
        .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
    eprintln!("wrote `{name}` {shape:?} to {}", path.display());
    Ok(())
}
