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
mod lora;
mod packing;
mod prune;
mod resume;
mod teacher_cache;
mod tokenizer;
mod train_kernels;
