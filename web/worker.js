// The module worker that owns the WebGPU device and the model, so the page never blocks.
//
// Protocol (all messages carry the caller's `id`; `web/unifusion.js` is the only client):
//   page → worker  {id, type: 'init'}                       → capabilities + device self-test
//                  {id, type: 'load', manifestUrl, options}  → model summary; 'progress' events
//                  {id, type: 'run', request, images}        → image + rewrite; 'step' events
//                  {id, type: 'cacheInfo' | 'clearCache'}
//                  {type: 'cancel', id}                      → stops that call (handled at once)
//   worker → page  {id, type: 'progress' | 'step', value}
//                  {id, type: 'result', value} | {id, type: 'error', error: {name, code, message}}
// Calls run one at a time, in order. burn allows one WebGPU device per JS realm: a lost device
// means a new worker (the page's facade does that and reloads the model from the cache).
import init, { initDevice, loadModel, loseDevice, runTask, selftest, unloadModel } from './pkg/unifusion_web.js';
import { cacheInfo, clearCache, loadWeights } from './weights.js';

/** id → AbortController of the calls not finished yet. */
const calls = new Map();
let queue = Promise.resolve();
let capabilities = null;

self.onmessage = ({ data }) => {
  if (data.type === 'cancel') {
    calls.get(data.id)?.abort(new DOMException('cancelled', 'AbortError'));
    return;
  }
  const control = new AbortController();
  calls.set(data.id, control);
  queue = queue.then(() => handle(data, control.signal)).finally(() => calls.delete(data.id));
};

async function handle(message, signal) {
  const { id, type } = message;
  const emit = (kind, value) => self.postMessage({ id, type: kind, value });
  try {
    signal.throwIfAborted();
    let value;
    if (type === 'init') value = await initialise(message.precision);
    else if (type === 'load') value = await load(message, signal, (p) => emit('progress', p));
    else if (type === 'run') value = await run(message, signal, (s) => emit('step', s));
    else if (type === 'cacheInfo') value = await cacheInfo();
    else if (type === 'clearCache') value = await clearCache();
    else if (type === 'loseDevice') value = loseDevice();
    else throw new Error(`unknown call ${type}`);
    self.postMessage({ id, type: 'result', value });
  } catch (error) {
    self.postMessage({ id, type: 'error', error: describe(error, signal) });
  }
}

// A Rust panic is printed by console_error_panic_hook, then the wasm call traps with a bare
// "unreachable": keep the printed message to say what happened.
let lastPanic = null;
const consoleError = console.error.bind(console);
console.error = (...args) => {
  lastPanic = args.map(String).join(' ');
  consoleError(...args);
};

function describe(error, signal) {
  if (signal.aborted) return { name: 'AbortError', code: 'cancelled', message: 'Cancelled.' };
  const trap = error instanceof WebAssembly.RuntimeError;
  const message = trap && lastPanic ? lastPanic : String(error?.message ?? error);
  lastPanic = null;
  // burn/wgpu say these in their own words. After any of them (or a trap) the wasm state is not
  // to be trusted: the page replaces the worker and reloads the model from the cache.
  if (/out of memory|OutOfMemory/i.test(message)) {
    return { name: 'Error', code: 'out-of-memory', message: `The GPU ran out of memory (${message}). Try a smaller size or fewer images.` };
  }
  // A lost device: wgpu's words, or cubecl's after the device's `lost` callback fired
  // ("The device is poisoned" / "was poisoned during launch").
  if (/device (is |was |has been )?(lost|poisoned)|DeviceLost|lost the device/i.test(message)) {
    return { name: 'Error', code: 'device-lost', message };
  }
  if (trap) return { name: 'Error', code: 'wasm-trap', message: `The model stopped with an internal error: ${message}` };
  return { name: error?.name ?? 'Error', code: error?.code ?? null, message };
}

// ---------------------------------------------------------------------------------------------
// Device

/**
 * Starts WebGPU and burn's device in `precision` ('auto': f16 where the adapter has
 * `shader-f16`, f32 otherwise; 'f16' is refused without it; 'f32'). The first call decides;
 * later calls return the same capabilities.
 */
