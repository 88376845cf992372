//! `unifusion train` as a user runs it: the tiny recipe's first stages write their files, a
//! second call resumes (finished stages are skipped), bad flags are one line and exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn unifusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unifusion"))
        .args(args)
        .output()
        .expect("run unifusion")
}

/// `unifusion ARGS`, which must succeed (its stderr is the failure message).
fn succeeds(args: &[&str]) -> Output {
    let r = unifusion(args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    r
}

/// `unifusion ARGS`, which must be refused as a usage error (exit 2); its stderr.
fn refused(args: &[&str]) -> String {
    let r = unifusion(args);
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    String::from_utf8_lossy(&r.stderr).into_owned()
}

/// A JSON file the run wrote.
fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("json")
}

/// `generate` reads the model directory `out/model` and writes a PNG.
fn generates_an_image(out: &Path) {
    let png = out.join("image.png");
    let model = out.join("model");
    succeeds(&[
        "generate",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "a red star",
        "--steps",
        "2",
        "--out",
        png.to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert!(image::open(&png).is_ok(), "generate wrote no image");
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("unifusion-train-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn tiny_tokenizer_and_vae_stages_write_their_files_and_resume() {
    let out = scratch("run");
    let o = out.to_str().expect("utf-8 path");
    let args = [
        "train",
        "--out",
        o,
        "--tiny",
        "--stages",
        "tokenizer,vae",
        "--quiet",
    ];
    succeeds(&args);
    for file in [
        "recipe.json",
        "tokenizer/tokenizer.json",
        "vae/loss.csv",
        "vae/loss.png",
        "vae/report.json",
        "vae/autoencoder.safetensors",
        "vae/decoder.safetensors",
        "vae/reconstructions.png",
        "vae/checkpoint/weights.safetensors",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let report = std::fs::read_to_string(out.join("vae/report.json")).expect("report");
    succeeds(&args);
    // Finished stages are skipped: the report is untouched.
    assert_eq!(
        std::fs::read_to_string(out.join("vae/report.json")).expect("report"),
        report
    );
    assert!(!String::from_utf8_lossy(&succeeds(&args).stdout).contains("other settings"));
    // Under other settings a finished stage is still kept, and the run says so.
    let mut sharded = args.to_vec();
    sharded.extend(["--vae-shards", "2"]);
    let stdout = String::from_utf8_lossy(&succeeds(&sharded).stdout).into_owned();
    assert!(
        stdout.contains("vae: finished earlier under other settings"),
        "{stdout}"
    );
    assert!(!stdout.contains("tokenizer: finished earlier"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(out.join("vae/report.json")).expect("report"),
        report
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--vlm-downsample-ratio 1`: the tiny VLM trains with one image token per patch and its
/// stage record says so; a later call without the flag builds the rest of the run on that
/// VLM (its projector's shape depends on the ratio), one with another ratio is refused.
#[test]
fn the_vlm_downsample_ratio_reaches_the_vlm_stage() {
    let out = scratch("ratio");
    let o = out.to_str().expect("utf-8 path");
    let args = [
        "train",
        "--out",
        o,
        "--tiny",
        "--stages",
        "tokenizer,vlm",
        "--vlm-downsample-ratio",
        "1",
        "--quiet",
    ];
    succeeds(&args);
    assert_eq!(
        json(&out.join("vlm/stage.json"))["vlm"]["vlm"]["downsample_ratio"],
        1.0
    );
    let stderr = refused(&[
        "train",
        "--out",
        o,
        "--tiny",
        "--vlm-downsample-ratio",
        "0.5",
        "--quiet",
    ]);
    assert!(
        stderr.contains("trained with --vlm-downsample-ratio 1, not 0.5"),
        "{stderr}"
    );
    succeeds(&["train", "--out", o, "--tiny", "--quiet"]);
    assert_eq!(
        json(&out.join("model/config.json"))["vlm"]["downsample_ratio"],
        1.0
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--dit-normalize-latents`: the whole tiny recipe trains its DiT on normalized latents, the
/// model directory's VAE config carries the measured factors (also after a second call that
/// skips every stage), and `generate` reads that model.
#[test]
fn normalized_latents_reach_the_model_config_and_generate_reads_it() {
    let out = scratch("norm");
    let o = out.to_str().expect("utf-8 path");
    let args = [
        "train",
        "--out",
        o,
        "--tiny",
        "--dit-normalize-latents",
        "--quiet",
    ];
    succeeds(&args);
    let read = |file: &str| json(&out.join(file));
    let norm = read("dit/latent_norm.json");
    let std = norm["std"].as_array().expect("std");
    assert!(!std.is_empty() && std.iter().all(|s| s.as_f64().is_some_and(|s| s > 0.0)));
    let vae = &read("model/config.json")["vae"]["config"];
    assert_eq!(vae["latents_mean"], norm["mean"]);
    assert_eq!(vae["latents_std"], norm["std"]);
    assert_eq!(vae["scaling_factor"], 1.0);
    assert_eq!(read("dit/stage.json")["dit"]["normalize_latents"], true);
    assert_eq!(read("dit/report.json")["details"]["latent_norm"], norm);
    succeeds(&args);
    assert_eq!(&read("model/config.json")["vae"]["config"], vae);
    generates_an_image(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// `--dit-size`: the tiny recipe trains a DiT of the given heads, blocks and MLP width, its
/// stage and the model directory's transformer config record them, and `generate` loads it;
/// `--dit-reuse`, a bare `--dit-abs-pos` (the tiny recipe has no absolute positions) and
/// `--dit-binding-pairs`, `--dit-count-pairs true` and `--dit-placement-pairs` reach the stage's settings beside them.
#[test]
fn the_dit_size_reaches_the_stage_and_the_model() {
    let out = scratch("size");
    let o = out.to_str().expect("utf-8 path");
    succeeds(&[
        "train",
        "--out",
        o,
        "--tiny",
        "--dit-size",
        "4,3,48",
        "--dit-reuse",
        "2",
        "--dit-abs-pos",
        "--dit-binding-pairs",
        "--dit-count-pairs",
        "true",
        "--dit-placement-pairs",
        "--quiet",
    ]);
    let read = |file: &str| json(&out.join(file));
    assert_eq!(read("dit/stage.json")["dit"]["reuse"], 2);
    assert_eq!(read("dit/stage.json")["dit"]["binding_pairs"], true);
    assert_eq!(read("dit/stage.json")["dit"]["count_pairs"], true);
    assert_eq!(read("dit/stage.json")["dit"]["placement_pairs"], true);
    let stage = &read("dit/stage.json")["dit"]["transformer"];
    let model = &read("model/config.json")["transformer"];
    for t in [stage, model] {
        assert_eq!(t["num_attention_heads"], 4, "{t}");
        assert_eq!(t["num_key_value_heads"], 2, "{t}");
        assert_eq!(t["num_layers"], 3, "{t}");
        assert_eq!(t["intermediate_size"], 48, "{t}");
        assert_eq!(t["abs_pos_embed"], true, "{t}");
    }
    generates_an_image(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// `--vae-downscale` and `--vae-latent-channels` reach the VAE stage, the DiT (its tokens are
/// 2 × 2 latent cells) and the packed model, which generates at the new compression. The run
/// records them: a later call without the flags trains its DiT on the run's VAE, and one whose
/// flags ask for another VAE is refused with what the run holds.
#[test]
fn the_vae_compression_and_dit_patch_reach_the_stages_and_the_model() {
    let out = scratch("compression");
    let o = out.to_str().expect("utf-8 path");
    succeeds(&[
        "train",
        "--out",
        o,
        "--tiny",
        "--stages",
        "tokenizer,vae",
        "--vae-downscale",
        "4",
        "--vae-latent-channels",
        "2",
        "--quiet",
    ]);
    let stderr = refused(&[
        "train",
        "--out",
        o,
        "--tiny",
        "--vae-latent-channels",
        "3",
        "--quiet",
    ]);
    assert!(
        stderr.contains("trained a 4× VAE with 2 latent channels")
            && stderr.contains("ask for 4× with 3"),
        "{stderr}"
    );
    assert!(!out.join("vlm").exists(), "a refused call trains nothing");
    // 4 × 4 patches of the 2 adopted channels: tokens of 32 values.
    succeeds(&[
        "train",
        "--out",
        o,
        "--tiny",
        "--dit-patch-size",
        "4",
        "--quiet",
    ]);
    let read = |file: &str| json(&out.join(file));
    let vae_stage = &read("vae/stage.json")["vae"]["vae"];
    let vae_model = &read("model/config.json")["vae"]["config"];
    for v in [vae_stage, vae_model] {
        assert_eq!(v["latent_channels"], 2, "{v}");
        assert_eq!(
            v["num_decoder_blocks"].as_array().map(Vec::len),
            Some(3),
            "{v}"
        );
    }
    let dit_stage = &read("dit/stage.json")["dit"]["transformer"];
    let dit_model = &read("model/config.json")["transformer"];
    for t in [dit_stage, dit_model] {
        assert_eq!(t["in_channels"], 32, "{t}");
        assert_eq!(t["patch_size"], 4, "{t}");
    }
    generates_an_image(&out);
    let _ = std::fs::remove_dir_all(&out);
}

/// Copies directory `from` to `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creates");
    for entry in std::fs::read_dir(from).expect("lists") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copies");
        }
    }
}

/// `--vae-tune-decoder`: beside copies of a finished run's tokenizer, VLM and DiT, `--stages
/// vae` tunes that run's decoder and writes a model with the run's transformer and the new
/// decoder, which generates.
#[test]
fn a_tuned_decoder_joins_another_runs_dit_in_a_model() {
    let first = scratch("tune-first");
    let second = scratch("tune-second");
    let (a, b) = (
        first.to_str().expect("utf-8 path"),
        second.to_str().expect("utf-8 path"),
    );
    succeeds(&["train", "--out", a, "--tiny", "--quiet"]);
    for part in ["tokenizer", "vlm", "dit"] {
        copy_dir(&first.join(part), &second.join(part));
    }
    let from = first.join("vae/autoencoder.safetensors");
    succeeds(&[
        "train",
        "--out",
        b,
        "--tiny",
        "--stages",
        "vae",
        "--vae-tune-decoder",
        from.to_str().expect("utf-8 path"),
        "--vae-latent-noise",
        "0.5",
        "--quiet",
    ]);
    let stage = json(&second.join("vae/stage.json"));
    assert_eq!(stage["vae"]["latent_noise"], 0.5);
    assert!(stage["vae"]["tune_decoder_from"].is_string(), "{stage}");
    let read = |dir: &Path, file: &str| std::fs::read(dir.join("model").join(file)).expect("reads");
    assert_eq!(
        read(&second, "transformer.safetensors"),
        read(&first, "transformer.safetensors")
    );
    assert_ne!(
        read(&second, "vae.safetensors"),
        read(&first, "vae.safetensors")
    );
    generates_an_image(&second);
    let _ = std::fs::remove_dir_all(&first);
    let _ = std::fs::remove_dir_all(&second);
}

/// `--dit-init`: a second run's DiT starts from the first run's weights (its first loss, on the
/// same seed's first batch, is below the fresh run's), and a time-limited call says how far it
/// got before it stops, resumable.
#[test]
fn a_dit_continuation_starts_from_the_given_weights_and_reports_a_time_limited_stop() {
    let first = scratch("init-a");
    let second = scratch("init-b");
    let (a, b) = (
        first.to_str().expect("utf-8"),
        second.to_str().expect("utf-8"),
    );
    succeeds(&["train", "--out", a, "--tiny", "--quiet"]);
    for part in ["tokenizer", "vae", "vlm"] {
        copy_dir(&first.join(part), &second.join(part));
    }
    let weights = first.join("dit/transformer.safetensors");
    let args = [
        "train",
        "--out",
        b,
        "--tiny",
        "--stages",
        "dit",
        "--dit-init",
        weights.to_str().expect("utf-8"),
        "--quiet",
    ];
    let mut limited = args.to_vec();
    limited.extend(["--time-limit-min", "0"]);
    let out = String::from_utf8_lossy(&succeeds(&limited).stdout).into_owned();
    assert!(out.contains("dit: steps 1-1 of "), "{out}");
    assert!(
        out.contains("stopped at the time limit during `dit`"),
        "{out}"
    );
    assert!(!second.join("model").exists());
    succeeds(&args);
    assert!(second.join("model/transformer.safetensors").exists());
    assert_eq!(
        json(&second.join("dit/stage.json"))["dit"]["init_from"],
        weights.to_str().expect("utf-8")
    );
    let first_loss = |dir: &Path| -> f64 {
        let csv = std::fs::read_to_string(dir.join("dit/loss.csv")).expect("loss.csv");
        let row = csv.lines().nth(1).expect("a step");
        row.split(',')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("loss")
    };
    let (fresh, resumed) = (first_loss(&first), first_loss(&second));
    assert!(resumed < fresh, "continued {resumed} vs fresh {fresh}");
    let _ = std::fs::remove_dir_all(&first);
    let _ = std::fs::remove_dir_all(&second);
}

#[test]
fn bad_flags_are_one_line_and_exit_2() {
    let out = scratch("bad");
    let o = out.to_str().expect("utf-8 path");
    for args in [
        vec!["train", "--out", o, "--stages", "painting"],
        vec!["train", "--out", o, "--steps", "0"],
        vec!["train", "--out", o, "--dit-lr", "0"],
        vec!["train", "--out", o, "--dit-batch", "0"],
        vec!["train", "--out", o, "--dit-shards", "0"],
        vec!["train", "--out", o, "--dit-batch", "4", "--dit-shards", "5"],
        vec!["train", "--out", o, "--vae-shards", "0"],
        vec!["train", "--out", o, "--vlm-shards", "999"],
        vec!["train", "--out", o, "--dit-ema", "1"],
        vec!["train", "--out", o, "--dit-lr", "NaN"],
        vec!["train", "--out", o, "--dit-t-mean", "9"],
        vec!["train", "--out", o, "--dit-rope-theta", "1"],
        vec!["train", "--out", o, "--dit-foreground-weight", "NaN"],
        vec!["train", "--out", o, "--dit-image-positions", "diagonal"],
        vec!["train", "--out", o, "--dit-mix", "1,2,-1,0"],
        vec!["train", "--out", o, "--dit-mix", "0,0,0,0"],
        vec!["train", "--out", o, "--dit-mix", "1,2"],
        vec![
            "train",
            "--out",
            o,
            "--dit-weight-changes",
            "--ablation",
            "plain-loss",
        ],
        vec!["train", "--out", o, "--dit-size", "5,6,256"],
        vec!["train", "--out", o, "--dit-size", "6,0,256"],
        vec!["train", "--out", o, "--dit-size", "6,6"],
        vec!["train", "--out", o, "--dit-size", "6,6,8"],
        vec!["train", "--out", o, "--dit-reuse", "0"],
        vec!["train", "--out", o, "--dit-reuse", "17"],
        vec!["train", "--out", o, "--dit-abs-pos", "maybe"],
        vec!["train", "--out", o, "--dit-binding-pairs", "maybe"],
        vec!["train", "--out", o, "--dit-count-pairs", "2"],
        vec!["train", "--out", o, "--dit-placement-pairs", "no"],
        vec!["train", "--out", o, "--vae-latent-noise", "-1"],
        vec!["train", "--out", o, "--vae-lr", "0"],
        vec![
            "train",
            "--out",
            o,
            "--vae-tune-decoder",
            "/nonexistent/autoencoder.safetensors",
        ],
        vec!["train", "--out", o, "--vae-downscale", "3"],
        vec!["train", "--out", o, "--vae-latent-channels", "0"],
        vec!["train", "--out", o, "--dit-patch-size", "3"],
        vec!["train", "--out", o, "--dit-patch-size", "16"],
        vec![
            "train",
            "--out",
            o,
            "--tiny",
            "--vae-downscale",
            "8",
            "--dit-patch-size",
            "8",
        ],
        vec!["train", "--out", o, "--vlm-downsample-ratio", "0.3"],
        vec!["train", "--out", o, "--vlm-downsample-ratio", "NaN"],
        vec![
            "train",
            "--out",
            o,
            "--dit-init",
            "/nonexistent/transformer.safetensors",
        ],
    ] {
        let r = unifusion(&args);
        assert_eq!(r.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
