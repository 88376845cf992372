//! Property tests over everything that reads untrusted bytes: the manifest parser, the
//! safetensors header parser and the loader. Every input must give `Ok` or a typed error,
//! never a panic; accepted inputs must satisfy the format's invariants.
//!
//! Each test prints how many cases it ran (`cargo test -p unifusion-weights --test fuzz --
//! --nocapture`). `FUZZ_CASES` scales the case counts (default 1).

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use unifusion_weights::safetensors_header::ShardHeader;
use unifusion_weights::{
    CountingSink, Dtype, LoadError, Manifest, MemoryOutput, MemorySource, ModelInfo, Packer, load,
};

fn cases(base: u32) -> u32 {
    let scale = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base * scale
}

/// Runs `test` on `cases` inputs from `strategy`, failing on the first failure, and reports.
fn run<S: Strategy>(
    name: &str,
    n: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let count = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |v| {
        count.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    eprintln!("fuzz {name}: {} cases", count.load(Ordering::Relaxed));
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// A small valid model: (manifest, its files).
fn packed(tensors: &[(String, Vec<u64>)], shard_bytes: u64) -> (Manifest, MemorySource) {
    let mut p = Packer::new(MemoryOutput::default(), shard_bytes).expect("limit");
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n: u64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n * 2)
            .map(|b| (b as u8).wrapping_add(i as u8))
            .collect();
        p.add(name, Dtype::F16, shape, &bytes).expect("add");
    }
    let (m, out) = p
        .finish(
            ModelInfo {
                id: "f".into(),
                version: "1".into(),
            },
            serde_json::json!({}),
            None,
        )
        .expect("finish");
    (
        m,
        MemorySource {
            files: out.blobs.into_iter().collect(),
        },
    )
}

fn small_model() -> impl Strategy<Value = Vec<(String, Vec<u64>)>> {
    proptest::collection::vec(proptest::collection::vec(1u64..40, 0..3), 1..12).prop_map(|shapes| {
        shapes
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("c{}.t{i}", i % 3), s))
            .collect()
    })
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "U8", "I64", "BOOL", "F4", "Q4", "", "f32", "F8_E4M3",
];

/// A dimension: mostly small, sometimes zero or huge.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..9, 1 => Just(u64::MAX), 1 => Just(1u64 << 32), 1 => any::<u64>()]
}

/// An offset near the data region's size, or anything.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..200, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

/// A safetensors file with arbitrary entries (dtype, shape, offsets) and data length.
fn header_file() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        0usize..4,
        proptest::sample::select(DTYPES),
        proptest::collection::vec(dim(), 0..10),
        offset(),
        offset(),
    );
    (
        proptest::collection::vec(entry, 0..6),
        0usize..200,
        any::<bool>(),
    )
        .prop_map(|(entries, data_len, pad)| {
            let mut map = serde_json::Map::new();
            for (name, dtype, shape, b, e) in entries {
                map.insert(
                    format!("t{name}"),
                    serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [b, e]}),
                );
            }
            let mut json = serde_json::to_vec(&map).unwrap_or_default();
            if pad {
                json.resize(json.len().next_multiple_of(8), b' ');
            }
            let mut file = (json.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&json);
            file.resize(file.len() + data_len, 0);
            file
        })
}

