// The page: loads the default model through the worker facade (web/unifusion.js), and turns
// prompts and images into images. Plain DOM, no framework. `window.unifusion` exposes the
// state to tests.
import { addTextChunks } from './png.js';
import { checkSelfTest } from './reference.js';
import { UniFusion } from './unifusion.js';
import * as weightCache from './weights.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
/** The model the page loads: `?model=<manifest URL>`, else the default one. */
// The default is the trained demo-world model (docs/TRAINING.md); ?model=<manifest URL> picks another.
const MANIFEST = params.get('model') ?? 'models/demo/manifest.json';

const state = {
  uf: null,
  adapter: null,
  selftest: null,
  checks: null,
  model: null,
  error: null,
  notices: [],
  inputs: [], // {file, url}
  results: [], // {prompt, seed, width, height, rewrite, task, png: Uint8Array, url}
  busy: false,
  loadEvents: 0,
  previews: [], // {width, height} of each live preview drawn
  offlineShell: false, // the service worker is registered
};
window.unifusion = state;

function setStatus(kind, text) {
  document.body.dataset.state = kind;
  $('status').textContent = text;
}

function showError(error) {
  state.error = String(error?.message ?? error);
  setStatus('error', state.error);
  console.error(error);
}

const mb = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} MB`;

function fillTable(table, rows) {
  table.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement('tr');
      for (const cell of cells) {
        const td = document.createElement('td');
        if (cell instanceof Node) td.append(cell);
        else td.textContent = String(cell);
        tr.append(td);
      }
      return tr;
    }),
  );
}

function showDevice(caps) {
  state.adapter = { info: caps.adapter, limits: caps.limits, features: caps.features, shaderF16: caps.shaderF16 };
  state.computeDtype = caps.computeDtype;
  fillTable($('adapter'), Object.entries(caps.adapter).map(([k, v]) => [k, v ?? '—']));
  fillTable($('limits'), Object.entries(caps.limits).sort().map(([k, v]) => [k, v.toLocaleString('en')]));
  $('features').replaceChildren(...caps.features.map((f) => Object.assign(document.createElement('li'), { textContent: f })));
  state.selftest = caps.selftest;
  state.checks = checkSelfTest(caps.selftest);
  fillTable(
    $('selftest'),
    state.checks.map((c) => {
      const verdict = Object.assign(document.createElement('span'), { className: c.pass ? 'pass' : 'fail', textContent: c.pass ? 'pass' : 'FAIL' });
      return [c.name, verdict, `worst error ${c.worst.toExponential(2)} of tolerance`];
    }),
  );
  const failed = state.checks.filter((c) => !c.pass);
  const name = caps.adapter.description || [caps.adapter.vendor, caps.adapter.architecture].filter(Boolean).join(' ') || 'this adapter';
  $('selftest-summary').textContent =
    `${name}; ${caps.shaderF16 ? 'shader-f16 available' : 'no shader-f16'}; computing in ${caps.computeDtype}; ` +
    (failed.length ? `self-test FAILED: ${failed.map((c) => c.name).join(', ')}` : 'self-test passed');
  if (failed.length) throw new Error(`The GPU self-test failed (${failed.map((c) => c.name).join(', ')}): this device computes wrong numbers.`);
}

function notice(text) {
  state.notices.push(text);
  $('notices').append(Object.assign(document.createElement('li'), { textContent: text }));
}

// ---------------------------------------------------------------------------------------------
// Loading

let loadControl = null;

async function loadModel() {
  const origin = new URL(MANIFEST, location.href).origin;
  if (origin !== location.origin) {
    // The Content-Security-Policy (connect-src 'self') would block the fetch with a bare
    // "Failed to fetch"; say why instead.
    throw new Error(
      `This page may only fetch from its own origin (${location.origin}), so it cannot load a model from ${origin}. ` +
        'Serve the model from this origin, or add exactly that origin to connect-src in index.html and scripts/serve.mjs.',
    );
  }
  loadControl = new AbortController();
  $('cancel-load').hidden = false;
  $('model-name').textContent = MANIFEST;
  setStatus('loading', 'Loading the model…');
  const started = performance.now();
  let lastNotice = null;
  try {
    state.model = await state.uf.load(MANIFEST, {
      signal: loadControl.signal,
      onProgress: (p) => {
        state.loadEvents += 1;
        if (p.phase === 'notice') {
          if (p.notice !== lastNotice) notice(p.notice);
          lastNotice = p.notice;
          return;
        }
        const seconds = (performance.now() - started) / 1000;
        const rate = p.downloadedBytes / Math.max(seconds, 1e-3);
        const left = p.bytesTotal - p.bytesDone;
        const eta = p.downloadedBytes > 0 && left > 0 ? ` · ${Math.ceil(left / rate)} s left` : '';
        $('load-progress').max = Math.max(1, p.bytesTotal);
        $('load-progress').value = p.bytesDone;
        $('load-text').textContent =
          `${mb(p.bytesDone)} of ${mb(p.bytesTotal)}` +
          (p.downloadedBytes > 0 ? ` · ${mb(p.downloadedBytes)} downloaded at ${(rate / 1e6).toFixed(1)} MB/s${eta}` : '') +
          (p.fromCache ? ` · ${p.fromCache} files from the cache` : '') +
          ` · ${p.shardsPlaced} of ${p.shards || '?'} shards on the GPU`;
      },
    });
    const m = state.model;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $('model-name').textContent = `${m.id} ${m.version} — ${m.shards} shards, ${mb(m.bytes)}`;
    $('load-text').textContent =
      `Loaded in ${seconds} s: ${m.downloadedBytes ? `${mb(m.downloadedBytes)} downloaded` : 'nothing downloaded'}, ${m.fromCache} files from the cache` +
      (m.cached ? '; cached for offline use.' : '; not cached.');
    for (const id of ['width', 'height']) $(id).step = String(m.sizeMultiple);
    // A model with its own defaults (the trained demo model: 64×64, 20 steps) starts there.
    if (m.defaults) for (const id of ['width', 'height', 'steps', 'guidance']) $(id).value = String(m.defaults[id]);
    setStatus('ok', `Ready. ${m.id} runs on this device's GPU.`);
    setBusy(false);
  } catch (error) {
    if (error.name === 'AbortError') setStatus('error', 'Model download cancelled. Reload the page to start again; what arrived is kept.');
    else showError(error);
  } finally {
    $('cancel-load').hidden = true;
    refreshCache();
  }
}

