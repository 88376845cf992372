//! The UniFusion pipeline end to end on tiny random models: the VLM fixture's InternVL weights
//! (tests/fixtures/vlm/layernorm_untied: width 48, 3 layers, 56-px tiles of 4 tokens) and a
//! `RandomInit` generator sized to it (text width 48, one LAP slot per tap) with a tiny VAE.
//! Outputs are noise; what is checked is that every path runs and the pieces compose.

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use unifusion_model::generator::config::{AutoencoderKlConfig, AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::sampler::{self, Shift};
use unifusion_model::generator::tiny_vae::TinyDecoder;
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{ImagePositions, Krea2Transformer, RandomInit, TextPositions};
use unifusion_model::pipeline::tasks::{ConditionSchedule, zero_shot_switch_step};
use unifusion_model::pipeline::{
    Conditioning, Event, Image, Phase, PipelineConfig, PipelineError, Request, Settings, Task,
    Tokenize, UniFusion, Vae, VaeConfig, Watch,
};
use unifusion_model::vlm::{InternVl, InternVlConfig, KvCache, VlmError, VlmInput, Weights};

const IM_END: u32 = 257;

/// The fixture tokenizer's special tokens (ids 256..=260); every other byte is its own id.
/// Not the fixture's byte-level BPE ids, but the same vocabulary and specials, which is all
/// a random-weight VLM needs.
struct ByteTokenizer;

const SPECIALS: [&str; 5] = [
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
];

impl Tokenize for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, VlmError> {
        let mut ids = Vec::new();
        let mut rest = text;
        'outer: while !rest.is_empty() {
            for (k, s) in SPECIALS.iter().enumerate() {
                if let Some(r) = rest.strip_prefix(s) {
                    ids.push(256 + k as u32);
                    rest = r;
                    continue 'outer;
                }
            }
            ids.push(rest.as_bytes()[0] as u32);
            rest = &rest[1..];
            while !rest.is_char_boundary(0) {
                ids.push(rest.as_bytes()[0] as u32);
                rest = &rest[1..];
            }
        }
        Ok(ids)
    }
    fn decode(&self, ids: &[u32]) -> Result<String, VlmError> {
        let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn devices() -> Vec<(&'static str, Device)> {
    vec![
        ("flex", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ]
}

fn vlm(device: &Device) -> (InternVl, InternVlConfig) {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vlm/layernorm_untied");
    let config = InternVlConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).expect("config"),
    )
    .expect("config parses");
    let mut weights = Weights::new();
    weights
        .add_safetensors(&std::fs::read(dir.join("model.safetensors")).expect("weights"))
        .expect("weights parse");
    (
        InternVl::load(&config, &mut weights, device).expect("vlm loads"),
        config,
    )
}

fn tiny_vae_config() -> AutoencoderTinyConfig {
    AutoencoderTinyConfig {
        encoder_block_out_channels: vec![8, 8],
        decoder_block_out_channels: vec![8, 8],
        num_encoder_blocks: vec![1, 1],
        num_decoder_blocks: vec![1, 1],
        latent_channels: 4,
        ..AutoencoderTinyConfig::taef1()
    }
}

/// The tiny pipeline: taps from `config` (default every third: [0, 3]).
fn pipeline(device: &Device, config: PipelineConfig, kl: bool) -> UniFusion {
    pipeline_with(device, config, kl, Krea2Config::tiny()).expect("pipeline")
}

/// [`pipeline`] with another transformer config (its taps and text width set to fit).
fn pipeline_with(
    device: &Device,
    config: PipelineConfig,
    kl: bool,
    transformer: Krea2Config,
) -> Result<UniFusion, PipelineError> {
    let (vlm, vlm_config) = vlm(device);
    let n_taps = config.taps_for(vlm.num_layers()).len();
    let gen_config = Krea2Config {
        text_hidden_dim: 48,
        num_text_layers: n_taps,
        ..transformer
    };
    let transformer =
        Krea2Transformer::load(&gen_config, &mut RandomInit::new(11, 0.2), device).expect("dit");
    let (vae, vae_config) = if kl {
        let c = AutoencoderKlConfig {
            block_out_channels: vec![8, 8],
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 4,
            ..AutoencoderKlConfig::flux()
        };
        let v = AutoencoderKl::load_decoder(&c, &mut RandomInit::new(12, 0.2), device).expect("kl");
        (Vae::Kl(v), VaeConfig::Kl(c))
    } else {
        let c = tiny_vae_config();
        let d = TinyDecoder::load(&c, &mut RandomInit::new(12, 0.2), "decoder", device)
            .expect("tiny vae");
        (Vae::Tiny(d), VaeConfig::Tiny(c))
    };
    UniFusion::new(vlm, &vlm_config, transformer, vae, &vae_config, config)
}

