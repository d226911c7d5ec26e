//! LoRA adapters over the whole decoder: fresh adapters for training ([`attach_new`],
//! initialised as PEFT does), PEFT adapter directories read into the model and written from it
//! (the format itself is [`crate::hf::peft`]), and merging into the weights.

use super::lora::Lora;
use super::{attention, mlp, CausalLm};
use crate::hf::peft::{self, AdapterFiles, LoraConfig, Part};
use crate::hf::weights::{write_safetensors, Weight};
use anyhow::{bail, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, ElementConversion, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Loads a PEFT adapter directory into `lm`'s projections; fails on any missing, misshapen or
/// unexpected tensor.
pub fn load_adapter<B: Backend>(
    lm: &mut CausalLm<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<LoraConfig> {
    let files = AdapterFiles::open(dir)?;
    let (cfg, ck) = (&files.config, &files.weights);
    for (name, linear) in lm.projections_mut() {
        if !cfg.adapts(&name) {
            continue;
        }
        let (r, scaling) = cfg.module(&name);
        let [out, inp] = linear.weight.dims();
        let rank = || {
            format!(
                "{}: the adapter on {name} has rank {r} (r, or the rank_pattern key matching it)",
                dir.join(peft::ADAPTER_CONFIG).display()
            )
        };
        let a = ck
            .tensor(&peft::key(&name, Part::A), [r, inp], device)
            .with_context(rank)?;
        let b = ck
            .tensor(&peft::key(&name, Part::B), [out, r], device)
            .with_context(rank)?;
        linear.lora = Some(Lora {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: 0.0,
        });
    }
    ck.finish(|_| false)?;
    Ok(files.config)
}

/// Folds every adapter of `lm` into its projection, W' = W + scaling x (B A), and removes the
/// adapter, as PEFT's `merge_and_unload` does: the forward pass then gives the same logits
/// without it. The sum is computed in f32 and stored in W's dtype. Returns the number of
/// projections merged.
pub fn merge_adapters<B: Backend>(lm: &mut CausalLm<B>) -> usize {
    let f32 = |t: Tensor<B, 2>| t.cast(burn::tensor::FloatDType::F32);
    let mut merged = 0;
    for (_, linear) in lm.projections_mut() {
        let Some(lora) = linear.lora.take() else {
            continue;
        };
        let delta = f32(lora.lora_b.val())
            .matmul(f32(lora.lora_a.val()))
            .mul_scalar(lora.scaling);
        linear.weight = linear.weight.clone().map(|w| {
            let dtype = w.dtype();
            (f32(w) + delta).cast(dtype)
        });
        merged += 1;
    }
    merged
}

/// What to train: rank, alpha, dropout and target projections (PEFT's meanings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraSettings {
    /// The Mercity/Qwen3-8B-LaCo-Pruned card's recovery settings: every projection.
    fn default() -> Self {
        Self {
            r: 32,
            alpha: 64.0,
            dropout: 0.05,
            target_modules: projection_names().map(String::from).collect(),
        }
    }
}

impl LoraSettings {
    /// Every target is a projection of the decoder, and there is at least one.
    pub fn check_targets(&self, place: &str) -> Result<()> {
        let known: Vec<&str> = projection_names().collect();
        if self.target_modules.is_empty() {
            bail!("{place} is empty (expected some of {known:?})");
        }
        if let Some(t) = self
            .target_modules
            .iter()
            .find(|t| !known.contains(&t.as_str()))
        {
            bail!(
                "{place}: \"{t}\" is not a projection of this decoder (expected some of {known:?})"
            );
        }
        Ok(())
    }
}

/// The short names of every projection of a decoder layer (`q_proj`, ..., `down_proj`).
fn projection_names() -> impl Iterator<Item = &'static str> {
    attention::PROJECTIONS.into_iter().chain(mlp::PROJECTIONS)
}

/// Freezes every weight of `lm` and adds fresh adapters on the targeted projections, initialised
/// as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0, so the
/// adapted model starts equal to the base; the adapters are f32 whatever the compute dtype.
pub fn attach_new<B: Backend>(
    lm: CausalLm<B>,
    s: &LoraSettings,
    device: &B::Device,
) -> CausalLm<B> {
    let mut lm = lm.no_grad();
    let scaling = s.alpha / s.r as f64;
    for (name, linear) in lm.projections_mut() {
        let short = name.rsplit('.').next().unwrap_or_default();
        if !s.target_modules.iter().any(|t| t == short) {
            continue;
        }
        let [out, inp] = linear.weight.dims();
        let bound = 1.0 / (inp as f64).sqrt();
        // f32 whatever the compute dtype: AdamW's small updates would vanish in bf16.
        let f32 = (device, DType::F32);
        let a = Tensor::random(
            [s.r, inp],
            burn::tensor::Distribution::Uniform(-bound, bound),
            f32,
        );
        let b = Tensor::zeros([out, s.r], f32);
        linear.lora = Some(Lora {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: s.dropout,
        });
    }
    lm
}

/// Every adapter tensor of `lm` under its PEFT name, in model order.
pub fn adapter_weights<B: Backend>(lm: &CausalLm<B>) -> Vec<(String, Weight<B>)> {
    let mut out = Vec::new();
    for (name, linear) in lm.projections() {
        if let Some(l) = &linear.lora {
            out.push((peft::key(&name, Part::A), Weight::Matrix(l.lora_a.val())));
            out.push((peft::key(&name, Part::B), Weight::Matrix(l.lora_b.val())));
        }
    }
    out
}

/// Writes `lm`'s adapters as a PEFT adapter directory (`out` must exist) for `base_model`;
/// refuses adapters holding a NaN or an infinity.
pub fn save_adapter<B: Backend>(
    lm: &CausalLm<B>,
    s: &LoraSettings,
    base_model: &Path,
    out: &Path,
) -> Result<()> {
    let weights = adapter_weights(lm);
    for (key, weight) in &weights {
        let Weight::Matrix(t) = weight else { continue };
        // 0 x inf and 0 x NaN are NaN: the sum is finite only when every element is.
        let probe: f64 = t.clone().mul_scalar(0.0).sum().into_scalar().elem();
        if !probe.is_finite() {
            bail!(
                "{key} holds a NaN or an infinity: the adapter is not written (training diverged)"
            );
        }
    }
    write_safetensors(
        &weights,
        safetensors::Dtype::F32,
        &out.join(peft::ADAPTER_WEIGHTS),
    )?;
    peft::write_config(out, base_model, s.r, s.alpha, s.dropout, &s.target_modules)
}
