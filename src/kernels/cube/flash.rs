//! Fused causal attention as cubecl kernels (CUDA, wgpu), forward and backward, in the
//! FlashAttention-2 formulation: the forward pass keeps each query row's log-sum-exp instead of
//! its probabilities; the backward pass recomputes them from it.
//!
//! One unit of work per query row (forward, dQ) or per key row (dK, dV), each running over the
//! keys or queries it pairs with in f32, whatever the inputs' float type: an online softmax
//! (running maximum and sum, the output rescaled as the maximum grows) in the forward pass;
//! `D = rowsum(dO o O)` then `dS = P (dO V^T - D)` and `dQ = dS K` in the first backward kernel;
//! `dV = P^T dO` and `dK = dS^T Q` in the second, summed over the query heads that share the KV
//! head (grouped-query attention without repeating K or V). Nothing of size `[seq, seq]` is
//! stored: memory is the inputs, the output and one f32 per query row and head.
//!
//! Which keys a query sees: every key up to its own position whose entry in `keys`
//! (`[batch, key positions]`, one integer per key) equals the query's own entry, with a negative
//! entry (padding) never seen and a padding query seeing the entries 0: causal rows are all 0,
//! right-padded rows 0 with -1 on padding, packed rows the index of each sequence's first key.
//!
//! Every tensor is read through its strides (the K and V the model passes are transposed views).

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
    CubeRuntime,
};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use crate::kernels::attention::Dims;

/// Beyond any real score: the running maximum starts at its negative, and a row that sees no
/// key gets it as log-sum-exp (its probabilities then come out 0).
const CEILING: f32 = 1.0e30;

/// The entry of key position `j` of row `b`.
#[cube]
fn entry<I: Int>(keys: &Tensor<I>, b: usize, j: usize) -> I {
    keys[b * keys.stride(0) + j * keys.stride(1)]
}

/// The key entry a query at key position `pos` of row `b` sees: its own, padding as 0.
#[cube]
fn query_entry<I: Int>(keys: &Tensor<I>, b: usize, pos: usize) -> I {
    I::max(entry::<I>(keys, b, pos), I::new(0))
}

/// Unit `ABSOLUTE_POS` of a `[outer, middle, inner]` grid as `(outer, middle, inner)`.
#[cube]
fn unit(middle: usize, inner: usize) -> (usize, usize, usize) {
    (
        ABSOLUTE_POS / (inner * middle),
        (ABSOLUTE_POS / inner) % middle,
        ABSOLUTE_POS % inner,
    )
}

/// `d` zeros.
#[cube]
fn zeros(#[comptime] d: usize) -> Array<f32> {
    let mut row = Array::<f32>::new(d);
    for x in 0..d {
        row[x] = 0.0;
    }
    row
}

#[cube]
fn dot<F: Float>(row: &Array<f32>, t: &Tensor<F>, offset: usize, #[comptime] d: usize) -> f32 {
    let step = t.stride(3);
    let mut s = f32::new(0.0);
    for x in 0..d {
        s += row[x] * f32::cast_from(t[offset + x * step]);
    }
    s
}

/// Loads `d` elements of `t` from `offset` (stride `t.stride(3)`) as f32.
#[cube]
fn load<F: Float>(t: &Tensor<F>, offset: usize, #[comptime] d: usize) -> Array<f32> {
    let step = t.stride(3);
    let mut row = Array::<f32>::new(d);
    for x in 0..d {
        row[x] = f32::cast_from(t[offset + x * step]);
    }
    row
}

/// Offset of element `[a, b, c, 0]` of `t` (a row of q, dO, dQ `[batch, seq, heads, d]` or of
/// K, V, dK, dV `[batch, kv_heads, keys, d]`).
#[cube]
fn at<F: Float>(t: &Tensor<F>, a: usize, b: usize, c: usize) -> usize {
    a * t.stride(0) + b * t.stride(1) + c * t.stride(2)
}

