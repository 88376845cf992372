// The app end to end in headless Chromium (SwiftShader WebGPU): the page loads the packed tiny
// model (models/tiny, made by `unifusion make-tiny-model`) through the worker, generates,
// edits and combines images, caches the weights, works offline, never sends an image, and
// gives the same image as the native CLI (`scripts/unifusion.sh generate`, run by this file)
// for the same seed.
//
// Screenshots of the main states go to test-artifacts/browser/ (gitignored).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { ROOT, openPage } from './harness.mjs';

const ARTIFACTS = path.join(ROOT, 'test-artifacts', 'browser');
const MODEL_DIR = path.join(ROOT, 'models', 'tiny');
const MANIFEST = JSON.parse(await readFile(path.join(MODEL_DIR, 'manifest.json'), 'utf8'));
const SHARD_FILES = new Set(MANIFEST.shards.map((s) => s.file));
/** The page with the tests' model (the page's default is the trained models/demo). */
const TINY_PAGE = '/?model=models/tiny/manifest.json';
/** The request every test starts with: small, so SwiftShader finishes it in seconds. */
const REQUEST = { prompt: 'a red cube on a table', steps: 4, seed: 3, width: 64, height: 48, guidance: 4.5 };

/**
 * The native CLI's image for REQUEST on the same model (Flex: burn's pure-Rust CPU backend).
 * Started when the file loads, so it runs while Chromium starts.
 */
const nativePng = (async () => {
  const out = await mkdtemp(path.join(tmpdir(), 'unifusion-native-'));
  try {
    const png = path.join(out, 'native.png');
    await promisify(execFile)(
      'bash',
      ['scripts/unifusion.sh', 'generate', '--model', MODEL_DIR, '--prompt', REQUEST.prompt, '--steps', String(REQUEST.steps),
        '--seed', String(REQUEST.seed), '--width', String(REQUEST.width), '--height', String(REQUEST.height),
        '--guidance', String(REQUEST.guidance), '--backend', 'flex', '--quiet', '--out', png],
      { cwd: ROOT, maxBuffer: 1 << 24 },
    );
    return await readFile(png);
  } finally {
    await rm(out, { recursive: true, force: true });
  }
})();
nativePng.catch(() => {}); // awaited in the test that uses it

/** Mean and max |a − b| over the RGB channels of a native PNG and RGBA pixels, decoded in the page. */
async function compareWithPng(page, png, rgba) {
  return page.evaluate(
    async ({ png, rgba }) => {
      const bitmap = await createImageBitmap(new Blob([new Uint8Array(png)], { type: 'image/png' }));
      const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
      const ctx = canvas.getContext('2d');
      ctx.drawImage(bitmap, 0, 0);
      const want = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
      if (want.length !== rgba.length) return { size: [bitmap.width, bitmap.height], max: Infinity, mean: Infinity };
      let max = 0;
      let sum = 0;
      for (let i = 0; i < want.length; i++) {
        if (i % 4 === 3) continue;
        const d = Math.abs(want[i] - rgba[i]);
        max = Math.max(max, d);
        sum += d;
      }
      return { size: [bitmap.width, bitmap.height], max, mean: sum / ((want.length / 4) * 3) };
    },
    { png: Array.from(png), rgba },
  );
}