async function refreshCache() {
  try {
    const c = await (state.uf ?? weightCache).cacheInfo();
    state.cache = c;
    $('cache-size').textContent =
      `${mb(c.bytes)} in ${c.shards} cached files` +
      (c.quota ? ` (browser storage: ${mb(c.usage ?? 0)} used of ${mb(c.quota)})` : '') +
      (c.persisted ? ', persistent' : '');
  } catch (error) {
    $('cache-size').textContent = `Cache unavailable: ${error.message}`;
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs: file picker, drag and drop, paste

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith('image/')) {
      notice(`${file.name || 'That item'} is not an image; ignored.`);
      continue;
    }
    state.inputs.push({ file, url: URL.createObjectURL(file) });
  }
  showInputs();
}

function showInputs() {
  $('inputs').replaceChildren(
    ...state.inputs.map((input, i) => {
      const li = document.createElement('li');
      const img = Object.assign(document.createElement('img'), { src: input.url, alt: `input image ${i + 1}` });
      const remove = Object.assign(document.createElement('button'), { type: 'button', textContent: '×', title: 'Remove' });
      remove.onclick = () => {
        URL.revokeObjectURL(input.url);
        state.inputs.splice(i, 1);
        showInputs();
      };
      li.append(img, remove);
      return li;
    }),
  );
  const n = state.inputs.length;
  $('generate').textContent = n === 0 ? 'Generate' : n === 1 ? 'Edit' : `Combine ${n} images`;
  setBusy(state.busy);
}

