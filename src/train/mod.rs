//! Knowledge distillation of a pruned student from its teacher into LoRA adapters: the recipe
//! ([`recipe`]) and its components.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod hidden;
pub mod job;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod recipe;
pub mod step;
pub mod teacher;
pub mod teacher_cache;
