//! Knowledge distillation of a pruned student from its teacher into LoRA adapters.

pub mod loss;
