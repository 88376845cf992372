//! Scaled dot-product attention in query blocks, so the score matrix never passes a memory
//! budget.
//!
//! burn's attention materialises `[batch, heads, queries, keys]` scores: 4.3 GB for a 512²
//! image through the tiny model's DiT, 1 GB per image for a 1024² FLUX VAE mid-block, more than
//! a browser adapter will allocate. Rows of attention are independent, so running the
//! queries in blocks (every block against all keys) gives the same result with scores of at
//! most [`MAX_SCORE_BYTES`] at a time. A call that fits in one block is passed through
//! unchanged.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

/// The most bytes of f32 attention scores one block may hold.
pub const MAX_SCORE_BYTES: usize = 64 << 20;

/// [`attention`] with the queries in blocks of at most [`MAX_SCORE_BYTES`] of scores.
/// `mask`: `true` masks a key (shape `[batch or 1, heads or 1, queries or 1, keys]`);
/// `options.is_causal` aligns at the bottom-right corner, as burn does.
pub fn blocked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    options: AttentionModuleOptions,
) -> Tensor<4> {
    attention_in_blocks(q, k, v, mask, options, MAX_SCORE_BYTES)
}

/// [`blocked_attention`] with an explicit budget (tests use a tiny one).
pub fn attention_in_blocks(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
    options: AttentionModuleOptions,
    max_score_bytes: usize,
) -> Tensor<4> {
    let [batch, heads, queries, _] = q.dims();
    let keys = k.dims()[2];
    let row_bytes = (batch * heads * keys * 4).max(1);
    let rows = (max_score_bytes / row_bytes).max(1);
    if rows >= queries {
        return attention(q, k, v, mask, None, options);
    }
    let device = q.device();
    let block_options = AttentionModuleOptions {
        is_causal: false,
        ..options
    };
    let mut outputs = Vec::with_capacity(queries.div_ceil(rows));
    for start in (0..queries).step_by(rows) {
        let n = rows.min(queries - start);
        let block_mask = mask.as_ref().map(|m| {
            if m.dims()[2] == 1 {
                m.clone()
            } else {
                m.clone().narrow(2, start, n)
            }
        });
        let causal = options
            .is_causal
            .then(|| causal_rows(start, n, queries, keys, &device));
        let block_mask = match (block_mask, causal) {
            (Some(m), Some(c)) => {
                let [b, h, _, _] = m.dims();
                let c = c.expand([b, h, n, keys]);
                Some(m.expand([b, h, n, keys]).bool_or(c))
            }
            (m, c) => m.or(c),
        };
        let q_block = q.clone().narrow(2, start, n);
        outputs.push(attention(
            q_block,
            k.clone(),
            v.clone(),
            block_mask,
            None,
            block_options,
        ));
    }
    Tensor::cat(outputs, 2)
}

/// Rows `start..start + n` of the bottom-right-aligned causal mask of a `queries × keys`
/// attention (`true` = masked), as `[1, 1, n, keys]`.
fn causal_rows(
    start: usize,
    n: usize,
    queries: usize,
    keys: usize,
    device: &Device,
) -> Tensor<4, Bool> {
    let offset = keys as i64 - queries as i64;
    let values: Vec<bool> = (0..n)
        .flat_map(|i| {
            let row = (start + i) as i64 + offset;
            (0..keys).map(move |j| j as i64 > row)
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [1, 1, n, keys]), device)
}

#[cfg(test)]
mod tests {
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, Device, DeviceKind, Tensor, TensorData};

    use super::attention_in_blocks;

    fn values(t: Tensor<4>) -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")
    }

    fn random(shape: [usize; 4], seed: f32, device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    /// Query blocks of every size (one row up to all) give what one call gives: plain,
    /// with a key mask, causal (square and with more keys than queries, as under a KV cache).
    #[test]
    fn blocks_equal_one_call() {
        for device in [Device::flex(), Device::wgpu(DeviceKind::DefaultDevice)] {
            let (b, h, d) = (2, 3, 8);
            for (queries, keys) in [(13, 13), (5, 17)] {
                let q = random([b, h, queries, d], 0.0, &device);
                let k = random([b, h, keys, d], 1.0, &device);
                let v = random([b, h, keys, d], 2.0, &device);
                let mask_values: Vec<bool> = (0..b * keys).map(|i| i % 5 == 3).collect();
                let mask = Tensor::<4, Bool>::from_data(
                    TensorData::new(mask_values, [b, 1, 1, keys]),
                    &device,
                )
                .expand([b, h, queries, keys]);
                for (mask, causal) in [(None, false), (Some(mask), false), (None, true)] {
                    let options = AttentionModuleOptions {
                        scale: None,
                        softcap: None,
                        is_causal: causal,
                    };
                    let whole = values(attention_in_blocks(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        mask.clone(),
                        options,
                        usize::MAX,
                    ));
                    for rows in [1, 2, 4, queries - 1] {
                        let budget = rows * b * h * keys * 4;
                        let blocked = values(attention_in_blocks(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            mask.clone(),
                            options,
                            budget,
                        ));
                        let worst = whole
                            .iter()
                            .zip(&blocked)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0f32, f32::max);
                        assert!(
                            worst < 1e-5,
                            "{queries}x{keys}, causal {causal}, mask {}, {rows} rows a block: differs by {worst}",
                            mask.is_some()
                        );
                    }
                }
            }
        }
    }
}
