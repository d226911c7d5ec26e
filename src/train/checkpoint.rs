//! Checkpoints of a distill run, under RUN_DIR/checkpoints/step-NNNNNNN: the adapter in PEFT's
//! format, AdamW's moments per adapter tensor (optimizer.safetensors), and state.json (global
//! step, which also fixes the learning-rate schedule and the per-step random seed; tokens seen;
//! the data cursor; the settings a resume must share; the baseline evaluations; the metrics so
//! far in metrics.jsonl). Each is written to a temporary directory, fsynced and renamed; then
//! `checkpoints/latest` is replaced atomically to name it. A crash at any moment leaves the
//! previous checkpoint whole and named by `latest`.

use super::config::DistillConfig;
use super::evaluate::Baseline;
use super::metrics::METRICS;
use super::optim::Optim;
use crate::data::mixture::Cursor;
use crate::hf::peft::{self, Part};
use crate::hf::weights::{write_safetensors, Weight, WeightReader};
use crate::model::adapter::{save_adapter, LoraSettings};
use crate::model::CausalLm;
use crate::util::check::first_difference;
use crate::util::fs::remove_dead_temporaries;
use crate::util::{write_dir_atomically, write_file_atomically};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Param, ParamId};
use burn::optim::{record::AdaptorRecord, AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

type OptimRecord<B> = <Optim<B> as Optimizer<CausalLm<B>, B>>::Record;

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const LATEST: &str = "latest";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub tokens: usize,
    pub final_loss: f64,
    pub data: Cursor,
    /// What a resumed run must share with this one (see [`fingerprint`]).
    pub fingerprint: serde_json::Value,
    /// Teacher and pruned-student evaluations made before step 1.
    pub baseline: Baseline,
    /// Processes of the run (data-parallel ranks, each taking optim.grad_accum micro-batches of
    /// every step); 1 in checkpoints written before there were several.
    #[serde(default = "one")]
    pub world_size: usize,
    /// The steps that optim.max_time fixed (absent without a time budget, or before the run
    /// fixed them): a resumed run keeps them, so its learning-rate schedule stays the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<usize>,
}

fn one() -> usize {
    1
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes the checkpoint of `state.step`, points `latest` at it and keeps the newest `keep`.
pub fn save<B: AutodiffBackend>(
    run_dir: &Path,
    state: &State,
    lm: &CausalLm<B>,
    optim: &Optim<B>,
    lora: &LoraSettings,
    student: &Path,
    keep: usize,
) -> Result<PathBuf> {
    let dir = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = step_name(state.step);
    let target = dir.join(&name);
    let records = optim.to_record();
    write_dir_atomically(&target, |tmp| {
        let adapter = tmp.join("adapter");
        std::fs::create_dir(&adapter)?;
        save_adapter(lm, lora, student, &adapter)?;
        let mut moments = Vec::new();
        for (name, a, b) in adapter_params(lm) {
            for (part, id) in [(Part::A, a), (Part::B, b)] {
                let Some(record) = records.get(&id) else {
                    continue;
                };
                let s: AdamWState<B::InnerBackend, 2> = record.clone().into_state();
                let key = peft::key(&name, part);
                let m = |t| Weight::Matrix(t);
                moments.push((format!("{key}.exp_avg"), m(s.momentum.moment_1)));
                moments.push((format!("{key}.exp_avg_sq"), m(s.momentum.moment_2)));
            }
        }
        write_safetensors(&moments, safetensors::Dtype::F32, &tmp.join(OPTIMIZER))?;
        let metrics = run_dir.join(METRICS);
        if metrics.exists() {
            std::fs::copy(&metrics, tmp.join(METRICS))?;
        }
        std::fs::write(tmp.join(STATE), serde_json::to_string_pretty(state)? + "\n")?;
        Ok(())
    })
    .with_context(|| format!("{}: cannot write the checkpoint", target.display()))?;
    write_file_atomically(&dir.join(LATEST), format!("{name}\n").as_bytes())?;
    remove_old(&dir, keep.max(1), &name)?;
    Ok(target)
}

/// The directory of step `step`'s checkpoint (which [`save`] writes).
pub fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run_dir).join(step_name(step))
}

fn step_name(step: usize) -> String {
    format!("step-{step:07}")
}

/// (module name, lora_A id, lora_B id) of every adapted projection, in model order.
fn adapter_params<B: AutodiffBackend>(lm: &CausalLm<B>) -> Vec<(String, ParamId, ParamId)> {
    lm.projections()
        .into_iter()
        .filter_map(|(name, l)| {
            l.lora
                .as_ref()
                .map(|a| (name.clone(), a.lora_a.id, a.lora_b.id))
        })
        .collect()
}

/// Removes all but the newest `keep` step directories (never `current`), and the temporary
/// directories that interrupted writes by processes no longer running left (never those of a
/// writer still at work).
fn remove_old(dir: &Path, keep: usize, current: &str) -> Result<()> {
    remove_dead_temporaries(dir, |name| name.starts_with("step-"))?;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut steps: Vec<String> = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for name in steps.into_iter().take(excess) {
        if name != current {
            let _ = std::fs::remove_dir_all(dir.join(name));
        }
    }
    Ok(())
}

