//! The KD and CE sums of a chunk of logit rows as one autodiff node when training on the CPU
//! (Flex, f32): forward or reverse KL at temperature T and the student's cross-entropy, in two
//! passes over each row (log-sum-exps, then the divergence) with a vectorised exp; the backward
//! pass writes the student's logit gradient in one more pass from the logits and the per-row
//! log-sum-exps it kept. burn's generic ops would build a dozen `[rows, vocab]` tensors per
//! chunk, with a scalar exp.

use super::flex::{dense, elems, flex_tensor, from_ad, give, record, to_ad, training, upstream};
use super::simd::{exp, lane_sum3, logsumexp_scaled, vectorised};
use burn::backend::autodiff::{
    checkpoint::base::Checkpointer,
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Int, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `(kd, ce)` sums over the rows of `student` and `teacher` logits `[rows, vocab]`: kd is
/// `T^2 x sum KL(p_t || p_s)` at temperature `temperature` (`KL(p_s || p_t)` when `reverse`),
/// ce the student's cross-entropy against `targets` `[rows]`; each a `[1]` tensor.
pub fn kd_ce_sums<B: Backend>(
    student: &Tensor<B, 2>,
    teacher: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    temperature: f64,
    reverse: bool,
) -> Option<(Tensor<B, 1>, Tensor<B, 1>)> {
    if !training::<B>(student.dtype()) || teacher.dtype() != DType::F32 {
        return None;
    }
    let [rows, vocab] = student.dims();
    let targets: Vec<usize> = targets
        .clone()
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("integer targets")
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let student = to_ad(student.clone());
    let (s, t) = (
        dense(student.primitive.clone()),
        dense(to_ad(teacher.clone()).primitive),
    );
    let inv_t = (1.0 / temperature) as f32;
    let stats: Vec<RowStats> = elems(&s)
        .par_chunks_exact(vocab)
        .zip(elems(&t).par_chunks_exact(vocab))
        .zip(&targets)
        .map(|((z, t), &target)| row_stats(z, t, target, inv_t, reverse))
        .collect();
    let kd: f64 = stats.iter().map(|r| f64::from(r.kl)).sum::<f64>() * temperature * temperature;
    let ce: f64 = stats.iter().map(|r| f64::from(r.ce)).sum();
    let sums = flex_tensor(vec![kd as f32, ce as f32], &[2]);
    let state = || KdCeState {
        student: s,
        teacher: t,
        stats,
        targets,
        temperature: temperature as f32,
        reverse,
        dims: [rows, vocab],
    };
    let sums: Tensor<B, 1> = from_ad(record(KdCe, [&student], sums, state));
    Some((sums.clone().narrow(0, 0, 1), sums.narrow(0, 1, 1)))
}

/// What one row's loss and gradient need.
#[derive(Debug, Clone, Copy)]
pub(super) struct RowStats {
    /// Log-sum-exps of student and teacher logits / T, and of the student's logits (T = 1).
    lse_s: f32,
    lse_t: f32,
    lse_1: f32,
    /// The divergence, without the T^2 factor.
    kl: f32,
    ce: f32,
}

vectorised! {
    fn row_stats(z: &[f32], t: &[f32], target: usize, inv_t: f32, reverse: bool) -> RowStats = row_stats_body
}

vectorised! {
    fn row_grad(out: &mut [f32], z: &[f32], t: &[f32], r: &RowStats, g: Grad) -> () = row_grad_body
}

/// `forward`: KL(p_t || p_s) = sum p_t (t - z) / T + lse_s - lse_t; `reverse`: KL(p_s || p_t) =
/// sum p_s (z - t) / T + lse_t - lse_s.
#[inline(always)]
fn row_stats_body(z: &[f32], t: &[f32], target: usize, inv_t: f32, reverse: bool) -> RowStats {
    let lse_s = logsumexp_scaled(z, inv_t);
    let lse_t = logsumexp_scaled(t, inv_t);
    let lse_1 = if inv_t == 1.0 {
        lse_s
    } else {
        logsumexp_scaled(z, 1.0)
    };
    let (p_of, lse_p, sign) = if reverse {
        (z, lse_s, -1.0)
    } else {
        (t, lse_t, 1.0)
    };
    let sum = lane_sum3(z, t, p_of, |z, t, p| exp(p * inv_t - lse_p) * (t - z)) * inv_t * sign;
    RowStats {
        lse_s,
        lse_t,
        lse_1,
        kl: sum + sign * (lse_s - lse_t),
        ce: lse_1 - z[target],
    }
}

/// Upstream gradients and settings of one backward pass.
#[derive(Debug, Clone, Copy)]
pub(super) struct Grad {
    /// d loss / d kd-sum, times T (d/dz of T^2 KL(.) is T (p_s - p_t) for the forward KL).
    kd_t: f32,
    ce: f32,
    inv_t: f32,
    reverse: bool,
    target: usize,
}

/// d/dz of `kd_t / T x T^2 KL + ce x CE` for one row.
#[inline(always)]
fn row_grad_body(out: &mut [f32], z: &[f32], t: &[f32], r: &RowStats, g: Grad) {
    let same_t = g.inv_t == 1.0;
    let shift = r.lse_t - r.lse_s - r.kl;
    for ((o, &z), &t) in out.iter_mut().zip(z).zip(t) {
        let ps = exp(z * g.inv_t - r.lse_s);
        let kd = if g.reverse {
            ps * ((z - t) * g.inv_t + shift)
        } else {
            ps - exp(t * g.inv_t - r.lse_t)
        };
        let p1 = if same_t { ps } else { exp(z - r.lse_1) };
        *o = g.kd_t * kd + g.ce * p1;
    }
    out[g.target] -= g.ce;
}

#[derive(Debug)]
struct KdCe;

#[derive(Debug, Clone)]
struct KdCeState {
    student: FlexTensor,
    teacher: FlexTensor,
    stats: Vec<RowStats>,
    targets: Vec<usize>,
    temperature: f32,
    reverse: bool,
    dims: [usize; 2],
}

impl Backward<Flex, 1> for KdCe {
    type State = KdCeState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = upstream(&ops, grads);
        let s = &ops.state;
        let [rows, vocab] = s.dims;
        let (g_kd, g_ce) = (elems(&g)[0], elems(&g)[1]);
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_exact_mut(vocab)
            .zip(elems(&s.student).par_chunks_exact(vocab))
            .zip(elems(&s.teacher).par_chunks_exact(vocab))
            .zip(s.stats.par_iter().zip(&s.targets))
            .for_each(|(((o, z), t), (r, &target))| {
                let g = Grad {
                    kd_t: g_kd * s.temperature,
                    ce: g_ce,
                    inv_t: 1.0 / s.temperature,
                    reverse: s.reverse,
                    target,
                };
                row_grad(o, z, t, r, g)
            });
        give(&ops, 0, grads, out, &[rows, vocab]);
    }
}
