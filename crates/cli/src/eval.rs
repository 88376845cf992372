//! `unifusion eval`: the demo world's benchmark, judged exactly.
//!
//! Held-out prompts are scenes that use at least one (colour, shape) or (shape, cell) pair the
//! training recipe never shows (`unifusion_train::data::held_out`), phrased as a user would.
//! Every prompt runs with `--seeds` seeds through the real pipeline (VERIFI on, default sampler
//! settings unless flags say otherwise) and the world's judge reads each image back into a
//! scene:
//!
//! - text-to-image: DPG-style categories (entity, attribute, relation, count, global); micro
//!   average, macro average (mean of the category means, every category pooled over all
//!   images), and best-of-N over seeds for both;
//! - edit: one rendered image + an instruction; instruction adherence and identity
//!   preservation (untouched objects and background unchanged);
//! - multi-reference: two rendered images + "put the X from the first into the second"
//!   (zero-shot when the model was trained on single references); scored like an edit of the
//!   second image;
//! - variation: one rendered image, no prompt; scored as text-to-image against the input
//!   scene.
//!
//! `--cases file.jsonl` scores your own prompts instead: one JSON object per line,
//! `{"prompt": "...", "scene": <scene JSON, see crates/world>}`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use unifusion_model::pipeline::{Conditioning, Image, Request, Settings, Task, UniFusion};
use unifusion_model::vlm::processor::VlmTokenizer;
use unifusion_world::score::{best_of_n, category_means, macro_average, micro_average};
use unifusion_world::{
    Background, Category, Edit, HeldOut, ImageScore, RenderConfig, Sampler, SamplerConfig, Scene,
    Tally, Transfer, canonical_description, parse_image, phrase, read_description, render,
    score_edit, score_objects, score_scene,
};

use crate::CliError;
use crate::device::Backend;
use crate::generate::load_model;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model (manifest.json or its directory).
    #[arg(long, default_value = "models/demo")]
    model: PathBuf,
    /// Seeds per prompt (best-of-N uses all of them).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    seeds: u64,
    /// Held-out prompts (and as many edit, multi-reference and variation cases).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    prompts: u64,
    /// Score these cases (JSON lines `{"prompt", "scene"}`) instead of the held-out set.
    #[arg(long)]
    cases: Option<PathBuf>,
    /// Image side in pixels, at least 24 for the judge (default: the model's own width, else 64).
    #[arg(long)]
    size: Option<usize>,
    /// Euler steps (default: the model's own, else the pipeline's).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance weight (default: the model's own, else the pipeline's).
    #[arg(long)]
    guidance: Option<f32>,
    /// Guide only the steps starting at a noise level σ in (LOW, HIGH] (default: the
    /// model's own, else every step).
    #[arg(long, value_name = "LOW,HIGH", value_parser = crate::generate::guidance_interval)]
    guidance_interval: Option<[f32; 2]>,
    /// Seed of the held-out set (which scenes and phrasings).
    #[arg(long, default_value_t = 0)]
    set_seed: u64,
    /// Which scenes: `held-out` (each uses a pair training never saw: the benchmark) or
    /// `seen` (fresh scenes of seen pairs only: how much of a gap is generalisation).
    #[arg(long, value_enum, default_value_t = Split::HeldOut)]
    split: Split,
    /// Condition on the prompt's own tokens instead of the VLM's rewrite (for a model trained
    /// with `train --ablation verifi-off`).
    #[arg(long)]
    no_verifi: bool,
    /// LAP or the last tap only (for a model trained with `train --ablation last-layer`).
    #[arg(long, value_enum, default_value_t = crate::generate::Pooling::Lap)]
    pooling: crate::generate::Pooling,
    /// Also draw a sample grid here (PNG; a `.txt` beside it names each row): the first 6
    /// held-out prompts (intended scene, then one image per seed) and 4 edits (input,
    /// intended result, then the outputs).
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Also write the tables as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The scenes `eval` draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Each scene uses at least one pair training never saw (the benchmark).
    HeldOut,
    /// Fresh scenes of seen pairs only.
    Seen,
    /// One object per scene, of seen pairs: the DiT's placement and drawing, with rewrites
    /// the VLM gets right (a diagnostic, not the benchmark).
    Single,
}

