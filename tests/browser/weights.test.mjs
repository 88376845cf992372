// Weight streaming and the IndexedDB cache (web/weights.js) in headless Chromium, against the
// project's server acting as the model CDN, with faults injected on the server side.
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { openPage } from './harness.mjs';

const MANIFEST = '/models/demo/manifest.json';
let models;
let shards; // [{file, bytes, sha256, data}]
let tokenizer;

const sha256 = (b) => createHash('sha256').update(b).digest('hex');
const checksum = (b) => b.reduce((s, x) => (s * 31 + x) >>> 0, 7);

async function writeManifest(entries, extra = {}) {
  const manifest = {
    format: 'unifusion-manifest',
    format_version: 1,
    model: { id: 'demo', version: '1' },
    config: {},
    tokenizer: { file: tokenizer.file, bytes: tokenizer.bytes, sha256: tokenizer.sha256 },
    shards: entries.map(({ file, bytes, sha256: h }) => ({ file, bytes, sha256: h, tensors: [] })),
    ...extra,
  };
  await writeFile(path.join(models, 'demo', 'manifest.json'), JSON.stringify(manifest));
}

async function makeFile(size, ext) {
  // Random bytes: zero-filled data would be compressed by the browser's storage.
  const data = randomBytes(size);
  const h = sha256(data);
  const file = `${h}.${ext}`;
  await writeFile(path.join(models, 'demo', file), data);
  return { file, bytes: size, sha256: h, data };
}

before(async () => {
  models = await mkdtemp(path.join(tmpdir(), 'unifusion-models-'));
  await mkdir(path.join(models, 'demo'));
  shards = [];
  for (const size of [3 << 20, 1536 << 10, 2 << 20, 100_000, 0, 1 << 20]) {
    shards.push(await makeFile(size, 'safetensors'));
  }
  tokenizer = await makeFile(5000, 'json');
  await writeManifest(shards);
});

after(() => rm(models, { recursive: true, force: true }));

/** Counts requests per file and records Range headers; `faults` may answer a request itself. */
function recorder(faults = () => false) {
  const log = [];
  const intercept = (req, res, file) => {
    const name = path.basename(file);
    log.push({ name, range: req.headers.range ?? null });
    return faults(req, res, file, name, log.filter((r) => r.name === name).length);
  };
  return { log, intercept, count: (name) => log.filter((r) => r.name === name).length };
}

/**
 * Answers with only the first `cut` bytes and a clean end of stream (chunked, no length), so
 * every sent byte reaches the page: a connection that closes early, deterministically. (A TCP
 * reset instead may drop bytes still in the browser's network buffers, which makes the resume
 * point vary from run to run.)
 */
function closeEarly(res, data, cut) {
  res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
  res.end(data.subarray(0, cut));
}

/** Runs loadWeights in the page; returns its result, progress events and what onShard got. */
async function load(page, url = MANIFEST) {
  return page.evaluate(
    async ({ url }) => {
      const { loadWeights } = await import('/web/weights.js');
      const events = [];
      const delivered = {};
      try {
        const result = await loadWeights(url, {
          onProgress: (e) => events.push(e),
          onShard: (entry, bytes) => {
            delivered[entry.sha256] = { length: bytes.length, checksum: bytes.reduce((s, x) => (s * 31 + x) >>> 0, 7) };
          },
        });
        delete result.manifest;
        return { result, events, delivered };
      } catch (error) {
        return { error: { name: error.name, code: error.code, message: error.message, file: error.file }, events, delivered };
      }
    },
    { url },
  );
}

async function cacheInfo(page) {
  return page.evaluate(async () => (await import('/web/weights.js')).cacheInfo());
}

function assertDelivered(out, entries) {
  for (const e of entries) {
    assert.deepEqual(out.delivered[e.sha256], { length: e.bytes, checksum: checksum(e.data) }, e.file);
  }
}

const all = () => [...shards, tokenizer];
const totalBytes = () => all().reduce((n, e) => n + e.bytes, 0);

