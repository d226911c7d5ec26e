//! Evaluation tasks.

pub mod choice;
pub mod job;
pub mod loglik;
pub mod mmlu;
pub mod ppl;
pub mod zero_shot;
