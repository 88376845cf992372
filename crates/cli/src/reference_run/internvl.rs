//! `unifusion reference-run internvl`: one full forward of an InternVL3-layout VLM on given
//! inputs, every hidden state and the logits written out, for parity against any reference.
//!
//! Inputs (safetensors): `input_ids` i64 `[B, L]`, optional `pixel_values` f32
//! `[T, 3, H, W]`, optional `attention_mask` i64 `[B, L]`. Outputs: `hidden_states.<i>` for
//! i in 0..=num_layers (f32 `[B, L, H]`) and `logits` (f32 `[B, L, V]`). Weights: the names
//! transformers' `save_pretrained` writes or the original OpenGVLab names, in one or more shards.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use unifusion_model::vlm::weights::{RawTensor, parse_safetensors};
use unifusion_model::vlm::{InternVl, InternVlConfig, VlmError, VlmInput, Weights};

use crate::CliError;
use crate::device::Backend;

#[derive(clap::Args)]
pub struct Args {
    /// config.json (transformers `InternVLConfig` or original `InternVLChatConfig`).
    #[arg(long)]
    config: PathBuf,
    /// Weight shard(s), `.safetensors` (repeat the flag or list several).
    #[arg(long, num_args = 1.., required = true)]
    weights: Vec<PathBuf>,
    /// Inputs: `input_ids`, optional `pixel_values`, optional `attention_mask`.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `hidden_states.<i>` and `logits`.
    #[arg(long)]
    output: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
}

fn read(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))
}

fn usage(e: VlmError) -> CliError {
    CliError::Usage(e.to_string())
}

/// `[B, L]` integer rows of an input tensor.
fn rows(t: &RawTensor<'_>) -> Result<Vec<Vec<i64>>, CliError> {
    if t.shape.len() != 2 || t.shape[1] == 0 {
        return Err(CliError::Usage(format!(
            "inputs: `{}` must be [batch, seq], got {:?}",
            t.name, t.shape
        )));
    }
    let v = t.to_i64().map_err(usage)?;
    Ok(v.chunks(t.shape[1]).map(<[i64]>::to_vec).collect())
}

pub fn run(args: Args) -> Result<(), CliError> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", args.config.display())))?;
    let config = InternVlConfig::from_json(&text).map_err(usage)?;
    let device = args.backend.device()?;
    let mut weights = Weights::new();
    for shard in &args.weights {
        weights.add_safetensors(&read(shard)?).map_err(usage)?;
    }
    let model = InternVl::load(&config, &mut weights, &device).map_err(usage)?;

    let input_bytes = read(&args.inputs)?;
    let inputs = parse_safetensors(&input_bytes).map_err(usage)?;
    let find = |name: &str| inputs.iter().find(|t| t.name == name);
    let ids_raw =
        find("input_ids").ok_or_else(|| CliError::Usage("inputs: no `input_ids` tensor".into()))?;
    let ids: Vec<Vec<u32>> = rows(ids_raw)?
        .into_iter()
        .map(|r| {
            r.into_iter()
                .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
                .collect()
        })
        .collect();
    let mask: Option<Vec<Vec<bool>>> = match find("attention_mask") {
        None => None,
        Some(t) => Some(
            rows(t)?
                .into_iter()
                .map(|r| r.into_iter().map(|m| m != 0).collect())
                .collect(),
        ),
    };
    let pixel_values = match find("pixel_values") {
        None => None,
        Some(t) => {
            let [a, b, c, d] = <[usize; 4]>::try_from(t.shape.as_slice()).map_err(|_| {
                CliError::Usage(format!(
                    "inputs: `pixel_values` must be [tiles, 3, h, w], got {:?}",
                    t.shape
                ))
            })?;
            let v = t.to_f32().map_err(usage)?;
            Some(Tensor::<4>::from_data(
                TensorData::new(v, [a, b, c, d]),
                &device,
            ))
        }
    };

    let taps: Vec<usize> = (0..=model.num_layers()).collect();
    let out = model
        .forward(
            VlmInput {
                ids: &ids,
                pixel_values,
                attention_mask: mask.as_deref(),
            },
            &taps,
        )
        .map_err(usage)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut fetch = |name: String, t: Tensor<3>| -> Result<(), CliError> {
        let shape = t.dims().to_vec();
        let data = t
            .try_into_data()
            .map_err(|e| CliError::Device(format!("{e:?}")))?;
        let values = data
            .try_to_vec::<f32>()
            .map_err(|e| CliError::Device(format!("{e:?}")))?;
        tensors.push((name, shape, values));
        Ok(())
    };
    for (i, t) in out.taps {
        fetch(format!("hidden_states.{i}"), t)?;
    }
    fetch("logits".into(), model.text.logits(out.last))?;
    std::fs::write(&args.output, serialize_f32(&tensors))
        .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", args.output.display())))?;
    eprintln!(
        "wrote {} tensors ({} layers + logits) to {}",
        tensors.len(),
        model.num_layers(),
        args.output.display()
    );
    Ok(())
}

/// A safetensors file of f32 tensors (header padded to 8 bytes, as the format recommends).
fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        let end = offset + values.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut head = serde_json::Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, _, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}
