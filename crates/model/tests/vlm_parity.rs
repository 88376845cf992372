//! The VLM against transformers v5.24 (`tests/fixtures/vlm`, made by
//! `scripts/fixtures/make_vlm_fixtures.py`): every hidden state and the logits within 1e-4
//! abs (f32) on Flex and wgpu, greedy ids exactly, tiling grids exactly.

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use unifusion_model::vlm::weights::parse_safetensors;
use unifusion_model::vlm::{GenerateOptions, InternVl, InternVlConfig, VlmInput, Weights};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vlm")
}

/// Reference tensors of one case: name → (f32 or i64 values as f64, shape).
struct Io {
    f: HashMap<String, (Vec<f32>, Vec<usize>)>,
    i: HashMap<String, (Vec<i64>, Vec<usize>)>,
}

impl Io {
    fn floats(&self, name: &str) -> (&[f32], &[usize]) {
        let (v, s) = self
            .f
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"));
        (v, s)
    }
    fn ids(&self, name: &str) -> Vec<Vec<u32>> {
        let (v, s) = self
            .i
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"));
        v.chunks(s[1])
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }
    fn has(&self, name: &str) -> bool {
        self.f.contains_key(name) || self.i.contains_key(name)
    }
    fn tensor4(&self, name: &str, device: &Device) -> Tensor<4> {
        let (v, s) = self.floats(name);
        Tensor::from_data(
            TensorData::new(v.to_vec(), [s[0], s[1], s[2], s[3]]),
            device,
        )
    }
}

fn load(case: &str, device: &Device) -> (InternVl, InternVlConfig, Io) {
    let dir = fixtures().join(case);
    let config = InternVlConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).expect("config"),
    )
    .expect("config parses");
    let mut weights = Weights::new();
    weights
        .add_safetensors(&std::fs::read(dir.join("model.safetensors")).expect("weights"))
        .expect("weights parse");
    let model = InternVl::load(&config, &mut weights, device).expect("model loads");
    assert!(
        weights.remaining().is_empty(),
        "unused tensors: {:?}",
        weights.remaining()
    );
    let bytes = std::fs::read(dir.join("io.safetensors")).expect("io");
    let mut io = Io {
        f: HashMap::new(),
        i: HashMap::new(),
    };
    for t in parse_safetensors(&bytes).expect("io parses") {
        if t.dtype == "I64" {
            io.i.insert(t.name.clone(), (t.to_i64().expect("i64"), t.shape.clone()));
        } else {
            io.f.insert(t.name.clone(), (t.to_f32().expect("f32"), t.shape.clone()));
        }
    }
    (model, config, io)
}

fn assert_close<const D: usize>(what: &str, actual: Tensor<D>, expected: (&[f32], &[usize])) {
    assert_eq!(actual.dims().as_slice(), expected.1, "{what}: shape");
    let got = actual.into_data().try_to_vec::<f32>().expect("f32");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (a, e)) in got.iter().zip(expected.0).enumerate() {
        let d = (a - e).abs();
        if d > worst || d.is_nan() {
            worst = if d.is_nan() { f32::INFINITY } else { d };
            at = i;
        }
    }
    assert!(
        worst <= TOL,
        "{what}: max abs diff {worst} at {at} (got {}, want {})",
        got[at],
        expected.0[at]
    );
}

fn devices() -> Vec<(&'static str, Device)> {
    vec![
        ("flex", Device::flex()),
        ("wgpu", Device::wgpu(DeviceKind::DefaultDevice)),
    ]
}

