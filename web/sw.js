// The service worker: the app shell (page, scripts, styles, wasm) comes from the network when
// it answers and from the last good copy (Cache Storage) when it does not, so the page opens
// offline after one visit. Model files (/models/**) and range requests pass straight through:
// weights.js keeps the shards in IndexedDB with its own verification.

const CACHE = 'unifusion-app-v1';
const SHELL = [
  '/',
  '/web/main.js',
  '/web/png.js',
  '/web/reference.js',
  '/web/unifusion.js',
  '/web/weights.js',
  '/web/worker.js',
  '/web/style.css',
  '/web/pkg/unifusion_web.js',
  '/web/pkg/unifusion_web_bg.wasm',
];

self.addEventListener('install', (event) => {
  // Each file on its own: one missing file must not cost the rest.
  event.waitUntil(
    caches.open(CACHE).then((cache) => Promise.all(SHELL.map((url) => cache.add(url).catch(() => {})))),
  );
  self.skipWaiting();
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    (async () => {
      for (const key of await caches.keys()) if (key !== CACHE) await caches.delete(key);
      await self.clients.claim();
    })(),
  );
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== 'GET' || url.origin !== self.location.origin) return;
  if (url.pathname.startsWith('/models/') || request.headers.has('range')) return;
  event.respondWith(networkFirst(request, url));
});

/** The network's answer (kept for later), or the cached copy when the network fails. */
async function networkFirst(request, url) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.status === 200) cache.put(request, response.clone()).catch(() => {}); // quota: skip
    return response;
  } catch (error) {
    // The page is cached under `/`; a visit to `/?app=0` offline still gets it.
    const hit = (await cache.match(request)) ?? (url.pathname === '/' ? await cache.match('/') : undefined);
    if (hit) return hit;
    throw error;
  }
}
