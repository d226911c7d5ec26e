//! Autoregressive decoding with a KV cache: greedy at temperature 0, otherwise temperature and
//! nucleus (top-p) sampling from a seeded generator.

use super::{KvCache, Pretrained};
use anyhow::Result;
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// Generates `max_new` tokens after `prompt`, calling `on_token` with each new id as it comes.
/// Decoding does not stop at EOS when `stop_at` is `None` (as the golden generation does).
pub fn generate<B: Backend>(
    pre: &Pretrained<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_at: Option<u32>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let device = pre.lm.model.embed_tokens.device();
    let mut cache = KvCache::new(pre.lm.num_layers());
    let mut rng = StdRng::seed_from_u64(sampling.seed);
    let mut out = Vec::with_capacity(max_new);
    let mut step: Vec<u32> = prompt.to_vec();
    for _ in 0..max_new {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                step.iter().map(|&t| t as i32).collect::<Vec<_>>(),
                [1, step.len()],
            ),
            &device,
        );
        let hidden = pre.lm.hidden(ids, &pre.rope, None, Some(&mut cache), None);
        let last = hidden.narrow(1, step.len() - 1, 1);
        let logits = pre.lm.logits(last).cast(DType::F32).into_data();
        let logits: Vec<f32> = logits.into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let next = pick(&logits, sampling, &mut rng);
        out.push(next);
        on_token(next)?;
        if Some(next) == stop_at {
            break;
        }
        step = vec![next];
    }
    Ok(out)
}

/// Chooses the next token from one row of logits.
fn pick(logits: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - max) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
    let mut mass = 0.0;
    let mut keep = 0;
    for p in &probs {
        keep += 1;
        mass += p.1;
        if mass >= s.top_p {
            break;
        }
    }
    let mut r = rng.random::<f64>() * mass;
    for p in &probs[..keep] {
        r -= p.1;
        if r <= 0.0 {
            return p.0 as u32;
        }
    }
    probs[keep - 1].0 as u32
}
