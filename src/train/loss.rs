//! Distillation losses, computed over row chunks so that `[rows, vocab]` logits of teacher and
//! student never exist whole (see [`crate::model::chunk`]).
//!
//! Every loss is a per-row divergence between the teacher's and the student's next-token
//! distributions at temperature T, times T^2, mixed with the student's cross-entropy:
//! `alpha x KD + (1 - alpha) x CE`, both means over rows whose label is not -100. As in
//! torchtune's chunked KD loss, each chunk's sums are added un-normalised and divided once by
//! the number of counted rows.

use super::hidden::{HiddenDistance, HiddenLayers};
use crate::data::batch::Batch;
use crate::kernels;
use crate::model::chunk::{predicting_rows, row_chunks};
use crate::model::logprobs::token_nll;
use crate::model::{CausalLm, Rope};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{activation::log_softmax, backend::Backend, DType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Which divergence the KD term uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Divergence {
    /// KL(teacher || student): the student covers the teacher's mass (the usual KD loss).
    ForwardKl,
    /// KL(student || teacher): mode-seeking.
    ReverseKl,
    /// Forward KL over the teacher's `top_k` tokens, teacher renormalised over those k; the
    /// student's log-probabilities are its full-vocabulary ones gathered at those ids.
    TopKForwardKl,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdLoss {
    pub divergence: Divergence,
    pub temperature: f64,
    /// Weight of the KD term; 1 - alpha goes to the student's cross-entropy.
    pub alpha: f64,
    /// k of `top_k_forward_kl`.
    pub top_k: usize,
    /// Weight of the hidden-state term added to the loss (see [`super::hidden`]); 0: off. The
    /// hidden settings are left out of a checkpoint's settings while off, so checkpoints of
    /// runs without them still resume.
    #[serde(skip_serializing_if = "is_zero")]
    pub hidden_weight: f64,
    /// Which student layers the hidden term reads.
    #[serde(skip_serializing_if = "is_default")]
    pub hidden_layers: HiddenLayers,
    #[serde(skip_serializing_if = "is_default")]
    pub hidden_distance: HiddenDistance,
    /// For each student layer, the teacher layer whose output it stands for; default: from the
    /// student's laco_report.json, else proportional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_layer_map: Option<Vec<usize>>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_default<T: Default + PartialEq>(x: &T) -> bool {
    *x == T::default()
}

impl Default for KdLoss {
    fn default() -> Self {
        Self {
            divergence: Divergence::ForwardKl,
            temperature: 2.0,
            alpha: 0.5,
            top_k: 64,
            hidden_weight: 0.0,
            hidden_layers: HiddenLayers::default(),
            hidden_distance: HiddenDistance::default(),
            hidden_layer_map: None,
        }
    }
}

/// Un-normalised sums over the counted rows of one or more chunks.
#[derive(Clone)]
pub struct LossSums<B: Backend> {
    pub kd: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
}

impl<B: Backend> std::ops::Add for LossSums<B> {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            kd: self.kd + other.kd,
            ce: self.ce + other.ce,
        }
    }
}

impl<B: Backend> LossSums<B> {
    /// `(loss, kd, ce)` as means over `count` rows: loss = alpha KD + (1 - alpha) CE.
    pub fn means(self, count: usize, cfg: &KdLoss) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
        let n = count.max(1) as f64;
        let kd = self.kd.div_scalar(n);
        let ce = self.ce.div_scalar(n);
        let loss = kd.clone().mul_scalar(cfg.alpha) + ce.clone().mul_scalar(1.0 - cfg.alpha);
        (loss, kd, ce)
    }
}

/// The teacher's side of a chunk of rows.
pub enum TeacherRows<B: Backend> {
    /// Its logits `[rows, vocab]`.
    Logits(Tensor<B, 2>),
    /// Its k most likely tokens `[rows, k]` and their log-probabilities `[rows, k]` (from its
    /// logits, or from a teacher cache): what `top_k_forward_kl` reads.
    TopK {
        ids: Tensor<B, 2, Int>,
        logprobs: Tensor<B, 2>,
    },
}

