//! Where a distillation step's teacher distributions come from: the teacher model, run every
//! step, or a teacher cache ([`super::teacher_cache`]) read instead.

use super::step::{micro_step, micro_step_cached, MicroStep, StepSettings};
use super::teacher_cache::TeacherCache;
use crate::data::batch::Batch;
use crate::model::{CausalLm, Pretrained, Rope};
use anyhow::{bail, Result};
use burn::tensor::backend::AutodiffBackend;

/// The source of a step's teacher distributions.
pub enum Teacher<B: AutodiffBackend> {
    /// The teacher model, run every step.
    Model(Box<Pretrained<B::InnerBackend>>),
    /// A teacher cache: no teacher forward pass.
    Cache(TeacherCache),
}

impl<B: AutodiffBackend> Teacher<B> {
    /// [`micro_step`] or [`micro_step_cached`] of one micro-batch; the hidden term needs the
    /// model (the config refuses it with a cache).
    pub fn micro_step(
        &self,
        lm: &CausalLm<B>,
        rope: &Rope<B>,
        batch: &Batch<B>,
        settings: StepSettings,
    ) -> Result<MicroStep<B>> {
        match self {
            Teacher::Model(teacher) => Ok(micro_step(lm, rope, teacher, batch, settings)),
            Teacher::Cache(cache) => {
                let device = batch.ids.device();
                let top_k = settings.loss.top_k;
                let (ids, logprobs) = cache.rows::<B>(&batch.keys, top_k, &device)?;
                if ids.dims()[0] != batch.count {
                    bail!(
                        "{}: the teacher cache's entries do not fit this run's sequences ({} rows for {} counted positions)",
                        cache.dir().display(),
                        ids.dims()[0],
                        batch.count
                    );
                }
                Ok(micro_step_cached(lm, rope, ids, logprobs, batch, settings))
            }
        }
    }
}
