//! The decoder (Qwen3, Qwen2, Llama) and everything to load it from a Hugging Face directory.

pub mod attention;
pub mod cache;
pub mod checkpoint;
pub mod chunk;
pub mod config;
pub mod decoder;
pub mod flash;
pub mod flash_grad;
pub mod flex;
pub mod flex_grad;
pub mod generate;
pub mod linear;
pub mod lora;
pub mod mlp;
pub mod norm;
pub mod pointwise_grad;
pub mod rope;
pub mod save;
pub mod simd;
pub mod tokenizer;

use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::path::Path;

pub use cache::KvCache;
pub use checkpoint::Checkpoint;
pub use config::ModelConfig;
pub use decoder::CausalLm;
pub use rope::Rope;
pub use tokenizer::Tokenizer;

/// A model directory loaded for running: weights, shared rotary tables, config and tokenizer.
pub struct Pretrained<B: Backend> {
    pub lm: CausalLm<B>,
    pub rope: Rope<B>,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// How the checkpoint stores its weights, so derived models are written the same way.
    pub storage: Storage,
}

/// The source checkpoint's storage: dtype of its weights and number of safetensors files.
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
        let ck = Checkpoint::open(dir)?;
        let lm = CausalLm::load(&ck, &config, device)?;
        let rope = Rope::new(config.head_dim, config.rope_theta, device);
        let dtype = ck
            .dtype_of("model.embed_tokens.weight")
            .unwrap_or(safetensors::Dtype::F32);
        let storage = Storage {
            dtype,
            shards: ck.num_shards(),
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