async function shot(page, name) {
  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/** Counts bytes the server sent per file name. */
function byteCounter() {
  const sent = new Map();
  return {
    onSent: ({ file, bytes }) => {
      const name = path.basename(file);
      sent.set(name, (sent.get(name) ?? 0) + bytes);
    },
    shardBytes: () => [...sent].filter(([n]) => SHARD_FILES.has(n)).reduce((s, [, b]) => s + b, 0),
    reset: () => sent.clear(),
  };
}

async function waitForModel(session) {
  const { page } = session;
  await page.waitForFunction(() => window.unifusion?.model || window.unifusion?.error, null, { timeout: 300_000 });
  const error = await page.evaluate(() => window.unifusion.error);
  assert.equal(error, null, `page error: ${error}\n${session.console.join('\n')}`);
}

async function fillRequest(page, r = REQUEST) {
  await page.fill('#prompt', r.prompt);
  for (const key of ['steps', 'seed', 'width', 'height', 'guidance']) await page.fill(`#${key}`, String(r[key]));
}

/** Clicks `button`, waits for the gallery to grow; returns the new result with pixel stats. */
async function runFromUi(session, button = '#generate', busyShot = null) {
  const { page } = session;
  const before = await page.evaluate(() => window.unifusion.results.length);
  await page.click(button);
  if (busyShot) {
    await page.waitForFunction(() => document.body.dataset.state === 'busy');
    assert.equal(await page.isDisabled('#cancel'), false, 'cancel is offered while it runs');
    await shot(page, busyShot);
  }
  await page.waitForFunction(
    (n) => window.unifusion.results.length > n || (window.unifusion.error && !window.unifusion.busy),
    before,
    { timeout: 300_000 },
  );
  const error = await page.evaluate(() => window.unifusion.error);
  assert.equal(error, null, `page error: ${error}\n${session.console.join('\n')}`);
  return page.evaluate(async () => {
    const r = window.unifusion.results.at(-1);
    const { readTextChunks } = await import('/web/png.js');
    const bitmap = await createImageBitmap(new Blob([r.png], { type: 'image/png' }));
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext('2d');
    ctx.drawImage(bitmap, 0, 0);
    const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
    const distinct = new Set();
    for (let i = 0; i < data.length; i += 4) distinct.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    return {
      task: r.task,
      width: bitmap.width,
      height: bitmap.height,
      distinctColours: distinct.size,
      rgba: Array.from(data),
      text: readTextChunks(r.png),
      rewriteShown: document.querySelector('#rewrite-box').hidden ? null : document.querySelector('#rewrite').textContent,
      rewrite: r.rewrite,
    };
  });
}

test('load → generate (same image as the native CLI) → reload from the cache (zero shard bytes) → offline', { timeout: 900_000 }, async (t) => {
  const bytes = byteCounter();
  const session = await openPage(t, TINY_PAGE, { onSent: bytes.onSent });
  const { page } = session;
  await page.setViewportSize({ width: 1100, height: 1250 });
  await waitForModel(session);
  const model = await page.evaluate(() => window.unifusion.model);
  assert.equal(model.shards, MANIFEST.shards.length);
  assert.ok(model.shards >= 4, 'the test model streams in several shards');
  assert.equal(model.fromCache, 0);
  const shardTotal = MANIFEST.shards.reduce((n, s) => n + s.bytes, 0);
  assert.equal(bytes.shardBytes(), shardTotal, 'each shard was downloaded once');
  assert.match(await page.textContent('#load-text'), /downloaded/);
  assert.match(await page.textContent('#selftest-summary'), /self-test passed/);
  await shot(page, '1-model-loaded');

  await fillRequest(page);
  const first = await runFromUi(session, '#generate', '2-generating');
  await shot(page, '2-generated');
  assert.equal(first.task, 'text-to-image');
  assert.equal(first.width, REQUEST.width);
  assert.equal(first.height, REQUEST.height);
  assert.ok(first.distinctColours > 50, `the image is not constant (${first.distinctColours} colours)`);
  assert.ok(first.rewrite.length > 0, 'VERIFI wrote something');
  assert.equal(first.rewriteShown, first.rewrite, 'the rewrite is shown');
  assert.equal(first.text.prompt, REQUEST.prompt, 'PNG tEXt prompt');
  assert.equal(first.text.seed, String(REQUEST.seed), 'PNG tEXt seed');
  assert.equal(first.text.rewritten_prompt, first.rewrite);
  assert.match(await page.textContent('#cache-size'), /cached files/);
  // Live preview: with 4 steps the page asks for one every step (none after the last), each
  // at the output size; the finished image replaces it.
  const previews = await page.evaluate(() => window.unifusion.previews);
  const size = { width: REQUEST.width, height: REQUEST.height };
  assert.deepEqual(previews, [size, size, size], 'live previews after steps 1, 2 and 3');
  assert.equal(await page.isHidden('#gen-preview'), true, 'the preview goes once the image is done');

  // Same seed, same image as the native CLI. f32 on two devices (SwiftShader WebGPU vs Flex on
  // the CPU) rounds a little differently; RGB8 rounding turns that into ±1 here and there
  // (measured: mean 0.007, max 1).
  const cmp = await compareWithPng(page, await nativePng, first.rgba);
  t.diagnostic(`browser vs native CLI: mean ${cmp.mean.toFixed(3)}, max ${cmp.max} (of 255)`);
  assert.deepEqual(cmp.size, [REQUEST.width, REQUEST.height]);
  assert.ok(cmp.mean <= 0.25, `mean |browser − native| = ${cmp.mean.toFixed(3)} (max ${cmp.max})`);
  assert.ok(cmp.max <= 4, `max |browser − native| = ${cmp.max} (mean ${cmp.mean.toFixed(3)})`);

  // A second visit: every shard from IndexedDB, nothing over the network; same seed, same image.
  bytes.reset();
  await page.reload();
  await waitForModel(session);
  const again = await page.evaluate(() => window.unifusion.model);
  assert.equal(again.downloadedBytes, 0);
  assert.equal(again.fromCache, MANIFEST.shards.length + 1, 'shards and tokenizer from the cache');
  assert.equal(bytes.shardBytes(), 0, 'zero shard bytes served on reload');
  await shot(page, '3-reloaded-from-cache');
  await fillRequest(page);
  const second = await runFromUi(session);
  assert.deepEqual(second.rgba, first.rgba, 'same seed, same image after a reload');

  // Offline: the server is gone; the model loads from the cache alone and still generates.
  await page.evaluate(() => navigator.serviceWorker.ready.then(() => true));
  await session.context.setOffline(true);
  session.server.close();
  session.server.closeAllConnections?.();
  const offline = await page.evaluate(async (r) => {
    const uf = window.unifusion.uf;
    const m = await uf.load('models/tiny/manifest.json');
    const g = await uf.generate(r);
    return { downloaded: m.downloadedBytes, fromCache: m.fromCache, notices: m.notices, w: g.image.width, data: Array.from(g.image.data) };
  }, REQUEST);
  assert.equal(offline.downloaded, 0);
  assert.ok(offline.notices.some((n) => /unreachable/.test(n)), offline.notices.join('; '));
  assert.deepEqual(offline.data, first.rgba, 'offline generation gives the same image');

  // The page itself opens offline too: the service worker serves the app shell, the model
  // comes from IndexedDB, and the same seed still gives the same image.
  await page.reload();
  await waitForModel(session);
  const reopened = await page.evaluate(() => window.unifusion.model);
  assert.equal(reopened.downloadedBytes, 0);
  await fillRequest(page);
  const third = await runFromUi(session);
  assert.deepEqual(third.rgba, first.rgba, 'the page reopened offline gives the same image');
  await shot(page, '3b-reopened-offline');
  assert.equal(session.pageErrors.length, 0, session.pageErrors.join('\n'));
});

/** A random-noise PNG made in the page (so no test image exists anywhere else). */
async function makePng(page, width, height, seed) {
  return Buffer.from(
    await page.evaluate(
      async ({ width, height, seed }) => {
        const canvas = new OffscreenCanvas(width, height);
        const ctx = canvas.getContext('2d');
        const img = ctx.createImageData(width, height);
        let s = seed;
        for (let i = 0; i < img.data.length; i++) {
          s = (s * 1103515245 + 12345) >>> 0;
          img.data[i] = i % 4 === 3 ? 255 : s >>> 24;
        }
        ctx.putImageData(img, 0, 0);
        return Array.from(new Uint8Array(await (await canvas.convertToBlob({ type: 'image/png' })).arrayBuffer()));
      },
      { width, height, seed },
    ),
  );
}

test('edit one uploaded image, combine two (picker, drop, paste), vary one; no image byte leaves the page', { timeout: 900_000 }, async (t) => {
  const server = [];
  const session = await openPage(t, TINY_PAGE);
  session.server.on('request', (req) => {
    const entry = { method: req.method, url: req.url, bodyBytes: 0 };
    req.on('data', (chunk) => (entry.bodyBytes += chunk.length));
    server.push(entry);
  });
  const { page } = session;
  await page.setViewportSize({ width: 1100, height: 1350 });
  await waitForModel(session);
  const a = await makePng(page, 40, 30, 1);
  const b = await makePng(page, 24, 36, 2);
  const c = await makePng(page, 32, 32, 3);

  // 1. The file picker.
  await page.setInputFiles('#image-input', { name: 'a.png', mimeType: 'image/png', buffer: a });
  // 2. Drag and drop; 3. paste.
  await page.evaluate(
    ({ b, c }) => {
      const file = (bytes, name) => new File([new Uint8Array(bytes)], name, { type: 'image/png' });
      const drop = new DataTransfer();
      drop.items.add(file(b, 'b.png'));
      document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: drop, bubbles: true, cancelable: true }));
      const paste = new DataTransfer();
      paste.items.add(file(c, 'c.png'));
      document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: paste, bubbles: true, cancelable: true }));
    },
    { b: Array.from(b), c: Array.from(c) },
  );
  assert.equal(await page.locator('#inputs li').count(), 3);
  assert.match(await page.textContent('#generate'), /Combine 3 images/);
  await shot(page, '4-three-inputs');

  // Two images: multi-reference.
  await page.click('#inputs li:nth-child(3) button');
  assert.match(await page.textContent('#generate'), /Combine 2 images/);
  await fillRequest(page, { ...REQUEST, prompt: 'put the first pattern on the second' });
  const multi = await runFromUi(session);
  assert.equal(multi.task, 'multi-reference');
  assert.equal(multi.width, REQUEST.width);
  assert.ok(multi.distinctColours > 50);
  await shot(page, '5-multi-reference');

  // One image: edit.
  await page.click('#inputs li:nth-child(2) button');
  assert.match(await page.textContent('#generate'), /^Edit$/);
  await fillRequest(page, { ...REQUEST, prompt: 'make it blue' });
  const edit = await runFromUi(session);
  assert.equal(edit.task, 'edit');
  assert.ok(edit.distinctColours > 50);
  assert.equal(edit.text.task, 'edit');
  assert.notDeepEqual(edit.rgba, multi.rgba);
  await shot(page, '6-edit');

  // The same image, no prompt: a variation.
  const variation = await runFromUi(session, '#variation');
  assert.equal(variation.task, 'variation');
  assert.equal(variation.text.prompt, '');
  assert.ok(variation.distinctColours > 50);

  // Privacy: everything the browser asked for was a GET of the app or the model, without a body;
  // the server agrees (it saw every request, from the page and the worker).
  assert.ok(session.requests.some((r) => r.url.includes('/models/tiny/')), 'the request log sees the model fetches');
  for (const r of session.requests) {
    const url = new URL(r.url);
    if (url.protocol === 'blob:' || url.protocol === 'data:') {
      // Object URLs of the page's own thumbnails and gallery: read in memory, never sent.
      assert.equal(url.origin, new URL(session.base).origin, r.url);
      continue;
    }
    assert.equal(r.method, 'GET', `${r.method} ${r.url}`);
    assert.equal(r.body, null, `a request body was sent to ${r.url}`);
    assert.equal(url.origin, new URL(session.base).origin, `request to another origin: ${r.url}`);
    assert.match(url.pathname, /^\/(|web\/.*|models\/.*)$/, r.url);
    // The one query string is the test's own choice of model in the page's address.
    if (r.url !== new URL(TINY_PAGE, session.base).href) assert.equal(url.search, '', `query string sent: ${r.url}`);
  }
  assert.ok(server.length > 0);
  for (const r of server) {
    assert.ok(['GET', 'HEAD'].includes(r.method), `${r.method} ${r.url}`);
    assert.equal(r.bodyBytes, 0, `${r.url} carried a body`);
  }
  assert.equal(session.pageErrors.length, 0, session.pageErrors.join('\n'));
});

