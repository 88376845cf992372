//! `unifusion pack --quantize` as a user runs it: the tiny model's checkpoints packed with q8
//! and q4 Linears, inspected, and generating an image through the quantized layers.

use std::path::PathBuf;
use std::process::{Command, Output};

fn unifusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unifusion"))
        .args(args)
        .output()
        .expect("run unifusion")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "unifusion-pack-quantized-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pack(u: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "pack".to_owned(),
        "--config".into(),
        format!("{u}/config.json"),
        "--tokenizer".into(),
        format!("{u}/tokenizer.json"),
        "--from".into(),
        format!("internvl-hf={u}/vlm.safetensors"),
        "--from".into(),
        format!("krea2-diffusers={u}/transformer.safetensors"),
        "--from".into(),
        format!("vae-diffusers={u}/vae.safetensors"),
        "--out".into(),
        out.to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    unifusion(&refs)
}

#[test]
fn quantized_pack_inspects_and_generates() {
    let dir = scratch("tiny");
    let u = dir.join("unpacked");
    let u = u.to_str().expect("utf8");
    let o = unifusion(&["make-tiny-model", "--out", u, "--seed", "3", "--unpacked"]);
    assert!(o.status.success(), "{}", text(&o));

    for (bits, dtype) in [("q8", "I8"), ("q4", "U8")] {
        let out = dir.join(bits);
        let out = out.to_str().expect("utf8");
        let o = pack(u, out, &["--quantize", bits, "--group", "8"]);
        assert!(o.status.success(), "{}", text(&o));
        let said = text(&o);
        assert!(
            said.contains(&format!("to {bits} (group 8)")),
            "pack reports the quantization: {said}"
        );
        let manifest = std::fs::read_to_string(format!("{out}/manifest.json")).expect("manifest");
        let q_name = format!("vlm.model.language_model.layers.0.self_attn.q_proj.weight.{bits}");
        assert!(manifest.contains(&q_name), "{q_name} in the manifest");
        assert!(manifest.contains("transformer.transformer_blocks.0.attn.to_q.weight.scales"));
        assert!(
            !manifest.contains("\"vlm.model.language_model.layers.0.self_attn.q_proj.weight\""),
            "the float weight is replaced"
        );
        // Embeddings and the VAE stay float.
        assert!(manifest.contains("\"vlm.model.language_model.embed_tokens.weight\""));

        let o = unifusion(&["inspect", "--verify", out]);
        assert!(o.status.success(), "{}", text(&o));
        let said = text(&o);
        assert!(said.contains(&format!("| {dtype} |")), "{said}");
        assert!(said.contains("| F16 |"), "scales are F16: {said}");

        let png = dir.join(format!("{bits}.png"));
        let o = unifusion(&[
            "generate",
            "--model",
            out,
            "--prompt",
            "a red cube",
            "--seed",
            "9",
            "--steps",
            "2",
            "--width",
            "16",
            "--height",
            "16",
            "--backend",
            "flex",
            "--quiet",
            "--out",
            png.to_str().expect("utf8"),
        ]);
        assert!(o.status.success(), "{bits}: {}", text(&o));
        assert!(std::fs::metadata(&png).expect("png").len() > 0);
    }

    // A group that does not divide into 8-element words, and one no Linear fits, are errors
    // or reported, never a panic.
    let o = pack(
        u,
        dir.join("bad").to_str().expect("utf8"),
        &["--quantize", "q8", "--group", "12"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--group 12"), "{}", text(&o));
    let wide = dir.join("wide");
    let o = pack(
        u,
        wide.to_str().expect("utf8"),
        &["--quantize", "q4", "--group", "4096"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("quantized 0 Linear weights"),
        "{}",
        text(&o)
    );
}
