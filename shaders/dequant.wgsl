// Dequantize block-wise int8 / int4 weights to f32: w[n, k] = q[n, k] * s[n, k / G].
// Weights and scales as in dequant_matmul.wgsl (docs/WEIGHTS.md, "Quantized Linear weights").
// For many rows of x (prefill) the dequantize-matmul runs as this kernel plus the backend's
// tuned f32 matmul: the weight is expanded once per call instead of once per output tile, which
// on lavapipe beats the one-pass tiled kernel (docs/BENCHMARKS.md, "Quantized Linears").
//
// One thread per u32 word (PER_WORD weights); words beyond 65535 workgroups spill into y.
// Bindings follow the launch order in crates/kernels/src/dequant_matmul.rs.
// info = [N, K, G]

@group(0) @binding(0) var<storage, read_write> weight: array<u32>;
@group(0) @binding(1) var<storage, read_write> scales: array<u32>;
@group(0) @binding(2) var<storage, read_write> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const BITS: u32 = {{ bits }}u;
const PER_WORD: u32 = 32u / BITS;
const WORKGROUP_SIZE: u32 = 256u;

@compute @workgroup_size(256, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let n_rows = info[0];
    let k_len = info[1];
    let group_len = info[2];
    let words_per_row = k_len / PER_WORD;
    let i = (workgroup_id.x + workgroup_id.y * num_workgroups.x) * WORKGROUP_SIZE + lane;
    if i >= n_rows * words_per_row {
        return;
    }
    let n = i / words_per_row;
    let k = (i % words_per_row) * PER_WORD;
    let s_index = n * (k_len / group_len) + k / group_len;
    let s = unpack2x16float(scales[s_index / 2u])[s_index % 2u];
    let word = bitcast<i32>(weight[i]);
    for (var j = 0u; j < PER_WORD; j++) {
        w[n * k_len + k + j] = f32(extractBits(word, j * BITS, BITS)) * s;
    }
}
