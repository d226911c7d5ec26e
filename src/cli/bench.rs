//! `laco-train bench`: distillation speed and memory. Runs `--steps` steps of a config's
//! distillation job (no periodic evaluation, no MMLU, one checkpoint at the end) in a scratch
//! run directory and reports training tokens/s after `--warmup` steps (and over all steps) and
//! the process's peak resident memory.

use super::distill::{job, DistillArgs};
use super::{print_json, Common};
use crate::device::dispatch;
use crate::train::optim::throughput;
use crate::train::recipe::Outcome;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// Measure distillation steps: tokens/s (tokens of the training batches over the time spent in
/// the steps after --warmup) and peak resident memory (VmHWM, the whole process: model loading,
/// and pruning when --student is not given, included).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Distill config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The pruned student; default: prune the config's base model first.
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Steps to run.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Leading steps left out of tokens/s (the first steps also fault in the process's memory);
    /// the figure over all steps is printed too.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Training data (Parquet) instead of the config's files.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run directory; default: a temporary one, removed afterwards.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.steps <= args.warmup {
        bail!(
            "--steps ({}) must be more than --warmup ({})",
            args.steps,
            args.warmup
        );
    }
    // Under mpirun or srun, every rank uses rank 0's scratch directory (where rank 0 prunes).
    let world = crate::dist::world();
    let id = world.broadcast(std::process::id().into());
    let scratch = std::env::temp_dir().join(format!("laco-train-bench-{id}"));
    let out = args.out.clone().unwrap_or_else(|| scratch.clone());
    let distill = DistillArgs {
        config: args.config.clone(),
        teacher: "base".into(),
        student: args.student.clone(),
        out: Some(out),
        max_steps: Some(args.steps),
        data: args.data.clone(),
        resume: None,
        save_every: Some(0),
        common: args.common.clone(),
    };
    let mut job = job(distill)?;
    let o = &mut job.cfg.output;
    (o.eval_every, o.mmlu_limit, o.eval_tokens) = (0, 0, 256);
    let batch = (job.cfg.optim.batch_size, job.cfg.optim.grad_accum);
    let seq = job.cfg.data.max_seq_len;
    let started = std::time::Instant::now();
    let outcome = dispatch(args.common.device, args.common.dtype, job);
    if world.is_root() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let Outcome::Finished(summary) = outcome? else {
        bail!("the benchmark was interrupted");
    };
    let peak_mb = peak_rss_mb();
    let steady = throughput(&summary.step_times[args.warmup..]);
    eprintln!(
        "{} steps (batch {} x accumulation {}, max_seq_len {seq}): {steady:.0} tokens/s after {} \
         warm-up steps ({:.0} over all); peak RSS {peak_mb:.0} MB; {:.1}s wall in all",
        args.steps,
        batch.0,
        batch.1,
        args.warmup,
        summary.tokens_per_sec,
        started.elapsed().as_secs_f64()
    );
    if args.common.json {
        print_json(&serde_json::json!({
            "bench": "distill", "steps": args.steps, "warmup": args.warmup,
            "batch_size": batch.0, "grad_accum": batch.1, "max_seq_len": seq,
            "tokens_per_sec": steady, "tokens_per_sec_all_steps": summary.tokens_per_sec,
            "peak_rss_mb": peak_mb,
        }));
    }
    Ok(())
}

/// Peak resident set size of this process in MB (VmHWM), NaN where /proc is unavailable.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
