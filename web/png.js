// PNG text chunks, written in the page: the gallery's downloads carry their prompt, seed and
// settings (`tEXt` for Latin-1 values, `iTXt` UTF-8 otherwise), like the CLI's PNGs.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 as PNG computes it (over chunk type + data). */
export function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

const isLatin1 = (s) => /^[\x20-\x7e\xa0-\xff\n]*$/.test(s);

/** A `tEXt` chunk when `value` is Latin-1, else an uncompressed `iTXt` chunk (UTF-8). */
export function textChunk(keyword, value) {
  if (!/^[\x20-\x7e]{1,79}$/.test(keyword)) throw new Error(`bad PNG text keyword ${keyword}`);
  const key = new TextEncoder().encode(keyword);
  if (isLatin1(value)) {
    const data = new Uint8Array(key.length + 1 + value.length);
    data.set(key);
    for (let i = 0; i < value.length; i++) data[key.length + 1 + i] = value.charCodeAt(i);
    return chunk('tEXt', data);
  }
  const text = new TextEncoder().encode(value);
  // keyword \0, compression flag 0, method 0, language tag "" \0, translated keyword "" \0
  const data = new Uint8Array(key.length + 5 + text.length);
  data.set(key);
  data.set(text, key.length + 5);
  return chunk('iTXt', data);
}

function checkSignature(png) {
  if (png.length < 8 || SIGNATURE.some((b, i) => png[i] !== b)) throw new Error('not a PNG file');
}

/** Inserts text chunks (`{keyword: value}`) right after IHDR. */
export function addTextChunks(png, entries) {
  checkSignature(png);
  const ihdrEnd = 8 + 12 + new DataView(png.buffer, png.byteOffset + 8, 4).getUint32(0);
  const chunks = Object.entries(entries).map(([k, v]) => textChunk(k, String(v)));
  const out = new Uint8Array(png.length + chunks.reduce((n, c) => n + c.length, 0));
  out.set(png.subarray(0, ihdrEnd));
  let at = ihdrEnd;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  out.set(png.subarray(ihdrEnd), at);
  return out;
}

/** Reads every `tEXt`/`iTXt` chunk: `{keyword: value}` (CRCs are checked). */
export function readTextChunks(png) {
  checkSignature(png);
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  const out = {};
  for (let at = 8; at + 12 <= png.length; ) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...png.subarray(at + 4, at + 8));
    const data = png.subarray(at + 8, at + 8 + length);
    if (crc32(png.subarray(at + 4, at + 8 + length)) !== view.getUint32(at + 8 + length)) {
      throw new Error(`PNG chunk ${type} has a bad CRC`);
    }
    const nul = data.indexOf(0);
    if (type === 'tEXt') {
      out[String.fromCharCode(...data.subarray(0, nul))] = Array.from(data.subarray(nul + 1), (b) => String.fromCharCode(b)).join('');
    } else if (type === 'iTXt') {
      const key = String.fromCharCode(...data.subarray(0, nul));
      let p = nul + 3;
      p = data.indexOf(0, p) + 1; // language tag
      p = data.indexOf(0, p) + 1; // translated keyword
      out[key] = new TextDecoder().decode(data.subarray(p));
    }
    at += 12 + length;
  }
  return out;
}
