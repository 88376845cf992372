//! 3-axis rotary position embedding on (t, h, w) positions, FLUX/Krea 2 layout
//! (diffusers `Krea2RotaryPosEmbed` + `apply_rotary_emb(use_real=True)`): axis `i` owns
//! `axes_dims[i]` channels of each head, frequencies `θ^(−2j/d)`, each angle repeated for an
//! adjacent channel pair, and pairs rotate as `(a, b) → (a·cos − b·sin, b·cos + a·sin)`.
//! Angles are computed on the host in f64 (as diffusers does) and uploaded once per layout.

use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// `(t, h, w)` rows for `[text; image]`: text tokens at the origin, image token `(row, col)`
/// of the `grid_h × grid_w` patch grid at `(0, row, col)`, row-major (Krea 2's
/// `prepare_position_ids`).
pub fn position_ids(text_len: usize, grid_h: usize, grid_w: usize) -> Vec<[f32; 3]> {
    let text = std::iter::repeat_n([0.0; 3], text_len);
    let image = (0..grid_h).flat_map(move |r| (0..grid_w).map(move |c| [0.0, r as f32, c as f32]));
    text.chain(image).collect()
}

/// Where the DiT places the VLM's image-token condition rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImagePositions {
    /// At the origin with the text (Krea 2): where a reference's content lies must be read
    /// from the states themselves.
    #[default]
    Origin,
    /// On the latent grid (FLUX Kontext's context image): tile `j`'s `s × s` tokens spread
    /// over the `grid_h × grid_w` latent grid at `t = 1 + j`, each at the centre of the
    /// latent region it covers, so a reference lines up with the image being made.
    Grid,
}

impl ImagePositions {
    /// Whether this is the default layout (serde leaves it out of the configs it writes).
    pub fn is_origin(&self) -> bool {
        *self == ImagePositions::Origin
    }
}

/// Where the DiT places the condition's text rows (and image-token rows left with them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextPositions {
    /// At `(0, 0, 0)`, a corner of the latent grid (Krea 2, FLUX). A latent token at `(r, c)`
    /// then sees every text row at offset `(−r, −c)`, and with θ = 1000 over a small grid the
    /// only rotations that vary across it are the fastest, aliased one and a near-linear
    /// ramp: "middle" is no simple function of the offset.
    #[default]
    Origin,
    /// At the grid's centre, `(0, (grid_h − 1)/2, (grid_w − 1)/2)`: offsets run symmetric
    /// around 0, so `cos` of an offset peaks on the middle cells and `sin` of a slow
    /// frequency orders left from right, a basis in which attention to "top left" or
    /// "center" is one direction of the query. Measured against the origin at 5000 DiT
    /// steps (run r25, docs/TRAINING.md): level held out, worse on single objects.
    Center,
}

impl TextPositions {
    /// Whether this is the default layout (serde leaves it out of the configs it writes).
    pub fn is_origin(&self) -> bool {
        *self == TextPositions::Origin
    }
}

/// `(t, h, w)` rows for `[image tokens; text; image]` when the first `image_rows` condition
/// rows are image tokens, `tokens_per_tile` (a square, `s²`) per tile: the text rows (and
/// image-token rows that stay with them) where `text` says; with [`ImagePositions::Grid`],
/// token `(r, c)` of tile `j` sits at `(1 + j, (r + ½)·grid_h/s − ½, (c + ½)·grid_w/s − ½)`;
/// the latent grid as [`position_ids`].
pub fn condition_position_ids(
    layout: ImagePositions,
    text: TextPositions,
    image_rows: usize,
    tokens_per_tile: usize,
    text_len: usize,
    grid_h: usize,
    grid_w: usize,
) -> Vec<[f32; 3]> {
    let mut ids = position_ids(text_len, grid_h, grid_w);
    if text == TextPositions::Center {
        let centre = |grid: usize| grid.saturating_sub(1) as f32 / 2.0;
        for id in ids.iter_mut().take(text_len) {
            *id = [0.0, centre(grid_h), centre(grid_w)];
        }
    }
    let side = (tokens_per_tile as f64).sqrt().round() as usize;
    if layout == ImagePositions::Origin || side == 0 || side * side != tokens_per_tile {
        return ids;
    }
    let place = |i: usize, grid: usize| ((i as f64 + 0.5) * grid as f64 / side as f64 - 0.5) as f32;
    for (row, id) in ids.iter_mut().take(image_rows.min(text_len)).enumerate() {
        let (tile, k) = (row / tokens_per_tile, row % tokens_per_tile);
        *id = [
            (1 + tile) as f32,
            place(k / side, grid_h),
            place(k % side, grid_w),
        ];
    }
    ids
}

