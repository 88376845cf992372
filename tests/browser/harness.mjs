// Shared harness for browser tests: serves the repository on 127.0.0.1 and opens the page in
// Debian's headless Chromium with WebGPU (SwiftShader) and a fresh profile.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

import { createServer, listen } from '../../scripts/serve.mjs';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export const CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--enable-unsafe-webgpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

/**
 * Serves the repo (and `models` as the model CDN), launches Chromium with a fresh user-data-dir
 * and opens `pathname`. Everything is torn down when the test `t` ends. The session's `server`
 * can be closed early to test offline behaviour.
 */
export async function openPage(t, pathname = '/', { models, intercept, onSent } = {}) {
  const server = createServer({ root: ROOT, models, intercept, onSent });
  const base = await listen(server, 0);
  const profile = await mkdtemp(path.join(tmpdir(), 'unifusion-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_FLAGS,
  });
  t.after(async () => {
    await context.close();
    server.close();
    await rm(profile, { recursive: true, force: true });
  });
  const page = context.pages()[0] ?? (await context.newPage());
  // Every request the browser makes (page and workers), with its body: privacy tests read it.
  const session = { page, base, server, context, console: [], pageErrors: [], requests: [] };
  context.on('request', (req) =>
    session.requests.push({ url: req.url(), method: req.method(), body: req.postDataBuffer(), headers: req.headers() }),
  );
  page.on('console', (msg) => session.console.push(`${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => session.pageErrors.push(String(err)));
  await page.goto(new URL(pathname, base).href);
  return session;
}
