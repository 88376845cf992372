//! The generator against PyPI diffusers 0.42.1 (`tests/fixtures/generator`, made by
//! `scripts/fixtures/make_generator_fixtures.py`): `Krea2Transformer2DModel`, `AutoencoderKL`,
//! `AutoencoderTiny` and `FlowMatchEulerDiscreteScheduler` on tiny random configs with every
//! parameter perturbed. Outputs within 1e-4 abs (f32) on Flex and on wgpu.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Bool, Device, DeviceKind, Tensor, TensorData};
use unifusion_model::generator::config::{AutoencoderKlConfig, AutoencoderTinyConfig, Krea2Config};
use unifusion_model::generator::params::read_safetensors;
use unifusion_model::generator::rope::RopeTable;
use unifusion_model::generator::sampler::{FlowMatchEuler, Scheduler, Shift};
use unifusion_model::generator::tiny_vae::AutoencoderTiny;
use unifusion_model::generator::vae::AutoencoderKl;
use unifusion_model::generator::{
    Krea2Transformer, WeightMap, krea2_original_to_diffusers, patchify, unpatchify,
};

const TOL: f32 = 1e-4;

fn dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/generator")
        .join(case)
}

fn devices() -> Vec<(&'static str, Device)> {
    vec![
        ("flex", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ]
}

fn tensors(case: &str, file: &str) -> HashMap<String, TensorData> {
    let bytes = std::fs::read(dir(case).join(file)).expect("fixture file");
    read_safetensors(&bytes)
        .expect("fixture parses")
        .into_iter()
        .collect()
}

fn weights(case: &str, file: &str) -> WeightMap {
    WeightMap::from_safetensors(&std::fs::read(dir(case).join(file)).expect("weights"))
        .expect("weights parse")
}

fn config<T: serde::de::DeserializeOwned>(case: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(dir(case).join("config.json")).expect("config"))
        .expect("config parses")
}

fn tensor<const D: usize>(
    io: &HashMap<String, TensorData>,
    name: &str,
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(
        io.get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"))
            .clone(),
        device,
    )
}

fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let data = t.into_data();
    (
        data.shape().as_slice().to_vec(),
        data.convert::<f32>().try_into_vec::<f32>().expect("f32"),
    )
}

/// Max |a − b| after checking shapes; panics with `what` when over `TOL` or not finite.
fn assert_close<const D: usize>(what: &str, got: Tensor<D>, want: &TensorData) {
    let (shape, got) = values(got);
    assert_eq!(shape.as_slice(), want.shape().as_slice(), "{what}: shape");
    let want = want.clone().try_into_vec::<f32>().expect("f32");
    let mut max = 0f32;
    for (a, b) in got.iter().zip(&want) {
        assert!(a.is_finite(), "{what}: non-finite output {a}");
        max = max.max((a - b).abs());
    }
    assert!(max <= TOL, "{what}: max abs diff {max} > {TOL}");
    eprintln!("{what}: max abs diff {max:.2e}");
}

fn mask(io: &HashMap<String, TensorData>, device: &Device) -> Tensor<2, Bool> {
    tensor::<2>(io, "encoder_attention_mask", device).greater_elem(0.5)
}

fn rope(io: &HashMap<String, TensorData>, cfg: &Krea2Config, device: &Device) -> RopeTable {
    let ids = io["position_ids"]
        .clone()
        .try_into_vec::<f32>()
        .expect("f32");
    let rows: Vec<[f32; 3]> = ids.chunks_exact(3).map(|r| [r[0], r[1], r[2]]).collect();
    RopeTable::new(&rows, cfg.axes_dims_rope, cfg.rope_theta, device)
}