/// Forward pass, one unit per (batch row, head, query): `out` `[batch, seq, heads, d]` and the
/// row's log-sum-exp in `lse` (`[batch, heads, seq]`; +1e30 for a row that sees no key, whose
/// output is 0).
#[cube(launch)]
fn forward_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<I>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    #[comptime] d: usize,
    #[comptime] group: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (batch, seq, heads) = (q.shape(0), q.shape(1), q.shape(2));
    if ABSOLUTE_POS >= batch * heads * seq {
        terminate!();
    }
    let (b, h, i) = unit(heads, seq);
    let kvh = h / group;
    let pos = k.shape(2) - seq + i;
    let own = query_entry::<I>(keys, b, pos);

    let qrow = load::<F>(q, at::<F>(q, b, i, h), d);
    let mut acc = zeros(d);
    let mut m = f32::new(-CEILING);
    let mut l = f32::new(0.0);
    let vstep = v.stride(3);
    for j in 0..pos + 1 {
        if entry::<I>(keys, b, j) == own {
            let s = dot::<F>(&qrow, k, at::<F>(k, b, kvh, j), d);
            let top = f32::max(m, s);
            let c = f32::exp(m - top);
            let p = f32::exp(s - top);
            l = l * c + p;
            let vo = at::<F>(v, b, kvh, j);
            for x in 0..d {
                acc[x] = acc[x] * c + p * f32::cast_from(v[vo + x * vstep]);
            }
            m = top;
        }
    }
    let oo = at::<F>(out, b, i, h);
    let ostep = out.stride(3);
    let li = (b * heads + h) * seq + i;
    if l > 0.0 {
        for x in 0..d {
            out[oo + x * ostep] = F::cast_from(acc[x] / l);
        }
        lse[li] = m + f32::ln(l);
    } else {
        for x in 0..d {
            out[oo + x * ostep] = F::new(0.0);
        }
        lse[li] = f32::new(CEILING);
    }
}

/// First backward kernel, one unit per (batch row, head, query): `delta = rowsum(dO o O)` into
/// `delta` (`[batch, heads, seq]`), then dQ.
#[cube(launch)]
fn backward_q_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<I>,
    out: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &mut Tensor<f32>,
    dq: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] group: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (batch, seq, heads) = (q.shape(0), q.shape(1), q.shape(2));
    if ABSOLUTE_POS >= batch * heads * seq {
        terminate!();
    }
    let (b, h, i) = unit(heads, seq);
    let kvh = h / group;
    let pos = k.shape(2) - seq + i;
    let own = query_entry::<I>(keys, b, pos);

    let qrow = load::<F>(q, at::<F>(q, b, i, h), d);
    let grow = load::<F>(dout, at::<F>(dout, b, i, h), d);
    let dl = dot::<F>(&grow, out, at::<F>(out, b, i, h), d);
    let li = (b * heads + h) * seq + i;
    delta[li] = dl;
    let row_lse = lse[li];
    let mut acc = zeros(d);
    let kstep = k.stride(3);
    for j in 0..pos + 1 {
        if entry::<I>(keys, b, j) == own {
            let ko = at::<F>(k, b, kvh, j);
            let p = f32::exp(dot::<F>(&qrow, k, ko, d) - row_lse);
            let dp = dot::<F>(&grow, v, at::<F>(v, b, kvh, j), d);
            let ds = p * (dp - dl);
            for x in 0..d {
                acc[x] += ds * f32::cast_from(k[ko + x * kstep]);
            }
        }
    }
    let qo = at::<F>(dq, b, i, h);
    let qstep = dq.stride(3);
    for x in 0..d {
        dq[qo + x * qstep] = F::cast_from(acc[x]);
    }
}

