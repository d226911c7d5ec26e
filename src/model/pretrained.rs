//! A Hugging Face model directory loaded for running: weights, shared rotary tables, config and
//! tokenizer.

use super::{CausalLm, Rope};
use crate::hf::{ModelConfig, Tokenizer, WeightReader};
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::path::Path;

pub struct Pretrained<B: Backend> {
    pub lm: CausalLm<B>,
    pub rope: Rope<B>,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// How the directory stores its weights, so derived models are written the same way.
    pub storage: Storage,
}

/// The source directory's storage: dtype of its weights and number of safetensors files.
#[derive(Debug, Clone, Copy)]
pub struct Storage {
    pub dtype: safetensors::Dtype,
    pub shards: usize,
}

impl<B: Backend> Pretrained<B> {
    /// Loads `dir` (config.json, safetensors, tokenizer.json) onto `device`, converting the
    /// weights to the device's default float dtype.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        let config = ModelConfig::from_dir(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let weights = WeightReader::open(dir)?;
        let lm = CausalLm::load(&weights, &config, device)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, device);
        let dtype = weights
            .dtype_of("model.embed_tokens.weight")
            .unwrap_or(safetensors::Dtype::F32);
        let storage = Storage {
            dtype,
            shards: weights.num_shards(),
        };
        Ok(Self {
            lm,
            rope,
            config,
            tokenizer,
            storage,
        })
    }
}