#[test]
fn krea2_transformer_matches_diffusers() {
    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    let out = tensors("krea2", "outputs.safetensors");
    for (name, device) in devices() {
        let mut w = weights("krea2", "weights.safetensors");
        let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
        w.finish().expect("every weight used");
        let rope = rope(&io, &cfg, &device);
        let run = |m: Option<Tensor<2, Bool>>| {
            model
                .forward(
                    tensor(&io, "hidden_states", &device),
                    tensor(&io, "encoder_hidden_states", &device),
                    tensor(&io, "timestep", &device),
                    &rope,
                    m,
                )
                .expect("forward")
        };
        assert_close(
            &format!("krea2 masked ({name})"),
            run(Some(mask(&io, &device))),
            &out["sample"],
        );
        assert_close(
            &format!("krea2 no mask ({name})"),
            run(None),
            &out["sample_nomask"],
        );
    }
}

#[test]
fn krea2_original_names_load_the_same_model() {
    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    let out = tensors("krea2", "outputs.safetensors");
    let device = Device::flex();
    let mut w = krea2_original_to_diffusers(weights("krea2", "weights_original.safetensors"));
    let model =
        Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads from original names");
    w.finish().expect("every weight used");
    let got = model
        .forward(
            tensor(&io, "hidden_states", &device),
            tensor(&io, "encoder_hidden_states", &device),
            tensor(&io, "timestep", &device),
            &rope(&io, &cfg, &device),
            Some(mask(&io, &device)),
        )
        .expect("forward");
    assert_close("krea2 original names", got, &out["sample"]);
}

#[test]
fn fully_padded_prompt_gives_no_nan() {
    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    for (name, device) in devices() {
        let mut w = weights("krea2", "weights.safetensors");
        let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
        // Sample 0 keeps its real tokens; sample 1 has none at all.
        let m = Tensor::<2>::from_data(
            TensorData::new(
                vec![1.0f32, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [2, 5],
            ),
            &device,
        )
        .greater_elem(0.5);
        let got = model
            .forward(
                tensor(&io, "hidden_states", &device),
                tensor(&io, "encoder_hidden_states", &device),
                tensor(&io, "timestep", &device),
                &rope(&io, &cfg, &device),
                Some(m),
            )
            .expect("forward");
        let (_, v) = values(got);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "NaN/inf with a fully padded prompt ({name})"
        );
    }
}

/// `abs_pos_embed` (our extension): off in diffusers' config (the parity test above runs
/// with it off), written to JSON only when on, refused for a width not divisible by 4, and on
/// it changes the output of the same weights.
#[test]
fn the_absolute_position_embedding_is_an_opt_in_extension() {
    let cfg: Krea2Config = config("krea2");
    assert!(!cfg.abs_pos_embed);
    let json = serde_json::to_value(&cfg).expect("json");
    assert!(json.get("abs_pos_embed").is_none(), "{json}");
    let on = Krea2Config {
        abs_pos_embed: true,
        ..cfg.clone()
    };
    let back: Krea2Config =
        serde_json::from_value(serde_json::to_value(&on).expect("json")).expect("reads");
    assert_eq!(back, on);
    let odd = Krea2Config {
        attention_head_dim: 6,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        axes_dims_rope: [2, 2, 2],
        ..on.clone()
    };
    assert!(odd.validate().is_err());

    let io = tensors("krea2", "inputs.safetensors");
    let device = Device::flex();
    let run = |c: &Krea2Config| {
        let mut w = weights("krea2", "weights.safetensors");
        let model = Krea2Transformer::load(c, &mut w, &device).expect("model loads");
        model
            .forward(
                tensor(&io, "hidden_states", &device),
                tensor(&io, "encoder_hidden_states", &device),
                tensor(&io, "timestep", &device),
                &rope(&io, c, &device),
                Some(mask(&io, &device)),
            )
            .expect("forward")
    };
    let with = run(&on);
    assert!(values(with.clone()).1.iter().all(|x| x.is_finite()));
    let moved = max_difference(run(&cfg), with);
    assert!(
        moved > 1e-3,
        "the embedding moved the output by {moved} only"
    );
}

