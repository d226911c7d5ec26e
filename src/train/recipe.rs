//! The distillation recipe, as torchtune writes one: [`Recipe::setup`] (named steps in
//! dependency order), [`Recipe::train`] (the loop: learning rate, micro-batches, loss step,
//! clip, optimiser step, log, evaluate, checkpoint), [`Recipe::finish`] (final evaluation,
//! RUN_DIR/eval.json, the PEFT adapter). The pruned student is frozen and learns, through fresh
//! LoRA adapters, the teacher's next-token distributions on instruction data. The components
//! are beside it: config, loss, optim (AdamW, schedule, clipping), checkpoint (resume state),
//! metrics (metrics.jsonl and TensorBoard), evaluate (held-out perplexity and MMLU), parallel
//! (the ranks of a data-parallel run: their share of a step, the sum of their gradients).

use super::checkpoint::{self, State};
use super::config::DistillConfig;
use super::evaluate::{Baseline, HeldOut};
use super::hidden::{layer_map, HiddenTerm, MapSource};
use super::metrics::{throughput, Metrics};
use super::optim::{adamw, clip_global_norm, lr_at, Optim};
use super::parallel::{micro_batch_seed, step_seed, sum_over_ranks};
use super::step::StepSettings;
use super::teacher::Teacher;
use super::teacher_cache::{self, TeacherCache};
use crate::data::batch::Batch;
use crate::data::mixture::Mixture;
use crate::device::GpuMemory;
use crate::dist::World;
use crate::eval::mmlu::Report;
use crate::model::adapter::{attach_new, save_adapter};
use crate::model::{CausalLm, Pretrained, Rope};
use crate::util::check::first_difference;
use crate::util::{progress_bar, write_dir_atomically, write_file_atomically};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, Tensor};
use indicatif::ProgressBar;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// GPU memory after the last step, with the peaks sampled over the steps (GPU runs only;
    /// boxed to keep [`Outcome`]'s variants of similar size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<Box<GpuMemory>>,
    /// The share of the positions of the training batches (all ranks') that were padding.
    pub padding_fraction: f64,
    /// Whether the student's layers were recomputed in the backward pass.
    pub activation_checkpointing: bool,
    /// The memory plan's total (GB of 1e9 bytes; see [`super::memory`]), for comparison with
    /// the measured peak.
    pub memory_plan_gb: f64,
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
    /// Recompute the student's layers in the backward pass (`optim.activation_checkpointing`
    /// resolved for the backend).
    pub recompute: bool,
    /// The memory plan's total in bytes, printed before the run.
    pub memory_plan_bytes: u64,
}

pub enum Outcome {
    /// Boxed: the summary is far larger than the other variant.
    Finished(Box<Summary>),
    Interrupted {
        step: usize,
        checkpoint: PathBuf,
    },
}

/// Runs the job; `run.run_dir` exists. Per-step metrics go to RUN_DIR/metrics.jsonl and
/// RUN_DIR/tb, checkpoints to RUN_DIR/checkpoints.
pub fn distill<B: AutodiffBackend>(
    cfg: &DistillConfig,
    run: &Run,
    device: &B::Device,
) -> Result<Outcome> {
    let mut recipe = Recipe::<B>::setup(cfg, run, device)?;
    if let Some(interrupted) = recipe.train()? {
        return Ok(interrupted);
    }
    recipe.finish().map(|s| Outcome::Finished(Box::new(s)))
}

