//! `unifusion make-tiny-model`, `generate`, `edit`, `variation` as a user runs them: PNGs of
//! the requested size with the settings in text chunks; bad input is one line and exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn unifusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unifusion"))
        .args(args)
        .output()
        .expect("run unifusion")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "unifusion-pipeline-cli-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `(width, height, tEXt/iTXt chunks)` of a PNG, read chunk by chunk (independent of the
/// CLI's own reader).
fn png_info(path: &Path) -> (u32, u32, Vec<(String, String)>) {
    let bytes = std::fs::read(path).expect("png");
    assert_eq!(&bytes[..8], &[137, 80, 78, 71, 13, 10, 26, 10]);
    let mut pos = 8;
    let (mut w, mut h, mut text) = (0, 0, Vec::new());
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("test value")) as usize;
        let kind = &bytes[pos + 4..pos + 8];
        let data = &bytes[pos + 8..pos + 8 + len];
        if kind == b"IHDR" {
            w = u32::from_be_bytes(data[0..4].try_into().expect("test value"));
            h = u32::from_be_bytes(data[4..8].try_into().expect("test value"));
        }
        if kind == b"tEXt" || kind == b"iTXt" {
            let nul = data.iter().position(|&b| b == 0).expect("test value");
            let key = String::from_utf8_lossy(&data[..nul]).into_owned();
            let value = if kind == b"tEXt" {
                data[nul + 1..].iter().map(|&b| b as char).collect()
            } else {
                let rest = &data[nul + 3..];
                let mut parts = rest.splitn(3, |&b| b == 0);
                let _ = (parts.next(), parts.next());
                String::from_utf8_lossy(parts.next().unwrap_or(&[])).into_owned()
            };
            text.push((key, value));
        }
        pos += 12 + len;
    }
    (w, h, text)
}

fn get<'a>(text: &'a [(String, String)], key: &str) -> &'a str {
    text.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} chunk"))
}

#[test]
fn tiny_model_generates_edits_and_varies_with_metadata() {
    let dir = scratch("ok");
    let model = dir.join("model");
    let m = model.to_str().expect("test value");
    let o = unifusion(&["make-tiny-model", "--out", m]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let common = ["--model", m, "--steps", "2", "--backend", "flex", "--quiet"];

    let generated = dir.join("gen.png");
    let mut args = vec![
        "generate",
        "--prompt",
        "a red cube",
        "--seed",
        "5",
        "--width",
        "40",
        "--height",
        "24",
        "--guidance-interval",
        "0.2,0.85",
    ];
    args.extend(["--out", generated.to_str().expect("test value")]);
    args.extend(common);
    let o = unifusion(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (w, h, text) = png_info(&generated);
    assert_eq!((w, h), (40, 24));
    assert_eq!(get(&text, "unifusion:prompt"), "a red cube");
    assert_eq!(get(&text, "unifusion:seed"), "5");
    assert_eq!(get(&text, "unifusion:steps"), "2");
    assert_eq!(get(&text, "unifusion:guidance_interval"), "[0.2, 0.85]");
    assert_eq!(get(&text, "unifusion:task"), "text-to-image");
    assert!(get(&text, "unifusion:rewritten_ids").starts_with('['));
    let _ = get(&text, "unifusion:rewritten_prompt");

    // An edit, a multi-reference edit and a variation on the generated PNG.
    let out = dir.join("edit.png");
    let g = generated.to_str().expect("test value");
    for (args, task) in [
        (
            vec!["edit", "--image", g, "--prompt", "make it blue"],
            "edit",
        ),
        (
            vec![
                "edit",
                "--image",
                g,
                "--image",
                g,
                "--prompt",
                "two of them",
            ],
            "multi-reference",
        ),
        (
            vec![
                "edit",
                "--image",
                g,
                "--prompt",
                "make it blue",
                "--zero-shot",
            ],
            "zero-shot-edit (15% image steps)",
        ),
        (vec!["variation", "--image", g], "variation"),
    ] {
        let mut args = args.clone();
        args.extend([
            "--out",
            out.to_str().expect("test value"),
            "--width",
            "16",
            "--height",
            "32",
        ]);
        args.extend(common);
        let o = unifusion(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let (w, h, text) = png_info(&out);
        assert_eq!((w, h), (16, 32), "{args:?}");
        assert_eq!(get(&text, "unifusion:task"), task);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_generate_input_is_one_line_and_exit_2() {
    let dir = scratch("bad");
    let model = dir.join("model");
    let m = model.to_str().expect("test value");
    assert!(unifusion(&["make-tiny-model", "--out", m]).status.success());
    let text = dir.join("not.png");
    std::fs::write(&text, "hello").expect("test value");
    let t = text.to_str().expect("test value");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "--model", m, "--prompt", ""],
            "prompt is empty",
        ),
        (
            vec!["generate", "--model", "/nonexistent", "--prompt", "x"],
            "no such model",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--width", "30"],
            "multiples of",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "x", "--width", "0"],
            "empty",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--backend",
                "cuda",
            ],
            "invalid value",
        ),
        (
            vec![
                "edit",
                "--model",
                m,
                "--prompt",
                "x",
                "--image",
                "/nonexistent.png",
            ],
            "no such file",
        ),
        (
            vec!["edit", "--model", m, "--prompt", "x", "--image", t],
            "not an image",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "x",
                "--guidance-interval",
                "0.8,0.2",
            ],
            "0 ≤ LOW < HIGH",
        ),
        (vec!["variation", "--model", m], "--image"),
        (vec!["make-tiny-model", "--out", m], "not empty"),
    ];
    for (args, needle) in cases {
        let o = unifusion(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The concatenated IDAT payload of a PNG: equal payloads from one encoder are equal pixels.
fn idat(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("png");
    let (mut pos, mut out) = (8, Vec::new());
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().expect("test value")) as usize;
        if &bytes[pos + 4..pos + 8] == b"IDAT" {
            out.extend_from_slice(&bytes[pos + 8..pos + 8 + len]);
        }
        pos += 12 + len;
    }
    out
}

