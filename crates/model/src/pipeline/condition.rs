//! From the VLM's tapped states to the DiT's text tokens, with the switches the paper ablates:
//! LAP (the default), conditioning on the last tapped layer only, LAP layer dropout (zero the
//! pooling weight of chosen layers, Fig. 8), and reading the pooling weights (Fig. 6/7).

use burn::tensor::{DType, Tensor};

use super::{PipelineError, UniFusion};
use crate::generator::TextCondition;

/// How the tapped layers become one vector per token.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Conditioning {
    /// Layerwise Attention Pooling over every tap, then the refiner.
    #[default]
    Lap,
    /// LAP with the pooling weight of these taps (indices into the tap list) set to zero.
    LapDropout(Vec<usize>),
    /// The last tap only, straight into the refiner (LAP skipped): the paper's last-layer
    /// baseline, run on an LAP-trained model.
    LastLayer,
}

impl UniFusion {
    /// `[1, L, n_taps, h]` tapped states → DiT text tokens `[1, L, D]`.
    pub fn text_condition(
        &self,
        states: Tensor<4>,
        conditioning: &Conditioning,
    ) -> Result<TextCondition, PipelineError> {
        let n = self.transformer.num_text_layers;
        match conditioning {
            Conditioning::Lap => Ok(self.transformer.encode_text(states, None)?),
            Conditioning::LapDropout(layers) => {
                if let Some(bad) = layers.iter().find(|&&l| l >= n) {
                    return Err(PipelineError::Input(format!(
                        "layer dropout: tap {bad} does not exist (there are {n} taps, 0..{n})"
                    )));
                }
                self.check_states(&states)?;
                // Same graph as `encode_text` without a mask, on a copy whose pooling
                // weights for `layers` are zero.
                let fusion = self.transformer.text_fusion.clone().drop_layers(layers);
                let fused = fusion.forward(states, None);
                Ok(TextCondition {
                    tokens: self.transformer.txt_in.forward(fused),
                    mask: None,
                })
            }
            Conditioning::LastLayer => {
                self.check_states(&states)?;
                let [b, l, _, h] = states.dims();
                let mut x = states.narrow(2, n - 1, 1).reshape([b, l, h]);
                for block in &self.transformer.text_fusion.refiner_blocks {
                    x = block.forward(x, None);
                }
                Ok(TextCondition {
                    tokens: self.transformer.txt_in.forward(x),
                    mask: None,
                })
            }
        }
    }

    fn check_states(&self, states: &Tensor<4>) -> Result<(), PipelineError> {
        let dims = states.dims();
        let want = [
            self.transformer.num_text_layers,
            self.transformer.text_hidden_dim,
        ];
        if dims[0] != 1 || dims[1] == 0 || dims[2..] != want {
            return Err(PipelineError::Input(format!(
                "condition states have shape {dims:?}, expected [1, L > 0, {}, {}]",
                want[0], want[1]
            )));
        }
        Ok(())
    }

    /// LAP's pooling weight of each tap: `(hidden-state index, weight)` in tap order.
    pub async fn pooling_weights(&self) -> Result<Vec<(usize, f32)>, PipelineError> {
        let data = self
            .transformer
            .text_fusion
            .pooling_weights()
            .cast(DType::F32)
            .into_data_async()
            .await
            .map_err(|e| PipelineError::Device(format!("{e:?}")))?;
        let weights = data
            .try_to_vec::<f32>()
            .map_err(|e| PipelineError::Device(format!("{e:?}")))?;
        Ok(self.taps.iter().copied().zip(weights).collect())
    }
}