/// A run in progress: what setup built, and where training stands.
struct Recipe<'a, B: AutodiffBackend> {
    cfg: DistillConfig,
    run: &'a Run,
    device: B::Device,
    /// This process among the ranks of a data-parallel run (rank 0 of 1 otherwise).
    world: World,
    teacher: Teacher<B>,
    /// The frozen student's rotary tables, and the same for evaluating on the inner backend.
    rope: Rope<B>,
    eval_rope: Rope<B::InnerBackend>,
    /// The student with its adapters.
    lm: CausalLm<B>,
    optim: Optim<B>,
    data: Mixture,
    held_out: HeldOut,
    metrics: Metrics,
    fingerprint: serde_json::Value,
    baseline: Baseline,
    /// Steps done (the next step's index), training tokens seen, the last step's loss.
    step: usize,
    tokens: usize,
    final_loss: f64,
    step_times: Vec<(usize, f64)>,
    gpu_memory: Option<GpuMemory>,
    /// Whether the student's layers are recomputed in the backward pass (see [`super::step`]).
    recompute: bool,
    /// Padding positions of the steps' batches (all ranks').
    padded: usize,
    saved_at: Option<PathBuf>,
    bar: ProgressBar,
    /// Whether any rank was asked to stop (data-parallel runs: the ranks stop together).
    ranks_stop: bool,
    /// The hidden-state term (`loss.hidden_weight` > 0).
    hidden: Option<HiddenTerm>,
    /// When setup began: a time budget counts from here.
    started: Instant,
    /// `optim.max_time` while max_steps is still to be fixed.
    budget: Option<Duration>,
    /// Seconds of the pruned student's evaluation before training (what the final one costs).
    eval_secs: Option<f64>,
    /// The max_steps the time budget fixed (recorded in checkpoints).
    fixed_steps: Option<usize>,
}

/// Steps run before a time budget's steps are timed (warm-up), and steps timed.
const BUDGET_WARMUP_STEPS: usize = 1;
const BUDGET_TIMED_STEPS: usize = 2;

