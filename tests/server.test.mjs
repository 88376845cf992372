// The local server behaves like the model CDN the page will stream shards from.
import assert from 'node:assert/strict';
import { mkdtemp, mkdir, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { createServer, listen, parseRange } from '../scripts/serve.mjs';

let server;
let base;
let root;
const shardName = 'ab'.repeat(32) + '.safetensors';
const shard = Buffer.from(Array.from({ length: 1000 }, (_, i) => (i * 7) % 256));

before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'unifusion-serve-'));
  await mkdir(path.join(root, 'web', 'pkg'), { recursive: true });
  await mkdir(path.join(root, 'models', 'demo'), { recursive: true });
  await writeFile(path.join(root, 'index.html'), '<!doctype html><title>t</title>');
  await writeFile(path.join(root, 'web', 'pkg', 'x_bg.wasm'), Buffer.from([0, 97, 115, 109]));
  await writeFile(path.join(root, 'web', '.secret'), 'no');
  await writeFile(path.join(root, 'Cargo.toml'), '[workspace]');
  await writeFile(path.join(root, 'models', 'demo', 'manifest.json'), '{}');
  await writeFile(path.join(root, 'models', 'demo', shardName), shard);
  server = createServer({ root });
  base = await listen(server, 0);
});

after(async () => {
  server.close();
  await rm(root, { recursive: true, force: true });
});

test('listens on 127.0.0.1 only', () => {
  assert.equal(server.address().address, '127.0.0.1');
});

test('serves the page and wasm with the right types', async () => {
  const page = await fetch(base);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  const wasm = await fetch(`${base}web/pkg/x_bg.wasm`);
  assert.equal(wasm.headers.get('content-type'), 'application/wasm');
  assert.equal(wasm.headers.get('cache-control'), 'no-cache');
});

test('content-addressed shards are immutable; manifests are revalidated', async () => {
  const s = await fetch(`${base}models/demo/${shardName}`);
  assert.equal(s.status, 200);
  assert.equal(s.headers.get('cache-control'), 'public, max-age=31536000, immutable');
  assert.deepEqual(Buffer.from(await s.arrayBuffer()), shard);
  const m = await fetch(`${base}models/demo/manifest.json`);
  assert.equal(m.headers.get('cache-control'), 'no-cache');
  const again = await fetch(`${base}models/demo/manifest.json`, {
    headers: { 'If-None-Match': m.headers.get('etag') },
  });
  assert.equal(again.status, 304);
});

test('CORS allows cross-origin range reads', async () => {
  const pre = await fetch(`${base}models/demo/${shardName}`, { method: 'OPTIONS' });
  assert.equal(pre.status, 204);
  assert.equal(pre.headers.get('access-control-allow-origin'), '*');
  assert.match(pre.headers.get('access-control-allow-headers'), /Range/);
  const r = await fetch(`${base}models/demo/${shardName}`);
  assert.match(r.headers.get('access-control-expose-headers'), /Content-Range/);
});

test('range requests resume a shard exactly', async () => {
  const r = await fetch(`${base}models/demo/${shardName}`, { headers: { Range: 'bytes=100-199' } });
  assert.equal(r.status, 206);
  assert.equal(r.headers.get('content-range'), 'bytes 100-199/1000');
  assert.deepEqual(Buffer.from(await r.arrayBuffer()), shard.subarray(100, 200));

  const open = await fetch(`${base}models/demo/${shardName}`, { headers: { Range: 'bytes=990-' } });
  assert.deepEqual(Buffer.from(await open.arrayBuffer()), shard.subarray(990));
  const suffix = await fetch(`${base}models/demo/${shardName}`, { headers: { Range: 'bytes=-5' } });
  assert.deepEqual(Buffer.from(await suffix.arrayBuffer()), shard.subarray(995));

  const past = await fetch(`${base}models/demo/${shardName}`, { headers: { Range: 'bytes=1000-' } });
  assert.equal(past.status, 416);
  assert.equal(past.headers.get('content-range'), 'bytes */1000');
});

test('HEAD reports the size without a body', async () => {
  const r = await fetch(`${base}models/demo/${shardName}`, { method: 'HEAD' });
  assert.equal(r.status, 200);
  assert.equal(r.headers.get('content-length'), '1000');
  assert.equal(r.headers.get('accept-ranges'), 'bytes');
});

test('nothing outside the mounts is reachable', async () => {
  for (const p of [
    'Cargo.toml',
    'web/.secret',
    'web/../Cargo.toml',
    'web/%2e%2e/Cargo.toml',
    'models/..%2fCargo.toml',
    'web/%00',
    'web/%E0%A4%A',
    'models/',
  ]) {
    const r = await fetch(base + p);
    assert.equal(r.status, 404, p);
  }
  const post = await fetch(base, { method: 'POST', body: 'x' });
  assert.equal(post.status, 405);
});

test('parseRange follows RFC 9110 for single ranges', () => {
  assert.deepEqual(parseRange('bytes=0-0', 10), { start: 0, end: 0 });
  assert.deepEqual(parseRange('bytes=5-100', 10), { start: 5, end: 9 });
  assert.deepEqual(parseRange('bytes=-100', 10), { start: 0, end: 9 });
  assert.equal(parseRange('bytes=10-', 10), 'invalid');
  assert.equal(parseRange('bytes=-0', 10), 'invalid');
  assert.equal(parseRange('bytes=5-2', 10), null);
  assert.equal(parseRange('bytes=0-1,3-4', 10), null);
  assert.equal(parseRange('items=0-1', 10), null);
});

test('the command line prints the URL it serves', async (t) => {
  const { spawn } = await import('node:child_process');
  const script = new URL('../scripts/serve.mjs', import.meta.url).pathname;
  const child = spawn(process.execPath, [script, '--port', '0', '--root', root]);
  t.after(() => child.kill());
  const url = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = /(http:\/\/127\.0\.0\.1:\d+\/)/.exec(out);
      if (m) resolve(m[1]);
    });
    child.on('exit', (code) => reject(new Error(`serve exited with ${code}: ${out}`)));
  });
  const page = await fetch(url);
  assert.equal(page.status, 200);
  assert.match(await page.text(), /<title>t<\/title>/);
});

test('the command line rejects a bad port with exit code 2', async () => {
  const { spawnSync } = await import('node:child_process');
  const script = new URL('../scripts/serve.mjs', import.meta.url).pathname;
  const r = spawnSync(process.execPath, [script, '--port', 'eighty'], { encoding: 'utf8' });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /--port must be an integer/);
});