#[test]
fn padding_tokens_do_not_change_the_output() {
    // Masked text tokens must not influence the image tokens: perturbing them changes nothing.
    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    let device = Device::flex();
    let mut w = weights("krea2", "weights.safetensors");
    let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
    let ehs: Tensor<4> = tensor(&io, "encoder_hidden_states", &device);
    let bump = Tensor::<4>::ones([1, 2, 3, 24], &device) * 5.0;
    let changed = ehs.clone().slice_assign([1..2, 3..5, 0..3, 0..24], bump);
    let run = |e: Tensor<4>| {
        model
            .forward(
                tensor(&io, "hidden_states", &device),
                e,
                tensor(&io, "timestep", &device),
                &rope(&io, &cfg, &device),
                Some(mask(&io, &device)),
            )
            .expect("forward")
    };
    let (_, a) = values(run(ehs));
    let (_, b) = values(run(changed));
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "padding changed the output by {max}");
}

#[test]
fn patchify_round_trips_in_krea2_order() {
    let device = Device::flex();
    let xv: Vec<f32> = (0..2 * 3 * 4 * 6).map(|i| i as f32).collect();
    let x = Tensor::<4>::from_data(TensorData::new(xv.clone(), [2, 3, 4, 6]), &device);
    let p = patchify(x.clone(), 2).expect("patchify");
    assert_eq!(p.dims(), [2, 6, 12]);
    // Token (row 0, col 1) = index 1; channel (c=1, ph=1, pw=0) = index 6; value x[0, 1, 1, 2].
    let (_, pv) = values(p.clone());
    assert_eq!(pv[12 + 6], xv[(4 + 1) * 6 + 2]);
    let back = unpatchify(p, 2, 3, 2).expect("unpatchify");
    let (_, bv) = values(back);
    assert_eq!(bv, xv);
    // A patch of the whole 4×6 latent is one token per image: channels (c, ph, pw) in order.
    let whole = patchify(
        Tensor::<4>::from_data(TensorData::new(xv.clone(), [2, 3, 4, 4 + 2]), &device)
            .narrow(3, 0, 4),
        4,
    )
    .expect("patchify 4");
    assert_eq!(whole.dims(), [2, 1, 48]);
    let (_, wv) = values(whole.clone());
    // Channel (c=2, ph=3, pw=1) of image 1 is x[1, 2, 3, 1].
    assert_eq!(wv[48 + 2 * 16 + 3 * 4 + 1], xv[((3 + 2) * 4 + 3) * 6 + 1]);
    let back = unpatchify(whole, 1, 1, 4).expect("unpatchify 4");
    let (_, bv) = values(back);
    let cropped: Vec<f32> = xv
        .chunks(6)
        .flat_map(|row| row[..4].iter().copied())
        .collect();
    assert_eq!(bv, cropped);
    // Sizes the patch does not divide are refused, not truncated.
    assert!(patchify(x.clone(), 4).is_err());
    assert!(patchify(x, 0).is_err());
    let tokens = Tensor::<3>::zeros([1, 4, 12], &device);
    assert!(unpatchify(tokens.clone(), 2, 2, 4).is_err());
    assert!(unpatchify(tokens, 2, 2, 2).is_ok());
}

#[test]
fn vae_configs_that_downscale_past_the_limit_are_refused_not_overflowed() {
    let tiny: AutoencoderTinyConfig = config("tiny_vae");
    tiny.validate().expect("fixture config");
    let huge = AutoencoderTinyConfig {
        upsampling_scaling_factor: 1 << 40,
        ..tiny.clone()
    };
    assert_eq!(huge.downscale(), usize::MAX);
    let e = huge.validate().expect_err("refused").to_string();
    assert!(e.contains("at most 64×"), "{e}");
    let kl: AutoencoderKlConfig = config("vae");
    kl.validate().expect("fixture config");
    let deep = AutoencoderKlConfig {
        block_out_channels: vec![4; 80],
        down_block_types: vec!["DownEncoderBlock2D".into(); 80],
        up_block_types: vec!["UpDecoderBlock2D".into(); 80],
        ..kl
    };
    assert_eq!(deep.downscale(), usize::MAX);
    let e = deep.validate().expect_err("refused").to_string();
    assert!(e.contains("at most 64×"), "{e}");
}