/// The cos/sin tables for one sequence layout, `[rows, seq, head_dim]` each (`rows` = 1: one
/// layout for the whole batch; else one per sample).
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// `cos(angle)` per channel.
    cos: Tensor<3>,
    /// `sin(angle)` per channel, negated on even channels so that
    /// `rope(x) = x·cos + swap_pairs(x)·sin`.
    sin_signed: Tensor<3>,
    /// The `(h, w)` positions of every row, per layout (for [`Self::absolute_embedding`]).
    hw: Vec<Vec<[f32; 2]>>,
}

impl RopeTable {
    /// Tables for `positions` (one `(t, h, w)` row per token), `axes_dims` summing to the head dim.
    pub fn new(positions: &[[f32; 3]], axes_dims: [usize; 3], theta: f64, device: &Device) -> Self {
        Self::per_sample(&[positions], axes_dims, theta, device)
    }

    /// One table per sample of a batch (`layouts` of equal length). Identical layouts (a batch
    /// without image tokens, or with them at the origin) make one shared table, as [`Self::new`].
    ///
    /// # Panics
    /// If `layouts` is empty or its layouts differ in length.
    pub fn per_sample(
        layouts: &[&[[f32; 3]]],
        axes_dims: [usize; 3],
        theta: f64,
        device: &Device,
    ) -> Self {
        let seq = layouts.first().map_or(0, |l| l.len());
        assert!(
            !layouts.is_empty() && layouts.iter().all(|l| l.len() == seq),
            "RoPE layouts must be one or more of equal length"
        );
        let layouts = if layouts.iter().all(|l| *l == layouts[0]) {
            &layouts[..1]
        } else {
            layouts
        };
        let head_dim: usize = axes_dims.iter().sum();
        let mut cos = Vec::with_capacity(layouts.len() * seq * head_dim);
        let mut sin = Vec::with_capacity(layouts.len() * seq * head_dim);
        for pos in layouts.iter().flat_map(|l| l.iter()) {
            for (axis, &dim) in axes_dims.iter().enumerate() {
                for j in 0..dim / 2 {
                    let freq = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = pos[axis] as f64 * freq;
                    let (s, c) = angle.sin_cos();
                    cos.extend([c as f32, c as f32]);
                    sin.extend([-(s as f32), s as f32]);
                }
            }
        }
        let shape = [layouts.len(), seq, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin_signed: Tensor::from_data(TensorData::new(sin, shape), device),
            hw: layouts
                .iter()
                .map(|l| l.iter().map(|p| [p[1], p[2]]).collect())
                .collect(),
        }
    }

