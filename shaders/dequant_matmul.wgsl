// Dequantize-matmul, tiled: y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / G]  (+ bias[n])
// for block-wise symmetric int8 / int4 weights (format: docs/WEIGHTS.md, "Quantized Linear
// weights"). Used when M is large enough to fill a tile; dequant_matvec.wgsl covers small M.
//
// A workgroup of 8x8 threads computes a TILE x TILE (32 x 32) block of y, each thread a 4x4
// sub-block. Per step along K it stages TK = 32 columns of x and the same 32 columns of the
// dequantized weight rows in workgroup memory (8 KiB in all), so every weight word is read from
// global memory and dequantized once per workgroup, never per output element.
//
// Weights: u32 words, row-major [N, K / PER_WORD]; element k of a row is bits
// (k % PER_WORD) * BITS .. + BITS of word k / PER_WORD, two's complement (extractBits on i32
// sign-extends). Scales: f16 pairs in u32 words, element i in half i % 2 of word i / 2
// (unpack2x16float: no shader-f16 needed). G is a multiple of 8, so no word straddles groups.
//
// Bindings follow the launch order in crates/kernels/src/dequant_matmul.rs.
// info = [M, N, K, G, has_bias, tiles_n]

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<u32>;
@group(0) @binding(2) var<storage, read_write> scales: array<u32>;
@group(0) @binding(3) var<storage, read_write> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const BITS: u32 = {{ bits }}u;
const PER_WORD: u32 = 32u / BITS;
const TILE: u32 = 32u;
const TK: u32 = 32u;
const THREADS: u32 = 64u;
const WORDS_PER_TILE_ROW: u32 = TK / PER_WORD;

var<workgroup> xs: array<f32, 1024>; // [TK][TILE]: xs[kk * TILE + m]
var<workgroup> ws: array<f32, 1024>; // [TK][TILE]: ws[kk * TILE + n]
var<workgroup> k_shared: u32;

fn scale_at(i: u32) -> f32 {
    return unpack2x16float(scales[i / 2u])[i % 2u];
}

@compute @workgroup_size(8, 8, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_id) local: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let m_rows = info[0];
    let n_cols = info[1];
    // K bounds the loop that holds the barriers: make it provably uniform.
    if lane == 0u {
        k_shared = info[2];
    }
    let k_len = workgroupUniformLoad(&k_shared);
    let group_len = info[3];
    let has_bias = info[4];
    let tiles_n = info[5];
    // Tiles beyond 65535 spill into the grid's y axis.
    let tile = workgroup_id.x + workgroup_id.y * num_workgroups.x;
    let m0 = (tile / tiles_n) * TILE;
    let n0 = (tile % tiles_n) * TILE;
    let words_per_row = k_len / PER_WORD;
    let groups_per_row = k_len / group_len;

    var acc: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < k_len; k0 += TK) {
        // x tile: 32 rows x 32 k, 16 values per thread, transposed into xs[kk][m].
        for (var idx = lane; idx < TILE * TK; idx += THREADS) {
            let m = idx / TK;
            let kk = idx % TK;
            var v = 0.0;
            if m0 + m < m_rows && k0 + kk < k_len {
                v = x[(m0 + m) * k_len + k0 + kk];
            }
            xs[kk * TILE + m] = v;
        }
        // Weight tile: 32 rows x (TK / PER_WORD) words, dequantized into ws[kk][n].
        for (var idx = lane; idx < TILE * WORDS_PER_TILE_ROW; idx += THREADS) {
            let r = idx / WORDS_PER_TILE_ROW;
            let wi = idx % WORDS_PER_TILE_ROW;
            let n = n0 + r;
            let k = k0 + wi * PER_WORD;
            if n < n_cols && k < k_len {
                let word = bitcast<i32>(weight[n * words_per_row + k / PER_WORD]);
                let s = scale_at(n * groups_per_row + k / group_len);
                for (var j = 0u; j < PER_WORD; j++) {
                    ws[(wi * PER_WORD + j) * TILE + r] = f32(extractBits(word, j * BITS, BITS)) * s;
                }
            } else {
                for (var j = 0u; j < PER_WORD; j++) {
                    ws[(wi * PER_WORD + j) * TILE + r] = 0.0;
                }
            }
        }
        workgroupBarrier();

        let mi = local.y * 4u;
        let ni = local.x * 4u;
        for (var kk = 0u; kk < TK; kk++) {
            let a = vec4<f32>(
                xs[kk * TILE + mi],
                xs[kk * TILE + mi + 1u],
                xs[kk * TILE + mi + 2u],
                xs[kk * TILE + mi + 3u],
            );
            let b = vec4<f32>(
                ws[kk * TILE + ni],
                ws[kk * TILE + ni + 1u],
                ws[kk * TILE + ni + 2u],
                ws[kk * TILE + ni + 3u],
            );
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let m = m0 + local.y * 4u + i;
        if m < m_rows {
            for (var j = 0u; j < 4u; j++) {
                let n = n0 + local.x * 4u + j;
                if n < n_cols {
                    var v = acc[i][j];
                    if has_bias != 0u {
                        v += bias[n];
                    }
                    y[m * n_cols + n] = v;
                }
            }
        }
    }
}