/// Scene `index` of the set: sampled freely (one object only for `Split::Single`) until one
/// uses a pair training never saw (or, for `Split::Seen` and `Split::Single`, until one does
/// not).
fn eval_scene(held: &HeldOut, split: Split, seed: u64, index: u64) -> Scene {
    let config = match split {
        Split::Single => SamplerConfig {
            max_objects: 1,
            ..SamplerConfig::default()
        },
        Split::HeldOut | Split::Seen => SamplerConfig::default(),
    };
    let mut sampler = Sampler::new(config, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    loop {
        let scene = sampler.sample();
        if held.touches(&scene) == (split == Split::HeldOut) {
            return scene;
        }
    }
}

fn to_image(img: &RgbImage) -> Image {
    Image {
        width: img.width() as usize,
        height: img.height() as usize,
        pixels: img.as_raw().clone(),
    }
}

/// Runs the pipeline and reads the result back with the judge.
struct Runner<'a> {
    model: &'a UniFusion,
    tokenizer: &'a VlmTokenizer,
    settings: Settings,
    bar: ProgressBar,
}

impl Runner<'_> {
    fn run(&self, task: Task, prompt: &str, images: &[Image], seed: u64) -> Result<Run, CliError> {
        let settings = Settings {
            seed,
            ..self.settings.clone()
        };
        let request = Request {
            task,
            prompt,
            images,
        };
        let output =
            pollster::block_on(self.model.run(self.tokenizer, &request, &settings, |_| {
                std::ops::ControlFlow::Continue(())
            }))
            .map_err(|e| CliError::Usage(format!("prompt {prompt:?}: {e}")))?;
        self.bar.inc(1);
        let img = RgbImage::from_raw(
            output.image.width as u32,
            output.image.height as u32,
            output.image.pixels,
        )
        .ok_or_else(|| CliError::Device("the pipeline returned a malformed image".into()))?;
        let parsed = parse_image(&img).map_err(|e| CliError::Device(format!("judge: {e}")))?;
        Ok(Run {
            parsed,
            img,
            rewrite: output.rewrite,
        })
    }
}

/// One pipeline run, read back.
struct Run {
    parsed: unifusion_world::ParsedScene,
    img: RgbImage,
    /// The VLM's VERIFI rewrite (empty without VERIFI).
    rewrite: String,
}

/// The VERIFI rewrites of the t2i prompts, read back as scenes and scored like images: how
/// much of each prompt's facts the VLM handed the DiT (the DiT cannot draw what the rewrite
/// lost). A rewrite with no readable background sentence fails every question.
#[derive(Default)]
struct RewriteScores {
    scores: Vec<ImageScore>,
    exact: usize,
    /// The first few `{prompt, want, got}`, to read what the VLM gets wrong.
    samples: Vec<serde_json::Value>,
}

/// Rewrites quoted in the JSON report.
const REWRITE_SAMPLES: usize = 12;

impl RewriteScores {
    fn add(&mut self, intended: &Scene, prompt: &str, rewrite: &str) {
        if self.samples.len() < REWRITE_SAMPLES {
            self.samples.push(json!({
                "prompt": prompt,
                "want": canonical_description(intended),
                "got": rewrite,
            }));
        }
        let (background, found) = read_description(rewrite).unwrap_or_else(|| {
            let wrong = Background::ALL
                .iter()
                .copied()
                .find(|&b| b != intended.background());
            (wrong.unwrap_or(intended.background()), Vec::new())
        });
        // `Scene::new` sorts the objects by cell, so order does not matter.
        if Scene::new(background, found.clone()).is_ok_and(|s| &s == intended) {
            self.exact += 1;
        }
        self.scores
            .push(score_objects(intended, background, &found));
    }

    fn table(&self) -> serde_json::Value {
        let per_category: BTreeMap<String, f64> = Category::ALL
            .iter()
            .zip(category_means(&self.scores))
            .map(|(c, m)| (format!("{c:?}").to_lowercase(), m))
            .collect();
        json!({
            "prompts": self.scores.len(),
            "exact": self.exact as f64 / self.scores.len().max(1) as f64,
            "micro_avg": micro_average(&self.scores),
            "macro_avg": macro_average(&self.scores),
            "per_category": per_category,
            "samples": self.samples,
        })
    }
}

