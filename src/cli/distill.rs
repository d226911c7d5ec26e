//! `laco-train distill`: recover a LaCo-pruned student by distillation from its teacher into
//! LoRA adapters.

use super::{at_least_one, print_json, Common};
use crate::device::dispatch;
use crate::hf::{hub, ModelConfig};
use crate::train::checkpoint::{fingerprint, load_matching, locate};
use crate::train::config::{DistillConfig, MaxTime};
use crate::train::job::{DistillJob, STUDENT};
use crate::train::recipe::Outcome;
use crate::util::fs::absolute;
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

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
    /// TOML config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `base` (the config's unpruned base model), a model directory or a Hugging Face id in
    /// the local cache (`ORG/NAME[@revision]`).
    #[arg(long, default_value = "base")]
    pub teacher: String,
    /// The pruned student (a `prune` output, or a Hugging Face id in the local cache); default:
    /// prune the base into RUN_DIR/student.
    #[arg(long)]
    pub student: Option<PathBuf>,
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
    /// Parquet files or Hugging Face dataset ids in the local cache (override data.files, with
    /// equal weights).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
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
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: DistillArgs) -> Result<()> {
    let (device, dtype, json) = (args.common.device, args.common.dtype, args.common.json);
    let force = args.force;
    let job = job(args)?;
    job.prepare(force)?;
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

/// The job the arguments describe, checked as far as possible before any model loads.
pub(super) fn job(args: DistillArgs) -> Result<DistillJob> {
    let mut cfg = DistillConfig::load(args.config.as_deref())?;
    if let Some(n) = args.max_steps {
        cfg.optim.max_steps = n;
        cfg.optim.max_time = None;
    }
    if let Some(t) = args.max_time {
        cfg.optim.max_time = Some(t);
    }
    let origin = args
        .config
        .as_ref()
        .map_or("configs/tiny.toml (embedded)".into(), |p| {
            p.display().to_string()
        });
    cfg.resolve_hub_ids(&origin)?;
    if !args.data.is_empty() {
        cfg.data.files = args.data.clone();
        cfg.data.weights.clear();
        cfg.data.resolve(Path::new("."), "--data")?;
    }
    if let Some(out) = &args.out {
        cfg.output.run_dir = absolute(out)?;
    }
    if let Some(n) = args.save_every {
        cfg.checkpoint.every = n;
    }
    cfg.validate("command line")?;
    let model = |spec: &Path, what: &str| -> Result<PathBuf> {
        absolute(&hub::model_dir(spec, spec, None, what)?)
    };
    let teacher = if args.teacher == "base" {
        cfg.model.base.clone()
    } else {
        model(Path::new(&args.teacher), "--teacher")?
    };
    let student = args
        .student
        .as_deref()
        .map(|s| model(s, "--student"))
        .transpose()?;
    for (what, dir) in [("model.base", &cfg.model.base), ("teacher", &teacher)] {
        if !dir.join("config.json").exists() {
            bail!("{}: not a model directory ({what})", dir.display());
        }
    }
    if student.is_none() {
        // The base is pruned with these settings: check them against its layers now.
        let layers = ModelConfig::from_dir(&cfg.model.base)?.num_hidden_layers;
        cfg.laco.validate(layers, &format!("{origin}: laco"))?;
    }
    let run_dir = cfg.output.run_dir.clone();
    // A resume that cannot continue fails here, before any model is loaded or pruned.
    let resume = match &args.resume {
        Some(explicit) => {
            let dir = locate(&run_dir, explicit.as_deref())?;
            let student = student.clone().unwrap_or_else(|| run_dir.join(STUDENT));
            let world_size = crate::dist::world().size;
            load_matching(&dir, &fingerprint(&cfg, &teacher, &student)?, world_size)?;
            Some(dir)
        }
        None => None,
    };
    Ok(DistillJob {
        cfg,
        teacher,
        student,
        run_dir,
        resume,
    })
}
