//! Log-probabilities of target tokens from logits, in f32 whatever the compute dtype: what
//! perplexity, log-likelihood scoring and the distillation's cross-entropy share.

use crate::kernels;
use burn::tensor::{backend::Backend, DType, Int, Tensor};

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