impl<'a, B: AutodiffBackend> Recipe<'a, B> {
    fn setup(cfg: &DistillConfig, run: &'a Run, device: &B::Device) -> Result<Self> {
        let started = Instant::now();
        let world = crate::dist::world();
        // 1. Models. The teacher runs on the inner backend: no graph, no gradients.
        let teacher = Pretrained::<B::InnerBackend>::load(&run.teacher, device)?;
        let student = Pretrained::<B>::load(&run.student, device)?;
        let (t, s) = (teacher.tokenizer.content()?, student.tokenizer.content()?);
        let differs = first_difference(&t, &s, ("teacher", "student"))
            .map(|d| format!("tokenizer.json {d}"))
            .or_else(|| {
                let (tv, sv) = (teacher.config.vocab_size, student.config.vocab_size);
                (tv != sv).then(|| format!("config.json vocab_size (teacher: {tv}, student: {sv})"))
            });
        if let Some(what) = differs {
            bail!(
                "{} and {}: teacher and student must share a tokenizer and vocabulary; they differ in {what}",
                run.teacher.display(), run.student.display()
            );
        }
        let hidden = hidden_term(cfg, run, &teacher, &student)?;
        // 2. The checkpoint to resume, which must match the config and models.
        let fingerprint = checkpoint::fingerprint(cfg, &run.teacher, &run.student)?;
        let checkpoints = checkpoint::checkpoints_dir(&run.run_dir);
        std::fs::create_dir_all(&checkpoints)
            .with_context(|| format!("{}: cannot create", checkpoints.display()))?;
        let resumed = match &run.resume {
            Some(dir) => Some((
                dir.clone(),
                checkpoint::load_matching(dir, &fingerprint, world.size)?,
            )),
            None => None,
        };
        // The teacher cache, which must match the teacher, the data and its tokenizer.
        let cache = match &cfg.teacher.cache {
            Some(dir) => {
                let tokenizer = run.student.join("tokenizer.json");
                let fingerprint = teacher_cache::fingerprint(cfg, &run.teacher, &tokenizer)?;
                Some(TeacherCache::open(dir, &fingerprint, &cfg.loss)?)
            }
            None => None,
        };
        // 3. Data: depends on the student's tokenizer; epochs turn into steps once it is read.
        let mut data = Mixture::load(&cfg.data, &student.tokenizer)?;
        let mut cfg = cfg.clone();
        cfg.resolve_epochs(world.size, |epochs, rows, accum| {
            data.steps_for(epochs, rows, accum)
        });
        // 4. Adapters and optimiser. The backend's generator is seeded so adapter
        //    initialisation (and, per step, dropout) is reproducible.
        B::seed(device, cfg.data.seed);
        let mut lm = attach_new(student.lm.clone(), &cfg.lora, device);
        let mut optim = adamw::<B>(&cfg.optim);
        // 5. Held-out evaluation, on the student's tokenizer.
        let held_out = HeldOut::load(
            &cfg.output,
            &student.tokenizer,
            student.config.max_length,
            world,
        )?;
        let eval_rope = Rope::<B::InnerBackend>::new(
            student.config.head_dim,
            student.config.rope_theta,
            device,
        );
        // 6. Resume (adapters, optimiser moments, data cursor, metrics rewound), or measure the
        //    teacher and the pruned student before training.
        let mut eval_secs = None;
        let mut fixed_steps = None;
        let (step, tokens, final_loss, baseline, metrics) = match resumed {
            Some((dir, state)) => {
                if let Some(n) = state.max_steps {
                    eprintln!(
                        "max_steps {n}, as the time budget fixed it (recorded in the checkpoint)"
                    );
                    cfg.optim.max_steps = n;
                    fixed_steps = Some(n);
                }
                data.seek(&state.data)
                    .map_err(|e| anyhow::anyhow!("--resume {}: {e}", dir.display()))?;
                optim = optim.load_record(checkpoint::restore(&dir, &state, &mut lm, device)?);
                // Rank 0 alone writes the run's files.
                let metrics = if world.is_root() {
                    Metrics::resume(&run.run_dir, &dir, state.step)?
                } else {
                    Metrics::discard()
                };
                eprintln!("resuming from {} (step {})", dir.display(), state.step);
                (
                    state.step,
                    state.tokens,
                    state.final_loss,
                    state.baseline,
                    metrics,
                )
            }
            None => {
                let ppl_teacher = held_out.ppl(&teacher.lm, &teacher.rope)?;
                let mmlu_teacher = held_out.mmlu(&teacher.lm, &teacher.rope)?;
                let timed = Instant::now();
                let (ppl_student, mmlu_student) = held_out.measure(&lm.valid(), &eval_rope)?;
                eval_secs = Some(timed.elapsed().as_secs_f64());
                let baseline = Baseline {
                    ppl_teacher,
                    ppl_student,
                    mmlu_teacher,
                    mmlu_student,
                };
                let mut metrics = if world.is_root() {
                    Metrics::start(&run.run_dir)?
                } else {
                    Metrics::discard()
                };
                metrics.eval(0, baseline.ppl_student, baseline.mmlu_student.as_ref());
                (0, 0, f64::NAN, baseline, metrics)
            }
        };
        baseline.print();
        // With a cache the teacher's work is done: it was needed for the baseline only.
        let teacher = match cache {
            Some(cache) => Teacher::Cache(cache),
            None => Teacher::Model(Box::new(teacher)),
        };
        // A time budget: max_steps unknown until the first steps are timed.
        let budget = match (cfg.optim.max_time, fixed_steps) {
            (Some(t), None) => {
                cfg.optim.max_steps = usize::MAX;
                Some(t.0)
            }
            _ => None,
        };
        let bar = progress_bar("distill");
        bar.set_length(cfg.optim.max_steps as u64);
        bar.set_position(step as u64);
        Ok(Self {
            run,
            device: device.clone(),
            world,
            teacher,
            rope: student.rope,
            eval_rope,
            lm,
            optim,
            data,
            held_out,
            metrics,
            fingerprint,
            baseline,
            step,
            tokens,
            final_loss,
            step_times: Vec::new(),
            gpu_memory: None,
            recompute: run.recompute,
            padded: 0,
            saved_at: run.resume.clone(),
            bar,
            ranks_stop: false,
            hidden,
            started,
            budget,
            eval_secs,
            fixed_steps,
            cfg,
        })
    }

