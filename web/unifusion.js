// UniFusion in the browser: the main-thread API over the model worker (`web/worker.js`).
// Types: `web/unifusion.d.ts`. No image leaves the page: images are decoded here into RGBA
// bytes and handed to the worker; only weights are fetched.
//
//   const uf = await UniFusion.create();
//   await uf.load('models/tiny/manifest.json', { onProgress, signal });
//   const { image, rewrite } = await uf.generate({ prompt, steps, seed }, { onStep, signal });

/** Largest side an input image is scaled down to before it goes to the worker (the VLM tiles
 *  it to 448-px tiles anyway; this bounds host memory for camera-sized photos). */
export const MAX_INPUT_SIDE = 2048;

/** Defaults of a generation; the model may restrict sizes to multiples of `sizeMultiple`. */
export const DEFAULTS = Object.freeze({ steps: 8, guidance: 4.5, seed: 0, width: 256, height: 256 });

const abortError = () => new DOMException('The operation was cancelled.', 'AbortError');

/** An error from the worker, with its stable `code` (e.g. `device-lost`, `too-large`). */
export class UniFusionError extends Error {
  constructor({ name, code, message }) {
    super(message);
    this.name = name && name !== 'Error' ? name : 'UniFusionError';
    this.code = code ?? null;
  }
}

export class UniFusion {
  #worker = null;
  #workerUrl;
  #next = 1;
  #pending = new Map();
  #manifestUrl = null;
  #loadOptions = {};
  #recovering = null;
  #precision = 'auto';
  /** What `init` reported: adapter, limits, features, shaderF16, self-test. */
  capabilities = null;
  /** The loaded model's summary, or null. */
  model = null;
  /** Called with a notice string when the facade recovers from a lost device. */
  onNotice = () => {};

  constructor(workerUrl, precision) {
    this.#workerUrl = workerUrl;
    this.#precision = precision;
  }

  /**
   * Starts the worker, initialises WebGPU there (computing in `precision`: 'auto' = f16 where
   * the adapter has shader-f16, else f32; 'f16' is refused without it) and runs the device
   * self-test.
   */
  static async create({ workerUrl = new URL('./worker.js', import.meta.url), precision = 'auto' } = {}) {
    const uf = new UniFusion(workerUrl, precision);
    await uf.#start();
    return uf;
  }

