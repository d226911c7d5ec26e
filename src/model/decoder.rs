//! The decoder stack and its language-model head, named as the Hugging Face weights are:
//! `model.embed_tokens`, `model.layers.N.{input_layernorm,self_attn,post_attention_layernorm,mlp}`,
//! `model.norm`, `lm_head`.

use super::{
    attention::Attention,
    cache::KvCache,
    linear::Linear,
    mask::{Keys, Mask},
    mlp::Mlp,
    norm::RmsNorm,
    rope::{Rope, RopeAt},
    segments::Segments,
};
use crate::hf::{ModelConfig, Weight, WeightReader};
use anyhow::Result;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, module::embedding, Bool, Int, Tensor};

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn load(
        ck: &WeightReader,
        i: usize,
        cfg: &ModelConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(
                ck,
                &format!("{p}.input_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            self_attn: Attention::load(ck, &format!("{p}.self_attn"), cfg, device)?,
            post_attention_layernorm: RmsNorm::load(
                ck,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                eps,
                device,
            )?,
            mlp: Mlp::load(ck, &format!("{p}.mlp"), cfg, device)?,
        })
    }

    /// The layer in a forward pass over whole rows (see [`CausalLm::begin`]).
    pub fn run(&self, x: Tensor<B, 3>, rope: &Rope<B>, pass: &Pass<B>) -> Tensor<B, 3> {
        self.forward(x, rope, &pass.pos, &pass.mask, None)
    }

    /// Every projection of the layer under its Hugging Face name within the layer
    /// (`self_attn.q_proj`, ..., `mlp.down_proj`).
    pub fn projections(&self) -> impl Iterator<Item = (String, &Linear<B>)> {
        let attn = self.self_attn.projections().into_iter();
        let mlp = self.mlp.projections().into_iter();
        attn.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(mlp.map(|(n, l)| (format!("mlp.{n}"), l)))
    }

    pub fn projections_mut(&mut self) -> impl Iterator<Item = (String, &mut Linear<B>)> {
        let attn = self.self_attn.projections_mut().into_iter();
        let mlp = self.mlp.projections_mut().into_iter();
        attn.map(|(n, l)| (format!("self_attn.{n}"), l))
            .chain(mlp.map(|(n, l)| (format!("mlp.{n}"), l)))
    }

    /// Every weight of layer `i` under its Hugging Face name.
    pub fn weights(&self, i: usize, out: &mut Vec<(String, Weight<B>)>) {
        let p = format!("model.layers.{i}");
        // In the order of transformers' state dict.
        let mut projections = self.projections();
        self.input_layernorm
            .weights(&format!("{p}.input_layernorm.weight"), out);
        for (name, proj) in projections
            .by_ref()
            .take(self.self_attn.projections().len())
        {
            proj.weights(&format!("{p}.{name}"), out);
        }
        self.self_attn.norm_weights(&format!("{p}.self_attn"), out);
        self.post_attention_layernorm
            .weights(&format!("{p}.post_attention_layernorm.weight"), out);
        for (name, proj) in projections {
            proj.weights(&format!("{p}.{name}"), out);
        }
    }

    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        pos: &RopeAt<B>,
        mask: &Mask<B>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, pos, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// How the rows of a batch hold its sequences.
#[derive(Clone, Copy)]
pub enum Rows<'a, B: Backend> {
    /// One sequence a row, right-padded: `[batch, seq]`, true where a key is padding.
    Padded(Option<&'a Tensor<B, 2, Bool>>),
    /// Packed rows, several sequences each.
    Packed(&'a Segments),
}

/// What every layer of one forward pass shares: the rotary tables at the rows' positions and
/// the attention mask, chosen once for the pass ([`CausalLm::begin`]).
pub struct Pass<B: Backend> {
    pos: RopeAt<B>,
    mask: Mask<B>,
}

/// `model.*`: embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct Model<B: Backend> {
    /// `[vocab_size, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// The whole causal LM; `lm_head` is `None` when tied to `model.embed_tokens`.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    pub model: Model<B>,
    pub lm_head: Option<Linear<B>>,
}

