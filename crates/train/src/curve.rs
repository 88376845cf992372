//! Loss curves: one row per optimizer step, written as CSV and drawn as a PNG plot (raw loss
//! in light grey, an exponential moving average in colour, log-scale y axis, tick labels in a
//! 3×5 pixel font so the plot needs no font files).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::TrainError;

/// The losses of one stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossCurve {
    /// `(step, loss, learning rate)`, steps counted from 1.
    pub rows: Vec<(usize, f32, f64)>,
}

impl LossCurve {
    /// The CSV text: `step,loss,lr`.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("step,loss,lr\n");
        for (step, loss, lr) in &self.rows {
            s.push_str(&format!("{step},{loss},{lr:e}\n"));
        }
        s
    }

    /// Parses [`LossCurve::to_csv`] output (a resumed run continues its curve).
    pub fn from_csv(text: &str) -> Result<Self, TrainError> {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate().skip(1) {
            let bad = || TrainError::Checkpoint(format!("loss.csv line {}: `{line}`", i + 1));
            let mut parts = line.split(',');
            let step = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let loss = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let lr = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            rows.push((step, loss, lr));
        }
        Ok(Self { rows })
    }

    /// Mean loss of the first and last `n` steps (a short run's "did it learn" check).
    pub fn first_last_mean(&self, n: usize) -> (f32, f32) {
        let n = n.clamp(1, self.rows.len().max(1));
        let mean = |rows: &[(usize, f32, f64)]| {
            rows.iter().map(|r| r.1).sum::<f32>() / rows.len().max(1) as f32
        };
        let k = self.rows.len();
        (
            mean(&self.rows[..n.min(k)]),
            mean(&self.rows[k.saturating_sub(n)..]),
        )
    }

    /// Exponential moving average of the loss (`alpha` weight of the newest value).
    pub fn smoothed(&self, alpha: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows.len());
        let mut ema = None;
        for &(_, loss, _) in &self.rows {
            let v = match ema {
                None => loss,
                Some(e) => e + alpha * (loss - e),
            };
            ema = Some(v);
            out.push(v);
        }
        out
    }

    /// Writes `loss.csv` and `loss.png` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::write(dir.join("loss.csv"), self.to_csv())
            .map_err(|e| TrainError::io(&dir.join("loss.csv"), e))?;
        let path = dir.join("loss.png");
        self.plot(640, 360)
            .save(&path)
            .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
    }

    /// The plot: x = step, y = loss on a log scale.
    pub fn plot(&self, width: u32, height: u32) -> RgbImage {
        let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
        let (left, right, top, bottom) = (44i64, 12i64, 10i64, 18i64);
        let (w, h) = (width as i64 - left - right, height as i64 - top - bottom);
        let finite: Vec<f32> = self
            .rows
            .iter()
            .map(|r| r.1)
            .filter(|l| l.is_finite() && *l > 0.0)
            .collect();
        let axis = Rgb([0, 0, 0]);
        line(&mut img, (left, top), (left, top + h), axis);
        line(&mut img, (left, top + h), (left + w, top + h), axis);
        if finite.is_empty() || w < 2 || h < 2 {
            return img;
        }
        let lo = finite.iter().cloned().fold(f32::INFINITY, f32::min).log10();
        let hi = finite
            .iter()
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max)
            .log10();
        let (lo, hi) = if hi - lo < 1e-3 {
            (lo - 0.5, hi + 0.5)
        } else {
            (lo, hi)
        };
        let last_step = self.rows.last().map(|r| r.0).unwrap_or(1).max(2) as f32;
        let to_px = |step: usize, loss: f32| {
            let x = left + ((step as f32 - 1.0) / (last_step - 1.0) * (w - 1) as f32) as i64;
            let y = top + ((hi - loss.max(1e-30).log10()) / (hi - lo) * (h - 1) as f32) as i64;
            (x, y)
        };
        // Decade grid lines with labels.
        let grey = Rgb([225, 225, 225]);
        for d in (lo.floor() as i32)..=(hi.ceil() as i32) {
            for m in [1.0f32, 2.0, 5.0] {
                let v = m * 10f32.powi(d);
                let lv = v.log10();
                if lv < lo || lv > hi {
                    continue;
                }
                let (_, y) = to_px(1, v);
                line(&mut img, (left + 1, y), (left + w, y), grey);
                text(&mut img, 2, y - 2, &label(v), axis);
            }
        }
        text(&mut img, left, top + h + 6, "1", axis);
        let end = format!("{}", last_step as usize);
        text(
            &mut img,
            left + w - 4 * end.len() as i64,
            top + h + 6,
            &end,
            axis,
        );
        let raw = Rgb([190, 190, 190]);
        for pair in self.rows.windows(2) {
            line(
                &mut img,
                to_px(pair[0].0, pair[0].1),
                to_px(pair[1].0, pair[1].1),
                raw,
            );
        }
        // About a 20th of the run per averaging window, so short runs are not all lag.
        let alpha = (20.0 / self.rows.len().max(1) as f32).clamp(0.02, 0.3);
        let smooth = self.smoothed(alpha);
        let blue = Rgb([20, 80, 200]);
        for (i, pair) in smooth.windows(2).enumerate() {
            let (a, b) = (self.rows[i].0, self.rows[i + 1].0);
            line(&mut img, to_px(a, pair[0]), to_px(b, pair[1]), blue);
        }
        img
    }
}

/// Short tick label: `0.02`, `5`, `1e-4`.
fn label(v: f32) -> String {
    if (0.01..1000.0).contains(&v) {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!(
            "{:.0}e{}",
            v / 10f32.powi(v.log10().floor() as i32),
            v.log10().floor() as i32
        )
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham.
fn line(img: &mut RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// 3×5 glyphs, one row per u16 nibble triple (bit 2 = left column).
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (k, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) != 0 {
                    put(img, x + 4 * k as i64 + col, y + row as i64, c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_and_plot_draws() {
        let curve = LossCurve {
            rows: (1..=50)
                .map(|s| (s, 1.0 / s as f32, 1e-3 * s as f64))
                .collect(),
        };
        assert_eq!(LossCurve::from_csv(&curve.to_csv()).expect("parses"), curve);
        let img = curve.plot(320, 200);
        let blue = img.pixels().filter(|p| p.0 == [20, 80, 200]).count();
        assert!(blue > 100, "the smoothed curve is drawn ({blue} px)");
        let (first, last) = curve.first_last_mean(5);
        assert!(first > last);
    }
}
