//! Fused causal attention on the CPU (Flex, f32), for inference and, as one autodiff node with
//! a hand-written backward pass, for training.
//!
//! The generic path of the model's attention builds scores, an additive mask and the softmax as
//! separate tensors and computes its exponentials one at a time. Here every (batch row, KV head,
//! block of queries) is one rayon task: the scores of the block's queries of every head sharing
//! that KV head against the keys the block can see (one gemm), the causal and padding mask and
//! the softmax's exponentials in place with a vectorised exp, then x V (a second gemm),
//! normalised on the way into the `[batch, seq, heads * head_dim]` layout that o_proj reads.
//! Training's forward pass also keeps each query row's log-sum-exp.
//!
//! Packed rows ([`KeyMask::Segments`]) hold several sequences, each attending only to itself: a
//! query sees the keys from its segment's first up to itself. A block of queries then runs its
//! gemms only over the keys from the first query's segment start to its last query, skipping
//! the blocks of keys no query of the block can see.
//!
//! The backward pass runs one rayon task per (batch row, KV head), over blocks of queries of
//! every head sharing that KV head: it recomputes the scores and, from the kept log-sum-exps, the
//! probabilities P, then dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K and
//! dK += dS^T Q, each a single-threaded gemm; nothing of size `[seq, seq]` outlives a block.

use super::flex::{
    elems, flex_tensor, from_ad, from_vec, give, inference, record, to_ad, training, upstream, View,
};
use super::gemm::{gemm, resize_for_gemm, SharedOut, Write};
use super::simd::{probs_row, softmax_row};
use burn::backend::autodiff::{
    checkpoint::base::Checkpointer,
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// Queries per task.
const BLOCK: usize = 64;

/// Which keys a query sees besides the causal limit (keys after it are never seen).
#[derive(Debug, Clone, Copy)]
pub enum KeyMask<'a> {
    /// Every key up to the query.
    Causal,
    /// `batch * keys` flags, true where a key is padding (never seen).
    Padding(&'a [bool]),
    /// Packed rows: per key its segment's id, which is the index of the segment's first key
    /// within its row (`batch * keys` values); a query sees the keys of its own segment up to
    /// itself.
    Segments(&'a [usize]),
}

/// Owned [`KeyMask`] data, kept by the backward pass.
#[derive(Debug, Clone)]
enum Keys {
    Causal,
    Padding(Vec<bool>),
    Segments(Vec<usize>),
}

impl Keys {
    fn mask(&self) -> KeyMask<'_> {
        match self {
            Keys::Causal => KeyMask::Causal,
            Keys::Padding(p) => KeyMask::Padding(p),
            Keys::Segments(s) => KeyMask::Segments(s),
        }
    }
}

impl<'a> KeyMask<'a> {
    fn owned(self) -> Keys {
        match self {
            KeyMask::Causal => Keys::Causal,
            KeyMask::Padding(p) => Keys::Padding(p.to_vec()),
            KeyMask::Segments(s) => Keys::Segments(s.to_vec()),
        }
    }

    /// The padding flags of batch row `b`'s keys `0..seen`.
    fn padding(self, b: usize, keys: usize, seen: usize) -> Option<&'a [bool]> {
        match self {
            KeyMask::Padding(p) => Some(&p[b * keys..b * keys + seen]),
            _ => None,
        }
    }

    /// The first key that query key-position `i` of batch row `b` can see.
    fn first(self, b: usize, keys: usize, i: usize) -> usize {
        match self {
            KeyMask::Segments(s) => s[b * keys + i],
            _ => 0,
        }
    }
}

