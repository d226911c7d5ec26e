//! The integration tests, one binary: parity with the goldens (transformers, PEFT, lm-eval),
//! the CPU kernels against burn's generic ops, and the commands end to end.

mod cli;
mod common;
mod data;
mod distill;
mod eval;
mod export;
mod forward;
mod kd;
mod launch;
mod lora;
#[cfg(feature = "mpi")]
mod mpi;
mod prune;
mod resume;
mod tokenizer;
mod train_kernels;