/// A valid file (contiguous tensors, right sizes), then maybe one perturbation: a dtype, a
/// dimension, an offset or the data length.
fn near_valid_header_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (
        proptest::sample::select(&["F32", "F16", "U8", "I64"][..]),
        proptest::collection::vec(0u64..5, 0..4),
    );
    (proptest::collection::vec(tensor, 0..6), 0u8..6, any::<prop::sample::Index>(), offset()).prop_map(
        |(tensors, how, at, value)| {
            let mut map = serde_json::Map::new();
            let mut cursor = 0u64;
            for (i, (dtype, shape)) in tensors.iter().enumerate() {
                let size = Dtype::parse(dtype).map_or(0, |d| d.size()) * shape.iter().product::<u64>();
                map.insert(format!("t{i}"), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + size]}));
                cursor += size;
            }
            let mut data_len = cursor;
            if !map.is_empty() {
                let key = format!("t{}", at.index(map.len()));
                let entry = &mut map[&key];
                match how {
                    0 => entry["dtype"] = serde_json::json!("BF16"),
                    1 => entry["shape"] = serde_json::json!([value]),
                    2 => entry["data_offsets"][0] = serde_json::json!(value),
                    3 => entry["data_offsets"][1] = serde_json::json!(value),
                    4 => data_len = value % 300,
                    _ => {}
                }
            }
            let json = serde_json::to_vec(&map).unwrap_or_default();
            let mut file = (json.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&json);
            file.resize(file.len() + data_len as usize, 0);
            file
        },
    )
}

#[test]
fn header_parser_on_random_bytes() {
    let bytes = proptest::collection::vec(any::<u8>(), 0..300);
    let with_prefix =
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(n, rest)| {
            let mut f = n.to_le_bytes().to_vec();
            f.extend(rest);
            f
        });
    run(
        "header: random bytes",
        cases(3000),
        prop_oneof![bytes, with_prefix],
        |f| {
            let _ = ShardHeader::parse(&f);
            Ok(())
        },
    );
}

#[test]
fn header_parser_on_structured_headers_agrees_with_the_reference() {
    let accepted = AtomicUsize::new(0);
    run(
        "header: random entries/offsets/dtypes/shapes",
        cases(5000),
        prop_oneof![header_file(), near_valid_header_file()],
        |f| {
            match ShardHeader::parse(&f) {
                Ok(h) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    // Accepted: the reference parser accepts it too, and offsets tile the data.
                    prop_assert!(
                        safetensors::SafeTensors::deserialize(&f).is_ok(),
                        "reference rejects what we accept"
                    );
                    let data_len = f.len() as u64 - h.data_start;
                    let mut cursor = 0;
                    for t in &h.tensors {
                        prop_assert_eq!(t.begin, cursor);
                        cursor = t.end;
                    }
                    prop_assert_eq!(cursor, data_len);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        },
    );
    let accepted = accepted.load(Ordering::Relaxed);
    eprintln!(
        "fuzz header: {accepted} structured headers accepted (and checked against the reference)"
    );
    assert!(accepted > 0, "the strategy never produced a valid header");
}

#[test]
fn truncated_and_mutated_shards_never_pass() {
    let strategy = (
        small_model(),
        any::<prop::sample::Index>(),
        any::<u8>(),
        any::<bool>(),
    );
    run(
        "shard: truncate / flip a byte",
        cases(500),
        strategy,
        |(tensors, at, xor, truncate)| {
            let (m, source) = packed(&tensors, 1 << 20);
            let file = &source.files[&m.shards[0].file];
            let i = at.index(file.len());
            if truncate {
                prop_assert!(
                    ShardHeader::parse(&file[..i]).is_err(),
                    "a shard cut at {} of {} parsed",
                    i,
                    file.len()
                );
            } else {
                let mut f = file.clone();
                f[i] ^= xor | 1;
                // Parsing may succeed (a flipped data byte) but must not panic.
                let _ = ShardHeader::parse(&f);
            }
            Ok(())
        },
    );
}

#[test]
fn loader_names_the_corrupt_shard() {
    let strategy = (
        small_model(),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        0u8..3,
    );
    run(
        "loader: flip / truncate / drop a shard",
        cases(300),
        strategy,
        |(tensors, which, at, how)| {
            let (m, mut source) = packed(&tensors, 1024);
            let index = which.index(m.shards.len());
            let file = m.shards[index].file.clone();
            let bytes = source.files.get_mut(&file).expect("shard");
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] ^= 0x5a,
                1 => bytes.truncate(i),
                _ => {
                    source.files.remove(&file);
                }
            }
            let mut sink = CountingSink::default();
            let err = pollster::block_on(load(&m, &mut source, &mut sink, None, |_| {}))
                .expect_err("a damaged shard must not load");
            let named = match &err {
                LoadError::HashMismatch { index: k, .. } => how == 0 && *k == index,
                LoadError::Size { index: k, .. } => how == 1 && *k == index,
                LoadError::Source { index: k, .. } => how == 2 && *k == index,
                _ => false,
            };
            prop_assert!(named, "shard {} damaged by {}, got: {}", index, how, err);
            prop_assert!(err.to_string().contains(&file));
            let before: usize = m.shards[..index].iter().map(|s| s.tensors.len()).sum();
            prop_assert_eq!(
                sink.tensors,
                before,
                "only the shards before the bad one were placed"
            );
            Ok(())
        },
    );
}

