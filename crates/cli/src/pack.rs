//! `unifusion pack`: checkpoints in, content-addressed shards and `manifest.json` out
//! (format: `docs/WEIGHTS.md`).
//!
//! Input files are read tensor by tensor, so memory stays at one shard plus one tensor
//! whatever the checkpoint's size. The manifest is written last and atomically.

use std::path::{Path, PathBuf};

use clap::ValueEnum;
use unifusion_weights::native::{DirOutput, SafetensorsFile};
use unifusion_weights::safetensors_header::HeaderTensor;
use unifusion_weights::{Dtype, ModelInfo, Packer};

use crate::CliError;

/// How the input checkpoint names its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Safetensors files whose tensor names are already the model's.
    Project,
    /// InternVL3, original checkpoint names (not written yet).
    Internvl,
    /// InternVL3, transformers names (not written yet).
    InternvlHf,
    /// Krea-2, original names (not written yet).
    Krea2,
    /// Krea-2, diffusers names (not written yet).
    Krea2Diffusers,
    /// FLUX/diffusers AutoencoderKL (not written yet).
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
    /// Safetensors files, or directories whose `*.safetensors` files are all taken.
    #[arg(long, required = true, num_args = 1..)]
    from: Vec<PathBuf>,
    /// How the input names its tensors.
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
    /// The full model config (JSON object: vlm, generator, vae, tokenizer, sampling).
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
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
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

pub fn run(args: Args) -> Result<(), CliError> {
    if args.layout != Layout::Project {
        return Err(usage(format!(
            "layout `{}` is not written yet; convert to project names and use --layout project",
            args.layout
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_owned())
        )));
    }
    let config = read_config(args.config.as_deref())?;
    let files = input_files(&args.from)?;
    let mut inputs = Vec::with_capacity(files.len());
    // Every tensor of every file, sorted by name: a stable order whatever the file split.
    let mut tensors: Vec<(usize, HeaderTensor)> = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let file = SafetensorsFile::open(path).map_err(usage)?;
        tensors.extend(file.header.tensors.iter().cloned().map(|t| (i, t)));
        inputs.push(file);
    }
    tensors.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].1.name == w[1].1.name) {
        return Err(usage(format!(
            "tensor `{}` is in both {} and {}",
            w[0].1.name,
            files[w[0].0].display(),
            files[w[1].0].display()
        )));
    }
    let target = args.dtype.map(|d| match d {
        FloatDtype::F32 => Dtype::F32,
        FloatDtype::F16 => Dtype::F16,
    });
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
    for (i, t) in &tensors {
        let bytes = inputs[*i].read(t).map_err(usage)?;
        let (dtype, bytes) = match target {
            Some(to) if t.dtype.is_convertible_float() && t.dtype != to => {
                let converted = unifusion_weights::dtype::convert_float(&bytes, t.dtype, to)
                    .ok_or_else(|| usage(format!("tensor `{}`: cannot convert", t.name)))?;
                (to, converted)
            }
            _ => (t.dtype, bytes),
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
    Ok(())
}
