//! Row-wise kernels on the CPU (Flex, f32): SwiGLU's product, RMSNorm and the rotary embedding,
//! for inference and, for training, as one autodiff node each with a hand-written backward pass
//! over rows in parallel (burn's generic ops take half a dozen element-wise passes and buffers
//! for each, with a scalar exp in the sigmoid); and the log-sum-exp of logit rows for inference.
//! The norm's weight is frozen: it gets no gradient.

use super::flex::{
    dense, elems, flex_data, flex_tensor, from_ad, from_vec, give, inference, record, to_ad,
    training, upstream, View,
};
use super::simd::{
    logsumexp_row, rms_norm_grad_row, rms_norm_row, rope_rows, silu_mul_grad_slice, silu_mul_slice,
};
use burn::backend::autodiff::{
    checkpoint::base::Checkpointer,
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// `log(sum(exp(row)))` of every row of `[rows, cols]` logits -> `[rows, 1]`, for inference.
pub fn logsumexp<B: Backend>(logits: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !inference::<B>(logits.dtype()) {
        return None;
    }
    let [rows, cols] = logits.dims();
    let t = View::of(logits.clone())?;
    let data = t.contiguous()?;
    let out: Vec<f32> = data
        .par_chunks_exact(cols)
        .with_min_len(4)
        .map(logsumexp_row)
        .collect();
    Some(from_vec(out, [rows, 1]))
}

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// SwiGLU's `silu(gate) * up` for two tensors of the same shape; also for inference on Flex.
pub fn silu_mul<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let dims = gate.dims();
    if up.dtype() != DType::F32 {
        return None;
    }
    if inference::<B>(gate.dtype()) {
        let (g, u) = (flex_data(gate), flex_data(up));
        return Some(from_vec(silu_mul_all(elems(&g), elems(&u)), dims));
    }
    if !training::<B>(gate.dtype()) {
        return None;
    }
    let (gate, up) = (to_ad(gate.clone()), to_ad(up.clone()));
    let (g, u) = (dense(gate.primitive.clone()), dense(up.primitive.clone()));
    let out = flex_tensor(silu_mul_all(elems(&g), elems(&u)), &dims);
    Some(from_ad(record(SiluMul, [&gate, &up], out, || (g, u))))
}

/// `silu(gate) * up` of two buffers, in parallel.
fn silu_mul_all(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| silu_mul_slice(o, g, u));
    out
}

#[derive(Debug)]
struct SiluMul;

impl Backward<Flex, 2> for SiluMul {
    /// gate and up.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d = upstream(&ops, grads);
        let (g, u) = &ops.state;
        let n = elems(g).len();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(elems(&d).par_chunks(CHUNK))
            .zip(elems(g).par_chunks(CHUNK).zip(elems(u).par_chunks(CHUNK)))
            .for_each(|(((dg, du), d), (g, u))| silu_mul_grad_slice(dg, du, d, g, u));
        let dims = g.layout().shape().to_vec();
        give(&ops, 0, grads, dg, &dims);
        give(&ops, 1, grads, du, &dims);
    }
}

/// RMSNorm of the last dimension, `x w / sqrt(mean(x^2) + eps)`; also for inference on Flex.
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 1>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let dims = x.dims();
    if weight.dtype() != DType::F32 {
        return None;
    }
    if inference::<B>(x.dtype()) {
        let (xs, w) = (flex_data(x), flex_data(weight));
        let (out, _) = normalise(elems(&xs), elems(&w), eps);
        return Some(from_vec(out, dims));
    }
    if !training::<B>(x.dtype()) {
        return None;
    }
    let x = to_ad(x.clone());
    let (xs, w) = (
        dense(x.primitive.clone()),
        dense(to_ad(weight.clone()).primitive),
    );
    let (out, inv_rms) = normalise(elems(&xs), elems(&w), eps);
    let out = flex_tensor(out, &dims);
    Some(from_ad(record(Norm, [&x], out, || NormState {
        x: xs,
        w,
        inv_rms,
    })))
}

/// [`rms_norm_row`] over every row of `x` in parallel: the output and each row's `1 / rms`.
fn normalise(x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    let inv_rms = out
        .par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(16)
        .map(|(o, x)| rms_norm_row(o, x, w, eps as f32))
        .collect();
    (out, inv_rms)
}

#[derive(Debug)]
struct Norm;

#[derive(Debug, Clone)]
struct NormState {
    x: FlexTensor,
    w: FlexTensor,
    inv_rms: Vec<f32>,
}

impl Backward<Flex, 1> for Norm {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = upstream(&ops, grads);
        let s = &ops.state;
        let (x, w) = (elems(&s.x), elems(&s.w));
        let n = w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n)
            .zip(elems(&dy).par_chunks(n))
            .zip(x.par_chunks(n).zip(&s.inv_rms))
            .with_min_len(16)
            .for_each(|((dx, dy), (x, &r))| rms_norm_grad_row(dx, dy, x, w, r));
        let dims = s.x.layout().shape().to_vec();
        give(&ops, 0, grads, dx, &dims);
    }
}

/// Rotary embedding of `x [batch, seq, heads, d]` with tables `[1, seq * heads * d]` (shared by
/// every batch row) or `[batch, seq * heads * d]` (per row), times `scale`; also for inference
/// on Flex.
pub fn rope<B: Backend>(
    x: &Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    scale: f32,
) -> Option<Tensor<B, 4>> {
    let dims = x.dims();
    let row = dims[1] * dims[2] * dims[3];
    if inference::<B>(x.dtype()) && cos.dtype() == DType::F32 {
        let (x, c, s) = (flex_data(x), flex_data(cos), flex_data(sin));
        let out = rotate(
            elems(&x),
            [elems(&c), elems(&s)],
            row,
            dims[3],
            scale,
            false,
        );
        return Some(from_vec(out, dims));
    }
    if !training::<B>(x.dtype()) || cos.dtype() != DType::F32 {
        return None;
    }
    let x = to_ad(x.clone());
    let xs = dense(x.primitive.clone());
    let [c, s] = [cos, sin].map(|t| dense(to_ad(t.clone()).primitive));
    let out = rotate(
        elems(&xs),
        [elems(&c), elems(&s)],
        row,
        dims[3],
        scale,
        false,
    );
    let out = flex_tensor(out, &dims);
    Some(from_ad(record(Rotary, [&x], out, || (c, s, scale))))
}