/// Causal attention of queries at the last `seq` of `keys` positions.
///
/// # Shapes
/// - `q`: `[batch, seq, heads, head_dim]`, rotated and already scaled by `1/sqrt(head_dim)`
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]`
/// - `mask`: see [`KeyMask`]
/// - returns `[batch, seq, heads * head_dim]`, or `None` where the kernels do not run
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: KeyMask,
) -> Option<Tensor<B, 3>> {
    let dims = Dims::of(&q, &k);
    let shape = [dims.batch, dims.seq, dims.heads * dims.d];
    if inference::<B>(q.dtype()) {
        let (q, k, v) = (View::of(q)?, View::of(k)?, View::of(v)?);
        return Some(from_vec(forward(&q, &k, &v, dims, mask, None), shape));
    }
    if !training::<B>(q.dtype()) {
        return None;
    }
    let (q, k, v) = (to_ad(q), to_ad(k), to_ad(v));
    let views = [&q, &k, &v].map(|t| View::from_flex(t.primitive.clone()));
    let mut lse = vec![0f32; dims.batch * dims.heads * dims.seq];
    let [qv, kv, vv] = &views;
    let out = flex_tensor(forward(qv, kv, vv, dims, mask, Some(&mut lse)), &shape);
    let state = || State {
        views,
        out: out.clone(),
        lse,
        keys: mask.owned(),
        dims,
    };
    Some(from_ad(record(Attention, [&q, &k, &v], out.clone(), state)))
}

/// The sizes of one attention call (the CPU's and the GPU backends' kernels).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub keys: usize,
    pub d: usize,
}

impl Dims {
    pub fn of<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> Self {
        Self::new(q.dims(), k.dims())
    }

    /// From the shapes of q `[batch, seq, heads, d]` and k `[batch, kv_heads, keys, d]`.
    pub fn new([batch, seq, heads, d]: [usize; 4], [_, kv_heads, keys, _]: [usize; 4]) -> Self {
        Self {
            batch,
            seq,
            heads,
            kv_heads,
            keys,
            d,
        }
    }
}

/// The attention output `[batch, seq, heads * d]`, row-major; with `lse` (`[batch, heads, seq]`)
/// also each query row's log-sum-exp of its visible scores (what a backward pass needs to
/// recompute the probabilities).
fn forward(
    q: &View,
    k: &View,
    v: &View,
    dims: Dims,
    mask: KeyMask,
    lse: Option<&mut [f32]>,
) -> Vec<f32> {
    let Dims {
        batch,
        seq,
        heads,
        kv_heads,
        keys,
        d,
    } = dims;
    let start = keys - seq;
    let rep = heads / kv_heads;
    let blocks = seq.div_ceil(BLOCK);
    let mut out = vec![0f32; batch * seq * heads * d];
    let dst = SharedOut(out.as_mut_ptr());
    let lse = lse.map(|l| SharedOut(l.as_mut_ptr()));
    (0..batch * kv_heads * blocks)
        .into_par_iter()
        .for_each_init(ForwardScratch::default, |s: &mut ForwardScratch, task| {
            let (b, g, r0) = (
                task / (kv_heads * blocks),
                task / blocks % kv_heads,
                task % blocks * BLOCK,
            );
            let rows = BLOCK.min(seq - r0);
            let seen = start + r0 + rows;
            // Keys before the block's first segment start are seen by none of its queries.
            let lo = mask.first(b, keys, start + r0);
            let width = seen - lo;
            queries(q, b, g * rep..(g + 1) * rep, r0..r0 + rows, &mut s.queries);
            let m = rep * rows;
            resize_for_gemm(&mut s.scores, m * width);
            resize_for_gemm(&mut s.values, m * d);
            let pad = mask.padding(b, keys, seen);
            // SAFETY: the views bound every index used here; the scratch buffers have the
            // sizes given to gemm.
            unsafe {
                gemm(
                    [m, width, d],
                    (s.scores.as_mut_ptr(), 1, width as isize),
                    (s.queries.as_ptr(), 1, d as isize),
                    (k.at(&[b, g, lo, 0]), k.strides[2], k.strides[3]),
                    Write::Set(1.0),
                );
            }
            s.inv_sums.clear();
            for (row, scores) in s.scores.chunks_exact_mut(width).enumerate() {
                let i = start + r0 + row % rows;
                let from = mask.first(b, keys, i) - lo;
                let (hidden, scores) = scores.split_at_mut(from);
                hidden.fill(0.0);
                let (max, inv) = softmax_row(scores, i + 1 - lo - from, pad);
                s.inv_sums.push(inv);
                if let Some(lse) = &lse {
                    let (h, i) = (g * rep + row / rows, r0 + row % rows);
                    // SAFETY: (b, h, i) is inside `lse`, written by this task only.
                    unsafe { *lse.at((b * heads + h) * seq + i) = max - inv.ln() };
                }
            }
            // SAFETY: as above.
            unsafe {
                gemm(
                    [m, d, width],
                    (s.values.as_mut_ptr(), 1, d as isize),
                    (s.scores.as_ptr(), 1, width as isize),
                    (v.at(&[b, g, lo, 0]), v.strides[3], v.strides[2]),
                    Write::Set(1.0),
                );
            }
            for (row, (vals, inv)) in s.values.chunks_exact(d).zip(&s.inv_sums).enumerate() {
                let (h, i) = (g * rep + row / rows, r0 + row % rows);
                // SAFETY: (b, i, h) is inside the output, and only this task writes the
                // rows of its block for the heads of KV head `g`.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(dst.at(((b * seq + i) * heads + h) * d), d)
                };
                for (o, &x) in out.iter_mut().zip(vals) {
                    *o = x * inv;
                }
            }
        });
    out
}

/// Gathers the query rows `rows` of heads `heads` of batch row `b` from `q [batch, seq, heads,
/// d]` into `dst`, head-major: `[heads.len() * rows.len(), d]`.
fn queries(
    q: &View,
    b: usize,
    heads: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    dst: &mut Vec<f32>,
) {
    let d = q.dims[3];
    dst.clear();
    for h in heads {
        for i in rows.clone() {
            let row = q.at(&[b, i, h, 0]);
            // SAFETY: (b, i, h, j) lies inside `q`.
            let at = |j: usize| unsafe { *row.offset(j as isize * q.strides[3]) };
            dst.extend((0..d).map(at));
        }
    }
}

/// Per-thread buffers of the forward tasks.
#[derive(Default)]
struct ForwardScratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    values: Vec<f32>,
    inv_sums: Vec<f32>,
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
    keys: Keys,
    dims: Dims,
}