#[test]
fn packed_model_streams_in_and_matches_the_unpacked_one() {
    let dir = scratch("packed");
    let packed = dir.join("packed");
    let unpacked = dir.join("unpacked");
    let (p, u) = (
        packed.to_str().expect("test value"),
        unpacked.to_str().expect("test value"),
    );
    let o = unifusion(&[
        "make-tiny-model",
        "--out",
        p,
        "--seed",
        "3",
        "--shard-kib",
        "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = unifusion(&["make-tiny-model", "--out", u, "--seed", "3", "--unpacked"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shards: Vec<PathBuf> = std::fs::read_dir(&packed)
        .expect("packed dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    assert!(
        shards.len() >= 3,
        "{} shards: the load must really stream",
        shards.len()
    );

    let mut images = Vec::new();
    for (model, name) in [
        (p.to_string(), "a.png"),
        (format!("{p}/manifest.json"), "b.png"),
        (u.to_string(), "c.png"),
    ] {
        let out = dir.join(name);
        let o = unifusion(&[
            "generate",
            "--model",
            &model,
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
            out.to_str().expect("test value"),
        ]);
        assert!(
            o.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        images.push(idat(&out));
    }
    assert_eq!(
        images[0], images[1],
        "manifest path and its directory load the same model"
    );
    assert_eq!(
        images[0], images[2],
        "packed and unpacked tiny models (same seed) draw the same image"
    );

    // A corrupted shard is named, exit 2, no panic.
    let victim = &shards[1];
    let mut bytes = std::fs::read(victim).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(victim, bytes).expect("corrupt shard");
    let out = dir.join("bad.png");
    let o = unifusion(&[
        "generate",
        "--model",
        p,
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "16",
        "--height",
        "16",
        "--backend",
        "flex",
        "--quiet",
        "--out",
        out.to_str().expect("test value"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    let file = victim
        .file_name()
        .and_then(|f| f.to_str())
        .expect("test value");
    assert!(err.contains(file) && err.contains("sha256"), "{err}");
    assert!(!out.exists(), "no image from a corrupt model");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_scores_held_out_prompts_and_own_cases() {
    let dir = scratch("eval");
    let model = dir.join("model");
    let m = model.to_str().expect("test value");
    assert!(unifusion(&["make-tiny-model", "--out", m]).status.success());
    let json = dir.join("eval.json");
    // `eval` at one step and 32 px, `extra` flags in between: the JSON report, parsed, and
    // what it printed.
    let eval_json = |extra: &[&str]| -> (serde_json::Value, String) {
        let j = json.to_str().expect("test value");
        let tail = ["--steps", "1", "--size", "32", "--quiet", "--json", j];
        let args: Vec<&str> = ["eval", "--model", m]
            .into_iter()
            .chain(extra.iter().copied())
            .chain(tail)
            .collect();
        let o = unifusion(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let report = std::fs::read(&json).expect("json");
        let report = serde_json::from_slice(&report).expect("parses");
        (report, String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (report, stdout) = eval_json(&["--prompts", "2", "--seeds", "2"]);
    assert_eq!(report["t2i"]["images"], 4);
    assert_eq!(report["variation"]["images"], 4);
    assert_eq!(report["edit"]["cases"], 4);
    for (block, key) in [
        ("t2i", "micro_avg"),
        ("t2i", "micro_best4"),
        ("t2i", "macro_avg"),
        ("t2i", "macro_best4"),
        ("edit", "adherence"),
        ("edit", "identity"),
        ("multi_reference", "adherence"),
        ("variation", "micro_avg"),
    ] {
        let v = report[block][key].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&v), "{block}.{key} = {v}");
    }
    let best = report["t2i"]["micro_best4"].as_f64().expect("number");
    let avg = report["t2i"]["micro_avg"].as_f64().expect("number");
    assert!(
        best + 1e-12 >= avg,
        "best-of-N {best} below the average {avg}"
    );
    assert_eq!(
        report["t2i"]["per_category"].as_object().map(|c| c.len()),
        Some(5)
    );
    // One VERIFI rewrite per prompt, read back and scored; the random model's is gibberish.
    let rewrite = &report["t2i"]["rewrite"];
    assert_eq!(rewrite["prompts"], 2, "{rewrite}");
    assert_eq!(rewrite["exact"].as_f64(), Some(0.0), "{rewrite}");
    let micro = rewrite["micro_avg"].as_f64().expect("a number");
    assert!((0.0..=1.0).contains(&micro), "{rewrite}");
    let samples = rewrite["samples"].as_array().expect("quoted rewrites");
    assert_eq!(samples.len(), 2, "{rewrite}");
    assert!(
        samples[0]["want"]
            .as_str()
            .is_some_and(|w| w.contains("background")),
        "{rewrite}"
    );
    assert_eq!(report["split"], "held-out");
    assert!(stdout.contains("| micro avg |"), "{stdout}");
    assert!(stdout.contains("VERIFI rewrites read back"), "{stdout}");

    // Own cases; a bad line is named.
    let cases = dir.join("cases.jsonl");
    let good = r#"{"prompt": "a red circle top left", "scene": {"background":"white","objects":[{"shape":"circle","color":"red","size":"large","cell":[0,0]}]}}"#;
    std::fs::write(&cases, format!("{good}\n\n{good}\n")).expect("write");
    let c = cases.to_str().expect("test value");
    let (report, _) = eval_json(&["--cases", c, "--seeds", "1"]);
    assert_eq!(report["t2i"]["images"], 2);
    assert_eq!(report["t2i"]["rewrite"]["prompts"], 2);
    assert!(report.get("edit").is_none());
    std::fs::write(
        &cases,
        format!("{good}\n{{\"prompt\": \"x\", \"scene\": {{\"background\":\"white\",\"objects\":[{{\"shape\":\"hexagon\",\"color\":\"red\",\"size\":\"large\",\"cell\":[0,0]}}]}}}}\n"),
    )
    .expect("write");
    let o = unifusion(&["eval", "--model", m, "--cases", c, "--quiet"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("line 2") && err.contains("hexagon"), "{err}");

    // The single-object diagnostic: every scene holds one object.
    let (report, _) = eval_json(&["--split", "single", "--prompts", "3", "--seeds", "1"]);
    assert_eq!(report["split"], "single");
    let samples = report["t2i"]["rewrite"]["samples"]
        .as_array()
        .expect("quoted");
    assert_eq!(samples.len(), 3);
    for s in samples {
        let want = s["want"].as_str().expect("text");
        assert!(want.contains("with one object"), "{want}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
