//! Knowledge distillation of a pruned student from its teacher into LoRA adapters.

pub mod config;
pub mod evaluate;
pub mod loss;
pub mod trainer;
