//! The judge's eyes: an RGB image back to a scene.
//!
//! 1. Background: the named background colour most pixels are nearest to.
//! 2. Every pixel is explained as a blend `B + α (C − B)` of the background `B` and the object
//!    colour `C` whose blend line passes nearest (residual in RGB units). Anti-aliased and
//!    slightly blurred edges are exactly such blends, so they are not mistaken for other
//!    colours (a half-red pixel on white is pink-ish, but lies on the white→red line).
//!    Pixels with `α ≥ 0.5` and a small residual are labelled with `C`; the rest are rejected.
//! 3. 8-connected components per colour; the soft mask `α` around each gives its area and
//!    centroid, and components under a fixed fraction of a cell are dropped as specks.
//! 4. Shape by analysis-by-synthesis: each of the five unit shapes is scaled to the observed
//!    area, placed on the observed centroid and compared with the soft mask (soft IoU); the
//!    best fit wins. Its scale gives the size class, its box centre the grid cell.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::WorldError;
use crate::render::{MIN_SIZE, pixel_coverage, unit_area, unit_centroid};
use crate::scene::{Background, Cell, Color, GRID, Object, Scene, Shape, Size};

/// Tolerances of the judge.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    /// Largest RGB distance from a background→colour blend line for a pixel to count as that
    /// colour; rendered images have ~1, generated ones need slack.
    pub max_residual: f32,
    /// Components whose soft area is below this fraction of a cell are specks.
    pub min_area_fraction: f32,
    /// Supersampling of the shape templates.
    pub template_supersample: u32,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            max_residual: 48.0,
            min_area_fraction: 0.02,
            template_supersample: 4,
        }
    }
}

/// One object the judge found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParsedObject {
    /// What it reads as.
    pub object: Object,
    /// Soft area in pixels.
    pub area: f32,
    /// Soft IoU of the best shape template, in `[0, 1]`; low values mean a poorly drawn shape.
    pub fit: f32,
}

/// What the judge read from an image. Unlike a [`Scene`] it may break the scene rules (two
/// objects in a cell, none, more than four): a generated image can be wrong in those ways too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParsedScene {
    pub background: Background,
    /// Found objects, row-major by cell, larger first within a cell.
    pub objects: Vec<ParsedObject>,
}

impl ParsedScene {
    /// The found objects without their measurements.
    pub fn plain_objects(&self) -> Vec<Object> {
        self.objects.iter().map(|p| p.object).collect()
    }

    /// The reading as a valid scene, if it is one.
    pub fn to_scene(&self) -> Result<Scene, WorldError> {
        Scene::new(self.background, self.plain_objects())
    }
}

fn to_f32(rgb: [u8; 3]) -> [f32; 3] {
    rgb.map(f32::from)
}

