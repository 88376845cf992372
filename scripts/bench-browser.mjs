#!/usr/bin/env node
// Browser benchmark: weight streaming and generation in headless Chromium (SwiftShader WebGPU)
// against their baselines, on the same machine in one run.
//
//   node scripts/bench-browser.mjs [--stream-mib 256] [--shard-mib 16] [--size 128] [--steps 2,10]
//                                  [--parts stream,model,steps]
//
// 1. Streaming (web/weights.js, in the page, random shards of --shard-mib): raw HTTP
//    throughput (fetch + read every byte, nothing else) vs a cold load (fetch, sha256, store in
//    IndexedDB) of the same bytes from the same server, a warm (cached) load, and peak memory
//    during the cold load: the page's JS heap (CDP `JSHeapUsedSize`, sampled every 25 ms) and
//    the summed RSS of Chromium's processes above their idle level (from /proc, every 25 ms).
// 2. The model (models/tiny through the worker): cold and warm load time.
// 3. Per-step DiT time at --size × --size: the time of a run with the larger step count minus
//    the smaller, over the difference (VERIFI, CFG setup and VAE cancel out); the same for the
//    native CLI on wgpu (lavapipe, and Chromium's SwiftShader Vulkan when present) and Flex.
// Prints a Markdown table for docs/BENCHMARKS.md.
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

import { createServer, listen } from './serve.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, fallback) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1] : fallback;
};
const STREAM_MIB = Number(opt('stream-mib', '256'));
const SHARD_MIB = Number(opt('shard-mib', '16'));
const PARTS = new Set(opt('parts', 'stream,model,steps').split(','));
const SIZE = Number(opt('size', '128'));
const [STEPS_LO, STEPS_HI] = opt('steps', '2,10').split(',').map(Number);
const FLAGS = ['--no-sandbox', '--enable-unsafe-webgpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage', '--enable-precise-memory-info'];
const PROMPT = 'a red cube on a table';
const run = promisify(execFile);
const mb = (n) => n / 1e6;

/** Summed RSS (bytes) of the Chromium started with `profile` and all its descendants. */
async function chromiumRss(profile) {
  const procs = new Map(); // pid → {ppid, cmd, rss}
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      const status = await readFile(`/proc/${pid}/status`, 'utf8');
      const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8');
      procs.set(pid, {
        ppid: /PPid:\s+(\d+)/.exec(status)?.[1],
        cmd,
        rss: Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024,
      });
    } catch {
      // the process ended
    }
  }
  const mine = new Set([...procs].filter(([, p]) => p.cmd.includes(profile)).map(([pid]) => pid));
  for (let grew = true; grew; ) {
    grew = false;
    for (const [pid, p] of procs) {
      if (!mine.has(pid) && mine.has(p.ppid)) {
        mine.add(pid);
        grew = true;
      }
    }
  }
  return [...mine].reduce((n, pid) => n + procs.get(pid).rss, 0);
}

async function makeStreamModel(dir) {
  await mkdir(path.join(dir, 'stream'), { recursive: true });
  const shards = [];
  let left = STREAM_MIB << 20;
  while (left > 0) {
    const size = Math.min(left, SHARD_MIB << 20);
    const data = randomBytes(size); // random: the browser's storage would compress zeros
    const sha256 = createHash('sha256').update(data).digest('hex');
    await writeFile(path.join(dir, 'stream', `${sha256}.safetensors`), data);
    shards.push({ file: `${sha256}.safetensors`, bytes: size, sha256, tensors: [] });
    left -= size;
  }
  const manifest = { format: 'unifusion-manifest', format_version: 1, model: { id: 'stream', version: '1' }, config: {}, shards };
  await writeFile(path.join(dir, 'stream', 'manifest.json'), JSON.stringify(manifest));
  // The tiny model beside it, so one server serves both.
  await run('cp', ['-r', path.join(ROOT, 'models', 'tiny'), path.join(dir, 'tiny')]);
}