/// Every hidden state and the logits of one fixture input.
fn check_forward(case: &str, prefix: &str) {
    for (dev_name, device) in devices() {
        let (model, _, io) = load(case, &device);
        let ids = io.ids(&format!("{prefix}.input_ids"));
        let pixels = io
            .has(&format!("{prefix}.pixel_values"))
            .then(|| io.tensor4(&format!("{prefix}.pixel_values"), &device));
        let mask: Option<Vec<Vec<bool>>> = io.has(&format!("{prefix}.attention_mask")).then(|| {
            io.ids(&format!("{prefix}.attention_mask"))
                .iter()
                .map(|r| r.iter().map(|&m| m != 0).collect())
                .collect()
        });
        let n = model.num_layers();
        let taps: Vec<usize> = (0..=n).collect();
        let out = model
            .forward(
                VlmInput {
                    ids: &ids,
                    pixel_values: pixels,
                    attention_mask: mask.as_deref(),
                },
                &taps,
            )
            .expect("forward");
        for (i, state) in out.taps {
            let name = format!("{prefix}.hidden_states.{i}");
            assert_close(
                &format!("{case} {dev_name} {name}"),
                state,
                io.floats(&name),
            );
        }
        let logits = model.text.logits(out.last);
        assert_close(
            &format!("{case} {dev_name} {prefix}.logits"),
            logits,
            io.floats(&format!("{prefix}.logits")),
        );
    }
}

#[test]
fn text_only_matches_transformers() {
    check_forward("layernorm_untied", "text");
    check_forward("rmsnorm_qknorm_tied", "text");
}

#[test]
fn padding_mask_matches_transformers() {
    check_forward("layernorm_untied", "masked");
}

#[test]
fn one_tile_matches_transformers() {
    check_forward("layernorm_untied", "tiles1");
    check_forward("rmsnorm_qknorm_tied", "tiles1");
}

#[test]
fn three_tiles_match_transformers() {
    check_forward("layernorm_untied", "tiles3");
    check_forward("rmsnorm_qknorm_tied", "tiles3");
}

#[test]
fn position_embedding_interpolation_matches_transformers() {
    for case in ["layernorm_untied", "rmsnorm_qknorm_tied"] {
        for (dev_name, device) in devices() {
            let (model, _, io) = load(case, &device);
            let px = io.tensor4("interp.pixel_values", &device);
            let out = model.vision.forward(px).expect("vision");
            assert_close(
                &format!("{case} {dev_name} interp"),
                out,
                io.floats("interp.last_hidden_state"),
            );
        }
    }
}

#[test]
fn greedy_generation_matches_transformers_and_one_full_forward() {
    for (dev_name, device) in devices() {
        let (model, _, io) = load("layernorm_untied", &device);
        let prompt = io.ids("tiles1.input_ids").remove(0);
        let want: Vec<u32> = io.ids("generate.new_ids").remove(0);
        let n = model.num_layers();
        let taps: Vec<usize> = vec![0, 1, n];
        let options = GenerateOptions {
            max_new_tokens: want.len(),
            stop_tokens: vec![257],
            taps: taps.clone(),
        };
        let px = io.tensor4("tiles1.pixel_values", &device);
        let generation =
            pollster::block_on(model.generate(&prompt, Some(px), &options)).expect("generate");
        assert_eq!(generation.ids, want, "{dev_name}: greedy ids");
        let (p, g) = (prompt.len(), want.len());
        for ((i, prompt_state), (j, gen_state)) in generation
            .prompt_taps
            .into_iter()
            .zip(generation.generated_taps)
        {
            assert_eq!(i, j);
            let name = format!("generate.full.hidden_states.{i}");
            let (full, shape) = io.floats(&name);
            let h = shape[2];
            let part = |from: usize, len: usize| full[from * h..(from + len) * h].to_vec();
            assert_close(
                &format!("{dev_name} prompt tap {i}"),
                prompt_state,
                (&part(0, p), &[1, p, h]),
            );
            assert_close(
                &format!("{dev_name} generated tap {i}"),
                gen_state,
                (&part(p, g), &[1, g, h]),
            );
        }
    }
}

