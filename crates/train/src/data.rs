//! Training samples from the demo world, each a pure function of `(seed, index)` so any step's
//! batch can be drawn again after a resume.
//!
//! Scenes come from the world's sampler with a fixed held-out split ([`held_out`]): those
//! (colour, shape) and (shape, cell) pairs never appear in training, so an evaluation on
//! scenes that use them measures generalisation to unseen combinations.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use unifusion_world::sampler::{all_color_shape_pairs, all_shape_cell_pairs, split_pairs};
use unifusion_world::{
    Background, Edit, HeldOut, RenderConfig, Sampler, SamplerConfig, Scene, Transfer,
    description_in_order, phrase,
};

use crate::TrainError;

/// Seed of the held-out split (fixed, so every run and the evaluation agree).
pub const HELD_OUT_SEED: u64 = 8;
/// Held-out (colour, shape) pairs (of 40).
pub const HELD_OUT_COLOR_SHAPE: usize = 4;
/// Held-out (shape, cell) pairs (of 45).
pub const HELD_OUT_SHAPE_CELL: usize = 4;

/// The pairs training never sees.
pub fn held_out() -> HeldOut {
    HeldOut {
        color_shape: split_pairs(
            &all_color_shape_pairs(),
            HELD_OUT_COLOR_SHAPE,
            HELD_OUT_SEED,
        )
        .1,
        shape_cell: split_pairs(&all_shape_cell_pairs(), HELD_OUT_SHAPE_CELL, HELD_OUT_SEED).1,
    }
}

/// SplitMix64 of `(a, b)`: independent seeds per stage, step and sample.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The training scene number `index` of stream `seed`.
pub fn scene(seed: u64, index: u64) -> Scene {
    let config = SamplerConfig {
        held_out: held_out(),
        ..SamplerConfig::default()
    };
    Sampler::new(config, mix(seed, index)).sample()
}

/// An image as `[3][size][size]` floats in [−1, 1] (the VAE's range).
pub fn image_values(scene: &Scene, size: u32) -> Result<Vec<f32>, TrainError> {
    let img = unifusion_world::render(scene, &RenderConfig::with_size(size))?;
    Ok(rgb_to_planar(img.as_raw(), size as usize))
}

/// How many `token`-px squares a square image has per side; an error if it is not square or
/// `token` does not divide it.
fn squares_per_side(img: &image::RgbImage, token: u32) -> Result<usize, TrainError> {
    let size = img.width();
    if token == 0 || !size.is_multiple_of(token) || img.height() != size {
        return Err(TrainError::Model(format!(
            "a {size}×{}-px image does not split into {token}-px squares",
            img.height()
        )));
    }
    Ok((size / token) as usize)
}

/// Which `token × token`-pixel squares of a rendered square image (row-major) hold any
/// object pixel, i.e. any pixel that is not the `background` colour.
pub fn foreground_squares(
    img: &image::RgbImage,
    background: Background,
    token: u32,
) -> Result<Vec<bool>, TrainError> {
    let n = squares_per_side(img, token)?;
    let bg = background.rgb();
    let mut squares = vec![false; n * n];
    for (x, y, px) in img.enumerate_pixels() {
        if px.0 != bg {
            squares[(y / token) as usize * n + (x / token) as usize] = true;
        }
    }
    Ok(squares)
}

/// Which `token × token`-pixel squares differ between two rendered square images of one size
/// (row-major): where an edit changed the picture (a removed object's place, a recoloured
/// object, everything when the background changed).
pub fn changed_squares(
    before: &image::RgbImage,
    after: &image::RgbImage,
    token: u32,
) -> Result<Vec<bool>, TrainError> {
    let n = squares_per_side(after, token)?;
    if before.dimensions() != after.dimensions() {
        return Err(TrainError::Model(format!(
            "a {}×{}-px image against a {}×{}-px one",
            before.width(),
            before.height(),
            after.width(),
            after.height()
        )));
    }
    let mut squares = vec![false; n * n];
    for ((x, y, a), b) in after.enumerate_pixels().zip(before.pixels()) {
        if a != b {
            squares[(y / token) as usize * n + (x / token) as usize] = true;
        }
    }
    Ok(squares)
}

