//! The key/value cache for generation. It lives outside the model: running the model never
//! mutates the model, only the cache passed to it.

use burn::tensor::{backend::Backend, Tensor};

/// Per layer, keys and values seen so far, each `[batch, seq, kv_heads, head_dim]` after RoPE
/// (the projections' own layout, so that appending copies whole blocks).
/// Cloning is cheap (tensors are shared) and appending to a clone leaves the original as it was.
#[derive(Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions cached (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This cache (of batch 1) for `batch` rows that continue from the same positions.
    pub fn repeat(&self, batch: usize) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|(k, v)| {
                    (
                        k.clone().repeat_dim(0, batch),
                        v.clone().repeat_dim(0, batch),
                    )
                })
            })
            .collect();
        Self { layers }
    }

    /// Appends this step's keys and values for `layer` and returns everything cached for it.
    pub fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let merged = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 1), Tensor::cat(vec![pv, v], 1)),
            None => (k, v),
        };
        self.layers[layer] = Some(merged.clone());
        merged
    }
}
