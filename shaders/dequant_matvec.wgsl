// Dequantize-matmul for few rows of x (decode steps, M <= ROWS):
//   y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / G]  (+ bias[n])
// Weights and scales as in dequant_matmul.wgsl (docs/WEIGHTS.md, "Quantized Linear weights").
//
// The cost is reading the weights, so each weight word is read once for all ROWS rows of x.
// A workgroup of 64 threads owns COLS = 8 output columns; the LANES = 8 threads of a column
// walk its weight row word by word, interleaved (adjacent threads read adjacent words), sum
// q * x per word and apply the word's group scale once, then the 8 partial sums are reduced in
// workgroup memory. Grid: x, y = column blocks (spilling past 65535 into y), z = blocks of ROWS
// rows of x.
//
// Bindings follow the launch order in crates/kernels/src/dequant_matmul.rs.
// info = [M, N, K, G, has_bias, column_blocks]

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<u32>;
@group(0) @binding(2) var<storage, read_write> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const BITS: u32 = {{ bits }}u;
const PER_WORD: u32 = 32u / BITS;
const LANES: u32 = 8u;
const COLS: u32 = 8u;
const ROWS: u32 = {{ rows }}u;

var<workgroup> partial: array<f32, 512>; // [ROWS <= 8][COLS * LANES]

fn scale_at(i: u32) -> f32 {
    return unpack2x16float(scales[i / 2u])[i % 2u];
}

@compute @workgroup_size(64, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane_index: u32,
) {
    let m_rows = info[0];
    let n_cols = info[1];
    let k_len = info[2];
    let group_len = info[3];
    let has_bias = info[4];
    let column_blocks = info[5];
    let block = workgroup_id.x + workgroup_id.y * num_workgroups.x;
    let col = lane_index / LANES;
    let lane = lane_index % LANES;
    let n = block * COLS + col;
    let m0 = workgroup_id.z * ROWS;
    let words_per_row = k_len / PER_WORD;
    let groups_per_row = k_len / group_len;
    // No early return: every thread must reach the barriers below.
    let in_range = n < n_cols && block < column_blocks;

    var acc: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        acc[r] = 0.0;
    }
    if in_range {
        let rows = min(ROWS, m_rows - m0);
        for (var wi = lane; wi < words_per_row; wi += LANES) {
            let word = bitcast<i32>(weight[n * words_per_row + wi]);
            let k = wi * PER_WORD;
            let s = scale_at(n * groups_per_row + k / group_len);
            var q: array<f32, PER_WORD>;
            for (var j = 0u; j < PER_WORD; j++) {
                q[j] = f32(extractBits(word, j * BITS, BITS));
            }
            for (var r = 0u; r < rows; r++) {
                let base = (m0 + r) * k_len + k;
                var sum = 0.0;
                for (var j = 0u; j < PER_WORD; j++) {
                    sum += x[base + j] * q[j];
                }
                acc[r] += sum * s;
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        partial[r * 64u + lane_index] = acc[r];
    }
    workgroupBarrier();
    for (var stride = LANES / 2u; stride > 0u; stride = stride / 2u) {
        if lane < stride {
            for (var r = 0u; r < ROWS; r++) {
                partial[r * 64u + lane_index] += partial[r * 64u + lane_index + stride];
            }
        }
        workgroupBarrier();
    }
    if in_range && lane == 0u {
        for (var r = 0u; r < ROWS; r++) {
            let m = m0 + r;
            if m < m_rows {
                var v = partial[r * 64u + lane_index];
                if has_bias != 0u {
                    v += bias[n];
                }
                y[m * n_cols + n] = v;
            }
        }
    }
}
