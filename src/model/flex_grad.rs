//! Training kernels for burn's autodiff over Flex in f32: the projections of the student, with
//! their forward and backward passes written by hand on the direct gemm of [`super::flex`] and
//! registered in burn's autodiff graph as one node each.
//!
//! Through burn's generic ops a LoRA projection is a dozen graph nodes (the frozen matmul and its
//! transpose, a dropout mask drawn element by element, two low-rank matmuls, scalings, a sum),
//! each with its own buffers, and the matmuls run on a gemm whose threading suits these shapes
//! poorly. Here the frozen weight gets no gradient and no copy, the dropout mask is a hash of
//! (seed, index) that the backward pass regenerates instead of storing, and every product is a
//! gemm split across threads. Each function returns `None` for any other backend or dtype, and
//! the caller runs the generic ops.
//!
//! Also here, shared by every training kernel ([`super::flash_grad`], [`super::pointwise_grad`],
//! `distill::kd_kernel`): recognising `Autodiff<Flex>` and moving between its tensors and their
//! Flex storage.

use super::flex::{par_gemm, product, Operand, Write};
use super::lora::Lora;
use super::simd::dropout_scales;
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::NoCheckpointing},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Distribution, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::{Any, TypeId};

type Ad = Autodiff<Flex>;
/// burn's autodiff tensor over Flex (the type itself is not exported by name).
pub(crate) type AdTensor = <Ad as BackendTypes>::FloatTensorPrimitive;

/// Whether tensors of backend `B` and this dtype run through these kernels.
pub(crate) fn supported<B: Backend>(dtype: DType) -> bool {
    TypeId::of::<B>() == TypeId::of::<Ad>() && dtype == DType::F32
}

/// The autodiff tensor inside `t`; `B` must be `Autodiff<Flex>` (see [`supported`]).
pub(crate) fn to_ad<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
    let prim = t.into_primitive().tensor();
    *(Box::new(prim) as Box<dyn Any>)
        .downcast::<AdTensor>()
        .expect("to_ad is only called after `supported`")
}

/// The inverse of [`to_ad`].
pub(crate) fn from_ad<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    let prim = *(Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("from_ad is only called after `supported`");
    Tensor::from_primitive(TensorPrimitive::Float(prim))
}

/// `t` with its elements row-major from its first (copied only when `t` is a strided view).
pub(crate) fn dense(t: FlexTensor) -> FlexTensor {
    if t.layout().contiguous_offsets().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a [`dense`] tensor.
pub(crate) fn elems(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a dense f32 tensor")
}

pub(crate) fn flex_tensor(data: Vec<f32>, dims: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, dims.to_vec()))
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
/// node; `None` unless `B` is `Autodiff<Flex>` and every operand is f32. W gets no gradient.
///
/// # Shapes
/// `x [m, k]`, `w [n, k]`, adapter A `[r, k]` and B `[n, r]` -> `[m, n]`.
pub fn linear<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    lora: Option<&Lora<B>>,
) -> Option<Tensor<B, 2>> {
    let dropout = lora
        .filter(|l| l.dropout > 0.0 && supported::<B>(x.dtype()))
        .map(|l| Dropout::draw::<B>(l.dropout, &x.device()));
    linear_with(x, w, lora, dropout)
}

/// [`linear`] with the adapter's dropout given.
fn linear_with<B: Backend>(
    x: &Tensor<B, 2>,
    w: &Tensor<B, 2>,
    lora: Option<&Lora<B>>,
    dropout: Option<Dropout>,
) -> Option<Tensor<B, 2>> {
    let adapter = lora.map(|l| (l.lora_a.val(), l.lora_b.val(), l));
    let all_f32 = w.dtype() == DType::F32
        && adapter
            .as_ref()
            .is_none_or(|(a, b, _)| a.dtype() == DType::F32 && b.dtype() == DType::F32);
    if !supported::<B>(x.dtype()) || !all_f32 {
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
    let Some((a, b, lora)) = adapter else {
        let y = flex_tensor(y, &[m, n]);
        let out = match Frozen
            .prepare::<NoCheckpointing>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(FrozenState { w, m, n, k }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        return Some(from_ad(out));
    };
    let r = a.dims()[0];
    let (a, b) = (to_ad(a), to_ad(b));
    let (aw, bw) = (dense(a.primitive.clone()), dense(b.primitive.clone()));
    let scaling = lora.scaling as f32;
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
    let out = match Adapted
        .prepare::<NoCheckpointing>([x.node.clone(), a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = AdaptedState {
                x: xs,
                w,
                a: aw,
                b: bw,
                h: flex_tensor(h, &[m, r]),
                scaling,
                dropout,
                dims: [m, n, k, r],
            };
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Some(from_ad(out))
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
    m: usize,
    n: usize,
    k: usize,
}

impl Backward<Flex, 1> for Frozen {
    type State = FrozenState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = dense(grads.consume::<Flex>(&ops.node));
        let FrozenState { w, m, n, k } = ops.state;
        if let Some(node) = &ops.parents[0] {
            let gx = input_grad(elems(&g), &w, [m, n, k]);
            grads.register::<Flex>(node.id, flex_tensor(gx, &[m, k]));
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
        let g = dense(grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let [m, n, k, r] = s.dims;
        let g = elems(&g);
        let [px, pa, pb] = &ops.parents;
        // SAFETY (every gemm below): the buffers are row-major with the dimensions given.
        if let Some(node) = pb {
            // dB = scaling x g^T h
            let gb = unsafe {
                product(
                    [n, r, m],
                    Operand::transposed(g, n),
                    Operand::rows(elems(&s.h), r),
                    s.scaling,
                )
            };
            grads.register::<Flex>(node.id, flex_tensor(gb, &[n, r]));
        }
        if pa.is_none() && px.is_none() {
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
        if let Some(node) = pa {
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
            grads.register::<Flex>(node.id, flex_tensor(ga, &[r, k]));
        }
        if let Some(node) = px {
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
            grads.register::<Flex>(node.id, flex_tensor(gx, &[m, k]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

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
            let lora = Lora {
                lora_a: Param::from_tensor(uniform([r, k], &device)),
                lora_b: Param::from_tensor(uniform([n, r], &device)),
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
                lora.lora_a.val().grad(&grads).unwrap(),
                lora.lora_b.val().grad(&grads).unwrap(),
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
                + xd.matmul(lora.lora_a.val().transpose())
                    .matmul(lora.lora_b.val().transpose())
                    .mul_scalar(2.0);
            let grads = (want.clone() * c).sum().backward();
            let expected = [
                x.grad(&grads).unwrap(),
                lora.lora_a.val().grad(&grads).unwrap(),
                lora.lora_b.val().grad(&grads).unwrap(),
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
