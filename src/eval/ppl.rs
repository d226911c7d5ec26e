//! Perplexity over a text file as `eval --task ppl` defines it: the first `max_tokens` tokens (no
//! BOS added), non-overlapping windows of `window` tokens, each window predicting its last
//! `window - 1` tokens; ppl = exp(mean NLL). [`perplexity_on`] shares the windows among the ranks
//! of a data-parallel job.

use crate::dist::World;
use crate::kernels;
use crate::model::{
    chunk::{predicting_rows, row_chunks, rows_per_chunk},
    CausalLm, Rope,
};
use anyhow::{bail, Result};
use burn::tensor::{backend::Backend, DType, ElementConversion, Int, Tensor, TensorData};
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
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    ids: &[u32],
    window: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Result<Perplexity> {
    perplexity_on(World::SINGLE, lm, rope, ids, window, batch, progress)
}

/// [`perplexity`] with each rank of `world` measuring its contiguous share of the windows; the
/// sums are added over the ranks, so every rank returns the whole text's result (`progress`
/// counts this rank's windows). Every rank must call it.
pub fn perplexity_on<B: Backend>(
    world: World,
    lm: &CausalLm<B>,
    rope: &Rope<B>,
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
    let windows = &windows[world.share(windows.len())];
    progress.set_length(windows.len() as u64);
    let device = lm.model.embed_tokens.device();
    let vocab = lm.model.embed_tokens.dims()[0];
    let mut total_nll = 0.0f64;
    let mut count = 0usize;
    // Windows of equal length batch together; only the last one can differ.
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let group: Vec<&[u32]> = windows[i..]
            .iter()
            .take(batch)
            .take_while(|w| w.len() == len)
            .cloned()
            .collect();
        let flat: Vec<i32> = group
            .iter()
            .flat_map(|w| w.iter().map(|&t| t as i32))
            .collect();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [group.len(), len]), &device);
        let hidden = predicting_rows(lm.hidden(ids.clone(), rope, None, None, None));
        let rows = group.len() * (len - 1);
        let targets = ids.narrow(1, 1, len - 1).reshape([rows]);
        for r in row_chunks(rows, rows_per_chunk(vocab)) {
            let logits = lm.logits_2d(hidden.clone().slice(r.clone()));
            let nll = token_nll(logits, targets.clone().slice(r));
            total_nll += nll.sum().cast(DType::F32).into_scalar().elem::<f64>();
        }
        count += group.len() * (len - 1);
        i += group.len();
        progress.inc(group.len() as u64);
    }
    let mut sums = [total_nll, count as f64];
    world.sum(&mut sums);
    let (total_nll, count) = (sums[0], sums[1] as usize);
    let mean_nll = total_nll / count as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        predicted_tokens: count,
    })
}

/// Next-token NLL per row: logits `[n, vocab]` against target ids `[n]`, in f32.
pub fn token_nll<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    token_logprobs(logits, targets.reshape([n, 1]))
        .reshape([n])
        .neg()
}

/// Log-probabilities of `k` target ids per row: logits `[n, vocab]`, targets `[n, k]` -> `[n, k]`,
/// in f32 as `logits[target] - logsumexp(logits)`, on 2-D views only.
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    let logits = logits.cast(DType::F32);
    let lse = kernels::logsumexp(&logits).unwrap_or_else(|| {
        let max = logits.clone().max_dim(1);
        (logits.clone() - max.clone()).exp().sum_dim(1).log() + max
    });
    logits.gather(1, targets) - lse
}
