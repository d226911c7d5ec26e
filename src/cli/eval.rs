//! `laco-train eval`: perplexity on a text file.

use super::{print_json, progress_bar, Common, ModelArgs};
use crate::device::{dispatch, Job};
use crate::eval::ppl::perplexity;
use anyhow::{bail, Result};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Task {
    /// Perplexity of --text in non-overlapping windows.
    Ppl,
}

/// Evaluate a model. --task ppl: the first --max-tokens tokens of --text (no BOS added), cut into
/// non-overlapping windows of --window tokens; each window predicts its last window-1 tokens;
/// ppl = exp(mean NLL).
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
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Use only the first N tokens of the file (ppl); default: all.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub common: Common,
}

impl Job for EvalArgs {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let pre = self.model.load::<B>(&device)?;
        let path = self.text.expect("checked in run");
        let text = crate::data::read_text(&path)?;
        let mut ids = pre.tokenizer.encode(&text)?;
        if let Some(n) = self.max_tokens {
            ids.truncate(n);
        }
        let bar = progress_bar("ppl");
        let started = std::time::Instant::now();
        let r = perplexity(
            &pre.lm,
            &pre.rope,
            &ids,
            self.window,
            self.batch_size.max(1),
            &bar,
        )?;
        bar.finish_and_clear();
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
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.task {
        Task::Ppl if args.text.is_none() => bail!("--task ppl needs --text FILE"),
        Task::Ppl => {}
    }
    let common = args.common.clone();
    dispatch(common.device, common.dtype, args)
}