async function initialise(precision = 'auto') {
  if (capabilities) return capabilities;
  if (!('gpu' in navigator)) {
    throw Object.assign(new Error('This browser has no WebGPU.'), { code: 'no-webgpu' });
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) {
    throw Object.assign(new Error('WebGPU is present but no GPU adapter is available.'), { code: 'no-adapter' });
  }
  const info = adapter.info ?? {};
  const limits = {};
  for (const key in adapter.limits) limits[key] = adapter.limits[key];
  const features = [...adapter.features].sort();
  await init();
  // burn requests every adapter feature for its device, so `shader-f16` here is on the device.
  const computeDtype = await initDevice(precision);
  const report = await selftest(37, 300, 19);
  capabilities = {
    adapter: {
      vendor: info.vendor,
      architecture: info.architecture,
      device: info.device,
      description: info.description,
      isFallbackAdapter: info.isFallbackAdapter,
    },
    limits,
    features,
    shaderF16: features.includes('shader-f16'),
    // What the model computes in, as the device reports it (docs/WEIGHTS.md, "Compute
    // precision"): weights are placed on the GPU in this dtype.
    computeDtype,
    selftest: report,
  };
  return capabilities;
}

/** The VLM's embedding and lm_head are kept in vocabulary blocks of at most this many bytes
 *  (the model crate's `MAX_BINDING_BYTES`, WebGPU's default binding limit), never as one buffer. */
const VOCAB_BLOCK_BYTES = 128 << 20;
const VOCAB_MATRIX = /^vlm\..*(embed_tokens|lm_head)\.weight$/;

/**
 * Refuses a model this adapter cannot hold, before anything is downloaded. Every float tensor
 * is placed in the compute dtype (`bytesPerFloat`: 4 for f32, 2 for f16), so its device size is
 * elements × bytesPerFloat; it must fit one storage binding (the vocabulary matrices only block
 * by block).
 */
export function checkFits(manifest, limits, bytesPerFloat = 4) {
  const maxBinding = Math.min(limits.maxStorageBufferBindingSize ?? Infinity, limits.maxBufferSize ?? Infinity);
  let largest = { name: null, bytes: 0 };
  let total = 0;
  for (const shard of manifest.shards) {
    for (const t of shard.tensors ?? []) {
      const elements = t.shape.reduce((n, d) => n * d, 1);
      const bytes = elements * bytesPerFloat;
      total += bytes;
      const buffer = VOCAB_MATRIX.test(t.name) ? Math.min(bytes, VOCAB_BLOCK_BYTES) : bytes;
      if (buffer > largest.bytes) largest = { name: t.name, bytes: buffer };
    }
  }
  if (largest.bytes > maxBinding) {
    const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;
    throw Object.assign(
      new Error(
        `This model does not fit this GPU: tensor ${largest.name} needs a ${mb(largest.bytes)} buffer, ` +
          `but the adapter allows at most ${mb(maxBinding)} per buffer. Use a smaller model or another GPU/browser.`,
      ),
      { code: 'too-large' },
    );
  }
  return { largestTensorBytes: largest.bytes, deviceBytes: total };
}

// ---------------------------------------------------------------------------------------------
// Loading: weights.js fetches (or takes from IndexedDB) and verifies shards, the Rust loader
// pulls them one at a time. A shard handed over is held by JS only until Rust has copied it,
// so at most `concurrency` shards sit in host memory.

