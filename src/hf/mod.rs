//! Hugging Face file formats, and nothing that runs a model: `config.json`, safetensors files
//! (single, sharded with an index, read memory-mapped and written in a storage dtype), model
//! directories as `save_pretrained` writes them, PEFT adapter directories, `tokenizer.json`, and
//! the local Hugging Face cache (models and datasets by id).
//! The model ([`crate::model`]) is built from these and written back through them.

pub mod config;
pub mod hub;
pub mod model_dir;
pub mod peft;
pub mod tokenizer;
pub mod weights;

pub use config::{Family, ModelConfig};
pub use tokenizer::Tokenizer;
pub use weights::{Weight, WeightReader};
