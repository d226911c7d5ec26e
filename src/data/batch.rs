//! Token sequences for training: prompt tokens carry label -100 (no loss), response tokens and
//! the appended EOS carry themselves; batches are right-padded or packed.

use super::instruct::Example;
use crate::hf::Tokenizer;
use crate::model::{Rows, Segments};
use anyhow::Result;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};

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

/// A batch for next-token training (position t predicts token t+1): one sequence per row,
/// right-padded ([`Batch::new`]), or several sequences packed into each row, each with its own
/// positions and attention ([`Batch::packed`]).
pub struct Batch<B: Backend> {
    /// `[batch, seq]`.
    pub ids: Tensor<B, 2, Int>,
    /// `[batch, seq]`, true on padding; `None` when no row is padded or the rows are packed.
    pub padding: Option<Tensor<B, 2, Bool>>,
    /// Packed rows: which sequence each position belongs to (a row's padded tail is one more
    /// segment of its own); `None` for one sequence per row.
    pub segments: Option<Segments>,
    /// `[count]`: the counted positions (next-token label not -100, and the next token in the
    /// same sequence) among the `batch * (seq - 1)` predicting positions (row-major), the only
    /// ones the loss reads; sequence by sequence in the order they were given.
    pub rows: Tensor<B, 1, Int>,
    /// `[count]`: their next-token ids.
    pub targets: Tensor<B, 1, Int>,
    /// Counted positions.
    pub count: usize,
    /// Tokens of the sequences (padding not included).
    pub tokens: usize,
    /// The sequences' ids in the [`super::mixture::Mixture`] they were drawn from, in order
    /// (empty for batches built otherwise): what a teacher cache is looked up by.
    pub keys: Vec<usize>,
}

impl<B: Backend> Batch<B> {
    /// One sequence per row, right-padded to the longest.
    pub fn new(seqs: &[&Sequence], pad_id: u32, device: &B::Device) -> Self {
        let rows: Vec<Vec<&Sequence>> = seqs.iter().map(|q| vec![*q]).collect();
        Self::build(&rows, pad_id, false, device)
    }

    /// Packed rows, each holding its sequences one after the other (at most `max_seq_len`
    /// tokens in all), padded to the longest row. A sequence's first token is never a target:
    /// the position before it belongs to another sequence.
    pub fn packed(rows: &[Vec<&Sequence>], pad_id: u32, device: &B::Device) -> Self {
        Self::build(rows, pad_id, true, device)
    }

    /// How the rows are laid out, for a forward pass over them.
    pub fn layout(&self) -> Rows<'_, B> {
        match &self.segments {
            Some(s) => Rows::Packed(s),
            None => Rows::Padded(self.padding.as_ref()),
        }
    }

    fn build(rows: &[Vec<&Sequence>], pad_id: u32, packed: bool, device: &B::Device) -> Self {
        let b = rows.len();
        let len = |row: &Vec<&Sequence>| row.iter().map(|q| q.ids.len()).sum::<usize>();
        let s = rows.iter().map(len).max().unwrap_or(2).max(2);
        let (mut ids, mut pad, mut segments, mut counted, mut targets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (row, seqs) in rows.iter().enumerate() {
            let mut at = 0;
            for (k, q) in seqs.iter().enumerate() {
                let n = q.ids.len();
                ids.extend(q.ids.iter().map(|&t| t as i32));
                segments.extend(std::iter::repeat_n(k as u32, n));
                for t in 1..n {
                    let label = q.labels.get(t).copied().unwrap_or(IGNORE);
                    if label != IGNORE {
                        counted.push((row * (s - 1) + at + t - 1) as i32);
                        targets.push(label as i32);
                    }
                }
                at += n;
            }
            ids.extend(std::iter::repeat_n(pad_id as i32, s - at));
            pad.extend((0..s).map(|i| i >= at));
            segments.extend(std::iter::repeat_n(seqs.len() as u32, s - at));
        }
        let count = counted.len();
        let tokens = rows.iter().map(len).sum();
        let padded = !packed && pad.iter().any(|&p| p);
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [b, s]), device),
            padding: padded.then(|| Tensor::from_data(TensorData::new(pad, [b, s]), device)),
            segments: packed.then(|| Segments::new(segments, s)),
            rows: Tensor::from_data(TensorData::new(counted, [count]), device),
            targets: Tensor::from_data(TensorData::new(targets, [count]), device),
            count,
            tokens,
            keys: Vec::new(),
        }
    }

    /// Positions of the `[batch, seq]` ids that are padding.
    pub fn padded_positions(&self) -> usize {
        let [b, s] = self.ids.dims();
        b * s - self.tokens
    }
}

impl<B: AutodiffBackend> Batch<B> {
    /// The batch on the inner backend, without a graph: what a frozen teacher reads.
    pub fn inner(&self) -> Batch<B::InnerBackend> {
        Batch {
            ids: self.ids.clone().inner(),
            padding: self.padding.clone().map(Tensor::inner),
            segments: self.segments.clone(),
            rows: self.rows.clone().inner(),
            targets: self.targets.clone().inner(),
            count: self.count,
            tokens: self.tokens,
            keys: self.keys.clone(),
        }
    }
}