    /// Trains to `max_steps`; `Some` when SIGINT/SIGTERM stopped it after a checkpoint.
    fn train(&mut self) -> Result<Option<Outcome>> {
        while self.step < self.cfg.optim.max_steps {
            let o = self.cfg.optim.clone();
            let started = Instant::now();
            // Dropout masks depend on the step (and micro-batch) alone, so a resumed run draws
            // the same ones, whichever ranks run it.
            let seed = step_seed(self.cfg.data.seed, self.step);
            let lr = lr_at(&o, self.step);
            // The step's micro-batches in the one order of the data, every rank's included.
            let micro: Vec<Batch<B>> = (0..o.grad_accum * self.world.size)
                .map(|_| self.data.batch(o.batch_size, &self.device))
                .collect();
            self.padded += micro.iter().map(Batch::padded_positions).sum::<usize>();
            let (grads, sums, tokens) = self.accumulate(&micro, seed)?;
            let stop = self.run.stop.load(Ordering::SeqCst);
            let (mut grads, sums, stop) =
                sum_over_ranks(self.world, &self.lm, grads, sums, stop, &self.device)?;
            self.ranks_stop = stop;
            let grad_norm = clip_global_norm(&self.lm, &mut grads, o.grad_clip, &self.device);
            // The step's one read from the device: loss, kd, ce, hidden and the gradient norm.
            let [loss, kd, ce, hidden, grad_norm] = to_host(Tensor::cat(vec![sums, grad_norm], 0))?;
            if !(loss.is_finite() && grad_norm.is_finite()) {
                self.bar.finish_and_clear();
                bail!(self.diverged(loss, grad_norm));
            }
            self.lm = self.optim.step(lr, self.lm.clone(), grads);
            // On a GPU: failures reported become errors here, memory sampled.
            crate::device::step_done()?;
            self.step += 1;
            self.tokens += tokens;
            self.final_loss = loss;
            self.step_times
                .push((tokens, started.elapsed().as_secs_f64()));
            self.fix_steps_if_timed();
            let tps = throughput(&self.step_times);
            self.bar.set_message(format!(
                "loss {loss:.4} kd {kd:.4} ce {ce:.4} {tps:.0} tok/s"
            ));
            self.bar.inc(1);
            let mut scalars = vec![
                ("loss", loss),
                ("kd_loss", kd),
                ("ce_loss", ce),
                ("lr", lr),
                ("grad_norm", grad_norm),
                ("tokens_per_sec", tps),
            ];
            if self.hidden.is_some() {
                scalars.insert(3, ("hidden_loss", hidden));
            }
            self.gpu_memory = crate::device::gpu_memory();
            if let Some(m) = self.gpu_memory {
                scalars.push(("gpu_mem_gb", m.in_use as f64 / 1e9));
                scalars.push(("gpu_mem_peak_gb", m.peak_in_use as f64 / 1e9));
            }
            let eval = self.evaluate_if_due()?;
            let eval = eval.as_ref().map(|(ppl, mmlu)| (*ppl, mmlu.as_ref()));
            self.metrics.step(self.step, &scalars, eval)?;
            if let Some(interrupted) = self.checkpoint_if_due()? {
                return Ok(Some(interrupted));
            }
        }
        Ok(None)
    }

    /// The error of a step whose loss or gradient norm is not finite: nothing of it is written.
    fn diverged(&self, loss: f64, grad_norm: f64) -> String {
        let last = match &self.saved_at {
            Some(dir) => format!("the last checkpoint, {}, is finite", dir.display()),
            None => "no checkpoint was written".into(),
        };
        format!(
            "step {}: loss {loss}, gradient norm {grad_norm}: training diverged and stopped \
             before the optimiser step; {last} (lower optim.lr or optim.grad_clip, then --resume \
             or --force)",
            self.step + 1
        )
    }

