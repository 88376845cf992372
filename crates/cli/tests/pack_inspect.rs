//! `unifusion pack` and `unifusion inspect` as a user runs them: exit codes and one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use unifusion_weights::Dtype;
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
            "not written yet",
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