async function load({ manifestUrl, options = {} }, signal, progress) {
  const caps = await initialise();
  unloadModel();
  const stop = new AbortController();
  const abort = () => stop.abort(signal.reason);
  signal.addEventListener('abort', abort, { once: true });

  const arrived = new Map(); // index → {bytes, taken: resolve}
  const waiting = new Map(); // index → {resolve, reject}
  let failure = null;
  const fail = (error) => {
    failure ??= error;
    for (const w of waiting.values()) w.reject(failure);
    waiting.clear();
    stop.abort(failure);
  };
  let manifestReady;
  const manifestPromise = new Promise((resolve, reject) => (manifestReady = { resolve, reject }));
  let tokenizerReady;
  const tokenizerPromise = new Promise((resolve, reject) => (tokenizerReady = { resolve, reject }));

  const state = {
    phase: 'manifest',
    bytesDone: 0,
    bytesTotal: 0,
    downloadedBytes: 0,
    fromCache: 0,
    shardsPlaced: 0,
    shards: 0,
    tensorsDone: 0,
    tensorsTotal: 0,
  };
  let lastPost = 0;
  const post = (force = false) => {
    const now = performance.now();
    if (!force && now - lastPost < 50) return;
    lastPost = now;
    progress({ ...state });
  };

  const weights = loadWeights(manifestUrl, {
    signal: stop.signal,
    concurrency: options.concurrency ?? 4,
    cache: options.cache ?? true,
    onManifest: (manifest) => {
      const fit = checkFits(manifest, { ...caps.limits, ...(options.limits ?? {}) }, caps.computeDtype === 'f16' ? 2 : 4);
      manifestReady.resolve({ manifest, fit });
    },
    onProgress: (p) => {
      if (p.phase === 'notice') {
        progress({ ...state, phase: 'notice', notice: p.notice });
        return;
      }
      const phaseChanged = p.phase === 'shards' && state.phase === 'manifest';
      if (state.phase === 'manifest' && p.phase === 'shards') state.phase = 'download';
      Object.assign(state, {
        bytesDone: p.bytesDone,
        bytesTotal: p.bytesTotal,
        downloadedBytes: p.downloadedBytes,
        fromCache: p.fromCache,
      });
      post(phaseChanged);
    },
    onShard: async (entry, bytes, index) => {
      if (index < 0) {
        tokenizerReady.resolve(bytes);
        return;
      }
      await new Promise((taken, reject) => {
        const w = waiting.get(index);
        if (w) {
          waiting.delete(index);
          w.resolve(bytes);
          taken();
        } else {
          arrived.set(index, { bytes, taken, reject });
        }
        stop.signal.addEventListener('abort', () => reject(stop.signal.reason), { once: true });
      });
    },
  }).catch((error) => {
    manifestReady.reject(error);
    tokenizerReady.reject(error);
    fail(error);
    throw error;
  });
  weights.catch(() => {}); // awaited below; this only keeps an early failure from being "unhandled"

  const fetchShard = (index) => {
    if (failure) return Promise.reject(failure);
    const hit = arrived.get(index);
    if (hit) {
      arrived.delete(index);
      hit.taken();
      return Promise.resolve(hit.bytes);
    }
    return new Promise((resolve, reject) => waiting.set(index, { resolve, reject }));
  };

  try {
    const { manifest, fit } = await manifestPromise;
    const tokenizer = manifest.tokenizer ? await tokenizerPromise : null;
    if (!tokenizer) throw new Error('The model manifest names no tokenizer; it cannot be run.');
    const manifestBytes = new TextEncoder().encode(JSON.stringify(manifest));
    const onLoaderProgress = (p) => {
      state.phase = p.phase === 'done' ? 'done' : state.bytesDone < state.bytesTotal ? 'download' : 'place';
      state.shardsPlaced = p.phase === 'done' ? p.shards : p.shard;
      state.shards = p.shards;
      state.tensorsDone = p.tensorsDone;
      state.tensorsTotal = p.tensorsTotal;
      post(p.phase === 'done');
    };
    const summary = await loadModel(manifestBytes, tokenizer, fetchShard, onLoaderProgress).catch((error) => {
      const e = failure ?? error;
      fail(e);
      throw e;
    });
    const result = await weights;
    state.phase = 'done';
    post(true);
    return {
      ...summary,
      manifestUrl: new URL(manifestUrl, self.location.href).href,
      deviceBytes: fit.deviceBytes,
      fromCache: result.fromCache,
      downloadedBytes: result.downloadedBytes,
      cached: result.cached,
      notices: result.notices,
    };
  } catch (error) {
    unloadModel();
    weights.catch(() => {});
    throw error;
  } finally {
    signal.removeEventListener('abort', abort);
  }
}

// ---------------------------------------------------------------------------------------------
// Running

async function run({ request, images = [] }, signal, step) {
  const started = performance.now();
  let firstStep = null;
  const result = await runTask(request, images, (s) => {
    firstStep ??= performance.now();
    step(s);
    return !signal.aborted;
  });
  signal.throwIfAborted();
  const ms = performance.now() - started;
  return {
    ...result,
    timings: { totalMs: ms, beforeFirstStepMs: firstStep == null ? null : firstStep - started },
  };
}
