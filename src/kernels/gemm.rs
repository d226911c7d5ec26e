//! Matrix products on the CPU: the gemm crate's single-threaded kernel ([`gemm`]), and products
//! split across rayon's threads by blocks of the output ([`par_gemm`], [`product`]).

use rayon::prelude::*;

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
