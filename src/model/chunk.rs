//! Logits are `[rows, vocab]`; with Qwen3's 151,936-entry vocabulary a few thousand rows are
//! gigabytes. Every consumer of logits (perplexity, log-likelihoods, distillation losses) runs
//! the lm_head over row chunks of at most [`CHUNK_ELEMENTS`] logits instead.

use burn::tensor::{backend::Backend, Tensor};
use std::ops::Range;

/// Logit elements per chunk: 4M f32 = 16 MiB, small enough for the allocator to reuse.
pub const CHUNK_ELEMENTS: usize = 4 << 20;

/// Rows per chunk so that a chunk holds at most [`CHUNK_ELEMENTS`] logits of `vocab`.
pub fn rows_per_chunk(vocab: usize) -> usize {
    (CHUNK_ELEMENTS / vocab.max(1)).max(1)
}

/// Row ranges of `step` rows covering `0..rows`.
pub fn row_chunks(rows: usize, step: usize) -> impl Iterator<Item = Range<usize>> {
    let step = step.max(1);
    (0..rows)
        .step_by(step)
        .map(move |s| s..(s + step).min(rows))
}

/// The hidden states that predict a next token: positions 0..seq-1 of `[batch, seq, hidden]`
/// flattened to `[batch * (seq - 1), hidden]` rows, row by row aligned with ids 1..seq.
pub fn predicting_rows<B: Backend>(hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, s, h] = hidden.dims();
    hidden.narrow(1, 0, s - 1).reshape([b * (s - 1), h])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_rows_exactly_once() {
        let chunks: Vec<_> = row_chunks(1000, rows_per_chunk(151_936)).collect();
        assert_eq!(chunks.first().unwrap().start, 0);
        assert_eq!(chunks.last().unwrap().end, 1000);
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert!(chunks.iter().all(|r| r.len() * 151_936 <= CHUNK_ELEMENTS));
    }
}
