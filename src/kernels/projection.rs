//! Projections on the CPU (Flex, f32): `x W^T` for a Hugging Face weight `W [out, in]` as a gemm
//! split across threads by output columns for inference ([`matmul_t`]), and for training, with
//! or without a LoRA adapter, one autodiff node whose forward and backward passes run on that
//! gemm ([`linear`]).
//!
//! Through burn's generic ops a LoRA projection is a dozen graph nodes (the frozen matmul and its
//! transpose, a dropout mask drawn element by element, two low-rank matmuls, scalings, a sum),
//! each with its own buffers, and the matmuls run on a gemm whose threading suits these shapes
//! poorly. Here the frozen weight gets no gradient and no copy, the dropout mask is a hash of
//! (seed, index) that the backward pass regenerates instead of storing, and every product is a
//! gemm split across threads.

use super::flex::{
    dense, elems, flex_tensor, from_ad, from_vec, give, inference, record, to_ad, training,
    upstream, wants, View,
};
use super::gemm::{par_gemm, product, Operand, Write};
use super::simd::dropout_scales;
use burn::backend::autodiff::{
    checkpoint::base::Checkpointer,
    grads::Gradients,
    ops::{Backward, Ops},
};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// A LoRA adapter's tensors and settings: `x -> scaling x dropout(x) A^T B^T`.
pub struct Adapter<B: Backend> {
    /// `[r, in]`.
    pub a: Tensor<B, 2>,
    /// `[out, r]`.
    pub b: Tensor<B, 2>,
    pub scaling: f64,
    /// Dropout probability on the adapter's input.
    pub dropout: f64,
}

/// `x [m, k] x w^T` for a weight `w [n, k]` -> `[m, n]`, for inference.
pub fn matmul_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !inference::<B>(x.dtype()) || w.dtype() != DType::F32 {
        return None;
    }
    let [m, k] = x.dims();
    let n = w.dims()[0];
    let (x, w) = (View::of(x.clone())?, View::of(w.clone())?);
    // SAFETY: the views bound the operands.
    let out = unsafe {
        product(
            [m, n, k],
            Operand::new(x.at(&[0, 0]), x.strides[1], x.strides[0]),
            Operand::new(w.at(&[0, 0]), w.strides[0], w.strides[1]),
            1.0,
        )
    };
    Some(from_vec(out, [m, n]))
}

/// Inverted dropout with a mask that is a pure function of (seed, element index).
#[derive(Debug, Clone, Copy)]
struct Dropout {
    seed: u64,
    /// Keep an element when its hash is below this.
    threshold: u32,
    /// 1 / keep probability.
    scale: f32,
}

impl Dropout {
    /// Dropout with probability `p` and a seed drawn from the backend's generator, so that
    /// `B::seed` makes it reproducible.
    fn draw<B: Backend>(p: f64, device: &B::Device) -> Self {
        let bits: Vec<f32> = Tensor::<B, 1>::random([2], Distribution::Default, device)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 data");
        let keep = 1.0 - p;
        Self {
            seed: (u64::from(bits[0].to_bits()) << 32) | u64::from(bits[1].to_bits()),
            threshold: (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The mask's factors (`scale` or 0) for `len` elements.
    fn factors(&self, len: usize) -> Vec<f32> {
        const CHUNK: usize = 1 << 14;
        let mut out = vec![0f32; len];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            dropout_scales(o, (c * CHUNK) as u32, self.seed, self.threshold, self.scale)
        });
        out
    }
}

/// `a ⊙ b`, element-wise, in parallel.
fn times(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.par_iter().zip(b).map(|(x, y)| x * y).collect()
}

/// A projection `x W^T` (plus `scaling x dropout(x) A^T B^T` with an adapter) as one autodiff
/// node, for training; W gets no gradient.
///
/// # Shapes
/// `x [m, k]`, `w [n, k]`, adapter A `[r, k]` and B `[n, r]` -> `[m, n]`.
pub fn linear<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    adapter: Option<&Adapter<B>>,
) -> Option<Tensor<B, 2>> {
    let dropout = adapter
        .filter(|l| l.dropout > 0.0 && training::<B>(x.dtype()))
        .map(|l| Dropout::draw::<B>(l.dropout, &x.device()));
    linear_with(x, w, adapter, dropout)
}

