//! `config.json` of a Hugging Face causal LM, read as the file spells it, then turned into the
//! runtime shape the decoder needs.

use crate::util::check;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The decoder families laco-train runs; they differ only in the few switches of [`ModelConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Qwen3: per-head RMSNorm on q and k before RoPE, no projection bias.
    Qwen3,
    /// Qwen2/2.5: bias on q, k and v.
    Qwen2,
    /// Llama (SmolLM2, Llama 2/3): no norms on q/k, no bias unless `attention_bias`.
    Llama,
}

/// `config.json`, field for field. Keys that vary between checkpoints are optional.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// transformers 4 and Qwen3-8B-Base's own config put it at the top level.
    pub rope_theta: Option<f64>,
    /// transformers 5 moves it here.
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub torch_dtype: Option<String>,
    pub dtype: Option<String>,
    pub max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// What the decoder needs, with every default resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama's `attention_bias` covers o too; Qwen2's bias does not).
    pub o_bias: bool,
    /// The checkpoint's own dtype name ("bfloat16", "float32", ...), if the config gives one.
    pub dtype: Option<String>,
    /// Longest sequence the model was trained on: `max_position_embeddings`, else 2048 (what
    /// lm-evaluation-harness assumes); evaluation truncates prompts from the left to fit it.
    pub max_length: usize,
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Resolves defaults and rejects what the decoder cannot run. `path` names the file in errors.
    pub fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let p = path.display();
        let family = match self.model_type.as_deref() {
            Some("qwen3") => Family::Qwen3,
            Some("qwen2") => Family::Qwen2,
            Some("llama") => Family::Llama,
            Some(other) => bail!(
                "{p}: model_type \"{other}\" is not supported (expected qwen3, qwen2 or llama)"
            ),
            None => bail!("{p}: model_type is missing (expected qwen3, qwen2 or llama)"),
        };
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                bail!("{p}: hidden_act \"{act}\" is not supported (expected silu)");
            }
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.clone());
        let scaled = self.rope_scaling.as_ref().is_some_and(|v| !v.is_null());
        if scaled || rope_type.as_deref().is_some_and(|t| t != "default") {
            bail!("{p}: rope scaling is not supported (only rope_type \"default\")");
        }
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("{p}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}");
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => bail!("{p}: head_dim is missing and hidden_size is not divisible by heads"),
        };
        let at = |field: &str| format!("{p}: {field}");
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("head_dim", head_dim),
            (
                "max_position_embeddings",
                self.max_position_embeddings.unwrap_or(1),
            ),
        ] {
            check::at_least(&at(field), v, 1)?;
        }
        if !head_dim.is_multiple_of(2) {
            bail!("{p}: head_dim must be even for the rotary embedding, got {head_dim}");
        }
        check::positive(&at("rms_norm_eps"), self.rms_norm_eps)?;
        check::positive(&at("rope_theta"), rope_theta)?;
        let attention_bias = self.attention_bias.unwrap_or(false);
        let qkv_bias = attention_bias || family == Family::Qwen2;
        let o_bias = attention_bias && family != Family::Qwen2;
        Ok(ModelConfig {
            family,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias,
            o_bias,
            dtype: self.dtype.or(self.torch_dtype),
            max_length: self.max_position_embeddings.unwrap_or(2048),
        })
    }
}

/// `DIR/config.json` as it stands, to be updated and written with a derived model
/// ([`super::model_dir::save_pretrained`]).
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

impl ModelConfig {
    /// Reads and resolves `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        HfConfig::from_file(&path)?.into_config(&path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let cfg: HfConfig = serde_json::from_str(json).unwrap();
        cfg.into_config(Path::new("config.json"))
    }

    /// Qwen3-8B-Base's own config.json (transformers 4 style: top-level rope_theta, torch_dtype).
    const QWEN3_8B_BASE: &str = r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,
        "attention_dropout":0.0,"bos_token_id":151643,"eos_token_id":151643,"head_dim":128,
        "hidden_act":"silu","hidden_size":4096,"initializer_range":0.02,"intermediate_size":12288,
        "max_position_embeddings":32768,"max_window_layers":36,"model_type":"qwen3",
        "num_attention_heads":32,"num_hidden_layers":36,"num_key_value_heads":8,"rms_norm_eps":1e-06,
        "rope_scaling":null,"rope_theta":1000000,"sliding_window":null,"tie_word_embeddings":false,
        "torch_dtype":"bfloat16","transformers_version":"4.51.0","use_cache":true,
        "use_sliding_window":false,"vocab_size":151936}"#;

    #[test]
    fn reads_qwen3_8b_base_config() {
        let c = parse(QWEN3_8B_BASE).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert_eq!(
            (c.num_hidden_layers, c.head_dim, c.num_key_value_heads),
            (36, 128, 8)
        );
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.vocab_size, 151_936);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(!c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
    }

    #[test]
    fn reads_transformers5_rope_parameters_and_dtype() {
        let json = QWEN3_8B_BASE
            .replace(
                r#""rope_theta":1000000,"#,
                r#""rope_parameters":{"rope_theta":5000.0,"rope_type":"default"},"#,
            )
            .replace("torch_dtype", "dtype");
        let c = parse(&json).unwrap();
        assert_eq!(c.rope_theta, 5000.0);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_llama_defaults_head_dim() {
        let q2 =
            parse(&QWEN3_8B_BASE.replace(r#""model_type":"qwen3""#, r#""model_type":"qwen2""#))
                .unwrap();
        assert!(q2.qkv_bias && !q2.o_bias);
        let llama = parse(r#"{"model_type":"llama","vocab_size":10,"hidden_size":64,"intermediate_size":96,
            "num_hidden_layers":2,"num_attention_heads":4,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#)
        .unwrap();
        assert_eq!(
            (llama.head_dim, llama.num_key_value_heads, llama.rope_theta),
            (16, 4, 10_000.0)
        );
    }

    #[test]
    fn unsupported_settings_name_the_field() {
        let e = parse(&QWEN3_8B_BASE.replace(r#""model_type":"qwen3""#, r#""model_type":"gpt2""#))
            .unwrap_err();
        assert!(e.to_string().contains("config.json: model_type \"gpt2\""));
        let e = parse(&QWEN3_8B_BASE.replace(
            r#""rope_scaling":null"#,
            r#""rope_scaling":{"type":"yarn"}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("rope scaling"));
    }
}