function setBusy(busy) {
  state.busy = busy;
  const ready = !!state.model && !busy;
  $('generate').disabled = !ready;
  $('variation').disabled = !ready || state.inputs.length === 0;
  $('cancel').disabled = !busy;
}

// ---------------------------------------------------------------------------------------------
// Generating

let runControl = null;

function readSettings() {
  const m = state.model?.sizeMultiple ?? 8;
  const int = (id, lo, hi) => {
    const v = Number($(id).value);
    if (!Number.isFinite(v)) throw new Error(`${id} must be a number`);
    return Math.min(hi, Math.max(lo, Math.round(v)));
  };
  const size = (id) => {
    const v = int(id, m, 2048);
    const rounded = Math.max(m, Math.round(v / m) * m);
    $(id).value = String(rounded);
    return rounded;
  };
  const guidance = Number($('guidance').value);
  if (!Number.isFinite(guidance) || guidance < 1) throw new Error('Guidance must be a number of at least 1.');
  return {
    steps: int('steps', 1, 200),
    guidance,
    seed: int('seed', 0, Number.MAX_SAFE_INTEGER),
    width: size('width'),
    height: size('height'),
    // A live preview about four times a run.
    previewEvery: Math.max(1, Math.round(int('steps', 1, 200) / 4)),
  };
}

/** Draws a preview (RGBA) into the progress area. */
function showPreview({ width, height, data }) {
  const canvas = $('gen-preview');
  canvas.width = width;
  canvas.height = height;
  const pixels = new Uint8ClampedArray(data.buffer, data.byteOffset, data.byteLength);
  canvas.getContext('2d').putImageData(new ImageData(pixels, width, height), 0, 0);
  canvas.hidden = false;
  state.previews.push({ width, height });
}

async function run(kind) {
  const prompt = $('prompt').value.trim();
  const images = state.inputs.map((i) => i.file);
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    return setStatus('error', error.message);
  }
  if (kind !== 'variation' && !prompt) return setStatus('error', 'Write a prompt (or use Variation with an image).');
  runControl = new AbortController();
  setBusy(true);
  $('rewrite-box').hidden = true;
  $('gen-preview').hidden = true;
  state.previews = [];
  $('gen-progress').value = 0;
  const started = performance.now();
  const label = kind === 'variation' ? 'Variation' : images.length === 0 ? 'Generating' : images.length === 1 ? 'Editing' : 'Combining';
  setStatus('busy', `${label}: the VLM is reading the request (VERIFI)…`);
  $('gen-text').textContent = '';
  const options = {
    signal: runControl.signal,
    onStep: (s) => {
      if (s.preview) return showPreview(s.preview);
      $('gen-progress').max = s.total;
      $('gen-progress').value = s.done;
      $('gen-text').textContent = `step ${s.done} of ${s.total}` + (s.done === s.total ? ' · decoding the image…' : '');
      setStatus('busy', `${label}: step ${s.done} of ${s.total}`);
    },
  };
  try {
    const params = { prompt, ...settings };
    const result =
      kind === 'variation'
        ? await state.uf.variation({ images, ...settings }, options)
        : images.length === 0
          ? await state.uf.generate(params, options)
          : await state.uf.edit({ images, ...params }, options);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $('rewrite').textContent = result.rewrite || '(VERIFI wrote nothing)';
    $('rewrite-box').hidden = false;
    await addToGallery(result);
    $('gen-preview').hidden = true; // the finished image is in the gallery now
    $('gen-text').textContent = `done in ${seconds} s`;
    setStatus('ok', `Done in ${seconds} s (${result.request.width}×${result.request.height}, seed ${result.request.seed}).`);
  } catch (error) {
    if (error.name === 'AbortError') {
      setStatus('ok', 'Cancelled.');
      $('gen-text').textContent = 'cancelled';
    } else {
      showError(error);
    }
  } finally {
    runControl = null;
    setBusy(false);
  }
}