/// Second backward kernel, one unit per (batch row, KV head, key): dK and dV over every query
/// of the heads sharing the KV head that sees the key.
#[cube(launch)]
fn backward_kv_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    keys: &Tensor<I>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] group: usize,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let (batch, kv_heads, total) = (k.shape(0), k.shape(1), k.shape(2));
    if ABSOLUTE_POS >= batch * kv_heads * total {
        terminate!();
    }
    let (b, kvh, j) = unit(kv_heads, total);
    let (seq, heads) = (q.shape(1), q.shape(2));
    let start = total - seq;
    let seen = entry::<I>(keys, b, j);

    let krow = load::<F>(k, at::<F>(k, b, kvh, j), d);
    let vrow = load::<F>(v, at::<F>(v, b, kvh, j), d);
    let mut gk = zeros(d);
    let mut gv = zeros(d);
    let first = usize::max(j, start) - start;
    let (qstep, gstep) = (q.stride(3), dout.stride(3));
    for g in 0..group {
        let h = kvh * group + g;
        for i in first..seq {
            if query_entry::<I>(keys, b, start + i) == seen {
                let qo = at::<F>(q, b, i, h);
                let go = at::<F>(dout, b, i, h);
                let li = (b * heads + h) * seq + i;
                let p = f32::exp(dot::<F>(&krow, q, qo, d) - lse[li]);
                let ds = p * (dot::<F>(&vrow, dout, go, d) - delta[li]);
                for x in 0..d {
                    gv[x] += p * f32::cast_from(dout[go + x * gstep]);
                    gk[x] += ds * f32::cast_from(q[qo + x * qstep]);
                }
            }
        }
    }
    let ko = at::<F>(dk, b, kvh, j);
    let vo = at::<F>(dv, b, kvh, j);
    let (kstep, vstep) = (dk.stride(3), dv.stride(3));
    for x in 0..d {
        dk[ko + x * kstep] = F::cast_from(gk[x]);
        dv[vo + x * vstep] = F::cast_from(gv[x]);
    }
}

fn dims<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 4] {
    let s = t.meta.shape();
    [s[0], s[1], s[2], s[3]]
}

fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape),
        dtype,
    )
}

/// Launch geometry for `units` units of work.
fn grid<R: CubeRuntime>(t: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, units);
    (calculate_cube_count_elemwise(&t.client, units, dim), dim)
}

/// The forward pass: `out` `[batch, seq, heads, d]` (q's dtype) and the log-sum-exps
/// `[batch, heads, seq]` (f32). `q` rotated and scaled, `k` and `v` `[batch, kv_heads, keys, d]`,
/// `keys` `[batch, keys]` (see the module docs).
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    keys: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let n = Dims::new(dims(&q), dims(&k));
    let out = empty(&q, vec![n.batch, n.seq, n.heads, n.d], q.dtype);
    let lse = empty(&q, vec![n.batch, n.heads, n.seq], DType::F32);
    let (count, dim) = grid(&q, n.batch * n.heads * n.seq);
    let dtypes = [q.dtype.into(), keys.dtype.into()];
    forward_kernel::launch::<R>(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        keys.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        n.d,
        n.heads / n.kv_heads,
        dtypes,
    );
    (out, lse)
}

/// The backward pass: `(dq, dk, dv)` in the shapes of `q`, `k` and `v`, from the forward pass's
/// inputs, its `out` and `lse`, and the gradient `dout` of `out`.
#[allow(clippy::too_many_arguments)]
pub fn backward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    keys: CubeTensor<R>,
    out: CubeTensor<R>,
    lse: CubeTensor<R>,
    dout: CubeTensor<R>,
) -> [CubeTensor<R>; 3] {
    let n = Dims::new(dims(&q), dims(&k));
    let dout = into_contiguous(dout);
    let dq = empty(&q, vec![n.batch, n.seq, n.heads, n.d], q.dtype);
    let dk = empty(&k, vec![n.batch, n.kv_heads, n.keys, n.d], k.dtype);
    let dv = empty(&v, vec![n.batch, n.kv_heads, n.keys, n.d], v.dtype);
    let delta = empty(&q, vec![n.batch, n.heads, n.seq], DType::F32);
    let client = q.client.clone();
    let dtypes = [q.dtype.into(), keys.dtype.into()];
    let (count, dim) = grid(&q, n.batch * n.heads * n.seq);
    backward_q_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        keys.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        dout.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        n.d,
        n.heads / n.kv_heads,
        dtypes,
    );
    let (count, dim) = grid(&k, n.batch * n.kv_heads * n.keys);
    backward_kv_kernel::launch::<R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        keys.into_tensor_arg(),
        dout.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        n.d,
        n.heads / n.kv_heads,
        dtypes,
    );
    [dq, dk, dv]
}
