//! Greedy decoding with a KV cache that also returns the hidden-state taps of the generated
//! tokens, so one prefill + decode pass yields both VERIFI's rewrite and its conditioning.
//!
//! The taps of generated token yₖ are the states computed when yₖ is fed in; every generated
//! token (the stop token and the last one included) is fed once, so the taps equal those of
//! one full forward over prompt + generated ids. Readback is async (argmax ids only), so the
//! same code runs in a browser.

use burn::tensor::Tensor;

use super::text::KvCache;
use super::{InternVl, VlmError};

/// How to decode.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// Stop (after emitting it) when one of these is generated (e.g. `<|im_end|>`).
    pub stop_tokens: Vec<u32>,
    /// Hidden-state indices to return (transformers numbering).
    pub taps: Vec<usize>,
}

/// What decoding returns.
pub struct Generation {
    /// The generated ids (the stop token included when one was hit).
    pub ids: Vec<u32>,
    /// Per requested tap: the prompt's states `[1, prompt_len, hidden]`.
    pub prompt_taps: Vec<(usize, Tensor<3>)>,
    /// Per requested tap: the generated tokens' states `[1, ids.len(), hidden]`.
    pub generated_taps: Vec<(usize, Tensor<3>)>,
}

impl InternVl {
    /// Greedy decoding of one prompt (`pixel_values` fill its `<IMG_CONTEXT>` tokens).
    pub async fn generate(
        &self,
        prompt: &[u32],
        pixel_values: Option<Tensor<4>>,
        options: &GenerateOptions,
    ) -> Result<Generation, VlmError> {
        let device = self.text.embed_tokens.device();
        let ids = vec![prompt.to_vec()];
        let embeds = self.embed(&ids, pixel_values, &device)?;
        let mut cache = KvCache::new(self.num_layers());
        let out = self.text.forward(embeds, &mut cache, None, &options.taps)?;
        let prompt_taps = out.taps;
        let mut next = argmax_last(self, out.last).await?;
        let mut generated = Vec::new();
        let mut steps: Vec<Vec<Tensor<3>>> = vec![Vec::new(); options.taps.len()];
        while generated.len() < options.max_new_tokens {
            generated.push(next);
            let embeds = self.text.embed(&[next], &device).unsqueeze::<3>();
            let out = self.text.forward(embeds, &mut cache, None, &options.taps)?;
            for (slot, (_, t)) in steps.iter_mut().zip(out.taps) {
                slot.push(t);
            }
            if options.stop_tokens.contains(&next) || generated.len() == options.max_new_tokens {
                break;
            }
            next = argmax_last(self, out.last).await?;
        }
        let generated_taps = options
            .taps
            .iter()
            .zip(steps)
            .map(|(&i, parts)| {
                let t = if parts.is_empty() {
                    let h = prompt_taps.first().map(|(_, t)| t.dims()[2]).unwrap_or(0);
                    Tensor::zeros([1, 0, h], &device)
                } else {
                    Tensor::cat(parts, 1)
                };
                (i, t)
            })
            .collect();
        Ok(Generation {
            ids: generated,
            prompt_taps,
            generated_taps,
        })
    }
}

/// Greedy pick at the last position of `[1, seq, hidden]` final-norm states.
async fn argmax_last(model: &InternVl, last: Tensor<3>) -> Result<u32, VlmError> {
    let seq = last.dims()[1];
    let logits = model.text.logits(last.narrow(1, seq - 1, 1));
    let data = logits
        .argmax(2)
        .into_data_async()
        .await
        .map_err(|e| VlmError::Device(format!("{e:?}")))?;
    data.iter::<i64>()
        .next()
        .map(|i| i as u32)
        .ok_or_else(|| VlmError::Device("empty argmax".into()))
}