#[test]
fn patch_size_is_serialised_only_when_not_two_and_checked() {
    let tiny = Krea2Config::tiny();
    let json = serde_json::to_value(&tiny).expect("json");
    assert!(json.get("patch_size").is_none(), "{json}");
    let four = Krea2Config {
        patch_size: 4,
        in_channels: 64,
        ..tiny.clone()
    };
    four.validate().expect("64 channels = 4 × 4² is valid");
    assert_eq!(four.latent_channels(), 4);
    let json = serde_json::to_value(&four).expect("json");
    assert_eq!(json["patch_size"], 4);
    let back: Krea2Config = serde_json::from_value(json).expect("reads");
    assert_eq!(back, four);
    for (patch_size, in_channels) in [(4, 24), (0, 16), (17, 17 * 17)] {
        let bad = Krea2Config {
            patch_size,
            in_channels,
            ..tiny.clone()
        };
        assert!(bad.validate().is_err(), "{patch_size} / {in_channels}");
    }
}

#[test]
fn vae_decoder_and_encoder_match_diffusers() {
    let cfg: AutoencoderKlConfig = config("vae");
    let io = tensors("vae", "inputs.safetensors");
    let out = tensors("vae", "outputs.safetensors");
    for (name, device) in devices() {
        let mut w = weights("vae", "weights.safetensors");
        let vae = AutoencoderKl::load(&cfg, &mut w, &device).expect("vae loads");
        w.finish().expect("every weight used");
        let sample = vae.decode(tensor(&io, "latents", &device)).expect("decode");
        assert_close(&format!("vae decode ({name})"), sample, &out["sample"]);
        let (mean, _) = vae.encode(tensor(&io, "images", &device)).expect("encode");
        assert_close(
            &format!("vae encode mean ({name})"),
            mean,
            &out["latent_mean"],
        );
    }
}

#[test]
fn tiny_vae_matches_diffusers() {
    let cfg: AutoencoderTinyConfig = config("tiny_vae");
    let io = tensors("tiny_vae", "inputs.safetensors");
    let out = tensors("tiny_vae", "outputs.safetensors");
    for (name, device) in devices() {
        let mut w = weights("tiny_vae", "weights.safetensors");
        let vae = AutoencoderTiny::load(&cfg, &mut w, &device).expect("tiny vae loads");
        w.finish().expect("every weight used");
        let sample = vae
            .decoder
            .decode(tensor(&io, "latents", &device))
            .expect("decode");
        assert_close(&format!("tiny decode ({name})"), sample, &out["sample"]);
        let latents = vae
            .encoder
            .encode(tensor(&io, "images", &device))
            .expect("encode");
        assert_close(&format!("tiny encode ({name})"), latents, &out["latents"]);
    }
}

/// Max |a − b| of two equally shaped tensors.
fn max_difference<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let (sa, a) = values(a);
    let (sb, b) = values(b);
    assert_eq!(sa, sb);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A tiny VAE with `scaling_factor` / `shift_factor`, and with per-channel `latents_mean` /
