//! Perplexity over a text file as `eval --task ppl` defines it: the first `max_tokens` tokens (no
//! BOS added), non-overlapping windows of `window` tokens, each window predicting its last
//! `window - 1` tokens; ppl = exp(mean NLL).

use crate::model::Pretrained;
use anyhow::{bail, Result};
use burn::tensor::{activation::log_softmax, backend::Backend, DType, ElementConversion, Int, Tensor, TensorData};
use indicatif::ProgressBar;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub ppl: f64,
    pub mean_nll: f64,
    pub predicted_tokens: usize,
}

/// Windows run `batch` at a time; the last window may be shorter (it still predicts len-1 tokens).
pub fn perplexity<B: Backend>(
    pre: &Pretrained<B>,
    ids: &[u32],
    window: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Result<Perplexity> {
    if window < 2 {
        bail!("--window must be at least 2 (got {window})");
    }
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        bail!("the text has {} tokens; need at least 2", ids.len());
    }
    progress.set_length(windows.len() as u64);
    let device = pre.lm.model.embed_tokens.device();
    let mut total_nll = 0.0f64;
    let mut count = 0usize;
    // Windows of equal length batch together; only the last one can differ.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let group: Vec<&[u32]> = windows[i..].iter().take(batch).take_while(|w| w.len() == len).cloned().collect();
        let flat: Vec<i32> = group.iter().flat_map(|w| w.iter().map(|&t| t as i32)).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [group.len(), len]), &device);
        let logits = pre.lm.forward(ids.clone(), &pre.rope, None, None);
        let nll = sequence_nll(logits, ids);
        total_nll += nll.sum().cast(DType::F32).into_scalar().elem::<f64>();
        count += group.len() * (len - 1);
        i += group.len();
        progress.inc(group.len() as u64);
    }
    let mean_nll = total_nll / count as f64;
    Ok(Perplexity { ppl: mean_nll.exp(), mean_nll, predicted_tokens: count })
}

/// Per-position next-token NLL: logits `[b, s, v]` at positions 0..s-1 against ids at 1..s.
/// Returns `[b, s-1]`, computed in f32.
pub fn sequence_nll<B: Backend>(logits: Tensor<B, 3>, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, s, _] = logits.dims();
    let logits = logits.narrow(1, 0, s - 1).cast(DType::F32);
    let targets = ids.narrow(1, 1, s - 1).reshape([b, s - 1, 1]);
    let logp = log_softmax(logits, 2);
    logp.gather(2, targets).reshape([b, s - 1]).neg()
}