fn config() -> PipelineConfig {
    PipelineConfig {
        max_rewrite_tokens: 4,
        stop_tokens: vec![IM_END],
        max_tiles: 4,
        ..PipelineConfig::default()
    }
}

fn image(width: usize, height: usize, seed: u32) -> Image {
    let pixels = (0..width * height * 3)
        .map(|i| {
            ((i as u32)
                .wrapping_mul(2654435761u32)
                .wrapping_add(seed * 97)
                >> 24) as u8
        })
        .collect();
    Image {
        width,
        height,
        pixels,
    }
}

fn settings() -> Settings {
    Settings {
        width: 32,
        height: 24,
        steps: 3,
        guidance: 3.0,
        seed: 7,
        shift: Shift::Fixed(1.0),
        ..Settings::default()
    }
}

fn run(
    p: &UniFusion,
    task: Task,
    prompt: &str,
    images: &[Image],
    s: &Settings,
) -> Result<unifusion_model::pipeline::Output, PipelineError> {
    pollster::block_on(p.run(
        &ByteTokenizer,
        &Request {
            task,
            prompt,
            images,
        },
        s,
        |_| ControlFlow::Continue(()),
    ))
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32")
}

fn all_tasks() -> Vec<(Task, &'static str, Vec<Image>)> {
    vec![
        (Task::TextToImage, "a red cube on a table", vec![]),
        (Task::Edit, "make it blue", vec![image(40, 30, 1)]),
        (
            Task::MultiReference,
            "put the cube from the first image into the second",
            vec![image(40, 30, 1), image(20, 70, 2)],
        ),
        (Task::Variation, "", vec![image(30, 30, 3)]),
        (
            Task::ZeroShotEdit {
                image_percent: 15.0,
            },
            "make it blue",
            vec![image(40, 30, 1)],
        ),
    ]
}

#[test]
fn every_task_runs_end_to_end_at_the_requested_size() {
    for (name, device) in devices() {
        for kl in [false, true] {
            let p = pipeline(&device, config(), kl);
            for (task, prompt, images) in all_tasks() {
                for (w, h) in [(32, 24), (16, 40)] {
                    let s = Settings {
                        width: w,
                        height: h,
                        ..settings()
                    };
                    let out = run(&p, task, prompt, &images, &s)
                        .unwrap_or_else(|e| panic!("{task:?} on {name}: {e}"));
                    assert_eq!(
                        (out.image.width, out.image.height),
                        (w, h),
                        "{task:?} {name}"
                    );
                    assert_eq!(out.image.pixels.len(), w * h * 3);
                    let first = out.image.pixels[0];
                    assert!(
                        out.image.pixels.iter().any(|&v| v != first),
                        "{task:?} on {name}: constant image"
                    );
                    assert!(!out.rewrite_ids.is_empty() && out.rewrite_ids.len() <= 4);
                }
            }
        }
    }
}

