// Types of web/unifusion.js: UniFusion in the browser, over the model worker.

/** Where a model load is. Every number is a count, never text to parse. */
export interface LoadProgress {
  /** `manifest`: fetching manifest.json; `download`: shards arriving (network or cache);
   *  `place`: the last shards going onto the GPU; `done`; `notice`: see `notice`. */
  phase: 'manifest' | 'download' | 'place' | 'done' | 'notice';
  /** Shard bytes received so far (from the network or the cache) / all shard bytes. */
  bytesDone: number;
  bytesTotal: number;
  /** Of `bytesDone`, how many came over the network (0 on a cached visit). */
  downloadedBytes: number;
  /** Shards (and tokenizer) taken from the IndexedDB cache. */
  fromCache: number;
  /** Shards placed on the GPU / shards in the model. */
  shardsPlaced: number;
  shards: number;
  tensorsDone: number;
  tensorsTotal: number;
  /** With phase `notice`: something the user should know (e.g. "not caching: quota full"). */
  notice?: string;
}

/** One sampling step, finished on the GPU (the worker waits for each), or a preview. */
export interface StepProgress {
  /** Steps done (1 after the first) / steps in all. */
  done: number;
  total: number;
  /** The noise level reached. */
  sigma: number;
  /** Which condition the step used (`image-tokens`/`text-tokens` in a zero-shot edit). */
  phase?: 'full' | 'image-tokens' | 'text-tokens';
  /** Present on preview events (every `previewEvery` steps): the clean image the model
   * predicts at this step, RGBA. Step events have `sigma` and `phase` instead. */
  preview?: { width: number; height: number; data: Uint8Array };
}

export interface ModelSummary {
  id: string;
  version: string;
  /** Output width and height must be multiples of this. */
  sizeMultiple: number;
  taps: number[];
  maxRewriteTokens: number;
  /** The model's own sampler defaults (`pipeline.defaults` in its config), or null. */
  defaults: { width: number; height: number; steps: number; guidance: number } | null;
  shards: number;
  /** Bytes of all shards. */
  bytes: number;
  /** Bytes the weights take on the GPU (every float tensor as f32). */
  deviceBytes: number;
  manifestUrl: string;
  /** Files taken from the cache, bytes fetched over the network, whether it was cached. */
  fromCache: number;
  downloadedBytes: number;
  cached: boolean;
  notices: string[];
}

export interface Capabilities {
  adapter: { vendor?: string; architecture?: string; device?: string; description?: string; isFallbackAdapter?: boolean };
  limits: Record<string, number>;
  features: string[];
  /** The adapter has `shader-f16`. */
  shaderF16: boolean;
  /** What the model computes in: f16 (weights on the GPU as f16, norms and sampler state in
   *  f32) where the adapter has `shader-f16` and f16 was allowed, f32 otherwise. */
  computeDtype: 'f32' | 'f16';
  /** The device self-test's raw report (checked by web/reference.js). */
  selftest: unknown;
}

/** RGBA (or RGB with `channels: 3`) pixels, row-major. */
export interface RawImage {
  width: number;
  height: number;
  channels?: 3 | 4;
  data: Uint8Array | Uint8ClampedArray;
}

/** Anything the page can decode: files from a picker, drop or paste, bitmaps, canvases, raw pixels. */
export type ImageInput = Blob | ImageBitmap | ImageData | HTMLImageElement | HTMLCanvasElement | OffscreenCanvas | RawImage;

export interface GenerateParams {
  prompt: string;
  /** Euler steps (default 8). */
  steps?: number;
  /** Classifier-free guidance weight; 1 turns CFG off (default 4.5). */
  guidance?: number;
  /** Seed of the initial noise, 0 … 2^53−1 (default 0). Same seed, same image. */
  seed?: number;
  /** Output size in pixels, multiples of `ModelSummary.sizeMultiple` (default 256×256). */
  width?: number;
  height?: number;
  /** VERIFI rewrite on (default) or off. */
  verifi?: boolean;
  /** Hand `onStep` a preview of the predicted image every this many steps (default: none). */
  previewEvery?: number;
}

