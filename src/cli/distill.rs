//! `laco-train distill`: recover a LaCo-pruned student by distillation from its teacher into
//! LoRA adapters.

use super::{at_least_one, print_json, Common};
use crate::device::dispatch;
use crate::train::config::MaxTime;
use crate::train::job::{DistillJob, Overrides};
use crate::train::recipe::Outcome;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Train LoRA adapters on a pruned student so that it matches the teacher's next-token
/// distributions (KD mixed with cross-entropy) on instruction data.
///
/// Without --config, the embedded configs/tiny.toml runs on the bundled tiny Qwen3. Without
/// --student, the base model of the config is pruned with its [laco] settings into
/// RUN_DIR/student (reused on the next run). The adapter is written in PEFT's format to
/// RUN_DIR/adapter; per-step metrics to RUN_DIR/metrics.jsonl and RUN_DIR/tb (TensorBoard);
/// checkpoints to RUN_DIR/checkpoints (every checkpoint.every steps, at the end, and on
/// SIGINT/SIGTERM, after which the run exits 0 and --resume continues it exactly).
#[derive(Args, Debug)]
pub struct DistillArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Run directory (overrides output.run_dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimiser steps (overrides optim.max_steps and optim.max_time).
    #[arg(long, value_parser = at_least_one())]
    pub max_steps: Option<usize>,
    /// A time budget (`90s`, `15m`, `1.5h`; overrides optim.max_time and max_steps): the run
    /// times its first steps and fixes max_steps to those that fit, the final evaluation and
    /// adapter included.
    #[arg(long, value_name = "DURATION", conflicts_with = "max_steps")]
    pub max_time: Option<MaxTime>,
    /// Continue from the newest complete checkpoint in RUN_DIR, or from the checkpoint
    /// directory given. The config must match the checkpoint's (max_steps, eval and checkpoint
    /// settings may change).
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    pub resume: Option<Option<PathBuf>>,
    /// Steps between checkpoints (overrides checkpoint.every; 0: only at the end).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Replace a run already in RUN_DIR (atomically; a pruned student that matches this run's
    /// base model and [laco] settings is kept).
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
}

/// A distill config and the teacher and data that replace its own: the flags `distill`, `bench`
/// and `teacher-cache` share.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// TOML config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `base` (the config's unpruned base model), a model directory or a Hugging Face id in
    /// the local cache (`ORG/NAME[@revision]`).
    #[arg(long, default_value = "base")]
    pub teacher: String,
    /// Parquet files or Hugging Face dataset ids in the local cache (override data.files, with
    /// equal weights).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

impl ConfigArgs {
    /// The teacher and data as overrides of the config.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            teacher: (self.teacher != "base").then(|| PathBuf::from(&self.teacher)),
            data: self.data.clone(),
            ..Overrides::default()
        }
    }
}

/// [`ConfigArgs`] and the student: the flags `distill` and `bench` share.
#[derive(Args, Debug)]
pub struct JobArgs {
    #[command(flatten)]
    pub setup: ConfigArgs,
    /// The pruned student (a `prune` output, or a Hugging Face id in the local cache); default:
    /// prune the config's base model into RUN_DIR/student.
    #[arg(long)]
    pub student: Option<PathBuf>,
}

impl JobArgs {
    /// Teacher, student and data as overrides of the config.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            student: self.student.clone(),
            ..self.setup.overrides()
        }
    }
}

pub fn run(args: DistillArgs) -> Result<()> {
    let c = &args.job.setup.common;
    let (device, dtype, json) = (c.device, c.dtype, c.json);
    let overrides = Overrides {
        resume: args.resume,
        run_dir: args.out,
        max_steps: args.max_steps,
        max_time: args.max_time,
        save_every: args.save_every,
        ..args.job.overrides()
    };
    let job = DistillJob::new(args.job.setup.config.as_deref(), &overrides)?;
    let _lock = job.prepare(args.force)?;
    match dispatch(device, dtype, job)? {
        Outcome::Finished(summary) => {
            if json {
                print_json(&serde_json::to_value(&summary)?);
            }
        }
        Outcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "interrupted after step {step}; checkpoint {}. Resume with the same command plus --resume",
                checkpoint.display()
            );
            if json {
                print_json(&serde_json::json!({
                    "interrupted": true, "step": step, "checkpoint": checkpoint,
                }));
            }
        }
    }
    Ok(())
}
