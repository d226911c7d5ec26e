//! The distillation loop: the pruned student (frozen, plus fresh LoRA adapters) learns the
//! teacher's next-token distributions on instruction data. Reads top to bottom: setup, then
//! per step: learning rate, micro-batches (both forwards, chunked loss, backward), global-norm
//! clip, AdamW step, logging (TensorBoard under RUN_DIR/tb and metrics.jsonl), periodic held-out
//! perplexity and MMLU; finally RUN_DIR/eval.json and the PEFT adapter.

use super::{config::DistillConfig, evaluate::HeldOut, loss::chunked_kd};
use crate::data::batch::{tokenize, Batch, Sequence};
use crate::data::instruct::read_examples;
use crate::eval::mmlu::Report;
use crate::model::lora::{attach_new, save_adapter};
use crate::model::{
    chunk::{predicting_rows, rows_per_chunk},
    CausalLm, Pretrained, Rope,
};
use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{backend::AutodiffBackend, ElementConversion, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub student: PathBuf,
    pub teacher: PathBuf,
    pub adapter: PathBuf,
    pub steps: usize,
    pub final_loss: f64,
    pub ppl_teacher: f64,
    pub ppl_student: f64,
    pub ppl_recovered: f64,
    pub mmlu_teacher: Option<f64>,
    pub mmlu_pruned: Option<f64>,
    pub mmlu_recovered: Option<f64>,
    pub tokens_per_sec: f64,
}

/// Runs the job; `run_dir` exists. Per-step metrics go to `run_dir/metrics.jsonl`.
pub fn distill<B: AutodiffBackend>(
    cfg: &DistillConfig,
    teacher_dir: &Path,
    student_dir: &Path,
    run_dir: &Path,
    device: &B::Device,
) -> Result<Summary> {
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
    // The data depends on the student's tokenizer; the optimiser only sees the adapters.
    let mut data = Mixture::load(cfg, &student.tokenizer)?;
    let mut lm = attach_new(student.lm.clone(), &cfg.lora, device);
    let o = &cfg.optim;
    let mut optim = AdamWConfig::new()
        .with_beta_1(o.betas.0 as f32)
        .with_beta_2(o.betas.1 as f32)
        .with_epsilon(o.eps as f32)
        .with_weight_decay(o.weight_decay as f32)
        .init();
    let held_out = HeldOut::load(&cfg.output, &student.tokenizer, student.config.max_length)?;
    let eval_rope =
        Rope::<B::InnerBackend>::new(student.config.head_dim, student.config.rope_theta, device);
    let ppl_teacher = held_out.ppl(&teacher.lm, &teacher.rope)?;
    let ppl_student = held_out.ppl(&lm.valid(), &eval_rope)?;
    eprintln!("held-out ppl: teacher {ppl_teacher:.3}, pruned student {ppl_student:.3}");
    let mmlu_teacher = held_out.mmlu(&teacher.lm, &teacher.rope)?;
    let mmlu_student = held_out.mmlu(&lm.valid(), &eval_rope)?;
    if let (Some(t), Some(s)) = (&mmlu_teacher, &mmlu_student) {
        eprintln!(
            "MMLU ({} questions): teacher {:.4}, pruned student {:.4}",
            t.questions, t.acc, s.acc
        );
    }

    let mut metrics = std::fs::File::create(run_dir.join("metrics.jsonl"))?;
    let mut tb = tensorboard_rs::summary_writer::SummaryWriter::new(run_dir.join("tb"));
    tb.add_scalar("eval/ppl", ppl_student as f32, 0);
    if let Some(m) = &mmlu_student {
        tb.add_scalar("eval/mmlu_acc", m.acc as f32, 0);
    }
    let bar = crate::cli::progress_bar("distill");
    bar.set_length(o.max_steps as u64);
    let started = std::time::Instant::now();
    let (mut tokens, mut final_loss) = (0usize, f64::NAN);
    for step in 0..o.max_steps {
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
            let (loss, kd, ce) = loss_step(&lm, &student.rope, &teacher, batch, cfg, count);
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
        let tps = tokens as f64 / started.elapsed().as_secs_f64();
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
        if cfg.output.eval_every > 0
            && (step + 1) % cfg.output.eval_every == 0
            && step + 1 < o.max_steps
        {
            let valid = lm.valid();
            let ppl = held_out.ppl(&valid, &eval_rope)?;
            bar.println(format!("step {}: held-out ppl {ppl:.3}", step + 1));
            record["eval_ppl"] = ppl.into();
            tb.add_scalar("eval/ppl", ppl as f32, step + 1);
            if let Some(m) = held_out.mmlu(&valid, &eval_rope)? {
                bar.println(format!("step {}: MMLU {:.4}", step + 1, m.acc));
                record["eval_mmlu_acc"] = m.acc.into();
                tb.add_scalar("eval/mmlu_acc", m.acc as f32, step + 1);
            }
        }
        writeln!(metrics, "{record}")?;
    }
    bar.finish_and_clear();
    let valid = lm.valid();
    let ppl_recovered = held_out.ppl(&valid, &eval_rope)?;
    tb.add_scalar("eval/ppl", ppl_recovered as f32, o.max_steps);
    let mmlu_recovered = held_out.mmlu(&valid, &eval_rope)?;
    if let Some(m) = &mmlu_recovered {
        tb.add_scalar("eval/mmlu_acc", m.acc as f32, o.max_steps);
    }
    tb.flush();
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
    std::fs::create_dir_all(&adapter)?;
    save_adapter(&mut lm, &cfg.lora, student_dir, &adapter)?;
    Ok(Summary {
        student: student_dir.to_path_buf(),
        teacher: teacher_dir.to_path_buf(),
        adapter,
        steps: o.max_steps,
        final_loss,
        ppl_teacher,
        ppl_student,
        ppl_recovered,
        mmlu_teacher: mmlu_acc(&mmlu_teacher),
        mmlu_pruned: mmlu_acc(&mmlu_student),
        mmlu_recovered: mmlu_acc(&mmlu_recovered),
        tokens_per_sec: tokens as f64 / started.elapsed().as_secs_f64(),
    })
}

