//! The decoder architecture (Qwen3, Qwen2, Llama), built from Hugging Face files
//! ([`crate::hf`]) and running burn's tensor ops, or [`crate::kernels`] where they apply:
//! decoder stack, attention, MLP, norm, rotary embedding, projections with LoRA adapters, KV
//! cache, logit chunking, target log-probabilities, generation, packed rows (segments), attention masks, and
//! which model a command runs (source).

pub mod adapter;
pub mod attention;
pub mod cache;
pub mod chunk;
pub mod decoder;
pub mod generate;
pub mod linear;
pub mod logprobs;
pub mod lora;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod pretrained;
pub mod rope;
pub mod segments;
pub mod source;

pub use cache::KvCache;
pub use decoder::{CausalLm, DecoderLayer, Pass, Rows};
pub use pretrained::{Pretrained, Storage};
pub use rope::Rope;
pub use segments::Segments;
