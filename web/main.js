// Entry point of the page. Until a model exists it reports the WebGPU device and runs the
// device self-test; `window.unifusion` exposes the results to tests.
import init, { initDevice, selftest } from './pkg/unifusion_web.js';
import { checkSelfTest } from './reference.js';

const $ = (id) => document.getElementById(id);
const state = { adapter: null, selftest: null, checks: null, error: null };
window.unifusion = state;

function setStatus(kind, text) {
  document.body.dataset.state = kind;
  $('status').textContent = text;
}

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

async function describeAdapter() {
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Error('WebGPU is present but no adapter is available.');
  const info = adapter.info ?? {};
  const limits = {};
  for (const key in adapter.limits) limits[key] = adapter.limits[key];
  return {
    info: {
      vendor: info.vendor,
      architecture: info.architecture,
      device: info.device,
      description: info.description,
      isFallbackAdapter: info.isFallbackAdapter,
    },
    limits,
    features: [...adapter.features].sort(),
  };
}

function showAdapter(report) {
  fillTable($('adapter'), Object.entries(report.info).map(([k, v]) => [k, v ?? '—']));
  fillTable($('limits'), Object.entries(report.limits).sort().map(([k, v]) => [k, v.toLocaleString('en')]));
  $('features').replaceChildren(
    ...report.features.map((f) => Object.assign(document.createElement('li'), { textContent: f })),
  );
}

function showChecks(checks) {
  fillTable(
    $('selftest'),
    checks.map((c) => {
      const verdict = Object.assign(document.createElement('span'), {
        className: c.pass ? 'pass' : 'fail',
        textContent: c.pass ? 'pass' : 'FAIL',
      });
      return [c.name, verdict, `worst error ${c.worst.toExponential(2)} of tolerance`];
    }),
  );
}

async function main() {
  if (!('gpu' in navigator)) {
    throw new Error(
      'This browser has no WebGPU. Use a recent Chrome, Edge or Safari, or enable WebGPU in your browser settings.',
    );
  }
  state.adapter = await describeAdapter();
  showAdapter(state.adapter);

  setStatus('loading', 'Loading the WebAssembly module…');
  await init();
  setStatus('loading', 'Running the self-test on WebGPU…');
  await initDevice();
  state.selftest = await selftest(37, 300, 19);
  state.checks = checkSelfTest(state.selftest);
  showChecks(state.checks);

  const failed = state.checks.filter((c) => !c.pass);
  if (failed.length) throw new Error(`Self-test failed: ${failed.map((c) => c.name).join(', ')}`);
  const { vendor, architecture, description } = state.adapter.info;
  const name = description || [vendor, architecture].filter(Boolean).join(' ') || 'this adapter';
  setStatus('ok', `WebGPU ready on ${name}; self-test passed.`);
}

main().catch((error) => {
  state.error = String(error?.message ?? error);
  setStatus('error', state.error);
  console.error(error);
});
