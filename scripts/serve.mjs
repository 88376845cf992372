#!/usr/bin/env node
// Local server for the page and its model CDN, on 127.0.0.1 only.
//
//   node scripts/serve.mjs [--port 8080] [--root .] [--models DIR]
//
// It serves only what the page needs: `/` (index.html), `/web/**` and `/models/**` (the CDN:
// manifests and content-addressed shards). CDN semantics: single HTTP Range requests (206/416),
// CORS for GET/HEAD with Range, `Cache-Control: immutable` for files named by their sha256,
// `no-cache` for everything else (a manifest must always be revalidated), and correct MIME
// types (`application/wasm` for streaming compilation).
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
  '.ico': 'image/x-icon',
  '.txt': 'text/plain; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.ts': 'text/plain; charset=utf-8',
  '.safetensors': 'application/octet-stream',
};

/**
 * The page's Content-Security-Policy, also sent as a header with the page and its scripts: a
 * module worker takes its policy from its own script's response, not from the page, so this
 * keeps the worker's `connect-src` to this origin too. To serve the model from another CDN,
 * add exactly its origin to `connect-src` here and in index.html.
 */
export const PAGE_CSP =
  "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'; " +
  "img-src 'self' blob: data:; style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'";

/** A file whose name is its own sha256 never changes: cache it forever. */
const CONTENT_ADDRESSED = /^[0-9a-f]{64}(\.[a-z0-9]+)*$/;

/**
 * Maps a URL path to a file under one of the mounts, or null. Rejects traversal, NUL bytes,
 * dot-files and anything outside the mounts.
 */
function resolvePath(urlPath, mounts) {
  let decoded;
  try {
    decoded = decodeURIComponent(urlPath);
  } catch {
    return null;
  }
  if (decoded.includes('\0') || decoded.includes('\\')) return null;
  if (decoded === '/' || decoded === '/index.html') return mounts.index;
  for (const [prefix, dir] of mounts.dirs) {
    if (!decoded.startsWith(prefix)) continue;
    const rest = decoded.slice(prefix.length);
    if (rest.split('/').some((seg) => seg === '..' || seg.startsWith('.'))) return null;
    const file = path.resolve(dir, rest);
    if (file !== dir && file.startsWith(dir + path.sep)) return file;
    return null;
  }
  return null;
}

/** Parses a single `bytes=` range against `size`; null = ignore header, 'invalid' = 416. */
export function parseRange(header, size) {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return null; // multi-range or malformed: send it all
  let start;
  let end;
  if (m[1] === '') {
    const suffix = Number(m[2]);
    if (suffix === 0) return 'invalid';
    start = Math.max(0, size - suffix);
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
    if (m[2] !== '' && Number(m[2]) < start) return null; // syntactically invalid: ignore
  }
  if (start >= size || !Number.isSafeInteger(start)) return 'invalid';
  return { start, end };
}

function send(res, status, headers, body = '') {
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', ...headers });
  res.end(body);
}

/**
 * Creates (does not start) the server.
 * @param {{root: string, models?: string, intercept?: Function, onSent?: Function}} options
 *   repository root; models directory; `intercept(req, res, file)` runs before a file is sent
 *   (tests use it to count requests and inject faults) and returns true when it has answered
 *   the request itself; `onSent({method, path, file, status, bytes})` after a file's body was
 *   sent (tests and benchmarks count the bytes served)
 */