#[test]
fn a_four_by_four_patch_dit_samples_at_its_own_size_multiple() {
    let device = Device::flex();
    let four = Krea2Config {
        patch_size: 4,
        in_channels: 4 * 16,
        ..Krea2Config::tiny()
    };
    for kl in [false, true] {
        let two = pipeline(&device, config(), kl);
        let p = pipeline_with(&device, config(), kl, four.clone()).expect("4×4 pipeline");
        assert_eq!(p.size_multiple(), 2 * two.size_multiple());
        let m = p.size_multiple();
        let s = Settings {
            width: 2 * m,
            height: 3 * m,
            ..settings()
        };
        let out = run(&p, Task::TextToImage, "a red circle", &[], &s).expect("runs");
        assert_eq!((out.image.width, out.image.height), (2 * m, 3 * m));
        let first = out.image.pixels[0];
        assert!(
            out.image.pixels.iter().any(|&v| v != first),
            "constant image"
        );
        // A size the 2×2 DiT takes but the 4×4 one cannot is refused with the multiple.
        let odd = Settings {
            width: 2 * m + two.size_multiple(),
            ..s.clone()
        };
        let err = run(&p, Task::TextToImage, "a red circle", &[], &odd).expect_err("refused");
        assert!(matches!(err, PipelineError::Input(_)), "{err}");
        assert!(err.to_string().contains(&m.to_string()), "{err}");
    }
    // 4×4 patches of 16 channels are 1 latent channel, not the VAE's 4.
    let wrong = Krea2Config {
        patch_size: 4,
        ..Krea2Config::tiny()
    };
    let err = pipeline_with(&device, config(), false, wrong).expect_err("channels differ");
    assert!(err.to_string().contains("16 × 1"), "{err}");
}

#[test]
fn same_seed_gives_the_same_image_on_flex_and_wgpu() {
    let mut outs = Vec::new();
    for (name, device) in devices() {
        let p = pipeline(&device, config(), false);
        let mut per = Vec::new();
        for (task, prompt, images) in all_tasks() {
            let out = run(&p, task, prompt, &images, &settings()).expect("runs");
            per.push((task, out));
        }
        // Same device, same seed: bit-identical; another seed: a different image.
        let (task, prompt, images) = &all_tasks()[1];
        let again = run(&p, *task, prompt, images, &settings()).expect("runs");
        assert_eq!(again.image, per[1].1.image, "{name}: rerun differs");
        let other = run(
            &p,
            *task,
            prompt,
            images,
            &Settings {
                seed: 8,
                ..settings()
            },
        )
        .expect("test value");
        assert!(
            max_diff(&other.image.pixels, &again.image.pixels) > 10,
            "{name}: seed ignored"
        );
        outs.push(per);
    }
    // The u8 images saturate a lot on random weights, so compare the f32 pieces too: the
    // VERIFI condition and the sampled latents of the edit request.
    let mut floats = Vec::new();
    for (_, device) in devices() {
        let p = pipeline(&device, config(), false);
        let (_, prompt, images) = &all_tasks()[1];
        let cond = pollster::block_on(p.condition(&ByteTokenizer, prompt, images, true))
            .expect("test value");
        let text = p
            .text_condition(cond.states.clone(), &Conditioning::Lap)
            .expect("test value");
        let s = Settings {
            guidance: 1.0,
            ..settings()
        };
        let latents = p
            .sample_latents(
                &ConditionSchedule::Full {
                    cond: text,
                    image_rows: 0,
                },
                None,
                &s,
                |_| ControlFlow::Continue(()),
            )
            .expect("test value");
        floats.push((to_vec(cond.states), to_vec(latents)));
    }
    assert_close("condition flex vs wgpu", &floats[0].0, &floats[1].0, 1e-4);
    assert_close("latents flex vs wgpu", &floats[0].1, &floats[1].1, 1e-3);
    for ((task, a), (_, b)) in outs[0].iter().zip(&outs[1]) {
        assert_eq!(a.rewrite_ids, b.rewrite_ids, "{task:?}: rewrite differs");
        let d = max_diff(&a.image.pixels, &b.image.pixels);
        println!("{task:?}: flex vs wgpu max |Δ| = {d}/255");
        assert!(d <= 1, "{task:?}: flex vs wgpu differ by {d}/255");
    }
}

/// Rows `rows` of each tap `[1, S, h]`, stacked over taps → `[1, R, n, h]` values.
fn rows(taps: &[(usize, Tensor<3>)], rows: &[usize]) -> Vec<f32> {
    let device = taps[0].1.device();
    let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
    let parts: Vec<Tensor<4>> = taps
        .iter()
        .map(|(_, t)| t.clone().select(1, idx.clone()).unsqueeze_dim::<4>(2))
        .collect();
    to_vec(Tensor::cat(parts, 2))
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    println!("{what}: max |Δ| = {d:e} (tolerance {tol:e})");
    assert!(d <= tol, "{what}: max |Δ| = {d} > {tol}");
}

