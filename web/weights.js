// Weight streaming and caching for the browser: fetch a model manifest, then its shards in
// parallel with byte progress; verify every shard's sha256 before use; keep verified shards in
// IndexedDB keyed by their hash, so a second visit downloads nothing.
//
// What users of other in-browser model runners complain about, and what this module does
// about it:
// - interrupted downloads poison the cache  → only verified bytes are ever stored; a cached
//   shard is re-verified on every load and refetched if it no longer matches;
// - a dropped connection restarts a 64 MiB shard → the received prefix is kept and the rest
//   is requested with an HTTP Range request (also across page loads, from IndexedDB);
// - QuotaExceededError stops everything → loading goes on uncached, with a notice;
// - silent re-downloads → a cache hit is counted and reported in the progress events;
// - progress as text to parse → structured events (phase, bytes, shards).
// Host memory stays bounded: at most `concurrency` shards are in memory at once, and the
// consumer (`onShard`) is awaited before another shard starts.
//
// The manifest format is documented in docs/WEIGHTS.md; this module needs only each shard's
// `file`, `bytes` and `sha256` (and the tokenizer's, when present).
// Works in a window and in a Web Worker (IndexedDB, fetch and crypto.subtle exist in both).

const DB_NAME = 'unifusion-weights';
/** IndexedDB schema version; bump with a migration in `openCache` when stores change. */
export const DB_VERSION = 1;
const SHARDS = 'shards'; // sha256 → { sha256, size, data: Blob, storedAt }
const MANIFESTS = 'manifests'; // manifest URL → { url, modelId, version, hashes: [sha256], storedAt }
const PARTIALS = 'partials'; // sha256 → { sha256, data: Blob } — a verified-later prefix
/** Prefixes smaller than this are not worth keeping for a resume. */
const MIN_PARTIAL_BYTES = 1 << 20;
const MAX_RETRIES = 4;
const HEX64 = /^[0-9a-f]{64}$/;

/** An error the UI can show as is. `code` is stable for programs. */
export class WeightsError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'WeightsError';
    this.code = code;
    Object.assign(this, details);
  }
}

// ---------------------------------------------------------------------------------------------
// IndexedDB

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new DOMException('transaction aborted', 'AbortError'));
  });
}

/** Opens (and creates or migrates) the cache database. */
export async function openCache() {
  const open = indexedDB.open(DB_NAME, DB_VERSION);
  open.onupgradeneeded = (event) => {
    const db = open.result;
    // Version 0 → 1: the three stores. Later versions add their steps below this one.
    if (event.oldVersion < 1) {
      db.createObjectStore(SHARDS, { keyPath: 'sha256' });
      db.createObjectStore(MANIFESTS, { keyPath: 'url' });
      db.createObjectStore(PARTIALS, { keyPath: 'sha256' });
    }
  };
  return request(open);
}

async function get(db, store, key) {
  return request(db.transaction(store).objectStore(store).get(key));
}

async function put(db, store, value) {
  const tx = db.transaction(store, 'readwrite');
  tx.objectStore(store).put(value);
  await done(tx);
}

async function remove(db, store, key) {
  const tx = db.transaction(store, 'readwrite');
  tx.objectStore(store).delete(key);
  await done(tx);
}

function isQuotaError(error) {
  return error?.name === 'QuotaExceededError';
}

// ---------------------------------------------------------------------------------------------
// Hashing and fetching

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Checks the parts of a manifest this module relies on; throws a WeightsError naming the field. */
export function checkManifest(manifest) {
  const bad = (what) => {
    throw new WeightsError('bad-manifest', `The model manifest is malformed: ${what}.`);
  };
  if (!manifest || typeof manifest !== 'object') bad('not a JSON object');
  if (manifest.format !== 'unifusion-manifest') bad('"format" is not "unifusion-manifest"');
  if (manifest.format_version !== 1) bad(`unsupported format_version ${manifest.format_version}`);
  if (!Array.isArray(manifest.shards) || manifest.shards.length === 0) bad('no shards');
  // The tokenizer first: the model loader needs it before the first shard.
  const files = manifest.tokenizer ? [manifest.tokenizer, ...manifest.shards] : manifest.shards;
  const seen = new Set();
  for (const [i, s] of files.entries()) {
    if (!s || typeof s.file !== 'string' || !HEX64.test(s.sha256 ?? '')) bad(`entry ${i} lacks a file or sha256`);
    if (!Number.isSafeInteger(s.bytes) || s.bytes < 0) bad(`${s.file}: bad byte count`);
    if (s.file.includes('/') || s.file.includes('\\') || s.file.startsWith('.')) bad(`${s.file}: not a plain file name`);
    if (seen.has(s.sha256)) bad(`${s.file}: listed twice`);
    seen.add(s.sha256);
  }
  return files;
}

