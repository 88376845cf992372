//! `unifusion pack`: checkpoints in, content-addressed shards and `manifest.json` out
//! (format: `docs/WEIGHTS.md`).
//!
//! Input files are read tensor by tensor, so memory stays at one shard plus one tensor
//! whatever the checkpoint's size. The manifest is written last and atomically. Checkpoint
//! layouts and the check against `--config` are in [`layout`].

pub(crate) mod layout;
mod quantize;

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use unifusion_weights::native::{DirOutput, SafetensorsFile};
use unifusion_weights::safetensors_header::HeaderTensor;
use unifusion_weights::{Dtype, ModelInfo, Packer};

use unifusion_model::pipeline::UniFusionConfig;

use crate::CliError;

/// How an input checkpoint names its tensors (see [`layout`] for the renames).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Safetensors files whose tensor names are already the manifest's.
    Project,
    /// InternVL3 VLM, original OpenGVLab names.
    Internvl,
    /// InternVL3 VLM, transformers names.
    InternvlHf,
    /// Krea 2 transformer, original names.
    Krea2,
    /// Krea 2 transformer, diffusers names.
    Krea2Diffusers,
    /// VAE, diffusers AutoencoderKL / AutoencoderTiny names.
    VaeDiffusers,
}

/// Float dtype the shards store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FloatDtype {
    F32,
    F16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Inputs, repeatable: `PATH` (in `--layout`'s layout) or `LAYOUT=PATH`, so one manifest
    /// takes every component (`--from internvl=InternVL3-1B --from krea2=krea2.safetensors
    /// --from vae-diffusers=vae`). A path is a safetensors file or a directory whose
    /// `*.safetensors` files are all taken.
    #[arg(long, required = true, num_args = 1..)]
    from: Vec<String>,
    /// Layout of the `--from` paths given without `LAYOUT=`.
    #[arg(long, value_enum, default_value = "project")]
    layout: Layout,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Convert float tensors (F64/F32/F16/BF16) to this dtype; integers are kept.
    #[arg(long, value_enum)]
    dtype: Option<FloatDtype>,
    /// Shard size limit in MiB; a larger tensor gets a shard of its own.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    shard_size_mib: u64,
    /// The full model config (a JSON object; a UniFusion config `{vlm, transformer, vae,
    /// pipeline}` to have every tensor checked against it; required by every layout but
    /// `project`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// tokenizer.json, stored beside the shards under its sha256.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Model id for the manifest (default: the output directory's name).
    #[arg(long)]
    model_id: Option<String>,
    /// Model version for the manifest.
    #[arg(long, default_value = "0")]
    model_version: String,
    /// Store the VLM's and the DiT's Linear weights block-wise quantized (docs/WEIGHTS.md).
    #[arg(long, value_enum)]
    quantize: Option<quantize::Quantize>,
    /// Input elements per f16 scale with --quantize (a multiple of 8).
    #[arg(long, default_value_t = 32)]
    group: usize,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// `--from` values as `(layout, path)`: `LAYOUT=PATH`, or a plain path in `default`'s layout.
fn input_specs(from: &[String], default: Layout) -> Vec<(Layout, PathBuf)> {
    from.iter()
        .map(|spec| {
            spec.split_once('=')
                .and_then(|(l, path)| Some((Layout::from_str(l, false).ok()?, PathBuf::from(path))))
                .unwrap_or_else(|| (default, PathBuf::from(spec)))
        })
        .collect()
}

/// The input files: each path as given, directories expanded to their sorted `*.safetensors`.
fn input_files(from: &[PathBuf]) -> Result<Vec<PathBuf>, CliError> {
    let mut files = Vec::new();
    for path in from {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| usage(format!("{}: {e}", path.display())))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            if found.is_empty() {
                return Err(usage(format!("{}: no .safetensors files", path.display())));
            }
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(usage(format!(
                "{}: no such file or directory",
                path.display()
            )));
        }
    }
    Ok(files)
}

fn read_config(path: Option<&Path>) -> Result<serde_json::Value, CliError> {
    let Some(path) = path else {
        return Ok(serde_json::json!({}));
    };
    let bytes = std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| usage(format!("{}: not JSON: {e}", path.display())))?;
    if !value.is_object() {
        return Err(usage(format!(
            "{}: the config must be a JSON object",
            path.display()
        )));
    }
    Ok(value)
}

fn layout_name(layout: Layout) -> String {
    layout
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_owned())
}

/// The UniFusion config to check tensors against: required when a layout converts, used
/// whenever `--config` is one.
fn model_config(
    config: &serde_json::Value,
    specs: &[(Layout, PathBuf)],
) -> Result<Option<UniFusionConfig>, CliError> {
    let converting = specs.iter().find(|(l, _)| *l != Layout::Project);
    match (
        serde_json::from_value::<UniFusionConfig>(config.clone()),
        converting,
    ) {
        (Ok(c), _) => Ok(Some(c)),
        (Err(_), None) => Ok(None),
        (Err(e), Some((l, _))) => Err(usage(format!(
            "--from {}=...: converted tensors are checked against the model config; give --config with a UniFusion config (vlm, transformer, vae, pipeline): {e}",
            layout_name(*l)
        ))),
    }
}