/// `(α, residual)` of pixel `p` against the blend line from `b` to `c`.
fn blend(p: [f32; 3], b: [f32; 3], c: [f32; 3]) -> (f32, f32) {
    let d = [c[0] - b[0], c[1] - b[1], c[2] - b[2]];
    let q = [p[0] - b[0], p[1] - b[1], p[2] - b[2]];
    let dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    let alpha = ((q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / dd).clamp(0.0, 1.0);
    let residual = (0..3)
        .map(|i| (q[i] - alpha * d[i]).powi(2))
        .sum::<f32>()
        .sqrt();
    (alpha, residual)
}

fn distance2(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum()
}

/// The background most pixels are nearest to (object colours take part so that object
/// pixels vote for no background).
fn dominant_background(image: &RgbImage) -> Background {
    let mut votes = [0usize; 4];
    for pixel in image.pixels() {
        let p = to_f32(pixel.0);
        let nearest_bg = Background::ALL
            .iter()
            .enumerate()
            .map(|(i, b)| (i, distance2(p, to_f32(b.rgb()))))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let nearest_object = Color::ALL
            .iter()
            .map(|c| distance2(p, to_f32(c.rgb())))
            .fold(f32::MAX, f32::min);
        if let Some((i, d)) = nearest_bg
            && d <= nearest_object
        {
            votes[i] += 1;
        }
    }
    let best = (0..4)
        .max_by_key(|&i| (votes[i], std::cmp::Reverse(i)))
        .unwrap_or(0);
    Background::ALL[best]
}

/// Per-pixel reading: the nearest blend colour and its `α`, residual.
#[derive(Clone, Copy)]
struct PixelReading {
    color: usize,
    alpha: f32,
    residual: f32,
}

struct Component {
    color: usize,
    pixels: Vec<(u32, u32)>,
}

/// Reads `image` with the default tolerances.
pub fn parse_image(image: &RgbImage) -> Result<ParsedScene, WorldError> {
    parse_image_with(image, &JudgeConfig::default())
}

/// Reads `image` back into the objects it shows.
pub fn parse_image_with(image: &RgbImage, config: &JudgeConfig) -> Result<ParsedScene, WorldError> {
    let (w, h) = image.dimensions();
    if w.min(h) < MIN_SIZE {
        return Err(WorldError::ImageTooSmall(w.min(h)));
    }
    let background = dominant_background(image);
    let b = to_f32(background.rgb());
    let colors: Vec<[f32; 3]> = Color::ALL.iter().map(|c| to_f32(c.rgb())).collect();

    let readings: Vec<PixelReading> = image
        .pixels()
        .map(|px| {
            let p = to_f32(px.0);
            colors
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (alpha, residual) = blend(p, b, *c);
                    PixelReading {
                        color: i,
                        alpha,
                        residual,
                    }
                })
                .min_by(|x, y| x.residual.total_cmp(&y.residual))
                .unwrap_or(PixelReading {
                    color: 0,
                    alpha: 0.0,
                    residual: f32::MAX,
                })
        })
        .collect();
    let idx = |x: u32, y: u32| (y * w + x) as usize;
    let label = |r: &PixelReading| r.alpha >= 0.5 && r.residual <= config.max_residual;

    // 8-connected components of equally labelled pixels.
    let mut owner: Vec<Option<usize>> = vec![None; readings.len()];
    let mut components: Vec<Component> = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let r = readings[idx(x, y)];
            if !label(&r) || owner[idx(x, y)].is_some() {
                continue;
            }
            let id = components.len();
            let mut pixels = vec![(x, y)];
            owner[idx(x, y)] = Some(id);
            let mut next = 0;
            while next < pixels.len() {
                let (cx, cy) = pixels[next];
                next += 1;
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (nx, ny) = (i64::from(cx) + dx, i64::from(cy) + dy);
                        if nx < 0 || ny < 0 || nx >= i64::from(w) || ny >= i64::from(h) {
                            continue;
                        }
                        let (nx, ny) = (nx as u32, ny as u32);
                        let n = readings[idx(nx, ny)];
                        if owner[idx(nx, ny)].is_none() && label(&n) && n.color == r.color {
                            owner[idx(nx, ny)] = Some(id);
                            pixels.push((nx, ny));
                        }
                    }
                }
            }
            components.push(Component {
                color: r.color,
                pixels,
            });
        }
    }

    let cell_w = w as f32 / f32::from(GRID);
    let cell_h = h as f32 / f32::from(GRID);
    let min_area = config.min_area_fraction * cell_w * cell_h;
    let mut objects = Vec::new();
    for (id, component) in components.iter().enumerate() {
        let c = colors[component.color];
        // Window: the component's box plus a rim for anti-aliased or blurred edges.
        let x0 = component
            .pixels
            .iter()
            .map(|p| p.0)
            .min()
            .unwrap_or(0)
            .saturating_sub(RIM);
        let y0 = component
            .pixels
            .iter()
            .map(|p| p.1)
            .min()
            .unwrap_or(0)
            .saturating_sub(RIM);
        let x1 = (component.pixels.iter().map(|p| p.0).max().unwrap_or(0) + RIM + 1).min(w);
        let y1 = (component.pixels.iter().map(|p| p.1).max().unwrap_or(0) + RIM + 1).min(h);
        let mut mask = Vec::with_capacity(((x1 - x0) * (y1 - y0)) as usize);
        for y in y0..y1 {
            for x in x0..x1 {
                let a = match owner[idx(x, y)] {
                    Some(o) if o == id => readings[idx(x, y)].alpha,
                    Some(_) => 0.0,
                    None => {
                        let (alpha, residual) = blend(to_f32(image.get_pixel(x, y).0), b, c);
                        if residual <= config.max_residual {
                            alpha
                        } else {
                            0.0
                        }
                    }
                };
                mask.push((x, y, a));
            }
        }
        let area: f32 = mask.iter().map(|m| m.2).sum();
        if area < min_area {
            continue;
        }
        let centroid = (
            mask.iter().map(|m| m.2 * (m.0 as f32 + 0.5)).sum::<f32>() / area,
            mask.iter().map(|m| m.2 * (m.1 as f32 + 0.5)).sum::<f32>() / area,
        );
        let observed = Window {
            x0,
            y0,
            x1,
            y1,
            mask: &mask,
        };
        let (shape, scale, centre, fit) = Shape::ALL
            .iter()
            .map(|&shape| {
                let scale = (area / unit_area(shape)).sqrt();
                let (du, dv) = unit_centroid(shape);
                let centre = (centroid.0 - du * scale, centroid.1 - dv * scale);
                let fit = observed.best_fit(shape, centre, scale, config.template_supersample);
                (shape, scale, centre, fit)
            })
            .max_by(|a, b| a.3.total_cmp(&b.3))
            .unwrap_or((Shape::Circle, 0.0, centroid, 0.0));
        let grid = |v: f32, side: f32| ((v / side).floor().clamp(0.0, f32::from(GRID - 1))) as u8;
        let cell = Cell::new(grid(centre.1, cell_h), grid(centre.0, cell_w))?;
        objects.push(ParsedObject {
            object: Object {
                shape,
                color: Color::ALL[component.color],
                size: Size::from_fraction(scale / cell_w.min(cell_h)),
                cell,
            },
            area,
            fit,
        });
    }
    objects.sort_by(|a, b| {
        a.object
            .cell
            .cmp(&b.object.cell)
            .then(b.area.total_cmp(&a.area))
    });
    Ok(ParsedScene {
        background,
        objects,
    })
}

