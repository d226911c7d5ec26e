//! Fused causal attention for burn's Flex CPU backend (inference in f32).
//!
//! The generic path of [`super::attention`] builds scores, an additive mask and the softmax as
//! separate tensors and computes its exponentials one at a time. Here every (batch row, KV head,
//! block of queries) is one rayon task: the scores of the block's queries of every head sharing
//! that KV head against the keys the block can see (one gemm), the causal and padding mask and
//! the softmax's exponentials in place with a vectorised exp, then x V (a second gemm),
//! normalised on the way into the `[batch, seq, heads * head_dim]` layout that o_proj reads.
//! Training (autodiff over Flex) runs the same forward pass through [`super::flash_grad`]; other
//! backends and other dtypes take the generic path.

use super::flex::{from_vec, gemm, resize_for_gemm, SharedOut, View, Write};
use super::simd::softmax_row;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

/// Queries per task.
pub(super) const BLOCK: usize = 64;

/// Causal attention of queries at the last `seq` of `keys` positions.
///
/// # Shapes
/// - `q`: `[batch, seq, heads, head_dim]`, rotated and already scaled by `1/sqrt(head_dim)`
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]`
/// - `padding`: `batch * keys` flags, true where a key is padding
/// - returns `[batch, seq, heads * head_dim]`, or `None` when `B` is not Flex (see
///   [`super::flex::supported`])
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<&[bool]>,
) -> Option<Tensor<B, 3>> {
    if !super::flex::supported::<B>(q.dtype()) {
        return super::flash_grad::attention(q, k, v, padding);
    }
    let dims = Dims::of(&q, &k);
    let (q, k, v) = (View::of(q)?, View::of(k)?, View::of(v)?);
    let out = forward(&q, &k, &v, dims, padding, None);
    Some(from_vec(out, [dims.batch, dims.seq, dims.heads * dims.d]))
}

/// The sizes of one attention call.
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
        let [batch, seq, heads, d] = q.dims();
        let [_, kv_heads, keys, _] = k.dims();
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
pub(super) fn forward(
    q: &View,
    k: &View,
    v: &View,
    dims: Dims,
    padding: Option<&[bool]>,
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
        .for_each_init(Scratch::default, |s: &mut Scratch, task| {
            let (b, g, r0) = (
                task / (kv_heads * blocks),
                task / blocks % kv_heads,
                task % blocks * BLOCK,
            );
            let rows = BLOCK.min(seq - r0);
            let seen = start + r0 + rows;
            queries(q, b, g * rep..(g + 1) * rep, r0..r0 + rows, &mut s.queries);
            let m = rep * rows;
            resize_for_gemm(&mut s.scores, m * seen);
            resize_for_gemm(&mut s.values, m * d);
            let pad = padding.map(|p| &p[b * keys..b * keys + seen]);
            // SAFETY: the views bound every index used here; the scratch buffers have the
            // sizes given to gemm.
            unsafe {
                gemm(
                    [m, seen, d],
                    (s.scores.as_mut_ptr(), 1, seen as isize),
                    (s.queries.as_ptr(), 1, d as isize),
                    (k.at(&[b, g, 0, 0]), k.strides[2], k.strides[3]),
                    Write::Set(1.0),
                );
            }
            s.inv_sums.clear();
            for (row, scores) in s.scores.chunks_exact_mut(seen).enumerate() {
                let visible = start + r0 + row % rows + 1;
                let (max, inv) = softmax_row(scores, visible, pad);
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
                    [m, d, seen],
                    (s.values.as_mut_ptr(), 1, d as isize),
                    (s.scores.as_ptr(), 1, seen as isize),
                    (v.at(&[b, g, 0, 0]), v.strides[3], v.strides[2]),
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
pub(super) fn queries(
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

/// Per-thread buffers of the attention tasks.
#[derive(Default)]
struct Scratch {
    queries: Vec<f32>,
    scores: Vec<f32>,
    values: Vec<f32>,
    inv_sums: Vec<f32>,
}
