//! Images in and out of the command line: PNG, JPEG or WebP in (the `image` crate, format
//! sniffed from the bytes, decoder limits on), PNG out with the generation settings in text
//! chunks (the `png` crate: tEXt for Latin-1 text, iTXt for anything else).
//!
//! Every problem (missing file, not an image, zero size, too large, corrupt data) is one
//! [`CliError::Usage`] line naming the file.

use std::io::Cursor;
use std::path::Path;

use image::{ImageReader, Limits};
use unifusion_model::pipeline::Image;
use unifusion_model::pipeline::verifi::MAX_INPUT_SIDE;

use crate::CliError;

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

/// Decodes PNG, JPEG or WebP bytes into RGB8 (alpha dropped, 16-bit rounded to 8).
pub fn decode_image(bytes: &[u8]) -> Result<Image, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not an image (PNG, JPEG or WebP)".into());
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE as u32);
    limits.max_image_height = Some(MAX_INPUT_SIDE as u32);
    limits.max_alloc = Some(1 << 30);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            format!("too large (the limit is {MAX_INPUT_SIDE} px a side)")
        }
        image::ImageError::Unsupported(_) => "not an image (PNG, JPEG or WebP)".into(),
        e => format!("corrupt image: {e}"),
    })?;
    let rgb = decoded.into_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    if width == 0 || height == 0 {
        return Err("the image is empty (zero width or height)".into());
    }
    Ok(Image {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

/// Reads an RGB8 image from a PNG, JPEG or WebP file.
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
    decode_image(&bytes).map_err(usage)
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
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        if key.is_empty() || key.len() > 79 || !key.bytes().all(|b| (32..=126).contains(&b)) {
            return Err(format!("bad PNG text keyword `{key}`"));
        }
        let latin1 = value.chars().all(|c| (c as u32) < 256 && c != '\0');
        let added = if latin1 {
            encoder.add_text_chunk(key.to_string(), value.clone())
        } else {
            encoder.add_itxt_chunk(key.to_string(), value.clone())
        };
        added.map_err(|e| format!("PNG text `{key}`: {e}"))?;
    }
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&image.pixels)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Writes `image` as a PNG with its text chunks.
pub fn write_png(path: &Path, image: &Image, text: &[(&str, String)]) -> Result<(), CliError> {
    let usage = |m: String| CliError::Usage(format!("{}: {m}", path.display()));
    let bytes = encode_png(image, text).map_err(usage)?;
    std::fs::write(path, bytes).map_err(|e| usage(io_words(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(keyword, text)` of every tEXt and iTXt chunk, read by the `png` crate.
    fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
        let reader = png::Decoder::new(Cursor::new(bytes))
            .read_info()
            .expect("test value");
        let info = reader.info();
        let mut out: Vec<(String, String)> = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        for t in &info.utf8_text {
            out.push((t.keyword.clone(), t.get_text().expect("test value")));
        }
        out
    }

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
        assert_eq!(decode_image(&bytes).expect("test value"), image);
        let got = png_text(&bytes);
        assert!(got.contains(&("prompt".into(), "a cube".into())), "{got:?}");
        assert!(
            got.contains(&("rewrite".into(), "ein Würfel → blau".into())),
            "{got:?}"
        );
    }

    /// CRC-32 (PNG's) of a chunk's type + data, for hand-edited test headers.
    fn crc32fast_ihdr(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xedb8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn huge_images_are_refused_before_decoding() {
        let wide = Image {
            width: MAX_INPUT_SIDE + 1,
            height: 1,
            pixels: vec![7; (MAX_INPUT_SIDE + 1) * 3],
        };
        let err = decode_image(&encode_png(&wide, &[]).expect("test value")).expect_err("too wide");
        assert!(err.contains("too large"), "{err}");
        let ok = Image {
            width: MAX_INPUT_SIDE,
            height: 1,
            pixels: vec![7; MAX_INPUT_SIDE * 3],
        };
        assert!(decode_image(&encode_png(&ok, &[]).expect("test value")).is_ok());
    }

    #[test]
    fn jpeg_is_read_too() {
        let mut jpeg = Vec::new();
        let rgb =
            image::RgbImage::from_fn(8, 4, |x, y| image::Rgb([x as u8 * 30, y as u8 * 60, 128]));
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&rgb)
            .expect("test value");
        let got = decode_image(&jpeg).expect("test value");
        assert_eq!((got.width, got.height), (8, 4));
        let close = got
            .pixels
            .iter()
            .zip(rgb.as_raw())
            .all(|(&a, &b)| a.abs_diff(b) <= 12);
        assert!(close, "JPEG pixels far from the source");
    }

    #[test]
    fn bad_bytes_and_bad_keywords_are_errors() {
        assert!(decode_image(b"GIF89a").is_err());
        assert!(decode_image(b"hello").is_err());
        let mut bytes = encode_png(
            &Image {
                width: 2,
                height: 2,
                pixels: vec![9; 12],
            },
            &[],
        )
        .expect("test value");
        assert!(
            decode_image(&bytes[..bytes.len() / 2]).is_err(),
            "truncated"
        );
        let n = bytes.len();
        bytes[n - 20] ^= 0xff; // inside IDAT
        assert!(decode_image(&bytes).is_err());
        let image = Image {
            width: 1,
            height: 1,
            pixels: vec![0; 3],
        };
        assert!(encode_png(&image, &[("", "x".into())]).is_err());
        // A zero-width header (CRC fixed up, so only the size is wrong) is an error too.
        let mut zero = encode_png(&image, &[]).expect("test value");
        zero[16..20].copy_from_slice(&0u32.to_be_bytes());
        let crc = crc32fast_ihdr(&zero[12..29]);
        zero[29..33].copy_from_slice(&crc.to_be_bytes());
        assert!(decode_image(&zero).is_err(), "zero width");
        assert!(encode_png(&image, &[("bad\nkey", "x".into())]).is_err());
    }
}