test('a first load downloads and verifies everything; a reload and an offline load download nothing', { timeout: 120_000 }, async (t) => {
  const rec = recorder();
  const session = await openPage(t, '/?app=0', { models, intercept: rec.intercept });
  const first = await load(session.page);
  assert.equal(first.error, undefined, JSON.stringify(first.error));
  assert.equal(first.result.downloadedBytes, totalBytes());
  assert.equal(first.result.fromCache, 0);
  assert.equal(first.result.cached, true);
  assertDelivered(first, all());
  const last = first.events.at(-1);
  assert.equal(last.phase, 'done');
  assert.equal(last.bytesDone, last.bytesTotal);
  assert.equal(last.shardsDone, all().length);
  const shardsDone = first.events.map((e) => e.shardsDone);
  assert.deepEqual(shardsDone, [...shardsDone].sort((a, b) => a - b), 'progress never goes back');
  assert.ok(first.events.some((e) => e.phase === 'shards' && e.bytesDone > 0 && e.bytesDone < e.bytesTotal), 'byte progress inside shards');

  const info = await cacheInfo(session.page);
  assert.equal(info.shards, all().length);
  assert.equal(info.bytes, totalBytes());

  const served = rec.log.length;
  await session.page.reload();
  const second = await load(session.page);
  assert.equal(second.result.downloadedBytes, 0);
  assert.equal(second.result.fromCache, all().length);
  assertDelivered(second, all());
  assert.deepEqual(
    rec.log.slice(served).map((r) => r.name).filter((n) => n !== 'manifest.json' && n.length > 64),
    [],
    'no shard was requested again',
  );

  // Offline: the server is gone, the cached manifest and shards still load.
  session.server.close();
  session.server.closeAllConnections();
  const offline = await load(session.page);
  assert.equal(offline.error, undefined, JSON.stringify(offline.error));
  assert.equal(offline.result.downloadedBytes, 0);
  assert.match(offline.result.notices.join(' '), /unreachable/);
  assertDelivered(offline, all());
});

test('a connection that closes mid-shard resumes with a Range request', { timeout: 120_000 }, async (t) => {
  const big = shards[0];
  const cut = (1 << 20) + 12_345;
  const rec = recorder((req, res, file, name, nth) => {
    if (name !== big.file || nth !== 1) return false;
    closeEarly(res, big.data, cut);
    return true;
  });
  const session = await openPage(t, '/?app=0', { models, intercept: rec.intercept });
  const out = await load(session.page);
  assert.equal(out.error, undefined, JSON.stringify(out.error));
  assertDelivered(out, all());
  const ranges = rec.log.filter((r) => r.name === big.file).map((r) => r.range);
  assert.equal(ranges[0], null);
  assert.equal(ranges.length, 2, `requests for the cut shard: ${JSON.stringify(ranges)}`);
  assert.equal(ranges[1], `bytes=${cut}-`);
  assert.equal(out.result.downloadedBytes, totalBytes(), 'no byte fetched twice');

  // What was cached is the verified shard: a reload uses it without downloading.
  await session.page.reload();
  const again = await load(session.page);
  assert.equal(again.result.downloadedBytes, 0);
  assertDelivered(again, all());
});

test('a download that keeps failing keeps its prefix; the next visit resumes from it', { timeout: 120_000 }, async (t) => {
  const big = shards[0];
  const cut = 1536 << 10;
  let broken = true;
  const rec = recorder((req, res, file, name, nth) => {
    if (name !== big.file || !broken) return false;
    if (nth === 1) {
      closeEarly(res, big.data, cut);
    } else {
      res.destroy(); // every retry fails
    }
    return true;
  });
  const session = await openPage(t, '/?app=0', { models, intercept: rec.intercept });
  const failed = await load(session.page);
  assert.equal(failed.error?.code, 'network');
  assert.equal(failed.error.file, big.file);
  assert.match(failed.error.message, /what was received is kept/);

  broken = false;
  await session.page.reload();
  const before = rec.log.length;
  const out = await load(session.page);
  assert.equal(out.error, undefined, JSON.stringify(out.error));
  assertDelivered(out, all());
  const resumed = rec.log.slice(before).filter((r) => r.name === big.file);
  assert.deepEqual(resumed.map((r) => r.range), [`bytes=${cut}-`]);
  assert.equal(out.events.at(-1).downloadedBytes, out.result.downloadedBytes);
  assert.ok(out.result.downloadedBytes <= totalBytes() - cut, 'the kept prefix was not downloaded again');
});

test('damaged bytes are refetched and never cached; a damaged cache entry is replaced', { timeout: 120_000 }, async (t) => {
  const victim = shards[1];
  const rec = recorder((req, res, file, name, nth) => {
    if (name !== victim.file || nth !== 1) return false;
    const bad = Buffer.from(victim.data);
    bad[1000] ^= 0xff; // same length, one byte flipped
    res.writeHead(200, { 'Content-Length': String(bad.length) });
    res.end(bad);
    return true;
  });
  const session = await openPage(t, '/?app=0', { models, intercept: rec.intercept });
  const out = await load(session.page);
  assert.equal(out.error, undefined, JSON.stringify(out.error));
  assert.equal(rec.count(victim.file), 2);
  assertDelivered(out, all());

  // Damage a cached shard behind the module's back: it is detected, refetched and replaced.
  const target = shards[2];
  await session.page.evaluate(async (h) => {
    const db = await new Promise((res, rej) => {
      const r = indexedDB.open('unifusion-weights');
      r.onsuccess = () => res(r.result);
      r.onerror = () => rej(r.error);
    });
    const tx = db.transaction('shards', 'readwrite');
    const store = tx.objectStore('shards');
    const rec = await new Promise((res) => (store.get(h).onsuccess = (e) => res(e.target.result)));
    const bytes = new Uint8Array(await rec.data.arrayBuffer());
    bytes[7] ^= 1;
    const tx2 = db.transaction('shards', 'readwrite');
    tx2.objectStore('shards').put({ ...rec, data: new Blob([bytes]) });
    await new Promise((res) => (tx2.oncomplete = res));
    db.close();
  }, target.sha256);
  const before = rec.count(target.file);
  const again = await load(session.page);
  assert.equal(again.error, undefined, JSON.stringify(again.error));
  assert.equal(rec.count(target.file), before + 1);
  assert.equal(again.result.downloadedBytes, target.bytes);
  assert.match(again.result.notices.join(' '), /damaged/);
  assertDelivered(again, all());
  const third = await load(session.page);
  assert.equal(third.result.downloadedBytes, 0, 'the replacement was cached');
});

