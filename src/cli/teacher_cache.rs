//! `laco-train teacher-cache`: run the teacher once over a distill config's training data and
//! store its top-k next-token log-probabilities for `distill` with `[teacher] cache = "DIR"`.

use super::distill::ConfigArgs;
use super::{at_least_one, print_json};
use crate::device::dispatch;
use crate::train::job::{DistillJob, Overrides};
use crate::train::teacher_cache::CacheDtype;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Store the teacher's top-k next-token log-probabilities over a distill config's data.
///
/// Runs the teacher (the config's base model, or --teacher) once over the sequences the run
/// draws, in the order it draws them (all epochs' distinct sequences; the first --max-sequences
/// of them when given), in the same batches (packed or padded), and stores, for every position
/// whose label counts, the k most likely next tokens and their log-probabilities in sharded
/// safetensors with an index.json. `distill` with `[teacher] cache = "DIR"` (and
/// loss.divergence = "top_k_forward_kl") then skips the teacher's forward pass. The cache
/// records a fingerprint of the teacher, tokenizer, data files, prompt templates, max_seq_len,
/// packing and seed; a run that differs is refused naming the field. An interrupted run keeps
/// its finished shards: the same command continues it.
///
/// Disk: k x (4 + 4) bytes per counted position with --save-dtype f32 (512 B at k = 64),
/// k x (4 + 2) in f16 or bf16.
///
/// Example: laco-train teacher-cache --config configs/smollm2-135m.toml --top-k 64 --out runs/smollm2-cache
#[derive(Args, Debug)]
pub struct TeacherCacheArgs {
    #[command(flatten)]
    pub setup: ConfigArgs,
    /// Tokens kept per position.
    #[arg(long, default_value_t = 64)]
    pub top_k: usize,
    /// Storage dtype of the log-probabilities (token ids are 32-bit); --dtype is the teacher's
    /// compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub save_dtype: CacheDtype,
    /// At most this many sequences: the first the run draws.
    #[arg(long, value_parser = at_least_one())]
    pub max_sequences: Option<usize>,
    /// Optimiser steps whose data to cover (overrides optim.max_steps; optim.epochs wins).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Cache directory; default: the config's teacher.cache, else RUN_DIR/teacher-cache.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: TeacherCacheArgs) -> Result<()> {
    // The config, data and teacher as `distill` reads them.
    let overrides = Overrides {
        max_steps: args.max_steps,
        ..args.setup.overrides()
    };
    let distill = DistillJob::new(args.setup.config.as_deref(), &overrides)?;
    let job = distill.teacher_cache(args.out, args.top_k, args.save_dtype, args.max_sequences);
    let c = &args.setup.common;
    let s = dispatch(c.device, c.dtype, job)?;
    eprintln!(
        "{}: {} of {} planned sequences ({}), {} positions, top {} in {:?}: {:.1} MB, {:.0} bytes per position; {} computed now at {:.0} tokens/s",
        s.out.display(),
        s.sequences,
        s.planned,
        if s.complete { "complete" } else { "incomplete" },
        s.positions,
        s.top_k,
        s.dtype,
        s.bytes as f64 / 1e6,
        s.bytes_per_position,
        s.computed,
        s.tokens_per_sec
    );
    if c.json {
        print_json(&serde_json::to_value(&s)?);
    }
    Ok(())
}
