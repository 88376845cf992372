//! The loader end to end: pack into memory or a directory, load back, and every way a shard
//! can be wrong is an error that names it.

use unifusion_weights::manifest::sha256_hex;
use unifusion_weights::native::{DirOutput, DirSource, read_manifest, verify_dir};
use unifusion_weights::{
    CountingSink, Dtype, ExpectedTensor, LoadError, Manifest, MemoryOutput, MemorySource,
    ModelInfo, Packer, Phase, Progress, TensorSink, load,
};

/// Tensors with recognisable contents: element i of tensor k is k * 1000 + i.
fn tensors() -> Vec<(String, Vec<u64>, Vec<u8>)> {
    let shapes: [(&str, &[u64]); 5] = [
        ("vlm.embed.weight", &[64, 32]),
        ("vlm.layers.0.mlp.weight", &[32, 32]),
        ("generator.dit.proj.weight", &[100, 10]),
        ("generator.dit.proj.bias", &[10]),
        ("vae.decoder.conv.weight", &[8, 4, 3, 3]),
    ];
    shapes
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: u64 = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| ((k as f32) * 1000.0 + i as f32).to_le_bytes())
                .collect();
            (name.to_string(), shape.to_vec(), bytes)
        })
        .collect()
}

fn pack_to<O: unifusion_weights::PackOutput>(out: O, shard_bytes: u64) -> (Manifest, O) {
    let mut p = Packer::new(out, shard_bytes).expect("limit");
    for (name, shape, bytes) in tensors() {
        p.add(&name, Dtype::F32, &shape, &bytes).expect("add");
    }
    p.finish(
        ModelInfo {
            id: "tiny".into(),
            version: "1".into(),
        },
        serde_json::json!({"vlm": {"hidden": 32}, "sampling": {"steps": 4}}),
        None,
    )
    .expect("finish")
}

fn memory_model() -> (Manifest, MemorySource) {
    let (m, out) = pack_to(MemoryOutput::default(), 4096);
    let source = MemorySource {
        files: out.blobs.into_iter().collect(),
    };
    (m, source)
}

#[derive(Default)]
struct Collect(Vec<(String, Dtype, Vec<usize>, Vec<u8>)>);

impl TensorSink for Collect {
    type Error = std::convert::Infallible;
    fn tensor(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), Self::Error> {
        self.0
            .push((name.into(), dtype, shape.to_vec(), bytes.to_vec()));
        Ok(())
    }
}

fn run<K: TensorSink>(
    m: &Manifest,
    source: &mut MemorySource,
    sink: &mut K,
) -> Result<Vec<Progress>, LoadError> {
    let mut events = Vec::new();
    pollster::block_on(load(m, source, sink, None, |p| events.push(*p)))?;
    Ok(events)
}

#[test]
fn loads_every_tensor_in_order_with_progress() {
    let (m, mut source) = memory_model();
    assert!(m.shards.len() >= 3, "4 KiB shards split the 14 KiB model");
    let mut sink = Collect::default();
    let events = run(&m, &mut source, &mut sink).expect("load");
    let want = tensors();
    assert_eq!(sink.0.len(), want.len());
    for ((name, dtype, shape, bytes), (wname, wshape, wbytes)) in sink.0.iter().zip(&want) {
        assert_eq!(name, wname);
        assert_eq!(*dtype, Dtype::F32);
        assert_eq!(shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), *wshape);
        assert_eq!(bytes, wbytes, "{name}: bytes survive the round trip");
    }
    let last = events.last().expect("events");
    assert_eq!(last.phase, Phase::Done);
    assert_eq!(last.tensors_done, 5);
    assert_eq!(last.bytes_done, m.total_shard_bytes());
    assert!(
        events
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done)
    );
    let fetches = events.iter().filter(|p| p.phase == Phase::Fetch).count();
    assert_eq!(fetches, m.shards.len());
}

#[test]
fn a_flipped_byte_is_a_hash_mismatch_naming_the_shard() {
    let (m, mut source) = memory_model();
    let file = m.shards[1].file.clone();
    let bytes = source.files.get_mut(&file).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let mut sink = CountingSink::default();
    let err = run(&m, &mut source, &mut sink).expect_err("corrupt");
    assert!(
        matches!(&err, LoadError::HashMismatch { index: 1, file: f, .. } if *f == file),
        "{err}"
    );
    assert!(err.to_string().contains(&file));
    assert_eq!(
        sink.tensors,
        m.shards[0].tensors.len(),
        "shard 0 placed, shard 1 not"
    );
}

