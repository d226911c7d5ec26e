//! `laco-train eval`: perplexity on a text file, MMLU few-shot, and zero-shot PIQA, BoolQ and
//! HellaSwag, scored as lm-evaluation-harness scores them.

use super::{at_least_one, at_least_two, print_json, Common, ModelArgs};
use crate::device::dispatch;
use crate::eval::job::{EvalJob, Task as Measure};
use crate::eval::{mmlu, zero_shot};
use crate::util::fs::check_writable;
use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

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

pub fn run(args: EvalArgs) -> Result<()> {
    let task = match args.task {
        Task::Ppl => Measure::Ppl {
            text: args
                .text
                .ok_or_else(|| anyhow!("--task ppl needs --text FILE"))?,
            window: args.window,
            max_tokens: args.max_tokens,
        },
        Task::Mmlu => Measure::Mmlu {
            data: args.data,
            selection: mmlu::Selection {
                shots: args.shots,
                subjects: args.subjects,
                limit: args.limit,
            },
        },
        Task::Piqa | Task::Boolq | Task::Hellaswag => {
            let task = match args.task {
                Task::Piqa => zero_shot::Task::Piqa,
                Task::Boolq => zero_shot::Task::Boolq,
                _ => zero_shot::Task::Hellaswag,
            };
            let Some(data) = args.data else {
                bail!(
                    "--task {} needs --data FILE|DIR (its Hugging Face Parquet)",
                    task.name()
                );
            };
            Measure::ZeroShot {
                task,
                data,
                limit: args.limit,
            }
        }
    };
    if let Some(path) = &args.log_samples {
        // Fails now, not after hours of evaluation.
        check_writable(path, "--log-samples")?;
    }
    let ppl = matches!(task, Measure::Ppl { .. });
    let eval = EvalJob {
        model: args.model.source()?,
        task,
        batch_size: args.batch_size,
        log_samples: args.log_samples,
    };
    let c = args.common;
    let report = dispatch(c.device, c.dtype, eval)?;
    // Perplexity prints its line or, with --json, only the JSON.
    if !(ppl && c.json) {
        print!("{}", report.text);
    }
    if c.json {
        print_json(&report.json);
    }
    Ok(())
}