test('a CDN that always sends damaged data fails with a clear error and stores nothing of it', { timeout: 120_000 }, async (t) => {
  const victim = shards[3];
  const rec = recorder((req, res, file, name) => {
    if (name !== victim.file) return false;
    const bad = Buffer.from(victim.data);
    bad[0] ^= 0xff;
    res.writeHead(200, { 'Content-Length': String(bad.length) });
    res.end(bad);
    return true;
  });
  const session = await openPage(t, '/?app=0', { models, intercept: rec.intercept });
  const out = await load(session.page);
  assert.equal(out.error?.code, 'hash');
  assert.equal(out.error.file, victim.file);
  assert.match(out.error.message, /does not match its sha256/);
  const stored = await session.page.evaluate(async (h) => {
    const db = await new Promise((res) => (indexedDB.open('unifusion-weights').onsuccess = (e) => res(e.target.result)));
    const tx = db.transaction('shards');
    const rec = await new Promise((res) => (tx.objectStore('shards').get(h).onsuccess = (e) => res(e.target.result)));
    db.close();
    return rec ?? null;
  }, victim.sha256);
  assert.equal(stored, null);
});

test('a full storage quota does not stop loading: it goes on uncached and says so', { timeout: 120_000 }, async (t) => {
  const session = await openPage(t, '/?app=0', { models });
  await session.page.evaluate(() => {
    IDBObjectStore.prototype.put = () => {
      throw new DOMException('quota', 'QuotaExceededError');
    };
  });
  const out = await load(session.page);
  assert.equal(out.error, undefined, JSON.stringify(out.error));
  assert.equal(out.result.cached, false);
  assert.match(out.result.notices.join(' '), /quota is full/);
  assert.ok(out.events.some((e) => e.phase === 'notice'));
  assertDelivered(out, all());
});

test('a new manifest version evicts shards nothing refers to any more', { timeout: 120_000 }, async (t) => {
  const session = await openPage(t, '/?app=0', { models });
  try {
    assert.equal((await load(session.page)).error, undefined);
    const added = await makeFile(70_000, 'safetensors');
    await writeManifest([...shards.slice(1), added]);
    const out = await load(session.page);
    assert.equal(out.error, undefined, JSON.stringify(out.error));
    assert.equal(out.result.downloadedBytes, added.bytes);
    const info = await cacheInfo(session.page);
    assert.equal(info.shards, shards.length + 1); // 5 old shards + the new one + the tokenizer
    assert.equal(info.bytes, totalBytes() - shards[0].bytes + added.bytes);
  } finally {
    await writeManifest(shards);
  }
});

test('malformed and hostile manifests are refused with a clear error', { timeout: 120_000 }, async (t) => {
  const session = await openPage(t, '/?app=0', { models });
  const cases = [
    ['{not json', /not valid JSON/],
    [JSON.stringify({ format: 'other' }), /"format"/],
    [JSON.stringify({ format: 'unifusion-manifest', format_version: 9, shards: [] }), /format_version 9/],
    [
      JSON.stringify({ format: 'unifusion-manifest', format_version: 1, shards: [{ file: '../../x', bytes: 1, sha256: 'a'.repeat(64) }] }),
      /not a plain file name/,
    ],
    [
      JSON.stringify({ format: 'unifusion-manifest', format_version: 1, shards: [{ file: 'x', bytes: -5, sha256: 'a'.repeat(64) }] }),
      /bad byte count/,
    ],
  ];
  for (const [i, [text, pattern]] of cases.entries()) {
    await writeFile(path.join(models, 'demo', `bad${i}.json`), text);
    const out = await load(session.page, `/models/demo/bad${i}.json`);
    assert.equal(out.error?.name, 'WeightsError', text);
    assert.match(out.error.message, pattern);
  }
  const missing = await load(session.page, '/models/demo/nope.json');
  assert.match(missing.error.message, /HTTP 404/);
});