/// Both forwards and the chunked loss of one micro-batch: `(loss to backpropagate, kd, ce)`,
/// the loss already divided by the step's `count`.
fn loss_step<B: AutodiffBackend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    teacher: &Pretrained<B::InnerBackend>,
    batch: &Batch<B>,
    cfg: &DistillConfig,
    count: usize,
) -> (Tensor<B, 1>, f64, f64) {
    let hidden =
        predicting_rows(lm.hidden(batch.ids.clone(), rope, batch.padding.as_ref(), None, None));
    let rows = hidden.dims()[0];
    let t_padding = batch.padding.clone().map(|p| p.inner());
    let t_hidden = teacher.lm.hidden(
        batch.ids.clone().inner(),
        &teacher.rope,
        t_padding.as_ref(),
        None,
        None,
    );
    let t_hidden = predicting_rows(t_hidden);
    let chunk = rows_per_chunk(teacher.config.vocab_size);
    let sums = chunked_kd(
        rows,
        chunk,
        batch.targets.clone(),
        batch.valid.clone(),
        &cfg.loss,
        |r| {
            let student = lm.logits_2d(hidden.clone().slice(r.clone()));
            let teacher = Tensor::from_inner(teacher.lm.logits_2d(t_hidden.clone().slice(r)));
            (student, teacher)
        },
    );
    let (loss, kd, ce) = sums.means(count, &cfg.loss);
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

/// The training sequences of every file, drawn by mixture weight in a seeded order; each file
/// is reshuffled when exhausted (a new epoch of that file).
struct Mixture {
    files: Vec<Vec<Sequence>>,
    cursor: Vec<usize>,
    weights: Vec<f64>,
    rng: StdRng,
    pad: u32,
}

impl Mixture {
    fn load(cfg: &DistillConfig, tok: &crate::model::Tokenizer) -> Result<Self> {
        let d = &cfg.data;
        let eos = tok
            .eos_id()
            .ok_or_else(|| anyhow::anyhow!("tokenizer.json: no end-of-text token"))?;
        let mut rng = StdRng::seed_from_u64(d.seed);
        let mut files = Vec::new();
        for path in &d.files {
            let mut seqs = Vec::new();
            let mut error = None;
            read_examples(path, |ex| {
                match tokenize(&ex, tok, eos, d.max_seq_len) {
                    Ok(Some(s)) => seqs.push(s),
                    Ok(None) => {}
                    Err(e) => error = Some(e),
                }
                error.is_none() && seqs.len() < d.max_examples
            })?;
            if let Some(e) = error {
                return Err(e);
            }
            if seqs.is_empty() {
                bail!(
                    "{}: no example has a response token within max_seq_len {}",
                    path.display(),
                    d.max_seq_len
                );
            }
            seqs.shuffle(&mut rng);
            files.push(seqs);
        }
        let weights = if d.weights.is_empty() {
            vec![1.0; files.len()]
        } else {
            d.weights.clone()
        };
        Ok(Self {
            cursor: vec![0; files.len()],
            files,
            weights,
            rng,
            pad: eos,
        })
    }

    fn next(&mut self) -> &Sequence {
        let total: f64 = self.weights.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        let mut f = self.weights.len() - 1;
        for (i, w) in self.weights.iter().enumerate() {
            if r < *w {
                f = i;
                break;
            }
            r -= w;
        }
        if self.cursor[f] == self.files[f].len() {
            self.files[f].shuffle(&mut self.rng);
            self.cursor[f] = 0;
        }
        self.cursor[f] += 1;
        &self.files[f][self.cursor[f] - 1]
    }

    fn batch<B: burn::tensor::backend::Backend>(
        &mut self,
        size: usize,
        device: &B::Device,
    ) -> Batch<B> {
        let seqs: Vec<Sequence> = (0..size).map(|_| self.next().clone()).collect();
        Batch::new(&seqs.iter().collect::<Vec<_>>(), self.pad, device)
    }
}