impl<B: Backend> From<Tensor<B, 2>> for TeacherRows<B> {
    fn from(logits: Tensor<B, 2>) -> Self {
        Self::Logits(logits)
    }
}

/// The one chunk driver, the loss fused with the linear layer before it (as Liger-Kernel's
/// fused linear JSD and cut cross-entropy do): for each range of `chunk_rows` rows (see
/// [`crate::model::chunk::rows_per_chunk`]), `head` turns those rows of `inputs` into the
/// student's logits `[rows, vocab]` (the frozen lm_head in training; the identity when `inputs`
/// are logits already), `teacher(range)` gives the teacher's side, their KD and CE sums are
/// added up, and the chunk's share of the loss `alpha KD + (1 - alpha) CE`, divided by `count`,
/// is backpropagated at once to the chunk's inputs. No `[rows, vocab]` tensor outlives its
/// chunk: what the step keeps is the gradient with respect to `inputs`, `[rows, width]`.
/// Every row counts: positions whose label is -100 are left out before (see
/// [`crate::data::batch::Batch::rows`]).
///
/// - `inputs`: `[rows, width]`, `targets`: `[rows]` next-token ids
/// - returns the gradient of the loss with respect to `inputs` and the un-normalised sums
pub fn chunked_kd<B: AutodiffBackend, T: Into<TeacherRows<B>>>(
    chunk_rows: usize,
    inputs: Tensor<B::InnerBackend, 2>,
    targets: Tensor<B, 1, Int>,
    cfg: &KdLoss,
    count: usize,
    head: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>,
    mut teacher: impl FnMut(Range<usize>) -> T,
) -> (Tensor<B::InnerBackend, 2>, LossSums<B::InnerBackend>) {
    let rows = targets.dims()[0];
    let mut total: Option<LossSums<B::InnerBackend>> = None;
    let mut grads = Vec::new();
    for r in row_chunks(rows, chunk_rows) {
        let x = Tensor::<B, 2>::from_inner(inputs.clone().slice(r.clone())).require_grad();
        let student = head(x.clone());
        let targets = targets.clone().slice(r.clone());
        let sums = fused_chunk_sums(&student, teacher(r).into(), &targets, cfg)
            .unwrap_or_else(|teacher| chunk_sums(student, teacher, targets, cfg));
        let (loss, _, _) = sums.clone().means(count, cfg);
        grads.push(
            x.grad(&loss.backward())
                .expect("the chunk's inputs take a gradient"),
        );
        let sums = LossSums {
            kd: sums.kd.inner(),
            ce: sums.ce.inner(),
        };
        total = Some(match total {
            Some(t) => t + sums,
            None => sums,
        });
    }
    (Tensor::cat(grads, 0), total.expect("at least one row"))
}

/// [`kernels::kd_ce_sums`] or [`kernels::top_k_kd_ce_sums`] where they run (on the CPU);
/// otherwise the teacher's rows back.
fn fused_chunk_sums<B: Backend>(
    student: &Tensor<B, 2>,
    teacher: TeacherRows<B>,
    targets: &Tensor<B, 1, Int>,
    cfg: &KdLoss,
) -> Result<LossSums<B>, TeacherRows<B>> {
    let t = cfg.temperature;
    let fused = match (&teacher, cfg.divergence) {
        (TeacherRows::TopK { ids, logprobs }, _) => {
            kernels::top_k_kd_ce_sums(student, ids, logprobs, targets, t)
        }
        (TeacherRows::Logits(_), Divergence::TopKForwardKl) => None,
        (TeacherRows::Logits(teacher), d) => {
            kernels::kd_ce_sums(student, teacher, targets, t, d == Divergence::ReverseKl)
        }
    };
    match fused {
        Some((kd, ce)) => Ok(LossSums { kd, ce }),
        None => Err(teacher),
    }
}

