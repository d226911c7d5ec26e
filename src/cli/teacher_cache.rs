//! `laco-train teacher-cache`: run the teacher once over a distill config's training data and
//! store its top-k next-token log-probabilities for `distill` with `[teacher] cache = "DIR"`.

use super::distill::{job, DistillArgs};
use super::{print_json, Common};
use crate::device::{dispatch, DeviceChoice, Precision};
use crate::train::teacher_cache::{CacheDtype, CacheJob};
use anyhow::{bail, Result};
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
/// Disk: k x (4 + 4) bytes per counted position in f32 (512 B at k = 64), k x (4 + 2) in f16
/// or bf16.
///
/// Example: laco-train teacher-cache --config configs/smollm2-135m.toml --top-k 64 --out runs/smollm2-cache
#[derive(Args, Debug)]
pub struct TeacherCacheArgs {
    /// Distill config (see configs/); default: the embedded configs/tiny.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `base` (the config's unpruned base model) or a model directory.
    #[arg(long, default_value = "base")]
    pub teacher: String,
    /// Tokens kept per position.
    #[arg(long, default_value_t = 64)]
    pub top_k: usize,
    /// Storage dtype of the log-probabilities (token ids are 32-bit).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: CacheDtype,
    /// At most this many sequences: the first the run draws.
    #[arg(long)]
    pub max_sequences: Option<usize>,
    /// Optimiser steps whose data to cover (overrides optim.max_steps; optim.epochs wins).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Parquet files (override data.files, with equal weights).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Cache directory; default: the config's teacher.cache, else RUN_DIR/teacher-cache.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to run the teacher: cpu, cuda or cuda:N (it computes in f32 on cpu, bf16 on cuda).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DeviceChoice))]
    pub device: DeviceChoice,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TeacherCacheArgs) -> Result<()> {
    if args.max_sequences == Some(0) {
        bail!("--max-sequences must be at least 1");
    }
    // The config, data and teacher as `distill` reads them.
    let distill = job(DistillArgs {
        config: args.config.clone(),
        teacher: args.teacher.clone(),
        student: None,
        out: None,
        max_steps: args.max_steps,
        max_time: None,
        data: args.data.clone(),
        resume: None,
        save_every: None,
        force: false,
        common: Common {
            device: args.device,
            dtype: Precision::Auto,
            json: args.json,
        },
    })?;
    let out = args
        .out
        .or_else(|| distill.cfg.teacher.cache.clone())
        .unwrap_or_else(|| distill.run_dir.join("teacher-cache"));
    let job = CacheJob {
        cfg: distill.cfg,
        teacher: distill.teacher,
        out,
        top_k: args.top_k,
        dtype: args.dtype,
        max_sequences: args.max_sequences,
    };
    let s = dispatch(args.device, Precision::Auto, job)?;
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
    if args.json {
        print_json(&serde_json::to_value(&s)?);
    }
    Ok(())
}
