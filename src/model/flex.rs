//! Direct kernels for burn's Flex CPU backend, used where inference in f32 would otherwise
//! waste time in generic tensor ops: projections split across threads by output columns, the
//! log-sum-exp of logit rows and SwiGLU's `silu(gate) * up`, with a vectorised exp. Each
//! function returns `None` for any other backend (CUDA), for autodiff (training) and for other
//! dtypes, and the caller runs its generic tensor ops instead. Attention is in [`super::flash`].

use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// Whether tensors of backend `B` and this dtype run through these kernels.
pub fn supported<B: Backend>(dtype: DType) -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>() && dtype == DType::F32
}

/// `x [m, k] x w^T` for a weight `w [n, k]` (a Hugging Face projection) -> `[m, n]`.
///
/// The gemm crate parallelises small-`m` products poorly; here the output columns are split
/// into one block per thread, each a single-threaded gemm.
pub fn matmul_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !supported::<B>(x.dtype()) || w.dtype() != DType::F32 {
        return None;
    }
    let [m, k] = x.dims();
    let n = w.dims()[0];
    let (x, w) = (View::of(x.clone())?, View::of(w.clone())?);
    let mut out = vec![0f32; m * n];
    let dst = SharedOut(out.as_mut_ptr());
    let parts = if m * n * k < 1 << 18 {
        1
    } else {
        rayon::current_num_threads()
    };
    let width = n.div_ceil(parts).next_multiple_of(16);
    (0..n.div_ceil(width)).into_par_iter().for_each(|p| {
        let c0 = p * width;
        let cols = width.min(n - c0);
        // SAFETY: the views bound the operands; each part writes its own columns of `out`.
        unsafe {
            gemm(
                [m, cols, k],
                (dst.at(c0), 1, n as isize),
                (x.at(&[0, 0]), x.strides[1], x.strides[0]),
                (w.at(&[c0, 0]), w.strides[0], w.strides[1]),
            )
        }
    });
    Some(from_vec(out, [m, n]))
}

