//! `unifusion pack` and `unifusion inspect` as a user runs them: exit codes and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use unifusion_weights::Dtype;
use unifusion_weights::native::{SafetensorsFile, read_manifest};
use unifusion_weights::safetensors_header::write_header;

fn unifusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unifusion"))
        .args(args)
        .output()
        .expect("run unifusion")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unifusion-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A safetensors input with two F32 tensors of 2 MiB each and one I64 tensor.
fn write_input(path: &Path) {
    let big: &[u64] = &[512, 1024];
    let ids: &[u64] = &[3];
    let mut file = write_header(&[
        ("vlm.a", Dtype::F32, big),
        ("vae.b", Dtype::F32, big),
        ("generator.ids", Dtype::I64, ids),
    ]);
    file.extend((0..2 * 512 * 1024).flat_map(|i| (i as f32).to_le_bytes()));
    file.extend((0..3i64).flat_map(i64::to_le_bytes));
    std::fs::write(path, file).expect("write input");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pack_then_inspect_then_verify_catches_a_bad_shard() {
    let dir = scratch("pack");
    let input = dir.join("in.safetensors");
    write_input(&input);
    let out = dir.join("model");
    let (input_s, out_s) = (input.to_string_lossy(), out.to_string_lossy());
    let o = unifusion(&[
        "pack",
        "--from",
        &input_s,
        "--layout",
        "project",
        "--out",
        &out_s,
        "--dtype",
        "f16",
        "--shard-size-mib",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = unifusion(&["inspect", "--verify", &out_s]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    // Each 1 MiB F16 tensor gets its own shard (header pushes it past 1 MiB); ids share one.
    assert!(text.contains("3 shards"), "{text}");
    assert!(text.contains("| vlm | 1 | 524288 | 1048576 |"), "{text}");
    assert!(text.contains("| I64 | 24 |"), "{text}");

    let manifest = unifusion_weights::native::read_manifest(&out)
        .expect("manifest")
        .0;
    let victim = out.join(&manifest.shards[1].file);
    let mut bytes = std::fs::read(&victim).expect("read shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, bytes).expect("corrupt");
    let o = unifusion(&["inspect", "--verify", &out_s]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains(&manifest.shards[1].file), "{err}");
    assert!(
        !err.contains(&manifest.shards[0].file),
        "only the bad shard is named: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = scratch("bad");
    let truncated = dir.join("cut.safetensors");
    std::fs::write(&truncated, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).expect("write");
    let bad_manifest = dir.join("manifest.json");
    std::fs::write(
        &bad_manifest,
        r#"{"format":"unifusion-manifest","format_version":9}"#,
    )
    .expect("write");
    let out = dir.join("o").to_string_lossy().into_owned();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "pack",
                "--from",
                "/nonexistent/x.safetensors",
                "--out",
                &out,
            ],
            "no such file",
        ),
        (
            vec![
                "pack",
                "--from",
                truncated.to_str().expect("utf8"),
                "--out",
                &out,
            ],
            "runs past the end",
        ),
        (
            vec![
                "pack",
                "--from",
                truncated.to_str().expect("utf8"),
                "--layout",
                "krea2",
                "--out",
                &out,
            ],
            "give --config with a UniFusion config",
        ),
        (
            vec!["inspect", bad_manifest.to_str().expect("utf8")],
            "format_version 9 is not supported",
        ),
    ];
    for (args, needle) in cases {
        let o = unifusion(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn fixture_json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).expect("fixture config"))
        .expect("fixture json")
}

/// A UniFusion config of the committed fixtures' components (tiny transformers InternVL,
/// diffusers Krea 2 and AutoencoderKL configs). `edit` changes it before it is written.
fn write_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut config = serde_json::json!({
        "vlm": fixture_json("vlm/layernorm_untied/config.json"),
        "transformer": fixture_json("generator/krea2/config.json"),
        "vae": { "kind": "kl", "config": fixture_json("generator/vae/config.json") },
    });
    edit(&mut config);
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("config.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    path
}

/// A copy of a safetensors file with some tensors dropped and others added (zeros, F32).
fn rewrite(from: &Path, to: &Path, drop: &[&str], add: &[(&str, &[u64])]) {
    let mut file = SafetensorsFile::open(from).expect("open fixture");
    let kept: Vec<_> = file
        .header
        .tensors
        .clone()
        .into_iter()
        .filter(|t| !drop.contains(&t.name.as_str()))
        .collect();
    assert_eq!(
        kept.len() + drop.len(),
        file.header.tensors.len(),
        "dropped names exist"
    );
    let mut header: Vec<(&str, Dtype, &[u64])> = kept
        .iter()
        .map(|t| (t.name.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    header.extend(add.iter().map(|&(n, s)| (n, Dtype::F32, s)));
    let mut bytes = write_header(&header);
    for t in &kept {
        bytes.extend(file.read(t).expect("read tensor"));
    }
    for (_, shape) in add {
        bytes.resize(bytes.len() + 4 * shape.iter().product::<u64>() as usize, 0);
    }
    std::fs::write(to, bytes).expect("write checkpoint");
}

/// (name, dtype, shape) of one manifest tensor.
type TensorSummary = (String, String, Vec<u64>);

/// Every tensor, and the shard hashes, of a packed model.
fn manifest_summary(dir: &Path) -> (Vec<TensorSummary>, Vec<String>) {
    let manifest = read_manifest(dir).expect("manifest").0;
    let tensors = manifest
        .tensors()
        .map(|t| (t.name.clone(), t.dtype.to_string(), t.shape.clone()))
        .collect();
    let shards = manifest.shards.iter().map(|s| s.sha256.clone()).collect();
    (tensors, shards)
}

fn pack(args: &[&str]) -> Output {
    let mut all = vec!["pack"];
    all.extend_from_slice(args);
    unifusion(&all)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Original OpenGVLab InternVL + original Krea 2 + diffusers VAE + tokenizer into one
/// manifest, checked against the config; the transformers / diffusers spellings of the same
/// weights give byte-identical shards; the VLM and transformer parts load into the model.
#[test]
fn pack_converts_every_layout_into_one_checked_manifest() {
    let dir = scratch("layouts");
    let config = s(&write_config(&dir, |_| {}));
    let tokenizer = s(&fixture("vlm/tokenizer.json"));
    let vae = format!(
        "vae-diffusers={}",
        s(&fixture("generator/vae/weights.safetensors"))
    );
    let (original, hf) = (dir.join("original"), dir.join("hf"));
    let o = pack(&[
        "--from",
        &format!(
            "internvl={}",
            s(&fixture("vlm/layernorm_untied/model_original.safetensors"))
        ),
        "--from",
        &format!(
            "krea2={}",
            s(&fixture("generator/krea2/weights_original.safetensors"))
        ),
        "--from",
        &vae,
        "--config",
        &config,
        "--tokenizer",
        &tokenizer,
        "--shard-size-mib",
        "1",
        "--out",
        &s(&original),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("checked vlm, transformer, vae against the config"),
        "{stdout}"
    );
    let o = pack(&[
        "--from",
        &format!(
            "internvl-hf={}",
            s(&fixture("vlm/layernorm_untied/model.safetensors"))
        ),
        "--from",
        &format!(
            "krea2-diffusers={}",
            s(&fixture("generator/krea2/weights.safetensors"))
        ),
        "--from",
        &vae,
        "--config",
        &config,
        "--tokenizer",
        &tokenizer,
        "--shard-size-mib",
        "1",
        "--out",
        &s(&hf),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (tensors, shards) = manifest_summary(&original);
    assert_eq!(
        (tensors.clone(), shards.clone()),
        manifest_summary(&hf),
        "both spellings of the same weights pack to the same manifest"
    );
    let has = |name: &str, shape: &[u64]| {
        assert!(
            tensors.iter().any(|(n, _, s)| n == name && s == shape),
            "{name} {shape:?} not in {tensors:?}"
        )
    };
    // fused qkv [96, 32] split in thirds; flat modulation [6·D] reshaped to [6, D]
    has(
        "vlm.model.vision_tower.encoder.layer.1.attention.v_proj.weight",
        &[32, 32],
    );
    has("vlm.model.multi_modal_projector.linear_2.weight", &[48, 48]);
    has("vlm.lm_head.weight", &[272, 48]);
    has(
        "transformer.transformer_blocks.1.scale_shift_table",
        &[6, 32],
    );
    has("transformer.text_fusion.projector.weight", &[1, 3]);
    has("vae.decoder.conv_in.weight", &[16, 4, 3, 3]);
    assert!(
        read_manifest(&original)
            .expect("manifest")
            .0
            .tokenizer
            .is_some()
    );
    assert!(tensors.iter().all(|(n, _, _)| n.starts_with("vlm.")
        || n.starts_with("transformer.")
        || n.starts_with("vae.")));

    // The VLM and transformer parts are what their loaders read.
    let manifest = read_manifest(&original).expect("manifest").0;
    let mut vlm = unifusion_model::vlm::Weights::new();
    let mut transformer = unifusion_model::generator::WeightMap::new();
    for shard in &manifest.shards {
        let bytes = std::fs::read(original.join(&shard.file)).expect("shard");
        for (name, data) in
            unifusion_model::generator::params::read_safetensors(&bytes).expect("shard parses")
        {
            if let Some(rest) = name.strip_prefix("vlm.") {
                let shape = data.shape().as_slice().to_vec();
                let values = data.try_to_vec::<f32>().expect("f32");
                vlm.add(rest, values, shape).expect("vlm tensor");
            } else if let Some(rest) = name.strip_prefix("transformer.") {
                transformer.insert(rest, data);
            }
        }
    }
    let device = burn::tensor::Device::flex();
    let vlm_config = unifusion_model::vlm::InternVlConfig::from_json(
        &std::fs::read_to_string(fixture("vlm/layernorm_untied/config.json")).expect("config"),
    )
    .expect("vlm config");
    unifusion_model::vlm::InternVl::load(&vlm_config, &mut vlm, &device).expect("vlm loads");
    assert!(vlm.remaining().is_empty(), "{:?}", vlm.remaining());
    let krea2_config: unifusion_model::generator::Krea2Config =
        serde_json::from_value(fixture_json("generator/krea2/config.json")).expect("krea2");
    unifusion_model::generator::Krea2Transformer::load(&krea2_config, &mut transformer, &device)
        .expect("transformer loads");
    transformer
        .finish()
        .expect("no transformer tensor left over");

    // An AutoencoderTiny (encoder + decoder) alone: checked as a whole autoencoder, and the
    // manifest says it is not a complete model.
    let tiny_config = s(&write_config(&dir.join("tiny"), |c| {
        c["vae"] = serde_json::json!({
            "kind": "tiny", "config": fixture_json("generator/tiny_vae/config.json")
        });
    }));
    let o = pack(&[
        "--from",
        &format!(
            "vae-diffusers={}",
            s(&fixture("generator/tiny_vae/weights.safetensors"))
        ),
        "--config",
        &tiny_config,
        "--out",
        &s(&dir.join("tiny-vae")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("checked vae against the config; no tensors for vlm, transformer"),
        "{stdout}"
    );
    let (tensors, _) = manifest_summary(&dir.join("tiny-vae"));
    assert_eq!(tensors.len(), 60);
    assert!(
        tensors
            .iter()
            .any(|(n, _, _)| n.starts_with("vae.encoder."))
    );

    // A Krea 2 single file with a bundled text encoder: its tensors are dropped and counted.
    let bundled = dir.join("bundled.safetensors");
    rewrite(
        &fixture("generator/krea2/weights_original.safetensors"),
        &bundled,
        &[],
        &[("text_encoders.qwen3.layers.0.weight", &[4, 4])],
    );
    let o = pack(&[
        "--from",
        &format!("krea2={}", s(&bundled)),
        "--config",
        &config,
        "--out",
        &s(&dir.join("bundled")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(
            "dropped 1 tensors that are no transformer weights (e.g. `text_encoders.qwen3.layers.0.weight`)"
        ),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every mismatch with the config is one line naming the tensor, and no manifest is written.
#[test]
fn pack_names_missing_extra_and_misshaped_tensors() {
    let dir = scratch("layout-errors");
    let config = s(&write_config(&dir, |_| {}));
    let hf = fixture("vlm/layernorm_untied/model.safetensors");
    let original = fixture("vlm/layernorm_untied/model_original.safetensors");
    let short = dir.join("short.safetensors");
    rewrite(&hf, &short, &["language_model.model.norm.weight"], &[]);
    let long = dir.join("long.safetensors");
    rewrite(&hf, &long, &[], &[("vision_tower.extra.weight", &[2, 2])]);
    let bad_qkv = dir.join("qkv.safetensors");
    rewrite(
        &original,
        &bad_qkv,
        &["vision_model.encoder.layers.0.attn.qkv.bias"],
        &[("vision_model.encoder.layers.0.attn.qkv.bias", &[95])],
    );
    let wider = s(&write_config(&dir.join("wider"), |c| {
        c["vlm"]["text_config"]["intermediate_size"] = 88.into();
    }));
    let out = dir.join("out");
    let cases: [(String, &str, &str); 6] = [
        (
            format!("internvl-hf={}", s(&short)),
            config.as_str(),
            "1 missing tensor `vlm.model.language_model.norm.weight`",
        ),
        (
            format!("internvl-hf={}", s(&long)),
            config.as_str(),
            "1 unexpected tensor `vlm.model.vision_tower.extra.weight`",
        ),
        (
            format!("internvl-hf={}", s(&hf)),
            wider.as_str(),
            "`vlm.model.language_model.layers.0.mlp.gate_proj.weight` has shape [80, 48], the config needs [88, 48]",
        ),
        (
            format!("internvl-hf={}", s(&original)),
            config.as_str(),
            "spelled like --from internvl=",
        ),
        (
            format!("internvl={}", s(&bad_qkv)),
            config.as_str(),
            "fused qkv needs a first axis that divides by 3",
        ),
        (
            format!(
                "krea2-diffusers={}",
                s(&fixture("generator/krea2/weights_original.safetensors"))
            ),
            config.as_str(),
            "unexpected tensors `transformer.model.diffusion_model.",
        ),
    ];
    for (from, config, needle) in cases {
        let o = pack(&["--from", &from, "--config", config, "--out", &s(&out)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{from}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{from}: {err}");
        assert!(err.contains(needle), "{from}: want `{needle}` in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.join("manifest.json").exists(), "{from}: no manifest");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
