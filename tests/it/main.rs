//! The integration tests, one binary: parity with the goldens (transformers, PEFT, lm-eval),
//! the CPU kernels against burn's generic ops, and the commands end to end.

mod bf16;
mod burn_attention;
mod cli;
mod common;
mod data;
mod distill;
mod eval;
mod export;
mod forward;
mod hardening;
mod hidden;
mod kd;
mod launch;
mod layout;
mod lora;
#[cfg(feature = "mpi")]
mod mpi;
mod packing;
mod parity;
mod prune;
mod recompute;
mod resume;
mod teacher_cache;
mod tokenizer;
mod train_kernels;
#[cfg(feature = "wgpu")]
mod wgpu;
