//! `unifusion inspect`: what a packed model holds, and with `--verify` whether its files are
//! intact (size and sha256 of every shard and the tokenizer).

use std::path::PathBuf;

use unifusion_weights::native::{read_manifest, verify_dir};

use crate::CliError;

#[derive(clap::Args)]
pub struct Args {
    /// `manifest.json`, or the directory holding it.
    manifest: PathBuf,
    /// Also hash every shard; exit with status 2 naming each bad one.
    #[arg(long)]
    verify: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let (m, dir) = read_manifest(&args.manifest).map_err(|e| CliError::Usage(e.to_string()))?;
    let largest = m.shards.iter().map(|s| s.bytes).max().unwrap_or(0);
    println!(
        "model {} version {} (format {} v{})",
        m.model.id, m.model.version, m.format, m.format_version
    );
    println!(
        "{} shards, {} bytes, largest {} bytes; tokenizer: {}",
        m.shards.len(),
        m.total_shard_bytes(),
        largest,
        m.tokenizer.as_ref().map_or("none", |t| t.file.as_str())
    );
    let config_keys: Vec<&str> = m
        .config
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    println!(
        "config: {}",
        if config_keys.is_empty() {
            "(empty)".to_owned()
        } else {
            config_keys.join(", ")
        }
    );
    println!("\n| component | tensors | parameters | bytes |\n|---|---:|---:|---:|");
    for (name, c) in m.components() {
        println!(
            "| {name} | {} | {} | {} |",
            c.tensors, c.parameters, c.bytes
        );
    }
    println!("\n| dtype | bytes |\n|---|---:|");
    for (dtype, bytes) in m.bytes_per_dtype() {
        println!("| {dtype} | {bytes} |");
    }
    if args.verify {
        let bad = verify_dir(&m, &dir);
        let files = m.shards.len() + usize::from(m.tokenizer.is_some());
        if bad.is_empty() {
            println!("\nverified {files} files: all sizes and sha256 match");
        } else {
            for b in &bad {
                eprintln!("bad file {}: {}", b.file, b.problem);
            }
            let names: Vec<&str> = bad.iter().map(|b| b.file.as_str()).collect();
            return Err(CliError::Usage(format!(
                "{} of {files} files are bad: {}",
                bad.len(),
                names.join(", ")
            )));
        }
    }
    Ok(())
}