export function createServer({ root, models, intercept, onSent }) {
  const absRoot = path.resolve(root);
  const mounts = {
    index: path.join(absRoot, 'index.html'),
    dirs: [
      ['/web/', path.join(absRoot, 'web')],
      ['/models/', path.resolve(models ?? path.join(absRoot, 'models'))],
    ],
  };
  const cors = {
    'Access-Control-Allow-Origin': '*',
    'Access-Control-Expose-Headers': 'Content-Length, Content-Range, Accept-Ranges, ETag',
  };

  return http.createServer(async (req, res) => {
    const common = { ...cors, 'X-Content-Type-Options': 'nosniff' };
    if (req.method === 'OPTIONS') {
      return send(res, 204, {
        ...common,
        'Access-Control-Allow-Methods': 'GET, HEAD, OPTIONS',
        'Access-Control-Allow-Headers': 'Range, If-None-Match',
        'Access-Control-Max-Age': '86400',
      });
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      return send(res, 405, { ...common, Allow: 'GET, HEAD, OPTIONS' }, 'method not allowed\n');
    }
    const url = new URL(req.url, 'http://127.0.0.1');
    const file = resolvePath(url.pathname, mounts);
    let info;
    try {
      info = file && (await stat(file));
    } catch {
      info = null;
    }
    if (!info || !info.isFile()) return send(res, 404, common, 'not found\n');

    if (intercept && (await intercept(req, res, file, info))) return;

    const name = path.basename(file);
    const immutable = CONTENT_ADDRESSED.test(name);
    const etag = immutable ? `"${name.slice(0, 64)}"` : `"${info.size.toString(16)}-${info.mtimeMs.toString(16)}"`;
    const headers = {
      ...common,
      'Content-Type': MIME[path.extname(name).toLowerCase()] ?? 'application/octet-stream',
      'Cache-Control': immutable ? 'public, max-age=31536000, immutable' : 'no-cache',
      'Accept-Ranges': 'bytes',
      ETag: etag,
    };
    if (!file.startsWith(mounts.dirs[1][1] + path.sep) && /\.(html|m?js)$/.test(name)) {
      headers['Content-Security-Policy'] = PAGE_CSP;
    }
    // The service worker lives under /web/ but controls the whole app.
    if (url.pathname === '/web/sw.js') headers['Service-Worker-Allowed'] = '/';
    if (req.headers['if-none-match'] === etag) return send(res, 304, headers);

    let start = 0;
    let end = info.size - 1;
    let status = 200;
    if (req.headers.range && info.size > 0) {
      const range = parseRange(req.headers.range, info.size);
      if (range === 'invalid') {
        return send(res, 416, { ...headers, 'Content-Range': `bytes */${info.size}` });
      }
      if (range) {
        ({ start, end } = range);
        status = 206;
        headers['Content-Range'] = `bytes ${start}-${end}/${info.size}`;
      }
    }
    headers['Content-Length'] = String(Math.max(0, end - start + 1));
    res.writeHead(status, headers);
    if (req.method === 'HEAD' || info.size === 0) return res.end();
    const stream = createReadStream(file, { start, end });
    stream.on('error', () => res.destroy());
    if (onSent) {
      let bytes = 0;
      stream.on('data', (chunk) => (bytes += chunk.length));
      res.on('close', () => onSent({ method: req.method, path: url.pathname, file, status, bytes }));
    }
    stream.pipe(res);
  });
}

/** Starts the server on 127.0.0.1; resolves to its base URL. */
export function listen(server, port = 0) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve(`http://127.0.0.1:${server.address().port}/`);
    });
  });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const args = process.argv.slice(2);
  const opt = (name, fallback) => {
    const i = args.indexOf(`--${name}`);
    return i >= 0 && args[i + 1] ? args[i + 1] : fallback;
  };
  const root = opt('root', path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..'));
  const port = Number(opt('port', process.env.PORT ?? '8080'));
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`serve: --port must be an integer in 0..65535, got ${opt('port')}`);
    process.exit(2);
  }
  const server = createServer({ root, models: opt('models') });
  listen(server, port)
    .catch((error) => {
      if (error.code !== 'EADDRINUSE') throw error;
      console.error(`serve: port ${port} is taken; using a free one`);
      return listen(server, 0);
    })
    .then((url) => console.log(`UniFusion-Web is being served at ${url}  (Ctrl-C to stop)`))
    .catch((error) => {
      console.error(`serve: ${error.message}`);
      process.exit(1);
    });
}