#[test]
fn tiling_matches_transformers_grid_choices() {
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiling.json")).expect("tiling"),
    )
    .expect("json");
    assert!(cases.len() > 20);
    for c in cases {
        let g = |k: &str| c[k].as_u64().expect("number") as usize;
        let got = unifusion_model::vlm::processor::tile_grid(
            g("width"),
            g("height"),
            448,
            g("min_tiles"),
            g("max_tiles"),
        );
        assert_eq!(got, (g("cols"), g("rows")), "{c}");
        assert_eq!(
            got,
            (g("original_cols"), g("original_rows")),
            "original dynamic_preprocess: {c}"
        );
    }
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let device = Device::flex();
    let dir = fixtures().join("layernorm_untied");
    let config = InternVlConfig::from_json(
        &std::fs::read_to_string(dir.join("config.json")).expect("config"),
    )
    .expect("config");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    // Drop one tensor: rebuild a weight set without it through the raw parser.
    let mut short = Weights::new();
    short.add_safetensors(&bytes).expect("parse");
    let mut wrong = config.clone();
    wrong.text_config.intermediate_size += 1;
    let err = InternVl::load(&wrong, &mut short, &device).expect_err("shape mismatch");
    let msg = err.to_string();
    assert!(
        msg.contains("mlp.gate_proj.weight") && msg.contains("shape"),
        "{msg}"
    );
    let mut empty = Weights::new();
    let err = InternVl::load(&config, &mut empty, &device).expect_err("missing");
    assert!(
        err.to_string()
            .contains("missing tensor `vision.embeddings.patch_embeddings.projection.weight`"),
        "{err}"
    );
    assert!(Weights::new().add_safetensors(b"nope").is_err());
}

#[test]
fn named_variants_validate() {
    for c in [
        InternVlConfig::b1(),
        InternVlConfig::b2(),
        InternVlConfig::b8(),
        InternVlConfig::tiny(),
    ] {
        c.validate().expect("valid");
    }
    assert_eq!(InternVlConfig::b1().tokens_per_tile(), 256);
    assert_eq!(InternVlConfig::tiny().tokens_per_tile(), 4);
}

/// `preprocess_image` against transformers' InternVL image processor (PIL backend, which
/// the fixture script checks equal to OpenGVLab's `load_image` recipe bit for bit) on seeded
/// random RGB images: upscaling, downscaling, both at once, 1/3/4 tiles + thumbnail and the
/// single-resize path. The tolerance is 1e-6 abs on normalised values: the resize is exact
/// (integer arithmetic as Pillow's), and what remains is the rounding of `v / 255` (transformers
/// multiplies by 1/255 in f64) amplified by 1/std ≤ 4.5, a few 1e-7 at most; one uint8 level
/// is 1/(255·std) ≥ 0.017, so any resize difference fails by four orders of magnitude.
#[test]
fn image_preprocessing_matches_transformers_and_opengvlab() {
    const PIXEL_TOL: f32 = 1e-6;
    let dir = fixtures().join("preprocess");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases"))
            .expect("json");
    let bytes = std::fs::read(dir.join("images.safetensors")).expect("images");
    let tensors: HashMap<String, _> = parse_safetensors(&bytes)
        .expect("parse")
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    assert!(cases.len() >= 5);
    let device = Device::flex();
    for c in &cases {
        let name = c["name"].as_str().expect("name");
        let g = |k: &str| c[k].as_u64().expect("number") as usize;
        let image = &tensors[&format!("{name}.image")];
        assert_eq!(image.shape, [g("height"), g("width"), 3], "{name}");
        let rgb = unifusion_model::vlm::processor::RgbImage {
            width: g("width"),
            height: g("height"),
            pixels: image.data,
        };
        let got = unifusion_model::vlm::processor::preprocess_image(
            &rgb,
            g("tile"),
            g("min_tiles"),
            g("max_tiles"),
            &device,
        )
        .expect("preprocess");
        let want = &tensors[&format!("{name}.pixel_values")];
        assert_eq!(want.shape[0], g("tiles"), "{name}");
        assert_eq!(
            got.dims().as_slice(),
            want.shape.as_slice(),
            "{name}: shape"
        );
        let got = got.into_data().try_to_vec::<f32>().expect("f32");
        let want = want.to_f32().expect("f32");
        let (worst, at) = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold(
                (0f32, 0),
                |(w, at), (i, d)| if d > w { (d, i) } else { (w, at) },
            );
        assert!(
            worst <= PIXEL_TOL,
            "{name}: max abs diff {worst} at {at} (got {}, want {})",
            got[at],
            want[at]
        );
    }
}

