//! Grouped-query self-attention with optional per-head q/k RMSNorm (Qwen3) and q/k/v bias (Qwen2).

use super::{
    cache::KvCache,
    linear::Linear,
    mask::Mask,
    norm::RmsNorm,
    rope::{Rope, RopeAt},
};
use crate::hf::{Family, ModelConfig, Weight, WeightReader};
use crate::kernels::{self, KeyMask};
use anyhow::Result;
use burn::module::Module;
use burn::tensor::{
    activation::softmax, backend::Backend, module::attention, ops::AttentionModuleOptions, Bool,
    Tensor,
};

/// The projections' Hugging Face names, in the order of the module's weights.
pub const PROJECTIONS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// Queries per block of a causal attention pass longer than this.
const QUERY_BLOCK: usize = 256;

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    pub fn load(
        ck: &WeightReader,
        prefix: &str,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * d;
        let kv_out = cfg.num_key_value_heads * d;
        let norm = |name: &str| -> Result<Option<RmsNorm<B>>> {
            if cfg.family != Family::Qwen3 {
                return Ok(None);
            }
            RmsNorm::load(
                ck,
                &format!("{prefix}.{name}.weight"),
                d,
                cfg.rms_norm_eps,
                device,
            )
            .map(Some)
        };
        Ok(Self {
            q_proj: Linear::load(
                ck,
                &format!("{prefix}.q_proj"),
                h,
                q_out,
                cfg.qkv_bias,
                device,
            )?,
            k_proj: Linear::load(
                ck,
                &format!("{prefix}.k_proj"),
                h,
                kv_out,
                cfg.qkv_bias,
                device,
            )?,
            v_proj: Linear::load(
                ck,
                &format!("{prefix}.v_proj"),
                h,
                kv_out,
                cfg.qkv_bias,
                device,
            )?,
            o_proj: Linear::load(
                ck,
                &format!("{prefix}.o_proj"),
                q_out,
                h,
                cfg.o_bias,
                device,
            )?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`, its positions' rotary tables in `pos`
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        pos: &RopeAt<B>,
        mask: &Mask<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let rep = nh / nkv;

        // 1. Project: (B, L, hidden) -> (B, L, H, D), then per-head norm (Qwen3).
        let q = self.q_proj.forward(x.clone()).reshape([batch, seq, nh, d]);
        let k = self.k_proj.forward(x.clone()).reshape([batch, seq, nkv, d]);
        let v = self.v_proj.forward(x).reshape([batch, seq, nkv, d]);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };

        // 2. Rotate; fold the 1/sqrt(D) score scale into q (burn's attention scales by itself:
        //    a custom scale would keep it from its flash kernel).
        let burn_attention = matches!(mask, Mask::Burn { .. });
        let scale = if burn_attention {
            1.0
        } else {
            1.0 / (d as f64).sqrt()
        };
        let q = rope.apply(q, &pos.q, scale);
        let k = rope.apply(k, &pos.k, 1.0);

        // 3. Extended by the cache to all T keys, then viewed as (B, H, T, D) (no copy).
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let (k, v) = (k.swap_dims(1, 2), v.swap_dims(1, 2));
        let mask = match mask {
            Mask::Additive(m) => m.as_ref(),
            Mask::Fused(padding) => {
                let keys = padding.as_deref().map_or(KeyMask::Causal, KeyMask::Padding);
                let out = kernels::attention(q, k, v, keys)
                    .expect("Mask::Fused is only chosen where kernels::fused_attention holds");
                return self.o_proj.forward(out);
            }
            Mask::Burn { mask, causal } => {
                let out = fused(q, k, v, mask.as_ref(), *causal);
                return self.o_proj.forward(out);
            }
            Mask::Cube(keys) => {
                let out = kernels::cube_attention(q, k, v, keys.as_ref())
                    .expect("Mask::Cube is only chosen where kernels::cube_attention_runs holds");
                return self.o_proj.forward(out);
            }
            Mask::Segments(first) => {
                let out = kernels::attention(q, k, v, KeyMask::Segments(first))
                    .expect("Mask::Segments is only chosen where kernels::fused_attention holds");
                return self.o_proj.forward(out);
            }
        };
        let keys = k.dims()[2];

        // 4-6 per block of queries: a block sees only the keys up to its last position, so with
        // a causal mask long sequences skip the scores above the diagonal.
        let q = q
            .reshape([batch, seq, nkv, rep, d])
            .permute([0, 2, 3, 1, 4]);
        let start = keys - seq;
        let causal_only = mask.is_some_and(|m| m.dims()[0] == 1);
        let block = if causal_only { QUERY_BLOCK } else { seq };
        let mut outs = Vec::new();
        for r0 in (0..seq).step_by(block.max(1)) {
            let rows = block.min(seq - r0);
            let seen = if causal_only { start + r0 + rows } else { keys };
            let whole = rows == seq && seen == keys;
            let (q, k, v) = if whole {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.clone().narrow(3, r0, rows),
                    k.clone().narrow(2, 0, seen),
                    v.clone().narrow(2, 0, seen),
                )
            };
            let m = mask.map(|m| {
                if whole {
                    m.clone()
                } else {
                    m.clone()
                        .reshape([seq, keys])
                        .slice([r0..r0 + rows, 0..seen])
                        .reshape([1, rows * seen])
                }
            });
            outs.push(attend(q, k, v, m, [batch, nh, rows, seen]));
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(outs, 3)
        };
        let out = out
            .reshape([batch, nh, seq, d])
            .swap_dims(1, 2)
            .reshape([batch, seq, nh * d]);
        self.o_proj.forward(out)
    }

    /// The projections under their Hugging Face names ([`PROJECTIONS`]).
    pub fn projections(&self) -> [(&'static str, &Linear<B>); 4] {
        let [q, k, v, o] = PROJECTIONS;
        [
            (q, &self.q_proj),
            (k, &self.k_proj),
            (v, &self.v_proj),
            (o, &self.o_proj),
        ]
    }

    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear<B>); 4] {
        let [q, k, v, o] = PROJECTIONS;
        [
            (q, &mut self.q_proj),
            (k, &mut self.k_proj),
            (v, &mut self.v_proj),
            (o, &mut self.o_proj),
        ]
    }

    /// The per-head norms (Qwen3) under their Hugging Face names, for saving.
    pub fn norm_weights(&self, prefix: &str, out: &mut Vec<(String, Weight<B>)>) {
        for (name, norm) in [("q_norm", &self.q_norm), ("k_norm", &self.k_norm)] {
            if let Some(n) = norm {
                n.weights(&format!("{prefix}.{name}.weight"), out);
            }
        }
    }
}

/// burn's `module::attention`, which on the GPU backends runs a flash kernel where it applies
/// (autotuned against its unfused fallback) and on Flex its own fused CPU attention. The KV heads
/// are repeated to as many as the query heads (GQA): burn's kernels take equal head counts.
///
/// # Shapes
/// - `q`: `[batch, seq, heads, head_dim]`, rotated, not scaled
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]`; `mask`: `[batch or 1, 1, seq, keys]`
/// - returns `[batch, seq, heads * head_dim]`
fn fused<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4, Bool>>,
    is_causal: bool,
) -> Tensor<B, 3> {
    let [batch, seq, heads, d] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let rep = heads / kv_heads;
    let repeat = |t: Tensor<B, 4>| {
        if rep == 1 {
            return t;
        }
        t.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, rep, keys, d])
            .reshape([batch, heads, keys, d])
    };
    let mask = mask.map(|m| m.clone().expand([batch, heads, seq, keys]));
    let options = AttentionModuleOptions {
        is_causal,
        ..Default::default()
    };
    attention(q.swap_dims(1, 2), repeat(k), repeat(v), mask, None, options)
        .swap_dims(1, 2)
        .reshape([batch, seq, heads * d])
}

/// Softmax attention of one block, grouped by KV head without copying K or V:
/// q `(B, nkv, rep, L, D)` x k^T `(B, nkv, 1, D, T)`, additive `mask` (`[1 or B*H, L*T]`),
/// softmax over keys, x v `(B, nkv, 1, T, D)` -> `(B, nkv, rep, L, D)`.
fn attend<B: Backend>(
    q: Tensor<B, 5>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 2>>,
    [batch, nh, seq, keys]: [usize; 4],
) -> Tensor<B, 5> {
    let [_, nkv, rep, _, _] = q.dims();
    let scores = q.matmul(k.unsqueeze_dim::<5>(2).swap_dims(3, 4));
    let scores = scores.reshape([batch * nh, seq * keys]);
    let scores = match mask {
        Some(m) => scores + m,
        None => scores,
    };
    let probs = softmax(scores.reshape([batch * nh * seq, keys]), 1);
    probs
        .reshape([batch, nkv, rep, seq, keys])
        .matmul(v.unsqueeze_dim::<5>(2))
}