#[test]
fn verifi_condition_equals_the_taps_of_one_forward_over_prompt_and_rewrite() {
    for (name, device) in devices() {
        let cfg = PipelineConfig {
            taps: vec![1, 2, 3],
            ..config()
        };
        let p = pipeline(&device, cfg, false);
        for (_, prompt, images) in all_tasks() {
            let cond = pollster::block_on(p.condition(&ByteTokenizer, prompt, &images, true))
                .expect("condition");
            let [_, l, n, h] = cond.states.dims();
            assert_eq!((n, h), (3, 48));
            // Only image tokens and rewritten tokens: the user's own tokens are dropped.
            assert_eq!(l, cond.image_tokens + cond.rewrite.len(), "{name}");
            assert!(!cond.rewrite.is_empty());
            // One full forward over prompt + rewrite. The rewrite's ids are embedded as text
            // (a random VLM may write `<IMG_CONTEXT>`; decoding feeds it back as a token).
            let prompt_len = cond.prompt.ids.len();
            let (pixels, _) = p.tile_images(&images).expect("tiles");
            let prompt_embeds = p
                .vlm
                .embed(std::slice::from_ref(&cond.prompt.ids), pixels, &device)
                .expect("embed");
            let rewrite_embeds = p.vlm.text.embed(&cond.rewrite, &device).unsqueeze::<3>();
            let embeds = Tensor::cat(vec![prompt_embeds, rewrite_embeds], 1);
            let full = p
                .vlm
                .text
                .forward(
                    embeds,
                    &mut KvCache::new(p.vlm.num_layers()),
                    None,
                    p.taps(),
                )
                .expect("forward");
            let mut want: Vec<usize> = cond.prompt.image_positions.clone();
            want.extend(prompt_len..prompt_len + cond.rewrite.len());
            assert_close(
                &format!("VERIFI condition ({name}, {prompt:?})"),
                &to_vec(cond.states.clone()),
                &rows(&full.taps, &want),
                1e-4,
            );
        }
    }
}

#[test]
fn verifi_off_conditions_on_the_users_own_tokens() {
    let device = Device::flex();
    let p = pipeline(&device, config(), false);
    let images = vec![image(40, 30, 1)];
    let cond = pollster::block_on(p.condition(&ByteTokenizer, "make it blue", &images, false))
        .expect("condition");
    assert!(cond.rewrite.is_empty());
    assert_eq!(cond.prompt.user_positions.len(), "make it blue".len());
    assert_eq!(cond.len(), cond.image_tokens + "make it blue".len());
    let user: Vec<u32> = cond
        .prompt
        .user_positions
        .iter()
        .map(|&i| cond.prompt.ids[i])
        .collect();
    assert_eq!(
        user,
        ByteTokenizer.encode("make it blue").expect("test value")
    );
    let (pixels, _) = p.tile_images(&images).expect("test value");
    let full = p
        .vlm
        .forward(
            VlmInput {
                ids: std::slice::from_ref(&cond.prompt.ids),
                pixel_values: pixels,
                attention_mask: None,
            },
            p.taps(),
        )
        .expect("test value");
    let mut want = cond.prompt.image_positions.clone();
    want.extend(&cond.prompt.user_positions);
    assert_close(
        "VERIFI off",
        &to_vec(cond.states.clone()),
        &rows(&full.taps, &want),
        1e-4,
    );
    // And the run with VERIFI off differs from the run with it.
    let on = run(&p, Task::Edit, "make it blue", &images, &settings()).expect("test value");
    let off = run(
        &p,
        Task::Edit,
        "make it blue",
        &images,
        &Settings {
            verifi: false,
            ..settings()
        },
    )
    .expect("test value");
    assert!(max_diff(&on.image.pixels, &off.image.pixels) > 0);
    assert!(off.rewrite_ids.is_empty());
}

