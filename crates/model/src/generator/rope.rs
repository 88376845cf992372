//! 3-axis rotary position embedding on (t, h, w) positions, FLUX/Krea 2 layout
//! (diffusers `Krea2RotaryPosEmbed` + `apply_rotary_emb(use_real=True)`): axis `i` owns
//! `axes_dims[i]` channels of each head, frequencies `θ^(−2j/d)`, each angle repeated for an
//! adjacent channel pair, and pairs rotate as `(a, b) → (a·cos − b·sin, b·cos + a·sin)`.
//! Angles are computed on the host in f64 (as diffusers does) and uploaded once per layout.

use burn::tensor::{Device, Tensor, TensorData};

/// `(t, h, w)` rows for `[text; image]`: text tokens at the origin, image token `(row, col)`
/// of the `grid_h × grid_w` patch grid at `(0, row, col)`, row-major (Krea 2's
/// `prepare_position_ids`).
pub fn position_ids(text_len: usize, grid_h: usize, grid_w: usize) -> Vec<[f32; 3]> {
    let text = std::iter::repeat_n([0.0; 3], text_len);
    let image = (0..grid_h).flat_map(move |r| (0..grid_w).map(move |c| [0.0, r as f32, c as f32]));
    text.chain(image).collect()
}

/// The cos/sin tables for one sequence layout, `[seq, head_dim]` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// `cos(angle)` per channel.
    cos: Tensor<2>,
    /// `sin(angle)` per channel, negated on even channels so that
    /// `rope(x) = x·cos + swap_pairs(x)·sin`.
    sin_signed: Tensor<2>,
}

impl RopeTable {
    /// Tables for `positions` (one `(t, h, w)` row per token), `axes_dims` summing to the head dim.
    pub fn new(positions: &[[f32; 3]], axes_dims: [usize; 3], theta: f64, device: &Device) -> Self {
        let head_dim: usize = axes_dims.iter().sum();
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for pos in positions {
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
        let shape = [positions.len(), head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin_signed: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rows in the table.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` (seq = the table's rows).
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, seq, heads, head_dim] = x.dims();
        let cos = self.cos.clone().reshape([1, seq, 1, head_dim]);
        let sin = self.sin_signed.clone().reshape([1, seq, 1, head_dim]);
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
}