/// KD and CE sums of one chunk in f32, with burn's generic ops (any backend, every divergence;
/// a [`TeacherRows::TopK`] teacher is read as `top_k_forward_kl`).
pub fn chunk_sums<B: Backend>(
    student: Tensor<B, 2>,
    teacher: impl Into<TeacherRows<B>>,
    targets: Tensor<B, 1, Int>,
    cfg: &KdLoss,
) -> LossSums<B> {
    let student = student.cast(DType::F32);
    let n = student.dims()[0];
    let t = cfg.temperature;
    let ls = log_softmax(student.clone().div_scalar(t), 1);
    let per_row = match (teacher.into(), cfg.divergence) {
        (TeacherRows::TopK { ids, logprobs }, _) => top_k_kl_rows(ls, logprobs, ids, t),
        (TeacherRows::Logits(teacher), Divergence::TopKForwardKl) => {
            let (values, ids) = teacher.cast(DType::F32).topk_with_indices(cfg.top_k, 1);
            top_k_kl_rows(ls, values, ids, t)
        }
        (TeacherRows::Logits(teacher), Divergence::ForwardKl) => {
            let lt = log_softmax(teacher.cast(DType::F32).div_scalar(t), 1);
            (lt.clone().exp() * (lt - ls)).sum_dim(1)
        }
        (TeacherRows::Logits(teacher), Divergence::ReverseKl) => {
            let lt = log_softmax(teacher.cast(DType::F32).div_scalar(t), 1);
            (ls.clone().exp() * (ls - lt)).sum_dim(1)
        }
    };
    let kd = per_row.reshape([n]).sum().mul_scalar(t * t);
    let ce = token_nll(student, targets).sum();
    LossSums { kd, ce }
}

/// Per row `[rows, 1]`: KL(q || p_s) with q the softmax of the teacher's top-k `values / T`
/// (logits or log-probabilities: any constant per row cancels) at `ids`, and `ls` the student's
/// log-probabilities at temperature T.
fn top_k_kl_rows<B: Backend>(
    ls: Tensor<B, 2>,
    values: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
    t: f64,
) -> Tensor<B, 2> {
    let lt = log_softmax(values.cast(DType::F32).div_scalar(t), 1);
    (lt.clone().exp() * (lt - ls.gather(1, ids))).sum_dim(1)
}

/// The teacher's `k` most likely tokens of each row of its `logits` `[rows, vocab]` and their
/// log-probabilities, most likely first: `([rows, k] ids, [rows, k] log-probabilities)`.
pub fn teacher_top_k<B: Backend>(
    logits: Tensor<B, 2>,
    k: usize,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let [rows, vocab] = logits.dims();
    let k = k.min(vocab);
    let device = logits.device();
    if let Some((ids, logprobs)) = kernels::top_k_logprobs(&logits, k) {
        let ids: Vec<i32> = ids.into_iter().map(|i| i as i32).collect();
        return (
            Tensor::from_data(TensorData::new(ids, [rows, k]), &device),
            Tensor::from_data(TensorData::new(logprobs, [rows, k]), &device),
        );
    }
    let (logprobs, ids) = log_softmax(logits.cast(DType::F32), 1).topk_with_indices(k, 1);
    (ids, logprobs)
}

/// The final hidden states `[count, hidden]` at a batch's counted positions.
pub fn batch_hidden<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    batch: &Batch<B>,
) -> Tensor<B, 2> {
    counted_layers(lm, rope, batch, &[]).0
}

/// [`batch_hidden`], and the outputs of the decoder layers `layers` (ascending) at the same
/// positions, each `[count, hidden]` (the teacher's side of the hidden term; a teacher reads
/// [`Batch::inner`]).
pub fn counted_layers<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    batch: &Batch<B>,
    layers: &[usize],
) -> (Tensor<B, 2>, Vec<Tensor<B, 2>>) {
    let (mut x, pass) = lm.begin(batch.ids.clone(), rope, batch.layout());
    let mut kept = Vec::with_capacity(layers.len());
    for (l, layer) in lm.model.layers.iter().enumerate() {
        x = layer.run(x, rope, &pass);
        if layers.contains(&l) {
            kept.push(predicting_rows(x.clone()).select(0, batch.rows.clone()));
        }
    }
    let hidden = predicting_rows(lm.model.norm.forward(x)).select(0, batch.rows.clone());
    (hidden, kept)
}