/// `latents_std`, decodes pipeline latents to what the plain decoder makes of the raw ones
/// (diffusers: `z / s + m` before `decode`; Wan / QwenImage: `z · std + mean`).
#[test]
fn tiny_vae_unscales_pipeline_latents_by_its_config() {
    let base: AutoencoderTinyConfig = config("tiny_vae");
    let io = tensors("tiny_vae", "inputs.safetensors");
    let device = Device::flex();
    let load = |cfg: &AutoencoderTinyConfig| {
        AutoencoderTiny::load(
            cfg,
            &mut weights("tiny_vae", "weights.safetensors"),
            &device,
        )
        .expect("tiny vae loads")
        .decoder
    };
    let plain = load(&base);
    let raw = tensor::<4>(&io, "latents", &device);
    assert_eq!(
        values(plain.unscale_latents(raw.clone())),
        values(raw.clone()),
        "1 and 0 leave latents alone"
    );
    let want = plain.decode(raw.clone()).expect("decode");

    let mut cfg = base.clone();
    (cfg.scaling_factor, cfg.shift_factor) = (2.5, -0.4);
    let scaled = load(&cfg);
    let z = (raw.clone() + 0.4) * 2.5;
    let got = scaled.decode(scaled.unscale_latents(z)).expect("decode");
    let worst = max_difference(got, want.clone());
    assert!(worst < 1e-4, "scaled decode differs by {worst}");

    let c = base.latent_channels;
    let mean: Vec<f64> = (0..c).map(|i| i as f64 * 0.3 - 0.5).collect();
    let std: Vec<f64> = (0..c).map(|i| 0.5 + i as f64 * 0.25).collect();
    let mut cfg = base.clone();
    (cfg.latents_mean, cfg.latents_std) = (Some(mean.clone()), Some(std.clone()));
    cfg.validate().expect("per-channel statistics are valid");
    let normalized = load(&cfg);
    let column = |v: &[f64]| {
        let values: Vec<f32> = v.iter().map(|&a| a as f32).collect();
        Tensor::<1>::from_data(TensorData::new(values, [c]), &device).reshape([1, c, 1, 1])
    };
    let z = (raw.clone() - column(&mean)) / column(&std);
    let unscaled = normalized.unscale_latents(z.clone());
    let worst = max_difference(unscaled, raw.clone());
    assert!(worst < 1e-5, "per-channel unscale differs by {worst}");
    let got = normalized
        .decode(normalized.unscale_latents(z.clone()))
        .expect("decode");
    assert!(max_difference(got, want.clone()) < 1e-4);
    // The statistics are not ignored: the plain decoder makes something else of `z`.
    assert!(max_difference(plain.decode(z).expect("decode"), want) > 1e-2);

    for (s, m) in [(0.0, 0.0), (f64::NAN, 0.0), (1.0, f64::INFINITY)] {
        let mut bad = base.clone();
        (bad.scaling_factor, bad.shift_factor) = (s, m);
        assert!(bad.validate().is_err(), "scaling {s}, shift {m} accepted");
    }
    let mut short = std.clone();
    short.pop();
    let mut zero = std.clone();
    zero[0] = 0.0;
    for (m, s) in [
        (Some(mean.clone()), None),
        (None, Some(std.clone())),
        (Some(mean.clone()), Some(short)),
        (Some(mean.clone()), Some(zero)),
        (Some(vec![f64::NAN; c]), Some(std.clone())),
    ] {
        let mut bad = base.clone();
        (bad.latents_mean, bad.latents_std) = (m, s);
        assert!(
            bad.validate().is_err(),
            "{:?} / {:?} accepted",
            bad.latents_mean,
            bad.latents_std
        );
        assert!(
            AutoencoderTiny::load(
                &bad,
                &mut weights("tiny_vae", "weights.safetensors"),
                &device
            )
            .is_err(),
            "a bad config loads"
        );
    }
}