    /// This rank's micro-batches' loss steps and backward passes, accumulated: their gradients,
    /// their (loss, kd, ce) and the step's training tokens. Accumulation weighs every counted
    /// token equally: each micro-batch's sums are divided by the whole step's count (all ranks').
    /// Dropout is seeded per micro-batch from the step's `seed`.
    fn accumulate(
        &self,
        micro: &[Batch<B>],
        seed: u64,
    ) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>, usize)> {
        let count: usize = micro.iter().map(|b| b.count).sum();
        let tokens = micro.iter().map(|b| b.tokens).sum();
        let mut acc = GradientsAccumulator::new();
        let mut sums = Tensor::zeros([4], &self.device);
        let mine = self.world.share(micro.len());
        let recompute = self.recompute;
        for (index, batch) in micro.iter().enumerate().take(mine.end).skip(mine.start) {
            let settings = StepSettings {
                loss: &self.cfg.loss,
                hidden: self.hidden.as_ref(),
                count,
                recompute,
                seed: micro_batch_seed(seed, index),
            };
            let step = self
                .teacher
                .micro_step(&self.lm, &self.rope, batch, settings)?;
            sums = sums + step.sums;
            acc.accumulate(&self.lm, step.grads);
        }
        Ok((acc.grads(), sums, tokens))
    }

    /// With a time budget, once its first steps are timed: max_steps becomes the steps that
    /// fit in what is left of it, less the final evaluation (timed before training), the
    /// periodic ones and a 5% margin. Rank 0's count is every rank's.
    fn fix_steps_if_timed(&mut self) {
        let Some(budget) = self.budget else { return };
        if self.step_times.len() < BUDGET_WARMUP_STEPS + BUDGET_TIMED_STEPS {
            return;
        }
        let timed = &self.step_times[BUDGET_WARMUP_STEPS..];
        let step_secs = timed.iter().map(|(_, s)| s).sum::<f64>() / timed.len() as f64;
        // Resumed before the steps were fixed: the evaluation was not timed; a tenth of the
        // budget stands for it.
        let eval_secs = self.eval_secs.unwrap_or(budget.as_secs_f64() / 10.0);
        let every = self.cfg.output.eval_every;
        let per_step = step_secs
            + if every > 0 {
                eval_secs / every as f64
            } else {
                0.0
            };
        let left = budget.as_secs_f64() - self.started.elapsed().as_secs_f64() - eval_secs;
        let more = (left * 0.95 / per_step).max(0.0).floor() as usize;
        let mut steps = [(self.step + more) as f64];
        if !self.world.is_root() {
            steps[0] = 0.0;
        }
        self.world.sum(&mut steps);
        let steps = steps[0] as usize;
        self.bar.suspend(|| {
            eprintln!(
                "time budget {:.0}s: {step_secs:.2}s a step, evaluation {eval_secs:.1}s: max_steps {steps}",
                budget.as_secs_f64()
            )
        });
        self.cfg.optim.max_steps = steps;
        self.fixed_steps = Some(steps);
        self.budget = None;
        self.bar.set_length(steps as u64);
    }

    /// The periodic held-out evaluation, every `eval_every` steps before the last.
    fn evaluate_if_due(&mut self) -> Result<Option<(f64, Option<Report>)>> {
        let (every, done) = (self.cfg.output.eval_every, self.step);
        if every == 0 || done % every != 0 || done >= self.cfg.optim.max_steps {
            return Ok(None);
        }
        let (ppl, mmlu) = self.held_out.measure(&self.lm.valid(), &self.eval_rope)?;
        self.bar
            .println(format!("step {done}: held-out ppl {ppl:.3}"));
        if let Some(m) = &mmlu {
            self.bar.println(format!("step {done}: MMLU {:.4}", m.acc));
        }
        Ok(Some((ppl, mmlu)))
    }

    /// A checkpoint when due, at the end, and when asked to stop; after a stop, the outcome.
    fn checkpoint_if_due(&mut self) -> Result<Option<Outcome>> {
        let stop = if self.world.is_distributed() {
            self.ranks_stop
        } else {
            self.run.stop.load(Ordering::SeqCst)
        };
        let (every, done, max) = (
            self.cfg.checkpoint.every,
            self.step,
            self.cfg.optim.max_steps,
        );
        if !(stop || done == max || (every > 0 && done % every == 0)) {
            return Ok(None);
        }
        self.metrics.flush()?;
        let state = State {
            step: done,
            tokens: self.tokens,
            final_loss: self.final_loss,
            data: self.data.cursor(),
            fingerprint: self.fingerprint.clone(),
            baseline: self.baseline.clone(),
            world_size: self.world.size,
            max_steps: self.fixed_steps,
        };
        let dir = if self.world.is_root() {
            checkpoint::save(
                &self.run.run_dir,
                &state,
                &self.lm,
                &self.optim,
                &self.cfg.lora,
                &self.run.student,
                self.cfg.checkpoint.keep,
            )?
        } else {
            checkpoint::step_dir(&self.run.run_dir, done)
        };
        self.saved_at = Some(dir.clone());
        if stop && done < max {
            self.bar.finish_and_clear();
            return Ok(Some(Outcome::Interrupted {
                step: done,
                checkpoint: dir,
            }));
        }
        Ok(None)
    }

    /// The final evaluation (RUN_DIR/eval.json) and the adapter (RUN_DIR/adapter).
    fn finish(mut self) -> Result<Summary> {
        self.bar.finish_and_clear();
        let (cfg, run_dir, max) = (&self.cfg, &self.run.run_dir, self.cfg.optim.max_steps);
        let (ppl_recovered, mmlu_recovered) =
            self.held_out.measure(&self.lm.valid(), &self.eval_rope)?;
        self.metrics
            .eval(max, ppl_recovered, mmlu_recovered.as_ref());
        self.metrics.flush()?;
        let Baseline {
            ppl_teacher,
            ppl_student,
            mmlu_teacher,
            mmlu_student,
        } = self.baseline;
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
            "step": max,
            "ppl": {"text": cfg.output.eval_text, "tokens": cfg.output.eval_tokens,
                    "teacher": ppl_teacher, "pruned": ppl_student, "recovered": ppl_recovered},
            "mmlu": mmlu_recovered.as_ref().map(|_| serde_json::json!({
                "limit_per_subject": cfg.output.mmlu_limit, "shots": cfg.output.mmlu_shots,
                "teacher": mmlu_teacher, "pruned": mmlu_student, "recovered": mmlu_recovered,
            })),
        });
        let adapter = run_dir.join("adapter");
        if self.world.is_root() {
            let text = serde_json::to_string_pretty(&eval)? + "\n";
            write_file_atomically(&run_dir.join("eval.json"), text.as_bytes())?;
            write_dir_atomically(&adapter, |tmp| {
                save_adapter(&self.lm, &cfg.lora, &self.run.student, tmp)
            })?;
        }
        Ok(Summary {
            student: self.run.student.clone(),
            teacher: self.run.teacher.clone(),
            adapter,
            checkpoint: self.saved_at,
            steps: max,
            final_loss: self.final_loss,
            ppl_teacher,
            ppl_student,
            ppl_recovered,
            mmlu_teacher: mmlu_acc(&mmlu_teacher),
            mmlu_pruned: mmlu_acc(&mmlu_student),
            mmlu_recovered: mmlu_acc(&mmlu_recovered),
            tokens_per_sec: throughput(&self.step_times),
            padding_fraction: {
                let tokens: usize = self.step_times.iter().map(|(t, _)| t).sum();
                self.padded as f64 / (tokens + self.padded).max(1) as f64
            },
            step_times: self.step_times,
            gpu_memory: self.gpu_memory.map(Box::new),
            activation_checkpointing: self.recompute,
            memory_plan_gb: self.run.memory_plan_bytes as f64 / 1e9,
        })
    }
}