    /// A fixed 2-D sine-cosine embedding of the last `rows` rows' absolute `(h, w)` positions
    /// (DiT's and SD3's `get_2d_sincos_pos_embed`: `dim / 2` channels per axis, each
    /// `[sin(p·ω_k); cos(p·ω_k)]` with `ω_k = 10000^(−k / (dim / 4))`), `[layouts, rows, dim]`,
    /// added to the image tokens by a DiT with `abs_pos_embed`. `dim` must be a multiple of 4
    /// (the config's validation checks it).
    pub fn absolute_embedding(&self, rows: usize, dim: usize, device: &Device) -> Tensor<3> {
        let (quarter, rows) = (dim / 4, rows.min(self.len()));
        let mut out = Vec::with_capacity(self.hw.len() * rows * dim);
        for layout in &self.hw {
            for hw in &layout[layout.len() - rows..] {
                for &p in hw {
                    let angles = (0..quarter)
                        .map(|k| p as f64 * 10000f64.powf(-(k as f64) / quarter as f64));
                    out.extend(angles.clone().map(|a| a.sin() as f32));
                    out.extend(angles.map(|a| a.cos() as f32));
                }
            }
        }
        Tensor::from_data(
            TensorData::new(out, [self.hw.len(), rows, 4 * quarter]),
            device,
        )
    }

