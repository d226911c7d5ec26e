//! Token sequences for training: prompt tokens carry label -100 (no loss), response tokens and
//! the appended EOS carry themselves; batches are right-padded.

use super::instruct::Example;
use crate::hf::Tokenizer;
use anyhow::Result;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

pub const IGNORE: i64 = -100;

#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Tokenizes `ex` (prompt, then response and EOS), cut to `max_len` tokens. `None` when no
/// response token survives the cut.
pub fn tokenize(
    ex: &Example,
    tok: &Tokenizer,
    eos: u32,
    max_len: usize,
) -> Result<Option<Sequence>> {
    let prompt = tok.encode(&ex.prompt)?;
    let mut response = tok.encode(&ex.response)?;
    response.push(eos);
    let mut labels: Vec<i64> = std::iter::repeat_n(IGNORE, prompt.len())
        .chain(response.iter().map(|&t| t as i64))
        .collect();
    let mut ids = prompt;
    ids.extend(response);
    ids.truncate(max_len);
    labels.truncate(max_len);
    // Position 0 is never a target (nothing predicts it).
    let trained = labels.iter().skip(1).any(|&l| l != IGNORE);
    Ok(trained.then_some(Sequence { ids, labels }))
}

/// A right-padded batch for next-token training: position t predicts token t+1.
pub struct Batch<B: Backend> {
    /// `[batch, seq]`.
    pub ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`, true on padding; `None` when no row is padded.
    pub padding: Option<Tensor<B, 2, Bool>>,
    /// `[count]`: the counted positions (next-token label not -100) among the
    /// `batch * (seq - 1)` predicting positions (row-major), the only ones the loss reads.
    pub rows: Tensor<B, 1, Int>,
    /// `[count]`: their next-token ids.
    pub targets: Tensor<B, 1, Int>,
    /// Counted positions.
    pub count: usize,
    pub tokens: usize,
}

impl<B: Backend> Batch<B> {
    pub fn new(seqs: &[&Sequence], pad_id: u32, device: &B::Device) -> Self {
        let b = seqs.len();
        let s = seqs.iter().map(|q| q.ids.len()).max().unwrap_or(2).max(2);
        let (mut ids, mut pad, mut rows, mut targets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (row, q) in seqs.iter().enumerate() {
            let n = q.ids.len();
            ids.extend(
                q.ids
                    .iter()
                    .map(|&t| t as i32)
                    .chain(std::iter::repeat_n(pad_id as i32, s - n)),
            );
            pad.extend((0..s).map(|i| i >= n));
            for t in 1..s {
                let label = q.labels.get(t).copied().unwrap_or(IGNORE);
                if label != IGNORE {
                    rows.push((row * (s - 1) + t - 1) as i32);
                    targets.push(label as i32);
                }
            }
        }
        let count = rows.len();
        let tokens = seqs.iter().map(|q| q.ids.len()).sum();
        let padded = pad.iter().any(|&p| p);
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [b, s]), device),
            padding: padded.then(|| Tensor::from_data(TensorData::new(pad, [b, s]), device)),
            rows: Tensor::from_data(TensorData::new(rows, [count]), device),
            targets: Tensor::from_data(TensorData::new(targets, [count]), device),
            count,
            tokens,
        }
    }
}