/// The soft mask of one component over its window.
struct Window<'a> {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
    mask: &'a [(u32, u32, f32)],
}

impl Window<'_> {
    /// The best soft IoU `Σ min(a, t) / Σ max(a, t)` of the mask and the shape's template,
    /// over a few blur widths: a generator's soft edges are matched by an equally soft
    /// template, so a blurred star is not mistaken for a sharp disc.
    fn best_fit(&self, shape: Shape, centre: (f32, f32), scale: f32, n: u32) -> f32 {
        // Region: the window and the template's box, padded for the widest blur.
        let pad = (3.0 * TEMPLATE_BLURS[TEMPLATE_BLURS.len() - 1]).ceil() as i64 + 1;
        let half = 0.5 * scale;
        let rx0 = i64::from(self.x0).min((centre.0 - half).floor() as i64 - pad);
        let ry0 = i64::from(self.y0).min((centre.1 - half).floor() as i64 - pad);
        let rx1 = i64::from(self.x1).max((centre.0 + half).ceil() as i64 + pad);
        let ry1 = i64::from(self.y1).max((centre.1 + half).ceil() as i64 + pad);
        let (rw, rh) = ((rx1 - rx0) as usize, (ry1 - ry0) as usize);
        let width = (self.x1 - self.x0) as usize;
        let mut observed = vec![0.0f32; rw * rh];
        let mut template = vec![0.0f32; rw * rh];
        for yy in 0..rh {
            for xx in 0..rw {
                let (x, y) = (rx0 + xx as i64, ry0 + yy as i64);
                let inside = x >= i64::from(self.x0)
                    && x < i64::from(self.x1)
                    && y >= i64::from(self.y0)
                    && y < i64::from(self.y1);
                if inside {
                    let (wx, wy) = (
                        (x - i64::from(self.x0)) as usize,
                        (y - i64::from(self.y0)) as usize,
                    );
                    observed[yy * rw + xx] = self.mask[wy * width + wx].2;
                }
                // Template coverage off the window (even off the image) counts against the fit.
                template[yy * rw + xx] = pixel_coverage(shape, centre, scale, x, y, n);
            }
        }
        TEMPLATE_BLURS
            .iter()
            .map(|&sigma| {
                let blurred = gaussian_blur(&template, rw, rh, sigma);
                let (mut inter, mut union) = (0.0f32, 0.0f32);
                for (a, t) in observed.iter().zip(&blurred) {
                    inter += a.min(*t);
                    union += a.max(*t);
                }
                if union > 0.0 { inter / union } else { 0.0 }
            })
            .fold(0.0, f32::max)
    }
}

