// Plain-JavaScript CPU references for the device self-test, in f64. They share no code with
// the Rust/WGSL side, so agreement means the GPU path computed the right numbers.

/** Row-major `[m, k] @ [k, n]`. */
export function matmul(a, b, m, k, n) {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += a[i * k + p] * b[p * n + j];
      out[i * n + j] = s;
    }
  }
  return out;
}

/** RMSNorm over the rows of a row-major `[rows, cols]` matrix. */
export function rmsNorm(x, weight, rows, cols, eps) {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let c = 0; c < cols; c++) ss += x[r * cols + c] ** 2;
    const inv = 1 / Math.sqrt(ss / cols + eps);
    for (let c = 0; c < cols; c++) out[r * cols + c] = x[r * cols + c] * inv * weight[c];
  }
  return out;
}

/** Largest `|a - b| / (atol + rtol * |b|)`; at most 1 means every element is within tolerance. */
export function worstError(actual, expected, { rtol = 1e-4, atol = 1e-5 } = {}) {
  if (!actual || actual.length !== expected.length) return Infinity;
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    const e = Math.abs(actual[i] - expected[i]) / (atol + rtol * Math.abs(expected[i]));
    if (Number.isNaN(e)) return Infinity;
    if (e > worst) worst = e;
  }
  return worst;
}

/** Checks a self-test report from the wasm module; returns one row per computation. */
export function checkSelfTest(report) {
  const { rows, cols, out } = report.shape;
  const mm = matmul(report.x, report.w, rows, cols, out);
  const rms = rmsNorm(report.x, report.weight, rows, cols, report.eps);
  // Quantized Linears: y = x · wᵀ with w the host's dequantized weight ([n, k]).
  const quant = (report.quant ?? []).map((q) => {
    const wt = new Float64Array(q.k * q.n);
    for (let j = 0; j < q.n; j++) for (let p = 0; p < q.k; p++) wt[p * q.n + j] = q.w[j * q.k + p];
    const y = matmul(q.x, wt, q.m, q.k, q.n);
    return { name: `${q.name}, WGSL dequantize-matmul`, worst: worstError(q.kernel, y, { atol: 1e-4 }) };
  });
  return [
    { name: 'matmul (burn)', worst: worstError(report.matmul, mm) },
    { name: 'RMSNorm, fused WGSL kernel', worst: worstError(report.rms_norm_fused, rms) },
    { name: 'RMSNorm, burn tensor ops', worst: worstError(report.rms_norm_reference, rms) },
    ...quant,
  ].map((row) => ({ ...row, pass: row.worst <= 1 }));
}