/// Per-task buffers of the backward pass.
#[derive(Default)]
struct BackwardScratch {
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
        let g = upstream(&ops, grads);
        let st = &ops.state;
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
            .for_each_init(BackwardScratch::default, |s, task| {
                let (b, kh) = (task / kv_heads, task % kv_heads);
                let group = kh * rep..(kh + 1) * rep;
                // Only this task touches the (b, kh) blocks of dK and dV.
                let (dk, dv) = (dk_out.at(task * keys * d), dv_out.at(task * keys * d));
                let mask = st.keys.mask();
                for r0 in (0..seq).step_by(BLOCK) {
                    let rows = BLOCK.min(seq - r0);
                    let (seen, m) = (start + r0 + rows, rep * rows);
                    // As in the forward pass: only keys lo..seen are seen by the block.
                    let lo = mask.first(b, keys, start + r0);
                    let width = seen - lo;
                    let pad = mask.padding(b, keys, seen);
                    let (kp, vp) = (k.at(&[b, kh, lo, 0]), v.at(&[b, kh, lo, 0]));
                    // SAFETY: rows lo..seen of this task's block of dK and dV.
                    let (dk, dv) = unsafe { (dk.add(lo * d), dv.add(lo * d)) };
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
                    resize_for_gemm(&mut s.probs, m * width);
                    resize_for_gemm(&mut s.d_scores, m * width);
                    resize_for_gemm(&mut s.d_q, m * d);
                    let (ks, vs) = ((k.strides[2], k.strides[3]), (v.strides[2], v.strides[3]));
                    // SAFETY (every gemm): the views bound K and V, the scratch buffers have
                    // the sizes given, and dK, dV rows lo..seen lie in this task's block.
                    unsafe {
                        gemm(
                            [m, width, d],
                            (s.probs.as_mut_ptr(), 1, width as isize),
                            (s.q.as_ptr(), 1, d as isize),
                            (kp, ks.0, ks.1),
                            Write::Set(1.0),
                        );
                    }
                    for (row, p) in s.probs.chunks_exact_mut(width).enumerate() {
                        let (h, i) = (group.start + row / rows, r0 + row % rows);
                        let lse = st.lse[(b * heads + h) * seq + i];
                        let from = mask.first(b, keys, start + i) - lo;
                        let (hidden, p) = p.split_at_mut(from);
                        hidden.fill(0.0);
                        probs_row(p, start + i + 1 - lo - from, pad, lse);
                    }
                    unsafe {
                        // dV += P^T dO
                        gemm(
                            [width, d, m],
                            (dv, 1, d as isize),
                            (s.probs.as_ptr(), width as isize, 1),
                            (s.d_out.as_ptr(), 1, d as isize),
                            Write::Add(1.0),
                        );
                        // dP = dO V^T
                        gemm(
                            [m, width, d],
                            (s.d_scores.as_mut_ptr(), 1, width as isize),
                            (s.d_out.as_ptr(), 1, d as isize),
                            (vp, vs.0, vs.1),
                            Write::Set(1.0),
                        );
                    }
                    // dS = P (dP - delta)
                    for ((ds, p), delta) in s
                        .d_scores
                        .chunks_exact_mut(width)
                        .zip(s.probs.chunks_exact(width))
                        .zip(&s.delta)
                    {
                        for (x, &p) in ds.iter_mut().zip(p) {
                            *x = p * (*x - delta);
                        }
                    }
                    unsafe {
                        // dQ = dS K
                        gemm(
                            [m, d, width],
                            (s.d_q.as_mut_ptr(), 1, d as isize),
                            (s.d_scores.as_ptr(), 1, width as isize),
                            (kp, ks.1, ks.0),
                            Write::Set(1.0),
                        );
                        // dK += dS^T Q
                        gemm(
                            [width, d, m],
                            (dk, 1, d as isize),
                            (s.d_scores.as_ptr(), width as isize, 1),
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
        give(&ops, 0, grads, dq, &[batch, seq, heads, d]);
        give(&ops, 1, grads, dk, &[batch, kv_heads, keys, d]);
        give(&ops, 2, grads, dv, &[batch, kv_heads, keys, d]);
    }
}