#[test]
fn layer_dropout_and_last_layer_change_the_output_and_weights_are_readable() {
    let device = Device::flex();
    let cfg = PipelineConfig {
        taps: vec![1, 2, 3],
        ..config()
    };
    let p = pipeline(&device, cfg, false);
    let weights = pollster::block_on(p.pooling_weights()).expect("weights");
    let taps: Vec<usize> = weights.iter().map(|w| w.0).collect();
    assert_eq!(taps, vec![1, 2, 3]);
    let raw = to_vec(p.transformer.text_fusion.projector.weight.val());
    assert_eq!(weights.iter().map(|w| w.1).collect::<Vec<_>>(), raw);

    let base = run(&p, Task::TextToImage, "a red cube", &[], &settings()).expect("test value");
    for conditioning in [
        Conditioning::LapDropout(vec![0, 1]),
        Conditioning::LapDropout(vec![1, 2]),
        Conditioning::LastLayer,
    ] {
        let s = Settings {
            conditioning: conditioning.clone(),
            ..settings()
        };
        let out = run(&p, Task::TextToImage, "a red cube", &[], &s).expect("test value");
        let d = max_diff(&base.image.pixels, &out.image.pixels);
        assert!(d > 2, "{conditioning:?} changed the image by only {d}/255");
    }
    // Dropping nothing is LAP exactly.
    let same = run(
        &p,
        Task::TextToImage,
        "a red cube",
        &[],
        &Settings {
            conditioning: Conditioning::LapDropout(vec![]),
            ..settings()
        },
    )
    .expect("test value");
    assert_eq!(same.image, base.image);
    let err = run(
        &p,
        Task::TextToImage,
        "a red cube",
        &[],
        &Settings {
            conditioning: Conditioning::LapDropout(vec![3]),
            ..settings()
        },
    );
    assert!(matches!(err, Err(PipelineError::Input(_))));
}

#[test]
fn zero_shot_edit_switches_from_image_to_text_tokens_at_the_requested_step() {
    assert_eq!(zero_shot_switch_step(20, 15.0), 3);
    assert_eq!(zero_shot_switch_step(10, 0.0), 0);
    assert_eq!(zero_shot_switch_step(10, 100.0), 10);
    let device = Device::flex();
    let p = pipeline(&device, config(), false);
    let images = vec![image(40, 30, 1)];
    let mut outs = Vec::new();
    for (steps, k, switch) in [(7, 30.0, 2), (20, 15.0, 3), (4, 0.0, 0), (4, 100.0, 4)] {
        let mut phases = Vec::new();
        let s = Settings {
            steps,
            ..settings()
        };
        let out = pollster::block_on(p.run(
            &ByteTokenizer,
            &Request {
                task: Task::ZeroShotEdit { image_percent: k },
                prompt: "make it blue",
                images: &images,
            },
            &s,
            |progress| {
                phases.push(progress.phase);
                ControlFlow::Continue(())
            },
        ))
        .expect("test value");
        let want: Vec<Phase> = (0..steps)
            .map(|i| {
                if i < switch {
                    Phase::ImageTokens
                } else {
                    Phase::TextTokens
                }
            })
            .collect();
        assert_eq!(phases, want, "k = {k}%, {steps} steps");
        if steps == 4 {
            outs.push(out);
        }
    }
    // All-text and all-image conditioning give different images.
    assert!(max_diff(&outs[0].image.pixels, &outs[1].image.pixels) > 2);
    // A zero-shot run switching at step s equals sampling with the two conditions by hand.
    let cond = pollster::block_on(p.condition(&ByteTokenizer, "make it blue", &images, true))
        .expect("test value");
    let schedule = ConditionSchedule::Switch {
        image: p
            .text_condition(cond.image_part().expect("test value"), &Conditioning::Lap)
            .expect("test value"),
        text: p
            .text_condition(cond.text_part().expect("test value"), &Conditioning::Lap)
            .expect("test value"),
        switch: 0,
    };
    let s = Settings {
        steps: 4,
        guidance: 1.0,
        ..settings()
    };
    let a = p
        .sample_latents(&schedule, None, &s, |_| ControlFlow::Continue(()))
        .expect("test value");
    let b = p
        .sample_latents(
            &ConditionSchedule::Full {
                cond: p
                    .text_condition(cond.text_part().expect("test value"), &Conditioning::Lap)
                    .expect("test value"),
                image_rows: 0,
            },
            None,
            &s,
            |_| ControlFlow::Continue(()),
        )
        .expect("test value");
    assert_eq!(to_vec(a), to_vec(b));
}