#[test]
fn sampler_schedule_matches_flow_match_euler() {
    let text = std::fs::read_to_string(dir("").join("scheduler.json")).expect("scheduler.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number") as f32)
            .collect()
    };
    for case in json["cases"].as_array().expect("cases") {
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let mu = case["mu"].as_f64().expect("mu");
        let s = FlowMatchEuler::new(steps, mu);
        let want_sigmas = floats(&case["sigmas"]);
        let want_t = floats(&case["timesteps"]);
        assert_eq!(s.sigmas().len(), want_sigmas.len(), "steps {steps}");
        for (a, b) in s.sigmas().iter().zip(&want_sigmas) {
            assert!(
                (a - b).abs() <= 1e-6,
                "steps {steps} mu {mu}: sigma {a} vs {b}"
            );
        }
        for (a, b) in s.timesteps_1000().iter().zip(&want_t) {
            assert!(
                (a - b).abs() <= 1e-4,
                "steps {steps} mu {mu}: timestep {a} vs {b}"
            );
        }
        let device = Device::flex();
        let x = Tensor::<1>::from_data(TensorData::new(floats(&case["step0_x"]), [6]), &device);
        let v = Tensor::<1>::from_data(TensorData::new(floats(&case["step0_v"]), [6]), &device);
        let (_, got) = values(s.step(0, x, v));
        for (a, b) in got.iter().zip(floats(&case["step0_out"])) {
            assert!(
                (a - b).abs() <= 1e-6,
                "steps {steps}: Euler step {a} vs {b}"
            );
        }
    }
    for (n, mu) in json["mu_for_seq_len"].as_object().expect("mus") {
        let n: usize = n.parse().expect("count");
        let want = mu.as_f64().expect("mu");
        assert!((Shift::KREA2.mu(n) - want).abs() < 1e-12, "mu({n})");
    }
}

#[test]
fn sampling_loop_with_cfg_matches_diffusers() {
    use std::ops::ControlFlow;
    use unifusion_model::generator::sampler::{Guided, sample};

    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    let out = tensors("krea2", "outputs.safetensors");
    for (name, device) in devices() {
        let mut w = weights("krea2", "weights.safetensors");
        let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
        let cond = model
            .encode_text(
                tensor(&io, "encoder_hidden_states", &device),
                Some(mask(&io, &device)),
            )
            .expect("cond");
        let null_mask = tensor::<2>(&io, "null_encoder_attention_mask", &device).greater_elem(0.5);
        let null = model
            .encode_text(
                tensor(&io, "null_encoder_hidden_states", &device),
                Some(null_mask),
            )
            .expect("null");
        let rope = rope(&io, &cfg, &device);
        let denoiser = Guided {
            model: &model,
            cond: &cond,
            null: Some(&null),
            guidance: 2.5,
            rope: &rope,
        };
        let mut seen = Vec::new();
        let x = sample(
            &FlowMatchEuler::new(3, 0.7),
            &denoiser,
            tensor(&io, "hidden_states", &device),
            |info, _| {
                seen.push(info.done);
                ControlFlow::Continue(())
            },
        )
        .expect("sampling");
        assert_eq!(seen, [1, 2, 3]);
        assert_close(
            &format!("3 Euler steps with CFG ({name})"),
            x,
            &out["sampled_3_steps_cfg"],
        );
    }
}

#[test]
fn seeded_noise_is_identical_on_every_backend() {
    use unifusion_model::generator::sampler::seeded_noise;
    let runs: Vec<Vec<f32>> = devices()
        .into_iter()
        .map(|(_, device)| values(seeded_noise::<4>(42, [1, 16, 6, 10], &device)).1)
        .collect();
    assert_eq!(runs[0], runs[1], "Flex and wgpu noise differ");
    assert_ne!(
        runs[0],
        values(seeded_noise::<4>(43, [1, 16, 6, 10], &Device::flex())).1
    );
}

