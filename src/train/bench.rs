//! `laco-train bench`'s measurement: a config's distill job run for a few steps (no periodic
//! evaluation, no MMLU, one checkpoint at the end) in a scratch run directory, timed after a
//! warm-up, with the process's peak resident memory and, on a GPU, its memory pools.

use super::job::{DistillJob, Overrides};
use super::loss::Divergence;
use super::metrics::throughput;
use super::recipe::Outcome;
use crate::device::{dispatch, DeviceChoice, GpuMemory, Precision};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How to measure.
pub struct Bench {
    /// Steps to run.
    pub steps: usize,
    /// Leading steps left out of tokens/s.
    pub warmup: usize,
    /// Run burn's generic tensor ops instead of the CPU kernels.
    pub generic_ops: bool,
}

/// What a bench measured (`bench --json` prints it).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub steps: usize,
    pub warmup: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub packing: bool,
    pub divergence: Divergence,
    pub teacher_cache: Option<PathBuf>,
    pub final_loss: f64,
    /// Training tokens/s over the steps after the warm-up.
    pub tokens_per_sec: f64,
    pub tokens_per_sec_all_steps: f64,
    pub seconds_per_step: f64,
    /// The share of the batches' positions that were padding.
    pub padding_fraction: f64,
    /// VmHWM of the whole process (model loading and pruning included); NaN without /proc.
    pub peak_rss_mb: f64,
    // GPU memory (cubecl's pools, sampled after each step's forward passes and at its end):
    // in use by tensors, and reserved from the driver; null on the CPU.
    pub gpu_mem_gb: Option<f64>,
    pub gpu_mem_peak_gb: Option<f64>,
    pub gpu_mem_reserved_peak_gb: Option<f64>,
    /// burn's generic ops instead of the CPU kernels.
    pub generic_ops: bool,
    /// Whether the student's layers were recomputed in the backward pass.
    pub activation_checkpointing: bool,
    /// The memory plan's total (GB), printed before the run: to compare with the peak RSS on
    /// the CPU, with `gpu_mem_peak_gb` on a GPU.
    pub memory_plan_gb: f64,
    /// Wall time of the whole measurement.
    #[serde(skip)]
    pub wall_seconds: f64,
}

impl Bench {
    /// Runs the distill job of `config` with `overrides` for `steps` steps on `device`, in
    /// `overrides.run_dir` or a scratch directory removed afterwards.
    pub fn run(
        &self,
        config: Option<&Path>,
        overrides: Overrides,
        device: DeviceChoice,
        dtype: Precision,
    ) -> Result<BenchReport> {
        if self.steps <= self.warmup {
            bail!(
                "--steps ({}) must be more than --warmup ({})",
                self.steps,
                self.warmup
            );
        }
        // Under mpirun or srun, every rank uses rank 0's scratch directory (where rank 0 prunes).
        let world = crate::dist::world();
        let id = world.broadcast(std::process::id().into());
        let scratch = std::env::temp_dir().join(format!("laco-train-bench-{id}"));
        let overrides = Overrides {
            run_dir: Some(overrides.run_dir.clone().unwrap_or_else(|| scratch.clone())),
            max_steps: Some(self.steps),
            save_every: Some(0),
            eval_every: Some(0),
            mmlu_limit: Some(0),
            eval_tokens: Some(256),
            ..overrides
        };
        let job = DistillJob::new(config, &overrides)?;
        let _lock = job.prepare(false)?;
        let cfg = &job.cfg;
        let (packing, divergence) = (cfg.data.packing, cfg.loss.divergence);
        let teacher_cache = cfg.teacher.cache.clone();
        let (batch_size, grad_accum) = (cfg.optim.batch_size, cfg.optim.grad_accum);
        let max_seq_len = cfg.data.max_seq_len;
        let started = std::time::Instant::now();
        let outcome = if self.generic_ops {
            crate::kernels::with_generic_ops(|| dispatch(device, dtype, job))
        } else {
            dispatch(device, dtype, job)
        };
        if world.is_root() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let Outcome::Finished(summary) = outcome? else {
            bail!("the benchmark was interrupted");
        };
        let timed = &summary.step_times[self.warmup..];
        let gb = |f: fn(&GpuMemory) -> u64| summary.gpu_memory.as_ref().map(|m| f(m) as f64 / 1e9);
        Ok(BenchReport {
            steps: self.steps,
            warmup: self.warmup,
            batch_size,
            grad_accum,
            max_seq_len,
            packing,
            divergence,
            teacher_cache,
            final_loss: summary.final_loss,
            tokens_per_sec: throughput(timed),
            tokens_per_sec_all_steps: summary.tokens_per_sec,
            seconds_per_step: timed.iter().map(|(_, s)| s).sum::<f64>() / timed.len() as f64,
            padding_fraction: summary.padding_fraction,
            peak_rss_mb: peak_rss_mb(),
            gpu_mem_gb: gb(|m| m.in_use),
            gpu_mem_peak_gb: gb(|m| m.peak_in_use),
            gpu_mem_reserved_peak_gb: gb(|m| m.peak_reserved),
            generic_ops: self.generic_ops,
            activation_checkpointing: summary.activation_checkpointing,
            memory_plan_gb: summary.memory_plan_gb,
            wall_seconds: started.elapsed().as_secs_f64(),
        })
    }
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