/// The hidden-state term of the run (`loss.hidden_weight` > 0): its layer map from the config,
/// the student's prune report or proportional, printed.
fn hidden_term<B: AutodiffBackend>(
    cfg: &DistillConfig,
    run: &Run,
    teacher: &Pretrained<B::InnerBackend>,
    student: &Pretrained<B>,
) -> Result<Option<HiddenTerm>> {
    let l = &cfg.loss;
    if l.hidden_weight == 0.0 {
        return Ok(None);
    }
    let (th, sh) = (teacher.lm.hidden_size(), student.lm.hidden_size());
    if th != sh {
        bail!(
            "loss.hidden_weight: the hidden-state term compares hidden states of one size; the teacher's are {th}, the student's {sh}"
        );
    }
    let (map, source) = layer_map(
        &run.student,
        student.lm.num_layers(),
        teacher.lm.num_layers(),
        l.hidden_layer_map.as_deref(),
        "the config",
    )?;
    let term = HiddenTerm::new(&map, l.hidden_layers, l.hidden_weight, l.hidden_distance);
    let source = match source {
        MapSource::Config => "loss.hidden_layer_map".to_string(),
        MapSource::PruneReport => run
            .student
            .join(crate::prune::job::REPORT)
            .display()
            .to_string(),
        MapSource::Proportional => "proportional: the student has no prune report".into(),
    };
    let pairs: Vec<String> = term
        .pairs
        .iter()
        .map(|(s, t)| format!("{s}->{t}"))
        .collect();
    eprintln!(
        "hidden-state term (weight {}, {:?}, {:?}): student->teacher layer {} ({source})",
        l.hidden_weight,
        l.hidden_layers,
        l.hidden_distance,
        pairs.join(" ")
    );
    if term.pairs.is_empty() {
        bail!(
            "loss.hidden_layers = {:?}: no student layer of the map {map:?} qualifies",
            l.hidden_layers
        );
    }
    Ok(Some(term))
}

/// A small device tensor's values, read in one transfer.
fn to_host<B: burn::tensor::backend::Backend, const N: usize>(t: Tensor<B, 1>) -> Result<[f64; N]> {
    let values: Vec<f64> = t.into_data().iter::<f64>().collect();
    values
        .try_into()
        .map_err(|v: Vec<f64>| anyhow!("{} values read from the device, {N} expected", v.len()))
}
