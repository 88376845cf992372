// Headless Chromium loads the served page, whose model worker runs burn on the browser's
// WebGPU (the fused WGSL RMSNorm kernel and a matmul); the numbers are checked here against plain
// JavaScript arithmetic. Needs `web/pkg` (scripts/build-wasm.sh) and /usr/bin/chromium.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { checkSelfTest, rmsNorm } from '../../web/reference.js';
import { openPage } from './harness.mjs';

test('the page runs burn on WebGPU and its numbers match a CPU reference', { timeout: 300_000 }, async (t) => {
  // autoload=0: the device report and self-test only (the app tests load the model).
  const session = await openPage(t, '/?autoload=0');
  const { page } = session;
  await page.waitForFunction(
    () => ['ok', 'error'].includes(document.body.dataset.state),
    null,
    { timeout: 120_000 },
  );
  const state = await page.evaluate(() => window.unifusion);
  assert.equal(state.error, null, `page error: ${state.error}; console: ${session.console.join('\n')}`);

  // A real WebGPU adapter was reported (SwiftShader in headless Chromium).
  assert.ok(state.adapter.limits.maxStorageBufferBindingSize > 0);
  assert.ok(Array.isArray(state.adapter.features));

  // The fused kernel really ran (a non-wgpu device would give null) and every number agrees.
  const report = state.selftest;
  assert.ok(Array.isArray(report.rms_norm_fused), 'the fused WGSL kernel did not run');
  // The int8 / int4 dequantize-matmul kernels ran too (mat-vec and dequant + matmul).
  assert.equal(report.quant.length, 4);
  for (const q of report.quant) assert.ok(Array.isArray(q.kernel), `${q.name}: the kernel did not run`);
  for (const check of checkSelfTest(report)) {
    assert.ok(check.pass, `${check.name}: worst error ${check.worst} of tolerance`);
  }
  // The fixture is not degenerate: normalising changes the values.
  const { rows, cols } = report.shape;
  const expected = rmsNorm(report.x, report.weight, rows, cols, report.eps);
  assert.ok(expected.some((v, i) => Math.abs(v - report.x[i]) > 0.1));

  // And the page says so.
  assert.match(await page.textContent('#status'), /self-test passed/);
  assert.match(await page.textContent('#selftest-summary'), /self-test passed/);
  assert.equal(session.pageErrors.length, 0, session.pageErrors.join('\n'));
});
