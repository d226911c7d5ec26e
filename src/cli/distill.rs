//! `laco-train distill`: recover a LaCo-pruned student by distillation from its teacher into
//! LoRA adapters.

use super::{
    print_json,
    prune::{calibration_lines, prune_into},
    Common,
};
use crate::device::{dispatch, Job};
use crate::distill::{config::DistillConfig, trainer::distill};
use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
use std::path::PathBuf;

/// Train LoRA adapters on a pruned student so that it matches the teacher's next-token
/// distributions (KD mixed with cross-entropy) on instruction data.
///
/// Without --config, the embedded configs/tiny.toml runs on the bundled tiny Qwen3. Without
/// --student, the base model of the config is pruned with its [laco] settings into
/// RUN_DIR/student (reused on the next run). The adapter is written in PEFT's format to
/// RUN_DIR/adapter; per-step metrics to RUN_DIR/metrics.jsonl.
#[derive(Args, Debug)]
pub struct DistillArgs {
    /// TOML config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `base` (the config's unpruned base model) or a model directory.
    #[arg(long, default_value = "base")]
    pub teacher: String,
    /// The pruned student (a `prune` output); default: prune the base into RUN_DIR/student.
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Run directory (overrides output.run_dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimiser steps (overrides optim.max_steps).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Parquet files (override data.files, with equal weights).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

struct DistillJob {
    cfg: DistillConfig,
    teacher: PathBuf,
    student: Option<PathBuf>,
    run_dir: PathBuf,
    json: bool,
}

impl Job for DistillJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        std::fs::create_dir_all(&self.run_dir)?;
        let student = match self.student {
            Some(dir) => dir,
            None => {
                let dir = self.run_dir.join("student");
                if dir.join("config.json").exists() {
                    eprintln!("reusing the pruned student in {}", dir.display());
                } else {
                    let calibration = calibration_lines(&self.cfg.laco)?;
                    prune_into::<B>(
                        &self.cfg.model.base,
                        &dir,
                        &self.cfg.laco,
                        &calibration,
                        8,
                        &device,
                    )?;
                }
                dir
            }
        };
        let summary =
            distill::<Autodiff<B>>(&self.cfg, &self.teacher, &student, &self.run_dir, &device)?;
        let value = serde_json::to_value(&summary)?;
        std::fs::write(
            self.run_dir.join("summary.json"),
            serde_json::to_string_pretty(&value)? + "\n",
        )?;
        if self.json {
            print_json(&value);
        }
        Ok(())
    }
}

pub fn run(args: DistillArgs) -> Result<()> {
    let mut cfg = DistillConfig::load(args.config.as_deref())?;
    if let Some(n) = args.max_steps {
        cfg.optim.max_steps = n;
    }
    if !args.data.is_empty() {
        cfg.data.files = args.data.clone();
        cfg.data.weights.clear();
    }
    if let Some(out) = &args.out {
        cfg.output.run_dir = out.clone();
    }
    cfg.validate("command line")?;
    let teacher = if args.teacher == "base" {
        cfg.model.base.clone()
    } else {
        PathBuf::from(&args.teacher)
    };
    for (what, dir) in [("teacher", &teacher), ("base model", &cfg.model.base)] {
        if !dir.join("config.json").exists() {
            bail!("{}: not a model directory ({what})", dir.display());
        }
    }
    let run_dir = cfg.output.run_dir.clone();
    let job = DistillJob {
        cfg,
        teacher,
        student: args.student,
        run_dir,
        json: args.common.json,
    };
    dispatch(args.common.device, args.common.dtype, job)
}