#[test]
fn pipeline_dit_equals_krea2_transformer_on_the_same_tapped_states() {
    for (name, device) in devices() {
        let p = pipeline(&device, config(), false);
        let images = vec![image(40, 30, 1)];
        let cond = pollster::block_on(p.condition(&ByteTokenizer, "make it blue", &images, true))
            .expect("test value");
        // What the pipeline samples from this condition (no CFG: one forward per step) ...
        let s = Settings {
            guidance: 1.0,
            steps: 3,
            ..settings()
        };
        let text = p
            .text_condition(cond.states.clone(), &Conditioning::Lap)
            .expect("test value");
        let ours = p
            .sample_latents(
                &ConditionSchedule::Full {
                    cond: text,
                    image_rows: cond.image_tokens,
                },
                None,
                &s,
                |_| ControlFlow::Continue(()),
            )
            .expect("test value");
        // ... and what the generator alone makes when fed the same tapped states.
        let t = &p.transformer;
        let reference_text = t
            .encode_text(cond.states.clone(), None)
            .expect("test value");
        let reference = sampler::generate_latents(
            t,
            &reference_text,
            None,
            &sampler::GenerateOptions {
                steps: 3,
                shift: s.shift,
                guidance: 1.0,
                seed: s.seed,
                height: s.height / 2,
                width: s.width / 2,
            },
            |_, _| ControlFlow::Continue(()),
        )
        .expect("test value");
        assert_eq!(ours.dims(), reference.dims());
        assert_close(
            &format!("pipeline vs Krea2Transformer ({name})"),
            &to_vec(ours),
            &to_vec(reference),
            1e-6,
        );
    }
}

#[test]
fn grid_image_positions_move_only_the_image_tokens() {
    let device = Device::flex();
    let origin = pipeline(&device, config(), false);
    let grid = pipeline(
        &device,
        PipelineConfig {
            image_positions: ImagePositions::Grid,
            ..config()
        },
        false,
    );
    let s = settings();
    // Text to image has no image tokens: the layouts agree bit for bit.
    let a = run(&origin, Task::TextToImage, "a red cube", &[], &s).expect("test value");
    let b = run(&grid, Task::TextToImage, "a red cube", &[], &s).expect("test value");
    assert_eq!(a.image.pixels, b.image.pixels);
    // An edit's image tokens move onto the latent grid: same rewrite, another image.
    let images = vec![image(40, 30, 1)];
    let a = run(&origin, Task::Edit, "make it blue", &images, &s).expect("test value");
    let b = run(&grid, Task::Edit, "make it blue", &images, &s).expect("test value");
    assert_eq!(a.rewrite_ids, b.rewrite_ids);
    assert!(max_diff(&a.image.pixels, &b.image.pixels) > 2);
}

