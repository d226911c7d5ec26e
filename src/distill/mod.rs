//! Knowledge distillation of a pruned student from its teacher into LoRA adapters.

pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod events;
pub mod kd_kernel;
pub mod loss;
pub mod trainer;