#[test]
fn manifest_parser_on_mutated_json() {
    let strategy = (
        small_model(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        any::<Option<prop::sample::Index>>(),
    );
    run(
        "manifest: mutated / truncated JSON",
        cases(2000),
        strategy,
        |(tensors, flips, cut)| {
            let (m, _) = packed(&tensors, 1024);
            let mut json = m.to_json();
            for (at, b) in flips {
                let i = at.index(json.len());
                json[i] = b;
            }
            if let Some(cut) = cut {
                json.truncate(cut.index(json.len()));
            }
            if let Ok(parsed) = Manifest::from_json(&json) {
                // Whatever got through still satisfies every rule.
                prop_assert!(parsed.validate().is_ok());
            }
            Ok(())
        },
    );
}

#[test]
fn manifest_validation_on_random_structures() {
    let accepted = AtomicUsize::new(0);
    let sha = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 32).prop_map(|b| unifusion_weights::manifest::hex(&b)),
        1 => ".{0,70}",
    ];
    let tensor = (
        0usize..6,
        proptest::sample::select(DTYPES),
        proptest::collection::vec(dim(), 0..10),
    );
    let shard = (
        sha,
        any::<bool>(),
        prop_oneof![3 => 0u64..5000, 1 => any::<u64>()],
        proptest::collection::vec(tensor, 0..5),
    );
    let strategy = (proptest::collection::vec(shard, 0..5), 0u64..3);
    run(
        "manifest: random shards/names/sizes/versions",
        cases(3000),
        strategy,
        |(shards, version)| {
            let shards: Vec<serde_json::Value> = shards
            .into_iter()
            .map(|(sha, named_right, bytes, tensors)| {
                let file = if named_right { format!("{sha}.safetensors") } else { format!("{sha}.bin") };
                let tensors: Vec<_> = tensors
                    .into_iter()
                    .map(|(n, d, s)| serde_json::json!({"name": format!("t{n}"), "dtype": d, "shape": s}))
                    .collect();
                serde_json::json!({"file": file, "bytes": bytes, "sha256": sha, "tensors": tensors})
            })
            .collect();
            let json = serde_json::json!({
                "format": "unifusion-manifest", "format_version": version,
                "model": {"id": "m", "version": "1"}, "config": {}, "shards": shards,
            });
            let bytes = serde_json::to_vec(&json).unwrap_or_default();
            match Manifest::from_json(&bytes) {
                Ok(m) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    prop_assert_eq!(version, 1);
                    let mut names = std::collections::HashSet::new();
                    for s in &m.shards {
                        prop_assert_eq!(&s.file, &format!("{}.safetensors", s.sha256));
                        let total: u64 = s.tensors.iter().map(|t| t.byte_size()).sum();
                        prop_assert!(total + 10 <= s.bytes);
                        for t in &s.tensors {
                            prop_assert!(names.insert(t.name.clone()), "duplicate accepted");
                        }
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        },
    );
    let accepted = accepted.load(Ordering::Relaxed);
    eprintln!("fuzz manifest: {accepted} random manifests accepted");
    assert!(accepted > 0, "the strategy never produced a valid manifest");
}