test('refuses a model too large for the adapter before downloading it; cancel; recovery from a lost device reloads from the cache', { timeout: 600_000 }, async (t) => {
  const bytes = byteCounter();
  const session = await openPage(t, '/?autoload=0', { onSent: bytes.onSent });
  const { page } = session;
  await page.waitForFunction(() => window.unifusion?.uf || window.unifusion?.error, null, { timeout: 300_000 });
  const refused = await page.evaluate(async () => {
    try {
      await window.unifusion.uf.load('models/tiny/manifest.json', { limits: { maxStorageBufferBindingSize: 1024 } });
      return null;
    } catch (e) {
      return { code: e.code, message: e.message };
    }
  });
  assert.equal(refused?.code, 'too-large', JSON.stringify(refused));
  assert.match(refused.message, /does not fit this GPU/);
  assert.equal(bytes.shardBytes(), 0, 'nothing downloaded');

  const out = await page.evaluate(async () => {
    const uf = window.unifusion.uf;
    const r = { prompt: 'x', steps: 2, width: 32, height: 32, verifi: false, guidance: 1 };
    const cold = await uf.load('models/tiny/manifest.json');
    // Cancel: the promise rejects at once with an AbortError; the worker stops at its next step.
    const control = new AbortController();
    const cancelled = uf.generate(r, { signal: control.signal }).then(() => 'finished', (e) => e.name);
    control.abort();
    const cancelName = await cancelled;
    // A lost device: a new worker (a new WebGPU device), the model reloaded from the cache.
    const notices = [];
    uf.onNotice = (n) => notices.push(n);
    await uf.recover();
    const g = await uf.generate(r);
    // A real loss: the device destroyed under the model (as a driver reset would). The next
    // generate fails inside the worker, the facade sees device-lost, recovers and retries.
    await uf.loseDevice();
    const lost = await uf.generate(r);
    return {
      cold: cold.downloadedBytes, cancelName, reloaded: uf.model, notices, size: [g.image.width, g.image.height],
      lostSize: [lost.image.width, lost.image.height], lostData: Array.from(lost.image.data), data: Array.from(g.image.data),
    };
  });
  assert.ok(out.cold > 0);
  assert.equal(out.cancelName, 'AbortError');
  assert.equal(out.reloaded.downloadedBytes, 0, 'recovery reloads from the cache');
  assert.equal(out.reloaded.fromCache, MANIFEST.shards.length + 1);
  assert.equal(out.notices.length, 2, out.notices.join('; '));
  assert.match(out.notices[1], /device was lost/, 'the real loss was recognised as one');
  assert.match(out.notices[1], /poisoned/i, "the worker saw cubecl's lost-device error");
  assert.deepEqual(out.size, [32, 32]);
  assert.deepEqual(out.lostSize, [32, 32]);
  assert.deepEqual(out.lostData, out.data, 'after the loss, the same request gives the same image');
});