/// Blur widths (Gaussian σ in pixels) tried for each template; 0 is the sharp render.
const TEMPLATE_BLURS: [f32; 4] = [0.0, 0.7, 1.2, 1.8];
/// Rim around a component's box that still belongs to its soft mask.
const RIM: u32 = 3;

/// Separable Gaussian blur of a `w×h` map with zero padding; σ = 0 returns it unchanged.
fn gaussian_blur(map: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return map.to_vec();
    }
    let radius = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f32> = (-radius..=radius)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let norm: f32 = kernel.iter().sum();
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0.0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (k, weight) in kernel.iter().enumerate() {
                    let d = k as i64 - radius;
                    let (sx, sy) = if horizontal {
                        (x as i64 + d, y as i64)
                    } else {
                        (x as i64, y as i64 + d)
                    };
                    if sx >= 0 && sy >= 0 && (sx as usize) < w && (sy as usize) < h {
                        acc += weight * src[sy as usize * w + sx as usize];
                    }
                }
                out[y * w + x] = acc / norm;
            }
        }
        out
    };
    pass(&pass(map, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{RenderConfig, render};
    use crate::sampler::{Sampler, SamplerConfig};

    #[test]
    fn blend_explains_antialiased_edges() {
        let white = to_f32([255, 255, 255]);
        let red = to_f32(Color::Red.rgb());
        let half = [237.5, 142.5, 142.5];
        let (alpha, residual) = blend(half, white, red);
        assert!((alpha - 0.5).abs() < 1e-3 && residual < 1e-3);
    }

    #[test]
    fn reads_a_hand_made_scene() {
        let scene = Scene::from_json(
            r#"{"background":"beige","objects":[
                {"shape":"ring","color":"blue","size":"small","cell":[0,0]},
                {"shape":"star","color":"yellow","size":"medium","cell":[1,2]},
                {"shape":"triangle","color":"pink","size":"large","cell":[2,1]}]}"#,
        )
        .expect("valid");
        let image = render(&scene, &RenderConfig::default()).expect("renders");
        let parsed = parse_image(&image).expect("reads");
        assert_eq!(parsed.to_scene().expect("valid reading"), scene);
    }

    #[test]
    fn reads_sampled_scenes_at_128() {
        for scene in Sampler::new(SamplerConfig::default(), 5).take(40) {
            let image = render(&scene, &RenderConfig::with_size(128)).expect("renders");
            let parsed = parse_image(&image).expect("reads");
            assert_eq!(
                parsed.plain_objects(),
                scene.objects(),
                "{}",
                scene.to_json()
            );
        }
    }
}