async function addToGallery(result) {
  const { width, height, data } = result.image;
  const canvas = new OffscreenCanvas(width, height);
  canvas.getContext('2d').putImageData(new ImageData(data, width, height), 0, 0);
  const plain = new Uint8Array(await (await canvas.convertToBlob({ type: 'image/png' })).arrayBuffer());
  const r = result.request;
  const png = addTextChunks(plain, {
    Software: 'UniFusion-Web',
    prompt: r.prompt,
    rewritten_prompt: result.rewrite,
    seed: String(r.seed),
    steps: String(r.steps),
    guidance: String(r.guidance),
    size: `${r.width}x${r.height}`,
    task: r.task,
    model: `${state.model.id} ${state.model.version}`,
  });
  const url = URL.createObjectURL(new Blob([png], { type: 'image/png' }));
  const entry = { ...r, rewrite: result.rewrite, png, url };
  state.results.push(entry);
  const figure = document.createElement('figure');
  const img = Object.assign(document.createElement('img'), { src: url, alt: r.prompt || 'variation', width, height });
  const caption = document.createElement('figcaption');
  const what = r.task === 'text-to-image' ? '' : `${r.task}: `;
  caption.textContent = `${what}${r.prompt || '(no prompt)'} · seed ${r.seed} · ${r.steps} steps`;
  const link = Object.assign(document.createElement('a'), {
    href: url,
    download: `unifusion-${r.seed}-${state.results.length}.png`,
    textContent: 'Download PNG',
  });
  caption.append(document.createElement('br'), link);
  figure.append(img, caption);
  $('gallery').prepend(figure);
}

// ---------------------------------------------------------------------------------------------

function wire() {
  $('generate').onclick = () => run('generate');
  $('variation').onclick = () => run('variation');
  $('cancel').onclick = () => runControl?.abort();
  $('cancel-load').onclick = () => loadControl?.abort();
  $('random-seed').onclick = () => ($('seed').value = String(Math.floor(Math.random() * 2 ** 32)));
  $('image-input').onchange = (e) => {
    addFiles(e.target.files);
    e.target.value = '';
  };
  const zone = $('dropzone');
  zone.ondragover = (e) => {
    e.preventDefault();
    zone.classList.add('over');
  };
  zone.ondragleave = () => zone.classList.remove('over');
  zone.ondrop = (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    addFiles(e.dataTransfer.files);
  };
  document.addEventListener('paste', (e) => {
    const files = [...(e.clipboardData?.files ?? [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  $('clear-cache').onclick = async () => {
    // Works without WebGPU too: the cache is plain IndexedDB.
    await (state.uf ?? weightCache).clearCache();
    notice('The cached model was deleted; the next visit downloads it again.');
    refreshCache();
  };
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !$('generate').disabled) run('generate');
  });
}

/** Lets the page open offline after one visit (web/sw.js); a failure costs only that. */
function registerServiceWorker() {
  if (!('serviceWorker' in navigator)) return;
  navigator.serviceWorker.register('/web/sw.js', { scope: '/' }).then(
    () => (state.offlineShell = true),
    (error) => console.warn(`service worker not registered: ${error.message}`),
  );
}

async function main() {
  if (params.get('app') === '0') {
    // A bare page for tests of the page's modules (web/weights.js): no worker, no model.
    setStatus('ok', 'App not started (app=0).');
    return;
  }
  wire();
  setBusy(false);
  registerServiceWorker();
  if (!('gpu' in navigator)) {
    document.body.dataset.webgpu = 'missing';
    refreshCache();
    throw new Error(
      'This browser has no WebGPU, which UniFusion-Web needs to run the model on your GPU. Use a recent Chrome, Edge or Safari (or Firefox 141+), or enable WebGPU in the browser settings.',
    );
  }
  setStatus('loading', 'Starting the GPU (WebGPU) and checking it…');
  // ?precision=f32|f16|auto (default auto: f16 where the adapter has shader-f16).
  state.uf = await UniFusion.create({ precision: params.get('precision') ?? 'auto' });
  state.uf.onNotice = notice;
  showDevice(state.uf.capabilities);
  if (params.get('autoload') === '0') {
    setStatus('ok', 'WebGPU ready; self-test passed. No model loaded (autoload=0).');
    return;
  }
  await loadModel();
}

main().catch(showError);
