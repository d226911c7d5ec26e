//! laco-train: LaCo layer-collapse pruning of Hugging Face decoder LLMs and knowledge-distillation
//! recovery into LoRA adapters, on burn (CPU or CUDA).

pub mod cli;
pub mod data;
pub mod device;
pub mod distill;
pub mod eval;
pub mod model;
pub mod prune;
