//! `laco-train eval`: perplexity on a text file, MMLU few-shot, and zero-shot PIQA, BoolQ and
//! HellaSwag, scored as lm-evaluation-harness scores them.

use super::{at_least_one, at_least_two, print_json, Common, ModelArgs};
use crate::device::{dispatch, Job};
use crate::eval::choice::{score_on, write_samples, Accuracy, Question};
use crate::eval::ppl::perplexity_on;
use crate::eval::{mmlu, zero_shot};
use crate::model::Pretrained;
use crate::util::fs::check_writable;
use crate::util::progress_bar;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Perplexity of --text in non-overlapping windows.
    Ppl,
    /// MMLU, few-shot from the dev split, accuracy per subject, category and overall.
    Mmlu,
    /// PIQA zero-shot (acc, acc_norm).
    Piqa,
    /// BoolQ zero-shot (acc).
    Boolq,
    /// HellaSwag zero-shot (acc, acc_norm).
    Hellaswag,
}

/// Evaluate a model: perplexity, MMLU, PIQA, BoolQ, HellaSwag (as lm-evaluation-harness scores them).
///
/// --task ppl: the first --max-tokens tokens of --text (no BOS added), cut into non-overlapping
/// windows of --window tokens; each window predicts its last window-1 tokens; ppl = exp(mean NLL).
///
/// --task mmlu: lm-evaluation-harness's mmlu prompt (description, --shots dev questions of the
/// subject, the test question, "Answer:") and the log-likelihood of " A".." D"; --data is a
/// cais/mmlu directory (all/dev-*.parquet, all/test-*.parquet), by default the bundled copy.
///
/// --task piqa|boolq|hellaswag: lm-eval's zero-shot prompts; --data is a Parquet file in the
/// Hugging Face layout (ybisk/piqa, google/boolq, Rowan/hellaswag) or a directory holding its
/// *validation*.parquet.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long, value_enum)]
    pub task: Task,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to measure (ppl).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens per window (ppl).
    #[arg(long, default_value_t = 256, value_parser = at_least_two())]
    pub window: usize,
    /// Use only the first N tokens of the file (ppl); default: all.
    #[arg(long, value_parser = at_least_two())]
    pub max_tokens: Option<usize>,
    /// Dataset: a cais/mmlu directory (mmlu; default: the bundled one) or a Parquet file or
    /// directory (piqa, boolq, hellaswag).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Few-shot examples per MMLU question, the subject's first dev questions.
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// Only these MMLU subjects, comma-separated (e.g. abstract_algebra,anatomy).
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// The first N test questions of each MMLU subject, or of the zero-shot task.
    #[arg(long, value_parser = at_least_one())]
    pub limit: Option<usize>,
    /// Write one JSON line per question (subject, question, loglik, pred, answer) to FILE.
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
    /// Windows (ppl) or questions (the others) per forward pass.
    #[arg(long, default_value_t = 4, value_parser = at_least_one())]
    pub batch_size: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Job for EvalArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let pre = self.model.load::<B>(&device)?;
        match self.task {
            Task::Ppl => self.ppl(pre),
            Task::Mmlu => self.mmlu(pre),
            Task::Piqa => self.zero_shot(pre, zero_shot::Task::Piqa),
            Task::Boolq => self.zero_shot(pre, zero_shot::Task::Boolq),
            Task::Hellaswag => self.zero_shot(pre, zero_shot::Task::Hellaswag),
        }
    }
}

impl EvalArgs {
    /// The model as the user named it, for messages.
    fn model_name(&self) -> &Path {
        self.model
            .model
            .as_deref()
            .unwrap_or(Path::new("the bundled model"))
    }

    fn ppl<B: Backend>(self, pre: Pretrained<B>) -> Result<()> {
        let path = self.text.clone().expect("checked in run");
        let text = crate::data::read_text(&path)?;
        let mut ids = pre.tokenizer.encode(&text)?;
        if let Some(n) = self.max_tokens {
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
            self.window,
            self.batch_size,
            &bar,
        )?;
        bar.finish_and_clear();
        if !r.ppl.is_finite() {
            bail!(
                "{}: perplexity is {} (mean NLL {}): the model's logits are not finite (NaN weights?)",
                self.model_name().display(),
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
        if self.common.json {
            print_json(&serde_json::json!({
                "task": "ppl", "ppl": r.ppl, "mean_nll": r.mean_nll,
                "predicted_tokens": r.predicted_tokens, "tokens_per_sec": tokens_per_sec,
            }));
        } else {
            println!("ppl {:.4}", r.ppl);
        }
        Ok(())
    }

    fn mmlu<B: Backend>(self, pre: Pretrained<B>) -> Result<()> {
        let selection = mmlu::Selection {
            shots: self.shots,
            subjects: self.subjects.clone(),
            limit: self.limit,
        };
        let questions = mmlu::load(self.data.as_deref(), &selection)?;
        let (scored, per_sec) = self.scored(&pre, &questions, "mmlu")?;
        let report = mmlu::report(&questions, &scored);
        print!("{}", report.table());
        if self.common.json {
            let mut v = serde_json::to_value(&report).expect("report serialises");
            v["task"] = "mmlu".into();
            v["shots"] = self.shots.into();
            v["questions_per_sec"] = per_sec.into();
            print_json(&v);
        }
        Ok(())
    }

    fn zero_shot<B: Backend>(self, pre: Pretrained<B>, task: zero_shot::Task) -> Result<()> {
        let data = self.data.clone().expect("checked in run");
        let questions = zero_shot::load(task, &data, self.limit)?;
        let (scored, per_sec) = self.scored(&pre, &questions, task.name())?;
        let (mut acc, mut acc_norm) = (Accuracy::default(), Accuracy::default());
        for (q, s) in questions.iter().zip(&scored) {
            acc.add(s.pred == q.answer);
            acc_norm.add(s.pred_norm == q.answer);
        }
        let mut line = format!("{}  acc {:.4}", task.name(), acc.value());
        let mut v = serde_json::json!({
            "task": task.name(), "acc": acc.value(), "questions": acc.total,
            "questions_per_sec": per_sec,
        });
        if task.has_acc_norm() {
            line.push_str(&format!("  acc_norm {:.4}", acc_norm.value()));
            v["acc_norm"] = acc_norm.value().into();
        }
        println!("{line}  questions {}", acc.total);
        if self.common.json {
            print_json(&v);
        }
        Ok(())
    }

    /// Scores `questions` under a progress bar, writes --log-samples, returns questions/s.
    fn scored<B: Backend>(
        &self,
        pre: &Pretrained<B>,
        questions: &[Question],
        label: &str,
    ) -> Result<(Vec<crate::eval::choice::Scored>, f64)> {
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
                self.model_name().display()
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

pub fn run(args: EvalArgs) -> Result<()> {
    match args.task {
        Task::Ppl if args.text.is_none() => bail!("--task ppl needs --text FILE"),
        Task::Piqa | Task::Boolq | Task::Hellaswag if args.data.is_none() => {
            bail!(
                "--task {} needs --data FILE|DIR (its Hugging Face Parquet)",
                args.task.to_possible_value().expect("named").get_name()
            )
        }
        _ => {}
    }
    if let Some(path) = &args.log_samples {
        // Fails now, not after hours of evaluation.
        check_writable(path, "--log-samples")?;
    }
    let common = args.common.clone();
    dispatch(common.device, common.dtype, args)
}
