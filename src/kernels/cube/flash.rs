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

/// Beyond any real score: the running maximum starts at its negative, and a row that sees no
/// key gets it as log-sum-exp (its probabilities then come out 0).
const CEILING: f32 = 1.0e30;

/// The key entry a query at key position `pos` of row `b` sees: its own, padding as 0.
#[cube]
fn query_entry<I: Int>(keys: &Tensor<I>, b: usize, pos: usize) -> I {
    I::max(keys[b * keys.stride(0) + pos * keys.stride(1)], I::new(0))
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

/// Offset of element `[b, i, h, 0]` of `t`.
#[cube]
fn at<F: Float>(t: &Tensor<F>, b: usize, i: usize, h: usize) -> usize {
    b * t.stride(0) + i * t.stride(1) + h * t.stride(2)
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
    let i = ABSOLUTE_POS % seq;
    let h = (ABSOLUTE_POS / seq) % heads;
    let b = ABSOLUTE_POS / (seq * heads);
    let kvh = h / group;
    let pos = k.shape(2) - seq + i;
    let own = query_entry::<I>(keys, b, pos);

    let qrow = load::<F>(q, at::<F>(q, b, i, h), d);
    let mut acc = Array::<f32>::new(d);
    for x in 0..d {
        acc[x] = 0.0;
    }
    let mut m = f32::new(-CEILING);
    let mut l = f32::new(0.0);
    let vstep = v.stride(3);
    for j in 0..pos + 1 {
        if keys[b * keys.stride(0) + j * keys.stride(1)] == own {
            let s = dot::<F>(
                &qrow,
                k,
                b * k.stride(0) + kvh * k.stride(1) + j * k.stride(2),
                d,
            );
            let top = f32::max(m, s);
            let c = f32::exp(m - top);
            let p = f32::exp(s - top);
            l = l * c + p;
            let vo = b * v.stride(0) + kvh * v.stride(1) + j * v.stride(2);
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
    let i = ABSOLUTE_POS % seq;
    let h = (ABSOLUTE_POS / seq) % heads;
    let b = ABSOLUTE_POS / (seq * heads);
    let kvh = h / group;
    let pos = k.shape(2) - seq + i;
    let own = query_entry::<I>(keys, b, pos);

    let qrow = load::<F>(q, at::<F>(q, b, i, h), d);
    let grow = load::<F>(dout, at::<F>(dout, b, i, h), d);
    let dl = dot::<F>(&grow, out, at::<F>(out, b, i, h), d);
    let li = (b * heads + h) * seq + i;
    delta[li] = dl;
    let row_lse = lse[li];
    let mut acc = Array::<f32>::new(d);
    for x in 0..d {
        acc[x] = 0.0;
    }
    let kstep = k.stride(3);
    for j in 0..pos + 1 {
        if keys[b * keys.stride(0) + j * keys.stride(1)] == own {
            let ko = b * k.stride(0) + kvh * k.stride(1) + j * k.stride(2);
            let p = f32::exp(dot::<F>(&qrow, k, ko, d) - row_lse);
            let dp = dot::<F>(
                &grow,
                v,
                b * v.stride(0) + kvh * v.stride(1) + j * v.stride(2),
                d,
            );
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
    let j = ABSOLUTE_POS % total;
    let kvh = (ABSOLUTE_POS / total) % kv_heads;
    let b = ABSOLUTE_POS / (total * kv_heads);
    let (seq, heads) = (q.shape(1), q.shape(2));
    let start = total - seq;
    let entry = keys[b * keys.stride(0) + j * keys.stride(1)];

    let krow = load::<F>(k, b * k.stride(0) + kvh * k.stride(1) + j * k.stride(2), d);
    let vrow = load::<F>(v, b * v.stride(0) + kvh * v.stride(1) + j * v.stride(2), d);
    let mut gk = Array::<f32>::new(d);
    let mut gv = Array::<f32>::new(d);
    for x in 0..d {
        gk[x] = 0.0;
        gv[x] = 0.0;
    }
    let first = usize::max(j, start) - start;
    let (qstep, gstep) = (q.stride(3), dout.stride(3));
    for g in 0..group {
        let h = kvh * group + g;
        for i in first..seq {
            if query_entry::<I>(keys, b, start + i) == entry {
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
    let ko = b * dk.stride(0) + kvh * dk.stride(1) + j * dk.stride(2);
    let vo = b * dv.stride(0) + kvh * dv.stride(1) + j * dv.stride(2);
    let (kstep, vstep) = (dk.stride(3), dv.stride(3));
    for x in 0..d {
        dk[ko + x * kstep] = F::cast_from(gk[x]);
        dv[vo + x * vstep] = F::cast_from(gv[x]);
    }
}

/// The sizes of one call: `q` `[batch, seq, heads, d]`, `k` `[batch, kv_heads, keys, d]`.
struct Sizes {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    keys: usize,
    d: usize,
}

impl Sizes {
    fn of<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>) -> Self {
        let ([batch, seq, heads, d], [_, kv_heads, keys, _]) = (dims(q), dims(k));
        Self {
            batch,
            seq,
            heads,
            kv_heads,
            keys,
            d,
        }
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
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
    let n = Sizes::of(&q, &k);
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
        n.group(),
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
    let n = Sizes::of(&q, &k);
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
        n.group(),
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
        n.group(),
        dtypes,
    );
    [dq, dk, dv]
}
