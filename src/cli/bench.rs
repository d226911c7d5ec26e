//! `laco-train bench`: distillation speed and memory. Runs `--steps` steps of a config's
//! distillation job (no periodic evaluation, no MMLU, one checkpoint at the end) in a scratch
//! run directory and reports training tokens/s after `--warmup` steps (and over all steps) and
//! the process's peak resident memory.

use super::distill::JobArgs;
use super::{at_least_one, print_json};
use crate::train::bench::Bench;
use crate::train::job::Overrides;
use crate::train::loss::Divergence;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Measure distillation steps: tokens/s (tokens of the training batches, padding not counted,
/// over the time spent in the steps after --warmup), the share of the batches' positions that
/// were padding, and peak resident memory (VmHWM, the whole process: model loading, and pruning
/// when --student is not given, included).
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Steps to run.
    #[arg(long, default_value_t = 20, value_parser = at_least_one())]
    pub steps: usize,
    /// Leading steps left out of tokens/s (the first steps also fault in the process's memory);
    /// the figure over all steps is printed too.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
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
}

pub fn run(args: BenchArgs) -> Result<()> {
    let bench = Bench {
        steps: args.steps,
        warmup: args.warmup,
        generic_ops: args.generic_ops,
    };
    let overrides = Overrides {
        run_dir: args.out,
        packing: args.packing,
        divergence: args.divergence,
        teacher_cache: args.teacher_cache,
        activation_checkpointing: args.activation_checkpointing,
        ..args.job.overrides()
    };
    let setup = &args.job.setup;
    let c = &setup.common;
    let r = bench.run(setup.config.as_deref(), overrides, c.device, c.dtype)?;
    let rows = if r.packing {
        "packed rows"
    } else {
        "sequences"
    };
    let teacher = match &r.teacher_cache {
        Some(c) => format!("teacher cache {}", c.display()),
        None => "teacher online".into(),
    };
    if let (Some(now), Some(peak), Some(reserved)) =
        (r.gpu_mem_gb, r.gpu_mem_peak_gb, r.gpu_mem_reserved_peak_gb)
    {
        eprintln!(
            "GPU memory: {now:.2} GB in use after the last step, peak {peak:.2} GB in use, {reserved:.2} GB reserved"
        );
    }
    eprintln!(
        "{} steps ({} {rows} x accumulation {}, max_seq_len {}, {:?}, {teacher}): \
         {:.0} tokens/s after {} warm-up steps ({:.0} over all); padding {:.1}% of \
         positions; peak RSS {:.0} MB; {:.1}s wall in all{}",
        r.steps,
        r.batch_size,
        r.grad_accum,
        r.max_seq_len,
        r.divergence,
        r.tokens_per_sec,
        r.warmup,
        r.tokens_per_sec_all_steps,
        100.0 * r.padding_fraction,
        r.peak_rss_mb,
        r.wall_seconds,
        if r.activation_checkpointing {
            "; layers recomputed"
        } else {
            ""
        }
    );
    if c.json {
        let mut v = serde_json::to_value(&r)?;
        v["bench"] = "distill".into();
        print_json(&v);
    }
    Ok(())
}