#[test]
fn centred_text_positions_change_the_image_not_the_rewrite() {
    let device = Device::flex();
    let origin = pipeline(&device, config(), false);
    let centre = pipeline(
        &device,
        PipelineConfig {
            text_positions: TextPositions::Center,
            ..config()
        },
        false,
    );
    let s = settings();
    let a = run(&origin, Task::TextToImage, "a red cube", &[], &s).expect("test value");
    let b = run(&centre, Task::TextToImage, "a red cube", &[], &s).expect("test value");
    assert_eq!(a.rewrite_ids, b.rewrite_ids);
    assert!(max_diff(&a.image.pixels, &b.image.pixels) > 2);
    let read: PipelineConfig =
        serde_json::from_str(r#"{"text_positions": "center"}"#).expect("parses");
    assert_eq!(read.text_positions, TextPositions::Center);
    assert!(
        serde_json::to_string(&read)
            .expect("writes")
            .contains(r#""text_positions":"center""#)
    );
    assert!(
        !serde_json::to_string(&config())
            .expect("writes")
            .contains("text_positions")
    );
    let bad = serde_json::from_str::<PipelineConfig>(r#"{"text_positions": "middle"}"#);
    assert!(
        bad.expect_err("unknown layout")
            .to_string()
            .contains("middle")
    );
}

#[test]
fn image_positions_read_from_config_json_default_to_the_origin() {
    let old: PipelineConfig = serde_json::from_str(r#"{"max_tiles": 1}"#).expect("parses");
    assert_eq!(old.image_positions, ImagePositions::Origin);
    let grid: PipelineConfig =
        serde_json::from_str(r#"{"image_positions": "grid"}"#).expect("parses");
    assert_eq!(grid.image_positions, ImagePositions::Grid);
    // Written back only when it is not the default, so older readers keep reading it.
    assert!(
        !serde_json::to_string(&old)
            .expect("writes")
            .contains("image_positions")
    );
    assert!(
        serde_json::to_string(&grid)
            .expect("writes")
            .contains(r#""image_positions":"grid""#)
    );
    let bad = serde_json::from_str::<PipelineConfig>(r#"{"image_positions": "diagonal"}"#);
    assert!(
        bad.expect_err("unknown layout")
            .to_string()
            .contains("diagonal")
    );
}

#[test]
fn bad_requests_fail_with_a_message_and_cancel_stops() {
    let device = Device::flex();
    let p = pipeline(&device, config(), false);
    let img = image(40, 30, 1);
    let zero = Image {
        width: 0,
        height: 10,
        pixels: vec![],
    };
    let short = Image {
        width: 4,
        height: 4,
        pixels: vec![0; 10],
    };
    let cases: Vec<(Task, &str, Vec<Image>, Settings)> = vec![
        (Task::TextToImage, "   ", vec![], settings()),
        (Task::TextToImage, "x", vec![img.clone()], settings()),
        (Task::Edit, "x", vec![], settings()),
        (Task::MultiReference, "x", vec![img.clone()], settings()),
        (Task::Variation, "x", vec![img.clone()], settings()),
        (Task::Edit, "x", vec![zero], settings()),
        (Task::Edit, "x", vec![short], settings()),
        (
            Task::ZeroShotEdit {
                image_percent: 150.0,
            },
            "x",
            vec![img.clone()],
            settings(),
        ),
        (
            Task::TextToImage,
            "x",
            vec![],
            Settings {
                width: 30,
                ..settings()
            },
        ),
        (
            Task::TextToImage,
            "x",
            vec![],
            Settings {
                width: 0,
                ..settings()
            },
        ),
        (
            Task::TextToImage,
            "x",
            vec![],
            Settings {
                steps: 0,
                ..settings()
            },
        ),
        (Task::TextToImage, "x <IMG_CONTEXT>", vec![], settings()),
    ];
    for (task, prompt, images, s) in cases {
        match run(&p, task, prompt, &images, &s) {
            Err(PipelineError::Input(msg)) => assert!(!msg.is_empty()),
            other => panic!(
                "{task:?} {prompt:?}: expected an input error, got {:?}",
                other.map(|o| o.rewrite)
            ),
        }
    }
    let mut seen = 0;
    let r = pollster::block_on(p.run(
        &ByteTokenizer,
        &Request {
            task: Task::TextToImage,
            prompt: "x",
            images: &[],
        },
        &Settings {
            steps: 5,
            ..settings()
        },
        |progress| {
            seen = progress.done;
            if progress.done == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    ));
    assert!(matches!(
        r,
        Err(PipelineError::Cancelled { done: 2, total: 5 })
    ));
    assert_eq!(seen, 2);
}

/// A watched run: steps synced to the device, a preview every 2 steps at the output size,
/// the final image exactly what `run` gives; a preview can cancel.
#[test]
fn watched_run_syncs_steps_previews_and_equals_run() {
    for (name, device) in devices() {
        let p = pipeline(&device, config(), false);
        let s = Settings {
            steps: 5,
            ..settings()
        };
        let request = Request {
            task: Task::TextToImage,
            prompt: "a red cube",
            images: &[],
        };
        let watch = Watch {
            sync_steps: true,
            preview_every: 2,
        };
        let mut events = Vec::new();
        let out = pollster::block_on(p.run_watched(&ByteTokenizer, &request, &s, watch, |e| {
            match e {
                Event::Step(progress) => events.push(format!("step {}", progress.done)),
                Event::Preview { done, image } => {
                    assert_eq!((image.width, image.height), (s.width, s.height));
                    assert!(
                        image.pixels.iter().any(|&v| v != image.pixels[0]),
                        "constant"
                    );
                    events.push(format!("preview {done}"));
                }
            }
            ControlFlow::Continue(())
        }))
        .expect("watched run");
        assert_eq!(
            events,
            [
                "step 1",
                "step 2",
                "preview 2",
                "step 3",
                "step 4",
                "preview 4",
                "step 5"
            ],
            "{name}"
        );
        let plain = run(&p, Task::TextToImage, "a red cube", &[], &s).expect("run");
        assert_eq!(out.image, plain.image, "{name}: watching changes nothing");

        let cancelled =
            pollster::block_on(
                p.run_watched(&ByteTokenizer, &request, &s, watch, |e| match e {
                    Event::Preview { .. } => ControlFlow::Break(()),
                    Event::Step(_) => ControlFlow::Continue(()),
                }),
            );
        assert!(
            matches!(
                cancelled,
                Err(PipelineError::Cancelled { done: 2, total: 5 })
            ),
            "{name}: {cancelled:?}"
        );
    }
}

/// `Settings::guidance_interval`: a step is guided only when its starting σ lies in
/// `(low, high]`. An interval no step starts in samples exactly as guidance 1; one holding
/// only the first step differs from both; bad intervals are refused; a model's
/// `config.json` defaults carry it (absent: every step).
#[test]
fn the_guidance_interval_guides_only_the_steps_inside_it() {
    let device = Device::flex();
    let p = pipeline(&device, config(), false);
    // Three steps at μ = 1 start at σ = 1, 0.845 and 0.576.
    let image = |s: &Settings| {
        run(&p, Task::TextToImage, "a red circle", &[], s)
            .expect("runs")
            .image
            .pixels
    };
    let every = image(&settings());
    let unguided = image(&Settings {
        guidance: 1.0,
        ..settings()
    });
    let none_inside = image(&Settings {
        guidance_interval: [0.0, 0.5],
        ..settings()
    });
    let first_only = image(&Settings {
        guidance_interval: [0.9, 1.0],
        ..settings()
    });
    assert_ne!(every, unguided, "guidance changes the image");
    assert_eq!(none_inside, unguided, "no step guided = guidance 1");
    assert_ne!(first_only, unguided);
    assert_ne!(first_only, every);
    assert_eq!(
        image(&Settings {
            guidance_interval: [0.0, 1.0],
            ..settings()
        }),
        every
    );
    for bad in [
        [0.5, 0.5],
        [-0.1, 1.0],
        [0.0, f32::NAN],
        [0.2, f32::INFINITY],
    ] {
        let s = Settings {
            guidance_interval: bad,
            ..settings()
        };
        let err = run(&p, Task::TextToImage, "a red circle", &[], &s).expect_err("refused");
        assert!(matches!(err, PipelineError::Input(_)), "{bad:?}: {err}");
    }

    let with = |interval: &str| -> PipelineConfig {
        serde_json::from_str(&format!(
            r#"{{"defaults": {{"width": 64, "height": 64, "steps": 20, "guidance": 3.0{interval}}}}}"#
        ))
        .expect("parses")
    };
    let own = with(r#", "guidance_interval": [0.2, 0.85]"#).default_settings();
    assert_eq!(own.guidance_interval, [0.2, 0.85]);
    let older = with("").default_settings();
    assert_eq!(older.guidance_interval, [0.0, 1.0]);
    assert_eq!(older.guidance, 3.0);
}
