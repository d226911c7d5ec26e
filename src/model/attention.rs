//! Grouped-query self-attention with optional per-head q/k RMSNorm (Qwen3) and q/k/v bias (Qwen2).

use super::{cache::KvCache, checkpoint::Checkpoint, config::{Family, ModelConfig}, linear::Linear, norm::RmsNorm, rope::Rope};
use anyhow::Result;
use burn::module::Module;
use burn::tensor::{backend::Backend, module::attention, ops::AttentionModuleOptions, Bool, Tensor};

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
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: &ModelConfig, device: &B::Device) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * d;
        let kv_out = cfg.num_key_value_heads * d;
        let norm = |name: &str| -> Result<Option<RmsNorm<B>>> {
            if cfg.family != Family::Qwen3 {
                return Ok(None);
            }
            RmsNorm::load(ck, &format!("{prefix}.{name}.weight"), d, cfg.rms_norm_eps, device).map(Some)
        };
        Ok(Self {
            q_proj: Linear::load(ck, &format!("{prefix}.q_proj"), h, q_out, cfg.qkv_bias, device)?,
            k_proj: Linear::load(ck, &format!("{prefix}.k_proj"), h, kv_out, cfg.qkv_bias, device)?,
            v_proj: Linear::load(ck, &format!("{prefix}.v_proj"), h, kv_out, cfg.qkv_bias, device)?,
            o_proj: Linear::load(ck, &format!("{prefix}.o_proj"), q_out, h, cfg.o_bias, device)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`, its first token at position `start`
    /// - `key_padding`: `[batch, start + seq]`, true where the key is padding
    /// - returns `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        key_padding: Option<&Tensor<B, 2, Bool>>,
        cache: Option<(&mut KvCache<B>, usize)>,
        start: usize,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // 1. Project: (B, L, hidden) -> (B, L, H, D), then per-head norm (Qwen3).
        let q = self.q_proj.forward(x.clone()).reshape([batch, seq, nh, d]);
        let k = self.k_proj.forward(x.clone()).reshape([batch, seq, nkv, d]);
        let v = self.v_proj.forward(x).reshape([batch, seq, nkv, d]);
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(q), kn.forward(k)),
            _ => (q, k),
        };

        // 2. (B, L, H, D) -> (B, H, L, D) and rotate.
        let q = rope.apply(q.swap_dims(1, 2), start);
        let k = rope.apply(k.swap_dims(1, 2), start);
        let v = v.swap_dims(1, 2);

        // 3. Extend with the cache: keys and values cover positions 0..start+seq.
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        let total = k.dims()[2];

        // 4. Grouped-query: repeat each KV head for its group of query heads.
        let k = repeat_kv(k, nh / nkv);
        let v = repeat_kv(v, nh / nkv);

        // 5. Causal attention (bottom-right aligned, so cached prefixes are visible) plus padding.
        let mask = key_padding.map(|p| p.clone().reshape([batch, 1, 1, total]).expand([batch, nh, seq, total]));
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: true };
        let out = attention(q, k, v, mask, None, options);

        // 6. (B, H, L, D) -> (B, L, H*D) -> o_proj.
        self.o_proj.forward(out.swap_dims(1, 2).reshape([batch, seq, nh * d]))
    }
}

/// `[batch, kv_heads, seq, d]` -> `[batch, kv_heads * n_rep, seq, d]`, each head repeated in place.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, nkv, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([b, nkv, n_rep, s, d]).reshape([b, nkv * n_rep, s, d])
}
