//! `laco-train eval`'s job: a model (with its adapter) scored on one task, with the checks
//! that its numbers are finite, the accuracies, and the per-question sample log.

use super::choice::{score_on, write_samples, Accuracy, Question, Scored};
use super::ppl::perplexity_on;
use super::{mmlu, zero_shot};
use crate::device::Job;
use crate::model::source::ModelSource;
use crate::model::Pretrained;
use crate::util::progress_bar;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use std::path::PathBuf;

/// What to measure.
#[derive(Debug, Clone)]
pub enum Task {
    /// Perplexity of the first `max_tokens` tokens of `text` in windows of `window` tokens.
    Ppl {
        text: PathBuf,
        window: usize,
        max_tokens: Option<usize>,
    },
    /// MMLU from a cais/mmlu directory (default: the bundled one).
    Mmlu {
        data: Option<PathBuf>,
        selection: mmlu::Selection,
    },
    /// A zero-shot task from its Hugging Face Parquet file or directory.
    ZeroShot {
        task: zero_shot::Task,
        data: PathBuf,
        limit: Option<usize>,
    },
}

pub struct EvalJob {
    pub model: ModelSource,
    pub task: Task,
    /// Windows (ppl) or questions per forward pass.
    pub batch_size: usize,
    /// One JSON line per question to this file.
    pub log_samples: Option<PathBuf>,
}

/// An evaluation's result: the text stdout shows (a perplexity line, the MMLU table, a
/// zero-shot accuracy line) and the figures as one JSON object.
pub struct EvalReport {
    pub text: String,
    pub json: serde_json::Value,
}

impl Job for EvalJob {
    type Output = EvalReport;
    fn run<B: Backend>(self, device: B::Device) -> Result<EvalReport> {
        let pre = self.model.load::<B>(&device)?;
        match &self.task {
            Task::Ppl {
                text,
                window,
                max_tokens,
            } => self.ppl(&pre, text, *window, *max_tokens),
            Task::Mmlu { data, selection } => {
                let questions = mmlu::load(data.as_deref(), selection)?;
                let (scored, per_sec) = self.scored(&pre, &questions, "mmlu")?;
                let report = mmlu::report(&questions, &scored);
                let mut json = serde_json::to_value(&report)?;
                json["task"] = "mmlu".into();
                json["shots"] = selection.shots.into();
                json["questions_per_sec"] = per_sec.into();
                Ok(EvalReport {
                    text: report.table(),
                    json,
                })
            }
            Task::ZeroShot { task, data, limit } => {
                let questions = zero_shot::load(*task, data, *limit)?;
                let (scored, per_sec) = self.scored(&pre, &questions, task.name())?;
                Ok(zero_shot_report(*task, &questions, &scored, per_sec))
            }
        }
    }
}

impl EvalJob {
    fn ppl<B: Backend>(
        &self,
        pre: &Pretrained<B>,
        path: &std::path::Path,
        window: usize,
        max_tokens: Option<usize>,
    ) -> Result<EvalReport> {
        let text = crate::data::read_text(path)?;
        let mut ids = pre.tokenizer.encode(&text)?;
        if let Some(n) = max_tokens {
            ids.truncate(n);
        }
        if ids.len() < 2 {
            bail!(
                "{}: {} tokens; perplexity needs at least 2",
                path.display(),
                ids.len()
            );
        }
        let bar = progress_bar("ppl");
        let started = std::time::Instant::now();
        // Under mpirun or srun each rank measures its share of the windows.
        let r = perplexity_on(
            crate::dist::world(),
            &pre.lm,
            &pre.rope,
            &ids,
            window,
            self.batch_size,
            &bar,
        )?;
        bar.finish_and_clear();
        if !r.ppl.is_finite() {
            bail!(
                "{}: perplexity is {} (mean NLL {}): the model's logits are not finite (NaN weights?)",
                self.model.name,
                r.ppl,
                r.mean_nll
            );
        }
        let secs = started.elapsed().as_secs_f64();
        let tokens_per_sec = ids.len() as f64 / secs;
        eprintln!(
            "ppl {:.4}  mean_nll {:.6}  predicted {}  ({:.1}s, {:.0} tokens/s)",
            r.ppl, r.mean_nll, r.predicted_tokens, secs, tokens_per_sec
        );
        Ok(EvalReport {
            text: format!("ppl {:.4}\n", r.ppl),
            json: serde_json::json!({
                "task": "ppl", "ppl": r.ppl, "mean_nll": r.mean_nll,
                "predicted_tokens": r.predicted_tokens, "tokens_per_sec": tokens_per_sec,
            }),
        })
    }

    /// Scores `questions` under a progress bar, refuses non-finite log-likelihoods, writes the
    /// sample log; returns the scores and questions/s.
    fn scored<B: Backend>(
        &self,
        pre: &Pretrained<B>,
        questions: &[Question],
        label: &str,
    ) -> Result<(Vec<Scored>, f64)> {
        let bar = progress_bar(label);
        bar.set_length(questions.len() as u64);
        let started = std::time::Instant::now();
        let world = crate::dist::world();
        let scored = score_on(
            world,
            &pre.lm,
            &pre.rope,
            &pre.tokenizer,
            pre.config.max_length,
            questions,
            self.batch_size,
            &bar,
        )?;
        bar.finish_and_clear();
        if scored
            .iter()
            .any(|s| s.loglik.iter().any(|l| !l.is_finite()))
        {
            bail!(
                "{}: log-likelihoods are not finite: the model's logits are not finite (NaN weights?)",
                self.model.name
            );
        }
        let secs = started.elapsed().as_secs_f64();
        let per_sec = questions.len() as f64 / secs;
        eprintln!(
            "{label}: {} questions in {secs:.1}s ({per_sec:.2} questions/s)",
            questions.len()
        );
        if let Some(path) = self.log_samples.as_ref().filter(|_| world.is_root()) {
            write_samples(path, questions, &scored)?;
        }
        Ok((scored, per_sec))
    }
}

/// Accuracy (and, where the task has it, length-normalised accuracy) of a zero-shot task.
fn zero_shot_report(
    task: zero_shot::Task,
    questions: &[Question],
    scored: &[Scored],
    per_sec: f64,
) -> EvalReport {
    let (mut acc, mut acc_norm) = (Accuracy::default(), Accuracy::default());
    for (q, s) in questions.iter().zip(scored) {
        acc.add(s.pred == q.answer);
        acc_norm.add(s.pred_norm == q.answer);
    }
    let mut line = format!("{}  acc {:.4}", task.name(), acc.value());
    let mut json = serde_json::json!({
        "task": task.name(), "acc": acc.value(), "questions": acc.total,
        "questions_per_sec": per_sec,
    });
    if task.has_acc_norm() {
        line.push_str(&format!("  acc_norm {:.4}", acc_norm.value()));
        json["acc_norm"] = acc_norm.value().into();
    }
    EvalReport {
        text: format!("{line}  questions {}\n", acc.total),
        json,
    }
}
