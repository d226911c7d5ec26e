//! PEFT LoRA adapter directories: `adapter_config.json` plus `adapter_model.safetensors` with
//! keys `base_model.model.{module}.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`)
//! (see [`key`]). The adapted projection computes `x W^T + scaling * (x A^T) B^T`, scaling =
//! alpha / r (alpha / sqrt(r) with rsLoRA).

use super::weights::WeightReader;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The two matrices of a LoRA adapter, as PEFT names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `lora_A.weight`, `[r, in_features]`.
    A,
    /// `lora_B.weight`, `[out_features, r]`.
    B,
}

/// PEFT's tensor name for `part` of the adapter on `module` (a Hugging Face module name such as
/// `model.layers.0.self_attn.q_proj`): `base_model.model.{module}.lora_A.weight`.
pub fn key(module: &str, part: Part) -> String {
    let part = match part {
        Part::A => "lora_A",
        Part::B => "lora_B",
    };
    format!("base_model.model.{module}.{part}.weight")
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

/// An adapter directory opened for reading: its checked config, the projection names it adapts
/// and its tensors (see [`key`]).
pub struct AdapterFiles {
    pub config: LoraConfig,
    pub targets: Vec<String>,
    pub weights: WeightReader,
}

impl AdapterFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let config: LoraConfig =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))?;
        config.check(&cfg_path)?;
        let targets = config.targets(&cfg_path)?;
        let weights = WeightReader::open_file(&dir.join(ADAPTER_WEIGHTS))?;
        Ok(Self {
            config,
            targets,
            weights,
        })
    }
}

/// Writes `dir/adapter_config.json` for a LoRA adapter trained on `base_model` (the adapter's
/// tensors go to `dir/adapter_model.safetensors`, see [`key`]).
pub fn write_config(
    dir: &Path,
    base_model: &Path,
    r: usize,
    alpha: f64,
    dropout: f64,
    target_modules: &[String],
) -> Result<()> {
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model.display().to_string(),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true,
        "use_rslora": false, "use_dora": false, "modules_to_save": null, "layers_to_transform": null,
    });
    let path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_peft_names() {
        assert_eq!(
            key("model.layers.3.mlp.down_proj", Part::B),
            "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
        );
    }
}
