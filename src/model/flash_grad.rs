//! Training's causal attention on burn's autodiff over Flex in f32: the fused forward pass of
//! [`super::flash`] (which also keeps each query row's log-sum-exp) and a backward pass written
//! by hand, registered as one autodiff node.
//!
//! The backward pass runs one rayon task per (batch row, KV head), over blocks of queries of
//! every head sharing that KV head: it recomputes the scores and, from the kept log-sum-exps, the
//! probabilities P, then dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K and
//! dK += dS^T Q, each a single-threaded gemm; nothing of size `[seq, seq]` outlives a block.

use super::flash::{forward, queries, Dims, BLOCK};
use super::flex::{gemm, resize_for_gemm, SharedOut, View, Write};
use super::flex_grad::{dense, elems, flex_tensor, from_ad, supported, to_ad};
use super::simd::probs_row;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// As [`super::flash::attention`], on `Autodiff<Flex>` in f32; `None` elsewhere.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<&[bool]>,
) -> Option<Tensor<B, 3>> {
    if !supported::<B>(q.dtype()) {
        return None;
    }
    let dims = Dims::of(&q, &k);
    let (q, k, v) = (to_ad(q), to_ad(k), to_ad(v));
    let views = [&q, &k, &v].map(|t| View::from_flex(t.primitive.clone()));
    let mut lse = vec![0f32; dims.batch * dims.heads * dims.seq];
    let [qv, kv, vv] = &views;
    let out = forward(qv, kv, vv, dims, padding, Some(&mut lse));
    let out = flex_tensor(out, &[dims.batch, dims.seq, dims.heads * dims.d]);
    let out = match Attention
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = State {
                views,
                out: out.clone(),
                lse,
                padding: padding.map(<[bool]>::to_vec),
                dims,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Some(from_ad(out))
}

#[derive(Debug)]
struct Attention;

#[derive(Debug, Clone)]
struct State {
    /// q `[batch, seq, heads, d]`, k and v `[batch, kv_heads, keys, d]`.
    views: [View; 3],
    /// `[batch, seq, heads * d]`.
    out: FlexTensor,
    /// `[batch, heads, seq]`.
    lse: Vec<f32>,
    padding: Option<Vec<bool>>,
    dims: Dims,
}

/// Per-task buffers of the backward pass.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    d_out: Vec<f32>,
    /// rowsum(dO O) of each query row.
    delta: Vec<f32>,
    probs: Vec<f32>,
    d_scores: Vec<f32>,
    d_q: Vec<f32>,
}

