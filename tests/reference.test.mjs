// The JavaScript CPU references the browser self-test trusts, checked by hand-worked values.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { checkSelfTest, matmul, rmsNorm, worstError } from '../web/reference.js';

test('matmul of a 2x3 by a 3x2', () => {
  const out = matmul([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], 2, 3, 2);
  assert.deepEqual([...out], [58, 64, 139, 154]);
});

test('rmsNorm of [3, 4] is [3, 4] / sqrt(12.5) times the weight', () => {
  const out = rmsNorm([3, 4], [1, 2], 1, 2, 0);
  const r = Math.sqrt(12.5);
  assert.ok(Math.abs(out[0] - 3 / r) < 1e-12);
  assert.ok(Math.abs(out[1] - 8 / r) < 1e-12);
});

test('worstError flags NaN, missing output and wrong length', () => {
  assert.equal(worstError([1, 2], [1, 2]), 0);
  assert.equal(worstError([1, NaN], [1, 2]), Infinity);
  assert.equal(worstError(undefined, [1]), Infinity);
  assert.equal(worstError([1], [1, 2]), Infinity);
  assert.ok(worstError([1.001], [1]) > 1);
});

test('checkSelfTest fails a wrong kernel output', () => {
  const report = {
    shape: { rows: 1, cols: 2, out: 1 },
    eps: 0,
    x: [3, 4],
    weight: [1, 1],
    w: [1, 1],
    matmul: [7],
    rms_norm_fused: [0.6, 0.8], // unnormalised by sqrt(2): wrong
    rms_norm_reference: [3 / Math.sqrt(12.5), 4 / Math.sqrt(12.5)],
  };
  const checks = checkSelfTest(report);
  assert.deepEqual(checks.map((c) => c.pass), [true, false, true]);
});