test('without WebGPU the page says so plainly and loads nothing', { timeout: 120_000 }, async (t) => {
  const bytes = byteCounter();
  const session = await openPage(t, '/?app=0', { onSent: bytes.onSent });
  const { page } = session;
  await page.addInitScript(() => delete Navigator.prototype.gpu);
  await page.goto(new URL('/', session.base).href);
  await page.waitForFunction(() => document.body.dataset.state === 'error');
  assert.match(await page.textContent('#status'), /no WebGPU/);
  assert.equal(await page.isDisabled('#generate'), true);
  assert.equal(bytes.shardBytes(), 0);
  await shot(page, '0-no-webgpu');
});

test('a storage quota too small for the model: it loads uncached, says so, and generates', { timeout: 600_000 }, async (t) => {
  const session = await openPage(t, '/?app=0');
  const { page } = session;
  // A real quota (Chromium's own override), so the worker's IndexedDB writes really fail.
  const cdp = await session.context.newCDPSession(page);
  await cdp.send('Storage.overrideQuotaForOrigin', { origin: new URL(session.base).origin, quotaSize: 64 * 1024 });
  await page.setViewportSize({ width: 1100, height: 1000 });
  await page.goto(new URL(TINY_PAGE, session.base).href);
  await waitForModel(session);
  const model = await page.evaluate(() => window.unifusion.model);
  assert.equal(model.cached, false);
  assert.match(await page.textContent('#notices'), /quota is full/);
  assert.match(await page.textContent('#load-text'), /not cached/);
  await shot(page, '7-quota-full');
  await fillRequest(page, { ...REQUEST, steps: 2 });
  const out = await runFromUi(session);
  assert.equal(out.width, REQUEST.width);
  assert.ok(out.distinctColours > 50);
});