/// Rows of images (all one size) side by side, 2-px grey gaps, and the rows' captions.
#[derive(Default)]
struct Grid {
    rows: Vec<(String, Vec<RgbImage>)>,
}

impl Grid {
    fn save(&self, path: &Path) -> Result<(), CliError> {
        let Some(first) = self.rows.iter().flat_map(|(_, r)| r).next() else {
            return Ok(());
        };
        let (w, h, gap) = (first.width(), first.height(), 2);
        let cols = self.rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0) as u32;
        let mut out = RgbImage::from_pixel(
            cols * (w + gap) + gap,
            self.rows.len() as u32 * (h + gap) + gap,
            image::Rgb([96, 96, 96]),
        );
        for (y, (_, row)) in self.rows.iter().enumerate() {
            for (x, img) in row.iter().enumerate() {
                image::imageops::replace(
                    &mut out,
                    img,
                    i64::from(gap + x as u32 * (w + gap)),
                    i64::from(gap + y as u32 * (h + gap)),
                );
            }
        }
        let words = |e: String| CliError::Usage(format!("--grid {}: {e}", path.display()));
        out.save(path).map_err(|e| words(e.to_string()))?;
        let captions: String = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, (c, _))| format!("row {}: {c}\n", i + 1))
            .collect();
        std::fs::write(path.with_extension("txt"), captions)
            .map_err(|e| words(crate::image_io::io_words(&e)))
    }
}

/// The t2i block of the report from per-prompt image scores.
fn t2i_table(per_prompt: &[Vec<ImageScore>]) -> serde_json::Value {
    let all: Vec<ImageScore> = per_prompt.iter().flatten().cloned().collect();
    let best: Vec<ImageScore> = per_prompt
        .iter()
        .filter_map(|imgs| {
            imgs.iter()
                .max_by(|a, b| a.pooled().fraction().total_cmp(&b.pooled().fraction()))
                .cloned()
        })
        .collect();
    let means = category_means(&all);
    let per_category: BTreeMap<String, f64> = Category::ALL
        .iter()
        .zip(means)
        .map(|(c, m)| (format!("{c:?}").to_lowercase(), m))
        .collect();
    json!({
        "images": all.len(),
        "micro_avg": micro_average(&all),
        "micro_best4": best_of_n(per_prompt),
        "macro_avg": macro_average(&all),
        "macro_best4": macro_average(&best),
        "per_category": per_category,
    })
}

fn edit_table(scores: &[unifusion_world::EditScore]) -> serde_json::Value {
    let pool = |f: fn(&unifusion_world::EditScore) -> Tally| {
        let mut t = Tally::default();
        for s in scores {
            let x = f(s);
            t.correct += x.correct;
            t.total += x.total;
        }
        t.fraction()
    };
    json!({
        "cases": scores.len(),
        "adherence": pool(|s| s.adherence),
        "identity": pool(|s| s.identity),
    })
}

/// Reads `--cases`: one `{"prompt", "scene"}` per line; blank lines are skipped.
fn read_cases(path: &Path) -> Result<Vec<(String, Scene)>, CliError> {
    let usage = |m: String| CliError::Usage(format!("{}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| usage(crate::image_io::io_words(&e)))?;
    let mut cases = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| usage(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| usage(format!("line {}: {m}", i + 1));
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| at(format!("not JSON: {e}")))?;
        let prompt = value
            .get("prompt")
            .and_then(serde_json::Value::as_str)
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| at("needs a non-empty string \"prompt\"".into()))?;
        let scene = value
            .get("scene")
            .ok_or_else(|| at("needs a \"scene\"".into()))?;
        let scene = Scene::from_json(&scene.to_string()).map_err(|e| at(e.to_string()))?;
        cases.push((prompt.to_string(), scene));
    }
    if cases.is_empty() {
        return Err(usage("no cases in the file".into()));
    }
    Ok(cases)
}

