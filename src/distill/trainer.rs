//! The distillation loop: the pruned student (frozen, plus fresh LoRA adapters) learns the
//! teacher's next-token distributions on instruction data. Reads top to bottom: setup, then
//! per step: learning rate, micro-batches (both forwards, chunked loss, backward), global-norm
//! clip, AdamW step, logging (TensorBoard under RUN_DIR/tb and metrics.jsonl), periodic held-out
//! perplexity and MMLU; finally RUN_DIR/eval.json and the PEFT adapter.

use super::checkpoint::{self, Optim, State};
use super::evaluate::{Baseline, HeldOut};
use super::{
    config::DistillConfig,
    events,
    loss::{chunked_kd, KdLoss},
};
use crate::data::batch::Batch;
use crate::data::mixture::Mixture;
use crate::eval::mmlu::Report;
use crate::model::lora::{attach_new, save_adapter};
use crate::model::{
    chunk::{predicting_rows, rows_per_chunk},
    CausalLm, Pretrained, Rope,
};
use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Tensor};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tensorboard_rs::summary_writer::SummaryWriter;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub student: PathBuf,
    pub teacher: PathBuf,
    pub adapter: PathBuf,
    /// The final checkpoint (RUN_DIR/checkpoints/step-N).
    pub checkpoint: Option<PathBuf>,
    pub steps: usize,
    pub final_loss: f64,
    pub ppl_teacher: f64,
    pub ppl_student: f64,
    pub ppl_recovered: f64,
    pub mmlu_teacher: Option<f64>,
    pub mmlu_pruned: Option<f64>,
    pub mmlu_recovered: Option<f64>,
    /// Training tokens per second of this process's steps (evaluations and checkpoints excluded).
    pub tokens_per_sec: f64,
    /// (training tokens, seconds) of each step this process ran, for throughput after a warm-up.
    #[serde(skip)]
    pub step_times: Vec<(usize, f64)>,
}

/// Where and how a run goes, beyond its config.
pub struct Run {
    pub teacher: PathBuf,
    pub student: PathBuf,
    pub run_dir: PathBuf,
    /// The checkpoint to continue from (`--resume`).
    pub resume: Option<PathBuf>,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, stop.
    pub stop: Arc<AtomicBool>,
}

pub enum Outcome {
    Finished(Summary),
    Interrupted { step: usize, checkpoint: PathBuf },
}

