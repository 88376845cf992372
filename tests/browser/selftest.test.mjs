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

// Compute precision (docs/WEIGHTS.md): 'auto' is f16 exactly where the adapter has shader-f16.
// Headless Chromium's SwiftShader adapter has none, so this covers the f32 path and the
// refusal of an explicit f16; the f16 path itself is tested natively (crates/model/tests/precision.rs).
test('auto precision follows shader-f16, and f16 without it is refused with a clear message', { timeout: 300_000 }, async (t) => {
  const session = await openPage(t, '/?autoload=0');
  const { page } = session;
  await page.waitForFunction(() => ['ok', 'error'].includes(document.body.dataset.state), null, { timeout: 120_000 });
  const state = await page.evaluate(() => window.unifusion);
  assert.equal(state.error, null, `page error: ${state.error}`);
  const hasF16 = state.adapter.features.includes('shader-f16');
  t.diagnostic(`adapter shader-f16: ${hasF16}; computing in ${state.computeDtype}`);
  assert.equal(state.adapter.shaderF16, hasF16);
  assert.equal(state.computeDtype, hasF16 ? 'f16' : 'f32');
  assert.match(await page.textContent('#selftest-summary'), new RegExp(`computing in ${state.computeDtype}`));
  if (hasF16) return; // a real GPU: no refusal to see here

  const forced = await openPage(t, '/?autoload=0&precision=f16');
  await forced.page.waitForFunction(() => ['ok', 'error'].includes(document.body.dataset.state), null, { timeout: 120_000 });
  const refused = await forced.page.evaluate(() => window.unifusion.error);
  assert.match(refused ?? '', /cannot compute in f16.*shader-f16.*use f32 or auto/, `got: ${refused}`);
});