#[test]
fn a_truncated_shard_is_a_size_error() {
    let (m, mut source) = memory_model();
    let file = m.shards[0].file.clone();
    source.files.get_mut(&file).expect("shard").truncate(100);
    let err = run(&m, &mut source, &mut CountingSink::default()).expect_err("truncated");
    assert!(
        matches!(
            err,
            LoadError::Size {
                index: 0,
                actual: 100,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_missing_shard_is_a_source_error() {
    let (m, mut source) = memory_model();
    source.files.remove(&m.shards[2].file);
    let err = run(&m, &mut source, &mut CountingSink::default()).expect_err("missing");
    assert!(matches!(err, LoadError::Source { index: 2, .. }), "{err}");
}

#[test]
fn a_manifest_that_disagrees_with_its_shard_names_the_tensor() {
    let (mut m, mut source) = memory_model();
    m.shards[0].tensors[0].shape = vec![32, 64];
    let err = run(&m, &mut source, &mut CountingSink::default()).expect_err("shape");
    match err {
        LoadError::TensorMismatch {
            index: 0,
            tensor,
            problem,
            ..
        } => {
            assert_eq!(tensor, "vlm.embed.weight");
            assert!(problem.contains("[64, 32]"), "{problem}");
        }
        other => panic!("wrong error: {other}"),
    }
    let (mut m, mut source) = memory_model();
    m.shards[0].tensors[0].name = "vlm.renamed".into();
    let err = run(&m, &mut source, &mut CountingSink::default()).expect_err("name");
    assert!(
        err.to_string().contains("vlm.embed.weight") || err.to_string().contains("vlm.renamed"),
        "{err}"
    );
}

#[test]
fn a_valid_shard_that_is_not_safetensors_is_a_header_error() {
    let (mut m, mut source) = memory_model();
    let junk = b"not a safetensors file at all".to_vec();
    let sha = sha256_hex(&junk);
    m.shards[0].file = format!("{sha}.safetensors");
    m.shards[0].sha256 = sha;
    m.shards[0].bytes = junk.len() as u64;
    m.shards[0].tensors.clear();
    source.files.insert(m.shards[0].file.clone(), junk);
    let err = run(&m, &mut source, &mut CountingSink::default()).expect_err("junk");
    assert!(matches!(err, LoadError::Header { index: 0, .. }), "{err}");
}

#[test]
fn expected_tensors_are_checked_before_fetching() {
    let (m, _) = memory_model();
    let mut expected: Vec<ExpectedTensor> = tensors()
        .into_iter()
        .map(|(name, shape, _)| ExpectedTensor { name, shape })
        .collect();
    expected.pop();
    expected.push(ExpectedTensor {
        name: "vae.encoder.w".into(),
        shape: vec![1],
    });
    // An empty source: any fetch would fail with a Source error instead.
    let mut empty = MemorySource::default();
    let err = pollster::block_on(load(
        &m,
        &mut empty,
        &mut CountingSink::default(),
        Some(&expected),
        |_| {},
    ))
    .expect_err("mismatch");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::TensorSet(_)));
    assert!(msg.contains("missing tensors: vae.encoder.w"), "{msg}");
    assert!(
        msg.contains("unexpected tensors: vae.decoder.conv.weight"),
        "{msg}"
    );
}

#[test]
fn a_directory_round_trips_and_verify_names_a_bad_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (m, _) = pack_to(DirOutput::create(dir.path()).expect("dir"), 4096);
    let (read, at) = read_manifest(dir.path()).expect("manifest");
    assert_eq!(read, m);
    assert!(verify_dir(&read, &at).is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no temp files left behind");
    let mut sink = CountingSink::default();
    let stats = pollster::block_on(load(
        &read,
        &mut DirSource { dir: at.clone() },
        &mut sink,
        None,
        |_| {},
    ))
    .expect("load from files");
    assert_eq!(stats.tensors, 5);
    assert_eq!(
        sink.bytes,
        tensors().iter().map(|t| t.2.len() as u64).sum::<u64>()
    );

    let victim = at.join(&read.shards[1].file);
    let mut bytes = std::fs::read(&victim).expect("read");
    bytes[20] ^= 0xff;
    std::fs::write(&victim, bytes).expect("write");
    std::fs::remove_file(at.join(&read.shards[2].file)).expect("rm");
    let bad = verify_dir(&read, &at);
    let names: Vec<&str> = bad.iter().map(|b| b.file.as_str()).collect();
    assert_eq!(
        names,
        vec![read.shards[1].file.as_str(), read.shards[2].file.as_str()]
    );
    assert!(bad[0].problem.contains("sha256"), "{}", bad[0].problem);
}

#[cfg(feature = "burn")]
#[test]
fn the_burn_sink_converts_floats() {
    use unifusion_weights::burn_sink::TensorDataSink;
    let (m, mut source) = memory_model();
    let mut sink = TensorDataSink::new(Dtype::F16).expect("f16");
    run(&m, &mut source, &mut sink).expect("load");
    let (name, data) = &sink.tensors[1];
    assert_eq!(name, "vlm.layers.0.mlp.weight");
    assert_eq!(data.shape().as_slice(), &[32, 32]);
    assert_eq!(data.dtype(), burn::tensor::DType::F16);
    let values = data
        .clone()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32");
    // 1000..2047 are exact in f16.
    assert_eq!(values[..3], [1000.0, 1001.0, 1002.0]);
}