impl Backward<Flex, 3> for Attention {
    type State = State;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = dense(grads.consume::<Flex>(&ops.node));
        let st = ops.state;
        let Dims {
            batch,
            seq,
            heads,
            kv_heads,
            keys,
            d,
        } = st.dims;
        let [q, k, v] = &st.views;
        let (rep, start) = (heads / kv_heads, keys - seq);
        let (g, o) = (elems(&g), elems(&st.out));
        let mut dq = vec![0f32; batch * seq * heads * d];
        let mut dk = vec![0f32; batch * kv_heads * keys * d];
        let mut dv = vec![0f32; batch * kv_heads * keys * d];
        let (dq_out, dk_out, dv_out) = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        (0..batch * kv_heads)
            .into_par_iter()
            .for_each_init(Scratch::default, |s, task| {
                let (b, kh) = (task / kv_heads, task % kv_heads);
                let group = kh * rep..(kh + 1) * rep;
                // Only this task touches the (b, kh) blocks of dK and dV.
                let (dk, dv) = (dk_out.at(task * keys * d), dv_out.at(task * keys * d));
                let pad = st.padding.as_ref().map(|p| &p[b * keys..(b + 1) * keys]);
                let (kp, vp) = (k.at(&[b, kh, 0, 0]), v.at(&[b, kh, 0, 0]));
                for r0 in (0..seq).step_by(BLOCK) {
                    let rows = BLOCK.min(seq - r0);
                    let (seen, m) = (start + r0 + rows, rep * rows);
                    queries(q, b, group.clone(), r0..r0 + rows, &mut s.q);
                    // The block's rows of dO and rowsum(dO O), head-major as the queries.
                    s.d_out.clear();
                    s.delta.clear();
                    for h in group.clone() {
                        for i in r0..r0 + rows {
                            let at = ((b * seq + i) * heads + h) * d;
                            let (gr, or) = (&g[at..at + d], &o[at..at + d]);
                            s.d_out.extend_from_slice(gr);
                            s.delta.push(gr.iter().zip(or).map(|(a, b)| a * b).sum());
                        }
                    }
                    resize_for_gemm(&mut s.probs, m * seen);
                    resize_for_gemm(&mut s.d_scores, m * seen);
                    resize_for_gemm(&mut s.d_q, m * d);
                    let (ks, vs) = ((k.strides[2], k.strides[3]), (v.strides[2], v.strides[3]));
                    // SAFETY (every gemm): the views bound K and V, the scratch buffers have
                    // the sizes given, and dK, dV rows 0..seen lie in this task's block.
                    unsafe {
                        gemm(
                            [m, seen, d],
                            (s.probs.as_mut_ptr(), 1, seen as isize),
                            (s.q.as_ptr(), 1, d as isize),
                            (kp, ks.0, ks.1),
                            Write::Set(1.0),
                        );
                    }
                    for (row, p) in s.probs.chunks_exact_mut(seen).enumerate() {
                        let (h, i) = (group.start + row / rows, r0 + row % rows);
                        let lse = st.lse[(b * heads + h) * seq + i];
                        probs_row(p, start + i + 1, pad.map(|p| &p[..seen]), lse);
                    }
                    unsafe {
                        // dV += P^T dO
                        gemm(
                            [seen, d, m],
                            (dv, 1, d as isize),
                            (s.probs.as_ptr(), seen as isize, 1),
                            (s.d_out.as_ptr(), 1, d as isize),
                            Write::Add(1.0),
                        );
                        // dP = dO V^T
                        gemm(
                            [m, seen, d],
                            (s.d_scores.as_mut_ptr(), 1, seen as isize),
                            (s.d_out.as_ptr(), 1, d as isize),
                            (vp, vs.0, vs.1),
                            Write::Set(1.0),
                        );
                    }
                    // dS = P (dP - delta)
                    for ((ds, p), delta) in s
                        .d_scores
                        .chunks_exact_mut(seen)
                        .zip(s.probs.chunks_exact(seen))
                        .zip(&s.delta)
                    {
                        for (x, &p) in ds.iter_mut().zip(p) {
                            *x = p * (*x - delta);
                        }
                    }
                    unsafe {
                        // dQ = dS K
                        gemm(
                            [m, d, seen],
                            (s.d_q.as_mut_ptr(), 1, d as isize),
                            (s.d_scores.as_ptr(), 1, seen as isize),
                            (kp, ks.1, ks.0),
                            Write::Set(1.0),
                        );
                        // dK += dS^T Q
                        gemm(
                            [seen, d, m],
                            (dk, 1, d as isize),
                            (s.d_scores.as_ptr(), seen as isize, 1),
                            (s.q.as_ptr(), 1, d as isize),
                            Write::Add(1.0),
                        );
                    }
                    for (row, grad) in s.d_q.chunks_exact(d).enumerate() {
                        let (h, i) = (group.start + row / rows, r0 + row % rows);
                        // SAFETY: (b, i, h) is one of this task's query rows.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                dq_out.at(((b * seq + i) * heads + h) * d),
                                d,
                            )
                        };
                        dst.copy_from_slice(grad);
                    }
                }
            });
        let [pq, pk, pv] = &ops.parents;
        for (parent, grad, dims) in [
            (pq, dq, [batch, seq, heads, d]),
            (pk, dk, [batch, kv_heads, keys, d]),
            (pv, dv, [batch, kv_heads, keys, d]),
        ] {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, flex_tensor(grad, &dims));
            }
        }
    }
}