fn print_t2i(title: &str, t: &serde_json::Value) {
    let f = |k: &str| t.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    println!("\n## {title} ({} images)\n", t["images"]);
    println!("| micro avg | micro best-of-N | macro avg | macro best-of-N |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {:.3} | {:.3} | {:.3} | {:.3} |",
        f("micro_avg"),
        f("micro_best4"),
        f("macro_avg"),
        f("macro_best4")
    );
    if let Some(cats) = t.get("per_category").and_then(serde_json::Value::as_object) {
        println!("\n| category | mean |\n|---|---:|");
        for (c, m) in cats {
            println!("| {c} | {:.3} |", m.as_f64().unwrap_or(0.0));
        }
    }
}

fn print_edit(title: &str, t: &serde_json::Value) {
    let f = |k: &str| t.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    println!("\n## {title} ({} cases)\n", t["cases"]);
    println!("| adherence | identity |\n|---:|---:|");
    println!("| {:.3} | {:.3} |", f("adherence"), f("identity"));
}

pub fn run(args: Args) -> Result<(), CliError> {
    if let Some(size) = args.size.filter(|&s| s < 24) {
        return Err(CliError::Usage(format!(
            "--size {size}: the judge needs at least 24 px"
        )));
    }
    let cases = args.cases.as_deref().map(read_cases).transpose()?;
    let device = args.backend.device()?;
    let (model, tokenizer) = load_model(&args.model, &device, args.quiet)?;
    let base = model.config.default_settings();
    let size = args.size.unwrap_or(if model.config.defaults.is_some() {
        base.width
    } else {
        64
    });
    let settings = Settings {
        width: size,
        height: size,
        steps: args.steps.unwrap_or(base.steps),
        guidance: args.guidance.unwrap_or(base.guidance),
        guidance_interval: args.guidance_interval.unwrap_or(base.guidance_interval),
        verifi: !args.no_verifi,
        conditioning: match args.pooling {
            crate::generate::Pooling::Lap => Conditioning::Lap,
            crate::generate::Pooling::LastLayer => Conditioning::LastLayer,
        },
        ..base
    };
    let (steps, guidance, interval) = (
        settings.steps,
        settings.guidance,
        settings.guidance_interval,
    );
    model
        .validate_settings(&settings)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let seeds = args.seeds;
    let n = args.prompts;
    let runs = match &cases {
        Some(c) => c.len() as u64 * seeds,
        None => n * seeds * 4,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(runs)
    };
    bar.set_style(
        ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} images, {elapsed}, ~{eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let runner = Runner {
        model: &model,
        tokenizer: &tokenizer,
        settings,
        bar,
    };
    let render_config = RenderConfig::with_size(size as u32);
    let rendered = |scene: &Scene| -> Result<RgbImage, CliError> {
        render(scene, &render_config).map_err(|e| CliError::Device(e.to_string()))
    };
    let draw =
        |scene: &Scene| -> Result<Image, CliError> { rendered(scene).map(|img| to_image(&img)) };
    let mut grid = Grid::default();
    let mut report = serde_json::Map::new();
    let verifi = !args.no_verifi;
    let mut rewrites = RewriteScores::default();
    if let Some(cases) = cases {
        let mut per_prompt = Vec::new();
        for (prompt, scene) in &cases {
            let mut imgs = Vec::new();
            let mut row = vec![rendered(scene)?];
            for seed in 0..seeds {
                let run = runner.run(Task::TextToImage, prompt, &[], seed)?;
                imgs.push(score_scene(scene, &run.parsed));
                row.push(run.img);
                if seed == 0 && verifi {
                    rewrites.add(scene, prompt, &run.rewrite);
                }
            }
            if grid.rows.len() < 10 {
                grid.rows.push((format!("text-to-image: {prompt}"), row));
            }
            per_prompt.push(imgs);
        }
        report.insert("t2i".into(), t2i_table(&per_prompt));
    } else {
        let held = unifusion_train::data::held_out();
        let scenes: Vec<Scene> = (0..n)
            .map(|i| eval_scene(&held, args.split, args.set_seed, i))
            .collect();
        let mut per_prompt = Vec::new();
        let mut variation = Vec::new();
        for (i, scene) in scenes.iter().enumerate() {
            let prompt = phrase(scene, args.set_seed ^ (i as u64) << 20).text;
            let mut imgs = Vec::new();
            let mut vars = Vec::new();
            let input = [draw(scene)?];
            let mut row = vec![rendered(scene)?];
            for seed in 0..seeds {
                let run = runner.run(Task::TextToImage, &prompt, &[], seed)?;
                imgs.push(score_scene(scene, &run.parsed));
                row.push(run.img);
                if seed == 0 && verifi {
                    rewrites.add(scene, &prompt, &run.rewrite);
                }
                let run = runner.run(Task::Variation, "", &input, seed)?;
                vars.push(score_scene(scene, &run.parsed));
            }
            if i < 6 {
                grid.rows.push((
                    format!("text-to-image (intended, then seeds): {prompt}"),
                    row,
                ));
            }
            per_prompt.push(imgs);
            variation.push(vars);
        }
        let mut edits = Vec::new();
        let mut transfers = Vec::new();
        for (i, scene) in scenes.iter().enumerate() {
            let edit = Edit::sample(scene, args.set_seed ^ 0xED17 ^ i as u64);
            let image = [draw(&edit.before)?];
            let second = &scenes[(i + 1) % scenes.len()];
            let transfer = Transfer::sample(scene, second, args.set_seed ^ 0x7A45 ^ i as u64);
            let mut row = vec![rendered(&edit.before)?, rendered(&edit.after)?];
            for seed in 0..seeds {
                let run = runner.run(Task::Edit, &edit.instructions[0], &image, seed)?;
                edits.push(score_edit(&edit.before, &edit.after, &run.parsed));
                row.push(run.img);
                match &transfer {
                    Some(t) => {
                        let images = [draw(&t.first)?, draw(&t.second)?];
                        let run =
                            runner.run(Task::MultiReference, &t.instructions[0], &images, seed)?;
                        transfers.push(score_edit(&t.second, &t.after, &run.parsed));
                    }
                    None => runner.bar.inc(1),
                }
            }
            if i < 4 {
                grid.rows.push((
                    format!(
                        "edit (input, intended, then seeds): {}",
                        edit.instructions[0]
                    ),
                    row,
                ));
            }
        }
        report.insert("t2i".into(), t2i_table(&per_prompt));
        report.insert("edit".into(), edit_table(&edits));
        report.insert("multi_reference".into(), edit_table(&transfers));
        report.insert("variation".into(), t2i_table(&variation));
        let split = match args.split {
            Split::HeldOut => "held-out",
            Split::Seen => "seen",
            Split::Single => "single",
        };
        report.insert("split".into(), json!(split));
    }
    if verifi && let Some(t2i) = report.get_mut("t2i").and_then(|t| t.as_object_mut()) {
        t2i.insert("rewrite".into(), rewrites.table());
    }
    runner.bar.finish_and_clear();
    if let Some(path) = &args.grid {
        grid.save(path)?;
    }
    let report = serde_json::Value::Object(report);
    println!(
        "# unifusion eval: {} (seeds {seeds}, {}×{} px, {} steps, guidance {} at σ in ({}, {}])",
        args.model.display(),
        size,
        size,
        steps,
        guidance,
        interval[0],
        interval[1]
    );
    print_t2i("Text-to-image", &report["t2i"]);
    if let Some(r) = report["t2i"].get("rewrite") {
        let f = |k: &str| r.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        println!(
            "\nVERIFI rewrites read back as scenes ({} prompts): micro {:.3}, macro {:.3}, \
             exact {:.3}",
            r["prompts"],
            f("micro_avg"),
            f("macro_avg"),
            f("exact")
        );
    }
    if report.get("edit").is_some() {
        print_edit("Edit", &report["edit"]);
        print_edit("Multi-reference (zero-shot)", &report["multi_reference"]);
        print_t2i("Variation (against the input scene)", &report["variation"]);
    }
    if let Some(path) = &args.json {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Device(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| {
            CliError::Usage(format!(
                "{}: {}",
                path.display(),
                crate::image_io::io_words(&e)
            ))
        })?;
    }
    Ok(())
}
