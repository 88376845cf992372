//! `unifusion edit` (one image: edit; several: multi-reference; `--zero-shot`: zero-shot edit)
//! and `unifusion variation` (images only).

use std::path::PathBuf;

use unifusion_model::pipeline::Task;
use unifusion_model::pipeline::tasks::ZERO_SHOT_DEFAULT_PERCENT;

use crate::CliError;
use crate::generate::{SampleArgs, run_task};
use crate::image_io::read_image;

#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// Input image (PNG); repeat for multi-reference.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// The instruction.
    #[arg(long)]
    pub prompt: String,
    /// Zero-shot edit: condition the first K% of the steps on the image tokens only, the rest
    /// on the rewritten text only (one image).
    #[arg(long, value_name = "K", num_args = 0..=1, default_missing_value = "15")]
    pub zero_shot: Option<f32>,
    #[command(flatten)]
    pub sample: SampleArgs,
}

#[derive(clap::Args, Debug)]
pub struct VariationArgs {
    /// Input image (PNG); repeat to mix several.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub sample: SampleArgs,
}

/// `unifusion edit`.
pub fn run_edit(args: EditArgs) -> Result<(), CliError> {
    let images = args
        .images
        .iter()
        .map(|p| read_image(p))
        .collect::<Result<Vec<_>, _>>()?;
    let task = match (args.zero_shot, images.len()) {
        (Some(k), _) => {
            if !(0.0..=100.0).contains(&k) {
                return Err(CliError::Usage(format!(
                    "--zero-shot {k}: the share of image-token steps must be within 0..=100 (default {ZERO_SHOT_DEFAULT_PERCENT})"
                )));
            }
            Task::ZeroShotEdit { image_percent: k }
        }
        (None, 1) => Task::Edit,
        (None, _) => Task::MultiReference,
    };
    run_task(task, &args.prompt, &images, &args.images, &args.sample)
}

/// `unifusion variation`.
pub fn run_variation(args: VariationArgs) -> Result<(), CliError> {
    let images = args
        .images
        .iter()
        .map(|p| read_image(p))
        .collect::<Result<Vec<_>, _>>()?;
    run_task(Task::Variation, "", &images, &args.images, &args.sample)
}
