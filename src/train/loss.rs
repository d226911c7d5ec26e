//! Distillation losses, computed over row chunks so that `[rows, vocab]` logits of teacher and
//! student never exist whole (see [`crate::model::chunk`]).
//!
//! Every loss is a per-row divergence between the teacher's and the student's next-token
//! distributions at temperature T, times T^2, mixed with the student's cross-entropy:
//! `alpha x KD + (1 - alpha) x CE`, both means over rows whose label is not -100. As in
//! torchtune's chunked KD loss, each chunk's sums are added un-normalised and divided once by
//! the number of counted rows.

use crate::data::batch::Batch;
use crate::eval::ppl::token_nll;
use crate::kernels;
use crate::model::chunk::{predicting_rows, row_chunks, rows_per_chunk};
use crate::model::{CausalLm, Pretrained, Rope};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{
    activation::log_softmax, backend::Backend, DType, ElementConversion, Int, Tensor,
};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Which divergence the KD term uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// KL(teacher || student): the student covers the teacher's mass (the usual KD loss).
    ForwardKl,
    /// KL(student || teacher): mode-seeking.
    ReverseKl,
    /// Forward KL over the teacher's `top_k` tokens, teacher renormalised over those k; the
    /// student's log-probabilities are its full-vocabulary ones gathered at those ids.
    TopKForwardKl,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KdLoss {
    pub divergence: Divergence,
    pub temperature: f64,
    /// Weight of the KD term; 1 - alpha goes to the student's cross-entropy.
    pub alpha: f64,
    /// k of `top_k_forward_kl`.
    pub top_k: usize,
}

impl Default for KdLoss {
    fn default() -> Self {
        Self {
            divergence: Divergence::ForwardKl,
            temperature: 2.0,
            alpha: 0.5,
            top_k: 64,
        }
    }
}

/// Un-normalised sums over the counted rows of one or more chunks.
pub struct LossSums<B: Backend> {
    pub kd: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
}

impl<B: Backend> LossSums<B> {
    fn add(self, other: Self) -> Self {
        Self {
            kd: self.kd + other.kd,
            ce: self.ce + other.ce,
        }
    }

    /// `(loss, kd, ce)` as means over `count` rows: loss = alpha KD + (1 - alpha) CE.
    pub fn means(self, count: usize, cfg: &KdLoss) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
        let n = count.max(1) as f64;
        let kd = self.kd.div_scalar(n);
        let ce = self.ce.div_scalar(n);
        let loss = kd.clone().mul_scalar(cfg.alpha) + ce.clone().mul_scalar(1.0 - cfg.alpha);
        (loss, kd, ce)
    }
}

/// The one chunk driver: for each range of `chunk_rows` rows (see
/// [`crate::model::chunk::rows_per_chunk`]), `logits(range)` gives `(student, teacher)` logits
/// `[rows, vocab]` of those rows, and their KD and CE sums are accumulated. Every row counts:
/// positions whose label is -100 are left out before (see [`crate::data::batch::Batch::rows`]).
///
/// - `targets`: `[rows]` next-token ids
pub fn chunked_kd<B: Backend>(
    chunk_rows: usize,
    targets: Tensor<B, 1, Int>,
    cfg: &KdLoss,
    mut logits: impl FnMut(Range<usize>) -> (Tensor<B, 2>, Tensor<B, 2>),
) -> LossSums<B> {
    let rows = targets.dims()[0];
    let mut total: Option<LossSums<B>> = None;
    for r in row_chunks(rows, chunk_rows) {
        let (student, teacher) = logits(r.clone());
        let targets = targets.clone().slice(r);
        let sums = fused_chunk_sums(&student, &teacher, &targets, cfg)
            .unwrap_or_else(|| chunk_sums(student, teacher, targets, cfg));
        total = Some(match total {
            Some(t) => t.add(sums),
            None => sums,
        });
    }
    total.expect("at least one row")
}

/// [`kernels::kd_ce_sums`] where it runs (forward and reverse KL on the CPU).
fn fused_chunk_sums<B: Backend>(
    student: &Tensor<B, 2>,
    teacher: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    cfg: &KdLoss,
) -> Option<LossSums<B>> {
    let reverse = match cfg.divergence {
        Divergence::ForwardKl => false,
        Divergence::ReverseKl => true,
        Divergence::TopKForwardKl => return None,
    };
    let (kd, ce) = kernels::kd_ce_sums(student, teacher, targets, cfg.temperature, reverse)?;
    Some(LossSums { kd, ce })
}

/// KD and CE sums of one chunk in f32, with burn's generic ops (any backend, every divergence).
pub fn chunk_sums<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    cfg: &KdLoss,
) -> LossSums<B> {
    let student = student.cast(DType::F32);
    let teacher = teacher.cast(DType::F32);
    let n = student.dims()[0];
    let t = cfg.temperature;
    let ls = log_softmax(student.clone().div_scalar(t), 1);
    let per_row = match cfg.divergence {
        Divergence::ForwardKl => {
            let lt = log_softmax(teacher.div_scalar(t), 1);
            (lt.clone().exp() * (lt - ls)).sum_dim(1)
        }
        Divergence::ReverseKl => {
            let lt = log_softmax(teacher.div_scalar(t), 1);
            (ls.clone().exp() * (ls - lt)).sum_dim(1)
        }
        Divergence::TopKForwardKl => {
            let (values, ids) = teacher.topk_with_indices(cfg.top_k, 1);
            let lt = log_softmax(values.div_scalar(t), 1);
            (lt.clone().exp() * (lt - ls.gather(1, ids))).sum_dim(1)
        }
    };
    let kd = per_row.reshape([n]).sum().mul_scalar(t * t);
    let ce = token_nll(student, targets).sum();
    LossSums { kd, ce }
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
