//! What `distill` measures on held-out data: perplexity of a text the training never sees and,
//! when configured, MMLU on the first `mmlu_limit` questions of each subject.

use super::config::OutputSection;
use crate::dist::World;
use crate::eval::choice::{score_on, Question};
use crate::eval::mmlu::{self, Report};
use crate::eval::ppl::perplexity_on;
use crate::hf::Tokenizer;
use crate::model::{CausalLm, Rope};
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

/// The teacher's and the pruned student's scores before training, kept in checkpoints so a
/// resumed run does not measure them again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub ppl_teacher: f64,
    pub ppl_student: f64,
    pub mmlu_teacher: Option<Report>,
    pub mmlu_student: Option<Report>,
}

impl Baseline {
    pub fn print(&self) {
        eprintln!(
            "held-out ppl: teacher {:.3}, pruned student {:.3}",
            self.ppl_teacher, self.ppl_student
        );
        if let (Some(t), Some(s)) = (&self.mmlu_teacher, &self.mmlu_student) {
            eprintln!(
                "MMLU ({} questions): teacher {:.4}, pruned student {:.4}",
                t.questions, t.acc, s.acc
            );
        }
    }
}

/// The held-out data; in a data-parallel run every rank measures its share of it (every rank
/// must call the measurements) and gets the whole result.
pub struct HeldOut {
    ids: Vec<u32>,
    questions: Vec<Question>,
    tokenizer: Tokenizer,
    max_length: usize,
    world: World,
}

impl HeldOut {
    pub fn load(
        out: &OutputSection,
        tokenizer: &Tokenizer,
        max_length: usize,
        world: World,
    ) -> Result<Self> {
        let text = crate::data::read_text(&out.eval_text)?;
        let mut ids = tokenizer.encode(&text)?;
        ids.truncate(out.eval_tokens);
        if ids.len() < 2 {
            bail!(
                "{}: {} tokens (output.eval_text); perplexity needs at least 2",
                out.eval_text.display(),
                ids.len()
            );
        }
        let questions = if out.mmlu_limit == 0 {
            Vec::new()
        } else {
            let selection = mmlu::Selection {
                shots: out.mmlu_shots,
                subjects: Vec::new(),
                limit: Some(out.mmlu_limit),
            };
            mmlu::load(out.mmlu_data.as_deref(), &selection)?
        };
        Ok(Self {
            ids,
            questions,
            tokenizer: tokenizer.clone(),
            max_length,
            world,
        })
    }

    pub fn ppl<B: Backend>(&self, lm: &CausalLm<B>, rope: &Rope<B>) -> Result<f64> {
        let quiet = ProgressBar::hidden();
        Ok(perplexity_on(self.world, lm, rope, &self.ids, 256, 4, &quiet)?.ppl)
    }

    /// Perplexity and MMLU (when configured) of `lm`.
    pub fn measure<B: Backend>(
        &self,
        lm: &CausalLm<B>,
        rope: &Rope<B>,
    ) -> Result<(f64, Option<Report>)> {
        Ok((self.ppl(lm, rope)?, self.mmlu(lm, rope)?))
    }

    /// MMLU accuracy report, or `None` when MMLU is not configured.
    pub fn mmlu<B: Backend>(&self, lm: &CausalLm<B>, rope: &Rope<B>) -> Result<Option<Report>> {
        if self.questions.is_empty() {
            return Ok(None);
        }
        let quiet = ProgressBar::hidden();
        let scored = score_on(
            self.world,
            lm,
            rope,
            &self.tokenizer,
            self.max_length,
            &self.questions,
            1,
            &quiet,
        )?;
        Ok(Some(mmlu::report(&self.questions, &scored)))
    }
}
