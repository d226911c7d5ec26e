//! `laco-train bench`: distillation speed and memory. Runs `--steps` steps of a config's
//! distillation job (no periodic evaluation, no MMLU, one checkpoint at the end) in a scratch
//! run directory and reports training tokens/s after `--warmup` steps (and over all steps) and
//! the process's peak resident memory.

use super::distill::{job, DistillArgs};
use super::{at_least_one, print_json, Common};
use crate::device::dispatch;
use crate::train::loss::Divergence;
use crate::train::optim::throughput;
use crate::train::recipe::Outcome;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// Measure distillation steps: tokens/s (tokens of the training batches, padding not counted,
/// over the time spent in the steps after --warmup), the share of the batches' positions that
/// were padding, and peak resident memory (VmHWM, the whole process: model loading, and pruning
/// when --student is not given, included).
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Distill config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `base` (the config's unpruned base model), a model directory or a Hugging Face id in
    /// the local cache.
    #[arg(long, default_value = "base")]
    pub teacher: String,
    /// The pruned student; default: prune the config's base model first.
    #[arg(long)]
    pub student: Option<PathBuf>,
    /// Steps to run.
    #[arg(long, default_value_t = 20, value_parser = at_least_one())]
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
    /// Run burn's generic tensor ops instead of the CPU kernels: the code the GPU backends run,
    /// to measure its memory (e.g. with and without --activation-checkpointing) on the CPU.
    #[arg(long)]
    pub generic_ops: bool,
    /// Recompute the student's layers in the backward pass, true or false (overrides
    /// optim.activation_checkpointing; default: on for the generic path, off for the CPU
    /// kernels).
    #[arg(long)]
    pub activation_checkpointing: Option<bool>,
    /// Pack sequences into rows of max_seq_len (overrides data.packing).
    #[arg(long)]
    pub packing: Option<bool>,
    /// The KD divergence (overrides loss.divergence).
    #[arg(long, value_enum)]
    pub divergence: Option<Divergence>,
    /// Train from this teacher cache (overrides teacher.cache; needs top_k_forward_kl).
    #[arg(long)]
    pub teacher_cache: Option<PathBuf>,
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
        teacher: args.teacher.clone(),
        student: args.student.clone(),
        out: Some(out),
        max_steps: Some(args.steps),
        max_time: None,
        data: args.data.clone(),
        resume: None,
        save_every: Some(0),
        force: false,
        common: args.common.clone(),
    };
    let mut job = job(distill)?;
    job.prepare(false)?;
    let o = &mut job.cfg.output;
    (o.eval_every, o.mmlu_limit, o.eval_tokens) = (0, 0, 256);
    if let Some(p) = args.packing {
        job.cfg.data.packing = p;
    }
    if let Some(a) = args.activation_checkpointing {
        job.cfg.optim.activation_checkpointing = Some(a);
    }
    if let Some(d) = args.divergence {
        job.cfg.loss.divergence = d;
    }
    if let Some(c) = &args.teacher_cache {
        job.cfg.teacher.cache = Some(c.clone());
    }
    let (packing, divergence) = (job.cfg.data.packing, job.cfg.loss.divergence);
    let cache = job.cfg.teacher.cache.clone();
    let batch = (job.cfg.optim.batch_size, job.cfg.optim.grad_accum);
    let seq = job.cfg.data.max_seq_len;
    let started = std::time::Instant::now();
    let (device, dtype) = (args.common.device, args.common.dtype);
    let outcome = if args.generic_ops {
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
    let peak_mb = peak_rss_mb();
    let timed = &summary.step_times[args.warmup..];
    let steady = throughput(timed);
    let per_step = timed.iter().map(|(_, s)| s).sum::<f64>() / timed.len() as f64;
    let padding = summary.padding_fraction;
    let rows = if packing { "packed rows" } else { "sequences" };
    let teacher = match &cache {
        Some(c) => format!("teacher cache {}", c.display()),
        None => "teacher online".into(),
    };
    let gpu = summary.gpu_memory.as_deref().copied();
    if let Some(m) = gpu {
        eprintln!(
            "GPU memory: {:.2} GB in use after the last step, peak {:.2} GB in use, {:.2} GB reserved",
            m.in_use as f64 / 1e9,
            m.peak_in_use as f64 / 1e9,
            m.peak_reserved as f64 / 1e9
        );
    }
    eprintln!(
        "{} steps ({} {rows} x accumulation {}, max_seq_len {seq}, {divergence:?}, {teacher}): \
         {steady:.0} tokens/s after {} warm-up steps ({:.0} over all); padding {:.1}% of \
         positions; peak RSS {peak_mb:.0} MB; {:.1}s wall in all{}",
        args.steps,
        batch.0,
        batch.1,
        args.warmup,
        summary.tokens_per_sec,
        100.0 * padding,
        started.elapsed().as_secs_f64(),
        if summary.activation_checkpointing {
            "; layers recomputed"
        } else {
            ""
        }
    );
    if args.common.json {
        print_json(&serde_json::json!({
            "bench": "distill", "steps": args.steps, "warmup": args.warmup,
            "batch_size": batch.0, "grad_accum": batch.1, "max_seq_len": seq,
            "packing": packing, "divergence": divergence, "teacher_cache": cache,
            "final_loss": summary.final_loss, "tokens_per_sec": steady,
            "tokens_per_sec_all_steps": summary.tokens_per_sec,
            "seconds_per_step": per_step, "padding_fraction": padding, "peak_rss_mb": peak_mb,
            "generic_ops": args.generic_ops,
            "activation_checkpointing": summary.activation_checkpointing,
            // GPU memory (cubecl's pools, sampled after each step's forward passes and at its
            // end): in use by tensors, and reserved from the driver; null on the CPU.
            "gpu_mem_gb": gpu.map(|m| m.in_use as f64 / 1e9),
            "gpu_mem_peak_gb": gpu.map(|m| m.peak_in_use as f64 / 1e9),
            "gpu_mem_reserved_peak_gb": gpu.map(|m| m.peak_reserved as f64 / 1e9),
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
