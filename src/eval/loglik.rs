//! Log-likelihoods of continuations after a context, computed as lm-evaluation-harness does for
//! `loglikelihood` requests, but sharing work: the token prefix common to every request of a
//! group (MMLU's description and few-shot examples) runs once into a KV cache; requests whose
//! continuations are single tokens (MMLU's " A".." D") run `batch` at a time on top of it, one row
//! per request; longer continuations (HellaSwag's endings) run as one batch per request on top of
//! that request's own context.

use crate::hf::Tokenizer;
use crate::model::logprobs::token_logprobs;
use crate::model::{
    cache::KvCache,
    chunk::{row_chunks, rows_per_chunk},
    CausalLm, Rope,
};
use anyhow::Result;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use indicatif::ProgressBar;

/// A context and the token ids of each continuation to score after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

impl Request {
    /// lm-eval's `_encode_pair`: whitespace at the end of the context moves to the front of each
    /// continuation, and a continuation's tokens are those of `context + continuation` beyond the
    /// context's own tokens.
    pub fn encode(tok: &Tokenizer, context: &str, continuations: &[String]) -> Result<Self> {
        let trimmed = context.trim_end();
        let moved = &context[trimmed.len()..];
        let context_ids = tok.encode(trimmed)?;
        if context_ids.is_empty() {
            anyhow::bail!("cannot score a continuation after an empty prompt");
        }
        let continuations = continuations
            .iter()
            .map(|c| {
                let whole = tok.encode(&format!("{trimmed}{moved}{c}"))?;
                Ok(whole.get(context_ids.len()..).unwrap_or_default().to_vec())
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            context: context_ids,
            continuations,
        })
    }
}

/// Summed log-probability of every continuation of every request, in order. Like lm-eval, a
/// sequence longer than `max_length` loses its first tokens: the model sees the last
/// `max_length` tokens before each continuation's last token. `progress` advances by one per
/// request.
pub fn loglikelihoods<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    requests: &[Request],
    max_length: usize,
    batch: usize,
    progress: &ProgressBar,
) -> Vec<Vec<f64>> {
    // Tokens context + continuation - 1 that the model would have to see.
    let needed = |r: &Request, c: &[u32]| (r.context.len() + c.len()).saturating_sub(1);
    let fits: Vec<bool> = requests
        .iter()
        .map(|r| r.continuations.iter().all(|c| needed(r, c) <= max_length))
        .collect();
    let fitting: Vec<&Request> = (0..requests.len())
        .filter(|&i| fits[i])
        .map(|i| &requests[i])
        .collect();
    let mut fitting_scores = score_group(lm, rope, &fitting, batch, progress).into_iter();
    let mut out = Vec::with_capacity(requests.len());
    for (r, fits) in requests.iter().zip(fits) {
        if fits {
            out.push(
                fitting_scores
                    .next()
                    .expect("one score per fitting request"),
            );
            continue;
        }
        // Too long: the continuations that keep the same tail of the context run together.
        let quiet = ProgressBar::hidden();
        let drops: Vec<usize> = r
            .continuations
            .iter()
            .map(|c| {
                needed(r, c)
                    .saturating_sub(max_length)
                    .min(r.context.len() - 1)
            })
            .collect();
        let mut scores = vec![0.0; r.continuations.len()];
        let mut distinct = drops.clone();
        distinct.sort_unstable();
        distinct.dedup();
        for drop in distinct {
            let members: Vec<usize> = (0..drops.len()).filter(|&j| drops[j] == drop).collect();
            let tail = Request {
                context: r.context[drop..].to_vec(),
                continuations: members
                    .iter()
                    .map(|&j| r.continuations[j].clone())
                    .collect(),
            };
            let got = score_group(lm, rope, &[&tail], 1, &quiet).remove(0);
            for (j, v) in members.into_iter().zip(got) {
                scores[j] = v;
            }
        }
        out.push(scores);
        progress.inc(1);
    }
    out
}

/// Scores requests that share a token prefix: the prefix runs once into a KV cache.
fn score_group<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    requests: &[&Request],
    batch: usize,
    progress: &ProgressBar,
) -> Vec<Vec<f64>> {
    let shared = shared_prefix(requests);
    let mut prefix = KvCache::new(lm.num_layers());
    if shared > 0 {
        extend(lm, rope, &[&requests[0].context[..shared]], &mut prefix);
    }
    let mut out = vec![Vec::new(); requests.len()];
    let is_single: Vec<bool> = requests
        .iter()
        .map(|r| r.continuations.iter().all(|c| c.len() <= 1))
        .collect();
    let mut single: Vec<usize> = (0..requests.len()).filter(|&i| is_single[i]).collect();
    // Longest first, so that each batch pads its rows to similar lengths.
    single.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len()));
    for group in single.chunks(batch.max(1)) {
        let rows: Vec<&[u32]> = group
            .iter()
            .map(|&i| &requests[i].context[shared..])
            .collect();
        let hidden = extend(lm, rope, &rows, &mut prefix.repeat(rows.len()));
        let firsts: Vec<Vec<Option<u32>>> =
            group.iter().map(|&i| first_tokens(requests[i])).collect();
        let scores = scored_rows(lm, last_rows(hidden, &rows), &firsts);
        for (&i, s) in group.iter().zip(scores) {
            out[i] = s;
            progress.inc(1);
        }
    }
    for i in 0..requests.len() {
        if !is_single[i] {
            out[i] = multi_token(lm, rope, requests[i], shared, &prefix);
            progress.inc(1);
        }
    }
    out
}