/// Runs the job; `run.run_dir` exists. Per-step metrics go to RUN_DIR/metrics.jsonl and
/// RUN_DIR/tb, checkpoints to RUN_DIR/checkpoints.
pub fn distill<B: AutodiffBackend>(
    cfg: &DistillConfig,
    run: &Run,
    device: &B::Device,
) -> Result<Outcome> {
    let (teacher_dir, student_dir, run_dir) = (&run.teacher, &run.student, &run.run_dir);
    // Setup, in dependency order. The teacher runs on the inner backend: no graph, no gradients.
    let teacher = Pretrained::<B::InnerBackend>::load(teacher_dir, device)?;
    let student = Pretrained::<B>::load(student_dir, device)?;
    if teacher.config.vocab_size != student.config.vocab_size
        || teacher.tokenizer.vocab_size() != student.tokenizer.vocab_size()
    {
        bail!(
            "{} and {}: teacher and student must share a tokenizer and vocabulary (vocab_size {} vs {})",
            teacher_dir.display(), student_dir.display(), teacher.config.vocab_size, student.config.vocab_size
        );
    }
    let fingerprint = checkpoint::fingerprint(cfg, teacher_dir, student_dir)?;
    let checkpoints = checkpoint::checkpoints_dir(run_dir);
    std::fs::create_dir_all(&checkpoints)
        .with_context(|| format!("{}: cannot create", checkpoints.display()))?;
    let resumed = match &run.resume {
        Some(dir) => Some((dir.clone(), checkpoint::load_matching(dir, &fingerprint)?)),
        None => None,
    };
    // The data depends on the student's tokenizer; the optimiser only sees the adapters. The
    // backend's generator is seeded so adapter initialisation and dropout are reproducible.
    let seed = cfg.data.seed;
    let mut data = Mixture::load(cfg, &student.tokenizer)?;
    let mut resolved = cfg.clone();
    resolved.resolve_epochs(data.sequences());
    let cfg = &resolved;
    B::seed(device, seed);
    let mut lm = attach_new(student.lm.clone(), &cfg.lora, device);
    let o = &cfg.optim;
    let mut optim: Optim<B> = AdamWConfig::new()
        .with_beta_1(o.betas.0 as f32)
        .with_beta_2(o.betas.1 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .init();
    let held_out = HeldOut::load(&cfg.output, &student.tokenizer, student.config.max_length)?;
    let eval_rope =
        Rope::<B::InnerBackend>::new(student.config.head_dim, student.config.rope_theta, device);
    let tb_dir = run_dir.join("tb");
    let metrics_path = run_dir.join("metrics.jsonl");
    let (first_step, mut tokens, mut final_loss, baseline) = match resumed {
        Some((dir, state)) => {
            data.seek(&state.data)
                .map_err(|e| anyhow::anyhow!("--resume {}: {e}", dir.display()))?;
            let records = checkpoint::restore(&dir, &state, &mut lm, device)?;
            optim = optim.load_record(records);
            checkpoint::restore_metrics(&dir, run_dir)?;
            events::truncate_after(&tb_dir, state.step)?;
            eprintln!("resuming from {} (step {})", dir.display(), state.step);
            (state.step, state.tokens, state.final_loss, state.baseline)
        }
        None => {
            let baseline = Baseline {
                ppl_teacher: held_out.ppl(&teacher.lm, &teacher.rope)?,
                ppl_student: held_out.ppl(&lm.valid(), &eval_rope)?,
                mmlu_teacher: held_out.mmlu(&teacher.lm, &teacher.rope)?,
                mmlu_student: held_out.mmlu(&lm.valid(), &eval_rope)?,
            };
            std::fs::File::create(&metrics_path)
                .with_context(|| format!("{}: cannot create", metrics_path.display()))?;
            (0, 0, f64::NAN, baseline)
        }
    };
    baseline.print();

    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
    let mut tb = SummaryWriter::new(&tb_dir);
    if first_step == 0 {
        tb.add_scalar("eval/ppl", baseline.ppl_student as f32, 0);
        if let Some(m) = &baseline.mmlu_student {
            tb.add_scalar("eval/mmlu_acc", m.acc as f32, 0);
        }
    }
    let bar = crate::cli::progress_bar("distill");
    bar.set_length(o.max_steps as u64);
    bar.set_position(first_step as u64);
    let mut step_times = Vec::new();
    let mut saved_at = run.resume.clone();
    let mut tps = f64::NAN;
    for step in first_step..o.max_steps {
        let step_started = std::time::Instant::now();
        let tokens_before = tokens;
        // Dropout masks depend on the step alone, so a resumed run draws the same ones.
        B::seed(
            device,
            seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let lr = cfg.lr_at(step);
        let micro: Vec<Batch<B>> = (0..o.grad_accum)
            .map(|_| data.batch(o.batch_size, device))
            .collect();
        // Accumulation weighs every counted token equally: each micro-batch's sums are divided
        // by the whole step's count.
        let count: usize = micro.iter().map(|b| b.count).sum();
        let mut acc = GradientsAccumulator::new();
        let (mut loss_sum, mut kd_sum, mut ce_sum) = (0.0, 0.0, 0.0);
        for batch in &micro {
            let (loss, kd, ce) = loss_step(&lm, &student.rope, &teacher, batch, &cfg.loss, count);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            kd_sum += kd;
            ce_sum += ce;
            let grads = GradientsParams::from_grads(loss.backward(), &lm);
            acc.accumulate(&lm, grads);
            tokens += batch.tokens;
        }
        let mut grads = acc.grads();
        let grad_norm = clip_global_norm(&mut lm, &mut grads, o.grad_clip);
        lm = optim.step(lr, lm, grads);

        final_loss = loss_sum;
        step_times.push((tokens - tokens_before, step_started.elapsed().as_secs_f64()));
        tps = throughput(&step_times);
        bar.set_message(format!(
            "loss {loss_sum:.4} kd {kd_sum:.4} ce {ce_sum:.4} {tps:.0} tok/s"
        ));
        bar.inc(1);
        // One list feeds both logs: metrics.jsonl keys, TensorBoard tags train/<key>.
        let scalars = [
            ("loss", loss_sum),
            ("kd_loss", kd_sum),
            ("ce_loss", ce_sum),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("tokens_per_sec", tps),
        ];
        let mut record = serde_json::json!({ "step": step + 1 });
        for (key, value) in scalars {
            record[key] = value.into();
            tb.add_scalar(&format!("train/{key}"), value as f32, step + 1);
        }
        let done = step + 1;
        if cfg.output.eval_every > 0 && done % cfg.output.eval_every == 0 && done < o.max_steps {
            let (ppl, mmlu) = held_out.measure(&lm.valid(), &eval_rope, &mut tb, done)?;
            bar.println(format!("step {done}: held-out ppl {ppl:.3}"));
            record["eval_ppl"] = ppl.into();
            if let Some(m) = mmlu {
                bar.println(format!("step {done}: MMLU {:.4}", m.acc));
                record["eval_mmlu_acc"] = m.acc.into();
            }
        }
        writeln!(metrics, "{record}")?;
        // Checkpoint when due, at the end, and when asked to stop.
        let stop = run.stop.load(Ordering::SeqCst);
        let every = cfg.checkpoint.every;
        if stop || done == o.max_steps || (every > 0 && done % every == 0) {
            tb.flush();
            metrics.flush()?;
            let state = State {
                step: done,
                tokens,
                final_loss,
                data: data.cursor(),
                fingerprint: fingerprint.clone(),
                baseline: baseline.clone(),
            };
            let dir = checkpoint::save(
                run_dir,
                &state,
                &mut lm,
                &optim,
                &cfg.lora,
                student_dir,
                cfg.checkpoint.keep,
            )?;
            saved_at = Some(dir.clone());
            if stop && done < o.max_steps {
                bar.finish_and_clear();
                return Ok(Outcome::Interrupted {
                    step: done,
                    checkpoint: dir,
                });
            }
        }
    }
    bar.finish_and_clear();
    let (ppl_recovered, mmlu_recovered) =
        held_out.measure(&lm.valid(), &eval_rope, &mut tb, o.max_steps)?;
    tb.flush();
    let Baseline {
        ppl_teacher,
        ppl_student,
        mmlu_teacher,
        mmlu_student,
    } = baseline;
    eprintln!("held-out ppl: teacher {ppl_teacher:.3}, pruned {ppl_student:.3}, recovered {ppl_recovered:.3}");
    let mmlu_acc = |m: &Option<Report>| m.as_ref().map(|m| m.acc);
    if let Some(m) = &mmlu_recovered {
        eprintln!(
            "MMLU: teacher {:.4}, pruned {:.4}, recovered {:.4}",
            mmlu_acc(&mmlu_teacher).unwrap_or(f64::NAN),
            mmlu_acc(&mmlu_student).unwrap_or(f64::NAN),
            m.acc
        );
    }
    let eval = serde_json::json!({
        "step": o.max_steps,
        "ppl": {"text": cfg.output.eval_text, "tokens": cfg.output.eval_tokens,
                "teacher": ppl_teacher, "pruned": ppl_student, "recovered": ppl_recovered},
        "mmlu": mmlu_recovered.as_ref().map(|_| serde_json::json!({
            "limit_per_subject": cfg.output.mmlu_limit, "shots": cfg.output.mmlu_shots,
            "teacher": mmlu_teacher, "pruned": mmlu_student, "recovered": mmlu_recovered,
        })),
    });
    std::fs::write(
        run_dir.join("eval.json"),
        serde_json::to_string_pretty(&eval)? + "\n",
    )?;

    let adapter = run_dir.join("adapter");
    crate::cli::write_dir_atomically(&adapter, |tmp| {
        save_adapter(&mut lm, &cfg.lora, student_dir, tmp)
    })?;
    Ok(Outcome::Finished(Summary {
        student: student_dir.to_path_buf(),
        teacher: teacher_dir.to_path_buf(),
        adapter,
        checkpoint: saved_at,
        steps: o.max_steps,
        final_loss,
        ppl_teacher,
        ppl_student,
        ppl_recovered,
        mmlu_teacher: mmlu_acc(&mmlu_teacher),
        mmlu_pruned: mmlu_acc(&mmlu_student),
        mmlu_recovered: mmlu_acc(&mmlu_recovered),
        tokens_per_sec: tps,
        step_times,
    }))
}

/// Tokens per second over (tokens, seconds) steps.
pub fn throughput(steps: &[(usize, f64)]) -> f64 {
    let tokens: usize = steps.iter().map(|s| s.0).sum();
    let secs: f64 = steps.iter().map(|s| s.1).sum();
    tokens as f64 / secs
}

/// Both forwards and the chunked loss of one micro-batch: `(loss to backpropagate, kd, ce)`,
/// the loss already divided by the step's `count`.
pub fn loss_step<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    teacher: &Pretrained<B::InnerBackend>,
    batch: &Batch<B>,
    loss: &KdLoss,
    count: usize,
) -> (Tensor<B, 1>, f64, f64) {
    // Only the counted positions reach the lm_head and the loss.
    let hidden =
        predicting_rows(lm.hidden(batch.ids.clone(), rope, batch.padding.as_ref(), None, None))
            .select(0, batch.rows.clone());
    let t_padding = batch.padding.clone().map(|p| p.inner());
    let t_hidden = teacher.lm.hidden(
        batch.ids.clone().inner(),
        &teacher.rope,
        t_padding.as_ref(),
        None,
        None,
    );
    let t_hidden = predicting_rows(t_hidden).select(0, batch.rows.clone().inner());
    let chunk = rows_per_chunk(teacher.config.vocab_size);
    let sums = chunked_kd(chunk, batch.targets.clone(), loss, |r| {
        let student = lm.logits_2d(hidden.clone().slice(r.clone()));
        let teacher = Tensor::from_inner(teacher.lm.logits_2d(t_hidden.clone().slice(r)));
        (student, teacher)
    });
    let (loss, kd, ce) = sums.means(count, loss);
    (
        loss,
        kd.into_scalar().elem::<f64>(),
        ce.into_scalar().elem::<f64>(),
    )
}

/// Scales all adapter gradients so their global L2 norm is at most `max` (0: no clipping);
/// returns the norm before clipping.
fn clip_global_norm<B: AutodiffBackend>(
    lm: &mut CausalLm<B>,
    grads: &mut GradientsParams,
    max: f64,
) -> f64 {
    let ids: Vec<_> = lm
        .linears_mut()
        .into_iter()
        .filter_map(|(_, l)| l.lora.as_ref().map(|a| [a.lora_a.id, a.lora_b.id]))
        .flatten()
        .collect();
    let mut sq = 0.0f64;
    for id in &ids {
        if let Some(g) = grads.get::<B::InnerBackend, 2>(*id) {
            sq += g.powi_scalar(2).sum().into_scalar().elem::<f64>();
        }
    }
    let norm = sq.sqrt();
    if max > 0.0 && norm > max {
        let scale = max / (norm + 1e-6);
        for id in &ids {
            if let Some(g) = grads.remove::<B::InnerBackend, 2>(*id) {
                grads.register(*id, g.mul_scalar(scale));
            }
        }
    }
    norm
}
