//! Multiple-choice questions scored as lm-evaluation-harness's `multiple_choice` tasks: each
//! choice is a continuation `target_delimiter + choice` after the prompt; `acc` picks the highest
//! log-likelihood, `acc_norm` the highest log-likelihood per character of the choice.

use super::loglik::{loglikelihoods, Request};
use crate::dist::World;
use crate::hf::Tokenizer;
use crate::model::{CausalLm, Rope};
use anyhow::Result;
use burn::tensor::backend::Backend;
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;

/// lm-eval's default `target_delimiter`.
pub const TARGET_DELIMITER: &str = " ";

#[derive(Debug, Clone)]
pub struct Question {
    /// Questions of one group share their prompt's beginning (an MMLU subject).
    pub group: String,
    /// The full prompt, few-shot examples included.
    pub prompt: String,
    pub choices: Vec<String>,
    pub answer: usize,
    /// The question as the dataset gives it, for --log-samples.
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub loglik: Vec<f64>,
    pub pred: usize,
    pub pred_norm: usize,
}

impl Scored {
    fn new(loglik: Vec<f64>, choices: &[String]) -> Self {
        let per_char: Vec<f64> = loglik
            .iter()
            .zip(choices)
            .map(|(l, c)| l / c.chars().count() as f64)
            .collect();
        Self {
            pred: argmax(&loglik),
            pred_norm: argmax(&per_char),
            loglik,
        }
    }
}

/// Python's `str.strip()`, which prompts in lm-eval apply: Rust's whitespace plus the
/// separators U+001C..U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The first index of the largest value (numpy's argmax).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Scores every question, consecutive questions of one group together (their shared prompt
/// prefix runs once); prompts longer than `max_length` tokens lose their beginning, as in
/// lm-eval. `progress` advances by one per question.
pub fn score<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    tokenizer: &Tokenizer,
    max_length: usize,
    questions: &[Question],
    batch: usize,
    progress: &ProgressBar,
) -> Result<Vec<Scored>> {
    let mut out = Vec::with_capacity(questions.len());
    for group in questions.chunk_by(|a, b| a.group == b.group) {
        // Tokenising five ~1000-token strings per question is a few percent of the scoring time:
        // spread it over the threads.
        let requests = group
            .par_iter()
            .map(|q| {
                let conts: Vec<String> = q
                    .choices
                    .iter()
                    .map(|c| format!("{TARGET_DELIMITER}{c}"))
                    .collect();
                Request::encode(tokenizer, &q.prompt, &conts)
            })
            .collect::<Result<Vec<_>>>()?;
        let logliks = loglikelihoods(lm, rope, &requests, max_length, batch, progress);
        out.extend(
            logliks
                .into_iter()
                .zip(group)
                .map(|(l, q)| Scored::new(l, &q.choices)),
        );
    }
    Ok(out)
}

/// [`score`] with each rank of `world` scoring its contiguous share of the questions (a group
/// split between two ranks runs its shared prefix on both); the log-likelihoods are gathered, so
/// every rank returns every question's score (`progress` counts this rank's questions). Every
/// rank must call it.
#[allow(clippy::too_many_arguments)]
pub fn score_on<B: Backend>(
    world: World,
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    tokenizer: &Tokenizer,
    max_length: usize,
    questions: &[Question],
    batch: usize,
    progress: &ProgressBar,
) -> Result<Vec<Scored>> {
    if world.size == 1 {
        return score(lm, rope, tokenizer, max_length, questions, batch, progress);
    }
    let mine = world.share(questions.len());
    let scored = score(
        lm,
        rope,
        tokenizer,
        max_length,
        &questions[mine.clone()],
        batch,
        progress,
    )?;
    // Every question's log-likelihoods at their place in one buffer, zeros elsewhere, summed
    // over the ranks: each value is added only to zeros, so it arrives unchanged.
    let mut offsets = vec![0];
    for q in questions {
        offsets.push(offsets.last().copied().unwrap_or(0) + q.choices.len());
    }
    let mut logliks = vec![0.0; offsets[questions.len()]];
    for (i, s) in mine.zip(&scored) {
        logliks[offsets[i]..offsets[i + 1]].copy_from_slice(&s.loglik);
    }
    world.sum(&mut logliks);
    Ok(questions
        .iter()
        .enumerate()
        .map(|(i, q)| Scored::new(logliks[offsets[i]..offsets[i + 1]].to_vec(), &q.choices))
        .collect())
}

/// Correct answers out of a number of questions.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
}

impl Accuracy {
    pub fn add(&mut self, right: bool) {
        self.correct += right as usize;
        self.total += 1;
    }

    pub fn value(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// `--log-samples`: one JSON line per question.
pub fn write_samples(
    path: &std::path::Path,
    questions: &[Question],
    scored: &[Scored],
) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let lines: String = questions
        .iter()
        .zip(scored)
        .map(|(q, s)| {
            let line = serde_json::json!({
                "subject": q.group, "question": q.text, "loglik": s.loglik,
                "pred": s.pred, "pred_norm": s.pred_norm, "answer": q.answer,
            });
            format!("{line}\n")
        })
        .collect();
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create --log-samples file", path.display()))?;
    f.write_all(lines.as_bytes())
        .with_context(|| format!("{}: cannot write", path.display()))
}