/// The checkpoint `--resume` continues from: `explicit`, or the one `latest` names in RUN_DIR.
pub fn locate(run_dir: &Path, explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => {
            let ckpts = checkpoints_dir(run_dir);
            let pointer = ckpts.join(LATEST);
            let name = std::fs::read_to_string(&pointer).map_err(|_| {
                anyhow!(
                    "{}: no checkpoint to resume from (run without --resume to start)",
                    ckpts.display()
                )
            })?;
            ckpts.join(name.trim())
        }
    };
    if !dir.join(STATE).is_file() {
        bail!("{}: not a complete checkpoint (no {STATE})", dir.display());
    }
    Ok(dir)
}

/// What a resumed run must share with the checkpoint's: teacher, student, model, LaCo, data,
/// LoRA, loss and optimiser settings (max_steps or epochs, eval and checkpoint settings may
/// change).
pub fn fingerprint(
    cfg: &DistillConfig,
    teacher: &Path,
    student: &Path,
) -> Result<serde_json::Value> {
    let mut optim = serde_json::to_value(&cfg.optim)?;
    optim["max_steps"] = serde_json::Value::Null;
    optim["epochs"] = serde_json::Value::Null;
    if let Some(o) = optim.as_object_mut() {
        o.remove("activation_checkpointing");
        o.remove("max_time");
    }
    Ok(serde_json::json!({
        "teacher": teacher, "student": student, "model": cfg.model, "laco": cfg.laco,
        "data": cfg.data, "lora": cfg.lora, "loss": cfg.loss, "optim": optim,
    }))
}

/// The checkpoint's state, if its fingerprint equals `fingerprint` (of a run of `world_size`
/// processes); else an error naming the first differing setting. Another world size may
/// continue the run when the global batch stays the same (world size x optim.grad_accum).
pub fn load_matching(
    dir: &Path,
    fingerprint: &serde_json::Value,
    world_size: usize,
) -> Result<State> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let state: State = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: not a checkpoint state ({e}); damaged, or written by another version? resume from another checkpoint",
            path.display()
        )
    })?;
    let mut fingerprint = fingerprint.clone();
    if state.world_size != world_size {
        same_global_batch(dir, &state, &fingerprint, world_size)?;
        fingerprint["optim"]["grad_accum"] = state.fingerprint["optim"]["grad_accum"].clone();
    }
    if let Some(field) = first_difference(&state.fingerprint, &fingerprint, ("checkpoint", "now")) {
        bail!(
            "--resume {}: the config differs from the checkpoint's in {field}",
            dir.display()
        );
    }
    Ok(state)
}

/// Refuses a resume by another number of processes that changes the sequences of a step.
fn same_global_batch(
    dir: &Path,
    state: &State,
    fingerprint: &serde_json::Value,
    world_size: usize,
) -> Result<()> {
    let per_rank = |f: &serde_json::Value| {
        let n = |k: &str| f["optim"][k].as_u64().unwrap_or(0) as usize;
        (n("batch_size"), n("grad_accum"))
    };
    let processes = |n: usize| match n {
        1 => "1 process".to_string(),
        n => format!("{n} processes"),
    };
    let describe = |ranks: usize, (batch, accum): (usize, usize)| {
        format!(
            "{} x optim.grad_accum {accum} x optim.batch_size {batch} = {} sequences",
            processes(ranks),
            ranks * accum * batch
        )
    };
    let (was, now) = (per_rank(&state.fingerprint), per_rank(fingerprint));
    let (global_was, global_now) = (state.world_size * was.0 * was.1, world_size * now.0 * now.1);
    if global_was == global_now {
        return Ok(());
    }
    let keep = if now.0 > 0 && global_was % (world_size * now.0) == 0 {
        format!(
            "; optim.grad_accum = {} keeps it with {}",
            global_was / (world_size * now.0),
            processes(world_size)
        )
    } else {
        String::new()
    };
    bail!(
        "--resume {}: the checkpoint's step was {} (global batch), this run's would be {}{keep}",
        dir.display(),
        describe(state.world_size, was),
        describe(world_size, now)
    )
}

/// Puts the checkpoint's adapter weights into `lm` (whose adapters were just attached with the
/// same settings) and returns the optimizer record for them.
pub fn restore<B: AutodiffBackend>(
    dir: &Path,
    state: &State,
    lm: &mut CausalLm<B>,
    device: &B::Device,
) -> Result<OptimRecord<B>> {
    let weights = WeightReader::open_file(&dir.join("adapter").join(peft::ADAPTER_WEIGHTS))?;
    let moments = WeightReader::open_file(&dir.join(OPTIMIZER))?;
    let mut records = OptimRecord::<B>::default();
    for (name, l) in lm.projections_mut() {
        let Some(lora) = l.lora.as_mut() else {
            continue;
        };
        for (part, param) in [(Part::A, &mut lora.lora_a), (Part::B, &mut lora.lora_b)] {
            let key = peft::key(&name, part);
            let shape = param.dims();
            let value: Tensor<B::InnerBackend, 2> = weights.tensor_f32(&key, shape, device)?;
            *param = Param::initialized(param.id, Tensor::from_inner(value).require_grad());
            if moments.contains(&format!("{key}.exp_avg")) {
                let m1 = moments.tensor_f32(&format!("{key}.exp_avg"), shape, device)?;
                let m2 = moments.tensor_f32(&format!("{key}.exp_avg_sq"), shape, device)?;
                // One AdamW step per training step: its bias-correction count is the step.
                let momentum = AdaptiveMomentumState::new(state.step, m1, m2);
                records.insert(param.id, AdaptorRecord::from_state(AdamWState { momentum }));
            }
        }
    }
    Ok(records)
}