/// [`rope_rows`] over every batch row (`row` elements) in parallel: the tables cover one batch
/// row (shared by all) or every batch row (packed rows, each with its own positions).
fn rotate(
    x: &[f32],
    tables: [&[f32]; 2],
    row: usize,
    d: usize,
    scale: f32,
    transpose: bool,
) -> Vec<f32> {
    let [cos, sin] = tables;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .for_each(|(b, (o, x))| {
            let at = b * row % cos.len();
            let (c, s) = (&cos[at..at + row], &sin[at..at + row]);
            rope_rows(o, x, c, s, d, scale, transpose)
        });
    out
}

#[derive(Debug)]
struct Rotary;

impl Backward<Flex, 1> for Rotary {
    /// cos, sin, scale.
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = upstream(&ops, grads);
        let (c, s, scale) = &ops.state;
        let d = dy.layout().shape().to_vec();
        let row = d[1] * d[2] * d[3];
        let dx = rotate(elems(&dy), [elems(c), elems(s)], row, d[3], *scale, true);
        give(&ops, 0, grads, dx, &d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::tensor::{activation::silu, Distribution};

    type Ad = Autodiff<Flex>;

    fn max_diff(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    fn uniform(dims: [usize; 3]) -> Tensor<Ad, 3> {
        Tensor::random(dims, Distribution::Uniform(-3.0, 3.0), &Default::default())
    }

    #[test]
    fn silu_mul_matches_generic_ops() {
        let dims = [3, 50, 70];
        let (g, u, c) = (
            uniform(dims).require_grad(),
            uniform(dims).require_grad(),
            uniform(dims),
        );
        let grads = |y: Tensor<Ad, 3>| {
            let gr = (y.clone() * c.clone()).sum().backward();
            (y.inner(), g.grad(&gr).unwrap(), u.grad(&gr).unwrap())
        };
        let (y, dg, du) = grads(silu_mul(&g, &u).expect("Autodiff<Flex>, f32"));
        let (wy, wdg, wdu) = grads(silu(g.clone()) * u.clone());
        assert!(max_diff(y, wy) < 1e-5);
        assert!(max_diff(dg, wdg) < 1e-4);
        assert!(max_diff(du, wdu) < 1e-5);
    }

    #[test]
    fn rms_norm_matches_generic_ops() {
        let dims = [2, 30, 96];
        let (x, c) = (uniform(dims).require_grad(), uniform(dims));
        let w: Tensor<Ad, 1> =
            Tensor::random([96], Distribution::Uniform(0.5, 1.5), &Default::default());
        let grads = |y: Tensor<Ad, 3>| {
            let gr = (y.clone() * c.clone()).sum().backward();
            (y.inner(), x.grad(&gr).unwrap())
        };
        let (y, dx) = grads(rms_norm(&x, &w, 1e-6).expect("Autodiff<Flex>, f32"));
        let inv = x
            .clone()
            .powi_scalar(2)
            .mean_dim(2)
            .add_scalar(1e-6)
            .sqrt()
            .recip();
        let (wy, wdx) = grads(x.clone() * inv * w.clone().unsqueeze::<3>());
        assert!(max_diff(y, wy) < 1e-5);
        assert!(max_diff(dx, wdx) < 1e-4);
    }

    #[test]
    fn rope_matches_generic_ops() {
        let (dims, device) = ([2, 5, 3, 8], Default::default());
        // Rotary tables as the model builds them for positions 4..9: per position and head, the
        // angles of 4 frequencies, repeated for the two halves.
        let angles: Vec<f32> = (4..9)
            .flat_map(|p| {
                (0..3 * 2).flat_map(move |_| (0..4).map(move |f| p as f32 / 7f32.powi(f)))
            })
            .collect();
        let table = |f: fn(f32) -> f32| -> Tensor<Ad, 2> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_data(burn::tensor::TensorData::new(v, [1, 5 * 3 * 8]), &device)
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let x: Tensor<Ad, 4> =
            Tensor::random(dims, Distribution::Uniform(-1.0, 1.0), &device).require_grad();
        let c: Tensor<Ad, 4> = Tensor::random(dims, Distribution::Uniform(-1.0, 1.0), &device);
        let grads = |y: Tensor<Ad, 4>| {
            let gr = (y.clone() * c.clone()).sum().backward();
            (
                y.inner().flatten::<3>(0, 1),
                x.grad(&gr).unwrap().flatten::<3>(0, 1),
            )
        };
        let (y, dx) = grads(rope(&x, &cos, &sin, 0.5).expect("Autodiff<Flex>, f32"));
        // The generic path of Rope::apply, spelled out: x @ rot is [-x2, x1].
        let [x1, x2] = [0, 4].map(|s| x.clone().narrow(3, s, 4));
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let [cos, sin] = [cos, sin].map(|t| t.reshape([1, 5, 3, 8]));
        let (wy, wdx) = grads((x.clone() * cos + rotated * sin).mul_scalar(0.5));
        assert!(max_diff(y, wy) < 1e-6);
        assert!(max_diff(dx, wdx) < 1e-6);
    }
}