/// RGB8 row-major → `[3][h][w]` in [−1, 1].
pub fn rgb_to_planar(rgb: &[u8], size: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * size * size];
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * size * size + p] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// `[3][h][w]` in [−1, 1] → RGB8 row-major.
pub fn planar_to_rgb(values: &[f32], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; 3 * size * size];
    for p in 0..size * size {
        for c in 0..3 {
            let v = (values[c * size * size + p] + 1.0) * 127.5;
            out[p * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// What a VLM sample asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextTask {
    /// One image, no request: describe it (VERIFI's image variation).
    Caption,
    /// A user phrasing → the canonical description (VERIFI text-to-image).
    Rewrite,
    /// One image and an edit instruction → the edited scene's description.
    Edit,
    /// Two images and a transfer instruction → the result's description.
    Transfer,
}

/// One VLM / DiT sample: the request and the target scene.
#[derive(Clone, Debug)]
pub struct Sample {
    pub task: TextTask,
    /// Scenes whose images the VLM sees, in order (0, 1 or 2).
    pub inputs: Vec<Scene>,
    /// The user's text (empty for a caption).
    pub prompt: String,
    /// The scene the answer describes (and the DiT draws).
    pub target: Scene,
    /// The answer's object order (indices into the target's objects): the order the user's
    /// text mentions them for a rewrite, reading order (empty) otherwise.
    pub order: Vec<usize>,
}

impl Sample {
    /// The VERIFI rewrite target: the target's canonical description, its objects in the
    /// order of [`Sample::order`] (reading order when it is empty).
    pub fn answer(&self) -> String {
        description_in_order(&self.target, &self.order)
    }
}

/// Mix of tasks, as weights.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskMix {
    pub caption: f32,
    pub rewrite: f32,
    pub edit: f32,
    pub transfer: f32,
}

impl TaskMix {
    fn pick(&self, r: f32) -> TextTask {
        let total = self.caption + self.rewrite + self.edit + self.transfer;
        let mut x = r * total;
        for (w, t) in [
            (self.caption, TextTask::Caption),
            (self.rewrite, TextTask::Rewrite),
            (self.edit, TextTask::Edit),
        ] {
            if x < w {
                return t;
            }
            x -= w;
        }
        TextTask::Transfer
    }
}

/// Sample `index` of stream `seed`.
pub fn sample(seed: u64, index: u64, mix_of: &TaskMix) -> Sample {
    let s = mix(seed, index);
    let mut rng = ChaCha8Rng::seed_from_u64(s);
    let task = mix_of.pick(rng.random::<f32>());
    let base = scene(s, 0);
    match task {
        TextTask::Caption => Sample {
            task,
            inputs: vec![base.clone()],
            prompt: String::new(),
            target: base,
            order: Vec::new(),
        },
        TextTask::Rewrite => {
            let p = phrase(&base, mix(s, 1));
            Sample {
                task,
                inputs: Vec::new(),
                order: p.mentions.iter().map(|m| m.object).collect(),
                prompt: p.text,
                target: base,
            }
        }
        TextTask::Edit => {
            // An edit may create a held-out pair (add, recolour, move): draw another.
            let held = held_out();
            let edit = (0..64)
                .map(|k| Edit::sample(&base, mix(s, 100 + k)))
                .find(|e| !held.touches(&e.after))
                .unwrap_or_else(|| Edit::sample(&base, mix(s, 2)));
            Sample {
                task,
                inputs: vec![base],
                prompt: edit.instruction(mix(s, 3)).to_string(),
                target: edit.after,
                order: Vec::new(),
            }
        }
        TextTask::Transfer => {
            // Draw second scenes until one takes an object of the first (almost always the
            // first or second try); fall back to a caption of the first otherwise.
            for k in 0..16 {
                let second = scene(s, 10 + k);
                if let Some(t) = Transfer::sample(&base, &second, mix(s, 4)) {
                    let i = rng.random_range(0..t.instructions.len());
                    return Sample {
                        task,
                        inputs: vec![t.first.clone(), t.second.clone()],
                        prompt: t.instructions[i].clone(),
                        target: t.after,
                        order: Vec::new(),
                    };
                }
            }
            Sample {
                task: TextTask::Caption,
                inputs: vec![base.clone()],
                prompt: String::new(),
                target: base,
                order: Vec::new(),
            }
        }
    }
}

/// The binding partner of a text-to-image sample: the same objects (shapes, sizes, cells) and
/// background with their colours handed on `k` objects along in reading order (object `i`
/// takes object `i + k`'s colour), for the first `k` whose scene differs and uses no held-out
/// pair, phrased afresh with `seed`. The two differ only in which object has which colour, the
/// one thing the DiT learns slowest (the condition probe, docs/TRAINING.md). `None` for
/// another task, a single object, one colour for all, or no allowed rotation.
pub fn rebound(sample: &Sample, seed: u64) -> Option<Sample> {
    rotated(sample, seed, colours_handed_on)
}

/// The placement partner of a text-to-image sample: the same objects (shapes, colours, sizes)
/// and background, each moved to the cell of the object `k` along in reading order, for the
/// first `k` whose scene uses no held-out pair, phrased afresh with `seed`. The two hold the
/// same objects in the same cells and differ only in which object stands where, so under the
/// same noise the DiT learns to put each object in its own cell (relation, the judge's
/// weakest category). `None` for another task, a single object, objects alike in all but
/// their cells, or no allowed rotation.
pub fn relocated(sample: &Sample, seed: u64) -> Option<Sample> {
    rotated(sample, seed, cells_handed_on)
}

/// A partner of a text-to-image sample made by `hand_on(scene, k)` for the first `k` in
/// `1..n` whose scene differs and uses no held-out pair, phrased afresh with `seed`.
fn rotated(
    sample: &Sample,
    seed: u64,
    hand_on: fn(&Scene, usize) -> Option<Scene>,
) -> Option<Sample> {
    if sample.task != TextTask::Rewrite {
        return None;
    }
    let n = sample.target.objects().len();
    let held = held_out();
    (1..n).find_map(|k| {
        let target = hand_on(&sample.target, k)?;
        if held.touches(&target) {
            return None;
        }
        Some(rewrite_of(target, seed))
    })
}

/// The count partner of a text-to-image sample of two or more objects: the same scene with
/// one object (chosen by `seed`) left out, phrased afresh with `seed`. The two differ only by
/// that object, so under the same noise the DiT learns to leave undescribed cells empty, the
/// over-drawing every run's grid shows. `None` for another task or a single object.
pub fn one_fewer(sample: &Sample, seed: u64) -> Option<Sample> {
    if sample.task != TextTask::Rewrite {
        return None;
    }
    let mut objects = sample.target.objects().to_vec();
    if objects.len() < 2 {
        return None;
    }
    objects.remove((mix(seed, 0x0F) % objects.len() as u64) as usize);
    let target = Scene::new(sample.target.background(), objects).ok()?;
    Some(rewrite_of(target, seed))
}

/// A text-to-image sample of `target` in a fresh phrasing (`seed`).
fn rewrite_of(target: Scene, seed: u64) -> Sample {
    let p = phrase(&target, seed);
    Sample {
        task: TextTask::Rewrite,
        inputs: Vec::new(),
        order: p.mentions.iter().map(|m| m.object).collect(),
        prompt: p.text,
        target,
    }
}

/// `scene` with each object in the colour of the object `k` after it in reading order (shapes,
/// sizes, cells and background kept); `None` when that changes nothing (one colour for all).
pub fn colours_handed_on(scene: &Scene, k: usize) -> Option<Scene> {
    handed_on(scene, k, |object, from| unifusion_world::Object {
        color: from.color,
        ..object
    })
}

/// `scene` with each object moved to the cell of the object `k` after it in reading order
/// (shapes, colours, sizes and background kept); `None` when that changes nothing.
pub fn cells_handed_on(scene: &Scene, k: usize) -> Option<Scene> {
    handed_on(scene, k, |object, from| unifusion_world::Object {
        cell: from.cell,
        ..object
    })
}

/// `scene` with object `i` replaced by `take(object i, object i + k)` (indices in reading
/// order, modulo the count); `None` when the scene comes out the same.
fn handed_on(
    scene: &Scene,
    k: usize,
    take: impl Fn(unifusion_world::Object, &unifusion_world::Object) -> unifusion_world::Object,
) -> Option<Scene> {
    let objects = scene.objects();
    let n = objects.len();
    let new: Vec<_> = (0..n)
        .map(|i| take(objects[i], &objects[(i + k) % n]))
        .collect();
    let scene_after = Scene::new(scene.background(), new).ok()?;
    (scene_after != *scene).then_some(scene_after)
}

/// Every kind of text the model reads or writes, for the tokenizer: `n` samples of each task
/// (prompts and answers), the VERIFI system prompt and the chat template's words.
pub fn text_corpus(seed: u64, n: u64) -> Vec<String> {
    // Every VLM sequence opens with the chat head and the VERIFI system prompt: weight them
    // like a frequent text so their words become single tokens (187 tokens → far fewer).
    let head = format!(
        "system\n{}\nuser\nassistant\n",
        unifusion_model::pipeline::config::VERIFI_SYSTEM_PROMPT
    );
    let mut out = vec![head; (n / 10).max(2) as usize];
    let all = TaskMix {
        caption: 1.0,
        rewrite: 1.0,
        edit: 1.0,
        transfer: 1.0,
    };
    for i in 0..n {
        let s = sample(seed, i, &all);
        if !s.prompt.is_empty() {
            out.push(s.prompt.clone());
        }
        out.push(s.answer());
        // The edit instructions' other wordings.
        if s.task == TextTask::Edit {
            let e = Edit::sample(&s.inputs[0], mix(i, 7));
            out.extend(e.instructions);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DiT stage's mix in the recipe (`DitStageConfig::recipe`).
    fn recipe_mix() -> TaskMix {
        TaskMix {
            caption: 1.0,
            rewrite: 2.0,
            edit: 1.0,
            transfer: 0.25,
        }
    }

    /// A partner's answer (the DiT's condition) describes its scene, every object once.
    fn assert_answer_is_its_scene(p: &Sample) {
        let (background, mut read) =
            unifusion_world::read_description(&p.answer()).expect("canonical");
        read.sort_by_key(|o| o.cell);
        assert_eq!(background, p.target.background());
        assert_eq!(read, p.target.objects());
    }

    /// What every kind of partner `p` of sample `s` shares: both text to image, another scene
    /// on the same background, no held-out pair, an answer that reads back as its scene.
    fn assert_a_partner(s: &Sample, p: &Sample, held: &HeldOut) {
        assert_eq!(s.task, TextTask::Rewrite);
        assert_eq!(p.task, TextTask::Rewrite);
        assert_ne!(p.target, s.target);
        assert!(!held.touches(&p.target));
        assert_eq!(p.target.background(), s.target.background());
        assert_answer_is_its_scene(p);
    }

    #[test]
    fn a_binding_partner_moves_only_the_colours_between_objects() {
        let mix_of = recipe_mix();
        let held = held_out();
        let (mut partners, mut none_multi) = (0, 0);
        let samples = 4000;
        for i in 0..samples {
            let s = sample(5, i, &mix_of);
            let colours = |sc: &Scene| {
                let mut c: Vec<_> = sc.objects().iter().map(|o| o.color).collect();
                c.sort_by_key(|c| c.name());
                c
            };
            let Some(p) = rebound(&s, mix(5, i)) else {
                let objects = s.target.objects();
                let one_colour = objects.iter().all(|o| o.color == objects[0].color);
                if s.task == TextTask::Rewrite && !one_colour {
                    none_multi += 1; // every rotation touches a held-out pair
                }
                continue;
            };
            partners += 1;
            assert_a_partner(&s, &p, &held);
            assert_eq!(colours(&p.target), colours(&s.target));
            for (a, b) in p.target.objects().iter().zip(s.target.objects()) {
                assert_eq!((a.shape, a.size, a.cell), (b.shape, b.size, b.cell));
            }
            assert_ne!(p.prompt, s.prompt);
        }
        // `cargo test -p unifusion-train --lib a_binding_partner -- --nocapture`: the share
        // docs/TRAINING.md "Binding pairs" quotes.
        println!(
            "{partners} of {samples} samples have a partner; {none_multi} multi-colour text-to-image samples have none"
        );
        assert!(partners > 600, "{partners} partners of {samples} samples");
        assert!(none_multi < partners / 4, "{none_multi} refused");
    }

    #[test]
    fn a_placement_partner_moves_the_objects_between_their_cells() {
        let mix_of = recipe_mix();
        let held = held_out();
        let mut partners = 0;
        let cells = |sc: &Scene| sc.objects().iter().map(|o| o.cell).collect::<Vec<_>>();
        let looks = |sc: &Scene| {
            let mut o: Vec<_> = sc
                .objects()
                .iter()
                .map(|o| (o.shape, o.color, o.size))
                .collect();
            o.sort();
            o
        };
        for i in 0..2000 {
            let s = sample(5, i, &mix_of);
            let Some(p) = relocated(&s, mix(5, i)) else {
                continue;
            };
            partners += 1;
            assert_a_partner(&s, &p, &held);
            assert_eq!(cells(&p.target), cells(&s.target));
            assert_eq!(looks(&p.target), looks(&s.target));
        }
        assert!(partners > 300, "{partners} partners of 2000 samples");
        let single = (0..200)
            .map(|i| sample(5, i, &mix_of))
            .find(|s| s.task == TextTask::Rewrite && s.target.objects().len() == 1)
            .expect("a single object in 200 samples");
        assert!(relocated(&single, 1).is_none());
    }

    #[test]
    fn a_count_partner_leaves_exactly_one_object_out() {
        let mix_of = recipe_mix();
        let held = held_out();
        let mut partners = 0;
        for i in 0..2000 {
            let s = sample(5, i, &mix_of);
            let Some(p) = one_fewer(&s, mix(5, i)) else {
                assert!(s.task != TextTask::Rewrite || s.target.objects().len() < 2);
                continue;
            };
            partners += 1;
            assert_a_partner(&s, &p, &held);
            let (before, after) = (s.target.objects(), p.target.objects());
            assert_eq!(after.len() + 1, before.len());
            assert!(after.iter().all(|o| before.contains(o)));
        }
        assert!(partners > 300, "{partners} partners of 2000 samples");
    }

    #[test]
    fn changed_squares_mark_exactly_the_squares_that_differ() {
        let before = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        let mut after = before.clone();
        after.put_pixel(5, 1, image::Rgb([10, 20, 31]));
        after.put_pixel(0, 7, image::Rgb([0, 0, 0]));
        let changed = changed_squares(&before, &after, 4).expect("splits");
        assert_eq!(changed, vec![false, true, true, false]);
        assert_eq!(
            changed_squares(&before, &before, 2).expect("splits"),
            vec![false; 16]
        );
        assert!(changed_squares(&before, &after, 3).is_err());
        let small = image::RgbImage::new(4, 4);
        assert!(changed_squares(&small, &after, 4).is_err());
    }

    #[test]
    fn foreground_squares_mark_exactly_the_object_squares() {
        // One large circle in the top-left cell of a 64-px image (cells are ~21 px).
        let scene = Scene::from_json(
            r#"{"background":"white","objects":[
                {"shape":"circle","color":"red","size":"large","cell":[0,0]}]}"#,
        )
        .expect("valid");
        let img = unifusion_world::render(&scene, &RenderConfig::with_size(64)).expect("renders");
        let fg = foreground_squares(&img, scene.background(), 8).expect("splits");
        assert_eq!(fg.len(), 64);
        let marked: Vec<usize> = (0..64).filter(|&i| fg[i]).collect();
        // The circle sits inside the first 3 × 3 squares (24 px) and covers their middle.
        assert!(marked.iter().all(|&i| i / 8 < 3 && i % 8 < 3), "{marked:?}");
        assert!(fg[8 + 1], "the square at the circle's centre");
        assert!(marked.len() >= 4, "{marked:?}");
        assert!(foreground_squares(&img, scene.background(), 7).is_err());
    }

    #[test]
    fn samples_are_deterministic_and_avoid_held_out_pairs() {
        let all = TaskMix {
            caption: 1.0,
            rewrite: 1.0,
            edit: 1.0,
            transfer: 1.0,
        };
        let held = held_out();
        let mut tasks = std::collections::BTreeSet::new();
        for i in 0..200 {
            let a = sample(5, i, &all);
            let b = sample(5, i, &all);
            assert_eq!((a.prompt.clone(), a.target.clone()), (b.prompt, b.target));
            assert!(a.inputs.iter().all(|s| !held.touches(s)));
            assert!(!held.touches(&a.target), "{}", a.target.to_json());
            tasks.insert(format!("{:?}", a.task));
        }
        assert_eq!(tasks.len(), 4, "every task is drawn: {tasks:?}");
        let img = image_values(&scene(1, 2), 32).expect("renders");
        let back = planar_to_rgb(&img, 32);
        assert_eq!(rgb_to_planar(&back, 32), img);
    }
}