/// `log(sum(exp(row)))` of every row of `[rows, cols]` logits -> `[rows, 1]`.
pub fn logsumexp<B: Backend>(logits: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !supported::<B>(logits.dtype()) {
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

/// SwiGLU's `silu(gate) * up`, element-wise over two tensors of the same shape.
pub fn silu_mul<B: Backend, const D: usize>(
    gate: &Tensor<B, D>,
    up: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    if !supported::<B>(gate.dtype()) || up.dtype() != DType::F32 {
        return None;
    }
    let dims = gate.dims();
    let (g, u) = (View::of(gate.clone())?, View::of(up.clone())?);
    let (g, u) = (g.contiguous()?, u.contiguous()?);
    let mut out = vec![0f32; g.len()];
    out.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
        .for_each(|(o, (g, u))| silu_mul_slice(o, g, u));
    Some(from_vec(out, dims))
}

/// Wraps a row-major buffer as a Flex tensor of backend `B` (which must be Flex).
pub(super) fn from_vec<B: Backend, const D: usize>(
    data: Vec<f32>,
    dims: [usize; D],
) -> Tensor<B, D> {
    let t = FlexTensor::from_data(TensorData::new(data, dims));
    let prim = (Box::new(t) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .expect("from_vec is only called after `supported`");
    Tensor::from_primitive(TensorPrimitive::Float(*prim))
}

/// A Flex tensor's storage with its element strides (all positive).
pub(super) struct View {
    tensor: FlexTensor,
    pub strides: Vec<isize>,
}

impl View {
    pub fn of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<Self> {
        let prim = t.into_primitive().tensor();
        let tensor = *(Box::new(prim) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .ok()?;
        let tensor = if tensor.layout().has_positive_strides() {
            tensor
        } else {
            tensor.to_contiguous()
        };
        let strides = tensor.layout().strides().to_vec();
        Some(Self { tensor, strides })
    }

    /// Pointer to the element at `idx`.
    pub fn at(&self, idx: &[usize]) -> *const f32 {
        let offset = self.tensor.layout().start_offset() as isize
            + idx
                .iter()
                .zip(&self.strides)
                .map(|(&i, s)| i as isize * s)
                .sum::<isize>();
        self.tensor.storage::<f32>()[offset as usize..].as_ptr()
    }

    /// The elements in row-major order, when they are stored that way.
    fn contiguous(&self) -> Option<&[f32]> {
        self.tensor.as_slice::<f32>()
    }
}

/// An output buffer that parallel tasks write in disjoint parts.
pub(super) struct SharedOut(pub *mut f32);
// SAFETY: every user writes disjoint elements from each task.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers compute `offset` inside the buffer from its shape.
        unsafe { self.0.add(offset) }
    }
}

/// `dst[m, n] = lhs[m, k] x rhs[k, n]`, each given as (pointer, column stride, row stride),
/// single-threaded.
///
/// # Safety
/// Every pointer with its strides must address valid `f32`s for the given dimensions.
pub(super) unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.1,
            dst.2,
            false,
            lhs.0,
            lhs.1,
            lhs.2,
            rhs.0,
            rhs.1,
            rhs.2,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Defines `$name` running the `#[inline(always)]` function `$body` compiled for AVX-512 or
/// AVX2 + FMA when the CPU has them, so that its loops vectorise.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub(super) fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { v4($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

vectorised! {
    /// Unnormalised softmax of one row of scores over its first `visible` keys minus padded
    /// ones: `exp(x - max)` there, 0 everywhere else; returns 1 / their sum (0 when no key is
    /// visible).
    fn softmax_row(row: &mut [f32], visible: usize, padding: Option<&[bool]>) -> f32 = softmax_row_body
}

vectorised! {
    fn logsumexp_row(row: &[f32]) -> f32 = logsumexp_row_body
}

vectorised! {
    fn silu_mul_slice(out: &mut [f32], gate: &[f32], up: &[f32]) -> () = silu_mul_body
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32], visible: usize, padding: Option<&[bool]>) -> f32 {
    let (live, hidden) = row.split_at_mut(visible);
    hidden.fill(0.0);
    if let Some(pad) = padding {
        for (x, &p) in live.iter_mut().zip(pad) {
            if p {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    let max = lane_fold(live, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        live.fill(0.0);
        return 0.0;
    }
    let mut acc = [0f32; LANES];
    let mut chunks = live.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    1.0 / sum
}

#[inline(always)]
fn logsumexp_row_body(row: &[f32]) -> f32 {
    let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| exp(x - max)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp(x - max);
        }
    }
    (acc.iter().sum::<f32>() + tail).ln() + max
}

#[inline(always)]
fn silu_mul_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// Lanes of the reductions, so that they vectorise.
const LANES: usize = 16;

/// Folds `xs` with `f` in [`LANES`] independent accumulators, then folds those.
#[inline(always)]
fn lane_fold(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &x| f(a, x))
}

/// `e^x` to about 1 ulp (Cephes' expf polynomial), branch-free so that loops over it vectorise;
/// `-inf` gives 0 and large `x` saturates at `e^88.38`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.336_55;
    let x = x.clamp(-87.336_55, 88.376_26);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((t.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        e * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn softmax_masks_future_and_padding() {
        let mut row = vec![1.0, 2.0, 3.0, 4.0];
        let inv = softmax_row(&mut row, 3, Some(&[false, true, false, false]));
        let e = [1f32.exp(), 0.0, 3f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in row.iter().zip(e.iter().map(|x| x / sum).chain([0.0])) {
            assert!((got * inv - want).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn row_kernels_match_scalar_math() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.21 - 9.0)
            .collect();
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
        assert!((logsumexp_row(&row) - lse).abs() < 1e-5);
        let up: Vec<f32> = row.iter().map(|x| x * 0.5 + 1.0).collect();
        let mut out = vec![0.0; row.len()];
        silu_mul_slice(&mut out, &row, &up);
        for ((o, g), u) in out.iter().zip(&row).zip(&up) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{o} vs {want}"
            );
        }
    }
}