/// Context tokens every request starts with, leaving each at least one token of its own (the
/// last context token's output predicts the first continuation token).
fn shared_prefix(requests: &[&Request]) -> usize {
    let Some(first) = requests.first() else {
        return 0;
    };
    let mut n = first.context.len().saturating_sub(1);
    for r in &requests[1..] {
        n = n.min(r.context.len().saturating_sub(1));
        n = n.min(
            first
                .context
                .iter()
                .zip(&r.context)
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    n
}

/// One request with a continuation longer than a token: its own context on top of the shared
/// prefix, then all its continuations as one right-padded batch on top of that.
fn multi_token<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    request: &Request,
    shared: usize,
    prefix: &KvCache<B>,
) -> Vec<f64> {
    let own = &request.context[shared..];
    let mut cache = prefix.clone();
    let hidden = extend(lm, rope, &[own], &mut cache);
    let mut totals = scored_rows(lm, last_rows(hidden, &[own]), &[first_tokens(request)])
        .pop()
        .expect("one row");
    let conts = &request.continuations;
    let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
    if longest < 2 {
        return totals;
    }
    // Row j feeds continuation j's tokens but its last; position t predicts token t + 1.
    let inputs: Vec<&[u32]> = conts
        .iter()
        .map(|c| &c[..c.len().saturating_sub(1)])
        .collect();
    let hidden = extend(lm, rope, &inputs, &mut cache.repeat(conts.len()));
    let [n, width, h] = hidden.dims();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (j, c) in conts.iter().enumerate() {
        for (t, &token) in c.iter().enumerate().skip(1) {
            rows.push((j * width + t - 1) as i32);
            targets.push((j, token));
        }
    }
    let device = hidden.device();
    let flat = hidden.reshape([n * width, h]);
    let picked = flat.select(0, int_tensor(rows, &device));
    let per_row: Vec<Vec<Option<u32>>> = targets.iter().map(|&(_, t)| vec![Some(t)]).collect();
    for (&(j, _), s) in targets.iter().zip(scored_rows(lm, picked, &per_row)) {
        totals[j] += s[0];
    }
    totals
}

/// The first token of each continuation (`None` for an empty one, which scores 0).
fn first_tokens(request: &Request) -> Vec<Option<u32>> {
    request
        .continuations
        .iter()
        .map(|c| c.first().copied())
        .collect()
}

/// The hidden state at the last real token of each right-padded row: `[rows, hidden]`.
fn last_rows<B: Backend>(hidden: Tensor<B, 3>, rows: &[&[u32]]) -> Tensor<B, 2> {
    let [b, width, h] = hidden.dims();
    let index: Vec<i32> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (i * width + r.len() - 1) as i32)
        .collect();
    let device = hidden.device();
    hidden
        .reshape([b * width, h])
        .select(0, int_tensor(index, &device))
}

/// Log-probabilities of the given token ids after each hidden row, lm_head run in chunks.
fn scored_rows<B: Backend>(
    lm: &CausalLm<B>,
    hidden: Tensor<B, 2>,
    targets: &[Vec<Option<u32>>],
) -> Vec<Vec<f64>> {
    let device = hidden.device();
    let k = targets.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let vocab = lm.model.embed_tokens.dims()[0];
    let mut out = Vec::with_capacity(targets.len());
    for r in row_chunks(targets.len(), rows_per_chunk(vocab)) {
        let ids: Vec<i32> = targets[r.clone()]
            .iter()
            .flat_map(|t| (0..k).map(|j| t.get(j).copied().flatten().unwrap_or(0) as i32))
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [r.len(), k]), &device);
        let logprobs = token_logprobs(lm.logits_2d(hidden.clone().slice(r.clone())), ids);
        let values: Vec<f32> = logprobs.into_data().convert::<f32>().to_vec().expect("f32");
        for (row, t) in values.chunks(k).zip(&targets[r]) {
            out.push(
                t.iter()
                    .zip(row)
                    .map(|(id, &v)| if id.is_some() { v as f64 } else { 0.0 })
                    .collect(),
            );
        }
    }
    out
}

/// Runs `rows` (right-padded) on top of `cache`, which they extend; returns their hidden states.
fn extend<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    rows: &[&[u32]],
    cache: &mut KvCache<B>,
) -> Tensor<B, 3> {
    let ids = ids_tensor(rows, &lm.model.embed_tokens.device());
    lm.hidden(ids, rope, None, Some(cache), None)
}

/// Rows of token ids, right-padded with id 0 to the longest (padding is never read: it only
/// follows real tokens, which the causal mask keeps from seeing it).
fn ids_tensor<B: Backend>(rows: &[&[u32]], device: &B::Device) -> Tensor<B, 2, Int> {
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let flat: Vec<i32> = rows
        .iter()
        .flat_map(|r| (0..width).map(|j| r.get(j).map_or(0, |&t| t as i32)))
        .collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

fn int_tensor<B: Backend>(values: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}