/// [`linear`] with the adapter's dropout given.
fn linear_with<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    adapter: Option<&Adapter<B>>,
    dropout: Option<Dropout>,
) -> Option<Tensor<B, 2>> {
    let all_f32 = w.dtype() == DType::F32
        && adapter.is_none_or(|l| l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32);
    if !training::<B>(x.dtype()) || !all_f32 {
        return None;
    }
    let [m, k] = x.dims();
    let n = w.dims()[0];
    let x = to_ad(x.clone());
    let xs = dense(x.primitive.clone());
    let w = dense(to_ad(w.clone()).primitive);
    // SAFETY: x is [m, k] and w [n, k], row-major.
    let mut y = unsafe {
        product(
            [m, n, k],
            Operand::rows(elems(&xs), k),
            Operand::transposed(elems(&w), k),
            1.0,
        )
    };
    let Some(adapter) = adapter else {
        let y = flex_tensor(y, &[m, n]);
        return Some(from_ad(record(Frozen, [&x], y, || FrozenState {
            w,
            dims: [m, n, k],
        })));
    };
    let r = adapter.a.dims()[0];
    let (a, b) = (to_ad(adapter.a.clone()), to_ad(adapter.b.clone()));
    let (aw, bw) = (dense(a.primitive.clone()), dense(b.primitive.clone()));
    let scaling = adapter.scaling as f32;
    let dropped = dropout.map(|d| times(elems(&xs), &d.factors(m * k)));
    let xd = dropped.as_deref().unwrap_or(elems(&xs));
    // SAFETY: xd is [m, k], A [r, k], h [m, r], B [n, r], y [m, n], all row-major.
    let h = unsafe {
        product(
            [m, r, k],
            Operand::rows(xd, k),
            Operand::transposed(elems(&aw), k),
            1.0,
        )
    };
    unsafe {
        par_gemm(
            [m, n, r],
            &mut y,
            Operand::rows(&h, r),
            Operand::transposed(elems(&bw), r),
            Write::Add(scaling),
        );
    }
    let y = flex_tensor(y, &[m, n]);
    let state = || AdaptedState {
        x: xs,
        w,
        a: aw,
        b: bw,
        h: flex_tensor(h, &[m, r]),
        scaling,
        dropout,
        dims: [m, n, k, r],
    };
    Some(from_ad(record(Adapted, [&x, &a, &b], y, state)))
}

/// `g [m, n] x W [n, k]`, the input's gradient through the frozen weight.
fn input_grad(g: &[f32], w: &FlexTensor, [m, n, k]: [usize; 3]) -> Vec<f32> {
    // SAFETY: g is [m, n] and W [n, k], row-major.
    unsafe {
        product(
            [m, k, n],
            Operand::rows(g, n),
            Operand::rows(elems(w), k),
            1.0,
        )
    }
}

#[derive(Debug)]
struct Frozen;

#[derive(Debug, Clone)]
struct FrozenState {
    w: FlexTensor,
    /// `[m, n, k]`.
    dims: [usize; 3],
}

impl Backward<Flex, 1> for Frozen {
    type State = FrozenState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = upstream(&ops, grads);
        let [m, _, k] = ops.state.dims;
        if wants(&ops, 0) {
            let gx = input_grad(elems(&g), &ops.state.w, ops.state.dims);
            give(&ops, 0, grads, gx, &[m, k]);
        }
    }
}

#[derive(Debug)]
struct Adapted;

#[derive(Debug, Clone)]
struct AdaptedState {
    x: FlexTensor,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    /// `dropout(x) A^T`, `[m, r]`.
    h: FlexTensor,
    scaling: f32,
    dropout: Option<Dropout>,
    dims: [usize; 4],
}