/**
 * Downloads `entry` (starting from `prefix`, the bytes already received), resuming with Range
 * requests after a dropped connection. Returns the complete bytes, not yet verified.
 */
async function download(url, entry, prefix, { signal, onBytes, onPartial }) {
  const out = new Uint8Array(entry.bytes);
  let received = 0;
  if (prefix && prefix.byteLength < entry.bytes) {
    out.set(prefix);
    received = prefix.byteLength;
    onBytes(received, { resumed: true });
  }
  let failures = 0;
  // A failed attempt: retry, or give up keeping what arrived (for a Range resume next time).
  const failed = async (cause) => {
    if (signal?.aborted || ++failures > MAX_RETRIES) {
      await onPartial(out.subarray(0, received));
      throw signal?.aborted ? cause : networkError(entry, cause);
    }
  };
  while (received < entry.bytes || entry.bytes === 0) {
    const headers = received > 0 ? { Range: `bytes=${received}-` } : {};
    let response;
    try {
      response = await fetch(url, { headers, signal, cache: 'no-store' });
    } catch (error) {
      await failed(error);
      continue;
    }
    if (received > 0 && response.status === 200) {
      // The server ignored the range: start over.
      onBytes(-received);
      received = 0;
    } else if (response.status !== (received > 0 ? 206 : 200)) {
      throw new WeightsError('http', `Downloading ${entry.file} failed: HTTP ${response.status}.`, { file: entry.file });
    }
    if (entry.bytes === 0) return out;
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { done: finished, value } = await reader.read();
        if (finished) break;
        if (received + value.byteLength > entry.bytes) {
          throw new WeightsError('size', `${entry.file} is larger than the manifest says (${entry.bytes} bytes).`, {
            file: entry.file,
          });
        }
        out.set(value, received);
        received += value.byteLength;
        onBytes(value.byteLength);
      }
    } catch (error) {
      if (error instanceof WeightsError) throw error;
      await failed(error);
      continue; // resume from `received`
    }
    if (received < entry.bytes) await failed(new Error('connection closed early'));
  }
  return out;
}

function networkError(entry, cause) {
  return new WeightsError('network', `Downloading ${entry.file} failed: ${cause?.message ?? cause}. Check the connection and try again; what was received is kept.`, {
    file: entry.file,
    cause,
  });
}

// ---------------------------------------------------------------------------------------------
// Loading

/**
 * Loads a model's weights.
 *
 * @param {string} manifestUrl absolute or page-relative URL of `manifest.json`
 * @param {object} options
 * @param {(event: object) => void} [options.onProgress] structured progress:
 *   `{phase: 'manifest'|'shards'|'done'|'notice', bytesDone, bytesTotal, shardsDone, shardsTotal,
 *     fromCache, downloadedBytes, notice?}`
 * @param {(entry: object, bytes: Uint8Array, index: number) => (void|Promise<void>)} [options.onShard]
 *   receives each verified shard (and the tokenizer, index -1); awaited before the next starts
 * @param {(manifest: object) => (void|Promise<void>)} [options.onManifest] sees the checked
 *   manifest before any shard is fetched; throwing refuses the model (nothing is downloaded)
 * @param {AbortSignal} [options.signal]
 * @param {number} [options.concurrency] parallel shard downloads (default 4)
 * @param {boolean} [options.cache] use IndexedDB (default true)
 * @returns {Promise<{manifest: object, fromCache: number, downloadedBytes: number, cached: boolean, notices: string[]}>}
 */
