//! LoRA adapters in PEFT's layout: `adapter_config.json` plus `adapter_model.safetensors` with
//! keys `base_model.model.{module}.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
//! The adapted projection computes `x W^T + scaling * (x A^T) B^T`, scaling = alpha / r
//! (alpha / sqrt(r) with rsLoRA).

use super::{checkpoint::Checkpoint, CausalLm};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// One projection's low-rank update.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// PEFT's `lora_A.weight`, `[r, in_features]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// PEFT's `lora_B.weight`, `[out_features, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    /// Dropout on the adapter's input, applied only when gradients are tracked (training).
    pub dropout: f64,
}

impl<B: Backend> Lora<B> {
    /// `x [rows, in]` -> the update `[rows, out]`.
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = if self.dropout > 0.0 && B::ad_enabled(&x.device()) {
            let keep = 1.0 - self.dropout;
            let mask = Tensor::<B, 2>::random(
                x.dims(),
                burn::tensor::Distribution::Bernoulli(keep),
                &x.device(),
            );
            x * mask.div_scalar(keep)
        } else {
            x
        };
        x.matmul(self.lora_a.val().transpose())
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scaling)
    }
}

/// The fields of PEFT's adapter_config.json that laco-train reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: serde_json::Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
}

fn none() -> String {
    "none".into()
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// The projection names adapted (`q_proj`, ...).
    pub fn targets(&self, path: &Path) -> Result<Vec<String>> {
        match &self.target_modules {
            serde_json::Value::Array(v) => v
                .iter()
                .map(|t| t.as_str().map(String::from).ok_or_else(|| anyhow!("{}: target_modules must be names", path.display())))
                .collect(),
            _ => bail!("{}: target_modules must be a list of module names (regex strings are not supported)", path.display()),
        }
    }

    fn check(&self, path: &Path) -> Result<()> {
        let p = path.display();
        if self.use_dora {
            bail!("{p}: use_dora is not supported");
        }
        if self.fan_in_fan_out {
            bail!("{p}: fan_in_fan_out is not supported");
        }
        if self.bias != "none" {
            bail!(
                "{p}: bias \"{}\" is not supported (expected \"none\")",
                self.bias
            );
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            bail!("{p}: layers_to_transform is not supported");
        }
        if self.r == 0 {
            bail!("{p}: r must be at least 1");
        }
        Ok(())
    }
}

/// Loads a PEFT adapter directory into `lm`'s projections; fails on any missing, misshapen or
/// unexpected tensor.
pub fn load_adapter<B: Backend>(
    lm: &mut CausalLm<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<LoraConfig> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let cfg: LoraConfig =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
    cfg.check(&cfg_path)?;
    let targets = cfg.targets(&cfg_path)?;
    let ck = Checkpoint::open_file(&dir.join(ADAPTER_WEIGHTS))?;
    let scaling = cfg.scaling();
    for (name, linear) in lm.linears_mut() {
        let short = name.rsplit('.').next().unwrap_or_default();
        if !targets.iter().any(|t| t == short) {
            continue;
        }
        let [out, inp] = linear.weight.dims();
        let a = ck.tensor(
            &format!("base_model.model.{name}.lora_A.weight"),
            [cfg.r, inp],
            device,
        )?;
        let b = ck.tensor(
            &format!("base_model.model.{name}.lora_B.weight"),
            [out, cfg.r],
            device,
        )?;
        linear.lora = Some(Lora {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: 0.0,
        });
    }
    ck.finish(|_| false)?;
    Ok(cfg)
}

/// Folds every adapter of `lm` into its projection, W' = W + scaling x (B A), and removes the
/// adapter, as PEFT's `merge_and_unload` does: the forward pass then gives the same logits
/// without it. The sum is computed in f32 and stored in W's dtype. Returns the number of
/// projections merged.
pub fn merge_adapters<B: Backend>(lm: &mut CausalLm<B>) -> usize {
    let f32 = |t: Tensor<B, 2>| t.cast(burn::tensor::FloatDType::F32);
    let mut merged = 0;
    for (_, linear) in lm.linears_mut() {
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
    /// The Mercity/Qwen3-8B-LaCo-Pruned card's recovery settings.
    fn default() -> Self {
        let targets = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        Self {
            r: 32,
            alpha: 64.0,
            dropout: 0.05,
            target_modules: targets.map(String::from).to_vec(),
        }
    }
}

/// Freezes every weight of `lm` and adds fresh adapters on the targeted projections, initialised
/// as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0, so the
/// adapted model starts equal to the base.
pub fn attach_new<B: Backend>(
    lm: CausalLm<B>,
    s: &LoraSettings,
    device: &B::Device,
) -> CausalLm<B> {
    let mut lm = lm.no_grad();
    let scaling = s.alpha / s.r as f64;
    for (name, linear) in lm.linears_mut() {
        let short = name.rsplit('.').next().unwrap_or_default();
        if !s.target_modules.iter().any(|t| t == short) {
            continue;
        }
        let [out, inp] = linear.weight.dims();
        let bound = 1.0 / (inp as f64).sqrt();
        let a = Tensor::random(
            [s.r, inp],
            burn::tensor::Distribution::Uniform(-bound, bound),
            device,
        );
        let b = Tensor::zeros([out, s.r], device);
        linear.lora = Some(Lora {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling,
            dropout: s.dropout,
        });
    }
    lm
}

/// Writes `lm`'s adapters as a PEFT adapter directory (`out` must exist).
pub fn save_adapter<B: Backend>(
    lm: &mut CausalLm<B>,
    s: &LoraSettings,
    base_model: &Path,
    out: &Path,
) -> Result<()> {
    let mut weights = Vec::new();
    for (name, linear) in lm.linears_mut() {
        if let Some(l) = &linear.lora {
            weights.push((
                format!("base_model.model.{name}.lora_A.weight"),
                super::save::Weight::Matrix(l.lora_a.val()),
            ));
            weights.push((
                format!("base_model.model.{name}.lora_B.weight"),
                super::save::Weight::Matrix(l.lora_b.val()),
            ));
        }
    }
    super::save::write_safetensors(
        &weights,
        safetensors::Dtype::F32,
        &out.join(ADAPTER_WEIGHTS),
    )?;
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model.display().to_string(),
        "r": s.r, "lora_alpha": s.alpha, "lora_dropout": s.dropout, "target_modules": s.target_modules,
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "use_rslora": false, "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
    });
    let path = out.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}