impl<B: Backend> CausalLm<B> {
    /// Builds the model by walking the checkpoint's weight names; fails on any missing,
    /// misshapen or left-over tensor.
    pub fn load(ck: &WeightReader, cfg: &ModelConfig, device: &B::Device) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens =
            Param::from_tensor(ck.tensor("model.embed_tokens.weight", [v, h], device)?);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(ck, i, cfg, device))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(ck, "model.norm.weight", h, cfg.rms_norm_eps, device)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(ck, "lm_head", h, v, false, device)?)
        };
        let tied = cfg.tie_word_embeddings;
        ck.finish(|name| {
            name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
        })?;
        Ok(Self {
            model: Model {
                embed_tokens,
                layers,
                norm,
            },
            lm_head,
        })
    }

    /// Runs the decoder and returns the final normed hidden states `[batch, seq, hidden]`.
    ///
    /// - `ids`: `[batch, seq]`, the first token at position `cache.len()` (0 without a cache)
    /// - `key_padding`: `[batch, cached + seq]`, true where a key is padding (right-padded batches)
    /// - `layer_inputs`: when given, receives the input of every decoder layer (index 0 is the
    ///   embedding output), as transformers' `hidden_states` minus the last
    pub fn hidden(
        &self,
        ids: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        key_padding: Option<&Tensor<B, 2, Bool>>,
        cache: Option<&mut KvCache<B>>,
        layer_inputs: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        let start = cache.as_ref().map_or(0, |c| c.len());
        let (x, pass) = self.begin_at(start, ids, rope, Rows::Padded(key_padding));
        self.decode(x, rope, &pass, cache, layer_inputs)
    }

    /// [`CausalLm::hidden`] of packed rows: each sequence of `segments` has its own rotary
    /// positions from 0 and attends only to itself, so every sequence's hidden states are those
    /// it would have alone (no cache: training and scoring whole rows).
    ///
    /// - `ids`: `[batch, seq]`, `segments` of the same shape
    pub fn hidden_packed(
        &self,
        ids: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        segments: &Segments,
    ) -> Tensor<B, 3> {
        let (x, pass) = self.begin(ids, rope, Rows::Packed(segments));
        self.decode(x, rope, &pass, None, None)
    }

    /// The start of a forward pass over whole rows (no cache): the embedding output
    /// `[batch, seq, hidden]` and what every layer shares ([`DecoderLayer::run`]); the final
    /// hidden states are `model.norm` of the last layer's output.
    pub fn begin(
        &self,
        ids: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        rows: Rows<'_, B>,
    ) -> (Tensor<B, 3>, Pass<B>) {
        self.begin_at(0, ids, rope, rows)
    }

    /// [`CausalLm::begin`] for queries at positions `start..` (after a KV cache of `start`):
    /// the rotary tables at the rows' positions, and the mask (and with it the attention path)
    /// chosen once for all the layers ([`Mask::new`]).
    fn begin_at(
        &self,
        start: usize,
        ids: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        rows: Rows<'_, B>,
    ) -> (Tensor<B, 3>, Pass<B>) {
        let [batch, seq] = ids.dims();
        let attn = &self.model.layers[0].self_attn;
        let (heads, kv_heads) = (attn.num_heads, attn.num_kv_heads);
        let device = ids.device();
        let (pos, keys) = match rows {
            Rows::Padded(key_padding) => (
                rope.at(start, seq, heads, kv_heads, &device),
                Keys::Causal {
                    start,
                    seq,
                    key_padding,
                },
            ),
            Rows::Packed(segments) => {
                assert_eq!((segments.batch(), segments.seq(), start), (batch, seq, 0));
                (
                    rope.at_positions(&segments.positions(), batch, heads, kv_heads, &device),
                    Keys::Packed {
                        first: segments.run_starts(),
                        seq,
                    },
                )
            }
        };
        let x = embedding(self.model.embed_tokens.val(), ids);
        let mask = Mask::new(keys, heads, x.dtype(), &device);
        (x, Pass { pos, mask })
    }

    /// The body of [`CausalLm::hidden`] and [`CausalLm::hidden_packed`]: the layers from the
    /// embeddings `x`, then the final norm.
    fn decode(
        &self,
        mut x: Tensor<B, 3>,
        rope: &Rope<B>,
        pass: &Pass<B>,
        mut cache: Option<&mut KvCache<B>>,
        mut layer_inputs: Option<&mut Vec<Tensor<B, 3>>>,
    ) -> Tensor<B, 3> {
        for (i, layer) in self.model.layers.iter().enumerate() {
            if let Some(inputs) = layer_inputs.as_deref_mut() {
                inputs.push(x.clone());
            }
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(x, rope, &pass.pos, &pass.mask, layer_cache);
        }
        self.model.norm.forward(x)
    }

    /// `[batch, seq, hidden]` -> logits `[batch, seq, vocab_size]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, h] = hidden.dims();
        let logits = self.logits_2d(hidden.reshape([b * s, h]));
        let v = logits.dims()[1];
        logits.reshape([b, s, v])
    }

    /// `[rows, hidden]` -> logits `[rows, vocab_size]`; see [`super::chunk`] for running it in pieces.
    pub fn logits_2d(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.forward_2d(hidden),
            None => super::linear::project(hidden, self.model.embed_tokens.val(), None),
        }
    }

    /// Logits for every position: `hidden` then `logits`.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        rope: &Rope<B>,
        key_padding: Option<&Tensor<B, 2, Bool>>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.logits(self.hidden(ids, rope, key_padding, cache, None))
    }

    /// Every weight under its Hugging Face name, layers numbered as they stand now.
    pub fn weights(&self) -> Vec<(String, Weight<B>)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            Weight::Matrix(self.model.embed_tokens.val()),
        )];
        for (i, layer) in self.model.layers.iter().enumerate() {
            layer.weights(i, &mut out);
        }
        self.model.norm.weights("model.norm.weight", &mut out);
        if let Some(head) = &self.lm_head {
            head.weights("lm_head", &mut out);
        }
        out
    }

    /// Every projection under its Hugging Face module name (`model.layers.N.self_attn.q_proj`,
    /// ...), layers numbered as they stand now: the walker that saving, merging, adapters and
    /// clipping use.
    pub fn projections(&self) -> Vec<(String, &Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            out.extend(
                layer
                    .projections()
                    .map(|(n, l)| (format!("model.layers.{i}.{n}"), l)),
            );
        }
        out
    }

    /// [`CausalLm::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Linear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            out.extend(
                layer
                    .projections_mut()
                    .map(|(n, l)| (format!("model.layers.{i}.{n}"), l)),
            );
        }
        out
    }

    pub fn hidden_size(&self) -> usize {
        self.model.embed_tokens.dims()[1]
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }
}
