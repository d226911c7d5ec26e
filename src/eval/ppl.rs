//! Perplexity over a text file as `eval --task ppl` defines it: the first `max_tokens` tokens (no
//! BOS added), non-overlapping windows of `window` tokens, each window predicting its last
//! `window - 1` tokens; ppl = exp(mean NLL). [`perplexity_on`] shares the windows among the ranks
//! of a data-parallel job.

use crate::dist::World;
use crate::model::logprobs::token_nll;
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
