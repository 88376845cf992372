//! Writes a contact sheet of sampled scenes, to look at:
//! `cargo run -p unifusion-world --example sample_grid -- out.png [size] [seed]`.

use std::path::PathBuf;

use unifusion_world::render::{contact_sheet, save_png};
use unifusion_world::{RenderConfig, Sampler, SamplerConfig, canonical_description, render};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "sample_grid.png".to_owned()));
    let size: u32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let seed: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let scenes = Sampler::new(SamplerConfig::default(), seed).take(32);
    let tiles = scenes
        .iter()
        .map(|s| render(s, &RenderConfig::with_size(size)))
        .collect::<Result<Vec<_>, _>>()?;
    save_png(&contact_sheet(&tiles, 8), &out)?;
    for (i, scene) in scenes.iter().enumerate() {
        println!("{i:2}: {}", canonical_description(scene));
    }
    println!("wrote {}", out.display());
    Ok(())
}