export async function loadWeights(manifestUrl, options = {}) {
  const { onProgress = () => {}, onShard = () => {}, concurrency = 4 } = options;
  // One failed shard stops the others (each keeps its received prefix for a later resume).
  const stop = new AbortController();
  options.signal?.addEventListener('abort', () => stop.abort(options.signal.reason), { once: true });
  if (options.signal?.aborted) stop.abort(options.signal.reason);
  const signal = stop.signal;
  const notices = [];
  const notice = (text) => {
    notices.push(text);
    onProgress({ ...progress, phase: 'notice', notice: text });
  };
  const progress = {
    phase: 'manifest',
    bytesDone: 0,
    bytesTotal: 0,
    shardsDone: 0,
    shardsTotal: 0,
    fromCache: 0,
    downloadedBytes: 0,
  };
  onProgress({ ...progress });

  const url = new URL(manifestUrl, globalThis.location?.href).href;
  let response;
  try {
    response = await fetch(url, { cache: 'no-cache', signal });
  } catch (error) {
    if (signal?.aborted) throw error;
    response = null;
  }
  let db = null;
  let cacheOn = options.cache !== false && typeof indexedDB !== 'undefined';
  if (cacheOn) {
    try {
      db = await openCache();
    } catch (error) {
      cacheOn = false;
      notice(`The browser refused the weight cache (${error?.name ?? error}); the model loads without caching.`);
    }
  }

  let manifest;
  if (response?.ok) {
    try {
      manifest = await response.json();
    } catch {
      throw new WeightsError('bad-manifest', `The model manifest at ${url} is not valid JSON.`);
    }
  } else if (db && (await get(db, MANIFESTS, url))) {
    // Offline (or the CDN is down): use the manifest we cached with the shards.
    manifest = (await get(db, MANIFESTS, url)).manifest;
    notice('The model server is unreachable; using the cached copy of the model.');
  } else {
    db?.close();
    const why = response ? `HTTP ${response.status}` : 'the server is unreachable';
    throw new WeightsError('http', `Could not fetch the model manifest (${why}).`, { url });
  }
  let entries;
  try {
    entries = checkManifest(manifest);
  } catch (error) {
    db?.close();
    throw error;
  }
  const base = new URL('.', url);
  if (options.onManifest) {
    try {
      await options.onManifest(manifest);
    } catch (error) {
      db?.close();
      throw error;
    }
  }

  if (cacheOn && globalThis.navigator?.storage?.persist) {
    // Ask the browser not to evict the cache under storage pressure. It may say no.
    navigator.storage.persist().catch(() => {});
  }

  progress.phase = 'shards';
  progress.shardsTotal = entries.length;
  progress.bytesTotal = entries.reduce((n, e) => n + e.bytes, 0);
  onProgress({ ...progress });

  const disableCache = (error) => {
    if (!cacheOn) return;
    cacheOn = false;
    const why = isQuotaError(error) ? 'the browser storage quota is full' : `the cache failed (${error?.name ?? error})`;
    notice(`Not caching the model: ${why}. It will load, but will download again next time.`);
  };

  const fetchEntry = async (entry) => {
    // 1. A verified cached copy?
    if (cacheOn) {
      try {
        const hit = await get(db, SHARDS, entry.sha256);
        if (hit) {
          const bytes = new Uint8Array(await hit.data.arrayBuffer());
          if (bytes.byteLength === entry.bytes && (await sha256Hex(bytes)) === entry.sha256) {
            progress.fromCache += 1;
            progress.bytesDone += bytes.byteLength;
            return bytes;
          }
          await remove(db, SHARDS, entry.sha256); // corrupted on disk: refetch
          notice(`A cached copy of ${entry.file} was damaged; downloading it again.`);
        }
      } catch (error) {
        disableCache(error);
      }
    }
    // 2. Download, resuming from a kept prefix if there is one.
    let prefix = null;
    if (cacheOn) {
      try {
        const partial = await get(db, PARTIALS, entry.sha256);
        if (partial) prefix = new Uint8Array(await partial.data.arrayBuffer());
      } catch (error) {
        disableCache(error);
      }
    }
    const onBytes = (n, { resumed = false } = {}) => {
      progress.bytesDone += n;
      if (!resumed) progress.downloadedBytes += n;
      onProgress({ ...progress });
    };
    const onPartial = async (bytes) => {
      if (!cacheOn || bytes.byteLength < MIN_PARTIAL_BYTES) return;
      try {
        await put(db, PARTIALS, { sha256: entry.sha256, data: new Blob([bytes]) });
      } catch (error) {
        disableCache(error);
      }
    };
    let bytes = await download(new URL(entry.file, base).href, entry, prefix, { signal, onBytes, onPartial });
    if ((await sha256Hex(bytes)) !== entry.sha256) {
      if (cacheOn && prefix) await remove(db, PARTIALS, entry.sha256).catch(() => {});
      // Maybe the kept prefix was bad, or the bytes were damaged in transit: one clean retry.
      onBytes(-entry.bytes);
      bytes = await download(new URL(entry.file, base).href, entry, null, { signal, onBytes, onPartial: async () => {} });
      if ((await sha256Hex(bytes)) !== entry.sha256) {
        throw new WeightsError('hash', `${entry.file} does not match its sha256: the model server sent damaged data. Nothing was stored.`, {
          file: entry.file,
        });
      }
    }
    // 3. Keep it (only verified bytes reach the cache).
    if (cacheOn) {
      try {
        await put(db, SHARDS, { sha256: entry.sha256, size: entry.bytes, data: new Blob([bytes]), storedAt: Date.now() });
        await remove(db, PARTIALS, entry.sha256);
      } catch (error) {
        disableCache(error);
      }
    }
    return bytes;
  };

  // A small pool: `concurrency` shards in flight, each handed to the consumer before the next.
  let next = 0;
  const shardIndex = new Map(manifest.shards.map((s, i) => [s, i]));
  const worker = async () => {
    while (next < entries.length) {
      const entry = entries[next++];
      signal.throwIfAborted();
      try {
        const bytes = await fetchEntry(entry);
        await onShard(entry, bytes, shardIndex.get(entry) ?? -1);
      } catch (error) {
        stop.abort(error);
        throw error;
      }
      progress.shardsDone += 1;
      onProgress({ ...progress });
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, entries.length)) }, worker));

  if (cacheOn) {
    try {
      await put(db, MANIFESTS, {
        url,
        modelId: manifest.model?.id ?? null,
        version: manifest.model?.version ?? null,
        manifest,
        hashes: entries.map((e) => e.sha256),
        storedAt: Date.now(),
      });
      await evictUnreferenced(db);
    } catch (error) {
      disableCache(error);
    }
  }
  db?.close();
  progress.phase = 'done';
  onProgress({ ...progress });
  return {
    manifest,
    fromCache: progress.fromCache,
    downloadedBytes: progress.downloadedBytes,
    cached: cacheOn,
    notices,
  };
}