export interface EditParams extends GenerateParams {
  /** One image: edit. Two or more: multi-reference. */
  images: ImageInput[];
  /** Zero-shot edit: share (percent) of the steps that see only the image tokens. */
  zeroShotPercent?: number;
}

export interface VariationParams extends Omit<GenerateParams, 'prompt'> {
  images: ImageInput[];
}

export interface RunOptions {
  onStep?: (step: StepProgress) => void;
  signal?: AbortSignal;
}

export interface LoadOptions {
  onProgress?: (progress: LoadProgress) => void;
  signal?: AbortSignal;
  /** Parallel shard downloads (default 4). */
  concurrency?: number;
  /** Use the IndexedDB cache (default true). */
  cache?: boolean;
  /** Overrides of the adapter's limits (a test hook: check the refusal of a model too large). */
  limits?: Record<string, number>;
}

export interface Generation {
  /** RGBA pixels of the requested size. */
  image: { width: number; height: number; data: Uint8ClampedArray };
  /** The VLM's rewrite of the request (VERIFI); empty with `verifi: false`. */
  rewrite: string;
  rewriteTokens: number;
  /** The request as the worker ran it (task, prompt, steps, guidance, seed, size). */
  request: { task: string; prompt: string; steps: number; guidance: number; seed: number; width: number; height: number };
  timings: { totalMs: number; beforeFirstStepMs: number | null };
}

export interface CacheInfo {
  shards: number;
  bytes: number;
  manifests: { url: string; modelId: string | null; version: string | null }[];
  usage: number | null;
  quota: number | null;
  persisted: boolean;
}

/** An error with a stable `code`: `no-webgpu`, `no-adapter`, `too-large`, `out-of-memory`,
 *  `device-lost`, `worker-crashed`, `wasm-trap`, `hash`, `http`, `network`, `bad-manifest`,
 *  `cancelled`, or null. A lost device, crash or trap is retried once on a new worker. */
export class UniFusionError extends Error {
  code: string | null;
}

export const MAX_INPUT_SIDE: number;
export const DEFAULTS: Readonly<Required<Pick<GenerateParams, 'steps' | 'guidance' | 'seed' | 'width' | 'height'>>>;

export class UniFusion {
  /** Starts the worker, initialises WebGPU there and runs the device self-test. */
  /** `precision`: 'auto' (default) computes in f16 where the adapter has `shader-f16` and in
   *  f32 elsewhere; 'f16' is refused (the promise rejects) on an adapter without it. */
  static create(options?: { workerUrl?: string | URL; precision?: 'auto' | 'f32' | 'f16' }): Promise<UniFusion>;
  readonly capabilities: Capabilities | null;
  readonly model: ModelSummary | null;
  /** Told when the facade recovers from a lost GPU device. */
  onNotice: (notice: string) => void;
  load(manifestUrl: string | URL, options?: LoadOptions): Promise<ModelSummary>;
  generate(params: GenerateParams, options?: RunOptions): Promise<Generation>;
  edit(params: EditParams, options?: RunOptions): Promise<Generation>;
  variation(params: VariationParams, options?: RunOptions): Promise<Generation>;
  /** Destroys the worker's WebGPU device, as a driver reset would (for tests of recovery). */
  loseDevice(): Promise<void>;
  cacheInfo(): Promise<CacheInfo>;
  clearCache(): Promise<void>;
  /** Replaces the worker (and the WebGPU device) and reloads the last model from the cache. */
  recover(notice?: string): Promise<void>;
  dispose(): void;
}

/** Decodes an image in the page into RGBA bytes, at most `maxSide` (default 2048) a side. */
export function decodeImage(source: ImageInput, maxSide?: number): Promise<RawImage>;
