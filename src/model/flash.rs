//! Fused causal attention for burn's Flex CPU backend (inference in f32).
//!
//! The generic path of [`super::attention`] builds scores, an additive mask and the softmax as
//! separate tensors and computes its exponentials one at a time. Here every (batch row, head,
//! block of queries) is one rayon task: the scores of the keys that block can see (one gemm),
//! the causal and padding mask and softmax in place with a vectorised exp, then probabilities x V
//! (a second gemm) written straight into the `[batch, seq, heads * head_dim]` layout that o_proj
//! reads. Other backends, autodiff (training) and other dtypes take the generic path.

use burn::backend::Flex;
use burn::tensor::{backend::Backend, DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// Queries per task.
const BLOCK: usize = 64;

/// Whether tensors of backend `B` and this dtype run through [`attention`].
pub fn supported<B: Backend>(dtype: DType) -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>() && dtype == DType::F32
}

/// Causal attention of queries at the last `seq` of `keys` positions.
///
/// # Shapes
/// - `q`: `[batch, seq, heads, head_dim]`, rotated and already scaled by `1/sqrt(head_dim)`
/// - `k`, `v`: `[batch, kv_heads, keys, head_dim]`
/// - `padding`: `batch * keys` flags, true where a key is padding
/// - returns `[batch, seq, heads * head_dim]`, or `None` when `B` is not Flex
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    padding: Option<&[bool]>,
) -> Option<Tensor<B, 3>> {
    let [batch, seq, heads, d] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let (q, k, v) = (View::of(q)?, View::of(k)?, View::of(v)?);
    let start = keys - seq;
    let rep = heads / kv_heads;
    let blocks = seq.div_ceil(BLOCK);
    let mut out = vec![0f32; batch * seq * heads * d];
    let dst = SharedOut(out.as_mut_ptr());
    (0..batch * heads * blocks).into_par_iter().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, task| {
            let (b, h, r0) = (
                task / (heads * blocks),
                task / blocks % heads,
                task % blocks * BLOCK,
            );
            let rows = BLOCK.min(seq - r0);
            let seen = start + r0 + rows;
            let g = h / rep;
            scores.clear();
            scores.resize(rows * seen, 0.0);
            let pad = padding.map(|p| &p[b * keys..b * keys + seen]);
            // SAFETY: the views bound every index used below; each task writes only its own
            // rows of head `h` in `out`, which no other task touches.
            unsafe {
                gemm(
                    [rows, seen, d],
                    (scores.as_mut_ptr(), 1, seen as isize),
                    (q.at([b, r0, h, 0]), q.strides[3], q.strides[1]),
                    (k.at([b, g, 0, 0]), k.strides[2], k.strides[3]),
                );
                for (i, row) in scores.chunks_exact_mut(seen).enumerate() {
                    softmax_row(row, start + r0 + i + 1, pad);
                }
                let row_stride = (heads * d) as isize;
                gemm(
                    [rows, d, seen],
                    (dst.at(((b * seq + r0) * heads + h) * d), 1, row_stride),
                    (scores.as_ptr(), 1, seen as isize),
                    (v.at([b, g, 0, 0]), v.strides[3], v.strides[2]),
                );
            }
        },
    );
    let out = FlexTensor::from_data(TensorData::new(out, [batch, seq, heads * d]));
    let prim = (Box::new(out) as Box<dyn Any>)
        .downcast::<B::FloatTensorPrimitive>()
        .ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(*prim)))
}

/// A Flex tensor's storage with its element strides (all positive).
struct View {
    tensor: FlexTensor,
    strides: [isize; 4],
}

impl View {
    fn of<B: Backend>(t: Tensor<B, 4>) -> Option<Self> {
        let prim = t.into_primitive().tensor();
        let tensor = *(Box::new(prim) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .ok()?;
        let tensor = if tensor.layout().has_positive_strides() {
            tensor
        } else {
            tensor.to_contiguous()
        };
        let s = tensor.layout().strides();
        let strides = [s[0], s[1], s[2], s[3]];
        Some(Self { tensor, strides })
    }

    /// Pointer to element `idx`.
    fn at(&self, idx: [usize; 4]) -> *const f32 {
        let offset = self.tensor.layout().start_offset() as isize
            + idx
                .iter()
                .zip(self.strides)
                .map(|(&i, s)| i as isize * s)
                .sum::<isize>();
        self.tensor.storage::<f32>()[offset as usize..].as_ptr()
    }
}

/// The output buffer, written by disjoint tasks.
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint elements (see `attention`).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: `offset` is inside the output buffer (`attention` computes it from its shape).
        unsafe { self.0.add(offset) }
    }
}

/// `dst[m, n] = lhs[m, k] x rhs[k, n]`, each given as (pointer, column stride, row stride).
///
/// # Safety
/// Every pointer with its strides must address valid `f32`s for the given dimensions.
unsafe fn gemm(
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

/// Softmax of one row of scores over its first `visible` keys minus padded ones; every other
/// entry becomes 0.
fn softmax_row(row: &mut [f32], visible: usize, padding: Option<&[bool]>) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { softmax_row_avx512(row, visible, padding) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { softmax_row_avx2(row, visible, padding) };
        }
    }
    softmax_row_body(row, visible, padding)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
fn softmax_row_avx512(row: &mut [f32], visible: usize, padding: Option<&[bool]>) {
    softmax_row_body(row, visible, padding)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_row_avx2(row: &mut [f32], visible: usize, padding: Option<&[bool]>) {
    softmax_row_body(row, visible, padding)
}

/// Lanes of the reductions, so that they vectorise.
const LANES: usize = 16;

#[inline(always)]
fn softmax_row_body(row: &mut [f32], visible: usize, padding: Option<&[bool]>) {
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
        return;
    }
    for x in live.iter_mut() {
        *x = exp(*x - max);
    }
    let inv = 1.0 / lane_fold(live, 0.0, |a, b| a + b);
    for x in live.iter_mut() {
        *x *= inv;
    }
}

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

/// `e^x` to about 1 ulp (Cephes' expf polynomial), branch-free so loops over it vectorise;
/// `-inf` gives 0.
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
        softmax_row(&mut row, 3, Some(&[false, true, false, false]));
        let e = [1f32.exp(), 0.0, 3f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in row.iter().zip(e.iter().map(|x| x / sum).chain([0.0])) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
    }
}