/// One tensor to write: its manifest name and shape, and the input tensor its bytes come from.
struct Planned {
    name: String,
    shape: Vec<u64>,
    part: layout::Part,
    file: usize,
    source: HeaderTensor,
}

impl Planned {
    fn read(&self, inputs: &mut [SafetensorsFile]) -> Result<Vec<u8>, CliError> {
        let bytes = inputs[self.file].read(&self.source).map_err(usage)?;
        Ok(match self.part {
            layout::Part::Whole => bytes,
            layout::Part::Third(i) => {
                let third = bytes.len() / 3;
                bytes[i * third..(i + 1) * third].to_vec()
            }
        })
    }
}

pub fn run(args: Args) -> Result<(), CliError> {
    let config = read_config(args.config.as_deref())?;
    let specs = input_specs(&args.from, args.layout);
    let model = model_config(&config, &specs)?;
    let mut files = Vec::new();
    let mut layouts = Vec::new();
    for (layout, path) in &specs {
        for file in input_files(std::slice::from_ref(path))? {
            files.push(file);
            layouts.push(*layout);
        }
    }
    let mut inputs = Vec::with_capacity(files.len());
    // Every converted tensor of every file, sorted by name: a stable order whatever the split.
    let mut tensors: Vec<Planned> = Vec::new();
    let mut dropped: Vec<String> = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let file = SafetensorsFile::open(path).map_err(usage)?;
        for t in &file.header.tensors {
            let renamed = layout::rename(layouts[i], &t.name, &t.shape)
                .map_err(|e| usage(format!("{}: {e}", path.display())))?;
            match renamed {
                layout::Renamed::Drop => dropped.push(t.name.clone()),
                layout::Renamed::Keep(parts) => {
                    tensors.extend(parts.into_iter().map(|c| Planned {
                        name: c.name,
                        shape: c.shape,
                        part: c.part,
                        file: i,
                        source: t.clone(),
                    }))
                }
            }
        }
        inputs.push(file);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(usage(format!(
            "tensor `{}` comes from both `{}` in {} and `{}` in {}",
            w[0].name,
            w[0].source.name,
            files[w[0].file].display(),
            w[1].source.name,
            files[w[1].file].display()
        )));
    }
    if let Some(model) = &model {
        let entries: Vec<layout::Entry<'_>> = tensors
            .iter()
            .map(|t| layout::Entry {
                name: &t.name,
                dtype: t.source.dtype,
                shape: &t.shape,
            })
            .collect();
        layout::check(model, &entries).map_err(usage)?;
    }
    let target = args.dtype.map(|d| match d {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
    });
    let mut quantizer = quantize::Quantizer::new(args.quantize, args.group)?;
    let out = DirOutput::create(&args.out).map_err(usage)?;
    let mut packer = Packer::new(out, args.shard_size_mib << 20).map_err(usage)?;
    let tokenizer = match &args.tokenizer {
        Some(path) => {
            let bytes =
                std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
            Some(packer.add_file("json", &bytes).map_err(usage)?)
        }
        None => None,
    };
    for t in &tensors {
        let bytes = t.read(&mut inputs)?;
        let source = t.source.dtype;
        if let Some(q) = quantizer.as_mut()
            && let Some(parts) = q.apply(&t.name, source, &t.shape, &bytes)?
        {
            for (name, dtype, shape, bytes) in parts {
                packer.add(&name, dtype, &shape, &bytes).map_err(usage)?;
            }
            continue;
        }
        let (dtype, bytes) = match target {
            Some(to) if source.is_convertible_float() && source != to => {
                let converted = unifusion_weights::dtype::convert_float(&bytes, source, to)
                    .ok_or_else(|| usage(format!("tensor `{}`: cannot convert", t.name)))?;
                (to, converted)
            }
            _ => (source, bytes),
        };
        packer
            .add(&t.name, dtype, &t.shape, &bytes)
            .map_err(usage)?;
    }
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        args.out
            .file_name()
            .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let (manifest, _) = packer
        .finish(
            ModelInfo {
                id: model_id,
                version: args.model_version.clone(),
            },
            config,
            tokenizer,
        )
        .map_err(usage)?;
    let largest = manifest.shards.iter().map(|s| s.bytes).max().unwrap_or(0);
    println!(
        "packed {} tensors from {} files into {} shards ({} bytes, largest {} bytes) in {}",
        manifest.tensors().count(),
        files.len(),
        manifest.shards.len(),
        manifest.total_shard_bytes(),
        largest,
        args.out.display()
    );
    if let Some(q) = &quantizer {
        println!("{}", q.summary());
    }
    if let Some(first) = dropped.first() {
        println!(
            "dropped {} tensors that are no transformer weights (e.g. `{first}`)",
            dropped.len()
        );
    }
    if model.is_some() {
        let present: Vec<&str> = layout::COMPONENTS
            .into_iter()
            .filter(|c| tensors.iter().any(|t| t.name.starts_with(&format!("{c}."))))
            .collect();
        let absent: Vec<&str> = layout::COMPONENTS
            .into_iter()
            .filter(|c| !present.contains(c))
            .collect();
        println!(
            "checked {} against the config{}",
            present.join(", "),
            if absent.is_empty() {
                String::new()
            } else {
                format!(
                    "; no tensors for {}: not a complete model",
                    absent.join(", ")
                )
            }
        );
    }
    Ok(())
}