#[test]
fn named_configs_validate_and_random_init_builds_a_working_model() {
    use unifusion_model::generator::{RandomInit, position_ids};
    for cfg in [
        Krea2Config::krea2(),
        Krea2Config::unifusion_8b(),
        Krea2Config::tiny(),
    ] {
        cfg.validate().expect("named config is valid");
    }
    let mut bad = Krea2Config::tiny();
    bad.axes_dims_rope = [2, 2, 2];
    assert!(bad.validate().is_err());
    AutoencoderKlConfig::flux()
        .validate()
        .expect("flux vae config");
    AutoencoderTinyConfig::taef1()
        .validate()
        .expect("taef1 config");

    let device = Device::flex();
    let cfg = Krea2Config::tiny();
    let model =
        Krea2Transformer::load(&cfg, &mut RandomInit::new(0, 0.05), &device).expect("random model");
    let rope = RopeTable::new(
        &position_ids(4, 2, 3),
        cfg.axes_dims_rope,
        cfg.rope_theta,
        &device,
    );
    let v = model
        .forward(
            Tensor::zeros([1, 6, cfg.in_channels], &device),
            Tensor::ones([1, 4, cfg.num_text_layers, cfg.text_hidden_dim], &device),
            Tensor::from_data(TensorData::new(vec![0.3f32], [1]), &device),
            &rope,
            None,
        )
        .expect("forward");
    assert_eq!(v.dims(), [1, 6, cfg.in_channels]);
    // Wrong inputs fail with the tensor's name instead of panicking.
    let err = model
        .forward(
            Tensor::zeros([1, 6, cfg.in_channels + 1], &device),
            Tensor::ones([1, 4, cfg.num_text_layers, cfg.text_hidden_dim], &device),
            Tensor::from_data(TensorData::new(vec![0.3f32], [1]), &device),
            &rope,
            None,
        )
        .expect_err("bad width");
    assert!(err.to_string().contains("hidden_states"), "{err}");
}

#[test]
fn seeded_generation_is_reproducible_across_backends() {
    use std::ops::ControlFlow;
    use unifusion_model::generator::sampler::{GenerateOptions, Shift, generate_latents};

    let cfg: Krea2Config = config("krea2");
    let io = tensors("krea2", "inputs.safetensors");
    let options = GenerateOptions {
        steps: 4,
        shift: Shift::KREA2,
        guidance: 3.0,
        seed: 1234,
        height: 6,
        width: 4,
    };
    let mut runs = Vec::new();
    for (_, device) in devices() {
        let mut w = weights("krea2", "weights.safetensors");
        let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
        let cond = model
            .encode_text(
                tensor(&io, "encoder_hidden_states", &device),
                Some(mask(&io, &device)),
            )
            .expect("cond");
        let null_mask = tensor::<2>(&io, "null_encoder_attention_mask", &device).greater_elem(0.5);
        let null = model
            .encode_text(
                tensor(&io, "null_encoder_hidden_states", &device),
                Some(null_mask),
            )
            .expect("null");
        let latents = generate_latents(&model, &cond, Some(&null), &options, |_, _| {
            ControlFlow::Continue(())
        })
        .expect("generate");
        assert_eq!(latents.dims(), [2, 4, 6, 4]);
        runs.push(values(latents).1);
    }
    let max = runs[0]
        .iter()
        .zip(&runs[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(runs[0].iter().all(|v| v.is_finite()));
    assert!(max <= TOL, "Flex and wgpu generations differ by {max}");
    eprintln!("seeded generation, Flex vs wgpu: max abs diff {max:.2e}");
}

#[test]
fn lap_layer_dropout_zeroes_only_the_chosen_pooling_weights() {
    let cfg: Krea2Config = config("krea2");
    let device = Device::flex();
    let mut w = weights("krea2", "weights.safetensors");
    let model = Krea2Transformer::load(&cfg, &mut w, &device).expect("model loads");
    let (_, before) = values(model.text_fusion.pooling_weights());
    let fusion = model.text_fusion.drop_layers(&[0, 2, 99]);
    let (_, after) = values(fusion.pooling_weights());
    assert_eq!(after.len(), cfg.num_text_layers);
    assert_eq!(after[0], 0.0);
    assert_eq!(after[2], 0.0);
    assert_eq!(after[1], before[1]);
    assert_ne!(before[1], 0.0);
}
