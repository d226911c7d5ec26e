//! Top-k teacher distributions on the CPU (Flex, f32), as DistillKit stores them: the k most
//! likely tokens of every row of logits with their log-probabilities (one pass with a bounded
//! heap instead of sorting the vocabulary, as burn's generic `topk` does), and the top-k forward
//! KL + CE of a chunk of student logit rows against such a distribution as one autodiff node
//! (two passes over each row; the backward pass writes the logit gradient in one more pass plus
//! the k sparse teacher terms).

use super::flex::{dense, elems, flex_data, flex_tensor, from_ad, give, inference, record, to_ad};
use super::flex::{training, upstream};
use super::simd::{exp, logsumexp_row, logsumexp_scaled, vectorised};
use burn::backend::autodiff::{
    checkpoint::base::Checkpointer,
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Int, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// The `k` largest of every row of `[rows, vocab]` logits, most likely first (ties: lower id
/// first): `(ids, logprobs)`, both `rows * k` row-major, the log-probabilities those of the full
/// softmax (`logit - logsumexp(row)`). `None` where the kernels do not run (then: `log_softmax`
/// and `topk_with_indices`).
pub fn top_k_logprobs<B: Backend>(logits: &Tensor<B, 2>, k: usize) -> Option<(Vec<u32>, Vec<f32>)> {
    if !inference::<B>(logits.dtype()) {
        return None;
    }
    let [_, vocab] = logits.dims();
    let k = k.min(vocab);
    let data = flex_data(logits);
    let rows: Vec<(Vec<u32>, Vec<f32>)> = elems(&data)
        .par_chunks_exact(vocab)
        .map(|z| {
            let lse = logsumexp_row(z);
            top_k_row(z, k)
                .into_iter()
                .map(|i| (i, z[i as usize] - lse))
                .unzip()
        })
        .collect();
    Some(
        rows.into_iter()
            .fold((Vec::new(), Vec::new()), |(mut ids, mut lps), (i, l)| {
                ids.extend(i);
                lps.extend(l);
                (ids, lps)
            }),
    )
}

/// A logit ordered by value, then by lower id.
#[derive(PartialEq)]
struct Ranked(f32, Reverse<u32>);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The ids of the `k` largest of `z`, most likely first.
fn top_k_row(z: &[f32], k: usize) -> Vec<u32> {
    // A min-heap of the best k so far; most logits lose against its minimum at once.
    let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(k + 1);
    for (i, &x) in z.iter().enumerate() {
        let r = Ranked(x, Reverse(i as u32));
        if heap.len() < k {
            heap.push(Reverse(r));
        } else if heap.peek().is_some_and(|Reverse(min)| r > *min) {
            heap.pop();
            heap.push(Reverse(r));
        }
    }
    let mut best: Vec<Ranked> = heap.into_iter().map(|Reverse(r)| r).collect();
    best.sort_by(|a, b| b.cmp(a));
    best.into_iter().map(|Ranked(_, Reverse(i))| i).collect()
}

/// `(kd, ce)` sums over the rows of `student` logits `[rows, vocab]` against a top-k teacher:
/// kd is `T^2 x sum KL(q || p_s)` at temperature `temperature`, where q is the teacher
/// renormalised over its k tokens (`ids` `[rows, k]`, log-probabilities `logprobs` `[rows, k]`,
/// any constant per row) and p_s the student's full softmax; ce the student's cross-entropy
/// against `targets` `[rows]`; each a `[1]` tensor.
pub fn top_k_kd_ce_sums<B: Backend>(
    student: &Tensor<B, 2>,
    ids: &Tensor<B, 2, Int>,
    logprobs: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    temperature: f64,
) -> Option<(Tensor<B, 1>, Tensor<B, 1>)> {
    if !training::<B>(student.dtype()) || logprobs.dtype() != DType::F32 {
        return None;
    }
    let [rows, vocab] = student.dims();
    let k = ids.dims()[1];
    let usizes = |t: &Tensor<B, 2, Int>| -> Vec<usize> {
        let v = t.clone().into_data().convert::<i64>().to_vec::<i64>();
        v.expect("integer ids")
            .into_iter()
            .map(|t| t as usize)
            .collect()
    };
    let teacher = Teacher {
        ids: usizes(ids),
        logprobs: elems(&dense(to_ad(logprobs.clone()).primitive)).to_vec(),
        targets: usizes(&targets.clone().reshape([rows, 1])),
        k,
    };
    let student = to_ad(student.clone());
    let s = dense(student.primitive.clone());
    let inv_t = (1.0 / temperature) as f32;
    let stats: Vec<RowStats> = elems(&s)
        .par_chunks_exact(vocab)
        .enumerate()
        .map(|(r, z)| row_stats(z, &teacher, r, inv_t))
        .collect();
    let kd: f64 = stats.iter().map(|r| f64::from(r.kl)).sum::<f64>() * temperature * temperature;
    let ce: f64 = stats.iter().map(|r| f64::from(r.ce)).sum();
    let sums = flex_tensor(vec![kd as f32, ce as f32], &[2]);
    let state = || TopKState {
        student: s,
        teacher,
        stats,
        temperature: temperature as f32,
        dims: [rows, vocab],
    };
    let sums: Tensor<B, 1> = from_ad(record(TopKd, [&student], sums, state));
    Some((sums.clone().narrow(0, 0, 1), sums.narrow(0, 1, 1)))
}

/// The top-k teacher of a chunk, and the targets.
#[derive(Debug, Clone)]
struct Teacher {
    ids: Vec<usize>,
    logprobs: Vec<f32>,
    targets: Vec<usize>,
    k: usize,
}

impl Teacher {
    /// Row `r`'s ids and log-probabilities.
    fn row(&self, r: usize) -> (&[usize], &[f32]) {
        let at = r * self.k..(r + 1) * self.k;
        (&self.ids[at.clone()], &self.logprobs[at])
    }
}

/// What one row's loss and gradient need.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    /// Log-sum-exps of the student's logits / T and at T = 1, and of the teacher's k
    /// log-probabilities / T.
    lse_s: f32,
    lse_1: f32,
    lse_q: f32,
    /// The divergence, without the T^2 factor.
    kl: f32,
    ce: f32,
}