/** Deletes shards and partial downloads that no cached manifest refers to. */
async function evictUnreferenced(db) {
  const manifests = await request(db.transaction(MANIFESTS).objectStore(MANIFESTS).getAll());
  const keep = new Set(manifests.flatMap((m) => m.hashes));
  for (const store of [SHARDS, PARTIALS]) {
    const keys = await request(db.transaction(store).objectStore(store).getAllKeys());
    const stale = keys.filter((k) => !keep.has(k));
    if (stale.length === 0) continue;
    const tx = db.transaction(store, 'readwrite');
    for (const k of stale) tx.objectStore(store).delete(k);
    await done(tx);
  }
}

/** What the cache holds: `{shards, bytes, manifests: [{url, modelId, version}], usage, quota, persisted}`. */
export async function cacheInfo() {
  const db = await openCache();
  try {
    const shards = await request(db.transaction(SHARDS).objectStore(SHARDS).getAll());
    const manifests = await request(db.transaction(MANIFESTS).objectStore(MANIFESTS).getAll());
    const estimate = (await globalThis.navigator?.storage?.estimate?.()) ?? {};
    const persisted = (await globalThis.navigator?.storage?.persisted?.()) ?? false;
    return {
      shards: shards.length,
      bytes: shards.reduce((n, s) => n + s.size, 0),
      manifests: manifests.map(({ url, modelId, version }) => ({ url, modelId, version })),
      usage: estimate.usage ?? null,
      quota: estimate.quota ?? null,
      persisted,
    };
  } finally {
    db.close();
  }
}

/** Empties the weight cache (shards, manifests and partial downloads). */
export async function clearCache() {
  const db = await openCache();
  try {
    const tx = db.transaction([SHARDS, MANIFESTS, PARTIALS], 'readwrite');
    for (const store of [SHARDS, MANIFESTS, PARTIALS]) tx.objectStore(store).clear();
    await done(tx);
  } finally {
    db.close();
  }
}
