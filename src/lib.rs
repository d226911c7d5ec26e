//! laco-train: LaCo layer-collapse pruning of Hugging Face decoder LLMs and knowledge-distillation
//! recovery into LoRA adapters, on burn (CPU or CUDA).
//!
//! Layers, each importing only from those below it:
//! - `cli`: argument parsing and printing
//! - `train` (the distillation recipe), `prune` (LaCo), `eval` (perplexity, MMLU, zero-shot),
//!   `export` (an adapter merged into its model)
//! - `data` (Parquet instruction data, batches), `model` (the decoder architecture)
//! - `hf` (Hugging Face file formats), `kernels` (CPU kernels on Flex, cubecl kernels on the GPU backends), `device` (backends),
//!   `dist` (ranks of a launched job, their collectives), `util` (atomic writes, progress bars)

pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod hf;
pub mod kernels;
pub mod model;
pub mod prune;
pub mod train;
pub mod util;