vectorised! {
    fn student_lse(z: &[f32], inv_t: f32) -> (f32, f32) = student_lse_body
}

vectorised! {
    /// `out = a x softmax(z / T) + b x softmax(z)`.
    fn dense_grad(out: &mut [f32], z: &[f32], inv_t: f32, lse: (f32, f32), a: f32, b: f32) -> () = dense_grad_body
}

#[inline(always)]
fn student_lse_body(z: &[f32], inv_t: f32) -> (f32, f32) {
    let lse_s = logsumexp_scaled(z, inv_t);
    let lse_1 = if inv_t == 1.0 {
        lse_s
    } else {
        logsumexp_scaled(z, 1.0)
    };
    (lse_s, lse_1)
}

#[inline(always)]
fn dense_grad_body(out: &mut [f32], z: &[f32], inv_t: f32, lse: (f32, f32), a: f32, b: f32) {
    let (lse_s, lse_1) = lse;
    if inv_t == 1.0 {
        for (o, &z) in out.iter_mut().zip(z) {
            *o = (a + b) * exp(z - lse_s);
        }
    } else {
        for (o, &z) in out.iter_mut().zip(z) {
            *o = a * exp(z * inv_t - lse_s) + b * exp(z - lse_1);
        }
    }
}

/// KL(q || p_s) = sum_j q_j (log q_j - log p_s(id_j)), q_j = softmax(logprobs / T)_j.
fn row_stats(z: &[f32], teacher: &Teacher, r: usize, inv_t: f32) -> RowStats {
    let (lse_s, lse_1) = student_lse(z, inv_t);
    let (ids, lps) = teacher.row(r);
    let max = lps.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv_t));
    let lse_q = lps
        .iter()
        .map(|&x| (x * inv_t - max).exp())
        .sum::<f32>()
        .ln()
        + max;
    let kl = ids
        .iter()
        .zip(lps)
        .map(|(&i, &lp)| {
            let log_q = lp * inv_t - lse_q;
            log_q.exp() * (log_q - (z[i] * inv_t - lse_s))
        })
        .sum();
    RowStats {
        lse_s,
        lse_1,
        lse_q,
        kl,
        ce: lse_1 - z[teacher.targets[r]],
    }
}

#[derive(Debug)]
struct TopKd;

#[derive(Debug, Clone)]
struct TopKState {
    student: FlexTensor,
    teacher: Teacher,
    stats: Vec<RowStats>,
    temperature: f32,
    dims: [usize; 2],
}

impl Backward<Flex, 1> for TopKd {
    type State = TopKState;

    /// d/dz of `g_kd x T^2 KL + g_ce x CE` = `g_kd T (p_s - q) + g_ce (softmax(z) - onehot)`.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = upstream(&ops, grads);
        let s = &ops.state;
        let [rows, vocab] = s.dims;
        let (g_kd, g_ce) = (elems(&g)[0] * s.temperature, elems(&g)[1]);
        let inv_t = 1.0 / s.temperature;
        let mut out = vec![0f32; rows * vocab];
        out.par_chunks_exact_mut(vocab)
            .zip(elems(&s.student).par_chunks_exact(vocab))
            .zip(&s.stats)
            .enumerate()
            .for_each(|(r, ((o, z), st))| {
                dense_grad(o, z, inv_t, (st.lse_s, st.lse_1), g_kd, g_ce);
                let (ids, lps) = s.teacher.row(r);
                for (&i, &lp) in ids.iter().zip(lps) {
                    o[i] -= g_kd * (lp * inv_t - st.lse_q).exp();
                }
                o[s.teacher.targets[r]] -= g_ce;
            });
        give(&ops, 0, grads, out, &[rows, vocab]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_the_largest_in_order_with_lower_ids_first_on_ties() {
        let z = [0.5, 3.0, -1.0, 3.0, 2.0, 7.0, 0.0];
        assert_eq!(top_k_row(&z, 4), [5, 1, 3, 4]);
        assert_eq!(top_k_row(&z, 1), [5]);
        assert_eq!(top_k_row(&z, 7).len(), 7);
        let t = Tensor::<Flex, 2>::from_floats([z, [1.0; 7]], &Default::default());
        let (ids, lps) = top_k_logprobs(&t, 2).expect("Flex, f32");
        assert_eq!(ids, [5, 1, 0, 1]);
        let lse = z.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((lps[0] - (7.0 - lse)).abs() < 1e-6);
        assert!((lps[2] + 7f32.ln()).abs() < 1e-6);
    }
}