  async #start() {
    this.#worker = new Worker(this.#workerUrl, { type: 'module', name: 'unifusion' });
    this.#worker.onmessage = ({ data }) => this.#receive(data);
    this.#worker.onerror = (event) => {
      // An uncaught error kills the worker's wasm state (a trap, a panic): fail every call.
      event.preventDefault?.();
      this.#failAll({ name: 'Error', code: 'worker-crashed', message: `The model worker stopped: ${event.message ?? 'unknown error'}` });
    };
    this.capabilities = await this.#call('init', { precision: this.#precision });
  }

  #receive({ id, type, value, error }) {
    const call = this.#pending.get(id);
    if (!call) return; // cancelled on this side already
    if (type === 'progress' || type === 'step') {
      try {
        call.onEvent?.(value);
      } catch (e) {
        console.error(e);
      }
      return;
    }
    this.#pending.delete(id);
    call.cleanup();
    if (type === 'result') call.resolve(value);
    else call.reject(new UniFusionError(error));
  }

  #failAll(error) {
    for (const [id, call] of this.#pending) {
      this.#pending.delete(id);
      call.cleanup();
      call.reject(new UniFusionError(error));
    }
  }

  #call(type, payload = {}, { signal, onEvent, transfer = [] } = {}) {
    if (signal?.aborted) return Promise.reject(abortError());
    const id = this.#next++;
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        if (!this.#pending.delete(id)) return;
        this.#worker.postMessage({ type: 'cancel', id });
        reject(abortError());
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      const cleanup = () => signal?.removeEventListener('abort', onAbort);
      this.#pending.set(id, { resolve, reject, onEvent, cleanup });
      this.#worker.postMessage({ id, type, ...payload }, transfer);
    });
  }

  /**
   * Loads a model: fetches `manifest.json`, refuses a model the GPU cannot hold, streams and
   * verifies shards (IndexedDB cache first) and places them on the GPU one at a time.
   */
  async load(manifestUrl, { onProgress, signal, concurrency, cache, limits } = {}) {
    const url = new URL(manifestUrl, globalThis.location?.href).href;
    // `limits` overrides adapter limits (tests use it to check the refusal of a model too large).
    const options = { concurrency, cache, limits };
    this.model = null;
    const summary = await this.#withRecovery(() =>
      this.#call('load', { manifestUrl: url, options }, { signal, onEvent: onProgress }),
    );
    this.#manifestUrl = url;
    this.#loadOptions = options;
    this.model = summary;
    return summary;
  }

  /** Text to image. */
  generate(params, options) {
    return this.#run('text-to-image', params, [], options);
  }

  /** Edit one image by an instruction; with two or more images, a multi-reference run. */
  async edit({ images, ...params }, options) {
    const decoded = await Promise.all((images ?? []).map((i) => decodeImage(i)));
    if (decoded.length === 0) throw new UniFusionError({ message: 'edit needs at least one image' });
    const task = params.zeroShotPercent != null ? 'zero-shot-edit' : decoded.length === 1 ? 'edit' : 'multi-reference';
    return this.#run(task, params, decoded, options);
  }

  /** Variations of one or more images (no prompt). */
  async variation({ images, ...params }, options) {
    const decoded = await Promise.all((images ?? []).map((i) => decodeImage(i)));
    if (decoded.length === 0) throw new UniFusionError({ message: 'variation needs at least one image' });
    return this.#run('variation', { ...params, prompt: '' }, decoded, options);
  }

  async #run(task, params, images, { onStep, signal } = {}) {
    if (!this.model) throw new UniFusionError({ message: 'No model is loaded yet.' });
    const request = {
      task,
      prompt: params.prompt ?? '',
      steps: params.steps ?? DEFAULTS.steps,
      guidance: params.guidance ?? DEFAULTS.guidance,
      seed: params.seed ?? DEFAULTS.seed,
      width: params.width ?? DEFAULTS.width,
      height: params.height ?? DEFAULTS.height,
    };
    if (params.verifi != null) request.verifi = params.verifi;
    if (params.zeroShotPercent != null) request.zeroShotPercent = params.zeroShotPercent;
    if (params.previewEvery != null) request.previewEvery = params.previewEvery;
    if (!Number.isSafeInteger(request.seed) || request.seed < 0) {
      throw new UniFusionError({ message: `seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}` });
    }
    const result = await this.#withRecovery(() =>
      // Copies, not transfers: a retry after a lost device needs the bytes again.
      this.#call('run', { request, images }, { signal, onEvent: onStep }),
    );
    return {
      image: { width: result.width, height: result.height, data: new Uint8ClampedArray(result.data.buffer) },
      rewrite: result.rewrite,
      rewriteTokens: result.rewriteTokens,
      request,
      timings: result.timings,
    };
  }

  /**
   * Runs `call`; when the GPU device is lost (or the worker dies), starts a fresh worker,
   * reloads the last model from the cache and tries once more.
   */
  async #withRecovery(call) {
    try {
      return await call();
    } catch (error) {
      if (error?.code === 'out-of-memory') {
        // Plainly reported, not retried (the same request would run out again); the device
        // is rebuilt so the next request starts clean.
        await this.recover('The GPU ran out of memory; the model was reloaded from the cache.');
        throw error;
      }
      if (!['device-lost', 'worker-crashed', 'wasm-trap'].includes(error?.code)) throw error;
      await this.recover(`The GPU device was lost or the model crashed (${error.message}); reloading the model from the cache.`);
      return call();
    }
  }

  /** Replaces the worker (and so the WebGPU device) and reloads the model, if there was one. */
  async recover(notice = 'Restarting the GPU device; reloading the model from the cache.') {
    this.#recovering ??= (async () => {
      this.onNotice(notice);
      this.#failAll({ name: 'Error', code: 'device-lost', message: 'The GPU device was reset.' });
      this.#worker?.terminate();
      await this.#start();
      if (this.#manifestUrl) {
        this.model = await this.#call('load', { manifestUrl: this.#manifestUrl, options: this.#loadOptions });
      }
    })().finally(() => (this.#recovering = null));
    return this.#recovering;
  }

  /**
   * Destroys the worker's WebGPU device, as a driver reset would (for tests of recovery): the
   * next call finds the device lost, and the facade recovers as it does from a real loss.
   */
  loseDevice() {
    return this.#call('loseDevice');
  }

  /** What the weight cache holds. */
  cacheInfo() {
    return this.#call('cacheInfo');
  }

  /** Empties the weight cache (a loaded model stays usable until the page reloads). */
  clearCache() {
    return this.#call('clearCache');
  }

  /** Stops the worker and frees the GPU. */
  dispose() {
    this.#failAll({ name: 'AbortError', code: 'cancelled', message: 'disposed' });
    this.#worker?.terminate();
    this.#worker = null;
  }
}

/**
 * Decodes an image source (File/Blob, ImageBitmap, ImageData, <img>, canvas, or
 * `{width, height, data, channels?}`) into RGBA bytes, scaled down to at most
 * `MAX_INPUT_SIDE` a side. Runs entirely in the page.
 */
export async function decodeImage(source, maxSide = MAX_INPUT_SIDE) {
  if (source && typeof source.width === 'number' && source.data && !(source instanceof ImageData)) {
    const channels = source.channels ?? 4;
    return { width: source.width, height: source.height, channels, data: new Uint8Array(source.data) };
  }
  let bitmap;
  try {
    bitmap = source instanceof ImageBitmap ? source : await createImageBitmap(source);
  } catch (error) {
    throw new UniFusionError({ message: `That file is not an image this browser can decode (${error?.message ?? error}).` });
  }
  const scale = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
  const width = Math.max(1, Math.round(bitmap.width * scale));
  const height = Math.max(1, Math.round(bitmap.height * scale));
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0, width, height);
  const { data } = ctx.getImageData(0, 0, width, height);
  return { width, height, channels: 4, data: new Uint8Array(data.buffer) };
}
