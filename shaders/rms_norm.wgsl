// Fused RMSNorm over the last axis (Zhang & Sennrich 2019):
//   y[r, c] = x[r, c] / sqrt(mean_c(x[r, :]^2) + eps) * weight[c]
// A workgroup of WORKGROUP_SIZE threads normalises WORKGROUP_SIZE / ROW_THREADS rows; the
// ROW_THREADS threads of a row each sum squares over a strided slice of it, a tree reduction in
// workgroup memory gives the row's mean square, then every thread writes its slice. Short rows
// get few threads per row, so they do not pay for idle threads and extra barrier rounds.
// One read of x for the reduction and one for the output, against four kernels (square, mean,
// add/sqrt/divide, multiply) and three intermediate tensors in the tensor-op reference.
//
// Bindings follow the launch order in crates/kernels/src/rms_norm.rs.
// info = [rows, cols, bitcast<u32>(eps)]

@group(0) @binding(0) var<storage, read_write> input: array<f32>;
@group(0) @binding(1) var<storage, read_write> weight: array<f32>;
@group(0) @binding(2) var<storage, read_write> output: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const WORKGROUP_SIZE: u32 = {{ workgroup_size }}u;
const ROW_THREADS: u32 = {{ row_threads }}u;
const ROWS_PER_GROUP: u32 = WORKGROUP_SIZE / ROW_THREADS;

var<workgroup> partial_sums: array<f32, WORKGROUP_SIZE>;

@compute @workgroup_size({{ workgroup_size }}, 1, 1)
fn main(
    @builtin(workgroup_id) workgroup_id: vec3<u32>,
    @builtin(num_workgroups) num_workgroups: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    // Groups beyond 65535 spill into the grid's y axis.
    let group = workgroup_id.x + workgroup_id.y * num_workgroups.x;
    let slot = lane / ROW_THREADS;
    let thread = lane % ROW_THREADS;
    let row = group * ROWS_PER_GROUP + slot;
    let rows = info[0];
    let cols = info[1];
    let eps = bitcast<f32>(info[2]);
    // No early return: every thread must reach the barriers below.
    let in_range = row < rows;
    let base = row * cols;

    var sum = 0.0;
    if in_range {
        for (var c = thread; c < cols; c += ROW_THREADS) {
            let v = input[base + c];
            sum += v * v;
        }
    }
    partial_sums[lane] = sum;
    workgroupBarrier();

    for (var stride = ROW_THREADS / 2u; stride > 0u; stride = stride / 2u) {
        if thread < stride {
            partial_sums[lane] += partial_sums[lane + stride];
        }
        workgroupBarrier();
    }

    let inv_rms = inverseSqrt(partial_sums[slot * ROW_THREADS] / f32(cols) + eps);
    if in_range {
        for (var c = thread; c < cols; c += ROW_THREADS) {
            output[base + c] = input[base + c] * inv_rms * weight[c];
        }
    }
}
