//! What `distill` measures on held-out data: perplexity of a text the training never sees and,
//! when configured, MMLU on the first `mmlu_limit` questions of each subject.

use super::config::OutputSection;
use crate::eval::choice::{score, Question};
use crate::eval::mmlu::{self, Report};
use crate::eval::ppl::perplexity;
use crate::model::{CausalLm, Rope, Tokenizer};
use anyhow::Result;
use burn::tensor::backend::Backend;
use indicatif::ProgressBar;
use std::path::PathBuf;

pub struct HeldOut {
    ids: Vec<u32>,
    questions: Vec<Question>,
    tokenizer: Tokenizer,
    max_length: usize,
}

impl HeldOut {
    pub fn load(out: &OutputSection, tokenizer: &Tokenizer, max_length: usize) -> Result<Self> {
        let text = crate::data::read_text(&out.eval_text)?;
        let mut ids = tokenizer.encode(&text)?;
        ids.truncate(out.eval_tokens);
        let questions = if out.mmlu_limit == 0 {
            Vec::new()
        } else {
            let dir = out
                .mmlu_data
                .clone()
                .unwrap_or_else(|| PathBuf::from(mmlu::BUNDLED));
            let selection = mmlu::Selection {
                shots: out.mmlu_shots,
                subjects: Vec::new(),
                limit: Some(out.mmlu_limit),
            };
            mmlu::load(&dir, &selection)?
        };
        Ok(Self {
            ids,
            questions,
            tokenizer: tokenizer.clone(),
            max_length,
        })
    }

    pub fn ppl<B: Backend>(&self, lm: &CausalLm<B>, rope: &Rope<B>) -> Result<f64> {
        Ok(perplexity(lm, rope, &self.ids, 256, 4, &ProgressBar::hidden())?.ppl)
    }

    /// MMLU accuracy report, or `None` when MMLU is not configured.
    pub fn mmlu<B: Backend>(&self, lm: &CausalLm<B>, rope: &Rope<B>) -> Result<Option<Report>> {
        if self.questions.is_empty() {
            return Ok(None);
        }
        let quiet = ProgressBar::hidden();
        let scored = score(
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