    /// Rows (tokens) in the table.
    pub fn len(&self) -> usize {
        self.cos.dims()[1]
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Layouts in the table: 1 (shared by the batch) or one per sample.
    pub fn layouts(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` (seq = the table's rows; a per-sample table
    /// has `batch` layouts).
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, seq, heads, head_dim] = x.dims();
        let layouts = self.cos.dims()[0];
        let cos = self.cos.clone().reshape([layouts, seq, 1, head_dim]);
        let sin = self.sin_signed.clone().reshape([layouts, seq, 1, head_dim]);
        let swapped = x
            .clone()
            .reshape([batch, seq, heads, head_dim / 2, 2])
            .flip([4])
            .reshape([batch, seq, heads, head_dim]);
        x * cos + swapped * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_ids_put_text_at_origin_and_image_on_the_grid() {
        let ids = position_ids(2, 2, 3);
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[0], [0.0, 0.0, 0.0]);
        assert_eq!(ids[1], [0.0, 0.0, 0.0]);
        assert_eq!(ids[2], [0.0, 0.0, 0.0]);
        assert_eq!(ids[4], [0.0, 0.0, 2.0]);
        assert_eq!(ids[5], [0.0, 1.0, 0.0]);
        assert_eq!(ids[7], [0.0, 1.0, 2.0]);
    }

    #[test]
    fn grid_positions_spread_each_tile_over_the_latent_grid() {
        // 2 tiles of 2×2 tokens, 1 text row, a 4×4 latent grid.
        let ids =
            condition_position_ids(ImagePositions::Grid, TextPositions::Origin, 8, 4, 9, 4, 4);
        assert_eq!(ids.len(), 9 + 16);
        assert_eq!(ids[0], [1.0, 0.5, 0.5]);
        assert_eq!(ids[1], [1.0, 0.5, 2.5]);
        assert_eq!(ids[2], [1.0, 2.5, 0.5]);
        assert_eq!(ids[3], [1.0, 2.5, 2.5]);
        assert_eq!(ids[4], [2.0, 0.5, 0.5]);
        assert_eq!(ids[8], [0.0, 0.0, 0.0]);
        assert_eq!(ids[9..], position_ids(9, 4, 4)[9..]);
        let origin =
            condition_position_ids(ImagePositions::Origin, TextPositions::Origin, 8, 4, 9, 4, 4);
        assert_eq!(origin, position_ids(9, 4, 4));
        // A token count that is no square grid keeps the origin.
        assert_eq!(
            condition_position_ids(ImagePositions::Grid, TextPositions::Origin, 3, 3, 4, 2, 2),
            position_ids(4, 2, 2)
        );
    }

    #[test]
    fn centred_text_sits_mid_grid_and_moves_nothing_else() {
        // 2 tiles of 2×2 tokens, 1 text row, a 4×6 latent grid.
        let ids =
            condition_position_ids(ImagePositions::Origin, TextPositions::Center, 8, 4, 9, 4, 6);
        assert!(ids[..9].iter().all(|id| *id == [0.0, 1.5, 2.5]));
        assert_eq!(ids[9..], position_ids(9, 4, 6)[9..]);
        // Image tokens placed on the grid stay there; only the text moves.
        let grid =
            condition_position_ids(ImagePositions::Grid, TextPositions::Center, 8, 4, 9, 4, 6);
        let grid_origin =
            condition_position_ids(ImagePositions::Grid, TextPositions::Origin, 8, 4, 9, 4, 6);
        assert_eq!(grid[..8], grid_origin[..8]);
        assert_eq!(grid[8], [0.0, 1.5, 2.5]);
        assert_eq!(grid[9..], grid_origin[9..]);
    }

    #[test]
    fn the_absolute_embedding_is_sine_cosine_of_each_image_rows_grid_position() {
        let device = Device::flex();
        // 2 text rows at the origin, a 2 × 3 grid; width 8: 2 frequencies per axis.
        let table = RopeTable::new(&position_ids(2, 2, 3), [2, 2, 4], 1000.0, &device);
        let emb = table.absolute_embedding(6, 8, &device);
        assert_eq!(emb.dims(), [1, 6, 8]);
        let v = emb.into_data().try_to_vec::<f32>().expect("f32");
        // Image row 4 is grid cell (1, 1); row 5 is (1, 2). ω = 1, 10000^(-1/2) = 0.01.
        let want = |h: f32, w: f32| {
            let a = [h, h * 0.01, w, w * 0.01];
            [
                a[0].sin(),
                a[1].sin(),
                a[0].cos(),
                a[1].cos(),
                a[2].sin(),
                a[3].sin(),
                a[2].cos(),
                a[3].cos(),
            ]
        };
        for (row, (h, w)) in [(0, (0.0, 0.0)), (4, (1.0, 1.0)), (5, (1.0, 2.0))] {
            for (got, want) in v[row * 8..row * 8 + 8].iter().zip(want(h, w)) {
                assert!((got - want).abs() < 1e-6, "row {row}: {got} vs {want}");
            }
        }
        // Per-sample layouts give one embedding each.
        let a = position_ids(1, 1, 2);
        let b =
            condition_position_ids(ImagePositions::Origin, TextPositions::Center, 0, 1, 1, 1, 2);
        let per = RopeTable::per_sample(&[&a, &b], [2, 2, 4], 1000.0, &device);
        assert_eq!(per.absolute_embedding(2, 8, &device).dims(), [2, 2, 8]);
    }

    #[test]
    fn a_per_sample_table_rotates_each_sample_by_its_own_layout() {
        let device = Device::flex();
        let axes = [2, 2, 4];
        let a = condition_position_ids(ImagePositions::Grid, TextPositions::Origin, 4, 4, 5, 2, 2);
        let b = position_ids(5, 2, 2);
        let x = Tensor::<4>::random(
            [2, 9, 1, 8],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let table = RopeTable::per_sample(&[&a, &b], axes, 100.0, &device);
        assert_eq!(table.layouts(), 2);
        assert_eq!(
            RopeTable::per_sample(&[&b, &b], axes, 100.0, &device).layouts(),
            1
        );
        let both = table.apply(x.clone());
        for (i, layout) in [&a, &b].into_iter().enumerate() {
            let one = RopeTable::new(layout, axes, 100.0, &device).apply(x.clone().narrow(0, i, 1));
            let got = both.clone().narrow(0, i, 1);
            let diff: f32 = (got - one).abs().max().into_scalar();
            assert!(diff < 1e-6, "sample {i}: {diff}");
        }
        // The two layouts differ, so their rotations must too.
        let diff: f32 = (both.clone().narrow(0, 0, 1)
            - RopeTable::new(&b, axes, 100.0, &device).apply(x.narrow(0, 0, 1)))
        .abs()
        .max()
        .into_scalar();
        assert!(diff > 1e-3);
    }
}
