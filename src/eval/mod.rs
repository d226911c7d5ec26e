//! Evaluation tasks.

pub mod ppl;