async function sampler(page, profile) {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Performance.enable');
  const idle = await chromiumRss(profile);
  let peakHeap = 0;
  let peakRss = 0;
  let on = true;
  const loop = (async () => {
    while (on) {
      const { metrics } = await cdp.send('Performance.getMetrics');
      peakHeap = Math.max(peakHeap, metrics.find((m) => m.name === 'JSHeapUsedSize')?.value ?? 0);
      peakRss = Math.max(peakRss, await chromiumRss(profile));
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  return async () => {
    on = false;
    await loop;
    return { peakHeap, peakRssAboveIdle: peakRss - idle };
  };
}

async function browserBench(models) {
  const server = createServer({ root: ROOT, models });
  const base = await listen(server, 0);
  const profile = await mkdtemp(path.join(tmpdir(), 'unifusion-bench-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: FLAGS,
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    await page.goto(new URL('/?autoload=0', base).href);
    await page.waitForFunction(() => window.unifusion?.uf || window.unifusion?.error, null, { timeout: 600_000 });
    const out = {};
    if (PARTS.has('stream')) await streamBench(page, profile, out);
    if (PARTS.has('model')) out.model = await modelBench(page);
    if (PARTS.has('steps')) out.steps = await stepsBench(page);
    return out;
  } finally {
    await context.close();
    server.close();
    await rm(profile, { recursive: true, force: true });
  }
}

/** Raw HTTP, then the cold and warm loads of the same bytes; memory during the cold load. */
async function streamBench(page, profile, out) {
  out.raw = await page.evaluate(async () => {
    const m = await (await fetch('/models/stream/manifest.json')).json();
    const t0 = performance.now();
    let bytes = 0;
    for (const s of m.shards) {
      const reader = (await fetch(`/models/stream/${s.file}`, { cache: 'no-store' })).body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        bytes += value.byteLength;
      }
    }
    return { bytes, ms: performance.now() - t0 };
  });
  const stop = await sampler(page, profile);
  out.cold = await page.evaluate(async () => {
    const { loadWeights } = await import('/web/weights.js');
    const t0 = performance.now();
    const r = await loadWeights('/models/stream/manifest.json', { onShard: () => {} });
    return { ms: performance.now() - t0, downloaded: r.downloadedBytes, cached: r.cached };
  });
  out.memory = await stop();
  out.warm = await page.evaluate(async () => {
    const { loadWeights } = await import('/web/weights.js');
    const t0 = performance.now();
    const r = await loadWeights('/models/stream/manifest.json', { onShard: () => {} });
    return { ms: performance.now() - t0, downloaded: r.downloadedBytes, fromCache: r.fromCache };
  });
}

/** The model through the worker: cold, then warm (from IndexedDB). */
async function modelBench(page) {
  return page.evaluate(async () => {
    const uf = window.unifusion.uf;
    const t0 = performance.now();
    const cold = await uf.load('/models/tiny/manifest.json');
    const t1 = performance.now();
    const warm = await uf.load('/models/tiny/manifest.json');
    const t2 = performance.now();
    return { coldMs: t1 - t0, warmMs: t2 - t1, bytes: cold.bytes, shards: cold.shards, warmDownloaded: warm.downloadedBytes };
  });
}

/** Generation at two step counts (a warm-up run first: shader compilation). */
async function stepsBench(page) {
  return page.evaluate(
    async ({ size, lo, hi, prompt }) => {
      const uf = window.unifusion.uf;
      const gen = async (steps) => {
        const t0 = performance.now();
        await uf.generate({ prompt, steps, seed: 1, width: size, height: size });
        return performance.now() - t0;
      };
      await gen(lo);
      const tLo = await gen(lo);
      const tHi = await gen(hi);
      return { tLo, tHi };
    },
    { size: SIZE, lo: STEPS_LO, hi: STEPS_HI, prompt: PROMPT },
  );
}

async function nativeRun(steps, backend, env = {}) {
  const dir = await mkdtemp(path.join(tmpdir(), 'unifusion-bench-native-'));
  try {
    const t0 = performance.now();
    await run(
      'bash',
      ['scripts/unifusion.sh', 'generate', '--model', 'models/tiny', '--prompt', PROMPT, '--steps', String(steps), '--seed', '1',
        '--width', String(SIZE), '--height', String(SIZE), '--backend', backend, '--quiet', '--out', path.join(dir, 'x.png')],
      { cwd: ROOT, env: { ...process.env, ...env }, maxBuffer: 1 << 24 },
    );
    return performance.now() - t0;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function nativeBench(backend, env) {
  await nativeRun(STEPS_LO, backend, env); // build and warm-up
  const tLo = await nativeRun(STEPS_LO, backend, env);
  const tHi = await nativeRun(STEPS_HI, backend, env);
  return { tLo, tHi };
}

const perStep = ({ tLo, tHi }) => (tHi - tLo) / (STEPS_HI - STEPS_LO);

async function main() {
  const models = await mkdtemp(path.join(tmpdir(), 'unifusion-bench-models-'));
  try {
    await makeStreamModel(models);
    const b = await browserBench(models);
    const native = {};
    if (PARTS.has('steps')) {
      native.lavapipe = await nativeBench('wgpu', {});
      native.flex = await nativeBench('flex', {});
      const swiftshaderIcd = '/usr/lib/chromium/vk_swiftshader_icd.json';
      if (existsSync(swiftshaderIcd)) native.swiftshader = await nativeBench('wgpu', { VK_ICD_FILENAMES: swiftshaderIcd });
    }

    const rate = (bytes, ms) => (mb(bytes) / (ms / 1000)).toFixed(1);
    const lines = [
      `Measured ${new Date().toISOString().slice(0, 10)}, Chromium ${await chromiumVersion()}, headless, SwiftShader WebGPU.`,
      '',
      '| what | ours | baseline | ratio |',
      '|---|---:|---:|---:|',
    ];
    if (b.raw) {
      lines.push(
        `| cold load, ${STREAM_MIB} MiB in ${SHARD_MIB} MiB random shards (fetch + sha256 + IndexedDB), MB/s vs raw HTTP of the same bytes | ${rate(b.raw.bytes, b.cold.ms)} | ${rate(b.raw.bytes, b.raw.ms)} | ${(b.raw.ms / b.cold.ms).toFixed(2)}× |`,
        `| warm (cached) load of the same ${STREAM_MIB} MiB, s (downloaded: ${b.warm.downloaded} bytes) | ${(b.warm.ms / 1000).toFixed(2)} | cold ${(b.cold.ms / 1000).toFixed(2)} | ${(b.cold.ms / b.warm.ms).toFixed(2)}× |`,
        `| peak JS heap of the page during the cold load, MB | ${mb(b.memory.peakHeap).toFixed(1)} | largest shard ${(SHARD_MIB * 1.048576).toFixed(1)} MB | — |`,
        `| peak RSS of Chromium's processes above idle during the cold load, MB | ${mb(b.memory.peakRssAboveIdle).toFixed(1)} | whole model ${(STREAM_MIB * 1.048576).toFixed(0)} MB | — |`,
      );
    }
    if (b.model) {
      lines.push(
        `| models/tiny (${b.model.shards} shards, ${mb(b.model.bytes).toFixed(2)} MB) through the worker: cold load, ms | ${b.model.coldMs.toFixed(0)} | — | — |`,
        `| models/tiny warm load (from IndexedDB), ms (downloaded: ${b.model.warmDownloaded} bytes) | ${b.model.warmMs.toFixed(0)} | — | — |`,
      );
    }
    if (b.steps) {
      lines.push(
        `| DiT step at ${SIZE}×${SIZE}, CFG on, ms: browser (SwiftShader WebGPU) vs native wgpu on lavapipe | ${perStep(b.steps).toFixed(0)} | ${perStep(native.lavapipe).toFixed(0)} | ${(perStep(native.lavapipe) / perStep(b.steps)).toFixed(2)}× |`,
      );
    }
    if (native.swiftshader) {
      lines.push(`| DiT step, browser vs native wgpu on the same SwiftShader (Vulkan ICD) | ${perStep(b.steps).toFixed(0)} | ${perStep(native.swiftshader).toFixed(0)} | ${(perStep(native.swiftshader) / perStep(b.steps)).toFixed(2)}× |`);
    }
    if (native.flex) {
      lines.push(`| DiT step, browser vs native Flex (CPU) | ${perStep(b.steps).toFixed(0)} | ${perStep(native.flex).toFixed(0)} | ${(perStep(native.flex) / perStep(b.steps)).toFixed(2)}× |`);
    }
    lines.push('', `Raw runs (ms): ${JSON.stringify({ browser: b, native })}`);
    console.log(lines.join('\n'));
  } finally {
    await rm(models, { recursive: true, force: true });
  }
}

async function chromiumVersion() {
  try {
    const { stdout } = await run(process.env.CHROMIUM ?? '/usr/bin/chromium', ['--version']);
    return stdout.trim().split(/\s+/).find((w) => /^\d+\./.test(w)) ?? '?';
  } catch {
    return '?';
  }
}

main().catch((error) => {
  console.error(`bench-browser: ${error.stack ?? error}`);
  process.exit(1);
});