impl Backward<Flex, 3> for Adapted {
    type State = AdaptedState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = upstream(&ops, grads);
        let s = &ops.state;
        let [m, n, k, r] = s.dims;
        let g = elems(&g);
        // SAFETY (every gemm below): the buffers are row-major with the dimensions given.
        if wants(&ops, 2) {
            // dB = scaling x g^T h
            let gb = unsafe {
                product(
                    [n, r, m],
                    Operand::transposed(g, n),
                    Operand::rows(elems(&s.h), r),
                    s.scaling,
                )
            };
            give(&ops, 2, grads, gb, &[n, r]);
        }
        if !wants(&ops, 0) && !wants(&ops, 1) {
            return;
        }
        // The gradient of h: scaling x g B, [m, r].
        let gh = unsafe {
            product(
                [m, r, n],
                Operand::rows(g, n),
                Operand::rows(elems(&s.b), r),
                s.scaling,
            )
        };
        let factors = s.dropout.map(|d| d.factors(m * k));
        if wants(&ops, 1) {
            // dA = gh^T dropout(x)
            let dropped = factors.as_ref().map(|f| times(elems(&s.x), f));
            let xd = dropped.as_deref().unwrap_or(elems(&s.x));
            let ga = unsafe {
                product(
                    [r, k, m],
                    Operand::transposed(&gh, r),
                    Operand::rows(xd, k),
                    1.0,
                )
            };
            give(&ops, 1, grads, ga, &[r, k]);
        }
        if wants(&ops, 0) {
            // dx = g W + dropout'(gh A)
            let mut gx = input_grad(g, &s.w, [m, n, k]);
            let (gh, a) = (Operand::rows(&gh, r), Operand::rows(elems(&s.a), k));
            match &factors {
                None => unsafe { par_gemm([m, k, r], &mut gx, gh, a, Write::Add(1.0)) },
                Some(f) => {
                    let t = unsafe { product([m, k, r], gh, a, 1.0) };
                    gx.par_iter_mut()
                        .zip(&t)
                        .zip(f)
                        .for_each(|((o, t), f)| *o += t * f);
                }
            }
            give(&ops, 0, grads, gx, &[m, k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;
    use burn::tensor::{backend::BackendTypes, TensorData};

    type Ad = Autodiff<Flex>;

    fn uniform(dims: [usize; 2], device: &<Ad as BackendTypes>::Device) -> Tensor<Ad, 2> {
        Tensor::random(dims, Distribution::Uniform(-1.0, 1.0), device)
    }

    fn max_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The fused projection against the same math in burn's generic ops (with the fused op's
    /// own dropout mask): outputs and the gradients of x, A and B.
    #[test]
    fn projection_matches_generic_ops_in_value_and_gradients() {
        let device = Default::default();
        let [m, n, k, r] = [300, 160, 96, 8];
        for dropout in [0.0, 0.3] {
            Ad::seed(&device, 1);
            let x = uniform([m, k], &device).require_grad();
            let w = uniform([n, k], &device);
            let lora = Adapter {
                a: uniform([r, k], &device).require_grad(),
                b: uniform([n, r], &device).require_grad(),
                scaling: 2.0,
                dropout,
            };
            let c = uniform([m, n], &device);
            let drop = (dropout > 0.0).then_some(Dropout {
                seed: 7,
                threshold: ((1.0 - dropout) * 4_294_967_296.0) as u32,
                scale: (1.0 / (1.0 - dropout)) as f32,
            });
            let y = linear_with(&x, &w, Some(&lora), drop).expect("Autodiff<Flex>, f32");
            let grads = (y.clone() * c.clone()).sum().backward();
            let got = [
                x.grad(&grads).unwrap(),
                lora.a.clone().grad(&grads).unwrap(),
                lora.b.clone().grad(&grads).unwrap(),
            ];
            let xd = match drop {
                Some(drop) => {
                    let f = drop.factors(m * k);
                    let dropped = f.iter().filter(|&&f| f == 0.0).count() as f64 / f.len() as f64;
                    assert!((dropped - dropout).abs() < 0.01, "dropped {dropped}");
                    x.clone() * Tensor::from_data(TensorData::new(f, [m, k]), &device)
                }
                None => x.clone(),
            };
            let want = x.clone().matmul(w.clone().transpose())
                + xd.matmul(lora.a.clone().transpose())
                    .matmul(lora.b.clone().transpose())
                    .mul_scalar(2.0);
            let grads = (want.clone() * c).sum().backward();
            let expected = [
                x.grad(&grads).unwrap(),
                lora.a.clone().grad(&grads).unwrap(),
                lora.b.clone().grad(&grads).unwrap(),
            ];
            assert!(max_diff(y.inner(), want.inner()) < 1e-4);
            for (g, e) in got.into_iter().zip(expected) {
                let d = max_diff(g, e);
                assert!(d < 1e-3, "dropout {dropout}: gradient differs by {d}");
            }
        }
    }

    #[test]
    fn frozen_projection_passes_the_gradient_through_the_weight() {
        let device = Default::default();
        let x = uniform([40, 24], &device).require_grad();
        let w = uniform([56, 24], &device);
        let c = uniform([40, 56], &device);
        let y = linear(&x, &w, None).unwrap();
        let got = x.grad(&(y * c.clone()).sum().backward()).unwrap();
        let want = c.matmul(w).inner();
        assert!(max_diff(got, want) < 1e-5);
    }

    #[test]
    fn dropout_masks_differ_between_seeds() {
        let d = |seed| Dropout {
            seed,
            threshold: u32::MAX / 2,
            scale: 2.0,
        };
        let (a, b) = (d(1).factors(4096), d(2).factors(4096));
        assert_eq!(a, d(1).factors(4096));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!((1800..2300).contains(&same), "{same} of 4096 agree");
    }
}
