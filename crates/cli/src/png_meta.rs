//! PNG in and out of the command line, with the generation settings in text chunks.
//!
//! Written against the PNG spec (<https://www.w3.org/TR/png-3/>) on top of the inflate core
//! of `miniz_oxide` (already in the build, without its alloc feature). The `png`/`image`
//! crates would change the features of dependencies shared with burn (`simd-adler32` →
//! `miniz_oxide` → `backtrace`) and force a rebuild of burn, cubecl and wgpu.
//!
//! Reading: 8- and 16-bit grey, grey + alpha, RGB, RGBA and 8-bit palette images, not
//! interlaced; alpha is dropped, 16-bit keeps the high byte. Every problem (missing file, not
//! a PNG, zero size, too large, corrupt data) is one [`CliError::Usage`] line.
//! Writing: 8-bit RGB, stored (uncompressed) deflate blocks, one tEXt (Latin-1) or iTXt
//! (UTF-8) chunk per `(keyword, text)`.

use std::path::Path;

use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use unifusion_model::pipeline::Image;
use unifusion_model::pipeline::verifi::MAX_INPUT_SIDE;

use crate::CliError;

const SIGNATURE: [u8; 8] = [137, 80, 78, 71, 13, 10, 26, 10];
/// Largest accepted input file.
const MAX_INPUT_BYTES: u64 = 256 << 20;

/// `No such file or directory` → `no such file`, etc.
pub fn io_words(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &b in *part {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xedb8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// The chunks of a PNG file: `(type, data)`, CRCs checked.
/// `(type, data)` of one chunk.
type Chunk<'a> = ([u8; 4], &'a [u8]);

fn chunks(bytes: &[u8]) -> Result<Vec<Chunk<'_>>, String> {
    if bytes.len() < 8 || bytes[..8] != SIGNATURE {
        return Err("not a PNG image (only PNG is read)".into());
    }
    let mut out = Vec::new();
    let mut pos = 8;
    while pos < bytes.len() {
        let header = bytes
            .get(pos..pos + 8)
            .ok_or("truncated PNG (chunk header)")?;
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = [header[4], header[5], header[6], header[7]];
        let data = bytes
            .get(pos + 8..pos + 8 + len)
            .ok_or("truncated PNG (chunk data)")?;
        let crc = bytes
            .get(pos + 8 + len..pos + 12 + len)
            .ok_or("truncated PNG (chunk CRC)")?;
        if crc32(&[&kind, data]) != u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(format!(
                "corrupt PNG (bad CRC in a {} chunk)",
                String::from_utf8_lossy(&kind)
            ));
        }
        out.push((kind, data));
        pos += 12 + len;
        if &kind == b"IEND" {
            break;
        }
    }
    Ok(out)
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = a as i16 + b as i16 - c as i16;
    let (pa, pb, pc) = (
        (p - a as i16).abs(),
        (p - b as i16).abs(),
        (p - c as i16).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

/// Decodes PNG bytes into RGB8.
pub fn decode_png(bytes: &[u8]) -> Result<Image, String> {
    let chunks = chunks(bytes)?;
    let ihdr = chunks
        .iter()
        .find(|(k, _)| k == b"IHDR")
        .map(|(_, d)| *d)
        .filter(|d| d.len() == 13)
        .ok_or("not a PNG image (no IHDR)")?;
    let width = u32::from_be_bytes([ihdr[0], ihdr[1], ihdr[2], ihdr[3]]) as usize;
    let height = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]) as usize;
    let (depth, color, interlace) = (ihdr[8], ihdr[9], ihdr[12]);
    if width == 0 || height == 0 {
        return Err(format!("image is {width}×{height}: it has no pixels"));
    }
    if width > MAX_INPUT_SIDE || height > MAX_INPUT_SIDE {
        return Err(format!(
            "image is {width}×{height}: sides above {MAX_INPUT_SIDE} px are not accepted, downscale it first"
        ));
    }
    let channels = match color {
        0 => 1,
        2 => 3,
        3 => 1,
        4 => 2,
        6 => 4,
        _ => return Err(format!("corrupt PNG (colour type {color})")),
    };
    if !(depth == 8 || (depth == 16 && color != 3)) || interlace != 0 {
        return Err(format!(
            "unsupported PNG: bit depth {depth}{}; save it as 8-bit non-interlaced",
            if interlace != 0 { ", interlaced" } else { "" }
        ));
    }
    let palette: &[u8] = chunks
        .iter()
        .find(|(k, _)| k == b"PLTE")
        .map(|(_, d)| *d)
        .unwrap_or(&[]);
    if color == 3 && palette.is_empty() {
        return Err("corrupt PNG (palette image without PLTE)".into());
    }
    let idat: Vec<u8> = chunks
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let bpp = channels * depth as usize / 8;
    let stride = width * bpp;
    let mut raw = vec![0u8; height * (stride + 1)];
    let mut inflater = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER
        | inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_COMPUTE_ADLER32;
    let (status, _, written) = decompress(&mut inflater, &idat, &mut raw, 0, flags);
    if status != TINFLStatus::Done || written != raw.len() {
        return Err("corrupt PNG (image data does not inflate to its size)".into());
    }
    // Undo the per-row filters in place.
    let mut prev = vec![0u8; stride];
    let mut samples = Vec::with_capacity(height * stride);
    for row in raw.chunks_exact_mut(stride + 1) {
        let (filter, line) = row.split_at_mut(1);
        for i in 0..stride {
            let a = if i >= bpp { line[i - bpp] } else { 0 };
            let b = prev[i];
            let c = if i >= bpp { prev[i - bpp] } else { 0 };
            let add = match filter[0] {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                4 => paeth(a, b, c),
                f => return Err(format!("corrupt PNG (row filter {f})")),
            };
            line[i] = line[i].wrapping_add(add);
        }
        prev.copy_from_slice(line);
        samples.extend_from_slice(line);
    }
    let step = depth as usize / 8; // 16-bit: keep the high byte
    let mut pixels = Vec::with_capacity(width * height * 3);
    for px in samples.chunks_exact(bpp) {
        let s = |k: usize| px[k * step];
        match color {
            0 | 4 => pixels.extend_from_slice(&[s(0); 3]),
            2 | 6 => pixels.extend_from_slice(&[s(0), s(1), s(2)]),
            _ => {
                let i = s(0) as usize * 3;
                let rgb = palette
                    .get(i..i + 3)
                    .ok_or("corrupt PNG (palette index out of range)")?;
                pixels.extend_from_slice(rgb);
            }
        }
    }
    Ok(Image {
        width,
        height,
        pixels,
    })
}

