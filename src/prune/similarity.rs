//! LaCo's representation similarity: a calibration sentence's final hidden states (after the last
//! RMSNorm), all tokens flattened into one vector, cosine against the unpruned model's; the mean
//! over sentences.

use crate::model::{CausalLm, Rope};
use anyhow::{bail, Result};
use burn::tensor::{backend::Backend, Bool, DType, ElementConversion, Int, Tensor, TensorData};

/// Calibration sentences, batched and right-padded, with the unpruned model's representations.
pub struct Calibration<B: Backend> {
    batches: Vec<Batch<B>>,
    sentences: usize,
}

struct Batch<B: Backend> {
    ids: Tensor<B, 2, Int>,
    padding: Option<Tensor<B, 2, Bool>>,
    /// `[batch, seq * hidden]`: 1 on real tokens, 0 on padding.
    valid: Tensor<B, 2>,
    /// The unpruned model's masked representations, `[batch, seq * hidden]` in f32.
    reference: Tensor<B, 2>,
    /// Their squared norms, `[batch, 1]`.
    reference_sq: Tensor<B, 2>,
}

impl<B: Backend> Calibration<B> {
    /// Batches `sentences` (token ids, each non-empty) and records `original`'s representations.
    pub fn new(
        original: &CausalLm<B>,
        rope: &Rope<B>,
        sentences: &[Vec<u32>],
        batch_size: usize,
        device: &B::Device,
    ) -> Result<Self> {
        if sentences.is_empty() {
            bail!("no calibration sentences");
        }
        let mut batches = Vec::new();
        for group in sentences.chunks(batch_size.max(1)) {
            let seq = group.iter().map(Vec::len).max().unwrap_or(0);
            let mut ids = Vec::with_capacity(group.len() * seq);
            let mut pad = Vec::with_capacity(group.len() * seq);
            for s in group {
                ids.extend(
                    s.iter()
                        .map(|&t| t as i32)
                        .chain(std::iter::repeat_n(0, seq - s.len())),
                );
                pad.extend((0..seq).map(|i| i >= s.len()));
            }
            let b = group.len();
            let padded = pad.iter().any(|&p| p);
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, seq]), device);
            let padding = padded.then(|| {
                Tensor::<B, 2, Bool>::from_data(TensorData::new(pad.clone(), [b, seq]), device)
            });
            let hidden = original.hidden_size();
            let valid: Vec<f32> = pad
                .iter()
                .flat_map(|&p| std::iter::repeat_n(if p { 0.0 } else { 1.0 }, hidden))
                .collect();
            let valid = Tensor::<B, 2>::from_data(
                TensorData::new(valid, [b, seq * hidden]),
                (device, DType::F32),
            );
            let mut batch = Batch {
                ids,
                padding,
                reference: valid.clone(),
                reference_sq: valid.clone(),
                valid,
            };
            batch.reference = batch.representation(original, rope);
            batch.reference_sq = batch.reference.clone().powi_scalar(2).sum_dim(1);
            batches.push(batch);
        }
        Ok(Self {
            batches,
            sentences: sentences.len(),
        })
    }

    pub fn num_batches(&self) -> usize {
        self.batches.len()
    }

    /// Mean cosine similarity of `candidate`'s representations to the unpruned model's.
    /// `on_batch` is called after each batch (progress).
    pub fn similarity(
        &self,
        candidate: &CausalLm<B>,
        rope: &Rope<B>,
        mut on_batch: impl FnMut(),
    ) -> f64 {
        let mut total = 0.0f64;
        for batch in &self.batches {
            let h = batch.representation(candidate, rope);
            let dot = (h.clone() * batch.reference.clone()).sum_dim(1);
            let sq = h.powi_scalar(2).sum_dim(1);
            let cos = dot / (sq * batch.reference_sq.clone()).sqrt();
            total += cos.sum().into_scalar().elem::<f64>();
            on_batch();
        }
        total / self.sentences as f64
    }
}

impl<B: Backend> Batch<B> {
    /// Final hidden states, flattened per sentence, padding zeroed: `[batch, seq * hidden]`, f32.
    fn representation(&self, lm: &CausalLm<B>, rope: &Rope<B>) -> Tensor<B, 2> {
        let h = lm.hidden(self.ids.clone(), rope, self.padding.as_ref(), None, None);
        let [b, s, d] = h.dims();
        h.cast(DType::F32).reshape([b, s * d]) * self.valid.clone()
    }
}
