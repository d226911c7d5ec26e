//! Direct kernels for burn's Flex CPU backend, used where inference in f32 would otherwise
//! waste time in generic tensor ops: projections split across threads by output columns, the
//! log-sum-exp of logit rows. Each function returns `None` for
//! any other backend (CUDA), for autodiff and for other dtypes, and the caller runs its generic
//! tensor ops instead. Also here: the split gemm ([`par_gemm`], [`product`]) and the tensor
//! views that the attention ([`super::flash`]) and the training kernels
//! ([`super::flex_grad`], [`super::flash_grad`], [`super::pointwise_grad`]) build on; the row
//! kernels are in [`super::simd`].

use super::simd::logsumexp_row;
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
pub fn matmul_t<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !supported::<B>(x.dtype()) || w.dtype() != DType::F32 {
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

/// A Flex tensor's storage with its dimensions and element strides (all positive).
#[derive(Debug, Clone)]
pub(super) struct View {
    tensor: FlexTensor,
    pub dims: Vec<usize>,
    pub strides: Vec<isize>,
}

impl View {
    pub fn of<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<Self> {
        let prim = t.into_primitive().tensor();
        let tensor = *(Box::new(prim) as Box<dyn Any>)
            .downcast::<FlexTensor>()
            .ok()?;
        Some(Self::from_flex(tensor))
    }

    pub fn into_flex(self) -> FlexTensor {
        self.tensor
    }

    pub fn from_flex(tensor: FlexTensor) -> Self {
        let tensor = if tensor.layout().has_positive_strides() {
            tensor
        } else {
            tensor.to_contiguous()
        };
        let strides = tensor.layout().strides().to_vec();
        let dims = tensor.layout().shape().to_vec();
        Self {
            tensor,
            dims,
            strides,
        }
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

/// `dst[m, n] = scale x lhs[m, k] x rhs[k, n]` (or `+=` it), each given as (pointer, column
/// stride, row stride), single-threaded.
///
/// # Safety
/// Every pointer with its strides must address valid `f32`s for the given dimensions.
pub(super) unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    acc: Write,
) {
    let (read_dst, beta) = match acc {
        Write::Set(scale) => (false, scale),
        Write::Add(scale) => (true, scale),
    };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.1,
            dst.2,
            read_dst,
            lhs.0,
            lhs.1,
            lhs.2,
            rhs.0,
            rhs.1,
            rhs.2,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `buf` at length `len` without clearing what it holds, for a gemm with [`Write::Set`] to
/// overwrite (scratch space reused from task to task).
pub(super) fn resize_for_gemm(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    } else {
        buf.truncate(len);
    }
}

/// A matrix operand of [`par_gemm`]: pointer to element (0, 0), column stride, row stride.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    ptr: *const f32,
    cs: isize,
    rs: isize,
}
// SAFETY: operands are only read, by tasks that all outlive no borrow of the data.
unsafe impl Sync for Operand {}
unsafe impl Send for Operand {}

impl Operand {
    pub fn new(ptr: *const f32, cs: isize, rs: isize) -> Self {
        Self { ptr, cs, rs }
    }

    /// A row-major `[rows, cols]` buffer.
    pub fn rows(data: &[f32], cols: usize) -> Self {
        Self::new(data.as_ptr(), 1, cols as isize)
    }

    /// The transpose of a row-major `[rows, cols]` buffer, seen as `[cols, rows]`.
    pub fn transposed(data: &[f32], cols: usize) -> Self {
        Self::new(data.as_ptr(), cols as isize, 1)
    }

    /// The same operand starting at element (row, col).
    fn at(self, row: usize, col: usize) -> Self {
        let offset = row as isize * self.rs + col as isize * self.cs;
        // SAFETY: callers stay inside the operand's dimensions.
        Self::new(unsafe { self.ptr.offset(offset) }, self.cs, self.rs)
    }

    fn parts(self) -> (*const f32, isize, isize) {
        (self.ptr, self.cs, self.rs)
    }
}

/// What a gemm writes: `scale x lhs x rhs` over its destination, or added to it.
#[derive(Clone, Copy)]
pub(super) enum Write {
    Set(f32),
    Add(f32),
}

/// `dst[m, n] (row-major) = scale x lhs[m, k] x rhs[k, n]`, or `+=` that product.
///
/// The gemm crate parallelises these shapes (a few hundred to a few thousand rows) poorly; here
/// the output is split into one block per thread, each a single-threaded gemm: by columns when
/// there are enough of them (each thread then packs only its part of `rhs`, a weight), else by
/// rows.
///
/// # Safety
/// `lhs` and `rhs` must address valid `f32`s for the given dimensions.
pub(super) unsafe fn par_gemm(
    dims: [usize; 3],
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    acc: Write,
) {
    assert!(dst.len() >= dims[0] * dims[1]);
    unsafe { split_gemm(dims, SharedOut(dst.as_mut_ptr()), lhs, rhs, acc) }
}

/// `scale x lhs[m, k] x rhs[k, n]` as a new row-major buffer, which is not zeroed first: with
/// [`Write::Set`] the gemm writes every element without reading it.
///
/// # Safety
/// As [`par_gemm`].
pub(super) unsafe fn product(dims: [usize; 3], lhs: Operand, rhs: Operand, scale: f32) -> Vec<f32> {
    let len = dims[0] * dims[1];
    let mut out = Vec::with_capacity(len);
    // SAFETY: the gemm writes all `len` elements of the allocation before `set_len`.
    unsafe {
        split_gemm(
            dims,
            SharedOut(out.as_mut_ptr()),
            lhs,
            rhs,
            Write::Set(scale),
        );
        out.set_len(len);
    }
    out
}

/// [`par_gemm`] into `out`, which must hold `m * n` elements.
unsafe fn split_gemm(
    [m, n, k]: [usize; 3],
    out: SharedOut,
    lhs: Operand,
    rhs: Operand,
    acc: Write,
) {
    let threads = if m * n * k < 1 << 18 {
        1
    } else {
        rayon::current_num_threads()
    };
    let by_cols = n >= 128 || n >= m;
    let along = if by_cols { n } else { m };
    let width = along.div_ceil(threads).next_multiple_of(16);
    (0..along.div_ceil(width)).into_par_iter().for_each(|p| {
        let start = p * width;
        let len = width.min(along - start);
        let (rows, cols, d, l, r) = if by_cols {
            (m, len, out.at(start), lhs, rhs.at(0, start))
        } else {
            (len, n, out.at(start * n), lhs.at(start, 0), rhs)
        };
        // SAFETY: each part writes its own block of `out`; the operands are the caller's.
        unsafe {
            gemm(
                [rows, cols, k],
                (d, 1, n as isize),
                l.parts(),
                r.parts(),
                acc,
            )
        }
    });
}