/// Reads an RGB8 image from a PNG file.
pub fn read_image(path: &Path) -> Result<Image, CliError> {
    let usage = |m: String| CliError::Usage(format!("{}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| usage(io_words(&e)))?;
    if !meta.is_file() {
        return Err(usage("not a file".into()));
    }
    if meta.len() > MAX_INPUT_BYTES {
        return Err(usage(format!(
            "{} bytes: too large for a reference image (limit {} MiB)",
            meta.len(),
            MAX_INPUT_BYTES >> 20
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| usage(io_words(&e)))?;
    decode_png(&bytes).map_err(usage)
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// PNG bytes of `image` (8-bit RGB) with one text chunk per `(keyword, text)`.
pub fn encode_png(image: &Image, text: &[(&str, String)]) -> Result<Vec<u8>, String> {
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.pixels.len() != w * h * 3 {
        return Err(format!(
            "cannot write a {w}×{h} image from {} bytes",
            image.pixels.len()
        ));
    }
    let mut out = SIGNATURE.to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    for (key, value) in text {
        if key.is_empty() || key.len() > 79 || !key.bytes().all(|b| (32..=126).contains(&b)) {
            return Err(format!("bad PNG text keyword `{key}`"));
        }
        let latin1 = value.chars().all(|c| (c as u32) < 256 && c != '\0');
        let mut data = key.as_bytes().to_vec();
        data.push(0);
        if latin1 {
            data.extend(value.chars().map(|c| c as u8));
            chunk(&mut out, b"tEXt", &data);
        } else {
            // compression flag, method, empty language tag, empty translated keyword
            data.extend_from_slice(&[0, 0, 0, 0]);
            data.extend_from_slice(value.as_bytes());
            chunk(&mut out, b"iTXt", &data);
        }
    }
    let mut raw = Vec::with_capacity(h * (w * 3 + 1));
    for row in image.pixels.chunks_exact(w * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    // zlib stream of stored deflate blocks.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// Writes `image` as a PNG with its text chunks.
pub fn write_png(path: &Path, image: &Image, text: &[(&str, String)]) -> Result<(), CliError> {
    let usage = |m: String| CliError::Usage(format!("{}: {m}", path.display()));
    let bytes = encode_png(image, text).map_err(usage)?;
    std::fs::write(path, bytes).map_err(|e| usage(io_words(&e)))
}

/// The text chunks (tEXt, uncompressed iTXt) of PNG bytes.
#[cfg(test)]
pub fn png_text(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (kind, data) in chunks(bytes)? {
        let Some(nul) = data.iter().position(|&b| b == 0) else {
            continue;
        };
        let key = String::from_utf8_lossy(&data[..nul]).into_owned();
        match &kind {
            b"tEXt" => out.push((key, data[nul + 1..].iter().map(|&b| b as char).collect())),
            b"iTXt" if data.get(nul + 1) == Some(&0) => {
                // skip flag, method, language tag, translated keyword
                let rest = &data[nul + 3..];
                let mut parts = rest.splitn(3, |&b| b == 0);
                let (_, _, text) = (parts.next(), parts.next(), parts.next().unwrap_or(&[]));
                out.push((key, String::from_utf8_lossy(text).into_owned()));
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_text() {
        let image = Image {
            width: 3,
            height: 2,
            pixels: (0..18).map(|i| i as u8 * 13).collect(),
        };
        let text = [
            ("prompt", "a cube".to_string()),
            ("rewrite", "ein Würfel → blau".to_string()),
        ];
        let bytes = encode_png(&image, &text).expect("test value");
        assert_eq!(decode_png(&bytes).expect("test value"), image);
        let got = png_text(&bytes).expect("test value");
        assert_eq!(got[0], ("prompt".into(), "a cube".into()));
        assert_eq!(got[1], ("rewrite".into(), "ein Würfel → blau".into()));
    }

    #[test]
    fn crc_and_adler_match_known_values() {
        assert_eq!(crc32(&[b"IEND"]), 0xae42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert!(decode_png(b"GIF89a").is_err());
        assert!(decode_png(&SIGNATURE).is_err());
        let mut bytes = encode_png(
            &Image {
                width: 2,
                height: 2,
                pixels: vec![9; 12],
            },
            &[],
        )
        .expect("test value");
        let n = bytes.len();
        bytes[n - 20] ^= 0xff; // inside IDAT
        assert!(decode_png(&bytes).is_err());
    }
}