test('the default page serves the trained demo model: its defaults fill the form and it draws what the native CLI draws', { timeout: 900_000 }, async (t) => {
  const demo = JSON.parse(await readFile(path.join(ROOT, 'models', 'demo', 'manifest.json'), 'utf8'));
  const defaults = demo.config.pipeline.defaults;
  const prompt = 'a big red circle in the top left and a small blue square in the bottom right, on a white background';
  const native = (async () => {
    const out = await mkdtemp(path.join(tmpdir(), 'unifusion-demo-'));
    try {
      const png = path.join(out, 'demo.png');
      await promisify(execFile)('bash', ['scripts/unifusion.sh', 'generate', '--prompt', prompt, '--seed', '0', '--backend', 'flex', '--quiet', '--out', png],
        { cwd: ROOT, maxBuffer: 1 << 24 });
      return await readFile(png);
    } finally {
      await rm(out, { recursive: true, force: true });
    }
  })();
  const session = await openPage(t, '/');
  const { page } = session;
  await page.setViewportSize({ width: 1100, height: 1250 });
  await waitForModel(session);
  const model = await page.evaluate(() => window.unifusion.model);
  assert.equal(model.id, demo.model.id);
  assert.deepEqual(model.defaults, defaults);
  for (const key of ['width', 'height', 'steps', 'guidance']) {
    assert.equal(Number(await page.inputValue(`#${key}`)), defaults[key], `#${key} starts at the model's default`);
  }
  await page.fill('#prompt', prompt);
  await page.fill('#seed', '0');
  const result = await runFromUi(session);
  await shot(page, '6-demo-model');
  assert.equal(result.width, defaults.width);
  assert.equal(result.height, defaults.height);
  const png = await native;
  const cmp = await compareWithPng(page, png, result.rgba);
  t.diagnostic(`demo model, browser vs native CLI: mean ${cmp.mean.toFixed(3)}, max ${cmp.max} (of 255); rewrite: ${result.rewrite}`);
  assert.ok(cmp.mean <= 0.25, `mean |browser − native| = ${cmp.mean.toFixed(3)} (max ${cmp.max})`);
  assert.ok(cmp.max <= 4, `max |browser − native| = ${cmp.max} (mean ${cmp.mean.toFixed(3)})`);
  assert.equal(session.pageErrors.length, 0, session.pageErrors.join('\n'));
});