/// The same tiny models under the original OpenGVLab names (`model_original.safetensors`:
/// fused `attn.qkv`, `ls1`, `norm1`, `mlp1.N`, `vision_model.*`) give the transformers
/// fixtures' hidden states and logits, with no tensor left over.
#[test]
fn original_opengvlab_checkpoint_matches_transformers() {
    let device = Device::flex();
    for case in ["layernorm_untied", "rmsnorm_qknorm_tied"] {
        let dir = fixtures().join(case);
        let (_, config, io) = load(case, &device);
        let mut weights = Weights::new();
        weights
            .add_safetensors(&std::fs::read(dir.join("model_original.safetensors")).expect("file"))
            .expect("weights parse");
        let model = InternVl::load(&config, &mut weights, &device).expect("original loads");
        assert!(
            weights.remaining().is_empty(),
            "{case}: unused original tensors: {:?}",
            weights.remaining()
        );
        for prefix in ["text", "tiles3"] {
            let ids = io.ids(&format!("{prefix}.input_ids"));
            let pixels = io
                .has(&format!("{prefix}.pixel_values"))
                .then(|| io.tensor4(&format!("{prefix}.pixel_values"), &device));
            let taps: Vec<usize> = (0..=model.num_layers()).collect();
            let out = model
                .forward(
                    VlmInput {
                        ids: &ids,
                        pixel_values: pixels,
                        attention_mask: None,
                    },
                    &taps,
                )
                .expect("forward");
            for (i, state) in out.taps {
                let name = format!("{prefix}.hidden_states.{i}");
                assert_close(&format!("{case} original {name}"), state, io.floats(&name));
            }
            assert_close(
                &format!("{case} original {prefix}.logits"),
                model.text.logits(out.last),
                io.floats(&format!("{prefix}.logits")),
            );
        }
    }
}

/// With a tiny binding limit the embedding and `lm_head` arrive and stay in row blocks
/// (never one buffer) and the model still matches transformers, tied and untied.
#[test]
fn embedding_over_the_binding_limit_loads_in_blocks_and_matches() {
    for (dev_name, device) in devices() {
        for case in ["layernorm_untied", "rmsnorm_qknorm_tied"] {
            let dir = fixtures().join(case);
            let (_, config, io) = load(case, &device);
            let limit = 4 * config.text_config.hidden_size * 7; // 7 rows a block
            let mut weights = Weights::on_device_with_limit(&device, limit);
            weights
                .add_safetensors(&std::fs::read(dir.join("model.safetensors")).expect("file"))
                .expect("weights parse");
            let model = InternVl::load(&config, &mut weights, &device).expect("loads");
            let vocab = config.text_config.vocab_size;
            assert_eq!(model.text.embed_tokens.blocks.len(), vocab.div_ceil(7));
            assert_eq!(model.text.lm_head.blocks.len(), vocab.div_ceil(7));
            let ids = io.ids("text.input_ids");
            let taps: Vec<usize> = (0..=model.num_layers()).collect();
            let out = model
                .forward(
                    VlmInput {
                        ids: &ids,
                        pixel_values: None,
                        attention_mask: None,
                    },
                    &taps,
                )
                .expect("forward");
            for (i, state) in out.taps {
                let name = format!("text.hidden_states.{i}");
                assert_close(
                    &format!("{case} {dev_name} blocked {name}"),
                    state,
                    io.floats(&name),
                );
            }
            assert_close(
                &format!("{case} {dev_name} blocked text.logits"),
                model.text.logits(out.last),
                io.floats("text.logits"),
            );
        }
    }
}
